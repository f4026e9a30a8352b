//! `rho concentrate`: the tokens a scoring rule selects, kept as a smaller dataset.
//!
//! Every document of the input shards is tokenized and scored (reference loss, and with
//! `--score excess` the loss of `--model` too); within each document the top `ratio` of its
//! target tokens by the rule's score are kept, with the selection of the trainer
//! (`rho_trainer::selection`). The output is parquet in the OpenWebMath schema plus two
//! per-token columns: `text` holds the selected spans (runs of consecutive selected tokens,
//! decoded, one per line), `token_ids` every token of the document and `mask` which of them
//! were selected (the first token, which nothing predicts, is never selected). docs/CACHE.md
//! says what this loses compared with online selection.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use rho_loader::sources::{self, Event, Row, TokenColumns};
use rho_trainer::selection::Losses;
use rho_trainer::{Scope, ScoreRule};
use serde_json::json;

#[derive(Args)]
pub struct ConcentrateArgs {
    /// Shard files, directories or globs (parquet or jsonl).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// Column or key holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The reference model (a HuggingFace checkpoint directory).
    #[arg(long)]
    pub reference: PathBuf,
    /// The model whose excess loss ranks tokens (with `--score excess`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `reference` (lowest reference loss first) or `excess` (model loss minus reference loss).
    #[arg(long, default_value = "reference")]
    pub score: String,
    /// Share of each document's tokens to keep.
    #[arg(long, default_value_t = 0.6)]
    pub ratio: f64,
    /// Tokens per scoring window.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Documents per output shard.
    #[arg(long, default_value_t = 10_000)]
    pub docs_per_shard: usize,
    #[arg(long)]
    pub out: PathBuf,
}

/// `report.json` of a concentrated dataset (also printed on stdout).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub documents: u64,
    pub rows_skipped: u64,
    /// Target tokens scored.
    pub target_tokens: u64,
    pub selected_tokens: u64,
    pub selected_fraction: f64,
    pub text_bytes_in: u64,
    pub text_bytes_out: u64,
    pub text_size_ratio: f64,
    pub shard_bytes_in: u64,
    pub shard_bytes_out: u64,
    /// The scoring rule.
    pub score: String,
    pub ratio: f64,
    /// The shards written.
    pub files: Vec<PathBuf>,
}

