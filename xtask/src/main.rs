//! Workspace automation. Run `cargo xtask help`.
//!
//! Kept small on purpose: no dependencies, plain `std::process::Command`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const HELP: &str = "\
cargo xtask <command>

Commands:
  ci        everything CI checks: fmt, clippy (-D warnings), docs (-D warnings), the layering
            rules, the feature matrix, the whole test suite, and the demo
  test      run every test in the workspace (cargo test --workspace --all-features)
  layering  check the architecture's dependency rules (see ARCHITECTURE.md)
  features  lint every crate under each combination of its backend features
  conformance  run the official MCP conformance suite's client auth scenarios against
            `mcp-connect conformance` (needs shared/tools/conformance-client.sh next to the
            workspace; installs Node 22 and the suite from the npm registry on first use;
            an optional argument filters scenarios, e.g. 'scope-')
  fixture   start the fixture servers on loopback (flags: cargo xtask fixture --help)
  demo      the demo: fixture servers on loopback, and a client through discovery,
            registration, authorization, expiry, a coalesced refresh, revocation, the
            interactive fallback and logout (exits non-zero if a step misbehaves)
  tour      the flow-state tour (sled on disk)
  help      this text
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("test") => test(),
        Some("layering") => layering(),
        Some("features") => features(),
        Some("demo") => demo(),
        Some("tour") => tour(),
        Some("fixture") => fixture(&args[1..]),
        Some("conformance") => conformance(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root());
    cmd
}

fn run(what: &str, mut cmd: Command) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| format!("{what}: could not start: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what}: failed ({status})")) }
}

fn ci() -> Result<(), String> {
    run("cargo fmt --check", cargo(&["fmt", "--all", "--check"]))?;
    run(
        "cargo clippy",
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let mut doc = cargo(&["doc", "--workspace", "--no-deps", "--all-features"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run("cargo doc", doc)?;
    layering()?;
    features()?;
    test()?;
    // Under a second once built: the whole token life cycle against the fixtures.
    demo()
}

fn test() -> Result<(), String> {
    run("cargo test", cargo(&["test", "--workspace", "--all-features"]))
}

/// The workspace's member crates, by package name.
fn members() -> Result<Vec<String>, String> {
    let out = cargo(&["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err("cargo metadata failed".into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Package names appear as `"name":"..."` right after each package's opening; a tiny scan is
    // enough here and keeps xtask free of a JSON dependency.
    let mut names = Vec::new();
    for part in text.split("{\"name\":\"").skip(1) {
        if let Some(end) = part.find('"') {
            names.push(part[..end].to_string());
        }
    }
    Ok(names)
}

/// What each crate must not depend on (normal dependencies, every feature on).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "mcp-clock",
        &["tokio-util", "reqwest", "hyper", "rmcp", "oauth2", "axum", "sled", "redis"],
        "the clock reads time, nothing else",
    ),
    (
        "flow-state",
        &["reqwest", "hyper", "http", "rmcp", "oauth2", "axum"],
        "flow-state knows nothing of OAuth, HTTP or MCP",
    ),
    (
        "token-storage",
        &["reqwest", "hyper", "http", "rmcp", "oauth2", "axum"],
        "token-storage does no HTTP and knows no MCP",
    ),
    ("mcp-oauth", &["rmcp"], "only connection-factory knows the MCP transport"),
];

fn layering() -> Result<(), String> {
    let members = members()?;
    let mut broken = Vec::new();
    for (krate, forbidden, why) in RULES {
        if !members.iter().any(|m| m == krate) {
            continue;
        }
        for dep in *forbidden {
            let out =
                cargo(&["tree", "-q", "-p", krate, "--all-features", "-e", "normal", "-i", dep])
                    .output()
                    .map_err(|e| format!("cargo tree: {e}"))?;
            // `cargo tree -i` fails when the package is not in the graph at all: that is the pass.
            if out.status.success() && !out.stdout.is_empty() {
                broken.push(format!(
                    "{krate} depends on {dep} ({why}):\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
    }
    if broken.is_empty() {
        eprintln!("xtask: layering rules hold");
        Ok(())
    } else {
        Err(format!("layering rules broken:\n{}", broken.join("\n")))
    }
}

/// Each crate with backend features, and the feature sets that must build.
const FEATURE_SETS: &[(&str, &[&str])] = &[
    (
        "flow-state",
        &[
            "",
            "sled",
            "redis",
            "test-util",
            "sled,redis",
            "redis,test-util",
            "sled,redis,test-util",
        ],
    ),
    (
        "token-storage",
        &[
            "",
            "sled",
            "redis",
            "test-util",
            "sled,test-util",
            "sled,redis",
            "redis,test-util",
            "sled,redis,test-util",
        ],
    ),
];

fn features() -> Result<(), String> {
    let members = members()?;
    for (krate, sets) in FEATURE_SETS {
        if !members.iter().any(|m| m == krate) {
            continue;
        }
        for set in *sets {
            // clippy rather than check: `-D warnings` then applies to our crates only, so a
            // feature combination that leaves dead code fails without rebuilding dependencies.
            let mut args = vec!["clippy", "-q", "-p", krate, "--no-default-features", "--lib"];
            if !set.is_empty() {
                args.extend(["--features", set]);
            }
            args.extend(["--", "-D", "warnings"]);
            run(&format!("feature set {krate} [{set}]"), cargo(&args))?;
        }
    }
    Ok(())
}

/// The runner script, `shared/tools/conformance-client.sh`, next to the workspace or next to
/// one of its ancestors (a git worktree lives deeper than the main checkout).
fn conformance_script() -> Result<PathBuf, String> {
    let root = root();
    root.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/tools/conformance-client.sh"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!("shared/tools/conformance-client.sh not found next to {}", root.display())
        })
}

/// The conformance client is `mcp-connect conformance`; the suite appends the server URL as
/// its last argument.
fn conformance(filter: &[String]) -> Result<(), String> {
    run(
        "build the conformance client (mcp-connect)",
        cargo(&["build", "-q", "-p", "mcp-connect", "--bin", "mcp-connect"]),
    )?;
    let script = conformance_script()?;
    let target =
        env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join("target"));
    let target = if target.is_absolute() { target } else { root().join(target) };
    let client = target.join("debug/mcp-connect");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(format!("{} conformance", client.display()))
        .args(filter)
        .current_dir(root());
    run("conformance suite (client auth scenarios)", cmd)
}

fn fixture(args: &[String]) -> Result<(), String> {
    let mut cmd = cargo(&["run", "-q", "-p", "mcp-fixtures", "--bin", "mcp-fixtures", "--"]);
    cmd.args(args);
    run("fixture servers", cmd)
}

/// The demo: fixture servers on loopback and the connection factory through a token's whole
/// life (see `crates/mcp-connect/examples/demo.rs`).
fn demo() -> Result<(), String> {
    run("demo", cargo(&["run", "-q", "-p", "mcp-connect", "--example", "demo"]))
}

/// The flow-state tour (its `examples/tour.rs`).
fn tour() -> Result<(), String> {
    run(
        "flow-state tour",
        cargo(&["run", "-q", "-p", "flow-state", "--example", "tour", "--features", "sled"]),
    )
}
