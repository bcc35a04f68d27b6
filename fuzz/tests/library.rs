//! The library target's regression corpus, and a short seeded run.
//!
//! Every file in `fuzz/corpus/library/` is a case that once broke a promise (or a
//! hand-written one at an edge); each must now pass every check of
//! [`cppo_fuzz::library::check`].

use std::fs;
use std::path::PathBuf;

use cppo_fuzz::library::{Case, Outcome, check, sample_cases};
use cppo_fuzz::{Opts, library};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/library")
}

#[test]
fn every_corpus_case_keeps_every_promise() {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus())
        .expect("the corpus directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus holds no case");
    let broken: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let text = fs::read_to_string(p).expect("a readable case");
            let case: Case = serde_json::from_str(&text).expect("a well-formed case");
            check(&case).err().map(|e| format!("{}: {e}", p.display()))
        })
        .collect();
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The generator reaches every outcome, and mostly the `Ok` path, where the checks
/// that matter (finiteness, Seq = Rayon, chunks = whole) run.
#[test]
fn the_generator_reaches_every_outcome() {
    let (mut ok, mut error, mut config) = (0, 0, 0);
    let cases = sample_cases(7, 400);
    for case in &cases {
        match check(case) {
            Ok(Outcome::Ok) => ok += 1,
            Ok(Outcome::Error) => error += 1,
            Ok(Outcome::ConfigError) => config += 1,
            Err(e) => panic!(
                "a broken promise: {e}\n{}",
                serde_json::to_string(case).unwrap()
            ),
        }
    }
    println!("{ok} ok, {error} errors, {config} config errors");
    assert!(ok >= 120, "only {ok} of 400 cases reach Ok");
    assert!(
        error >= 20 && config >= 20,
        "{error} errors, {config} config errors"
    );
    // Chunked cases with tokens, f32 and f64, every layout.
    assert!(cases.iter().any(|c| c.f32) && cases.iter().any(|c| !c.f32));
    assert!(cases.iter().any(|c| c.bounds.len() > 3));
}

/// A short seeded run finds nothing (`.ci/run` runs a longer one).
#[test]
fn a_short_run_finds_nothing() {
    let dir = std::env::temp_dir().join(format!("cppo-fuzz-test-{}", std::process::id()));
    let report = library::run(&Opts {
        seconds: 3.0,
        seed: 1,
        corpus: dir.clone(),
    });
    let _ = fs::remove_dir_all(&dir);
    assert!(report.cases > 0);
    assert_eq!(report.findings, 0, "{report}");
}
