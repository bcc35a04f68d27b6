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

/// The running-sum task with a rollout temperature, the shared detached-IS objective,
/// arms with parameters, a cached shared warm start, and `--analyze` over three cells:
/// two horizons at one lag, two lags at one horizon.
#[test]
fn running_sum_cells_and_their_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let cell = |name: &str, horizon: &str, lag: &str| {
        let out = dir.path().join(name);
        let args = train::Args::parse_from([
            "train",
            "--compare",
            "--task",
            "sum",
            "--horizon",
            horizon,
            "--rules",
            "dppo:delta=0.1,cppo_budget,none",
            "--is-cap",
            "3",
            "--tau-mu",
            "1.1",
            "--lag",
            lag,
            "--seeds",
            "1,2",
            "--warm-seed",
            "7",
            "--warm-cache",
            dir.path().join("warm").to_str().unwrap(),
            "--d-model",
            "32",
            "--layers",
            "1",
            "--iters",
            "2",
            "--eval-every",
            "1",
            "--eval-prompts",
            "16",
            "--eval-samples",
            "2",
            "--prompts",
            "4",
            "--minibatches",
            "2",
            "--sft-max-steps",
            "20",
            "--sft-batch",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]);
        (train::run(args).unwrap(), out)
    };
    let (runs, first) = cell("a", "3", "1");
    assert_eq!(runs.len(), 6);
    for r in &runs {
        assert!(r.error.is_none(), "{}: {:?}", r.rule, r.error);
        let auc = r.sampled_auc();
        assert!((0.0..=1.0).contains(&auc), "{}: {auc}", r.rule);
    }
    // Both seeds share warm start 7, trained once and cached.
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("warm"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
    // The same cell again loads the cached warm start and reproduces every number.
    let (rerun, _) = cell("a2", "3", "1");
    for (x, y) in runs.iter().zip(&rerun) {
        assert_eq!(without_secs(&x.csv()), without_secs(&y.csv()), "{}", x.rule);
    }
    let (_, second) = cell("b", "4", "1");
    let (_, fresh) = cell("c", "3", "0");
    let pos = std::fs::read_to_string(first.join("cppo_budget_seed1_pos.csv")).unwrap();
    assert_eq!(pos.lines().count(), 1 + 4, "{pos}");
    let analysis = dir.path().join("analysis");
    let report = train::run(train::Args::parse_from([
        "train",
        "--analyze",
        &format!(
            "{},{},{}",
            first.display(),
            second.display(),
            fresh.display()
        ),
        "--reference",
        "dppo:delta=0.1",
        "--primary",
        &format!("{}:cppo_budget", second.display()),
        "--out",
        analysis.to_str().unwrap(),
    ]));
    assert!(report.unwrap().is_empty());
    let md = std::fs::read_to_string(analysis.join("report.md")).unwrap();
    assert!(md.contains("primary: not adjusted"), "{md}");
    assert!(md.contains("### T = 3; sum, lag 1, τ_μ 1.1"), "{md}");
    assert!(
        md.contains("| T = 4, lag 1, τ_μ 1.1 | **cppo_budget** | 2 |"),
        "{md}"
    );
    // Two horizons of one drift group: a slope line per compared arm.
    assert!(md.contains("| 3, 4 | cppo_budget | 2 |"), "{md}");
    // Two lags at one horizon: a staleness slope line per compared arm.
    assert!(md.contains("## Trend with staleness"), "{md}");
    assert!(md.contains("| 0, 1 | cppo_budget | 2 |"), "{md}");
    for svg in ["horizon.svg", "staleness.svg", "positions.svg"] {
        let s = std::fs::read_to_string(analysis.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("polyline"), "{svg}");
    }
    // --rename: the arm under its new name everywhere, its per-position files still
    // found under the rule it ran.
    let renamed = dir.path().join("renamed");
    let analyze = |rename: &str| {
        train::run(train::Args::parse_from([
            "train",
            "--analyze",
            &format!("{},{}", first.display(), second.display()),
            "--reference",
            "dppo:delta=0.1",
            "--rename",
            rename,
            "--out",
            renamed.to_str().unwrap(),
        ]))
    };
    assert!(analyze("cppo_budget=>budget only").unwrap().is_empty());
    let md = std::fs::read_to_string(renamed.join("report.md")).unwrap();
    assert!(md.contains("| 3, 4 | budget only | 2 |"), "{md}");
    assert!(md.contains("| budget only | budget |"), "{md}");
    assert!(!md.contains("cppo_budget"), "{md}");
    let Err(err) = analyze("cppo_budget") else {
        panic!("--rename without => accepted");
    };
    let err = err.to_string();
    assert!(err.contains("expected RULE=>NAME"), "{err}");
}

/// A run's CSV without its last column (the seconds an iteration took).
fn without_secs(csv: &str) -> String {
    csv.lines()
        .map(|l| l.rsplit_once(',').map_or(l, |(rest, _)| rest))
        .collect::<Vec<_>>()
        .join("\n")
}
