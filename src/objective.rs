//! PPO-style objectives, the KL penalty, and their exact per-token gradients.
//!
//! Per token, with keep M (a constant), ratio ρ = exp(clamp(logp − logp_old, −20, 20))
//! and advantage A, each objective gives a loss l and its gradient g = ∂l/∂logp:
//!
//! | objective | l | g |
//! |---|---|---|
//! | `surrogate` (the paper's) | −M ρ A | −M ρ A |
//! | `detached_is` (DPPO's REINFORCE path) | −M min(ρ, C) A logp | −M min(ρ, C) A |
//! | `ppo_clip` | M max(−ρA, −clip(ρ, 1−ε_low, 1+ε_high) A) | −M ρ A on the unclipped branch, else 0 |
//! | `cispo` | −M min(ρ, 1+ε_high) A logp | −M min(ρ, 1+ε_high) A |
//! | `sapo` | −M A (4/τ) σ(τ(ρ − 1)) | −4 M A ρ σ (1 − σ), σ = σ(τ(ρ − 1)) |
//!
//! Two objectives act on a whole-row quantity, computed in a first sweep of the row (and
//! carried across column chunks as exact fixed-point sums), in verl's token-level form:
//! every token's loss has the sequence value, and its gradient is the sequence
//! quantity's derivative through its own log-prob (r_t = logp_t − logp_old_t, clamped):
//!
//! | objective | l_t | g_t |
//! |---|---|---|
//! | `gspo` | M max(−A s, −clip(s, 1−ε_low, 1+ε_high) A), s = exp(min(mean r, 10)) | −M A s on the unclipped branch, else 0 |
//! | `gmpo` | −M A R, R = exp(mean r̃), r̃_t = sgn(A) min(sgn(A) r_t, sgn(A) clamp(r_t, −ε_low, ε_high)) | −M Ā R where r̃_t = r_t, else 0 |
//!
//! Ā is the row's mean advantage. With every token kept and `seq-mean-token-mean`, the
//! gradient equals that of the sequence-level objectives: (1/|y|) A s for GSPO (Zheng et
//! al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071; verl's `gspo`, with
//! its clamp of the sequence log-ratio at 10), and GMPO's (Zhao et al. 2025, "Geometric-Mean
//! Policy Optimization", arXiv 2507.20673). `ppo_clip`'s `clip_frac` counts, for GSPO, the
//! tokens of clipped sequences; for GMPO, the clipped tokens.
//!
//! `minpro` weighs each token by the minimum ratio over its prefix, so a token after a
//! strongly down-weighted one cannot be up-weighted: ω_t = min(m_t, 1 + clip) with
//! m_t = min_{s≤t} ρ_s (or s < t, and m_1 = 1, without `include_current`), and
//! l = −M ω_t A logp, g = −M ω_t A, ω detached. We know of no reference code for MinPRO; these
//! are our choices, each configurable: `include_current` (default true), `clip` (default
//! 0.28, as CISPO's ε_high) and `stop_gradient` (default true). Without the
//! stop-gradient, l = −M ω_t A and the gradient of token t's loss goes to the token s
//! holding its minimum, ∂ω_t/∂logp_s = ρ_s (where ω_t is not capped): an earlier column,
//! which one pass over a whole row can still write, but column chunks cannot, so
//! [`evaluate_chunk_into`](crate::chunk::evaluate_chunk_into) refuses it. The running
//! minimum is part of the column-chunk [`Carry`](crate::chunk::Carry).
//!
//! SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347)
//! replaces the clip with a soft gate whose temperature depends on the advantage's sign:
//! τ = τ_pos for A > 0, τ_neg otherwise (defaults 1.0 and 1.05, as in verl). At ρ = 1 its
//! gradient equals the surrogate's; it decays smoothly as ρ leaves 1.
//!
//! With `dual_clip` c > 1, `ppo_clip` also caps the loss of A < 0 tokens:
//! l = M min(max(...), −cA), with gradient 0 where the cap is the branch taken. In
//! `detached_is` and `cispo` the weight min(ρ, ·) is detached (a constant), as in the
//! papers' code. Ties between branches go to the unclipped one; they occur only inside
//! the clip range, where both branches have the same value and gradient, or on the
//! boundary itself, a set of measure zero.
//!
//! The optional KL penalty to a reference policy adds, per response token and before
//! aggregation, with x = clamp(logp_ref − logp, −20, 20) and coefficient β:
//!
//! | estimator | l | g |
//! |---|---|---|
//! | `k1` | −β x | β |
//! | `k2` | β x² / 2 | −β x |
//! | `k3` | β (eˣ − x − 1) | β (1 − eˣ) |
//!
//! The penalty is not masked by the trust region: it applies to every response token.
//! `x` is clamped to ±20 ([`LOG_RATIO_CLAMP`], as verl clamps it before k3's
//! exponential), so that every estimator stays finite whatever the log-probs (e^x would
//! overflow from x ≈ 710, and β·∞ is NaN at β = 0); as for the ratio, g is the closed
//! form at the clamped x. verl also clamps k3's value to [−10, 10], which zeroes its
//! gradient from x ≈ 2.6 on; this crate keeps the estimator exact there.
//!
//! ```
//! use cppo::objective::Objective;
//! let o = Objective::PpoClip { eps_low: 0.2, eps_high: 0.2, dual_clip: None };
//! // A > 0 and ρ above 1 + ε: the clipped branch, no gradient.
//! let t = o.eval(1.5, 1.0, -0.3);
//! assert!((t.loss - -1.2).abs() < 1e-15);
//! assert_eq!(t.grad, 0.0);
//! assert!(t.clipped);
//! ```

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::limits::{check, check_nonnegative, check_positive, check_temperature};

