//! `gateloop run` reproduces, in every CPU mode, the outputs of an independent
//! implementation: the official formulation (jax.lax.associative_scan over
//! materialized kᵀv) in float64, stored in tests/fixtures by
//! tests/fixtures/make_jax_fixtures.py. f64 runs must agree to 1e-10, f32
//! runs to 1e-4 (relative L2), on L = 1000 with resets and ±50 rad phases,
//! a per-head gate, and L = K = V = 1.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use gateloop::io::{self, TensorF64};
use gateloop::{Complex, Dims, GateLayout, Problem, compare};

const FIXTURES: [&str; 3] = ["jax_l1000_resets_phase50", "jax_l257_per_head_gate", "jax_l1_k1_v1"];

fn fixture(name: &str) -> BTreeMap<String, TensorF64> {
    io::read_tensors_f64(format!("{}/tests/fixtures/{name}.safetensors", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn complex(x: &[f64]) -> Vec<Complex<f64>> {
    x.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateloop-jax-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `gateloop run` and returns (y, h_final as interleaved reals).
fn run_cli(input: &PathBuf, mode: &str, tag: &str) -> (Vec<f64>, Vec<f64>) {
    let output = scratch(&format!("{tag}-{mode}.out.safetensors"));
    let r = Command::new(env!("CARGO_BIN_EXE_gateloop"))
        .args(["run", "--mode", mode, "--device", "cpu", "--input"])
        .arg(input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(r.status.success(), "gateloop run --mode {mode} failed: {}", String::from_utf8_lossy(&r.stderr));
    let mut out = io::read_tensors_f64(&output).unwrap();
    (out.remove("y").unwrap().data, out.remove("h_final").unwrap().data)
}

#[test]
fn cli_reproduces_jax_float64_associative_scan() {
    for name in FIXTURES {
        let t = fixture(name);
        let (qs, vs, gs) = (&t["q"].shape, &t["v"].shape, &t["log_gate"].shape);
        let per_head = gs[3] == 1 && qs[3] != 1;
        let dims = Dims::new(qs[0], qs[1], qs[2], qs[3], vs[3]).with_gate(if per_head {
            GateLayout::PerHead
        } else {
            GateLayout::PerChannel
        });
        let gate = complex(&t["log_gate"].data);
        let h0 = t.get("h0").map(|h| complex(&h.data));
        let p = Problem::new(dims, &t["q"].data, &t["k"].data, &t["v"].data, &gate, h0.as_deref()).unwrap();
        let (ey, eh) = (&t["expected_y"].data, &t["expected_h_final"].data);

        let in64 = scratch(&format!("{name}.f64.safetensors"));
        io::write_problem(&in64, &p).unwrap();
        for mode in ["recurrent", "scan", "attention"] {
            let (y, h) = run_cli(&in64, mode, &format!("{name}-f64"));
            let (ey_err, eh_err) = (compare(&y, ey), compare(&h, eh));
            assert!(
                ey_err.within(1e-10, 1e-10) && eh_err.within(1e-10, 1e-10),
                "{name} f64 {mode}: y {ey_err:?} h_final {eh_err:?}"
            );
        }

        let p32 = gateloop::testing::OwnedProblem {
            dims,
            q: p.q.to_vec(),
            k: p.k.to_vec(),
            v: p.v.to_vec(),
            log_gate: gate.clone(),
            h0: h0.clone(),
        }
        .to_f32();
        let in32 = scratch(&format!("{name}.f32.safetensors"));
        io::write_problem(&in32, &p32.view()).unwrap();
        for mode in ["recurrent", "scan", "attention", "chunked"] {
            let (y, h) = run_cli(&in32, mode, &format!("{name}-f32"));
            let (ey_err, eh_err) = (compare(&y, ey), compare(&h, eh));
            assert!(
                ey_err.within(1e-4, 1e-3) && eh_err.within(1e-4, 1e-3),
                "{name} f32 {mode}: y {ey_err:?} h_final {eh_err:?}"
            );
        }
    }
}
