//! Vectorizable `exp`, `expm1` and `ln` for blocks of `f64` (and an `f32` `exp`), and
//! the runtime CPU detection the engine dispatches on.
//!
//! The engine needs several exponentials per token (p = e^logp, q = e^logp_old,
//! ρ = e^{clamp(logp − logp_old)}, and 2K more for top-K divergences) and, for the KL
//! divergences, logarithms. The platform's scalar `exp` and `ln` are function calls the
//! compiler cannot vectorize, so they would dominate the pass. [`exp_to`], [`expm1_to`]
//! and [`ln_to`] compute the same functions with plain IEEE arithmetic the compiler turns
//! into SIMD code, built for AVX-512 or AVX2 (with FMA) when the CPU has them ([`isa`]).
//!
//! `exp`:
//! - range reduction x = n ln 2 + r, |r| ≤ ln 2 / 2, with n from the round-to-nearest
//!   "magic number" trick and ln 2 split in two (Cody–Waite), so n ln 2 is exact;
//! - e^r from its degree-13 Taylor polynomial (truncation error below 5e-18 relative on
//!   the reduced range): the terms from r⁴ on by Estrin's scheme, which shortens the
//!   chain of dependent operations the exponential's speed is bound by, the first four
//!   in Horner form;
//! - 2^n assembled directly in the exponent bits;
//! - within 2 ulp of the correctly rounded result on [−708, 709] (1 ulp in the tests'
//!   sweep); inputs below −708 give 0, inputs above 709 give +∞ (the engine only
//!   exponentiates log-probs ≤ 1e-4 and log-ratios clamped to ±20), NaN gives NaN.
//!
//! `exp32` (the opt-in [`Numerics::F32Exp`](crate::Numerics)): the same range reduction
//! in `f32` with `f32` constants, the degree-7 Taylor polynomial (truncation below a
//! tenth of an `f32` ulp), 2^n in the exponent bits; within 1 `f32` ulp of the correctly
//! rounded result over the tests' sweep of [−87, 88]; below −87 it returns 0 (so every
//! nonzero result is a normal `f32`), above 88 +∞. [`exp32_to`] rounds `f64` inputs to
//! `f32` and widens the results back, through a stack buffer so that the exponential's
//! loop runs on eight `f32` lanes (AVX2) rather than four `f64` ones.
//!
//! `expm1` (the k3 KL penalty): x (1 + x Q(x)) from the Taylor series for |x| < 1, so
//! there is no cancellation near 0, else `exp(x) − 1`; within 3 ulp (2 in the tests'
//! sweep).
//!
//! `ln`:
//! - x = 2^e m with m in [√2/2, √2), s = (m − 1)/(m + 1), ln m = 2 atanh s from its
//!   Taylor series in s² to s²¹ (|s| ≤ 0.172), arranged as in fdlibm's `log` so that the
//!   leading terms are exact;
//! - within 2 ulp over the whole range, subnormals included (1 ulp in the tests'
//!   sweep); ln 0 = −∞, ln of a negative number or NaN is NaN, ln ∞ = ∞.
//!
//! All of them use fused multiply-adds (`mul_add`), which IEEE 754 defines exactly: the
//! AVX2 and AVX-512 builds and the baseline build (where `mul_add` is the C library's
//! correctly rounded `fma`) return bit-identical results. Everything else in the crate
//! uses separate multiplies and adds, which Rust never fuses on its own.
//!
//! The slice functions (`exp_to`, …) have no dispatch of their own: they are inlined
//! into the engine's passes, which [`crate::kernel`] builds once per instruction set
//! ([`isa`] picks the build), so each build runs them on its own lanes.

use crate::float::Numerics;

const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2, high part: its trailing 32 bits are zero, so n · LN2_HI is exact for |n| < 2^20.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 − LN2_HI.
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f64 = 6_755_399_441_055_744.0;
/// The smallest input with a normal result (e^−708 ≈ 3.3e−308).
const MIN_X: f64 = -708.0;
/// The largest input with a finite result.
const MAX_X: f64 = 709.0;

