//! The objective's terms of a block, the KL penalty's, and MinPRO's gradient through the
//! prefix minimum (the block forms of [`crate::objective`]'s formulas; a unit test holds
//! them equal).

// The passes index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::lanes::InStage;
use super::row_stats::RowFacts;
use super::rule::kept;
use super::{BLK, Work};
use crate::config::Config;
use crate::float::Float;
use crate::objective::{KlEstimator, KlPenalty, LOG_RATIO_CLAMP, Objective, gmpo_log_ratio};
use crate::outputs::RowOut;
use crate::simd::{exp_to, expm1_to};

/// The objective's loss and gradient of each token, times the share `m` it keeps (0
/// where it is masked: exactly +0, not −0).
#[inline(always)]
pub(crate) fn objective_terms(
    cfg: &Config,
    facts: &RowFacts,
    st: &InStage,
    wk: &mut Work,
    n: usize,
    min_ratio: &mut f64,
) {
    let (loss, grad, clipped, m) = (&mut wk.loss, &mut wk.grad, &mut wk.clipped, &wk.m);
    let (lower, code) = (&mut wk.lower, &wk.code);
    let keep = |k: usize, x: f64| if m[k] > 0.0 { m[k] * x } else { 0.0 };
    lower[..n].fill(false);
    match cfg.objective {
        Objective::Surrogate => {
            for k in 0..n {
                let g = -st.rho[k] * st.adv[k];
                loss[k] = keep(k, g);
                grad[k] = keep(k, g);
                clipped[k] = false;
            }
        }
        Objective::DetachedIs { ratio_cap } => {
            for k in 0..n {
                let g = -st.rho[k].min(ratio_cap) * st.adv[k];
                loss[k] = keep(k, g * st.lp[k]);
                grad[k] = keep(k, g);
                clipped[k] = false;
                // verl's pg_clipfrac_lower: kept tokens whose ratio the cap truncates.
                lower[k] = (st.rho[k] > ratio_cap) & kept(code[k]);
            }
        }
        Objective::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            // `Objective::eval`'s operations, written out so that the loop vectorizes;
            // without a dual clip its cap is NaN and never taken.
            let (lo, hi) = (1.0 - eps_low, 1.0 + eps_high);
            let dual = dual_clip.unwrap_or(f64::NAN);
            for k in 0..n {
                let (rho, adv) = (st.rho[k], st.adv[k]);
                let unclipped = -rho * adv;
                let clipped_v = -rho.clamp(lo, hi) * adv;
                let take = unclipped >= clipped_v;
                let (l, g) = if take {
                    (unclipped, unclipped)
                } else {
                    (clipped_v, 0.0)
                };
                let cap = -dual * adv;
                let capped = (adv < 0.0) & (cap < l);
                loss[k] = keep(k, if capped { cap } else { l });
                grad[k] = keep(k, if capped { 0.0 } else { g });
                clipped[k] = (!take | capped) & st.on[k];
                lower[k] = capped & st.on[k];
            }
        }
        Objective::Cispo { eps_high } => {
            let cap = 1.0 + eps_high;
            for k in 0..n {
                let rho = st.rho[k];
                let g = -rho.min(cap) * st.adv[k];
                loss[k] = keep(k, g * st.lp[k]);
                grad[k] = keep(k, g);
                clipped[k] = (rho > cap) & st.on[k];
            }
        }
        Objective::Sapo { tau_pos, tau_neg } => {
            // `Objective::eval`'s formula with the block's e^{−τ(ρ − 1)} in one SIMD call.
            let mut neg_z = [0.0f64; BLK];
            let mut tau = [0.0f64; BLK];
            for k in 0..n {
                tau[k] = if st.adv[k] > 0.0 { tau_pos } else { tau_neg };
                neg_z[k] = -tau[k] * (st.rho[k] - 1.0);
            }
            let mut e = [0.0f64; BLK];
            exp_to(&neg_z[..n], &mut e[..n]);
            for k in 0..n {
                let (rho, adv) = (st.rho[k], st.adv[k]);
                let sig = 1.0 / (1.0 + e[k]);
                loss[k] = keep(k, -adv * (4.0 / tau[k]) * sig);
                grad[k] = keep(k, -4.0 * adv * rho * sig * (1.0 - sig));
                clipped[k] = false;
            }
        }
        Objective::Gspo { eps_low, eps_high } => {
            // PPO's clip on the row's sequence ratio s; ∂s_t/∂logp_t = s (token-level form).
            let clip = Objective::PpoClip {
                eps_low,
                eps_high,
                dual_clip: None,
            };
            for k in 0..n {
                let term = clip.eval(facts.seq_ratio, st.adv[k], st.lp[k]);
                loss[k] = keep(k, term.loss);
                grad[k] = keep(k, term.grad);
                clipped[k] = term.clipped & st.on[k];
            }
        }
        Objective::Minpro {
            include_current,
            clip,
            stop_gradient,
        } => {
            // The running minimum of ρ over the row's response tokens: sequential. With
            // the weight detached, l = −ω A logp and g = −ω A; without, l = −ω A and the
            // gradient goes to the token holding the minimum (`MinproGrad`).
            let cap = clip.map_or(f64::INFINITY, |c| 1.0 + c);
            let mut m_run = *min_ratio;
            for k in 0..n {
                let rho = st.rho[k];
                let with = if rho < m_run { rho } else { m_run };
                let m_t = if include_current { with } else { m_run };
                let m_t = if m_t == f64::INFINITY { 1.0 } else { m_t };
                let omega = if m_t > cap { cap } else { m_t };
                let g = -omega * st.adv[k];
                if stop_gradient {
                    loss[k] = keep(k, g * st.lp[k]);
                    grad[k] = keep(k, g);
                } else {
                    loss[k] = keep(k, g);
                    grad[k] = 0.0;
                }
                clipped[k] = (m_t > cap) & st.on[k];
                if st.on[k] {
                    m_run = with;
                }
            }
            *min_ratio = m_run;
        }
        Objective::Gmpo { eps_low, eps_high } => {
            let big_r = facts.seq_ratio;
            for k in 0..n {
                let (_, unclipped) = gmpo_log_ratio(st.log_ratio[k], st.adv[k], eps_low, eps_high);
                loss[k] = keep(k, -st.adv[k] * big_r);
                let g = if unclipped {
                    -facts.adv_mean * big_r
                } else {
                    0.0
                };
                grad[k] = keep(k, g);
                clipped[k] = !unclipped & st.on[k];
            }
        }
    }
}

