//! Self-tests of the hardware contracts the kernels build on, run on the
//! device (`cuda/selftest.cu`).
//!
//! [`mma_fragments`] checks the register-fragment layouts that
//! `cuda/mma.cuh` spells out for kernels that keep tensor-core operands in
//! registers (PTX `mma.sync` m16n8k16 in bf16 and f16, m16n8k8 in TF32;
//! `ldmatrix` .x4 and .x2, with and without .trans). The PTX ISA documents
//! them; this asks the card. Each of [`MMA_PRODUCTS`] computes D = A·B + C
//! on small integers, which every accumulation order and rounding gives
//! exactly, so one element in the wrong place is a wrong value. The kernel
//! emulator behind the fake CUDA driver implements the same instructions
//! from the ISA's tables (`tests/kernel_emu/include/mma.h`) and passes the
//! same check (`tests/gpu_selftest.rs`), so on a card the check also tests
//! the emulator's model of it.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::abi::{self, GateloopSelftestMmaParams};
use super::{DriverContext, Gpu, GpuError};

/// What each product of [`mma_fragments`] exercises, in the kernel's order.
pub const MMA_PRODUCTS: [&str; abi::GATELOOP_SELFTEST_MMA_PRODUCTS as usize] = [
    "bf16 m16n8k16, fragments from the layout functions",
    "f16 m16n8k16, fragments from the layout functions",
    "tf32 m16n8k8, fragments from the layout functions",
    "bf16 m16n8k16, A by ldmatrix.x4, B by ldmatrix.x2.trans",
    "f16 m16n8k16, A by ldmatrix.x4.trans, B by ldmatrix.x2",
];

/// Independent random problems per check (one warp each).
pub const MMA_TRIALS: usize = 8;

const PRODUCTS: usize = abi::GATELOOP_SELFTEST_MMA_PRODUCTS as usize;
const A_LEN: usize = 16 * 16;
const TILE_LEN: usize = 16 * 8;

// SAFETY: the bindgen mirror (#[repr(C)]) of the C struct the kernel takes by
// value; its layout is pinned on both sides (the header's static_assert,
// bindgen's layout checks, tests/abi.rs). Four pointers, no padding, so its
// bytes are a valid kernel argument for any value; the pointers are only
// dereferenced by the kernel, whose launcher guarantees they are valid (see
// `mma_fragments`).
unsafe impl DeviceRepr for GateloopSelftestMmaParams {}

/// One wrong element of a product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MmaMismatch {
    /// Which trial (input draw) of the product.
    pub trial: usize,
    /// Row of the 16 × 8 result.
    pub row: usize,
    /// Column of the 16 × 8 result.
    pub col: usize,
    /// What the device's product gave.
    pub got: f32,
    /// The exact product (small integers, so exact in f32).
    pub want: f32,
}

/// The outcome of one product over every trial.
#[derive(Clone, Debug, PartialEq)]
pub struct MmaProductCheck {
    /// What it exercises (an entry of [`MMA_PRODUCTS`]).
    pub product: &'static str,
    /// Elements compared (trials × 16 × 8).
    pub elements: usize,
    /// Elements that differ from the exact product.
    pub wrong: usize,
    /// The first element that differs, if any.
    pub first_wrong: Option<MmaMismatch>,
}

/// What [`mma_fragments`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct MmaFragmentCheck {
    /// One check per product of [`MMA_PRODUCTS`], in that order.
    pub products: Vec<MmaProductCheck>,
}

impl MmaFragmentCheck {
    /// Whether every element of every product is exact.
    pub fn passed(&self) -> bool {
        self.products.iter().all(|p| p.wrong == 0)
    }
}

