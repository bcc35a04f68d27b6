//! SVG text as glyph outlines, so that an SVG plot looks the same in every viewer.
//!
//! plotters' SVG backend writes each label as a `<text>` element that names a font
//! family and leaves the glyphs to the viewer, which substitutes whatever font it has.
//! [`outline_text`] replaces every `<text>` element by the glyphs of the embedded Noto
//! Sans (regular, or bold for `font-weight="bold"`), laid out as a browser would lay out
//! that element in that font:
//!
//! - the em is the element's `font-size` in pixels; a glyph is its outline in font units
//!   scaled by `font-size / units_per_em` and flipped (font units grow upward);
//! - glyphs advance by their horizontal advance plus the pair's kerning from the `kern`
//!   table (Noto Sans has none: its kerning is in GPOS, which is not applied, as
//!   plotters' PNG text does not apply it either);
//! - `text-anchor` `start`, `middle` or `end` puts the start, centre or end of the
//!   advance width at `x`;
//! - the baseline is `y` plus `dy`, which plotters sets to `0.76em` (top anchor),
//!   `0.5ex` or `-0.5ex` (centre and bottom), with ex the font's x-height;
//! - `fill`, `opacity` and a `transform` (plotters' rotations) carry over to the group.
//!
//! Each glyph's outline is written once, as a `<path>` in `<defs>`, and each occurrence
//! as a `<use>` of it, so a figure with a thousand characters carries a few dozen glyph
//! outlines. The glyphs' ids start with a hash of the figure (`g1a2b3c4d-r36`: regular
//! glyph 36), so that figures inlined in one HTML page do not share ids, and the same
//! figure always gets the same ones. Each replaced element becomes a `<g>` whose `aria-label` is its text, so
//! the words stay readable to screen readers, to search and to tests.

use std::collections::HashMap;
use std::fmt::Write as _;

use ab_glyph::{Font, FontRef, GlyphId, OutlineCurve};

type Res<T> = Result<T, String>;

/// The two faces, parsed once per call (parsing reads only the tables' directory).
struct Faces {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

impl Faces {
    fn load() -> Res<Self> {
        let parse = |b: &'static [u8]| FontRef::try_from_slice(b).map_err(|e| e.to_string());
        Ok(Self {
            regular: parse(ttf_noto_sans::REGULAR)?,
            bold: parse(ttf_noto_sans::BOLD)?,
        })
    }

    fn face(&self, bold: bool) -> &FontRef<'static> {
        if bold { &self.bold } else { &self.regular }
    }

    /// The x-height as a fraction of the em: OS/2 sxHeight over unitsPerEm, 1098/2048
    /// (regular) and 1118/2048 (bold), read with fontTools; ab_glyph does not expose
    /// the OS/2 table.
    fn x_height(bold: bool) -> f64 {
        if bold {
            1118.0 / 2048.0
        } else {
            1098.0 / 2048.0
        }
    }
}

/// One `<text>` element as plotters writes it.
#[derive(Debug, PartialEq)]
struct TextElement {
    attrs: Vec<(String, String)>,
    text: String,
}

impl TextElement {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, name: &str) -> Res<f64> {
        let v = self
            .attr(name)
            .ok_or_else(|| format!("a <text> element has no {name}"))?;
        v.trim()
            .parse()
            .map_err(|_| format!("a <text> element's {name} is {v:?}, not a number"))
    }
}

/// `svg` with every `<text>` element replaced by glyph outlines (see the module docs).
pub fn outline_text(svg: &str) -> Res<String> {
    let faces = Faces::load()?;
    // FNV-1a, 32 bits: a stable name for the figure.
    let hash = svg.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let prefix = format!("g{hash:08x}-");
    let mut glyphs: HashMap<(bool, GlyphId), String> = HashMap::new();
    let mut defs = String::new();
    let mut body = String::with_capacity(svg.len());
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        body.push_str(&rest[..start]);
        let (element, after) = parse_text(&rest[start..])?;
        draw(&element, &faces, &prefix, &mut glyphs, &mut defs, &mut body)?;
        rest = after;
    }
    body.push_str(rest);
    // The glyphs' outlines go right after the root element's opening tag.
    let open = body
        .find("<svg")
        .and_then(|i| body[i..].find('>').map(|j| i + j + 1))
        .ok_or("no <svg> element")?;
    let mut out = String::with_capacity(body.len() + defs.len() + 16);
    out.push_str(&body[..open]);
    if !defs.is_empty() {
        write!(out, "\n<defs>{defs}</defs>").expect("writing to a String");
    }
    out.push_str(&body[open..]);
    Ok(out)
}

