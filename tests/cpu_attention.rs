//! The f32 tiled attention (`cpu::attention`, the mirror of
//! `cuda/attention.cu`) against the f64 recurrent reference on the same
//! f32-rounded inputs. Bounds: relative L2 ≤ 1e-4 and max-abs ≤ 1e-3·max|ref|,
//! for y and h_final.
//!
//! The exactness test at L = 65536 (4.3e9 pair evaluations) is `#[ignore]`d;
//! run it with
//!
//!     cargo test --release --test cpu_attention -- --ignored length_65536
//!
//! CI runs the same check at L = 16384.

mod common;
mod dtype_support;
mod emu_support;

use common::{ABS_FRAC, Case, REL, adversarial_regime_tests, assert_outputs, flat, regime_matrix, unflat};
use emu_support::read_f32_file as read_f32;
use gateloop::cpu::attention::{AttentionParams, forward, reduce_phase};
use gateloop::cuda::{Dtype, Element};
use gateloop::reference::{self, naive};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError, compare, compare_complex};

fn check_with(d: Dims, regime: GateRegime, with_h0: bool, seed: u64, params: AttentionParams) {
    check_within(Case::new(d, regime, with_h0, seed), params, REL, ABS_FRAC);
}

/// One case against the reference: rel-L2 ≤ `rel`, max-abs ≤ `abs_frac`·max|ref|.
fn check_within(case: Case, params: AttentionParams, rel: f64, abs_frac: f64) {
    let label = format!("{} {params:?}", case.label());
    let (p32, want) = case.with_reference();
    let got = forward(&p32.view(), &params).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_outputs(&label, &got.y, &got.h_final, &want, rel, abs_frac);
}

fn check(d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    check_with(d, regime, with_h0, seed, AttentionParams::default());
}

#[test]
fn shape_sweep() {
    common::shape_sweep(&[1, 2, 63, 64, 65, 1000], &[1, 5, 16, 64], &[1, 5, 16, 64], 0, |c| {
        check(c.dims, c.regime, c.with_h0, c.seed)
    });
}

#[test]
fn length_4096() {
    for (i, (key_dim, value_dim)) in [(1, 1), (5, 16), (64, 64)].into_iter().enumerate() {
        for per_head in [false, true] {
            let seed = 100 + 2 * i as u64 + per_head as u64;
            check(dims(1, 4096, 1, key_dim, value_dim, per_head), GateRegime::Random, i % 2 == 0, seed);
        }
    }
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let shapes = [(65, 16, 5), (1000, 5, 16), (300, 64, 64), (129, 1, 1)];
    regime_matrix(2, 2, &shapes, regime, seed, |c| check(c.dims, c.regime, c.with_h0, c.seed));
}

adversarial_regime_tests!(regime_cases);

/// Other tile lengths compute the same function: many tiles, partial last
/// tiles, resets on tile boundaries, the offset carried across many tiles.
#[test]
fn other_tile_lengths() {
    let mut seed = 6000;
    for tile_len in [1, 2, 3, 7, 16, 100] {
        for regime in [GateRegime::Random, GateRegime::Resets(0.1), GateRegime::UnitModulus, GateRegime::Mixed] {
            seed += 1;
            let per_head = seed % 2 == 0;
            check_with(dims(1, 211, 2, 3, 4, per_head), regime, true, seed, AttentionParams { tile_len });
        }
    }
}

