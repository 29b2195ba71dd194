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
//!   mixed, and in one case in sixteen hard decay just above the reset
//!   threshold (`HardDecay(p)`, p uniform in [0.2, 1); drawn last, so the
//!   other cases of a seed are those of campaigns before it existed);
//!   per-head or per-channel gates, with or without h0;
//! - **value scales** for q, k, v, each 10^u with u uniform in [−3, 3] (h0 is
//!   scaled like k·v), and in one case in ten a sprinkle of subnormal q, k,
//!   v elements.
//!
//! - **upstream gradients** (used by gradient targets only, drawn after the
//!   rest so the forward cases of a seed do not change): dy uniform in
//!   (−1, 1)·s_dy, and in half the cases dh_final (both parts) uniform in
//!   (−1, 1)·s_h, s_dy and s_h each 10^u with u uniform in [−3, 3].
//!
//! Every selected [`Target`] runs the case and is compared with its oracle
//! on *the inputs the target saw*: f64 targets get the drawn problem, f32
//! targets its f32 rounding, bf16 targets (the CUDA kernels in bf16,
//! `--dtypes bf16`) that with q, k, v and dy rounded on to bf16, f16 targets
//! (`--dtypes f16`) that with q, k, v and dy each first multiplied by the
//! power of two (≤ 2³²) that brings its largest magnitude into (1/2, 1] (h0 by k's
//! and v's, dh_final by q's and dy's: the drawn problem times constants;
//! and all four by one more 2^−j if an output would leave f16's range,
//! [`Precision::F16`]), and the oracle the same rounded values. A
//! **forward** target ([`Kind::Forward`]) is compared with the f64 recurrent
//! reference ([`crate::reference::recurrent`]); a **gradient** target
//! ([`Kind::Grad`], `gateloop fuzz --targets grad`) with the f64 adjoint
//! recurrence ([`crate::reference::grad::backward`]) on the same problem and
//! upstream gradients.
//!
//! On `--device cuda` each mode's kernel **variants** ([`Variant`]: the
//! chunked sequential carry, forward and backward; the chunked register-
//! fragment output, f16/bf16; the recurrent ahead and batched stagings and
//! four rows a thread; the recurrent and chunked packed launches, forward and backward,
//! the B rows as B sequences) are targets of
//! their own beside the default (`chunked/sequential-bf16-cuda`, ...), so
//! the launch choices the automatic rules take only at large grids are
//! fuzzed at every size. `--variants` narrows them; a variant's failure
//! replays with `gateloop run --variant` (or `grad --variant`).
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
//! 2·Re g with phase 0, |h0|²; each gate modulus raised to at least the
//! smallest normal number of the judged precision, see below). Why R: rounding errors of any summation
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
//! bf16, f16: the f32 tol + 2⁻⁸, 2⁻¹¹ (each output stored once in that type)
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
//! the 1M-case campaign: k·v products in the subnormal range). f16 targets
//! compute in f32 (f32's η) and store y (dq, dk, dv) in f16, whose own
//! subnormal spacing 2⁻²⁴ is added to the floor of those tensors alone
//! ([`store_floor`]).
//!
//! ## The gradient bound
//!
//! The same score and tolerance, over the tensors dq, dk, dv, dlog_gate and
//! (when h0 is given) dh0, complex ones as their interleaved reals. R is
//! again the root-sum-square of the terms that make up each element
//! ([`GradOracle`]): with δ_t = ∂L/∂h_t the state adjoint (see
//! [`crate::reference::grad`]), a sum of terms (Π conj a)·q_u dy_u and
//! (Π conj a)·dh_final, and h_t the state, a sum of terms (Π a)·k_s v_s and
//! (Π a)·h0, every gradient element is a sum of products of one term of each
//! factor:
//!
//! ```text
//! R_dq[t, k]²    = Σ_v dy_t[v]² · M_h_t[k, v]²           M_x² = Σ |term of x|²
//! R_dk[t, k]²    = Σ_v M_δ_t[k, v]² · v_t[v]²
//! R_dv[t, v]²    = Σ_k M_δ_t[k, v]² · k_t[k]²
//! R_dg[t, k]²    = Σ_v |a_t|² M_h_{t−1}[k, v]² · M_δ_t[k, v]²   (per-head: also Σ_k)
//! R_dh0[k, v]²   = |a_0[k]|² · M_δ_0[k, v]²                      (for both Re and Im)
//! ```
//!
//! computed exactly by running the f64 backward itself on the magnitude
//! problem (q², k², v², gate 2·Re g with phase 0, |h0|²) with upstream
//! (dy², |dh_final|² as a real): every product of terms becomes the product
//! of their squared moduli, the sum of them Σ|term|². So R scales with the
//! inputs exactly as each gradient does: dlog_gate, a sum over V and over
//! every later step through δ, gets an R that sums the same V·L terms, and a
//! dlog_gate that cancels to ≈ 0 (as it does whenever the pairs through a
//! step balance) is judged against its terms, not against itself. A reset
//! gate has gradient exactly 0 on both sides and R = 0.
//!
//! Two additions, both from the one fact that nothing below the smallest
//! normal number N of the judged precision (2⁻¹²⁶ in f32) is resolved
//! relatively (f32 represents e^{−90} to ±2⁻¹⁴⁹ only):
//!
//! - in the magnitude problem each gate modulus |a| (not a reset) is raised to
//!   at least N: dh0 = conj(a_0)·δ_0 with a subnormal a_0 and a large δ_0 is a
//!   normal number whose relative error is η/|a_0| in *any* f32
//!   implementation: |a| = e^{−97} ≈ 390·η is known to 1 part in 780, and
//!   δ_0 = q·dy ≈ 1e6 makes the product a normal number (seed 1, case 348,
//!   dh0 ≈ 9e-41 from |a| = e^{−97} and δ_0 ≈ −200, failed before either
//!   addition; the next one accepts it, and with a larger δ_0 only this one);
//! - each tensor's scale (‖ref‖, ‖R‖, max|ref|, max R) is at least N: a
//!   gradient whose terms are all subnormal (dlog_gate of a gate e^{−94}
//!   after a state of 2e-3 is ≈ 1e-43) is judged in absolute terms, its L2
//!   error against tol·N (≈ 840·η in f32; the chunked backward's own tests
//!   allow max-abs ≤ 1e-3·N there, 10× more). Seed 1, case 10204 (an error
//!   of 1e-42 on such a dlog_gate) passes with this at 8.5e-5; seed 2026,
//!   case 8386 did not until the chunked backward formed each gate term with
//!   its modulus |E| multiplied last (it now scores 4e-8; see docs/verification.md and
//!   `tests/fuzz_regressions.rs`): the floor is attained by an f32 backward
//!   that rounds a subnormal only as its last factor, and it is no excuse for
//!   one that rounds a subnormal intermediate which q and k then scale up.
//!
//! The underflow floor of the gradients ([`grad_underflow_floor`]) is
//! 4·η·(L·(K + V + 1) + 1): a gradient element sums over V or K products of
//! L-step sums.
//!
//! The forward bound takes the first addition too (its scales keep the f64
//! limit, and its underflow floor handles subnormal outputs): its magnitude
//! problem raises each gate modulus to at least N of the judged precision.
//! Found by the first campaign with `HardDecay` gates (seed 2027, case
//! 26511, shrunk to L = 1): y = q·(a·h0 + k·v) with a = e^{−101.1} ≈ 8·η (3
//! significant bits in f32), h0 ≈ 4e5 and k·v ≈ −3e-37 gives a normal
//! y ≈ 4.5e-39 that every f32 implementation, the f32 recurrence included,
//! gets 1e-3 wrong; R now counts N·|h0|·|q| for the gate's resolution and
//! the case scores 7e-8 (`tests/fuzz_regressions.rs`).
//!
//! ## Subnormal inputs and tensor cores
//!
//! The CUDA chunked kernels take raw q, k, v and dy (and the carried h0,
//! dh_final) as tensor-core operands (TF32 for f32 inputs, bf16), which a
//! GPU may read as 0 below the smallest normal number 2⁻¹²⁶ (undocumented
//! for the card; the kernel emulator flushes them, the worse case). A
//! result that depends only on such an input is then 100% off (seed 2033,
//! case 453: a reset gate, v = 5.4e-39, h_final = k·v came out 0). So a
//! target that [`Target::flushes_subnormal_inputs`] and fails on a case with
//! subnormal inputs is judged again, on its same output, against the oracle
//! of that case with every subnormal q, k, v, h0, dy, dh_final element set
//! to 0 (`Input::subnormal_inputs_flushed`), and passes if that one
//! accepts it, a pass the report counts per target ([`TargetSummary`]'s
//! `flushed`, a line under the table): the allowance is the flush and nothing else
//! (`tests/fuzz_regressions.rs`). Every other target is judged on the input
//! as given.
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
//! For a gradient target the input is a `gateloop grad` file
//! ([`crate::io::write_grad_problem`]: the problem plus dy and dh_final), the
//! expected and actual files hold dq, dk, dv, dlog_gate, dh0
//! ([`crate::io::write_grads`]), the replay runs `gateloop grad` and the
//! shrinker may also drop dh_final. The stem ends in `-grad`.
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
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use num_complex::Complex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Mode;
use crate::cuda;
use crate::dispatch;
pub use crate::dispatch::Variant;
use crate::io::{self, HalfDtype, Upstream};
use crate::problem::{Dims, GateLayout, Outputs};
use crate::reference;
use crate::reference::grad::{GradInputs, Grads};
use crate::testing::{GateRegime, OwnedProblem, random_problem};

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
    /// q, k, v, log_gate, h0 (and dy, dh_final) rounded to f32, results in
    /// f32.
    F32,
    /// The drawn problem as is, results in f64 (CPU only: the CUDA kernels
    /// take no f64).
    F64,
    /// The CUDA kernels' bf16 inputs: q, k, v (and dy) rounded to bf16,
    /// log_gate, h0 (and dh_final) to f32, computed in f32, y (and dq, dk,
    /// dv) stored in bf16.
    Bf16,
    /// The CUDA kernels' f16 inputs: the f32 problem with q, k, v and dy
    /// each rescaled by a power of two to a largest magnitude in (1/2, 1]
    /// (h0 by k's and v's factors, dh_final by q's and dy's, so the
    /// problem is the drawn one times constants and keeps its structure),
    /// all four by a further 2^−j where the f64 reference's largest y, dq,
    /// dk or dv would exceed 2^14, then q, k, v, dy rounded to f16; computed
    /// in f32, y (and dq, dk, dv) stored in f16. The rescaling is what
    /// f16's range (6.1e-5 to 65504 for normal numbers) needs: the drawn
    /// scales, 10^±3 and their products, would overflow or flush it, which
    /// tests the draw, not the kernels (seed 2032, case 2, before the 2^−j:
    /// a dv of 3e6).
    F16,
}

impl Precision {
    /// `"f32"`, `"f64"`, `"bf16"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
    /// Parses `f32`, `f64`, `bf16` or `f16`.
    pub fn parse(s: &str) -> Option<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(Precision::F32),
            "f64" => Some(Precision::F64),
            "bf16" => Some(Precision::Bf16),
            "f16" => Some(Precision::F16),
            _ => None,
        }
    }

    /// The 16-bit type the CUDA kernels take q, k, v (and dy) in and store
    /// y (and dq, dk, dv) in; `None` for f32 and f64.
    pub fn half(self) -> Option<HalfDtype> {
        match self {
            Precision::Bf16 => Some(HalfDtype::Bf16),
            Precision::F16 => Some(HalfDtype::F16),
            Precision::F32 | Precision::F64 => None,
        }
    }
}

/// bf16's unit roundoff 2⁻⁸ (8 significant bits): the relative error of one
/// rounding to bf16, the store of each bf16 output element.
const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;

/// f16's unit roundoff 2⁻¹¹ (11 significant bits).
const F16_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// The spacing of f16's subnormal numbers, 2⁻²⁴: the absolute error of one
/// rounding to f16 below its smallest normal number 2⁻¹⁴ (≤ half of it).
const F16_SUBNORMAL_SPACING: f64 = 1.0 / 16_777_216.0;

/// Where a target computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU implementations of this crate.
    Cpu,
    /// The CUDA kernels, on GPU 0.
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
        // f32 arithmetic, and each output rounded once to bf16: relative
        // error ≤ u per element, so ≤ u in e_l2 and e_max alike.
        Precision::Bf16 => tolerance(Precision::F32, len) + BF16_UNIT_ROUNDOFF,
        // The same with f16's roundoff.
        Precision::F16 => tolerance(Precision::F32, len) + F16_UNIT_ROUNDOFF,
    }
}

