//! What `cppo inspect` computes from a batch, and the report it prints and writes.
//!
//! Every batch-level number comes from the library: each rule's [`Diagnostics`] is the
//! one [`cppo::evaluate`] returns for that config. The per-position numbers are reduced
//! here from the per-token outputs of that same call (`divergence`, `weight`,
//! `threshold`, `reason`):
//!
//! - **Position buckets.** A response token's position is relative to its row's response:
//!   t = 1..T counts response tokens only (holes in the mask do not advance it), and the
//!   token falls in bucket ⌊n (t − 1)/T⌋ of n. With n = 10 these are the library's
//!   deciles, so the masked fractions equal `Diagnostics::masked_frac_by_decile`.
//! - **Quantiles** (median, p90, p99 of D_t) interpolate linearly between order
//!   statistics, as numpy's default does.
//! - **Thresholds.** The mean effective threshold per bucket averages the finite `c_t`
//!   outputs (δ for DPPO and TRM), as `Diagnostics::threshold_mean` does for the batch;
//!   the token limit δ/w_t is CPPO's per-token test w_t D_t ≤ δ written on D_t's scale.
//!
//! Empty buckets give NaN (shown as `-`, `null` in JSON, a gap in a plot).

use std::fmt::Write as _;

use cppo::ndarray::Array2;
use cppo::{
    Config, CppoParams, Diagnostics, Divergence, Float, Gate, OutputsMut, Par, Reason, Rule,
};
use serde::Serialize;

use crate::batchfile::Arrays;
use crate::failure::Failure;
use crate::npz::NpyFloat;
use crate::warnings::{self, BatchShape, RuleFacts, Warning};

/// A named config: one line in every table and plot.
#[derive(Clone, Debug, Serialize)]
pub struct RuleSpec {
    pub name: String,
    pub config: Config,
}

/// The built-in comparison set, all on `divergence`: GRPO's ratio clip, DPPO, CPPO with
/// the prefix budget alone (w_min = 1), with the position weights alone (no budget), the
/// paper's two ablations (the soft gate, shuffled weights), CPPO with a fixed budget,
/// and full CPPO (the paper's calibrated budget), at the paper's defaults otherwise.
pub fn compare_set(divergence: Divergence) -> cppo::Result<Vec<RuleSpec>> {
    let spec = |name: &str, rule: Rule| RuleSpec {
        name: name.into(),
        config: Config {
            divergence,
            ..Config::with_rule(rule)
        },
    };
    let cppo = |p: CppoParams| Rule::Cppo(p);
    let paper = CppoParams::default();
    let set = vec![
        spec("GRPO ratio clip", Config::grpo().rule),
        spec("DPPO", Config::dppo().rule),
        spec(
            "CPPO budget-only",
            cppo(CppoParams {
                w_min: 1.0,
                ..paper
            }),
        ),
        spec(
            "CPPO weight-only",
            cppo(CppoParams {
                delta_b: None,
                ..paper
            }),
        ),
        // The paper's two ablations of CPPO itself, the fixed budget beside the
        // calibrated one, then the full method (last: the strip chart shows the last
        // rule).
        spec(
            "CPPO soft gate",
            cppo(CppoParams {
                gate: Some(Gate::Inverse),
                ..paper
            }),
        ),
        spec(
            "CPPO shuffled weights",
            cppo(CppoParams {
                shuffle_seed: Some(0),
                ..paper
            }),
        ),
        spec(
            "CPPO fixed budget",
            cppo(CppoParams {
                calibration: None,
                ..paper
            }),
        ),
        spec("CPPO (full)", Config::cppo().rule),
    ];
    for r in &set {
        r.config.validate()?;
    }
    Ok(set)
}

/// A rule's parameters as its config spells them (`{"kind": "cppo", "delta": ...}`):
/// read through serde, so that every rule the library has is described.
fn rule_fields(cfg: &Config) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(cfg.rule) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// A rule's parameters in one short line, e.g. `cppo: delta 0.2, delta_b 0.05, w_min
/// 0.8; divergence binary_tv`. Unset options are left out; a `delta_b` of null reads
/// "no budget".
pub fn describe(cfg: &Config) -> String {
    let fields = rule_fields(cfg);
    let kind = fields
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or(cfg.rule.name());
    let params: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k.as_str() != "kind")
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null if k == "delta_b" => Some("no budget".to_string()),
            serde_json::Value::Null if k == "calibration" && has_budget(cfg) => {
                Some("fixed budget".to_string())
            }
            serde_json::Value::Null => None,
            // Without a budget a calibration does nothing: left out.
            _ if k == "calibration" && !has_budget(cfg) => None,
            serde_json::Value::Object(c) if k == "calibration" => {
                let f = |name: &str| c.get(name).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
                Some(format!(
                    "budget calibrated: {} × Q{} in [delta_b, {} delta_b]",
                    f("scale"),
                    f("quantile"),
                    f("ceiling")
                ))
            }
            serde_json::Value::String(x) => Some(format!("{k} {x}")),
            v => Some(format!("{k} {v}")),
        })
        .collect();
    let params = if params.is_empty() {
        String::new()
    } else {
        format!(": {}", params.join(", "))
    };
    format!("{kind}{params}; divergence {}", cfg.divergence.name())
}

