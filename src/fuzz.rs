//! Correctness fuzzing against the f64 CPU reference, as a product feature
//! (`gateloop fuzz`) and a library API (CI campaigns, injected faults).
//!
//! ## What a campaign does
//!
//! Case `i` of a campaign with seed `S` is drawn from an RNG seeded by
//! `(S, i)` alone ([`draw_case`]), so any case replays on its own with
//! `gateloop fuzz --seed S --first-case i --cases 1`. A case draws:
//!
//! - **shapes** B, L, H, K, V: 1s, primes and values around multiples of
//!   16/64 are favoured; L is log-uniform in [1, max_len] (favouring short
//!   sequences), a boundary value (16k ± 1, 64k ± 1, …), or exactly max_len.
//!   The work B·H·L·K·V is capped at [`MAX_CASE_ELEMENTS`] (B, H, K, V are
//!   halved to fit, L is kept);
//! - a **gate regime** ([`GateRegime`]): random, resets with probability
//!   p ∈ {0.001, 0.05, 0.5, 1} (1: a reset at every step), |a| = 1 exactly,
//!   phases up to 10–1000 rad per step, strong decay up to Re = −1e4, the
//!   underflow ranges (subnormal a in f32 and f64, a = 0 without a reset),
//!   mixed; per-head or per-channel gates, with or without h0;
//! - **value scales** for q, k, v, each 10^u with u uniform in [−3, 3] (h0 is
//!   scaled like k·v), and in one case in ten a sprinkle of subnormal q, k,
//!   v elements.
//!
//! Every selected [`Target`] runs the case and is compared with the f64
//! recurrent reference ([`crate::reference::recurrent`], the oracle) on
//! *the inputs the target saw*: f64 targets get the drawn problem, f32
//! targets its f32 rounding and the oracle the same rounded values.
//!
//! ## The bound
//!
//! For each output tensor X ∈ {y, h_final} (h_final as its interleaved
//! reals), with `out` the target's result and `ref` the oracle's:
//!
//! ```text
//! scale    = max(‖ref‖₂, ‖R‖₂)
//! e_l2     = ‖out − ref‖₂ / scale
//! e_max    = max_i |out_i − ref_i| / max_i max(|ref_i|, R_i)
//! score(X) = max(e_l2, e_max / 10)
//! pass  ⇔  score(y) ≤ tol  and  score(h_final) ≤ tol           (NaN fails)
//! ```
//!
//! R is the **root-sum-square magnitude** of the terms that make up each
//! output element:
//!
//! ```text
//! R_y[t, v]²   = Σ_k q_t[k]² · ( Σ_{s≤t} |Π_{s<r≤t} a_r[k]|² k_s[k]² v_s[v]²  +  |Π_{r≤t} a_r[k]|² |h0[k, v]|² )
//! R_h[k, v]²   = the inner sum at t = L − 1   (used for both Re and Im)
//! ```
//!
//! computed exactly by running the f64 recurrence on (q², k², v², gate
//! 2·Re g with phase 0, |h0|²). Why R: rounding errors of any summation
//! order are of size ε·(the magnitudes summed), not ε·|result|. When the
//! terms cancel (‖ref‖ ≪ ‖R‖, e.g. a y that happens to be near 0, or h0
//! cancelling the inputs), a relative error against ‖ref‖ would be a false
//! alarm; against R it is not. When they do not cancel, ‖ref‖ ≥ ‖R‖ (all terms
//! aligned) or ‖ref‖ ≈ ‖R‖ (random signs), so the bound is as strict as the
//! plain relative L2 error. (The plain bound Σ|terms| would be weaker by up
//! to √(number of terms) and is not used.) `e_max` catches a wrong element
//! that a large tensor's L2 norm would average away.
//!
//! The tolerance depends on the precision and the length ([`tolerance`]):
//!
//! ```text
//! f64: tol = 1e-10
//! f32: tol = min(1e-3, 1e-4 · max(1, √(L / 4096)))
//! ```
//!
//! (1e-4 up to L = 4096, growing like √L beyond — the random-walk growth of
//! rounding errors along the sequence — and capped at 1e-3, reached at
//! L = 409,600 and kept up to L = 1M and beyond.)
//!
//! Below the smallest normal number a float has a fixed absolute spacing,
//! η = 2⁻¹⁴⁹ in f32 (2⁻¹⁰⁷⁴ in f64), so no implementation in that precision
//! can be relatively accurate there: each |out_i − ref_i| is first reduced
//! by the **underflow floor** ([`underflow_floor`]) 4·η·(L·(K + 1) + 1), the
//! spacing times a bound on the operations behind one output element, before
//! it enters e_l2 and e_max. The floor is ~1e-38 at the largest f32 cases and
//! is invisible wherever the outputs are normal numbers (found necessary by
//! the 1M-case campaign: k·v products in the subnormal range).
//!
//! ## Disagreements
//!
//! A failing case is **shrunk**: L halved (first or second half), one batch
//! element, one head, the first or last half of K or of V, h0 dropped — each
//! step kept when the target still fails — until no step fails or the shrink
//! budget is spent. The shrunk case is written to the output directory as
//! three safetensors files (with the [`crate::io`] writers):
//!
//! - `<stem>.input.safetensors`: `run`'s inputs, in the target's precision;
//! - `<stem>.expected.safetensors`: `y`, `h_final` of the f64 oracle (F64);
//! - `<stem>.actual.safetensors`: what the target produced.
//!
//! and the commands to replay it are printed: `gateloop run` on the input
//! with the target's mode and device, then `gateloop check` of the expected
//! file against that output with an `--rtol` equal to the bound translated to
//! plain relative L2 (`check` compares relative L2 only). The expected
//! tensors are in their own file, not beside the inputs, because an input
//! file with extra tensors is refused ([`crate::io::FileError::UnknownTensors`]).

use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Write as _};
use std::ops::Range;
use std::rc::Rc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use num_complex::Complex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dispatch;
use crate::cuda;
use crate::io;
use crate::problem::{Dims, GateLayout, Outputs};
use crate::reference;
use crate::testing::{random_problem, GateRegime, OwnedProblem};
use crate::Mode;

