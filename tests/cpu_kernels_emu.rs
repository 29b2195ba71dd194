//! The fused-scan forward's CUDA kernels (`cuda/scan.cu`: reduce, carry,
//! forward) and the recurrent kernel (`cuda/recurrent.cu`, as forward and as
//! in-place decode), compiled unchanged for the CPU by
//! `tests/kernel_emu/build.sh scan` / `build.sh recurrent` (every thread of a
//! block an OS thread; outputs, workspace and dynamic shared memory
//! NaN-poisoned) and launched as `cuda::scan::forward_into` /
//! `cuda::recurrent::{forward_into, decode_into}` launch them, with the
//! geometry of their `plan`s:
//!
//! - scan forward: equal to the CPU mirror `cpu::scan` bit for bit (same
//!   arithmetic in the same order, same libm), and within relative L2 ≤ 1e-4,
//!   max-abs ≤ 1e-3·max|ref| of the f64 reference on the same f32 inputs;
//!   in f16 / bf16 (q, k, v, y), y within `dtype_support::y_bounds` and
//!   h_final within the f32 bounds of the reference, y equal bit for bit to
//!   the f32 kernel's y rounded to the type and h_final to its h_final;
//! - recurrent: within those bounds of the f64 reference (f16 / bf16: the
//!   bounds of `dtype_support::y_bounds`); decode in pieces (of 1 step and
//!   longer) equal to one forward call bit for bit, state and y;
//! - the recurrent backward (`cuda/recurrent_grad.cu`, its three launches as
//!   `cuda::recurrent_grad::backward_into` runs them): every gradient within
//!   the f32 bounds of the f64 reference backward (dq, dk, dv in f16 / bf16
//!   plus their one rounding), under AddressSanitizer and race-free under
//!   ThreadSanitizer.
//!
//! Proves the kernels' indexing, shuffles, barriers, shared-memory carving
//! and launch sequences without a GPU; not the SFU's accuracy or the memory
//! model (see tests/kernel_emu/README.md). Skips (with a notice) without g++.
//! Run with `--nocapture` for the measured differences.

mod common;
mod dtype_support;
mod emu_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gateloop::cpu::scan as scan_mirror;
use gateloop::cuda::recurrent::RecurrentConfig;
use gateloop::cuda::recurrent::RecurrentRows::Four;
use gateloop::cuda::recurrent::RecurrentStaging::{Ahead, Batched};
use gateloop::cuda::{Dtype, Element, recurrent, recurrent_grad, scan};
use gateloop::dispatch::MIRROR_SM_COUNT;
use gateloop::reference::{self, grad::Grads};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, ErrorStats, Outputs, compare, compare_complex};

use common::grad::{self, GradInputsF32};
use common::{ABS_FRAC, ALL_REGIMES_AND_UNDERFLOW, REL, assert_within, flat, unflat};
use emu_support::{kernel_emulator, race_checking_emulator, read_f32_file, write_case};

/// An emulator binary, built once per test binary.
fn emulator(which: &'static std::sync::OnceLock<Option<PathBuf>>, kind: &str, env: &str) -> Option<PathBuf> {
    which.get_or_init(|| kernel_emulator(kind, env)).clone()
}
static SCAN_EMU: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
static RECURRENT_EMU: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
/// The recurrent kernels' ThreadSanitizer build, shared by the race tests.
static RECURRENT_RACE_EMU: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
fn scan_emulator() -> Option<PathBuf> {
    emulator(&SCAN_EMU, "scan", "GATELOOP_SCAN_GRAD_EMU")
}
fn recurrent_emulator() -> Option<PathBuf> {
    emulator(&RECURRENT_EMU, "recurrent", "GATELOOP_RECURRENT_EMU")
}

/// Runs `emu` with `args` then `dir`; reads y.out and `state_file`, removes `dir`.
fn run(emu: &Path, args: &[&str], dir: &Path, state_file: &str) -> Outputs<f32> {
    let status = std::process::Command::new(emu).args(args).arg(dir).status().unwrap();
    assert!(status.success(), "{dir:?}: emulator failed: {status}");
    let out = Outputs { y: read_f32_file(&dir.join("y.out")), h_final: unflat(&read_f32_file(&dir.join(state_file))) };
    std::fs::remove_dir_all(dir).unwrap();
    out
}

