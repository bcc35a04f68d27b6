//! Trust-region rules: which tokens keep their gradient (SPEC section 4).
//!
//! With ρ_t = exp(clamp(logp − logp_old, −20, 20)), a token moves *away* from the
//! anchor when A_t (ρ_t − 1) > 0. Every rule except TRM keeps a token that does not move
//! away, however large its divergence: corrective updates are never blocked.
//!
//! Prefix sums run over the row's response tokens and are accumulated in f64:
//! S_t = Σ_{s≤t} w_s D_s, W_t = Σ_{s≤t} w_s, S_0 = W_0 = 0.
//!
//! | rule | feasible I_t |
//! |---|---|
//! | `none` | always |
//! | `ratio` (PPO/GRPO clip as a mask) | 1 − ε_low ≤ ρ_t ≤ 1 + ε_high |
//! | `dppo` | D_t ≤ δ |
//! | `cppo` | w_t D_t ≤ δ  and  S_t ≤ δ + δ_b W_{t−1} |
//! | `cppo_soft` | as `cppo`, but an away-moving token keeps σ((c_t − w_t D_t)/τ) of its gradient |
//! | `trm_max` | max over the row of D ≤ δ (the whole row is kept or dropped) |
//! | `trm_avg` | mean over the row of D ≤ δ (likewise) |
//!
//! Keep M_t = mask_t ∧ (I_t ∨ ¬away_t), except under TRM, where M_t = mask_t ∧ I_t. A = 0
//! never moves away, so it is kept.
//!
//! CPPO reports its effective threshold c_t = min(δ, δ + δ_b W_{t−1} − S_{t−1}), which
//! satisfies I_t ⇔ w_t D_t ≤ c_t; the decision itself is made with the two comparisons in
//! the table, so it does not depend on the rounding of c_t. With `delta_b` absent
//! there is no budget and c_t = δ: CPPO with w_min = 1 and no budget is exactly DPPO.
//!
//! Every decision comes with a [`Reason`].
//!
//! `shuffle_seed` on `cppo` (and `cppo_soft`) is the paper's control for the position
//! weights: token t gets the weight of position π(t), where π is a permutation of
//! 1..T drawn from the seed and T alone (a keyed bijection, computed per token without
//! memory), so a row's weights are the same whichever shard or chunk holds it.
//!
//! ```
//! use cppo::rule::Rule;
//! let r = Rule::cppo(0.2, Some(0.05), 0.8).unwrap();
//! assert_eq!(r, Rule::Cppo { delta: 0.2, delta_b: Some(0.05), w_min: 0.8, horizon: None, shuffle_seed: None });
//! assert!(Rule::dppo(-1.0).is_err());
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedule::Schedule;

/// The default DPPO/CPPO threshold δ = 0.2 (binary TV, as in the DPPO paper).
pub const DEFAULT_DELTA: f64 = 0.2;
/// The default CPPO prefix budget slope δ_b = 0.05 (ours: the paper's tuned values are
/// not public).
pub const DEFAULT_DELTA_B: f64 = 0.05;
/// The default CPPO last-position weight w_min = 0.8 (the paper's).
pub const DEFAULT_W_MIN: f64 = 0.8;
/// The default ratio-clip ε = 0.2 (PPO's and GRPO's).
pub const DEFAULT_EPS: f64 = 0.2;

/// Why a token was kept or masked. Stored as `u8` codes 0–4 in the `reason` output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Reason {
    /// 0: not a response token (padding, prompt or a hole in the mask).
    NotResponse = 0,
    /// 1: kept, the rule's test passed.
    Feasible = 1,
    /// 2: kept by the corrective bypass: the test failed but the token does not move away
    /// from the anchor.
    Corrective = 2,
    /// 3: masked, the token threshold was violated (w_t D_t > δ for CPPO, or the rule's
    /// only test for the others).
    TokenThreshold = 3,
    /// 4: masked by CPPO's prefix budget alone (w_t D_t ≤ δ but S_t > δ + δ_b W_{t−1}).
    PrefixBudget = 4,
}

impl Reason {
    /// All reasons, in code order.
    pub const ALL: [Reason; 5] = [
        Self::NotResponse,
        Self::Feasible,
        Self::Corrective,
        Self::TokenThreshold,
        Self::PrefixBudget,
    ];

    /// The `u8` code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The reason for a code, or `None` for a code above 4.
    ///
    /// ```
    /// use cppo::rule::Reason;
    /// assert_eq!(Reason::from_code(4), Some(Reason::PrefixBudget));
    /// assert_eq!(Reason::from_code(5), None);
    /// ```
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::NotResponse),
            1 => Some(Self::Feasible),
            2 => Some(Self::Corrective),
            3 => Some(Self::TokenThreshold),
            4 => Some(Self::PrefixBudget),
            _ => None,
        }
    }

    /// Whether a token with this reason keeps its gradient.
    pub const fn is_kept(self) -> bool {
        matches!(self, Self::Feasible | Self::Corrective)
    }
}

