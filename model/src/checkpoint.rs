//! HuggingFace checkpoint directories: `config.json` plus `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`; read and written the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::HfConfig;
use crate::model::DecoderLm;
use crate::{ModelError, Result};

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The weight files of a checkpoint directory, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| err(&index, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| err(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(err(
        dir,
        "neither model.safetensors nor model.safetensors.index.json is there",
    ))
}

/// Reads `config.json` of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
    HfConfig::from_json(&text).map_err(|e| err(&path, e.to_string()))
}

/// Reads every tensor of a checkpoint directory, in the dtypes it was saved in.
pub fn read_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_tensors_as(dir, device, None)
}

/// Reads every tensor of a checkpoint directory, floating-point ones converted to `dtype` (when
/// given) as they are read: the peak memory is the weights in `dtype` plus a 16 MiB read buffer,
/// never a second copy of a tensor or a whole file (a safetensors file is read tensor by tensor
/// in chunks, not mapped or slurped).
pub fn read_tensors_as(
    dir: &Path,
    device: &Device,
    dtype: Option<DType>,
) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        read_safetensors(&file, device, dtype, &mut all)?;
    }
    Ok(all)
}

/// One tensor as a safetensors header describes it.
#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn stored_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// Reads one safetensors file into `out`, tensor by tensor.
fn read_safetensors(
    path: &Path,
    device: &Device,
    dtype: Option<DType>,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |reason: String| err(path, reason);
    let Opened {
        file: mut f,
        data_start: base,
        header,
        ..
    } = read_header(path)?;
    let mut entries: Vec<(String, TensorEntry)> = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: TensorEntry = serde_json::from_value(v)
            .map_err(|e| bad(format!("tensor `{name}` in the header: {e}")))?;
        entries.push((name, entry));
    }
    // In file order, so that reading is one forward pass.
    entries.sort_by_key(|(_, e)| e.data_offsets[0]);
    for (name, e) in entries {
        let stored = stored_dtype(&e.dtype).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has dtype {}, which rho does not read",
                e.dtype
            ))
        })?;
        let [start, end] = e.data_offsets;
        let expected = e.shape.iter().product::<usize>() * stored.size_in_bytes();
        if end < start || (end - start) as usize != expected {
            return Err(bad(format!(
                "tensor `{name}`: {} bytes for shape {:?} of {}",
                end.saturating_sub(start),
                e.shape,
                e.dtype
            )));
        }
        f.seek(SeekFrom::Start(base + start))
            .map_err(|err| bad(format!("tensor `{name}`: {err}")))?;
        let target = match dtype {
            Some(d) if stored.is_float() => d,
            _ => stored,
        };
        let t = match (Float::of(stored), Float::of(target)) {
            (Some(from), Some(to)) => read_floats(&mut f, expected, from, to, &e.shape, device),
            _ => {
                let mut bytes = vec![0u8; expected];
                f.read_exact(&mut bytes)
                    .map_err(candle_core::Error::wrap)
                    .and_then(|_| Tensor::from_raw_buffer(&bytes, stored, &e.shape, device))
                    .and_then(|t| t.to_dtype(target))
            }
        };
        out.insert(
            name.clone(),
            t.map_err(|err| bad(format!("tensor `{name}`: {err}")))?,
        );
    }
    Ok(())
}

/// The floating-point dtypes read and converted in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Float {
    F32,
    F16,
    Bf16,
}

impl Float {
    fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F32 => Some(Float::F32),
            DType::F16 => Some(Float::F16),
            DType::BF16 => Some(Float::Bf16),
            _ => None,
        }
    }

    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::Bf16 => 2,
        }
    }

    /// One stored little-endian element, exactly, as f32.
    fn decode(self, b: &[u8]) -> f32 {
        match self {
            Float::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Float::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Float::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    }
}

/// Elements read per chunk: the only buffer a conversion needs besides the tensor itself.
const CHUNK_ELEMENTS: usize = 1 << 22;

