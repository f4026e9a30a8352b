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
        } else if name.starts_with("trainer") {
            rho_trainer::TrainerConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("selector") {
            rho_selector::SelectorConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: no parser knows this config; name it after its process (loader-*.json, selector-*.json, trainer-*.json)");
        }
        seen += 1;
    }
    assert!(seen >= 6, "configs/ holds {seen} configs");
}
