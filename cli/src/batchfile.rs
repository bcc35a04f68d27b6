//! A batch read from a file for `cppo eval` and `cppo inspect`: an `.npz` archive (read
//! by [`crate::npz`]) or a `.safetensors` file holding the same tensors by the same names.
//!
//! # Bounded reading
//!
//! A file is read in two passes. The first reads only headers: `logp`'s (its dtype and
//! shape (B, L)), then every other array the configs use, whose dtype must be accepted
//! and whose declared shape must be what the batch needs ((B, L); (B,) or (B, L) for
//! `advantages`; (B, L, K) for the top-K pair); the declared sizes, added up as they will be held in memory, must be
//! within `--max-memory` ([`MaxMemory`], 8 GiB by default), and each array's declared
//! size must be what its file holds. Only then does the second pass read the data, each
//! array by a bounded read of its own bytes. So a header declaring a huge shape is a
//! one-line error naming the array and the limit, whatever the file's size, and nothing
//! of that size is allocated. Inputs must be regular files (a symlink to `/dev/zero` is
//! refused by its metadata), and two arrays of one name are an error.
//!
//! # Safetensors
//!
//! Only the header is read when the file is opened: the 8-byte little-endian header
//! length (at most 100 MB, and within the file), then the JSON header, parsed here with
//! serde_json (a name listed twice is an error; `__metadata__` is skipped). Every
//! tensor's `data_offsets` must lie within the file's length (from its metadata) and
//! hold exactly the bytes its dtype and shape declare. A tensor's data is read only if
//! the configs use it, from its byte range only, chunk by chunk. Tensors are
//! little-endian and C-ordered by the format's definition. The dtypes accepted are
//! those of the npz reader: `F32` or `F64` for the float tensors (one type for all of
//! them, that of `logp`); `BOOL`, `U8`, `I8` to `I64`, `U16` to `U64`, `F32` or `F64` for
//! `mask` (nonzero = response token). `F16` and `BF16` are refused with a hint: a trainer
//! computes log-probs in float32, so `.float()` them before saving.
//!
//! Which arrays are read depends on the configs: the top-K pair only when a config's
//! divergence needs it, `logp_ref` only when a config has a KL penalty; `is_weights`
//! whenever the file holds it (it multiplies every objective). Others are ignored.
//! Which names the arrays go by is [`crate::names`].

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array, Array2, Array3, ArrayD, Dimension, Ix1, Ix2, Ix3, IxDyn};
use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Batch, Config};
use safetensors::Dtype as StDtype;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::failure::{Failure, chain};
use crate::names::{Lookup, Names, Resolved, missing};
use crate::npz::{
    ALWAYS, Declared, Dtype, Found, Input, NpyFloat, OwnedAdvantages, OwnedMask, Role, Want,
    check_data_len, dtype_fix, one_float_type, regular_file,
};