/// The scan forward's three launches (reduce, carry, forward; one chunk:
/// forward only) with the geometry `lp`, q, k, v and y in `dtype` (q, k, v
/// must be representable in it). Returns y (widened) and h_final.
fn scan_emulated(emu: &Path, tag: &str, p: &OwnedProblem<f32>, lp: &scan::LaunchPlan, dtype: Dtype) -> Outputs<f32> {
    let extra = [dtype.abi().to_string(), lp.warps.to_string(), lp.value_tile.to_string()];
    run(emu, &["--forward"], &write_case(tag, p, &extra, false, &[]), "h_final.out")
}

/// The recurrent kernel's launch with the plan of
/// `cuda::recurrent::plan_with(config)`: forward_into (`state` None: h0 from
/// `p`), or decode_into (`state`: the initial state, updated in place; `p`
/// without h0). q, k, v must be representable in `dtype`. Returns y
/// (widened) and h_final / the new state.
fn recurrent_emulated(
    emu: &Path,
    tag: &str,
    p: &OwnedProblem<f32>,
    dtype: Dtype,
    state: Option<&[Complex<f32>]>,
    config: impl Into<RecurrentConfig>,
) -> Outputs<f32> {
    let lp = recurrent::plan_with(&p.dims, config).unwrap();
    let extra = [dtype.abi(), lp.rows_per_thread, lp.key_groups, lp.chunk_len, lp.shared_bytes, lp.staging as u32]
        .map(|x| x.to_string());
    match state {
        None => run(emu, &[], &write_case(tag, p, &extra, false, &[]), "h_final.out"),
        Some(s) => run(emu, &["--decode"], &write_case(tag, p, &extra, false, &[("state.bin", &flat(s))]), "state.out"),
    }
}

