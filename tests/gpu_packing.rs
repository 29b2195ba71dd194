//! Variable-length sequences packed into one batch row on the GPU
//! (`gateloop::packing`, `cuda::packing`): with reset gates at every
//! sequence start, every CUDA forward (recurrent, scan, attention, chunked)
//! and every CUDA backward (recurrent, scan, chunked), complex and real
//! gates (the real-gate kernels, through `dispatch`), f32 and bf16, computes
//! each sequence as if it ran alone: within the bounds of the kernels' own
//! tests against the f64 reference of the sequences run alone (y and dq, dk,
//! dv: the f32 bounds plus one rounding to T; h_final, dlog_gate, dh0: the
//! f32 bounds, relative L2 ≤ 1e-4, max-abs ≤ 1e-3 · max|ref|). Resets written
//! on the device equal those written on the host, bit for bit, and bad
//! arguments are refused before anything is written. The recurrence's
//! packed launches (a state per sequence: the recurrent and chunked
//! forwards and backwards) equal each sequence alone (on device
//! buffers, and from host data through `dispatch::cuda_varlen_as`, the
//! CLI's path for packed files) and, as `dispatch::Variant::Packed`, the
//! batched launches, bit for bit.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::grad::{GradInputsF32, Worst, compare_grads, real_part_grads};
use common::packed::{LENGTHS, Packed, concat, offsets};
use common::{ABS_FRAC, REL};
use dtype_support::{chunk_bounds, y_bounds};
use gateloop::cuda::chunk::{ChunkPrecision, Gates};
use gateloop::cuda::{Element, Gpu, GpuError, packing};
use gateloop::testing::{GateRegime, dims};
use gateloop::{Complex, InputError, Mode, dispatch};
use half::bf16;

/// Three packings: sequences around the tile and chunk lengths with a
/// per-channel gate, h0 and dh_final; a per-head gate with large phases;
/// one-step sequences at |a| = 1.
fn packings() -> [Packed; 3] {
    [
        Packed::new(LENGTHS[0], (2, 8, 4), false, GateRegime::Mixed, true, true, 9300),
        Packed::new(LENGTHS[3], (2, 8, 4), true, GateRegime::LargePhase(50.0), false, true, 9301),
        Packed::new(LENGTHS[2], (2, 8, 4), false, GateRegime::UnitModulus, true, false, 9302),
    ]
}

/// Each packing with complex gates and with real ones (phase 0: dispatch
/// runs the real-gate recurrent and chunked kernels), rounded to `T`.
fn each_packing<T: Element>(mut f: impl FnMut(&Packed, bool)) {
    for pk in packings() {
        let pk = pk.map(|i| i.rounded::<T>());
        f(&pk, false);
        f(&pk.map(GradInputsF32::real_gates), true);
    }
}

fn forwards<T: Element>(gpu: &Gpu) {
    each_packing::<T>(|pk, real| {
        let want = pk.separate_forward();
        for mode in Mode::ALL {
            let label = format!("{} {} real={real} {mode:?}", T::DTYPE, pk.label());
            let got = dispatch::cuda_as::<T>(gpu, mode, &pk.packed.p.view()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let (y, state) = match mode {
                Mode::Chunked => chunk_bounds(T::DTYPE, ChunkPrecision::Exact),
                _ => (y_bounds(T::DTYPE), (REL, ABS_FRAC)),
            };
            common::assert_within(&label, "y", &gateloop::compare(&got.y, &want.y), y.0, y.1);
            common::assert_within(
                &label,
                "h_final",
                &gateloop::compare_complex(&got.h_final, &want.h_final),
                state.0,
                state.1,
            );
        }
    });
}

#[test]
fn every_cuda_forward_matches_the_sequences_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    forwards::<f32>(gpu);
    forwards::<bf16>(gpu);
}

fn backwards<T: Element>(gpu: &Gpu, worst: &mut Worst) {
    each_packing::<T>(|pk, real| {
        let want = if real { real_part_grads(pk.separate_grads()) } else { pk.separate_grads() };
        let inp = &pk.packed;
        for mode in [Mode::Recurrent, Mode::Scan, Mode::Chunked] {
            let label = format!("{} {} real={real} {mode:?}", T::DTYPE, pk.label());
            let got = dispatch::cuda_grad_as::<T>(gpu, mode, &inp.p.view(), &inp.dy, inp.dh_final.as_deref())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            worst.check_bounds(&label, &compare_grads(&got, &want), |name| match name {
                "dq" | "dk" | "dv" => y_bounds(T::DTYPE),
                _ => (REL, ABS_FRAC),
            });
        }
    });
}

#[test]
fn every_cuda_backward_matches_the_sequences_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    backwards::<f32>(gpu, &mut worst);
    backwards::<bf16>(gpu, &mut worst);
    worst.report("every_cuda_backward_matches_the_sequences_alone");
}

#[test]
fn resets_written_on_the_device_equal_the_host_ones() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let stream = gpu.context().new_stream().unwrap();
    let cu = [0, 1, 64, 65, 200, 201];
    for per_head in [false, true] {
        let d = dims(1, 201, 3, 5, 2, per_head);
        let gates: Vec<Complex<f32>> =
            (0..d.gate_len()).map(|i| Complex::new(-(i as f32) / 1e3, i as f32 * 0.37)).collect();
        // Complex gates.
        let mut want = gates.clone();
        gateloop::packing::reset_sequence_starts(&d, &cu, &mut want).unwrap();
        let mut buf = stream.clone_htod(&common::flat(&gates)).unwrap();
        packing::reset_sequence_starts(gpu, &stream, &d, &cu, &mut buf).unwrap();
        let got = common::unflat(&stream.clone_dtoh(&buf).unwrap());
        let bits = |z: &[Complex<f32>]| z.iter().map(|z| (z.re.to_bits(), z.im.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "complex, per_head={per_head}");
        // Real gates.
        let real: Vec<f32> = gates.iter().map(|z| z.re).collect();
        let mut want = real.clone();
        gateloop::packing::reset_sequence_starts_real(&d, &cu, &mut want).unwrap();
        let mut buf = stream.clone_htod(&real).unwrap();
        packing::reset_sequence_starts_real(gpu, &stream, &d, &cu, &mut buf).unwrap();
        assert_eq!(stream.clone_dtoh(&buf).unwrap(), want, "real, per_head={per_head}");
        // Refused before anything is written: a complex buffer as a real one
        // (a length error), offsets that miss L, two batch rows.
        let mut buf = stream.clone_htod(&common::flat(&gates)).unwrap();
        let refused = [
            packing::reset_sequence_starts_real(gpu, &stream, &d, &cu, &mut buf),
            packing::reset_sequence_starts(gpu, &stream, &d, &[0, 1, 200], &mut buf),
            packing::reset_sequence_starts(gpu, &stream, &dims(2, 201, 3, 5, 2, per_head), &cu, &mut buf),
        ];
        assert!(matches!(refused[0], Err(GpuError::Input(InputError::Length { name: "log_gate", .. }))));
        assert!(matches!(refused[1], Err(GpuError::Input(InputError::Value { name: "cu_seqlens", index: 2, .. }))));
        assert!(matches!(refused[2], Err(GpuError::Input(InputError::Param { name: "batch", .. }))));
        assert_eq!(stream.clone_dtoh(&buf).unwrap(), common::flat(&gates), "a refused call wrote");
    }
}

