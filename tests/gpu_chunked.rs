//! The chunked tensor-core CUDA kernels (`cuda::chunk`) against the f64
//! reference (`reference::recurrent`) on the same rounded inputs, and against
//! their CPU mirror (`cpu::chunked`, default 64/16 chunking).
//!
//! Bounds:
//! - exact precision (3 split tensor-core products): the bounds of the other
//!   kernels, relative L2 ≤ 1e-4 and max-abs ≤ 1e-3 · max|ref| for h_final
//!   (f32 for every type) and for y plus its one rounding to the element
//!   type (tests/dtype_support/mod.rs: 5.9e-4 for f16, 4.0e-3 for bf16);
//!   1e-3 at L = 65536 with |a| = 1 (as for the scan);
//! - fast precision (1 product of operands rounded to the operand type, unit
//!   roundoff u_op = 2^-11 for TF32 and f16, 2^-8 for bf16): relative L2 ≤
//!   4·u_op and max-abs ≤ 16·u_op · max|ref| (each product carries at most
//!   ~2·u_op relative error; 2× headroom), plus y's rounding to its type:
//!   2.0e-3 (f32), 2.5e-3 (f16), 2.0e-2 (bf16) relative L2.
//!
//! Every launch gets NaN-poisoned y, h_final and workspace, so an element the
//! kernels forget fails the comparison. Real gates (`forward_real_into`) are
//! checked against the reference run with gates (re, 0) and h0 (re, 0).
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::{Case, adversarial_regime_tests, regime_matrix, regime_tests, run_forward};
use dtype_support::{chunk_bounds as bounds, rounded_to, widen};
use gateloop::cuda::chunk::{
    ChunkCarry, ChunkConfig, ChunkOutput, ChunkPrecision, ChunkStateBlocks, DeviceInputs, DeviceOutputs, Gates,
    forward_host, forward_into, forward_real_host_as, forward_real_into, plan,
};
use gateloop::cuda::{Dtype, Element, Gpu, GpuError};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, ErrorStats, InputError, Outputs, compare, compare_complex, cpu, reference};
use half::{bf16, f16};

/// Runs the complex-gate kernels in `T` on `p32` (representable in `T`)
/// through `forward_into` on a fresh stream, outputs and workspace poisoned.
fn run_complex<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    config: impl Into<ChunkConfig>,
) -> (Vec<T>, Vec<Complex<f32>>) {
    run_gates::<T>(gpu, p32, Gates::Complex, config.into(), 0)
}

/// Runs the real-gate kernels on the real parts of `p32`'s log_gate and h0
/// (the imaginary parts must be 0), outputs and workspace poisoned; returns y
/// and h_final (as complex numbers with Im = 0).
fn run_real<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    config: impl Into<ChunkConfig>,
) -> (Vec<T>, Vec<Complex<f32>>) {
    run_gates::<T>(gpu, p32, Gates::Real, config.into(), 0)
}

fn assert_within(label: &str, what: &str, e: &ErrorStats, (rel, abs): (f64, f64)) {
    assert!(e.within(rel, abs), "{label}: {what} {e:?} (bounds: rel {rel:e}, abs_frac {abs:e})");
}

/// One case in `T`, complex or real gates, at `precision`, against the f64
/// reference on exactly the inputs the kernel sees; the relative L2 bounds
/// are multiplied by `rel_scale` (10 at L = 65536 with |a| = 1: 1e-3).
fn check_in<T: Element>(gpu: &Gpu, case: Case, gates: Gates, precision: ChunkPrecision, rel_scale: f64) {
    check_with::<T>(gpu, case, gates, precision.into(), rel_scale);
}

/// [`check_in`] with a whole [`ChunkConfig`] (the bounds are its precision's).
fn check_with<T: Element>(gpu: &Gpu, case: Case, gates: Gates, config: ChunkConfig, rel_scale: f64) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let t = T::DTYPE;
    let precision = config.precision;
    let label = format!("{t} {gates:?} {precision:?} {:?} {}", config.output, case.label());
    let mut p = case.problem();
    if gates == Gates::Real {
        p = common::real_gates(p);
    }
    let p64 = rounded_to::<T>(&p);
    let want = reference::recurrent::forward(&p64.view()).expect("reference");
    let p32 = p64.to_f32();
    let (y, h_final) = match gates {
        Gates::Complex => run_complex::<T>(gpu, &p32, config),
        Gates::Real => run_real::<T>(gpu, &p32, config),
    };
    let (yb, hb) = bounds(t, precision);
    let sc = |(r, a): (f64, f64)| (r * rel_scale, a);
    assert_within(&label, "y", &compare(&widen(&y), &want.y), sc(yb));
    assert_within(&label, "h_final", &compare_complex(&h_final, &want.h_final), sc(hb));
}

