//! Results: per-run CSV files, the comparison table and an SVG plot of the learning
//! curves (plain SVG text, no plotting dependency).

use std::fmt::Write as _;

use crate::probe::Probe;
use crate::rl::IterLog;
use crate::stats::mean_sd;

/// One finished run.
pub struct RunSummary {
    pub rule: String,
    pub seed: u64,
    pub logs: Vec<IterLog>,
    /// The run's measurements by response position.
    pub probe: Probe,
    pub error: Option<String>,
    /// Accuracy of the warm-started base, before RL.
    pub base_accuracy: f64,
    /// Sampled accuracy Avg@k of the warm-started base (NaN without sampled evaluations).
    pub base_sampled: f64,
    /// The evaluations a run that goes to the end makes, iteration 0 included.
    pub expected_evals: usize,
    pub secs: f64,
}

/// How many of the last evaluations make the "final" accuracy.
pub const FINAL_WINDOW: usize = 5;

impl RunSummary {
    /// One evaluation series of the run (greedy or sampled accuracy), where evaluated.
    fn series(&self, of: fn(&IterLog) -> f64) -> Vec<f64> {
        self.logs.iter().map(of).filter(|a| !a.is_nan()).collect()
    }

    fn evals(&self) -> Vec<f64> {
        self.series(|l| l.accuracy)
    }

    fn sampled_evals(&self) -> Vec<f64> {
        self.series(|l| l.sampled_accuracy)
    }

    /// The mean of a series' last `FINAL_WINDOW` values (NaN for none); 0 for a run that
    /// ended on an error (its policy is unusable).
    fn final_of(&self, e: &[f64]) -> f64 {
        if self.error.is_some() {
            return 0.0;
        }
        let tail = &e[e.len().saturating_sub(FINAL_WINDOW)..];
        tail.iter().sum::<f64>() / tail.len() as f64
    }

    /// Mean greedy accuracy over the last `FINAL_WINDOW` (5) evaluations; 0 for a run
    /// that ended on an error.
    pub fn final_accuracy(&self) -> f64 {
        self.final_of(&self.evals())
    }

    /// Mean sampled accuracy (Avg@k) over all evaluations, iteration 0 included: the
    /// normalised area under the sampled-accuracy curve (NaN without sampled
    /// evaluations). A run that ended on an error counts 0 for the evaluations it missed.
    pub fn sampled_auc(&self) -> f64 {
        let e = self.sampled_evals();
        if e.is_empty() {
            return f64::NAN;
        }
        let expected = self.expected_evals.max(e.len());
        e.iter().sum::<f64>() / expected as f64
    }

    /// Mean sampled accuracy over the last `FINAL_WINDOW` evaluations; 0 for a run that
    /// ended on an error.
    pub fn sampled_final(&self) -> f64 {
        self.final_of(&self.sampled_evals())
    }

    /// The best greedy accuracy seen.
    pub fn best_accuracy(&self) -> f64 {
        self.evals().into_iter().fold(0.0, f64::max)
    }

    /// Mean accuracy over all evaluations (area under the learning curve, normalised).
    pub fn mean_accuracy(&self) -> f64 {
        let e = self.evals();
        e.iter().sum::<f64>() / e.len().max(1) as f64
    }

    /// A collapse: the run ended on an error, or its final accuracy fell below half of
    /// its best.
    pub fn collapsed(&self) -> bool {
        self.error.is_some() || self.final_accuracy() < 0.5 * self.best_accuracy()
    }

    /// The largest per-iteration KL(μ‖π) estimate at the last step of an iteration.
    pub fn max_kl(&self) -> f64 {
        self.logs.iter().map(|l| l.kl_k3_last).fold(0.0, f64::max)
    }

    /// Mean masked fraction over the run.
    pub fn mean_masked(&self) -> f64 {
        let m: Vec<f64> = self
            .logs
            .iter()
            .map(|l| l.masked_frac)
            .filter(|m| m.is_finite())
            .collect();
        m.iter().sum::<f64>() / m.len().max(1) as f64
    }

    pub fn csv(&self) -> String {
        let mut s = String::from(IterLog::CSV_HEADER);
        s.push('\n');
        for l in &self.logs {
            s.push_str(&l.csv());
            s.push('\n');
        }
        s
    }
}

