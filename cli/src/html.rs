//! `cppo inspect --html`: the report as one self-contained HTML page.
//!
//! One file that loads nothing: the report's tables and warnings, each plot as inline
//! SVG drawn by [`crate::plots`] (without the `plots` feature the page says there are
//! none), and for a run the trend of every headline number across the steps, each as a
//! chart with its table of values. A Content-Security-Policy forbids every load
//! (`default-src 'none'`) and allows only the page's own style sheet and its small
//! self-check script, by their SHA-256 hashes: the page works offline, and nothing in
//! it can reach the network or run other code. Every string that comes from the input
//! (file and directory names, config and preset names) is escaped.
//!
//! The self-check script records where each plot was laid out (`data-box="x y w h"` on
//! its `<figure>`, in CSS pixels of the page), the page's size (`data-page="w h"` on
//! `<html>`) and whether every plot has a size (`data-plots="ok N"` on `<html>`, else
//! the ids of the empty ones): a browser test reads them back. It reads nothing else
//! and sends nothing.

use std::fmt::Write as _;

use base64::Engine as _;
use cppo::Diagnostics;
use sha2::{Digest, Sha256};

use crate::inspect::Figures;
use crate::report::{self, Analysis, Block, Doc, StepsAnalysis, Table, has_budget, num, pct};

/// The page's style sheet.
const STYLE: &str = "\
body{margin:0;background:#fff;color:#1b1b1b;font:15px/1.45 system-ui,-apple-system,\"Segoe UI\",\
Roboto,\"Noto Sans\",\"DejaVu Sans\",sans-serif}\
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px}\
h1{font-size:1.45em;margin:.4em 0 .6em;overflow-wrap:anywhere}\
h2{font-size:1.2em;margin:1.6em 0 .5em;padding-bottom:.2em;border-bottom:1px solid #ddd}\
h3{font-size:1.05em;margin:1.4em 0 .3em}\
p{max-width:70em;overflow-wrap:anywhere}\
.table{overflow-x:auto;margin:.5em 0 1em}\
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:.9em}\
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}\
th{background:#f5f5f5}\
th.l,td.l{text-align:left}\
td.l+td.l{white-space:normal;min-width:16em}\
ul.warnings{list-style:none;padding:0}\
ul.warnings li{margin:6px 0;padding:6px 10px;border-left:4px solid #d55e00;background:#fff3eb}\
ul.warnings code{font-weight:600}\
.none{color:#555}\
.note{padding:6px 10px;border-left:4px solid #0072b2;background:#eef5fb}\
figure.plot{margin:1em 0 2em}\
figure.plot svg{display:block;width:100%;height:auto;border:1px solid #eee}\
figcaption{margin-top:.3em;color:#555;font-size:.9em}\
details{margin:.3em 0 1.5em}\
summary{cursor:pointer;color:#0072b2}\
footer{margin-top:3em;color:#777;font-size:.85em}";

/// The page's self-check (see the module docs). Changing it changes its hash in the
/// page's Content-Security-Policy, computed from this text.
const SCRIPT: &str = "(function(){\
var f=document.querySelectorAll(\"figure.plot\"),empty=[];\
for(var i=0;i<f.length;i++){\
var s=f[i].querySelector(\"svg\"),r=s?s.getBoundingClientRect():null;\
if(r&&r.width>0&&r.height>0){f[i].setAttribute(\"data-box\",\
[r.left+window.scrollX,r.top+window.scrollY,r.width,r.height].map(Math.round).join(\" \"));}\
else{empty.push(f[i].id);}}\
var d=document.documentElement;\
d.setAttribute(\"data-page\",d.scrollWidth+\" \"+d.scrollHeight);\
d.setAttribute(\"data-plots\",empty.length?\"empty: \"+empty.join(\" \"):\"ok \"+f.length);})();";

/// The size each plot of a batch is drawn at (the page scales it to its width).
#[cfg(feature = "plots")]
const PANEL: (u32, u32) = (1200, 750);
/// The size of the run's figure.
#[cfg(feature = "plots")]
const STEPS: (u32, u32) = (1400, 1000);
/// The size of one trend chart.
#[cfg(feature = "plots")]
const TREND: (u32, u32) = (1200, 520);

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A CSP source for an inline element's text: `'sha256-<base64>'`.
fn csp_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The page of one batch or of a run.
pub fn page(figures: &Figures<'_>) -> Result<String, String> {
    match figures {
        Figures::Batch(a) => batch_page(a),
        Figures::Steps(s) => steps_page(s),
    }
}

