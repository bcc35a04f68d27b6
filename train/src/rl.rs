//! The trainer: supervised warm start, sampling, and the RL update that takes its
//! advantages, mask, loss and gradient from `cppo`.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{D, Device, Tensor};
use candle_nn::ops::{log_softmax, softmax_last_dim};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use cppo::advantage::{GroupNorm, grpo};
use cppo::ndarray::{Array1, Array2, Axis};
use cppo::{Batch, Config, OutputsMut, Par, evaluate_into};

use crate::Res;
use crate::model::{Params, Policy};
use crate::probe::{Probe, StepOutputs};
use crate::rng::Rng;
use crate::task::{PAD, Task};

/// Everything a run needs besides the rule, identical for every rule in a comparison.
#[derive(Clone, Debug)]
pub struct Hyper {
    pub task: Task,
    /// RL iterations (one rollout batch each).
    pub iters: usize,
    /// Prompts per rollout batch.
    pub prompts: usize,
    /// Answers sampled per prompt (the GRPO group).
    pub group: usize,
    /// Minibatches per rollout batch: one optimizer step each.
    pub minibatches: usize,
    /// Passes over the rollout batch.
    pub epochs: usize,
    /// The rollout policy is the policy as it was this many iterations ago.
    pub lag: usize,
    /// AdamW learning rate of the RL phase.
    pub lr: f64,
    /// AdamW weight decay of the RL phase.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    pub grad_clip: f64,
    /// Evaluate greedy accuracy every this many iterations (and at the last).
    pub eval_every: usize,
    /// Held-out prompts for the greedy and sampled accuracies.
    pub eval_prompts: usize,
    /// Samples per held-out prompt for the sampled accuracy Avg@k (0: greedy only).
    pub eval_samples: usize,
    /// The rollout temperature τ_μ: rollouts are sampled from softmax(z / τ_μ) and
    /// `logp_old` is their log-prob under that distribution, while the trained policy is
    /// softmax(z). τ_μ ≠ 1 is a behaviour-policy mismatch of a fixed size per token.
    pub tau_mu: f64,
}

impl Hyper {
    /// Optimizer steps per rollout batch: the staleness of the last step's data.
    pub fn steps_per_rollout(&self) -> usize {
        self.minibatches * self.epochs
    }

    /// The evaluations of a run that goes to the end (after iteration 1, every
    /// `eval_every`-th and the last).
    pub fn evaluations(&self) -> usize {
        (1..=self.iters)
            .filter(|&i| i == 1 || i == self.iters || i.is_multiple_of(self.eval_every.max(1)))
            .count()
    }
}

/// One RL iteration's log line.
#[derive(Clone, Debug, Default)]
pub struct IterLog {
    pub iter: usize,
    /// Mean reward of the sampled answers.
    pub reward: f64,
    /// Greedy accuracy on the held-out prompts (NaN when not evaluated).
    pub accuracy: f64,
    /// Sampled accuracy Avg@k (temperature 1) on the held-out prompts (NaN when not
    /// evaluated).
    pub sampled_accuracy: f64,
    /// Mean per-token entropy of the rollout policy on its samples.
    pub entropy: f64,
    /// Mean response length (tokens, EOS included).
    pub resp_len: f64,
    /// Fraction of groups whose answers all got the same reward (zero advantage).
    pub flat_groups: f64,
    /// Means over the iteration's optimizer steps of the crate's diagnostics.
    pub loss: f64,
    pub masked_frac: f64,
    pub masked_token: f64,
    pub masked_budget: f64,
    pub bypass_frac: f64,
    pub kl_k3: f64,
    /// KL(μ‖π) estimate at the iteration's last step, where drift is largest.
    pub kl_k3_last: f64,
    pub divergence_max: f64,
    pub ratio_max: f64,
    /// Global gradient norm before clipping, mean over steps.
    pub grad_norm: f64,
    /// The iteration's share of |dL/dlogp| carried by bypassed tokens.
    pub bypass_grad_share: f64,
    pub secs: f64,
}

