//! Throughput of the fused engine, with two in-house yardsticks.
//!
//! `cargo bench --bench kernel` (about a minute of measurement); filter with a
//! substring, for example `cargo bench --bench kernel -- 64x8192`. Divan reports
//! tokens/s (items, B × L slots) and bytes/s.
//!
//! - `shapes`: [`evaluate_into`] (CPPO, binary TV, surrogate, token-mean) from 4 K to
//!   4 M tokens, `f32` and `f64`, `Par::Seq` and `Par::Rayon`.
//! - `divergences`, `rules`: one axis varied at a time (every divergence under CPPO,
//!   every rule on binary TV), 64 × 8192 `f32`.
//! - `numerics`: the exact exponentials against the opt-in f32 ones
//!   (`Numerics::F32Exp`), on binary TV and top-K TV, one thread.
//! - `stream`: the memory floor. Reads `logp`, `logp_old`, `mask` and writes one output;
//!   no kernel that reads its inputs and writes a result can move fewer bytes.
//! - `naive`: CPPO + binary TV + surrogate + token-mean written the way one would in
//!   PyTorch, as whole-array ndarray passes (`mapv`, `Zip`, cumulative sums) with a
//!   temporary per step.
//!
//! Bytes counted are the logical minimum of each computation, every array once:
//! `evaluate_into` reads `logp`, `logp_old` (and the two top-K arrays when the divergence
//! needs them), `mask`, the per-row advantages, and writes `divergence`, `weight`,
//! `threshold`, `token_loss`, `grad`, `keep`, `reason`; `stream` and `naive` read
//! `logp`, `logp_old`, `mask`, advantages and write one (B, L) array.
//!
//! The data are generated in this file (no `synth` feature needed), with the traits that
//! matter for speed: ragged rows about 90% full, tool-output holes, NaN padding, mostly
//! confident tokens with a quarter uncertain, drift larger early, GRPO advantages with
//! zero-advantage groups, and a sorted top-K pair.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

use cppo::ndarray::{Array1, Array2, Array3, ArrayView2, Axis, Zip};
use cppo::{
    Batch, Config, CppoParams, Divergence, Float, Gate, Numerics, Outputs, Par, Rule, evaluate,
    evaluate_into,
};
use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};

fn main() {
    divan::main();
}

/// K of the top-K benches.
const TOPK: usize = 20;

#[derive(Clone, Copy, Debug)]
struct Shape(usize, usize);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.0, self.1)
    }
}

#[derive(Clone, Copy, Debug)]
struct Case(Shape, Par);

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let par = match self.1 {
            Par::Seq => "seq",
            Par::Rayon => "rayon",
        };
        write!(f, "{}/{par}", self.0)
    }
}

const SHAPES: [Shape; 4] = [
    Shape(4, 1024),
    Shape(64, 1024),
    Shape(64, 8192),
    Shape(256, 16384),
];

const CASES: [Case; 8] = [
    Case(SHAPES[0], Par::Seq),
    Case(SHAPES[0], Par::Rayon),
    Case(SHAPES[1], Par::Seq),
    Case(SHAPES[1], Par::Rayon),
    Case(SHAPES[2], Par::Seq),
    Case(SHAPES[2], Par::Rayon),
    Case(SHAPES[3], Par::Seq),
    Case(SHAPES[3], Par::Rayon),
];

/// The shape of the `divergences` and `rules` groups.
const MID: Shape = Shape(64, 8192);

// ---------------------------------------------------------------------------------------
// Data

/// One generated batch, owned.
struct Data<F> {
    logp: Array2<F>,
    logp_old: Array2<F>,
    adv: Array1<F>,
    mask: Array2<bool>,
    topk: Option<(Array3<F>, Array3<F>)>,
}

