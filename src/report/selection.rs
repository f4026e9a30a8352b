//! The token-selection view: documents scored by a reference and a current model, packed and
//! selected as in training (batch scope) by every score rule, written as a page where every
//! token shows what the chosen rule keeps (SLM's excess loss first) and its losses. The demo's `selection.html` and `rho report --selection` for any
//! checkpoint and data.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rho_trainer::selection::{random_key, select_keyed, Losses};
use rho_trainer::{Scope, ScoreRule};

use crate::synth::Doc;

/// How documents are packed and selected.
#[derive(Debug, Clone)]
pub struct Packing {
    /// Share of tokens kept.
    pub ratio: f64,
    /// Rows of a batch.
    pub rows: usize,
    /// Target positions of a row.
    pub len: usize,
    /// Batches scored at most.
    pub batches: usize,
}

/// The rules the view compares, in the order of [`Scored::kept`]: SLM's first.
pub const RULES: [ScoreRule; 4] = [
    ScoreRule::Excess,
    ScoreRule::Reference,
    ScoreRule::Current,
    ScoreRule::Random,
];

/// One scored target token.
#[derive(Clone, Copy, Debug)]
pub struct Scored {
    /// Its reference loss.
    pub reference: f32,
    /// Its loss under the current model.
    pub current: f32,
    /// Whether each rule of [`RULES`] keeps it.
    pub kept: [bool; RULES.len()],
}

impl Scored {
    /// Kept by excess loss (SLM).
    pub fn by_excess(&self) -> bool {
        self.kept[0]
    }
}

/// Documents tokenized as one stream and scored.
pub struct ScoredDocs {
    /// `(document, byte start, byte end)` of every token.
    pub origin: Vec<(usize, usize, usize)>,
    /// Each token's scores, when it was a target of a scored batch.
    pub scored: Vec<Option<Scored>>,
    /// Documents that went into the stream.
    pub used_docs: usize,
}

/// Tokenizes `docs` as the loader packs them, scores `packing.batches` batches with both models
/// and selects by every rule of [`RULES`] (batch `b`'s random key is `random_key(0, b)`).
pub fn score_docs(
    tokenizer: &Path,
    reference: &Path,
    current: &Path,
    docs: &[Doc],
    packing: &Packing,
) -> anyhow::Result<ScoredDocs> {
    let tk = crate::runtime::load_tokenizer(tokenizer)?;
    let device = Device::Cpu;
    let reference = rho_model::checkpoint::load(reference, &device, DType::F32)?;
    let current = rho_model::checkpoint::load(current, &device, DType::F32)?;
    let (rows, len) = (packing.rows, packing.len);
    let need = packing.batches * rows * len + 1;
    let (mut ids, mut origin, mut used_docs) = (Vec::new(), Vec::new(), 0);
    for (d, doc) in docs.iter().enumerate() {
        if ids.len() >= need {
            break;
        }
        let enc = tk
            .encode(doc.text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing document {d}: {e}"))?;
        for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            origin.push((d, s, e));
        }
        used_docs = d + 1;
    }
    let batches = (ids.len().saturating_sub(1) / len / rows).min(packing.batches);
    anyhow::ensure!(
        batches > 0,
        "too few tokens for one batch of {rows} x {len}: {} tokens in {} documents",
        ids.len(),
        docs.len()
    );
    let mut scored: Vec<Option<Scored>> = vec![None; ids.len()];
    for b in 0..batches {
        let mut window = Vec::with_capacity(rows * (len + 1));
        for r in 0..rows {
            let start = (b * rows + r) * len;
            window.extend_from_slice(&ids[start..start + len + 1]);
        }
        let t = Tensor::from_vec(window, (rows, len + 1), &device)?;
        let loss = |m| -> anyhow::Result<Vec<f32>> {
            let l = rho_model::per_token_loss(m, &t, rho_model::ForwardMode::Fused, None)?;
            Ok(l.flatten_all()?.to_vec1::<f32>()?)
        };
        let (l_ref, l_cur) = (loss(&reference)?, loss(&current)?);
        let valid = vec![true; rows * len];
        let losses = Losses {
            rows,
            len,
            current: &l_cur,
            reference: Some(&l_ref),
            valid: &valid,
        };
        let masks = RULES.map(|rule| {
            let key = random_key(0, b as u64);
            select_keyed(rule, Scope::Batch, packing.ratio, &losses, key)
        });
        for i in 0..rows * len {
            let target = (b * rows + i / len) * len + i % len + 1;
            scored[target] = Some(Scored {
                reference: l_ref[i],
                current: l_cur[i],
                kept: std::array::from_fn(|r| masks[r][i] != 0.0),
            });
        }
    }
    Ok(ScoredDocs {
        origin,
        scored,
        used_docs,
    })
}

