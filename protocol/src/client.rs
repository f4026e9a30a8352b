//! A DEALER connection to a producer's ROUTER endpoint: connect, ask for work by credit,
//! receive, acknowledge. Selectors and trainers are built on this; so are tests and benchmarks.
//!
//! Receiving runs on its own task, so a [`Consumer`] can be polled in a `select!` loop alongside
//! other work without losing messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;
use zeromq::{DealerSendHalf, DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::{Ack, Credit, DecodeError, Heartbeat, Key, Limits, Message, Rank, Resume, Role};

/// Why a connection to a producer failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The endpoint could not be connected to.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        #[source]
        /// The cause.
        source: zeromq::ZmqError,
    },
    /// A message could not be sent.
    #[error("sending a message")]
    Send(#[from] zeromq::ZmqError),
    /// A message without frames (nothing to send).
    #[error("an empty message (no frames) cannot be sent")]
    Empty,
    /// A message arrived that is refused (counted and logged by the caller).
    #[error("refused message")]
    Decode(#[from] DecodeError),
}

/// A message for one peer of a ROUTER socket: its identity frame, then the message's frames.
pub fn addressed(peer: &Bytes, frames: &[Bytes]) -> ZmqMessage {
    let mut all = Vec::with_capacity(frames.len() + 1);
    all.push(peer.clone());
    all.extend_from_slice(frames);
    // `all` has at least the identity frame, so this cannot fail.
    ZmqMessage::try_from(all).unwrap_or_else(|_| ZmqMessage::from(Bytes::new()))
}

/// A connection to one producer.
pub struct Consumer {
    sender: DealerSendHalf,
    inbox: mpsc::Receiver<Result<Message, DecodeError>>,
    task: tokio::task::JoinHandle<()>,
    run_id: String,
    key: Option<Key>,
    endpoint: String,
    limits: Limits,
    /// Milliseconds after `born` at which the last message arrived (or the connection was made).
    heard_ms: Arc<AtomicU64>,
    born: Instant,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Consumer {
    /// Connects, retrying until the endpoint accepts (processes may start in any order).
    pub async fn connect(
        endpoint: &str,
        run_id: &str,
        limits: Limits,
    ) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, run_id, limits, None).await
    }

    /// Connects; with a key, every message sent is signed and every message received must be.
    pub async fn connect_with(
        endpoint: &str,
        run_id: &str,
        limits: Limits,
        key: Option<Key>,
    ) -> Result<Self, ClientError> {
        let mut socket = DealerSocket::with_options(limits.socket_options());
        socket
            .connect(endpoint)
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let (sender, mut receiver) = socket.split();
        let (tx, inbox) = mpsc::channel(64);
        let recv_key = key.clone();
        let born = Instant::now();
        let heard_ms = Arc::new(AtomicU64::new(0));
        let heard = heard_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok(m) = receiver.recv().await {
                heard.store(born.elapsed().as_millis() as u64, Ordering::Relaxed);
                let frames: Vec<Bytes> = m.into_vec();
                if tx
                    .send(Message::decode_with(&frames, &limits, recv_key.as_ref()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Consumer {
            sender,
            inbox,
            task,
            run_id: run_id.to_string(),
            key,
            endpoint: endpoint.to_string(),
            limits,
            heard_ms,
            born,
        })
    }

    /// How long since the producer last sent anything (or since the connection was made).
    pub fn silent_for(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.heard_ms.load(Ordering::Relaxed)))
    }

    /// Replaces the connection by a fresh one to the same endpoint (waiting until it accepts),
    /// unless `stop` resolves first: then `Ok(false)` and the old connection stays. The producer
    /// sees a new peer: credits given on the old connection are gone with it.
    pub async fn reconnect_or<F: std::future::Future + Unpin>(
        &mut self,
        stop: &mut F,
    ) -> Result<bool, ClientError> {
        let signing = if self.key.is_some() {
            "signed with this process's secret (`secret_file` or RHO_SECRET)"
        } else {
            "unsigned (no `secret_file`, no RHO_SECRET)"
        };
        tracing::warn!(
            endpoint = %self.endpoint,
            silent_ms = self.silent_for().as_millis() as u64,
            "no answer: reconnecting. If that process is running, it may be refusing this one's messages, which are {signing}: every process of a run needs the same secret, and the refusing side logs `refused`"
        );
        let fresh = tokio::select! {
            c = Self::connect_with(&self.endpoint, &self.run_id, self.limits, self.key.clone()) => c?,
            _ = stop => return Ok(false),
        };
        *self = fresh;
        Ok(true)
    }

    /// The endpoint connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The run this connection belongs to.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Encodes (and signs, with a key) `message` and sends it.
    pub async fn send(&mut self, message: &Message) -> Result<(), ClientError> {
        let frames = message.encode_with(self.key.as_ref());
        self.send_frames(frames).await
    }

    /// Sends already encoded frames.
    pub async fn send_frames(&mut self, frames: Vec<Bytes>) -> Result<(), ClientError> {
        let zmq = ZmqMessage::try_from(frames).map_err(|_| ClientError::Empty)?;
        Ok(self.sender.send(zmq).await?)
    }

    /// Asks for `n` more batches.
    pub async fn credit(&mut self, n: u32) -> Result<(), ClientError> {
        self.credit_for(n, None).await
    }

    /// Asks for up to `n` more batches of one data-parallel rank (`None`: any the producer
    /// serves).
    pub async fn credit_for(&mut self, n: u32, rank: Option<Rank>) -> Result<(), ClientError> {
        let m = Message::Credit(Credit {
            run_id: self.run_id.clone(),
            n,
            rank,
        });
        self.send(&m).await
    }

    /// Acknowledges consumed batches.
    pub async fn ack(&mut self, seqs: Vec<u64>) -> Result<(), ClientError> {
        let m = Message::Ack(Ack {
            run_id: self.run_id.clone(),
            seqs,
        });
        self.send(&m).await
    }

    /// Asks the producer to continue the stream at `next_seq` (for `rank`, in a run of
    /// several ranks: see [`Resume::rank`]).
    pub async fn resume(
        &mut self,
        next_seq: u64,
        stream: Option<crate::StreamIdentity>,
        rank: Option<crate::Rank>,
    ) -> Result<(), ClientError> {
        let m = Message::Resume(Resume {
            run_id: self.run_id.clone(),
            next_seq,
            stream: stream.map(Box::new),
            rank,
        });
        self.send(&m).await
    }

    /// Sends a heartbeat (also how a peer makes itself known to a ROUTER).
    pub async fn heartbeat(&mut self, role: Role) -> Result<(), ClientError> {
        let m = Message::Heartbeat(Heartbeat {
            run_id: self.run_id.clone(),
            role,
            at_ms: crate::now_ms(),
        });
        self.send(&m).await
    }

    /// Receives the next message; a malformed one comes back as [`ClientError::Decode`]. A
    /// connection whose socket has failed yields nothing more: [`Consumer::silent_for`] grows
    /// until the owner reconnects.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Consumer::recv`] as a poll, for waiting on several connections at once; a closed
    /// connection stays pending, as `recv` does.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Message, ClientError>> {
        use std::task::Poll;
        match self.inbox.poll_recv(cx) {
            Poll::Ready(Some(Ok(m))) => Poll::Ready(Ok(m)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(ClientError::Decode(e))),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}