impl<F: Float> Data<F> {
    fn batch(&self) -> Batch<'_, F> {
        let b = Batch::new(&self.logp, &self.logp_old, &self.adv, &self.mask).unwrap();
        match &self.topk {
            Some((old, new)) => b.with_topk(old, new).unwrap(),
            None => b,
        }
    }
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn make<F: Float>(Shape(b, l): Shape, k: usize) -> Data<F> {
    let mut rng = Rng(0x5eed ^ ((b as u64) << 32) ^ l as u64);
    let nan = F::from_f64(f64::NAN);
    let mut logp = Array2::from_elem((b, l), nan);
    let mut logp_old = Array2::from_elem((b, l), nan);
    let mut mask = Array2::from_elem((b, l), false);
    let mut topk = (k > 0).then(|| {
        (
            Array3::from_elem((b, l, k), nan),
            Array3::from_elem((b, l, k), nan),
        )
    });
    // GRPO advantages in groups of 8; a group whose rewards agree gets 0.
    let mut adv = Vec::with_capacity(b);
    for g in 0..b.div_ceil(8) {
        let n = 8.min(b - 8 * g);
        let p = rng.uniform();
        let r: Vec<f64> = (0..n)
            .map(|_| f64::from(u8::from(rng.uniform() < p)))
            .collect();
        let mean = r.iter().sum::<f64>() / n as f64;
        adv.extend(r.iter().map(|x| x - mean));
    }
    for i in 0..b {
        // Half the rows run to the end; the rest stop between 60% and 100%: ~90% full.
        let t_row = if rng.uniform() < 0.5 {
            l
        } else {
            ((l as f64 * (0.6 + 0.4 * rng.uniform())) as usize).max(1)
        };
        // A quarter of the shorter rows have one tool-output hole in the middle.
        let hole = if t_row < l && rng.uniform() < 0.25 {
            (l - t_row).min(t_row / 20 + 1)
        } else {
            0
        };
        let unc = 0.1 + 0.3 * rng.uniform();
        let lean = 0.3 * adv[i];
        let mut j = 0;
        for t in 0..t_row {
            if t == t_row / 2 {
                j += hole;
            }
            let x = t as f64 / t_row as f64;
            let sigma = 0.25 + 0.75 * (-x / 0.15).exp();
            let u = rng.uniform();
            let lq = if u < 0.01 {
                -4.0 - 8.0 * rng.uniform()
            } else if u < 0.01 + unc {
                (0.02 + 0.96 * rng.uniform()).ln()
            } else {
                (0.004 * rng.uniform().ln()).min(-1e-12)
            };
            let logit = lq - (-lq.exp_m1()).ln();
            let lp = log_sigmoid(logit + sigma * (rng.normal() + lean));
            mask[[i, j]] = true;
            logp_old[[i, j]] = F::from_f64(lq);
            logp[[i, j]] = F::from_f64(lp);
            if let Some((old, new)) = topk.as_mut() {
                // Sorted rollout top-K around q, then every logit and the rest perturbed
                // by sigma and renormalised.
                let q = lq.exp();
                let mut prev = if q >= 0.5 {
                    q
                } else {
                    q.max(0.25 + 0.45 * rng.uniform())
                };
                let mut rest = 1.0 - prev;
                let mut lo = vec![prev.ln()];
                for _ in 1..k {
                    let p = prev.min(rest * (0.25 + 0.5 * rng.uniform()));
                    rest -= p;
                    prev = p;
                    lo.push(p.ln());
                }
                let ln: Vec<f64> = lo.iter().map(|&o| o + sigma * rng.normal()).collect();
                let norm = rest.max(0.0) * (sigma * rng.normal()).exp()
                    + ln.iter().map(|x| x.exp()).sum::<f64>();
                for kk in 0..k {
                    old[[i, j, kk]] = F::from_f64(lo[kk]);
                    new[[i, j, kk]] = F::from_f64((ln[kk] - norm.ln()).min(0.0));
                }
            }
            j += 1;
        }
    }
    Data {
        logp,
        logp_old,
        adv: adv.into_iter().map(F::from_f64).collect(),
        mask,
        topk,
    }
}

type Cache = HashMap<(&'static str, usize, usize, usize), &'static (dyn Any + Send + Sync)>;
static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Default::default);