/// A trust-region rule. Serialized as SPEC section 9's `rule` object, tagged by `kind`;
/// omitted parameters take the defaults in this module's constants, unknown fields are
/// an error.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// No trust region: every response token is kept.
    #[serde(deserialize_with = "no_params")]
    None,
    /// PPO/GRPO's ratio clip, applied as a mask: feasible iff 1 − ε_low ≤ ρ ≤ 1 + ε_high.
    Ratio {
        /// ε_low ≥ 0, default 0.2.
        #[serde(default = "default_eps")]
        eps_low: f64,
        /// ε_high ≥ 0, default 0.2.
        #[serde(default = "default_eps")]
        eps_high: f64,
    },
    /// DPPO: feasible iff D_t ≤ δ.
    Dppo {
        /// δ > 0, default 0.2.
        #[serde(default = "default_delta")]
        delta: f64,
    },
    /// CPPO: feasible iff w_t D_t ≤ δ and S_t ≤ δ + δ_b W_{t−1}.
    Cppo {
        /// δ > 0, default 0.2.
        #[serde(default = "default_delta")]
        delta: f64,
        /// δ_b ≥ 0, default 0.05; `None` (JSON `null`) for no prefix budget.
        #[serde(default = "default_delta_b", deserialize_with = "nullable")]
        delta_b: Option<f64>,
        /// w_min ∈ (0, 1], default 0.8.
        #[serde(default = "default_w_min")]
        w_min: f64,
        /// A fixed horizon H ≥ 1 for the weights, or `None` for each row's own length.
        #[serde(default)]
        horizon: Option<usize>,
        /// The paper's control: a seeded permutation of each row's weights, to show
        /// that their order matters. `None` (the default) keeps the order.
        #[serde(default)]
        shuffle_seed: Option<u64>,
    },
    /// CPPO with a soft gate in place of the hard mask (an ablation of the paper's,
    /// our definition): a token that moves away from the anchor keeps the fraction
    /// σ((c_t − w_t D_t)/τ) of its gradient; any other token keeps all of it. `keep` and
    /// `reason` report the hard decision, as under `cppo`.
    CppoSoft {
        /// δ > 0, default 0.2.
        #[serde(default = "default_delta")]
        delta: f64,
        /// δ_b ≥ 0, default 0.05; `None` (JSON `null`) for no prefix budget.
        #[serde(default = "default_delta_b", deserialize_with = "nullable")]
        delta_b: Option<f64>,
        /// w_min ∈ (0, 1], default 0.8.
        #[serde(default = "default_w_min")]
        w_min: f64,
        /// A fixed horizon H ≥ 1, or `None` for each row's own length.
        #[serde(default)]
        horizon: Option<usize>,
        /// As `cppo`'s.
        #[serde(default)]
        shuffle_seed: Option<u64>,
        /// The gate's temperature τ > 0, default 0.01.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// TRM, max form: a whole row is kept iff max_t D_t ≤ δ. No corrective bypass.
    TrmMax {
        /// δ > 0, default 0.2.
        #[serde(default = "default_delta")]
        delta: f64,
    },
    /// TRM, mean form: a whole row is kept iff mean_t D_t ≤ δ. No corrective bypass.
    TrmAvg {
        /// δ > 0, default 0.2.
        #[serde(default = "default_delta")]
        delta: f64,
    },
}

/// A parameterless variant still refuses unknown fields (serde's internally tagged unit
/// variants would ignore them).
pub(crate) fn no_params<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    NoParams::deserialize(d).map(|_| ())
}

fn default_eps() -> f64 {
    DEFAULT_EPS
}
fn default_delta() -> f64 {
    DEFAULT_DELTA
}
fn default_delta_b() -> Option<f64> {
    Some(DEFAULT_DELTA_B)
}
fn default_w_min() -> f64 {
    DEFAULT_W_MIN
}
fn default_tau() -> f64 {
    DEFAULT_SOFT_TAU
}

/// The default temperature of `cppo_soft`'s gate: 0.01, a twentieth of δ, so that the
/// gate goes from 0.12 to 0.88 over w_t D_t ∈ c_t ± 0.02 (ours: the paper gives none).
pub const DEFAULT_SOFT_TAU: f64 = 0.01;

/// CPPO's parameters, shared by `cppo` and `cppo_soft`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CppoParams {
    /// δ.
    pub delta: f64,
    /// δ_b, or `None` for no budget.
    pub delta_b: Option<f64>,
    /// w_min.
    pub w_min: f64,
    /// A fixed horizon, or `None`.
    pub horizon: Option<usize>,
    /// The weight-shuffle seed, or `None`.
    pub shuffle_seed: Option<u64>,
    /// The soft gate's τ (`cppo_soft`), or `None` for the hard mask.
    pub soft_tau: Option<f64>,
}
/// `delta_b`: absent → the default, `null` → no budget.
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

