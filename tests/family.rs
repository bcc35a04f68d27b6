//! The rest of the trust-region family (k2/k3 divergences, SAPO, `cppo_soft`, shuffled
//! position weights), checked against values worked out by hand and against the
//! properties that define them.

use approx::assert_relative_eq;
use cppo::ndarray::{Array1, Array2, s};
use cppo::{Batch, Config, CppoParams, Divergence, Gate, Objective, Par, Rule, evaluate};

fn batch_of<'a>(
    lp: &'a Array2<f64>,
    lq: &'a Array2<f64>,
    adv: &'a Array1<f64>,
    mask: &'a Array2<bool>,
) -> Batch<'a, f64> {
    Batch::new(lp, lq, adv, mask).unwrap()
}

/// Every response token's `grad` against the central difference of the loss, moving
/// that token's logp by ±h.
fn assert_grad_is_fd(
    cfg: &Config,
    (lp, lq): (&Array2<f64>, &Array2<f64>),
    adv: &Array1<f64>,
    mask: &Array2<bool>,
    (h, epsilon, max_relative): (f64, f64, f64),
    par: Par,
) {
    let loss = |lp: &Array2<f64>| {
        evaluate(cfg, &batch_of(lp, lq, adv, mask), Par::Seq)
            .unwrap()
            .loss
    };
    let grad = evaluate(cfg, &batch_of(lp, lq, adv, mask), par)
        .unwrap()
        .outputs
        .grad;
    for ((i, j), _) in mask.indexed_iter().filter(|(_, m)| **m) {
        let (mut up, mut down) = (lp.clone(), lp.clone());
        up[[i, j]] += h;
        down[[i, j]] -= h;
        let fd = (loss(&up) - loss(&down)) / (2.0 * h);
        assert_relative_eq!(
            grad[[i, j]],
            fd,
            epsilon = epsilon,
            max_relative = max_relative
        );
    }
}

fn parse(s: &str) -> Config {
    serde_json::from_str(s).unwrap()
}

#[test]
fn new_names_parse() {
    assert_eq!(parse(r#"{"divergence": "k2"}"#).divergence, Divergence::K2);
    assert_eq!(parse(r#"{"divergence": "k3"}"#).divergence, Divergence::K3);
    assert_eq!(
        parse(r#"{"objective": {"kind": "sapo"}}"#).objective,
        Objective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05
        }
    );
    // cppo_soft: the paper's inverse gate by default, the sigmoid with its τ on request.
    assert_eq!(
        parse(r#"{"rule": {"kind": "cppo_soft"}}"#).rule,
        Rule::Cppo(CppoParams {
            gate: Some(Gate::Inverse),
            ..CppoParams::default()
        })
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": 0.05}}"#).rule,
        Rule::Cppo(CppoParams {
            gate: Some(Gate::Sigmoid { tau: 0.05 }),
            ..CppoParams::default()
        })
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid"}}"#).rule,
        Rule::Cppo(CppoParams {
            gate: Some(Gate::Sigmoid { tau: 0.01 }),
            ..CppoParams::default()
        })
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "cppo", "shuffle_seed": 7}}"#)
            .rule
            .cppo_params()
            .unwrap()
            .shuffle_seed,
        Some(7)
    );
    for bad in [
        r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": 0}}"#,
        r#"{"rule": {"kind": "cppo_soft", "tau": 0.05}}"#,
        r#"{"rule": {"kind": "cppo_soft", "gate": "inverse", "tau": 0.05}}"#,
        r#"{"rule": {"kind": "cppo_soft", "gate": "logistic"}}"#,
        r#"{"rule": {"kind": "cppo", "gate": "inverse"}}"#,
        r#"{"objective": {"kind": "sapo", "tau_pos": -1}}"#,
        r#"{"objective": {"kind": "sapo", "tau": 1}}"#,
    ] {
        assert!(serde_json::from_str::<Config>(bad).is_err(), "{bad}");
    }
}

/// k2 = r²/2 and k3 = ρ − 1 − r on the clamped log-ratio, through the engine.
#[test]
fn k2_and_k3_by_hand() {
    // p/q = 0.5/0.4: r = ln 1.25 = 0.22314355131420976, ρ = 1.25.
    // k2 = 0.024896521...; k3 = 0.25 − 0.22314355131420976 = 0.02685644868579024.
    // Second token: r = −30 is clamped to −20: k2 = 200, k3 = e^−20 − 1 + 20.
    let lp = Array2::from_shape_vec((1, 2), vec![0.5f64.ln(), -31.0]).unwrap();
    let lq = Array2::from_shape_vec((1, 2), vec![0.4f64.ln(), -1.0]).unwrap();
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 2), true));
    let b = batch_of(&lp, &lq, &adv, &mask);
    let r = 1.25f64.ln();
    let k2 = evaluate(
        &Config {
            divergence: Divergence::K2,
            ..Config::with_rule(Rule::None)
        },
        &b,
        Par::Seq,
    )
    .unwrap();
    assert_relative_eq!(
        k2.outputs.divergence[[0, 0]],
        r * r / 2.0,
        max_relative = 1e-14
    );
    assert_eq!(k2.outputs.divergence[[0, 1]], 200.0);
    let k3 = evaluate(
        &Config {
            divergence: Divergence::K3,
            ..Config::with_rule(Rule::None)
        },
        &b,
        Par::Seq,
    )
    .unwrap();
    assert_relative_eq!(
        k3.outputs.divergence[[0, 0]],
        0.25 - r,
        max_relative = 1e-12
    );
    assert_relative_eq!(
        k3.outputs.divergence[[0, 1]],
        (-20f64).exp() - 1.0 + 20.0,
        max_relative = 1e-14
    );
    // TRM-max on k2 masks the row (max 200 > δ), TRM-avg on k3 likewise.
    let trm = evaluate(
        &Config {
            divergence: Divergence::K2,
            ..Config::with_rule(Rule::TrmMax { delta: 1.0 })
        },
        &b,
        Par::Seq,
    )
    .unwrap();
    assert_eq!(trm.outputs.reason, cppo::ndarray::array![[3u8, 3]]);
}

