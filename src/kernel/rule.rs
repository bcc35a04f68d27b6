//! The rule's test on a block, the reasons, and the share of its term each token keeps
//! (the block forms of [`crate::rule`]'s formulas; a unit test holds them equal).
//!
//! CPPO's prefix scan is the one sequential loop of the pass: S and W advance token by
//! token in f64. Everything else here is a loop over the block that vectorizes.

// The passes index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::lanes::InStage;
use super::row_stats::RowFacts;
use super::schedule::block_weights;
use super::{BLK, Plan, Work};
use crate::rule::{Gate, Reason, Rule};
use crate::simd::exp_to;

pub(crate) const FEASIBLE: u8 = Reason::Feasible as u8;
pub(crate) const CORRECTIVE: u8 = Reason::Corrective as u8;
pub(crate) const TOKEN: u8 = Reason::TokenThreshold as u8;
pub(crate) const BUDGET: u8 = Reason::PrefixBudget as u8;

/// `if c { a } else { b }` without a branch.
#[inline(always)]
fn pick(c: bool, a: u8, b: u8) -> u8 {
    let m = 0u8.wrapping_sub(u8::from(c)); // all ones if c
    (a & m) | (b & !m)
}

/// Whether a reason code keeps the token.
#[inline(always)]
pub(crate) fn kept(code: u8) -> bool {
    (code == FEASIBLE) | (code == CORRECTIVE)
}

/// The rule's test on a block: weight w, threshold c, feasible, and the reason code if
/// not (3 token threshold, 4 prefix budget alone). CPPO's prefix sums S, W advance here;
/// `j0` is the block's first column in the batch.
#[inline(always)]
pub(crate) fn rule_test(
    plan: &Plan<'_>,
    facts: &RowFacts,
    st: &InStage,
    wk: &mut Work,
    j0: usize,
    (s_sum, w_sum): (&mut f64, &mut f64),
) {
    let n = st.n;
    let d = &wk.d;
    let (w, c, feasible, fail) = (&mut wk.w, &mut wk.c, &mut wk.feasible, &mut wk.fail);
    match &plan.cfg.rule {
        Rule::None => {
            w[..n].fill(1.0);
            c[..n].fill(f64::NAN);
            feasible[..n].fill(true);
        }
        Rule::Ratio { eps_low, eps_high } => {
            w[..n].fill(1.0);
            c[..n].fill(f64::NAN);
            let (lo, hi) = (1.0 - eps_low, 1.0 + eps_high);
            for k in 0..n {
                feasible[k] = (st.rho[k] >= lo) & (st.rho[k] <= hi);
            }
        }
        Rule::Dppo { delta } => {
            w[..n].fill(1.0);
            c[..n].fill(*delta);
            for k in 0..n {
                feasible[k] = d[k] <= *delta;
            }
        }
        Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
            w[..n].fill(1.0);
            c[..n].fill(*delta);
            feasible[..n].fill(facts.row_ok);
        }
        Rule::Cppo(p) => {
            let col = plan.col0 + j0;
            block_weights(p, &wk.t, n, col, facts.row_len, plan.width, w);
            let delta = p.delta;
            let (s_new, room) = (&mut wk.s_new, &mut wk.room);
            // The prefix scan: the one sequential pass. `cppo_test` and
            // `cppo_threshold` token by token.
            let (mut s, mut ws) = (*s_sum, *w_sum);
            match facts.delta_b {
                None => {
                    for k in 0..n {
                        let wd = w[k] * d[k];
                        let on = st.on[k];
                        s += if on { wd } else { 0.0 };
                        ws += if on { w[k] } else { 0.0 };
                        c[k] = delta;
                        feasible[k] = wd <= delta;
                        fail[k] = TOKEN;
                        room[k] = f64::INFINITY;
                        s_new[k] = 0.0;
                    }
                }
                Some(db) => {
                    // Only the two running sums are sequential: S and W before each
                    // token (the sums of the response tokens before it, in column
                    // order), then the tests in a vectorized pass. Adding 0 for a
                    // token off the mask leaves a sum as it was (S, W ≥ 0), so these
                    // are the bits of a scan that skips it.
                    let (mut add_s, mut add_w) = ([0.0f64; BLK], [0.0f64; BLK]);
                    for k in 0..n {
                        let on = st.on[k];
                        add_s[k] = if on { w[k] * d[k] } else { 0.0 };
                        add_w[k] = if on { w[k] } else { 0.0 };
                    }
                    let (mut s_before, mut w_before) = ([0.0f64; BLK], [0.0f64; BLK]);
                    (s, ws) = prefix_scan(
                        (s, ws),
                        (&add_s[..n], &add_w[..n]),
                        (&mut s_before[..n], &mut w_before[..n]),
                    );
                    for k in 0..n {
                        let wd = w[k] * d[k];
                        let r = delta + db * w_before[k];
                        let slack = r - s_before[k];
                        c[k] = if slack < delta { slack } else { delta };
                        let sn = s_before[k] + wd;
                        let token_ok = wd <= delta;
                        feasible[k] = token_ok & (sn <= r);
                        fail[k] = pick(token_ok, BUDGET, TOKEN);
                        (room[k], s_new[k]) = (r, sn);
                    }
                }
            }
            (*s_sum, *w_sum) = (s, ws);
            return;
        }
    }
    fail[..n].fill(TOKEN);
}

