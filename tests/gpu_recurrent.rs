//! The recurrent CUDA kernel against the f64 reference (`reference::recurrent`)
//! on the same f32-rounded inputs. Bounds: relative L2 ≤ 1e-4 and
//! max-abs ≤ 1e-3 · max|ref|, for y and h_final. Outputs are poisoned with NaN
//! before each launch, so an element the kernel forgets fails the test.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use common::{ABS_FRAC, Case, REL, assert_outputs, regime_matrix, regime_tests, run_forward};
use gateloop::cuda::chunk::Gates;
use gateloop::cuda::recurrent::{
    self, DeviceInputs, DeviceOutputs, RecurrentConfig, RecurrentRows, RecurrentStaging, forward_host,
    forward_host_with, forward_into, forward_into_with, forward_real_host_as, forward_real_into,
};
use gateloop::cuda::{Dtype, Element, Gpu, GpuError};
use gateloop::testing::{GateRegime, OwnedProblem, dims};
use gateloop::{Complex, Dims, InputError, Mode, Outputs, reference};

/// Runs one case through `forward_into` on a fresh stream and checks it.
fn check(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    check_case(gpu, Case::new(d, regime, with_h0, seed));
}

fn check_case(gpu: &Gpu, case: Case) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let label = case.label();
    let (p32, want) = case.with_reference();
    let (y, h_final) = run_forward::<f32>(gpu, &p32, 0, |s, d, i, o, _| forward_into(gpu, s, d, i, o))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_outputs(&label, &y, &h_final, &want, REL, ABS_FRAC);
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    common::shape_sweep(&[1, 2, 63, 64, 65, 1000], &[1, 5, 16, 64, 128], &[1, 5, 16, 64, 128], 0, |c| {
        check_case(gpu, c)
    });
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(65, 16, 5), (1000, 64, 128), (200, 128, 33), (64, 5, 64)];
    regime_matrix(2, 3, &shapes, regime, seed, |c| check_case(gpu, c));
}

regime_tests! { regime_cases:
    resets => GateRegime::Resets(0.2), 1000;
    every_step_resets => GateRegime::Resets(1.0), 1100;
    unit_modulus => GateRegime::UnitModulus, 2000;
    large_phase => GateRegime::LargePhase(50.0), 3000;
    strong_decay => GateRegime::StrongDecay(30.0), 4000;
    mixed => GateRegime::Mixed, 5000;
}

#[test]
fn largest_key_dim_and_odd_sizes() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check(gpu, dims(1, 100, 2, 256, 40, false), GateRegime::Random, true, 6000);
    check(gpu, dims(3, 17, 5, 129, 97, true), GateRegime::Mixed, true, 6001);
    check(gpu, dims(1, 70, 1, 200, 1, false), GateRegime::Resets(0.1), false, 6002);
}

/// y and h_final of two runs equal bit for bit (lengths included).
fn assert_same_bits(label: &str, got: &Outputs<f32>, want: &Outputs<f32>) {
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cbits = |h: &[Complex<f32>]| h.iter().flat_map(|z| [z.re.to_bits(), z.im.to_bits()]).collect::<Vec<_>>();
    assert!(bits(&got.y) == bits(&want.y), "{label}: y differs");
    assert!(cbits(&got.h_final) == cbits(&want.h_final), "{label}: h_final differs");
}

/// The cases of the launch-choice tests below: every R of either plan
/// (K = 1, 5, 16, 40, 64, 130, 256), L = 1, L not a multiple of any chunk,
/// one and several value tiles, both gate layouts, resets, |a| = 1, phases
/// ≫ 2π, strong decay.
fn launch_choice_cases() -> [(Dims, GateRegime); 7] {
    [
        (dims(1, 1, 1, 1, 1, false), GateRegime::Random),
        (dims(2, 100, 2, 5, 7, true), GateRegime::Resets(0.2)),
        (dims(1, 130, 1, 16, 40, false), GateRegime::UnitModulus),
        (dims(2, 301, 3, 64, 64, false), GateRegime::LargePhase(50.0)),
        (dims(1, 77, 1, 130, 33, true), GateRegime::Mixed),
        (dims(1, 45, 1, 256, 5, false), GateRegime::StrongDecay(30.0)),
        (dims(1, 200, 2, 40, 70, false), GateRegime::Resets(0.05)),
    ]
}

/// The ahead staging (the next chunk's loads in flight during each chunk's
/// recurrence, shorter chunks) gives the batched kernel's y and h_final bit
/// for bit, and both are within the bounds of the reference, f32 and bf16.
#[test]
fn ahead_staging_matches_batched_bit_for_bit() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, (d, regime)) in launch_choice_cases().into_iter().enumerate() {
        let case = Case::new(d, regime, i % 2 == 0, 7100 + i as u64);
        let label = case.label();
        let (p32, want) = case.with_reference();
        let run = |staging| forward_host_with::<f32>(gpu, &p32.view(), staging).unwrap();
        let ahead = run(RecurrentStaging::Ahead);
        assert_outputs(&label, &ahead.y, &ahead.h_final, &want, REL, ABS_FRAC);
        assert_same_bits(&label, &ahead, &run(RecurrentStaging::Batched));
        let run = |staging| forward_host_with::<half::bf16>(gpu, &p32.view(), staging).unwrap();
        assert_same_bits(&format!("{label} bf16"), &run(RecurrentStaging::Ahead), &run(RecurrentStaging::Batched));
    }
}

