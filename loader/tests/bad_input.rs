//! Bad data never stops the loader and never silently loses the good rows around it.

mod common;

use std::io::Write;

use common::*;
use rho_loader::sources::{write_parquet_shard, Row};

fn gz(lines: &[String]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for l in lines {
        e.write_all(l.as_bytes()).unwrap();
        e.write_all(b"\n").unwrap();
    }
    e.finish().unwrap()
}

fn line(text: &str) -> String {
    serde_json::json!({"url": "u", "text": text}).to_string()
}

#[test]
fn every_kind_of_bad_input_is_skipped_counted_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut good = 0u64;

    // Parquet: a null text, an empty and a blank document among good rows.
    let mut rows: Vec<Row> = (0..20)
        .map(|i| Row {
            text: Some(doc(i)),
            ..Default::default()
        })
        .collect();
    rows[3].text = None;
    rows[7].text = Some(String::new());
    rows[11].text = Some("   \n ".into());
    good += 17;
    write_parquet_shard(&data.join("a.parquet"), &rows, 4).unwrap();

    // A truncated parquet file: no footer, nothing readable.
    write_parquet_shard(&data.join("b.parquet"), &rows, 4).unwrap();
    let bytes = std::fs::read(data.join("b.parquet")).unwrap();
    std::fs::write(data.join("b.parquet"), &bytes[..bytes.len() / 2]).unwrap();

    // JSONL: invalid UTF-8, bad JSON, no text key, a non-string text, then good rows.
    let mut f = std::fs::File::create(data.join("c.jsonl")).unwrap();
    writeln!(f, "{}", line(&doc(100))).unwrap();
    f.write_all(b"{\"text\": \"bad \xff\xfe utf8\"}\n").unwrap();
    writeln!(f, "{{\"text\": unterminated").unwrap();
    writeln!(f, "{{\"url\": \"no text here\"}}").unwrap();
    writeln!(f, "{{\"text\": 42}}").unwrap();
    for i in 101..110 {
        writeln!(f, "{}", line(&doc(i))).unwrap();
    }
    good += 10;
    drop(f);

    // A truncated jsonl.gz: the rows before the cut survive.
    let lines: Vec<String> = (200..400).map(|i| line(&doc(i))).collect();
    let z = gz(&lines);
    std::fs::write(data.join("d.jsonl.gz"), &z[..z.len() * 2 / 3]).unwrap();

    // Trained before the huge document is written, which would only slow training down.
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));

    // A zstd shard with one 50 MB document between two small ones.
    let huge = "x = 1 + 1 = 2. ".repeat(50 * 1024 * 1024 / 15);
    let body = [line(&doc(500)), line(&huge), line(&doc(501))].join("\n");
    std::fs::write(
        data.join("e.jsonl.zst"),
        zstd::encode_all(body.as_bytes(), 1).unwrap(),
    )
    .unwrap();
    good += 3;

    let mut cfg = config(&data, &tok, 63, 4);
    // A named shard that does not exist.
    cfg.data
        .paths
        .push(dir.path().join("missing.jsonl").to_string_lossy().into());
    let (batches, c) = batches(&cfg, 0);

    assert_eq!(c.rows_no_text, 3, "null text, missing key, non-string text");
    assert_eq!(c.rows_bad_utf8, 1);
    assert_eq!(c.rows_bad_json, 1);
    assert_eq!(c.docs_empty, 2);
    assert_eq!(c.docs_chunked, 1);
    assert_eq!(
        c.shards_damaged, 3,
        "truncated parquet, truncated gz, missing file"
    );
    assert_eq!(c.shards_read, 6);
    // Every good row of the intact shards, and a good part of the truncated one.
    let from_gz = c.docs - good;
    assert!(
        c.docs > good && from_gz > 50 && from_gz < 200,
        "{} docs, {from_gz} from the truncated shard",
        c.docs
    );
    let real: u64 = batches
        .iter()
        .flat_map(|b| b.lengths.iter())
        .map(|&l| u64::from(l))
        .sum();
    assert_eq!(real, c.tokens, "every token produced reaches a batch");
}
