//! Memory layouts: strided and non-contiguous arrays give the same bits as contiguous ones.
//!
//! The fused row pass has two code paths per array. It reads an input row as a slice when
//! the row is contiguous and through a strided view otherwise (`Lane`, `TopkRow`): the
//! top-K entries of a group of tokens are loaded at once from a contiguous row, token by
//! token from a strided one. It writes an output row straight into a contiguous slice and
//! stages it for a strided view (`LaneMut`). Padding-only 64-column blocks are skipped on
//! both. Nothing else at the library level feeds it strided arrays (only the CLI test
//! reads a Fortran-order npz), so this file checks that each pair of paths gives the same
//! results.
//!
//! Layouts used: for (B, L) inputs and outputs, row-major, Fortran order, a transposed
//! (L, B) buffer (`reversed_axes`), every other column of a (B, 2L) buffer
//! (`s![.., ..;2]`), columns reversed (stride −1), both axes reversed, and the first L
//! columns of a (B, L + 3) buffer (contiguous rows, non-contiguous whole); for per-row
//! advantages, contiguous, every other element, reversed; for the (B, L, K) top-K arrays,
//! row-major, Fortran order, K not the last axis in memory (a (B, K, L) or (K, B, L)
//! buffer seen through `permuted_axes`), every other token or every other k of a wider
//! buffer, k reversed, and the first L tokens of a (B, L + 2, K) buffer. Cells of a buffer
//! outside the view hold NaN (inputs), `true`, 1 or NaN (masks) or a sentinel (outputs).
//!
//! What is asserted, over random valid batches (small ones, rows that cross the 64-column
//! blocks, and rows of 130 to 330 columns with padding stretches of more than 64
//! columns, so that whole blocks are skipped), random configs (every divergence, the
//! top-K ones included; every rule, CPPO with shuffled weights included; every
//! objective, the whole-row ones included; KL penalty on and off; count overrides),
//! f32 and f64 inputs, bool, u8, f32 and f64 masks, `Par::Seq` and `Par::Rayon`, with
//! each input array's layout drawn independently (so that one top-K array may be
//! contiguous and the other not):
//!
//! - **Inputs**: `evaluate` on the strided arrays equals `evaluate` on row-major copies of
//!   the same values (same mask element type): every output bit for bit (`to_bits`),
//!   `keep` and `reason` exactly, the loss's bits, the `Debug` forms of the diagnostics
//!   and of the tally. `Batch::validate` returns the same result.
//! - **Outputs**: `evaluate_into` into strided buffers (all seven, some, only `grad` and
//!   `keep`, or none), from contiguous and from strided inputs, returns the same loss
//!   bits, diagnostics and tally, fills every requested buffer with exactly the
//!   contiguous results, and writes nothing outside its view (the sentinels in the
//!   gaps of the wider buffers survive).
//! - **Errors**: with one to three bad values planted (NaN mostly, also ±inf and positive
//!   log-probs, at response positions of any array the config reads; NaN anywhere in a
//!   float mask), `evaluate`, `evaluate_into` and `Batch::validate` return the same
//!   error (`Debug` form: variant, array, row, column, k, value) in every layout.
//! - **Chunks**: `row_partials` and `evaluate_chunk_into` over column chunks of the
//!   strided views, into column slices of strided output buffers, return the same row
//!   partials, summaries, carries and outputs as over chunks of the row-major arrays.
//!
//! A fixed sweep also runs every layout kind of every array on long batches under a few
//! configs, and a unit test checks that the layouts really are non-contiguous where they
//! claim to be (so that the strided paths are the ones taken).

mod common;

use common::*;
use cppo::chunk::{
    Carry, ChunkPos, RowPartial, divergences_into, evaluate_chunk_into, needs_divergences,
    row_partials, whole_rows,
};
use cppo::ndarray::{
    Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMut3, ShapeBuilder, s,
};
use cppo::{
    Advantages, Aggregation, Batch, Config, CppoParams, Divergence, Evaluation, Float, Gate,
    KlEstimator, KlPenalty, Mask, Objective, Outputs, OutputsMut, Par, Rule, evaluate,
    evaluate_into,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/layouts.txt"
);

// ---------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------

/// How a (B, L) array sits in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L2 {
    /// Row-major, contiguous: the fast path.
    Standard,
    /// Column-major: rows have stride B.
    Fortran,
    /// A row-major (L, B) buffer with its axes reversed: rows have stride B.
    Transposed,
    /// Every other column of a (B, 2L) buffer: rows have stride 2.
    EveryOther,
    /// The columns in reverse: rows have stride −1.
    Reversed,
    /// Rows and columns in reverse: negative strides on both axes.
    Flipped,
    /// The first L columns of a (B, L + 3) buffer: contiguous rows, the whole not.
    RowGap,
}

impl L2 {
    const ALL: [L2; 7] = [
        L2::Standard,
        L2::Fortran,
        L2::Transposed,
        L2::EveryOther,
        L2::Reversed,
        L2::Flipped,
        L2::RowGap,
    ];

    /// Whether a row of the view is a contiguous slice (with at least 2 rows and
    /// columns).
    fn contiguous_rows(self) -> bool {
        matches!(self, L2::Standard | L2::RowGap)
    }
}

/// How a (B,) array sits in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L1 {
    Standard,
    /// Every other element of a (2B,) buffer.
    EveryOther,
    /// The elements in reverse.
    Reversed,
}

impl L1 {
    const ALL: [L1; 3] = [L1::Standard, L1::EveryOther, L1::Reversed];
}

/// How a (B, L, K) array sits in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L3 {
    Standard,
    /// Column-major.
    Fortran,
    /// A row-major (B, K, L) buffer seen through `permuted_axes([0, 2, 1])`.
    KMiddle,
    /// A row-major (K, B, L) buffer seen through `permuted_axes([1, 2, 0])`.
    KOuter,
    /// Every other token of a (B, 2L, K) buffer.
    EveryOtherToken,
    /// Every other k of a (B, L, 2K) buffer.
    EveryOtherK,
    /// The k axis in reverse.
    ReversedK,
    /// The first L tokens of a (B, L + 2, K) buffer: contiguous rows, the whole not.
    RowGap,
}

impl L3 {
    const ALL: [L3; 8] = [
        L3::Standard,
        L3::Fortran,
        L3::KMiddle,
        L3::KOuter,
        L3::EveryOtherToken,
        L3::EveryOtherK,
        L3::ReversedK,
        L3::RowGap,
    ];

    fn contiguous_rows(self) -> bool {
        matches!(self, L3::Standard | L3::RowGap)
    }
}

/// An owned buffer holding a (B, L) array in layout `kind`; cells outside the view hold
/// the fill value given at construction.
#[derive(Clone, Debug)]
struct Held2<T> {
    data: Array2<T>,
    kind: L2,
}

