//! Which implementation computes each [`Mode`], per device and precision: the
//! one table that `gateloop run`, `gateloop demo` and `gateloop fuzz` share.
//!
//! | mode | cpu f64 | cpu f32 | cuda f32 |
//! |---|---|---|---|
//! | recurrent | [`reference::recurrent`] (the oracle) | [`reference::recurrent`] in f32 | [`cuda::recurrent`] |
//! | scan | [`reference::scan`] | [`cpu::scan`] (the kernel's mirror) | [`cuda::scan`] |
//! | attention | [`reference::attention`] | [`cpu::attention`] (the kernel's mirror) | [`cuda::attention`] |
//! | chunked | — (f32 only) | [`cpu::chunked`] (the kernel's mirror) | [`cuda::chunk`] (tensor cores, exact precision) |
//!
//! Gradients ([`cpu_grad`], [`cpu_grad_f32`], [`cuda_grad`]):
//!
//! | mode | cpu f64 | cpu f32 | cuda f32 |
//! |---|---|---|---|
//! | recurrent | [`reference::grad`] (the oracle) | [`reference::grad`] in f32 | [`cuda::recurrent_grad`] |
//! | attention | [`reference::grad`] | [`reference::grad`] in f32 | — |
//! | scan | [`reference::grad`] | [`cpu::scan_grad`] (the scan backward kernel's mirror) | [`cuda::scan_grad`] |
//! | chunked | [`reference::grad`] | [`cpu::chunked_grad`] (the chunked backward) | [`cuda::chunk_grad`] (its kernel twin) |
//!
//! The CUDA columns take q, k, v (and dy) in f32, f16 or bf16 ([`cuda_as`],
//! [`cuda_grad_as`]). On CUDA, chunked runs the real-gate kernels (gated
//! linear attention: half the products) when the gates are real: every
//! Im log_gate and Im h0 exactly 0, and for the backward every Im dh_final
//! too ([`real_gates`]). At such inputs their results are the complex
//! kernels' (Im h_final, Im dlog_gate and Im dh0 are 0), to the same bounds.
//!
//! A CUDA mode may also run a kernel [`Variant`] (the chunked sequential
//! carry or register-fragment output, the recurrent ahead or batched
//! staging or four rows a thread:
//! [`cuda_variant_as`], [`cuda_grad_variant_as`]), the same function to the
//! same bounds; `run --variant`, `grad --variant` and `fuzz` take them.

use crate::cpu::attention::AttentionParams;
use crate::cpu::chunked::ChunkParams;
use crate::cpu::scan::ScanParams;
use crate::cuda::chunk::ChunkPrecision;
use crate::cuda::{self, Element, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Outputs, Problem, Real};
use crate::reference::grad::Grads;
use crate::reference::{self, RefMode};
use crate::{Mode, cpu};

/// The SM count whose launch geometry the CPU mirrors follow (an H200's).
pub const MIRROR_SM_COUNT: usize = 132;

/// Modes with an f64 implementation (the reference).
pub const CPU_F64_MODES: [Mode; 3] = [Mode::Recurrent, Mode::Scan, Mode::Attention];
/// Modes with a CUDA kernel.
pub const CUDA_MODES: [Mode; 4] = [Mode::Recurrent, Mode::Scan, Mode::Attention, Mode::Chunked];

fn unavailable(mode: Mode, why: &'static str, available: &[Mode]) -> InputError {
    let names: Vec<&str> = available.iter().map(|m| m.name()).collect();
    InputError::Param { name: "mode", value: format!("{} (available: {})", mode.name(), names.join(", ")), why }
}

