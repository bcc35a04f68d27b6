//! Reading the input `.npz` and writing the output `.npz` of `cppo eval`.
//!
//! ndarray-npy reads an array only as the exact element type its header declares. The
//! reader therefore tries the accepted types in turn, and moves to the next type only
//! when the error is a dtype mismatch; any other error (a truncated entry, a bad header)
//! is reported at once. A dtype no accepted type matches is reported with the dtype the
//! file declares.
//!
//! Accepted dtypes:
//! - float arrays: float32 or float64, one type for all of them (that of `logp`);
//! - `mask`: bool, uint8, any other integer type, float32 or float64. Integer masks are
//!   read as "nonzero = response token" and handed to the library as `u8`.
//!
//! Shapes are checked here only for the number of dimensions; [`cppo::Batch`] checks
//! the rest.

use std::fs::File;
use std::io::{BufReader, Seek, Write};
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array, Array1, Array2, ArrayD, Dimension, arr0};
use cppo::{Advantages, Evaluation, Mask};
use ndarray_npy::{
    NpzReader, NpzWriter, ReadNpyError, ReadNpzError, ReadableElement, WritableElement,
    WriteNpzError,
};

use crate::failure::{Failure, chain};

/// A float element type the tool reads and writes: `f32` or `f64`.
pub trait NpyFloat: cppo::Float + ReadableElement + WritableElement {}
impl NpyFloat for f32 {}
impl NpyFloat for f64 {}

/// An open input archive.
pub struct Input {
    npz: NpzReader<BufReader<File>>,
    path: PathBuf,
    names: Vec<String>,
}

/// The outcome of reading an array as one element type.
enum Typed<T> {
    /// The array, of that type.
    Array(ArrayD<T>),
    /// The array exists but has another dtype, as the file spells it (e.g. `'<i4'`).
    OtherDtype(String),
}

/// `logp`, in whichever float type the file holds.
pub enum FloatArray {
    F32(Array2<f32>),
    F64(Array2<f64>),
}

/// The advantages, per token or per row.
pub enum OwnedAdvantages<F> {
    PerRow(Array1<F>),
    PerToken(Array2<F>),
}

impl<F> OwnedAdvantages<F> {
    pub fn view(&self) -> Advantages<'_, F> {
        match self {
            Self::PerRow(a) => a.view().into(),
            Self::PerToken(a) => a.view().into(),
        }
    }
}

/// The mask, in one of the element types the library takes.
pub enum OwnedMask {
    Bool(Array2<bool>),
    U8(Array2<u8>),
    F32(Array2<f32>),
    F64(Array2<f64>),
}

impl OwnedMask {
    pub fn view(&self) -> Mask<'_> {
        match self {
            Self::Bool(m) => Mask::Bool(m.view()),
            Self::U8(m) => Mask::U8(m.view()),
            Self::F32(m) => Mask::F32(m.view()),
            Self::F64(m) => Mask::F64(m.view()),
        }
    }
}

/// What needs the required arrays.
pub const ALWAYS: &str = "every config";

impl Input {
    /// Opens an archive and lists its arrays.
    pub fn open(path: &Path) -> Result<Self, Failure> {
        let cannot_open = |e| Failure::input(format!("cannot open input {}", path.display()), &e);
        let file = File::open(path).map_err(cannot_open)?;
        if file.metadata().map_err(cannot_open)?.is_dir() {
            return Err(Failure::Input(format!(
                "input {} is a directory",
                path.display()
            )));
        }
        let not_npz = |e: ReadNpzError| {
            Failure::Input(format!(
                "input {} is not a readable npz archive: {}",
                path.display(),
                npz_error(&e)
            ))
        };
        let mut npz = NpzReader::new(BufReader::new(file)).map_err(not_npz)?;
        let names = npz.names().map_err(not_npz)?;
        Ok(Self {
            npz,
            path: path.to_path_buf(),
            names,
        })
    }

    /// Whether the archive holds an array of this name.
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Prefixes a message with the input's path.
    pub fn context(&self, msg: impl std::fmt::Display) -> String {
        format!("{}: {msg}", self.path.display())
    }

    /// `logp`, float32 or float64: its type is the type of every float array.
    pub fn logp(&mut self) -> Result<FloatArray, Failure> {
        const NAME: &str = "logp";
        if let Typed::Array(a) = self.read::<f64>(NAME, ALWAYS)? {
            return Ok(FloatArray::F64(self.dims(NAME, a, "(B, L)")?));
        }
        match self.read::<f32>(NAME, ALWAYS)? {
            Typed::Array(a) => Ok(FloatArray::F32(self.dims(NAME, a, "(B, L)")?)),
            Typed::OtherDtype(d) => Err(self.dtype_error(NAME, &d, "float32 or float64")),
        }
    }

    /// A float array of the batch's float type `F`, with `D`'s number of dimensions
    /// (`expected` spells the shape for messages).
    pub fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure> {
        match self.read::<F>(name, needed_by)? {
            Typed::Array(a) => self.dims(name, a, expected),
            Typed::OtherDtype(d) => Err(self.dtype_error(
                name,
                &d,
                &format!(
                    "{}, the type of logp (all float arrays must have one type)",
                    F::DTYPE
                ),
            )),
        }
    }