/// 1/k! for k = 4 to 13: the tail T(r) = Σ r^(k−4)/k!, evaluated by Estrin's scheme.
const TAIL: [f64; 10] = [
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

/// e^r − (1 + r + r²/2 + r³/6) over r⁴, to degree 9: Estrin's scheme, so the chain of
/// dependent operations is 5 long instead of Horner's 9 (the exponential is bound by
/// that chain's latency more than by the number of operations).
#[inline(always)]
fn tail(r: f64) -> f64 {
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let c = &TAIL;
    let p0 = c[1].mul_add(r, c[0]);
    let p1 = c[3].mul_add(r, c[2]);
    let p2 = c[5].mul_add(r, c[4]);
    let p3 = c[7].mul_add(r, c[6]);
    let p4 = c[9].mul_add(r, c[8]);
    let s0 = p1.mul_add(r2, p0);
    let s1 = p3.mul_add(r2, p2);
    p4.mul_add(r8, s1.mul_add(r4, s0))
}

/// e^x for one value, in the form the compiler vectorizes across a loop.
#[inline(always)]
pub(crate) fn exp(x: f64) -> f64 {
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    // The leading terms in Horner form, so the result's rounding is that of 1 + r (…).
    let head = r.mul_add(tail(r), 1.0 / 6.0);
    let poly = r.mul_add(r.mul_add(r.mul_add(head, 0.5), 1.0), 1.0);
    // The low bits of t hold n (two's complement); 2^n = (n + 1023) << 52.
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f64::from_bits(n_int.wrapping_add(1023) << 52);
    edges(x, MIN_X, MAX_X, poly * scale, 0.0, f64::INFINITY)
}

/// An exponential's result `y` at `x`, with the edges of its range: `zero` below `min`,
/// `inf` above `max`, else `y` (which is NaN for a NaN `x`).
#[inline(always)]
fn edges<T: PartialOrd>(x: T, min: T, max: T, y: T, zero: T, inf: T) -> T {
    if x < min {
        zero
    } else if x > max {
        inf
    } else {
        y
    }
}

/// 1/k! for k = 7 down to 2 (the last six of [`EXPM1_Q`], rounded to f32): e^r =
/// 1 + r (1 + r P(r)) for the f32 exponential, the Taylor series truncated after r⁷/7!
/// (for |r| ≤ ln 2 / 2 the first term left out is below 6e-9 relative, a tenth of an f32
/// ulp).
const EXP32_P: [f32; 6] = {
    let mut p = [0.0f32; 6];
    let mut k = 0;
    while k < 6 {
        p[k] = EXPM1_Q[EXPM1_Q.len() - 6 + k] as f32;
        k += 1;
    }
    p
};
/// ln 2, high part for f32: its trailing 9 bits are zero, so n · LN2_HI_32 is exact
/// for |n| < 2^9.
const LN2_HI_32: f32 = f32::from_bits(0x3f31_7200);
/// ln 2 − LN2_HI_32, rounded to f32.
const LN2_LO_32: f32 = 1.428_606_8e-6;
/// 1.5 · 2^23: adding it rounds an f32 to an integer held in the low mantissa bits.
const MAGIC_32: f32 = 12_582_912.0;
/// Below this the f32 exponential returns 0: e^−87 ≈ 1.6e−38 is still a normal f32,
/// so every nonzero result has full f32 precision (no subnormals).
const MIN_X_32: f32 = -87.0;
/// Above this the f32 exponential returns +∞ (e^88 ≈ 1.7e38 is finite).
const MAX_X_32: f32 = 88.0;

/// e^x in f32 arithmetic, for one value, in the form the compiler vectorizes across a
/// loop (eight lanes on AVX2): the same range reduction as [`exp`] with f32 constants,
/// the degree-7 Taylor polynomial, 2^n in the exponent bits. Within 1 f32 ulp of the
/// correctly rounded result over the tests' sweep of [−87, 88]; below −87 it returns 0,
/// above 88 +∞, and NaN for NaN.
#[inline(always)]
pub(crate) fn exp32(x: f32) -> f32 {
    let xc = x.clamp(MIN_X_32, MAX_X_32);
    let t = xc.mul_add(std::f32::consts::LOG2_E, MAGIC_32);
    let n = t - MAGIC_32;
    let r = (-n).mul_add(LN2_LO_32, (-n).mul_add(LN2_HI_32, xc));
    let mut p = EXP32_P[0];
    for c in &EXP32_P[1..] {
        p = p.mul_add(r, *c);
    }
    let poly = r.mul_add(r.mul_add(p, 1.0), 1.0);
    let n_int = t.to_bits().wrapping_sub(MAGIC_32.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    edges(x, MIN_X_32, MAX_X_32, poly * scale, 0.0, f32::INFINITY)
}

/// The instruction sets the crate's kernels are built for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 (F, DQ, BW, VL) with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// The target's baseline (SSE2 on x86-64); `mul_add` is then a call to the C
    /// library's correctly rounded `fma`, so the results are the same, only slower.
    Base,
}

impl Isa {
    /// The name `engine::instruction_set` reports.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Base => "baseline",
        }
    }
}