fn check_case(gpu: &Gpu, c: Case) {
    check_in::<f32>(gpu, c, Gates::Complex, ChunkPrecision::Exact, 1.0);
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    common::shape_sweep(&[1, 2, 63, 64, 65, 127, 1000], &[1, 5, 16, 64, 128], &[1, 5, 16, 64, 128], 0, |c| {
        check_case(gpu, c)
    });
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(65, 16, 5), (1000, 64, 16), (4096, 5, 64), (300, 1, 1), (200, 128, 128), (20_000, 16, 16)];
    regime_matrix(1, 2, &shapes, regime, seed, |c| check_case(gpu, c));
}

regime_tests! { regime_cases:
    random => GateRegime::Random, 500;
    underflow => GateRegime::Underflow, 600;
    hard_decay => GateRegime::HardDecay(0.5), 700;
}
adversarial_regime_tests!(regime_cases);

/// Hard decay just above the reset threshold: the chunk-local Re G reaches
/// thousands, and the compensated prefix (cuda/common.cuh: two_sum,
/// re_diff) keeps every short difference exact, so f32 Exact stays 20×
/// inside the usual bounds (relative L2 ≤ 5e-6; the kernels emulated on the
/// CPU measure ≤ 1.4e-7, 1.8e-5 without the compensation).
#[test]
fn hard_decay_keeps_short_differences() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 16_000;
    for p_hard in [0.2, 0.5, 0.95] {
        for (len, k, v) in [(150, 40, 7), (1000, 16, 70), (65, 128, 64)] {
            for per_head in [false, true] {
                seed += 1;
                let c = Case::new(dims(2, len, 2, k, v, per_head), GateRegime::HardDecay(p_hard), seed % 2 == 0, seed);
                check_in::<f32>(gpu, c, Gates::Complex, ChunkPrecision::Exact, 0.05);
                check_in::<f32>(gpu, c, Gates::Real, ChunkPrecision::Exact, 0.05);
            }
        }
    }
}

/// B·H = 1 at L = 65536 (1024 chunks of carries), |a| = 1 and mixed gates.
#[test]
fn long_sequence() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let exact = ChunkPrecision::Exact;
    check_in::<f32>(
        gpu,
        Case::new(dims(1, 65536, 1, 4, 8, false), GateRegime::UnitModulus, true, 9000),
        Gates::Complex,
        exact,
        10.0,
    );
    check_in::<f32>(
        gpu,
        Case::new(dims(1, 65536, 1, 3, 2, true), GateRegime::UnitModulus, false, 9001),
        Gates::Complex,
        exact,
        10.0,
    );
    check_in::<f32>(
        gpu,
        Case::new(dims(1, 65536, 1, 64, 64, false), GateRegime::Mixed, true, 9002),
        Gates::Complex,
        exact,
        1.0,
    );
    check_in::<f32>(
        gpu,
        Case::new(dims(1, 65536, 1, 16, 16, true), GateRegime::UnitModulus, true, 9003),
        Gates::Real,
        exact,
        10.0,
    );
}

/// B·H from 1 to 256: the (b, h, chunk, value tile) decomposition of the grid.
#[test]
fn batch_heads_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 9100;
    for (b, h) in [(1, 1), (1, 3), (2, 2), (4, 8), (8, 16), (1, 256)] {
        seed += 1;
        check_case(gpu, Case::new(dims(b, 700, h, 8, 70, seed % 2 == 0), GateRegime::Mixed, seed % 3 != 0, seed));
    }
}

/// f16 and bf16 inputs (operands of their own type), exact and fast; f32 fast.
#[test]
fn dtypes_and_precisions() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 10_000;
    for regime in [
        GateRegime::Random,
        GateRegime::Resets(0.1),
        GateRegime::UnitModulus,
        GateRegime::LargePhase(50.0),
        GateRegime::Mixed,
    ] {
        for (len, k, v) in [(1, 5, 5), (200, 64, 33), (65, 128, 64), (1000, 16, 128)] {
            for per_head in [false, true] {
                seed += 1;
                let c = Case::new(dims(2, len, 3, k, v, per_head), regime, seed % 3 != 0, seed);
                for precision in ChunkPrecision::ALL {
                    for gates in Gates::ALL {
                        check_in::<f16>(gpu, c, gates, precision, 1.0);
                        check_in::<bf16>(gpu, c, gates, precision, 1.0);
                        check_in::<f32>(gpu, c, gates, precision, 1.0);
                    }
                }
            }
        }
    }
}