/// The default `ratio_cap` C of `detached_is` (the DPPO reference code's).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_RATIO_CAP};
/// let o: Objective = serde_json::from_str(r#"{"kind": "detached_is"}"#).unwrap();
/// assert_eq!(o, Objective::DetachedIs { ratio_cap: DEFAULT_RATIO_CAP });
/// ```
pub const DEFAULT_RATIO_CAP: f64 = 10.0;
/// The default `eps_high` of `cispo` (the CISPO paper's, as in MiniMax-M1).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_CISPO_EPS_HIGH};
/// let o: Objective = serde_json::from_str(r#"{"kind": "cispo"}"#).unwrap();
/// assert_eq!(o, Objective::Cispo { eps_high: DEFAULT_CISPO_EPS_HIGH });
/// ```
pub const DEFAULT_CISPO_EPS_HIGH: f64 = 0.28;
/// The clamp on the log-ratio logp − logp_old before exponentiation, and on the KL
/// penalty's x = logp_ref − logp.
///
/// ```
/// use cppo::objective::{ratio, LOG_RATIO_CLAMP};
/// assert_eq!(ratio(0.0, -50.0).1, LOG_RATIO_CLAMP);
/// assert_eq!(ratio(-50.0, 0.0).1, -LOG_RATIO_CLAMP);
/// ```
pub const LOG_RATIO_CLAMP: f64 = 20.0;