/// The comparison table (Markdown), one line per rule, in `rules` order. Every rule of
/// a seed starts from the same model and sees the same prompts, so the last column
/// compares each rule with the first one seed by seed (paired).
pub fn table(runs: &[RunSummary], rules: &[String]) -> String {
    let mut s = String::new();
    let first = rules.first().map_or("", String::as_str);
    let _ = writeln!(
        s,
        "| rule | seeds | base acc | final acc | best acc | mean acc | sampled AUC | final − base | collapses | max KL k3 | masked | final − {first} (paired) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let fmt = |xs: &[f64]| {
        let (m, sd) = mean_sd(xs);
        // One seed has no spread to show.
        let sd = if xs.len() < 2 { 0.0 } else { sd };
        format!("{m:.3} ± {sd:.3}")
    };
    for rule in rules {
        let rs: Vec<&RunSummary> = runs.iter().filter(|r| &r.rule == rule).collect();
        if rs.is_empty() {
            continue;
        }
        let col =
            |f: &dyn Fn(&RunSummary) -> f64| fmt(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let collapses = rs.iter().filter(|r| r.collapsed()).count();
        let max_kl = rs.iter().map(|r| r.max_kl()).fold(0.0, f64::max);
        let paired: Vec<f64> = rs
            .iter()
            .filter_map(|r| {
                let base = runs.iter().find(|o| o.rule == first && o.seed == r.seed)?;
                Some(r.final_accuracy() - base.final_accuracy())
            })
            .collect();
        let _ = writeln!(
            s,
            "| {rule} | {} | {} | {} | {} | {} | {} | {} | {collapses}/{} | {max_kl:.3} | {} | {} |",
            rs.len(),
            col(&|r| r.base_accuracy),
            col(&RunSummary::final_accuracy),
            col(&RunSummary::best_accuracy),
            col(&RunSummary::mean_accuracy),
            col(&RunSummary::sampled_auc),
            col(&|r| r.final_accuracy() - r.base_accuracy),
            rs.len(),
            col(&RunSummary::mean_masked),
            if rule == first || paired.is_empty() {
                "–".to_string()
            } else {
                fmt(&paired)
            },
        );
    }
    s
}

/// One line per run, as CSV.
pub fn runs_csv(runs: &[RunSummary]) -> String {
    let mut s = String::from(
        "rule,seed,base_accuracy,final_accuracy,best_accuracy,mean_accuracy,base_sampled,sampled_final,sampled_auc,collapsed,max_kl_k3,mean_masked,budget_spike_rows,budget_creep_rows,bypass_grad_share,d_p50,d_p90,d_p99,secs,error\n",
    );
    for r in runs {
        let q = r.probe.d_quantiles(&[0.5, 0.9, 0.99]);
        let _ = writeln!(
            s,
            "{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{},{:.5},{:.5},{},{},{:.5},{:.5},{:.5},{:.5},{:.1},{}",
            r.rule,
            r.seed,
            r.base_accuracy,
            r.final_accuracy(),
            r.best_accuracy(),
            r.mean_accuracy(),
            r.base_sampled,
            r.sampled_final(),
            r.sampled_auc(),
            r.collapsed(),
            r.max_kl(),
            r.mean_masked(),
            r.probe.spike_rows,
            r.probe.creep_rows,
            r.probe.bypass_grad_share(),
            q[0],
            q[1],
            q[2],
            r.secs,
            r.error.as_deref().unwrap_or("").replace(',', ";"),
        );
    }
    s
}

/// The line colours of every plot the trainer draws (matplotlib's ten).
pub(crate) const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A panel: x = iteration, y = a series per run.
struct Panel<'a> {
    title: &'a str,
    y_label: &'a str,
    log_y: bool,
    value: fn(&IterLog) -> f64,
}

