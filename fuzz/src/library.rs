//! The library target: random cases through `evaluate`, `evaluate_into`,
//! `trust_region` and the chunk protocol, each checked against the README's promises.
//!
//! A [`Case`] is concrete and self-contained (a JSON config, every array's values, the
//! layout, the chunk bounds), so a finding is replayed exactly by [`check`] whatever the
//! generator later becomes. [`check`] holds the case to:
//!
//! - no panic, whatever the input;
//! - a config that deserializes round-trips through its JSON;
//! - an `Ok` is finite: the loss, every per-token and per-row output (but `threshold`
//!   under `none` and `ratio` and `delta_b_row` without a budget, NaN by contract) and
//!   every number of the diagnostics, in the input's float type;
//! - `Par::Seq` = `Par::Rayon` on 1, 2 and 3 threads, bit for bit, errors included;
//! - `evaluate_into` with some of the buffers = `evaluate`;
//! - other values at the non-response positions change nothing, bit for bit;
//! - `trust_region` gives `evaluate`'s mask, reasons, divergences and thresholds;
//! - the chunk protocol over the case's column bounds gives the whole rows' outputs bit
//!   for bit and the whole loss to rounding, and fails where the whole fails;
//! - chunk misuse (chunks out of order) is an error, not a panic or a wrong answer.

use std::fs;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use cppo::chunk::{
    Carry, ChunkPos, RowPartial, divergences_into, evaluate_chunk_into, needs_divergences,
    row_partials, whole_rows,
};
use cppo::ndarray::{Array1, Array2, Array3, ArrayView2, ShapeBuilder, s};
use cppo::{
    Advantages, Batch, Config, Evaluation, Float, Mask, Outputs, OutputsMut, Par, Rule, evaluate,
    evaluate_into, trust_region,
};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};

use crate::{Opts, Report};

// ---------------------------------------------------------------------------------------
// The case
// ---------------------------------------------------------------------------------------

/// A number of a case, written as Rust prints it (`"NaN"`, `"inf"`, `"-1e300"`) so that
/// every f64 survives JSON.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct N(pub f64);

impl Serialize for N {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:?}", self.0))
    }
}

impl<'de> Deserialize<'de> for N {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(N).map_err(serde::de::Error::custom)
    }
}

/// How a (B, L) array is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Row-major.
    C,
    /// Column-major.
    F,
    /// Every other column of a wider array.
    Strided,
    /// Columns stored in reverse (a negative stride).
    Reversed,
}

/// One concrete case: a config, a batch and how to cut it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The config, as JSON (it may be invalid: then only its error is checked).
    pub config: Value,
    /// Whether the batch is `f32` (else `f64`).
    pub f32: bool,
    /// B.
    pub rows: usize,
    /// L.
    pub cols: usize,
    /// The mask's element type (`bool`, `u8`, ..., `f64`).
    pub mask_type: String,
    /// The mask's values, row-major (for `bool`, nonzero is `true`).
    pub mask: Vec<N>,
    /// `logp`, row-major.
    pub logp: Vec<N>,
    /// `logp_old`, row-major.
    pub logp_old: Vec<N>,
    /// The advantages: B values, or B·L row-major when `per_token_adv`.
    pub advantages: Vec<N>,
    /// Whether the advantages are per token.
    pub per_token_adv: bool,
    /// K and the top-K pair (`topk_logp_old`, `topk_logp`), each B·L·K row-major.
    pub topk: Option<(usize, Vec<N>, Vec<N>)>,
    /// `logp_ref`, row-major.
    pub logp_ref: Option<Vec<N>>,
    /// `is_weights`, row-major.
    pub is_weights: Option<Vec<N>>,
    /// The layout of every (B, L) array.
    pub layout: Layout,
    /// The column chunks' bounds, from 0 to L.
    pub bounds: Vec<usize>,
    /// The seed of the other padding values and of the `evaluate_into` buffers.
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------
// The arrays of a case
// ---------------------------------------------------------------------------------------

/// A (B, L) array in its layout.
struct Lay<T> {
    data: Array2<T>,
    layout: Layout,
}

impl<T: Copy + Default> Lay<T> {
    fn new(a: Array2<T>, layout: Layout) -> Self {
        let (b, l) = a.dim();
        let data = match layout {
            Layout::C => a,
            Layout::F => {
                let mut f = Array2::from_elem((b, l).f(), T::default());
                f.assign(&a);
                f
            }
            Layout::Strided => {
                let mut w = Array2::from_elem((b, 2 * l + 1), T::default());
                w.slice_mut(s![.., 1..;2]).assign(&a);
                w
            }
            Layout::Reversed => a.slice(s![.., ..;-1]).to_owned(),
        };
        Self { data, layout }
    }

    fn view(&self, cols: Range<usize>) -> ArrayView2<'_, T> {
        let all = match self.layout {
            Layout::C | Layout::F => self.data.view(),
            Layout::Strided => self.data.slice(s![.., 1..;2]),
            Layout::Reversed => self.data.slice(s![.., ..;-1]),
        };
        all.slice_move(s![.., cols])
    }
}

macro_rules! mask_arrays {
    ($($v:ident: $t:ty => $conv:expr,)*) => {
        /// The mask, in its element type.
        enum MaskArr { $($v(Lay<$t>),)* }

        impl MaskArr {
            fn new(kind: &str, values: &Array2<f64>, layout: Layout) -> Option<Self> {
                match kind {
                    $(stringify!($t) => Some(Self::$v(Lay::new(values.mapv($conv), layout))),)*
                    _ => None,
                }
            }

            fn view(&self, cols: Range<usize>) -> Mask<'_> {
                match self { $(Self::$v(a) => Mask::from(a.view(cols)),)* }
            }
        }

        /// The mask element types, as a case names them.
        pub const MASK_TYPES: &[&str] = &[$(stringify!($t),)*];
    };
}