/// The recurrence's grid, B·H·⌈V/32⌉ blocks, from which [`fastest_cuda_mode`]
/// takes it over the chunked kernel. Measured on an H200 (2026-11-30,
/// benches/results/gpu-2026-11-30-nvidia-h200/): the recurrence costs
/// about 0.55 µs per step at K = 64 (0.6 to 1.3 at K = 128) whatever its
/// grid up to ~2 blocks per SM (it waits on each step's latency, not on the
/// GPU's width),
/// the chunked forward about 19 ns per (b, h, step) once its grid fills the
/// GPU, so the recurrence wins from B·H ≈ 30 (K = V = 64). Seen: at 128
/// blocks (B8 L1024 H8) the recurrence took 0.549 ms against the chunked
/// kernel's 1.08 (f32) and 0.73 (bf16); at 256 to 384 blocks 2.3 to 4×
/// faster; at 8 blocks (B1 L65536 H4) 33.5 ms against 5.7.
pub const RECURRENT_MIN_BLOCKS: usize = 64;

/// The fastest CUDA forward for `dims`, as measured: the recurrence when its
/// plan's grid has at least [`RECURRENT_MIN_BLOCKS`] blocks (and it has a
/// plan: K fits its registers), else the chunked kernel (faster than the
/// scan and the O(L²) attention at every shape measured). `gateloop run
/// --mode auto`.
pub fn fastest_cuda_mode(dims: &crate::Dims) -> Mode {
    match cuda::recurrent::plan(dims) {
        Ok(lp) if lp.grid as usize >= RECURRENT_MIN_BLOCKS => Mode::Recurrent,
        _ => Mode::Chunked,
    }
}

/// A CUDA kernel variant of a mode: the launch choices beside each mode's
/// default ([`cuda::chunk::ChunkConfig`]'s carry and output,
/// [`cuda::recurrent::RecurrentConfig`]'s staging and rows, the recurrence's
/// packed launch) that compute the same function to
/// the same bounds, so `run`, `grad` and `fuzz` can each take one and every
/// one is fuzzed against the reference, not only the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// What the mode runs unless told otherwise (chunked: the automatic
    /// carry, the staged output; recurrent: the automatic staging).
    #[default]
    Default,
    /// Chunked, forward and backward: the sequential carry forced
    /// ([`cuda::chunk::ChunkCarry::Sequential`]: `state_seq`, and in the
    /// backward `grad_w_seq`), which the automatic carry takes only from
    /// [`cuda::chunk::SEQUENTIAL_MIN_BLOCKS`] key slabs of 16 on, for real
    /// gates and 16-bit inputs.
    Sequential,
    /// Chunked forward, f16 and bf16 inputs: the register-fragment output
    /// launch ([`cuda::chunk::ChunkOutput::Fragments`]).
    Fragments,
    /// Recurrent forward: the ahead staging forced
    /// ([`cuda::recurrent::RecurrentStaging::Ahead`]).
    Ahead,
    /// Recurrent forward: the batched staging forced
    /// ([`cuda::recurrent::RecurrentStaging::Batched`]), which the automatic
    /// staging takes only where Ahead would need more rounds of the SMs.
    Batched,
    /// Recurrent forward: four state rows a thread, twice the warps a block
    /// at K = 64 ([`cuda::recurrent::RecurrentRows::Four`]).
    Rows4,
    /// Recurrent and chunked forward and backward through the packed
    /// launches: the B batch rows as B packed sequences in one row
    /// ([`cuda::recurrent::forward_packed_host_as`], `forward_varlen_into`'s
    /// path; [`cuda::recurrent_grad::backward_packed_host_as`],
    /// `backward_varlen_into`'s; [`cuda::chunk::forward_packed_host_as`],
    /// [`cuda::chunk_grad::backward_packed_host_as`]), the batched launches'
    /// answers bit for bit.
    Packed,
    /// Chunked backward: the forward run first, saving its chunk states,
    /// and the backward reading them instead of recomputing them
    /// ([`cuda::chunk_grad::backward_saved_host_as`]: `forward_saving_into`
    /// then `backward_saved_into`), the default's gradients bit for bit.
    Saved,
}

