//! Reading the input `.npz` and writing the output `.npz` of `cppo eval`.
//!
//! # Reading
//!
//! The archive is opened with the `zip` crate: stored entries (`numpy.savez`) and
//! deflated ones (`numpy.savez_compressed`) are both read. Each array the config uses is
//! read in one pass over its entry:
//! 1. its `.npy` header is parsed here: the magic string, format version 1.0, 2.0 or 3.0,
//!    the header length, and the header dict with exactly the keys `descr`,
//!    `fortran_order` and `shape` (a small parser of the Python literals numpy writes,
//!    with a nesting limit);
//! 2. the dtype is decided once, from `descr`; the caller accepts it or reports it
//!    with the dtype as the file spells it (e.g. `'<i4'`);
//! 3. the byte size the shape and dtype declare must equal the entry's data size (its
//!    uncompressed size minus the header), and that size must be possible for the
//!    entry's compressed size within the file: all checked before anything is
//!    allocated, so a corrupt header declaring a huge shape is a one-line error, not an
//!    allocation ([`crate::batchfile`] first reads every used array's header, checks the
//!    shapes against `logp`'s and the total against `--max-memory`, and only then the
//!    data);
//! 4. the data is decoded chunk by chunk straight into the array's buffer, in C or
//!    Fortran order, and the entry's CRC-32 is checked at its end. An entry is never read
//!    past the size it declares (plus one byte, to see that it ends there), whatever its
//!    compressed data inflates to.
//!
//! The input must be a regular file, and an archive with two entries of one name (or
//! both `x` and `x.npy`) is refused, naming the array: the zip crate would silently keep
//! one of them, so the central directory is scanned for duplicates when it is opened.
//!
//! Accepted dtypes, little-endian (`<`) or big-endian (`>`; `|` for one-byte types, `=`
//! or no byte-order character for the machine's order):
//! - float arrays: float32 or float64, one type for all of them (that of `logp`);
//! - `mask`: bool, uint8, int8 to int64, uint16 to uint64, float32 or float64. Masks of
//!   the other integer types are read as "nonzero = response token" and handed to the
//!   library as `u8`; bool bytes other than 0 read as true.
//!
//! Other dtypes (float16, complex, strings, objects, structured dtypes, ...) are refused
//! with the dtype the file declares and, where one exists, the conversion that fixes it
//! ([`dtype_fix`]: `logp.astype(np.float32)`, `.float().numpy()` for a torch bfloat16
//! tensor, `np.asarray(x, dtype=np.float32)` for an object array). Shapes are checked
//! against the batch's by [`crate::batchfile`] before any data is read; [`cppo::Batch`]
//! checks them again.
//!
//! When an array is missing, [`Input::names`] and [`Input::peek`] list what the archive
//! holds (each array's shape and dtype from its header alone) for the message.
//!
//! # Writing
//!
//! The outputs are written with ndarray-npy, uncompressed.

use std::collections::{HashMap, HashSet};
use std::convert::identity;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::str::Chars;

use cppo::ndarray::{
    Array, Array1, Array2, ArrayD, Dimension, Ix1, Ix2, IxDyn, ShapeBuilder, arr0,
};
use cppo::{Advantages, Evaluation, Mask};
use ndarray_npy::{NpzWriter, WritableElement, WriteNpzError};
use zip::read::ZipFile;
use zip::{CompressionMethod, ZipArchive};

use crate::failure::{Failure, chain};

/// A float element type the tool reads and writes: `f32` or `f64`.
pub trait NpyFloat: cppo::Float + Element + WritableElement {
    /// The matching `.npy` dtype.
    const NPY: Dtype;
}
impl NpyFloat for f32 {
    const NPY: Dtype = Dtype::F32;
}
impl NpyFloat for f64 {
    const NPY: Dtype = Dtype::F64;
}

/// What needs the required arrays.
pub const ALWAYS: &str = "every config";

/// The largest header dict read, in bytes (numpy's own reader refuses more than
/// 10 000 by default).
const MAX_HEADER_LEN: usize = 1 << 20;

/// The deepest nesting of brackets read in a header (structured dtypes nest a little).
const MAX_DEPTH: usize = 32;

/// Deflate's largest possible expansion: at most about 1032 output bytes per input byte.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Bytes decoded per read.
const CHUNK: usize = 1 << 16;

/// The `.npy` dtypes the tool reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    /// The dtype and whether it is big-endian, from a `descr` string such as `'<f8'`;
    /// `None` for a dtype the tool does not read.
    fn parse(descr: &str) -> Option<(Self, bool)> {
        let (order, code) = match descr.chars().next()? {
            c @ ('<' | '>' | '|' | '=') => (c, &descr[1..]),
            _ => ('=', descr),
        };
        let dtype = match code {
            "b1" => Self::Bool,
            "u1" => Self::U8,
            "u2" => Self::U16,
            "u4" => Self::U32,
            "u8" => Self::U64,
            "i1" => Self::I8,
            "i2" => Self::I16,
            "i4" => Self::I32,
            "i8" => Self::I64,
            "f4" => Self::F32,
            "f8" => Self::F64,
            _ => return None,
        };
        let big_endian = match order {
            '>' => true,
            '<' => false,
            // numpy writes `|` ("not applicable") only for one-byte types.
            '|' if dtype.size() == 1 => false,
            '|' => return None,
            _ => cfg!(target_endian = "big"),
        };
        Some((dtype, big_endian))
    }
}

