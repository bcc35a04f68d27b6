//! The statistics of an experiment: reads the cells that `--compare` wrote (one output
//! directory each: `setting.json`, `runs.csv`, the per-position CSVs) and writes the
//! tables, paired tests and plots of TRAINING.md.
//!
//! - **Cells**: per arm, the mean ± sd over seeds of each endpoint, collapses, masking,
//!   the prefix budget's spike and creep rows, the bypassed tokens' share of the gradient
//!   and the quantiles of D.
//! - **Paired differences** against a reference arm, seed by seed (every arm of a seed
//!   starts from the same model and sees the same prompts): mean, standard error, 95 %
//!   t interval, wins/losses/ties and the exact Wilcoxon signed-rank p-value. The primary
//!   comparison, fixed before the runs, is reported unadjusted; every other comparison's
//!   p-value is Holm-corrected as one family.
//! - **The horizon trend**: cells that differ only in the horizon T form a drift group;
//!   for each arm, the paired difference's slope against log₂ T, one slope per seed (the
//!   seeds every cell of the group has), then its mean and 95 % t interval across seeds.
//! - **The staleness trend**: cells that differ only in the lag k (the rollout policy k
//!   iterations behind) form a staleness group; the same per-seed slopes, against k.
//! - **Plots**: the endpoint against log₂ T per arm and drift group (`horizon.svg`),
//!   against the lag per staleness group (`staleness.svg`, when there is one), and
//!   masking and D by response position at each drift group's longest horizon
//!   (`positions.svg`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::Res;
use crate::report::{COLORS, xml};
use crate::stats::{Paired, holm, mean_sd, paired, unit_slopes};

/// One line of a cell's `runs.csv`.
#[derive(Clone, Debug)]
struct Run {
    /// The arm's name in the report: its rule label, or the name `--rename` gave it.
    arm: String,
    /// The rule label the run was trained under (its files are named after it).
    rule: String,
    seed: u64,
    values: BTreeMap<String, f64>,
    collapsed: bool,
}

/// A knob a trend varies across its cells.
#[derive(Clone, Copy)]
enum Knob {
    Horizon,
    Lag,
}

/// One output directory of `--compare`.
#[derive(Clone, Debug)]
struct Cell {
    dir: PathBuf,
    setting: Value,
    runs: Vec<Run>,
}

impl Cell {
    /// Reads the cell in `dir`, its arms renamed by `rename` (rule label → name).
    fn read(dir: &Path, rename: &[(String, String)]) -> Res<Self> {
        let text = std::fs::read_to_string(dir.join("setting.json"))
            .map_err(|e| format!("{}: {e}", dir.join("setting.json").display()))?;
        let setting: Value = serde_json::from_str(&text)?;
        let csv = std::fs::read_to_string(dir.join("runs.csv"))
            .map_err(|e| format!("{}: {e}", dir.join("runs.csv").display()))?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .ok_or("runs.csv is empty")?
            .split(',')
            .collect();
        let mut runs = Vec::new();
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            let get = |name: &str| {
                header
                    .iter()
                    .position(|h| *h == name)
                    .and_then(|i| fields.get(i).copied())
                    .unwrap_or_default()
            };
            let values = header
                .iter()
                .zip(&fields)
                .filter_map(|(h, f)| Some(((*h).to_string(), f.parse::<f64>().ok()?)))
                .collect();
            let rule = get("rule").to_string();
            let arm = rename
                .iter()
                .find(|(from, _)| *from == rule)
                .map_or_else(|| rule.clone(), |(_, to)| to.clone());
            runs.push(Run {
                arm,
                rule,
                seed: get("seed").parse()?,
                values,
                collapsed: get("collapsed") == "true",
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            setting,
            runs,
        })
    }

    fn n(&self) -> u64 {
        self.setting["n"].as_u64().unwrap_or(0)
    }

    fn arms(&self) -> Vec<String> {
        let mut arms: Vec<String> = Vec::new();
        for r in &self.runs {
            if !arms.contains(&r.arm) {
                arms.push(r.arm.clone());
            }
        }
        arms
    }

