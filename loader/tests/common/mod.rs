//! Shared helpers: small corpora and tokenizers made on the spot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rho_loader::metrics::Metrics;
use rho_loader::sources::{write_parquet_shard, Row};
use rho_loader::{DataConfig, Flow, FormatChoice, LoaderConfig, Stream};
use rho_protocol::TokenBatch;

/// Document `i` of a deterministic corpus: varied lengths, some long.
pub fn doc(i: usize) -> String {
    let words = [
        "sum",
        "of",
        "the",
        "terms",
        "is",
        "$\\frac{a}{b}$",
        "so",
        "x",
        "=",
        "42",
        "we",
        "get",
    ];
    let n = 3 + (i * 7919) % 60;
    (0..n)
        .map(|k| words[(i + k * 31) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(" ({i})")
}

/// Writes `shards` parquet shards of `per_shard` documents each; returns their documents in order.
pub fn parquet_corpus(dir: &Path, shards: usize, per_shard: usize) -> Vec<Vec<String>> {
    std::fs::create_dir_all(dir).unwrap();
    (0..shards)
        .map(|s| {
            let docs: Vec<String> = (0..per_shard).map(|i| doc(s * per_shard + i)).collect();
            let rows: Vec<Row> = docs
                .iter()
                .map(|d| Row {
                    url: "u".into(),
                    text: Some(d.clone()),
                    date: "d".into(),
                    metadata: "{}".into(),
                })
                .collect();
            write_parquet_shard(&dir.join(format!("s{s:03}.parquet")), &rows, 7).unwrap();
            docs
        })
        .collect()
}

/// A byte-level BPE trained on the corpus in `dir`.
pub fn bpe_tokenizer(dir: &Path, out: &Path) -> PathBuf {
    let data = DataConfig {
        paths: vec![dir.to_string_lossy().into()],
        text_field: "text".into(),
        format: FormatChoice::Auto,
    };
    rho_loader::train::train_bpe(&data, 400, None, out).unwrap();
    out.to_path_buf()
}

/// A WordPiece tokenizer (BERT pre-tokenizer, `[SEP]` as separator) trained on `docs`.
pub fn wordpiece_tokenizer(docs: &[String], out: &Path) -> PathBuf {
    use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let mut trainer = WordPieceTrainer::builder()
        .vocab_size(300)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from("[UNK]", true),
            AddedToken::from("[SEP]", true),
        ])
        .build();
    let mut tk = TokenizerBuilder::<
        WordPiece,
        tokenizers::NormalizerWrapper,
        BertPreTokenizer,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >::new()
    .with_model(
        WordPiece::builder()
            .unk_token("[UNK]".into())
            .build()
            .unwrap(),
    )
    .with_pre_tokenizer(Some(BertPreTokenizer))
    .build()
    .unwrap();
    tk.train(&mut trainer, docs.iter()).unwrap();
    let tk: tokenizers::Tokenizer = tk.into();
    tk.save(out, false).unwrap();
    out.to_path_buf()
}

pub fn config(data: &Path, tokenizer: &Path, seq_len: usize, batch_size: usize) -> LoaderConfig {
    serde_json::from_value(serde_json::json!({
        "run_id": "test",
        "data": {"paths": [data]},
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "shuffle_window": 5,
        "threads": 2,
        "endpoint": "tcp://127.0.0.1:0",
    }))
    .unwrap()
}

/// Every batch of the stream from `start`, and the metrics of that run.
pub fn batches(
    config: &LoaderConfig,
    start: u64,
) -> (Vec<TokenBatch>, rho_loader::metrics::Counts) {
    batches_limit(config, start, usize::MAX)
}

pub fn batches_limit(
    config: &LoaderConfig,
    start: u64,
    limit: usize,
) -> (Vec<TokenBatch>, rho_loader::metrics::Counts) {
    split_batches_limit(config, config.stride(), start, limit)
}

/// Every batch the stream of `config` issues from `start` on (at most `limit`), split among the
/// ranks as `stride` says.
pub fn split_batches_limit(
    config: &LoaderConfig,
    stride: rho_loader::RankStride,
    start: u64,
    limit: usize,
) -> (Vec<TokenBatch>, rho_loader::metrics::Counts) {
    let metrics = Arc::new(Metrics::default());
    let mut stream = Stream::new(config, metrics.clone()).unwrap();
    let mut out = Vec::new();
    stream
        .run_split(stride, start, |b| {
            out.push(b);
            if out.len() >= limit {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    (out, metrics.snapshot())
}
