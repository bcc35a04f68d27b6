//! The element types the crate accepts: [`Float`] for log-probabilities and advantages,
//! [`MaskElem`] for the response mask.
//!
//! Inputs are `f32` or `f64`. All arithmetic runs in `f64` whatever the input type (an
//! `f32` value is widened on load and the outputs are rounded once on store), so `f32`
//! and `f64` batches give the same decisions except where a value sits within `f32`
//! rounding of a threshold.

mod sealed {
    /// Seals `Float` and `MaskElem`: not implementable outside the crate.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for bool {}
}

/// A floating-point input and output type: `f32` or `f64`. Sealed.
///
/// ```
/// use cppo::Float;
/// fn widen<F: Float>(x: F) -> f64 {
///     x.to_f64()
/// }
/// assert_eq!(widen(0.5f32), 0.5);
/// assert_eq!(f32::from_f64(0.1), 0.1f32); // rounded to nearest
/// assert_eq!((f32::DTYPE, f64::DTYPE), ("float32", "float64"));
/// ```
pub trait Float:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Default
    + std::fmt::Debug
    + std::fmt::Display
    + 'static
{
    /// The type's name as numpy spells it (`float32`, `float64`).
    const DTYPE: &'static str;
    /// Widen to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Round from `f64` to the nearest value of this type.
    fn from_f64(x: f64) -> Self;
}

impl Float for f32 {
    const DTYPE: &'static str = "float32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "float64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// An element type for the response mask: `bool`, an integer type (`u8`, `i8` to `i64`,
/// `u16` to `u64`), `f32` or `f64`. Sealed.
///
/// A position is a response token when its mask value is nonzero. A float mask must be
/// finite everywhere (a NaN mask value is an error, not a guess).
///
/// ```
/// use cppo::MaskElem;
/// assert!(7i64.is_on() && !0u16.is_on());
/// assert!(!f32::NAN.is_valid() && f32::NAN.is_on());
/// ```
pub trait MaskElem: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Whether some values of this type are invalid (NaN or infinite floats).
    const CAN_BE_INVALID: bool;
    /// The value widened to `f64`, for error messages and the finiteness check.
    fn to_f64(self) -> f64;
    /// Whether the position is a response token.
    fn is_on(self) -> bool;
    /// Whether the value is allowed at all (finite for floats, always for integers). An
    /// invalid value is always [`is_on`](MaskElem::is_on) (NaN and ±∞ are nonzero): the
    /// kernel relies on it to skip blocks of padding without missing one.
    fn is_valid(self) -> bool;
}

impl MaskElem for bool {
    const CAN_BE_INVALID: bool = false;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
    #[inline(always)]
    fn is_on(self) -> bool {
        self
    }
    #[inline(always)]
    fn is_valid(self) -> bool {
        true
    }
}

macro_rules! int_masks {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl MaskElem for $t {
            const CAN_BE_INVALID: bool = false;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn is_on(self) -> bool {
                self != 0
            }
            #[inline(always)]
            fn is_valid(self) -> bool {
                true
            }
        }
    )*};
}
int_masks!(u8, i8, i16, i32, i64, u16, u32, u64);

macro_rules! float_masks {
    ($($t:ty),*) => {$(
        impl MaskElem for $t {
            const CAN_BE_INVALID: bool = true;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
            #[inline(always)]
            fn is_on(self) -> bool {
                self != 0.0
            }
            #[inline(always)]
            fn is_valid(self) -> bool {
                self.is_finite()
            }
        }
    )*};
}
float_masks!(f32, f64);

/// Calls `$cb!(pre...; Variant: type, ...)` with every mask element type and the name of
/// its [`Mask`] variant: the one list the mask enums and their dispatch come from.
///
/// [`Mask`]: crate::Mask
macro_rules! mask_types {
    ($cb:ident ! ( $($pre:tt)* )) => {
        $cb! { $($pre)* ;
            Bool: bool,
            U8: u8,
            I8: i8,
            I16: i16,
            I32: i32,
            I64: i64,
            U16: u16,
            U32: u32,
            U64: u64,
            F32: f32,
            F64: f64,
        }
    };
}
pub(crate) use mask_types;

/// Runs `$body` with `$m` bound to the view inside a mask enum (`Mask`, `MaskRow`,
/// `MaskLane`), whatever its element type.
macro_rules! with_mask {
    ($mask:expr, $enum:ident, |$m:ident| $body:expr) => {
        $crate::float::mask_types!(dispatch_mask!($mask, $enum, $m, $body))
    };
}
pub(crate) use with_mask;

/// The `match` of [`with_mask`].
macro_rules! dispatch_mask {
    ($mask:expr, $enum:ident, $m:ident, $body:expr ; $($v:ident: $t:ty,)*) => {
        match $mask {
            $( $enum::$v($m) => $body, )*
        }
    };
}
pub(crate) use dispatch_mask;