/// CPPO's δ (of `cppo` and its variants): the rules with a position-weighted token
/// limit δ/w_t.
pub fn cppo_delta(cfg: &Config) -> Option<f64> {
    let fields = rule_fields(cfg);
    let kind = fields.get("kind")?.as_str()?;
    if kind.starts_with("cppo") {
        fields.get("delta")?.as_f64()
    } else {
        None
    }
}

/// Whether a rule has CPPO's prefix budget.
pub fn has_budget(cfg: &Config) -> bool {
    cppo_delta(cfg).is_some()
        && rule_fields(cfg)
            .get("delta_b")
            .is_some_and(|b| !b.is_null())
}

// ---------------------------------------------------------------------------------------
// Analysis of one batch
// ---------------------------------------------------------------------------------------

/// What was inspected.
#[derive(Clone, Debug, Serialize)]
pub struct BatchInfo {
    /// The input, as the report names it.
    pub input: String,
    /// A short name for it (the file name), for plot titles.
    pub name: String,
    pub rows: usize,
    pub len: usize,
    pub dtype: &'static str,
    /// Whether the advantages are one per row.
    pub per_row_advantages: bool,
}

/// The statistics of one divergence by position.
#[derive(Clone, Debug, Serialize)]
pub struct DivergencePositions {
    /// Response tokens per bucket.
    pub tokens: Vec<u64>,
    pub mean: Vec<f64>,
    pub median: Vec<f64>,
    pub p90: Vec<f64>,
}

/// One divergence over the batch.
#[derive(Clone, Debug, Serialize)]
pub struct DivergenceStats {
    pub divergence: Divergence,
    /// Mean and max are the library's (`Diagnostics::divergence_mean`, `_max`).
    pub mean: f64,
    pub max: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    /// By position bucket (`buckets` of them).
    pub by_position: DivergencePositions,
    /// By tenth of the response.
    pub by_decile: DivergencePositions,
}

/// One rule's decisions by position bucket.
#[derive(Clone, Debug, Serialize)]
pub struct RulePositions {
    pub tokens: Vec<u64>,
    /// Masked (reasons 3 and 4) / tokens.
    pub masked_frac: Vec<f64>,
    /// Reason 3 / tokens.
    pub masked_frac_token_threshold: Vec<f64>,
    /// Reason 4 / tokens.
    pub masked_frac_prefix_budget: Vec<f64>,
    /// Reason 2 / tokens.
    pub bypass_frac: Vec<f64>,
    /// Mean of the finite c_t (δ for DPPO and TRM); `None` for rules without one.
    pub threshold_mean: Option<Vec<f64>>,
    /// Mean of δ/w_t, CPPO only.
    pub token_limit_mean: Option<Vec<f64>>,
}

/// One rule on the batch.
#[derive(Clone, Debug, Serialize)]
pub struct RuleResult {
    pub name: String,
    pub config: Config,
    /// Exactly what `cppo::evaluate` returned.
    pub diagnostics: Diagnostics,
    pub by_position: RulePositions,
    /// The reason codes, for the strip chart.
    #[serde(skip)]
    pub reasons: Array2<u8>,
}

/// The rows of the strip chart.
#[derive(Clone, Debug, Serialize)]
pub struct Strip {
    /// Index into [`Analysis::rules`].
    pub rule: usize,
    pub rows: Vec<usize>,
    /// The rows' advantages, when they are per row.
    pub advantages: Option<Vec<f64>>,
    /// Whether the rows were chosen by [`choose_rows`] (else given by `--strip-rows`).
    pub chosen: bool,
}

/// Everything `cppo inspect` reports on one batch.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub batch: BatchInfo,
    /// Position buckets of the plots and of `by_position`.
    pub buckets: usize,
    pub divergences: Vec<DivergenceStats>,
    pub rules: Vec<RuleResult>,
    pub strip: Strip,
    /// What a practitioner should look at twice ([`crate::warnings`]).
    pub warnings: Vec<Warning>,
}

