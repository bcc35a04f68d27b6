//! The element types the crate accepts ([`Float`] for log-probabilities and advantages,
//! [`MaskElem`] for the response mask) and the arithmetic it computes them with
//! ([`Numerics`]).
//!
//! Inputs are `f32` or `f64`. By default ([`Numerics::Exact`]) all arithmetic runs in
//! `f64` whatever the input type (an `f32` value is widened on load and the outputs are
//! rounded once on store), so `f32` and `f64` batches give the same decisions except
//! where a value sits within `f32` rounding of a threshold.
//!
//! [`Numerics::F32Exp`] is the one opt-in exception: the per-token exponentials (ρ_t, p_t,
//! q_t and the top-K probabilities) are taken in `f32`, as the official PyTorch code
//! takes them on `f32` log-probs, and everything else stays in `f64`. An exponential
//! e^x then carries a relative error of at most about 1.8e-7 + |x| · 6e-8 (its `f32`
//! arithmetic, and the rounding of x to `f32`) instead of about 2e-16, and a decision
//! can differ from the exact one only where the exact value sits within that of its
//! threshold. Under either numerics the results are the same bits whatever the thread
//! count, the column chunking and the CPU's instruction set.

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

/// The arithmetic of the per-token exponentials: a field of [`Config`](crate::Config)
/// (`"numerics"` in JSON: `"exact"`, the default, or `"f32_exp"`).
///
/// - **`Exact`**: every exponential in `f64`, within 2 `f64` ulp of the correctly rounded
///   value; the engine agrees with an `f64` reference to rounding.
/// - **`F32Exp`**: ρ_t = e^{log π − log μ} (clamped as always to ±20), p_t = e^{log π},
///   q_t = e^{log μ} and the 2K top-K probabilities are computed in `f32` arithmetic,
///   eight lanes wide on AVX2: each input rounded to `f32`, an `f32` exponential within
///   1 `f32` ulp of the correctly rounded value (over the tests' sweep of its range),
///   the result widened back exactly. An exponential below e^−87 ≈ 1.6e−38 reads as 0
///   (so where p or q underflows, ρ_t is taken in `f64` from the log-ratio). Everything
///   else (the divergences' other terms, the weights and prefix sums, the tests, the
///   objective's and the soft gate's own exponentials, the KL penalty, the reductions)
///   is the exact engine's `f64` arithmetic. It is faster where the exponentials are
///   the cost: about 1.06× for binary TV and 1.2–1.4× for top-K TV at K = 20 on an
///   AVX2 machine (BENCHMARKS.md in the repository).
///
/// What `F32Exp` gives up, against `Exact`: an exponential e^x is within about
/// 1.8e-7 + |x| · 6e-8 relative of the exact value (1.5 `f32` ulp, plus the rounding of
/// x to `f32`; for `f32` log-probs x is exact, so p_t and q_t are within 1.8e-7 and
/// ρ_t = p_t / q_t within about 3.6e-7), the outputs move by about that much (the tests
/// hold them within 1e-4 relative, the tolerance they hold `f32` inputs to), and a
/// token's decision may differ where its exact divergence, ratio or direction sits
/// within that of the threshold (a token with ρ_t within the error of 1 may count as
/// moving the other way). What it keeps: the results are the same bits whatever the
/// thread count, the column chunking and the instruction set, and the rules'
/// invariants (CPPO without decay or budget is DPPO, a larger budget masks no more,
/// corrective tokens are kept, padding is never read) hold under it as under `Exact`.
///
/// ```
/// use cppo::{Config, Numerics};
/// let cfg: Config = serde_json::from_str(r#"{"numerics": "f32_exp"}"#).unwrap();
/// assert_eq!(cfg.numerics, Numerics::F32Exp);
/// assert_eq!(Config::cppo().numerics, Numerics::Exact);
/// assert_eq!(Numerics::F32Exp.name(), "f32_exp");
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Numerics {
    /// Every exponential in `f64` (the default).
    #[default]
    Exact,
    /// The per-token exponentials (ρ, p, q, top-K probabilities) in `f32`.
    F32Exp,
}

impl Numerics {
    /// The name in a config (`"exact"`, `"f32_exp"`).
    ///
    /// ```
    /// assert_eq!(cppo::Numerics::Exact.name(), "exact");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::F32Exp => "f32_exp",
        }
    }

    /// Whether this is [`Numerics::Exact`] (the default).
    ///
    /// ```
    /// assert!(cppo::Numerics::default().is_exact());
    /// ```
    pub const fn is_exact(&self) -> bool {
        matches!(self, Self::Exact)
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