/// The absolute error no implementation in `precision` can avoid on `dims`
/// (see the module docs): 4·η·(L·(K + 1) + 1), η the precision's subnormal spacing.
pub fn underflow_floor(precision: Precision, dims: &Dims) -> f64 {
    4.0 * subnormal_spacing(precision) * (dims.len as f64 * (dims.key_dim as f64 + 1.0) + 1.0)
}

/// The gradients' underflow floor (see the module docs): 4·η·(L·(K + V + 1) + 1),
/// as a gradient element is a sum over V (dq, dk, dlog_gate) or K (dv) of
/// products with the state or its adjoint, each a sum over L steps.
pub fn grad_underflow_floor(precision: Precision, dims: &Dims) -> f64 {
    let (l, k, v) = (dims.len as f64, dims.key_dim as f64, dims.value_dim as f64);
    4.0 * subnormal_spacing(precision) * (l * (k + v + 1.0) + 1.0)
}

/// What the floor of a tensor stored in the 16-bit input type (y; dq, dk,
/// dv) adds to [`underflow_floor`] or [`grad_underflow_floor`]: f16's
/// subnormal spacing 2⁻²⁴ for f16 (one store, whose absolute error below
/// 2⁻¹⁴ is at most half of it; the arithmetic is f32's, and the f32 tensors
/// h_final, dlog_gate, dh0 keep f32's floor: a floor of 2⁻²⁴ on them would
/// pass any h_final whose elements are all below it), 0 otherwise (bf16's
/// floor takes bf16's spacing 2⁻¹³³ for every tensor: it covers its store).
pub fn store_floor(precision: Precision) -> f64 {
    match precision {
        Precision::F16 => F16_SUBNORMAL_SPACING,
        Precision::F32 | Precision::F64 | Precision::Bf16 => 0.0,
    }
}

/// η: the spacing of the subnormal numbers of a precision.
fn subnormal_spacing(precision: Precision) -> f64 {
    match precision {
        Precision::F64 => f64::from_bits(1), // 2^-1074
        // f16 inputs are computed in f32 ([`store_floor`] adds the store).
        Precision::F32 | Precision::F16 => f64::from(f32::from_bits(1)), // 2^-149
        // f32 arithmetic stored in bf16, whose subnormals are coarser.
        Precision::Bf16 => f64::from(half::bf16::from_bits(1).to_f32()), // 2^-133
    }
}

/// The function a forward target runs: the problem in the target's
/// precision, held as f64 (for an f32 target every value is an exact f32), to
/// the outputs widened to f64, or a message if the implementation refused the
/// problem.
pub type RunFn = Box<dyn FnMut(&OwnedProblem<f64>) -> Result<Outputs<f64>, String>>;

/// The function a gradient target runs: the problem and the upstream
/// gradients (dy, dh_final) in the target's precision, held as f64, to the
/// gradients widened to f64, or a message if the implementation refused.
pub type GradRunFn = Box<dyn FnMut(&OwnedProblem<f64>, &Upstream<f64>) -> Result<Grads<f64>, String>>;

/// What a target computes: the forward (y, h_final) or the backward (dq, dk,
/// dv, dlog_gate, dh0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// y and h_final from the problem, judged against [`Oracle`].
    Forward,
    /// dq, dk, dv, dlog_gate (and dh0) from the problem and the upstream
    /// dy, dh_final, judged against [`GradOracle`].
    Grad,
}

impl Kind {
    /// `"forward"` or `"grad"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::Grad => "grad",
        }
    }
}

enum Implementation {
    Forward(RunFn),
    Grad(GradRunFn),
}

/// One implementation under test.
pub struct Target {
    /// The mode `gateloop run --mode` (or `gateloop grad --mode`) replays it with.
    pub mode: Mode,
    /// The precision it computes in (and the dtype of its replay input).
    pub precision: Precision,
    /// The device `gateloop run --device` replays it with.
    pub device: Device,
    /// The CUDA kernel variant (`gateloop run --variant`); `Default` on the CPU.
    pub variant: Variant,
    /// A label for tables and file names, e.g. `chunked-f32-cpu`,
    /// `chunked-f32-cpu-grad` or `chunked/sequential-bf16-cuda`.
    pub label: String,
    imp: Implementation,
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

fn widen_complex(z: &[Complex<f32>]) -> Vec<Complex<f64>> {
    z.iter().map(|z| Complex::new(f64::from(z.re), f64::from(z.im))).collect()
}

fn narrow_complex(z: &[Complex<f64>]) -> Vec<Complex<f32>> {
    z.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect()
}

/// f32 gradients as f64.
pub fn widen_grads(g: &Grads<f32>) -> Grads<f64> {
    Grads {
        dq: g.dq.iter().map(|&x| f64::from(x)).collect(),
        dk: g.dk.iter().map(|&x| f64::from(x)).collect(),
        dv: g.dv.iter().map(|&x| f64::from(x)).collect(),
        dlog_gate: widen_complex(&g.dlog_gate),
        dh0: g.dh0.as_deref().map(widen_complex),
    }
}

fn narrow_grads(g: &Grads<f64>) -> Grads<f32> {
    Grads {
        dq: g.dq.iter().map(|&x| x as f32).collect(),
        dk: g.dk.iter().map(|&x| x as f32).collect(),
        dv: g.dv.iter().map(|&x| x as f32).collect(),
        dlog_gate: narrow_complex(&g.dlog_gate),
        dh0: g.dh0.as_deref().map(narrow_complex),
    }
}

/// Upstream gradients rounded to f32 (the values an f32 target sees; exact
/// when they were rounded already).
pub fn upstream_to_f32(up: &Upstream<f64>) -> Upstream<f32> {
    Upstream { dy: up.dy.iter().map(|&x| x as f32).collect(), dh_final: up.dh_final.as_deref().map(narrow_complex) }
}

/// The f32 CPU backward of `mode` that is its own implementation, as a
/// gradient run function; `None` where [`dispatch::cpu_grad_f32`] only falls
/// back to the adjoint recurrence in f32 (fuzzed once, as recurrent).
fn cpu_grad_f32_run(mode: Mode) -> Option<GradRunFn> {
    match mode {
        Mode::Recurrent | Mode::Scan | Mode::Chunked => {
            Some(Box::new(move |p: &OwnedProblem<f64>, up: &Upstream<f64>| {
                let up = upstream_to_f32(up);
                dispatch::cpu_grad_f32(mode, &p.to_f32().view(), &up.dy, up.dh_final.as_deref())
                    .map(|g| widen_grads(&g))
                    .map_err(|e| e.to_string())
            }))
        }
        Mode::Attention => None,
    }
}

/// The element type the CUDA kernels run a precision's inputs in; `None`
/// for f64, which they do not take.
fn cuda_element(precision: Precision) -> Option<cuda::Dtype> {
    match precision {
        Precision::F32 => Some(cuda::Dtype::F32),
        Precision::Bf16 => Some(cuda::Dtype::Bf16),
        Precision::F16 => Some(cuda::Dtype::F16),
        Precision::F64 => None,
    }
}

/// The CUDA forward of `mode` (kernel `variant`) in `dtype`, as a run function.
fn cuda_run(gpu: &Rc<cuda::Gpu>, mode: Mode, variant: Variant, dtype: cuda::Dtype) -> RunFn {
    let gpu = Rc::clone(gpu);
    Box::new(move |p: &OwnedProblem<f64>| {
        dispatch::cuda_variant_in(&gpu, mode, variant, dtype, &p.to_f32().view()).map(widen).map_err(|e| e.to_string())
    })
}

/// The CUDA backward of `mode` (kernel `variant`, one of
/// [`dispatch::CUDA_GRAD_MODES`]) in `dtype`, as a gradient run function.
fn cuda_grad_run(gpu: &Rc<cuda::Gpu>, mode: Mode, variant: Variant, dtype: cuda::Dtype) -> GradRunFn {
    let gpu = Rc::clone(gpu);
    Box::new(move |p: &OwnedProblem<f64>, up: &Upstream<f64>| {
        let up = upstream_to_f32(up);
        dispatch::cuda_grad_variant_in(&gpu, mode, variant, dtype, &p.to_f32().view(), &up.dy, up.dh_final.as_deref())
            .map(|g| widen_grads(&g))
            .map_err(|e| e.to_string())
    })
}

/// A target's label: `{mode}[/{variant}]-{precision}-{device}[-grad]`, with
/// the GPU's name after a CUDA target's.
fn target_label(
    mode: Mode,
    variant: Variant,
    precision: Precision,
    device: Device,
    kind: Kind,
    gpu: Option<&str>,
) -> String {
    let variant = match variant {
        Variant::Default => String::new(),
        v => format!("/{}", v.name()),
    };
    let grad = if kind == Kind::Grad { "-grad" } else { "" };
    let on = gpu.map(|g| format!(" ({g})")).unwrap_or_default();
    format!("{}{variant}-{}-{}{grad}{on}", mode.name(), precision.name(), device.name())
}

impl Target {
    /// A forward target with an arbitrary implementation: the hook for testing
    /// the fuzzer itself (inject a wrong implementation) or external code.
    /// `mode`, `precision` and `device` say how `gateloop run` replays a failure.
    pub fn custom(
        label: impl Into<String>,
        mode: Mode,
        precision: Precision,
        device: Device,
        run: impl FnMut(&OwnedProblem<f64>) -> Result<Outputs<f64>, String> + 'static,
    ) -> Target {
        Target::default_variant(label.into(), mode, precision, device, Implementation::Forward(Box::new(run)))
    }

    /// A gradient target with an arbitrary implementation (see [`Target::custom`]);
    /// `gateloop grad` replays a failure.
    pub fn custom_grad(
        label: impl Into<String>,
        mode: Mode,
        precision: Precision,
        device: Device,
        run: impl FnMut(&OwnedProblem<f64>, &Upstream<f64>) -> Result<Grads<f64>, String> + 'static,
    ) -> Target {
        Target::default_variant(label.into(), mode, precision, device, Implementation::Grad(Box::new(run)))
    }

    /// A target of the default kernel variant (every CPU target, and custom ones).
    fn default_variant(label: String, mode: Mode, precision: Precision, device: Device, imp: Implementation) -> Target {
        Target { mode, precision, device, variant: Variant::Default, label, imp }
    }

    /// The CPU implementation of `mode` in `precision`: the reference modes
    /// in f32 or f64, the chunked path in f32. `None` for chunked f64 (there
    /// is none) and for recurrent f64 (the oracle itself).
    pub fn cpu(mode: Mode, precision: Precision) -> Option<Target> {
        let label = target_label(mode, Variant::Default, precision, Device::Cpu, Kind::Forward, None);
        let run: RunFn = match precision {
            // The f64 recurrence is the oracle itself.
            Precision::F64 if mode == Mode::Recurrent || !dispatch::CPU_F64_MODES.contains(&mode) => return None,
            Precision::F64 => {
                Box::new(move |p: &OwnedProblem<f64>| dispatch::cpu_f64(mode, &p.view()).map_err(|e| e.to_string()))
            }
            Precision::F32 => Box::new(move |p: &OwnedProblem<f64>| {
                dispatch::cpu_f32(mode, &p.to_f32().view()).map(widen).map_err(|e| e.to_string())
            }),
            // The CPU runs 16-bit values in f32: the f32 target.
            Precision::Bf16 | Precision::F16 => return None,
        };
        Some(Target::default_variant(label, mode, precision, Device::Cpu, Implementation::Forward(run)))
    }

    /// The CPU backward of `mode` in f32 ([`dispatch::cpu_grad_f32`]): the
    /// chunked backward for chunked, the adjoint recurrence in f32 for
    /// recurrent. `None` in f64 (the f64 adjoint recurrence is the oracle)
    /// and for the modes whose f32 gradient is the recurrent one.
    pub fn cpu_grad(mode: Mode, precision: Precision) -> Option<Target> {
        if precision != Precision::F32 {
            return None;
        }
        let run = cpu_grad_f32_run(mode)?;
        let label = target_label(mode, Variant::Default, precision, Device::Cpu, Kind::Grad, None);
        Some(Target::default_variant(label, mode, precision, Device::Cpu, Implementation::Grad(run)))
    }

    /// This target as kernel `variant` (`gateloop run --variant` or `gateloop
    /// grad --variant` replays its failures with it): for custom targets.
    pub fn with_variant(mut self, variant: Variant) -> Target {
        self.variant = variant;
        self
    }

