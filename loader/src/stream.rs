//! The batch stream: shards -> documents -> token runs -> windows -> shuffled blocks -> batches,
//! deterministic for (config, seed, data), and able to start at any batch.
//!
//! Global window `g` (over all epochs) lives in epoch `e` at position `w`; batch `n` holds global
//! windows `[n * B, (n + 1) * B)` (the very last batch may hold fewer rows). Within an epoch,
//! window `w` belongs to block `w / S` (S = `shuffle_window`), whose windows are emitted in a
//! seeded permutation. To start at batch `n`, the loader finds the shard where `n`'s block
//! starts from the shard index (token counts), re-tokenizes only that shard's beginning, and
//! discards the tokens and windows before the block and batch.

use std::sync::Arc;

use rayon::prelude::*;
use rho_protocol::{Corpus, Fingerprint, StreamIdentity, TokenBatch};

use crate::config::{LoaderConfig, RankStride};
use crate::index::ShardIndex;
use crate::metrics::Metrics;
use crate::order::{block_order, shard_order};
use crate::pack::{Packer, Window};
use crate::sources::{self, Event, Shard, SkipReason};
use crate::tokenize::{Segment, TextTokenizer};
use crate::{LoaderError, Result};

/// Whether a consumer of the stream wants more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop the stream here.
    Stop,
}

/// Text bytes handed to the tokenizer pool at once.
const CHUNK_BYTES: usize = 1 << 20;
/// Damaged or skipped rows logged one by one per shard before the log goes quiet.
const LOG_LIMIT: u64 = 20;

/// What the reader thread sends to the tokenizing thread.
enum Read {
    Chunk(Vec<Segment>),
    ShardDone { pos: usize },
}

/// What a scan reports.
enum Scanned<'a> {
    Run { ids: &'a [u32], doc_start: bool },
    ShardDone { pos: usize, tokens: u64 },
}

/// The deterministic batch sequence of a loader config: shards in order, tokenized, packed,
/// shuffled within a window, batched, and for ranks, split batch by batch.
pub struct Stream {
    config: LoaderConfig,
    shards: Vec<Shard>,
    tokenizer: Arc<TextTokenizer>,
    pool: rayon::ThreadPool,
    index: ShardIndex,
    metrics: Arc<Metrics>,
    identity: StreamIdentity,
}

impl Stream {
    /// Discovers this loader's shards, loads the tokenizer and opens the shard index.
    pub fn new(config: &LoaderConfig, metrics: Arc<Metrics>) -> Result<Self> {
        // Every rank reads the whole corpus: the ranks split the one stream batch by batch
        // (see `Batcher`), so that they all end with the same number of batches.
        let shards = sources::discover(&config.data)?;
        let tokenizer = Arc::new(TextTokenizer::load(config)?);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = if config.threads == 0 {
            cores
        } else if config.threads > cores {
            tracing::warn!(
                threads = config.threads,
                cores,
                "`threads` is more than this machine's cores: using {cores}"
            );
            cores
        } else {
            config.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("rho-tokenize-{i}"))
            .build()
            .map_err(|e| LoaderError::ConfigField {
                field: "threads",
                reason: e.to_string(),
            })?;
        let key = format!(
            "{}|bos={:?}|eos={:?}|field={}|max_doc={}",
            tokenizer.fingerprint(),
            config.add_bos.then_some(&config.bos_token),
            config.add_eos.then_some(&config.eos_token),
            config.data.text_field,
            config.max_doc_bytes
        );
        let index = ShardIndex::open(config.state_dir.as_deref(), key);
        let identity = identity(config, tokenizer.fingerprint(), &shards);
        Ok(Stream {
            identity,
            config: config.clone(),
            shards,
            tokenizer,
            pool,
            index,
            metrics,
        })
    }

