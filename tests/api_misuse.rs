//! Misuse of every public CPU entry point gives a typed [`InputError`], never
//! a panic: wrong buffer lengths, zero-sized dims, dims whose products
//! overflow `usize`, output buffers of the wrong length, values outside the
//! gate's domain. And NaN/Inf in q, k, v propagate only to the outputs they
//! touch.
//!
//! (Passing the same buffer as input and output cannot be expressed for the
//! CPU entry points: inputs are `&[T]` and outputs `&mut [T]`, and safe Rust
//! does not let the two alias. Nothing to test there.)

use gateloop::cpu::chunked::{self, ChunkParams};
use gateloop::reference::grad::{self, GradInputs, Grads};
use gateloop::reference::{attention, recurrent, scan};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, InputError, Outputs, OutputsMut, Problem};

type Res = Result<(), InputError>;

/// Every entry point, on f32 and f64 (the generic ones) or f32 (chunked).
fn all_entry_points(p64: &Problem<'_, f64>, p32: &Problem<'_, f32>) -> Vec<(&'static str, Res)> {
    let d = p64.dims;
    // Buffers sized for d when that fits in memory, else small (the call must
    // refuse the problem before touching them).
    let small = |n: Option<usize>| n.filter(|&n| n <= 1 << 20).unwrap_or(1);
    let v_len =
        small(d.batch.checked_mul(d.len).and_then(|x| x.checked_mul(d.heads)).and_then(|x| x.checked_mul(d.value_dim)));
    let s_len = small(
        d.batch.checked_mul(d.heads).and_then(|x| x.checked_mul(d.key_dim)).and_then(|x| x.checked_mul(d.value_dim)),
    );
    let mut y64 = vec![0.0f64; v_len];
    let mut h64 = vec![Complex::new(0.0f64, 0.0); s_len];
    let mut y32 = vec![0.0f32; v_len];
    let mut h32 = vec![Complex::new(0.0f32, 0.0); s_len];
    let dy = vec![0.0f64; v_len];
    let ok = |r: Result<Outputs<f64>, InputError>| r.map(|_| ());
    let ok32 = |r: Result<Outputs<f32>, InputError>| r.map(|_| ());
    vec![
        ("recurrent::forward f64", ok(recurrent::forward(p64))),
        ("scan::forward f64", ok(scan::forward(p64))),
        ("attention::forward f64", ok(attention::forward(p64))),
        ("recurrent::forward f32", ok32(recurrent::forward(p32))),
        ("scan::forward f32", ok32(scan::forward(p32))),
        ("attention::forward f32", ok32(attention::forward(p32))),
        ("chunked::forward", ok32(chunked::forward(p32, &ChunkParams::default()))),
        ("recurrent::forward_into", recurrent::forward_into(p64, OutputsMut { y: &mut y64, h_final: &mut h64 })),
        ("scan::forward_into", scan::forward_into(p64, OutputsMut { y: &mut y64, h_final: &mut h64 })),
        ("attention::forward_into", attention::forward_into(p64, OutputsMut { y: &mut y64, h_final: &mut h64 })),
        (
            "chunked::forward_into",
            chunked::forward_into(p32, &ChunkParams::default(), OutputsMut { y: &mut y32, h_final: &mut h32 }),
        ),
        ("grad::backward", grad::backward(p64, &dy, None).map(|_| ())),
    ]
}

fn expect_all(p64: &Problem<'_, f64>, p32: &Problem<'_, f32>, what: &str, pred: impl Fn(&InputError) -> bool) {
    for (name, r) in all_entry_points(p64, p32) {
        match r {
            Err(e) if pred(&e) => {}
            other => panic!("{what}: {name} gave {other:?}"),
        }
    }
}

fn base() -> (OwnedProblem<f64>, OwnedProblem<f32>) {
    let p = random_problem(dims(2, 7, 3, 4, 5, false), GateRegime::Random, true, 1);
    let p32 = p.to_f32();
    (p, p32)
}

