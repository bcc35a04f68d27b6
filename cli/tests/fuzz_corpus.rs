//! The fuzzer's corpus of batch files, replayed through the `cppo` binary, and a short
//! seeded run of the fuzzer itself (`cppo_fuzz::files`).
//!
//! `fuzz/corpus/files/` holds batch files the readers must survive: the crafted hostile
//! files of [`cppo_fuzz::files::crafted`] (huge declared shapes, an inflate bomb,
//! offsets past the end, duplicate names, a truncated archive, a huge safetensors
//! header length, wrong dtypes) and every finding a fuzzing run has written there (with
//! its config beside it as `NAME.cfg.json`). Each is run through `cppo eval` (with `{}`,
//! with a config that reads every optional array, and with its own config) and
//! `cppo inspect`, under a 128 MiB address-space limit and a 10 s hang guard, and each
//! run must keep the failure contract: exit code 0 or 2, never a panic, a signal or a
//! hang; on 2, exactly one `error: ...` line on stderr and no file left behind; on 0,
//! its output files, readable.
//!
//! The seeded run generates valid, mutated and hostile files for a few seconds and must
//! find nothing: it also checks that valid files are accepted and that files the docs
//! call errors are refused.

use std::fs;
use std::path::{Path, PathBuf};

use cppo_fuzz::{Opts, files};

fn cppo() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cppo"))
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/files")
}

#[test]
fn every_corpus_file_keeps_the_contract() {
    let inputs = files::corpus_inputs(&corpus()).expect("the corpus directory is readable");
    assert!(
        !inputs.is_empty(),
        "no batch file in {}",
        corpus().display()
    );
    let broken: Vec<String> = inputs
        .iter()
        .filter_map(|file| {
            files::replay(cppo(), file)
                .err()
                .map(|e| format!("{}:\n  {}", file.display(), e.replace('\n', "\n  ")))
        })
        .collect();
    assert!(
        broken.is_empty(),
        "{} of {} corpus files break the contract:\n{}",
        broken.len(),
        inputs.len(),
        broken.join("\n")
    );
}

#[test]
fn the_crafted_files_are_in_the_corpus() {
    for (name, bytes) in files::crafted().expect("the crafted files can be made") {
        let path = corpus().join(name);
        assert!(
            path.is_file(),
            "{} is missing: run the ignored test write_the_crafted_files",
            path.display()
        );
        assert!(bytes.len() <= 100_000, "{name} is {} bytes", bytes.len());
    }
}

/// The seed of the short run: its findings (on stderr, each naming its case) are
/// reproduced by `cargo run -p cppo-fuzz -- files --seed 20250601 --cppo
/// target/debug/cppo`, which writes them to `fuzz/corpus/files/`.
const SEED: u64 = 20_250_601;

#[test]
fn a_short_seeded_run_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        seconds: 5.0,
        seed: SEED,
        corpus: dir.path().join("findings"),
    };
    let report = files::run(&opts, cppo());
    assert!(report.cases > 0, "{report}");
    let found: Vec<String> = fs::read_dir(&opts.corpus)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        report.findings, 0,
        "{report}: {found:?} (see stderr; the run's seed is {SEED})"
    );
}

/// Writes the crafted files into `fuzz/corpus/files/`:
/// `cargo test -p cppo-cli --test fuzz_corpus -- --ignored write_the_crafted_files`.
#[test]
#[ignore = "writes into the source tree; run by hand when the crafted files change"]
fn write_the_crafted_files() {
    fs::create_dir_all(corpus()).unwrap();
    for (name, bytes) in files::crafted().expect("the crafted files can be made") {
        fs::write(corpus().join(name), bytes).unwrap();
    }
}
