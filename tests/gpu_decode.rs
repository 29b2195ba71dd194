//! Decoding on the GPU (`cuda::recurrent::decode_into`): a state buffer
//! advanced IN PLACE by T ≥ 1 steps per call.
//!
//! A sequence of length L is fed in pieces (one step at a time, or pieces of
//! mixed lengths across the kernel's 64-step staging chunks); the pieces' y
//! concatenated and the state after the last piece are checked against the
//! f64 reference run on the whole sequence at once (h0 = the initial state),
//! on the same rounded inputs, with the bounds of tests/gpu_dtypes.rs (f32:
//! relative L2 ≤ 1e-4; y in f16 ≤ 5.9e-4, bf16 ≤ 4.0e-3; the state, f32,
//! ≤ 1e-4). They are also checked to be BIT-identical to one `forward_into`
//! over the whole sequence: the same kernel does the same f32 operations per
//! step whatever the chunking, so any difference would be an aliasing or
//! indexing bug of the in-place path. y is poisoned with NaN before every call.
//!
//! `sanitizer_smoke` is the small case the GPU bundle runs under
//! compute-sanitizer (memcheck, racecheck).
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::{flat, run_forward, upload};
use dtype_support::{put_window, rounded_to, state_ok, widen, y_ok};
use gateloop::cuda::recurrent::{DecodeInputs, decode_into, decode_real_into, forward_into};
use gateloop::cuda::{Element, Gpu, GpuError};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, InputError, compare, compare_complex, reference};
use half::{bf16, f16};

/// Feeds `p32` to `decode_into` (`real`: `decode_real_into`, on the real
/// parts of the gates and the state, whose imaginary parts must be 0) in
/// pieces of the given lengths (summing to L), starting from `init` (or
/// zeros); returns (y [B, L, H, V], final state).
fn decode_in_pieces<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    init: Option<&[Complex<f32>]>,
    pieces: &[usize],
    real: bool,
) -> (Vec<T>, Vec<Complex<f32>>) {
    let d = p32.dims;
    assert_eq!(pieces.iter().sum::<usize>(), d.len, "pieces must cover the sequence");
    let s = gpu.context().new_stream().expect("stream");
    let mut state = match init {
        Some(h) => s.clone_htod(&common::gate_side(h, real)).unwrap(),
        None => s.alloc_zeros::<f32>(if real { 1 } else { 2 } * d.state_len()).unwrap(),
    };
    let mut y_all = vec![T::nan(); d.v_len()];
    let mut t0 = 0;
    for &n in pieces {
        let piece = p32.steps(t0, n);
        let dn = piece.dims;
        let u = upload::<T>(&s, &piece);
        let real_gate = real.then(|| s.clone_htod(&common::gate_side(&piece.log_gate, true)).unwrap());
        let mut y = s.clone_htod(&vec![T::nan(); dn.v_len()]).unwrap();
        let inputs = DecodeInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: real_gate.as_ref().unwrap_or(&u.log_gate) };
        let decode = if real { decode_real_into::<T> } else { decode_into::<T> };
        decode(gpu, &s, &dn, inputs, &mut y, &mut state)
            .unwrap_or_else(|e| panic!("{} {dn:?} at t0={t0}: {e}", T::DTYPE));
        let y = s.clone_dtoh(&y).unwrap();
        s.synchronize().unwrap();
        put_window(&mut y_all, &d, d.value_dim, t0, n, &y);
        t0 += n;
    }
    let state = s.clone_dtoh(&state).unwrap();
    s.synchronize().unwrap();
    (y_all, common::from_gate_side(&state, real))
}

/// One `forward_into` over the whole sequence (h0 = `p32.h0`).
fn forward_once<T: Element>(gpu: &Gpu, p32: &OwnedProblem<f32>) -> (Vec<T>, Vec<Complex<f32>>) {
    run_forward::<T>(gpu, p32, 0, |s, d, i, o, _| forward_into(gpu, s, d, i, o)).unwrap()
}

fn bits<T: Element>(y: &[T]) -> Vec<u32> {
    y.iter().map(|&x| x.to_f32().to_bits()).collect()
}

