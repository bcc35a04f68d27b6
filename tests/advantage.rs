//! Tests of `cppo::advantage`: hand-computed values for every estimator (the arithmetic
//! is in the comments), the edge cases of the module docs (groups of one, all-equal
//! scores, empty rows, holes, whitening of zero or one token, empty batches, extreme
//! magnitudes), input validation, and properties under proptest:
//!
//! - GRPO and Dr. GRPO advantages of each group sum to ~0, and GRPO's with ε = 0 have
//!   Σ A² = G − ddof;
//! - RLOO equals G/(G − 1) times Dr. GRPO's mean-centred scores;
//! - GAE with λ = 1 equals the discounted returns minus the values, with λ = 0 the TD
//!   errors; its returns are A + V; `gae` is `whiten` of `gae_raw`;
//! - whitening gives mean 0 and variance σ²/(σ² + 10⁻⁸) over the mask;
//! - REINFORCE++ is `whiten` of `discounted_returns`, bit for bit;
//! - permuting rows permutes every result; renaming group ids changes nothing;
//! - masked positions are never read: garbage there, or extra masked columns (holes),
//!   change no bit of the results at response positions;
//! - every estimator agrees with a plain transcription of verl's `core_algos.py` (GAE,
//!   GRPO, RLOO, REINFORCE++ on masks without holes, `masked_whiten`).

use cppo::advantage::{
    GroupNorm, WHITEN_EPS, discounted_returns, gae, gae_raw, grpo, reinforce_pp, rloo, whiten,
};
use cppo::ndarray::{Array2, ArrayView2, array, s};
use cppo::{At, Error};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// |a − b| ≤ tol · (1 + max(|a|, |b|)).
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[track_caller]
fn assert_all_close<'a>(
    got: impl IntoIterator<Item = &'a f64>,
    want: impl IntoIterator<Item = &'a f64>,
    tol: f64,
) {
    let (got, want): (Vec<f64>, Vec<f64>) = (
        got.into_iter().copied().collect(),
        want.into_iter().copied().collect(),
    );
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            close(*g, *w, tol),
            "at {i}: got {g}, want {w}\n{got:?}\n{want:?}"
        );
    }
}

const EPS: f64 = 1e-6;

/// A (b, l) mask of response tokens only.
fn all_on(b: usize, l: usize) -> Array2<bool> {
    Array2::from_elem((b, l), true)
}

// ---------------------------------------------------------------------------------------
// GRPO and Dr. GRPO
// ---------------------------------------------------------------------------------------

#[test]
fn grpo_hand_computed_interleaved_groups() {
    // Prompt 7: rows 0, 2, 4, scores 1, 2, 3: mean 2, deviations −1, 0, 1,
    //   unbiased σ = √((1 + 0 + 1) / 2) = 1, biased σ = √(2/3).
    // Prompt 9: rows 1, 3, scores 5, 3: mean 4, deviations 1, −1,
    //   unbiased σ = √((1 + 1) / 1) = √2, biased σ = √(2/2) = 1.
    let scores = [1.0, 5.0, 2.0, 3.0, 3.0];
    let groups = [7, 9, 7, 9, 7];
    let s2 = 2f64.sqrt();

    let a = grpo(&scores, &groups, GroupNorm::GRPO).unwrap();
    let want = [
        -1.0 / (1.0 + EPS),
        1.0 / (s2 + EPS),
        0.0,
        -1.0 / (s2 + EPS),
        1.0 / (1.0 + EPS),
    ];
    assert_all_close(&a, &want, 1e-15);

    let biased = GroupNorm {
        unbiased_std: false,
        ..GroupNorm::GRPO
    };
    let a = grpo(&scores, &groups, biased).unwrap();
    let b7 = (2.0f64 / 3.0).sqrt();
    let want = [
        -1.0 / (b7 + EPS),
        1.0 / (1.0 + EPS),
        0.0,
        -1.0 / (1.0 + EPS),
        1.0 / (b7 + EPS),
    ];
    assert_all_close(&a, &want, 1e-15);

    // Dr. GRPO: the deviations themselves.
    let a = grpo(&scores, &groups, GroupNorm::DR_GRPO).unwrap();
    assert_eq!(a, [-1.0, 1.0, 0.0, -1.0, 1.0]);
}

#[test]
fn grpo_hand_computed_binary_rewards() {
    // Pass/fail rewards 1, 0, 0, 1, 1 (a typical RLVR group): mean 0.6, deviations
    // 0.4, −0.6, −0.6, 0.4, 0.4; Σ d² = 3 · 0.16 + 2 · 0.36 = 1.2; σ = √(1.2 / 4) = √0.3.
    let a = grpo(&[1.0, 0.0, 0.0, 1.0, 1.0], &[3; 5], GroupNorm::GRPO).unwrap();
    let s = 0.3f64.sqrt() + EPS;
    assert_all_close(&a, &[0.4 / s, -0.6 / s, -0.6 / s, 0.4 / s, 0.4 / s], 1e-14);
    // ε = 1e-4 (TRL's): the denominator changes by exactly ε.
    let trl = GroupNorm {
        eps: 1e-4,
        ..GroupNorm::GRPO
    };
    let a = grpo(&[1.0, 0.0], &[0, 0], trl).unwrap();
    // mean 0.5, σ = √((0.25 + 0.25) / 1) = √0.5
    let s = 0.5f64.sqrt() + 1e-4;
    assert_all_close(&a, &[0.5 / s, -0.5 / s], 1e-15);
}

#[test]
fn grpo_group_of_one_is_verls_mean_0_std_1() {
    // verl: a lone sample gets mean 0 and σ 1, so its advantage is r / (1 + ε).
    let scores = [0.7, 1.0, 3.0, -2.5];
    let groups = [1, 2, 2, 3];
    let a = grpo(&scores, &groups, GroupNorm::GRPO).unwrap();
    // group 2: 1, 3 → mean 2, σ = √2
    let s2 = 2f64.sqrt() + EPS;
    assert_all_close(
        &a,
        &[0.7 / (1.0 + EPS), -1.0 / s2, 1.0 / s2, -2.5 / (1.0 + EPS)],
        1e-15,
    );
    let biased = GroupNorm {
        unbiased_std: false,
        ..GroupNorm::GRPO
    };
    assert_eq!(grpo(&[0.7], &[0], biased).unwrap(), [0.7 / (1.0 + EPS)]);
    // Dr. GRPO and RLOO keep the score.
    assert_eq!(grpo(&[0.7], &[0], GroupNorm::DR_GRPO).unwrap(), [0.7]);
    assert_eq!(rloo(&[0.7, 2.0], &[0, 1]).unwrap(), [0.7, 2.0]);
    // ε = 0: exactly the score.
    let eps0 = GroupNorm {
        eps: 0.0,
        ..GroupNorm::GRPO
    };
    assert_eq!(grpo(&[0.7], &[0], eps0).unwrap(), [0.7]);
}

