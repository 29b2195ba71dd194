//! The fused-scan backward's CPU mirror (`cpu::scan_grad`, the algorithm of
//! `cuda/scan_grad.cu`) against the f64 reference backward
//! (`reference::grad::backward`) on the same f32-rounded inputs and upstream
//! gradients: every gradient (dq, dk, dv, dlog_gate, dh0) within relative L2
//! ≤ 1e-4 and max-abs ≤ 1e-3·max|ref|, with the kernel's geometry for each
//! shape (`cuda::scan_grad::plan`) and with other geometries. Run with
//! `--nocapture` to see the worst errors measured per gradient.

mod common;
mod emu_support;

use gateloop::cpu::scan::ScanParams;
use gateloop::cpu::scan_grad::{self, ScanGradParams};
use gateloop::cuda::scan_grad::{GradLaunchPlan, plan};
use gateloop::dispatch::{MIRROR_SM_COUNT, cpu_grad_f32};
use gateloop::reference::grad::{GradInputs, Grads};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError, Mode};

use common::grad::{GradCase, Worst, compare_grads};
use common::{ABS_FRAC, REL, flat, unflat};
use emu_support::read_f32_file as read_f32;

/// The geometry the kernel runs for `d` (on the mirrored GPU).
fn kernel_params(d: &Dims) -> ScanGradParams {
    plan(d, MIRROR_SM_COUNT).unwrap().grad_params()
}

fn check(worst: &mut Worst, c: GradCase, params: ScanGradParams, rel: f64) {
    let inp = c.inputs();
    let ours = scan_grad::backward(&inp.p.view(), &inp.dy, inp.dh_final.as_deref(), &params).unwrap();
    assert_eq!(ours.dh0.is_some(), c.with_h0, "{c:?}: dh0 present iff h0");
    worst.check(&format!("{c:?} {params:?}"), &compare_grads(&ours, &inp.reference()), rel);
}

fn check_kernel(worst: &mut Worst, c: GradCase) {
    check(worst, c, kernel_params(&c.dims), REL)
}

/// L around one warp's and one chunk's steps (256 with one warp), and many
/// chunks; both gate layouts; every h0 / dh_final combination.
#[test]
fn lengths_around_chunk_boundaries() {
    let mut worst = Worst::default();
    let mut seed = 0;
    for len in [1usize, 2, 63, 64, 65, 255, 256, 257, 1000, 4096] {
        for per_head in [false, true] {
            for (with_h0, with_dhf) in [(false, false), (true, true), (true, false), (false, true)] {
                seed += 1;
                let (b, h, k, v) = match len {
                    4096 => (1, 1, 16, 5),
                    1000 => (1, 2, 5, 16),
                    _ => (2, 2, 5, 5),
                };
                if len >= 1000 && seed % 2 == 1 {
                    continue;
                }
                let regime = common::ALL_REGIMES_AND_UNDERFLOW[seed as usize % common::ALL_REGIMES_AND_UNDERFLOW.len()];
                check_kernel(
                    &mut worst,
                    GradCase::new(dims(b, len, h, k, v, per_head), regime, with_h0, with_dhf, seed),
                );
            }
        }
    }
    worst.report("lengths");
}

#[test]
fn key_and_value_dims() {
    let mut worst = Worst::default();
    let mut seed = 100;
    for kd in [1usize, 5, 16, 64] {
        for vd in [1usize, 5, 16, 64] {
            seed += 1;
            let per_head = seed % 2 == 0;
            let len = if kd * vd >= 1024 { 300 } else { 600 };
            let c =
                GradCase::new(dims(1, len, 1, kd, vd, per_head), GateRegime::Mixed, seed % 3 == 0, seed % 4 != 0, seed);
            check_kernel(&mut worst, c);
        }
    }
    worst.report("dims");
}

#[test]
fn every_gate_regime_both_layouts() {
    let mut worst = Worst::default();
    let mut seed = 200;
    for regime in common::ALL_REGIMES_AND_UNDERFLOW {
        for per_head in [false, true] {
            for (with_h0, with_dhf) in [(false, true), (true, false), (true, true), (false, false)] {
                seed += 1;
                check_kernel(
                    &mut worst,
                    GradCase::new(dims(2, 561, 2, 7, 6, per_head), regime, with_h0, with_dhf, seed),
                );
            }
        }
    }
    worst.report("regimes");
}

