//! The candle backend: trains the `rho-model` decoder through its differentiable (plain) path.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rho_model::{checkpoint, per_token_loss, Config, DecoderLm, ForwardMode, HfConfig};
use rho_protocol::TokenBatch;

use crate::backend::{Backend, StepInput, StepStats};
use crate::optim::{AdamW, OptimizerConfig};
use crate::selection::{self, Selection};
use crate::{Result, TrainerError};
use rayon::prelude::*;

/// A model being trained: its variables, the decoder built on them, and the optimizer.
pub struct CandleBackend {
    hf_config: serde_json::Value,
    vars: Vec<(String, Var)>,
    model: DecoderLm,
    optimizer: AdamW,
    optim_config: OptimizerConfig,
    micro_batches: usize,
    /// The thread pool of each lane; none with one lane (micro-batches run one after another
    /// on the global pool).
    lanes: Vec<rayon::ThreadPool>,
    device: Device,
}

/// `optimizer.json` of a checkpoint: what the optimizer tensors do not hold.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OptimizerMeta {
    /// AdamW steps taken (the bias-correction clock).
    adam_steps: u64,
}

impl CandleBackend {
    /// A backend over the weights of a checkpoint directory, training in one micro-batch (see
    /// [`CandleBackend::split`]).
    pub fn from_checkpoint(dir: &Path, device: &Device, optim: OptimizerConfig) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
        let hf_config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainerError::checkpoint(&path, e))?;
        let tensors = checkpoint::read_tensors(dir, device)?;
        Self::new(hf_config, tensors, device, optim)
    }

    /// A backend over named tensors (HF names) and the `config.json` they belong to, training
    /// in one micro-batch (see [`CandleBackend::split`]).
    pub fn new(
        hf_config: serde_json::Value,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        optim: OptimizerConfig,
    ) -> Result<Self> {
        let config = HfConfig::from_json(&hf_config.to_string())?.into_config()?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for n in names {
            let t = tensors[&n].to_dtype(DType::F32)?.to_device(device)?;
            vars.push((n, Var::from_tensor(&t)?));
        }
        let model = Self::build(&config, &vars)?;
        let optimizer = AdamW::new(optim, &vars)?;
        Ok(CandleBackend {
            hf_config,
            vars,
            model,
            optimizer,
            optim_config: optim,
            micro_batches: 1,
            lanes: Vec::new(),
            device: device.clone(),
        })
    }

    /// Splits every step into the config's `micro_batches` (by default one per lane,
    /// `rho_model::lanes::micro_batches`) and runs them side by side on the CPU in the lanes its
    /// `lanes` asks for (`rho_model::lanes::resolve` over the current rayon pool's threads, at
    /// most one per micro-batch); one lane (or a GPU) runs them one after another. The gradients
    /// are the same bits with any number of lanes.
    pub fn split(
        mut self,
        micro_batches: Option<NonZeroUsize>,
        lanes: Option<NonZeroUsize>,
    ) -> Result<Self> {
        let (on_cpu, threads) = (self.device.is_cpu(), rayon::current_num_threads());
        self.micro_batches = rho_model::lanes::micro_batches(micro_batches, lanes, on_cpu, threads);
        self.lanes = rho_model::lanes::start(lanes, on_cpu, self.micro_batches, "trainer-lane")
            .map_err(|e| TrainerError::ConfigField {
                field: "lanes",
                reason: format!("could not start the lanes' threads: {e}"),
            })?;
        if self.lanes() > 1 {
            tracing::info!(
                micro_batches = self.micro_batches,
                lanes = self.lanes(),
                threads,
                "micro-batches run side by side"
            );
        }
        Ok(self)
    }

    /// Micro-batches per step (fewer when a batch has fewer rows).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// How many micro-batches run at once.
    pub fn lanes(&self) -> usize {
        self.lanes.len().max(1)
    }

    /// `f(i)` for every `i` in `0..n`, item `i` in lane `i % lanes`, each lane on its own
    /// threads; the results in item order.
    fn in_lanes<T: Send>(&self, n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
        let lanes = self.lanes.len();
        let mut out: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
        std::thread::scope(|s| {
            let f = &f;
            let running: Vec<_> = self
                .lanes
                .iter()
                .enumerate()
                .map(|(lane, pool)| {
                    s.spawn(move || {
                        pool.install(|| {
                            (lane..n)
                                .step_by(lanes)
                                .map(|i| (i, f(i)))
                                .collect::<Vec<_>>()
                        })
                    })
                })
                .collect();
            for lane in running {
                let done = lane
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                for (i, r) in done {
                    out[i] = Some(r);
                }
            }
        });
        out.into_iter()
            .map(|r| r.expect("every item ran in a lane"))
            .collect()
    }

    fn build(config: &Config, vars: &[(String, Var)]) -> Result<DecoderLm> {
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok(DecoderLm::from_tensors(config.clone(), &map, DType::F32)?)
    }

    /// The model being trained.
    pub fn model(&self) -> &DecoderLm {
        &self.model
    }

    /// The trained variables, by HuggingFace name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The current weights, copied.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    fn ids(&self, batch: &TokenBatch, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let w = batch.window;
        let slice = &batch.tokens[rows.start * w..rows.end * w];
        Ok(Tensor::from_slice(slice, (rows.len(), w), &self.device)?)
    }

    /// The objective `sum(loss * mask) / denom` of token ids `[B, W]` and its gradient for every
    /// variable, in [`CandleBackend::vars`] order (zeros where a variable gets none).
    pub fn gradients(&self, ids: &Tensor, mask: &[f32], denom: f32) -> Result<(f32, Vec<Tensor>)> {
        let losses = per_token_loss(&self.model, ids, ForwardMode::Differentiable, None)?;
        self.backward_masked(&losses, mask, denom)
    }

    /// Backpropagates `sum(losses * mask) / denom`; returns its value and the gradient of every
    /// variable in [`CandleBackend::vars`] order (zeros where a variable gets none).
    fn backward_masked(
        &self,
        losses: &Tensor,
        mask: &[f32],
        denom: f32,
    ) -> Result<(f32, Vec<Tensor>)> {
        let m = Tensor::from_slice(mask, losses.dims(), &self.device)?;
        let objective = ((losses * &m)?.sum_all()? / f64::from(denom))?;
        let store = objective.backward()?;
        let grads = self
            .vars
            .iter()
            .map(|(_, v)| match store.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((objective.to_scalar::<f32>()?, grads))
    }
}