/// Hard-decaying gates (`GateRegime::HardDecay(p)`: with probability p a step
/// has Re g ∈ [−103.9, −20], just above the reset threshold). The tile-local
/// prefix Re S then reaches thousands, where an f32 running sum's ulp is
/// ~2.4e-4; the diagonal tile's short differences S_n − S_m lost that much
/// before Re S was summed with TwoSum (hi + lo). Measured on the 36 cases of
/// `hard_decay_is_exact`: before, y rel-L2 5.1e-6 … 1.9e-5 and max-abs up to
/// 9.8e-5·max|ref|; after, y rel-L2 ≤ 1.9e-7 and max-abs ≤ 3.8e-7·max|ref|,
/// the level of the f32 recurrence and scan on the same problems (≤ 1.7e-7)
/// and below this path's level for Random gates on the same shapes (rel-L2
/// 2.4e-7 … 3.5e-7, max-abs ≤ 7.6e-7·max|ref|; 3.2e-7 … 4.1e-7 before).
/// h_final is unchanged (≤ 1.4e-7: it uses only the suffix sums and Δ).
/// Bounds: ~3× the Random level, 5× below the best case before.
const HARD_DECAY_REL: f64 = 1e-6;
const HARD_DECAY_ABS_FRAC: f64 = 2e-6;

#[test]
fn hard_decay_is_exact() {
    let mut seed = 9100;
    for p in [0.2, 0.5, 0.95] {
        for (len, key_dim, value_dim) in [(1000, 16, 16), (333, 5, 7), (130, 64, 64)] {
            for per_head in [false, true] {
                for with_h0 in [false, true] {
                    seed += 1;
                    let case = Case::new(
                        dims(1, len, 2, key_dim, value_dim, per_head),
                        GateRegime::HardDecay(p),
                        with_h0,
                        seed,
                    );
                    check_within(case, AttentionParams::default(), HARD_DECAY_REL, HARD_DECAY_ABS_FRAC);
                }
            }
        }
    }
}

/// The same with longer tiles (one tile of 211 steps: |Re S| up to ~1e4,
/// ulp ~1e-3) and tiny ones. Before the compensated prefix: y rel-L2 1.5e-6
/// (tile 7) … 4.3e-5 (tile 211), max-abs up to 1.1e-4·max|ref|; tile 1 has
/// no in-tile differences. After: ≤ 1.2e-7, ≤ 1.9e-7·max|ref|.
#[test]
fn hard_decay_other_tile_lengths() {
    let mut seed = 9200;
    for tile_len in [1, 7, 100, 211] {
        for p in [0.2, 0.95] {
            seed += 1;
            let case = Case::new(dims(1, 211, 2, 3, 4, seed % 2 == 0), GateRegime::HardDecay(p), true, seed);
            check_within(case, AttentionParams { tile_len }, HARD_DECAY_REL, HARD_DECAY_ABS_FRAC);
        }
    }
}

fn long_exactness(len: usize) {
    for (regime, seed) in [(GateRegime::UnitModulus, 7000), (GateRegime::LargePhase(50.0), 7001)] {
        for (key_dim, value_dim, per_head) in [(1, 1, false), (2, 2, false), (2, 2, true)] {
            check(dims(1, len, 1, key_dim, value_dim, per_head), regime, true, seed);
        }
    }
}

/// |a| = 1 and phases ≫ 2π over a long sequence: exact within f32
/// accumulation thanks to tile-local sums and the mod-2π offset carry.
#[test]
fn length_16384_exact() {
    long_exactness(16384);
}

#[test]
#[ignore = "O(L²) = 4.3e9 pair evaluations per case; run with --ignored (release)"]
fn length_65536_exact() {
    long_exactness(65536);
}

/// The naive cumprod form (the official notebook's) is NaN where the tiled
/// f32 attention is exact.
#[test]
fn naive_cumprod_is_nan_where_tiled_is_exact() {
    let p = random_problem(dims(1, 128, 1, 4, 4, false), GateRegime::StrongDecay(2.0), false, 21);
    let p32 = p.to_f32();
    let naive_y = naive::surrogate_attention_cumprod(&p32.view());
    assert!(naive_y.iter().any(|y| y.is_nan()), "expected the cumprod form to produce NaN in f32 at L = 128");
    let oracle = reference::recurrent::forward(&p.rounded_to_f32().view()).unwrap();
    let ours = forward(&p32.view(), &AttentionParams::default()).unwrap();
    assert!(ours.y.iter().all(|y| y.is_finite()));
    let e = compare(&ours.y, &oracle.y);
    assert!(e.within(1e-5, 1e-5), "tiled f32 attention: {e:?}");
}

