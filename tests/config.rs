//! The JSON config of the command-line contract: defaults, presets, unknown fields, and
//! every range check, each naming its field.

use cppo::{
    Aggregation, Calibration, Config, CppoParams, Divergence, KlEstimator, KlPenalty, Objective,
    Positions, Preset, Rule,
};

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
    // The contract's example: its own δ and δ_b; the paper's calibration, omitted, is on.
    assert_eq!(
        cfg,
        Config::with_rule(Rule::Cppo(CppoParams {
            delta: 0.2,
            delta_b: Some(0.05),
            ..CppoParams::default()
        }))
    );
}

#[test]
fn omitted_fields_take_defaults() {
    assert_eq!(parse("{}").unwrap(), Config::cppo());
    // The paper's Table 3 (dense) and Eq. 22.
    let cfg = parse(r#"{"rule": {"kind": "cppo"}}"#).unwrap();
    assert_eq!(
        cfg.rule,
        Rule::Cppo(CppoParams {
            delta: 0.15,
            delta_b: Some(0.02),
            w_min: 0.8,
            horizon: None,
            positions: Positions::Response,
            calibration: Some(Calibration {
                quantile: 0.9,
                scale: 1.0,
                ceiling: 2.0
            }),
            shuffle_seed: None,
            gate: None,
        })
    );
    // Explicit null is "no budget", which is not the same as omitted.
    let cfg = parse(r#"{"rule": {"kind": "cppo", "delta_b": null}}"#).unwrap();
    assert_eq!(cfg.rule.cppo_params().unwrap().delta_b, None);
    // A fixed budget; a partial calibration takes the paper's other values.
    let fixed = parse(r#"{"rule": {"kind": "cppo", "calibration": null}}"#).unwrap();
    assert_eq!(fixed.rule.cppo_params().unwrap().calibration, None);
    let verl = parse(r#"{"rule": {"kind": "cppo", "calibration": {"ceiling": 5}}}"#).unwrap();
    assert_eq!(
        verl.rule.cppo_params().unwrap().calibration,
        Some(Calibration {
            quantile: 0.9,
            scale: 1.0,
            ceiling: 5.0
        })
    );
    let column = parse(r#"{"rule": {"kind": "cppo", "positions": "column"}}"#).unwrap();
    assert_eq!(
        column.rule.cppo_params().unwrap().positions,
        Positions::Column
    );
    // A bare string names a kind with its defaults.
    assert_eq!(parse(r#"{"rule": "cppo"}"#).unwrap().rule, Rule::default());
    assert_eq!(
        parse(r#"{"rule": {"kind": "ratio"}}"#).unwrap().rule,
        Rule::Ratio {
            eps_low: 0.2,
            eps_high: 0.28
        }
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "trm_avg"}}"#).unwrap().rule,
        Rule::TrmAvg { delta: 0.15 }
    );
    assert_eq!(
        parse(r#"{"rule": {"kind": "dppo"}}"#).unwrap().rule,
        Rule::Dppo { delta: 0.15 }
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

/// A field of another rule kind is refused, naming the field and the kind's own.
#[test]
fn fields_of_other_kinds_are_errors() {
    for (s, field) in [
        (r#"{"rule": {"kind": "dppo", "w_min": 0.8}}"#, "rule.w_min"),
        (r#"{"rule": {"kind": "cppo", "tau": 0.1}}"#, "rule.tau"),
        (r#"{"rule": {"kind": "ratio", "delta": 0.1}}"#, "rule.delta"),
        (r#"{"rule": {"kind": "none", "delta": 0.1}}"#, "rule.delta"),
        (
            r#"{"rule": {"kind": "trm_max", "calibration": null}}"#,
            "rule.calibration",
        ),
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(
            err.contains(field) && err.contains("not a field"),
            "{s}: {err}"
        );
    }
}

/// Presets by name, from JSON with overrides; an unknown name lists the known ones.
#[test]
fn presets_parse_and_override() {
    for p in Preset::ALL {
        let cfg = parse(&format!(r#"{{"preset": "{}"}}"#, p.name())).unwrap();
        assert_eq!(cfg, p.config(), "{p}");
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        assert!(!p.description().is_empty());
        cfg.validate().unwrap();
    }
    let cfg = parse(r#"{"preset": "verl_pr6731_scripts", "aggregation": "token-mean"}"#).unwrap();
    assert_eq!(cfg.aggregation, Aggregation::TokenMean);
    assert_eq!(cfg.objective, Objective::DetachedIs { ratio_cap: 20.0 });
    assert_eq!(cfg.rule.cppo_params().unwrap().positions, Positions::Column);
    // A rule given replaces the preset's rule as a whole.
    let cfg = parse(r#"{"preset": "verl_pr6731", "rule": {"kind": "dppo"}}"#).unwrap();
    assert_eq!(cfg.rule, Rule::Dppo { delta: 0.15 });
    assert_eq!(cfg.objective, Objective::DetachedIs { ratio_cap: 3.0 });
    // null overrides too.
    let cfg = parse(r#"{"preset": "unirl", "kl": null}"#).unwrap();
    assert_eq!(cfg.kl, None);
    let err = parse(r#"{"preset": "verl"}"#).unwrap_err().to_string();
    assert!(
        err.contains("unknown preset") && err.contains("verl_pr6731"),
        "{err}"
    );
    let err = "paper".parse::<Preset>().unwrap_err();
    assert!(matches!(
        err,
        cppo::Error::InvalidConfig {
            field: "preset",
            ..
        }
    ));
}

/// The presets' numbers, from the paper's Table 3 and the official code's defaults.
#[test]
fn presets_hold_the_published_values() {
    let cppo = |p: Preset| *p.config().rule.cppo_params().unwrap();
    let (dense, moe, post, kl) = (
        cppo(Preset::PaperDense),
        cppo(Preset::PaperMoe),
        cppo(Preset::PaperPostTrained),
        cppo(Preset::PaperKl),
    );
    assert_eq!(
        (dense.delta, dense.delta_b, dense.w_min),
        (0.15, Some(0.02), 0.8)
    );
    assert_eq!(dense.calibration, Some(Calibration::default()));
    assert_eq!((moe.delta, moe.delta_b), (0.20, Some(0.02)));
    assert_eq!(
        (post.delta, post.delta_b, post.calibration),
        (0.15, Some(0.015), None)
    );
    assert_eq!((kl.delta, kl.delta_b), (0.1, Some(0.002)));
    assert_eq!(Preset::PaperDense.config().divergence, Divergence::TopkTv);
    assert_eq!(Preset::PaperKl.config().divergence, Divergence::TopkKl);
    let unirl = cppo(Preset::Unirl);
    assert_eq!(
        (unirl.delta, unirl.delta_b, unirl.w_min),
        (0.2, Some(0.02), 0.8)
    );
    assert_eq!(unirl.positions, Positions::Response);
    let verl = Preset::VerlPr6731.config();
    let vp = *verl.rule.cppo_params().unwrap();
    assert_eq!(
        (vp.delta, vp.delta_b, vp.w_min, vp.positions),
        (0.2, Some(0.02), 0.8, Positions::Column)
    );
    assert_eq!(vp.calibration.unwrap().ceiling, 5.0);
    assert_eq!(verl.objective, Objective::DetachedIs { ratio_cap: 3.0 });
    assert_eq!(
        Preset::VerlPr6731Scripts.config().aggregation,
        Aggregation::SeqMeanTokenSumNorm
    );
    // The three that differ only in the rule.
    let strip = |mut c: Config| {
        c.rule = Rule::None;
        c
    };
    assert_eq!(strip(Config::cppo()), strip(Config::dppo()));
    assert_eq!(strip(Config::cppo()), strip(Config::grpo()));
    assert_eq!(
        Config::grpo().rule,
        Rule::Ratio {
            eps_low: 0.2,
            eps_high: 0.28
        }
    );
}

/// The calibration's and the soft gate's ranges.
#[test]
fn calibration_and_gate_values_are_checked() {
    for (s, field) in [
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"quantile": 0}}}"#,
            "rule.calibration.quantile",
        ),
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"quantile": 1.5}}}"#,
            "rule.calibration.quantile",
        ),
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"scale": -1}}}"#,
            "rule.calibration.scale",
        ),
        (
            r#"{"rule": {"kind": "cppo", "calibration": {"ceiling": 0.5}}}"#,
            "rule.calibration.ceiling",
        ),
        (
            r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": -1}}"#,
            "rule.tau",
        ),
        (r#"{"rule": {"kind": "cppo_soft", "tau": 0.1}}"#, "rule.tau"),
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains(field), "{s}: {err}");
    }
    for s in [
        r#"{"rule": {"kind": "cppo", "calibration": {"q": 0.9}}}"#,
        r#"{"rule": {"kind": "cppo", "positions": "columns"}}"#,
        r#"{"rule": {"kind": "cppo_soft", "gate": "hard"}}"#,
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains("unknown"), "{s}: {err}");
    }
    // q = 1 (the max) and k = 0 (the fixed budget) are valid.
    parse(
        r#"{"rule": {"kind": "cppo", "calibration": {"quantile": 1, "scale": 0, "ceiling": 1}}}"#,
    )
    .unwrap();
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

/// An unknown name gets the closest valid one, when one is close, for every kind of name
/// the schema has; a far one gets none.
#[test]
fn unknown_names_suggest_the_closest() {
    for (s, hint) in [
        (r#"{"aggregation": "token_mean"}"#, "`token-mean`"),
        (
            r#"{"aggregation": "Seq-Mean-Token-Sum"}"#,
            "`seq-mean-token-sum`",
        ),
        (r#"{"divergence": "binary-tv"}"#, "`binary_tv`"),
        (r#"{"divergance": "binary_tv"}"#, "`divergence`"),
        (r#"{"rule": {"kind": "cpo"}}"#, "`cppo`"),
        (r#"{"rule": {"kind": "cppo", "detla": 0.1}}"#, "`delta`"),
        (
            r#"{"rule": {"kind": "cppo", "positions": "columns"}}"#,
            "`column`",
        ),
        (r#"{"objective": {"kind": "ppo-clip"}}"#, "`ppo_clip`"),
        (r#"{"objective": "detached-is"}"#, "`detached_is`"),
        (r#"{"kl": {"estimator": "K3", "coef": 0.1}}"#, "`k3`"),
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(err.contains(&format!("did you mean {hint}?")), "{s}: {err}");
        // The position is serde_json's, once.
        assert_eq!(err.matches(" at line ").count(), 1, "{s}: {err}");
    }
    for s in [
        r#"{"divergence": "entropy"}"#,
        r#"{"rule": {"kind": "gspo"}}"#,
    ] {
        let err = parse(s).expect_err(s).to_string();
        assert!(
            err.contains("unknown") && !err.contains("did you mean"),
            "{s}: {err}"
        );
    }
}

/// A rule or an objective given by its kind alone takes that kind's defaults.
#[test]
fn kinds_alone_stand_for_their_defaults() {
    assert_eq!(parse(r#"{"rule": "dppo"}"#).unwrap(), Config::dppo());
    assert_eq!(parse(r#"{"rule": "ratio"}"#).unwrap(), Config::grpo());
    let o = |s: &str| {
        parse(&format!(r#"{{"objective": {s}}}"#))
            .unwrap()
            .objective
    };
    assert_eq!(o(r#""surrogate""#), Objective::Surrogate);
    assert_eq!(o(r#""detached_is""#), o(r#"{"kind": "detached_is"}"#));
    assert_eq!(o(r#""ppo_clip""#), o(r#"{"kind": "ppo_clip"}"#));
    assert_eq!(o(r#""minpro""#), o(r#"{"kind": "minpro"}"#));
    let err = parse(r#"{"objective": 3}"#).unwrap_err().to_string();
    assert!(err.contains("an objective kind"), "{err}");
}

#[cfg(feature = "json")]
mod from_json {
    use cppo::{Config, Error};

    #[test]
    fn text_and_files_read_as_serde_does() {
        let s = r#"{"preset": "paper_kl", "aggregation": "seq-mean-token-mean"}"#;
        let want: Config = serde_json::from_str(s).unwrap();
        assert_eq!(Config::from_json(s).unwrap(), want);
        assert_eq!(s.parse::<Config>().unwrap(), want);
        let dir = tempfile_dir();
        let path = dir.join("cfg.json");
        std::fs::write(&path, s).unwrap();
        assert_eq!(Config::from_json_file(&path).unwrap(), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_carry_the_position_and_the_file() {
        let text = "{\n  \"rule\": {\"kind\": \"dppo\", \"delta\": -1}\n}";
        match Config::from_json(text).unwrap_err() {
            Error::ConfigParse {
                path: None,
                message,
                line,
                column,
            } => {
                assert!(message.contains("rule.delta"), "{message}");
                assert!(!message.contains(" at line "), "{message}");
                // Values are checked when the config object is complete: at its end.
                assert_eq!((line, column), (3, 1));
            }
            e => panic!("{e:?}"),
        }
        let dir = tempfile_dir();
        let path = dir.join("bad.json");
        std::fs::write(&path, "{\"aggregation\": \"token_mean\"}").unwrap();
        let err = Config::from_json_file(&path).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("config {}: ", path.display())),
            "{shown}"
        );
        assert!(
            shown.contains("did you mean `token-mean`?") && shown.ends_with("(line 1, column 29)"), /* the closing brace */
            "{shown}"
        );
        let missing = dir.join("absent.json");
        assert!(
            matches!(Config::from_json_file(&missing), Err(Error::Io { path, .. }) if path.ends_with("absent.json"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Config::from_json("{"),
            Err(Error::ConfigParse { .. })
        ));
    }

    fn tempfile_dir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "cppo-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

#[test]
fn numerics_parses_defaults_and_round_trips() {
    use cppo::Numerics;
    assert_eq!(parse("{}").unwrap().numerics, Numerics::Exact);
    let fast = parse(r#"{"numerics": "f32_exp"}"#).unwrap();
    assert_eq!(fast.numerics, Numerics::F32Exp);
    // Everything else stays the default.
    assert_eq!(
        Config {
            numerics: Numerics::Exact,
            ..fast
        },
        Config::cppo()
    );
    // A preset keeps the numerics given beside it, and the preset's own are exact.
    let p = parse(r#"{"preset": "verl_pr6731", "numerics": "f32_exp"}"#).unwrap();
    assert_eq!(p.numerics, Numerics::F32Exp);
    assert!(
        Preset::ALL
            .iter()
            .all(|&p| Config::preset(p).numerics.is_exact())
    );
    // The written form names the numerics; it reads back the same.
    let exact = serde_json::to_value(Config::cppo()).unwrap();
    assert_eq!(exact["numerics"], "exact");
    let written = serde_json::to_value(fast).unwrap();
    assert_eq!(written["numerics"], "f32_exp");
    assert_eq!(serde_json::from_value::<Config>(written).unwrap(), fast);
    // A name that is not one is refused, with the closest.
    let err = parse(r#"{"numerics": "f32-exp"}"#).unwrap_err().to_string();
    assert!(err.contains("did you mean `f32_exp`?"), "{err}");
    assert!(parse(r#"{"numerics": "fast"}"#).is_err());
}
