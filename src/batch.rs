//! A borrowed view of one batch: the inputs of [`evaluate`](crate::evaluate).
//!
//! | name | shape | meaning |
//! |---|---|---|
//! | `logp` | (B, L) | log π_θ(y_t \| y_<t): the current policy, the only input gradients flow through |
//! | `logp_old` | (B, L) | log μ(y_t \| y_<t): the rollout policy, the trust-region anchor |
//! | `advantages` | (B, L) or (B,) | A_t; a (B,) array is broadcast along its row |
//! | `mask` | (B, L) | response mask (`bool`, any integer type, `f32` or `f64`): nonzero = a generated token that is trained on |
//! | `topk_logp_old` | (B, L, K) | optional: the rollout policy's top-K log-probs at each position |
//! | `topk_logp` | (B, L, K) | optional: the current policy's log-probs of those K tokens |
//! | `logp_ref` | (B, L) | optional: the reference policy, for the KL penalty |
//! | `is_weights` | (B, L) | optional: rollout importance-sampling weights (verl's `rollout_is_weights`), constants ≥ 0 that multiply each token's objective term and its gradient (not the KL term) |
//!
//! A [`Batch`] borrows its arrays (no copies) and checks their shapes when it is built.
//! Values are checked where they are read: at response positions only, since padding
//! may hold NaN, −inf or garbage and is never read. [`Batch::validate`] runs the value
//! checks on their own; [`evaluate`](crate::evaluate) runs them inside its single pass,
//! and reports the first bad value in row-major order, whatever the thread count.
//!
//! The value checks: a NaN or infinite log-prob, advantage or top-K log-prob at a
//! response position is an error, as is a log-prob above 1e-4; a log-prob in (0, 1e-4]
//! is read as 0 (bf16 rounding of a probability of 1). An IS weight at a response
//! position must be finite and ≥ 0. A float mask must be finite everywhere.
//!
//! ```
//! use cppo::Batch;
//! use cppo::ndarray::{array, Array2};
//! let logp = array![[-0.1f32, -2.0, f32::NAN]];
//! let logp_old = array![[-0.2f32, -1.5, f32::NEG_INFINITY]];
//! let adv = array![1.0f32]; // one advantage per row, broadcast
//! let mask = array![[1u8, 1, 0]];
//! let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
//! assert_eq!(batch.shape(), (1, 3));
//! batch.validate().unwrap(); // the NaN and -inf sit in padding
//!
//! let wrong = Array2::<u8>::ones((2, 3));
//! assert!(Batch::new(&logp, &logp_old, &adv, &wrong).is_err());
//! ```

use ndarray::{
    Array2, ArrayBase, ArrayRef2, ArrayView1, ArrayView2, ArrayView3, Axis, Data, Ix1, Ix2,
};

use crate::aggregate::Counts;
use crate::error::{At, Error, Result};
use crate::float::{Float, MaskElem, dispatch_mask, with_mask};
use crate::limits::{LOGP_TOLERANCE, MAX_ABS_ADVANTAGE, MAX_IS_WEIGHT, MIN_LOGPROB};

/// The advantages of a batch: one per token (B, L), or one per row (B,).
///
/// Built by `From` from a view or a reference to a 2-D or a 1-D array.
///
/// ```
/// use cppo::Advantages;
/// use cppo::ndarray::array;
/// let per_row = array![1.0f32, -0.5];
/// assert!(matches!(Advantages::from(&per_row), Advantages::PerRow(a) if a.len() == 2));
/// let per_token = array![[1.0f32, 0.0, 2.0]];
/// assert!(matches!(Advantages::from(&per_token), Advantages::PerToken(a) if a.dim() == (1, 3)));
/// ```
#[derive(Clone, Copy, Debug)]
pub enum Advantages<'a, F> {
    /// A_t per token.
    PerToken(ArrayView2<'a, F>),
    /// One A per row, broadcast along it (GRPO's outcome rewards).
    PerRow(ArrayView1<'a, F>),
}

impl<'a, F> From<ArrayView2<'a, F>> for Advantages<'a, F> {
    fn from(v: ArrayView2<'a, F>) -> Self {
        Self::PerToken(v)
    }
}

