//! The plots of `cppo inspect` (feature `plots`), drawn with plotters as SVG or PNG.
//!
//! No system font is read: plotters runs without its `ttf` feature (font-kit,
//! fontconfig), and lays out and rasterises text with ab_glyph from Noto Sans (Apache
//! License 2.0), embedded by the `ttf-noto-sans` crate and registered here as the
//! `sans-serif` family. SVG files carry their text as that font's glyph outlines
//! ([`crate::svgtext`]), so they look the same in every viewer, with no font installed.
//! PNG files are RGB, encoded with the `png` crate from plotters' pixel buffer.
//!
//! Figures of a batch: the divergence by position (median and 90th percentile per
//! bucket, log scale when they span more than a decade), CPPO's token limit δ/w_t and
//! mean effective threshold c_t by position, the masked fraction by position (one line
//! per rule), and a strip chart of a few rows' token decisions; the four together as
//! one figure. Figure of a run: masked fraction (total and budget) and mean divergence
//! by step. Colours are the Okabe–Ito palette, readable with the common forms of colour
//! blindness; line styles tell totals from parts.

use std::ops::Range;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::inspect::{Figures, PlotFormat, PlotKind};
use crate::report::{Analysis, StepsAnalysis, has_budget};

type Res<T = ()> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The font family every text uses, as SVG files name it: the embedded font's own name
/// first, so that a viewer that has Noto Sans lays text out exactly as measured here.
const FONT: &str = "Noto Sans, sans-serif";

/// Registers the embedded font once.
fn fonts() -> Res {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok()
            && register_font(FONT, FontStyle::Bold, ttf_noto_sans::BOLD).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded font could not be loaded".into())
    }
}

/// Draws one figure and encodes it.
pub fn render(
    figures: &Figures<'_>,
    kind: PlotKind,
    format: PlotFormat,
    size: (u32, u32),
) -> Res<Vec<u8>> {
    fonts()?;
    match format {
        PlotFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw(&root, figures, kind, SVG_SLACK)?;
                root.present().map_err(err)?;
            }
            Ok(crate::svgtext::outline_text(&svg)?.into_bytes())
        }
        PlotFormat::Png => {
            let (w, h) = size;
            let mut rgb = vec![0u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                draw(&root, figures, kind, 1.0)?;
                root.present().map_err(err)?;
            }
            encode_png(&rgb, w, h)
        }
    }
}

/// One figure as SVG text, for the HTML page to inline.
pub fn svg(figures: &Figures<'_>, kind: PlotKind, size: (u32, u32)) -> Res<String> {
    let bytes = render(figures, kind, PlotFormat::Svg, size)?;
    String::from_utf8(bytes).map_err(err)
}

/// A trend across the steps of a run, for the HTML page: one headline number, one line
/// per series.
pub struct Trend<'a> {
    pub title: String,
    pub subtitle: String,
    pub y_desc: String,
    /// The values are fractions, shown in percent.
    pub percent: bool,
    /// The step numbers, in order.
    pub steps: &'a [u64],
    /// Each line: its label, its colour (a rule's index, so that a rule has one colour
    /// and line width on every chart), and one value per step (NaN for none).
    pub series: Vec<(String, usize, Vec<f64>)>,
    /// How many rules there are (line widths go from the first rule's to the last's).
    pub rules: usize,
}

/// A [`Trend`] as SVG text.
pub fn trend_svg(t: &Trend<'_>, size: (u32, u32)) -> Res<String> {
    fonts()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let theme = Theme::of(&root, SVG_SLACK);
        let x: Vec<f64> = t.steps.iter().map(|&s| s as f64).collect();
        let xr = step_range(&x);
        let scale = if t.percent { 100.0 } else { 1.0 };
        let lines: Vec<Line> = t
            .series
            .iter()
            .map(|(label, colour, values)| Line {
                label: label.clone(),
                color: rule_color(*colour),
                dash: Dash::Solid,
                weight: if *colour < t.rules {
                    rule_weight(*colour, t.rules)
                } else {
                    1.0
                },
                points: x
                    .iter()
                    .zip(values)
                    .map(|(&x, &v)| (x, scale * v))
                    .collect(),
            })
            .collect();
        let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
        let extra: &[f64] = if t.percent { &[0.0, 1.0] } else { &[0.0] };
        let y = span(values, extra, 0.0..1.0);
        let fmt = number_fmt(&y);
        let pct = t.percent;
        let y_fmt = move |v: &f64| {
            if pct { format!("{}%", fmt(v)) } else { fmt(v) }
        };
        let step_fmt = |v: &f64| format!("{v:.0}");
        line_chart(
            &root,
            &LineChart {
                title: t.title.clone(),
                subtitle: t.subtitle.clone(),
                x_desc: "step".into(),
                y_desc: t.y_desc.clone(),
                x: xr,
                y,
                log_y: false,
                x_fmt: &step_fmt,
                y_fmt: &y_fmt,
                lines,
                markers: t.steps.len() <= 25,
            },
            theme,
        )?;
        root.present().map_err(err)?;
    }
    crate::svgtext::outline_text(&svg)
}

