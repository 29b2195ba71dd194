//! `gateloop grad` reproduces gradients computed independently: JAX autodiff
//! through the official associative-scan formulation in float64
//! (tests/fixtures/jax_grad_*.safetensors, made by
//! tests/fixtures/make_jax_grad_fixtures.py), to ≤ 1e-9 relative in f64 and
//! ≤ 1e-4 in f32, in every CPU mode (`--mode chunked` on f32 input is the
//! chunked f32 backward, bit for bit); and bad grad inputs are typed errors.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use gateloop::cpu::chunked::ChunkParams;
use gateloop::cpu::chunked_grad;
use gateloop::io::{self, TensorF64};
use gateloop::reference::grad::GradInputs;
use gateloop::testing::OwnedProblem;
use gateloop::{Complex, Dims, GateLayout, compare};

const FIXTURES: [&str; 4] =
    ["jax_grad_l300_resets_phase50", "jax_grad_l129_per_head_gate", "jax_grad_l200_no_h0", "jax_grad_l1_k1_v1"];

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateloop-cli-grad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn complex(x: &[f64]) -> Vec<Complex<f64>> {
    x.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect()
}

fn gateloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gateloop")).args(args).output().unwrap()
}

/// The forward problem, dy and dh_final of a fixture.
fn load(t: &BTreeMap<String, TensorF64>) -> (OwnedProblem<f64>, Vec<f64>, Option<Vec<Complex<f64>>>) {
    let (qs, vs, gs) = (&t["q"].shape, &t["v"].shape, &t["log_gate"].shape);
    let per_head = gs[3] == 1 && qs[3] != 1;
    let dims = Dims::new(qs[0], qs[1], qs[2], qs[3], vs[3]).with_gate(if per_head {
        GateLayout::PerHead
    } else {
        GateLayout::PerChannel
    });
    let p = OwnedProblem {
        dims,
        q: t["q"].data.clone(),
        k: t["k"].data.clone(),
        v: t["v"].data.clone(),
        log_gate: complex(&t["log_gate"].data),
        h0: t.get("h0").map(|h| complex(&h.data)),
    };
    (p, t["dy"].data.clone(), t.get("dh_final").map(|h| complex(&h.data)))
}

