//! What passes between the chunks of a row: the [`Carry`] from one chunk to the next,
//! the mergeable [`RowPartial`] of a chunk, and the [`WholeRow`] every chunk reads.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernel::Prefix;
use crate::kernel::row_stats::RowStats;
use crate::limits::MAX_CARRY_SUM;
use crate::objective::LOG_RATIO_CLAMP;

/// A row's state between column chunks. Start every row from `Carry::default()`; only
/// [`evaluate_chunk_into`](super::evaluate_chunk_into) advances it.
///
/// ```
/// use cppo::chunk::{evaluate_chunk_into, row_partials, whole_rows, Carry, ChunkPos};
/// use cppo::{ndarray::array, Batch, Config, Outputs, Par};
/// let (lp, adv, mask) = (array![[-0.5, -0.7, -0.1]], array![1.0], array![[true, false, true]]);
/// let (cfg, b) = (Config::dppo(), Batch::new(&lp, &lp, &adv, &mask)?);
/// let pos = ChunkPos { col0: 0, width: 3 };
/// let rows = whole_rows(&cfg, &row_partials(&cfg, &b, pos, Par::Seq)?, None)?;
/// let mut carries = [Carry::default()];
/// let mut out = Outputs::<f64>::zeros((1, 3));
/// evaluate_chunk_into(&cfg, &b, pos, &rows, &mut carries, out.view_mut(), Par::Seq)?;
/// assert_eq!((carries[0].col(), carries[0].tokens()), (3, 2));
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "CarryWire", into = "CarryWire")]
pub struct Carry {
    pub(super) col: usize,
    pub(super) prefix: Prefix,
}

/// The wire form of a [`Carry`]: the same fields, checked on the way in.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename = "Carry", deny_unknown_fields)]
struct CarryWire {
    pub(super) col: usize,
    t: usize,
    s: f64,
    w: f64,
    min_ratio: f64,
}

impl From<Carry> for CarryWire {
    fn from(c: Carry) -> Self {
        Self {
            col: c.col,
            t: c.prefix.t,
            s: c.prefix.s,
            w: c.prefix.w,
            min_ratio: c.prefix.min_ratio,
        }
    }
}

impl TryFrom<CarryWire> for Carry {
    type Error = String;
    fn try_from(c: CarryWire) -> std::result::Result<Self, String> {
        if c.t > c.col {
            return Err(format!(
                "a carry at column {} cannot have seen {} response tokens",
                c.col, c.t
            ));
        }
        let sum_ok = |x: f64| (0.0..=MAX_CARRY_SUM).contains(&x);
        if !(sum_ok(c.s) && sum_ok(c.w)) {
            return Err(format!(
                "a carry's prefix sums must be in [0, {MAX_CARRY_SUM:e}], got S = {} and W = {}",
                c.s, c.w
            ));
        }
        // The largest ratio: e^20, and the rounding of ρ = p/q (crate::limits).
        let max_ratio = LOG_RATIO_CLAMP.exp() * (1.0 + 1e-12);
        if !(c.min_ratio == f64::INFINITY || (c.min_ratio > 0.0 && c.min_ratio <= max_ratio)) {
            return Err(format!(
                "a carry's minimum ratio must be in (0, e^20] (or inf), got {}",
                c.min_ratio
            ));
        }
        Ok(Self {
            col: c.col,
            prefix: Prefix {
                t: c.t,
                s: c.s,
                w: c.w,
                min_ratio: c.min_ratio,
            },
        })
    }
}

impl Carry {
    /// The column the next chunk of the row must start at.
    ///
    /// ```
    /// assert_eq!(cppo::chunk::Carry::default().col(), 0);
    /// ```
    pub fn col(&self) -> usize {
        self.col
    }

    /// The response tokens seen so far.
    ///
    /// ```
    /// assert_eq!(cppo::chunk::Carry::default().tokens(), 0);
    /// ```
    pub fn tokens(&self) -> usize {
        self.prefix.t
    }

    /// Checks, after the last chunk, that row `row`'s chunks covered its `width` columns
    /// and all of its response tokens.
    ///
    /// # Errors
    ///
    /// [`Error::ChunkMismatch`] when they did not.
    ///
    /// ```
    /// use cppo::chunk::{whole_rows, Carry, RowPartial};
    /// let rows = whole_rows(&cppo::Config::dppo(), &[RowPartial::default()], None).unwrap();
    /// assert!(Carry::default().finish(0, &rows[0], 0).is_ok());
    /// assert!(Carry::default().finish(0, &rows[0], 8).is_err()); // 8 columns not covered
    /// ```
    pub fn finish(&self, row: usize, whole: &WholeRow, width: usize) -> Result<()> {
        if self.col != width {
            return Err(Error::ChunkMismatch {
                row,
                reason: format!("the chunks covered {} of its {width} columns", self.col),
            });
        }
        if self.prefix.t as u64 != whole.tokens {
            return Err(Error::ChunkMismatch {
                row,
                reason: format!(
                    "the chunks held {} response tokens, its partials {}",
                    self.prefix.t, whole.tokens
                ),
            });
        }
        Ok(())
    }
}