/// HTML-escapes text.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = r#"<style>
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.5; }
.doc { font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc; padding: 1em; }
.doc span { color: #777; }
.noise { text-decoration: underline wavy #c00; }
.easy { text-decoration: underline dotted #36c; }
.legend span { padding: 0 .3em; }
"#;

/// The style that colors what rule `r` keeps, when the page shows rule `r` (class `show-r`
/// on the body; SLM's rule, 0, without a script).
fn rule_style() -> String {
    let mut css = String::new();
    for r in 0..RULES.len() {
        let shown = format!("body.show-{r} .doc span.k{r}");
        let selector = if r == 0 {
            format!("body:not([class^=show-]) .doc span.k0, {shown}")
        } else {
            shown
        };
        let _ = writeln!(
            css,
            "{selector} {{ color: inherit; background: rgba(34,139,34,var(--a)); }}"
        );
    }
    css
}

/// A menu that switches which rule's selection the page colors.
fn rule_menu() -> String {
    let mut html = String::from(
        "<p>Show what is kept by: <select onchange=\"document.body.className='show-'+this.value\">",
    );
    for (r, rule) in RULES.iter().enumerate() {
        let what = match rule {
            ScoreRule::Excess => "excess loss (SLM): model loss minus reference loss",
            ScoreRule::Reference => "reference loss alone (lowest first)",
            ScoreRule::Current => "the model's own loss (highest first)",
            ScoreRule::Random => "a random choice (the control)",
            ScoreRule::None => "every token",
        };
        let _ = write!(
            html,
            "<option value=\"{r}\">{}: {what}</option>",
            rule.name()
        );
    }
    html.push_str("</select></p>\n");
    html
}

/// The page: `intro` (HTML), then up to `max_docs` documents (only those with noise labels,
/// when `noisy_only`), each token colored by what SLM keeps.
pub fn page(
    docs: &[Doc],
    sd: &ScoredDocs,
    intro: &str,
    max_docs: usize,
    noisy_only: bool,
) -> String {
    let labels = docs.iter().any(|d| !d.noise.is_empty());
    let easy = docs.iter().any(|d| !d.easy.is_empty());
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>rho: which tokens SLM trains on</title>\n{STYLE}{}</style></head><body>\n<h1>Which tokens SLM trains on</h1>\n{}<p class=\"legend\">Green: kept by the rule shown (darker: larger excess loss, model loss minus reference loss). Grey: left out.{}{} Hover a token for its losses.</p>\n{intro}\n",
        rule_style(),
        rule_menu(),
        if labels {
            " <span class=\"noise\">Wavy red underline</span>: noise the corpus generator inserted (ids, hashes, tracking URLs, boilerplate, shuffled text, wrong results)."
        } else {
            ""
        },
        if easy {
            " <span class=\"easy\">Dotted blue underline</span>: easy text of the target distribution (counting, tables, quoted statements), learned at once."
        } else {
            ""
        }
    );
    let max_excess = sd
        .scored
        .iter()
        .flatten()
        .map(|s| s.current - s.reference)
        .filter(|x| x.is_finite())
        .fold(0f32, f32::max)
        .max(1e-6);
    let (mut shown, mut i) = (0, 0);
    for (d, doc) in docs.iter().enumerate().take(sd.used_docs) {
        let start = i;
        while i < sd.origin.len() && sd.origin[i].0 == d {
            i += 1;
        }
        let unscored = !sd.scored[start..i].iter().any(Option::is_some);
        let skip = (noisy_only && doc.noise.is_empty()) || unscored;
        if skip || shown >= max_docs {
            continue;
        }
        shown += 1;
        let _ = write!(html, "<h3>Document {d}</h3><div class=\"doc\">");
        document(&mut html, doc, sd, start..i, max_excess);
        html.push_str("</div>\n");
    }
    html.push_str("</body></html>\n");
    html
}

/// One document's tokens as spans.
fn document(
    html: &mut String,
    doc: &Doc,
    sd: &ScoredDocs,
    tokens: std::ops::Range<usize>,
    max_excess: f32,
) {
    let mut cursor = 0;
    for j in tokens {
        let (_, s, e) = sd.origin[j];
        let (s, e) = (s.max(cursor), e.max(cursor));
        // Offsets leave out the spaces a byte-level token carries: write them as they are.
        html.push_str(&escape(&doc.text[cursor..s]));
        let text = &doc.text[s..e];
        cursor = e;
        let noisy = doc.noise_kind(s, e);
        let mut classes = vec![];
        if noisy.is_some() {
            classes.push("noise".to_string());
        }
        if doc.is_easy(s, e) {
            classes.push("easy".to_string());
        }
        let (style, title) = match sd.scored[j] {
            Some(sc) => {
                let excess = sc.current - sc.reference;
                let alpha = 0.15 + 0.75 * (excess / max_excess).clamp(0.0, 1.0);
                if sc.by_excess() {
                    classes.push("kept".to_string());
                }
                let kept_by: Vec<&str> = RULES
                    .iter()
                    .zip(sc.kept)
                    .filter(|(_, k)| *k)
                    .map(|(r, _)| r.name())
                    .collect();
                classes.extend(
                    (0..RULES.len())
                        .filter(|&r| sc.kept[r])
                        .map(|r| format!("k{r}")),
                );
                let title = format!(
                    "reference {:.2} | model {:.2} | excess {:+.2} | kept by: {}{}",
                    sc.reference,
                    sc.current,
                    excess,
                    if kept_by.is_empty() {
                        "none".to_string()
                    } else {
                        kept_by.join(", ")
                    },
                    noisy.map_or(String::new(), |k| format!(" | noise: {}", k.name()))
                );
                (format!("--a: {alpha:.2}"), title)
            }
            None => (String::new(), "not scored".into()),
        };
        let _ = write!(
            html,
            "<span class=\"{}\" style=\"{style}\" title=\"{}\">{}</span>",
            classes.join(" "),
            escape(&title),
            escape(text)
        );
    }
    html.push_str(&escape(&doc.text[cursor..]));
}

/// What `rho report --selection` reads.
#[derive(Args, Debug, Clone)]
pub struct SelectionArgs {
    /// The reference model (a HuggingFace checkpoint directory).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// The current model: the one being trained (a HuggingFace checkpoint directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A shard (parquet or jsonl) of documents to show.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// The `tokenizer.json` both models use.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Share of tokens SLM keeps.
    #[arg(long, default_value_t = 0.6)]
    pub ratio: f64,
    /// Positions of a packed row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Rows of a batch (selection is over a batch, as in training).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Batches scored.
    #[arg(long, default_value_t = 2)]
    pub batches: usize,
    /// Documents shown.
    #[arg(long, default_value_t = 12)]
    pub documents: usize,
    /// Column or key holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
}

/// `rho report --selection`: `selection.html` in `out` for a user's own checkpoints and data.
pub fn run(a: &SelectionArgs, out: &Path) -> anyhow::Result<PathBuf> {
    let need = |v: &Option<PathBuf>, flag: &str| {
        v.clone()
            .with_context(|| format!("`rho report --selection` needs {flag}"))
    };
    let (reference, model) = (
        need(&a.reference, "--reference DIR")?,
        need(&a.model, "--model DIR")?,
    );
    let (input, tokenizer) = (
        need(&a.input, "--input SHARD")?,
        need(&a.tokenizer, "--tokenizer FILE")?,
    );
    anyhow::ensure!(
        a.ratio > 0.0 && a.ratio <= 1.0,
        "--ratio must be in (0, 1], got {}",
        a.ratio
    );
    anyhow::ensure!(
        a.seq_len > 0 && a.batch_size > 0 && a.batches > 0,
        "--seq-len, --batch-size and --batches must be at least 1"
    );
    let docs = read_docs(&input, &a.text_field, a.batches * a.batch_size * a.seq_len)?;
    let packing = Packing {
        ratio: a.ratio,
        rows: a.batch_size,
        len: a.seq_len,
        batches: a.batches,
    };
    let sd = score_docs(&tokenizer, &reference, &model, &docs, &packing)?;
    let kept = sd.scored.iter().flatten().filter(|s| s.by_excess()).count();
    let total = sd.scored.iter().flatten().count();
    let intro = format!(
        "<p>Reference: <code>{}</code>. Current model: <code>{}</code>. Documents of <code>{}</code>; selection of the top {:.0}% by excess loss over batches of {} x {} tokens, as in training: {kept} of {total} tokens kept.</p>",
        escape(&reference.display().to_string()),
        escape(&model.display().to_string()),
        escape(&input.display().to_string()),
        a.ratio * 100.0,
        a.batch_size,
        a.seq_len,
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("selection.html");
    std::fs::write(&path, page(&docs, &sd, &intro, a.documents, false))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The documents of a shard, until they hold about `tokens` bytes more than needed (a token is
/// at least a byte); bad rows are skipped.
fn read_docs(path: &Path, text_field: &str, tokens: usize) -> anyhow::Result<Vec<Doc>> {
    use rho_loader::sources::{self, Event};
    let shard = sources::Shard {
        path: path.to_path_buf(),
        format: sources::Format::from_path(path)
            .with_context(|| format!("{}: not a parquet or jsonl shard", path.display()))?,
    };
    let events = sources::open(&shard, text_field);
    let (mut docs, mut bytes) = (Vec::new(), 0);
    for event in events {
        if let Event::Doc { text, .. } = event {
            bytes += text.len();
            docs.push(Doc {
                text,
                ..Doc::default()
            });
            if bytes > tokens * 8 {
                break;
            }
        }
    }
    anyhow::ensure!(
        !docs.is_empty(),
        "{}: no document with text",
        path.display()
    );
    Ok(docs)
}
