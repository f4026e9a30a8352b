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
            let s: rho_selector::SelectorConfig = rho_common::config_file::parse_json(
                &with_endpoints("selector", &["loader", "trainer"]),
            )
            .unwrap_or_else(|e| panic!("{name}, selector: {e}"));
            s.validate()
                .unwrap_or_else(|e| panic!("{name}, selector: {e}"));
            // The candle trainer, or a command that runs the ranks itself.
            if let Some(c) = v.get("trainer_command") {
                assert!(v.get("trainer").is_none(), "{name}: two trainers");
                let command = c["command"].as_array().map_or(0, Vec::len);
                assert!(command > 0, "{name}: `trainer_command.command` is empty");
                assert!(c["ranks"].as_u64().unwrap_or(0) >= 1, "{name}: `ranks`");
                assert!(
                    v["loader"].get("rank").is_none(),
                    "{name}: one loader of every rank"
                );
            } else {
                let t: rho_trainer::TrainerConfig =
                    rho_common::config_file::parse_json(&with_endpoints("trainer", &["loader"]))
                        .unwrap_or_else(|e| panic!("{name}, trainer: {e}"));
                t.validate()
                    .unwrap_or_else(|e| panic!("{name}, trainer: {e}"));
            }
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

/// The dotted names of every field of a serialized config (`data.paths`, `optimizer.lr`, ...).
/// Enum-valued objects (`selection.schedule`) are one field.
fn field_names(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    let Some(map) = v.as_object() else { return };
    for (k, child) in map {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if child.is_object() && child.get("kind").is_none() {
            field_names(&name, child, out);
        }
        out.push(name);
    }
}

/// The `field` column of the table under a `## heading` of docs/CONFIG.md.
fn documented(doc: &str, heading: &str) -> Vec<String> {
    let start = doc
        .find(&format!("## {heading}"))
        .unwrap_or_else(|| panic!("docs/CONFIG.md has no `## {heading}`"));
    let section = &doc[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect()
}

fn assert_documented(heading: &str, config: &impl serde::Serialize) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
        .unwrap();
    let listed = documented(&doc, heading);
    let mut fields = Vec::new();
    field_names("", &serde_json::to_value(config).unwrap(), &mut fields);
    let missing: Vec<_> = fields.iter().filter(|f| !listed.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "docs/CONFIG.md, {heading}: not documented: {missing:?}"
    );
    let stale: Vec<_> = listed.iter().filter(|f| !fields.contains(f)).collect();
    assert!(
        stale.is_empty(),
        "docs/CONFIG.md, {heading}: no such field: {stale:?}"
    );
}

#[test]
fn every_config_field_is_in_the_config_reference() {
    let loader: rho_loader::LoaderConfig = serde_json::from_value(serde_json::json!({
        "data": {"paths": ["x"]}, "tokenizer": "t.json", "seq_len": 8, "batch_size": 2,
    }))
    .unwrap();
    assert_documented("Loader", &loader);
    let selector: rho_selector::SelectorConfig = serde_json::from_value(serde_json::json!({
        "loader": "tcp://127.0.0.1:1", "trainer": "tcp://127.0.0.1:2",
        "model": "m", "tokenizer": "t.json",
    }))
    .unwrap();
    assert_documented("Selector", &selector);
    let trainer: rho_trainer::TrainerConfig = serde_json::from_value(serde_json::json!({
        "loader": "tcp://127.0.0.1:1", "model": "m",
        "checkpoint": {"dir": "c"}, "eval": {"loader_config": "h.json", "every": 10},
    }))
    .unwrap();
    let mut fields = serde_json::to_value(&trainer).unwrap();
    // The liveness fields are listed once, under the selector.
    fields.as_object_mut().unwrap().remove("liveness");
    fields["liveness"] = serde_json::json!(null);
    assert_documented("Trainer", &fields);
}

/// Rule: every field a process writes to its metrics lines and its report is named in
/// docs/CONFIG.md, "Metrics and reports" (as `field`).
#[test]
fn every_metrics_and_report_field_is_documented() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
        .unwrap();
    let start = doc.find("## Metrics and reports").expect("the section");
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let written: Vec<(&str, serde_json::Value)> = vec![
        (
            "trainer metrics",
            serde_json::to_value(rho_trainer::StepMetrics::default()).unwrap(),
        ),
        (
            "trainer report",
            serde_json::to_value(rho_trainer::Report::default()).unwrap(),
        ),
        (
            "selector metrics",
            serde_json::to_value(rho_selector::SelectorMetrics::default()).unwrap(),
        ),
    ];
    for (what, value) in written {
        let serde_json::Value::Object(fields) = value else {
            panic!("{what} is an object");
        };
        for key in fields.keys() {
            assert!(
                section.contains(&format!("`{key}`")),
                "docs/CONFIG.md, Metrics and reports: {what} field `{key}` not documented"
            );
        }
    }
}