/// The recurrent backward's three launches with the plan of
/// `cuda::recurrent_grad::plan`, q, k, v, dy and dq, dk, dv in `dtype` (the
/// inputs must be representable in it). Returns every gradient (dq, dk, dv
/// widened; dh0 when the problem has h0).
fn recurrent_grad_emulated(emu: &Path, tag: &str, inp: &GradInputsF32, dtype: Dtype) -> Grads<f32> {
    let p = &inp.p;
    let lp = recurrent_grad::plan(&p.dims).unwrap();
    let sp = &lp.sweep;
    let extra = [
        dtype.abi() as usize,
        sp.rows_per_thread as usize,
        sp.key_groups as usize,
        sp.chunk_len as usize,
        sp.shared_bytes as usize,
        lp.segments,
        inp.dh_final.is_some() as usize,
    ]
    .map(|x| x.to_string());
    let dhf = inp.dh_final.as_deref().map(flat);
    let mut files: Vec<(&str, &[f32])> = vec![("dy.bin", &inp.dy)];
    if let Some(h) = &dhf {
        files.push(("dh_final.bin", h));
    }
    let dir = write_case(tag, p, &extra, false, &files);
    let status = std::process::Command::new(emu).arg("--grad").arg(&dir).status().unwrap();
    assert!(status.success(), "{dir:?}: emulator failed: {status}");
    let read = |name: &str| read_f32_file(&dir.join(name));
    let g = Grads {
        dq: read("dq.out"),
        dk: read("dk.out"),
        dv: read("dv.out"),
        dlog_gate: unflat(&read("dlog_gate.out")),
        dh0: p.h0.is_some().then(|| unflat(&read("dh0.out"))),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    g
}

/// The recurrent backward against the f64 reference backward on the same
/// (rounded) inputs, under AddressSanitizer (`race` false) or
/// ThreadSanitizer: every rows-per-thread variant, segments and time chunks
/// with partial last ones, value tiles, both gate layouts, h0 and dh_final,
/// the regimes that stress the gate gradient (resets, |a| = 1, strong and
/// hard decay, underflow, phases ≫ 2π), f32 and 16-bit.
fn recurrent_grad_cases(emu: &Path, race: bool) {
    let mut worst = grad::Worst::default();
    let cases: &[(Dims, GateRegime, Dtype)] = if race {
        &[
            (dims(1, 130, 1, 16, 40, false), GateRegime::Mixed, Dtype::F32),
            (dims(2, 70, 1, 3, 9, true), GateRegime::StrongDecay(40.0), Dtype::Bf16),
        ]
    } else {
        &[
            (dims(1, 1, 2, 3, 2, false), GateRegime::StrongDecay(40.0), Dtype::F32),
            (dims(1, 65, 1, 1, 1, true), GateRegime::Resets(0.1), Dtype::F32),
            (dims(2, 200, 2, 2, 33, false), GateRegime::UnitModulus, Dtype::F32),
            (dims(1, 300, 1, 4, 7, true), GateRegime::LargePhase(50.0), Dtype::F32),
            (dims(1, 129, 2, 64, 64, false), GateRegime::HardDecay(0.5), Dtype::F32),
            (dims(1, 100, 1, 128, 5, false), GateRegime::Underflow, Dtype::F32),
            (dims(1, 150, 2, 12, 40, true), GateRegime::Mixed, Dtype::F16),
            (dims(2, 77, 1, 9, 33, false), GateRegime::StrongDecay(30.0), Dtype::Bf16),
        ]
    };
    for (i, &(d, regime, t)) in cases.iter().enumerate() {
        let c = grad::GradCase::new(d, regime, i % 2 == 0, i % 3 != 1, 1500 + i as u64);
        let inp = gateloop::with_element!(t, T => c.inputs().rounded::<T>());
        let got = recurrent_grad_emulated(emu, &format!("rgrad{i}_{race}"), &inp, t);
        let label =
            format!("{c:?} {t:?} {:?}{}", recurrent_grad::plan(&d).unwrap(), if race { " (race-checked)" } else { "" });
        let y = dtype_support::y_bounds(t);
        worst.check_bounds(&label, &grad::compare_grads(&got, &inp.reference()), |name| match name {
            "dq" | "dk" | "dv" => y,
            _ => (REL, ABS_FRAC),
        });
    }
    worst.report(if race { "race-checked recurrent backward" } else { "recurrent backward" });
}

#[test]
fn recurrent_backward_emulated_matches_reference() {
    let Some(emu) = recurrent_emulator() else { return };
    recurrent_grad_cases(&emu, false);
}

#[test]
fn recurrent_backward_race_free() {
    let Some(emu) = RECURRENT_RACE_EMU.get_or_init(|| race_checking_emulator("recurrent")).clone() else { return };
    recurrent_grad_cases(&emu, true);
}

/// The largest errors seen, per (kernel, output, against what).
#[derive(Default)]
struct Worst(BTreeMap<String, (f64, f64)>);
impl Worst {
    /// Asserts `e` within (`rel`, `abs_frac`) and records it under `key`.
    fn check(&mut self, label: &str, key: &str, e: &ErrorStats, rel: f64, abs_frac: f64) {
        assert_within(label, key, e, rel, abs_frac);
        let w = self.0.entry(key.to_string()).or_default();
        w.0 = w.0.max(e.rel_l2);
        w.1 = w.1.max(e.max_abs / e.max_ref.max(f64::MIN_POSITIVE));
    }
    fn report(&self, test: &str) {
        for (key, (rel, abs)) in &self.0 {
            println!("worst, {test}: {key}: rel L2 {rel:.2e}, max-abs/max|ref| {abs:.2e}");
        }
    }
}

/// y and h_final of two runs equal bit for bit.
fn assert_same_bits(label: &str, got: &Outputs<f32>, want: &Outputs<f32>) {
    assert!(bits(&got.y) == bits(&want.y), "{label}: y differs {:?}", compare(&got.y, &want.y));
    assert!(
        complex_bits(&got.h_final) == complex_bits(&want.h_final),
        "{label}: h_final differs {:?}",
        compare_complex(&got.h_final, &want.h_final)
    );
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|x| x.to_bits()).collect()
}
fn complex_bits(x: &[Complex<f32>]) -> Vec<u32> {
    bits(&flat(x))
}