/// How to reduce.
pub struct Options {
    pub buckets: usize,
    /// Rows of the strip chart, or empty to choose them.
    pub strip_rows: Vec<usize>,
    /// The rule of the strip chart by name, or `None` to choose it.
    pub strip_rule: Option<String>,
}

/// How many rows the strip chart shows when it chooses them.
pub const STRIP_ROWS: usize = 6;

/// Runs every rule on a batch and reduces the outputs. `context` turns a library error
/// into the one-line failure, naming the input.
pub fn analyse<F: NpyFloat>(
    arrays: &Arrays<F>,
    (input, name): (String, String),
    rules: &[RuleSpec],
    opts: &Options,
    context: &dyn Fn(cppo::Error) -> Failure,
) -> Result<Analysis, Failure> {
    let batch = arrays.batch().map_err(context)?;
    let (rows, len) = batch.shape();
    // Strip options are checked before the work.
    let strip_rule = match &opts.strip_rule {
        Some(name) => Some(rules.iter().position(|r| &r.name == name).ok_or_else(|| {
            let names: Vec<_> = rules.iter().map(|r| format!("{:?}", r.name)).collect();
            Failure::Input(format!(
                "--strip-rule {name:?} is not one of the rules: {}",
                names.join(", ")
            ))
        })?),
        None => None,
    };
    if let Some(&r) = opts.strip_rows.iter().find(|&&r| r >= rows) {
        return Err(Failure::Input(format!(
            "--strip-rows: row {r} is out of range, the batch has {rows} rows"
        )));
    }

    let mut results = Vec::with_capacity(rules.len());
    let mut divergences: Vec<DivergenceStats> = Vec::new();
    let mut exhausted = Vec::with_capacity(rules.len());
    for spec in rules {
        let eval = cppo::evaluate(&spec.config, &batch, Par::Rayon).map_err(context)?;
        let o = &eval.outputs;
        exhausted.push(
            spec.config
                .rule
                .has_budget()
                .then(|| warnings::exhausted_at_first_token(&o.threshold, &o.reason)),
        );
        if !divergences
            .iter()
            .any(|d| d.divergence == spec.config.divergence)
        {
            divergences.push(divergence_stats(
                spec.config.divergence,
                &eval.diagnostics,
                &o.divergence,
                &o.reason,
                opts.buckets,
            ));
        }
        let by_position = rule_positions(&spec.config, o, opts.buckets);
        results.push(RuleResult {
            name: spec.name.clone(),
            config: spec.config,
            diagnostics: eval.diagnostics,
            by_position,
            reasons: eval.outputs.reason,
        });
    }

    let rule = strip_rule.unwrap_or_else(|| default_strip_rule(rules));
    let strip_rows = if opts.strip_rows.is_empty() {
        results
            .get(rule)
            .map(|r| choose_rows(&r.reasons, STRIP_ROWS))
            .unwrap_or_default()
    } else {
        opts.strip_rows.clone()
    };
    let advantages = arrays
        .row_advantages()
        .map(|a| strip_rows.iter().map(|&i| a[i]).collect());
    let facts: Vec<RuleFacts<'_>> = results
        .iter()
        .zip(&exhausted)
        .map(|(r, &exhausted_rows)| RuleFacts {
            name: &r.name,
            config: &r.config,
            diagnostics: &r.diagnostics,
            exhausted_rows,
        })
        .collect();
    let warnings = warnings::check(BatchShape { rows, len }, &facts);
    Ok(Analysis {
        batch: BatchInfo {
            input,
            name,
            rows,
            len,
            dtype: F::DTYPE,
            per_row_advantages: arrays.row_advantages().is_some(),
        },
        buckets: opts.buckets,
        divergences,
        rules: results,
        strip: Strip {
            rule,
            rows: strip_rows,
            advantages,
            chosen: opts.strip_rows.is_empty(),
        },
        warnings,
    })
}

/// The last rule with a prefix budget (full CPPO in the built-in set), else the last.
fn default_strip_rule(rules: &[RuleSpec]) -> usize {
    rules
        .iter()
        .rposition(|r| has_budget(&r.config))
        .unwrap_or(rules.len().saturating_sub(1))
}

/// The rows that show the most decisions: those holding the most of the four token
/// kinds (budget-masked, threshold-masked, bypassed, kept), then the most masked or
/// bypassed tokens; shown in row order.
fn choose_rows(reasons: &Array2<u8>, n: usize) -> Vec<usize> {
    let mut scored: Vec<(usize, usize, usize)> = reasons
        .outer_iter()
        .enumerate()
        .filter_map(|(i, row)| {
            let mut count = [0usize; 5];
            for &r in row {
                count[usize::from(r.min(4))] += 1;
            }
            let tokens: usize = count[1..].iter().sum();
            (tokens > 0).then(|| {
                let kinds = count[1..].iter().filter(|&&c| c > 0).count();
                (i, kinds, count[2] + count[3] + count[4])
            })
        })
        .collect();
    scored.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    let mut rows: Vec<usize> = scored.into_iter().take(n).map(|s| s.0).collect();
    rows.sort_unstable();
    rows
}

