//! Variable-length sequences packed into one batch row (`gateloop::packing`,
//! fla's `cu_seqlens`): with reset gates written at every sequence start,
//! every CPU mode computes each sequence as if it ran alone.
//!
//! - The f64 recurrence and its adjoint: exactly (`==`) the sequences run
//!   alone, y, h_final, dq, dk, dv, dlog_gate and dh0, since a reset
//!   multiplies the carried state by an exact 0 (nothing leaks, not even
//!   rounding).
//! - The f64 scan and surrogate attention: within 1e-10 of that (the fuzzer's
//!   f64 bound).
//! - Every f32 mode (recurrent, scan, attention, chunked) and every f32
//!   backward (`dispatch::cpu_grad_f32`): the f32 bounds (relative L2 ≤ 1e-4,
//!   max-abs ≤ 1e-3 · max|ref|) against the sequences alone in f64.
//!
//!
//! A state per sequence (`packing::{forward_varlen, backward_varlen}`): B
//! sequences of L steps packed give the batched problem's outputs and
//! gradients exactly; sequences of different lengths each their own run
//! from their own h0; bad arguments refused by name before anything runs.
//!
//! The GPU kernels: tests/gpu_packing.rs.

mod common;

use common::packed::{LENGTHS, Packed, REGIMES, offsets};
use common::{ABS_FRAC, REL, assert_outputs, grad::Worst};
use gateloop::cpu::chunked::{self, ChunkParams};
use gateloop::reference::{self, RefMode};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, InputError, Mode, Problem, dispatch, packing};

/// Every packing of [`LENGTHS`] in every regime of [`REGIMES`], both gate
/// layouts, h0 and dh_final on alternate cases.
fn packings(mut f: impl FnMut(Packed)) {
    let mut seed = 9100;
    for lens in LENGTHS {
        for regime in REGIMES {
            for per_head in [false, true] {
                seed += 1;
                let (h0, dhf) = (seed % 2 == 0, seed % 3 != 0);
                f(Packed::new(lens, (2, 8, 4), per_head, regime, h0, dhf, seed));
            }
        }
    }
}

#[test]
fn the_f64_recurrence_and_its_adjoint_equal_the_sequences_alone_exactly() {
    packings(|pk| {
        let label = pk.label();
        let p64 = pk.packed.p.map(f64::from);
        let got = reference::recurrent::forward(&p64.view()).unwrap();
        let want = pk.separate_forward();
        assert_eq!(got.y, want.y, "{label}: y");
        assert_eq!(got.h_final, want.h_final, "{label}: h_final");
        let g = pk.packed.reference();
        let w = pk.separate_grads();
        assert_eq!(g.dq, w.dq, "{label}: dq");
        assert_eq!(g.dk, w.dk, "{label}: dk");
        assert_eq!(g.dv, w.dv, "{label}: dv");
        assert_eq!(g.dlog_gate, w.dlog_gate, "{label}: dlog_gate");
        assert_eq!(g.dh0, w.dh0, "{label}: dh0");
        // The resets' own gradients are 0 (the gates they replaced would
        // have multiplied a zero state).
        let step = pk.packed.p.dims.heads * pk.packed.p.dims.gate_dim();
        for &s in &pk.cu_seqlens[1..pk.cu_seqlens.len() - 1] {
            assert!(g.dlog_gate[s * step..(s + 1) * step].iter().all(|z| z.re == 0.0 && z.im == 0.0), "{label}");
        }
    });
}

#[test]
fn the_f64_scan_and_attention_match_the_sequences_alone() {
    packings(|pk| {
        let p64 = pk.packed.p.map(f64::from);
        let want = pk.separate_forward();
        for mode in [RefMode::Scan, RefMode::Attention] {
            let got = reference::forward(mode, &p64.view()).unwrap();
            assert_outputs(&format!("{} {mode:?}", pk.label()), &got.y, &got.h_final, &want, 1e-10, 1e-9);
        }
    });
}

#[test]
fn every_f32_mode_matches_the_sequences_alone() {
    packings(|pk| {
        let want = pk.separate_forward();
        for mode in Mode::ALL {
            let got = dispatch::cpu_f32(mode, &pk.packed.p.view()).unwrap();
            assert_outputs(&format!("{} {mode:?}", pk.label()), &got.y, &got.h_final, &want, REL, ABS_FRAC);
        }
    });
}

