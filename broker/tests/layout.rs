//! The house rules of `broker/src` (shared ARCHITECTURE.md, "Layout"), checked on the source:
//! no import cycle between modules, `observe::metrics` a leaf, and no stage importing a
//! stage above it. Adding an import that breaks one of these fails here, naming the import.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Stages from the bottom up: a module may import its own stage and the ones below it.
/// Module paths not listed take the rank of their longest listed prefix.
const RANKS: [(&str, u8); 16] = [
    ("observe::metrics", 0),
    ("fault", 0),
    // What every section's config check reads and reports: `Env` and `Problem`.
    ("env", 0),
    ("bus", 1),
    ("observe", 2),
    ("ingest", 3),
    ("route", 4),
    ("deliver", 5),
    ("http", 6),
    ("config", 7),
    ("runtime", 8),
    ("cli", 9),
    // Leaves every section may use: the environment and problems, reading PEM files.
    ("env", 0),
    ("tls", 0),
    // The crate root holds only the module list.
    ("", 10),
    ("main", 10),
];

/// Imports of a higher stage that are allowed for now, each with the reason.
const EXCEPTIONS: [(&str, &str, &str); 0] = [];

fn rank(module: &str) -> u8 {
    RANKS
        .iter()
        .filter(|(prefix, _)| {
            prefix.is_empty() || module == *prefix || module.starts_with(&format!("{prefix}::"))
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or(10, |(_, r)| *r)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("broker/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `bus/embedded/mod.rs` -> `bus::embedded`, `lib.rs` -> ``.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The source without its `#[cfg(test)]` modules (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i])
}

/// Every path after `crate::`, with `use crate::{a, b::{c, d}}` groups expanded one level
/// (`a`, `b`), and `super::x` resolved against `module`.
fn referenced(module: &str, is_mod_rs: bool, text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_owned()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `ketenbus_crate::`
        }
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find("};").unwrap_or(group.len())];
            let mut depth = 0;
            let mut item = String::new();
            for c in inner.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.insert(ident(item.trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    // `super` of a file module is its parent; of a `mod.rs`, the parent of its folder.
    let mut parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    parent.pop();
    let _ = is_mod_rs;
    for (i, _) in text.match_indices("super::") {
        if text[..i].ends_with("super::") {
            continue;
        }
        let rest = ident(&text[i + "super::".len()..]);
        let mut p = parent.clone();
        p.extend(rest.split("::").filter(|s| !s.is_empty()));
        out.insert(p.join("::"));
    }
    out.remove("");
    out
}

struct Graph {
    /// module -> (imported module -> the path as written)
    edges: BTreeMap<String, BTreeMap<String, String>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    files(&src, &mut list);
    let modules: BTreeMap<String, PathBuf> = list
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("source is readable");
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let mut to = BTreeMap::new();
        for path in referenced(module, is_mod_rs, without_tests(&text)) {
            // The longest module the path names; an item at the root names the root.
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|k| parts[..k].join("::"))
                .find(|m| modules.contains_key(m))
                .unwrap_or_default();
            if &target != module && !module.starts_with(&format!("{target}::")) {
                to.insert(target, path);
            }
        }
        edges.insert(module.clone(), to);
    }
    Graph { edges }
}

#[test]
fn no_module_imports_itself_through_others() {
    let g = graph();
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit<'a>(
        g: &'a Graph,
        m: &'a str,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| *s == m) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        stack.push(m);
        for next in g.edges.get(m).into_iter().flat_map(BTreeMap::keys) {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in g.edges.keys() {
        let cycle = visit(&g, m, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}

#[test]
fn metrics_is_a_leaf() {
    let g = graph();
    let imports = &g.edges["observe::metrics"];
    let broker: Vec<_> = imports.keys().filter(|m| !m.is_empty()).collect();
    assert!(broker.is_empty(), "observe::metrics imports {broker:?}");
}

#[test]
fn no_stage_imports_a_stage_above_it() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, to) in &g.edges {
        for (target, path) in to {
            let allowed = EXCEPTIONS.iter().any(|(f, t, _)| {
                (from == f || from.starts_with(&format!("{f}::"))) && (target == t)
            });
            if rank(target) > rank(from) && !allowed {
                wrong.push(format!(
                    "{from} (stage {}) imports crate::{path} (stage {})",
                    rank(from),
                    rank(target)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Where a module names the engine module `engine` (`embedded`, `kafka`) as a path: next to
/// `::`, or anywhere in a `use` item (`use crate::bus::{Bus, kafka};`). Returns the lines.
fn names_engine(text: &str, engine: &str) -> Vec<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    for (i, _) in text.match_indices(engine) {
        let (before, after) = (&text[..i], &text[i + engine.len()..]);
        if before.ends_with(is_ident) || after.starts_with(is_ident) {
            continue; // part of a longer name, e.g. `rdkafka`
        }
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        // The `use` item this occurrence is in, if any: from a line starting with `use` or
        // `pub use` up to its `;`.
        let in_use = before[..line_start]
            .rsplit_once(';')
            .map_or(before, |(_, tail)| tail)
            .lines()
            .chain(std::iter::once(&before[line_start..]))
            .any(|l| {
                let l = l.trim_start();
                l.starts_with("use ")
                    || l.starts_with("pub use ")
                    || l.starts_with("pub(crate) use ")
            });
        if before.ends_with("::") || after.starts_with("::") || in_use {
            let line_end = after
                .find('\n')
                .map_or(text.len(), |n| i + engine.len() + n);
            out.push(text[line_start..line_end].trim().to_owned());
        }
    }
    out
}

/// Nothing outside `bus` knows which engine runs: no module but `bus` and its engines names
/// `bus::embedded` or `bus::kafka` (tests may, to build a real log).
#[test]
fn only_the_bus_names_an_engine() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    files(&src, &mut list);
    let mut wrong = Vec::new();
    for file in &list {
        let module = module_of(&src, file);
        if module == "bus" || module.starts_with("bus::") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("source is readable");
        for engine in ["embedded", "kafka"] {
            for line in names_engine(without_tests(&text), engine) {
                wrong.push(format!("{module}: {line}"));
            }
        }
    }
    assert!(wrong.is_empty(), "outside bus:\n{}", wrong.join("\n"));
}

/// The checker itself: a cycle, a leaf import and an upward import are seen.
#[test]
fn the_checker_sees_what_it_looks_for() {
    let refs = referenced(
        "route::router",
        false,
        "use crate::{deliver, observe::{lineage, metrics}};\nuse super::keys::PatientKeyer;\nlet x = crate::http::api::routes();",
    );
    for want in [
        "deliver",
        "observe::lineage",
        "route::keys::PatientKeyer",
        "http::api::routes",
    ] {
        assert!(
            refs.iter()
                .any(|r| r == want || want.starts_with(r.as_str())),
            "{want} not seen in {refs:?}"
        );
    }
    assert!(rank("deliver::consent") > rank("route::router"));
    assert!(rank("observe::metrics") < rank("bus::embedded"));
    assert!(rank("observe::lineage") > rank("bus"));
    for (text, engine) in [
        ("use crate::bus::embedded::EmbeddedBus;", "embedded"),
        ("use crate::bus::{Bus,\n    kafka};", "kafka"),
        ("let b = crate::bus::kafka::KafkaBus::new(&c);", "kafka"),
        (
            "use crate::bus::{AckToken, embedded::partition_for};",
            "embedded",
        ),
    ] {
        assert_eq!(names_engine(text, engine).len(), 1, "{text}");
    }
    for (text, engine) in [
        ("p(\"bus.kafka\".into(), m); // the embedded log", "kafka"),
        ("use rdkafka::config::ClientConfig;", "kafka"),
        ("/// Directory for the embedded log.", "embedded"),
    ] {
        assert!(names_engine(text, engine).is_empty(), "{text}");
    }
}
