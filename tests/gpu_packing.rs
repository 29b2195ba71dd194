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
//! arguments are refused before anything is written.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::grad::{GradInputsF32, Worst, compare_grads, real_part_grads};
use common::packed::{LENGTHS, Packed};
use common::{ABS_FRAC, REL};
use dtype_support::{chunk_bounds, y_bounds};
use gateloop::cuda::chunk::ChunkPrecision;
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
