//! The native half of the `cppo` Python package: a thin PyO3 layer over the `cppo` crate.
//!
//! Every number comes from the crate; this module only moves arrays across the boundary
//! (numpy arrays in as borrowed `ndarray` views, without copies; outputs out as numpy
//! arrays that take over the crate's buffers, without copies either), picks the thread
//! pool, releases the GIL around the computation, and turns [`cppo::Error`] into the
//! Python exception [`CppoError`]. The pure-Python layer (`cppo/__init__.py`) checks
//! dtypes and dimensions first, resolves the config to its text, and wraps the results;
//! the functions here are its private API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cppo::chunk::{self, Carry, ChunkPos, RowPartial, WholeRow};
use cppo::ndarray::{ArrayView2, ArrayView3};
use cppo::{Batch, Config, Error, Evaluation, Float, Mask, Outputs, Par, Preset};
use numpy::{Element, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

pyo3::create_exception!(
    cppo,
    CppoError,
    PyValueError,
    "Bad input to cppo: the crate's error, with its message and where it is.\n\n\
     Attributes (None where they do not apply): kind (the Rust variant's name, e.g.\n\
     'NonFinite'), array, row, col, k, value, field, hint, line, column."
);

/// Runs `f` with the GIL released, on the threads `threads` asks for: `None` the global
/// rayon pool ([`Par::Rayon`]), 1 the calling thread ([`Par::Seq`]), N a rayon pool of N
/// threads (built once per N and kept). The crate's results are the same bits for all.
fn run_on<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    f: impl FnOnce(Par) -> T + Send,
) -> PyResult<T> {
    match threads {
        None => Ok(py.detach(|| f(Par::Rayon))),
        Some(0) => Err(PyValueError::new_err("threads must be at least 1, or None")),
        Some(1) => Ok(py.detach(|| f(Par::Seq))),
        Some(n) => {
            let pool = pool(n)?;
            Ok(py.detach(|| pool.install(|| f(Par::Rayon))))
        }
    }
}

/// The rayon pool of `n` threads, built on first use and kept for later calls.
fn pool(n: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("cppo-{i}"))
        .build()
        .map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))?;
    let p = Arc::new(p);
    pools.insert(n, p.clone());
    Ok(p)
}

/// The [`cppo::Error`] as a [`CppoError`], with the structured fields as attributes.
fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    let err = CppoError::new_err(e.to_string());
    if let Err(set) = set_attrs(err.value(py), &e) {
        return set;
    }
    err
}

/// Sets `CppoError`'s attributes from the variant's fields: every attribute is set, to
/// None where the variant has no such field.
fn set_attrs(exc: &Bound<'_, PyAny>, e: &Error) -> PyResult<()> {
    let py = exc.py();
    let none = || py.None();
    let (mut array, mut row, mut col, mut k, mut value) = (none(), none(), none(), none(), none());
    let (mut field, mut hint, mut line, mut column) = (none(), none(), none(), none());
    let kind = match e {
        Error::ShapeMismatch { array: a, .. } => {
            array = a.into_pyobject(py)?.into_any().unbind();
            "ShapeMismatch"
        }
        Error::MissingArray { array: a, .. } => {
            array = a.into_pyobject(py)?.into_any().unbind();
            "MissingArray"
        }
        Error::NonFinite {
            array: a,
            at,
            value: v,
        }
        | Error::Negative {
            array: a,
            at,
            value: v,
        }
        | Error::OutOfRange {
            array: a,
            at,
            value: v,
            ..
        }
        | Error::PositiveLogProb {
            array: a,
            at,
            value: v,
        } => {
            array = a.into_pyobject(py)?.into_any().unbind();
            row = at.row.into_pyobject(py)?.into_any().unbind();
            col = at.col.into_pyobject(py)?.into_any().unbind();
            k = at.k.into_pyobject(py)?.into_any().unbind();
            value = v.into_pyobject(py)?.into_any().unbind();
            match e {
                Error::NonFinite { .. } => "NonFinite",
                Error::Negative { .. } => "Negative",
                Error::OutOfRange { .. } => "OutOfRange",
                _ => "PositiveLogProb",
            }
        }
        Error::InvalidConfig { field: f, .. } => {
            field = f.into_pyobject(py)?.into_any().unbind();
            "InvalidConfig"
        }
        Error::CountTooSmall { field: f, .. } => {
            field = f.into_pyobject(py)?.into_any().unbind();
            "CountTooSmall"
        }
        Error::ChunkOutOfOrder { row: r, .. } => {
            row = r.into_pyobject(py)?.into_any().unbind();
            "ChunkOutOfOrder"
        }
        Error::ChunkMismatch { row: r, .. } => {
            row = r.into_pyobject(py)?.into_any().unbind();
            "ChunkMismatch"
        }
        Error::ConfigParse {
            message,
            line: l,
            column: c,
            ..
        } => {
            let (f, h) = parse_message_field(message);
            field = f.into_pyobject(py)?.into_any().unbind();
            hint = h.into_pyobject(py)?.into_any().unbind();
            line = l.into_pyobject(py)?.into_any().unbind();
            column = c.into_pyobject(py)?.into_any().unbind();
            "ConfigParse"
        }
        Error::Io { .. } => "Io",
        _ => "Other",
    };
    for (name, v) in [
        ("array", array),
        ("row", row),
        ("col", col),
        ("k", k),
        ("value", value),
        ("field", field),
        ("hint", hint),
        ("line", line),
        ("column", column),
    ] {
        exc.setattr(name, v)?;
    }
    exc.setattr("kind", kind)
}

