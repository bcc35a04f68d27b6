//! `cppo inspect --html` pages opened in a real browser: headless Chromium.
//!
//! Chromium is found through `CPPO_CHROMIUM` (e.g. `/usr/bin/chromium`). Unset, the test
//! says it was skipped and passes; set, it must run, or the test fails. CI sets it
//! (`.ci/run`, after installing Debian's `chromium`).
//!
//! For a demo batch and a small run directory, each page is loaded three times, each in
//! a new profile, offline and without the background services:
//!
//! 1. `--dump-dom` at 1280×1000: the page's self-check has set `data-page` (its size);
//! 2. `--dump-dom` at the page's full height, with the console logged to stderr: no
//!    console message (a script error, or a load the page's policy blocked, would be
//!    one), every plot has a size (`data-plots="ok N"`, N the figures of the page) and
//!    its box (`data-box`), and no element came from the input (an escaping bug);
//! 3. `--screenshot` at the same size: each plot's box holds a drawing (many inked
//!    pixels, many colours), not a blank.
//!
//! Two controls show that the checks can fail: a copy of the page with an external image
//! must log a console message, and the white margin beside the plots must read as blank.
//! `CPPO_HTML_KEEP=DIR` keeps the pages, DOMs and screenshots there.

mod common;
mod support;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, cppo};
use support::small_run;

/// How long one Chromium run may take.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The page width; the page's own max-width is 1240 CSS pixels.
const WIDTH: u32 = 1280;

/// `CPPO_CHROMIUM`, or `None` when it is unset. Set, it must name a program.
fn chromium() -> Option<PathBuf> {
    let exe = std::env::var_os("CPPO_CHROMIUM")?;
    assert!(
        !exe.is_empty(),
        "CPPO_CHROMIUM is set but empty: unset it to skip the browser test"
    );
    Some(PathBuf::from(exe))
}

/// What one Chromium run printed.
struct Output {
    stdout: String,
    stderr: String,
}

/// Runs Chromium headless on `page` with these extra arguments, in a new profile.
#[track_caller]
fn run_chromium(exe: &Path, page: &Path, size: (u32, u32), extra: &[&OsStr]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ])
    .arg(format!(
        "--user-data-dir={}",
        profile.path().to_str().unwrap()
    ))
    .arg(format!("--window-size={},{}", size.0, size.1))
    .args(extra)
    .arg(format!("file://{}", page.canonicalize().unwrap().display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "CPPO_CHROMIUM={} is set but cannot be started: {e}",
            exe.display()
        )
    });
    // Read both pipes on threads, so that a chatty Chromium cannot block on them.
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out_pipe, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err_pipe, &mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not finish within {TIMEOUT:?} on {}",
                exe.display(),
                page.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap().unwrap_or_default();
    let stderr = err.join().unwrap().unwrap_or_default();
    assert!(
        status.success(),
        "{} failed ({status}) on {}:\n{stderr}",
        exe.display(),
        page.display()
    );
    Output { stdout, stderr }
}

/// The console messages Chromium logged (`--enable-logging=stderr --v=0` prints each as
/// a line with `:CONSOLE`).
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

/// An attribute of the first element `<tag ...>` of a serialized DOM.
fn attribute<'a>(dom: &'a str, tag: &str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("<{tag} "))?;
    let open = &dom[at..at + dom[at..].find('>')?];
    let key = format!(" {name}=\"");
    let start = open.find(&key)? + key.len();
    Some(&open[start..start + open[start..].find('"')?])
}

/// Each figure's id and box (x, y, w, h in CSS pixels) from the serialized DOM.
fn boxes(dom: &str) -> Vec<(String, [u32; 4])> {
    dom.match_indices("<figure ")
        .map(|(at, _)| {
            let open = &dom[at..at + dom[at..].find('>').unwrap()];
            let get = |key: &str| {
                let key = format!(" {key}=\"");
                let start = open.find(&key).map(|s| s + key.len());
                start.map(|s| &open[s..s + open[s..].find('"').unwrap()])
            };
            let id = get("id").unwrap_or("?").to_string();
            let b = get("data-box").unwrap_or_else(|| panic!("{id} has no data-box: {open}"));
            let v: Vec<u32> = b.split(' ').map(|x| x.parse().unwrap()).collect();
            assert_eq!(v.len(), 4, "{id}: {b}");
            (id, [v[0], v[1], v[2], v[3]])
        })
        .collect()
}