#[test]
fn all_equal_scores_give_exactly_zero() {
    // 0.1 + 0.1 + 0.1 = 0.30000000000000004 in f64, and / 3 = 0.10000000000000002: a
    // naive mean would leave deviations of ~1e-17. Centring around the first score
    // gives exactly 0, also with ε = 0 (never 0/0).
    let scores = [0.1, 0.1, 0.1, 1.0, 1.0];
    let groups = [0, 0, 0, 1, 1];
    for norm in [
        GroupNorm::GRPO,
        GroupNorm::DR_GRPO,
        GroupNorm {
            eps: 0.0,
            ..GroupNorm::GRPO
        },
        GroupNorm {
            eps: 0.0,
            unbiased_std: false,
            scale_by_std: true,
        },
    ] {
        assert_eq!(grpo(&scores, &groups, norm).unwrap(), [0.0; 5], "{norm:?}");
    }
    assert_eq!(rloo(&scores, &groups).unwrap(), [0.0; 5]);
}

#[test]
fn grpo_extreme_magnitudes() {
    // σ is computed with scaling: neither 1e-200² (underflow) nor 1e200² (overflow)
    // breaks it. Scores ±x: mean 0, σ = √(2x² / 1) = √2 x, so A = ±1/√2 with ε = 0.
    let eps0 = GroupNorm {
        eps: 0.0,
        ..GroupNorm::GRPO
    };
    let h = 0.5f64.sqrt();
    for x in [1e-200, 1e-300, 1e200, 1e300] {
        let a = grpo(&[x, -x], &[0, 0], eps0).unwrap();
        assert_all_close(&a, &[h, -h], 1e-15);
    }
    // With ε = 1e-6 and deviations of 1e-200, A ≈ d / ε ≈ 1e-194.
    let a = grpo(&[1e-200, -1e-200], &[0, 0], GroupNorm::GRPO).unwrap();
    assert!(a[0] > 0.0 && a[0] < 1e-190 && a[1] == -a[0], "{a:?}");
    // A result that does not fit in f64 is an error on the output, not inf.
    let m = f64::MAX;
    let err = grpo(&[m, -m, -m], &[0, 0, 0], GroupNorm::DR_GRPO).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { array: "advantages", at, .. } if at == At::new(0, 0)),
        "{err:?}"
    );
}

#[test]
fn empty_batches() {
    assert_eq!(grpo(&[], &[], GroupNorm::GRPO).unwrap(), Vec::<f64>::new());
    assert_eq!(rloo(&[], &[]).unwrap(), Vec::<f64>::new());
    for (b, l) in [(0, 3), (2, 0), (0, 0)] {
        let z = Array2::<f64>::zeros((b, l));
        let m = Array2::from_elem((b, l), true);
        assert_eq!(whiten(z.view(), m.view()).unwrap().dim(), (b, l));
        assert_eq!(reinforce_pp(z.view(), m.view(), 1.0).unwrap().dim(), (b, l));
        let (a, r) = gae(z.view(), z.view(), m.view(), 1.0, 1.0).unwrap();
        assert_eq!((a.dim(), r.dim()), ((b, l), (b, l)));
    }
}

// ---------------------------------------------------------------------------------------
// RLOO
// ---------------------------------------------------------------------------------------

#[test]
fn rloo_hand_computed() {
    // Group 0 (rows 0, 2, 3, 5): scores 1, 2, 3, 6. Leave-one-out baselines:
    //   row 0: (2 + 3 + 6) / 3 = 11/3 → 1 − 11/3 = −8/3
    //   row 2: (1 + 3 + 6) / 3 = 10/3 → 2 − 10/3 = −4/3
    //   row 3: (1 + 2 + 6) / 3 = 3    → 0
    //   row 5: (1 + 2 + 3) / 3 = 2    → 4
    // (= 4/3 · (r − 3): 4/3 · (−2, −1, 0, 3).)
    // Group 1 (rows 1, 4): scores 0, 1 → 0 − 1 = −1, 1 − 0 = 1.
    let a = rloo(&[1.0, 0.0, 2.0, 3.0, 1.0, 6.0], &[0, 1, 0, 0, 1, 0]).unwrap();
    assert_all_close(&a, &[-8.0 / 3.0, -1.0, -4.0 / 3.0, 0.0, 1.0, 4.0], 1e-15);
}

// ---------------------------------------------------------------------------------------
// Discounted returns and REINFORCE++
// ---------------------------------------------------------------------------------------

#[test]
fn discounted_returns_hand_computed() {
    // γ = 0.5. Row 0: outcome reward 1 at the last token: 0.25, 0.5, 1, then padding.
    // Row 1: a hole at column 1 (reward 9 there is ignored, and γ is not applied across
    // it): G_3 = 2, G_2 = −1 + 0.5 · 2 = 0, G_0 = 1 + 0.5 · 0 = 1.
    // Row 2: empty.
    let r = array![
        [0.0, 0.0, 1.0, f64::NAN],
        [1.0, 9.0, -1.0, 2.0],
        [f64::NAN, 5.0, 5.0, 5.0]
    ];
    let m = array![
        [true, true, true, false],
        [true, false, true, true],
        [false, false, false, false]
    ];
    let g = discounted_returns(r.view(), m.view(), 0.5).unwrap();
    assert_eq!(
        g,
        array![
            [0.25, 0.5, 1.0, 0.0],
            [1.0, 0.0, 0.0, 2.0],
            [0.0, 0.0, 0.0, 0.0]
        ]
    );
    // γ = 0: each token's own reward.
    let g = discounted_returns(r.view(), m.view(), 0.0).unwrap();
    assert_eq!(g.row(1), array![1.0, 0.0, -1.0, 2.0]);
}

