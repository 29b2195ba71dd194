//! Shrunk cases found by `gateloop fuzz`, kept as regression tests.

use gateloop::fuzz::{Oracle, Precision, tolerance};
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
    let oracle = Oracle::new(&p, Precision::F32).unwrap();
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
    let oracle = Oracle::new(&p64, Precision::F64).unwrap();
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
    use gateloop::cpu::chunked::{ChunkParams, forward};
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
    let oracle = Oracle::new(&p, Precision::F32).unwrap();
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
    let oracle = Oracle::new(&p, Precision::F32).unwrap();
    let floor = underflow_floor(Precision::F32, &p.dims);
    let out = widen(gateloop::reference::recurrent::forward(&p.to_f32().view()).unwrap());
    assert!(oracle.judge_with_floor(&out, 1e-4, floor).pass());
    // An error of a few spacings more than the floor allows still fails.
    let mut off = out.clone();
    off.y[0] += 100.0 * floor;
    assert!(!oracle.judge_with_floor(&off, 1e-4, floor).pass());
}

/// The gradient campaign's verdict on the f32 backward of `mode` (chunked:
/// the chunked backward; recurrent: the adjoint recurrence in f32) for a
/// shrunk case, with the documented bound and floor.
fn grad_verdict(
    mode: gateloop::Mode,
    p: &OwnedProblem<f64>,
    up: &gateloop::io::Upstream<f64>,
) -> gateloop::fuzz::Verdict {
    use gateloop::fuzz::{GradOracle, grad_underflow_floor, upstream_to_f32, widen_grads};
    let oracle = GradOracle::new(p, up, Precision::F32).unwrap();
    let up32 = upstream_to_f32(up);
    let g = gateloop::dispatch::cpu_grad_f32(mode, &p.to_f32().view(), &up32.dy, up32.dh_final.as_deref()).unwrap();
    oracle.judge_with_floor(
        &widen_grads(&g),
        tolerance(Precision::F32, p.dims.len),
        grad_underflow_floor(Precision::F32, &p.dims),
    )
}

/// Gradient campaign seed 2026, case 8386 (`gateloop fuzz --targets grad
/// --seed 2026 --first-case 8386 --cases 1 --max-len 64 --modes chunked
/// --dtypes f32`; B=1 L=2 H=1 K=7 V=1, per-head, Underflow), shrunk to
/// K = 1: the gate of step 1 is e^{−93} ≈ 4e-41, a subnormal f32, and
/// dlog_gate_1 = conj(a_1 h_0)·δ_1 ≈ (1.13e-41, 1.90e-41).
fn subnormal_gate_case() -> (OwnedProblem<f64>, gateloop::io::Upstream<f64>) {
    let p = OwnedProblem {
        dims: Dims::new(1, 2, 1, 1, 1).with_gate(gateloop::GateLayout::PerHead),
        q: vec![-122.0625, -405.273865],
        k: vec![6.00636673, -6.44158649],
        v: vec![-0.0572236292, 0.0804001689],
        log_gate: vec![Complex::new(-102.340927, -1.6942817), Complex::new(-93.0165863, -1.03180194)],
        h0: None,
    }
    .rounded_to_f32();
    let up = gateloop::io::Upstream {
        dy: [0.00282699941f64, 0.00395555096].map(|x| f64::from(x as f32)).to_vec(),
        dh_final: None,
    };
    (p, up)
}

/// On the case of [`chunked_grad_subnormal_gate_dlog_gate`] every gradient
/// of the chunked f32 backward is exact to f32 rounding, dlog_gate included
/// (it was 6% off, 1.4e-42 absolute, before the gate terms applied the
/// modulus last), and the f32 adjoint recurrence passes too.
#[test]
fn chunked_grad_subnormal_gate_is_accurate_in_every_gradient() {
    let (p, up) = subnormal_gate_case();
    let recurrent = grad_verdict(gateloop::Mode::Recurrent, &p, &up);
    assert!(recurrent.pass(), "{recurrent:?}");
    let v = grad_verdict(gateloop::Mode::Chunked, &p, &up);
    for name in ["dq", "dk", "dv", "dlog_gate"] {
        assert!(v.tensor(name).unwrap().score() < 1e-6, "{name}: {v:?}");
    }
    let s = v.tensor("dlog_gate").unwrap();
    let smallest_normal = f64::from(f32::MIN_POSITIVE);
    assert!(s.norm_ref < smallest_normal && s.norm_r < smallest_normal, "{s:?}");
}

