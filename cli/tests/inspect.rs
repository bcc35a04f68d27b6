//! End-to-end tests of `cppo inspect` (the plot tests need the `plots` feature, on by default), run
//! as a user runs it: batch files written here (npz with ndarray-npy, safetensors byte
//! by byte), the binary run as a child process.
//!
//! - The report's numbers are the library's: each rule's diagnostics in `--json` equal
//!   `cppo::evaluate`'s on the same batch and config, and the Markdown and terminal
//!   tables show them; with 10 position buckets the per-position masked fractions equal
//!   the library's deciles. Also for the demo batch, safetensors input, config files and
//!   a directory of steps.
//! - Each plot file is produced, non-empty and well-formed: SVG parses as XML with the
//!   requested size, PNG has its signature, the requested size and is not blank.
//! - Bad input behaves as in `cppo eval`: exit code 2, one line on stderr, no output
//!   file (nor temporary file) left behind; a failed write exits 1 and removes the
//!   outputs already staged.

mod common;
use common::{Run, Scratch, args, assert_ok, inspect};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array2, Array3};
use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Config, Diagnostics, Float, Par};
use ndarray_npy::{NpzWriter, WritableElement};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Running the binary (`inspect`, `args!` and `assert_ok` are in `common`)
// ---------------------------------------------------------------------------------------

