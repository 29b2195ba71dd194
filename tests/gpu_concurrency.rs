//! One `Gpu` (one CUDA context, its loaded kernels) shared by 8 host
//! threads, each with two streams of its own, interleaving launches of every
//! kernel: recurrent f32/f16/bf16, decode (in place, in pieces), the scan
//! (multi-chunk, with a workspace), attention, and the device value check.
//!
//! - `concurrent_launches_are_bit_identical_to_sequential`: every job (a
//!   kernel on its own problem: 8 threads × 2 problems × 7 kinds) run by the
//!   8 threads at once, three times over, gives outputs BIT-identical to the
//!   same job run alone on one stream. The kernels are deterministic (no
//!   float atomics: each output element is written once, by one thread, with
//!   a fixed reduction order), so any difference is a race between streams
//!   or threads (shared state in the Gpu, a buffer reused across streams, a
//!   launch reading another's parameters).
//! - `no_device_memory_leak_over_10000_launches`: the device's free memory
//!   is the same before and after 10,000 launcher calls (≥ 10,000 kernel
//!   launches: the scan and attention calls launch up to three each), made
//!   by the 8 threads, each call with freshly allocated (and dropped) inputs,
//!   outputs and workspaces. See [`settled_free_memory`] for how the
//!   stream-ordered allocator's pool is accounted for.
//! - `gpu_is_send_and_sync`: the static assertion that makes sharing a `Gpu`
//!   across threads (`std::thread::scope`, a `static OnceLock<Gpu>`) legal.
//!
//! The two GPU tests hold one lock so that they never overlap (the leak test
//! reads a device-wide number). Budget: well under 60 s on an H200.
//!
//! Without a usable GPU every GPU test prints `SKIPPED (no GPU): <reason>`
//! and passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use common::{flat, upload};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use gateloop::Dims;
use gateloop::cuda::recurrent::{self, DecodeInputs};
use gateloop::cuda::{DeviceInputs, DeviceOutputs, Element, Gpu, GpuError, attention, check, scan};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use half::{bf16, f16};

const THREADS: usize = 8;
const STREAMS_PER_THREAD: usize = 2;
const PROBLEMS_PER_THREAD: usize = 2;

/// Serializes the GPU tests of this binary (see the module doc).
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RecurrentF32,
    RecurrentF16,
    RecurrentBf16,
    Decode,
    Scan,
    Attention,
    Check,
}

const KINDS: [Kind; 7] = [
    Kind::RecurrentF32,
    Kind::RecurrentF16,
    Kind::RecurrentBf16,
    Kind::Decode,
    Kind::Scan,
    Kind::Attention,
    Kind::Check,
];

/// One kernel on one problem.
struct Job {
    kind: Kind,
    p: OwnedProblem<f32>,
    label: String,
}

/// The lengths of the decode pieces of a sequence of `len` ≥ 67 steps:
/// one step, then pieces across the kernel's 64-step staging chunks.
fn decode_pieces(len: usize) -> [usize; 4] {
    [1, 63, 2, len - 66]
}

impl Job {
    /// Launcher calls this job makes (what the leak test counts).
    fn calls(&self) -> usize {
        match self.kind {
            Kind::Decode => decode_pieces(self.p.dims.len).len(),
            _ => 1,
        }
    }
}

/// The problems of thread `t`: different shapes per thread and per problem
/// (per-head gates on odd threads, h0 on most), gates of the `Mixed` regime
/// (resets, unit modulus, large phases, strong decay). `small`: the leak
/// test's shorter sequences.
fn thread_jobs(t: usize, small: bool) -> Vec<Job> {
    let lens = [300, 700, 1000, 129, 520, 100, 257, 900];
    let keys = [16, 32, 64, 5, 48, 128, 33, 8];
    let values = [32, 16, 64, 7, 33, 40, 64, 128];
    let batch_heads = [(1, 2), (2, 3), (1, 1), (3, 2)];
    let mut jobs = Vec::new();
    for rep in 0..PROBLEMS_PER_THREAD {
        let (b, h) = batch_heads[(t + rep) % 4];
        let len = if small { 100 + 37 * t + rep } else { lens[t] + 50 * rep };
        let (k, v) =
            if small { (keys[(t + rep) % 8].min(32), values[t].min(32)) } else { (keys[(t + rep) % 8], values[t]) };
        let d = dims(b, len, h, k, v, t % 2 == 1);
        for (i, kind) in KINDS.into_iter().enumerate() {
            let seed = 90_000 + 1000 * t as u64 + 100 * rep as u64 + i as u64;
            let with_h0 = !(t + rep + i).is_multiple_of(3);
            let p = random_problem(d, GateRegime::Mixed, with_h0, seed).to_f32();
            jobs.push(Job { kind, p, label: format!("thread {t} {kind:?} {d:?} h0={with_h0} seed={seed}") });
        }
    }
    jobs
}