/// The forward, selection and backward passes of one step, before the update.
#[derive(Debug)]
pub struct StepGradients {
    /// The model's own loss of every target position, row-major `[rows, window - 1]`.
    pub current: Vec<f32>,
    /// The selection mask (1.0 for a kept position), like `current`.
    pub mask: Vec<f32>,
    /// Positions kept.
    pub kept: f32,
    /// The gradient of the mean loss over the kept positions for every variable, in
    /// [`CandleBackend::vars`] order (zeros where a variable gets none); empty when nothing is
    /// kept (the step then changes nothing).
    pub grads: Vec<Tensor>,
}

impl CandleBackend {
    /// The forward pass of the step's batch, the selection over its losses, and the backward
    /// pass of the mean loss over the selected positions (summed over micro-batches in their
    /// order, however many lanes ran them). [`Backend::step`] is this, then the update.
    pub fn step_gradients(
        &self,
        step: u64,
        input: &StepInput,
        selection: &Selection,
    ) -> Result<StepGradients> {
        let b = &input.batch;
        let (rows, t) = (b.rows, b.window - 1);
        let valid = input.valid();
        let chunk = rows.div_ceil(self.micro_batches.min(rows));
        let ranges: Vec<std::ops::Range<usize>> = (0..rows)
            .step_by(chunk)
            .map(|s| s..(s + chunk).min(rows))
            .collect();

        // The current model's losses of the whole step's batch come first: selection over the
        // batch needs all of them. With one micro-batch the same forward also gives gradients.
        let mut current = Vec::with_capacity(rows * t);
        let mut single = None;
        // Micro-batches side by side keep their losses' graphs for the backward pass.
        let mut kept_graphs = Vec::new();
        if ranges.len() > 1 && self.lanes.len() > 1 {
            kept_graphs = self.in_lanes(ranges.len(), |i| {
                let ids = self.ids(b, ranges[i].clone())?;
                Ok(per_token_loss(
                    &self.model,
                    &ids,
                    ForwardMode::Differentiable,
                    None,
                )?)
            })?;
            for l in &kept_graphs {
                current.extend(l.flatten_all()?.to_vec1::<f32>()?);
            }
        } else if ranges.len() == 1 {
            let ids = self.ids(b, 0..rows)?;
            let losses = per_token_loss(&self.model, &ids, ForwardMode::Differentiable, None)?;
            current = losses.flatten_all()?.to_vec1::<f32>()?;
            single = Some(losses);
        } else {
            for r in &ranges {
                let ids = self.ids(b, r.clone())?;
                let l = per_token_loss(&self.model, &ids, ForwardMode::Differentiable, None)?;
                current.extend(l.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let mask = selection.mask(
            step,
            &selection::Losses {
                rows,
                len: t,
                current: &current,
                reference: input.ref_loss.as_deref(),
                valid: &valid,
            },
        );
        let kept: f32 = mask.iter().sum();
        let mut grads = Vec::new();
        if kept > 0.0 {
            let mask_of = |r: &std::ops::Range<usize>| &mask[r.start * t..r.end * t];
            let mut side_by_side = if kept_graphs.is_empty() {
                Vec::new()
            } else {
                self.in_lanes(ranges.len(), |i| {
                    Ok(self
                        .backward_masked(&kept_graphs[i], mask_of(&ranges[i]), kept)?
                        .1)
                })?
            }
            .into_iter();
            kept_graphs.clear();
            // Summed in micro-batch order, however they ran.
            let mut total: Option<Vec<Tensor>> = None;
            for r in &ranges {
                let m = mask_of(r);
                let grads = match (&single, side_by_side.next()) {
                    (_, Some(grads)) => grads,
                    (Some(losses), None) => self.backward_masked(losses, m, kept)?.1,
                    (None, None) => self.gradients(&self.ids(b, r.clone())?, m, kept)?.1,
                };
                total = Some(match total {
                    None => grads,
                    Some(acc) => acc
                        .iter()
                        .zip(&grads)
                        .map(|(a, g)| a + g)
                        .collect::<candle_core::Result<Vec<_>>>()?,
                });
            }
            grads = total.unwrap_or_default();
        }
        Ok(StepGradients {
            current,
            mask,
            kept,
            grads,
        })
    }
}

impl Backend for CandleBackend {
    fn step(&mut self, step: u64, input: &StepInput, selection: &Selection) -> Result<StepStats> {
        let StepGradients {
            current,
            mask,
            kept,
            grads,
        } = self.step_gradients(step, input, selection)?;
        let valid = input.valid();
        let n_valid = valid.iter().filter(|v| **v).count();
        let mut grad_norm = 0f32;
        let lr = self.optim_config.lr_at(step);
        if !grads.is_empty() {
            // One variable's squared norm per task, each summed by the same tensor ops as ever,
            // then added up in variable order: the same bits as a serial loop.
            let sq: f32 = grads
                .par_iter()
                .map(|g| {
                    g.sqr()
                        .and_then(|s| s.sum_all())
                        .and_then(|s| s.to_scalar::<f32>())
                })
                .collect::<candle_core::Result<Vec<f32>>>()?
                .iter()
                .sum();
            grad_norm = sq.sqrt();
            // Clipping scales every gradient; the optimizer applies the scale as it reads them.
            let scale = match self.optim_config.grad_clip {
                Some(clip) if f64::from(grad_norm) > clip => {
                    Some(clip / (f64::from(grad_norm) + 1e-6))
                }
                _ => None,
            };
            self.optimizer.step(&self.vars, &grads, lr, scale)?;
        }

        let loss_all = selection::masked_mean(
            &current,
            &valid
                .iter()
                .map(|&v| f32::from(u8::from(v)))
                .collect::<Vec<_>>(),
        );
        let mean_excess = match &input.ref_loss {
            Some(r) => {
                let s: f64 = (0..current.len())
                    .filter(|&i| valid[i])
                    .map(|i| f64::from(current[i] - r[i]))
                    .sum();
                (s / n_valid.max(1) as f64) as f32
            }
            None => 0.0,
        };
        Ok(StepStats {
            loss_selected: selection::masked_mean(&current, &mask),
            loss_all,
            selected_fraction: if n_valid == 0 {
                0.0
            } else {
                kept / n_valid as f32
            },
            mean_excess,
            lr,
            grad_norm,
            tokens: n_valid as u64,
        })
    }

    fn eval(&mut self, batches: &[TokenBatch]) -> Result<f32> {
        let (mut sum, mut count) = (0f64, 0f64);
        for b in batches {
            let ids = self.ids(b, 0..b.rows)?;
            let losses =
                per_token_loss(&self.model, &ids, ForwardMode::Fused, None)?.to_vec2::<f32>()?;
            for (row, &len) in losses.iter().zip(&b.lengths) {
                let n = (len as usize).saturating_sub(1);
                sum += row[..n].iter().map(|&l| f64::from(l)).sum::<f64>();
                count += n as f64;
            }
        }
        Ok(if count == 0.0 {
            0.0
        } else {
            (sum / count) as f32
        })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save(&dir.join("model"), &self.hf_config, &self.weights()?, None)?;
        let state = self.optimizer.state();
        let path = dir.join("optimizer.safetensors");
        candle_core::safetensors::save(&state, &path)
            .map_err(|e| TrainerError::checkpoint(&path, e))?;
        let meta = OptimizerMeta {
            adam_steps: self.optimizer.t,
        };
        let path = dir.join("optimizer.json");
        let text = serde_json::to_string(&meta).map_err(|e| TrainerError::checkpoint(&path, e))?;
        std::fs::write(&path, text).map_err(|e| TrainerError::io(&path, e))?;
        Ok(())
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        let weights = checkpoint::read_tensors(&dir.join("model"), &self.device)?;
        for (n, v) in &self.vars {
            let t = weights
                .get(n)
                .ok_or_else(|| TrainerError::checkpoint(dir, format!("lacks weight `{n}`")))?;
            v.set(&t.to_dtype(DType::F32)?)?;
        }
        let path = dir.join("optimizer.safetensors");
        let state = candle_core::safetensors::load(&path, &self.device)
            .map_err(|e| TrainerError::checkpoint(&path, e))?;
        let path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
        let meta: OptimizerMeta =
            serde_json::from_str(&text).map_err(|e| TrainerError::checkpoint(&path, e))?;
        let moments = dir.join("optimizer.safetensors");
        self.optimizer
            .load_state(&state, meta.adam_steps, &moments)?;
        Ok(())
    }
}