/// The field a config parse message names, and its "did you mean" hint, where the
/// message says them: ``config field rule.delta: …`` (a bad value), ``unknown field
/// `detla`, …`` (an unknown field: the name given), ``…; did you mean `delta`?``.
fn parse_message_field(message: &str) -> (Option<String>, Option<String>) {
    let between = |s: &str, open: &str, close: char| -> Option<String> {
        let rest = &s[s.find(open)? + open.len()..];
        Some(rest[..rest.find(close)?].to_string())
    };
    let field = between(message, "config field ", ':')
        .or_else(|| between(message, "unknown field `", '`'))
        .or_else(|| between(message, "missing field `", '`'));
    let hint = between(message, "did you mean `", '`');
    (field, hint)
}

/// The config a Python caller named: `None` for the default ([`Config::cppo`]), JSON
/// text (an object, `{…}`), or a preset's name.
fn parse_config(text: Option<&str>) -> Result<Config, Error> {
    match text {
        None => Ok(Config::cppo()),
        // Untrimmed, so that the error's line and column are the caller's text's.
        Some(t) if t.trim_start().starts_with('{') => Config::from_json(t),
        Some(name) => name.trim().parse::<Preset>().map(Config::preset),
    }
}

/// A (B, L) response mask of any element type the crate accepts, borrowed from numpy.
enum MaskArray<'py> {
    Bool(PyReadonlyArray2<'py, bool>),
    U8(PyReadonlyArray2<'py, u8>),
    I8(PyReadonlyArray2<'py, i8>),
    I16(PyReadonlyArray2<'py, i16>),
    I32(PyReadonlyArray2<'py, i32>),
    I64(PyReadonlyArray2<'py, i64>),
    U16(PyReadonlyArray2<'py, u16>),
    U32(PyReadonlyArray2<'py, u32>),
    U64(PyReadonlyArray2<'py, u64>),
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

/// The one list of mask element types: `$cb!(Variant: type, ...)`.
macro_rules! mask_types {
    ($cb:ident) => {
        $cb!(Bool: bool, U8: u8, I8: i8, I16: i16, I32: i32, I64: i64, U16: u16, U32: u32,
             U64: u64, F32: f32, F64: f64)
    };
}

impl<'py> MaskArray<'py> {
    /// Borrows `obj`, a 2-D numpy array of one of the mask types.
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        macro_rules! try_each {
            ($($v:ident: $t:ty),*) => {
                $( if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, $t>>() {
                    return Ok(Self::$v(a));
                } )*
            };
        }
        mask_types!(try_each);
        Err(PyTypeError::new_err(
            "mask must be a 2-D numpy array of bool, an integer type, float32 or float64",
        ))
    }

    /// The crate's view of it.
    fn view(&self) -> Mask<'_> {
        macro_rules! view {
            ($($v:ident: $t:ty),*) => {
                match self { $( Self::$v(a) => Mask::from(a.as_array()), )* }
            };
        }
        mask_types!(view)
    }
}

/// The advantages, (B,) or (B, L), borrowed from numpy.
enum AdvArray<'py, F: Element> {
    PerRow(PyReadonlyArray1<'py, F>),
    PerToken(PyReadonlyArray2<'py, F>),
}

/// The inputs of one call, as the Python layer passed them (checked there for dtype and
/// number of dimensions; extraction here re-checks both).
struct Inputs<'a, 'py> {
    logp: &'a Bound<'py, PyAny>,
    logp_old: &'a Bound<'py, PyAny>,
    advantages: &'a Bound<'py, PyAny>,
    mask: &'a Bound<'py, PyAny>,
    topk: Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>,
    logp_ref: Option<&'a Bound<'py, PyAny>>,
    is_weights: Option<&'a Bound<'py, PyAny>>,
}

impl<'a, 'py> Inputs<'a, 'py> {
    /// The inputs of a call: `[logp, logp_old, advantages, mask]` and the optional arrays
    /// (the two top-K arrays come together or not at all).
    fn new(
        [logp, logp_old, advantages, mask]: [&'a Bound<'py, PyAny>; 4],
        topk_logp_old: Option<&'a Bound<'py, PyAny>>,
        topk_logp: Option<&'a Bound<'py, PyAny>>,
        logp_ref: Option<&'a Bound<'py, PyAny>>,
        is_weights: Option<&'a Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let topk = match (topk_logp_old, topk_logp) {
            (Some(o), Some(n)) => Some((o, n)),
            (None, None) => None,
            _ => {
                return Err(PyValueError::new_err(
                    "topk_logp_old and topk_logp come together",
                ));
            }
        };
        Ok(Self {
            logp,
            logp_old,
            advantages,
            mask,
            topk,
            logp_ref,
            is_weights,
        })
    }

    /// Whether the float type (logp's) is float32; otherwise float64.
    fn is_f32(&self) -> bool {
        self.logp.extract::<PyReadonlyArray2<'py, f32>>().is_ok()
    }
}

/// Borrows a 2-D float array.
fn view2<'py, F: Element>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray2<'py, F>> {
    obj.extract()
}

/// Borrows the inputs in element type `F`, builds the crate's [`Batch`] over them (the
/// chunk's, for the chunk functions) and runs `f` on it.
fn with_batch<'py, F: Float + Element, T>(
    py: Python<'py>,
    inp: &Inputs<'_, 'py>,
    f: impl FnOnce(&Batch<'_, F>) -> PyResult<T>,
) -> PyResult<T> {
    let logp = view2::<F>(inp.logp)?;
    let logp_old = view2::<F>(inp.logp_old)?;
    let adv = if inp.advantages.extract::<PyReadonlyArray1<'py, F>>().is_ok() {
        AdvArray::PerRow(inp.advantages.extract()?)
    } else {
        AdvArray::PerToken(inp.advantages.extract()?)
    };
    let mask = MaskArray::extract(inp.mask)?;
    let topk = match inp.topk {
        Some((old, new)) => Some((
            old.extract::<PyReadonlyArray3<'py, F>>()?,
            new.extract::<PyReadonlyArray3<'py, F>>()?,
        )),
        None => None,
    };
    let logp_ref = inp.logp_ref.map(view2::<F>).transpose()?;
    let is_weights = inp.is_weights.map(view2::<F>).transpose()?;

    let (lp, lq) = (logp.as_array(), logp_old.as_array());
    let topk_views: Option<(ArrayView3<'_, F>, ArrayView3<'_, F>)> =
        topk.as_ref().map(|(o, n)| (o.as_array(), n.as_array()));
    let ref_view: Option<ArrayView2<'_, F>> = logp_ref.as_ref().map(|a| a.as_array());
    let w_view: Option<ArrayView2<'_, F>> = is_weights.as_ref().map(|a| a.as_array());
    let build = || -> Result<Batch<'_, F>, Error> {
        let mut batch = match &adv {
            AdvArray::PerRow(a) => Batch::new(&lp, &lq, a.as_array(), mask.view())?,
            AdvArray::PerToken(a) => Batch::new(&lp, &lq, a.as_array(), mask.view())?,
        };
        if let Some((o, n)) = &topk_views {
            batch = batch.with_topk(o, n)?;
        }
        if let Some(r) = &ref_view {
            batch = batch.with_logp_ref(r)?;
        }
        if let Some(w) = &w_view {
            batch = batch.with_is_weights(w)?;
        }
        Ok(batch)
    };
    let batch = build().map_err(|e| to_py_err(py, e))?;
    f(&batch)
}

/// Puts the per-token outputs into `d` as numpy arrays that take over the buffers.
fn set_outputs<F: Float + Element>(d: &Bound<'_, PyDict>, o: Outputs<F>) -> PyResult<()> {
    let py = d.py();
    d.set_item("divergence", PyArray2::from_owned_array(py, o.divergence))?;
    d.set_item("weight", PyArray2::from_owned_array(py, o.weight))?;
    d.set_item("threshold", PyArray2::from_owned_array(py, o.threshold))?;
    d.set_item("keep", PyArray2::from_owned_array(py, o.keep))?;
    d.set_item("reason", PyArray2::from_owned_array(py, o.reason))?;
    d.set_item("token_loss", PyArray2::from_owned_array(py, o.token_loss))?;
    d.set_item("grad", PyArray2::from_owned_array(py, o.grad))?;
    d.set_item("delta_b_row", PyArray1::from_owned_array(py, o.delta_b_row))?;
    Ok(())
}

/// Evaluates the batch in element type `F` and builds the result dict: `loss`, the
/// outputs as numpy arrays, `diagnostics` and `tally` as JSON text.
fn evaluate_as<'py, F: Float + Element>(
    py: Python<'py>,
    inp: &Inputs<'_, 'py>,
    cfg: &Config,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    with_batch::<F, _>(py, inp, |batch| {
        let eval: Evaluation<F> = run_on(py, threads, |par| cppo::evaluate(cfg, batch, par))?
            .map_err(|e| to_py_err(py, e))?;
        let d = PyDict::new(py);
        d.set_item("loss", eval.loss)?;
        set_outputs(&d, eval.outputs)?;
        d.set_item("diagnostics", to_json(&eval.diagnostics)?)?;
        d.set_item("tally", to_json(&eval.tally)?)?;
        Ok(d)
    })
}

/// A serde value as JSON text (the Python layer reads it with `json.loads`).
fn to_json(v: &impl serde::Serialize) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `cppo.evaluate`'s native half: the loss, every output and the diagnostics of one
/// batch. `config` is JSON text, a preset's name, or None; the float type is `logp`'s.
#[pyfunction]
#[pyo3(signature = (logp, logp_old, advantages, mask, config=None, topk_logp_old=None,
                    topk_logp=None, logp_ref=None, is_weights=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn evaluate<'py>(
    py: Python<'py>,
    logp: &Bound<'py, PyAny>,
    logp_old: &Bound<'py, PyAny>,
    advantages: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    config: Option<&str>,
    topk_logp_old: Option<&Bound<'py, PyAny>>,
    topk_logp: Option<&Bound<'py, PyAny>>,
    logp_ref: Option<&Bound<'py, PyAny>>,
    is_weights: Option<&Bound<'py, PyAny>>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let inp = Inputs::new(
        [logp, logp_old, advantages, mask],
        topk_logp_old,
        topk_logp,
        logp_ref,
        is_weights,
    )?;
    if inp.is_f32() {
        evaluate_as::<f32>(py, &inp, &cfg, threads)
    } else {
        evaluate_as::<f64>(py, &inp, &cfg, threads)
    }
}

/// `cppo.counts`' native half: (response tokens, sequences with at least one) of a
/// (B, L) mask, the crate's `Batch::counts`.
#[pyfunction]
fn counts(py: Python<'_>, mask: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
    let mask = MaskArray::extract(mask)?;
    let m = mask.view();
    let (b, l) = m.dim();
    // The counts read the mask alone: zeros broadcast to (B, L) stand in for the rest.
    let zero = cppo::ndarray::arr0(0.0f64);
    let lp = zero
        .broadcast((b, l))
        .expect("a 0-d array broadcasts to any shape");
    let adv = zero
        .broadcast(b)
        .expect("a 0-d array broadcasts to any shape");
    let c = py
        .detach(|| Batch::new(&lp, &lp, adv, m)?.counts())
        .map_err(|e| to_py_err(py, e))?;
    Ok((c.tokens, c.seqs))
}

/// Each preset's (name, one-line description), in the crate's order.
#[pyfunction]
fn presets() -> Vec<(&'static str, &'static str)> {
    Preset::ALL
        .iter()
        .map(|p| (p.name(), p.description()))
        .collect()
}

/// The config `config` names (as [`evaluate`] reads it), as JSON text with every field.
#[pyfunction]
#[pyo3(signature = (config=None))]
fn resolve_config(py: Python<'_>, config: Option<&str>) -> PyResult<String> {
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    to_json(&cfg)
}

/// A [`cppo::Tally`] from the JSON [`to_json`] wrote. JSON has no infinity: the two
/// minima that are +∞ in a tally with nothing to take the minimum of (`ratio_min`,
/// `budget_min`; every other field is finite) are written as `null`, and read back here.
fn tally_from_json(text: &str) -> serde_json::Result<cppo::Tally> {
    const EMPTY_MINIMA: [&str; 2] = ["ratio_min", "budget_min"];
    let mut v: serde_json::Value = serde_json::from_str(text)?;
    let mut empty = [false; 2];
    if let Some(obj) = v.as_object_mut() {
        for (key, was_null) in EMPTY_MINIMA.iter().zip(&mut empty) {
            if obj.get(*key).is_some_and(serde_json::Value::is_null) {
                obj.insert((*key).to_string(), 0.0.into());
                *was_null = true;
            }
        }
    }
    let mut t: cppo::Tally = serde_json::from_value(v)?;
    if empty[0] {
        t.ratio_min = f64::INFINITY;
    }
    if empty[1] {
        t.budget_min = f64::INFINITY;
    }
    Ok(t)
}

/// The diagnostics of merged tallies (JSON texts of `cppo::Tally`, in row order), for
/// shards of one batch: the crate's `Tally::merge` then `Diagnostics::new`.
#[pyfunction]
#[pyo3(signature = (tallies, config=None))]
fn merge_tallies(
    py: Python<'_>,
    tallies: &Bound<'_, PyList>,
    config: Option<&str>,
) -> PyResult<(String, String)> {
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let mut total = cppo::Tally::default();
    for (i, t) in tallies.iter().enumerate() {
        let text: String = t.extract()?;
        let t =
            tally_from_json(&text).map_err(|e| PyValueError::new_err(format!("tally {i}: {e}")))?;
        total = total.merge(&t);
    }
    Ok((
        to_json(&cppo::Diagnostics::new(&total, &cfg))?,
        to_json(&total)?,
    ))
}

// ---------------------------------------------------------------------------------------
// Column chunks (context parallelism): the crate's `cppo::chunk` API.

/// A `CppoError` of kind `Decode`: bytes that are not what `to_bytes` wrote, or that the
/// crate's checks refuse (every other attribute None).
fn decode_err(py: Python<'_>, what: &str, e: impl std::fmt::Display) -> PyErr {
    let err = CppoError::new_err(format!("cannot read {what} from these bytes: {e}"));
    let v = err.value(py);
    for name in [
        "array", "row", "col", "k", "value", "field", "hint", "line", "column",
    ] {
        if let Err(set) = v.setattr(name, py.None()) {
            return set;
        }
    }
    if let Err(set) = v.setattr("kind", "Decode") {
        return set;
    }
    err
}

/// The bytes of `v`: `magic` then the bincode (standard config) of the crate's serde
/// form. The magic keeps one kind of object from being read as another.
fn encode<T: serde::Serialize>(magic: &[u8], v: &T) -> PyResult<Vec<u8>> {
    let mut out = magic.to_vec();
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard())
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(out)
}

/// Reads what [`encode`] wrote; the crate's deserializers check the values.
fn decode<T: serde::de::DeserializeOwned>(
    py: Python<'_>,
    what: &str,
    magic: &[u8],
    data: &[u8],
) -> PyResult<T> {
    let body = data
        .strip_prefix(magic)
        .ok_or_else(|| decode_err(py, what, "they do not start with its header"))?;
    let (v, read) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| decode_err(py, what, e))?;
    if read != body.len() {
        return Err(decode_err(
            py,
            what,
            format!("{} bytes left over", body.len() - read),
        ));
    }
    Ok(v)
}