impl<T: Clone> Held2<T> {
    fn new(kind: L2, a: ArrayView2<'_, T>, fill: T) -> Self {
        let (b, l) = a.dim();
        let data = match kind {
            L2::Standard | L2::Reversed | L2::Flipped => Array2::from_elem((b, l), fill),
            L2::Fortran => Array2::from_elem((b, l).f(), fill),
            L2::Transposed => Array2::from_elem((l, b), fill),
            L2::EveryOther => Array2::from_elem((b, 2 * l), fill),
            L2::RowGap => Array2::from_elem((b, l + 3), fill),
        };
        let mut held = Self { data, kind };
        held.view_mut().assign(&a);
        held
    }

    fn view(&self) -> ArrayView2<'_, T> {
        let v = self.data.view();
        match self.kind {
            L2::Standard | L2::Fortran => v,
            L2::Transposed => v.reversed_axes(),
            L2::EveryOther => v.slice_move(s![.., ..;2]),
            L2::Reversed => v.slice_move(s![.., ..;-1]),
            L2::Flipped => v.slice_move(s![..;-1, ..;-1]),
            L2::RowGap => {
                let l = v.ncols() - 3;
                v.slice_move(s![.., ..l])
            }
        }
    }

    fn view_mut(&mut self) -> ArrayViewMut2<'_, T> {
        let v = self.data.view_mut();
        match self.kind {
            L2::Standard | L2::Fortran => v,
            L2::Transposed => v.reversed_axes(),
            L2::EveryOther => v.slice_move(s![.., ..;2]),
            L2::Reversed => v.slice_move(s![.., ..;-1]),
            L2::Flipped => v.slice_move(s![..;-1, ..;-1]),
            L2::RowGap => {
                let l = v.ncols() - 3;
                v.slice_move(s![.., ..l])
            }
        }
    }
}

/// An owned buffer holding a (B,) array in layout `kind`.
#[derive(Clone, Debug)]
struct Held1<T> {
    data: Array1<T>,
    kind: L1,
}

impl<T: Clone> Held1<T> {
    fn new(kind: L1, a: ArrayView1<'_, T>, fill: T) -> Self {
        let n = a.len();
        let data = match kind {
            L1::Standard | L1::Reversed => Array1::from_elem(n, fill),
            L1::EveryOther => Array1::from_elem(2 * n, fill),
        };
        let mut held = Self { data, kind };
        held.view_mut().assign(&a);
        held
    }

    fn view(&self) -> ArrayView1<'_, T> {
        let v = self.data.view();
        match self.kind {
            L1::Standard => v,
            L1::EveryOther => v.slice_move(s![..;2]),
            L1::Reversed => v.slice_move(s![..;-1]),
        }
    }

    fn view_mut(&mut self) -> ArrayViewMut1<'_, T> {
        let v = self.data.view_mut();
        match self.kind {
            L1::Standard => v,
            L1::EveryOther => v.slice_move(s![..;2]),
            L1::Reversed => v.slice_move(s![..;-1]),
        }
    }
}

/// An owned buffer holding a (B, L, K) array in layout `kind`.
#[derive(Clone, Debug)]
struct Held3<T> {
    data: Array3<T>,
    kind: L3,
}

impl<T: Clone> Held3<T> {
    fn new(kind: L3, a: ArrayView3<'_, T>, fill: T) -> Self {
        let (b, l, k) = a.dim();
        let data = match kind {
            L3::Standard | L3::ReversedK => Array3::from_elem((b, l, k), fill),
            L3::Fortran => Array3::from_elem((b, l, k).f(), fill),
            L3::KMiddle => Array3::from_elem((b, k, l), fill),
            L3::KOuter => Array3::from_elem((k, b, l), fill),
            L3::EveryOtherToken => Array3::from_elem((b, 2 * l, k), fill),
            L3::EveryOtherK => Array3::from_elem((b, l, 2 * k), fill),
            L3::RowGap => Array3::from_elem((b, l + 2, k), fill),
        };
        let mut held = Self { data, kind };
        held.view_mut().assign(&a);
        held
    }

