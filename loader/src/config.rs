//! The loader's configuration: a JSON file, every field documented, unknown fields refused.

use rho_protocol::Endpoint;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use crate::{LoaderError, Result};

/// Shard formats; `auto` picks by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// By file extension.
    #[default]
    Auto,
    /// Parquet, whatever the name.
    Parquet,
    /// JSON lines (gzip or zstd by extension), whatever the name.
    Jsonl,
}

/// Where the documents come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Files, directories (every shard inside, recursively) or glob patterns.
    pub paths: Vec<String>,
    /// Column (parquet) or key (jsonl) holding the document text. Default `text`.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Default `auto`: `.parquet`, `.jsonl`/`.json`, `.jsonl.gz`, `.jsonl.zst` by extension.
    #[serde(default)]
    pub format: FormatChoice,
}

/// The loader process: read, tokenize, pack, order, batch, serve.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Identifies the run; every message carries it and messages of other runs are refused.
    #[serde(default = "default_run_id")]
    pub run_id: String,
    /// Where the documents come from.
    pub data: DataConfig,
    /// A HuggingFace `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Prepend the BOS token to each document. Default false.
    #[serde(default)]
    pub add_bos: bool,
    /// Append the EOS token to each document (the separator between packed documents). Default true.
    #[serde(default = "yes")]
    pub add_eos: bool,
    /// BOS token string; default: the first of `<s>`, `<|begin_of_text|>`, `<bos>` the vocabulary has.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// EOS token string; default: the first of `</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>`.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Training sequence length T; windows hold T + 1 tokens.
    pub seq_len: NonZeroUsize,
    /// Windows per batch (B).
    pub batch_size: NonZeroUsize,
    /// Seed of shard order and window shuffle. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Passes over the corpus. Default 1.
    #[serde(default = "one_u32")]
    pub epochs: NonZeroU32,
    /// Windows shuffled together (a block); 1 keeps corpus order. Default 64.
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: NonZeroUsize,
    /// The one rank this loader serves when each of `world` ranks has a loader of its own (data
    /// parallelism): it issues the global batches `g` with `g % world == rank` (counted from
    /// the origin of a resume that names its rank: [`RankStride`]). Unset (the default), the
    /// loader serves every rank: it issues the whole stream once and hands each batch only
    /// against credits for its rank. Either way every rank
    /// gets the same number of batches (docs/PROTOCOL.md, "Several ranks").
    #[serde(default)]
    pub rank: Option<u32>,
    /// Ranks splitting the stream. Default 1.
    #[serde(default = "one_u32")]
    pub world: NonZeroU32,
    /// Tokenizer threads; 0 = every core. Default 0.
    #[serde(default)]
    pub threads: usize,
    /// ZeroMQ endpoint the loader binds (ROUTER). Default `tcp://127.0.0.1:5555`; port 0 picks one.
    #[serde(default = "default_endpoint")]
    pub endpoint: Endpoint,
    /// Write the endpoint other processes connect to in this file once listening: the bound
    /// one, its host replaced by `advertise` (useful with port 0, and across hosts).
    #[serde(default)]
    pub endpoint_file: Option<PathBuf>,
    /// The host (name or address) other hosts reach this loader at, written in `endpoint_file`
    /// in place of the bound host. Default: the bound host, or for a wildcard `0.0.0.0` the
    /// host's own name (`RHO_ADVERTISE`, Slurm's node name, the host name).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Batches issued and not yet acknowledged, at most. Default 16.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: NonZeroUsize,
    /// Seconds a batch may stay issued without an acknowledgement before it is handed out again
    /// (its consumer presumed dead). Must exceed the pipeline's latency. Default 300.
    #[serde(default = "default_lease")]
    pub lease_secs: f64,
    /// Seconds without a message from a selector (which heartbeats every second, scoring or
    /// not) after which the batches it holds are handed out again at once, without waiting for
    /// their leases: a dead selector holds back no rank for long. Default 10.
    #[serde(default = "default_selector_timeout")]
    pub selector_timeout_secs: f64,
    /// Batches prepared ahead of requests. Default 8.
    #[serde(default = "default_prefetch")]
    pub prefetch: NonZeroUsize,
    /// Documents longer than this (bytes) are tokenized in pieces of this size. Default 1 MiB.
    #[serde(default = "default_max_doc_bytes")]
    pub max_doc_bytes: usize,
    /// Where the shard index (token counts per shard, for cheap resumption) is kept.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// JSONL metrics file, one line per interval.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Write TensorBoard event files of this process's scalars into this directory.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// Seconds between metrics lines. Default 1.
    #[serde(default = "default_interval")]
    pub metrics_interval_secs: f64,
    /// First batch sequence number to issue (resume). Default 0.
    #[serde(default)]
    pub start_batch: u64,
    /// The run's shared secret (a file); every message is then signed and checked. Without it,
    /// the `RHO_SECRET` environment variable, else no authentication.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Largest message accepted. Default 256 MiB.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u64,
    /// Exit once every batch was issued and acknowledged. Default true.
    #[serde(default = "yes")]
    pub exit_when_done: bool,
    /// Serve the scored batches of this cache (written by `rho selector --cache-out`) instead of
    /// tokenizing `data`: a pipeline without selectors (docs/CACHE.md).
    #[serde(default)]
    pub scored: Option<PathBuf>,
    /// With `scored`: the reference model fingerprint (`sha256:...`) the cache must come from.
    #[serde(default)]
    pub scored_ref_model: Option<String>,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_run_id() -> String {
    "rho".into()
}
fn yes() -> bool {
    true
}
fn one_u32() -> NonZeroU32 {
    NonZeroU32::MIN
}
/// A non-zero constant (for defaults).
const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