    /// Whether this target may read subnormal inputs as 0: the CUDA chunked
    /// kernels, whose raw q, k, v, dy (and carried h0, dh_final) are
    /// tensor-core operands (TF32 or bf16), which a GPU may flush below
    /// 2⁻¹²⁶ (undocumented; the kernel emulator does). Such a target that
    /// misses the bound on a case with subnormal inputs is judged again
    /// against the oracle of the same case with them set to 0 (module docs,
    /// "Subnormal inputs and tensor cores").
    pub fn flushes_subnormal_inputs(&self) -> bool {
        self.device == Device::Cuda && self.mode == Mode::Chunked
    }

    /// Forward or gradient.
    pub fn kind(&self) -> Kind {
        match self.imp {
            Implementation::Forward(_) => Kind::Forward,
            Implementation::Grad(_) => Kind::Grad,
        }
    }

    /// Runs a forward target on a problem (for tests and tools); a gradient
    /// target refuses.
    pub fn run(&mut self, p: &OwnedProblem<f64>) -> Result<Outputs<f64>, String> {
        match &mut self.imp {
            Implementation::Forward(run) => run(p),
            Implementation::Grad(_) => Err(format!("{} is a gradient target", self.label)),
        }
    }

    /// Runs a gradient target on a problem and upstream gradients; a forward
    /// target refuses.
    pub fn run_grad(&mut self, p: &OwnedProblem<f64>, up: &Upstream<f64>) -> Result<Grads<f64>, String> {
        match &mut self.imp {
            Implementation::Grad(run) => run(p, up),
            Implementation::Forward(_) => Err(format!("{} is a forward target", self.label)),
        }
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

/// The forward targets for a device, modes and precisions: [`select`] with
/// [`Kind::Forward`] alone.
pub fn targets(
    device: Device,
    modes: &[Mode],
    precisions: &[Precision],
) -> Result<(Vec<Target>, Vec<String>), SetupError> {
    select(device, &[Kind::Forward], modes, precisions)
}

/// The targets of the given kinds for a device, modes and precisions, with a
/// note for each combination that does not exist: [`select_with`] with every
/// kernel [`Variant`] where it applies (on the CPU, only the default exists).
pub fn select(
    device: Device,
    kinds: &[Kind],
    modes: &[Mode],
    precisions: &[Precision],
) -> Result<(Vec<Target>, Vec<String>), SetupError> {
    select_with(device, Selection { kinds, variants: None }, modes, precisions)
}

/// What [`select_with`] builds targets of, beside modes and precisions.
#[derive(Clone, Copy, Debug)]
pub struct Selection<'a> {
    /// Forward and/or gradient targets.
    pub kinds: &'a [Kind],
    /// The CUDA kernel variants: `None` for every one where it applies
    /// (quietly skipped where it does not); `Some` for exactly these, with a
    /// note for each combination without one.
    pub variants: Option<&'a [Variant]>,
}

/// The targets of a [`Selection`] for a device, modes and precisions, with a
/// note for each combination that does not exist. Forward: chunked f64 does
/// not exist; recurrent f64 is the oracle; on cuda f32, bf16 and f16.
/// Gradients: f64 is the oracle (the adjoint recurrence); in f32 the modes
/// with their own backward ([`Target::cpu_grad`]; on cuda the modes with a
/// CUDA backward). Kernel variants ([`Variant::applies`]) are CUDA targets
/// of their own, each judged against the oracle like the default.
pub fn select_with(
    device: Device,
    selection: Selection<'_>,
    modes: &[Mode],
    precisions: &[Precision],
) -> Result<(Vec<Target>, Vec<String>), SetupError> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let gpu = match device {
        Device::Cpu => None,
        Device::Cuda => Some(Rc::new(cuda::Gpu::new(0).map_err(|e| SetupError::NoGpu(e.to_string()))?)),
    };
    let explicit = selection.variants.is_some();
    let variants = selection.variants.unwrap_or(&Variant::ALL);
    for &kind in selection.kinds {
        for &m in modes {
            for &pr in precisions {
                let what = format!("{} {} {} on {}", kind.name(), m.name(), pr.name(), device.name());
                if gpu.is_none() && pr.half().is_some() {
                    notes.push(format!("{what}: the CPU computes 16-bit inputs in f32 (the f32 targets): skipped"));
                    continue;
                }
                let Some(gpu) = &gpu else {
                    if explicit {
                        for v in variants.iter().filter(|&&v| v != Variant::Default) {
                            notes.push(format!(
                                "{what}, variant {}: a CUDA kernel variant (the CPU runs one implementation per mode): skipped",
                                v.name()
                            ));
                        }
                        if !variants.contains(&Variant::Default) {
                            continue;
                        }
                    }
                    match kind {
                        Kind::Forward => match Target::cpu(m, pr) {
                            Some(t) => out.push(t),
                            None if m == Mode::Recurrent => {
                                notes.push(format!("{what} is the oracle itself: not fuzzed"))
                            }
                            None => notes.push(format!("{what} does not exist: skipped")),
                        },
                        Kind::Grad => match Target::cpu_grad(m, pr) {
                            Some(t) => out.push(t),
                            None if pr == Precision::F64 => notes
                                .push(format!("{what} is the oracle itself (the f64 adjoint recurrence): not fuzzed")),
                            None => notes.push(format!(
                                "{what} is the adjoint recurrence in f32 (the recurrent grad target): not fuzzed again"
                            )),
                        },
                    }
                    continue;
                };
                let grad = kind == Kind::Grad;
                let dtype = match cuda_element(pr) {
                    Some(dtype) if grad || dispatch::CUDA_MODES.contains(&m) => dtype,
                    _ => {
                        notes.push(format!("{what} is not available: skipped"));
                        continue;
                    }
                };
                if grad && !dispatch::CUDA_GRAD_MODES.contains(&m) {
                    notes.push(format!("{what}: no CUDA backward: skipped"));
                    continue;
                }
                for &v in variants {
                    if !v.applies(m, dtype, grad) {
                        if explicit {
                            notes.push(format!("{what} has no {} variant: skipped", v.name()));
                        }
                        continue;
                    }
                    let label = target_label(m, v, pr, device, kind, Some(&gpu.name()));
                    let imp = if grad {
                        Implementation::Grad(cuda_grad_run(gpu, m, v, dtype))
                    } else {
                        Implementation::Forward(cuda_run(gpu, m, v, dtype))
                    };
                    out.push(Target { mode: m, precision: pr, device, variant: v, label, imp });
                }
            }
        }
    }
    if out.is_empty() {
        return Err(SetupError::Empty(if notes.is_empty() {
            "no modes or dtypes selected".into()
        } else {
            notes.join("; ")
        }));
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
    /// B, L, H, K, V and the gate layout.
    pub dims: Dims,
    /// How log_gate is drawn.
    pub regime: GateRegime,
    /// Whether the problem has an h0 (else the state starts at zero).
    pub with_h0: bool,
    /// Scales of q, k, v (h0 is scaled by k·v).
    pub scales: [f64; 3],
    /// Whether some q, k, v elements are replaced by subnormal numbers.
    pub subnormals: bool,
    /// Seed of [`random_problem`].
    pub problem_seed: u64,
    /// Scale of the upstream gradient dy (gradient targets only).
    pub dy_scale: f64,
    /// Scale of the upstream gradient dh_final, when there is one (half the
    /// cases; gradient targets only).
    pub dh_final_scale: Option<f64>,
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
    1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049,
    4095, 4096, 4097, 65537,
];

/// Value dims of [`FuzzConfig::wide_values`]: past one value tile of 64, where
/// the chunked kernels take their 128-column launches (the wide output and
/// dv launches; with real gates and 16-bit inputs the wide walks), with
/// partial tiles and partial 128-column blocks (65, 70, 127, 129, 200)
/// beside whole ones.
pub const WIDE_VALUE_POOL: [usize; 8] = [65, 70, 96, 127, 128, 129, 200, 256];

/// Draws case `index` of the campaign with `seed` (lengths up to `max_len`).
pub fn draw_case(seed: u64, index: u64, max_len: usize) -> CaseSpec {
    draw_case_with(seed, index, max_len, false)
}

/// [`draw_case`], with V drawn from [`WIDE_VALUE_POOL`] where `wide_values`
/// ([`FuzzConfig::wide_values`]): the same random stream, so everything but
/// V (and what the size cap halves) is the case [`draw_case`] draws.
pub fn draw_case_with(seed: u64, index: u64, max_len: usize, wide_values: bool) -> CaseSpec {
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
        pick(&mut rng, if wide_values { &WIDE_VALUE_POOL } else { &DIM_POOL }),
    ];
    let cap = MAX_CASE_ELEMENTS.max(max_len);
    // Wide values keep V: the cap halves B, H and K only (a case may then
    // pass the cap by up to its V / 64 times, at most 4).
    let halved = if wide_values { 3 } else { 4 };
    while d.iter().product::<usize>().saturating_mul(len) > cap {
        // Halve the largest of B, H, K, V (rounding up keeps it ≥ 1).
        let Some(i) = (0..halved).max_by_key(|&i| d[i]) else { break };
        if d[i] == 1 {
            break;
        }
        d[i] = d[i].div_ceil(2);
    }
    let per_head = rng.random_bool(0.3);
    let dims = Dims::new(d[0], len, d[1], d[2], d[3]).with_gate(if per_head {
        GateLayout::PerHead
    } else {
        GateLayout::PerChannel
    });
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
    let problem_seed = rng.random();
    // Drawn after everything the forward uses, so the forward cases of a
    // seed are the same with or without gradient targets.
    let dy_scale = 10f64.powf(rng.random_range(-3.0..3.0));
    let dh_final_scale = rng.random_bool(0.5).then(|| 10f64.powf(rng.random_range(-3.0..3.0)));
    // Added after the campaigns of 2026-11-29 were documented: drawn last, it
    // changes the gates of one case in sixteen and leaves the others as they were.
    let regime = if rng.random_bool(1.0 / 16.0) { GateRegime::HardDecay(rng.random_range(0.2..1.0)) } else { regime };
    CaseSpec { seed, index, dims, regime, with_h0, scales, subnormals, problem_seed, dy_scale, dh_final_scale }
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

    /// The case's upstream gradients, in f64: dy `[B, L, H, V]` and (when
    /// drawn) dh_final `[B, H, K, V]`, uniform in (−1, 1) times their scales.
    pub fn upstream(&self) -> Upstream<f64> {
        let mut rng = StdRng::seed_from_u64(mix(self.problem_seed, 0x6772_6164));
        let d = self.dims;
        let dy = (0..d.v_len()).map(|_| self.dy_scale * rng.random_range(-1.0..1.0)).collect();
        let dh_final = self.dh_final_scale.map(|s| {
            (0..d.state_len())
                .map(|_| Complex::new(s * rng.random_range(-1.0..1.0), s * rng.random_range(-1.0..1.0)))
                .collect()
        });
        Upstream { dy, dh_final }
    }

    /// `upstream dy 1.0e-2, dh_final 3.0e1` (or `dh_final zero`).
    pub fn upstream_str(&self) -> String {
        match self.dh_final_scale {
            Some(s) => format!("upstream dy {:.1e}, dh_final {s:.1e}", self.dy_scale),
            None => format!("upstream dy {:.1e}, dh_final zero", self.dy_scale),
        }
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
    /// ‖ref‖₂.
    pub norm_ref: f64,
    /// ‖R‖₂.
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

/// The verdict on one run of any target: a score per named tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// (`y`, `h_final`) for a forward target; (`dq`, `dk`, `dv`,
    /// `dlog_gate`[, `dh0`]) for a gradient target.
    pub tensors: Vec<(&'static str, TensorScore)>,
    /// The tolerance every score is held to (in a campaign, [`tolerance`]
    /// of the target's precision and L).
    pub tol: f64,
}

impl Verdict {
    /// The largest score of the tensors (NaN if any is).
    pub fn score(&self) -> f64 {
        let scores = self.tensors.iter().map(|(_, s)| s.score());
        scores.fold(0.0, |acc: f64, s| if acc.is_nan() || s.is_nan() { f64::NAN } else { acc.max(s) })
    }
    /// score ≤ tol (NaN fails).
    pub fn pass(&self) -> bool {
        self.score() <= self.tol
    }
    /// The score of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorScore> {
        self.tensors.iter().find(|(n, _)| *n == name).map(|(_, s)| s)
    }
    /// The `--rtol` for `gateloop check` (plain relative L2) equivalent to
    /// the L2 part of the bound: tol · scale / ‖ref‖, the smallest over the
    /// tensors (as `check` uses one rtol for all). Tensors whose reference
    /// and R are exactly 0 (e.g. dlog_gate with no state before the gate)
    /// are left out: `check` passes them only when they are 0 (bit for bit,
    /// or an absolute L2 below the rtol); `tol` when nothing is left.
    pub fn check_rtol(&self) -> f64 {
        let r = |s: &TensorScore| {
            if s.norm_ref > 0.0 { self.tol * s.norm_ref.max(s.norm_r) / s.norm_ref } else { self.tol * s.norm_r }
        };
        let rtols = self.tensors.iter().filter(|(_, s)| s.norm_ref > 0.0 || s.norm_r > 0.0).map(|(_, s)| r(s));
        let min = rtols.fold(f64::INFINITY, f64::min);
        if min.is_finite() { min } else { self.tol }
    }
    /// `score S > tol T (y: e_l2 .. e_max .. rel ..; h_final: ...)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .tensors
            .iter()
            .map(|(n, s)| format!("{n}: e_l2 {:.3e} e_max {:.3e} rel {:.3e}", s.e_l2, s.e_max, s.rel_l2))
            .collect();
        format!("score {:.3e} > tol {:.1e} ({})", self.score(), self.tol, parts.join("; "))
    }
}

/// The verdict on one run of a forward target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judgement {
    /// The score of y.
    pub y: TensorScore,
    /// The score of h_final, over its interleaved reals.
    pub h_final: TensorScore,
    /// The tolerance both scores are held to.
    pub tol: f64,
}

