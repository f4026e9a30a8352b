//! Encoding and decoding of [`Message`]s to and from multipart frames.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::messages::*;
use crate::{DecodeError, Fingerprint, PROTOCOL_VERSION};

/// Size bounds applied before a message is looked into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The sum of all frame sizes.
    pub max_message_bytes: u64,
    /// The JSON header frame alone.
    pub max_header_bytes: u64,
}

impl Limits {
    /// The default limits with another largest message size (a process config's
    /// `max_message_bytes`).
    pub fn with_max_message_bytes(max_message_bytes: u64) -> Self {
        Limits {
            max_message_bytes,
            ..Limits::default()
        }
    }
}

impl Limits {
    /// The transport's options for a socket under these limits: every frame length a peer
    /// claims, and every multipart message it sends, is checked against `max_message_bytes`
    /// before the transport reserves memory for it; a peer that claims more is disconnected
    /// (it reconnects by the heartbeat rule). The same limit is then checked again on the
    /// decoded frames by [`Message::decode_with`].
    pub fn socket_options(&self) -> zeromq::SocketOptions {
        let mut options = zeromq::SocketOptions::default();
        options.max_message_size(usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX));
        options
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 256 << 20,
            max_header_bytes: 16 << 20,
        }
    }
}

/// Every message the processes exchange.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Token windows from the loader.
    Batch(TokenBatch),
    /// Token windows with the reference loss of every target (from a selector or a cache).
    Scored(ScoredBatch),
    /// A consumer asks for more batches.
    Credit(Credit),
    /// The trainer has consumed batches.
    Ack(Ack),
    /// Liveness, both ways.
    Heartbeat(Heartbeat),
    /// The consumer's stream cursor.
    Resume(Resume),
    /// Stop.
    Shutdown(Shutdown),
    /// The stream is exhausted.
    End(End),
}

