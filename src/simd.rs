//! A vectorizable `exp` for blocks of `f64`, with runtime CPU dispatch.
//!
//! The engine needs several exponentials per token (p = e^logp, q = e^logp_old,
//! ρ = e^{clamp(logp − logp_old)}, and 2K more for top-K divergences). The platform's
//! scalar `exp` is a function call the compiler cannot vectorize, so it would dominate
//! the pass. [`exp_to`] computes the same function with plain IEEE arithmetic the
//! compiler turns into SIMD code:
//!
//! - range reduction x = n ln 2 + r, |r| ≤ ln 2 / 2, with n from the round-to-nearest
//!   "magic number" trick and ln 2 split in two (Cody–Waite), so n ln 2 is exact;
//! - e^r from its degree-13 Taylor polynomial (truncation error below 5e-18 relative on
//!   the reduced range): the terms from r⁴ on by Estrin's scheme, which shortens the
//!   chain of dependent operations the exponential's speed is bound by, the first four
//!   in Horner form;
//! - 2^n assembled directly in the exponent bits.
//!
//! Accuracy: within 2 ulp of the correctly rounded result on [−708, 709]; inputs below
//! −708 give 0, inputs above 709 give +∞ (the engine only exponentiates log-probs
//! ≤ 1e-4 and log-ratios clamped to ±20), NaN gives NaN.
//!
//! The polynomial and the reduction use fused multiply-adds (`f64::mul_add`), which IEEE
//! 754 defines exactly: the AVX2 and AVX-512 builds (dispatched at run time, with FMA)
//! and the baseline build (where `mul_add` is the C library's correctly rounded `fma`)
//! return bit-identical results. Everything else in the crate uses separate multiplies
//! and adds, which Rust never fuses on its own.

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
    let y = poly * scale;
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f64::INFINITY
    } else {
        y
    }
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

/// `dst[k] = e^src[k]` (the slices have the same length), or in place without `src`.
#[inline(always)]
fn exp_slice_generic(src: Option<&[f64]>, dst: &mut [f64]) {
    match src {
        Some(src) => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = exp(x);
            }
        }
        None => {
            for x in dst.iter_mut() {
                *x = exp(*x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,fma")]
fn exp_slice_avx512(src: Option<&[f64]>, dst: &mut [f64]) {
    exp_slice_generic(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_slice_avx2(src: Option<&[f64]>, dst: &mut [f64]) {
    exp_slice_generic(src, dst);
}

/// [`exp_slice_generic`] with the widest SIMD the CPU has.
#[inline]
fn exp_slice(src: Option<&[f64]>, dst: &mut [f64]) {
    match isa() {
        // SAFETY: `isa` checked that the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { exp_slice_avx512(src, dst) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { exp_slice_avx2(src, dst) },
        _ => exp_slice_generic(src, dst),
    }
}

/// Writes the exponential of every element of `src` to `dst`.
///
/// # Panics
///
/// If the slices differ in length (a bug in the caller).
#[inline]
pub(crate) fn exp_to(src: &[f64], dst: &mut [f64]) {
    assert_eq!(src.len(), dst.len(), "exp_to: lengths differ");
    exp_slice(Some(src), dst);
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

    #[test]
    fn every_dispatch_path_agrees() {
        let xs: Vec<f64> = (0..1000).map(|k| -30.0 + k as f64 * 0.0307).collect();
        let mut generic = xs.clone();
        exp_slice_generic(None, &mut generic);
        let mut copied = vec![0.0; xs.len()];
        exp_to(&xs, &mut copied);
        let mut dispatched = xs.clone();
        exp_slice(None, &mut dispatched);
        let scalar: Vec<f64> = xs.iter().map(|&x| exp(x)).collect();
        assert_eq!(generic, dispatched);
        assert_eq!(generic, scalar);
        assert_eq!(generic, copied);
        #[cfg(target_arch = "x86_64")]
        if isa() != Isa::Base {
            let mut avx2 = xs.clone();
            // SAFETY: every tier above the baseline has AVX2 and FMA.
            unsafe { exp_slice_avx2(None, &mut avx2) };
            assert_eq!(generic, avx2);
        }
    }
}
