//! The per-row prefix budget δ_b^row of CPPO, calibrated from the row's own divergences.
//!
//! CPPO's prefix test S_t ≤ δ + δ_b W_{t−1} lets a prefix drift, on average, δ_b per unit
//! of weight. A fixed δ_b is too tight for rows that drift more overall and too loose for
//! rows that barely drift. The paper (Eq. 22) calibrates it per row from the row's own
//! divergences, and both official implementations do so by default:
//!
//! δ_b^row = min(c · δ_b, max(δ_b, k · Q_q(D_1, …, D_T)))
//!
//! where the D_t are the divergences of the row's response tokens, Q_q is their
//! q-quantile, k a scale and c a ceiling. δ_b itself is the floor (the paper's δ_b^min).
//! A row without response tokens gets δ_b^row = δ_b.
//!
//! | source | q | k | c |
//! |---|---|---|---|
//! | the paper (Eq. 22), UniRL | 0.9 | 1 | 2 |
//! | verl PR #6731 | `cppo_delta_b_q` = 0.9 | `cppo_delta_b_k` = 1 | 5 (2 before commit 2741f27) |
//!
//! [`Calibration`] holds (q, k, c); `calibration: null` in a config means a fixed
//! budget, δ_b^row = δ_b. With k = 0 the calibrated budget is the fixed one.
//!
//! **The quantile** is the linear-interpolation one (type 7 of Hyndman and Fan), the
//! default of `numpy.quantile` and `torch.quantile`: with the n values sorted
//! x_(0) ≤ … ≤ x_(n−1), h = (n − 1) q, j = ⌊h⌋, g = h − j,
//! Q_q = x_(j) + g (x_(j+1) − x_(j)). It is computed exactly, by selection (linear
//! time, no sort), and with the two-sided interpolation numpy and torch use
//! (x_(j+1) − (x_(j+1) − x_(j))(1 − g) when g ≥ ½), so the bits are theirs.
//!
//! ```
//! use cppo::budget::{quantile, Calibration};
//! let mut d = [0.01, 0.05, 0.02, 0.30, 0.04];
//! // Sorted: 0.01 0.02 0.04 0.05 0.30; h = 4 · 0.9 = 3.6: 0.05 + 0.6 · 0.25.
//! assert!((quantile(&mut d, 0.9).unwrap() - 0.2).abs() < 1e-15);
//!
//! let paper = Calibration::default(); // q 0.9, k 1, c 2
//! let mut d = [0.01, 0.05, 0.02, 0.30, 0.04];
//! assert_eq!(paper.row_budget(0.02, &mut d), 0.04); // 0.2 clamped to the ceiling 2 δ_b
//! let mut calm = [0.001, 0.002];
//! assert_eq!(paper.row_budget(0.02, &mut calm), 0.02); // the floor δ_b
//! ```

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::limits::{check, check_at_least, check_nonnegative};

/// The paper's quantile q = 0.9 (P90).
///
/// ```
/// assert_eq!(cppo::Calibration::default().quantile, cppo::budget::DEFAULT_QUANTILE);
/// ```
pub const DEFAULT_QUANTILE: f64 = 0.9;
/// The paper's scale k = 1.
///
/// ```
/// assert_eq!(cppo::Calibration::default().scale, cppo::budget::DEFAULT_SCALE);
/// ```
pub const DEFAULT_SCALE: f64 = 1.0;
/// The paper's ceiling c = 2 (verl PR #6731 uses 5).
///
/// ```
/// assert_eq!(cppo::Calibration::default().ceiling, cppo::budget::DEFAULT_CEILING);
/// ```
pub const DEFAULT_CEILING: f64 = 2.0;

/// How δ_b^row is calibrated from a row's divergences (see the [module docs](self)).
/// Serialized as `{"quantile": q, "scale": k, "ceiling": c}`; omitted fields take the
/// paper's values, unknown fields are an error.
///
/// ```
/// use cppo::Calibration;
/// let median = Calibration { quantile: 0.5, ..Calibration::PAPER };
/// // Q_0.5 = 0.03, within [δ_b, 2 δ_b] = [0.02, 0.04].
/// assert_eq!(median.row_budget(0.02, &mut [0.01, 0.05, 0.03]), 0.03);
/// // P90 = 0.046, clamped to the ceiling 2 δ_b.
/// assert_eq!(Calibration::PAPER.row_budget(0.02, &mut [0.01, 0.05, 0.03]), 0.04);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// q ∈ (0, 1]: which quantile of the row's divergences. Default 0.9.
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// k ∈ [0, 1e6]: the scale applied to the quantile. Default 1.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// c ≥ 1: δ_b^row is at most c δ_b. Default 2.
    #[serde(default = "default_ceiling")]
    pub ceiling: f64,
}