/// The register-fragment output launch (`ChunkOutput::Fragments`, 16-bit
/// inputs): the bounds of the staged launch, for complex and real gates,
/// exact and fast, both gate layouts, with and without h0, chunks, key slabs
/// and value tiles cut short (L = 1, 65, 130; K = 5, 20; V = 5, 33, 70), and
/// the gate regimes that stress its one-anchor-per-sub-chunk off-diagonal
/// products (resets, hard decay, |a| = 1, phases ≫ 2π); f32 inputs get a
/// typed error naming the output kernel.
#[test]
fn fragment_output_matches_the_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 17_000;
    let shapes = [
        dims(2, 1, 3, 5, 5, false),
        dims(2, 200, 3, 64, 33, true),
        dims(1, 130, 2, 20, 70, false),
        dims(2, 1000, 3, 128, 128, false),
    ];
    for regime in [
        GateRegime::Mixed,
        GateRegime::Resets(0.1),
        GateRegime::HardDecay(0.5),
        GateRegime::UnitModulus,
        GateRegime::LargePhase(50.0),
    ] {
        for &d in &shapes {
            seed += 1;
            let c = Case::new(d, regime, seed % 2 == 0, seed);
            for precision in ChunkPrecision::ALL {
                for gates in Gates::ALL {
                    let config = ChunkConfig { precision, output: ChunkOutput::Fragments, ..ChunkConfig::default() };
                    check_with::<bf16>(gpu, c, gates, config, 1.0);
                    check_with::<f16>(gpu, c, gates, config, 1.0);
                }
            }
        }
    }
    // f32 inputs: no fragment kernel, a typed error before any launch.
    let p32 = Case::new(dims(1, 70, 1, 8, 8, false), GateRegime::Random, false, 1).problem().to_f32();
    let d = p32.dims;
    let lp = plan(&d, Dtype::F32, Gates::Complex).unwrap();
    assert!(lp.fragment_output_shared_bytes.is_none());
    let config = ChunkConfig { output: ChunkOutput::Fragments, ..ChunkConfig::default() };
    let err =
        run_forward::<f32>(gpu, &p32, lp.workspace_len, |s, d, i, o, ws| forward_into(gpu, s, d, i, o, ws, config))
            .expect_err("f32 with the fragment output kernel");
    assert!(
        matches!(&err, GpuError::Input(InputError::Param { name: "output", .. })),
        "f32 with ChunkOutput::Fragments: {err}"
    );
}

/// Real gates (gated linear attention) in every regime that has a real form.
#[test]
fn real_gates_match_the_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(1, 1, 1), (64, 5, 16), (65, 16, 5), (1000, 64, 64), (300, 128, 128)];
    let mut seed = 15_000;
    for regime in common::REAL_REGIMES {
        regime_matrix(1, 2, &shapes, regime, seed, |c| {
            check_in::<f32>(gpu, c, Gates::Real, ChunkPrecision::Exact, 1.0)
        });
        seed += 100;
    }
}

/// `ChunkCarry::Sequential` (one launch walking the chunks, the slab's state
/// in shared memory) writes what the state and carry launches write, bit for
/// bit, on the hardware as under emulation (tests/cpu_chunked_emu.rs): y and
/// h_final of both carries equal to the last bit, each within the bounds of
/// the reference, over f32 and bf16, complex (exact, fast) and real gates,
/// partial chunks, slabs and value tiles, both gate layouts, with and
/// without h0, and the benchmark's B8 L4096 H16 K = V = 64 (where `Auto`
/// picks the sequential carry for real gates and 16-bit inputs, the
/// separate one for complex gates).
#[test]
fn sequential_carry_is_bitwise_the_separate_carry() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [
        dims(2, 1000, 3, 64, 128, false),
        dims(1, 777, 2, 40, 70, true),
        dims(3, 65, 2, 5, 7, false),
        dims(8, 4096, 16, 64, 64, false),
    ];
    assert_eq!(plan(&shapes[3], Dtype::Bf16, Gates::Real).unwrap().carry, ChunkCarry::Sequential);
    assert_eq!(plan(&shapes[3], Dtype::Bf16, Gates::Complex).unwrap().carry, ChunkCarry::Separate);
    let mut seed = 16_000;
    for d in shapes {
        // The big shape once (its inputs take seconds to draw and convert).
        let big = d.len * d.batch * d.heads > 100_000;
        let regimes = [GateRegime::Mixed, GateRegime::Resets(0.05), GateRegime::HardDecay(0.5)];
        for regime in if big { &regimes[..1] } else { &regimes[..] } {
            seed += 1;
            let c = Case::new(d, *regime, seed % 2 == 0, seed);
            for (gates, precision) in [
                (Gates::Complex, ChunkPrecision::Exact),
                (Gates::Complex, ChunkPrecision::Fast),
                (Gates::Real, ChunkPrecision::Exact),
            ] {
                if !big {
                    check_carries::<f32>(gpu, c, gates, precision);
                }
                check_carries::<bf16>(gpu, c, gates, precision);
            }
        }
    }
}

