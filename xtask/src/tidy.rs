//! Tidy: source rules checked by `cargo xtask tidy` (part of `cargo xtask ci`) and by this
//! module's test, which `cargo test --workspace` runs (after rust-analyzer's `xtask/src/tidy.rs`).
//!
//! The rules: every Rust source file opens with a `//!` line (its module doc), no test is
//! ignored, and no timer bypasses the injected clock: tokio's `sleep`, `sleep_until`, `timeout`,
//! `timeout_at`, `interval` and `interval_at` appear only in `crates/clock` (elsewhere: a
//! `Clock`'s `sleep`, `mcp_clock::within`, or `SystemClock` where real time is the point). The
//! same ban is in `clippy.toml`; this rule also sees code clippy does not compile (the fuzz crate,
//! other platforms' `cfg`s). The feature matrix needs no rule here: `cargo xtask features` derives it from each
//! crate's `[features]` table.

use std::path::{Path, PathBuf};

/// Directories never walked: build output and version control.
const SKIPPED_DIRS: &[&str] = &["target", ".git", "node_modules"];

/// Every `.rs` file under `root` (the fuzz crate included), sorted.
fn rust_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !SKIPPED_DIRS.contains(&name.as_ref()) && !name.starts_with('.') {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// tokio's timers, which only the clock crate may use (spelt in parts so this file does not
/// trip its own rule).
const TIMERS: &[&str] =
    &["sleep(", "sleep_until(", "timeout(", "timeout_at(", "interval(", "interval_at("];

/// The lines of `text` that call a tokio timer directly.
fn check_timers(text: &str) -> Vec<String> {
    let prefix = concat!("tokio::", "time::");
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            if TIMERS.iter().any(|t| after.starts_with(t)) {
                problems.push(format!(
                    "line {}: a tokio timer outside the clock crate (`{}`): wait on a Clock",
                    n + 1,
                    line.trim()
                ));
                break;
            }
            rest = after;
        }
    }
    problems
}

/// The rules broken in one file's text, as messages.
fn check_file(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !text.lines().next().is_some_and(|l| l.starts_with("//!")) {
        problems.push("does not open with a `//!` line (its module doc)".to_owned());
    }
    // Spelt in two halves so this file does not trip its own rule.
    let ignore = concat!("#[", "ignore");
    for (n, line) in text.lines().enumerate() {
        if line.contains(ignore) {
            problems.push(format!("line {}: an ignored test (`{}`)", n + 1, line.trim()));
        }
    }
    problems
}

/// Every broken rule in the workspace under `root`, as `path: message` lines.
pub(crate) fn check(root: &Path) -> Vec<String> {
    let files = rust_files(root);
    if files.is_empty() {
        return vec![format!("no .rs files under {}", root.display())];
    }
    let mut problems = Vec::new();
    for path in files {
        let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut found = check_file(&text);
                if !path.starts_with(root.join("crates/clock")) {
                    found.extend(check_timers(&text));
                }
                problems.extend(found.into_iter().map(|p| format!("{shown}: {p}")))
            }
            Err(e) => problems.push(format!("{shown}: unreadable: {e}")),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workspace keeps the rules (this is the test `cargo test --workspace` runs).
    #[test]
    fn the_workspace_is_tidy() {
        let root = crate::root();
        let files = rust_files(root);
        assert!(
            files
                .iter()
                .any(|f| f.ends_with("crates/mcp-oauth/fuzz/fuzz_targets/www_authenticate.rs"))
        );
        assert!(files.len() > 100, "walked only {} files", files.len());
        let problems = check(root);
        assert!(problems.is_empty(), "tidy rules broken:\n  {}", problems.join("\n  "));
    }

    #[test]
    fn a_file_without_a_module_doc_is_caught() {
        assert!(check_file("//! Docs.\nfn main() {}\n").is_empty());
        assert_eq!(check_file("use std::io;\n").len(), 1);
        assert_eq!(check_file("").len(), 1);
        assert_eq!(check_file("// plain comment\n//! late doc\n").len(), 1);
    }

    #[test]
    fn a_tokio_timer_is_caught_but_not_in_a_comment() {
        let call = |t: &str| {
            format!(
                "//! Docs.\nasync fn f() {{ {}{}(d).await; }}\n",
                concat!("tokio::", "time::"),
                t
            )
        };
        for timer in ["sleep", "timeout", "interval", "sleep_until"] {
            assert_eq!(check_timers(&call(timer)).len(), 1, "{timer}");
        }
        assert!(
            check_timers(&format!("//! {}sleep(d)\n", concat!("tokio::", "time::"))).is_empty()
        );
        assert!(
            check_timers(&format!("use {}Instant;\n", concat!("tokio::", "time::"))).is_empty()
        );
    }

    #[test]
    fn an_ignored_test_is_caught() {
        let text = format!("//! Docs.\n#[test]\n{}]\nfn later() {{}}\n", concat!("#[", "ignore"));
        let problems = check_file(&text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("line 3"));
    }
}