/// Calls `f(bucket, column)` for each response token of each row, in row order, with
/// the bucket ⌊n (t − 1)/T⌋ of its relative position.
fn for_each_token(reasons: &Array2<u8>, n: usize, mut f: impl FnMut(usize, usize, usize)) {
    for (i, row) in reasons.outer_iter().enumerate() {
        let total = row
            .iter()
            .filter(|&&r| r != Reason::NotResponse.code())
            .count();
        let mut t = 0usize;
        for (j, &r) in row.iter().enumerate() {
            if r == Reason::NotResponse.code() {
                continue;
            }
            f(i, j, n * t / total);
            t += 1;
        }
    }
}

fn ratio(num: f64, den: u64) -> f64 {
    if den == 0 { f64::NAN } else { num / den as f64 }
}

fn rule_positions<F: Float>(cfg: &Config, o: &cppo::Outputs<F>, n: usize) -> RulePositions {
    let mut tokens = vec![0u64; n];
    let mut by_reason = vec![[0u64; 5]; n];
    let (mut thr_sum, mut thr_count) = (vec![0.0f64; n], vec![0u64; n]);
    let mut limit_sum = vec![0.0f64; n];
    let delta = cppo_delta(cfg);
    for_each_token(&o.reason, n, |i, j, k| {
        tokens[k] += 1;
        by_reason[k][usize::from(o.reason[[i, j]].min(4))] += 1;
        let c = o.threshold[[i, j]].to_f64();
        if c.is_finite() {
            thr_sum[k] += c;
            thr_count[k] += 1;
        }
        if let Some(delta) = delta {
            limit_sum[k] += delta / o.weight[[i, j]].to_f64();
        }
    });
    let frac = |code: Reason| -> Vec<f64> {
        (0..n)
            .map(|k| ratio(by_reason[k][code as usize] as f64, tokens[k]))
            .collect()
    };
    let token = frac(Reason::TokenThreshold);
    let budget = frac(Reason::PrefixBudget);
    RulePositions {
        masked_frac: (0..n)
            .map(|k| {
                let masked = by_reason[k][Reason::TokenThreshold as usize]
                    + by_reason[k][Reason::PrefixBudget as usize];
                ratio(masked as f64, tokens[k])
            })
            .collect(),
        masked_frac_token_threshold: token,
        masked_frac_prefix_budget: budget,
        bypass_frac: frac(Reason::Corrective),
        threshold_mean: cfg
            .rule
            .has_threshold()
            .then(|| (0..n).map(|k| ratio(thr_sum[k], thr_count[k])).collect()),
        token_limit_mean: delta.map(|_| (0..n).map(|k| ratio(limit_sum[k], tokens[k])).collect()),
        tokens,
    }
}

fn divergence_stats<F: Float>(
    divergence: Divergence,
    d: &Diagnostics,
    values: &Array2<F>,
    reasons: &Array2<u8>,
    n: usize,
) -> DivergenceStats {
    let mut all: Vec<f64> = Vec::new();
    for_each_token(reasons, 1, |i, j, _| all.push(values[[i, j]].to_f64()));
    all.sort_unstable_by(f64::total_cmp);
    DivergenceStats {
        divergence,
        mean: d.divergence_mean,
        max: d.divergence_max,
        median: quantile(&all, 0.5),
        p90: quantile(&all, 0.9),
        p99: quantile(&all, 0.99),
        by_position: divergence_positions(values, reasons, n),
        by_decile: divergence_positions(values, reasons, 10),
    }
}

fn divergence_positions<F: Float>(
    values: &Array2<F>,
    reasons: &Array2<u8>,
    n: usize,
) -> DivergencePositions {
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); n];
    for_each_token(reasons, n, |i, j, k| {
        buckets[k].push(values[[i, j]].to_f64())
    });
    let mut out = DivergencePositions {
        tokens: Vec::with_capacity(n),
        mean: Vec::with_capacity(n),
        median: Vec::with_capacity(n),
        p90: Vec::with_capacity(n),
    };
    for mut b in buckets {
        b.sort_unstable_by(f64::total_cmp);
        out.tokens.push(b.len() as u64);
        out.mean.push(ratio(b.iter().sum(), b.len() as u64));
        out.median.push(quantile(&b, 0.5));
        out.p90.push(quantile(&b, 0.9));
    }
    out
}

