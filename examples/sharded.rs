//! Four ranks computing one batch together, simulated with threads and channels, and
//! checked against the single-process result.
//!
//! ```text
//! cargo run --release --example sharded
//! ```
//!
//! The layout is 2 data-parallel row shards × 2 context-parallel column halves:
//!
//! ```text
//!                 columns 0..L/2     columns L/2..L
//!   rows 0..B/2   rank 0 (d0, c0) -> rank 1 (d0, c1)
//!   rows B/2..B   rank 2 (d1, c0) -> rank 3 (d1, c1)
//! ```
//!
//! This layout has both kinds of exchange a real trainer needs: every rank has a
//! data-parallel peer (same columns, other rows) and a context-parallel peer (same rows,
//! other columns). Four row shards each streaming their own column chunks would show
//! only the first, since a stream needs no messages.
//!
//! Each rank holds only its block of `logp`, `logp_old` and `mask`, plus its rows'
//! advantages. The ranks exchange three things, over `std::sync::mpsc` channels standing
//! in for the collectives:
//!
//! 1. **Row partials**, all-gathered between the two column ranks of a row shard: each
//!    rank reduces its block with `row_partials` and the two are merged in column order.
//!    Both ranks then know each row's response-token count T (for the weights and the
//!    per-sequence mean) and, under TRM, the row's max and sum of divergences. Under a
//!    calibrated CPPO budget (the default), the ranks also all-gather their blocks'
//!    divergences (`divergences_into`): δ_b^row is a quantile of the whole row's, and a
//!    quantile is not a sum. `whole_rows` turns both into each row's `WholeRow`.
//! 2. **Counts**, all-reduced between the two row shards: N_tok and N_seq of the shard,
//!    taken from the merged partials (whole rows: a chunk's own counts would count a
//!    row split across the halves as two sequences), summed over the shards and set as
//!    `num_tokens` / `num_seqs`.
//! 3. **Carries**, sent from the left column rank to the right one after the left half
//!    is computed: each row's next column, token position and prefix sums S, W.
//!
//! Then every rank holds the exact gradient of the whole batch's loss with respect to
//! its own `logp` block, and its share of the loss. The main thread, which is not part
//! of the protocol, puts the blocks together and asserts that they equal a single
//! `evaluate` of the whole batch: every per-token output bit for bit, the loss (a sum of
//! the four shares) to 1e-12 of the sum of its terms' magnitudes, the diagnostics' counts
//! exactly. It does so for CPPO and for TRM-avg, and prints the bytes exchanged per row.

use std::mem::size_of;
use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender, channel};

use cppo::chunk::{
    Carry, ChunkPos, RowPartial, divergences_into, evaluate_chunk_into, needs_divergences,
    row_counts, row_partials, whole_rows,
};
use cppo::ndarray::{Array1, Array2, ArrayView1, ArrayView2, s};
use cppo::{Aggregation, Batch, Config, Counts, Diagnostics, Outputs, Par, Rule, Tally, evaluate};

const ROWS: usize = 16;
const WIDTH: usize = 4096;
const DATA_PARALLEL: usize = 2;
const CONTEXT_PARALLEL: usize = 2;
const RANKS: usize = DATA_PARALLEL * CONTEXT_PARALLEL;

// ---------------------------------------------------------------------------------------
// The fabric: one channel per ordered pair of ranks, counting the bytes sent
// ---------------------------------------------------------------------------------------

/// What the ranks send each other: nothing else.
enum Msg {
    Partials(Vec<RowPartial>),
    Divergences(Array2<f64>),
    Counts(Counts),
    Carries(Vec<Carry>),
}

/// Bytes sent by one rank, by kind.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    partials: usize,
    divergences: usize,
    counts: usize,
    carries: usize,
}

impl Sent {
    fn add(self, o: Sent) -> Sent {
        Sent {
            partials: self.partials + o.partials,
            divergences: self.divergences + o.divergences,
            counts: self.counts + o.counts,
            carries: self.carries + o.carries,
        }
    }

    fn total(self) -> usize {
        self.partials + self.divergences + self.counts + self.carries
    }
}

struct Comm {
    rank: usize,
    to: Vec<Sender<Msg>>,
    from: Vec<Receiver<Msg>>,
    sent: Sent,
}