impl Judgement {
    /// As a [`Verdict`] over `y` and `h_final`.
    pub fn verdict(&self) -> Verdict {
        Verdict { tensors: vec![("y", self.y), ("h_final", self.h_final)], tol: self.tol }
    }
    /// The larger score of y and h_final (NaN if either is).
    pub fn score(&self) -> f64 {
        self.verdict().score()
    }
    /// score ≤ tol (NaN fails).
    pub fn pass(&self) -> bool {
        self.verdict().pass()
    }
    /// The `--rtol` for `gateloop check` ([`Verdict::check_rtol`]).
    pub fn check_rtol(&self) -> f64 {
        self.verdict().check_rtol()
    }
}

/// Scores one tensor: errors first reduced by `floor`, and judged against
/// magnitudes of at least `min_scale` (the smallest normal number of the
/// precision judged: below it nothing is resolved relatively).
fn score_tensor(out: &[f64], reference: &[f64], r: &[f64], floor: f64, min_scale: f64) -> TensorScore {
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
        return TensorScore {
            e_l2: f64::NAN,
            e_max: f64::NAN,
            rel_l2: f64::NAN,
            norm_ref: den.sqrt(),
            norm_r: rr.sqrt(),
        };
    }
    let (num, den, rr) = (num.sqrt(), den.sqrt(), rr.sqrt());
    let scale = den.max(rr).max(min_scale);
    TensorScore {
        e_l2: num / scale,
        e_max: max_e / max_s.max(min_scale),
        rel_l2: if den > 0.0 { num / den } else { num },
        norm_ref: den,
        norm_r: rr,
    }
}

fn interleave(z: &[Complex<f64>]) -> Vec<f64> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// The problem of squared magnitudes whose outputs (or gradients) are the
/// squares of R: (q², k², v², gate 2·max(Re g, ln a_min) with phase 0,
/// |h0|²). A reset stays a reset; `a_min` is the smallest gate modulus the
/// precision resolves to its relative accuracy (see [`GradOracle`]; 0 keeps
/// every gate as it is).
fn magnitude_problem(p: &OwnedProblem<f64>, a_min: f64) -> OwnedProblem<f64> {
    let ln_a_min = a_min.ln();
    let modulus_sq = |g: &Complex<f64>| {
        // A gate whose f64 exp is 0 is a reset for the oracle too: no terms cross it.
        let reset = g.re.exp() == 0.0;
        Complex::new(if reset { g.re } else { 2.0 * g.re.max(ln_a_min) }, 0.0)
    };
    OwnedProblem {
        dims: p.dims,
        q: p.q.iter().map(|x| x * x).collect(),
        k: p.k.iter().map(|x| x * x).collect(),
        v: p.v.iter().map(|x| x * x).collect(),
        log_gate: p.log_gate.iter().map(modulus_sq).collect(),
        h0: p.h0.as_ref().map(|h| h.iter().map(|z| Complex::new(z.norm_sqr(), 0.0)).collect()),
    }
}

/// √ of each squared magnitude (the real part; the imaginary part of a
/// magnitude problem's complex result is 0), for both reals of a complex.
fn roots_interleaved(z: &[Complex<f64>]) -> Vec<f64> {
    z.iter().flat_map(|z| [z.re.max(0.0).sqrt(); 2]).collect()
}

fn roots(x: &[f64]) -> Vec<f64> {
    x.iter().map(|x| x.max(0.0).sqrt()).collect()
}

/// The oracle's outputs and the magnitudes R of a problem (see the module docs).
#[derive(Clone, Debug)]
pub struct Oracle {
    /// y and h_final of the f64 recurrent reference on the problem.
    pub out: Outputs<f64>,
    /// R_y, `[B, L, H, V]`.
    pub r_y: Vec<f64>,
    /// R_h for each real of h_final (interleaved, `[B, H, K, V, 2]`).
    pub r_h: Vec<f64>,
}

/// The smallest normal number N of `precision` (module docs: nothing below N
/// is resolved relatively): the gate moduli of the magnitude problems are
/// raised to at least N, and every gradient's scale is at least N.
fn smallest_normal(precision: Precision) -> f64 {
    match precision {
        Precision::F64 => f64::MIN_POSITIVE,
        // bf16 has f32's exponent range; f16 inputs are computed in f32, and
        // its stores' subnormals are [`store_floor`]'s.
        Precision::F32 | Precision::Bf16 | Precision::F16 => f64::from(f32::MIN_POSITIVE),
    }
}

impl Oracle {
    /// Runs the f64 recurrent reference on `p`, and on the squared-magnitude
    /// problem for R, its gate moduli raised to at least the smallest normal
    /// number of `precision` (the precision of the implementation judged).
    pub fn new(p: &OwnedProblem<f64>, precision: Precision) -> Result<Oracle, String> {
        let out = reference::recurrent::forward(&p.view()).map_err(|e| format!("the oracle refused the case: {e}"))?;
        let m = reference::recurrent::forward(&magnitude_problem(p, smallest_normal(precision)).view())
            .map_err(|e| format!("the magnitude oracle refused the case: {e}"))?;
        Ok(Oracle { out, r_y: roots(&m.y), r_h: roots_interleaved(&m.h_final) })
    }

    /// Judges `out` with tolerance `tol` (and no underflow floor).
    pub fn judge(&self, out: &Outputs<f64>, tol: f64) -> Judgement {
        self.judge_with_floor(out, tol, 0.0)
    }

    /// Judges `out` with tolerance `tol`, each element's error first reduced
    /// by `floor` ([`underflow_floor`]).
    pub fn judge_with_floor(&self, out: &Outputs<f64>, tol: f64, floor: f64) -> Judgement {
        self.judge_with_floors(out, tol, floor, floor)
    }

    /// [`Oracle::judge_with_floor`] with y's floor apart: `stored_floor`
    /// for y, which the kernels store in the 16-bit input type (the floor
    /// plus [`store_floor`]), `floor` for h_final (f32 for every input type).
    pub fn judge_with_floors(&self, out: &Outputs<f64>, tol: f64, floor: f64, stored_floor: f64) -> Judgement {
        Judgement {
            y: score_tensor(&out.y, &self.out.y, &self.r_y, stored_floor, f64::MIN_POSITIVE),
            h_final: score_tensor(
                &interleave(&out.h_final),
                &interleave(&self.out.h_final),
                &self.r_h,
                floor,
                f64::MIN_POSITIVE,
            ),
            tol,
        }
    }
}

/// The oracle's gradients ([`reference::grad::backward`] in f64) and their
/// magnitudes R (see the module docs: the same backward on the
/// squared-magnitude problem and upstream).
#[derive(Clone, Debug)]
pub struct GradOracle {
    /// dq, dk, dv, dlog_gate (and dh0) of the f64 adjoint recurrence on the
    /// problem and upstream.
    pub grads: Grads<f64>,
    /// R of dq, `[B, L, H, K]`.
    pub r_dq: Vec<f64>,
    /// R of dk, `[B, L, H, K]`.
    pub r_dk: Vec<f64>,
    /// R of dv, `[B, L, H, V]`.
    pub r_dv: Vec<f64>,
    /// R of each real of dlog_gate (interleaved, log_gate's layout).
    pub r_dlog_gate: Vec<f64>,
    /// R of each real of dh0 (interleaved, `[B, H, K, V, 2]`), when h0 is given.
    pub r_dh0: Option<Vec<f64>>,
    /// The smallest normal number of the precision judged: the least
    /// magnitude an error is measured against.
    pub smallest_normal: f64,
}

impl GradOracle {
    /// Runs the f64 adjoint recurrence on `p` and `up`, and on the
    /// squared-magnitude problem with upstream (dy², |dh_final|²) for R, the
    /// gate moduli in it raised to at least the smallest normal number of
    /// `precision` (the precision of the implementation judged; see the
    /// module docs).
    pub fn new(p: &OwnedProblem<f64>, up: &Upstream<f64>, precision: Precision) -> Result<GradOracle, String> {
        let grads = reference::grad::backward(&p.view(), &up.dy, up.dh_final.as_deref())
            .map_err(|e| format!("the gradient oracle refused the case: {e}"))?;
        let dy2: Vec<f64> = up.dy.iter().map(|x| x * x).collect();
        let dh2: Option<Vec<Complex<f64>>> =
            up.dh_final.as_ref().map(|d| d.iter().map(|z| Complex::new(z.norm_sqr(), 0.0)).collect());
        let smallest_normal = smallest_normal(precision);
        let m = reference::grad::backward(&magnitude_problem(p, smallest_normal).view(), &dy2, dh2.as_deref())
            .map_err(|e| format!("the gradient magnitude oracle refused the case: {e}"))?;
        Ok(GradOracle {
            grads,
            r_dq: roots(&m.dq),
            r_dk: roots(&m.dk),
            r_dv: roots(&m.dv),
            r_dlog_gate: roots_interleaved(&m.dlog_gate),
            r_dh0: m.dh0.as_deref().map(roots_interleaved),
            smallest_normal,
        })
    }

    /// Judges `g` with tolerance `tol` (and no underflow floor).
    pub fn judge(&self, g: &Grads<f64>, tol: f64) -> Verdict {
        self.judge_with_floor(g, tol, 0.0)
    }

    /// Judges `g` with tolerance `tol`, each element's error first reduced by
    /// `floor` ([`grad_underflow_floor`]). A dh0 present on one side only
    /// scores NaN (fails).
    pub fn judge_with_floor(&self, g: &Grads<f64>, tol: f64, floor: f64) -> Verdict {
        self.judge_with_floors(g, tol, floor, floor)
    }

    /// [`GradOracle::judge_with_floor`] with `stored_floor` for dq, dk and
    /// dv, which the kernels store in the 16-bit input type (the floor plus
    /// [`store_floor`]), `floor` for dlog_gate and dh0 (f32).
    pub fn judge_with_floors(&self, g: &Grads<f64>, tol: f64, floor: f64, stored_floor: f64) -> Verdict {
        let e = &self.grads;
        let with_floor = |out: &[f64], reference: &[f64], r: &[f64], floor: f64| {
            score_tensor(out, reference, r, floor, self.smallest_normal)
        };
        let stored = |out: &[f64], reference: &[f64], r: &[f64]| with_floor(out, reference, r, stored_floor);
        let score = |out: &[f64], reference: &[f64], r: &[f64]| with_floor(out, reference, r, floor);
        let mut tensors = vec![
            ("dq", stored(&g.dq, &e.dq, &self.r_dq)),
            ("dk", stored(&g.dk, &e.dk, &self.r_dk)),
            ("dv", stored(&g.dv, &e.dv, &self.r_dv)),
            ("dlog_gate", score(&interleave(&g.dlog_gate), &interleave(&e.dlog_gate), &self.r_dlog_gate)),
        ];
        if g.dh0.is_some() || e.dh0.is_some() {
            let (out, reference) = (g.dh0.as_deref().unwrap_or(&[]), e.dh0.as_deref().unwrap_or(&[]));
            let r = self.r_dh0.as_deref().unwrap_or(&[]);
            tensors.push(("dh0", score(&interleave(out), &interleave(reference), r)));
        }
        Verdict { tensors, tol }
    }
}

// ---------------------------------------------------------------- shrink --

/// What a case gives a target: the problem and the upstream gradients (used
/// by gradient targets only), in the target's precision, held as f64.
#[derive(Clone, Debug)]
struct Input {
    p: OwnedProblem<f64>,
    up: Upstream<f64>,
}