/// The recurrent kernel over packed sequences, each with its own state
/// (`recurrent::forward_varlen_into`, `forward_varlen_real_into`): one
/// launch gives every sequence's y and h_final bit for bit as the kernel on
/// that sequence alone (h0[i] its initial state), for complex and real
/// gates, f32 and bf16, every launch choice; within the f64 reference's
/// bounds; and decoding continues every sequence from its state. Bad offsets
/// and states sized for one sequence are refused, naming them.
#[test]
fn varlen_recurrence_equals_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    varlen::<f32>(gpu);
    varlen::<bf16>(gpu);
}

fn varlen<T: Element>(gpu: &Gpu) {
    use gateloop::cuda::recurrent::{self, RecurrentConfig, RecurrentRows, RecurrentStaging};
    use gateloop::cuda::{DeviceInputs, DeviceOutputs};
    use gateloop::testing::random_problem;
    let s = gpu.context().new_stream().unwrap();
    let configs =
        [RecurrentConfig::default(), RecurrentConfig { staging: RecurrentStaging::Ahead, rows: RecurrentRows::Four }];
    let (lens, heads, kd, vd) = ([1usize, 63, 64, 65, 130, 17], 2, 8, 40);
    for (case, (per_head, real)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate()
    {
        let regime = if real { GateRegime::StrongDecay(40.0) } else { GateRegime::LargePhase(50.0) };
        // Each sequence with DECODE more steps, decoded after the prefill.
        const DECODE: usize = 2;
        let extended: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let p = random_problem(
                    dims(1, l + DECODE, heads, kd, vd, per_head),
                    regime,
                    true,
                    9400 + 10 * case as u64 + i as u64,
                );
                let p = if real { common::real_gates(p) } else { p };
                dtype_support::rounded_to::<T>(&p).map(|x| x as f32)
            })
            .collect();
        let parts: Vec<_> = extended
            .iter()
            .zip(lens)
            .map(|(p, l)| gateloop::testing::OwnedProblem { h0: p.h0.clone(), ..p.steps(0, l) })
            .collect();
        let cu = offsets(&lens);
        let n = lens.len();
        let d = dims(1, cu[n], heads, kd, vd, per_head);
        let DevicePacked { q, k, v, g, h0 } = DevicePacked::<T>::upload(&s, &parts, real);
        let h0 = h0.expect("every part has an h0");
        let state_floats = if real { 1 } else { 2 } * n * heads * kd * vd;
        // The states the default launch leaves, which decoding continues below.
        let mut default_state = None;
        for config in configs {
            let label = format!("{} per_head={per_head} real={real} {config:?}", T::DTYPE);
            let mut y = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
            let mut h = s.clone_htod(&vec![f32::NAN; state_floats]).unwrap();
            let inputs = DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: Some(&h0) };
            let out = DeviceOutputs { y: &mut y, h_final: &mut h };
            let run = if real { recurrent::forward_varlen_real_into::<T> } else { recurrent::forward_varlen_into::<T> };
            run(gpu, &s, &d, &cu, config, inputs, out).unwrap_or_else(|e| panic!("{label}: {e}"));
            let y: Vec<f32> = s.clone_dtoh(&y).unwrap().into_iter().map(|x| x.to_f32()).collect();
            let h_dev = h;
            let h = common::from_gate_side(&s.clone_dtoh(&h_dev).unwrap(), real);
            if config == RecurrentConfig::default() {
                default_state = Some(h_dev);
            }
            // Each sequence alone through the same kernel: the same bits.
            let gateloop::Outputs { y: y_alone, h_final: h_alone } = alone::<T>(gpu, &parts, config, real, &label);
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&y_alone), "{label}: y");
            assert_eq!(h, h_alone, "{label}: h_final");
            // And the reference, sequence by sequence.
            let (y_ref, h_ref) = reference_alone(&parts);
            let yb = y_bounds(T::DTYPE);
            common::assert_within(&label, "y", &gateloop::compare(&y, &y_ref), yb.0, yb.1);
            common::assert_within(&label, "h_final", &gateloop::compare_complex(&h, &h_ref), REL, ABS_FRAC);
        }
        // Decoding continues every sequence from its state: DECODE steps of
        // all N at once (B = N), the same bits as the kernel over each whole
        // extended sequence.
        let mut state = default_state.expect("the default launch ran");
        let steps: Vec<_> = extended.iter().zip(lens).map(|(p, l)| p.steps(l, DECODE)).collect();
        let dd = dims(n, DECODE, heads, kd, vd, per_head);
        // (The steps' q, k, v, gates packed one row per sequence: [N, DECODE, H, *].)
        let DevicePacked { q: dq, k: dk, v: dv, g: dg, .. } = DevicePacked::<T>::upload(&s, &steps, real);
        let mut y = s.clone_htod(&vec![T::nan(); dd.v_len()]).unwrap();
        let inputs = recurrent::DecodeInputs { q: &dq, k: &dk, v: &dv, log_gate: &dg };
        if real {
            recurrent::decode_real_into::<T>(gpu, &s, &dd, inputs, &mut y, &mut state).unwrap();
        } else {
            recurrent::decode_into::<T>(gpu, &s, &dd, inputs, &mut y, &mut state).unwrap();
        }
        let y: Vec<f32> = s.clone_dtoh(&y).unwrap().into_iter().map(|x| x.to_f32()).collect();
        let row = heads * vd * DECODE;
        for (i, (p, l)) in extended.iter().zip(lens).enumerate() {
            let whole = if real {
                recurrent::forward_real_host_as::<T>(gpu, &p.view(), RecurrentConfig::default())
            } else {
                recurrent::forward_host_with::<T>(gpu, &p.view(), RecurrentConfig::default())
            }
            .unwrap();
            let tail = &whole.y[l * heads * vd..];
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y[i * row..(i + 1) * row]), bits(tail), "{} real={real}: decoded sequence {i}", T::DTYPE);
        }
        // Refused, naming what is wrong: offsets that miss L; a state sized
        // for one sequence; y sized for N rows.
        let mut y = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
        let mut h = s.clone_htod(&vec![f32::NAN; state_floats]).unwrap();
        let mut short_h = s.clone_htod(&vec![f32::NAN; state_floats / n]).unwrap();
        let mut long_y = s.clone_htod(&vec![T::nan(); n * d.v_len()]).unwrap();
        let run = if real { recurrent::forward_varlen_real_into::<T> } else { recurrent::forward_varlen_into::<T> };
        let inputs = || DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: Some(&h0) };
        let mut bad_cu = cu.clone();
        bad_cu[n] -= 1;
        let refused = |cu: &[usize], y: &mut cudarc::driver::CudaSlice<T>, h: &mut cudarc::driver::CudaSlice<f32>| {
            run(gpu, &s, &d, cu, RecurrentConfig::default(), inputs(), DeviceOutputs { y, h_final: h })
        };
        let errors =
            [refused(&bad_cu, &mut y, &mut h), refused(&cu, &mut y, &mut short_h), refused(&cu, &mut long_y, &mut h)];
        assert!(
            matches!(errors[0], Err(GpuError::Input(InputError::Value { name: "cu_seqlens", .. }))),
            "{:?}",
            errors[0]
        );
        assert!(
            matches!(errors[1], Err(GpuError::Input(InputError::Length { name: "h_final", .. }))),
            "{:?}",
            errors[1]
        );
        assert!(matches!(errors[2], Err(GpuError::Input(InputError::Length { name: "y", .. }))), "{:?}", errors[2]);
        assert!(s.clone_dtoh(&y).unwrap().iter().all(|x| x.to_f32().is_nan()), "a refused call wrote y");
    }
}

