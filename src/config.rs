//! The full configuration: divergence, rule, objective, aggregation, KL penalty
//! (SPEC section 9).
//!
//! A [`Config`] deserializes from SPEC section 9's JSON. Omitted fields take their
//! defaults, unknown fields are an error, and the values are checked while the config
//! is deserialized, so a bad config never reaches the engine. A config assembled in code
//! is checked by [`Config::validate`], which [`evaluate`](crate::evaluate) also calls.
//!
//! Presets, differing only in the rule (binary TV divergence, surrogate objective,
//! token-mean), so that a comparison changes one thing at a time:
//!
//! | preset | rule | where the values come from |
//! |---|---|---|
//! | [`Config::cppo`] | `cppo` δ = 0.2, δ_b = 0.05, w_min = 0.8 | w_min is the paper's; δ is DPPO's binary-TV threshold; δ_b is ours (the paper's tuned values are not public) |
//! | [`Config::dppo`] | `dppo` δ = 0.2 | the DPPO paper's binary-TV threshold |
//! | [`Config::grpo`] | `ratio` ε_low = ε_high = 0.2 | PPO's and GRPO's clip range |
//!
//! Under the surrogate objective, the `ratio` rule gives exactly the gradient of PPO's
//! clipped objective: a token outside the clip range that moves away is masked, and one
//! that moves back keeps its gradient.
//!
//! ```
//! use cppo::Config;
//! let json = r#"{"divergence": "binary_tv", "rule": {"kind": "cppo", "delta_b": null}}"#;
//! # let parse = |s: &str| serde_json::from_str::<Config>(s);
//! let cfg: Config = parse(json).unwrap();
//! assert_eq!(cfg.rule, cppo::Rule::Cppo { delta: 0.2, delta_b: None, w_min: 0.8, horizon: None, shuffle_seed: None });
//! // Unknown fields and bad values are refused at parse time:
//! assert!(parse(r#"{"rule": {"kind": "dppo", "detla": 0.1}}"#).is_err());
//! let err = parse(r#"{"rule": {"kind": "dppo", "delta": -1}}"#).unwrap_err();
//! assert!(err.to_string().contains("rule.delta"));
//! ```

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregation;
use crate::divergence::Divergence;
use crate::error::{Error, Result};
use crate::objective::{KlPenalty, Objective};
use crate::rule::{DEFAULT_DELTA, DEFAULT_EPS, Rule};

/// Everything that decides what [`evaluate`](crate::evaluate) computes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Config {
    /// The per-token divergence D_t.
    pub divergence: Divergence,
    /// The trust-region rule.
    pub rule: Rule,
    /// The per-token objective.
    pub objective: Objective,
    /// How per-token losses become one scalar.
    pub aggregation: Aggregation,
    /// Z of `seq-mean-token-sum-norm`; `None` for the batch's padded width L.
    pub norm_length: Option<usize>,
    /// A global N_tok replacing this batch's own, for shards of a larger batch.
    pub num_tokens: Option<u64>,
    /// A global N_seq replacing this batch's own, for shards of a larger batch.
    pub num_seqs: Option<u64>,
    /// The KL penalty to `logp_ref`, or `None`.
    pub kl: Option<KlPenalty>,
}

/// The wire form: same fields, no checks. `Config` converts from it and checks.
#[derive(Deserialize)]
#[serde(rename = "Config", deny_unknown_fields)]
struct ConfigRepr {
    #[serde(default)]
    divergence: Divergence,
    #[serde(default)]
    rule: Rule,
    #[serde(default)]
    objective: Objective,
    #[serde(default)]
    aggregation: Aggregation,
    #[serde(default)]
    norm_length: Option<usize>,
    #[serde(default)]
    num_tokens: Option<u64>,
    #[serde(default)]
    num_seqs: Option<u64>,
    #[serde(default)]
    kl: Option<KlPenalty>,
}

impl TryFrom<ConfigRepr> for Config {
    type Error = Error;
    fn try_from(r: ConfigRepr) -> Result<Self> {
        let cfg = Self {
            divergence: r.divergence,
            rule: r.rule,
            objective: r.objective,
            aggregation: r.aggregation,
            norm_length: r.norm_length,
            num_tokens: r.num_tokens,
            num_seqs: r.num_seqs,
            kl: r.kl,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl<'de> Deserialize<'de> for Config {
    /// Reads a JSON object (not an array: serde would otherwise read a struct from a
    /// sequence of its fields), then checks every value.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = ConfigRepr;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a config object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<ConfigRepr, A::Error> {
                ConfigRepr::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        let repr = d.deserialize_map(Object)?;
        Self::try_from(repr).map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    /// The [`Config::cppo`] preset.
    fn default() -> Self {
        Self::cppo()
    }
}

impl Config {
    /// A config with the given rule and the defaults for everything else: binary TV,
    /// surrogate objective, token-mean, no KL penalty, no count overrides.
    pub const fn with_rule(rule: Rule) -> Self {
        Self {
            divergence: Divergence::BinaryTv,
            rule,
            objective: Objective::Surrogate,
            aggregation: Aggregation::TokenMean,
            norm_length: None,
            num_tokens: None,
            num_seqs: None,
            kl: None,
        }
    }

    /// The paper's method: CPPO, δ = 0.2, δ_b = 0.05, w_min = 0.8, on binary TV.
    ///
    /// ```
    /// let cfg = cppo::Config::cppo();
    /// assert_eq!(cfg.rule.name(), "cppo");
    /// assert!(cfg.validate().is_ok());
    /// ```
    pub fn cppo() -> Self {
        Self::with_rule(Rule::default())
    }

    /// DPPO's binary-TV trust region, δ = 0.2.
    ///
    /// ```
    /// assert_eq!(cppo::Config::dppo().rule, cppo::Rule::Dppo { delta: 0.2 });
    /// ```
    pub fn dppo() -> Self {
        Self::with_rule(Rule::Dppo {
            delta: DEFAULT_DELTA,
        })
    }

    /// GRPO's ratio clip as a mask, ε_low = ε_high = 0.2.
    ///
    /// ```
    /// assert_eq!(cppo::Config::grpo().rule, cppo::Rule::Ratio { eps_low: 0.2, eps_high: 0.2 });
    /// ```
    pub fn grpo() -> Self {
        Self::with_rule(Rule::Ratio {
            eps_low: DEFAULT_EPS,
            eps_high: DEFAULT_EPS,
        })
    }

    /// Checks every field: the rule's and objective's parameters, `norm_length` ≥ 1 and
    /// the KL coefficient. Errors name the JSON field.
    ///
    /// ```
    /// let mut cfg = cppo::Config::cppo();
    /// cfg.norm_length = Some(0);
    /// assert!(matches!(cfg.validate(), Err(cppo::Error::InvalidConfig { field: "norm_length", .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.rule.validate()?;
        self.objective.validate()?;
        if self.norm_length == Some(0) {
            return Err(Error::InvalidConfig {
                field: "norm_length",
                reason: "must be at least 1, got 0".into(),
            });
        }
        if let Some(kl) = &self.kl {
            kl.validate()?;
        }
        Ok(())
    }
}
