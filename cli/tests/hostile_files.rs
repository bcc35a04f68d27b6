//! Hostile batch files through the `cppo` binary: files whose headers declare far more
//! than they hold or than memory allows, offsets past the end, files of unknown size,
//! duplicate array names, and the `--max-memory` limit.
//!
//! Each case must fail by the failure contract (exit code 2, exactly one line on stderr
//! naming the array or the limit, no output file left behind), and quickly: the files
//! declare gigabytes but the tests write only kilobytes (or a sparse file), so a reader
//! that allocated or read what the header declares would fail the time bound (a hang
//! guard, generous on purpose) or run out of memory.

mod common;
use common::{Run, Scratch, cppo, run_command};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cppo::ndarray::{Array1, Array2};
use ndarray_npy::NpzWriter;

/// The hang guard: every hostile file must be refused well within this.
const QUICK: Duration = Duration::from_secs(10);

impl Scratch {
    /// `cppo eval` of `input` (default config), plus `extra` arguments.
    fn eval(&self, input: &Path, extra: &[&str]) -> Run {
        let cfg = self.input("cfg.json");
        fs::write(&cfg, "{}").unwrap();
        let out = self.outputs.join("out.npz");
        let stats = self.outputs.join("stats.json");
        let mut args: Vec<&OsStr> = vec![
            "eval".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
            "--stats".as_ref(),
            stats.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        cppo(&args)
    }

    /// `cppo inspect` of `input`, writing its JSON report, plus `extra` arguments.
    fn inspect(&self, input: &Path, extra: &[&str]) -> Run {
        let json = self.outputs.join("report.json");
        let mut args: Vec<&OsStr> = vec![
            "inspect".as_ref(),
            input.as_os_str(),
            "--json".as_ref(),
            json.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        cppo(&args)
    }

    /// `cppo eval` of `input` with its address space capped at 100 MB (`ulimit -v`),
    /// where a shell is at hand.
    fn eval_in_100_mb(&self, input: &Path) -> Option<Run> {
        if !Path::new("/bin/sh").exists() {
            return None;
        }
        let cfg = self.input("cfg.json");
        fs::write(&cfg, "{}").unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"ulimit -v 100000 && exec "$0" eval --config "$1" --input "$2" --output "$3""#)
            .arg(env!("CARGO_BIN_EXE_cppo"))
            .arg(&cfg)
            .arg(input)
            .arg(self.outputs.join("out.npz"));
        Some(run_command(cmd))
    }

    /// The failure contract, quickly.
    #[track_caller]
    fn assert_refused(&self, run: &Run, needles: &[&str]) {
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
        assert!(run.stderr.starts_with("error: "), "{run:?}");
        assert!(!run.stderr.contains("panicked"), "{run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
        for needle in needles {
            assert!(run.stderr.contains(needle), "no {needle:?} in {run:?}");
        }
        let left: Vec<_> = fs::read_dir(&self.outputs).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}; {run:?}");
        assert!(run.took < QUICK, "took {:?}: {run:?}", run.took);
    }
}

/// An `.npy` file, format 1.0: the header dict (padded as numpy pads it), then `data`.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

/// A small valid batch (2 rows x 6 slots, float64) as `.npy` entries.
fn small_entries() -> Vec<(String, Vec<u8>)> {
    let f64s = |n: usize, x: f64| -> Vec<u8> { (0..n).flat_map(|_| x.to_le_bytes()).collect() };
    vec![
        (
            "logp.npy".into(),
            npy(&dict("<f8", "(2, 6)"), &f64s(12, -1.0)),
        ),
        (
            "logp_old.npy".into(),
            npy(&dict("<f8", "(2, 6)"), &f64s(12, -1.1)),
        ),
        (
            "advantages.npy".into(),
            npy(&dict("<f8", "(2,)"), &f64s(2, 0.5)),
        ),
        ("mask.npy".into(), npy(&dict("|b1", "(2, 6)"), &[1u8; 12])),
    ]
}

/// An archive of these entries, each deflated.
fn zip_of(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        z.start_file(name.as_str(), options).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// A safetensors file: the 8-byte header length, the JSON header as given (padded to 8
/// bytes), then `data`.
fn safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    fs::write(path, out).unwrap();
}

/// The small batch's header entries and data, float64, the mask as U8.
fn small_safetensors() -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    let mut add = |name: &str, dtype: &str, shape: &str, bytes: Vec<u8>| {
        let start = data.len();
        data.extend(bytes);
        entries.push(format!(
            r#""{name}": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": [{start}, {}]}}"#,
            data.len()
        ));
    };
    let f64s = |n: usize, x: f64| -> Vec<u8> { (0..n).flat_map(|_| x.to_le_bytes()).collect() };
    add("logp", "F64", "[2, 6]", f64s(12, -1.0));
    add("logp_old", "F64", "[2, 6]", f64s(12, -1.1));
    add("advantages", "F64", "[2]", f64s(2, 0.5));
    add("mask", "U8", "[2, 6]", vec![1; 12]);
    (format!("{{{}}}", entries.join(", ")), data)
}

/// The small batch as an npz written by ndarray-npy.
fn small_npz(path: &Path) {
    let mut npz = NpzWriter::new(File::create(path).unwrap());
    npz.add_array("logp", &Array2::<f64>::from_elem((2, 6), -1.0))
        .unwrap();
    npz.add_array("logp_old", &Array2::<f64>::from_elem((2, 6), -1.1))
        .unwrap();
    npz.add_array("advantages", &Array1::<f64>::from_elem(2, 0.5))
        .unwrap();
    npz.add_array("mask", &Array2::<bool>::from_elem((2, 6), true))
        .unwrap();
    npz.finish().unwrap();
}

#[test]
fn the_small_batches_are_valid() {
    let s = Scratch::new();
    let npz = s.input("small.npz");
    small_npz(&npz);
    let run = s.eval(&npz, &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let st = s.input("small.safetensors");
    let (header, data) = small_safetensors();
    safetensors(&st, &header, &data);
    let run = s.inspect(&st, &["--max-memory", "1K"]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// `logp.npy` declares (50000, 50000) float32, 10 GB, in a deflated entry of a few
/// kilobytes: refused from its header by the memory limit, before any data is read.
#[test]
fn npz_declaring_10_gb() {
    let s = Scratch::new();
    let path = s.input("huge.npz");
    let mut entries = small_entries();
    entries[0].1 = npy(&dict("<f4", "(50000, 50000)"), &vec![0u8; 1 << 20]);
    zip_of(&path, &entries);
    assert!(fs::metadata(&path).unwrap().len() < 100_000);
    let want = [
        "huge.npz",
        "array logp",
        "[50000, 50000]",
        "10000000000 bytes",
        "--max-memory limit of 8G",
    ];
    s.assert_refused(&s.eval(&path, &[]), &want);
    s.assert_refused(&s.inspect(&path, &[]), &want);

    // Under a limit of 20G, the entry's size gives it away, still before any
    // allocation.
    s.assert_refused(
        &s.eval(&path, &["--max-memory", "20G"]),
        &["array logp declares shape [50000, 50000]", "holds only"],
    );

    // With the address space capped at 100 MB, the refusal is the same: nothing of
    // that size is allocated, and the whole run fits in 100 MB.
    if let Some(run) = s.eval_in_100_mb(&path) {
        s.assert_refused(&run, &["array logp", "--max-memory"]);
    }
}

/// Another array whose header declares a huge shape: refused by its shape against
/// logp's (B, L), before its data is read.
#[test]
fn npz_array_not_of_the_batch_shape() {
    let s = Scratch::new();
    let path = s.input("mask.npz");
    let mut entries = small_entries();
    entries[3].1 = npy(&dict("|b1", "(50000, 50000)"), &[1u8; 4096]);
    zip_of(&path, &entries);
    s.assert_refused(
        &s.eval(&path, &["--max-memory", "1T"]),
        &["mask has shape [50000, 50000], expected (2, 6)"],
    );
}

/// A 10 GB safetensors file (sparse: the test writes only its header) whose logp is
/// (50000, 50000) float32, offsets and all consistent: refused by the memory limit.
#[test]
fn safetensors_declaring_10_gb() {
    let s = Scratch::new();
    let path = s.input("huge.safetensors");
    let bytes: u64 = 50_000 * 50_000 * 4;
    safetensors(
        &path,
        &format!(
            r#"{{"__metadata__": {{"format": "pt"}}, "logp": {{"dtype": "F32", "shape": [50000, 50000], "data_offsets": [0, {bytes}]}}}}"#
        ),
        &[],
    );
    let file = File::options().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len + bytes).unwrap();
    drop(file);
    let want = [
        "huge.safetensors",
        "array logp",
        "10000000000 bytes",
        "--max-memory",
    ];
    s.assert_refused(&s.eval(&path, &[]), &want);
    s.assert_refused(&s.inspect(&path, &[]), &want);
    if let Some(run) = s.eval_in_100_mb(&path) {
        s.assert_refused(&run, &want);
    }
}

/// A huge shape declared in a small file: its offsets do not hold it.
#[test]
fn safetensors_shape_larger_than_its_offsets() {
    let s = Scratch::new();
    let path = s.input("liar.safetensors");
    safetensors(
        &path,
        r#"{"logp": {"dtype": "F32", "shape": [50000, 50000], "data_offsets": [0, 64]}}"#,
        &[0; 64],
    );
    s.assert_refused(
        &s.eval(&path, &[]),
        &["array logp declares shape [50000, 50000]", "hold 64 bytes"],
    );
}

#[test]
fn safetensors_offsets_past_the_end() {
    let s = Scratch::new();
    let (header, data) = small_safetensors();
    let path = s.input("short.safetensors");
    safetensors(&path, &header, &data[..data.len() - 8]);
    // The mask's range is the last: it ends past the file's end.
    s.assert_refused(
        &s.eval(&path, &[]),
        &["array mask", "data_offsets [208, 220]", "past the end"],
    );

    let path = s.input("far.safetensors");
    safetensors(
        &path,
        r#"{"logp": {"dtype": "F32", "shape": [2500000000], "data_offsets": [0, 10000000000]}}"#,
        &[0; 64],
    );
    s.assert_refused(&s.inspect(&path, &[]), &["array logp", "past the end"]);
}

#[test]
fn safetensors_header_length_beyond_the_file_or_the_limit() {
    let s = Scratch::new();
    for (len, what) in [(1u64 << 40, "100000000 read"), (4096, "-byte file holds")] {
        let path = s.input("len.safetensors");
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(b"{}      ");
        fs::write(&path, bytes).unwrap();
        s.assert_refused(&s.eval(&path, &[]), &["header declares a length", what]);
    }
}

/// A file of unknown size (a symlink to /dev/zero) is refused at once, not read.
#[cfg(unix)]
#[test]
fn dev_zero_through_a_symlink() {
    if !Path::new("/dev/zero").exists() {
        return;
    }
    let s = Scratch::new();
    for name in ["zero.safetensors", "zero.npz"] {
        let link = s.input(name);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        s.assert_refused(&s.eval(&link, &[]), &[name, "not a regular file"]);
        s.assert_refused(&s.inspect(&link, &[]), &[name, "not a regular file"]);
    }
}

#[test]
fn safetensors_duplicate_names() {
    let s = Scratch::new();
    let (header, data) = small_safetensors();
    // A second logp, pointing at the first's data.
    let header = header.replacen(
        '{',
        r#"{"logp": {"dtype": "F64", "shape": [2, 6], "data_offsets": [0, 96]}, "#,
        1,
    );
    let path = s.input("twice.safetensors");
    safetensors(&path, &header, &data);
    let want = ["twice.safetensors", "array logp appears twice"];
    s.assert_refused(&s.eval(&path, &[]), &want);
    s.assert_refused(&s.inspect(&path, &[]), &want);
}

#[test]
fn npz_duplicate_names() {
    let s = Scratch::new();
    // Two entries named mask.npy: written as mask.npy and masq.npy (the zip crate
    // refuses duplicates), then renamed byte for byte in the local and central headers.
    let mut entries = small_entries();
    entries.push(("masq.npy".into(), npy(&dict("|b1", "(2, 6)"), &[0u8; 12])));
    let path = s.input("twice.npz");
    zip_of(&path, &entries);
    let bytes = fs::read(&path).unwrap();
    let mut renamed = bytes.clone();
    let mut hits = 0;
    for i in 0..bytes.len() - 8 {
        if &bytes[i..i + 8] == b"masq.npy" {
            renamed[i..i + 8].copy_from_slice(b"mask.npy");
            hits += 1;
        }
    }
    assert_eq!(hits, 2, "the name is in the local and the central header");
    fs::write(&path, renamed).unwrap();
    let want = ["twice.npz", "array mask appears twice"];
    s.assert_refused(&s.eval(&path, &[]), &want);
    s.assert_refused(&s.inspect(&path, &[]), &want);

    // logp and logp.npy are both the array logp.
    let mut entries = small_entries();
    entries.push(("logp".into(), npy(&dict("<f8", "(2, 6)"), &[0u8; 96])));
    let path = s.input("both.npz");
    zip_of(&path, &entries);
    s.assert_refused(&s.eval(&path, &[]), &["array logp appears twice"]);
}

/// A normal small batch over a tiny --max-memory: the error names the limit and the
/// option.
#[test]
fn max_memory_smaller_than_a_small_batch() {
    let s = Scratch::new();
    let npz = s.input("small.npz");
    small_npz(&npz);
    // logp, logp_old 96 bytes each, advantages 16, mask 12: 220 bytes in all.
    let want = ["array mask", "220 bytes", "--max-memory limit of 210 bytes"];
    s.assert_refused(&s.eval(&npz, &["--max-memory", "210"]), &want);
    s.assert_refused(&s.inspect(&npz, &["--max-memory", "210"]), &want);
    let run = s.eval(&npz, &["--max-memory", "220"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    fs::remove_dir_all(&s.outputs).unwrap();
    fs::create_dir(&s.outputs).unwrap();

    let st = s.input("small.safetensors");
    let (header, data) = small_safetensors();
    safetensors(&st, &header, &data);
    s.assert_refused(
        &s.inspect(&st, &["--max-memory", "100"]),
        &["array logp_old", "--max-memory limit of 100 bytes"],
    );

    // A directory of steps: the limit applies to each file.
    let dir = s.input("steps");
    fs::create_dir(&dir).unwrap();
    small_npz(&dir.join("step_000001.npz"));
    s.assert_refused(
        &s.inspect(&dir, &["--max-memory", "0"]),
        &[
            "step_000001.npz",
            "array logp",
            "--max-memory limit of 0 bytes",
        ],
    );
}

#[test]
fn max_memory_values() {
    let s = Scratch::new();
    let npz = s.input("small.npz");
    small_npz(&npz);
    for ok in [
        "1K", "1k", "1KiB", "1KB", "512M", "8G", "1T", "220", " 4096 ",
    ] {
        let run = s.eval(&npz, &["--max-memory", ok]);
        assert_eq!(run.code, Some(0), "{ok}: {run:?}");
    }
    fs::remove_dir_all(&s.outputs).unwrap();
    fs::create_dir(&s.outputs).unwrap();
    for bad in ["", "G", "8X", "1.5G", "-1", "99999999999T"] {
        let run = s.eval(&npz, &[&format!("--max-memory={bad}")]);
        s.assert_refused(&run, &["--max-memory"]);
    }
    let help = cppo(&["eval", "--help"]);
    assert!(help.stdout.contains("--max-memory"), "{help:?}");
    assert!(help.stdout.contains("[default: 8G]"), "{help:?}");
}