/// `dispatch::Variant::Packed` (the B batch rows as B packed sequences,
/// the recurrent and chunked `forward_varlen_into`'s launches and
/// `backward_varlen_into`'s, which the fuzzer runs as targets) gives the
/// batched launches' y and h_final, and the batched backwards' gradients,
/// bit for bit: B = 3 rows of L steps,
/// L around the tile and chunk lengths, complex and real gates, per-channel
/// and per-head, with and without h0, f32 and bf16.
#[test]
fn packed_variant_equals_the_batched_launch() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    packed_variant::<f32>(gpu);
    packed_variant::<bf16>(gpu);
}

fn packed_variant<T: Element>(gpu: &Gpu) {
    use dispatch::Variant;
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cases = [(1, GateRegime::Mixed), (65, GateRegime::Resets(0.1)), (130, GateRegime::LargePhase(50.0))];
    for (i, (len, regime)) in cases.into_iter().enumerate() {
        for (j, (per_head, with_h0, real)) in
            [(false, true, false), (true, false, false), (false, false, true), (true, true, true)]
                .into_iter()
                .enumerate()
        {
            let seed = 9500 + 10 * i as u64 + j as u64;
            let p = gateloop::testing::random_problem(dims(3, len, 2, 8, 40, per_head), regime, with_h0, seed);
            let p = if real { common::real_gates(p) } else { p };
            let p = dtype_support::rounded_to::<T>(&p).map(|x| x as f32);
            let label = format!("{} L={len} {regime:?} per_head={per_head} h0={with_h0} real={real}", T::DTYPE);
            let flat = |h: &[Complex<f32>]| h.iter().flat_map(|z| [z.re, z.im]).collect::<Vec<_>>();
            // The recurrent and the chunked forward.
            for mode in [Mode::Recurrent, Mode::Chunked] {
                let run = |v| dispatch::cuda_variant_as::<T>(gpu, mode, v, &p.view());
                let (batched, packed) = (run(Variant::Default).unwrap(), run(Variant::Packed).unwrap());
                assert!(bits(&packed.y) == bits(&batched.y), "{label} {mode:?}: y differs from the batched launch's");
                assert!(
                    bits(&flat(&packed.h_final)) == bits(&flat(&batched.h_final)),
                    "{label} {mode:?}: h_final differs from the batched launch's"
                );
                assert!(packed.y.iter().all(|x| x.is_finite()), "{label} {mode:?}: y not finite");
            }
            // The backwards too (each backward_varlen_into's launches).
            let dy: Vec<f32> = (0..p.dims.v_len()).map(|i| T::from_f32((0.37 * i as f32).sin()).to_f32()).collect();
            let dh_final: Vec<Complex<f32>> = (0..p.dims.state_len())
                .map(|i| Complex::new((0.11 * i as f32).cos(), if real { 0.0 } else { (0.23 * i as f32).sin() }))
                .collect();
            for mode in [Mode::Recurrent, Mode::Chunked] {
                let label = format!("{label} {mode:?} backward");
                let grad = |v| dispatch::cuda_grad_variant_as::<T>(gpu, mode, v, &p.view(), &dy, Some(&dh_final));
                let (batched, packed) = (grad(Variant::Default).unwrap(), grad(Variant::Packed).unwrap());
                for (name, a, b) in
                    [("dq", &packed.dq, &batched.dq), ("dk", &packed.dk, &batched.dk), ("dv", &packed.dv, &batched.dv)]
                {
                    assert!(bits(a) == bits(b), "{label}: {name} differs from the batched backward's");
                }
                assert!(
                    bits(&flat(&packed.dlog_gate)) == bits(&flat(&batched.dlog_gate)),
                    "{label}: dlog_gate differs"
                );
                assert_eq!(packed.dh0.is_some(), with_h0, "{label}: dh0 exactly with h0");
                if let (Some(a), Some(b)) = (&packed.dh0, &batched.dh0) {
                    assert!(bits(&flat(a)) == bits(&flat(b)), "{label}: dh0 differs from the batched backward's");
                }
            }
        }
    }
}

/// Drawn packings through the recurrence's packed launch: 1 to 6 sequences
/// of 1 to 200 steps (a one-step sequence in about one draw in five), 1 to
/// 3 heads, K from 1 to MAX_KEY_DIM, V from 1 to 65, every gate regime,
/// per-channel or per-head, complex or real, with or without h0, every
/// launch choice, f32 and bf16: y and h_final bit for bit the kernel's on
/// each sequence alone.
#[test]
fn drawn_packings_equal_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    drawn_packings::<f32>(gpu, 9600);
    drawn_packings::<bf16>(gpu, 9700);
}

fn drawn_packings<T: Element>(gpu: &Gpu, seed: u64) {
    use gateloop::cuda::recurrent::{self, MAX_KEY_DIM, RecurrentConfig, RecurrentRows, RecurrentStaging};
    use gateloop::cuda::{DeviceInputs, DeviceOutputs};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let s = gpu.context().new_stream().unwrap();
    for draw in 0..16 {
        let dr = DrawnPacking::draw(&mut rng, 6, MAX_KEY_DIM, &[1, 7, 32, 40, 64, 65]);
        let DrawnPacking { ref lens, heads, kd, vd, per_head, real, with_h0, .. } = dr;
        let n = lens.len();
        let staging = if rng.random_bool(0.5) { RecurrentStaging::Ahead } else { RecurrentStaging::Batched };
        let rows = if rng.random_bool(0.5) { RecurrentRows::Four } else { RecurrentRows::Eight };
        let config = RecurrentConfig { staging, rows };
        let label = dr.label::<T>(draw, &config);
        let parts = dr.parts::<T>(seed + 100 * draw);
        let cu = offsets(lens);
        let d = dims(1, cu[n], heads, kd, vd, per_head);
        let DevicePacked { q, k, v, g, h0 } = DevicePacked::<T>::upload(&s, &parts, real);
        let mut y = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
        let mut h = s.clone_htod(&vec![f32::NAN; if real { 1 } else { 2 } * n * heads * kd * vd]).unwrap();
        let inputs = DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: h0.as_ref().map(|h| h as _) };
        let out = DeviceOutputs { y: &mut y, h_final: &mut h };
        let run = if real { recurrent::forward_varlen_real_into::<T> } else { recurrent::forward_varlen_into::<T> };
        run(gpu, &s, &d, &cu, config, inputs, out).unwrap_or_else(|e| panic!("{label}: {e}"));
        let got = download(&s, &y, &h, real);
        let want = alone::<T>(gpu, &parts, config, real, &label);
        assert_same_bits(&label, "the packed launch's", &got, &want);
        assert!(got.y.iter().all(|x| x.is_finite()), "{label}: y not finite");
        // From host data (the CLI's packed files): the same launch, the same bits.
        let host = packed_host(&parts, with_h0, |p, h0| {
            let gates = if real { Gates::Real } else { Gates::Complex };
            recurrent::forward_varlen_host_as::<T>(gpu, p, &cu, h0, config, gates)
        })
        .unwrap_or_else(|e| panic!("{label}: host: {e}"));
        assert_same_bits(&label, "host", &host, &want);
    }
}

