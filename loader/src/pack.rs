//! Packing: token runs, concatenated, cut into windows of `seq_len + 1` tokens.
//!
//! Windows do not overlap: window `w` of an epoch holds stream tokens `[w * W, (w + 1) * W)`
//! where `W = seq_len + 1`. Documents continue across windows; each window records where the
//! documents that start inside it begin. The epoch's last, partial window is padded and its
//! length says how many tokens are real.

/// One packed window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The window's tokens, padded to its length.
    pub tokens: Vec<u32>,
    /// Real tokens (the rest is padding).
    pub length: u32,
    /// Positions at which a document starts.
    pub starts: Vec<u32>,
}

/// Cuts a token stream into windows, optionally discarding its first `skip` tokens.
#[derive(Debug)]
pub struct Packer {
    window: usize,
    skip: u64,
    buf: Vec<u32>,
    starts: Vec<u32>,
    pad: u32,
}

impl Packer {
    /// A packer of `window`-token windows that skips the first `skip` tokens and pads with `pad`.
    pub fn new(window: usize, skip: u64, pad: u32) -> Self {
        Packer {
            window,
            skip,
            buf: Vec::with_capacity(window),
            starts: Vec::new(),
            pad,
        }
    }

    /// Appends a token run; `doc_start` says whether its first token begins a document.
    /// Completed windows are passed to `emit`.
    pub fn push(&mut self, mut ids: &[u32], mut doc_start: bool, emit: &mut impl FnMut(Window)) {
        if self.skip > 0 {
            let k = (self.skip.min(ids.len() as u64)) as usize;
            self.skip -= k as u64;
            if k > 0 {
                doc_start = false;
            }
            ids = &ids[k..];
        }
        while !ids.is_empty() {
            if doc_start {
                self.starts.push(self.buf.len() as u32);
                doc_start = false;
            }
            let take = (self.window - self.buf.len()).min(ids.len());
            self.buf.extend_from_slice(&ids[..take]);
            ids = &ids[take..];
            if self.buf.len() == self.window {
                let tokens = std::mem::replace(&mut self.buf, Vec::with_capacity(self.window));
                emit(Window {
                    tokens,
                    length: self.window as u32,
                    starts: std::mem::take(&mut self.starts),
                });
            }
        }
    }

    /// Emits the partial last window, padded, if any tokens remain.
    pub fn finish(mut self, emit: &mut impl FnMut(Window)) {
        if self.buf.is_empty() {
            return;
        }
        let length = self.buf.len() as u32;
        self.buf.resize(self.window, self.pad);
        emit(Window {
            tokens: self.buf,
            length,
            starts: self.starts,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pack(runs: &[Vec<u32>], window: usize, skip: u64) -> Vec<Window> {
        let mut out = Vec::new();
        let mut p = Packer::new(window, skip, 0);
        for r in runs {
            p.push(r, true, &mut |w| out.push(w));
        }
        p.finish(&mut |w| out.push(w));
        out
    }

    #[test]
    fn hand_packed() {
        let w = pack(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]], 4, 0);
        assert_eq!(w.len(), 3);
        assert_eq!(
            w[0],
            Window {
                tokens: vec![1, 2, 3, 4],
                length: 4,
                starts: vec![0, 3]
            }
        );
        assert_eq!(
            w[1],
            Window {
                tokens: vec![5, 6, 7, 8],
                length: 4,
                starts: vec![1]
            }
        );
        assert_eq!(
            w[2],
            Window {
                tokens: vec![9, 0, 0, 0],
                length: 1,
                starts: vec![]
            }
        );
    }

    #[test]
    fn skipping_lands_on_a_document_start() {
        let w = pack(&[vec![1, 2, 3, 4], vec![5, 6, 7, 8]], 4, 4);
        assert_eq!(
            w,
            vec![Window {
                tokens: vec![5, 6, 7, 8],
                length: 4,
                starts: vec![0]
            }]
        );
    }

    proptest! {
        /// Concatenating the windows gives back the stream; starts match the run boundaries;
        /// packing with a skip of k windows gives the windows from k on.
        #[test]
        fn packing_preserves_the_stream(runs in prop::collection::vec(prop::collection::vec(1u32..1000, 1..20), 0..30), window in 2usize..17, skip_windows in 0u64..4) {
            let all = pack(&runs, window, 0);
            let flat: Vec<u32> = runs.concat();
            let mut joined = Vec::new();
            for w in &all {
                joined.extend_from_slice(&w.tokens[..w.length as usize]);
            }
            prop_assert_eq!(&joined, &flat);
            let mut expected_starts = Vec::new();
            let mut pos = 0usize;
            for r in &runs { expected_starts.push(pos); pos += r.len(); }
            let got_starts: Vec<usize> = all.iter().enumerate().flat_map(|(i, w)| w.starts.iter().map(move |&s| i * window + s as usize)).collect();
            prop_assert_eq!(got_starts, expected_starts);
            let skipped = pack(&runs, window, skip_windows * window as u64);
            prop_assert_eq!(&skipped[..], &all[(skip_windows as usize).min(all.len())..]);
        }
    }
}
