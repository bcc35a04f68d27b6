//! Batches for the warnings and HTML tests: npz files written here with ndarray-npy,
//! from cppo::synth or by hand.

#![allow(dead_code)] // each test file uses its own part

use std::fs::{self, File};
use std::path::Path;

use cppo::ndarray::{Array1, Array2};
use cppo::synth::{SynthSpec, SyntheticBatch};
use ndarray_npy::NpzWriter;

/// A batch as the npz file holds it (float64, one advantage per row).
#[derive(Clone)]
pub struct Arrays {
    pub logp: Array2<f64>,
    pub logp_old: Array2<f64>,
    pub advantages: Array1<f64>,
    pub mask: Array2<bool>,
}

impl Arrays {
    /// A realistic batch (ragged rows, holes, hostile padding).
    pub fn synth(seed: u64, rows: usize, len: usize, drift: f64) -> Self {
        let b = SyntheticBatch::<f64>::generate(&SynthSpec {
            rows,
            len,
            seed,
            drift,
            ..SynthSpec::default()
        });
        Self {
            logp: b.logp,
            logp_old: b.logp_old,
            advantages: b.advantages,
            mask: b.mask,
        }
    }

    /// Every row of `len` response tokens with p = 0.5 now and q = `q` at the rollout,
    /// A = 1: with q < 0.5 every token moves away from μ, and its binary-TV divergence is
    /// 0.5 − q.
    pub fn uniform(rows: usize, len: usize, q: f64) -> Self {
        Self {
            logp: Array2::from_elem((rows, len), 0.5f64.ln()),
            logp_old: Array2::from_elem((rows, len), q.ln()),
            advantages: Array1::ones(rows),
            mask: Array2::from_elem((rows, len), true),
        }
    }

    pub fn write(&self, path: &Path) {
        let mut npz = NpzWriter::new(File::create(path).unwrap());
        npz.add_array("logp", &self.logp).unwrap();
        npz.add_array("logp_old", &self.logp_old).unwrap();
        npz.add_array("advantages", &self.advantages).unwrap();
        npz.add_array("mask", &self.mask).unwrap();
        npz.finish().unwrap();
    }
}

/// A run directory of step files: (step, batch) each.
pub fn write_run(dir: &Path, steps: &[(u64, Arrays)]) {
    fs::create_dir_all(dir).unwrap();
    for (step, b) in steps {
        b.write(&dir.join(format!("step_{step:06}.npz")));
    }
}

/// A small run of four steps: drift rising, then a step dumped on-policy (logp ==
/// logp_old), whose warnings are known.
pub fn small_run(dir: &Path) {
    let mut on_policy = Arrays::synth(3, 8, 64, 0.5);
    on_policy.logp_old = on_policy.logp.clone();
    write_run(
        dir,
        &[
            (10, Arrays::synth(0, 8, 64, 0.3)),
            (20, Arrays::synth(1, 8, 64, 0.8)),
            (30, Arrays::synth(2, 8, 64, 1.6)),
            (40, on_policy),
        ],
    );
}