/// `parts` packed on the host (`[1, L, H, *]`, no h0) and their states
/// (`[N, H, K, V]`, when `with_h0`), handed to `run`.
fn packed_host<R>(
    parts: &[gateloop::testing::OwnedProblem<f32>],
    with_h0: bool,
    run: impl FnOnce(&gateloop::Problem<'_, f32>, Option<&[Complex<f32>]>) -> R,
) -> R {
    let lens: Vec<usize> = parts.iter().map(|p| p.dims.len).collect();
    let d = gateloop::Dims { batch: 1, len: lens.iter().sum(), ..parts[0].dims };
    let (q, k, v) = (concat(parts, |p| p.q.clone()), concat(parts, |p| p.k.clone()), concat(parts, |p| p.v.clone()));
    let log_gate = concat(parts, |p| p.log_gate.clone());
    let h0 = with_h0.then(|| concat(parts, |p| p.h0.clone().expect("every part has an h0")));
    run(&gateloop::Problem { dims: d, q: &q, k: &k, v: &v, log_gate: &log_gate, h0: None }, h0.as_deref())
}

/// `dispatch::cuda_varlen_as`, the CLI's GPU path for packed files: the
/// recurrent mode in one launch, the default launch's bits on each sequence
/// alone (the real-gate kernel when gates and states are real; the complex
/// one when only the states are complex); the chunked mode in one launch of
/// each kernel too, the same bits as each alone. A packed problem that carries an
/// h0 of its own, or states for the wrong N, is refused by name.
#[test]
fn dispatched_varlen_equals_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    dispatched_varlen::<f32>(gpu);
    dispatched_varlen::<bf16>(gpu);
}

fn dispatched_varlen<T: Element>(gpu: &Gpu) {
    use dispatch::Variant;
    use gateloop::cuda::recurrent::RecurrentConfig;
    use gateloop::testing::random_problem;
    let lens = [70usize, 1, 64, 23];
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let flat = |h: &[Complex<f32>]| h.iter().flat_map(|z| [z.re, z.im]).collect::<Vec<_>>();
    // (real gates, complex states): real gates with complex states run the complex kernel.
    for (case, (real, complex_states)) in [(false, false), (true, false), (true, true)].into_iter().enumerate() {
        let parts: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let p = random_problem(
                    dims(1, l, 2, 8, 40, false),
                    GateRegime::Mixed,
                    true,
                    9800 + 10 * case as u64 + i as u64,
                );
                let mut p = if real { common::real_gates(p) } else { p };
                if complex_states {
                    p.h0 = random_problem(dims(1, 1, 2, 8, 40, false), GateRegime::Random, true, 9890 + i as u64).h0;
                }
                dtype_support::rounded_to::<T>(&p).map(|x| x as f32)
            })
            .collect();
        let label = format!("{} real={real} complex_states={complex_states}", T::DTYPE);
        let cu = offsets(&lens);
        let kernel_real = real && !complex_states;
        let want = alone::<T>(gpu, &parts, RecurrentConfig::default(), kernel_real, &label);
        let got = packed_host(&parts, true, |p, h0| {
            dispatch::cuda_varlen_as::<T>(gpu, Mode::Recurrent, Variant::Default, p, &cu, h0)
        })
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(bits(&got.y) == bits(&want.y), "{label}: recurrent y differs from the sequences alone");
        assert!(bits(&flat(&got.h_final)) == bits(&flat(&want.h_final)), "{label}: recurrent h_final differs");
        let chunked = packed_host(&parts, true, |p, h0| {
            dispatch::cuda_varlen_as::<T>(gpu, Mode::Chunked, Variant::Default, p, &cu, h0)
        })
        .unwrap_or_else(|e| panic!("{label}: chunked: {e}"));
        let (mut y, mut h_final) = (Vec::new(), Vec::new());
        for p in &parts {
            let o = dispatch::cuda_as::<T>(gpu, Mode::Chunked, &p.view()).unwrap();
            y.extend(o.y);
            h_final.extend(o.h_final);
        }
        assert!(bits(&chunked.y) == bits(&y), "{label}: chunked y differs from the sequences alone");
        assert!(bits(&flat(&chunked.h_final)) == bits(&flat(&h_final)), "{label}: chunked h_final differs");
    }
    // Refusals, by name: the packed problem's own h0; states for N − 1 sequences.
    let parts: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            random_problem(dims(1, l, 2, 8, 40, false), GateRegime::Mixed, true, 9900 + i as u64).map(|x| x as f32)
        })
        .collect();
    let cu = offsets(&lens);
    let own_h0 = packed_host(&parts, true, |p, h0| {
        let h = h0.unwrap();
        let with_own = gateloop::Problem { h0: Some(&h[..h.len() / lens.len()]), ..*p };
        dispatch::cuda_varlen_as::<T>(gpu, Mode::Recurrent, Variant::Default, &with_own, &cu, None)
    });
    assert!(matches!(own_h0, Err(GpuError::Input(InputError::Param { name: "h0", .. }))), "{own_h0:?}");
    let short = packed_host(&parts, true, |p, h0| {
        let h = h0.unwrap();
        dispatch::cuda_varlen_as::<T>(gpu, Mode::Recurrent, Variant::Default, p, &cu, Some(&h[..h.len() - 1]))
    });
    assert!(matches!(short, Err(GpuError::Input(InputError::Length { name: "h0", .. }))), "{short:?}");
}

/// Asserts that `got` has `want`'s y and h_final to the last bit (`what`: whose).
fn assert_same_bits(label: &str, what: &str, got: &gateloop::Outputs<f32>, want: &gateloop::Outputs<f32>) {
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cbits = |x: &[Complex<f32>]| x.iter().flat_map(|z| [z.re.to_bits(), z.im.to_bits()]).collect::<Vec<_>>();
    assert!(bits(&got.y) == bits(&want.y), "{label}: {what} y differs from the sequences alone");
    assert!(cbits(&got.h_final) == cbits(&want.h_final), "{label}: {what} h_final differs from the sequences alone");
}

/// A packed launch's y (in `T`) and h_final (on the gate side: real f32
/// when `real`) downloaded, y widened to f32.
fn download<T: Element>(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    y: &cudarc::driver::CudaSlice<T>,
    h_final: &cudarc::driver::CudaSlice<f32>,
    real: bool,
) -> gateloop::Outputs<f32> {
    gateloop::Outputs {
        y: s.clone_dtoh(y).unwrap().into_iter().map(|x| x.to_f32()).collect(),
        h_final: common::from_gate_side(&s.clone_dtoh(h_final).unwrap(), real),
    }
}

/// The f64 recurrence on each of `parts` alone: y concatenated, h_final stacked.
fn reference_alone(parts: &[gateloop::testing::OwnedProblem<f32>]) -> (Vec<f64>, Vec<Complex<f64>>) {
    let want: Vec<_> =
        parts.iter().map(|p| gateloop::reference::recurrent::forward(&p.map(f64::from).view()).unwrap()).collect();
    (want.iter().flat_map(|o| o.y.clone()).collect(), want.iter().flat_map(|o| o.h_final.clone()).collect())
}