/// y and h_final of `got` against the f64 reference `want`, recorded under `kernel`.
fn check_reference(
    worst: &mut Worst,
    label: &str,
    kernel: &str,
    got: &Outputs<f32>,
    want: &Outputs<f64>,
    y_bounds: (f64, f64),
) {
    worst.check(label, &format!("{kernel} y vs f64 reference"), &compare(&got.y, &want.y), y_bounds.0, y_bounds.1);
    let e = compare_complex(&got.h_final, &want.h_final);
    worst.check(label, &format!("{kernel} h_final vs f64 reference"), &e, REL, ABS_FRAC);
}

/// The scan forward's kernels: every launch, 1, 2 and 4 warps per block,
/// value tiles 1, 2 and 4, one and several chunks (L = 1, L a chunk exactly,
/// one step past a chunk, L ≈ 5000 with B·H = 1), B·H > 1, both gate layouts,
/// h0 present and absent, every gate regime.
#[test]
fn scan_forward_kernels_emulated_match_mirror_and_reference() {
    let Some(emu) = scan_emulator() else { return };
    let mut worst = Worst::default();
    // (dims, regime, h0, SM count of the plan): one SM makes the plan pick 2
    // and 4 warps per block for small problems.
    let cases = [
        (dims(1, 5000, 1, 4, 5, false), GateRegime::Mixed, true, MIRROR_SM_COUNT),
        (dims(2, 300, 2, 5, 7, true), GateRegime::Random, false, MIRROR_SM_COUNT),
        (dims(1, 1, 1, 3, 2, false), GateRegime::UnitModulus, true, MIRROR_SM_COUNT),
        (dims(1, 700, 1, 3, 1, false), GateRegime::Resets(0.05), true, 1),
        (dims(1, 2100, 1, 2, 3, true), GateRegime::LargePhase(50.0), false, 1),
        (dims(1, 256, 1, 16, 16, false), GateRegime::StrongDecay(40.0), true, MIRROR_SM_COUNT),
        (dims(1, 257, 2, 3, 4, true), GateRegime::Resets(1.0), true, MIRROR_SM_COUNT),
        (dims(1, 600, 1, 3, 2, false), GateRegime::Underflow, false, MIRROR_SM_COUNT),
        (dims(1, 1000, 1, 2, 2, false), GateRegime::HardDecay(0.5), true, 1),
    ];
    let (mut warps_seen, mut tiles_seen, mut chunks_seen) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (i, (d, regime, with_h0, sms)) in cases.into_iter().enumerate() {
        let seed = 1000 + i as u64;
        let p64 = random_problem(d, regime, with_h0, seed).rounded_to_f32();
        let want = reference::recurrent::forward(&p64.view()).unwrap();
        let p = p64.to_f32();
        let lp = scan::plan(&d, sms).unwrap();
        let label = format!("{d:?} {regime:?} h0={with_h0} seed={seed} {lp:?}");
        warps_seen.insert(lp.warps);
        tiles_seen.insert(lp.value_tile);
        chunks_seen.insert(lp.num_chunks.min(3));
        let got = scan_emulated(&emu, &format!("scan{i}"), &p, &lp, Dtype::F32);
        let mirror = scan_mirror::forward(&p.view(), &lp.scan_params()).unwrap();
        assert!(
            bits(&got.y) == bits(&mirror.y),
            "{label}: emulated y differs from the mirror {:?}",
            compare(&got.y, &mirror.y)
        );
        assert!(
            complex_bits(&got.h_final) == complex_bits(&mirror.h_final),
            "{label}: emulated h_final differs from the mirror {:?}",
            compare_complex(&got.h_final, &mirror.h_final)
        );
        check_reference(&mut worst, &label, "scan", &got, &want, (REL, ABS_FRAC));
    }
    assert_eq!(warps_seen.into_iter().collect::<Vec<_>>(), [1, 2, 4]);
    assert_eq!(tiles_seen.into_iter().collect::<Vec<_>>(), [1, 2, 4]);
    assert_eq!(chunks_seen.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    worst.report("scan forward kernels (emulated; bit-equal to cpu::scan)");
}

/// The f16 and bf16 instantiations of the scan forward's kernels
/// (`gateloop_scan_{reduce,forward}_{f16,bf16}_v{1,2,4}`): q, k, v rounded
/// to the type (the f64 reference and the f32 kernel see exactly those
/// values). Asserts y within `dtype_support::y_bounds` and h_final within
/// the f32 bounds of the reference, and — the kernels widen each load to
/// f32, compute in f32 and round y once at the store — y equal, element by
/// element and bit for bit, to the emulated f32 kernel's y on the same inputs
/// rounded to the type, and h_final (f32 for every type) equal to the f32
/// kernel's bit for bit. Both gate layouts, h0 present and absent, value
/// tiles 1, 2 and 4 each over 2 or 3 chunks (L not a multiple of the chunk)
/// and one single-chunk case, hard-decaying gates and phases ≫ 2π.
#[test]
fn scan_forward_kernels_emulated_half_types() {
    let Some(emu) = scan_emulator() else { return };
    let mut worst = Worst::default();
    // (dims, regime, h0, SM count of the plan), as in the f32 test.
    let cases = [
        (dims(1, 700, 1, 3, 1, false), GateRegime::Resets(0.05), true, 1),
        (dims(1, 1000, 1, 2, 2, true), GateRegime::HardDecay(0.5), false, 1),
        (dims(1, 600, 1, 2, 3, true), GateRegime::LargePhase(50.0), true, MIRROR_SM_COUNT),
        (dims(1, 300, 2, 3, 7, false), GateRegime::Mixed, false, MIRROR_SM_COUNT),
        (dims(1, 100, 1, 4, 5, true), GateRegime::UnitModulus, true, MIRROR_SM_COUNT),
    ];
    fn all_cases<T: Element>(emu: &Path, worst: &mut Worst, cases: &[(Dims, GateRegime, bool, usize)]) {
        let t = T::DTYPE;
        let mut seen = BTreeSet::new();
        for (i, &(d, regime, with_h0, sms)) in cases.iter().enumerate() {
            let seed = 5000 + 10 * i as u64 + t.abi() as u64;
            let p64 = dtype_support::rounded_to::<T>(&random_problem(d, regime, with_h0, seed));
            let want = reference::recurrent::forward(&p64.view()).unwrap();
            let p = p64.to_f32();
            let lp = scan::plan(&d, sms).unwrap();
            let label = format!("{t:?} {d:?} {regime:?} h0={with_h0} seed={seed} {lp:?}");
            seen.insert((lp.value_tile, lp.num_chunks.min(3)));
            let got = scan_emulated(emu, &format!("scan_{t:?}{i}"), &p, &lp, t);
            check_reference(worst, &label, &format!("scan {t:?}"), &got, &want, dtype_support::y_bounds(t));
            let f32_kernel = scan_emulated(emu, &format!("scan_{t:?}{i}_f32"), &p, &lp, Dtype::F32);
            dtype_support::assert_is_rounded_f32::<T>(&label, &got.y, &f32_kernel.y);
            assert!(
                complex_bits(&got.h_final) == complex_bits(&f32_kernel.h_final),
                "{label}: h_final differs from the f32 kernel's {:?}",
                compare_complex(&got.h_final, &f32_kernel.h_final)
            );
        }
        // Every entry point of the type ran: reduce and forward for T = 1, 2
        // and 4 (over several chunks), the forward alone (one chunk).
        let multi_chunk: BTreeSet<u32> = seen.iter().filter(|&&(_, nc)| nc > 1).map(|&(tile, _)| tile).collect();
        assert_eq!(multi_chunk.into_iter().collect::<Vec<_>>(), [1, 2, 4], "{t:?}: {seen:?}");
        assert!(seen.iter().any(|&(_, nc)| nc == 1) && seen.iter().any(|&(_, nc)| nc == 3), "{t:?}: {seen:?}");
    }
    all_cases::<half::f16>(&emu, &mut worst, &cases);
    all_cases::<half::bf16>(&emu, &mut worst, &cases);
    worst.report("scan forward kernels, half types (emulated; y = the f32 kernel's rounded, bit for bit)");
}

/// The recurrent kernel as forward_into: every gate regime, both gate
/// layouts, h0 present and absent, every rows-per-thread variant R ∈ {1, 2,
/// 4, 8, 16}, 1..9 key groups, one and several value tiles and staged time
/// chunks (L = 1, L not a multiple of the chunk, L ≈ 5000), B·H > 1; against
/// the f64 reference, and the f32 evaluation of the reference (the CPU path
/// of the recurrent mode) for the record. The ahead staging
/// (`RecurrentStaging::Ahead`, other chunk lengths) gives the batched
/// kernel's y and h_final bit for bit; four rows a thread
/// (`RecurrentRows::Four`: more key groups, shorter chunks) the same bounds,
/// and the same bits where it gives the same R.
#[test]
fn recurrent_kernel_emulated_matches_reference() {
    let Some(emu) = recurrent_emulator() else { return };
    let mut worst = Worst::default();
    // (B, L, H, K, V): the plans' (R, key groups) are noted in the label.
    let shapes = [
        (1, 1, 1, 1, 1),
        (2, 100, 2, 5, 7),
        (1, 130, 1, 16, 40),
        (1, 65, 1, 40, 33),
        (1, 200, 2, 3, 64),
        (1, 5000, 1, 8, 8),
        (1, 150, 1, 130, 5),
        (2, 64, 1, 64, 3),
        (1, 150, 3, 2, 1),
    ];
    let mut variants = BTreeSet::new();
    let mut rows_changed = 0;
    for (i, ((b, l, h, k, v), regime)) in shapes.into_iter().zip(ALL_REGIMES_AND_UNDERFLOW).enumerate() {
        for per_head in [false, true] {
            let with_h0 = (i + per_head as usize).is_multiple_of(2);
            let seed = 2000 + 2 * i as u64 + per_head as u64;
            let d = dims(b, l, h, k, v, per_head);
            let p64 = random_problem(d, regime, with_h0, seed).rounded_to_f32();
            let want = reference::recurrent::forward(&p64.view()).unwrap();
            let p = p64.to_f32();
            let lp = recurrent::plan(&d).unwrap();
            variants.insert(lp.rows_per_thread);
            let label = format!("{d:?} {regime:?} h0={with_h0} seed={seed} {lp:?}");
            let got = recurrent_emulated(&emu, &format!("rec{i}_{per_head}"), &p, Dtype::F32, None, Batched);
            check_reference(&mut worst, &label, "recurrent", &got, &want, (REL, ABS_FRAC));
            let f32_path = reference::recurrent::forward(&p.view()).unwrap();
            worst.check(&label, "recurrent y vs the f32 reference", &compare(&got.y, &f32_path.y), REL, ABS_FRAC);
            let ahead = recurrent_emulated(&emu, &format!("rec{i}_{per_head}_ahead"), &p, Dtype::F32, None, Ahead);
            assert_same_bits(&label, &ahead, &got);
            let four_plan = recurrent::plan_with(&d, Four).unwrap();
            variants.insert(four_plan.rows_per_thread);
            let four = recurrent_emulated(&emu, &format!("rec{i}_{per_head}_four"), &p, Dtype::F32, None, Four);
            let four_label = format!("{d:?} {regime:?} h0={with_h0} seed={seed} {four_plan:?}");
            check_reference(&mut worst, &four_label, "recurrent, four rows", &four, &want, (REL, ABS_FRAC));
            if four_plan.rows_per_thread == lp.rows_per_thread {
                assert_same_bits(&four_label, &four, &got);
            } else {
                rows_changed += 1;
            }
        }
    }
    // Most shapes take another R with four rows a thread (K = 130 and 256 do not).
    assert!(rows_changed >= 10, "{rows_changed}");
    assert_eq!(variants.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8, 16]);
    worst.report("recurrent kernel (emulated)");
}