/// Largest B·H·L·K·V of a drawn case (or `max_len`, if larger, so that
/// L = max_len is always reachable with B = H = K = V = 1).
pub const MAX_CASE_ELEMENTS: usize = 1 << 18;
/// Attention is O(L²): a case runs it only when B·H·L²·(K+V) is at most this.
pub const MAX_ATTENTION_WORK: usize = 1 << 26;
/// The scan holds L complex pairs per (k, v) channel; cap B·H·L·K·V for it.
pub const MAX_SCAN_ELEMENTS: usize = 1 << 22;
/// `e_max` is allowed to be this many times the tolerance.
pub const MAX_ABS_FACTOR: f64 = 10.0;

/// The precision a target computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    /// `"f32"` or `"f64"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        }
    }
    /// Parses `f32` or `f64`.
    pub fn parse(s: &str) -> Option<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(Precision::F32),
            "f64" => Some(Precision::F64),
            _ => None,
        }
    }
}

/// Where a target computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    /// `"cpu"` or `"cuda"`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// The tolerance of the bound (see the [module docs](self)) for a precision
/// and a sequence length.
pub fn tolerance(precision: Precision, len: usize) -> f64 {
    match precision {
        Precision::F64 => 1e-10,
        Precision::F32 => (1e-4 * (len as f64 / 4096.0).sqrt().max(1.0)).min(1e-3),
    }
}

/// The absolute error no implementation in `precision` can avoid on `dims`
/// (see the module docs): 4·η·(L·(K + 1) + 1), η the precision's subnormal spacing.
pub fn underflow_floor(precision: Precision, dims: &Dims) -> f64 {
    let eta = match precision {
        Precision::F64 => f64::from_bits(1), // 2^-1074
        Precision::F32 => f64::from(f32::from_bits(1)), // 2^-149
    };
    4.0 * eta * (dims.len as f64 * (dims.key_dim as f64 + 1.0) + 1.0)
}

/// The function a target runs: the problem in the target's precision, held
/// as f64 (for an f32 target every value is an exact f32), to the outputs
/// widened to f64, or a message if the implementation refused the problem.
pub type RunFn = Box<dyn FnMut(&OwnedProblem<f64>) -> Result<Outputs<f64>, String>>;

/// One implementation under test.
pub struct Target {
    /// The mode `gateloop run --mode` replays it with.
    pub mode: Mode,
    /// The precision it computes in (and the dtype of its replay input).
    pub precision: Precision,
    /// The device `gateloop run --device` replays it with.
    pub device: Device,
    /// A label for tables and file names, e.g. `chunked-f32-cpu`.
    pub label: String,
    run: RunFn,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target").field("label", &self.label).finish_non_exhaustive()
    }
}

fn widen(o: Outputs<f32>) -> Outputs<f64> {
    Outputs {
        y: o.y.into_iter().map(f64::from).collect(),
        h_final: o.h_final.into_iter().map(|z| Complex::new(f64::from(z.re), f64::from(z.im))).collect(),
    }
}

impl Target {
    /// A target with an arbitrary implementation: the hook for testing the
    /// fuzzer itself (inject a wrong implementation) or external code. `mode`,
    /// `precision` and `device` say how `gateloop run` replays a failure.
    pub fn custom(
        label: impl Into<String>,
        mode: Mode,
        precision: Precision,
        device: Device,
        run: impl FnMut(&OwnedProblem<f64>) -> Result<Outputs<f64>, String> + 'static,
    ) -> Target {
        Target { mode, precision, device, label: label.into(), run: Box::new(run) }
    }

    /// The CPU implementation of `mode` in `precision`: the reference modes
    /// in f32 or f64, the chunked path in f32. `None` for chunked f64 (there
    /// is none) and for recurrent f64 (the oracle itself).
    pub fn cpu(mode: Mode, precision: Precision) -> Option<Target> {
        let label = format!("{}-{}-cpu", mode.name(), precision.name());
        let run: RunFn = match precision {
            // The f64 recurrence is the oracle itself.
            Precision::F64 if mode == Mode::Recurrent || !dispatch::CPU_F64_MODES.contains(&mode) => return None,
            Precision::F64 => {
                Box::new(move |p: &OwnedProblem<f64>| dispatch::cpu_f64(mode, &p.view()).map_err(|e| e.to_string()))
            }
            Precision::F32 => Box::new(move |p: &OwnedProblem<f64>| {
                dispatch::cpu_f32(mode, &p.to_f32().view()).map(widen).map_err(|e| e.to_string())
            }),
        };
        Some(Target { mode, precision, device: Device::Cpu, label, run })
    }

    /// Runs the target on a problem (for tests and tools).
    pub fn run(&mut self, p: &OwnedProblem<f64>) -> Result<Outputs<f64>, String> {
        (self.run)(p)
    }
}

/// Why a set of targets cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// `--device cuda` on a machine or build without a usable GPU.
    #[error("--device cuda: cannot use the GPU: {0}")]
    NoGpu(String),
    /// The selection leaves nothing to test.
    #[error("nothing to fuzz: {0}")]
    Empty(String),
}

