//! Flow-control and acknowledgement primitives.
//!
//! zmq.rs has no high-water mark and drops what was queued to a peer that dies, so delivery
//! guarantees are built here: a producer sends only against [`Credits`] a consumer granted, and
//! keeps every batch it issued in a [`Ledger`] until the batch is acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Outstanding work requests per peer, served in the order the peers asked.
#[derive(Debug)]
pub struct Credits<P> {
    per_peer: HashMap<P, u32>,
    order: VecDeque<P>,
}

impl<P: Clone + Eq + Hash> Default for Credits<P> {
    fn default() -> Self {
        Credits {
            per_peer: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<P: Clone + Eq + Hash> Credits<P> {
    /// Adds `n` credits for `peer` (saturating).
    pub fn grant(&mut self, peer: P, n: u32) {
        if n == 0 {
            return;
        }
        let entry = self.per_peer.entry(peer.clone()).or_insert(0);
        if *entry == 0 {
            self.order.push_back(peer);
        }
        *entry = entry.saturating_add(n);
    }

    /// Takes one credit from the peer that has waited longest, round-robin.
    pub fn take(&mut self) -> Option<P> {
        let peer = self.order.pop_front()?;
        let left = self.per_peer.get_mut(&peer)?;
        *left -= 1;
        if *left > 0 {
            self.order.push_back(peer.clone());
        } else {
            self.per_peer.remove(&peer);
        }
        Some(peer)
    }

    /// Whether any peer is waiting for work.
    pub fn any(&self) -> bool {
        !self.order.is_empty()
    }

    /// Forgets a peer's credits (it left).
    pub fn forget(&mut self, peer: &P) {
        self.per_peer.remove(peer);
        self.order.retain(|p| p != peer);
    }

    /// All peers with credits, and their counts, emptied.
    pub fn drain(&mut self) -> Vec<(P, u32)> {
        self.order.clear();
        self.per_peer.drain().collect()
    }

    /// The total number of outstanding credits.
    pub fn total(&self) -> u64 {
        self.per_peer.values().map(|&n| u64::from(n)).sum()
    }
}

/// One issued and not yet acknowledged batch.
#[derive(Debug)]
pub struct InFlight<T, P> {
    /// What is redelivered (the encoded frames).
    pub payload: T,
    /// The consumer it was last issued to.
    pub holder: P,
    /// When it was last issued (its lease runs from here).
    pub issued_at: Instant,
    /// Times it was issued (1 + redeliveries).
    pub deliveries: u32,
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The batch was in flight and is now done.
    Done,
    /// Not in flight: already acknowledged, never issued, or from another stream.
    Unknown,
}

/// The record of batches in flight, bounded by a window.
///
/// A batch enters on [`Ledger::issue`] and leaves only on [`Ledger::ack`]; until then it can be
/// handed out again ([`Ledger::expired`] finds those whose lease ran out).
#[derive(Debug)]
pub struct Ledger<T, P> {
    window: usize,
    entries: BTreeMap<u64, InFlight<T, P>>,
    acked: u64,
    duplicate_acks: u64,
}

impl<T, P: Clone> Ledger<T, P> {
    /// A ledger that holds at most `window` batches (at least 1).
    pub fn new(window: usize) -> Self {
        Ledger {
            window: window.max(1),
            entries: BTreeMap::new(),
            acked: 0,
            duplicate_acks: 0,
        }
    }

    /// Whether another batch may be issued.
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.window
    }

    /// Records batch `seq` as handed to `holder`. Re-issuing a batch in flight counts a delivery.
    pub fn issue(&mut self, seq: u64, payload: T, holder: P, now: Instant) {
        let deliveries = self.entries.get(&seq).map_or(1, |e| e.deliveries + 1);
        self.entries.insert(
            seq,
            InFlight {
                payload,
                holder,
                issued_at: now,
                deliveries,
            },
        );
    }

    /// Hands an in-flight batch to a new holder (a redelivery).
    pub fn reissue(&mut self, seq: u64, holder: P, now: Instant) -> Option<&T> {
        let entry = self.entries.get_mut(&seq)?;
        entry.holder = holder;
        entry.issued_at = now;
        entry.deliveries += 1;
        Some(&entry.payload)
    }

    /// Marks `seq` done.
    pub fn ack(&mut self, seq: u64) -> AckOutcome {
        match self.entries.remove(&seq) {
            Some(_) => {
                self.acked += 1;
                AckOutcome::Done
            }
            None => {
                self.duplicate_acks += 1;
                AckOutcome::Unknown
            }
        }
    }

    /// Sequence numbers whose lease is older than `lease`, oldest first.
    pub fn expired(&self, now: Instant, lease: Duration) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.issued_at) >= lease)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Every sequence number in flight, oldest first.
    pub fn seqs(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    /// Sequence numbers last issued to `holder`, oldest first.
    pub fn held_by(&self, holder: &P) -> Vec<u64>
    where
        P: PartialEq,
    {
        self.entries
            .iter()
            .filter(|(_, e)| e.holder == *holder)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Drops every entry below `seq` (the consumer resumed past them).
    pub fn forget_below(&mut self, seq: u64) {
        self.entries = self.entries.split_off(&seq);
    }

    /// The batch `seq`, while in flight.
    pub fn get(&self, seq: u64) -> Option<&InFlight<T, P>> {
        self.entries.get(&seq)
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no batch is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Batches acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Acknowledgements for batches not in flight.
    pub fn unknown_acks(&self) -> u64 {
        self.duplicate_acks
    }
}

/// Whether [`Reorder::insert`] kept an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Kept, to be handed out in order.
    New,
    /// Already handed out or already held: dropped.
    Duplicate,
}

/// The consumer's side of in-order delivery: items arrive by sequence number in any order, at
/// most once each is kept, and they leave strictly in sequence order from a cursor.
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    held: BTreeMap<u64, T>,
    capacity: usize,
}

impl<T> Reorder<T> {
    /// Hands items out from `next` on; `capacity` is how many it holds before
    /// [`Reorder::has_room`] says no (insertion itself never refuses a new item).
    pub fn new(next: u64, capacity: usize) -> Self {
        Reorder {
            next,
            held: BTreeMap::new(),
            capacity,
        }
    }

