//! The chunked forward's CUDA kernels (`cuda/chunk.cu`: state, carry,
//! output) and the backward's (`cuda/chunk_grad.cu`: grad_w, adjoint carry,
//! grad_qk, grad_dv), compiled unchanged for the CPU by
//! `tests/kernel_emu/build.sh chunk` (every thread of a block an OS thread,
//! WMMA fragments emulated in f32, dynamic shared memory; outputs, workspace
//! and shared memory NaN-poisoned) and launched as `cuda::chunk` /
//! `cuda::chunk_grad` launch them, against the f64 reference (the GPU bounds
//! of tests/gpu_chunked.rs, the f32 gradient bounds) and the CPU mirrors
//! `cpu::chunked` / `cpu::chunked_grad`; the f16 and bf16 entry points on
//! inputs rounded to the type, with the GPU tests' bounds. Proves the
//! kernels' indexing, tile maps, barriers, shared-memory carving and launch
//! sequences without a GPU, and their arithmetic up to the order of the
//! tensor cores' accumulation; not the SFU's __sincosf or the memory model
//! (see tests/kernel_emu/README.md). Skips (with a notice) without g++. Run
//! with `--nocapture` for the measured differences.

mod common;
mod dtype_support;
mod emu_support;

use gateloop::cpu::chunked::{self, ChunkParams};
use gateloop::cuda::chunk::{self, ChunkCarry, ChunkConfig, ChunkOutput, ChunkPrecision};
use gateloop::cuda::chunk_grad;
use gateloop::cuda::{Dtype, Element};
use gateloop::testing::{GateRegime, OwnedProblem, dims};
use gateloop::{Complex, Dims, ErrorStats, Outputs, compare, compare_complex};

use common::grad::{GradCase, GradInputsF32, Worst as GradWorst, compare_grads};
use common::{Case, REL, flat, unflat};
use dtype_support::{ABS_FRAC_F32, REL_F32, chunk_bounds, rounded_to, y_bounds};
use emu_support::{read_f32_file, write_f32_file};
use gateloop::reference::grad::Grads;

/// Complex gates, or real gates (Im log_gate = Im h0 = 0, the kernels' `r`
/// instantiation with real log_gate / h0 / h_final).
#[derive(Clone, Copy, Debug, PartialEq)]
enum GateKind {
    Complex,
    Real,
}

/// A fresh case directory holding dims.txt and the inputs of `p` in the
/// driver's format (tests/kernel_emu/chunk_driver.cpp), for the entry points
/// of element type `t` (q, k, v representable in `t`).
fn write_inputs(
    tag: &str,
    p: &OwnedProblem<f32>,
    gates: GateKind,
    precision: ChunkPrecision,
    t: Dtype,
) -> std::path::PathBuf {
    let complex = gates == GateKind::Complex;
    let extra = [complex as u32, (precision == ChunkPrecision::Exact) as u32, t.abi()].map(|x| x.to_string());
    // Complex: interleaved (re, im); real: the real parts (Im is 0 there).
    let dir = emu_support::write_case(&format!("chunk_{tag}"), p, &extra, !complex, &[]);
    // The host launchers' shared bytes for `t`: the driver launches with them
    // and checks them against the kernels' layout.
    let chunk_gates = if complex { chunk::Gates::Complex } else { chunk::Gates::Real };
    let (state, output) = chunk::shared_bytes(t, chunk_gates);
    let (w, qk, dv) = chunk_grad::shared_bytes(t, chunk_gates);
    // The forward walk's at the case's precision; the backward's grad_w_seq's
    // (three terms) Exact's.
    let seq = chunk::sequential_shared_bytes(t, chunk_gates, precision);
    let w_seq = chunk::sequential_shared_bytes(t, chunk_gates, ChunkPrecision::Exact);
    let frag = chunk::fragment_output_shared_bytes(t, chunk_gates).unwrap_or(0);
    std::fs::write(dir.join("shared.txt"), format!("{state} {output} {w} {qk} {dv} {seq} {frag} {w_seq}")).unwrap();
    dir
}

/// Runs the emulator on `dir` (with `args` before it).
///
/// With `GATELOOP_CHUNK_EMU_BASELINE` set to another build of the chunk
/// emulator (`scripts/same-bits.sh` builds one from an earlier commit's
/// kernels and driver), that build runs too, on a copy of the inputs, and
/// every output file of the two must be equal byte for byte: a kernel
/// change meant to keep every value (a schedule, a staging, a layout, a
/// refactor) checked on every case of this file. The copy leaves out
/// `shared.txt` (this tree's launchers' shared bytes), so that the
/// baseline's launches take its own layouts' sums. Not for the
/// ThreadSanitizer build (the race check).
fn run(emu: &std::path::Path, args: &[&str], dir: &std::path::Path) {
    let baseline = std::env::var_os("GATELOOP_CHUNK_EMU_BASELINE")
        .map(std::path::PathBuf::from)
        .filter(|_| !emu.file_name().is_some_and(|n| n.to_string_lossy().contains("_thread_emu")));
    let copy = baseline.as_ref().map(|_| {
        let copy = dir.with_extension("baseline");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "shared.txt" {
                std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
            }
        }
        copy
    });
    let status = std::process::Command::new(emu).args(args).arg(dir).status().unwrap();
    assert!(status.success(), "{dir:?}: emulator failed: {status}");
    let (Some(baseline), Some(copy)) = (baseline, copy) else { return };
    let status = std::process::Command::new(&baseline).args(args).arg(&copy).status().unwrap();
    assert!(status.success(), "{copy:?}: the baseline emulator {baseline:?} failed: {status}");
    let mut compared = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        if !name.to_string_lossy().ends_with(".out") {
            continue;
        }
        let ours = std::fs::read(dir.join(&name)).unwrap();
        let theirs = std::fs::read(copy.join(&name)).unwrap();
        assert!(ours == theirs, "{dir:?} {name:?}: differs from the baseline emulator's {baseline:?}");
        compared += 1;
    }
    assert!(compared > 0, "{dir:?}: no outputs to compare with the baseline");
    eprintln!("same bits as the baseline: {dir:?} ({compared} outputs)");
    // (Kept where an assertion above failed, to look at.)
    std::fs::remove_dir_all(&copy).unwrap();
}