/// The targets for a device, modes and precisions, with a note for each
/// combination that does not exist (chunked f64; recurrent f64 is the oracle;
/// on cuda only the f32 recurrent kernel).
pub fn targets(device: Device, modes: &[Mode], precisions: &[Precision]) -> Result<(Vec<Target>, Vec<String>), SetupError> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    match device {
        Device::Cpu => {
            for &m in modes {
                for &pr in precisions {
                    match Target::cpu(m, pr) {
                        Some(t) => out.push(t),
                        None if m == Mode::Recurrent => {
                            notes.push("recurrent f64 on cpu is the oracle itself: not fuzzed".to_string())
                        }
                        None => notes.push(format!("{} {} does not exist on cpu: skipped", m.name(), pr.name())),
                    }
                }
            }
        }
        Device::Cuda => {
            let gpu = Rc::new(cuda::Gpu::new(0).map_err(|e| SetupError::NoGpu(e.to_string()))?);
            let name = gpu.name();
            for &m in modes {
                for &pr in precisions {
                    if !dispatch::CUDA_MODES.contains(&m) || pr != Precision::F32 {
                        notes.push(format!("{} {} is not available on cuda: skipped", m.name(), pr.name()));
                        continue;
                    }
                    let gpu = Rc::clone(&gpu);
                    let run = move |p: &OwnedProblem<f64>| {
                        dispatch::cuda_f32(&gpu, m, &p.to_f32().view()).map(widen).map_err(|e| e.to_string())
                    };
                    let label = format!("{}-f32-cuda ({name})", m.name());
                    out.push(Target::custom(label, m, Precision::F32, Device::Cuda, run));
                }
            }
        }
    }
    if out.is_empty() {
        return Err(SetupError::Empty(if notes.is_empty() { "no modes or dtypes selected".into() } else { notes.join("; ") }));
    }
    Ok((out, notes))
}

// ------------------------------------------------------------------ cases --

/// Everything a case is made of; [`CaseSpec::problem`] builds it.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseSpec {
    /// The campaign seed.
    pub seed: u64,
    /// The case index.
    pub index: u64,
    pub dims: Dims,
    pub regime: GateRegime,
    pub with_h0: bool,
    /// Scales of q, k, v (h0 is scaled by k·v).
    pub scales: [f64; 3],
    /// Whether some q, k, v elements are replaced by subnormal numbers.
    pub subnormals: bool,
    /// Seed of [`random_problem`].
    pub problem_seed: u64,
}

fn mix(seed: u64, index: u64) -> u64 {
    // splitmix64 of a combination: distinct (seed, index) give unrelated streams.
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index.wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const DIM_POOL: [usize; 18] = [1, 1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 31, 32, 33, 63, 64, 65];
const LEN_POOL: [usize; 29] = [
    1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048,
    2049, 4095, 4096, 4097, 65537,
];

/// Draws case `index` of the campaign with `seed` (lengths up to `max_len`).
pub fn draw_case(seed: u64, index: u64, max_len: usize) -> CaseSpec {
    let max_len = max_len.max(1);
    let mut rng = StdRng::seed_from_u64(mix(seed, index));
    // Small dims are favoured: index ∝ u².
    let pick = |rng: &mut StdRng, pool: &[usize]| {
        let u: f64 = rng.random();
        pool[((u * u) * pool.len() as f64) as usize % pool.len()]
    };
    let len = match rng.random_range(0..10) {
        0 => max_len,
        1 | 2 => {
            let fits: Vec<usize> = LEN_POOL.iter().copied().filter(|&l| l <= max_len).collect();
            fits[rng.random_range(0..fits.len())]
        }
        _ => {
            let u: f64 = rng.random();
            ((((max_len as f64) + 1.0).ln() * u).exp() as usize).clamp(1, max_len)
        }
    };
    let mut d = [
        [1, 1, 1, 2, 3, 4][rng.random_range(0..6)],
        [1, 1, 2, 3, 4, 5, 7][rng.random_range(0..7)],
        pick(&mut rng, &DIM_POOL),
        pick(&mut rng, &DIM_POOL),
    ];
    let cap = MAX_CASE_ELEMENTS.max(max_len);
    while d.iter().product::<usize>().saturating_mul(len) > cap {
        // Halve the largest of B, H, K, V (rounding up keeps it ≥ 1).
        let Some(i) = (0..4).max_by_key(|&i| d[i]) else { break };
        if d[i] == 1 {
            break;
        }
        d[i] = d[i].div_ceil(2);
    }
    let per_head = rng.random_bool(0.3);
    let dims = Dims::new(d[0], len, d[1], d[2], d[3])
        .with_gate(if per_head { GateLayout::PerHead } else { GateLayout::PerChannel });
    let regime = match rng.random_range(0..17) {
        0..=2 => GateRegime::Random,
        3..=5 => GateRegime::Resets([0.001, 0.05, 0.5, 1.0][rng.random_range(0..4)]),
        6 | 7 => GateRegime::UnitModulus,
        8 | 9 => GateRegime::LargePhase(10f64.powf(rng.random_range(1.0..3.0))),
        10 => GateRegime::StrongDecay(10f64.powf(rng.random_range(0.5..4.0))),
        11..=13 => GateRegime::Underflow,
        _ => GateRegime::Mixed,
    };
    let with_h0 = rng.random_bool(0.5);
    let scales = [(); 3].map(|_| 10f64.powf(rng.random_range(-3.0..3.0)));
    let subnormals = rng.random_bool(0.1);
    CaseSpec { seed, index, dims, regime, with_h0, scales, subnormals, problem_seed: rng.random() }
}

impl CaseSpec {
    /// The case's problem, in f64.
    pub fn problem(&self) -> OwnedProblem<f64> {
        let mut p = random_problem(self.dims, self.regime, self.with_h0, self.problem_seed);
        let [sq, sk, sv] = self.scales;
        p.q.iter_mut().for_each(|x| *x *= sq);
        p.k.iter_mut().for_each(|x| *x *= sk);
        p.v.iter_mut().for_each(|x| *x *= sv);
        if let Some(h0) = &mut p.h0 {
            h0.iter_mut().for_each(|z| *z *= sk * sv);
        }
        if self.subnormals {
            // 5% of q, k, v elements become subnormal in f32 (and normal,
            // tiny, in f64): the f32 rounding keeps them subnormal.
            let mut rng = StdRng::seed_from_u64(self.problem_seed ^ 0x5eed);
            for xs in [&mut p.q, &mut p.k, &mut p.v] {
                for x in xs.iter_mut() {
                    if rng.random_bool(0.05) {
                        *x = x.signum() * f64::from(f32::from_bits(rng.random_range(1..0x0080_0000)));
                    }
                }
            }
        }
        p
    }
}

impl fmt::Display for CaseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case {} (seed {}): {}, {:?}, h0 {}, scales q {:.1e} k {:.1e} v {:.1e}{}",
            self.index,
            self.seed,
            dims_str(&self.dims),
            self.regime,
            if self.with_h0 { "given" } else { "zero" },
            self.scales[0],
            self.scales[1],
            self.scales[2],
            if self.subnormals { ", subnormal sprinkle" } else { "" }
        )
    }
}

