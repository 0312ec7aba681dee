//! Workspace automation. Run `cargo xtask help`.
//!
//! Kept small on purpose: plain `std::process::Command`, and one dependency (serde_json, for
//! rustdoc's JSON output in the exposed-types check). Every check here fails
//! loudly when it cannot do its job (a `cargo tree` that fails, a crate name that is unknown, a
//! conformance run with fewer scenarios than expected): a check that cannot run is not a pass.

mod exposed;
mod tidy;

use std::collections::BTreeSet;
use std::env;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;

const HELP: &str = "\
cargo xtask <command>

Commands:
  ci        everything CI checks: fmt, clippy (-D warnings), docs (-D warnings), tidy, the
            layering rules, cargo deny, the feature matrix, the fuzz target's build, the whole
            test suite,
            every bench once in test mode, and the demo
  test      every test in the workspace (cargo test --workspace --all-features), with
            redis-server available: installed through apt-get when missing and possible,
            otherwise it stops and prints the command that installs it. Extra arguments
            replace `--workspace --all-features` (e.g. `cargo xtask test -p flow-state`).
            MCP_TEST_SKIP_REDIS=1 skips the Redis tests on purpose and ends by saying how
            many tests skipped Redis.
  benches   run every bench once in test mode (asserted counts fail the run; no timing)
  tidy      source rules: every .rs file opens with a `//!` line, no ignored tests
  layering  check the architecture's dependency rules (see ARCHITECTURE.md)
  exposed   no third-party type in a library crate's public API unless its manifest allows
            that crate ([package.metadata.exposed-types] allowed = [..]); reads rustdoc's JSON
            (stable toolchain, RUSTC_BOOTSTRAP=1)
  features  lint every crate under each combination of its features (from its Cargo.toml)
  fuzz      build the fuzz target (crates/mcp-oauth/fuzz) on the stable toolchain
  deny      cargo deny check bans licenses sources (deny.toml: one version of each crate,
            the licenses we ship, crates.io only); installs cargo-deny when it is missing
  conformance  run the official MCP conformance suite's client auth scenarios against
            `mcp-connect conformance`, for each pinned suite version, and check that the
            expected number of scenarios ran and passed (needs shared/tools/conformance-client.sh
            next to the workspace; installs Node 22 and the suite from the npm registry on
            first use; an optional argument filters scenarios, e.g. 'scope-', and then only
            checks that something ran and nothing failed)
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
        Some("test") => test(&args[1..]),
        Some("benches") => benches(),
        Some("tidy") => tidy(),
        Some("layering") => layering(),
        Some("exposed") => exposed_types(),
        Some("features") => features(),
        Some("fuzz") => fuzz(),
        Some("deny") => deny(),
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

/// The workspace root, found at run time: `cargo run` sets `CARGO_MANIFEST_DIR` to xtask's own
/// directory (the workspace is its parent); otherwise `cargo locate-project --workspace` from
/// the current directory. Never where the binary was built (a shared `CARGO_TARGET_DIR` may be
/// anywhere).
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| match find_root() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("xtask: {e}");
            std::process::exit(1);
        }
    })
}

fn find_root() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("CARGO_MANIFEST_DIR") {
        let dir = PathBuf::from(dir);
        if let Some(parent) = dir.parent()
            && is_workspace_root(parent)
        {
            return Ok(parent.to_path_buf());
        }
    }
    let out = Command::new(cargo_bin())
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .map_err(|e| format!("cargo locate-project: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot find the workspace (run xtask through `cargo xtask` inside the checkout): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    manifest
        .parent()
        .filter(|dir| is_workspace_root(dir))
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} is not this workspace's manifest", manifest.display()))
}

fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|m| m.contains("[workspace]") && dir.join("xtask").is_dir())
}

fn cargo_bin() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args).current_dir(root());
    cmd
}

fn run(what: &str, mut cmd: Command) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| format!("{what}: could not start: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what}: failed ({status})")) }
}