/// Both carries on one case: bitwise equal, and within the reference bounds
/// (checked on problems small enough for the f64 reference's time).
fn check_carries<T: Element>(gpu: &Gpu, case: Case, gates: Gates, precision: ChunkPrecision) {
    let with = |carry| ChunkConfig { precision, carry, ..ChunkConfig::default() };
    check_bitwise::<T>(
        gpu,
        case,
        gates,
        [(with(ChunkCarry::Separate), 0), (with(ChunkCarry::Sequential), 0)],
        "the carries",
    );
}

/// `case` in `T` through two launch configurations, each with v and y that
/// many elements into their buffers (`[(a, a_offset), (b, b_offset)]`,
/// outputs and workspace poisoned for each): y and h_final equal to the
/// last bit, and b's within the reference bounds of its precision (on
/// problems of at most 100 000 steps, for the f64 reference's time).
fn check_bitwise<T: Element>(
    gpu: &Gpu,
    case: Case,
    gates: Gates,
    [(a, a_offset), (b, b_offset)]: [(ChunkConfig, usize); 2],
    what: &str,
) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let precision = b.precision;
    let label = format!("{} {gates:?} {precision:?} {}", T::DTYPE, case.label());
    let p64 = carry_problem::<T>(case, gates);
    let (ya, ha) = run_gates::<T>(gpu, &p64.to_f32(), gates, a, a_offset);
    let (yb, hb) = run_gates::<T>(gpu, &p64.to_f32(), gates, b, b_offset);
    let bits = |y: &[T]| y.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    let cbits = |h: &[Complex<f32>]| h.iter().flat_map(|z| [z.re.to_bits(), z.im.to_bits()]).collect::<Vec<_>>();
    assert!(bits(&yb) == bits(&ya), "{label}: y differs between {what}");
    assert!(cbits(&hb) == cbits(&ha), "{label}: h_final differs between {what}");
    if p64.dims.len * p64.dims.batch * p64.dims.heads <= 100_000 {
        let want = reference::recurrent::forward(&p64.view()).expect("reference");
        let (y_bound, h_bound) = bounds(T::DTYPE, precision);
        assert_within(&label, &format!("y ({b:?})"), &compare(&widen(&yb), &want.y), y_bound);
        assert_within(&label, &format!("h_final ({b:?})"), &compare_complex(&hb, &want.h_final), h_bound);
    }
}

/// The wide output launch (`ChunkOutput::Staged` where V > 64: one block
/// per 128 value columns, the chunk's scores formed once for both halves)
/// writes what the narrow one (`ChunkOutput::StagedNarrow`, a block per 64
/// columns) writes, bit for bit, and within the reference's bounds: every
/// dtype, complex (exact, fast) and real gates (exact, fast), with and
/// without h0, both gate layouts, V with a part-filled wide block (65, 70,
/// 130, 200) or none (128, 256), K cut short (5, 20, 40), 16 and 128,
/// partial chunks, resets, hard decay, |a| = 1 and phases ≫ 2π; outputs and
/// workspace poisoned for each launch.
#[test]
fn wide_output_is_bitwise_the_narrow_output() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [
        dims(2, 130, 2, 5, 70, true),
        dims(1, 200, 3, 40, 128, false),
        dims(2, 65, 1, 128, 130, false),
        dims(1, 1, 2, 16, 65, false),
        dims(1, 300, 1, 40, 200, true),
        dims(1, 100, 1, 20, 256, false),
    ];
    for d in shapes {
        let lp = plan(&d, Dtype::F32, Gates::Complex).unwrap();
        assert_eq!(lp.wide_grid as usize, d.batch * d.heads * d.len.div_ceil(64) * d.value_dim.div_ceil(128));
    }
    let regimes = [
        GateRegime::Mixed,
        GateRegime::Resets(0.1),
        GateRegime::HardDecay(0.5),
        GateRegime::UnitModulus,
        GateRegime::LargePhase(50.0),
    ];
    for c in wide_cases(&shapes, &regimes, 18_000) {
        for gates in Gates::ALL {
            for precision in ChunkPrecision::ALL {
                check_outputs::<f32>(gpu, c, gates, precision);
                check_outputs::<bf16>(gpu, c, gates, precision);
                check_outputs::<f16>(gpu, c, gates, precision);
            }
        }
    }
}