/// `B=.. L=.. H=.. K=.. V=.. (gate)`.
pub fn dims_str(d: &Dims) -> String {
    let g = match d.gate {
        GateLayout::PerChannel => "per-channel",
        GateLayout::PerHead => "per-head",
    };
    format!("B={} L={} H={} K={} V={} {g}", d.batch, d.len, d.heads, d.key_dim, d.value_dim)
}

// ------------------------------------------------------------------ judge --

/// The verdict on one output tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorScore {
    /// ‖out − ref‖₂ / max(‖ref‖₂, ‖R‖₂)
    pub e_l2: f64,
    /// max |out − ref| / max max(|ref|, R)
    pub e_max: f64,
    /// Plain relative L2 ‖out − ref‖₂ / ‖ref‖₂ (what `gateloop check` reports).
    pub rel_l2: f64,
    /// ‖ref‖₂ and ‖R‖₂.
    pub norm_ref: f64,
    pub norm_r: f64,
}

impl TensorScore {
    /// max(e_l2, e_max / [`MAX_ABS_FACTOR`]); NaN when anything was NaN.
    pub fn score(&self) -> f64 {
        if self.e_l2.is_nan() || self.e_max.is_nan() {
            return f64::NAN;
        }
        self.e_l2.max(self.e_max / MAX_ABS_FACTOR)
    }
}

/// The verdict on one run of a target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judgement {
    pub y: TensorScore,
    pub h_final: TensorScore,
    pub tol: f64,
}

impl Judgement {
    /// The larger score of y and h_final (NaN if either is).
    pub fn score(&self) -> f64 {
        let (a, b) = (self.y.score(), self.h_final.score());
        if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
    }
    /// score ≤ tol (NaN fails).
    pub fn pass(&self) -> bool {
        self.score() <= self.tol
    }
    /// The `--rtol` for `gateloop check` (plain relative L2) equivalent to
    /// the L2 part of the bound: tol · scale / ‖ref‖, the smaller over y and
    /// h_final (as `check` uses one rtol for both).
    pub fn check_rtol(&self) -> f64 {
        let r = |s: &TensorScore| {
            if s.norm_ref > 0.0 { self.tol * s.norm_ref.max(s.norm_r) / s.norm_ref } else { self.tol * s.norm_r }
        };
        r(&self.y).min(r(&self.h_final))
    }
}

fn score_tensor(out: &[f64], reference: &[f64], r: &[f64], floor: f64) -> TensorScore {
    let (mut num, mut den, mut rr, mut max_e, mut max_s) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut nan = out.len() != reference.len() || reference.len() != r.len();
    for ((&o, &x), &m) in out.iter().zip(reference).zip(r) {
        let e = (o - x).abs();
        nan |= e.is_nan();
        let e = (e - floor).max(0.0);
        num += e * e;
        den += x * x;
        rr += m * m;
        max_e = max_e.max(e.abs());
        max_s = max_s.max(x.abs()).max(m);
    }
    if nan {
        return TensorScore { e_l2: f64::NAN, e_max: f64::NAN, rel_l2: f64::NAN, norm_ref: den.sqrt(), norm_r: rr.sqrt() };
    }
    let (num, den, rr) = (num.sqrt(), den.sqrt(), rr.sqrt());
    let scale = den.max(rr).max(f64::MIN_POSITIVE);
    TensorScore {
        e_l2: num / scale,
        e_max: max_e / max_s.max(f64::MIN_POSITIVE),
        rel_l2: if den > 0.0 { num / den } else { num },
        norm_ref: den,
        norm_r: rr,
    }
}

fn interleave(z: &[Complex<f64>]) -> Vec<f64> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// The oracle's outputs and the magnitudes R of a problem (see the module docs).
#[derive(Clone, Debug)]
pub struct Oracle {
    pub out: Outputs<f64>,
    /// R_y, `[B, L, H, V]`.
    pub r_y: Vec<f64>,
    /// R_h for each real of h_final (interleaved, `[B, H, K, V, 2]`).
    pub r_h: Vec<f64>,
}

impl Oracle {
    /// Runs the f64 recurrent reference on `p`, and on the squared-magnitude
    /// problem for R.
    pub fn new(p: &OwnedProblem<f64>) -> Result<Oracle, String> {
        let out = reference::recurrent::forward(&p.view()).map_err(|e| format!("the oracle refused the case: {e}"))?;
        let sq = OwnedProblem {
            dims: p.dims,
            q: p.q.iter().map(|x| x * x).collect(),
            k: p.k.iter().map(|x| x * x).collect(),
            v: p.v.iter().map(|x| x * x).collect(),
            log_gate: p.log_gate.iter().map(|g| Complex::new(2.0 * g.re, 0.0)).collect(),
            h0: p.h0.as_ref().map(|h| h.iter().map(|z| Complex::new(z.norm_sqr(), 0.0)).collect()),
        };
        let m = reference::recurrent::forward(&sq.view()).map_err(|e| format!("the magnitude oracle refused the case: {e}"))?;
        let r_y = m.y.iter().map(|x| x.max(0.0).sqrt()).collect();
        let r_h = m.h_final.iter().flat_map(|z| [z.re.max(0.0).sqrt(); 2]).collect();
        Ok(Oracle { out, r_y, r_h })
    }

    /// Judges `out` with tolerance `tol` (and no underflow floor).
    pub fn judge(&self, out: &Outputs<f64>, tol: f64) -> Judgement {
        self.judge_with_floor(out, tol, 0.0)
    }

    /// Judges `out` with tolerance `tol`, each element's error first reduced
    /// by `floor` ([`underflow_floor`]).
    pub fn judge_with_floor(&self, out: &Outputs<f64>, tol: f64, floor: f64) -> Judgement {
        Judgement {
            y: score_tensor(&out.y, &self.out.y, &self.r_y, floor),
            h_final: score_tensor(&interleave(&out.h_final), &interleave(&self.out.h_final), &self.r_h, floor),
            tol,
        }
    }
}