/// The best [`Isa`] the CPU supports (the feature checks are cached by std).
#[inline]
pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("fma") {
            if has!("avx512f") && has!("avx512dq") && has!("avx512bw") && has!("avx512vl") {
                return Isa::Avx512;
            }
            if has!("avx2") {
                return Isa::Avx2;
            }
        }
    }
    Isa::Base
}

/// √2: the logarithm's mantissa is brought into [√2 / 2, √2).
const SQRT_2: f64 = std::f64::consts::SQRT_2;
/// 2^54, to bring subnormal inputs into the normal range.
const TWO_54: f64 = 18_014_398_509_481_984.0;

/// 2/(2k + 1) for k = 10 down to 1: ln((1 + s)/(1 − s)) = 2s + s R(s²) with
/// R(z) = Σ_k 2/(2k + 1) z^k, truncated after z^10 (|s| ≤ 0.1716, z ≤ 0.0295: the first
/// term left out is below 7e-19 relative).
const ATANH: [f64; 10] = [
    2.0 / 21.0,
    2.0 / 19.0,
    2.0 / 17.0,
    2.0 / 15.0,
    2.0 / 13.0,
    2.0 / 11.0,
    2.0 / 9.0,
    2.0 / 7.0,
    2.0 / 5.0,
    2.0 / 3.0,
];

/// ln x for one value, in the form the compiler vectorizes across a loop.
///
/// x = 2^e m with m in [√2/2, √2); with f = m − 1 and s = f/(2 + f),
/// ln m = f − (f²/2 − s (f²/2 + R)), the arrangement of fdlibm's `log` that keeps the
/// leading terms exact; e ln 2 is added in two parts. Subnormal inputs are scaled by 2^54
/// first. ln 0 = −∞, ln of a negative number or NaN is NaN, ln ∞ = ∞.
#[inline(always)]
pub(crate) fn ln(x: f64) -> f64 {
    let sub = x < f64::MIN_POSITIVE;
    let xs = if sub { x * TWO_54 } else { x };
    let bits = xs.to_bits();
    let e0 = ((bits >> 52) & 0x7ff) as i64 - if sub { 1023 + 54 } else { 1023 };
    let m1 = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m1 > SQRT_2;
    let m = if big { m1 * 0.5 } else { m1 };
    let e = (e0 + i64::from(big)) as f64;
    // Exact: m is within a factor 2 of 1.
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut poly = ATANH[0];
    for c in &ATANH[1..] {
        poly = poly.mul_add(z, *c);
    }
    let r = z * poly;
    let hfsq = 0.5 * f * f;
    let y = e.mul_add(LN2_HI, -((hfsq - s.mul_add(hfsq + r, e * LN2_LO)) - f));
    if x > 0.0 && x < f64::INFINITY {
        y
    } else if x == 0.0 {
        f64::NEG_INFINITY
    } else if x == f64::INFINITY {
        x
    } else {
        f64::NAN
    }
}