/// Downloads an enqueued job's outputs as bits (y widened to f32, exact;
/// then h_final) and synchronizes its stream.
type Pending = Box<dyn FnOnce() -> Vec<u32>>;

fn bits_of<T: Element>(s: &Arc<CudaStream>, ys: &[CudaSlice<T>], h: &CudaSlice<f32>) -> Vec<u32> {
    let mut bits = Vec::new();
    for y in ys {
        bits.extend(s.clone_dtoh(y).unwrap().iter().map(|x| x.to_f32().to_bits()));
    }
    bits.extend(s.clone_dtoh(h).unwrap().iter().map(|x| x.to_bits()));
    s.synchronize().unwrap();
    bits
}

/// The launch of a forward job: dims, inputs, outputs, workspace.
type Launch<'a, T> = Box<
    dyn FnOnce(
            &Dims,
            DeviceInputs<'_, T>,
            DeviceOutputs<'_, T>,
            Option<&mut dyn DevicePtrMut<f32>>,
        ) -> Result<(), GpuError>
        + 'a,
>;

/// A forward call (`launch`) on fresh NaN-poisoned outputs and a fresh
/// NaN-poisoned workspace of `ws_len` f32 (none when 0), q, k, v in `T`.
fn enqueue_forward<T: Element>(s: &Arc<CudaStream>, job: &Job, ws_len: usize, launch: Launch<'_, T>) -> Pending {
    let (p, d) = (&job.p, job.p.dims);
    let u = upload::<T>(s, p);
    let h0 = p.h0.as_ref().map(|h| s.clone_htod(&flat(h)).unwrap());
    let mut y = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
    let mut h = s.clone_htod(&vec![f32::NAN; 2 * d.state_len()]).unwrap();
    let mut ws = (ws_len > 0).then(|| s.clone_htod(&vec![f32::NAN; ws_len]).unwrap());
    launch(
        &d,
        DeviceInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &u.log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h },
        ws.as_mut().map(|w| w as _),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", job.label));
    // The inputs and the workspace are dropped here: cudarc frees them in
    // stream order, after the launches that read them.
    let s = s.clone();
    Box::new(move || bits_of(&s, &[y], &h))
}

/// Decoding in place, in pieces (f32), from h0 (or zeros).
fn enqueue_decode(gpu: &Gpu, s: &Arc<CudaStream>, job: &Job) -> Pending {
    let (p, d) = (&job.p, job.p.dims);
    let mut state = match &p.h0 {
        Some(h) => s.clone_htod(&flat(h)).unwrap(),
        None => s.alloc_zeros::<f32>(2 * d.state_len()).unwrap(),
    };
    let mut ys = Vec::new();
    let mut t0 = 0;
    for n in decode_pieces(d.len) {
        let piece = p.steps(t0, n);
        let dn = piece.dims;
        let u = upload::<f32>(s, &piece);
        let mut y = s.clone_htod(&vec![f32::NAN; dn.v_len()]).unwrap();
        let inputs = DecodeInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &u.log_gate };
        recurrent::decode_into(gpu, s, &dn, inputs, &mut y, &mut state)
            .unwrap_or_else(|e| panic!("{} at t0 = {t0}: {e}", job.label));
        ys.push(y);
        t0 += n;
    }
    let s = s.clone();
    Box::new(move || bits_of(&s, &ys, &state))
}

