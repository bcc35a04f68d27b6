//! The candle glue (feature `candle`): the loss tensor's value is the crate's loss, its
//! backward the crate's gradient bit for bit, and both agree with finite differences of
//! the loss tensor itself; errors name the array.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use cppo::candle::{Inputs, loss};
use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{Batch, Config, KlEstimator, KlPenalty, Objective, Par, Rule, evaluate};
use proptest::prelude::*;

fn tensor2<F: candle_core::WithDType>(a: &Array2<F>) -> Tensor {
    Tensor::from_slice(a.as_slice().unwrap(), a.dim(), &Device::Cpu).unwrap()
}

fn tensor3<F: candle_core::WithDType>(a: &Array3<F>) -> Tensor {
    Tensor::from_slice(a.as_slice().unwrap(), a.dim(), &Device::Cpu).unwrap()
}

/// A small batch: log-probs in [−3, −0.01], a mask with holes and padding (NaN there),
/// advantages of both signs.
fn batch_strategy() -> impl Strategy<Value = (Array2<f64>, Array2<f64>, Array1<f64>, Array2<u8>)> {
    (1usize..4, 1usize..9).prop_flat_map(|(b, l)| {
        (
            proptest::collection::vec(-3.0f64..-0.01, b * l),
            proptest::collection::vec(-3.0f64..-0.01, b * l),
            proptest::collection::vec(-2.0f64..2.0, b),
            proptest::collection::vec(0u8..4, b * l),
        )
            .prop_map(move |(lp, lo, a, m)| {
                let mask =
                    Array2::from_shape_vec((b, l), m.iter().map(|&x| u8::from(x > 0)).collect())
                        .unwrap();
                let mut logp = Array2::from_shape_vec((b, l), lp).unwrap();
                logp.zip_mut_with(&mask, |v, &on| {
                    if on == 0 {
                        *v = f64::NAN;
                    }
                });
                (
                    logp,
                    Array2::from_shape_vec((b, l), lo).unwrap(),
                    Array1::from(a),
                    mask,
                )
            })
    })
}

fn configs() -> [Config; 4] {
    [
        Config::cppo(),
        Config::dppo(),
        Config::grpo(),
        Config {
            objective: Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.2,
                dual_clip: Some(3.0),
            },
            aggregation: cppo::Aggregation::SeqMeanTokenSum,
            ..Config::cppo()
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// f64 and f32, every config: value = the crate's loss in the float type, backward =
    /// the crate's grad bit for bit, 0 (not NaN) at padding.
    #[test]
    fn value_and_backward_are_the_crates((logp, logp_old, adv, mask) in batch_strategy()) {
        for cfg in configs() {
            let want = evaluate(&cfg, &Batch::new(&logp, &logp_old, &adv, &mask).unwrap(), Par::Seq).unwrap();
            let var = Var::from_tensor(&tensor2(&logp)).unwrap();
            let (lo, a, m) = (tensor2(&logp_old), Tensor::from_slice(adv.as_slice().unwrap(), adv.len(), &Device::Cpu).unwrap(), tensor2(&mask));
            let (l, eval) = loss::<f64>(&cfg, &Inputs::new(&var, &lo, &a, &m), Par::Rayon).unwrap();
            prop_assert_eq!(l.to_scalar::<f64>().unwrap().to_bits(), want.loss.to_bits());
            prop_assert_eq!(eval.loss.to_bits(), want.loss.to_bits());
            let g = l.backward().unwrap().get(&var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&g), bits(want.outputs.grad.as_slice().unwrap()));

            // f32, with an i64 mask and per-token advantages.
            let (lp32, lo32) = (logp.mapv(|x| x as f32), logp_old.mapv(|x| x as f32));
            let adv_tok = Array2::from_shape_fn(mask.dim(), |(i, _)| adv[i] as f32);
            let mask64 = mask.mapv(i64::from);
            let want32 = evaluate(&cfg, &Batch::new(&lp32, &lo32, &adv_tok, &mask64).unwrap(), Par::Seq).unwrap();
            let var32 = Var::from_tensor(&tensor2(&lp32)).unwrap();
            let (lo_t, a_t, m_t) = (tensor2(&lo32), tensor2(&adv_tok), tensor2(&mask64));
            let (l32, _) = loss::<f32>(&cfg, &Inputs::new(&var32, &lo_t, &a_t, &m_t), Par::Seq).unwrap();
            prop_assert_eq!(l32.to_scalar::<f32>().unwrap().to_bits(), (want32.loss as f32).to_bits());
            let g32 = l32.backward().unwrap().get(&var32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits32(&g32), bits32(want32.outputs.grad.as_slice().unwrap()));
        }
    }
}

