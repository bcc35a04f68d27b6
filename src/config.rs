//! The full configuration: divergence, rule, objective, aggregation, KL penalty.
//!
//! A [`Config`] deserializes from JSON (any serde format) in the schema of
//! [the command-line contract](crate::doc::command_line). Omitted fields take their defaults,
//! unknown fields are an error, and the values are checked while the config is
//! deserialized, so a bad config never reaches the engine. A config assembled in code is
//! checked by [`Config::validate`], which [`evaluate`](crate::evaluate) also calls.
//!
//! A config may start from a named [`Preset`]: `{"preset": "verl_pr6731"}` takes that
//! preset's values, and every other top-level field given replaces the preset's (a
//! `rule` object replaces the preset's rule as a whole, its omitted fields taking the
//! rule's defaults).
//!
//! The three presets that differ only in the rule (binary TV divergence, surrogate
//! objective, token-mean), so that a comparison changes one thing at a time:
//!
//! | preset | rule | where the values come from |
//! |---|---|---|
//! | [`Config::cppo`] | `cppo` δ = 0.15, δ_b = 0.02 calibrated by P90 within [δ_b, 2 δ_b], w_min = 0.8 | the paper's Table 3 (dense models) and Eq. 22 |
//! | [`Config::dppo`] | `dppo` δ = 0.15 | the same δ |
//! | [`Config::grpo`] | `ratio` ε_low = 0.2, ε_high = 0.28 | the paper's GRPO baseline (DAPO's clip-higher) |
//!
//! Under the surrogate objective, the `ratio` rule gives exactly the gradient of PPO's
//! clipped objective: a token outside the clip range that moves away is masked, and one
//! that moves back keeps its gradient. The [`preset`] module has the
//! paper's other settings and the official implementations' defaults.
//!
//! With the `json` feature, [`Config::from_json`], [`Config::from_json_file`] and
//! `str::parse` read one; without it, any serde format does (here `serde_json`). A rule or
//! an objective may be given by its kind alone (`"rule": "dppo"`, `"objective":
//! "ppo_clip"`), and an unknown field or name is refused with the closest valid one when
//! one is close (`token_mean` → `token-mean`, `detla` → `delta`).
//!
//! ```
//! use cppo::Config;
//! let json = r#"{"divergence": "binary_tv", "rule": {"kind": "cppo", "delta_b": null}}"#;
//! let parse = |s: &str| serde_json::from_str::<Config>(s);
//! let cfg: Config = parse(json).unwrap();
//! assert_eq!(cfg.rule.cppo_params().unwrap().delta_b, None);
//! // Unknown fields and bad values are refused at parse time:
//! assert!(parse(r#"{"rule": {"kind": "dppo", "detla": 0.1}}"#).is_err());
//! let err = parse(r#"{"rule": {"kind": "dppo", "delta": -1}}"#).unwrap_err();
//! assert!(err.to_string().contains("rule.delta"));
//! let err = parse(r#"{"aggregation": "token_mean"}"#).unwrap_err();
//! assert!(err.to_string().contains("did you mean `token-mean`?"));
//! assert_eq!(parse(r#"{"rule": "dppo"}"#).unwrap(), Config::dppo());
//! // A preset, with an override:
//! let verl = parse(r#"{"preset": "verl_pr6731", "aggregation": "seq-mean-token-mean"}"#).unwrap();
//! assert_eq!(verl.objective, cppo::Objective::DetachedIs { ratio_cap: 3.0 });
//! ```

use serde::{Deserialize, Deserializer, Serialize};

use crate::aggregate::Aggregation;
use crate::divergence::Divergence;
use crate::error::{Error, Result};
use crate::float::Numerics;
use crate::objective::{KlPenalty, Objective};
use crate::rule::{DEFAULT_DELTA, DEFAULT_EPS_HIGH, DEFAULT_EPS_LOW, Rule};

mod hint;
pub mod preset;

use preset::Preset;

