//! Aggregating per-token losses into one scalar, the way verl's `agg_loss` does.
//!
//! With m the response mask and l_t the per-token loss (objective term times keep, plus
//! any KL term); masked-out tokens still count in the denominators:
//!
//! | mode | loss |
//! |---|---|
//! | `token-mean` | Σ m l / N_tok, N_tok = Σ m |
//! | `seq-mean-token-mean` | (1/N_seq) Σ_rows (Σ_t m l / T_row), over rows with T_row > 0; N_seq = their count |
//! | `seq-mean-token-sum` | (1/N_seq) Σ m l |
//! | `seq-mean-token-sum-norm` | (1/N_seq) Σ m l / Z, Z = `norm_length`, default L (Dr. GRPO) |
//!
//! Each token's gradient is its g_t times its aggregation weight a_t, the factor in
//! front of its l_t above: 1/N_tok, 1/(N_seq T_row), 1/N_seq or 1/(N_seq Z).
//!
//! `num_tokens` and `num_seqs` override N_tok and N_seq with global counts. Set them to
//! the whole batch's counts and the losses and gradients of row shards (data-parallel
//! ranks, gradient-accumulation micro-batches) add up to the whole batch's. A count of
//! zero means there is nothing to average: the loss and the gradient are 0, never NaN.
//!
//! ```
//! use cppo::aggregate::{Aggregation, Counts};
//! let counts = Counts { tokens: 10, seqs: 4 };
//! assert_eq!(Aggregation::TokenMean.weight(counts, 3, 16, None), 0.1);
//! assert_eq!(Aggregation::SeqMeanTokenMean.weight(counts, 5, 16, None), 1.0 / 20.0);
//! assert_eq!(Aggregation::SeqMeanTokenSumNorm.weight(counts, 5, 16, None), 1.0 / 64.0);
//! ```

use serde::{Deserialize, Serialize};

/// How per-token losses are averaged. Serialized with verl's names (`"token-mean"`, ...).
///
/// ```
/// use cppo::Aggregation;
/// assert_eq!(Aggregation::default(), Aggregation::TokenMean);
/// let counts = cppo::Counts { tokens: 8, seqs: 2 };
/// assert_eq!(Aggregation::SeqMeanTokenSum.weight(counts, 3, 16, None), 0.5);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over all response tokens of the batch.
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token mean.
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum.
    SeqMeanTokenSum,
    /// Mean over sequences of each sequence's token sum divided by a constant length
    /// (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// The denominators of an aggregation: response tokens and sequences (rows with at least
/// one response token), local or global.
///
/// ```
/// use cppo::{Aggregation, Counts};
/// assert_eq!(Counts::default(), Counts { tokens: 0, seqs: 0 });
/// // Nothing to average: the weight is 0, not infinite.
/// assert_eq!(Aggregation::TokenMean.weight(Counts::default(), 0, 4, None), 0.0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counts {
    /// N_tok: response tokens.
    pub tokens: u64,
    /// N_seq: rows with at least one response token.
    pub seqs: u64,
}

impl Counts {
    /// Counts summed over shards: what a trainer all-reduces.
    ///
    /// ```
    /// use cppo::aggregate::Counts;
    /// let a = Counts { tokens: 5, seqs: 2 };
    /// assert_eq!(a.merge(Counts { tokens: 1, seqs: 1 }), Counts { tokens: 6, seqs: 3 });
    /// ```
    #[must_use]
    pub const fn merge(self, other: Self) -> Self {
        Self {
            tokens: self.tokens + other.tokens,
            seqs: self.seqs + other.seqs,
        }
    }
}

impl Aggregation {
    /// The mode's name as in configs.
    ///
    /// ```
    /// use cppo::Aggregation;
    /// assert_eq!(Aggregation::TokenMean.name(), "token-mean");
    /// assert_eq!(Aggregation::SeqMeanTokenSumNorm.name(), "seq-mean-token-sum-norm");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Self::TokenMean => "token-mean",
            Self::SeqMeanTokenMean => "seq-mean-token-mean",
            Self::SeqMeanTokenSum => "seq-mean-token-sum",
            Self::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }

    /// The aggregation weight a_t of every token of a row with `row_len` = T response
    /// tokens, given the denominators `counts`, the padded width L = `width` and the
    /// optional `norm_length` Z. Zero when a denominator is zero.
    ///
    /// ```
    /// use cppo::{Aggregation, Counts};
    /// let counts = Counts { tokens: 10, seqs: 4 };
    /// assert_eq!(Aggregation::SeqMeanTokenSum.weight(counts, 5, 16, None), 0.25);
    /// // Z = 8 instead of the width 16: 1 / (4 · 8).
    /// assert_eq!(Aggregation::SeqMeanTokenSumNorm.weight(counts, 5, 16, Some(8)), 1.0 / 32.0);
    /// ```
    #[inline]
    pub fn weight(
        self,
        counts: Counts,
        row_len: usize,
        width: usize,
        norm_length: Option<usize>,
    ) -> f64 {
        let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };
        let seqs = counts.seqs as f64;
        match self {
            Self::TokenMean => inv(counts.tokens as f64),
            Self::SeqMeanTokenMean => inv(seqs * row_len as f64),
            Self::SeqMeanTokenSum => inv(seqs),
            Self::SeqMeanTokenSumNorm => inv(seqs * norm_length.unwrap_or(width) as f64),
        }
    }
}
