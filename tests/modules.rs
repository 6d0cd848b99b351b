//! The source's module graph has no circle: no module imports a module that imports it, directly
//! or through others. A module is a file under `src/` (`train/mod.rs` is `train`, `lib.rs` the
//! crate root); it uses another when its code (outside `#[cfg(test)]`) names it by a
//! `crate::…` path, a `super::…` path, or a child module's name (`loader::…` in `train/mod.rs`).
//! `mod x;` declarations are not uses. A circle is printed module by module.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `src/train/mod.rs` → `train`, `src/train/loader.rs` → `train::loader`, `src/lib.rs` → `crate`.
fn module_name(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        return "crate".into();
    }
    parts.join("::")
}

/// The code of a file without its `#[cfg(test)]` module (by convention the file's end), its
/// comments and its string literals (which may hold text that looks like a path).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            // A char literal such as '"' must not open a string.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with("\"'") || rest.starts_with("\\\"") {
                    chars.nth(if rest.starts_with("\"'") { 1 } else { 2 });
                }
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    out
}

/// The longest module named by `path` (segments after `crate` or the parent), if any.
fn resolve(modules: &BTreeSet<String>, base: &str, segments: &[&str]) -> Option<String> {
    let mut best = None;
    let mut name = base.to_string();
    for s in segments {
        name = if name == "crate" { s.to_string() } else { format!("{name}::{s}") };
        if modules.contains(&name) {
            best = Some(name.clone());
        } else {
            break;
        }
    }
    best.or_else(|| Some(base.to_string()))
}

/// Identifier segments after a `::` starting at byte `at` of `s`.
fn segments(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(r) = rest.strip_prefix("::") {
        let end = r.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(r.len());
        if end == 0 {
            break;
        }
        out.push(&r[..end]);
        rest = &r[end..];
    }
    out
}

/// The byte ranges of inline module bodies (`mod imp { … }`), by brace matching on code without
/// comments and strings.
fn inline_modules(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("mod ") {
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let rest = &text[i + 4..];
        let name_end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if name_end == 0 || !rest[name_end..].trim_start().starts_with('{') {
            continue;
        }
        let open = i + 4 + name_end + rest[name_end..].find('{').unwrap();
        let mut depth = 0;
        for (j, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(open..open + j);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = common::rust_files_below(&src);
    files.retain(|f| !f.ends_with("main.rs"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_name(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let me = module_name(&src, file);
        let parent = me.rsplit_once("::").map_or("crate".to_string(), |(p, _)| p.to_string());
        let text = code(&std::fs::read_to_string(file).unwrap());
        let mut uses = BTreeSet::new();
        let bytes = text.as_bytes();
        let inline = inline_modules(&text);
        for (i, _) in text.match_indices("::") {
            // The identifier just before this `::`.
            let start = text[..i].rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
            if start >= 2 && &text[start - 2..start] == "::" {
                continue; // a later segment of a longer path
            }
            let head = &text[start..i];
            let segs = segments(&text[i..]);
            let target = match head {
                "crate" => resolve(&modules, "crate", &segs),
                // `super` inside an inline `mod imp { … }` is this file's module.
                "super" if inline.iter().any(|r| r.contains(&i)) => None,
                "super" => resolve(&modules, &parent, &segs),
                _ => {
                    // A child module named without a prefix (`loader::…` in its parent).
                    let child = if me == "crate" { head.to_string() } else { format!("{me}::{head}") };
                    if modules.contains(&child) && (start == 0 || bytes[start - 1] != b'.') {
                        resolve(&modules, &child, &segs)
                    } else {
                        None
                    }
                }
            };
            if let Some(t) = target.filter(|t| *t != me) {
                uses.insert(t);
            }
        }
        // `use super::{a, b}` and `use crate::{a, b::c}` name modules inside braces.
        for (base, prefix) in [(parent.as_str(), "super::{"), ("crate", "crate::{")] {
            for (i, _) in text.match_indices(prefix) {
                let inner = &text[i + prefix.len()..];
                let inner = &inner[..inner.find('}').unwrap_or(inner.len())];
                for item in inner.split(',') {
                    let first = item.trim().split("::").next().unwrap_or("");
                    if let Some(t) = resolve(&modules, base, &[first]).filter(|t| *t != me) {
                        uses.insert(t);
                    }
                }
            }
        }
        edges.insert(me, uses);
    }
    edges
}

/// A circle through `start`, if any (depth-first search).
fn circle(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        edges: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in edges.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(edges, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(edges, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_module_imports_a_module_that_imports_it() {
    let edges = graph();
    assert!(edges.contains_key("train") && edges.contains_key("infra::dist"), "modules found: {:?}", edges.keys());
    let circles: Vec<String> = edges.keys().filter_map(|m| circle(&edges, m)).map(|c| c.join(" -> ")).collect();
    assert!(circles.is_empty(), "modules in a circle:\n{}", circles.join("\n"));
}

/// The graph builder sees uses through every kind of path, so the test above can fail.
#[test]
fn the_graph_sees_crate_super_and_child_paths() {
    let edges = graph();
    let uses = |a: &str, b: &str| edges.get(a).is_some_and(|s| s.contains(b));
    assert!(
        uses("evaluate", "infra::dist"),
        "crate::infra::dist::Dist in evaluate/mod.rs: {:?}",
        edges.get("evaluate")
    );
    assert!(uses("evaluate::report", "evaluate::metrics"), "use super::metrics: {:?}", edges.get("evaluate::report"));
    assert!(uses("train", "train::loader"), "a child by name: {:?}", edges.get("train"));
    assert!(uses("crate", "infra::dist"), "lib.rs: {:?}", edges.get("crate"));
    let mut toy = BTreeMap::new();
    toy.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    toy.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circle(&toy, "a"), Some(vec!["a".into(), "b".into(), "a".into()]));
}