impl<'a, F> From<ArrayView1<'a, F>> for Advantages<'a, F> {
    fn from(v: ArrayView1<'a, F>) -> Self {
        Self::PerRow(v)
    }
}

impl<'a, F, S: Data<Elem = F>> From<&'a ArrayBase<S, Ix2>> for Advantages<'a, F> {
    fn from(a: &'a ArrayBase<S, Ix2>) -> Self {
        Self::PerToken(a.view())
    }
}

impl<'a, F, S: Data<Elem = F>> From<&'a ArrayBase<S, Ix1>> for Advantages<'a, F> {
    fn from(a: &'a ArrayBase<S, Ix1>) -> Self {
        Self::PerRow(a.view())
    }
}

/// A reference to a reference, as a function that holds `adv: &Array1<f32>` writes
/// `Batch::new(.., &adv, ..)`.
impl<'a, F, S: Data<Elem = F>> From<&&'a ArrayBase<S, Ix2>> for Advantages<'a, F> {
    fn from(a: &&'a ArrayBase<S, Ix2>) -> Self {
        Self::PerToken(a.view())
    }
}

/// A reference to a reference, as a function that holds `adv: &Array1<f32>` writes
/// `Batch::new(.., &adv, ..)`.
impl<'a, F, S: Data<Elem = F>> From<&&'a ArrayBase<S, Ix1>> for Advantages<'a, F> {
    fn from(a: &&'a ArrayBase<S, Ix1>) -> Self {
        Self::PerRow(a.view())
    }
}

macro_rules! define_masks {
    (; $($v:ident: $t:ty,)*) => {
        /// The response mask, in any of the element types trainers use: `bool`, an
        /// integer type, `f32` or `f64` (nonzero = a response token; a float mask must
        /// be finite). Built from a view or a reference to an array of any of them.
        ///
        /// ```
        /// use cppo::Mask;
        /// use cppo::ndarray::array;
        /// let m = array![[1i64, 0, 5]];
        /// let mask = Mask::from(&m);
        /// assert_eq!(mask.dim(), (1, 3));
        /// ```
        #[derive(Clone, Copy, Debug)]
        pub enum Mask<'a> {
            $(
                #[doc = concat!("`", stringify!($t), "` elements.")]
                $v(ArrayView2<'a, $t>),
            )*
        }

        /// One row of a [`Mask`].
        #[derive(Clone, Copy, Debug)]
        pub(crate) enum MaskRow<'a> {
            $( $v(ArrayView1<'a, $t>), )*
        }

        $(
            impl<'a> From<ArrayView2<'a, $t>> for Mask<'a> {
                fn from(v: ArrayView2<'a, $t>) -> Self {
                    Self::$v(v)
                }
            }
            impl<'a> From<&'a ArrayRef2<$t>> for Mask<'a> {
                fn from(a: &'a ArrayRef2<$t>) -> Self {
                    Self::$v(a.view())
                }
            }
            impl<'a> From<&'a Array2<$t>> for Mask<'a> {
                fn from(a: &'a Array2<$t>) -> Self {
                    Self::$v(a.view())
                }
            }
            impl<'a, 'b> From<&'a ArrayView2<'b, $t>> for Mask<'a> {
                fn from(a: &'a ArrayView2<'b, $t>) -> Self {
                    Self::$v(a.view())
                }
            }
            impl<'a> From<&&'a Array2<$t>> for Mask<'a> {
                fn from(a: &&'a Array2<$t>) -> Self {
                    Self::$v(a.view())
                }
            }
        )*
    };
}
crate::float::mask_types!(define_masks!());

impl<'a> Mask<'a> {
    /// (B, L).
    ///
    /// ```
    /// let m = cppo::ndarray::Array2::<bool>::from_elem((2, 5), true);
    /// assert_eq!(cppo::Mask::from(&m).dim(), (2, 5));
    /// ```
    pub fn dim(&self) -> (usize, usize) {
        with_mask!(self, Mask, |m| m.dim())
    }