    fn view(&self) -> ArrayView3<'_, T> {
        let v = self.data.view();
        match self.kind {
            L3::Standard | L3::Fortran => v,
            L3::KMiddle => v.permuted_axes([0, 2, 1]),
            L3::KOuter => v.permuted_axes([1, 2, 0]),
            L3::EveryOtherToken => v.slice_move(s![.., ..;2, ..]),
            L3::EveryOtherK => v.slice_move(s![.., .., ..;2]),
            L3::ReversedK => v.slice_move(s![.., .., ..;-1]),
            L3::RowGap => {
                let l = v.dim().1 - 2;
                v.slice_move(s![.., ..l, ..])
            }
        }
    }

    fn view_mut(&mut self) -> ArrayViewMut3<'_, T> {
        let v = self.data.view_mut();
        match self.kind {
            L3::Standard | L3::Fortran => v,
            L3::KMiddle => v.permuted_axes([0, 2, 1]),
            L3::KOuter => v.permuted_axes([1, 2, 0]),
            L3::EveryOtherToken => v.slice_move(s![.., ..;2, ..]),
            L3::EveryOtherK => v.slice_move(s![.., .., ..;2]),
            L3::ReversedK => v.slice_move(s![.., .., ..;-1]),
            L3::RowGap => {
                let l = v.dim().1 - 2;
                v.slice_move(s![.., ..l, ..])
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MaskKind {
    Bool,
    U8,
    I32,
    I64,
    F32,
    F64,
}

impl MaskKind {
    const ALL: [MaskKind; 6] = [
        MaskKind::Bool,
        MaskKind::U8,
        MaskKind::I32,
        MaskKind::I64,
        MaskKind::F32,
        MaskKind::F64,
    ];
}

/// A case's mask in one element type, row-major.
#[derive(Clone, Debug)]
enum MaskData {
    Bool(Array2<bool>),
    U8(Array2<u8>),
    I32(Array2<i32>),
    I64(Array2<i64>),
    F32(Array2<f32>),
    F64(Array2<f64>),
}

impl MaskData {
    /// `mask` in element type `kind`, with assorted nonzero values (and −0.0 among the
    /// zeros of float masks), chosen by a hash of `seed` and the position.
    fn new(kind: MaskKind, mask: &Array2<bool>, seed: u64) -> Self {
        const ON: [f64; 5] = [1.0, 0.5, -2.0, 1e-30, 3.0e5];
        let h = |(i, j): (usize, usize)| mix(seed ^ mix(((i as u64) << 32) | j as u64));
        let float = |ij: (usize, usize)| {
            let h = h(ij);
            if mask[ij] {
                ON[(h % 5) as usize]
            } else if h.is_multiple_of(2) {
                -0.0
            } else {
                0.0
            }
        };
        match kind {
            MaskKind::Bool => Self::Bool(mask.clone()),
            MaskKind::U8 => Self::U8(Array2::from_shape_fn(mask.dim(), |ij| {
                if mask[ij] { 1 + (h(ij) % 255) as u8 } else { 0 }
            })),
            MaskKind::I32 => Self::I32(Array2::from_shape_fn(mask.dim(), |ij| {
                if mask[ij] {
                    -1 - (h(ij) % 1000) as i32
                } else {
                    0
                }
            })),
            MaskKind::I64 => Self::I64(Array2::from_shape_fn(mask.dim(), |ij| {
                if mask[ij] {
                    i64::MAX - (h(ij) % 3) as i64
                } else {
                    0
                }
            })),
            MaskKind::F32 => Self::F32(Array2::from_shape_fn(mask.dim(), |ij| float(ij) as f32)),
            MaskKind::F64 => Self::F64(Array2::from_shape_fn(mask.dim(), float)),
        }
    }

    /// Puts a NaN at (i, j) of a float mask; false for a bool or integer mask.
    fn set_nan(&mut self, i: usize, j: usize) -> bool {
        match self {
            Self::F32(m) => m[[i, j]] = f32::NAN,
            Self::F64(m) => m[[i, j]] = f64::NAN,
            Self::Bool(_) | Self::U8(_) | Self::I32(_) | Self::I64(_) => return false,
        }
        true
    }

    /// The mask in layout `kind`; the cells outside the view read as response tokens
    /// (`true`, 1) or as invalid (NaN).
    fn hold(&self, kind: L2) -> HeldMask {
        match self {
            Self::Bool(m) => HeldMask::Bool(Held2::new(kind, m.view(), true)),
            Self::U8(m) => HeldMask::U8(Held2::new(kind, m.view(), 1)),
            Self::I32(m) => HeldMask::I32(Held2::new(kind, m.view(), 1)),
            Self::I64(m) => HeldMask::I64(Held2::new(kind, m.view(), 1)),
            Self::F32(m) => HeldMask::F32(Held2::new(kind, m.view(), f32::NAN)),
            Self::F64(m) => HeldMask::F64(Held2::new(kind, m.view(), f64::NAN)),
        }
    }
}

#[derive(Clone, Debug)]
enum HeldMask {
    Bool(Held2<bool>),
    U8(Held2<u8>),
    I32(Held2<i32>),
    I64(Held2<i64>),
    F32(Held2<f32>),
    F64(Held2<f64>),
}

impl HeldMask {
    fn view(&self) -> Mask<'_> {
        match self {
            Self::Bool(m) => Mask::Bool(m.view()),
            Self::U8(m) => Mask::U8(m.view()),
            Self::I32(m) => Mask::I32(m.view()),
            Self::I64(m) => Mask::I64(m.view()),
            Self::F32(m) => Mask::F32(m.view()),
            Self::F64(m) => Mask::F64(m.view()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------

/// The layout of each input array.
#[derive(Clone, Copy, Debug)]
struct InLayouts {
    logp: L2,
    logp_old: L2,
    /// Per-token advantages.
    adv_token: L2,
    /// Per-row advantages.
    adv_row: L1,
    mask: L2,
    topk_old: L3,
    topk_new: L3,
    logp_ref: L2,
}

impl InLayouts {
    const STANDARD: Self = Self::uniform(L2::Standard, L1::Standard, L3::Standard);

    const fn uniform(two: L2, one: L1, three: L3) -> Self {
        Self {
            logp: two,
            logp_old: two,
            adv_token: two,
            adv_row: one,
            mask: two,
            topk_old: three,
            topk_new: three,
            logp_ref: two,
        }
    }
}

#[derive(Clone, Debug)]
enum HeldAdv<F> {
    Row(Held1<F>),
    Token(Held2<F>),
}

/// A case's input arrays, each in its own buffer and layout. Cells outside the views
/// hold NaN.
#[derive(Clone, Debug)]
struct Held<F> {
    logp: Held2<F>,
    logp_old: Held2<F>,
    adv: HeldAdv<F>,
    mask: HeldMask,
    topk: Option<(Held3<F>, Held3<F>)>,
    logp_ref: Option<Held2<F>>,
    /// In `logp_ref`'s layout.
    is_weights: Option<Held2<F>>,
}

impl<F: Float> Held<F> {
    fn new(case: &Case<F>, mask: &MaskData, lay: &InLayouts) -> Self {
        let nan = F::from_f64(f64::NAN);
        Self {
            logp: Held2::new(lay.logp, case.logp.view(), nan),
            logp_old: Held2::new(lay.logp_old, case.logp_old.view(), nan),
            adv: match &case.adv {
                Adv::Row(a) => HeldAdv::Row(Held1::new(lay.adv_row, a.view(), nan)),
                Adv::Token(a) => HeldAdv::Token(Held2::new(lay.adv_token, a.view(), nan)),
            },
            mask: mask.hold(lay.mask),
            topk: case.topk.as_ref().map(|(o, n)| {
                (
                    Held3::new(lay.topk_old, o.view(), nan),
                    Held3::new(lay.topk_new, n.view(), nan),
                )
            }),
            logp_ref: case
                .logp_ref
                .as_ref()
                .map(|r| Held2::new(lay.logp_ref, r.view(), nan)),
            is_weights: case
                .is_weights
                .as_ref()
                .map(|w| Held2::new(lay.logp_ref, w.view(), nan)),
        }
    }

    fn views(&self) -> Views<'_, F> {
        Views {
            logp: self.logp.view(),
            logp_old: self.logp_old.view(),
            adv: match &self.adv {
                HeldAdv::Row(a) => Advantages::PerRow(a.view()),
                HeldAdv::Token(a) => Advantages::PerToken(a.view()),
            },
            mask: self.mask.view(),
            topk: self.topk.as_ref().map(|(o, n)| (o.view(), n.view())),
            logp_ref: self.logp_ref.as_ref().map(Held2::view),
            is_weights: self.is_weights.as_ref().map(Held2::view),
        }
    }
}

/// Views of a batch's arrays, from which a [`Batch`] borrows.
#[derive(Clone, Copy, Debug)]
struct Views<'a, F> {
    logp: ArrayView2<'a, F>,
    logp_old: ArrayView2<'a, F>,
    adv: Advantages<'a, F>,
    mask: Mask<'a>,
    topk: Option<(ArrayView3<'a, F>, ArrayView3<'a, F>)>,
    logp_ref: Option<ArrayView2<'a, F>>,
    is_weights: Option<ArrayView2<'a, F>>,
}

impl<'a, F: Float> Views<'a, F> {
    fn batch<'s>(&'s self) -> Batch<'s, F> {
        // Reborrow the advantages for the lifetime of the batch.
        let adv = match &self.adv {
            Advantages::PerToken(a) => Advantages::PerToken(a.view()),
            Advantages::PerRow(a) => Advantages::PerRow(a.view()),
        };
        let mask = self.mask.view();
        let b = Batch::new(&self.logp, &self.logp_old, adv, mask).expect("shapes");
        let b = match &self.topk {
            Some((o, n)) => b.with_topk(o, n).expect("top-K shapes"),
            None => b,
        };
        let b = match &self.logp_ref {
            Some(r) => b.with_logp_ref(r).expect("logp_ref shape"),
            None => b,
        };
        match &self.is_weights {
            Some(w) => b.with_is_weights(w).expect("is_weights shape"),
            None => b,
        }
    }

    /// Columns `c0..c1` of every array (per-row advantages whole).
    fn columns(&self, c0: usize, c1: usize) -> Self {
        let cols2 = |v: ArrayView2<'a, F>| v.slice_move(s![.., c0..c1]);
        Self {
            logp: cols2(self.logp),
            logp_old: cols2(self.logp_old),
            adv: match self.adv {
                Advantages::PerToken(a) => Advantages::PerToken(cols2(a)),
                Advantages::PerRow(a) => Advantages::PerRow(a),
            },
            mask: self.mask.columns(c0..c1),
            topk: self.topk.map(|(o, n)| {
                (
                    o.slice_move(s![.., c0..c1, ..]),
                    n.slice_move(s![.., c0..c1, ..]),
                )
            }),
            logp_ref: self.logp_ref.map(cols2),
            is_weights: self.is_weights.map(cols2),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------

/// Each output's layout, or `None` for an output not requested. In the order
/// divergence, weight, threshold, keep, reason, token_loss, grad.
type OutKinds = [Option<L2>; 7];

const OUT_NAMES: [&str; 7] = [
    "divergence",
    "weight",
    "threshold",
    "keep",
    "reason",
    "token_loss",
    "grad",
];

/// What an output buffer holds before the call: no output takes these values.
const SENTINEL: f64 = -12345.678;
const KEEP_SENTINEL: bool = true;
const REASON_SENTINEL: u8 = 0xa5;

/// Caller-owned output buffers in the given layouts.
#[derive(Clone, Debug)]
struct OutBufs<F> {
    divergence: Option<Held2<F>>,
    weight: Option<Held2<F>>,
    threshold: Option<Held2<F>>,
    keep: Option<Held2<bool>>,
    reason: Option<Held2<u8>>,
    token_loss: Option<Held2<F>>,
    grad: Option<Held2<F>>,
    /// (B,), requested with `grad`, in the (B,) layout nearest grad's.
    delta_b_row: Option<Held1<F>>,
}

/// The (B,) layout for a per-row output beside a (B, L) one of layout `k`.
fn row_layout(k: L2) -> L1 {
    match k {
        L2::Reversed | L2::Flipped => L1::Reversed,
        L2::EveryOther | L2::Transposed => L1::EveryOther,
        _ => L1::Standard,
    }
}

impl<F: Float> OutBufs<F> {
    /// Buffers full of sentinels.
    fn new(shape: (usize, usize), kinds: &OutKinds) -> Self {
        let f = Array2::from_elem(shape, F::from_f64(SENTINEL));
        let keep = Array2::from_elem(shape, KEEP_SENTINEL);
        let reason = Array2::from_elem(shape, REASON_SENTINEL);
        let rows = Array1::from_elem(shape.0, F::from_f64(SENTINEL));
        Self::holding([&f, &f, &f, &f, &f], &keep, &reason, &rows, kinds)
    }

    /// What `new`'s buffers must hold after a call that computed `o`: its values in the
    /// views, the sentinels outside them.
    fn expected(o: &Outputs<F>, kinds: &OutKinds) -> Self {
        Self::holding(
            [
                &o.divergence,
                &o.weight,
                &o.threshold,
                &o.token_loss,
                &o.grad,
            ],
            &o.keep,
            &o.reason,
            &o.delta_b_row,
            kinds,
        )
    }

    /// `floats` are divergence, weight, threshold, token_loss, grad.
    fn holding(
        floats: [&Array2<F>; 5],
        keep: &Array2<bool>,
        reason: &Array2<u8>,
        rows: &Array1<F>,
        kinds: &OutKinds,
    ) -> Self {
        let fl = |a: &Array2<F>, k: Option<L2>| {
            k.map(|k| Held2::new(k, a.view(), F::from_f64(SENTINEL)))
        };
        Self {
            divergence: fl(floats[0], kinds[0]),
            weight: fl(floats[1], kinds[1]),
            threshold: fl(floats[2], kinds[2]),
            keep: kinds[3].map(|k| Held2::new(k, keep.view(), KEEP_SENTINEL)),
            reason: kinds[4].map(|k| Held2::new(k, reason.view(), REASON_SENTINEL)),
            token_loss: fl(floats[3], kinds[5]),
            grad: fl(floats[4], kinds[6]),
            delta_b_row: kinds[6]
                .map(|k| Held1::new(row_layout(k), rows.view(), F::from_f64(SENTINEL))),
        }
    }

    fn views(&mut self) -> OutputsMut<'_, F> {
        OutputsMut {
            divergence: self.divergence.as_mut().map(Held2::view_mut),
            weight: self.weight.as_mut().map(Held2::view_mut),
            threshold: self.threshold.as_mut().map(Held2::view_mut),
            keep: self.keep.as_mut().map(Held2::view_mut),
            reason: self.reason.as_mut().map(Held2::view_mut),
            token_loss: self.token_loss.as_mut().map(Held2::view_mut),
            grad: self.grad.as_mut().map(Held2::view_mut),
            delta_b_row: self.delta_b_row.as_mut().map(Held1::view_mut),
        }
    }

    /// The logical arrays of buffers that are all present and row-major.
    fn into_outputs(self) -> Outputs<F> {
        fn take<T>(h: Option<Held2<T>>) -> Array2<T> {
            let h = h.expect("every output requested");
            assert_eq!(h.kind, L2::Standard);
            h.data
        }
        Outputs {
            divergence: take(self.divergence),
            weight: take(self.weight),
            threshold: take(self.threshold),
            keep: take(self.keep),
            reason: take(self.reason),
            token_loss: take(self.token_loss),
            grad: take(self.grad),
            delta_b_row: {
                let h = self.delta_b_row.expect("every output requested");
                assert_eq!(h.kind, L1::Standard);
                h.data
            },
        }
    }

    /// Every buffer, gaps included, bit for bit against `want`.
    fn compare(&self, want: &Self) -> Result<(), String> {
        fn floats<F: Float>(
            what: &str,
            got: &Option<Held2<F>>,
            want: &Option<Held2<F>>,
        ) -> Result<(), String> {
            match (got, want) {
                (Some(g), Some(w)) => {
                    same_bits(&format!("{what} ({:?} buffer)", g.kind), &g.data, &w.data)
                }
                (None, None) => Ok(()),
                _ => Err(format!("{what}: buffers requested differently")),
            }
        }
        fn exact<T: PartialEq + std::fmt::Debug>(
            what: &str,
            got: &Option<Held2<T>>,
            want: &Option<Held2<T>>,
        ) -> Result<(), String> {
            match (got, want) {
                (Some(g), Some(w)) => {
                    same_exact(&format!("{what} ({:?} buffer)", g.kind), &g.data, &w.data)
                }
                (None, None) => Ok(()),
                _ => Err(format!("{what}: buffers requested differently")),
            }
        }
        floats(OUT_NAMES[0], &self.divergence, &want.divergence)?;
        floats(OUT_NAMES[1], &self.weight, &want.weight)?;
        floats(OUT_NAMES[2], &self.threshold, &want.threshold)?;
        exact(OUT_NAMES[3], &self.keep, &want.keep)?;
        exact(OUT_NAMES[4], &self.reason, &want.reason)?;
        floats(OUT_NAMES[5], &self.token_loss, &want.token_loss)?;
        floats(OUT_NAMES[6], &self.grad, &want.grad)?;
        match (&self.delta_b_row, &want.delta_b_row) {
            (Some(g), Some(w)) => same_bits_1d(
                &format!("delta_b_row ({:?} buffer)", g.kind),
                &g.data,
                &w.data,
            ),
            (None, None) => Ok(()),
            _ => Err("delta_b_row: buffers requested differently".into()),
        }
    }
}

/// Equality of two arrays, naming the first differing element (buffer coordinates).
fn same_exact<T: PartialEq + std::fmt::Debug>(
    what: &str,
    a: &Array2<T>,
    b: &Array2<T>,
) -> Result<(), String> {
    if a.dim() != b.dim() {
        return Err(format!("{what}: shape {:?} vs {:?}", a.dim(), b.dim()));
    }
    match a.indexed_iter().zip(b.iter()).find(|((_, x), y)| x != y) {
        Some(((ij, x), y)) => Err(format!("{what}{ij:?}: {x:?} vs {y:?}")),
        None => Ok(()),
    }
}

/// Columns `c0..c1` of every requested output.
fn out_columns<F>(o: OutputsMut<'_, F>, c0: usize, c1: usize) -> OutputsMut<'_, F> {
    fn cols<T>(
        v: Option<ArrayViewMut2<'_, T>>,
        c0: usize,
        c1: usize,
    ) -> Option<ArrayViewMut2<'_, T>> {
        v.map(|v| v.slice_move(s![.., c0..c1]))
    }
    OutputsMut {
        divergence: cols(o.divergence, c0, c1),
        weight: cols(o.weight, c0, c1),
        threshold: cols(o.threshold, c0, c1),
        keep: cols(o.keep, c0, c1),
        reason: cols(o.reason, c0, c1),
        token_loss: cols(o.token_loss, c0, c1),
        grad: cols(o.grad, c0, c1),
        // Per-row: every chunk writes its rows' values.
        delta_b_row: o.delta_b_row,
    }
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// "Ok" or the error, for messages.
fn outcome<T>(r: &cppo::Result<T>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Two evaluations: every output bit for bit, the loss's bits, the diagnostics and the
/// tally.
fn same_evaluation<F: Float>(a: &Evaluation<F>, b: &Evaluation<F>) -> Result<(), String> {
    same_eval(a, b)?;
    let (da, db) = (
        format!("{:?}", a.diagnostics),
        format!("{:?}", b.diagnostics),
    );
    if da != db {
        return Err(format!("diagnostics: {da} vs {db}"));
    }
    let (ta, tb) = (format!("{:?}", a.tally), format!("{:?}", b.tally));
    if ta != tb {
        return Err(format!("tally: {ta} vs {tb}"));
    }
    Ok(())
}

/// Both calls failed with the same error, or both succeeded (then `both_ok` compares).
fn same_outcome<A, B>(
    what: &str,
    want: &cppo::Result<A>,
    got: &cppo::Result<B>,
    both_ok: impl FnOnce(&A, &B) -> Result<(), String>,
) -> Result<(), String> {
    match (want, got) {
        (Ok(w), Ok(g)) => both_ok(w, g).map_err(|e| format!("{what}: {e}")),
        (Err(w), Err(g)) => {
            let (w, g) = (format!("{w:?}"), format!("{g:?}"));
            if w == g {
                Ok(())
            } else {
                Err(format!("{what}: error {g}, contiguous layout {w}"))
            }
        }
        _ => Err(format!(
            "{what}: {}, contiguous layout {}",
            outcome(got),
            outcome(want)
        )),
    }
}

/// The case in the layouts `ins` (mask as `mask`), against row-major copies of the same
/// values: `Batch::validate`, `evaluate`, and `evaluate_into` into buffers in the layouts
/// `outs` from both.
fn check_case<F: Float>(
    case: &Case<F>,
    mask: &MaskData,
    ins: &InLayouts,
    outs: &OutKinds,
    par: Par,
) -> Result<(), String> {
    let cfg = &case.cfg;
    let (base, held) = (
        Held::new(case, mask, &InLayouts::STANDARD),
        Held::new(case, mask, ins),
    );
    let (base_views, views) = (base.views(), held.views());
    let (base_batch, batch) = (base_views.batch(), views.batch());

    same_outcome(
        "Batch::validate",
        &base_batch.validate(),
        &batch.validate(),
        |_, _| Ok(()),
    )?;
    let want = evaluate(cfg, &base_batch, par);
    same_outcome(
        "evaluate, strided inputs",
        &want,
        &evaluate(cfg, &batch, par),
        same_evaluation,
    )?;

    let mut counts = None;
    for (what, batch) in [
        (
            "evaluate_into, contiguous inputs, output layouts",
            &base_batch,
        ),
        ("evaluate_into, strided inputs, output layouts", &batch),
    ] {
        let what = format!("{what} {outs:?}");
        let mut bufs = OutBufs::<F>::new(case.shape(), outs);
        let got = evaluate_into(cfg, batch, bufs.views(), par);
        same_outcome(&what, &want, &got, |w, s| {
            if w.loss.to_bits() != s.loss.to_bits() {
                return Err(format!("loss: {:e} vs {:e}", w.loss, s.loss));
            }
            let (dw, ds) = (
                format!("{:?}", w.diagnostics),
                format!("{:?}", s.diagnostics),
            );
            if dw != ds {
                return Err(format!("diagnostics: {dw} vs {ds}"));
            }
            let (tw, ts) = (format!("{:?}", w.tally), format!("{:?}", s.tally));
            if tw != ts {
                return Err(format!("tally: {tw} vs {ts}"));
            }
            if *counts.get_or_insert(s.counts) != s.counts {
                return Err(format!("counts: {:?} vs {:?}", s.counts, counts));
            }
            bufs.compare(&OutBufs::expected(&w.outputs, outs))
        })?;
    }
    Ok(())
}

/// The rows' merged partials, then each chunk in order into column slices of `bufs`; a
/// log of every partial, summary and carry.
fn run_chunked<F: Float>(
    cfg: &Config,
    views: &Views<'_, F>,
    cuts: &[usize],
    bufs: &mut OutBufs<F>,
    par: Par,
) -> cppo::Result<String> {
    let (b, l) = views.logp.dim();
    let mut partials = vec![RowPartial::default(); b];
    let mut divergences = Array2::<f64>::from_elem((b, l), f64::NAN);
    for w in cuts.windows(2) {
        let chunk = views.columns(w[0], w[1]);
        let pos = ChunkPos {
            col0: w[0],
            width: l,
        };
        for (r, p) in partials
            .iter_mut()
            .zip(row_partials(cfg, &chunk.batch(), pos, par)?)
        {
            *r = r.merge(&p);
        }
        if needs_divergences(cfg) {
            let d = divergences.slice_mut(s![.., w[0]..w[1]]);
            divergences_into(cfg, &chunk.batch(), pos, d, par)?;
        }
    }
    let rows = whole_rows(cfg, &partials, Some(divergences.view()))?;
    let mut log = format!("partials {rows:?}\n");
    let mut carries = vec![Carry::default(); b];
    for w in cuts.windows(2) {
        let chunk = views.columns(w[0], w[1]);
        let pos = ChunkPos {
            col0: w[0],
            width: l,
        };
        let out = out_columns(bufs.views(), w[0], w[1]);
        let s = evaluate_chunk_into(cfg, &chunk.batch(), pos, &rows, &mut carries, out, par)?;
        log += &format!(
            "chunk {w:?}: loss bits {:x}, {s:?}, carries {carries:?}\n",
            s.loss.to_bits()
        );
    }
    for (i, (c, r)) in carries.iter().zip(&rows).enumerate() {
        c.finish(i, r, l)?;
    }
    Ok(log)
}

/// Column chunks (cut at `cuts`, which include 0 and L) of the strided views into
/// strided output buffers, against chunks of row-major copies into row-major buffers.
fn check_chunks<F: Float>(
    case: &Case<F>,
    mask: &MaskData,
    ins: &InLayouts,
    outs: &OutKinds,
    cuts: &[usize],
    par: Par,
) -> Result<(), String> {
    let (base, held) = (
        Held::new(case, mask, &InLayouts::STANDARD),
        Held::new(case, mask, ins),
    );
    let mut base_bufs = OutBufs::<F>::new(case.shape(), &[Some(L2::Standard); 7]);
    let mut bufs = OutBufs::<F>::new(case.shape(), outs);
    let want = run_chunked(&case.cfg, &base.views(), cuts, &mut base_bufs, par)
        .map_err(|e| format!("chunks of the contiguous layout: {e:?}"))?;
    let got = run_chunked(&case.cfg, &held.views(), cuts, &mut bufs, par)
        .map_err(|e| format!("chunks of the strided layout: {e:?}"))?;
    if want != got {
        return Err(format!(
            "chunks {cuts:?}:\n{got}\ncontiguous layout:\n{want}"
        ));
    }
    bufs.compare(&OutBufs::expected(&base_bufs.into_outputs(), outs))
        .map_err(|e| format!("chunks {cuts:?}, output layouts {outs:?}: {e}"))
}

/// [`check_case`] for the f64 case or its f32 cast.
fn check_in(
    case: &Case<f64>,
    f32: bool,
    mask: (MaskKind, u64),
    ins: &InLayouts,
    outs: &OutKinds,
    par: Par,
) -> TestCaseResult {
    let m = MaskData::new(mask.0, &case.mask, mask.1);
    if f32 {
        check_case(&case.cast::<f32>(), &m, ins, outs, par)
    } else {
        check_case(case, &m, ins, outs, par)
    }
    .map_err(TestCaseError::fail)
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// Every rule, CPPO and CPPO-soft with shuffled weights included.
fn rule_mix() -> BoxedStrategy<Rule> {
    prop_oneof![
        6 => rule_strategy(),
        1 => (cppo_params_strategy(), any::<u64>(), prop::option::of(gate_strategy())).prop_map(
            |(p, seed, gate)| Rule::Cppo(CppoParams { shuffle_seed: Some(seed), gate, ..p })
        ),
    ]
    .boxed()
}

/// Every divergence, rule, objective and aggregation, KL penalty on and off, count
/// overrides.
fn config_mix() -> impl Strategy<Value = ConfigDraw> {
    config_with(rule_mix(), objective_mix())
}

/// Small batches (empty ones included) and rows that cross the 64-column blocks.
fn small_case() -> impl Strategy<Value = Case<f64>> {
    prop_oneof![
        3 => case_with(config_mix(), Shape::default()),
        1 => case_with(config_mix(), wide()),
    ]
}

/// Turns one or two stretches of 65 to 229 columns of most rows into padding (with
/// garbage in it), so that whole 64-column blocks hold no response token: rows with
/// responses only at the start, only at the end, or around a long hole.
fn punch_padding(case: &mut Case<f64>, seed: u64) {
    let (b, l) = case.shape();
    assert!(l >= 130, "punch_padding wants rows of at least 130 columns");
    for i in 0..b {
        for stretch in 0..2u64 {
            let h = mix(seed ^ mix(((i as u64) << 8) | stretch));
            // Three rows in four get a first stretch, one in two a second.
            let draw = h % 4;
            if draw == 0 || (stretch == 1 && draw == 1) {
                continue;
            }
            let top = l.min(230);
            let len = 65 + ((h >> 8) % (top - 65) as u64) as usize;
            let start = ((h >> 32) % (l - len + 1) as u64) as usize;
            for j in start..start + len {
                case.mask[[i, j]] = false;
            }
        }
    }
    case.fill_padding(|arr, i, j, k| garbage(seed.rotate_left(17), arr, i, j, k));
}

/// 1 to 5 rows of 130 to 330 columns with long padding stretches.
fn long_case() -> impl Strategy<Value = Case<f64>> {
    (
        config_mix(),
        1usize..=5,
        130usize..=330,
        1usize..=5,
        any::<u64>(),
    )
        .prop_map(|(draw, b, l, k, seed)| {
            let k = if draw.cfg.divergence.needs_topk() || seed.is_multiple_of(3) {
                k
            } else {
                0
            };
            let mut case = big_case(draw, b, l, k, seed);
            punch_padding(&mut case, seed);
            case
        })
}

fn l2() -> impl Strategy<Value = L2> {
    prop::sample::select(L2::ALL.to_vec())
}

fn l1() -> impl Strategy<Value = L1> {
    prop::sample::select(L1::ALL.to_vec())
}

fn l3() -> impl Strategy<Value = L3> {
    prop::sample::select(L3::ALL.to_vec())
}

/// The layouts of the inputs: each drawn on its own, or one kind for all.
fn in_layouts() -> impl Strategy<Value = InLayouts> {
    prop_oneof![
        3 => (l2(), l2(), l2(), l1(), l2(), l3(), l3(), l2()).prop_map(
            |(logp, logp_old, adv_token, adv_row, mask, topk_old, topk_new, logp_ref)| {
                InLayouts { logp, logp_old, adv_token, adv_row, mask, topk_old, topk_new, logp_ref }
            }
        ),
        1 => (l2(), l1(), l3()).prop_map(|(two, one, three)| InLayouts::uniform(two, one, three)),
    ]
}

/// The layouts of the outputs: each drawn on its own (or left out), one kind for all,
/// only `grad` and `keep`, or none.
fn out_layouts() -> impl Strategy<Value = OutKinds> {
    prop_oneof![
        4 => prop::array::uniform7(prop::option::weighted(0.85, l2())),
        2 => l2().prop_map(|k| [Some(k); 7]),
        2 => (l2(), l2()).prop_map(|(g, k)| [None, None, None, Some(k), None, None, Some(g)]),
        1 => Just([None; 7]),
    ]
}

fn mask_kind() -> impl Strategy<Value = MaskKind> {
    prop::sample::select(MaskKind::ALL.to_vec())
}

fn par() -> impl Strategy<Value = Par> {
    prop_oneof![Just(Par::Seq), Just(Par::Rayon)]
}

/// A bad value to plant: which readable array (by index), which response token (or, for
/// a float mask, which position), which k, and what value.
type Plant = (usize, usize, usize, u8);

/// Plants `plants` into the case and the mask; false when nothing could be planted (no
/// response token, and no float mask or no position).
fn plant(case: &mut Case<f64>, mask: &mut MaskData, plants: &[Plant]) -> bool {
    let (b, l) = case.shape();
    let tokens: Vec<(usize, usize)> = (0..b)
        .flat_map(|i| (0..l).map(move |j| (i, j)))
        .filter(|&ij| case.mask[ij])
        .collect();
    let mut arrays = vec![Arr::Logp, Arr::LogpOld, Arr::Adv];
    if case.cfg.divergence.needs_topk() {
        arrays.extend([Arr::TopkOld, Arr::TopkNew]);
    }
    if case.cfg.kl.is_some() {
        arrays.push(Arr::LogpRef);
    }
    let float_mask = matches!(mask, MaskData::F32(_) | MaskData::F64(_));
    let mut planted = false;
    for &(which, at, k, kind) in plants {
        if float_mask && which % (arrays.len() + 1) == arrays.len() && b * l > 0 {
            // A NaN mask value anywhere, padding included.
            planted |= mask.set_nan(at % (b * l) / l, at % l);
            continue;
        }
        if tokens.is_empty() {
            continue;
        }
        let arr = arrays[which % arrays.len()];
        let (i, j) = tokens[at % tokens.len()];
        let v = match kind {
            0 | 1 => f64::NAN,
            2 => f64::INFINITY,
            _ if arr == Arr::Adv => f64::NEG_INFINITY,
            // A log-prob above the 1e-4 tolerance.
            _ => 0.5,
        };
        planted |= case.set(arr, i, j, k % case.k().unwrap_or(1), v);
    }
    planted
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(proptest_config(256, REGRESSIONS))]

    /// Small and block-crossing batches: strided inputs and outputs give the contiguous
    /// results.
    #[test]
    fn small_batches_agree_in_every_layout(
        case in small_case(),
        f32 in any::<bool>(),
        mask in (mask_kind(), any::<u64>()),
        ins in in_layouts(),
        outs in out_layouts(),
        par in par(),
    ) {
        check_in(&case, f32, mask, &ins, &outs, par)?;
    }

    /// A bad value is reported the same way in every layout.
    #[test]
    fn bad_values_give_the_same_error_in_every_layout(
        case in prop_oneof![3 => small_case(), 1 => long_case()],
        plants in prop::collection::vec((0usize..8, any::<usize>(), 0usize..5, 0u8..4), 1..=3),
        f32 in any::<bool>(),
        mask in (mask_kind(), any::<u64>()),
        ins in in_layouts(),
        outs in out_layouts(),
        par in par(),
    ) {
        let mut case = case;
        let mut m = MaskData::new(mask.0, &case.mask, mask.1);
        let planted = plant(&mut case, &mut m, &plants);
        let base = Held::new(&case, &m, &InLayouts::STANDARD);
        let want = evaluate(&case.cfg, &base.views().batch(), par);
        prop_assert!(!planted || want.is_err(), "a planted bad value was accepted");
        let result = if f32 {
            let c32 = case.cast::<f32>();
            check_case(&c32, &m, &ins, &outs, par)
        } else {
            check_case(&case, &m, &ins, &outs, par)
        };
        result.map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(64, REGRESSIONS))]

    /// Rows of 130 to 330 columns with padding stretches longer than a block.
    #[test]
    fn long_padded_rows_agree_in_every_layout(
        case in long_case(),
        f32 in any::<bool>(),
        mask in (mask_kind(), any::<u64>()),
        ins in in_layouts(),
        outs in out_layouts(),
        par in par(),
    ) {
        check_in(&case, f32, mask, &ins, &outs, par)?;
    }

    /// Column chunks of strided views into column slices of strided buffers.
    #[test]
    fn chunks_agree_in_every_layout(
        case in prop_oneof![small_case(), long_case()],
        cuts in prop::collection::vec(0.0f64..=1.0, 0..4),
        f32 in any::<bool>(),
        mask in (mask_kind(), any::<u64>()),
        ins in in_layouts(),
        outs in out_layouts(),
        par in par(),
    ) {
        let mut case = case;
        // Column chunks refuse MinPRO's gradient through the prefix minimum.
        if let Objective::Minpro { stop_gradient, .. } = &mut case.cfg.objective {
            *stop_gradient = true;
        }
        let l = case.shape().1;
        let mut cuts: Vec<usize> = cuts.iter().map(|&u| (u * l as f64) as usize).collect();
        cuts.extend([0, l]);
        cuts.sort_unstable();
        cuts.dedup();
        let m = MaskData::new(mask.0, &case.mask, mask.1);
        let result = if f32 {
            check_chunks(&case.cast::<f32>(), &m, &ins, &outs, &cuts, par)
        } else {
            check_chunks(&case, &m, &ins, &outs, &cuts, par)
        };
        result.map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------------------
// A fixed sweep, and the layouts themselves
// ---------------------------------------------------------------------------------------

fn draw(cfg: Config) -> ConfigDraw {
    ConfigDraw {
        cfg,
        extra_tokens: None,
        extra_seqs: None,
    }
}

/// Every layout kind of every array, on long padded batches under configs that take the
/// top-K, KL, whole-row and shuffled-weight paths, f32 and f64, every mask type.
#[test]
fn every_layout_kind_on_fixed_batches() {
    let kl = |estimator| {
        Some(KlPenalty {
            estimator,
            coef: 0.3,
        })
    };
    let configs = [
        Config {
            divergence: Divergence::TopkKl,
            objective: Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.28,
                dual_clip: Some(3.0),
            },
            kl: kl(KlEstimator::K3),
            ..Config::cppo()
        },
        Config {
            divergence: Divergence::TopkTv,
            objective: Objective::Gspo {
                eps_low: 0.003,
                eps_high: 0.004,
            },
            aggregation: Aggregation::SeqMeanTokenMean,
            ..Config::with_rule(Rule::TrmAvg { delta: 0.1 })
        },
        Config {
            divergence: Divergence::BinaryKl,
            objective: Objective::Minpro {
                include_current: true,
                clip: Some(0.28),
                stop_gradient: false,
            },
            kl: kl(KlEstimator::K2),
            ..Config::with_rule(Rule::Cppo(CppoParams {
                delta: 0.1,
                delta_b: Some(0.05),
                w_min: 0.5,
                horizon: None,
                shuffle_seed: Some(7),
                gate: Some(Gate::Sigmoid { tau: 0.05 }),
                calibration: None,
                ..CppoParams::default()
            }))
        },
        Config {
            divergence: Divergence::K3,
            objective: Objective::Sapo {
                tau_pos: 1.0,
                tau_neg: 1.05,
            },
            aggregation: Aggregation::SeqMeanTokenSumNorm,
            ..Config::with_rule(Rule::Ratio {
                eps_low: 0.2,
                eps_high: 0.2,
            })
        },
    ];
    for (c, cfg) in configs.into_iter().enumerate() {
        let seed = 1000 + c as u64;
        let mut case = big_case(draw(cfg), 4, 300, 3, seed);
        punch_padding(&mut case, seed);
        let c32 = case.cast::<f32>();
        for n in 0..L3::ALL.len() {
            let ins = InLayouts {
                logp: L2::ALL[n % 7],
                logp_old: L2::ALL[(n + 1) % 7],
                adv_token: L2::ALL[(n + 2) % 7],
                adv_row: L1::ALL[n % 3],
                mask: L2::ALL[(n + 3) % 7],
                topk_old: L3::ALL[n],
                topk_new: L3::ALL[(n + 1 + c) % 8],
                logp_ref: L2::ALL[(n + 4) % 7],
            };
            let uniform = InLayouts::uniform(L2::ALL[n % 7], L1::ALL[n % 3], L3::ALL[n]);
            let outs: OutKinds = std::array::from_fn(|o| Some(L2::ALL[(n + o) % 7]));
            let grad_keep = [
                None,
                None,
                None,
                Some(L2::ALL[(n + 5) % 7]),
                None,
                None,
                Some(L2::ALL[(n + 6) % 7]),
            ];
            let mask = MaskData::new(MaskKind::ALL[n % 4], &case.mask, seed + n as u64);
            for (ins, outs) in [(&ins, &outs), (&uniform, &grad_keep)] {
                for par in [Par::Seq, Par::Rayon] {
                    let at = format!("config {c}, {ins:?}, {par:?}");
                    check_case(&case, &mask, ins, outs, par)
                        .unwrap_or_else(|e| panic!("f64, {at}: {e}"));
                    check_case(&c32, &mask, ins, outs, par)
                        .unwrap_or_else(|e| panic!("f32, {at}: {e}"));
                }
            }
        }
    }
}

/// The layouts hold the values they were given, and their rows are non-contiguous
/// where they claim to be (so the kernel's strided paths are the ones taken).
#[test]
fn layouts_are_what_they_claim() {
    let a = Array2::from_shape_fn((3, 5), |(i, j)| (10 * i + j) as f64);
    for kind in L2::ALL {
        let mut h = Held2::new(kind, a.view(), f64::NAN);
        assert_eq!(h.view(), a, "{kind:?}");
        assert_eq!(
            h.view().row(1).as_slice().is_some(),
            kind.contiguous_rows(),
            "{kind:?}"
        );
        assert_eq!(
            h.view_mut().row_mut(1).is_standard_layout(),
            kind.contiguous_rows(),
            "{kind:?}"
        );
        assert_eq!(
            h.view().is_standard_layout(),
            kind == L2::Standard,
            "{kind:?}"
        );
        let gaps = h.data.iter().filter(|x| x.is_nan()).count();
        assert_eq!(gaps, h.data.len() - a.len(), "{kind:?}");
    }
    let v = Array1::from_shape_fn(4, |i| i as f64);
    for kind in L1::ALL {
        let h = Held1::new(kind, v.view(), f64::NAN);
        assert_eq!(h.view(), v, "{kind:?}");
        assert_eq!(
            h.view().as_slice().is_some(),
            kind == L1::Standard,
            "{kind:?}"
        );
    }
    let t = Array3::from_shape_fn((3, 4, 2), |(i, j, k)| (100 * i + 10 * j + k) as f64);
    for kind in L3::ALL {
        let h = Held3::new(kind, t.view(), f64::NAN);
        assert_eq!(h.view(), t, "{kind:?}");
        let row = h.view().index_axis_move(cppo::ndarray::Axis(0), 1);
        assert_eq!(row.as_slice().is_some(), kind.contiguous_rows(), "{kind:?}");
    }
    // Output buffers: a call writes the values into the view and nothing else.
    let mask = Array2::from_shape_fn((3, 5), |(i, j)| (i + j) % 3 != 0);
    let logp = a.mapv(|x| -0.01 * x);
    let logp_old = a.mapv(|x| -0.012 * x - 0.05);
    let adv = Array1::from_vec(vec![1.0, -1.0, 0.5]);
    let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
    let want = evaluate(&Config::cppo(), &batch, Par::Seq).unwrap();
    for kind in L2::ALL {
        let kinds = [Some(kind); 7];
        let mut bufs = OutBufs::<f64>::new((3, 5), &kinds);
        evaluate_into(&Config::cppo(), &batch, bufs.views(), Par::Seq).unwrap();
        bufs.compare(&OutBufs::expected(&want.outputs, &kinds))
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
}

/// A helper that holds its arrays by reference passes `&adv` and `&mask`, references to
/// references: they are accepted and read the same arrays.
#[test]
#[allow(clippy::needless_borrows_for_generic_args)] // the borrows are what is tested
fn references_to_references_are_accepted() {
    fn step(
        logp: &Array2<f32>,
        adv: &Array1<f32>,
        adv_tok: &Array2<f32>,
        mask: &Array2<i64>,
    ) -> (f64, f64) {
        let by_row = Batch::new(logp, logp, &adv, &mask).unwrap();
        let by_tok = Batch::new(logp, logp, &adv_tok, &mask).unwrap();
        let l = |b: &Batch<'_, f32>| evaluate(&Config::cppo(), b, Par::Seq).unwrap().loss;
        (l(&by_row), l(&by_tok))
    }
    let logp = Array2::from_shape_fn((2, 3), |(i, j)| -0.2 - 0.1 * (i + 2 * j) as f32);
    let adv = Array1::from(vec![1.0f32, -2.0]);
    let adv_tok = Array2::from_shape_fn((2, 3), |(i, _)| adv[i]);
    let mask = Array2::from_shape_vec((2, 3), vec![1i64, 1, 0, 1, 0, 0]).unwrap();
    let (row, tok) = step(&logp, &adv, &adv_tok, &mask);
    // On-policy, the surrogate −ρA has value −A per token: (−1 − 1 + 2) / 3 tokens.
    assert_eq!(row, 0.0);
    assert_eq!(tok, row);
    let lp2 = logp.mapv(|x| x - 0.01);
    let direct = evaluate(
        &Config::dppo(),
        &Batch::new(&lp2, &logp, &adv, &mask).unwrap(),
        Par::Seq,
    )
    .unwrap();
    let adv_ref = &adv;
    let mask_ref = &mask;
    let twice = evaluate(
        &Config::dppo(),
        &Batch::new(&lp2, &logp, &adv_ref, &mask_ref).unwrap(),
        Par::Seq,
    )
    .unwrap();
    assert_eq!(direct.loss.to_bits(), twice.loss.to_bits());
}