/// The input arrays the configs use, owned, in one float type `F`.
pub struct Arrays<F> {
    pub logp: Array2<F>,
    pub logp_old: Array2<F>,
    pub advantages: OwnedAdvantages<F>,
    pub mask: OwnedMask,
    pub topk: Option<(Array3<F>, Array3<F>)>,
    pub logp_ref: Option<Array2<F>>,
    pub is_weights: Option<Array2<F>>,
    /// Which of the file's arrays each was read from, for messages about their values:
    /// ` (under --names verl: logp is the file's log_prob, ...)`, or empty.
    pub read_as: String,
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

impl Loaded {
    /// [`Arrays::read_as`]: to append to a message about the arrays' values.
    pub fn read_as(&self) -> &str {
        match self {
            Self::F32(a) => &a.read_as,
            Self::F64(a) => &a.read_as,
        }
    }
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

/// Reads a batch file whose arrays go by `names` (`--names`).
///
/// Every array's header is read and checked first: its dtype, its shape against what
/// the batch needs (from `logp`'s (B, L)), and the total size of the arrays read against
/// `limit`; only then is any array's data read, each with a bounded read.
pub fn load_named(
    path: &Path,
    needs: Needs,
    limit: MaxMemory,
    names: Names,
) -> Result<Loaded, Failure> {
    read_file(path, needs, limit, Lookup { names })
}

fn read_file(
    path: &Path,
    needs: Needs,
    limit: MaxMemory,
    lookup: Lookup,
) -> Result<Loaded, Failure> {
    match Format::of(path) {
        Format::Npz => read_from(&mut Input::open(path)?, needs, limit, lookup),
        Format::Safetensors => read_from(&mut StInput::open(path)?, needs, limit, lookup),
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
        read_as: String::new(),
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
pub(crate) trait Source {
    /// The file, for messages.
    fn path(&self) -> &Path;
    /// The file's format, for the hints of messages.
    fn format(&self) -> Format;
    /// Whether the file holds an array of this name.
    fn has(&self, name: &str) -> bool;
    /// The names of the arrays the file holds, in its order.
    fn names(&self) -> Vec<String>;
    /// An array's declared shape and dtype, for messages; `None` if they cannot be read.
    fn peek(&mut self, name: &str) -> Option<(Vec<usize>, String)>;
    /// An array's declared shape and dtype, its data unread; the dtype must suit `role`.
    fn declared(
        &mut self,
        name: &'static str,
        needed_by: &str,
        role: Role,
    ) -> Result<Declared, Failure>;
    fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure>;
    fn advantages<F: NpyFloat>(
        &mut self,
        name: &'static str,
    ) -> Result<OwnedAdvantages<F>, Failure>;
    fn mask(&mut self, name: &'static str) -> Result<OwnedMask, Failure>;
}

impl Source for Input {
    fn path(&self) -> &Path {
        Input::path(self)
    }
    fn format(&self) -> Format {
        Format::Npz
    }
    fn has(&self, name: &str) -> bool {
        Input::has(self, name)
    }
    fn names(&self) -> Vec<String> {
        Input::names(self)
    }
    fn peek(&mut self, name: &str) -> Option<(Vec<usize>, String)> {
        Input::peek(self, name)
    }
    fn declared(
        &mut self,
        name: &'static str,
        needed_by: &str,
        role: Role,
    ) -> Result<Declared, Failure> {
        Input::declared(self, name, needed_by, role)
    }
    fn float<F: NpyFloat, D: Dimension>(
        &mut self,
        name: &'static str,
        needed_by: &str,
        expected: &str,
    ) -> Result<Array<F, D>, Failure> {
        Input::float(self, name, needed_by, expected)
    }
    fn advantages<F: NpyFloat>(
        &mut self,
        name: &'static str,
    ) -> Result<OwnedAdvantages<F>, Failure> {
        Input::advantages(self, name)
    }
    fn mask(&mut self, name: &'static str) -> Result<OwnedMask, Failure> {
        Input::mask(self, name)
    }
}

/// The default of `--max-memory`: 8 GiB.
pub const DEFAULT_MAX_MEMORY: &str = "8G";

/// `--max-memory`: the most bytes the arrays read from one batch file may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxMemory(pub u64);

impl MaxMemory {
    /// A byte count, plain or with a binary suffix: `8G`, `512M`, `64K`, `1T` (also
    /// `8GiB`, `8GB`; 1K = 1024), case-insensitive.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let (number, suffix) = t.split_at(digits);
        let bad = || {
            format!(
                "expected a byte count such as 8G, 512M or 1000000 (1K = 1024 bytes), got {text:?}"
            )
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        let suffix = suffix.trim().to_ascii_uppercase();
        let unit = suffix
            .strip_suffix("IB")
            .or_else(|| suffix.strip_suffix('B'))
            .unwrap_or(&suffix);
        let shift = match unit {
            "" if suffix.is_empty() || suffix == "B" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(bad()),
        };
        n.checked_mul(1 << shift)
            .map(Self)
            .ok_or_else(|| format!("{text:?} is more than 2^64 bytes"))
    }
}

impl fmt::Display for MaxMemory {
    /// `8G (8589934592 bytes)`, or `1000 bytes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
            if n >= 1 << shift && n.trailing_zeros() >= shift {
                return write!(f, "{}{unit} ({n} bytes)", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

/// The arrays' declared sizes added up, against `--max-memory`.
struct Budget<'a> {
    path: &'a Path,
    limit: MaxMemory,
    used: u64,
}

impl Budget<'_> {
    /// Counts an array's size once read; refuses it if the total passes the limit, or if
    /// the file does not hold the data it declares.
    fn add(&mut self, name: &str, d: &Declared) -> Result<(), Failure> {
        self.within_limit(name, d)?;
        check_data_len(self.path, name, &d.shape, &d.dtype, d.file_size, d.data_len)?;
        Ok(())
    }

    fn within_limit(&mut self, name: &str, d: &Declared) -> Result<(), Failure> {
        let bytes = d
            .shape
            .iter()
            .try_fold(1u64, |n, &x| n.checked_mul(x as u64))
            .and_then(|n| n.checked_mul(d.mem_size as u64));
        let total = bytes.and_then(|b| b.checked_add(self.used));
        match total {
            Some(t) if t <= self.limit.0 => {
                self.used = t;
                Ok(())
            }
            _ => {
                let (size, total) = match (bytes, total) {
                    (Some(b), Some(t)) => (format!("{b} bytes"), format!("{t} bytes")),
                    (Some(b), None) => (format!("{b} bytes"), "more than 2^64 bytes".into()),
                    _ => ("more than 2^64 bytes".into(), "more than 2^64 bytes".into()),
                };
                Err(Failure::Input(format!(
                    "{}: array {name} declares shape {:?} of dtype {}, {size}: the arrays \
                     read would take {total}, more than the --max-memory limit of {}",
                    self.path.display(),
                    d.shape,
                    d.dtype,
                    self.limit
                )))
            }
        }
    }
}

/// Reads the batch in two passes: first every array's header (the dtypes, the shapes
/// against `logp`'s (B, L), the total size against the limit), then the data.
fn read_from(
    src: &mut impl Source,
    needs: Needs,
    limit: MaxMemory,
    lookup: Lookup,
) -> Result<Loaded, Failure> {
    let (float, names) = check(src, needs, limit, lookup)?;
    Ok(match float {
        Dtype::F32 => Loaded::F32(read_rest(src, &names)?),
        _ => Loaded::F64(read_rest(src, &names)?),
    })
}

/// The name the file holds `array` under (by `--names`), or the missing-array error.
fn resolve(
    src: &mut impl Source,
    lookup: Lookup,
    array: &'static str,
    needed_by: &str,
) -> Result<&'static str, Failure> {
    match lookup.names.find(src, array) {
        Some(name) => Ok(name),
        None => Err(missing(src, lookup, array, needed_by)),
    }
}

/// The first pass: every array the configs use, found under its name (`--names`) and
/// declared with the dtype and shape the batch needs, and all of them within the limit.
/// Returns the float type and the names found.
fn check(
    src: &mut impl Source,
    needs: Needs,
    limit: MaxMemory,
    lookup: Lookup,
) -> Result<(Dtype, Resolved), Failure> {
    let path = src.path().to_path_buf();
    let mut budget = Budget {
        path: &path,
        limit,
        used: 0,
    };
    let logp_name = resolve(src, lookup, "logp", ALWAYS)?;
    let logp = src.declared(logp_name, ALWAYS, Role::Logp)?;
    let (b, l) = match logp.shape[..] {
        [b, l] => (b, l),
        _ => return Err(shape_error(&path, logp_name, &logp.shape, "(B, L)")),
    };
    let float = logp.float.unwrap_or(Dtype::F64);
    budget.add(logp_name, &logp)?;
    let bl = format!("({b}, {l})");
    let weights = lookup.names.find(src, "is_weights");
    let mut expect = |array: &'static str,
                      needed_by: &str,
                      role: Role,
                      ok: &dyn Fn(&[usize]) -> bool,
                      expected: &str| {
        let name = resolve(src, lookup, array, needed_by)?;
        let d = src.declared(name, needed_by, role)?;
        if !ok(&d.shape) {
            return Err(shape_error(&path, name, &d.shape, expected));
        }
        budget.add(name, &d)?;
        Ok::<_, Failure>((name, d))
    };
    let is_bl = |s: &[usize]| s == [b, l];
    let (logp_old, _) = expect("logp_old", ALWAYS, Role::Float(float), &is_bl, &bl)?;
    let (advantages, _) = expect(
        "advantages",
        ALWAYS,
        Role::Float(float),
        &|s| s == [b] || s == [b, l],
        &format!("({b},) or ({b}, {l})"),
    )?;
    let (mask, _) = expect("mask", ALWAYS, Role::Mask, &is_bl, &bl)?;
    let mut topk = None;
    if let Some(d) = needs.topk {
        let by = format!("divergence {}", d.name());
        let (old_name, old) = expect(
            "topk_logp_old",
            &by,
            Role::Float(float),
            &|s| s.len() == 3 && s[..2] == [b, l],
            &format!("({b}, {l}, K)"),
        )?;
        let k = old.shape[2];
        let (new_name, _) = expect(
            "topk_logp",
            &by,
            Role::Float(float),
            &|s| s == [b, l, k],
            &format!("({b}, {l}, {k})"),
        )?;
        topk = Some((old_name, new_name));
    }
    let mut logp_ref = None;
    if needs.logp_ref {
        let (name, _) = expect(
            "logp_ref",
            "the kl penalty",
            Role::Float(float),
            &is_bl,
            &bl,
        )?;
        logp_ref = Some(name);
    }
    if weights.is_some() {
        expect("is_weights", ALWAYS, Role::Float(float), &is_bl, &bl)?;
    }
    let names = Resolved {
        names: lookup.names,
        logp: logp_name,
        logp_old,
        advantages,
        mask,
        topk,
        logp_ref,
        is_weights: weights,
    };
    Ok((float, names))
}

fn read_rest<F: NpyFloat>(src: &mut impl Source, names: &Resolved) -> Result<Arrays<F>, Failure> {
    const BL: &str = "(B, L)";
    const BLK: &str = "(B, L, K)";
    let logp = src.float::<F, Ix2>(names.logp, ALWAYS, BL)?;
    let logp_old = src.float::<F, Ix2>(names.logp_old, ALWAYS, BL)?;
    let advantages = src.advantages(names.advantages)?;
    let mask = src.mask(names.mask)?;
    let topk = match names.topk {
        Some((old, new)) => {
            let by = "a top-K divergence";
            let old = src.float::<F, Ix3>(old, by, BLK)?;
            let new = src.float::<F, Ix3>(new, by, BLK)?;
            Some((old, new))
        }
        None => None,
    };
    let logp_ref = match names.logp_ref {
        Some(name) => Some(src.float::<F, Ix2>(name, "the kl penalty", BL)?),
        None => None,
    };
    let is_weights = match names.is_weights {
        Some(name) => Some(src.float::<F, Ix2>(name, ALWAYS, BL)?),
        None => None,
    };
    Ok(Arrays {
        logp,
        logp_old,
        advantages,
        mask,
        topk,
        logp_ref,
        is_weights,
        read_as: names.read_as(),
    })
}

// ---------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------

/// The largest safetensors JSON header read, in bytes (the `safetensors` crate's own
/// limit).
const MAX_ST_HEADER: u64 = 100_000_000;

/// Bytes decoded per read.
const CHUNK: usize = 1 << 16;

/// An open safetensors file: by name, each tensor's dtype, shape and byte range, checked
/// against the file's length; the data is read only for the tensors used.
struct StInput {
    path: PathBuf,
    file: File,
    /// Where the data (after the header) starts in the file.
    data_start: u64,
    tensors: HashMap<String, StTensor>,
}

/// A tensor's entry in the JSON header.
#[derive(Deserialize)]
struct StTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    /// The byte range within the data, `[start, end)`.
    data_offsets: (u64, u64),
}

/// The header's entries in the order the file lists them, duplicates kept (a JSON
/// object read into a map would keep only the last of a name); `__metadata__` is
/// skipped.
struct StHeader(Vec<(String, StTensor)>);

impl<'de> Deserialize<'de> for StHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = StHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if name == "__metadata__" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        entries.push((name, map.next_value::<StTensor>()?));
                    }
                }
                Ok(StHeader(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

impl StInput {
    /// Opens a file and reads its header only: the 8-byte length, then the JSON (at most
    /// [`MAX_ST_HEADER`] bytes, and within the file). Every tensor's byte range is
    /// checked against its dtype and shape and against the file's length.
    fn open(path: &Path) -> Result<Self, Failure> {
        let cannot_open = |e| Failure::input(format!("cannot open input {}", path.display()), &e);
        let not_st = |msg: &dyn fmt::Display| {
            Failure::Input(format!(
                "input {} is not a readable safetensors file: {msg}",
                path.display()
            ))
        };
        let meta = fs::metadata(path).map_err(cannot_open)?;
        regular_file(path, &meta)?;
        let file_len = meta.len();
        let mut file = File::open(path).map_err(cannot_open)?;
        let mut prefix = [0u8; 8];
        if file_len < 8 || file.read_exact(&mut prefix).is_err() {
            return Err(not_st(&format_args!(
                "its {file_len} bytes are too few for the 8-byte header length"
            )));
        }
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_ST_HEADER || header_len > file_len - 8 {
            return Err(not_st(&format_args!(
                "its header declares a length of {header_len} bytes, more than {}",
                if header_len > MAX_ST_HEADER {
                    format!("the {MAX_ST_HEADER} read")
                } else {
                    format!("the {file_len}-byte file holds")
                }
            )));
        }
        let mut raw = Vec::new();
        (&mut file)
            .take(header_len)
            .read_to_end(&mut raw)
            .map_err(cannot_open)?;
        if raw.len() as u64 != header_len {
            return Err(not_st(&"the file ends within its header"));
        }
        let header: StHeader = serde_json::from_slice(&raw).map_err(|e| not_st(&e))?;
        drop(raw);
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let fail = |msg: fmt::Arguments<'_>| Failure::Input(format!("{}: {msg}", path.display()));
        let mut tensors = HashMap::with_capacity(header.0.len());
        for (name, t) in header.0 {
            let (start, end) = t.data_offsets;
            let bytes = t
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| n.checked_mul(t.dtype.bitsize() as u64))
                .map(|bits| bits.div_ceil(8));
            let declared = bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string());
            if start > end || end > data_len {
                return Err(fail(format_args!(
                    "array {name} has data_offsets [{start}, {end}], past the end of the \
                     file's {data_len} bytes of data"
                )));
            }
            if bytes != Some(end - start) {
                return Err(fail(format_args!(
                    "array {name} declares shape {:?} of dtype {:?}, {declared} bytes, but \
                     its data_offsets [{start}, {end}] hold {} bytes",
                    t.shape,
                    t.dtype,
                    end - start
                )));
            }
            if tensors.insert(name.clone(), t).is_some() {
                return Err(fail(format_args!(
                    "array {name} appears twice in the safetensors header"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
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

    /// The tensor's dtype is not the `expected` one; the message ends with the
    /// conversion to `want` that fixes it, if there is one.
    fn dtype_error(&self, name: &str, dtype: StDtype, expected: &str, want: Want) -> Failure {
        let found = match dtype {
            StDtype::F16 => Found::Float16,
            StDtype::BF16 => Found::BFloat16,
            StDtype::F32 | StDtype::F64 => Found::Float,
            StDtype::BOOL => Found::Bool,
            StDtype::I8
            | StDtype::I16
            | StDtype::I32
            | StDtype::I64
            | StDtype::U8
            | StDtype::U16
            | StDtype::U32
            | StDtype::U64 => Found::Int,
            _ => Found::Other,
        };
        let fix = dtype_fix(name, found, want, true);
        self.fail(format_args!(
            "array {name} has dtype {dtype:?}, expected {expected}{fix}"
        ))
    }

    /// Decodes a tensor as elements `S` (little-endian, `size` bytes each), mapped to
    /// `T`, with `D`'s number of dimensions: its byte range only, chunk by chunk, never
    /// more than the range.
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
        let cannot =
            |msg: &dyn fmt::Display| self.fail(format_args!("cannot read array {name}: {msg}"));
        // `open` has checked that the byte range holds exactly the shape's elements.
        let (start, end) = t.data_offsets;
        let len = usize::try_from(end - start).map_err(|e| cannot(&e))?;
        let count = len / size;
        let mut data: Vec<T> = Vec::new();
        if data.try_reserve_exact(count).is_err() {
            return Err(cannot(&format_args!("cannot allocate {len} bytes")));
        }
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.data_start + start))
            .map_err(|e| cannot(&chain(&e)))?;
        let mut r = file.take(end - start);
        let mut buf = vec![0u8; CHUNK.min(len)];
        let per_chunk = (CHUNK / size).max(1);
        let mut left = count;
        while left > 0 {
            let n = left.min(per_chunk);
            let chunk = &mut buf[..n * size];
            r.read_exact(chunk).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    cannot(&"the file ends within its data (was it truncated while read?)")
                } else {
                    cannot(&chain(&e))
                }
            })?;
            data.extend(chunk.chunks_exact(size).map(|b| map(decode(b))));
            left -= n;
        }
        ArrayD::from_shape_vec(IxDyn(&t.shape), data)
            .and_then(ArrayD::into_dimensionality)
            .map_err(|e| cannot(&e))
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

/// The npz dtype of a safetensors float dtype.
fn st_float_type(d: StDtype) -> Option<Dtype> {
    match d {
        StDtype::F32 => Some(Dtype::F32),
        StDtype::F64 => Some(Dtype::F64),
        _ => None,
    }
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
        (Dtype::F32, StDtype::F32) => {
            st.read(name, t, 4, f32_le, |x| F::from_f64(f64::from(x)), expected)
        }
        (Dtype::F64, StDtype::F64) => st.read(name, t, 8, f64_le, F::from_f64, expected),
        _ => Err(st.dtype_error(name, t.dtype, &one_float_type(F::NPY), Want::Float(F::NPY))),
    }
}

impl Source for StInput {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Safetensors
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// By where their data starts in the file: the order they were saved in.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<(&String, &StTensor)> = self.tensors.iter().collect();
        names.sort_by_key(|&(n, t)| (t.data_offsets.0, n));
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    fn peek(&mut self, name: &str) -> Option<(Vec<usize>, String)> {
        let t = self.tensors.get(name)?;
        Some((t.shape.clone(), format!("{:?}", t.dtype)))
    }

    fn declared(
        &mut self,
        name: &'static str,
        needed_by: &str,
        role: Role,
    ) -> Result<Declared, Failure> {
        let t = self.tensor(name, needed_by)?;
        let float = st_float_type(t.dtype);
        let mem_size = match (role, float) {
            (Role::Logp, Some(f)) => f.size(),
            (Role::Logp, None) => {
                return Err(self.dtype_error(name, t.dtype, "float32 or float64", Want::of(role)));
            }
            (Role::Float(f), Some(g)) if f == g => f.size(),
            (Role::Float(f), _) => {
                return Err(self.dtype_error(name, t.dtype, &one_float_type(f), Want::of(role)));
            }
            (Role::Mask, Some(f)) => f.size(),
            (Role::Mask, None) => match t.dtype {
                StDtype::BOOL
                | StDtype::U8
                | StDtype::I8
                | StDtype::I16
                | StDtype::U16
                | StDtype::I32
                | StDtype::U32
                | StDtype::I64
                | StDtype::U64 => 1,
                d => return Err(self.dtype_error(name, d, MASK_DTYPES_ST, Want::Mask)),
            },
        };
        let file_size = t.dtype.bitsize().div_ceil(8);
        Ok(Declared {
            shape: t.shape.clone(),
            dtype: format!("{:?}", t.dtype),
            float,
            mem_size,
            file_size,
            data_len: t.data_offsets.1 - t.data_offsets.0,
        })
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

    fn advantages<F: NpyFloat>(
        &mut self,
        name: &'static str,
    ) -> Result<OwnedAdvantages<F>, Failure> {
        const SHAPES: &str = "(B,) or (B, L)";
        let t = self.tensor(name, ALWAYS)?;
        match t.shape.len() {
            1 => st_float::<F, Ix1>(self, name, t, SHAPES).map(OwnedAdvantages::PerRow),
            2 => st_float::<F, Ix2>(self, name, t, SHAPES).map(OwnedAdvantages::PerToken),
            _ => Err(shape_error(&self.path, name, &t.shape, SHAPES)),
        }
    }

    fn mask(&mut self, name: &'static str) -> Result<OwnedMask, Failure> {
        const BL: &str = "(B, L)";
        let t = self.tensor(name, ALWAYS)?;
        Ok(match t.dtype {
            StDtype::BOOL => OwnedMask::Bool(self.read(name, t, 1, |b| b[0] != 0, id, BL)?),
            StDtype::U8 => OwnedMask::U8(self.read(name, t, 1, |b| b[0], id, BL)?),
            StDtype::F32 => OwnedMask::F32(self.read(name, t, 4, f32_le, id, BL)?),
            StDtype::F64 => OwnedMask::F64(self.read(name, t, 8, f64_le, id, BL)?),
            StDtype::I8 => OwnedMask::U8(self.read(name, t, 1, nonzero_le::<1>, id, BL)?),
            StDtype::I16 | StDtype::U16 => {
                OwnedMask::U8(self.read(name, t, 2, nonzero_le::<2>, id, BL)?)
            }
            StDtype::I32 | StDtype::U32 => {
                OwnedMask::U8(self.read(name, t, 4, nonzero_le::<4>, id, BL)?)
            }
            StDtype::I64 | StDtype::U64 => {
                OwnedMask::U8(self.read(name, t, 8, nonzero_le::<8>, id, BL)?)
            }
            d => {
                return Err(self.dtype_error(name, d, MASK_DTYPES_ST, Want::Mask));
            }
        })
    }
}

/// The dtypes a safetensors mask may have, for messages.
const MASK_DTYPES_ST: &str = "BOOL, an integer type, float32 or float64";