impl Input {
    /// The same input with the imaginary parts of log_gate, h0 and dh_final
    /// set to 0: a real-gate problem (gated linear attention), whose
    /// forward and backward `dispatch` runs on the real-gate kernels.
    fn with_real_gates(mut self) -> Input {
        let zs = self.p.log_gate.iter_mut().chain(self.p.h0.iter_mut().flatten());
        for z in zs.chain(self.up.dh_final.iter_mut().flatten()) {
            z.im = 0.0;
        }
        self
    }
}

/// The smallest normal f32 (and bf16, TF32) number, 2⁻¹²⁶: tensor-core
/// operands below it may be read as 0.
const F32_MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;

impl Input {
    /// This input with every subnormal-in-f32 element of q, k, v, h0, dy and
    /// dh_final (0 < |x| < 2⁻¹²⁶, each real part apart) set to 0, or `None`
    /// when it has none: what a tensor-core kernel that flushes subnormal
    /// operands computes on ([`Target::flushes_subnormal_inputs`]).
    fn subnormal_inputs_flushed(&self) -> Option<Input> {
        let tiny = |x: f64| x != 0.0 && x.abs() < F32_MIN_NORMAL;
        let flush = |x: f64| if tiny(x) { 0.0 } else { x };
        let flush_c = |z: &Complex<f64>| Complex::new(flush(z.re), flush(z.im));
        let p = &self.p;
        let any = p.q.iter().chain(&p.k).chain(&p.v).chain(&self.up.dy).any(|&x| tiny(x))
            || p.h0.iter().chain(&self.up.dh_final).flatten().any(|z| tiny(z.re) || tiny(z.im));
        any.then(|| Input {
            p: OwnedProblem {
                dims: p.dims,
                q: p.q.iter().map(|&x| flush(x)).collect(),
                k: p.k.iter().map(|&x| flush(x)).collect(),
                v: p.v.iter().map(|&x| flush(x)).collect(),
                log_gate: p.log_gate.clone(),
                h0: p.h0.as_ref().map(|h| h.iter().map(flush_c).collect()),
            },
            up: Upstream {
                dy: self.up.dy.iter().map(|&x| flush(x)).collect(),
                dh_final: self.up.dh_final.as_ref().map(|h| h.iter().map(flush_c).collect()),
            },
        })
    }
}

/// A box of a problem: ranges of B, L, H, K, V, and whether h0 and dh_final
/// are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Region {
    b: Range<usize>,
    t: Range<usize>,
    h: Range<usize>,
    k: Range<usize>,
    v: Range<usize>,
    h0: bool,
    dh_final: bool,
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

/// The sub-input in `r`: the sub-problem, dy and dh_final cut alike.
fn sub_input(x: &Input, r: &Region) -> Input {
    let d = x.p.dims;
    let up = Upstream {
        dy: gather(&x.up.dy, d.v_shape(), [&r.b, &r.t, &r.h, &r.v]),
        dh_final: if r.dh_final {
            x.up.dh_final.as_ref().map(|dh| gather(dh, d.state_shape(), [&r.b, &r.h, &r.k, &r.v]))
        } else {
            None
        },
    };
    Input { p: sub_problem(&x.p, r), up }
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
    if r.dh_final {
        c.push(Region { dh_final: false, ..r.clone() });
    }
    c
}

/// The oracle of a case for one kind of target.
#[derive(Clone, Debug)]
enum Expected {
    Forward(Oracle),
    Grad(GradOracle),
}

impl Expected {
    fn new(kind: Kind, precision: Precision, x: &Input) -> Result<Expected, String> {
        match kind {
            Kind::Forward => Oracle::new(&x.p, precision).map(Expected::Forward),
            Kind::Grad => GradOracle::new(&x.p, &x.up, precision).map(Expected::Grad),
        }
    }
}

/// What a target produced.
enum Actual {
    Forward(Outputs<f64>),
    Grad(Grads<f64>),
}

/// How a run of a target went.
enum Outcome {
    Pass(Verdict),
    Fail { verdict: Option<Verdict>, actual: Option<Actual>, why: String },
}

/// `None` when `g` has the shapes of the gradients of `x`, else why not.
fn grad_shape_error(g: &Grads<f64>, x: &Input) -> Option<String> {
    let d = x.p.dims;
    let got = [g.dq.len(), g.dk.len(), g.dv.len(), g.dlog_gate.len(), g.dh0.as_ref().map_or(0, Vec::len)];
    let want = [d.qk_len(), d.qk_len(), d.v_len(), d.gate_len(), if x.p.h0.is_some() { d.state_len() } else { 0 }];
    (got != want).then(|| format!("returned dq, dk, dv, dlog_gate, dh0 of {got:?} elements, expected {want:?}"))
}

/// [`evaluate`], and for a target that may flush subnormal inputs
/// ([`Target::flushes_subnormal_inputs`]) that fails on an input with some,
/// [`evaluate`] against the oracle of the input with them set to 0 (the
/// target still runs on `x`): a pass there is a pass, and the flag says it
/// was one.
fn evaluate_flushing(target: &mut Target, x: &Input, expected: &Expected) -> (Outcome, bool) {
    let outcome = evaluate(target, x, expected);
    if !matches!(outcome, Outcome::Fail { .. }) || !target.flushes_subnormal_inputs() {
        return (outcome, false);
    }
    let Some(flushed) = x.subnormal_inputs_flushed() else { return (outcome, false) };
    match Expected::new(target.kind(), target.precision, &flushed) {
        Ok(fe) => match evaluate(target, x, &fe) {
            pass @ Outcome::Pass(_) => (pass, true),
            Outcome::Fail { .. } => (outcome, false),
        },
        Err(_) => (outcome, false),
    }
}

fn evaluate(target: &mut Target, x: &Input, expected: &Expected) -> Outcome {
    let tol = tolerance(target.precision, x.p.dims.len);
    let fail = |why: String| Outcome::Fail { verdict: None, actual: None, why };
    let (verdict, actual) = match (&mut target.imp, expected) {
        (Implementation::Forward(run), Expected::Forward(oracle)) => match run(&x.p) {
            Ok(out) => {
                if out.y.len() != x.p.dims.v_len() || out.h_final.len() != x.p.dims.state_len() {
                    return fail(format!(
                        "returned y of {} and h_final of {} elements, expected {} and {}",
                        out.y.len(),
                        out.h_final.len(),
                        x.p.dims.v_len(),
                        x.p.dims.state_len()
                    ));
                }
                let floor = underflow_floor(target.precision, &x.p.dims);
                let stored = floor + store_floor(target.precision);
                (oracle.judge_with_floors(&out, tol, floor, stored).verdict(), Actual::Forward(out))
            }
            Err(e) => return fail(format!("refused a valid problem: {e}")),
        },
        (Implementation::Grad(run), Expected::Grad(oracle)) => match run(&x.p, &x.up) {
            Ok(g) => {
                if let Some(why) = grad_shape_error(&g, x) {
                    return fail(why);
                }
                let floor = grad_underflow_floor(target.precision, &x.p.dims);
                let stored = floor + store_floor(target.precision);
                (oracle.judge_with_floors(&g, tol, floor, stored), Actual::Grad(g))
            }
            Err(e) => return fail(format!("refused a valid problem: {e}")),
        },
        _ => return fail("internal: the oracle is of the other kind".into()),
    };
    if verdict.pass() {
        Outcome::Pass(verdict)
    } else {
        let why = verdict.describe();
        Outcome::Fail { verdict: Some(verdict), actual: Some(actual), why }
    }
}

/// The input a target sees: the f32 rounding (of the problem and the
/// upstream gradients) for f32 targets; for bf16 targets that, with q, k, v
/// and dy rounded on to bf16 (what a bf16 file of them holds).
fn for_precision(x: &Input, precision: Precision) -> Input {
    let r = |v: f64| v as f32 as f64;
    let f32_input = || Input {
        p: x.p.rounded_to_f32(),
        up: Upstream {
            dy: x.up.dy.iter().map(|&v| r(v)).collect(),
            dh_final: x.up.dh_final.as_ref().map(|d| d.iter().map(|z| Complex::new(r(z.re), r(z.im))).collect()),
        },
    };
    match precision {
        Precision::F64 => x.clone(),
        Precision::F32 => f32_input(),
        Precision::Bf16 => {
            let Input { p, mut up } = f32_input();
            let b = |v: f64| f64::from(HalfDtype::Bf16.round(v as f32));
            up.dy.iter_mut().for_each(|v| *v = b(*v));
            Input { p: p.map_qkv(b), up }
        }
        Precision::F16 => {
            let Input { p, up } = f32_input();
            let unit = [unit_scale(&p.q), unit_scale(&p.k), unit_scale(&p.v), unit_scale(&up.dy)];
            // Every output of the unit-scaled problem within F16_OUTPUT_MAX:
            // y, dq, dk, dv are products of three of the four factors, so
            // one more 2^-j on each divides them by 2^3j.
            let unit_out = max_half_output(&scaled_problem(&p, &up, unit, None));
            // (A problem the reference refuses keeps j = 0: its oracle refuses it too.)
            let j = if unit_out.is_finite() && unit_out > F16_OUTPUT_MAX {
                ((unit_out / F16_OUTPUT_MAX).log2() / 3.0).ceil() as i32
            } else {
                0
            };
            let f16 = |v: f64| f64::from(HalfDtype::F16.round(v as f32));
            scaled_problem(&p, &up, unit.map(|s| s * 2f64.powi(-j)), Some(&f16))
        }
    }
}

/// The largest magnitude an f16 target's outputs stored in f16 may have: a
/// quarter of f16's largest finite number 65504 (the kernels' f32 result
/// differs from the reference's by rounding only; the margin is for that).
const F16_OUTPUT_MAX: f64 = 16384.0;

/// `p` and `up` with q, k, v, dy multiplied by `[sq, sk, sv, sdy]` (powers
/// of two) and then rounded by `round`, h0 by sk·sv and dh_final by sq·sdy
/// (they enter the state beside k·v and the adjoint beside q·dy: the
/// problem keeps its balance) and rounded to f32 again (a value that left
/// f32's normal range).
fn scaled_problem(
    p: &OwnedProblem<f64>,
    up: &Upstream<f64>,
    [sq, sk, sv, sdy]: [f64; 4],
    round: Option<&dyn Fn(f64) -> f64>,
) -> Input {
    let real = |x: &[f64], s: f64| -> Vec<f64> { x.iter().map(|v| round.map_or(v * s, |r| r(v * s))).collect() };
    let r = |v: f64| v as f32 as f64;
    let complex = |x: &[Complex<f64>], s: f64| -> Vec<Complex<f64>> {
        x.iter().map(|z| Complex::new(r(z.re * s), r(z.im * s))).collect()
    };
    Input {
        p: OwnedProblem {
            dims: p.dims,
            q: real(&p.q, sq),
            k: real(&p.k, sk),
            v: real(&p.v, sv),
            log_gate: p.log_gate.clone(),
            h0: p.h0.as_deref().map(|h| complex(h, sk * sv)),
        },
        up: Upstream { dy: real(&up.dy, sdy), dh_final: up.dh_final.as_deref().map(|d| complex(d, sq * sdy)) },
    }
}

/// The largest magnitude of y, dq, dk, dv (the outputs the kernels store
/// in the 16-bit input type) by the f64 reference; infinity if it refuses.
fn max_half_output(x: &Input) -> f64 {
    let max = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let view = x.p.view();
    let y = reference::recurrent::forward(&view).map_or(f64::INFINITY, |o| max(&o.y));
    let g = reference::grad::backward(&view, &x.up.dy, x.up.dh_final.as_deref())
        .map_or(f64::INFINITY, |g| max(&g.dq).max(max(&g.dk)).max(max(&g.dv)));
    y.max(g)
}

/// The power of two that brings the largest magnitude of `x` into (1/2, 1]
/// (1 for an all-zero `x`): exact in f64, and in f32 wherever the result
/// stays a normal number. At most [`UNIT_SCALE_MAX`]: a tensor whose every
/// element is below 2⁻³² (a subnormal sprinkle over a tensor of a few
/// elements) is scaled by 2³² and stays small.
fn unit_scale(x: &[f64]) -> f64 {
    let m = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if m == 0.0 || !m.is_finite() { 1.0 } else { 2f64.powi(-(m.log2().ceil() as i32)).min(UNIT_SCALE_MAX) }
}

