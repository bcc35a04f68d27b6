//! The kernel's own tests: every CPU build gives the same bits, and the block forms of
//! the passes equal the scalar formulas of the public modules (`divergence`, `schedule`,
//! `rule`, `objective`) bit for bit.

use ndarray::{Array1, Array2, Array3};

use super::lanes::{InStage, Probs, RowIn};
use super::row_stats::{RowFacts, whole_row_facts};
use super::*;
use crate::batch::Batch;
use crate::budget::Calibration;
use crate::divergence::Divergence;
use crate::engine::{Par, evaluate};
use crate::error::Error;
use crate::float::Numerics;
use crate::objective::{KlEstimator, KlPenalty, Objective};
use crate::outputs::Outputs;
use crate::rule::{CppoParams, Gate, Rule, cppo_test, cppo_threshold, inverse_gate};
use crate::schedule::{Positions, Schedule, TokenPos};

/// The builds of the row pass this CPU can run: the baseline always, and the AVX2 and
/// AVX-512 ones where supported.
fn builds() -> Vec<Isa> {
    let best = isa();
    let mut v = vec![Isa::Base];
    if best != Isa::Base {
        v.push(Isa::Avx2);
    }
    if best == Isa::Avx512 {
        v.push(Isa::Avx512);
    }
    v
}

