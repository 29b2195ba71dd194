//! Shrunk cases found by `gateloop fuzz`, kept as regression tests.

use gateloop::fuzz::{tolerance, Oracle, Precision};
use gateloop::reference::attention;
use gateloop::testing::OwnedProblem;
use gateloop::{Complex, Dims, Outputs};

fn widen(o: Outputs<f32>) -> Outputs<f64> {
    Outputs {
        y: o.y.iter().map(|&x| f64::from(x)).collect(),
        h_final: o.h_final.iter().map(|z| Complex::new(f64::from(z.re), f64::from(z.im))).collect(),
    }
}

fn f32_attention_passes(p: OwnedProblem<f64>) {
    let p = p.rounded_to_f32();
    let oracle = Oracle::new(&p).unwrap();
    let out = widen(attention::forward(&p.to_f32().view()).unwrap());
    let j = oracle.judge(&out, tolerance(Precision::F32, p.dims.len));
    assert!(j.pass(), "{j:?}");
}

/// Seed 0, case 1: gates with Re g ≈ −3541, −8123, −7228 (exp underflows to
/// 0, so the recurrence resets) were summed into the cumulative log gate;
/// |G| ≈ 1.9e4 left G_3 − G_2 ≈ −0.06 with an f32 error of ~1e-3.
#[test]
fn underflowing_gates_are_resets_in_attention() {
    let p = OwnedProblem {
        dims: Dims::new(1, 4, 1, 1, 1),
        q: vec![-2.0345609, -2.9964736, -1.9883827, 2.756032],
        k: vec![0.057598468, -0.042000175, 0.018773189, 0.00020308443],
        v: vec![-0.0021062442, 0.025749996, -0.03087455, -0.014416175],
        log_gate: vec![
            Complex::new(-3541.5476, -2.8749232),
            Complex::new(-8123.6567, 2.2171555),
            Complex::new(-7228.8623, 0.69221795),
            Complex::new(-0.05966992, -0.9353064),
        ],
        h0: None,
    };
    f32_attention_passes(p.clone());
    // And in f64, with gates that underflow there (Re < −745).
    let mut p64 = p;
    p64.log_gate.iter_mut().take(3).for_each(|g| g.re *= 3.0);
    let oracle = Oracle::new(&p64).unwrap();
    let j = oracle.judge(&attention::forward(&p64.view()).unwrap(), 1e-10);
    assert!(j.pass(), "{j:?}");
}

/// Seed 0, cases 5, 86, 221, 278: phases of 400–900 rad per step, summed in
/// f32 over a few dozen steps, lost ~1e-4 rad (score up to 3.6e-4).
#[test]
fn large_phases_are_reduced_in_f32_attention() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let l = 64;
    let p = OwnedProblem {
        dims: Dims::new(1, l, 1, 1, 1),
        q: (0..l).map(|_| rng.random_range(-1.0..1.0)).collect(),
        k: (0..l).map(|_| rng.random_range(-1.0..1.0)).collect(),
        v: (0..l).map(|_| rng.random_range(-1.0..1.0)).collect(),
        log_gate: (0..l).map(|_| Complex::new(-rng.random_range(0.0..0.3), rng.random_range(-900.0..900.0))).collect(),
        h0: Some(vec![Complex::new(0.5, -0.25)]),
    };
    f32_attention_passes(p);
}

/// Seed 2026, case 39080 (the 1M-case campaign), shrunk to L = 2: a gate of
/// e^{−90.45} (a subnormal in f32) applied to a state of ≈ −165 contributes
/// ≈ 8e-38 to an h_final of 7e-37. The chunked path's exp flushed e^{x < −87}
/// to 0 and lost 10% of h_final; it now returns the subnormal, like f32's exp.
#[test]
fn chunked_keeps_subnormal_gates() {
    use gateloop::cpu::chunked::{forward, ChunkParams};
    use gateloop::fuzz::underflow_floor;
    let p = OwnedProblem {
        dims: Dims::new(1, 2, 1, 1, 1),
        q: vec![-0.5727, 0.6971],
        k: vec![45.6435, 84.503],
        v: vec![-3.6277, 9.5726e-39],
        log_gate: vec![Complex::new(-2082.9, -0.44727), Complex::new(-90.449, -0.39420)],
        h0: None,
    }
    .rounded_to_f32();
    let oracle = Oracle::new(&p).unwrap();
    let out = widen(forward(&p.to_f32().view(), &ChunkParams::default()).unwrap());
    let j = oracle.judge_with_floor(&out, tolerance(Precision::F32, 2), underflow_floor(Precision::F32, &p.dims));
    assert!(j.pass(), "{j:?}");
}

/// Seed 2026, case 15232: y and h_final of ≈ 1e-42 (k·v with v = 5e-39)
/// are subnormal in f32 and carry an absolute error of one subnormal spacing
/// in any f32 implementation; the underflow floor of the bound accepts that,
/// and only that.
#[test]
fn subnormal_outputs_are_judged_with_the_underflow_floor() {
    use gateloop::fuzz::underflow_floor;
    let p = OwnedProblem {
        dims: Dims::new(1, 1, 1, 1, 1),
        q: vec![-1.7225003],
        k: vec![0.00018651],
        v: vec![-5.053854e-39],
        log_gate: vec![Complex::new(-1538.823, -1.7328155)],
        h0: None,
    }
    .rounded_to_f32();
    let oracle = Oracle::new(&p).unwrap();
    let floor = underflow_floor(Precision::F32, &p.dims);
    let out = widen(gateloop::reference::recurrent::forward(&p.to_f32().view()).unwrap());
    assert!(oracle.judge_with_floor(&out, 1e-4, floor).pass());
    // An error of a few spacings more than the floor allows still fails.
    let mut off = out.clone();
    off.y[0] += 100.0 * floor;
    assert!(!oracle.judge_with_floor(&off, 1e-4, floor).pass());
}
