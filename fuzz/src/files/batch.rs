//! A generated batch (`Batch`): its random shape and arrays, the ordinary, hostile and
//! garbage values they hold, the fixed batch of the crafted files, and why the
//! documented value checks refuse it.

use cppo::limits::{LOGP_TOLERANCE, MAX_ABS_ADVANTAGE, MAX_IS_WEIGHT, MIN_LOGPROB};
use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::array::{Arr, Dt};
use super::generate::{Reads, pick};

/// A generated batch.
pub(super) struct Batch {
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// K of the top-K pair (whether or not the batch holds it).
    pub(super) k: usize,
    pub(super) arrays: Vec<Arr>,
    /// The batch in a few words, for messages.
    pub(super) label: String,
    /// Whether the docs say which files of this batch are accepted: not for a batch of
    /// 0 rows, 0 columns or K = 0.
    pub(super) documented: bool,
}

/// Values that break the documented checks at a response position, by array (with
/// the bounds of `cppo::limits`; 1e300 and -1e300 are infinite as float32).
const HOSTILE_LOGPROBS: [f64; 8] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1.0,
    1e-3,
    -2e4,
    -1e300,
    1e300,
];
const HOSTILE_ADVANTAGES: [f64; 7] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1e10,
    -2e9,
    1e300,
    -1e300,
];
const HOSTILE_WEIGHTS: [f64; 6] = [-1.0, f64::NAN, f64::INFINITY, -1e-30, 2e6, 1e300];
const HOSTILE_MASK: [f64; 3] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
/// What padding positions hold: nothing reads them.
const GARBAGE: [f64; 9] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1.0,
    1e30,
    -1e300,
    0.0,
    7.5,
    -0.0,
];

impl Batch {
    /// A random valid batch holding every array `eval` (reading `reads`) needs, and
    /// sometimes hostile values.
    pub(super) fn random(r: &mut StdRng, reads: Reads) -> Self {
        let (mut rows, mut cols, mut k) = (
            r.random_range(1..=8),
            r.random_range(1..=64),
            r.random_range(1..=4),
        );
        let degenerate = r.random_bool(0.04);
        if degenerate {
            match r.random_range(0..3) {
                0 => rows = 0,
                1 => cols = 0,
                _ => k = 0,
            }
        }
        let n = rows * cols;
        let float = if r.random_bool(0.5) { Dt::F32 } else { Dt::F64 };
        let resp = response_positions(r, rows, cols);
        let mask_dt = pick(
            r,
            &[
                Dt::Bool,
                Dt::Bool,
                Dt::U8,
                Dt::U8,
                Dt::I64,
                Dt::F32,
                Dt::I8,
                Dt::I16,
                Dt::U16,
                Dt::I32,
                Dt::U32,
                Dt::U64,
                Dt::F64,
            ],
        );
        let mask: Vec<f64> = resp.iter().map(|&on| mask_value(r, mask_dt, on)).collect();
        let or_garbage = |r: &mut StdRng, on: bool, v: f64| {
            if on || r.random_bool(0.5) {
                v
            } else {
                pick(r, &GARBAGE)
            }
        };
        let values = |r: &mut StdRng, around: Option<&[f64]>, per: usize| -> Vec<f64> {
            (0..n * per)
                .map(|i| {
                    let v = match around {
                        Some(base) if r.random_bool(0.9) => near(r, base[i]),
                        _ => logprob(r),
                    };
                    or_garbage(r, resp[i / per], v)
                })
                .collect()
        };
        let logp = values(r, None, 1);
        let logp_old = values(r, Some(&logp), 1);
        let mut arrays = vec![
            Arr::new("logp", float, &[rows, cols], logp.clone()),
            Arr::new("logp_old", float, &[rows, cols], logp_old),
        ];
        let mut label = format!(
            "{rows}x{cols} {}, mask {}",
            if float == Dt::F32 { "f32" } else { "f64" },
            mask_dt.st()
        );
        if r.random_bool(0.5) {
            let adv = (0..rows).map(|_| advantage(r)).collect();
            arrays.push(Arr::new("advantages", float, &[rows], adv));
            label.push_str(", advantages per row");
        } else {
            let adv = (0..n)
                .map(|i| {
                    let a = advantage(r);
                    or_garbage(r, resp[i], a)
                })
                .collect();
            arrays.push(Arr::new("advantages", float, &[rows, cols], adv));
            label.push_str(", advantages per token");
        }
        arrays.push(Arr::new("mask", mask_dt, &[rows, cols], mask));
        if reads.topk || r.random_bool(0.15) {
            let old = values(r, None, k);
            let new = values(r, Some(&old), k);
            arrays.push(Arr::new("topk_logp_old", float, &[rows, cols, k], old));
            arrays.push(Arr::new("topk_logp", float, &[rows, cols, k], new));
            label.push_str(&format!(", top-{k}"));
        }
        if reads.logp_ref || r.random_bool(0.15) {
            let reference = values(r, Some(&logp), 1);
            arrays.push(Arr::new("logp_ref", float, &[rows, cols], reference));
            label.push_str(", logp_ref");
        }
        if r.random_bool(0.25) {
            let w = (0..n)
                .map(|i| {
                    let w = weight(r);
                    or_garbage(r, resp[i], w)
                })
                .collect();
            arrays.push(Arr::new("is_weights", float, &[rows, cols], w));
            label.push_str(", is_weights");
        }
        if r.random_bool(0.1) {
            let extra = match r.random_range(0..3) {
                0 => Arr::new(
                    "input_ids",
                    Dt::I64,
                    &[rows, cols],
                    (0..n).map(|i| (i * 7919 % 50_000) as f64).collect(),
                ),
                1 => Arr::new("rewards", Dt::F16, &[rows], vec![15360.0; rows]),
                _ => Arr::new("step", Dt::F64, &[], vec![f64::NAN]),
            };
            label.push_str(&format!(", unread {}", extra.name));
            arrays.push(extra);
        }
        if degenerate {
            label.push_str(" (degenerate)");
        }
        let mut batch = Self {
            rows,
            cols,
            k,
            arrays,
            label,
            documented: !degenerate,
        };
        if r.random_bool(0.3) {
            batch.inject(r, &resp);
        }
        batch.arrays.shuffle(r);
        batch
    }