/// SAPO by hand at one token: A = 1, τ = 1, ρ = 1.25: σ = σ(0.25) = 0.5621765008857981;
/// l = −4 σ = −2.2487060035431925; g = −4 ρ σ (1 − σ) = −1.2306974918...
#[test]
fn sapo_by_hand() {
    let lp = Array2::from_elem((1, 1), 0.5f64.ln());
    let lq = Array2::from_elem((1, 1), 0.4f64.ln());
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 1), true));
    let cfg = Config {
        objective: Objective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        ..Config::with_rule(Rule::None)
    };
    let e = evaluate(&cfg, &batch_of(&lp, &lq, &adv, &mask), Par::Seq).unwrap();
    let sig = 1.0 / (1.0 + (-0.25f64).exp());
    assert_relative_eq!(sig, 0.5621765008857981, max_relative = 1e-15);
    assert_relative_eq!(e.loss, -4.0 * sig, max_relative = 1e-12);
    assert_relative_eq!(
        e.outputs.grad[[0, 0]],
        -4.0 * 1.25 * sig * (1.0 - sig),
        max_relative = 1e-12
    );
    // At ρ = 1 SAPO's gradient is the surrogate's: −4 · ¼ · A = −A.
    let e1 = evaluate(&cfg, &batch_of(&lq, &lq, &adv, &mask), Par::Seq).unwrap();
    assert_relative_eq!(e1.outputs.grad[[0, 0]], -1.0, max_relative = 1e-15);
}