/// 1/k! for k = 19 down to 2: e^x − 1 = x (1 + x Q(x)) with Q(x) = Σ x^(k−2)/k!, truncated
/// after x^17/19! (for |x| < 1 the first term left out is below 2e-19 relative).
const EXPM1_Q: [f64; 18] = [
    1.0 / 121_645_100_408_832_000.0,
    1.0 / 6_402_373_705_728_000.0,
    1.0 / 355_687_428_096_000.0,
    1.0 / 20_922_789_888_000.0,
    1.0 / 1_307_674_368_000.0,
    1.0 / 87_178_291_200.0,
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// e^x − 1 for one value, in the form the compiler vectorizes across a loop: for
/// |x| < 1 its Taylor series x (1 + x Q(x)) (no cancellation near 0), else [`exp`] − 1.
/// Within 3 ulp of the correctly rounded result (2 in the tests' sweep); x > 709 gives
/// +∞ (as [`exp`]), x < −708 gives −1, NaN gives NaN.
#[inline(always)]
pub(crate) fn expm1(x: f64) -> f64 {
    let mut q = EXPM1_Q[0];
    for c in &EXPM1_Q[1..] {
        q = q.mul_add(x, *c);
    }
    // x (1 + x Q(x)): the sign of −0 kept.
    let small = x * x.mul_add(q, 1.0);
    let big = exp(x) - 1.0;
    if x.abs() < 1.0 { small } else { big }
}

/// `dst[k] = f(src[k])`.
///
/// # Panics
///
/// If the slices differ in length (a bug in the caller).
#[inline(always)]
fn map(src: &[f64], dst: &mut [f64], f: impl Fn(f64) -> f64) {
    assert_eq!(src.len(), dst.len(), "simd::map: lengths differ");
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f(x);
    }
}

/// Writes the exponential of every element of `src` to `dst` (of the same length).
///
/// Like every `_to` function here, it has no dispatch of its own (see the module docs).
#[inline(always)]
pub(crate) fn exp_to(src: &[f64], dst: &mut [f64]) {
    map(src, dst, exp);
}

/// Writes e^x of every element of `src` to `dst` under `numerics`: [`exp_to`] or
/// [`exp32_to`].
#[inline(always)]
pub(crate) fn exp_with(numerics: Numerics, src: &[f64], dst: &mut [f64]) {
    match numerics {
        Numerics::Exact => exp_to(src, dst),
        Numerics::F32Exp => exp32_to(src, dst),
    }
}

/// Writes e^x − 1 of every element of `src` to `dst` (of the same length).
#[inline(always)]
pub(crate) fn expm1_to(src: &[f64], dst: &mut [f64]) {
    map(src, dst, expm1);
}

/// Writes the natural logarithm of every element of `src` to `dst` (of the same length).
#[inline(always)]
pub(crate) fn ln_to(src: &[f64], dst: &mut [f64]) {
    map(src, dst, ln);
}

/// Columns per pass of [`exp32_to`]: its inputs are narrowed to f32 into a stack
/// buffer of this many, so that the exponential's loop runs on f32 lanes only.
const EXP32_CHUNK: usize = 64;