    /// `advantages`, (B,) or (B, L).
    pub fn advantages<F: NpyFloat>(&mut self) -> Result<OwnedAdvantages<F>, Failure> {
        const NAME: &str = "advantages";
        const SHAPES: &str = "(B,) or (B, L)";
        let a: ArrayD<F> = self.float(NAME, ALWAYS, SHAPES)?;
        if a.ndim() == 1 {
            Ok(OwnedAdvantages::PerRow(self.dims(NAME, a, SHAPES)?))
        } else {
            Ok(OwnedAdvantages::PerToken(self.dims(NAME, a, SHAPES)?))
        }
    }

    /// `mask`, in any accepted dtype; integer masks become `u8` (nonzero = 1).
    pub fn mask(&mut self) -> Result<OwnedMask, Failure> {
        const NAME: &str = "mask";
        // Returns the mask if it has dtype `$t`, else evaluates to the file's dtype.
        macro_rules! try_as {
            ($t:ty => $wrap:expr) => {
                match self.read::<$t>(NAME, ALWAYS)? {
                    Typed::Array(m) => return Ok($wrap(self.dims(NAME, m, "(B, L)")?)),
                    Typed::OtherDtype(d) => d,
                }
            };
        }
        try_as!(bool => OwnedMask::Bool);
        try_as!(u8 => OwnedMask::U8);
        try_as!(f32 => OwnedMask::F32);
        try_as!(f64 => OwnedMask::F64);
        try_as!(i8 => nonzero::<i8>);
        try_as!(i16 => nonzero::<i16>);
        try_as!(i32 => nonzero::<i32>);
        try_as!(i64 => nonzero::<i64>);
        try_as!(u16 => nonzero::<u16>);
        try_as!(u32 => nonzero::<u32>);
        let dtype = try_as!(u64 => nonzero::<u64>);
        Err(self.dtype_error(NAME, &dtype, "bool, an integer type, float32 or float64"))
    }

    /// Reads an array as `T`, any number of dimensions.
    fn read<T: ReadableElement>(
        &mut self,
        name: &str,
        needed_by: &str,
    ) -> Result<Typed<T>, Failure> {
        if !self.has(name) {
            return Err(Failure::Input(self.context(format_args!(
                "array {name} is missing; it is required by {needed_by}"
            ))));
        }
        match self.npz.by_name(name) {
            Ok(a) => Ok(Typed::Array(a)),
            Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(d))) => {
                Ok(Typed::OtherDtype(d.to_string()))
            }
            Err(e) => Err(Failure::Input(
                self.context(format_args!("cannot read array {name}: {}", npz_error(&e))),
            )),
        }
    }

    /// Converts to `D`'s number of dimensions, or reports the shape.
    fn dims<T, D: Dimension>(
        &self,
        name: &'static str,
        a: ArrayD<T>,
        expected: &str,
    ) -> Result<Array<T, D>, Failure> {
        let shape = a.shape().to_vec();
        a.into_dimensionality::<D>().map_err(|_| {
            let err = cppo::Error::ShapeMismatch {
                array: name,
                expected: expected.to_string(),
                got: shape,
            };
            Failure::Input(self.context(err))
        })
    }

    fn dtype_error(&self, name: &str, got: &str, expected: &str) -> Failure {
        Failure::Input(self.context(format_args!(
            "array {name} has dtype {got}, expected {expected}"
        )))
    }
}

/// An archive error as one line, with a hint for the one common cause the message does
/// not make obvious.
fn npz_error(e: &ReadNpzError) -> String {
    let msg = chain(e);
    if msg.contains("Compression method not supported") {
        format!("{msg} (archives from numpy.savez_compressed are not supported: use numpy.savez)")
    } else {
        msg
    }
}

/// An integer mask as `u8`: nonzero = response token.
fn nonzero<T: Copy + PartialEq + Default>(m: Array2<T>) -> OwnedMask {
    OwnedMask::U8(m.mapv(|x| u8::from(x != T::default())))
}

/// Writes SPEC section 9's output arrays: the six (B, L) float arrays in the input's
/// type (`keep` as 0/1), `reason` as uint8 and `loss` as a 0-d float64.
pub fn write_outputs<F: NpyFloat, W: Write + Seek>(
    writer: W,
    eval: &Evaluation<F>,
) -> Result<W, WriteNpzError> {
    let o = &eval.outputs;
    let keep = o.keep.mapv(|k| F::from_f64(if k { 1.0 } else { 0.0 }));
    let mut npz = NpzWriter::new(writer);
    npz.add_array("divergence", &o.divergence)?;
    npz.add_array("weight", &o.weight)?;
    npz.add_array("threshold", &o.threshold)?;
    npz.add_array("keep", &keep)?;
    npz.add_array("token_loss", &o.token_loss)?;
    npz.add_array("grad", &o.grad)?;
    npz.add_array("reason", &o.reason)?;
    npz.add_array("loss", &arr0(eval.loss))?;
    npz.finish()
}