#[test]
fn every_f32_backward_matches_the_sequences_alone() {
    let mut worst = Worst::default();
    packings(|pk| {
        let want = pk.separate_grads();
        for mode in [Mode::Recurrent, Mode::Scan, Mode::Chunked] {
            let inp = &pk.packed;
            let got = dispatch::cpu_grad_f32(mode, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
            worst.check(&format!("{} {mode:?}", pk.label()), &common::grad::compare_grads(&got, &want), REL);
        }
    });
    worst.report("every_f32_backward_matches_the_sequences_alone");
}

/// `dy` and `dh_final` for `p`: deterministic, nonzero, not equal to any input.
fn upstream(p: &OwnedProblem<f64>, states: usize, seed: u64) -> (Vec<f64>, Vec<Complex<f64>>) {
    let wave = |n: usize, f: f64| (0..n).map(|i| (f * (i as f64 + seed as f64)).sin()).collect::<Vec<f64>>();
    let dh = wave(2 * states * p.dims.heads * p.dims.key_dim * p.dims.value_dim, 0.61);
    (wave(p.dims.v_len(), 0.29), dh.chunks(2).map(|c| Complex::new(c[0], c[1])).collect())
}

/// `packing::{forward_varlen, backward_varlen}` (a state per sequence):
/// B sequences of L steps packed into one row, each from its own h0, give
/// the batched problem's y, h_final, dq, dk, dv, dlog_gate and dh0 `[B, …]`
/// exactly (the f64 recurrence and its adjoint, which loop over the batch
/// rows: an independent path to the same numbers).
#[test]
fn varlen_states_equal_the_batched_problem() {
    let mut seed = 9200;
    for (b, l) in [(1, 1), (3, 1), (3, 65), (2, 130)] {
        for regime in REGIMES {
            for per_head in [false, true] {
                seed += 1;
                let label = format!("B={b} L={l} {regime:?} per_head={per_head}");
                let p = random_problem(dims(b, l, 2, 8, 4, per_head), regime, true, seed);
                let (dy, dh_final) = upstream(&p, b, seed);
                let batched = reference::recurrent::forward(&p.view()).unwrap();
                let batched_g = reference::grad::backward(&p.view(), &dy, Some(&dh_final)).unwrap();
                // The same memory read as one row of B·L steps.
                let h0 = p.h0.as_deref();
                let row = Problem { dims: Dims { batch: 1, len: b * l, ..p.dims }, h0: None, ..p.view() };
                let cu: Vec<usize> = (0..=b).map(|i| i * l).collect();
                let o = packing::forward_varlen(&row, &cu, h0, reference::recurrent::forward).unwrap();
                assert_eq!(o.y, batched.y, "{label}: y");
                assert_eq!(o.h_final, batched.h_final, "{label}: h_final");
                let g = packing::backward_varlen(&row, &cu, h0, &dy, Some(&dh_final), |s, dy, dh| {
                    reference::grad::backward(s, dy, dh)
                })
                .unwrap();
                assert_eq!(g.dq, batched_g.dq, "{label}: dq");
                assert_eq!(g.dk, batched_g.dk, "{label}: dk");
                assert_eq!(g.dv, batched_g.dv, "{label}: dv");
                assert_eq!(g.dlog_gate, batched_g.dlog_gate, "{label}: dlog_gate");
                assert_eq!(g.dh0, batched_g.dh0, "{label}: dh0");
            }
        }
    }
}

/// Sequences of different lengths ([`LENGTHS`]), each drawn alone with its
/// own h0 and concatenated: `forward_varlen` with the f64 recurrence gives
/// each one's y and h_final exactly; with the CPU chunked path (f32) within
/// the f32 bounds of that; without h0 its y equals the reset packing's
/// exactly, and its last h_final the reset packing's.
#[test]
fn varlen_runs_each_sequence_from_its_own_state() {
    let mut seed = 9300;
    for lens in LENGTHS {
        for regime in REGIMES {
            seed += 1;
            let per_head = seed % 2 == 0;
            let label = format!("lens {lens:?} {regime:?} per_head={per_head}");
            let parts: Vec<OwnedProblem<f64>> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| random_problem(dims(1, l, 2, 8, 4, per_head), regime, true, 100 * seed + i as u64))
                .collect();
            let cat = |f: &dyn Fn(&OwnedProblem<f64>) -> &[f64]| parts.iter().flat_map(|p| f(p).to_vec()).collect();
            let (q, k, v): (Vec<f64>, Vec<f64>, Vec<f64>) = (cat(&|p| &p.q), cat(&|p| &p.k), cat(&|p| &p.v));
            let log_gate: Vec<Complex<f64>> = parts.iter().flat_map(|p| p.log_gate.clone()).collect();
            let h0: Vec<Complex<f64>> = parts.iter().flat_map(|p| p.h0.clone().unwrap()).collect();
            let cu = offsets(lens);
            let d = dims(1, cu[lens.len()], 2, 8, 4, per_head);
            let row = Problem::new(d, &q, &k, &v, &log_gate, None).unwrap();
            let got = packing::forward_varlen(&row, &cu, Some(&h0), reference::recurrent::forward).unwrap();
            let alone: Vec<_> = parts.iter().map(|p| reference::recurrent::forward(&p.view()).unwrap()).collect();
            let want_y: Vec<f64> = alone.iter().flat_map(|o| o.y.clone()).collect();
            let want_h: Vec<Complex<f64>> = alone.iter().flat_map(|o| o.h_final.clone()).collect();
            assert_eq!(got.y, want_y, "{label}: y");
            assert_eq!(got.h_final, want_h, "{label}: h_final");
            // The chunked f32 path, a state each.
            let row32 = OwnedProblem {
                dims: d,
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                log_gate: log_gate.clone(),
                h0: None,
            }
            .map(|x| x as f32);
            let h0_32: Vec<Complex<f32>> = h0.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect();
            let fast = packing::forward_varlen(&row32.view(), &cu, Some(&h0_32), |s| {
                chunked::forward(s, &ChunkParams::default())
            })
            .unwrap();
            common::assert_within(&label, "chunked y", &gateloop::compare(&fast.y, &want_y), REL, ABS_FRAC);
            common::assert_within(
                &label,
                "chunked h_final",
                &gateloop::compare_complex(&fast.h_final, &want_h),
                REL,
                ABS_FRAC,
            );
            // Without h0: the reset packing's y, and its h_final the last
            // sequence's.
            let mut reset_gate = log_gate.clone();
            packing::reset_sequence_starts(&d, &cu, &mut reset_gate).unwrap();
            let resets = reference::recurrent::forward(&Problem { log_gate: &reset_gate, ..row }).unwrap();
            let zero = packing::forward_varlen(&row, &cu, None, reference::recurrent::forward).unwrap();
            assert_eq!(zero.y, resets.y, "{label}: y without h0");
            let state = resets.h_final.len();
            assert_eq!(zero.h_final[zero.h_final.len() - state..], resets.h_final[..], "{label}: last h_final");
        }
    }
}