/// A per-token objective. Serialized as the config's `objective` object, tagged by
/// `kind` (see [`crate::doc::command_line`]).
///
/// ```
/// use cppo::Objective;
/// assert_eq!(Objective::default(), Objective::Surrogate);
/// // The surrogate −ρA: loss and gradient are equal.
/// let t = Objective::Surrogate.eval(1.25, 2.0, -0.3);
/// assert_eq!((t.loss, t.grad, t.clipped), (-2.5, -2.5, false));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Objective {
    /// The paper's importance-weighted surrogate −ρA.
    #[default]
    #[serde(deserialize_with = "no_params")]
    Surrogate,
    /// The DPPO reference code's REINFORCE path: −min(ρ, C) A logp, weight detached.
    DetachedIs {
        /// C ∈ (0, 1e6], default 10.
        #[serde(default = "default_ratio_cap")]
        ratio_cap: f64,
    },
    /// PPO's clipped objective, optionally with dual clip.
    PpoClip {
        /// ε_low ∈ [0, 1e6], default 0.2.
        #[serde(default = "default_eps")]
        eps_low: f64,
        /// ε_high ∈ [0, 1e6], default 0.2.
        #[serde(default = "default_eps")]
        eps_high: f64,
        /// Dual-clip constant c > 1 for A < 0, or `None`.
        #[serde(default)]
        dual_clip: Option<f64>,
    },
    /// CISPO: −min(ρ, 1 + ε_high) A logp, weight detached.
    Cispo {
        /// ε_high ∈ [0, 1e6], default 0.28.
        #[serde(default = "default_cispo_eps_high")]
        eps_high: f64,
    },
    /// GSPO: PPO's clip on the sequence ratio s = exp(mean_t r_t), in verl's token-level
    /// form.
    Gspo {
        /// ε_low ∈ [0, 1e6], default 3e-4 (the GSPO paper's).
        #[serde(default = "default_gspo_eps_low")]
        eps_low: f64,
        /// ε_high ∈ [0, 1e6], default 4e-4 (the GSPO paper's).
        #[serde(default = "default_gspo_eps_high")]
        eps_high: f64,
    },
    /// GMPO: the geometric mean of the token ratios, each clipped in log space.
    Gmpo {
        /// ε_low ∈ [0, 1e6] (log space), default 0.4 (the GMPO paper's).
        #[serde(default = "default_gmpo_eps")]
        eps_low: f64,
        /// ε_high ∈ [0, 1e6] (log space), default 0.4 (the GMPO paper's).
        #[serde(default = "default_gmpo_eps")]
        eps_high: f64,
    },
    /// MinPRO, as far as it is public: the token's weight is the minimum ratio over its
    /// prefix, ω_t = min(min_{s<t or s≤t} ρ_s, 1 + clip), detached; l = −ω A logp.
    Minpro {
        /// Whether token t's own ratio enters its minimum (default `true`).
        #[serde(default = "default_true")]
        include_current: bool,
        /// Caps the weight at 1 + clip; `None` (JSON `null`) for no cap. Default 0.28.
        #[serde(default = "default_minpro_clip", deserialize_with = "nullable_f64")]
        clip: Option<f64>,
        /// Whether the weight is detached (default `true`). Without it, the loss is −ω A and
        /// the gradient flows through the minimum to the token holding it; whole rows
        /// only (column chunks refuse it).
        #[serde(default = "default_true")]
        stop_gradient: bool,
    },
    /// SAPO: −A (4/τ) σ(τ(ρ − 1)), τ by the sign of A.
    Sapo {
        /// τ for A > 0, in [1e-6, 1e6], default 1.0.
        #[serde(default = "default_tau_pos")]
        tau_pos: f64,
        /// τ for A ≤ 0, in [1e-6, 1e6], default 1.05.
        #[serde(default = "default_tau_neg")]
        tau_neg: f64,
    },
}

/// A parameterless variant still refuses unknown fields (serde's internally tagged unit
/// variants would ignore them).
fn no_params<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    NoParams::deserialize(d).map(|_| ())
}

fn default_true() -> bool {
    true
}
fn default_minpro_clip() -> Option<f64> {
    Some(DEFAULT_MINPRO_CLIP)
}
/// Absent → the default, `null` → `None`.
fn nullable_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

/// MinPRO's default weight cap 1 + 0.28 (our choice, after CISPO's ε_high).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_MINPRO_CLIP};
/// let o: Objective = serde_json::from_str(r#"{"kind": "minpro"}"#).unwrap();
/// assert!(matches!(o, Objective::Minpro { clip: Some(c), .. } if c == DEFAULT_MINPRO_CLIP));
/// ```
pub const DEFAULT_MINPRO_CLIP: f64 = 0.28;

fn default_gspo_eps_low() -> f64 {
    3e-4
}
fn default_gspo_eps_high() -> f64 {
    4e-4
}
fn default_gmpo_eps() -> f64 {
    0.4
}
fn default_tau_pos() -> f64 {
    DEFAULT_SAPO_TAU_POS
}
fn default_tau_neg() -> f64 {
    DEFAULT_SAPO_TAU_NEG
}