/// An element type as `.npy` data stores it.
pub trait Element: Copy {
    /// Bytes per element.
    const SIZE: usize;
    /// Decodes one element from exactly [`Self::SIZE`] bytes.
    fn decode(bytes: &[u8], big_endian: bool) -> Self;
}

macro_rules! numeric_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = size_of::<$t>();
            #[inline]
            fn decode(bytes: &[u8], big_endian: bool) -> Self {
                let mut b = [0u8; size_of::<$t>()];
                b.copy_from_slice(bytes);
                if big_endian { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }
            }
        }
    )*};
}
numeric_element!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);

impl Element for bool {
    const SIZE: usize = 1;
    #[inline]
    fn decode(bytes: &[u8], _: bool) -> Self {
        bytes[0] != 0
    }
}

/// An open input archive.
pub struct Input {
    archive: ZipArchive<BufReader<File>>,
    path: PathBuf,
    /// The archive's size in bytes.
    file_len: u64,
    /// Array name (entry name without `.npy`) → entry index; a name appears once (an
    /// archive with two entries of one name is refused).
    names: HashMap<String, usize>,
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

    /// How many values they hold.
    pub fn len(&self) -> usize {
        match self {
            Self::PerRow(a) => a.len(),
            Self::PerToken(a) => a.len(),
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

    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Bool(m) => m.len(),
            Self::U8(m) => m.len(),
            Self::F32(m) => 4 * m.len(),
            Self::F64(m) => 8 * m.len(),
        }
    }
}

/// What an array is read as, which decides the dtypes it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `logp`: float32 or float64, the type of every float array.
    Logp,
    /// Another float array: the type of `logp`.
    Float(Dtype),
    /// `mask`: bool, an integer type, float32 or float64.
    Mask,
}

/// An array's header as its file declares it, its data unread.
#[derive(Clone, Debug)]
pub struct Declared {
    pub shape: Vec<usize>,
    /// The dtype as the file spells it (e.g. `'<f4'` or `F32`).
    pub dtype: String,
    /// The float type, for a float32 or float64 array.
    pub float: Option<Dtype>,
    /// Bytes per element once read (a mask of a wide integer type is read as bytes).
    pub mem_size: usize,
    /// Bytes per element in the file.
    pub file_size: usize,
    /// The bytes of data the file holds for the array, as its container declares them
    /// (the zip entry's size after the header, the safetensors offsets).
    pub data_len: u64,
}

/// The dtypes a mask may have, for messages.
pub const MASK_DTYPES: &str = "bool, an integer type, float32 or float64";

/// The message of a float array not of `logp`'s type `f`.
pub fn one_float_type(f: Dtype) -> String {
    let name = if f == Dtype::F32 {
        "float32"
    } else {
        "float64"
    };
    format!("{name}, the type of logp (all float arrays must have one type)")
}

/// What an array must be converted to, for the fix a dtype error suggests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A float array of this type (float32 for `logp`, which may be either).
    Float(Dtype),
    /// A mask: bool.
    Mask,
}

impl Want {
    /// The wanted type of a float array in role `role`.
    pub fn of(role: Role) -> Self {
        match role {
            Role::Logp => Self::Float(Dtype::F32),
            Role::Float(f) => Self::Float(f),
            Role::Mask => Self::Mask,
        }
    }
}

/// The kind of a refused dtype, which decides the fix suggested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Float16,
    /// bfloat16 (safetensors `BF16`; in an npz, the 2-byte void dtype `V2` that numpy
    /// writes for ml_dtypes' bfloat16).
    BFloat16,
    /// float32 or float64, refused because it is not the batch's float type.
    Float,
    Int,
    Bool,
    /// Python objects (`|O`): a list of arrays, or rows of different lengths.
    Object,
    /// Anything else (complex, strings, dates, structured): no fix is suggested.
    Other,
}

impl Found {
    /// The kind of an `.npy` `descr` string such as `'<f2'`.
    fn of_descr(descr: &Py) -> Self {
        let Py::Str(s) = descr else {
            return Self::Other;
        };
        let code = s.trim_start_matches(['<', '>', '|', '=']);
        match code {
            "f2" => Self::Float16,
            "V2" => Self::BFloat16,
            "f4" | "f8" => Self::Float,
            "b1" => Self::Bool,
            "O" => Self::Object,
            c if c.len() == 2 && (c.starts_with('i') || c.starts_with('u')) => Self::Int,
            _ => Self::Other,
        }
    }
}

