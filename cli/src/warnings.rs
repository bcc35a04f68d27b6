//! The warnings of `cppo inspect`: batches a practitioner should look at twice.
//!
//! Each warning is one line that says what was seen and what to check, with a stable
//! [`Code`] (its `snake_case` name in `--json`). They are read off the library's
//! [`Diagnostics`] of each rule, except one count that needs the per-token outputs
//! ([`exhausted_at_first_token`]). Every threshold and every message is here; the
//! table in `docs/inspect.md` lists the same.
//!
//! | code | fires when |
//! |---|---|
//! | `no_response_tokens` | the mask selects no response token |
//! | `no_drift` | logp == logp_old at every response token (every ratio 1), or every divergence is 0 |
//! | `masked_fraction_high` | a rule masks at least [`MASKED_FRAC_HIGH`] of the response tokens |
//! | `prefix_budget_dominates` | the prefix budget masks at least [`BUDGET_SHARE`] of what a rule masks, and the rule masks at least [`BUDGET_SHARE_MIN_MASKED`] |
//! | `threshold_negative` | a budget rule's mean effective threshold c_t is below −[`THRESHOLD_DEPTH`] δ |
//! | `budget_exhausted_at_first_token` | in at least [`FIRST_TOKEN_ROWS`] of the rows, the first response token alone spends the row's whole budget |
//! | `ratio_above_cap` | `detached_is` keeps at least [`DETACHED_IS_CAPPED`] of the tokens with ρ above its cap C; `cispo` sees at least [`CISPO_CAPPED`] above 1 + ε_high |

use cppo::ndarray::Array2;
use cppo::{Config, Diagnostics, Float, Objective, Reason};
use serde::Serialize;

/// `masked_fraction_high`: a rule masks at least this share of the response tokens.
/// PPO-style clip fractions are usually a few percent; a fifth of the tokens without a
/// gradient means the policy and the rollout policy are far apart, or logp_old is not
/// the rollout policy's.
pub const MASKED_FRAC_HIGH: f64 = 0.20;
/// `prefix_budget_dominates`: the prefix budget's share of the masked tokens...
pub const BUDGET_SHARE: f64 = 0.75;
/// ... when the rule masks at least this share of the response tokens (below it, a
/// budget that does most of the little masking there is is CPPO working as designed).
pub const BUDGET_SHARE_MIN_MASKED: f64 = 0.05;
/// `threshold_negative`: a budget rule's mean effective threshold c_t below −this × δ:
/// on average the prefix has overspent its budget by more than a whole token's δ.
pub const THRESHOLD_DEPTH: f64 = 1.0;
/// `budget_exhausted_at_first_token`: the share of the rows with response tokens. A
/// heavy-tailed drift spends a few rows' budgets on their first token; a systematic
/// cause (logp shifted by one against the mask, a template token scored differently by
/// the trainer and the inference engine) spends most rows'.
pub const FIRST_TOKEN_ROWS: f64 = 0.20;
/// `ratio_above_cap`, `detached_is`: the share of response tokens kept with ρ > C (the
/// cap is meant for rare outliers: verl's `pg_clipfrac_lower`).
pub const DETACHED_IS_CAPPED: f64 = 0.001;
/// `ratio_above_cap`, `cispo`: the share of response tokens with ρ > 1 + ε_high (CISPO
/// caps routinely; this many means drift).
pub const CISPO_CAPPED: f64 = 0.05;

/// What a warning is about. Stable: `--json` gives it as its `snake_case` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    NoResponseTokens,
    NoDrift,
    MaskedFractionHigh,
    PrefixBudgetDominates,
    ThresholdNegative,
    BudgetExhaustedAtFirstToken,
    RatioAboveCap,
}

impl Code {
    /// The name `--json` gives.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoResponseTokens => "no_response_tokens",
            Self::NoDrift => "no_drift",
            Self::MaskedFractionHigh => "masked_fraction_high",
            Self::PrefixBudgetDominates => "prefix_budget_dominates",
            Self::ThresholdNegative => "threshold_negative",
            Self::BudgetExhaustedAtFirstToken => "budget_exhausted_at_first_token",
            Self::RatioAboveCap => "ratio_above_cap",
        }
    }
}

/// One warning: its code, the rule it is about (`None` for the batch), and one line
/// saying what was seen and what to check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Warning {
    pub code: Code,
    pub rule: Option<String>,
    pub message: String,
}

