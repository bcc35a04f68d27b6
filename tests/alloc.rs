//! `evaluate_into` allocates nothing on the heap, and `evaluate` allocates only its
//! outputs. Checked with a counting global allocator, so this file holds one test only
//! (tests in one binary share the allocator and run on parallel threads).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{
    Batch, Config, Divergence, KlEstimator, KlPenalty, Outputs, OutputsMut, Par, Rule, evaluate,
    evaluate_into,
};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
            BYTES.fetch_add(layout.size(), Ordering::SeqCst);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns (allocations, bytes) made while it ran, on any thread.
fn count<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    ALLOCS.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let r = f();
    COUNTING.store(false, Ordering::SeqCst);
    (
        r,
        ALLOCS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    )
}

#[test]
fn into_allocates_nothing_and_evaluate_only_its_outputs() {
    let (b, l, k) = (24, 700, 3);
    let logp = Array2::from_shape_fn((b, l), |(i, j)| -0.05 - ((i * 7 + j * 3) % 11) as f64 * 0.1);
    let logp_old = Array2::from_shape_fn((b, l), |(i, j)| {
        -0.05 - ((i * 5 + j * 2) % 13) as f64 * 0.09
    });
    let logp_ref = logp_old.mapv(|x| x - 0.01);
    let adv = Array1::from_shape_fn(b, |i| [1.0, -1.0, 0.0][i % 3]);
    let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - i * 20 && j % 17 != 3);
    let topk_old = Array3::from_elem((b, l, k), (0.2f64).ln());
    let topk_new = Array3::from_elem((b, l, k), (0.25f64).ln());
    let batch = Batch::new(&logp, &logp_old, &adv, &mask)
        .unwrap()
        .with_topk(&topk_old, &topk_new)
        .unwrap()
        .with_logp_ref(&logp_ref)
        .unwrap();
    let mut out = Outputs::<f64>::zeros((b, l));

    // `reserve_scratch` alone makes the first call allocation-free: on a new pool whose
    // threads have run nothing of the crate's, the calibrated budget's per-thread
    // buffers (the divergences; p and q on a binary divergence) are grown up front.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(|| {
        // Starting the pool's threads allocates; the crate has not run on them yet.
        rayon::broadcast(|_| ());
        cppo::engine::reserve_scratch(l);
        for cfg in [
            Config::cppo(),
            Config {
                divergence: Divergence::BinaryKl,
                ..Config::cppo()
            },
        ] {
            let (r, allocs, _) = count(|| evaluate_into(&cfg, &batch, out.view_mut(), Par::Rayon));
            r.unwrap();
            assert_eq!(allocs, 0, "first call on a reserved pool: {cfg:?}");
        }
    });

    // The calibrated budget's per-thread buffers, grown up front on every thread.
    cppo::engine::reserve_scratch(l);

    let mut configs = vec![Config::cppo(), Config::dppo(), Config::grpo()];
    for rule in [Rule::TrmMax { delta: 0.3 }, Rule::None] {
        configs.push(Config::with_rule(rule));
    }
    for div in [Divergence::BinaryKl, Divergence::TopkTv, Divergence::TopkKl] {
        configs.push(Config {
            divergence: div,
            kl: Some(KlPenalty {
                estimator: KlEstimator::K3,
                coef: 0.1,
            }),
            ..Config::cppo()
        });
    }
    for cfg in &configs {
        for par in [Par::Seq, Par::Rayon] {
            // Warm up: rayon's pool starts its threads (and allocates) on first use.
            evaluate_into(cfg, &batch, out.view_mut(), par).unwrap();
            let (r, allocs, bytes) = count(|| evaluate_into(cfg, &batch, out.view_mut(), par));
            r.unwrap();
            assert_eq!((allocs, bytes), (0, 0), "{cfg:?} {par:?}");
            // Partial outputs too.
            let (r, allocs, _) = count(|| {
                let g = out.grad.view_mut();
                evaluate_into(
                    cfg,
                    &batch,
                    OutputsMut {
                        grad: Some(g),
                        ..Default::default()
                    },
                    par,
                )
            });
            r.unwrap();
            assert_eq!(allocs, 0, "{cfg:?} {par:?} grad only");
        }
    }

    // The allocating path: its seven (B, L) outputs and one (B,), nothing more.
    let output_bytes =
        b * l * (5 * size_of::<f64>() + size_of::<bool>() + size_of::<u8>()) + b * size_of::<f64>();
    let (r, allocs, bytes) = count(|| evaluate(&Config::cppo(), &batch, Par::Seq));
    r.unwrap();
    assert_eq!(allocs, 8);
    assert_eq!(bytes, output_bytes);
}