/// Long sequences (16 chunks) in every regime, the largest K and V once.
#[test]
fn long_sequences_every_regime() {
    let mut worst = Worst::default();
    let mut seed = 250;
    for (i, regime) in common::ALL_REGIMES_AND_UNDERFLOW.into_iter().enumerate() {
        seed += 1;
        let (k, v) = if i == 0 { (64, 64) } else { (16, 16) };
        let c = GradCase::new(dims(1, 4096, 1, k, v, i % 2 == 1), regime, i % 3 != 0, i % 4 != 1, seed);
        check_kernel(&mut worst, c);
    }
    worst.report("long sequences");
}

/// Geometries the plan picks for bigger problems (2 and 4 warps: the warp
/// prefixes of the block scans in both directions) and ones no kernel runs
/// (any steps per thread, 3 warps, wider value tiles): the algorithm is
/// exact for every geometry.
#[test]
fn other_geometries() {
    let mut worst = Worst::default();
    let mut seed = 400;
    for (steps_per_thread, warps, value_tile) in [(8, 2, 2), (8, 4, 2), (8, 4, 1), (3, 3, 3), (1, 1, 4), (5, 2, 16)] {
        let params = ScanGradParams { scan: ScanParams { steps_per_thread, warps }, value_tile };
        for regime in [GateRegime::Mixed, GateRegime::LargePhase(50.0), GateRegime::Resets(0.05)] {
            for per_head in [false, true] {
                seed += 1;
                let c = GradCase::new(dims(1, 2100, 2, 5, 9, per_head), regime, seed % 2 == 0, seed % 3 != 0, seed);
                check(&mut worst, c, params, REL);
            }
        }
    }
    worst.report("geometries");
}

#[test]
fn batch_times_heads() {
    let mut worst = Worst::default();
    let mut seed = 300;
    for (b, h) in [(1, 1), (1, 2), (3, 1), (2, 2), (1, 5), (2, 3)] {
        for regime in [GateRegime::Resets(0.05), GateRegime::UnitModulus] {
            seed += 1;
            check_kernel(
                &mut worst,
                GradCase::new(dims(b, 297, h, 9, 11, seed % 2 == 0), regime, seed % 3 != 0, true, seed),
            );
        }
    }
    worst.report("batch x heads");
}

/// One long sequence with nothing decaying: |a| = 1 for 65536 steps.
#[test]
fn long_unit_modulus_sequence() {
    let mut worst = Worst::default();
    for (seed, per_head) in [(500, false), (501, true)] {
        let c = GradCase::new(dims(1, 65536, 1, 4, 4, per_head), GateRegime::UnitModulus, true, true, seed);
        check(&mut worst, c, kernel_params(&c.dims), 1e-3);
    }
    worst.report("L = 65536");
}