fn check<T: Element>(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, pieces: &[usize], seed: u64) {
    let t = T::DTYPE;
    let label = format!("{t} {d:?} {regime:?} h0={with_h0} pieces={pieces:?} seed={seed}");
    let p64 = rounded_to::<T>(&random_problem(d, regime, with_h0, seed));
    let want = reference::recurrent::forward(&p64.view()).expect("reference");
    let p32 = p64.to_f32();
    let init = p32.h0.as_deref();
    let (y, state) = decode_in_pieces::<T>(gpu, &p32, init, pieces, false);

    let ey = compare(&widen(&y), &want.y);
    let eh = compare_complex(&state, &want.h_final);
    assert!(y_ok(t, &ey), "{label}: y {ey:?}");
    assert!(state_ok(&eh, 1.0), "{label}: state {eh:?}");

    let (y1, h1) = forward_once::<T>(gpu, &p32);
    assert!(bits(&y) == bits(&y1), "{label}: decoded y differs from one forward_into");
    assert!(
        flat(&state).iter().map(|x| x.to_bits()).eq(flat(&h1).iter().map(|x| x.to_bits())),
        "{label}: state differs from forward_into's h_final"
    );
}

fn check_all_types(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, pieces: &[usize], seed: u64) {
    check::<f32>(gpu, d, regime, with_h0, pieces, seed);
    check::<f16>(gpu, d, regime, with_h0, pieces, seed);
    check::<bf16>(gpu, d, regime, with_h0, pieces, seed);
}

#[test]
fn pieces_of_mixed_lengths() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let pieces = [1, 1, 2, 5, 64, 65, 1, 100, 61]; // 300 steps, across chunk boundaries
    let mut seed = 20_000;
    for (key_dim, value_dim) in [(64, 64), (16, 5), (128, 33)] {
        for per_head in [false, true] {
            for with_h0 in [false, true] {
                seed += 1;
                check_all_types(
                    gpu,
                    dims(2, 300, 3, key_dim, value_dim, per_head),
                    GateRegime::Random,
                    with_h0,
                    &pieces,
                    seed,
                );
            }
        }
    }
}

/// Real gates (`decode_real_into`): the pieces give bit for bit what the
/// complex decode gives on the same gates with phase 0 (which `check` ties
/// to the reference and to one forward pass), in f32 and bf16, both gate
/// layouts, with and without an initial state, resets among the gates.
#[test]
fn real_gates_decode_bit_for_bit_as_complex() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let pieces = [1, 2, 64, 65, 1, 100, 67]; // 300 steps
    let shapes = [(64, 64, false, true), (16, 5, true, false), (128, 33, false, true)];
    for (i, (key_dim, value_dim, per_head, with_h0)) in shapes.into_iter().enumerate() {
        let d = dims(2, 300, 3, key_dim, value_dim, per_head);
        let p = common::real_gates(random_problem(d, GateRegime::Resets(0.05), with_h0, 21_000 + i as u64));
        fn same<T: Element>(gpu: &Gpu, p: &OwnedProblem<f64>, pieces: &[usize]) {
            let p32 = rounded_to::<T>(p).to_f32();
            let init = p32.h0.as_deref();
            let (y, h) = decode_in_pieces::<T>(gpu, &p32, init, pieces, true);
            let (yc, hc) = decode_in_pieces::<T>(gpu, &p32, init, pieces, false);
            let label = format!("{} {:?}", T::DTYPE, p32.dims);
            assert!(bits(&y) == bits(&yc), "{label}: real y differs from the complex decode's");
            assert!(flat(&h).iter().map(|x| x.to_bits()).eq(flat(&hc).iter().map(|x| x.to_bits())), "{label}: state");
        }
        same::<f32>(gpu, &p, &pieces);
        same::<bf16>(gpu, &p, &pieces);
    }
    // The real entry wants real (half-length) gates and state, and names them.
    let d = dims(1, 3, 2, 4, 5, false);
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v, mut y) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(d.v_len()));
    let (real_gate, complex_gate) = (buf(d.gate_len()), buf(2 * d.gate_len()));
    let (mut real_state, mut complex_state) = (buf(d.state_len()), buf(2 * d.state_len()));
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let inputs = |g| DecodeInputs { q: &q, k: &k, v: &v, log_gate: g };
    let e = decode_real_into(gpu, s, &d, inputs(&complex_gate), &mut y, &mut real_state).unwrap_err();
    assert_eq!(name_of(e), "log_gate");
    let e = decode_real_into(gpu, s, &d, inputs(&real_gate), &mut y, &mut complex_state).unwrap_err();
    assert_eq!(name_of(e), "state");
    decode_real_into(gpu, s, &d, inputs(&real_gate), &mut y, &mut real_state).unwrap();
}

