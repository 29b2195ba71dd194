//! A cudarc or candle user already holds a context of their own: cudarc's
//! `CudaContext::new(ordinal)` retains the device's primary context, the one
//! `Gpu::new` retains, and the launchers compare contexts by their driver
//! handle. So streams and buffers of the caller's own `Arc<CudaContext>` are
//! accepted by the `_into` launchers without copies, and give the same bits
//! as the Gpu's own stream: the chunked forward and backward in bf16 and the
//! recurrent forward in f32 here, every buffer poisoned before the launch;
//! and `Gpu::with_context` loads the kernels into the caller's context.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use std::sync::Arc;

use common::flat;
use gateloop::Dims;
use gateloop::cuda::chunk::{self, ChunkPrecision, Gates};
use gateloop::cuda::chunk_grad::{self, DeviceGradInputs, DeviceGrads};
use gateloop::cuda::half::bf16;
use gateloop::cuda::{DeviceInputs, DeviceOutputs, Dtype, Element, recurrent};
use gateloop::testing::{GateRegime, OwnedProblem, random_problem};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

/// A problem with resets, h0 and a length that is no multiple of a chunk,
/// q, k, v exact in bf16.
fn problem(seed: u64) -> OwnedProblem<f32> {
    let p = random_problem(Dims::new(2, 150, 3, 16, 24), GateRegime::Resets(0.05), true, seed);
    p.map_qkv(|x| f64::from(bf16::from_f64(x).to_f32())).to_f32()
}

fn download<T: Element>(s: &Arc<CudaStream>, x: &CudaSlice<T>) -> Vec<f32> {
    s.clone_dtoh(x).unwrap().into_iter().map(|x| x.to_f32()).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|x| x.to_bits()).collect()
}

/// The caller's context: the device's primary context, as cudarc (and
/// candle's CUDA device, built on it) opens it.
fn callers_context(ordinal: usize) -> Arc<CudaContext> {
    CudaContext::new(ordinal).expect("the caller's own context")
}

/// `p`'s inputs uploaded on a new stream of the caller's own context, q, k
/// and v as `T` (`common::upload`), and its h0.
struct OnCallersStream<T> {
    s: Arc<CudaStream>,
    u: common::Uploaded<T>,
    h0: CudaSlice<f32>,
}

impl<T: Element> OnCallersStream<T> {
    fn new(ordinal: usize, p: &OwnedProblem<f32>) -> Self {
        let s = callers_context(ordinal).new_stream().unwrap();
        let (u, h0) = (common::upload(&s, p), s.clone_htod(&flat(p.h0.as_ref().unwrap())).unwrap());
        OnCallersStream { s, u, h0 }
    }

    fn inputs(&self) -> DeviceInputs<'_, T> {
        let u = &self.u;
        DeviceInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &u.log_gate, h0: Some(&self.h0) }
    }

    /// A buffer of n NaNs (of `U`) on the stream.
    fn nan<U: Element>(&self, n: usize) -> CudaSlice<U> {
        self.s.clone_htod(&vec![U::nan(); n]).unwrap()
    }
}

#[test]
fn a_callers_own_primary_context_is_the_gpus() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let ctx = callers_context(gpu.ordinal());
    assert!(!Arc::ptr_eq(&ctx, gpu.context()), "a separate Arc<CudaContext>");
    assert_eq!(*ctx, **gpu.context(), "the same primary context");
}

