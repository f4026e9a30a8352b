//! The run config of `rho run`: the three process configs and how the supervisor treats them,
//! resolved, completed with the run directory's defaults, and checked before anything starts.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rho_loader::LoaderConfig;
use rho_protocol::Endpoint;
use rho_selector::SelectorConfig;
use rho_trainer::TrainerConfig;
use serde::{Deserialize, Serialize};

/// A run config file, as written. The connecting endpoints (`trainer.loader`,
/// `selector.loader`, `selector.trainer`) are left out: the supervisor assigns them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where configs, logs, metrics, reports and checkpoints go (relative to the config file).
    pub run_dir: PathBuf,
    /// Selector processes, at least 1 when the trainer's score rule needs reference losses
    /// (ignored otherwise). Default: as many as `selector_devices` names, or 1.
    #[serde(default)]
    pub selectors: Option<usize>,
    /// One device per selector: selector `i` runs on the `i`-th (one process per GPU:
    /// `["cuda:1", "cuda:2"]`), in place of `selector.device`. Empty (default): every selector
    /// on `selector.device`.
    #[serde(default)]
    pub selector_devices: Vec<rho_model::DeviceSpec>,
    /// Restart a selector that dies before the stream ends. Default true.
    #[serde(default = "yes")]
    pub restart_selectors: bool,
    /// A selector that fails this many times in a row, each time within
    /// `SHORT_LIFE` of its start, ends the run with its last error. Default 5.
    #[serde(default = "five")]
    pub max_selector_failures: u32,
    pub loader: LoaderConfig,
    #[serde(default)]
    pub selector: Option<SelectorConfig>,
    /// The candle trainer (`rho trainer`, one rank); or, in its place, `trainer_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<TrainerConfig>,
    /// A trainer of any kind started once as a command, which runs every rank of a
    /// data-parallel run itself (`torchrun --nproc-per-node 2 train.py ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_command: Option<TrainerCommand>,
    /// Where the processes start: here (default), as Slurm job steps, or each through a
    /// command of the user's (docs/CLUSTER.md).
    #[serde(default)]
    pub launch: super::placement::Launch,
}

/// A trainer that is not `rho trainer`: one command, started once, that runs every rank of a
/// data-parallel run (torchrun, `mpirun`, or one process). Each rank finds its stream through
/// the environment `rho run` sets (docs/SCALING.md, "Environment"; `RhoStream.from_env()`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerCommand {
    /// The program and its arguments, run in the run config's directory.
    pub command: Vec<String>,
    /// The data-parallel ranks the command starts (torchrun's `--nproc-per-node` times its
    /// nodes); the loader serves them all, rank `r` the batches `seq % ranks == r`.
    pub ranks: NonZeroU32,
    /// Whether the ranks train on scored batches (selectors run and deliver to each rank) or
    /// on the loader's token batches. Default true.
    #[serde(default = "yes")]
    pub scored: bool,
    /// More environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}
fn five() -> u32 {
    5
}

impl RunConfig {
    /// How many selectors the config asks for.
    pub fn selector_count(&self) -> usize {
        self.selectors.unwrap_or(match self.selector_devices.len() {
            0 => 1,
            n => n,
        })
    }

    /// The device of selector `i`: its entry of `selector_devices`, or `selector.device`.
    pub fn selector_device(&self, i: usize, config: &SelectorConfig) -> rho_model::DeviceSpec {
        self.selector_devices
            .get(i)
            .copied()
            .unwrap_or(config.device)
    }
}

/// A run ready to start: the run config with every path resolved, every default of the run
/// directory filled in, and every section checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The run config file's text (kept in the run directory as `run.json`).
    pub text: String,
    pub settings: RunConfig,
    /// The run directory, created and absolute.
    pub dir: PathBuf,
    /// The run config's directory (relative paths, and a trainer command's working directory).
    pub base: PathBuf,
    /// The selectors' config (`None` when the score rule needs none).
    pub selector: Option<SelectorConfig>,
}

