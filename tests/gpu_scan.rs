//! The fused scan CUDA kernels (`cuda::scan`) against the f64 reference
//! (`reference::recurrent`) on the same f32-rounded inputs, and against their
//! CPU mirror (`cpu::scan`, same plan). Bounds: relative L2 ≤ 1e-4 and
//! max-abs ≤ 1e-3 · max|ref| for y and h_final (1e-3 at L = 65536). Outputs
//! are poisoned with NaN before each launch (and the workspace too), so an
//! element the kernels forget fails the test.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use gateloop::cpu;
use gateloop::cuda::scan::{DeviceInputs, DeviceOutputs, forward_host, forward_into, plan_for};
use gateloop::cuda::{Gpu, GpuError};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError, compare, compare_complex, reference};

const REL: f64 = 1e-4;
const ABS_FRAC: f64 = 1e-3;

fn flat(z: &[Complex<f32>]) -> Vec<f32> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// Runs one case through `forward_into` on a fresh stream; returns (y, h_final).
fn run_gpu(gpu: &Gpu, p32: &gateloop::testing::OwnedProblem<f32>) -> (Vec<f32>, Vec<Complex<f32>>) {
    let d = p32.dims;
    let lp = plan_for(gpu, &d).expect("plan");
    let s = gpu.context().new_stream().expect("stream");
    let q = s.clone_htod(&p32.q).unwrap();
    let k = s.clone_htod(&p32.k).unwrap();
    let v = s.clone_htod(&p32.v).unwrap();
    let log_gate = s.clone_htod(&flat(&p32.log_gate)).unwrap();
    let h0 = p32.h0.as_ref().map(|h| s.clone_htod(&flat(h)).unwrap());
    let mut y = s.clone_htod(&vec![f32::NAN; d.v_len()]).unwrap();
    let mut h_final = s.clone_htod(&vec![f32::NAN; 2 * d.state_len()]).unwrap();
    let mut ws = (lp.workspace_len > 0).then(|| s.clone_htod(&vec![f32::NAN; lp.workspace_len]).unwrap());
    forward_into(
        gpu,
        &s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        ws.as_mut().map(|w| w as _),
    )
    .unwrap_or_else(|e| panic!("{d:?}: {e}"));
    let y = s.clone_dtoh(&y).unwrap();
    let h_final = s.clone_dtoh(&h_final).unwrap();
    s.synchronize().unwrap();
    (y, h_final.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect())
}

fn check_with(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64, rel: f64, abs_frac: f64) {
    let label = format!("{d:?} {regime:?} h0={with_h0} seed={seed}");
    let p64 = random_problem(d, regime, with_h0, seed).rounded_to_f32();
    let p32 = p64.to_f32();
    let want = reference::recurrent::forward(&p64.view()).expect("reference");
    let (y, h_final) = run_gpu(gpu, &p32);
    let ey = compare(&y, &want.y);
    let eh = compare_complex(&h_final, &want.h_final);
    assert!(ey.within(rel, abs_frac), "{label}: y {ey:?}");
    assert!(eh.within(rel, abs_frac), "{label}: h_final {eh:?}");
}

fn check(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    check_with(gpu, d, regime, with_h0, seed, REL, ABS_FRAC);
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 0;
    for len in [1, 2, 63, 64, 65, 1000, 4096] {
        for key_dim in [1, 5, 16, 64] {
            for value_dim in [1, 2, 5, 16, 64] {
                seed += 1;
                let per_head = seed % 2 == 0;
                let with_h0 = (seed / 2) % 2 == 0;
                check(gpu, dims(1, len, 2, key_dim, value_dim, per_head), GateRegime::Random, with_h0, seed);
            }
        }
    }
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = seed;
    for (len, key_dim, value_dim) in [(65, 16, 5), (1000, 64, 16), (4096, 5, 64), (300, 1, 1), (20_000, 16, 16)] {
        for per_head in [false, true] {
            for with_h0 in [false, true] {
                seed += 1;
                check(gpu, dims(1, len, 2, key_dim, value_dim, per_head), regime, with_h0, seed);
            }
        }
    }
}

#[test]
fn random() {
    regime_cases(GateRegime::Random, 500);
}

#[test]
fn resets() {
    regime_cases(GateRegime::Resets(0.05), 1000);
}

#[test]
fn every_step_resets() {
    regime_cases(GateRegime::Resets(1.0), 1100);
}