    /// A reborrow of the mask for a shorter lifetime (ndarray's views are invariant in
    /// their lifetime, so a `Mask<'a>` held in a struct does not shorten by itself).
    ///
    /// ```
    /// let m = cppo::ndarray::array![[true, false]];
    /// let mask = cppo::Mask::from(&m);
    /// assert_eq!(mask.view().dim(), (1, 2));
    /// ```
    pub fn view(&self) -> Mask<'_> {
        macro_rules! view {
            (; $($v:ident: $t:ty,)*) => {
                match self {
                    $( Self::$v(m) => Mask::$v(m.view()), )*
                }
            };
        }
        crate::float::mask_types!(view!())
    }

    /// Columns `range` of every row: the mask of a column chunk.
    ///
    /// ```
    /// let m = cppo::ndarray::array![[1u8, 1, 0, 0]];
    /// let chunk = cppo::Mask::from(&m).columns(1..3);
    /// assert_eq!(chunk.dim(), (1, 2));
    /// ```
    ///
    /// # Panics
    ///
    /// If `range` is not within `0..L`, as ndarray's slicing does.
    pub fn columns(self, range: std::ops::Range<usize>) -> Self {
        macro_rules! columns {
            (; $($v:ident: $t:ty,)*) => {
                match self {
                    $( Self::$v(m) => Self::$v(m.slice_move(ndarray::s![.., range])), )*
                }
            };
        }
        crate::float::mask_types!(columns!())
    }

    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> MaskRow<'a> {
        macro_rules! rows {
            (; $($v:ident: $t:ty,)*) => {
                match *self {
                    $( Self::$v(m) => MaskRow::$v(m.index_axis_move(Axis(0), i)), )*
                }
            };
        }
        crate::float::mask_types!(rows!())
    }

    /// Number of nonzero values in row `i` (a NaN counts: it is not zero), without checks.
    pub(crate) fn row_len_unchecked(&self, i: usize) -> usize {
        self.row(i).len_unchecked()
    }

    /// Number of response tokens in row `i`, or the first invalid (non-finite) mask
    /// value in it.
    pub(crate) fn row_len(&self, i: usize) -> Result<usize> {
        fn count<M: MaskElem>(row: &ArrayView1<'_, M>, i: usize) -> Result<usize> {
            let mut n = 0;
            for (j, &m) in row.iter().enumerate() {
                if !m.is_valid() {
                    return Err(Error::NonFinite {
                        array: "mask",
                        at: At::new(i, j),
                        value: m.to_f64(),
                    });
                }
                n += usize::from(m.is_on());
            }
            Ok(n)
        }
        with_mask!(&self.row(i), MaskRow, |m| count(m, i))
    }

    /// Whether (i, j) is a response token; an error for a non-finite float mask value.
    fn at(&self, i: usize, j: usize) -> Result<bool> {
        fn at<M: MaskElem>(m: &ArrayView2<'_, M>, i: usize, j: usize) -> Result<bool> {
            let v = m[[i, j]];
            if v.is_valid() {
                Ok(v.is_on())
            } else {
                Err(Error::NonFinite {
                    array: "mask",
                    at: At::new(i, j),
                    value: v.to_f64(),
                })
            }
        }
        with_mask!(self, Mask, |m| at(m, i, j))
    }
}

impl MaskRow<'_> {
    /// Number of nonzero values (a NaN counts: it is not zero), without checks.
    pub(crate) fn len_unchecked(&self) -> usize {
        with_mask!(self, MaskRow, |m| m.iter().filter(|x| x.is_on()).count())
    }
}

/// The optional top-K pair, (B, L, K) each.
///
/// ```
/// use cppo::TopK;
/// use cppo::ndarray::Array3;
/// let (p, q) = (Array3::<f32>::zeros((2, 3, 4)), Array3::<f32>::zeros((2, 3, 4)));
/// let topk = TopK { logp_old: p.view(), logp: q.view() };
/// assert_eq!(topk.logp.dim(), (2, 3, 4));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TopK<'a, F> {
    /// log P_k: the rollout policy's top-K log-probs.
    pub logp_old: ArrayView3<'a, F>,
    /// log Q_k: the current policy's log-probs of the same tokens.
    pub logp: ArrayView3<'a, F>,
}

