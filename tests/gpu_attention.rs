//! The attention CUDA kernels against the f64 recurrent reference on the same
//! f32-rounded inputs. Bounds: relative L2 ≤ 1e-4 and max-abs ≤ 1e-3·max|ref|,
//! for y and h_final. Outputs are poisoned with NaN before each launch, so an
//! element the kernels forget fails the test.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use gateloop::cuda::Gpu;
use gateloop::cuda::attention::{forward_host, forward_into};
use gateloop::cuda::recurrent::{DeviceInputs, DeviceOutputs};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, compare, compare_complex, reference};

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
    for len in [1, 2, 63, 64, 65, 1000, 4096] {
        for key_dim in [1, 5, 16, 64] {
            for value_dim in [1, 5, 16, 64] {
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
    for (len, key_dim, value_dim) in [(65, 16, 5), (1000, 64, 128), (200, 256, 33), (64, 5, 64), (129, 17, 65)] {
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

/// B·H from 1 to 256 blocks of heads.
#[test]
fn many_heads() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, (batch, heads)) in [(1, 1), (2, 3), (4, 16), (16, 16), (1, 256)].into_iter().enumerate() {
        let per_head = i % 2 == 0;
        check(gpu, dims(batch, 130, heads, 8, 8, per_head), GateRegime::Mixed, true, 5500 + i as u64);
    }
}

/// |a| = 1 and phases ≫ 2π at L = 65536: exact within f32 accumulation.
#[test]
fn length_65536_exact() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (regime, seed) in [(GateRegime::UnitModulus, 7000), (GateRegime::LargePhase(50.0), 7001)] {
        for (key_dim, value_dim, per_head) in [(1, 1, false), (2, 2, true), (16, 16, false)] {
            check(gpu, dims(1, 65536, 1, key_dim, value_dim, per_head), regime, true, seed);
        }
    }
}

/// The GPU agrees with its CPU mirror (same algorithm, same order) more
/// tightly than either agrees with the reference bound.
#[test]
fn matches_cpu_mirror() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 700, 3, 24, 40, false);
    let p = random_problem(d, GateRegime::Mixed, true, 8000).to_f32();
    let cpu = gateloop::cpu::attention::forward(&p.view(), &Default::default()).unwrap();
    let got = forward_host(gpu, &p.view()).unwrap();
    let (ey, eh) = (compare(&got.y, &cpu.y), compare_complex(&got.h_final, &cpu.h_final));
    assert!(ey.within(1e-5, 1e-4), "y {ey:?}");
    assert!(eh.within(1e-5, 1e-4), "h_final {eh:?}");
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
