//! The `.npy` members of an npz archive: a member before it is encoded (`NpyPlan`) and
//! as the archive holds it (`Member`), the `.npy` encoding, and the dtypes the readers
//! accept.

use rand::RngExt;
use rand::rngs::StdRng;

use super::array::Arr;
use super::generate::pick;

/// One `.npy` member of an archive, before it is encoded.
#[derive(Clone, Debug)]
pub(super) struct NpyPlan {
    /// The array it holds.
    pub(super) array: String,
    /// Its name in the archive.
    pub(super) entry: String,
    pub(super) descr: String,
    pub(super) fortran: bool,
    /// The shape as a Python tuple.
    pub(super) shape: String,
    /// The whole header dict, replacing the one of `descr`, `fortran` and `shape`.
    pub(super) dict: Option<String>,
    /// The `.npy` format version: 1, 2 or 3.
    version: u8,
    pub(super) data: Vec<u8>,
    pub(super) deflate: bool,
}

/// A member as the archive holds it.
pub(super) struct Member {
    /// The array it holds.
    pub(super) array: String,
    pub(super) entry: String,
    pub(super) bytes: Vec<u8>,
    pub(super) deflate: bool,
}

impl NpyPlan {
    /// `array` as numpy writes it: little-endian, C order, format 1.0, `NAME.npy`.
    pub(super) fn plain(a: &Arr, deflate: bool) -> Self {
        Self {
            array: a.name.clone(),
            entry: format!("{}.npy", a.name),
            descr: a.dt.descr('<'),
            fortran: false,
            shape: py_shape(&a.dims()),
            dict: None,
            version: 1,
            data: a.bytes(false, false),
            deflate,
        }
    }

    /// `array` in a random valid encoding.
    pub(super) fn random(r: &mut StdRng, a: &Arr) -> Self {
        let order = match r.random_range(0..20) {
            0..=2 => '>',
            3 => '=',
            _ => '<',
        };
        let big = order == '>' || (order == '=' && cfg!(target_endian = "big"));
        let fortran = a.shape.len() >= 2 && r.random_bool(0.15);
        Self {
            array: a.name.clone(),
            entry: if r.random_bool(0.1) {
                a.name.clone()
            } else {
                format!("{}.npy", a.name)
            },
            descr: a.dt.descr(order),
            fortran,
            shape: py_shape(&a.dims()),
            dict: None,
            version: pick(r, &[1, 1, 1, 1, 1, 1, 1, 2, 3]),
            data: a.bytes(big, fortran),
            deflate: r.random_bool(0.5),
        }
    }

    fn dict(&self) -> String {
        self.dict.clone().unwrap_or_else(|| {
            format!(
                "{{'descr': '{}', 'fortran_order': {}, 'shape': {}, }}",
                self.descr,
                if self.fortran { "True" } else { "False" },
                self.shape
            )
        })
    }

    pub(super) fn member(&self) -> Member {
        Member {
            array: self.array.clone(),
            entry: self.entry.clone(),
            bytes: npy(self.version, &self.dict(), &self.data),
            deflate: self.deflate,
        }
    }
}

/// A Python tuple of dims: `()`, `(3,)`, `(2, 6)`.
pub(super) fn py_shape<S: AsRef<str>>(dims: &[S]) -> String {
    match dims {
        [] => "()".into(),
        [one] => format!("({},)", one.as_ref()),
        _ => format!(
            "({})",
            dims.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An `.npy` file of format `version`: the magic string, the version, the header
/// length (2 bytes in 1.0, 4 in 2.0 and 3.0), the dict padded with spaces and a newline
/// to a multiple of 64 bytes (as numpy pads it), then the data.
fn npy(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let prefix = if version == 1 { 10 } else { 12 };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    let mut header = dict.to_string();
    header.push_str(&" ".repeat(total - prefix - dict.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend(
            u16::try_from(header.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
    } else {
        out.extend(
            u32::try_from(header.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
    }
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// The kind ('b', 'u', 'i' or 'f') and size of an `.npy` dtype the readers accept, as
/// `docs/command_line.md` and `cli/src/npz.rs` list them: `<`, `>`, `=` or no
/// byte-order character, `|` for one-byte types only.
pub(super) fn npy_kind(descr: &str) -> Option<(char, usize)> {
    let code = match descr.chars().next()? {
        '<' | '>' | '|' | '=' => &descr[1..],
        _ => descr,
    };
    let kind_size = match code {
        "b1" => ('b', 1),
        "u1" => ('u', 1),
        "i1" => ('i', 1),
        "u2" | "u4" | "u8" | "i2" | "i4" | "i8" | "f4" | "f8" => {
            let mut chars = code.chars();
            let kind = chars.next()?;
            (kind, chars.as_str().parse().ok()?)
        }
        _ => return None,
    };
    if descr.starts_with('|') && kind_size.1 != 1 {
        return None;
    }
    Some(kind_size)
}
