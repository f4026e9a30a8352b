//! The selector's configuration.

use rho_protocol::Endpoint;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use crate::{Result, SelectorError};

/// A selector's config (`rho selector --config FILE`, or the `selector` section of a run);
/// docs/CONFIG.md describes every field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    /// The run; messages of other runs are refused.
    #[serde(default = "default_run_id")]
    pub run_id: String,
    /// The loader's endpoint (this selector connects and asks for token batches). Required,
    /// except under `rho run`, which assigns it.
    #[serde(default)]
    pub loader: Endpoint,
    /// The trainer's delivery endpoint (this selector connects and delivers scored batches).
    /// Required, except under `rho run`, which assigns it.
    #[serde(default)]
    pub trainer: Endpoint,
    /// The delivery endpoints of the trainers of a data-parallel run, rank `r`'s at index `r`,
    /// in place of `trainer`: this selector scores batches of every rank and delivers batch
    /// `seq` to rank `seq % len`'s trainer, asking the loader (one that serves every rank) for
    /// each rank's batches as far as that rank's credits allow. Empty (default): the one
    /// `trainer`. Under `rho run`, assigned.
    #[serde(default)]
    pub trainers: Vec<Endpoint>,
    /// The reference model: a HuggingFace checkpoint directory.
    pub model: PathBuf,
    /// The `tokenizer.json` the loader uses; batches tokenized otherwise are refused.
    pub tokenizer: PathBuf,
    /// `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: rho_model::DeviceSpec,
    /// `f32` (default), `f16` (CPU or GPU) or `bf16` (GPU).
    #[serde(default)]
    pub dtype: rho_model::DTypeSpec,
    /// Batches asked of the loader ahead of scoring, per rank. Default 2. With more than one
    /// lane, each extra lane holds one more: at most `prefetch + lanes - 1` batches of each
    /// rank are here at once (queued, being scored, or waiting for the trainer's credit).
    #[serde(default = "default_prefetch")]
    pub prefetch: NonZeroU32,
    /// Positions per logits chunk in the loss; default: about 32 MiB of logits.
    #[serde(default)]
    pub loss_chunk: Option<NonZeroUsize>,
    /// JSONL metrics file.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Write TensorBoard event files of this process's scalars into this directory.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// Seconds between metrics lines. Default 1.
    #[serde(default = "default_interval")]
    pub metrics_interval_secs: f64,
    /// The run's shared secret (a file); every message is then signed and checked. Without it,
    /// the `RHO_SECRET` environment variable, else no authentication.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// CPU threads for model math; default: every core (or `RAYON_NUM_THREADS`).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Batches scored at once on the CPU, each on its own share of the threads (`threads /
    /// lanes`, the first lanes taking the remainder). A small model's products split poorly
    /// over many cores; whole batches side by side keep every core busy, at the cost of one
    /// batch's activations per lane and a longer wait for each batch. The scores are the same
    /// bits with any number of lanes. Default: 2 on the CPU with at least 2 threads, else 1;
    /// a GPU scores one batch at a time.
    #[serde(default)]
    pub lanes: Option<NonZeroUsize>,
    /// Heartbeats to the producers and reconnection when one falls silent.
    #[serde(default)]
    pub liveness: rho_protocol::Liveness,
    /// Also write every scored batch to this cache directory (docs/CACHE.md); `rho loader
    /// --scored DIR` serves it later without selectors.
    #[serde(default)]
    pub cache_out: Option<PathBuf>,
    /// Largest message accepted. Default 256 MiB.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u64,
}

fn default_run_id() -> String {
    "rho".into()
}
fn default_prefetch() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(1)
}
fn default_interval() -> f64 {
    1.0
}
fn default_max_message() -> u64 {
    256 << 20
}

impl SelectorConfig {
    /// A selector scoring with `model` batches tokenized by `tokenizer`, every other field at its
    /// default (what a config file naming only these two fields means; `loader` and `trainer`
    /// then unassigned, as `rho run` leaves them); set fields on it for more.
    pub fn new(model: PathBuf, tokenizer: PathBuf) -> Self {
        SelectorConfig {
            run_id: default_run_id(),
            loader: Endpoint::default(),
            trainer: Endpoint::default(),
            trainers: Vec::new(),
            model,
            tokenizer,
            device: rho_model::DeviceSpec::default(),
            dtype: rho_model::DTypeSpec::default(),
            prefetch: default_prefetch(),
            loss_chunk: None,
            metrics: None,
            tensorboard: None,
            metrics_interval_secs: default_interval(),
            secret_file: None,
            threads: None,
            lanes: None,
            liveness: rho_protocol::Liveness::default(),
            cache_out: None,
            max_message_bytes: default_max_message(),
        }
    }

