//! The library's structure, checked: no module depends on itself through others, and no
//! source file outgrows one concept (about 800 lines).
//!
//! A module's dependencies are the `crate::NAME` paths in its code (comments, doc links
//! and unit-test modules left out); a submodule counts as its top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/kernel/rule.rs` → `kernel`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The `crate::NAME` paths of a file's code.
fn dependencies(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut deps = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                deps.insert(name);
            }
        }
    }
    deps
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = top_module(&src, &file);
        // The crate root and the kernel's unit tests use everything.
        if module == "lib" || file.ends_with("kernel/tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&file).expect("a readable source file");
        let mut deps = dependencies(&text);
        deps.remove(&module);
        graph.entry(module).or_default().extend(deps);
    }
    graph
}

/// Every module reachable from `from`.
fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = vec![from];
    while let Some(m) = stack.pop() {
        for d in graph.get(m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d);
            }
        }
    }
    seen
}

#[test]
fn the_module_graph_has_no_cycles() {
    let graph = graph();
    // The scan sees the modules it must: a broken scan would find no edges at all.
    assert!(graph["engine"].contains("kernel") && graph["chunk"].contains("rows"));
    let cyclic: Vec<&String> = graph
        .keys()
        .filter(|m| reachable(&graph, m).contains(*m))
        .collect();
    assert!(
        cyclic.is_empty(),
        "modules on a cycle: {cyclic:?}\n{graph:#?}"
    );
    // The row driver sits below both of its users.
    assert!(!reachable(&graph, "rows").contains("engine"));
    assert!(!reachable(&graph, "rows").contains("chunk"));
}

#[test]
fn no_source_file_is_over_800_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<(String, usize)> = files
        .iter()
        .map(|f| {
            let n = fs::read_to_string(f).expect("readable").lines().count();
            (f.display().to_string(), n)
        })
        .filter(|(_, n)| *n > MAX_LINES)
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_scan_reads_code_not_comments() {
    let text = "use crate::a::X;\n// crate::b\n/// [`y`](crate::c::y)\nfn f() { crate::d::g() }\n\
                #[cfg(test)]\nmod tests { use crate::e; }\n";
    let deps: Vec<String> = dependencies(text).into_iter().collect();
    assert_eq!(deps, ["a", "d"]);
}
