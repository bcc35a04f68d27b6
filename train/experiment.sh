#!/bin/sh
# The running-sum experiment of TRAINING.md, phase by phase. Each line is one cell and
# runs on its own (cargo build --release -p cppo-train first); a cell writes its
# CSVs, setting.json and table to its directory under $OUT.
#
#   sh train/experiment.sh calibrate   # D's quantiles under no mask, tuning seeds
#   sh train/experiment.sh tune        # each rule's own parameter, 3 values, tuning seeds
#   sh train/experiment.sh tune_cppo   # CPPO's delta_b, 3 values, at DPPO's tuned delta
#   sh train/experiment.sh grid        # the main grid, fresh seeds
#   sh train/experiment.sh ablations   # the paper's ablations at the longest horizon
#   sh train/experiment.sh staleness   # the arms at lags 0, 2 and 8 (T = 16; lag 4 is in grid)
#   sh train/experiment.sh mismatch13  # a larger mismatch, tau_mu = 1.3, T = 4, 8, 16
#   sh train/experiment.sh calibrate13 # D under no mask at tau_mu = 1.3, T = 16, tuning seeds
#   sh train/experiment.sh retune13    # CPPO with delta_b from calibrate13 against DPPO, tau_mu = 1.3
#   sh train/experiment.sh warm32      # the T = 32 warm start alone (it does not learn)
#   sh train/experiment.sh analyze     # the statistics, tables and plots
#
# The primary endpoint, fixed before the grid ran: the sampled-accuracy AUC (Avg@4 on
# 128 held-out prompts, every 5 iterations, iteration 0 included) of CPPO minus DPPO
# at the longest horizon (T = 16) in the stale setting (lag 4), over seeds 1-20, with
# its paired 95 % t interval and the exact signed-rank test. Everything else is
# secondary and Holm-corrected.
set -eu
B=${B:-target/release/cppo-train}
OUT=${OUT:-target/experiment}
JOBS=${JOBS:-2}
# Shared by every cell: the running-sum task, 30 iterations, one warm start per horizon
# (warm seed 1, cached), detached IS with C = 3 (verl's clip_ratio_c) as every arm's
# objective.
COMMON="--compare --task sum --iters 30 --is-cap 3 --warm-seed 1 --warm-cache $OUT/warm --jobs $JOBS"
# The two kinds of drift: staleness (rollouts from the policy 4 iterations back), and a
# small position-uniform mismatch (rollouts sampled at tau_mu = 1.1, on-policy otherwise).
STALE="--lag 4"
MISMATCH="--lag 0 --tau-mu 1.1"
TUNE_SEEDS=101,102
SEEDS=1,2,3,4,5,6,7,8,9,10
PRIMARY_SEEDS=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20

# The tuned arms (the tune phase's winners, on the tuning seeds only; see TRAINING.md).
# delta_b is the median of D under no mask (calibrate), with the paper's calibration
# (P90 of the row's D, within [delta_b, 2 delta_b]).
GRPO=${GRPO:-grpo:eps_low=0.1:eps_high=0.14}
DPPO=${DPPO:-dppo:delta=0.1}
CPPO_DELTA=${CPPO_DELTA:-cppo:delta=0.1}
CPPO=${CPPO:-cppo:delta=0.1:delta_b=0.002}
ARMS="none,$GRPO,$DPPO,$CPPO"

case "${1:-}" in
calibrate)
    # The first 5 iterations only: D as the warm start's drift makes it, before an
    # unmasked run drifts away (or collapses).
    for T in 8 16; do
        $B $COMMON $STALE --horizon $T --iters 5 --rules none --seeds $TUNE_SEEDS --out $OUT/calibrate_T$T
    done
    ;;
tune)
    # Three values of each rule's own parameter, at T = 8 (calibrate's D there: P50
    # 0.0015-0.0024, P90 0.21-0.25, P99 0.69-0.86). GRPO's clip scales both epsilons.
    $B $COMMON $STALE --horizon 8 --seeds $TUNE_SEEDS --out $OUT/tune_T8 \
        --rules grpo:eps_low=0.1:eps_high=0.14,grpo,grpo:eps_low=0.3:eps_high=0.42,dppo:delta=0.1,dppo:delta=0.2,dppo:delta=0.4
    ;;
tune_cppo)
    # CPPO's own parameter, delta_b (the calibration's base), at the delta DPPO chose:
    # the median of D, 5x and 25x it.
    $B $COMMON $STALE --horizon 8 --seeds $TUNE_SEEDS --out $OUT/tune_cppo_T8 \
        --rules "$CPPO_DELTA:delta_b=0.002,$CPPO_DELTA:delta_b=0.01,$CPPO_DELTA:delta_b=0.05"
    ;;
grid)
    # The primary cell first.
    $B $COMMON $STALE --horizon 16 --rules $ARMS --seeds $PRIMARY_SEEDS --out $OUT/stale_T16
    for T in 8 4; do
        $B $COMMON $STALE --horizon $T --rules $ARMS --seeds $SEEDS --out $OUT/stale_T$T
    done
    for T in 4 8 16; do
        $B $COMMON $MISMATCH --horizon $T --rules $ARMS --seeds $SEEDS --out $OUT/mismatch_T$T
    done
    ;;
