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
//! The GPU kernels: tests/gpu_packing.rs.

mod common;

use common::packed::{LENGTHS, Packed, REGIMES};
use common::{ABS_FRAC, REL, assert_outputs, grad::Worst};
use gateloop::reference::{self, RefMode};
use gateloop::{Mode, dispatch};

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