mask_arrays! {
    Bool: bool => |x| x != 0.0,
    U8: u8 => |x| x as u8,
    I8: i8 => |x| x as i8,
    I16: i16 => |x| x as i16,
    I32: i32 => |x| x as i32,
    I64: i64 => |x| x as i64,
    U16: u16 => |x| x as u16,
    U32: u32 => |x| x as u32,
    U64: u64 => |x| x as u64,
    F32: f32 => |x| x as f32,
    F64: f64 => |x| x,
}

/// Every array of a case, in the case's float type and layout.
struct Arrays<F> {
    logp: Lay<F>,
    logp_old: Lay<F>,
    adv_row: Option<Array1<F>>,
    adv_token: Option<Lay<F>>,
    mask: MaskArr,
    topk: Option<(Array3<F>, Array3<F>)>,
    logp_ref: Option<Lay<F>>,
    is_weights: Option<Lay<F>>,
    /// Which positions are response tokens (for the padding check).
    on: Array2<bool>,
}

fn grid(v: &[N], b: usize, l: usize) -> Result<Array2<f64>, String> {
    Array2::from_shape_vec((b, l), v.iter().map(|x| x.0).collect()).map_err(|e| e.to_string())
}

impl<F: Float> Arrays<F> {
    /// The arrays of `case`, with the values at non-response positions replaced by draws
    /// from `padding` when it is given.
    fn new(case: &Case, mut padding: Option<&mut StdRng>) -> Result<Self, String> {
        let (b, l) = (case.rows, case.cols);
        let mask = grid(&case.mask, b, l)?;
        let on = mask.mapv(|x| x != 0.0);
        let pad = |a: Array2<f64>, rng: Option<&mut StdRng>| -> Array2<f64> {
            match rng {
                None => a,
                Some(rng) => {
                    Array2::from_shape_fn((b, l), |at| if on[at] { a[at] } else { garbage(rng) })
                }
            }
        };
        let lay = |a: Array2<f64>| Lay::new(a.mapv(F::from_f64), case.layout);
        let logp = lay(pad(grid(&case.logp, b, l)?, padding.as_deref_mut()));
        let logp_old = lay(pad(grid(&case.logp_old, b, l)?, padding.as_deref_mut()));
        let (adv_row, adv_token) = if case.per_token_adv {
            (
                None,
                Some(lay(pad(
                    grid(&case.advantages, b, l)?,
                    padding.as_deref_mut(),
                ))),
            )
        } else {
            let a: Array1<F> = case.advantages.iter().map(|x| F::from_f64(x.0)).collect();
            if a.len() != b {
                return Err("advantages: not B values".into());
            }
            (Some(a), None)
        };
        let topk = match &case.topk {
            None => None,
            Some((k, old, new)) => {
                let cube = |v: &[N]| -> Result<Array3<f64>, String> {
                    Array3::from_shape_vec((b, l, *k), v.iter().map(|x| x.0).collect())
                        .map_err(|e| e.to_string())
                };
                let (mut old, mut new) = (cube(old)?, cube(new)?);
                if let Some(rng) = padding.as_deref_mut() {
                    for ((i, j, kk), x) in old.indexed_iter_mut() {
                        if !on[[i, j]] {
                            *x = garbage(rng);
                            new[[i, j, kk]] = garbage(rng);
                        }
                    }
                }
                Some((old.mapv(F::from_f64), new.mapv(F::from_f64)))
            }
        };
        let logp_ref = match &case.logp_ref {
            None => None,
            Some(v) => Some(lay(pad(grid(v, b, l)?, padding.as_deref_mut()))),
        };
        let is_weights = match &case.is_weights {
            None => None,
            Some(v) => Some(lay(pad(grid(v, b, l)?, padding))),
        };
        let mask = MaskArr::new(&case.mask_type, &mask, case.layout)
            .ok_or_else(|| format!("unknown mask type {}", case.mask_type))?;
        Ok(Self {
            logp,
            logp_old,
            adv_row,
            adv_token,
            mask,
            topk,
            logp_ref,
            is_weights,
            on,
        })
    }

    /// Runs `f` on the batch of columns `cols`.
    fn with_batch<R>(
        &self,
        cols: Range<usize>,
        f: impl FnOnce(cppo::Result<Batch<'_, F>>) -> R,
    ) -> R {
        let lp = self.logp.view(cols.clone());
        let lq = self.logp_old.view(cols.clone());
        let adv_token = self.adv_token.as_ref().map(|a| a.view(cols.clone()));
        let adv: Advantages<'_, F> = match (&self.adv_row, &adv_token) {
            (Some(a), _) => a.view().into(),
            (None, Some(a)) => a.view().into(),
            (None, None) => unreachable!("a case has advantages"),
        };
        let topk = self.topk.as_ref().map(|(o, n)| {
            (
                o.slice(s![.., cols.clone(), ..]),
                n.slice(s![.., cols.clone(), ..]),
            )
        });
        let lref = self.logp_ref.as_ref().map(|a| a.view(cols.clone()));
        let isw = self.is_weights.as_ref().map(|a| a.view(cols.clone()));
        let batch = (|| {
            let mut b = Batch::new(&lp, &lq, adv, self.mask.view(cols.clone()))?;
            if let Some((o, n)) = &topk {
                b = b.with_topk(o, n)?;
            }
            if let Some(r) = &lref {
                b = b.with_logp_ref(r)?;
            }
            if let Some(w) = &isw {
                b = b.with_is_weights(w)?;
            }
            Ok(b)
        })();
        f(batch)
    }
}

/// A value for a non-response position: anything at all.
fn garbage(rng: &mut StdRng) -> f64 {
    const G: &[f64] = &[
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        -1e300,
        7.5,
        0.0,
        -3.0,
        f64::MAX,
        1e-310,
    ];
    G[rng.random_range(0..G.len())]
}

