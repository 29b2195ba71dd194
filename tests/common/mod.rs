//! Shared helpers of the GPU and CPU tests.
//!
//! `gpu_or_skip()` opens device 0 or explains why not: without a GPU, driver
//! or kernels, a test prints `SKIPPED (no GPU): <reason>` to stderr and
//! passes; with `GATELOOP_REQUIRE_GPU=1` that is a failure instead.
//!
//! The test matrix: [`Case`] (a seeded problem and its f64 reference),
//! [`shape_sweep`], [`regime_matrix`], `regime_tests!` (one `#[test]` per
//! gate regime), [`assert_outputs`] (compare and assert, naming the case),
//! and [`run_forward`] (one NaN-poisoned launch on a fresh stream).

#![allow(dead_code)]

pub mod grad;
pub mod packed;

use std::io::Write as _;
use std::sync::OnceLock;

use gateloop::cuda::{Gpu, GpuError};

/// Whether `GATELOOP_REQUIRE_GPU` asks for a GPU (any value but empty/0).
pub fn gpu_required() -> bool {
    std::env::var("GATELOOP_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Device 0, opened once per test binary (tests run on several threads and
/// share it), or `None` after printing the skip notice.
pub fn gpu_or_skip() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| Gpu::new(0).map_err(|e: GpuError| e.to_string()));
    match gpu {
        Ok(gpu) => Some(gpu),
        Err(reason) => {
            if gpu_required() {
                panic!("GATELOOP_REQUIRE_GPU is set but no GPU is usable: {reason}");
            }
            notice(&format!("SKIPPED (no GPU): {reason}"));
            None
        }
    }
}

/// A `gateloop ... --device cuda` run of the command line that failed:
/// passes, printing the skip notice, when it failed because no GPU is usable
/// (exit 1, "cannot use the GPU"); any other failure, or that one under
/// `GATELOOP_REQUIRE_GPU=1`, fails the test, naming `what`.
pub fn cli_cuda_skipped(what: &str, o: &std::process::Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("cannot use the GPU"), "{what}: {err}");
    assert!(!gpu_required(), "GATELOOP_REQUIRE_GPU is set but {what} could not use the GPU: {err}");
    notice(&format!("SKIPPED (no GPU): {what}"));
}

