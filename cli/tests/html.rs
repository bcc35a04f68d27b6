//! End-to-end tests of `cppo inspect --html`, without a browser (`html_browser.rs` opens
//! the pages in headless Chromium): one self-contained page that loads nothing, holds
//! the report's tables, warnings and plots (inline SVG, with the `plots` feature), for a
//! run the trend of every headline number, escapes every string from the input, and is
//! written all-or-nothing like the other outputs.

mod common;
mod support;

use std::fs;
use std::path::Path;

use common::{Scratch, args, assert_ok, inspect};
use support::{Arrays, small_run};

/// The checks every page passes: one document, its policy forbids every load, nothing
/// refers to anything outside the page, one style sheet and one script (the page's own).
#[track_caller]
fn assert_self_contained(page: &str) {
    assert!(
        page.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"),
        "{}",
        &page[..200]
    );
    assert!(page.ends_with("</html>\n"));
    assert!(page.contains(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'sha256-"
    ));
    assert_eq!(page.matches("<script").count(), 1);
    assert_eq!(page.matches("<style").count(), 1);
    for needle in [
        "url(", "@import", "<link", "<iframe", "<object", "<embed", "<img",
    ] {
        assert!(!page.contains(needle), "{needle} in the page");
    }
    // No tag refers to anything outside the page (escaped text has no `<`, so every `<`
    // opens a tag): the only references are SVG glyph uses, `href="#id"`, each to an id
    // the page defines once.
    let tags: Vec<&str> = page
        .split('<')
        .skip(1)
        .map(|t| &t[..t.find('>').unwrap()])
        .collect();
    let attr = |tag: &str, name: &str| -> Option<String> {
        let i = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[i..i + tag[i..].find('"')?].to_string())
    };
    let mut ids = std::collections::HashSet::new();
    for tag in &tags {
        if let Some(id) = attr(tag, "id") {
            assert!(ids.insert(id.clone()), "id {id} twice");
        }
    }
    for tag in &tags {
        for name in ["src", "xlink:href", "srcset", "action"] {
            assert!(attr(tag, name).is_none(), "<{tag}>");
        }
        if let Some(href) = attr(tag, "href") {
            let id = href.strip_prefix('#').unwrap_or_else(|| panic!("<{tag}>"));
            assert!(tag.starts_with("use ") && ids.contains(id), "<{tag}>");
        }
    }
    // The only URL is SVG's namespace, which loads nothing.
    let urls = page.matches("://").count();
    let namespaces = page.matches("xmlns=\"http://www.w3.org/2000/svg\"").count();
    assert_eq!(urls, namespaces, "a URL other than SVG's namespace");
}