/// FIXED disagreement (found by the gradient campaign, seed 2026 case 8386):
/// on the case above the chunked f32 backward's dlog_gate_1 was 6% off
/// (score 1.2e-4 > tol 1e-4; unshrunk, K = 7: 1.34e-4, max-abs 1.9e-4·N):
/// the diagonal pair's weight s_nm·|E(n, m)| (dy_1·v_0 ≈ 2.3e-4 times
/// 4e-41: ~7 subnormal spacings, 3 bits) was rounded before k_m and q_n
/// (≈ 6 and −405) scaled it up. The backward now forms every gate term with
/// the modulus last (`cpu::chunked_grad::gate_term`: (s_nm q_n k_m)·|E(n, m)|
/// for the diagonal pairs, (q_n·(s k̃)_n)·|E(n, r)| and (k_m·(sᵀ q̃)_m)·|E(r, m)|
/// for the anchored blocks, (q_n·S_in dy_n)·|E(n, −1)| and
/// (k_m·conj(D v_m))·|E(last, m)| through the state; the CUDA grad_qk
/// likewise), so a subnormal modulus rounds the finished term once, like the
/// f32 adjoint recurrence that multiplies by the subnormal a last.
#[test]
fn chunked_grad_subnormal_gate_dlog_gate() {
    let (p, up) = subnormal_gate_case();
    let v = grad_verdict(gateloop::Mode::Chunked, &p, &up);
    assert!(v.pass(), "{v:?}");
}

/// The same fixed disagreement, as found by the gradient campaigns: every
/// case is a gate in f32's subnormal range (Re g ∈ (−103.3, −87.3)) whose
/// dlog_gate the chunked f32 backward computed with a relative error of 1e-3
/// (seed 7, case 43460: a = e^{−88.3} ≈ 4.6e-39, dlog_gate ≈ 6e-39, score
/// 5.8e-4, the worst) to 100% (seed 7, case 45905: a dlog_gate of 1e-42
/// returned as 0), dq, dk, dv exact to ~1e-7. With the modulus-last gate
/// terms all four score ≤ 6.6e-8.
#[test]
fn chunked_grad_subnormal_gate_campaign_cases() {
    use gateloop::fuzz::{FuzzConfig, Target, run_campaign};
    for (seed, case) in [(2026, 8386), (7, 43460), (7, 45905), (7, 69127)] {
        // Still the cases the campaigns found: the generator's later HardDecay
        // draw (made last) left them alone.
        let regime = gateloop::fuzz::draw_case(seed, case, 64).regime;
        assert!(!matches!(regime, gateloop::testing::GateRegime::HardDecay(_)), "seed {seed} case {case}: {regime:?}");
        let mut targets = [Target::cpu_grad(gateloop::Mode::Chunked, Precision::F32).unwrap()];
        let cfg = FuzzConfig { cases: 1, first_case: case, seed, max_len: 64, out_dir: None, ..Default::default() };
        let report = run_campaign(&cfg, &mut targets);
        assert!(report.passed(), "{}", report.render());
    }
}

