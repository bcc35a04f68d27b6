//! The element types the crate accepts: [`Float`] for log-probabilities and advantages,
//! [`MaskElem`] for the response mask.
//!
//! Inputs are `f32` or `f64`. All arithmetic runs in `f64` whatever the input type (an
//! `f32` value is widened on load and the outputs are rounded once on store), so `f32`
//! and `f64` batches give the same decisions except where a value sits within `f32`
//! rounding of a threshold.

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for bool {}
    impl Sealed for u8 {}
}

/// A floating-point input and output type: `f32` or `f64`. Sealed.
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

/// An element type for the response mask: `bool`, `u8`, `f32` or `f64`. Sealed.
///
/// A position is a response token when its mask value is nonzero. A float mask must be
/// finite everywhere (a NaN mask value is an error, not a guess).
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

impl MaskElem for u8 {
    const CAN_BE_INVALID: bool = false;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
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

impl MaskElem for f32 {
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

impl MaskElem for f64 {
    const CAN_BE_INVALID: bool = true;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
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
