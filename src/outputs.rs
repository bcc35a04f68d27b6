//! What [`evaluate`](crate::evaluate) writes besides the loss: seven per-token arrays,
//! each (B, L), and one per-row array, (B,).
//!
//! | output | shape | what |
//! |---|---|---|
//! | `divergence` | (B, L) | D_t |
//! | `weight` | (B, L) | w_t (1 under rules without position weights) |
//! | `threshold` | (B, L) | c_t for CPPO, δ for DPPO and TRM, NaN for `none` and `ratio` |
//! | `keep` | (B, L) | M_t: whether the token keeps its gradient |
//! | `reason` | (B, L) | the [`Reason`](crate::Reason) code of the decision |
//! | `token_loss` | (B, L) | the per-token loss before aggregation: the kept objective term (times the token's IS weight) plus any KL term |
//! | `grad` | (B, L) | dL/dlogp |
//! | `delta_b_row` | (B,) | δ_b^row, CPPO's per-row prefix budget; NaN where the rule has none |
//!
//! Per-token outputs are 0 (`false` for `keep`) at non-response positions, whatever the
//! inputs held there. Floats are in the input's type, rounded once from the f64 the
//! engine computes in.
//!
//! The list is declared once, in this module; [`Outputs`] (owned arrays) and
//! [`OutputsMut`] (optional caller-owned views, for [`evaluate_into`]) come from it, and
//! so does the engine's per-row form.
//!
//! [`evaluate_into`]: crate::evaluate_into
//!
//! ```
//! use cppo::{Outputs, OutputsMut};
//! use cppo::ndarray::Array2;
//! let mut all = Outputs::<f32>::zeros((4, 16)); // every output, owned
//! assert_eq!(all.delta_b_row.len(), 4);
//! let views = all.view_mut(); // every output, borrowed
//! assert!(views.grad.is_some());
//!
//! // Only what a backward pass needs:
//! let mut grad = Array2::<f32>::zeros((4, 16));
//! let some = OutputsMut { grad: Some(grad.view_mut()), ..OutputsMut::default() };
//! assert!(some.keep.is_none());
//! ```

use ndarray::{Array1, Array2, ArrayViewMut1, ArrayViewMut2, Axis, s};

use crate::error::{Error, Result};
use crate::float::Float;

/// Calls `$cb!` with the list of outputs: each with its docs, name, shape kind (`token`
/// for (B, L), `row` for (B,)) and element type (`F` is the input's float type).
macro_rules! output_list {
    ($cb:ident) => {
        $cb! {
            /// D_t.
            divergence: token F;
            /// w_t (1 under rules without position weights).
            weight: token F;
            /// c_t for CPPO, δ for DPPO and TRM, NaN for `none` and `ratio`.
            threshold: token F;
            /// M_t: whether the token keeps its gradient.
            keep: token bool;
            /// The [`Reason`](crate::Reason) code of each decision.
            reason: token u8;
            /// The per-token loss before aggregation: the kept objective term (times the
            /// token's IS weight) plus any KL term.
            token_loss: token F;
            /// dL/dlogp.
            grad: token F;
            /// δ_b^row, (B,): CPPO's per-row prefix budget; NaN where the rule has none.
            delta_b_row: row F;
        }
    };
}

macro_rules! owned_ty {
    (token, $t:ty) => { Array2<$t> };
    (row, $t:ty) => { Array1<$t> };
}

macro_rules! view_ty {
    (token, $a:lifetime, $t:ty) => { ArrayViewMut2<$a, $t> };
    (row, $a:lifetime, $t:ty) => { ArrayViewMut1<$a, $t> };
}

macro_rules! lane_ty {
    (token, $a:lifetime, $t:ty) => { LaneMut<$a, $t> };
    (row, $a:lifetime, $t:ty) => { &$a mut $t };
}

macro_rules! zeros_of {
    (token, $b:expr, $l:expr) => {
        Array2::from_elem(($b, $l), Default::default())
    };
    (row, $b:expr, $l:expr) => {
        Array1::from_elem($b, Default::default())
    };
}

/// The shape of a buffer, and the shape it must have: a fixed-size array and its
/// length (no allocation on the path that succeeds).
macro_rules! dims_of {
    (token, $v:expr) => {{
        let (b, l) = $v.dim();
        ([b, l], 2)
    }};
    (row, $v:expr) => {
        ([$v.len(), 0], 1)
    };
}

macro_rules! want_of {
    (token, $b:expr, $l:expr) => {
        ([$b, $l], 2)
    };
    (row, $b:expr, $l:expr) => {
        ([$b, 0], 1)
    };
}

