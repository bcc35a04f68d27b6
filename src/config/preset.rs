//! Named configs that reproduce the paper's settings and the official implementations'
//! defaults.
//!
//! CPPO's authors published two implementations besides the paper (Mao et al., "Beyond
//! Uniform Token-Level Trust Region in LLM Reinforcement Learning", arXiv 2606.10968):
//! UniRL (Tencent-Hunyuan/UniRL PR #58, merged, `unirl/algorithms/cppo.py`) and a verl
//! pull request (verl PR #6731, open, head 7528d2e, `compute_policy_loss_cppo` in
//! `verl/trainer/ppo/core_algos.py`). Each preset below is one of their settings:
//!
//! | preset | divergence | δ | δ_b | calibration (q, k, c) | w_min | positions | objective | aggregation | reproduces |
//! |---|---|---|---|---|---|---|---|---|---|
//! | `cppo` | binary TV | 0.15 | 0.02 | 0.9, 1, 2 | 0.8 | response | surrogate | token-mean | the crate's default: the paper's dense setting on binary TV |
//! | `dppo` | binary TV | 0.15 | – | – | – | – | surrogate | token-mean | DPPO at the paper's δ: `cppo` with the rule changed |
//! | `grpo` | – | ratio clip ε = (0.2, 0.28) | – | – | – | – | surrogate | token-mean | the paper's GRPO baseline (DAPO's clip-higher): `cppo` with the rule changed |
//! | `paper_dense` | top-K TV | 0.15 | 0.02 | 0.9, 1, 2 | 0.8 | response | surrogate | token-mean | the paper's Table 3, dense Base models (Qwen3-1.7B-Base, 8B-Base) |
//! | `paper_moe` | top-K TV | 0.20 | 0.02 | 0.9, 1, 2 | 0.8 | response | surrogate | token-mean | Table 3, Qwen3-30B-A3B-Base |
//! | `paper_post_trained` | top-K TV | 0.15 | 0.015 | fixed | 0.8 | response | surrogate | token-mean | Table 3, the post-trained Qwen3-1.7B |
//! | `paper_kl` | top-K KL | 0.1 | 0.002 | 0.9, 1, 2 | 0.8 | response | surrogate | token-mean | the paper's KL variant |
//! | `unirl` | binary TV | 0.2 | 0.02 | 0.9, 1, 2 | 0.8 | response | surrogate (−A ρ keep) | token-mean | UniRL's `CPPOConfig` defaults |
//! | `verl_pr6731` | binary TV | 0.2 (`clip_ratio`) | 0.02 | 0.9, 1, 5 | 0.8 | column | detached IS, C = 3 (`clip_ratio_c`) | token-mean | verl PR #6731's defaults |
//! | `verl_pr6731_scripts` | binary TV | 0.2 | 0.02 | 0.9, 1, 5 | 0.8 | column | detached IS, C = 20 | seq-mean-token-sum-norm | verl PR #6731's example scripts |
//!
//! The paper's main runs use top-K TV with K = 20 (the rollout's top-K token ids, the
//! sampled token in place of the K-th when it is not among them, and a rest bucket, as
//! DPPO builds them): the `paper_*` presets need `topk_logp_old` and `topk_logp` in the
//! batch. Both official implementations ship binary TV.
//!
//! Where the crate departs from an implementation, by design:
//! - UniRL's packed sequences have no padding, and UniRL sums D and W over holes in the
//!   loss mask and includes them in the quantile; the crate never reads values at
//!   holes (they may be garbage), so for rows with holes `unirl` differs. Rows without
//!   holes are UniRL's convention exactly. UniRL's token-mean divides by every packed
//!   token, loss-masked ones included; the crate divides by response tokens.
//! - verl PR #6731 runs in the trainer's dtype (float32, or bfloat16 log-probs); the
//!   crate computes in f64.
//!
//! A preset is reachable by name from the library ([`Preset::from_str`],
//! [`Config::preset`]), from JSON (`{"preset": "verl_pr6731"}`, with any other
//! top-level field overriding the preset's) and from the command line (`--preset`).
//!
//! ```
//! use cppo::{Config, Preset};
//! let verl: Preset = "verl_pr6731".parse()?;
//! let cfg = Config::preset(verl);
//! assert_eq!(cfg.rule.cppo_params().unwrap().positions, cppo::Positions::Column);
//! let err = "verl".parse::<Preset>().unwrap_err().to_string();
//! assert!(err.contains("verl_pr6731")); // the error lists the known names
//! # Ok::<(), cppo::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::aggregate::Aggregation;
use crate::budget::Calibration;
use crate::config::Config;
use crate::divergence::Divergence;
use crate::error::Error;
use crate::objective::Objective;
use crate::rule::{CppoParams, Rule};
use crate::schedule::Positions;