impl Default for Rule {
    /// The paper's CPPO with this crate's defaults: δ = 0.2, δ_b = 0.05, w_min = 0.8.
    fn default() -> Self {
        Self::Cppo {
            delta: DEFAULT_DELTA,
            delta_b: Some(DEFAULT_DELTA_B),
            w_min: DEFAULT_W_MIN,
            horizon: None,
            shuffle_seed: None,
        }
    }
}

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

pub(crate) fn check_positive(field: &'static str, value: f64) -> Result<()> {
    check(
        value > 0.0 && value.is_finite(),
        field,
        "> 0 and finite",
        value,
    )
}

pub(crate) fn check_nonnegative(field: &'static str, value: f64) -> Result<()> {
    check(
        value >= 0.0 && value.is_finite(),
        field,
        ">= 0 and finite",
        value,
    )
}

impl Rule {
    /// A checked CPPO rule with each row's own length as the horizon.
    pub fn cppo(delta: f64, delta_b: Option<f64>, w_min: f64) -> Result<Self> {
        let rule = Self::Cppo {
            delta,
            delta_b,
            w_min,
            horizon: None,
            shuffle_seed: None,
        };
        rule.validate()?;
        Ok(rule)
    }

    /// A checked DPPO rule.
    pub fn dppo(delta: f64) -> Result<Self> {
        let rule = Self::Dppo { delta };
        rule.validate()?;
        Ok(rule)
    }

    /// A checked ratio-clip rule.
    ///
    /// ```
    /// assert!(cppo::rule::Rule::ratio(0.2, 0.28).is_ok());
    /// assert!(cppo::rule::Rule::ratio(-0.1, 0.2).is_err());
    /// ```
    pub fn ratio(eps_low: f64, eps_high: f64) -> Result<Self> {
        let rule = Self::Ratio { eps_low, eps_high };
        rule.validate()?;
        Ok(rule)
    }

    /// The rule's name as in configs (`"cppo"`, `"trm_max"`, ...).
    pub const fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ratio { .. } => "ratio",
            Self::Dppo { .. } => "dppo",
            Self::Cppo { .. } => "cppo",
            Self::CppoSoft { .. } => "cppo_soft",
            Self::TrmMax { .. } => "trm_max",
            Self::TrmAvg { .. } => "trm_avg",
        }
    }

    /// Checks every parameter's range: δ > 0, δ_b ≥ 0, w_min ∈ (0, 1], ε ≥ 0, horizon ≥ 1.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::None => Ok(()),
            Self::Ratio { eps_low, eps_high } => {
                check_nonnegative("rule.eps_low", eps_low)?;
                check_nonnegative("rule.eps_high", eps_high)
            }
            Self::Dppo { delta } | Self::TrmMax { delta } | Self::TrmAvg { delta } => {
                check_positive("rule.delta", delta)
            }
            Self::Cppo { .. } | Self::CppoSoft { .. } => {
                let Some(p) = self.cppo_params() else {
                    unreachable!("a cppo rule")
                };
                check_positive("rule.delta", p.delta)?;
                if let Some(db) = p.delta_b {
                    check_nonnegative("rule.delta_b", db)?;
                }
                if let Some(tau) = p.soft_tau {
                    check_positive("rule.tau", tau)?;
                }
                Schedule::Linear {
                    w_min: p.w_min,
                    horizon: p.horizon,
                }
                .validate()
            }
        }
    }

    /// The parameters of `cppo` and `cppo_soft`; `None` for the other rules.
    pub const fn cppo_params(&self) -> Option<CppoParams> {
        match *self {
            Self::Cppo {
                delta,
                delta_b,
                w_min,
                horizon,
                shuffle_seed,
            } => Some(CppoParams {
                delta,
                delta_b,
                w_min,
                horizon,
                shuffle_seed,
                soft_tau: None,
            }),
            Self::CppoSoft {
                delta,
                delta_b,
                w_min,
                horizon,
                shuffle_seed,
                tau,
            } => Some(CppoParams {
                delta,
                delta_b,
                w_min,
                horizon,
                shuffle_seed,
                soft_tau: Some(tau),
            }),
            _ => None,
        }
    }

    /// The position schedule this rule uses: linear for CPPO, constant otherwise.
    pub fn schedule(&self) -> Schedule {
        match self.cppo_params() {
            Some(p) => Schedule::Linear {
                w_min: p.w_min,
                horizon: p.horizon,
            },
            None => Schedule::Constant,
        }
    }

    /// Whether the rule has a threshold to report (δ or c_t): all but `none` and `ratio`.
    pub const fn has_threshold(&self) -> bool {
        !matches!(self, Self::None | Self::Ratio { .. })
    }

    /// Whether the rule keeps or drops whole rows (TRM).
    pub const fn is_sequence_level(&self) -> bool {
        matches!(self, Self::TrmMax { .. } | Self::TrmAvg { .. })
    }
}