/// The batch of this type and shape, generated once per process.
fn data<F: Float>(shape: Shape, k: usize) -> &'static Data<F> {
    let key = (F::DTYPE, shape.0, shape.1, k);
    let mut cache = CACHE.lock().unwrap();
    let any = *cache
        .entry(key)
        .or_insert_with(|| Box::leak(Box::new(make::<F>(shape, k))));
    any.downcast_ref::<Data<F>>().unwrap()
}

fn tokens(Shape(b, l): Shape) -> usize {
    b * l
}

/// Logical bytes of `evaluate_into`: see the file's docs.
fn engine_bytes<F>(shape @ Shape(b, _): Shape, k: usize) -> usize {
    let f = size_of::<F>();
    tokens(shape) * (2 * f + 1 + 2 * k * f + 5 * f + 2) + b * f
}

/// Logical bytes of `stream` and `naive`: read logp, logp_old, mask, advantages; write one.
fn min_bytes<F>(shape @ Shape(b, _): Shape) -> usize {
    let f = size_of::<F>();
    tokens(shape) * (3 * f + 1) + b * f
}

fn run_engine<F: Float>(bencher: Bencher, cfg: Config, shape: Shape, k: usize, par: Par) {
    let d = data::<F>(shape, k);
    let batch = d.batch();
    let mut out = Outputs::<F>::zeros(batch.shape());
    bencher
        .counter(ItemsCount::new(tokens(shape)))
        .counter(BytesCount::new(engine_bytes::<F>(shape, k)))
        .bench_local(|| {
            evaluate_into(&cfg, divan::black_box(&batch), out.view_mut(), par)
                .unwrap()
                .loss
        });
}

// ---------------------------------------------------------------------------------------
// The engine

/// CPPO (a fixed budget, [`CPPO`]) on binary TV at every shape, both float types,
/// sequential and parallel.
#[divan::bench(types = [f32, f64], args = CASES, max_time = 1.5)]
fn shapes<F: Float>(bencher: Bencher, Case(shape, par): Case) {
    run_engine::<F>(bencher, Config::with_rule(CPPO), shape, 0, par);
}

const DIVERGENCES: [(Divergence, Par); 12] = [
    (Divergence::BinaryTv, Par::Seq),
    (Divergence::BinaryTv, Par::Rayon),
    (Divergence::BinaryKl, Par::Seq),
    (Divergence::BinaryKl, Par::Rayon),
    (Divergence::TopkTv, Par::Seq),
    (Divergence::TopkTv, Par::Rayon),
    (Divergence::TopkKl, Par::Seq),
    (Divergence::TopkKl, Par::Rayon),
    (Divergence::K2, Par::Seq),
    (Divergence::K2, Par::Rayon),
    (Divergence::K3, Par::Seq),
    (Divergence::K3, Par::Rayon),
];

/// Each divergence under CPPO, 64 × 8192 `f32` (top-K: K = 20).
#[divan::bench(args = DIVERGENCES.map(Named), max_time = 1.5)]
fn divergences(bencher: Bencher, Named((div, par)): Named<(Divergence, Par)>) {
    let cfg = Config {
        divergence: div,
        ..Config::with_rule(CPPO)
    };
    let k = if div.needs_topk() { TOPK } else { 0 };
    run_engine::<f32>(bencher, cfg, MID, k, par);
}

/// The opt-in f32 exponentials against the exact ones, CPPO (fixed budget) on binary TV
/// and on top-K TV (K = 20), 64 × 8192 `f32`, one thread: the ratio of a pair is the
/// speed-up of `Numerics::F32Exp`.
#[divan::bench(args = NUMERICS.map(Named), max_time = 1.5)]
fn numerics(bencher: Bencher, Named((div, numerics)): Named<(Divergence, Numerics)>) {
    let cfg = Config {
        divergence: div,
        numerics,
        ..Config::with_rule(CPPO)
    };
    let k = if div.needs_topk() { TOPK } else { 0 };
    run_engine::<f32>(bencher, cfg, MID, k, Par::Seq);
}

const NUMERICS: [(Divergence, Numerics); 4] = [
    (Divergence::BinaryTv, Numerics::Exact),
    (Divergence::BinaryTv, Numerics::F32Exp),
    (Divergence::TopkTv, Numerics::Exact),
    (Divergence::TopkTv, Numerics::F32Exp),
];

