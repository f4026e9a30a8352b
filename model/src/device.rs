//! Devices and dtypes as configs name them: parsed once, when a config is read, into
//! [`DeviceSpec`] and [`DTypeSpec`]; opened ([`DeviceSpec::open`]) when a process starts.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// A device as a config names it: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA device by ordinal (needs the `cuda` cargo feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| format!("`{s}`: bad device number")),
                None => Err(format!("`{s}` is not a device (cpu, cuda, cuda:N)")),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; a CUDA device in a build without CUDA is refused with the fix.
    pub fn open(self) -> Result<Device, ModelError> {
        let bad = |reason: String| ModelError::Config {
            field: "device",
            reason,
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Err(bad(format!(
                "`{self}`: this build has no CUDA support (build with `--features cuda`)"
            ))),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| bad(format!("`{self}`: {e}"))),
        }
    }
}

/// A dtype as a config names it: `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeSpec {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16 (GPU only: CPU matmul has no bfloat16 kernel).
    Bf16,
    /// IEEE half precision (GPU and CPU).
    F16,
}

impl DTypeSpec {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::Bf16 => DType::BF16,
            DTypeSpec::F16 => DType::F16,
        }
    }

    /// The dtype on `device`: CPU matmul has f32 and f16 kernels but none for bf16, so bf16
    /// needs a GPU.
    pub fn on(self, device: DeviceSpec) -> Result<DType, ModelError> {
        if device == DeviceSpec::Cpu && self == DTypeSpec::Bf16 {
            return Err(ModelError::Config {
                field: "dtype",
                reason: format!(
                    "`{self}` needs a GPU: CPU matmul has no bf16 kernel (use f16 or f32 on CPU)"
                ),
            });
        }
        Ok(self.dtype())
    }
}

impl std::str::FromStr for DTypeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DTypeSpec::F32),
            "bf16" => Ok(DTypeSpec::Bf16),
            "f16" => Ok(DTypeSpec::F16),
            _ => Err(format!("`{s}` is not a dtype (f32, f16, bf16)")),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::Bf16 => "bf16",
            DTypeSpec::F16 => "f16",
        })
    }
}

/// `cpu`, `cuda` or `cuda:N`, opened. CUDA needs the `cuda` cargo feature.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let spec: DeviceSpec = spec.parse().map_err(|reason| ModelError::Config {
        field: "device",
        reason,
    })?;
    spec.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_once_and_print_back() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("gpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("not a device"));
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        let d: DeviceSpec = serde_json::from_str("\"cuda:2\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"cuda:2\"");
    }

    #[test]
    fn bf16_needs_a_gpu_f16_does_not() {
        assert_eq!(DTypeSpec::F32.on(DeviceSpec::Cpu).unwrap(), DType::F32);
        assert_eq!(DTypeSpec::F16.on(DeviceSpec::Cpu).unwrap(), DType::F16);
        let e = DTypeSpec::Bf16.on(DeviceSpec::Cpu).unwrap_err().to_string();
        assert!(e.contains("GPU") && e.contains("`bf16`"), "{e}");
        assert_eq!(DTypeSpec::F16.on(DeviceSpec::Cuda(0)).unwrap(), DType::F16);
        let d: DTypeSpec = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(d, DTypeSpec::Bf16);
    }
}