/// The x range of a chart across steps: the steps, a little padded.
fn step_range(x: &[f64]) -> Range<f64> {
    match (x.first(), x.last()) {
        (Some(&a), Some(&b)) if b > a => {
            let pad = (b - a) * 0.02;
            a - pad..b + pad
        }
        (Some(&a), _) => a - 1.0..a + 1.0,
        _ => 0.0..1.0,
    }
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(rgb).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

/// How much wider than measured an SVG text is drawn. plotters measures text with an em
/// of size·unitsPerEm/(ascender − descender) = size·2048/2789, and writes the SVG's
/// `font-size` as size/1.24, which [`crate::svgtext`] draws as the em: 1.098× as wide, so
/// legends leave that much room.
const SVG_SLACK: f64 = 1.1;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figures: &Figures<'_>,
    kind: PlotKind,
    slack: f64,
) -> Res {
    root.fill(&WHITE).map_err(err)?;
    let theme = Theme::of(root, slack);
    match (figures, kind) {
        (Figures::Batch(a), PlotKind::Dashboard) => dashboard(root, a, slack),
        (Figures::Batch(a), PlotKind::Divergence) => divergence(root, a, theme),
        (Figures::Batch(a), PlotKind::Thresholds) => thresholds(root, a, theme),
        (Figures::Batch(a), PlotKind::Masked) => masked(root, a, theme),
        (Figures::Batch(a), PlotKind::Strip) => strip(root, a, theme),
        (Figures::Steps(s), PlotKind::Steps) => steps(root, s, slack),
        _ => Err(format!("no {kind:?} figure for this input")),
    }
}

// ---------------------------------------------------------------------------------------
// Style
// ---------------------------------------------------------------------------------------

/// Okabe–Ito colours, one per rule in order (yellow left out: too pale on white), then
/// a mid grey, so that the built-in set's eight rules each have their own; a ninth
/// rule repeats the first colour.
const PALETTE: [RGBColor; 8] = [
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 114, 178),   // blue
    RGBColor(0, 0, 0),       // black
    RGBColor(128, 128, 128), // grey
];

fn rule_color(k: usize) -> RGBColor {
    PALETTE[k % PALETTE.len()]
}

/// Line width of rule k of n, relative to the theme's: from 1.7 for the first rule down
/// to 1 for the last, so that where two rules' lines coincide (CPPO budget-only and
/// full CPPO often do) the one drawn first shows around the one drawn over it.
fn rule_weight(k: usize, n: usize) -> f64 {
    if n <= 1 {
        1.0
    } else {
        1.0 + 0.7 * (n - 1 - k.min(n - 1)) as f64 / (n - 1) as f64
    }
}

const GREY: RGBColor = RGBColor(110, 110, 110);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Strip chart colours: kept, kept by the bypass, masked by the token threshold, masked
/// by the prefix budget.
const KEPT: RGBColor = RGBColor(200, 200, 200);
const BYPASS: RGBColor = RGBColor(86, 180, 233);
const TOKEN: RGBColor = RGBColor(213, 94, 0);
const BUDGET: RGBColor = RGBColor(120, 40, 140);

/// Font sizes, in pixels, scaled to the panel.
#[derive(Clone, Copy)]
struct Theme {
    base: f64,
    /// Room left for text set wider than measured ([`SVG_SLACK`]; 1 for PNG).
    slack: f64,
}

impl Theme {
    fn of<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, slack: f64) -> Self {
        let (w, h) = area.dim_in_pixel();
        Self {
            base: (f64::from(h) / 30.0)
                .min(f64::from(w) / 44.0)
                .clamp(11.0, 40.0),
            slack,
        }
    }
    /// A text's width as a viewer may set it.
    fn text_width<DB: DrawingBackend>(
        self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        style: &TextStyle<'_>,
    ) -> i32 {
        let measured = area
            .estimate_text_size(text, style)
            .map_or(text.chars().count() as f64 * self.base * 0.5, |(w, _)| {
                f64::from(w)
            });
        (measured * self.slack).round() as i32
    }
    fn px(self, k: f64) -> u32 {
        (self.base * k).round() as u32
    }
    fn text(self, k: f64) -> TextStyle<'static> {
        (FONT, self.base * k).into_font().color(&BLACK)
    }
    fn title(self) -> TextStyle<'static> {
        (FONT, self.base * 1.2)
            .into_font()
            .style(FontStyle::Bold)
            .color(&BLACK)
    }
    fn line_width(self) -> u32 {
        (self.base / 7.0).round().max(2.0) as u32
    }
}

/// A text style shrunk until `text` fits in `width` pixels (down to 60%).
fn fitted<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: TextStyle<'static>,
    width: u32,
    theme: Theme,
) -> TextStyle<'static> {
    let mut style = style;
    for _ in 0..8 {
        match theme.text_width(area, text, &style) {
            w if w > width as i32 => {
                let size = match style.font.get_size() {
                    s if s > 8.0 => s * 0.94,
                    s => s,
                };
                style = TextStyle {
                    font: style.font.resize(size),
                    ..style
                };
            }
            _ => break,
        }
    }
    style
}

