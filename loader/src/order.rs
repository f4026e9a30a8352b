//! Deterministic order: which shards an epoch reads in which order, and how windows are shuffled.
//!
//! Randomness comes from SplitMix64 (`rho_common::splitmix`), so that the order of a run can
//! never change with a dependency's version. Window shuffling permutes fixed blocks of `shuffle_window`
//! consecutive windows; its whole state is (seed, epoch, block), so resuming needs nothing saved.

pub use rho_common::SplitMix64;

/// Derives a stream seed from a run seed and labels.
pub fn mix(parts: &[u64]) -> u64 {
    let mut rng = SplitMix64::new(0x5248_4F00_0000_0001);
    let mut acc = rng.next_u64();
    for &p in parts {
        rng = SplitMix64::new(acc ^ p);
        acc = rng.next_u64();
    }
    acc
}

/// A Fisher–Yates permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

const SHARD_LABEL: u64 = 0x5348_4152_4400_0000;
const BLOCK_LABEL: u64 = 0x424C_4F43_4B00_0000;

/// The order in which an epoch reads this loader's shards: indices into its shard list.
pub fn shard_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    permutation(n, mix(&[seed, SHARD_LABEL, epoch]))
}

/// The order in which block `block` of `epoch` emits its `len` windows.
pub fn block_order(len: usize, seed: u64, epoch: u64, block: u64) -> Vec<usize> {
    permutation(len, mix(&[seed, BLOCK_LABEL, epoch, block]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (reference implementation by Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn permutations_are_permutations_and_seeded() {
        for n in [0, 1, 2, 7, 100] {
            let mut p = permutation(n, 42);
            assert_eq!(p, permutation(n, 42));
            p.sort();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(permutation(50, 1), permutation(50, 2));
        assert_ne!(shard_order(20, 0, 0), shard_order(20, 0, 1));
    }
}