/// Reads `bytes` bytes of `from` elements at the reader's position into a tensor of `to`,
/// converting chunk by chunk (rounding to nearest, as `Tensor::to_dtype` does): no second copy
/// of the tensor ever exists.
fn read_floats(
    f: &mut impl std::io::Read,
    bytes: usize,
    from: Float,
    to: Float,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = bytes / from.size();
    let mut chunk = vec![0u8; CHUNK_ELEMENTS.min(n) * from.size()];
    // Fills one typed vector, each element converted from its exact f32 value.
    fn fill<T>(
        f: &mut impl std::io::Read,
        n: usize,
        from: Float,
        chunk: &mut [u8],
        convert: impl Fn(f32) -> T,
    ) -> candle_core::Result<Vec<T>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let len = (n - out.len()).min(chunk.len() / from.size()) * from.size();
            f.read_exact(&mut chunk[..len])
                .map_err(candle_core::Error::wrap)?;
            out.extend(
                chunk[..len]
                    .chunks_exact(from.size())
                    .map(|b| convert(from.decode(b))),
            );
        }
        Ok(out)
    }
    match to {
        Float::F32 => Tensor::from_vec(fill(f, n, from, &mut chunk, |x| x)?, shape, device),
        Float::F16 => Tensor::from_vec(
            fill(f, n, from, &mut chunk, half::f16::from_f32)?,
            shape,
            device,
        ),
        Float::Bf16 => Tensor::from_vec(
            fill(f, n, from, &mut chunk, half::bf16::from_f32)?,
            shape,
            device,
        ),
    }
}

/// A safetensors file opened and its header read.
struct Opened {
    /// Positioned after the header.
    file: std::fs::File,
    /// The file's length in bytes.
    len: u64,
    /// Where the tensor data starts (`data_offsets` count from here).
    data_start: u64,
    /// The header's JSON object.
    header: serde_json::Map<String, serde_json::Value>,
}

/// Opens a safetensors file and reads its header.
fn read_header(path: &Path) -> Result<Opened> {
    use std::io::Read;
    let bad = |reason: String| err(path, reason);
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!(
            "truncated or not a safetensors file ({len} bytes, header of {n})"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable header: {e}")))?;
    match header {
        serde_json::Value::Object(header) => Ok(Opened {
            file: f,
            len,
            data_start: 8 + n,
            header,
        }),
        _ => Err(bad("the header is not a JSON object".into())),
    }
}

/// Loads a checkpoint directory as a model, weights converted to `dtype` as they are read.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<DecoderLm> {
    let config = read_config(dir)?.into_config()?;
    let tensors = read_tensors_as(dir, device, Some(dtype))?;
    DecoderLm::from_tensors(config, &tensors, dtype)
}

/// Writes `config.json` and the tensors as a HuggingFace checkpoint directory: one
/// `model.safetensors`, or, above `max_shard_bytes`, shards `model-0000i-of-0000n.safetensors`
/// with `model.safetensors.index.json`. Files are written to temporary names and renamed.
pub fn save(
    dir: &Path,
    config_json: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
    max_shard_bytes: Option<u64>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let limit = max_shard_bytes.unwrap_or(u64::MAX).max(1);
    let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in sorted {
        if current > 0 && current + size(t) > limit {
            shards.push(Vec::new());
            current = 0;
        }
        current += size(t);
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
    }
    let write = |name: &str, items: &[(&String, &Tensor)]| -> Result<()> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let map: HashMap<String, Tensor> = items
            .iter()
            .map(|(n, t)| ((*n).clone(), (*t).clone()))
            .collect();
        candle_core::safetensors::save(&map, &tmp).map_err(|e| err(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, e.to_string()))
    };
    if shards.len() == 1 {
        write("model.safetensors", &shards[0])?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, items) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write(&name, items)?;
            for (t, _) in items {
                weight_map.insert((*t).clone(), name.clone().into());
            }
        }
        let total: u64 = tensors.values().map(size).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap_or_default())
            .map_err(|e| err(&path, e.to_string()))?;
    }
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(config_json).unwrap_or_default(),
    )
    .map_err(|e| err(&path, e.to_string()))?;
    Ok(())
}

/// What a checkpoint directory promises, checked without loading its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspected {
    /// Rows of the embedding (token ids the model can score).
    pub vocab_size: usize,
    /// The longest sequence its positions cover (`max_position_embeddings`).
    pub max_positions: usize,
}

/// Checks a checkpoint directory cheaply, before a process depends on it: `config.json` is
/// there and understood, and every weight file is there and exactly as long as its safetensors
/// header says (a truncated download or copy is found here, with the file named).
pub fn inspect(dir: &Path) -> Result<Inspected> {
    if !dir.is_dir() {
        return Err(err(dir, "not a directory"));
    }
    let config = read_config(dir)?.into_config()?;
    for file in weight_files(dir)? {
        check_safetensors_length(&file)?;
    }
    Ok(Inspected {
        vocab_size: config.vocab_size,
        max_positions: config.max_position_embeddings,
    })
}

fn check_safetensors_length(path: &Path) -> Result<()> {
    let bad = |reason: String| err(path, reason);
    let Opened {
        len,
        data_start,
        header,
        ..
    } = read_header(path)?;
    let end = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if data_start + end != len {
        return Err(bad(format!(
            "{len} bytes, but its header describes {} (truncated or damaged)",
            data_start + end
        )));
    }
    Ok(())
}