    /// Puts one to three hostile values into the arrays, at response positions or
    /// anywhere.
    fn inject(&mut self, r: &mut StdRng, resp: &[bool]) {
        let on: Vec<usize> = (0..resp.len()).filter(|&i| resp[i]).collect();
        for _ in 0..r.random_range(1..=3) {
            let j = r.random_range(0..self.arrays.len());
            let (cols, k) = (self.cols, self.k);
            let a = &mut self.arrays[j];
            let hostile: &[f64] = match a.name.as_str() {
                "logp" | "logp_old" | "logp_ref" | "topk_logp" | "topk_logp_old" => {
                    &HOSTILE_LOGPROBS
                }
                "advantages" => &HOSTILE_ADVANTAGES,
                "is_weights" => &HOSTILE_WEIGHTS,
                "mask" if a.dt.is_float() => &HOSTILE_MASK,
                _ => continue,
            };
            if a.values.is_empty() {
                continue;
            }
            let at = if !on.is_empty() && r.random_bool(0.6) {
                let p = on[r.random_range(0..on.len())];
                match a.shape.len() {
                    1 => p / cols,
                    3 => p * k + r.random_range(0..k),
                    _ => p,
                }
            } else {
                r.random_range(0..a.values.len())
            };
            a.values[at] = pick(r, hostile);
        }
    }

