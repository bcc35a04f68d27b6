//! Trust-region rules: which tokens keep their gradient.
//!
//! With ρ_t = exp(clamp(logp − logp_old, −20, 20)), a token moves *away* from the
//! rollout policy when A_t (ρ_t − 1) > 0 ([`moves_away`]). Every rule except TRM keeps a
//! token that does not move away, however large its divergence: corrective updates are
//! never blocked.
//!
//! | rule | a token is feasible when |
//! |---|---|
//! | `none` | always |
//! | `ratio` (PPO/GRPO's clip as a mask) | 1 − ε_low ≤ ρ_t ≤ 1 + ε_high |
//! | `dppo` | D_t ≤ δ |
//! | `cppo` | w_t D_t ≤ δ  and  S_t ≤ δ + δ_b^row W_{t−1} |
//! | `cppo_soft` | as `cppo`; the gate of [`Gate`] scales the token's term instead of a hard mask |
//! | `trm_max` | max over the row of D ≤ δ (the whole row is kept or dropped) |
//! | `trm_avg` | mean over the row of D ≤ δ (likewise) |
//!
//! Keep M_t = mask_t ∧ (I_t ∨ ¬away_t), except under TRM, where M_t = mask_t ∧ I_t. A = 0
//! never moves away, so it is kept (the DPPO reference code puts A = 0 in its negative
//! branch; that changes mask statistics only, never the loss).
//!
//! **CPPO's prefix sums** run over the row's response tokens, in f64 whatever the input
//! type: S_t = Σ_{s≤t} w_s D_s, W_t = Σ_{s≤t} w_s, S_0 = W_0 = 0. The weights w_t come
//! from [`schedule`](crate::schedule) (by `positions`: response tokens or columns) and the
//! per-row budget δ_b^row from [`budget`](crate::budget) (calibrated from the row's
//! divergences, or fixed). CPPO reports its effective threshold
//! c_t = min(δ, δ + δ_b^row W_{t−1} − S_{t−1}), which satisfies I_t ⇔ w_t D_t ≤ c_t; the
//! decision itself is made with the two comparisons of the table ([`cppo_test`]), so it
//! does not depend on the rounding of c_t. `delta_b: null` turns the budget off:
//! c_t = δ, and CPPO with w_min = 1 and no budget is exactly DPPO.
//!
//! `shuffle_seed` is the paper's control for the position weights: token t gets the
//! weight of position π(t), π a permutation of the positions (1..T, or 1..L under
//! `column`) drawn from the seed and the row's length alone, so a row's weights are the
//! same whichever shard or chunk holds it.
//!
//! Every decision comes with a [`Reason`].
//!
//! ```
//! use cppo::rule::{CppoParams, Rule};
//! let r = Rule::Cppo(CppoParams { delta_b: None, ..CppoParams::default() });
//! assert_eq!(r.name(), "cppo");
//! assert!(r.validate().is_ok());
//! assert!(Rule::Dppo { delta: -1.0 }.validate().is_err());
//! ```

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::budget::Calibration;
use crate::error::Result;
use crate::limits::{check_nonnegative, check_positive};
use crate::schedule::{Positions, Schedule};

mod gate;
mod reason;
pub use gate::{Gate, inverse_gate, sigmoid_gate};
pub use reason::Reason;