/// A length check between per-row objects, as the crate's `ShapeMismatch`.
fn check_rows(py: Python<'_>, array: &'static str, got: usize, rows: usize) -> PyResult<()> {
    if got == rows {
        return Ok(());
    }
    Err(to_py_err(
        py,
        Error::ShapeMismatch {
            array,
            expected: format!("({rows},), one per row"),
            got: vec![got],
        },
    ))
}

const PARTIALS_MAGIC: &[u8] = b"cppo.RowPartials\x01";
const CARRIES_MAGIC: &[u8] = b"cppo.Carries\x01";

/// One [`RowPartial`] per row of a chunk (the crate's `chunk::row_partials`):
/// mergeable, picklable (`to_bytes` / `from_bytes`).
#[pyclass(module = "cppo._cppo", frozen, eq)]
#[derive(Clone, PartialEq)]
struct RowPartials(Vec<RowPartial>);

#[pymethods]
impl RowPartials {
    /// `rows` empty partials (`RowPartial::default()`), the identity of `merge`.
    #[new]
    fn new(rows: usize) -> Self {
        Self(vec![RowPartial::default(); rows])
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Each row's response tokens (`RowPartial::tokens`).
    #[getter]
    fn tokens(&self) -> Vec<u64> {
        self.0.iter().map(RowPartial::tokens).collect()
    }

    /// Row by row, the partials of both pieces (`RowPartial::merge`: exact, in any order
    /// and grouping).
    fn merge(&self, py: Python<'_>, other: &Self) -> PyResult<Self> {
        check_rows(py, "partials", other.0.len(), self.0.len())?;
        Ok(Self(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(a, b)| a.merge(b))
                .collect(),
        ))
    }

