//! Per-launch timing for the bench: which of a mode's launches takes the time.
//!
//! The chunked forward is two or three launches, its backward four to six,
//! the scan up to three; a bench row times them together. Nsight Compute
//! splits them, but only for the few cases a profile run can afford (and with
//! its own clocks). Here every launcher passes each launch's result to
//! `launched`; while the calling thread is inside `recorded`
//! (the bench), that records a CUDA event on the stream, named after the
//! kernel, so each launch's time is the span between consecutive events. Any
//! other caller pays one thread-local read per launch and nothing on the GPU.
//!
//! Events on one stream add no synchronization (the launches were serialized
//! on it already); the GPU only records a timestamp between two kernels.
//!
//! Each recorded launch also keeps its function and geometry, so the bench
//! can say how many of its blocks the driver lets one SM hold (the occupancy
//! API, asked once per row after the timed runs, not between launches): the
//! number the kernels' launch bounds were chosen for (cuda/chunk.cu's
//! tables), confirmed on the card, beside the time it bought.

use std::cell::RefCell;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaFunction, CudaStream, DriverError, LaunchConfig};

use super::{DriverContext, GpuError};

/// One launch seen inside [`recorded`]: the kernel's name, the event recorded
/// after it, and what it was launched with.
pub(crate) struct Recorded {
    pub kernel: &'static str,
    pub event: CudaEvent,
    pub function: CudaFunction,
    pub config: LaunchConfig,
}

thread_local! {
    /// The launches recorded by the innermost [`recorded`] on this thread
    /// (None outside one).
    static RECORDING: RefCell<Option<Vec<Recorded>>> = const { RefCell::new(None) };
}

/// What every launcher does with the result of enqueuing a kernel: maps a
/// driver error to a [`GpuError`] naming the launch (`label`: "launching
/// KERNEL[ (WHAT)]"), then, when the thread is inside `recorded`, records an
/// event on `stream` for the phase named by what follows "launching ", with
/// `function` and `config` (what `launch` was enqueued with). So each launch
/// names itself once, for its error and for its timing.
pub(crate) fn launched<T>(
    stream: &CudaStream,
    function: &CudaFunction,
    config: LaunchConfig,
    launch: Result<T, DriverError>,
    label: &'static str,
) -> Result<(), GpuError> {
    launch.doing(label)?;
    RECORDING.with(|r| {
        let mut r = r.borrow_mut();
        match r.as_mut() {
            None => Ok(()),
            Some(launches) => {
                let event =
                    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).doing("recording a launch's event")?;
                launches.push(Recorded {
                    kernel: label.strip_prefix("launching ").unwrap_or(label),
                    event,
                    function: function.clone(),
                    config,
                });
                Ok(())
            }
        }
    })
}

/// Runs `f` with this thread's launches recorded: returns what `f` returned
/// and each launch it made, in launch order.
/// Nested calls: the inner one takes the launches it encloses.
pub(crate) fn recorded<R>(f: impl FnOnce() -> R) -> (R, Vec<Recorded>) {
    /// The enclosing recording (None outside one), put back on drop, so
    /// also when `f` panics.
    struct Restore(Option<Vec<Recorded>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            RECORDING.with(|r| *r.borrow_mut() = outer);
        }
    }
    let restore = Restore(RECORDING.with(|r| r.borrow_mut().replace(Vec::new())));
    let out = f();
    let mine = RECORDING.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (out, mine)
}

/// One launch's share of a bench row: the kernel, its median time over the
/// timed runs, and its geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    /// The kernel's name without dtype and variant suffixes, e.g.
    /// `gateloop_chunk_state_seq` (and what the launch is for, where one
    /// kernel serves two: `gateloop_chunk_carry (backward)`).
    pub kernel: String,
    /// Median over the timed runs of the span from the event before the
    /// launch (the run's start, or the previous launch's) to its own, ms.
    pub median_ms: f64,
    /// The launch's shape and residency (the first timed run's; the runs of
    /// a row launch the same kernels on same-sized buffers). None where the
    /// phases were not taken from launches (tests).
    pub geometry: Option<Geometry>,
}

/// How a launch was shaped, and how many of its blocks one SM holds at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Blocks in the grid.
    pub blocks: u64,
    /// Threads per block.
    pub block_threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
    /// The driver's occupancy calculator for this function, block size and
    /// shared memory (registers, shared memory and thread limits together,
    /// with the carveout the driver picks): None if it did not answer.
    pub resident_per_sm: Option<u32>,
}