/// A title and a grey subtitle at the top of `area`; returns the area below.
fn titled<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    subtitle: &str,
    theme: Theme,
) -> Res<DrawingArea<DB, Shift>> {
    let width = area.dim_in_pixel().0.saturating_sub(theme.px(1.0));
    let t = fitted(area, title, theme.title(), width, theme);
    let area = area.titled(title, t).map_err(err)?;
    if subtitle.is_empty() {
        return Ok(area);
    }
    let s = fitted(&area, subtitle, theme.text(0.85).color(&GREY), width, theme);
    area.titled(subtitle, s).map_err(err)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dash {
    Solid,
    Dashed,
    Dotted,
}

/// One line of a chart.
struct Line {
    label: String,
    color: RGBColor,
    dash: Dash,
    /// Line width relative to the theme's.
    weight: f64,
    points: Vec<(f64, f64)>,
}

/// A legend entry's mark.
enum Mark {
    Line(RGBColor, Dash, f64),
    Box(RGBColor),
}

/// Legend entries laid out in rows across `width`; returns each entry's (x, row) and the
/// number of rows.
fn legend_layout<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[&str],
    theme: Theme,
    width: u32,
) -> (Vec<(i32, i32)>, i32) {
    let style = theme.text(0.85);
    let mark = theme.px(2.2) as i32;
    let gap = theme.px(1.6) as i32;
    let (mut x, mut row) = (0i32, 0i32);
    let mut at = Vec::with_capacity(labels.len());
    for label in labels {
        let w = theme.text_width(area, label, &style);
        let item = mark + theme.px(0.4) as i32 + w;
        if x > 0 && x + item > width as i32 {
            x = 0;
            row += 1;
        }
        at.push((x, row));
        x += item + gap;
    }
    (at, if labels.is_empty() { 0 } else { row + 1 })
}

/// The height a legend of these entries takes.
fn legend_height<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[&str],
    theme: Theme,
) -> u32 {
    let width = area.dim_in_pixel().0.saturating_sub(theme.px(4.0));
    let (_, rows) = legend_layout(area, labels, theme, width);
    if rows == 0 {
        0
    } else {
        rows as u32 * theme.px(1.5) + theme.px(0.8)
    }
}