/// The q-quantile of sorted values, interpolating linearly (numpy's default); NaN when
/// empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let pos = q * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            let w = pos - lo as f64;
            sorted[lo] + w * (sorted[hi] - sorted[lo])
        }
    }
}

// ---------------------------------------------------------------------------------------
// Runs: a directory of per-step dumps
// ---------------------------------------------------------------------------------------

/// One step of a run.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub step: u64,
    pub file: String,
    /// Each rule's diagnostics, in the order of [`StepsAnalysis::rules`].
    pub diagnostics: Vec<Diagnostics>,
    /// The warnings of this step ([`crate::warnings`]).
    pub warnings: Vec<Warning>,
}

/// What `cppo inspect DIR` reports.
#[derive(Clone, Debug, Serialize)]
pub struct StepsAnalysis {
    pub dir: String,
    pub rules: Vec<RuleSpec>,
    pub steps: Vec<StepResult>,
}

/// One step's diagnostics under every rule, as [`cppo::evaluate_into`] returns them,
/// and the step's warnings.
pub fn step_diagnostics<F: NpyFloat>(
    arrays: &Arrays<F>,
    rules: &[RuleSpec],
    context: &dyn Fn(cppo::Error) -> Failure,
) -> Result<(Vec<Diagnostics>, Vec<Warning>), Failure> {
    let batch = arrays.batch().map_err(context)?;
    let (rows, len) = batch.shape();
    // The thresholds and reasons of a rule with a budget, for one warning; reused.
    let mut buffers: Option<(Array2<F>, Array2<u8>)> = None;
    let mut diagnostics = Vec::with_capacity(rules.len());
    let mut exhausted = Vec::with_capacity(rules.len());
    for r in rules {
        if r.config.rule.has_budget() {
            let (threshold, reason) = buffers.get_or_insert_with(|| {
                (
                    Array2::from_elem((rows, len), F::default()),
                    Array2::zeros((rows, len)),
                )
            });
            let out = OutputsMut {
                threshold: Some(threshold.view_mut()),
                reason: Some(reason.view_mut()),
                ..OutputsMut::default()
            };
            let s = cppo::evaluate_into(&r.config, &batch, out, Par::Rayon).map_err(context)?;
            diagnostics.push(s.diagnostics);
            exhausted.push(Some(warnings::exhausted_at_first_token(threshold, reason)));
        } else {
            // No output buffers: the loss and the diagnostics only.
            let s = cppo::evaluate_into(&r.config, &batch, OutputsMut::default(), Par::Rayon)
                .map_err(context)?;
            diagnostics.push(s.diagnostics);
            exhausted.push(None);
        }
    }
    let facts: Vec<RuleFacts<'_>> = rules
        .iter()
        .zip(&diagnostics)
        .zip(&exhausted)
        .map(|((r, d), &exhausted_rows)| RuleFacts {
            name: &r.name,
            config: &r.config,
            diagnostics: d,
            exhausted_rows,
        })
        .collect();
    let warnings = warnings::check(BatchShape { rows, len }, &facts);
    Ok((diagnostics, warnings))
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// A table, rendered as aligned text or as Markdown.
pub struct Table {
    pub head: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Leading columns aligned left (the rest align right).
    pub left: usize,
}

impl Table {
    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (k, cell) in row.iter().enumerate() {
                w[k] = w[k].max(cell.chars().count());
            }
        }
        w
    }

    fn text(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (k, c) in cells.iter().enumerate() {
                let pad = w[k] - c.chars().count();
                if k > 0 {
                    s.push_str("  ");
                }
                if k < self.left {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.head);
        out.push('\n');
        out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1)));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    fn markdown(&self) -> String {
        let esc = |c: &String| c.replace('|', "\\|");
        let mut out = String::new();
        let cells: Vec<String> = self.head.iter().map(esc).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        let align: Vec<&str> = (0..self.head.len())
            .map(|k| if k < self.left { "---" } else { "--:" })
            .collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(esc).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }
}

/// A report: headings, paragraphs, tables, warnings and (Markdown only) images.
#[derive(Default)]
pub struct Doc {
    blocks: Vec<Block>,
}

/// A warning as a report lists it: with the step it fired at, for a run.
#[derive(Clone, Debug)]
pub struct Listed {
    pub step: Option<u64>,
    pub warning: Warning,
}

impl Listed {
    /// One line: `step 120: [code] rule: message`.
    pub fn line(&self) -> String {
        match self.step {
            Some(step) => format!("step {step}: {}", self.warning.line()),
            None => self.warning.line(),
        }
    }
}

