//! The crate's one error type.
//!
//! Every fallible function returns [`Result<T>`](Result), whose error is [`Error`]. Its
//! variants carry structured fields, so a caller can both print a one-line message that
//! names the array, row and column, and match on what went wrong.
//!
//! ```
//! use cppo::{Batch, Error};
//! use cppo::ndarray::array;
//!
//! let logp = array![[-0.1, 0.5]]; // 0.5 is not a log-probability
//! let logp_old = array![[-0.2, -0.3]];
//! let adv = array![1.0];
//! let mask = array![[true, true]];
//! let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
//! let err = batch.validate().unwrap_err();
//! assert!(matches!(err, Error::PositiveLogProb { array: "logp", at, .. } if at.row == 0 && at.col == 1));
//! assert_eq!(err.to_string(), "logp at row 0, column 1 is 0.5, above the 1e-4 tolerance for a log-probability");
//! ```

use std::fmt;

/// Shorthand for `std::result::Result<T, cppo::Error>`.
///
/// ```
/// use cppo::ndarray::array;
/// fn tokens(logp: &cppo::ndarray::Array2<f64>) -> cppo::Result<u64> {
///     let (adv, mask) = (array![1.0], array![[true, false]]);
///     Ok(cppo::Batch::new(logp, logp, &adv, &mask)?.counts()?.tokens)
/// }
/// assert_eq!(tokens(&array![[-0.1, -0.2]]), Ok(1));
/// assert!(tokens(&array![[-0.1, -0.2, -0.3]]).is_err()); // shape (1, 3)
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where in a (B, L) or (B, L, K) array a bad value sits.
///
/// ```
/// use cppo::At;
/// let at = At::new(2, 5);
/// assert_eq!((at.row, at.col, at.k), (2, 5, None));
/// assert_eq!(at.to_string(), "row 2, column 5");
/// assert_eq!(At::with_k(0, 1, 3).to_string(), "row 0, column 1, k 3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct At {
    /// Row (sequence) index, from 0.
    pub row: usize,
    /// Column (token slot) index, from 0.
    pub col: usize,
    /// Index along the top-K axis, for the (B, L, K) arrays only.
    pub k: Option<usize>,
}

impl At {
    /// A position in a (B, L) array.
    ///
    /// ```
    /// let at = cppo::At::new(1, 4);
    /// assert_eq!((at.row, at.col, at.k), (1, 4, None));
    /// ```
    pub const fn new(row: usize, col: usize) -> Self {
        Self { row, col, k: None }
    }

