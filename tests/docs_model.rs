//! The model specification, `docs/model.md`, against the references to it: every `§N` or
//! `§N.M` written in the repository's sources and documents must name a section that has a
//! heading there (`## §N …` or `### §N.M …`), and no file may point to the specification
//! file that used to live outside the repository.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// What is scanned for references, relative to the repository root.
const SCANNED: [&str; 8] = [
    "README.md",
    "src",
    "tests",
    "benches",
    "tools",
    "docs",
    "kernels",
    "fuzz",
];

/// Directories never entered: build output, fuzzing inputs and findings, Python caches.
/// Hidden directories are skipped too.
const SKIPPED_DIRS: [&str; 4] = ["target", "corpus", "artifacts", "__pycache__"];

/// The specification, relative to the repository root.
const MODEL_DOC: &str = "docs/model.md";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Appends every file under `path` (or `path` itself when it is a file) to `out`.
fn collect_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for child in children {
        let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let skipped = name.starts_with('.') || SKIPPED_DIRS.contains(&name);
        if child.is_dir() && skipped {
            continue;
        }
        collect_files(&child, out);
    }
}

/// The scanned text files with their paths relative to the root (files that are not UTF-8
/// text, such as binary fixtures, are left out).
fn scanned_texts() -> Vec<(String, String)> {
    let root = repo_root();
    let mut files = Vec::new();
    for entry in SCANNED {
        collect_files(&root.join(entry), &mut files);
    }
    assert!(
        files.iter().any(|f| f.ends_with(MODEL_DOC)),
        "the scan found no {MODEL_DOC} under {}",
        root.display()
    );
    files
        .into_iter()
        .filter_map(|f| {
            let text = fs::read_to_string(&f).ok()?;
            let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            Some((rel, text))
        })
        .collect()
}

/// The section references in `line`: each `§` followed by a number, with its `.M` when a
/// digit follows the dot (`§5.` at the end of a sentence is `5`).
fn references(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, sign) in line.match_indices('§') {
        let rest = &line[at + sign.len()..];
        let major: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if major.is_empty() {
            continue;
        }
        let after = &rest[major.len()..];
        let minor: String = after
            .strip_prefix('.')
            .map(|m| m.chars().take_while(char::is_ascii_digit).collect())
            .unwrap_or_default();
        out.push(if minor.is_empty() {
            major
        } else {
            format!("{major}.{minor}")
        });
    }
    out
}

/// The sections that have a heading in `text`, in order: a Markdown heading whose title
/// starts with a section number (`## §4 Model` gives `4`, `### §4.1 …` gives `4.1`).
fn headings(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let title = l.trim_start_matches('#').trim_start();
            if title.starts_with('§') {
                references(title).into_iter().next()
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn the_reference_scanner_reads_numbers_subsections_and_ranges() {
    assert_eq!(references("see docs/model.md §5."), ["5"]);
    assert_eq!(references("(§4–§5)"), ["4", "5"]);
    assert_eq!(references("§6.1 and §8"), ["6.1", "8"]);
    assert!(references("a bare § sign, `§N`").is_empty());
    assert_eq!(
        headings("# Title\n## §2 Data\ntext §3\n### §2.1 A row\n"),
        ["2", "2.1"]
    );
}

#[test]
fn the_specification_keeps_its_eight_sections_in_order() {
    let text = fs::read_to_string(repo_root().join(MODEL_DOC)).expect("docs/model.md is readable");
    let top: Vec<String> = headings(&text)
        .into_iter()
        .filter(|s| !s.contains('.'))
        .collect();
    let expected: Vec<String> = (1..=8).map(|n| n.to_string()).collect();
    assert_eq!(top, expected, "the top-level § headings of {MODEL_DOC}");
}

#[test]
fn every_section_reference_has_a_heading_in_the_specification() {
    let texts = scanned_texts();
    let sections: BTreeSet<String> = texts
        .iter()
        .find(|(path, _)| Path::new(path) == Path::new(MODEL_DOC))
        .map(|(_, text)| headings(text).into_iter().collect())
        .expect("docs/model.md is among the scanned files");
    let mut dangling = Vec::new();
    for (path, text) in &texts {
        for (i, line) in text.lines().enumerate() {
            for r in references(line)
                .into_iter()
                .filter(|r| !sections.contains(r))
            {
                dangling.push(format!("{path}:{}: §{r}", i + 1));
            }
        }
    }
    assert!(
        dangling.is_empty(),
        "section references with no heading in {MODEL_DOC}:\n{}",
        dangling.join("\n")
    );
}

#[test]
fn no_file_points_to_the_old_specification_file() {
    // The file's name and the way its sections were cited (the name's stem, a space, a
    // section number), assembled here so that this file does not match its own search.
    let old = [["SPEC", "md"].join("."), ["SPEC", "§"].join(" ")];
    let mut hits = Vec::new();
    for (path, text) in scanned_texts() {
        for (i, line) in text.lines().enumerate() {
            if old.iter().any(|o| line.contains(o.as_str())) {
                hits.push(format!("{path}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "files still pointing to the old specification file (it is {MODEL_DOC} now):\n{}",
        hits.join("\n")
    );
}