/// The default threshold δ = 0.15 of `dppo`, `cppo`, `cppo_soft` and TRM (the paper's
/// Table 3, dense models; 0.20 for MoE models).
///
/// ```
/// use cppo::rule::{CppoParams, Rule, DEFAULT_DELTA};
/// assert_eq!(CppoParams::default().delta, DEFAULT_DELTA);
/// assert_eq!(cppo::Config::dppo().rule, Rule::Dppo { delta: DEFAULT_DELTA });
/// ```
pub const DEFAULT_DELTA: f64 = 0.15;
/// The default CPPO prefix budget δ_b = 0.02: the floor δ_b^min of the calibrated
/// budget (the paper's Table 3, UniRL's and verl's default).
///
/// ```
/// assert_eq!(cppo::CppoParams::default().delta_b, Some(cppo::rule::DEFAULT_DELTA_B));
/// ```
pub const DEFAULT_DELTA_B: f64 = 0.02;
/// The default last-position weight w_min = 0.8 (the paper's).
///
/// ```
/// assert_eq!(cppo::CppoParams::default().w_min, cppo::rule::DEFAULT_W_MIN);
/// ```
pub const DEFAULT_W_MIN: f64 = 0.8;
/// The default ε_low = 0.2 of the `ratio` rule (the paper's GRPO baseline).
///
/// ```
/// use cppo::rule::{Rule, DEFAULT_EPS_LOW};
/// let rule = cppo::Config::grpo().rule;
/// assert!(matches!(rule, Rule::Ratio { eps_low, .. } if eps_low == DEFAULT_EPS_LOW));
/// ```
pub const DEFAULT_EPS_LOW: f64 = 0.2;
/// The default ε_high = 0.28 of the `ratio` rule (the paper's GRPO baseline, DAPO's
/// clip-higher).
///
/// ```
/// use cppo::rule::{Rule, DEFAULT_EPS_HIGH};
/// let rule = cppo::Config::grpo().rule;
/// assert!(matches!(rule, Rule::Ratio { eps_high, .. } if eps_high == DEFAULT_EPS_HIGH));
/// ```
pub const DEFAULT_EPS_HIGH: f64 = 0.28;
/// The default temperature τ = 0.01 of the sigmoid gate of `cppo_soft` (ours; the paper's
/// gate is the inverse one, which has none).
///
/// ```
/// use cppo::rule::{Gate, Rule, DEFAULT_SOFT_TAU};
/// let r: Rule = serde_json::from_str(r#"{"kind": "cppo_soft", "gate": "sigmoid"}"#).unwrap();
/// let gate = r.cppo_params().unwrap().gate;
/// assert_eq!(gate, Some(Gate::Sigmoid { tau: DEFAULT_SOFT_TAU }));
/// ```
pub const DEFAULT_SOFT_TAU: f64 = 0.01;

/// Whether a token's update moves π_θ away from the rollout policy: A (ρ − 1) > 0.
/// Tokens that do not are kept by every rule but TRM.
///
/// ```
/// use cppo::rule::moves_away;
/// assert!(moves_away(1.0, 1.3)); // raising p above q further
/// assert!(!moves_away(1.0, 0.7)); // raising p back toward q
/// assert!(!moves_away(0.0, 5.0)); // A = 0 moves nothing
/// ```
#[inline(always)]
pub fn moves_away(adv: f64, rho: f64) -> bool {
    adv * (rho - 1.0) > 0.0
}

/// CPPO's test of a token: `None` if feasible, else the reason it fails.
///
/// `wd` = w_t D_t; `s_prev`, `w_prev` = S_{t−1}, W_{t−1}; `delta_b` = δ_b^row, or `None`
/// for no budget. Feasible iff w_t D_t ≤ δ and S_{t−1} + w_t D_t ≤ δ + δ_b^row W_{t−1};
/// a token failing the first test is [`Reason::TokenThreshold`], one failing only the
/// second [`Reason::PrefixBudget`].
///
/// ```
/// use cppo::rule::{cppo_test, Reason};
/// // The worked example's sixth slot: w D = 0.04 ≤ δ, but S = 0.5775 > 0.2 + 0.05 · 3.7.
/// assert_eq!(cppo_test(0.2, Some(0.05), 0.8 * 0.05, 0.5375, 3.7), Some(Reason::PrefixBudget));
/// assert_eq!(cppo_test(0.2, None, 0.04, 9.0, 0.0), None); // no budget
/// ```
#[inline(always)]
pub fn cppo_test(
    delta: f64,
    delta_b: Option<f64>,
    wd: f64,
    s_prev: f64,
    w_prev: f64,
) -> Option<Reason> {
    if wd > delta {
        return Some(Reason::TokenThreshold);
    }
    match delta_b {
        Some(db) if s_prev + wd > delta + db * w_prev => Some(Reason::PrefixBudget),
        _ => None,
    }
}

/// CPPO's effective threshold c_t = min(δ, δ + δ_b^row W_{t−1} − S_{t−1}); δ without a
/// budget.
///
/// ```
/// assert_eq!(cppo::rule::cppo_threshold(0.2, Some(0.05), 0.1, 1.0), 0.15);
/// assert_eq!(cppo::rule::cppo_threshold(0.2, None, 0.1, 1.0), 0.2);
/// ```
#[inline(always)]
pub fn cppo_threshold(delta: f64, delta_b: Option<f64>, s_prev: f64, w_prev: f64) -> f64 {
    match delta_b {
        Some(db) => {
            let slack = (delta + db * w_prev) - s_prev;
            if slack < delta { slack } else { delta }
        }
        None => delta,
    }
}