/// Runs the forward's launches of element type `t` on the emulator: the
/// three of `ChunkCarry::Separate` (state, carry, output) or the two of
/// `Sequential` (state_seq, output); (y widened to f32, h_final).
fn run_forward(
    emu: &std::path::Path,
    tag: usize,
    p: &OwnedProblem<f32>,
    gates: GateKind,
    precision: ChunkPrecision,
    t: Dtype,
    carry: ChunkCarry,
) -> Outputs<f32> {
    run_forward_with(emu, tag, p, gates, precision, t, ChunkConfig { carry, ..ChunkConfig::default() })
}

/// [`run_forward`] with the output kernel of `config` too
/// (`ChunkOutput::Fragments`: the driver's `--fragments`).
fn run_forward_with(
    emu: &std::path::Path,
    tag: usize,
    p: &OwnedProblem<f32>,
    gates: GateKind,
    precision: ChunkPrecision,
    t: Dtype,
    config: ChunkConfig,
) -> Outputs<f32> {
    let (carry, output) = (config.carry, config.output);
    let dir = write_inputs(&format!("fwd{tag}_{}_{}", carry.name(), output.name()), p, gates, precision, t);
    let mut args = Vec::new();
    if output == ChunkOutput::Fragments {
        args.push("--fragments");
    }
    if carry == ChunkCarry::Sequential {
        args.push("--sequential");
    }
    run(emu, &args, &dir);
    let hf = read_f32_file(&dir.join("h_final.out"));
    let h_final =
        if gates == GateKind::Complex { unflat(&hf) } else { hf.iter().map(|&x| Complex::new(x, 0.0)).collect() };
    let y = read_f32_file(&dir.join("y.out"));
    std::fs::remove_dir_all(&dir).unwrap();
    Outputs { y, h_final }
}

/// Runs the backward's launches of element type `t` (forward precision
/// Exact) on the emulator, the forward part with `carry` (`Sequential`:
/// state_seq instead of the state and carry launches); dq, dk, dv widened to f32.
fn run_backward(emu: &std::path::Path, tag: usize, inp: &GradInputsF32, t: Dtype, carry: ChunkCarry) -> Grads<f32> {
    run_backward_gates(emu, tag, inp, t, carry, GateKind::Complex)
}