impl Variant {
    /// Every variant, the default first.
    pub const ALL: [Variant; 8] = [
        Variant::Default,
        Variant::Sequential,
        Variant::Fragments,
        Variant::Ahead,
        Variant::Batched,
        Variant::Rows4,
        Variant::Packed,
        Variant::Saved,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Default => "default",
            Variant::Sequential => "sequential",
            Variant::Fragments => "fragments",
            Variant::Ahead => "ahead",
            Variant::Batched => "batched",
            Variant::Rows4 => "rows4",
            Variant::Packed => "packed",
            Variant::Saved => "saved",
        }
    }

    /// The variant named `s` (as [`Variant::name`] spells it).
    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Whether this variant exists for `mode`'s CUDA forward (`grad` false)
    /// or backward (`grad` true) in `dtype`. [`Variant::Default`] exists
    /// wherever the mode has a kernel.
    pub fn applies(self, mode: Mode, dtype: cuda::Dtype, grad: bool) -> bool {
        match self {
            Variant::Default => true,
            Variant::Sequential => mode == Mode::Chunked,
            Variant::Fragments => mode == Mode::Chunked && !grad && dtype != cuda::Dtype::F32,
            Variant::Ahead | Variant::Batched | Variant::Rows4 => mode == Mode::Recurrent && !grad,
            Variant::Packed => mode == Mode::Recurrent || mode == Mode::Chunked,
            Variant::Saved => mode == Mode::Chunked && grad,
        }
    }

    /// The typed error for a variant that does not exist where it was asked for.
    pub fn unavailable(self, mode: Mode, dtype: cuda::Dtype, grad: bool) -> InputError {
        let what = if grad { "backward" } else { "forward" };
        let names: Vec<&str> = Variant::ALL.iter().filter(|v| v.applies(mode, dtype, grad)).map(|v| v.name()).collect();
        InputError::Param {
            name: "variant",
            value: format!(
                "{} for the {} {what} in {dtype} (available: {})",
                self.name(),
                mode.name(),
                names.join(", ")
            ),
            why: "sequential is chunked's (forward and backward), fragments the chunked forward's for f16/bf16, ahead, batched and rows4 the recurrent forward's, packed the recurrent and chunked forward's and backward's, saved the chunked backward's",
        }
    }

    /// The chunked kernels' configuration this variant asks for (exact products).
    fn chunk_config(self) -> cuda::chunk::ChunkConfig {
        use cuda::chunk::{ChunkCarry, ChunkConfig, ChunkOutput};
        match self {
            Variant::Sequential => ChunkConfig { carry: ChunkCarry::Sequential, ..ChunkConfig::default() },
            Variant::Fragments => ChunkConfig { output: ChunkOutput::Fragments, ..ChunkConfig::default() },
            Variant::Default
            | Variant::Ahead
            | Variant::Batched
            | Variant::Rows4
            | Variant::Packed
            | Variant::Saved => ChunkConfig::default(),
        }
    }

    /// The recurrent kernel's configuration this variant asks for.
    fn recurrent_config(self) -> cuda::recurrent::RecurrentConfig {
        use cuda::recurrent::{RecurrentConfig, RecurrentRows, RecurrentStaging};
        match self {
            Variant::Ahead => RecurrentStaging::Ahead.into(),
            Variant::Batched => RecurrentStaging::Batched.into(),
            Variant::Rows4 => RecurrentRows::Four.into(),
            Variant::Default | Variant::Sequential | Variant::Fragments | Variant::Packed | Variant::Saved => {
                RecurrentConfig::default()
            }
        }
    }
}

/// Modes with a CUDA backward.
pub const CUDA_GRAD_MODES: [Mode; 3] = [Mode::Recurrent, Mode::Scan, Mode::Chunked];

/// The error `grad --device cuda` gives for a mode without a backward kernel.
pub fn cuda_grad_unavailable(mode: Mode) -> InputError {
    unavailable(mode, "no CUDA backward for this mode yet", &CUDA_GRAD_MODES)
}

/// The error `run --device cuda` gives for a mode without a kernel.
pub fn cuda_unavailable(mode: Mode) -> InputError {
    unavailable(mode, "no CUDA kernel for this mode yet", &CUDA_MODES)
}