/// SAPO's default τ for positive advantages (verl's, after the SAPO paper).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_SAPO_TAU_POS};
/// let o: Objective = serde_json::from_str(r#"{"kind": "sapo"}"#).unwrap();
/// assert!(matches!(o, Objective::Sapo { tau_pos, .. } if tau_pos == DEFAULT_SAPO_TAU_POS));
/// ```
pub const DEFAULT_SAPO_TAU_POS: f64 = 1.0;
/// SAPO's default τ for other advantages (verl's, after the SAPO paper).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_SAPO_TAU_NEG};
/// let o: Objective = serde_json::from_str(r#"{"kind": "sapo"}"#).unwrap();
/// assert!(matches!(o, Objective::Sapo { tau_neg, .. } if tau_neg == DEFAULT_SAPO_TAU_NEG));
/// ```
pub const DEFAULT_SAPO_TAU_NEG: f64 = 1.05;

fn default_ratio_cap() -> f64 {
    DEFAULT_RATIO_CAP
}
/// The default ε_low = ε_high = 0.2 of `ppo_clip` (PPO's).
///
/// ```
/// use cppo::objective::{Objective, DEFAULT_PPO_EPS};
/// let o: Objective = serde_json::from_str(r#"{"kind": "ppo_clip"}"#).unwrap();
/// let eps = DEFAULT_PPO_EPS;
/// assert_eq!(o, Objective::PpoClip { eps_low: eps, eps_high: eps, dual_clip: None });
/// ```
pub const DEFAULT_PPO_EPS: f64 = 0.2;

fn default_eps() -> f64 {
    DEFAULT_PPO_EPS
}
fn default_cispo_eps_high() -> f64 {
    DEFAULT_CISPO_EPS_HIGH
}

/// One token's objective value before masking.
///
/// ```
/// use cppo::Objective;
/// let cispo = Objective::Cispo { eps_high: 0.28 };
/// let t = cispo.eval(2.0, 1.0, -0.5); // ρ capped at 1.28, detached
/// assert_eq!((t.grad, t.clipped), (-1.28, true));
/// assert_eq!(t.loss, -1.28 * -0.5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTerm {
    /// The loss l (for M = 1).
    pub loss: f64,
    /// ∂l/∂logp (for M = 1).
    pub grad: f64,
    /// Whether a clip determined the value (`ppo_clip`'s clipped or dual branch, or
    /// `cispo`'s cap).
    pub clipped: bool,
}

