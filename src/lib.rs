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
//!
//! ## Numerics
//!
//! No cumulative product of gates (or its inverse) is ever formed, and no raw
//! cumulative log is exponentiated: factors are e^{G_n − G_r} with an anchor r
//! chosen so every real part is ≤ 0, and cumulative sums are chunk-local.

pub mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod error;
pub mod fuzz;
pub mod io;
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