/// The f64 reference of `mode` on the CPU.
pub fn cpu_f64(mode: Mode, p: &Problem<'_, f64>) -> Result<Outputs<f64>, InputError> {
    let m = match mode {
        Mode::Recurrent => RefMode::Recurrent,
        Mode::Scan => RefMode::Scan,
        Mode::Attention => RefMode::Attention,
        Mode::Chunked => {
            return Err(unavailable(
                mode,
                "chunked is the f32 fast path; f64 runs the reference modes",
                &CPU_F64_MODES,
            ));
        }
    };
    reference::forward(m, p)
}

/// The f32 implementation of `mode` on the CPU (default parameters).
pub fn cpu_f32(mode: Mode, p: &Problem<'_, f32>) -> Result<Outputs<f32>, InputError> {
    match mode {
        Mode::Recurrent => reference::recurrent::forward(p),
        Mode::Scan => {
            // The geometry the kernel runs for these dims (the warps per block
            // follow L), so the mirror does the kernel's arithmetic, and short
            // problems are not padded to 1024-step chunks.
            let params: ScanParams = cuda::scan::plan(&p.dims, MIRROR_SM_COUNT)?.scan_params();
            cpu::scan::forward(p, &params)
        }
        Mode::Attention => cpu::attention::forward(p, &AttentionParams::default()),
        Mode::Chunked => cpu::chunked::forward(p, &ChunkParams::default()),
    }
}

/// The CUDA kernel of `mode`, from host buffers (uploads, runs, downloads).
pub fn cuda_f32(gpu: &Gpu, mode: Mode, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    cuda_as::<f32>(gpu, mode, p)
}

/// Whether the gates are real: every Im log_gate, Im h0 and Im dh_final
/// (those given) exactly 0, so the real-gate recurrent and chunked kernels
/// compute the same function.
pub fn real_gates(p: &Problem<'_, f32>, dh_final: Option<&[num_complex::Complex<f32>]>) -> bool {
    real_gates_with(p, p.h0, dh_final)
}

