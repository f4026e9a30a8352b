//! The synthetic corpus and tokenizer the benchmarks share.

use std::path::PathBuf;

use crate::synth::{self as corpus, SynthArgs};

/// A synthetic corpus in `out/data` and a BPE tokenizer of `vocab` tokens trained on it in
/// `out/tokenizer.json` (both kept between runs); returns them and the vocabulary size.
pub fn synthetic_corpus(
    out: &std::path::Path,
    shards: usize,
    docs_per_shard: usize,
    seed: u64,
    vocab: usize,
) -> anyhow::Result<(PathBuf, PathBuf, usize)> {
    let data = out.join("data");
    if !data.exists() {
        corpus::write_corpus(&SynthArgs {
            out: data.clone(),
            shards,
            docs_per_shard,
            noise: 0.45,
            easy: 0.0,
            seed,
        })?;
    }
    let tokenizer = out.join("tokenizer.json");
    if !tokenizer.exists() {
        let d = rho_loader::DataConfig {
            paths: vec![data.to_string_lossy().into()],
            text_field: "text".into(),
            format: rho_loader::FormatChoice::Auto,
        };
        rho_loader::train::train_bpe(&d, vocab, Some(5000), &tokenizer)?;
    }
    let vocab = crate::runtime::load_tokenizer(&tokenizer)?.get_vocab_size(true);
    Ok((data, tokenizer, vocab))
}