/// A drawn packing's geometry and gates: 1 to `max_sequences` sequences of
/// 1 to 200 steps (one step in about one draw in five), 1 to 3 heads, K
/// from 1 to `max_key`, V from `values`, per-head
/// or per-channel, real or complex, h0 or not, one of six gate regimes.
struct DrawnPacking {
    lens: Vec<usize>,
    heads: usize,
    kd: usize,
    vd: usize,
    per_head: bool,
    real: bool,
    with_h0: bool,
    regime: GateRegime,
}

impl DrawnPacking {
    fn draw(rng: &mut rand::rngs::StdRng, max_sequences: usize, max_key: usize, values: &[usize]) -> Self {
        use rand::Rng;
        let regimes = [
            GateRegime::Random,
            GateRegime::Resets(0.2),
            GateRegime::UnitModulus,
            GateRegime::LargePhase(50.0),
            GateRegime::StrongDecay(40.0),
            GateRegime::Mixed,
        ];
        let n = rng.random_range(1..=max_sequences);
        let lens = (0..n).map(|_| if rng.random_bool(0.2) { 1 } else { rng.random_range(1..=200) }).collect();
        let heads = rng.random_range(1..=3usize);
        let kd = [1, 5, 8, 16, 33, 64, max_key][rng.random_range(0..7usize)];
        let vd = values[rng.random_range(0..values.len())];
        let (per_head, real, with_h0) = (rng.random_bool(0.5), rng.random_bool(0.5), rng.random_bool(0.5));
        let regime = regimes[rng.random_range(0..regimes.len())];
        DrawnPacking { lens, heads, kd, vd, per_head, real, with_h0, regime }
    }

    /// The failure label of draw `draw` in `T` with the launch choices `config`.
    fn label<T: Element>(&self, draw: u64, config: &dyn std::fmt::Debug) -> String {
        let DrawnPacking { ref lens, heads, kd, vd, per_head, real, with_h0, regime } = *self;
        format!(
            "{} draw {draw}: lens {lens:?} H={heads} K={kd} V={vd} per_head={per_head} real={real} h0={with_h0} \
             {regime:?} {config:?}",
            T::DTYPE
        )
    }

    /// Its sequences (sequence i from seed `seed + i`), values rounded to `T`.
    fn parts<T: Element>(&self, seed: u64) -> Vec<gateloop::testing::OwnedProblem<f32>> {
        let DrawnPacking { heads, kd, vd, per_head, real, with_h0, regime, .. } = *self;
        self.lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let d = dims(1, l, heads, kd, vd, per_head);
                let p = gateloop::testing::random_problem(d, regime, with_h0, seed + i as u64);
                let p = if real { common::real_gates(p) } else { p };
                dtype_support::rounded_to::<T>(&p).map(|x| x as f32)
            })
            .collect()
    }
}

/// Packed sequences on the device: `parts` (one row each, values already
/// rounded to `T`) concatenated along time, q, k, v in `T`, log_gate and
/// h0 (when the parts have one) on the kernels' gate side.
struct DevicePacked<T> {
    q: cudarc::driver::CudaSlice<T>,
    k: cudarc::driver::CudaSlice<T>,
    v: cudarc::driver::CudaSlice<T>,
    g: cudarc::driver::CudaSlice<f32>,
    h0: Option<cudarc::driver::CudaSlice<f32>>,
}

impl<T: Element> DevicePacked<T> {
    fn upload(
        s: &std::sync::Arc<cudarc::driver::CudaStream>,
        parts: &[gateloop::testing::OwnedProblem<f32>],
        real: bool,
    ) -> Self {
        let to_t = |x: Vec<f32>| -> Vec<T> { x.into_iter().map(T::from_f32).collect() };
        let h0 = parts[0].h0.is_some().then(|| concat(parts, |p| common::gate_side(p.h0.as_ref().unwrap(), real)));
        DevicePacked {
            q: s.clone_htod(&to_t(concat(parts, |p| p.q.clone()))).unwrap(),
            k: s.clone_htod(&to_t(concat(parts, |p| p.k.clone()))).unwrap(),
            v: s.clone_htod(&to_t(concat(parts, |p| p.v.clone()))).unwrap(),
            g: s.clone_htod(&concat(parts, |p| common::gate_side(&p.log_gate, real))).unwrap(),
            h0: h0.map(|h| s.clone_htod(&h).unwrap()),
        }
    }
}

/// Every sequence of `parts` alone through the recurrent kernel (`config`,
/// the real-gate one when `real`): y concatenated, h_final stacked `[N, H, K, V]`.
fn alone<T: Element>(
    gpu: &Gpu,
    parts: &[gateloop::testing::OwnedProblem<f32>],
    config: gateloop::cuda::recurrent::RecurrentConfig,
    real: bool,
    label: &str,
) -> gateloop::Outputs<f32> {
    use gateloop::cuda::recurrent;
    let (mut y, mut h_final) = (Vec::new(), Vec::new());
    for p in parts {
        let o = if real {
            recurrent::forward_real_host_as::<T>(gpu, &p.view(), config)
        } else {
            recurrent::forward_host_with::<T>(gpu, &p.view(), config)
        }
        .unwrap_or_else(|e| panic!("{label}: alone: {e}"));
        y.extend(o.y);
        h_final.extend(o.h_final);
    }
    gateloop::Outputs { y, h_final }
}

/// The recurrent backward's packed launch (`recurrent_grad::backward_varlen_into`,
/// a state per sequence): drawn packings (1–5 sequences of 1–200 steps, so
/// one to four segments of 64 and boundaries anywhere inside them, K up to
/// 128, V up to 65, every gate regime, per-head or not, real or complex,
/// with or without h0 and dh_final), f32 and bf16, gradients into poisoned
/// buffers: dq, dk, dv, dlog_gate and dh0 bit for bit the backward's on
/// each sequence alone; through `dispatch::cuda_grad_varlen_as` (the CLI's
/// path for packed grad files) too. Bad offsets, states for the wrong N and
/// a short workspace are refused by name, nothing written.
#[test]
fn varlen_backward_equals_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    varlen_backward::<f32>(gpu, 9950, Mode::Recurrent, 12);
    varlen_backward::<bf16>(gpu, 9960, Mode::Recurrent, 12);
}

/// The chunked backward's packed launch (`chunk_grad::backward_varlen_into`,
/// every sequence's chunks from its first step): the test above (K up to
/// 64), each draw with exact or fast state products and the separate or
/// automatic carry, every sequence's gradients bit for bit the chunked
/// backward's on it alone with the same choices, and so are those of the
/// training pair (`forward_varlen_saving_into`, `backward_varlen_saved_into`);
/// the sequential carry refused by name too.
#[test]
fn chunked_varlen_backward_equals_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    varlen_backward::<f32>(gpu, 9990, Mode::Chunked, 8);
    varlen_backward::<bf16>(gpu, 10000, Mode::Chunked, 8);
}