/// The largest factor [`unit_scale`] gives. h0 is scaled by two of them
/// (k's and v's) and dh_final by two (q's and dy's), then rounded to f32:
/// uncapped, seed 2038's case 2501 (B = L = H = V = 1, its one v element a
/// subnormal) scaled v by 2¹³⁰ and h0 past f32's range to ±inf, and every
/// f16 target "failed" on the infinite input. With 2³², h0 and dh_final
/// (drawn below 10⁶ in magnitude) stay below 10²⁶.
const UNIT_SCALE_MAX: f64 = 4294967296.0;

/// Shrinks a failing input (already in the target's precision), at most
/// `budget` evaluations, each judged like the case ([`evaluate_flushing`]).
/// Returns the smallest failing input found.
fn shrink(target: &mut Target, x: &Input, budget: usize) -> (Input, usize) {
    let d = x.p.dims;
    let kind = target.kind();
    let mut region = Region {
        b: 0..d.batch,
        t: 0..d.len,
        h: 0..d.heads,
        k: 0..d.key_dim,
        v: 0..d.value_dim,
        h0: x.p.h0.is_some(),
        // The forward does not read dh_final: nothing to shrink there.
        dh_final: kind == Kind::Grad && x.up.dh_final.is_some(),
    };
    let mut steps = 0;
    let mut evals = 0;
    'outer: while evals < budget {
        for c in candidates(&region) {
            if evals >= budget {
                break 'outer;
            }
            evals += 1;
            let sub = sub_input(x, &c);
            let Ok(expected) = Expected::new(kind, target.precision, &sub) else { continue };
            // Judged as the campaign judged the case (with the subnormal
            // allowance of a tensor-core target): a piece that fails only
            // because its subnormal inputs were read as 0 is not a failure.
            if matches!(evaluate_flushing(target, &sub, &expected).0, Outcome::Fail { .. }) {
                region = c;
                steps += 1;
                continue 'outer;
            }
        }
        break;
    }
    (sub_input(x, &region), steps)
}

// --------------------------------------------------------------- campaign --

/// A campaign's settings.
#[derive(Clone, Debug)]
pub struct FuzzConfig {
    /// Number of cases.
    pub cases: u64,
    /// Index of the first case (to replay case i: first_case = i, cases = 1).
    pub first_case: u64,
    /// The campaign seed: with a case's index and `max_len`, all that case
    /// is drawn from ([`draw_case`]).
    pub seed: u64,
    /// Longest sequence drawn.
    pub max_len: usize,
    /// Stop starting new cases after this long.
    pub time_budget: Option<Duration>,
    /// Where failing cases are written; `None` writes nothing.
    pub out_dir: Option<PathBuf>,
    /// Stop after this many disagreements (each shrunk and written); 0 is
    /// taken as 1.
    pub max_failures: usize,
    /// Evaluations the shrinker may spend per failure.
    pub shrink_budget: usize,
    /// Show a progress line on stderr (only drawn when stderr is a terminal;
    /// otherwise one line a minute).
    pub progress: bool,
    /// Every case with real gates: the drawn log_gate, h0 and dh_final with
    /// their imaginary parts set to 0 (the rest of the case as drawn), so
    /// that the targets run their real-gate kernels where they have them.
    pub real_gates: bool,
    /// Every case with V from [`WIDE_VALUE_POOL`] ([`draw_case_with`]), so
    /// the chunked CUDA targets run their 128-column launches.
    pub wide_values: bool,
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
            real_gates: false,
            wide_values: false,
        }
    }
}

/// Per-target totals.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSummary {
    /// The target's label.
    pub label: String,
    /// Forward or gradient.
    pub kind: Kind,
    /// The target's mode.
    pub mode: Mode,
    /// The precision the target computes in.
    pub precision: Precision,
    /// Where the target computes.
    pub device: Device,
    /// Cases run and judged.
    pub cases: u64,
    /// Cases skipped as too expensive for the mode (attention O(L²), scan memory).
    pub skipped: u64,
    /// Cases that failed: a score over the tolerance (or NaN), outputs of the
    /// wrong shape, or a refusal by the target or its oracle.
    pub failures: u64,
    /// Worst score / tolerance ratio seen: the largest over the passed
    /// cases, ∞ once a case has failed.
    pub worst_ratio: f64,
    /// The score of [`worst_case`](Self::worst_case); NaN for a failure that
    /// scored NaN or has no score (a refusal, outputs of the wrong shape).
    pub worst_score: f64,
    /// The tolerance of [`worst_case`](Self::worst_case).
    pub worst_tol: f64,
    /// The index of the case with the worst ratio (once a case has failed,
    /// the last failure); `None` while no case has run.
    pub worst_case: Option<u64>,
    /// Cases passed only against the oracle with subnormal inputs set to 0
    /// (tensor-core targets: [`Target::flushes_subnormal_inputs`]).
    pub flushed: u64,
    /// Seconds spent in this target.
    pub seconds: f64,
}

/// The files and commands of one written failure.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureFiles {
    /// `<stem>.input.safetensors`: the shrunk case's input in the target's
    /// precision (for a gradient target, a `gateloop grad` file).
    pub input: PathBuf,
    /// `<stem>.expected.safetensors`: the f64 oracle's outputs (or
    /// gradients) on that input.
    pub expected: PathBuf,
    /// `<stem>.actual.safetensors`: what the target produced; `None` when it
    /// produced nothing to compare (a refusal, outputs of the wrong shape).
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
    /// The failing target's label.
    pub target: String,
    /// The failing target's kind.
    pub kind: Kind,
    /// The failing target's mode.
    pub mode: Mode,
    /// The failing target's precision.
    pub precision: Precision,
    /// The failing target's device.
    pub device: Device,
    /// The failing target's kernel variant (`gateloop run --variant`).
    pub variant: Variant,
    /// The case as drawn, before shrinking.
    pub case: CaseSpec,
    /// Why the original case failed.
    pub why: String,
    /// The shrunk problem's dims.
    pub shrunk_dims: Dims,
    /// Why the shrunk case fails, or why it could not be judged again (it
    /// passed when re-run, or the oracle refused it).
    pub shrunk_why: String,
    /// Shrink steps taken, each to a smaller region on which the target
    /// still failed.
    pub shrink_steps: usize,
    /// Written files (None without an out dir, or with the write error).
    pub files: Option<Result<FailureFiles, String>>,
}

/// A campaign's result.
#[derive(Clone, Debug)]
pub struct FuzzReport {
    /// The campaign seed.
    pub seed: u64,
    /// The campaign's longest sequence (part of a case's identity).
    pub max_len: usize,
    /// Index of the first case.
    pub first_case: u64,
    /// Cases run: every target ran each of them, but the last one when the
    /// campaign stopped at [`FuzzConfig::max_failures`] in the middle of it (the targets
    /// after the failing one did not run that case).
    pub cases_run: u64,
    /// Per-target totals, in the order of the targets run.
    pub targets: Vec<TargetSummary>,
    /// The disagreements, in the order found; the campaign stops at
    /// max(`max_failures`, 1) of them.
    pub failures: Vec<FuzzFailure>,
    /// Wall time of the campaign, shrinking and writing included.
    pub elapsed: Duration,
    /// Why the campaign stopped before its last case, if it did.
    pub stopped_early: Option<String>,
    /// The cases' gates were made real ([`FuzzConfig::real_gates`]).
    pub real_gates: bool,
    /// The cases' V came from [`WIDE_VALUE_POOL`] ([`FuzzConfig::wide_values`]).
    pub wide_values: bool,
}

