//! A batch read from a file for `cppo eval` and `cppo inspect`: an `.npz` archive (read
//! by [`crate::npz`]) or a `.safetensors` file holding the same tensors by the same names.
//!
//! # Safetensors
//!
//! The file is read whole and parsed by the `safetensors` crate, which checks the header
//! (its length, its JSON, every tensor's offsets against the data that follows). Tensors
//! are little-endian and C-ordered by the format's definition. The dtypes accepted are
//! those of the npz reader: `F32` or `F64` for the float tensors (one type for all of
//! them, that of `logp`); `BOOL`, `U8`, `I8` to `I64`, `U16` to `U64`, `F32` or `F64` for
//! `mask` (nonzero = response token). `F16` and `BF16` are refused with a hint: a trainer
//! computes log-probs in float32, so `.float()` them before saving.
//!
//! Which arrays are read depends on the configs: the top-K pair only when a config's
//! divergence needs it, `logp_ref` only when a config has a KL penalty; `is_weights`
//! whenever the file holds it (it multiplies every objective). Others are ignored.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array, Array2, Array3, ArrayD, Dimension, Ix1, Ix2, Ix3, IxDyn};
use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Batch, Config};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::failure::{Failure, chain};
use crate::npz::{ALWAYS, FloatArray, Input, NpyFloat, OwnedAdvantages, OwnedMask};

/// The input arrays the configs use, owned, in one float type `F`.
pub struct Arrays<F> {
    pub logp: Array2<F>,
    pub logp_old: Array2<F>,
    pub advantages: OwnedAdvantages<F>,
    pub mask: OwnedMask,
    pub topk: Option<(Array3<F>, Array3<F>)>,
    pub logp_ref: Option<Array2<F>>,
    pub is_weights: Option<Array2<F>>,
}

impl<F: NpyFloat> Arrays<F> {
    /// The shape-checked batch view.
    pub fn batch(&self) -> cppo::Result<Batch<'_, F>> {
        let mut batch = Batch::new(
            &self.logp,
            &self.logp_old,
            self.advantages.view(),
            self.mask.view(),
        )?;
        if let Some((old, new)) = &self.topk {
            batch = batch.with_topk(old, new)?;
        }
        if let Some(r) = &self.logp_ref {
            batch = batch.with_logp_ref(r)?;
        }
        if let Some(w) = &self.is_weights {
            batch = batch.with_is_weights(w)?;
        }
        Ok(batch)
    }

    /// The advantage of each row, when the advantages are given per row.
    pub fn row_advantages(&self) -> Option<Vec<f64>> {
        match &self.advantages {
            OwnedAdvantages::PerRow(a) => Some(a.iter().map(|x| x.to_f64()).collect()),
            OwnedAdvantages::PerToken(_) => None,
        }
    }
}

/// A batch in whichever float type its file holds.
pub enum Loaded {
    F32(Arrays<f32>),
    F64(Arrays<f64>),
}

/// What the configs need beyond the four required arrays.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// The divergence that needs the top-K pair, if any config's does.
    pub topk: Option<cppo::Divergence>,
    /// Whether a config has a KL penalty (which reads `logp_ref`).
    pub logp_ref: bool,
}

impl Needs {
    pub fn of(configs: &[Config]) -> Self {
        Self {
            topk: configs
                .iter()
                .map(|c| c.divergence)
                .find(|d| d.needs_topk()),
            logp_ref: configs.iter().any(|c| c.kl.is_some()),
        }
    }
}

/// The file formats `cppo inspect` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Npz,
    Safetensors,
}

impl Format {
    /// `.safetensors` by its extension; anything else is read as an npz archive (whose
    /// reader says so if it is not one).
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("safetensors") => Self::Safetensors,
            _ => Self::Npz,
        }
    }
}

/// Reads a batch file.
pub fn load(path: &Path, needs: Needs) -> Result<Loaded, Failure> {
    match Format::of(path) {
        Format::Npz => read_from(&mut Input::open(path)?, needs),
        Format::Safetensors => read_from(&mut StInput::open(path)?, needs),
    }
}

/// The quickstart's batch (`examples/quickstart.rs`): `cppo::synth`, 64 rows × 512
/// slots, seed 0, float32.
pub fn demo(needs: Needs) -> Loaded {
    let spec = demo_spec(needs);
    let d = SyntheticBatch::<f32>::generate(&spec);
    Loaded::F32(Arrays {
        logp: d.logp,
        logp_old: d.logp_old,
        advantages: OwnedAdvantages::PerRow(d.advantages),
        mask: OwnedMask::Bool(d.mask),
        topk: d.topk_logp_old.zip(d.topk_logp),
        logp_ref: d.logp_ref,
        is_weights: None,
    })
}

/// The demo's generator settings; the top-K pair (K = 8) and `logp_ref` are generated
/// only when a config needs them (they do not change the other arrays).
pub fn demo_spec(needs: Needs) -> SynthSpec {
    SynthSpec {
        rows: 64,
        len: 512,
        topk: needs.topk.map(|_| 8),
        with_ref: needs.logp_ref,
        ..SynthSpec::default()
    }
}