/// A named config. See the [module docs](self) for what each reproduces.
///
/// ```
/// use cppo::{Config, Preset};
/// let p: Preset = "paper_moe".parse()?;
/// assert_eq!(p, Preset::PaperMoe);
/// assert_eq!(p.config().rule.cppo_params().unwrap().delta, 0.20);
/// assert_eq!(Preset::Cppo.config(), Config::cppo());
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// The crate's default: the paper's dense setting on binary TV.
    Cppo,
    /// DPPO at the paper's δ = 0.15: `cppo` with the rule changed.
    Dppo,
    /// The paper's GRPO baseline, ratio clip (0.2, 0.28): `cppo` with the rule changed.
    Grpo,
    /// The paper's Table 3, dense Base models, on top-K TV.
    PaperDense,
    /// The paper's Table 3, the MoE model (δ = 0.20), on top-K TV.
    PaperMoe,
    /// The paper's Table 3, the post-trained model (fixed δ_b = 0.015), on top-K TV.
    PaperPostTrained,
    /// The paper's KL variant (δ = 0.1, δ_b = 0.002), on top-K KL.
    PaperKl,
    /// UniRL's defaults.
    Unirl,
    /// verl PR #6731's defaults.
    VerlPr6731,
    /// verl PR #6731's example scripts (C = 20, seq-mean-token-sum-norm).
    VerlPr6731Scripts,
}

impl Preset {
    /// Every preset, in the order of the module docs' table.
    ///
    /// ```
    /// assert!(cppo::Preset::ALL.iter().any(|p| p.name() == "unirl"));
    /// ```
    pub const ALL: [Preset; 10] = [
        Self::Cppo,
        Self::Dppo,
        Self::Grpo,
        Self::PaperDense,
        Self::PaperMoe,
        Self::PaperPostTrained,
        Self::PaperKl,
        Self::Unirl,
        Self::VerlPr6731,
        Self::VerlPr6731Scripts,
    ];