macro_rules! lane_of {
    (token, $v:expr, $r:expr) => {
        LaneMut::new($v.index_axis_mut(Axis(0), $r))
    };
    (row, $v:expr, $r:expr) => {
        &mut $v[$r]
    };
}

/// Writes the zero of every per-token output to columns `j0..j0 + n` (a no-op for
/// per-row outputs).
macro_rules! zero_cols {
    (token, $lane:expr, $j0:expr, $n:expr) => {
        if let Some(l) = $lane {
            l.fill_range($j0, $n, Default::default());
        }
    };
    (row, $lane:expr, $j0:expr, $n:expr) => {};
}

macro_rules! define_outputs {
    ($( $(#[$doc:meta])* $name:ident : $kind:ident $t:ty; )*) => {
        /// Every output of [`evaluate`](crate::evaluate), owned. See the
        /// [module docs](self).
        ///
        /// ```
        /// use cppo::{evaluate, Batch, Config, Par};
        /// use cppo::ndarray::array;
        /// let (logp, logp_old) = (array![[0.5f64.ln(), -0.1]], array![[0.2f64.ln(), -0.1]]);
        /// let (adv, mask) = (array![1.0], array![[true, true]]);
        /// let batch = Batch::new(&logp, &logp_old, &adv, &mask)?;
        /// let out = evaluate(&Config::dppo(), &batch, Par::Seq)?.outputs;
        /// // D = |0.5 − 0.2| > δ = 0.15 on the first token, which moves away (A > 0, ρ > 1).
        /// assert_eq!(out.keep, array![[false, true]]);
        /// assert_eq!(out.reason, array![[3u8, 1]]);
        /// assert_eq!(out.threshold, array![[0.15, 0.15]]);
        /// assert!(out.delta_b_row[0].is_nan()); // dppo has no budget
        /// # Ok::<(), cppo::Error>(())
        /// ```
        pub struct Outputs<F> {
            $( $(#[$doc])* pub $name: owned_ty!($kind, $t), )*
        }

        /// Caller-owned output buffers for [`evaluate_into`](crate::evaluate_into), each
        /// optional: a trainer that needs only `grad` (and perhaps `keep`) passes only
        /// those and saves the memory traffic of the rest. Per-token buffers are (B, L),
        /// `delta_b_row` is (B,); any layout (strided, transposed) is accepted.
        ///
        /// ```
        /// use cppo::{evaluate_into, Batch, Config, OutputsMut, Par};
        /// use cppo::ndarray::{array, Array2};
        /// let (lp, adv, mask) = (array![[-0.5, -0.3]], array![1.0], array![[true, true]]);
        /// let batch = Batch::new(&lp, &lp, &adv, &mask)?;
        /// let mut keep = Array2::<bool>::default((1, 2));
        /// let out = OutputsMut { keep: Some(keep.view_mut()), ..OutputsMut::default() };
        /// evaluate_into(&Config::cppo(), &batch, out, Par::Seq)?;
        /// assert_eq!(keep, array![[true, true]]); // ρ = 1: nothing to mask
        /// // A transposed buffer of the right shape is accepted too.
        /// let mut grad_t = Array2::<f64>::zeros((2, 1));
        /// let grad = Some(grad_t.view_mut().reversed_axes());
        /// let out = OutputsMut { grad, ..OutputsMut::default() };
        /// assert!(evaluate_into(&Config::cppo(), &batch, out, Par::Seq).is_ok());
        /// # Ok::<(), cppo::Error>(())
        /// ```
        pub struct OutputsMut<'a, F> {
            $( $(#[$doc])* pub $name: Option<view_ty!($kind, 'a, $t)>, )*
        }

        impl<F: Clone> Clone for Outputs<F> {
            fn clone(&self) -> Self {
                Self { $( $name: self.$name.clone(), )* }
            }
        }

        impl<F: PartialEq> PartialEq for Outputs<F> {
            fn eq(&self, other: &Self) -> bool {
                true $( && self.$name == other.$name )*
            }
        }

        impl<F: std::fmt::Debug> std::fmt::Debug for Outputs<F> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("Outputs")
                    $( .field(stringify!($name), &self.$name) )*
                    .finish()
            }
        }

        impl<F: std::fmt::Debug> std::fmt::Debug for OutputsMut<'_, F> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("OutputsMut")
                    $( .field(stringify!($name), &self.$name) )*
                    .finish()
            }
        }

        impl<F: Float> Outputs<F> {
            /// Zeroed outputs for a (B, L) batch.
            ///
            /// ```
            /// let out = cppo::Outputs::<f64>::zeros((2, 3));
            /// assert_eq!(out.grad.dim(), (2, 3));
            /// assert_eq!(out.delta_b_row.len(), 2);
            /// ```
            pub fn zeros((b, l): (usize, usize)) -> Self {
                Self { $( $name: zeros_of!($kind, b, l), )* }
            }

            /// Mutable views of every output, for [`evaluate_into`](crate::evaluate_into).
            ///
            /// ```
            /// let mut out = cppo::Outputs::<f32>::zeros((2, 3));
            /// assert!(out.view_mut().reason.is_some());
            /// ```
            pub fn view_mut(&mut self) -> OutputsMut<'_, F> {
                OutputsMut { $( $name: Some(self.$name.view_mut()), )* }
            }
        }

        impl<F> Default for OutputsMut<'_, F> {
            /// No buffers: [`evaluate_into`](crate::evaluate_into) then computes only the
            /// loss and the diagnostics.
            fn default() -> Self {
                Self { $( $name: None, )* }
            }
        }

        impl<'a, F> OutputsMut<'a, F> {
            /// Checks every given buffer against a (B, L) batch.
            pub(crate) fn check_shapes(&self, (b, l): (usize, usize)) -> Result<()> {
                $(
                    if let Some(v) = &self.$name {
                        let ((got, n), (want, _)) = (dims_of!($kind, v), want_of!($kind, b, l));
                        if got != want {
                            let expected = match n {
                                2 => format!("({b}, {l}), as the batch"),
                                _ => format!("({b},), one per row of the batch"),
                            };
                            return Err(Error::ShapeMismatch {
                                array: stringify!($name),
                                expected,
                                got: got[..n].to_vec(),
                            });
                        }
                    }
                )*
                Ok(())
            }

            /// The first `mid` rows and the rest.
            pub(crate) fn split_rows(self, mid: usize) -> (Self, Self) {
                let mut top = OutputsMut::default();
                let mut bottom = OutputsMut::default();
                $(
                    if let Some(v) = self.$name {
                        let (a, b) = v.split_at(Axis(0), mid);
                        top.$name = Some(a);
                        bottom.$name = Some(b);
                    }
                )*
                (top, bottom)
            }

        }

        impl<'a, F: Float> OutputsMut<'a, F> {
            /// Row `r` of every given buffer.
            pub(crate) fn row(&mut self, r: usize) -> RowOut<'_, F> {
                RowOut { $( $name: self.$name.as_mut().map(|v| lane_of!($kind, v, r)), )* }
            }
        }

        /// One row of every requested output: a lane of each per-token buffer, the row's
        /// element of each per-row buffer.
        pub(crate) struct RowOut<'r, F> {
            $( pub $name: Option<lane_ty!($kind, 'r, $t)>, )*
        }

        impl<F: Float> RowOut<'_, F> {
            /// Writes every per-token output's zero (`false`, 0) to columns `j0..j0 + n`.
            pub(crate) fn zero_cols(&mut self, j0: usize, n: usize) {
                $( zero_cols!($kind, &mut self.$name, j0, n); )*
            }
        }
    };
}

