use thiserror::Error;

/// Why a message was refused. Decoding returns one of these and never panics.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message: no header frame")]
    Empty,
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("header frame of {size} bytes exceeds the maximum of {max} bytes")]
    HeaderTooLarge { size: u64, max: u64 },
    #[error("header is not valid JSON for a rho message: {reason}")]
    HeaderJson { reason: String },
    #[error("protocol version {got} is not supported (this build speaks version {supported})")]
    Version { got: u64, supported: u32 },
    #[error("unknown message kind `{kind}`")]
    UnknownKind { kind: String },
    #[error("`{kind}` message must have {expected} frames, got {got}")]
    FrameCount {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("frame `{frame}` must hold {expected} bytes, got {got}")]
    FrameSize {
        frame: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("field `{field}` has dtype `{got}`, expected `{expected}`")]
    Dtype {
        field: &'static str,
        got: String,
        expected: &'static str,
    },
    #[error("message is not signed with this run's secret")]
    Unauthenticated,
    #[error("invalid field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
