//! The `gateloop` command line: run the operator on a safetensors file,
//! demo every mode on a random problem, compare two result files.
//!
//! Exit codes: 0 success, 1 a runtime failure (or `check` finding a
//! difference), 2 bad input or usage. Errors are printed as `error: ...`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

/// `println!` that ignores a closed stdout (`gateloop demo | head`) instead
/// of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use gateloop::io::{self, FileError, LoadedProblem, Packing};
use gateloop::reference::{self, RefMode};
use gateloop::testing::{GateRegime, OwnedProblem, random_problem};
use gateloop::{Dims, Mode, Outputs, compare, compare_complex, cuda, dispatch, fuzz};

#[derive(Parser)]
#[command(name = "gateloop", version, about = "GateLoop (Katsch 2023): fully data-controlled linear recurrence")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator on an input file and write `y` and `h_final`.
    ///
    /// Exit 2 on bad input or usage, 1 on a runtime failure.
    ///
    /// The input holds q, k [B,L,H,K], v [B,L,H,V], log_gate [B,L,H,K,2] or
    /// [B,L,H,1,2], optional h0 [B,H,K,V,2], in F32, F64, F16 or BF16
    /// (log_gate and h0 may be F32 beside 16-bit q, k, v); q's dtype picks
    /// the precision (and the output's dtype). An optional `cu_seqlens`
    /// [N+1] (I64 or I32) packs N sequences into one batch row (B = 1),
    /// each computed alone from its own state (fla's cu_seqlens): h0 and
    /// the written h_final are then [N,H,K,V,2] (grad: dh_final, dh0 too).
    Run {
        /// Input safetensors file.
        #[arg(long, short)]
        input: PathBuf,
        /// Output safetensors file (y, h_final).
        #[arg(long, short)]
        output: PathBuf,
        /// How to compute (chunked is the f32 fast path; auto: the fastest
        /// as measured, per device, precision and shape).
        #[arg(long, short, value_enum, default_value_t = CliMode::Chunked)]
        mode: CliMode,
        /// Where to compute (cuda: the mode's CUDA kernel, F32, F16 or BF16
        /// inputs).
        #[arg(long, short, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Compute this many times and report the median time (the output is
        /// written once). For timing; file I/O is never timed.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// The CUDA kernel variant (cuda only): sequential (chunked: the
        /// sequential carry), fragments (chunked, F16/BF16: the
        /// register-fragment output launch), ahead and batched (recurrent:
        /// the ahead or batched staging forced), rows4 (recurrent: four state rows a thread), packed
        /// (recurrent, chunked: the B rows as packed sequences, the
        /// cu_seqlens launches). Same function, same bounds as the default.
        #[arg(long, value_parser = parse_variant, default_value = "default")]
        variant: dispatch::Variant,
    },
    /// Gradients of the operator for an input file with upstream gradients.
    ///
    /// The input is a `run` input plus `dy` [B,L,H,V] and optional `dh_final`
    /// [B,H,K,V,2]; the output holds `dq`, `dk`, `dv`, `dlog_gate` (trailing
    /// 2) and, when h0 was given, `dh0` (trailing 2), the gradients of
    /// L = Σ dy·y + Σ (Re dh_final·Re h_final + Im dh_final·Im h_final) with
    /// respect to each input's real view. The dtype picks the precision. On
    /// the CPU every mode runs the adjoint recurrence (the exact gradient of
    /// all modes), except `--mode chunked` on f32 input, which runs the
    /// chunked f32 backward; `--device cuda` runs the mode's CUDA backward
    /// (recurrent, scan, chunked; F32, F16 or BF16 input); exit 2 on bad
    /// input or usage, 1 on a runtime failure.
    Grad {
        /// Input safetensors file (forward tensors, dy, optional dh_final).
        #[arg(long, short)]
        input: PathBuf,
        /// Output safetensors file (dq, dk, dv, dlog_gate, dh0).
        #[arg(long, short)]
        output: PathBuf,
        /// The forward mode whose gradient is asked (all modes compute the
        /// same function; the CPU backward is the adjoint recurrence, or the
        /// chunked backward for chunked on f32 input).
        #[arg(long, short, value_enum, default_value_t = CliMode::Recurrent)]
        mode: CliMode,
        /// Where to compute (cuda: F32, F16 or BF16 inputs; recurrent (K <= 128), scan or chunked mode).
        #[arg(long, short, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// The CUDA kernel variant (cuda only): sequential (chunked: the
        /// sequential carry, state_seq and grad_w_seq), packed (recurrent,
        /// chunked: the B rows as packed sequences, the cu_seqlens
        /// launches), saved (chunked: the forward run first, saving its
        /// chunk states for the backward). Same function, same bounds as the
        /// default.
        #[arg(long, value_parser = parse_variant, default_value = "default")]
        variant: dispatch::Variant,
    },
    /// Run every available mode on a random problem.
    ///
    /// Each mode is timed and compared with the f64 recurrent reference (on
    /// the same f32-rounded inputs). Attention, O(L²), is skipped on long
    /// problems; GPU modes run when a GPU is usable.
    Demo {
        /// Batch size B.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Sequence length L.
        #[arg(long, default_value_t = 2048)]
        len: usize,
        /// Number of heads H.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Key dimension K.
        #[arg(long, default_value_t = 64)]
        key_dim: usize,
        /// Value dimension V.
        #[arg(long, default_value_t = 64)]
        value_dim: usize,
        /// Seed of the random problem.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compare two safetensors files tensor by tensor.
    ///
    /// Tensors are matched by name and compared as f64 (F32, F64, F16, BF16).
    /// Exit 1 if a tensor's relative L2 error exceeds --rtol, a tensor is in
    /// only one file, or the shapes differ.
    Check {
        /// First file (taken as the reference for relative errors).
        a: PathBuf,
        /// Second file.
        b: PathBuf,
        /// Largest accepted relative L2 error ‖b − a‖ / ‖a‖ per tensor.
        #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
        rtol: f64,
    },
    /// Time the GPU kernels (CUDA events) against their memory and FP32 floors.
    ///
    /// For each kernel, dtype and shape: the median of --runs launches after a
    /// warm-up, with inputs rotated over enough buffer sets to exceed the L2
    /// cache; achieved GB/s and GFLOP/s; the floors min-bytes / measured
    /// device-to-device copy bandwidth and flops / FP32 peak. Exit 2 without
    /// a usable GPU (or on bad arguments), 1 if a case fails or writes a
    /// non-finite output.
    Bench {
        /// Also write the results as JSON to this file (also when there is no GPU).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Kernels to run (repeatable; default: all). `--list` shows them.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Element types of q, k, v, y (repeatable: f32, f16, bf16; default: all).
        #[arg(long = "dtype")]
        dtypes: Vec<String>,
        /// Shapes `B,L,H,K,V` or `B,L,H,K,V,head` (repeatable; default: each kernel's).
        #[arg(long = "shape")]
        shapes: Vec<String>,
        /// Timed launches per case; the median is reported.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Untimed launches before timing.
        #[arg(long, default_value_t = 5)]
        warmup: u32,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Start no case after this many seconds; the cases left are listed
        /// as not run (and the table and JSON of the rest still written).
        #[arg(long)]
        time_budget: Option<f64>,
        /// List the kernels and their default shapes, and exit.
        #[arg(long)]
        list: bool,
    },
    /// Fuzz every implementation against the f64 recurrent reference.
    ///
    /// Draws random adversarial cases (shapes, gate regimes, scales), runs
    /// each selected implementation and checks it against the documented
    /// bound. With `--targets grad` (or `forward,grad`) each case also draws
    /// upstream gradients and checks every backward (dq, dk, dv, dlog_gate,
    /// dh0) against the f64 adjoint recurrence. A disagreement is shrunk,
    /// written to --out with the commands that replay it, and exits 1. Exit 2
    /// on bad usage or an unusable --device cuda. Case i of seed S is
    /// reproducible on its own: `--seed S --first-case i --cases 1` (same
    /// --max-len and --targets).
    Fuzz {
        /// Number of cases.
        #[arg(long, default_value_t = 1000)]
        cases: u64,
        /// Campaign seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Index of the first case.
        #[arg(long, default_value_t = 0)]
        first_case: u64,
        /// Where to compute.
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Modes to fuzz, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "recurrent,scan,attention,chunked")]
        modes: Vec<CliMode>,
        /// Precisions to fuzz, comma-separated (f32, f64; bf16, f16: the
        /// CUDA kernels in that type, with --device cuda; f16 rescales q, k,
        /// v and dy by powers of two into its range).
        #[arg(long, value_delimiter = ',', default_value = "f32,f64")]
        dtypes: Vec<String>,
        /// Longest sequence length drawn.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
        max_len: u64,
        /// What to check, comma-separated: forward (y, h_final) and/or grad
        /// (the backward implementations).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "forward")]
        targets: Vec<CliTarget>,
        /// Stop starting new cases after this many seconds.
        #[arg(long)]
        time_budget: Option<f64>,
        /// Directory for failing cases.
        #[arg(long, default_value = "fuzz-failures")]
        out: PathBuf,
        /// Stop after this many disagreements.
        #[arg(long, default_value_t = 1)]
        max_failures: usize,
        /// CUDA kernel variants to fuzz beside each mode's default,
        /// comma-separated (default, sequential, fragments, ahead, batched, rows4,
        /// packed); by default
        /// every variant where it applies (`--device cuda`).
        #[arg(long, value_parser = parse_variant, value_delimiter = ',')]
        variants: Vec<dispatch::Variant>,
        /// Make every case's gates real (phase 0: Im log_gate, h0 and
        /// dh_final set to 0), so the CUDA targets run their real-gate
        /// kernels where they have them (chunked forward and backward,
        /// recurrent forward).
        #[arg(long)]
        real_gates: bool,
        /// Draw every case's V from 65 to 256 (fuzz::WIDE_VALUE_POOL), so
        /// the chunked CUDA targets run their 128-column launches (the wide
        /// output and dv launches; with --real-gates, bf16 or f16 and
        /// --variants sequential, the wide walks).
        #[arg(long)]
        wide_values: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CliTarget {
    Forward,
    Grad,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CliMode {
    Recurrent,
    Scan,
    Attention,
    Chunked,
    /// `run` only: the fastest mode as measured for the device, precision
    /// and shape (cuda: dispatch::fastest_cuda_mode; cpu: chunked for F32,
    /// recurrent for F64).
    Auto,
}

impl CliMode {
    /// The mode, or None for `auto` (resolved by `run` once the input is read).
    fn mode(self) -> Option<Mode> {
        match self {
            CliMode::Recurrent => Some(Mode::Recurrent),
            CliMode::Scan => Some(Mode::Scan),
            CliMode::Attention => Some(Mode::Attention),
            CliMode::Chunked => Some(Mode::Chunked),
            CliMode::Auto => None,
        }
    }

    /// The mode of a command that takes no `auto`.
    fn fixed(self, command: &str) -> Result<Mode, Failure> {
        self.mode().ok_or_else(|| {
            Failure::Input(format!("--mode auto is for `gateloop run` only; `{command}` needs a mode named"))
        })
    }
}

/// `--variant`, `--variants`: a [`dispatch::Variant`] by its name.
fn parse_variant(s: &str) -> Result<dispatch::Variant, String> {
    dispatch::Variant::parse(s).ok_or_else(|| {
        let names: Vec<&str> = dispatch::Variant::ALL.iter().map(|v| v.name()).collect();
        format!("`{s}` is not one of {}", names.join(", "))
    })
}

/// The variant of a `run` or `grad` on `device`: a kernel variant is the
/// GPU's (the CPU runs each mode's one implementation).
fn variant_on(variant: dispatch::Variant, device: Device) -> Result<dispatch::Variant, Failure> {
    match (variant, device) {
        (v, Device::Cpu) if v != dispatch::Variant::Default => Err(Failure::Input(format!(
            "--variant {}: a CUDA kernel variant; use --device cuda (the CPU runs one implementation per mode)",
            v.name()
        ))),
        (v, _) => Ok(v),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

impl Device {
    fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// A failure of the command, with its exit code.
enum Failure {
    /// Bad input or usage: exit 2.
    Input(String),
    /// A runtime failure: exit 1.
    Runtime(String),
}

impl From<FileError> for Failure {
    fn from(e: FileError) -> Self {
        if e.is_input_error() { Failure::Input(e.to_string()) } else { Failure::Runtime(e.to_string()) }
    }
}

fn dims_str(d: &Dims) -> String {
    format!("B={} L={} H={} K={} V={}", d.batch, d.len, d.heads, d.key_dim, d.value_dim)
}

fn input_err(e: impl std::fmt::Display) -> Failure {
    Failure::Input(e.to_string())
}

fn gpu_err(e: cuda::GpuError) -> Failure {
    match e {
        cuda::GpuError::Input(e) => Failure::Input(e.to_string()),
        other => Failure::Runtime(other.to_string()),
    }
}

/// Runs `f` `repeat` times; returns the median wall time in ms and the last result.
fn median_timed<T>(repeat: u32, f: impl Fn() -> Result<T, Failure>) -> Result<(f64, T), Failure> {
    let mut times = Vec::with_capacity(repeat as usize);
    let mut last = None;
    for _ in 0..repeat {
        let (ms, out) = timed(&f);
        times.push(ms);
        last = Some(out?);
    }
    times.sort_by(f64::total_cmp);
    let out = last.ok_or_else(|| Failure::Input("--repeat must be at least 1".into()))?;
    Ok((times[times.len() / 2], out))
}

/// A file's forward on the GPU: the whole problem, or its packed sequences
/// each from its own state (the recurrent mode in one launch, the chunked
/// mode in one launch of each kernel).
fn cuda_forward(
    gpu: &cuda::Gpu,
    mode: Mode,
    variant: dispatch::Variant,
    dtype: cuda::Dtype,
    p: &OwnedProblem<f32>,
    packing: Option<&Packing<f32>>,
) -> Result<Outputs<f32>, cuda::GpuError> {
    Packing::forward_with(
        packing,
        p,
        |s| dispatch::cuda_variant_in(gpu, mode, variant, dtype, s),
        |s, cu_seqlens, h0| dispatch::cuda_varlen_in(gpu, mode, variant, dtype, s, cu_seqlens, h0),
    )
}

/// `mode` None: `--mode auto`, resolved from the input's precision and shape.
fn run(
    input: PathBuf,
    output: PathBuf,
    mode: Option<Mode>,
    device: Device,
    variant: dispatch::Variant,
    repeat: u32,
) -> Result<(), Failure> {
    if let Some(mode) = mode.filter(|m| device == Device::Cuda && !dispatch::CUDA_MODES.contains(m)) {
        return Err(input_err(dispatch::cuda_unavailable(mode)));
    }
    let (problem, packing) = io::read_problem(&input)?;
    // The states in the run's precision once, outside the timed runs.
    let (packing64, packing32) = (packing.as_ref(), packing.as_ref().map(Packing::in_precision::<f32>));
    let dims = problem.dims();
    let mode = mode.unwrap_or(match (&problem, device) {
        (_, Device::Cuda) => dispatch::fastest_cuda_mode(&dims),
        (LoadedProblem::F32(_) | LoadedProblem::Half(..), Device::Cpu) => Mode::Chunked,
        (LoadedProblem::F64(_), Device::Cpu) => Mode::Recurrent,
    });
    // A variant that does not exist for this mode and dtype: exit 2 before
    // the GPU is opened (the dispatch refuses it too).
    let dtype = match &problem {
        LoadedProblem::F32(_) => Some(cuda::Dtype::F32),
        LoadedProblem::Half(half, _) => Some(half.element()),
        LoadedProblem::F64(_) => None,
    };
    if let Some(dtype) = dtype.filter(|&t| !variant.applies(mode, t, false)) {
        return Err(input_err(variant.unavailable(mode, dtype, false)));
    }
    let (gpu_name, ms) = match (&problem, device) {
        (LoadedProblem::F64(_), Device::Cuda) => {
            return Err(Failure::Input(format!(
                "`{}` is F64 but the cuda device runs F32, F16 and BF16 inputs only; use --device cpu, or convert the input to F32",
                input.display()
            )));
        }
        (LoadedProblem::F64(p), Device::Cpu) => {
            let (ms, out) = median_timed(repeat, || {
                Packing::forward(packing64, p, |s| dispatch::cpu_f64(mode, s)).map_err(input_err)
            })?;
            io::write_outputs(&output, &dims, &out)?;
            (None, ms)
        }
        (LoadedProblem::F32(p), Device::Cpu) => {
            let (ms, out) = median_timed(repeat, || {
                Packing::forward(packing32.as_ref(), p, |s| dispatch::cpu_f32(mode, s)).map_err(input_err)
            })?;
            io::write_outputs(&output, &dims, &out)?;
            (None, ms)
        }
        (LoadedProblem::F32(p), Device::Cuda) => {
            let gpu = cuda::Gpu::new(0).map_err(|e| Failure::Runtime(format!("cannot use the GPU: {e}")))?;
            let (ms, out) = median_timed(repeat, || {
                cuda_forward(&gpu, mode, variant, cuda::Dtype::F32, p, packing32.as_ref()).map_err(gpu_err)
            })?;
            io::write_outputs(&output, &dims, &out)?;
            (Some(gpu.name()), ms)
        }
        // 16-bit q, k, v: the f32 implementation on their exact f32 values,
        // y rounded to the file's dtype on the way out ...
        (LoadedProblem::Half(half, p), Device::Cpu) => {
            let (ms, out) = median_timed(repeat, || {
                Packing::forward(packing32.as_ref(), p, |s| dispatch::cpu_f32(mode, s)).map_err(input_err)
            })?;
            io::write_outputs_half(&output, &dims, &out, *half)?;
            (None, ms)
        }
        // ... or the kernels in that dtype, whose y is already rounded.
        (LoadedProblem::Half(half, p), Device::Cuda) => {
            let gpu = cuda::Gpu::new(0).map_err(|e| Failure::Runtime(format!("cannot use the GPU: {e}")))?;
            let (ms, out) = median_timed(repeat, || {
                cuda_forward(&gpu, mode, variant, half.element(), p, packing32.as_ref()).map_err(gpu_err)
            })?;
            io::write_outputs_half(&output, &dims, &out, *half)?;
            (Some(gpu.name()), ms)
        }
    };
    let on = match gpu_name {
        Some(name) if !name.is_empty() => format!("cuda ({name})"),
        _ => device.name().to_string(),
    };
    let runs = if repeat > 1 { format!(" (median of {repeat} runs)") } else { String::new() };
    let what = match variant {
        dispatch::Variant::Default => mode.name().to_string(),
        v => format!("{} ({})", mode.name(), v.name()),
    };
    let packed = packing64.map_or(String::new(), |pk| format!(" ({} packed sequences)", pk.sequences()));
    say!("{what} on {on}, {problem}{packed}: {ms:.3} ms{runs} median_ms={ms:.4} -> {}", output.display());
    Ok(())
}

// ------------------------------------------------------------------- grad --

fn grad(
    input: PathBuf,
    output: PathBuf,
    mode: Mode,
    device: Device,
    variant: dispatch::Variant,
) -> Result<(), Failure> {
    if device == Device::Cuda && !dispatch::CUDA_GRAD_MODES.contains(&mode) {
        return Err(input_err(dispatch::cuda_grad_unavailable(mode)));
    }
    let (loaded, packing) = io::read_grad_problem(&input)?;
    let (packing64, packing32) = (packing.as_ref(), packing.as_ref().map(Packing::in_precision::<f32>));
    let dtype = match &loaded {
        io::LoadedGradProblem::F32(..) => Some(cuda::Dtype::F32),
        io::LoadedGradProblem::Half(half, ..) => Some(half.element()),
        io::LoadedGradProblem::F64(..) => None,
    };
    if let Some(dtype) = dtype.filter(|&t| !variant.applies(mode, t, true)) {
        return Err(input_err(variant.unavailable(mode, dtype, true)));
    }
    let start = Instant::now();
    let (dims, precision, on) = match (&loaded, device) {
        (io::LoadedGradProblem::F64(..), Device::Cuda) => {
            return Err(Failure::Input(format!(
                "`{}` is F64 but the cuda device runs F32, F16 and BF16 inputs only; use --device cpu, or convert the input to F32",
                input.display()
            )));
        }
        (io::LoadedGradProblem::F64(p, up), Device::Cpu) => {
            let g = Packing::backward(packing64, p, up, |s, dy, dh| dispatch::cpu_grad(mode, s, dy, dh))
                .map_err(input_err)?;
            io::write_grads(&output, &p.dims, &g)?;
            (p.dims, "f64", "cpu".to_string())
        }
        (io::LoadedGradProblem::F32(p, up), Device::Cpu) => {
            let g = Packing::backward(packing32.as_ref(), p, up, |s, dy, dh| dispatch::cpu_grad_f32(mode, s, dy, dh))
                .map_err(input_err)?;
            io::write_grads(&output, &p.dims, &g)?;
            (p.dims, "f32", "cpu".to_string())
        }
        (io::LoadedGradProblem::F32(p, up), Device::Cuda) => {
            let gpu = cuda::Gpu::new(0).map_err(|e| Failure::Runtime(format!("cannot use the GPU: {e}")))?;
            let g = cuda_grad(&gpu, mode, variant, cuda::Dtype::F32, p, up, packing32.as_ref()).map_err(gpu_err)?;
            io::write_grads(&output, &p.dims, &g)?;
            (p.dims, "f32", format!("cuda ({})", gpu.name()))
        }
        // As in `run`: f32 on the CPU, dq, dk, dv rounded on the way out;
        // the kernels in the file's dtype on the GPU.
        (io::LoadedGradProblem::Half(half, p, up), Device::Cpu) => {
            let g = Packing::backward(packing32.as_ref(), p, up, |s, dy, dh| dispatch::cpu_grad_f32(mode, s, dy, dh))
                .map_err(input_err)?;
            io::write_grads_half(&output, &p.dims, &g, *half)?;
            (p.dims, half.name(), "cpu".to_string())
        }
        (io::LoadedGradProblem::Half(half, p, up), Device::Cuda) => {
            let gpu = cuda::Gpu::new(0).map_err(|e| Failure::Runtime(format!("cannot use the GPU: {e}")))?;
            let g = cuda_grad(&gpu, mode, variant, half.element(), p, up, packing32.as_ref()).map_err(gpu_err)?;
            io::write_grads_half(&output, &p.dims, &g, *half)?;
            (p.dims, half.name(), format!("cuda ({})", gpu.name()))
        }
    };
    say!(
        "grad ({}) on {on}, {precision} {}: {:.3} ms -> {}",
        mode.name(),
        dims_str(&dims),
        start.elapsed().as_secs_f64() * 1e3,
        output.display()
    );
    Ok(())
}

/// A grad file's gradients on the GPU: the whole problem's, or its packed
/// sequences' each from its own state (the recurrent and chunked modes in
/// one launch of each kernel).
fn cuda_grad(
    gpu: &cuda::Gpu,
    mode: Mode,
    variant: dispatch::Variant,
    dtype: cuda::Dtype,
    p: &OwnedProblem<f32>,
    upstream: &io::Upstream<f32>,
    packing: Option<&Packing<f32>>,
) -> Result<gateloop::reference::grad::Grads<f32>, cuda::GpuError> {
    Packing::backward_with(
        packing,
        p,
        upstream,
        |s, dy, dh| dispatch::cuda_grad_variant_in(gpu, mode, variant, dtype, s, dy, dh),
        |s, cu_seqlens, h0, dy, dh| dispatch::cuda_grad_varlen_in(gpu, mode, variant, dtype, s, cu_seqlens, h0, dy, dh),
    )
}

// ------------------------------------------------------------------- demo --

/// Attention is O(L²): run it only up to this length ...
const ATTENTION_MAX_LEN: usize = 4096;
/// ... and this much work, B·H·L²·(K+V) (about 2 s in f32 on 2 cores).
const ATTENTION_MAX_WORK: usize = 1 << 29;

struct Row {
    /// The mode, with the kernel variant after a slash where not the default.
    mode: String,
    device: String,
    precision: &'static str,
    result: Result<(f64, Outputs<f32>), String>,
}

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed().as_secs_f64() * 1e3, out)
}

fn demo(d: Dims, seed: u64) -> Result<(), Failure> {
    d.validate().map_err(input_err)?;
    let heads = d.batch.saturating_mul(d.heads);
    let state = heads.saturating_mul(d.key_dim).saturating_mul(d.value_dim);
    if state > io::MAX_STATE_ELEMENTS || d.v_len().max(d.qk_len()) > io::MAX_STATE_ELEMENTS {
        return Err(Failure::Input(format!("{} is too large for a demo", dims_str(&d))));
    }
    // Random gates with rare resets; q, k, v rounded to bf16 values (exact
    // in f32), the rest to f32, so the f32 modes and the bf16 kernels see
    // the same inputs, and the f64 reference sees exactly those.
    let p32 =
        random_problem(d, GateRegime::Resets(0.001), true, seed).to_f32().map_qkv(|x| io::HalfDtype::Bf16.round(x));
    let p64: OwnedProblem<f64> = p32.map(f64::from);
    say!(
        "gateloop demo: {} (per-channel gate, random with rare resets, h0 given; q, k, v bf16 values), seed {seed}, {} threads",
        dims_str(&d),
        rayon::current_num_threads()
    );

    let (ref_ms, oracle) = timed(|| reference::forward::<f64>(RefMode::Recurrent, &p64.view()));
    let oracle = oracle.map_err(|e| Failure::Runtime(format!("the f64 reference failed: {e}")))?;

    let mut rows = Vec::new();
    let work = heads.saturating_mul(d.len).saturating_mul(d.len).saturating_mul(d.key_dim.saturating_add(d.value_dim));
    let attention_skip = if d.len > ATTENTION_MAX_LEN {
        Some(format!("skipped (O(L²): L = {} > {ATTENTION_MAX_LEN})", d.len))
    } else if work > ATTENTION_MAX_WORK {
        Some(format!("skipped (O(L²): B·H·L²·(K+V) = {:.1e} > {:.1e})", work as f64, ATTENTION_MAX_WORK as f64))
    } else {
        None
    };
    for mode in [Mode::Chunked, Mode::Recurrent, Mode::Scan, Mode::Attention] {
        let result = match (&attention_skip, mode) {
            (Some(why), Mode::Attention) => Err(why.clone()),
            _ => {
                let (ms, out) = timed(|| dispatch::cpu_f32(mode, &p32.view()));
                out.map(|o| (ms, o)).map_err(|e| e.to_string())
            }
        };
        rows.push(Row { mode: mode.name().into(), device: "cpu".into(), precision: "f32", result });
    }

    let mut gpu_note = None;
    match cuda::Gpu::new(0) {
        Ok(gpu) => {
            // Each kernel, and each of its variants, with f32 and with bf16
            // q, k, v (y stored in bf16: its error is about bf16's rounding,
            // 2⁻⁹ relative on average).
            for mode in dispatch::CUDA_MODES {
                let pairs = dispatch::Variant::ALL
                    .into_iter()
                    .flat_map(|v| [cuda::Dtype::F32, cuda::Dtype::Bf16].map(|t| (v, t)))
                    .filter(|&(v, t)| v.applies(mode, t, false));
                for (variant, dtype) in pairs {
                    let (ms, out) = timed(|| dispatch::cuda_variant_in(&gpu, mode, variant, dtype, &p32.view()));
                    rows.push(Row {
                        mode: match variant {
                            dispatch::Variant::Default => mode.name().into(),
                            v => format!("{}/{}", mode.name(), v.name()),
                        },
                        device: format!("cuda ({})", gpu.name()),
                        precision: dtype.name(),
                        result: out.map(|o| (ms, o)).map_err(|e| e.to_string()),
                    });
                }
            }
        }
        Err(e) => gpu_note = Some(format!("GPU not used: {e}")),
    }

    say!();
    // As wide as the longest device label (a CUDA one carries the card's name).
    let dw = rows.iter().map(|r| r.device.chars().count()).max().unwrap_or(0).max(12);
    // And as wide as the longest mode label (`chunked/sequential`).
    let mw = rows.iter().map(|r| r.mode.chars().count()).max().unwrap_or(0).max(10);
    say!(
        "{:<mw$} {:<dw$} {:<9} {:>10} {:>12} {:>12} {:>14}",
        "mode",
        "device",
        "precision",
        "time (ms)",
        "y rel L2",
        "y max-abs",
        "h_final rel L2"
    );
    say!(
        "{:<mw$} {:<dw$} {:<9} {:>10.1} {:>12} {:>12} {:>14}",
        "recurrent",
        "cpu",
        "f64",
        ref_ms,
        "(reference)",
        "",
        ""
    );
    for row in &rows {
        match &row.result {
            Ok((ms, out)) => {
                let ey = compare(&out.y, &oracle.y);
                let eh = compare_complex(&out.h_final, &oracle.h_final);
                say!(
                    "{:<mw$} {:<dw$} {:<9} {:>10.1} {:>12.2e} {:>12.2e} {:>14.2e}",
                    row.mode,
                    row.device,
                    row.precision,
                    ms,
                    ey.rel_l2,
                    ey.max_abs,
                    eh.rel_l2
                );
            }
            Err(why) => say!("{:<mw$} {:<dw$} {:<9} {why}", row.mode, row.device, row.precision),
        }
    }
    if let Some(note) = gpu_note {
        say!("\n{note}");
    }
    Ok(())
}

// ------------------------------------------------------------------ check --

fn check(a: PathBuf, b: PathBuf, rtol: f64) -> Result<(), Failure> {
    if !(rtol.is_finite() && rtol >= 0.0) {
        return Err(Failure::Input(format!("--rtol {rtol}: must be a finite number >= 0")));
    }
    let ta = io::read_tensors_f64(&a)?;
    let tb = io::read_tensors_f64(&b)?;
    let mut problems = Vec::new();
    say!("{:<12} {:<18} {:>12} {:>12}  verdict", "tensor", "shape", "rel L2", "max-abs");
    for (name, x) in &ta {
        let Some(y) = tb.get(name) else {
            problems.push(format!("tensor `{name}` is in `{}` but not in `{}`", a.display(), b.display()));
            continue;
        };
        if x.shape != y.shape {
            problems.push(format!(
                "tensor `{name}` has shape {:?} in `{}` but {:?} in `{}`",
                x.shape,
                a.display(),
                y.shape,
                b.display()
            ));
            continue;
        }
        let e = compare(&y.data, &x.data);
        let identical = x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits());
        let ok = identical || e.rel_l2 <= rtol;
        say!(
            "{:<12} {:<18} {:>12.3e} {:>12.3e}  {}",
            name,
            format!("{:?}", x.shape),
            e.rel_l2,
            e.max_abs,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            problems.push(format!("tensor `{name}`: rel L2 {:.3e} exceeds rtol {rtol:.1e}", e.rel_l2));
        }
    }
    for name in tb.keys().filter(|n| !ta.contains_key(*n)) {
        problems.push(format!("tensor `{name}` is in `{}` but not in `{}`", b.display(), a.display()));
    }
    if problems.is_empty() {
        say!("check passed: {} tensor(s) within rtol {rtol:.1e}", ta.len());
        Ok(())
    } else {
        Err(Failure::Runtime(format!("check failed:\n  {}", problems.join("\n  "))))
    }
}

// ------------------------------------------------------------------ bench --

#[allow(clippy::too_many_arguments)]
fn bench(
    json: Option<PathBuf>,
    kernels: Vec<String>,
    dtypes: Vec<String>,
    shapes: Vec<String>,
    runs: u32,
    warmup: u32,
    seed: u64,
    time_budget: Option<f64>,
    list: bool,
) -> Result<(), Failure> {
    use cuda::bench;
    if list {
        for e in bench::registry() {
            let dts: Vec<&str> = e.dtypes.iter().map(|d| d.name()).collect();
            // A tuning entry's line ends in `tuning` (peers.py skips those).
            let tuning = if e.tuning { " tuning" } else { "" };
            say!("{:<17} {} [{}]{tuning}", e.name, e.about, dts.join(", "));
            for d in (e.shapes)() {
                say!("{:<17}   {}", "", bench::shape_str(&d));
            }
        }
        return Ok(());
    }
    let dtypes = dtypes.iter().map(|s| s.parse::<cuda::Dtype>()).collect::<Result<Vec<_>, _>>().map_err(input_err)?;
    let shapes = shapes.iter().map(|s| bench::parse_shape(s)).collect::<Result<Vec<_>, _>>().map_err(input_err)?;
    if let Some(b) = time_budget.filter(|b| !(b.is_finite() && *b >= 0.0)) {
        return Err(Failure::Input(format!("--time-budget {b}: must be a number of seconds >= 0")));
    }
    let opts = bench::BenchOptions {
        kernels,
        dtypes,
        shapes,
        runs: runs as usize,
        warmup: warmup as usize,
        seed,
        time_budget_s: time_budget,
    };
    let write_json = |value: &serde_json::Value| -> Result<(), Failure> {
        if let Some(path) = &json {
            let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Runtime(e.to_string()))?;
            std::fs::write(path, text + "\n")
                .map_err(|e| Failure::Runtime(format!("cannot write `{}`: {e}", path.display())))?;
        }
        Ok(())
    };
    let gpu = match cuda::Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            let reason = e.to_string();
            write_json(&bench::skipped_json(&reason))?;
            return Err(Failure::Input(format!("gateloop bench needs a GPU: no usable GPU: {reason}")));
        }
    };
    say!("gateloop bench on {} (seed {seed})", gpu.name());
    let report = bench::run(&gpu, &opts, |line| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "bench: {line}");
    })
    .map_err(|e| match e {
        bench::BenchError::Gpu(g) => gpu_err(g),
        other => Failure::Input(other.to_string()),
    })?;
    say!("{}", report.table());
    write_json(&report.to_json())?;
    if let Some(path) = &json {
        say!("wrote {}", path.display());
    }
    let bad: Vec<String> = report
        .results
        .iter()
        .filter(|r| !r.outputs_finite)
        .map(|r| format!("{} {} {}: non-finite output", r.kernel, r.dtype, bench::shape_str(&r.dims)))
        .chain(
            report
                .failures
                .iter()
                .map(|f| format!("{} {} {}: {}", f.kernel, f.dtype, bench::shape_str(&f.dims), f.error)),
        )
        .collect();
    if bad.is_empty() { Ok(()) } else { Err(Failure::Runtime(format!("bench failures:\n  {}", bad.join("\n  ")))) }
}

