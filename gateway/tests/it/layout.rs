//! The gateway's module map as ARCHITECTURE.md states it: every `crate::` path in the source is
//! an edge the document lists, and the listed graph has no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module -> the top-level modules its code (not its comments) names via `crate::`.
fn actual_edges(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    graph.entry(top.clone()).or_default().insert(name);
                }
            }
        }
    }
    graph
}

/// The "Dependency direction" block of ARCHITECTURE.md: lines `a -> b` or
/// `a, b -> { c, d }`.
fn documented_edges(architecture: &str) -> Graph {
    let start = architecture
        .find("**Dependency direction**")
        .expect("ARCHITECTURE.md has a Dependency direction section");
    let block = &architecture[start..];
    let open = block.find("```\n").unwrap() + 4;
    let close = open + block[open..].find("```").unwrap();
    let mut graph = Graph::new();
    for line in block[open..close].lines() {
        let Some((from, to)) = line.split_once("->") else {
            continue;
        };
        let targets: BTreeSet<String> = to
            .trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        for source in from.split(',') {
            graph
                .entry(source.trim().to_owned())
                .or_default()
                .extend(targets.iter().cloned());
        }
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut circle = path[i..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn modules_depend_in_the_documented_direction_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let actual = actual_edges(&root.join("src"));
    let architecture = std::fs::read_to_string(root.join("../ARCHITECTURE.md")).unwrap();
    let documented = documented_edges(&architecture);
    assert!(actual.len() >= 8, "the scan found the modules: {actual:?}");
    let mut missing = Vec::new();
    for (from, tos) in &actual {
        for to in tos {
            if !documented.get(from).is_some_and(|d| d.contains(to)) {
                missing.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "edges in the code that ARCHITECTURE.md does not list: {missing:?}"
    );
    assert_eq!(find_circle(&documented), None, "a circle between modules");
    assert_eq!(find_circle(&actual), None, "a circle between modules");
}

#[test]
fn the_circle_finder_finds_circles() {
    let g =
        documented_edges("**Dependency direction**\n```\na -> { b }\nb -> c\nc -> { a }\n```\n");
    assert_eq!(
        find_circle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let g = documented_edges("**Dependency direction**\n```\na, b -> { c }\nc -> { }\n```\n");
    assert_eq!(find_circle(&g), None);
}