/// The two running sums S and W, token by token in column order: `before` receives
/// each token's sums before it, and the sums after the last token are returned.
///
/// Its own function, not inlined: in the block pass, the compiler kept the two sums
/// in a stack slot and paid a store and a reload on every token's add; alone, the two
/// add chains stay in registers and run at the adds' latency.
#[inline(never)]
fn prefix_scan(
    (mut s, mut w): (f64, f64),
    (add_s, add_w): (&[f64], &[f64]),
    (s_before, w_before): (&mut [f64], &mut [f64]),
) -> (f64, f64) {
    let adds = add_s.iter().zip(add_w);
    for ((sb, wb), (&a, &b)) in s_before.iter_mut().zip(w_before.iter_mut()).zip(adds) {
        (*sb, *wb) = (s, w);
        s += a;
        w += b;
    }
    (s, w)
}

/// Reasons and shares: 1 feasible; else 2 kept by the corrective bypass (never under
/// TRM); else the failed test; 0 off the mask, selected without branches. The share `m`
/// of its objective term each token keeps: 1 or 0 under the hard rules, the gate under
/// `cppo_soft`, times the token's IS weight.
#[inline(always)]
pub(crate) fn reasons_and_shares(plan: &Plan<'_>, st: &InStage, wk: &mut Work, has_isw: bool) {
    let n = st.n;
    let rule = &plan.cfg.rule;
    let bypass_allowed = !rule.is_sequence_level();
    for k in 0..n {
        let away = st.adv[k] * (st.rho[k] - 1.0) > 0.0;
        let bypass = !away & bypass_allowed;
        let code = pick(
            wk.feasible[k],
            FEASIBLE,
            pick(bypass, CORRECTIVE, wk.fail[k]),
        );
        wk.code[k] = pick(st.on[k], code, 0);
        wk.m[k] = if kept(wk.code[k]) { 1.0 } else { 0.0 };
    }
    if let Some(p) = rule.cppo_params() {
        match (p.gate, p.delta_b) {
            (None, _) => {}
            (Some(Gate::Inverse), delta_b) => {
                // `rule::inverse_gate` for away-moving tokens that fail the test.
                let delta = p.delta;
                for k in 0..n {
                    let wd = wk.w[k] * wk.d[k];
                    let x = match delta_b {
                        Some(_) => (wd / delta).max(wk.s_new[k] / wk.room[k]),
                        None => wd / delta,
                    };
                    let gate = if x > 1.0 { 1.0 / x } else { 1.0 };
                    let away = st.adv[k] * (st.rho[k] - 1.0) > 0.0;
                    if st.on[k] & away & !wk.feasible[k] {
                        wk.m[k] = gate;
                    }
                }
            }
            (Some(Gate::Sigmoid { tau }), _) => {
                // `rule::sigmoid_gate` for every away-moving token, the block's e^−z in
                // one SIMD call.
                let mut neg_z = [0.0f64; super::BLK];
                for k in 0..n {
                    neg_z[k] = -((wk.c[k] - wk.w[k] * wk.d[k]) / tau);
                }
                let mut e = [0.0f64; super::BLK];
                exp_to(&neg_z[..n], &mut e[..n]);
                for k in 0..n {
                    let away = st.adv[k] * (st.rho[k] - 1.0) > 0.0;
                    if st.on[k] & away {
                        wk.m[k] = 1.0 / (1.0 + e[k]);
                    }
                }
            }
        }
    }
    if has_isw {
        for k in 0..n {
            wk.m[k] *= if st.on[k] { wk.isw[k] } else { 0.0 };
        }
    }
}