impl Comm {
    /// A fully connected mesh of `n` ranks. Messages between two ranks arrive in order.
    fn mesh(n: usize) -> Vec<Comm> {
        let mut to: Vec<Vec<Sender<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        let mut from: Vec<Vec<Receiver<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        for senders in &mut to {
            for inbox in &mut from {
                let (tx, rx) = channel();
                senders.push(tx);
                inbox.push(rx);
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| Comm {
                rank,
                to,
                from,
                sent: Sent::default(),
            })
            .collect()
    }

    fn send(&mut self, to: usize, msg: Msg) {
        match &msg {
            Msg::Partials(p) => self.sent.partials += p.len() * size_of::<RowPartial>(),
            Msg::Divergences(d) => self.sent.divergences += d.len() * size_of::<f64>(),
            Msg::Counts(_) => self.sent.counts += size_of::<Counts>(),
            Msg::Carries(c) => self.sent.carries += c.len() * size_of::<Carry>(),
        }
        self.to[to].send(msg).expect("the peer is alive");
    }

    fn recv(&self, from: usize) -> Msg {
        self.from[from].recv().expect("the peer is alive")
    }

    fn recv_partials(&self, from: usize) -> Vec<RowPartial> {
        match self.recv(from) {
            Msg::Partials(p) => p,
            _ => unreachable!("the protocol sends partials first"),
        }
    }

    fn recv_divergences(&self, from: usize) -> Array2<f64> {
        match self.recv(from) {
            Msg::Divergences(d) => d,
            _ => unreachable!("divergences follow the partials"),
        }
    }

    fn recv_counts(&self, from: usize) -> Counts {
        match self.recv(from) {
            Msg::Counts(c) => c,
            _ => unreachable!("the data-parallel peer sends only counts"),
        }
    }

    fn recv_carries(&self, from: usize) -> Vec<Carry> {
        match self.recv(from) {
            Msg::Carries(c) => c,
            _ => unreachable!("the left rank sends carries after its partials"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// One rank
// ---------------------------------------------------------------------------------------

/// The block of the batch a rank holds.
struct Block<'a> {
    rows: Range<usize>,
    cols: Range<usize>,
    logp: ArrayView2<'a, f32>,
    logp_old: ArrayView2<'a, f32>,
    advantages: ArrayView1<'a, f32>,
    mask: ArrayView2<'a, bool>,
}

/// What a rank ends with: the gradient of the global loss for its block (and the other
/// per-token outputs), its share of the loss, its tally, and what it sent.
struct RankResult {
    rows: Range<usize>,
    cols: Range<usize>,
    outputs: Outputs<f32>,
    loss: f64,
    tally: Tally,
    sent: Sent,
}

fn rank_main(cfg: &Config, mut comm: Comm, block: Block<'_>) -> cppo::Result<RankResult> {
    let (d, c) = (comm.rank / CONTEXT_PARALLEL, comm.rank % CONTEXT_PARALLEL);
    let cp_peer = d * CONTEXT_PARALLEL + (1 - c);
    let dp_peer = (1 - d) * CONTEXT_PARALLEL + c;
    let batch = Batch::new(&block.logp, &block.logp_old, block.advantages, block.mask)?;
    let pos = ChunkPos {
        col0: block.cols.start,
        width: WIDTH,
    };

    // 1. All-gather the row partials within the context-parallel pair; merge them in
    //    column order, so that both ranks hold the same bits.
    let mine = row_partials(cfg, &batch, pos, Par::Seq)?;
    comm.send(cp_peer, Msg::Partials(mine.clone()));
    let theirs = comm.recv_partials(cp_peer);
    let (left, right) = if c == 0 {
        (&mine, &theirs)
    } else {
        (&theirs, &mine)
    };
    let partials: Vec<RowPartial> = left.iter().zip(right).map(|(l, r)| l.merge(r)).collect();
    // A calibrated budget: all-gather the divergences too, and put the halves side by
    // side (any column order would do).
    let gathered = if needs_divergences(cfg) {
        let mut mine = Array2::zeros(batch.shape());
        divergences_into(cfg, &batch, pos, mine.view_mut(), Par::Seq)?;
        comm.send(cp_peer, Msg::Divergences(mine.clone()));
        let theirs = comm.recv_divergences(cp_peer);
        let halves = if c == 0 {
            [mine, theirs]
        } else {
            [theirs, mine]
        };
        Some(
            cppo::ndarray::concatenate(
                cppo::ndarray::Axis(1),
                &[halves[0].view(), halves[1].view()],
            )
            .expect("same rows"),
        )
    } else {
        None
    };
    let rows = whole_rows(cfg, &partials, gathered.as_ref().map(|d| d.view()))?;

    // 2. All-reduce the shard's counts (of whole rows) across the data-parallel ranks.
    let shard = row_counts(&rows);
    comm.send(dp_peer, Msg::Counts(shard));
    let global = shard.merge(comm.recv_counts(dp_peer));
    let cfg = Config {
        num_tokens: Some(global.tokens),
        num_seqs: Some(global.seqs),
        ..*cfg
    };

    // 3. The left half starts every row afresh; the right half continues from the
    //    carries the left half leaves.
    let mut carries = if c == 0 {
        vec![Carry::default(); block.rows.len()]
    } else {
        comm.recv_carries(cp_peer)
    };
    let mut outputs = Outputs::zeros(batch.shape());
    let summary = evaluate_chunk_into(
        &cfg,
        &batch,
        pos,
        &rows,
        &mut carries,
        outputs.view_mut(),
        Par::Seq,
    )?;
    if c + 1 < CONTEXT_PARALLEL {
        comm.send(cp_peer, Msg::Carries(carries));
    } else {
        for (i, (carry, row)) in carries.iter().zip(&rows).enumerate() {
            carry.finish(block.rows.start + i, row, WIDTH)?;
        }
    }
    Ok(RankResult {
        rows: block.rows,
        cols: block.cols,
        outputs,
        loss: summary.loss,
        tally: summary.tally,
        sent: comm.sent,
    })
}

/// Runs the four ranks on their blocks of `data`, in threads.
fn run_ranks(cfg: &Config, data: &Data) -> cppo::Result<Vec<RankResult>> {
    let comms = Comm::mesh(RANKS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (d, c) = (comm.rank / CONTEXT_PARALLEL, comm.rank % CONTEXT_PARALLEL);
                let rows = d * ROWS / DATA_PARALLEL..(d + 1) * ROWS / DATA_PARALLEL;
                let cols = c * WIDTH / CONTEXT_PARALLEL..(c + 1) * WIDTH / CONTEXT_PARALLEL;
                let block = Block {
                    logp: data.logp.slice(s![rows.clone(), cols.clone()]),
                    logp_old: data.logp_old.slice(s![rows.clone(), cols.clone()]),
                    advantages: data.advantages.slice(s![rows.clone()]),
                    mask: data.mask.slice(s![rows.clone(), cols.clone()]),
                    rows,
                    cols,
                };
                scope.spawn(move || rank_main(cfg, comm, block))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------
// A realistic batch, made in-process
// ---------------------------------------------------------------------------------------

/// splitmix64, enough for a deterministic demo batch.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in lo..hi.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

struct Data {
    logp: Array2<f32>,
    logp_old: Array2<f32>,
    advantages: Array1<f32>,
    mask: Array2<bool>,
}

/// GRPO-like rollouts: each row a prompt (not trained on), a response of random length
/// (some end in the left half, some run into the right), sometimes a tool output inside
/// it (a hole in the mask), then padding holding NaN. Most tokens are near-certain; the
/// current policy has drifted from the rollout policy by a per-row amount that grows
/// along the response. Advantages are group-normalised 0/1 rewards, groups of 4 rows.
fn generate(seed: u64) -> Data {
    let mut rng = Rng(seed);
    let mut logp = Array2::from_elem((ROWS, WIDTH), f32::NAN);
    let mut logp_old = Array2::from_elem((ROWS, WIDTH), f32::NAN);
    let mut mask = Array2::from_elem((ROWS, WIDTH), false);
    for i in 0..ROWS {
        let prompt = rng.range(64, 512);
        let response = rng.range(32, WIDTH - prompt);
        let drift = [0.02, 0.08, 0.3][rng.range(0, 3)];
        let hole = (rng.unit() < 0.4).then(|| {
            let start = prompt + rng.range(0, response);
            start..start + rng.range(16, 96)
        });
        for j in 0..prompt + response {
            if j < prompt {
                (logp[[i, j]], logp_old[[i, j]]) = (0.0, 0.0);
                continue;
            }
            let lq = if rng.unit() < 0.6 {
                -0.02 * rng.unit()
            } else {
                1.5 * (1.0 - rng.unit()).ln() // minus an exponential, mean 1.5
            };
            let along = (j - prompt) as f64 / response as f64;
            let lp = (lq + drift * (1.0 + 2.0 * along) * rng.normal()).min(0.0);
            logp_old[[i, j]] = lq as f32;
            logp[[i, j]] = lp as f32;
            mask[[i, j]] = !hole.as_ref().is_some_and(|h| h.contains(&j));
        }
    }
    let mut advantages = Array1::zeros(ROWS);
    for g in 0..ROWS / 4 {
        let rewards: Vec<f64> = (0..4).map(|_| f64::from(rng.unit() < 0.5)).collect();
        let mean = rewards.iter().sum::<f64>() / 4.0;
        let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
        for (k, r) in rewards.iter().enumerate() {
            advantages[4 * g + k] = ((r - mean) / (std + 1e-6)) as f32;
        }
    }
    Data {
        logp,
        logp_old,
        advantages,
        mask,
    }
}

// ---------------------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------------------

fn same_bits(a: &Array2<f32>, b: &Array2<f32>) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn main() -> Result<(), cppo::Error> {
    let data = generate(7);
    let whole_batch = Batch::new(&data.logp, &data.logp_old, &data.advantages, &data.mask)?;
    let counts = whole_batch.counts()?;
    let half = WIDTH / CONTEXT_PARALLEL;
    let spanning = data
        .mask
        .rows()
        .into_iter()
        .filter(|m| m.iter().take(half).any(|&x| x) && m.iter().skip(half).any(|&x| x))
        .count();
    println!(
        "{ROWS} rows of {WIDTH} slots, {} response tokens, {spanning} rows with response tokens in both column halves",
        counts.tokens
    );
    println!("ranks: {DATA_PARALLEL} row shards x {CONTEXT_PARALLEL} column halves");
    let configs = [
        ("cppo, token-mean", Config::cppo()),
        (
            "trm_avg, seq-mean-token-mean",
            Config {
                rule: Rule::TrmAvg { delta: 0.1 },
                aggregation: Aggregation::SeqMeanTokenMean,
                ..Config::cppo()
            },
        ),
    ];
    for (name, cfg) in configs {
        let whole = evaluate(&cfg, &whole_batch, Par::Seq)?;
        let ranks = run_ranks(&cfg, &data)?;

        let mut got = Outputs::<f32>::zeros((ROWS, WIDTH));
        let (mut loss, mut tally, mut sent) = (0.0, Tally::default(), Sent::default());
        for r in &ranks {
            let at = s![r.rows.clone(), r.cols.clone()];
            got.divergence.slice_mut(at).assign(&r.outputs.divergence);
            got.weight.slice_mut(at).assign(&r.outputs.weight);
            got.threshold.slice_mut(at).assign(&r.outputs.threshold);
            got.keep.slice_mut(at).assign(&r.outputs.keep);
            got.reason.slice_mut(at).assign(&r.outputs.reason);
            got.token_loss.slice_mut(at).assign(&r.outputs.token_loss);
            got.grad.slice_mut(at).assign(&r.outputs.grad);
            loss += r.loss;
            tally = tally.merge(&r.tally);
            sent = sent.add(r.sent);
        }
        let want = &whole.outputs;
        assert!(same_bits(&got.grad, &want.grad), "{name}: grad");
        assert!(
            same_bits(&got.token_loss, &want.token_loss),
            "{name}: token_loss"
        );
        assert!(
            same_bits(&got.divergence, &want.divergence),
            "{name}: divergence"
        );
        assert!(same_bits(&got.weight, &want.weight), "{name}: weight");
        assert!(
            same_bits(&got.threshold, &want.threshold),
            "{name}: threshold"
        );
        assert_eq!(got.keep, want.keep, "{name}: keep");
        assert_eq!(got.reason, want.reason, "{name}: reason");
        // Under the surrogate objective without a KL term, l_t = g_t, so Σ|grad| is
        // Σ|a_t l_t|: the magnitude of the terms the loss adds up.
        let scale: f64 = want.grad.iter().map(|g| f64::from(g.abs())).sum();
        let err = (loss - whole.loss).abs();
        assert!(
            err <= 1e-12 * scale,
            "{name}: loss {loss} vs {}",
            whole.loss
        );
        let diagnostics = Diagnostics::new(&tally, &cfg);
        assert_eq!(
            diagnostics.response_tokens,
            whole.diagnostics.response_tokens
        );
        assert_eq!(diagnostics.sequences, whole.diagnostics.sequences);
        assert_eq!(diagnostics.kept_tokens, whole.diagnostics.kept_tokens);

        println!();
        println!(
            "{name}: loss {:.6e} (single process {:.6e}, |difference| {err:.1e})",
            loss, whole.loss
        );
        println!(
            "  masked {:.2}% of response tokens ({:.2}% by the prefix budget); every per-token output bit-identical to the single process",
            100.0 * diagnostics.masked_frac,
            100.0 * diagnostics.masked_frac_prefix_budget,
        );
        println!(
            "  exchanged {} bytes: row partials {} ({} B each, all-gathered), divergences {} (8 B a column, all-gathered for the calibrated budget), carries {} ({} B each, left to right), counts {} ({} B, all-reduced)",
            sent.total(),
            sent.partials,
            size_of::<RowPartial>(),
            sent.divergences,
            sent.carries,
            size_of::<Carry>(),
            sent.counts,
            size_of::<Counts>(),
        );
        println!(
            "  = {:.1} bytes per row, against {} bytes of logp, logp_old and mask per row",
            sent.total() as f64 / ROWS as f64,
            WIDTH * (2 * size_of::<f32>() + size_of::<bool>()),
        );
    }
    Ok(())
}
