//! `rho concentrate`: every document's selected tokens, as parquet with `token_ids` and `mask`
//! columns; the share kept follows the ratio document by document, and a report says how much
//! smaller the data became.

mod common;

use std::fs::File;

use common::{p, rho, setup_training};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{ListAccessor, RowAccessor};

fn rows(dir: &std::path::Path) -> Vec<(String, Vec<u32>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    for f in files {
        let reader = SerializedFileReader::new(File::open(&f).unwrap()).unwrap();
        for row in reader.get_row_iter(None).unwrap() {
            let row = row.unwrap();
            let ids = row.get_list(4).unwrap();
            let mask = row.get_list(5).unwrap();
            out.push((
                row.get_string(1).unwrap().clone(),
                (0..ids.len()).map(|i| ids.get_uint(i).unwrap()).collect(),
                (0..mask.len())
                    .map(|i| mask.get_ubyte(i).unwrap())
                    .collect(),
            ));
        }
    }
    out
}

#[test]
fn concentrated_documents_keep_the_ratio_of_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_training(root);
    for (score, extra) in [("reference", None), ("excess", Some("init"))] {
        let out = root.join(format!("conc-{score}"));
        let mut args = vec![
            "concentrate".to_string(),
            "--input".into(),
            p(&root.join("train")),
            "--tokenizer".into(),
            p(&root.join("tokenizer.json")),
            "--reference".into(),
            p(&root.join("ref")),
            "--score".into(),
            score.into(),
            "--ratio".into(),
            "0.5".into(),
            // Short windows, so that documents span several.
            "--seq-len".into(),
            "16".into(),
            "--docs-per-shard".into(),
            "100".into(),
            "--out".into(),
            p(&out),
        ];
        if let Some(m) = extra {
            args.extend(["--model".to_string(), p(&root.join(m))]);
        }
        rho(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let rows = rows(&out);
        assert_eq!(rows.len() as u64, report["documents"].as_u64().unwrap());
        assert!(rows.len() >= 200, "{} documents", rows.len());
        assert_eq!(
            report["files"].as_array().unwrap().len(),
            rows.len().div_ceil(100)
        );
        let (mut kept, mut targets) = (0u64, 0u64);
        for (text, ids, mask) in &rows {
            assert_eq!(ids.len(), mask.len());
            let n = ids.len().saturating_sub(1);
            let k = mask.iter().filter(|&&m| m == 1).count();
            // Round half up of ratio x targets, the first token never kept.
            assert_eq!(k, (0.5 * n as f64 + 0.5).floor() as usize);
            assert!(mask.first().is_none_or(|&m| m == 0));
            assert!(k == 0 || !text.is_empty());
            kept += k as u64;
            targets += n as u64;
        }
        assert_eq!(report["selected_tokens"].as_u64().unwrap(), kept);
        assert_eq!(report["target_tokens"].as_u64().unwrap(), targets);
        let size = report["text_size_ratio"].as_f64().unwrap();
        assert!(size > 0.2 && size < 0.8, "text kept: {size}");
    }
}