    /// The cell's setting but `knob`: the cells of one trend share it (everything but
    /// the horizon is a drift group; everything but the lag, a staleness sweep).
    fn setting_without(&self, knob: Knob) -> String {
        let s = &self.setting;
        let kept = match knob {
            Knob::Horizon => format!("lag {}", s["lag"]),
            Knob::Lag => format!("T = {}", self.n()),
        };
        format!(
            "{}, {kept}, τ_μ {}, {} minibatches × {} epochs, lr {}, IS cap {}",
            s["task"].as_str().unwrap_or("?"),
            s["tau_mu"],
            s["minibatches"],
            s["epochs"],
            s["lr"],
            s["is_cap"]
        )
    }

    /// The drift setting: everything but the horizon.
    fn group(&self) -> String {
        self.setting_without(Knob::Horizon)
    }

    /// The lag k: the rollouts' policy is k iterations behind.
    fn lag(&self) -> f64 {
        self.setting["lag"].as_f64().unwrap_or(f64::NAN)
    }

    fn label(&self) -> String {
        format!("T = {}; {}", self.n(), self.group())
    }

    /// The horizon and the drift knobs, for tables whose cells share the rest.
    fn short(&self) -> String {
        let s = &self.setting;
        format!("T = {}, lag {}, τ_μ {}", self.n(), s["lag"], s["tau_mu"])
    }

    /// `metric` of `arm`, by seed.
    fn by_seed(&self, arm: &str, metric: &str) -> BTreeMap<u64, f64> {
        self.runs
            .iter()
            .filter(|r| r.arm == arm)
            .filter_map(|r| Some((r.seed, *r.values.get(metric)?)))
            .collect()
    }

    /// The paired differences `arm − reference` of `metric` over the seeds both have.
    fn paired(&self, arm: &str, reference: &str, metric: &str) -> Option<Paired> {
        let (a, b) = (self.by_seed(arm, metric), self.by_seed(reference, metric));
        let seeds: Vec<u64> = a.keys().filter(|s| b.contains_key(s)).copied().collect();
        if seeds.is_empty() {
            return None;
        }
        let xa: Vec<f64> = seeds.iter().map(|s| a[s]).collect();
        let xb: Vec<f64> = seeds.iter().map(|s| b[s]).collect();
        Some(paired(&xa, &xb))
    }

    /// The mean over seeds of a per-position column of `arm`'s `_pos.csv` files.
    fn by_position(&self, arm: &str, column: &str) -> Res<Vec<f64>> {
        let mut sum: Vec<f64> = Vec::new();
        let mut count = 0.0;
        for r in self.runs.iter().filter(|r| r.arm == arm) {
            let stem = crate::file_stem(&r.rule);
            let path = self.dir.join(format!("{stem}_seed{}_pos.csv", r.seed));
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
            let col = header
                .iter()
                .position(|h| *h == column)
                .ok_or_else(|| format!("{}: no column {column}", path.display()))?;
            let vals: Vec<f64> = lines
                .map(|l| {
                    l.split(',')
                        .nth(col)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN)
                })
                .collect();
            if sum.is_empty() {
                sum = vec![0.0; vals.len()];
            }
            for (s, v) in sum.iter_mut().zip(&vals) {
                *s += v;
            }
            count += 1.0;
        }
        Ok(sum.into_iter().map(|s| s / count).collect())
    }
}

/// What to analyse and how.
pub struct Plan<'a> {
    /// The cells' output directories.
    pub dirs: &'a [PathBuf],
    /// The arm every other arm is compared with.
    pub reference: &'a str,
    /// The endpoint: a column of `runs.csv` (`sampled_auc`, `final_accuracy`, ...).
    pub endpoint: &'a str,
    /// The primary comparison: a cell's directory and an arm.
    pub primary: Option<(PathBuf, String)>,
    /// Arms renamed on reading (rule label → name): one arm across cells whose rule
    /// labels differ, such as a threshold tuned per horizon.
    pub rename: &'a [(String, String)],
    /// Where the report and the plots go.
    pub out: &'a Path,
}

fn ms(xs: &[f64]) -> String {
    match xs.len() {
        0 => "–".into(),
        1 => format!("{:.3}", xs[0]),
        _ => {
            let (m, sd) = mean_sd(xs);
            format!("{m:.3} ± {sd:.3}")
        }
    }
}