/// A decoded RGBA screenshot.
struct Shot {
    w: u32,
    h: u32,
    rgba: Vec<u8>,
}

impl Shot {
    fn read(path: &Path) -> Self {
        let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let channels = match info.color_type {
            png::ColorType::Rgba => 4,
            png::ColorType::Rgb => 3,
            other => panic!("{}: colour type {other:?}", path.display()),
        };
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let px = &buf[..info.buffer_size()];
        let rgba = px
            .chunks_exact(channels)
            .flat_map(|p| [p[0], p[1], p[2], if channels == 4 { p[3] } else { 255 }])
            .collect();
        Self {
            w: info.width,
            h: info.height,
            rgba,
        }
    }

    /// In a region: the share of pixels that are not white, and the distinct colours.
    fn ink(&self, [x, y, w, h]: [u32; 4]) -> (f64, usize) {
        let mut colours = std::collections::HashSet::new();
        let (mut inked, mut total) = (0u64, 0u64);
        for j in y..(y + h).min(self.h) {
            for i in x..(x + w).min(self.w) {
                let k = 4 * (j as usize * self.w as usize + i as usize);
                let p = [self.rgba[k], self.rgba[k + 1], self.rgba[k + 2]];
                total += 1;
                if p.iter().any(|&c| c < 245) {
                    inked += 1;
                }
                colours.insert(p);
            }
        }
        (inked as f64 / total.max(1) as f64, colours.len())
    }
}

/// Copies a file of the test to `CPPO_HTML_KEEP`, when it is set.
fn keep(name: &str, from: &Path) {
    if let Some(dir) = std::env::var_os("CPPO_HTML_KEEP") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(from, dir.join(name)).unwrap();
    }
}

/// Loads a page and checks it as the module docs say; `figures` is how many plots the
/// page should have.
fn check_page(exe: &Path, page: &Path, name: &str, figures: usize) {
    let dir = page.parent().unwrap();
    keep(&format!("{name}.html"), page);

    // 1. The page's size.
    let first = run_chromium(exe, page, (WIDTH, 1000), &[OsStr::new("--dump-dom")]);
    let size = attribute(&first.stdout, "html", "data-page")
        .unwrap_or_else(|| panic!("{name}: the self-check did not run:\n{}", first.stdout));
    let (w, h): (u32, u32) = {
        let v: Vec<u32> = size.split(' ').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    };
    assert!(
        w <= WIDTH,
        "{name}: the page is {w} px wide, wider than the window"
    );
    assert!((1000..16000).contains(&h), "{name}: page height {h}");
    let full = (WIDTH, h + 16);

    // 2. The DOM at full height, and the console.
    let logging = [
        OsStr::new("--enable-logging=stderr"),
        OsStr::new("--v=0"),
        OsStr::new("--dump-dom"),
    ];
    let second = run_chromium(exe, page, full, &logging);
    let dom = &second.stdout;
    let dom_path = dir.join(format!("{name}.dom.html"));
    fs::write(&dom_path, dom).unwrap();
    keep(&format!("{name}.dom.html"), &dom_path);
    let console = console_lines(&second.stderr);
    assert!(console.is_empty(), "{name}: console messages: {console:#?}");
    assert_eq!(
        attribute(dom, "html", "data-plots"),
        Some(format!("ok {figures}").as_str()),
        "{name}: the self-check's verdict"
    );
    // The parser built no element out of the input's strings.
    for tag in ["<img", "<iframe", "<object"] {
        assert!(!dom.contains(tag), "{name}: {tag} in the DOM");
    }
    assert_eq!(dom.matches("<script").count(), 1, "{name}");
    let plots = boxes(dom);
    assert_eq!(plots.len(), figures, "{name}");

    // 3. The screenshot: every plot drawn.
    let png = dir.join(format!("{name}.png"));
    let shot_arg = format!("--screenshot={}", png.display());
    run_chromium(exe, page, full, &[OsStr::new(&shot_arg)]);
    keep(&format!("{name}.png"), &png);
    let shot = Shot::read(&png);
    assert_eq!((shot.w, shot.h), full, "{name}: screenshot size");
    for (id, b) in &plots {
        assert!(b[2] > 600 && b[3] > 200, "{name} {id}: box {b:?}");
        assert!(b[1] + b[3] <= shot.h, "{name} {id}: below the screenshot");
        let (share, colours) = shot.ink(*b);
        assert!(
            share > 0.02 && colours > 8,
            "{name} {id}: blank in the screenshot ({:.2}% inked, {colours} colours) at {b:?}",
            100.0 * share
        );
    }
    // Control: the margin right of the plots is blank, so blank regions do read blank.
    if let Some((_, first)) = plots.first() {
        let right = plots.iter().map(|(_, b)| b[0] + b[2]).max().unwrap() + 4;
        assert!(right + 8 < shot.w, "{name}: no margin right of the plots");
        let (share, _) = shot.ink([right, first[1], shot.w - right - 4, first[3]]);
        assert!(share < 0.01, "{name}: the margin is not blank: {share}");
    }
}