/// cppo_soft: an away-moving token's term is scaled by σ((c_t − w_t D_t)/τ); a corrective
/// one keeps all of it; keep and reason are the hard rule's.
#[test]
fn cppo_soft_gate_by_hand() {
    // One row, two tokens, w_min = 1 and no budget: c_t = δ = 0.2, w = 1.
    // Token 0: p = 0.9, q = 0.5: D = 0.4, ρ = 1.8, A = +1: away; gate σ((0.2 − 0.4)/0.1) = σ(−2).
    // Token 1: p = 0.35, q = 0.5: D = 0.15 ≤ δ, ρ = 0.7 < 1, A = +1: feasible, full term.
    let lp = Array2::from_shape_vec((1, 2), vec![0.9f64.ln(), 0.35f64.ln()]).unwrap();
    let lq = Array2::from_elem((1, 2), 0.5f64.ln());
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 2), true));
    let b = batch_of(&lp, &lq, &adv, &mask);
    let soft = Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: None,
        w_min: 1.0,
        horizon: None,
        shuffle_seed: None,
        gate: Some(Gate::Sigmoid { tau: 0.1 }),
        calibration: None,
        ..CppoParams::default()
    }));
    let e = evaluate(&soft, &b, Par::Seq).unwrap();
    let gate = 1.0 / (1.0 + 2f64.exp());
    // token-mean over 2 tokens: grad = share · (−ρ A) / 2.
    assert_relative_eq!(
        e.outputs.grad[[0, 0]],
        gate * -1.8 / 2.0,
        max_relative = 1e-12
    );
    assert_relative_eq!(e.outputs.grad[[0, 1]], -0.7 / 2.0, max_relative = 1e-12);
    assert_eq!(e.outputs.reason, cppo::ndarray::array![[3u8, 1]]);
    assert_eq!(e.outputs.keep, cppo::ndarray::array![[false, true]]);
    // τ → 0 recovers the hard mask.
    let hard = Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: None,
        w_min: 1.0,
        horizon: None,
        shuffle_seed: None,
        gate: Some(Gate::Sigmoid { tau: 1e-9 }),
        calibration: None,
        ..CppoParams::default()
    }));
    let h = evaluate(&hard, &b, Par::Seq).unwrap();
    assert_eq!(h.outputs.grad[[0, 0]], 0.0);
}

fn long_batch(b: usize, l: usize) -> (Array2<f64>, Array2<f64>, Array1<f64>, Array2<bool>) {
    let lp = Array2::from_shape_fn((b, l), |(i, j)| {
        -0.05 - ((i * 31 + j * 17) % 23) as f64 * 0.03
    });
    let lq = Array2::from_shape_fn((b, l), |(i, j)| {
        -0.05 - ((i * 7 + j * 13) % 19) as f64 * 0.035
    });
    let adv = Array1::from_shape_fn(b, |i| if i % 2 == 0 { 1.0 } else { -1.0 });
    let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - 5 * i && j % 11 != 4);
    (lp, lq, adv, mask)
}

