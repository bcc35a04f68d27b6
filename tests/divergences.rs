//! Hand-computed divergences (the divergence module's formulas): probabilities of exactly 1, tiny
//! probabilities, top-K masses that sum to 1, and K = 1. Each expected value is written
//! out from the probabilities, with the arithmetic in the comment.

use approx::assert_relative_eq;
use cppo::divergence::{binary_kl, binary_tv, topk_kl, topk_tv};
use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{Batch, Divergence, Par, Rule, trust_region};

fn ln(x: f64) -> f64 {
    x.ln()
}

#[test]
fn binary_tv_by_hand() {
    assert_eq!(binary_tv(0.0, 0.0), 0.0); // p = q = 1
    assert_relative_eq!(binary_tv(0.0, ln(0.5)), 0.5, max_relative = 1e-15); // p = 1, q = 0.5
    assert_relative_eq!(binary_tv(ln(0.25), 0.0), 0.75, max_relative = 1e-15); // q = 1
    // Tiny probabilities: p = 1e-30, q = 3e-30 → 2e-30.
    assert_relative_eq!(binary_tv(ln(1e-30), ln(3e-30)), 2e-30, max_relative = 1e-12);
}

#[test]
fn binary_kl_by_hand() {
    assert_eq!(binary_kl(0.0, 0.0), 0.0); // both 1: q·0 + 0·log(1e-8/1e-8)
    // q = 1, p = 0.5: 1·(0 − ln 0.5) + 0 = ln 2.
    assert_relative_eq!(binary_kl(ln(0.5), 0.0), 2f64.ln(), max_relative = 1e-12);
    // p = 1, q = 0.5: the 1e-8 guard keeps it finite:
    // 0.5·ln(0.5/1) + 0.5·ln((0.5 + 1e-8)/(0 + 1e-8)) = 0.5·ln 0.5 + 0.5·ln(50000001).
    let want = 0.5 * ln(0.5) + 0.5 * ln(50_000_001.0);
    assert_relative_eq!(binary_kl(0.0, ln(0.5)), want, max_relative = 1e-7);
    assert!(want > 8.5 && want < 8.52);
    // q = 0.3, p = 0.6: 0.3·ln(0.3/0.6) + 0.7·ln(0.70000001/0.40000001).
    let want = 0.3 * ln(0.5) + 0.7 * ln(0.700_000_01 / 0.400_000_01);
    assert_relative_eq!(binary_kl(ln(0.6), ln(0.3)), want, max_relative = 1e-12);
    // Tiny: q = 1e-9, p = 1e-13. Head q·ln(1e4) = 9.2103e-9; rest ≈ −(q − p) = −9.999e-10.
    let want = 1e-9 * ln(1e4) - (1e-9 - 1e-13);
    assert_relative_eq!(binary_kl(ln(1e-13), ln(1e-9)), want, max_relative = 1e-6);
    // Never negative.
    assert!(binary_kl(ln(0.3), ln(0.3)) >= 0.0);
}

#[test]
fn topk_tv_by_hand() {
    // Masses summing to 1: P = (.5, .3, .2), Q = (.4, .4, .2): rests 0, TV = (.1 + .1)/2.
    let p = [ln(0.5), ln(0.3), ln(0.2)];
    let q = [ln(0.4), ln(0.4), ln(0.2)];
    assert_relative_eq!(topk_tv(&p, &q), 0.1, max_relative = 1e-12);
    // K = 1: P = .7, Q = .4; rests .3 and .6: (.3 + .3)/2 = .3.
    assert_relative_eq!(topk_tv(&[ln(0.7)], &[ln(0.4)]), 0.3, max_relative = 1e-12);
    // Probability 1 on both sides.
    assert_eq!(topk_tv(&[0.0], &[0.0]), 0.0);
    // K = 1, P = 1, Q = 0.2: all of Q's rest (0.8) is the difference: (0.8 + 0.8)/2.
    assert_relative_eq!(topk_tv(&[0.0], &[ln(0.2)]), 0.8, max_relative = 1e-12);
}

#[test]
fn topk_kl_by_hand() {
    // K = 1: 0.7·ln(0.7/0.4) + 0.3·ln(0.3/0.6).
    let want = 0.7 * ln(0.7 / 0.4) + 0.3 * ln(0.5);
    assert_relative_eq!(topk_kl(&[ln(0.7)], &[ln(0.4)]), want, max_relative = 1e-12);
    // Masses summing to 1 (P_rest = 0, no rest term): 0.5·ln(.5/.9) + 0.5·ln(.5/.1).
    let want = 0.5 * ln(0.5 / 0.9) + 0.5 * ln(5.0);
    assert_relative_eq!(
        topk_kl(&[ln(0.5), ln(0.5)], &[ln(0.9), ln(0.1)]),
        want,
        max_relative = 1e-12
    );
    // Q puts all its mass on the K tokens (Q_rest = 0): the 1e-12 floor.
    // 0.5·ln(0.5/1) + 0.5·(ln 0.5 − ln 1e-12).
    let want = 0.5 * ln(0.5) + 0.5 * (ln(0.5) - ln(1e-12));
    assert_relative_eq!(topk_kl(&[ln(0.5)], &[0.0]), want, max_relative = 1e-12);
    assert_eq!(topk_kl(&[0.0], &[0.0]), 0.0);
}