/// FIXED disagreement (gradient campaign seed 2028, case 74927, `gateloop
/// fuzz --targets grad --modes chunked --dtypes f32 --seed 2028 --first-case
/// 74927 --cases 1 --max-len 256`): L = 2, a subnormal q_1 = 7.6e-39 (the
/// generator's subnormal sprinkle), k_0 = 3.4e-4, s_10 = dy_1·v_0 ≈ −5e3.
/// dlog_gate_1 = conj(q_1 E(1, 0) k_0 s_10) ≈ 1.3e-38 came out 4.3e-4 off
/// (relative to the bound's scale): the CPU backward's gate term formed
/// q_1 k_0 ≈ 2.6e-42 first — three significant digits in f32's subnormal
/// range — and s_10 scaled its rounding up. It now forms (s_10 q_1) k_0, as
/// the kernels do: 1.4e-7. The earlier campaigns' worst chunked case (seed
/// 7, 4.0e-5) was the same effect at a smaller amplification.
#[test]
fn chunked_grad_subnormal_q_times_small_k() {
    use gateloop::fuzz::{FuzzConfig, Target, run_campaign};
    let mut targets = [Target::cpu_grad(gateloop::Mode::Chunked, Precision::F32).unwrap()];
    let cfg = FuzzConfig { cases: 1, first_case: 74927, seed: 2028, max_len: 256, out_dir: None, ..Default::default() };
    let report = run_campaign(&cfg, &mut targets);
    assert!(report.passed(), "{}", report.render());
    let score = report.targets[0].worst_score;
    assert!(score < 1e-6, "score {score:e}");
}

/// On the cases of [`chunked_grad_subnormal_gate_campaign_cases`] the f32
/// adjoint recurrence passes the bound: it is attainable in f32.
#[test]
fn recurrent_f32_grad_passes_the_subnormal_gate_campaign_cases() {
    use gateloop::fuzz::{FuzzConfig, Target, run_campaign};
    for (seed, case) in [(2026, 8386), (7, 43460), (7, 45905), (7, 69127)] {
        let mut targets = [Target::cpu_grad(gateloop::Mode::Recurrent, Precision::F32).unwrap()];
        let cfg = FuzzConfig { cases: 1, first_case: case, seed, max_len: 64, out_dir: None, ..Default::default() };
        let report = run_campaign(&cfg, &mut targets);
        assert!(report.passed(), "{}", report.render());
    }
}

/// A sweep around the subnormal-gate cases: every gate with |a| in f32's
/// subnormal range (Re g drawn in [−103, −87.5], phases in (−π, π)), so the
/// whole dlog_gate is subnormal and judged at that scale, except one step
/// with |a| = 1 (Re g = 0, exact in the chunk-local cumulative log; with
/// Re g = −0.1 the difference G_n − G_{n−1} of cumulative logs ≈ −6000
/// carries an f32 error of ~5e-4, which alone scores ~1e-4 on dlog_gate,
/// before and after this fix alike) placed at the chunk start, inside and at the
/// end of a key sub-chunk (the off-diagonal anchor), at a chunk boundary or
/// in a later chunk (the S_in, D and through terms), or nowhere; q ≈ 1e3,
/// k ≈ 10, dy ≈ 1e-4 (so the bound's scale R of dlog_gate is ≈ N, the
/// smallest normal f32, while a subnormal rounded before q and k scale it
/// would be amplified ~1e4-fold); per-head and per-channel gates, with and without h0 and
/// dh_final: 136 cases. The chunked f32 backward passes the fuzzer's
/// gradient bound on every one (worst 3.6e-7); before the gate terms
/// applied the modulus last, 12 of them failed (dlog_gate up to 4.6e-4).
#[test]
fn chunked_grad_subnormal_gate_sweep() {
    use gateloop::testing::{GateRegime, dims, random_problem};
    let (mut worst, mut failed, mut cases) = ((0f64, String::new()), Vec::new(), 0);
    let mut seed = 9000;
    for len in [2, 17, 20, 70, 130] {
        for unit_at in [None, Some(0), Some(1), Some(14), Some(15), Some(16), Some(63), Some(64), Some(65), Some(100)] {
            if unit_at.is_some_and(|t| t >= len) {
                continue;
            }
            for per_head in [true, false] {
                for with_state in [false, true] {
                    seed += 1;
                    cases += 1;
                    let d = dims(1, len, 1, 4, 3, per_head);
                    let mut p = random_problem(d, GateRegime::Random, with_state, seed);
                    p.q.iter_mut().for_each(|x| *x *= 1e3);
                    p.k.iter_mut().for_each(|x| *x *= 10.0);
                    let gd = d.gate_dim();
                    for (i, g) in p.log_gate.iter_mut().enumerate() {
                        // Re g ∈ [−0.3, 0] from the regime, mapped onto [−103, −87.5].
                        g.re = if unit_at == Some(i / gd) { 0.0 } else { -87.5 + g.re * (15.5 / 0.3) };
                    }
                    let p = p.rounded_to_f32();
                    let up_src = random_problem(d, GateRegime::Random, true, seed + 50_000);
                    let up = gateloop::io::Upstream {
                        dy: up_src.v.iter().map(|&x| f64::from((1e-4 * x) as f32)).collect(),
                        dh_final: with_state.then(|| {
                            let h = up_src.h0.unwrap();
                            h.iter().map(|z| Complex::new(f64::from(z.re as f32), f64::from(z.im as f32))).collect()
                        }),
                    };
                    let v = grad_verdict(gateloop::Mode::Chunked, &p, &up);
                    let label = format!("L={len} unit_at={unit_at:?} per_head={per_head} state={with_state}");
                    if !v.pass() {
                        failed.push(format!("{label}: {}", v.describe()));
                    }
                    if v.score() > worst.0 {
                        worst = (v.score(), format!("{label}: {}", v.describe()));
                    }
                }
            }
        }
    }
    println!("{cases} cases, worst score {:.3e} ({})", worst.0, worst.1);
    assert!(failed.is_empty(), "{} of {cases} failed:\n{}", failed.len(), failed.join("\n"));
}