#[test]
fn wrong_input_lengths_are_named() {
    let (p, p32) = base();
    for name in ["q", "k", "v", "log_gate", "h0"] {
        let mut a = p.clone();
        let mut b = p32.clone();
        match name {
            "q" => {
                a.q.pop();
                b.q.pop();
            }
            "k" => {
                a.k.push(0.0);
                b.k.push(0.0);
            }
            "v" => {
                a.v.clear();
                b.v.clear();
            }
            "log_gate" => {
                a.log_gate.truncate(3);
                b.log_gate.truncate(3);
            }
            _ => {
                a.h0.as_mut().unwrap().pop();
                b.h0.as_mut().unwrap().pop();
            }
        }
        expect_all(&a.view(), &b.view(), name, |e| matches!(e, InputError::Length { name: n, .. } if *n == name));
    }
    // A per-head gate declared but per-channel data given.
    let mut a = p.clone();
    a.dims = a.dims.with_gate(gateloop::GateLayout::PerHead);
    let mut b = p32.clone();
    b.dims = a.dims;
    expect_all(&a.view(), &b.view(), "gate layout", |e| matches!(e, InputError::Length { name: "log_gate", .. }));
}

#[test]
fn zero_sized_dims_are_refused() {
    for (i, name) in ["batch", "len", "heads", "key_dim", "value_dim"].into_iter().enumerate() {
        let mut sizes = [2usize, 3, 2, 2, 2];
        sizes[i] = 0;
        let d = Dims::new(sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
        let p = OwnedProblem::<f64> {
            dims: d,
            q: vec![0.0; d.qk_len()],
            k: vec![0.0; d.qk_len()],
            v: vec![0.0; d.v_len()],
            log_gate: vec![Complex::new(0.0, 0.0); d.gate_len()],
            h0: None,
        };
        expect_all(&p.view(), &p.to_f32().view(), name, |e| matches!(e, InputError::ZeroDim { name: n } if *n == name));
    }
}

#[test]
fn overflowing_dims_are_refused() {
    let huge = usize::MAX / 2 + 1;
    for d in [
        Dims::new(huge, 2, 1, 1, 1),
        Dims::new(1, huge, 4, 1, 1),
        Dims::new(1, 1, 1, huge, 3),
        Dims::new(1 << 22, 1 << 22, 1 << 22, 1, 1),
        Dims::new(1 << 31, 1 << 31, 1, 1, 2), // 2⁶² · 2 (complex) = 2⁶³ fits, · V=2 does not
        Dims::new(1, 1, 1 << 32, 1 << 32, 1),
        Dims::new(usize::MAX, usize::MAX, usize::MAX, usize::MAX, usize::MAX),
    ] {
        let p = OwnedProblem::<f64> { dims: d, q: vec![], k: vec![], v: vec![], log_gate: vec![], h0: None };
        expect_all(&p.view(), &p.to_f32().view(), &format!("{d:?}"), |e| matches!(e, InputError::TooLarge { .. }));
        // Dims::validate and Problem::new say the same.
        assert!(matches!(d.validate(), Err(InputError::TooLarge { .. })));
        assert!(Problem::<f64>::new(d, &[], &[], &[], &[], None).is_err());
    }
}

#[test]
fn wrong_output_lengths_are_refused() {
    let (p, p32) = base();
    let d = p.dims;
    for (dy, dh) in [(-1isize, 0isize), (1, 0), (0, -1), (0, 1), (-(d.v_len() as isize), 0)] {
        let y_len = (d.v_len() as isize + dy) as usize;
        let h_len = (d.state_len() as isize + dh) as usize;
        let name = if dy != 0 { "y" } else { "h_final" };
        let is = |r: Res| matches!(r, Err(InputError::Length { name: n, .. }) if n == name);
        let mut y = vec![0.0f64; y_len];
        let mut h = vec![Complex::new(0.0, 0.0); h_len];
        assert!(is(recurrent::forward_into(&p.view(), OutputsMut { y: &mut y, h_final: &mut h })));
        assert!(is(scan::forward_into(&p.view(), OutputsMut { y: &mut y, h_final: &mut h })));
        assert!(is(attention::forward_into(&p.view(), OutputsMut { y: &mut y, h_final: &mut h })));
        let mut y = vec![0.0f32; y_len];
        let mut h = vec![Complex::new(0.0f32, 0.0); h_len];
        assert!(is(chunked::forward_into(
            &p32.view(),
            &ChunkParams::default(),
            OutputsMut { y: &mut y, h_final: &mut h }
        )));
    }
}

#[test]
fn backward_misuse_is_refused() {
    let (p, _) = base();
    let d = p.dims;
    let dy = vec![1.0; d.v_len()];
    let short = vec![1.0; d.v_len() - 1];
    assert!(matches!(grad::backward(&p.view(), &short, None), Err(InputError::Length { name: "dy", .. })));
    let dh = vec![Complex::new(0.0, 0.0); d.state_len() + 1];
    assert!(matches!(grad::backward(&p.view(), &dy, Some(&dh)), Err(InputError::Length { name: "dh_final", .. })));
    let g = GradInputs { dy: &dy, dh_final: None };
    for field in ["dq", "dk", "dv", "dlog_gate", "dh0"] {
        let mut out = Grads::zeros(&d, true);
        match field {
            "dq" => drop(out.dq.pop()),
            "dk" => out.dk.push(0.0),
            "dv" => out.dv.clear(),
            "dlog_gate" => drop(out.dlog_gate.pop()),
            _ => drop(out.dh0.as_mut().map(Vec::pop)),
        }
        let r = grad::backward_into(&p.view(), &g, out.as_mut());
        assert!(matches!(r, Err(InputError::Length { name, .. }) if name == field), "{field}: {r:?}");
    }
    let mut bad = p.clone();
    bad.log_gate[0].re = 0.5;
    assert!(matches!(grad::backward(&bad.view(), &dy, None), Err(InputError::Value { name: "log_gate", .. })));
}

#[test]
fn gates_outside_the_domain_are_refused() {
    let (p, _) = base();
    for (i, g) in [
        Complex::new(0.1, 0.0),
        Complex::new(f64::NAN, 0.0),
        Complex::new(-1.0, f64::NAN),
        Complex::new(-1.0, f64::INFINITY),
        Complex::new(f64::INFINITY, 0.0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = p.clone();
        a.log_gate[i + 3] = g;
        let b = a.to_f32();
        expect_all(
            &a.view(),
            &b.view(),
            &format!("{g}"),
            |e| matches!(e, InputError::Value { name: "log_gate", index, .. } if *index == i + 3),
        );
    }
}

#[test]
fn chunk_params_misuse_is_typed_or_accepted_never_a_panic() {
    let (_, p32) = base();
    for (c, s) in [(0, 16), (64, 0), (0, 0), (16, 64), (1, 1), (usize::MAX, usize::MAX), (65, 13)] {
        let params = ChunkParams { chunk_len: c, sub_chunk_len: s };
        let r = std::panic::catch_unwind(|| chunked::forward(&p32.view(), &params));
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => assert!(matches!(e, InputError::Param { .. }), "({c}, {s}): {e:?}"),
            Err(_) => panic!("chunked::forward panicked on ChunkParams ({c}, {s})"),
        }
    }
}

/// A NaN or ∞ in v (or k, q) at step t of head (b, h) reaches only that
/// head's y at steps ≥ t (and its h_final); every other head, batch element
/// and earlier step is bit-for-bit what it is without it.
#[test]
fn non_finite_inputs_propagate_only_to_the_outputs_they_touch() {
    let d = dims(2, 12, 3, 4, 5, false);
    let p = random_problem(d, GateRegime::Random, true, 3);
    let clean = recurrent::forward(&p.view()).unwrap();
    let (b0, h0, t0) = (1usize, 2usize, 5usize);
    for (tensor, bad) in [("v", f64::NAN), ("v", f64::INFINITY), ("k", f64::NAN), ("q", f64::NEG_INFINITY)] {
        let mut x = p.clone();
        let (rk, rv) = (p.view().row(b0, t0, h0, d.key_dim), p.view().row(b0, t0, h0, d.value_dim));
        match tensor {
            "v" => x.v[rv + 1] = bad,
            "k" => x.k[rk + 2] = bad,
            _ => x.q[rk] = bad,
        }
        let out = recurrent::forward(&x.view()).expect("non-finite q, k, v are accepted by the API");
        for b in 0..d.batch {
            for h in 0..d.heads {
                for t in 0..d.len {
                    let o = x.view().row(b, t, h, d.value_dim);
                    let (got, want) = (&out.y[o..o + d.value_dim], &clean.y[o..o + d.value_dim]);
                    let touched = (b, h) == (b0, h0) && (t >= t0 && tensor != "q" || t == t0 && tensor == "q");
                    if touched {
                        assert!(
                            got.iter().any(|y| !y.is_finite()),
                            "{tensor}={bad}: y[{b},{t},{h}] should be non-finite: {got:?}"
                        );
                    } else {
                        assert!(
                            got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{tensor}={bad}: y[{b},{t},{h}] changed: {got:?} vs {want:?}"
                        );
                    }
                }
                let kv = d.key_dim * d.value_dim;
                let s = (b * d.heads + h) * kv;
                let same = out.h_final[s..s + kv]
                    .iter()
                    .zip(&clean.h_final[s..s + kv])
                    .all(|(a, c)| a.re.to_bits() == c.re.to_bits() && a.im.to_bits() == c.im.to_bits());
                // q never enters the state; k and v do (for their head only).
                assert_eq!(same, (b, h) != (b0, h0) || tensor == "q", "{tensor}: h_final of ({b}, {h})");
            }
        }
    }
}

/// The chunked CUDA launchers check the dims on the host, before any device
/// work: their plan refuses bad dims with a typed error (these run without a
/// GPU; the buffer checks, which need device buffers, are in
/// tests/gpu_chunked.rs).
#[test]
fn chunked_cuda_plan_misuse_is_typed() {
    use gateloop::cuda::Dtype;
    use gateloop::cuda::chunk::{ChunkPrecision, Gates, plan};
    assert_eq!(ChunkPrecision::default(), ChunkPrecision::Exact);
    for dtype in Dtype::ALL {
        for gates in Gates::ALL {
            assert!(matches!(
                plan(&dims(1, 10, 1, 257, 4, false), dtype, gates),
                Err(InputError::Param { name: "key_dim", .. })
            ));
            assert!(plan(&dims(1, 10, 1, 256, 1000, false), dtype, gates).is_ok());
            for (i, name) in ["batch", "len", "heads", "key_dim", "value_dim"].into_iter().enumerate() {
                let mut sizes = [2usize, 3, 2, 2, 2];
                sizes[i] = 0;
                let d = Dims::new(sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
                assert!(matches!(plan(&d, dtype, gates), Err(InputError::ZeroDim { name: n }) if n == name), "{name}");
            }
            for d in [
                Dims::new(usize::MAX / 2 + 1, 2, 1, 1, 1),
                Dims::new(1 << 22, 1 << 22, 1 << 22, 1, 1),
                Dims::new(1 << 20, 1 << 16, 1 << 6, 1, 1), // fits in memory terms, but 2^36 thread blocks
            ] {
                assert!(matches!(plan(&d, dtype, gates), Err(InputError::TooLarge { .. })), "{d:?}");
            }
        }
    }
}

/// The chunked CUDA backward's plan checks the dims on the host the same way
/// (its buffer checks, which need device buffers, are in
/// tests/gpu_chunked_grad.rs): typed errors, never a panic, and a workspace
/// that grows with the chunks, never with L·K·V.
#[test]
fn chunked_cuda_grad_plan_misuse_is_typed() {
    use gateloop::cuda::Dtype;
    use gateloop::cuda::chunk::Gates;
    use gateloop::cuda::chunk_grad::plan;
    for (dtype, gates) in Dtype::ALL.into_iter().flat_map(|t| Gates::ALL.map(|g| (t, g))) {
        let bad_key = plan(&dims(1, 10, 1, 257, 4, false), dtype, gates);
        assert!(matches!(bad_key, Err(InputError::Param { name: "key_dim", .. })));
        assert!(plan(&dims(1, 10, 1, 256, 1000, true), dtype, gates).is_ok());
        for (i, name) in ["batch", "len", "heads", "key_dim", "value_dim"].into_iter().enumerate() {
            let mut sizes = [2usize, 3, 2, 2, 2];
            sizes[i] = 0;
            let d = Dims::new(sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
            assert!(matches!(plan(&d, dtype, gates), Err(InputError::ZeroDim { name: n }) if n == name), "{name}");
        }
        for d in [
            Dims::new(usize::MAX / 2 + 1, 2, 1, 1, 1),
            Dims::new(1 << 22, 1 << 22, 1 << 22, 1, 1),
            Dims::new(1 << 20, 1 << 16, 1 << 6, 1, 1),
        ] {
            assert!(matches!(plan(&d, dtype, gates), Err(InputError::TooLarge { .. })), "{d:?}");
        }
        // O(B·H·(L/64)·K·V): 64 steps per chunk, so 64× fewer state floats
        // than L·K·V (S_in and D, the decays, and grad_qk's scores for
        // grad_dv, 64 × 64 a chunk: one more state at K = V = 64).
        let d = dims(1, 64 * 1024, 1, 64, 64, false);
        let ws = plan(&d, dtype, gates).unwrap().workspace_len;
        assert!(ws <= (2 * gates.parts() + 2) * 1024 * 64 * 64, "{ws}");
    }
}