/// [`run_backward`] with complex or real `gates` (real: the `r` kernels on
/// the real parts of log_gate, h0 and dh_final, which must be real; dlog_gate
/// and dh0 come back with Im = 0).
fn run_backward_gates(
    emu: &std::path::Path,
    tag: usize,
    inp: &GradInputsF32,
    t: Dtype,
    carry: ChunkCarry,
    gates: GateKind,
) -> Grads<f32> {
    let dir = write_inputs(&format!("bwd{tag}_{}_{gates:?}", carry.name()), &inp.p, gates, ChunkPrecision::Exact, t);
    write_f32_file(&dir.join("dy.bin"), &inp.dy);
    let real = gates == GateKind::Real;
    if let Some(dhf) = &inp.dh_final {
        let file = if real { dhf.iter().map(|z| z.re).collect() } else { flat(dhf) };
        write_f32_file(&dir.join("dh_final.bin"), &file);
    }
    run(emu, if carry == ChunkCarry::Sequential { &["--backward", "--sequential"] } else { &["--backward"] }, &dir);
    let complex = |x: Vec<f32>| if real { x.into_iter().map(|re| Complex::new(re, 0.0)).collect() } else { unflat(&x) };
    let out = Grads {
        dq: read_f32_file(&dir.join("dq.out")),
        dk: read_f32_file(&dir.join("dk.out")),
        dv: read_f32_file(&dir.join("dv.out")),
        dlog_gate: complex(read_f32_file(&dir.join("dlog_gate.out"))),
        dh0: inp.p.h0.as_ref().map(|_| complex(read_f32_file(&dir.join("dh0.out")))),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

/// The emulator, built once per test binary (both tests share it).
fn emulator() -> Option<std::path::PathBuf> {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    EMU.get_or_init(|| emu_support::kernel_emulator("chunk", "GATELOOP_CHUNK_EMU")).clone()
}

/// The problem of `case` with `gates` (real: Im log_gate = Im h0 = 0), its
/// q, k, v rounded to `t`.
fn problem_for(case: &Case, gates: GateKind, t: Dtype) -> OwnedProblem<f64> {
    let mut p64 = case.problem();
    if gates == GateKind::Real {
        p64 = common::real_gates(p64);
    }
    match t {
        Dtype::Bf16 => rounded_to::<half::bf16>(&p64),
        Dtype::F16 => rounded_to::<half::f16>(&p64),
        Dtype::F32 => p64.rounded_to_f32(),
    }
}

/// The largest errors seen, per (precision, output, against what).
#[derive(Default)]
struct Worst(std::collections::BTreeMap<String, ErrorStats>);
impl Worst {
    fn note(&mut self, key: String, e: ErrorStats) {
        let frac = |e: &ErrorStats| e.max_abs / e.max_ref.max(f64::MIN_POSITIVE);
        let w = self.0.entry(key).or_insert(e);
        if e.rel_l2 > w.rel_l2 || frac(&e) > frac(w) {
            *w = e;
        }
    }
}

#[test]
fn chunk_kernels_emulated_match_reference_and_mirror() {
    let Some(emu) = emulator() else { return };
    use ChunkPrecision::{Exact, Fast};
    use GateKind::{Complex as C, Real as R};
    // (dims, regime, h0, gates, precision): L ∈ {1, 64, 150 (a partial
    // chunk)}, K ∈ {5, 40 (three slabs)}, V ∈ {7, 70 (two value tiles)},
    // both gate layouts, every adversarial regime.
    let cases: [(Dims, GateRegime, bool, GateKind, ChunkPrecision); 10] = [
        (dims(1, 150, 1, 5, 70, false), GateRegime::Mixed, true, C, Exact),
        (dims(1, 150, 1, 40, 7, true), GateRegime::Resets(0.05), true, C, Exact),
        (dims(1, 64, 2, 5, 7, false), GateRegime::UnitModulus, false, C, Exact),
        (dims(1, 1, 1, 40, 70, false), GateRegime::LargePhase(50.0), true, C, Exact),
        (dims(1, 150, 1, 40, 7, false), GateRegime::LargePhase(50.0), true, C, Exact),
        (dims(2, 150, 1, 5, 7, true), GateRegime::StrongDecay(40.0), true, C, Exact),
        (dims(1, 150, 1, 5, 7, false), GateRegime::Underflow, false, C, Exact),
        (dims(1, 150, 1, 40, 70, false), GateRegime::Random, true, C, Fast),
        (dims(1, 150, 1, 40, 7, false), GateRegime::Resets(0.05), true, R, Exact),
        (dims(1, 150, 1, 5, 70, true), GateRegime::Mixed, true, R, Fast),
    ];
    let mut worst = Worst::default();
    for (i, (d, regime, with_h0, gates, precision)) in cases.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7000 + i as u64);
        let label = format!("{} {gates:?} {precision:?}", case.label());
        let mut p64 = case.problem();
        if gates == GateKind::Real {
            p64 = common::real_gates(p64);
        }
        let p64 = p64.rounded_to_f32();
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let p = p64.to_f32();
        let got = run_forward(&emu, i, &p, gates, precision, Dtype::F32, ChunkCarry::Separate);
        let mirror = chunked::forward(&p.view(), &ChunkParams::default()).unwrap();
        let ((yr, ya), (hr, ha)) = chunk_bounds(Dtype::F32, precision);
        let ey = compare(&got.y, &want.y);
        let eh = compare_complex(&got.h_final, &want.h_final);
        common::assert_within(&label, "y (emulated kernels vs reference)", &ey, yr, ya);
        common::assert_within(&label, "h_final (emulated kernels vs reference)", &eh, hr, ha);
        let my = compare(&got.y, &mirror.y);
        let mh = compare_complex(&got.h_final, &mirror.h_final);
        // The mirror is Exact-class f32 (rel ≤ 1e-4 of the reference), so
        // kernel vs mirror is bounded by the kernel's bound plus the mirror's.
        common::assert_within(&label, "y (emulated kernels vs mirror)", &my, yr + 1e-4, ya + 1e-3);
        common::assert_within(&label, "h_final (emulated kernels vs mirror)", &mh, hr + 1e-4, ha + 1e-3);
        eprintln!("{label}: vs reference y {ey:?} h_final {eh:?}; vs mirror y {my:?} h_final {mh:?}");
        let p = precision.name();
        worst.note(format!("{p} y vs reference"), ey);
        worst.note(format!("{p} h_final vs reference"), eh);
        worst.note(format!("{p} y vs mirror"), my);
        worst.note(format!("{p} h_final vs mirror"), mh);
    }
    for (k, e) in &worst.0 {
        eprintln!("worst {k}: {e:?}");
    }
}