impl fmt::Display for MmaFragmentCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.products {
            write!(f, "{}: {} of {} elements wrong", p.product, p.wrong, p.elements)?;
            if let Some(m) = p.first_wrong {
                write!(f, " (first: trial {} D[{}][{}] = {} instead of {})", m.trial, m.row, m.col, m.got, m.want)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// The inputs of the check: per trial A (16×16), B (16×8) with integers in
/// [−8, 8] and C (16×8) in [−64, 64], row-major: exact in bf16, f16 and
/// TF32, and every D element (at most 16·64 + 64 in magnitude, an integer)
/// exact in f32 whatever the order and rounding of the accumulation.
fn mma_inputs() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |range: i64| {
        // xorshift64*: fixed seed, so a failure reproduces.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33;
        (r as i64 % (2 * range + 1) - range) as f32
    };
    let a = (0..MMA_TRIALS * A_LEN).map(|_| next(8)).collect();
    let b = (0..MMA_TRIALS * TILE_LEN).map(|_| next(8)).collect();
    let c = (0..MMA_TRIALS * TILE_LEN).map(|_| next(64)).collect();
    (a, b, c)
}

/// Element (row, col) of product `p` of `trial`, exactly: C + A·B over 16
/// terms, or over A's first 8 columns and B's first 8 rows for product 2
/// (TF32 m16n8k8).
fn exact_product(a: &[f32], b: &[f32], c: &[f32], trial: usize, p: usize, row: usize, col: usize) -> f32 {
    let depth = if p == 2 { 8 } else { 16 };
    let mut s = f64::from(c[trial * TILE_LEN + row * 8 + col]);
    for k in 0..depth {
        s += f64::from(a[trial * A_LEN + row * 16 + k]) * f64::from(b[trial * TILE_LEN + k * 8 + col]);
    }
    s as f32
}

/// Compares the kernel's `d` ([trials, products, 16, 8]) with the exact
/// products.
fn check_products(a: &[f32], b: &[f32], c: &[f32], d: &[f32]) -> MmaFragmentCheck {
    let products = (0..PRODUCTS)
        .map(|p| {
            let mut wrong = 0;
            let mut first_wrong = None;
            for trial in 0..MMA_TRIALS {
                for row in 0..16 {
                    for col in 0..8 {
                        let want = exact_product(a, b, c, trial, p, row, col);
                        let got = d[(trial * PRODUCTS + p) * TILE_LEN + row * 8 + col];
                        // == rather than bits: a zero may come out as either sign.
                        if got != want {
                            wrong += 1;
                            first_wrong.get_or_insert(MmaMismatch { trial, row, col, got, want });
                        }
                    }
                }
            }
            MmaProductCheck { product: MMA_PRODUCTS[p], elements: MMA_TRIALS * TILE_LEN, wrong, first_wrong }
        })
        .collect();
    MmaFragmentCheck { products }
}

/// Runs the fragment-layout check on `stream` and SYNCHRONIZES it (the
/// answer is needed on the host). An `Err` is a driver failure; a layout
/// that differs from the card's is an `Ok` whose
/// [`passed`](MmaFragmentCheck::passed) is false, with the first wrong
/// element of each product.
pub fn mma_fragments(gpu: &Gpu, stream: &Arc<CudaStream>) -> Result<MmaFragmentCheck, GpuError> {
    if stream.context() != gpu.context() {
        return Err(crate::error::InputError::Param {
            name: "stream",
            value: format!("a stream on device {}", stream.context().ordinal()),
            why: "the stream must belong to the Gpu's CUDA context",
        }
        .into());
    }
    let (a, b, c) = mma_inputs();
    let a_dev = stream.clone_htod(&a).doing("uploading the self-test's A")?;
    let b_dev = stream.clone_htod(&b).doing("uploading the self-test's B")?;
    let c_dev = stream.clone_htod(&c).doing("uploading the self-test's C")?;
    // NaN-poisoned: an element the kernel does not write is wrong.
    let mut d_dev =
        stream.clone_htod(&vec![f32::NAN; MMA_TRIALS * PRODUCTS * TILE_LEN]).doing("uploading the self-test's D")?;
    {
        let (a_ptr, _a_guard) = a_dev.device_ptr(stream);
        let (b_ptr, _b_guard) = b_dev.device_ptr(stream);
        let (c_ptr, _c_guard) = c_dev.device_ptr(stream);
        let (d_ptr, _d_guard) = d_dev.device_ptr_mut(stream);
        let params = GateloopSelftestMmaParams {
            a: a_ptr as usize as *const f32,
            b: b_ptr as usize as *const f32,
            c: c_ptr as usize as *const f32,
            d: d_ptr as usize as *mut f32,
        };
        let cfg = LaunchConfig {
            grid_dim: (MMA_TRIALS as u32, 1, 1),
            block_dim: (abi::GATELOOP_SELFTEST_MMA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&gpu.kernels.selftest_mma);
        launch.arg(&params);
        // SAFETY: gateloop_selftest_mma takes one GateloopSelftestMmaParams by
        // value, which is what is pushed. Block x reads 256 f32 of a, 128 of
        // b and 128 of c at offset x times those counts and writes
        // PRODUCTS·128 f32 of d likewise; the grid has MMA_TRIALS blocks and
        // the buffers were allocated above with exactly MMA_TRIALS times
        // those lengths, on this stream's context. One warp per block (the
        // kernel's __launch_bounds__), static shared memory only. The
        // buffers outlive the launch: their guards (cudarc's record of this
        // use) live to the end of this block, and the buffers until after
        // the synchronization below.
        unsafe { launch.launch(cfg) }.doing("launching gateloop_selftest_mma")?;
    }
    let d = stream.clone_dtoh(&d_dev).doing("downloading the self-test's D")?;
    stream.synchronize().doing("synchronizing after gateloop_selftest_mma")?;
    Ok(check_products(&a, &b, &c, &d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host half on its own: the exact products pass, and a D with two
    /// elements swapped (a layout error) or one left unwritten fails, named.
    #[test]
    fn check_finds_a_misplaced_element() {
        let (a, b, c) = mma_inputs();
        // d[(trial · PRODUCTS + p) · 128 + row · 8 + col], the kernel's layout.
        let d: Vec<f32> = (0..MMA_TRIALS * PRODUCTS * TILE_LEN)
            .map(|i| {
                let (tp, rc) = (i / TILE_LEN, i % TILE_LEN);
                exact_product(&a, &b, &c, tp / PRODUCTS, tp % PRODUCTS, rc / 8, rc % 8)
            })
            .collect();
        assert!(check_products(&a, &b, &c, &d).passed());
        // Products 0 and 2 differ (depth 16 against 8), so the inputs are not degenerate.
        assert_ne!(d[..TILE_LEN], d[2 * TILE_LEN..3 * TILE_LEN]);

        let mut swapped = d.clone();
        let base = 3 * TILE_LEN; // trial 0, product 3
        swapped.swap(base + 1, base + 8); // D[0][1] and D[1][0]
        let check = check_products(&a, &b, &c, &swapped);
        assert!(!check.passed());
        assert_eq!(check.products[3].wrong, 2);
        assert_eq!(check.products[3].first_wrong.map(|m| (m.trial, m.row, m.col)), Some((0, 0, 1)));
        assert!(check.products.iter().enumerate().all(|(p, r)| p == 3 || r.wrong == 0));

        let mut unwritten = d;
        unwritten[(7 * PRODUCTS + 4) * TILE_LEN + 127] = f32::NAN;
        let check = check_products(&a, &b, &c, &unwritten);
        assert_eq!(check.products[4].wrong, 1);
        assert!(format!("{check}").contains("trial 7 D[15][7] = NaN"));
    }
}