#[test]
fn one_step_at_a_time() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let pieces = [1; 80];
    check_all_types(gpu, dims(2, 80, 3, 64, 64, false), GateRegime::Mixed, true, &pieces, 21_000);
    check_all_types(gpu, dims(1, 80, 2, 64, 64, true), GateRegime::Resets(0.1), false, &pieces, 21_001);
}

#[test]
fn regimes_and_odd_sizes() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 22_000;
    for regime in
        [GateRegime::UnitModulus, GateRegime::LargePhase(50.0), GateRegime::StrongDecay(30.0), GateRegime::Mixed]
    {
        seed += 1;
        check_all_types(gpu, dims(2, 130, 3, 129, 97, seed % 2 == 0), regime, true, &[3, 64, 63], seed);
    }
    check_all_types(gpu, dims(1, 20, 1, 256, 40, false), GateRegime::Random, true, &[1, 19], 22_100);
    check_all_types(gpu, dims(3, 7, 5, 1, 1, true), GateRegime::Mixed, true, &[7], 22_101);
}

#[test]
fn decode_rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 1, 3, 8, 6, true);
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v, gate) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(2 * d.gate_len()));
    let mut y = buf(d.v_len());
    let name_of = |r: Result<(), GpuError>| match r {
        Err(GpuError::Input(InputError::Length { name, .. })) => name,
        other => panic!("expected a length error, got {other:?}"),
    };
    let inputs = || DecodeInputs { q: &q, k: &k, v: &v, log_gate: &gate };
    let mut short_state = buf(2 * d.state_len() - 2);
    assert_eq!(name_of(decode_into(gpu, s, &d, inputs(), &mut y, &mut short_state)), "state");
    let mut state = buf(2 * d.state_len());
    let mut long_y = buf(d.v_len() + 1);
    assert_eq!(name_of(decode_into(gpu, s, &d, inputs(), &mut long_y, &mut state)), "y");
    let bad = DecodeInputs { q: &v, k: &k, v: &v, log_gate: &gate };
    assert_eq!(name_of(decode_into(gpu, s, &d, bad, &mut y, &mut state)), "q");
    decode_into(gpu, s, &d, inputs(), &mut y, &mut state).unwrap();
    s.synchronize().unwrap();
}

/// Small, quick cases of every path (forward with and without h0, per-head
/// and per-channel gates, decode in place, every dtype): run under
/// compute-sanitizer by the GPU bundle, and as a normal test.
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    // K = 40: R = 8 with 5 key groups (padding rows); V = 40: two tiles, one partial.
    // L = 70 > the 64-step staging chunk, so two chunks and a partial one.
    let d = dims(2, 70, 2, 40, 40, false);
    check_all_types(gpu, d, GateRegime::Mixed, true, &[1, 69], 23_000);
    check_all_types(gpu, d.with_gate(gateloop::GateLayout::PerHead), GateRegime::Random, false, &[70], 23_001);
}

/// No GPU needed: the harness's windowing is right. Running the f64
/// reference piece by piece (h0 = the previous piece's h_final) through
/// `OwnedProblem::steps`/`put_window` reproduces one run over the whole sequence.
#[test]
fn harness_pieces_reassemble_on_cpu() {
    let d = dims(2, 30, 3, 4, 5, false);
    let p = random_problem(d, GateRegime::Mixed, true, 24_000);
    let whole = reference::recurrent::forward(&p.view()).unwrap();
    let mut y = vec![f64::NAN; d.v_len()];
    let mut state = p.h0.clone().unwrap();
    let mut t0 = 0;
    for n in [1, 7, 22] {
        let piece = OwnedProblem { h0: Some(state), ..p.steps(t0, n) };
        let out = reference::recurrent::forward(&piece.view()).unwrap();
        put_window(&mut y, &d, d.value_dim, t0, n, &out.y);
        state = out.h_final;
        t0 += n;
    }
    assert!(compare(&y, &whole.y).rel_l2 < 1e-12);
    assert!(compare_complex(&state, &whole.h_final).rel_l2 < 1e-12);
}