/// `ChunkCarry::Sequential` (one launch walking the chunks per (b, h, value
/// tile, key slab)) writes what the state and carry launches write, bit for
/// bit: y and h_final equal to the last bit, over complex and real gates,
/// Exact and Fast, f32 and bf16, with and without h0, both gate layouts,
/// L ∈ {1, 130, 200, 1100} (partial chunks; 18 chunks: more than the
/// separate carry's kCarryAhead = 8 chunks in flight), K ∈ {5, 40, 72}
/// (partial slabs; the real-gate walk's blocks of 32 channels: one, two,
/// three with a last of 8), V ∈ {7, 64, 70} (two value tiles; 64: the
/// 16-bit tile's 16-byte groups where aligned), B·H = 2,
/// resets, hard decay and phases ≫ 2π.
#[test]
fn sequential_carry_is_bitwise_the_separate_carry() {
    let Some(emu) = emulator() else { return };
    use ChunkPrecision::{Exact, Fast};
    use GateKind::{Complex as C, Real as R};
    let cases: [(Dims, GateRegime, bool, GateKind, ChunkPrecision, Dtype); 17] = [
        (dims(1, 200, 2, 40, 70, false), GateRegime::Mixed, true, C, Exact, Dtype::F32),
        (dims(2, 130, 1, 5, 7, true), GateRegime::Resets(0.05), true, C, Exact, Dtype::F32),
        (dims(1, 1, 1, 40, 7, false), GateRegime::LargePhase(50.0), true, C, Exact, Dtype::F32),
        (dims(1, 200, 1, 5, 70, false), GateRegime::HardDecay(0.5), false, C, Exact, Dtype::F32),
        (dims(1, 130, 1, 40, 7, false), GateRegime::UnitModulus, false, C, Fast, Dtype::F32),
        (dims(1, 200, 1, 40, 70, false), GateRegime::Resets(0.05), true, R, Exact, Dtype::F32),
        (dims(2, 130, 1, 5, 7, true), GateRegime::Mixed, true, R, Fast, Dtype::F32),
        (dims(1, 200, 1, 40, 70, false), GateRegime::Mixed, true, C, Exact, Dtype::Bf16),
        (dims(2, 1100, 1, 5, 7, false), GateRegime::Resets(0.01), true, C, Exact, Dtype::F32),
        (dims(1, 1100, 1, 5, 7, true), GateRegime::Mixed, true, R, Exact, Dtype::F32),
        // The 16-bit real-gate walks (bf16 Exact: its Gram product rolled).
        (dims(1, 200, 2, 72, 70, false), GateRegime::Mixed, true, R, Exact, Dtype::Bf16),
        (dims(1, 130, 1, 40, 70, true), GateRegime::Resets(0.05), false, R, Fast, Dtype::Bf16),
        (dims(1, 200, 1, 72, 7, false), GateRegime::StrongDecay(40.0), true, R, Exact, Dtype::F16),
        // V a multiple of 8: the 16-bit value tile in 16-byte groups where
        // its rows are aligned (the walk's by cp.async).
        (dims(1, 200, 1, 40, 64, false), GateRegime::Resets(0.05), true, R, Fast, Dtype::Bf16),
        // V a multiple of 4: the output launches' state rows in groups of
        // four columns (stage_state_quads), narrow and wide (V > 64).
        (dims(1, 130, 1, 40, 72, false), GateRegime::Mixed, true, R, Exact, Dtype::Bf16),
        (dims(1, 130, 1, 24, 132, true), GateRegime::Resets(0.05), true, C, Fast, Dtype::Bf16),
        (dims(1, 130, 1, 40, 8, false), GateRegime::UnitModulus, true, C, Exact, Dtype::F32),
    ];
    for (i, (d, regime, with_h0, gates, precision, t)) in cases.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7600 + i as u64);
        let label = format!("{} {gates:?} {precision:?} {t}", case.label());
        let p = problem_for(&case, gates, t).to_f32();
        let separate = run_forward(&emu, 60 + i, &p, gates, precision, t, ChunkCarry::Separate);
        let sequential = run_forward(&emu, 60 + i, &p, gates, precision, t, ChunkCarry::Sequential);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let cbits = |x: &[Complex<f32>]| x.iter().flat_map(|v| [v.re.to_bits(), v.im.to_bits()]).collect::<Vec<_>>();
        assert!(separate.y.iter().all(|v| v.is_finite()), "{label}: y finite");
        assert_eq!(bits(&sequential.y), bits(&separate.y), "{label}: y");
        assert_eq!(cbits(&sequential.h_final), cbits(&separate.h_final), "{label}: h_final");
    }
    // The backward with the sequential carries (state_seq, grad_w_seq): the
    // decays, chunk states and adjoints they leave in the workspace, and
    // dh0, are the separate carries', so every gradient is too, to the last
    // bit (with and without h0 and dh_final).
    // Real gates (the `r` kernels) on the last two.
    for (i, (c, gates)) in [
        (GradCase::new(dims(1, 200, 2, 40, 70, false), GateRegime::Mixed, true, true, 7700), C),
        (GradCase::new(dims(2, 130, 1, 5, 7, true), GateRegime::Resets(0.05), false, true, 7701), C),
        (GradCase::new(dims(1, 70, 1, 16, 65, false), GateRegime::HardDecay(0.5), true, false, 7702), C),
        (GradCase::new(dims(1, 200, 1, 40, 70, false), GateRegime::Resets(0.05), true, true, 7703), R),
        (GradCase::new(dims(2, 130, 1, 5, 7, true), GateRegime::UnitModulus, true, false, 7704), R),
        // 18 chunks: the adjoint carry's ring of kCarryAhead = 8 wraps twice.
        (GradCase::new(dims(1, 1100, 2, 5, 7, false), GateRegime::Mixed, true, true, 7705), C),
        (GradCase::new(dims(1, 1100, 1, 5, 7, false), GateRegime::Resets(0.01), true, true, 7706), R),
        // Three real-gate walk blocks of 32, 32 and 8 channels.
        (GradCase::new(dims(1, 200, 1, 72, 70, false), GateRegime::Mixed, true, true, 7707), R),
        // V a multiple of 4: the dv launch's adjoint rows in groups of four.
        (GradCase::new(dims(1, 130, 1, 40, 68, false), GateRegime::Mixed, true, true, 7708), R),
        (GradCase::new(dims(1, 130, 1, 5, 8, true), GateRegime::Resets(0.05), true, true, 7709), C),
    ]
    .iter()
    .enumerate()
    {
        let inp = if *gates == R { c.inputs().real_gates() } else { c.inputs() };
        let separate = run_backward_gates(&emu, 70 + i, &inp, Dtype::F32, ChunkCarry::Separate, *gates);
        let sequential = run_backward_gates(&emu, 70 + i, &inp, Dtype::F32, ChunkCarry::Sequential, *gates);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let cbits = |x: &[Complex<f32>]| x.iter().flat_map(|v| [v.re.to_bits(), v.im.to_bits()]).collect::<Vec<_>>();
        assert!(
            separate.dlog_gate.iter().all(|z| z.re.is_finite() && (*gates == C || z.im == 0.0)),
            "{c:?} {gates:?}: dlog_gate"
        );
        assert_eq!(bits(&sequential.dq), bits(&separate.dq), "{c:?}: dq");
        assert_eq!(bits(&sequential.dk), bits(&separate.dk), "{c:?}: dk");
        assert_eq!(bits(&sequential.dv), bits(&separate.dv), "{c:?}: dv");
        assert_eq!(cbits(&sequential.dlog_gate), cbits(&separate.dlog_gate), "{c:?}: dlog_gate");
        assert_eq!(sequential.dh0.as_deref().map(cbits), separate.dh0.as_deref().map(cbits), "{c:?}: dh0");
    }
}