/// The device value check (it synchronizes `s`): one word, 1 for "passed".
fn run_check(gpu: &Gpu, s: &Arc<CudaStream>, job: &Job) -> Pending {
    let gate = s.clone_htod(&flat(&job.p.log_gate)).unwrap();
    let passed = check::log_gate(gpu, s, &job.p.dims, &gate).is_ok();
    Box::new(move || vec![passed as u32])
}

/// Enqueues `job` on `s`; the returned closure downloads its outputs.
fn enqueue(gpu: &Gpu, s: &Arc<CudaStream>, job: &Job) -> Pending {
    match job.kind {
        Kind::RecurrentF32 => {
            enqueue_forward::<f32>(s, job, 0, Box::new(|d, i, o, _| recurrent::forward_into(gpu, s, d, i, o)))
        }
        Kind::RecurrentF16 => {
            enqueue_forward::<f16>(s, job, 0, Box::new(|d, i, o, _| recurrent::forward_into(gpu, s, d, i, o)))
        }
        Kind::RecurrentBf16 => {
            enqueue_forward::<bf16>(s, job, 0, Box::new(|d, i, o, _| recurrent::forward_into(gpu, s, d, i, o)))
        }
        Kind::Scan => {
            let ws_len = scan::plan_for(gpu, &job.p.dims).unwrap().workspace_len;
            enqueue_forward::<f32>(s, job, ws_len, Box::new(|d, i, o, w| scan::forward_into(gpu, s, d, i, o, w)))
        }
        Kind::Attention => {
            let ws_len = attention::plan(&job.p.dims).unwrap().workspace_len;
            enqueue_forward::<f32>(s, job, ws_len, Box::new(|d, i, o, w| attention::forward_into(gpu, s, d, i, o, w)))
        }
        Kind::Decode => enqueue_decode(gpu, s, job),
        Kind::Check => run_check(gpu, s, job),
    }
}

/// Every job, one after another on one stream, each downloaded before the
/// next is enqueued.
fn run_sequential(gpu: &Gpu, jobs: &[Vec<Job>]) -> Vec<Vec<Vec<u32>>> {
    let s = gpu.context().new_stream().expect("stream");
    jobs.iter().map(|thread| thread.iter().map(|job| enqueue(gpu, &s, job)()).collect()).collect()
}

/// Thread t runs `jobs[t]` on its streams `streams[t]`, alternating between
/// them: it enqueues every job, then downloads them all; the 8 threads run at
/// once and share `gpu`.
fn run_concurrent(gpu: &Gpu, streams: &[Vec<Arc<CudaStream>>], jobs: &[Vec<Job>]) -> Vec<Vec<Vec<u32>>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .zip(streams)
            .map(|(thread_jobs, thread_streams)| {
                scope.spawn(move || {
                    let pending: Vec<Pending> = thread_jobs
                        .iter()
                        .enumerate()
                        .map(|(j, job)| enqueue(gpu, &thread_streams[j % thread_streams.len()], job))
                        .collect();
                    pending.into_iter().map(|download| download()).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a launching thread panicked")).collect()
    })
}

fn new_streams(gpu: &Gpu) -> Vec<Vec<Arc<CudaStream>>> {
    (0..THREADS)
        .map(|_| (0..STREAMS_PER_THREAD).map(|_| gpu.context().new_stream().expect("stream")).collect())
        .collect()
}

#[test]
fn gpu_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Gpu>();
    assert_send_sync::<Arc<CudaStream>>();
    assert_send_sync::<CudaSlice<f32>>();
    assert_send_sync::<gateloop::cuda::GpuError>();
}