// ---------------------------------------------------------------- shrink --

/// A box of a problem: ranges of B, L, H, K, V, and whether h0 is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Region {
    b: Range<usize>,
    t: Range<usize>,
    h: Range<usize>,
    k: Range<usize>,
    v: Range<usize>,
    h0: bool,
}

fn gather<X: Copy>(src: &[X], shape: [usize; 4], r: [&Range<usize>; 4]) -> Vec<X> {
    let mut out = Vec::with_capacity(r.iter().map(|x| x.len()).product());
    for i0 in r[0].clone() {
        for i1 in r[1].clone() {
            for i2 in r[2].clone() {
                let base = ((i0 * shape[1] + i1) * shape[2] + i2) * shape[3];
                out.extend_from_slice(&src[base + r[3].start..base + r[3].end]);
            }
        }
    }
    out
}

/// The sub-problem in `r` (a prefix/suffix in time, a subset of the rest).
fn sub_problem(p: &OwnedProblem<f64>, r: &Region) -> OwnedProblem<f64> {
    let d = p.dims;
    let nd = Dims::new(r.b.len(), r.t.len(), r.h.len(), r.k.len(), r.v.len()).with_gate(d.gate);
    let gate_range = if d.gate == GateLayout::PerHead { 0..1 } else { r.k.clone() };
    OwnedProblem {
        dims: nd,
        q: gather(&p.q, d.qk_shape(), [&r.b, &r.t, &r.h, &r.k]),
        k: gather(&p.k, d.qk_shape(), [&r.b, &r.t, &r.h, &r.k]),
        v: gather(&p.v, d.v_shape(), [&r.b, &r.t, &r.h, &r.v]),
        log_gate: gather(&p.log_gate, d.gate_shape(), [&r.b, &r.t, &r.h, &gate_range]),
        h0: if r.h0 { p.h0.as_ref().map(|h0| gather(h0, d.state_shape(), [&r.b, &r.h, &r.k, &r.v])) } else { None },
    }
}

fn halves(r: &Range<usize>) -> Vec<Range<usize>> {
    if r.len() < 2 {
        return vec![];
    }
    let mid = r.start + r.len() / 2;
    vec![r.start..mid, mid..r.end]
}

fn singles(r: &Range<usize>) -> Vec<Range<usize>> {
    if r.len() < 2 { vec![] } else { r.clone().map(|i| i..i + 1).collect() }
}

/// Smaller regions to try, biggest reductions first.
fn candidates(r: &Region) -> Vec<Region> {
    let mut c = Vec::new();
    for t in halves(&r.t) {
        c.push(Region { t, ..r.clone() });
    }
    for b in singles(&r.b) {
        c.push(Region { b, ..r.clone() });
    }
    for h in singles(&r.h) {
        c.push(Region { h, ..r.clone() });
    }
    for k in halves(&r.k) {
        c.push(Region { k, ..r.clone() });
    }
    for v in halves(&r.v) {
        c.push(Region { v, ..r.clone() });
    }
    if r.h0 {
        c.push(Region { h0: false, ..r.clone() });
    }
    c
}

/// How a run of a target went.
enum Outcome {
    Pass(Judgement),
    Fail { judgement: Option<Judgement>, actual: Option<Outputs<f64>>, why: String },
}

fn evaluate(target: &mut Target, p: &OwnedProblem<f64>, oracle: &Oracle) -> Outcome {
    let tol = tolerance(target.precision, p.dims.len);
    match target.run(p) {
        Ok(out) => {
            if out.y.len() != p.dims.v_len() || out.h_final.len() != p.dims.state_len() {
                return Outcome::Fail {
                    judgement: None,
                    actual: None,
                    why: format!(
                        "returned y of {} and h_final of {} elements, expected {} and {}",
                        out.y.len(),
                        out.h_final.len(),
                        p.dims.v_len(),
                        p.dims.state_len()
                    ),
                };
            }
            let j = oracle.judge_with_floor(&out, tol, underflow_floor(target.precision, &p.dims));
            if j.pass() {
                Outcome::Pass(j)
            } else {
                let why = format!(
                    "score {:.3e} > tol {tol:.1e} (y: e_l2 {:.3e} e_max {:.3e} rel {:.3e}; h_final: e_l2 {:.3e} e_max {:.3e} rel {:.3e})",
                    j.score(),
                    j.y.e_l2,
                    j.y.e_max,
                    j.y.rel_l2,
                    j.h_final.e_l2,
                    j.h_final.e_max,
                    j.h_final.rel_l2
                );
                Outcome::Fail { judgement: Some(j), actual: Some(out), why }
            }
        }
        Err(e) => Outcome::Fail { judgement: None, actual: None, why: format!("refused a valid problem: {e}") },
    }
}

/// The problem a target sees: the f32 rounding for f32 targets.
fn for_precision(p: &OwnedProblem<f64>, precision: Precision) -> OwnedProblem<f64> {
    match precision {
        Precision::F64 => p.clone(),
        Precision::F32 => p.rounded_to_f32(),
    }
}

/// Shrinks a failing problem (already in the target's precision), at most
/// `budget` evaluations. Returns the smallest failing problem found.
fn shrink(target: &mut Target, p: &OwnedProblem<f64>, budget: usize) -> (OwnedProblem<f64>, usize) {
    let d = p.dims;
    let mut region = Region {
        b: 0..d.batch,
        t: 0..d.len,
        h: 0..d.heads,
        k: 0..d.key_dim,
        v: 0..d.value_dim,
        h0: p.h0.is_some(),
    };
    let mut steps = 0;
    let mut evals = 0;
    'outer: while evals < budget {
        for c in candidates(&region) {
            if evals >= budget {
                break 'outer;
            }
            evals += 1;
            let sub = sub_problem(p, &c);
            let Ok(oracle) = Oracle::new(&sub) else { continue };
            if matches!(evaluate(target, &sub, &oracle), Outcome::Fail { .. }) {
                region = c;
                steps += 1;
                continue 'outer;
            }
        }
        break;
    }
    (sub_problem(p, &region), steps)
}