impl Objective {
    /// The objective's name as in configs.
    ///
    /// ```
    /// use cppo::Objective;
    /// assert_eq!(Objective::Surrogate.name(), "surrogate");
    /// assert_eq!(Objective::DetachedIs { ratio_cap: 3.0 }.name(), "detached_is");
    /// ```
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Surrogate => "surrogate",
            Self::DetachedIs { .. } => "detached_is",
            Self::PpoClip { .. } => "ppo_clip",
            Self::Cispo { .. } => "cispo",
            Self::Sapo { .. } => "sapo",
            Self::Gspo { .. } => "gspo",
            Self::Gmpo { .. } => "gmpo",
            Self::Minpro { .. } => "minpro",
        }
    }

    /// Checks `ratio_cap` ∈ (0, 1e6], each ε ∈ [0, 1e6], `dual_clip` ∈ (1, 1e6], each τ ∈ [1e-6, 1e6] (see [`crate::limits`]).
    ///
    /// ```
    /// use cppo::{Error, Objective};
    /// let ppo = |dual_clip| Objective::PpoClip { eps_low: 0.2, eps_high: 0.2, dual_clip };
    /// assert!(ppo(Some(3.0)).validate().is_ok());
    /// let err = ppo(Some(0.5)).validate().unwrap_err(); // c must be > 1
    /// assert!(matches!(err, Error::InvalidConfig { field: "objective.dual_clip", .. }));
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Surrogate => Ok(()),
            Self::DetachedIs { ratio_cap } => check_positive("objective.ratio_cap", ratio_cap),
            Self::PpoClip {
                eps_low,
                eps_high,
                dual_clip,
            } => {
                check_nonnegative("objective.eps_low", eps_low)?;
                check_nonnegative("objective.eps_high", eps_high)?;
                match dual_clip {
                    Some(c) => check(
                        c > 1.0 && c <= crate::limits::MAX_PARAM,
                        "objective.dual_clip",
                        "> 1 and at most 1e6",
                        c,
                    ),
                    None => Ok(()),
                }
            }
            Self::Cispo { eps_high } => check_nonnegative("objective.eps_high", eps_high),
            Self::Sapo { tau_pos, tau_neg } => {
                check_temperature("objective.tau_pos", tau_pos)?;
                check_temperature("objective.tau_neg", tau_neg)
            }
            Self::Gspo { eps_low, eps_high } | Self::Gmpo { eps_low, eps_high } => {
                check_nonnegative("objective.eps_low", eps_low)?;
                check_nonnegative("objective.eps_high", eps_high)
            }
            Self::Minpro { clip, .. } => match clip {
                Some(c) => check_nonnegative("objective.clip", c),
                None => Ok(()),
            },
        }
    }

    /// Whether the objective reports a clipped fraction (`ppo_clip`, `cispo`, `gspo`,
    /// `gmpo`).
    ///
    /// ```
    /// use cppo::Objective;
    /// assert!(Objective::Cispo { eps_high: 0.28 }.has_clip());
    /// assert!(!Objective::Surrogate.has_clip());
    /// ```
    pub const fn has_clip(&self) -> bool {
        matches!(
            self,
            Self::PpoClip { .. }
                | Self::Cispo { .. }
                | Self::Gspo { .. }
                | Self::Gmpo { .. }
                | Self::Minpro { clip: Some(_), .. }
        )
    }

    /// Whether a token's term depends on a whole-row quantity (GSPO's and GMPO's sequence
    /// ratios), computed in a first sweep of the row.
    ///
    /// ```
    /// use cppo::Objective;
    /// assert!(Objective::Gspo { eps_low: 3e-4, eps_high: 4e-4 }.is_sequence_level());
    /// assert!(!Objective::Cispo { eps_high: 0.28 }.is_sequence_level());
    /// ```
    pub const fn is_sequence_level(&self) -> bool {
        matches!(self, Self::Gspo { .. } | Self::Gmpo { .. })
    }

    /// The loss and gradient of one kept token, from its ratio ρ, advantage A and
    /// current log-prob (which only the detached forms read).
    ///
    /// The whole-row objectives (`gspo`, `gmpo`, `minpro`) depend on the token's row; here
    /// the token is a row of its own (T = 1): GSPO's s = exp(min(ln ρ, 10)), GMPO's
    /// R = exp(r̃) with Ā = A, MinPRO's prefix minimum ρ (or 1 without
    /// `include_current`). [`evaluate`](crate::evaluate) on a batch of one-token rows
    /// gives exactly these values.
    ///
    /// ```
    /// use cppo::Objective;
    /// let gmpo = Objective::Gmpo { eps_low: 0.4, eps_high: 0.4 };
    /// let t = gmpo.eval(2.0, 1.0, -0.1); // ln 2 = 0.69 > 0.4: clipped, no gradient
    /// assert!((t.loss + 0.4f64.exp()).abs() < 1e-15);
    /// assert_eq!((t.grad, t.clipped), (0.0, true));
    /// ```
    #[inline(always)]
    pub fn eval(&self, rho: f64, adv: f64, logp: f64) -> TokenTerm {
        match *self {
            Self::Surrogate => {
                let g = -rho * adv;
                TokenTerm {
                    loss: g,
                    grad: g,
                    clipped: false,
                }
            }
            Self::DetachedIs { ratio_cap } => {
                let g = -rho.min(ratio_cap) * adv;
                TokenTerm {
                    loss: g * logp,
                    grad: g,
                    clipped: false,
                }
            }
            Self::PpoClip {
                eps_low,
                eps_high,
                dual_clip,
            } => {
                let unclipped = -rho * adv;
                let clipped = -rho.clamp(1.0 - eps_low, 1.0 + eps_high) * adv;
                let mut term = if unclipped >= clipped {
                    TokenTerm {
                        loss: unclipped,
                        grad: unclipped,
                        clipped: false,
                    }
                } else {
                    TokenTerm {
                        loss: clipped,
                        grad: 0.0,
                        clipped: true,
                    }
                };
                if let Some(c) = dual_clip {
                    let cap = -c * adv;
                    if adv < 0.0 && cap < term.loss {
                        term = TokenTerm {
                            loss: cap,
                            grad: 0.0,
                            clipped: true,
                        };
                    }
                }
                term
            }
            Self::Cispo { eps_high } => {
                let cap = 1.0 + eps_high;
                let g = -rho.min(cap) * adv;
                TokenTerm {
                    loss: g * logp,
                    grad: g,
                    clipped: rho > cap,
                }
            }
            // The whole-row objectives, for a row of this one token.
            Self::Gspo { eps_low, eps_high } => Self::PpoClip {
                eps_low,
                eps_high,
                dual_clip: None,
            }
            .eval(rho.ln().min(GSPO_LOG_RATIO_MAX).exp(), adv, logp),
            Self::Gmpo { eps_low, eps_high } => {
                let (r_clip, unclipped) = gmpo_log_ratio(rho.ln(), adv, eps_low, eps_high);
                let big_r = r_clip.exp();
                TokenTerm {
                    loss: -adv * big_r,
                    grad: if unclipped { -adv * big_r } else { 0.0 },
                    clipped: !unclipped,
                }
            }
            Self::Minpro {
                include_current,
                clip,
                stop_gradient,
            } => {
                // The prefix of a first token is empty: its minimum is ρ itself, or 1.
                let m = if include_current { rho } else { 1.0 };
                let cap = clip.map_or(f64::INFINITY, |c| 1.0 + c);
                let omega = m.min(cap);
                let g = -omega * adv;
                if stop_gradient {
                    TokenTerm {
                        loss: g * logp,
                        grad: g,
                        clipped: m > cap,
                    }
                } else {
                    // −ω A with ω = ρ (uncapped, own ratio) varies with logp as ρ does.
                    let flows = include_current && m <= cap;
                    TokenTerm {
                        loss: g,
                        grad: if flows { g } else { 0.0 },
                        clipped: m > cap,
                    }
                }
            }
            Self::Sapo { tau_pos, tau_neg } => {
                let tau = if adv > 0.0 { tau_pos } else { tau_neg };
                let sig = 1.0 / (1.0 + (-tau * (rho - 1.0)).exp());
                TokenTerm {
                    loss: -adv * (4.0 / tau) * sig,
                    grad: -4.0 * adv * rho * sig * (1.0 - sig),
                    clipped: false,
                }
            }
        }
    }
}