    /// A position in a (B, L, K) array.
    ///
    /// ```
    /// let at = cppo::At::with_k(1, 4, 2);
    /// assert_eq!((at.row, at.col, at.k), (1, 4, Some(2)));
    /// ```
    pub const fn with_k(row: usize, col: usize, k: usize) -> Self {
        Self {
            row,
            col,
            k: Some(k),
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "row {}, column {}", self.row, self.col)?;
        if let Some(k) = self.k {
            write!(f, ", k {k}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in this crate.
///
/// Bad input is always reported through this enum, never through a panic or a NaN in
/// the outputs. The enum is `#[non_exhaustive]`: later versions may add variants.
///
/// ```
/// use cppo::{evaluate, Batch, Config, Divergence, Error, Par};
/// use cppo::ndarray::array;
/// let (lp, adv, mask) = (array![[-0.5f32]], array![1.0f32], array![[true]]);
/// let cfg = Config { divergence: Divergence::TopkTv, ..Config::cppo() };
/// let err = evaluate(&cfg, &Batch::new(&lp, &lp, &adv, &mask)?, Par::Seq).unwrap_err();
/// assert!(matches!(err, Error::MissingArray { array: "topk_logp_old", .. }));
/// assert_eq!(err.to_string(), "topk_logp_old is missing; it is required by divergence topk_tv");
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An array does not have the shape the batch requires.
    #[error("{array} has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// The array's name (`logp`, `mask`, `topk_logp`, ...).
        array: &'static str,
        /// What the shape should have been, in words (for example `(4, 16)` or `(4,) or (4, 16)`).
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// An array the configuration needs was not given.
    #[error("{array} is missing; it is required by {needed_by}")]
    MissingArray {
        /// The missing array's name.
        array: &'static str,
        /// What needs it, for example `divergence topk_tv`.
        needed_by: &'static str,
    },
    /// A NaN or infinite value at a response position (or anywhere in a float mask).
    #[error("{array} at {at} is {value}, not a finite number")]
    NonFinite {
        /// The array's name.
        array: &'static str,
        /// Where the value is.
        at: At,
        /// The offending value, widened to `f64`.
        value: f64,
    },
    /// A negative value where weights must be ≥ 0 (`is_weights`).
    #[error("{array} at {at} is {value}, below 0; weights must be >= 0")]
    Negative {
        /// The array's name.
        array: &'static str,
        /// Where the value is.
        at: At,
        /// The offending value, widened to `f64`.
        value: f64,
    },
    /// A finite value beyond the range the crate accepts for its array (see
    /// [`crate::limits`]): an advantage with |A| > [`MAX_ABS_ADVANTAGE`](crate::limits::MAX_ABS_ADVANTAGE),
    /// a log-prob below [`MIN_LOGPROB`](crate::limits::MIN_LOGPROB), an IS weight above
    /// [`MAX_IS_WEIGHT`](crate::limits::MAX_IS_WEIGHT).
    #[error("{array} at {at} is {value:e}, beyond the accepted bound {limit:e}")]
    OutOfRange {
        /// The array's name.
        array: &'static str,
        /// Where the value is.
        at: At,
        /// The offending value, widened to `f64`.
        value: f64,
        /// The bound the value passed, signed: ±1e9 for an advantage, −1e4 for a
        /// log-prob, 1e6 for an IS weight.
        limit: f64,
    },
    /// A log-probability above the 1e-4 tolerance.
    #[error("{array} at {at} is {value}, above the 1e-4 tolerance for a log-probability")]
    PositiveLogProb {
        /// The array's name.
        array: &'static str,
        /// Where the value is.
        at: At,
        /// The offending value, widened to `f64`.
        value: f64,
    },
    /// A configuration value outside its valid range.
    #[error("config field {field}: {reason}")]
    InvalidConfig {
        /// The field's path in the JSON config, for example `rule.delta`.
        field: &'static str,
        /// What is wrong with it, including the value given.
        reason: String,
    },
    /// A column chunk arrived out of order for a row.
    #[error(
        "chunk for row {row} starts at column {got}, but the row's carry is at column {expected}"
    )]
    ChunkOutOfOrder {
        /// The row.
        row: usize,
        /// Where the row's carry says the next chunk starts.
        expected: usize,
        /// Where the chunk starts.
        got: usize,
    },
    /// A row's column chunks do not add up to the row.
    #[error("row {row}: {reason}")]
    ChunkMismatch {
        /// The row.
        row: usize,
        /// What does not add up.
        reason: String,
    },
    /// A global count override (`num_tokens`, `num_seqs`) is smaller than what this batch
    /// alone contains, so it cannot be the count of a batch this one is a part of.
    #[error("config field {field} = {given} is smaller than this batch's own count {local}")]
    CountTooSmall {
        /// `num_tokens` or `num_seqs`.
        field: &'static str,
        /// The override that was given.
        given: u64,
        /// The count in this batch.
        local: u64,
    },
    /// A config's text could not be read as a config: bad JSON, an unknown field or
    /// name (with a "did you mean" when one is close), or a value out of range. From
    /// [`Config::from_json`](crate::Config::from_json) (feature `json`).
    #[error("config{}: {message} (line {line}, column {column})", .path.as_deref().map(|p| format!(" {p}")).unwrap_or_default())]
    ConfigParse {
        /// The file the text came from, if it came from one.
        path: Option<String>,
        /// What is wrong, naming the field.
        message: String,
        /// 1-based line of the text where reading stopped.
        line: usize,
        /// 1-based column of the text where reading stopped.
        column: usize,
    },
    /// A file could not be read ([`Config::from_json_file`](crate::Config::from_json_file)).
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's message.
        message: String,
    },
}

// A compile-time check: errors can cross threads and be boxed into `anyhow`-style errors.
const _: () = {
    const fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Error>();
};
