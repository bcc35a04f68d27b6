//! Gradient checks: `outputs.grad` (dL/dlogp) against central finite differences of the
//! loss, in f64, under proptest, for every objective × aggregation × KL estimator
//! (none, k1, k2, k3) on each random batch (random divergence, rule and parameters).
//!
//! The keep mask M and the `ppo_clip` branch are constants of the gradient (see
//! the objective module), so a check counts only where perturbing by ±h changed no token's reason
//! and no `ppo_clip` branch; otherwise that check is skipped. Inputs stay away from the
//! two non-smooth spots of the inputs themselves: the log-ratio clamp at ±20 and the
//! (0, 1e-4] → 0 fold of log-probs (`Shape::smooth`). `most_checks_are_not_skipped`
//! makes sure the skips are rare.
//!
//! - `surrogate` and `ppo_clip` depend on logp through ρ: perturb logp alone.
//! - `detached_is` and `cispo` have a detached weight min(ρ, ·): their gradient
//!   −M min(ρ, ·) A is the derivative with ρ held fixed, so logp and logp_old move
//!   together (ρ constant) and only the explicit logp factor and the KL term move.
//!
//! Per token: dL/dlogp_t against (L(x + h e_t) − L(x − h e_t)) / 2h. Along a random
//! direction v over all response tokens: Σ_t grad_t v_t against the directional
//! difference (the sum trick a trainer relies on: L's gradient is `grad`). And a batch
//! without response tokens gives loss 0, gradient 0, and no NaN.

mod common;

use approx::relative_eq;
use common::*;
use cppo::ndarray::{Array2, Array3};
use cppo::{
    Aggregation, Config, CppoParams, Evaluation, KlEstimator, KlPenalty, Objective, Par, Rule,
    evaluate,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestCaseResult, TestRng, TestRunner};

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/gradients.txt"
);

const H: f64 = 1e-5;
const MAX_RELATIVE: f64 = 1e-6;

const AGGREGATIONS: [Aggregation; 4] = [
    Aggregation::TokenMean,
    Aggregation::SeqMeanTokenMean,
    Aggregation::SeqMeanTokenSum,
    Aggregation::SeqMeanTokenSumNorm,
];

/// Parameters of the four objectives and of the KL penalty, drawn per case.
#[derive(Clone, Copy, Debug)]
struct Params {
    ratio_cap: f64,
    eps_low: f64,
    eps_high: f64,
    dual_clip: Option<f64>,
    cispo_eps_high: f64,
    kl_coef: f64,
}

fn params() -> impl Strategy<Value = Params> {
    (
        0.1f64..12.0,
        0.0f64..0.5,
        0.0f64..0.5,
        prop_oneof![Just(None), (1.01f64..5.0).prop_map(Some)],
        0.0f64..0.5,
        0.01f64..1.0,
    )
        .prop_map(
            |(ratio_cap, eps_low, eps_high, dual_clip, cispo_eps_high, kl_coef)| Params {
                ratio_cap,
                eps_low,
                eps_high,
                dual_clip,
                cispo_eps_high,
                kl_coef,
            },
        )
}

fn objectives(p: &Params) -> [Objective; 6] {
    [
        Objective::Surrogate,
        Objective::DetachedIs {
            ratio_cap: p.ratio_cap,
        },
        Objective::PpoClip {
            eps_low: p.eps_low,
            eps_high: p.eps_high,
            dual_clip: p.dual_clip,
        },
        Objective::Cispo {
            eps_high: p.cispo_eps_high,
        },
        Objective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        Objective::Minpro {
            include_current: true,
            clip: Some(p.cispo_eps_high),
            stop_gradient: true,
        },
    ]
}

fn kls(p: &Params) -> [Option<KlPenalty>; 4] {
    let k = |estimator| {
        Some(KlPenalty {
            estimator,
            coef: p.kl_coef,
        })
    };
    [
        None,
        k(KlEstimator::K1),
        k(KlEstimator::K2),
        k(KlEstimator::K3),
    ]
}

/// Every (objective, aggregation, KL) config over the case's own divergence, rule and
/// count overrides.
fn configs(base: &Config, p: &Params) -> Vec<Config> {
    let mut v = Vec::with_capacity(96);
    for objective in objectives(p) {
        for aggregation in AGGREGATIONS {
            for kl in kls(p) {
                v.push(Config {
                    objective,
                    aggregation,
                    kl,
                    ..*base
                });
            }
        }
    }
    v
}

/// The detached objectives: their gradient holds ρ fixed.
fn detached(o: &Objective) -> bool {
    matches!(
        o,
        Objective::DetachedIs { .. } | Objective::Cispo { .. } | Objective::Minpro { .. }
    )
}

