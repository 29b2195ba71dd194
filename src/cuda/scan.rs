//! The paper's parallel mode on the GPU (`cuda/scan.cu`): a fused complex
//! associative scan, parallel over (batch, head, value tiles) and over time,
//! with the readout fused in. No per-step state reaches global memory; only
//! the state at each chunk boundary does (a workspace), when L spans more
//! than one chunk.
//!
//! Three kernels on one stream: `reduce` (aggregate of every chunk but the
//! last), `carry` (the state entering each chunk, sequential over chunks),
//! `forward` (re-scan each chunk from its entering state, write y and
//! h_final); a single chunk needs only `forward`. See the kernel file for the
//! thread mapping, [`plan`] for the geometry, and [`prefer_recurrent`] for
//! when the recurrent kernel is the better choice. [`crate::cpu::scan`] is
//! the CPU mirror of the algorithm (same chunks, same combination order).

use cudarc::driver::{CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::abi::{self, GateloopScanParams};
use super::element::Element;
use super::launch::{self, Buffers, SeqParams};
use super::phases::launched;
use super::{Gpu, GpuError};
use crate::cpu::scan::{MAX_WARPS, STEPS_PER_THREAD, ScanParams};
use crate::error::InputError;
use crate::problem::{Dims, Outputs, Problem};

pub use super::launch::{DeviceInputs, DeviceOutputs};

/// The value-tile variants compiled into the kernel (`_v{T}` entry points).
pub const VALUE_TILES: [u32; 3] = [1, 2, 4];
const LANES: usize = 32;
const CARRY_BLOCK: usize = abi::GATELOOP_SCAN_CARRY_BLOCK as usize;

/// Below this many state elements per SM the recurrent kernel leaves the GPU
/// partly idle: it runs one thread per (b, h, column, key group) with about 8
/// state rows per thread, and an SM holds at most 2048 threads; 8 rows × 1024
/// threads (half residency, the rest of the latency hidden by the 8
/// independent rows) is the fill target. To be tuned on a GPU.
pub const RECURRENT_FILL_PER_SM: usize = 8 * 1024;
/// At or below this many steps the scan has at most one warp of time
/// parallelism (one chunk of one warp), so it cannot beat the recurrence.
pub const SHORT_LEN: usize = STEPS_PER_THREAD * LANES;

/// Whether the sequential-in-time recurrent kernel should be preferred over
/// this time-parallel scan for `dims` on a GPU with `sm_count` SMs.
///
/// The rule: the recurrent kernel reads the inputs once and does ~5 flops per
/// state element and step; the scan reads them twice and does ~3× the flops
/// plus warp shuffles, and wins only through its extra (time) parallelism.
/// So prefer the recurrent kernel when it alone fills the GPU —
/// B·H·K·V ≥ [`RECURRENT_FILL_PER_SM`] · sm_count — or when there is no time
/// parallelism to gain (L ≤ [`SHORT_LEN`]); never when it cannot run
/// (K > [`super::recurrent::MAX_KEY_DIM`]). Otherwise (few long sequences,
/// e.g. B·H = 1 at L = 65536) the scan. The constants are first estimates,
/// to be tuned with benchmarks on a GPU.
pub fn prefer_recurrent(dims: &Dims, sm_count: usize) -> bool {
    if dims.key_dim > super::recurrent::MAX_KEY_DIM {
        return false;
    }
    if dims.len <= SHORT_LEN {
        return true;
    }
    let state = dims.batch.saturating_mul(dims.heads).saturating_mul(dims.key_dim).saturating_mul(dims.value_dim);
    state >= RECURRENT_FILL_PER_SM.saturating_mul(sm_count.max(1))
}

/// The launch geometry of one scan call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Warps per block (the block scan's width).
    pub warps: u32,
    /// T: value columns per thread (the `_v{T}` entry point).
    pub value_tile: u32,
    /// ceil(V / T).
    pub value_tiles: u32,
    /// STEPS_PER_THREAD · 32 · warps.
    pub chunk_len: u64,
    /// ceil(L / chunk_len).
    pub num_chunks: u64,
    /// Blocks of the reduce kernel: B·H · value_tiles · (num_chunks − 1) (0: not launched).
    pub reduce_grid: u32,
    /// Blocks of the carry kernel (0: not launched).
    pub carry_grid: u32,
    /// Blocks of the forward kernel: B·H · value_tiles · num_chunks.
    pub forward_grid: u32,
    /// f32 elements of the workspace (0 when num_chunks == 1): chunk_gate
    /// (2·B·H·num_chunks·K) then chunk_state (2·B·H·num_chunks·K·V).
    pub workspace_len: usize,
}

