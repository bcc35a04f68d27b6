//! The ranges the crate accepts, and what it does at their edges: one place for every
//! bound that keeps the outputs finite.
//!
//! The promise: every `Ok` the crate returns is finite, in `f32` too: the loss, every
//! per-token output, every per-row output and every number of the diagnostics, except
//! the NaNs the docs name (`threshold` under the `none` and `ratio` rules, `delta_b_row`
//! without a budget). Inputs and config values outside these ranges are typed errors
//! that name the array and position, or the config field; nothing is silently clamped
//! but the two clamps of the table, which are part of the math.
//!
//! | quantity | accepted | outside |
//! |---|---|---|
//! | a log-prob at a response position (`logp`, `logp_old`, the top-K pair, `logp_ref`) | [[`MIN_LOGPROB`], [`LOGP_TOLERANCE`]]; (0, 1e-4] reads as 0 | NaN/±∞: [`Error::NonFinite`]; above: [`Error::PositiveLogProb`]; below: [`Error::OutOfRange`] |
//! | an advantage at a response position | \|A\| ≤ [`MAX_ABS_ADVANTAGE`] | [`Error::NonFinite`], [`Error::OutOfRange`] |
//! | an IS weight at a response position | [0, [`MAX_IS_WEIGHT`]] | NaN/±∞: [`Error::NonFinite`]; below 0: [`Error::Negative`]; above: [`Error::OutOfRange`] |
//! | a float mask value, anywhere | finite | [`Error::NonFinite`] |
//! | any value at a non-response position | anything | never read |
//! | the log-ratio r = logp − logp_old | clamped to ±[`LOG_RATIO_CLAMP`](crate::objective::LOG_RATIO_CLAMP) (20) before ρ = eʳ | — |
//! | the KL penalty's x = logp_ref − logp | clamped to ±20 | — |
//! | a real-valued config parameter (δ, δ_b, the calibration's scale and ceiling, the sigmoid gate's τ, ε's, caps, clips, the KL coefficient) | its own lower bound (0, or 1 for a ceiling or a dual clip) up to [`MAX_PARAM`] | [`Error::InvalidConfig`] naming the field |
//! | SAPO's temperatures (`objective.tau_pos`, `objective.tau_neg`) | [[`MIN_TEMPERATURE`], [`MAX_PARAM`]] | [`Error::InvalidConfig`] |
//! | w_min, the calibration's quantile | (0, 1] | [`Error::InvalidConfig`] |
//! | a deserialized chunk [`Carry`](crate::chunk::Carry)'s S and W; its MinPRO minimum | [0, [`MAX_CARRY_SUM`]]; (0, e²⁰ (1 + 10⁻¹²)] or +∞ | refused when deserialized |
//!
//! Why these bounds suffice (every output is a product or sum of bounded terms):
//! ρ ≤ e²⁰ < 4.9·10⁸; |A| ≤ 10⁹; |logp| ≤ 10⁴; an IS weight ≤ 10⁶; every divergence of one token is at most
//! about 2·10⁴ (a KL term is a probability times a difference of two log-probs, or a
//! constant); every config parameter is at most 10⁶. A per-token term is then below
//! 10³⁴ and a row's prefix sums below 10³⁸ / 10⁴ for any row that fits in memory, inside
//! `f32`'s 3.4·10³⁸; the loss and the diagnostics are f64. The fuzzer (`cppo-fuzz`)
//! checks the promise on hostile values at and beyond these edges.
//!
//! Real data sits far inside: log-probs of sampled tokens are above about −100 (the
//! logit range of a model), advantages are of order 1 to a few thousand, and the
//! papers' parameters are below 10.
//!
//! ```
//! use cppo::limits::{MIN_LOGPROB, MAX_PARAM};
//! use cppo::ndarray::array;
//! use cppo::{Batch, Config, Error, Par, Rule, evaluate};
//! let (adv, mask) = (array![1.0], array![[true, true]]);
//! let ok = array![[MIN_LOGPROB, -0.5]];
//! assert!(evaluate(&Config::cppo(), &Batch::new(&ok, &ok, &adv, &mask)?, Par::Seq).is_ok());
//! let low = array![[-2e4, -0.5]];
//! let err = evaluate(&Config::cppo(), &Batch::new(&low, &ok, &adv, &mask)?, Par::Seq);
//! assert!(matches!(err, Err(Error::OutOfRange { array: "logp", limit: MIN_LOGPROB, .. })));
//!
//! let huge = Config { rule: Rule::Dppo { delta: 2.0 * MAX_PARAM }, ..Config::dppo() };
//! assert!(matches!(huge.validate(), Err(Error::InvalidConfig { field: "rule.delta", .. })));
//! # Ok::<(), cppo::Error>(())
//! ```