/// The name of the running test: libtest runs each test on a thread named
/// after it.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Prints `text` and the running test's name as one line straight to the
/// process's stderr: the test harness captures eprintln!, which would hide
/// the notice of a passing test; one write per line, so that parallel tests
/// do not interleave.
fn notice(text: &str) {
    let line = format!("{text} [{}]\n", test_name());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Whether the device is the CPU kernel emulator behind a fake CUDA driver
/// (`scripts/emulated-device.sh` sets `GATELOOP_EMULATED_DEVICE=1`): tests
/// then leave out the few cases that would take it hours (each says so),
/// which the GPU bundle runs.
pub fn emulated_device() -> bool {
    std::env::var("GATELOOP_EMULATED_DEVICE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Prints (to the process's stderr, as the skip notice) that `what` is left
/// out on the emulated device.
pub fn skipped_on_emulated_device(what: &str) {
    notice(&format!("SKIPPED on the emulated device (too long on the CPU; the GPU bundle runs it): {what}"));
}

/// On the emulated device, a test runs about one case in this many of those
/// under [`EMULATED_WORK_MAX`]: its first, then each with probability
/// 1/this, drawn from a hash of the test's name and the case's number (the
/// same cases on every run, and no aliasing with the loops of a test: every
/// dtype, precision and gate kind of a matrix keeps some cases), so that
/// the whole GPU suite runs in minutes on two cores instead of half an
/// hour: the emulated device checks the launchers end to end, and each
/// kernel's arithmetic is checked case by case by the kernel emulator tests
/// (tests/cpu_*_emu.rs) and on a GPU.
/// `GATELOOP_EMULATED_EVERY=1` runs every case (and lifts
/// [`EMULATED_WORK_MAX`]).
pub const EMULATED_EVERY: usize = 8;

/// On the emulated device, the largest problem run, in B·H·L·K·V (a GPU runs
/// the larger ones in a blink, the emulator in minutes each). L = 65536 with
/// K = 4, V = 8 (2.1 M) is under it.
pub const EMULATED_WORK_MAX: usize = 8_000_000;

/// Whether the case of `d` is left out on the emulated device (see
/// [`EMULATED_EVERY`], [`EMULATED_WORK_MAX`]): always false on a GPU. Call it
/// once per case, before its reference is computed. Prints a notice the
/// first time a test leaves a case out.
pub fn emulated_device_skips(d: &Dims) -> bool {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    if !emulated_device() {
        return false;
    }
    let every =
        std::env::var("GATELOOP_EMULATED_EVERY").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(EMULATED_EVERY);
    if every <= 1 {
        return false;
    }
    // Per test: the cases under the cap counted so far, and whether its
    // notice is printed.
    static SEEN: Mutex<BTreeMap<String, (u64, bool)>> = Mutex::new(BTreeMap::new());
    let test = test_name();
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let (count, noticed) = seen.entry(test.clone()).or_insert((0, false));
    let work = d.batch * d.heads * d.len * d.key_dim * d.value_dim;
    // The cap first: the cases under it are counted, so a test whose first
    // cases are large still runs its first small one.
    let skip = work > EMULATED_WORK_MAX || {
        let n = *count;
        *count += 1;
        // FNV-1a of the name, then splitmix64's finalizer of name + n.
        let name =
            test.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut z = name.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        n > 0 && !z.is_multiple_of(every as u64)
    };
    if skip && !*noticed {
        *noticed = true;
        notice(&format!(
            "SKIPPED on the emulated device: any case over {EMULATED_WORK_MAX} B·H·L·K·V, and about \
             {} in {every} of the others (GATELOOP_EMULATED_EVERY=1 runs them; a GPU runs them all)",
            every - 1
        ));
    }
    skip
}

// ---- the test matrix -------------------------------------------------------

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use gateloop::cuda::{DeviceInputs, DeviceOutputs, Element};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, ErrorStats, Outputs, compare, compare_complex, reference};

/// Relative L2 bound of an f32 implementation against the f64 reference on
/// the same f32-rounded inputs.
pub const REL: f64 = 1e-4;
/// Max-abs bound, as a fraction of max|ref|.
pub const ABS_FRAC: f64 = 1e-3;

/// The relative bound `rel` (the for L ≤ 4096) at length `len`:
/// `rel · L/4096`, from 1× up to the 10× the issue allows at L = 65536.
/// The scan's state is a chain of up to L complex products in f32, whose
/// rounding grows with L where nothing decays (|a| = 1); on an H200 its
/// h_final came out 1.03e-4 off at L = 20000 with |a| = 1 (2026-11-30), as
/// for the chunked kernels' 1e-3 at L = 65536.
pub fn rel_at_len(rel: f64, len: usize) -> f64 {
    rel * (len as f64 / 4096.0).clamp(1.0, 10.0)
}

/// The gate regimes the implementations must survive (besides `Random`).
pub const ADVERSARIAL_REGIMES: [GateRegime; 6] = [
    GateRegime::Resets(0.05),
    GateRegime::Resets(1.0),
    GateRegime::UnitModulus,
    GateRegime::LargePhase(50.0),
    GateRegime::StrongDecay(40.0),
    GateRegime::Mixed,
];

/// `Random` and [`ADVERSARIAL_REGIMES`].
pub const ALL_REGIMES: [GateRegime; 7] = [
    GateRegime::Random,
    GateRegime::Resets(0.05),
    GateRegime::Resets(1.0),
    GateRegime::UnitModulus,
    GateRegime::LargePhase(50.0),
    GateRegime::StrongDecay(40.0),
    GateRegime::Mixed,
];

/// [`ALL_REGIMES`] plus gates whose exp underflows or nearly does (the
/// backward tests).
pub const ALL_REGIMES_AND_UNDERFLOW: [GateRegime; 9] = [
    GateRegime::Random,
    GateRegime::Resets(0.05),
    GateRegime::Resets(1.0),
    GateRegime::UnitModulus,
    GateRegime::LargePhase(50.0),
    GateRegime::StrongDecay(40.0),
    GateRegime::Mixed,
    GateRegime::Underflow,
    GateRegime::HardDecay(0.5),
];

/// The regimes that have a real form (the real-gate kernels' tests take
/// their log gates with the phase set to 0): every one but the large phases
/// and the mix, plus underflow and hard decay.
pub const REAL_REGIMES: [GateRegime; 7] = [
    GateRegime::Random,
    GateRegime::Resets(0.05),
    GateRegime::Resets(1.0),
    GateRegime::UnitModulus,
    GateRegime::StrongDecay(40.0),
    GateRegime::Underflow,
    GateRegime::HardDecay(0.5),
];

/// One case of a test matrix: a random problem of `dims` with gates drawn
/// from `regime`, with or without h0, from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub dims: Dims,
    pub regime: GateRegime,
    pub with_h0: bool,
    pub seed: u64,
}

impl Case {
    pub fn new(dims: Dims, regime: GateRegime, with_h0: bool, seed: u64) -> Case {
        Case { dims, regime, with_h0, seed }
    }

    /// Names the case in assertion messages: shape, regime, h0, seed.
    pub fn label(&self) -> String {
        format!("{:?} {:?} h0={} seed={}", self.dims, self.regime, self.with_h0, self.seed)
    }

    /// The problem in f64.
    pub fn problem(&self) -> OwnedProblem<f64> {
        random_problem(self.dims, self.regime, self.with_h0, self.seed)
    }

    /// The problem rounded to f32 (what an f32 implementation sees) and the
    /// f64 recurrent reference on exactly those inputs.
    pub fn with_reference(&self) -> (OwnedProblem<f32>, Outputs<f64>) {
        let p64 = self.problem().rounded_to_f32();
        let want = reference::recurrent::forward(&p64.view()).expect("reference");
        (p64.to_f32(), want)
    }
}

/// The shape sweep: B = 1, H = 2, every (len, key_dim, value_dim) of the
/// lists, seeds `seed0` + 1, + 2, … in that order; the gate layout (per-head
/// on even seeds) and h0 (when seed / 2 is even) alternate so every
/// combination of them meets every size class. Gates: `Random`.
pub fn shape_sweep(lens: &[usize], key_dims: &[usize], value_dims: &[usize], seed0: u64, mut f: impl FnMut(Case)) {
    let mut seed = seed0;
    for &len in lens {
        for &key_dim in key_dims {
            for &value_dim in value_dims {
                seed += 1;
                let per_head = seed.is_multiple_of(2);
                let with_h0 = (seed / 2).is_multiple_of(2);
                f(Case::new(dims(1, len, 2, key_dim, value_dim, per_head), GateRegime::Random, with_h0, seed));
            }
        }
    }
}

/// The regime matrix: for each (len, key_dim, value_dim) of `shapes`, each
/// gate layout (per-channel, then per-head) and without/with h0, one case of
/// `regime` with B = `batch`, H = `heads`, seeds `seed0` + 1, + 2, … in that
/// order.
pub fn regime_matrix(
    batch: usize,
    heads: usize,
    shapes: &[(usize, usize, usize)],
    regime: GateRegime,
    seed0: u64,
    mut f: impl FnMut(Case),
) {
    let mut seed = seed0;
    for &(len, key_dim, value_dim) in shapes {
        for per_head in [false, true] {
            for with_h0 in [false, true] {
                seed += 1;
                f(Case::new(dims(batch, len, heads, key_dim, value_dim, per_head), regime, with_h0, seed));
            }
        }
    }
}

/// One `#[test]` per regime: `name => regime, first seed;` calls
/// `cases(regime, first seed)`.
#[allow(unused_macros)]
macro_rules! regime_tests {
    ($cases:ident: $($name:ident => $regime:expr, $seed:expr;)+) => {$(
        #[test]
        fn $name() {
            $cases($regime, $seed);
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use regime_tests;

/// The regime tests shared by the scan and attention suites (GPU and CPU):
/// `resets` (5%), `every_step_resets`, `unit_modulus`, `large_phase` (50
/// rad), `strong_decay` (Re ≥ −40), `mixed`, first seeds 1000, 1100, 2000,
/// 3000, 4000, 5000.
#[allow(unused_macros)]
macro_rules! adversarial_regime_tests {
    ($cases:ident) => {
        $crate::common::regime_tests! { $cases:
            resets => GateRegime::Resets(0.05), 1000;
            every_step_resets => GateRegime::Resets(1.0), 1100;
            unit_modulus => GateRegime::UnitModulus, 2000;
            large_phase => GateRegime::LargePhase(50.0), 3000;
            strong_decay => GateRegime::StrongDecay(40.0), 4000;
            mixed => GateRegime::Mixed, 5000;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use adversarial_regime_tests;

/// Asserts that `e` is within (`rel`, `abs_frac`), naming the case and the
/// output. A reference entirely below f32's normal range (a gradient that
/// passes through e^−90 gates) is judged as the CPU tests judge it
/// ([`grad::within_bounds`]): max-abs ≤ the smallest normal f32, since f32
/// has no relative precision left there and flush-to-zero arithmetic gives 0.
/// Found by the GPU tests on the emulated device: the chunked backward's dh0
/// of 2.7e-42 at most came out 0 (the CPU mirror's was 6.8e-4 off
/// relatively); with the emulated tensor cores flushing subnormals, a dh0 of
/// 2.3e-41 came out 0.
pub fn assert_within(label: &str, what: &str, e: &ErrorStats, rel: f64, abs_frac: f64) {
    assert!(
        grad::within_bounds(e, rel, abs_frac),
        "{label}: {what} {e:?} (bounds: rel {rel:e}, abs_frac {abs_frac:e})"
    );
}

/// Compares y and h_final with `want` and asserts both within (`rel`, `abs_frac`).
pub fn assert_outputs<A, B>(label: &str, y: &[A], h_final: &[Complex<A>], want: &Outputs<B>, rel: f64, abs_frac: f64)
where
    A: Copy + Into<f64>,
    B: Copy + Into<f64>,
{
    assert_within(label, "y", &compare(y, &want.y), rel, abs_frac);
    assert_within(label, "h_final", &compare_complex(h_final, &want.h_final), rel, abs_frac);
}

// ---- running a kernel ------------------------------------------------------

/// Log gates inside the domain at its edges (the device check must pass
/// them), by `k % 5`: a reset keeping `g`'s phase, a reset with the largest
/// phase, Re = −0 with the most negative phase, 0, a subnormal Re with a
/// phase of 1e30.
pub fn in_domain_extreme(k: usize, g: Complex<f32>) -> Complex<f32> {
    match k % 5 {
        0 => Complex::new(f32::NEG_INFINITY, g.im),
        1 => Complex::new(f32::NEG_INFINITY, f32::MAX),
        2 => Complex::new(-0.0, -f32::MAX),
        3 => Complex::new(0.0, 0.0),
        _ => Complex::new(-f32::MIN_POSITIVE / 8.0, 1e30), // subnormal Re
    }
}

/// One log gate of each way out of the domain, with the reason the host
/// gives for it (`problem::log_gate_violation`).
pub fn bad_log_gates() -> [(Complex<f32>, &'static str); 7] {
    [
        (Complex::new(1e-30, 0.0), "Re(log_gate) > 0"),
        (Complex::new(f32::INFINITY, 0.0), "Re(log_gate) > 0"),
        (Complex::new(f32::NAN, 0.0), "NaN"),
        (Complex::new(-1.0, f32::NAN), "NaN"),
        (Complex::new(f32::NEG_INFINITY, f32::NAN), "NaN"),
        (Complex::new(-1.0, f32::INFINITY), "phase"),
        (Complex::new(-1.0, f32::NEG_INFINITY), "phase"),
    ]
}

/// Interleaved (re, im) f32 pairs.
pub fn flat(z: &[Complex<f32>]) -> Vec<f32> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// The inverse of [`flat`].
pub fn unflat(v: &[f32]) -> Vec<Complex<f32>> {
    v.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect()
}

/// `x` as `T` on the device, `offset` elements into its buffer (after
/// NaNs, which a kernel reading before its tensor would carry into its
/// output).
pub fn offset_copy<T: Element>(s: &std::sync::Arc<CudaStream>, x: &[f32], offset: usize) -> CudaSlice<T> {
    let host: Vec<T> = std::iter::repeat_n(T::nan(), offset).chain(x.iter().map(|&x| T::from_f32(x))).collect();
    s.clone_htod(&host).unwrap()
}

/// q, k, v (as `T`) and log_gate (complex f32) on the device.
pub struct Uploaded<T> {
    pub q: CudaSlice<T>,
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    pub log_gate: CudaSlice<f32>,
}

/// Uploads the sequence inputs of `p` (converted to `T`: exact when they are
/// representable in `T`).
pub fn upload<T: Element>(s: &std::sync::Arc<CudaStream>, p: &OwnedProblem<f32>) -> Uploaded<T> {
    upload_at(s, p, 0)
}

/// [`upload`], with q, k and v `offset` elements into their buffers
/// ([`offset_copy`]; the tensors are `.slice(offset..)` of them).
pub fn upload_at<T: Element>(s: &std::sync::Arc<CudaStream>, p: &OwnedProblem<f32>, offset: usize) -> Uploaded<T> {
    Uploaded {
        q: offset_copy(s, &p.q, offset),
        k: offset_copy(s, &p.k, offset),
        v: offset_copy(s, &p.v, offset),
        log_gate: s.clone_htod(&flat(&p.log_gate)).unwrap(),
    }
}

/// Runs one forward call on a fresh stream of `gpu`: uploads `p32` (see
/// [`upload`]; h0 when present), poisons y, h_final and a workspace of
/// `workspace_len` f32 (none when 0) with NaN, so an element the kernels
/// forget fails the comparison, calls `launch`, downloads and synchronizes.
/// Returns (y, h_final).
pub fn run_forward<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    workspace_len: usize,
    launch: impl FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'_, T>,
        DeviceOutputs<'_, T>,
        Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<(Vec<T>, Vec<Complex<f32>>), GpuError> {
    run_forward_gates(gpu, p32, workspace_len, false, 0, launch)
}

/// The gate side (log_gate, a state) as the kernels read it: interleaved
/// pairs, or with `real_gates` the real parts (the imaginary parts must be 0).
pub fn gate_side(z: &[Complex<f32>], real_gates: bool) -> Vec<f32> {
    if real_gates {
        assert!(z.iter().all(|z| z.im == 0.0), "real gates take real values");
        z.iter().map(|z| z.re).collect()
    } else {
        flat(z)
    }
}

/// The inverse of [`gate_side`]: complex numbers (Im = 0 for real gates).
pub fn from_gate_side(x: &[f32], real_gates: bool) -> Vec<Complex<f32>> {
    if real_gates { x.iter().map(|&re| Complex::new(re, 0.0)).collect() } else { unflat(x) }
}

/// [`run_forward`], with `real_gates` on the real parts of `p32`'s log_gate
/// and h0 (see [`gate_side`]) and a real h_final (returned with Im = 0).
/// q, k, v and y lie `offset` elements into their device buffers, the
/// workspace 2·`offset` (1: every row of a 16-bit tensor off the 16-byte
/// alignment that the chunked kernels' vector loads and stores need, every
/// q and k row off the alignment of their key quads (Block::key_quads),
/// and the workspace 8 bytes off the 16 of the real walks' slot stores, on
/// the 8 the host requires; 0 elsewhere); y's elements before its tensor
/// must come back unwritten.
pub fn run_forward_gates<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    workspace_len: usize,
    real_gates: bool,
    offset: usize,
    launch: impl FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'_, T>,
        DeviceOutputs<'_, T>,
        Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<(Vec<T>, Vec<Complex<f32>>), GpuError> {
    let d = p32.dims;
    let s = gpu.context().new_stream().expect("stream");
    let u = upload_at::<T>(&s, p32, offset);
    let (q, k, v) = (u.q.slice(offset..), u.k.slice(offset..), u.v.slice(offset..));
    // (upload's complex log_gate serves complex gates.)
    let real_gate = real_gates.then(|| s.clone_htod(&gate_side(&p32.log_gate, true)).unwrap());
    let log_gate = real_gate.as_ref().unwrap_or(&u.log_gate);
    let h0 = p32.h0.as_ref().map(|h| s.clone_htod(&gate_side(h, real_gates)).unwrap());
    let parts = if real_gates { 1 } else { 2 };
    let mut y_at = s.clone_htod(&vec![T::nan(); offset + d.v_len()]).unwrap();
    let mut y = y_at.slice_mut(offset..);
    let mut h_final = s.clone_htod(&vec![f32::NAN; parts * d.state_len()]).unwrap();
    let mut ws_at = (workspace_len > 0).then(|| s.clone_htod(&vec![f32::NAN; 2 * offset + workspace_len]).unwrap());
    let mut ws = ws_at.as_mut().map(|w| w.slice_mut(2 * offset..));
    launch(
        &s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        ws.as_mut().map(|w| w as _),
    )?;
    let mut y = s.clone_dtoh(&y_at).unwrap();
    let h_final = s.clone_dtoh(&h_final).unwrap();
    s.synchronize().unwrap();
    let before: Vec<T> = y.drain(..offset).collect();
    assert!(before.iter().all(|x| x.to_f32().is_nan()), "y: an element before the tensor was written");
    Ok((y, from_gate_side(&h_final, real_gates)))
}

/// `p` with the imaginary parts of log_gate and h0 set to 0 (a real-gate problem).
pub fn real_gates(mut p: OwnedProblem<f64>) -> OwnedProblem<f64> {
    for z in p.log_gate.iter_mut().chain(p.h0.iter_mut().flatten()) {
        z.im = 0.0;
    }
    p
}

/// The backward twin of [`run_forward`]: uploads `p32` (q, k, v and `dy`
/// converted to `T`, which must represent them; log_gate, h0, `dh_final`
/// complex f32, or, when `real_gates`, their real parts, whose imaginary
/// parts must be 0), poisons dq, dk, dv, dlog_gate, dh0 (when h0 is given)
/// and a workspace of `workspace_len` f32 (none when 0) with NaN, calls
/// `launch`, downloads (widened to f32; real dlog_gate and dh0 as complex
/// numbers with Im = 0) and synchronizes.
/// q, k, v, dy and dv lie `offset` elements into their device buffers,
/// the workspace 2·`offset` (as in [`run_forward_gates`]).
#[allow(clippy::too_many_arguments)]
pub fn run_backward<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    workspace_len: usize,
    real_gates: bool,
    offset: usize,
    launch: impl for<'a> FnOnce(
        &'a CudaStream,
        &'a Dims,
        gateloop::cuda::chunk_grad::DeviceInputs<'a, T>,
        gateloop::cuda::chunk_grad::DeviceGradInputs<'a, T>,
        gateloop::cuda::chunk_grad::DeviceGrads<'a, T>,
        Option<&'a mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<gateloop::reference::grad::Grads<f32>, GpuError> {
    use gateloop::cuda::chunk_grad::{DeviceGradInputs, DeviceGrads, DeviceInputs};
    let d = p32.dims;
    let s = gpu.context().new_stream().expect("stream");
    let u = upload_at::<T>(&s, p32, offset);
    let (q, k, v) = (u.q.slice(offset..), u.k.slice(offset..), u.v.slice(offset..));
    let side = |z: &[Complex<f32>]| gate_side(z, real_gates);
    let parts = if real_gates { 1 } else { 2 };
    // (upload's complex log_gate serves complex gates.)
    let real_gate = real_gates.then(|| s.clone_htod(&side(&p32.log_gate)).unwrap());
    let log_gate = real_gate.as_ref().unwrap_or(&u.log_gate);
    let h0 = p32.h0.as_ref().map(|h| s.clone_htod(&side(h)).unwrap());
    let dy_at = offset_copy::<T>(&s, dy, offset);
    let dy = dy_at.slice(offset..);
    let dhf = dh_final.map(|h| s.clone_htod(&side(h)).unwrap());
    let nan = |n: usize| s.clone_htod(&vec![f32::NAN; n]).unwrap();
    let nan_t = |n: usize| s.clone_htod(&vec![T::nan(); n]).unwrap();
    let (mut dq, mut dk, mut dv_at) = (nan_t(d.qk_len()), nan_t(d.qk_len()), nan_t(offset + d.v_len()));
    let mut dv = dv_at.slice_mut(offset..);
    let mut dg = nan(parts * d.gate_len());
    let mut dh0 = p32.h0.as_ref().map(|_| nan(parts * d.state_len()));
    let mut ws_at = (workspace_len > 0).then(|| nan(2 * offset + workspace_len));
    let mut ws = ws_at.as_mut().map(|w| w.slice_mut(2 * offset..));
    launch(
        &s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceGradInputs { dy: &dy, dh_final: dhf.as_ref().map(|h| h as _) },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: dh0.as_mut().map(|h| h as _) },
        ws.as_mut().map(|w| w as _),
    )?;
    let widen = |x: Vec<T>| x.into_iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let complex = |x: Vec<f32>| from_gate_side(&x, real_gates);
    let out = gateloop::reference::grad::Grads {
        dq: widen(s.clone_dtoh(&dq).unwrap()),
        dk: widen(s.clone_dtoh(&dk).unwrap()),
        dv: widen({
            let mut dv = s.clone_dtoh(&dv_at).unwrap();
            let before: Vec<T> = dv.drain(..offset).collect();
            assert!(before.iter().all(|x| x.to_f32().is_nan()), "dv: an element before the tensor was written");
            dv
        }),
        dlog_gate: complex(s.clone_dtoh(&dg).unwrap()),
        dh0: dh0.map(|h| complex(s.clone_dtoh(&h).unwrap())),
    };
    s.synchronize().unwrap();
    Ok(out)
}

/// Proptest's draw of a gate regime: every regime of
/// [`GateRegime`], with random parameters where it has one.
pub fn regime_strategy() -> impl proptest::strategy::Strategy<Value = GateRegime> {
    use proptest::prelude::*;
    prop_oneof![
        Just(GateRegime::Random),
        (0.0f64..1.0).prop_map(GateRegime::Resets),
        Just(GateRegime::UnitModulus),
        (0.1f64..100.0).prop_map(GateRegime::LargePhase),
        (0.1f64..60.0).prop_map(GateRegime::StrongDecay),
        Just(GateRegime::Mixed),
        Just(GateRegime::Underflow),
        (0.0f64..1.0).prop_map(GateRegime::HardDecay),
    ]
}