#[test]
fn phase_reduction() {
    for x in [0.0f32, 1.0, -3.0, 3.2, 50.0, -50.0, 1000.0, 6.283_185_5] {
        let r = reduce_phase(x);
        assert!(r.abs() <= std::f32::consts::PI + 1e-6, "{x} -> {r}");
        let back = (x as f64 - r as f64) / std::f64::consts::TAU;
        assert!((back - back.round()).abs() < 1e-6, "{x} -> {r}");
    }
}

#[test]
fn validates_like_the_reference() {
    let d = dims(1, 10, 1, 2, 3, false);
    let mut p = random_problem(d, GateRegime::Random, true, 1).to_f32();
    assert!(matches!(
        forward(&p.view(), &AttentionParams { tile_len: 0 }),
        Err(InputError::Param { name: "tile_len", .. })
    ));
    p.log_gate[3] = Complex::new(0.5, 0.0);
    assert!(matches!(forward(&p.view(), &AttentionParams::default()), Err(InputError::Value { name: "log_gate", .. })));
    p.log_gate[3] = Complex::new(-0.5, 0.0);
    p.q.pop();
    assert!(matches!(forward(&p.view(), &AttentionParams::default()), Err(InputError::Length { name: "q", .. })));
}

/// `gateloop fuzz` found this: gates whose exp underflows in f32 (Re g of
/// −700 to −1e4) were summed into the tile-local log gate, and the pairs
/// after them lost ~1e-4 of precision. They are resets now
/// (GATELOOP_RESET_LOG_GATE), in the kernel and in this mirror.
#[test]
fn underflowing_gates_are_resets() {
    for (i, (d, with_h0)) in [
        (dims(4, 329, 4, 7, 4, true), true),
        (dims(3, 488, 1, 1, 1, false), false),
        (dims(1, 352, 1, 8, 1, true), false),
        (dims(2, 130, 2, 33, 7, false), true),
    ]
    .into_iter()
    .enumerate()
    {
        check(d, GateRegime::Underflow, with_h0, 9000 + i as u64);
    }
}

// ---- the kernels themselves, on a CPU emulation of CUDA -------------------

/// The emulator binary: `GATELOOP_ATTENTION_EMU`, or built here with
/// `tests/kernel_emu/build.sh attention` when g++ is available; `None` (with
/// a notice) otherwise.
fn emulator() -> Option<std::path::PathBuf> {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    EMU.get_or_init(|| emu_support::kernel_emulator("attention", "GATELOOP_ATTENTION_EMU")).clone()
}