/// The whole document around `body`.
fn document(title: &str, body: &str) -> String {
    let csp = format!(
        "default-src 'none'; style-src {}; script-src {}; base-uri 'none'; form-action 'none'",
        csp_hash(STYLE),
        csp_hash(SCRIPT)
    );
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"cppo inspect {version}\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\
         <footer>Written by cppo inspect {version}. This page is self-contained: it loads \
         nothing from the network or from other files. The warnings' thresholds are \
         documented in docs/inspect.md.</footer>\n</main>\n<script>{SCRIPT}</script>\n\
         </body>\n</html>\n",
        version = env!("CARGO_PKG_VERSION"),
        title = esc(title),
    )
}

/// A report's blocks as HTML (images are the Markdown's links: left out).
fn render_doc(out: &mut String, doc: &Doc) {
    for block in doc.blocks() {
        match block {
            Block::Title(s) => {
                let _ = writeln!(out, "<h1>{}</h1>", esc(s));
            }
            Block::Heading(s) => {
                let _ = writeln!(out, "<h2>{}</h2>", esc(s));
            }
            Block::Para(s) => {
                let _ = writeln!(out, "<p>{}</p>", esc(s));
            }
            Block::Table(t) => table(out, t),
            Block::Image { .. } => {}
            Block::Warnings { items, .. } => {
                let _ = write!(
                    out,
                    "<section id=\"warnings\">\n<h2>Warnings ({})</h2>\n",
                    items.len()
                );
                if items.is_empty() {
                    out.push_str("<p class=\"none\">None: no warning fired.</p>\n");
                } else {
                    out.push_str("<ul class=\"warnings\">\n");
                    for item in items {
                        let w = &item.warning;
                        let _ = write!(out, "<li data-code=\"{}\">", w.code.name());
                        if let Some(step) = item.step {
                            let _ = write!(out, "step {step}: ");
                        }
                        let _ = write!(out, "<code>{}</code> ", w.code.name());
                        if let Some(rule) = &w.rule {
                            let _ = write!(out, "<b>{}</b>: ", esc(rule));
                        }
                        let _ = writeln!(out, "{}</li>", esc(&w.message));
                    }
                    out.push_str("</ul>\n");
                }
                out.push_str("</section>\n");
            }
        }
    }
}