impl Warning {
    /// The one line of the terminal and the Markdown: `[code] rule: message`.
    pub fn line(&self) -> String {
        match &self.rule {
            Some(rule) => format!("[{}] {rule}: {}", self.code.name(), self.message),
            None => format!("[{}] {}", self.code.name(), self.message),
        }
    }
}

/// What the checks read of one rule on a batch.
pub struct RuleFacts<'a> {
    pub name: &'a str,
    pub config: &'a Config,
    /// Exactly what the library returned.
    pub diagnostics: &'a Diagnostics,
    /// Rows whose first response token alone spends the whole budget
    /// ([`exhausted_at_first_token`]); `None` for rules without a budget.
    pub exhausted_rows: Option<u64>,
}

/// The shape of the batch.
#[derive(Clone, Copy)]
pub struct BatchShape {
    pub rows: usize,
    pub len: usize,
}

/// The rows (with at least two response tokens) whose second response token has a
/// negative effective threshold: c_2 = δ + δ_b^row w_1 − w_1 D_1 < 0, i.e. the first
/// response token alone has spent more than the row's whole budget, so that every later
/// token that moves away is masked until δ_b^row W_(t−1) catches up. `threshold` and
/// `reason` are the library's per-token outputs of a rule with a budget.
pub fn exhausted_at_first_token<F: Float>(threshold: &Array2<F>, reason: &Array2<u8>) -> u64 {
    let not_response = Reason::NotResponse.code();
    reason
        .outer_iter()
        .zip(threshold.outer_iter())
        .filter(|(r, c)| {
            r.iter()
                .zip(c.iter())
                .filter(|(r, _)| **r != not_response)
                .nth(1)
                .is_some_and(|(_, c)| c.to_f64() < 0.0)
        })
        .count() as u64
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// A threshold as the messages show it: `20%`, `0.1%`.
fn pct_short(x: f64) -> String {
    let s = format!("{:.2}", 100.0 * x);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

/// A config parameter without trailing zeros.
fn param(x: f64) -> String {
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Every warning of one batch: the batch's first, then each rule's in order.
pub fn check(shape: BatchShape, rules: &[RuleFacts<'_>]) -> Vec<Warning> {
    let mut out = Vec::new();
    let Some(first) = rules.first() else {
        return out;
    };
    let batch = |code: Code, message: String| Warning {
        code,
        rule: None,
        message,
    };
    let g = first.diagnostics;
    if g.response_tokens == 0 {
        out.push(batch(
            Code::NoResponseTokens,
            format!(
                "the mask selects 0 response tokens in {} rows × {} slots, so every number \
                 of this report is 0 and no rule tested anything; check the mask array: nonzero at \
                 the response tokens (verl's response_mask, TRL's completion_mask), not the \
                 prompt's, not inverted, not all zeros",
                shape.rows, shape.len
            ),
        ));
        // Every other number is 0: nothing more to say.
        return out;
    }
    let same_logp = g.ratio_min == 1.0 && g.ratio_max == 1.0;
    let no_divergence = rules.iter().all(|r| r.diagnostics.divergence_max == 0.0);
    if same_logp || no_divergence {
        let what = if same_logp {
            "logp == logp_old at every response token (every ratio is 1, every divergence 0)"
        } else {
            "every divergence is 0 at every response token, though logp differs from logp_old \
             (the top-K pair is identical)"
        };
        out.push(batch(
            Code::NoDrift,
            format!(
                "{what}: no rule can mask anything, and this batch says nothing about the \
                 trust region; the dump was probably taken on-policy (before the first \
                 update of this rollout) or the same tensor was saved twice: dump a later \
                 mini-batch or epoch, or anchor logp_old on the inference engine's log-probs"
            ),
        ));
    }
    for r in rules {
        rule_warnings(r, &mut out);
    }
    out
}

fn rule_warnings(r: &RuleFacts<'_>, out: &mut Vec<Warning>) {
    let g = r.diagnostics;
    let mut push = |code: Code, message: String| {
        out.push(Warning {
            code,
            rule: Some(r.name.to_string()),
            message,
        })
    };
    let cppo = r.config.rule.cppo_params().filter(|p| p.delta_b.is_some());
    if g.masked_frac >= MASKED_FRAC_HIGH {
        let split = if cppo.is_some() {
            format!(
                " ({} by the prefix budget, {} by the token threshold)",
                pct(g.masked_frac_prefix_budget),
                pct(g.masked_frac_token_threshold)
            )
        } else {
            String::new()
        };
        push(
            Code::MaskedFractionHigh,
            format!(
                "masks {} of the response tokens{split}, at or above {}: little gradient is \
                 left; check that logp_old is the rollout policy's log-prob of these tokens \
                 at the same temperature, and how far the policy has moved (mean D {:.4}, \
                 k3 KL {:.4})",
                pct(g.masked_frac),
                pct_short(MASKED_FRAC_HIGH),
                g.divergence_mean,
                g.approx_kl_k3
            ),
        );
    }
    let Some(p) = cppo else {
        ratio_cap(r, &mut push);
        return;
    };
    let delta_b = p.delta_b.unwrap_or(0.0);
    let budget_desc = match p.active_calibration() {
        Some(c) => format!(
            "δ_b = {} (calibrated, up to {} δ_b)",
            param(delta_b),
            param(c.ceiling)
        ),
        None => format!("δ_b = {} (fixed)", param(delta_b)),
    };
    let share = if g.masked_frac > 0.0 {
        g.masked_frac_prefix_budget / g.masked_frac
    } else {
        0.0
    };
    if g.masked_frac >= BUDGET_SHARE_MIN_MASKED && share >= BUDGET_SHARE {
        push(
            Code::PrefixBudgetDominates,
            format!(
                "the prefix budget alone masks {} of the response tokens, {:.0}% of the {} \
                 this rule masks (at or above {}, with at least {} masked): the cumulative \
                 divergence S_t outgrows δ + δ_b W_(t−1) and masks the rest of each row; \
                 check where the divergence is (by position: the first tokens?) and whether \
                 {budget_desc} suits this much drift",
                pct(g.masked_frac_prefix_budget),
                100.0 * share,
                pct(g.masked_frac),
                pct_short(BUDGET_SHARE),
                pct_short(BUDGET_SHARE_MIN_MASKED)
            ),
        );
    }
    if let Some(c) = g.threshold_mean
        && c < -THRESHOLD_DEPTH * p.delta
    {
        let depth = if THRESHOLD_DEPTH == 1.0 {
            String::new()
        } else {
            param(THRESHOLD_DEPTH)
        };
        push(
            Code::ThresholdNegative,
            format!(
                "the mean effective threshold c_t is {c:.4}, below −{depth}δ (δ = {}): on \
                 average the prefix has overspent its budget by more than a token's δ, so \
                 the budget is exhausted in most rows and masks every token that moves \
                 away; check the first tokens' divergence and {budget_desc}",
                param(p.delta)
            ),
        );
    }
    if let Some(rows) = r.exhausted_rows
        && g.sequences > 0
    {
        let share = rows as f64 / g.sequences as f64;
        if rows > 0 && share >= FIRST_TOKEN_ROWS {
            push(
                Code::BudgetExhaustedAtFirstToken,
                format!(
                    "in {rows} of {} rows ({}, at or above {}) the first response token \
                     alone spends the row's whole budget (w_1 D_1 > δ + δ_b^row w_1), so the \
                     budget binds from the second token on and masks every token that moves \
                     away until δ_b^row W_(t−1) catches up; check that logp and the mask are \
                     aligned (a shift by one puts the last prompt token first) and why the \
                     first tokens diverge (a template token, training–inference mismatch)",
                    g.sequences,
                    pct(share),
                    pct_short(FIRST_TOKEN_ROWS),
                ),
            );
        }
    }
    ratio_cap(r, &mut push);
}

/// `ratio_above_cap`, for the objectives whose importance weight has a cap.
fn ratio_cap(r: &RuleFacts<'_>, push: &mut impl FnMut(Code, String)) {
    let g = r.diagnostics;
    let n = g.response_tokens as f64;
    let (share, cap, limit, what) = match r.config.objective {
        Objective::DetachedIs { ratio_cap } => (
            // verl's pg_clipfrac_lower divides by N + 1e-8; the count is an integer.
            (g.verl.pg_clipfrac_lower * (n + 1e-8)).round() / n.max(1.0),
            format!("detached_is's cap C = {}", param(ratio_cap)),
            DETACHED_IS_CAPPED,
            "are kept with a ratio",
        ),
        Objective::Cispo { eps_high } => (
            g.clip_frac.unwrap_or(0.0),
            format!("cispo's cap 1 + ε_high = {}", param(1.0 + eps_high)),
            CISPO_CAPPED,
            "have a ratio",
        ),
        _ => return,
    };
    if share >= limit && share > 0.0 {
        push(
            Code::RatioAboveCap,
            format!(
                "{} of the response tokens {what} ρ = π_θ/μ above {cap} (at or above {}; \
                 max ρ {:.3}): their importance weights are truncated, so their gradient is \
                 biased; check the drift between logp_old and logp (another policy, another \
                 temperature, a stale rollout) before trusting this step",
                pct(share),
                pct_short(limit),
                g.ratio_max
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cppo::ndarray::{Array1, array};
    use cppo::{Batch, CppoParams, Par, Rule, evaluate};

    /// A hand-built batch: log-probs, one advantage per row, the mask.
    struct Hand {
        logp: Array2<f64>,
        logp_old: Array2<f64>,
        adv: Array1<f64>,
        mask: Array2<bool>,
    }

    impl Hand {
        /// Rows of probabilities (p, q) per token, every slot a response token, A = 1:
        /// with p > q every token moves away from μ.
        fn new(rows: &[&[(f64, f64)]]) -> Self {
            let len = rows.iter().map(|r| r.len()).max().unwrap();
            let mut h = Self {
                logp: Array2::from_elem((rows.len(), len), -1.0),
                logp_old: Array2::from_elem((rows.len(), len), -1.0),
                adv: Array1::ones(rows.len()),
                mask: Array2::from_elem((rows.len(), len), false),
            };
            for (i, row) in rows.iter().enumerate() {
                for (j, &(p, q)) in row.iter().enumerate() {
                    h.logp[[i, j]] = p.ln();
                    h.logp_old[[i, j]] = q.ln();
                    h.mask[[i, j]] = true;
                }
            }
            h
        }

        /// Every warning under these configs, named r0, r1, ...
        fn warnings(&self, configs: &[Config]) -> Vec<Warning> {
            let batch = Batch::new(&self.logp, &self.logp_old, &self.adv, &self.mask).unwrap();
            let evals: Vec<_> = configs
                .iter()
                .map(|c| evaluate(c, &batch, Par::Seq).unwrap())
                .collect();
            let names: Vec<String> = (0..configs.len()).map(|k| format!("r{k}")).collect();
            let facts: Vec<RuleFacts<'_>> = configs
                .iter()
                .zip(&evals)
                .zip(&names)
                .map(|((c, e), name)| RuleFacts {
                    name,
                    config: c,
                    diagnostics: &e.diagnostics,
                    exhausted_rows: c
                        .rule
                        .has_budget()
                        .then(|| exhausted_at_first_token(&e.outputs.threshold, &e.outputs.reason)),
                })
                .collect();
            let (rows, len) = self.logp.dim();
            check(BatchShape { rows, len }, &facts)
        }

        fn codes(&self, configs: &[Config]) -> Vec<Code> {
            self.warnings(configs).iter().map(|w| w.code).collect()
        }
    }

    /// A row of n tokens with these probabilities, moving away (p > q).
    fn row(n: usize, p: f64, q: f64) -> Vec<(f64, f64)> {
        vec![(p, q); n]
    }

    fn fixed_budget() -> Config {
        Config::with_rule(Rule::Cppo(CppoParams {
            w_min: 1.0,
            calibration: None,
            ..CppoParams::PAPER
        }))
    }

    fn dppo() -> Config {
        Config::dppo()
    }

    #[test]
    fn no_response_tokens() {
        let mut h = Hand::new(&[&row(4, 0.5, 0.4)]);
        h.mask.fill(false);
        let w = h.warnings(&[dppo(), fixed_budget()]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].code, Code::NoResponseTokens);
        assert_eq!(w[0].rule, None);
        assert!(
            w[0].message
                .contains("0 response tokens in 1 rows × 4 slots")
        );
        h.mask[[0, 2]] = true;
        assert!(!h.codes(&[dppo()]).contains(&Code::NoResponseTokens));
    }

    #[test]
    fn no_drift() {
        // logp == logp_old: the same tensor twice.
        let h = Hand::new(&[&row(5, 0.3, 0.3), &row(3, 0.7, 0.7)]);
        let w = h.warnings(&[dppo(), fixed_budget()]);
        assert_eq!(
            w.iter().map(|w| w.code).collect::<Vec<_>>(),
            [Code::NoDrift]
        );
        assert!(
            w[0].message.contains("logp == logp_old"),
            "{}",
            w[0].message
        );
        // One token that moved is enough to stay silent.
        let h = Hand::new(&[&row(5, 0.3, 0.3), &[(0.7, 0.69)]]);
        assert!(!h.codes(&[dppo()]).contains(&Code::NoDrift));
    }

    #[test]
    fn masked_fraction_high() {
        // DPPO: D = 0.3 > δ on 1 of 4 tokens, moving away: 25% masked.
        let mut tokens = row(3, 0.5, 0.5);
        tokens.push((0.5, 0.2));
        let h = Hand::new(&[&tokens]);
        let w = h.warnings(&[dppo()]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].code, Code::MaskedFractionHigh);
        assert_eq!(w[0].rule.as_deref(), Some("r0"));
        assert!(
            w[0].message
                .starts_with("masks 25.00% of the response tokens, at or above 20%")
        );
        // 1 of 8 tokens: 12.5%, silent.
        let mut tokens = row(7, 0.5, 0.5);
        tokens.push((0.5, 0.2));
        assert!(Hand::new(&[&tokens]).codes(&[dppo()]).is_empty());
        // The same token moving back toward μ (A < 0) is kept by the bypass: silent.
        let mut h = Hand::new(&[&[(0.5, 0.5), (0.5, 0.2)]]);
        h.adv.fill(-1.0);
        assert!(h.codes(&[dppo()]).is_empty());
    }

    #[test]
    fn prefix_budget_dominates() {
        // D = 0.1 ≤ δ each, S_t = 0.1 t > 0.15 + 0.02 (t − 1) from t = 2: the budget masks
        // 9 of 10 tokens.
        let h = Hand::new(&[&row(10, 0.5, 0.4)]);
        let codes = h.codes(&[fixed_budget()]);
        assert!(codes.contains(&Code::PrefixBudgetDominates), "{codes:?}");
        assert!(codes.contains(&Code::MaskedFractionHigh), "{codes:?}");
        // DPPO masks none of them.
        assert!(h.codes(&[dppo()]).is_empty());
        // Mostly the token threshold: one late token with D = 0.3 (the last, so the budget
        // masks nothing after it), 10% masked.
        let mut tokens = row(9, 0.5, 0.5);
        tokens.push((0.5, 0.2));
        let codes = Hand::new(&[&tokens]).codes(&[fixed_budget()]);
        assert!(!codes.contains(&Code::PrefixBudgetDominates), "{codes:?}");
        // All by the budget, but too little masked to matter: 1 of 40 tokens (2.5%).
        // S_1 = 0.14 ≤ δ; S_2 = 0.19 > δ + δ_b; then D = 0 (not moving away).
        let mut tokens = vec![(0.5, 0.36), (0.5, 0.45)];
        tokens.extend(row(38, 0.5, 0.5));
        let h = Hand::new(&[&tokens]);
        let w = h.warnings(&[fixed_budget()]);
        let batch = Batch::new(&h.logp, &h.logp_old, &h.adv, &h.mask).unwrap();
        let g = evaluate(&fixed_budget(), &batch, Par::Seq)
            .unwrap()
            .diagnostics;
        assert_eq!(
            g.masked_frac_prefix_budget,
            1.0 / 40.0,
            "the case is as meant"
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn threshold_negative() {
        // c_t = 0.15 − 0.08 (t − 1): mean over 10 tokens −0.21 < −δ.
        let h = Hand::new(&[&row(10, 0.5, 0.4)]);
        let w = h.warnings(&[fixed_budget()]);
        let neg = w.iter().find(|w| w.code == Code::ThresholdNegative);
        let neg = neg.unwrap_or_else(|| panic!("{w:?}"));
        assert!(
            neg.message.contains("is -0.2100, below −δ (δ = 0.15)"),
            "{}",
            neg.message
        );
        // D = 0.05: c_t = 0.15 − 0.03 (t − 1), mean 0.015.
        let h = Hand::new(&[&row(10, 0.5, 0.45)]);
        assert!(
            !h.codes(&[fixed_budget()])
                .contains(&Code::ThresholdNegative)
        );
        // DPPO's threshold is δ: never.
        assert!(
            !Hand::new(&[&row(10, 0.9, 0.1)])
                .codes(&[dppo()])
                .contains(&Code::ThresholdNegative)
        );
    }

    #[test]
    fn budget_exhausted_at_first_token() {
        // Row 0: D_1 = 0.3, so c_2 = 0.15 + 0.02 − 0.3 < 0; row 1 starts calm.
        let mut first = vec![(0.5, 0.2)];
        first.extend(row(3, 0.5, 0.5));
        let calm = row(4, 0.5, 0.5);
        let h = Hand::new(&[&first, &calm]);
        let w = h.warnings(&[fixed_budget(), dppo()]);
        let hit: Vec<_> = w
            .iter()
            .filter(|w| w.code == Code::BudgetExhaustedAtFirstToken)
            .collect();
        assert_eq!(hit.len(), 1, "{w:?}");
        assert_eq!(hit[0].rule.as_deref(), Some("r0"));
        assert!(
            hit[0].message.starts_with("in 1 of 2 rows (50.00%"),
            "{}",
            hit[0].message
        );
        // D_1 = 0.1: c_2 = 0.07, silent; and 1 row in 40 is under the 5% bar.
        let mut mild = vec![(0.5, 0.4)];
        mild.extend(row(3, 0.5, 0.5));
        let h = Hand::new(&[&mild, &calm]);
        assert!(
            !h.codes(&[fixed_budget()])
                .contains(&Code::BudgetExhaustedAtFirstToken)
        );
        let mut rows: Vec<&[(f64, f64)]> = vec![&first];
        rows.extend(std::iter::repeat_n(&calm[..], 39));
        let codes = Hand::new(&rows).codes(&[fixed_budget()]);
        assert!(
            !codes.contains(&Code::BudgetExhaustedAtFirstToken),
            "{codes:?}"
        );
    }

    #[test]
    fn exhausted_rows_skip_holes_and_short_rows() {
        // Column 1 is a hole: the second response token is column 2.
        let reason = array![[1u8, 0, 1, 1], [3, 0, 0, 0], [1, 1, 0, 0]];
        let threshold = array![
            [0.15, 0.0, -0.1, -0.2],
            [0.15, 0.0, 0.0, 0.0],
            [0.15, 0.1, 0.0, 0.0]
        ];
        assert_eq!(exhausted_at_first_token(&threshold, &reason), 1);
        let threshold = array![
            [0.15, -1.0, 0.1, -0.2],
            [0.15, -1.0, 0.0, 0.0],
            [0.15, 0.1, 0.0, 0.0]
        ];
        assert_eq!(exhausted_at_first_token(&threshold, &reason), 0);
    }

    #[test]
    fn ratio_above_cap() {
        // ρ = 2.5 on 1 of 10 tokens, kept (no trust region), under a cap C = 2.
        let mut tokens = row(9, 0.5, 0.5);
        tokens.push((0.5, 0.2));
        let h = Hand::new(&[&tokens]);
        let capped = |objective| Config {
            objective,
            ..Config::with_rule(Rule::None)
        };
        let detached = capped(Objective::DetachedIs { ratio_cap: 2.0 });
        let w = h.warnings(&[detached]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].code, Code::RatioAboveCap);
        assert!(
            w[0].message
                .starts_with("10.00% of the response tokens are kept")
        );
        assert!(
            w[0].message
                .contains("C = 2 (at or above 0.1%; max ρ 2.500)"),
            "{}",
            w[0].message
        );
        // Under the default cap C = 10, and for a masked token (DPPO masks it): silent.
        assert!(
            h.codes(&[capped(Objective::DetachedIs { ratio_cap: 10.0 })])
                .is_empty()
        );
        let masked = Config {
            objective: Objective::DetachedIs { ratio_cap: 2.0 },
            ..dppo()
        };
        assert!(!h.codes(&[masked]).contains(&Code::RatioAboveCap));
        // CISPO: 10% above 1.28 fires, 1 in 40 (2.5%) does not; the surrogate has no cap.
        let cispo = capped(Objective::Cispo { eps_high: 0.28 });
        assert_eq!(h.codes(&[cispo]), [Code::RatioAboveCap]);
        let mut tokens = row(39, 0.5, 0.5);
        tokens.push((0.5, 0.2));
        assert!(Hand::new(&[&tokens]).codes(&[cispo]).is_empty());
        assert!(h.codes(&[Config::with_rule(Rule::None)]).is_empty());
    }

    #[test]
    fn codes_serialize_as_their_names() {
        for code in [
            Code::NoResponseTokens,
            Code::NoDrift,
            Code::MaskedFractionHigh,
            Code::PrefixBudgetDominates,
            Code::ThresholdNegative,
            Code::BudgetExhaustedAtFirstToken,
            Code::RatioAboveCap,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.name());
        }
    }
}
