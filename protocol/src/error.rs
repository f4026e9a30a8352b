use thiserror::Error;

/// Why a message was refused. Decoding returns one of these and never panics.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// No frames at all.
    #[error("empty message: no header frame")]
    Empty,
    /// The frames together are larger than [`crate::Limits::max_message_bytes`].
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The header frame is larger than [`crate::Limits::max_header_bytes`].
    #[error("header frame of {size} bytes exceeds the maximum of {max} bytes")]
    HeaderTooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The header frame is not the JSON of a message.
    #[error("header is not valid JSON for a rho message: {reason}")]
    HeaderJson {
        /// What is wrong.
        reason: String,
    },
    /// Another protocol version.
    #[error("protocol version {got} is not supported (this build speaks version {supported})")]
    Version {
        /// What arrived.
        got: u64,
        /// The version this build speaks.
        supported: u32,
    },
    /// A `kind` this version does not know.
    #[error("unknown message kind `{kind}`")]
    UnknownKind {
        /// The message kind.
        kind: String,
    },
    /// Too few or too many frames for the kind.
    #[error("`{kind}` message must have {expected} frames, got {got}")]
    FrameCount {
        /// The message kind.
        kind: &'static str,
        /// What was expected.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// A tensor frame whose size disagrees with the shape its header declares.
    #[error("frame `{frame}` must hold {expected} bytes, got {got}")]
    FrameSize {
        /// The frame.
        frame: &'static str,
        /// What was expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A tensor of another dtype than the protocol's.
    #[error("field `{field}` has dtype `{got}`, expected `{expected}`")]
    Dtype {
        /// The field.
        field: &'static str,
        /// What arrived.
        got: String,
        /// What was expected.
        expected: &'static str,
    },
    /// No tag, or a tag that does not match this run's secret.
    #[error("message is not signed with this run's secret")]
    Unauthenticated,
    /// A header field out of range (or inconsistent with another).
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