fn table(out: &mut String, t: &Table) {
    let class = |k: usize| if k < t.left { " class=\"l\"" } else { "" };
    out.push_str("<div class=\"table\"><table>\n<thead><tr>");
    for (k, h) in t.head.iter().enumerate() {
        let _ = write!(out, "<th{}>{}</th>", class(k), esc(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for (k, c) in row.iter().enumerate() {
            let _ = write!(out, "<td{}>{}</td>", class(k), esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

/// A plot: the SVG (from plotters, which escapes its texts) and a caption.
#[cfg(feature = "plots")]
fn figure(out: &mut String, id: &str, svg: &str, caption: &str) {
    let _ = write!(
        out,
        "<figure class=\"plot\" id=\"{}\">\n{}\n<figcaption>{}</figcaption>\n</figure>\n",
        esc(id),
        svg.trim(),
        esc(caption)
    );
}

/// Said where the plots would be, in a cppo built without them.
#[cfg(not(feature = "plots"))]
const NO_PLOTS: &str = "<p class=\"note\" id=\"no-plots\">No plots: this cppo was built \
    without the <code>plots</code> feature (rebuild with <code>--features plots</code>). \
    The numbers are in the tables.</p>\n";

fn batch_page(a: &Analysis) -> Result<String, String> {
    let mut body = String::new();
    render_doc(&mut body, &report::batch_report(a, &[]));
    body.push_str("<section id=\"plots\">\n<h2>Plots</h2>\n");
    batch_plots(&mut body, a)?;
    body.push_str("</section>\n");
    Ok(document(&format!("cppo inspect: {}", a.batch.name), &body))
}

#[cfg(feature = "plots")]
fn batch_plots(out: &mut String, a: &Analysis) -> Result<(), String> {
    use crate::inspect::PlotKind;
    let panels = [
        (
            PlotKind::Divergence,
            "plot-divergence",
            "Divergence D_t by position: median and 90th percentile per position bucket.",
        ),
        (
            PlotKind::Thresholds,
            "plot-thresholds",
            "CPPO's token limit δ/w_t and the mean effective threshold c_t by position.",
        ),
        (
            PlotKind::Masked,
            "plot-masked",
            "Masked fraction by position, one line per rule.",
        ),
        (
            PlotKind::Strip,
            "plot-strip",
            "Token decisions in a few rows: kept, kept by the corrective bypass, masked by \
             the token threshold, masked by the prefix budget.",
        ),
    ];
    for (kind, id, caption) in panels {
        let svg = crate::plots::svg(&Figures::Batch(a), kind, PANEL)?;
        figure(out, id, &svg, caption);
    }
    Ok(())
}

#[cfg(not(feature = "plots"))]
fn batch_plots(out: &mut String, _: &Analysis) -> Result<(), String> {
    out.push_str(NO_PLOTS);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A run
// ---------------------------------------------------------------------------------------

/// How a trend's values are shown in its table.
#[derive(Clone, Copy)]
enum Fmt {
    Pct,
    /// Decimals.
    Fixed(usize),
    Int,
}

impl Fmt {
    fn show(self, x: f64) -> String {
        match self {
            _ if x.is_nan() => "-".into(),
            Self::Pct => pct(x),
            Self::Fixed(4) => num(x),
            Self::Fixed(d) => format!("{x:.d$}"),
            Self::Int => format!("{x:.0}"),
        }
    }
}

/// One headline number across the steps of a run.
#[cfg_attr(not(feature = "plots"), allow(dead_code))]
struct TrendData {
    id: String,
    title: String,
    subtitle: String,
    y_desc: String,
    fmt: Fmt,
    /// (label, colour, one value per step).
    series: Vec<(String, usize, Vec<f64>)>,
    /// Whether the colours are the rules' (for line widths).
    by_rule: bool,
}

/// A number read off one rule's diagnostics; `None` where the rule has none.
type PerRule = fn(&cppo::Config, &Diagnostics) -> Option<f64>;

/// Every headline number of the report, across steps: each rule's (masked fraction in
/// total and by reason, bypass, by sign of the advantage, mean threshold, loss, per-row
/// budget), each divergence's mean and max, the ratio and the KL estimates, the tokens.
fn trends(s: &StepsAnalysis) -> Vec<TrendData> {
    let per_rule: [(&str, &str, &str, Fmt, PerRule); 9] = [
        (
            "masked",
            "Masked fraction",
            "share of the response tokens masked (reasons 3 and 4)",
            Fmt::Pct,
            |_, d| Some(d.masked_frac),
        ),
        (
            "masked-token-threshold",
            "Masked by the token threshold",
            "share of the response tokens masked by w_t D_t > δ (or the rule's only test)",
            Fmt::Pct,
            |_, d| Some(d.masked_frac_token_threshold),
        ),
        (
            "masked-prefix-budget",
            "Masked by the prefix budget",
            "share of the response tokens masked by CPPO's prefix budget alone",
            Fmt::Pct,
            |c, d| has_budget(c).then_some(d.masked_frac_prefix_budget),
        ),
        (
            "bypass",
            "Kept by the corrective bypass",
            "share of the response tokens that failed the test but move back toward μ",
            Fmt::Pct,
            |_, d| Some(d.bypass_frac),
        ),
        (
            "masked-pos-adv",
            "Masked, A > 0",
            "masked fraction among the tokens with a positive advantage",
            Fmt::Pct,
            |_, d| Some(d.masked_frac_pos_adv),
        ),
        (
            "masked-neg-adv",
            "Masked, A < 0",
            "masked fraction among the tokens with a negative advantage",
            Fmt::Pct,
            |_, d| Some(d.masked_frac_neg_adv),
        ),
        (
            "threshold",
            "Mean effective threshold",
            "the mean of c_t (δ for DPPO and TRM); negative where budgets are overspent",
            Fmt::Fixed(4),
            |_, d| d.threshold_mean,
        ),
        (
            "loss",
            "Loss",
            "each config's objective and aggregation",
            Fmt::Fixed(6),
            |_, d| Some(d.loss),
        ),
        (
            "budget",
            "Mean per-row prefix budget δ_b^row",
            "over the rows with response tokens",
            Fmt::Fixed(4),
            |_, d| d.delta_b_row.map(|b| b.mean),
        ),
    ];
    let mut out = Vec::new();
    for (id, title, subtitle, fmt, get) in per_rule {
        let series: Vec<(String, usize, Vec<f64>)> = s
            .rules
            .iter()
            .enumerate()
            .filter_map(|(k, r)| {
                let values: Vec<Option<f64>> = s
                    .steps
                    .iter()
                    .map(|st| get(&r.config, &st.diagnostics[k]))
                    .collect();
                values.iter().any(Option::is_some).then(|| {
                    let values = values.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
                    (r.name.clone(), k, values)
                })
            })
            .collect();
        if !series.is_empty() {
            out.push(TrendData {
                id: id.into(),
                title: title.into(),
                subtitle: subtitle.into(),
                y_desc: title.to_lowercase(),
                fmt,
                series,
                by_rule: true,
            });
        }
    }

    // The batch's own numbers: those of the first rule on each divergence (every rule
    // on one divergence sees the same), and of the first rule for the ratio.
    let mut divs: Vec<(cppo::Divergence, usize)> = Vec::new();
    for (k, r) in s.rules.iter().enumerate() {
        if !divs.iter().any(|(d, _)| *d == r.config.divergence) {
            divs.push((r.config.divergence, k));
        }
    }
    let at = |k: usize, f: fn(&Diagnostics) -> f64| -> Vec<f64> {
        s.steps.iter().map(|st| f(&st.diagnostics[k])).collect()
    };
    let batch = |id: &str, title: &str, subtitle: &str, fmt: Fmt, series| TrendData {
        id: id.into(),
        title: title.into(),
        subtitle: subtitle.into(),
        y_desc: title.to_lowercase(),
        fmt,
        series,
        by_rule: false,
    };
    if s.rules.is_empty() {
        return out;
    }
    out.push(batch(
        "divergence-mean",
        "Mean divergence",
        "the mean of D_t over each step's response tokens",
        Fmt::Fixed(4),
        divs.iter()
            .enumerate()
            .map(|(j, &(d, k))| {
                let v = at(k, |g| g.divergence_mean);
                (format!("mean D ({})", d.name()), 5 + j, v)
            })
            .collect(),
    ));
    out.push(batch(
        "divergence-max",
        "Max divergence",
        "the largest D_t of each step",
        Fmt::Fixed(4),
        divs.iter()
            .enumerate()
            .map(|(j, &(d, k))| {
                let v = at(k, |g| g.divergence_max);
                (format!("max D ({})", d.name()), 5 + j, v)
            })
            .collect(),
    ));
    out.push(batch(
        "ratio",
        "Ratio π_θ/μ",
        "min, mean and max of ρ over each step's response tokens",
        Fmt::Fixed(4),
        vec![
            ("min".into(), 1, at(0, |g| g.ratio_min)),
            ("mean".into(), 5, at(0, |g| g.ratio_mean)),
            ("max".into(), 4, at(0, |g| g.ratio_max)),
        ],
    ));
    out.push(batch(
        "kl",
        "KL(μ ‖ π_θ) estimates",
        "k1 = mean(−r) and k3 = mean(ρ − 1 − r), r = logp − logp_old",
        Fmt::Fixed(5),
        vec![
            ("k1".into(), 5, at(0, |g| g.approx_kl_k1)),
            ("k3".into(), 4, at(0, |g| g.approx_kl_k3)),
        ],
    ));
    out.push(batch(
        "tokens",
        "Response tokens",
        "response tokens of each step's batch",
        Fmt::Int,
        vec![("tokens".into(), 5, at(0, |g| g.response_tokens as f64))],
    ));
    out
}

fn steps_page(s: &StepsAnalysis) -> Result<String, String> {
    let mut body = String::new();
    render_doc(&mut body, &report::steps_report(s, None, &[]));
    body.push_str("<section id=\"plots\">\n<h2>Plots</h2>\n");
    steps_plot(&mut body, s)?;
    body.push_str(
        "</section>\n<section id=\"trends\">\n<h2>Every headline number across steps</h2>\n",
    );
    let steps: Vec<u64> = s.steps.iter().map(|st| st.step).collect();
    for t in trends(s) {
        let _ = writeln!(body, "<h3>{}</h3>", esc(&t.title));
        trend_chart(&mut body, &t, &steps, s.rules.len())?;
        // Without a chart, the values are all there is: shown open.
        let open = if cfg!(feature = "plots") { "" } else { " open" };
        let _ = writeln!(body, "<details{open}>\n<summary>values</summary>");
        let mut head = vec!["step".to_string()];
        head.extend(t.series.iter().map(|x| x.0.clone()));
        let rows = steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let mut row = vec![step.to_string()];
                row.extend(t.series.iter().map(|x| t.fmt.show(x.2[i])));
                row
            })
            .collect();
        table(
            &mut body,
            &Table {
                head,
                rows,
                left: 0,
            },
        );
        body.push_str("</details>\n");
    }
    body.push_str("</section>\n");
    Ok(document(
        &format!("cppo inspect: {} steps in {}", s.steps.len(), s.dir),
        &body,
    ))
}

#[cfg(feature = "plots")]
fn steps_plot(out: &mut String, s: &StepsAnalysis) -> Result<(), String> {
    use crate::inspect::PlotKind;
    let svg = crate::plots::svg(&Figures::Steps(s), PlotKind::Steps, STEPS)?;
    figure(
        out,
        "plot-steps",
        &svg,
        "Masked fraction (of which by the prefix budget) and mean divergence across steps.",
    );
    Ok(())
}

#[cfg(not(feature = "plots"))]
fn steps_plot(out: &mut String, _: &StepsAnalysis) -> Result<(), String> {
    out.push_str(NO_PLOTS);
    Ok(())
}

#[cfg(feature = "plots")]
fn trend_chart(out: &mut String, t: &TrendData, steps: &[u64], rules: usize) -> Result<(), String> {
    let trend = crate::plots::Trend {
        title: t.title.clone(),
        subtitle: t.subtitle.clone(),
        y_desc: t.y_desc.clone(),
        percent: matches!(t.fmt, Fmt::Pct),
        steps,
        series: t.series.clone(),
        rules: if t.by_rule { rules } else { 0 },
    };
    let svg = crate::plots::trend_svg(&trend, TREND)?;
    let caption = format!("{} across steps: {}.", t.title, t.subtitle);
    figure(out, &format!("trend-{}", t.id), &svg, &caption);
    Ok(())
}

#[cfg(not(feature = "plots"))]
fn trend_chart(out: &mut String, t: &TrendData, _: &[u64], _: usize) -> Result<(), String> {
    let _ = writeln!(out, "<p>{}.</p>", esc(&t.subtitle));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<img src=x onerror='a()'>&"b""#),
            "&lt;img src=x onerror=&#39;a()&#39;&gt;&amp;&quot;b&quot;"
        );
        assert_eq!(esc("δ_b ≤ 0.02"), "δ_b ≤ 0.02");
    }

    #[test]
    fn the_policy_allows_only_the_page_s_own_style_and_script() {
        let page = document("t", "");
        // sha256 of "" is 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=.
        assert_eq!(
            csp_hash(""),
            "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
        );
        let csp = format!(
            "default-src 'none'; style-src {}; script-src {};",
            csp_hash(STYLE),
            csp_hash(SCRIPT)
        );
        assert!(page.contains(&csp), "{page}");
        assert!(page.contains(&format!("<style>{STYLE}</style>")));
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
        // One script, one style, nothing that loads.
        assert_eq!(page.matches("<script").count(), 1);
        assert_eq!(page.matches("<style").count(), 1);
        for needle in ["http:", "https:", "src=", "href=", "url(", "@import"] {
            assert!(!page.contains(needle), "{needle} in {page}");
        }
    }
}