/// The chunked backward's six launches (the forward's state and carry
/// kernels, grad_w, the adjoint carry, grad_qk, grad_dv) on the emulator:
/// every gradient within the f32 bounds (relative L2 ≤ 1e-4, max-abs ≤
/// 1e-3·max|ref|) of the f64 reference backward, and close to the CPU mirror
/// `cpu::chunked_grad`.
#[test]
fn chunk_grad_kernels_emulated_match_reference_and_mirror() {
    let Some(emu) = emulator() else { return };
    let cases = [
        GradCase::new(dims(1, 150, 1, 5, 70, false), GateRegime::Mixed, true, true, 7100),
        GradCase::new(dims(1, 150, 1, 40, 7, true), GateRegime::Resets(0.05), true, false, 7101),
        GradCase::new(dims(1, 64, 2, 5, 7, false), GateRegime::UnitModulus, false, true, 7102),
        GradCase::new(dims(1, 1, 1, 40, 70, false), GateRegime::LargePhase(50.0), true, true, 7103),
        GradCase::new(dims(2, 150, 1, 5, 7, true), GateRegime::StrongDecay(40.0), false, false, 7104),
        GradCase::new(dims(1, 150, 1, 5, 7, false), GateRegime::Underflow, true, true, 7105),
    ];
    let (mut vs_ref, mut vs_mirror) = (GradWorst::default(), GradWorst::default());
    for (i, c) in cases.iter().enumerate() {
        let inp = c.inputs();
        let got = run_backward(&emu, i, &inp, Dtype::F32, ChunkCarry::Separate);
        let mirror = gateloop::cpu::chunked_grad::backward(
            &inp.p.view(),
            &inp.dy,
            inp.dh_final.as_deref(),
            &ChunkParams::default(),
        )
        .unwrap();
        vs_ref.check(&format!("{c:?} (emulated kernels vs reference)"), &compare_grads(&got, &inp.reference()), REL);
        vs_mirror.check(&format!("{c:?} (emulated kernels vs mirror)"), &compare_grads(&got, &mirror), 2.0 * REL);
    }
    vs_ref.report("emulated chunked backward vs reference");
    vs_mirror.report("emulated chunked backward vs mirror");
    // Real gates (the `r` kernels, gated linear attention) against the real
    // parts of the reference's gradients at the same real inputs, every
    // regime with a real form.
    let mut vs_ref = GradWorst::default();
    for (i, regime) in common::REAL_REGIMES.into_iter().enumerate() {
        let per_head = i % 2 == 1;
        let d = if i % 3 == 0 { dims(1, 150, 1, 40, 7, per_head) } else { dims(1, 130, 1, 5, 70, per_head) };
        let c = GradCase::new(d, regime, i % 2 == 0, i % 3 != 1, 7150 + i as u64);
        let inp = c.inputs().real_gates();
        let got = run_backward_gates(&emu, 20 + i, &inp, Dtype::F32, ChunkCarry::Separate, GateKind::Real);
        let want = common::grad::real_part_grads(inp.reference());
        vs_ref.check(&format!("{c:?} real (emulated kernels vs reference)"), &compare_grads(&got, &want), REL);
    }
    vs_ref.report("emulated chunked backward, real gates, vs reference");
}

/// Hard-decaying gates just above the reset threshold (`HardDecay`): the
/// chunk-local Re G reaches thousands, where an f32 running sum alone (ulp
/// ~2.4e-4) puts its rounding into every short difference. The kernels keep
/// the prefix compensated (`two_sum`, `re_diff` in cuda/common.cuh).
/// Measured on these cases (2026-11-29, emulated, f32 Exact): without the
/// compensation y rel 1.8e-5 (the CPU mirror's dlog_gate up to 7.6e-5 on
/// such gates); with it y ≤ 1.4e-7, every gradient ≤ 7.6e-7.
#[test]
fn hard_decay_emulated_kernels_keep_short_differences() {
    let Some(emu) = emulator() else { return };
    const TIGHT: f64 = 2e-6;
    let mut worst = GradWorst::default();
    for (i, (d, p_hard, with_h0)) in [
        (dims(1, 150, 1, 40, 7, false), 0.5, true),
        (dims(2, 150, 1, 5, 7, true), 0.8, false),
        (dims(1, 130, 1, 16, 70, false), 0.95, true),
    ]
    .into_iter()
    .enumerate()
    {
        let regime = GateRegime::HardDecay(p_hard);
        let case = Case::new(d, regime, with_h0, 7200 + i as u64);
        let p64 = case.problem().rounded_to_f32();
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let got = run_forward(
            &emu,
            20 + i,
            &p64.to_f32(),
            GateKind::Complex,
            ChunkPrecision::Exact,
            Dtype::F32,
            ChunkCarry::Separate,
        );
        let (ey, eh) = (compare(&got.y, &want.y), compare_complex(&got.h_final, &want.h_final));
        eprintln!("{}: y {ey:?} h_final {eh:?}", case.label());
        common::assert_within(&case.label(), "y (emulated kernels, hard decay)", &ey, TIGHT, 10.0 * TIGHT);
        common::assert_within(&case.label(), "h_final (emulated kernels, hard decay)", &eh, TIGHT, 10.0 * TIGHT);
        let g = GradCase::new(d, regime, with_h0, true, 7300 + i as u64);
        let inp = g.inputs();
        let got = run_backward(&emu, 30 + i, &inp, Dtype::F32, ChunkCarry::Separate);
        worst.check(&format!("{g:?} (emulated backward, hard decay)"), &compare_grads(&got, &inp.reference()), TIGHT);
    }
    worst.report("emulated chunked backward, hard decay");
}