/// Where a chunk's columns sit in the whole rows.
///
/// ```
/// use cppo::chunk::{row_partials, ChunkPos};
/// use cppo::{ndarray::array, Batch, Config, Par};
/// let (lp, adv, mask) = (array![[-0.5, -0.7]], array![1.0], array![[true, true]]);
/// // Columns 4 and 5 of rows 8 columns wide.
/// let pos = ChunkPos { col0: 4, width: 8 };
/// let p = row_partials(&Config::cppo(), &Batch::new(&lp, &lp, &adv, &mask)?, pos, Par::Seq)?;
/// assert_eq!(p[0].tokens(), 2);
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkPos {
    /// The whole-row column of the chunk's first column.
    pub col0: usize,
    /// The whole rows' padded width L (the default `norm_length`, the `column`
    /// positions' horizon, and the bound the chunks must not pass).
    pub width: usize,
}

/// A mergeable summary of a row's chunk: its response tokens and the exact sums that
/// whole-row rules and objectives need (zero where the config needs none). Merging is
/// exact and associative, so a chunked row gets exactly the whole row's decision (TRM)
/// and sequence ratio (GSPO, GMPO).
///
/// ```
/// use cppo::chunk::{row_partials, ChunkPos};
/// use cppo::{ndarray::{array, s}, Batch, Config, Par};
/// let (lp, lq) = (array![[-0.5, -0.7, -0.2, -0.1]], array![[-0.4, -0.9, -0.2, -0.3]]);
/// let (adv, mask) = (array![1.0], array![[true, true, false, true]]);
/// let cfg = Config::with_rule(cppo::Rule::TrmAvg { delta: 0.15 });
/// let part = |c0: usize, c1: usize| {
///     let cols = s![.., c0..c1];
///     let (lp, lq, m) = (lp.slice(cols), lq.slice(cols), mask.slice(cols));
///     let pos = ChunkPos { col0: c0, width: 4 };
///     row_partials(&cfg, &Batch::new(&lp, &lq, &adv, &m)?, pos, Par::Seq)
/// };
/// let halves = part(0, 2)?[0].merge(&part(2, 4)?[0]);
/// assert_eq!(halves, part(0, 4)?[0]); // exact
/// assert_eq!(halves.tokens(), 3);
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PartialWire", into = "PartialWire")]
pub struct RowPartial {
    pub(super) tokens: u64,
    pub(super) stats: RowStats,
}

/// The wire form of a [`RowPartial`], checked on the way in.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename = "RowPartial", deny_unknown_fields)]
struct PartialWire {
    pub(super) tokens: u64,
    pub(super) stats: RowStats,
}

impl From<RowPartial> for PartialWire {
    fn from(p: RowPartial) -> Self {
        Self {
            tokens: p.tokens,
            stats: p.stats,
        }
    }
}

impl TryFrom<PartialWire> for RowPartial {
    type Error = String;
    fn try_from(p: PartialWire) -> std::result::Result<Self, String> {
        let d_max = p.stats.d_max;
        if !(d_max >= 0.0 && d_max.is_finite()) {
            return Err(format!(
                "a partial's max divergence must be finite and >= 0, got {d_max}"
            ));
        }
        if p.stats.d_sum.is_negative() {
            return Err("a partial's divergence sum must be >= 0".into());
        }
        Ok(Self {
            tokens: p.tokens,
            stats: p.stats,
        })
    }
}

impl RowPartial {
    /// The response tokens it counts.
    ///
    /// ```
    /// assert_eq!(cppo::chunk::RowPartial::default().tokens(), 0);
    /// ```
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The partial of two pieces of a row (`other` after `self`; the order does not
    /// change the result).
    ///
    /// ```
    /// use cppo::chunk::RowPartial;
    /// let a = RowPartial::default();
    /// assert_eq!(a.merge(&a), a);
    /// ```
    #[must_use]
    pub fn merge(&self, other: &Self) -> Self {
        Self {
            tokens: self.tokens + other.tokens,
            stats: self.stats.merge(&other.stats),
        }
    }
}

/// What a chunk needs to know about its whole row: built by [`whole_rows`](super::whole_rows) from the
/// row's merged partials (and, for a calibrated budget, its gathered divergences).
///
/// ```
/// use cppo::chunk::{row_partials, whole_rows, ChunkPos};
/// use cppo::{ndarray::array, Batch, Config, Par};
/// let (lp, adv, mask) = (array![[-0.5, -0.7, -0.2]], array![1.0], array![[true, false, true]]);
/// let (cfg, b) = (Config::dppo(), Batch::new(&lp, &lp, &adv, &mask)?);
/// let partials = row_partials(&cfg, &b, ChunkPos { col0: 0, width: 3 }, Par::Seq)?;
/// let rows = whole_rows(&cfg, &partials, None)?;
/// assert_eq!((rows[0].tokens(), rows[0].delta_b_row()), (2, None)); // dppo: no budget
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WholeRow {
    pub(super) tokens: u64,
    pub(super) stats: RowStats,
    pub(super) delta_b: Option<f64>,
}

impl WholeRow {
    /// T: the row's response tokens.
    ///
    /// ```
    /// use cppo::chunk::{whole_rows, RowPartial};
    /// let rows = whole_rows(&cppo::Config::dppo(), &[RowPartial::default()], None).unwrap();
    /// assert_eq!(rows[0].tokens(), 0);
    /// ```
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// δ_b^row, or `None` where the rule has no budget.
    ///
    /// ```
    /// use cppo::chunk::{whole_rows, RowPartial};
    /// use cppo::ndarray::Array2;
    /// let none = Array2::from_elem((1, 4), f64::NAN); // a row without response tokens
    /// let rows = whole_rows(&cppo::Config::cppo(), &[RowPartial::default()], Some(none.view()))?;
    /// assert_eq!(rows[0].delta_b_row(), Some(0.02)); // an empty row: the floor δ_b
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub fn delta_b_row(&self) -> Option<f64> {
        self.delta_b
    }
}
