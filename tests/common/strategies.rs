//! proptest strategies for valid cases: ragged rows, holes, empty rows, garbage in the
//! padding, per-row or per-token advantages (zeros included), top-K arrays with K from
//! 1 to 5 (masses summing to about 1 included), IS weights (zeros included), and configs
//! over every divergence, rule (CPPO's positions, calibrations and gates included),
//! objective, aggregation and KL estimator.

use std::ops::RangeInclusive;

use cppo::budget::Calibration;
use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{
    Aggregation, Config, CppoParams, Divergence, Gate, KlEstimator, KlPenalty, Numerics, Objective,
    Positions, Rule,
};
use proptest::prelude::*;
use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

use super::cases::{Adv, Case};
use super::rng::{mix, unit};

/// Failures persist in `proptest-regressions/<name>.txt` at the crate root (committed).
pub fn persistence(name: &'static str) -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(name)))
}

/// A proptest config with `cases` cases and the crate's regression files.
pub fn proptest_config(cases: u32, regressions: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: persistence(regressions),
        ..ProptestConfig::default()
    }
}

/// A config, and how much to add to the batch's own counts for the `num_tokens` and
/// `num_seqs` overrides (which must not be smaller than the batch's own counts).
#[derive(Clone, Copy, Debug)]
pub struct ConfigDraw {
    pub cfg: Config,
    pub extra_tokens: Option<u64>,
    pub extra_seqs: Option<u64>,
}

pub fn divergence_strategy() -> BoxedStrategy<Divergence> {
    prop_oneof![
        Just(Divergence::BinaryTv),
        Just(Divergence::BinaryKl),
        Just(Divergence::TopkTv),
        Just(Divergence::TopkKl),
        Just(Divergence::K2),
        Just(Divergence::K3),
    ]
    .boxed()
}

/// δ: mostly in [0.01, 0.6], sometimes tiny so that most tokens fail the test.
pub fn delta_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.01f64..0.6,
        1 => 1e-4f64..0.01,
    ]
}

pub fn delta_b_strategy() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0.0)),
        5 => (0.0f64..0.3).prop_map(Some),
    ]
}

pub fn w_min_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(1.0), 4 => 0.05f64..=1.0]
}

pub fn horizon_strategy() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 2 => (1usize..15).prop_map(Some)]
}

pub fn positions_strategy() -> impl Strategy<Value = Positions> {
    prop_oneof![3 => Just(Positions::Response), 2 => Just(Positions::Column)]
}

/// A fixed budget (`None`), the paper's calibration, or one drawn over its whole range
/// (q in (0, 1], k in [0, 3] with 0 included, c in [1, 5]).
pub fn calibration_strategy() -> impl Strategy<Value = Option<Calibration>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Calibration::default())),
        2 => (
            prop_oneof![1 => Just(1.0), 4 => 0.01f64..=1.0],
            prop_oneof![1 => Just(0.0), 4 => 0.0f64..3.0],
            prop_oneof![1 => Just(1.0), 4 => 1.0f64..5.0],
        )
            .prop_map(|(quantile, scale, ceiling)| Some(Calibration { quantile, scale, ceiling })),
    ]
}

/// CPPO's parameters (hard mask), every field drawn but the shuffle.
pub fn cppo_params_strategy() -> BoxedStrategy<CppoParams> {
    (
        delta_strategy(),
        delta_b_strategy(),
        w_min_strategy(),
        horizon_strategy(),
        positions_strategy(),
        calibration_strategy(),
    )
        .prop_map(
            |(delta, delta_b, w_min, horizon, positions, calibration)| CppoParams {
                delta,
                delta_b,
                w_min,
                horizon,
                positions,
                calibration,
                shuffle_seed: None,
                gate: None,
            },
        )
        .boxed()
}

pub fn cppo_strategy() -> BoxedStrategy<Rule> {
    cppo_params_strategy().prop_map(Rule::Cppo).boxed()
}

pub fn gate_strategy() -> impl Strategy<Value = Gate> {
    prop_oneof![
        2 => Just(Gate::Inverse),
        1 => (0.001f64..0.5).prop_map(|tau| Gate::Sigmoid { tau }),
    ]
}

pub fn rule_strategy() -> BoxedStrategy<Rule> {
    prop_oneof![
        1 => Just(Rule::None),
        2 => (0.0f64..0.5, 0.0f64..0.5)
            .prop_map(|(eps_low, eps_high)| Rule::Ratio { eps_low, eps_high }),
        2 => delta_strategy().prop_map(|delta| Rule::Dppo { delta }),
        5 => cppo_strategy(),
        2 => (cppo_params_strategy(), gate_strategy())
            .prop_map(|(p, gate)| Rule::Cppo(CppoParams { gate: Some(gate), ..p })),
        1 => delta_strategy().prop_map(|delta| Rule::TrmMax { delta }),
        1 => delta_strategy().prop_map(|delta| Rule::TrmAvg { delta }),
    ]
    .boxed()
}

