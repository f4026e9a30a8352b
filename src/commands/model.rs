//! `rho score` and `rho model ...`: model tools that need no pipeline.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Tensor;
use clap::{Args, Subcommand};
use rho_model::{checkpoint, per_token_loss, ForwardMode, HfConfig};

#[derive(Args)]
pub struct ScoreArgs {
    /// A HuggingFace checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The tokenizer for --text and --input (default: the model directory's tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Score this text (one row).
    #[arg(long, conflicts_with_all = ["input", "ids"])]
    pub text: Option<String>,
    /// Score every document of this shard (one row each).
    #[arg(long, conflicts_with = "ids")]
    pub input: Option<String>,
    /// Score these token ids: a JSON array of rows of ids.
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Print `{"per_token_loss": [[...], ...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Text is encoded with the tokenizer's own special tokens (as `tokenizer(text)` does in
    /// transformers); pass this to leave them out.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: rho_model::DeviceSpec,
    /// The dtype the model runs in: `f32`, `f16` (CPU or GPU) or `bf16` (GPU); losses are
    /// accumulated and printed in f32 whatever it is.
    #[arg(long, default_value = "f32")]
    pub dtype: rho_model::DTypeSpec,
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialized checkpoint (config.json + model.safetensors).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// `tiny` (2 layers, hidden 64), `small` (4 layers, hidden 128), `20m` (8 layers, hidden
        /// 384), `60m` (8 layers, hidden 512) or `1b` (TinyLlama-1.1B's shape: 22 layers, hidden
        /// 2048, 4 key-value heads).
        #[arg(long, default_value = "tiny")]
        preset: rho_model::Preset,
        /// Vocabulary size; default: the size of --tokenizer's vocabulary.
        #[arg(long)]
        vocab_size: Option<usize>,
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        max_positions: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Init {
            out,
            preset,
            vocab_size,
            tokenizer,
            max_positions,
            seed,
        } => {
            let vocab = match (vocab_size, &tokenizer) {
                (Some(v), _) => v,
                (None, Some(t)) => crate::runtime::load_tokenizer(t)?.get_vocab_size(true),
                (None, None) => bail!("give --vocab-size or --tokenizer"),
            };
            let config = preset.hf_config(vocab, max_positions);
            init_checkpoint(&out, &config, seed)?;
            if let Some(t) = tokenizer {
                std::fs::copy(&t, out.join("tokenizer.json"))
                    .with_context(|| format!("copying {}", t.display()))?;
            }
            eprintln!(
                "wrote a `{preset}` model with a vocabulary of {vocab} to {}",
                out.display()
            );
            Ok(())
        }
    }
}

/// The `config.json` of a preset size (see [`rho_model::Preset`]).
pub fn preset_config(
    preset: &str,
    vocab: usize,
    max_positions: usize,
) -> anyhow::Result<serde_json::Value> {
    let preset: rho_model::Preset = preset.parse().map_err(anyhow::Error::msg)?;
    Ok(preset.hf_config(vocab, max_positions))
}

/// Writes a randomly initialized checkpoint for a `config.json`.
pub fn init_checkpoint(
    out: &std::path::Path,
    config: &serde_json::Value,
    seed: u64,
) -> anyhow::Result<()> {
    let parsed = HfConfig::from_json(&config.to_string())?.into_config()?;
    let weights = rho_model::init::random_weights(&parsed, seed, &candle_core::Device::Cpu)?;
    checkpoint::save(out, config, &weights, None)?;
    Ok(())
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let dtype = args.dtype.on(args.device)?;
    let device = args.device.open()?;
    let model = checkpoint::load(&args.model, &device, dtype)?;
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let load_tokenizer = || crate::runtime::load_tokenizer(&tokenizer_path);
    let (rows, tokenizer) = score_rows(&args, &load_tokenizer)?;
    let max = model.config().max_position_embeddings;
    let mut all = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if row.len() < 2 {
            all.push(Vec::new());
            continue;
        }
        if row.len() > max {
            bail!(
                "row {i} has {} tokens; the model takes at most {max}",
                row.len()
            );
        }
        let ids = Tensor::from_slice(row, (1, row.len()), &device)?;
        let losses = per_token_loss(&model, &ids, ForwardMode::Fused, None)
            .with_context(|| format!("row {i}"))?;
        all.push(losses.squeeze(0)?.to_vec1::<f32>()?);
    }
    if args.json {
        println!("{}", serde_json::json!({ "per_token_loss": all }));
        return Ok(());
    }
    let tk = match tokenizer {
        Some(t) => Some(t),
        None => load_tokenizer().ok(),
    };
    // A reader that stops early (`| head`) is not an error.
    let out = loss_table(&rows, &all, tk.as_ref());
    match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The token rows `rho score` scores: `--text` or every document of `--input` tokenized (by
/// the tokenizer `load` loads, returned with them), or `--ids` as written.
fn score_rows(
    args: &ScoreArgs,
    load: &dyn Fn() -> anyhow::Result<tokenizers::Tokenizer>,
) -> anyhow::Result<(Vec<Vec<u32>>, Option<tokenizers::Tokenizer>)> {
    let special = !args.no_special_tokens;
    let encode = |tk: &tokenizers::Tokenizer, text: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tk
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    };
    if let Some(text) = &args.text {
        let tk = load()?;
        Ok((vec![encode(&tk, text)?], Some(tk)))
    } else if let Some(input) = &args.input {
        let tk = load()?;
        let data = rho_loader::DataConfig::new(vec![input.clone()]);
        let mut rows = Vec::new();
        for shard in rho_loader::sources::discover(&data)? {
            for event in rho_loader::sources::open(&shard, "text") {
                if let rho_loader::sources::Event::Doc { text, .. } = event {
                    rows.push(encode(&tk, &text)?);
                }
            }
        }
        Ok((rows, Some(tk)))
    } else if let Some(path) = &args.ids {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rows = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON array of rows of token ids",
                path.display()
            )
        })?;
        Ok((rows, None))
    } else {
        bail!("give one of --text, --input or --ids");
    }
}

/// Each row's tokens with the loss of predicting each (`-` for the first), under a line with
/// the row's mean.
fn loss_table(rows: &[Vec<u32>], all: &[Vec<f32>], tk: Option<&tokenizers::Tokenizer>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (i, (row, losses)) in rows.iter().zip(all).enumerate() {
        let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
        let _ = writeln!(out, "# row {i}: {} tokens, mean loss {mean:.4}", row.len());
        for (t, id) in row.iter().enumerate() {
            let token = tk
                .and_then(|k| k.id_to_token(*id))
                .unwrap_or_else(|| id.to_string());
            match t.checked_sub(1).and_then(|p| losses.get(p)) {
                Some(l) => {
                    let _ = writeln!(out, "{token:>20}\t{l:.4}");
                }
                None => {
                    let _ = writeln!(out, "{token:>20}\t-");
                }
            }
        }
    }
    out
}
