//! The selector's flow control, one per rank it delivers to.

/// The selector's flow control, end to end: the trainer grants credits for scored batches
/// (`down`), and the selector asks the loader for no more than those credits cover, and never
/// more than `prefetch` at a time, counting what it already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    /// Scored batches the trainer has room for.
    down: u64,
    /// Batches asked of the loader and not yet arrived.
    requested: u64,
    prefetch: u64,
}

impl Credits {
    /// No credits yet; at most `prefetch` batches asked of the loader ahead.
    pub fn new(prefetch: u32) -> Self {
        Credits {
            down: 0,
            requested: 0,
            prefetch: u64::from(prefetch),
        }
    }

    /// The trainer granted `n` more.
    pub fn granted(&mut self, n: u32) {
        self.down += u64::from(n);
    }

    /// Whether a scored batch may go to the trainer now.
    pub fn can_deliver(&self) -> bool {
        self.down > 0
    }

    /// A scored batch went to the trainer.
    pub fn delivered(&mut self) {
        self.down = self.down.saturating_sub(1);
    }

    /// How many batches to ask the loader for, given `held` batches here (queued, being
    /// scored, or scored and waiting); counts them as requested.
    pub fn request(&mut self, held: u64) -> u32 {
        let held = held + self.requested;
        let want = self.down.min(self.prefetch);
        let n = want.saturating_sub(held).min(u64::from(u32::MAX)) as u32;
        self.requested += u64::from(n);
        n
    }

    /// A request could not be sent: it is not outstanding.
    pub fn unrequest(&mut self, n: u32) {
        self.requested = self.requested.saturating_sub(u64::from(n));
    }

    /// A batch arrived from the loader.
    pub fn arrived(&mut self) {
        self.requested = self.requested.saturating_sub(1);
    }

    /// The loader connection was made again: what the old one was asked is gone with it.
    pub fn loader_lost(&mut self) {
        self.requested = 0;
    }

    /// The trainer connection was made again: its credits are gone with it (it grants new
    /// ones when the selector introduces itself).
    pub fn trainer_lost(&mut self) {
        self.down = 0;
    }

    /// Credits the trainer has granted and the selector not yet used.
    pub fn down(&self) -> u64 {
        self.down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_is_asked_for_no_more_than_the_trainer_granted() {
        let mut c = Credits::new(4);
        assert_eq!(c.request(0), 0, "nothing granted, nothing asked");
        c.granted(2);
        assert_eq!(c.request(0), 2);
        assert_eq!(c.request(0), 0, "already asked");
        c.arrived();
        assert_eq!(c.request(1), 0, "the arrived batch is held here");
    }

    #[test]
    fn prefetch_caps_what_is_asked_and_held() {
        let mut c = Credits::new(3);
        c.granted(10);
        assert_eq!(c.request(1), 2);
        for _ in 0..2 {
            c.arrived();
        }
        // Three held, none delivered: nothing more.
        assert_eq!(c.request(3), 0);
        c.delivered();
        assert_eq!(c.request(2), 1);
        assert_eq!(c.down(), 9);
    }

    #[test]
    fn a_lost_connection_forgets_its_credits() {
        let mut c = Credits::new(8);
        c.granted(5);
        assert_eq!(c.request(0), 5);
        c.loader_lost();
        assert_eq!(c.request(0), 5, "asked again of the new connection");
        c.trainer_lost();
        assert!(!c.can_deliver());
        assert_eq!(c.request(0), 0);
        let n = {
            c.granted(2);
            c.request(0)
        };
        assert_eq!(n, 0, "five still outstanding cover the two");
        c.unrequest(5);
        assert_eq!(c.request(0), 2);
    }
}
