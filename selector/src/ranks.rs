//! The trainers a selector delivers to: one per data-parallel rank (docs/PROTOCOL.md, "Several
//! ranks"), each with its own connection, credits and outbox, so that a slow rank holds back
//! only its own batches. A batch belongs to the rank its loader tagged it with (or, from a
//! loader that does not tag, rank `seq % world`); with one trainer, every batch is its.

use std::collections::VecDeque;
use std::task::Poll;
use std::time::Instant;

use rho_protocol::client::{ClientError, Consumer};
use rho_protocol::{Endpoint, Key, Limits, Message, Rank, Role, TokenBatch};

use crate::credits::Credits;
use crate::Result;

/// One rank's trainer, as this selector sees it.
pub(crate) struct Downstream {
    pub endpoint: Endpoint,
    pub consumer: Consumer,
    pub credits: Credits,
    /// Scored batches waiting for a credit from this trainer (or for it to come back).
    pub outbox: VecDeque<(Message, Instant)>,
    /// Batches of this rank here: queued, being scored, or scored and waiting.
    pub held: u64,
}

/// The trainers of every rank, by rank.
pub(crate) struct Ranks {
    links: Vec<Downstream>,
}

impl Ranks {
    /// Connects to every trainer and introduces this selector to each (a heartbeat), so that
    /// each grants its first credits. Each rank holds at most `held` batches here.
    pub async fn connect(
        endpoints: &[Endpoint],
        run_id: &str,
        limits: Limits,
        key: Option<Key>,
        held: u32,
    ) -> Result<Ranks> {
        let mut links = Vec::with_capacity(endpoints.len());
        for (rank, endpoint) in endpoints.iter().enumerate() {
            let name = match endpoints.len() {
                1 => "the trainer".to_string(),
                _ => format!("trainer rank {rank}"),
            };
            let mut consumer =
                Consumer::connect_named(&name, endpoint.as_str(), run_id, limits, key.clone())
                    .await?;
            let _ = consumer.heartbeat(Role::Selector).await;
            links.push(Downstream {
                endpoint: endpoint.clone(),
                consumer,
                credits: Credits::new(held),
                outbox: VecDeque::new(),
                held: 0,
            });
        }
        Ok(Ranks { links })
    }

    /// How many ranks.
    pub fn world(&self) -> usize {
        self.links.len()
    }

    /// The rank a batch belongs to: the one its loader tagged it with, which must be of this
    /// selector's world (`None` otherwise: the batch is not for these trainers).
    pub fn rank_of(&self, batch: &TokenBatch) -> Option<usize> {
        let world = self.links.len();
        match batch.rank {
            _ if world <= 1 => Some(0),
            Some(r) => (r.world as usize == world).then_some(r.rank as usize),
            None => Some((batch.seq % world as u64) as usize),
        }
    }

    /// What a credit asked of the loader for rank `r` names: the rank and the world, or nothing
    /// with one trainer (a loader of one rank, or of a one-rank run).
    pub fn credit_rank(&self, r: usize) -> Option<Rank> {
        match self.links.len() {
            0 | 1 => None,
            w => Rank::new(r as u32, w as u32),
        }
    }

    pub fn get_mut(&mut self, r: usize) -> &mut Downstream {
        &mut self.links[r]
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Downstream> {
        self.links.iter_mut()
    }

    /// Nothing waits to be delivered.
    pub fn outboxes_empty(&self) -> bool {
        self.links.iter().all(|d| d.outbox.is_empty())
    }

    /// Credits granted by the trainers and not yet used, summed.
    pub fn credits_down(&self) -> u64 {
        self.links.iter().map(|d| d.credits.down()).sum()
    }

    /// The next message from any trainer, with its rank.
    pub async fn recv(&mut self) -> (usize, std::result::Result<Message, ClientError>) {
        std::future::poll_fn(|cx| {
            for (r, d) in self.links.iter_mut().enumerate() {
                if let Poll::Ready(m) = d.consumer.poll_recv(cx) {
                    return Poll::Ready((r, m));
                }
            }
            Poll::Pending
        })
        .await
    }
}