/// The f16 and bf16 entry points (operands of the input's own type: WMMA
/// f16 / bf16 split products, cuda/chunk_common.cuh), forward and backward,
/// on inputs (q, k, v, dy) rounded to the type, against the f64 reference
/// on exactly those rounded inputs, with the bounds of the GPU tests:
/// forward y and h_final within `dtype_support::chunk_bounds` (Exact and
/// Fast; tests/gpu_chunked.rs); backward dq, dk, dv within
/// `dtype_support::y_bounds` and dlog_gate, dh0 within the f32 bounds
/// (relative L2 ≤ 1e-4, max-abs ≤ 1e-3·max|ref|; tests/gpu_chunked_grad.rs
/// `half_types`). L = 150 (a partial chunk), K ∈ {5, 40}, V ∈ {7, 70}, both
/// gate layouts, h0 and dh_final on and off, mixed, reset, large-phase and
/// hard-decay gates. Every error is measured before any is asserted, so a
/// failure reports all of them (`--nocapture` prints the worst per dtype).
#[test]
fn chunk_kernels_emulated_half_types() {
    let Some(emu) = emulator() else { return };
    let start = std::time::Instant::now();
    let mut worst = Worst::default();
    let mut failures = Vec::new();
    half_types::<half::f16>(&emu, &mut worst, &mut failures);
    half_types::<half::bf16>(&emu, &mut worst, &mut failures);
    for (k, e) in &worst.0 {
        let frac = e.max_abs / e.max_ref.max(f64::MIN_POSITIVE);
        println!("worst {k}: rel L2 {:.2e}, max-abs/max|ref| {frac:.2e}", e.rel_l2);
    }
    println!("emulated chunked f16/bf16 forward and backward: {:.1} s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "out of bounds:\n{}", failures.join("\n"));
}

/// The forward and backward cases of [`chunk_kernels_emulated_half_types`]
/// in `T`: records every error in `worst` and every one out of its bounds in
/// `failures`.
fn half_types<T: Element>(emu: &std::path::Path, worst: &mut Worst, failures: &mut Vec<String>) {
    use ChunkPrecision::{Exact, Fast};
    use GateKind::{Complex as C, Real as R};
    let t = T::DTYPE;
    let mut check = |label: &str, what: &str, e: ErrorStats, (rel, abs): (f64, f64)| {
        eprintln!("{label}: {what} {e:?}");
        if !common::grad::within_bounds(&e, rel, abs) {
            failures.push(format!("{label}: {what} {e:?} (bounds rel {rel:e}, abs {abs:e}·max|ref|)"));
        }
        worst.note(format!("{t} {what}"), e);
    };
    let forward: [(Dims, GateRegime, bool, GateKind, ChunkPrecision); 6] = [
        (dims(1, 150, 1, 40, 7, true), GateRegime::Mixed, true, C, Exact),
        (dims(1, 150, 1, 5, 7, true), GateRegime::Resets(0.05), false, C, Exact),
        (dims(1, 150, 1, 40, 7, false), GateRegime::LargePhase(50.0), true, C, Exact),
        (dims(1, 150, 1, 5, 70, true), GateRegime::HardDecay(0.5), true, C, Exact),
        (dims(1, 150, 1, 40, 7, false), GateRegime::Resets(0.05), true, R, Exact),
        (dims(1, 150, 1, 5, 70, false), GateRegime::Mixed, true, C, Fast),
    ];
    for (i, (d, regime, with_h0, gates, precision)) in forward.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7400 + 10 * i as u64 + u64::from(t.abi()));
        let label = format!("{t} {} {gates:?} {precision:?}", case.label());
        let mut p = case.problem();
        if gates == GateKind::Real {
            p = common::real_gates(p);
        }
        let p64 = rounded_to::<T>(&p);
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let got =
            run_forward(emu, 100 + 10 * t.abi() as usize + i, &p64.to_f32(), gates, precision, t, ChunkCarry::Separate);
        let (yb, hb) = chunk_bounds(t, precision);
        let p = precision.name();
        check(&label, &format!("{p} y"), compare(&got.y, &want.y), yb);
        check(&label, &format!("{p} h_final"), compare_complex(&got.h_final, &want.h_final), hb);
    }
    // The register-fragment output launch (ChunkOutput::Fragments), its
    // bounds the staged launch's.
    let fragments: [(Dims, GateRegime, bool, GateKind, ChunkPrecision); 3] = [
        (dims(1, 150, 1, 40, 7, true), GateRegime::Mixed, true, C, Exact),
        (dims(1, 150, 1, 40, 70, false), GateRegime::HardDecay(0.5), false, C, Fast),
        (dims(1, 150, 1, 5, 70, false), GateRegime::Resets(0.05), true, R, Exact),
    ];
    for (i, (d, regime, with_h0, gates, precision)) in fragments.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7450 + 10 * i as u64 + u64::from(t.abi()));
        let label = format!("{t} {} {gates:?} {precision:?} fragments", case.label());
        let mut p = case.problem();
        if gates == GateKind::Real {
            p = common::real_gates(p);
        }
        let p64 = rounded_to::<T>(&p);
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let config = ChunkConfig { output: ChunkOutput::Fragments, ..ChunkConfig::default() };
        let got = run_forward_with(emu, 150 + 10 * t.abi() as usize + i, &p64.to_f32(), gates, precision, t, config);
        let (yb, hb) = chunk_bounds(t, precision);
        let p = precision.name();
        check(&label, &format!("fragments {p} y"), compare(&got.y, &want.y), yb);
        check(&label, &format!("fragments {p} h_final"), compare_complex(&got.h_final, &want.h_final), hb);
    }
    // Hard decay without h0: with h0, f16's dh0 fails its bound when the
    // first gate decays hard (chunk_grad_f16_dh0_after_a_strong_first_gate).
    let backward = [
        GradCase::new(dims(1, 150, 1, 40, 7, false), GateRegime::Mixed, true, true, 7500),
        GradCase::new(dims(1, 150, 1, 5, 7, true), GateRegime::Resets(0.05), false, true, 7501),
        GradCase::new(dims(1, 150, 1, 5, 70, false), GateRegime::LargePhase(50.0), true, false, 7502),
        GradCase::new(dims(1, 150, 1, 40, 7, true), GateRegime::HardDecay(0.5), false, true, 7503),
    ];
    for (i, c) in backward.iter().enumerate() {
        let inp = rounded_grad_inputs::<T>(c);
        let got = run_backward(emu, 100 + 10 * t.abi() as usize + i, &inp, t, ChunkCarry::Separate);
        let label = format!("{t} {c:?}");
        for (name, e) in compare_grads(&got, &inp.reference()) {
            check(&label, name, e, grad_bounds(t, name));
        }
    }
}