/// The parameters of `cppo` and `cppo_soft`. `Default` is the paper's setting (Table 3,
/// dense models): δ = 0.15, δ_b = 0.02 calibrated by P90 with a 2× ceiling,
/// w_min = 0.8, response-token positions, hard mask.
///
/// ```
/// use cppo::rule::{CppoParams, Rule};
/// let p = CppoParams::default();
/// assert_eq!((p.delta, p.delta_b, p.w_min, p.gate), (0.15, Some(0.02), 0.8, None));
/// let fixed = CppoParams { calibration: None, ..p }; // δ_b^row = δ_b in every row
/// assert!(Rule::Cppo(fixed).validate().is_ok());
/// assert_eq!(Rule::default(), Rule::Cppo(p));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CppoParams {
    /// δ ∈ (0, 1e6]: the token threshold (on w_t D_t). Default 0.15.
    pub delta: f64,
    /// δ_b ∈ [0, 1e6]: the prefix budget per unit of weight (the floor of the calibrated
    /// budget), or `None` (JSON `null`) for no prefix budget. Default 0.02.
    pub delta_b: Option<f64>,
    /// w_min ∈ (0, 1]: the last position's weight. Default 0.8.
    pub w_min: f64,
    /// A fixed horizon H ≥ 1 for the weights, or `None` for the convention's default (the
    /// row's response length T, or the padded width L under `column` positions).
    pub horizon: Option<usize>,
    /// How positions are counted. Default [`Positions::Response`].
    pub positions: Positions,
    /// How δ_b^row is calibrated from each row's divergences, or `None` (JSON `null`) for
    /// a fixed budget δ_b^row = δ_b. Default: the paper's P90 with a 2× ceiling. Ignored
    /// without a budget.
    pub calibration: Option<Calibration>,
    /// The paper's control: a seeded permutation of each row's weights. `None` (the
    /// default) keeps their order.
    pub shuffle_seed: Option<u64>,
    /// `None` for the hard mask (`cppo`); a gate for `cppo_soft`.
    pub gate: Option<Gate>,
}

impl Default for CppoParams {
    /// [`CppoParams::PAPER`].
    fn default() -> Self {
        Self::PAPER
    }
}

impl CppoParams {
    /// The paper's setting (Table 3, dense models; Eq. 22), usable in `const` items.
    ///
    /// ```
    /// use cppo::CppoParams;
    /// const FIXED: CppoParams = CppoParams { calibration: None, ..CppoParams::PAPER };
    /// assert_eq!(FIXED.delta_b, Some(0.02));
    /// ```
    pub const PAPER: Self = Self {
        delta: DEFAULT_DELTA,
        delta_b: Some(DEFAULT_DELTA_B),
        w_min: DEFAULT_W_MIN,
        horizon: None,
        positions: Positions::Response,
        calibration: Some(Calibration::PAPER),
        shuffle_seed: None,
        gate: None,
    };

    /// The calibration in effect: `None` without a budget, whatever `calibration` says.
    ///
    /// ```
    /// use cppo::rule::CppoParams;
    /// assert!(CppoParams::default().active_calibration().is_some());
    /// assert!(CppoParams { delta_b: None, ..CppoParams::default() }.active_calibration().is_none());
    /// ```
    pub fn active_calibration(&self) -> Option<Calibration> {
        self.delta_b.and(self.calibration)
    }

    /// The position schedule.
    ///
    /// ```
    /// use cppo::rule::CppoParams;
    /// use cppo::schedule::{Positions, Schedule};
    /// let s = CppoParams::default().schedule();
    /// assert_eq!(s, Schedule::Linear { w_min: 0.8, horizon: None, positions: Positions::Response });
    /// ```
    pub fn schedule(&self) -> Schedule {
        Schedule::Linear {
            w_min: self.w_min,
            horizon: self.horizon,
            positions: self.positions,
        }
    }

    /// Checks every parameter; errors name the config field.
    ///
    /// ```
    /// use cppo::rule::{CppoParams, Gate};
    /// let p = CppoParams { gate: Some(Gate::Sigmoid { tau: 0.0 }), ..CppoParams::default() };
    /// assert!(p.validate().unwrap_err().to_string().contains("rule.tau"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_positive("rule.delta", self.delta)?;
        if let Some(db) = self.delta_b {
            check_nonnegative("rule.delta_b", db)?;
        }
        if let Some(c) = &self.calibration {
            c.validate()?;
        }
        if let Some(Gate::Sigmoid { tau }) = self.gate {
            check_positive("rule.tau", tau)?;
        }
        self.schedule().validate()
    }
}

