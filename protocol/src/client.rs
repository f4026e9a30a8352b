//! A consumer's side of the loader protocol: connect, ask for work by credit, receive, acknowledge.
//!
//! Selectors and trainers are built on this; so are tests and benchmarks.

use bytes::Bytes;
use thiserror::Error;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::{Ack, Credit, DecodeError, Limits, Message, Resume};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("transport error: {0}")]
    Transport(String),
    #[error("refused message: {0}")]
    Decode(#[from] DecodeError),
}

/// A DEALER connection to a producer's ROUTER endpoint.
pub struct Consumer {
    socket: DealerSocket,
    run_id: String,
    limits: Limits,
}

impl Consumer {
    /// Connects, retrying until the endpoint accepts (processes may start in any order).
    pub async fn connect(
        endpoint: &str,
        run_id: &str,
        limits: Limits,
    ) -> Result<Self, ClientError> {
        let mut socket = DealerSocket::new();
        socket
            .connect(endpoint)
            .await
            .map_err(|e| ClientError::Connect {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Consumer {
            socket,
            run_id: run_id.to_string(),
            limits,
        })
    }

    pub async fn send(&mut self, message: &Message) -> Result<(), ClientError> {
        let frames = message.encode();
        let zmq =
            ZmqMessage::try_from(frames).map_err(|e| ClientError::Transport(e.to_string()))?;
        self.socket
            .send(zmq)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// Asks for `n` more batches.
    pub async fn credit(&mut self, n: u32) -> Result<(), ClientError> {
        let m = Message::Credit(Credit {
            run_id: self.run_id.clone(),
            n,
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

    /// Asks the producer to continue the stream at `next_seq`.
    pub async fn resume(&mut self, next_seq: u64) -> Result<(), ClientError> {
        let m = Message::Resume(Resume {
            run_id: self.run_id.clone(),
            next_seq,
        });
        self.send(&m).await
    }

    /// Receives and decodes the next message.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        let zmq = self
            .socket
            .recv()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let frames: Vec<Bytes> = zmq.into_vec();
        Ok(Message::decode(&frames, &self.limits)?)
    }
}