// ---------------------------------------------------------------------------------------
// Checking a case
// ---------------------------------------------------------------------------------------

/// What a case came to, when no promise was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The config was refused when deserialized.
    ConfigError,
    /// The evaluation was an error (the same on every path).
    Error,
    /// The evaluation was `Ok`, and every check passed.
    Ok,
}

/// Checks every promise on `case`; `Err` describes the first broken one.
pub fn check(case: &Case) -> Result<Outcome, String> {
    match catch_unwind(AssertUnwindSafe(|| check_unguarded(case))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {msg}"))
        }
    }
}

fn check_unguarded(case: &Case) -> Result<Outcome, String> {
    let cfg: Config = match serde_json::from_value(case.config.clone()) {
        Ok(c) => c,
        Err(_) => return Ok(Outcome::ConfigError),
    };
    let again: Config = serde_json::to_value(cfg)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("config does not round-trip: {e}"))?;
    if again != cfg {
        return Err(format!(
            "config round-trips to another: {cfg:?} vs {again:?}"
        ));
    }
    if case.f32 {
        check_typed::<f32>(case, &cfg)
    } else {
        check_typed::<f64>(case, &cfg)
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}

fn check_typed<F: Float>(case: &Case, cfg: &Config) -> Result<Outcome, String> {
    let (b, l) = (case.rows, case.cols);
    let arrays = Arrays::<F>::new(case, None)?;
    let whole = arrays.with_batch(0..l, |batch| evaluate(cfg, &batch?, Par::Seq));
    for threads in 1..=3 {
        let other = pool(threads)
            .install(|| arrays.with_batch(0..l, |batch| evaluate(cfg, &batch?, Par::Rayon)));
        same_result(&whole, &other).map_err(|e| format!("Seq vs Rayon({threads}): {e}"))?;
    }
    let mut rng = StdRng::seed_from_u64(case.seed);
    let padded = Arrays::<F>::new(case, Some(&mut rng))?;
    let other = padded.with_batch(0..l, |batch| evaluate(cfg, &batch?, Par::Seq));
    same_result(&whole, &other).map_err(|e| format!("other padding values: {e}"))?;
    let whole = match whole {
        Err(e) => {
            if case.bounds.len() >= 2 && run_chunks(cfg, &arrays, &case.bounds).is_ok() {
                return Err(format!(
                    "the whole batch is an error ({e}) but its chunks {:?} are not",
                    case.bounds
                ));
            }
            return Ok(Outcome::Error);
        }
        Ok(e) => e,
    };
    finite(cfg, &whole)?;
    check_into(cfg, &arrays, &whole, rng.random())?;
    check_trust_region(cfg, &arrays, &whole)?;
    check_chunks(cfg, &arrays, &whole, &case.bounds)?;
    check_misuse(cfg, &arrays, &case.bounds)?;
    debug_assert_eq!(arrays.on.dim(), (b, l));
    Ok(Outcome::Ok)
}

/// Whether two results are the same: the same error, or the same bits.
fn same_result<F: Float>(
    a: &cppo::Result<Evaluation<F>>,
    b: &cppo::Result<Evaluation<F>>,
) -> Result<(), String> {
    match (a, b) {
        // (By their text: an error holding a NaN is not equal to itself.)
        (Err(x), Err(y)) if x.to_string() == y.to_string() => Ok(()),
        (Err(x), Err(y)) => Err(format!("errors differ: {x} vs {y}")),
        (Ok(_), Err(y)) => Err(format!("Ok vs {y}")),
        (Err(x), Ok(_)) => Err(format!("{x} vs Ok")),
        (Ok(x), Ok(y)) => {
            if x.loss.to_bits() != y.loss.to_bits() {
                return Err(format!("loss {} vs {}", x.loss, y.loss));
            }
            same_outputs(&x.outputs, &y.outputs)?;
            if x.diagnostics != y.diagnostics
                && serde_json::to_string(&x.diagnostics).ok()
                    != serde_json::to_string(&y.diagnostics).ok()
            {
                return Err(format!(
                    "diagnostics differ: {:?} vs {:?}",
                    x.diagnostics, y.diagnostics
                ));
            }
            Ok(())
        }
    }
}

fn same_bits<F: Float>(what: &str, a: &Array2<F>, b: &Array2<F>) -> Result<(), String> {
    for ((at, x), y) in a.indexed_iter().zip(b.iter()) {
        if x.to_f64().to_bits() != y.to_f64().to_bits() {
            return Err(format!("{what} at {at:?}: {x} vs {y}"));
        }
    }
    Ok(())
}

fn same_outputs<F: Float>(a: &Outputs<F>, b: &Outputs<F>) -> Result<(), String> {
    same_bits("divergence", &a.divergence, &b.divergence)?;
    same_bits("weight", &a.weight, &b.weight)?;
    same_bits("threshold", &a.threshold, &b.threshold)?;
    same_bits("token_loss", &a.token_loss, &b.token_loss)?;
    same_bits("grad", &a.grad, &b.grad)?;
    if a.keep != b.keep {
        return Err("keep differs".into());
    }
    if a.reason != b.reason {
        return Err("reason differs".into());
    }
    for (i, (x, y)) in a.delta_b_row.iter().zip(&b.delta_b_row).enumerate() {
        if x.to_f64().to_bits() != y.to_f64().to_bits() {
            return Err(format!("delta_b_row at row {i}: {x} vs {y}"));
        }
    }
    Ok(())
}