/// A trust-region rule. Serialized as a config's `rule` object, tagged by `kind`;
/// omitted parameters take the defaults of this module's constants, unknown fields are
/// an error. A bare string names a kind with its defaults (`"rule": "dppo"`).
///
/// ```
/// use cppo::Rule;
/// let r: Rule = serde_json::from_str(r#""trm_avg""#).unwrap();
/// assert_eq!(r, Rule::TrmAvg { delta: 0.15 });
/// let r: Rule = serde_json::from_str(r#"{"kind": "ratio", "eps_high": 0.3}"#).unwrap();
/// assert_eq!(r, Rule::Ratio { eps_low: 0.2, eps_high: 0.3 });
/// assert_eq!(r.name(), "ratio");
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// No trust region: every response token is kept.
    None,
    /// PPO/GRPO's ratio clip, applied as a mask: feasible iff 1 − ε_low ≤ ρ ≤ 1 + ε_high.
    Ratio {
        /// ε_low ∈ [0, 1e6], default 0.2.
        eps_low: f64,
        /// ε_high ∈ [0, 1e6], default 0.28.
        eps_high: f64,
    },
    /// DPPO: feasible iff D_t ≤ δ.
    Dppo {
        /// δ ∈ (0, 1e6], default 0.15.
        delta: f64,
    },
    /// CPPO (`cppo`, or `cppo_soft` when the parameters hold a gate).
    Cppo(CppoParams),
    /// TRM, max form: a whole row is kept iff max_t D_t ≤ δ. No corrective bypass.
    TrmMax {
        /// δ ∈ (0, 1e6], default 0.15.
        delta: f64,
    },
    /// TRM, mean form: a whole row is kept iff mean_t D_t ≤ δ. No corrective bypass.
    TrmAvg {
        /// δ ∈ (0, 1e6], default 0.15.
        delta: f64,
    },
}

impl Default for Rule {
    /// The paper's CPPO: [`CppoParams::default`].
    fn default() -> Self {
        Self::Cppo(CppoParams::default())
    }
}