// --------------------------------------------------------------- campaign --

/// A campaign's settings.
#[derive(Clone, Debug)]
pub struct FuzzConfig {
    /// Number of cases.
    pub cases: u64,
    /// Index of the first case (to replay case i: first_case = i, cases = 1).
    pub first_case: u64,
    pub seed: u64,
    /// Longest sequence drawn.
    pub max_len: usize,
    /// Stop starting new cases after this long.
    pub time_budget: Option<Duration>,
    /// Where failing cases are written; `None` writes nothing.
    pub out_dir: Option<PathBuf>,
    /// Stop after this many disagreements (each shrunk and written).
    pub max_failures: usize,
    /// Evaluations the shrinker may spend per failure.
    pub shrink_budget: usize,
    /// Show a progress line on stderr (only drawn when stderr is a terminal;
    /// otherwise one line a minute).
    pub progress: bool,
}

impl Default for FuzzConfig {
    fn default() -> Self {
        FuzzConfig {
            cases: 1000,
            first_case: 0,
            seed: 0,
            max_len: 1024,
            time_budget: None,
            out_dir: Some(PathBuf::from("fuzz-failures")),
            max_failures: 1,
            shrink_budget: 200,
            progress: false,
        }
    }
}

/// Per-target totals.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSummary {
    pub label: String,
    pub mode: Mode,
    pub precision: Precision,
    pub device: Device,
    /// Cases run and judged.
    pub cases: u64,
    /// Cases skipped as too expensive for the mode (attention O(L²), scan memory).
    pub skipped: u64,
    pub failures: u64,
    /// Worst score / tolerance ratio seen (NaN-free cases), with its score,
    /// tolerance and case index.
    pub worst_ratio: f64,
    pub worst_score: f64,
    pub worst_tol: f64,
    pub worst_case: Option<u64>,
    /// Seconds spent in this target.
    pub seconds: f64,
}

/// The files and commands of one written failure.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureFiles {
    pub input: PathBuf,
    pub expected: PathBuf,
    pub actual: Option<PathBuf>,
    /// Where the replay's `gateloop run` writes.
    pub replay_output: PathBuf,
    /// `gateloop run ...` and `gateloop check ...`, shell-quoted.
    pub commands: Vec<String>,
    /// The `--rtol` of the check command.
    pub check_rtol: f64,
}

/// One disagreement.
#[derive(Clone, Debug)]
pub struct FuzzFailure {
    pub target: String,
    pub case: CaseSpec,
    /// Why the original case failed.
    pub why: String,
    /// The shrunk problem's dims and why it fails.
    pub shrunk_dims: Dims,
    pub shrunk_why: String,
    pub shrink_steps: usize,
    /// Written files (None without an out dir, or with the write error).
    pub files: Option<Result<FailureFiles, String>>,
}

/// A campaign's result.
#[derive(Clone, Debug)]
pub struct FuzzReport {
    pub seed: u64,
    pub first_case: u64,
    /// Cases run (all targets).
    pub cases_run: u64,
    pub targets: Vec<TargetSummary>,
    pub failures: Vec<FuzzFailure>,
    pub elapsed: Duration,
    /// Why the campaign stopped before its last case, if it did.
    pub stopped_early: Option<String>,
}

