//! Regression tests for hostile input found by fuzzing: each was a panic, a silent
//! non-finite value or a broken promise, and each now has its typed error or its
//! documented value.

use cppo::chunk::{Carry, ChunkPos, RowPartial, row_partials};
use cppo::ndarray::{Array2, array};
use cppo::{Batch, Config, Divergence, Error, Par, evaluate};

fn parse(json: &str) -> Config {
    serde_json::from_str(json).expect("a valid config")
}

/// `row_partials` with a top-K divergence and a whole-row rule on a batch without the
/// top-K arrays panicked ("top-K arrays are checked before the pass"); it names the
/// missing array, as `evaluate` does.
#[test]
fn row_partials_without_topk_arrays_is_a_missing_array() {
    let (logp, old) = (array![[-0.5]], array![[-0.6]]);
    let (adv, mask) = (array![1.0], array![[true]]);
    let batch = Batch::new(&logp, &old, &adv, &mask).unwrap();
    for rule in ["trm_avg", "trm_max", "cppo", "dppo"] {
        let cfg = parse(&format!(
            r#"{{"divergence": "topk_tv", "rule": {{"kind": "{rule}"}}}}"#
        ));
        let pos = ChunkPos { col0: 0, width: 1 };
        let err = row_partials(&cfg, &batch, pos, Par::Seq).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MissingArray {
                    array: "topk_logp_old",
                    ..
                }
            ),
            "{rule}: {err}"
        );
        let err = evaluate(&cfg, &batch, Par::Seq).unwrap_err();
        assert!(matches!(err, Error::MissingArray { .. }), "{rule}: {err}");
    }
}

