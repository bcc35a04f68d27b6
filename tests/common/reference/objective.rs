//! The objectives' per-token terms and the KL penalty, from the formulas.

use cppo::{KlEstimator, KlPenalty, Objective};

use super::rule::gap;

/// One kept token's objective: (l, g, branch, branch margin).
pub fn ref_objective(obj: &Objective, rho: f64, a: f64, lp: f64) -> (f64, f64, u8, f64) {
    match *obj {
        Objective::Surrogate => (-rho * a, -rho * a, 0, f64::INFINITY),
        Objective::DetachedIs { ratio_cap } => {
            let wt = if rho < ratio_cap { rho } else { ratio_cap };
            (-wt * a * lp, -wt * a, 0, f64::INFINITY)
        }
        Objective::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            let lo = 1.0 - eps_low;
            let hi = 1.0 + eps_high;
            let clipped_rho = if rho < lo {
                lo
            } else if rho > hi {
                hi
            } else {
                rho
            };
            let unclipped = -rho * a;
            let clipped = -clipped_rho * a;
            // The max of the two; the unclipped branch (with its gradient) unless the
            // clipped one is strictly larger.
            let (mut l, mut g, mut br) = if clipped > unclipped {
                (clipped, 0.0, 1)
            } else {
                (unclipped, unclipped, 0)
            };
            let mut margin = gap(rho, lo).min(gap(rho, hi));
            if let Some(c) = dual_clip
                && a < 0.0
            {
                let cap = -c * a;
                margin = margin.min(gap(cap, l));
                if cap < l {
                    l = cap;
                    g = 0.0;
                    br = 2;
                }
            }
            (l, g, br, margin)
        }
        Objective::Cispo { eps_high } => {
            let cap = 1.0 + eps_high;
            let wt = if rho < cap { rho } else { cap };
            (-wt * a * lp, -wt * a, u8::from(rho > cap), f64::INFINITY)
        }
        Objective::Gspo { .. } | Objective::Gmpo { .. } | Objective::Minpro { .. } => {
            unreachable!("row-dependent objectives are evaluated in the row loop")
        }
        Objective::Sapo { tau_pos, tau_neg } => {
            // f(ρ) = (4/τ) σ(τ(ρ − 1)), f'(ρ) = 4 σ (1 − σ); l = −A f(ρ), dl/dlogp = −A f'(ρ) ρ.
            let tau = if a > 0.0 { tau_pos } else { tau_neg };
            let sig = 1.0 / (1.0 + (-tau * (rho - 1.0)).exp());
            (
                -a * 4.0 / tau * sig,
                -a * 4.0 * sig * (1.0 - sig) * rho,
                0,
                f64::INFINITY,
            )
        }
    }
}

/// The KL penalty's (l, g) with x = logp_ref − logp, clamped to ±20.
pub fn ref_kl(kl: &KlPenalty, lp: f64, lr: f64) -> (f64, f64) {
    let beta = kl.coef;
    let x = (lr - lp).clamp(-20.0, 20.0);
    match kl.estimator {
        KlEstimator::K1 => (-beta * x, beta),
        KlEstimator::K2 => (beta * x * x / 2.0, -beta * x),
        // e^x − x − 1 and 1 − e^x through exp_m1: both vanish to second and first order
        // at x = 0, where exp(x) − 1 would lose all digits.
        KlEstimator::K3 => (beta * (x.exp_m1() - x), -beta * x.exp_m1()),
    }
}

/// GMPO's r̃ = sgn(A) min(sgn(A) r, sgn(A) clamp(r, −ε_low, ε_high)) and whether the
/// unclipped branch was taken.
pub fn gmpo_tilde(r: f64, a: f64, lo: f64, hi: f64) -> (f64, bool) {
    let c = r.max(-lo).min(hi);
    let sg = if a > 0.0 {
        1.0
    } else if a < 0.0 {
        -1.0
    } else {
        0.0
    };
    if sg == 0.0 {
        (0.0, true)
    } else if sg * r <= sg * c {
        (r, true)
    } else {
        (c, false)
    }
}
