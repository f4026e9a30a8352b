//! Every shipped config parses and validates.

use std::path::Path;

#[test]
fn every_config_in_configs_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("loader") {
            rho_loader::LoaderConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("run") {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let with_endpoints = |section: &str, keys: &[&str]| {
                let mut s = v[section].clone();
                for k in keys {
                    s[*k] = "tcp://127.0.0.1:1".into();
                }
                s.to_string()
            };
            rho_loader::LoaderConfig::parse(&v["loader"].to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .unwrap_or_else(|e| panic!("{name}, loader: {e}"));
            let s: rho_selector::SelectorConfig = rho_protocol::config_file::parse_json(
                &with_endpoints("selector", &["loader", "trainer"]),
            )
            .unwrap_or_else(|e| panic!("{name}, selector: {e}"));
            s.validate()
                .unwrap_or_else(|e| panic!("{name}, selector: {e}"));
            let t: rho_trainer::TrainerConfig =
                rho_protocol::config_file::parse_json(&with_endpoints("trainer", &["loader"]))
                    .unwrap_or_else(|e| panic!("{name}, trainer: {e}"));
            t.validate()
                .unwrap_or_else(|e| panic!("{name}, trainer: {e}"));
        } else if name.starts_with("trainer") {
            rho_trainer::TrainerConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("selector") {
            rho_selector::SelectorConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: no parser knows this config; name it after its process (loader-*.json, selector-*.json, trainer-*.json, run-*.json)");
        }
        seen += 1;
    }
    assert!(seen >= 6, "configs/ holds {seen} configs");
}