/// Shuffled weights: each row's weights are a permutation of the ordered ones (the same
/// multiset), not the identity, the same for every row of the same length T, and the
/// same whether the row is evaluated whole, in another batch, or in column chunks.
#[test]
fn shuffled_weights_are_a_permutation() {
    let (lp, lq, adv, mask) = long_batch(6, 80);
    let b = batch_of(&lp, &lq, &adv, &mask);
    let ordered = Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: Some(0.05),
        w_min: 0.6,
        horizon: None,
        shuffle_seed: None,
        calibration: None,
        ..CppoParams::default()
    }));
    let shuffled = Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: Some(0.05),
        w_min: 0.6,
        horizon: None,
        shuffle_seed: Some(42),
        calibration: None,
        ..CppoParams::default()
    }));
    let o = evaluate(&ordered, &b, Par::Seq).unwrap();
    let sh = evaluate(&shuffled, &b, Par::Rayon).unwrap();
    for i in 0..6 {
        let pick = |w: &Array2<f64>| -> Vec<f64> {
            let mut v: Vec<f64> = (0..80)
                .filter(|&j| mask[[i, j]])
                .map(|j| w[[i, j]])
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        assert_eq!(
            pick(&o.outputs.weight),
            pick(&sh.outputs.weight),
            "row {i}: same multiset"
        );
        assert_ne!(
            o.outputs.weight.row(i),
            sh.outputs.weight.row(i),
            "row {i}: not the identity"
        );
    }
    // Another seed gives another order.
    let other = Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: Some(0.05),
        w_min: 0.6,
        horizon: None,
        shuffle_seed: Some(43),
        calibration: None,
        ..CppoParams::default()
    }));
    assert_ne!(
        evaluate(&other, &b, Par::Seq).unwrap().outputs.weight,
        sh.outputs.weight
    );
    // A row alone (another batch, another row index) gets the same weights.
    let (lp1, lq1, adv1, m1) = (
        lp.slice(s![3..4, ..]).to_owned(),
        lq.slice(s![3..4, ..]).to_owned(),
        adv.slice(s![3..4]).to_owned(),
        mask.slice(s![3..4, ..]).to_owned(),
    );
    let alone = evaluate(&shuffled, &batch_of(&lp1, &lq1, &adv1, &m1), Par::Seq).unwrap();
    assert_eq!(alone.outputs.weight.row(0), sh.outputs.weight.row(3));
    // Column chunks give the whole row's outputs.
    use cppo::chunk::{Carry, ChunkPos, RowPartial, evaluate_chunk_into, row_partials};
    let cuts = [0usize, 17, 50, 80];
    let mut rows = vec![RowPartial::default(); 6];
    for w in cuts.windows(2) {
        let (lpc, lqc, mc) = (
            lp.slice(s![.., w[0]..w[1]]),
            lq.slice(s![.., w[0]..w[1]]),
            mask.slice(s![.., w[0]..w[1]]),
        );
        let c = Batch::new(&lpc, &lqc, &adv, mc).unwrap();
        for (r, p) in rows.iter_mut().zip(
            row_partials(
                &shuffled,
                &c,
                ChunkPos {
                    col0: w[0],
                    width: 80,
                },
                Par::Seq,
            )
            .unwrap(),
        ) {
            *r = r.merge(&p);
        }
    }
    let rows = cppo::chunk::whole_rows(&shuffled, &rows, None).unwrap();
    let mut carries = vec![Carry::default(); 6];
    for w in cuts.windows(2) {
        let (lpc, lqc, mc) = (
            lp.slice(s![.., w[0]..w[1]]),
            lq.slice(s![.., w[0]..w[1]]),
            mask.slice(s![.., w[0]..w[1]]),
        );
        let c = Batch::new(&lpc, &lqc, &adv, mc).unwrap();
        let mut out = cppo::Outputs::<f64>::zeros(c.shape());
        evaluate_chunk_into(
            &shuffled,
            &c,
            ChunkPos {
                col0: w[0],
                width: 80,
            },
            &rows,
            &mut carries,
            out.view_mut(),
            Par::Seq,
        )
        .unwrap();
        assert_eq!(out.weight, sh.outputs.weight.slice(s![.., w[0]..w[1]]));
        assert_eq!(out.grad, sh.outputs.grad.slice(s![.., w[0]..w[1]]));
    }
}

/// GSPO by hand: one row, ρ = (1.2, 0.9): mean log-ratio (ln 1.2 + ln 0.9)/2 = ½ ln 1.08,
/// s = √1.08 = 1.0392304845413265; A = 1 inside the clip (ε = 0.2): every token's loss is
/// −s, token-mean gives −s, and each token's gradient is −s/2.
#[test]
fn gspo_by_hand() {
    let lq = Array2::from_elem((1, 2), 0.5f64.ln());
    let lp = Array2::from_shape_vec((1, 2), vec![0.6f64.ln(), 0.45f64.ln()]).unwrap();
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 2), true));
    let cfg = Config {
        objective: Objective::Gspo {
            eps_low: 0.2,
            eps_high: 0.2,
        },
        ..Config::with_rule(Rule::None)
    };
    let e = evaluate(&cfg, &batch_of(&lp, &lq, &adv, &mask), Par::Seq).unwrap();
    let s = 1.08f64.sqrt();
    assert_relative_eq!(e.loss, -s, max_relative = 1e-13);
    for j in 0..2 {
        assert_relative_eq!(e.outputs.grad[[0, j]], -s / 2.0, max_relative = 1e-13);
    }
    // With GSPO's own tiny clip range (3e-4, 4e-4) and A > 0, s > 1 + ε_high: clipped,
    // no gradient, loss −(1 + ε_high).
    let cfg = Config {
        objective: Objective::Gspo {
            eps_low: 3e-4,
            eps_high: 4e-4,
        },
        ..cfg
    };
    let e = evaluate(&cfg, &batch_of(&lp, &lq, &adv, &mask), Par::Seq).unwrap();
    assert_relative_eq!(e.loss, -1.0004, max_relative = 1e-13);
    assert_eq!(e.outputs.grad, Array2::<f64>::zeros((1, 2)));
    assert_eq!(e.diagnostics.clip_frac, Some(1.0));
}

