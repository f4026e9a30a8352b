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
    /// The endpoint is beyond this host and the connection has no secret
    /// ([`crate::Endpoint::check_secret`]).
    #[error("cannot connect to {endpoint} unsigned: {reason}")]
    Unsigned {
        /// The endpoint.
        endpoint: String,
        /// Why (names the fix).
        reason: String,
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

/// How far a producer's clock may be from this host's before it is reported. Nothing in the
/// protocol depends on the hosts' clocks agreeing (leases and timeouts are measured by each
/// process on its own monotonic clock), but every log line and metrics record carries its host's
/// wall time, and a run's records are read side by side: a host this far off usually has no
/// time service, and its timestamps would mislead.
pub const CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(5);

/// Compares the wall time in a producer's heartbeats with this host's, and reports the first
/// heartbeat off by more than [`CLOCK_SKEW_LIMIT`] (and one back within it) by the producer's
/// name and address.
struct ClockCheck {
    peer: String,
    endpoint: String,
    off: bool,
}

impl ClockCheck {
    fn new(peer: &str, endpoint: &str) -> Self {
        ClockCheck {
            peer: peer.to_string(),
            endpoint: endpoint.to_string(),
            off: false,
        }
    }

    /// A heartbeat sent at `at_ms` by the producer's clock arrived at `now_ms` by this one's;
    /// the difference, in milliseconds, by which the producer is ahead.
    fn heard(&mut self, at_ms: u64, now_ms: u64) -> i64 {
        let ahead = at_ms as i64 - now_ms as i64;
        let off = ahead.unsigned_abs() > CLOCK_SKEW_LIMIT.as_millis() as u64;
        if off && !self.off {
            tracing::warn!(
                peer = %self.peer,
                endpoint = %self.endpoint,
                ahead_ms = ahead,
                "the clock of {} at {} is {:.1} s {} this host's: the run's logs and metrics will not line up by time; keep the hosts' clocks synchronized (NTP)",
                self.peer,
                self.endpoint,
                ahead.unsigned_abs() as f64 / 1000.0,
                if ahead > 0 { "ahead of" } else { "behind" }
            );
        } else if !off && self.off {
            tracing::info!(peer = %self.peer, endpoint = %self.endpoint, ahead_ms = ahead, "the clock of {} is within {:?} of this host's again", self.peer, CLOCK_SKEW_LIMIT);
        }
        self.off = off;
        ahead
    }
}

/// How often a connection that is not accepted is reported while it is retried.
pub const UNREACHABLE_REPORT: Duration = Duration::from_secs(10);

/// A connection to one producer.
pub struct Consumer {
    sender: DealerSendHalf,
    inbox: mpsc::Receiver<Result<Message, DecodeError>>,
    task: tokio::task::JoinHandle<()>,
    run_id: String,
    key: Option<Key>,
    endpoint: String,
    /// What the producer is called in reports (`"the loader"`).
    peer: String,
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
        Self::connect_named("the producer", endpoint, run_id, limits, key).await
    }

    /// [`Consumer::connect_with`] to the process called `peer` (`"the loader"`, `"trainer rank
    /// 3"`): while the endpoint does not accept, a warning names the peer and its address every
    /// [`UNREACHABLE_REPORT`]. An endpoint beyond loopback is refused without a key.
    pub async fn connect_named(
        peer: &str,
        endpoint: &str,
        run_id: &str,
        limits: Limits,
        key: Option<Key>,
    ) -> Result<Self, ClientError> {
        if let Ok(named) = crate::Endpoint::new(endpoint) {
            named
                .check_secret(key.as_ref())
                .map_err(|reason| ClientError::Unsigned {
                    endpoint: endpoint.to_string(),
                    reason,
                })?;
        }
        let mut socket = DealerSocket::with_options(limits.socket_options());
        let started = Instant::now();
        let mut reports = tokio::time::interval_at(
            tokio::time::Instant::now() + UNREACHABLE_REPORT,
            UNREACHABLE_REPORT,
        );
        let connected = {
            let connect = socket.connect(endpoint);
            tokio::pin!(connect);
            loop {
                tokio::select! {
                    c = &mut connect => break c,
                    _ = reports.tick() => tracing::warn!(
                        peer,
                        endpoint,
                        waited_s = started.elapsed().as_secs(),
                        "{peer} at {endpoint} does not accept a connection: is it running, and is that address routable from this host (a process bound on every interface advertises `advertise`, else its host name)?"
                    ),
                }
            }
        };
        connected.map_err(|source| ClientError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
        let (sender, mut receiver) = socket.split();
        let (tx, inbox) = mpsc::channel(64);
        let recv_key = key.clone();
        let born = Instant::now();
        let heard_ms = Arc::new(AtomicU64::new(0));
        let heard = heard_ms.clone();
        let mut clock = ClockCheck::new(peer, endpoint);
        let task = tokio::spawn(async move {
            while let Ok(m) = receiver.recv().await {
                heard.store(born.elapsed().as_millis() as u64, Ordering::Relaxed);
                let frames: Vec<Bytes> = m.into_vec();
                let message = Message::decode_with(&frames, &limits, recv_key.as_ref());
                if let Ok(Message::Heartbeat(h)) = &message {
                    clock.heard(h.at_ms, crate::now_ms());
                }
                if tx.send(message).await.is_err() {
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
            peer: peer.to_string(),
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
            peer = %self.peer,
            endpoint = %self.endpoint,
            silent_ms = self.silent_for().as_millis() as u64,
            "no answer: reconnecting. If that process is running, it may be refusing this one's messages, which are {signing}: every process of a run needs the same secret, and the refusing side logs `refused`"
        );
        let fresh = tokio::select! {
            c = Self::connect_named(&self.peer, &self.endpoint, &self.run_id, self.limits, self.key.clone()) => c?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_off_clock_is_noticed_once_and_its_return_too() {
        let mut c = ClockCheck::new("the loader", "tcp://h:1");
        assert_eq!(c.heard(10_000, 10_040), -40);
        assert!(!c.off);
        assert_eq!(c.heard(60_000, 10_000), 50_000);
        assert!(c.off);
        c.heard(60_000, 10_000);
        assert!(c.off);
        c.heard(10_000, 10_000 + 4_000);
        assert!(!c.off);
        c.heard(10_000, 10_000 + 6_000);
        assert!(c.off, "6 s behind is off");
    }
}