#[test]
fn reinforce_pp_hand_computed() {
    // γ = 1. Returns: row 0: 1, 1, 1; row 1: −1, −1 (then padding); row 2 empty.
    // Over the 5 response tokens: mean 1/5 = 0.2, deviations 0.8 (×3) and −1.2 (×2),
    // Σ d² = 3 · 0.64 + 2 · 1.44 = 4.8, σ² = 4.8 / 4 = 1.2.
    let r = array![
        [0.0, 0.0, 1.0],
        [0.0, -1.0, f64::INFINITY],
        [f64::NAN, f64::NAN, f64::NAN]
    ];
    let m = array![
        [true, true, true],
        [true, true, false],
        [false, false, false]
    ];
    let a = reinforce_pp(r.view(), m.view(), 1.0).unwrap();
    let s = (1.2 + WHITEN_EPS).sqrt();
    let (p, n) = (0.8 / s, -1.2 / s);
    assert_all_close(&a, &[p, p, p, n, n, 0.0, 0.0, 0.0, 0.0], 1e-14);

    // γ = 0.5, one row: returns 0.25, 0.5, 1: mean 1.75/3 = 7/12, deviations
    // −4/12, −1/12, 5/12, Σ d² = (16 + 1 + 25)/144 = 42/144, σ² = 21/144.
    let a = reinforce_pp(array![[0.0, 0.0, 1.0]].view(), all_on(1, 3).view(), 0.5).unwrap();
    let s = (21.0f64 / 144.0 + WHITEN_EPS).sqrt();
    assert_all_close(
        &a,
        &[-4.0 / 12.0 / s, -1.0 / 12.0 / s, 5.0 / 12.0 / s],
        1e-14,
    );
}

#[test]
fn reinforce_pp_empty_rows_and_equal_returns() {
    // An empty row adds nothing to the batch statistics and gets zeros.
    let r = array![[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]];
    let m = array![[true, true, true], [true, true, false]];
    let base = reinforce_pp(r.view(), m.view(), 0.9).unwrap();
    let r2 = array![[0.0, 0.0, 1.0], [7.0, f64::NAN, 7.0], [0.0, -1.0, 0.0]];
    let m2 = array![
        [true, true, true],
        [false, false, false],
        [true, true, false]
    ];
    let with_empty = reinforce_pp(r2.view(), m2.view(), 0.9).unwrap();
    assert_eq!(with_empty.row(0), base.row(0));
    assert_eq!(with_empty.row(1), array![0.0, 0.0, 0.0]);
    assert_eq!(with_empty.row(2), base.row(1));
    // All returns equal (γ = 0 and equal rewards): exactly 0.
    let a = reinforce_pp(
        array![[0.1, 0.1], [0.1, 0.1]].view(),
        all_on(2, 2).view(),
        0.0,
    )
    .unwrap();
    assert_eq!(a, Array2::<f64>::zeros((2, 2)));
    // A single response token in the batch: 0.
    let a = reinforce_pp(array![[3.0, 1.0]].view(), array![[false, true]].view(), 1.0).unwrap();
    assert_eq!(a, array![[0.0, 0.0]]);
}

// ---------------------------------------------------------------------------------------
// GAE
// ---------------------------------------------------------------------------------------

#[test]
fn gae_raw_hand_computed() {
    // γ = 0.9, λ = 0.8, γλ = 0.72. Row 0: rewards 0, 0, 1; values 0.5, 0.6, 0.8.
    //   t = 2: δ = 1 + 0.9 · 0 − 0.8 = 0.2;        A = 0.2
    //   t = 1: δ = 0 + 0.9 · 0.8 − 0.6 = 0.12;     A = 0.12 + 0.72 · 0.2 = 0.264
    //   t = 0: δ = 0 + 0.9 · 0.6 − 0.5 = 0.04;     A = 0.04 + 0.72 · 0.264 = 0.23008
    //   R = A + V = 0.73008, 0.864, 1.0
    // Row 1: the same response with a hole at column 1 (an observation: its reward and
    // value are NaN and must be skipped) and padding at column 4.
    // Row 2: empty.
    let nan = f64::NAN;
    let r = array![
        [0.0, 0.0, 1.0, 0.0, 0.0],
        [0.0, nan, 0.0, 1.0, nan],
        [nan, nan, nan, nan, nan]
    ];
    let v = array![
        [0.5, 0.6, 0.8, 0.0, 0.0],
        [0.5, nan, 0.6, 0.8, nan],
        [nan, nan, nan, nan, nan]
    ];
    let m = array![
        [true, true, true, false, false],
        [true, false, true, true, false],
        [false, false, false, false, false]
    ];
    let (a, ret) = gae_raw(r.view(), v.view(), m.view(), 0.9, 0.8).unwrap();
    let want_a = [0.23008, 0.264, 0.2];
    let want_r = [0.73008, 0.864, 1.0];
    assert_all_close(a.slice(s![0, ..3]), &want_a, 1e-14);
    assert_all_close(ret.slice(s![0, ..3]), &want_r, 1e-14);
    assert_all_close(a.slice(s![1, ..]), &[0.23008, 0.0, 0.264, 0.2, 0.0], 1e-14);
    assert_all_close(
        ret.slice(s![1, ..]),
        &[0.73008, 0.0, 0.864, 1.0, 0.0],
        1e-14,
    );
    // The hole row is the plain row shifted, bit for bit.
    assert_eq!(a[[1, 0]], a[[0, 0]]);
    assert_eq!(a.slice(s![1, 2..4]), a.slice(s![0, 1..3]));
    assert_eq!(a.slice(s![0, 3..]), array![0.0, 0.0]);
    assert_eq!(a.row(2), Array2::<f64>::zeros((1, 5)).row(0));
    assert_eq!(ret.row(2), Array2::<f64>::zeros((1, 5)).row(0));
}

#[test]
fn gae_whitens_the_advantages() {
    // Raw A = 0.23008, 0.264, 0.2 (above): mean 0.69408 / 3 = 0.23136, deviations
    // −0.00128, 0.03264, −0.03136; Σ d² = 1.6384e-6 + 1.0653696e-3 + 9.834496e-4
    // = 2.0504576e-3; σ² = 1.0252288e-3. Returns are not whitened.
    let r = array![[0.0, 0.0, 1.0]];
    let v = array![[0.5, 0.6, 0.8]];
    let m = array![[true, true, true]];
    let (a, ret) = gae(r.view(), v.view(), m.view(), 0.9, 0.8).unwrap();
    let s = (1.0252288e-3 + WHITEN_EPS).sqrt();
    assert_all_close(&a, &[-0.00128 / s, 0.03264 / s, -0.03136 / s], 1e-10);
    assert_all_close(&ret, &[0.73008, 0.864, 1.0], 1e-14);
}