/// Reads one `<text …>…</text>` at the start of `s`; returns it and what follows.
fn parse_text(s: &str) -> Res<(TextElement, &str)> {
    let head_end = s.find('>').ok_or("an unterminated <text> tag")?;
    let head = &s["<text".len()..head_end];
    let mut attrs = Vec::new();
    let mut h = head.trim_start();
    while !h.is_empty() {
        let eq = h.find('=').ok_or("a <text> attribute without a value")?;
        let name = h[..eq].trim().to_string();
        let v = h[eq + 1..].trim_start();
        let quote = v.chars().next().filter(|c| *c == '"' || *c == '\'');
        let quote = quote.ok_or("an unquoted <text> attribute")?;
        let close = v[1..]
            .find(quote)
            .ok_or("an unterminated <text> attribute")?;
        attrs.push((name, unescape(&v[1..1 + close])));
        h = v[close + 2..].trim_start();
    }
    let after_head = &s[head_end + 1..];
    let end = after_head
        .find("</text>")
        .ok_or("a <text> without </text>")?;
    let text = collapse_whitespace(&unescape(&after_head[..end]));
    Ok((
        TextElement { attrs, text },
        &after_head[end + "</text>".len()..],
    ))
}

/// XML's five predefined entities and numeric references.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let entity = &tail[1..semi];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=semi]),
        }
        rest = &tail[semi + 1..];
    }
    out.push_str(rest);
    out
}