    /// The partials as bytes, for `from_bytes` in this or another process.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &encode(PARTIALS_MAGIC, &self.0)?))
    }

    /// The partials `to_bytes` wrote (checked by the crate as they are read).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        decode(py, "RowPartials", PARTIALS_MAGIC, data).map(Self)
    }

    /// Pickling: through `to_bytes` and `from_bytes`.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let from = slf.get_type().getattr("from_bytes")?;
        Ok((from, (slf.get().to_bytes(slf.py())?,)))
    }

    fn __repr__(&self) -> String {
        format!(
            "RowPartials(rows={}, tokens={:?})",
            self.0.len(),
            self.tokens()
        )
    }
}

/// Each row's [`WholeRow`] (the crate's `chunk::whole_rows`): what every chunk of the
/// row reads. Built on each rank from the gathered partials; not picklable (the crate's
/// `WholeRow` has no wire form: send the partials and divergences instead).
#[pyclass(module = "cppo._cppo", frozen)]
struct WholeRows(Vec<WholeRow>);

#[pymethods]
impl WholeRows {
    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// T, each row's response tokens (`WholeRow::tokens`).
    #[getter]
    fn tokens(&self) -> Vec<u64> {
        self.0.iter().map(WholeRow::tokens).collect()
    }

    /// δ_b^row of each row, or None where the rule has no budget (`WholeRow::delta_b_row`).
    #[getter]
    fn delta_b_row(&self) -> Vec<Option<f64>> {
        self.0.iter().map(WholeRow::delta_b_row).collect()
    }