/// Runs `rho concentrate`.
pub fn run(a: ConcentrateArgs) -> anyhow::Result<()> {
    let rule = match a.score.as_str() {
        "reference" => ScoreRule::Reference,
        "excess" => ScoreRule::Excess,
        other => anyhow::bail!("--score must be `reference` or `excess`, got `{other}`"),
    };
    if !(0.0..=1.0).contains(&a.ratio) {
        anyhow::bail!("--ratio must be within 0..=1, got {}", a.ratio);
    }
    let tk = crate::runtime::load_tokenizer(&a.tokenizer)?;
    let device = Device::Cpu;
    let reference = rho_model::checkpoint::load(&a.reference, &device, DType::F32)
        .with_context(|| format!("loading the reference {}", a.reference.display()))?;
    let current = match (rule, &a.model) {
        (ScoreRule::Excess, Some(m)) => Some(
            rho_model::checkpoint::load(m, &device, DType::F32)
                .with_context(|| format!("loading the model {}", m.display()))?,
        ),
        (ScoreRule::Excess, None) => anyhow::bail!("--score excess needs --model"),
        _ => None,
    };
    let shards = sources::discover(&rho_loader::DataConfig {
        paths: a.input.clone(),
        text_field: a.text_field.clone(),
        format: rho_loader::FormatChoice::Auto,
    })?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let progress = indicatif::ProgressBar::new_spinner();
    let (mut docs, mut skipped, mut tokens, mut kept) = (0u64, 0u64, 0u64, 0u64);
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let mut rows: Vec<Row> = Vec::new();
    let mut cols: Vec<TokenColumns> = Vec::new();
    let mut files = Vec::new();
    let flush = |rows: &mut Vec<Row>,
                 cols: &mut Vec<TokenColumns>,
                 files: &mut Vec<PathBuf>|
     -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = a
            .out
            .join(format!("concentrated-{:05}.parquet", files.len()));
        sources::write_shard_with_tokens(&path, rows, cols, 256)
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
        rows.clear();
        cols.clear();
        Ok(())
    };
    for shard in &shards {
        for event in sources::open(shard, &a.text_field) {
            let (row, text) = match event {
                Event::Doc { row, text } => (row, text),
                Event::Skip { row, reason } => {
                    skipped += 1;
                    tracing::warn!(shard = %shard.path.display(), row, ?reason, "row skipped");
                    continue;
                }
                Event::Damage { row, reason } => {
                    tracing::warn!(shard = %shard.path.display(), ?row, %reason, "damaged shard");
                    continue;
                }
            };
            let enc = tk
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("{} row {row}: {e}", shard.path.display()))?;
            let ids = enc.get_ids().to_vec();
            let l_ref = rho_model::loss::document_losses(&reference, &ids, a.seq_len)?;
            let l_cur = match &current {
                Some(m) => rho_model::loss::document_losses(m, &ids, a.seq_len)?,
                None => vec![0.0; l_ref.len()],
            };
            let n = l_ref.len();
            let selected = rho_trainer::selection::select(
                rule,
                Scope::Batch,
                a.ratio,
                &Losses {
                    rows: 1,
                    len: n,
                    current: &l_cur,
                    reference: Some(&l_ref),
                    valid: &vec![true; n],
                },
            );
            // Token 0 is never a target: mask[i + 1] is target i's selection.
            let mask: Vec<u8> = std::iter::once(0)
                .chain(selected.iter().map(|&m| u8::from(m != 0.0)))
                .take(ids.len())
                .collect();
            // The selected text: each run of consecutive selected tokens, decoded.
            let mut spans = Vec::new();
            let mut i = 0;
            while i < ids.len() {
                if mask[i] == 0 {
                    i += 1;
                    continue;
                }
                let j = (i..ids.len()).find(|&j| mask[j] == 0).unwrap_or(ids.len());
                spans.push(tk.decode(&ids[i..j], false).unwrap_or_default());
                i = j;
            }
            let selected_text = spans.join("\n");
            let k = mask.iter().filter(|&&m| m == 1).count() as u64;
            docs += 1;
            tokens += n as u64;
            kept += k;
            bytes_in += text.len() as u64;
            bytes_out += selected_text.len() as u64;
            rows.push(Row {
                url: format!("{}#{row}", shard.path.display()),
                text: Some(selected_text),
                date: String::new(),
                metadata: json!({"rho_concentrate": {
                    "source": shard.path, "row": row, "score": a.score, "ratio": a.ratio,
                    "tokens": n, "selected": k, "text_bytes": text.len(),
                }})
                .to_string(),
            });
            cols.push(TokenColumns {
                token_ids: ids,
                mask,
            });
            if rows.len() >= a.docs_per_shard {
                flush(&mut rows, &mut cols, &mut files)?;
            }
            progress.set_message(format!(
                "concentrate: {docs} documents, {kept} of {tokens} tokens selected"
            ));
            progress.tick();
        }
    }
    flush(&mut rows, &mut cols, &mut files)?;
    progress.finish_and_clear();
    let out_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let in_bytes: u64 = shards
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    let report = Report {
        documents: docs,
        rows_skipped: skipped,
        target_tokens: tokens,
        selected_tokens: kept,
        selected_fraction: ratio(kept, tokens),
        text_bytes_in: bytes_in,
        text_bytes_out: bytes_out,
        text_size_ratio: ratio(bytes_out, bytes_in),
        shard_bytes_in: in_bytes,
        shard_bytes_out: out_bytes,
        score: a.score.clone(),
        ratio: a.ratio,
        files: files.clone(),
    };
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "concentrated {docs} documents: {kept} of {tokens} tokens selected ({:.1}%); text {:.1}% of its size ({bytes_out} of {bytes_in} bytes); {} files in {}",
        report.selected_fraction * 100.0,
        report.text_size_ratio * 100.0,
        files.len(),
        a.out.display()
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
