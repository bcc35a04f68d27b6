//! Generating a case: its seed, its config, which arrays each command reads (`Reads`),
//! and its file (a batch, encoded and mutated) with the outcome the docs promise.

use cppo::{Config, Preset};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::batch::Batch;
use super::npz::npz_file;
use super::runner::{Case, Want};
use super::safetensors::st_file;

/// The seed of case `index` of a run seeded with `seed` (splitmix64, twice).
fn case_seed(seed: u64, index: u64) -> u64 {
    fn mix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(seed) ^ index)
}

/// A random element of `items` (which must not be empty).
pub(super) fn pick<T: Copy>(r: &mut StdRng, items: &[T]) -> T {
    items[r.random_range(0..items.len())]
}

/// Case `index` of the run seeded with `seed`.
pub(super) fn generate(seed: u64, index: u64) -> Result<Case, String> {
    let mut r = StdRng::seed_from_u64(case_seed(seed, index));
    let config = random_config(&mut r);
    let cfg: Config = serde_json::from_str(&config)
        .map_err(|e| format!("the generated config {config} is not valid: {e}"))?;
    // What eval and inspect (the built-in set: binary TV, no KL penalty) read.
    let reads = [Reads::of(&cfg), Reads::default()];
    let batch = Batch::random(&mut r, reads[0]);
    let count = pick(&mut r, &[0, 0, 0, 1, 1, 1, 1, 2, 3]);
    // One of them, sometimes, a mutation of the bytes whatever the format.
    let generic = count > 0 && r.random_bool(0.3);
    let own = count - usize::from(generic);
    let (mut file, mut applied) = if r.random_bool(0.5) {
        npz_file(&mut r, &batch, reads, own)?
    } else {
        st_file(&mut r, &batch, reads, own)?
    };
    if generic {
        applied.push(file.mutate(&mut r));
    }
    let want = match applied.as_slice() {
        [] if !batch.documented => [Want::Either; 2],
        [] => reads.map(|reads| {
            if batch.refusal(reads).is_some() {
                Want::Refused
            } else {
                Want::Ok
            }
        }),
        [one] => one
            .refuse
            .map(|refuse| if refuse { Want::Refused } else { Want::Either }),
        _ => [Want::Either; 2],
    };
    let mutations = if applied.is_empty() {
        "no mutation".to_string()
    } else {
        applied
            .iter()
            .map(|a| a.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let values = match batch.refusal(reads[0]) {
        Some(why) => format!("hostile: {why}"),
        None => "values valid".into(),
    };
    Ok(Case {
        label: format!("{}; {values}; {}: {mutations}", batch.label, file.label),
        ext: file.ext,
        bytes: file.bytes,
        config,
        want,
    })
}

/// `{}` or a preset, sometimes with another divergence or a KL penalty.
fn random_config(r: &mut StdRng) -> String {
    let mut obj = serde_json::Map::new();
    if r.random_bool(0.6) {
        let preset = Preset::ALL[r.random_range(0..Preset::ALL.len())];
        obj.insert("preset".into(), preset.name().into());
    }
    if r.random_bool(0.15) {
        let d = pick(
            r,
            &["binary_tv", "binary_kl", "topk_tv", "topk_kl", "k2", "k3"],
        );
        obj.insert("divergence".into(), d.into());
    }
    if r.random_bool(0.15) {
        let estimator = pick(r, &["k1", "k2", "k3"]);
        let coef = pick(r, &[0.0, 0.05, 1.0]);
        obj.insert(
            "kl".into(),
            serde_json::json!({"estimator": estimator, "coef": coef}),
        );
    }
    serde_json::Value::Object(obj).to_string()
}

/// Which optional arrays a command reads. It always reads `logp`, `logp_old`,
/// `advantages` and `mask`, and `is_weights` whenever the file holds it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Reads {
    pub(super) topk: bool,
    pub(super) logp_ref: bool,
}

impl Reads {
    fn of(cfg: &Config) -> Self {
        Self {
            topk: cfg.divergence.needs_topk(),
            logp_ref: cfg.kl.is_some(),
        }
    }

    /// Whether the command reads the array `name` (if the file holds it).
    pub(super) fn reads(self, name: &str) -> bool {
        match name {
            "is_weights" => true,
            _ => self.requires(name),
        }
    }

    /// Whether the command refuses a file without the array `name`.
    pub(super) fn requires(self, name: &str) -> bool {
        match name {
            "logp" | "logp_old" | "advantages" | "mask" => true,
            "topk_logp" | "topk_logp_old" => self.topk,
            "logp_ref" => self.logp_ref,
            _ => false,
        }
    }
}
