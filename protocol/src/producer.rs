//! The producer's end of a connection: a ROUTER socket that consumers connect their DEALERs to
//! (the loader's endpoint, the trainer's delivery endpoint). The twin of [`crate::client::Consumer`].
//!
//! [`Producer::bind`] binds (port 0 picks a free port), publishes the bound endpoint in an
//! endpoint file when asked (atomically: a reader never sees half an endpoint), and receives on
//! a task of its own, so that it can be polled in a `select!` loop. [`Producer::recv`] yields a
//! message of this run from a peer, or a refusal (malformed, wrongly signed, of another run)
//! already counted and logged once, here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::client::addressed;
use crate::{Endpoint, Key, Limits, Message};

/// A peer of a ROUTER socket: its identity frame.
pub type Peer = Bytes;

/// Why a producer's endpoint failed.
#[derive(Debug, Error)]
pub enum ProducerError {
    /// The endpoint could not be bound (a taken port, a bad address).
    #[error("cannot bind {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        #[source]
        /// The cause.
        source: zeromq::ZmqError,
    },
    /// The endpoint file could not be written.
    #[error("cannot write the endpoint file {path}")]
    EndpointFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The endpoint reaches beyond this host and the producer has no secret
    /// ([`crate::Endpoint::check_secret`]).
    #[error("cannot bind {endpoint} unsigned: {reason}")]
    Unsigned {
        /// The endpoint.
        endpoint: String,
        /// Why (names the fix).
        reason: String,
    },
    /// A message could not be sent.
    #[error("sending a message")]
    Send(#[from] zeromq::ZmqError),
}

/// What arrived on a producer's socket.
// A message's header fields (a few hundred bytes) travel inline: one `Incoming` is made per
// message received, and boxing it would add an allocation to each for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Incoming {
    /// A valid message of this run.
    Message {
        /// The sender.
        peer: Peer,
        /// The message.
        message: Message,
    },
    /// A message refused (already counted and logged).
    Refused {
        /// The sender.
        peer: Peer,
    },
}