/// One part of a [`Doc`].
pub enum Block {
    Title(String),
    Heading(String),
    Para(String),
    Table(Table),
    Image {
        alt: String,
        path: String,
    },
    /// The warnings; in a terminal they come last, at most `shown` of them.
    Warnings {
        items: Vec<Listed>,
        shown: Option<usize>,
    },
}

impl Doc {
    pub fn title(&mut self, s: impl Into<String>) {
        self.blocks.push(Block::Title(s.into()));
    }
    pub fn heading(&mut self, s: impl Into<String>) {
        self.blocks.push(Block::Heading(s.into()));
    }
    pub fn para(&mut self, s: impl Into<String>) {
        self.blocks.push(Block::Para(s.into()));
    }
    pub fn table(&mut self, t: Table) {
        self.blocks.push(Block::Table(t));
    }
    pub fn image(&mut self, alt: impl Into<String>, path: impl Into<String>) {
        self.blocks.push(Block::Image {
            alt: alt.into(),
            path: path.into(),
        });
    }
    pub fn warnings(&mut self, items: Vec<Listed>, shown: Option<usize>) {
        self.blocks.push(Block::Warnings { items, shown });
    }

    /// The blocks, in order (for the HTML page).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Plain text for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for b in &self.blocks {
            match b {
                Block::Title(s) => {
                    let _ = writeln!(out, "{s}\n{}\n", "=".repeat(s.chars().count()));
                }
                Block::Heading(s) => {
                    let _ = writeln!(out, "{s}");
                }
                Block::Para(s) => {
                    let _ = writeln!(out, "{s}\n");
                }
                Block::Table(t) => {
                    let _ = writeln!(out, "{}", t.text());
                }
                Block::Image { .. } | Block::Warnings { .. } => {}
            }
        }
        // The warnings last, where the eye lands when the command is done.
        for b in &self.blocks {
            let Block::Warnings { items, shown } = b else {
                continue;
            };
            if items.is_empty() {
                continue;
            }
            let _ = writeln!(out, "Warnings ({})", items.len());
            let shown = shown.unwrap_or(items.len()).min(items.len());
            for item in &items[..shown] {
                let _ = writeln!(out, "- warning {}", item.line());
            }
            if shown < items.len() {
                let _ = writeln!(
                    out,
                    "- ... and {} more: --report, --html and --json list them all",
                    items.len() - shown
                );
            }
            out.push('\n');
        }
        out.trim_end().to_string() + "\n"
    }

    /// Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for b in &self.blocks {
            match b {
                Block::Title(s) => {
                    let _ = writeln!(out, "# {s}\n");
                }
                Block::Heading(s) => {
                    let _ = writeln!(out, "## {s}\n");
                }
                Block::Para(s) => {
                    let _ = writeln!(out, "{s}\n");
                }
                Block::Table(t) => {
                    let _ = writeln!(out, "{}", t.markdown());
                }
                Block::Image { alt, path } => {
                    let _ = writeln!(out, "![{alt}]({})\n", path.replace(' ', "%20"));
                }
                Block::Warnings { items, .. } => {
                    let _ = writeln!(out, "## Warnings\n");
                    if items.is_empty() {
                        let _ = writeln!(out, "None.\n");
                        continue;
                    }
                    for item in items {
                        let w = &item.warning;
                        let step = item.step.map_or(String::new(), |s| format!("step {s}: "));
                        let rule = w.rule.as_ref().map_or(String::new(), |r| format!(" {r}:"));
                        let _ = writeln!(out, "- {step}`{}`{rule} {}", w.code.name(), w.message);
                    }
                    out.push('\n');
                }
            }
        }
        out.trim_end().to_string() + "\n"
    }
}

/// A fraction as a percentage with two decimals; `-` for NaN.
pub fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{:.2}%", 100.0 * x)
    }
}

/// A divergence-scale number with four decimals; `-` for NaN.
pub fn num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.4}")
    }
}