/// `draws` drawn packings through `mode`'s packed backward (recurrent or
/// chunked).
fn varlen_backward<T: Element>(gpu: &Gpu, seed: u64, mode: Mode, draws: u64) {
    use dispatch::Variant;
    use gateloop::cuda::chunk::{ChunkCarry, ChunkConfig};
    use gateloop::cuda::recurrent_grad::{DeviceGradInputs, DeviceGrads, DeviceInputs};
    use gateloop::cuda::{chunk_grad, recurrent_grad};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let s = gpu.context().new_stream().unwrap();
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cbits = |x: &[Complex<f32>]| x.iter().flat_map(|z| [z.re.to_bits(), z.im.to_bits()]).collect::<Vec<_>>();
    let to_t = |x: &[f32]| -> Vec<T> { x.iter().map(|&x| T::from_f32(x)).collect() };
    let wave = |n: usize, seed: u64| -> Vec<f32> {
        let mut r = StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    };
    let chunked = mode == Mode::Chunked;
    let max_key = if chunked { 64 } else { recurrent_grad::MAX_KEY_DIM };
    for draw in 0..draws {
        let dr = DrawnPacking::draw(&mut rng, 5, max_key, &[1, 7, 32, 40, 65]);
        let DrawnPacking { ref lens, heads, kd, vd, per_head, real, with_h0, regime } = dr;
        let n = lens.len();
        let with_dhf = rng.random_bool(0.5);
        // The chunked backward's choices (the recurrent one has none).
        let precision = if rng.random_bool(0.5) { ChunkPrecision::Fast } else { ChunkPrecision::Exact };
        let carry = if rng.random_bool(0.5) { ChunkCarry::Separate } else { ChunkCarry::Auto };
        let config = ChunkConfig { precision, carry, ..ChunkConfig::default() };
        let gates = if real { Gates::Real } else { Gates::Complex };
        let label = format!(
            "{} {mode:?} draw {draw}: lens {lens:?} H={heads} K={kd} V={vd} per_head={per_head} real={real} \
             h0={with_h0} dh_final={with_dhf} {regime:?}{}",
            T::DTYPE,
            if chunked { format!(" {precision:?} {carry:?}") } else { String::new() }
        );
        let parts = dr.parts::<T>(seed + 100 * draw);
        // Upstream gradients per sequence: dy rounded to T, dh_final real
        // for real gates.
        let state = heads * kd * vd;
        let dys: Vec<Vec<f32>> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                to_t(&wave(p.dims.v_len(), seed + 7000 + 100 * draw + i as u64)).iter().map(|x| x.to_f32()).collect()
            })
            .collect();
        let dhfs: Vec<Vec<Complex<f32>>> = (0..n)
            .map(|i| {
                let re = wave(state, seed + 8000 + 100 * draw + i as u64);
                let im = wave(state, seed + 9000 + 100 * draw + i as u64);
                re.iter().zip(im).map(|(&r, m)| Complex::new(r, if real { 0.0 } else { m })).collect()
            })
            .collect();
        let dh_final = |i: usize| with_dhf.then(|| dhfs[i].as_slice());
        // Each sequence alone.
        let alone: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (p, dy, dhf) = (&p.view(), &dys[i], dh_final(i));
                match (chunked, real) {
                    (true, true) => chunk_grad::backward_real_host_as::<T>(gpu, p, dy, dhf, config),
                    (true, false) => chunk_grad::backward_host_as::<T>(gpu, p, dy, dhf, config),
                    (false, true) => recurrent_grad::backward_real_host_as::<T>(gpu, p, dy, dhf),
                    (false, false) => recurrent_grad::backward_host_as::<T>(gpu, p, dy, dhf),
                }
                .unwrap_or_else(|e| panic!("{label}: alone {i}: {e}"))
            })
            .collect();
        let cat = |f: &dyn Fn(&gateloop::reference::grad::Grads<f32>) -> Vec<f32>| -> Vec<f32> {
            alone.iter().flat_map(f).collect()
        };
        let want_dq = cat(&|g| g.dq.clone());
        let want_dk = cat(&|g| g.dk.clone());
        let want_dv = cat(&|g| g.dv.clone());
        let want_dg: Vec<Complex<f32>> = alone.iter().flat_map(|g| g.dlog_gate.clone()).collect();
        let want_dh0: Vec<Complex<f32>> = alone.iter().flat_map(|g| g.dh0.clone().unwrap_or_default()).collect();

        // On device buffers, outputs poisoned.
        let cu = offsets(lens);
        let d = dims(1, cu[n], heads, kd, vd, per_head);
        let DevicePacked { q, k, v, g, h0 } = DevicePacked::<T>::upload(&s, &parts, real);
        let dy: Vec<f32> = dys.concat();
        let dy_dev = s.clone_htod(&to_t(&dy)).unwrap();
        let dhf_all: Vec<Complex<f32>> = dhfs.concat();
        let dhf_dev = with_dhf.then(|| s.clone_htod(&common::gate_side(&dhf_all, real)).unwrap());
        let parts_f = if real { 1 } else { 2 };
        let mut dq = s.clone_htod(&vec![T::nan(); d.qk_len()]).unwrap();
        let mut dk = s.clone_htod(&vec![T::nan(); d.qk_len()]).unwrap();
        let mut dv = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
        let mut dg = s.clone_htod(&vec![f32::NAN; parts_f * d.gate_len()]).unwrap();
        let mut dh0 = with_h0.then(|| s.clone_htod(&vec![f32::NAN; parts_f * n * state]).unwrap());
        let ws_len = if chunked {
            chunk_grad::plan_varlen(&d, &cu, T::DTYPE, gates, carry).unwrap().workspace_len
        } else {
            recurrent_grad::plan_varlen(&d, &cu).unwrap().workspace_len
        };
        let mut ws = s.clone_htod(&vec![f32::NAN; ws_len]).unwrap();
        packed_backward(
            gpu,
            &s,
            mode,
            real,
            &d,
            &cu,
            DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: h0.as_ref().map(|h| h as _) },
            DeviceGradInputs { dy: &dy_dev, dh_final: dhf_dev.as_ref().map(|h| h as _) },
            DeviceGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                dlog_gate: &mut dg,
                dh0: dh0.as_mut().map(|h| h as _),
            },
            &mut ws,
            config,
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let widen = |x: Vec<T>| -> Vec<f32> { x.into_iter().map(|x| x.to_f32()).collect() };
        // Every gradient on the device bit for bit the sequences' alone.
        use cudarc::driver::CudaSlice;
        let assert_alone = |what: &str,
                            dq: &CudaSlice<T>,
                            dk: &CudaSlice<T>,
                            dv: &CudaSlice<T>,
                            dg: &CudaSlice<f32>,
                            dh0: Option<&CudaSlice<f32>>| {
            assert!(bits(&widen(s.clone_dtoh(dq).unwrap())) == bits(&want_dq), "{label}{what}: dq differs");
            assert!(bits(&widen(s.clone_dtoh(dk).unwrap())) == bits(&want_dk), "{label}{what}: dk differs");
            assert!(bits(&widen(s.clone_dtoh(dv).unwrap())) == bits(&want_dv), "{label}{what}: dv differs");
            let got_dg = common::from_gate_side(&s.clone_dtoh(dg).unwrap(), real);
            assert!(cbits(&got_dg) == cbits(&want_dg), "{label}{what}: dlog_gate differs");
            if let Some(dh0) = dh0 {
                let got = common::from_gate_side(&s.clone_dtoh(dh0).unwrap(), real);
                assert!(cbits(&got) == cbits(&want_dh0), "{label}{what}: dh0 differs");
            }
        };
        assert_alone("", &dq, &dk, &dv, &dg, dh0.as_ref());

        // Chunked: the training pair on the same packing (the packed forward
        // saving its chunk states, the backward reading them instead of
        // recomputing them), on freshly poisoned gradients and workspace.
        if chunked {
            let mut y = s.alloc_zeros::<T>(d.v_len()).unwrap();
            let mut h_final = s.alloc_zeros::<f32>(parts_f * n * state).unwrap();
            let nan_t = |len: usize| s.clone_htod(&vec![T::nan(); len]).unwrap();
            let (mut dq, mut dk, mut dv) = (nan_t(d.qk_len()), nan_t(d.qk_len()), nan_t(d.v_len()));
            let mut dg = s.clone_htod(&vec![f32::NAN; parts_f * d.gate_len()]).unwrap();
            let mut dh0 = with_h0.then(|| s.clone_htod(&vec![f32::NAN; parts_f * n * state]).unwrap());
            let mut ws = s.clone_htod(&vec![f32::NAN; ws_len]).unwrap();
            let inputs = || DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: h0.as_ref().map(|h| h as _) };
            let out = gateloop::cuda::chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
            let saved = chunk_grad::forward_varlen_saving_into(gpu, &s, &d, &cu, gates, inputs(), out, &mut ws, config)
                .unwrap_or_else(|e| panic!("{label}: saving forward: {e}"));
            let grads = DeviceGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                dlog_gate: &mut dg,
                dh0: dh0.as_mut().map(|h| h as _),
            };
            let upstream = DeviceGradInputs { dy: &dy_dev, dh_final: dhf_dev.as_ref().map(|h| h as _) };
            chunk_grad::backward_varlen_saved_into(gpu, &s, &d, &cu, inputs(), upstream, grads, saved)
                .unwrap_or_else(|e| panic!("{label}: saved backward: {e}"));
            assert_alone(" (saved forward)", &dq, &dk, &dv, &dg, dh0.as_ref());
        }

        // From host data, through dispatch (real kernels when everything is
        // real; dispatch's chunked backward takes the exact products).
        let dispatched = !chunked || precision == ChunkPrecision::Exact;
        if dispatched {
            let got = packed_host(&parts, with_h0, |p, h0| {
                dispatch::cuda_grad_varlen_as::<T>(
                    gpu,
                    mode,
                    Variant::Default,
                    p,
                    &cu,
                    h0,
                    &dy,
                    with_dhf.then_some(dhf_all.as_slice()),
                )
            })
            .unwrap_or_else(|e| panic!("{label}: dispatch: {e}"));
            assert!(
                bits(&got.dq) == bits(&want_dq) && bits(&got.dk) == bits(&want_dk),
                "{label}: dispatch dq, dk differ"
            );
            assert!(
                bits(&got.dv) == bits(&want_dv) && cbits(&got.dlog_gate) == cbits(&want_dg),
                "{label}: dispatch dv, dlog_gate differ"
            );
            assert_eq!(got.dh0.is_some(), with_h0, "{label}: dispatch dh0 exactly with h0");
            if let Some(dh0) = &got.dh0 {
                assert!(cbits(dh0) == cbits(&want_dh0), "{label}: dispatch dh0 differs");
            }
        }

        // Refused, by name, nothing written: offsets that miss L; dh0 for one
        // sequence too few; a workspace one f32 short; (chunked) the
        // sequential carry.
        if draw == 0 {
            let mut bad_cu = cu.clone();
            bad_cu[n] += 1;
            let mut dq2 = s.clone_htod(&vec![T::nan(); d.qk_len()]).unwrap();
            let mut dk2 = s.clone_htod(&vec![T::nan(); d.qk_len()]).unwrap();
            let mut dv2 = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
            let mut dg2 = s.clone_htod(&vec![f32::NAN; parts_f * d.gate_len()]).unwrap();
            let h0_all = s.clone_htod(&vec![0.0f32; parts_f * n * state]).unwrap();
            let mut dh0_short = s.clone_htod(&vec![f32::NAN; parts_f * (n - 1).max(1) * state - parts_f]).unwrap();
            let mut short_ws = s.clone_htod(&vec![f32::NAN; ws_len - 1]).unwrap();
            let inputs = |with_h0: bool| DeviceInputs {
                q: &q,
                k: &k,
                v: &v,
                log_gate: &g,
                h0: with_h0.then_some(&h0_all as &dyn cudarc::driver::DevicePtr<f32>),
            };
            // One refused call: offsets `cu`, h0 (and the short dh0) when
            // `short_dh0`, workspace `ws`, `config`.
            let mut call = |cu: &[usize], short_dh0: bool, ws: &mut cudarc::driver::CudaSlice<f32>, config| {
                let grads = DeviceGrads {
                    dq: &mut dq2,
                    dk: &mut dk2,
                    dv: &mut dv2,
                    dlog_gate: &mut dg2,
                    dh0: short_dh0.then_some(&mut dh0_short as _),
                };
                let upstream = DeviceGradInputs { dy: &dy_dev, dh_final: None };
                packed_backward(gpu, &s, mode, real, &d, cu, inputs(short_dh0), upstream, grads, ws, config)
            };
            let mut cases = vec![
                ("cu_seqlens", call(&bad_cu, false, &mut ws, config)),
                ("dh0", call(&cu, true, &mut ws, config)),
                ("workspace", call(&cu, false, &mut short_ws, config)),
            ];
            if chunked {
                cases.push((
                    "carry",
                    call(&cu, false, &mut ws, ChunkConfig { carry: ChunkCarry::Sequential, ..config }),
                ));
            }
            for (name, r) in cases {
                let named = match &r {
                    Err(GpuError::Input(
                        InputError::Value { name: got, .. }
                        | InputError::Length { name: got, .. }
                        | InputError::Param { name: got, .. },
                    )) => *got == name,
                    _ => false,
                };
                assert!(named, "{label}: expected a refusal naming {name}: {r:?}");
            }
            assert!(
                s.clone_dtoh(&dq2).unwrap().iter().all(|x| x.to_f32().is_nan()),
                "{label}: a refused call wrote dq"
            );
            assert!(s.clone_dtoh(&dg2).unwrap().iter().all(|x| x.is_nan()), "{label}: a refused call wrote dlog_gate");
        }
    }
}