#[test]
fn chunked_forward_and_backward_take_the_callers_buffers() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let p = problem(7);
    let d = p.dims;
    let c = OnCallersStream::<bf16>::new(gpu.ordinal(), &p);
    let s = &c.s;
    let nan = |n: usize| c.nan::<f32>(n);
    let nan_bf16 = |n: usize| c.nan::<bf16>(n);

    let mut y = nan_bf16(d.v_len());
    let mut h_final = nan(2 * d.state_len());
    let mut ws = nan(chunk::plan(&d, Dtype::Bf16, Gates::Complex).unwrap().workspace_len);
    chunk::forward_into::<bf16>(
        gpu,
        s,
        &d,
        c.inputs(),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut ws),
        ChunkPrecision::Exact,
    )
    .unwrap();
    let own = chunk::forward_host_as::<bf16>(gpu, &p.view(), ChunkPrecision::Exact).unwrap();
    assert_eq!(bits(&download(s, &y)), bits(&own.y), "y");
    assert_eq!(bits(&download(s, &h_final)), bits(&flat(&own.h_final)), "h_final");

    let dy_bf16: Vec<bf16> = (0..d.v_len()).map(|i| bf16::from_f32((0.37 * i as f32).sin())).collect();
    let dy_host: Vec<f32> = dy_bf16.iter().map(|x| x.to_f32()).collect();
    let dy = s.clone_htod(&dy_bf16).unwrap();
    let (mut dq, mut dk, mut dv) = (nan_bf16(d.qk_len()), nan_bf16(d.qk_len()), nan_bf16(d.v_len()));
    let (mut dg, mut dh0) = (nan(2 * d.gate_len()), nan(2 * d.state_len()));
    let mut ws = nan(chunk_grad::plan(&d, Dtype::Bf16, Gates::Complex).unwrap().workspace_len);
    chunk_grad::backward_into::<bf16>(
        gpu,
        s,
        &d,
        c.inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: Some(&mut dh0) },
        Some(&mut ws),
        ChunkPrecision::Exact,
    )
    .unwrap();
    let own = chunk_grad::backward_host_as::<bf16>(gpu, &p.view(), &dy_host, None, ChunkPrecision::Exact).unwrap();
    assert_eq!(bits(&download(s, &dq)), bits(&own.dq), "dq");
    assert_eq!(bits(&download(s, &dk)), bits(&own.dk), "dk");
    assert_eq!(bits(&download(s, &dv)), bits(&own.dv), "dv");
    assert_eq!(bits(&download(s, &dg)), bits(&flat(&own.dlog_gate)), "dlog_gate");
    assert_eq!(bits(&download(s, &dh0)), bits(&flat(own.dh0.as_ref().unwrap())), "dh0");
    s.synchronize().unwrap();
}

#[test]
fn the_recurrence_takes_the_callers_buffers() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let p = problem(8);
    let d = p.dims;
    let c = OnCallersStream::<f32>::new(gpu.ordinal(), &p);
    let s = &c.s;
    let mut y = c.nan::<f32>(d.v_len());
    let mut h_final = c.nan::<f32>(2 * d.state_len());
    recurrent::forward_into::<f32>(gpu, s, &d, c.inputs(), DeviceOutputs { y: &mut y, h_final: &mut h_final }).unwrap();
    let own = recurrent::forward_host(gpu, &p.view()).unwrap();
    assert_eq!(bits(&download(s, &y)), bits(&own.y), "y");
    assert_eq!(bits(&download(s, &h_final)), bits(&flat(&own.h_final)), "h_final");
    s.synchronize().unwrap();
}

#[test]
fn a_gpu_made_from_the_callers_context_runs_in_it() {
    let Some(shared) = common::gpu_or_skip() else { return };
    let ctx = callers_context(shared.ordinal());
    let gpu = gateloop::cuda::Gpu::with_context(ctx.clone()).expect("the kernels loaded into the caller's context");
    assert!(Arc::ptr_eq(gpu.context(), &ctx), "the Gpu holds the caller's Arc");
    assert_eq!(gpu.name(), shared.name());
    assert_eq!(gpu.compute_capability(), shared.compute_capability());
    let p = problem(9);
    let mine = chunk::forward_host_as::<bf16>(&gpu, &p.view(), ChunkPrecision::Exact).unwrap();
    let theirs = chunk::forward_host_as::<bf16>(shared, &p.view(), ChunkPrecision::Exact).unwrap();
    assert_eq!(bits(&mine.y), bits(&theirs.y), "y");
    assert_eq!(bits(&flat(&mine.h_final)), bits(&flat(&theirs.h_final)), "h_final");
}