/// A KL estimator for the penalty to the reference policy.
///
/// ```
/// use cppo::{KlEstimator, KlPenalty};
/// // x = logp_ref − logp = −1, β = 1.
/// let k = |estimator| KlPenalty { estimator, coef: 1.0 }.eval(0.0, -1.0).0;
/// assert_eq!(k(KlEstimator::K1), 1.0);
/// assert_eq!(k(KlEstimator::K2), 0.5);
/// assert!((k(KlEstimator::K3) - (-1f64).exp()).abs() < 1e-15);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// k1 = −x = logp − logp_ref.
    K1,
    /// k2 = x² / 2.
    K2,
    /// k3 = eˣ − x − 1 (Schulman's low-variance estimator; GRPO's default).
    K3,
}

/// The KL penalty β·k(x), x = logp_ref − logp. Serialized as the config's `kl` object.
///
/// ```
/// use cppo::{KlEstimator, KlPenalty};
/// let kl: KlPenalty = serde_json::from_str(r#"{"estimator": "k2", "coef": 0.1}"#).unwrap();
/// assert_eq!(kl, KlPenalty { estimator: KlEstimator::K2, coef: 0.1 });
/// let (loss, grad) = kl.eval(-1.0, -3.0); // x = −2: β x² / 2 and −β x
/// assert!((loss - 0.2).abs() < 1e-15 && (grad - 0.2).abs() < 1e-15);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlPenalty {
    /// Which estimator.
    pub estimator: KlEstimator,
    /// The coefficient β ∈ [0, 1e6].
    pub coef: f64,
}