/// Every number of an `Ok` is finite, but for the NaNs the docs name.
fn finite<F: Float>(cfg: &Config, e: &Evaluation<F>) -> Result<(), String> {
    if !e.loss.is_finite() {
        return Err(format!("loss is {}", e.loss));
    }
    let o = &e.outputs;
    let nan_threshold = matches!(cfg.rule, Rule::None | Rule::Ratio { .. });
    for (what, a) in [
        ("divergence", &o.divergence),
        ("weight", &o.weight),
        ("token_loss", &o.token_loss),
        ("grad", &o.grad),
        ("threshold", &o.threshold),
    ] {
        for (at, x) in a.indexed_iter() {
            let x = x.to_f64();
            let allowed = what == "threshold" && nan_threshold && x.is_nan();
            if !x.is_finite() && !allowed {
                return Err(format!("{what} at {at:?} is {x}"));
            }
            if what == "divergence" && x < 0.0 {
                return Err(format!("divergence at {at:?} is {x} < 0"));
            }
        }
    }
    let budget = cfg.rule.cppo_params().is_some_and(|p| p.delta_b.is_some());
    for (i, x) in o.delta_b_row.iter().enumerate() {
        let x = x.to_f64();
        if !(x.is_finite() || (!budget && x.is_nan())) {
            return Err(format!("delta_b_row at row {i} is {x}"));
        }
    }
    let d = &e.diagnostics;
    for (what, x) in [
        ("clip_frac", d.clip_frac),
        ("threshold_mean", d.threshold_mean),
    ] {
        if x.is_some_and(|x| !x.is_finite()) {
            return Err(format!("diagnostics.{what} is {x:?}"));
        }
    }
    // Every other number: NaN and ±∞ serialize as null.
    let v = serde_json::to_value(d).map_err(|e| e.to_string())?;
    nulls("diagnostics", &v)
}

fn nulls(path: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::Null => Err(format!("{path} is not finite")),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| nulls(&format!("{path}[{i}]"), x)),
        Value::Object(m) => m.iter().try_for_each(|(k, x)| match (k.as_str(), x) {
            ("clip_frac" | "threshold_mean" | "delta_b_row", Value::Null) => Ok(()),
            _ => nulls(&format!("{path}.{k}"), x),
        }),
        _ => Ok(()),
    }
}

/// `evaluate_into` with a random subset of the buffers (in a transposed layout for
/// some) gives `evaluate`'s values in them.
fn check_into<F: Float>(
    cfg: &Config,
    arrays: &Arrays<F>,
    whole: &Evaluation<F>,
    pick: u32,
) -> Result<(), String> {
    let dim = whole.outputs.grad.dim();
    let mut got = Outputs::<F>::zeros(dim);
    let mut grad_t = Array2::<F>::default((dim.1, dim.0));
    let s = {
        let all = got.view_mut();
        let keep = |bit: u32| pick & (1 << bit) != 0;
        let out = OutputsMut {
            divergence: all.divergence.filter(|_| keep(0)),
            weight: all.weight.filter(|_| keep(1)),
            threshold: all.threshold.filter(|_| keep(2)),
            keep: all.keep.filter(|_| keep(3)),
            reason: all.reason.filter(|_| keep(4)),
            token_loss: all.token_loss.filter(|_| keep(5)),
            grad: if keep(6) {
                Some(grad_t.view_mut().reversed_axes())
            } else {
                all.grad.filter(|_| keep(7))
            },
            delta_b_row: all.delta_b_row.filter(|_| keep(8)),
        };
        arrays.with_batch(0..dim.1, |b| evaluate_into(cfg, &b?, out, Par::Seq))
    };
    let s = s.map_err(|e| format!("evaluate_into fails where evaluate does not: {e}"))?;
    // (Diagnostics holding a NaN are compared by their JSON.)
    let same_diagnostics = s.diagnostics == whole.diagnostics
        || serde_json::to_string(&s.diagnostics).ok()
            == serde_json::to_string(&whole.diagnostics).ok();
    if s.loss.to_bits() != whole.loss.to_bits() || !same_diagnostics {
        return Err("evaluate_into's loss or diagnostics differ from evaluate's".into());
    }
    let w = &whole.outputs;
    let bit = |b: u32| pick & (1 << b) != 0;
    let zero = Outputs::<F>::zeros(dim);
    let want = |on: bool, a: &Array2<F>, z: &Array2<F>| if on { a.clone() } else { z.clone() };
    same_bits(
        "into divergence",
        &got.divergence,
        &want(bit(0), &w.divergence, &zero.divergence),
    )?;
    same_bits(
        "into weight",
        &got.weight,
        &want(bit(1), &w.weight, &zero.weight),
    )?;
    same_bits(
        "into threshold",
        &got.threshold,
        &want(bit(2), &w.threshold, &zero.threshold),
    )?;
    if bit(3) && got.keep != w.keep {
        return Err("into keep differs".into());
    }
    if bit(4) && got.reason != w.reason {
        return Err("into reason differs".into());
    }
    same_bits(
        "into token_loss",
        &got.token_loss,
        &want(bit(5), &w.token_loss, &zero.token_loss),
    )?;
    if bit(6) {
        same_bits("into grad (transposed)", &grad_t.t().to_owned(), &w.grad)?;
    } else if bit(7) {
        same_bits("into grad", &got.grad, &w.grad)?;
    }
    Ok(())
}

/// `trust_region` gives `evaluate`'s mask and reasons.
fn check_trust_region<F: Float>(
    cfg: &Config,
    arrays: &Arrays<F>,
    whole: &Evaluation<F>,
) -> Result<(), String> {
    // `trust_region` takes exact numerics: under `f32_exp` its divergences and
    // thresholds are not `evaluate`'s.
    if !cfg.numerics.is_exact() {
        return Ok(());
    }
    let l = whole.outputs.grad.ncols();
    let tr = arrays.with_batch(0..l, |b| {
        trust_region(cfg.divergence, &cfg.rule, &b?, Par::Seq)
    });
    let tr = tr.map_err(|e| format!("trust_region fails where evaluate does not: {e}"))?;
    let (a, w) = (&tr.outputs, &whole.outputs);
    same_bits("trust_region divergence", &a.divergence, &w.divergence)?;
    same_bits("trust_region threshold", &a.threshold, &w.threshold)?;
    if a.keep != w.keep || a.reason != w.reason {
        return Err("trust_region's mask or reasons differ from evaluate's".into());
    }
    Ok(())
}

