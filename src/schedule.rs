//! Position weights w_t (SPEC section 3).
//!
//! Within a row, positions count response tokens only: t = 1..T, where T is the row's
//! number of response tokens. Holes in the mask (tool outputs, say) do not advance t.
//!
//! - `Linear` (the paper's schedule): w_t = 1 − (1 − w_min)(t − 1)/(H − 1), where H = T
//!   (the row's own length) by default, or a fixed `horizon` H, in which case
//!   w_t = max(w_min, that). w_t = 1 when H ≤ 1.
//! - `Constant`: w_t = 1.
//!
//! Early tokens get the largest weight: a deviation there conditions every later token,
//! so CPPO holds it to the strictest threshold δ / w_t.
//!
//! ```
//! use cppo::schedule::Schedule;
//! let s = Schedule::Linear { w_min: 0.8, horizon: None };
//! let w: Vec<f64> = (1..=5).map(|t| s.weight(t, 5)).collect();
//! for (got, want) in w.iter().zip([1.0, 0.95, 0.9, 0.85, 0.8]) {
//!     assert!((got - want).abs() < 1e-15);
//! }
//! ```

use crate::error::{Error, Result};

/// A position-weight schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// w_t = 1 for every t.
    Constant,
    /// Linear decay from 1 at t = 1 to `w_min` at t = H.
    Linear {
        /// The last position's weight, in (0, 1].
        w_min: f64,
        /// A fixed horizon H ≥ 1, or `None` for each row's own length T.
        horizon: Option<usize>,
    },
}

impl Schedule {
    /// Checks `w_min` ∈ (0, 1] and `horizon` ≥ 1.
    ///
    /// ```
    /// use cppo::schedule::Schedule;
    /// assert!(Schedule::Linear { w_min: 0.0, horizon: None }.validate().is_err());
    /// assert!(Schedule::Linear { w_min: 1.0, horizon: Some(1) }.validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let Self::Linear { w_min, horizon } = *self {
            if !(w_min > 0.0 && w_min <= 1.0) {
                return Err(Error::InvalidConfig {
                    field: "rule.w_min",
                    reason: format!("must be in (0, 1], got {w_min}"),
                });
            }
            if horizon == Some(0) {
                return Err(Error::InvalidConfig {
                    field: "rule.horizon",
                    reason: "must be at least 1, got 0".into(),
                });
            }
        }
        Ok(())
    }

    /// The horizon H for a row with `row_len` = T response tokens.
    #[inline]
    pub fn horizon_for(&self, row_len: usize) -> usize {
        match *self {
            Self::Constant => row_len,
            Self::Linear { horizon, .. } => horizon.unwrap_or(row_len),
        }
    }

    /// The weight w_t of the t-th response token (t from 1) in a row of T = `row_len`
    /// response tokens.
    ///
    /// ```
    /// use cppo::schedule::Schedule;
    /// let fixed = Schedule::Linear { w_min: 0.6, horizon: Some(3) };
    /// assert_eq!(fixed.weight(1, 100), 1.0);
    /// assert!((fixed.weight(2, 100) - 0.8).abs() < 1e-15);
    /// assert_eq!(fixed.weight(50, 100), 0.6); // past the horizon: w_min
    /// assert_eq!(Schedule::Constant.weight(7, 9), 1.0);
    /// ```
    #[inline]
    pub fn weight(&self, t: usize, row_len: usize) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::Linear { w_min, horizon } => {
                let h = horizon.unwrap_or(row_len);
                linear_weight(w_min, t, h, horizon.is_some())
            }
        }
    }
}

/// w_t = 1 − (1 − w_min)(t − 1)/(H − 1), floored at w_min when the horizon is fixed.
#[inline(always)]
pub(crate) fn linear_weight(w_min: f64, t: usize, h: usize, fixed: bool) -> f64 {
    if h <= 1 {
        return 1.0;
    }
    let w = 1.0 - (1.0 - w_min) * (t - 1) as f64 / (h - 1) as f64;
    if fixed { w.max(w_min) } else { w }
}
