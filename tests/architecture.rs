//! The tree keeps the shape ARCHITECTURE.md describes: dependencies between the top-level
//! modules run one way (no cycles), only the service shell (`app`) uses `pipeline`, sibling
//! files never depend on each other in a circle, and every source file opens with a line saying
//! its role and stays under the size where it should be split.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 400;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, as a path relative to it.
fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p.strip_prefix(src()).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &mut out);
    out.sort();
    out
}

/// The file's text without comments, so a doc comment naming a module is no dependency.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(src().join(file)).unwrap();
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow each occurrence of `prefix` (`crate::` → `ops`, `pipeline`...).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        let segments: Vec<String> = rest
            .split("::")
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty())
            .collect();
        out.push(segments);
    }
    out
}

/// The top-level module a file belongs to (`kafka/poll.rs` → `kafka`); None for the crate
/// roots.
fn top(file: &Path) -> Option<String> {
    let first = file.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

fn top_level_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files() {
        let Some(from) = top(&f) else { continue };
        let deps = graph.entry(from.clone()).or_default();
        for path in paths_after(&code(&f), "crate::") {
            if let Some(to) = path.first().filter(|t| **t != from && *t != "VERSION") {
                deps.insert(to.clone());
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the list of nodes along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_depend_one_way() {
    let graph = top_level_graph();
    assert!(graph.len() > 5, "no modules found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle: {}\nall dependencies: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn only_the_service_shell_uses_the_pipeline() {
    for (module, deps) in top_level_graph() {
        if module != "app" {
            assert!(
                !deps.contains("pipeline"),
                "`{module}` uses `pipeline`: stages report to it, never the other way"
            );
        }
    }
}

#[test]
fn sibling_files_depend_one_way() {
    // Per folder: which of its leaf files (not mod.rs, the folder itself) each uses, through
    // `super::file` or `crate::folder::file`.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files() {
        let (Some(parent), Some(stem)) = (f.parent(), f.file_stem()) else {
            continue;
        };
        let stem = stem.to_str().unwrap();
        if parent.as_os_str().is_empty() || stem == "mod" {
            continue;
        }
        let folder = parent.to_str().unwrap().replace('/', "::");
        let siblings: BTreeSet<String> = files()
            .iter()
            .filter(|g| g.parent() == Some(parent))
            .filter_map(|g| g.file_stem()?.to_str().map(str::to_string))
            .filter(|s| s != "mod" && s != stem)
            .collect();
        let text = code(&f);
        let mut used: Vec<String> = paths_after(&text, "super::")
            .into_iter()
            .filter_map(|p| p.first().cloned())
            .collect();
        for p in paths_after(&text, "crate::") {
            if p.join("::").starts_with(&format!("{folder}::")) {
                used.extend(p.get(folder.split("::").count()).cloned());
            }
        }
        let me = format!("{folder}::{stem}");
        let deps = graph.entry(me).or_default();
        for u in used.into_iter().filter(|u| siblings.contains(u)) {
            deps.insert(format!("{folder}::{u}"));
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("sibling files in a cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn every_source_file_says_its_role_and_stays_small() {
    for f in files() {
        let text = std::fs::read_to_string(src().join(&f)).unwrap();
        assert!(
            text.starts_with("//!"),
            "src/{} does not open with a `//!` line saying its role",
            f.display()
        );
        let lines = text.lines().count();
        assert!(
            lines <= MAX_LINES,
            "src/{} has {lines} lines (more than {MAX_LINES}): split it",
            f.display()
        );
    }
}

#[test]
fn cycle_finder_finds_a_planted_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