/// The outputs and loss of the chunk protocol over `bounds`, for the whole batch.
fn run_chunks<F: Float>(
    cfg: &Config,
    arrays: &Arrays<F>,
    bounds: &[usize],
) -> cppo::Result<(Outputs<F>, f64)> {
    let (b, l) = arrays.on.dim();
    let pos = |c0| ChunkPos { col0: c0, width: l };
    let mut partials = vec![RowPartial::default(); b];
    let mut divergences = Array2::<f64>::from_elem((b, l), f64::NAN);
    for w in bounds.windows(2) {
        let p = arrays.with_batch(w[0]..w[1], |c| row_partials(cfg, &c?, pos(w[0]), Par::Seq))?;
        for (r, p) in partials.iter_mut().zip(&p) {
            *r = r.merge(p);
        }
        if needs_divergences(cfg) {
            let d = divergences.slice_mut(s![.., w[0]..w[1]]);
            arrays.with_batch(w[0]..w[1], |c| {
                divergences_into(cfg, &c?, pos(w[0]), d, Par::Seq)
            })?;
        }
    }
    let gathered = needs_divergences(cfg).then_some(divergences.view());
    let rows = whole_rows(cfg, &partials, gathered)?;
    let mut carries = vec![Carry::default(); b];
    let mut out = Outputs::<F>::zeros((b, l));
    let mut loss = 0.0;
    for w in bounds.windows(2) {
        let mut part = Outputs::<F>::zeros((b, w[1] - w[0]));
        let s = arrays.with_batch(w[0]..w[1], |c| {
            evaluate_chunk_into(
                cfg,
                &c?,
                pos(w[0]),
                &rows,
                &mut carries,
                part.view_mut(),
                Par::Seq,
            )
        })?;
        loss += s.loss;
        let cols = s![.., w[0]..w[1]];
        out.divergence.slice_mut(cols).assign(&part.divergence);
        out.weight.slice_mut(cols).assign(&part.weight);
        out.threshold.slice_mut(cols).assign(&part.threshold);
        out.keep.slice_mut(cols).assign(&part.keep);
        out.reason.slice_mut(cols).assign(&part.reason);
        out.token_loss.slice_mut(cols).assign(&part.token_loss);
        out.grad.slice_mut(cols).assign(&part.grad);
        out.delta_b_row.assign(&part.delta_b_row);
    }
    for (i, (c, r)) in carries.iter().zip(&rows).enumerate() {
        c.finish(i, r, l)?;
    }
    Ok((out, loss))
}

/// Column chunks give the whole rows' outputs and, to rounding, the whole loss.
fn check_chunks<F: Float>(
    cfg: &Config,
    arrays: &Arrays<F>,
    whole: &Evaluation<F>,
    bounds: &[usize],
) -> Result<(), String> {
    let (out, loss) = match run_chunks(cfg, arrays, bounds) {
        Ok(r) => r,
        // The one documented refusal: MinPRO's gradient through the prefix minimum.
        Err(cppo::Error::InvalidConfig {
            field: "objective.stop_gradient",
            ..
        }) => return Ok(()),
        Err(e) => {
            return Err(format!(
                "chunks {bounds:?} fail where the whole does not: {e}"
            ));
        }
    };
    let mut w = whole.outputs.clone();
    if bounds.len() < 2 {
        // No chunk writes the per-row outputs.
        w.delta_b_row.fill(F::from_f64(0.0));
    }
    same_outputs(&out, &w).map_err(|e| format!("chunks {bounds:?}: {e}"))?;
    let scale: f64 = whole
        .outputs
        .token_loss
        .iter()
        .map(|x| x.to_f64().abs())
        .sum::<f64>()
        + f64::MIN_POSITIVE;
    if (loss - whole.loss).abs() > 1e-9 * (scale + loss.abs() + whole.loss.abs()) {
        return Err(format!(
            "chunks {bounds:?}: loss {loss:e} vs the whole's {:e}",
            whole.loss
        ));
    }
    Ok(())
}