fn default_shuffle_window() -> NonZeroUsize {
    nz(64)
}
fn default_endpoint() -> Endpoint {
    Endpoint::new("tcp://127.0.0.1:5555").unwrap_or_default()
}
fn default_in_flight() -> NonZeroUsize {
    nz(16)
}
fn default_lease() -> f64 {
    300.0
}
fn default_selector_timeout() -> f64 {
    10.0
}
fn default_prefetch() -> NonZeroUsize {
    nz(8)
}
fn default_max_doc_bytes() -> usize {
    1 << 20
}
fn default_interval() -> f64 {
    1.0
}
fn default_max_message() -> u64 {
    256 << 20
}

fn field(field: &'static str, reason: impl Into<String>) -> LoaderError {
    LoaderError::ConfigField {
        field,
        reason: reason.into(),
    }
}

impl DataConfig {
    /// These paths, with the default text field and format.
    pub fn new(paths: Vec<String>) -> Self {
        DataConfig {
            paths,
            text_field: default_text_field(),
            format: FormatChoice::default(),
        }
    }
}

impl LoaderConfig {
    /// A config of `seq_len` x `batch_size` batches of these shards, every other field at its
    /// default (what a config file naming only these four fields means); set fields on it for
    /// more.
    pub fn new(
        data: DataConfig,
        tokenizer: PathBuf,
        seq_len: NonZeroUsize,
        batch_size: NonZeroUsize,
    ) -> Self {
        LoaderConfig {
            run_id: default_run_id(),
            data,
            tokenizer,
            add_bos: false,
            add_eos: yes(),
            bos_token: None,
            eos_token: None,
            seq_len,
            batch_size,
            seed: 0,
            epochs: one_u32(),
            shuffle_window: default_shuffle_window(),
            rank: None,
            world: one_u32(),
            threads: 0,
            endpoint: default_endpoint(),
            endpoint_file: None,
            advertise: None,
            max_in_flight: default_in_flight(),
            lease_secs: default_lease(),
            selector_timeout_secs: default_selector_timeout(),
            prefetch: default_prefetch(),
            max_doc_bytes: default_max_doc_bytes(),
            state_dir: None,
            metrics: None,
            tensorboard: None,
            metrics_interval_secs: default_interval(),
            start_batch: 0,
            secret_file: None,
            max_message_bytes: default_max_message(),
            exit_when_done: yes(),
            scored: None,
            scored_ref_model: None,
        }
    }

