//! Smoke test of the trainer: it runs end to end, in-process, on a tiny setting, and
//! writes its CSVs, table and plot.
//!
//! The full `--quick` comparison is `cargo run --release -p cppo-train -- --compare
//! --quick` (under a minute); this test shrinks it further, because `cargo test` builds
//! candle without optimizations.

use clap::Parser;
use cppo_train as train;

#[test]
fn trainer_runs_every_rule_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = train::Args::parse_from([
        "train",
        "--compare",
        "--quick",
        "--rules",
        "grpo,dppo,cppo,trm_max",
        "--digits",
        "3",
        "--d-model",
        "32",
        "--layers",
        "1",
        "--iters",
        "3",
        "--prompts",
        "4",
        "--minibatches",
        "2",
        "--eval-prompts",
        "32",
        "--sft-max-steps",
        "200",
        "--sft-batch",
        "32",
        "--out",
        out,
    ]);
    let runs = train::run(args).unwrap();
    assert_eq!(runs.len(), 4);
    for r in &runs {
        assert!(r.error.is_none(), "{}: {:?}", r.rule, r.error);
        // Iteration 0 (the warm-started base) and three RL iterations.
        assert_eq!(r.logs.len(), 4, "{}", r.rule);
        for l in &r.logs[1..] {
            assert!(l.loss.is_finite() && l.grad_norm.is_finite(), "{}", r.rule);
            assert!((0.0..=1.0).contains(&l.reward) && (0.0..=1.0).contains(&l.masked_frac));
            assert!((0.0..=1.0).contains(&l.accuracy));
        }
        let csv =
            std::fs::read_to_string(dir.path().join(format!("{}_seed1.csv", r.rule))).unwrap();
        assert_eq!(csv.lines().count(), 5);
        // The warm start gets some answers right: the crate's gradient moved the policy.
        assert!(r.logs[1..].iter().any(|l| l.grad_norm > 0.0), "{}", r.rule);
    }
    // Every rule starts from the same warm-started model and sees the same prompts, so
    // the first rollout batch is the same for all: same reward at iteration 1.
    let first: Vec<f64> = runs.iter().map(|r| r.logs[1].reward).collect();
    assert!(first.iter().all(|&x| x == first[0]), "{first:?}");
    let svg = std::fs::read_to_string(dir.path().join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    let table = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
    for rule in ["grpo", "dppo", "cppo", "trm_max"] {
        assert!(table.contains(&format!("| {rule} |")), "{table}");
    }
}
