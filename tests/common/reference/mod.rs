//! The reference: the crate's math, token by token, written from its specification with
//! its own loops and formulas (std's `exp` and `ln`, sorting for quantiles), in f64. It
//! reads nothing from the crate but the parameters of [`Config`] and, for
//! `shuffle_seed`, the crate's permutation of positions (a definition, not a formula).
//!
//! One file per concept: [`divergence`], [`rule`] (positions, weights, the per-row
//! budget, the tests, the gates), [`objective`] (and the KL penalty); the aggregation is
//! here, with the driver.

pub mod divergence;
pub mod objective;
pub mod rule;

use cppo::ndarray::{Array1, Array2};
use cppo::{Aggregation, Config, Objective, Rule};

use super::cases::Case;
use divergence::{read_logprob, ref_divergence, ref_ratio};
use objective::{gmpo_tilde, ref_kl, ref_objective};
use rule::{gap, ref_row_budget, ref_share, ref_token_test, ref_weight};

/// Everything the reference computes. Arrays are (B, L), 0 at non-response positions.
#[derive(Clone, Debug)]
pub struct Reference {
    pub divergence: Array2<f64>,
    pub weight: Array2<f64>,
    pub threshold: Array2<f64>,
    pub keep: Array2<bool>,
    pub reason: Array2<u8>,
    pub token_loss: Array2<f64>,
    pub grad: Array2<f64>,
    /// δ_b^row (B,): NaN where the rule has no budget.
    pub delta_b_row: Array1<f64>,
    pub loss: f64,
    /// Σ |a_t| (|objective term| + |KL term|): the size of the parts summed into the
    /// loss, for tolerances. Not Σ |a_t l_t|: within one token the KL penalty can cancel
    /// the objective's term, and the loss's rounding error follows the parts' size (a
    /// one-token case with l_t = 5e-5 from parts of ±0.39 differed from the crate by
    /// 1e-12 of l_t).
    pub loss_scale: f64,
    /// The aggregation weight a_t of each token.
    pub agg: Array2<f64>,
    /// The smallest relative gap |x − y| / max(|x|, |y|) between a quantity the token's
    /// discrete choices depend on (its rule test, TRM's row statistic, the corrective
    /// bypass, `ppo_clip`'s branch) and the value it is compared with. Infinite at
    /// non-response positions and where nothing is compared.
    pub margin: Array2<f64>,
    /// The objective's branch: 0 unclipped (or no branch), 1 clipped, 2 dual-clip cap.
    pub branch: Array2<u8>,
    /// ρ_t.
    pub rho: Array2<f64>,
}

/// The aggregation weight a_t of a row with `t_row` response tokens.
pub fn ref_agg_weight(cfg: &Config, n_tok: f64, n_seq: f64, t_row: usize, width: usize) -> f64 {
    let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };
    let z = cfg.norm_length.unwrap_or(width) as f64;
    match cfg.aggregation {
        Aggregation::TokenMean => inv(n_tok),
        Aggregation::SeqMeanTokenMean => inv(n_seq) / t_row as f64,
        Aggregation::SeqMeanTokenSum => inv(n_seq),
        Aggregation::SeqMeanTokenSumNorm => inv(n_seq * z),
    }
}