/// Draws a legend in `area` (as tall as [`legend_height`]).
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(String, Mark)],
    theme: Theme,
) -> Res {
    let labels: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let (w, _) = area.dim_in_pixel();
    let width = w.saturating_sub(theme.px(4.0));
    let (at, rows) = legend_layout(area, &labels, theme, width);
    // Centre the block of rows horizontally by its widest row.
    let mark = theme.px(2.2) as i32;
    let style = theme.text(0.85).pos(Pos::new(HPos::Left, VPos::Center));
    let mut row_width = vec![0i32; rows.max(0) as usize];
    for ((x, row), label) in at.iter().zip(&labels) {
        let tw = theme.text_width(area, label, &style);
        let end = x + mark + theme.px(0.4) as i32 + tw;
        let r = &mut row_width[*row as usize];
        *r = (*r).max(end);
    }
    let widest = row_width.iter().copied().max().unwrap_or(0);
    let left = ((w as i32 - widest) / 2).max(0);
    let line_h = theme.px(1.5) as i32;
    let top = theme.px(0.4) as i32;
    for (((x, row), label), (_, m)) in at.iter().zip(&labels).zip(entries) {
        let x = left + x;
        let y = top + row * line_h + line_h / 2;
        match *m {
            Mark::Line(color, dash, weight) => {
                let style =
                    color.stroke_width((f64::from(theme.line_width()) * weight).round() as u32);
                let pts = [(x, y), (x + mark, y)];
                match dash {
                    Dash::Solid => area.draw(&PathElement::new(pts, style)),
                    Dash::Dashed => area.draw(&DashedPathElement::new(
                        pts,
                        theme.px(0.5) as i32,
                        theme.px(0.3) as i32,
                        style,
                    )),
                    Dash::Dotted => area.draw(&DashedPathElement::new(
                        pts,
                        theme.px(0.15) as i32,
                        theme.px(0.25) as i32,
                        style,
                    )),
                }
                .map_err(err)?;
            }
            Mark::Box(color) => {
                let s = theme.px(0.8) as i32;
                let x0 = x + (mark - s) / 2;
                area.draw(&Rectangle::new(
                    [(x0, y - s / 2), (x0 + s, y + s / 2)],
                    color.filled(),
                ))
                .map_err(err)?;
            }
        }
        area.draw(&Text::new(
            label.to_string(),
            (x + mark + theme.px(0.4) as i32, y),
            style.clone(),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// Splits a series at NaN (and at values the axis cannot show), so that gaps stay gaps.
fn segments(points: &[(f64, f64)], log_y: bool) -> Vec<Vec<(f64, f64)>> {
    let mut out = vec![Vec::new()];
    for &(x, y) in points {
        let ok = x.is_finite() && y.is_finite() && (!log_y || y > 0.0);
        if ok {
            if let Some(s) = out.last_mut() {
                s.push((x, y));
            }
        } else if out.last().is_some_and(|s| !s.is_empty()) {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A line chart panel.
struct LineChart<'a> {
    title: String,
    subtitle: String,
    x_desc: String,
    y_desc: String,
    x: Range<f64>,
    y: Range<f64>,
    log_y: bool,
    x_fmt: &'a dyn Fn(&f64) -> String,
    y_fmt: &'a dyn Fn(&f64) -> String,
    lines: Vec<Line>,
    /// Draw a dot at each point (few points).
    markers: bool,
}

fn line_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    c: &LineChart<'_>,
    theme: Theme,
) -> Res {
    let body = titled(area, &c.title, &c.subtitle, theme)?;
    let entries: Vec<(String, Mark)> = c
        .lines
        .iter()
        .filter(|l| !l.label.is_empty())
        .map(|l| (l.label.clone(), Mark::Line(l.color, l.dash, l.weight)))
        .collect();
    let labels: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let lh = legend_height(&body, &labels, theme);
    let (_, h) = body.dim_in_pixel();
    let (plot, legend) = body.split_vertically(h.saturating_sub(lh));
    if c.log_y {
        chart_body(&plot, c, c.y.clone().log_scale(), theme)?;
    } else {
        chart_body(&plot, c, c.y.clone(), theme)?;
    }
    draw_legend(&legend, &entries, theme)
}

fn chart_body<DB: DrawingBackend, Y>(
    area: &DrawingArea<DB, Shift>,
    c: &LineChart<'_>,
    y: Y,
    theme: Theme,
) -> Res
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .margin_top(theme.px(0.6))
        .margin_right(theme.px(1.6))
        .margin_left(theme.px(0.4))
        .x_label_area_size(theme.px(2.8))
        .y_label_area_size(theme.px(4.4))
        .build_cartesian_2d(c.x.clone(), y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(c.x_desc.as_str())
        .y_desc(c.y_desc.as_str())
        .axis_desc_style(theme.text(0.95))
        .label_style(theme.text(0.8))
        .x_label_formatter(c.x_fmt)
        .y_label_formatter(c.y_fmt)
        .x_labels(8)
        .y_labels(7)
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(WHITE.mix(0.0))
        .axis_style(GREY.stroke_width(1))
        .draw()
        .map_err(err)?;
    let width = theme.line_width();
    for line in &c.lines {
        let style = line
            .color
            .stroke_width((f64::from(width) * line.weight).round().max(1.0) as u32);
        for seg in segments(&line.points, c.log_y) {
            match line.dash {
                Dash::Solid => chart.draw_series(LineSeries::new(seg.clone(), style)),
                Dash::Dashed => chart.draw_series(DashedLineSeries::new(
                    seg.clone(),
                    theme.px(0.6) as i32,
                    theme.px(0.35) as i32,
                    style,
                )),
                Dash::Dotted => chart.draw_series(DashedLineSeries::new(
                    seg.clone(),
                    theme.px(0.15) as i32,
                    theme.px(0.3) as i32,
                    style,
                )),
            }
            .map_err(err)?;
            if c.markers {
                let r = (width + 1) as i32;
                chart
                    .draw_series(seg.iter().map(|&p| Circle::new(p, r, line.color.filled())))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

/// A range holding every finite value (and `extra`), padded; `fallback` when there is
/// none.
fn span(values: impl Iterator<Item = f64>, extra: &[f64], fallback: Range<f64>) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values
        .chain(extra.iter().copied())
        .filter(|v| v.is_finite())
    {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return fallback;
    }
    if hi - lo < 1e-12 {
        // One value: a range around it.
        let pad = (hi.abs() * 0.1).max(0.1);
        return lo - pad..hi + pad;
    }
    let pad = (hi - lo) * 0.08;
    lo - pad..hi + pad
}

/// Bucket centres, in percent of the response.
fn centres(n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| 100.0 * (k as f64 + 0.5) / n as f64)
        .collect()
}

fn pct_fmt(x: &f64) -> String {
    format!("{x:.0}%")
}

fn position_desc(a: &Analysis) -> String {
    format!(
        "relative position in the response (%), {} buckets of {}%",
        a.buckets,
        trim(100.0 / a.buckets as f64)
    )
}

/// A number without trailing zeros.
fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Tick labels for values spanning `range`: enough decimals to tell ticks apart.
fn number_fmt(range: &Range<f64>) -> impl Fn(&f64) -> String + use<> {
    let span = (range.end - range.start).abs().max(1e-12);
    let decimals = (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize;
    move |x: &f64| {
        let s = format!("{x:.decimals$}");
        if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() {
            s[1..].to_string()
        } else {
            s
        }
    }
}

fn log_fmt(x: &f64) -> String {
    if *x >= 1e-4 {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{x:.0e}")
    }
}

// ---------------------------------------------------------------------------------------
// Figures of a batch
// ---------------------------------------------------------------------------------------

fn dashboard<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, a: &Analysis, slack: f64) -> Res {
    let theme = Theme::of(&root.split_evenly((2, 2))[0], slack);
    let tokens = a.rules.first().map_or(0, |r| r.diagnostics.response_tokens);
    let body = titled(
        root,
        &format!("cppo inspect: {}", a.batch.name),
        &format!(
            "{} rows × {} slots, {} response tokens, {}",
            a.batch.rows, a.batch.len, tokens, a.batch.dtype
        ),
        Theme {
            base: theme.base * 1.1,
            ..theme
        },
    )?;
    let panels = body.margin(theme.px(0.3), 0, 0, 0).split_evenly((2, 2));
    divergence(&panels[0], a, theme)?;
    thresholds(&panels[1], a, theme)?;
    masked(&panels[2], a, theme)?;
    strip(&panels[3], a, theme)
}

fn divergence<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    a: &Analysis,
    theme: Theme,
) -> Res {
    let x = centres(a.buckets);
    let mut lines = Vec::new();
    let many = a.divergences.len() > 1;
    for (k, d) in a.divergences.iter().enumerate() {
        let color = if many {
            rule_color(k + 5)
        } else {
            RGBColor(0, 114, 178)
        };
        let prefix = if many {
            format!("{}: ", d.divergence.name())
        } else {
            String::new()
        };
        let p = &d.by_position;
        lines.push(Line {
            label: format!("{prefix}median"),
            color,
            dash: Dash::Solid,
            weight: 1.0,
            points: x.iter().copied().zip(p.median.iter().copied()).collect(),
        });
        lines.push(Line {
            label: format!("{prefix}90th percentile"),
            color,
            dash: Dash::Dashed,
            weight: 1.0,
            points: x.iter().copied().zip(p.p90.iter().copied()).collect(),
        });
    }
    // The thresholds δ of the rules on this divergence, for scale.
    let mut deltas: Vec<(f64, Vec<&str>)> = Vec::new();
    if a.divergences.len() == 1 {
        for r in &a.rules {
            if let Some(d) = threshold_delta(&r.config) {
                match deltas.iter_mut().find(|(v, _)| *v == d) {
                    Some((_, names)) => names.push(&r.name),
                    None => deltas.push((d, vec![&r.name])),
                }
            }
        }
    }
    let one_delta = deltas.len() == 1;
    for (d, names) in &deltas {
        let label = if one_delta {
            format!("token threshold δ = {} (every rule that has one)", trim(*d))
        } else {
            format!("token threshold δ = {}: {}", trim(*d), name_list(names))
        };
        lines.push(Line {
            label,
            color: GREY,
            dash: Dash::Dotted,
            weight: 0.8,
            points: vec![(0.0, *d), (100.0, *d)],
        });
    }
    let values: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .collect();
    let positive: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let (lo, hi) = positive
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), &v| (l.min(v), h.max(v)));
    let log_y = !positive.is_empty() && hi / lo > 10.0;
    let (y, y_desc) = if log_y {
        // Whole decades, a little beyond, so that both end ticks are labelled.
        let lo = 10f64.powf(lo.log10().floor()) * 0.8;
        let hi = 10f64.powf(hi.log10().ceil()) * 1.1;
        (lo..hi, "D_t (log scale)")
    } else {
        let r = span(values.iter().copied(), &[0.0], 0.0..1.0);
        (0.0..r.end, "D_t")
    };
    let lin = number_fmt(&y);
    let y_fmt: &dyn Fn(&f64) -> String = if log_y { &log_fmt } else { &lin };
    let names: Vec<&str> = a.divergences.iter().map(|d| d.divergence.name()).collect();
    line_chart(
        area,
        &LineChart {
            title: format!("Divergence D_t ({}) by position", names.join(", ")),
            subtitle: format!(
                "median and 90th percentile of the response tokens in each of {} position buckets",
                a.buckets
            ),
            x_desc: position_desc(a),
            y_desc: y_desc.into(),
            x: 0.0..100.0,
            y,
            log_y,
            x_fmt: &pct_fmt,
            y_fmt,
            lines,
            markers: false,
        },
        theme,
    )
}

/// The δ of a rule with a divergence threshold (DPPO, CPPO, TRM), from its config.
fn threshold_delta(cfg: &cppo::Config) -> Option<f64> {
    if !cfg.rule.has_threshold() {
        return None;
    }
    match serde_json::to_value(cfg.rule) {
        Ok(v) => v.get("delta").and_then(|d| d.as_f64()),
        Err(_) => None,
    }
}

/// Rule names for a legend: all of them up to three, else the first two and how many
/// more.
fn name_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [a] => (*a).to_string(),
        [a, b] => format!("{a} and {b}"),
        [a, b, c] => format!("{a}, {b} and {c}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} more", rest.len()),
    }
}

/// Lines of the same style that coincide (within 0.5% of the chart's y range at every
/// point) drawn once, their labels' rule names merged: `"A and B: δ/w_t"`. A line's
/// label is `"rule: what"`; only lines with the same `what` and dash merge.
fn merge_coincident(lines: Vec<Line>, y: &Range<f64>) -> Vec<Line> {
    let tol = 0.005 * (y.end - y.start).abs().max(f64::MIN_POSITIVE);
    let split = |l: &Line| -> (String, String) {
        match l.label.rsplit_once(": ") {
            Some((who, what)) => (who.to_string(), what.to_string()),
            None => (l.label.clone(), String::new()),
        }
    };
    let mut groups: Vec<(Line, Vec<String>, String)> = Vec::new();
    for line in lines {
        let (who, what) = split(&line);
        let same = groups.iter_mut().find(|(g, _, gwhat)| {
            *gwhat == what
                && g.dash == line.dash
                && g.points.len() == line.points.len()
                && g.points.iter().zip(&line.points).all(|(a, b)| {
                    a.0 == b.0 && ((a.1 - b.1).abs() <= tol || (a.1.is_nan() && b.1.is_nan()))
                })
        });
        match same {
            Some((_, names, _)) => names.push(who),
            None => groups.push((line, vec![who], what)),
        }
    }
    groups
        .into_iter()
        .map(|(mut line, names, what)| {
            if names.len() > 1 {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                line.label = format!("{}: {what}", name_list(&names));
            }
            line
        })
        .collect()
}

fn thresholds<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    a: &Analysis,
    theme: Theme,
) -> Res {
    let x = centres(a.buckets);
    let n = a.rules.len();
    let mut lines = Vec::new();
    // Rules with a constant δ first, so that CPPO's lines draw over them.
    for (k, r) in a.rules.iter().enumerate() {
        let p = &r.by_position;
        if let (Some(c), None) = (&p.threshold_mean, &p.token_limit_mean) {
            lines.push(Line {
                label: format!("{}: δ", r.name),
                color: rule_color(k),
                dash: Dash::Dotted,
                weight: rule_weight(k, n),
                points: x.iter().copied().zip(c.iter().copied()).collect(),
            });
        }
    }
    for (k, r) in a.rules.iter().enumerate() {
        let p = &r.by_position;
        if let (Some(c), Some(limit)) = (&p.threshold_mean, &p.token_limit_mean) {
            let finite: Vec<f64> = limit.iter().copied().filter(|v| v.is_finite()).collect();
            let varies = finite
                .iter()
                .any(|v| (v - finite[0]).abs() > 1e-9 * finite[0].abs().max(1.0));
            if varies {
                lines.push(Line {
                    label: format!("{}: δ/w_t", r.name),
                    color: rule_color(k),
                    dash: Dash::Dashed,
                    weight: rule_weight(k, n),
                    points: x.iter().copied().zip(limit.iter().copied()).collect(),
                });
            }
            lines.push(Line {
                label: format!("{}: mean c_t", r.name),
                color: rule_color(k),
                dash: Dash::Solid,
                weight: rule_weight(k, n),
                points: x.iter().copied().zip(c.iter().copied()).collect(),
            });
        }
    }
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let y = span(values, &[0.0], 0.0..1.0);
    let mut lines = merge_coincident(lines, &y);
    if y.start < 0.0 {
        lines.insert(
            0,
            Line {
                label: String::new(),
                color: GREY,
                dash: Dash::Solid,
                weight: 0.4,
                points: vec![(0.0, 0.0), (100.0, 0.0)],
            },
        );
    }
    let subtitle = if lines.is_empty() {
        "no rule here has a divergence threshold".to_string()
    } else {
        "CPPO masks a token that moves away from μ when w_t·D_t > c_t; c_t = min(δ, budget left)"
            .to_string()
    };
    let fmt = number_fmt(&y);
    line_chart(
        area,
        &LineChart {
            title: "Token limit δ/w_t and mean effective threshold c_t by position".into(),
            subtitle,
            x_desc: position_desc(a),
            y_desc: "threshold".into(),
            x: 0.0..100.0,
            y,
            log_y: false,
            x_fmt: &pct_fmt,
            y_fmt: &fmt,
            lines,
            markers: false,
        },
        theme,
    )
}

fn masked<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, a: &Analysis, theme: Theme) -> Res {
    let x = centres(a.buckets);
    let lines: Vec<Line> = a
        .rules
        .iter()
        .enumerate()
        .map(|(k, r)| Line {
            label: r.name.clone(),
            color: rule_color(k),
            dash: Dash::Solid,
            weight: rule_weight(k, a.rules.len()),
            points: x
                .iter()
                .copied()
                .zip(r.by_position.masked_frac.iter().map(|f| 100.0 * f))
                .collect(),
        })
        .collect();
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let top = span(values, &[0.0, 1.0], 0.0..1.0).end;
    let y = 0.0..top;
    let fmt = number_fmt(&y);
    let y_fmt = move |v: &f64| format!("{}%", fmt(v));
    line_chart(
        area,
        &LineChart {
            title: "Masked fraction by position, one line per rule".into(),
            subtitle: format!(
                "share of the response tokens in each of {} position buckets that lose their gradient",
                a.buckets
            ),
            x_desc: position_desc(a),
            y_desc: "masked (%)".into(),
            x: 0.0..100.0,
            y,
            log_y: false,
            x_fmt: &pct_fmt,
            y_fmt: &y_fmt,
            lines,
            markers: false,
        },
        theme,
    )
}