/// A shape-checked, borrowed batch. See the [module docs](self).
///
/// ```
/// use cppo::Batch;
/// use cppo::ndarray::array;
/// let (logp, logp_old) = (array![[-0.1f64, -0.9]], array![[-0.2f64, -0.8]]);
/// let (adv, mask) = (array![[0.5f64, -0.5]], array![[true, true]]);
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask)?;
/// assert_eq!(batch.shape(), (1, 2));
/// assert!(batch.topk_width().is_none() && !batch.has_logp_ref());
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a, F> {
    pub(crate) logp: ArrayView2<'a, F>,
    pub(crate) logp_old: ArrayView2<'a, F>,
    pub(crate) advantages: Advantages<'a, F>,
    pub(crate) mask: Mask<'a>,
    pub(crate) topk: Option<TopK<'a, F>>,
    pub(crate) logp_ref: Option<ArrayView2<'a, F>>,
    pub(crate) is_weights: Option<ArrayView2<'a, F>>,
}

fn shape_err(array: &'static str, expected: String, got: &[usize]) -> Error {
    Error::ShapeMismatch {
        array,
        expected,
        got: got.to_vec(),
    }
}

impl<'a, F: Float> Batch<'a, F> {
    /// A batch of `logp`, `logp_old` (B, L), `advantages` (B, L) or (B,), and a (B, L)
    /// response mask. Checks the shapes.
    ///
    /// ```
    /// use cppo::{Batch, Error};
    /// use cppo::ndarray::array;
    /// let (logp, mask) = (array![[-0.5f32, -1.0]], array![[1u8, 1]]);
    /// assert!(Batch::new(&logp, &logp, &array![1.0f32], &mask).is_ok());
    /// // Three advantages for one row: neither (1,) nor (1, 2).
    /// let err = Batch::new(&logp, &logp, &array![1.0f32, 2.0, 3.0], &mask).unwrap_err();
    /// assert!(matches!(err, Error::ShapeMismatch { array: "advantages", .. }));
    /// ```
    pub fn new(
        logp: &'a ArrayRef2<F>,
        logp_old: &'a ArrayRef2<F>,
        advantages: impl Into<Advantages<'a, F>>,
        mask: impl Into<Mask<'a>>,
    ) -> Result<Self> {
        let (b, l) = logp.dim();
        let bl = format!("({b}, {l})");
        if logp_old.dim() != (b, l) {
            return Err(shape_err("logp_old", bl, logp_old.shape()));
        }
        let advantages = advantages.into();
        match &advantages {
            Advantages::PerToken(a) if a.dim() != (b, l) => {
                return Err(shape_err(
                    "advantages",
                    format!("({b},) or {bl}"),
                    a.shape(),
                ));
            }
            Advantages::PerRow(a) if a.len() != b => {
                return Err(shape_err(
                    "advantages",
                    format!("({b},) or {bl}"),
                    a.shape(),
                ));
            }
            _ => {}
        }
        let mask = mask.into();
        if mask.dim() != (b, l) {
            let (mb, ml) = mask.dim();
            return Err(shape_err("mask", bl, &[mb, ml]));
        }
        Ok(Self {
            logp: logp.view(),
            logp_old: logp_old.view(),
            advantages,
            mask,
            topk: None,
            logp_ref: None,
            is_weights: None,
        })
    }

    /// Adds the top-K pair, both (B, L, K) with the same K ≥ 1.
    ///
    /// ```
    /// use cppo::Batch;
    /// use cppo::ndarray::{Array1, Array2, Array3};
    /// let z = Array2::<f64>::zeros((2, 3));
    /// let (adv, mask) = (Array1::<f64>::ones(2), Array2::<bool>::from_elem((2, 3), true));
    /// let b = Batch::new(&z, &z, &adv, &mask).unwrap();
    /// let k4 = Array3::<f64>::zeros((2, 3, 4));
    /// let k5 = Array3::<f64>::zeros((2, 3, 5));
    /// assert!(b.with_topk(&k4, &k4).is_ok());
    /// assert!(b.with_topk(&k4, &k5).is_err()); // different widths
    /// ```
    pub fn with_topk(
        mut self,
        topk_logp_old: &'a ndarray::ArrayRef3<F>,
        topk_logp: &'a ndarray::ArrayRef3<F>,
    ) -> Result<Self> {
        let (b, l) = self.shape();
        let (tb, tl, k) = topk_logp_old.dim();
        if (tb, tl) != (b, l) || k == 0 {
            return Err(shape_err(
                "topk_logp_old",
                format!("({b}, {l}, K) with K >= 1"),
                topk_logp_old.shape(),
            ));
        }
        if topk_logp.dim() != (b, l, k) {
            return Err(shape_err(
                "topk_logp",
                format!("({b}, {l}, {k}), as topk_logp_old"),
                topk_logp.shape(),
            ));
        }
        self.topk = Some(TopK {
            logp_old: topk_logp_old.view(),
            logp: topk_logp.view(),
        });
        Ok(self)
    }