output_list!(define_outputs);

/// One row of a per-token output. Written through a slice when it is contiguous (the
/// common case), else through the strided view.
pub(crate) struct LaneMut<'a, T>(ArrayViewMut1<'a, T>);

impl<'a, T: Copy> LaneMut<'a, T> {
    fn new(v: ArrayViewMut1<'a, T>) -> Self {
        Self(v)
    }

    /// Overwrites column `j`.
    pub(crate) fn set(&mut self, j: usize, x: T) {
        self.0[j] = x;
    }

    /// Writes `x` to columns `j0..j0 + n`.
    pub(crate) fn fill_range(&mut self, j0: usize, n: usize, x: T) {
        match self.0.as_slice_mut() {
            Some(s) => s[j0..j0 + n].fill(x),
            None => self.0.slice_mut(s![j0..j0 + n]).fill(x),
        }
    }

    /// Writes `f(k)` for k < n to columns `j0..j0 + n`.
    #[inline(always)]
    pub(crate) fn write(&mut self, j0: usize, n: usize, f: impl Fn(usize) -> T) {
        match self.0.as_slice_mut() {
            Some(s) => {
                for (k, d) in s[j0..j0 + n].iter_mut().enumerate() {
                    *d = f(k);
                }
            }
            None => {
                for (k, d) in self.0.slice_mut(s![j0..j0 + n]).iter_mut().enumerate() {
                    *d = f(k);
                }
            }
        }
    }
}