/// Chunks of a row fed out of order are an error.
fn check_misuse<F: Float>(
    cfg: &Config,
    arrays: &Arrays<F>,
    bounds: &[usize],
) -> Result<(), String> {
    let (b, l) = arrays.on.dim();
    if bounds.len() < 3
        || b == 0
        || cfg
            .rule
            .cppo_params()
            .is_some_and(|p| p.active_calibration().is_some())
    {
        return Ok(());
    }
    let Ok(partials) = arrays.with_batch(0..l, |c| {
        row_partials(cfg, &c?, ChunkPos { col0: 0, width: l }, Par::Seq)
    }) else {
        return Ok(());
    };
    let Ok(rows) = whole_rows(cfg, &partials, None) else {
        return Ok(());
    };
    // The second chunk first, from fresh carries: out of order for every row.
    let (c0, c1) = (bounds[1], bounds[2]);
    // Chunk c0..c1 alone, every row starting from `carry`.
    let chunk = |carry: Carry| {
        let mut carries = vec![carry; b];
        let mut part = Outputs::<F>::zeros((b, c1 - c0));
        let r = arrays.with_batch(c0..c1, |c| {
            evaluate_chunk_into(
                cfg,
                &c?,
                ChunkPos { col0: c0, width: l },
                &rows,
                &mut carries,
                part.view_mut(),
                Par::Seq,
            )
        });
        (r, part)
    };
    let (r, _) = chunk(Carry::default());
    if c0 > 0 && r.is_ok() {
        return Err(format!("chunk {c0}..{c1} accepted before chunk 0..{c0}"));
    }
    // A carry a caller wrote by hand: refused when read, or harmless.
    let mut rng = StdRng::seed_from_u64(c0 as u64 ^ (c1 as u64) << 32 ^ b as u64);
    let v = |rng: &mut StdRng| pick(rng, &[0.0, 0.5, 1.0, 3.0, 1e6, 1e300, -1.0, 5e-324]);
    let t = pick(&mut rng, &[0u64, 1, 2, c0 as u64, u64::MAX]);
    let json = format!(
        r#"{{"col": {c0}, "t": {t}, "s": {:e}, "w": {:e}, "min_ratio": {:e}}}"#,
        v(&mut rng),
        v(&mut rng),
        v(&mut rng)
    );
    if let Ok(carry) = serde_json::from_str::<Carry>(&json)
        && let (Ok(s), part) = chunk(carry)
    {
        let bad = part
            .grad
            .iter()
            .chain(&part.token_loss)
            .any(|x| !x.to_f64().is_finite());
        if bad || !s.loss.is_finite() {
            return Err(format!(
                "a hand-written carry {json} gave non-finite outputs"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Generating a case
// ---------------------------------------------------------------------------------------

/// Picks one of `xs`.
fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// A real config parameter: mostly ordinary, sometimes at or past an edge.
fn param(rng: &mut StdRng) -> f64 {
    if rng.random_bool(0.7) {
        pick(
            rng,
            &[0.01, 0.05, 0.1, 0.15, 0.2, 0.28, 0.5, 1.0, 1.05, 2.0, 5.0],
        )
    } else {
        pick(
            rng,
            &[
                0.0,
                -0.0,
                5e-324,
                1e-300,
                1e-7,
                1e-6,
                1.0 + 1e-15,
                1e3,
                1e6,
                1.000001e6,
                1e300,
                -0.1,
                -1e300,
            ],
        )
    }
}

/// A parameter that may be `null` (off), with probability `p_null`.
fn param_or_null(rng: &mut StdRng, p_null: f64) -> Value {
    if rng.random_bool(p_null) {
        Value::Null
    } else {
        json!(param(rng))
    }
}

/// An integer config field.
fn count(rng: &mut StdRng) -> Value {
    json!(pick(rng, &[0u64, 1, 2, 3, 7, 64, 1000, 1 << 40, u64::MAX]))
}

fn maybe(rng: &mut StdRng, p: f64, v: impl FnOnce(&mut StdRng) -> Value) -> Option<Value> {
    rng.random_bool(p).then(|| v(rng))
}

/// A random JSON config: every rule, objective, divergence and aggregation, parameters
/// at and past their edges, sometimes a preset, sometimes junk.
pub fn random_config(rng: &mut StdRng) -> Value {
    let mut cfg = serde_json::Map::new();
    if rng.random_bool(0.1) {
        let p = pick(
            rng,
            &[
                "cppo",
                "dppo",
                "grpo",
                "paper_dense",
                "paper_moe",
                "paper_post_trained",
                "paper_kl",
                "unirl",
                "verl_pr6731",
                "verl_pr6731_scripts",
                "no_such_preset",
            ],
        );
        cfg.insert("preset".into(), json!(p));
    }
    let div = pick(
        rng,
        &["binary_tv", "binary_kl", "topk_tv", "topk_kl", "k2", "k3"],
    );
    cfg.insert("divergence".into(), json!(div));
    let kind = pick(
        rng,
        &[
            "none",
            "ratio",
            "dppo",
            "cppo",
            "cppo",
            "cppo",
            "cppo_soft",
            "trm_max",
            "trm_avg",
        ],
    );
    let mut rule = serde_json::Map::new();
    rule.insert("kind".into(), json!(kind));
    let put = |m: &mut serde_json::Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    match kind {
        "ratio" => {
            put(&mut rule, "eps_low", maybe(rng, 0.5, |r| json!(param(r))));
            put(&mut rule, "eps_high", maybe(rng, 0.5, |r| json!(param(r))));
        }
        "dppo" | "trm_max" | "trm_avg" => {
            put(&mut rule, "delta", maybe(rng, 0.7, |r| json!(param(r))));
        }
        "cppo" | "cppo_soft" => {
            put(&mut rule, "delta", maybe(rng, 0.5, |r| json!(param(r))));
            put(
                &mut rule,
                "delta_b",
                maybe(rng, 0.5, |r| param_or_null(r, 0.2)),
            );
            put(
                &mut rule,
                "w_min",
                maybe(rng, 0.5, |r| {
                    json!(pick(r, &[1.0, 0.8, 0.5, 0.1, 1e-300, 0.0, 1.5, -0.2]))
                }),
            );
            put(&mut rule, "horizon", maybe(rng, 0.2, count));
            put(
                &mut rule,
                "positions",
                maybe(rng, 0.3, |r| json!(pick(r, &["response", "column"]))),
            );
            put(
                &mut rule,
                "calibration",
                maybe(rng, 0.5, |r| {
                    if r.random_bool(0.3) {
                        return Value::Null;
                    }
                    json!({
                        "quantile": pick(r, &[0.9, 0.5, 1.0, 0.0, 1e-9, 1.5]),
                        "scale": param(r),
                        "ceiling": pick(r, &[2.0, 1.0, 5.0, 1e6, 1e7, 0.5]),
                    })
                }),
            );
            put(
                &mut rule,
                "shuffle_seed",
                maybe(rng, 0.15, |r| json!(r.random::<u64>())),
            );
            if kind == "cppo_soft" || rng.random_bool(0.2) {
                if rng.random_bool(0.5) {
                    rule.insert("gate".into(), json!("sigmoid"));
                    put(&mut rule, "tau", maybe(rng, 0.8, |r| json!(param(r))));
                } else {
                    put(&mut rule, "gate", maybe(rng, 0.5, |_| json!("inverse")));
                }
            }
        }
        _ => {}
    }
    if rng.random_bool(0.15) || (kind == "none" && rng.random_bool(0.3)) {
        cfg.insert("rule".into(), json!(kind));
    } else {
        cfg.insert("rule".into(), Value::Object(rule));
    }
    let okind = pick(
        rng,
        &[
            "surrogate",
            "surrogate",
            "detached_is",
            "ppo_clip",
            "cispo",
            "gspo",
            "gmpo",
            "minpro",
            "sapo",
        ],
    );
    let mut obj = serde_json::Map::new();
    obj.insert("kind".into(), json!(okind));
    match okind {
        "detached_is" => put(&mut obj, "ratio_cap", maybe(rng, 0.7, |r| json!(param(r)))),
        "ppo_clip" => {
            put(&mut obj, "eps_low", maybe(rng, 0.5, |r| json!(param(r))));
            put(&mut obj, "eps_high", maybe(rng, 0.5, |r| json!(param(r))));
            put(
                &mut obj,
                "dual_clip",
                maybe(rng, 0.3, |r| json!(pick(r, &[3.0, 1.0, 1.5, 1e6, 1e300]))),
            );
        }
        "cispo" => put(&mut obj, "eps_high", maybe(rng, 0.7, |r| json!(param(r)))),
        "gspo" | "gmpo" => {
            put(&mut obj, "eps_low", maybe(rng, 0.5, |r| json!(param(r))));
            put(&mut obj, "eps_high", maybe(rng, 0.5, |r| json!(param(r))));
        }
        "minpro" => {
            put(
                &mut obj,
                "include_current",
                maybe(rng, 0.5, |r| json!(r.random_bool(0.5))),
            );
            put(&mut obj, "clip", maybe(rng, 0.5, |r| param_or_null(r, 0.3)));
            put(
                &mut obj,
                "stop_gradient",
                maybe(rng, 0.3, |r| json!(r.random_bool(0.5))),
            );
        }
        "sapo" => {
            put(&mut obj, "tau_pos", maybe(rng, 0.6, |r| json!(param(r))));
            put(&mut obj, "tau_neg", maybe(rng, 0.6, |r| json!(param(r))));
        }
        _ => {}
    }
    cfg.insert("objective".into(), Value::Object(obj));
    let agg = pick(
        rng,
        &[
            "token-mean",
            "seq-mean-token-mean",
            "seq-mean-token-sum",
            "seq-mean-token-sum-norm",
        ],
    );
    cfg.insert("aggregation".into(), json!(agg));
    put(&mut cfg, "norm_length", maybe(rng, 0.15, count));
    put(&mut cfg, "num_tokens", maybe(rng, 0.1, count));
    put(&mut cfg, "num_seqs", maybe(rng, 0.1, count));
    put(
        &mut cfg,
        "kl",
        maybe(
            rng,
            0.2,
            |r| json!({"estimator": pick(r, &["k1", "k2", "k3"]), "coef": param(r)}),
        ),
    );
    put(
        &mut cfg,
        "numerics",
        maybe(rng, 0.3, |r| {
            // Now and then a name that is not one (refused, with a hint).
            let junk = r.random_bool(0.03);
            json!(if junk {
                "f32"
            } else {
                pick(r, &["exact", "f32_exp"])
            })
        }),
    );
    // Junk: an unknown field, a wrong type, a missing kind.
    if rng.random_bool(0.03) {
        cfg.insert("no_such_field".into(), json!(1));
    }
    if rng.random_bool(0.03) {
        let k = pick(
            rng,
            &["divergence", "rule", "objective", "aggregation", "kl"],
        );
        let junk = [json!(3.5), json!([]), json!("bogus"), json!({})];
        cfg.insert(k.into(), junk[rng.random_range(0..junk.len())].clone());
    }
    Value::Object(cfg)
}

/// A log-prob: realistic, at an edge, or hostile.
fn logprob(rng: &mut StdRng, hostile: f64) -> f64 {
    if rng.random_bool(hostile) {
        return pick(
            rng,
            &[
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                1.0,
                2e-4,
                -1.0001e4,
                -2e4,
                -1e300,
                -f64::MAX,
            ],
        );
    }
    if rng.random_bool(0.05) {
        return pick(
            rng,
            &[
                cppo::limits::MIN_LOGPROB,
                -9999.99,
                -1000.0,
                -745.2,
                -100.0,
                -20.0,
                0.0,
                -0.0,
                1e-4,
                5e-5,
                -1e-300,
                -5e-324,
            ],
        );
    }
    -rng.random::<f64>().powi(3) * 8.0
}

/// A log-prob near `base`: the current policy drifted from the rollout's.
fn drifted(rng: &mut StdRng, base: f64, sigma: f64) -> f64 {
    if !base.is_finite() || base < -50.0 {
        return base;
    }
    let u: f64 = rng.random::<f64>() - 0.5;
    (base + sigma * u * 4.0).min(0.0)
}

fn advantage(rng: &mut StdRng, hostile: f64) -> f64 {
    if rng.random_bool(hostile) {
        return pick(
            rng,
            &[f64::NAN, f64::INFINITY, -1e300, 1.0000001e9, -3e9, 1e19],
        );
    }
    if rng.random_bool(0.05) {
        return pick(rng, &[1e9, -1e9, 0.0, -0.0, 1e-300, 5e-324, 1e6]);
    }
    (rng.random::<f64>() - 0.5) * 4.0
}

fn weight(rng: &mut StdRng, hostile: f64) -> f64 {
    if rng.random_bool(hostile) {
        return pick(rng, &[f64::NAN, f64::INFINITY, -1.0, -1e-300, 1.5e6, 1e300]);
    }
    if rng.random_bool(0.05) {
        return pick(rng, &[0.0, 1e6, 1e-300, 100.0]);
    }
    0.5 + rng.random::<f64>()
}

/// A mask value for a response token (`on`) or another position.
fn mask_value(rng: &mut StdRng, kind: &str, on: bool, hostile: f64) -> f64 {
    let float = kind == "f32" || kind == "f64";
    if float && rng.random_bool(hostile) {
        return pick(rng, &[f64::NAN, f64::INFINITY]);
    }
    if !on {
        return 0.0;
    }
    match kind {
        "bool" => 1.0,
        "f32" | "f64" => pick(rng, &[1.0, 1.0, 0.5, -2.0, 1e-40]),
        "i8" | "i16" | "i32" | "i64" => pick(rng, &[1.0, 1.0, 7.0, -1.0]),
        _ => pick(rng, &[1.0, 1.0, 3.0, 200.0]),
    }
}

/// A random case from `rng`.
pub fn random_case(rng: &mut StdRng) -> Case {
    let config = random_config(rng);
    let b = pick(rng, &[0, 1, 1, 2, 3, 4, 6, 9]);
    let l = pick(rng, &[0, 1, 2, 3, 5, 8, 16, 33, 33, 70, 130]);
    let hostile = pick(rng, &[0.0, 0.0, 0.0, 0.002, 0.02]);
    let mask_type = pick(rng, MASK_TYPES).to_string();
    let sigma = pick(rng, &[0.0, 0.01, 0.1, 0.5, 3.0]);
    let mut on = vec![false; b * l];
    for i in 0..b {
        let (start, end) = match rng.random_range(0..5) {
            0 => (0, l),
            1 => (0, rng.random_range(0..=l)),
            2 => {
                let s = rng.random_range(0..=l);
                (s, rng.random_range(s..=l))
            }
            3 => (0, 0),
            _ => (0, l),
        };
        for j in start..end {
            on[i * l + j] = !(rng.random_bool(0.1) && j > start);
        }
    }
    let mask = on
        .iter()
        .map(|&o| N(mask_value(rng, &mask_type, o, hostile)))
        .collect();
    let logp_old: Vec<f64> = (0..b * l).map(|_| logprob(rng, hostile)).collect();
    let logp = logp_old
        .iter()
        .map(|&q| {
            if rng.random_bool(0.5) {
                N(drifted(rng, q, sigma))
            } else {
                N(logprob(rng, hostile))
            }
        })
        .collect();
    let per_token_adv = rng.random_bool(0.3);
    let advantages = (0..if per_token_adv { b * l } else { b })
        .map(|_| N(advantage(rng, hostile)))
        .collect();
    let topk = rng.random_bool(0.4).then(|| {
        let k = rng.random_range(1..=4);
        let mut old = Vec::with_capacity(b * l * k);
        let mut new = Vec::with_capacity(b * l * k);
        for _ in 0..b * l {
            // The rollout's K largest probabilities, most of the mass, and the current
            // policy's log-probs of the same tokens.
            let mass = pick(rng, &[1.0, 0.999, 0.9, 0.5, 1.2]);
            let raw: Vec<f64> = (0..k).map(|_| rng.random::<f64>() + 1e-3).collect();
            let total: f64 = raw.iter().sum();
            for x in raw {
                let q = (x / total * mass).ln().min(0.0);
                let q = if rng.random_bool(0.02) {
                    logprob(rng, hostile)
                } else {
                    q
                };
                old.push(N(q));
                new.push(N(drifted(rng, q, sigma)));
            }
        }
        (k, old, new)
    });
    let logp_ref = rng
        .random_bool(0.3)
        .then(|| (0..b * l).map(|_| N(logprob(rng, hostile))).collect());
    let is_weights = rng
        .random_bool(0.3)
        .then(|| (0..b * l).map(|_| N(weight(rng, hostile))).collect());
    let layout = pick(
        rng,
        &[
            Layout::C,
            Layout::C,
            Layout::F,
            Layout::Strided,
            Layout::Reversed,
        ],
    );
    let mut bounds = vec![0];
    while *bounds.last().unwrap_or(&0) < l {
        let last = bounds[bounds.len() - 1];
        let step = if rng.random_bool(0.3) {
            l - last
        } else {
            rng.random_range(1..=(l - last))
        };
        bounds.push(last + step);
    }
    if l == 0 && rng.random_bool(0.5) {
        bounds.push(0);
    }
    Case {
        config,
        f32: rng.random_bool(0.4),
        rows: b,
        cols: l,
        mask_type,
        mask,
        logp,
        logp_old: logp_old.into_iter().map(N).collect(),
        advantages,
        per_token_adv,
        topk,
        logp_ref,
        is_weights,
        layout,
        bounds,
        seed: rng.random(),
    }
}

/// The seed of case `i` of a run seeded `seed`.
pub fn case_seed(seed: u64, i: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Writes a finding to `dir`.
fn save(dir: &Path, name: &str, case: &Case) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(case).map_err(std::io::Error::other)?;
    fs::write(dir.join(format!("{name}.json")), text)
}

/// Runs the library target for `opts.seconds`: case after case, each checked by
/// [`check`]; every broken promise is printed and written to `opts.corpus`.
pub fn run(opts: &Opts) -> Report {
    let start = Instant::now();
    let mut report = Report {
        target: "library",
        ..Report::default()
    };
    // Panics are caught and reported as findings; keep their messages off stderr.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < opts.seconds {
        let seed = case_seed(opts.seed, i);
        let case = random_case(&mut StdRng::seed_from_u64(seed));
        report.cases += 1;
        match check(&case) {
            Ok(Outcome::Ok) => report.ok += 1,
            Ok(_) => {}
            Err(what) => {
                report.findings += 1;
                let name = format!("seed{}-case{i}", opts.seed);
                eprintln!("finding {name}: {what}");
                if let Err(e) = save(&opts.corpus, &name, &case) {
                    eprintln!("cannot write {name} to {}: {e}", opts.corpus.display());
                }
            }
        }
        i += 1;
    }
    std::panic::set_hook(hook);
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Draws `n` random cases (for tests of the generator itself).
pub fn sample_cases(seed: u64, n: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| random_case(&mut StdRng::seed_from_u64(rng.next_u64())))
        .collect()
}