    /// Adds the reference policy's log-probs (B, L), for the KL penalty.
    ///
    /// ```
    /// use cppo::Batch;
    /// use cppo::ndarray::{array, Array2};
    /// let (lp, adv, mask) = (array![[-0.5, -0.7]], array![1.0], array![[true, true]]);
    /// let batch = Batch::new(&lp, &lp, &adv, &mask)?.with_logp_ref(&lp)?;
    /// assert!(batch.has_logp_ref());
    /// assert!(batch.with_logp_ref(&Array2::zeros((1, 3))).is_err()); // not (1, 2)
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn with_logp_ref(mut self, logp_ref: &'a ArrayRef2<F>) -> Result<Self> {
        self.logp_ref = Some(self.same_shape("logp_ref", logp_ref)?);
        Ok(self)
    }

    /// Adds rollout importance-sampling weights (B, L) (verl's `rollout_is_weights`):
    /// each token's objective term and gradient are multiplied by its weight; the KL
    /// term is not. Read at response positions only, where they must be finite and ≥ 0.
    ///
    /// ```
    /// use cppo::{evaluate, Batch, Config, Par};
    /// use cppo::ndarray::array;
    /// let (lp, lq) = (array![[-0.5, -0.7]], array![[-0.5, -0.7]]);
    /// let (adv, mask) = (array![1.0], array![[true, true]]);
    /// let w = array![[2.0, 0.0]];
    /// let plain = evaluate(&Config::cppo(), &Batch::new(&lp, &lq, &adv, &mask)?, Par::Seq)?;
    /// let batch = Batch::new(&lp, &lq, &adv, &mask)?.with_is_weights(&w)?;
    /// let weighted = evaluate(&Config::cppo(), &batch, Par::Seq)?;
    /// assert_eq!(weighted.outputs.grad[[0, 0]], 2.0 * plain.outputs.grad[[0, 0]]);
    /// assert_eq!(weighted.outputs.grad[[0, 1]], 0.0);
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn with_is_weights(mut self, is_weights: &'a ArrayRef2<F>) -> Result<Self> {
        self.is_weights = Some(self.same_shape("is_weights", is_weights)?);
        Ok(self)
    }