impl FuzzReport {
    /// No disagreement.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The summary table and, per failure, its files and replay commands.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let real_flag = format!(
            "{}{}",
            if self.real_gates { " --real-gates" } else { "" },
            if self.wide_values { " --wide-values" } else { "" }
        );
        let _ = writeln!(
            s,
            "fuzz: seed {}{}{}, cases {}..{} ({} run) in {:.1} s{}",
            self.seed,
            if self.real_gates { ", real gates" } else { "" },
            if self.wide_values { ", V > 64" } else { "" },
            self.first_case,
            self.first_case + self.cases_run,
            self.cases_run,
            self.elapsed.as_secs_f64(),
            self.stopped_early.as_ref().map(|w| format!(", stopped early: {w}")).unwrap_or_default()
        );
        // As wide as the longest label: CUDA labels carry the device's name.
        let w = self.targets.iter().map(|t| t.label.chars().count()).max().unwrap_or(0).max(28);
        let _ = writeln!(
            s,
            "{:<w$} {:>8} {:>8} {:>8} {:>11} {:>9} {:>10} {:>9}",
            "target", "cases", "skipped", "failed", "worst score", "tol", "worst case", "time (s)"
        );
        for t in &self.targets {
            let worst = if t.worst_case.is_some() { format!("{:.2e}", t.worst_score) } else { "-".into() };
            let tol = if t.worst_case.is_some() { format!("{:.1e}", t.worst_tol) } else { "-".into() };
            let case = t.worst_case.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<w$} {:>8} {:>8} {:>8} {:>11} {:>9} {:>10} {:>9.1}",
                t.label, t.cases, t.skipped, t.failures, worst, tol, case, t.seconds
            );
        }
        let _ = writeln!(
            s,
            "bound: score = max(‖out−ref‖/max(‖ref‖,‖R‖), max|out−ref|/(10·max(|ref|,R))) ≤ tol; tol f64 1e-10, f32 min(1e-3, 1e-4·max(1, √(L/4096))), bf16 and f16 the f32 tol + 2⁻⁸ and 2⁻¹¹ (outputs stored in them; f16 y, dq, dk, dv errors first reduced by its subnormal spacing 2⁻²⁴)"
        );
        let flushed: Vec<String> =
            self.targets.iter().filter(|t| t.flushed > 0).map(|t| format!("{} {}", t.label, t.flushed)).collect();
        if !flushed.is_empty() {
            let _ = writeln!(
                s,
                "passed only with subnormal inputs read as 0 (tensor-core targets; the oracle of the case with them set to 0): {}",
                flushed.join(", ")
            );
        }
        if self.targets.iter().any(|t| t.kind == Kind::Grad) {
            let _ = writeln!(
                s,
                "gradients: out, ref = dq, dk, dv, dlog_gate, dh0 vs the f64 adjoint recurrence; R = √(the same backward on q², k², v², max(|a|,N)², |h0|², dy², |dh_final|²); scales ≥ N, the smallest normal of the precision"
            );
        }
        let _ = writeln!(
            s,
            "replay case i: gateloop fuzz --seed {} --first-case i --cases 1 --max-len {}{} (with the same --targets/--modes/--dtypes/--variants)",
            self.seed, self.max_len, real_flag
        );
        for f in &self.failures {
            let _ = writeln!(s, "\nDISAGREEMENT: {} on {}", f.target, f.case);
            if f.kind == Kind::Grad {
                let _ = writeln!(s, "  {}", f.case.upstream_str());
            }
            let _ = writeln!(s, "  {}", f.why);
            let _ =
                writeln!(s, "  shrunk in {} steps to {}: {}", f.shrink_steps, dims_str(&f.shrunk_dims), f.shrunk_why);
            match &f.files {
                Some(Ok(files)) => {
                    let _ = writeln!(s, "  input:    {}", files.input.display());
                    let oracle = match f.kind {
                        Kind::Forward => "f64 recurrent reference",
                        Kind::Grad => "f64 adjoint recurrence, reference::grad",
                    };
                    let _ = writeln!(s, "  expected: {} ({oracle})", files.expected.display());
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
                "  re-run this case: gateloop fuzz --seed {} --first-case {} --cases 1 --max-len {}{} --targets {} --modes {} --dtypes {}{}",
                f.case.seed,
                f.case.index,
                self.max_len,
                real_flag,
                f.kind.name(),
                f.mode.name(),
                f.precision.name(),
                match (f.device, f.variant) {
                    (Device::Cpu, _) => String::new(),
                    (Device::Cuda, Variant::Default) => " --device cuda --variants default".into(),
                    (Device::Cuda, v) => format!(" --device cuda --variants {}", v.name()),
                }
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
    x: &Input,
    expected: &Expected,
    verdict: Option<&Verdict>,
    actual: Option<&Actual>,
) -> Result<FailureFiles, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let kind = match target.kind() {
        Kind::Forward => String::new(),
        Kind::Grad => "-grad".into(),
    };
    let variant = match target.variant {
        Variant::Default => String::new(),
        v => format!("-{}", v.name()),
    };
    let stem = format!(
        "seed{}-case{}-{}{variant}-{}-{}{kind}",
        case.seed,
        case.index,
        target.mode.name(),
        target.precision.name(),
        target.device.name()
    );
    let path = |suffix: &str| dir.join(format!("{stem}.{suffix}.safetensors"));
    let (input, expected_path, replay_output) = (path("input"), path("expected"), path("replay"));
    let e = |e: io::FileError| e.to_string();
    let (p, d) = (&x.p, &x.p.dims);
    // f32, bf16 and f16 targets' inputs and outputs are f32 values (exactly).
    let f32_target = target.precision != Precision::F64;
    let half = target.precision.half();
    // The input, in the target's precision (a bf16 file for a bf16 target,
    // which `gateloop run` replays with the bf16 kernels), and the oracle's
    // result in f64.
    match expected {
        Expected::Forward(oracle) => {
            match half {
                Some(h) => io::write_problem_half(&input, &p.to_f32().view(), h),
                None if f32_target => io::write_problem(&input, &p.to_f32().view()),
                None => io::write_problem(&input, &p.view()),
            }
            .map_err(e)?;
            io::write_outputs(&expected_path, d, &oracle.out).map_err(e)?;
        }
        Expected::Grad(oracle) => {
            if f32_target {
                let up = upstream_to_f32(&x.up);
                let up = GradInputs { dy: &up.dy, dh_final: up.dh_final.as_deref() };
                match half {
                    Some(h) => io::write_grad_problem_half(&input, &p.to_f32().view(), &up, h),
                    None => io::write_grad_problem(&input, &p.to_f32().view(), &up),
                }
                .map_err(e)?;
            } else {
                let up = GradInputs { dy: &x.up.dy, dh_final: x.up.dh_final.as_deref() };
                io::write_grad_problem(&input, &p.view(), &up).map_err(e)?;
            }
            io::write_grads(&expected_path, d, &oracle.grads).map_err(e)?;
        }
    }
    let actual = match actual {
        Some(out) => {
            let a = path("actual");
            match (out, f32_target) {
                (Actual::Forward(out), false) => io::write_outputs(&a, d, out).map_err(e)?,
                (Actual::Forward(out), true) => {
                    let o32 =
                        Outputs { y: out.y.iter().map(|&x| x as f32).collect(), h_final: narrow_complex(&out.h_final) };
                    match half {
                        Some(h) => io::write_outputs_half(&a, d, &o32, h),
                        None => io::write_outputs(&a, d, &o32),
                    }
                    .map_err(e)?
                }
                (Actual::Grad(g), false) => io::write_grads(&a, d, g).map_err(e)?,
                (Actual::Grad(g), true) => match half {
                    Some(h) => io::write_grads_half(&a, d, &narrow_grads(g), h),
                    None => io::write_grads(&a, d, &narrow_grads(g)),
                }
                .map_err(e)?,
            }
            Some(a)
        }
        None => None,
    };
    let tol = tolerance(target.precision, d.len);
    let check_rtol = verdict.map_or(tol, Verdict::check_rtol);
    let device = match (target.device, target.variant) {
        (Device::Cpu, _) => String::new(),
        (Device::Cuda, Variant::Default) => " --device cuda".into(),
        (Device::Cuda, v) => format!(" --device cuda --variant {}", v.name()),
    };
    let command = match target.kind() {
        Kind::Forward => "run",
        Kind::Grad => "grad",
    };
    let mut commands = vec![
        format!(
            "gateloop {command} --input {} --output {} --mode {}{device}",
            shell_quote(&input),
            shell_quote(&replay_output),
            target.mode.name()
        ),
        format!(
            "gateloop check {} {} --rtol {check_rtol:.3e}",
            shell_quote(&expected_path),
            shell_quote(&replay_output)
        ),
    ];
    if let Some(a) = &actual {
        commands.push(format!(
            "gateloop check {} {} --rtol {check_rtol:.3e}   # the recorded failing output",
            shell_quote(&expected_path),
            shell_quote(a)
        ));
    }
    Ok(FailureFiles { input, expected: expected_path, actual, replay_output, commands, check_rtol })
}

/// Whether `target` runs this case or skips it as too expensive.
fn affordable(target: &Target, d: &Dims) -> bool {
    if target.kind() == Kind::Grad {
        // Every backward is O(B·H·L·K·V), like the oracle's.
        return true;
    }
    let heads = d.batch.saturating_mul(d.heads);
    match target.mode {
        Mode::Attention => {
            heads.saturating_mul(d.len).saturating_mul(d.len).saturating_mul(d.key_dim + d.value_dim)
                <= MAX_ATTENTION_WORK
        }
        Mode::Scan => {
            heads.saturating_mul(d.len).saturating_mul(d.key_dim).saturating_mul(d.value_dim) <= MAX_SCAN_ELEMENTS
        }
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
            kind: t.kind(),
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
            flushed: 0,
            seconds: 0.0,
        })
        .collect();
    let mut failures = Vec::new();
    let mut progress = Progress::new(cfg.progress);
    let mut stopped_early = None;
    let mut cases_run = 0;
    // The (precision, kind) pairs some target needs an oracle for.
    let mut needed: Vec<(Precision, Kind)> = targets.iter().map(|t| (t.precision, t.kind())).collect();
    needed.sort();
    needed.dedup();
    'cases: for n in 0..cfg.cases {
        if let Some(budget) = cfg.time_budget
            && start.elapsed() >= budget
        {
            stopped_early = Some(format!("time budget of {:.0} s spent", budget.as_secs_f64()));
            break;
        }
        let index = cfg.first_case + n;
        let case = draw_case_with(cfg.seed, index, cfg.max_len, cfg.wide_values);
        let drawn = Input { p: case.problem(), up: case.upstream() };
        let drawn = if cfg.real_gates { drawn.with_real_gates() } else { drawn };
        let inputs: Vec<(Precision, Input)> = [Precision::F64, Precision::F32, Precision::Bf16, Precision::F16]
            .into_iter()
            .filter(|pr| needed.iter().any(|(p, _)| p == pr))
            .map(|pr| (pr, for_precision(&drawn, pr)))
            .collect();
        let oracles: Vec<(Precision, Kind, Result<Expected, String>)> = needed
            .iter()
            .map(|&(pr, kind)| {
                let x = &inputs.iter().find(|(p, _)| *p == pr).expect("an input per needed precision").1;
                (pr, kind, Expected::new(kind, pr, x))
            })
            .collect();
        for (t, summary) in targets.iter_mut().zip(summaries.iter_mut()) {
            if !affordable(t, &case.dims) {
                summary.skipped += 1;
                continue;
            }
            let kind = t.kind();
            let Some((_, x)) = inputs.iter().find(|(pr, _)| *pr == t.precision) else { continue };
            let Some((_, _, expected)) = oracles.iter().find(|(pr, k, _)| *pr == t.precision && *k == kind) else {
                continue;
            };
            let t0 = Instant::now();
            let outcome = match expected {
                Ok(expected) => {
                    let (outcome, flushed) = evaluate_flushing(t, x, expected);
                    summary.flushed += u64::from(flushed);
                    outcome
                }
                Err(e) => Outcome::Fail { verdict: None, actual: None, why: e.clone() },
            };
            summary.cases += 1;
            match outcome {
                Outcome::Pass(v) => {
                    let ratio = v.score() / v.tol;
                    if summary.worst_case.is_none() || ratio > summary.worst_ratio {
                        summary.worst_ratio = ratio;
                        summary.worst_score = v.score();
                        summary.worst_tol = v.tol;
                        summary.worst_case = Some(index);
                    }
                }
                Outcome::Fail { verdict, why, .. } => {
                    summary.failures += 1;
                    summary.worst_ratio = f64::INFINITY;
                    summary.worst_score = verdict.map_or(f64::NAN, |v| v.score());
                    summary.worst_tol = tolerance(t.precision, x.p.dims.len);
                    summary.worst_case = Some(index);
                    let (small, steps) = shrink(t, x, cfg.shrink_budget);
                    let (shrunk_why, files) = match Expected::new(kind, t.precision, &small) {
                        Ok(se) => match evaluate_flushing(t, &small, &se).0 {
                            Outcome::Fail { verdict, actual, why } => {
                                let files = cfg.out_dir.as_ref().map(|dir| {
                                    write_failure(dir, t, &case, &small, &se, verdict.as_ref(), actual.as_ref())
                                });
                                (why, files)
                            }
                            Outcome::Pass(_) => ("passes when re-run (nondeterministic?)".to_string(), None),
                        },
                        Err(e) => (e, None),
                    };
                    failures.push(FuzzFailure {
                        target: t.label.clone(),
                        kind,
                        mode: t.mode,
                        precision: t.precision,
                        device: t.device,
                        variant: t.variant,
                        case: case.clone(),
                        why,
                        shrunk_dims: small.p.dims,
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
        max_len: cfg.max_len,
        first_case: cfg.first_case,
        cases_run,
        targets: summaries,
        failures,
        elapsed: start.elapsed(),
        stopped_early,
        real_gates: cfg.real_gates,
        wide_values: cfg.wide_values,
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
        // bf16: f32's, plus one rounding of each output to bf16 (2⁻⁸).
        assert_eq!(tolerance(Precision::Bf16, 1), 1e-4 + 1.0 / 256.0);
        assert_eq!(Precision::parse("BF16"), Some(Precision::Bf16));
        // f16: f32's, plus one rounding of each output to f16 (2⁻¹¹).
        assert_eq!(tolerance(Precision::F16, 1), 1e-4 + 1.0 / 2048.0);
        assert_eq!(Precision::parse("f16"), Some(Precision::F16));
        assert_eq!(Precision::F16.half(), Some(HalfDtype::F16));
        assert_eq!((Precision::F32.half(), Precision::F64.half()), (None, None));
    }

    #[test]
    fn bf16_targets_see_bf16_elements_and_f32_gates() {
        let case = draw_case(5, 3, 64);
        let drawn = Input { p: case.problem(), up: case.upstream() };
        let (x32, x16) = (for_precision(&drawn, Precision::F32), for_precision(&drawn, Precision::Bf16));
        let bf16 = |v: f64| f64::from(HalfDtype::Bf16.round(v as f32));
        for (a, b) in [(&x16.p.q, &x32.p.q), (&x16.p.k, &x32.p.k), (&x16.p.v, &x32.p.v), (&x16.up.dy, &x32.up.dy)] {
            assert!(a.iter().zip(b).all(|(&a, &b)| a == bf16(b)));
        }
        assert!(x16.p.q.iter().zip(&x32.p.q).any(|(a, b)| a != b), "nothing rounded");
        assert_eq!((&x16.p.log_gate, &x16.p.h0), (&x32.p.log_gate, &x32.p.h0));
        assert_eq!(x16.up.dh_final, x32.up.dh_final);
        // Only the CUDA kernels take bf16: on the CPU it is the f32 target.
        let Err(SetupError::Empty(why)) = select(Device::Cpu, &[Kind::Forward], &Mode::ALL, &[Precision::Bf16]) else {
            panic!("bf16 on the CPU selected a target")
        };
        assert!(why.contains("computes 16-bit inputs in f32"), "{why}");
    }

    #[test]
    fn f16_targets_see_a_rescaled_problem_of_f16_elements() {
        // Cases whose q, k, v are drawn at scales f16 cannot hold (10^±3),
        // with h0 and dh_final, so every scaling is exercised; case 2 of
        // seed 2032 (its first f16 campaign) has a dv of 3e6 at unit scale.
        let (mut seen_big, mut seen_small, mut seen_shifted) = (false, false, false);
        let cases = (0..200).map(|i| draw_case(11, i, 64)).chain([draw_case(2032, 2, 256)]);
        for case in cases {
            if !case.with_h0 && case.dh_final_scale.is_none() {
                continue;
            }
            let drawn = Input { p: case.problem(), up: case.upstream() };
            let (x32, x16) = (for_precision(&drawn, Precision::F32), for_precision(&drawn, Precision::F16));
            let f16 = |v: f64| f64::from(HalfDtype::F16.round(v as f32));
            let mut factors = Vec::new();
            let mut shift = None;
            for (a, b) in [(&x16.p.q, &x32.p.q), (&x16.p.k, &x32.p.k), (&x16.p.v, &x32.p.v), (&x16.up.dy, &x32.up.dy)] {
                // f16 values, each the f32 value times one power of two,
                // rounded once: unit_scale's, times a 2^-j common to all four.
                assert!(a.iter().all(|&x| x == f16(x)));
                let max = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let j = -(max.log2().ceil());
                assert!(shift.is_none_or(|s| s == j), "one shift for all four");
                shift = Some(j);
                let s = unit_scale(b) * 2f64.powf(-j);
                assert!(a.iter().zip(b).all(|(&a, &b)| a == f16(b * s)));
                factors.push(s);
            }
            seen_shifted |= shift.unwrap() > 0.0;
            seen_big |= case.scales.iter().any(|&s| s > 100.0);
            seen_small |= case.scales.iter().any(|&s| s < 0.01);
            assert!(max_half_output(&x16) <= F16_OUTPUT_MAX * 1.01, "case {}", case.index);
            let [sq, sk, sv, sdy] = factors[..] else { unreachable!() };
            // The gates as drawn; h0 and dh_final scaled like k·v and q·dy.
            assert_eq!(x16.p.log_gate, x32.p.log_gate);
            let scaled = |a: Option<&Vec<Complex<f64>>>, b: Option<&Vec<Complex<f64>>>, s: f64| match (a, b) {
                (Some(a), Some(b)) => a.iter().zip(b).all(|(a, b)| {
                    let z = b * s;
                    a.re == z.re as f32 as f64 && a.im == z.im as f32 as f64
                }),
                (a, b) => a.is_none() && b.is_none(),
            };
            assert!(scaled(x16.p.h0.as_ref(), x32.p.h0.as_ref(), sk * sv));
            assert!(scaled(x16.up.dh_final.as_ref(), x32.up.dh_final.as_ref(), sq * sdy));
        }
        assert!(seen_shifted, "no case needed its outputs brought into f16's range");
        assert!(seen_big && seen_small, "no case drawn at scales outside f16's range");
        // f16 is a CUDA precision; the CPU's is f32.
        let Err(SetupError::Empty(why)) = select(Device::Cpu, &[Kind::Grad], &Mode::ALL, &[Precision::F16]) else {
            panic!("f16 on the CPU selected a target")
        };
        assert!(why.contains("computes 16-bit inputs in f32"), "{why}");
        assert_eq!(unit_scale(&[0.0, -0.0]), 1.0);
        assert_eq!((unit_scale(&[3.0, -4.0]), unit_scale(&[-5.0])), (0.25, 0.125));
        assert_eq!(unit_scale(&[1.0]), 1.0);
        assert_eq!(unit_scale(&[1e-40, -3e-41]), UNIT_SCALE_MAX);
    }

    #[test]
    fn f16_inputs_stay_finite_when_a_tensor_is_all_subnormal() {
        // Seed 2038, case 2501 (--max-len 1000): B = L = H = V = 1, h0 given,
        // a subnormal sprinkle that took v's one element. Its f16 input had
        // h0 = (inf, inf) before unit_scale was capped.
        let case = draw_case(2038, 2501, 1000);
        assert!(case.subnormals && case.with_h0 && case.dims.value_dim == 1, "{case:?}");
        let x = for_precision(&Input { p: case.problem(), up: case.upstream() }, Precision::F16);
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        let finite_c =
            |z: Option<&Vec<Complex<f64>>>| z.is_none_or(|z| z.iter().all(|z| z.re.is_finite() && z.im.is_finite()));
        assert!(finite(&x.p.q) && finite(&x.p.k) && finite(&x.p.v) && finite(&x.up.dy));
        assert!(finite_c(x.p.h0.as_ref()) && finite_c(x.up.dh_final.as_ref()), "{:?} {:?}", x.p.h0, x.up.dh_final);
    }

    #[test]
    fn f16_store_floor_is_for_the_stored_tensors_only() {
        // y ≈ 1e-9 and h_final ≈ 1e-6, both below f16's smallest normal 2⁻¹⁴.
        let d = Dims::new(1, 1, 1, 1, 1);
        let p = OwnedProblem {
            dims: d,
            q: vec![1e-3],
            k: vec![1e-3],
            v: vec![1e-3],
            log_gate: vec![Complex::new(-1.0, 0.0)],
            h0: Some(vec![Complex::new(1e-12, 0.0)]),
        };
        let o = Oracle::new(&p, Precision::F16).unwrap();
        let floor = underflow_floor(Precision::F16, &d);
        let stored = floor + store_floor(Precision::F16);
        let half_spacing = F16_SUBNORMAL_SPACING / 2.0;
        // y off by half a subnormal spacing of f16 (an f16 store's worst):
        // 30× y itself, forgiven by the store floor alone.
        let mut out = o.out.clone();
        out.y[0] += half_spacing;
        assert!(o.judge_with_floors(&out, 1e-4, floor, stored).pass());
        assert!(!o.judge_with_floors(&out, 1e-4, floor, floor).pass());
        // The same error in h_final, which no input type stores in f16, fails.
        let mut out = o.out.clone();
        out.h_final[0] += Complex::new(half_spacing, 0.0);
        assert!(!o.judge_with_floors(&out, 1e-4, floor, stored).pass());
        assert_eq!((store_floor(Precision::F32), store_floor(Precision::Bf16)), (0.0, 0.0));
    }

    #[test]
    fn wide_values_draw_only_v_from_the_wide_pool() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..300 {
            let (narrow, wide) = (draw_case(2053, i, 300), draw_case_with(2053, i, 300, true));
            assert_eq!(draw_case_with(2053, i, 300, false), narrow);
            let (n, w) = (narrow.dims, wide.dims);
            assert!(WIDE_VALUE_POOL.contains(&w.value_dim), "{w:?}");
            seen.insert(w.value_dim);
            // The same stream: the length and the gates as drawn, B, H, K at
            // most as drawn (the cap halves them, not V).
            assert_eq!((w.len, w.gate, wide.regime, wide.with_h0), (n.len, n.gate, narrow.regime, narrow.with_h0));
            assert!(
                w.batch <= n.batch.max(1) && w.heads <= n.heads.max(1) && w.key_dim <= n.key_dim.max(1),
                "{n:?} {w:?}"
            );
        }
        assert_eq!(seen.len(), WIDE_VALUE_POOL.len(), "every wide V drawn in 300 cases: {seen:?}");
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
        let r = Region { b: 1..2, t: 2..5, h: 0..2, k: 1..3, v: 1..2, h0: true, dh_final: false };
        let s = sub_problem(&p, &r);
        s.view().validate().unwrap();
        let d = p.dims;
        // q[b=1, t=3, h=1, k=2] is s.q[0, 1, 1, 1].
        assert_eq!(s.q[7], p.q[((d.len + 3) * d.heads + 1) * d.key_dim + 2]);
        // h0[b=0, h=1, k=1, v=0] is h0[b=1, h=1, k=2, v=1] of the original.
        assert_eq!(s.h0.as_ref().unwrap()[3], p.h0.as_ref().unwrap()[((3 + 1) * 4 + 2) * 2 + 1]);
        // dy and dh_final are cut alike: dy[b=1, t=3, h=1, v=1] is s.dy[0, 1, 1, 0];
        // dh_final[b=1, h=1, k=2, v=1] is s.dh_final[0, 1, 1, 0] (flat 3); dropped when asked.
        let case = CaseSpec { dims: d, dh_final_scale: Some(2.0), ..draw_case(1, 1, 8) };
        let x = Input { p: p.clone(), up: case.upstream() };
        let sx = sub_input(&x, &Region { dh_final: true, ..r.clone() });
        assert_eq!(sx.up.dy.len(), s.dims.v_len());
        assert_eq!(sx.up.dy[2 + 1], x.up.dy[((d.len + 3) * d.heads + 1) * d.value_dim + 1]);
        let dh = (sx.up.dh_final.as_ref().unwrap(), x.up.dh_final.as_ref().unwrap());
        assert_eq!(dh.0[3], dh.1[((d.heads + 1) * d.key_dim + 2) * d.value_dim + 1]);
        assert!(sub_input(&x, &r).up.dh_final.is_none());
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
        let o = Oracle::new(&p, Precision::F64).unwrap();
        assert_eq!(o.out.y, vec![0.0]);
        let noisy = Outputs { y: vec![15.0 * 1e-7], h_final: vec![Complex::new(15.0 * 1e-7, 0.0)] };
        assert!(o.judge(&noisy, 1e-4).pass(), "{:?}", o.judge(&noisy, 1e-4));
        let wrong = Outputs { y: vec![1.0], h_final: vec![Complex::new(0.0, 0.0)] };
        assert!(!o.judge(&wrong, 1e-4).pass());
        let nan = Outputs { y: vec![f64::NAN], h_final: vec![Complex::new(0.0, 0.0)] };
        assert!(!o.judge(&nan, 1e-4).pass());
    }
    #[test]
    fn grad_magnitudes_are_the_root_sum_square_of_the_terms() {
        // L = 2, K = V = 1: dg_1 = conj(a1 h_0)·δ_1 with h_0 = a0 h0 + k0 v0
        // and δ_1 = dh_final + q1 dy1; dh0 = conj(a0)·δ_0 with
        // δ_0 = conj(a1) δ_1 + q0 dy0.
        let (g0, g1) = (Complex::new(-0.3, 2.0), Complex::new(-0.7, -1.0));
        let (q, k, v, dy) = ([0.5, -2.0], [1.5, 0.25], [-3.0, 4.0], [0.75, -1.25]);
        let (h0, dhf) = (Complex::new(0.5, -1.5), Complex::new(2.0, 0.5));
        let p = OwnedProblem {
            dims: Dims::new(1, 2, 1, 1, 1),
            q: q.to_vec(),
            k: k.to_vec(),
            v: v.to_vec(),
            log_gate: vec![g0, g1],
            h0: Some(vec![h0]),
        };
        let up = Upstream { dy: dy.to_vec(), dh_final: Some(vec![dhf]) };
        let o = GradOracle::new(&p, &up, Precision::F64).unwrap();
        let (a0, a1) = ((2.0 * g0.re).exp(), (2.0 * g1.re).exp()); // |a|²
        let r_dg1 =
            (a1 * (a0 * h0.norm_sqr() + (k[0] * v[0]).powi(2)) * (dhf.norm_sqr() + (q[1] * dy[1]).powi(2))).sqrt();
        let r_dh0 = (a0 * (a1 * dhf.norm_sqr() + a1 * (q[1] * dy[1]).powi(2) + (q[0] * dy[0]).powi(2))).sqrt();
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y;
        assert!(close(o.r_dlog_gate[2], r_dg1) && close(o.r_dlog_gate[3], r_dg1), "{:?} vs {r_dg1}", o.r_dlog_gate);
        let r = o.r_dh0.as_ref().unwrap();
        assert!(close(r[0], r_dh0) && close(r[1], r_dh0), "{r:?} vs {r_dh0}");
        // The gradients themselves are the reference's, and judge themselves perfect.
        assert!(o.judge(&o.grads, 1e-10).score() == 0.0);
        // A subnormal-in-f32 gate's modulus is raised to the smallest normal f32
        // for an f32 target (and kept in f64).
        let mut tiny = p.clone();
        tiny.log_gate[0].re = -95.0;
        let r64 = GradOracle::new(&tiny, &up, Precision::F64).unwrap().r_dh0.unwrap()[0];
        let r32 = GradOracle::new(&tiny, &up, Precision::F32).unwrap().r_dh0.unwrap()[0];
        assert!(close(r64 / r32, (-95.0f64).exp() / f64::from(f32::MIN_POSITIVE)), "{r64} {r32}");
    }

    #[test]
    fn upstream_is_reproducible_and_dh_final_drawn_half_the_time() {
        let c = draw_case(5, 17, 64);
        let (u1, u2) = (c.upstream(), c.upstream());
        assert_eq!(u1.dy, u2.dy);
        assert_eq!(u1.dy.len(), c.dims.v_len());
        assert!(u1.dy.iter().all(|x| x.abs() <= c.dy_scale && *x != 0.0));
        let with = (0..400).filter(|&i| draw_case(5, i, 64).dh_final_scale.is_some()).count();
        assert!((140..260).contains(&with), "{with}");
        for i in 0..50 {
            let c = draw_case(5, i, 64);
            assert_eq!(c.upstream().dh_final.map(|d| d.len()), c.dh_final_scale.map(|_| c.dims.state_len()));
        }
    }

    #[test]
    fn subnormal_tensors_are_judged_against_the_smallest_normal() {
        let n = f64::from(f32::MIN_POSITIVE);
        let (reference, r) = ([1e-41, 2e-41], [1.5e-41, 2e-41]);
        // An absolute error of 5e-5·N on a tensor of ≈ 2e-41 (40% of it).
        let s = score_tensor(&[1e-41 + 5e-5 * n, 2e-41], &reference, &r, 0.0, n);
        assert!((s.e_l2 - 5e-5).abs() < 1e-12 && (s.e_max - 5e-5).abs() < 1e-12, "{s:?}");
        // Without the smallest-normal scale it would be judged relatively.
        let s = score_tensor(&[1e-41 + 5e-5 * n, 2e-41], &reference, &r, 0.0, f64::MIN_POSITIVE);
        assert!(s.e_l2 > 0.02, "{s:?}");
    }
}