use crate::error::{Error, Result};

/// The lowest log-prob a response position may hold: −10⁴ (a probability of e^−10000).
///
/// A sampled token's log-prob is bounded by the model's logit range, far above this;
/// the bound keeps the objectives that multiply by a log-prob (`detached_is`, `cispo`,
/// `minpro`) and the KL divergences' sums finite in `f32`. A lower value is
/// [`Error::OutOfRange`] with `limit` = `MIN_LOGPROB`.
pub const MIN_LOGPROB: f64 = -1e4;

/// Log-probabilities in (0, `LOGP_TOLERANCE`] are read as 0 (bf16 rounding of a
/// probability of 1); anything larger is [`Error::PositiveLogProb`].
///
/// ```
/// use cppo::{limits::LOGP_TOLERANCE, ndarray::array, Batch};
/// let (adv, mask) = (array![1.0], array![[true]]);
/// let ok = array![[LOGP_TOLERANCE]]; // read as 0
/// assert!(Batch::new(&ok, &ok, &adv, &mask)?.validate().is_ok());
/// let bad = array![[2.0 * LOGP_TOLERANCE]];
/// assert!(Batch::new(&bad, &ok, &adv, &mask)?.validate().is_err());
/// # Ok::<(), cppo::Error>(())
/// ```
pub const LOGP_TOLERANCE: f64 = 1e-4;

/// The largest |A| an advantage may have at a response position: 10⁹.
///
/// Real advantages are of order 1 (normalized) to a few thousand (raw returns). The bound
/// keeps every output finite, in f32 too (|token_loss| ≤ e²⁰ · 10⁹ · 10⁴ under the
/// objectives that multiply by a log-prob), and the exact fixed-point sums of the
/// sequence-level objectives far from their range. A larger value is
/// [`Error::OutOfRange`] with `limit` = ±`MAX_ABS_ADVANTAGE` (the sign of the value).
///
/// ```
/// use cppo::{Batch, Config, Error, Par, evaluate};
/// use cppo::limits::MAX_ABS_ADVANTAGE;
/// use cppo::ndarray::array;
/// let (lp, mask) = (array![[-0.5, -0.7]], array![[true, true]]);
/// let ok = array![[MAX_ABS_ADVANTAGE, -MAX_ABS_ADVANTAGE]];
/// assert!(evaluate(&Config::cppo(), &Batch::new(&lp, &lp, &ok, &mask)?, Par::Seq).is_ok());
/// let bad = array![[1.0, -1e19]];
/// let err = evaluate(&Config::cppo(), &Batch::new(&lp, &lp, &bad, &mask)?, Par::Seq);
/// assert!(matches!(err, Err(Error::OutOfRange { array: "advantages", limit: -1e9, .. })));
/// # Ok::<(), cppo::Error>(())
/// ```
pub const MAX_ABS_ADVANTAGE: f64 = 1e9;

/// The largest IS weight a response position may hold: 10⁶.
///
/// Rollout-correction weights are truncated far below this (verl's and TIS's caps are
/// of order 2 to 10); the bound keeps a weighted term inside `f32`'s range. A larger
/// value is [`Error::OutOfRange`] with `limit` = `MAX_IS_WEIGHT`.
///
/// ```
/// use cppo::{Batch, Config, Error, Par, evaluate, limits::MAX_IS_WEIGHT};
/// use cppo::ndarray::array;
/// let (lp, adv, mask) = (array![[-0.5]], array![1.0], array![[true]]);
/// let w = array![[2.0 * MAX_IS_WEIGHT]];
/// let batch = Batch::new(&lp, &lp, &adv, &mask)?.with_is_weights(&w)?;
/// let err = evaluate(&Config::cppo(), &batch, Par::Seq).unwrap_err();
/// assert!(matches!(err, Error::OutOfRange { array: "is_weights", .. }));
/// # Ok::<(), cppo::Error>(())
/// ```
pub const MAX_IS_WEIGHT: f64 = 1e6;