impl Scratch {
    fn out(&self, name: &str) -> PathBuf {
        self.outputs.join(name)
    }
    fn output_files(&self) -> Vec<String> {
        fs::read_dir(&self.outputs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The failure contract: exit code 2, one line on stderr starting `error: ` and
    /// containing every needle, nothing in the output directory.
    #[track_caller]
    fn assert_bad_input(&self, run: &Run, needles: &[&str]) {
        self.assert_fails(run, 2, needles);
    }

    #[track_caller]
    fn assert_fails(&self, run: &Run, code: i32, needles: &[&str]) {
        assert_eq!(run.code, Some(code), "{run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
        assert!(run.stderr.starts_with("error: "), "{run:?}");
        assert!(run.stderr.ends_with('\n'), "{run:?}");
        assert!(!run.stderr.contains("panicked"), "{run:?}");
        for needle in needles {
            assert!(run.stderr.contains(needle), "no {needle:?} in {run:?}");
        }
        assert!(run.stdout.is_empty(), "{run:?}");
        let left = self.output_files();
        assert!(left.is_empty(), "left behind: {left:?}; {run:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------

/// A realistic batch (hostile padding, holes, ragged rows).
fn synth<F: Float>(seed: u64, rows: usize, len: usize, drift: f64) -> SyntheticBatch<F> {
    SyntheticBatch::generate(&SynthSpec {
        rows,
        len,
        seed,
        drift,
        ..SynthSpec::default()
    })
}

fn write_npz<F: Float + WritableElement>(path: &Path, b: &SyntheticBatch<F>) {
    let mut npz = NpzWriter::new(File::create(path).unwrap());
    npz.add_array("logp", &b.logp).unwrap();
    npz.add_array("logp_old", &b.logp_old).unwrap();
    npz.add_array("advantages", &b.advantages).unwrap();
    npz.add_array("mask", &b.mask).unwrap();
    npz.finish().unwrap();
}

/// One tensor of a safetensors file: name, dtype, shape, little-endian bytes.
type Tensor = (&'static str, &'static str, Vec<usize>, Vec<u8>);

/// Writes a safetensors file by its definition: an 8-byte little-endian header length,
/// the JSON header (padded with spaces to 8 bytes), then the data.
fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.3);
    }
    fs::write(path, out).unwrap();
}

fn f64_bytes<'a>(it: impl IntoIterator<Item = &'a f64>) -> Vec<u8> {
    it.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes<'a>(it: impl IntoIterator<Item = &'a f32>) -> Vec<u8> {
    it.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The batch as safetensors, float64, the mask as int64.
fn safetensors_f64(b: &SyntheticBatch<f64>) -> Vec<Tensor> {
    let (rows, len) = b.logp.dim();
    let mask: Vec<u8> = b
        .mask
        .iter()
        .flat_map(|&m| i64::from(m).to_le_bytes())
        .collect();
    vec![
        ("logp", "F64", vec![rows, len], f64_bytes(&b.logp)),
        ("logp_old", "F64", vec![rows, len], f64_bytes(&b.logp_old)),
        ("advantages", "F64", vec![rows], f64_bytes(&b.advantages)),
        ("mask", "I64", vec![rows, len], mask),
    ]
}

/// The library's diagnostics of a batch under a config.
fn library<F: Float>(b: &SyntheticBatch<F>, cfg: &Config) -> Diagnostics {
    cppo::evaluate(cfg, &b.batch().unwrap(), Par::Seq)
        .unwrap()
        .diagnostics
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Two JSON values equal: numbers to a few ulps (JSON text round trip), the rest exactly.
#[track_caller]
fn assert_json_eq(got: &Value, want: &Value, at: &str) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                g == w || (g - w).abs() <= 1e-14 * w.abs(),
                "{at}: {g} vs {w}"
            );
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{at}: length");
            for (k, (g, w)) in g.iter().zip(w).enumerate() {
                assert_json_eq(g, w, &format!("{at}[{k}]"));
            }
        }
        (Value::Object(g), Value::Object(w)) => {
            let mut gk: Vec<_> = g.keys().collect();
            let mut wk: Vec<_> = w.keys().collect();
            gk.sort();
            wk.sort();
            assert_eq!(gk, wk, "{at}: keys");
            for (k, w) in w {
                assert_json_eq(&g[k], w, &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

/// Every rule of a `--json` report against the library on `b`; returns the rules.
#[track_caller]
fn assert_rules_are_the_library_s<F: Float>(report: &Value, b: &SyntheticBatch<F>) -> Vec<Value> {
    let rules = report["rules"].as_array().unwrap().clone();
    for r in &rules {
        let cfg: Config = serde_json::from_value(r["config"].clone()).unwrap();
        let want = serde_json::to_value(library(b, &cfg)).unwrap();
        let name = r["name"].as_str().unwrap();
        assert_json_eq(&r["diagnostics"], &want, name);
        // The JSON is exactly a Diagnostics.
        let _: Diagnostics = serde_json::from_value(r["diagnostics"].clone()).unwrap();
    }
    rules
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

const COMPARE: [&str; 8] = [
    "GRPO ratio clip",
    "DPPO",
    "CPPO budget-only",
    "CPPO weight-only",
    "CPPO soft gate",
    "CPPO shuffled weights",
    "CPPO fixed budget",
    "CPPO (full)",
];

// ---------------------------------------------------------------------------------------
// The report's numbers are the library's
// ---------------------------------------------------------------------------------------

#[test]
fn report_numbers_are_the_library_s() {
    let s = Scratch::new();
    let b = synth::<f64>(7, 24, 160, 1.5);
    let input = s.input("batch.npz");
    write_npz(&input, &b);
    let (json, md) = (s.out("report.json"), s.out("report.md"));
    let run = inspect(args![
        input,
        "--json",
        json,
        "--report",
        md,
        "--buckets",
        "10"
    ]);
    assert_ok(&run);
    let report = read_json(&json);
    let rules = assert_rules_are_the_library_s(&report, &b);
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, COMPARE, "the built-in set, by default");

    // The built-in set's configs.
    let cfg = |k: usize| -> Value { rules[k]["config"]["rule"].clone() };
    assert_eq!(cfg(0)["kind"], "ratio");
    assert_eq!(cfg(1), serde_json::json!({"kind": "dppo", "delta": 0.15}));
    assert_eq!(
        (cfg(2)["kind"].as_str(), cfg(2)["w_min"].as_f64()),
        (Some("cppo"), Some(1.0))
    );
    assert_eq!(cfg(2)["delta_b"], 0.02);
    assert_eq!(
        (cfg(3)["w_min"].as_f64(), &cfg(3)["delta_b"]),
        (Some(0.8), &Value::Null)
    );
    assert_eq!(
        (cfg(4)["kind"].as_str(), cfg(4)["gate"].as_str()),
        (Some("cppo_soft"), Some("inverse"))
    );
    assert_eq!(cfg(5)["shuffle_seed"], 0);
    // The fixed budget beside the paper's calibrated one.
    assert_eq!(cfg(6)["calibration"], Value::Null);
    assert_eq!(
        cfg(7)["calibration"],
        serde_json::json!({"quantile": 0.9, "scale": 1.0, "ceiling": 2.0})
    );
    assert_eq!(
        (
            cfg(7)["w_min"].as_f64(),
            cfg(7)["delta_b"].as_f64(),
            cfg(7)["delta"].as_f64()
        ),
        (Some(0.8), Some(0.02), Some(0.15))
    );
    for r in &rules {
        assert_eq!(r["config"]["divergence"], "binary_tv");
    }

    // Ten buckets are the library's deciles.
    for r in &rules {
        let by_pos = r["by_position"]["masked_frac"].as_array().unwrap();
        let deciles = r["diagnostics"]["masked_frac_by_decile"]
            .as_array()
            .unwrap();
        assert_json_eq(
            &Value::Array(by_pos.clone()),
            &Value::Array(deciles.clone()),
            "deciles",
        );
        let tokens: u64 = r["by_position"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .sum();
        assert_eq!(
            tokens,
            r["diagnostics"]["response_tokens"].as_u64().unwrap()
        );
    }
    // The divergence's mean and max are the library's too; quantiles are ordered.
    let d = &report["divergences"][0];
    assert_eq!(d["divergence"], "binary_tv");
    let d0 = &rules[0]["diagnostics"];
    assert_json_eq(&d["mean"], &d0["divergence_mean"], "divergence mean");
    assert_json_eq(&d["max"], &d0["divergence_max"], "divergence max");
    let q = |k: &str| d[k].as_f64().unwrap();
    assert!(0.0 <= q("median") && q("median") <= q("p90") && q("p90") <= q("p99"));
    assert!(q("p99") <= q("max"));

    // The Markdown and the terminal show the same numbers.
    let markdown = fs::read_to_string(&md).unwrap();
    for r in &rules {
        let g: Diagnostics = serde_json::from_value(r["diagnostics"].clone()).unwrap();
        let name = r["name"].as_str().unwrap();
        let row = format!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            pct(g.masked_frac),
            pct(g.masked_frac_token_threshold),
            pct(g.masked_frac_prefix_budget),
            pct(g.bypass_frac),
            pct(g.masked_frac_pos_adv),
            pct(g.masked_frac_neg_adv),
        );
        assert!(markdown.contains(&row), "no {row:?} in\n{markdown}");
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(name) && l.contains('%'))
            .unwrap_or_else(|| panic!("no line for {name} in\n{}", run.stdout));
        let cells: Vec<&str> = line[name.len()..].split_whitespace().collect();
        assert_eq!(
            cells[..3],
            [
                pct(g.masked_frac),
                pct(g.masked_frac_token_threshold),
                pct(g.masked_frac_prefix_budget)
            ]
        );
    }
    // The position table: first and last decile of full CPPO.
    let full: Diagnostics = serde_json::from_value(rules[4]["diagnostics"].clone()).unwrap();
    let first = markdown
        .lines()
        .find(|l| l.starts_with("| 0–10% |"))
        .unwrap();
    assert!(
        first.ends_with(&format!(" {} |", pct(full.masked_frac_by_decile[0]))),
        "{first}"
    );
    let last = markdown
        .lines()
        .find(|l| l.starts_with("| 90–100% |"))
        .unwrap();
    assert!(
        last.ends_with(&format!(" {} |", pct(full.masked_frac_by_decile[9]))),
        "{last}"
    );
    // Stdout: the report, then the files written.
    assert!(run.stdout.ends_with(&format!(
        "wrote {}\nwrote {}\n",
        md.display(),
        json.display()
    )));
}

#[test]
fn demo_is_the_quickstart_batch() {
    let s = Scratch::new();
    let json = s.out("demo.json");
    let run = inspect(args!["--demo", "--json", json]);
    assert_ok(&run);
    assert!(
        run.stdout.contains("29491 response tokens"),
        "{}",
        run.stdout
    );
    let report = read_json(&json);
    let b = SyntheticBatch::<f32>::generate(&SynthSpec {
        rows: 64,
        len: 512,
        ..SynthSpec::default()
    });
    assert_eq!(report["batch"]["rows"], 64);
    assert_eq!(report["batch"]["len"], 512);
    assert_eq!(report["batch"]["dtype"], "float32");
    assert_rules_are_the_library_s(&report, &b);
    // CPPO masks more than DPPO early in the response (the quickstart's point).
    let rules = report["rules"].as_array().unwrap();
    let first = |k: usize| {
        rules[k]["diagnostics"]["masked_frac_by_decile"][0]
            .as_f64()
            .unwrap()
    };
    assert!(first(4) > first(1));
}

#[test]
fn safetensors_input_gives_the_npz_numbers() {
    let s = Scratch::new();
    let b = synth::<f64>(3, 10, 64, 1.0);
    let npz = s.input("b.npz");
    write_npz(&npz, &b);
    let st = s.input("b.safetensors");
    write_safetensors(&st, &safetensors_f64(&b));
    let (a, c) = (s.out("a.json"), s.out("c.json"));
    assert_ok(&inspect(args![npz, "--json", a]));
    assert_ok(&inspect(args![st, "--json", c]));
    let (a, c) = (read_json(&a), read_json(&c));
    assert_rules_are_the_library_s(&c, &b);
    assert_json_eq(&c["rules"], &a["rules"], "rules");
    assert_json_eq(&c["divergences"], &a["divergences"], "divergences");

    // float32 with a bool mask and per-token advantages.
    let b = synth::<f32>(4, 6, 40, 1.0);
    let (rows, len) = b.logp.dim();
    let adv = Array2::from_shape_fn((rows, len), |(i, _)| b.advantages[i]);
    let st = s.input("f32.safetensors");
    write_safetensors(
        &st,
        &[
            ("advantages", "F32", vec![rows, len], f32_bytes(&adv)),
            ("logp", "F32", vec![rows, len], f32_bytes(&b.logp)),
            ("logp_old", "F32", vec![rows, len], f32_bytes(&b.logp_old)),
            (
                "mask",
                "BOOL",
                vec![rows, len],
                b.mask.iter().map(|&m| u8::from(m)).collect(),
            ),
            ("unused", "BF16", vec![2], vec![0; 4]),
        ],
    );
    let json = s.out("f32.json");
    let run = inspect(args![st, "--json", json]);
    assert_ok(&run);
    assert!(
        run.stdout.contains("advantages per token"),
        "{}",
        run.stdout
    );
    assert_rules_are_the_library_s(&read_json(&json), &b);
}

#[test]
fn configs_and_the_builtin_set() {
    let s = Scratch::new();
    let b = synth::<f64>(11, 8, 96, 1.2);
    let input = s.input("b.npz");
    write_npz(&input, &b);
    let kl = s.input("kl_cppo.json");
    fs::write(
        &kl,
        r#"{"divergence": "binary_kl", "rule": {"kind": "cppo", "delta": 0.05, "delta_b": 0.01},
            "objective": {"kind": "ppo_clip"}, "aggregation": "seq-mean-token-mean"}"#,
    )
    .unwrap();
    let trm = s.input("trm.json");
    fs::write(&trm, r#"{"rule": {"kind": "trm_max"}}"#).unwrap();

    // Configs alone: named after their files, in order.
    let json = s.out("r.json");
    assert_ok(&inspect(args![
        input, "--config", kl, "--config", trm, "--json", json
    ]));
    let report = read_json(&json);
    let rules = assert_rules_are_the_library_s(&report, &b);
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["kl_cppo", "trm"]);
    // Both divergences are reported; the loss is the config's objective's.
    let divs: Vec<&str> = report["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["divergence"].as_str().unwrap())
        .collect();
    assert_eq!(divs, ["binary_kl", "binary_tv"]);
    assert!(rules[0]["diagnostics"]["clip_frac"].is_number());

    // With --compare, the built-in set follows, on --divergence.
    let json = s.out("c.json");
    assert_ok(&inspect(args![
        input,
        "--config",
        trm,
        "--compare",
        "--divergence",
        "binary_kl",
        "--json",
        json
    ]));
    let report = read_json(&json);
    let rules = assert_rules_are_the_library_s(&report, &b);
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names[0], "trm");
    assert_eq!(names[1..], COMPARE);
    assert_eq!(rules[0]["config"]["divergence"], "binary_tv");
    assert!(
        rules[1..]
            .iter()
            .all(|r| r["config"]["divergence"] == "binary_kl")
    );

    // The same file twice gets two names.
    let json = s.out("d.json");
    assert_ok(&inspect(args![
        input, "--config", trm, "--config", trm, "--json", json
    ]));
    let names: Vec<String> = read_json(&json)["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["trm", "trm (2)"]);
}

#[test]
fn strip_rows_and_rule() {
    let s = Scratch::new();
    let b = synth::<f64>(5, 12, 80, 1.5);
    let input = s.input("b.npz");
    write_npz(&input, &b);
    let json = s.out("r.json");
    assert_ok(&inspect(args![input, "--json", json]));
    let strip = &read_json(&json)["strip"];
    assert_eq!(strip["rule"], 7, "full CPPO by default");
    assert_eq!(strip["rows"].as_array().unwrap().len(), 6);
    let advs = strip["advantages"].as_array().unwrap();
    for (row, adv) in strip["rows"].as_array().unwrap().iter().zip(advs) {
        let i = row.as_u64().unwrap() as usize;
        assert_eq!(adv.as_f64().unwrap(), b.advantages[i]);
    }
    assert_ok(&inspect(args![
        input,
        "--json",
        json,
        "--strip-rows",
        "3,0,11",
        "--strip-rule",
        "DPPO"
    ]));
    let strip = &read_json(&json)["strip"];
    assert_eq!(strip["rule"], 1);
    assert_eq!(strip["rows"], serde_json::json!([3, 0, 11]));
}

// ---------------------------------------------------------------------------------------
// A directory of steps
// ---------------------------------------------------------------------------------------

#[test]
fn a_directory_of_steps() {
    let s = Scratch::new();
    let dir = s.input("run");
    fs::create_dir(&dir).unwrap();
    let batches: Vec<(u64, SyntheticBatch<f64>)> = [(120u64, 0.4), (7, 0.2), (300, 0.8), (45, 0.3)]
        .into_iter()
        .enumerate()
        .map(|(k, (step, drift))| (step, synth::<f64>(k as u64, 8, 64, drift)))
        .collect();
    for (step, b) in &batches {
        if *step == 45 {
            write_safetensors(
                &dir.join(format!("step_{step:06}.safetensors")),
                &safetensors_f64(b),
            );
        } else {
            write_npz(&dir.join(format!("step_{step:06}.npz")), b);
        }
    }
    // Ignored: other names, other extensions.
    fs::write(dir.join("notes.txt"), "x").unwrap();
    fs::write(dir.join("step_final.npz"), "x").unwrap();
    fs::write(dir.join("step_12.json"), "x").unwrap();

    let (json, md) = (s.out("steps.json"), s.out("steps.md"));
    let run = inspect(args![dir, "--json", json, "--report", md]);
    assert_ok(&run);
    let report = read_json(&json);
    let steps = report["steps"].as_array().unwrap();
    let numbers: Vec<u64> = steps
        .iter()
        .map(|st| st["step"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [7, 45, 120, 300]);
    let rules = report["rules"].as_array().unwrap();
    for st in steps {
        let n = st["step"].as_u64().unwrap();
        let b = &batches.iter().find(|(k, _)| *k == n).unwrap().1;
        for (r, d) in rules.iter().zip(st["diagnostics"].as_array().unwrap()) {
            let cfg: Config = serde_json::from_value(r["config"].clone()).unwrap();
            let want = serde_json::to_value(library(b, &cfg)).unwrap();
            assert_json_eq(d, &want, &format!("step {n} {}", r["name"]));
        }
    }
    // The Markdown lists every step with the full CPPO's masked (budget) fractions.
    let markdown = fs::read_to_string(&md).unwrap();
    for st in steps {
        let d: Diagnostics = serde_json::from_value(st["diagnostics"][4].clone()).unwrap();
        let cell = format!(
            "{} ({}) |",
            pct(d.masked_frac),
            pct(d.masked_frac_prefix_budget)
        );
        let line = markdown
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", st["step"])))
            .unwrap();
        assert!(line.ends_with(&cell), "{line} vs {cell}");
    }
    assert!(run.stdout.contains("4 steps in"), "{}", run.stdout);
}

// ---------------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------------

/// A well-formed SVG of the given size: parses as XML, `<svg>` root, some text.
#[cfg(feature = "plots")]
#[track_caller]
fn assert_svg(path: &Path, size: (u32, u32)) {
    let text = fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{}", path.display());
    assert_eq!(root.attribute("width"), Some(size.0.to_string().as_str()));
    assert_eq!(root.attribute("height"), Some(size.1.to_string().as_str()));
    // Text is drawn as glyph outlines: no <text> elements, no font named, and every
    // label a group of <use>s of glyphs the file defines.
    assert!(
        !text.contains("<text") && !text.contains("font-family"),
        "{}",
        path.display()
    );
    let glyphs: std::collections::HashSet<&str> = root
        .descendants()
        .filter(|n| n.has_tag_name("path"))
        .filter_map(|n| n.attribute("id"))
        .collect();
    let labels = root
        .descendants()
        .filter(|n| n.attribute("aria-label").is_some())
        .filter(|g| {
            g.children().filter(|u| u.has_tag_name("use")).all(|u| {
                let href = u.attribute("href").unwrap_or("");
                glyphs.contains(href.trim_start_matches('#'))
            })
        })
        .count();
    assert!(labels > 10, "{}: {labels} labels", path.display());
    let shapes = root
        .descendants()
        .filter(|n| n.has_tag_name("polyline") || n.has_tag_name("rect") || n.has_tag_name("line"))
        .count();
    assert!(shapes > 10, "{}: {shapes} shapes", path.display());
}

/// A well-formed PNG of the given size that is not blank.
#[cfg(feature = "plots")]
#[track_caller]
fn assert_png(path: &Path, size: (u32, u32)) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: signature",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), size, "{}", path.display());
    // Decodes whole, and shows more than a background.
    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    let colours: std::collections::HashSet<&[u8]> = px.chunks_exact(3).collect();
    let inked = px.chunks_exact(3).filter(|p| p != &[255, 255, 255]).count();
    assert!(
        colours.len() > 20,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
    let share = inked as f64 / f64::from(w * h);
    assert!(
        (0.02..0.8).contains(&share),
        "{}: {share} inked",
        path.display()
    );
}

#[cfg(feature = "plots")]
#[test]
fn plots_of_a_batch() {
    let s = Scratch::new();
    let (svg, png, dir, md) = (
        s.out("demo.svg"),
        s.out("demo.png"),
        s.out("plots"),
        s.out("r.md"),
    );
    let run = inspect(args![
        "--demo",
        "--plot",
        svg,
        "--plot",
        png,
        "--plot-dir",
        dir,
        "--report",
        md
    ]);
    assert_ok(&run);
    assert_svg(&svg, (1600, 1200));
    assert_png(&png, (1600, 1200));
    for name in ["divergence", "thresholds", "masked", "strip"] {
        assert_svg(&dir.join(format!("{name}.svg")), (1200, 750));
        assert_png(&dir.join(format!("{name}.png")), (1200, 750));
    }
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "{files:?}");
    // The Markdown links the plots relative to itself.
    let markdown = fs::read_to_string(&md).unwrap();
    assert!(markdown.contains("](demo.svg)"), "{markdown}");
    assert!(markdown.contains("](plots/strip.png)"), "{markdown}");
    // Titles name the position buckets.
    let text = fs::read_to_string(&svg).unwrap();
    assert!(text.contains("20 buckets"));
    assert!(text.contains("Masked fraction by position, one line per rule"));

    // --size, a file input, other buckets.
    let b = synth::<f32>(2, 9, 50, 1.0);
    let input = s.input("b.npz");
    write_npz(&input, &b);
    let (svg, png) = (s.out("small.svg"), s.out("small.PNG"));
    let run = inspect(args![
        input,
        "--plot",
        svg,
        "--plot",
        png,
        "--size",
        "900x640",
        "--buckets",
        "7"
    ]);
    assert_ok(&run);
    assert_svg(&svg, (900, 640));
    assert_png(&png, (900, 640));
    assert!(fs::read_to_string(&svg).unwrap().contains("7 buckets"));
}

#[cfg(feature = "plots")]
#[test]
fn plots_of_steps_and_of_an_empty_batch() {
    let s = Scratch::new();
    let dir = s.input("run");
    fs::create_dir(&dir).unwrap();
    for step in 0..3u64 {
        write_npz(
            &dir.join(format!("step_{step}.npz")),
            &synth::<f32>(step, 6, 48, 0.3 + 0.3 * step as f64),
        );
    }
    let (png, plots) = (s.out("steps.png"), s.out("p"));
    assert_ok(&inspect(args![dir, "--plot", png, "--plot-dir", plots]));
    assert_png(&png, (1400, 1000));
    assert_svg(&plots.join("steps.svg"), (1400, 1000));
    assert_png(&plots.join("steps.png"), (1400, 1000));

    // No response token at all: plots still draw, the numbers are zeros.
    let mut b = synth::<f64>(1, 3, 16, 1.0);
    b.mask.fill(false);
    let input = s.input("empty.npz");
    write_npz(&input, &b);
    let (svg, json) = (s.out("empty.svg"), s.out("empty.json"));
    assert_ok(&inspect(args![input, "--plot", svg, "--json", json]));
    assert_svg(&svg, (1600, 1200));
    assert_eq!(
        read_json(&json)["rules"][0]["diagnostics"]["response_tokens"],
        0
    );
}

#[cfg(not(feature = "plots"))]
#[test]
fn plots_need_the_feature() {
    let s = Scratch::new();
    let svg = s.out("x.svg");
    let run = inspect(args!["--demo", "--plot", svg]);
    s.assert_bad_input(&run, &["--features plots"]);
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// Outputs of every kind, so that "nothing left behind" covers them all.
fn all_outputs(s: &Scratch) -> Vec<PathBuf> {
    let mut v = vec![
        "--report".into(),
        s.out("r.md"),
        "--json".into(),
        s.out("r.json"),
    ];
    if cfg!(feature = "plots") {
        v.extend([
            "--plot".into(),
            s.out("p.svg"),
            "--plot-dir".into(),
            s.out("plots"),
        ]);
    }
    v
}

fn inspect_to_all(s: &Scratch, args: &[&OsStr]) -> Run {
    let outs = all_outputs(s);
    let mut all: Vec<&OsStr> = args.to_vec();
    all.extend(outs.iter().map(|p| p.as_os_str()));
    inspect(&all)
}

#[test]
fn bad_batch_files() {
    let s = Scratch::new();
    let b = synth::<f64>(9, 4, 24, 1.0);

    let missing = s.input("missing.npz");
    s.assert_bad_input(
        &inspect_to_all(&s, args![missing]),
        &["missing.npz", "cannot open"],
    );

    let junk = s.input("junk.npz");
    fs::write(&junk, "not a zip").unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![junk]),
        &["junk.npz", "not a readable npz"],
    );

    let partial = s.input("partial.npz");
    let mut npz = NpzWriter::new(File::create(&partial).unwrap());
    npz.add_array("logp", &b.logp).unwrap();
    npz.add_array("advantages", &b.advantages).unwrap();
    npz.add_array("mask", &b.mask).unwrap();
    npz.finish().unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![partial]),
        &["logp_old", "missing"],
    );

    // NaN at a response position: the library's error, naming array, row and column.
    let mut bad = b.clone();
    let (i, j) = (2, (0..24).find(|&j| b.mask[[2, j]]).unwrap());
    bad.logp[[i, j]] = f64::NAN;
    let nan = s.input("nan.npz");
    write_npz(&nan, &bad);
    s.assert_bad_input(
        &inspect_to_all(&s, args![nan]),
        &[
            "nan.npz",
            "logp",
            &format!("row {i}"),
            &format!("column {j}"),
        ],
    );

    // A log-prob above 0.
    let mut bad = b.clone();
    bad.logp_old[[i, j]] = 0.5;
    let pos = s.input("pos.npz");
    write_npz(&pos, &bad);
    s.assert_bad_input(
        &inspect_to_all(&s, args![pos]),
        &["logp_old", &format!("row {i}")],
    );

    // Shapes that disagree.
    let short = s.input("short.npz");
    let mut npz = NpzWriter::new(File::create(&short).unwrap());
    npz.add_array("logp", &b.logp).unwrap();
    npz.add_array(
        "logp_old",
        &b.logp.slice(cppo::ndarray::s![.., 1..]).to_owned(),
    )
    .unwrap();
    npz.add_array("advantages", &b.advantages).unwrap();
    npz.add_array("mask", &b.mask).unwrap();
    npz.finish().unwrap();
    s.assert_bad_input(&inspect_to_all(&s, args![short]), &["logp_old"]);

    // A top-K divergence without the top-K pair.
    let input = s.input("b.npz");
    write_npz(&input, &b);
    s.assert_bad_input(
        &inspect_to_all(&s, args![input, "--divergence", "topk_tv"]),
        &["topk_logp_old", "missing"],
    );
}

#[test]
fn bad_safetensors() {
    let s = Scratch::new();
    let b = synth::<f64>(9, 4, 24, 1.0);
    let mut tensors = safetensors_f64(&b);

    let junk = s.input("junk.safetensors");
    fs::write(&junk, b"\x10\0\0\0\0\0\0\0{not json}      ").unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![junk]),
        &["junk.safetensors", "not a readable safetensors"],
    );

    let truncated = s.input("truncated.safetensors");
    write_safetensors(&truncated, &tensors);
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![truncated]),
        &["truncated.safetensors"],
    );

    // bfloat16 log-probs: refused, with the fix.
    let (rows, len) = b.logp.dim();
    tensors[0] = ("logp", "BF16", vec![rows, len], vec![0; rows * len * 2]);
    let bf16 = s.input("bf16.safetensors");
    write_safetensors(&bf16, &tensors);
    s.assert_bad_input(
        &inspect_to_all(&s, args![bf16]),
        &["logp", "BF16", ".float()"],
    );

    // Mixed float types.
    let mut tensors = safetensors_f64(&b);
    tensors[1] = (
        "logp_old",
        "F32",
        vec![rows, len],
        f32_bytes(&b.logp_old.mapv(|x| x as f32)),
    );
    let mixed = s.input("mixed.safetensors");
    write_safetensors(&mixed, &tensors);
    s.assert_bad_input(&inspect_to_all(&s, args![mixed]), &["logp_old", "float64"]);

    // A missing tensor and a wrong rank.
    let tensors = safetensors_f64(&b);
    let few = s.input("few.safetensors");
    write_safetensors(&few, &tensors[..3]);
    s.assert_bad_input(&inspect_to_all(&s, args![few]), &["mask", "missing"]);
    let mut tensors = safetensors_f64(&b);
    tensors[2] = (
        "advantages",
        "F64",
        vec![rows, len, 1],
        f64_bytes(&Array3::<f64>::zeros((rows, len, 1))),
    );
    let rank = s.input("rank.safetensors");
    write_safetensors(&rank, &tensors);
    s.assert_bad_input(&inspect_to_all(&s, args![rank]), &["advantages"]);
}