#[test]
fn pages_render_in_headless_chromium() {
    let Some(exe) = chromium() else {
        eprintln!("skipped: set CPPO_CHROMIUM=/usr/bin/chromium to open the pages in Chromium");
        return;
    };
    // Set but not runnable: fail loudly.
    let version = Command::new(&exe)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "CPPO_CHROMIUM={} is set but cannot be run: {e}",
                exe.display()
            )
        });
    assert!(
        version.status.success(),
        "CPPO_CHROMIUM={} --version failed: {}",
        exe.display(),
        String::from_utf8_lossy(&version.stderr)
    );
    eprintln!(
        "browser: {}",
        String::from_utf8_lossy(&version.stdout).trim()
    );

    let s = Scratch::new();
    let plots = cfg!(feature = "plots");

    // A demo batch: four plots.
    let demo = s.outputs.join("demo.html");
    let run = cppo(&[
        OsStr::new("inspect"),
        OsStr::new("--demo"),
        OsStr::new("--html"),
        demo.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    check_page(&exe, &demo, "demo", if plots { 4 } else { 0 });

    // A small run directory, with a config whose name is markup: the run's figure and
    // fourteen trends.
    let dir = s.input("run");
    small_run(&dir);
    let config = s.input("<img src=x onerror=alert(1)>.json");
    fs::write(&config, r#"{"rule": "dppo"}"#).unwrap();
    let steps = s.outputs.join("steps.html");
    let run = cppo(&[
        OsStr::new("inspect"),
        dir.as_os_str(),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--compare"),
        OsStr::new("--html"),
        steps.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    check_page(&exe, &steps, "steps", if plots { 15 } else { 0 });

    // Control: a load the page's policy blocks is a console message, which check_page
    // would report.
    let page = fs::read_to_string(&demo).unwrap();
    let bad = s.outputs.join("blocked.html");
    fs::write(
        &bad,
        page.replacen("<main>", "<main><img src=\"http://192.0.2.1/x.png\">", 1),
    )
    .unwrap();
    let out = run_chromium(
        &exe,
        &bad,
        (WIDTH, 800),
        &[
            OsStr::new("--enable-logging=stderr"),
            OsStr::new("--v=0"),
            OsStr::new("--dump-dom"),
        ],
    );
    let console = console_lines(&out.stderr);
    assert!(
        console
            .iter()
            .any(|l| l.contains("Content Security Policy")),
        "the console check sees nothing: a blocked load logged no message:\n{}",
        out.stderr
    );
}
