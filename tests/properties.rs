//! Property tests of the whole engine, over random valid batches (ragged rows, holes,
//! empty rows, rows wide enough to cross the engine's column blocks, garbage in the
//! padding, per-row or per-token advantages with zeros, top-K arrays with K from 1 to 5,
//! probabilities that underflow) and random configs (every divergence, rule, objective,
//! aggregation, KL estimator and count override). Case counts are set per block below;
//! the file runs in a few seconds in debug. What is asserted:
//!
//! - **Reference**: [`evaluate`] equals the plain per-token reference of
//!   `tests/common/reference/`, written from the math: `reason` and `keep` exactly, every float
//!   output to 1e-12 relative (plus a 1e-13 absolute floor for cancellations, 1e-12 for
//!   the CPPO threshold c_t), the loss to 1e-12 of Σ|a_t l_t|. The reference itself
//!   reproduces the worked example of `tests/worked_example.rs`.
//! - **CPPO → DPPO**: CPPO with w_min = 1 and no budget (`delta_b` = None, any horizon)
//!   gives bit-identical outputs to DPPO with the same δ: every per-token output
//!   (divergence, weight = 1, threshold = δ, keep, reason, token_loss, grad) and the loss.
//! - **Budget monotonicity**: a larger δ_b (None being the largest) never masks a token
//!   that a smaller one keeps; the token-threshold decisions (reason 3) do not move.
//! - **Padding**: whatever sits at non-response positions (NaN, ±inf, positive log-probs,
//!   huge values, and the per-row advantage of an empty row) changes no output bit, nor
//!   the diagnostics. Masks of every element type with the same nonzero set give
//!   bit-identical results (−0.0 counts as zero).
//! - **Corrective bypass**: under every rule but TRM, a response token with
//!   A (ρ − 1) ≤ 0 (computed here from the inputs) is kept.
//! - **Rows**: permuting rows permutes every per-token output bit for bit, and leaves the
//!   loss equal to 1e-12 of Σ|a_t l_t| (every aggregation mode).
//! - **f32**: f32 inputs give exactly the f64 results of the same (widened) values,
//!   rounded once (the crate computes in f64); and f32-rounded inputs give the f64
//!   results within 1e-4 relative plus 1e-5 absolute (widened for huge log-probs, whose
//!   f32 rounding is large in absolute terms), except at tokens whose decision margin (a
//!   rule test, the TRM row statistic, the bypass sign, a `ppo_clip` branch) is within
//!   1e-3 relative of its threshold, where the decision may legitimately flip.
//! - **f32 exponentials** (`Numerics::F32Exp`): the results within the same tolerances
//!   of the exact engine, except at tokens within the same decision margin; and every
//!   invariant above that does not compare with the reference (CPPO → DPPO, budget
//!   monotonicity, the corrective bypass away from ρ = 1 by more than the f32 error,
//!   padding, masks, rows, f32 inputs, threads) holds under it too.
//! - **Threads**: `Par::Seq`, `Par::Rayon` and rayon pools of 1, 2 and 8 threads give
//!   bit-identical outputs, loss, diagnostics and tally, on small batches and on batches
//!   of several leaf blocks; and report the same first error.
//! - **Valid input never errors**: `evaluate`, `evaluate_into`, `trust_region` and
//!   `Batch::validate`, for f32 and f64 and every mask type.
//! - **Invalid input** returns the right [`Error`] variant naming the right array, row,
//!   column (and k) and value, never panics, and reports the first bad value in check
//!   order (row-major over tokens; within a token logp, logp_old, advantages, top-K pair,
//!   logp_ref), from `evaluate` (any scheduling, f32 and f64), `Batch::validate` and
//!   `trust_region`: non-finite values and log-probs above 1e-4 at response positions,
//!   non-finite float masks anywhere, wrong shapes, mismatched top-K widths, K = 0,
//!   missing top-K or `logp_ref`, count overrides below the batch's own counts,
//!   out-of-range config values.
//! - **Coverage**: a fixed sample of the generator hits every reason code, both
//!   `ppo_clip` clip branches and the dual-clip cap often enough for the above to mean
//!   something, and few tokens sit within the f32 margin.
//!
//! Two known deviations from "the first bad value in row-major order" are excluded from
//! the invalid-input property and kept as ignored minimal repros at the end of the file
//! (`cargo test --test properties -- --ignored`).

mod common;

use std::sync::OnceLock;

use common::*;
use cppo::budget::Calibration;
use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{
    At, Batch, Config, CppoParams, Divergence, Error, Evaluation, Float, KlEstimator, KlPenalty,
    Numerics, Objective, Outputs, Par, Rule, evaluate, evaluate_into, trust_region,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestCaseResult, TestRng, TestRunner};

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/properties.txt"
);

fn par_strategy() -> impl Strategy<Value = Par> {
    prop_oneof![Just(Par::Seq), Just(Par::Rayon)]
}