/// The f16 and bf16 instantiations, one case each: q, k, v rounded to the
/// type (the reference sees exactly those values), y rounded once at the end;
/// the ahead staging bit for bit the batched one.
#[test]
fn recurrent_kernel_emulated_half_types() {
    let Some(emu) = recurrent_emulator() else { return };
    let mut worst = Worst::default();
    fn case<T: Element>(emu: &Path, worst: &mut Worst, seed: u64) {
        let d = dims(2, 90, 1, 12, 40, seed.is_multiple_of(2));
        let p64 = dtype_support::rounded_to::<T>(&random_problem(d, GateRegime::Mixed, true, seed));
        let want = reference::recurrent::forward(&p64.view()).unwrap();
        let label = format!("{d:?} {:?} seed={seed}", T::DTYPE);
        let got = recurrent_emulated(emu, &format!("half{seed}"), &p64.to_f32(), T::DTYPE, None, Batched);
        let ahead = recurrent_emulated(emu, &format!("half{seed}_ahead"), &p64.to_f32(), T::DTYPE, None, Ahead);
        assert_same_bits(&label, &ahead, &got);
        let four = recurrent_emulated(emu, &format!("half{seed}_four"), &p64.to_f32(), T::DTYPE, None, Four);
        check_reference(
            worst,
            &format!("{label} four rows"),
            &format!("recurrent {:?}", T::DTYPE),
            &four,
            &want,
            dtype_support::y_bounds(T::DTYPE),
        );
        check_reference(
            worst,
            &label,
            &format!("recurrent {:?}", T::DTYPE),
            &got,
            &want,
            dtype_support::y_bounds(T::DTYPE),
        );
    }
    case::<half::f16>(&emu, &mut worst, 3000);
    case::<half::bf16>(&emu, &mut worst, 3001);
    worst.report("recurrent kernel, half types (emulated)");
}