/// The learning curves as SVG: greedy accuracy and the KL(μ‖π) estimate at each
/// iteration's last step, per iteration; thin lines per seed, thick lines the mean over
/// seeds, one color per rule.
pub fn plot_svg(runs: &[RunSummary], rules: &[String], subtitle: &str) -> String {
    let panels = [
        Panel {
            title: "held-out greedy accuracy",
            y_label: "accuracy",
            log_y: false,
            value: |l| l.accuracy,
        },
        Panel {
            title: "KL(μ‖π) estimate (k3), last step of each iteration",
            y_label: "KL (log scale)",
            log_y: true,
            value: |l| l.kl_k3_last,
        },
        Panel {
            title: "sampled reward (rollout policy)",
            y_label: "reward",
            log_y: false,
            value: |l| l.reward,
        },
    ];
    let (pw, ph, ml, mt, mr, mb) = (420.0, 300.0, 60.0, 60.0, 20.0, 50.0);
    let width = ml + panels.len() as f64 * (pw + ml + mr);
    let height = mt + ph + mb + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{ml}" y="20" font-size="15">CPPO vs baselines, learning curves</text><text x="{ml}" y="38" fill="#555">{}</text>"##,
        xml(subtitle)
    );
    let max_iter = runs
        .iter()
        .flat_map(|r| r.logs.iter().map(|l| l.iter))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    for (k, p) in panels.iter().enumerate() {
        let x0 = ml + k as f64 * (pw + ml + mr);
        let y0 = mt;
        // y range.
        let vals: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.logs.iter().map(p.value))
            .filter(|v| v.is_finite() && (!p.log_y || *v > 0.0))
            .collect();
        let (lo, hi) = if p.log_y {
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1e-6);
            let hi = vals.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
            (lo.log10().floor(), hi.log10().ceil())
        } else {
            (0.0, 1.0)
        };
        let tx = |it: f64| x0 + pw * it / max_iter;
        let ty = |v: f64| {
            let v = if p.log_y { v.max(1e-12).log10() } else { v };
            y0 + ph * (1.0 - ((v - lo) / (hi - lo)).clamp(0.0, 1.0))
        };
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle">iteration</text><text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"##,
            x0 + pw / 2.0,
            y0 - 8.0,
            xml(p.title),
            x0 + pw / 2.0,
            y0 + ph + 36.0,
            x0 - 45.0,
            y0 + ph / 2.0,
            xml(p.y_label),
        );
        // Grid and ticks.
        let yticks: Vec<f64> = if p.log_y {
            (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=5).map(|i| f64::from(i) / 5.0).collect()
        };
        for v in yticks {
            let y = ty(v);
            let label = if p.log_y {
                format!("1e{}", v.log10().round())
            } else {
                format!("{v:.1}")
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y + 4.0
            );
        }
        for i in 0..=4 {
            let it = max_iter * f64::from(i) / 4.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
                tx(it),
                y0 + ph + 16.0,
                it
            );
        }
        // Curves.
        for (c, rule) in rules.iter().enumerate() {
            let color = COLORS[c % COLORS.len()];
            let rs: Vec<&RunSummary> = runs.iter().filter(|r| &r.rule == rule).collect();
            for r in &rs {
                let pts: Vec<String> = r
                    .logs
                    .iter()
                    .filter(|l| (p.value)(l).is_finite())
                    .map(|l| format!("{:.1},{:.1}", tx(l.iter as f64), ty((p.value)(l))))
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-opacity="0.35" stroke-width="1"/>"#,
                    pts.join(" ")
                );
            }
            // Mean over the runs that have a finite value at that iteration.
            let mut pts = Vec::new();
            for it in 0..=max_iter as usize {
                let v: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.logs.iter().find(|l| l.iter == it))
                    .map(p.value)
                    .filter(|v| v.is_finite())
                    .collect();
                if !v.is_empty() && v.len() == rs.len() {
                    let m = v.iter().sum::<f64>() / v.len() as f64;
                    pts.push(format!("{:.1},{:.1}", tx(it as f64), ty(m)));
                }
            }
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#,
                pts.join(" ")
            );
            // Legend.
            let ly = y0 + ph + 46.0;
            let lx = ml + c as f64 * 130.0;
            if k == 0 {
                let _ = writeln!(
                    s,
                    r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2.5"/><text x="{}" y="{}">{}</text>"#,
                    lx + 24.0,
                    lx + 30.0,
                    ly + 4.0,
                    xml(rule)
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// `s` escaped for SVG text.
pub(crate) fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
