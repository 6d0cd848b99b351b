//! The source stays readable in one sitting: no function in `src/` longer than `MAX_FN_LINES`
//! lines and no file longer than `MAX_FILE_LINES` (each without its `#[cfg(test)]` module), unless
//! the file says at its top why (a line starting `//! Long because`). Counted on rustfmt's layout:
//! a function runs from its `fn` line to the `}` at the same indentation.
mod common;

use std::collections::BTreeSet;
use std::path::Path;

const MAX_FN_LINES: usize = 80;
const MAX_FILE_LINES: usize = 600;

/// `(name, first line, lines)` of every function with a body in `lines`.
fn functions(lines: &[&str]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let words: Vec<&str> = code.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else { continue };
        let head_ok = words[..at].iter().all(|w| {
            ["pub", "pub(crate)", "pub(super)", "const", "unsafe", "async"].contains(w) || w.starts_with("extern")
        });
        if !head_ok || code.ends_with(';') {
            continue;
        }
        let name = words.get(at + 1).map_or("?", |w| w.split(['(', '<']).next().unwrap_or(w)).to_string();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((name, i + 1, end + 2));
        }
    }
    out
}

#[test]
fn functions_and_files_stay_short() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    for file in &common::rust_files_below(&src) {
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let lines: Vec<&str> = code.lines().collect();
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        let excused = text.lines().take_while(|l| l.starts_with("//!")).any(|l| l.starts_with("//! Long because"));
        if lines.len() > MAX_FILE_LINES && !excused {
            long.push(format!("src/{rel}: {} lines (at most {MAX_FILE_LINES}, or say why at its top)", lines.len()));
        }
        for (name, first, n) in functions(&lines) {
            if n > MAX_FN_LINES {
                long.push(format!("src/{rel}:{first}: fn {name} is {n} lines (at most {MAX_FN_LINES})"));
            }
        }
    }
    assert!(long.is_empty(), "split these:\n{}", long.join("\n"));
}

#[test]
fn the_counter_finds_a_long_function_and_skips_declarations() {
    let mut text = vec!["pub(crate) fn long(x: u8) -> u8 {"];
    text.extend(std::iter::repeat_n("    x;", 90));
    text.extend(["}", "    fn declared(&self);", "    pub fn short() {", "    }"]);
    let found = functions(&text);
    assert_eq!(found, vec![("long".to_string(), 1, 92), ("short".to_string(), 94, 2)]);
}

/// README's "How the code is laid out" names every folder of `src/` (one line each), and every
/// folder it names exists.
#[test]
fn the_readme_lays_out_every_source_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section =
        readme.split("## How the code is laid out").nth(1).expect("the section").split("\n## ").next().unwrap();
    let named: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split('`').next())
        .filter(|p| p.starts_with("src/") && p.ends_with('/') && *p != "src/")
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    // Every folder of src/ holds Rust files: the folders are theirs.
    let folders: Vec<String> = common::files_below(&root.join("src"))
        .iter()
        .filter_map(|f| Path::new("src").join(f).parent().map(|d| d.display().to_string()))
        .filter(|d| d != "src")
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut sorted = named.clone();
    sorted.sort();
    assert_eq!(sorted, folders, "README's layout against the tree");
}