/// The conversion that fixes a refused dtype, as `: save ...` to append to the message
/// (empty when there is none). `name` is the array's name in the file; `torch` spells
/// the fix for a tensor saved from torch (safetensors) rather than a numpy array.
pub fn dtype_fix(name: &str, found: Found, want: Want, torch: bool) -> String {
    let (np_type, torch_method) = match want {
        Want::Float(Dtype::F64) => ("np.float64", "double"),
        Want::Float(_) => ("np.float32", "float"),
        Want::Mask => ("bool", "bool"),
    };
    if torch {
        return match found {
            Found::Other | Found::Object => String::new(),
            _ => format!(": save {name}.{torch_method}() (torch) instead"),
        };
    }
    match found {
        Found::Other => String::new(),
        Found::BFloat16 => format!(
            ": numpy has no bfloat16 (ml_dtypes' bfloat16 is saved as V2); from torch, \
             save {name}.{torch_method}().numpy()"
        ),
        Found::Object => format!(
            ": an object array (a list of arrays, or rows of different lengths?) is not \
             read; pad the rows to one length and save np.asarray({name}, dtype={np_type})"
        ),
        Found::Float16 | Found::Float | Found::Int | Found::Bool => {
            format!(": save {name}.astype({np_type})")
        }
    }
}

/// numpy's name of a dtype for messages: `float32` for `'<f4'`, the descr as the file
/// spells it for a dtype without a plain name.
fn numpy_name(descr: &Py) -> String {
    if let Py::Str(s) = descr {
        let code = s.trim_start_matches(['<', '>', '|', '=']);
        let name = match code {
            "b1" => "bool",
            "u1" => "uint8",
            "u2" => "uint16",
            "u4" => "uint32",
            "u8" => "uint64",
            "i1" => "int8",
            "i2" => "int16",
            "i4" => "int32",
            "i8" => "int64",
            "f2" => "float16",
            "f4" => "float32",
            "f8" => "float64",
            "c8" => "complex64",
            "c16" => "complex128",
            "O" => "object",
            _ => "",
        };
        if !name.is_empty() {
            return name.to_string();
        }
    }
    descr.to_string()
}

/// The first entry name the central directory at `start` lists twice, if any. The
/// directory is read header by header (never more than the file holds), and ends at the
/// first record that is not a central directory header.
fn duplicate_entry(file: &mut File, start: u64, file_len: u64) -> io::Result<Option<String>> {
    const SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];
    const FIXED: u64 = 46;
    let mut r = BufReader::new(file);
    r.seek(io::SeekFrom::Start(start))?;
    let mut seen = HashSet::new();
    let mut pos = start;
    while pos + FIXED <= file_len {
        let mut fixed = [0u8; FIXED as usize];
        if r.read_exact(&mut fixed).is_err() || fixed[..4] != SIGNATURE {
            break;
        }
        let field = |at: usize| u16::from_le_bytes([fixed[at], fixed[at + 1]]);
        let (name_len, extra_len, comment_len) = (field(28), field(30), field(32));
        let mut name = vec![0u8; usize::from(name_len)];
        if r.read_exact(&mut name).is_err() {
            break;
        }
        let skip = i64::from(extra_len) + i64::from(comment_len);
        r.seek_relative(skip)?;
        pos += FIXED + u64::from(name_len) + skip.unsigned_abs();
        if !seen.insert(name.clone()) {
            return Ok(Some(String::from_utf8_lossy(&name).into_owned()));
        }
    }
    Ok(None)
}

/// Refuses an input that is not a regular file (a directory, a device such as
/// `/dev/zero`, a pipe): its size is unknown, and reading it could never end.
pub fn regular_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), Failure> {
    let what = if meta.is_dir() {
        "is a directory"
    } else if !meta.is_file() {
        "is not a regular file"
    } else {
        return Ok(());
    };
    Err(Failure::Input(format!("input {} {what}", path.display())))
}