/// Who trains: the candle trainer, or a command running every rank.
pub enum Trainer<'a> {
    Candle(&'a TrainerConfig),
    Command(&'a TrainerCommand),
}

impl Plan {
    /// Reads and completes the run config `file`, and creates the run directory; [`Plan::check`]
    /// checks it.
    pub fn load(file: &Path) -> anyhow::Result<Plan> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let given = Given::of(&text);
        let mut rc: RunConfig = rho_common::config_file::parse_json(&text)
            .map_err(|e| anyhow::anyhow!("invalid run config {}: {e}", file.display()))?;
        let base = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
        .canonicalize()
        .with_context(|| format!("resolving the directory of {}", file.display()))?;
        let dir = base.join(&rc.run_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        // The endpoint a process binds when the config names none: a free port, on loopback or,
        // for job steps on several nodes, every interface (the supervisor reads the advertised
        // one from the endpoint file).
        let bind = Endpoint::new(rc.launch.default_bind()).unwrap_or_default();
        complete_loader(
            &mut rc.loader,
            &base,
            &dir,
            (!given.loader_endpoint).then_some(&bind),
        );
        match (&mut rc.trainer, &rc.trainer_command) {
            (Some(t), None) => {
                one_rank_loader(&rc.loader)?;
                let delivery = (!given.trainer_delivery).then_some(&bind);
                complete_trainer(t, &base, &dir, delivery)
            }
            (None, Some(c)) => serve_every_rank(&mut rc.loader, c)?,
            (Some(_), Some(_)) => bail!("run config: `trainer` and `trainer_command` both given: one trainer per run, the candle trainer or a command"),
            (None, None) => bail!("run config: no trainer: give a `trainer` section (the candle trainer) or a `trainer_command` (such as torchrun)"),
        }
        let selector = selector_of(&rc, &base)?;
        Ok(Plan {
            text,
            settings: rc,
            dir,
            base,
            selector,
        })
    }

    /// Every section checked against itself and against the others, before anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        let rc = &self.settings;
        rc.launch.check()?;
        if rc.max_selector_failures == 0 {
            bail!("run config, `max_selector_failures`: must be at least 1");
        }
        // The endpoints the supervisor assigns are not known yet: each section is checked with
        // a stand-in for them.
        rc.loader
            .validate()
            .context("run config, section `loader`")?;
        if let Trainer::Candle(t) = self.trainer() {
            let mut trainer = t.clone();
            assign_later(&mut trainer.loader);
            trainer
                .validate()
                .context("run config, section `trainer`")?;
        }
        if let Some(c) = &rc.trainer_command {
            if c.command.is_empty() {
                bail!("run config, `trainer_command.command`: empty; name the program and its arguments, such as [\"torchrun\", \"--nproc-per-node\", \"2\", \"train.py\"]");
            }
        }
        if let Some(s) = &self.selector {
            let mut s = s.clone();
            assign_later(&mut s.loader);
            assign_later(&mut s.trainer);
            s.validate().context("run config, section `selector`")?;
        }
        preflight(&rc.loader, self.selector.as_ref(), self.trainer())
    }

    /// Who trains.
    pub fn trainer(&self) -> Trainer<'_> {
        match (&self.settings.trainer, &self.settings.trainer_command) {
            (Some(t), _) => Trainer::Candle(t),
            (None, Some(c)) => Trainer::Command(c),
            // `Plan::load` refuses a config with neither.
            (None, None) => unreachable!("a plan has a trainer"),
        }
    }

    /// The data-parallel ranks: the command's, or the candle trainer's one.
    pub fn ranks(&self) -> u32 {
        match self.trainer() {
            Trainer::Candle(_) => 1,
            Trainer::Command(c) => c.ranks.get(),
        }
    }

    /// How many selectors run (0 when the score rule needs none).
    pub fn selectors(&self) -> usize {
        match self.selector {
            Some(_) => self.settings.selector_count(),
            None => 0,
        }
    }
}

/// Which endpoints the run config names itself (the others get a free loopback port; an empty
/// endpoint, as a typed config with an unassigned endpoint writes it, names none).
struct Given {
    loader_endpoint: bool,
    trainer_delivery: bool,
}

impl Given {
    fn of(text: &str) -> Given {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let has = |section: &str, key: &str| {
            let named = v.get(section).and_then(|s| s.get(key));
            named.is_some_and(|e| e.as_str() != Some(""))
        };
        Given {
            loader_endpoint: has("loader", "endpoint"),
            trainer_delivery: has("trainer", "delivery"),
        }
    }
}

/// A stand-in for an endpoint the supervisor assigns once it is known.
fn assign_later(endpoint: &mut Endpoint) {
    if !endpoint.is_assigned() {
        *endpoint = Endpoint::new("tcp://127.0.0.1:0").unwrap_or_default();
    }
}

