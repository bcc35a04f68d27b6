//! The verifiable task: sort a list of digits.
//!
//! A sequence is `BOS d_1 … d_n = r_1 … r_n EOS`, then padding. The prompt is
//! `BOS d_1 … d_n =` (n + 2 tokens); the response is what the policy writes after it, at
//! most n + 1 tokens. The reward is 1 when the response is exactly the sorted digits
//! followed by EOS, else 0.

use crate::rng::Rng;

/// Digits 0–9 are tokens 0–9.
pub const SEP: u32 = 10;
pub const BOS: u32 = 11;
pub const EOS: u32 = 12;
pub const PAD: u32 = 13;
pub const VOCAB: usize = 14;

/// The task's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Task {
    /// Digits per prompt.
    pub n: usize,
}

impl Task {
    /// Prompt tokens: BOS, the digits, SEP.
    pub fn prompt_len(&self) -> usize {
        self.n + 2
    }

    /// The longest response: the digits and EOS.
    pub fn response_len(&self) -> usize {
        self.n + 1
    }

    /// Prompt plus the longest response.
    pub fn seq_len(&self) -> usize {
        self.prompt_len() + self.response_len()
    }

    /// A random prompt's digits.
    pub fn digits(&self, rng: &mut Rng) -> Vec<u32> {
        (0..self.n).map(|_| rng.below(10) as u32).collect()
    }

    /// The prompt tokens for `digits`.
    pub fn prompt(&self, digits: &[u32]) -> Vec<u32> {
        let mut p = Vec::with_capacity(self.prompt_len());
        p.push(BOS);
        p.extend_from_slice(digits);
        p.push(SEP);
        p
    }

    /// The correct response: the sorted digits and EOS.
    pub fn answer(&self, digits: &[u32]) -> Vec<u32> {
        let mut a = digits.to_vec();
        a.sort_unstable();
        a.push(EOS);
        a
    }

    /// The checker: 1 for exactly the sorted digits then EOS, else 0. `response` is the
    /// generated tokens, up to and including EOS if one was written.
    pub fn reward(&self, digits: &[u32], response: &[u32]) -> f64 {
        f64::from(u8::from(response == self.answer(digits).as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker() {
        let t = Task { n: 3 };
        assert_eq!(t.reward(&[3, 1, 2], &[1, 2, 3, EOS]), 1.0);
        assert_eq!(t.reward(&[3, 1, 2], &[1, 2, 3]), 0.0);
        assert_eq!(t.reward(&[3, 1, 2], &[1, 3, 2, EOS]), 0.0);
        assert_eq!(t.prompt(&[3, 1, 2]), vec![BOS, 3, 1, 2, SEP]);
    }
}
