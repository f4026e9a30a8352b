//! `rho tokenizer ...`: tokenizer tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on shards.
    Train {
        /// Shard files, directories or globs.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<String>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Column or key holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Train on at most this many documents.
        #[arg(long)]
        max_docs: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a tokenizer command.
pub fn run(cmd: TokenizerCommand) -> anyhow::Result<()> {
    let TokenizerCommand::Train {
        input,
        vocab_size,
        text_field,
        max_docs,
        out,
    } = cmd;
    let data = rho_loader::DataConfig {
        paths: input,
        text_field,
        format: rho_loader::FormatChoice::Auto,
    };
    let report = rho_loader::train::train_bpe(&data, vocab_size, max_docs, &out)
        .with_context(|| format!("training a tokenizer into {}", out.display()))?;
    eprintln!(
        "trained a byte-level BPE of {} tokens on {} documents: {}",
        report.vocab_size,
        report.documents,
        out.display()
    );
    Ok(())
}