/// Everything that decides what [`evaluate`](crate::evaluate) computes.
///
/// ```
/// use cppo::{Aggregation, Config, Rule};
/// let agg = Aggregation::SeqMeanTokenSumNorm;
/// let cfg = Config { aggregation: agg, norm_length: Some(512), ..Config::grpo() };
/// assert!(cfg.validate().is_ok());
/// assert_eq!(cfg.rule, Rule::Ratio { eps_low: 0.2, eps_high: 0.28 });
/// assert_eq!(Config::default(), Config::cppo());
/// ```
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
    /// The arithmetic of the per-token exponentials: [`Numerics::Exact`] (the default)
    /// or the opt-in [`Numerics::F32Exp`].
    pub numerics: Numerics,
}

/// `null` and absent told apart: absent → `None`, `null` → `Some(None)`.
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The wire form: every field optional, so that a preset's values stay where a field
/// is absent. `Config` converts from it and checks.
/// An objective object, or its kind alone (`"surrogate"` for `{"kind": "surrogate"}`), as
/// a rule may be given by its kind.
fn objective_or_kind<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Objective>, D::Error> {
    struct ObjectiveVisitor;
    impl<'de> serde::de::Visitor<'de> for ObjectiveVisitor {
        type Value = Objective;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(
                "an objective object such as {\"kind\": \"ppo_clip\"}, or an objective kind",
            )
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Objective, E> {
            use serde::de::IntoDeserializer;
            let kind = std::iter::once(("kind", s.into_deserializer()));
            Objective::deserialize(serde::de::value::MapDeserializer::<_, E>::new(kind))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            map: A,
        ) -> std::result::Result<Objective, A::Error> {
            Objective::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(ObjectiveVisitor).map(Some)
}

#[derive(Deserialize)]
#[serde(rename = "Config", deny_unknown_fields)]
struct ConfigRepr {
    #[serde(default)]
    preset: Option<Preset>,
    #[serde(default)]
    divergence: Option<Divergence>,
    #[serde(default)]
    rule: Option<Rule>,
    #[serde(default, deserialize_with = "objective_or_kind")]
    objective: Option<Objective>,
    #[serde(default)]
    aggregation: Option<Aggregation>,
    #[serde(default, deserialize_with = "nullable")]
    norm_length: Option<Option<usize>>,
    #[serde(default, deserialize_with = "nullable")]
    num_tokens: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    num_seqs: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    kl: Option<Option<KlPenalty>>,
    #[serde(default)]
    numerics: Option<Numerics>,
}

impl TryFrom<ConfigRepr> for Config {
    type Error = Error;
    fn try_from(r: ConfigRepr) -> Result<Self> {
        let base = r.preset.map_or_else(Self::cppo, Preset::config);
        let cfg = Self {
            divergence: r.divergence.unwrap_or(base.divergence),
            rule: r.rule.unwrap_or(base.rule),
            objective: r.objective.unwrap_or(base.objective),
            aggregation: r.aggregation.unwrap_or(base.aggregation),
            norm_length: r.norm_length.unwrap_or(base.norm_length),
            num_tokens: r.num_tokens.unwrap_or(base.num_tokens),
            num_seqs: r.num_seqs.unwrap_or(base.num_seqs),
            kl: r.kl.unwrap_or(base.kl),
            numerics: r.numerics.unwrap_or(base.numerics),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Config;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a config object")
            }
            // The values are checked here, inside the format's map, so that a format that
            // tracks positions (serde_json) gives the error one.
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Config, A::Error> {
                let repr =
                    ConfigRepr::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                        .map_err(|e| match hint::with_hint(&e.to_string()) {
                            Some(m) => serde::de::Error::custom(m),
                            None => e,
                        })?;
                Config::try_from(repr).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_map(Object)
    }
}

/// Reading a config from JSON text (feature `json`).
#[cfg(feature = "json")]
impl Config {
    /// Reads a config from JSON text, in the schema of
    /// [the command-line contract](crate::doc::command_line): omitted fields take their
    /// defaults, and every value is checked. A rule or an objective may be given by its
    /// kind alone (`"rule": "dppo"`). An unknown field or name is refused with the closest
    /// valid one when one is close.
    ///
    /// ```
    /// use cppo::{Config, Error};
    /// let cfg = Config::from_json(r#"{"rule": {"kind": "dppo", "delta": 0.2}}"#)?;
    /// assert_eq!(cfg.rule, cppo::Rule::Dppo { delta: 0.2 });
    /// // `str::parse` does the same.
    /// let cfg: Config = r#"{"preset": "verl_pr6731", "rule": "dppo"}"#.parse()?;
    /// assert_eq!(cfg.rule.name(), "dppo");
    ///
    /// let err = Config::from_json(r#"{"aggregation": "token_mean"}"#).unwrap_err();
    /// assert!(err.to_string().contains("did you mean `token-mean`?"), "{err}");
    /// assert!(matches!(err, Error::ConfigParse { line: 1, .. }));
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse_json(text, None)
    }

    /// Reads a config from a JSON file, as [`Config::from_json`]; the errors name the
    /// file.
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("cppo-doc-{}.json", std::process::id()));
    /// std::fs::write(&path, r#"{"rule": "cppo", "objective": "detached_is"}"#).unwrap();
    /// let cfg = cppo::Config::from_json_file(&path)?;
    /// assert_eq!(cfg.objective, cppo::Objective::DetachedIs { ratio_cap: 10.0 });
    /// std::fs::remove_file(&path).unwrap();
    /// assert!(matches!(cppo::Config::from_json_file(&path), Err(cppo::Error::Io { .. })));
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        Self::parse_json(&text, Some(shown))
    }

    fn parse_json(text: &str, path: Option<String>) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::ConfigParse {
            path,
            message: hint::strip_position(&e.to_string()).to_string(),
            line: e.line(),
            column: e.column(),
        })
    }
}