#[test]
fn concurrent_launches_are_bit_identical_to_sequential() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let _lock = exclusive();
    let jobs: Vec<Vec<Job>> = (0..THREADS).map(|t| thread_jobs(t, false)).collect();
    let want = run_sequential(gpu, &jobs);
    for (thread, outs) in jobs.iter().zip(&want) {
        for (job, bits) in thread.iter().zip(outs) {
            if job.kind == Kind::Check {
                assert_eq!(bits, &[1], "{}: the device check rejected a valid gate", job.label);
            } else {
                let nan = bits.iter().filter(|&&b| f32::from_bits(b).is_nan()).count();
                assert_eq!(nan, 0, "{}: {nan} NaN outputs (an element not written?)", job.label);
            }
        }
    }
    let streams = new_streams(gpu);
    // One concurrent round on the emulated device (its launches run one at a
    // time anyway: what it checks is the launchers' stream handling).
    let rounds = if common::emulated_device() {
        common::skipped_on_emulated_device("concurrent rounds 2 and 3");
        1
    } else {
        3
    };
    for round in 0..rounds {
        let got = run_concurrent(gpu, &streams, &jobs);
        for ((thread, outs), wants) in jobs.iter().zip(&got).zip(&want) {
            for ((job, bits), want) in thread.iter().zip(outs).zip(wants) {
                assert_eq!(bits.len(), want.len(), "round {round}: {}", job.label);
                if let Some(i) = bits.iter().zip(want).position(|(a, b)| a != b) {
                    panic!(
                        "round {round}: {}: output word {i} is {:e} concurrently, {:e} sequentially",
                        job.label,
                        f32::from_bits(bits[i]),
                        f32::from_bits(want[i])
                    );
                }
            }
        }
    }
}

/// The device's free memory once nothing is in flight and the pool holds
/// nothing back.
///
/// cudarc allocates with the stream-ordered allocator (`cuMemAllocAsync`)
/// when the device supports it: a dropped buffer returns to the device's
/// memory pool, which keeps it reserved (counted as used by
/// `cuMemGetInfo`) until the pool releases it. So: synchronize the context
/// (every stream-ordered free completes), then trim the pool to 0 bytes
/// (`cuMemPoolTrimTo`), then read the free memory. Whatever the first
/// launches allocate once and keep — lazily loaded kernels
/// (`CUDA_MODULE_LOADING=LAZY`), the context's local-memory reservation,
/// per-stream resources — is excluded by measuring "before" after a warm-up
/// round that makes every kind of call on every stream.
fn settled_free_memory(gpu: &Gpu) -> usize {
    let ctx = gpu.context();
    ctx.synchronize().expect("synchronize");
    if ctx.has_async_alloc() {
        // SAFETY: ctx.cu_device() is the live device of this context (the
        // Gpu holds the context); cuDeviceGetMemPool only reads the device's
        // current pool handle, which cudarc's cuMemAllocAsync allocates
        // from. cuMemPoolTrimTo on that pool releases only memory that no
        // allocation uses (every buffer of this test is dropped and the
        // context synchronized above), so no live buffer is affected.
        unsafe {
            let pool = cudarc::driver::result::device::get_mem_pool(ctx.cu_device()).expect("cuDeviceGetMemPool");
            cudarc::driver::result::mem_pool::trim_to(pool, 0).expect("cuMemPoolTrimTo");
        }
    }
    ctx.mem_get_info().expect("cuMemGetInfo").0
}

#[test]
fn no_device_memory_leak_over_10000_launches() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let _lock = exclusive();
    let jobs: Vec<Vec<Job>> = (0..THREADS).map(|t| thread_jobs(t, true)).collect();
    let calls_per_round: usize = jobs.iter().flatten().map(Job::calls).sum();
    let streams = new_streams(gpu);

    // Warm-up: every kind of call on every stream (both alternations).
    let warm = run_concurrent(gpu, &streams, &jobs);
    let mut rotated = jobs;
    for thread in &mut rotated {
        thread.rotate_left(1);
    }
    let jobs = rotated;
    drop(run_concurrent(gpu, &streams, &jobs));
    drop(warm);
    let before = settled_free_memory(gpu);

    // 1000 calls on the emulated device: its free memory is its total less
    // the live allocations' bytes, so one leaked buffer shows exactly.
    let target_calls: usize = if common::emulated_device() {
        common::skipped_on_emulated_device("launcher calls 1001 to 10000");
        1000
    } else {
        10_000
    };
    let rounds = target_calls.div_ceil(calls_per_round);
    for _ in 0..rounds {
        drop(run_concurrent(gpu, &streams, &jobs));
    }
    let after = settled_free_memory(gpu);
    let calls = rounds * calls_per_round;
    eprintln!(
        "leak check: {calls} launcher calls in {rounds} rounds; free device memory {before} B before, {after} B after"
    );
    assert!(calls >= target_calls);
    assert_eq!(
        after,
        before,
        "device free memory changed by {} bytes over {calls} launcher calls",
        after as i128 - before as i128
    );
}