impl Input {
    /// Opens an archive and lists its arrays.
    pub fn open(path: &Path) -> Result<Self, Failure> {
        let cannot_open = |e| Failure::input(format!("cannot open input {}", path.display()), &e);
        let file = File::open(path).map_err(cannot_open)?;
        let meta = file.metadata().map_err(cannot_open)?;
        regular_file(path, &meta)?;
        let not_npz = |e: &dyn fmt::Display| {
            Failure::Input(format!(
                "input {} is not a readable npz archive: {e}",
                path.display(),
            ))
        };
        let archive = ZipArchive::new(BufReader::new(file)).map_err(|e| not_npz(&chain(&e)))?;
        // The zip crate keeps one entry of each name; the central directory tells whether
        // a name appears twice.
        let mut dir = File::open(path).map_err(cannot_open)?;
        let start = archive.central_directory_start();
        if let Some(name) = duplicate_entry(&mut dir, start, meta.len()).map_err(|e| not_npz(&e))? {
            let name = name.strip_suffix(".npy").unwrap_or(&name);
            return Err(Failure::Input(format!(
                "{}: array {name} appears twice in the archive",
                path.display()
            )));
        }
        let mut names = HashMap::new();
        for (i, entry) in archive.file_names().enumerate() {
            let name = entry.strip_suffix(".npy").unwrap_or(entry);
            if names.insert(name.to_string(), i).is_some() {
                return Err(Failure::Input(format!(
                    "{}: array {name} appears twice in the archive (as {name} and {name}.npy)",
                    path.display()
                )));
            }
        }
        Ok(Self {
            archive,
            path: path.to_path_buf(),
            file_len: meta.len(),
            names,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the archive holds an array of this name.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The names of the arrays the archive holds, in its order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<(&String, &usize)> = self.names.iter().collect();
        names.sort_by_key(|&(_, &i)| i);
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// An array's declared shape and dtype (numpy's name for it), from its header only;
    /// `None` if the header cannot be read.
    pub fn peek(&mut self, name: &str) -> Option<(Vec<usize>, String)> {
        let &index = self.names.get(name)?;
        let (mut entry, size) = open_entry(&mut self.archive, index, self.file_len).ok()?;
        let (header, _) = read_header(&mut entry, size).ok()?;
        Some((header.shape, numpy_name(&header.descr)))
    }

    /// Prefixes a message with the input's path.
    pub fn context(&self, msg: impl fmt::Display) -> String {
        format!("{}: {msg}", self.path.display())
    }

    /// An array's declared shape and dtype, its data unread; the dtype must suit `role`.
    pub fn declared(
        &mut self,
        name: &'static str,
        needed_by: &str,
        role: Role,
    ) -> Result<Declared, Failure> {
        let npy = self.array(name, needed_by)?;
        let dtype = npy.dtype();
        let mem_size = match (role, dtype) {
            (Role::Logp, Some(d @ (Dtype::F32 | Dtype::F64))) => d.size(),
            (Role::Logp, _) => return Err(npy.dtype_error("float32 or float64", Want::of(role))),
            (Role::Float(f), Some(d)) if d == f => d.size(),
            (Role::Float(f), _) => return Err(npy.dtype_error(&one_float_type(f), Want::of(role))),
            (Role::Mask, Some(d @ (Dtype::F32 | Dtype::F64))) => d.size(),
            (Role::Mask, Some(_)) => 1,
            (Role::Mask, None) => return Err(npy.dtype_error(MASK_DTYPES, Want::Mask)),
        };
        Ok(Declared {
            shape: npy.header.shape.clone(),
            dtype: npy.header.descr.to_string(),
            float: dtype,
            mem_size,
            file_size: dtype.map_or(1, Dtype::size),
            data_len: npy.data_len,
        })
    }

    /// A float array of the batch's float type `F`, with `D`'s number of dimensions
    /// (`expected` spells the shape for messages).
    pub fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure> {
        let npy = self.array(name, needed_by)?;
        if npy.dtype() != Some(F::NPY) {
            return Err(npy.dtype_error(&one_float_type(F::NPY), Want::Float(F::NPY)));
        }
        npy.read(identity, expected)
    }

    /// `advantages` (stored as `name`), (B,) or (B, L).
    pub fn advantages<F: NpyFloat>(
        &mut self,
        name: &'static str,
    ) -> Result<OwnedAdvantages<F>, Failure> {
        const SHAPES: &str = "(B,) or (B, L)";
        let a: ArrayD<F> = self.float(name, ALWAYS, SHAPES)?;
        let context = |a: &ArrayD<F>| shape_error(&self.path, name, a.shape(), SHAPES);
        if a.ndim() == 1 {
            let e = context(&a);
            a.into_dimensionality::<Ix1>()
                .map(OwnedAdvantages::PerRow)
                .map_err(|_| e)
        } else {
            let e = context(&a);
            a.into_dimensionality::<Ix2>()
                .map(OwnedAdvantages::PerToken)
                .map_err(|_| e)
        }
    }

    /// `mask` (stored as `name`), in any accepted dtype; masks of the other integer
    /// types become `u8` (nonzero = 1).
    pub fn mask(&mut self, name: &'static str) -> Result<OwnedMask, Failure> {
        const BL: &str = "(B, L)";
        let npy = self.array(name, ALWAYS)?;
        let Some(dtype) = npy.dtype() else {
            return Err(npy.dtype_error(MASK_DTYPES, Want::Mask));
        };
        Ok(match dtype {
            Dtype::Bool => OwnedMask::Bool(npy.read(identity, BL)?),
            Dtype::U8 => OwnedMask::U8(npy.read(identity, BL)?),
            Dtype::F32 => OwnedMask::F32(npy.read(identity, BL)?),
            Dtype::F64 => OwnedMask::F64(npy.read(identity, BL)?),
            Dtype::I8 => OwnedMask::U8(npy.read(nonzero::<i8>, BL)?),
            Dtype::I16 => OwnedMask::U8(npy.read(nonzero::<i16>, BL)?),
            Dtype::I32 => OwnedMask::U8(npy.read(nonzero::<i32>, BL)?),
            Dtype::I64 => OwnedMask::U8(npy.read(nonzero::<i64>, BL)?),
            Dtype::U16 => OwnedMask::U8(npy.read(nonzero::<u16>, BL)?),
            Dtype::U32 => OwnedMask::U8(npy.read(nonzero::<u32>, BL)?),
            Dtype::U64 => OwnedMask::U8(npy.read(nonzero::<u64>, BL)?),
        })
    }

    /// Opens an array's entry and reads its header.
    fn array<'a>(&'a mut self, name: &'static str, needed_by: &str) -> Result<Npy<'a>, Failure> {
        let Some(&index) = self.names.get(name) else {
            return Err(Failure::Input(self.context(format_args!(
                "array {name} is missing; it is required by {needed_by}"
            ))));
        };
        let Self {
            archive,
            path,
            file_len,
            ..
        } = self;
        let cannot = |msg: &dyn fmt::Display| {
            Failure::Input(format!(
                "{}: cannot read array {name}: {msg}",
                path.display()
            ))
        };
        let (mut file, size) = open_entry(archive, index, *file_len).map_err(|m| cannot(&m))?;
        let (header, header_len) = read_header(&mut file, size).map_err(|m| cannot(&m))?;
        Ok(Npy {
            file,
            path,
            name,
            header,
            data_len: size - header_len,
        })
    }
}

/// An archive entry, read no further than it declares.
type Entry<'a> = io::Take<ZipFile<'a, BufReader<File>>>;

/// Opens entry `index` of an archive of `file_len` bytes, checking its declared size
/// against what its compressed size can hold; returns the entry, never read past the
/// size it declares (plus one byte, to see that it ends there), and that size.
fn open_entry(
    archive: &mut ZipArchive<BufReader<File>>,
    index: usize,
    file_len: u64,
) -> Result<(Entry<'_>, u64), String> {
    let file = archive.by_index(index).map_err(|e| chain(&e))?;
    let (size, packed) = (file.size(), file.compressed_size());
    let possible = match file.compression() {
        CompressionMethod::Stored => packed,
        _ => packed
            .saturating_mul(MAX_DEFLATE_RATIO)
            .saturating_add(1024),
    };
    if packed > file_len || size > possible {
        return Err(format!(
            "the archive is corrupt: the entry declares {size} bytes from {packed} \
             compressed bytes in a {file_len}-byte file"
        ));
    }
    // Whatever its compressed data inflates to.
    Ok((file.take(size.saturating_add(1)), size))
}

/// An array's entry, its header read, positioned at its data.
struct Npy<'a> {
    file: Entry<'a>,
    path: &'a Path,
    name: &'static str,
    header: Header,
    /// The entry's bytes after the header, as the archive declares them.
    data_len: u64,
}

impl Npy<'_> {
    /// The dtype, if the tool reads it.
    fn dtype(&self) -> Option<Dtype> {
        self.header.dtype.map(|(d, _)| d)
    }

    /// The array's dtype (as the file spells it) is not the `expected` one; the message
    /// ends with the conversion to `want` that fixes it, if there is one.
    fn dtype_error(&self, expected: &str, want: Want) -> Failure {
        let fix = dtype_fix(self.name, Found::of_descr(&self.header.descr), want, false);
        self.fail(format_args!(
            "array {} has dtype {}, expected {expected}{fix}",
            self.name, self.header.descr
        ))
    }

    fn fail(&self, msg: impl fmt::Display) -> Failure {
        Failure::Input(format!("{}: {msg}", self.path.display()))
    }

    fn cannot_read(&self, msg: impl fmt::Display) -> Failure {
        self.fail(format_args!("cannot read array {}: {msg}", self.name))
    }

    /// Reads the data as elements `S` (whose size the caller has matched to the dtype),
    /// mapped to `T`, with `D`'s number of dimensions (`expected` spells the shape for
    /// messages).
    fn read<S: Element, T, D: Dimension>(
        mut self,
        map: impl Fn(S) -> T,
        expected: &str,
    ) -> Result<Array<T, D>, Failure> {
        let shape = &self.header.shape;
        if D::NDIM.is_some_and(|n| n != shape.len()) {
            return Err(shape_error(self.path, self.name, shape, expected));
        }
        // The declared size, checked against the entry before anything is allocated.
        let (count, bytes) = check_data_len(
            self.path,
            self.name,
            shape,
            &self.header.descr,
            S::SIZE,
            self.data_len,
        )?;
        let mut data = Vec::new();
        if data.try_reserve_exact(count).is_err() {
            return Err(self.cannot_read(format_args!("cannot allocate {bytes} bytes")));
        }
        let big_endian = self.header.dtype.is_some_and(|(_, big)| big);
        let mut buf = vec![0u8; CHUNK.min(bytes)];
        let per_chunk = (CHUNK / S::SIZE).max(1);
        let mut left = count;
        while left > 0 {
            let n = left.min(per_chunk);
            let chunk = &mut buf[..n * S::SIZE];
            if let Err(e) = self.file.read_exact(chunk) {
                return Err(self.read_error(&e, bytes));
            }
            data.extend(
                chunk
                    .chunks_exact(S::SIZE)
                    .map(|b| map(S::decode(b, big_endian))),
            );
            left -= n;
        }
        // The entry must end here; reading its end also checks its CRC-32.
        match at_end(&mut self.file) {
            Ok(true) => {}
            Ok(false) => {
                return Err(self.cannot_read(format_args!(
                    "its entry holds more data than the {bytes} bytes its header declares"
                )));
            }
            Err(e) => return Err(self.read_error(&e, bytes)),
        }
        let shape = IxDyn(&self.header.shape);
        let array = if self.header.fortran_order {
            ArrayD::from_shape_vec(shape.f(), data)
        } else {
            ArrayD::from_shape_vec(shape, data)
        };
        array
            .and_then(ArrayD::into_dimensionality)
            .map_err(|e| self.cannot_read(e))
    }

    fn read_error(&self, e: &io::Error, bytes: usize) -> Failure {
        let msg = chain(e);
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.cannot_read(format_args!(
                "its data ends before the {bytes} bytes its header declares"
            ))
        } else if msg.contains("Invalid checksum") {
            self.cannot_read("its data does not match the archive's checksum (a corrupt file)")
        } else {
            self.cannot_read(msg)
        }
    }
}

