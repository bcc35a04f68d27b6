//! A worked example, every number by hand: binary TV, CPPO δ = 0.2, δ_b = 0.05 (fixed), w_min = 0.8,
//! surrogate objective, token-mean; one row of 6 slots whose 4th slot is a hole.
//!
//! The expected numbers are worked out by hand from the probabilities, as exact
//! fractions: D_t = |p − q|, w_t = 1 − 0.2 (t − 1)/4, c_t from the prefix sums, and
//! grad_t = −ρ_t A / N_tok with ρ_t = p/q and N_tok = 5.

use approx::assert_abs_diff_eq;
use cppo::ndarray::{Array1, Array2, array};
use cppo::{Batch, Config, CppoParams, Par, Rule, evaluate};

const P: [f64; 6] = [0.50, 0.90, 0.30, f64::NAN, 0.60, 0.95];
const Q: [f64; 6] = [0.40, 0.95, 0.45, f64::NAN, 0.30, 0.90];
const MASK: [bool; 6] = [true, true, true, false, true, true];

fn logs(x: &[f64; 6]) -> Array2<f64> {
    Array2::from_shape_fn((1, 6), |(_, j)| x[j].ln())
}

/// The example's own parameters: a fixed budget (no calibration).
fn config() -> Config {
    Config::with_rule(Rule::Cppo(CppoParams {
        delta: 0.2,
        delta_b: Some(0.05),
        w_min: 0.8,
        calibration: None,
        ..CppoParams::default()
    }))
}

fn run(adv: f64) -> cppo::Evaluation<f64> {
    let (logp, logp_old) = (logs(&P), logs(&Q));
    let mask = Array2::from_shape_fn((1, 6), |(_, j)| MASK[j]);
    let a = array![adv];
    let batch = Batch::new(&logp, &logp_old, &a, &mask).unwrap();
    evaluate(&config(), &batch, Par::Seq).unwrap()
}

// By hand: D = |p − q|; w_t for t = 1..5 over the response tokens (the hole does not count).
const D: [f64; 6] = [0.10, 0.05, 0.15, 0.0, 0.30, 0.05];
const W: [f64; 6] = [1.00, 0.95, 0.90, 0.0, 0.85, 0.80];
// c_t = min(δ, δ + δ_b W_{t−1} − S_{t−1}):
//   t=1: min(0.2, 0.2)                                    = 0.2
//   t=2: S_1 = 0.1,    W_1 = 1    → 0.2 + 0.05 − 0.1       = 0.15
//   t=3: S_2 = 0.1475, W_2 = 1.95 → 0.2 + 0.0975 − 0.1475  = 0.15
//   t=4: S_3 = 0.2825, W_3 = 2.85 → 0.2 + 0.1425 − 0.2825  = 0.06
//   t=5: S_4 = 0.5375, W_4 = 3.70 → 0.2 + 0.185 − 0.5375   = −0.1525
const C: [f64; 6] = [0.2, 0.15, 0.15, 0.0, 0.06, -0.1525];

#[test]
fn divergence_weight_threshold() {
    for adv in [1.0, -1.0] {
        let o = run(adv).outputs;
        for j in 0..6 {
            assert_abs_diff_eq!(o.divergence[[0, j]], D[j], epsilon = 1e-12);
            assert_abs_diff_eq!(o.weight[[0, j]], W[j], epsilon = 1e-12);
            assert_abs_diff_eq!(o.threshold[[0, j]], C[j], epsilon = 1e-12);
        }
    }
}

#[test]
fn positive_advantage() {
    let e = run(1.0);
    // Slot 5: w D = 0.255 > 0.2, the token threshold. Slot 6: w D = 0.04 ≤ 0.2 but
    // S_5 = 0.5775 > 0.2 + 0.05 · 3.7 = 0.385, the budget alone.
    assert_eq!(e.outputs.reason, array![[1u8, 1, 1, 0, 3, 4]]);
    assert_eq!(
        e.outputs.keep,
        array![[true, true, true, false, false, false]]
    );
    let grad = [
        -1.25 / 5.0,
        -(18.0 / 19.0) / 5.0,
        -(2.0 / 3.0) / 5.0,
        0.0,
        0.0,
        0.0,
    ];
    for (j, g) in grad.iter().enumerate() {
        assert_abs_diff_eq!(e.outputs.grad[[0, j]], g, epsilon = 1e-12);
    }
    let loss = -(1.25 + 18.0 / 19.0 + 2.0 / 3.0) / 5.0;
    assert_abs_diff_eq!(e.loss, loss, epsilon = 1e-12);
    assert_abs_diff_eq!(e.loss, -0.5728070175438597, epsilon = 1e-12);
    assert_eq!(e.diagnostics.masked_frac_token_threshold, 0.2);
    assert_eq!(e.diagnostics.masked_frac_prefix_budget, 0.2);
}

#[test]
fn negative_advantage_is_corrective() {
    let e = run(-1.0);
    // Same violations, but A = −1: slot 5 has ρ = 2 (A(ρ−1) < 0) and slot 6 has
    // ρ = 19/18; neither moves away, so both are kept by the corrective bypass.
    assert_eq!(e.outputs.reason, array![[1u8, 1, 1, 0, 2, 2]]);
    let grad = [
        1.25 / 5.0,
        (18.0 / 19.0) / 5.0,
        (2.0 / 3.0) / 5.0,
        0.0,
        2.0 / 5.0,
        (19.0 / 18.0) / 5.0,
    ];
    for (j, g) in grad.iter().enumerate() {
        assert_abs_diff_eq!(e.outputs.grad[[0, j]], g, epsilon = 1e-12);
    }
    let loss = (1.25 + 18.0 / 19.0 + 2.0 / 3.0 + 2.0 + 19.0 / 18.0) / 5.0;
    assert_abs_diff_eq!(e.loss, loss, epsilon = 1e-12);
    assert_abs_diff_eq!(e.loss, 1.183918128654971, epsilon = 1e-12);
    assert_eq!(e.diagnostics.bypass_frac, 0.4);
}

#[test]
fn same_answer_for_every_input_form() {
    // Per-token advantages, u8 and float masks, f32 inputs, parallel execution.
    let want = run(1.0);
    let (logp, logp_old) = (logs(&P), logs(&Q));
    let adv = Array2::<f64>::ones((1, 6));
    let m_u8 = Array2::from_shape_fn((1, 6), |(_, j)| u8::from(MASK[j]));
    let m_f = m_u8.mapv(f64::from);
    for batch in [
        Batch::new(&logp, &logp_old, &adv, &m_u8).unwrap(),
        Batch::new(&logp, &logp_old, &adv, &m_f).unwrap(),
    ] {
        let got = evaluate(&config(), &batch, Par::Rayon).unwrap();
        assert_eq!(got.outputs, want.outputs);
        assert_eq!(got.loss.to_bits(), want.loss.to_bits());
    }
    let (lp32, lq32) = (logp.mapv(|x| x as f32), logp_old.mapv(|x| x as f32));
    let a32 = Array1::<f32>::ones(1);
    let m = Array2::from_shape_fn((1, 6), |(_, j)| MASK[j]);
    let got = evaluate(
        &config(),
        &Batch::new(&lp32, &lq32, &a32, &m).unwrap(),
        Par::Seq,
    )
    .unwrap();
    assert_eq!(got.outputs.reason, want.outputs.reason);
    assert_abs_diff_eq!(got.loss, want.loss, epsilon = 1e-6);
}