/// A tensor frame as the header declares it.
#[derive(Debug, Serialize, Deserialize)]
struct TensorSpec {
    name: String,
    dtype: String,
    shape: Vec<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    rho: u64,
    kind: String,
    #[serde(default)]
    auth: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct BatchHeader {
    rho: u32,
    kind: String,
    run_id: String,
    seq: u64,
    epoch: u64,
    tokenizer: Fingerprint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ref_model: Option<Fingerprint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<Box<StreamIdentity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world: Option<u32>,
    lengths: Vec<u32>,
    doc_starts: Vec<Vec<u32>>,
    tensors: Vec<TensorSpec>,
}

#[derive(Serialize, Deserialize)]
struct ControlHeader {
    rho: u32,
    kind: String,
    run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seqs: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<Box<StreamIdentity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world: Option<u32>,
}

impl ControlHeader {
    fn new(kind: &str, run_id: &str) -> Self {
        ControlHeader {
            rho: PROTOCOL_VERSION,
            kind: kind.to_string(),
            run_id: run_id.to_string(),
            n: None,
            seqs: None,
            role: None,
            at_ms: None,
            next_seq: None,
            reason: None,
            stream: None,
            total: None,
            rank: None,
            world: None,
        }
    }
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    value.ok_or_else(|| DecodeError::invalid(field, "missing"))
}

/// A message's rank (a credit's, a resume's, a batch's): `rank` and `world` both or neither,
/// the rank below the world.
fn rank_of(rank: Option<u32>, world: Option<u32>) -> Result<Option<Rank>, DecodeError> {
    match (rank, world) {
        (None, None) => Ok(None),
        (Some(r), Some(w)) => Rank::new(r, w).map(Some).ok_or_else(|| {
            DecodeError::invalid("rank", format!("rank {r} of {w}: not below the world"))
        }),
        (Some(_), None) => Err(DecodeError::invalid("world", "missing beside `rank`")),
        (None, Some(_)) => Err(DecodeError::invalid("rank", "missing beside `world`")),
    }
}

impl Message {
    /// The message kind as it appears in the header's `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Batch(_) => "batch",
            Message::Scored(_) => "scored",
            Message::Credit(_) => "credit",
            Message::Ack(_) => "ack",
            Message::Heartbeat(_) => "heartbeat",
            Message::Resume(_) => "resume",
            Message::Shutdown(_) => "shutdown",
            Message::End(_) => "end",
        }
    }

    /// The run id every message carries.
    pub fn run_id(&self) -> &str {
        match self {
            Message::Batch(b) => &b.run_id,
            Message::Scored(s) => &s.batch.run_id,
            Message::Credit(m) => &m.run_id,
            Message::Ack(m) => &m.run_id,
            Message::Heartbeat(m) => &m.run_id,
            Message::Resume(m) => &m.run_id,
            Message::Shutdown(m) => &m.run_id,
            Message::End(m) => &m.run_id,
        }
    }

    /// Encodes the message as multipart frames: the JSON header, then the tensor frames.
    pub fn encode(&self) -> Vec<Bytes> {
        match self {
            Message::Batch(b) => encode_batch(b, None),
            Message::Scored(s) => encode_batch(&s.batch, Some((&s.ref_model, &s.ref_loss))),
            Message::Credit(m) => {
                let mut h = ControlHeader::new("credit", &m.run_id);
                h.n = Some(m.n);
                h.rank = m.rank.map(|r| r.rank);
                h.world = m.rank.map(|r| r.world);
                control_frames(&h)
            }
            Message::Ack(m) => {
                let mut h = ControlHeader::new("ack", &m.run_id);
                h.seqs = Some(m.seqs.clone());
                control_frames(&h)
            }
            Message::Heartbeat(m) => {
                let mut h = ControlHeader::new("heartbeat", &m.run_id);
                h.role = Some(m.role);
                h.at_ms = Some(m.at_ms);
                control_frames(&h)
            }
            Message::Resume(m) => {
                let mut h = ControlHeader::new("resume", &m.run_id);
                h.next_seq = Some(m.next_seq);
                h.stream = m.stream.clone();
                h.rank = m.rank.map(|r| r.rank);
                h.world = m.rank.map(|r| r.world);
                control_frames(&h)
            }
            Message::Shutdown(m) => {
                let mut h = ControlHeader::new("shutdown", &m.run_id);
                h.reason = Some(m.reason.clone());
                control_frames(&h)
            }
            Message::End(m) => {
                let mut h = ControlHeader::new("end", &m.run_id);
                h.total = Some(m.total);
                control_frames(&h)
            }
        }
    }

    /// Encodes and, with a key, signs: the header declares `"auth": "hmac-sha256"` and a tag
    /// frame follows the others (see [`crate::auth`]).
    pub fn encode_with(&self, key: Option<&crate::Key>) -> Vec<Bytes> {
        let mut frames = self.encode();
        if let Some(key) = key {
            let header = &frames[0];
            let mut signed = Vec::with_capacity(header.len() + 24);
            signed.extend_from_slice(b"{\"auth\":\"hmac-sha256\",");
            signed.extend_from_slice(&header[1..]);
            frames[0] = Bytes::from(signed);
            let tag = key.tag(&frames);
            frames.push(Bytes::copy_from_slice(&tag));
        }
        frames
    }

    /// Decodes, and with a key first verifies the tag: a message without a valid tag is refused
    /// before anything in it is parsed. Without a key, a signed message's tag is dropped unchecked.
    pub fn decode_with(
        frames: &[Bytes],
        limits: &Limits,
        key: Option<&crate::Key>,
    ) -> Result<Message, DecodeError> {
        check_size(frames, limits)?;
        match key {
            Some(key) => {
                let (tag, body) = frames.split_last().ok_or(DecodeError::Empty)?;
                if body.is_empty() || tag.len() != crate::auth::TAG_BYTES || !key.verify(body, tag)
                {
                    return Err(DecodeError::Unauthenticated);
                }
                Self::decode(body, limits)
            }
            None => {
                let signed = frames
                    .first()
                    .and_then(|h| serde_json::from_slice::<Envelope>(h).ok())
                    .is_some_and(|e| e.auth.is_some());
                if signed && frames.len() > 1 {
                    Self::decode(&frames[..frames.len() - 1], limits)
                } else {
                    Self::decode(frames, limits)
                }
            }
        }
    }

    /// Decodes multipart frames into a message, validating every declared size and shape.
    pub fn decode(frames: &[Bytes], limits: &Limits) -> Result<Message, DecodeError> {
        check_size(frames, limits)?;
        let header = frames.first().ok_or(DecodeError::Empty)?;
        if header.len() as u64 > limits.max_header_bytes {
            return Err(DecodeError::HeaderTooLarge {
                size: header.len() as u64,
                max: limits.max_header_bytes,
            });
        }
        let envelope: Envelope = serde_json::from_slice(header).map_err(json_error)?;
        if envelope.rho != u64::from(PROTOCOL_VERSION) {
            return Err(DecodeError::Version {
                got: envelope.rho,
                supported: PROTOCOL_VERSION,
            });
        }
        match envelope.kind.as_str() {
            "batch" | "scored" => decode_batch(header, &frames[1..], envelope.kind == "scored"),
            "credit" | "ack" | "heartbeat" | "resume" | "shutdown" | "end" => {
                let kind = match envelope.kind.as_str() {
                    "credit" => "credit",
                    "ack" => "ack",
                    "heartbeat" => "heartbeat",
                    "resume" => "resume",
                    "shutdown" => "shutdown",
                    _ => "end",
                };
                if frames.len() != 1 {
                    return Err(DecodeError::FrameCount {
                        kind,
                        expected: 1,
                        got: frames.len(),
                    });
                }
                decode_control(header)
            }
            other => Err(DecodeError::UnknownKind {
                kind: other.chars().take(64).collect(),
            }),
        }
    }
}