/// The reference, token by token.
///
/// # Panics
///
/// On invalid input (the reference is only given valid cases).
pub fn reference(case: &Case<f64>) -> Reference {
    let cfg = &case.cfg;
    let (b, l) = case.shape();
    let zeros = || Array2::<f64>::zeros((b, l));
    let mut r = Reference {
        divergence: zeros(),
        weight: zeros(),
        threshold: zeros(),
        keep: Array2::from_elem((b, l), false),
        reason: Array2::zeros((b, l)),
        token_loss: zeros(),
        grad: zeros(),
        delta_b_row: Array1::from_elem(b, ref_row_budget(&cfg.rule, &[])),
        loss: 0.0,
        loss_scale: 0.0,
        agg: zeros(),
        margin: Array2::from_elem((b, l), f64::INFINITY),
        branch: Array2::zeros((b, l)),
        rho: zeros(),
    };

    // Counts, and the aggregation's denominators.
    let lens = case.row_lengths();
    let n_tok: usize = lens.iter().sum();
    let n_seq = lens.iter().filter(|&&t| t > 0).count();
    let n_tok = cfg.num_tokens.map_or(n_tok as f64, |n| n as f64);
    let n_seq = cfg.num_seqs.map_or(n_seq as f64, |n| n as f64);
    let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };

    let is_trm = matches!(cfg.rule, Rule::TrmMax { .. } | Rule::TrmAvg { .. });
    let mut sum_all = 0.0; // Σ m l over the batch
    let mut sum_row_means = 0.0; // Σ_rows (Σ_t m l / T_row)

    for i in 0..b {
        let cols: Vec<usize> = (0..l).filter(|&j| case.mask[[i, j]]).collect();
        let t_row = cols.len();
        if t_row == 0 {
            continue;
        }
        let lp_at = |j: usize| read_logprob(case.logp[[i, j]]);
        let lq_at = |j: usize| read_logprob(case.logp_old[[i, j]]);
        // Divergences first (TRM and the budget need the whole row's).
        let d: Vec<f64> = cols
            .iter()
            .map(|&j| {
                let topk = case.topk.as_ref().map(|(o, n)| {
                    let kk = o.dim().2;
                    let old: Vec<f64> = (0..kk).map(|k| read_logprob(o[[i, j, k]])).collect();
                    let new: Vec<f64> = (0..kk).map(|k| read_logprob(n[[i, j, k]])).collect();
                    (old, new)
                });
                let topk = topk.as_ref().map(|(o, n)| (o.as_slice(), n.as_slice()));
                ref_divergence(cfg.divergence, lp_at(j), lq_at(j), topk)
            })
            .collect();
        let delta_b_row = ref_row_budget(&cfg.rule, &d);
        r.delta_b_row[i] = delta_b_row;
        let trm_stat = match cfg.rule {
            Rule::TrmMax { .. } => d.iter().fold(0.0f64, |m, &x| if x > m { x } else { m }),
            Rule::TrmAvg { .. } => d.iter().sum::<f64>() / t_row as f64,
            _ => f64::NAN,
        };
        // GSPO's s and GMPO's R and mean advantage, over the row's response tokens.
        let r_of = |j: usize| (lp_at(j) - lq_at(j)).clamp(-20.0, 20.0);
        let seq_ratio = match cfg.objective {
            Objective::Gspo { .. } => {
                let mean = cols.iter().map(|&j| r_of(j)).sum::<f64>() / t_row as f64;
                mean.min(10.0).exp()
            }
            Objective::Gmpo { eps_low, eps_high } => {
                let sum: f64 = cols
                    .iter()
                    .map(|&j| gmpo_tilde(r_of(j), case.adv_at(i, j), eps_low, eps_high).0)
                    .sum();
                (sum / t_row as f64).exp()
            }
            _ => f64::NAN,
        };
        let adv_mean = cols.iter().map(|&j| case.adv_at(i, j)).sum::<f64>() / t_row as f64;
        let a_t = ref_agg_weight(cfg, n_tok, n_seq, t_row, l);

        let mut min_run = f64::INFINITY; // MinPRO: min ρ over the response tokens so far
        let mut s_prev = 0.0f64; // S_{t−1}
        let mut w_prev = 0.0f64; // W_{t−1}
        let mut row_sum = 0.0;
        for (idx, &j) in cols.iter().enumerate() {
            let t = idx + 1;
            let (lp, lq) = (lp_at(j), lq_at(j));
            let a = case.adv_at(i, j);
            assert!(a.is_finite(), "the reference was given advantage {a}");
            let rho = ref_ratio(lp, lq);
            let away = a * (rho - 1.0) > 0.0;
            let w = ref_weight(&cfg.rule, t, j, t_row, l);
            let dj = d[idx];

            let (feasible, fail, threshold, mut margin, x) =
                ref_token_test(&cfg.rule, rho, dj, w, s_prev, w_prev, delta_b_row, trm_stat);
            s_prev += w * dj;
            w_prev += w;

            let reason = if feasible {
                1
            } else if !away && !is_trm {
                2
            } else {
                fail
            };
            if !feasible && !is_trm && a != 0.0 && lp != lq {
                margin = margin.min(gap(rho, 1.0));
            }
            let keep = reason == 1 || reason == 2;

            let (lo, go, branch, obj_margin) = match cfg.objective {
                Objective::Gspo { eps_low, eps_high } => ref_objective(
                    &Objective::PpoClip {
                        eps_low,
                        eps_high,
                        dual_clip: None,
                    },
                    seq_ratio,
                    a,
                    lp,
                ),
                Objective::Gmpo { eps_low, eps_high } => {
                    let (_, unclipped) = gmpo_tilde(r_of(j), a, eps_low, eps_high);
                    let g = if unclipped {
                        -adv_mean * seq_ratio
                    } else {
                        0.0
                    };
                    (-a * seq_ratio, g, u8::from(!unclipped), f64::INFINITY)
                }
                Objective::Minpro {
                    include_current,
                    clip,
                    ..
                } => {
                    let with_t = if rho < min_run { rho } else { min_run };
                    let m = if include_current { with_t } else { min_run };
                    let m = if m.is_infinite() { 1.0 } else { m };
                    let cap = clip.map_or(f64::INFINITY, |c| 1.0 + c);
                    let omega = if m > cap { cap } else { m };
                    min_run = with_t;
                    (
                        -omega * a * lp,
                        -omega * a,
                        u8::from(m > cap),
                        f64::INFINITY,
                    )
                }
                _ => ref_objective(&cfg.objective, rho, a, lp),
            };
            let weight = case.is_weights.as_ref().map_or(1.0, |w| w[[i, j]]);
            let share = ref_share(&cfg.rule, keep, away, feasible, threshold, w * dj, x) * weight;
            let (mut tl, mut g) = if share > 0.0 {
                (share * lo, share * go)
            } else {
                (0.0, 0.0)
            };
            if keep {
                margin = margin.min(obj_margin);
            }
            // The size of the token's parts, before the KL term can cancel the
            // objective's.
            let mut parts = tl.abs();
            if let Some(kl) = &cfg.kl {
                let lr = read_logprob(case.logp_ref.as_ref().expect("logp_ref")[[i, j]]);
                let (kl_l, kl_g) = ref_kl(kl, lp, lr);
                tl += kl_l;
                g += kl_g;
                parts += kl_l.abs();
            }

            r.divergence[[i, j]] = dj;
            r.weight[[i, j]] = w;
            r.threshold[[i, j]] = threshold;
            r.keep[[i, j]] = keep;
            r.reason[[i, j]] = reason;
            r.token_loss[[i, j]] = tl;
            r.grad[[i, j]] = g * a_t;
            r.agg[[i, j]] = a_t;
            r.margin[[i, j]] = margin;
            r.branch[[i, j]] = if keep { branch } else { 0 };
            r.rho[[i, j]] = rho;
            r.loss_scale += a_t.abs() * parts;
            row_sum += tl;
        }
        sum_all += row_sum;
        sum_row_means += row_sum / t_row as f64;
    }

    let z = cfg.norm_length.unwrap_or(l) as f64;
    r.loss = match cfg.aggregation {
        Aggregation::TokenMean => sum_all * inv(n_tok),
        Aggregation::SeqMeanTokenMean => sum_row_means * inv(n_seq),
        Aggregation::SeqMeanTokenSum => sum_all * inv(n_seq),
        Aggregation::SeqMeanTokenSumNorm => sum_all * inv(n_seq * z),
    };
    r
}