#[test]
fn unit_modulus() {
    regime_cases(GateRegime::UnitModulus, 2000);
}

#[test]
fn large_phase() {
    regime_cases(GateRegime::LargePhase(50.0), 3000);
}

#[test]
fn strong_decay() {
    regime_cases(GateRegime::StrongDecay(40.0), 4000);
}

#[test]
fn mixed() {
    regime_cases(GateRegime::Mixed, 5000);
}

/// B·H = 1 at L = 65536 (64 chunks of carries), |a| = 1 and random gates.
#[test]
fn long_sequence() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check_with(gpu, dims(1, 65536, 1, 4, 8, false), GateRegime::UnitModulus, true, 9000, 1e-3, 1e-3);
    check_with(gpu, dims(1, 65536, 1, 3, 2, true), GateRegime::UnitModulus, false, 9001, 1e-3, 1e-3);
    check(gpu, dims(1, 65536, 1, 64, 64, false), GateRegime::Mixed, true, 9002);
}

/// B·H from 1 to 256: the (b, h) decomposition of the grid and the plan's
/// switch between 4, 2 and 1 warps.
#[test]
fn batch_heads_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 9100;
    for (b, h) in [(1, 1), (1, 3), (2, 2), (4, 8), (8, 16), (16, 16), (1, 256)] {
        seed += 1;
        check(gpu, dims(b, 3000, h, 8, 12, seed % 2 == 0), GateRegime::Mixed, seed % 3 != 0, seed);
    }
}

/// The kernels and the CPU mirror run the same algorithm with the same plan:
/// they agree far more tightly than either agrees with the reference (only
/// exp2f/sincosf rounding differs).
#[test]
fn matches_cpu_mirror() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(1, 5000, 1, 16, 16, false), dims(2, 777, 3, 5, 7, true), dims(1, 65536, 1, 2, 2, false)]
        .into_iter()
        .enumerate()
    {
        let p32 = random_problem(d, GateRegime::Mixed, true, 9200 + i as u64).to_f32();
        let sp = plan_for(gpu, &d).unwrap().scan_params();
        let cpu = cpu::scan::forward(&p32.view(), &sp).unwrap();
        let (y, h_final) = run_gpu(gpu, &p32);
        let (ey, eh) = (compare(&y, &cpu.y), compare_complex(&h_final, &cpu.h_final));
        assert!(ey.within(1e-5, 1e-4), "{d:?}: y vs mirror {ey:?}");
        assert!(eh.within(1e-5, 1e-4), "{d:?}: h_final vs mirror {eh:?}");
    }
}

#[test]
fn forward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for d in [dims(2, 300, 3, 64, 64, false), dims(1, 9000, 2, 16, 33, true)] {
        let p64 = random_problem(d, GateRegime::Mixed, true, 7000).rounded_to_f32();
        let p32 = p64.to_f32();
        let want = reference::recurrent::forward(&p64.view()).unwrap();
        let got = forward_host(gpu, &p32.view()).unwrap();
        let (ey, eh) = (compare(&got.y, &want.y), compare_complex(&got.h_final, &want.h_final));
        assert!(ey.within(REL, ABS_FRAC), "{d:?}: y {ey:?}");
        assert!(eh.within(REL, ABS_FRAC), "{d:?}: h_final {eh:?}");
    }
}

#[test]
fn rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    // Long enough for several chunks on any GPU, so a workspace is needed.
    let d = dims(1, 20_000, 1, 2, 3, true);
    let lp = plan_for(gpu, &d).unwrap();
    assert!(lp.num_chunks > 1 && lp.workspace_len > 0, "{lp:?}");
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()));
    let gate = buf(2 * d.gate_len());
    let short = buf(d.qk_len() - 1);
    let (mut y, mut h_final) = (buf(d.v_len()), buf(2 * d.state_len()));
    let mut ws = buf(lp.workspace_len);
    let mut small_ws = buf(lp.workspace_len - 1);
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let inputs = |q| DeviceInputs { q, k: &k, v: &v, log_gate: &gate, h0: None };
    let e = forward_into(gpu, s, &d, inputs(&short), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut ws));
    assert_eq!(name_of(e.unwrap_err()), "q");
    let e = forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, None);
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    let e = forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut small_ws));
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    let mut short_h = buf(d.state_len());
    let e = forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut short_h }, Some(&mut ws));
    assert_eq!(name_of(e.unwrap_err()), "h_final");
    forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut ws)).unwrap();
    s.synchronize().unwrap();
}
