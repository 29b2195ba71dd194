//! The chunked f32 CPU path against the f32 recurrent reference.
//!
//! `cargo bench --bench cpu` (about two minutes on 2 cores).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateloop::cpu::chunked::{self, ChunkParams};
use gateloop::reference;
use gateloop::testing::{dims, random_problem, GateRegime};
use gateloop::Outputs;

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

fn benches(c: &mut Criterion) {
    bench_case(c, "B2_L2048_H8_K64_V64", dims(2, 2048, 8, 64, 64, false));
    bench_case(c, "B1_L65536_H1_K64_V64", dims(1, 65536, 1, 64, 64, false));
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