impl IterLog {
    pub const CSV_HEADER: &'static str = "iter,reward,accuracy,sampled_accuracy,entropy,resp_len,flat_groups,loss,masked_frac,masked_token,masked_budget,bypass_frac,kl_k3,kl_k3_last,divergence_max,ratio_max,grad_norm,bypass_grad_share,secs";

    pub fn csv(&self) -> String {
        format!(
            "{},{:.6},{},{},{:.6},{:.4},{:.4},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.6e},{:.6e},{:.6},{:.6},{:.6e},{:.6},{:.3}",
            self.iter,
            self.reward,
            blank_nan(self.accuracy),
            blank_nan(self.sampled_accuracy),
            self.entropy,
            self.resp_len,
            self.flat_groups,
            self.loss,
            self.masked_frac,
            self.masked_token,
            self.masked_budget,
            self.bypass_frac,
            self.kl_k3,
            self.kl_k3_last,
            self.divergence_max,
            self.ratio_max,
            self.grad_norm,
            self.bypass_grad_share,
            self.secs,
        )
    }
}

/// An evaluation's value, or an empty CSV field where there was none.
fn blank_nan(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else {
        format!("{x:.6}")
    }
}

/// Responses for `prompts` (each `task.prompt_len()` tokens): sampled from
/// softmax(z / `temperature`) with `rng`, or greedy without. A response ends at EOS
/// (included) or at the task's response length.
pub fn generate(
    params: &Params,
    task: &Task,
    prompts: &[Vec<u32>],
    mut rng: Option<&mut Rng>,
    temperature: f64,
    dev: &Device,
) -> Res<Vec<Vec<u32>>> {
    let (b, p, r) = (prompts.len(), task.prompt_len(), task.response_len());
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let mut input = Tensor::from_vec(flat, (b, p), dev)?;
    // Keys and values of the positions so far: each step feeds one new token.
    let mut cache = Vec::new();
    let mut out = vec![Vec::with_capacity(r); b];
    let mut done = vec![false; b];
    for _ in 0..r {
        let logits = params.forward(&input, &mut cache)?;
        let t = logits.dim(1)?;
        let mut last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        if temperature != 1.0 {
            last = (last / temperature)?;
        }
        let probs = softmax_last_dim(&last)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (i, row) in probs.iter().enumerate() {
            let tok = if done[i] {
                PAD
            } else {
                let t = match rng.as_deref_mut() {
                    Some(rng) => rng.categorical(row),
                    None => argmax(row),
                } as u32;
                out[i].push(t);
                done[i] = t == crate::task::EOS;
                t
            };
            next.push(tok);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), dev)?;
    }
    Ok(out)
}