/// With every token kept and seq-mean-token-mean, GSPO's and GMPO's token-level gradients
/// are those of their sequence objectives: check against central differences of the loss.
#[test]
fn gspo_and_gmpo_gradients_match_finite_differences() {
    let (b, l) = (3, 7);
    let lq = Array2::from_shape_fn((b, l), |(i, j)| -0.3 - ((i * 5 + j * 3) % 7) as f64 * 0.2);
    let lp = Array2::from_shape_fn((b, l), |(i, j)| {
        lq[[i, j]] + 0.05 * (((i * 7 + j * 11) % 9) as f64 - 4.0) / 4.0
    });
    let adv = Array1::from_vec(vec![1.0, -0.7, 0.4]);
    let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - i);
    for objective in [
        Objective::Gspo {
            eps_low: 0.5,
            eps_high: 0.5,
        },
        // GMPO with a clip that binds on some tokens (|r| up to 0.05 > 0.03).
        Objective::Gmpo {
            eps_low: 0.03,
            eps_high: 0.03,
        },
        Objective::Gmpo {
            eps_low: 0.4,
            eps_high: 0.4,
        },
    ] {
        let cfg = Config {
            objective,
            aggregation: cppo::Aggregation::SeqMeanTokenMean,
            ..Config::with_rule(Rule::None)
        };
        assert_grad_is_fd(&cfg, (&lp, &lq), &adv, &mask, (1e-6, 1e-8, 1e-5), Par::Seq);
    }
}

/// MinPRO by hand: ρ = (0.8, 1.5, 1.1) on one row, A = 1, logp = ln(0.4, 0.75, 0.55).
/// With the current token: m = (0.8, 0.8, 0.8); without: m = (1, 0.8, 0.8). Weights are
/// capped at 1 + clip. Loss −ω A logp per token, gradient −ω A; token-mean over 3.
#[test]
fn minpro_by_hand() {
    let lq = Array2::from_elem((1, 3), 0.5f64.ln());
    let lp = Array2::from_shape_vec((1, 3), vec![0.4f64.ln(), 0.75f64.ln(), 0.55f64.ln()]).unwrap();
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 3), true));
    let b = batch_of(&lp, &lq, &adv, &mask);
    for (include_current, clip, omega) in [
        (true, None, [0.8, 0.8, 0.8]),
        (false, None, [1.0, 0.8, 0.8]),
        (false, Some(0.15), [1.0, 0.8, 0.8]),
        (false, Some(0.0), [1.0, 0.8, 0.8]),
    ] {
        let cfg = Config {
            objective: Objective::Minpro {
                include_current,
                clip,
                stop_gradient: true,
            },
            ..Config::with_rule(Rule::None)
        };
        let e = evaluate(&cfg, &b, Par::Seq).unwrap();
        for j in 0..3 {
            assert_relative_eq!(
                e.outputs.grad[[0, j]],
                -omega[j] / 3.0,
                max_relative = 1e-12
            );
            assert_relative_eq!(
                e.outputs.token_loss[[0, j]],
                -omega[j] * lp[[0, j]],
                max_relative = 1e-12
            );
        }
    }
    // A cap below the minimum binds: clip = 0 caps ω at 1 where m = +∞ → 1 already, so
    // use a row whose minimum is above 1: ρ = (1.2, 1.4): m = (1.2, 1.2), capped at 1.1.
    let lp2 = Array2::from_shape_vec((1, 2), vec![0.6f64.ln(), 0.7f64.ln()]).unwrap();
    let lq2 = Array2::from_elem((1, 2), 0.5f64.ln());
    let (adv2, mask2) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 2), true));
    let cfg = Config {
        objective: Objective::Minpro {
            include_current: true,
            clip: Some(0.1),
            stop_gradient: true,
        },
        ..Config::with_rule(Rule::None)
    };
    let e = evaluate(&cfg, &batch_of(&lp2, &lq2, &adv2, &mask2), Par::Seq).unwrap();
    assert_relative_eq!(e.outputs.grad[[0, 0]], -1.1 / 2.0, max_relative = 1e-12);
    assert_relative_eq!(e.outputs.grad[[0, 1]], -1.1 / 2.0, max_relative = 1e-12);
    assert_eq!(e.diagnostics.clip_frac, Some(1.0));
}