/// Seed 2027, case 26511 (the first campaign with `HardDecay` gates), as
/// shrunk: L = 1, y = q·(a·h0 + k·v) with a = e^{−101.1} ≈ 8 subnormal
/// spacings of f32 (3 significant bits), |h0| ≈ 4e5 and k·v ≈ −3e-37, so
/// y ≈ 4.5e-39 is a normal number that the f32 recurrence itself got 1.1e-3
/// wrong (score 1.1e-3 > 1e-4): the error of a, not of any summation order.
/// The forward oracle's magnitudes now raise each gate modulus to the
/// smallest normal number of the judged precision (as the gradient oracle's
/// do), and every f32 mode passes.
#[test]
fn subnormal_gate_times_large_state_is_judged_at_the_gates_resolution() {
    let p = OwnedProblem {
        dims: Dims::new(1, 1, 1, 1, 1),
        q: vec![-0.015841634944081306],
        k: vec![207.27349853515625],
        v: vec![-1.4037381249512066e-39],
        log_gate: vec![Complex::new(-101.11591339111328, 1.8276500701904297)],
        h0: Some(vec![Complex::new(20712.052734375, -390351.59375)]),
    }
    .rounded_to_f32();
    let a = (p.log_gate[0].re as f32).exp();
    assert!(a > 0.0 && a < f32::MIN_POSITIVE / 1e5, "a = {a}: a subnormal of a few bits");
    let oracle = Oracle::new(&p, Precision::F32).unwrap();
    let floor = gateloop::fuzz::underflow_floor(Precision::F32, &p.dims);
    for mode in [gateloop::Mode::Recurrent, gateloop::Mode::Scan, gateloop::Mode::Attention, gateloop::Mode::Chunked] {
        let out = widen(gateloop::dispatch::cpu_f32(mode, &p.to_f32().view()).unwrap());
        let j = oracle.judge_with_floor(&out, tolerance(Precision::F32, 1), floor);
        assert!(j.pass(), "{mode:?}: {j:?}");
    }
}

/// What a kernel that flushes subnormal operands computes: the f32
/// recurrence on the input with every |x| < 2^-126 in q, k, v, h0 set to 0.
fn flushing_recurrence(p: &OwnedProblem<f64>) -> Result<Outputs<f64>, String> {
    let flush = |x: &f64| if x.abs() < f64::from(f32::MIN_POSITIVE) { 0.0 } else { *x };
    let mut f = p.clone();
    for xs in [&mut f.q, &mut f.k, &mut f.v] {
        xs.iter_mut().for_each(|x| *x = flush(x));
    }
    if let Some(h) = f.h0.as_mut() {
        h.iter_mut().for_each(|z| *z = Complex::new(flush(&z.re), flush(&z.im)));
    }
    gateloop::reference::recurrent::forward(&f.to_f32().view()).map(widen).map_err(|e| e.to_string())
}