/// The cases of the wide-against-narrow tests: every regime at the first
/// two shapes, one each after (regime i mod their count at shape i), seeds
/// from `seed` + 1, h0 on even seeds.
fn wide_cases(shapes: &[Dims], regimes: &[GateRegime], mut seed: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, &d) in shapes.iter().enumerate() {
        for (j, regime) in regimes.iter().enumerate() {
            if i >= 2 && j != i % regimes.len() {
                continue;
            }
            seed += 1;
            cases.push(Case::new(d, *regime, seed.is_multiple_of(2), seed));
        }
    }
    cases
}

/// The wide state launches (`ChunkStateBlocks::Auto` where V > 64: one block
/// per 128 value columns, each key slab's gate prefix, keys and slab
/// operand built once for both 64-column tiles) write what the narrow ones
/// (`ChunkStateBlocks::Narrow`, a block per 64 columns) write, bit for bit,
/// and within the reference's bounds: the walk (real gates) and the
/// separate carry's state kernel (complex and real gates; on a real-gate
/// slab of 16 channels the second tile's product by the warps the first
/// leaves idle), bf16 and f16, Exact and Fast, with and without h0, both
/// gate layouts, V with a part-filled wide block (70, 130, 200) or none
/// (128, 256), K cut short (5, 40, 72: part-filled slabs), partial chunks,
/// resets, hard decay, |a| = 1; outputs and workspace poisoned for each
/// launch. (V = 64 and f32 take the narrow blocks either way; the
/// misaligned rows' elementwise staging of both tiles:
/// `vector_staging_is_bitwise_the_elementwise_staging`.)
#[test]
fn wide_state_blocks_are_bitwise_the_narrow_ones() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [
        dims(2, 130, 2, 5, 70, true),
        dims(1, 200, 3, 40, 128, false),
        dims(2, 65, 1, 72, 130, false),
        dims(1, 300, 1, 40, 200, true),
        dims(1, 100, 1, 20, 256, false),
    ];
    for d in shapes {
        let lp = plan(&d, Dtype::Bf16, Gates::Real).unwrap();
        let blocks = |cols: usize| d.batch * d.heads * d.value_dim.div_ceil(cols) * d.key_dim.div_ceil(32);
        assert_eq!((lp.sequential_grid as usize, lp.wide_sequential_grid as usize), (blocks(64), blocks(128)));
        let chunks = d.len.div_ceil(64);
        let blocks = |cols: usize| d.batch * d.heads * chunks * d.value_dim.div_ceil(cols);
        assert_eq!((lp.grid as usize, lp.wide_grid as usize), (blocks(64), blocks(128)));
    }
    let regimes = [GateRegime::Mixed, GateRegime::Resets(0.1), GateRegime::HardDecay(0.5), GateRegime::UnitModulus];
    for c in wide_cases(&shapes, &regimes, 18_500) {
        for precision in ChunkPrecision::ALL {
            for (carry, gates) in [
                (ChunkCarry::Sequential, Gates::Real),
                (ChunkCarry::Separate, Gates::Real),
                (ChunkCarry::Separate, Gates::Complex),
            ] {
                let with = |state_blocks| ChunkConfig { precision, carry, state_blocks, ..ChunkConfig::default() };
                let runs = [(with(ChunkStateBlocks::Narrow), 0), (with(ChunkStateBlocks::Auto), 0)];
                let what = "the narrow and the wide state blocks";
                check_bitwise::<bf16>(gpu, c, gates, runs, what);
                check_bitwise::<f16>(gpu, c, gates, runs, what);
            }
        }
    }
}