/// Every output against the reference.
fn check_reference(case: &Case<f64>, eval: &Evaluation<f64>) -> Result<(), String> {
    let r = reference(case);
    let o = &eval.outputs;
    if o.reason != r.reason {
        let at = o
            .reason
            .indexed_iter()
            .zip(r.reason.iter())
            .find(|((_, a), b)| a != b)
            .map(|((ij, a), b)| format!("{ij:?}: crate {a}, reference {b}"));
        return Err(format!("reason differs at {}", at.unwrap_or_default()));
    }
    if o.keep != r.keep {
        return Err("keep differs".into());
    }
    check_close("divergence", &o.divergence, &r.divergence, 1e-12, 1e-13)?;
    check_close("weight", &o.weight, &r.weight, 1e-12, 1e-15)?;
    check_close("threshold", &o.threshold, &r.threshold, 1e-12, 1e-12)?;
    check_close("token_loss", &o.token_loss, &r.token_loss, 1e-12, 1e-13)?;
    check_close("grad", &o.grad, &r.grad, 1e-12, 1e-13)?;
    if !close(eval.loss, r.loss, 0.0, 1e-12 * r.loss_scale) {
        return Err(format!(
            "loss {:e}, reference {:e} (scale {:e})",
            eval.loss, r.loss, r.loss_scale
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reference equivalence
// ---------------------------------------------------------------------------------------

fn check_fast_path_equals_reference(case: &Case<f64>, par: Par) -> TestCaseResult {
    let eval = case
        .eval(par)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_reference(case, &eval).map_err(TestCaseError::fail)
}

// ---------------------------------------------------------------------------------------
// Rule relations
// ---------------------------------------------------------------------------------------

fn cppo_case() -> impl Strategy<Value = Case<f64>> {
    let cfg = || config_with(cppo_strategy(), objective_strategy());
    prop_oneof![
        3 => case_with(cfg(), Shape::default()),
        1 => case_with(cfg(), wide()),
    ]
}

/// Every output and the loss, bit for bit: weight (1 for both) and threshold (δ for
/// both) included.
fn check_cppo_without_decay_or_budget_is_dppo(case: &Case<f64>) -> TestCaseResult {
    let Rule::Cppo(p) = case.cfg.rule else {
        unreachable!("cppo_case")
    };
    // Any horizon, positions and calibration (ignored without a budget).
    let mut cppo = case.clone();
    cppo.cfg.rule = Rule::Cppo(CppoParams {
        delta_b: None,
        w_min: 1.0,
        ..p
    });
    let mut dppo = case.clone();
    dppo.cfg.rule = Rule::Dppo { delta: p.delta };
    let a = cppo.eval(Par::Seq).unwrap();
    let b = dppo.eval(Par::Seq).unwrap();
    same_eval(&a, &b).map_err(TestCaseError::fail)
}

/// keep under δ_b implies keep under δ_b + more (None: no budget at all); the token
/// threshold decisions (reason 3), divergences and weights do not move.
fn check_larger_budget_never_masks_more(
    case: &Case<f64>,
    db: f64,
    more: Option<f64>,
) -> TestCaseResult {
    let Rule::Cppo(p) = case.cfg.rule else {
        unreachable!("cppo_case")
    };
    // The case's own calibration: δ_b^row = min(c δ_b, max(δ_b, k Q)) grows with δ_b.
    let with_budget = |delta_b| {
        let mut c = case.clone();
        c.cfg.rule = Rule::Cppo(CppoParams { delta_b, ..p });
        c.eval(Par::Seq).unwrap().outputs
    };
    let small = with_budget(Some(db));
    let large = with_budget(more.map(|m| db + m));
    for ((ij, &ks), &kl) in small.keep.indexed_iter().zip(large.keep.iter()) {
        prop_assert!(
            !ks || kl,
            "{ij:?} kept under delta_b {db} but masked with {more:?} more"
        );
        prop_assert_eq!(
            small.reason[ij] == 3,
            large.reason[ij] == 3,
            "token threshold decision moved at {:?}",
            ij
        );
    }
    same_bits("divergence", &small.divergence, &large.divergence).map_err(TestCaseError::fail)?;
    same_bits("weight", &small.weight, &large.weight).map_err(TestCaseError::fail)
}

/// A calibration with scale k = 0 gives δ_b^row = min(c δ_b, max(δ_b, 0)) = δ_b: the
/// fixed budget, bit for bit.
fn check_zero_scale_is_the_fixed_budget(
    case: &Case<f64>,
    db: f64,
    q: f64,
    c: f64,
) -> TestCaseResult {
    let Rule::Cppo(p) = case.cfg.rule else {
        unreachable!("cppo_case")
    };
    let with = |calibration| {
        let mut k = case.clone();
        k.cfg.rule = Rule::Cppo(CppoParams {
            delta_b: Some(db),
            calibration,
            ..p
        });
        k.eval(Par::Seq).unwrap()
    };
    let zero = Calibration {
        quantile: q,
        scale: 0.0,
        ceiling: c,
    };
    same_eval(&with(Some(zero)), &with(None)).map_err(TestCaseError::fail)
}

/// IS weights of exactly 1 change no bit; weights of 0 leave only the KL term.
fn check_unit_is_weights_change_nothing(case: &Case<f64>) -> TestCaseResult {
    let mut plain = case.clone();
    plain.is_weights = None;
    let mut ones = case.clone();
    ones.is_weights = Some(Array2::ones(case.shape()));
    let (a, b) = (plain.eval(Par::Seq).unwrap(), ones.eval(Par::Seq).unwrap());
    same_eval(&a, &b).map_err(TestCaseError::fail)?;
    let mut zeros = case.clone();
    zeros.is_weights = Some(Array2::zeros(case.shape()));
    zeros.cfg.kl = None;
    let z = zeros.eval(Par::Seq).unwrap();
    prop_assert!(z.outputs.grad.iter().all(|&g| g == 0.0));
    prop_assert!(z.outputs.token_loss.iter().all(|&l| l == 0.0));
    // The mask does not look at the weights.
    prop_assert_eq!(&z.outputs.reason, &a.outputs.reason);
    Ok(())
}

/// A (ρ − 1) ≤ 0, computed here from the inputs, implies keep. Under
/// `Numerics::F32Exp` the engine's ρ carries f32 rounding, so tokens whose log-ratio is
/// within 1e-6 (1 + |log π| + |log μ|) of 0 may count as moving the other way and are
/// skipped.
fn check_non_away_tokens_are_kept(case: &Case<f64>) -> TestCaseResult {
    prop_assume!(!case.cfg.rule.is_sequence_level());
    let skip_near_one = !case.cfg.numerics.is_exact();
    let o = case.eval(Par::Seq).unwrap().outputs;
    for ((i, j), &on) in case.mask.indexed_iter() {
        if !on {
            continue;
        }
        let lp = read_logprob(case.logp[[i, j]]);
        let lq = read_logprob(case.logp_old[[i, j]]);
        if skip_near_one && (lp - lq).abs() <= 1e-6 * (1.0 + lp.abs() + lq.abs()) {
            continue;
        }
        let rho = ref_ratio(lp, lq);
        let a = case.adv_at(i, j);
        if a * (rho - 1.0) <= 0.0 {
            prop_assert!(
                o.keep[[i, j]],
                "({i}, {j}): A = {a}, rho = {rho} masked, reason {}",
                o.reason[[i, j]]
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Padding and masks
// ---------------------------------------------------------------------------------------

/// Two garbage fillings and a clean one (−1 everywhere): same bits, same diagnostics.
fn check_padding_is_never_read(case: &Case<f64>, s1: u64, s2: u64) -> TestCaseResult {
    let filled = |f: &dyn Fn(Arr, usize, usize, usize) -> f64| {
        let mut c = case.clone();
        c.fill_padding(f);
        c.eval(Par::Rayon).unwrap()
    };
    let a = filled(&|arr, i, j, k| garbage(s1, arr, i, j, k));
    let b = filled(&|arr, i, j, k| garbage(s2, arr, i, j, k));
    let clean = filled(&|_, _, _, _| -1.0);
    for other in [&b, &clean] {
        same_eval(&a, other).map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            format!("{:?}", a.diagnostics),
            format!("{:?}", other.diagnostics)
        );
    }
    Ok(())
}

/// Masks of every element type with the same nonzero set, arbitrary nonzero values
/// (negative ones in signed types, the type's extremes among them) and zeros of either
/// sign: same bits.
fn check_mask_element_types_agree(case: &Case<f64>, seed: u64) -> TestCaseResult {
    const ON: [f64; 6] = [1.0, 0.5, -2.0, 1e-30, 3e20, -1e-3];
    let h = |i: usize, j: usize| mix(seed ^ mix((i * 1000 + j) as u64));
    let m = &case.mask;
    let m64 = Array2::from_shape_fn(m.dim(), |(i, j)| match (m[[i, j]], (i + j) % 2) {
        (true, _) => ON[(h(i, j) % 6) as usize],
        (false, 0) => -0.0,
        (false, _) => 0.0,
    });
    let m32 = m64.mapv(|x| x as f32);
    // A nonzero integer from the hash: the type's MAX, its MIN (MAX / 2 if unsigned),
    // or ±(1..=100) (a negative value wraps to a large one in an unsigned type).
    macro_rules! int_mask {
        ($t:ty) => {
            Array2::from_shape_fn(m.dim(), |(i, j)| -> $t {
                let h = h(i, j);
                let v = 1 + ((h >> 8) % 100) as i64;
                match (m[[i, j]], h % 8) {
                    (false, _) => 0,
                    (true, 0) => <$t>::MAX,
                    (true, 1) if <$t>::MIN == 0 => <$t>::MAX / 2,
                    (true, 1) => <$t>::MIN,
                    (true, 2..=4) => (-v) as $t,
                    (true, _) => v as $t,
                }
            })
        };
    }
    let base = case.eval(Par::Seq).unwrap();
    let (i8s, i16s, i32s, i64s) = (
        int_mask!(i8),
        int_mask!(i16),
        int_mask!(i32),
        int_mask!(i64),
    );
    let (u8s, u16s, u32s, u64s) = (
        int_mask!(u8),
        int_mask!(u16),
        int_mask!(u32),
        int_mask!(u64),
    );
    for batch in [
        case.batch_with_mask(&m64),
        case.batch_with_mask(&m32),
        case.batch_with_mask(&i8s),
        case.batch_with_mask(&i16s),
        case.batch_with_mask(&i32s),
        case.batch_with_mask(&i64s),
        case.batch_with_mask(&u8s),
        case.batch_with_mask(&u16s),
        case.batch_with_mask(&u32s),
        case.batch_with_mask(&u64s),
    ] {
        let e = evaluate(&case.cfg, &batch, Par::Seq).unwrap();
        same_eval(&base, &e).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Row permutations
// ---------------------------------------------------------------------------------------

fn case_and_permutation() -> impl Strategy<Value = (Case<f64>, Vec<usize>)> {
    any_case().prop_flat_map(|c| {
        let b = c.shape().0;
        (Just(c), Just((0..b).collect::<Vec<_>>()).prop_shuffle())
    })
}

/// Every per-token output permuted bit for bit; the loss (any aggregation) to rounding.
fn check_permuting_rows_permutes_outputs(case: &Case<f64>, perm: &[usize]) -> TestCaseResult {
    let e = case.eval(Par::Seq).unwrap();
    let ep = case.permute_rows(perm).eval(Par::Seq).unwrap();
    let (o, op) = (&e.outputs, &ep.outputs);
    let permuted = |a: &Array2<f64>| Array2::from_shape_fn(a.dim(), |(i, j)| a[[perm[i], j]]);
    for (what, x, y) in [
        ("divergence", &o.divergence, &op.divergence),
        ("weight", &o.weight, &op.weight),
        ("threshold", &o.threshold, &op.threshold),
        ("token_loss", &o.token_loss, &op.token_loss),
        ("grad", &o.grad, &op.grad),
    ] {
        same_bits(what, &permuted(x), y).map_err(TestCaseError::fail)?;
    }
    let keep = Array2::from_shape_fn(o.keep.dim(), |(i, j)| o.keep[[perm[i], j]]);
    let reason = Array2::from_shape_fn(o.reason.dim(), |(i, j)| o.reason[[perm[i], j]]);
    prop_assert_eq!(&keep, &op.keep);
    prop_assert_eq!(&reason, &op.reason);
    let scale = reference(case).loss_scale;
    prop_assert!(
        close(e.loss, ep.loss, 0.0, 1e-12 * scale),
        "loss {:e} vs {:e}",
        e.loss,
        ep.loss
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// f32 and f64
// ---------------------------------------------------------------------------------------

/// An f32 batch computes in f64: its float outputs are the f64 outputs of the same
/// (widened) values rounded once to f32, its decisions and loss those of the f64 batch.
fn check_f32_inputs_are_computed_in_f64(case: &Case<f64>) -> TestCaseResult {
    let c32 = case.cast::<f32>();
    let e32 = c32.eval(Par::Seq).unwrap();
    let e64 = c32.cast::<f64>().eval(Par::Seq).unwrap();
    let (o, w) = (&e32.outputs, &e64.outputs);
    prop_assert_eq!(&o.reason, &w.reason);
    prop_assert_eq!(&o.keep, &w.keep);
    prop_assert_eq!(e32.loss.to_bits(), e64.loss.to_bits());
    for (what, x, y) in [
        ("divergence", &o.divergence, &w.divergence),
        ("weight", &o.weight, &w.weight),
        ("threshold", &o.threshold, &w.threshold),
        ("token_loss", &o.token_loss, &w.token_loss),
        ("grad", &o.grad, &w.grad),
    ] {
        same_bits(what, x, &y.mapv(|v| v as f32)).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

/// The largest |log-prob| the outputs of token (i, j) are computed from: f32 rounds a
/// log-prob x by up to 6e-8 |x|, an absolute error that the divergences, the KL term
/// and ρ pass on.
fn magnitude(case: &Case<f64>, i: usize, j: usize) -> f64 {
    let mut m = case.logp[[i, j]].abs().max(case.logp_old[[i, j]].abs());
    if let Some(r) = &case.logp_ref {
        m = m.max(r[[i, j]].abs());
    }
    if let Some((o, n)) = &case.topk {
        for k in 0..o.dim().2 {
            m = m.max(o[[i, j, k]].abs()).max(n[[i, j, k]].abs());
        }
    }
    m
}

/// f32-rounded inputs against the f64 originals (see [`check_close_to_exact`]).
fn check_f32_rounding_moves_results_little(case: &Case<f64>) -> TestCaseResult {
    let e32 = case.cast::<f32>().eval(Par::Seq).unwrap();
    check_close_to_exact(case, &e32, "f32")
}

/// The f32 exponentials of `Numerics::F32Exp` against the exact engine, on the same
/// f64 inputs (see [`check_close_to_exact`]): their relative error, about
/// 1.8e-7 + |x| 6e-8 for an exponent x, is of the size of the f32 rounding of the inputs.
fn check_f32_exp_moves_results_little(case: &Case<f64>) -> TestCaseResult {
    let mut fast = case.clone();
    fast.cfg.numerics = Numerics::F32Exp;
    check_close_to_exact(case, &fast.eval(Par::Seq).unwrap(), "f32_exp")
}

/// `got`, an evaluation of `case` with f32 rounding somewhere (of the inputs, or of the
/// exponentials), against the exact f64 engine. Tokens whose decision margin (see
/// `Reference::margin`) is under 1e-3 may legitimately decide differently and are
/// skipped; every other token has the same reason, and floats within 1e-4 relative plus
/// 1e-5 absolute, both widened by 1e-6 times the token's input magnitude (the prefix
/// sum of magnitudes for the CPPO threshold, which carries S_{t−1}). The loss is compared
/// when no token was skipped and every magnitude is below 64.
fn check_close_to_exact<G: Float>(
    case: &Case<f64>,
    got: &Evaluation<G>,
    what_got: &str,
) -> TestCaseResult {
    const MARGIN: f64 = 1e-3;
    const REL: f64 = 1e-4;
    const ABS: f64 = 1e-5;
    const PER_MAGNITUDE: f64 = 1e-6;
    assert!(case.cfg.numerics.is_exact());
    let r = reference(case);
    let e64 = case.eval(Par::Seq).unwrap();
    let (o32, o64) = (&got.outputs, &e64.outputs);
    let (b, l) = case.shape();
    let mut compare_loss = true;
    for i in 0..b {
        let mut prefix_magnitude = 0.0;
        for j in 0..l {
            if !case.mask[[i, j]] {
                continue;
            }
            let mag = magnitude(case, i, j);
            prefix_magnitude += mag;
            compare_loss &= mag < 64.0;
            let m = r.margin[[i, j]];
            if m < MARGIN {
                compare_loss = false;
                continue;
            }
            prop_assert_eq!(
                o32.reason[[i, j]],
                o64.reason[[i, j]],
                "reason at ({}, {}), margin {:e}",
                i,
                j,
                m
            );
            for (what, x, y, mag) in [
                ("divergence", &o32.divergence, &o64.divergence, mag),
                (
                    "threshold",
                    &o32.threshold,
                    &o64.threshold,
                    prefix_magnitude,
                ),
                ("token_loss", &o32.token_loss, &o64.token_loss, mag),
                ("grad", &o32.grad, &o64.grad, mag),
            ] {
                let (x, y) = (x[[i, j]].to_f64(), y[[i, j]]);
                let widen = PER_MAGNITUDE * mag;
                prop_assert!(
                    close(x, y, REL + widen, ABS + widen),
                    "{what}({i}, {j}): {what_got} {x:e}, exact {y:e}, input magnitude {mag}"
                );
            }
        }
    }
    if compare_loss {
        prop_assert!(
            close(got.loss, e64.loss, 0.0, REL * r.loss_scale + ABS),
            "loss: {what_got} {:e}, exact {:e}",
            got.loss,
            e64.loss
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------

fn pools() -> &'static [rayon::ThreadPool] {
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        [1, 2, 8]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .expect("rayon pool")
            })
            .collect()
    })
}

/// Every way of running a batch: Seq, the global pool, and pools of 1, 2 and 8 threads.
fn every_par<F: cppo::Float>(
    cfg: &Config,
    batch: &Batch<'_, F>,
) -> Vec<cppo::Result<Evaluation<F>>> {
    let mut v = vec![
        evaluate(cfg, batch, Par::Seq),
        evaluate(cfg, batch, Par::Rayon),
    ];
    for pool in pools() {
        v.push(pool.install(|| evaluate(cfg, batch, Par::Rayon)));
    }
    v
}

fn check_all_identical(case: &Case<f64>) -> Result<(), TestCaseError> {
    let runs = every_par(&case.cfg, &case.batch());
    let first = runs[0].as_ref().unwrap();
    for run in &runs[1..] {
        let e = run.as_ref().unwrap();
        same_eval(first, e).map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            format!("{:?}", first.diagnostics),
            format!("{:?}", e.diagnostics)
        );
        prop_assert_eq!(format!("{:?}", first.tally), format!("{:?}", e.tally));
    }
    Ok(())
}

fn big_case_strategy() -> impl Strategy<Value = Case<f64>> {
    // 16384 tokens per leaf block: these batches have 2 to 7 leaves, and rows of 1 to 3
    // column blocks.
    (config_strategy(), 20usize..180, 1usize..=5, any::<u64>()).prop_map(|(cfg, l, k, seed)| {
        let b = (20_000 + (seed % 90_000) as usize) / l;
        let k = if cfg.cfg.divergence.needs_topk() || seed.is_multiple_of(4) {
            k
        } else {
            0
        };
        big_case(cfg, b, l, k, seed)
    })
}

// ---------------------------------------------------------------------------------------
// Valid input never errors
// ---------------------------------------------------------------------------------------

fn run_every_entry_point<F: cppo::Float>(case: &Case<F>) -> Result<(), TestCaseError> {
    let m = &case.mask;
    let mu8 = m.mapv(u8::from);
    let m32 = m.mapv(|x| f32::from(u8::from(x)));
    let m64 = m.mapv(|x| f64::from(u8::from(x)));
    let batches = [
        case.batch(),
        case.batch_with_mask(&mu8),
        case.batch_with_mask(&m32),
        case.batch_with_mask(&m64),
    ];
    for batch in &batches {
        let err = |e: cppo::Error| TestCaseError::fail(e.to_string());
        batch.validate().map_err(err)?;
        for par in [Par::Seq, Par::Rayon] {
            evaluate(&case.cfg, batch, par).map_err(err)?;
            let mut out = Outputs::<F>::zeros(batch.shape());
            evaluate_into(&case.cfg, batch, out.view_mut(), par).map_err(err)?;
            trust_region(case.cfg.divergence, &case.cfg.rule, batch, par).map_err(err)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Invalid input
// ---------------------------------------------------------------------------------------

/// One bad value to plant: an array, a response token (by index among the case's
/// response tokens), a top-K index, and what to put there.
#[derive(Clone, Copy, Debug)]
struct Plant {
    arr: Arr,
    token: usize,
    k: usize,
    kind: u8,
    u: f64,
}

fn plant_strategy() -> impl Strategy<Value = Plant> {
    (
        prop::sample::select(Arr::ALL.to_vec()),
        any::<usize>(),
        0usize..5,
        0u8..5,
        0.0f64..1.0,
    )
        .prop_map(|(arr, token, k, kind, u)| Plant {
            arr,
            token,
            k,
            kind,
            u,
        })
}

/// The value of a plant: NaN, ±inf, or (log-prob arrays) a log-prob above 1e-4.
fn bad_value(p: &Plant) -> f64 {
    match p.kind {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        // A negative weight.
        _ if p.arr == Arr::IsWeights => -(1e-3 + p.u),
        _ if p.arr.is_logprob() => {
            // Above the tolerance, by a little or a lot (f32-representably above it).
            if p.kind == 3 {
                1.001e-4 + p.u * 1e-4
            } else {
                0.01 + p.u * 5.0
            }
        }
        _ => f64::NAN,
    }
}

/// A planted bad value: array, where the crate first reads it, value.
type Bad = (Arr, At, f64);

/// Where a bad value ranks in the order values are checked: row-major over tokens, and
/// within a token logp, logp_old, advantages, the top-K pair (k by k, old before new),
/// logp_ref, is_weights: the crate's documented order, that of `Batch::validate`.
fn rank(&(arr, at, _): &Bad) -> (usize, usize, usize, usize, usize) {
    let (a, sub) = match arr {
        Arr::Logp => (0, 0),
        Arr::LogpOld => (1, 0),
        Arr::Adv => (2, 0),
        Arr::TopkOld => (3, 0),
        Arr::TopkNew => (3, 1),
        Arr::LogpRef => (4, 0),
        Arr::IsWeights => (5, 0),
    };
    (at.row, at.col, a, at.k.unwrap_or(0), sub)
}

/// Plants bad values at response positions of the arrays the config reads; returns what
/// was planted (a later plant at the same place replaces an earlier one).
fn plant_all(case: &mut Case<f64>, plants: &[Plant]) -> Vec<Bad> {
    let (_, l) = case.shape();
    let cols: Vec<(usize, usize)> = case
        .mask
        .indexed_iter()
        .filter(|(_, m)| **m)
        .map(|(ij, _)| ij)
        .collect();
    let reads_topk = case.cfg.divergence.needs_topk();
    let reads_ref = case.cfg.kl.is_some();
    let per_row = matches!(case.adv, Adv::Row(_));
    let mut planted: Vec<Bad> = Vec::new();
    if cols.is_empty() {
        return planted;
    }
    for p in plants {
        let (i, j) = cols[p.token % cols.len()];
        let v = bad_value(p);
        let at = match p.arr {
            Arr::TopkOld | Arr::TopkNew if !reads_topk => continue,
            Arr::LogpRef if !reads_ref => continue,
            Arr::IsWeights if case.is_weights.is_none() => continue,
            Arr::TopkOld | Arr::TopkNew => At::with_k(i, j, p.k % case.k().unwrap()),
            // A per-row advantage is read at each of the row's response tokens: it is
            // first bad at the row's first response column.
            Arr::Adv if per_row => At::new(i, (0..l).find(|&c| case.mask[[i, c]]).unwrap()),
            _ => At::new(i, j),
        };
        case.set(p.arr, i, j, at.k.unwrap_or(0), v);
        planted.retain(|&(a, w, _)| !(a == p.arr && w == at));
        planted.push((p.arr, at, v));
    }
    planted
}

/// The first planted value in check order, among the arrays `reads` accepts.
fn first_bad(planted: &[Bad], reads: impl Fn(Arr) -> bool) -> Option<Bad> {
    planted
        .iter()
        .copied()
        .filter(|b| reads(b.0))
        .min_by_key(rank)
}

/// The error is the expected one: variant, array, position, value.
fn check_error(err: &Error, &(arr, at, v): &Bad) -> Result<(), String> {
    let array = arr.name();
    let ok = match err {
        Error::NonFinite {
            array: a,
            at: w,
            value,
        } => {
            !v.is_finite()
                && *a == array
                && *w == at
                && (value.to_bits() == v.to_bits() || value.is_nan() && v.is_nan())
        }
        Error::PositiveLogProb {
            array: a,
            at: w,
            value,
        } => v.is_finite() && *a == array && *w == at && *value == v,
        Error::Negative {
            array: a,
            at: w,
            value,
        } => v.is_finite() && v < 0.0 && *a == array && *w == at && *value == v,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{err:?}: expected {array} at {at} = {v}"))
    }
}

fn invalid_case() -> impl Strategy<Value = (Case<f64>, Vec<Plant>)> {
    (
        any_case(),
        proptest::collection::vec(plant_strategy(), 1..4),
    )
}

/// `evaluate` under every scheduling, `Batch::validate`, `trust_region` (which does not
/// read logp_ref) and the f32 batch all report the first planted value.
fn check_bad_values(mut case: Case<f64>, plants: Vec<Plant>) -> TestCaseResult {
    let planted = plant_all(&mut case, &plants);
    let Some(expected) = first_bad(&planted, |_| true) else {
        return Ok(());
    };
    let batch = case.batch();
    for run in every_par(&case.cfg, &batch) {
        let err = run
            .err()
            .ok_or_else(|| TestCaseError::fail("bad value accepted"))?;
        check_error(&err, &expected).map_err(TestCaseError::fail)?;
    }
    let err = batch.validate().expect_err("validate accepted a bad value");
    check_error(&err, &expected).map_err(TestCaseError::fail)?;
    let mask_only = first_bad(&planted, |a| a != Arr::LogpRef);
    let tr = trust_region(case.cfg.divergence, &case.cfg.rule, &batch, Par::Rayon);
    match (mask_only, tr) {
        (Some(want), Err(err)) => check_error(&err, &want).map_err(TestCaseError::fail)?,
        (None, Ok(_)) => {}
        (want, got) => prop_assert!(false, "trust_region: want {want:?}, got {:?}", got.err()),
    }
    // The same in f32 (the planted values stay bad when rounded).
    let err = case
        .cast::<f32>()
        .eval(Par::Rayon)
        .expect_err("f32: bad value accepted");
    let e32 = (expected.0, expected.1, f64::from(expected.2 as f32));
    check_error(&err, &e32).map_err(TestCaseError::fail)
}

/// NaN or ±inf anywhere in a float mask (padding included): the first in row-major
/// order, from `evaluate` (f64 and f32, Seq and Rayon) and `Batch::validate`.
fn check_non_finite_mask_is_reported(case: &Case<f64>, spots: &[(usize, u8)]) -> TestCaseResult {
    let (b, l) = case.shape();
    prop_assume!(b * l > 0);
    let mut m64 = case.mask.mapv(|x| f64::from(u8::from(x)));
    for &(s, kind) in spots {
        let v = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][kind as usize];
        m64.as_slice_mut().unwrap()[s % (b * l)] = v;
    }
    let first = m64.iter().position(|x| !x.is_finite()).unwrap();
    let want = At::new(first / l, first % l);
    let m32 = m64.mapv(|x| x as f32);
    let eval = |batch: Batch<'_, f64>, par| evaluate(&case.cfg, &batch, par).map(|_| ());
    let runs = [
        (eval(case.batch_with_mask(&m64), Par::Seq), "f64 Seq"),
        (eval(case.batch_with_mask(&m64), Par::Rayon), "f64 Rayon"),
        (eval(case.batch_with_mask(&m32), Par::Rayon), "f32 mask"),
        (case.batch_with_mask(&m64).validate(), "validate"),
    ];
    for (run, what) in runs {
        match run {
            Err(Error::NonFinite {
                array: "mask",
                at,
                value,
            }) => {
                prop_assert_eq!(at, want, "{}", what);
                prop_assert!(!value.is_finite());
            }
            other => prop_assert!(false, "{what}: {other:?}"),
        }
    }
    Ok(())
}

/// Which array of a batch to build with a wrong shape.
#[derive(Clone, Copy, Debug)]
enum WrongShape {
    LogpOld,
    AdvRow,
    AdvToken,
    Mask,
    TopkOld,
    TopkNew,
    TopkWidths,
    TopkZero,
    LogpRef,
}

/// Builds a batch with `which` array's shape wrong (along `axis` by `d`, or K mismatched
/// or 0) and returns the array the shape error names.
fn wrong_shape(
    b: usize,
    l: usize,
    k: usize,
    d: usize,
    which: WrongShape,
    axis: usize,
) -> Option<&'static str> {
    let z = Array2::<f64>::zeros((b, l));
    let (wb, wl) = if axis == 0 { (b + d, l) } else { (b, l + d) };
    let wrong = Array2::<f64>::zeros((wb, wl));
    let wrong3 = Array3::<f64>::zeros((wb, wl, k));
    let adv = Array1::<f64>::zeros(b);
    let mask = Array2::from_elem((b, l), true);
    let t = Array3::<f64>::zeros((b, l, k));
    let ok = || Batch::new(&z, &z, &adv, &mask).unwrap();
    let r = match which {
        WrongShape::LogpOld => Batch::new(&z, &wrong, &adv, &mask).map(drop),
        WrongShape::AdvRow => Batch::new(&z, &z, &Array1::<f64>::zeros(b + d), &mask).map(drop),
        WrongShape::AdvToken => Batch::new(&z, &z, &wrong, &mask).map(drop),
        WrongShape::Mask => Batch::new(&z, &z, &adv, &Array2::from_elem((wb, wl), 1u8)).map(drop),
        WrongShape::TopkOld => ok().with_topk(&wrong3, &t).map(drop),
        WrongShape::TopkNew => ok().with_topk(&t, &wrong3).map(drop),
        WrongShape::TopkWidths => ok()
            .with_topk(&t, &Array3::<f64>::zeros((b, l, k + d)))
            .map(drop),
        WrongShape::TopkZero => {
            let zero = Array3::<f64>::zeros((b, l, 0));
            ok().with_topk(&zero, &zero).map(drop)
        }
        WrongShape::LogpRef => ok().with_logp_ref(&wrong).map(drop),
    };
    match r {
        Err(Error::ShapeMismatch { array, .. }) => Some(array),
        _ => None,
    }
}

fn wrong_shape_strategy() -> impl Strategy<Value = (WrongShape, &'static str)> {
    prop::sample::select(vec![
        (WrongShape::LogpOld, "logp_old"),
        (WrongShape::AdvRow, "advantages"),
        (WrongShape::AdvToken, "advantages"),
        (WrongShape::Mask, "mask"),
        (WrongShape::TopkOld, "topk_logp_old"),
        (WrongShape::TopkNew, "topk_logp"),
        (WrongShape::TopkWidths, "topk_logp"),
        (WrongShape::TopkZero, "topk_logp_old"),
        (WrongShape::LogpRef, "logp_ref"),
    ])
}

/// Without the top-K pair or logp_ref, a config that needs them names the missing array;
/// a count override below the batch's own count names its field.
fn check_missing_arrays_and_small_counts(case: &Case<f64>, d: u64) -> TestCaseResult {
    let mut bare = case.clone();
    bare.topk = None;
    bare.logp_ref = None;
    bare.cfg.num_tokens = None;
    bare.cfg.num_seqs = None;
    let cfg = bare.cfg;
    match (
        cfg.divergence.needs_topk(),
        cfg.kl.is_some(),
        bare.eval(Par::Seq),
    ) {
        (
            true,
            _,
            Err(Error::MissingArray {
                array: "topk_logp_old",
                ..
            }),
        ) => {}
        (
            false,
            true,
            Err(Error::MissingArray {
                array: "logp_ref", ..
            }),
        ) => {}
        (false, false, Ok(_)) => {}
        (t, k, other) => prop_assert!(false, "top-K needed {t}, kl {k}: {other:?}"),
    }
    let lens = case.row_lengths();
    let tokens: u64 = lens.iter().map(|&t| t as u64).sum();
    let seqs = lens.iter().filter(|&&t| t > 0).count() as u64;
    if tokens > 0 {
        let mut c = case.clone();
        c.cfg.num_tokens = Some(tokens.saturating_sub(d));
        c.cfg.num_seqs = None;
        let r = c.eval(Par::Rayon);
        prop_assert!(
            matches!(
                r,
                Err(Error::CountTooSmall {
                    field: "num_tokens",
                    ..
                })
            ),
            "{r:?}"
        );
        c.cfg.num_tokens = None;
        c.cfg.num_seqs = Some(seqs.saturating_sub(d));
        let r = c.eval(Par::Rayon);
        prop_assert!(
            matches!(
                r,
                Err(Error::CountTooSmall {
                    field: "num_seqs",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    Ok(())
}

/// Puts the out-of-range value `v` (≤ 0 or non-finite) into config field number `which`
/// and checks that `evaluate` refuses it, naming the field.
fn check_bad_config_values_name_the_field(
    case: &Case<f64>,
    which: usize,
    v: f64,
) -> TestCaseResult {
    let neg = if v == 0.0 { -1e-3 } else { v }; // for fields where 0 is valid
    let cppo = |delta, delta_b, w_min, horizon| {
        Rule::Cppo(CppoParams {
            delta,
            delta_b,
            w_min,
            horizon,
            ..CppoParams::default()
        })
    };
    let mut cfg = case.cfg;
    let field = match which {
        0 => {
            cfg.rule = Rule::Dppo { delta: v };
            "rule.delta"
        }
        1 => {
            cfg.rule = Rule::TrmAvg { delta: v };
            "rule.delta"
        }
        2 => {
            cfg.rule = cppo(v, None, 0.8, None);
            "rule.delta"
        }
        3 => {
            cfg.rule = cppo(0.2, Some(neg), 0.8, None);
            "rule.delta_b"
        }
        4 => {
            cfg.rule = cppo(0.2, None, if v.is_finite() { v } else { 1.5 }, None);
            "rule.w_min"
        }
        5 => {
            cfg.rule = cppo(0.2, None, 0.8, Some(0));
            "rule.horizon"
        }
        6 => {
            cfg.rule = Rule::Ratio {
                eps_low: neg,
                eps_high: 0.2,
            };
            "rule.eps_low"
        }
        7 => {
            cfg.objective = Objective::DetachedIs { ratio_cap: v };
            "objective.ratio_cap"
        }
        8 => {
            cfg.objective = Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.2,
                dual_clip: Some(if v.is_finite() { 1.0 + v } else { v }),
            };
            "objective.dual_clip"
        }
        9 => {
            cfg.kl = Some(KlPenalty {
                estimator: KlEstimator::K3,
                coef: neg,
            });
            "kl.coef"
        }
        _ => {
            cfg.norm_length = Some(0);
            "norm_length"
        }
    };
    match evaluate(&cfg, &case.batch(), Par::Seq) {
        Err(Error::InvalidConfig { field: f, .. }) => prop_assert_eq!(f, field),
        other => prop_assert!(false, "{field} = {v}: {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The properties, with their case counts (the whole file runs in seconds in debug)
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(proptest_config(512, REGRESSIONS))]

    /// The fused engine equals the reference.
    #[test]
    fn fast_path_equals_reference(case in any_case(), par in par_strategy()) {
        check_fast_path_equals_reference(&case, par)?;
    }

    /// Bad values at response positions: the first in check order is reported.
    #[test]
    fn bad_values_are_reported_first_in_row_major_order((case, plants) in invalid_case()) {
        check_bad_values(case, plants)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(256, REGRESSIONS))]

    /// CPPO with w_min = 1 and no budget is DPPO, bit for bit.
    #[test]
    fn cppo_without_decay_or_budget_is_dppo(case in cppo_case()) {
        check_cppo_without_decay_or_budget_is_dppo(&case)?;
    }

    /// keep is monotone in δ_b, token by token.
    #[test]
    fn larger_budget_never_masks_more(
        case in cppo_case(),
        db in 0.0f64..0.3,
        more in prop_oneof![Just(None), (0.0f64..0.3).prop_map(Some)],
    ) {
        check_larger_budget_never_masks_more(&case, db, more)?;
    }

    /// A calibration with scale 0 is the fixed budget, bit for bit.
    #[test]
    fn zero_scale_calibration_is_the_fixed_budget(
        case in cppo_case(),
        db in 0.0f64..0.3,
        q in 0.01f64..=1.0,
        c in 1.0f64..5.0,
    ) {
        check_zero_scale_is_the_fixed_budget(&case, db, q, c)?;
    }

    /// IS weights of 1 are no weights; weights of 0 zero the objective's terms.
    #[test]
    fn unit_is_weights_change_nothing(case in any_case()) {
        check_unit_is_weights_change_nothing(&case)?;
    }

    /// A token that does not move away from the anchor is kept, under every rule but TRM.
    #[test]
    fn non_away_tokens_are_kept(case in any_case()) {
        check_non_away_tokens_are_kept(&case)?;
    }

    /// Garbage at non-response positions changes nothing.
    #[test]
    fn padding_is_never_read(case in any_case(), s1 in any::<u64>(), s2 in any::<u64>()) {
        check_padding_is_never_read(&case, s1, s2)?;
    }

    /// Every mask element type gives the same bits.
    #[test]
    fn mask_element_types_agree(case in any_case(), seed in any::<u64>()) {
        check_mask_element_types_agree(&case, seed)?;
    }

    /// Permuting rows permutes the outputs.
    #[test]
    fn permuting_rows_permutes_outputs((case, perm) in case_and_permutation()) {
        check_permuting_rows_permutes_outputs(&case, &perm)?;
    }

    /// f32 inputs are computed in f64.
    #[test]
    fn f32_inputs_are_computed_in_f64(case in any_case()) {
        check_f32_inputs_are_computed_in_f64(&case)?;
    }

    /// f32 rounding of the inputs moves the results by about f32 rounding.
    #[test]
    fn f32_rounding_moves_results_little(case in any_case()) {
        check_f32_rounding_moves_results_little(&case)?;
    }

    /// A non-finite float mask value is reported where it is.
    #[test]
    fn non_finite_mask_is_reported(
        case in any_case(),
        spots in proptest::collection::vec((any::<usize>(), 0u8..3), 1..4),
    ) {
        check_non_finite_mask_is_reported(&case, &spots)?;
    }

    /// Each wrong shape names its array.
    #[test]
    fn wrong_shapes_name_the_array(
        b in 0usize..5,
        l in 0usize..6,
        k in 1usize..5,
        d in 1usize..3,
        (which, name) in wrong_shape_strategy(),
        axis in 0usize..2,
    ) {
        prop_assert_eq!(wrong_shape(b, l, k, d, which, axis), Some(name));
    }

    /// Missing arrays and too small count overrides are named.
    #[test]
    fn missing_arrays_and_small_counts(case in any_case(), d in 1u64..4) {
        check_missing_arrays_and_small_counts(&case, d)?;
    }

    /// An out-of-range config value names its field.
    #[test]
    fn bad_config_values_name_the_field(
        case in any_case(),
        which in 0usize..11,
        v in prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            -5.0f64..=0.0,
        ],
    ) {
        check_bad_config_values_name_the_field(&case, which, v)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(128, REGRESSIONS))]

    /// Every entry point accepts every valid batch, f32 and f64, every mask type.
    #[test]
    fn valid_input_never_errors(case in any_case()) {
        run_every_entry_point(&case)?;
        run_every_entry_point(&case.cast::<f32>())?;
    }
}

proptest! {
    #![proptest_config(proptest_config(64, REGRESSIONS))]

    /// Small and wide batches: any scheduling gives the same bits.
    #[test]
    fn threads_do_not_change_bits_small(case in any_case()) {
        check_all_identical(&case)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(6, REGRESSIONS))]

    /// Batches of several leaf blocks: any scheduling gives the same bits.
    #[test]
    fn threads_do_not_change_bits_large(case in big_case_strategy()) {
        check_all_identical(&case)?;
    }
}

/// `case` under `Numerics::F32Exp`.
fn f32_exp(mut case: Case<f64>) -> Case<f64> {
    case.cfg.numerics = Numerics::F32Exp;
    case
}

proptest! {
    #![proptest_config(proptest_config(128, REGRESSIONS))]

    /// `Numerics::F32Exp` moves the results by about its f32 rounding, as f32 inputs do.
    #[test]
    fn f32_exp_moves_results_little(case in any_case()) {
        check_f32_exp_moves_results_little(&case)?;
    }

    /// The invariants that do not compare with the exact reference hold under
    /// `Numerics::F32Exp` too: CPPO → DPPO bit for bit, budget monotonicity, the
    /// corrective bypass, padding, unit IS weights, mask types, row permutations and
    /// scheduling.
    #[test]
    fn invariants_hold_under_f32_exp(
        case in cppo_case().prop_map(f32_exp),
        any in any_case().prop_map(f32_exp),
        db in 0.0f64..0.3,
        more in prop_oneof![Just(None), (0.0f64..0.3).prop_map(Some)],
        s1 in any::<u64>(),
        s2 in any::<u64>(),
    ) {
        check_cppo_without_decay_or_budget_is_dppo(&case)?;
        check_larger_budget_never_masks_more(&case, db, more)?;
        check_unit_is_weights_change_nothing(&any)?;
        check_padding_is_never_read(&any, s1, s2)?;
        check_mask_element_types_agree(&any, s1)?;
        check_f32_inputs_are_computed_in_f64(&any)?;
        let perm: Vec<usize> = (0..any.shape().0).rev().collect();
        check_permuting_rows_permutes_outputs(&any, &perm)?;
        check_all_identical(&any)?;
        check_non_away_tokens_are_kept(&any)?;
    }
}

// ---------------------------------------------------------------------------------------
// The reference itself
// ---------------------------------------------------------------------------------------

/// The reference reproduces the worked example (tests/worked_example.rs), table and losses.
#[test]
fn reference_reproduces_the_spec_worked_example() {
    let p = [0.50f64, 0.90, 0.30, f64::NAN, 0.60, 0.95];
    let q = [0.40f64, 0.95, 0.45, f64::NAN, 0.30, 0.90];
    let want_d = [0.10, 0.05, 0.15, 0.0, 0.30, 0.05];
    let want_w = [1.00, 0.95, 0.90, 0.0, 0.85, 0.80];
    let want_c = [0.2000, 0.1500, 0.1500, 0.0, 0.0600, -0.1525];
    let cases = [
        (
            1.0,
            [1u8, 1, 1, 0, 3, 4],
            [-0.25, -0.189474, -0.133333, 0.0, 0.0, 0.0],
            -0.5728070175438597,
        ),
        (
            -1.0,
            [1u8, 1, 1, 0, 2, 2],
            [0.25, 0.189474, 0.133333, 0.0, 0.4, 0.211111],
            1.183918128654971,
        ),
    ];
    for (a, reasons, grads, loss) in cases {
        let case = Case {
            cfg: worked_example_config(),
            logp: Array2::from_shape_fn((1, 6), |(_, j)| p[j].ln()),
            logp_old: Array2::from_shape_fn((1, 6), |(_, j)| q[j].ln()),
            adv: Adv::Row(Array1::from_elem(1, a)),
            mask: Array2::from_shape_fn((1, 6), |(_, j)| j != 3),
            topk: None,
            logp_ref: None,
            is_weights: None,
        };
        let r = reference(&case);
        for j in 0..6 {
            assert!(
                (r.divergence[[0, j]] - want_d[j]).abs() < 1e-12,
                "D slot {}",
                j + 1
            );
            assert!(
                (r.weight[[0, j]] - want_w[j]).abs() < 1e-12,
                "w slot {}",
                j + 1
            );
            assert!(
                (r.threshold[[0, j]] - want_c[j]).abs() < 1e-12,
                "c slot {}",
                j + 1
            );
            assert_eq!(r.reason[[0, j]], reasons[j], "reason slot {}", j + 1);
            assert!(
                (r.grad[[0, j]] - grads[j]).abs() < 1e-6,
                "grad slot {}",
                j + 1
            );
        }
        assert!((r.loss - loss).abs() < 1e-12, "loss {} vs {loss}", r.loss);
        // And the engine agrees.
        check_reference(&case, &case.eval(Par::Seq).unwrap()).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Coverage of the generator
// ---------------------------------------------------------------------------------------

/// The generator makes every decision often enough for the properties to bite.
#[test]
fn generator_covers_every_decision() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = any_case();
    let mut by_reason = [0usize; 5];
    let mut branches = [0usize; 3];
    let mut topk_full = 0usize;
    let mut empty_rows = 0usize;
    let mut tokens = 0usize;
    let mut clear = 0usize;
    for _ in 0..400 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let r = reference(&case);
        for (&m, (&reason, &br)) in case.mask.iter().zip(r.reason.iter().zip(r.branch.iter())) {
            if m {
                tokens += 1;
                by_reason[reason as usize] += 1;
                if matches!(case.cfg.objective, Objective::PpoClip { .. }) {
                    branches[br as usize] += 1;
                }
            }
        }
        clear += r
            .margin
            .iter()
            .zip(case.mask.iter())
            .filter(|&(&g, &m)| m && g >= 1e-3)
            .count();
        empty_rows += case.row_lengths().iter().filter(|&&t| t == 0).count();
        if let (Some((old, _)), Divergence::TopkTv | Divergence::TopkKl) =
            (&case.topk, case.cfg.divergence)
        {
            topk_full += old
                .lanes(cppo::ndarray::Axis(2))
                .into_iter()
                .filter(|p| (1.0 - p.iter().map(|x: &f64| x.exp()).sum::<f64>()).abs() < 1e-12)
                .count();
        }
    }
    eprintln!(
        "tokens {tokens}, reasons {by_reason:?}, ppo_clip branches {branches:?}, \
         empty rows {empty_rows}, full top-K {topk_full}, clear of f32 margins {clear}"
    );
    // The f32 comparison skips tokens near a decision boundary: few of them.
    assert!(clear > tokens * 9 / 10, "{clear} of {tokens}");
    assert!(by_reason[1] > tokens / 4, "feasible");
    for (code, &n) in by_reason.iter().enumerate().skip(2) {
        assert!(n > tokens / 100, "reason {code}: {n} of {tokens}");
    }
    assert!(
        branches.iter().all(|&n| n > 10),
        "ppo_clip branches {branches:?}"
    );
    assert!(empty_rows > 50 && topk_full > 200);
}

// ---------------------------------------------------------------------------------------
// Two bugs the properties found, fixed: their minimal repros
// ---------------------------------------------------------------------------------------

/// The array and position an error names.
fn located(e: &Error) -> Option<(&'static str, At)> {
    match e {
        Error::NonFinite { array, at, .. } | Error::PositiveLogProb { array, at, .. } => {
            Some((array, *at))
        }
        _ => None,
    }
}

/// Under TRM with a KL penalty, `evaluate` reads the whole row's divergence inputs
/// first (for the row's decision); it must still report a bad `logp_ref` at column 0
/// before a bad `logp` at column 1, as `Batch::validate` does (the bug the properties
/// found, now fixed).
#[test]
fn trm_reports_logp_ref_in_column_order() {
    use cppo::ndarray::array;
    let logp = array![[-0.1, f64::NAN]];
    let logp_old = array![[-0.2, -0.2]];
    let logp_ref = array![[f64::NAN, -0.3]];
    let adv = array![1.0];
    let mask = array![[true, true]];
    let batch = Batch::new(&logp, &logp_old, &adv, &mask)
        .unwrap()
        .with_logp_ref(&logp_ref)
        .unwrap();
    let cfg = Config {
        kl: Some(KlPenalty {
            estimator: KlEstimator::K3,
            coef: 0.1,
        }),
        ..Config::with_rule(Rule::TrmMax { delta: 0.2 })
    };
    let from_validate = batch.validate().unwrap_err();
    let from_evaluate = evaluate(&cfg, &batch, Par::Seq).unwrap_err();
    assert_eq!(located(&from_validate), Some(("logp_ref", At::new(0, 0))));
    assert_eq!(located(&from_evaluate), located(&from_validate));
}

/// A NaN mask value in a later row must not be reported before a bad value in an
/// earlier row (it was, when `evaluate` checked the whole mask first; now fixed).
#[test]
fn mask_errors_keep_row_major_order() {
    use cppo::ndarray::array;
    let logp = array![[f64::NAN], [-0.1]];
    let logp_old = array![[-0.1], [-0.1]];
    let adv = array![1.0, 1.0];
    let mask = array![[1.0], [f64::NAN]];
    let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
    let from_validate = batch.validate().unwrap_err();
    let from_evaluate = evaluate(&Config::dppo(), &batch, Par::Seq).unwrap_err();
    assert_eq!(located(&from_validate), Some(("logp", At::new(0, 0))));
    assert_eq!(located(&from_evaluate), located(&from_validate));
}