/// The KL penalty's loss and gradient added to the block's terms, on every response
/// token (not masked, not weighted).
#[inline(always)]
pub(crate) fn kl_terms(kl: &KlPenalty, st: &InStage, wk: &mut Work) {
    let n = st.n;
    if kl.estimator == KlEstimator::K3 {
        // `KlPenalty::eval`'s k3 with the block's e^x − 1 in one SIMD call.
        let mut x = [0.0f64; BLK];
        for k in 0..n {
            x[k] = if st.on[k] {
                (wk.lref[k] - st.lp[k]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            } else {
                0.0
            };
        }
        let mut em1 = [0.0f64; BLK];
        expm1_to(&x[..n], &mut em1[..n]);
        let beta = kl.coef;
        for k in 0..n {
            if st.on[k] {
                wk.loss[k] += beta * (em1[k] - x[k]);
                wk.grad[k] += -beta * em1[k];
            }
        }
    } else {
        for k in 0..n {
            if st.on[k] {
                let (lk, gk) = kl.eval(st.lp[k], wk.lref[k]);
                wk.loss[k] += lk;
                wk.grad[k] += gk;
            }
        }
    }
}

/// MinPRO without the stop-gradient: token t's loss −ω_t A_t depends on the log-prob of
/// the token s holding its prefix minimum (∂ω_t/∂logp_s = ρ_s where ω_t is not capped).
/// Tokens pass the minimum on in runs, so the contributions to the current holder add up
/// in `acc` and go to its column when the minimum moves on or the row ends: into the
/// staged block when the holder is in it, into the output lane when it was stored
/// already. Whole rows only (a holder in an earlier column chunk is out of reach).
pub(crate) struct MinproGrad {
    include_current: bool,
    cap: f64,
    /// The running minimum and the column holding it.
    m: f64,
    holder: Option<usize>,
    /// The holder's own g (its KL term) and the contributions so far, in g units.
    base: f64,
    acc: f64,
}

impl MinproGrad {
    pub(crate) fn for_config(cfg: &Config, m: f64) -> Option<Self> {
        match cfg.objective {
            Objective::Minpro {
                include_current,
                clip,
                stop_gradient: false,
            } => Some(Self {
                include_current,
                cap: clip.map_or(f64::INFINITY, |c| 1.0 + c),
                m,
                holder: None,
                base: 0.0,
                acc: 0.0,
            }),
            _ => None,
        }
    }

    /// Writes the current holder's gradient and makes `next` (column, own g) the holder.
    pub(crate) fn flush<F: Float>(
        &mut self,
        next: Option<(usize, f64)>,
        wk: &mut Work,
        j0: usize,
        agg_w: f64,
        out: &mut RowOut<'_, F>,
    ) {
        if let Some(col) = self.holder {
            let g = self.base + self.acc;
            if col >= j0 && next.is_some() {
                wk.grad[col - j0] = g;
            } else if let Some(lane) = &mut out.grad {
                lane.set(col, F::from_f64(g * agg_w));
            }
        }
        (self.holder, self.base, self.acc) = match next {
            Some((col, own)) => (Some(col), own, 0.0),
            None => (None, 0.0, 0.0),
        };
    }

    /// One block, after the objective and KL terms: moves the minimum along and adds each
    /// token's contribution to its holder.
    pub(crate) fn block<F: Float>(
        &mut self,
        st: &InStage,
        wk: &mut Work,
        n: usize,
        j0: usize,
        agg_w: f64,
        out: &mut RowOut<'_, F>,
    ) {
        for k in 0..n {
            if !st.on[k] {
                continue;
            }
            let rho = st.rho[k];
            let new_min = rho < self.m;
            if self.include_current && new_min {
                self.m = rho;
                self.flush(Some((j0 + k, wk.grad[k])), wk, j0, agg_w, out);
            }
            if self.holder.is_some() && self.m <= self.cap {
                self.acc += wk.m[k] * -st.adv[k] * self.m;
            }
            if !self.include_current && new_min {
                self.m = rho;
                self.flush(Some((j0 + k, wk.grad[k])), wk, j0, agg_w, out);
            }
        }
    }
}