fn grad_case() -> impl Strategy<Value = Case<f64>> {
    let small = Shape {
        rows: 1..=4,
        cols: 1..=7,
        smooth: true,
    };
    // Rows across the engine's column blocks.
    let wide = Shape {
        rows: 1..=2,
        cols: 56..=140,
        smooth: true,
    };
    prop_oneof![
        4 => case_with(config_strategy(), small),
        1 => case_with(config_strategy(), wide),
    ]
    .prop_map(|mut c| {
        // Every config below may carry a KL penalty.
        if c.logp_ref.is_none() {
            let lr = c.logp.mapv(|x| if x.is_finite() { x - 0.4 } else { x });
            c.logp_ref = Some(lr);
        }
        c
    })
}

/// The case moved by h·v: logp, and logp_old too for the detached objectives.
fn moved(case: &Case<f64>, v: &Array2<f64>, h: f64, with_old: bool) -> Case<f64> {
    let mut c = case.clone();
    c.logp = &c.logp + &(v * h);
    if with_old {
        c.logp_old = &c.logp_old + &(v * h);
    }
    c
}

fn eval(case: &Case<f64>) -> Evaluation<f64> {
    evaluate(&case.cfg, &case.batch(), Par::Seq).expect("valid case")
}

/// What a batch of checks did.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    checked: usize,
    skipped: usize,
}

/// One finite-difference check along `v`: Σ grad·v against the central difference.
/// Skipped (Ok(false)) when ±h·v changed a reason or a `ppo_clip` branch.
fn check_direction(case: &Case<f64>, v: &Array2<f64>, what: &str) -> Result<bool, TestCaseError> {
    let joint = detached(&case.cfg.objective);
    let base = eval(case);
    let plus = moved(case, v, H, joint);
    let minus = moved(case, v, -H, joint);
    let (ep, em) = (eval(&plus), eval(&minus));
    if ep.outputs.reason != base.outputs.reason || em.outputs.reason != base.outputs.reason {
        return Ok(false);
    }
    if matches!(case.cfg.objective, Objective::PpoClip { .. }) {
        let b0 = reference(case).branch;
        if reference(&plus).branch != b0 || reference(&minus).branch != b0 {
            return Ok(false);
        }
    }
    let fd = (ep.loss - em.loss) / (2.0 * H);
    let analytic: f64 = base
        .outputs
        .grad
        .iter()
        .zip(v.iter())
        .map(|(g, v)| g * v)
        .sum();
    // Rounding of the two losses, divided by 2h: a few ulps of Σ|a_t l_t| each.
    let scale = reference(case).loss_scale.max(reference(&plus).loss_scale);
    let epsilon = 1e-15 + 1e-9 * scale;
    prop_assert!(
        relative_eq!(analytic, fd, epsilon = epsilon, max_relative = MAX_RELATIVE),
        "{what}: grad·v = {analytic:e}, central difference {fd:e} \
         (L+ {:e}, L- {:e}, scale {scale:e}), config {:?}",
        ep.loss,
        em.loss,
        case.cfg
    );
    Ok(true)
}

/// Every combination on one case: the tokens `picks` one at a time, and one random
/// direction over all response tokens.
fn check_case(
    case: &Case<f64>,
    p: &Params,
    picks: &[usize],
    seed: u64,
) -> Result<Tally, TestCaseError> {
    let cols: Vec<(usize, usize)> = case
        .mask
        .indexed_iter()
        .filter(|(_, m)| **m)
        .map(|(ij, _)| ij)
        .collect();
    let mut t = Tally::default();
    if cols.is_empty() {
        return Ok(t);
    }
    let dir = Array2::from_shape_fn(case.shape(), |(i, j)| {
        if case.mask[[i, j]] {
            2.0 * unit(mix(seed ^ mix((i * 4096 + j) as u64))) - 1.0
        } else {
            0.0
        }
    });
    for cfg in configs(&case.cfg, p) {
        let mut c = case.clone();
        c.cfg = cfg;
        // GSPO and GMPO take verl's token-level form, whose per-token gradient is the
        // derivative of the sequence objective only with every token kept (checked in
        // tests/family.rs); here, check the surrogate in their place.
        if c.cfg.objective.is_sequence_level() {
            c.cfg.objective = Objective::Surrogate;
        }
        // cppo_soft's gate, like every mask, is a constant of the gradient, but it moves
        // with logp, so finite differences cannot hold it still: check the hard rule
        // here, and the gate in tests/family.rs.
        if let Some(p) = c.cfg.rule.cppo_params().filter(|p| p.gate.is_some()) {
            c.cfg.rule = Rule::Cppo(CppoParams { gate: None, ..*p });
        }
        for &pick in picks {
            let (i, j) = cols[pick % cols.len()];
            let mut e = Array2::zeros(case.shape());
            e[[i, j]] = 1.0;
            let ok = check_direction(&c, &e, &format!("token ({i}, {j})"))?;
            t.checked += usize::from(ok);
            t.skipped += usize::from(!ok);
        }
        let ok = check_direction(&c, &dir, "direction")?;
        t.checked += usize::from(ok);
        t.skipped += usize::from(!ok);
    }
    Ok(t)
}