impl fmt::Display for Named<(Divergence, Numerics)> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MID}/{}/{}", self.0.0.name(), self.0.1.name())
    }
}

const RULES: [(Rule, Par); 16] = [
    (Rule::None, Par::Seq),
    (Rule::None, Par::Rayon),
    (RATIO, Par::Seq),
    (RATIO, Par::Rayon),
    (Rule::Dppo { delta: 0.2 }, Par::Seq),
    (Rule::Dppo { delta: 0.2 }, Par::Rayon),
    (CPPO, Par::Seq),
    (CPPO, Par::Rayon),
    (CPPO_SOFT, Par::Seq),
    (CPPO_SOFT, Par::Rayon),
    (CPPO_CALIBRATED, Par::Seq),
    (CPPO_CALIBRATED, Par::Rayon),
    (Rule::TrmMax { delta: 0.2 }, Par::Seq),
    (Rule::TrmMax { delta: 0.2 }, Par::Rayon),
    (Rule::TrmAvg { delta: 0.05 }, Par::Seq),
    (Rule::TrmAvg { delta: 0.05 }, Par::Rayon),
];
const RATIO: Rule = Rule::Ratio {
    eps_low: 0.2,
    eps_high: 0.2,
};
/// CPPO with a fixed budget (δ 0.2, δ_b 0.05, w_min 0.8): the rule these benches
/// measured before the calibrated budget existed, kept for comparison.
const CPPO: Rule = Rule::Cppo(CppoParams {
    delta: 0.2,
    delta_b: Some(0.05),
    calibration: None,
    ..CppoParams::PAPER
});

/// The paper's CPPO: a per-row calibrated budget (P90 in [δ_b, 2 δ_b]).
const CPPO_CALIBRATED: Rule = Rule::Cppo(CppoParams::PAPER);

const CPPO_SOFT: Rule = Rule::Cppo(CppoParams {
    gate: Some(Gate::Sigmoid { tau: 0.01 }),
    ..match CPPO {
        Rule::Cppo(p) => p,
        _ => CppoParams::PAPER,
    }
});

/// Each rule on binary TV, 64 × 8192 `f32`.
#[divan::bench(args = RULES.map(Named), max_time = 1.5)]
fn rules(bencher: Bencher, Named((rule, par)): Named<(Rule, Par)>) {
    run_engine::<f32>(bencher, Config::with_rule(rule), MID, 0, par);
}

/// Names a (divergence or rule, par) pair for divan's listing, e.g.
/// `64x8192/topk_kl/rayon`.
#[derive(Clone, Copy, Debug)]
struct Named<T>(T);

fn par_name(p: Par) -> &'static str {
    match p {
        Par::Seq => "seq",
        Par::Rayon => "rayon",
    }
}

impl fmt::Display for Named<(Divergence, Par)> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MID}/{}/{}", self.0.0.name(), par_name(self.0.1))
    }
}

impl fmt::Display for Named<(Rule, Par)> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let calibrated = match self.0.0 {
            Rule::Cppo(p) if p.calibration.is_some() => "_calibrated",
            _ => "",
        };
        write!(
            f,
            "{MID}/{}{calibrated}/{}",
            self.0.0.name(),
            par_name(self.0.1)
        )
    }
}

// ---------------------------------------------------------------------------------------
// Yardsticks

/// The memory floor: read logp, logp_old and mask, write logp − logp_old (0 off the mask).
#[divan::bench(types = [f32, f64], args = CASES, max_time = 1.5)]
fn stream<F: Float>(bencher: Bencher, Case(shape, par): Case) {
    let d = data::<F>(shape, 0);
    let mut out = Array2::<F>::from_elem(d.logp.dim(), F::default());
    bencher
        .counter(ItemsCount::new(tokens(shape)))
        .counter(BytesCount::new(min_bytes::<F>(shape)))
        .bench_local(|| {
            let z = Zip::from(&mut out)
                .and(&d.logp)
                .and(&d.logp_old)
                .and(&d.mask);
            let f = |o: &mut F, &a: &F, &b: &F, &m: &bool| {
                *o = if m {
                    F::from_f64(a.to_f64() - b.to_f64())
                } else {
                    F::default()
                };
            };
            match par {
                Par::Seq => z.for_each(f),
                Par::Rayon => z.par_for_each(f),
            }
        });
}