#[test]
fn gae_special_parameters() {
    // γ = 1, λ = 1: A_t = Σ_{k≥t} r_k − V_t. Rewards 1, 2, 3; values 1, 1, 1:
    // returns-to-go 6, 5, 3 → A = 5, 4, 2.
    let r = array![[1.0, 2.0, 3.0]];
    let v = array![[1.0, 1.0, 1.0]];
    let m = array![[true, true, true]];
    let (a, ret) = gae_raw(r.view(), v.view(), m.view(), 1.0, 1.0).unwrap();
    assert_eq!(a, array![[5.0, 4.0, 2.0]]);
    assert_eq!(ret, array![[6.0, 5.0, 3.0]]);
    // λ = 0: the TD errors δ_t = r_t + V_{t+1} − V_t = 1, 2, 2 (V after the end is 0).
    let (a, _) = gae_raw(r.view(), v.view(), m.view(), 1.0, 0.0).unwrap();
    assert_eq!(a, array![[1.0, 2.0, 2.0]]);
    // γ = 0: δ_t = r_t − V_t whatever λ.
    let (a, _) = gae_raw(r.view(), v.view(), m.view(), 0.0, 0.7).unwrap();
    assert_eq!(a, array![[0.0, 1.0, 2.0]]);
}

// ---------------------------------------------------------------------------------------
// Whitening
// ---------------------------------------------------------------------------------------

#[test]
fn whiten_hand_computed() {
    // Response tokens 1, 2, 3 (the NaN is padding): mean 2, σ² = (1 + 0 + 1) / 2 = 1.
    let x = array![[1.0, 2.0], [3.0, f64::NAN]];
    let m = array![[true, true], [true, false]];
    let w = whiten(x.view(), m.view()).unwrap();
    let s = (1.0 + WHITEN_EPS).sqrt();
    assert_eq!(w, array![[-1.0 / s, 0.0], [1.0 / s, 0.0]]);
    // Tokens 0, 0, 0, 4: mean 1, deviations −1, −1, −1, 3, σ² = (3 + 9) / 3 = 4.
    let w = whiten(array![[0.0, 0.0, 0.0, 4.0]].view(), all_on(1, 4).view()).unwrap();
    let s = (4.0 + WHITEN_EPS).sqrt();
    assert_all_close(&w, &[-1.0 / s, -1.0 / s, -1.0 / s, 3.0 / s], 1e-15);
}

#[test]
fn whiten_edge_cases() {
    let nan = f64::NAN;
    // Zero tokens: all zeros (verl raises).
    let w = whiten(array![[nan, 1.0]].view(), array![[false, false]].view()).unwrap();
    assert_eq!(w, array![[0.0, 0.0]]);
    // One token: x − μ = 0 (verl divides by N − 1 = 0).
    let w = whiten(
        array![[nan, 5.0], [nan, nan]].view(),
        array![[false, true], [false, false]].view(),
    )
    .unwrap();
    assert_eq!(w, Array2::<f64>::zeros((2, 2)));
    // All equal, where a naive mean is off by an ulp: exactly 0.
    let w = whiten(array![[0.1, 0.1, 0.1]].view(), all_on(1, 3).view()).unwrap();
    assert_eq!(w, array![[0.0, 0.0, 0.0]]);
    // Variance far below 1e-8: the floor dominates, x̂ ≈ d / 1e-4.
    let w = whiten(array![[0.0, 2e-9]].view(), all_on(1, 2).view()).unwrap();
    // mean 1e-9, d = ∓1e-9, σ² = 2e-18: x̂ = ∓1e-9 / √(1e-8 + 2e-18)
    let s = (WHITEN_EPS + 2e-18f64).sqrt();
    assert_all_close(&w, &[-1e-9 / s, 1e-9 / s], 1e-12);
    // Huge values (d² would overflow): still ±1/√2.
    let w = whiten(array![[1e300, -1e300]].view(), all_on(1, 2).view()).unwrap();
    let h = 0.5f64.sqrt();
    assert_all_close(&w, &[h, -h], 1e-15);
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_parameters() {
    let z = Array2::<f64>::zeros((2, 3));
    let m = Array2::from_elem((2, 3), true);
    for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let is_cfg =
            |e: Error, f: &str| matches!(e, Error::InvalidConfig { field, .. } if field == f);
        assert!(is_cfg(
            reinforce_pp(z.view(), m.view(), bad).unwrap_err(),
            "gamma"
        ));
        assert!(is_cfg(
            discounted_returns(z.view(), m.view(), bad).unwrap_err(),
            "gamma"
        ));
        assert!(is_cfg(
            gae(z.view(), z.view(), m.view(), bad, 0.9).unwrap_err(),
            "gamma"
        ));
        assert!(is_cfg(
            gae_raw(z.view(), z.view(), m.view(), 0.9, bad).unwrap_err(),
            "lam"
        ));
        assert!(is_cfg(
            gae(z.view(), z.view(), m.view(), 1.0, bad).unwrap_err(),
            "lam"
        ));
    }
    for eps in [-1e-6, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let norm = GroupNorm {
            eps,
            ..GroupNorm::GRPO
        };
        let err = grpo(&[1.0], &[0], norm).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "eps", .. }),
            "{err:?}"
        );
        assert!(norm.validate().is_err());
    }
    // The bounds themselves are valid.
    for g in [0.0, 1.0] {
        gae(z.view(), z.view(), m.view(), g, g).unwrap();
    }
    let err = gae(z.view(), z.view(), m.view(), 1.5, 0.9).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config field gamma: must be in [0, 1], got 1.5"
    );
}

#[test]
fn invalid_shapes() {
    let err = grpo(&[1.0, 2.0, 3.0], &[0, 0], GroupNorm::GRPO).unwrap_err();
    assert_eq!(
        err,
        Error::ShapeMismatch {
            array: "groups",
            expected: "(3,), as scores".into(),
            got: vec![2]
        }
    );
    assert!(matches!(
        rloo(&[1.0], &[0, 0]).unwrap_err(),
        Error::ShapeMismatch {
            array: "groups",
            ..
        }
    ));

    let z = Array2::<f64>::zeros((2, 3));
    let m = Array2::from_elem((2, 3), true);
    let m_bad = Array2::from_elem((2, 4), true);
    let z_bad = Array2::<f64>::zeros((3, 3));
    let err = reinforce_pp(z.view(), m_bad.view(), 1.0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mask has shape [2, 4], expected (2, 3), as token_rewards"
    );
    let err = gae(z.view(), z_bad.view(), m.view(), 1.0, 1.0).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { array: "values", ref got, .. } if *got == [3, 3]));
    let err = gae_raw(z.view(), z.view(), m_bad.view(), 1.0, 1.0).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { array: "mask", .. }));
    let err = whiten(z.view(), m_bad.view()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mask has shape [2, 4], expected (2, 3), as x"
    );
    // A bad parameter is reported before a bad shape.
    let err = gae(z.view(), z_bad.view(), m.view(), 2.0, 1.0).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { field: "gamma", .. }));
}