    /// (N_tok, N_seq) of the whole rows (the crate's `chunk::row_counts`).
    fn counts(&self) -> (u64, u64) {
        let c = chunk::row_counts(&self.0);
        (c.tokens, c.seqs)
    }

    /// Refuses: a `WholeRow` has no wire form.
    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(
            "WholeRows cannot be pickled: send the RowPartials (and the divergences) and \
             call whole_rows on each rank",
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "WholeRows(rows={}, tokens={:?})",
            self.0.len(),
            self.tokens()
        )
    }
}

/// Each row's [`Carry`] between column chunks: what a chunk hands the next one.
/// Immutable (`evaluate_chunk` returns new carries), picklable (`to_bytes` / `from_bytes`).
#[pyclass(module = "cppo._cppo", frozen, eq)]
#[derive(Clone, PartialEq)]
struct Carries(Vec<Carry>);

#[pymethods]
impl Carries {
    /// The carries before a row's first chunk (`Carry::default()`), for `rows` rows.
    #[new]
    fn new(rows: usize) -> Self {
        Self(vec![Carry::default(); rows])
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// The column each row's next chunk must start at (`Carry::col`).
    #[getter]
    fn col(&self) -> Vec<usize> {
        self.0.iter().map(Carry::col).collect()
    }

    /// The response tokens each row's chunks held so far (`Carry::tokens`).
    #[getter]
    fn tokens(&self) -> Vec<usize> {
        self.0.iter().map(Carry::tokens).collect()
    }

    /// After the last chunk: checks that every row's chunks covered its `width` columns
    /// and all its response tokens (`Carry::finish`).
    fn finish(&self, py: Python<'_>, rows: &WholeRows, width: usize) -> PyResult<()> {
        check_rows(py, "rows", rows.0.len(), self.0.len())?;
        for (i, (c, r)) in self.0.iter().zip(&rows.0).enumerate() {
            c.finish(i, r, width).map_err(|e| to_py_err(py, e))?;
        }
        Ok(())
    }

    /// The carries as bytes, for `from_bytes` in this or another process.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &encode(CARRIES_MAGIC, &self.0)?))
    }