/// A 16-bit value tile whose rows all start 16-byte aligned (V a multiple of
/// 8) is staged 16 bytes a load where it is its own operand (bf16 inputs,
/// f16 Fast: Block::load_tile's vector staging), and y is stored 16 bytes a
/// store (intra_pass's grouped drain), any other an element at a time: the
/// same bits; and the real walks' state update goes in groups of four
/// columns (16-byte slot stores) where the workspace's rows are 16-byte
/// aligned, else elementwise; and the output launches stage q and k four
/// channels a load where their rows allow (key quads: 8-byte aligned for
/// 16-bit inputs, 16 for f32), else an element a load: the same bits. Each
/// case runs with q, k, v and y as allocated (aligned) and one element into
/// their buffers, the workspace two (every row misaligned: the elementwise
/// paths, and y's element before the tensor must stay unwritten), bf16,
/// f16 and f32, complex and real gates, Exact and Fast, the separate and
/// the sequential carry (whose walk stages V too), the narrow (V = 64)
/// and the wide (V = 128) output launch and walk, K cut short, partial
/// chunks, resets; outputs and workspace poisoned, and the aligned run
/// within the reference's bounds.
#[test]
fn vector_staging_is_bitwise_the_elementwise_staging() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [dims(1, 200, 2, 40, 64, true), dims(2, 130, 1, 16, 128, false)];
    let mut seed = 19_000;
    for d in shapes {
        for regime in [GateRegime::Mixed, GateRegime::Resets(0.1)] {
            seed += 1;
            let case = Case::new(d, regime, seed % 2 == 0, seed);
            for gates in Gates::ALL {
                for precision in ChunkPrecision::ALL {
                    for carry in [ChunkCarry::Separate, ChunkCarry::Sequential] {
                        let config = ChunkConfig { precision, carry, ..ChunkConfig::default() };
                        let runs = [(config, 0), (config, 1)];
                        let what = "aligned and misaligned q, k, v, y";
                        check_bitwise::<bf16>(gpu, case, gates, runs, what);
                        check_bitwise::<f16>(gpu, case, gates, runs, what);
                        check_bitwise::<f32>(gpu, case, gates, runs, what);
                    }
                }
            }
        }
    }
}

fn check_outputs<T: Element>(gpu: &Gpu, case: Case, gates: Gates, precision: ChunkPrecision) {
    let with = |output| ChunkConfig { precision, output, ..ChunkConfig::default() };
    check_bitwise::<T>(
        gpu,
        case,
        gates,
        [(with(ChunkOutput::StagedNarrow), 0), (with(ChunkOutput::Staged), 0)],
        "the narrow and the wide output launch",
    );
}

/// The separate carry in segments (a batched problem of few state elements
/// and many chunks: `LaunchPlan::carry_segments` > 1, two carry launches):
/// y and h_final within the reference bounds (outputs and workspace
/// poisoned), and in f32 within 1e-5 of the one walk's (the sequential
/// carry's, which the segments change only by rounding), over complex and
/// real gates, f32 and bf16, with and without h0, resets, |a| = 1 and
/// phases, segments of unequal length (4100 steps: 65 chunks in 4).
#[test]
fn segmented_carry_matches_the_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let cases = [
        (dims(1, 2048, 1, 4, 4, false), GateRegime::Mixed, 2),
        (dims(2, 4100, 1, 3, 5, true), GateRegime::Resets(0.05), 4),
        (dims(1, 8192, 2, 8, 8, false), GateRegime::UnitModulus, 8),
    ];
    for (i, (d, regime, segments)) in cases.into_iter().enumerate() {
        for gates in Gates::ALL {
            let lp = plan(&d, Dtype::F32, gates).unwrap();
            assert_eq!((lp.carry, lp.carry_segments), (ChunkCarry::Separate, segments), "{d:?} {gates:?}");
        }
        let case = Case::new(d, regime, i % 2 == 0, 16_500 + i as u64);
        for gates in Gates::ALL {
            check_segmented::<f32>(gpu, case, gates);
        }
        check_segmented::<bf16>(gpu, case, Gates::Complex);
    }
}

/// `case`'s problem with complex or real gates, rounded to `T` (what the
/// kernels see, and the reference's inputs).
fn carry_problem<T: Element>(case: Case, gates: Gates) -> OwnedProblem<f64> {
    let p = case.problem();
    rounded_to::<T>(&if gates == Gates::Real { common::real_gates(p) } else { p })
}