#[test]
fn invalid_values() {
    // Scores: the first non-finite one, at column 0.
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = grpo(&[1.0, bad, f64::NAN], &[0, 0, 1], GroupNorm::GRPO).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { array: "scores", at, value } if at == At::new(1, 0) && (value == bad || value.is_nan())),
            "{err:?}"
        );
        let err = rloo(&[bad], &[0]).unwrap_err();
        assert!(matches!(
            err,
            Error::NonFinite {
                array: "scores",
                ..
            }
        ));
    }
    let err = grpo(&[f64::INFINITY], &[0], GroupNorm::DR_GRPO).unwrap_err();
    assert_eq!(
        err.to_string(),
        "scores at row 0, column 0 is inf, not a finite number"
    );

    // Token arrays: the first bad value at a response position in row-major order; within
    // a token, rewards before values. Garbage at masked positions is fine.
    let nan = f64::NAN;
    let m = array![[true, false, true], [true, true, false]];
    let r = array![[0.0, nan, 0.0], [0.0, nan, nan]];
    let v = array![[0.0, nan, f64::INFINITY], [0.0, nan, 0.0]];
    let err = gae(r.view(), v.view(), m.view(), 1.0, 1.0).unwrap_err();
    assert_eq!(
        err,
        Error::NonFinite {
            array: "values",
            at: At::new(0, 2),
            value: f64::INFINITY
        }
    );
    let v_ok = array![[0.0, nan, 0.0], [0.0, nan, nan]];
    let err = gae_raw(r.view(), v_ok.view(), m.view(), 1.0, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { array: "token_rewards", at, .. } if at == At::new(1, 1))
    );
    let v_bad = array![[0.0, nan, 0.0], [0.0, nan, nan]];
    let r_bad = array![[0.0, 1.0, 0.0], [0.0, nan, 0.0]];
    let err = gae(r_bad.view(), v_bad.view(), m.view(), 1.0, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { array: "token_rewards", at, .. } if at == At::new(1, 1))
    );
    let err = reinforce_pp(r.view(), m.view(), 1.0).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { array: "token_rewards", at, .. } if at == At::new(1, 1))
    );
    let err = whiten(r.view(), m.view()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { array: "x", at, .. } if at == At::new(1, 1)));
    // The same arrays with that token masked out are fine.
    let m_ok = array![[true, false, true], [true, false, false]];
    reinforce_pp(r.view(), m_ok.view(), 1.0).unwrap();
    gae(r.view(), v_ok.view(), m_ok.view(), 1.0, 1.0).unwrap();
    whiten(r.view(), m_ok.view()).unwrap();
}