    /// Reads, parses and validates a config file. Relative paths in it are taken relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: LoaderConfig = rho_common::config_file::read_json(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses JSON text; an error names the field at fault (``field `data.paths`: ...``).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        rho_common::config_file::parse_json(text)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = &mut self.scored {
            rho_common::config_file::resolve(base, p);
        }
        let fix = |p: &mut PathBuf| rho_common::config_file::resolve(base, p);
        fix(&mut self.tokenizer);
        for p in [
            &mut self.endpoint_file,
            &mut self.state_dir,
            &mut self.metrics,
            &mut self.tensorboard,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for p in &mut self.data.paths {
            if Path::new(p).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
    }

    /// Checks every field that serde cannot; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.data.paths.is_empty() && self.scored.is_none() {
            return Err(field(
                "data.paths",
                "name at least one file, directory or glob",
            ));
        }
        if self.data.text_field.is_empty() {
            return Err(field("data.text_field", "must not be empty"));
        }
        if self.seq_len.get() > 1 << 20 {
            return Err(field("seq_len", "must be at most 1048576"));
        }
        let bytes = (self.seq_len.get() as u64 + 1) * self.batch_size.get() as u64 * 4;
        if bytes + (1 << 20) > self.max_message_bytes {
            return Err(field(
                "batch_size",
                format!(
                    "a batch of {bytes} bytes does not fit max_message_bytes = {}",
                    self.max_message_bytes
                ),
            ));
        }
        if self.scored.is_some() && self.rank.is_some() {
            return Err(field(
                "rank",
                "a scored cache is served to every rank by one loader: leave `rank` unset",
            ));
        }
        if let Some(rank) = self.rank.filter(|&r| r >= self.world.get()) {
            return Err(field(
                "rank",
                format!("{rank} is not below world = {}", self.world),
            ));
        }
        if self.lease_secs.is_nan() || self.lease_secs <= 0.0 {
            return Err(field("lease_secs", "must be positive"));
        }
        if self.selector_timeout_secs.is_nan() || self.selector_timeout_secs <= 0.0 {
            return Err(field("selector_timeout_secs", "must be positive"));
        }
        if self.max_doc_bytes < 1024 {
            return Err(field("max_doc_bytes", "must be at least 1024"));
        }
        if self.metrics_interval_secs.is_nan() || self.metrics_interval_secs <= 0.0 {
            return Err(field("metrics_interval_secs", "must be positive"));
        }
        self.endpoint.check().map_err(|r| field("endpoint", r))?;
        Ok(())
    }

    /// Which batches of the global stream this loader issues.
    pub fn stride(&self) -> RankStride {
        RankStride {
            world: u64::from(self.world.get()),
            rank: self.rank.map(u64::from),
            origin: 0,
        }
    }

    /// Tokens per window (T + 1).
    pub fn window(&self) -> usize {
        self.seq_len.get() + 1
    }
}

/// Where a loader's batches sit in the whole stream. From the `origin` on (0 for a fresh
/// stream; a resume that names its rank moves it to its global cursor), the stream is split
/// among `world` ranks in groups of `world` consecutive batches: batch `g >= origin` is rank
/// `(g - origin) % world`'s. A loader of rank `r` issues the sequence numbers
/// `origin + r, origin + r + world, ...`, which its source counts locally as `0, 1, 2, ...`;
/// a loader of every rank issues every sequence number, counted as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankStride {
    /// Ranks splitting the stream.
    pub world: u64,
    /// The rank served; `None`: every rank.
    pub rank: Option<u64>,
    /// The global batch where the split begins (rank 0's first batch).
    pub origin: u64,
}

impl RankStride {
    /// The global sequence number of the loader's `n`-th batch.
    pub fn seq_of(self, n: u64) -> u64 {
        match self.rank {
            Some(r) => self.origin + n * self.world + r,
            None => n,
        }
    }

    /// The local position of the first of the loader's sequence numbers at or after `seq`.
    pub fn local_of(self, seq: u64) -> u64 {
        match self.rank {
            Some(r) => seq.saturating_sub(self.origin + r).div_ceil(self.world),
            None => seq,
        }
    }

    /// One past the last sequence number of a loader whose source yielded `total_local`
    /// batches.
    pub fn end_seq(self, total_local: u64) -> u64 {
        match (self.rank, total_local) {
            (Some(_), 0) => self.origin,
            (Some(r), n) => self.origin + (n - 1) * self.world + r + 1,
            (None, n) => n,
        }
    }

    /// The rank of sequence number `seq`.
    pub fn rank_of(self, seq: u64) -> u64 {
        (seq % self.world + self.world - self.origin % self.world) % self.world
    }

    /// The first batch of the group of `world` that holds `seq`.
    pub fn group_start(self, seq: u64) -> u64 {
        seq - self.rank_of(seq).min(seq)
    }

    /// The same split restarted at `origin`.
    pub fn with_origin(self, origin: u64) -> RankStride {
        RankStride { origin, ..self }
    }

    /// The rank of `seq` as a batch names it: none in a stream of one rank.
    pub fn rank_tag(self, seq: u64) -> Option<rho_protocol::Rank> {
        let world = u32::try_from(self.world).ok().filter(|&w| w > 1)?;
        rho_protocol::Rank::new(self.rank_of(seq) as u32, world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_config_is_what_a_file_naming_only_its_fields_means() {
        let made = LoaderConfig::new(
            DataConfig::new(vec!["shards/".into()]),
            "tokenizer.json".into(),
            nz(512),
            nz(4),
        );
        let read = LoaderConfig::parse(
            r#"{"data": {"paths": ["shards/"]}, "tokenizer": "tokenizer.json",
                "seq_len": 512, "batch_size": 4}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&made).unwrap(),
            serde_json::to_value(&read).unwrap()
        );
    }

