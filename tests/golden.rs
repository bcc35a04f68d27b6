//! The fixtures in `tests/data/`, copied from `../shared/golden/` (see
//! `tests/data/README.md`): inputs, configs, and outputs computed by an independent
//! float64 reference written from SPEC.md with plain loops.
//!
//! Masks and reason codes must match exactly; floats to 1e-9 relative.

use std::fs::File;
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array0, Array2, Array3, ArrayD, Ix1, Ix2};
use cppo::{Batch, Config, Par, evaluate};
use ndarray_npy::NpzReader;

const CASES: [&str; 8] = [
    "cppo_binary_kl_detached",
    "cppo_binary_tv_surrogate",
    "cppo_no_budget_kl_k3",
    "cppo_topk_tv_horizon",
    "dppo_topk_kl_ppoclip",
    "ratio_grpo_cispo",
    "trm_avg_binary_kl",
    "trm_max_binary_tv",
];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

struct Case {
    cfg: Config,
    logp: Array2<f64>,
    logp_old: Array2<f64>,
    adv: ArrayD<f64>,
    mask: Array2<bool>,
    topk: Option<(Array3<f64>, Array3<f64>)>,
    logp_ref: Option<Array2<f64>>,
    expected: NpzReader<File>,
}

fn load(name: &str) -> Case {
    let cfg: Config =
        serde_json::from_reader(File::open(data(&format!("{name}.config.json"))).unwrap()).unwrap();
    let mut inp = NpzReader::new(File::open(data(&format!("{name}.input.npz"))).unwrap()).unwrap();
    let names = inp.names().unwrap();
    let has = |n: &str| names.iter().any(|x| x == n || x == &format!("{n}.npy"));
    let topk = has("topk_logp_old").then(|| {
        (
            inp.by_name("topk_logp_old").unwrap(),
            inp.by_name("topk_logp").unwrap(),
        )
    });
    let logp_ref = has("logp_ref").then(|| inp.by_name("logp_ref").unwrap());
    Case {
        cfg,
        logp: inp.by_name("logp").unwrap(),
        logp_old: inp.by_name("logp_old").unwrap(),
        adv: inp.by_name("advantages").unwrap(),
        mask: inp.by_name("mask").unwrap(),
        topk,
        logp_ref,
        expected: NpzReader::new(File::open(data(&format!("{name}.expected.npz"))).unwrap())
            .unwrap(),
    }
}

fn assert_close(name: &str, what: &str, got: &Array2<f64>, want: &Array2<f64>, rel: f64) {
    assert_eq!(got.dim(), want.dim(), "{name}: {what} shape");
    for ((ij, &g), &w) in got.indexed_iter().zip(want.iter()) {
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= rel * w.abs().max(1e-300) || (g - w).abs() <= 1e-15
        };
        assert!(ok, "{name}: {what}{ij:?} = {g:e}, reference {w:e}");
    }
}

fn run(name: &str, f: impl FnOnce(&str, &cppo::Evaluation<f64>, &mut NpzReader<File>)) {
    let mut c = load(name);
    let adv1;
    let adv2;
    let mut batch = if c.adv.ndim() == 1 {
        adv1 = c.adv.clone().into_dimensionality::<Ix1>().unwrap();
        Batch::new(&c.logp, &c.logp_old, &adv1, &c.mask)
    } else {
        adv2 = c.adv.clone().into_dimensionality::<Ix2>().unwrap();
        Batch::new(&c.logp, &c.logp_old, &adv2, &c.mask)
    }
    .unwrap();
    if let Some((old, new)) = &c.topk {
        batch = batch.with_topk(old, new).unwrap();
    }
    if let Some(r) = &c.logp_ref {
        batch = batch.with_logp_ref(r).unwrap();
    }
    let eval = evaluate(&c.cfg, &batch, Par::Rayon).unwrap();
    f(name, &eval, &mut c.expected);
}

#[test]
fn golden_mask_outputs() {
    for name in CASES {
        run(name, |name, eval, exp| {
            let o = &eval.outputs;
            let reason: Array2<u8> = exp.by_name("reason").unwrap();
            assert_eq!(o.reason, reason, "{name}: reason");
            let keep: Array2<f64> = exp.by_name("keep").unwrap();
            assert_eq!(
                o.keep.mapv(|k| f64::from(u8::from(k))),
                keep,
                "{name}: keep"
            );
            for what in ["divergence", "weight", "threshold"] {
                let want: Array2<f64> = exp.by_name(what).unwrap();
                let got = match what {
                    "divergence" => &o.divergence,
                    "weight" => &o.weight,
                    _ => &o.threshold,
                };
                // Non-response positions: the reference writes 0 everywhere, threshold included.
                let got = got.clone();
                assert_close(name, what, &got, &want, 1e-9);
            }
        });
    }
}

#[test]
fn golden_loss_token_loss_grad() {
    for name in CASES {
        run(name, |name, eval, exp| {
            let loss: Array0<f64> = exp.by_name("loss").unwrap();
            let want = loss.into_scalar();
            assert!(
                (eval.loss - want).abs() <= 1e-9 * want.abs().max(1e-12),
                "{name}: loss {} vs reference {want}",
                eval.loss
            );
            let tl: Array2<f64> = exp.by_name("token_loss").unwrap();
            assert_close(name, "token_loss", &eval.outputs.token_loss, &tl, 1e-9);
            let g: Array2<f64> = exp.by_name("grad").unwrap();
            assert_close(name, "grad", &eval.outputs.grad, &g, 1e-9);
        });
    }
}