/// Bad arguments are refused by name before the mode runs: offsets, an h0
/// inside the packed problem, h0 / dh_final / dy of the wrong length, and a
/// backward that drops dh0.
#[test]
fn varlen_refuses_bad_arguments_before_running() {
    let p = random_problem(dims(1, 10, 2, 3, 4, false), GateRegime::Random, true, 9400);
    let row = Problem { h0: None, ..p.view() };
    let h0 = vec![Complex::new(0.5, -0.5); 2 * 2 * 3 * 4];
    let (dy, dh) = upstream(&p, 2, 1);
    let mut calls = 0;
    let mut fwd = |s: &Problem<'_, f64>| {
        calls += 1;
        reference::recurrent::forward(s)
    };
    let e = |r: Result<gateloop::Outputs<f64>, InputError>| r.unwrap_err();
    assert!(matches!(
        e(packing::forward_varlen(&row, &[0, 4, 9], None, &mut fwd)),
        InputError::Value { name: "cu_seqlens", index: 2, .. }
    ));
    assert!(matches!(
        e(packing::forward_varlen(&p.view(), &[0, 4, 10], None, &mut fwd)),
        InputError::Param { name: "h0", .. }
    ));
    assert!(matches!(
        e(packing::forward_varlen(&row, &[0, 4, 10], Some(&h0[..h0.len() / 2]), &mut fwd)),
        InputError::Length { name: "h0", .. }
    ));
    let batched = Problem { dims: dims(2, 5, 2, 3, 4, false), ..row };
    assert!(matches!(
        e(packing::forward_varlen(&batched, &[0, 5], None, &mut fwd)),
        InputError::Param { name: "batch", .. }
    ));
    assert_eq!(calls, 0, "the mode ran on refused arguments");
    let bwd = |s: &Problem<'_, f64>, dy: &[f64], dh: Option<&[Complex<f64>]>| reference::grad::backward(s, dy, dh);
    let cu = [0, 4, 10];
    let eg = |r: Result<gateloop::reference::grad::Grads<f64>, InputError>| r.unwrap_err();
    assert!(matches!(
        eg(packing::backward_varlen(&row, &cu, Some(&h0), &dy[1..], Some(&dh), bwd)),
        InputError::Length { name: "dy", .. }
    ));
    assert!(matches!(
        eg(packing::backward_varlen(&row, &cu, Some(&h0), &dy, Some(&dh[1..]), bwd)),
        InputError::Length { name: "dh_final", .. }
    ));
    let drops_dh0 = |s: &Problem<'_, f64>, dy: &[f64], dh: Option<&[Complex<f64>]>| {
        reference::grad::backward(&Problem { h0: None, ..*s }, dy, dh)
    };
    assert!(matches!(
        eg(packing::backward_varlen(&row, &cu, Some(&h0), &dy, Some(&dh), drops_dh0)),
        InputError::Param { name: "backward", .. }
    ));
    assert!(
        packing::backward_varlen(&row, &cu, Some(&h0), &dy, Some(&dh), bwd).unwrap().dh0.unwrap().len() == h0.len()
    );
}