/// A carry with t = usize::MAX and S = NaN was accepted and masked everything with
/// reason 4 (or overflowed an add); a carry is checked when it is read.
#[test]
fn corrupt_carries_are_refused() {
    let max = usize::MAX;
    for json in [
        format!(r#"{{"col": 0, "t": {max}, "s": 0.0, "w": 0.0, "min_ratio": 1.0}}"#),
        r#"{"col": 4, "t": 2, "s": -1.0, "w": 0.0, "min_ratio": 1.0}"#.to_string(),
        r#"{"col": 4, "t": 2, "s": 1e400, "w": 0.0, "min_ratio": 1.0}"#.to_string(),
        r#"{"col": 4, "t": 2, "s": 0.0, "w": -0.5, "min_ratio": 1.0}"#.to_string(),
        r#"{"col": 4, "t": 2, "s": 0.0, "w": 0.0, "min_ratio": 0.0}"#.to_string(),
        r#"{"col": 4, "t": 2, "s": 0.0, "w": 0.0, "min_ratio": 1.0, "x": 1}"#.to_string(),
    ] {
        assert!(serde_json::from_str::<Carry>(&json).is_err(), "{json}");
    }
    // (NaN has no JSON spelling; the same check, `S >= 0 and finite`, refuses it.)
    let ok = r#"{"col": 4, "t": 2, "s": 0.1, "w": 1.9, "min_ratio": 1.0}"#;
    let carry: Carry = serde_json::from_str(ok).unwrap();
    assert_eq!((carry.col(), carry.tokens()), (4, 2));
    // A negative divergence sum or a non-finite max in a partial is refused too.
    let mut wire = serde_json::to_value(RowPartial::default()).unwrap();
    assert!(serde_json::from_value::<RowPartial>(wire.clone()).is_ok());
    wire["stats"]["d_max"] = (-1.0).into();
    let err = serde_json::from_value::<RowPartial>(wire).unwrap_err();
    assert!(err.to_string().contains("max divergence"), "{err}");
}

/// k3 came out slightly negative (−9.7e−17 on near-equal tokens, −1e−300 for logp 0 and
/// logp_old −1e−300); every divergence is ≥ 0.
#[test]
fn k3_is_never_negative() {
    assert!(cppo::divergence::k3(0.0, -1e-300) >= 0.0);
    let mut worst = 0.0f64;
    for i in 0..10_000 {
        let lq = -(i as f64) * 1e-4 - 1e-3;
        for eps in [1e-16, -1e-16, 3e-16, 1e-12] {
            worst = worst.min(cppo::divergence::k3(lq + eps, lq));
        }
    }
    assert!(worst >= 0.0, "k3 went down to {worst}");
    // Through the engine too, and for every divergence.
    let lq = Array2::from_shape_fn((4, 64), |(i, j)| -0.01 - 0.37 * (i * 64 + j) as f64 / 256.0);
    let lp = lq.mapv(|x| x + 1e-16);
    let (adv, mask) = (
        array![1.0, -1.0, 0.5, 2.0],
        Array2::from_elem((4, 64), true),
    );
    let batch = Batch::new(&lp, &lq, &adv, &mask).unwrap();
    for div in [
        Divergence::BinaryTv,
        Divergence::BinaryKl,
        Divergence::K2,
        Divergence::K3,
    ] {
        let cfg = Config {
            divergence: div,
            ..Config::dppo()
        };
        let e = evaluate(&cfg, &batch, Par::Seq).unwrap();
        assert!(e.outputs.divergence.iter().all(|&d| d >= 0.0), "{div:?}");
    }
}

/// The k3 KL penalty's exponent was not clamped: coef 0 with logp −1000 and logp_ref −1
/// gave a NaN loss, token_loss and grad; coef 1 with logp −746 gave +∞ and −∞; in f32,
/// logp −100 gave infinite outputs. x = logp_ref − logp is clamped to ±20 for every
/// estimator, so each is finite, and equal to its value at x = 20.
#[test]
fn the_kl_penalty_is_finite_for_any_log_probs() {
    use cppo::{KlEstimator, KlPenalty};
    for (estimator, coef, logp) in [
        (KlEstimator::K3, 0.0, -1000.0),
        (KlEstimator::K3, 1.0, -746.0),
        (KlEstimator::K3, 1.0, cppo::limits::MIN_LOGPROB),
        (KlEstimator::K2, 1.0, cppo::limits::MIN_LOGPROB),
        (KlEstimator::K1, 1.0, cppo::limits::MIN_LOGPROB),
    ] {
        let kl = KlPenalty { estimator, coef };
        let cfg = Config {
            kl: Some(kl),
            ..Config::dppo()
        };
        // A = 0: the objective term is 0, token_loss and grad are the KL term's.
        let (lp, lq, lr) = (array![[logp]], array![[logp]], array![[-1.0]]);
        let (adv, mask) = (array![0.0], array![[true]]);
        let batch = Batch::new(&lp, &lq, &adv, &mask)
            .unwrap()
            .with_logp_ref(&lr)
            .unwrap();
        let e = evaluate(&cfg, &batch, Par::Seq).unwrap();
        let (l, g) = kl.eval(-21.0, -1.0); // x = 20: the clamped value
        assert!(l.is_finite() && g.is_finite());
        assert_eq!(
            e.outputs.token_loss[[0, 0]],
            l,
            "{estimator:?} {coef} {logp}"
        );
        assert_eq!(e.outputs.grad[[0, 0]], g, "{estimator:?} {coef} {logp}");
        assert!(e.loss.is_finite());
    }
    // In f32: logp −100 against logp_ref −1, k3 with β = 1: e^20 fits in an f32.
    let cfg = Config {
        kl: Some(KlPenalty {
            estimator: KlEstimator::K3,
            coef: 1.0,
        }),
        ..Config::dppo()
    };
    let (lp, lr) = (array![[-100.0f32]], array![[-1.0f32]]);
    let (adv, mask) = (array![1.0f32], array![[true]]);
    let batch = Batch::new(&lp, &lp, &adv, &mask)
        .unwrap()
        .with_logp_ref(&lr)
        .unwrap();
    let e = evaluate(&cfg, &batch, Par::Seq).unwrap();
    assert!(e.outputs.token_loss[[0, 0]].is_finite() && e.outputs.grad[[0, 0]].is_finite());
}

/// GMPO chunked differed from whole when |A| ≥ about 2^63 (A = [1e19, 1, −1e19]: whole
/// grad 6.7e−21, chunked −0.1228), a fixed-point sum overflowing silently; and
/// advantages of 1e300 (3.4e38 in f32) overflowed token_loss and grad. Advantages beyond
/// ±1e9 are an error naming the first of them, in every entry point.
#[test]
fn huge_advantages_are_out_of_range() {
    let cfg = parse(r#"{"objective": {"kind": "gmpo"}}"#);
    let (lp, lq) = (array![[-0.5, -0.7, -0.2]], array![[-0.6, -0.6, -0.3]]);
    let mask = array![[true, true, true]];
    let adv = array![[1e19, 1.0, -1e19]];
    let batch = Batch::new(&lp, &lq, &adv, &mask).unwrap();
    let want = |e: Error| match e {
        Error::OutOfRange {
            array: "advantages",
            at,
            value,
            ..
        } => (at.row, at.col, value),
        other => panic!("{other}"),
    };
    assert_eq!(
        want(evaluate(&cfg, &batch, Par::Seq).unwrap_err()),
        (0, 0, 1e19)
    );
    assert_eq!(want(batch.validate().unwrap_err()), (0, 0, 1e19));
    let pos = ChunkPos { col0: 0, width: 3 };
    assert_eq!(
        want(row_partials(&cfg, &batch, pos, Par::Seq).unwrap_err()),
        (0, 0, 1e19)
    );
    // Per-row advantages, in f32: 3.4e38 is refused at the row's first response column.
    let (lp, mask) = (array![[-0.5f32, -0.7]], array![[false, true]]);
    let adv = array![3.4e38f32];
    let batch = Batch::new(&lp, &lp, &adv, &mask).unwrap();
    let (row, col, _) = want(evaluate(&Config::cppo(), &batch, Par::Rayon).unwrap_err());
    assert_eq!((row, col), (0, 1));
    // The bound itself is accepted, and every output is finite in f32.
    let adv = array![cppo::limits::MAX_ABS_ADVANTAGE as f32];
    let batch = Batch::new(&lp, &lp, &adv, &mask).unwrap();
    let e = evaluate(&Config::cppo(), &batch, Par::Seq).unwrap();
    assert!(
        e.outputs
            .token_loss
            .iter()
            .chain(&e.outputs.grad)
            .all(|x| x.is_finite())
    );
}

/// Log-probs below −1000 gave ±∞: −f64::MAX under `detached_is`, `cispo` and `minpro`
/// (which multiply by logp), in the binary-KL and top-K-KL sums, and as CPPO's
/// threshold. A log-prob below −1e4 is an error naming the array and position, in every
/// log-prob array, through every entry point.
#[test]
fn log_probs_below_the_floor_are_out_of_range() {
    use cppo::limits::MIN_LOGPROB;
    let (ok, mask) = (array![[-0.5, -0.7]], array![[true, true]]);
    let adv = array![1.0];
    let low = array![[-0.5, -f64::MAX]];
    let want = |r: cppo::Result<_>, array: &str| match r {
        Err(Error::OutOfRange {
            array: a,
            at,
            limit,
            ..
        }) if a == array => assert_eq!((at.row, at.col, limit), (0, 1, MIN_LOGPROB)),
        Err(other) => panic!("{array}: {other}"),
        Ok(_) => panic!("{array}: accepted"),
    };
    for obj in ["detached_is", "cispo", "minpro"] {
        let cfg = parse(&format!(r#"{{"objective": {{"kind": "{obj}"}}}}"#));
        let b = Batch::new(&low, &ok, &adv, &mask).unwrap();
        want(evaluate(&cfg, &b, Par::Seq).map(|_| ()), "logp");
        let b = Batch::new(&ok, &low, &adv, &mask).unwrap();
        want(evaluate(&cfg, &b, Par::Rayon).map(|_| ()), "logp_old");
        want(b.validate(), "logp_old");
    }
    // Row partials read the values when the rule needs whole-row sums.
    let cfg = parse(r#"{"rule": "trm_avg", "objective": {"kind": "cispo"}}"#);
    let b = Batch::new(&ok, &low, &adv, &mask).unwrap();
    let pos = ChunkPos { col0: 0, width: 2 };
    want(
        row_partials(&cfg, &b, pos, Par::Seq).map(|_| ()),
        "logp_old",
    );
    let cfg = parse(r#"{"kl": {"estimator": "k3", "coef": 0.1}}"#);
    let b = Batch::new(&ok, &ok, &adv, &mask)
        .unwrap()
        .with_logp_ref(&low)
        .unwrap();
    want(evaluate(&cfg, &b, Par::Seq).map(|_| ()), "logp_ref");
    // The top-K pair: −2e4 among the K log-probs of column 1.
    let (mut old, new) = (
        cppo::ndarray::Array3::from_elem((1, 2, 2), -1.0),
        cppo::ndarray::Array3::from_elem((1, 2, 2), -1.0),
    );
    old[[0, 1, 1]] = -2e4;
    let b = Batch::new(&ok, &ok, &adv, &mask)
        .unwrap()
        .with_topk(&old, &new)
        .unwrap();
    want(
        evaluate(&parse(r#"{"divergence": "topk_kl"}"#), &b, Par::Seq).map(|_| ()),
        "topk_logp_old",
    );
}

/// Config values that validation accepted made the math non-finite (`sapo` with
/// `tau_pos` 5e-324 gave a loss of −∞; δ_b · W and β · x² overflow for huge
/// parameters). Every real parameter is at most 1e6 and SAPO's temperatures at least
/// 1e-6, refused by name when the config is read.
#[test]
fn config_values_that_break_the_math_are_refused() {
    for (json, field) in [
        (
            r#"{"objective": {"kind": "sapo", "tau_pos": 5e-324}}"#,
            "objective.tau_pos",
        ),
        (
            r#"{"objective": {"kind": "sapo", "tau_neg": 1e7}}"#,
            "objective.tau_neg",
        ),
        (
            r#"{"rule": {"kind": "cppo", "delta": 1e300}}"#,
            "rule.delta",
        ),
        (
            r#"{"rule": {"kind": "cppo", "delta_b": 1.5e6}}"#,
            "rule.delta_b",
        ),
        (
            r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": 0.0}}"#,
            "rule.tau",
        ),
        (
            r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": 2e6}}"#,
            "rule.tau",
        ),
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"scale": 1e7}}}"#,
            "rule.calibration.scale",
        ),
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"ceiling": 1e300}}}"#,
            "rule.calibration.ceiling",
        ),
        (
            r#"{"rule": {"kind": "ratio", "eps_high": 1e300}}"#,
            "rule.eps_high",
        ),
        (
            r#"{"rule": {"kind": "trm_avg", "delta": 2e6}}"#,
            "rule.delta",
        ),
        (
            r#"{"objective": {"kind": "detached_is", "ratio_cap": 1e300}}"#,
            "objective.ratio_cap",
        ),
        (
            r#"{"objective": {"kind": "ppo_clip", "dual_clip": 1e300}}"#,
            "objective.dual_clip",
        ),
        (
            r#"{"objective": {"kind": "gmpo", "eps_low": 1e7}}"#,
            "objective.eps_low",
        ),
        (
            r#"{"objective": {"kind": "minpro", "clip": 1e7}}"#,
            "objective.clip",
        ),
        (r#"{"kl": {"estimator": "k2", "coef": 1e300}}"#, "kl.coef"),
    ] {
        let err = serde_json::from_str::<Config>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
}

/// The corners of every range at once: log-probs at −1e4 and 0, advantages at ±1e9, IS
/// weights at 1e6 and every parameter at its bound, for every divergence, rule,
/// objective and KL estimator: every output is finite, in f32.
#[test]
fn every_output_is_finite_at_the_corners_of_the_ranges() {
    use cppo::limits::{MAX_ABS_ADVANTAGE as A, MAX_IS_WEIGHT, MIN_LOGPROB as LO};
    let lp = array![[LO, 0.0, -1.0, LO, 0.0, -3.0]].mapv(|x: f64| x as f32);
    let lq = array![[0.0, LO, -1.0, LO, -1e-3, 0.0]].mapv(|x: f64| x as f32);
    let lr = array![[0.0, LO, LO, 0.0, -1.0, LO]].mapv(|x: f64| x as f32);
    let isw = Array2::from_elem((1, 6), MAX_IS_WEIGHT as f32);
    let adv = array![[A, -A, A, -A, A, -A]].mapv(|x: f64| x as f32);
    let mask = Array2::from_elem((1, 6), true);
    let topk_old = cppo::ndarray::Array3::from_shape_fn((1, 6, 3), |(_, j, k)| {
        [0.0, LO, -0.5][(j + k) % 3] as f32
    });
    let topk_new = topk_old.mapv(|x| if x == 0.0 { LO as f32 } else { 0.0 });
    let batch = Batch::new(&lp, &lq, &adv, &mask)
        .unwrap()
        .with_topk(&topk_old, &topk_new)
        .unwrap()
        .with_logp_ref(&lr)
        .unwrap()
        .with_is_weights(&isw)
        .unwrap();
    let rules = [
        r#""none""#,
        r#"{"kind": "dppo", "delta": 1e6}"#,
        r#"{"kind": "trm_avg", "delta": 1e-300}"#,
        r#"{"kind": "cppo", "delta": 1e6, "delta_b": 1e6, "w_min": 1e-300,
            "calibration": {"quantile": 1.0, "scale": 1e6, "ceiling": 1e6}}"#,
        r#"{"kind": "cppo", "delta": 5e-324, "delta_b": 0.0, "positions": "column"}"#,
        r#"{"kind": "cppo_soft", "gate": "sigmoid", "tau": 5e-324, "delta": 1e-300}"#,
    ];
    let objectives = [
        r#"{"kind": "surrogate"}"#,
        r#"{"kind": "detached_is", "ratio_cap": 1e6}"#,
        r#"{"kind": "ppo_clip", "eps_low": 1e6, "eps_high": 0.0, "dual_clip": 1e6}"#,
        r#"{"kind": "cispo", "eps_high": 1e6}"#,
        r#"{"kind": "gspo", "eps_low": 1e6, "eps_high": 1e6}"#,
        r#"{"kind": "gmpo", "eps_low": 1e6, "eps_high": 0.0}"#,
        r#"{"kind": "minpro", "clip": 1e6, "include_current": false}"#,
        r#"{"kind": "sapo", "tau_pos": 1e-6, "tau_neg": 1e6}"#,
    ];
    let mut runs = 0;
    for div in ["binary_tv", "binary_kl", "topk_tv", "topk_kl", "k2", "k3"] {
        for rule in rules {
            for obj in objectives {
                for est in ["k1", "k2", "k3"] {
                    let cfg = parse(&format!(
                        r#"{{"divergence": "{div}", "rule": {rule}, "objective": {obj},
                            "aggregation": "seq-mean-token-sum-norm", "norm_length": 1,
                            "kl": {{"estimator": "{est}", "coef": 1e6}}}}"#
                    ));
                    let e = evaluate(&cfg, &batch, Par::Seq).unwrap();
                    let o = &e.outputs;
                    let what = format!("{div} {rule} {obj} {est}");
                    assert!(e.loss.is_finite(), "{what}: loss {}", e.loss);
                    for (name, a) in [
                        ("divergence", &o.divergence),
                        ("weight", &o.weight),
                        ("token_loss", &o.token_loss),
                        ("grad", &o.grad),
                    ] {
                        assert!(a.iter().all(|x| x.is_finite()), "{what}: {name} {a}");
                    }
                    if rule != r#""none""# {
                        let t = &o.threshold;
                        assert!(t.iter().all(|x| x.is_finite()), "{what}: threshold {t}");
                    }
                    let d = serde_json::to_string(&e.diagnostics).unwrap();
                    assert!(
                        !d.contains("null,") || d.matches("null").count() <= 3,
                        "{d}"
                    );
                    runs += 1;
                }
            }
        }
    }
    assert_eq!(runs, 6 * 6 * 8 * 3);
}
