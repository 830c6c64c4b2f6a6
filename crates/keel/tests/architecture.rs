//! The shape docs/ARCHITECTURE.md promises, checked on the source: within
//! each gateway crate the top-level modules import each other without a
//! circle, and no gateway crate keeps process-wide mutable state or leaks
//! a value to make it `'static`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The gateway's crates (the libraries have their own layouts and tests).
const GATEWAY_CRATES: [&str; 8] = [
    "http", "config", "metrics", "upstream", "proxy", "admin", "gateway", "keel",
];

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/")
        .to_path_buf()
}

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level module a source file belongs to (`lib`/`main` for the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// Every `crate::NAME` a file mentions outside comments.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b::C}` names several modules at once.
        if let Some(at) = code.find("crate::{") {
            for part in code[at + "crate::{".len()..].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_crate_has_a_module_import_circle() {
    for krate in GATEWAY_CRATES {
        let src = crates_dir().join(krate).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in sources(&src) {
            let module = module_of(&src, &file);
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read");
            let edges = graph.entry(module.clone()).or_default();
            edges.extend(imports(&text).into_iter().filter(|m| *m != module));
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!("crates/{krate}: import circle {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_circle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), ["b".to_owned()].into()),
        ("b".to_owned(), ["c".to_owned()].into()),
        ("c".to_owned(), ["a".to_owned()].into()),
    ]
    .into();
    assert_eq!(find_cycle(&graph).map(|c| c.len()), Some(4));
    assert_eq!(
        imports("use crate::{proxy::Gateway, route};\nlet x = crate::tunnel::f(); // crate::no"),
        ["proxy", "route", "tunnel"].map(String::from).into()
    );
}

#[test]
fn no_gateway_crate_leaks_or_keeps_process_wide_mutable_state() {
    for krate in GATEWAY_CRATES {
        for file in sources(&crates_dir().join(krate).join("src")) {
            let text = std::fs::read_to_string(&file).expect("read");
            let lines: Vec<&str> = text.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                let code = line.split("//").next().unwrap_or("").trim();
                // A `thread_local!` is per thread, a cache, not shared state.
                let per_thread = lines[n.saturating_sub(6)..n]
                    .iter()
                    .any(|l| l.contains("thread_local!"));
                assert!(
                    !code.contains("Box::leak"),
                    "{}:{}: Box::leak",
                    file.display(),
                    n + 1
                );
                let mutable_static = code.starts_with("static ")
                    || code.starts_with("pub static ")
                    || code.starts_with("pub(crate) static ");
                let mutable = ["Atomic", "Mutex", "LazyLock", "OnceLock", "RwLock", "Cell"]
                    .iter()
                    .any(|t| code.contains(t));
                assert!(
                    per_thread || !(mutable_static && mutable),
                    "{}:{}: a process-wide mutable static: {code}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}
