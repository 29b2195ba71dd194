//! The recurrent CUDA kernel against the f64 reference (`reference::recurrent`)
//! on the same f32-rounded inputs. Bounds: relative L2 ≤ 1e-4 and
//! max-abs ≤ 1e-3 · max|ref|, for y and h_final. Outputs are poisoned with NaN
//! before each launch, so an element the kernel forgets fails the test.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use gateloop::cuda::recurrent::{DeviceInputs, DeviceOutputs, forward_host, forward_into};
use gateloop::cuda::{Gpu, GpuError};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError, compare, compare_complex, reference};

const REL: f64 = 1e-4;
const ABS_FRAC: f64 = 1e-3;

fn flat(z: &[Complex<f32>]) -> Vec<f32> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// Runs one case through `forward_into` on a fresh stream and checks it.
fn check(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    let label = format!("{d:?} {regime:?} h0={with_h0} seed={seed}");
    let p64 = random_problem(d, regime, with_h0, seed).rounded_to_f32();
    let p32 = p64.to_f32();
    let want = reference::recurrent::forward(&p64.view()).expect("reference");

    let s = gpu.context().new_stream().expect("stream");
    let q = s.clone_htod(&p32.q).unwrap();
    let k = s.clone_htod(&p32.k).unwrap();
    let v = s.clone_htod(&p32.v).unwrap();
    let log_gate = s.clone_htod(&flat(&p32.log_gate)).unwrap();
    let h0 = p32.h0.as_ref().map(|h| s.clone_htod(&flat(h)).unwrap());
    let mut y = s.clone_htod(&vec![f32::NAN; d.v_len()]).unwrap();
    let mut h_final = s.clone_htod(&vec![f32::NAN; 2 * d.state_len()]).unwrap();
    forward_into(
        gpu,
        &s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
    )
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let y = s.clone_dtoh(&y).unwrap();
    let h_final = s.clone_dtoh(&h_final).unwrap();
    s.synchronize().unwrap();
    let h_final: Vec<Complex<f32>> = h_final.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect();

    let ey = compare(&y, &want.y);
    let eh = compare_complex(&h_final, &want.h_final);
    assert!(ey.within(REL, ABS_FRAC), "{label}: y {ey:?}");
    assert!(eh.within(REL, ABS_FRAC), "{label}: h_final {eh:?}");
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 0;
    for len in [1, 2, 63, 64, 65, 1000] {
        for key_dim in [1, 5, 16, 64, 128] {
            for value_dim in [1, 5, 16, 64, 128] {
                seed += 1;
                // Alternate the gate layout and h0 so every combination of
                // them meets every size class.
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
    for (len, key_dim, value_dim) in [(65, 16, 5), (1000, 64, 128), (200, 128, 33), (64, 5, 64)] {
        for per_head in [false, true] {
            for with_h0 in [false, true] {
                seed += 1;
                check(gpu, dims(2, len, 3, key_dim, value_dim, per_head), regime, with_h0, seed);
            }
        }
    }
}

#[test]
fn resets() {
    regime_cases(GateRegime::Resets(0.2), 1000);
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
    regime_cases(GateRegime::StrongDecay(30.0), 4000);
}

#[test]
fn mixed() {
    regime_cases(GateRegime::Mixed, 5000);
}

#[test]
fn largest_key_dim_and_odd_sizes() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check(gpu, dims(1, 100, 2, 256, 40, false), GateRegime::Random, true, 6000);
    check(gpu, dims(3, 17, 5, 129, 97, true), GateRegime::Mixed, true, 6001);
    check(gpu, dims(1, 70, 1, 200, 1, false), GateRegime::Resets(0.1), false, 6002);
}

#[test]
fn forward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 300, 3, 64, 64, false);
    let p64 = random_problem(d, GateRegime::Mixed, true, 7000).rounded_to_f32();
    let p32 = p64.to_f32();
    let want = reference::recurrent::forward(&p64.view()).unwrap();
    let got = forward_host(gpu, &p32.view()).unwrap();
    let (ey, eh) = (compare(&got.y, &want.y), compare_complex(&got.h_final, &want.h_final));
    assert!(ey.within(REL, ABS_FRAC), "y {ey:?}");
    assert!(eh.within(REL, ABS_FRAC), "h_final {eh:?}");
}

#[test]
fn rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 4, 3, 8, 6, true);
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()));
    let gate = buf(2 * d.gate_len());
    let h0 = buf(2 * d.state_len());
    let short = buf(d.qk_len() - 1);
    let (mut y, mut h_final) = (buf(d.v_len()), buf(2 * d.state_len()));
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    type Buf = cudarc::driver::CudaSlice<f32>;
    #[allow(clippy::too_many_arguments)]
    fn call(
        gpu: &Gpu,
        d: &Dims,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        log_gate: &Buf,
        h0: Option<&Buf>,
        y: &mut Buf,
        h_final: &mut Buf,
    ) -> Result<(), GpuError> {
        let h0 = h0.map(|h| h as _);
        forward_into(gpu, gpu.stream(), d, DeviceInputs { q, k, v, log_gate, h0 }, DeviceOutputs { y, h_final })
    }
    let run = |q, k, v, g, h0, y: &mut Buf, hf: &mut Buf| call(gpu, &d, q, k, v, g, h0, y, hf);
    assert_eq!(name_of(run(&short, &k, &v, &gate, None, &mut y, &mut h_final).unwrap_err()), "q");
    assert_eq!(name_of(run(&q, &k, &short, &gate, None, &mut y, &mut h_final).unwrap_err()), "v");
    // a per-head gate is [B, L, H, 1] complex: 2·B·L·H f32; a per-channel one is not
    assert_eq!(name_of(run(&q, &k, &v, &q, None, &mut y, &mut h_final).unwrap_err()), "log_gate");
    assert_eq!(name_of(run(&q, &k, &v, &gate, Some(&gate), &mut y, &mut h_final).unwrap_err()), "h0");
    let mut short_y = buf(d.v_len() + 1);
    assert_eq!(name_of(run(&q, &k, &v, &gate, Some(&h0), &mut short_y, &mut h_final).unwrap_err()), "y");
    let mut short_h = buf(d.state_len());
    assert_eq!(name_of(run(&q, &k, &v, &gate, Some(&h0), &mut y, &mut short_h).unwrap_err()), "h_final");
    run(&q, &k, &v, &gate, Some(&h0), &mut y, &mut h_final).unwrap();
    s.synchronize().unwrap();
}
