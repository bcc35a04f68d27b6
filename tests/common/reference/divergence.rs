//! The divergences D_t, from the formulas, with std's `exp` and `ln`.

use cppo::Divergence;

/// A log-prob as the crate reads it: (0, 1e-4] is 0.
pub fn read_logprob(x: f64) -> f64 {
    assert!(
        x.is_finite() && x <= 1e-4,
        "the reference was given an invalid log-prob {x}"
    );
    if x > 0.0 { 0.0 } else { x }
}

pub fn ref_binary_tv(lp: f64, lq: f64) -> f64 {
    let p = lp.exp();
    let q = lq.exp();
    (p - q).abs()
}

/// KL(Bernoulli(q) ‖ Bernoulli(p)) with the 1e-8 guard; log q is logp_old itself.
pub fn ref_binary_kl(lp: f64, lq: f64) -> f64 {
    let p = lp.exp();
    let q = lq.exp();
    let head = q * (lq - lp);
    let tail = (1.0 - q) * ((1.0 - q + 1e-8) / (1.0 - p + 1e-8)).ln();
    let d = head + tail;
    if d > 0.0 { d } else { 0.0 }
}

/// (Σ_k |P_k − Q_k| + |P_rest − Q_rest|) / 2.
pub fn ref_topk_tv(old: &[f64], new: &[f64]) -> f64 {
    let mut l1 = 0.0;
    let mut sp = 0.0;
    let mut sq = 0.0;
    for k in 0..old.len() {
        let pk = old[k].exp();
        let qk = new[k].exp();
        l1 += (pk - qk).abs();
        sp += pk;
        sq += qk;
    }
    let p_rest = if 1.0 - sp > 0.0 { 1.0 - sp } else { 0.0 };
    let q_rest = if 1.0 - sq > 0.0 { 1.0 - sq } else { 0.0 };
    (l1 + (p_rest - q_rest).abs()) / 2.0
}

/// Σ_k P_k (log P_k − log Q_k) + P_rest (log P_rest − log max(Q_rest, 1e-12)), at least 0;
/// the rest term is 0 when P_rest = 0.
pub fn ref_topk_kl(old: &[f64], new: &[f64]) -> f64 {
    let mut head = 0.0;
    let mut sp = 0.0;
    let mut sq = 0.0;
    for k in 0..old.len() {
        let pk = old[k].exp();
        head += pk * (old[k] - new[k]);
        sp += pk;
        sq += new[k].exp();
    }
    let p_rest = if 1.0 - sp > 0.0 { 1.0 - sp } else { 0.0 };
    let q_rest = if 1.0 - sq > 0.0 { 1.0 - sq } else { 0.0 };
    let rest = if p_rest == 0.0 {
        0.0
    } else {
        let q_floor = if q_rest < 1e-12 { 1e-12 } else { q_rest };
        p_rest * (p_rest.ln() - q_floor.ln())
    };
    let d = head + rest;
    if d > 0.0 { d } else { 0.0 }
}

/// ρ = exp(clamp(logp − logp_old, −20, 20)).
pub fn ref_ratio(lp: f64, lq: f64) -> f64 {
    (lp - lq).clamp(-20.0, 20.0).exp()
}

/// D_t of one token: the log-probs, and the top-K pair's entries when the divergence
/// reads them.
pub fn ref_divergence(div: Divergence, lp: f64, lq: f64, topk: Option<(&[f64], &[f64])>) -> f64 {
    let r = (lp - lq).clamp(-20.0, 20.0);
    match div {
        Divergence::K2 => r * r / 2.0,
        Divergence::K3 => {
            let d = r.exp() - 1.0 - r;
            if d > 0.0 { d } else { 0.0 }
        }
        Divergence::BinaryTv => ref_binary_tv(lp, lq),
        Divergence::BinaryKl => ref_binary_kl(lp, lq),
        Divergence::TopkTv | Divergence::TopkKl => {
            let (old, new) = topk.expect("top-K arrays");
            if div == Divergence::TopkTv {
                ref_topk_tv(old, new)
            } else {
                ref_topk_kl(old, new)
            }
        }
    }
}