/// The dispatch table's f32 scan gradient is this mirror with the kernel's
/// geometry, and the mirror is deterministic.
#[test]
fn dispatch_runs_the_mirror_deterministically() {
    let c = GradCase::new(dims(2, 700, 2, 3, 5, false), GateRegime::Mixed, true, true, 550);
    let inp = c.inputs();
    let ours = scan_grad::backward(&inp.p.view(), &inp.dy, inp.dh_final.as_deref(), &kernel_params(&c.dims)).unwrap();
    let again = cpu_grad_f32(Mode::Scan, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
    assert_eq!(ours, again);
}

/// The caller-buffer entry point overwrites every element, and a `dh0`
/// buffer without h0 receives the gradient of the implicit zero state.
#[test]
fn into_buffers_and_dh0_without_h0() {
    let c = GradCase::new(dims(2, 600, 2, 6, 5, false), GateRegime::Mixed, false, true, 600);
    let inp = c.inputs();
    let d = c.dims;
    let g = GradInputs::new(&d, &inp.dy, inp.dh_final.as_deref()).unwrap();
    let mut ours = Grads::<f32>::zeros(&d, true);
    ours.dq.fill(f32::NAN);
    ours.dk.fill(f32::NAN);
    ours.dv.fill(f32::NAN);
    ours.dlog_gate.fill(Complex::new(f32::NAN, f32::NAN));
    ours.dh0.as_mut().unwrap().fill(Complex::new(f32::NAN, f32::NAN));
    scan_grad::backward_into(&inp.p.view(), &g, &kernel_params(&d), ours.as_mut()).unwrap();
    let p64 = inp.p.map(|x| x as f64);
    let dy64: Vec<f64> = inp.dy.iter().map(|&x| x as f64).collect();
    let dhf64: Vec<Complex<f64>> =
        inp.dh_final.as_ref().unwrap().iter().map(|z| Complex::new(z.re as f64, z.im as f64)).collect();
    let mut want = Grads::<f64>::zeros(&d, true);
    let g64 = GradInputs::new(&d, &dy64, Some(&dhf64)).unwrap();
    gateloop::reference::grad::backward_into(&p64.view(), &g64, want.as_mut()).unwrap();
    for (name, e) in compare_grads(&ours, &want) {
        assert!(e.within(REL, ABS_FRAC), "{name}: {e:?}");
    }
}

/// Reset steps get a gradient of exactly 0, and nothing is NaN.
#[test]
fn reset_gates_have_zero_gradient() {
    let d = dims(1, 700, 1, 3, 2, false);
    let p = random_problem(d, GateRegime::Resets(0.3), true, 700).to_f32();
    let dy: Vec<f32> = random_problem(d, GateRegime::Random, false, 701).v.iter().map(|&x| x as f32).collect();
    let g = scan_grad::backward(&p.view(), &dy, None, &kernel_params(&d)).unwrap();
    let resets = common::grad::assert_resets_have_zero_gradient(&p.log_gate, &g.dlog_gate);
    assert!(resets > 100);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let d = dims(1, 20, 1, 3, 2, false);
    let mut p = random_problem(d, GateRegime::Random, true, 800).to_f32();
    let dy = vec![0.5f32; d.v_len()];
    let params = kernel_params(&d);
    let bad_params = ScanGradParams { value_tile: 0, ..params };
    assert!(matches!(
        scan_grad::backward(&p.view(), &dy, None, &bad_params),
        Err(InputError::Param { name: "value_tile", .. })
    ));
    assert!(matches!(
        scan_grad::backward(&p.view(), &dy[1..], None, &params),
        Err(InputError::Length { name: "dy", .. })
    ));
    let short_dh = vec![Complex::new(0.0f32, 0.0); d.state_len() - 1];
    assert!(matches!(
        scan_grad::backward(&p.view(), &dy, Some(&short_dh), &params),
        Err(InputError::Length { name: "dh_final", .. })
    ));
    let mut g = Grads::<f32>::zeros(&d, false);
    g.dk.pop();
    let up = GradInputs::new(&d, &dy, None).unwrap();
    assert!(matches!(
        scan_grad::backward_into(&p.view(), &up, &params, g.as_mut()),
        Err(InputError::Length { name: "dk", .. })
    ));
    p.log_gate[5].re = 0.25;
    assert!(matches!(
        scan_grad::backward(&p.view(), &dy, None, &params),
        Err(InputError::Value { name: "log_gate", index: 5, .. })
    ));
}

// ---- the kernels themselves, on a CPU emulation of CUDA -------------------

/// The emulator binary: `GATELOOP_SCAN_GRAD_EMU`, or built here with
/// `tests/kernel_emu/build.sh scan` when g++ is available; `None` (with a notice)
/// otherwise.
fn emulator() -> Option<std::path::PathBuf> {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    EMU.get_or_init(|| emu_support::kernel_emulator("scan", "GATELOOP_SCAN_GRAD_EMU")).clone()
}

/// Runs the backward's five kernels (`cuda/scan.cu`, `cuda/scan_grad.cu`,
/// launched as `cuda::scan_grad::backward_into` does with the plan `lp`,
/// outputs and workspace NaN-poisoned) on the emulator.
fn run_emulated(
    emu: &std::path::Path,
    c: &GradCase,
    lp: &GradLaunchPlan,
    inp: &common::grad::GradInputsF32,
) -> Grads<f32> {
    let p = &inp.p;
    let extra =
        [inp.dh_final.is_some() as u32, lp.forward.warps, lp.forward.value_tile, lp.value_tile].map(|x| x.to_string());
    let dh_final = inp.dh_final.as_deref().map(flat);
    let mut files: Vec<(&str, &[f32])> = vec![("dy.bin", &inp.dy)];
    if let Some(dhf) = &dh_final {
        files.push(("dh_final.bin", dhf));
    }
    let dir = emu_support::write_case(&format!("scan_grad_{}", c.seed), p, &extra, false, &files);
    let status = std::process::Command::new(emu).arg(&dir).status().unwrap();
    assert!(status.success(), "{c:?}: emulator failed: {status}");
    let out = Grads {
        dq: read_f32(&dir.join("dq.out")),
        dk: read_f32(&dir.join("dk.out")),
        dv: read_f32(&dir.join("dv.out")),
        dlog_gate: unflat(&read_f32(&dir.join("dlog_gate.out"))),
        dh0: p.h0.as_ref().map(|_| unflat(&read_f32(&dir.join("dh0.out")))),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

/// The CUDA kernels' own code, compiled for the CPU with every thread of a
/// block an OS thread (barriers and warp shuffles emulated,
/// `tests/kernel_emu`), agrees with the CPU mirror bit for bit (same
/// arithmetic in the same order, same libm; NaN-poisoned outputs would show
/// any element no kernel writes) and with the f64 reference:
/// proves the kernels' indexing, shuffles, barriers and launch sequence
/// without a GPU. Multi-chunk and single-chunk cases, both value tiles, 1, 2
/// and 4 warps, both gate layouts, with and without h0 and dh_final.
#[test]
fn kernel_emulation_matches_the_mirror() {
    let Some(emu) = emulator() else { return };
    let mut worst = Worst::default();
    // (case, SM count of the plan): few SMs make the plan pick 2 and 4 warps
    // per block for small problems.
    let cases = [
        (GradCase::new(dims(1, 3001, 1, 5, 7, false), GateRegime::Mixed, true, true, 900), MIRROR_SM_COUNT),
        (GradCase::new(dims(1, 200, 2, 3, 9, true), GateRegime::Random, false, true, 901), MIRROR_SM_COUNT),
        (GradCase::new(dims(2, 1100, 1, 2, 1, true), GateRegime::Resets(0.05), true, false, 902), MIRROR_SM_COUNT),
        (GradCase::new(dims(1, 1, 1, 3, 2, false), GateRegime::UnitModulus, true, true, 903), MIRROR_SM_COUNT),
        (GradCase::new(dims(1, 600, 1, 3, 4, false), GateRegime::Underflow, false, false, 904), MIRROR_SM_COUNT),
        (GradCase::new(dims(1, 300, 1, 16, 16, true), GateRegime::StrongDecay(40.0), true, true, 905), MIRROR_SM_COUNT),
        (GradCase::new(dims(1, 600, 1, 2, 3, false), GateRegime::LargePhase(50.0), true, true, 906), 1),
        (GradCase::new(dims(1, 2100, 1, 2, 5, true), GateRegime::Mixed, true, true, 907), 1),
        (GradCase::new(dims(1, 2100, 1, 3, 1, false), GateRegime::Resets(0.05), false, true, 908), 1),
    ];
    emulated_equal_mirror(&emu, &cases, |c, inp, got| {
        worst.check(&format!("{c:?} (emulated kernels)"), &compare_grads(got, &inp.reference()), REL)
    });
    worst.report("emulated kernels");
}

/// Runs each (case, SM count of the plan) on emulator `emu`, requires every
/// gradient to equal the CPU mirror's bit for bit and the cases to have
/// taken 1, 2 and 4 warps per block; hands each case's gradients to `more`.
fn emulated_equal_mirror(
    emu: &std::path::Path,
    cases: &[(GradCase, usize)],
    mut more: impl FnMut(&GradCase, &common::grad::GradInputsF32, &Grads<f32>),
) {
    let mut warps_seen = std::collections::BTreeSet::new();
    for (c, sms) in cases {
        let inp = c.inputs();
        let lp = plan(&c.dims, *sms).unwrap();
        let params = lp.grad_params();
        warps_seen.insert(params.scan.warps);
        let got = run_emulated(emu, c, &lp, &inp);
        let mirror = scan_grad::backward(&inp.p.view(), &inp.dy, inp.dh_final.as_deref(), &params).unwrap();
        for (name, e) in compare_grads(&got, &mirror) {
            assert_eq!(e.max_abs, 0.0, "{c:?} {params:?}: {name} emulated kernels vs mirror {e:?}");
        }
        more(c, &inp, &got);
    }
    assert_eq!(warps_seen.into_iter().collect::<Vec<_>>(), [1, 2, 4]);
}

/// Racecheck without a GPU: the backward's five launches with 1, 2 and 4
/// warps per block, several chunks, with and without h0 and dh_final, on the
/// ThreadSanitizer build of the emulator (tests/kernel_emu/build.sh,
/// `GATELOOP_EMU_SANITIZER=thread`): two threads of a block touching one
/// word with no barrier between them, one writing, fail the run (exit 66)
/// as compute-sanitizer's racecheck would on a GPU. The gradients must
/// still equal the mirror's bit for bit.
#[test]
fn kernel_emulation_is_race_free() {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(emu) = EMU.get_or_init(|| emu_support::race_checking_emulator("scan")).clone() else { return };
    let cases = [
        (GradCase::new(dims(1, 600, 1, 3, 4, true), GateRegime::Resets(0.05), true, true, 910), 1),
        (GradCase::new(dims(1, 2100, 1, 2, 5, false), GateRegime::Mixed, false, true, 911), 1),
        (GradCase::new(dims(2, 300, 2, 5, 7, true), GateRegime::LargePhase(50.0), true, false, 912), MIRROR_SM_COUNT),
    ];
    emulated_equal_mirror(&emu, &cases, |_, _, _| {});
}