/// The loader's paths resolved, its endpoint `bind` unless the config names one, and its
/// endpoint file, metrics and state in the run directory.
fn complete_loader(loader: &mut LoaderConfig, base: &Path, dir: &Path, bind: Option<&Endpoint>) {
    loader.resolve_paths(base);
    if let Some(bind) = bind {
        loader.endpoint = bind.clone();
    }
    loader.endpoint_file = Some(dir.join("loader.endpoint"));
    loader
        .metrics
        .get_or_insert_with(|| dir.join("loader.metrics.jsonl"));
    loader
        .tensorboard
        .get_or_insert_with(|| dir.join("tensorboard/loader"));
    loader
        .state_dir
        .get_or_insert_with(|| dir.join("loader-state"));
}

/// The candle trainer trains one rank: its loader serves that rank (a `rank` of a `world`, one
/// pipeline per rank) or a run of one rank, never every rank of several (their batches would be
/// refused to its credits, which name no rank).
fn one_rank_loader(loader: &LoaderConfig) -> anyhow::Result<()> {
    if loader.rank.is_none() && loader.world.get() > 1 {
        bail!(
            "run config, `loader.world`: {} with `loader.rank` unset is a loader of every rank, but the `trainer` section is one rank: give a `trainer_command` that runs the {} ranks (such as torchrun), or set `loader.rank` for a pipeline of one rank",
            loader.world,
            loader.world
        );
    }
    Ok(())
}

/// The loader of a run whose command runs `ranks` ranks serves them all: `world` is the ranks
/// (a `world` written otherwise is refused, as is a `rank`: one loader serves every rank).
fn serve_every_rank(loader: &mut LoaderConfig, command: &TrainerCommand) -> anyhow::Result<()> {
    let ranks = command.ranks.get();
    if let Some(r) = loader.rank {
        bail!("run config, `loader.rank`: {r}, but one loader serves every rank of the run's {ranks}: leave `rank` out");
    }
    if loader.world.get() != 1 && loader.world.get() != ranks {
        bail!(
            "run config, `loader.world`: {}, but `trainer_command.ranks` is {ranks}: leave `world` out (the ranks set it)",
            loader.world
        );
    }
    loader.world = command.ranks;
    Ok(())
}

/// The trainer's paths resolved, its delivery endpoint `bind` unless the config names one, and
/// its delivery file, metrics and checkpoints in the run directory.
fn complete_trainer(trainer: &mut TrainerConfig, base: &Path, dir: &Path, bind: Option<&Endpoint>) {
    trainer.resolve_paths(base);
    if let Some(bind) = bind {
        trainer.delivery = bind.clone();
    }
    trainer.delivery_file = Some(dir.join("trainer.delivery"));
    trainer
        .metrics
        .get_or_insert_with(|| dir.join("trainer.metrics.jsonl"));
    trainer
        .tensorboard
        .get_or_insert_with(|| dir.join("tensorboard/trainer"));
    trainer
        .checkpoint
        .get_or_insert_with(|| rho_trainer::config::CheckpointConfig {
            dir: dir.join("checkpoints"),
            every: None,
            overwrite: false,
        });
}

/// The selectors' config, when the trainer's score rule needs them.
fn selector_of(rc: &RunConfig, base: &Path) -> anyhow::Result<Option<SelectorConfig>> {
    let needs = match (&rc.trainer, &rc.trainer_command) {
        (Some(t), _) => t
            .uses_selectors()
            .then(|| format!("the trainer's score rule ({:?})", t.selection.score)),
        (None, Some(c)) => c.scored.then(|| "`trainer_command.scored`".to_string()),
        (None, None) => None,
    };
    let Some(needs) = needs else {
        return Ok(None);
    };
    if rc.selector_count() == 0 {
        bail!("run config, `selectors`: 0, but {needs} needs reference losses from at least one selector; or serve a scored cache and set `trainer.source` to \"loader\"");
    }
    let Some(mut s) = rc.selector.clone() else {
        bail!("run config: {needs} needs selectors, but there is no `selector` section");
    };
    if let Some(n) = rc.selectors {
        let devices = rc.selector_devices.len();
        if devices > 0 && devices != n {
            bail!("run config: `selectors` is {n} but `selector_devices` names {devices} devices: one device per selector (leave `selectors` out to run one selector per device)");
        }
    }
    for (i, d) in rc.selector_devices.iter().enumerate() {
        s.dtype.on(*d).map_err(|e| {
            anyhow::anyhow!("run config, `selector_devices[{i}]` with `selector.dtype`: {e}")
        })?;
    }
    s.resolve_paths(base);
    Ok(Some(s))
}