fn p_fmt(p: f64) -> String {
    if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// Runs the analysis; returns the Markdown report (also written to `report.md`).
pub fn run(plan: &Plan<'_>) -> Res<String> {
    let mut cells = plan
        .dirs
        .iter()
        .map(|d| Cell::read(d, plan.rename))
        .collect::<Res<Vec<_>>>()?;
    cells.sort_by(|a, b| a.group().cmp(&b.group()).then(a.n().cmp(&b.n())));
    let ep = plan.endpoint;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Endpoint: `{ep}`. ± is the sample sd over seeds. Paired differences are arm − `{}`, seed by seed.\n",
        plan.reference
    );

    // The cells.
    let _ = writeln!(s, "## Cells\n");
    for c in &cells {
        let _ = writeln!(s, "### {} (`{}`)\n", c.label(), c.dir.display());
        let _ = writeln!(
            s,
            "| arm | seeds | {ep} | sampled final | greedy final | collapses | masked | budget rows: spike / creep | bypass grad share | D P50 / P90 / P99 |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for arm in c.arms() {
            let rs: Vec<&Run> = c.runs.iter().filter(|r| r.arm == arm).collect();
            let col = |m: &str| -> Vec<f64> {
                rs.iter()
                    .filter_map(|r| r.values.get(m).copied())
                    .filter(|v| v.is_finite())
                    .collect()
            };
            let total = |m: &str| col(m).iter().sum::<f64>();
            let mean = |m: &str| {
                let v = col(m);
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            let _ = writeln!(
                s,
                "| {arm} | {} | {} | {} | {} | {}/{} | {} | {:.0} / {:.0} | {:.3} | {:.3} / {:.3} / {:.3} |",
                rs.len(),
                ms(&col(ep)),
                ms(&col("sampled_final")),
                ms(&col("final_accuracy")),
                rs.iter().filter(|r| r.collapsed).count(),
                rs.len(),
                ms(&col("mean_masked")),
                total("budget_spike_rows"),
                total("budget_creep_rows"),
                mean("bypass_grad_share"),
                mean("d_p50"),
                mean("d_p90"),
                mean("d_p99"),
            );
        }
        let _ = writeln!(s);
    }

    // Paired differences against the reference, Holm over all but the primary.
    let _ = writeln!(
        s,
        "## Paired differences against `{}` ({ep})\n",
        plan.reference
    );
    let mut rows: Vec<(String, String, Paired, bool)> = Vec::new();
    for c in &cells {
        for arm in c.arms().into_iter().filter(|a| a != plan.reference) {
            if let Some(p) = c.paired(&arm, plan.reference, ep) {
                let primary = plan
                    .primary
                    .as_ref()
                    .is_some_and(|(d, a)| same_dir(d, &c.dir) && *a == arm);
                rows.push((c.short(), arm, p, primary));
            }
        }
    }
    let family: Vec<f64> = rows
        .iter()
        .filter(|r| !r.3)
        .map(|r| r.2.p_signed_rank)
        .collect();
    let adjusted = holm(&family);
    let _ = writeln!(
        s,
        "| cell | arm | n | mean | se | 95 % CI | wins / losses / ties | p (signed-rank) | p (Holm) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    rows.sort_by_key(|r| !r.3);
    let mut k = 0;
    for (label, arm, p, primary) in &rows {
        let holm_p = if *primary {
            "primary: not adjusted".to_string()
        } else {
            k += 1;
            p_fmt(adjusted[k - 1])
        };
        let _ = writeln!(
            s,
            "| {label} | {}{arm}{} | {} | {:+.3} | {:.3} | [{:+.3}, {:+.3}] | {} / {} / {} | {} | {holm_p} |",
            if *primary { "**" } else { "" },
            if *primary { "**" } else { "" },
            p.n,
            p.mean,
            p.se,
            p.ci95.0,
            p.ci95.1,
            p.wins,
            p.losses,
            p.ties,
            p_fmt(p.p_signed_rank),
        );
    }
    let _ = writeln!(s);

    // The horizon trend per drift group.
    let mut groups: BTreeMap<String, Vec<&Cell>> = BTreeMap::new();
    for c in &cells {
        groups.entry(c.group()).or_default().push(c);
    }
    trend_section(
        &mut s,
        &Trend {
            heading: "Trend with the horizon: slope of the paired difference against log₂ T",
            intro: "",
            columns: ("drift group", "horizons", "slope per doubling of T"),
            x_of: |c| (c.n() as f64).log2(),
            x_name: |c| c.n().to_string(),
        },
        &groups,
        plan.reference,
        ep,
    );

    // The staleness trend, where cells differ only in the lag.
    let mut sweeps: BTreeMap<String, Vec<&Cell>> = BTreeMap::new();
    for c in &cells {
        sweeps
            .entry(c.setting_without(Knob::Lag))
            .or_default()
            .push(c);
    }
    sweeps.retain(|_, cs| cs.len() >= 2);
    for cs in sweeps.values_mut() {
        cs.sort_by(|a, b| a.lag().total_cmp(&b.lag()));
    }
    if !sweeps.is_empty() {
        trend_section(
            &mut s,
            &Trend {
                heading: "Trend with staleness: slope of the paired difference against the lag",
                intro: "The lag k: rollouts from the policy k iterations behind. ",
                columns: ("staleness group", "lags", "slope per iteration of lag"),
                x_of: Cell::lag,
                x_name: |c| c.lag().to_string(),
            },
            &sweeps,
            plan.reference,
            ep,
        );
    }

    // By position, at each drift group's longest horizon.
    let _ = writeln!(
        s,
        "## By response position, at each drift group's longest horizon (mean over seeds)\n"
    );
    let _ = writeln!(
        s,
        "Positions t = 1 … T + 1 (EOS last). D: mean divergence; token / budget: fractions masked by the token threshold and by the prefix budget; bypassed: kept by the corrective bypass; prefix: mean Σ_{{s ≤ t}} (log π − log μ); first error: share of failed rollouts whose first wrong token is at t.\n"
    );
    for cs in groups.values() {
        let Some(c) = cs.iter().max_by_key(|c| c.n()) else {
            continue;
        };
        let len = c.n() as usize + 1;
        let picks: Vec<usize> = {
            let mut v = vec![0, len / 4, len / 2, 3 * len / 4, len - 1];
            v.dedup();
            v
        };
        let _ = writeln!(s, "### {}\n", c.label());
        let head: Vec<String> = picks.iter().map(|t| format!("t = {}", t + 1)).collect();
        let _ = writeln!(s, "| arm | quantity | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(picks.len()));
        for arm in c.arms() {
            for (col, name) in [
                ("d_mean", "D"),
                ("masked_token", "token"),
                ("masked_budget", "budget"),
                ("bypassed", "bypassed"),
                ("prefix_log_ratio", "prefix"),
                ("first_error", "first error"),
            ] {
                let v = c.by_position(&arm, col)?;
                let cells: Vec<String> = picks
                    .iter()
                    .map(|&t| v.get(t).map_or("–".into(), |x| format!("{x:.4}")))
                    .collect();
                let _ = writeln!(s, "| {arm} | {name} | {} |", cells.join(" | "));
            }
        }
        let _ = writeln!(s);
    }

    std::fs::create_dir_all(plan.out)?;
    std::fs::write(plan.out.join("report.md"), &s)?;
    // The horizon plot: the drift groups with two horizons or more, if there are any.
    let mut trends = groups.clone();
    trends.retain(|_, cs| cs.len() >= 2);
    let trends = if trends.is_empty() { &groups } else { &trends };
    let title = format!("{ep} (mean over seeds) against the horizon");
    let horizon = trend_svg(trends, ep, &title, ("log₂ T", |c| (c.n() as f64).log2()));
    std::fs::write(plan.out.join("horizon.svg"), horizon)?;
    if !sweeps.is_empty() {
        let title = format!("{ep} (mean over seeds) against staleness");
        let x: (&str, fn(&Cell) -> f64) = ("lag k (iterations)", |c| c.lag());
        std::fs::write(
            plan.out.join("staleness.svg"),
            trend_svg(&sweeps, ep, &title, x),
        )?;
    }
    let longest: Vec<&Cell> = groups
        .values()
        .filter_map(|cs| cs.iter().max_by_key(|c| c.n()).copied())
        .collect();
    std::fs::write(plan.out.join("positions.svg"), positions_svg(&longest)?)?;
    Ok(s)
}

/// A trend table: what its cells' x is and how its columns are named.
struct Trend {
    heading: &'static str,
    /// Text before the method's description.
    intro: &'static str,
    /// The group, x values and slope columns' names.
    columns: (&'static str, &'static str, &'static str),
    x_of: fn(&Cell) -> f64,
    x_name: fn(&Cell) -> String,
}

/// A trend section (none if no group has two cells): for each group of two cells or
/// more and each arm, the slope of the paired difference `arm − reference` of `ep`
/// against the cells' x, one least-squares slope per seed over the seeds every cell
/// has, then their mean and 95 % t interval.
fn trend_section(
    s: &mut String,
    t: &Trend,
    groups: &BTreeMap<String, Vec<&Cell>>,
    reference: &str,
    ep: &str,
) {
    if groups.values().all(|cs| cs.len() < 2) {
        return;
    }
    let _ = writeln!(s, "## {}\n", t.heading);
    let _ = writeln!(
        s,
        "{}One least-squares slope per seed over the group's cells (seeds every cell has), then the mean and its 95 % t interval across seeds.\n",
        t.intro
    );
    let (group_col, x_col, slope_col) = t.columns;
    let _ = writeln!(
        s,
        "| {group_col} | {x_col} | arm | seeds | {slope_col} | 95 % CI |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (g, cs) in groups.iter().filter(|(_, cs)| cs.len() >= 2) {
        let x: Vec<f64> = cs.iter().map(|c| (t.x_of)(c)).collect();
        let names: Vec<String> = cs.iter().map(|c| (t.x_name)(c)).collect();
        for arm in cs[0].arms().into_iter().filter(|a| a != reference) {
            let diffs: Vec<BTreeMap<u64, f64>> = cs
                .iter()
                .map(|c| {
                    let (a, b) = (c.by_seed(&arm, ep), c.by_seed(reference, ep));
                    a.iter()
                        .filter_map(|(s, v)| Some((*s, v - b.get(s)?)))
                        .collect()
                })
                .collect();
            let seeds: Vec<u64> = diffs[0]
                .keys()
                .filter(|s| diffs.iter().all(|d| d.contains_key(s)))
                .copied()
                .collect();
            if seeds.len() < 2 {
                continue;
            }
            let ys: Vec<Vec<f64>> = seeds
                .iter()
                .map(|s| diffs.iter().map(|d| d[s]).collect())
                .collect();
            let sl = unit_slopes(&x, &ys);
            let _ = writeln!(
                s,
                "| {g} | {} | {arm} | {} | {:+.4} | [{:+.4}, {:+.4}] |",
                names.join(", "),
                sl.n,
                sl.slope,
                sl.ci95.0,
                sl.ci95.1
            );
        }
    }
    let _ = writeln!(s);
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A line series: its label and its (x, y) points.
type Series = (String, Vec<(f64, f64)>);

/// One panel of a line chart, drawn at (x0, y0) with size (w, h), y in [lo, hi].
fn panel(
    s: &mut String,
    at: (f64, f64, f64, f64),
    title: &str,
    x_label: &str,
    y: (f64, f64),
    series: &[Series],
) {
    let (x0, y0, w, h) = at;
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    let (xlo, xhi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (xlo, xhi) = if xhi > xlo {
        (xlo, xhi)
    } else {
        (xlo - 1.0, xlo + 1.0)
    };
    let (ylo, yhi) = y;
    let tx = |x: f64| x0 + w * (x - xlo) / (xhi - xlo);
    let ty = |v: f64| y0 + h * (1.0 - ((v - ylo) / (yhi - ylo)).clamp(0.0, 1.0));
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        x0 + w / 2.0,
        y0 - 8.0,
        xml(title),
        x0 + w / 2.0,
        y0 + h + 32.0,
        xml(x_label)
    );
    // Enough decimals that the five ticks' labels differ (a step of 0.025 needs three).
    let step = (yhi - ylo) / 4.0;
    let decimals = if step > 0.0 {
        (-step.log10() + 1.0 - 1e-9).ceil().clamp(1.0, 6.0) as usize
    } else {
        2
    };
    for i in 0..=4 {
        let v = ylo + step * f64::from(i);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{v:.decimals$}</text>"##,
            x0 + w,
            ty(v),
            ty(v),
            x0 - 4.0,
            ty(v) + 4.0
        );
        let xv = xlo + (xhi - xlo) * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{xv:.1}</text>"#,
            tx(xv),
            y0 + h + 16.0
        );
    }
    for (k, (label, pts)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, v)| format!("{:.1},{:.1}", tx(x), ty(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        // A marker at each point, where the points are few enough to tell apart.
        if pts.len() <= 12 {
            for &(x, v) in pts.iter().filter(|p| p.1.is_finite()) {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    tx(x),
                    ty(v)
                );
            }
        }
        let ly = y0 + 14.0 + 15.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            x0 + w + 10.0,
            x0 + w + 30.0,
            x0 + w + 34.0,
            ly + 4.0,
            xml(label)
        );
    }
}

fn svg_open(width: f64, height: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="70" y="22" font-size="15">{}</text>
"#,
        xml(title)
    )
}

/// The endpoint's mean over seeds against a cell's x (the horizon's log₂ T, the lag),
/// one panel per group, one line per arm.
fn trend_svg(
    groups: &BTreeMap<String, Vec<&Cell>>,
    ep: &str,
    title: &str,
    (x_label, x_of): (&str, fn(&Cell) -> f64),
) -> String {
    let (w, h, gap) = (380.0, 260.0, 250.0);
    let n = groups.len().max(1) as f64;
    let mut s = svg_open(70.0 + n * (w + gap), h + 120.0, title);
    // One y range for every panel, from the data, in steps of 0.05.
    let all: Vec<f64> = groups
        .values()
        .flatten()
        .flat_map(|c| {
            c.arms()
                .into_iter()
                .flat_map(|a| c.by_seed(&a, ep).into_values())
        })
        .filter(|v| v.is_finite())
        .collect();
    let lo = (all.iter().copied().fold(f64::INFINITY, f64::min) * 20.0).floor() / 20.0;
    let hi = (all.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 20.0).ceil() / 20.0;
    let range = if hi > lo { (lo, hi) } else { (0.0, 1.0) };
    for (k, (g, cs)) in groups.iter().enumerate() {
        let arms = cs[0].arms();
        let series: Vec<Series> = arms
            .iter()
            .map(|arm| {
                let pts = cs
                    .iter()
                    .map(|c| {
                        let v: Vec<f64> = c.by_seed(arm, ep).into_values().collect();
                        (x_of(c), v.iter().sum::<f64>() / v.len().max(1) as f64)
                    })
                    .collect();
                (arm.clone(), pts)
            })
            .collect();
        panel(
            &mut s,
            (70.0 + k as f64 * (w + gap), 60.0, w, h),
            g,
            x_label,
            range,
            &series,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Masked fraction (token threshold + prefix budget), mean D and the first error of
/// failed rollouts by response position (as a fraction of the response), mean over
/// seeds, at each group's longest horizon.
fn positions_svg(cells: &[&Cell]) -> Res<String> {
    let (w, h, gap) = (320.0, 240.0, 250.0);
    let mut s = svg_open(
        70.0 + 3.0 * (w + gap),
        80.0 + cells.len().max(1) as f64 * (h + 100.0),
        "masking, divergence and first errors by response position (mean over seeds)",
    );
    for (row, c) in cells.iter().enumerate() {
        let y0 = 80.0 + row as f64 * (h + 100.0);
        let _ = writeln!(
            s,
            r#"<text x="70" y="{}" font-size="13">{}</text>"#,
            y0 - 28.0,
            xml(&c.label())
        );
        // Each arm's values by relative position t / (T + 1).
        let by_rel = |v: &[f64]| -> Vec<(f64, f64)> {
            let len = v.len().max(1) as f64;
            v.iter()
                .enumerate()
                .map(|(t, x)| ((t as f64 + 1.0) / len, *x))
                .collect()
        };
        let (mut masked, mut div, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for arm in c.arms() {
            let tok = c.by_position(&arm, "masked_token")?;
            let bud = c.by_position(&arm, "masked_budget")?;
            let both: Vec<f64> = tok.iter().zip(&bud).map(|(a, b)| a + b).collect();
            masked.push((arm.clone(), by_rel(&both)));
            div.push((arm.clone(), by_rel(&c.by_position(&arm, "d_mean")?)));
            first.push((arm.clone(), by_rel(&c.by_position(&arm, "first_error")?)));
        }
        let top = |series: &[Series]| {
            series
                .iter()
                .flat_map(|(_, p)| p.iter().map(|q| q.1))
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max)
        };
        let (mmax, dmax, fmax) = (top(&masked), top(&div), top(&first));
        panel(
            &mut s,
            (70.0, y0, w, h),
            "masked fraction (token threshold + prefix budget)",
            "position t / (T + 1)",
            (0.0, (mmax * 1.1).max(0.01)),
            &masked,
        );
        panel(
            &mut s,
            (70.0 + w + gap, y0, w, h),
            "mean D_t",
            "position t / (T + 1)",
            (0.0, (dmax * 1.1).max(1e-3)),
            &div,
        );
        panel(
            &mut s,
            (70.0 + 2.0 * (w + gap), y0, w, h),
            "failed rollouts: where the first error is",
            "position t / (T + 1)",
            (0.0, (fmax * 1.1).max(1e-3)),
            &first,
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}
