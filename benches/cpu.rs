//! The chunked f32 CPU path against the f32 recurrent reference, the
//! chunked f32 backward against the f32 reference backward, and the fused
//! scan backward's CPU mirror.
//!
//! `cargo bench --bench cpu` (about two minutes on 2 cores);
//! `cargo bench --bench cpu -- backward` for the backward groups alone,
//! `cargo bench --bench cpu -- scan_backward` for the scan backward's.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateloop::Outputs;
use gateloop::cpu::chunked::{self, ChunkParams};
use gateloop::cpu::chunked_grad;
use gateloop::cpu::scan_grad;
use gateloop::cuda::scan_grad::plan as scan_grad_plan;
use gateloop::dispatch::MIRROR_SM_COUNT;
use gateloop::reference;
use gateloop::reference::grad::{GradInputs, Grads};
use gateloop::testing::{GateRegime, dims, random_problem};

fn bench_case(c: &mut Criterion, name: &str, d: gateloop::Dims) {
    let p = random_problem(d, GateRegime::Random, true, 1).to_f32();
    let view = p.view();
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements((d.batch * d.len * d.heads) as u64));
    let mut out = Outputs::<f32>::zeros(&d);
    let params = ChunkParams::default();
    g.bench_function(BenchmarkId::new("chunked_f32", "64/16"), |b| {
        b.iter(|| chunked::forward_into(&view, &params, out.as_mut()).unwrap())
    });
    g.bench_function(BenchmarkId::new("recurrent_f32", "reference"), |b| {
        b.iter(|| reference::recurrent::forward::<f32>(&view).unwrap())
    });
    g.finish();
}

/// The backward on a small shape: the chunked forward alone, the chunked
/// forward + backward (what a training step runs), and the f32 reference
/// backward (the adjoint recurrence, with its own recomputing forward).
fn bench_backward(c: &mut Criterion, name: &str, d: gateloop::Dims) {
    let p = random_problem(d, GateRegime::Random, true, 1).to_f32();
    let up = random_problem(d, GateRegime::Random, true, 2).to_f32();
    let view = p.view();
    let g = GradInputs::new(&d, &up.v, up.h0.as_deref()).unwrap();
    let mut group = c.benchmark_group(name);
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements((d.batch * d.len * d.heads) as u64));
    let mut out = Outputs::<f32>::zeros(&d);
    let mut grads = Grads::<f32>::zeros(&d, true);
    let params = ChunkParams::default();
    group.bench_function(BenchmarkId::new("chunked_f32", "forward"), |b| {
        b.iter(|| chunked::forward_into(&view, &params, out.as_mut()).unwrap())
    });
    group.bench_function(BenchmarkId::new("chunked_f32", "forward+backward"), |b| {
        b.iter(|| {
            chunked::forward_into(&view, &params, out.as_mut()).unwrap();
            chunked_grad::backward_into(&view, &g, &params, grads.as_mut()).unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("reference_f32", "backward"), |b| {
        b.iter(|| reference::grad::backward_into(&view, &g, grads.as_mut()).unwrap())
    });
    group.finish();
}

/// The fused scan backward's CPU mirror (the kernel's geometry for these
/// dims) on a small shape, against the f32 reference backward.
fn bench_scan_backward(c: &mut Criterion, name: &str, d: gateloop::Dims) {
    let p = random_problem(d, GateRegime::Random, true, 1).to_f32();
    let up = random_problem(d, GateRegime::Random, true, 2).to_f32();
    let view = p.view();
    let g = GradInputs::new(&d, &up.v, up.h0.as_deref()).unwrap();
    let params = scan_grad_plan(&d, MIRROR_SM_COUNT).unwrap().grad_params();
    let mut group = c.benchmark_group(name);
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements((d.batch * d.len * d.heads) as u64));
    let mut grads = Grads::<f32>::zeros(&d, true);
    group.bench_function(BenchmarkId::new("scan_grad_f32", "mirror"), |b| {
        b.iter(|| scan_grad::backward_into(&view, &g, &params, grads.as_mut()).unwrap())
    });
    group.bench_function(BenchmarkId::new("reference_f32", "backward"), |b| {
        b.iter(|| reference::grad::backward_into(&view, &g, grads.as_mut()).unwrap())
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_scan_backward(c, "scan_backward_B1_L2048_H2_K16_V16", dims(1, 2048, 2, 16, 16, false));
    bench_backward(c, "backward_B2_L1024_H4_K32_V32", dims(2, 1024, 4, 32, 32, false));
    bench_case(c, "B2_L2048_H8_K64_V64", dims(2, 2048, 8, 64, 64, false));
    bench_case(c, "B1_L65536_H1_K64_V64", dims(1, 65536, 1, 64, 64, false));
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