/// MinPRO without the stop-gradient: l_t = −ω_t A and the gradient flows through the
/// prefix minimum to the token holding it. By hand on ρ = (0.8, 1.5, 1.1), A = 1,
/// include_current, no cap: ω = (0.8, 0.8, 0.8), all three held by token 0, so
/// grad_0 = −(1 + 1 + 1) · 0.8 / 3 and the others get 0; then against central
/// differences of the loss on a longer batch (the minimum moving between blocks).
#[test]
fn minpro_through_the_minimum() {
    let lq = Array2::from_elem((1, 3), 0.5f64.ln());
    let lp = Array2::from_shape_vec((1, 3), vec![0.4f64.ln(), 0.75f64.ln(), 0.55f64.ln()]).unwrap();
    let (adv, mask) = (Array1::from_elem(1, 1.0), Array2::from_elem((1, 3), true));
    let cfg: Config = serde_json::from_str(
        r#"{"rule": {"kind": "none"}, "objective": {"kind": "minpro", "clip": null, "stop_gradient": false}}"#,
    )
    .unwrap();
    let e = evaluate(&cfg, &batch_of(&lp, &lq, &adv, &mask), Par::Seq).unwrap();
    assert_relative_eq!(e.loss, -0.8, max_relative = 1e-12);
    assert_relative_eq!(e.outputs.grad[[0, 0]], -0.8, max_relative = 1e-12);
    assert_eq!((e.outputs.grad[[0, 1]], e.outputs.grad[[0, 2]]), (0.0, 0.0));

    // Finite differences: rows of 150 columns (three blocks), a cap that binds on some
    // tokens, holes, per-row advantages of both signs, with and without the current token.
    let (b, l) = (3, 150);
    let lq = Array2::from_shape_fn((b, l), |(i, j)| -0.4 - ((i * 3 + j * 7) % 11) as f64 * 0.15);
    let lp = Array2::from_shape_fn((b, l), |(i, j)| {
        lq[[i, j]] + (((i * 13 + j * 29) % 23) as f64 - 11.0) * 0.013 + 0.0001 * j as f64
    });
    let adv = Array1::from_vec(vec![1.0, -0.6, 0.9]);
    let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - 17 * i && j % 19 != 7);
    for include_current in [true, false] {
        for clip in [None, Some(0.05)] {
            let cfg = Config {
                objective: Objective::Minpro {
                    include_current,
                    clip,
                    stop_gradient: false,
                },
                ..Config::with_rule(Rule::None)
            };
            assert_grad_is_fd(
                &cfg,
                (&lp, &lq),
                &adv,
                &mask,
                (1e-7, 1e-7, 1e-5),
                Par::Rayon,
            );
        }
    }

    // Column chunks cannot write to an earlier chunk: refused, naming the field.
    use cppo::chunk::{Carry, ChunkPos, evaluate_chunk_into, row_partials};
    let b1 = batch_of(&lp, &lq, &adv, &mask);
    let pos = ChunkPos { col0: 0, width: l };
    let rows = row_partials(&cfg, &b1, pos, Par::Seq).unwrap();
    let rows = cppo::chunk::whole_rows(&cfg, &rows, None).unwrap();
    let mut out = cppo::Outputs::<f64>::zeros((b, l));
    let mut carries = vec![Carry::default(); b];
    let err = evaluate_chunk_into(
        &cfg,
        &b1,
        pos,
        &rows,
        &mut carries,
        out.view_mut(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(err.to_string().contains("objective.stop_gradient"), "{err}");
}
