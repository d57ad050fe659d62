//! `docs/configuration.md` cannot drift from the code:
//! - every `SLUICE_*` environment variable named in the sources (every workspace crate's
//!   `src/`, `scripts/`, `compose.yaml`, `Dockerfile`, `deploy/`) has a row in the doc, and
//!   every variable the doc has a row for is still named somewhere in them;
//! - every key of every `sluice.yaml` / `node.yaml` struct in `schemas/src/config.rs` has a
//!   row in that struct's section (`<!-- struct: Name -->`), and every row is a real key.
//!
//! A failure lists exactly what is missing on which side, with where the code names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DOC: &str = "docs/configuration.md";
const CONFIG_RS: &str = "schemas/src/config.rs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `SLUICE_FOO_BAR` tokens of `text`: not part of a longer identifier (`$YOUR_SLUICE_KEY`),
/// and not a prefix mention ending in `_` (`SLUICE_WORKER_*`).
fn env_names(text: &str) -> Vec<(usize, String)> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_';
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("SLUICE_").map(|i| i + from) {
        let mut end = i + "SLUICE_".len();
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        let preceded = i > 0 && (ident(bytes[i - 1]) || bytes[i - 1].is_ascii_lowercase());
        let name = &text[i..end];
        if !preceded && !name.ends_with('_') {
            let line = text[..i].matches('\n').count() + 1;
            out.push((line, name.to_owned()));
        }
        from = end;
    }
    out
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files);
        } else {
            files.push(path);
        }
    }
}

/// The workspace members, from the root manifest.
fn members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let start = manifest.find("members = [").expect("workspace members");
    let end = manifest[start..].find(']').expect("closing ]") + start;
    manifest[start + "members = [".len()..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// Every variable the sources name, with the first place each is named.
fn code_env_names() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    for member in members() {
        walk(&root().join(member).join("src"), &mut files);
    }
    walk(&root().join("scripts"), &mut files);
    walk(&root().join("deploy"), &mut files);
    files.push(root().join("compose.yaml"));
    files.push(root().join("Dockerfile"));
    files.sort();
    let mut names = BTreeMap::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // binary or unreadable: no settings there
        };
        let rel = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        for (line, name) in env_names(&text) {
            names.entry(name).or_insert_with(|| format!("{rel}:{line}"));
        }
    }
    names
}

/// The first cell of every table row of `section`, without its backticks.
fn table_keys(section: &str) -> BTreeSet<String> {
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn every_environment_variable_is_documented_and_every_documented_one_exists() {
    let doc = read(DOC);
    let documented: BTreeSet<String> = table_keys(&doc)
        .into_iter()
        .filter(|k| k.starts_with("SLUICE_"))
        .collect();
    let code = code_env_names();
    let missing: Vec<String> = code
        .iter()
        .filter(|(name, _)| !documented.contains(*name))
        .map(|(name, at)| format!("  {name} (named at {at})"))
        .collect();
    let stale: Vec<&String> = documented
        .iter()
        .filter(|name| !code.contains_key(*name))
        .collect();
    let mut report = String::new();
    if !missing.is_empty() {
        report.push_str(&format!(
            "{} environment variable(s) missing from {DOC} (add a row `| `NAME` | default | meaning |`):\n{}\n",
            missing.len(),
            missing.join("\n")
        ));
    }
    if !stale.is_empty() {
        report.push_str(&format!(
            "{} variable(s) documented in {DOC} but named nowhere in the sources: {stale:?}\n",
            stale.len()
        ));
    }
    assert!(report.is_empty(), "{report}");
    // The scan itself works: the core settings are found where they are read.
    for core in [
        "SLUICE_NAMESPACE",
        "SLUICE_DATABASE_URL",
        "SLUICE_LOG_FORMAT",
    ] {
        assert!(code.contains_key(core), "{core} not found in the sources");
    }
}

/// Named fields (YAML keys, after `rename`) of each struct deriving `Deserialize`.
fn config_structs() -> BTreeMap<String, Vec<String>> {
    let text = read(CONFIG_RS);
    let mut structs = BTreeMap::new();
    let mut derives_deserialize = false;
    let mut current: Option<(String, Vec<String>)> = None;
    let mut rename: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some((name, fields)) = current.as_mut() {
            if t == "}" {
                structs.insert(name.clone(), std::mem::take(fields));
                current = None;
                continue;
            }
            if let Some(r) = t
                .strip_prefix("#[serde(rename = \"")
                .and_then(|r| r.split_once('"'))
            {
                rename = Some(r.0.to_owned());
            }
            if let Some(field) = t
                .strip_prefix("pub ")
                .and_then(|f| f.split_once(':'))
                .map(|(f, _)| f.trim())
            {
                fields.push(rename.take().unwrap_or_else(|| field.to_owned()));
            }
            continue;
        }
        if t.starts_with("#[derive(") {
            derives_deserialize = t.contains("Deserialize");
        } else if let Some(rest) = t.strip_prefix("pub struct ") {
            // Named-field structs only: `Secret(pub String)` has no keys.
            if derives_deserialize && rest.ends_with('{') {
                let name = rest.trim_end_matches('{').trim().to_owned();
                current = Some((name, Vec::new()));
            }
            derives_deserialize = false;
        }
    }
    structs
}

/// The part of the doc between `<!-- struct: NAME -->` and the next heading.
fn doc_section<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!("<!-- struct: {name} -->");
    let start = doc.find(&marker)? + marker.len();
    let rest = &doc[start..];
    let end = rest.find("\n#").unwrap_or(rest.len());
    Some(&rest[..end])
}

#[test]
fn every_config_key_is_documented_in_its_section() {
    let doc = read(DOC);
    let structs = config_structs();
    assert!(
        structs.contains_key("FileConfig") && structs.contains_key("ChannelConfig"),
        "reading {CONFIG_RS} found {:?}",
        structs.keys().collect::<Vec<_>>()
    );
    let mut report = Vec::new();
    for (name, fields) in &structs {
        let Some(section) = doc_section(&doc, name) else {
            report.push(format!(
                "{DOC} has no section for `{name}` (add `<!-- struct: {name} -->` under its heading) with keys {fields:?}"
            ));
            continue;
        };
        let rows = table_keys(section);
        let missing: Vec<&String> = fields.iter().filter(|f| !rows.contains(*f)).collect();
        if !missing.is_empty() {
            report.push(format!("section `{name}` lacks rows for {missing:?}"));
        }
        let stale: Vec<&String> = rows.iter().filter(|r| !fields.contains(r)).collect();
        if !stale.is_empty() {
            report.push(format!(
                "section `{name}` documents {stale:?}, which `{name}` in {CONFIG_RS} does not have"
            ));
        }
    }
    let documented: BTreeSet<&str> = doc
        .split("<!-- struct: ")
        .skip(1)
        .filter_map(|s| s.split_once(" -->").map(|(n, _)| n))
        .collect();
    for name in documented {
        if !structs.contains_key(name) {
            report.push(format!(
                "{DOC} has a section for `{name}`, which {CONFIG_RS} no longer defines"
            ));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_scanner_finds_names_and_skips_prefixes() {
    let found: Vec<String> = env_names(
        "std::env::var(\"SLUICE_A_B\") $YOUR_SLUICE_KEY `SLUICE_WORKER_*` x_SLUICE_Y\n${SLUICE_C:-1}",
    )
    .into_iter()
    .map(|(_, n)| n)
    .collect();
    assert_eq!(found, ["SLUICE_A_B", "SLUICE_C"]);
}