    /// Reads and validates a config file; relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: SelectorConfig = rho_common::config_file::read_json(path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.model, &mut self.tokenizer] {
            rho_common::config_file::resolve(base, p);
        }
        for p in [
            &mut self.metrics,
            &mut self.tensorboard,
            &mut self.secret_file,
            &mut self.cache_out,
        ]
        .into_iter()
        .flatten()
        {
            rho_common::config_file::resolve(base, p);
        }
    }

    /// Where scored batches go: the trainer of each rank, by rank (`trainers`, else the one
    /// `trainer`).
    pub fn deliveries(&self) -> Vec<Endpoint> {
        match self.trainers.is_empty() {
            true => vec![self.trainer.clone()],
            false => self.trainers.clone(),
        }
    }

    /// Checks what serde cannot; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let field = |field, reason: &str| {
            Err(SelectorError::ConfigField {
                field,
                reason: reason.into(),
            })
        };
        if let Err((field, reason)) = self.liveness.validate() {
            return Err(SelectorError::ConfigField { field, reason });
        }
        if !self.trainers.is_empty() && self.trainer.is_assigned() {
            return field(
                "trainers",
                "set `trainer` (one trainer) or `trainers` (one per rank), not both",
            );
        }
        if u32::try_from(self.trainers.len()).is_err() {
            return field("trainers", "more ranks than a credit can name");
        }
        let deliveries = self.deliveries();
        let name = match self.trainers.is_empty() {
            true => "trainer",
            false => "trainers",
        };
        let check = |field, e: &Endpoint| -> Result<()> {
            e.check()
                .map(|_| ())
                .map_err(|reason| SelectorError::ConfigField { field, reason })
        };
        check("loader", &self.loader)?;
        for e in &deliveries {
            check(name, e)?;
        }
        for (r, e) in self.trainers.iter().enumerate() {
            if let Some(other) = self.trainers[..r].iter().position(|o| o == e) {
                return Err(SelectorError::ConfigField {
                    field: "trainers",
                    reason: format!(
                        "ranks {other} and {r} name the same endpoint {e}: one trainer per rank"
                    ),
                });
            }
        }
        if self.metrics_interval_secs.is_nan() || self.metrics_interval_secs <= 0.0 {
            return field("metrics_interval_secs", "must be positive");
        }
        rho_model::lanes::check(self.lanes, self.device, self.threads).map_err(|reason| {
            SelectorError::ConfigField {
                field: "lanes",
                reason,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_config_is_what_a_file_naming_only_its_fields_means() {
        let made = SelectorConfig::new("ref".into(), "tokenizer.json".into());
        let read: SelectorConfig =
            serde_json::from_str(r#"{"model": "ref", "tokenizer": "tokenizer.json"}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&made).unwrap(),
            serde_json::to_value(&read).unwrap()
        );
    }

    fn config(extra: serde_json::Value) -> SelectorConfig {
        let mut v = serde_json::json!({
            "model": "m", "tokenizer": "t.json",
            "loader": "tcp://127.0.0.1:5555", "trainer": "tcp://127.0.0.1:5556",
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn impossible_lanes_are_refused_by_name() {
        for bad in [
            serde_json::json!({"lanes": 2, "device": "cuda:0"}),
            serde_json::json!({"lanes": 3, "threads": 2}),
        ] {
            match config(bad.clone()).validate() {
                Err(SelectorError::ConfigField { field, .. }) => assert_eq!(field, "lanes"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(config(serde_json::json!({"lanes": 2, "threads": 2}))
            .validate()
            .is_ok());
        let zero = serde_json::json!({"model": "m", "tokenizer": "t", "lanes": 0});
        assert!(serde_json::from_value::<SelectorConfig>(zero).is_err());
    }
}