/// Refuses a message whose frames add up to more than the limit, before anything else.
fn check_size(frames: &[Bytes], limits: &Limits) -> Result<(), DecodeError> {
    let size = frames
        .iter()
        .fold(0u64, |acc, f| acc.saturating_add(f.len() as u64));
    if size > limits.max_message_bytes {
        return Err(DecodeError::TooLarge {
            size,
            max: limits.max_message_bytes,
        });
    }
    Ok(())
}

fn json_error(e: serde_json::Error) -> DecodeError {
    DecodeError::HeaderJson {
        reason: e.to_string(),
    }
}

fn control_frames(h: &ControlHeader) -> Vec<Bytes> {
    // Serializing a struct of strings and integers cannot fail.
    vec![Bytes::from(serde_json::to_vec(h).unwrap_or_default())]
}

fn decode_control(header: &[u8]) -> Result<Message, DecodeError> {
    let h: ControlHeader = serde_json::from_slice(header).map_err(json_error)?;
    let run_id = h.run_id;
    Ok(match h.kind.as_str() {
        "credit" => Message::Credit(Credit {
            run_id,
            n: required(h.n, "n")?,
            rank: rank_of(h.rank, h.world)?,
        }),
        "ack" => Message::Ack(Ack {
            run_id,
            seqs: required(h.seqs, "seqs")?,
        }),
        "heartbeat" => Message::Heartbeat(Heartbeat {
            run_id,
            role: required(h.role, "role")?,
            at_ms: required(h.at_ms, "at_ms")?,
        }),
        "resume" => Message::Resume(Resume {
            run_id,
            next_seq: required(h.next_seq, "next_seq")?,
            stream: h.stream,
            rank: rank_of(h.rank, h.world)?,
        }),
        "shutdown" => Message::Shutdown(Shutdown {
            run_id,
            reason: required(h.reason, "reason")?,
        }),
        _ => Message::End(End {
            run_id,
            total: required(h.total, "total")?,
        }),
    })
}

fn encode_batch(b: &TokenBatch, scored: Option<(&Fingerprint, &Vec<f32>)>) -> Vec<Bytes> {
    let (rows, window) = (b.rows as u64, b.window as u64);
    let mut tensors = vec![TensorSpec {
        name: "tokens".into(),
        dtype: "u32".into(),
        shape: vec![rows, window],
    }];
    if scored.is_some() {
        tensors.push(TensorSpec {
            name: "ref_loss".into(),
            dtype: "f32".into(),
            shape: vec![rows, window.saturating_sub(1)],
        });
    }
    let header = BatchHeader {
        rho: PROTOCOL_VERSION,
        kind: if scored.is_some() { "scored" } else { "batch" }.into(),
        run_id: b.run_id.clone(),
        seq: b.seq,
        epoch: b.epoch,
        tokenizer: b.tokenizer.clone(),
        ref_model: scored.map(|(f, _)| f.clone()),
        stream: b.stream.clone(),
        rank: b.rank.map(|r| r.rank),
        world: b.rank.map(|r| r.world),
        lengths: b.lengths.clone(),
        doc_starts: b.doc_starts.clone(),
        tensors,
    };
    let mut frames = vec![
        Bytes::from(serde_json::to_vec(&header).unwrap_or_default()),
        Bytes::from(u32_to_le(&b.tokens)),
    ];
    if let Some((_, loss)) = scored {
        frames.push(Bytes::from(f32_to_le(loss)));
    }
    frames
}