/// What a `T` backward sees of case `c` (q, k, v and dy rounded to T;
/// log_gate, h0, dh_final f32); its `reference()` runs on exactly that.
fn rounded_grad_inputs<T: Element>(c: &GradCase) -> GradInputsF32 {
    let inp = c.inputs();
    let p = rounded_to::<T>(&inp.p.map(|x| x as f64)).to_f32();
    let dy = inp.dy.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    GradInputsF32 { p, dy, dh_final: inp.dh_final }
}

/// The bounds of tests/gpu_chunked_grad.rs `half_types` for gradient `name`
/// in `t`: dq, dk, dv (stored in `t`) `y_bounds`, dlog_gate and dh0 (f32)
/// the f32 bounds.
fn grad_bounds(t: Dtype, name: &str) -> (f64, f64) {
    if ["dq", "dk", "dv"].contains(&name) { y_bounds(t) } else { (REL_F32, ABS_FRAC_F32) }
}

/// FIXED (found by this test): f16 dh0 when the chunk's first gate decays
/// hard. grad_w forms W_0 = Σ_n conj(Q̃_n) dy_nᵀ with the query operand
/// Q̃_n = q_n |E(n, −1)| e^{iθ_n} (cuda/chunk_common.cuh
/// `put_inter_queries`: the modulus from the chunk's start, the first gate
/// a_0 included) narrowed to the operand type as hi + lo. With f16
/// operands (normal range down to 6.1e-5, subnormals spaced 2^-24) the
/// split carried an absolute error up to 2^-25 once lo was subnormal, over
/// 1e-4 relative below |Q̃| ≈ 3e-4 (|a_0| < e^-8 for |q| ≤ 1), and below
/// 2^-25 (|a_0| < e^-17.3) every Q̃ of the chunk rounded to 0; dh0 =
/// W_0 + conj(A_0) D(0) is then W_0 alone (A_0 ≈ 0), so its relative error
/// went to 1. Measured before (2026-11-29, emulated), f16 dh0 relative L2
/// against 1e-4: HardDecay(0.5), Re g_0 = −22.6: 1.0 (dh0 = 0);
/// StrongDecay(40), Re g_0 = −11.4: 3.6e-3; StrongDecay(10), Re g_0 = −7.8:
/// 1.7e-4; and tests/gpu_chunked_grad.rs `half_types`' own f16 cases,
/// replayed here, failed 3 of 84 (seeds 7504, 7508, 7608, up to 0.44).
/// The exact products of f16 inputs now take bf16 split operands (f32's
/// exponent range; `OpOf<__half>` in chunk_common.cuh), and these cases
/// measure dh0 ≤ 7.2e-6.
#[test]
fn chunk_grad_f16_dh0_after_a_strong_first_gate() {
    let Some(emu) = emulator() else { return };
    let cases = [
        GradCase::new(dims(1, 150, 1, 5, 70, true), GateRegime::HardDecay(0.5), true, false, 7503),
        GradCase::new(dims(1, 150, 1, 5, 7, true), GateRegime::StrongDecay(40.0), true, true, 9955),
        GradCase::new(dims(1, 150, 1, 5, 7, true), GateRegime::StrongDecay(10.0), true, true, 9957),
    ];
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let inp = rounded_grad_inputs::<half::f16>(c);
        let got = run_backward(&emu, 200 + i, &inp, Dtype::F16, ChunkCarry::Separate);
        for (name, e) in compare_grads(&got, &inp.reference()) {
            let (rel, abs) = grad_bounds(Dtype::F16, name);
            println!("f16 {c:?} (Re g_0 = {}): {name} {e:?}", inp.p.log_gate[0].re);
            if !common::grad::within_bounds(&e, rel, abs) {
                failures.push(format!("{c:?}: {name} {e:?} (bounds rel {rel:e}, abs {abs:e}·max|ref|)"));
            }
        }
    }
    assert!(failures.is_empty(), "out of bounds:\n{}", failures.join("\n"));
}

