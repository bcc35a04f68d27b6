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

use cppo::ndarray::{ArrayView2, ArrayView3};
use cppo::{Batch, Config, Error, Evaluation, Float, Mask, Par, Preset};
use numpy::{Element, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

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

/// Borrows a 2-D float array.
fn view2<'py, F: Element>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray2<'py, F>> {
    obj.extract()
}

/// Evaluates the batch in element type `F` and builds the result dict: `loss`, the
/// outputs as numpy arrays, `diagnostics` and `tally` as JSON text, `tokens`, `seqs`.
fn evaluate_as<'py, F: Float + Element>(
    py: Python<'py>,
    inp: &Inputs<'_, 'py>,
    cfg: &Config,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
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
    let eval: Evaluation<F> = run_on(py, threads, |par| cppo::evaluate(cfg, &batch, par))?
        .map_err(|e| to_py_err(py, e))?;

    let o = eval.outputs;
    let d = PyDict::new(py);
    d.set_item("loss", eval.loss)?;
    d.set_item("divergence", PyArray2::from_owned_array(py, o.divergence))?;
    d.set_item("weight", PyArray2::from_owned_array(py, o.weight))?;
    d.set_item("threshold", PyArray2::from_owned_array(py, o.threshold))?;
    d.set_item("keep", PyArray2::from_owned_array(py, o.keep))?;
    d.set_item("reason", PyArray2::from_owned_array(py, o.reason))?;
    d.set_item("token_loss", PyArray2::from_owned_array(py, o.token_loss))?;
    d.set_item("grad", PyArray2::from_owned_array(py, o.grad))?;
    d.set_item("delta_b_row", PyArray1::from_owned_array(py, o.delta_b_row))?;
    d.set_item("diagnostics", to_json(&eval.diagnostics)?)?;
    d.set_item("tally", to_json(&eval.tally)?)?;
    Ok(d)
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
    let topk = match (topk_logp_old, topk_logp) {
        (Some(o), Some(n)) => Some((o, n)),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "topk_logp_old and topk_logp come together",
            ));
        }
    };
    let inp = Inputs {
        logp,
        logp_old,
        advantages,
        mask,
        topk,
        logp_ref,
        is_weights,
    };
    if logp.extract::<PyReadonlyArray2<'py, f32>>().is_ok() {
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
    m.add("instruction_set", cppo::engine::instruction_set())?;
    Ok(())
}