fn same(a: &Array2<f64>, b: &Array2<f64>) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Every build of the row pass (baseline, AVX2, AVX-512, as far as this CPU has them)
/// gives the same bits as the dispatched one, for every rule and objective, under both
/// numerics.
#[test]
fn baseline_and_dispatched_row_passes_agree() {
    let (b, l, kk) = (5, 150, 3);
    let lq = Array2::from_shape_fn((b, l), |(i, j)| {
        -0.02 - ((i * 13 + j * 7) % 29) as f64 * 0.11
    });
    let lp = Array2::from_shape_fn((b, l), |(i, j)| {
        lq[[i, j]] + (((i * 5 + j * 3) % 17) as f64 - 8.0) * 0.04
    });
    let lp = lp.mapv(|x| x.min(0.0));
    let lr = lq.mapv(|x| x - 0.05);
    let isw = Array2::from_shape_fn((b, l), |(i, j)| 0.5 + ((i + j) % 5) as f64 * 0.25);
    let adv = Array1::from_shape_fn(b, |i| [1.0, -0.5, 0.0, 2.0, -1.5][i]);
    let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - 9 * i && j % 13 != 5);
    let to = Array3::from_shape_fn((b, l, kk), |(_, _, k)| -0.7 - k as f64 * 0.9);
    let tn = Array3::from_shape_fn((b, l, kk), |(i, j, k)| {
        -0.75 - k as f64 * 0.85 + ((i + j) % 3) as f64 * 0.01
    });
    let batch = Batch::new(&lp, &lq, &adv, &mask)
        .unwrap()
        .with_topk(&to, &tn)
        .unwrap()
        .with_logp_ref(&lr)
        .unwrap()
        .with_is_weights(&isw)
        .unwrap();
    let cppo = |gate, positions, calibration, shuffle_seed| {
        Rule::Cppo(CppoParams {
            delta: 0.1,
            delta_b: Some(0.02),
            w_min: 0.7,
            horizon: None,
            positions,
            calibration,
            shuffle_seed,
            gate,
        })
    };
    let rules = [
        Rule::None,
        Rule::Ratio {
            eps_low: 0.2,
            eps_high: 0.2,
        },
        Rule::Dppo { delta: 0.1 },
        Rule::default(),
        cppo(
            Some(Gate::Sigmoid { tau: 0.01 }),
            Positions::Response,
            None,
            Some(9),
        ),
        cppo(
            Some(Gate::Inverse),
            Positions::Column,
            Some(Calibration::default()),
            None,
        ),
        cppo(None, Positions::Column, None, Some(3)),
        Rule::TrmAvg { delta: 0.05 },
    ];
    let objectives = [
        Objective::Surrogate,
        Objective::PpoClip {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
        },
        Objective::Gspo {
            eps_low: 0.1,
            eps_high: 0.1,
        },
        Objective::Gmpo {
            eps_low: 0.3,
            eps_high: 0.3,
        },
        Objective::Minpro {
            include_current: true,
            clip: Some(0.2),
            stop_gradient: true,
        },
        Objective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        Objective::DetachedIs { ratio_cap: 1.5 },
    ];
    let divergences = [
        Divergence::BinaryTv,
        Divergence::BinaryKl,
        Divergence::TopkTv,
        Divergence::K3,
    ];
    let numerics = [Numerics::Exact, Numerics::F32Exp];
    for (divergence, numerics) in divergences
        .into_iter()
        .flat_map(|d| numerics.map(|n| (d, n)))
    {
        for (rule, objective) in rules
            .iter()
            .zip(objectives.iter().cycle().skip(divergence as usize))
        {
            let cfg = Config {
                divergence,
                rule: *rule,
                objective: *objective,
                kl: Some(KlPenalty {
                    estimator: KlEstimator::K3,
                    coef: 0.1,
                }),
                numerics,
                ..Config::cppo()
            };
            let want = evaluate(&cfg, &batch, Par::Seq).unwrap();
            // Each build, with the main sweep computing p and q itself and with it
            // reading those the first sweep kept (a calibrated budget on a binary
            // divergence), gives `evaluate`'s bits.
            for (build, cached) in builds().into_iter().flat_map(|b| [(b, false), (b, true)]) {
                let mut got = Outputs::<f64>::zeros((b, l));
                let plan = Plan {
                    cfg: &cfg,
                    denominators: Counts {
                        tokens: want.tally.tokens,
                        seqs: want.tally.seqs,
                    },
                    width: l,
                    col0: 0,
                };
                let mut views = got.view_mut();
                for i in 0..b {
                    let row = RowIn::new(&cfg, &batch, i, 0).unwrap();
                    let row_len = mask.row(i).iter().filter(|&&x| x).count();
                    let mut probs = Probs::default();
                    let facts =
                        whole_row_facts(&cfg, &row, row_len, cached.then_some(&mut probs)).unwrap();
                    let kept = probs.filled.then_some(&probs);
                    let calibrated_binary = cfg.rule.cppo_params().is_some_and(|p| {
                        p.active_calibration().is_some()
                            && matches!(divergence, Divergence::BinaryTv | Divergence::BinaryKl)
                            && !matches!(objective, Objective::Gspo { .. } | Objective::Gmpo { .. })
                    });
                    assert_eq!(
                        kept.is_some(),
                        cached && calibrated_binary && row_len > 0,
                        "{cfg:?}"
                    );
                    let out = views.row(i);
                    let prefix = &mut Prefix::default();
                    match build {
                        Isa::Base => run_row_impl(&plan, &row, &facts, prefix, out, kept),
                        // SAFETY: `builds` lists only what the CPU supports.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe {
                            run_row_avx2(&plan, &row, &facts, prefix, out, kept)
                        },
                        // SAFETY: as above.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe {
                            run_row_avx512(&plan, &row, &facts, prefix, out, kept)
                        },
                        #[cfg(not(target_arch = "x86_64"))]
                        _ => run_row_impl(&plan, &row, &facts, prefix, out, kept),
                    }
                    .unwrap();
                }
                assert!(same(&got.grad, &want.outputs.grad), "{build:?} {cfg:?}");
                assert!(same(&got.token_loss, &want.outputs.token_loss), "{cfg:?}");
                assert!(same(&got.divergence, &want.outputs.divergence), "{cfg:?}");
                assert!(same(&got.weight, &want.outputs.weight), "{cfg:?}");
                assert!(same(&got.threshold, &want.outputs.threshold), "{cfg:?}");
                assert_eq!(got.reason, want.outputs.reason, "{cfg:?}");
                let bits = |a: &Array1<f64>| a.mapv(f64::to_bits);
                assert_eq!(bits(&got.delta_b_row), bits(&want.outputs.delta_b_row));
            }
        }
    }
}

/// The fast conversion of `to_fixed` is `(x · 2^64).round() as i128`, ties and the edges
/// of its range included.
#[test]
fn to_fixed_is_the_rounded_product() {
    use super::row_stats::to_fixed;
    const FIXED_ONE: f64 = 18_446_744_073_709_551_616.0;
    let slow = |x: f64| (x * FIXED_ONE).round() as i128;
    let mut xs = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f64::MIN_POSITIVE,
        2_147_483_647.999_999_8,
        -2_147_483_647.999_999_8,
        2_147_483_648.0,
        -2_147_483_648.0,
        1e300,
        -1e300,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ];
    // Ties: odd multiples of 2^−65 round away from zero.
    for k in [1u64, 3, 5, 7, 1 << 20 | 1, (1 << 40) + 1] {
        let x = k as f64 * 2f64.powi(-65);
        xs.extend([x, -x]);
    }
    // A spread of magnitudes and mantissas.
    let mut u = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20_000 {
        u ^= u << 13;
        u ^= u >> 7;
        u ^= u << 17;
        let mant = 1.0 + (u >> 12) as f64 / (1u64 << 52) as f64;
        let exp = (u % 100) as i32 - 70;
        let x = mant * 2f64.powi(exp);
        xs.extend([x, -x]);
    }
    for x in xs {
        assert_eq!(to_fixed(x), slow(x), "x = {x:e}");
    }
}

