//! The arrays of a generated batch: their element types (`Dt`), as numpy and
//! safetensors name them and as the file holds them, and the arrays themselves (`Arr`),
//! encoded big- or little-endian, in C or Fortran order.

/// An element type of a generated array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dt {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    /// Only in arrays no command reads; the bits are written as given.
    F16,
    F32,
    F64,
}

impl Dt {
    pub(super) const fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 | Self::F16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    pub(super) const fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }

    /// numpy's `descr`, in byte order `order` (`<`, `>` or `=`; `|` for one byte).
    pub(super) fn descr(self, order: char) -> String {
        let code = match self {
            Self::Bool => "b1",
            Self::U8 => "u1",
            Self::I8 => "i1",
            Self::I16 => "i2",
            Self::U16 => "u2",
            Self::I32 => "i4",
            Self::U32 => "u4",
            Self::I64 => "i8",
            Self::U64 => "u8",
            Self::F16 => "f2",
            Self::F32 => "f4",
            Self::F64 => "f8",
        };
        let order = if self.size() == 1 { '|' } else { order };
        format!("{order}{code}")
    }

    /// The safetensors dtype.
    pub(super) const fn st(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::F64 => "F64",
        }
    }

    /// `v` as the file holds it, read back.
    fn stored(self, v: f64) -> f64 {
        let i = v as i64;
        match self {
            Self::F64 | Self::F16 => v,
            Self::F32 => f64::from(v as f32),
            Self::Bool | Self::U8 => f64::from(i as u8),
            Self::I8 => f64::from(i as i8),
            Self::I16 => f64::from(i as i16),
            Self::U16 => f64::from(i as u16),
            Self::I32 => f64::from(i as i32),
            Self::U32 => f64::from(i as u32),
            Self::I64 => i as f64,
            Self::U64 => (i as u64) as f64,
        }
    }

    fn encode(self, v: f64, big: bool, out: &mut Vec<u8>) {
        macro_rules! put {
            ($x:expr) => {{
                let x = $x;
                out.extend_from_slice(&if big {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                });
            }};
        }
        let i = v as i64;
        match self {
            Self::F64 => put!(v),
            Self::F32 => put!(v as f32),
            Self::F16 | Self::U16 => put!(i as u16),
            Self::Bool | Self::U8 => put!(i as u8),
            Self::I8 => put!(i as i8),
            Self::I16 => put!(i as i16),
            Self::I32 => put!(i as i32),
            Self::U32 => put!(i as u32),
            Self::I64 => put!(i),
            Self::U64 => put!(i as u64),
        }
    }
}

/// One array of a generated batch: its values in C order, as `f64` (converted to its
/// dtype when encoded).
#[derive(Clone, Debug)]
pub(super) struct Arr {
    pub(super) name: String,
    pub(super) dt: Dt,
    pub(super) shape: Vec<usize>,
    pub(super) values: Vec<f64>,
}

impl Arr {
    pub(super) fn new(name: &str, dt: Dt, shape: &[usize], values: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            dt,
            shape: shape.to_vec(),
            values,
        }
    }

    /// The value at flat index `i` as the file holds it.
    pub(super) fn at(&self, i: usize) -> f64 {
        self.values.get(i).map_or(0.0, |&v| self.dt.stored(v))
    }

    /// The data: big- or little-endian, in Fortran or C order.
    pub(super) fn bytes(&self, big: bool, fortran: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.values.len() * self.dt.size());
        if fortran {
            for i in fortran_order(&self.shape) {
                self.dt.encode(self.values[i], big, &mut out);
            }
        } else {
            for &v in &self.values {
                self.dt.encode(v, big, &mut out);
            }
        }
        out
    }

    pub(super) fn dims(&self) -> Vec<String> {
        self.shape.iter().map(usize::to_string).collect()
    }
}

/// The C-order index of each element in Fortran order.
fn fortran_order(shape: &[usize]) -> Vec<usize> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|mut f| {
            // Decompose f with the first axis fastest; recompose with the last fastest.
            let mut index = vec![0; shape.len()];
            for (ix, &d) in index.iter_mut().zip(shape) {
                *ix = f % d;
                f /= d;
            }
            index.iter().zip(shape).fold(0, |c, (&ix, &d)| c * d + ix)
        })
        .collect()
}
