//! End-to-end tests of `cppo inspect`'s warnings: the binary run on batch files written
//! here, the warnings read back from the terminal, `--report` Markdown and `--json`,
//! for a batch and per step for a run directory.

mod common;
mod support;

use std::fs;
use std::path::Path;

use common::{Scratch, args, assert_ok, inspect};
use serde_json::Value;
use support::{Arrays, small_run};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// A warning's code and rule.
type Seen = (String, Option<String>);

/// (code, rule) of each warning of a JSON `warnings` array.
fn codes(warnings: &Value) -> Vec<Seen> {
    warnings
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let obj = w.as_object().unwrap();
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["code", "message", "rule"], "{w}");
            assert!(!w["message"].as_str().unwrap().is_empty());
            (
                w["code"].as_str().unwrap().to_string(),
                w["rule"].as_str().map(String::from),
            )
        })
        .collect()
}

fn has(list: &[Seen], code: &str, rule: Option<&str>) -> bool {
    list.iter().any(|(c, r)| c == code && r.as_deref() == rule)
}

/// The terminal's warning lines.
fn terminal_warnings(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("- warning "))
        .collect()
}

#[test]
fn the_demo_warns_about_the_fixed_budget_only() {
    let s = Scratch::new();
    let (json, md) = (s.outputs.join("r.json"), s.outputs.join("r.md"));
    let run = inspect(args!["--demo", "--json", json, "--report", md]);
    assert_ok(&run);
    let report = read_json(&json);
    let got = codes(&report["warnings"]);
    let fixed = Some("CPPO fixed budget".to_string());
    assert_eq!(
        got,
        [
            ("prefix_budget_dominates".to_string(), fixed.clone()),
            ("threshold_negative".to_string(), fixed),
        ]
    );
    // The numbers in the messages are the report's.
    let rules = report["rules"].as_array().unwrap();
    let d = &rules[6]["diagnostics"];
    assert_eq!(rules[6]["name"], "CPPO fixed budget");
    let msg = report["warnings"][1]["message"].as_str().unwrap();
    let c = d["threshold_mean"].as_f64().unwrap();
    assert!(msg.contains(&format!("{c:.4}")), "{msg}");

    // The terminal lists them last, one line each; the Markdown after the summary.
    let lines = terminal_warnings(&run.stdout);
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines[0].starts_with("- warning [prefix_budget_dominates] CPPO fixed budget: "));
    let tail: Vec<&str> = run.stdout.lines().rev().take(4).collect();
    assert!(
        tail.iter()
            .any(|l| l.starts_with("- warning [threshold_negative]")),
        "{tail:?}"
    );
    assert!(run.stdout.contains("\nWarnings (2)\n"), "{}", run.stdout);
    let markdown = fs::read_to_string(&md).unwrap();
    let at = markdown.find("## Warnings").unwrap();
    assert!(at < markdown.find("## Rules").unwrap());
    assert!(markdown.contains("- `threshold_negative` CPPO fixed budget: the mean"));
}

#[test]
fn a_budget_exhausted_batch_warns_on_each_count() {
    let s = Scratch::new();
    // D = 0.3 on every token of every row, all moving away: everything after the first
    // token exceeds any budget.
    let input = s.input("drift.npz");
    Arrays::uniform(6, 40, 0.2).write(&input);
    let json = s.outputs.join("r.json");
    let run = inspect(args![input, "--json", json]);
    assert_ok(&run);
    let got = codes(&read_json(&json)["warnings"]);
    for rule in ["CPPO budget-only", "CPPO fixed budget", "CPPO (full)"] {
        for code in [
            "masked_fraction_high",
            "threshold_negative",
            "budget_exhausted_at_first_token",
        ] {
            assert!(has(&got, code, Some(rule)), "no {code} for {rule}: {got:?}");
        }
    }
    // DPPO masks every token too (D > δ), by its token threshold: no budget warnings.
    assert!(has(&got, "masked_fraction_high", Some("DPPO")), "{got:?}");
    assert!(
        !got.iter()
            .any(|(c, r)| r.as_deref() == Some("DPPO") && c != "masked_fraction_high")
    );
    // Every token fails the token threshold first: the budget does not dominate.
    assert!(
        !got.iter().any(|(c, _)| c == "prefix_budget_dominates"),
        "{got:?}"
    );
    assert_eq!(terminal_warnings(&run.stdout).len(), got.len());

    // D = 0.1 ≤ δ: the budget masks nearly all of it.
    let input = s.input("budget.npz");
    Arrays::uniform(6, 40, 0.4).write(&input);
    let run = inspect(args![input, "--json", json]);
    assert_ok(&run);
    let got = codes(&read_json(&json)["warnings"]);
    assert!(
        has(&got, "prefix_budget_dominates", Some("CPPO fixed budget")),
        "{got:?}"
    );
    assert!(
        has(&got, "masked_fraction_high", Some("CPPO fixed budget")),
        "{got:?}"
    );
    assert!(!has(
        &got,
        "budget_exhausted_at_first_token",
        Some("CPPO fixed budget")
    ));
    assert!(
        !got.iter().any(|(_, r)| r.as_deref() == Some("DPPO")),
        "{got:?}"
    );

    // Mild drift: silent.
    let input = s.input("calm.npz");
    Arrays::uniform(6, 40, 0.495).write(&input);
    let run = inspect(args![input, "--json", json]);
    assert_ok(&run);
    assert_eq!(read_json(&json)["warnings"], serde_json::json!([]));
    assert!(!run.stdout.contains("Warnings"), "{}", run.stdout);
}