impl LaunchPlan {
    /// The CPU mirror's parameters for this geometry.
    pub fn scan_params(&self) -> ScanParams {
        ScanParams { steps_per_thread: STEPS_PER_THREAD, warps: self.warps as usize }
    }
    pub(crate) fn variant_index(&self) -> usize {
        self.value_tile.trailing_zeros() as usize
    }
    /// f32 offset of chunk_state in the workspace.
    pub(crate) fn state_offset(&self, d: &Dims) -> usize {
        2 * d.batch * d.heads * self.num_chunks as usize * d.key_dim
    }
}

/// Chooses the launch geometry for `dims` on a GPU with `sm_count` SMs.
///
/// T = 1 for V = 1, 2 for V = 2, else 4 (the time scan's 'A' half is shared
/// by a thread's T columns). Warps: the largest of 4, 2, 1 that still gives
/// ≥ 2 blocks per SM (B·H · value_tiles · chunks), and no more than the
/// warps L needs (a block never has a warp entirely past L).
pub fn plan(dims: &Dims, sm_count: usize) -> Result<LaunchPlan, InputError> {
    dims.validate()?;
    let d = dims;
    let value_tile = match d.value_dim {
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let tiles = d.value_dim.div_ceil(value_tile);
    let bh = d.batch.checked_mul(d.heads);
    let per_warp = STEPS_PER_THREAD * LANES;
    let needed = d.len.div_ceil(per_warp);
    let blocks =
        |w: usize| bh.and_then(|x| x.checked_mul(tiles)).and_then(|x| x.checked_mul(d.len.div_ceil(per_warp * w)));
    let target = 2 * sm_count.max(1);
    let mut warps = 1;
    for w in [4usize, 2] {
        if w <= needed && blocks(w).is_some_and(|n| n >= target) {
            warps = w;
            break;
        }
    }
    plan_with_warps(dims, warps)
}

/// [`plan`] with a given number of warps per block (1..=[`MAX_WARPS`]); the
/// scan backward ([`super::scan_grad`]) runs the forward's reduce and carry
/// kernels with its own choice.
pub(crate) fn plan_with_warps(dims: &Dims, warps: usize) -> Result<LaunchPlan, InputError> {
    dims.validate()?;
    let d = dims;
    let value_tile = match d.value_dim {
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let tiles = d.value_dim.div_ceil(value_tile);
    let bh = d.batch.checked_mul(d.heads);
    let per_warp = STEPS_PER_THREAD * LANES;
    assert!((1..=MAX_WARPS).contains(&warps), "warps {warps} outside 1..={MAX_WARPS}");
    let chunk_len = per_warp * warps;
    let nc = d.len.div_ceil(chunk_len);
    let too_large = |what: &str| InputError::TooLarge {
        name: "grid",
        shape: format!("[{what}] for B={} H={} V={} L={}", d.batch, d.heads, d.value_dim, d.len),
        limit: "2^31 - 1 thread blocks".into(),
    };
    let grid_of = |chunks: usize, what: &str| -> Result<u32, InputError> {
        bh.and_then(|x| x.checked_mul(tiles))
            .and_then(|x| x.checked_mul(chunks))
            .and_then(|g| u32::try_from(g).ok())
            .filter(|&g| g <= i32::MAX as u32)
            .ok_or_else(|| too_large(what))
    };
    let forward_grid = grid_of(nc, "B·H·value_tiles·chunks")?;
    let reduce_grid = grid_of(nc - 1, "B·H·value_tiles·(chunks - 1)")?;
    let (carry_grid, workspace_len) = if nc > 1 {
        let state = d.batch * d.heads * d.key_dim * d.value_dim; // fits: validated
        let carry = u32::try_from(state.div_ceil(CARRY_BLOCK))
            .ok()
            .filter(|&g| g <= i32::MAX as u32)
            .ok_or_else(|| too_large("B·H·K·V / 256"))?;
        let ws = nc
            .checked_mul(2 * d.batch * d.heads * d.key_dim)
            .and_then(|g| nc.checked_mul(2 * state).and_then(|s| s.checked_add(g)))
            .ok_or_else(|| InputError::TooLarge {
                name: "workspace",
                shape: format!("[B·H·chunks·K·(V + 1)·2] with {nc} chunks"),
                limit: "usize::MAX".into(),
            })?;
        (carry, ws)
    } else {
        (0, 0)
    };
    Ok(LaunchPlan {
        warps: warps as u32,
        value_tile: value_tile as u32,
        value_tiles: u32::try_from(tiles).map_err(|_| too_large("value_tiles"))?,
        chunk_len: chunk_len as u64,
        num_chunks: nc as u64,
        reduce_grid,
        carry_grid,
        forward_grid,
        workspace_len,
    })
}

/// The number of SMs of `gpu`'s device (queried when the Gpu was created).
pub fn sm_count(gpu: &Gpu) -> Result<usize, GpuError> {
    Ok(gpu.sm_count)
}

/// The plan `forward_into` uses on `gpu` (its workspace size:
/// [`LaunchPlan::workspace_len`] f32).
pub fn plan_for(gpu: &Gpu, dims: &Dims) -> Result<LaunchPlan, GpuError> {
    Ok(plan(dims, sm_count(gpu)?)?)
}

/// Runs the scan on `stream` over device buffers, writing `out`. `T` is the
/// element type of q, k, v and y (f32, f16, bf16); log_gate, h0, h_final and
/// the workspace are (complex) f32, and the kernels compute in f32 (y is
/// rounded to `T` once). Asynchronous: it enqueues up to three kernels and
/// never synchronizes.
///
/// `workspace` must hold at least [`LaunchPlan::workspace_len`] f32 of
/// [`plan_for`]`(gpu, dims)` (its contents are overwritten; it may be `None`
/// when that is 0, i.e. L fits in one chunk). Checks on the host: dims,
/// every buffer's length (the error names the argument), context, alignment
/// of complex buffers. It does not read the data, so the gate's domain
/// (Re ≤ 0, see [`Problem::check_gate`]) is the caller's responsibility
/// ([`super::check::log_gate`] checks it on the device, opt-in, synchronizing).
pub fn forward_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
) -> Result<(), GpuError> {
    let d = dims;
    let lp = plan_for(gpu, d)?;
    let buffers = Buffers::forward(inputs, out, workspace);
    let need = || format!("at least {} f32 ({} chunks)", lp.workspace_len, lp.num_chunks);
    buffers.check(gpu, stream, d, lp.workspace_len, need)?;
    let mut params = GateloopScanParams {
        warps: lp.warps as i32,
        value_tile: lp.value_tile as i32,
        chunk_len: lp.chunk_len as i64,
        num_chunks: lp.num_chunks as i64,
        value_tiles: lp.value_tiles as i64,
        ..GateloopScanParams::for_dims(d, T::DTYPE.abi())?
    };
    // Held until this function returns, after the launches.
    let bound = buffers.bind(stream, &mut params, lp.workspace_len > 0)?;
    if let Some(w) = bound.workspace {
        // Both halves are 8-byte aligned: the first holds an even number of f32.
        params.chunk_gate = w as usize as *mut f32;
        params.chunk_state = (w as usize + 4 * lp.state_offset(d)) as *mut f32;
    }

    let block = (LANES as u32 * lp.warps, 1, 1);
    let kernels = &gpu.kernels;
    let (ti, vi) = (T::DTYPE.index(), lp.variant_index());
    if lp.num_chunks > 1 {
        let cfg = LaunchConfig { grid_dim: (lp.reduce_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        let kernel = &kernels.scan_reduce[ti][vi];
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params);
        // SAFETY: gateloop_scan_reduce_{E}_v{T} (E the element type of q, k,
        // v, y: T::DTYPE picks the table row; T = lp.value_tile) takes one
        // GateloopScanParams by value, which is what is pushed. Its pointers
        // come from live buffers of this context whose lengths were checked
        // against `params.dims` (contiguous strides set above; q, k, v, y in
        // elements of E, the rest f32); the
        // workspace holds ≥ lp.workspace_len f32, so chunk_gate
        // [B·H, chunks, K] and chunk_state [B·H, chunks, K, V] (complex) fit
        // and are 8-byte aligned; h0 is null iff HAS_H0 is clear. The
        // geometry (block = 32·warps ≤ 256 = __launch_bounds__, grid =
        // B·H·tiles·(chunks − 1) ≤ 2^31 − 1, static shared memory only) is
        // the one `plan` computed for these dims. The buffers outlive the
        // launch (borrowed until this function returns; cudarc's drop of a
        // CudaSlice waits on the events the guards record).
        launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_reduce")?;

        let cfg = LaunchConfig {
            grid_dim: (lp.carry_grid, 1, 1),
            block_dim: (CARRY_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = &kernels.scan_carry;
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params);
        // SAFETY: as for the reduce launch; gateloop_scan_carry reads h0
        // (when HAS_H0) and the workspace the reduce kernel wrote (same
        // stream, so ordered after it), one thread per (b, h, k, v) with
        // grid · 256 ≥ B·H·K·V and a bounds check for the rest.
        launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_carry")?;
    }
    let cfg = LaunchConfig { grid_dim: (lp.forward_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
    let kernel = &kernels.scan_forward[ti][vi];
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&params);
    // SAFETY: as for the reduce launch, with grid = B·H·tiles·chunks; the
    // workspace (when chunks > 1) was completed by the carry kernel earlier
    // on this stream; with one chunk the kernel reads h0 (or nothing) and
    // never touches the (null) workspace pointers.
    launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_forward")?;
    Ok(())
}

/// Uploads `p`, runs the scan on the Gpu's default stream (allocating the
/// workspace), downloads the outputs; synchronizes. Checks the gate domain
/// on the host.
pub fn forward_host(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    forward_host_as::<f32>(gpu, p)
}

/// [`forward_host`] with q, k, v rounded to `T` on the host before the upload
/// (log_gate and h0 stay f32) and the kernels' `T` output `y` widened back to
/// f32 (exactly).
pub fn forward_host_as<T: Element>(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    let workspace_len = |d: &Dims| Ok(plan_for(gpu, d)?.workspace_len);
    launch::forward_host::<T>(gpu, p, false, workspace_len, "synchronizing after the scan kernels", |s, d, i, o, ws| {
        forward_into(gpu, s, d, i, o, ws)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    const H200_SMS: usize = 132;

    #[test]
    fn prefer_recurrent_rule() {
        // One long sequence: only the scan has the parallelism.
        assert!(!prefer_recurrent(&dims(1, 65536, 1, 64, 64, false), H200_SMS));
        assert!(!prefer_recurrent(&dims(4, 8192, 8, 64, 64, false), H200_SMS)); // 131072 < 1.08M
        // Many heads of a big state: the recurrent kernel fills the GPU alone.
        assert!(prefer_recurrent(&dims(16, 4096, 32, 64, 64, false), H200_SMS)); // 2 097 152 ≥ 1 081 344
        assert!(prefer_recurrent(&dims(16, 2048, 16, 128, 128, true), H200_SMS));
        // The threshold is B·H·K·V ≥ 8192 · SMs.
        let at = dims(1, 10_000, 132, 64, 128, false); // 132·8192 exactly
        assert!(prefer_recurrent(&at, H200_SMS));
        let below = dims(1, 10_000, 131, 64, 128, false);
        assert!(!prefer_recurrent(&below, H200_SMS));
        // A smaller GPU is filled sooner.
        assert!(prefer_recurrent(&below, 16));
        // Short sequences: no time parallelism to gain.
        assert!(prefer_recurrent(&dims(1, SHORT_LEN, 1, 4, 4, false), H200_SMS));
        assert!(!prefer_recurrent(&dims(1, SHORT_LEN + 1, 1, 4, 4, false), H200_SMS));
        // K beyond the recurrent kernel's register budget: only the scan runs.
        assert!(!prefer_recurrent(&dims(64, 4096, 64, 512, 64, false), H200_SMS));
        // sm_count 0 is treated as 1, no overflow on huge dims.
        assert!(prefer_recurrent(&dims(1, 1000, 1, 128, 128, false), 0));
        assert!(prefer_recurrent(&dims(usize::MAX / 2, 1000, 4, 4, 4, false), H200_SMS));
    }

    #[test]
    fn plan_examples() {
        // B·H = 1, L = 65536, V = 64: 16 tiles; 4 warps give 64 chunks,
        // 1024 blocks ≥ 2·132.
        let p = plan(&dims(1, 65536, 1, 64, 64, false), H200_SMS).unwrap();
        assert_eq!((p.warps, p.value_tile, p.value_tiles, p.chunk_len, p.num_chunks), (4, 4, 16, 1024, 64));
        assert_eq!(p.forward_grid, 1024);
        assert_eq!(p.reduce_grid, 1008);
        assert_eq!(p.carry_grid, 16);
        assert_eq!(p.workspace_len, 64 * 2 * 64 + 64 * 2 * 64 * 64);
        assert_eq!(p.state_offset(&dims(1, 65536, 1, 64, 64, false)), 64 * 2 * 64);
        // Too few blocks with 4 or 2 warps: one warp per block.
        let p = plan(&dims(1, 4096, 1, 8, 8, true), H200_SMS).unwrap();
        assert_eq!((p.warps, p.value_tile, p.num_chunks), (1, 4, 16));
        // A single chunk: no workspace, no reduce/carry.
        let p = plan(&dims(512, 200, 8, 16, 1, false), H200_SMS).unwrap();
        assert_eq!((p.warps, p.value_tile, p.num_chunks, p.workspace_len), (1, 1, 1, 0));
        assert_eq!((p.reduce_grid, p.carry_grid, p.forward_grid), (0, 0, 4096));
        assert_eq!(p.scan_params(), ScanParams { steps_per_thread: STEPS_PER_THREAD, warps: 1 });
        let p = plan(&dims(64, 700, 8, 16, 2, false), H200_SMS).unwrap();
        assert_eq!((p.warps, p.value_tile, p.num_chunks), (2, 2, 2));
    }

    #[test]
    fn plan_invariants() {
        for (b, l, h, k, v) in [(1, 1, 1, 1, 1), (2, 65, 3, 5, 7), (1, 100_000, 1, 3, 2), (300, 3000, 4, 64, 64)] {
            for sms in [1, 16, 132] {
                let d = dims(b, l, h, k, v, false);
                let p = plan(&d, sms).unwrap();
                assert!(VALUE_TILES.contains(&p.value_tile));
                assert!(p.warps >= 1 && p.warps as usize <= MAX_WARPS);
                assert_eq!(p.chunk_len as usize, STEPS_PER_THREAD * 32 * p.warps as usize);
                assert_eq!(p.num_chunks as usize, l.div_ceil(p.chunk_len as usize));
                // no warp entirely past L
                assert!((p.warps as usize - 1) * 256 < l, "{d:?} {p:?}");
                assert_eq!(p.value_tiles as usize, v.div_ceil(p.value_tile as usize));
                assert_eq!(p.forward_grid as u64, (b * h) as u64 * p.value_tiles as u64 * p.num_chunks);
                if p.num_chunks > 1 {
                    assert!(p.carry_grid as usize * 256 >= b * h * k * v);
                    assert_eq!(p.workspace_len, 2 * b * h * p.num_chunks as usize * k * (v + 1));
                } else {
                    assert_eq!((p.reduce_grid, p.carry_grid, p.workspace_len), (0, 0, 0));
                }
            }
        }
    }

    #[test]
    fn plan_rejects() {
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false), 132), Err(InputError::ZeroDim { name: "len" })));
        assert!(matches!(
            plan(&dims(1 << 20, 1 << 20, 1 << 4, 1, 1, false), 132),
            Err(InputError::TooLarge { name: "grid", .. })
        ));
    }
}