fn u32_to_le(values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn f32_to_le(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn expect_tensor(
    spec: Option<&TensorSpec>,
    name: &'static str,
    dtype: &'static str,
    shape: [u64; 2],
) -> Result<(), DecodeError> {
    let spec = spec.ok_or_else(|| DecodeError::invalid("tensors", format!("missing `{name}`")))?;
    if spec.name != name {
        return Err(DecodeError::invalid(
            "tensors",
            format!("expected tensor `{name}`, found `{}`", truncate(&spec.name)),
        ));
    }
    if spec.dtype != dtype {
        return Err(DecodeError::Dtype {
            field: name,
            got: truncate(&spec.dtype),
            expected: dtype,
        });
    }
    if spec.shape != shape {
        return Err(DecodeError::invalid(
            "tensors",
            format!("`{name}` has shape {:?}, expected {shape:?}", spec.shape),
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn decode_batch(header: &[u8], data: &[Bytes], scored: bool) -> Result<Message, DecodeError> {
    let h: BatchHeader = serde_json::from_slice(header).map_err(json_error)?;
    let (rows, window) = batch_shape(&h, data, scored)?;
    check_rows(&h, window)?;
    let rank = rank_of(h.rank, h.world)?;
    let tokens: Vec<u32> = data[0]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let batch = TokenBatch {
        run_id: h.run_id,
        seq: h.seq,
        epoch: h.epoch,
        rows: rows as usize,
        window: window as usize,
        tokenizer: h.tokenizer,
        tokens,
        lengths: h.lengths,
        doc_starts: h.doc_starts,
        stream: h.stream,
        rank,
    };
    if !scored {
        if h.ref_model.is_some() {
            return Err(DecodeError::invalid(
                "ref_model",
                "only a `scored` message carries a reference model",
            ));
        }
        return Ok(Message::Batch(batch));
    }
    let ref_model = h
        .ref_model
        .ok_or_else(|| DecodeError::invalid("ref_model", "missing"))?;
    let loss_bytes = rows * (window - 1) * 4;
    if data[1].len() as u64 != loss_bytes {
        return Err(DecodeError::FrameSize {
            frame: "ref_loss",
            expected: loss_bytes,
            got: data[1].len() as u64,
        });
    }
    let ref_loss = data[1]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Message::Scored(ScoredBatch {
        batch,
        ref_model,
        ref_loss,
    }))
}

/// A batch's rows and window, from its header's tensors, checked against the frames that
/// arrived (so that no claim in the header can make the receiver allocate more than arrived).
fn batch_shape(h: &BatchHeader, data: &[Bytes], scored: bool) -> Result<(u64, u64), DecodeError> {
    let kind = if scored { "scored" } else { "batch" };
    let rows = h.lengths.len() as u64;
    if rows == 0 {
        return Err(DecodeError::invalid(
            "lengths",
            "a batch has at least one row",
        ));
    }
    let window = h
        .tensors
        .first()
        .and_then(|t| t.shape.get(1).copied())
        .ok_or_else(|| DecodeError::invalid("tensors", "missing `tokens` shape"))?;
    if window < 2 {
        return Err(DecodeError::invalid(
            "tensors",
            "a window holds at least 2 tokens",
        ));
    }
    expect_tensor(h.tensors.first(), "tokens", "u32", [rows, window])?;
    let expected_tensors = if scored { 2 } else { 1 };
    if scored {
        expect_tensor(h.tensors.get(1), "ref_loss", "f32", [rows, window - 1])?;
    }
    if h.tensors.len() != expected_tensors {
        return Err(DecodeError::invalid(
            "tensors",
            format!(
                "`{kind}` declares {expected_tensors} tensors, got {}",
                h.tensors.len()
            ),
        ));
    }
    if data.len() != expected_tensors {
        return Err(DecodeError::FrameCount {
            kind,
            expected: expected_tensors + 1,
            got: data.len() + 1,
        });
    }
    let token_bytes = rows
        .checked_mul(window)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| DecodeError::invalid("tensors", "shape overflows"))?;
    if data[0].len() as u64 != token_bytes {
        return Err(DecodeError::FrameSize {
            frame: "tokens",
            expected: token_bytes,
            got: data[0].len() as u64,
        });
    }
    Ok((rows, window))
}

/// Every row's length within the window and its document starts strictly increasing inside it.
fn check_rows(h: &BatchHeader, window: u64) -> Result<(), DecodeError> {
    let rows = h.lengths.len();
    if h.doc_starts.len() != rows {
        return Err(DecodeError::invalid(
            "doc_starts",
            format!("{} rows, expected {rows}", h.doc_starts.len()),
        ));
    }
    for (b, (&len, starts)) in h.lengths.iter().zip(&h.doc_starts).enumerate() {
        if u64::from(len) > window {
            return Err(DecodeError::invalid(
                "lengths",
                format!("row {b} has length {len} > window {window}"),
            ));
        }
        if starts.windows(2).any(|w| w[0] >= w[1]) {
            return Err(DecodeError::invalid(
                "doc_starts",
                format!("row {b} is not strictly increasing"),
            ));
        }
        if starts.last().is_some_and(|&s| u64::from(s) >= window) {
            return Err(DecodeError::invalid(
                "doc_starts",
                format!("row {b} has a start outside the window"),
            ));
        }
    }
    Ok(())
}