/// Decoding: the state advanced in place over pieces of T ≥ 1 steps (single
/// steps among longer pieces) equals one forward call with h0 = the initial
/// state bit for bit (y and state), and the f64 reference within the bounds;
/// every gate regime, both gate layouts, zero and random initial states.
#[test]
fn recurrent_decode_emulated_in_place_matches_one_call() {
    let Some(emu) = recurrent_emulator() else { return };
    let mut worst = Worst::default();
    let pieces: [&[usize]; 3] = [&[1, 1, 1, 1, 1, 1, 1, 1], &[1, 64, 20, 65], &[33, 1, 2, 100]];
    for (i, regime) in ALL_REGIMES_AND_UNDERFLOW.into_iter().enumerate() {
        let per_head = i % 2 == 1;
        let random_init = i % 3 != 2;
        let piece_lens = pieces[i % pieces.len()];
        let len: usize = piece_lens.iter().sum();
        let (b, h, k, v) = [(1, 2, 5, 7), (2, 1, 16, 33), (1, 1, 3, 2)][i % 3];
        let d = dims(b, len, h, k, v, per_head);
        let seed = 4000 + i as u64;
        let p64 = random_problem(d, regime, random_init, seed).rounded_to_f32();
        let want = reference::recurrent::forward(&p64.view()).unwrap();
        let p = p64.to_f32();
        let label = format!("{d:?} {regime:?} random init={random_init} pieces={piece_lens:?} seed={seed}");
        // The one long call: forward_into with h0 = the initial state (none:
        // zero, as the zero state buffer of the decode).
        let whole = recurrent_emulated(&emu, &format!("dec{i}_whole"), &p, Dtype::F32, None, Batched);
        let mut state = p.h0.clone().unwrap_or_else(|| vec![Complex::new(0.0, 0.0); d.state_len()]);
        let mut y = vec![f32::NAN; d.v_len()];
        let mut t0 = 0;
        for (j, &n) in piece_lens.iter().enumerate() {
            let piece = p.steps(t0, n);
            let out = recurrent_emulated(&emu, &format!("dec{i}_{j}"), &piece, Dtype::F32, Some(&state), Batched);
            dtype_support::put_window(&mut y, &d, d.value_dim, t0, n, &out.y);
            state = out.h_final;
            t0 += n;
        }
        let decoded = Outputs { y, h_final: state };
        assert_same_bits(&format!("{label}: decoded against one call"), &decoded, &whole);
        check_reference(&mut worst, &label, "decode", &decoded, &want, (REL, ABS_FRAC));
    }
    worst.report("recurrent decode (emulated)");
}