    /// The carries `to_bytes` wrote (checked by the crate as they are read).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        decode(py, "Carries", CARRIES_MAGIC, data).map(Self)
    }

    /// Pickling: through `to_bytes` and `from_bytes`.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let from = slf.get_type().getattr("from_bytes")?;
        Ok((from, (slf.get().to_bytes(slf.py())?,)))
    }

    fn __repr__(&self) -> String {
        format!("Carries(rows={}, col={:?})", self.0.len(), self.col())
    }
}

/// `cppo.chunk.needs_divergences`: whether the config's chunks need the gathered
/// divergences for their whole rows (a calibrated CPPO budget).
#[pyfunction]
#[pyo3(signature = (config=None))]
fn needs_divergences(py: Python<'_>, config: Option<&str>) -> PyResult<bool> {
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    Ok(chunk::needs_divergences(&cfg))
}

/// `cppo.chunk.row_partials`' native half: the chunk's [`RowPartials`]
/// (`chunk::row_partials`); the chunk sits at `col0` of rows `width` columns wide.
#[pyfunction]
#[pyo3(signature = (logp, logp_old, advantages, mask, col0, width, config=None,
                    topk_logp_old=None, topk_logp=None, logp_ref=None, is_weights=None,
                    threads=None))]
#[allow(clippy::too_many_arguments)]
fn row_partials<'py>(
    py: Python<'py>,
    logp: &Bound<'py, PyAny>,
    logp_old: &Bound<'py, PyAny>,
    advantages: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    col0: usize,
    width: usize,
    config: Option<&str>,
    topk_logp_old: Option<&Bound<'py, PyAny>>,
    topk_logp: Option<&Bound<'py, PyAny>>,
    logp_ref: Option<&Bound<'py, PyAny>>,
    is_weights: Option<&Bound<'py, PyAny>>,
    threads: Option<usize>,
) -> PyResult<RowPartials> {
    fn go<F: Float + Element>(
        py: Python<'_>,
        inp: &Inputs<'_, '_>,
        cfg: &Config,
        pos: ChunkPos,
        threads: Option<usize>,
    ) -> PyResult<RowPartials> {
        with_batch::<F, _>(py, inp, |batch| {
            run_on(py, threads, |par| chunk::row_partials(cfg, batch, pos, par))?
                .map(RowPartials)
                .map_err(|e| to_py_err(py, e))
        })
    }
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let inp = Inputs::new(
        [logp, logp_old, advantages, mask],
        topk_logp_old,
        topk_logp,
        logp_ref,
        is_weights,
    )?;
    let pos = ChunkPos { col0, width };
    if inp.is_f32() {
        go::<f32>(py, &inp, &cfg, pos, threads)
    } else {
        go::<f64>(py, &inp, &cfg, pos, threads)
    }
}

