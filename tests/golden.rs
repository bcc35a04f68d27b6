//! The fixtures in `tests/data/`, copied from the project's shared golden fixtures (see
//! `tests/data/README.md`): inputs, configs, and outputs computed by independent float64
//! references, one written from the crate's specification with plain loops, one of the
//! official CPPO code (UniRL, verl PR #6731) for the `official_*` cases.
//!
//! Every array an expected file holds is compared: `reason` and `keep` exactly, the
//! floats (`divergence`, `weight`, `threshold`, `token_loss`, `grad`, `delta_b_row`) and
//! the loss to 1e-9 relative. Each case must hold at least the loss and the gradient.

use std::fs::File;
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array0, Array1, Array2, Array3, ArrayD, Ix1, Ix2};
use cppo::{Batch, Config, Evaluation, Par, evaluate};
use ndarray_npy::NpzReader;

/// Every case of `tests/data/`.
const CASES: [&str; 12] = [
    "cppo_binary_kl_detached",
    "cppo_binary_tv_surrogate",
    "cppo_no_budget_kl_k3",
    "cppo_topk_tv_horizon",
    "dppo_topk_kl_ppoclip",
    "ratio_grpo_cispo",
    "trm_avg_binary_kl",
    "trm_max_binary_tv",
    "official_fixed_budget",
    "official_soft_gate",
    "official_unirl_p90",
    "official_verl_column",
];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The names an npz holds, without the `.npy` suffix.
fn names(npz: &mut NpzReader<File>) -> Vec<String> {
    npz.names()
        .unwrap()
        .into_iter()
        .map(|n| n.trim_end_matches(".npy").to_string())
        .collect()
}

struct Case {
    cfg: Config,
    logp: Array2<f64>,
    logp_old: Array2<f64>,
    adv: ArrayD<f64>,
    mask: Array2<bool>,
    topk: Option<(Array3<f64>, Array3<f64>)>,
    logp_ref: Option<Array2<f64>>,
    is_weights: Option<Array2<f64>>,
}

fn load(name: &str) -> (Case, NpzReader<File>) {
    let cfg: Config =
        serde_json::from_reader(File::open(data(&format!("{name}.config.json"))).unwrap()).unwrap();
    let mut inp = NpzReader::new(File::open(data(&format!("{name}.input.npz"))).unwrap()).unwrap();
    let has = names(&mut inp);
    let has = |n: &str| has.iter().any(|x| x == n);
    let topk = has("topk_logp_old").then(|| {
        (
            inp.by_name("topk_logp_old").unwrap(),
            inp.by_name("topk_logp").unwrap(),
        )
    });
    let logp_ref = has("logp_ref").then(|| inp.by_name("logp_ref").unwrap());
    let is_weights = has("is_weights").then(|| inp.by_name("is_weights").unwrap());
    let case = Case {
        cfg,
        logp: inp.by_name("logp").unwrap(),
        logp_old: inp.by_name("logp_old").unwrap(),
        adv: inp.by_name("advantages").unwrap(),
        mask: inp.by_name("mask").unwrap(),
        topk,
        logp_ref,
        is_weights,
    };
    let expected = NpzReader::new(File::open(data(&format!("{name}.expected.npz"))).unwrap());
    (case, expected.unwrap())
}

fn evaluate_case(c: &Case) -> Evaluation<f64> {
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
    if let Some(w) = &c.is_weights {
        batch = batch.with_is_weights(w).unwrap();
    }
    evaluate(&c.cfg, &batch, Par::Rayon).unwrap()
}

/// |got − want| ≤ rel |want| (or 1e-15 absolute, for zeros); NaN only for NaN.
fn close(got: f64, want: f64, rel: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    (got - want).abs() <= rel * want.abs().max(1e-300) || (got - want).abs() <= 1e-15
}

fn assert_close2(name: &str, what: &str, got: &Array2<f64>, want: &Array2<f64>) {
    assert_eq!(got.dim(), want.dim(), "{name}: {what} shape");
    for ((ij, &g), &w) in got.indexed_iter().zip(want.iter()) {
        assert!(
            close(g, w, 1e-9),
            "{name}: {what}{ij:?} = {g:e}, reference {w:e}"
        );
    }
}

/// Every case: whatever its expected file holds, against the crate.
#[test]
fn golden_cases() {
    for name in CASES {
        let (case, mut exp) = load(name);
        let eval = evaluate_case(&case);
        let o = &eval.outputs;
        let held = names(&mut exp);
        assert!(
            held.iter().any(|n| n == "loss") && held.iter().any(|n| n == "grad"),
            "{name}: a fixture holds the loss and the gradient"
        );
        for what in &held {
            match what.as_str() {
                "loss" => {
                    let want: Array0<f64> = exp.by_name("loss").unwrap();
                    let want = want.into_scalar();
                    assert!(
                        (eval.loss - want).abs() <= 1e-9 * want.abs().max(1e-12),
                        "{name}: loss {} vs reference {want}",
                        eval.loss
                    );
                }
                "reason" => {
                    let want: Array2<u8> = exp.by_name("reason").unwrap();
                    assert_eq!(o.reason, want, "{name}: reason");
                }
                "keep" => {
                    // Stored as 0/1 floats by the older cases, as bools by the newer.
                    let as_f64: Result<Array2<f64>, _> = exp.by_name("keep");
                    let want: Array2<bool> = match as_f64 {
                        Ok(k) => k.mapv(|x| x != 0.0),
                        Err(_) => exp.by_name("keep").unwrap(),
                    };
                    assert_eq!(o.keep, want, "{name}: keep");
                }
                "delta_b_row" => {
                    let want: Array1<f64> = exp.by_name("delta_b_row").unwrap();
                    assert_eq!(o.delta_b_row.len(), want.len(), "{name}: delta_b_row shape");
                    for (i, (&g, &w)) in o.delta_b_row.iter().zip(&want).enumerate() {
                        assert!(
                            close(g, w, 1e-9),
                            "{name}: delta_b_row[{i}] = {g}, reference {w}"
                        );
                    }
                }
                float => {
                    let want: Array2<f64> = exp.by_name(float).unwrap();
                    let got = match float {
                        "divergence" => &o.divergence,
                        "weight" => &o.weight,
                        "threshold" => &o.threshold,
                        "token_loss" => &o.token_loss,
                        "grad" => &o.grad,
                        other => panic!("{name}: unexpected array {other}"),
                    };
                    // Non-response positions: the references write 0 everywhere.
                    assert_close2(name, float, got, &want);
                }
            }
        }
    }
}
