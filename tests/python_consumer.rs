//! The Python consumer (`python/rho_stream`) and its pytest suite, run against this build's
//! `rho` binary: codec, selection against the shared vectors, and whole pipelines (a full
//! stream, a resume mid-stream, a selector killed mid-run, wrongly signed messages).
//!
//! Needs the packages of `python/requirements-test.txt`: `scripts/test` (the README's test
//! command) makes an environment with them and points `PYTHON` at it.

use std::process::Command;

#[test]
fn pytest_suite_passes_against_this_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import zmq, numpy, pytest"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "{python} lacks the Python test packages: run the tests with scripts/test, which sets them up (or set PYTHON to a python with python/requirements-test.txt)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "python/tests",
        ])
        .current_dir(root)
        .env("RHO_BIN", env!("CARGO_BIN_EXE_rho"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    println!("{text}");
}