    #[test]
    fn ranks_map_the_global_stream_to_their_local_positions_and_back() {
        let s = RankStride {
            world: 3,
            rank: Some(1),
            origin: 0,
        };
        // Rank 1 of 3 serves 1, 4, 7, ...
        assert_eq!(s.local_of(0), 0);
        assert_eq!(s.local_of(1), 0);
        assert_eq!(s.local_of(2), 1);
        assert_eq!(s.local_of(4), 1);
        assert_eq!(s.local_of(5), 2);
        assert_eq!(s.seq_of(2), 7);
        assert_eq!(s.end_seq(0), 0);
        assert_eq!(s.end_seq(1), 2);
        assert_eq!(s.end_seq(3), 8);
        let one = RankStride {
            world: 1,
            rank: Some(0),
            origin: 0,
        };
        assert_eq!(one.local_of(7), 7);
        assert_eq!(one.end_seq(7), 7);
        // A loader of every rank counts the global stream as it is.
        let all = RankStride {
            world: 3,
            rank: None,
            origin: 0,
        };
        assert_eq!((all.local_of(5), all.seq_of(5), all.end_seq(6)), (5, 5, 6));
        assert_eq!(all.rank_of(5), 2);
        assert_eq!((all.group_start(5), all.group_start(6)), (3, 6));
        assert_eq!(all.rank_tag(5), rho_protocol::Rank::new(2, 3));
        assert_eq!(one.rank_tag(5), None);
    }

    #[test]
    fn a_split_restarted_at_an_origin_counts_its_groups_from_there() {
        // Two ranks stopped at global cursor 10 resume as three: 10, 11, 12 are ranks 0, 1, 2.
        let all = RankStride {
            world: 3,
            rank: None,
            origin: 10,
        };
        assert_eq!(
            (10..16).map(|g| all.rank_of(g)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
        assert_eq!((all.group_start(11), all.group_start(13)), (10, 13));
        // Below the origin the groups keep its alignment.
        assert_eq!((all.rank_of(9), all.group_start(8)), (2, 7));
        let r1 = all.with_origin(10);
        let r1 = RankStride {
            rank: Some(1),
            ..r1
        };
        // Rank 1 of 3 from 10 serves 11, 14, 17, ...
        assert_eq!((r1.seq_of(0), r1.seq_of(2)), (11, 17));
        assert_eq!(
            (r1.local_of(10), r1.local_of(11), r1.local_of(12)),
            (0, 0, 1)
        );
        assert_eq!((r1.end_seq(0), r1.end_seq(2)), (10, 15));
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "data": {"paths": ["shards/"]},
            "tokenizer": "tokenizer.json",
            "seq_len": 16,
            "batch_size": 2
        })
    }

    fn parse(v: &serde_json::Value) -> Result<LoaderConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loader.json");
        std::fs::write(&path, v.to_string()).unwrap();
        LoaderConfig::load(&path)
    }

    #[test]
    fn defaults_fill_in() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(
            (c.epochs.get(), c.world.get(), c.shuffle_window.get()),
            (1, 1, 64)
        );
        assert!(c.add_eos && !c.add_bos);
        assert!(c.tokenizer.is_absolute());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("seq_lenn", serde_json::json!(3), "seq_lenn"),
            ("seq_len", serde_json::json!(0), "seq_len"),
            ("batch_size", serde_json::json!(0), "batch_size"),
            ("rank", serde_json::json!(3), "rank"),
            ("shuffle_window", serde_json::json!(0), "shuffle_window"),
            ("endpoint", serde_json::json!("http://x"), "endpoint"),
            ("epochs", serde_json::json!("two"), "epochs"),
        ];
        for (key, value, needle) in cases {
            let mut v = minimal();
            v[key] = value;
            let err = parse(&v).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should name {needle}");
        }
        let mut v = minimal();
        v["data"]["colum"] = "x".into();
        assert!(parse(&v).unwrap_err().to_string().contains("colum"));
        let mut v = minimal();
        v["data"]["paths"] = serde_json::json!([]);
        assert!(parse(&v).unwrap_err().to_string().contains("data.paths"));
    }
}