/// Seed 2033, case 453 (emulated CUDA, 2026-12-03), shrunk to L = 1 with a
/// reset gate: h_final = k·v and y = q·k·v with v = 5.4e-39, a subnormal
/// f32, which the chunked kernels' tensor cores read as 0 (h_final and y
/// came out 0: 100% off). Tensor-core targets (CUDA chunked) may flush
/// subnormal inputs: such a target passes where the oracle of the input with
/// them set to 0 accepts it, and only there; CPU targets are judged on the
/// input as given.
#[test]
fn tensor_core_targets_may_read_subnormal_inputs_as_zero() {
    use gateloop::Mode;
    use gateloop::fuzz::{self, Device, FuzzConfig, Target};
    let cfg = FuzzConfig { cases: 1, first_case: 453, seed: 2033, max_len: 600, out_dir: None, ..Default::default() };
    let case = fuzz::draw_case(2033, 453, 600);
    assert!(case.subnormals, "{case}");
    let run = |device: Device| {
        let t = Target::custom("flushing-chunked", Mode::Chunked, Precision::F32, device, flushing_recurrence);
        assert_eq!(t.flushes_subnormal_inputs(), device == Device::Cuda);
        fuzz::run_campaign(&cfg, &mut [t])
    };
    let cuda = run(Device::Cuda);
    assert!(cuda.passed(), "{}", cuda.render());
    // Counted and said: a pass under the allowance is not a silent one.
    assert_eq!(cuda.targets[0].flushed, 1);
    assert!(cuda.render().contains("passed only with subnormal inputs read as 0"), "{}", cuda.render());
    let cpu = run(Device::Cpu);
    assert_eq!(cpu.failures.len(), 1, "{}", cpu.render());
    // The allowance is the flush alone: a flushing target that is otherwise
    // wrong (y scaled by 1 + 1e-3) still fails on the CUDA side.
    let wrong = move |p: &OwnedProblem<f64>| {
        flushing_recurrence(p).map(|mut o| {
            o.y.iter_mut().for_each(|y| *y *= 1.001);
            o
        })
    };
    let t = Target::custom("wrong-flushing-chunked", Mode::Chunked, Precision::F32, Device::Cuda, wrong);
    assert_eq!(fuzz::run_campaign(&cfg, &mut [t]).failures.len(), 1);
}

/// The shrinker judges its candidates as the campaign judged the case: for a
/// tensor-core target, with the subnormal-input allowance. Judged without
/// it, a target that is wrong only from L = 6 on (here: y scaled by
/// 1 + 1e-3) shrank case 453 (L = 11) past its failing L = 6 half to a
/// piece whose only "failure" was the flush of its subnormal v, which the
/// final judgement (with the allowance) then passed: the report said
/// "passes when re-run (nondeterministic?)" and wrote no replay files for a
/// real disagreement.
#[test]
fn the_shrinker_keeps_the_subnormal_allowance() {
    use gateloop::Mode;
    use gateloop::fuzz::{self, Device, FuzzConfig, Target};
    let wrong_from_six_steps = |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        let mut out = flushing_recurrence(p)?;
        if p.dims.len >= 6 {
            out.y.iter_mut().for_each(|y| *y *= 1.001);
        }
        Ok(out)
    };
    let cfg = FuzzConfig { cases: 1, first_case: 453, seed: 2033, max_len: 600, out_dir: None, ..Default::default() };
    let t = Target::custom("wrong-flushing-chunked", Mode::Chunked, Precision::F32, Device::Cuda, wrong_from_six_steps);
    let report = fuzz::run_campaign(&cfg, &mut [t]);
    assert_eq!(report.failures.len(), 1, "{}", report.render());
    let f = &report.failures[0];
    assert!(!f.shrunk_why.contains("passes when re-run"), "{}", report.render());
    assert!(f.shrunk_dims.len >= 6, "shrunk to {:?}: {}", f.shrunk_dims, report.render());
}