#[test]
fn grad_reproduces_jax_autodiff_float64_in_every_mode() {
    for name in FIXTURES {
        let t =
            io::read_tensors_f64(format!("{}/tests/fixtures/{name}.safetensors", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let (p, dy, dh_final) = load(&t);
        let in64 = scratch(&format!("{name}.f64.safetensors"));
        io::write_grad_problem(&in64, &p.view(), &GradInputs { dy: &dy, dh_final: dh_final.as_deref() }).unwrap();
        let p32 = p.to_f32();
        let dy32: Vec<f32> = dy.iter().map(|&x| x as f32).collect();
        let dh32: Option<Vec<Complex<f32>>> =
            dh_final.as_ref().map(|h| h.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
        let in32 = scratch(&format!("{name}.f32.safetensors"));
        io::write_grad_problem(&in32, &p32.view(), &GradInputs { dy: &dy32, dh_final: dh32.as_deref() }).unwrap();

        for (input, precision, bound, modes) in [
            (&in64, "f64", 1e-9, &["recurrent", "scan", "attention"][..]),
            (&in32, "f32", 1e-4, &["recurrent", "scan", "attention", "chunked"][..]),
        ] {
            for mode in modes {
                let out = scratch(&format!("{name}.{precision}.{mode}.grads.safetensors"));
                let o = gateloop(&["grad", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--mode", mode]);
                assert!(o.status.success(), "{name} {precision} {mode}: {}", String::from_utf8_lossy(&o.stderr));
                let got = io::read_tensors_f64(&out).unwrap();
                for g in ["dq", "dk", "dv", "dlog_gate", "dh0"] {
                    let want = t.get(&format!("expected_{g}"));
                    assert_eq!(got.contains_key(g), want.is_some(), "{name} {precision}: `{g}` present iff expected");
                    if let Some(want) = want {
                        assert_eq!(got[g].shape, want.shape, "{name} {g} shape");
                        let e = compare(&got[g].data, &want.data);
                        assert!(e.rel_l2 <= bound, "{name} {precision} {mode}: {g} {e:?} (bound {bound:e})");
                    }
                }
                if *mode == "chunked" {
                    // `--mode chunked` on f32 runs the chunked backward itself.
                    let ours =
                        chunked_grad::backward(&p32.view(), &dy32, dh32.as_deref(), &ChunkParams::default()).unwrap();
                    let real = |x: &[f32]| -> Vec<f64> { x.iter().map(|&x| x as f64).collect() };
                    let flat = |z: &[Complex<f32>]| -> Vec<f64> {
                        z.iter().flat_map(|z| [z.re as f64, z.im as f64]).collect()
                    };
                    assert_eq!(got["dq"].data, real(&ours.dq), "{name}: chunked dq");
                    assert_eq!(got["dk"].data, real(&ours.dk), "{name}: chunked dk");
                    assert_eq!(got["dv"].data, real(&ours.dv), "{name}: chunked dv");
                    assert_eq!(got["dlog_gate"].data, flat(&ours.dlog_gate), "{name}: chunked dlog_gate");
                }
            }
        }
    }
}

#[test]
fn grad_input_errors_name_the_tensor() {
    let t =
        io::read_tensors_f64(format!("{}/tests/fixtures/jax_grad_l200_no_h0.safetensors", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let (p, dy, _) = load(&t);
    let out = scratch("err.grads.safetensors");

    // A plain `run` input has no `dy`.
    let plain = scratch("plain.safetensors");
    io::write_problem(&plain, &p.view()).unwrap();
    let o = gateloop(&["grad", "-i", plain.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`dy`"), "{}", String::from_utf8_lossy(&o.stderr));

    // dy with the wrong V: written by hand (the crate's writer only writes
    // consistent files); the reader must name `dy` and V.
    let narrow: Vec<u8> =
        dy.chunks(p.dims.value_dim).flat_map(|c| c[..c.len() - 1].to_vec()).flat_map(f64::to_le_bytes).collect();
    let plain_bytes = std::fs::read(&plain).unwrap();
    let st = safetensors::SafeTensors::deserialize(&plain_bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors().into_iter().collect();
    let mut shape = p.dims.v_shape().to_vec();
    shape[3] -= 1;
    views.push(("dy".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F64, shape, &narrow).unwrap()));
    let bad = scratch("bad_dy.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = gateloop(&["grad", "-i", bad.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`dy`") && err.contains('V'), "{err}");

    // NaN in dy.
    let mut nan_dy = dy.clone();
    nan_dy[7] = f64::NAN;
    let nan = scratch("nan_dy.safetensors");
    io::write_grad_problem(&nan, &p.view(), &GradInputs { dy: &nan_dy, dh_final: None }).unwrap();
    let o = gateloop(&["grad", "-i", nan.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`dy`") && err.contains("finite"), "{err}");

    // The CUDA backward: attention mode has none (typed error, exit 2); an F64
    // file is refused (exit 2); chunked on f32 runs where a GPU is, else a
    // runtime error saying why (exit 1).
    let o = gateloop(&[
        "grad",
        "-i",
        nan.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--mode",
        "attention",
        "--device",
        "cuda",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no CUDA backward for this mode yet"));
    let run_cuda = |input: &std::path::Path| {
        let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
        gateloop(&["grad", "-i", i, "-o", o, "--mode", "chunked", "--device", "cuda"])
    };
    let plain64 = scratch("plain64.safetensors");
    io::write_grad_problem(&plain64, &p.view(), &GradInputs { dy: &dy, dh_final: None }).unwrap();
    let o = run_cuda(&plain64);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("F32, F16 and BF16 inputs only"));
    let p32 = p.to_f32();
    let dy32: Vec<f32> = dy.iter().map(|&x| x as f32).collect();
    let plain32 = scratch("plain32.safetensors");
    io::write_grad_problem(&plain32, &p32.view(), &GradInputs { dy: &dy32, dh_final: None }).unwrap();
    let o = run_cuda(&plain32);
    if !o.status.success() {
        common::cli_cuda_skipped("grad --mode chunked --device cuda (f32)", &o);
    }
}

/// F16 and BF16 grad files (q, k, v, dy in the 16-bit dtype; log_gate, h0,
/// dh_final F32): every CPU mode (f32 on the exact widened values) and, where
/// a GPU is, the CUDA backward kernels in that dtype. dq, dk, dv are written
/// in the file's dtype, dlog_gate and dh0 in F32. Against the f64 adjoint on
/// the values the file holds: dq, dk, dv within one rounding to the dtype
/// (unit roundoff u: 2⁻¹¹ for f16, 2⁻⁸ for bf16) plus f32's bounds;
/// dlog_gate and dh0 within f32's on the CPU, within issue 5's 16-bit
/// bound (5e-3) on the GPU.
#[test]
fn half_grad_files_run_in_their_dtype() {
    use gateloop::testing::{GateRegime, dims, random_problem};
    use rand::{Rng, SeedableRng};

    let complex = random_problem(dims(1, 70, 2, 8, 5, false), GateRegime::Mixed, true, 33).to_f32();
    let mut rng = rand::rngs::StdRng::seed_from_u64(34);
    let dy: Vec<f32> = (0..complex.dims.v_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let dh_final: Vec<Complex<f32>> = (0..complex.dims.state_len())
        .map(|_| Complex::new(rng.random_range(-1.0f32..1.0), rng.random_range(-1.0f32..1.0)))
        .collect();
    let out = scratch("half-grads.safetensors");
    // Real gates and h0 (Im = 0): with a real dh_final the cuda chunked
    // backward takes the real-gate kernels (dispatch::real_gates); with a
    // complex one (∂L/∂Im g ≠ 0 then) the complex kernels.
    let mut real = complex.clone();
    for z in real.log_gate.iter_mut().chain(real.h0.iter_mut().flatten()) {
        z.im = 0.0;
    }
    let real_dh: Vec<Complex<f32>> = dh_final.iter().map(|z| Complex::new(z.re, 0.0)).collect();
    let cases =
        [(&complex, &dh_final, "complex"), (&real, &real_dh, "real"), (&real, &dh_final, "real, complex dh_final")];
    for (c, (p, dh_final, gates)) in cases.into_iter().enumerate() {
        for half in [io::HalfDtype::F16, io::HalfDtype::Bf16] {
            // 2⁻¹¹ for f16, 2⁻⁸ for bf16.
            let unit_roundoff = half.element().unit_roundoff();
            let input = scratch(&format!("half-grad-{}-{c}.safetensors", half.name()));
            let upstream = GradInputs { dy: &dy, dh_final: Some(dh_final) };
            io::write_grad_problem_half(&input, &p.view(), &upstream, half).unwrap();
            // What the file holds: q, k, v, dy rounded to the dtype.
            let held = p.map_qkv(|x| half.round(x));
            let held_dy: Vec<f64> = dy.iter().map(|&x| f64::from(half.round(x))).collect();
            let dh64: Vec<Complex<f64>> = dh_final.iter().map(|z| Complex::new(z.re.into(), z.im.into())).collect();
            let oracle =
                gateloop::reference::grad::backward(&held.map(f64::from).view(), &held_dy, Some(&dh64)).unwrap();
            // Real gates: ∂L/∂Im g is 0 exactly when dh_final is real.
            let im_dlog_gate = oracle.dlog_gate.iter().map(|z| z.im.abs()).fold(0.0, f64::max);
            assert_eq!(im_dlog_gate > 1e-3, gates != "real", "{gates}: max |Im dlog_gate| {im_dlog_gate}");
            let runs = [
                ("cpu", "recurrent"),
                ("cpu", "scan"),
                ("cpu", "chunked"),
                ("cuda", "recurrent"),
                ("cuda", "scan"),
                ("cuda", "chunked"),
            ];
            for (device, mode) in runs {
                let tag = format!("{} {gates} {device} {mode}", half.name());
                let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
                let run = gateloop(&["grad", "-i", i, "-o", o, "--mode", mode, "--device", device]);
                let err = String::from_utf8_lossy(&run.stderr);
                if device == "cuda" && !run.status.success() {
                    common::cli_cuda_skipped(&tag, &run);
                    continue;
                }
                assert!(run.status.success(), "{tag}: {err}");
                let t = io::read_tensors_f64(&out).unwrap();
                for (name, dtype) in [("dq", half.dtype()), ("dk", half.dtype()), ("dv", half.dtype())] {
                    assert_eq!(t[name].dtype, dtype, "{tag}: {name}");
                }
                assert_eq!((t["dlog_gate"].dtype, t["dh0"].dtype), (safetensors::Dtype::F32, safetensors::Dtype::F32));
                let (rel, abs) = if device == "cpu" { (1e-4, 1e-3) } else { (5e-3, 5e-3) };
                let rounded = (unit_roundoff + rel, unit_roundoff + abs);
                for (name, want) in [("dq", &oracle.dq), ("dk", &oracle.dk), ("dv", &oracle.dv)] {
                    let e = compare(&t[name].data, want);
                    assert!(e.within(rounded.0, rounded.1), "{tag}: {name} {e:?}");
                }
                let flat = |z: &[Complex<f64>]| -> Vec<f64> { z.iter().flat_map(|c| [c.re, c.im]).collect() };
                let e = compare(&t["dlog_gate"].data, &flat(&oracle.dlog_gate));
                assert!(e.within(rel, abs), "{tag}: dlog_gate {e:?}");
                let e = compare(&t["dh0"].data, &flat(oracle.dh0.as_ref().unwrap()));
                assert!(e.within(rel, abs), "{tag}: dh0 {e:?}");
            }
        }
    }
}

/// `grad --variant`: the backward's variants, `sequential` (the chunked
/// backward with the sequential carry: state_seq and grad_w_seq) and
/// `packed` (the recurrent backward's B rows as B packed sequences), give
/// the default's gradients bit for bit where a GPU is; a forward-only
/// variant, or one on the CPU, exits 2 naming what exists.
#[test]
fn grad_variants_are_the_default_bit_for_bit_or_refused() {
    let t = io::read_tensors_f64(format!("{}/tests/fixtures/{}.safetensors", env!("CARGO_MANIFEST_DIR"), FIXTURES[0]))
        .unwrap();
    let (p, dy, dh_final) = load(&t);
    let p32 = p.to_f32();
    let dy32: Vec<f32> = dy.iter().map(|&x| x as f32).collect();
    let dhf32: Option<Vec<Complex<f32>>> =
        dh_final.as_ref().map(|h| h.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
    let input = scratch("variant32.safetensors");
    io::write_grad_problem(&input, &p32.view(), &GradInputs { dy: &dy32, dh_final: dhf32.as_deref() }).unwrap();
    let (default_out, sequential_out) = (scratch("variant-default.safetensors"), scratch("variant-seq.safetensors"));
    let grad = |out: &PathBuf, device: &str, mode: &str, variant: &str| {
        let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
        gateloop(&["grad", "-i", i, "-o", o, "--mode", mode, "--device", device, "--variant", variant])
    };
    let o = grad(&sequential_out, "cpu", "chunked", "sequential");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a CUDA kernel variant"));
    for (mode, variant, available) in [
        ("chunked", "fragments", "default, sequential, packed, saved"),
        ("recurrent", "ahead", "default, packed"),
        ("scan", "sequential", "default"),
    ] {
        let o = grad(&sequential_out, "cuda", mode, variant);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{mode} {variant}: {err}");
        assert!(err.contains(&format!("{variant} for the {mode} backward in f32 (available: {available})")), "{err}");
    }
    let o = grad(&default_out, "cuda", "chunked", "default");
    if !o.status.success() {
        common::cli_cuda_skipped("grad --mode chunked --device cuda", &o);
        return;
    }
    let same = |a: &PathBuf, b: &PathBuf, what: &str| {
        let (a, b) = (io::read_tensors_f64(a).unwrap(), io::read_tensors_f64(b).unwrap());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
        for (name, x) in &a {
            assert!(
                x.data.iter().zip(&b[name].data).all(|(u, v)| u.to_bits() == v.to_bits()),
                "{what}: {name} differs"
            );
        }
    };
    let o = grad(&sequential_out, "cuda", "chunked", "sequential");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same(&default_out, &sequential_out, "chunked sequential");
    // The training pair (the forward saving its chunk states, the backward
    // reading them): the default's gradients bit for bit.
    let o = grad(&sequential_out, "cuda", "chunked", "saved");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same(&default_out, &sequential_out, "chunked saved");
    for variant in ["default", "packed"] {
        let out = if variant == "default" { &default_out } else { &sequential_out };
        let o = grad(out, "cuda", "recurrent", variant);
        assert!(o.status.success(), "recurrent {variant}: {}", String::from_utf8_lossy(&o.stderr));
    }
    same(&default_out, &sequential_out, "recurrent packed");
}
