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

/// The module path of a file (`kafka/poll.rs` → `kafka::poll`, `kafka/mod.rs` → `kafka`).
fn module_of(file: &Path) -> Vec<String> {
    let mut m: Vec<String> = file
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        m.pop();
    }
    m
}

/// Every crate-local path `source` (the text of the module at `module`) names, resolved to an
/// absolute path from the crate root: `crate::`, `super::` chains, `self::` and `use` groups,
/// in `use` items and in expressions and types alike. Parsed with syn, so comments and string
/// literals are never mistaken for paths.
fn local_paths(module: &[String], source: &str) -> Vec<Vec<String>> {
    use syn::visit::Visit;
    struct Paths {
        module: Vec<String>,
        out: Vec<Vec<String>>,
    }
    impl Paths {
        fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
            let (mut base, mut rest) = match segments.first()?.as_str() {
                "crate" => (Vec::new(), &segments[1..]),
                "self" => (self.module.clone(), &segments[1..]),
                "super" => (self.module.clone(), segments),
                _ => return None,
            };
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
            base.extend(rest.iter().filter(|s| *s != "self").cloned());
            Some(base)
        }
        fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
            match tree {
                syn::UseTree::Path(p) => {
                    prefix.push(p.ident.to_string());
                    self.use_tree(prefix, &p.tree);
                    prefix.pop();
                }
                syn::UseTree::Name(n) => self.push_with(prefix, &n.ident),
                syn::UseTree::Rename(r) => self.push_with(prefix, &r.ident),
                syn::UseTree::Glob(_) => self.push(prefix),
                syn::UseTree::Group(g) => {
                    for t in &g.items {
                        self.use_tree(prefix, t);
                    }
                }
            }
        }
        fn push_with(&mut self, prefix: &mut Vec<String>, last: &syn::Ident) {
            prefix.push(last.to_string());
            self.push(prefix);
            prefix.pop();
        }
        fn tokens(&mut self, tokens: impl ToString) {
            let text = tokens.to_string().replace(" :: ", "::");
            for start in ["crate::", "super::", "self::"] {
                for (i, _) in text.match_indices(start) {
                    let before = text[..i].chars().last();
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                        continue;
                    }
                    let segments: Vec<String> = text[i..]
                        .split("::")
                        .map(|s| {
                            s.chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect::<String>()
                        })
                        .take_while(|s| !s.is_empty())
                        .collect();
                    self.push(&segments);
                }
            }
        }
        fn push(&mut self, segments: &[String]) {
            if let Some(p) = self.resolve(segments) {
                self.out.push(p);
            }
        }
    }
    impl<'ast> Visit<'ast> for Paths {
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
        // syn leaves macro arguments and attribute arguments (`tracing::info!(..)`,
        // `#[arg(default_value = crate::..)]`) as tokens: scan them as text.
        fn visit_macro(&mut self, m: &'ast syn::Macro) {
            self.tokens(m.tokens.clone());
            syn::visit::visit_macro(self, m);
        }
        fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
            if let syn::Meta::List(l) = &a.meta {
                self.tokens(l.tokens.clone());
            }
        }
        fn visit_path(&mut self, p: &'ast syn::Path) {
            let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            self.push(&segments);
            syn::visit::visit_path(self, p);
        }
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            // `super` inside an inline module (`mod tests`) is the file's own module.
            self.module.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }
    let file = syn::parse_file(source).expect("source parses");
    let mut v = Paths {
        module: module.to_vec(),
        out: Vec::new(),
    };
    v.visit_file(&file);
    v.out
}

/// The crate-local paths a source file names.
fn deps_of(file: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(src().join(file)).unwrap();
    local_paths(&module_of(file), &text)
}

/// The top-level module a file belongs to (`kafka/poll.rs` → `kafka`); None for the crate
/// roots.
fn top(file: &Path) -> Option<String> {
    module_of(file).first().cloned()
}

fn top_level_graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files().iter().filter_map(|f| top(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files() {
        let Some(from) = top(&f) else { continue };
        let deps = graph.entry(from.clone()).or_default();
        for path in deps_of(&f) {
            if let Some(to) = path.first().filter(|t| **t != from && modules.contains(*t)) {
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

/// Dependencies between the modules inside each folder (files and sub-folders alike): a file
/// `a/b/c.rs` naming `a::d::..` makes `a::b` depend on `a::d`, and on `a::b::x` makes `a::b::c`
/// depend on `a::b::x`.
fn nested_graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<Vec<String>> = files().iter().map(|f| module_of(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files() {
        let m = module_of(&f);
        for p in deps_of(&f) {
            for len in 2..=m.len() {
                let (me, parent) = (&m[..len], &m[..len - 1]);
                if p.len() < len || !p.starts_with(parent) {
                    continue;
                }
                let other = &p[..len];
                if other != me && modules.contains(other) {
                    graph
                        .entry(me.join("::"))
                        .or_default()
                        .insert(other.join("::"));
                }
            }
        }
    }
    graph
}

#[test]
fn sibling_files_depend_one_way() {
    let graph = nested_graph();
    assert!(graph.len() > 10, "no sibling modules found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("sibling modules in a cycle: {}", cycle.join(" -> "));
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

#[test]
fn paths_resolve_in_every_form_rust_allows() {
    let m = |s: &str| -> Vec<String> { s.split("::").map(str::to_string).collect() };
    let module = m("kafka::poll");
    let source = r#"
        use crate::{ops::metrics::Metrics, route::{self, tiers::Tier}};
        use super::super::decode::wire as w;
        use super::{offsets, due::*};
        use self::inner::X;
        #[arg(default_value = crate::ops::config::DEFAULT_X)]
        fn f() {
            tracing::info!(x = %crate::app::http::ADDR, "a");
            let s = "use crate::pipeline::Pipeline; // crate::classify";
            crate::persist::db::pool();
            super::worker::run::<crate::message::Envelope>();
        }
        // use crate::tools::produce;
        mod tests {
            use super::*;
            use super::super::rebalance;
        }
    "#;
    let got: BTreeSet<String> = local_paths(&module, source)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    for want in [
        "ops::metrics::Metrics",
        "route",
        "route::tiers::Tier",
        "decode::wire",
        "kafka::offsets",
        "kafka::due",
        "kafka::poll::inner::X",
        "persist::db::pool",
        "kafka::worker::run",
        "message::Envelope",
        "kafka::poll",
        "kafka::rebalance",
        "ops::config::DEFAULT_X",
        "app::http::ADDR",
    ] {
        assert!(got.contains(want), "{want} not found in {got:#?}");
    }
    for unwanted in ["pipeline::Pipeline", "classify", "tools::produce"] {
        assert!(
            !got.iter().any(|g| g.starts_with(unwanted)),
            "{unwanted} found in {got:#?}"
        );
    }
}
