//! `rho tokenizer train`: a byte-level BPE tokenizer trained on shards with the `tokenizers`
//! crate, so that a run needs nothing downloaded.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::config::DataConfig;
use crate::sources::{self, Event};
use crate::{LoaderError, Result};

/// Special tokens every trained tokenizer holds, in id order from 0.
pub const SPECIAL_TOKENS: [&str; 3] = ["<pad>", "<s>", "</s>"];

/// What a training run saw and made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// Documents trained on.
    pub documents: u64,
    /// The vocabulary size reached.
    pub vocab_size: usize,
}

/// Trains a byte-level BPE of (at most) `vocab_size` tokens on the documents of `data` (at most
/// `max_docs` of them when given) and writes it to `out` as a `tokenizer.json`.
pub fn train_bpe(
    data: &DataConfig,
    vocab_size: usize,
    max_docs: Option<u64>,
    out: &Path,
) -> Result<TrainReport> {
    let min = 256 + SPECIAL_TOKENS.len();
    if vocab_size < min {
        return Err(LoaderError::ConfigField {
            field: "vocab_size",
            reason: format!("must be at least {min} (bytes and special tokens)"),
        });
    }
    let shards = sources::discover(data)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| LoaderError::Training(e.to_string()))?;
    let limit = max_docs.unwrap_or(u64::MAX);
    let mut documents = 0u64;
    let text_field = data.text_field.clone();
    let docs = shards
        .iter()
        .flat_map(|s| sources::open(s, &text_field))
        .filter_map(|e| match e {
            Event::Doc { text, .. } => Some(text),
            _ => None,
        })
        .take(limit.min(usize::MAX as u64) as usize)
        .inspect(|_| documents += 1);
    tokenizer
        .train(&mut trainer, docs)
        .map_err(|e| LoaderError::Training(e.to_string()))?;
    if documents == 0 {
        return Err(LoaderError::empty_corpus(&shards));
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LoaderError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tokenizer: tokenizers::Tokenizer = tokenizer.into();
    tokenizer
        .save(out, false)
        .map_err(|e| LoaderError::Training(format!("cannot write {}: {e}", out.display())))?;
    Ok(TrainReport {
        documents,
        vocab_size: tokenizer.get_vocab_size(true),
    })
}