/// [`run_complex`] or [`run_real`] by `gates`, v and y `offset` elements
/// into their device buffers (common::run_forward_gates).
fn run_gates<T: Element>(
    gpu: &Gpu,
    p32: &OwnedProblem<f32>,
    gates: Gates,
    config: ChunkConfig,
    offset: usize,
) -> (Vec<T>, Vec<Complex<f32>>) {
    let d = p32.dims;
    let lp = plan(&d, T::DTYPE, gates).expect("plan");
    common::run_forward_gates::<T>(gpu, p32, lp.workspace_len, gates == Gates::Real, offset, |s, d, i, o, ws| {
        match gates {
            Gates::Complex => forward_into(gpu, s, d, i, o, ws, config),
            Gates::Real => forward_real_into(gpu, s, d, i, o, ws, config),
        }
    })
    .unwrap_or_else(|e| panic!("{} {d:?}: {e}", T::DTYPE))
}

fn check_segmented<T: Element>(gpu: &Gpu, case: Case, gates: Gates) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let label = format!("{} {gates:?} {} (segmented carry)", T::DTYPE, case.label());
    let p64 = carry_problem::<T>(case, gates);
    let run = |carry| run_gates::<T>(gpu, &p64.to_f32(), gates, ChunkConfig { carry, ..ChunkConfig::default() }, 0);
    let (ys, hs) = run(ChunkCarry::Separate);
    let want = reference::recurrent::forward(&p64.view()).expect("reference");
    let (yb, hb) = bounds(T::DTYPE, ChunkPrecision::Exact);
    assert_within(&label, "y", &compare(&widen(&ys), &want.y), yb);
    assert_within(&label, "h_final", &compare_complex(&hs, &want.h_final), hb);
    if T::DTYPE == Dtype::F32 {
        let (yq, hq) = run(ChunkCarry::Sequential);
        assert_within(&label, "y against the one walk", &compare(&widen(&ys), &widen(&yq)), (1e-5, 1e-5));
        assert_within(&label, "h_final against the one walk", &compare_complex(&hs, &hq), (1e-5, 1e-5));
    }
}

/// The kernels and the CPU mirror run the same algorithm: they agree more
/// tightly than either agrees with the reference.
#[test]
fn matches_cpu_mirror() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(1, 5000, 1, 16, 16, false), dims(2, 777, 3, 5, 7, true), dims(1, 4096, 2, 64, 64, false)]
        .into_iter()
        .enumerate()
    {
        if common::emulated_device_skips(&d) {
            continue;
        }
        let p32 = random_problem(d, GateRegime::Mixed, true, 9200 + i as u64).to_f32();
        let cpu = cpu::chunked::forward(&p32.view(), &Default::default()).unwrap();
        let (y, h_final) = run_complex::<f32>(gpu, &p32, ChunkPrecision::Exact);
        let label = format!("{d:?} vs the CPU mirror");
        assert_within(&label, "y", &compare(&y, &cpu.y), (5e-5, 5e-4));
        assert_within(&label, "h_final", &compare_complex(&h_final, &cpu.h_final), (5e-5, 5e-4));
    }
}

#[test]
fn forward_host_and_dispatch_match_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for d in [dims(2, 300, 3, 64, 64, false), dims(1, 9000, 2, 16, 33, true)] {
        if common::emulated_device_skips(&d) {
            continue;
        }
        let case = Case::new(d, GateRegime::Mixed, true, 7000);
        let (p32, want) = case.with_reference();
        let got = forward_host(gpu, &p32.view()).unwrap();
        common::assert_outputs(&case.label(), &got.y, &got.h_final, &want, 1e-4, 1e-3);
        let got = gateloop::dispatch::cuda_f32(gpu, gateloop::Mode::Chunked, &p32.view()).unwrap();
        common::assert_outputs(&case.label(), &got.y, &got.h_final, &want, 1e-4, 1e-3);
    }
    // The real-gate host convenience.
    let case = Case::new(dims(2, 300, 3, 16, 16, false), GateRegime::Resets(0.05), true, 7001);
    let p64 = common::real_gates(case.problem()).rounded_to_f32();
    let want: Outputs<f64> = reference::recurrent::forward(&p64.view()).unwrap();
    let got = forward_real_host_as::<f32>(gpu, &p64.to_f32().view(), ChunkPrecision::Exact).unwrap();
    common::assert_outputs(&case.label(), &got.y, &got.h_final, &want, 1e-4, 1e-3);
    // Complex data refused by the real-gate convenience, naming the tensor.
    let complex = case.problem().to_f32();
    match forward_real_host_as::<f32>(gpu, &complex.view(), ChunkPrecision::Exact) {
        Err(GpuError::Input(InputError::Value { name: "log_gate", .. })) => {}
        other => panic!("expected a log_gate value error, got {other:?}"),
    }
}