/// [`Config::from_json`] as [`str::parse`] (feature `json`).
///
/// ```
/// let cfg: cppo::Config = "{}".parse()?;
/// assert_eq!(cfg, cppo::Config::cppo());
/// # Ok::<(), cppo::Error>(())
/// ```
#[cfg(feature = "json")]
impl std::str::FromStr for Config {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::from_json(text)
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
    /// surrogate objective, token-mean, no KL penalty, no count overrides, exact
    /// numerics.
    ///
    /// ```
    /// let cfg = cppo::Config::with_rule(cppo::Rule::None);
    /// assert_eq!(cfg.divergence, cppo::Divergence::BinaryTv);
    /// ```
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
            numerics: Numerics::Exact,
        }
    }

    /// The paper's method at its dense setting, on binary TV: CPPO, δ = 0.15, δ_b = 0.02
    /// calibrated per row by P90 within [δ_b, 2 δ_b], w_min = 0.8.
    ///
    /// ```
    /// let cfg = cppo::Config::cppo();
    /// assert_eq!(cfg.rule.name(), "cppo");
    /// assert!(cfg.validate().is_ok());
    /// ```
    pub fn cppo() -> Self {
        Self::with_rule(Rule::default())
    }

    /// DPPO's binary-TV trust region at the same δ = 0.15.
    ///
    /// ```
    /// assert_eq!(cppo::Config::dppo().rule, cppo::Rule::Dppo { delta: 0.15 });
    /// ```
    pub fn dppo() -> Self {
        Self::with_rule(Rule::Dppo {
            delta: DEFAULT_DELTA,
        })
    }

    /// The paper's GRPO baseline: the ratio clip as a mask, ε_low = 0.2, ε_high = 0.28.
    ///
    /// ```
    /// assert_eq!(cppo::Config::grpo().rule, cppo::Rule::Ratio { eps_low: 0.2, eps_high: 0.28 });
    /// ```
    pub fn grpo() -> Self {
        Self::with_rule(Rule::Ratio {
            eps_low: DEFAULT_EPS_LOW,
            eps_high: DEFAULT_EPS_HIGH,
        })
    }

    /// A named preset's config (see [`crate::preset`]).
    ///
    /// ```
    /// use cppo::{Config, Preset};
    /// assert_eq!(Config::preset(Preset::Grpo), Config::grpo());
    /// ```
    pub fn preset(preset: Preset) -> Self {
        preset.config()
    }

    /// Checks every field: the rule's and objective's parameters, `norm_length` ≥ 1 and
    /// the KL coefficient. Errors name the config field.
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
