//! Devices and dtypes as configs name them.

use candle_core::{DType, Device};

use crate::ModelError;

/// `cpu`, `cuda` or `cuda:N`. CUDA needs the `cuda` cargo feature.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let bad = |reason: String| ModelError::Config {
        field: "device",
        reason,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{s}`: bad device number")))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                return Err(bad(format!(
                    "`{s}`: this build has no CUDA support (build with `--features cuda`)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| bad(format!("`{s}`: {e}")))
        }
        s => Err(bad(format!("`{s}` is not a device (cpu, cuda, cuda:N)"))),
    }
}

/// `f32`, `bf16` or `f16`. CPU matmul rejects the half types, so they need a GPU.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType, ModelError> {
    let bad = |reason: String| ModelError::Config {
        field: "dtype",
        reason,
    };
    let dtype = match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        s => return Err(bad(format!("`{s}` is not a dtype (f32, bf16, f16)"))),
    };
    if device.is_cpu() && dtype != DType::F32 {
        return Err(bad(format!(
            "`{spec}` needs a GPU: CPU matmul supports f32 only"
        )));
    }
    Ok(dtype)
}