/// An all-false mask is a warning, not an error: the file is well-formed and its numbers
/// are the library's (zeros), and a run keeps its other steps.
#[test]
fn no_response_tokens_and_no_drift() {
    let s = Scratch::new();
    let mut b = Arrays::synth(1, 4, 24, 1.0);
    b.mask.fill(false);
    let input = s.input("empty.npz");
    b.write(&input);
    let (json, md) = (s.outputs.join("r.json"), s.outputs.join("r.md"));
    let run = inspect(args![input, "--json", json, "--report", md]);
    assert_ok(&run);
    let report = read_json(&json);
    assert_eq!(
        codes(&report["warnings"]),
        [("no_response_tokens".to_string(), None)]
    );
    let lines = terminal_warnings(&run.stdout);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains("0 response tokens in 4 rows × 24 slots"),
        "{}",
        lines[0]
    );
    assert!(
        fs::read_to_string(&md)
            .unwrap()
            .contains("`no_response_tokens`")
    );

    let mut b = Arrays::synth(1, 4, 24, 1.0);
    b.logp_old = b.logp.clone();
    b.write(&input);
    let run = inspect(args![input, "--json", json]);
    assert_ok(&run);
    let report = read_json(&json);
    assert_eq!(codes(&report["warnings"]), [("no_drift".to_string(), None)]);
    let msg = report["warnings"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("logp == logp_old") && msg.contains("on-policy"),
        "{msg}"
    );
}

#[test]
fn ratios_above_the_is_cap() {
    let s = Scratch::new();
    let input = s.input("b.npz");
    // ρ = 0.5 / 0.2 = 2.5 everywhere; no trust region, so every token is kept.
    Arrays::uniform(3, 10, 0.2).write(&input);
    let capped = s.input("capped.json");
    fs::write(
        &capped,
        r#"{"rule": "none", "objective": {"kind": "detached_is", "ratio_cap": 2.0}}"#,
    )
    .unwrap();
    let loose = s.input("loose.json");
    fs::write(
        &loose,
        r#"{"rule": "none", "objective": {"kind": "detached_is", "ratio_cap": 3.0}}"#,
    )
    .unwrap();
    let json = s.outputs.join("r.json");
    let run = inspect(args![
        input, "--config", capped, "--config", loose, "--json", json
    ]);
    assert_ok(&run);
    let report = read_json(&json);
    assert_eq!(
        codes(&report["warnings"]),
        [("ratio_above_cap".to_string(), Some("capped".to_string()))]
    );
    let msg = report["warnings"][0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("100.00% of the response tokens are kept"),
        "{msg}"
    );
}

#[test]
fn a_run_warns_per_step() {
    let s = Scratch::new();
    let dir = s.input("run");
    small_run(&dir);
    let mut empty = Arrays::synth(9, 8, 64, 1.0);
    empty.mask.fill(false);
    empty.write(&dir.join("step_000050.npz"));
    let (json, md) = (s.outputs.join("r.json"), s.outputs.join("r.md"));
    let run = inspect(args![dir, "--json", json, "--report", md]);
    assert_ok(&run);
    let report = read_json(&json);
    let steps = report["steps"].as_array().unwrap();
    let by_step: Vec<(u64, Vec<Seen>)> = steps
        .iter()
        .map(|st| (st["step"].as_u64().unwrap(), codes(&st["warnings"])))
        .collect();
    let at = |step: u64| &by_step.iter().find(|(s, _)| *s == step).unwrap().1;
    assert_eq!(at(40), &[("no_drift".to_string(), None)]);
    assert_eq!(at(50), &[("no_response_tokens".to_string(), None)]);
    assert!(at(10).is_empty(), "{:?}", at(10));
    // The terminal and the Markdown name the step.
    let lines = terminal_warnings(&run.stdout);
    let total: usize = by_step.iter().map(|(_, w)| w.len()).sum();
    assert_eq!(lines.len(), total, "{}", run.stdout);
    assert!(
        run.stdout.contains("- warning step 40: [no_drift] "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("- warning step 50: [no_response_tokens] ")
    );
    let markdown = fs::read_to_string(&md).unwrap();
    assert!(markdown.contains("- step 40: `no_drift` "), "{markdown}");
}

#[test]
fn a_long_run_lists_some_warnings_in_the_terminal_and_all_in_the_report() {
    let s = Scratch::new();
    let dir = s.input("run");
    let mut same = Arrays::synth(1, 2, 16, 1.0);
    same.logp_old = same.logp.clone();
    let steps: Vec<(u64, Arrays)> = (0..25).map(|k| (k, same.clone())).collect();
    support::write_run(&dir, &steps);
    let md = s.outputs.join("r.md");
    let run = inspect(args![dir, "--report", md]);
    assert_ok(&run);
    assert_eq!(terminal_warnings(&run.stdout).len(), 20, "{}", run.stdout);
    assert!(run.stdout.contains("Warnings (25)"));
    assert!(
        run.stdout
            .contains("- ... and 5 more: --report, --html and --json list them all")
    );
    let markdown = fs::read_to_string(&md).unwrap();
    assert_eq!(markdown.matches("`no_drift`").count(), 25);
}