// ------------------------------------------------------------------- fuzz --

fn fuzz_cmd(
    mut cfg: fuzz::FuzzConfig,
    device: fuzz::Device,
    selection: fuzz::Selection<'_>,
    modes: &[Mode],
    dtypes: &[String],
    budget: Option<f64>,
) -> Result<(), Failure> {
    let precisions = dtypes
        .iter()
        .map(|d| {
            fuzz::Precision::parse(d)
                .ok_or_else(|| Failure::Input(format!("--dtypes: `{d}` is not f32, f64, bf16 or f16")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(s) = budget {
        let d = std::time::Duration::try_from_secs_f64(s)
            .map_err(|_| Failure::Input(format!("--time-budget {s}: must be a number of seconds >= 0")))?;
        cfg.time_budget = Some(d);
    }
    let (mut targets, notes) = fuzz::select_with(device, selection, modes, &precisions).map_err(input_err)?;
    for note in notes {
        say!("note: {note}");
    }
    let report = fuzz::run_campaign(&cfg, &mut targets);
    say!("{}", report.render());
    if report.passed() {
        Ok(())
    } else {
        Err(Failure::Runtime(format!("{} disagreement(s) found", report.failures.len())))
    }
}

fn main() -> ExitCode {
    use std::io::Write as _;
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { input, output, mode, device, repeat, variant } => {
            variant_on(variant, device).and_then(|v| run(input, output, mode.mode(), device, v, repeat))
        }
        Command::Demo { batch, len, heads, key_dim, value_dim, seed } => {
            demo(Dims::new(batch, len, heads, key_dim, value_dim), seed)
        }
        Command::Check { a, b, rtol } => check(a, b, rtol),
        Command::Grad { input, output, mode, device, variant } => {
            mode.fixed("grad").and_then(|m| variant_on(variant, device).and_then(|v| grad(input, output, m, device, v)))
        }
        Command::Bench { json, kernels, dtypes, shapes, runs, warmup, seed, time_budget, list } => {
            bench(json, kernels, dtypes, shapes, runs, warmup, seed, time_budget, list)
        }
        Command::Fuzz {
            cases,
            seed,
            first_case,
            device,
            modes,
            dtypes,
            max_len,
            targets,
            time_budget,
            out,
            max_failures,
            variants,
            real_gates,
            wide_values,
        } => {
            let device = match device {
                Device::Cpu => fuzz::Device::Cpu,
                Device::Cuda => fuzz::Device::Cuda,
            };
            let mut kinds: Vec<fuzz::Kind> = targets
                .into_iter()
                .map(|t| match t {
                    CliTarget::Forward => fuzz::Kind::Forward,
                    CliTarget::Grad => fuzz::Kind::Grad,
                })
                .collect();
            kinds.sort();
            kinds.dedup();
            let modes: Result<Vec<Mode>, Failure> = modes.into_iter().map(|m| m.fixed("fuzz")).collect();
            let cfg = fuzz::FuzzConfig {
                cases,
                first_case,
                seed,
                max_len: usize::try_from(max_len).unwrap_or(usize::MAX),
                time_budget: None,
                out_dir: Some(out),
                max_failures,
                progress: true,
                real_gates,
                wide_values,
                ..Default::default()
            };
            let selection =
                fuzz::Selection { kinds: &kinds, variants: (!variants.is_empty()).then_some(&variants[..]) };
            modes.and_then(|modes| fuzz_cmd(cfg, device, selection, &modes, &dtypes, time_budget))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(msg)) => {
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(1)
        }
    }
}