impl FuzzReport {
    /// No disagreement.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The summary table and, per failure, its files and replay commands.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fuzz: seed {}, cases {}..{} ({} run) in {:.1} s{}",
            self.seed,
            self.first_case,
            self.first_case + self.cases_run,
            self.cases_run,
            self.elapsed.as_secs_f64(),
            self.stopped_early.as_ref().map(|w| format!(", stopped early: {w}")).unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "{:<28} {:>8} {:>8} {:>8} {:>11} {:>9} {:>10} {:>9}",
            "target", "cases", "skipped", "failed", "worst score", "tol", "worst case", "time (s)"
        );
        for t in &self.targets {
            let worst = if t.worst_case.is_some() { format!("{:.2e}", t.worst_score) } else { "-".into() };
            let tol = if t.worst_case.is_some() { format!("{:.1e}", t.worst_tol) } else { "-".into() };
            let case = t.worst_case.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<28} {:>8} {:>8} {:>8} {:>11} {:>9} {:>10} {:>9.1}",
                t.label, t.cases, t.skipped, t.failures, worst, tol, case, t.seconds
            );
        }
        let _ = writeln!(
            s,
            "bound: score = max(‖out−ref‖/max(‖ref‖,‖R‖), max|out−ref|/(10·max(|ref|,R))) ≤ tol; tol f64 1e-10, f32 min(1e-3, 1e-4·max(1, √(L/4096)))"
        );
        let _ = writeln!(
            s,
            "replay case i: gateloop fuzz --seed {} --first-case i --cases 1 (with the same --modes/--dtypes/--max-len)",
            self.seed
        );
        for f in &self.failures {
            let _ = writeln!(s, "\nDISAGREEMENT: {} on {}", f.target, f.case);
            let _ = writeln!(s, "  {}", f.why);
            let _ = writeln!(
                s,
                "  shrunk in {} steps to {}: {}",
                f.shrink_steps,
                dims_str(&f.shrunk_dims),
                f.shrunk_why
            );
            match &f.files {
                Some(Ok(files)) => {
                    let _ = writeln!(s, "  input:    {}", files.input.display());
                    let _ = writeln!(s, "  expected: {} (f64 recurrent reference)", files.expected.display());
                    if let Some(a) = &files.actual {
                        let _ = writeln!(s, "  actual:   {} (what {} produced)", a.display(), f.target);
                    }
                    let _ = writeln!(s, "  replay:");
                    for c in &files.commands {
                        let _ = writeln!(s, "    {c}");
                    }
                }
                Some(Err(e)) => {
                    let _ = writeln!(s, "  could not write the case: {e}");
                }
                None => {}
            }
            let _ = writeln!(
                s,
                "  re-run this case: gateloop fuzz --seed {} --first-case {} --cases 1",
                f.case.seed, f.case.index
            );
        }
        s
    }
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+,".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn write_failure(
    dir: &Path,
    target: &Target,
    case: &CaseSpec,
    p: &OwnedProblem<f64>,
    oracle: &Oracle,
    judgement: Option<&Judgement>,
    actual: Option<&Outputs<f64>>,
) -> Result<FailureFiles, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let stem = format!("seed{}-case{}-{}-{}-{}", case.seed, case.index, target.mode.name(), target.precision.name(), target.device.name());
    let path = |suffix: &str| dir.join(format!("{stem}.{suffix}.safetensors"));
    let (input, expected, replay_output) = (path("input"), path("expected"), path("replay"));
    let e = |e: io::FileError| e.to_string();
    match target.precision {
        Precision::F64 => io::write_problem(&input, &p.view()).map_err(e)?,
        Precision::F32 => io::write_problem(&input, &p.to_f32().view()).map_err(e)?,
    }
    io::write_outputs(&expected, &p.dims, &oracle.out).map_err(e)?;
    let actual = match actual {
        Some(out) => {
            let a = path("actual");
            match target.precision {
                Precision::F64 => io::write_outputs(&a, &p.dims, out).map_err(e)?,
                Precision::F32 => {
                    let o32 = Outputs {
                        y: out.y.iter().map(|&x| x as f32).collect(),
                        h_final: out.h_final.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect(),
                    };
                    io::write_outputs(&a, &p.dims, &o32).map_err(e)?
                }
            }
            Some(a)
        }
        None => None,
    };
    let tol = tolerance(target.precision, p.dims.len);
    let check_rtol = judgement.map_or(tol, |j| j.check_rtol());
    let device = match target.device {
        Device::Cpu => String::new(),
        Device::Cuda => " --device cuda".into(),
    };
    let mut commands = vec![
        format!(
            "gateloop run --input {} --output {} --mode {}{device}",
            shell_quote(&input),
            shell_quote(&replay_output),
            target.mode.name()
        ),
        format!("gateloop check {} {} --rtol {check_rtol:.3e}", shell_quote(&expected), shell_quote(&replay_output)),
    ];
    if let Some(a) = &actual {
        commands.push(format!(
            "gateloop check {} {} --rtol {check_rtol:.3e}   # the recorded failing output",
            shell_quote(&expected),
            shell_quote(a)
        ));
    }
    Ok(FailureFiles { input, expected, actual, replay_output, commands, check_rtol })
}

/// Whether `target` runs this case or skips it as too expensive.
fn affordable(target: &Target, d: &Dims) -> bool {
    let heads = d.batch.saturating_mul(d.heads);
    match target.mode {
        Mode::Attention => {
            heads.saturating_mul(d.len).saturating_mul(d.len).saturating_mul(d.key_dim + d.value_dim) <= MAX_ATTENTION_WORK
        }
        Mode::Scan => heads.saturating_mul(d.len).saturating_mul(d.key_dim).saturating_mul(d.value_dim) <= MAX_SCAN_ELEMENTS,
        _ => true,
    }
}