/// `cppo.chunk.divergences`' native half: the chunk's D_t, (B, Lc) float64, NaN off the
/// response tokens (`chunk::divergences_into`).
#[pyfunction]
#[pyo3(signature = (logp, logp_old, advantages, mask, col0, width, config=None,
                    topk_logp_old=None, topk_logp=None, logp_ref=None, is_weights=None,
                    threads=None))]
#[allow(clippy::too_many_arguments)]
fn divergences<'py>(
    py: Python<'py>,
    logp: &Bound<'py, PyAny>,
    logp_old: &Bound<'py, PyAny>,
    advantages: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    col0: usize,
    width: usize,
    config: Option<&str>,
    topk_logp_old: Option<&Bound<'py, PyAny>>,
    topk_logp: Option<&Bound<'py, PyAny>>,
    logp_ref: Option<&Bound<'py, PyAny>>,
    is_weights: Option<&Bound<'py, PyAny>>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    fn go<'py, F: Float + Element>(
        py: Python<'py>,
        inp: &Inputs<'_, 'py>,
        cfg: &Config,
        pos: ChunkPos,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        with_batch::<F, _>(py, inp, |batch| {
            let mut out = cppo::ndarray::Array2::<f64>::zeros(batch.shape());
            run_on(py, threads, |par| {
                chunk::divergences_into(cfg, batch, pos, out.view_mut(), par)
            })?
            .map_err(|e| to_py_err(py, e))?;
            Ok(PyArray2::from_owned_array(py, out))
        })
    }
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let inp = Inputs::new(
        [logp, logp_old, advantages, mask],
        topk_logp_old,
        topk_logp,
        logp_ref,
        is_weights,
    )?;
    let pos = ChunkPos { col0, width };
    if inp.is_f32() {
        go::<f32>(py, &inp, &cfg, pos, threads)
    } else {
        go::<f64>(py, &inp, &cfg, pos, threads)
    }
}

/// `cppo.chunk.whole_rows`' native half: [`WholeRows`] from the merged partials and,
/// for a calibrated budget, the gathered (B, L) float64 divergences (`chunk::whole_rows`).
#[pyfunction]
#[pyo3(signature = (partials, divergences=None, config=None))]
fn whole_rows(
    py: Python<'_>,
    partials: &RowPartials,
    divergences: Option<PyReadonlyArray2<'_, f64>>,
    config: Option<&str>,
) -> PyResult<WholeRows> {
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let d = divergences.as_ref().map(|d| d.as_array());
    chunk::whole_rows(&cfg, &partials.0, d)
        .map(WholeRows)
        .map_err(|e| to_py_err(py, e))
}