/// Checks a model directory against the tokenizer and the window it will see.
fn check_model(
    field: &str,
    model: &Path,
    tokenizer: &Path,
    tokenizer_vocab: usize,
    seq_len: usize,
) -> anyhow::Result<()> {
    let m = rho_model::checkpoint::inspect(model)
        .map_err(|e| anyhow::anyhow!("run config, `{field}`: {e}"))?;
    if m.vocab_size < tokenizer_vocab {
        bail!(
            "run config, `{field}`: {} has a vocabulary of {} ids, but the tokenizer {} has {}: the model cannot score every token",
            model.display(),
            m.vocab_size,
            tokenizer.display(),
            tokenizer_vocab
        );
    }
    if m.max_positions < seq_len {
        bail!(
            "run config, `{field}`: {} holds sequences of at most {} positions (max_position_embeddings), but the loader's seq_len is {seq_len}",
            model.display(),
            m.max_positions
        );
    }
    Ok(())
}

/// A directory of checkpoints of an earlier run, without `resume` or `overwrite`, is refused.
fn check_checkpoints(trainer: &TrainerConfig) -> anyhow::Result<()> {
    let Some(ck) = trainer.checkpoint.as_ref().filter(|_| !trainer.resume) else {
        return Ok(());
    };
    let existing = rho_trainer::checkpoint::list(&ck.dir)?;
    if let (Some((_, newest)), false) = (existing.first(), ck.overwrite) {
        bail!(
            "run config, `trainer.checkpoint.dir`: {} holds checkpoints of an earlier run (newest: {}); a run never writes over checkpoints it did not make: set `trainer.resume: true` to continue it, `trainer.checkpoint.overwrite: true` to start afresh, or choose another directory",
            ck.dir.display(),
            newest.display()
        );
    }
    Ok(())
}

/// The reference the selectors must score with: `trainer.selection.reference_fingerprint`, else,
/// on a resume that does not change it (`selection.change_reference`), the one the newest
/// readable checkpoint was trained against. A selector model that is another is refused before
/// anything starts; the trainer would otherwise refuse every batch it scores, and the selectors
/// would be restarted until they gave up.
fn check_reference(
    selector: Option<&SelectorConfig>,
    trainer: &TrainerConfig,
) -> anyhow::Result<()> {
    let Some(s) = selector else {
        return Ok(());
    };
    let saved = || -> anyhow::Result<Option<(PathBuf, rho_protocol::Fingerprint)>> {
        let Some(ck) = trainer.checkpoint.as_ref() else {
            return Ok(None);
        };
        if !trainer.resume || trainer.selection.change_reference {
            return Ok(None);
        }
        Ok(rho_trainer::checkpoint::list(&ck.dir)?
            .into_iter()
            .find_map(|(_, dir)| {
                let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
                let state: rho_trainer::checkpoint::TrainerState =
                    serde_json::from_str(&text).ok()?;
                Some((dir, state.stream.reference?))
            }))
    };
    let (want, whose) = match &trainer.selection.reference_fingerprint {
        Some(f) => (
            f.clone(),
            "`trainer.selection.reference_fingerprint`".to_string(),
        ),
        None => match saved()? {
            Some((dir, f)) => (
                f,
                format!("the checkpoint {} was trained against", dir.display()),
            ),
            None => return Ok(()),
        },
    };
    let now = rho_selector::scorer::model_fingerprint(&s.model)
        .map_err(|e| anyhow::anyhow!("run config, `selector.model` {}: {e}", s.model.display()))?;
    if now != want {
        bail!(
            "run config, `selector.model`: {} is the reference model {now}, but {whose} is the reference model {want}: one run trains against one reference; use that model, or set `trainer.selection.change_reference` to change it deliberately",
            s.model.display()
        );
    }
    Ok(())
}