/// The element count and byte size an array's shape and dtype (`size` bytes an element,
/// `descr` as the file spells it) declare, which must be the `data_len` bytes its entry
/// holds.
pub fn check_data_len(
    path: &Path,
    name: &str,
    shape: &[usize],
    descr: &dyn fmt::Display,
    size: usize,
    data_len: u64,
) -> Result<(usize, usize), Failure> {
    let fail = |msg: fmt::Arguments<'_>| Failure::Input(format!("{}: {msg}", path.display()));
    let count = if shape.contains(&0) {
        Some(0)
    } else {
        shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    };
    let bytes = count.and_then(|n| n.checked_mul(size));
    match (count, bytes) {
        (Some(count), Some(bytes)) if bytes as u64 == data_len => Ok((count, bytes)),
        (_, Some(bytes)) if (bytes as u64) < data_len => Err(fail(format_args!(
            "array {name} holds {data_len} bytes of data, more than the {bytes} its shape \
             {shape:?} and dtype {descr} declare"
        ))),
        (_, bytes) => {
            let bytes = bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string());
            Err(fail(format_args!(
                "array {name} declares shape {shape:?} of dtype {descr}, {bytes} bytes, but \
                 its entry holds only {data_len} bytes of data"
            )))
        }
    }
}

/// Whether a reader is at its end.
fn at_end(r: &mut impl Read) -> io::Result<bool> {
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(n) => return Ok(n == 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// An array without the expected number of dimensions.
fn shape_error(path: &Path, name: &'static str, shape: &[usize], expected: &str) -> Failure {
    let err = cppo::Error::ShapeMismatch {
        array: name,
        expected: expected.to_string(),
        got: shape.to_vec(),
    };
    Failure::Input(format!("{}: {err}", path.display()))
}

/// Nonzero = response token.
fn nonzero<T: Copy + PartialEq + Default>(x: T) -> u8 {
    u8::from(x != T::default())
}

// ---------------------------------------------------------------------------------------
// The .npy header
// ---------------------------------------------------------------------------------------

/// What an `.npy` header declares.
#[derive(Debug)]
struct Header {
    /// `descr` as the file has it.
    descr: Py,
    /// The dtype and whether it is big-endian, if the tool reads it.
    dtype: Option<(Dtype, bool)>,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Reads the header of an `.npy` entry of `entry_size` bytes; returns it and its length
/// (magic and length fields included). Errors are messages.
fn read_header(r: &mut impl Read, entry_size: u64) -> Result<(Header, u64), String> {
    let eof = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "its entry is too short to hold an .npy header".to_string()
        } else {
            chain(&e)
        }
    };
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix).map_err(eof)?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err("its entry is not an .npy file (no \\x93NUMPY magic string)".into());
    }
    let (major, minor) = (prefix[6], prefix[7]);
    let header_len = match (major, minor) {
        (1, 0) => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(eof)?;
            usize::from(u16::from_le_bytes(b))
        }
        (2 | 3, 0) => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(eof)?;
            usize::try_from(u32::from_le_bytes(b)).unwrap_or(usize::MAX)
        }
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    let total = if major == 1 { 10 } else { 12 } + header_len as u64;
    if total > entry_size {
        return Err(format!(
            "its .npy header declares a length of {header_len} bytes, more than its \
             {entry_size}-byte entry holds"
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format!(
            "its .npy header declares a length of {header_len} bytes, more than the \
             {MAX_HEADER_LEN} read"
        ));
    }
    let mut raw = vec![0u8; header_len];
    r.read_exact(&mut raw).map_err(eof)?;
    let text = if major == 3 {
        String::from_utf8(raw).map_err(|_| "its .npy header is not UTF-8".to_string())?
    } else {
        raw.iter().map(|&b| char::from(b)).collect()
    };
    let header = parse_header(&text).map_err(|m| format!("bad .npy header: {m}"))?;
    Ok((header, total))
}