/// The sampling stream of the evaluation after iteration `iter`: the same for every rule
/// of a seed (common random numbers for the paired comparison).
pub fn eval_rng(seed: u64, iter: usize) -> Rng {
    Rng::new(seed, 1000 + iter as u64)
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Exact-match accuracy on `set` (digit lists): greedy without `rng`, one sample per
/// prompt at temperature 1 with it.
pub fn accuracy(
    params: &Params,
    task: &Task,
    set: &[Vec<u32>],
    mut rng: Option<&mut Rng>,
    dev: &Device,
) -> Res<f64> {
    let mut correct = 0.0;
    for chunk in set.chunks(256) {
        let prompts: Vec<_> = chunk.iter().map(|d| task.prompt(d)).collect();
        let outs = generate(params, task, &prompts, rng.as_deref_mut(), 1.0, dev)?;
        correct += chunk
            .iter()
            .zip(&outs)
            .map(|(d, o)| task.reward(d, o))
            .sum::<f64>();
    }
    Ok(correct / set.len() as f64)
}

/// Sampled accuracy Avg@k: the mean exact-match rate over `k` samples per prompt of
/// `set` at temperature 1, drawn from `rng`.
pub fn sampled_accuracy(
    params: &Params,
    task: &Task,
    set: &[Vec<u32>],
    k: usize,
    rng: &mut Rng,
    dev: &Device,
) -> Res<f64> {
    let mut sum = 0.0;
    for _ in 0..k {
        sum += accuracy(params, task, set, Some(rng), dev)?;
    }
    Ok(sum / k as f64)
}

/// Full sequences (B, seq_len), PAD after the response.
fn pack(task: &Task, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Vec<u32> {
    let s = task.seq_len();
    let mut v = Vec::with_capacity(prompts.len() * s);
    for (p, r) in prompts.iter().zip(responses) {
        v.extend_from_slice(p);
        v.extend_from_slice(r);
        v.extend(std::iter::repeat_n(PAD, s - p.len() - r.len()));
    }
    v
}

/// Log-probabilities (B, R) of the response tokens of `seqs` (B, seq_len) under
/// softmax(z / `temperature`) of `params`, by teacher forcing, and the full next-token
/// log-probs (B, R, V).
fn response_logp(
    params: &Params,
    task: &Task,
    seqs: &Tensor,
    temperature: f64,
) -> Res<(Tensor, Tensor)> {
    let s = task.seq_len();
    let (p, r) = (task.prompt_len(), task.response_len());
    let input = seqs.narrow(1, 0, s - 1)?;
    let target = seqs.narrow(1, p, r)?.contiguous()?;
    let mut logits = params.logits(&input)?;
    if temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let all = log_softmax(&logits, D::Minus1)?
        .narrow(1, p - 1, r)?
        .contiguous()?;
    let logp = all.gather(&target.unsqueeze(2)?, 2)?.squeeze(2)?;
    Ok((logp, all))
}

fn to_array2(t: &Tensor) -> Res<Array2<f32>> {
    let (b, l) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Array2::from_shape_vec((b, l), v)?)
}

/// The global gradient norm; scales the gradients down to `clip` when above it.
fn clip_grads(vars: &[candle_core::Var], grads: &mut GradStore, clip: f64) -> Res<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = sq.sqrt();
    if clip > 0.0 && norm > clip {
        let scale = clip / norm;
        for v in vars {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// The supervised warm start's settings.
#[derive(Clone, Copy, Debug)]
pub struct Sft {
    /// Stop at this sampled accuracy on the validation set.
    pub target: f64,
    /// Stop after this many steps at the latest.
    pub max_steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
}

/// Supervised warm start (the "pretrained model" RL starts from): teacher-forced
/// cross-entropy on correct answers, until the sampled (temperature 1) accuracy on a
/// validation set reaches `target` (checked every 10 steps) or `max_steps` have run.
/// Sampled, not greedy: RL needs groups whose answers differ in reward.
pub fn warm_start(
    init: &Params,
    task: &Task,
    seed: u64,
    sft: &Sft,
    dev: &Device,
) -> Res<(Params, usize, f64)> {
    let policy = init.to_policy()?;
    let mut opt = AdamW::new(
        policy.vars.clone(),
        ParamsAdamW {
            lr: sft.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(seed, 1);
    let valid = validation_set(task, seed);
    let (batch, max_steps) = (sft.batch, sft.max_steps);
    let mut acc = 0.0;
    for step in 1..=max_steps {
        let digits: Vec<_> = (0..batch).map(|_| task.digits(&mut rng)).collect();
        let prompts: Vec<_> = digits.iter().map(|d| task.prompt(d)).collect();
        let answers: Vec<_> = digits.iter().map(|d| task.answer(d)).collect();
        let seqs = Tensor::from_vec(pack(task, &prompts, &answers), (batch, task.seq_len()), dev)?;
        let (logp, _) = response_logp(&policy.params, task, &seqs, 1.0)?;
        let loss = logp.mean_all()?.neg()?;
        opt.backward_step(&loss)?;
        if step.is_multiple_of(10) || step == max_steps {
            acc = accuracy(
                &policy.params,
                task,
                &valid,
                Some(&mut Rng::new(seed, 3)),
                dev,
            )?;
            if acc >= sft.target {
                return Ok((policy.params.snapshot()?, step, acc));
            }
        }
    }
    Ok((policy.params.snapshot()?, max_steps, acc))
}

/// The warm start's validation prompts.
fn validation_set(task: &Task, seed: u64) -> Vec<Vec<u32>> {
    let mut vrng = Rng::new(seed, 2);
    (0..256).map(|_| task.digits(&mut vrng)).collect()
}

/// The sampled accuracy on the warm start's validation set, as [`warm_start`] measures
/// it when it decides to stop.
pub fn validation_accuracy(params: &Params, task: &Task, seed: u64, dev: &Device) -> Res<f64> {
    let valid = validation_set(task, seed);
    accuracy(params, task, &valid, Some(&mut Rng::new(seed, 3)), dev)
}

/// What a run reports when it ends.
pub struct RunResult {
    pub logs: Vec<IterLog>,
    /// The run's measurements by response position.
    pub probe: Probe,
    /// Set when the run stopped early on an error (a non-finite log-prob, say).
    pub error: Option<String>,
}

/// RL from `base` with the rule in `cfg`. `on_iter` sees each iteration's log. An
/// error inside an iteration (a non-finite log-prob, say) ends the run, not the program:
/// it is reported in [`RunResult::error`] with the logs so far.
pub fn train(
    base: &Params,
    cfg: &Config,
    h: &Hyper,
    seed: u64,
    eval_set: &[Vec<u32>],
    dev: &Device,
    mut on_iter: impl FnMut(&IterLog),
) -> Res<RunResult> {
    let mut run = Run::new(base, cfg, h, seed, eval_set, dev)?;
    let mut logs = Vec::with_capacity(h.iters);
    for iter in 1..=h.iters {
        let t0 = Instant::now();
        let mut log = match run.iteration(iter) {
            Ok(log) => log,
            Err(e) => {
                return Ok(RunResult {
                    logs,
                    probe: run.probe,
                    error: Some(format!("iteration {iter}: {e}")),
                });
            }
        };
        log.secs = t0.elapsed().as_secs_f64();
        on_iter(&log);
        let finite = log.loss.is_finite() && log.grad_norm.is_finite();
        logs.push(log);
        if !finite {
            return Ok(RunResult {
                logs,
                probe: run.probe,
                error: Some(format!("iteration {iter}: non-finite loss or gradient")),
            });
        }
    }
    Ok(RunResult {
        logs,
        probe: run.probe,
        error: None,
    })
}

/// A run's state between iterations.
struct Run<'a> {
    cfg: &'a Config,
    h: &'a Hyper,
    eval_set: &'a [Vec<u32>],
    dev: &'a Device,
    policy: Policy,
    opt: AdamW,
    prompt_rng: Rng,
    sample_rng: Rng,
    shuffle_rng: Rng,
    /// Snapshots of the policy at the start of the last `lag + 1` iterations.
    behind: VecDeque<Params>,
    /// The crate's per-token outputs, reused every step (`evaluate_into` allocates
    /// nothing).
    grad: Array2<f32>,
    divergence: Array2<f32>,
    weight: Array2<f32>,
    reason: Array2<u8>,
    groups: Vec<u64>,
    /// The held-out prompts, which training prompts never repeat.
    held_out: HashSet<Vec<u32>>,
    seed: u64,
    probe: Probe,
}

impl<'a> Run<'a> {
    fn new(
        base: &Params,
        cfg: &'a Config,
        h: &'a Hyper,
        seed: u64,
        eval_set: &'a [Vec<u32>],
        dev: &'a Device,
    ) -> Res<Self> {
        let policy = base.to_policy()?;
        let opt = AdamW::new(
            policy.vars.clone(),
            ParamsAdamW {
                lr: h.lr,
                weight_decay: h.weight_decay,
                ..Default::default()
            },
        )?;
        let b = h.prompts * h.group;
        if h.minibatches == 0 || !b.is_multiple_of(h.minibatches) {
            return Err(format!(
                "prompts x group = {b} does not split into {} minibatches",
                h.minibatches
            )
            .into());
        }
        Ok(Self {
            cfg,
            h,
            eval_set,
            dev,
            policy,
            opt,
            // Separate streams: prompts, samples and shuffles of one seed do not depend
            // on each other, and the prompts are the same for every rule.
            prompt_rng: Rng::new(seed, 10),
            sample_rng: Rng::new(seed, 11),
            shuffle_rng: Rng::new(seed, 12),
            behind: VecDeque::new(),
            grad: Array2::zeros((b / h.minibatches, h.task.response_len())),
            divergence: Array2::zeros((b / h.minibatches, h.task.response_len())),
            weight: Array2::zeros((b / h.minibatches, h.task.response_len())),
            reason: Array2::zeros((b / h.minibatches, h.task.response_len())),
            groups: (0..b).map(|i| (i / h.group) as u64).collect(),
            held_out: eval_set.iter().cloned().collect(),
            seed,
            probe: Probe::new(
                h.task.response_len(),
                cfg.rule.cppo_params().map_or(f64::INFINITY, |p| p.delta),
            ),
        })
    }

    fn iteration(&mut self, iter: usize) -> Res<IterLog> {
        let (h, task, dev) = (self.h, self.h.task, self.dev);
        let (b, r, s) = (h.prompts * h.group, task.response_len(), task.seq_len());
        let mb = b / h.minibatches;
        // The rollout policy: the policy as it was `lag` iterations ago.
        self.behind.push_back(self.policy.params.snapshot()?);
        while self.behind.len() > h.lag + 1 {
            self.behind.pop_front();
        }
        let rollout = &self.behind[0];

        // Sample G answers per prompt and score them with the checker.
        let digits: Vec<Vec<u32>> = (0..h.prompts)
            .flat_map(|_| {
                let d = loop {
                    let d = task.digits(&mut self.prompt_rng);
                    if !self.held_out.contains(&d) {
                        break d;
                    }
                };
                std::iter::repeat_n(d, h.group)
            })
            .collect();
        let prompts: Vec<_> = digits.iter().map(|d| task.prompt(d)).collect();
        let responses = generate(
            rollout,
            &task,
            &prompts,
            Some(&mut self.sample_rng),
            h.tau_mu,
            dev,
        )?;
        let mut rewards = Vec::with_capacity(b);
        for (d, o) in digits.iter().zip(&responses) {
            let first_error = task.first_error(d, o);
            if let Some(t) = first_error {
                self.probe.add_failure(t);
            }
            rewards.push(f64::from(u8::from(first_error.is_none())));
        }
        let flat_groups = rewards
            .chunks(h.group)
            .filter(|g| g.iter().all(|&x| x == g[0]))
            .count() as f64
            / h.prompts as f64;

        // Advantages from the crate: GRPO's group-normalised outcome rewards, one per row.
        let adv = grpo(&rewards, &self.groups, GroupNorm::GRPO)?;
        let adv: Array1<f32> = adv.iter().map(|&a| a as f32).collect();
        let mask = Array2::from_shape_fn((b, r), |(i, j)| j < responses[i].len());

        // logp_old: the rollout policy's log-probs of its own tokens at its temperature,
        // teacher-forced (as verl recomputes them), and its entropy for the log.
        let seqs = Tensor::from_vec(pack(&task, &prompts, &responses), (b, s), dev)?;
        let (logp_old_t, all_old) = response_logp(rollout, &task, &seqs, h.tau_mu)?;
        let logp_old = to_array2(&logp_old_t)?;
        let ent = to_array2(&(all_old.exp()? * &all_old)?.sum(D::Minus1)?.neg()?)?;
        let n_tok = mask.iter().filter(|&&m| m).count().max(1) as f64;
        let entropy = ent
            .iter()
            .zip(&mask)
            .filter(|&(_, &m)| m)
            .map(|(&e, _)| f64::from(e))
            .sum::<f64>()
            / n_tok;

        let mut log = IterLog {
            iter,
            reward: rewards.iter().sum::<f64>() / b as f64,
            accuracy: f64::NAN,
            sampled_accuracy: f64::NAN,
            entropy,
            resp_len: n_tok / b as f64,
            flat_groups,
            ..Default::default()
        };
        // The updates: `epochs` passes over the shuffled rows in `minibatches` steps.
        // Every step after the first trains on data from an older policy.
        let steps = h.steps_per_rollout() as f64;
        let mut rows: Vec<usize> = (0..b).collect();
        let (mut bypassed_grad, mut total_grad) = (0.0, 0.0);
        for _ in 0..h.epochs {
            self.shuffle_rng.shuffle(&mut rows);
            for idx in rows.chunks(mb) {
                let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                let seqs_mb = seqs.index_select(&Tensor::from_vec(ids, mb, dev)?, 0)?;
                // 1. The current policy's log-probs of the sampled tokens, tracked.
                let (logp, _) = response_logp(&self.policy.params, &task, &seqs_mb, 1.0)?;
                // 2. A detached host copy; the crate computes the mask, loss and dL/dlogp.
                let logp_host = to_array2(&logp.detach())?;
                let logp_old_mb = logp_old.select(Axis(0), idx);
                let adv_mb = adv.select(Axis(0), idx);
                let mask_mb = mask.select(Axis(0), idx);
                let batch = Batch::new(&logp_host, &logp_old_mb, &adv_mb, &mask_mb)?;
                let out = OutputsMut {
                    grad: Some(self.grad.view_mut()),
                    divergence: Some(self.divergence.view_mut()),
                    weight: Some(self.weight.view_mut()),
                    reason: Some(self.reason.view_mut()),
                    ..Default::default()
                };
                let summary = evaluate_into(self.cfg, &batch, out, Par::Seq)?;
                let before = (self.probe.grad_bypassed(), self.probe.grad_total());
                self.probe.add_step(
                    &logp_host,
                    &logp_old_mb,
                    &mask_mb,
                    &StepOutputs {
                        divergence: self.divergence.view(),
                        weight: self.weight.view(),
                        reason: self.reason.view(),
                        grad: self.grad.view(),
                    },
                );
                bypassed_grad += self.probe.grad_bypassed() - before.0;
                total_grad += self.probe.grad_total() - before.1;
                // 3. grad enters the graph as a constant: d/dlogp sum(grad * logp) = grad.
                let grad = self.grad.as_slice().expect("a fresh array is contiguous");
                let g = Tensor::from_slice(grad, (mb, r), dev)?;
                let mut grads = (g * &logp)?.sum_all()?.backward()?;
                log.grad_norm += clip_grads(&self.policy.vars, &mut grads, h.grad_clip)? / steps;
                self.opt.step(&grads)?;

                let d = &summary.diagnostics;
                log.loss += summary.loss / steps;
                log.masked_frac += d.masked_frac / steps;
                log.masked_token += d.masked_frac_token_threshold / steps;
                log.masked_budget += d.masked_frac_prefix_budget / steps;
                log.bypass_frac += d.bypass_frac / steps;
                log.kl_k3 += d.approx_kl_k3 / steps;
                log.kl_k3_last = d.approx_kl_k3;
                log.divergence_max = log.divergence_max.max(d.divergence_max);
                log.ratio_max = log.ratio_max.max(d.ratio_max);
            }
        }
        log.bypass_grad_share = bypassed_grad / total_grad;
        if iter.is_multiple_of(h.eval_every.max(1)) || iter == h.iters || iter == 1 {
            log.accuracy = accuracy(&self.policy.params, &task, self.eval_set, None, dev)?;
            if h.eval_samples > 0 {
                log.sampled_accuracy = sampled_accuracy(
                    &self.policy.params,
                    &task,
                    self.eval_set,
                    h.eval_samples,
                    &mut eval_rng(self.seed, iter),
                    dev,
                )?;
            }
        }
        Ok(log)
    }
}