/// What can be found wrong before any process starts: the checkpoints, the models, the
/// tokenizers and the window length against each other.
fn preflight(
    loader: &LoaderConfig,
    selector: Option<&SelectorConfig>,
    trainer: Trainer<'_>,
) -> anyhow::Result<()> {
    if let Trainer::Candle(trainer) = trainer {
        check_checkpoints(trainer)?;
        check_reference(selector, trainer)?;
    }
    if loader.scored.is_some() {
        return Ok(());
    }
    let load = |field: &str, path: &Path| {
        rho_common::tokenizer::load(path)
            .map_err(|e| anyhow::anyhow!("run config, `{field}` {}: {e}", path.display()))
    };
    let tok = load("loader.tokenizer", &loader.tokenizer)?;
    let vocab = tok.tokenizer.get_vocab_size(true);
    if let Some(s) = selector {
        if load("selector.tokenizer", &s.tokenizer)?.fingerprint != tok.fingerprint {
            bail!(
                "run config: `selector.tokenizer` {} is not the loader's tokenizer {}: the selectors would refuse every batch",
                s.tokenizer.display(),
                loader.tokenizer.display()
            );
        }
        check_model(
            "selector.model",
            &s.model,
            &loader.tokenizer,
            vocab,
            loader.seq_len.get(),
        )?;
        s.dtype
            .on(s.device)
            .map_err(|e| anyhow::anyhow!("run config, `selector.dtype`: {e}"))?;
    }
    let Trainer::Candle(trainer) = trainer else {
        return Ok(());
    };
    if let (rho_trainer::config::BackendChoice::Candle, Some(m)) = (trainer.backend, &trainer.model)
    {
        check_model(
            "trainer.model",
            m,
            &loader.tokenizer,
            vocab,
            loader.seq_len.get(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_config_field_is_in_the_config_reference() {
        // Both trainers, so that both fields are written (a run config takes one of them).
        let rc: RunConfig = serde_json::from_value(serde_json::json!({
            "run_dir": "r",
            "loader": {"tokenizer": "t.json", "data": {"paths": ["x"]}, "seq_len": 8, "batch_size": 1},
            "trainer": {},
            "trainer_command": {"command": ["torchrun"], "ranks": 2},
        }))
        .unwrap();
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
                .unwrap();
        let section = &doc[doc.find("## Run").unwrap()..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let serde_json::Value::Object(fields) = serde_json::to_value(&rc).unwrap() else {
            panic!("a run config is an object");
        };
        for f in fields.keys() {
            assert!(
                listed.contains(&f.as_str()),
                "docs/CONFIG.md, Run: `{f}` not documented"
            );
        }
        for l in &listed {
            assert!(
                fields.contains_key(*l),
                "docs/CONFIG.md, Run: no field `{l}`"
            );
        }
    }

    #[test]
    fn a_trainer_command_gets_one_loader_of_every_rank() {
        let command: TrainerCommand = serde_json::from_value(serde_json::json!({
            "command": ["torchrun", "--nproc-per-node", "3", "train.py"], "ranks": 3,
        }))
        .unwrap();
        assert!(command.scored, "scored by default");
        let loader = |extra: serde_json::Value| -> LoaderConfig {
            let mut v = serde_json::json!({
                "tokenizer": "t.json", "data": {"paths": ["x"]}, "seq_len": 8, "batch_size": 1,
            });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(v).unwrap()
        };
        let mut l = loader(serde_json::json!({}));
        serve_every_rank(&mut l, &command).unwrap();
        assert_eq!((l.world.get(), l.rank), (3, None));
        let mut l = loader(serde_json::json!({"world": 3}));
        serve_every_rank(&mut l, &command).unwrap();
        let err = serve_every_rank(
            &mut loader(serde_json::json!({"rank": 1, "world": 3})),
            &command,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("loader.rank"), "{err}");
        let err = serve_every_rank(&mut loader(serde_json::json!({"world": 2})), &command)
            .unwrap_err()
            .to_string();
        assert!(err.contains("loader.world") && err.contains('3'), "{err}");
        // The candle trainer is one rank.
        assert!(one_rank_loader(&loader(serde_json::json!({"world": 2}))).is_err());
        one_rank_loader(&loader(serde_json::json!({"world": 2, "rank": 1}))).unwrap();
        one_rank_loader(&loader(serde_json::json!({}))).unwrap();
    }

    #[test]
    fn endpoints_the_file_names_are_kept_and_the_others_assigned() {
        let g = Given::of(r#"{"loader": {"endpoint": "tcp://127.0.0.1:7000"}, "trainer": {}}"#);
        assert!(g.loader_endpoint && !g.trainer_delivery);
        let g = Given::of(r#"{"loader": {"endpoint": ""}, "trainer": {"delivery": ""}}"#);
        assert!(!g.loader_endpoint && !g.trainer_delivery);
        let mut e = Endpoint::default();
        assign_later(&mut e);
        assert_eq!(e.as_str(), "tcp://127.0.0.1:0");
        let mut e = Endpoint::new("ipc:///tmp/x").unwrap();
        assign_later(&mut e);
        assert_eq!(e.as_str(), "ipc:///tmp/x");
    }
}
