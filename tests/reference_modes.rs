//! The three f64 reference modes compute the same function.

mod common;

use gateloop::reference::{self, RefMode, naive};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Dims, compare, compare_complex};

fn agree(d: Dims, regime: GateRegime, with_h0: bool, seed: u64, modes: &[RefMode]) {
    let p = random_problem(d, regime, with_h0, seed);
    let oracle = reference::recurrent::forward(&p.view()).unwrap();
    for &mode in modes {
        let out = reference::forward(mode, &p.view()).unwrap();
        let ey = compare(&out.y, &oracle.y);
        let eh = compare_complex(&out.h_final, &oracle.h_final);
        assert!(
            ey.within(1e-10, 1e-10) && eh.within(1e-10, 1e-10),
            "{mode:?} vs recurrent, {d:?} {regime:?} h0={with_h0}: y {ey:?}, h_final {eh:?}"
        );
    }
}

const ALL: [RefMode; 2] = [RefMode::Scan, RefMode::Attention];

#[test]
fn modes_agree_on_random_gates_over_lengths() {
    for (i, len) in [1usize, 2, 3, 17, 64, 65, 127, 1000].into_iter().enumerate() {
        agree(dims(2, len, 2, 5, 3, false), GateRegime::Random, i % 2 == 0, 100 + i as u64, &ALL);
    }
}

#[test]
fn modes_agree_with_adversarial_gates() {
    for (i, regime) in common::ADVERSARIAL_REGIMES.into_iter().enumerate() {
        for with_h0 in [false, true] {
            agree(dims(1, 300, 2, 4, 6, false), regime, with_h0, 7 * i as u64 + with_h0 as u64, &ALL);
            agree(dims(1, 129, 1, 3, 2, true), regime, with_h0, 1000 + i as u64, &ALL);
        }
    }
}

#[test]
fn modes_agree_with_max_heads_k_v_1() {
    agree(dims(3, 500, 4, 1, 1, false), GateRegime::Mixed, true, 5, &ALL);
}

#[test]
fn modes_agree_at_length_4096() {
    agree(dims(1, 4096, 1, 2, 2, false), GateRegime::Mixed, true, 11, &ALL);
    agree(dims(1, 4096, 2, 3, 2, false), GateRegime::LargePhase(50.0), false, 12, &ALL);
}

#[test]
fn scan_agrees_at_length_65536_unit_modulus() {
    agree(dims(1, 65536, 1, 2, 2, false), GateRegime::UnitModulus, true, 13, &[RefMode::Scan]);
}

/// The official notebook's cumprod form underflows and returns NaN where the
/// anchored form is exact.
#[test]
fn naive_cumprod_form_fails_where_anchored_form_is_exact() {
    // |a| ≈ e^{-0.15} on average: Π a underflows f32 (1e-45) after ≈ 700 steps,
    // and |a| = e^{-1} (the decay a trained model reaches) after ≈ 100.
    let p = random_problem(dims(1, 128, 1, 4, 4, false), GateRegime::StrongDecay(2.0), false, 21);
    let p32 = p.to_f32();
    let naive_y = naive::surrogate_attention_cumprod(&p32.view());
    assert!(naive_y.iter().any(|y| y.is_nan()), "expected the cumprod form to produce NaN in f32 at L = 128");
    let oracle = reference::recurrent::forward(&p.rounded_to_f32().view()).unwrap();
    let ours = reference::attention::forward(&p32.view()).unwrap();
    let e = compare(&ours.y, &oracle.y);
    assert!(e.within(1e-5, 1e-5), "anchored f32 attention: {e:?}");
    // In f64 the same failure arrives later, at L ≈ 1000.
    let p = random_problem(dims(1, 1500, 1, 2, 2, false), GateRegime::StrongDecay(2.0), false, 22);
    assert!(naive::surrogate_attention_cumprod(&p.view()).iter().any(|y| y.is_nan()));
    let e = compare(
        &reference::attention::forward(&p.view()).unwrap().y,
        &reference::recurrent::forward(&p.view()).unwrap().y,
    );
    assert!(e.within(1e-12, 1e-12), "anchored f64 attention: {e:?}");
}
