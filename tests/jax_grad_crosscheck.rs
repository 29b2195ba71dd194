//! The f64 backward reproduces `jax.grad` through the official
//! associative-scan formulation (fixtures written by
//! tests/fixtures/make_jax_grad_fixtures.py) to ≤ 1e-9 relative, and the f32
//! backward (inputs rounded to f32) stays within 1e-4.

use std::path::PathBuf;

use gateloop::reference::grad::{self, Grads};
use gateloop::testing::OwnedProblem;
use gateloop::{Complex, Dims, ErrorStats, GateLayout, compare, compare_complex};
use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 4] =
    ["jax_grad_l300_resets_phase50", "jax_grad_l129_per_head_gate", "jax_grad_l200_no_h0", "jax_grad_l1_k1_v1"];

/// One fixture: the problem, the upstream gradients and JAX's gradients.
struct Fixture {
    problem: OwnedProblem<f64>,
    dy: Vec<f64>,
    dh_final: Vec<Complex<f64>>,
    expected: Grads<f64>,
}

struct Tensors<'a>(SafeTensors<'a>);

impl Tensors<'_> {
    fn has(&self, name: &str) -> bool {
        self.0.tensor(name).is_ok()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.0.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}")).shape().to_vec()
    }
    fn real(&self, name: &str) -> Vec<f64> {
        let t = self.0.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F64, "{name} must be float64");
        t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    }
    fn complex(&self, name: &str) -> Vec<Complex<f64>> {
        assert_eq!(self.shape(name).last(), Some(&2), "{name} must end in a dimension of 2");
        self.real(name).chunks_exact(2).map(|z| Complex::new(z[0], z[1])).collect()
    }
}

fn load(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = Tensors(SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let [b, l, h, k] = t.shape("q")[..] else { panic!("q must be 4-d") };
    let v = t.shape("v")[3];
    let gate = if t.shape("log_gate")[3] == 1 { GateLayout::PerHead } else { GateLayout::PerChannel };
    let dims = Dims::new(b, l, h, k, v).with_gate(gate);
    let with_h0 = t.has("h0");
    Fixture {
        problem: OwnedProblem {
            dims,
            q: t.real("q"),
            k: t.real("k"),
            v: t.real("v"),
            log_gate: t.complex("log_gate"),
            h0: with_h0.then(|| t.complex("h0")),
        },
        dy: t.real("dy"),
        dh_final: t.complex("dh_final"),
        expected: Grads {
            dq: t.real("expected_dq"),
            dk: t.real("expected_dk"),
            dv: t.real("expected_dv"),
            dlog_gate: t.complex("expected_dlog_gate"),
            dh0: with_h0.then(|| t.complex("expected_dh0")),
        },
    }
}

/// Errors of every gradient, by name.
fn errors<T: Copy + Into<f64>>(ours: &Grads<T>, expected: &Grads<f64>) -> Vec<(&'static str, ErrorStats)> {
    let mut e = vec![
        ("dq", compare(&ours.dq, &expected.dq)),
        ("dk", compare(&ours.dk, &expected.dk)),
        ("dv", compare(&ours.dv, &expected.dv)),
        ("dlog_gate", compare_complex(&ours.dlog_gate, &expected.dlog_gate)),
    ];
    match (&ours.dh0, &expected.dh0) {
        (Some(o), Some(x)) => e.push(("dh0", compare_complex(o, x))),
        (None, None) => {}
        _ => panic!("dh0 present in one of ours / JAX's only"),
    }
    e
}

fn check(name: &str, what: &str, errs: &[(&str, ErrorStats)], tol: f64) {
    for (g, e) in errs {
        println!("{name} {what} {g}: rel_l2 {:.2e}, max_abs {:.2e} (max |ref| {:.2e})", e.rel_l2, e.max_abs, e.max_ref);
        assert!(e.within(tol, tol), "{name} {what}: {g} {e:?} exceeds {tol:e}");
    }
}

#[test]
fn f64_backward_matches_jax_autodiff() {
    for name in FIXTURES {
        let f = load(name);
        let ours = grad::backward(&f.problem.view(), &f.dy, Some(&f.dh_final)).expect("backward");
        check(name, "f64 vs JAX", &errors(&ours, &f.expected), 1e-9);
    }
}

#[test]
fn f32_backward_within_1e_4() {
    for name in FIXTURES {
        let f = load(name);
        let p32 = f.problem.to_f32();
        let dy32: Vec<f32> = f.dy.iter().map(|&x| x as f32).collect();
        let dh32: Vec<Complex<f32>> = f.dh_final.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect();
        let ours = grad::backward(&p32.view(), &dy32, Some(&dh32)).expect("f32 backward");
        // Against the f64 backward of exactly the inputs the f32 run sees
        // (f32 arithmetic error alone) and against JAX on the unrounded inputs
        // (arithmetic plus input rounding).
        let rounded = f.problem.rounded_to_f32();
        let dy_r: Vec<f64> = dy32.iter().map(|&x| x.into()).collect();
        let dh_r: Vec<Complex<f64>> = dh32.iter().map(|z| Complex::new(z.re.into(), z.im.into())).collect();
        let oracle = grad::backward(&rounded.view(), &dy_r, Some(&dh_r)).expect("f64 backward");
        check(name, "f32 vs f64 (rounded inputs)", &errors(&ours, &oracle), 1e-4);
        check(name, "f32 vs JAX", &errors(&ours, &f.expected), 1e-4);
    }
}

#[test]
fn fixtures_have_resets_and_jax_gives_zero_there() {
    let f = load("jax_grad_l300_resets_phase50");
    let resets: Vec<usize> =
        (0..f.problem.log_gate.len()).filter(|&i| f.problem.log_gate[i].re == f64::NEG_INFINITY).collect();
    assert!(!resets.is_empty());
    let ours = grad::backward(&f.problem.view(), &f.dy, Some(&f.dh_final)).expect("backward");
    for i in resets {
        assert_eq!(f.expected.dlog_gate[i], Complex::new(0.0, 0.0));
        assert_eq!(ours.dlog_gate[i], Complex::new(0.0, 0.0));
    }
}
