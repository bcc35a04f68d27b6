//! Position weights w_t: how a token's place in its response scales its divergence.
//!
//! Early tokens get the largest weight: a deviation there conditions every later token,
//! so CPPO holds it to the strictest threshold δ / w_t. Two conventions count the
//! position t and the horizon H ([`Positions`]):
//!
//! - **`response`** (the default; the paper's and UniRL's): t = 1..T counts the row's
//!   response tokens only, T being their number; holes in the mask (tool outputs) do
//!   not advance t. H = T, or a fixed `horizon`. The weight is
//!   w_t = 1 − (1 − w_min)(t − 1)/(H − 1), floored at w_min when the horizon is fixed
//!   (t may then pass it), and w_t = 1 when H ≤ 1.
//! - **`column`** (verl PR #6731's): t = column index + 1 in the whole padded row (a
//!   column chunk's offset included), H = the fixed `horizon`, else the batch's padded
//!   width L. Holes and padding advance t. The weight is verl's formula,
//!   w_t = w_min + (1 − w_min) · clamp((H − t)/max(H − 1, 1), 0, 1). For H = 1 that is
//!   w_min, not 1: the formula is reproduced as verl writes it.
//!
//! The two formulas are equal in exact arithmetic on 1 ≤ t ≤ H; each is computed the way
//! its source writes it, so the bits match that source's order of operations.
//!
//! Rules without position weights use [`Schedule::Constant`], w_t = 1.
//!
//! ```
//! use cppo::schedule::{Positions, Schedule, TokenPos};
//! let s = Schedule::Linear { w_min: 0.8, horizon: None, positions: Positions::Response };
//! // A row of five response tokens in a batch of width 8.
//! let w: Vec<f64> = (1..=5)
//!     .map(|t| s.weight(TokenPos { t, column: t - 1, row_len: 5, width: 8 }))
//!     .collect();
//! for (got, want) in w.iter().zip([1.0, 0.95, 0.9, 0.85, 0.8]) {
//!     assert!((got - want).abs() < 1e-15);
//! }
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How positions t and the horizon H are counted (see the [module docs](self)).
///
/// ```
/// use cppo::schedule::{Positions, Schedule, TokenPos};
/// assert_eq!(Positions::default(), Positions::Response);
/// // The last of three response tokens, in column 5 of 11 (after a hole).
/// let at = TokenPos { t: 3, column: 5, row_len: 3, width: 11 };
/// let w = |positions| Schedule::Linear { w_min: 0.8, horizon: None, positions }.weight(at);
/// assert!((w(Positions::Response) - 0.8).abs() < 1e-15); // t = T
/// assert!((w(Positions::Column) - 0.9).abs() < 1e-15); // t = 6 of L = 11
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// t counts the row's response tokens; H = T, the row's response length (the
    /// paper's Eq. 9 and UniRL's convention).
    #[default]
    Response,
    /// t = column + 1; H = the padded width L (verl PR #6731's convention).
    Column,
}

impl Positions {
    /// The name used in configs (`"response"`, `"column"`).
    ///
    /// ```
    /// assert_eq!(cppo::schedule::Positions::Column.name(), "column");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Column => "column",
        }
    }
}

/// Where a token sits: what either convention needs to place it.
///
/// ```
/// use cppo::schedule::{Positions, Schedule, TokenPos};
/// let s = Schedule::Linear { w_min: 0.5, horizon: None, positions: Positions::Response };
/// // The second of three response tokens: halfway from 1 down to w_min.
/// let at = TokenPos { t: 2, column: 4, row_len: 3, width: 8 };
/// assert!((s.weight(at) - 0.75).abs() < 1e-15);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenPos {
    /// Its index among the row's response tokens, from 1.
    pub t: usize,
    /// Its column in the whole padded row, from 0.
    pub column: usize,
    /// T: the row's response tokens.
    pub row_len: usize,
    /// L: the padded width of the whole rows.
    pub width: usize,
}

/// A position-weight schedule.
///
/// ```
/// use cppo::schedule::{Positions, Schedule, TokenPos};
/// let last = TokenPos { t: 4, column: 3, row_len: 4, width: 4 };
/// assert_eq!(Schedule::Constant.weight(last), 1.0);
/// let linear = Schedule::Linear { w_min: 0.8, horizon: None, positions: Positions::Response };
/// assert!((linear.weight(last) - 0.8).abs() < 1e-15);
/// assert_eq!(cppo::CppoParams::default().schedule(), linear);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// w_t = 1 for every t.
    Constant,
    /// Linear decay from 1 at t = 1 to `w_min` at t = H.
    Linear {
        /// The last position's weight, in (0, 1].
        w_min: f64,
        /// A fixed horizon H ≥ 1, or `None` for the convention's default (T or L).
        horizon: Option<usize>,
        /// How t and H are counted.
        positions: Positions,
    },
}