/// The default staging (`RecurrentStaging::Auto`) decides on the device:
/// the plan a launch takes is Batched's or Ahead's, never Auto, and its
/// outputs are both stagings' bits (the rule itself:
/// `RecurrentStaging::auto_choice`'s unit test).
#[test]
fn auto_staging_decides_by_rounds_and_gives_the_same_bits() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let sm_count = gateloop::cuda::scan::sm_count(gpu).unwrap() as u64;
    for (i, (d, regime)) in launch_choice_cases().into_iter().enumerate().take(3) {
        let on = recurrent::plan_on(gpu, &d, RecurrentConfig::default(), Dtype::F32, Gates::Complex).unwrap();
        let forced = |staging| recurrent::plan_on(gpu, &d, staging, Dtype::F32, Gates::Complex).unwrap();
        let (batched, ahead) = (forced(RecurrentStaging::Batched), forced(RecurrentStaging::Ahead));
        assert!(on == batched || on == ahead, "{d:?}: {on:?}");
        // The second choice reads the Gpu's cached residencies: the same plan.
        let again = recurrent::plan_on(gpu, &d, RecurrentConfig::default(), Dtype::F32, Gates::Complex).unwrap();
        assert_eq!(again, on, "{d:?}");
        // Forced stagings are planned as asked.
        assert_eq!((batched.staging, ahead.staging), (RecurrentStaging::Batched, RecurrentStaging::Ahead));
        // These grids (at most a few dozen blocks) fit one round of any
        // GPU's SMs at one block each: Auto takes Ahead wherever the driver
        // says both kernels can be resident.
        if u64::from(on.grid) <= sm_count {
            assert_eq!(on.staging, RecurrentStaging::Ahead, "{d:?}: {on:?}");
        }
        let case = Case::new(d, regime, i % 2 == 0, 7150 + i as u64);
        let (p32, _) = case.with_reference();
        let default = forward_host(gpu, &p32.view()).unwrap();
        assert_same_bits(
            &case.label(),
            &default,
            &forward_host_with::<f32>(gpu, &p32.view(), batched.staging).unwrap(),
        );
    }
}

/// Four state rows a thread (`RecurrentRows::Four`: at K = 64 sixteen
/// warps a block instead of eight, 15-step chunks, the readout summed over
/// 16 key groups) is within the reference's bounds (outputs poisoned), with
/// either staging (bit for bit each other), in f32 and bf16; where it gives
/// the default's R (K = 1, 130, 256) it is the default bit for bit.
#[test]
fn four_rows_a_thread_match_the_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let four = RecurrentConfig { staging: RecurrentStaging::Batched, rows: RecurrentRows::Four };
    let ahead_four = RecurrentConfig { staging: RecurrentStaging::Ahead, rows: RecurrentRows::Four };
    for (i, (d, regime)) in launch_choice_cases().into_iter().enumerate() {
        let case = Case::new(d, regime, i % 2 == 1, 7200 + i as u64);
        let plan = recurrent::plan_with(&d, four).unwrap();
        let label = format!("{} {plan:?}", case.label());
        let (p32, want) = case.with_reference();
        let (y, h_final) = run_forward::<f32>(gpu, &p32, 0, |s, d, i, o, _| forward_into_with(gpu, s, d, four, i, o))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_outputs(&label, &y, &h_final, &want, REL, ABS_FRAC);
        let got = Outputs { y, h_final };
        assert_same_bits(
            &format!("{label} ahead"),
            &forward_host_with::<f32>(gpu, &p32.view(), ahead_four).unwrap(),
            &got,
        );
        if plan.rows_per_thread == recurrent::plan(&d).unwrap().rows_per_thread {
            assert_same_bits(&format!("{label} default"), &forward_host(gpu, &p32.view()).unwrap(), &got);
        }
        let run = |config: RecurrentConfig| forward_host_with::<half::bf16>(gpu, &p32.view(), config).unwrap();
        assert_same_bits(&format!("{label} bf16"), &run(ahead_four), &run(four));
    }
}

/// Runs the real-gate kernel (`forward_real_into`) on the real parts of
/// `p32`'s log_gate and h0 (their imaginary parts must be 0), y and h_final
/// poisoned with NaN; returns y widened and h_final as complex with Im = 0.
fn run_real<T: Element>(gpu: &Gpu, p32: &OwnedProblem<f32>, config: RecurrentConfig) -> Outputs<f32> {
    let (y, h_final) = common::run_forward_gates::<T>(gpu, p32, 0, true, 0, |s, d, i, o, _| {
        forward_real_into(gpu, s, d, config, i, o)
    })
    .unwrap_or_else(|e| panic!("{} {:?} {config:?}: {e}", T::DTYPE, p32.dims));
    Outputs { y: y.iter().map(|x| x.to_f32()).collect(), h_final }
}