    /// A view of `a`, checked to be (B, L).
    fn same_shape(&self, array: &'static str, a: &'a ArrayRef2<F>) -> Result<ArrayView2<'a, F>> {
        let (b, l) = self.shape();
        if a.dim() == (b, l) {
            Ok(a.view())
        } else {
            Err(shape_err(array, format!("({b}, {l})"), a.shape()))
        }
    }

    /// (B, L).
    ///
    /// ```
    /// use cppo::ndarray::{Array1, Array2};
    /// let (z, adv) = (Array2::<f32>::zeros((3, 7)), Array1::<f32>::zeros(3));
    /// let mask = Array2::<bool>::default((3, 7));
    /// assert_eq!(cppo::Batch::new(&z, &z, &adv, &mask)?.shape(), (3, 7));
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn shape(&self) -> (usize, usize) {
        self.logp.dim()
    }

    /// K of the top-K pair, if present.
    ///
    /// ```
    /// use cppo::ndarray::{Array1, Array2, Array3};
    /// let (z, adv) = (Array2::<f64>::zeros((2, 3)), Array1::<f64>::zeros(2));
    /// let mask = Array2::<bool>::default((2, 3));
    /// let batch = cppo::Batch::new(&z, &z, &adv, &mask)?;
    /// assert_eq!(batch.topk_width(), None);
    /// let k = Array3::<f64>::zeros((2, 3, 8));
    /// assert_eq!(batch.with_topk(&k, &k)?.topk_width(), Some(8));
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn topk_width(&self) -> Option<usize> {
        self.topk.map(|t| t.logp_old.dim().2)
    }

    /// Whether a `logp_ref` is present.
    ///
    /// ```
    /// use cppo::ndarray::array;
    /// let (lp, adv, mask) = (array![[-0.5]], array![1.0], array![[true]]);
    /// let batch = cppo::Batch::new(&lp, &lp, &adv, &mask)?;
    /// assert!(!batch.has_logp_ref());
    /// assert!(batch.with_logp_ref(&lp)?.has_logp_ref());
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn has_logp_ref(&self) -> bool {
        self.logp_ref.is_some()
    }

    /// Whether `is_weights` are present.
    ///
    /// ```
    /// use cppo::ndarray::array;
    /// let (lp, adv, mask, w) = (array![[-0.5]], array![1.0], array![[true]], array![[0.5]]);
    /// let batch = cppo::Batch::new(&lp, &lp, &adv, &mask)?;
    /// assert!(!batch.has_is_weights());
    /// assert!(batch.with_is_weights(&w)?.has_is_weights());
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn has_is_weights(&self) -> bool {
        self.is_weights.is_some()
    }

    /// The number of response tokens in each row.
    ///
    /// # Errors
    ///
    /// A non-finite value in a float mask.
    ///
    /// ```
    /// use cppo::ndarray::{array, Array2};
    /// let z = Array2::<f32>::zeros((2, 3));
    /// let (adv, mask) = (array![1.0f32, 1.0], array![[1.0f32, 0.0, 1.0], [0.0, 0.0, 0.0]]);
    /// assert_eq!(cppo::Batch::new(&z, &z, &adv, &mask)?.row_lengths()?, vec![2, 0]);
    /// let nan = array![[1.0f32, f32::NAN, 0.0], [0.0, 0.0, 0.0]];
    /// assert!(cppo::Batch::new(&z, &z, &adv, &nan)?.row_lengths().is_err());
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn row_lengths(&self) -> Result<Vec<usize>> {
        (0..self.shape().0).map(|i| self.mask.row_len(i)).collect()
    }

    /// This batch's response tokens N_tok and sequences N_seq (rows with at least one
    /// response token): what each data-parallel rank or micro-batch contributes to the
    /// global counts. Sum them over the shards ([`Counts::merge`], or an all-reduce of the
    /// two integers) and set `num_tokens` / `num_seqs` to the totals: the shards' losses
    /// and gradients then add up to the whole batch's.
    ///
    /// # Errors
    ///
    /// A non-finite value in a float mask.
    ///
    /// ```
    /// use cppo::Batch;
    /// use cppo::ndarray::{array, Array2};
    /// let z = Array2::<f32>::zeros((3, 4));
    /// let mask = array![[1u8, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]];
    /// let adv = array![1.0f32, 0.0, -1.0];
    /// let c = Batch::new(&z, &z, &adv, &mask).unwrap().counts().unwrap();
    /// assert_eq!((c.tokens, c.seqs), (5, 2));
    /// ```
    pub fn counts(&self) -> Result<Counts> {
        (0..self.shape().0).try_fold(Counts::default(), |c, i| {
            let t = self.mask.row_len(i)? as u64;
            Ok(c.merge(Counts {
                tokens: t,
                seqs: u64::from(t > 0),
            }))
        })
    }

    /// Runs every value check on its own and reports the first bad value in row-major
    /// order (within a token: mask, logp, logp_old, advantages, the top-K pair, logp_ref,
    /// is_weights). [`evaluate`](crate::evaluate) runs the same checks
    /// inside its pass; call this to check a batch without computing anything.
    ///
    /// ```
    /// use cppo::{Batch, Error};
    /// use cppo::ndarray::array;
    /// let logp = array![[-0.1f32, f32::NAN, f32::NAN]];
    /// let (adv, mask) = (array![1.0f32], array![[true, true, false]]);
    /// let err = Batch::new(&logp, &logp, &adv, &mask)?.validate().unwrap_err();
    /// // The NaN in padding (column 2) is not read; the one at column 1 is.
    /// assert!(matches!(err, Error::NonFinite { array: "logp", at, .. } if at.col == 1));
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        let (b, l) = self.shape();
        for i in 0..b {
            for j in 0..l {
                if self.mask.at(i, j)? {
                    self.read_logp(i, j)?;
                    self.read_logp_old(i, j)?;
                    self.read_adv(i, j)?;
                    if let Some(topk) = &self.topk {
                        for k in 0..topk.logp_old.dim().2 {
                            read_logprob(
                                topk.logp_old[[i, j, k]],
                                "topk_logp_old",
                                At::with_k(i, j, k),
                            )?;
                            read_logprob(topk.logp[[i, j, k]], "topk_logp", At::with_k(i, j, k))?;
                        }
                    }
                    if let Some(r) = &self.logp_ref {
                        read_logprob(r[[i, j]], "logp_ref", At::new(i, j))?;
                    }
                    if let Some(w) = &self.is_weights {
                        read_weight(w[[i, j]], "is_weights", At::new(i, j))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Row `i`'s one advantage, when advantages are given per row.
    pub(crate) fn row_advantage(&self, i: usize) -> Option<f64> {
        match &self.advantages {
            Advantages::PerRow(a) => Some(a[i].to_f64()),
            Advantages::PerToken(_) => None,
        }
    }

    #[inline(always)]
    pub(crate) fn read_logp(&self, i: usize, j: usize) -> Result<f64> {
        read_logprob(self.logp[[i, j]], "logp", At::new(i, j))
    }

    #[inline(always)]
    pub(crate) fn read_logp_old(&self, i: usize, j: usize) -> Result<f64> {
        read_logprob(self.logp_old[[i, j]], "logp_old", At::new(i, j))
    }

    #[inline(always)]
    pub(crate) fn read_adv(&self, i: usize, j: usize) -> Result<f64> {
        let a = match &self.advantages {
            Advantages::PerToken(a) => a[[i, j]],
            Advantages::PerRow(a) => a[i],
        }
        .to_f64();
        check_adv(a, At::new(i, j)).map(|()| a)
    }
}

/// An advantage read at a response position: finite and within ±[`MAX_ABS_ADVANTAGE`] (see [`crate::limits`]).
#[inline(always)]
pub(crate) fn check_adv(a: f64, at: At) -> Result<()> {
    if !a.is_finite() {
        Err(Error::NonFinite {
            array: "advantages",
            at,
            value: a,
        })
    } else if a.abs() > MAX_ABS_ADVANTAGE {
        Err(Error::OutOfRange {
            array: "advantages",
            at,
            value: a,
            limit: MAX_ABS_ADVANTAGE.copysign(a),
        })
    } else {
        Ok(())
    }
}

/// A weight read at a response position: in [0, 1e6] (see [`crate::limits`]).
#[inline(always)]
pub(crate) fn read_weight<F: Float>(x: F, array: &'static str, at: At) -> Result<f64> {
    let x = x.to_f64();
    if !x.is_finite() {
        Err(Error::NonFinite {
            array,
            at,
            value: x,
        })
    } else if x < 0.0 {
        Err(Error::Negative {
            array,
            at,
            value: x,
        })
    } else if x > MAX_IS_WEIGHT {
        Err(Error::OutOfRange {
            array,
            at,
            value: x,
            limit: MAX_IS_WEIGHT,
        })
    } else {
        Ok(x)
    }
}

/// A log-prob read at a response position: finite, in [−1e4, 1e-4], and (0, 1e-4] read
/// as 0 (see [`crate::limits`]).
#[inline(always)]
pub(crate) fn read_logprob<F: Float>(x: F, array: &'static str, at: At) -> Result<f64> {
    let x = x.to_f64();
    if !x.is_finite() {
        Err(Error::NonFinite {
            array,
            at,
            value: x,
        })
    } else if x < MIN_LOGPROB {
        Err(Error::OutOfRange {
            array,
            at,
            value: x,
            limit: MIN_LOGPROB,
        })
    } else if x <= 0.0 {
        Ok(x)
    } else if x <= LOGP_TOLERANCE {
        Ok(0.0)
    } else {
        Err(Error::PositiveLogProb {
            array,
            at,
            value: x,
        })
    }
}