/// Blocks of padding alone are skipped (zeros out, nothing tallied): the results equal
/// those of the same batch with clean padding, every response token is counted, and a
/// non-finite float mask value in a padding stretch is still an error.
#[test]
fn padding_blocks_are_skipped_but_checked() {
    let (b, l) = (3, 300);
    let on = |i: usize, j: usize| match i {
        0 => j < 10,
        1 => j == 299,
        _ => (100..140).contains(&j) || j == 250,
    };
    let mask = Array2::from_shape_fn((b, l), |(i, j)| if on(i, j) { 1.0 } else { 0.0 });
    let lq = Array2::from_shape_fn((b, l), |(i, j)| -0.05 - ((i + j) % 7) as f64 * 0.2);
    let lp = Array2::from_shape_fn((b, l), |(i, j)| (lq[[i, j]] + 0.03).min(0.0));
    let garbage = |a: &Array2<f64>| {
        Array2::from_shape_fn((b, l), |(i, j)| if on(i, j) { a[[i, j]] } else { f64::NAN })
    };
    let adv = Array1::from(vec![1.0, -1.0, 0.5]);
    let (to, tn) = (
        Array3::from_shape_fn(
            (b, l, 4),
            |(i, j, k)| {
                if on(i, j) { -0.3 - k as f64 } else { f64::NAN }
            },
        ),
        Array3::from_shape_fn(
            (b, l, 4),
            |(i, j, k)| {
                if on(i, j) { -0.35 - k as f64 } else { 7.0 }
            },
        ),
    );
    let (lp_g, lq_g) = (garbage(&lp), garbage(&lq));
    let (to_c, tn_c) = (to.mapv(|x| x.min(0.0)), tn.mapv(|x| x.min(0.0)));
    for divergence in [Divergence::BinaryTv, Divergence::TopkTv] {
        for rule in [Rule::default(), Rule::TrmAvg { delta: 0.05 }] {
            let cfg = Config {
                divergence,
                rule,
                ..Config::cppo()
            };
            let clean = Batch::new(&lp, &lq, &adv, &mask)
                .unwrap()
                .with_topk(&to_c, &tn_c)
                .unwrap();
            let dirty = Batch::new(&lp_g, &lq_g, &adv, &mask)
                .unwrap()
                .with_topk(&to, &tn)
                .unwrap();
            let want = evaluate(&cfg, &clean, Par::Seq).unwrap();
            let got = evaluate(&cfg, &dirty, Par::Seq).unwrap();
            assert_eq!(format!("{:?}", got.outputs), format!("{:?}", want.outputs));
            assert_eq!(format!("{:?}", got.tally), format!("{:?}", want.tally));
            assert_eq!(want.tally.tokens, 10 + 1 + 41);
            let mut bad_mask = mask.clone();
            bad_mask[[1, 200]] = f64::NAN;
            let bad = Batch::new(&lp, &lq, &adv, &bad_mask).unwrap();
            let bad = bad.with_topk(&to, &tn).unwrap();
            match evaluate(&cfg, &bad, Par::Seq) {
                Err(Error::NonFinite {
                    array: "mask", at, ..
                }) => {
                    assert_eq!((at.row, at.col), (1, 200));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// The objective's block loops give `Objective::eval`'s bits, on both sides of every
/// clip and of the dual clip, for kept and masked tokens.
#[test]
fn objective_loops_match_eval() {
    let objectives = [
        Objective::PpoClip {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: None,
        },
        Objective::PpoClip {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
        },
        Objective::Cispo { eps_high: 0.28 },
        Objective::Surrogate,
        Objective::DetachedIs { ratio_cap: 2.0 },
        Objective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
    ];
    let rhos = [0.01, 0.79, 0.81, 1.0, 1.27, 1.29, 2.9, 3.1, 40.0];
    let advs = [-2.0, -1.0, -0.1, 0.0, 0.3, 1.0, 2.5];
    let facts = RowFacts {
        row_len: 1,
        row_ok: true,
        seq_ratio: 1.0,
        adv_mean: 0.0,
        delta_b: None,
    };
    for objective in objectives {
        let cfg = Config {
            objective,
            ..Config::cppo()
        };
        let mut st = InStage::new();
        let mut wk = Work::new();
        let mut n = 0;
        for (i, &rho) in rhos.iter().enumerate() {
            for (j, &adv) in advs.iter().enumerate() {
                if n == BLK {
                    break;
                }
                st.rho[n] = rho;
                st.adv[n] = adv;
                st.lp[n] = -0.1 - 0.05 * i as f64;
                st.on[n] = (i + j) % 5 != 0;
                wk.m[n] = if (i * 7 + j) % 6 == 0 { 0.0 } else { 1.0 };
                n += 1;
            }
        }
        let mut min_ratio = f64::INFINITY;
        objective_terms(&cfg, &facts, &st, &mut wk, n, &mut min_ratio);
        for k in 0..n {
            let term = objective.eval(st.rho[k], st.adv[k], st.lp[k]);
            let kept = |x: f64| if wk.m[k] > 0.0 { x } else { 0.0 };
            let at = format!("{objective:?} rho {} adv {}", st.rho[k], st.adv[k]);
            // SAPO's block exponential is the kernel's own; within 2 ulp of std's.
            if matches!(objective, Objective::Sapo { .. }) {
                let close = |a: f64, b: f64| (a - b).abs() <= 4e-16 * a.abs().max(b.abs());
                assert!(close(wk.loss[k], kept(term.loss)), "{at}");
                assert!(close(wk.grad[k], kept(term.grad)), "{at}");
                continue;
            }
            assert_eq!(wk.loss[k].to_bits(), kept(term.loss).to_bits(), "{at}");
            assert_eq!(wk.grad[k].to_bits(), kept(term.grad).to_bits(), "{at}");
            assert_eq!(wk.clipped[k], term.clipped & st.on[k], "{at}");
        }
    }
}

/// The block weights are `Schedule::weight`'s, for both position conventions, fixed
/// and row horizons, with and without a shuffle, in whole rows and in chunks.
#[test]
fn block_weights_match_the_schedule() {
    for positions in [Positions::Response, Positions::Column] {
        for horizon in [None, Some(1), Some(7), Some(500)] {
            for shuffle_seed in [None, Some(11)] {
                for w_min in [0.3, 0.8, 1.0] {
                    let p = CppoParams {
                        w_min,
                        horizon,
                        positions,
                        shuffle_seed,
                        ..CppoParams::default()
                    };
                    let s = Schedule::Linear {
                        w_min,
                        horizon,
                        positions,
                    };
                    let (row_len, width) = (90, 200);
                    for col in [0usize, 64, 130] {
                        let mut t = [0usize; BLK];
                        for (k, x) in t.iter_mut().enumerate() {
                            *x = (col / 2 + k).min(row_len);
                        }
                        let mut w = [0.0; BLK];
                        super::schedule::block_weights(&p, &t, BLK, col, row_len, width, &mut w);
                        for k in 0..BLK {
                            let n_pos = match positions {
                                Positions::Response => row_len,
                                Positions::Column => width,
                            };
                            let raw = match positions {
                                Positions::Response => t[k],
                                Positions::Column => col + k + 1,
                            };
                            let pos = match shuffle_seed {
                                Some(seed) => crate::schedule::shuffled_position(seed, raw, n_pos),
                                None => raw,
                            };
                            let at = TokenPos {
                                t: pos,
                                column: pos.saturating_sub(1),
                                row_len,
                                width,
                            };
                            assert_eq!(w[k].to_bits(), s.weight(at).to_bits(), "{p:?} {k}");
                        }
                    }
                }
            }
        }
    }
}

/// The CPPO prefix scan gives `rule::cppo_test`'s decisions, `rule::cppo_threshold`'s
/// thresholds and, under the inverse gate, `rule::inverse_gate`'s shares.
#[test]
fn prefix_scan_matches_the_scalar_rule() {
    let mut u = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        u ^= u << 13;
        u ^= u >> 7;
        u ^= u << 17;
        (u >> 11) as f64 / (1u64 << 53) as f64
    };
    for delta_b in [None, Some(0.0), Some(0.03)] {
        let p = CppoParams {
            delta: 0.12,
            delta_b,
            gate: Some(Gate::Inverse),
            calibration: None,
            ..CppoParams::default()
        };
        let cfg = Config::with_rule(Rule::Cppo(p));
        let plan = Plan {
            cfg: &cfg,
            denominators: Counts::default(),
            width: BLK,
            col0: 0,
        };
        let facts = RowFacts {
            row_len: BLK,
            row_ok: true,
            seq_ratio: 1.0,
            adv_mean: 0.0,
            delta_b,
        };
        let mut st = InStage::new();
        let mut wk = Work::new();
        st.n = BLK;
        for k in 0..BLK {
            st.on[k] = k % 9 != 4;
            st.adv[k] = 1.0;
            st.rho[k] = 1.5; // every token moves away
            wk.d[k] = 0.2 * next() * next();
        }
        let mut t = 0;
        for k in 0..BLK {
            t += usize::from(st.on[k]);
            wk.t[k] = t;
        }
        let (mut s, mut w) = (0.0, 0.0);
        rule_test(&plan, &facts, &st, &mut wk, 0, (&mut s, &mut w));
        reasons_and_shares(&plan, &st, &mut wk, false);
        let (mut s_prev, mut w_prev) = (0.0, 0.0);
        for k in 0..BLK {
            let wd = wk.w[k] * wk.d[k];
            if st.on[k] {
                let reason = cppo_test(p.delta, delta_b, wd, s_prev, w_prev);
                assert_eq!(wk.feasible[k], reason.is_none(), "{k}");
                if let Some(r) = reason {
                    assert_eq!(wk.code[k], r.code(), "{k}");
                    let room = delta_b.map_or(f64::INFINITY, |db| p.delta + db * w_prev);
                    let gate = inverse_gate(wd, p.delta, s_prev + wd, room);
                    assert_eq!(wk.m[k].to_bits(), gate.to_bits(), "{k}");
                } else {
                    assert_eq!(wk.m[k], 1.0);
                }
                let c = cppo_threshold(p.delta, delta_b, s_prev, w_prev);
                assert_eq!(wk.c[k].to_bits(), c.to_bits(), "{k}");
                s_prev += wd;
                w_prev += wk.w[k];
            } else {
                assert_eq!(wk.code[k], 0);
            }
        }
        assert_eq!(
            (s.to_bits(), w.to_bits()),
            (s_prev.to_bits(), w_prev.to_bits())
        );
    }
}

/// The block divergences equal `divergence`'s single-token functions (to the ulps of the
/// kernel's own exp and ln).
#[test]
fn block_divergences_match_the_scalar_formulas() {
    let (b, l) = (1, 70);
    let lq = Array2::from_shape_fn((b, l), |(_, j)| -0.001 - j as f64 * 0.13);
    let lp = Array2::from_shape_fn((b, l), |(_, j)| {
        (lq[[0, j]] + ((j % 7) as f64 - 3.0) * 0.2).min(0.0)
    });
    let adv = Array1::from_elem(b, 1.0);
    let mask = Array2::from_elem((b, l), true);
    let batch = Batch::new(&lp, &lq, &adv, &mask).unwrap();
    for (div, scalar) in [
        (
            Divergence::BinaryTv,
            crate::divergence::binary_tv as fn(f64, f64) -> f64,
        ),
        (Divergence::BinaryKl, crate::divergence::binary_kl),
        (Divergence::K2, crate::divergence::k2),
        (Divergence::K3, crate::divergence::k3),
    ] {
        let cfg = Config {
            divergence: div,
            ..Config::with_rule(Rule::None)
        };
        let got = {
            let row = RowIn::new(&cfg, &batch, 0, 0).unwrap();
            let mut st = InStage::new();
            let mut wk = Work::new();
            let mut d = Vec::new();
            let mut scratch = None;
            for j0 in (0..l).step_by(BLK) {
                let n = BLK.min(l - j0);
                assert!(st.load(&row, j0, n, None));
                assert!(block_values(&row, &st, j0, &mut wk, &mut scratch));
                d.extend_from_slice(&wk.d[..n]);
            }
            d
        };
        for j in 0..l {
            let want = scalar(lp[[0, j]], lq[[0, j]]);
            // The terms' own size bounds the rounding (|p − q| cancels).
            let (p, q) = (lp[[0, j]].exp(), lq[[0, j]].exp());
            let rho = (lp[[0, j]] - lq[[0, j]]).exp();
            let tol = 4e-16 * (want.abs() + p + q + rho);
            assert!(
                (got[j] - want).abs() <= tol,
                "{div:?} column {j}: {} vs {want}",
                got[j]
            );
            assert!(got[j] >= 0.0);
        }
    }
}

#[test]
fn decile_tracker_matches_the_division() {
    for row_len in 1..60 {
        let mut d = super::tally::Decile::new(row_len);
        for t in 1..=row_len {
            assert_eq!(d.at(t), (t - 1) * 10 / row_len, "T = {row_len}, t = {t}");
        }
    }
}