pub fn objective_strategy() -> BoxedStrategy<Objective> {
    prop_oneof![
        Just(Objective::Surrogate),
        (0.1f64..12.0).prop_map(|ratio_cap| Objective::DetachedIs { ratio_cap }),
        (
            0.0f64..0.5,
            0.0f64..0.5,
            prop_oneof![Just(None), (1.01f64..5.0).prop_map(Some)]
        )
            .prop_map(|(eps_low, eps_high, dual_clip)| Objective::PpoClip {
                eps_low,
                eps_high,
                dual_clip
            }),
        (0.0f64..0.5).prop_map(|eps_high| Objective::Cispo { eps_high }),
        (0.1f64..3.0, 0.1f64..3.0)
            .prop_map(|(tau_pos, tau_neg)| Objective::Sapo { tau_pos, tau_neg }),
    ]
    .boxed()
}

/// Every objective, the whole-row ones (GSPO, GMPO, MinPRO) included: the token-level
/// ones of [`objective_strategy`] most of the time.
pub fn objective_mix() -> BoxedStrategy<Objective> {
    prop_oneof![
        5 => objective_strategy(),
        1 => (0.0f64..0.01, 0.0f64..0.01)
            .prop_map(|(eps_low, eps_high)| Objective::Gspo { eps_low, eps_high }),
        1 => (0.0f64..1.0, 0.0f64..1.0)
            .prop_map(|(eps_low, eps_high)| Objective::Gmpo { eps_low, eps_high }),
        1 => (
            any::<bool>(),
            prop_oneof![Just(None), (0.0f64..0.5).prop_map(Some)],
            any::<bool>(),
        )
            .prop_map(|(include_current, clip, stop_gradient)| Objective::Minpro {
                include_current,
                clip,
                stop_gradient,
            }),
    ]
    .boxed()
}

pub fn aggregation_strategy() -> impl Strategy<Value = Aggregation> {
    prop_oneof![
        Just(Aggregation::TokenMean),
        Just(Aggregation::SeqMeanTokenMean),
        Just(Aggregation::SeqMeanTokenSum),
        Just(Aggregation::SeqMeanTokenSumNorm),
    ]
}

pub fn kl_estimator_strategy() -> impl Strategy<Value = KlEstimator> {
    prop_oneof![
        Just(KlEstimator::K1),
        Just(KlEstimator::K2),
        Just(KlEstimator::K3)
    ]
}

pub fn kl_strategy() -> impl Strategy<Value = Option<KlPenalty>> {
    prop_oneof![
        2 => Just(None),
        3 => (kl_estimator_strategy(), 0.0f64..1.0)
            .prop_map(|(estimator, coef)| Some(KlPenalty { estimator, coef })),
    ]
}

/// Any valid config: every divergence, rule, objective, aggregation and KL estimator,
/// with and without `norm_length` and count overrides.
pub fn config_strategy() -> impl Strategy<Value = ConfigDraw> {
    config_with(rule_strategy(), objective_strategy())
}

/// A config with the given rule and objective strategies, everything else drawn.
pub fn config_with(
    rule: impl Strategy<Value = Rule>,
    objective: impl Strategy<Value = Objective>,
) -> impl Strategy<Value = ConfigDraw> {
    (
        divergence_strategy(),
        rule,
        objective,
        aggregation_strategy(),
        prop_oneof![3 => Just(None), 1 => (1usize..20).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (0u64..50).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (0u64..5).prop_map(Some)],
        kl_strategy(),
    )
        .prop_map(
            |(divergence, rule, objective, aggregation, norm_length, et, es, kl)| ConfigDraw {
                cfg: Config {
                    divergence,
                    rule,
                    objective,
                    aggregation,
                    norm_length,
                    num_tokens: None,
                    num_seqs: None,
                    kl,
                    numerics: Numerics::Exact,
                },
                extra_tokens: et,
                extra_seqs: es,
            },
        )
}

/// Batch shape and content options.
#[derive(Clone, Debug)]
pub struct Shape {
    pub rows: RangeInclusive<usize>,
    pub cols: RangeInclusive<usize>,
    /// Keep |logp − logp_old| below 19 and logp below −1e-3 (for finite differences).
    pub smooth: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            rows: 0..=6,
            cols: 0..=9,
            smooth: false,
        }
    }
}