impl Schedule {
    /// Checks `w_min` ∈ (0, 1] and `horizon` ≥ 1.
    ///
    /// ```
    /// use cppo::schedule::{Positions, Schedule};
    /// let s = |w_min, horizon| Schedule::Linear { w_min, horizon, positions: Positions::Response };
    /// assert!(s(0.0, None).validate().is_err());
    /// assert!(s(1.0, Some(0)).validate().is_err());
    /// assert!(s(1.0, Some(1)).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let Self::Linear { w_min, horizon, .. } = *self {
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

    /// The weight w_t of the token at `at`.
    ///
    /// ```
    /// use cppo::schedule::{Positions, Schedule, TokenPos};
    /// let fixed = Schedule::Linear { w_min: 0.6, horizon: Some(3), positions: Positions::Response };
    /// let at = |t| TokenPos { t, column: t - 1, row_len: 100, width: 100 };
    /// assert_eq!(fixed.weight(at(1)), 1.0);
    /// assert!((fixed.weight(at(2)) - 0.8).abs() < 1e-15);
    /// assert_eq!(fixed.weight(at(50)), 0.6); // past the horizon: w_min
    /// assert_eq!(Schedule::Constant.weight(at(7)), 1.0);
    ///
    /// // verl's convention: the column counts, holes included.
    /// let verl = Schedule::Linear { w_min: 0.8, horizon: None, positions: Positions::Column };
    /// let last = TokenPos { t: 3, column: 9, row_len: 3, width: 10 };
    /// assert!((verl.weight(last) - 0.8).abs() < 1e-15);
    /// ```
    pub fn weight(&self, at: TokenPos) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::Linear {
                w_min,
                horizon,
                positions: Positions::Response,
            } => response_weight(
                w_min,
                at.t,
                horizon.unwrap_or(at.row_len),
                horizon.is_some(),
            ),
            Self::Linear {
                w_min,
                horizon,
                positions: Positions::Column,
            } => column_weight(w_min, at.column + 1, horizon.unwrap_or(at.width)),
        }
    }
}

/// The `response` convention's weight of position t under horizon H:
/// 1 − (1 − w_min)(t − 1)/(H − 1), floored at w_min when the horizon is `fixed`, 1 when
/// H ≤ 1.
///
/// ```
/// use cppo::schedule::response_weight;
/// assert_eq!(response_weight(0.8, 1, 5, false), 1.0);
/// assert_eq!(response_weight(0.8, 9, 5, true), 0.8);
/// assert_eq!(response_weight(0.8, 1, 1, false), 1.0);
/// ```
#[inline(always)]
pub fn response_weight(w_min: f64, t: usize, h: usize, fixed: bool) -> f64 {
    if h <= 1 {
        return 1.0;
    }
    let w = 1.0 - (1.0 - w_min) * t.saturating_sub(1) as f64 / (h - 1) as f64;
    if fixed && w < w_min { w_min } else { w }
}

/// The `column` convention's weight of position t under horizon H, as verl PR #6731
/// writes it: w_min + (1 − w_min) · clamp((H − t)/max(H − 1, 1), 0, 1).
///
/// ```
/// use cppo::schedule::column_weight;
/// assert_eq!(column_weight(0.8, 1, 5), 1.0);
/// assert!((column_weight(0.8, 5, 5) - 0.8).abs() < 1e-15);
/// assert_eq!(column_weight(0.8, 1, 1), 0.8); // verl's formula at H = 1
/// ```
#[inline(always)]
pub fn column_weight(w_min: f64, t: usize, h: usize) -> f64 {
    let (h, t) = (h as f64, t as f64);
    let frac = ((h - t) / (h - 1.0).max(1.0)).clamp(0.0, 1.0);
    w_min + (1.0 - w_min) * frac
}

/// The position π(t) whose weight token t takes under `shuffle_seed`: π is a permutation
/// of 1..=n drawn from the seed and n alone (n = T under `response` positions, L under
/// `column`), evaluated per token without memory, so a row's weights are the same
/// whichever shard or chunk holds it. Positions outside 1..=n are returned unchanged.
///
/// The permutation is a keyed 4-round Feistel network on the smallest even number of
/// bits that covers n, with cycle walking (applied again until the value lands in
/// range: a bijection of the larger domain restricted this way is a bijection of 1..=n).
///
/// ```
/// use cppo::schedule::shuffled_position;
/// let mut seen: Vec<usize> = (1..=10).map(|t| shuffled_position(7, t, 10)).collect();
/// seen.sort();
/// assert_eq!(seen, (1..=10).collect::<Vec<_>>()); // a permutation
/// assert_eq!(shuffled_position(7, 1, 1), 1);
/// ```
pub fn shuffled_position(seed: u64, t: usize, n: usize) -> usize {
    if t == 0 || t > n || n <= 1 {
        return t;
    }
    let key = seed ^ splitmix64(n as u64);
    permute(t as u64 - 1, n as u64, key) as usize + 1
}

/// SplitMix64's output function: a fast, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The keyed permutation of 0..n at `x < n` (see [`shuffled_position`]).
fn permute(mut x: u64, n: u64, key: u64) -> u64 {
    let bits = 64 - (n - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = splitmix64(r ^ key.rotate_left(16 * round as u32) ^ round) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}