    /// The 2 × 6 float64 batch of the crafted files: `logp` -1, `logp_old` -1.1,
    /// advantages 0.5 per row, a bool mask of ones.
    pub(super) fn small() -> Self {
        let (rows, cols) = (2, 6);
        let n = rows * cols;
        Self {
            rows,
            cols,
            k: 1,
            arrays: vec![
                Arr::new("logp", Dt::F64, &[rows, cols], vec![-1.0; n]),
                Arr::new("logp_old", Dt::F64, &[rows, cols], vec![-1.1; n]),
                Arr::new("advantages", Dt::F64, &[rows], vec![0.5; rows]),
                Arr::new("mask", Dt::Bool, &[rows, cols], vec![1.0; n]),
            ],
            label: "2x6 f64".into(),
            documented: true,
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&Arr> {
        self.arrays.iter().find(|a| a.name == name)
    }

    /// Why a command reading `reads` must refuse this batch by the documented value
    /// checks (`cppo::limits`), if it must: at a response position, a log-prob outside
    /// [MIN_LOGPROB, LOGP_TOLERANCE], an advantage beyond ±MAX_ABS_ADVANTAGE, an IS
    /// weight outside [0, MAX_IS_WEIGHT] (NaN is in no range); or a non-finite float
    /// mask value anywhere.
    pub(super) fn refusal(&self, reads: Reads) -> Option<String> {
        let mask = self.get("mask")?;
        if mask.dt.is_float()
            && let Some(i) = (0..mask.values.len()).find(|&i| !mask.at(i).is_finite())
        {
            return Some(format!("mask[{i}] is {}", mask.at(i)));
        }
        // NaN is in no range.
        let bad_logprob = |x: f64| !(MIN_LOGPROB..=LOGP_TOLERANCE).contains(&x);
        let bad_advantage = |x: f64| !(-MAX_ABS_ADVANTAGE..=MAX_ABS_ADVANTAGE).contains(&x);
        let bad_weight = |x: f64| !(0.0..=MAX_IS_WEIGHT).contains(&x);
        let mut logprobs = vec!["logp", "logp_old"];
        if reads.logp_ref {
            logprobs.push("logp_ref");
        }
        let mut topk = Vec::new();
        if reads.topk {
            topk.extend(["topk_logp_old", "topk_logp"]);
        }
        for i in 0..self.rows * self.cols {
            if mask.at(i) == 0.0 {
                continue;
            }
            let (row, col) = (i / self.cols, i % self.cols);
            let bad =
                |name: &str, x: f64| Some(format!("{name} at row {row}, column {col} is {x}"));
            for &name in &logprobs {
                if let Some(a) = self.get(name)
                    && bad_logprob(a.at(i))
                {
                    return bad(name, a.at(i));
                }
            }
            if let Some(a) = self.get("advantages") {
                let x = if a.shape.len() == 1 {
                    a.at(row)
                } else {
                    a.at(i)
                };
                if bad_advantage(x) {
                    return bad("advantages", x);
                }
            }
            for &name in &topk {
                if let Some(a) = self.get(name) {
                    for j in 0..self.k {
                        if bad_logprob(a.at(i * self.k + j)) {
                            return bad(name, a.at(i * self.k + j));
                        }
                    }
                }
            }
            if let Some(a) = self.get("is_weights")
                && bad_weight(a.at(i))
            {
                return bad("is_weights", a.at(i));
            }
        }
        None
    }
}

/// Which slots are response tokens: per row all, none, a span after left padding, or
/// scattered; now and then none in the whole batch.
fn response_positions(r: &mut StdRng, rows: usize, cols: usize) -> Vec<bool> {
    let empty = r.random_bool(0.02);
    let mut resp = vec![false; rows * cols];
    if resp.is_empty() {
        return resp;
    }
    for row in resp.chunks_mut(cols) {
        if empty || r.random_bool(0.08) {
            continue;
        }
        match r.random_range(0..4) {
            0 => row.fill(true),
            1 | 2 => {
                let start = r.random_range(0..cols);
                let len = r.random_range(1..=cols - start);
                row[start..start + len].fill(true);
            }
            _ => row.iter_mut().for_each(|x| *x = r.random_bool(0.7)),
        }
    }
    resp
}

/// A mask value: 0 for padding, nonzero (mostly 1) for a response token.
fn mask_value(r: &mut StdRng, dt: Dt, on: bool) -> f64 {
    if !on {
        return if dt.is_float() && r.random_bool(0.05) {
            -0.0
        } else {
            0.0
        };
    }
    if r.random_bool(0.9) {
        return 1.0;
    }
    match dt {
        Dt::Bool => 2.0,
        Dt::U8 => pick(r, &[7.0, 255.0]),
        Dt::I8 | Dt::I16 | Dt::I32 => pick(r, &[-1.0, 100.0]),
        Dt::U16 | Dt::U32 => pick(r, &[1000.0, 65_535.0]),
        Dt::I64 => pick(r, &[-1.0, 1_099_511_627_776.0]),
        Dt::U64 => 1_099_511_627_776.0,
        Dt::F32 | Dt::F64 | Dt::F16 => pick(r, &[0.5, -1.0, 1e30]),
    }
}

/// An ordinary log-prob: mostly near 0, sometimes 0, a tiny positive one (read as 0),
/// a very negative one or the lowest accepted.
fn logprob(r: &mut StdRng) -> f64 {
    match r.random_range(0..40) {
        0 | 1 => 0.0,
        2 | 3 => 5e-5,
        4 => MIN_LOGPROB,
        5..=8 => -r.random_range(0.0..30.0),
        _ => -(r.random::<f64>().powi(2) * 5.0),
    }
}

/// A log-prob near `x` (within the accepted range), or another one.
fn near(r: &mut StdRng, x: f64) -> f64 {
    if !x.is_finite() || r.random_bool(0.1) {
        return logprob(r);
    }
    (x + r.random_range(-0.3..0.3)).clamp(MIN_LOGPROB, 0.0)
}

fn advantage(r: &mut StdRng) -> f64 {
    match r.random_range(0..20) {
        0 => 0.0,
        1 => pick(r, &[MAX_ABS_ADVANTAGE, -MAX_ABS_ADVANTAGE]),
        _ => r.random_range(-3.0..3.0),
    }
}

fn weight(r: &mut StdRng) -> f64 {
    match r.random_range(0..20) {
        0 => 0.0,
        1 => pick(r, &[-0.0, MAX_IS_WEIGHT]),
        _ => r.random_range(0.0..3.0),
    }
}