/// CPPO (δ = 0.2, δ_b = 0.05, w_min = 0.8) + binary TV + surrogate + token-mean, one
/// whole-array pass and one temporary per step. Returns the loss and dL/dlogp.
fn naive_cppo<F: Float>(
    logp: ArrayView2<'_, F>,
    logp_old: ArrayView2<'_, F>,
    adv: &Array1<F>,
    mask: ArrayView2<'_, bool>,
) -> (f64, Array2<F>) {
    let (delta, delta_b, w_min) = (0.2, 0.05, 0.8);
    let m = mask.mapv(|b| if b { 1.0 } else { 0.0 });
    let read = |x: ArrayView2<'_, F>| {
        Zip::from(&x)
            .and(&mask)
            .map_collect(|&v, &b| if b { v.to_f64() } else { 0.0 })
    };
    let (lp, lq) = (read(logp), read(logp_old));
    let d = (&lp.mapv(f64::exp) - &lq.mapv(f64::exp)).mapv(f64::abs) * &m;
    let mut t = m.clone();
    t.accumulate_axis_inplace(Axis(1), |&prev, cur| *cur += prev);
    let t_row = m.sum_axis(Axis(1)).insert_axis(Axis(1));
    let w = Zip::from(&t).and_broadcast(&t_row).map_collect(|&t, &n| {
        if n > 1.0 {
            1.0 - (1.0 - w_min) * (t - 1.0) / (n - 1.0)
        } else {
            1.0
        }
    }) * &m;
    let wd = &w * &d;
    let mut s = wd.clone();
    s.accumulate_axis_inplace(Axis(1), |&prev, cur| *cur += prev);
    let mut w_cum = w.clone();
    w_cum.accumulate_axis_inplace(Axis(1), |&prev, cur| *cur += prev);
    let w_prev = &w_cum - &w;
    let feasible = Zip::from(&wd)
        .and(&s)
        .and(&w_prev)
        .map_collect(|&wd, &s, &wp| wd <= delta && s <= delta + delta_b * wp);
    let rho = (&lp - &lq).mapv(|x| x.clamp(-20.0, 20.0).exp());
    let a = adv.mapv(|x| x.to_f64()).insert_axis(Axis(1));
    let away = Zip::from(&rho)
        .and_broadcast(&a)
        .map_collect(|&r, &a| a * (r - 1.0) > 0.0);
    let keep = Zip::from(&feasible)
        .and(&away)
        .and(&mask)
        .map_collect(|&f, &aw, &b| b && (f || !aw));
    let n = m.sum();
    let scale = if n > 0.0 { 1.0 / n } else { 0.0 };
    let grad = Zip::from(&keep)
        .and(&rho)
        .and_broadcast(&a)
        .map_collect(|&k, &r, &a| if k { -r * a * scale } else { 0.0 });
    (grad.sum(), grad.mapv(F::from_f64))
}

/// The naive multi-pass CPPO, checked once against the engine's loss.
#[divan::bench(types = [f32, f64], args = SHAPES, max_time = 1.5)]
fn naive<F: Float>(bencher: Bencher, shape: Shape) {
    let d = data::<F>(shape, 0);
    let (loss, _) = naive_cppo(d.logp.view(), d.logp_old.view(), &d.adv, d.mask.view());
    let engine = evaluate(&Config::with_rule(CPPO), &d.batch(), Par::Seq)
        .unwrap()
        .loss;
    assert!(
        (loss - engine).abs() <= 1e-9 * engine.abs().max(1e-3),
        "naive {loss} vs engine {engine}"
    );
    bencher
        .counter(ItemsCount::new(tokens(shape)))
        .counter(BytesCount::new(min_bytes::<F>(shape)))
        .bench_local(|| naive_cppo(d.logp.view(), d.logp_old.view(), &d.adv, d.mask.view()));
}