    /// The preset's name, as configs and the command line spell it.
    ///
    /// ```
    /// assert_eq!(cppo::Preset::PaperMoe.name(), "paper_moe");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cppo => "cppo",
            Self::Dppo => "dppo",
            Self::Grpo => "grpo",
            Self::PaperDense => "paper_dense",
            Self::PaperMoe => "paper_moe",
            Self::PaperPostTrained => "paper_post_trained",
            Self::PaperKl => "paper_kl",
            Self::Unirl => "unirl",
            Self::VerlPr6731 => "verl_pr6731",
            Self::VerlPr6731Scripts => "verl_pr6731_scripts",
        }
    }

    /// One line on what the preset reproduces.
    ///
    /// ```
    /// assert!(cppo::Preset::Unirl.description().contains("UniRL"));
    /// ```
    pub const fn description(self) -> &'static str {
        match self {
            Self::Cppo => {
                "the crate's default: CPPO at the paper's dense setting (delta 0.15, delta_b 0.02 calibrated by P90 within [delta_b, 2 delta_b], w_min 0.8) on binary TV"
            }
            Self::Dppo => "DPPO on binary TV at the paper's delta 0.15: cppo with the rule changed",
            Self::Grpo => {
                "the paper's GRPO baseline, ratio clip (0.2, 0.28) as a mask: cppo with the rule changed"
            }
            Self::PaperDense => {
                "the paper's Table 3, dense Base models (Qwen3-1.7B-Base, 8B-Base): top-K TV, delta 0.15, delta_b 0.02 by P90 in [delta_b, 2 delta_b]"
            }
            Self::PaperMoe => {
                "the paper's Table 3, Qwen3-30B-A3B-Base: paper_dense with delta 0.20"
            }
            Self::PaperPostTrained => {
                "the paper's Table 3, the post-trained Qwen3-1.7B: top-K TV, delta 0.15, a fixed delta_b 0.015"
            }
            Self::PaperKl => {
                "the paper's KL variant: top-K KL, delta 0.1, delta_b 0.002 by P90 in [delta_b, 2 delta_b]"
            }
            Self::Unirl => {
                "UniRL's CPPO defaults (PR #58): binary TV, delta 0.2, delta_b 0.02 by P90 in [delta_b, 2 delta_b], response positions, -A rho keep, token-mean"
            }
            Self::VerlPr6731 => {
                "verl PR #6731's defaults: binary TV, column positions, delta = clip_ratio 0.2, delta_b 0.02 by P90 in [delta_b, 5 delta_b], detached IS with C = clip_ratio_c 3.0, token-mean"
            }
            Self::VerlPr6731Scripts => {
                "verl PR #6731's example scripts: verl_pr6731 with C = 20 and seq-mean-token-sum-norm"
            }
        }
    }

    /// The preset's config.
    ///
    /// ```
    /// let cfg = cppo::Preset::PaperPostTrained.config();
    /// assert_eq!(cfg.rule.cppo_params().unwrap().calibration, None);
    /// ```
    pub fn config(self) -> Config {
        let paper = |divergence, delta, delta_b, calibration| Config {
            divergence,
            ..Config::with_rule(Rule::Cppo(CppoParams {
                delta,
                delta_b: Some(delta_b),
                calibration,
                ..CppoParams::default()
            }))
        };
        let verl = |ratio_cap, aggregation| Config {
            objective: Objective::DetachedIs { ratio_cap },
            aggregation,
            ..Config::with_rule(Rule::Cppo(CppoParams {
                delta: 0.2,
                positions: Positions::Column,
                calibration: Some(Calibration {
                    ceiling: 5.0,
                    ..Calibration::default()
                }),
                ..CppoParams::default()
            }))
        };
        let p90 = Some(Calibration::default());
        match self {
            Self::Cppo => Config::cppo(),
            Self::Dppo => Config::dppo(),
            Self::Grpo => Config::grpo(),
            Self::PaperDense => paper(Divergence::TopkTv, 0.15, 0.02, p90),
            Self::PaperMoe => paper(Divergence::TopkTv, 0.20, 0.02, p90),
            Self::PaperPostTrained => paper(Divergence::TopkTv, 0.15, 0.015, None),
            Self::PaperKl => paper(Divergence::TopkKl, 0.1, 0.002, p90),
            Self::Unirl => paper(Divergence::BinaryTv, 0.2, 0.02, p90),
            Self::VerlPr6731 => verl(3.0, Aggregation::TokenMean),
            Self::VerlPr6731Scripts => verl(20.0, Aggregation::SeqMeanTokenSumNorm),
        }
    }

    /// The known names, comma-separated, for messages.
    pub(crate) fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;

    /// A preset by name; an unknown name is an [`Error::InvalidConfig`] on the field
    /// `preset` that lists the known ones.
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "preset",
                reason: format!("unknown preset {s:?}; the presets are {}", Self::names()),
            })
    }
}

impl Serialize for Preset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Preset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