/// Racecheck without a GPU: the scan forward's launches (1, 2 and 4 warps
/// per block, value tiles 1 and 2, one to three chunks, f32 and bf16) and
/// the recurrent kernel (several key groups and staged time chunks, f32 and
/// f16, both stagings, forward and in-place decode) on the ThreadSanitizer builds of their
/// emulators (tests/kernel_emu/build.sh, `GATELOOP_EMU_SANITIZER=thread`):
/// two threads of a block touching one word with no barrier between them,
/// one writing, fail the run (exit 66) as compute-sanitizer's racecheck
/// would on a GPU. The results must also be right (the scan equal to the
/// mirror bit for bit, the recurrent kernel within the reference's bounds).
#[test]
fn scan_and_recurrent_kernels_race_free() {
    static SCAN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let scan_cases = [
        (dims(1, 700, 1, 3, 1, false), GateRegime::Resets(0.05), true, 1, Dtype::F32),
        (dims(1, 2100, 1, 2, 3, true), GateRegime::LargePhase(50.0), false, 1, Dtype::F32),
        (dims(2, 300, 2, 5, 7, true), GateRegime::Mixed, true, MIRROR_SM_COUNT, Dtype::F32),
        (dims(1, 600, 1, 2, 3, false), GateRegime::HardDecay(0.5), true, 1, Dtype::Bf16),
    ];
    if let Some(emu) = SCAN.get_or_init(|| race_checking_emulator("scan")).clone() {
        let mut warps = BTreeSet::new();
        for (i, (d, regime, with_h0, sms, t)) in scan_cases.into_iter().enumerate() {
            let p64 = random_problem(d, regime, with_h0, 1300 + i as u64);
            let p = if t == Dtype::Bf16 { dtype_support::rounded_to::<half::bf16>(&p64) } else { p64.rounded_to_f32() }
                .to_f32();
            let lp = scan::plan(&d, sms).unwrap();
            warps.insert(lp.warps);
            let label = format!("{d:?} {regime:?} {t:?} {lp:?} (race-checked)");
            let got = scan_emulated(&emu, &format!("scan_race{i}"), &p, &lp, t);
            let mirror = scan_mirror::forward(&p.view(), &lp.scan_params()).unwrap();
            assert!(
                complex_bits(&got.h_final) == complex_bits(&mirror.h_final),
                "{label}: h_final differs from the mirror"
            );
            if t == Dtype::F32 {
                assert!(bits(&got.y) == bits(&mirror.y), "{label}: y differs from the mirror");
            } else {
                dtype_support::assert_is_rounded_f32::<half::bf16>(&label, &got.y, &mirror.y);
            }
        }
        assert_eq!(warps.into_iter().collect::<Vec<_>>(), [1, 2, 4]);
    }
    let Some(emu) = RECURRENT_RACE_EMU.get_or_init(|| race_checking_emulator("recurrent")).clone() else { return };
    let mut worst = Worst::default();
    for (i, (d, t)) in [
        (dims(1, 130, 1, 16, 40, false), Dtype::F32),
        (dims(1, 150, 1, 130, 5, true), Dtype::F32),
        (dims(2, 90, 1, 12, 40, false), Dtype::F16),
    ]
    .into_iter()
    .enumerate()
    {
        let p64 = random_problem(d, GateRegime::Mixed, true, 1400 + i as u64);
        let p64 = if t == Dtype::F16 { dtype_support::rounded_to::<half::f16>(&p64) } else { p64.rounded_to_f32() };
        let want = reference::recurrent::forward(&p64.view()).unwrap();
        let configs: [RecurrentConfig; 4] =
            [Batched.into(), Ahead.into(), Four.into(), RecurrentConfig { staging: Ahead, rows: Four }];
        for config in configs {
            let label = format!("{d:?} {t:?} {:?} (race-checked)", recurrent::plan_with(&d, config).unwrap());
            let tag = format!("rec_race{i}_{}_{}", config.staging.name(), config.rows.name());
            let got = recurrent_emulated(&emu, &tag, &p64.to_f32(), t, None, config);
            check_reference(&mut worst, &label, "recurrent", &got, &want, dtype_support::y_bounds(t));
        }
    }
    // Decode: the state read and overwritten in place by the same block.
    let d = dims(1, 70, 2, 16, 33, false);
    let p64 = random_problem(d, GateRegime::Resets(0.05), true, 1410).rounded_to_f32();
    let want = reference::recurrent::forward(&p64.view()).unwrap();
    let mut p = p64.to_f32();
    let h0 = p.h0.take().unwrap();
    let got = recurrent_emulated(&emu, "dec_race", &p, Dtype::F32, Some(&h0), Batched);
    check_reference(&mut worst, &format!("{d:?} decode (race-checked)"), "decode", &got, &want, (REL, ABS_FRAC));
    worst.report("race-checked recurrent kernel");
}