impl Rule {
    /// The rule's name as in configs (`"cppo"`, `"cppo_soft"`, `"trm_max"`, ...).
    ///
    /// ```
    /// use cppo::rule::{CppoParams, Gate, Rule};
    /// let soft = Rule::Cppo(CppoParams { gate: Some(Gate::Inverse), ..CppoParams::default() });
    /// assert_eq!(soft.name(), "cppo_soft");
    /// assert_eq!(Rule::TrmMax { delta: 0.1 }.name(), "trm_max");
    /// ```
    pub const fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ratio { .. } => "ratio",
            Self::Dppo { .. } => "dppo",
            Self::Cppo(CppoParams { gate: None, .. }) => "cppo",
            Self::Cppo(CppoParams { gate: Some(_), .. }) => "cppo_soft",
            Self::TrmMax { .. } => "trm_max",
            Self::TrmAvg { .. } => "trm_avg",
        }
    }

    /// Checks every parameter's range; errors name the config field.
    ///
    /// ```
    /// use cppo::Rule;
    /// assert!(Rule::Ratio { eps_low: 0.2, eps_high: 0.28 }.validate().is_ok());
    /// assert!(Rule::Ratio { eps_low: -0.1, eps_high: 0.2 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::None => Ok(()),
            Self::Ratio { eps_low, eps_high } => {
                check_nonnegative("rule.eps_low", *eps_low)?;
                check_nonnegative("rule.eps_high", *eps_high)
            }
            Self::Dppo { delta } | Self::TrmMax { delta } | Self::TrmAvg { delta } => {
                check_positive("rule.delta", *delta)
            }
            Self::Cppo(p) => p.validate(),
        }
    }

    /// CPPO's parameters (`cppo` and `cppo_soft`); `None` for the other rules.
    ///
    /// ```
    /// assert!(cppo::Rule::default().cppo_params().is_some());
    /// assert!(cppo::Rule::None.cppo_params().is_none());
    /// ```
    pub const fn cppo_params(&self) -> Option<&CppoParams> {
        match self {
            Self::Cppo(p) => Some(p),
            _ => None,
        }
    }

    /// The position schedule this rule uses: CPPO's linear one, constant otherwise.
    ///
    /// ```
    /// assert_eq!(cppo::Rule::Dppo { delta: 0.2 }.schedule(), cppo::Schedule::Constant);
    /// ```
    pub fn schedule(&self) -> Schedule {
        match self {
            Self::Cppo(p) => p.schedule(),
            _ => Schedule::Constant,
        }
    }

    /// Whether the rule has a threshold to report (δ or c_t): all but `none` and `ratio`.
    ///
    /// ```
    /// assert!(!cppo::Rule::None.has_threshold());
    /// ```
    pub const fn has_threshold(&self) -> bool {
        !matches!(self, Self::None | Self::Ratio { .. })
    }

    /// Whether the rule has a prefix budget (CPPO with a `delta_b`), so that each row has
    /// a δ_b^row.
    ///
    /// ```
    /// assert!(cppo::Rule::default().has_budget());
    /// assert!(!cppo::Rule::Dppo { delta: 0.2 }.has_budget());
    /// ```
    pub const fn has_budget(&self) -> bool {
        matches!(
            self,
            Self::Cppo(CppoParams {
                delta_b: Some(_),
                ..
            })
        )
    }

    /// Whether the rule keeps or drops whole rows (TRM).
    ///
    /// ```
    /// assert!(cppo::Rule::TrmAvg { delta: 0.1 }.is_sequence_level());
    /// ```
    pub const fn is_sequence_level(&self) -> bool {
        matches!(self, Self::TrmMax { .. } | Self::TrmAvg { .. })
    }

    /// TRM's decision for a whole row from the row's max and mean divergence; `true` for
    /// every other rule (they decide per token).
    ///
    /// ```
    /// use cppo::Rule;
    /// assert!(Rule::TrmMax { delta: 0.2 }.keeps_row(0.2, 0.1));
    /// assert!(!Rule::TrmAvg { delta: 0.05 }.keeps_row(0.2, 0.1));
    /// ```
    pub fn keeps_row(&self, d_max: f64, d_mean: f64) -> bool {
        match *self {
            Self::TrmMax { delta } => d_max <= delta,
            Self::TrmAvg { delta } => d_mean <= delta,
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The wire form
// ---------------------------------------------------------------------------------------

/// The rule kinds, as configs spell them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    #[default]
    None,
    Ratio,
    Dppo,
    Cppo,
    CppoSoft,
    TrmMax,
    TrmAvg,
}

/// `null` and absent told apart: absent → `None`, `null` → `Some(None)`.
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The wire form, both ways: every field any rule kind has. Which ones a kind accepts is
/// checked after reading; writing sets those of the rule's kind.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eps_low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eps_high: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delta: Option<f64>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    delta_b: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w_min: Option<f64>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    horizon: Option<Option<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    positions: Option<Positions>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    calibration: Option<Option<Calibration>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    shuffle_seed: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gate: Option<GateKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tau: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GateKind {
    Inverse,
    Sigmoid,
}

