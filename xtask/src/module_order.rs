//! The agent's modules are laid out in pipeline order, and this check keeps them so: every
//! module may use only modules declared before it (in `lib.rs`, or among its siblings in their
//! parent's `mod.rs`), its own descendants and items of its ancestors. A stage that imports a
//! later one fails, and with it every import loop between modules, which needs at least one
//! such backward edge.
//!
//! References are read from the source text (`crate::a::b`, `use crate::{a, b::c}`,
//! `super::x`), which is all this crate uses; comments are skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A module path below the crate root, such as `["datapath", "reconcile"]`.
type ModPath = Vec<String>;

/// Every violation in the crate whose sources are in `src` (`lib.rs` at its root).
pub fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    collect(src, &mut files);
    let modules: BTreeMap<ModPath, PathBuf> = files
        .iter()
        .filter_map(|f| Some((module_of(src, f)?, f.clone())))
        .collect();
    let mut found = Vec::new();
    for (module, file) in &modules {
        if module.is_empty() {
            continue;
        }
        let text = strip_comments(&std::fs::read_to_string(file).unwrap_or_default());
        for target in references(&text, module, &modules) {
            if let Some(why) = backward(module, &target, &modules) {
                found.push(format!(
                    "{} uses {}: {why}",
                    module.join("::"),
                    target.join("::")
                ));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// `lib.rs` is the root (`[]`), `a/mod.rs` and `a.rs` are `[a]`, `a/b.rs` is `[a, b]`; `main.rs`
/// is a separate crate and has none.
fn module_of(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        "lib.rs" if parts.is_empty() => {}
        "main.rs" if parts.is_empty() => return None,
        "mod.rs" => {}
        name => parts.push(name.strip_suffix(".rs")?.to_owned()),
    }
    Some(parts)
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules that `text` (the source of `module`) refers to, each resolved to the longest
/// known module path.
fn references(text: &str, module: &ModPath, modules: &BTreeMap<ModPath, PathBuf>) -> Vec<ModPath> {
    let mut paths: Vec<Vec<String>> = Vec::new();
    for (start, prefix) in [("crate::", Vec::new()), ("super::", parent_of(module))] {
        let mut rest = text;
        while let Some(i) = rest.find(start) {
            let boundary = rest[..i]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
            rest = &rest[i + start.len()..];
            if boundary {
                for path in expand(rest) {
                    paths.push(prefix.iter().cloned().chain(path).collect());
                }
            }
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            (1..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|prefix| modules.contains_key(prefix))
        })
        .collect()
}

/// The module a file's `super::` names: the parent of the module the file defines.
fn parent_of(module: &ModPath) -> ModPath {
    module[..module.len().saturating_sub(1)].to_vec()
}

/// The paths that follow `crate::`: `a::b::C` gives `[a, b, C]`; `{a, b::{c, d}}` gives
/// `[a]`, `[b, c]`, `[b, d]`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut head = Vec::new();
    let mut rest = text;
    loop {
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            head.push(ident.clone());
            rest = &rest[ident.len()..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => return vec![head],
            }
        } else if let Some(inner) = rest.strip_prefix('{') {
            return split_group(inner)
                .into_iter()
                .flat_map(|item| expand(item.trim()))
                .map(|tail| head.iter().cloned().chain(tail).collect())
                .collect();
        } else {
            return vec![head];
        }
    }
}

/// The comma-separated items of a `{…}` group whose opening brace was just consumed.
fn split_group(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&text[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// Why `from` may not use `to`, if it may not: where their paths part, `to`'s branch must be
/// declared before `from`'s in their common parent.
fn backward(from: &ModPath, to: &ModPath, modules: &BTreeMap<ModPath, PathBuf>) -> Option<String> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None; // its own descendant, or an ancestor's items
    }
    let parent = &from[..common];
    let order = declared(modules.get(parent)?);
    let rank = |name: &String| order.iter().position(|m| m == name);
    match (rank(&from[common]), rank(&to[common])) {
        (Some(f), Some(t)) if t < f => None,
        (Some(_), Some(_)) => Some(format!(
            "{} is declared after {} in {}",
            to[..=common].join("::"),
            from[..=common].join("::"),
            modules[parent].display()
        )),
        _ => Some(format!(
            "{} does not declare both",
            modules[parent].display()
        )),
    }
}

/// The `mod` declarations of a file, in order.
fn declared(file: &Path) -> Vec<String> {
    strip_comments(&std::fs::read_to_string(file).unwrap_or_default())
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_imports_only_earlier_stages() {
        let src = crate::cmd::root().join("lb-userspace/src");
        let found = violations(&src);
        assert!(
            found.is_empty(),
            "modules out of pipeline order:\n{}",
            found.join("\n")
        );
    }

    /// A crate of `files` (path, text) in a fresh folder.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-order-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_loop_or_a_later_stage_is_found_and_comments_are_not() {
        let src = tree(
            "loop",
            &[
                (
                    "lib.rs",
                    "pub mod config;\npub mod plan;\npub mod datapath;\n",
                ),
                (
                    "config.rs",
                    "use crate::plan::Desired; // a loop through plan\n",
                ),
                (
                    "plan/mod.rs",
                    "pub mod slots;\npub mod maglev;\nuse crate::config;\n",
                ),
                ("plan/slots.rs", "fn f() { super::maglev::table(); }\n"),
                ("plan/maglev.rs", "use crate::{config::X, plan::slots};\n"),
                (
                    "datapath.rs",
                    "// crate::nothing here\nuse crate::{plan::{maglev, slots}};\n",
                ),
            ],
        );
        let found = violations(&src);
        std::fs::remove_dir_all(&src).unwrap();
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found[0].starts_with("config uses plan: plan is declared after config"),
            "{found:#?}"
        );
        assert!(
            found[1].starts_with(
                "plan::slots uses plan::maglev: plan::maglev is declared after plan::slots"
            ),
            "{found:#?}"
        );
    }

    #[test]
    fn reads_every_form_of_path() {
        assert_eq!(expand("a::b::C;"), [vec!["a", "b", "C"]]);
        assert_eq!(
            expand("{a, b::{c, d::E}, f};"),
            [vec!["a"], vec!["b", "c"], vec!["b", "d", "E"], vec!["f"]]
        );
    }
}