/// `mode`'s packed backward on device buffers (`recurrent_grad::` or
/// `chunk_grad::backward_varlen_into`, or their real-gate twins when
/// `real`); `config` is the chunked backward's (the recurrent one has none).
#[allow(clippy::too_many_arguments)]
fn packed_backward<'a, T: Element>(
    gpu: &Gpu,
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    mode: Mode,
    real: bool,
    d: &gateloop::Dims,
    cu: &[usize],
    inputs: gateloop::cuda::DeviceInputs<'a, T>,
    upstream: gateloop::cuda::recurrent_grad::DeviceGradInputs<'a, T>,
    grads: gateloop::cuda::recurrent_grad::DeviceGrads<'a, T>,
    ws: &'a mut cudarc::driver::CudaSlice<f32>,
    config: gateloop::cuda::chunk::ChunkConfig,
) -> Result<(), GpuError> {
    use gateloop::cuda::{chunk_grad, recurrent_grad};
    match (mode, real) {
        (Mode::Chunked, true) => {
            chunk_grad::backward_varlen_real_into(gpu, s, d, cu, inputs, upstream, grads, Some(ws), config)
        }
        (Mode::Chunked, false) => {
            chunk_grad::backward_varlen_into(gpu, s, d, cu, inputs, upstream, grads, Some(ws), config)
        }
        (_, true) => recurrent_grad::backward_varlen_real_into(gpu, s, d, cu, inputs, upstream, grads, ws),
        (_, false) => recurrent_grad::backward_varlen_into(gpu, s, d, cu, inputs, upstream, grads, ws),
    }
}

