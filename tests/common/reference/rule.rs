//! Positions and weights, the per-row budget, the rules' tests and the soft gates.

use cppo::{CppoParams, Gate, Positions, Rule};

/// Relative gap between two compared quantities.
pub fn gap(x: f64, y: f64) -> f64 {
    let s = x.abs().max(y.abs());
    if s == 0.0 { 0.0 } else { (x - y).abs() / s }
}

/// The weight of the token at response index `t` (from 1) and column `j` (from 0) of a
/// row with T = `row_len` response tokens in a batch of width L = `width`.
pub fn ref_weight(rule: &Rule, t: usize, j: usize, row_len: usize, width: usize) -> f64 {
    let Rule::Cppo(p) = rule else { return 1.0 };
    // Position and horizon by convention; the shuffle is the crate's permutation of
    // the positions (a definition, not a formula the reference could restate).
    let (pos, n, h) = match p.positions {
        Positions::Response => (t, row_len, p.horizon.unwrap_or(row_len)),
        Positions::Column => (j + 1, width, p.horizon.unwrap_or(width)),
    };
    let pos = match p.shuffle_seed {
        Some(seed) => cppo::schedule::shuffled_position(seed, pos, n),
        None => pos,
    };
    match p.positions {
        Positions::Response => {
            if h <= 1 {
                return 1.0;
            }
            let frac = (pos as f64 - 1.0) / (h as f64 - 1.0);
            let w = 1.0 - (1.0 - p.w_min) * frac;
            if p.horizon.is_some() && w < p.w_min {
                p.w_min
            } else {
                w
            }
        }
        Positions::Column => {
            // verl PR #6731: w_min + (1 − w_min) clamp((H − t) / max(H − 1, 1), 0, 1).
            let (h, t) = (h as f64, pos as f64);
            let den = if h - 1.0 > 1.0 { h - 1.0 } else { 1.0 };
            let frac = ((h - t) / den).clamp(0.0, 1.0);
            p.w_min + (1.0 - p.w_min) * frac
        }
    }
}

/// The linear-interpolation (type 7) quantile by sorting, with numpy's two-sided lerp.
pub fn ref_quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * q;
    let j = h.floor() as usize;
    let g = h - j as f64;
    if j + 1 >= v.len() {
        return v[j];
    }
    let (a, b) = (v[j], v[j + 1]);
    if g >= 0.5 {
        b - (b - a) * (1.0 - g)
    } else {
        a + (b - a) * g
    }
}

/// δ_b^row of a row whose response tokens have divergences `d`: NaN without a budget,
/// δ_b fixed or for an empty row, else min(c δ_b, max(δ_b, k Q_q(d))).
pub fn ref_row_budget(rule: &Rule, d: &[f64]) -> f64 {
    let Rule::Cppo(p) = rule else { return f64::NAN };
    let Some(db) = p.delta_b else {
        return f64::NAN;
    };
    match p.calibration {
        Some(c) if !d.is_empty() => {
            let x = c.scale * ref_quantile(d, c.quantile);
            let x = if x < db { db } else { x };
            if x > c.ceiling * db {
                c.ceiling * db
            } else {
                x
            }
        }
        _ => db,
    }
}

/// A token's test under a per-token rule: (feasible, failure code, threshold output,
/// decision margin, the inverse gate's x). `s_prev`, `w_prev` are S_{t−1}, W_{t−1}.
#[allow(clippy::too_many_arguments)]
pub fn ref_token_test(
    rule: &Rule,
    rho: f64,
    d: f64,
    w: f64,
    s_prev: f64,
    w_prev: f64,
    delta_b_row: f64,
    trm_stat: f64,
) -> (bool, u8, f64, f64, f64) {
    match *rule {
        Rule::None => (true, 3, f64::NAN, f64::INFINITY, 0.0),
        Rule::Ratio { eps_low, eps_high } => {
            let lo = 1.0 - eps_low;
            let hi = 1.0 + eps_high;
            let ok = lo <= rho && rho <= hi;
            (ok, 3, f64::NAN, gap(rho, lo).min(gap(rho, hi)), 0.0)
        }
        Rule::Dppo { delta } => (d <= delta, 3, delta, gap(d, delta), 0.0),
        Rule::Cppo(CppoParams { delta, delta_b, .. }) => {
            let wd = w * d;
            let token_ok = wd <= delta;
            match delta_b {
                None => (token_ok, 3, delta, gap(wd, delta), wd / delta),
                Some(_) => {
                    let s_t = s_prev + wd;
                    let budget = delta + delta_b_row * w_prev;
                    let budget_ok = s_t <= budget;
                    let c = if delta < budget - s_prev {
                        delta
                    } else {
                        budget - s_prev
                    };
                    let x = (wd / delta).max(s_t / budget);
                    (
                        token_ok && budget_ok,
                        if token_ok { 4 } else { 3 },
                        c,
                        gap(wd, delta).min(gap(s_t, budget)),
                        x,
                    )
                }
            }
        }
        Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
            (trm_stat <= delta, 3, delta, gap(trm_stat, delta), 0.0)
        }
    }
}

/// The share of its term a token keeps: all or nothing, except under `cppo_soft`, where
/// an away-moving token keeps the gate's share (the inverse gate only when it fails).
pub fn ref_share(
    rule: &Rule,
    keep: bool,
    away: bool,
    feasible: bool,
    threshold: f64,
    wd: f64,
    x: f64,
) -> f64 {
    match rule {
        Rule::Cppo(CppoParams {
            gate: Some(Gate::Sigmoid { tau }),
            ..
        }) if away => 1.0 / (1.0 + (-(threshold - wd) / tau).exp()),
        Rule::Cppo(CppoParams {
            gate: Some(Gate::Inverse),
            ..
        }) if away && !feasible => {
            if x > 1.0 {
                1.0 / x
            } else {
                1.0
            }
        }
        _ => f64::from(u8::from(keep)),
    }
}
