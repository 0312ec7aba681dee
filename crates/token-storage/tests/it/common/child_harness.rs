//! A small test runner for test binaries that re-execute themselves as child processes.
//!
//! With libtest, the child entry point had to be a `#[test]` that did nothing unless an
//! environment variable was set, so every run counted it as a passing test. A binary built with
//! `harness = false` and this runner has an explicit `main`: the child role runs when its
//! variable is set, and only the real tests are run, reported and counted otherwise. It keeps
//! libtest's output shape (`test NAME ... ok`, `test result: ...`), its name filters (`--exact`
//! included) and `--list`; each test runs on a thread named after it, as under libtest (the
//! Redis skip records that name).
//!
//! Shared by `crates/token-storage/tests/{crash,lock_files}.rs` and `tests/tests/fleet.rs`.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::process::ExitCode;

/// One test: its name and its body.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
}

/// Runs `body` on a fresh multi-thread runtime with two workers (what the tests asked of
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`).
pub fn block_on<F: Future>(body: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the test runtime")
        .block_on(body)
}

/// Runs the tests selected by the command line (libtest's filters), each on its own thread,
/// and reports them as libtest does. Fails if any test failed.
pub fn run(tests: &[Test]) -> ExitCode {
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let (mut exact, mut list) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exact" => exact = true,
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            // Other options that take a value: skip it.
            "--test-threads" | "--format" | "--color" | "-Z" | "--logfile" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => filters.push(a.to_owned()),
        }
    }
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| !skips.iter().any(|s| t.name.contains(s.as_str())))
        .filter(|t| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| if exact { t.name == f } else { t.name.contains(f.as_str()) })
        })
        .collect();
    if list {
        for t in &selected {
            println!("{}: test", t.name);
        }
        return ExitCode::SUCCESS;
    }
    let plural = if selected.len() == 1 { "" } else { "s" };
    println!("\nrunning {} test{plural}", selected.len());
    let mut failed = Vec::new();
    for t in &selected {
        let run = t.run;
        let outcome = std::thread::Builder::new()
            .name(t.name.to_owned())
            .spawn(run)
            .expect("spawn the test thread")
            .join();
        match outcome {
            Ok(()) => println!("test {} ... ok", t.name),
            Err(_) => {
                println!("test {} ... FAILED", t.name);
                failed.push(t.name);
            }
        }
    }
    let passed = selected.len() - failed.len();
    let filtered = tests.len() - selected.len();
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered} filtered out\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len()
    );
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