fn strip<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, a: &Analysis, theme: Theme) -> Res {
    let s = &a.strip;
    let rule = a.rules.get(s.rule);
    let title = match rule {
        Some(_) if s.rows.is_empty() => "Token decisions: no row has a response token".into(),
        Some(r) => format!("Token decisions in {} rows under {}", s.rows.len(), r.name),
        None => "Token decisions".to_string(),
    };
    let chosen = if s.chosen {
        "the rows with the most kinds of decision"
    } else {
        "the rows of --strip-rows"
    };
    let subtitle = format!("{chosen}, one cell per slot; blank: not a response token");
    let body = titled(area, &title, &subtitle, theme)?;
    let entries = [
        ("kept".to_string(), Mark::Box(KEPT)),
        (
            "kept by the corrective bypass".to_string(),
            Mark::Box(BYPASS),
        ),
        ("masked: token threshold".to_string(), Mark::Box(TOKEN)),
        ("masked: prefix budget".to_string(), Mark::Box(BUDGET)),
    ];
    let labels: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let lh = legend_height(&body, &labels, theme);
    let (_, h) = body.dim_in_pixel();
    let (plot, legend) = body.split_vertically(h.saturating_sub(lh));

    let Some(rule) = rule else {
        return draw_legend(&legend, &entries, theme);
    };
    let n = s.rows.len();
    let row_label = |k: usize| -> String {
        let i = s.rows[k];
        match &s.advantages {
            Some(adv) => format!("row {i}, A = {:+.2}", adv[k]),
            None => format!("row {i}"),
        }
    };
    let label_style = theme.text(0.8).pos(Pos::new(HPos::Right, VPos::Center));
    let label_w = (0..n)
        .map(|k| theme.text_width(&plot, &row_label(k), &label_style).max(0) as u32)
        .max()
        .unwrap_or(0);
    let end = s
        .rows
        .iter()
        .map(|&i| {
            rule.reasons
                .row(i)
                .iter()
                .rposition(|&r| r != 0)
                .map_or(0, |j| j + 1)
        })
        .max()
        .unwrap_or(a.batch.len)
        .max(1);
    let mut chart = ChartBuilder::on(&plot)
        .margin_top(theme.px(0.6))
        .margin_right(theme.px(1.6))
        .margin_left(theme.px(0.4))
        .x_label_area_size(theme.px(2.8))
        .y_label_area_size(label_w + theme.px(0.8))
        .build_cartesian_2d(0.0..end as f64, 0.0..n.max(1) as f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("slot (column) of the padded row")
        .axis_desc_style(theme.text(0.95))
        .label_style(theme.text(0.8))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_labels(end.min(10))
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(WHITE.mix(0.0))
        .axis_style(GREY.stroke_width(1))
        .draw()
        .map_err(err)?;
    for (k, &i) in s.rows.iter().enumerate() {
        let y0 = (n - 1 - k) as f64 + 0.15;
        let y1 = y0 + 0.7;
        let row = rule.reasons.row(i);
        let mut runs: Vec<(usize, usize, u8)> = Vec::new();
        for (j, &r) in row.iter().enumerate() {
            match runs.last_mut() {
                Some((_, stop, code)) if *code == r && *stop == j => *stop = j + 1,
                _ => runs.push((j, j + 1, r)),
            }
        }
        chart
            .draw_series(runs.into_iter().filter_map(|(j0, j1, r)| {
                let color = match r {
                    1 => KEPT,
                    2 => BYPASS,
                    3 => TOKEN,
                    4 => BUDGET,
                    _ => return None,
                };
                Some(Rectangle::new(
                    [(j0 as f64, y0), (j1 as f64, y1)],
                    color.filled(),
                ))
            }))
            .map_err(err)?;
        // The row's label, left of the plotting area.
        let (px, py) = chart.backend_coord(&(0.0, y0 + 0.35));
        let (ox, oy) = plot.get_base_pixel();
        plot.draw(&Text::new(
            row_label(k),
            (px - ox - theme.px(0.5) as i32, py - oy),
            label_style.clone(),
        ))
        .map_err(err)?;
    }
    draw_legend(&legend, &entries, theme)
}

// ---------------------------------------------------------------------------------------
// The figure of a run
// ---------------------------------------------------------------------------------------

fn steps<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &StepsAnalysis, slack: f64) -> Res {
    let (_, h) = root.dim_in_pixel();
    let (top, bottom) = root.split_vertically(h * 3 / 5);
    let theme = Theme::of(&top, slack);
    let x: Vec<f64> = s.steps.iter().map(|st| st.step as f64).collect();
    let xr = match (x.first(), x.last()) {
        (Some(&a), Some(&b)) if b > a => {
            let pad = (b - a) * 0.02;
            a - pad..b + pad
        }
        (Some(&a), _) => a - 1.0..a + 1.0,
        _ => 0.0..1.0,
    };
    let markers = s.steps.len() <= 25;
    let step_fmt = |v: &f64| format!("{v:.0}");

    let mut lines = Vec::new();
    for (k, r) in s.rules.iter().enumerate() {
        lines.push(Line {
            label: format!("{}: masked", r.name),
            color: rule_color(k),
            dash: Dash::Solid,
            weight: rule_weight(k, s.rules.len()),
            points: x
                .iter()
                .zip(&s.steps)
                .map(|(&x, st)| (x, 100.0 * st.diagnostics[k].masked_frac))
                .collect(),
        });
    }
    for (k, r) in s.rules.iter().enumerate() {
        if has_budget(&r.config) {
            lines.push(Line {
                label: format!("{}: by the prefix budget", r.name),
                color: rule_color(k),
                dash: Dash::Dashed,
                weight: rule_weight(k, s.rules.len()),
                points: x
                    .iter()
                    .zip(&s.steps)
                    .map(|(&x, st)| (x, 100.0 * st.diagnostics[k].masked_frac_prefix_budget))
                    .collect(),
            });
        }
    }
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let y = 0.0..span(values, &[0.0, 1.0], 0.0..1.0).end;
    let fmt = number_fmt(&y);
    let y_fmt = move |v: &f64| format!("{}%", fmt(v));
    line_chart(
        &top,
        &LineChart {
            title: format!("Masked fraction across {} steps", s.steps.len()),
            subtitle: "solid: masked in total; dashed: masked by the prefix budget alone".into(),
            x_desc: "step".into(),
            y_desc: "masked (%)".into(),
            x: xr.clone(),
            y,
            log_y: false,
            x_fmt: &step_fmt,
            y_fmt: &y_fmt,
            lines,
            markers,
        },
        theme,
    )?;

    let mut lines = Vec::new();
    let mut seen = Vec::new();
    for (k, r) in s.rules.iter().enumerate() {
        if seen.contains(&r.config.divergence) {
            continue;
        }
        seen.push(r.config.divergence);
        lines.push(Line {
            label: format!("mean D_t ({})", r.config.divergence.name()),
            color: rule_color(seen.len() + 4),
            dash: Dash::Solid,
            weight: 1.0,
            points: x
                .iter()
                .zip(&s.steps)
                .map(|(&x, st)| (x, st.diagnostics[k].divergence_mean))
                .collect(),
        });
    }
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let y = 0.0..span(values, &[0.0], 0.0..1.0).end;
    let fmt = number_fmt(&y);
    line_chart(
        &bottom,
        &LineChart {
            title: "Mean divergence across steps".into(),
            subtitle:
                "over each step's response tokens; drift between the rollout and the current policy"
                    .into(),
            x_desc: "step".into(),
            y_desc: "mean D_t".into(),
            x: xr,
            y,
            log_y: false,
            x_fmt: &step_fmt,
            y_fmt: &fmt,
            lines,
            markers,
        },
        theme,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, dash: Dash, ys: &[f64]) -> Line {
        Line {
            label: label.into(),
            color: GREY,
            dash,
            weight: 1.0,
            points: ys.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect(),
        }
    }

    /// Every rule of the built-in set (`--compare`) is drawn in a colour of its own.
    #[test]
    fn built_in_rules_have_distinct_colours() {
        let n = crate::report::compare_set(cppo::Divergence::BinaryTv)
            .unwrap()
            .len();
        let colours: Vec<RGBColor> = (0..n).map(rule_color).collect();
        for (k, c) in colours.iter().enumerate() {
            assert!(
                !colours[..k].contains(c),
                "rule {k} of {n} repeats a colour"
            );
        }
    }

    #[test]
    fn names_are_listed_then_counted() {
        assert_eq!(name_list(&["A"]), "A");
        assert_eq!(name_list(&["A", "B"]), "A and B");
        assert_eq!(name_list(&["A", "B", "C"]), "A, B and C");
        assert_eq!(name_list(&["A", "B", "C", "D", "E"]), "A, B and 3 more");
    }

    /// Coincident lines of one kind and dash merge; a line 1% of the range away, of
    /// another dash or of another kind does not.
    #[test]
    fn coincident_lines_merge() {
        let y = 0.0..1.0;
        let lines = vec![
            line("A: δ/w_t", Dash::Dashed, &[0.15, 0.16, 0.18]),
            line("B: δ/w_t", Dash::Dashed, &[0.15, 0.162, 0.18]), // within 0.005
            line("C: δ/w_t", Dash::Dashed, &[0.15, 0.17, 0.18]),  // 0.01 away
            line("D: δ/w_t", Dash::Solid, &[0.15, 0.16, 0.18]),
            line("E: mean c_t", Dash::Dashed, &[0.15, 0.16, 0.18]),
            line("F: δ/w_t", Dash::Dashed, &[0.15, 0.16, 0.18]),
        ];
        let merged = merge_coincident(lines, &y);
        let labels: Vec<&str> = merged.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            ["A, B and F: δ/w_t", "C: δ/w_t", "D: δ/w_t", "E: mean c_t"]
        );
    }
}