proptest! {
    #![proptest_config(proptest_config(192, REGRESSIONS))]

    /// grad = dL/dlogp, token by token and along a random direction, for every objective,
    /// aggregation and KL estimator.
    #[test]
    fn gradient_matches_central_differences(
        case in grad_case(),
        p in params(),
        picks in proptest::collection::vec(any::<usize>(), 2),
        seed in any::<u64>(),
    ) {
        prop_assume!(case.mask.iter().any(|&m| m));
        let t = check_case(&case, &p, &picks, seed)?;
        prop_assume!(t.checked > 0);
    }

    /// No response tokens: loss 0, every output 0, no NaN.
    #[test]
    fn zero_tokens_give_zero_loss_and_gradient(
        case in grad_case(),
        p in params(),
        num_tokens in prop_oneof![Just(None), (0u64..10).prop_map(Some)],
        num_seqs in prop_oneof![Just(None), (0u64..3).prop_map(Some)],
    ) {
        check_zero_tokens(&case, &p, num_tokens, num_seqs)?;
    }
}

/// The case with an all-zero mask (garbage everywhere), and empty shapes (0, 3), (2, 0),
/// (0, 0): under every combination, with the given count overrides, the loss is 0 and
/// every output 0 (no NaN), nothing kept, every reason 0.
fn check_zero_tokens(
    case: &Case<f64>,
    p: &Params,
    num_tokens: Option<u64>,
    num_seqs: Option<u64>,
) -> TestCaseResult {
    let mut c = case.clone();
    c.mask.fill(false);
    c.fill_padding(|arr, i, j, k| garbage(7, arr, i, j, k));
    let mut cases = vec![c];
    for (b, l) in [(0, 3), (2, 0), (0, 0)] {
        let mut z = case.clone();
        z.logp = Array2::zeros((b, l));
        z.logp_old = Array2::zeros((b, l));
        z.adv = Adv::Token(Array2::zeros((b, l)));
        z.mask = Array2::from_elem((b, l), false);
        z.topk = case
            .k()
            .map(|k| (Array3::zeros((b, l, k)), Array3::zeros((b, l, k))));
        z.logp_ref = Some(Array2::zeros((b, l)));
        z.is_weights = case.is_weights.as_ref().map(|_| Array2::zeros((b, l)));
        cases.push(z);
    }
    for c in &cases {
        for mut cfg in configs(&c.cfg, p) {
            cfg.num_tokens = num_tokens;
            cfg.num_seqs = num_seqs;
            let e = evaluate(&cfg, &c.batch(), Par::Seq).unwrap();
            prop_assert_eq!(e.loss.to_bits(), 0.0f64.to_bits(), "loss {}", e.loss);
            let o = &e.outputs;
            for a in [
                &o.divergence,
                &o.weight,
                &o.threshold,
                &o.token_loss,
                &o.grad,
            ] {
                prop_assert!(a.iter().all(|&x| x == 0.0), "{cfg:?}: {a:?}");
            }
            prop_assert!(o.keep.iter().all(|&k| !k));
            prop_assert!(o.reason.iter().all(|&r| r == 0));
        }
    }
    Ok(())
}

/// The finite-difference checks are rarely skipped: a fixed sample of cases.
#[test]
fn most_checks_are_not_skipped() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[3; 32]),
    );
    let strategy = (grad_case(), params(), any::<u64>());
    let mut total = Tally::default();
    let mut kept_masked = [0usize; 2];
    for _ in 0..24 {
        let (case, p, seed) = strategy.new_tree(&mut runner).unwrap().current();
        let t = check_case(&case, &p, &[seed as usize], seed).unwrap();
        total.checked += t.checked;
        total.skipped += t.skipped;
        let r = reference(&case);
        for (&m, &k) in case.mask.iter().zip(r.keep.iter()) {
            if m {
                kept_masked[usize::from(!k)] += 1;
            }
        }
    }
    eprintln!("{total:?}, response tokens kept/masked {kept_masked:?}");
    assert!(total.checked > 9 * total.skipped, "{total:?}");
    // Both kept and masked tokens are differentiated.
    assert!(kept_masked.iter().all(|&n| n > 10), "{kept_masked:?}");
}