#[test]
fn bad_arguments_and_configs() {
    let s = Scratch::new();
    let b = synth::<f64>(9, 4, 24, 1.0);
    let input = s.input("b.npz");
    write_npz(&input, &b);

    let bad_cfg = s.input("bad.json");
    fs::write(&bad_cfg, r#"{"rule": {"kind": "cppo", "delta": -1}}"#).unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![input, "--config", bad_cfg]),
        &["bad.json", "rule.delta"],
    );
    let unknown = s.input("unknown.json");
    fs::write(&unknown, r#"{"rule": {"kind": "cppo"}, "extra": 1}"#).unwrap();
    s.assert_bad_input(
        &inspect_to_all(&s, args![input, "--config", unknown]),
        &["extra"],
    );
    let good = s.input("good.json");
    fs::write(&good, "{}").unwrap();

    for (args, needles) in [
        (
            args![input, "--divergence", "tv"],
            &["--divergence", "binary_tv"][..],
        ),
        (
            args![input, "--config", good, "--divergence", "binary_kl"],
            &["--compare"],
        ),
        (args![input, "--strip-rows", "4"], &["row 4", "4 rows"]),
        (args![input, "--strip-rule", "PPO"], &["PPO", "CPPO (full)"]),
        (args![input, "--buckets", "0"], &["--buckets"]),
        (args![input, "--size", "10x10"], &["--size"]),
        (args![input, "--size", "wide"], &["WxH"]),
        (args![input, "--demo"], &["--demo"]),
        (args!["--no-such-flag"], &["--no-such-flag"]),
        (args![], &["BATCH"]),
    ] {
        let run = inspect_to_all(&s, args);
        s.assert_bad_input(&run, needles);
    }
    // Outputs: a plot must be .svg or .png; no file twice.
    let (jpg, md) = (s.out("x.jpg"), s.out("x.md"));
    s.assert_bad_input(
        &inspect(args![input, "--plot", jpg]),
        &["x.jpg", ".svg or .png"],
    );
    s.assert_bad_input(
        &inspect(args![input, "--report", md, "--json", md]),
        &["x.md", "two outputs"],
    );
    // Empty directories and unreadable steps.
    let dir = s.input("run");
    fs::create_dir(&dir).unwrap();
    s.assert_bad_input(&inspect_to_all(&s, args![dir]), &["no step files"]);
    write_npz(&dir.join("step_1.npz"), &b);
    fs::write(dir.join("step_2.npz"), "garbage").unwrap();
    s.assert_bad_input(&inspect_to_all(&s, args![dir]), &["step_2.npz"]);
    fs::remove_file(dir.join("step_2.npz")).unwrap();
    write_npz(&dir.join("step_01.npz"), &b);
    s.assert_bad_input(&inspect_to_all(&s, args![dir]), &["step 1"]);
    s.assert_bad_input(&inspect(args![dir, "--strip-rows", "1"]), &["--strip-rows"]);
}

#[test]
fn a_failed_write_leaves_nothing() {
    let s = Scratch::new();
    let b = synth::<f64>(9, 4, 24, 1.0);
    let input = s.input("b.npz");
    write_npz(&input, &b);
    // The JSON cannot be written: the Markdown already staged goes too, and the plot
    // directory created for this run is removed. Exit code 1: the input was fine.
    let json = s.out("missing/r.json");
    let mut args: Vec<PathBuf> = vec![input, "--report".into(), s.out("r.md")];
    if cfg!(feature = "plots") {
        args.extend([
            "--plot".into(),
            s.out("p.png"),
            "--plot-dir".into(),
            s.out("plots"),
        ]);
    }
    args.extend(["--json".into(), json]);
    let run = inspect(&args.iter().map(|p| p.as_os_str()).collect::<Vec<_>>());
    s.assert_fails(&run, 1, &["r.json"]);
}

/// `--preset` runs a named preset, named after it; the report shows the per-row budgets
/// of the rules that have one.
#[test]
fn presets_and_the_budget_table() {
    let s = Scratch::new();
    let json = s.out("r.json");
    let run = inspect(args![
        "--demo", "--preset", "unirl", "--preset", "dppo", "--json", json
    ]);
    assert_ok(&run);
    let report = read_json(&json);
    let rules = report["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["unirl", "dppo"]);
    let unirl: cppo::Config = serde_json::from_value(rules[0]["config"].clone()).unwrap();
    assert_eq!(unirl, cppo::Preset::Unirl.config());
    let b = &rules[0]["diagnostics"]["delta_b_row"];
    assert!(b["min"].as_f64().unwrap() >= 0.02 && b["max"].as_f64().unwrap() <= 0.04);
    assert!(rules[1]["diagnostics"]["delta_b_row"].is_null());
    assert!(
        run.stdout.contains("Per-row prefix budget"),
        "{}",
        run.stdout
    );
    let s = Scratch::new();
    let bad = inspect(args!["--demo", "--preset", "nope"]);
    s.assert_bad_input(&bad, &["--preset", "nope", "unirl"]);
}
