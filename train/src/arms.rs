//! The arms of a comparison: a rule name, optionally with parameters, and the objective
//! every arm shares.
//!
//! An arm is written `NAME` or `NAME:key=value:key=value`, for example `dppo:delta=0.1`
//! or `cppo:delta=0.2:delta_b=0.03`. The keys are the fields of the config's `rule`
//! object (`delta`, `delta_b`, `w_min`, `eps_low`, `eps_high`, `tau`, ...); a value is a
//! JSON value (`null` for no budget). The names:
//!
//! | name | config |
//! |---|---|
//! | `grpo`, `dppo`, `cppo` | the crate's presets (`cppo` is the paper's CPPO with the calibrated budget) |
//! | `cppo_weights` | `cppo` without the prefix budget: the position weights alone |
//! | `cppo_budget` | `cppo` with w_min = 1: the prefix budget alone |
//! | `cppo_shuffled` | `cppo` with its position weights permuted within each row (shuffle seed 1) |
//! | `cppo_soft` | `cppo` with the inverse gate instead of the hard mask |
//! | any other rule kind | that kind with its defaults (`none`, `ratio`, `trm_avg`, `trm_max`, ...) |
//!
//! The shared objective replaces each arm's own, so that in a comparison the rule is the
//! only difference between arms.

use cppo::Config;
use cppo::objective::Objective;
use serde_json::{Value, json};

use crate::Res;

/// The config of an arm, with `objective` (if given) in place of the arm's own.
pub fn config(arm: &str, objective: Option<Objective>) -> Res<Config> {
    let mut parts = arm.split(':');
    let name = parts.next().unwrap_or_default();
    let base = match name {
        "grpo" => Config::grpo(),
        "dppo" => Config::dppo(),
        "cppo" | "cppo_weights" | "cppo_budget" | "cppo_shuffled" | "cppo_soft" => Config::cppo(),
        kind => serde_json::from_value(json!({"rule": {"kind": kind}}))
            .map_err(|e| format!("arm {arm:?}: {e}"))?,
    };
    let mut v = serde_json::to_value(base)?;
    let rule = v
        .get_mut("rule")
        .and_then(Value::as_object_mut)
        .ok_or("a config's rule serializes as an object")?;
    match name {
        "cppo_weights" => {
            rule.insert("delta_b".into(), Value::Null);
        }
        "cppo_budget" => {
            rule.insert("w_min".into(), json!(1.0));
        }
        "cppo_shuffled" => {
            rule.insert("shuffle_seed".into(), json!(1));
        }
        "cppo_soft" => {
            rule.insert("kind".into(), json!("cppo_soft"));
            rule.insert("gate".into(), json!("inverse"));
        }
        _ => {}
    }
    for kv in parts {
        let (key, value) = kv
            .split_once('=')
            .ok_or_else(|| format!("arm {arm:?}: {kv:?} is not key=value"))?;
        // An ablation's defining field stays as the ablation sets it.
        let fixed = match name {
            "cppo_weights" => Some("delta_b"),
            "cppo_budget" => Some("w_min"),
            "cppo_shuffled" => Some("shuffle_seed"),
            "cppo_soft" => Some("kind"),
            _ => None,
        };
        if fixed == Some(key) {
            return Err(format!("arm {arm:?}: {name} fixes {key}; use cppo to set it").into());
        }
        let value: Value = serde_json::from_str(value)
            .map_err(|e| format!("arm {arm:?}: {key}: {value:?} is not a JSON value: {e}"))?;
        rule.insert(key.into(), value);
    }
    let mut cfg: Config = serde_json::from_value(v).map_err(|e| format!("arm {arm:?}: {e}"))?;
    if let Some(o) = objective {
        cfg.objective = o;
    }
    cfg.validate().map_err(|e| format!("arm {arm:?}: {e}"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cppo::Rule;
    use cppo::rule::Gate;

    #[test]
    fn names_and_overrides() {
        let c = config("cppo_weights", None).unwrap();
        let p = *c.rule.cppo_params().unwrap();
        assert_eq!(p.delta_b, None);
        assert_eq!(p.w_min, Config::cppo().rule.cppo_params().unwrap().w_min);
        let c = config("cppo_budget:delta=0.3", None).unwrap();
        let p = *c.rule.cppo_params().unwrap();
        assert_eq!((p.w_min, p.delta), (1.0, 0.3));
        assert!(p.delta_b.is_some() && p.calibration.is_some());
        let c = config("cppo_soft", None).unwrap();
        assert_eq!(c.rule.cppo_params().unwrap().gate, Some(Gate::Inverse));
        assert_eq!(c.rule.name(), "cppo_soft");
        assert_eq!(
            config("cppo_shuffled", None)
                .unwrap()
                .rule
                .cppo_params()
                .unwrap()
                .shuffle_seed,
            Some(1)
        );
        assert_eq!(
            config("dppo:delta=0.1", None).unwrap().rule,
            Rule::Dppo { delta: 0.1 }
        );
        assert_eq!(
            config("grpo:eps_high=0.3", None).unwrap().rule,
            Rule::Ratio {
                eps_low: 0.2,
                eps_high: 0.3
            }
        );
        assert_eq!(config("trm_avg", None).unwrap().rule.name(), "trm_avg");
        let shared = Objective::DetachedIs { ratio_cap: 3.0 };
        assert_eq!(config("none", Some(shared)).unwrap().objective, shared);
    }

    #[test]
    fn bad_arms_are_errors_that_name_the_arm() {
        for bad in [
            "dppo:delta=-1",
            "dppo:delta",
            "dppo:nope=1",
            "nope",
            "cppo:delta=x",
            "cppo_weights:delta_b=0.1",
            "cppo_budget:w_min=0.5",
        ] {
            let e = config(bad, None).unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
    }
}