/// The header dict: exactly `descr`, `fortran_order` and `shape`.
fn parse_header(text: &str) -> Result<Header, String> {
    let Py::Dict(items) = Parser::parse(text)? else {
        return Err("not a dict".into());
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    for (key, value) in items {
        let slot = match &key {
            Py::Str(k) if k == "descr" => &mut descr,
            Py::Str(k) if k == "fortran_order" => &mut fortran_order,
            Py::Str(k) if k == "shape" => &mut shape,
            _ => return Err(format!("unexpected key {key}")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("key {key} appears twice"));
        }
    }
    let missing = |key: &str| format!("no '{key}' key");
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran_order = match fortran_order.ok_or_else(|| missing("fortran_order"))? {
        Py::Bool(b) => b,
        v => return Err(format!("'fortran_order' is {v}, expected True or False")),
    };
    let shape = shape.ok_or_else(|| missing("shape"))?;
    let dims = match &shape {
        Py::Tuple(items) => items
            .iter()
            .map(|d| match d {
                Py::Int(digits) => digits.parse::<usize>().ok(),
                _ => None,
            })
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    let Some(shape) = dims else {
        return Err(format!(
            "'shape' is {shape}, expected a tuple of non-negative integers"
        ));
    };
    let dtype = match &descr {
        Py::Str(s) => Dtype::parse(s),
        _ => None,
    };
    Ok(Header {
        descr,
        dtype,
        fortran_order,
        shape,
    })
}

/// A Python literal, as far as `.npy` headers use them.
#[derive(Debug, PartialEq)]
enum Py {
    Str(String),
    /// The digits, with any sign.
    Int(String),
    Bool(bool),
    None,
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
}

impl fmt::Display for Py {
    /// Python's spelling (strings in single quotes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn items<T>(
            f: &mut fmt::Formatter<'_>,
            items: &[T],
            one: impl Fn(&mut fmt::Formatter<'_>, &T) -> fmt::Result,
        ) -> fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                one(f, item)?;
            }
            Ok(())
        }
        match self {
            Self::Str(s) => write!(f, "'{s}'"),
            Self::Int(s) => f.write_str(s),
            Self::Bool(true) => f.write_str("True"),
            Self::Bool(false) => f.write_str("False"),
            Self::None => f.write_str("None"),
            Self::Tuple(v) => {
                f.write_str("(")?;
                items(f, v, |f, x| write!(f, "{x}"))?;
                f.write_str(if v.len() == 1 { ",)" } else { ")" })
            }
            Self::List(v) => {
                f.write_str("[")?;
                items(f, v, |f, x| write!(f, "{x}"))?;
                f.write_str("]")
            }
            Self::Dict(v) => {
                f.write_str("{")?;
                items(f, v, |f, (k, x)| write!(f, "{k}: {x}"))?;
                f.write_str("}")
            }
        }
    }
}