/// Racecheck without a GPU: every chunked entry point's launches (forward
/// with the separate and the sequential carry; backward with both; f32 and
/// bf16 operands; complex Exact, complex Fast and real gates) on the
/// ThreadSanitizer build of the emulator, where each thread of a block is
/// an OS thread and each barrier a `std::barrier`. A shared or global word
/// that two threads touch with no barrier between them, one of them
/// writing, is a reported race and fails the run (exit 66), as
/// compute-sanitizer's racecheck would on a GPU. Small shapes that still
/// take every code path: partial chunks and sub-chunks (L = 130), three key
/// slabs (K = 40), two value tiles (V = 70). The results must also be right
/// (the GPU bounds), so a race that TSan misses but that changes a value
/// still fails.
#[test]
fn chunk_kernels_race_free() {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(emu) = EMU.get_or_init(|| emu_support::race_checking_emulator("chunk")).clone() else { return };
    use ChunkPrecision::{Exact, Fast};
    use GateKind::{Complex as C, Real as R};
    let forward: [(Dims, GateRegime, bool, GateKind, ChunkPrecision, Dtype); 3] = [
        (dims(1, 130, 1, 40, 70, false), GateRegime::Mixed, true, C, Exact, Dtype::F32),
        (dims(1, 130, 1, 40, 70, true), GateRegime::Resets(0.05), false, R, Fast, Dtype::F32),
        (dims(1, 130, 1, 40, 70, false), GateRegime::LargePhase(50.0), true, C, Fast, Dtype::Bf16),
    ];
    for (i, (d, regime, with_h0, gates, precision, t)) in forward.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7800 + i as u64);
        let label = format!("{} {gates:?} {precision:?} {t} (race-checked)", case.label());
        let p64 = problem_for(&case, gates, t);
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let ((yr, ya), (hr, ha)) = chunk_bounds(t, precision);
        for carry in [ChunkCarry::Separate, ChunkCarry::Sequential] {
            let got = run_forward(&emu, 300 + i, &p64.to_f32(), gates, precision, t, carry);
            let what = |x: &str| format!("{x} ({} carry)", carry.name());
            common::assert_within(&label, &what("y"), &compare(&got.y, &want.y), yr, ya);
            common::assert_within(&label, &what("h_final"), &compare_complex(&got.h_final, &want.h_final), hr, ha);
        }
    }
    // The register-fragment output launch (16-bit inputs): complex exact in
    // f16, real fast in bf16.
    let fragments: [(Dims, GateRegime, bool, GateKind, ChunkPrecision, Dtype); 2] = [
        (dims(1, 130, 1, 40, 70, false), GateRegime::Mixed, true, C, Exact, Dtype::F16),
        (dims(1, 130, 1, 40, 70, true), GateRegime::Resets(0.05), false, R, Fast, Dtype::Bf16),
    ];
    for (i, (d, regime, with_h0, gates, precision, t)) in fragments.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 7820 + i as u64);
        let label = format!("{} {gates:?} {precision:?} {t} fragments (race-checked)", case.label());
        let p64 = problem_for(&case, gates, t);
        let want = gateloop::reference::recurrent::forward(&p64.view()).expect("reference");
        let ((yr, ya), (hr, ha)) = chunk_bounds(t, precision);
        let config = ChunkConfig { output: ChunkOutput::Fragments, ..ChunkConfig::default() };
        let got = run_forward_with(&emu, 320 + i, &p64.to_f32(), gates, precision, t, config);
        common::assert_within(&label, "y", &compare(&got.y, &want.y), yr, ya);
        common::assert_within(&label, "h_final", &compare_complex(&got.h_final, &want.h_final), hr, ha);
    }
    let backward = [
        (GradCase::new(dims(1, 130, 1, 40, 70, false), GateRegime::Mixed, true, true, 7810), Dtype::F32, C),
        (GradCase::new(dims(1, 130, 1, 40, 70, true), GateRegime::HardDecay(0.5), false, true, 7811), Dtype::Bf16, C),
        (GradCase::new(dims(1, 130, 1, 40, 70, false), GateRegime::Resets(0.05), true, true, 7812), Dtype::Bf16, R),
    ];
    for (i, (c, t, gates)) in backward.iter().enumerate() {
        let inp = if *t == Dtype::Bf16 { rounded_grad_inputs::<half::bf16>(c) } else { c.inputs() };
        let (inp, want) = match gates {
            C => {
                let want = inp.reference();
                (inp, want)
            }
            R => {
                let inp = inp.real_gates();
                let want = common::grad::real_part_grads(inp.reference());
                (inp, want)
            }
        };
        for carry in [ChunkCarry::Separate, ChunkCarry::Sequential] {
            let got = run_backward_gates(&emu, 310 + i, &inp, *t, carry, *gates);
            let label = format!("{t} {gates:?} {c:?} ({} carry, race-checked)", carry.name());
            for (name, e) in compare_grads(&got, &want) {
                let (rel, abs) = grad_bounds(*t, name);
                assert!(
                    common::grad::within_bounds(&e, rel, abs),
                    "{label}: {name} {e:?} (bounds rel {rel:e}, abs {abs:e}·max|ref|)"
                );
            }
        }
    }
}

/// The fake CUDA driver's tensor-core model (`tests/kernel_emu/include/mma.h`
/// under EMU_GPU_ARITH: the truncating accumulation the emulated device's
/// WMMA products use): its AVX2 path, which the fake driver runs, equals the
/// scalar path it stands for, bit for bit, on random tiles and on tiles of
/// special values (`tests/kernel_emu/tensor_core_check.cpp`).
#[test]
fn fake_driver_tensor_core_model_vector_path_is_the_scalar_path() {
    let Some(check) = emu_support::build_emulator("tensor-core", emu_support::Sanitizer::Address) else { return };
    let out = std::process::Command::new(&check).output().expect("run the tensor-core check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}