/// Central differences of the loss tensor's value match its backward, at every token
/// whose keep decision does not change within the step (the loss is piecewise smooth).
#[test]
fn backward_matches_finite_differences_of_the_tensor() {
    let logp = Array2::from_shape_vec(
        (2, 5),
        vec![-0.2, -1.0, -0.1, -2.5, -0.7, -0.3, -0.05, -0.9, -1.7, -0.4],
    )
    .unwrap();
    let logp_old = Array2::from_shape_vec(
        (2, 5),
        vec![-0.3, -1.6, -0.1, -1.2, -0.8, -0.2, -0.4, -1.4, -1.5, -0.35],
    )
    .unwrap();
    let adv = Tensor::new(&[1.0f64, -0.5], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 0], [1, 1, 0, 1, 1]], &Device::Cpu).unwrap();
    let lo = tensor2(&logp_old);
    let lr = tensor2(&logp_old.mapv(|x| x - 0.1));
    let cfgs = [
        Config::cppo(),
        Config {
            objective: Objective::Sapo {
                tau_pos: 1.0,
                tau_neg: 1.05,
            },
            kl: None,
            ..Config::dppo()
        },
        // Not the detached objectives (CISPO, detached IS): their loss's value moves with the
        // detached weight, which their gradient holds fixed by design.
        Config {
            rule: Rule::None,
            kl: Some(KlPenalty {
                estimator: KlEstimator::K2,
                coef: 0.3,
            }),
            ..Config::cppo()
        },
    ];
    let h = 1e-6;
    let mut checked = 0;
    for cfg in cfgs {
        let at = |x: &Array2<f64>| {
            let t = tensor2(x);
            let (l, eval) = loss::<f64>(
                &cfg,
                &Inputs::new(&t, &lo, &adv, &mask).with_logp_ref(&lr),
                Par::Seq,
            )
            .unwrap();
            (l.to_scalar::<f64>().unwrap(), eval.outputs.reason)
        };
        let var = Var::from_tensor(&tensor2(&logp)).unwrap();
        let (l, _) = loss::<f64>(
            &cfg,
            &Inputs::new(&var, &lo, &adv, &mask).with_logp_ref(&lr),
            Par::Seq,
        )
        .unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(&var)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for ((i, j), _) in logp.indexed_iter() {
            let (mut up, mut down) = (logp.clone(), logp.clone());
            up[[i, j]] += h;
            down[[i, j]] -= h;
            let ((lu, ru), (ld, rd)) = (at(&up), at(&down));
            if ru != rd {
                continue; // a decision flips inside the step
            }
            let fd = (lu - ld) / (2.0 * h);
            assert!(
                (fd - g[i][j]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{cfg:?} ({i}, {j}): fd {fd}, backward {}",
                g[i][j]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} tokens checked");
}

/// The optional tensors reach the engine: top-K divergence, a KL penalty, IS weights.
#[test]
fn optional_tensors_are_used() {
    let (b, l, k) = (2, 3, 2);
    let logp = Array2::from_shape_fn((b, l), |(i, j)| -0.3 - 0.2 * (i + j) as f32);
    let logp_old = Array2::from_shape_fn((b, l), |(i, j)| -0.4 - 0.1 * (i * j) as f32);
    let logp_ref = logp_old.mapv(|x| x - 0.05);
    let w = Array2::from_shape_fn((b, l), |(i, j)| 0.5 + 0.25 * (i + j) as f32);
    let topk_old = Array3::from_shape_fn((b, l, k), |(i, j, t)| -1.0 - (i + j + t) as f32 * 0.3);
    let topk = topk_old.mapv(|x| x - 0.1);
    let adv = Array1::from(vec![1.0f32, -1.0]);
    let mask = Array2::from_elem((b, l), 1.0f32);
    let cfg = Config {
        divergence: cppo::Divergence::TopkTv,
        kl: Some(KlPenalty {
            estimator: KlEstimator::K3,
            coef: 0.1,
        }),
        ..Config::cppo()
    };
    let want = evaluate(
        &cfg,
        &Batch::new(&logp, &logp_old, &adv, &mask)
            .unwrap()
            .with_topk(&topk_old, &topk)
            .unwrap()
            .with_logp_ref(&logp_ref)
            .unwrap()
            .with_is_weights(&w)
            .unwrap(),
        Par::Seq,
    )
    .unwrap();
    let var = Var::from_tensor(&tensor2(&logp)).unwrap();
    let (lo, lr, wt, m) = (
        tensor2(&logp_old),
        tensor2(&logp_ref),
        tensor2(&w),
        tensor2(&mask),
    );
    let a = Tensor::from_slice(adv.as_slice().unwrap(), b, &Device::Cpu).unwrap();
    let (tko, tk) = (tensor3(&topk_old), tensor3(&topk));
    let inputs = Inputs::new(&var, &lo, &a, &m)
        .with_topk(&tko, &tk)
        .with_logp_ref(&lr)
        .with_is_weights(&wt);
    let (t, eval) = loss::<f32>(&cfg, &inputs, Par::Seq).unwrap();
    assert_eq!(t.to_scalar::<f32>().unwrap(), want.loss as f32);
    assert_eq!(eval.outputs.divergence, want.outputs.divergence);
    // Without them, the config is refused, naming what is missing.
    let err = loss::<f32>(&cfg, &Inputs::new(&var, &lo, &a, &m), Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("topk_logp_old is missing"),
        "{err}"
    );
}

/// Errors name the array; `?` converts the crate's errors inside a candle function.
#[test]
fn errors_name_the_array() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let lp = Tensor::new(&[[-0.5f32, -0.7]], &dev)?;
    let adv = Tensor::new(&[1.0f32], &dev)?;
    let mask = Tensor::new(&[[1u8, 1]], &dev)?;
    let cfg = Config::cppo();
    let msg = |r: candle_core::Result<(Tensor, cppo::Evaluation<f32>)>| r.unwrap_err().to_string();

    let e = msg(loss::<f32>(
        &cfg,
        &Inputs::new(&lp.to_dtype(DType::F64)?, &lp, &adv, &mask),
        Par::Seq,
    ));
    assert!(e.contains("logp is F64") && e.contains("to_dtype"), "{e}");
    let e = msg(loss::<f32>(
        &cfg,
        &Inputs::new(&lp, &lp.flatten_all()?, &adv, &mask),
        Par::Seq,
    ));
    assert!(e.contains("logp_old has shape [2], expected (B, L)"), "{e}");
    let e = msg(loss::<f32>(
        &cfg,
        &Inputs::new(&lp, &lp, &Tensor::new(&[1.0f32, 2.0], &dev)?, &mask),
        Par::Seq,
    ));
    assert!(e.contains("advantages has shape [2]"), "{e}");
    let bad = Tensor::new(&[[-0.5f32, 0.5]], &dev)?;
    let e = msg(loss::<f32>(
        &cfg,
        &Inputs::new(&lp, &bad, &adv, &mask),
        Par::Seq,
    ));
    assert!(e.contains("logp_old at row 0, column 1"), "{e}");
    let cube = Tensor::zeros((1, 2, 1), DType::U8, &dev)?;
    let e = msg(loss::<f32>(
        &cfg,
        &Inputs::new(&lp, &lp, &adv, &cube),
        Par::Seq,
    ));
    assert!(e.contains("mask has shape [1, 2, 1]"), "{e}");

    // The crate's own calls inside a candle function: `?` converts cppo::Error.
    let host = Array2::from_shape_vec((1, 2), lp.flatten_all()?.to_vec1::<f32>()?).unwrap();
    let (a, m) = (Array1::from(vec![1.0f32]), Array2::from_elem((1, 3), true));
    let err = (|| -> candle_core::Result<()> {
        Batch::new(&host, &host, &a, &m)?;
        Ok(())
    })()
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("mask has shape [1, 3], expected (1, 2)"),
        "{err}"
    );
    Ok(())
}