/// The chunked forward's packed launch (`chunk::forward_varlen_into`, a
/// state per sequence, every sequence's chunks from its first step): drawn
/// packings (1–5 sequences of 1–200 steps, so one to four chunks of 64 and
/// boundaries anywhere inside them, K up to 64, V up to 65, every gate
/// regime, per-head or not, real or complex, with or without h0), f32 and
/// bf16, every launch choice it takes (exact and fast products, the separate
/// carry, the staged output and, for bf16, the register-fragment one), into
/// NaN-poisoned y, h_final and workspace: y and h_final bit for bit the
/// chunked forward's on each sequence alone with the same choices, and
/// within the chunked bounds of the f64 reference; from host data
/// (`forward_varlen_host_as`, the CLI's path) too. Bad offsets, the
/// sequential carry, a state for the wrong N and a short workspace are
/// refused by name, nothing written.
#[test]
fn chunked_varlen_equals_each_sequence_alone() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    chunked_varlen::<f32>(gpu, 9970);
    chunked_varlen::<bf16>(gpu, 9980);
}

fn chunked_varlen<T: Element>(gpu: &Gpu, seed: u64) {
    use gateloop::cuda::chunk::{self, ChunkCarry, ChunkConfig, ChunkOutput};
    use gateloop::cuda::{DeviceInputs, DeviceOutputs, Dtype};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let s = gpu.context().new_stream().unwrap();
    for draw in 0..10u64 {
        let dr = DrawnPacking::draw(&mut rng, 5, 64, &[1, 7, 40, 65]);
        let DrawnPacking { ref lens, heads, kd, vd, per_head, real, with_h0, .. } = dr;
        let n = lens.len();
        let precision = if rng.random_bool(0.5) { ChunkPrecision::Fast } else { ChunkPrecision::Exact };
        let carry = if rng.random_bool(0.5) { ChunkCarry::Separate } else { ChunkCarry::Auto };
        let output =
            if T::DTYPE != Dtype::F32 && rng.random_bool(0.5) { ChunkOutput::Fragments } else { ChunkOutput::Staged };
        let config = ChunkConfig { precision, carry, output, ..ChunkConfig::default() };
        let gates = if real { Gates::Real } else { Gates::Complex };
        let label = dr.label::<T>(draw, &config);
        let parts = dr.parts::<T>(seed + 100 * draw);
        let cu = offsets(lens);
        let d = dims(1, cu[n], heads, kd, vd, per_head);
        let DevicePacked { q, k, v, g, h0 } = DevicePacked::<T>::upload(&s, &parts, real);
        let state_floats = if real { 1 } else { 2 } * n * heads * kd * vd;
        let ws_len = chunk::plan_varlen(&d, &cu, T::DTYPE, gates, carry).unwrap().workspace_len;
        let mut y = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
        let mut h = s.clone_htod(&vec![f32::NAN; state_floats]).unwrap();
        let mut ws = s.clone_htod(&vec![f32::NAN; ws_len]).unwrap();
        let run = if real { chunk::forward_varlen_real_into::<T> } else { chunk::forward_varlen_into::<T> };
        let inputs = || DeviceInputs { q: &q, k: &k, v: &v, log_gate: &g, h0: h0.as_ref().map(|h| h as _) };
        run(gpu, &s, &d, &cu, inputs(), DeviceOutputs { y: &mut y, h_final: &mut h }, Some(&mut ws), config)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let got = download(&s, &y, &h, real);

        // Each sequence alone, the same choices: the same bits.
        let mut want = gateloop::Outputs { y: Vec::new(), h_final: Vec::new() };
        for (i, p) in parts.iter().enumerate() {
            let o = if real {
                chunk::forward_real_host_as::<T>(gpu, &p.view(), config)
            } else {
                chunk::forward_host_as::<T>(gpu, &p.view(), config)
            }
            .unwrap_or_else(|e| panic!("{label}: alone {i}: {e}"));
            want.y.extend(o.y);
            want.h_final.extend(o.h_final);
        }
        assert_same_bits(&label, "the packed launch's", &got, &want);
        // And the reference, sequence by sequence.
        let (y_ref, h_ref) = reference_alone(&parts);
        let (yb, hb) = chunk_bounds(T::DTYPE, precision);
        common::assert_within(&label, "y", &gateloop::compare(&got.y, &y_ref), yb.0, yb.1);
        common::assert_within(&label, "h_final", &gateloop::compare_complex(&got.h_final, &h_ref), hb.0, hb.1);

        // From host data: the same launches, the same bits.
        let host =
            packed_host(&parts, with_h0, |p, h0| chunk::forward_varlen_host_as::<T>(gpu, p, &cu, h0, config, gates))
                .unwrap_or_else(|e| panic!("{label}: host: {e}"));
        assert_same_bits(&label, "host", &host, &want);

        // Refused, by name, nothing written: offsets that miss L; the
        // sequential carry; h_final for one sequence too few; a workspace
        // one f32 short.
        if draw < 2 {
            let mut bad_cu = cu.clone();
            bad_cu[n] += 1;
            let mut y2 = s.clone_htod(&vec![T::nan(); d.v_len()]).unwrap();
            let mut h2 = s.clone_htod(&vec![f32::NAN; state_floats]).unwrap();
            let mut short_h = s.clone_htod(&vec![f32::NAN; state_floats / n * (n - 1)]).unwrap();
            let mut short_ws = s.clone_htod(&vec![f32::NAN; ws_len - 1]).unwrap();
            let sequential = ChunkConfig { carry: ChunkCarry::Sequential, ..config };
            let cases = [
                (
                    "cu_seqlens",
                    run(
                        gpu,
                        &s,
                        &d,
                        &bad_cu,
                        inputs(),
                        DeviceOutputs { y: &mut y2, h_final: &mut h2 },
                        Some(&mut ws),
                        config,
                    ),
                ),
                (
                    "carry",
                    run(
                        gpu,
                        &s,
                        &d,
                        &cu,
                        inputs(),
                        DeviceOutputs { y: &mut y2, h_final: &mut h2 },
                        Some(&mut ws),
                        sequential,
                    ),
                ),
                (
                    "h_final",
                    run(
                        gpu,
                        &s,
                        &d,
                        &cu,
                        inputs(),
                        DeviceOutputs { y: &mut y2, h_final: &mut short_h },
                        Some(&mut ws),
                        config,
                    ),
                ),
                (
                    "workspace",
                    run(
                        gpu,
                        &s,
                        &d,
                        &cu,
                        inputs(),
                        DeviceOutputs { y: &mut y2, h_final: &mut h2 },
                        Some(&mut short_ws),
                        config,
                    ),
                ),
            ];
            for (name, r) in cases {
                let named = match &r {
                    Err(GpuError::Input(
                        InputError::Value { name: got, .. }
                        | InputError::Length { name: got, .. }
                        | InputError::Param { name: got, .. },
                    )) => *got == name,
                    _ => false,
                };
                assert!(named, "{label}: expected a refusal naming {name}: {r:?}");
            }
            assert!(s.clone_dtoh(&y2).unwrap().iter().all(|x| x.to_f32().is_nan()), "{label}: a refused call wrote y");
            assert!(s.clone_dtoh(&h2).unwrap().iter().all(|x| x.is_nan()), "{label}: a refused call wrote h_final");
        }
    }
}
