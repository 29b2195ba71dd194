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

use std::cell::RefCell;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream, DriverError};

use super::{DriverContext, GpuError};

thread_local! {
    /// The launches recorded by the innermost [`recorded`] on this thread
    /// (None outside one).
    static RECORDING: RefCell<Option<Vec<(&'static str, CudaEvent)>>> = const { RefCell::new(None) };
}

/// What every launcher does with the result of enqueuing a kernel: maps a
/// driver error to a [`GpuError`] naming the launch (`label`: "launching
/// <kernel>[ (what)]"), then, when the thread is inside `recorded`, records an
/// event on `stream` for the phase named by what follows "launching ". So each
/// launch names itself once, for its error and for its timing.
pub(crate) fn launched<T>(
    stream: &CudaStream,
    launch: Result<T, DriverError>,
    label: &'static str,
) -> Result<(), GpuError> {
    launch.doing(label)?;
    RECORDING.with(|r| {
        let mut r = r.borrow_mut();
        match r.as_mut() {
            None => Ok(()),
            Some(events) => {
                let event =
                    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).doing("recording a launch's event")?;
                events.push((label.strip_prefix("launching ").unwrap_or(label), event));
                Ok(())
            }
        }
    })
}

/// Runs `f` with this thread's launches recorded: returns what `f` returned
/// and each launch's (kernel, event recorded after it), in launch order.
/// Nested calls: the inner one takes the launches it encloses.
pub(crate) fn recorded<R>(f: impl FnOnce() -> R) -> (R, Vec<(&'static str, CudaEvent)>) {
    /// The enclosing recording (None outside one), put back on drop, so
    /// also when `f` panics.
    struct Restore(Option<Vec<(&'static str, CudaEvent)>>);
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

/// One launch's share of a bench row: the kernel and its median time over
/// the timed runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    /// The kernel's name without dtype and variant suffixes, e.g.
    /// `gateloop_chunk_state_seq` (and what the launch is for, where one
    /// kernel serves two: `gateloop_chunk_carry (backward)`).
    pub kernel: String,
    pub median_ms: f64,
}

/// The phases of a row from each timed run's launch durations (run r:
/// `runs[r]`, (kernel, ms) in launch order). A phase per launch position;
/// None when the runs disagree on the launches (a row whose launches change
/// from run to run is not split) or made fewer than two.
pub fn phase_medians(runs: &[Vec<(&'static str, f64)>]) -> Option<Vec<Phase>> {
    let first = runs.first()?;
    if first.len() < 2 {
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
    fn no_split_for_one_launch_or_disagreeing_runs() {
        assert_eq!(phase_medians(&[]), None);
        assert_eq!(phase_medians(&[vec![("recurrent", 1.0)], vec![("recurrent", 1.1)]]), None);
        let differ = vec![vec![("a", 1.0), ("b", 1.0)], vec![("a", 1.0), ("c", 1.0)]];
        assert_eq!(phase_medians(&differ), None);
        let shorter = vec![vec![("a", 1.0), ("b", 1.0)], vec![("a", 1.0)]];
        assert_eq!(phase_medians(&shorter), None);
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
