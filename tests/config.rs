//! The JSON config of SPEC section 9: defaults, presets, unknown fields, and every range
//! check, each naming its field.

use cppo::{Aggregation, Config, Divergence, KlEstimator, KlPenalty, Objective, Rule};

fn parse(s: &str) -> Result<Config, serde_json::Error> {
    serde_json::from_str(s)
}

#[test]
fn spec_example_parses() {
    let cfg = parse(
        r#"{
          "divergence": "binary_tv",
          "rule": {"kind": "cppo", "delta": 0.2, "delta_b": 0.05, "w_min": 0.8, "horizon": null},
          "objective": {"kind": "surrogate"},
          "aggregation": "token-mean",
          "norm_length": null, "num_tokens": null, "num_seqs": null,
          "kl": null
        }"#,
    )
    .unwrap();
    assert_eq!(cfg, Config::cppo());
}

#[test]
fn omitted_fields_take_defaults() {
    assert_eq!(parse("{}").unwrap(), Config::cppo());
    let cfg = parse(r#"{"rule": {"kind": "cppo"}}"#).unwrap();
    assert_eq!(
        cfg.rule,
        Rule::Cppo {
            delta: 0.2,
            delta_b: Some(0.05),
            w_min: 0.8,
            horizon: None,
            shuffle_seed: None
        }
    );
    // Explicit null is "no budget", which is not the same as omitted.
    let cfg = parse(r#"{"rule": {"kind": "cppo", "delta_b": null}}"#).unwrap();
    assert_eq!(
        cfg.rule,
        Rule::Cppo {
            delta: 0.2,
            delta_b: None,
            w_min: 0.8,
            horizon: None,
            shuffle_seed: None
        }
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "ratio"}}"#).unwrap().rule,
        Rule::Ratio {
            eps_low: 0.2,
            eps_high: 0.2
        }
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "trm_avg"}}"#).unwrap().rule,
        Rule::TrmAvg { delta: 0.2 }
    );
    let o = |s: &str| {
        parse(&format!(r#"{{"objective": {s}}}"#))
            .unwrap()
            .objective
    };
    assert_eq!(
        o(r#"{"kind": "detached_is"}"#),
        Objective::DetachedIs { ratio_cap: 10.0 }
    );
    assert_eq!(
        o(r#"{"kind": "cispo"}"#),
        Objective::Cispo { eps_high: 0.28 }
    );
    assert_eq!(
        o(r#"{"kind": "ppo_clip", "dual_clip": 3}"#),
        Objective::PpoClip {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: Some(3.0)
        }
    );
}

#[test]
fn every_name_parses() {
    for (s, d) in [
        ("binary_tv", Divergence::BinaryTv),
        ("binary_kl", Divergence::BinaryKl),
        ("topk_tv", Divergence::TopkTv),
        ("topk_kl", Divergence::TopkKl),
    ] {
        assert_eq!(
            parse(&format!(r#"{{"divergence": "{s}"}}"#))
                .unwrap()
                .divergence,
            d
        );
        assert_eq!(d.name(), s);
    }
    for (s, a) in [
        ("token-mean", Aggregation::TokenMean),
        ("seq-mean-token-mean", Aggregation::SeqMeanTokenMean),
        ("seq-mean-token-sum", Aggregation::SeqMeanTokenSum),
        ("seq-mean-token-sum-norm", Aggregation::SeqMeanTokenSumNorm),
    ] {
        assert_eq!(
            parse(&format!(r#"{{"aggregation": "{s}"}}"#))
                .unwrap()
                .aggregation,
            a
        );
        assert_eq!(a.name(), s);
    }
    for kind in ["none", "ratio", "dppo", "cppo", "trm_max", "trm_avg"] {
        let r = parse(&format!(r#"{{"rule": {{"kind": "{kind}"}}}}"#))
            .unwrap()
            .rule;
        assert_eq!(r.name(), kind);
    }
    let cfg = parse(r#"{"kl": {"estimator": "k3", "coef": 0.01}}"#).unwrap();
    assert_eq!(
        cfg.kl,
        Some(KlPenalty {
            estimator: KlEstimator::K3,
            coef: 0.01
        })
    );
}

#[test]
fn unknown_fields_are_errors() {
    for s in [
        r#"{"divergance": "binary_tv"}"#,
        r#"{"rule": {"kind": "cppo", "detla": 0.1}}"#,
        r#"{"rule": {"kind": "dppo", "w_min": 0.8}}"#,
        r#"{"objective": {"kind": "surrogate", "eps": 0.2}}"#,
        r#"{"kl": {"estimator": "k1", "coef": 0.1, "beta": 1}}"#,
        r#"{"rule": {"kind": "gspo"}}"#,
        r#"{"divergence": "tv"}"#,
        r#"{"aggregation": "token_mean"}"#,
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains("unknown"), "{s}: {err}");
    }
}

#[test]
fn bad_values_name_their_field() {
    for (s, field) in [
        (r#"{"rule": {"kind": "cppo", "delta": 0}}"#, "rule.delta"),
        (r#"{"rule": {"kind": "cppo", "delta": -0.1}}"#, "rule.delta"),
        (
            r#"{"rule": {"kind": "cppo", "delta_b": -0.01}}"#,
            "rule.delta_b",
        ),
        (r#"{"rule": {"kind": "cppo", "w_min": 0}}"#, "rule.w_min"),
        (r#"{"rule": {"kind": "cppo", "w_min": 1.5}}"#, "rule.w_min"),
        (
            r#"{"rule": {"kind": "cppo", "horizon": 0}}"#,
            "rule.horizon",
        ),
        (r#"{"rule": {"kind": "dppo", "delta": 0}}"#, "rule.delta"),
        (
            r#"{"rule": {"kind": "trm_max", "delta": -1}}"#,
            "rule.delta",
        ),
        (
            r#"{"rule": {"kind": "ratio", "eps_low": -0.2}}"#,
            "rule.eps_low",
        ),
        (
            r#"{"rule": {"kind": "ratio", "eps_high": -0.2}}"#,
            "rule.eps_high",
        ),
        (
            r#"{"objective": {"kind": "detached_is", "ratio_cap": 0}}"#,
            "objective.ratio_cap",
        ),
        (
            r#"{"objective": {"kind": "ppo_clip", "eps_low": -1}}"#,
            "objective.eps_low",
        ),
        (
            r#"{"objective": {"kind": "ppo_clip", "dual_clip": 1.0}}"#,
            "objective.dual_clip",
        ),
        (
            r#"{"objective": {"kind": "cispo", "eps_high": -0.1}}"#,
            "objective.eps_high",
        ),
        (r#"{"norm_length": 0}"#, "norm_length"),
        (r#"{"kl": {"estimator": "k2", "coef": -0.1}}"#, "kl.coef"),
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains(field), "{s}: {err}");
    }
    // Edge values that are valid.
    for s in [
        r#"{"rule": {"kind": "cppo", "w_min": 1, "delta_b": 0, "horizon": 1}}"#,
        r#"{"rule": {"kind": "ratio", "eps_low": 0, "eps_high": 0}}"#,
        r#"{"kl": {"estimator": "k1", "coef": 0}}"#,
        r#"{"num_tokens": 0, "num_seqs": 0}"#,
    ] {
        parse(s).expect(s);
    }
}

#[test]
fn hand_built_configs_are_checked_too() {
    let mut cfg = Config::dppo();
    cfg.rule = Rule::Dppo { delta: f64::NAN };
    assert!(matches!(
        cfg.validate(),
        Err(cppo::Error::InvalidConfig {
            field: "rule.delta",
            ..
        })
    ));
    // evaluate refuses it as well.
    let z = cppo::ndarray::Array2::<f64>::zeros((1, 1));
    let (a, m) = (
        cppo::ndarray::Array1::<f64>::ones(1),
        cppo::ndarray::Array2::from_elem((1, 1), true),
    );
    let batch = cppo::Batch::new(&z, &z, &a, &m).unwrap();
    assert!(cppo::evaluate(&cfg, &batch, cppo::Par::Seq).is_err());
}

#[test]
fn only_an_object_is_a_config() {
    for s in ["[]", "[\"binary_tv\"]", "0", "null", "\"cppo\""] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains("a config object"), "{s}: {err}");
    }
}

#[test]
fn presets_round_trip() {
    for cfg in [Config::cppo(), Config::dppo(), Config::grpo()] {
        cfg.validate().unwrap();
        let s = serde_json::to_string(&cfg).unwrap();
        assert_eq!(parse(&s).unwrap(), cfg, "{s}");
    }
}
