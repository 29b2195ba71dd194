//! # gateloop
//!
//! CUDA kernels for GateLoop (Katsch 2023, "Fully Data-Controlled Linear
//! Recurrence"), safe Rust launchers, and an f64 CPU reference that every
//! kernel is checked against.
//!
//! ## The contract
//!
//! Layout `[B, L, H, D]` (batch, time, head, dim), row-major. Per (b, h):
//!
//! | tensor     | shape            | type    |
//! |------------|------------------|---------|
//! | `q`, `k`   | `[B, L, H, K]`   | real    |
//! | `v`        | `[B, L, H, V]`   | real    |
//! | `log_gate` | `[B, L, H, K]` or `[B, L, H, 1]` (shared by the head's K channels) | complex |
//! | `h0` (optional) | `[B, H, K, V]` | complex |
//! | `y` (out)  | `[B, L, H, V]`   | real    |
//! | `h_final` (out) | `[B, H, K, V]` | complex |
//!
//! ```text
//! a_t = exp(log_gate_t)                      (Re log_gate ≤ 0, so |a_t| ≤ 1)
//! h_t = a_t ⊙ h_{t−1} + k_tᵀ v_t             (complex K×V state, a broadcast along V)
//! y_t = Re(Σ_k q_t[k] · h_t[k, :])           (no implicit scaling of q)
//! h_{−1} = h0 (or 0),  h_final = h_{L−1}
//! ```
//!
//! Re(log_gate) = −∞ is a full reset (a = 0). Complex values are interleaved
//! `(re, im)` pairs ([`num_complex::Complex`] is `#[repr(C)]`); in files a
//! trailing dimension of 2.
//!
//! ## Modes
//!
//! - [`reference::recurrent`]: the sequential loop, the oracle.
//! - [`reference::scan`]: the paper's associative scan, as a tree.
//! - [`reference::attention`]: masked surrogate attention in anchored log space.
//! - [`cpu::chunked`]: the fast f32 CPU path, the mirror of the GPU chunked kernel.
//! - [`cuda`]: the GPU kernels (when built with nvcc and run with a driver).
//!
//! [`fuzz`] checks every implementation against the f64 recurrent reference
//! on random adversarial problems (`gateloop fuzz`).
//! [`packing`] runs variable-length sequences packed into one batch row
//! (fla's `cu_seqlens`) through every mode, by reset gates at their starts,
//! or each from its own state ([`packing::forward_varlen`]).
//!
//! ## Example
//!
//! The f64 reference and the fast f32 path on one problem (CPU; the GPU
//! launchers take the same [`Dims`] and buffers on the device: [`cuda`]):
//!
//! ```
//! use gateloop::cpu::chunked::{self, ChunkParams};
//! use gateloop::{Complex, Dims, Problem, compare, compare_complex, reference};
//!
//! # fn main() -> Result<(), gateloop::InputError> {
//! // One sequence of 1000 steps, 2 heads, K = 8, V = 4.
//! let dims = Dims::new(1, 1000, 2, 8, 4);
//! let wave = |n: usize, phase: f32| -> Vec<f32> { (0..n).map(|i| (0.37 * i as f32 + phase).sin()).collect() };
//! let (q, k, v) = (wave(dims.qk_len(), 0.0), wave(dims.qk_len(), 1.0), wave(dims.v_len(), 2.0));
//! // log a_t, laid out [B, L, H, K]: a decay of up to 2% and a rotation of up
//! // to ±3 rad per step, and a reset (Re = −∞) at step 500.
//! let log_gate: Vec<Complex<f32>> = (0..dims.gate_len())
//!     .map(|i| match i / (2 * 8) {
//!         500 => Complex::new(f32::NEG_INFINITY, 0.0),
//!         _ => Complex::new(-0.01 * (i % 3) as f32, 3.0 * (0.1 * i as f32).sin()),
//!     })
//!     .collect();
//!
//! let fast = chunked::forward(&Problem::new(dims, &q, &k, &v, &log_gate, None)?, &ChunkParams::default())?;
//!
//! // The oracle, in f64 on the same values.
//! let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&x| x as f64).collect() };
//! let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
//! let g64: Vec<Complex<f64>> = log_gate.iter().map(|g| Complex::new(g.re as f64, g.im as f64)).collect();
//! let exact = reference::recurrent::forward(&Problem::new(dims, &q64, &k64, &v64, &g64, None)?)?;
//!
//! // The f32 bounds every kernel is held to: rel L2 ≤ 1e-4, max-abs ≤ 1e-3·max|ref|.
//! assert!(compare(&fast.y, &exact.y).within(1e-4, 1e-3));
//! assert!(compare_complex(&fast.h_final, &exact.h_final).within(1e-4, 1e-3));
//!
//! // A gate outside the domain is a typed error naming the element, not a NaN.
//! let mut bad = log_gate.clone();
//! bad[7].re = 0.5; // |a| > 1
//! let err = chunked::forward(&Problem::new(dims, &q, &k, &v, &bad, None)?, &ChunkParams::default()).unwrap_err();
//! assert!(matches!(err, gateloop::InputError::Value { name: "log_gate", index: 7, .. }));
//! # Ok(())
//! # }
//! ```
//!
//! ## Numerics
//!
//! No cumulative product of gates (or its inverse) is ever formed, and no raw
//! cumulative log is exponentiated: factors are e^{G_n − G_r} with an anchor r
//! chosen so every real part is ≤ 0, and cumulative sums are chunk-local.

// Every public item says what it is (CI's clippy runs with -D warnings).
#![warn(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod error;
pub mod fuzz;
pub mod io;
pub mod packing;
pub mod problem;
pub mod reference;
pub mod testing;

pub use error::InputError;
pub use num_complex::Complex;
pub use problem::{Dims, ErrorStats, GateLayout, Outputs, OutputsMut, Problem, Real, compare, compare_complex};

/// The ways to compute the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Sequential in time.
    Recurrent,
    /// The paper's associative scan.
    Scan,
    /// Masked surrogate attention, O(L²).
    Attention,
    /// Chunkwise: attention inside chunks, recurrence between them.
    Chunked,
}

impl Mode {
    /// Every mode, in the README's order.
    pub const ALL: [Mode; 4] = [Mode::Recurrent, Mode::Scan, Mode::Attention, Mode::Chunked];

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Recurrent => "recurrent",
            Mode::Scan => "scan",
            Mode::Attention => "attention",
            Mode::Chunked => "chunked",
        }
    }
}