ablations)
    # CPPO's ablations and TRM-avg, at the tuned CPPO's delta and delta_b, against it.
    D=delta=0.1
    DB=delta_b=0.002
    $B $COMMON $STALE --horizon 16 --seeds $SEEDS --out $OUT/ablations_T16 \
        --rules "$CPPO,cppo_weights:$D,cppo_budget:$D:$DB,cppo_shuffled:$D:$DB,cppo_soft:$D:$DB,trm_avg:$D"
    ;;
staleness)
    # The staleness sweep at T = 16: lag 4 is the grid's primary cell; these add lags
    # 0 (on-policy but for the 4 minibatches of an iteration), 2 and 8.
    for LAG in 0 2 8; do
        $B $COMMON --lag $LAG --horizon 16 --rules $ARMS --seeds $SEEDS --out $OUT/lag${LAG}_T16
    done
    ;;
mismatch13)
    # The mismatch at tau_mu = 1.3 instead of 1.1: a larger per-token drift of the same
    # position-uniform kind, at every horizon.
    for T in 4 8 16; do
        $B $COMMON --lag 0 --tau-mu 1.3 --horizon $T --rules $ARMS --seeds $SEEDS --out $OUT/mismatch13_T$T
    done
    ;;
calibrate13)
    # The larger mismatch's own D under no mask, per horizon on the tuning seeds (the
    # first 5 iterations, as calibrate): its median is the retuned delta_b below.
    for T in ${HORIZONS:-4 8 16}; do
        $B $COMMON --lag 0 --tau-mu 1.3 --horizon $T --iters 5 --rules none --seeds $TUNE_SEEDS --out $OUT/calibrate13_T$T
    done
    ;;
retune13)
    # CPPO with delta_b retuned to the larger mismatch, against DPPO (the same runs as
    # mismatch13's DPPO arms), fresh seeds. delta_b is calibrate13's median of D at that
    # horizon, the smaller of the two tuning seeds' to two significant digits: 0.027,
    # 0.011 and 0.012 at T = 4, 8 and 16.
    for T in ${HORIZONS:-4 8 16}; do
        case $T in 4) DB=${DB13_T4:-0.027} ;; 8) DB=${DB13_T8:-0.011} ;; *) DB=${DB13:-0.012} ;; esac
        $B $COMMON --lag 0 --tau-mu 1.3 --horizon $T --rules "$DPPO,$CPPO_DELTA:delta_b=$DB" --seeds $SEEDS --out $OUT/retune13_T$T
    done
    ;;
warm32)
    # T = 32 (33 response tokens): the warm start alone, and one iteration of one run to
    # print its accuracy. On 2026-12-02 it ran its 2,000-step cap (58 minutes on one
    # core) and ended at sampled validation accuracy 0.000, so a T = 32 cell would have
    # no reward to learn from, and none was run.
    $B $COMMON $STALE --horizon 32 --iters 1 --rules none --seeds 1 --out $OUT/warm_T32
    ;;
analyze)
    G=$OUT/stale_T4,$OUT/stale_T8,$OUT/stale_T16,$OUT/mismatch_T4,$OUT/mismatch_T8,$OUT/mismatch_T16
    $B --analyze "$G" --reference "$DPPO" --primary "$OUT/stale_T16:$CPPO" --out $OUT/analysis
    # Secondary: every arm against GRPO's clip.
    $B --analyze "$G" --reference "$GRPO" --out $OUT/analysis_grpo
    $B --analyze "$OUT/ablations_T16" --reference "$CPPO" --out $OUT/analysis_ablations
    # Added after the grid, each its own family: the staleness sweep at T = 16 (lag 4
    # is the primary cell), and the larger mismatch.
    $B --analyze "$OUT/lag0_T16,$OUT/lag2_T16,$OUT/stale_T16,$OUT/lag8_T16" --reference "$DPPO" --out $OUT/analysis_staleness
    $B --analyze "$OUT/lag0_T16,$OUT/lag2_T16,$OUT/stale_T16,$OUT/lag8_T16" --reference "$GRPO" --out $OUT/analysis_staleness_grpo
    $B --analyze "$OUT/mismatch13_T4,$OUT/mismatch13_T8,$OUT/mismatch13_T16" --reference "$DPPO" --out $OUT/analysis_mismatch13
    # CPPO with delta_b retuned to the larger mismatch, its own family.
    # (--rename: the three horizons' delta_b differ, one arm for the trend.)
    $B --analyze "$OUT/retune13_T4,$OUT/retune13_T8,$OUT/retune13_T16" --reference "$DPPO" --out $OUT/analysis_retune13 \
        --rename "$CPPO_DELTA:delta_b=0.027=>cppo retuned,$CPPO_DELTA:delta_b=0.011=>cppo retuned,$CPPO_DELTA:delta_b=0.012=>cppo retuned"
    ;;
*)
    echo "usage: sh train/experiment.sh calibrate|tune|tune_cppo|grid|ablations|staleness|mismatch13|calibrate13|retune13|warm32|analyze" >&2
    exit 2
    ;;
esac