/// A parser of the Python literals of `.npy` headers: strings, integers, `True`,
/// `False`, `None`, tuples, lists and dicts, nested at most [`MAX_DEPTH`] deep.
struct Parser<'a> {
    chars: Peekable<Chars<'a>>,
    depth: usize,
}

impl Parser<'_> {
    /// One literal, then only whitespace.
    fn parse(text: &str) -> Result<Py, String> {
        let mut p = Parser {
            chars: text.chars().peekable(),
            depth: 0,
        };
        let value = p.value()?;
        p.skip_ws();
        match p.chars.next() {
            None => Ok(value),
            Some(c) => Err(format!("unexpected {c:?} after the header dict")),
        }
    }

    fn skip_ws(&mut self) {
        while self.chars.next_if(|c| c.is_whitespace()).is_some() {}
    }

    fn value(&mut self) -> Result<Py, String> {
        self.skip_ws();
        match self.chars.peek().copied() {
            None => Err("unexpected end".into()),
            Some(q @ ('\'' | '"')) => {
                self.chars.next();
                self.string(q)
            }
            Some('(') => self.seq(')').map(Py::Tuple),
            Some('[') => self.seq(']').map(Py::List),
            Some('{') => self.dict(),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => self.int(),
            Some(c) if c.is_alphabetic() || c == '_' => self.word(),
            Some(c) => Err(format!("unexpected {c:?}")),
        }
    }

    fn string(&mut self, quote: char) -> Result<Py, String> {
        let mut s = String::new();
        loop {
            match self.chars.next() {
                None => return Err("unterminated string".into()),
                Some(c) if c == quote => return Ok(Py::Str(s)),
                // An escape: the next character as it is (enough for dtype names).
                Some('\\') => s.push(self.chars.next().ok_or("unterminated string")?),
                Some(c) => s.push(c),
            }
        }
    }

    fn int(&mut self) -> Result<Py, String> {
        let mut s = String::new();
        if let Some(sign) = self.chars.next_if(|&c| c == '-' || c == '+') {
            s.push(sign);
        }
        while let Some(d) = self.chars.next_if(char::is_ascii_digit) {
            s.push(d);
        }
        if !s.ends_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("bad number {s:?}"));
        }
        // Python 2's long integers, as old files spell shapes.
        self.chars.next_if(|&c| c == 'L' || c == 'l');
        Ok(Py::Int(s))
    }

    fn word(&mut self) -> Result<Py, String> {
        let mut s = String::new();
        while let Some(c) = self.chars.next_if(|&c| c.is_alphanumeric() || c == '_') {
            s.push(c);
        }
        match s.as_str() {
            "True" => Ok(Py::Bool(true)),
            "False" => Ok(Py::Bool(false)),
            "None" => Ok(Py::None),
            _ => Err(format!("unexpected name {s}")),
        }
    }

    /// Runs `f` one nesting level deeper.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} deep"));
        }
        self.chars.next(); // the opening bracket
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }

    /// After an item: a comma (`Ok(false)`) or the closing bracket (`Ok(true)`).
    fn separator(&mut self, close: char) -> Result<bool, String> {
        self.skip_ws();
        match self.chars.next() {
            Some(',') => Ok(false),
            Some(c) if c == close => Ok(true),
            Some(c) => Err(format!("expected ',' or {close:?}, found {c:?}")),
            None => Err(format!("expected ',' or {close:?}, found the end")),
        }
    }

    fn seq(&mut self, close: char) -> Result<Vec<Py>, String> {
        self.nested(|p| {
            let mut items = Vec::new();
            loop {
                p.skip_ws();
                if p.chars.next_if_eq(&close).is_some() {
                    return Ok(items);
                }
                items.push(p.value()?);
                if p.separator(close)? {
                    return Ok(items);
                }
            }
        })
    }

    fn dict(&mut self) -> Result<Py, String> {
        self.nested(|p| {
            let mut items = Vec::new();
            loop {
                p.skip_ws();
                if p.chars.next_if_eq(&'}').is_some() {
                    return Ok(Py::Dict(items));
                }
                let key = p.value()?;
                p.skip_ws();
                if p.chars.next_if_eq(&':').is_none() {
                    return Err(format!("expected ':' after {key}"));
                }
                items.push((key, p.value()?));
                if p.separator('}')? {
                    return Ok(Py::Dict(items));
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// Writes `cppo eval`'s output arrays: the six (B, L) float arrays in the input's type
/// (`keep` as 0/1), `reason` as uint8, `delta_b_row` (B,) in the input's type and `loss`
/// as a 0-d float64.
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
    npz.add_array("delta_b_row", &o.delta_b_row)?;
    npz.add_array("loss", &arr0(eval.loss))?;
    npz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_numpy_writes() {
        let h = parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 6), }  \n")
            .unwrap();
        assert_eq!(h.dtype, Some((Dtype::F64, false)));
        assert_eq!(h.shape, [2, 6]);
        assert!(!h.fortran_order);
        let h = parse_header("{'descr': '|b1', 'fortran_order': True, 'shape': (3,)}").unwrap();
        assert_eq!(
            (h.dtype, h.shape, h.fortran_order),
            (Some((Dtype::Bool, false)), vec![3], true)
        );
        let h =
            parse_header("{\"shape\": (), \"fortran_order\": False, \"descr\": \">i4\"}").unwrap();
        assert_eq!((h.dtype, h.shape), (Some((Dtype::I32, true)), vec![]));
        let h = parse_header("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (2L,)}")
            .unwrap();
        assert_eq!(h.dtype, None);
        assert_eq!(h.descr.to_string(), "[('a', '<f8')]");
        assert_eq!(h.shape, [2]);
    }

    #[test]
    fn bad_headers() {
        for (text, needle) in [
            ("", "end"),
            ("[]", "not a dict"),
            ("{'descr': '<f8', 'fortran_order': False}", "'shape'"),
            (
                "{'descr': '<f8', 'fortran_order': 0, 'shape': ()}",
                "fortran_order",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}",
                "non-negative",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': [2]}",
                "tuple",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
                "non-negative",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                "'x'",
            ),
            (
                "{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, 'shape': ()}",
                "twice",
            ),
            (
                "{'descr': '<f8, 'fortran_order': False, 'shape': ()}",
                "expected",
            ),
            ("{'descr': '<f8'", "found the end"),
            ("{'descr': '<f8'} x", "after"),
            ("{'descr': nan}", "nan"),
            ("{'descr': (,)}", "','"),
        ] {
            let err = parse_header(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let deep = format!("{{'descr': {}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(parse_header(&deep).unwrap_err().contains("nested"));
    }

    #[test]
    fn dtypes() {
        assert_eq!(Dtype::parse("<f4"), Some((Dtype::F32, false)));
        assert_eq!(Dtype::parse(">f8"), Some((Dtype::F64, true)));
        assert_eq!(Dtype::parse("|u1"), Some((Dtype::U8, false)));
        assert_eq!(Dtype::parse("<u8"), Some((Dtype::U64, false)));
        for bad in [
            "", "<", "<f2", "<c16", "|f8", "float64", "<U8", "O", "<M8[ns]", "<f8 ",
        ] {
            assert_eq!(Dtype::parse(bad), None, "{bad}");
        }
        assert_eq!(f64::decode(&1.5f64.to_be_bytes(), true), 1.5);
        assert_eq!(i16::decode(&(-3i16).to_le_bytes(), false), -3);
    }
}
