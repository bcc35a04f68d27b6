//! The reason codes of the `reason` output: why each token was kept or masked.

use serde::{Deserialize, Serialize};

/// Why a token was kept or masked. Stored as `u8` codes 0–4 in the `reason` output.
///
/// ```
/// use cppo::Reason;
/// for code in 0..=4u8 {
///     assert_eq!(Reason::from_code(code).unwrap().code(), code);
/// }
/// assert!(Reason::NotResponse < Reason::Feasible); // ordered by code
/// assert!(Reason::Feasible.is_kept() && !Reason::TokenThreshold.is_kept());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Reason {
    /// 0: not a response token (padding, prompt or a hole in the mask).
    NotResponse = 0,
    /// 1: kept, the rule's test passed.
    Feasible = 1,
    /// 2: kept by the corrective bypass: the test failed but the token does not move away
    /// from the anchor.
    Corrective = 2,
    /// 3: masked, the token threshold was violated (w_t D_t > δ for CPPO, or the rule's
    /// only test for the others).
    TokenThreshold = 3,
    /// 4: masked by CPPO's prefix budget alone (w_t D_t ≤ δ but S_t > δ + δ_b^row W_{t−1}).
    PrefixBudget = 4,
}

impl Reason {
    /// The `u8` code.
    ///
    /// ```
    /// assert_eq!(cppo::Reason::PrefixBudget.code(), 4);
    /// ```
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The reason for a code, or `None` for a code above 4.
    ///
    /// ```
    /// use cppo::rule::Reason;
    /// assert_eq!(Reason::from_code(4), Some(Reason::PrefixBudget));
    /// assert_eq!(Reason::from_code(5), None);
    /// ```
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::NotResponse),
            1 => Some(Self::Feasible),
            2 => Some(Self::Corrective),
            3 => Some(Self::TokenThreshold),
            4 => Some(Self::PrefixBudget),
            _ => None,
        }
    }

    /// Whether a token with this reason keeps its gradient.
    ///
    /// ```
    /// assert!(cppo::Reason::Corrective.is_kept());
    /// assert!(!cppo::Reason::PrefixBudget.is_kept());
    /// ```
    pub const fn is_kept(self) -> bool {
        matches!(self, Self::Feasible | Self::Corrective)
    }
}