/// The report on one batch. `images` are (caption, path) pairs of written plots, linked
/// from the Markdown.
pub fn batch_report(a: &Analysis, images: &[(String, String)]) -> Doc {
    let mut doc = Doc::default();
    let b = &a.batch;
    doc.title(format!("cppo inspect: {}", b.input));
    let (tokens, seqs) = a.rules.first().map_or((0, 0), |r| {
        (r.diagnostics.response_tokens, r.diagnostics.sequences)
    });
    let slots = (b.rows * b.len).max(1) as f64;
    doc.para(format!(
        "{} rows × {} slots, {} response tokens ({:.1}% of slots) in {} sequences; {}; \
         advantages {}.",
        b.rows,
        b.len,
        tokens,
        100.0 * tokens as f64 / slots,
        seqs,
        b.dtype,
        if b.per_row_advantages {
            "one per row"
        } else {
            "per token"
        },
    ));

    doc.warnings(
        a.warnings
            .iter()
            .map(|w| Listed {
                step: None,
                warning: w.clone(),
            })
            .collect(),
        None,
    );

    doc.heading("Rules");
    doc.table(Table {
        head: vec!["rule".into(), "definition".into()],
        rows: a
            .rules
            .iter()
            .map(|r| vec![r.name.clone(), describe(&r.config)])
            .collect(),
        left: 2,
    });

    for d in &a.divergences {
        doc.heading(format!(
            "Divergence D_t ({}) over the response tokens",
            d.divergence.name()
        ));
        doc.table(Table {
            head: ["mean", "median", "p90", "p99", "max"]
                .map(String::from)
                .to_vec(),
            rows: vec![vec![
                num(d.mean),
                num(d.median),
                num(d.p90),
                num(d.p99),
                num(d.max),
            ]],
            left: 0,
        });
    }
    if let Some(r) = a.rules.first() {
        let g = &r.diagnostics;
        doc.para(format!(
            "Ratio ρ = π_θ/μ: min {:.4}, mean {:.4}, max {:.4}. KL(μ ‖ π_θ) estimates: k1 {:.5}, \
             k3 {:.5}.",
            g.ratio_min, g.ratio_mean, g.ratio_max, g.approx_kl_k1, g.approx_kl_k3
        ));
    }

    doc.heading("Masked fraction by rule (share of response tokens)");
    doc.table(Table {
        head: [
            "rule",
            "masked",
            "token threshold",
            "prefix budget",
            "bypass (kept)",
            "masked, A > 0",
            "masked, A < 0",
            "mean threshold",
            "loss",
        ]
        .map(String::from)
        .to_vec(),
        rows: a
            .rules
            .iter()
            .map(|r| {
                let g = &r.diagnostics;
                vec![
                    r.name.clone(),
                    pct(g.masked_frac),
                    pct(g.masked_frac_token_threshold),
                    pct(g.masked_frac_prefix_budget),
                    pct(g.bypass_frac),
                    pct(g.masked_frac_pos_adv),
                    pct(g.masked_frac_neg_adv),
                    g.threshold_mean.map_or("-".into(), num),
                    format!("{:.6}", g.loss),
                ]
            })
            .collect(),
        left: 1,
    });
    doc.para(
        "Token threshold: w_t D_t > δ (or the rule's only test); prefix budget: masked by \
         CPPO's S_t ≤ δ + δ_b W_(t−1) alone; bypass: failed the test but kept, because the \
         update moves the token back toward the rollout policy (A_t (ρ_t − 1) ≤ 0). Mean \
         threshold: the mean effective threshold c_t (δ for DPPO). Loss: the config's \
         objective and aggregation.",
    );

    let budgets: Vec<Vec<String>> = a
        .rules
        .iter()
        .filter_map(|r| {
            let b = r.diagnostics.delta_b_row?;
            Some(vec![
                r.name.clone(),
                num(b.mean),
                num(b.min),
                num(b.max),
                pct(b.frac_at_floor),
                pct(b.frac_at_ceiling),
            ])
        })
        .collect();
    if !budgets.is_empty() {
        doc.heading("Per-row prefix budget δ_b^row (rows with response tokens)");
        doc.table(Table {
            head: [
                "rule",
                "mean",
                "min",
                "max",
                "at the floor δ_b",
                "at the ceiling c δ_b",
            ]
            .map(String::from)
            .to_vec(),
            rows: budgets,
            left: 1,
        });
        doc.para(
            "A calibrated budget is δ_b^row = min(c δ_b, max(δ_b, k Q_q(D of the row))) (the \
             paper's Eq. 22); a fixed one is δ_b in every row.",
        );
    }

    doc.heading("Masked fraction by position in the response (tenths of each row's response)");
    let d0 = a.divergences.first();
    let mut head = vec!["position".to_string()];
    if let Some(d) = d0 {
        head.push(format!("median D ({})", d.divergence.name()));
        head.push("p90 D".into());
    }
    head.extend(a.rules.iter().map(|r| r.name.clone()));
    let rows = (0..10)
        .map(|k| {
            let mut row = vec![format!("{}–{}%", 10 * k, 10 * (k + 1))];
            if let Some(d) = d0 {
                row.push(num(d.by_decile.median[k]));
                row.push(num(d.by_decile.p90[k]));
            }
            row.extend(
                a.rules
                    .iter()
                    .map(|r| pct(r.diagnostics.masked_frac_by_decile[k])),
            );
            row
        })
        .collect();
    doc.table(Table {
        head,
        rows,
        left: 1,
    });

    if !images.is_empty() {
        doc.heading("Plots");
        for (alt, path) in images {
            doc.image(alt.clone(), path.clone());
        }
    }
    doc
}