/// SVG's default white-space handling (`xml:space="default"`), as a browser applies
/// it: newlines removed, tabs made spaces, leading and trailing spaces dropped, runs of
/// spaces made one. (plotters writes a newline on each side of a label.)
fn collapse_whitespace(s: &str) -> String {
    let spaced: String = s
        .chars()
        .filter(|&c| c != '\n' && c != '\r')
        .map(|c| if c == '\t' { ' ' } else { c })
        .collect();
    spaced
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// A number for SVG: at most `digits` decimals, trailing zeros trimmed.
fn num(x: f64, digits: usize) -> String {
    let s = format!("{x:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" { "0".into() } else { s }
}

/// The advance of each glyph of `text` from the text's start, and the whole width, in
/// font units.
fn layout(face: &FontRef<'_>, text: &str) -> (Vec<(GlyphId, f64)>, f64) {
    let mut x = 0.0f64;
    let mut prev: Option<GlyphId> = None;
    let mut placed = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = face.glyph_id(c);
        if let Some(p) = prev {
            x += f64::from(face.kern_unscaled(p, id));
        }
        placed.push((id, x));
        x += f64::from(face.h_advance_unscaled(id));
        prev = Some(id);
    }
    (placed, x)
}

/// The outline of a glyph as SVG path data, in font units (y up).
fn path_data(face: &FontRef<'_>, id: GlyphId) -> Option<String> {
    let outline = face.outline(id)?;
    let mut d = String::new();
    let mut at: Option<ab_glyph::Point> = None;
    let p = |q: ab_glyph::Point| format!("{} {}", num(q.x.into(), 1), num(q.y.into(), 1));
    for curve in &outline.curves {
        let (start, end) = match *curve {
            OutlineCurve::Line(a, b)
            | OutlineCurve::Quad(a, _, b)
            | OutlineCurve::Cubic(a, _, _, b) => (a, b),
        };
        if at != Some(start) {
            if at.is_some() {
                d.push('Z');
            }
            write!(d, "M{}", p(start)).expect("writing to a String");
        }
        match *curve {
            OutlineCurve::Line(_, b) => write!(d, "L{}", p(b)),
            OutlineCurve::Quad(_, c, b) => write!(d, "Q{} {}", p(c), p(b)),
            OutlineCurve::Cubic(_, c1, c2, b) => write!(d, "C{} {} {}", p(c1), p(c2), p(b)),
        }
        .expect("writing to a String");
        at = Some(end);
    }
    if at.is_some() {
        d.push('Z');
    }
    Some(d)
}

/// Writes one text element as a group of glyph uses, adding new glyphs to `defs`.
fn draw(
    e: &TextElement,
    faces: &Faces,
    prefix: &str,
    glyphs: &mut HashMap<(bool, GlyphId), String>,
    defs: &mut String,
    out: &mut String,
) -> Res<()> {
    let bold = e.attr("font-weight") == Some("bold");
    let face = faces.face(bold);
    let em = e.number("font-size")?;
    let upem = f64::from(face.units_per_em().ok_or("the font has no units per em")?);
    let scale = em / upem;
    let (x, y) = (e.number("x")?, e.number("y")?);
    let (placed, width) = layout(face, &e.text);
    let x0 = match e.attr("text-anchor") {
        Some("middle") => x - width * scale / 2.0,
        Some("end") => x - width * scale,
        _ => x,
    };
    let ex = Faces::x_height(bold) * em;
    let dy = match e.attr("dy").map(str::trim) {
        None => 0.0,
        Some(v) => {
            let (n, unit) = if let Some(n) = v.strip_suffix("em") {
                (n, em)
            } else if let Some(n) = v.strip_suffix("ex") {
                (n, ex)
            } else {
                (v.strip_suffix("px").unwrap_or(v), 1.0)
            };
            let n: f64 = n
                .trim()
                .parse()
                .map_err(|_| format!("a <text> element's dy is {v:?}"))?;
            n * unit
        }
    };
    let mut transform = String::new();
    if let Some(t) = e.attr("transform") {
        transform.push_str(t);
        transform.push(' ');
    }
    write!(
        transform,
        "translate({} {}) scale({} {})",
        num(x0, 2),
        num(y + dy, 2),
        num(scale, 6),
        num(-scale, 6)
    )
    .expect("writing to a String");
    write!(
        out,
        "<g aria-label=\"{}\" transform=\"{transform}\"",
        escape(&e.text)
    )
    .expect("writing to a String");
    for key in ["fill", "opacity"] {
        if let Some(v) = e.attr(key) {
            write!(out, " {key}=\"{}\"", escape(v)).expect("writing to a String");
        }
    }
    out.push('>');
    for (id, gx) in placed {
        let name = match glyphs.get(&(bold, id)) {
            Some(name) => name.clone(),
            None => {
                let Some(d) = path_data(face, id) else {
                    continue; // a space: no outline, only an advance
                };
                let name = format!("{prefix}{}{}", if bold { 'b' } else { 'r' }, id.0);
                write!(defs, "<path id=\"{name}\" d=\"{d}\"/>").expect("writing to a String");
                glyphs.insert((bold, id), name.clone());
                name
            }
        };
        if gx == 0.0 {
            write!(out, "<use href=\"#{name}\"/>")
        } else {
            write!(out, "<use href=\"#{name}\" x=\"{}\"/>", num(gx, 1))
        }
        .expect("writing to a String");
    }
    out.push_str("</g>");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLOTTERS: &str = concat!(
        r#"<svg width="200" height="100" viewBox="0 0 200 100" xmlns="http://www.w3.org/2000/svg">"#,
        "\n",
        r##"<rect x="0" y="0" width="200" height="100" fill="#FFFFFF"/>"##,
        "\n",
        r##"<text x="100" y="20" dy="0.76em" text-anchor="middle" font-family="Noto Sans, sans-serif" font-size="10" opacity="1" fill="#000000">A &amp; B</text>"##,
        "\n",
        r##"<text x="50" y="60" dy="0.5ex" text-anchor="end" font-family="Noto Sans, sans-serif" font-size="20" opacity="0.5" fill="#FF0000" font-weight="bold" transform="rotate(270, 50, 60)">AA</text>"##,
        "\n</svg>\n"
    );

    #[test]
    fn reads_plotters_text_elements() {
        let s = &PLOTTERS[PLOTTERS.find("<text").unwrap()..];
        let (e, rest) = parse_text(s).unwrap();
        assert_eq!(e.text, "A & B");
        assert_eq!(e.attr("text-anchor"), Some("middle"));
        assert_eq!(e.attr("font-family"), Some("Noto Sans, sans-serif"));
        assert_eq!(e.number("font-size").unwrap(), 10.0);
        assert!(rest.starts_with('\n'));
        assert_eq!(
            unescape("&lt;&#916;&#x3b4;&gt; &bogus; &"),
            "<Δδ> &bogus; &"
        );
        let (e, _) = parse_text("<text x=\"1\">\n  two\t words  \n</text>").unwrap();
        assert_eq!(e.text, "two words");
    }

    #[test]
    fn every_text_becomes_glyphs_defined_once() {
        let out = outline_text(PLOTTERS).unwrap();
        assert!(!out.contains("<text"), "{out}");
        let doc = roxmltree::Document::parse(&out).unwrap();
        let ids: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("path"))
            .filter_map(|n| n.attribute("id"))
            .collect();
        let groups: Vec<_> = doc
            .descendants()
            .filter(|n| n.attribute("aria-label").is_some())
            .collect();
        let labels: Vec<&str> = groups
            .iter()
            .map(|g| g.attribute("aria-label").unwrap())
            .collect();
        assert_eq!(labels, ["A & B", "AA"]);
        // "A & B": A, &, B drawn (the spaces only advance); "AA": one bold A, used twice.
        let uses = |g: &roxmltree::Node| -> Vec<String> {
            g.children()
                .filter(|n| n.has_tag_name("use"))
                .map(|n| {
                    n.attribute("href")
                        .unwrap()
                        .trim_start_matches('#')
                        .to_string()
                })
                .collect()
        };
        let (first, second) = (uses(&groups[0]), uses(&groups[1]));
        assert_eq!(first.len(), 3);
        assert_eq!(second.len(), 2);
        assert_eq!(second[0], second[1]);
        let face = |u: &str| u.split_once('-').unwrap().1.chars().next().unwrap();
        assert!(face(&second[0]) == 'b' && first.iter().all(|u| face(u) == 'r'));
        // One prefix per figure, from its content.
        let prefix = second[0].split_once('-').unwrap().0;
        assert!(first.iter().all(|u| u.starts_with(prefix)));
        let other = outline_text(&PLOTTERS.replace("A &amp; B", "A")).unwrap();
        assert!(!other.contains(prefix));
        assert_eq!(outline_text(PLOTTERS).unwrap(), out);
        assert_eq!(ids.len(), 4, "{ids:?}");
        for u in first.iter().chain(&second) {
            assert!(ids.contains(&u.as_str()), "{u} is not defined");
        }
        assert_eq!(groups[1].attribute("fill"), Some("#FF0000"));
        assert_eq!(groups[1].attribute("opacity"), Some("0.5"));
        assert!(
            groups[1]
                .attribute("transform")
                .unwrap()
                .starts_with("rotate(270, 50, 60) translate(")
        );
    }

    /// Placement by the rules of the module docs, against Noto Sans's metrics read with
    /// fontTools: unitsPerEm 2048; hmtx advances A 1309, space 532, & 1499, B 1331
    /// (regular) and A 1413 (bold); no `kern` table.
    #[test]
    fn layout_follows_the_anchor_and_the_baseline() {
        let faces = Faces::load().unwrap();
        let (r, b) = (&faces.regular, &faces.bold);
        assert_eq!(r.units_per_em(), Some(2048.0));
        let (placed, width) = layout(r, "A & B");
        let xs: Vec<f64> = placed.iter().map(|p| p.1).collect();
        assert_eq!(xs, [0.0, 1309.0, 1841.0, 3340.0, 3872.0]);
        assert_eq!(width, 3872.0 + 1331.0);
        assert_eq!(layout(b, "AA").1, 2.0 * 1413.0);
        let out = outline_text(PLOTTERS).unwrap();
        // Middle anchor at x = 100, em 10 px (scale 10/2048): the start is at
        // 100 − 5203·10/2048/2 = 87.2974; the baseline at 20 + 0.76·10 = 27.6.
        assert!(
            out.contains("translate(87.3 27.6) scale(0.004883 -0.004883)"),
            "{out}"
        );
        // End anchor, em 20 px, bold: the start is at 50 − 2826·20/2048 = 22.4023; the
        // baseline at 60 + 0.5·(1118/2048)·20 = 65.459.
        assert!(
            out.contains("translate(22.4 65.46) scale(0.009766 -0.009766)"),
            "{out}"
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "<svg><text x=\"1\" y=\"2\" font-size=\"3\">no end",
            "<svg><text x=1 y=\"2\" font-size=\"3\">a</text></svg>",
            "<svg><text x=\"a\" y=\"2\" font-size=\"3\">a</text></svg>",
            "<svg><text y=\"2\" font-size=\"3\">a</text></svg>",
        ] {
            assert!(outline_text(bad).is_err(), "{bad}");
        }
        assert_eq!(outline_text("<svg></svg>").unwrap(), "<svg></svg>");
    }
}