/// [`real_gates`] with the initial states `h0` (packed sequences' `[N, H,
/// K, V]`; `p`'s own h0 is then absent).
fn real_gates_with(
    p: &Problem<'_, f32>,
    h0: Option<&[num_complex::Complex<f32>]>,
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> bool {
    let real = |z: &[num_complex::Complex<f32>]| z.iter().all(|z| z.im == 0.0);
    real(p.log_gate) && h0.is_none_or(real) && dh_final.is_none_or(real)
}

/// The kernels' gates: real ([`cuda::chunk::Gates::Real`]) when `real`.
fn gates(real: bool) -> cuda::chunk::Gates {
    if real { cuda::chunk::Gates::Real } else { cuda::chunk::Gates::Complex }
}

/// The checks every CUDA backward entry makes: the mode has a backward
/// kernel and `variant` exists for it in `T`.
fn check_grad_variant<T: Element>(mode: Mode, variant: Variant) -> Result<(), GpuError> {
    if mode == Mode::Attention {
        return Err(cuda_grad_unavailable(mode).into());
    }
    if !variant.applies(mode, T::DTYPE, true) {
        return Err(variant.unavailable(mode, T::DTYPE, true).into());
    }
    Ok(())
}

/// [`cuda_f32`] with q, k, v in `T` (rounded on the host: exact for values
/// read from a file of that dtype) and y computed in `T`, widened back to
/// f32 exactly; log_gate and h0 stay f32. The chunked kernels run their
/// default [`cuda::chunk::ChunkConfig`] (exact products); the recurrent and
/// chunked modes run their real-gate kernels when [`real_gates`].
pub fn cuda_as<T: Element>(gpu: &Gpu, mode: Mode, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    cuda_variant_as::<T>(gpu, mode, Variant::Default, p)
}

/// [`cuda_as`] with a kernel [`Variant`] (a typed error where it does not
/// apply: [`Variant::applies`]).
pub fn cuda_variant_as<T: Element>(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    p: &Problem<'_, f32>,
) -> Result<Outputs<f32>, GpuError> {
    if !variant.applies(mode, T::DTYPE, false) {
        return Err(variant.unavailable(mode, T::DTYPE, false).into());
    }
    let config = variant.chunk_config();
    match mode {
        Mode::Recurrent if variant == Variant::Packed => {
            cuda::recurrent::forward_packed_host_as::<T>(gpu, p, variant.recurrent_config(), gates(real_gates(p, None)))
        }
        Mode::Recurrent if real_gates(p, None) => {
            cuda::recurrent::forward_real_host_as::<T>(gpu, p, variant.recurrent_config())
        }
        Mode::Recurrent => cuda::recurrent::forward_host_with::<T>(gpu, p, variant.recurrent_config()),
        Mode::Scan => cuda::scan::forward_host_as::<T>(gpu, p),
        Mode::Attention => cuda::attention::forward_host_as::<T>(gpu, p),
        Mode::Chunked if variant == Variant::Packed => {
            cuda::chunk::forward_packed_host_as::<T>(gpu, p, config, gates(real_gates(p, None)))
        }
        Mode::Chunked if real_gates(p, None) => cuda::chunk::forward_real_host_as::<T>(gpu, p, config),
        Mode::Chunked => cuda::chunk::forward_host_as::<T>(gpu, p, config),
    }
}

/// [`cuda_variant_as`] in the element type of a runtime [`cuda::Dtype`] (a
/// file's, a fuzz target's; [`Variant::Default`] for the mode's default).
pub fn cuda_variant_in(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    dtype: cuda::Dtype,
    p: &Problem<'_, f32>,
) -> Result<Outputs<f32>, GpuError> {
    crate::with_element!(dtype, T => cuda_variant_as::<T>(gpu, mode, variant, p))
}

/// Packed sequences each from its own state ([`crate::packing::forward_varlen`]'s
/// contract: `p` `[1, L, H, *]` without h0, offsets `cu_seqlens`, `h0`
/// `[N, H, K, V]`; y `[1, L, H, V]`, h_final `[N, H, K, V]`) on the GPU with
/// `mode`'s kernel in `T`: the recurrent mode in one launch
/// ([`cuda::recurrent::forward_varlen_host_as`], real-gate kernel when the
/// gates and states are real), the chunked mode in one launch of each of its
/// kernels ([`cuda::chunk::forward_varlen_host_as`]; its `sequential`
/// variant, whose walking kernel runs batched problems only, one run per
/// sequence), the others one host run per sequence ([`cuda_variant_as`] on
/// each). The same answer either way: the recurrent and chunked kernels
/// compute a packed sequence bit for bit as they compute it alone.
pub fn cuda_varlen_as<T: Element>(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[num_complex::Complex<f32>]>,
) -> Result<Outputs<f32>, GpuError> {
    if !variant.applies(mode, T::DTYPE, false) {
        return Err(variant.unavailable(mode, T::DTYPE, false).into());
    }
    match mode {
        Mode::Recurrent => {
            let gates = gates(real_gates_with(p, h0, None));
            cuda::recurrent::forward_varlen_host_as::<T>(gpu, p, cu_seqlens, h0, variant.recurrent_config(), gates)
        }
        Mode::Chunked if variant != Variant::Sequential => {
            let gates = gates(real_gates_with(p, h0, None));
            cuda::chunk::forward_varlen_host_as::<T>(gpu, p, cu_seqlens, h0, variant.chunk_config(), gates)
        }
        _ => crate::packing::forward_varlen(p, cu_seqlens, h0, |s| cuda_variant_as::<T>(gpu, mode, variant, s)),
    }
}

/// [`cuda_varlen_as`] in the element type of a runtime [`cuda::Dtype`].
pub fn cuda_varlen_in(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    dtype: cuda::Dtype,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[num_complex::Complex<f32>]>,
) -> Result<Outputs<f32>, GpuError> {
    crate::with_element!(dtype, T => cuda_varlen_as::<T>(gpu, mode, variant, p, cu_seqlens, h0))
}

/// The gradient on the CPU, in `T`'s precision, of the function every mode
/// computes: the adjoint recurrence ([`reference::grad::backward`]), for
/// every mode (f64 has no chunked path; in f32 [`cpu_grad_f32`] runs the
/// modes' own backward where one exists). `mode` is taken so that callers
/// name what they differentiate.
pub fn cpu_grad<T: Real>(
    _mode: Mode,
    p: &Problem<'_, T>,
    dy: &[T],
    dh_final: Option<&[num_complex::Complex<T>]>,
) -> Result<Grads<T>, InputError> {
    reference::grad::backward(p, dy, dh_final)
}

/// The f32 gradient on the CPU of `mode`: the chunked backward
/// ([`cpu::chunked_grad`], default [`ChunkParams`]) for [`Mode::Chunked`],
/// the scan backward kernel's mirror ([`cpu::scan_grad`], the kernel's
/// geometry) for [`Mode::Scan`], the adjoint recurrence in f32
/// ([`cpu_grad`]) for the other modes.
pub fn cpu_grad_f32(
    mode: Mode,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, InputError> {
    match mode {
        Mode::Chunked => cpu::chunked_grad::backward(p, dy, dh_final, &ChunkParams::default()),
        Mode::Scan => {
            // The geometry the backward kernel runs for these dims.
            let params = cuda::scan_grad::plan(&p.dims, MIRROR_SM_COUNT)?.grad_params();
            cpu::scan_grad::backward(p, dy, dh_final, &params)
        }
        Mode::Recurrent | Mode::Attention => cpu_grad(mode, p, dy, dh_final),
    }
}

/// The CUDA backward of `mode` from host buffers (uploads, runs, downloads):
/// the chunked backward ([`cuda::chunk_grad`], f32, exact) for
/// [`Mode::Chunked`], the recurrent one ([`cuda::recurrent_grad`], K ≤ 128)
/// for [`Mode::Recurrent`], the scan's for [`Mode::Scan`]; a typed error ([`cuda_grad_unavailable`]) for the
/// modes without a backward kernel. `dh0` is `Some` exactly when `p.h0` is.
pub fn cuda_grad(
    gpu: &Gpu,
    mode: Mode,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    cuda_grad_as::<f32>(gpu, mode, p, dy, dh_final)
}

/// [`cuda_grad`] with q, k, v and dy in `T` (rounded on the host: exact for
/// values read from a file of that dtype), dq, dk, dv computed in `T` and
/// widened back to f32 exactly; log_gate, h0, dh_final, dlog_gate and dh0
/// in f32. Chunked and recurrent run the real-gate backward when
/// [`real_gates`] (with dh_final: an imaginary dh_final makes ∂L/∂Im g
/// nonzero even for real gates, which only the complex backward computes).
pub fn cuda_grad_as<T: Element>(
    gpu: &Gpu,
    mode: Mode,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    cuda_grad_variant_as::<T>(gpu, mode, Variant::Default, p, dy, dh_final)
}

/// [`cuda_grad_as`] with a kernel [`Variant`] (a typed error where it does
/// not apply: [`Variant::applies`]).
pub fn cuda_grad_variant_as<T: Element>(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    check_grad_variant::<T>(mode, variant)?;
    let config = cuda::chunk::ChunkConfig { precision: ChunkPrecision::Exact, ..variant.chunk_config() };
    match mode {
        Mode::Recurrent if variant == Variant::Packed => {
            cuda::recurrent_grad::backward_packed_host_as::<T>(gpu, p, dy, dh_final, gates(real_gates(p, dh_final)))
        }
        Mode::Recurrent if real_gates(p, dh_final) => {
            cuda::recurrent_grad::backward_real_host_as::<T>(gpu, p, dy, dh_final)
        }
        Mode::Recurrent => cuda::recurrent_grad::backward_host_as::<T>(gpu, p, dy, dh_final),
        Mode::Scan => cuda::scan_grad::backward_host_as::<T>(gpu, p, dy, dh_final),
        Mode::Chunked if variant == Variant::Packed => {
            cuda::chunk_grad::backward_packed_host_as::<T>(gpu, p, dy, dh_final, config, gates(real_gates(p, dh_final)))
        }
        Mode::Chunked if variant == Variant::Saved => {
            cuda::chunk_grad::backward_saved_host_as::<T>(gpu, p, dy, dh_final, config, gates(real_gates(p, dh_final)))
        }
        Mode::Chunked if real_gates(p, dh_final) => {
            cuda::chunk_grad::backward_real_host_as::<T>(gpu, p, dy, dh_final, config)
        }
        Mode::Chunked => cuda::chunk_grad::backward_host_as::<T>(gpu, p, dy, dh_final, config),
        Mode::Attention => Err(cuda_grad_unavailable(mode).into()),
    }
}

/// The gradients of packed sequences each from its own state
/// ([`crate::packing::backward_varlen`]'s contract: `p` `[1, L, H, *]`
/// without h0, `h0` and `dh_final` `[N, H, K, V]`; dh0 `[N, H, K, V]`) on
/// the GPU with `mode`'s backward in `T`: the recurrent mode in one launch
/// of each kernel ([`cuda::recurrent_grad::backward_varlen_host_as`], the
/// real-gate kernels when gates, states and dh_final are real), the chunked
/// mode too ([`cuda::chunk_grad::backward_varlen_host_as`], exact products;
/// its `sequential` variant, whose walking kernels run batched problems
/// only, one run per sequence), the others one host run per sequence
/// ([`cuda_grad_variant_as`] on each). The same gradients either way: the
/// recurrent and chunked backwards compute a packed sequence bit for bit as
/// they compute it alone.
#[allow(clippy::too_many_arguments)]
pub fn cuda_grad_varlen_as<T: Element>(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[num_complex::Complex<f32>]>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    check_grad_variant::<T>(mode, variant)?;
    match mode {
        Mode::Recurrent => {
            let gates = gates(real_gates_with(p, h0, dh_final));
            cuda::recurrent_grad::backward_varlen_host_as::<T>(gpu, p, cu_seqlens, h0, dy, dh_final, gates)
        }
        // (Sequential and Saved: one run per sequence, below.)
        Mode::Chunked if variant != Variant::Sequential && variant != Variant::Saved => {
            let gates = gates(real_gates_with(p, h0, dh_final));
            let config = cuda::chunk::ChunkConfig { precision: ChunkPrecision::Exact, ..variant.chunk_config() };
            cuda::chunk_grad::backward_varlen_host_as::<T>(gpu, p, cu_seqlens, h0, dy, dh_final, config, gates)
        }
        _ => crate::packing::backward_varlen(p, cu_seqlens, h0, dy, dh_final, |s, dy, dh| {
            cuda_grad_variant_as::<T>(gpu, mode, variant, s, dy, dh)
        }),
    }
}

/// [`cuda_grad_varlen_as`] in the element type of a runtime [`cuda::Dtype`].
#[allow(clippy::too_many_arguments)]
pub fn cuda_grad_varlen_in(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    dtype: cuda::Dtype,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[num_complex::Complex<f32>]>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    crate::with_element!(dtype, T => cuda_grad_varlen_as::<T>(gpu, mode, variant, p, cu_seqlens, h0, dy, dh_final))
}

/// [`cuda_grad_variant_as`] in the element type of a runtime [`cuda::Dtype`]
/// ([`Variant::Default`] for the mode's default).
pub fn cuda_grad_variant_in(
    gpu: &Gpu,
    mode: Mode,
    variant: Variant,
    dtype: cuda::Dtype,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[num_complex::Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    crate::with_element!(dtype, T => cuda_grad_variant_as::<T>(gpu, mode, variant, p, dy, dh_final))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    /// Where each kernel variant exists: sequential for chunked forward and
    /// backward in every dtype, fragments for the chunked forward in 16 bits,
    /// ahead and rows4 for the recurrent forward, packed for the recurrent
    /// and chunked forward and backward, saved for the chunked backward;
    /// names round-trip.
    #[test]
    fn variants_exist_where_their_kernels_do() {
        use cuda::Dtype;
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.name()), Some(v));
            for m in crate::Mode::ALL {
                for t in Dtype::ALL {
                    for grad in [false, true] {
                        let want = match v {
                            Variant::Default => true,
                            Variant::Sequential => m == Mode::Chunked,
                            Variant::Fragments => m == Mode::Chunked && !grad && t != Dtype::F32,
                            Variant::Ahead | Variant::Batched | Variant::Rows4 => m == Mode::Recurrent && !grad,
                            Variant::Packed => m == Mode::Recurrent || m == Mode::Chunked,
                            Variant::Saved => m == Mode::Chunked && grad,
                        };
                        assert_eq!(v.applies(m, t, grad), want, "{} {} {t} grad={grad}", v.name(), m.name());
                    }
                }
            }
        }
        assert_eq!(Variant::parse("staged"), None);
        let e = Variant::Fragments.unavailable(Mode::Chunked, Dtype::F32, false).to_string();
        assert!(e.contains("fragments for the chunked forward in f32 (available: default, sequential, packed)"), "{e}");
    }

    /// Real gates: every Im of log_gate, h0 and dh_final (those given) is 0
    /// (−0 too); one imaginary part anywhere makes them complex.
    #[test]
    fn real_gates_are_exactly_real() {
        use num_complex::Complex;
        let d = dims(1, 3, 1, 2, 1, false);
        let (q, v) = (vec![1.0f32; 6], vec![1.0f32; 3]);
        let mut gate = vec![Complex::new(-0.5f32, 0.0); 6];
        gate[1].im = -0.0;
        let mut h0 = vec![Complex::new(1.0f32, 0.0); 2];
        let p = |gate: &[Complex<f32>], h0: &[Complex<f32>]| -> bool {
            let p = Problem { dims: d, q: &q, k: &q, v: &v, log_gate: gate, h0: Some(h0) };
            real_gates(&p, None)
        };
        assert!(p(&gate, &h0));
        h0[1].im = 1e-30;
        assert!(!p(&gate, &h0));
        h0[1].im = 0.0;
        gate[5].im = 1e-7;
        assert!(!p(&gate, &h0));
        gate[5].im = 0.0;
        let pr = Problem { dims: d, q: &q, k: &q, v: &v, log_gate: &gate, h0: None };
        assert!(real_gates(&pr, Some(&[Complex::new(2.0, 0.0); 2])));
        assert!(!real_gates(&pr, Some(&[Complex::new(2.0, 0.5); 2])));
    }

    /// The measured shapes land where the H200 put them (RECURRENT_MIN_BLOCKS).
    #[test]
    fn fastest_cuda_mode_follows_the_measurements() {
        // The recurrence won: 128 blocks (B8 L1024 H8), 256 (B8 L4096 H16), 384 (B1 L8192 H96 K=V=128).
        assert_eq!(fastest_cuda_mode(&dims(8, 1024, 8, 64, 64, false)), Mode::Recurrent);
        assert_eq!(fastest_cuda_mode(&dims(8, 4096, 16, 64, 64, false)), Mode::Recurrent);
        assert_eq!(fastest_cuda_mode(&dims(1, 8192, 96, 128, 128, false)), Mode::Recurrent);
        // The chunked kernel won: 8 blocks (B1 L65536 H4).
        assert_eq!(fastest_cuda_mode(&dims(1, 65536, 4, 64, 64, false)), Mode::Chunked);
        // The threshold, and a key dimension the recurrence cannot hold.
        assert_eq!(fastest_cuda_mode(&dims(1, 100, 32, 8, 64, true)), Mode::Recurrent);
        assert_eq!(fastest_cuda_mode(&dims(1, 100, 31, 8, 64, true)), Mode::Chunked);
        assert_eq!(fastest_cuda_mode(&dims(64, 100, 1, 512, 64, false)), Mode::Chunked);
    }
}