/// The largest value of any real-valued config parameter: 10⁶.
///
/// Thresholds, budgets, ε's, caps and coefficients beyond it mean "never" in every
/// setting the crate serves (a TV divergence is at most 1, the papers' parameters are
/// below 10), and would let products such as δ_b · W or β · x² leave `f32`'s range.
///
/// ```
/// use cppo::{Config, Error, KlEstimator, KlPenalty};
/// let kl = KlPenalty { estimator: KlEstimator::K3, coef: 1e7 };
/// let cfg = Config { kl: Some(kl), ..Config::dppo() };
/// assert!(matches!(cfg.validate(), Err(Error::InvalidConfig { field: "kl.coef", .. })));
/// ```
pub const MAX_PARAM: f64 = 1e6;

/// The smallest SAPO temperature (`tau_pos`, `tau_neg`): 10⁻⁶. SAPO's loss carries a
/// factor 4/τ, which a smaller τ would take past `f32`'s range. (The sigmoid gate's τ
/// needs no floor: a gate saturates to 0 or 1.)
///
/// ```
/// use cppo::{Config, Error, Objective};
/// let sapo = Config { objective: Objective::Sapo { tau_pos: 5e-324, tau_neg: 1.05 }, ..Config::dppo() };
/// assert!(matches!(sapo.validate(), Err(Error::InvalidConfig { field: "objective.tau_pos", .. })));
/// ```
pub const MIN_TEMPERATURE: f64 = 1e-6;

/// The largest prefix sum S or W a deserialized column-chunk [`Carry`](crate::chunk::Carry)
/// may hold: 10³⁰.
///
/// A real row's S is at most its tokens times a token's largest divergence (about
/// 2·10⁴), and W at most its tokens, far below this for any row that fits in memory; a
/// larger value can only be hand-written, and would take the thresholds of the next
/// chunk past `f32`'s range. A carry's MinPRO minimum is bounded too: at most the
/// largest ratio e²⁰ (times 1 + 10⁻¹², for the rounding of ρ = p/q), or +∞ before the
/// row's first token.
///
/// ```
/// let bad = r#"{"col": 6, "t": 0, "s": 1e31, "w": 0.0, "min_ratio": 1.0}"#;
/// assert!(serde_json::from_str::<cppo::chunk::Carry>(bad).is_err());
/// let bad = r#"{"col": 6, "t": 0, "s": 0.5, "w": 5e-324, "min_ratio": 1e300}"#;
/// assert!(serde_json::from_str::<cppo::chunk::Carry>(bad).is_err());
/// ```
pub const MAX_CARRY_SUM: f64 = 1e30;

/// `Ok` if `ok`, else an [`Error::InvalidConfig`] for `field` saying it must be `what`.
pub(crate) fn check(ok: bool, field: &'static str, what: &str, value: f64) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            reason: format!("must be {what}, got {value}"),
        })
    }
}

/// A parameter in (0, [`MAX_PARAM`]].
pub(crate) fn check_positive(field: &'static str, value: f64) -> Result<()> {
    check(
        value > 0.0 && value <= MAX_PARAM,
        field,
        "> 0 and at most 1e6",
        value,
    )
}

/// A parameter in [0, [`MAX_PARAM`]].
pub(crate) fn check_nonnegative(field: &'static str, value: f64) -> Result<()> {
    check(
        (0.0..=MAX_PARAM).contains(&value),
        field,
        "in [0, 1e6]",
        value,
    )
}

/// A parameter in [`low`, [`MAX_PARAM`]] (a ceiling ≥ 1, a dual clip > 1 is checked
/// apart).
pub(crate) fn check_at_least(field: &'static str, low: f64, value: f64) -> Result<()> {
    // (No message is formatted for a valid value: validation allocates nothing.)
    if (low..=MAX_PARAM).contains(&value) {
        Ok(())
    } else {
        check(false, field, &format!("in [{low}, 1e6]"), value)
    }
}

/// A temperature in [[`MIN_TEMPERATURE`], [`MAX_PARAM`]].
pub(crate) fn check_temperature(field: &'static str, value: f64) -> Result<()> {
    check_at_least(field, MIN_TEMPERATURE, value)
}