/// Runs `cmd` and returns its standard output; a failure (or a failure to start) is an error
/// carrying its standard error.
fn output(what: &str, mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ci() -> Result<(), String> {
    run("cargo fmt --check", cargo(&["fmt", "--all", "--check"]))?;
    tidy()?;
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
    exposed_types()?;
    deny()?;
    features()?;
    fuzz()?;
    test(&[])?;
    benches()?;
    // Under a second once built: the whole token life cycle against the fixtures.
    demo()
}

// ------------------------------------------------------------------------------------ test ---

/// `cargo test` with redis-server available (or skipped on purpose, and counted).
fn test(args: &[String]) -> Result<(), String> {
    let skip = env::var("MCP_TEST_SKIP_REDIS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("xtask: MCP_TEST_SKIP_REDIS=1: the Redis tests will be skipped");
    } else {
        ensure_redis()?;
    }
    let log = root().join("target").join("xtask").join("redis-skips.log");
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    // A log left by an earlier run must not count in this one.
    let _ = std::fs::remove_file(&log);
    let mut cmd = cargo(&["test"]);
    if args.is_empty() {
        cmd.args(["--workspace", "--all-features"]);
    } else {
        cmd.args(args);
    }
    cmd.env("MCP_TEST_SKIP_REDIS_LOG", &log);
    let result = run("cargo test", cmd);
    if skip {
        let skipped: BTreeSet<String> =
            std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect();
        eprintln!(
            "xtask: {} test(s) skipped Redis because MCP_TEST_SKIP_REDIS=1 was set{}",
            skipped.len(),
            if skipped.is_empty() { String::new() } else { format!(":\n  {}", join(&skipped)) }
        );
    }
    result
}

fn join(lines: &BTreeSet<String>) -> String {
    lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n  ")
}

fn redis_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// redis-server on `PATH`: already there, or installed through apt-get (as root, or through a
/// `sudo` that needs no password); otherwise an error with the one command that installs it.
fn ensure_redis() -> Result<(), String> {
    if redis_installed() {
        return Ok(());
    }
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("apt-get") {
        let root_user = output("id -u", {
            let mut c = Command::new("id");
            c.arg("-u");
            c
        })
        .is_ok_and(|uid| uid.trim() == "0");
        let sudo = !root_user
            && has("sudo")
            && Command::new("sudo")
                .args(["-n", "true"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if root_user || sudo {
            let apt = |args: &[&str]| {
                let mut c = Command::new(if root_user { "apt-get" } else { "sudo" });
                if !root_user {
                    c.args(["-n", "apt-get"]);
                }
                c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
                c
            };
            let installed = run("apt-get update (for redis-server)", apt(&["update", "-qq"]))
                .and_then(|()| {
                    run(
                        "apt-get install redis-server",
                        apt(&["install", "-y", "-qq", "redis-server"]),
                    )
                });
            match installed {
                Ok(()) if redis_installed() => return Ok(()),
                Ok(()) => eprintln!("xtask: apt-get installed redis-server, but it is not on PATH"),
                Err(e) => eprintln!("xtask: {e}"),
            }
        }
    }
    let install = if has("apt-get") {
        "sudo apt-get install -y redis-server"
    } else if has("brew") {
        "brew install redis"
    } else if has("dnf") {
        "sudo dnf install -y redis"
    } else {
        "install redis-server from https://redis.io/docs/latest/operate/oss_and_stack/install/"
    };
    Err(format!(
        "the Redis tests need redis-server, which is not installed and could not be installed \
         here. Install it with:\n\n    {install}\n\nthen run `cargo xtask test` again (or set \
         MCP_TEST_SKIP_REDIS=1 to skip the Redis tests on purpose)"
    ))
}

// ---------------------------------------------------------------------------------- benches ---

/// Every bench once, in test mode: criterion runs each routine once without timing when the
/// binary is not given `--bench`, which is how `cargo test --benches` starts it. The counts the
/// benches assert (one handler run for 1,000 callers, one refresher call for 1,000 forced
/// refreshes, ...) then fail the run when they break.
fn benches() -> Result<(), String> {
    if !env::var("MCP_TEST_SKIP_REDIS").is_ok_and(|v| v == "1") {
        ensure_redis()?;
    }
    run(
        "every bench once in test mode",
        // `--bench '*'`: the bench targets only (`--benches` would run the libraries' unit
        // tests again, since a library is a bench target too).
        cargo(&["test", "--workspace", "--all-features", "--bench", "*"]),
    )
}

// ------------------------------------------------------------------------------------- tidy ---

fn tidy() -> Result<(), String> {
    let problems = tidy::check(root());
    if problems.is_empty() {
        eprintln!("xtask: tidy rules hold");
        Ok(())
    } else {
        Err(format!("tidy rules broken:\n  {}", problems.join("\n  ")))
    }
}

// -------------------------------------------------------------------------------- layering ---

/// The workspace's member crates, by package name.
fn members() -> Result<Vec<String>, String> {
    let text =
        output("cargo metadata", cargo(&["metadata", "--no-deps", "--format-version", "1"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("cargo metadata: {e}"))?;
    // With `--no-deps`, `packages` lists the workspace's members only (their dependencies'
    // names appear inside each package, not as packages).
    let names: Vec<String> = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    if names.is_empty() {
        return Err("cargo metadata listed no packages".into());
    }
    Ok(names)
}

/// The target directory (`cargo metadata` knows it, wherever `CARGO_TARGET_DIR` or a config
/// puts it).
fn target_dir() -> Result<PathBuf, String> {
    let text =
        output("cargo metadata", cargo(&["metadata", "--no-deps", "--format-version", "1"]))?;
    let start =
        text.find("\"target_directory\":\"").ok_or("cargo metadata: no target_directory")?
            + "\"target_directory\":\"".len();
    let end = text[start..].find('"').ok_or("cargo metadata: bad target_directory")? + start;
    Ok(PathBuf::from(text[start..end].replace("\\\\", "\\")))
}

/// Every package name in `Cargo.lock` (what a layering rule may name).
fn locked_packages() -> Result<BTreeSet<String>, String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock"))
        .map_err(|e| format!("read Cargo.lock: {e}"))?;
    Ok(lock
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .map(str::to_owned)
        .collect())
}

/// What each crate must not depend on (normal dependencies, every feature on).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "mcp-secret",
        &["tokio", "reqwest", "hyper", "rmcp", "axum", "sled", "redis", "mcp-clock"],
        "the secret type holds a string, nothing else",
    ),
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

/// The packages in `krate`'s normal dependency graph with every feature on.
fn dependency_names(krate: &str) -> Result<BTreeSet<String>, String> {
    let text = output(
        &format!("cargo tree -p {krate}"),
        cargo(&[
            "tree",
            "-q",
            "-p",
            krate,
            "--all-features",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ]),
    )?;
    let names: BTreeSet<String> =
        text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    if !names.contains(krate) {
        return Err(format!("cargo tree -p {krate} did not list {krate} itself:\n{text}"));
    }
    Ok(names)
}

/// Checks [`RULES`]: every crate a rule names is a member, every dependency it forbids is a
/// package this workspace knows (a typo would make the rule vacuous), and `cargo tree` must
/// succeed.
fn layering() -> Result<(), String> {
    let members = members()?;
    let locked = locked_packages()?;
    let mut broken = Vec::new();
    for (krate, forbidden, why) in RULES {
        if !members.iter().any(|m| m == krate) {
            return Err(format!("layering rule for {krate}: no such workspace member"));
        }
        if let Some(unknown) = forbidden.iter().find(|dep| !locked.contains(**dep)) {
            return Err(format!(
                "layering rule for {krate} forbids {unknown}, which is not a package in \
                 Cargo.lock (a misspelt name would make the rule vacuous)"
            ));
        }
        let deps = dependency_names(krate)?;
        for dep in *forbidden {
            if deps.contains(*dep) {
                let path = output(
                    "cargo tree -i",
                    cargo(&[
                        "tree",
                        "-q",
                        "-p",
                        krate,
                        "--all-features",
                        "-e",
                        "normal",
                        "-i",
                        dep,
                    ]),
                )
                .unwrap_or_default();
                broken.push(format!("{krate} depends on {dep} ({why}):\n{path}"));
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

// ---------------------------------------------------------------------------- exposed types ---

/// Checks every library crate's public API with [`exposed`].
fn exposed_types() -> Result<(), String> {
    let workspace = std::fs::read_to_string(root().join("Cargo.toml"))
        .map_err(|e| format!("read Cargo.toml: {e}"))?;
    let mut libraries = Vec::new();
    for dir in member_dirs(&workspace) {
        if !root().join(&dir).join("src/lib.rs").exists() {
            continue;
        }
        let path = root().join(&dir).join("Cargo.toml");
        let manifest =
            std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let name = package_name(&manifest).ok_or_else(|| format!("{dir}: no package name"))?;
        libraries.push((name, manifest));
    }
    if libraries.is_empty() {
        return Err("no library crate found: the exposed-types check would check nothing".into());
    }
    let ours: BTreeSet<String> = members()?.iter().map(|m| m.replace('-', "_")).collect();
    let docs = target_dir()?.join("doc");
    let mut problems = Vec::new();
    for (name, manifest) in &libraries {
        let mut cmd = cargo(&[
            "rustdoc",
            "-q",
            "-p",
            name,
            "--lib",
            "--all-features",
            "--",
            "-Z",
            "unstable-options",
            "--output-format",
            "json",
        ]);
        // rustdoc's JSON output is unstable; the stable toolchain emits it with this set.
        cmd.env("RUSTC_BOOTSTRAP", "1").env_remove("RUSTDOCFLAGS");
        run(&format!("rustdoc JSON of {name}"), cmd)?;
        let file = docs.join(format!("{}.json", name.replace('-', "_")));
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", file.display()))?;
        let found = exposed::exposures(&doc, &ours)?;
        problems.extend(exposed::judge(name, &found, &exposed::allowed(manifest)));
    }
    if problems.is_empty() {
        eprintln!("xtask: exposed types: every library exposes only the crates it allows");
        Ok(())
    } else {
        Err(format!("exposed types:\n  {}", problems.join("\n  ")))
    }
}

// -------------------------------------------------------------------------------- features ---

/// The features a crate declares in its `[features]` table (without `default`).
fn declared_features(manifest: &str) -> Vec<String> {
    let mut features = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[features]";
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, _)) = line.split_once('=') {
            let name = name.trim().trim_matches('"');
            if name != "default" {
                features.push(name.to_owned());
            }
        }
    }
    features
}

/// Every combination (each subset) of `features`, as `--features` arguments.
fn combinations(features: &[String]) -> Vec<String> {
    (0..1u32 << features.len())
        .map(|mask| {
            features
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, f)| f.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// Each member crate with features, and every combination of them (derived from the crates'
/// manifests, so a new feature joins the matrix by being declared).
fn feature_matrix() -> Result<Vec<(String, Vec<String>)>, String> {
    let workspace = std::fs::read_to_string(root().join("Cargo.toml"))
        .map_err(|e| format!("read Cargo.toml: {e}"))?;
    let mut matrix = Vec::new();
    for dir in member_dirs(&workspace) {
        let path = root().join(&dir).join("Cargo.toml");
        let manifest =
            std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let features = declared_features(&manifest);
        if features.is_empty() {
            continue;
        }
        if features.len() > 6 {
            return Err(format!(
                "{dir}: {} features is too many for a full matrix",
                features.len()
            ));
        }
        let name = package_name(&manifest).ok_or_else(|| format!("{dir}: no package name"))?;
        matrix.push((name, combinations(&features)));
    }
    if matrix.is_empty() {
        return Err("no member crate declares a feature: the matrix would be empty".into());
    }
    Ok(matrix)
}

/// The `members = [...]` of the workspace manifest.
fn member_dirs(workspace: &str) -> Vec<String> {
    let Some(start) = workspace.find("members = [") else { return Vec::new() };
    let rest = &workspace[start + "members = [".len()..];
    let end = rest.find(']').unwrap_or(rest.len());
    rest[..end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn package_name(manifest: &str) -> Option<String> {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("name = \""))
        .and_then(|l| l.strip_suffix('"'))
        .map(str::to_owned)
}

fn features() -> Result<(), String> {
    for (krate, sets) in feature_matrix()? {
        for set in sets {
            // clippy rather than check: `-D warnings` then applies to our crates only, so a
            // feature combination that leaves dead code fails without rebuilding dependencies.
            let mut args = vec!["clippy", "-q", "-p", &krate, "--no-default-features", "--lib"];
            if !set.is_empty() {
                args.extend(["--features", &set]);
            }
            args.extend(["--", "-D", "warnings"]);
            run(&format!("feature set {krate} [{set}]"), cargo(&args))?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ fuzz ---

/// The fuzz crate is its own workspace (excluded from this one) and its targets need nightly
/// and cargo-fuzz to *run*; on stable, building them checks that they still compile against
/// `mcp-oauth` (libfuzzer-sys builds libFuzzer with the system C++ compiler).
fn fuzz() -> Result<(), String> {
    let dir = root().join("crates/mcp-oauth/fuzz");
    let mut cmd = Command::new(cargo_bin());
    cmd.args(["build", "-q", "--bins"])
        .current_dir(&dir)
        // The workspace's target directory: the fuzz crate's dependencies (mcp-oauth and its
        // tree, at the same versions) are then mostly built already.
        .env("CARGO_TARGET_DIR", target_dir()?);
    run("build the fuzz targets (crates/mcp-oauth/fuzz)", cmd)
}

// ------------------------------------------------------------------------------------ deny ---

/// The cargo-deny release `cargo xtask deny` installs when none is on PATH.
const CARGO_DENY: &str = "cargo-deny@0.20.2";

/// `cargo deny check bans licenses sources` with the workspace's deny.toml (advisories are not
/// checked: that needs the advisory database from the network at every run).
fn deny() -> Result<(), String> {
    let present = Command::new(cargo_bin())
        .args(["deny", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("xtask: cargo-deny is missing: installing {CARGO_DENY}");
        run("cargo install cargo-deny", cargo(&["install", "--locked", "--quiet", CARGO_DENY]))?;
    }
    run("cargo deny", cargo(&["deny", "check", "bans", "licenses", "sources"]))
}

// ----------------------------------------------------------------------------- conformance ---

/// A pinned version of the conformance suite, the number of client auth scenarios it has, and
/// its own install directory (the runner reinstalls when the version in a directory differs).
struct Suite {
    version: &'static str,
    scenarios: u32,
    dir: &'static str,
}

/// Every suite `cargo xtask conformance` runs, in order.
const SUITES: &[Suite] = &[
    Suite { version: "0.1.16", scenarios: 22, dir: "/tmp/conf" },
    // The pre-release with the MCP 2026-07-28 scenarios (`iss`, authorization-server migration,
    // DPoP, workload identity); its own directory, so neither install replaces the other.
    Suite { version: "0.2.0-alpha.12", scenarios: 33, dir: "/tmp/conf-0.2.0-alpha.12" },
];

/// The runner script, `shared/tools/conformance-client.sh`, next to the workspace or next to
/// one of its ancestors (a git worktree lives deeper than the main checkout);
/// `CONFORMANCE_SCRIPT` names it explicitly.
fn conformance_script() -> Result<PathBuf, String> {
    if let Some(script) = env::var_os("CONFORMANCE_SCRIPT") {
        return Ok(PathBuf::from(script));
    }
    let root = root();
    root.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/tools/conformance-client.sh"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!(
                "shared/tools/conformance-client.sh not found next to {} or its parents (set \
                 CONFORMANCE_SCRIPT to its path)",
                root.display()
            )
        })
}

/// The runner's last line: `N passed, N failed`.
fn parse_summary(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().rev().find(|l| l.contains(" passed, ") && l.ends_with(" failed"))?;
    let (passed, failed) = line.trim().split_once(" passed, ")?;
    Some((passed.trim().parse().ok()?, failed.strip_suffix(" failed")?.trim().parse().ok()?))
}

/// What a run must show: with no filter, exactly the suite's scenarios, all passed; with a
/// filter, at least one scenario and none failed.
fn judge(suite: &Suite, filtered: bool, summary: Option<(u32, u32)>) -> Result<String, String> {
    let Some((passed, failed)) = summary else {
        return Err(format!("suite {}: no 'N passed, N failed' line", suite.version));
    };
    if failed > 0 {
        return Err(format!("suite {}: {passed} passed, {failed} failed", suite.version));
    }
    if filtered {
        if passed == 0 {
            return Err(format!("suite {}: no scenario ran", suite.version));
        }
    } else if passed != suite.scenarios {
        return Err(format!(
            "suite {}: {passed} scenarios ran, {} expected",
            suite.version, suite.scenarios
        ));
    }
    Ok(format!("suite {}: {passed} passed, 0 failed", suite.version))
}

/// The conformance client is `mcp-connect conformance`; the suite appends the server URL as
/// its last argument. Inherited knobs that change what runs (`CONFORMANCE_SKIP`, `_SCOPE`,
/// `_VERSION`, `_DIR`, `_OUT`) are removed: the count is checked against the suite's own.
fn conformance(filter: &[String]) -> Result<(), String> {
    run(
        "build the conformance client (mcp-connect)",
        cargo(&["build", "-q", "-p", "mcp-connect", "--bin", "mcp-connect"]),
    )?;
    let script = conformance_script()?;
    let client = target_dir()?.join("debug/mcp-connect");
    let mut verdicts = Vec::new();
    for suite in SUITES {
        eprintln!("xtask: conformance suite {} ({} scenarios)", suite.version, suite.scenarios);
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(format!("{} conformance", client.display()))
            .args(filter)
            .current_dir(root())
            .env_remove("CONFORMANCE_SKIP")
            .env_remove("CONFORMANCE_SCOPE")
            .env_remove("CONFORMANCE_OUT")
            .env("CONFORMANCE_VERSION", suite.version)
            .env("CONFORMANCE_DIR", suite.dir)
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("start {}: {e}", script.display()))?;
        let mut out = String::new();
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let line = line.map_err(|e| format!("read the runner's output: {e}"))?;
                println!("{line}");
                out.push_str(&line);
                out.push('\n');
            }
        }
        let status = child.wait().map_err(|e| format!("wait for the runner: {e}"))?;
        let verdict = judge(suite, !filter.is_empty(), parse_summary(&out));
        match (status.success(), verdict) {
            (true, Ok(v)) => verdicts.push(v),
            (_, Err(e)) => return Err(e),
            (false, Ok(_)) => {
                return Err(format!("suite {}: the runner failed ({status})", suite.version));
            }
        }
    }
    eprintln!("xtask: conformance: {}", verdicts.join("; "));
    Ok(())
}

// ------------------------------------------------------------------------------------ other ---

fn fixture(args: &[String]) -> Result<(), String> {
    let mut cmd = cargo(&[
        "run",
        "-q",
        "-p",
        "mcp-fixtures",
        "--features",
        "cli",
        "--bin",
        "mcp-fixtures",
        "--",
    ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: Suite = Suite { version: "x", scenarios: 22, dir: "/tmp/x" };

    #[test]
    fn the_runner_summary_is_parsed() {
        let out = "PASS  auth/a  (3/3 checks)\nresults: /tmp\n21 passed, 1 failed\n";
        assert_eq!(parse_summary(out), Some((21, 1)));
        assert_eq!(parse_summary("nothing here\n"), None);
    }

    #[test]
    fn a_conformance_run_must_have_every_scenario() {
        assert!(judge(&SUITE, false, Some((22, 0))).is_ok());
        assert!(judge(&SUITE, false, Some((18, 0))).is_err(), "four skipped is not a pass");
        assert!(judge(&SUITE, false, Some((23, 0))).is_err());
        assert!(judge(&SUITE, false, Some((21, 1))).is_err());
        assert!(judge(&SUITE, false, None).is_err());
        assert!(judge(&SUITE, true, Some((3, 0))).is_ok());
        assert!(judge(&SUITE, true, Some((0, 0))).is_err());
    }

    #[test]
    fn the_feature_matrix_has_every_combination() {
        let manifest = "[package]\nname = \"x\"\n[features]\ndefault = [\"sled\"]\n# c\n\
                        sled = [\"dep:sled\"]\nredis = []\ntest-util = [\"a/b\"]\n[dependencies]\n";
        let features = declared_features(manifest);
        assert_eq!(features, ["sled", "redis", "test-util"]);
        let sets = combinations(&features);
        assert_eq!(sets.len(), 8);
        assert!(sets.contains(&String::new()));
        assert!(sets.contains(&"sled,test-util".to_owned()));
        assert!(sets.contains(&"sled,redis,test-util".to_owned()));
    }

    #[test]
    fn the_real_matrix_covers_the_backends() {
        let matrix = feature_matrix().unwrap();
        let token_storage = &matrix.iter().find(|(k, _)| k == "token-storage").unwrap().1;
        assert_eq!(token_storage.len(), 8);
        assert!(token_storage.contains(&"sled,test-util".to_owned()));
        let flow_state = &matrix.iter().find(|(k, _)| k == "flow-state").unwrap().1;
        assert_eq!(flow_state.len(), 8);
    }

    #[test]
    fn the_root_is_the_workspace() {
        assert!(is_workspace_root(root()));
        assert!(root().join("xtask/src/main.rs").exists());
    }

    #[test]
    fn every_layering_rule_names_known_packages() {
        let locked = locked_packages().unwrap();
        for (krate, forbidden, _) in RULES {
            assert!(locked.contains(*krate), "{krate}");
            for dep in *forbidden {
                assert!(locked.contains(*dep), "{krate} forbids unknown {dep}");
            }
        }
    }
}