/// `cppo.chunk.evaluate_chunk`'s native half: one column chunk
/// (`chunk::evaluate_chunk_into`) from the rows' [`WholeRows`] and the incoming
/// [`Carries`]. Returns the result dict (as `evaluate`'s, for the chunk's columns) and
/// the outgoing carries; the incoming ones are left as they were.
#[pyfunction]
#[pyo3(signature = (logp, logp_old, advantages, mask, col0, width, rows, carries, config=None,
                    topk_logp_old=None, topk_logp=None, logp_ref=None, is_weights=None,
                    threads=None))]
#[allow(clippy::too_many_arguments)]
fn evaluate_chunk<'py>(
    py: Python<'py>,
    logp: &Bound<'py, PyAny>,
    logp_old: &Bound<'py, PyAny>,
    advantages: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    col0: usize,
    width: usize,
    rows: &WholeRows,
    carries: &Carries,
    config: Option<&str>,
    topk_logp_old: Option<&Bound<'py, PyAny>>,
    topk_logp: Option<&Bound<'py, PyAny>>,
    logp_ref: Option<&Bound<'py, PyAny>>,
    is_weights: Option<&Bound<'py, PyAny>>,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyDict>, Carries)> {
    struct Call<'a> {
        cfg: &'a Config,
        pos: ChunkPos,
        rows: &'a [WholeRow],
        carries: &'a [Carry],
        threads: Option<usize>,
    }
    fn go<'py, F: Float + Element>(
        py: Python<'py>,
        inp: &Inputs<'_, 'py>,
        c: &Call<'_>,
    ) -> PyResult<(Bound<'py, PyDict>, Carries)> {
        with_batch::<F, _>(py, inp, |batch| {
            let mut carries = c.carries.to_vec();
            let mut out = Outputs::<F>::zeros(batch.shape());
            let s = run_on(py, c.threads, |par| {
                chunk::evaluate_chunk_into(
                    c.cfg,
                    batch,
                    c.pos,
                    c.rows,
                    &mut carries,
                    out.view_mut(),
                    par,
                )
            })?
            .map_err(|e| to_py_err(py, e))?;
            let d = PyDict::new(py);
            d.set_item("loss", s.loss)?;
            set_outputs(&d, out)?;
            d.set_item("diagnostics", to_json(&s.diagnostics)?)?;
            d.set_item("tally", to_json(&s.tally)?)?;
            Ok((d, Carries(carries)))
        })
    }
    let cfg = parse_config(config).map_err(|e| to_py_err(py, e))?;
    let inp = Inputs::new(
        [logp, logp_old, advantages, mask],
        topk_logp_old,
        topk_logp,
        logp_ref,
        is_weights,
    )?;
    let call = Call {
        cfg: &cfg,
        pos: ChunkPos { col0, width },
        rows: &rows.0,
        carries: &carries.0,
        threads,
    };
    if inp.is_f32() {
        go::<f32>(py, &inp, &call)
    } else {
        go::<f64>(py, &inp, &call)
    }
}

/// The address of the first element of the view the crate reads for a 2-D float32 or
/// float64 array (for the zero-copy test: it equals the array's own data pointer).
#[pyfunction]
fn _view_address(a: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(v) = a.extract::<PyReadonlyArray2<'_, f32>>() {
        Ok(v.as_array().as_ptr() as usize)
    } else {
        Ok(view2::<f64>(a)?.as_array().as_ptr() as usize)
    }
}

/// The native module, `cppo._cppo`.
#[pymodule]
fn _cppo(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CppoError", m.py().get_type::<CppoError>())?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(counts, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_config, m)?)?;
    m.add_function(wrap_pyfunction!(merge_tallies, m)?)?;
    m.add_function(wrap_pyfunction!(_view_address, m)?)?;
    m.add_class::<RowPartials>()?;
    m.add_class::<WholeRows>()?;
    m.add_class::<Carries>()?;
    m.add_function(wrap_pyfunction!(needs_divergences, m)?)?;
    m.add_function(wrap_pyfunction!(row_partials, m)?)?;
    m.add_function(wrap_pyfunction!(divergences, m)?)?;
    m.add_function(wrap_pyfunction!(whole_rows, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_chunk, m)?)?;
    m.add("instruction_set", cppo::engine::instruction_set())?;
    Ok(())
}