#[test]
fn rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d: Dims = dims(1, 200, 1, 2, 3, true);
    let lp = plan(&d, Dtype::F32, Gates::Complex).unwrap();
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()));
    let gate = buf(2 * d.gate_len());
    let short = buf(d.qk_len() - 1);
    let (mut y, mut h_final) = (buf(d.v_len()), buf(2 * d.state_len()));
    let mut ws = buf(lp.workspace_len);
    let mut small_ws = buf(lp.workspace_len - 1);
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let exact = ChunkPrecision::Exact;
    let inputs = |q, g| DeviceInputs { q, k: &k, v: &v, log_gate: g, h0: None };
    let e = forward_into(
        gpu,
        s,
        &d,
        inputs(&short, &gate),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut ws),
        exact,
    );
    assert_eq!(name_of(e.unwrap_err()), "q");
    let e =
        forward_into(gpu, s, &d, inputs(&q, &gate), DeviceOutputs { y: &mut y, h_final: &mut h_final }, None, exact);
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    let e = forward_into(
        gpu,
        s,
        &d,
        inputs(&q, &gate),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut small_ws),
        exact,
    );
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    // The real-gate entry wants real (half-length) gates and states.
    let e = forward_real_into(
        gpu,
        s,
        &d,
        inputs(&q, &gate),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut ws),
        exact,
    );
    assert_eq!(name_of(e.unwrap_err()), "log_gate");
    let real_gate = buf(d.gate_len());
    let e = forward_real_into(
        gpu,
        s,
        &d,
        inputs(&q, &real_gate),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut ws),
        exact,
    );
    assert_eq!(name_of(e.unwrap_err()), "h_final");
    let big_k = dims(1, 10, 1, 257, 3, false);
    match plan(&big_k, Dtype::F32, Gates::Complex) {
        Err(InputError::Param { name: "key_dim", .. }) => {}
        other => panic!("{other:?}"),
    }
    forward_into(
        gpu,
        s,
        &d,
        inputs(&q, &gate),
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        Some(&mut ws),
        exact,
    )
    .unwrap();
    s.synchronize().unwrap();
}

#[test]
fn fast_bounds_are_the_documented_ones() {
    // No GPU needed: pins the numbers quoted in the module doc.
    let rel = |t| bounds(t, ChunkPrecision::Fast).0.0;
    assert!((rel(Dtype::F32) - 2.0e-3).abs() < 1e-4, "{}", rel(Dtype::F32));
    assert!((rel(Dtype::F16) - 2.5e-3).abs() < 1e-4, "{}", rel(Dtype::F16));
    assert!((rel(Dtype::Bf16) - 2.0e-2).abs() < 1e-3, "{}", rel(Dtype::Bf16));
    assert_eq!(bounds(Dtype::F32, ChunkPrecision::Exact), ((1e-4, 1e-3), (1e-4, 1e-3)));
}

/// The small case `bundle/run.sh` runs under compute-sanitizer memcheck and
/// racecheck: three chunks (the last partial), K = 40 (a partial key slab),
/// V = 70 (two value tiles, one partial), every dtype, complex gates exact
/// with h0 and real gates fast, per-channel and per-head gates; both carries
/// (the separate launches and state_seq).
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(1, 150, 2, 40, 70, false);
    let case = |d, seed| Case::new(d, GateRegime::Mixed, true, seed);
    check_in::<f32>(gpu, case(d, 33_000), Gates::Complex, ChunkPrecision::Exact, 1.0);
    check_in::<f16>(gpu, case(d, 33_001), Gates::Complex, ChunkPrecision::Exact, 1.0);
    check_in::<bf16>(gpu, case(d, 33_002), Gates::Real, ChunkPrecision::Fast, 1.0);
    let per_head = d.with_gate(gateloop::GateLayout::PerHead);
    check_in::<f32>(
        gpu,
        Case::new(per_head, GateRegime::Random, false, 33_003),
        Gates::Real,
        ChunkPrecision::Exact,
        1.0,
    );
    // The sequential carry's kernel (state_seq) under memcheck and racecheck too.
    check_carries::<f32>(gpu, case(d, 33_004), Gates::Complex, ChunkPrecision::Exact);
    check_carries::<bf16>(
        gpu,
        Case::new(per_head, GateRegime::Resets(0.05), true, 33_005),
        Gates::Real,
        ChunkPrecision::Exact,
    );
}