/// Writes e^x of every element of `src` to `dst` (of the same length), computed in f32:
/// each input rounded to f32, [`exp32`], the result widened back (exactly), in chunks of
/// [`EXP32_CHUNK`]. The fast numerics' exponential; no dispatch of its own (see the
/// module docs).
///
/// # Panics
///
/// If the slices differ in length (a bug in the caller).
#[inline(always)]
pub(crate) fn exp32_to(src: &[f64], dst: &mut [f64]) {
    assert_eq!(src.len(), dst.len(), "simd::exp32_to: lengths differ");
    let n = src.len();
    let mut start = 0;
    while start < n {
        let m = (n - start).min(EXP32_CHUNK);
        let (s, d) = (&src[start..start + m], &mut dst[start..start + m]);
        let mut buf = [0.0f32; EXP32_CHUNK];
        for k in 0..m {
            buf[k] = s[k] as f32;
        }
        for b in &mut buf {
            *b = exp32(*b);
        }
        for k in 0..m {
            d[k] = f64::from(buf[k]);
        }
        start += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn matches_std_exp_within_two_ulp() {
        // A dense sweep of the engine's range plus the edges of the reduced range.
        let mut worst = 0;
        let mut x = -745.0;
        while x < 30.0 {
            for y in [x, -x * 1e-6, x * 1e-3] {
                if (MIN_X..=MAX_X).contains(&y) {
                    let mut v = [0.0];
                    exp_to(&[y], &mut v);
                    worst = worst.max(ulps(v[0], y.exp()));
                }
            }
            x += 0.001_234_567;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn edges() {
        let v = [
            0.0,
            -0.0,
            1e-4,
            -1e-300,
            -708.5,
            -1e9,
            f64::NEG_INFINITY,
            710.0,
            f64::NAN,
        ];
        let mut out = [0.0; 9];
        exp_to(&v, &mut out);
        let v = out;
        assert_eq!(&v[..4], &[1.0, 1.0, 1e-4f64.exp(), 1.0]);
        assert_eq!(&v[4..8], &[0.0, 0.0, 0.0, f64::INFINITY]);
        assert!(v[8].is_nan());
        let mut two = [0.0];
        exp_to(&[std::f64::consts::LN_2], &mut two);
        assert!(ulps(two[0], 2.0) <= 1);
    }

    /// The functions as the AVX2 build of the engine inlines them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn map_avx2(src: &[f64], dst: &mut [f64], f: impl Fn(f64) -> f64) {
        map(src, dst, f);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn exp32_avx2(src: &[f64], dst: &mut [f64]) {
        exp32_to(src, dst);
    }

    #[test]
    fn every_build_agrees() {
        let xs: Vec<f64> = (0..1000).map(|k| -30.0 + k as f64 * 0.0307).collect();
        let pos: Vec<f64> = (0..1000)
            .map(|k| (k as f64 * 0.7).exp2() * 1e-150)
            .collect();
        for (f, xs) in [(exp as fn(f64) -> f64, &xs), (ln, &pos), (expm1, &xs)] {
            let scalar: Vec<f64> = xs.iter().map(|&x| f(x)).collect();
            let mut generic = vec![0.0; xs.len()];
            map(xs, &mut generic, f);
            assert_eq!(generic, scalar);
            #[cfg(target_arch = "x86_64")]
            if isa() != Isa::Base {
                let mut avx2 = vec![0.0; xs.len()];
                // SAFETY: every tier above the baseline has AVX2 and FMA.
                unsafe { map_avx2(xs, &mut avx2, f) };
                assert_eq!(generic, avx2);
            }
        }
        // The f32 exponential: 1000 values are 15 chunks and a partial one.
        let wide: Vec<f64> = (0..1000).map(|k| -100.0 + k as f64 * 0.19).collect();
        let scalar: Vec<f64> = wide.iter().map(|&x| f64::from(exp32(x as f32))).collect();
        let mut generic = vec![0.0; wide.len()];
        exp32_to(&wide, &mut generic);
        assert_eq!(generic, scalar);
        #[cfg(target_arch = "x86_64")]
        if isa() != Isa::Base {
            let mut avx2 = vec![0.0; wide.len()];
            // SAFETY: as above.
            unsafe { exp32_avx2(&wide, &mut avx2) };
            assert_eq!(generic, avx2);
        }
    }

    fn ulps32(a: f32, b: f32) -> u32 {
        (a.to_bits() as i32 - b.to_bits() as i32).unsigned_abs()
    }

    #[test]
    fn exp32_within_one_f32_ulp() {
        // Against the f64 exponential rounded to f32 (itself within half an f32 ulp of
        // the exact value plus 2 f64 ulp), over the whole normal range, every f32 input
        // of [-1, 1] in a stride, and the reduced range's edges.
        let mut worst = 0;
        let mut check = |x: f32| {
            let want = f64::from(x).exp() as f32;
            worst = worst.max(ulps32(exp32(x), want));
        };
        let mut x = -87.0f32;
        while x <= 88.0 {
            check(x);
            x += 0.000_731;
        }
        let one = 1.0f32.to_bits();
        for bits in (0..one).step_by(97) {
            check(f32::from_bits(bits));
            check(-f32::from_bits(bits));
        }
        let h = std::f32::consts::LN_2 / 2.0;
        for n in -120..120 {
            for e in [-h, h] {
                check(n as f32 * std::f32::consts::LN_2 + e);
            }
        }
        assert!(worst <= 1, "worst error {worst} f32 ulp");
    }

    #[test]
    fn exp32_edges() {
        assert_eq!(exp32(0.0), 1.0);
        assert_eq!(exp32(-0.0), 1.0);
        // The smallest input with a nonzero result gives a normal f32; below it, 0.
        let low = exp32(-87.0);
        assert!(low >= f32::MIN_POSITIVE && ulps32(low, (-87.0f64).exp() as f32) <= 2);
        assert_eq!(exp32(-87.000_01), 0.0);
        assert_eq!(exp32(f32::NEG_INFINITY), 0.0);
        assert!(exp32(88.0).is_finite());
        assert_eq!(exp32(88.001), f32::INFINITY);
        assert!(exp32(f32::NAN).is_nan());
        let mut out = [0.0; 3];
        exp32_to(&[std::f64::consts::LN_2, -1e-300, 1e-4], &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[1], 1.0);
        assert_eq!(out[2], f64::from(1e-4f32.exp()));
    }

    #[test]
    fn exp_with_picks_the_numerics() {
        let x = [-0.3, -7.25];
        let (mut exact, mut fast) = ([0.0; 2], [0.0; 2]);
        exp_with(Numerics::Exact, &x, &mut exact);
        exp_with(Numerics::F32Exp, &x, &mut fast);
        for k in 0..2 {
            assert_eq!(exact[k], exp(x[k]));
            assert_eq!(fast[k], f64::from(exp32(x[k] as f32)));
            assert!(((fast[k] - exact[k]) / exact[k]).abs() < 3e-7);
        }
    }

    #[test]
    fn ln_matches_std_within_two_ulp() {
        // Log-uniform over the whole range, subnormals included, and densely near 1.
        let mut xs = Vec::new();
        let mut e = -1074.0f64;
        while e < 1024.0 {
            xs.push(e.exp2());
            xs.push((e + 0.3).exp2() * 1.000_000_1);
            e += 0.0137;
        }
        for k in 1..20_000 {
            let d = k as f64 * 1.1e-5;
            xs.extend([1.0 + d, 1.0 - d / 2.0, 1.0 + d * 1e-9, 1.0 - d * 1e-9]);
        }
        xs.extend([
            f64::MIN_POSITIVE,
            f64::MAX,
            5e-324,
            0.5,
            2.0,
            SQRT_2,
            SQRT_2 / 2.0,
        ]);
        let mut got = vec![0.0; xs.len()];
        ln_to(&xs, &mut got);
        let worst = xs
            .iter()
            .zip(&got)
            .map(|(&x, &y)| ulps(y, x.ln()))
            .max()
            .unwrap();
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn expm1_matches_std_within_three_ulp() {
        let mut xs = Vec::new();
        let mut x = -750.0f64;
        while x < 709.0 {
            xs.push(x);
            x += 0.0173;
        }
        for k in 1..40_000 {
            let d = k as f64 * 2.7e-5;
            xs.extend([d, -d, d * 1e-9, -d * 1e-9, 1.0 - d / 1.1, -1.0 + d / 1.1]);
        }
        xs.extend([1.0, -1.0, 1e-300, -1e-300, 5e-324]);
        let mut got = vec![0.0; xs.len()];
        expm1_to(&xs, &mut got);
        let (worst, at) = xs
            .iter()
            .zip(&got)
            .map(|(&x, &y)| (ulps(y, x.exp_m1()), x))
            .max_by_key(|p| p.0)
            .unwrap();
        assert!(worst <= 3, "worst error {worst} ulp at {at}");
        let edges = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            710.0,
            -800.0,
        ];
        let mut y = [0.0; 7];
        expm1_to(&edges, &mut y);
        assert_eq!(y[0].to_bits(), 0.0f64.to_bits());
        assert_eq!(y[1].to_bits(), (-0.0f64).to_bits());
        assert_eq!((y[2], y[3]), (f64::INFINITY, -1.0));
        assert!(y[4].is_nan());
        assert_eq!((y[5], y[6]), (f64::INFINITY, -1.0));
    }

    #[test]
    fn ln_edges() {
        let xs = [
            1.0,
            0.0,
            -0.0,
            -1.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        let mut y = [0.0; 7];
        ln_to(&xs, &mut y);
        assert_eq!(y[0].to_bits(), 0.0f64.to_bits());
        assert_eq!(&y[1..3], &[f64::NEG_INFINITY; 2]);
        assert!(y[3].is_nan());
        assert_eq!(y[4], f64::INFINITY);
        assert!(y[5].is_nan() && y[6].is_nan());
    }
}