#[test]
fn overflow_is_an_error_not_inf() {
    // Returns of MAX + MAX overflow.
    let r = array![[f64::MAX, f64::MAX]];
    let m = array![[true, true]];
    let err = discounted_returns(r.view(), m.view(), 1.0).unwrap_err();
    assert!(matches!(err, Error::NonFinite { array: "returns", at, .. } if at == At::new(0, 0)));
    let err = reinforce_pp(r.view(), m.view(), 1.0).unwrap_err();
    assert!(matches!(
        err,
        Error::NonFinite {
            array: "returns",
            ..
        }
    ));
    let v = array![[-f64::MAX, 0.0]];
    let err = gae_raw(r.view(), v.view(), m.view(), 0.0, 0.0).unwrap_err();
    assert!(matches!(err, Error::NonFinite { array: "advantages", at, .. } if at == At::new(0, 0)));
    // x − μ overflows.
    let err = whiten(
        array![[f64::MAX, -f64::MAX, -f64::MAX]].view(),
        all_on(1, 3).view(),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::NonFinite {
            array: "whitened",
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------
// GroupNorm as a config
// ---------------------------------------------------------------------------------------

#[test]
fn group_norm_presets_and_serde() {
    assert_eq!(
        GroupNorm::GRPO,
        GroupNorm {
            scale_by_std: true,
            unbiased_std: true,
            eps: 1e-6
        }
    );
    assert_eq!(
        GroupNorm::DR_GRPO,
        GroupNorm {
            scale_by_std: false,
            ..GroupNorm::GRPO
        }
    );
    assert_eq!(GroupNorm::default(), GroupNorm::GRPO);
    let json = serde_json::to_string(&GroupNorm::DR_GRPO).unwrap();
    assert_eq!(
        json,
        r#"{"scale_by_std":false,"unbiased_std":true,"eps":1e-6}"#
    );
    let back: GroupNorm = serde_json::from_str(&json).unwrap();
    assert_eq!(back, GroupNorm::DR_GRPO);
    let unknown = r#"{"scale_by_std":true,"unbiased_std":true,"eps":1e-6,"epsilon":1}"#;
    assert!(serde_json::from_str::<GroupNorm>(unknown).is_err());
}

// ---------------------------------------------------------------------------------------
// References transcribed from verl's core_algos.py (plain loops, finite padding)
// ---------------------------------------------------------------------------------------

/// verl's `compute_gae_advantage_return` before its whitening, with the mask as 0/1
/// multipliers (so padding must be finite).
fn verl_gae(
    r: ArrayView2<f64>,
    v: ArrayView2<f64>,
    m: ArrayView2<bool>,
    g: f64,
    l: f64,
) -> (Array2<f64>, Array2<f64>) {
    let (b, len) = r.dim();
    let mut adv = Array2::zeros((b, len));
    for i in 0..b {
        let (mut nextvalues, mut lastgaelam) = (0.0, 0.0);
        for t in (0..len).rev() {
            let mt = f64::from(u8::from(m[[i, t]]));
            let delta = r[[i, t]] + g * nextvalues - v[[i, t]];
            let lastgaelam_ = delta + g * l * lastgaelam;
            nextvalues = v[[i, t]] * mt + (1.0 - mt) * nextvalues;
            lastgaelam = lastgaelam_ * mt + (1.0 - mt) * lastgaelam;
            adv[[i, t]] = lastgaelam;
        }
    }
    let ret = &adv + &v;
    (adv, ret)
}

/// verl's `compute_reinforce_plus_plus_outcome_advantage` returns, before whitening.
fn verl_returns(r: ArrayView2<f64>, m: ArrayView2<bool>, g: f64) -> Array2<f64> {
    let (b, len) = r.dim();
    let mut out = Array2::zeros((b, len));
    for i in 0..b {
        let mut running = 0.0;
        for t in (0..len).rev() {
            running = r[[i, t]] + g * running;
            out[[i, t]] = running;
            running *= f64::from(u8::from(m[[i, t]]));
        }
    }
    out
}

/// verl's `masked_whiten` (N ≥ 2).
fn verl_whiten(x: ArrayView2<f64>, m: ArrayView2<bool>) -> Array2<f64> {
    let on: Vec<f64> = x
        .iter()
        .zip(m)
        .filter(|&(_, &m)| m)
        .map(|(&x, _)| x)
        .collect();
    let n = on.len() as f64;
    let mean = on.iter().sum::<f64>() / n;
    let var = on.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n * (n / (n - 1.0));
    x.mapv(|x| (x - mean) / (var + 1e-8).sqrt())
}

/// verl's `compute_grpo_outcome_advantage` (and Dr. GRPO, and the biased switch).
fn verl_grpo(scores: &[f64], groups: &[u64], norm: GroupNorm) -> Vec<f64> {
    scores
        .iter()
        .zip(groups)
        .map(|(&x, &g)| {
            let xs: Vec<f64> = scores
                .iter()
                .zip(groups)
                .filter(|&(_, &h)| h == g)
                .map(|(&x, _)| x)
                .collect();
            let n = xs.len() as f64;
            let (mean, std) = if xs.len() == 1 {
                (0.0, 1.0)
            } else {
                let mean = xs.iter().sum::<f64>() / n;
                let ddof = if norm.unbiased_std { 1.0 } else { 0.0 };
                let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - ddof);
                (mean, var.sqrt())
            };
            if !norm.scale_by_std {
                x - mean
            } else if std + norm.eps == 0.0 {
                // verl: 0 / 0 = NaN for equal scores and ε = 0; here 0 (documented).
                0.0
            } else {
                (x - mean) / (std + norm.eps)
            }
        })
        .collect()
}

/// verl's `compute_rloo_outcome_advantage`.
fn verl_rloo(scores: &[f64], groups: &[u64]) -> Vec<f64> {
    scores
        .iter()
        .zip(groups)
        .map(|(&x, &g)| {
            let xs: Vec<f64> = scores
                .iter()
                .zip(groups)
                .filter(|&(_, &h)| h == g)
                .map(|(&x, _)| x)
                .collect();
            let n = xs.len() as f64;
            if xs.len() == 1 {
                x
            } else {
                let mean = xs.iter().sum::<f64>() / n;
                x * n / (n - 1.0) - mean * n / (n - 1.0)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// Scores with group ids drawn from a few prompts (so groups of one, of several, and
/// interleaved), with repeated values so that all-equal groups occur.
fn scored_groups() -> impl Strategy<Value = (Vec<f64>, Vec<u64>)> {
    prop::collection::vec(
        (
            prop_oneof![
                3 => -10.0..10.0f64,
                1 => prop::sample::select(vec![0.0, 1.0, 0.5]),
            ],
            0u64..6,
        ),
        0..24,
    )
    .prop_map(|v| v.into_iter().unzip())
}

fn group_norm() -> impl Strategy<Value = GroupNorm> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![0.0, 1e-6, 1e-4, 0.5]),
    )
        .prop_map(|(scale_by_std, unbiased_std, eps)| GroupNorm {
            scale_by_std,
            unbiased_std,
            eps,
        })
}

/// A token batch: rewards, values, mask (ragged rows, holes, empty rows), with garbage
/// (NaN, ±inf, huge) at the masked positions, and the same batch with finite padding.
#[derive(Clone, Debug)]
struct Tokens {
    r: Array2<f64>,
    v: Array2<f64>,
    m: Array2<bool>,
    r_clean: Array2<f64>,
    v_clean: Array2<f64>,
}

fn tokens() -> impl Strategy<Value = Tokens> {
    (0usize..7, 0usize..9).prop_flat_map(|(b, l)| {
        let n = b * l;
        (
            prop::collection::vec(-3.0..3.0f64, n),
            prop::collection::vec(-3.0..3.0f64, n),
            prop::collection::vec(prop::bool::weighted(0.7), n),
            prop::collection::vec(
                prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, 0.0]),
                n,
            ),
        )
            .prop_map(move |(r, v, m, junk)| {
                let r_clean = Array2::from_shape_vec((b, l), r).unwrap();
                let v_clean = Array2::from_shape_vec((b, l), v).unwrap();
                let m = Array2::from_shape_vec((b, l), m).unwrap();
                let junk = Array2::from_shape_vec((b, l), junk).unwrap();
                let dirty = |a: &Array2<f64>| {
                    let mut a = a.clone();
                    cppo::ndarray::Zip::from(&mut a)
                        .and(&m)
                        .and(&junk)
                        .for_each(|a, &m, &j| {
                            if !m {
                                *a = j;
                            }
                        });
                    a
                };
                Tokens {
                    r: dirty(&r_clean),
                    v: dirty(&v_clean),
                    m,
                    r_clean,
                    v_clean,
                }
            })
    })
}

/// `a` with its rows in the order `perm`.
fn permute_rows(a: &Array2<f64>, perm: &[usize]) -> Array2<f64> {
    a.select(cppo::ndarray::Axis(0), perm)
}

fn permute_rows_bool(a: &Array2<bool>, perm: &[usize]) -> Array2<bool> {
    a.select(cppo::ndarray::Axis(0), perm)
}

/// Whether any row of `m` has a masked position before a response token (a hole).
fn has_holes(m: &Array2<bool>) -> bool {
    m.rows()
        .into_iter()
        .any(|row| row.iter().skip_while(|&&x| x).any(|&x| x))
}

/// A mask's response-token count.
fn count(m: &Array2<bool>) -> usize {
    m.iter().filter(|&&x| x).count()
}

/// Failures persist in `proptest-regressions/advantage.txt` at the crate root, as for
/// the other property tests.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/advantage.txt"
        )))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn grpo_groups_sum_to_zero((scores, groups) in scored_groups(), norm in group_norm()) {
        let a = grpo(&scores, &groups, norm).unwrap();
        for g in 0..6u64 {
            let rows: Vec<usize> = (0..scores.len()).filter(|&i| groups[i] == g).collect();
            if rows.len() < 2 {
                continue;
            }
            let sum: f64 = rows.iter().map(|&i| a[i]).sum();
            prop_assert!(sum.abs() < 1e-12 * rows.len() as f64, "group {g}: {sum}");
            // With ε = 0 and some spread, Σ A² = Σ d² / σ² = G − ddof.
            let spread = rows.iter().any(|&i| scores[i] != scores[rows[0]]);
            if norm.scale_by_std && norm.eps == 0.0 && spread {
                let ss: f64 = rows.iter().map(|&i| a[i] * a[i]).sum();
                let want = rows.len() as f64 - f64::from(u8::from(norm.unbiased_std));
                prop_assert!(close(ss, want, 1e-12), "group {g}: Σ A² = {ss}, want {want}");
            }
        }
    }

    #[test]
    fn grpo_and_rloo_match_verl((scores, groups) in scored_groups(), norm in group_norm()) {
        let a = grpo(&scores, &groups, norm).unwrap();
        assert_all_close(&a, &verl_grpo(&scores, &groups, norm), 1e-12);
        let a = rloo(&scores, &groups).unwrap();
        assert_all_close(&a, &verl_rloo(&scores, &groups), 1e-12);
    }

    #[test]
    fn rloo_is_scaled_dr_grpo((scores, groups) in scored_groups()) {
        let r = rloo(&scores, &groups).unwrap();
        let d = grpo(&scores, &groups, GroupNorm::DR_GRPO).unwrap();
        for i in 0..scores.len() {
            let g = groups.iter().filter(|&&h| h == groups[i]).count();
            if g == 1 {
                prop_assert_eq!(r[i], scores[i]);
                prop_assert_eq!(d[i], scores[i]);
            } else {
                let k = g as f64 / (g - 1) as f64;
                prop_assert!(close(r[i], k * d[i], 1e-14), "row {}: {} vs {} · {}", i, r[i], k, d[i]);
                // and the leave-one-out definition itself
                let others: f64 = (0..scores.len())
                    .filter(|&j| j != i && groups[j] == groups[i])
                    .map(|j| scores[j])
                    .sum();
                prop_assert!(close(r[i], scores[i] - others / (g - 1) as f64, 1e-12));
            }
        }
    }

    #[test]
    fn group_estimators_commute_with_row_permutations_and_renaming(
        (scores, groups) in scored_groups(),
        norm in group_norm(),
        seed in any::<u64>(),
        salt in any::<u64>(),
    ) {
        // A permutation from the seed (Fisher–Yates with a small LCG).
        let n = scores.len();
        let mut perm: Vec<usize> = (0..n).collect();
        let mut state = seed | 1;
        for i in (1..n).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (state >> 33) as usize % (i + 1));
        }
        let ps: Vec<f64> = perm.iter().map(|&i| scores[i]).collect();
        let pg: Vec<u64> = perm.iter().map(|&i| groups[i]).collect();
        let a = grpo(&scores, &groups, norm).unwrap();
        let pa = grpo(&ps, &pg, norm).unwrap();
        let want: Vec<f64> = perm.iter().map(|&i| a[i]).collect();
        assert_all_close(&pa, &want, 1e-12);
        let a = rloo(&scores, &groups).unwrap();
        let pa = rloo(&ps, &pg).unwrap();
        let want: Vec<f64> = perm.iter().map(|&i| a[i]).collect();
        assert_all_close(&pa, &want, 1e-12);
        // Renaming the groups (a bijection of ids) changes no bit.
        let renamed: Vec<u64> = groups.iter().map(|&g| g.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt).collect();
        prop_assert_eq!(grpo(&scores, &renamed, norm).unwrap(), grpo(&scores, &groups, norm).unwrap());
        prop_assert_eq!(rloo(&scores, &renamed).unwrap(), rloo(&scores, &groups).unwrap());
    }

    #[test]
    fn padding_is_never_read(t in tokens(), gamma in 0.0..=1.0f64, lam in 0.0..=1.0f64) {
        // Garbage at masked positions changes no bit.
        let (a, r) = gae(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let (ac, rc) = gae(t.r_clean.view(), t.v_clean.view(), t.m.view(), gamma, lam).unwrap();
        prop_assert_eq!(&a, &ac);
        prop_assert_eq!(&r, &rc);
        let p = reinforce_pp(t.r.view(), t.m.view(), gamma).unwrap();
        let pc = reinforce_pp(t.r_clean.view(), t.m.view(), gamma).unwrap();
        prop_assert_eq!(&p, &pc);
        prop_assert_eq!(whiten(t.r.view(), t.m.view()).unwrap(), whiten(t.r_clean.view(), t.m.view()).unwrap());
        // And every output is 0 there.
        for out in [&a, &r, &p] {
            prop_assert!(out.iter().zip(&t.m).all(|(&x, &m)| m || x == 0.0));
        }
    }

    #[test]
    fn holes_are_skipped(t in tokens(), gamma in 0.0..=1.0f64, lam in 0.0..=1.0f64, at in 0usize..9) {
        // Inserting a masked column of NaN anywhere changes no bit at the other columns.
        let (b, l) = t.m.dim();
        let at = at.min(l);
        let widen = |a: &Array2<f64>| {
            let mut w = Array2::from_elem((b, l + 1), f64::NAN);
            w.slice_mut(s![.., ..at]).assign(&a.slice(s![.., ..at]));
            w.slice_mut(s![.., at + 1..]).assign(&a.slice(s![.., at..]));
            w
        };
        let mut wm = Array2::from_elem((b, l + 1), false);
        wm.slice_mut(s![.., ..at]).assign(&t.m.slice(s![.., ..at]));
        wm.slice_mut(s![.., at + 1..]).assign(&t.m.slice(s![.., at..]));
        let narrow = |a: &Array2<f64>| {
            let mut n = Array2::zeros((b, l));
            n.slice_mut(s![.., ..at]).assign(&a.slice(s![.., ..at]));
            n.slice_mut(s![.., at..]).assign(&a.slice(s![.., at + 1..]));
            n
        };
        let (wr, wv) = (widen(&t.r), widen(&t.v));
        let (a, r) = gae(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let (wa, wret) = gae(wr.view(), wv.view(), wm.view(), gamma, lam).unwrap();
        prop_assert_eq!(narrow(&wa), a);
        prop_assert_eq!(narrow(&wret), r);
        let p = reinforce_pp(t.r.view(), t.m.view(), gamma).unwrap();
        let wp = reinforce_pp(wr.view(), wm.view(), gamma).unwrap();
        prop_assert_eq!(narrow(&wp), p);
    }

    #[test]
    fn gae_special_cases_and_composition(t in tokens(), gamma in 0.0..=1.0f64, lam in 0.0..=1.0f64) {
        let g = discounted_returns(t.r.view(), t.m.view(), gamma).unwrap();
        // λ = 1: A = discounted return − V, and the returns are the discounted returns.
        let (a1, r1) = gae_raw(t.r.view(), t.v.view(), t.m.view(), gamma, 1.0).unwrap();
        let want = cppo::ndarray::Zip::from(&g).and(&t.v_clean).and(&t.m)
            .map_collect(|&g, &v, &m| if m { g - v } else { 0.0 });
        assert_all_close(&a1, &want, 1e-12);
        assert_all_close(&r1, &g, 1e-12);
        // λ = 0: the TD errors r_t + γ V_next − V_t, V_next over response tokens only.
        let (a0, _) = gae_raw(t.r.view(), t.v.view(), t.m.view(), gamma, 0.0).unwrap();
        for (i, row) in t.m.rows().into_iter().enumerate() {
            let on: Vec<usize> = row.iter().enumerate().filter(|&(_, &m)| m).map(|(j, _)| j).collect();
            for (k, &j) in on.iter().enumerate() {
                let next = on.get(k + 1).map_or(0.0, |&j2| t.v[[i, j2]]);
                let delta = t.r[[i, j]] + gamma * next - t.v[[i, j]];
                prop_assert!(close(a0[[i, j]], delta, 1e-14));
            }
        }
        // Returns are A + V; `gae` is `whiten` of `gae_raw`; REINFORCE++ is `whiten` of
        // the discounted returns, bit for bit.
        let (a, r) = gae_raw(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let want = cppo::ndarray::Zip::from(&a).and(&t.v_clean).and(&t.m)
            .map_collect(|&a, &v, &m| if m { a + v } else { 0.0 });
        prop_assert_eq!(&r, &want);
        let (wa, wr) = gae(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        prop_assert_eq!(wa, whiten(a.view(), t.m.view()).unwrap());
        prop_assert_eq!(wr, r);
        prop_assert_eq!(reinforce_pp(t.r.view(), t.m.view(), gamma).unwrap(), whiten(g.view(), t.m.view()).unwrap());
    }

    #[test]
    fn token_estimators_match_verl(t in tokens(), gamma in 0.0..=1.0f64, lam in 0.0..=1.0f64) {
        let (a, r) = gae_raw(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let (va, vr) = verl_gae(t.r_clean.view(), t.v_clean.view(), t.m.view(), gamma, lam);
        let on = |x: &Array2<f64>| -> Vec<f64> { x.iter().zip(&t.m).filter(|&(_, &m)| m).map(|(&x, _)| x).collect() };
        assert_all_close(&on(&a), &on(&va), 1e-12);
        assert_all_close(&on(&r), &on(&vr), 1e-12);
        if count(&t.m) >= 2 {
            let w = whiten(t.r.view(), t.m.view()).unwrap();
            assert_all_close(&on(&w), &on(&verl_whiten(t.r_clean.view(), t.m.view())), 1e-9);
            let (wa, _) = gae(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
            assert_all_close(&on(&wa), &on(&verl_whiten(va.view(), t.m.view())), 1e-9);
        }
        // verl's REINFORCE++ resets its running return at masked positions: the same
        // numbers as here when no row has a hole.
        if !has_holes(&t.m) {
            let g = discounted_returns(t.r.view(), t.m.view(), gamma).unwrap();
            assert_all_close(&on(&g), &on(&verl_returns(t.r_clean.view(), t.m.view(), gamma)), 1e-12);
        }
    }

    #[test]
    fn whitening_has_mean_zero_and_unit_variance(t in tokens(), scale in prop::sample::select(vec![1e-6, 1.0, 1e3])) {
        let x = t.r_clean.mapv(|x| x * scale);
        let w = whiten(x.view(), t.m.view()).unwrap();
        let n = count(&t.m);
        let on: Vec<f64> = w.iter().zip(&t.m).filter(|&(_, &m)| m).map(|(&x, _)| x).collect();
        let xs: Vec<f64> = x.iter().zip(&t.m).filter(|&(_, &m)| m).map(|(&x, _)| x).collect();
        if n < 2 {
            prop_assert!(w.iter().all(|&x| x == 0.0));
        } else {
            let mean = on.iter().sum::<f64>() / n as f64;
            prop_assert!(mean.abs() < 1e-12, "mean {mean}");
            let var = on.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let mx = xs.iter().sum::<f64>() / n as f64;
            let s2 = xs.iter().map(|x| (x - mx).powi(2)).sum::<f64>() / (n - 1) as f64;
            // x̂ has variance σ² / (σ² + 1e-8): 1 unless σ² is tiny.
            prop_assert!(close(var, s2 / (s2 + WHITEN_EPS), 1e-9), "var {var}, σ² {s2}");
        }
    }

    #[test]
    fn token_estimators_commute_with_row_permutations(t in tokens(), gamma in 0.0..=1.0f64, lam in 0.0..=1.0f64, seed in any::<u64>()) {
        let b = t.m.nrows();
        let mut perm: Vec<usize> = (0..b).collect();
        let mut state = seed | 1;
        for i in (1..b).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (state >> 33) as usize % (i + 1));
        }
        let (pr, pv, pm) = (permute_rows(&t.r, &perm), permute_rows(&t.v, &perm), permute_rows_bool(&t.m, &perm));
        // Row-local results: bit for bit.
        let (a, r) = gae_raw(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let (pa, pret) = gae_raw(pr.view(), pv.view(), pm.view(), gamma, lam).unwrap();
        prop_assert_eq!(pa, permute_rows(&a, &perm));
        prop_assert_eq!(pret, permute_rows(&r, &perm));
        // Batch-whitened results: the sums run in another order, so to rounding.
        let (a, _) = gae(t.r.view(), t.v.view(), t.m.view(), gamma, lam).unwrap();
        let (pa, _) = gae(pr.view(), pv.view(), pm.view(), gamma, lam).unwrap();
        assert_all_close(&pa, &permute_rows(&a, &perm), 1e-9);
        let p = reinforce_pp(t.r.view(), t.m.view(), gamma).unwrap();
        let pp = reinforce_pp(pr.view(), pm.view(), gamma).unwrap();
        assert_all_close(&pp, &permute_rows(&p, &perm), 1e-9);
    }
}