    /// What shapes this stream; every batch carries it.
    pub fn identity(&self) -> &StreamIdentity {
        &self.identity
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The shards, in the order of the first epoch.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The global sequence number of this loader's `n`-th batch (per-rank loaders interleave).
    pub fn seq_of(&self, n: u64) -> u64 {
        self.config.stride().seq_of(n)
    }

    /// This loader's first batch whose sequence number is `>= seq`.
    pub fn local_of(&self, seq: u64) -> u64 {
        self.config.stride().local_of(seq)
    }

    /// Produces this loader's batches from its `start`-th on, handing each to `emit`. Returns
    /// the number of batches this loader's stream holds when it ran to its end, `None` if `emit`
    /// stopped it.
    ///
    /// With `world` > 1, the stream is the one a single loader would produce, split batch by
    /// batch: global batch `g` goes to rank `g % world`, with sequence number `g`, and the stream
    /// ends for every rank after `floor(G / world)` batches of its own (`G`: global batches), so
    /// that ranks stepping together under data parallelism all end together. The last
    /// `G % world` global batches (fewer than `world`) are dropped, and said so in the log. A
    /// loader of one rank yields that rank's batches; a loader of every rank (`rank` unset)
    /// yields them all, in sequence order, each group of `world` once it is complete.
    pub fn run(&mut self, start: u64, emit: impl FnMut(TokenBatch) -> Flow) -> Result<Option<u64>> {
        self.run_split(self.config.stride(), start, emit)
    }

    /// [`Stream::run`] with the split among the ranks restarted at `stride.origin`: batch
    /// `g >= origin` goes to rank `(g - origin) % world`, and of the batches from the origin on
    /// the last `(G - origin) % world` are dropped. This is what a loader resumed on another
    /// number of ranks issues, and what a fresh loader of that many ranks would issue from the
    /// origin on. `start` counts this loader's batches from the origin (a loader of every rank
    /// counts global sequence numbers; it starts at the origin at the earliest).
    pub fn run_split(
        &mut self,
        stride: RankStride,
        start: u64,
        mut emit: impl FnMut(TokenBatch) -> Flow,
    ) -> Result<Option<u64>> {
        let b = self.config.batch_size.get() as u64;
        let window = self.config.window();
        let s = self.config.shuffle_window.get() as u64;
        // The global batch where the group of `world` holding this loader's `start`-th batch
        // begins; a loader of every rank skips the group's batches before `start`.
        let first_seq = stride.seq_of(start).max(stride.origin);
        let group_start = stride.group_start(first_seq);
        let (mut epoch, mut w0, mut shard_pos, mut token_skip) = if group_start == 0 {
            (0, 0, 0, 0)
        } else {
            self.locate(first_seq, group_start * b)?
        };
        let mut batcher = Batcher {
            rows: Vec::with_capacity(self.config.batch_size.get()),
            first_epoch: 0,
            next: group_start,
            held: Vec::new(),
            batch_size: self.config.batch_size.get(),
            window,
            stride,
            first_seq,
            run_id: self.config.run_id.clone(),
            tokenizer: self.tokenizer.fingerprint().clone(),
            identity: self.identity.clone(),
        };
        let mut produced_any = group_start > 0;
        while epoch < u64::from(self.config.epochs.get()) {
            let order = shard_order(self.shards.len(), self.config.seed, epoch);
            let first_block = w0 / s;
            let mut asm = Assembler {
                seed: self.config.seed,
                epoch,
                shuffle: s as usize,
                block: Vec::with_capacity(s as usize),
                block_index: first_block,
                skip: (w0 - first_block * s) as usize,
                batcher: &mut batcher,
                emit: &mut emit,
                stopped: false,
                metrics: &self.metrics,
            };
            let mut packer = Packer::new(window, token_skip, self.tokenizer.pad_id());
            let positions: Vec<usize> = (shard_pos..order.len()).collect();
            let mut epoch_tokens = 0u64;
            let mut index_updates = Vec::new();
            self.scan(&order, &positions, true, |item| {
                match item {
                    Scanned::Run { ids, doc_start } => {
                        epoch_tokens += ids.len() as u64;
                        packer.push(ids, doc_start, &mut |w| asm.window(w));
                    }
                    Scanned::ShardDone { pos, tokens } => index_updates.push((pos, tokens)),
                }
                if asm.stopped {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            });
            for (pos, tokens) in index_updates {
                self.index.put(&self.shards[order[pos]].path, tokens);
            }
            if asm.stopped {
                return Ok(None);
            }
            packer.finish(&mut |w| asm.window(w));
            asm.flush();
            if asm.stopped {
                return Ok(None);
            }
            produced_any |= epoch_tokens > 0;
            if epoch == 0 && !produced_any {
                return Err(LoaderError::empty_corpus(&self.shards));
            }
            epoch += 1;
            w0 = 0;
            shard_pos = 0;
            token_skip = 0;
        }
        Ok(self.end_split(batcher, &mut emit))
    }

    /// The end of the stream: the batches still held, then the last group's batches that do not
    /// make one for every rank dropped (logged); the local batch count (`None`: `emit` stopped).
    fn end_split(
        &self,
        mut batcher: Batcher,
        emit: &mut impl FnMut(TokenBatch) -> Flow,
    ) -> Option<u64> {
        for batch in batcher.finish() {
            Metrics::add(&self.metrics.batches_produced, 1);
            if emit(batch) == Flow::Stop {
                return None;
            }
        }
        let stride = batcher.stride;
        let (world, end) = (stride.world, stride.group_start(batcher.next));
        for dropped in std::mem::take(&mut batcher.held) {
            let tokens: u64 = dropped.lengths.iter().map(|&l| u64::from(l)).sum();
            tracing::info!(
                seq = dropped.seq,
                tokens,
                global_batches = batcher.next,
                world,
                "dropped a last batch: the stream's last {} batch(es) do not make a batch for every rank, and every rank ends with the same number",
                batcher.next - end
            );
        }
        Some(stride.local_of(end))
    }

    /// Finds where global window `g` starts: (epoch, window in epoch, shard position in the
    /// epoch's order, tokens to skip in that shard to reach the start of `g`'s block).
    fn locate(&mut self, first_seq: u64, mut g: u64) -> Result<(u64, u64, usize, u64)> {
        let window = self.config.window() as u64;
        let s = self.config.shuffle_window.get() as u64;
        let mut total_windows = 0u64;
        for epoch in 0..u64::from(self.config.epochs.get()) {
            let order = shard_order(self.shards.len(), self.config.seed, epoch);
            let block_token = (g / s) * s * window;
            let mut cum = 0u64;
            for pos in 0..order.len() {
                let c = self.count(&order, pos)?;
                if cum + c > block_token {
                    return Ok((epoch, g, pos, block_token - cum));
                }
                cum += c;
            }
            if cum == 0 {
                return Err(LoaderError::empty_corpus(&self.shards));
            }
            let per_epoch = cum.div_ceil(window);
            total_windows += per_epoch;
            g -= per_epoch;
        }
        Err(LoaderError::SeekPastEnd {
            seq: first_seq,
            total: total_windows.div_ceil(self.config.batch_size.get() as u64),
        })
    }

    /// The token count of shard `order[pos]`, from the index or by tokenizing it.
    fn count(&mut self, order: &[usize], pos: usize) -> Result<u64> {
        let path = self.shards[order[pos]].path.clone();
        if let Some(c) = self.index.get(&path) {
            return Ok(c);
        }
        tracing::info!(shard = %path.display(), "counting tokens (not in the shard index)");
        let mut count = 0;
        self.scan(order, &[pos], false, |item| {
            if let Scanned::ShardDone { tokens, .. } = item {
                count = tokens;
            }
            Flow::Continue
        });
        self.index.put(&path, count);
        Ok(count)
    }

    /// Reads shards `order[p]` for `p` in `positions` on a reader thread, tokenizes them on the
    /// pool and reports token runs in stream order. `live` counts documents and skips in the
    /// metrics (a count-only scan does not).
    fn scan(
        &self,
        order: &[usize],
        positions: &[usize],
        live: bool,
        mut on: impl FnMut(Scanned<'_>) -> Flow,
    ) {
        let tokenizer = &self.tokenizer;
        let metrics = &self.metrics;
        let text_field = self.config.data.text_field.as_str();
        let shards: Vec<(usize, &Shard)> = positions
            .iter()
            .map(|&p| (p, &self.shards[order[p]]))
            .collect();
        std::thread::scope(|scope| {
            // Created inside the scope: returning early drops `rx`, which stops the reader
            // before the scope joins it.
            let (tx, rx) = flume::bounded::<Read>(4);
            scope.spawn(move || read_shards(&shards, text_field, tokenizer, metrics, live, tx));
            let mut shard_tokens = 0u64;
            for msg in rx.iter() {
                match msg {
                    Read::Chunk(segments) => {
                        let runs: Vec<Vec<u32>> = self
                            .pool
                            .install(|| segments.par_iter().map(|s| tokenizer.encode(s)).collect());
                        if live {
                            let docs = segments.iter().filter(|s| s.last).count() as u64;
                            let bytes: usize = segments.iter().map(|s| s.text.len()).sum();
                            let tokens: usize = runs.iter().map(Vec::len).sum();
                            Metrics::add(&metrics.docs, docs);
                            Metrics::add(&metrics.text_bytes, bytes as u64);
                            Metrics::add(&metrics.tokens, tokens as u64);
                        }
                        for (segment, ids) in segments.iter().zip(&runs) {
                            shard_tokens += ids.len() as u64;
                            let flow = on(Scanned::Run {
                                ids,
                                doc_start: segment.first,
                            });
                            if flow == Flow::Stop {
                                return; // dropping rx stops the reader
                            }
                        }
                    }
                    Read::ShardDone { pos } => {
                        let tokens = std::mem::take(&mut shard_tokens);
                        if on(Scanned::ShardDone { pos, tokens }) == Flow::Stop {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The reader thread: shards to chunks of segments, bad rows counted and logged.
fn read_shards(
    shards: &[(usize, &Shard)],
    text_field: &str,
    tokenizer: &TextTokenizer,
    metrics: &Metrics,
    live: bool,
    tx: flume::Sender<Read>,
) {
    for &(pos, shard) in shards {
        let path = shard.path.display();
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut logged = 0u64;
        let mut note = |counter: &std::sync::atomic::AtomicU64, msg: String| {
            if live {
                Metrics::add(counter, 1);
                logged += 1;
                if logged <= LOG_LIMIT {
                    tracing::warn!(shard = %path, "{msg}");
                } else if logged == LOG_LIMIT + 1 {
                    tracing::warn!(shard = %path, "more bad rows in this shard; see the metrics");
                }
            }
        };
        for event in sources::open(shard, text_field) {
            match event {
                Event::Doc { text, .. } => {
                    let segments = tokenizer.segments(text);
                    if segments.len() > 1 && live {
                        Metrics::add(&metrics.docs_chunked, 1);
                    }
                    for s in segments {
                        chunk_bytes += s.text.len();
                        chunk.push(s);
                        if chunk_bytes >= CHUNK_BYTES {
                            chunk_bytes = 0;
                            if tx.send(Read::Chunk(std::mem::take(&mut chunk))).is_err() {
                                return;
                            }
                        }
                    }
                }
                Event::Skip { row, reason } => {
                    let (counter, what) = match &reason {
                        SkipReason::NoText => (&metrics.rows_no_text, "no text".to_string()),
                        SkipReason::BadUtf8 => (&metrics.rows_bad_utf8, "invalid UTF-8".into()),
                        SkipReason::BadJson(e) => {
                            (&metrics.rows_bad_json, format!("bad JSON: {e}"))
                        }
                        SkipReason::Empty => (&metrics.docs_empty, "empty document".into()),
                    };
                    note(counter, format!("row {row} skipped: {what}"));
                }
                Event::Damage { row, reason } => {
                    let at = row.map_or(String::new(), |r| format!(" at row {r}"));
                    note(&metrics.shards_damaged, format!("damaged{at}: {reason}"));
                }
            }
        }
        if !chunk.is_empty() && tx.send(Read::Chunk(chunk)).is_err() {
            return;
        }
        if live {
            Metrics::add(&metrics.shards_read, 1);
        }
        if tx.send(Read::ShardDone { pos }).is_err() {
            return;
        }
    }
}

/// Collects windows into blocks, permutes each block, and feeds the batcher.
struct Assembler<'a, F: FnMut(TokenBatch) -> Flow> {
    seed: u64,
    epoch: u64,
    shuffle: usize,
    block: Vec<Window>,
    block_index: u64,
    /// Windows of the first (partial, when resuming) block to drop after permuting.
    skip: usize,
    batcher: &'a mut Batcher,
    emit: &'a mut F,
    stopped: bool,
    metrics: &'a Metrics,
}

impl<F: FnMut(TokenBatch) -> Flow> Assembler<'_, F> {
    fn window(&mut self, w: Window) {
        if self.stopped {
            return;
        }
        Metrics::add(&self.metrics.windows, 1);
        self.block.push(w);
        if self.block.len() == self.shuffle {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.block.is_empty() || self.stopped {
            return;
        }
        let mut slots: Vec<Option<Window>> = self.block.drain(..).map(Some).collect();
        let perm = block_order(slots.len(), self.seed, self.epoch, self.block_index);
        self.block_index += 1;
        let skip = std::mem::take(&mut self.skip);
        for &i in perm.iter().skip(skip) {
            let Some(w) = slots[i].take() else { continue };
            for batch in self.batcher.push(w, self.epoch) {
                Metrics::add(&self.metrics.batches_produced, 1);
                if (self.emit)(batch) == Flow::Stop {
                    self.stopped = true;
                    return;
                }
            }
        }
    }
}

/// Groups windows into batches: the global stream's batches, of which a loader of one rank keeps
/// its own and a loader of every rank keeps them all.
struct Batcher {
    rows: Vec<Window>,
    first_epoch: u64,
    /// Global index (and sequence number) of the batch being assembled.
    next: u64,
    /// The kept batches of the current group of `world`, until the group is complete.
    held: Vec<TokenBatch>,
    batch_size: usize,
    window: usize,
    /// The ranks' split: which batches are kept, and the rank each is tagged with.
    stride: RankStride,
    /// Batches before this one (of the first group, when resuming mid-group) are not kept.
    first_seq: u64,
    run_id: String,
    tokenizer: Fingerprint,
    identity: StreamIdentity,
}

impl Batcher {
    fn push(&mut self, w: Window, epoch: u64) -> Vec<TokenBatch> {
        if self.rows.is_empty() {
            self.first_epoch = epoch;
        }
        self.rows.push(w);
        if self.rows.len() == self.batch_size {
            self.complete()
        } else {
            Vec::new()
        }
    }

    fn finish(&mut self) -> Vec<TokenBatch> {
        if self.rows.is_empty() {
            Vec::new()
        } else {
            self.complete()
        }
    }

    /// A global batch is complete: keep it when it is a kept rank's, and hand out the kept
    /// batches of a group once every rank of the group has one.
    fn complete(&mut self) -> Vec<TokenBatch> {
        let g = self.next;
        let rank = self.stride.rank_of(g);
        let kept = self.stride.rank.is_none_or(|r| rank == r) && g >= self.first_seq;
        if kept {
            let batch = self.take();
            self.held.push(batch);
        } else {
            self.rows.clear();
            self.next += 1;
        }
        if rank == self.stride.world - 1 {
            std::mem::take(&mut self.held)
        } else {
            Vec::new()
        }
    }

    fn take(&mut self) -> TokenBatch {
        let rows = std::mem::take(&mut self.rows);
        let seq = self.next;
        self.next += 1;
        let mut tokens = Vec::with_capacity(rows.len() * self.window);
        let mut lengths = Vec::with_capacity(rows.len());
        let mut doc_starts = Vec::with_capacity(rows.len());
        for w in rows {
            tokens.extend_from_slice(&w.tokens);
            lengths.push(w.length);
            doc_starts.push(w.starts);
        }
        TokenBatch {
            run_id: self.run_id.clone(),
            seq,
            epoch: self.first_epoch,
            rows: lengths.len(),
            window: self.window,
            tokenizer: self.tokenizer.clone(),
            tokens,
            lengths,
            doc_starts,
            stream: Some(Box::new(self.identity.clone())),
            rank: self.stride.rank_tag(seq),
        }
    }
}

/// The identity of the stream of `config` over `shards` (see [`StreamIdentity`]): the shards by
/// path, size and modification time (a shard that cannot be read counts as 0 bytes at time 0).
fn identity(config: &LoaderConfig, tokenizer: &Fingerprint, shards: &[Shard]) -> StreamIdentity {
    let mut bytes = 0u64;
    let lines: Vec<String> = shards
        .iter()
        .map(|s| {
            let meta = std::fs::metadata(&s.path).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            bytes += size;
            format!("{}\t{size}\t{mtime}", s.path.display())
        })
        .collect();
    let format = serde_json::to_value(config.data.format)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    StreamIdentity {
        tokenizer: tokenizer.clone(),
        seq_len: config.seq_len.get() as u64,
        batch_size: config.batch_size.get() as u64,
        seed: config.seed,
        shuffle_window: config.shuffle_window.get() as u64,
        add_bos: config.add_bos,
        add_eos: config.add_eos,
        bos_token: config.bos_token.clone(),
        eos_token: config.eos_token.clone(),
        text_field: config.data.text_field.clone(),
        format,
        max_doc_bytes: config.max_doc_bytes as u64,
        corpus: Corpus {
            shards: shards.len() as u64,
            bytes,
            digest: Fingerprint::of_bytes(lines.join("\n").as_bytes()),
        },
    }
}