/// A source of named arrays: an npz archive or a safetensors file.
trait Source {
    /// Whether the file holds an array of this name.
    fn has(&self, name: &str) -> bool;
    fn logp(&mut self) -> Result<FloatArray, Failure>;
    fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure>;
    fn advantages<F: NpyFloat>(&mut self) -> Result<OwnedAdvantages<F>, Failure>;
    fn mask(&mut self) -> Result<OwnedMask, Failure>;
}

impl Source for Input {
    fn has(&self, name: &str) -> bool {
        Input::has(self, name)
    }
    fn logp(&mut self) -> Result<FloatArray, Failure> {
        Input::logp(self)
    }
    fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure> {
        Input::float(self, name, needed_by, expected)
    }
    fn advantages<F: NpyFloat>(&mut self) -> Result<OwnedAdvantages<F>, Failure> {
        Input::advantages(self)
    }
    fn mask(&mut self) -> Result<OwnedMask, Failure> {
        Input::mask(self)
    }
}

fn read_from(src: &mut impl Source, needs: Needs) -> Result<Loaded, Failure> {
    Ok(match src.logp()? {
        FloatArray::F32(logp) => Loaded::F32(read_rest(src, logp, needs)?),
        FloatArray::F64(logp) => Loaded::F64(read_rest(src, logp, needs)?),
    })
}

fn read_rest<F: NpyFloat>(
    src: &mut impl Source,
    logp: Array2<F>,
    needs: Needs,
) -> Result<Arrays<F>, Failure> {
    const BL: &str = "(B, L)";
    const BLK: &str = "(B, L, K)";
    let logp_old = src.float::<F, Ix2>("logp_old", ALWAYS, BL)?;
    let advantages = src.advantages()?;
    let mask = src.mask()?;
    let topk = match needs.topk {
        Some(d) => {
            let by = format!("divergence {}", d.name());
            let old = src.float::<F, Ix3>("topk_logp_old", &by, BLK)?;
            let new = src.float::<F, Ix3>("topk_logp", &by, BLK)?;
            Some((old, new))
        }
        None => None,
    };
    let logp_ref = if needs.logp_ref {
        Some(src.float::<F, Ix2>("logp_ref", "the kl penalty", BL)?)
    } else {
        None
    };
    let is_weights = if src.has("is_weights") {
        Some(src.float::<F, Ix2>("is_weights", ALWAYS, BL)?)
    } else {
        None
    };
    Ok(Arrays {
        logp,
        logp_old,
        advantages,
        mask,
        topk,
        logp_ref,
        is_weights,
    })
}

// ---------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------

/// An open safetensors file: its bytes and, by name, each tensor's dtype, shape and byte
/// range (checked against the file by the `safetensors` crate).
struct StInput {
    path: PathBuf,
    bytes: Vec<u8>,
    tensors: HashMap<String, StTensor>,
}

struct StTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl StInput {
    fn open(path: &Path) -> Result<Self, Failure> {
        let cannot_open = |e| Failure::input(format!("cannot open input {}", path.display()), &e);
        let meta = fs::metadata(path).map_err(cannot_open)?;
        if meta.is_dir() {
            return Err(Failure::Input(format!(
                "input {} is a directory",
                path.display()
            )));
        }
        let bytes = fs::read(path).map_err(cannot_open)?;
        let tensors = {
            let st = SafeTensors::deserialize(&bytes).map_err(|e| {
                Failure::Input(format!(
                    "input {} is not a readable safetensors file: {}",
                    path.display(),
                    chain(&e)
                ))
            })?;
            let base = bytes.as_ptr() as usize;
            st.iter()
                .map(|(name, view)| {
                    let data = view.data();
                    let start = data.as_ptr() as usize - base;
                    let tensor = StTensor {
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    };
                    (name.to_string(), tensor)
                })
                .collect()
        };
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            tensors,
        })
    }

    fn fail(&self, msg: impl fmt::Display) -> Failure {
        Failure::Input(format!("{}: {msg}", self.path.display()))
    }

    fn tensor(&self, name: &'static str, needed_by: &str) -> Result<&StTensor, Failure> {
        self.tensors.get(name).ok_or_else(|| {
            self.fail(format_args!(
                "array {name} is missing; it is required by {needed_by}"
            ))
        })
    }

    fn dtype_error(&self, name: &str, dtype: StDtype, expected: &str) -> Failure {
        let hint = if matches!(dtype, StDtype::F16 | StDtype::BF16) {
            " (convert with .float() before saving)"
        } else {
            ""
        };
        self.fail(format_args!(
            "array {name} has dtype {dtype:?}, expected {expected}{hint}"
        ))
    }

    /// Decodes a tensor as elements `S` (little-endian, `size` bytes each), mapped to
    /// `T`, with `D`'s number of dimensions.
    fn read<S, T, D: Dimension>(
        &self,
        name: &'static str,
        t: &StTensor,
        size: usize,
        decode: impl Fn(&[u8]) -> S,
        map: impl Fn(S) -> T,
        expected: &str,
    ) -> Result<Array<T, D>, Failure> {
        if D::NDIM.is_some_and(|n| n != t.shape.len()) {
            return Err(shape_error(&self.path, name, &t.shape, expected));
        }
        // The crate has checked that the byte range holds exactly the shape's elements.
        let data: Vec<T> = self.bytes[t.start..t.end]
            .chunks_exact(size)
            .map(|b| map(decode(b)))
            .collect();
        ArrayD::from_shape_vec(IxDyn(&t.shape), data)
            .and_then(ArrayD::into_dimensionality)
            .map_err(|e| self.fail(format_args!("cannot read array {name}: {e}")))
    }
}