    /// Keeps `item` unless `seq` was handed out already or is held.
    pub fn insert(&mut self, seq: u64, item: T) -> Inserted {
        if seq < self.next || self.held.contains_key(&seq) {
            return Inserted::Duplicate;
        }
        self.held.insert(seq, item);
        Inserted::New
    }

    /// The item at the cursor, if it is here; the cursor moves past it.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.held.remove(&self.next)?;
        self.next += 1;
        Some(item)
    }

    /// The next sequence number to hand out (the stream cursor).
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Items held, waiting for an earlier one.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no batch is buffered.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether it holds fewer items than its capacity.
    pub fn has_room(&self) -> bool {
        self.held.len() < self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_knows_what_each_holder_holds() {
        let now = Instant::now();
        let mut l: Ledger<(), &str> = Ledger::new(8);
        l.issue(3, (), "a", now);
        l.issue(1, (), "b", now);
        l.issue(2, (), "a", now);
        assert_eq!(l.held_by(&"a"), vec![2, 3]);
        assert_eq!(l.seqs(), vec![1, 2, 3]);
        l.reissue(3, "b", now);
        assert_eq!((l.held_by(&"a"), l.held_by(&"b")), (vec![2], vec![1, 3]));
        l.ack(1);
        assert_eq!(l.held_by(&"b"), vec![3]);
        assert!(l.held_by(&"c").is_empty());
    }

    #[test]
    fn reorder_hands_out_in_order_once_each() {
        let mut r = Reorder::new(5, 3);
        assert_eq!(r.insert(7, "g"), Inserted::New);
        assert_eq!(r.insert(4, "old"), Inserted::Duplicate);
        assert_eq!(r.pop(), None);
        assert_eq!(r.insert(5, "e"), Inserted::New);
        assert_eq!(r.insert(7, "again"), Inserted::Duplicate);
        assert!(r.has_room());
        assert_eq!(r.insert(6, "f"), Inserted::New);
        assert!(!r.has_room());
        assert_eq!(
            (r.pop(), r.pop(), r.pop(), r.pop()),
            (Some("e"), Some("f"), Some("g"), None)
        );
        assert_eq!((r.next(), r.len()), (8, 0));
        assert_eq!(r.insert(6, "late"), Inserted::Duplicate);
    }

    proptest::proptest! {
        /// Whatever order and duplication the items arrive in, what leaves is every sequence
        /// number from the cursor on, once, in order.
        #[test]
        fn reorder_yields_each_seq_once_in_order(
            arrivals in proptest::collection::vec(0u64..40, 0..200),
            start in 0u64..10,
        ) {
            let mut r = Reorder::new(start, usize::MAX);
            let mut out = Vec::new();
            for seq in arrivals.iter().copied() {
                r.insert(seq, seq);
                while let Some(s) = r.pop() {
                    out.push(s);
                }
            }
            let expected: Vec<u64> = (start..r.next()).collect();
            proptest::prop_assert_eq!(&out, &expected);
            for s in &out {
                proptest::prop_assert!(arrivals.contains(s));
            }
            // What is still held is ahead of the cursor and arrived.
            proptest::prop_assert!(!arrivals.contains(&r.next()));
        }
    }

    #[test]
    fn credits_round_robin_in_request_order() {
        let mut c = Credits::default();
        c.grant("a", 2);
        c.grant("b", 1);
        c.grant("a", 1);
        let order: Vec<_> = std::iter::from_fn(|| c.take()).collect();
        assert_eq!(order, vec!["a", "b", "a", "a"]);
        assert!(!c.any());
        c.grant("x", 0);
        assert!(!c.any());
    }

    #[test]
    fn credits_forget_a_peer() {
        let mut c = Credits::default();
        c.grant(1, 3);
        c.grant(2, 1);
        c.forget(&1);
        assert_eq!(c.total(), 1);
        assert_eq!(c.take(), Some(2));
        assert_eq!(c.take(), None);
    }

    #[test]
    fn ledger_window_ack_and_leases() {
        let t0 = Instant::now();
        let mut l: Ledger<&str, u8> = Ledger::new(2);
        assert!(l.has_room());
        l.issue(0, "b0", 1, t0);
        l.issue(1, "b1", 1, t0 + Duration::from_secs(5));
        assert!(!l.has_room());
        assert_eq!(
            l.expired(t0 + Duration::from_secs(6), Duration::from_secs(3)),
            vec![0]
        );
        assert_eq!(l.reissue(0, 2, t0 + Duration::from_secs(6)), Some(&"b0"));
        assert_eq!(l.get(0).unwrap().deliveries, 2);
        assert_eq!(l.ack(0), AckOutcome::Done);
        assert_eq!(l.ack(0), AckOutcome::Unknown);
        assert!(l.has_room());
        assert_eq!((l.acked(), l.unknown_acks(), l.len()), (1, 1, 1));
        l.issue(7, "b7", 1, t0);
        l.forget_below(5);
        assert_eq!(l.len(), 1);
        assert!(l.get(7).is_some());
    }
}