/// Runs the three attention kernels (`cuda/attention.cu`, launched as
/// `cuda::attention::forward_into` does, outputs and workspace NaN-poisoned)
/// on the emulator with q, k, v, y in `dtype` (q, k, v representable in it):
/// (y widened to f32, h_final).
fn run_emulated(
    emu: &std::path::Path,
    case: &Case,
    p: &gateloop::testing::OwnedProblem<f32>,
    dtype: Dtype,
) -> (Vec<f32>, Vec<Complex<f32>>) {
    let dir = emu_support::write_case(
        &format!("attention_{}_{dtype:?}", case.seed),
        p,
        &[dtype.abi().to_string()],
        false,
        &[],
    );
    let status = std::process::Command::new(emu).arg(&dir).status().unwrap();
    assert!(status.success(), "{}: emulator failed: {status}", case.label());
    let out = (read_f32(&dir.join("y.out")), unflat(&read_f32(&dir.join("h_final.out"))));
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

/// The CUDA kernels' own code, compiled for the CPU with every thread of a
/// block an OS thread (`tests/kernel_emu`), agrees with this mirror bit for
/// bit (same arithmetic in the same order, same libm; NaN-poisoned outputs
/// and workspace would show any element no kernel writes) and with the f64
/// reference: proves the kernels' indexing, shared-memory carving (the
/// diagonal's S, r and compensation slabs), barriers, early exit and the
/// workspace layout without a GPU. Several query tiles with a partial last
/// one, K over several slabs, V over two value tiles and several state
/// column tiles, both gate layouts, with and without h0, hard-decaying gates.
#[test]
fn kernel_emulation_matches_the_mirror() {
    let Some(emu) = emulator() else { return };
    let cases = [
        (Case::new(dims(1, 150, 2, 40, 70, false), GateRegime::Mixed, true, 950), REL, ABS_FRAC),
        (
            Case::new(dims(2, 130, 1, 5, 7, true), GateRegime::HardDecay(0.5), false, 951),
            HARD_DECAY_REL,
            HARD_DECAY_ABS_FRAC,
        ),
        (
            Case::new(dims(1, 200, 1, 17, 33, false), GateRegime::HardDecay(0.95), true, 952),
            HARD_DECAY_REL,
            HARD_DECAY_ABS_FRAC,
        ),
        (Case::new(dims(1, 260, 1, 3, 2, false), GateRegime::StrongDecay(40.0), true, 953), REL, ABS_FRAC),
        (Case::new(dims(1, 1, 1, 2, 3, true), GateRegime::Resets(0.05), true, 954), REL, ABS_FRAC),
    ];
    for (case, rel, abs_frac) in cases {
        let label = format!("{} (emulated kernels)", case.label());
        let (p32, want) = case.with_reference();
        let (y, h_final) = run_emulated(&emu, &case, &p32, Dtype::F32);
        let mirror = forward(&p32.view(), &AttentionParams::default()).unwrap();
        assert_outputs(&format!("{label} vs the mirror"), &y, &h_final, &mirror, 0.0, 0.0);
        assert_outputs(&label, &y, &h_final, &want, rel, abs_frac);
    }
}

/// The f16 and bf16 instantiations (`gateloop_attention_{prep_,,state_}{f16,bf16}`):
/// q, k, v rounded to the type (the f64 reference and the f32 kernel see
/// exactly those values). y within `dtype_support::y_bounds` and h_final
/// within the f32 bounds of the reference; and, since the kernels widen each
/// load to f32 and their arithmetic does not depend on the input type, y
/// equal bit for bit, element by element, to the emulated f32 kernel's y on
/// the same inputs rounded to the type, h_final (f32) to its h_final. Several
/// query tiles with a partial last one, V over two value tiles, both gate
/// layouts, h0 present and absent, hard-decaying gates, phases ≫ 2π.
#[test]
fn kernel_emulation_half_types() {
    let Some(emu) = emulator() else { return };
    let cases = [
        (dims(1, 150, 1, 40, 70, false), GateRegime::Mixed, true),
        (dims(2, 130, 1, 5, 7, true), GateRegime::HardDecay(0.5), false),
        (dims(1, 200, 1, 17, 33, true), GateRegime::LargePhase(50.0), true),
        (dims(1, 65, 1, 3, 2, false), GateRegime::Resets(0.05), false),
    ];
    fn all_cases<T: Element>(emu: &std::path::Path, cases: &[(Dims, GateRegime, bool)]) {
        let t = T::DTYPE;
        let abs_frac = |e: &gateloop::ErrorStats| e.max_abs / e.max_ref.max(f64::MIN_POSITIVE);
        let mut worst = [0f64; 4]; // y rel L2, y max-abs/max|ref|, h_final likewise
        for (i, &(d, regime, with_h0)) in cases.iter().enumerate() {
            let case = Case::new(d, regime, with_h0, 960 + 10 * i as u64 + t.abi() as u64);
            let label = format!("{t:?} {} (emulated kernels)", case.label());
            let p64 = dtype_support::rounded_to::<T>(&case.problem());
            let want = reference::recurrent::forward(&p64.view()).unwrap();
            let p32 = p64.to_f32();
            let (y, h_final) = run_emulated(emu, &case, &p32, t);
            let (ey, eh) = (compare(&y, &want.y), compare_complex(&h_final, &want.h_final));
            assert!(dtype_support::y_ok(t, &ey), "{label}: y {ey:?}, bounds {:?}", dtype_support::y_bounds(t));
            assert!(dtype_support::state_ok(&eh, 1.0), "{label}: h_final {eh:?}");
            for (w, x) in worst.iter_mut().zip([ey.rel_l2, abs_frac(&ey), eh.rel_l2, abs_frac(&eh)]) {
                *w = w.max(x);
            }
            let (y32, h32) = run_emulated(emu, &case, &p32, Dtype::F32);
            dtype_support::assert_is_rounded_f32::<T>(&label, &y, &y32);
            assert!(
                flat(&h_final).iter().map(|x| x.to_bits()).eq(flat(&h32).iter().map(|x| x.to_bits())),
                "{label}: h_final differs from the f32 kernel's {:?}",
                compare_complex(&h_final, &h32)
            );
        }
        let [yr, ya, hr, ha] = worst;
        println!(
            "worst, attention kernels {t:?} (emulated; y = the f32 kernel's rounded, bit for bit): \
             y rel L2 {yr:.2e}, max-abs/max|ref| {ya:.2e}; h_final rel L2 {hr:.2e}, max-abs/max|ref| {ha:.2e}"
        );
    }
    all_cases::<half::f16>(&emu, &cases);
    all_cases::<half::bf16>(&emu, &cases);
}

/// Racecheck without a GPU: the three attention launches (several query
/// tiles with a partial last one, K over several slabs, V over two value
/// tiles, f32 and bf16, h0 on and off, hard decay, resets, and gates without
/// resets so that every walk reaches h0) on the
/// ThreadSanitizer build of the emulator (tests/kernel_emu/build.sh,
/// `GATELOOP_EMU_SANITIZER=thread`): two threads of a block touching one
/// word with no barrier between them, one writing, fail the run (exit 66)
/// as compute-sanitizer's racecheck would on a GPU. The f32 results must
/// still equal the mirror's bit for bit, the bf16 y the mirror's rounded.
#[test]
fn kernel_emulation_is_race_free() {
    use std::sync::OnceLock;
    static EMU: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(emu) = EMU.get_or_init(|| emu_support::race_checking_emulator("attention")).clone() else { return };
    let cases = [
        (Case::new(dims(1, 150, 2, 40, 70, false), GateRegime::Mixed, true, 990), Dtype::F32),
        (Case::new(dims(2, 130, 1, 5, 7, true), GateRegime::HardDecay(0.5), false, 991), Dtype::F32),
        (Case::new(dims(1, 200, 1, 17, 33, true), GateRegime::Resets(0.05), true, 992), Dtype::Bf16),
        // No reset: every walk reaches the start, so h0's terms are read.
        (Case::new(dims(1, 200, 1, 17, 33, true), GateRegime::LargePhase(50.0), true, 993), Dtype::Bf16),
        (Case::new(dims(1, 130, 1, 40, 70, false), GateRegime::UnitModulus, true, 994), Dtype::F32),
    ];
    for (case, t) in cases {
        let label = format!("{} {t:?} (race-checked emulated kernels)", case.label());
        let p = if t == Dtype::Bf16 {
            dtype_support::rounded_to::<half::bf16>(&case.problem())
        } else {
            case.problem().rounded_to_f32()
        }
        .to_f32();
        let (y, h_final) = run_emulated(&emu, &case, &p, t);
        let mirror = forward(&p.view(), &AttentionParams::default()).unwrap();
        if t == Dtype::F32 {
            assert_outputs(&format!("{label} vs the mirror"), &y, &h_final, &mirror, 0.0, 0.0);
        } else {
            dtype_support::assert_is_rounded_f32::<half::bf16>(&label, &y, &mirror.y);
            assert!(
                flat(&h_final).iter().map(|x| x.to_bits()).eq(flat(&mirror.h_final).iter().map(|x| x.to_bits())),
                "{label}: h_final"
            );
        }
    }
}