/// Random draws for one token, mapped to values by `build`.
type TokenRaw = (u32, [f64; 6]);
/// Random draws for one token's top-K arrays.
type TopkRaw = (u32, [f64; 11]);
/// Random draws for one row: (mask density selector, advantage selector, advantage).
type RowRaw = (u8, u8, f64);

/// Valid cases under configs from `cfg`.
pub fn case_with(
    cfg: impl Strategy<Value = ConfigDraw>,
    shape: Shape,
) -> impl Strategy<Value = Case<f64>> {
    let smooth = shape.smooth;
    (
        cfg,
        shape.rows,
        shape.cols,
        1usize..=5,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(move |(draw, b, l, k, per_row, extra_topk, seed)| {
            let with_topk = draw.cfg.divergence.needs_topk() || extra_topk;
            let n = b * l;
            (
                Just(draw),
                Just((b, l, if with_topk { k } else { 0 }, per_row, seed, smooth)),
                proptest::collection::vec((any::<u32>(), prop::array::uniform6(0.0f64..1.0)), n),
                proptest::collection::vec((any::<u8>(), any::<u8>(), 0.0f64..1.0), b),
                proptest::collection::vec(
                    (any::<u32>(), prop::array::uniform11(0.0f64..1.0)),
                    if with_topk { n } else { 0 },
                ),
            )
        })
        .prop_map(|(draw, params, tokens, rows, topk)| build(draw, params, &tokens, &rows, &topk))
}

/// Wide rows: the engine works in blocks of columns, so rows must cross block
/// boundaries (at 64 and 128 columns today) with their prefix state.
pub fn wide() -> Shape {
    Shape {
        rows: 0..=3,
        cols: 56..=150,
        smooth: false,
    }
}

/// Valid cases under any config: mostly small batches, a quarter with wide rows.
pub fn any_case() -> impl Strategy<Value = Case<f64>> {
    prop_oneof![
        3 => case_with(config_strategy(), Shape::default()),
        1 => case_with(config_strategy(), wide()),
    ]
}

fn reflect(x: f64) -> f64 {
    if x > 0.9e-4 { -x } else { x }
}

fn build(
    draw: ConfigDraw,
    (b, l, kk, per_row, seed, smooth): (usize, usize, usize, bool, u64, bool),
    tokens: &[TokenRaw],
    rows: &[RowRaw],
    topk: &[TopkRaw],
) -> Case<f64> {
    let mut mask = Array2::from_elem((b, l), false);
    let mut logp = Array2::zeros((b, l));
    let mut logp_old = Array2::zeros((b, l));
    let mut adv_tok = Array2::zeros((b, l));
    let mut logp_ref = Array2::zeros((b, l));
    let mut is_weights = Array2::zeros((b, l));
    let mut adv_row = Array1::zeros(b);
    let adv_value = |sel: u8, u: f64| {
        if sel.is_multiple_of(5) {
            0.0
        } else {
            (u - 0.5) * 4.0
        }
    };
    for i in 0..b {
        let (dens, asel, au) = rows[i];
        let density = [0.0, 1.0, 0.6, 0.6, 0.85, 0.85][dens as usize % 6];
        adv_row[i] = adv_value(asel, au);
        for j in 0..l {
            let (sel, u) = tokens[i * l + j];
            mask[[i, j]] = u[0] < density;
            // logp_old
            let lq = match sel % 20 {
                0 => 0.0,
                1 => 1e-6 + u[1] * 0.89e-4,
                2 if !smooth => -20.0 - u[1] * 20.0,
                // Probabilities that underflow to subnormals or 0.
                19 if !smooth => -700.0 - u[1] * 1000.0,
                3..=6 => -u[1] * 0.1,
                _ => -u[1] * 6.0,
            };
            // logp, relative to it
            let lp = match (sel / 20) % 10 {
                0 | 1 => lq,
                2..=5 => reflect(lq + (u[2] - 0.5) * 0.4),
                6 | 7 => reflect(lq + (u[2] - 0.5) * 4.0),
                8 => u[2] * 0.9e-4,
                _ if !smooth && u[5] < 0.25 => -700.0 - u[2] * 1000.0,
                _ if !smooth => -u[2] * 30.0,
                _ => reflect(lq + (u[2] - 0.5) * 8.0),
            };
            let (lq, lp) = if smooth {
                // Away from the (0, 1e-4] → 0 fold, and from the ratio clamp.
                let lq = lq.min(-2e-3);
                let lp = lp.min(-2e-3);
                (lq, lp.clamp(lq - 18.0, lq + 18.0))
            } else {
                (lq, lp)
            };
            logp_old[[i, j]] = lq;
            logp[[i, j]] = lp;
            adv_tok[[i, j]] = adv_value((sel >> 10) as u8, u[3]);
            logp_ref[[i, j]] = reflect(lp + (u[4] - 0.5) * 3.0);
            // IS weights around 1, a tenth of them exactly 0.
            is_weights[[i, j]] = if sel % 10 == 7 { 0.0 } else { 0.2 + u[5] * 2.0 };
        }
    }

    let topk = (kk > 0).then(|| {
        let mut old = Array3::zeros((b, l, kk));
        let mut new = Array3::zeros((b, l, kk));
        for i in 0..b {
            for j in 0..l {
                let (sel, u) = topk[i * l + j];
                // Rollout masses from exponential weights; the rest bucket is empty for
                // a third of the tokens (masses summing to 1 up to rounding).
                let wts: Vec<f64> = (0..kk).map(|k| -(1.0 - u[k]).ln() + 1e-3).collect();
                let rest = if sel.is_multiple_of(3) {
                    0.0
                } else {
                    -(1.0 - u[5]).ln() * 2.0
                };
                let total: f64 = wts.iter().sum::<f64>() + rest;
                for k in 0..kk {
                    let lpk = (wts[k] / total).ln();
                    let noise = match (sel >> 4) % 6 {
                        0 => 0.0,
                        1 | 2 => (u[6 + k] - 0.5) * 0.4,
                        3 | 4 => (u[6 + k] - 0.5) * 4.0,
                        // Q_k underflows: the top-K KL head term becomes huge.
                        _ => -700.0 * u[6 + k],
                    };
                    old[[i, j, k]] = lpk.min(0.0);
                    new[[i, j, k]] = (lpk + noise).min(0.0);
                }
            }
        }
        (old, new)
    });

    let case = Case {
        cfg: draw.cfg,
        logp,
        logp_old,
        adv: if per_row {
            Adv::Row(adv_row)
        } else {
            Adv::Token(adv_tok)
        },
        mask,
        topk,
        logp_ref: None,
        is_weights: seed.is_multiple_of(4).then_some(is_weights),
    };
    finish_drawn(case, &draw, logp_ref, seed)
}

/// Completes a drawn case: the draw's count overrides on top of the case's own counts,
/// `logp_ref` where the config reads it (and for one seed in three), and garbage in every
/// padding slot (trainers pad with anything).
pub fn finish_drawn(
    mut case: Case<f64>,
    draw: &ConfigDraw,
    logp_ref: Array2<f64>,
    seed: u64,
) -> Case<f64> {
    let lens: Vec<u64> = case
        .mask
        .rows()
        .into_iter()
        .map(|r| r.iter().filter(|&&m| m).count() as u64)
        .collect();
    let tokens: u64 = lens.iter().sum();
    let seqs = lens.iter().filter(|&&t| t > 0).count() as u64;
    case.cfg.num_tokens = draw.extra_tokens.map(|e| tokens + e);
    case.cfg.num_seqs = draw.extra_seqs.map(|e| seqs + e);
    case.logp_ref = (case.cfg.kl.is_some() || seed.is_multiple_of(3)).then_some(logp_ref);
    case.fill_garbage(seed);
    case
}

/// A large case from a seed, without proptest's per-value draws (for the thread-count
/// properties, which need batches of several leaf blocks).
pub fn big_case(cfg: ConfigDraw, b: usize, l: usize, k: usize, seed: u64) -> Case<f64> {
    let n = b * l;
    let h = |x: u64| mix(seed ^ mix(x));
    let tokens: Vec<TokenRaw> = (0..n as u64)
        .map(|t| {
            let mut u = [0.0; 6];
            for (c, v) in u.iter_mut().enumerate() {
                *v = unit(h(t * 64 + c as u64));
            }
            (h(t * 64 + 63) as u32, u)
        })
        .collect();
    let rows: Vec<RowRaw> = (0..b as u64)
        .map(|r| {
            let x = h((1 << 40) | r);
            (x as u8, (x >> 8) as u8, unit(h((2 << 40) | r)))
        })
        .collect();
    let topk: Vec<TopkRaw> = if k > 0 {
        (0..n as u64)
            .map(|t| {
                let mut u = [0.0; 11];
                for (c, v) in u.iter_mut().enumerate() {
                    *v = unit(h((3 << 40) | (t * 64 + c as u64)));
                }
                (h((4 << 40) | t) as u32, u)
            })
            .collect()
    } else {
        Vec::new()
    };
    build(
        cfg,
        (b, l, k, seed.is_multiple_of(2), seed, false),
        &tokens,
        &rows,
        &topk,
    )
}