/// A bound ROUTER endpoint.
pub struct Producer {
    sender: RouterSendHalf,
    inbox: mpsc::Receiver<ZmqMessage>,
    task: tokio::task::JoinHandle<()>,
    endpoint: String,
    run_id: String,
    limits: Limits,
    key: Option<Key>,
    refused: u64,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Producer {
    /// Binds `endpoint` for run `run_id` and, with `endpoint_file`, publishes the endpoint
    /// other processes connect to there: the bound one (its port picked) with its host replaced
    /// by `advertise`, or a wildcard host by the host's name ([`Endpoint::advertised`]). An
    /// endpoint beyond loopback is refused without a key.
    pub async fn bind(
        endpoint: &str,
        advertise: Option<&str>,
        endpoint_file: Option<&Path>,
        run_id: &str,
        limits: Limits,
        key: Option<Key>,
    ) -> Result<Self, ProducerError> {
        // Text that is no endpoint is refused by the bind itself, with zmq's reason.
        if let Ok(named) = Endpoint::new(endpoint) {
            named
                .check_secret(key.as_ref())
                .map_err(|reason| ProducerError::Unsigned {
                    endpoint: endpoint.to_string(),
                    reason,
                })?;
        }
        let mut router = RouterSocket::with_options(limits.socket_options());
        let bound = router
            .bind(endpoint)
            .await
            .map_err(|source| ProducerError::Bind {
                endpoint: endpoint.to_string(),
                source,
            })?
            .to_string();
        let bound = match Endpoint::new(bound.clone()) {
            Ok(e) => e.advertised(advertise).to_string(),
            Err(_) => bound,
        };
        if let Some(file) = endpoint_file {
            publish_endpoint(file, &bound).map_err(|source| ProducerError::EndpointFile {
                path: file.to_path_buf(),
                source,
            })?;
        }
        let (sender, mut receiver) = router.split();
        let (tx, inbox) = mpsc::channel::<ZmqMessage>(1024);
        let task = tokio::spawn(async move {
            while let Ok(m) = receiver.recv().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        Ok(Producer {
            sender,
            inbox,
            task,
            endpoint: bound,
            run_id: run_id.to_string(),
            limits,
            key,
            refused: 0,
        })
    }

    /// The endpoint other processes connect to (bound, with the port picked for port 0, and
    /// the advertised host).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next message, or a refusal; `None` once the socket is closed.
    pub async fn recv(&mut self) -> Option<Incoming> {
        loop {
            let mut frames = self.inbox.recv().await?.into_vec();
            if frames.is_empty() {
                continue;
            }
            let peer = frames.remove(0);
            return Some(
                match Message::decode_with(&frames, &self.limits, self.key.as_ref()) {
                    Ok(message) if message.run_id() == self.run_id => {
                        Incoming::Message { peer, message }
                    }
                    Ok(m) => {
                        let why = format!(
                            "a `{}` message of run `{}` (this is run `{}`)",
                            m.kind(),
                            m.run_id(),
                            self.run_id
                        );
                        self.refuse(peer, &why)
                    }
                    Err(e) => self.refuse(peer, &format!("a malformed message: {e}")),
                },
            );
        }
    }

    /// Counts and logs a refusal of a message that decoded but is not wanted here.
    pub fn refuse(&mut self, peer: Peer, why: &str) -> Incoming {
        self.refused += 1;
        tracing::warn!(endpoint = %self.endpoint, "refused {why}");
        Incoming::Refused { peer }
    }

    /// Messages refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Sends `message` to `peer`, signed when the producer has a key.
    pub async fn send(&mut self, peer: &Peer, message: &Message) -> Result<(), ProducerError> {
        let frames = message.encode_with(self.key.as_ref());
        self.send_frames(peer, &frames).await
    }

    /// Sends already encoded frames to `peer`.
    pub async fn send_frames(
        &mut self,
        peer: &Peer,
        frames: &[Bytes],
    ) -> Result<(), ProducerError> {
        Ok(self.sender.send(addressed(peer, frames)).await?)
    }
}

/// Writes `endpoint` to `file` through a temporary file and a rename, so that a reader sees the
/// whole endpoint or no file.
pub fn publish_endpoint(file: &Path, endpoint: &str) -> std::io::Result<()> {
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, endpoint)?;
    std::fs::rename(&tmp, file)
}

/// Waits up to `timeout` for an endpoint file that a producer publishes; `None` when it did not
/// appear in time.
pub fn wait_endpoint(file: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(file) {
            let s = s.trim();
            if !s.is_empty() {
                return Some(s.to_string());
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Consumer;
    use crate::{Credit, Role};

    #[tokio::test]
    async fn a_producer_publishes_its_endpoint_answers_peers_and_counts_refusals_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.endpoint");
        let key = Key::new(b"0123456789abcdef0123").ok();
        let mut p = Producer::bind(
            "tcp://127.0.0.1:0",
            None,
            Some(&file),
            "run",
            Limits::default(),
            key.clone(),
        )
        .await
        .unwrap();
        let published = wait_endpoint(&file, Duration::from_secs(5)).unwrap();
        assert_eq!(published, p.endpoint());
        assert!(!p.endpoint().ends_with(":0"));

        let mut good = Consumer::connect_with(p.endpoint(), "run", Limits::default(), key)
            .await
            .unwrap();
        good.credit(3).await.unwrap();
        let Some(Incoming::Message { peer, message }) = p.recv().await else {
            panic!("no credit")
        };
        assert!(matches!(message, Message::Credit(Credit { n: 3, .. })));
        // A reply reaches the peer.
        p.send(
            &peer,
            &Message::Credit(Credit {
                run_id: "run".into(),
                n: 1,
                rank: None,
            }),
        )
        .await
        .unwrap();
        assert!(matches!(good.recv().await, Ok(Message::Credit(_))));

        // Unsigned, and of another run: refused and counted.
        let mut stranger = Consumer::connect_with(p.endpoint(), "run", Limits::default(), None)
            .await
            .unwrap();
        stranger.heartbeat(Role::Client).await.unwrap();
        assert!(matches!(p.recv().await, Some(Incoming::Refused { .. })));
        let other = Key::new(b"0123456789abcdef0123").ok();
        let mut foreign = Consumer::connect_with(p.endpoint(), "other", Limits::default(), other)
            .await
            .unwrap();
        foreign.heartbeat(Role::Client).await.unwrap();
        assert!(matches!(p.recv().await, Some(Incoming::Refused { .. })));
        assert_eq!(p.refused(), 2);
    }

    #[tokio::test]
    async fn a_taken_endpoint_is_refused_with_its_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = format!("tcp://{}", taken.local_addr().unwrap());
        let e = Producer::bind(&ep, None, None, "run", Limits::default(), None)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&ep), "{e}");
    }
}