fn default_quantile() -> f64 {
    DEFAULT_QUANTILE
}
fn default_scale() -> f64 {
    DEFAULT_SCALE
}
fn default_ceiling() -> f64 {
    DEFAULT_CEILING
}

impl Default for Calibration {
    /// [`Calibration::PAPER`].
    ///
    /// ```
    /// let c = cppo::budget::Calibration::default();
    /// assert_eq!((c.quantile, c.scale, c.ceiling), (0.9, 1.0, 2.0));
    /// ```
    fn default() -> Self {
        Self::PAPER
    }
}

impl Calibration {
    /// The paper's Eq. 22: P90, scale 1, ceiling 2.
    ///
    /// ```
    /// use cppo::Calibration;
    /// assert_eq!(Calibration::PAPER, Calibration::default());
    /// assert_eq!(Calibration::PAPER.ceiling, 2.0);
    /// ```
    pub const PAPER: Self = Self {
        quantile: DEFAULT_QUANTILE,
        scale: DEFAULT_SCALE,
        ceiling: DEFAULT_CEILING,
    };

    /// Checks q ∈ (0, 1], k ∈ [0, 1e6] and c ∈ [1, 1e6]. Errors name the config field
    /// (`rule.calibration.quantile`, ...).
    ///
    /// ```
    /// use cppo::budget::Calibration;
    /// let bad = Calibration { quantile: 0.0, ..Calibration::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("rule.calibration.quantile"));
    /// assert!(Calibration { ceiling: 0.5, ..Calibration::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check(
            self.quantile > 0.0 && self.quantile <= 1.0,
            "rule.calibration.quantile",
            "in (0, 1]",
            self.quantile,
        )?;
        check_nonnegative("rule.calibration.scale", self.scale)?;
        check_at_least("rule.calibration.ceiling", 1.0, self.ceiling)
    }

    /// δ_b^row = min(c δ_b, max(δ_b, k Q_q(D))) for the floor `delta_b` and the row's
    /// response-token `divergences` (reordered in place); δ_b for an empty row.
    ///
    /// ```
    /// use cppo::budget::Calibration;
    /// let verl = Calibration { ceiling: 5.0, ..Calibration::default() };
    /// assert_eq!(verl.row_budget(0.02, &mut []), 0.02);
    /// assert_eq!(verl.row_budget(0.02, &mut [0.5]), 0.1); // 5 δ_b
    /// let off = Calibration { scale: 0.0, ..Calibration::default() };
    /// assert_eq!(off.row_budget(0.02, &mut [0.5]), 0.02); // k = 0: the fixed budget
    /// ```
    pub fn row_budget(&self, delta_b: f64, divergences: &mut [f64]) -> f64 {
        match quantile(divergences, self.quantile) {
            None => delta_b,
            Some(q) => clamp_budget(self.scale * q, delta_b, self.ceiling * delta_b),
        }
    }
}

/// min(hi, max(lo, x)), as torch's `clamp(min=lo, max=hi)` and verl's code compute it.
#[inline]
fn clamp_budget(x: f64, lo: f64, hi: f64) -> f64 {
    let x = if x < lo { lo } else { x };
    if x > hi { hi } else { x }
}

/// The linear-interpolation (type 7) q-quantile of `values`, exactly, in linear time;
/// `None` for an empty slice. Reorders `values`. NaN values are not allowed (the
/// crate's divergences are finite).
///
/// ```
/// use cppo::budget::quantile;
/// assert_eq!(quantile(&mut [3.0, 1.0, 2.0], 0.5), Some(2.0));
/// assert_eq!(quantile(&mut [3.0, 1.0, 2.0], 1.0), Some(3.0));
/// assert_eq!(quantile(&mut [7.0], 0.9), Some(7.0));
/// assert_eq!(quantile(&mut [], 0.9), None);
/// // numpy.quantile([0, 1], 0.25) = 0.25
/// assert_eq!(quantile(&mut [1.0, 0.0], 0.25), Some(0.25));
/// ```
pub fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * q;
    // h ∈ [0, n − 1]: `as` truncates toward zero, which is ⌊h⌋ here.
    let j = (h as usize).min(n - 1);
    let g = h - j as f64;
    let (_, &mut lo, above) = values.select_nth_unstable_by(j, f64::total_cmp);
    let hi = above
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, x| match m {
            Some(m) if m.total_cmp(&x).is_le() => Some(m),
            _ => Some(x),
        });
    let Some(hi) = hi else { return Some(lo) };
    // numpy's `_lerp` and torch's `lerp`: from the nearer end.
    let diff = hi - lo;
    Some(if g >= 0.5 {
        hi - diff * (1.0 - g)
    } else {
        lo + diff * g
    })
}
