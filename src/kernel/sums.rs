//! Fixed-order reductions over a block: lanes of partial sums (or folds) combined
//! pairwise. The order does not depend on the CPU, so every build gives the same bits,
//! and the compiler vectorizes them without the dependency chain of a left-to-right sum.

// The lanes are indexed in lockstep (`l < LANES`); iterator chains would say less.
#![allow(clippy::needless_range_loop)]

/// Lanes of the fixed-order sums.
pub(crate) const LANES: usize = 8;

/// The lanes combined pairwise, in a fixed order.
#[inline(always)]
pub(crate) fn combine(acc: [f64; LANES], f: impl Fn(f64, f64) -> f64) -> f64 {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    f(f(f(a0, a4), f(a2, a6)), f(f(a1, a5), f(a3, a7)))
}

/// Σ f(a_k, b_k) in LANES interleaved partial sums combined pairwise.
#[inline(always)]
pub(crate) fn lane_sum(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(x, y);
    }
    combine(acc, |x, y| x + y)
}

/// `f` folded over `vals` from `init` in LANES interleaved accumulators, combined
/// pairwise: for an order-free `f` (min, max).
#[inline(always)]
pub(crate) fn lane_fold(vals: &[f64], init: f64, f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [init; LANES];
    let cv = vals.chunks_exact(LANES);
    let rv = cv.remainder();
    for xv in cv {
        for l in 0..LANES {
            acc[l] = f(acc[l], xv[l]);
        }
    }
    for (l, &x) in rv.iter().enumerate() {
        acc[l] = f(acc[l], x);
    }
    combine(acc, f)
}

/// max without NaN handling (none of the folded values is NaN).
#[inline(always)]
pub(crate) fn max(a: f64, x: f64) -> f64 {
    if x > a { x } else { a }
}

/// min without NaN handling.
#[inline(always)]
pub(crate) fn min(a: f64, x: f64) -> f64 {
    if x < a { x } else { a }
}
