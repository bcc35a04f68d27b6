//! The docs agree with the tool: the built-in rules of `cppo inspect`, as the tool runs
//! them (`cppo inspect --demo --json`), are the rules docs/inspect.md's table lists and
//! `cppo inspect --help` lists, in order; the README's paragraph after its first shell
//! block and the `--compare` help name each of them in prose; the README describes the
//! quickstart example as the file is.

mod common;
use common::{Scratch, cppo};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Each built-in rule with how the README's first paragraph and `--compare`'s help
/// name it in prose. A rule the tool runs that is missing here fails the test: add it,
/// and to the docs.
const PROSE: [(&str, &str, &str); 8] = [
    ("GRPO ratio clip", "GRPO's ratio clip", "GRPO ratio clip"),
    ("DPPO", "DPPO", "DPPO"),
    (
        "CPPO budget-only",
        "the prefix budget alone",
        "CPPO budget-only",
    ),
    (
        "CPPO weight-only",
        "the position weights alone",
        "CPPO weight-only",
    ),
    (
        "CPPO soft gate",
        "the paper's two ablations",
        "the soft gate",
    ),
    (
        "CPPO shuffled weights",
        "the paper's two ablations",
        "shuffled weights",
    ),
    (
        "CPPO fixed budget",
        "CPPO with a fixed budget",
        "CPPO with a fixed budget",
    ),
    ("CPPO (full)", "full CPPO", "full CPPO"),
];

fn repo_file(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// The built-in set as the tool runs it.
fn tool_rules() -> Vec<String> {
    let s = Scratch::new();
    let json = s.outputs.join("demo.json");
    let run = cppo(&[
        "inspect".as_ref(),
        "--demo".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report: Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// The first column of docs/inspect.md's `| name | rule |` table.
fn inspect_md_rules() -> Vec<String> {
    let (path, doc) = repo_file("docs/inspect.md");
    let at = doc
        .find("| name | rule |")
        .unwrap_or_else(|| panic!("{}: no `| name | rule |` table", path.display()));
    doc[at..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .next()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect()
}

/// The list under "The built-in set" in `cppo inspect --help`: one rule a line,
/// indented, its name then two or more spaces.
fn help_rules(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("The built-in set ("))
        .expect("inspect --help has the built-in set");
    let list = start
        + lines[start..]
            .iter()
            .position(|l| l.ends_with(':'))
            .expect("the list follows a line ending in ':'")
        + 1;
    lines[list..]
        .iter()
        .take_while(|l| l.starts_with("  ") && !l.trim().is_empty())
        .map(|l| l.trim().split("  ").next().unwrap().to_string())
        .collect()
}

#[test]
fn the_built_in_rules_are_the_documented_ones() {
    let tool = tool_rules();
    assert_eq!(tool.len(), 8, "{tool:?}");
    assert_eq!(inspect_md_rules(), tool, "docs/inspect.md's table");

    let run = cppo(&["inspect", "--help"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(help_rules(&run.stdout), tool, "cppo inspect --help");

    // The prose: every rule the tool runs is named.
    let names: Vec<&str> = PROSE.iter().map(|p| p.0).collect();
    assert_eq!(names, tool, "PROSE lists the tool's rules");
    let (path, readme) = repo_file("README.md");
    let first_block = readme.find("```sh\n").expect("a shell block");
    let after = first_block + readme[first_block + 6..].find("```\n").unwrap() + 6 + 4;
    let paragraph = readme[after..].trim_start().split("\n\n").next().unwrap();
    let paragraph = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        paragraph.starts_with("The first command applies"),
        "{}: the paragraph after the first shell block: {paragraph}",
        path.display()
    );
    let option = run
        .stdout
        .find("\n      --compare\n")
        .expect("--compare's help");
    let compare = run.stdout[option + 17..]
        .split("\n      -")
        .next()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (rule, in_readme, in_compare) in PROSE {
        assert!(
            paragraph.contains(in_readme),
            "{}: the first paragraph does not name {rule} ({in_readme:?}): {paragraph}",
            path.display()
        );
        assert!(
            compare.contains(in_compare),
            "--compare's help does not name {rule} ({in_compare:?}): {compare}"
        );
    }
}

#[test]
fn help_rule_list_parser() {
    let help =
        "x\nThe built-in set (--compare), on one\ndivergence:\n  A b   one\n  C (d)  two\n\nPlots";
    assert_eq!(help_rules(help), ["A b", "C (d)"]);
}

/// The README's quickstart sentence says how many lines `examples/quickstart.rs` has, and
/// how many of the built-in rules it runs: both as the file has them.
#[test]
fn the_readme_describes_the_quickstart_as_it_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let example = fs::read_to_string(root.join("examples/quickstart.rs")).unwrap();
    let claim = readme
        .split("-line file (`examples/quickstart.rs`)")
        .next()
        .and_then(|before| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("the README says how long the quickstart is");
    assert_eq!(
        claim,
        example.lines().count(),
        "README.md's quickstart line count"
    );
    // "runs three of those rules (GRPO's clip, DPPO and CPPO)": the presets it calls.
    let presets = ["Config::grpo()", "Config::dppo()", "Config::cppo()"];
    let flat = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("runs three of those rules (GRPO's clip, DPPO and CPPO)"));
    assert_eq!(
        example.matches("Config::").count(),
        presets.len(),
        "the quickstart's rules"
    );
    for p in presets {
        assert!(example.contains(p), "{p} in the quickstart");
    }
}