impl Wire {
    /// The names of the fields given, in declaration order.
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |present: bool, name| {
            if present {
                v.push(name);
            }
        };
        add(self.eps_low.is_some(), "eps_low");
        add(self.eps_high.is_some(), "eps_high");
        add(self.delta.is_some(), "delta");
        add(self.delta_b.is_some(), "delta_b");
        add(self.w_min.is_some(), "w_min");
        add(self.horizon.is_some(), "horizon");
        add(self.positions.is_some(), "positions");
        add(self.calibration.is_some(), "calibration");
        add(self.shuffle_seed.is_some(), "shuffle_seed");
        add(self.gate.is_some(), "gate");
        add(self.tau.is_some(), "tau");
        v
    }

    /// The rule's own wire form.
    fn of(rule: &Rule) -> Self {
        match *rule {
            Rule::None => Self::default(),
            Rule::Ratio { eps_low, eps_high } => Self {
                kind: Kind::Ratio,
                eps_low: Some(eps_low),
                eps_high: Some(eps_high),
                ..Self::default()
            },
            Rule::Dppo { delta } => Self {
                kind: Kind::Dppo,
                delta: Some(delta),
                ..Self::default()
            },
            Rule::TrmMax { delta } => Self {
                kind: Kind::TrmMax,
                delta: Some(delta),
                ..Self::default()
            },
            Rule::TrmAvg { delta } => Self {
                kind: Kind::TrmAvg,
                delta: Some(delta),
                ..Self::default()
            },
            Rule::Cppo(p) => {
                let (kind, gate, tau) = match p.gate {
                    None => (Kind::Cppo, None, None),
                    Some(Gate::Inverse) => (Kind::CppoSoft, Some(GateKind::Inverse), None),
                    Some(Gate::Sigmoid { tau }) => {
                        (Kind::CppoSoft, Some(GateKind::Sigmoid), Some(tau))
                    }
                };
                Self {
                    kind,
                    delta: Some(p.delta),
                    delta_b: Some(p.delta_b),
                    w_min: Some(p.w_min),
                    horizon: Some(p.horizon),
                    positions: Some(p.positions),
                    calibration: Some(p.calibration),
                    shuffle_seed: Some(p.shuffle_seed),
                    gate,
                    tau,
                    ..Self::default()
                }
            }
        }
    }

    fn into_rule(self) -> std::result::Result<Rule, String> {
        const CPPO: &[&str] = &[
            "delta",
            "delta_b",
            "w_min",
            "horizon",
            "positions",
            "calibration",
            "shuffle_seed",
        ];
        const SOFT: &[&str] = &[
            "delta",
            "delta_b",
            "w_min",
            "horizon",
            "positions",
            "calibration",
            "shuffle_seed",
            "gate",
            "tau",
        ];
        let (name, allowed): (&str, &[&str]) = match self.kind {
            Kind::None => ("none", &[]),
            Kind::Ratio => ("ratio", &["eps_low", "eps_high"]),
            Kind::Dppo => ("dppo", &["delta"]),
            Kind::Cppo => ("cppo", CPPO),
            Kind::CppoSoft => ("cppo_soft", SOFT),
            Kind::TrmMax => ("trm_max", &["delta"]),
            Kind::TrmAvg => ("trm_avg", &["delta"]),
        };
        if let Some(f) = self.given().into_iter().find(|f| !allowed.contains(f)) {
            let fields = if allowed.is_empty() {
                "it has no parameters".to_string()
            } else {
                format!("its fields are {}", allowed.join(", "))
            };
            return Err(format!(
                "rule.{f}: not a field of rule kind {name} ({fields})"
            ));
        }
        let delta = self.delta.unwrap_or(DEFAULT_DELTA);
        Ok(match self.kind {
            Kind::None => Rule::None,
            Kind::Ratio => Rule::Ratio {
                eps_low: self.eps_low.unwrap_or(DEFAULT_EPS_LOW),
                eps_high: self.eps_high.unwrap_or(DEFAULT_EPS_HIGH),
            },
            Kind::Dppo => Rule::Dppo { delta },
            Kind::TrmMax => Rule::TrmMax { delta },
            Kind::TrmAvg => Rule::TrmAvg { delta },
            Kind::Cppo | Kind::CppoSoft => {
                let gate = match (self.kind, self.gate, self.tau) {
                    (Kind::Cppo, ..) => None,
                    (_, Some(GateKind::Sigmoid), tau) => Some(Gate::Sigmoid {
                        tau: tau.unwrap_or(DEFAULT_SOFT_TAU),
                    }),
                    (_, _, Some(_)) => {
                        return Err(
                            "rule.tau: only the sigmoid gate has a temperature (set \"gate\": \"sigmoid\", or drop tau for the paper's inverse gate)".into(),
                        );
                    }
                    (_, Some(GateKind::Inverse) | None, None) => Some(Gate::Inverse),
                };
                let d = CppoParams::default();
                Rule::Cppo(CppoParams {
                    delta,
                    delta_b: self.delta_b.unwrap_or(d.delta_b),
                    w_min: self.w_min.unwrap_or(d.w_min),
                    horizon: self.horizon.unwrap_or(d.horizon),
                    positions: self.positions.unwrap_or(d.positions),
                    calibration: self.calibration.unwrap_or(d.calibration),
                    shuffle_seed: self.shuffle_seed.unwrap_or(d.shuffle_seed),
                    gate,
                })
            }
        })
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = Rule;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a rule object such as {\"kind\": \"cppo\"}, or a rule kind")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Rule, E> {
                let kind = Kind::deserialize(de::value::StrDeserializer::<E>::new(s))?;
                Wire {
                    kind,
                    ..Wire::default()
                }
                .into_rule()
                .map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<Rule, A::Error> {
                let wire = Wire::deserialize(de::value::MapAccessDeserializer::new(map))?;
                wire.into_rule().map_err(de::Error::custom)
            }
        }
        d.deserialize_any(RuleVisitor)
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        Wire::of(self).serialize(s)
    }
}