fn shape_error(path: &Path, name: &'static str, shape: &[usize], expected: &str) -> Failure {
    let err = cppo::Error::ShapeMismatch {
        array: name,
        expected: expected.to_string(),
        got: shape.to_vec(),
    };
    Failure::Input(format!("{}: {err}", path.display()))
}

fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes(b.try_into().unwrap_or_default())
}
fn f64_le(b: &[u8]) -> f64 {
    f64::from_le_bytes(b.try_into().unwrap_or_default())
}

/// Nonzero = response token, from `N` little-endian bytes.
fn nonzero_le<const N: usize>(b: &[u8]) -> u8 {
    u8::from(b.iter().take(N).any(|&x| x != 0))
}

fn id<T>(x: T) -> T {
    x
}

/// Reads a float tensor of type `F` (which must be `f32` or `f64`).
fn st_float<F: NpyFloat, D: Dimension>(
    st: &StInput,
    name: &'static str,
    t: &StTensor,
    expected: &str,
) -> Result<Array<F, D>, Failure> {
    // F is f32 or f64 (NpyFloat is implemented for nothing else); dispatch on its size.
    match (F::NPY, t.dtype) {
        (crate::npz::Dtype::F32, StDtype::F32) => {
            st.read(name, t, 4, f32_le, |x| F::from_f64(f64::from(x)), expected)
        }
        (crate::npz::Dtype::F64, StDtype::F64) => {
            st.read(name, t, 8, f64_le, F::from_f64, expected)
        }
        _ => Err(st.dtype_error(
            name,
            t.dtype,
            &format!(
                "{}, the type of logp (all float arrays must have one type)",
                F::DTYPE
            ),
        )),
    }
}

impl Source for StInput {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn logp(&mut self) -> Result<FloatArray, Failure> {
        let t = self.tensor("logp", ALWAYS)?;
        const BL: &str = "(B, L)";
        match t.dtype {
            StDtype::F32 => Ok(FloatArray::F32(self.read(
                "logp",
                t,
                4,
                f32_le,
                |x| x,
                BL,
            )?)),
            StDtype::F64 => Ok(FloatArray::F64(self.read(
                "logp",
                t,
                8,
                f64_le,
                |x| x,
                BL,
            )?)),
            d => Err(self.dtype_error("logp", d, "float32 or float64")),
        }
    }

    fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure> {
        let t = self.tensor(name, needed_by)?;
        st_float(self, name, t, expected)
    }

    fn advantages<F: NpyFloat>(&mut self) -> Result<OwnedAdvantages<F>, Failure> {
        const NAME: &str = "advantages";
        const SHAPES: &str = "(B,) or (B, L)";
        let t = self.tensor(NAME, ALWAYS)?;
        match t.shape.len() {
            1 => st_float::<F, Ix1>(self, NAME, t, SHAPES).map(OwnedAdvantages::PerRow),
            2 => st_float::<F, Ix2>(self, NAME, t, SHAPES).map(OwnedAdvantages::PerToken),
            _ => Err(shape_error(&self.path, NAME, &t.shape, SHAPES)),
        }
    }

    fn mask(&mut self) -> Result<OwnedMask, Failure> {
        const BL: &str = "(B, L)";
        const NAME: &str = "mask";
        let t = self.tensor(NAME, ALWAYS)?;
        Ok(match t.dtype {
            StDtype::BOOL => OwnedMask::Bool(self.read(NAME, t, 1, |b| b[0] != 0, id, BL)?),
            StDtype::U8 => OwnedMask::U8(self.read(NAME, t, 1, |b| b[0], id, BL)?),
            StDtype::F32 => OwnedMask::F32(self.read(NAME, t, 4, f32_le, id, BL)?),
            StDtype::F64 => OwnedMask::F64(self.read(NAME, t, 8, f64_le, id, BL)?),
            StDtype::I8 => OwnedMask::U8(self.read(NAME, t, 1, nonzero_le::<1>, id, BL)?),
            StDtype::I16 | StDtype::U16 => {
                OwnedMask::U8(self.read(NAME, t, 2, nonzero_le::<2>, id, BL)?)
            }
            StDtype::I32 | StDtype::U32 => {
                OwnedMask::U8(self.read(NAME, t, 4, nonzero_le::<4>, id, BL)?)
            }
            StDtype::I64 | StDtype::U64 => {
                OwnedMask::U8(self.read(NAME, t, 8, nonzero_le::<8>, id, BL)?)
            }
            d => {
                return Err(self.dtype_error(NAME, d, "BOOL, an integer type, float32 or float64"));
            }
        })
    }
}
