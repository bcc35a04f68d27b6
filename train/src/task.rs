//! The verifiable tasks: sort a list of digits, or write its running sums mod 10.
//!
//! A sequence is `BOS x_1 … x_n = r_1 … r_n EOS`, then padding. The prompt is
//! `BOS x_1 … x_n =` (n + 2 tokens); the response is what the policy writes after it, at
//! most n + 1 tokens. The reward is 1 when the response is exactly the task's answer
//! followed by EOS, else 0.
//!
//! - **sort**: r is the sorted digits. The t-th output depends only on the prompt, so an
//!   early mistake does not make the later ones harder.
//! - **sum** (the running-sum chain): r_t = (r_{t−1} + x_t) mod 10, r_0 = 0. The natural
//!   solution reads its own previous output and the t-th digit of the prompt, so one
//!   early error corrupts every later token: errors compound, and the horizon n is the
//!   knob.

use crate::rng::Rng;

/// Digits 0–9 are tokens 0–9.
pub const SEP: u32 = 10;
pub const BOS: u32 = 11;
pub const EOS: u32 = 12;
pub const PAD: u32 = 13;
pub const VOCAB: usize = 14;

/// Which answer the checker wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The sorted digits.
    Sort,
    /// The running sums mod 10.
    Sum,
}

impl Kind {
    /// Parses `sort` or `sum`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "sort" => Ok(Self::Sort),
            "sum" => Ok(Self::Sum),
            other => Err(format!("--task {other:?}: expected sort or sum")),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Sort => "sort",
            Self::Sum => "sum",
        }
    }
}

/// The task: its kind and its size.
#[derive(Clone, Copy, Debug)]
pub struct Task {
    pub kind: Kind,
    /// Digits per prompt: the horizon T of the running sum.
    pub n: usize,
}

impl Task {
    /// Prompt tokens: BOS, the digits, SEP.
    pub fn prompt_len(&self) -> usize {
        self.n + 2
    }

    /// The longest response: the answer's n digits and EOS.
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

    /// The correct response: the answer's digits and EOS.
    pub fn answer(&self, digits: &[u32]) -> Vec<u32> {
        let mut a = match self.kind {
            Kind::Sort => {
                let mut a = digits.to_vec();
                a.sort_unstable();
                a
            }
            Kind::Sum => digits
                .iter()
                .scan(0, |s, &x| {
                    *s = (*s + x) % 10;
                    Some(*s)
                })
                .collect(),
        };
        a.push(EOS);
        a
    }

    /// The checker: 1 for exactly the answer then EOS, else 0. `response` is the
    /// generated tokens, up to and including EOS if one was written.
    pub fn reward(&self, digits: &[u32], response: &[u32]) -> f64 {
        f64::from(u8::from(self.first_error(digits, response).is_none()))
    }

    /// The 0-based response position of the first token that differs from the answer
    /// (a missing token counts as different), or `None` for a correct response.
    pub fn first_error(&self, digits: &[u32], response: &[u32]) -> Option<usize> {
        let answer = self.answer(digits);
        (0..answer.len().max(response.len())).find(|&t| answer.get(t) != response.get(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_checker() {
        let t = Task {
            kind: Kind::Sort,
            n: 3,
        };
        assert_eq!(t.reward(&[3, 1, 2], &[1, 2, 3, EOS]), 1.0);
        assert_eq!(t.reward(&[3, 1, 2], &[1, 2, 3]), 0.0);
        assert_eq!(t.reward(&[3, 1, 2], &[1, 3, 2, EOS]), 0.0);
        assert_eq!(t.prompt(&[3, 1, 2]), vec![BOS, 3, 1, 2, SEP]);
    }

    #[test]
    fn running_sum_checker() {
        let t = Task {
            kind: Kind::Sum,
            n: 4,
        };
        // 7, 7+5 = 12 -> 2, 2+9 = 11 -> 1, 1+0 = 1.
        assert_eq!(t.answer(&[7, 5, 9, 0]), vec![7, 2, 1, 1, EOS]);
        assert_eq!(t.reward(&[7, 5, 9, 0], &[7, 2, 1, 1, EOS]), 1.0);
        assert_eq!(t.first_error(&[7, 5, 9, 0], &[7, 2, 1, 1, EOS]), None);
        assert_eq!(t.first_error(&[7, 5, 9, 0], &[7, 3, 1, 1, EOS]), Some(1));
        // Stopping early: the missing token is the error.
        assert_eq!(t.first_error(&[7, 5, 9, 0], &[7, 2, EOS]), Some(2));
        assert_eq!(t.first_error(&[7, 5, 9, 0], &[7, 2]), Some(2));
        assert_eq!(t.reward(&[7, 5, 9, 0], &[7, 2, 1, 1]), 0.0);
    }
}
