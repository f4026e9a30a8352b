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
use rho_model::DecoderLm;
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
    let scorer = DocScorer::load(&a, rule)?;
    let mut data = rho_loader::DataConfig::new(a.input.clone());
    data.text_field = a.text_field.clone();
    let shards = sources::discover(&data)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let progress = indicatif::ProgressBar::new_spinner();
    let mut out = Output::new(&a);
    for shard in &shards {
        for event in sources::open(shard, &a.text_field) {
            let (row, text) = match event {
                Event::Doc { row, text } => (row, text),
                Event::Skip { row, reason } => {
                    out.skipped += 1;
                    tracing::warn!(shard = %shard.path.display(), row, ?reason, "row skipped");
                    continue;
                }
                Event::Damage { row, reason } => {
                    tracing::warn!(shard = %shard.path.display(), ?row, %reason, "damaged shard");
                    continue;
                }
            };
            let doc = scorer
                .concentrate(&text)
                .with_context(|| format!("{} row {row}", shard.path.display()))?;
            out.push(shard, row, &text, doc)?;
            progress.set_message(format!(
                "concentrate: {} documents, {} of {} tokens selected",
                out.docs, out.kept, out.tokens
            ));
            progress.tick();
        }
    }
    out.flush()?;
    progress.finish_and_clear();
    let report = out.report(&shards);
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "concentrated {} documents: {} of {} tokens selected ({:.1}%); text {:.1}% of its size ({} of {} bytes); {} files in {}",
        report.documents,
        report.selected_tokens,
        report.target_tokens,
        report.selected_fraction * 100.0,
        report.text_size_ratio * 100.0,
        report.text_bytes_out,
        report.text_bytes_in,
        report.files.len(),
        a.out.display()
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What scores a document: the tokenizer, the reference and (for `excess`) the model, the rule
/// and the trainer's selection.
struct DocScorer<'a> {
    args: &'a ConcentrateArgs,
    rule: ScoreRule,
    tokenizer: tokenizers::Tokenizer,
    reference: DecoderLm,
    current: Option<DecoderLm>,
}

/// One document concentrated: its tokens, which of them were selected (token 0 never), the
/// selected text, and the count of target tokens.
struct Concentrated {
    ids: Vec<u32>,
    mask: Vec<u8>,
    text: String,
    targets: usize,
}

impl<'a> DocScorer<'a> {
    fn load(args: &'a ConcentrateArgs, rule: ScoreRule) -> anyhow::Result<Self> {
        let tokenizer = crate::runtime::load_tokenizer(&args.tokenizer)?;
        let device = Device::Cpu;
        let reference = rho_model::checkpoint::load(&args.reference, &device, DType::F32)
            .with_context(|| format!("loading the reference {}", args.reference.display()))?;
        let current = match (rule, &args.model) {
            (ScoreRule::Excess, Some(m)) => Some(
                rho_model::checkpoint::load(m, &device, DType::F32)
                    .with_context(|| format!("loading the model {}", m.display()))?,
            ),
            (ScoreRule::Excess, None) => anyhow::bail!("--score excess needs --model"),
            _ => None,
        };
        Ok(DocScorer {
            args,
            rule,
            tokenizer,
            reference,
            current,
        })
    }

    /// Tokenizes and scores one document and keeps the top `ratio` of its targets by the rule.
    fn concentrate(&self, text: &str) -> anyhow::Result<Concentrated> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids = enc.get_ids().to_vec();
        let seq_len = self.args.seq_len;
        let l_ref = rho_model::loss::document_losses(&self.reference, &ids, seq_len)?;
        let l_cur = match &self.current {
            Some(m) => rho_model::loss::document_losses(m, &ids, seq_len)?,
            None => vec![0.0; l_ref.len()],
        };
        let n = l_ref.len();
        let selected = rho_trainer::selection::select(
            self.rule,
            Scope::Batch,
            self.args.ratio,
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
        let text = self.selected_text(&ids, &mask);
        Ok(Concentrated {
            ids,
            mask,
            text,
            targets: n,
        })
    }

    /// Each run of consecutive selected tokens, decoded, one per line.
    fn selected_text(&self, ids: &[u32], mask: &[u8]) -> String {
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if mask[i] == 0 {
                i += 1;
                continue;
            }
            let j = (i..ids.len()).find(|&j| mask[j] == 0).unwrap_or(ids.len());
            spans.push(self.tokenizer.decode(&ids[i..j], false).unwrap_or_default());
            i = j;
        }
        spans.join("\n")
    }
}

/// The concentrated shards being written, and the counts of the report.
struct Output<'a> {
    args: &'a ConcentrateArgs,
    rows: Vec<Row>,
    cols: Vec<TokenColumns>,
    files: Vec<PathBuf>,
    docs: u64,
    skipped: u64,
    tokens: u64,
    kept: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl<'a> Output<'a> {
    fn new(args: &'a ConcentrateArgs) -> Self {
        Output {
            args,
            rows: Vec::new(),
            cols: Vec::new(),
            files: Vec::new(),
            docs: 0,
            skipped: 0,
            tokens: 0,
            kept: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Adds document `row` of `shard` (its original `text`), writing a shard when one is full.
    fn push(
        &mut self,
        shard: &sources::Shard,
        row: u64,
        text: &str,
        doc: Concentrated,
    ) -> anyhow::Result<()> {
        let a = self.args;
        let (n, k) = (
            doc.targets,
            doc.mask.iter().filter(|&&m| m == 1).count() as u64,
        );
        self.docs += 1;
        self.tokens += n as u64;
        self.kept += k;
        self.bytes_in += text.len() as u64;
        self.bytes_out += doc.text.len() as u64;
        self.rows.push(Row {
            url: format!("{}#{row}", shard.path.display()),
            text: Some(doc.text),
            date: String::new(),
            metadata: json!({"rho_concentrate": {
                "source": shard.path, "row": row, "score": a.score, "ratio": a.ratio,
                "tokens": n, "selected": k, "text_bytes": text.len(),
            }})
            .to_string(),
        });
        self.cols.push(TokenColumns {
            token_ids: doc.ids,
            mask: doc.mask,
        });
        if self.rows.len() >= a.docs_per_shard {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the documents held as the next shard, if any.
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let path = self
            .args
            .out
            .join(format!("concentrated-{:05}.parquet", self.files.len()));
        sources::write_shard_with_tokens(&path, &self.rows, &self.cols, 256)
            .with_context(|| format!("writing {}", path.display()))?;
        self.files.push(path);
        self.rows.clear();
        self.cols.clear();
        Ok(())
    }

    /// The report of everything written, from the input `shards`.
    fn report(&self, shards: &[sources::Shard]) -> Report {
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        Report {
            documents: self.docs,
            rows_skipped: self.skipped,
            target_tokens: self.tokens,
            selected_tokens: self.kept,
            selected_fraction: ratio(self.kept, self.tokens),
            text_bytes_in: self.bytes_in,
            text_bytes_out: self.bytes_out,
            text_size_ratio: ratio(self.bytes_out, self.bytes_in),
            shard_bytes_in: shards.iter().map(|s| size(&s.path)).sum(),
            shard_bytes_out: self.files.iter().map(|f| size(f)).sum(),
            score: self.args.score.clone(),
            ratio: self.args.ratio,
            files: self.files.clone(),
        }
    }
}