/// Through the engine: top-K arrays, a log-prob in (0, 1e-4] read as 0, and padding
/// holding NaN.
#[test]
fn engine_reads_topk_and_tolerance() {
    let (b, l, k) = (1, 3, 2);
    let mut old = Array3::<f64>::from_elem((b, l, k), f64::NAN);
    let mut new = Array3::<f64>::from_elem((b, l, k), f64::NAN);
    // Slot 0: P = (.5, .5), Q = (.9, .1). Slot 1: P = (1, tiny) written as 5e-5 > 0.
    for (kk, (po, pn)) in [(0.5, 0.9), (0.5, 0.1)].into_iter().enumerate() {
        old[[0, 0, kk]] = ln(po);
        new[[0, 0, kk]] = ln(pn);
    }
    old[[0, 1, 0]] = 5e-5; // read as log 1 = 0
    old[[0, 1, 1]] = ln(1e-20);
    new[[0, 1, 0]] = ln(0.5);
    new[[0, 1, 1]] = ln(1e-20);
    let logp = Array2::from_shape_vec((1, 3), vec![ln(0.9), 5e-5, f64::NAN]).unwrap();
    let logp_old = Array2::from_shape_vec((1, 3), vec![ln(0.5), 0.0, f64::NAN]).unwrap();
    let mask = Array2::from_shape_vec((1, 3), vec![true, true, false]).unwrap();
    let adv = Array1::from_elem(1, 1.0);
    let batch = Batch::new(&logp, &logp_old, &adv, &mask)
        .unwrap()
        .with_topk(&old, &new)
        .unwrap();
    let rule = Rule::None;
    let kl = trust_region(Divergence::TopkKl, &rule, &batch, Par::Seq).unwrap();
    assert_relative_eq!(
        kl.outputs.divergence[[0, 0]],
        0.5 * ln(0.5 / 0.9) + 0.5 * ln(5.0),
        max_relative = 1e-12
    );
    // Slot 1: P = (1, 1e-20), Q = (.5, 1e-20): 1·ln(1/.5) + 1e-20·0 + rest 0.
    assert_relative_eq!(kl.outputs.divergence[[0, 1]], ln(2.0), max_relative = 1e-12);
    let tv = trust_region(Divergence::TopkTv, &rule, &batch, Par::Seq).unwrap();
    assert_relative_eq!(tv.outputs.divergence[[0, 0]], 0.4, max_relative = 1e-12);
    assert_relative_eq!(tv.outputs.divergence[[0, 1]], 0.5, max_relative = 1e-12);
    // Binary forms on the same batch: slot 1 has p = q = 1 (5e-5 read as 0).
    let btv = trust_region(Divergence::BinaryTv, &rule, &batch, Par::Seq).unwrap();
    assert_relative_eq!(btv.outputs.divergence[[0, 0]], 0.4, max_relative = 1e-12);
    assert_eq!(btv.outputs.divergence[[0, 1]], 0.0);
    assert_eq!(btv.outputs.divergence[[0, 2]], 0.0);
}

/// Probabilities below e^−708 (subnormal, flushed to 0 by the SIMD exp): the ratio
/// must still be e^(logp − logp_old), not p/q = 0. A regression the property tests found.
#[test]
fn ratio_of_underflowing_probabilities() {
    let logp = Array2::<f64>::from_shape_vec((1, 2), vec![-709.1822569572407, -750.0]).unwrap();
    let logp_old = Array2::from_shape_vec((1, 2), vec![-707.5999250322329, -745.0]).unwrap();
    let mask = Array2::from_elem((1, 2), true);
    let adv = Array1::from_elem(1, 1.0);
    let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
    let e = cppo::evaluate(&cppo::Config::with_rule(Rule::None), &batch, Par::Seq).unwrap();
    for j in 0..2 {
        let rho = (logp[[0, j]] - logp_old[[0, j]]).exp();
        // token-mean over 2 tokens: grad = −ρ A / 2.
        assert_relative_eq!(e.outputs.grad[[0, j]], -rho / 2.0, max_relative = 1e-14);
    }
}
