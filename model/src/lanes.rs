//! Lanes: independent pieces of work side by side on the CPU, each on its own share of the
//! threads (a selector's batches, a trainer's micro-batches).
//!
//! A small model's products split poorly over many cores: every product ends in a wait for
//! the slowest thread, and candle's elementwise ops between them are short. Whole pieces of
//! work side by side, each on fewer threads, keep every core busy. candle's products and rho's
//! kernels split their work over the rayon pool they run in, so a lane is a pool, and what runs
//! in it gives the same bits as on any other pool.

use std::num::NonZeroUsize;

use crate::DeviceSpec;

/// The lanes to run in, given `threads` for model math: `asked` (cut to `threads`), or by
/// default 2 on the CPU with at least 2 threads and 1 otherwise; a GPU runs one at a time.
pub fn resolve(asked: Option<NonZeroUsize>, on_cpu: bool, threads: usize) -> usize {
    let threads = threads.max(1);
    match asked {
        _ if !on_cpu => 1,
        Some(n) => n.get().min(threads),
        None => threads.min(2),
    }
}

/// A trainer's micro-batches per step: `asked`, or by default one per lane that [`resolve`]
/// gives for `lanes` over `threads`, so that every lane has one: 2 on a CPU with at least 2
/// threads, else 1. The count is part of a run's numbers (the gradients are summed micro-batch
/// by micro-batch) while the lanes are not, so a run that must give the same last digits on one
/// thread as on several sets it.
pub fn micro_batches(
    asked: Option<NonZeroUsize>,
    lanes: Option<NonZeroUsize>,
    on_cpu: bool,
    threads: usize,
) -> usize {
    asked.map_or_else(|| resolve(lanes, on_cpu, threads), NonZeroUsize::get)
}

/// The pools of the lanes [`resolve`] gives for the current rayon pool's threads, at most
/// `most` of them (a trainer has no more lanes than micro-batches); see [`pools`].
pub fn start(
    asked: Option<NonZeroUsize>,
    on_cpu: bool,
    most: usize,
    name: &'static str,
) -> Result<Vec<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
    let threads = rayon::current_num_threads();
    pools(resolve(asked, on_cpu, threads).min(most), threads, name)
}

/// Why a config's `lanes` cannot be: more than one on a GPU, or more than `threads` (when set).
pub fn check(
    asked: Option<NonZeroUsize>,
    device: DeviceSpec,
    threads: Option<usize>,
) -> Result<(), String> {
    let Some(lanes) = asked else { return Ok(()) };
    if lanes.get() > 1 && device != DeviceSpec::Cpu {
        return Err("more than one lane needs `device: \"cpu\"` (a GPU runs one at a time)".into());
    }
    match threads {
        Some(t) if t < lanes.get() => Err(format!(
            "{lanes} lanes need at least as many `threads` (got {t})"
        )),
        _ => Ok(()),
    }
}

/// One thread pool per lane, splitting `threads` between `lanes` (the first lanes take the
/// remainder); none for a single lane, which runs on the global pool as it is.
pub fn pools(
    lanes: usize,
    threads: usize,
    name: &'static str,
) -> Result<Vec<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
    if lanes <= 1 {
        return Ok(Vec::new());
    }
    (0..lanes)
        .map(|lane| {
            rayon::ThreadPoolBuilder::new()
                .num_threads((threads / lanes + usize::from(lane < threads % lanes)).max(1))
                .thread_name(move |i| format!("rho-{name}{lane}-{i}"))
                .build()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_default_to_two_on_a_cpu_with_the_threads_for_them() {
        let two = NonZeroUsize::new(2);
        let eight = NonZeroUsize::new(8);
        assert_eq!(resolve(None, true, 1), 1);
        assert_eq!(resolve(None, true, 2), 2);
        assert_eq!(resolve(None, true, 64), 2);
        assert_eq!(resolve(eight, true, 64), 8);
        assert_eq!(resolve(eight, true, 4), 4, "cut to the threads");
        assert_eq!(resolve(eight, false, 16), 1, "a GPU runs one at a time");
        assert!(check(two, DeviceSpec::Cuda(0), None).is_err());
        assert!(check(NonZeroUsize::new(3), DeviceSpec::Cpu, Some(2)).is_err());
        assert!(check(two, DeviceSpec::Cpu, Some(2)).is_ok());
        assert!(check(None, DeviceSpec::Cuda(1), Some(1)).is_ok());
    }

    #[test]
    fn micro_batches_default_to_one_per_lane() {
        let (one, three) = (NonZeroUsize::new(1), NonZeroUsize::new(3));
        assert_eq!(micro_batches(None, None, true, 2), 2);
        assert_eq!(micro_batches(None, None, true, 1), 1);
        assert_eq!(
            micro_batches(None, None, false, 16),
            1,
            "a GPU runs one at a time"
        );
        assert_eq!(micro_batches(None, three, true, 8), 3);
        assert_eq!(micro_batches(None, one, true, 8), 1);
        assert_eq!(
            micro_batches(three, None, true, 1),
            3,
            "as asked, whatever the lanes"
        );
        assert_eq!(micro_batches(one, None, true, 8), 1);
    }

    #[test]
    fn the_threads_are_shared_out_whole() {
        let sizes = |l, t| {
            pools(l, t, "test")
                .unwrap()
                .iter()
                .map(|p| p.current_num_threads())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1, 8), Vec::<usize>::new());
        assert_eq!(sizes(2, 2), [1, 1]);
        assert_eq!(sizes(3, 8), [3, 3, 2]);
    }
}