/// The ids of the page's figures, in order.
fn figure_ids(page: &str) -> Vec<&str> {
    page.match_indices("<figure class=\"plot\" id=\"")
        .map(|(at, m)| {
            let rest = &page[at + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn the_page_of_a_batch() {
    let s = Scratch::new();
    let html = s.outputs.join("demo.html");
    let run = inspect(args!["--demo", "--html", html]);
    assert_ok(&run);
    assert!(run.stdout.ends_with(&format!("wrote {}\n", html.display())));
    let page = read(&html);
    assert_self_contained(&page);
    assert!(page.contains("<title>cppo inspect: built-in demo batch</title>"));
    // The report's tables and warnings.
    for heading in [
        "<h2>Rules</h2>",
        "<h2>Masked fraction by rule (share of response tokens)</h2>",
        "<h2>Warnings (2)</h2>",
        "<h2>Plots</h2>",
    ] {
        assert!(page.contains(heading), "no {heading}");
    }
    assert!(page.contains("<li data-code=\"prefix_budget_dominates\"><code>prefix_budget_dominates</code> <b>CPPO fixed budget</b>: "));
    assert!(
        page.contains("<td class=\"l\">CPPO (full)</td><td>3.86%</td>"),
        "the masked table"
    );
    if cfg!(feature = "plots") {
        assert_eq!(
            figure_ids(&page),
            [
                "plot-divergence",
                "plot-thresholds",
                "plot-masked",
                "plot-strip"
            ]
        );
        assert_eq!(page.matches("<svg ").count(), 4);
        assert!(page.contains("Masked fraction by position, one line per rule"));
        assert!(!page.contains("id=\"no-plots\""));
    } else {
        assert!(figure_ids(&page).is_empty());
        assert!(!page.contains("<svg"));
        assert!(page.contains("id=\"no-plots\""));
        assert!(page.contains("built without the <code>plots</code> feature"));
    }
}

/// Every string from the input is escaped: file and directory names, config names, in
/// the page's text and in its SVG.
#[test]
fn strings_from_the_input_are_escaped() {
    let s = Scratch::new();
    let evil = "<img src=x onerror=alert(1)>&'\"";
    let input = s.input(&format!("{evil}.npz"));
    Arrays::synth(4, 6, 40, 1.0).write(&input);
    let config = s.input(&format!("{evil}.json"));
    fs::write(&config, r#"{"rule": "dppo"}"#).unwrap();
    let html = s.outputs.join("r.html");
    let run = inspect(args![
        input,
        "--config",
        config,
        "--compare",
        "--html",
        html
    ]);
    assert_ok(&run);
    let page = read(&html);
    assert_self_contained(&page);
    assert!(!page.contains("<img"), "unescaped");
    assert!(!page.contains("onerror=alert(1)>"), "unescaped");
    let escaped = "&lt;img src=x onerror=alert(1)&gt;&amp;&#39;&quot;";
    assert!(
        page.contains(&format!("<td class=\"l\">{escaped}</td>")),
        "the rule name"
    );
    assert!(
        page.contains(&format!("{escaped}.npz</title>")),
        "the file name"
    );
    if cfg!(feature = "plots") {
        // The figures' texts (the legend and the dashboard title) are escaped in their
        // glyph groups' labels.
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;&amp;&apos;&quot;"));
    }

    // A run directory's name.
    let dir = s.input(&format!("run {evil}"));
    small_run(&dir);
    let run = inspect(args![dir, "--config", config, "--html", html]);
    assert_ok(&run);
    let page = read(&html);
    assert_self_contained(&page);
    assert!(!page.contains("<img"));
    assert!(page.contains(&format!("run {escaped}</title>")));
}

#[test]
fn the_page_of_a_run() {
    let s = Scratch::new();
    let dir = s.input("run");
    small_run(&dir);
    let (html, json) = (s.outputs.join("run.html"), s.outputs.join("run.json"));
    let run = inspect(args![dir, "--html", html, "--json", json]);
    assert_ok(&run);
    let page = read(&html);
    assert_self_contained(&page);
    assert!(page.contains("<title>cppo inspect: 4 steps in "));
    // The by-step table lists every step; the warnings name theirs.
    for step in [10, 20, 30, 40] {
        assert!(
            page.contains(&format!("<tr><td>{step}</td>")),
            "step {step}"
        );
    }
    assert!(
        page.contains("step 40: <code>no_drift</code> "),
        "the step's warning"
    );
    // Every headline number has its trend, with a table of every step.
    let trends = [
        "masked",
        "masked-token-threshold",
        "masked-prefix-budget",
        "bypass",
        "masked-pos-adv",
        "masked-neg-adv",
        "threshold",
        "loss",
        "budget",
        "divergence-mean",
        "divergence-max",
        "ratio",
        "kl",
        "tokens",
    ];
    let sections = page.split("<h3>").count() - 1;
    assert_eq!(sections, trends.len());
    assert_eq!(
        page.matches("<summary>values</summary>").count(),
        trends.len()
    );
    // The masked fraction's values are the JSON's, each rule a column.
    let report: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    let full = &report["steps"][2]["diagnostics"][7];
    let cell = format!(
        "{:.2}%</td></tr>",
        100.0 * full["masked_frac"].as_f64().unwrap()
    );
    let masked = &page[page.find("<h3>Masked fraction</h3>").unwrap()..];
    let masked = &masked[..masked.find("</details>").unwrap()];
    assert!(masked.contains("<tr><td>30</td>"), "{masked}");
    assert!(masked.contains(&cell), "no {cell} in {masked}");
    if cfg!(feature = "plots") {
        let mut want = vec!["plot-steps".to_string()];
        want.extend(trends.iter().map(|t| format!("trend-{t}")));
        assert_eq!(figure_ids(&page), want);
        assert_eq!(page.matches("<svg ").count(), want.len());
    } else {
        assert!(figure_ids(&page).is_empty());
        assert!(page.contains("id=\"no-plots\""));
        assert_eq!(page.matches("<details open>").count(), trends.len());
    }
}

#[test]
fn the_page_is_written_all_or_nothing() {
    let s = Scratch::new();
    let input = s.input("b.npz");
    Arrays::synth(2, 4, 24, 1.0).write(&input);
    // Another output cannot be written: the page is not left behind.
    let html = s.outputs.join("r.html");
    let bad = s.outputs.join("missing/r.json");
    let run = inspect(args![input, "--html", html, "--json", bad]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let left: Vec<_> = fs::read_dir(&s.outputs).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The page and another output may not be one file.
    let run = inspect(args![input, "--html", html, "--report", html]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("two outputs"), "{run:?}");
    // An existing page is replaced whole.
    fs::write(&html, "old").unwrap();
    assert_ok(&inspect(args![input, "--html", html]));
    assert!(read(&html).starts_with("<!DOCTYPE html>"));
}