/// Real gates (gated linear attention, `forward_real_into`): in every regime
/// that has a real form, every R of the plans (K = 1 to 256), L = 1 and L
/// not a multiple of any chunk, both gate layouts, with and without h0, and
/// every launch choice: within the reference's bounds (f32), and the same
/// bits as the complex kernel on the same gates with phase 0 (f32 and bf16).
#[test]
fn real_gates_match_the_reference_and_the_complex_kernel() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let (ahead, batched, four) = (RecurrentStaging::Ahead, RecurrentStaging::Batched, RecurrentRows::Four);
    let configs = [
        RecurrentConfig::default(),
        batched.into(),
        ahead.into(),
        RecurrentConfig { staging: batched, rows: four },
        RecurrentConfig { staging: ahead, rows: four },
    ];
    let shapes = [(1, 1, 1), (100, 5, 7), (130, 16, 40), (301, 64, 64), (77, 130, 33), (45, 256, 5)];
    for (i, (regime, &(l, k, v))) in common::REAL_REGIMES.iter().cycle().zip(shapes.iter().cycle()).take(9).enumerate()
    {
        let d = dims(1 + i % 2, l, 1 + i % 3, k, v, i % 2 == 1);
        if common::emulated_device_skips(&d) {
            continue;
        }
        let case = Case::new(d, *regime, i % 3 != 1, 7300 + i as u64);
        let p64 = common::real_gates(case.problem()).rounded_to_f32();
        let want = reference::recurrent::forward(&p64.view()).expect("reference");
        let p32 = p64.to_f32();
        for config in configs {
            let label = format!("{} {config:?} {:?}", case.label(), recurrent::plan_with(&d, config).unwrap());
            let got = run_real::<f32>(gpu, &p32, config);
            assert_outputs(&label, &got.y, &got.h_final, &want, REL, ABS_FRAC);
            assert_same_bits(&label, &got, &forward_host_with::<f32>(gpu, &p32.view(), config).unwrap());
            // q, k, v rounded to bf16 on the host by both calls.
            let complex = forward_host_with::<half::bf16>(gpu, &p32.view(), config).unwrap();
            assert_same_bits(&format!("{label} bf16"), &run_real::<half::bf16>(gpu, &p32, config), &complex);
        }
    }
}

/// The real-gate conveniences: the host call and `dispatch` (which takes the
/// real kernel for real gates) against the reference; complex data refused
/// by the real-gate host call, naming the tensor; the device call wants real
/// (half-length) gates and states.
#[test]
fn real_gate_conveniences_and_errors() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let case = Case::new(dims(2, 300, 3, 16, 16, false), GateRegime::Resets(0.05), true, 7400);
    let p64 = common::real_gates(case.problem()).rounded_to_f32();
    let want: Outputs<f64> = reference::recurrent::forward(&p64.view()).unwrap();
    let p32 = p64.to_f32();
    let got = forward_real_host_as::<f32>(gpu, &p32.view(), RecurrentConfig::default()).unwrap();
    assert_outputs(&case.label(), &got.y, &got.h_final, &want, REL, ABS_FRAC);
    let four = forward_real_host_as::<f32>(gpu, &p32.view(), RecurrentRows::Four).unwrap();
    assert_outputs(&format!("{} four rows", case.label()), &four.y, &four.h_final, &want, REL, ABS_FRAC);
    let via = gateloop::dispatch::cuda_f32(gpu, Mode::Recurrent, &p32.view()).unwrap();
    assert_same_bits(&case.label(), &via, &got);
    match forward_real_host_as::<f32>(gpu, &case.problem().to_f32().view(), RecurrentConfig::default()) {
        Err(GpuError::Input(InputError::Value { name: "log_gate", .. })) => {}
        other => panic!("expected a log_gate value error, got {other:?}"),
    }
    let d = p32.dims;
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()));
    let (complex_gate, real_gate) = (buf(2 * d.gate_len()), buf(d.gate_len()));
    let (mut y, mut complex_state) = (buf(d.v_len()), buf(2 * d.state_len()));
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let inputs = |g| DeviceInputs { q: &q, k: &k, v: &v, log_gate: g, h0: None };
    let config = RecurrentConfig::default();
    let out = DeviceOutputs { y: &mut y, h_final: &mut complex_state };
    assert_eq!(name_of(forward_real_into(gpu, s, &d, config, inputs(&complex_gate), out).unwrap_err()), "log_gate");
    let out = DeviceOutputs { y: &mut y, h_final: &mut complex_state };
    assert_eq!(name_of(forward_real_into(gpu, s, &d, config, inputs(&real_gate), out).unwrap_err()), "h_final");
}

#[test]
fn forward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let case = Case::new(dims(2, 300, 3, 64, 64, false), GateRegime::Mixed, true, 7000);
    let (p32, want) = case.with_reference();
    let got = forward_host(gpu, &p32.view()).unwrap();
    assert_outputs(&case.label(), &got.y, &got.h_final, &want, REL, ABS_FRAC);
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