struct Progress {
    enabled: bool,
    tty: bool,
    last: Instant,
    start: Instant,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let now = Instant::now();
        Progress { enabled, tty: std::io::stderr().is_terminal(), last: now, start: now }
    }
    fn tick(&mut self, done: u64, total: u64, failures: usize) {
        if !self.enabled {
            return;
        }
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(60) };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let width = 30usize;
        let filled = if total == 0 { width } else { ((done as f64 / total as f64) * width as f64) as usize }.min(width);
        let line = format!(
            "[{}{}] {done}/{total} cases, {rate:.1}/s, {failures} disagreement(s), {secs:.0} s",
            "#".repeat(filled),
            "-".repeat(width - filled)
        );
        let mut err = std::io::stderr();
        let _ = if self.tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "fuzz: {line}") };
        let _ = err.flush();
    }
    fn finish(&self) {
        if self.enabled && self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// Runs a campaign: every case on every target, judged against the oracle;
/// disagreements are shrunk and (with an out dir) written. See the module docs.
pub fn run_campaign(cfg: &FuzzConfig, targets: &mut [Target]) -> FuzzReport {
    let start = Instant::now();
    let mut summaries: Vec<TargetSummary> = targets
        .iter()
        .map(|t| TargetSummary {
            label: t.label.clone(),
            mode: t.mode,
            precision: t.precision,
            device: t.device,
            cases: 0,
            skipped: 0,
            failures: 0,
            worst_ratio: 0.0,
            worst_score: 0.0,
            worst_tol: 0.0,
            worst_case: None,
            seconds: 0.0,
        })
        .collect();
    let mut failures = Vec::new();
    let mut progress = Progress::new(cfg.progress);
    let mut stopped_early = None;
    let mut cases_run = 0;
    let need = |pr: Precision| targets.iter().any(|t| t.precision == pr);
    let (need64, need32) = (need(Precision::F64), need(Precision::F32));
    'cases: for n in 0..cfg.cases {
        if let Some(budget) = cfg.time_budget
            && start.elapsed() >= budget
        {
            stopped_early = Some(format!("time budget of {:.0} s spent", budget.as_secs_f64()));
            break;
        }
        let index = cfg.first_case + n;
        let case = draw_case(cfg.seed, index, cfg.max_len);
        let p64 = case.problem();
        let mut problems: Vec<(Precision, OwnedProblem<f64>, Result<Oracle, String>)> = Vec::new();
        for (pr, wanted) in [(Precision::F64, need64), (Precision::F32, need32)] {
            if wanted {
                let p = for_precision(&p64, pr);
                let o = Oracle::new(&p);
                problems.push((pr, p, o));
            }
        }
        for (t, summary) in targets.iter_mut().zip(summaries.iter_mut()) {
            if !affordable(t, &case.dims) {
                summary.skipped += 1;
                continue;
            }
            let Some((_, p, oracle)) = problems.iter().find(|(pr, _, _)| *pr == t.precision) else { continue };
            let t0 = Instant::now();
            let outcome = match oracle {
                Ok(oracle) => evaluate(t, p, oracle),
                Err(e) => Outcome::Fail { judgement: None, actual: None, why: e.clone() },
            };
            summary.cases += 1;
            match outcome {
                Outcome::Pass(j) => {
                    let ratio = j.score() / j.tol;
                    if summary.worst_case.is_none() || ratio > summary.worst_ratio {
                        summary.worst_ratio = ratio;
                        summary.worst_score = j.score();
                        summary.worst_tol = j.tol;
                        summary.worst_case = Some(index);
                    }
                }
                Outcome::Fail { judgement, why, .. } => {
                    summary.failures += 1;
                    summary.worst_ratio = f64::INFINITY;
                    summary.worst_score = judgement.map_or(f64::NAN, |j| j.score());
                    summary.worst_tol = tolerance(t.precision, p.dims.len);
                    summary.worst_case = Some(index);
                    let (small, steps) = shrink(t, p, cfg.shrink_budget);
                    let (shrunk_why, files) = match Oracle::new(&small) {
                        Ok(so) => match evaluate(t, &small, &so) {
                            Outcome::Fail { judgement, actual, why } => {
                                let files = cfg.out_dir.as_ref().map(|dir| {
                                    write_failure(dir, t, &case, &small, &so, judgement.as_ref(), actual.as_ref())
                                });
                                (why, files)
                            }
                            Outcome::Pass(_) => ("passes when re-run (nondeterministic?)".to_string(), None),
                        },
                        Err(e) => (e, None),
                    };
                    failures.push(FuzzFailure {
                        target: t.label.clone(),
                        case: case.clone(),
                        why,
                        shrunk_dims: small.dims,
                        shrunk_why,
                        shrink_steps: steps,
                        files,
                    });
                }
            }
            summary.seconds += t0.elapsed().as_secs_f64();
            if failures.len() >= cfg.max_failures.max(1) {
                cases_run = n + 1;
                stopped_early = Some(format!("{} disagreement(s)", failures.len()));
                break 'cases;
            }
        }
        cases_run = n + 1;
        progress.tick(cases_run, cfg.cases, failures.len());
    }
    progress.finish();
    FuzzReport {
        seed: cfg.seed,
        first_case: cfg.first_case,
        cases_run,
        targets: summaries,
        failures,
        elapsed: start.elapsed(),
        stopped_early,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_as_documented() {
        assert_eq!(tolerance(Precision::F64, 1 << 20), 1e-10);
        assert_eq!(tolerance(Precision::F32, 1), 1e-4);
        assert_eq!(tolerance(Precision::F32, 4096), 1e-4);
        assert!((tolerance(Precision::F32, 4 * 4096) - 2e-4).abs() < 1e-12);
        assert_eq!(tolerance(Precision::F32, 1 << 20), 1e-3);
    }

    #[test]
    fn cases_are_reproducible_and_reach_max_len() {
        assert_eq!(draw_case(7, 123, 500), draw_case(7, 123, 500));
        assert_ne!(draw_case(7, 123, 500), draw_case(7, 124, 500));
        let lens: Vec<usize> = (0..400).map(|i| draw_case(1, i, 2048).dims.len).collect();
        assert!(lens.iter().all(|&l| (1..=2048).contains(&l)));
        assert!(lens.contains(&2048) && lens.contains(&1));
        assert!(lens.iter().filter(|&&l| l <= 64).count() > 100, "short sequences are favoured");
        for i in 0..400 {
            let c = draw_case(3, i, 1 << 20);
            let d = c.dims;
            assert!(d.batch * d.heads * d.len * d.key_dim * d.value_dim <= MAX_CASE_ELEMENTS.max(1 << 20), "{c}");
            d.validate().unwrap();
        }
    }

    #[test]
    fn sub_problem_is_a_box() {
        let p = random_problem(crate::testing::dims(2, 5, 3, 4, 2, false), GateRegime::Random, true, 1);
        let r = Region { b: 1..2, t: 2..5, h: 0..2, k: 1..3, v: 1..2, h0: true };
        let s = sub_problem(&p, &r);
        s.view().validate().unwrap();
        let d = p.dims;
        // q[b=1, t=3, h=1, k=2] is s.q[0, 1, 1, 1].
        assert_eq!(s.q[7], p.q[((d.len + 3) * d.heads + 1) * d.key_dim + 2]);
        // h0[b=0, h=1, k=1, v=0] is h0[b=1, h=1, k=2, v=1] of the original.
        assert_eq!(s.h0.as_ref().unwrap()[3], p.h0.as_ref().unwrap()[((3 + 1) * 4 + 2) * 2 + 1]);
    }

    #[test]
    fn cancellation_is_judged_against_the_magnitudes() {
        // y = q·(k v) with h0 = −k v: the reference y is exactly 0 after step 0.
        let d = Dims::new(1, 1, 1, 1, 1);
        let p = OwnedProblem {
            dims: d,
            q: vec![1.0],
            k: vec![3.0],
            v: vec![5.0],
            log_gate: vec![Complex::new(0.0, 0.0)],
            h0: Some(vec![Complex::new(-15.0, 0.0)]),
        };
        let o = Oracle::new(&p).unwrap();
        assert_eq!(o.out.y, vec![0.0]);
        let noisy = Outputs { y: vec![15.0 * 1e-7], h_final: vec![Complex::new(15.0 * 1e-7, 0.0)] };
        assert!(o.judge(&noisy, 1e-4).pass(), "{:?}", o.judge(&noisy, 1e-4));
        let wrong = Outputs { y: vec![1.0], h_final: vec![Complex::new(0.0, 0.0)] };
        assert!(!o.judge(&wrong, 1e-4).pass());
        let nan = Outputs { y: vec![f64::NAN], h_final: vec![Complex::new(0.0, 0.0)] };
        assert!(!o.judge(&nan, 1e-4).pass());
    }
}