impl Geometry {
    /// `launch`'s geometry, asking the driver for its residency.
    pub(crate) fn of(launch: &Recorded) -> Geometry {
        let c = &launch.config;
        let block_threads = c.block_dim.0 * c.block_dim.1 * c.block_dim.2;
        Geometry {
            blocks: u64::from(c.grid_dim.0) * u64::from(c.grid_dim.1) * u64::from(c.grid_dim.2),
            block_threads,
            shared_bytes: c.shared_mem_bytes,
            // A diagnostic: a driver that cannot say leaves it unknown
            // rather than failing the timing it annotates.
            resident_per_sm: launch
                .function
                .occupancy_max_active_blocks_per_multiprocessor(block_threads, c.shared_mem_bytes as usize, None)
                .ok(),
        }
    }

    /// How many full rounds of `sm_count` SMs, each holding
    /// `resident_per_sm` blocks, the grid takes (fractional: 0.5 is half the
    /// GPU's slots filled once; 1.2 is a full round and a fifth).
    pub fn waves(&self, sm_count: usize) -> Option<f64> {
        let slots = u64::from(self.resident_per_sm?) * sm_count as u64;
        (slots > 0).then(|| self.blocks as f64 / slots as f64)
    }
}

/// The phases of a row from each timed run's launch durations (run r:
/// `runs[r]`, (kernel, ms) in launch order). A phase per launch position,
/// without geometry; None when the runs disagree on the launches (a row
/// whose launches change from run to run is not split) or made none.
pub fn phase_medians(runs: &[Vec<(&'static str, f64)>]) -> Option<Vec<Phase>> {
    let first = runs.first()?;
    if first.is_empty() {
        return None;
    }
    let same = |run: &Vec<(&'static str, f64)>| {
        run.len() == first.len() && run.iter().zip(first).all(|((a, _), (b, _))| a == b)
    };
    if !runs.iter().all(same) {
        return None;
    }
    Some(
        first
            .iter()
            .enumerate()
            .map(|(i, (kernel, _))| Phase {
                kernel: kernel.to_string(),
                median_ms: super::bench::median(&runs.iter().map(|run| run[i].1).collect::<Vec<_>>()),
                geometry: None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_launch_position() {
        let runs = vec![
            vec![("state_seq", 2.0), ("output", 3.0)],
            vec![("state_seq", 2.2), ("output", 3.4)],
            vec![("state_seq", 2.1), ("output", 3.1)],
        ];
        let p = phase_medians(&runs).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].kernel.as_str(), p[0].median_ms), ("state_seq", 2.1));
        assert_eq!((p[1].kernel.as_str(), p[1].median_ms), ("output", 3.1));
    }

    #[test]
    fn no_split_for_no_launch_or_disagreeing_runs() {
        assert_eq!(phase_medians(&[]), None);
        assert_eq!(phase_medians(&[vec![], vec![]]), None);
        let one = phase_medians(&[vec![("recurrent", 1.0)], vec![("recurrent", 1.1)], vec![("recurrent", 1.3)]]);
        assert_eq!(one.unwrap()[0].median_ms, 1.1);
        let differ = vec![vec![("a", 1.0), ("b", 1.0)], vec![("a", 1.0), ("c", 1.0)]];
        assert_eq!(phase_medians(&differ), None);
        let shorter = vec![vec![("a", 1.0), ("b", 1.0)], vec![("a", 1.0)]];
        assert_eq!(phase_medians(&shorter), None);
    }

    #[test]
    fn waves_count_the_grid_in_rounds_of_resident_slots() {
        let g = Geometry { blocks: 512, block_threads: 256, shared_bytes: 53376, resident_per_sm: Some(4) };
        assert_eq!(g.waves(128), Some(1.0));
        assert_eq!(g.waves(132), Some(512.0 / 528.0));
        assert_eq!(Geometry { resident_per_sm: Some(2), ..g }.waves(128), Some(2.0));
        assert_eq!(Geometry { resident_per_sm: None, ..g }.waves(132), None);
        assert_eq!(Geometry { resident_per_sm: Some(0), ..g }.waves(132), None);
    }

    #[test]
    fn outside_a_recording_nothing_is_kept() {
        // No stream is needed to show that recorded() starts empty and nests.
        let ((), outer) = recorded(|| {
            let ((), inner) = recorded(|| ());
            assert!(inner.is_empty());
        });
        assert!(outer.is_empty());
        RECORDING.with(|r| assert!(r.borrow().is_none()));
    }
}