/// Warnings a terminal lists for a run; the others are counted.
pub const TERMINAL_WARNINGS: usize = 20;

/// The report on a run. In the terminal, at most `max_rows` steps are listed (evenly
/// spaced, first and last included) and [`TERMINAL_WARNINGS`] warnings; the Markdown
/// lists them all.
pub fn steps_report(
    s: &StepsAnalysis,
    max_rows: Option<usize>,
    images: &[(String, String)],
) -> Doc {
    let mut doc = Doc::default();
    doc.title(format!(
        "cppo inspect: {} steps in {}",
        s.steps.len(),
        s.dir
    ));
    let warnings = s
        .steps
        .iter()
        .flat_map(|st| {
            st.warnings.iter().map(|w| Listed {
                step: Some(st.step),
                warning: w.clone(),
            })
        })
        .collect();
    doc.warnings(warnings, max_rows.map(|_| TERMINAL_WARNINGS));
    doc.heading("Rules");
    doc.table(Table {
        head: vec!["rule".into(), "definition".into()],
        rows: s
            .rules
            .iter()
            .map(|r| vec![r.name.clone(), describe(&r.config)])
            .collect(),
        left: 2,
    });

    doc.heading("By step: masked fraction (of which by the prefix budget), mean divergence");
    let mut head = vec!["step".to_string(), "tokens".into()];
    let mut divs: Vec<(Divergence, usize)> = Vec::new();
    for (k, r) in s.rules.iter().enumerate() {
        if !divs.iter().any(|(d, _)| *d == r.config.divergence) {
            divs.push((r.config.divergence, k));
        }
    }
    head.extend(divs.iter().map(|(d, _)| format!("mean D ({})", d.name())));
    head.extend(s.rules.iter().map(|r| r.name.clone()));
    let n = s.steps.len();
    let shown: Vec<usize> = match max_rows {
        Some(m) if n > m && m >= 2 => {
            let mut v: Vec<usize> = (0..m).map(|i| i * (n - 1) / (m - 1)).collect();
            v.dedup();
            v
        }
        _ => (0..n).collect(),
    };
    let rows = shown
        .iter()
        .map(|&i| {
            let st = &s.steps[i];
            let mut row = vec![
                st.step.to_string(),
                st.diagnostics
                    .first()
                    .map_or(0, |d| d.response_tokens)
                    .to_string(),
            ];
            row.extend(
                divs.iter()
                    .map(|&(_, k)| num(st.diagnostics[k].divergence_mean)),
            );
            row.extend(s.rules.iter().zip(&st.diagnostics).map(|(r, d)| {
                if has_budget(&r.config) {
                    format!(
                        "{} ({})",
                        pct(d.masked_frac),
                        pct(d.masked_frac_prefix_budget)
                    )
                } else {
                    pct(d.masked_frac)
                }
            }));
            row
        })
        .collect();
    doc.table(Table {
        head,
        rows,
        left: 0,
    });
    if shown.len() < n {
        doc.para(format!(
            "{} of {n} steps shown; the Markdown report (--report) lists them all.",
            shown.len()
        ));
    }
    if !images.is_empty() {
        doc.heading("Plots");
        for (alt, path) in images {
            doc.image(alt.clone(), path.clone());
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_as_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!((quantile(&v, 0.9) - 3.7).abs() < 1e-12);
        assert_eq!(quantile(&[5.0], 0.9), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn buckets_count_response_tokens_only() {
        // Row of 5 response tokens with a hole at column 2 and padding after.
        let reasons = cppo::ndarray::array![[1u8, 1, 0, 1, 1, 1, 0, 0]];
        let mut seen = Vec::new();
        for_each_token(&reasons, 10, |_, j, k| seen.push((j, k)));
        assert_eq!(seen, [(0, 0), (1, 2), (3, 4), (4, 6), (5, 8)]);
    }

    #[test]
    fn tables_render() {
        let t = Table {
            head: vec!["a".into(), "bb".into()],
            rows: vec![vec!["x|y".into(), "1".into()]],
            left: 1,
        };
        assert_eq!(t.text(), "a    bb\n-------\nx|y   1\n");
        assert_eq!(t.markdown(), "| a | bb |\n|---|--:|\n| x\\|y | 1 |\n");
    }
}