impl KlPenalty {
    /// Checks β ∈ [0, 1e6].
    ///
    /// ```
    /// use cppo::{KlEstimator, KlPenalty};
    /// assert!(KlPenalty { estimator: KlEstimator::K3, coef: 0.0 }.validate().is_ok());
    /// assert!(KlPenalty { estimator: KlEstimator::K3, coef: -0.1 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_nonnegative("kl.coef", self.coef)
    }

    /// The penalty's loss and gradient ∂/∂logp for one token.
    ///
    /// ```
    /// use cppo::objective::{KlEstimator, KlPenalty};
    /// let k3 = KlPenalty { estimator: KlEstimator::K3, coef: 0.5 };
    /// let (l, g) = k3.eval(-1.0, -1.0); // same policy: zero loss and gradient
    /// assert_eq!((l, g), (0.0, 0.0));
    /// ```
    #[inline(always)]
    pub fn eval(&self, logp: f64, logp_ref: f64) -> (f64, f64) {
        let beta = self.coef;
        let x = (logp_ref - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
        match self.estimator {
            KlEstimator::K1 => (-beta * x, beta),
            KlEstimator::K2 => (beta * x * x / 2.0, -beta * x),
            KlEstimator::K3 => {
                // e^x − 1 via exp_m1: no cancellation for small x.
                let em1 = x.exp_m1();
                (beta * (em1 - x), -beta * em1)
            }
        }
    }
}

/// GSPO's clamp on the sequence log-ratio, s = exp(min(mean r, 10)) (verl's).
///
/// ```
/// use cppo::objective::{Objective, GSPO_LOG_RATIO_MAX};
/// // A one-token row with log-ratio 15: s = e^10. With A < 0, the unclipped branch −A s.
/// let gspo = Objective::Gspo { eps_low: 0.2, eps_high: 0.2 };
/// let t = gspo.eval(15f64.exp(), -1.0, 0.0);
/// assert_eq!(t.loss, GSPO_LOG_RATIO_MAX.exp());
/// ```
pub const GSPO_LOG_RATIO_MAX: f64 = 10.0;

/// GMPO's clipped log-ratio r̃ = sgn(A) min(sgn(A) r, sgn(A) clamp(r, −ε_low, ε_high)),
/// and whether the unclipped branch was taken (where the gradient flows). 0 and
/// unclipped for A = 0.
///
/// ```
/// use cppo::objective::gmpo_log_ratio;
/// assert_eq!(gmpo_log_ratio(0.9, 1.0, 0.4, 0.4), (0.4, false)); // A > 0: capped above
/// assert_eq!(gmpo_log_ratio(0.9, -1.0, 0.4, 0.4), (0.9, true)); // A < 0: floored only
/// ```
#[inline(always)]
pub fn gmpo_log_ratio(r: f64, adv: f64, eps_low: f64, eps_high: f64) -> (f64, bool) {
    let c = r.clamp(-eps_low, eps_high);
    if adv > 0.0 {
        if r <= c { (r, true) } else { (c, false) }
    } else if adv < 0.0 {
        if r >= c { (r, true) } else { (c, false) }
    } else {
        (0.0, true)
    }
}

/// The ratio ρ = exp(clamp(logp − logp_old, −20, 20)) and the clamped log-ratio.
///
/// ```
/// let (rho, r) = cppo::objective::ratio(-0.5, -1.0);
/// assert_eq!(r, 0.5);
/// assert!((rho - 0.5f64.exp()).abs() < 1e-15);
/// assert_eq!(cppo::objective::ratio(0.0, -100.0).1, 20.0); // clamped
/// ```
#[inline(always)]
pub fn ratio(logp: f64, logp_old: f64) -> (f64, f64) {
    let r = (logp - logp_old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    (r.exp(), r)
}
