//! `bench/gpu/check.sh`, the GPU check, run as CI can: on the CPU at tiny sizes, where every step
//! (fixture losses in f32 and f16, reference throughput and memory, causal-LM and SLM training
//! steps, a short `rho run`) must pass; and without a binary, where it must say what is missing.

mod common;

use std::path::Path;
use std::process::Command;

fn check(rho: &str, out: &Path, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gpu/check.sh");
    let output = Command::new(script)
        .env("RHO", rho)
        .args(["--out", &common::p(out)])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = std::fs::read_to_string(out.join("device-check.json"))
        .unwrap_or_else(|e| panic!("no device-check.json ({e}): {stderr}"));
    (
        output.status.success(),
        serde_json::from_str(&json).unwrap(),
        stderr,
    )
}

#[test]
fn the_gpu_check_runs_every_step_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, report, stderr) = check(common::RHO, dir.path(), &["--device", "cpu", "--tiny"]);
    assert!(ok, "{stderr}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["half"], "f16");
    let fixtures = report["fixtures"].as_array().unwrap();
    // Every committed fixture checkpoint (each directory with a config.json).
    let committed =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("config.json").exists())
            .count();
    assert!(committed >= 5, "the fixtures are missing");
    assert_eq!(fixtures.len(), committed, "{report}");
    for f in fixtures {
        // The same device: f32 agrees exactly; f16 moves the losses, within its tolerance.
        assert_eq!(f["f32_max_abs_diff"], 0.0, "{f}");
        let half = f["half_max_abs_diff"].as_f64().unwrap();
        assert!(
            half > 0.0 && half <= f["half_tolerance"].as_f64().unwrap(),
            "{f}"
        );
    }
    let t = &report["throughput"];
    assert!(t["tokens_per_s"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["host_peak_kib_after_load"].as_u64().unwrap() > 0, "{t}");
    let training = report["training"].as_array().unwrap();
    assert_eq!(training.len(), 2);
    assert!(training.iter().all(|m| m["ok"] == true), "{report}");
    assert_eq!(report["run"]["ok"], true, "{report}");
    assert!(report["run"]["steps"].as_u64().unwrap() > 0);
}

#[test]
fn the_gpu_check_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, report, stderr) = check("/nonexistent/rho", dir.path(), &[]);
    assert!(!ok);
    assert_eq!(report["ok"], false);
    assert_eq!(report["missing"][0], "rho", "{report}");
    assert!(stderr.contains("no rho binary"), "{stderr}");
}
