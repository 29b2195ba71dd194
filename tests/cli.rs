//! The `gateloop` binary end to end: `run` round trips against the in-process
//! reference, `check`, `demo`, and the error messages on malformed inputs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use gateloop::io::{self, TensorF64};
use gateloop::reference::{self, RefMode};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, compare};
use safetensors::tensor::{Dtype, TensorView};

const BIN: &str = env!("CARGO_BIN_EXE_gateloop");

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gateloop-cli-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gateloop(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("spawn gateloop")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn run_mode(input: &Path, output: &Path, mode: &str) -> Output {
    gateloop(&["run", "--input", s(input), "--output", s(output), "--mode", mode])
}

fn interleave(z: &[Complex<f64>]) -> Vec<f64> {
    z.iter().flat_map(|c| [c.re, c.im]).collect()
}

/// Reads `y` and `h_final` from an output file, checking names, shapes and dtype.
fn read_outputs(path: &Path, d: &Dims, dtype: Dtype) -> (TensorF64, TensorF64) {
    let mut t = io::read_tensors_f64(path).expect("read outputs");
    assert_eq!(t.len(), 2, "outputs hold y and h_final only: {:?}", t.keys().collect::<Vec<_>>());
    let y = t.remove("y").expect("y");
    let h = t.remove("h_final").expect("h_final");
    assert_eq!(y.shape, d.v_shape().to_vec());
    assert_eq!(h.shape, [d.batch, d.heads, d.key_dim, d.value_dim, 2].to_vec());
    assert_eq!((y.dtype, h.dtype), (dtype, dtype));
    (y, h)
}

/// Writes `p` in f64 and in f32, runs every CPU mode on both, and compares
/// with the f64 recurrent reference computed here.
fn round_trip(tag: &str, p: &OwnedProblem<f64>) {
    let dir = TempDir::new(tag);
    let d = p.dims;

    // f64: the reference of each mode, ≤ 1e-10.
    let input = dir.path("in64.safetensors");
    io::write_problem(&input, &p.view()).expect("write f64 input");
    let oracle = reference::forward::<f64>(RefMode::Recurrent, &p.view()).expect("oracle");
    for mode in ["recurrent", "scan", "attention"] {
        let output = dir.path(&format!("out64-{mode}.safetensors"));
        let o = run_mode(&input, &output, mode);
        assert!(o.status.success(), "{tag} f64 {mode}: {}", stderr(&o));
        assert!(stdout(&o).contains(mode), "summary line: {}", stdout(&o));
        let (y, h) = read_outputs(&output, &d, Dtype::F64);
        let (ey, eh) = (compare(&y.data, &oracle.y), compare(&h.data, &interleave(&oracle.h_final)));
        assert!(ey.rel_l2 <= 1e-10 && eh.rel_l2 <= 1e-10, "{tag} f64 {mode}: y {ey:?} h_final {eh:?}");
    }
    let o = run_mode(&input, &dir.path("out64-chunked.safetensors"), "chunked");
    assert_eq!(o.status.code(), Some(2), "{tag}: chunked on F64 must be refused");
    assert!(stderr(&o).contains("f32") && stderr(&o).contains("recurrent"), "{}", stderr(&o));

    // f32: every CPU mode, against the f64 reference on the same rounded inputs, ≤ 1e-4.
    let p32 = p.to_f32();
    let oracle = reference::forward::<f64>(RefMode::Recurrent, &p.rounded_to_f32().view()).expect("oracle");
    let input = dir.path("in32.safetensors");
    io::write_problem(&input, &p32.view()).expect("write f32 input");
    for mode in ["chunked", "recurrent", "scan", "attention"] {
        let output = dir.path(&format!("out32-{mode}.safetensors"));
        let o = run_mode(&input, &output, mode);
        assert!(o.status.success(), "{tag} f32 {mode}: {}", stderr(&o));
        let (y, h) = read_outputs(&output, &d, Dtype::F32);
        let (ey, eh) = (compare(&y.data, &oracle.y), compare(&h.data, &interleave(&oracle.h_final)));
        assert!(ey.rel_l2 <= 1e-4 && eh.rel_l2 <= 1e-4, "{tag} f32 {mode}: y {ey:?} h_final {eh:?}");
    }
}

#[test]
fn round_trip_random_with_h0() {
    round_trip("random", &random_problem(dims(2, 37, 3, 5, 4, false), GateRegime::Random, true, 1));
}

#[test]
fn round_trip_long_with_resets_without_h0() {
    round_trip("resets", &random_problem(dims(1, 1000, 2, 4, 3, false), GateRegime::Resets(0.02), false, 2));
}

#[test]
fn round_trip_long_with_large_phases() {
    round_trip("phase", &random_problem(dims(1, 1000, 2, 4, 3, false), GateRegime::LargePhase(50.0), true, 3));
}

#[test]
fn round_trip_per_head_gate() {
    round_trip("perhead", &random_problem(dims(2, 50, 2, 6, 5, true), GateRegime::Random, true, 4));
    round_trip("perhead-noh0", &random_problem(dims(1, 20, 3, 2, 2, true), GateRegime::Resets(0.1), false, 5));
}

#[test]
fn default_mode_is_chunked_on_cpu() {
    let dir = TempDir::new("default");
    let p = random_problem(dims(1, 10, 1, 3, 2, false), GateRegime::Random, true, 6).to_f32();
    let input = dir.path("in.safetensors");
    io::write_problem(&input, &p.view()).unwrap();
    let o = gateloop(&["run", "--input", s(&input), "--output", s(&dir.path("out.safetensors"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    assert!(line.contains("chunked") && line.contains("cpu") && line.contains("L=10"), "{line}");
}

/// `--mode auto` on the CPU: chunked for F32, the recurrence for F64; the
/// commands that need a named mode refuse it.
#[test]
fn auto_mode_picks_by_precision_on_cpu() {
    let dir = TempDir::new("auto");
    let p = random_problem(dims(1, 10, 1, 3, 2, false), GateRegime::Random, true, 6);
    for (name, f64_input, want) in [("in32", false, "chunked"), ("in64", true, "recurrent")] {
        let input = dir.path(&format!("{name}.safetensors"));
        if f64_input {
            io::write_problem(&input, &p.view()).unwrap();
        } else {
            io::write_problem(&input, &p.to_f32().view()).unwrap();
        }
        let o = run_mode(&input, &dir.path("out.safetensors"), "auto");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).starts_with(&format!("{want} on cpu")), "{}", stdout(&o));
    }
    let o = gateloop(&["grad", "-i", "x", "-o", "y", "--mode", "auto"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--mode auto is for `gateloop run` only"), "{}", stderr(&o));
}

#[test]
fn check_passes_on_identical_and_fails_on_different() {
    let dir = TempDir::new("check");
    let p = random_problem(dims(1, 30, 2, 3, 3, false), GateRegime::Random, true, 7);
    let input = dir.path("in.safetensors");
    io::write_problem(&input, &p.view()).unwrap();
    let (a, b) = (dir.path("a.safetensors"), dir.path("b.safetensors"));
    assert!(run_mode(&input, &a, "recurrent").status.success());
    assert!(run_mode(&input, &b, "scan").status.success());

    let o = gateloop(&["check", s(&a), s(&a)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("y") && stdout(&o).contains("h_final"), "{}", stdout(&o));
    // Two modes agree to rounding.
    let o = gateloop(&["check", s(&a), s(&b), "--rtol", "1e-10"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    // A perturbed y fails, and is named.
    let mut other = p.clone();
    other.v[0] += 0.5;
    let input2 = dir.path("in2.safetensors");
    io::write_problem(&input2, &other.view()).unwrap();
    let c = dir.path("c.safetensors");
    assert!(run_mode(&input2, &c, "recurrent").status.success());
    let o = gateloop(&["check", s(&a), s(&c)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tensor `y`") && stderr(&o).contains("exceeds rtol"), "{}", stderr(&o));

    // Different tensor names and shapes are reported.
    let o = gateloop(&["check", s(&a), s(&input)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tensor `q` is in") && stderr(&o).contains("tensor `y` is in"), "{}", stderr(&o));
    let small = random_problem(dims(1, 29, 2, 3, 3, false), GateRegime::Random, true, 7);
    let (in3, d) = (dir.path("in3.safetensors"), dir.path("d.safetensors"));
    io::write_problem(&in3, &small.view()).unwrap();
    assert!(run_mode(&in3, &d, "recurrent").status.success());
    let o = gateloop(&["check", s(&a), s(&d)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tensor `y` has shape [1, 30, 2, 3]"), "{}", stderr(&o));

    // An unreadable file is bad input.
    let o = gateloop(&["check", s(&a), s(&dir.path("nope.safetensors"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("error: cannot read"), "{}", stderr(&o));
}

#[test]
fn demo_runs_and_prints_a_table() {
    let o = gateloop(&["demo", "--len", "64", "--batch", "1", "--heads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in
        ["mode", "time (ms)", "y rel L2", "h_final rel L2", "chunked", "recurrent", "scan", "attention", "f64"]
    {
        assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
    }
    assert!(out.contains("GPU not used") || out.contains("cuda"), "{out}");
    // Where a GPU is, each kernel variant has its own rows.
    if !out.contains("GPU not used") {
        for needle in
            ["chunked/sequential", "chunked/fragments", "recurrent/ahead", "recurrent/rows4", "recurrent/packed"]
        {
            assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
        }
    }
}

// ------------------------------------------------------ malformed inputs --

type Raw = Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>;

fn f32_bytes(n: usize, value: f32) -> Vec<u8> {
    (0..n).flat_map(|_| value.to_le_bytes()).collect()
}

/// A valid F32 problem B=1 L=3 H=2 K=4 V=2 as raw tensors, to break.
fn valid_raw() -> Raw {
    let (b, l, h, k, v) = (1, 3, 2, 4, 2);
    vec![
        ("q", Dtype::F32, vec![b, l, h, k], f32_bytes(b * l * h * k, 0.5)),
        ("k", Dtype::F32, vec![b, l, h, k], f32_bytes(b * l * h * k, 0.25)),
        ("v", Dtype::F32, vec![b, l, h, v], f32_bytes(b * l * h * v, 1.0)),
        ("log_gate", Dtype::F32, vec![b, l, h, k, 2], f32_bytes(b * l * h * k * 2, -0.1)),
        ("h0", Dtype::F32, vec![b, h, k, v, 2], f32_bytes(b * h * k * v * 2, 0.0)),
    ]
}

fn to_bytes(raw: &Raw) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).expect("consistent test tensor")))
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// `x` in a 16-bit dtype (F16 or BF16), rounded to nearest: its bytes and
/// its value.
fn half_of(dtype: Dtype, x: f32) -> ([u8; 2], f64) {
    match dtype {
        Dtype::F16 => (half::f16::from_f32(x).to_le_bytes(), half::f16::from_f32(x).to_f64()),
        Dtype::BF16 => (half::bf16::from_f32(x).to_le_bytes(), half::bf16::from_f32(x).to_f64()),
        _ => panic!("{dtype:?} is not a 16-bit float"),
    }
}

/// Converts the F32 tensors `names` of `raw` to the 16-bit `dtype`.
fn to_half(raw: &mut Raw, names: &[&str], dtype: Dtype) {
    for t in raw.iter_mut().filter(|t| names.contains(&t.0)) {
        let values: Vec<f32> = t.3.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect();
        (t.1, t.3) = (dtype, values.into_iter().flat_map(|x| half_of(dtype, x).0).collect());
    }
}

fn set(raw: &mut Raw, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
    let t = raw.iter_mut().find(|t| t.0 == name).expect("tensor");
    (t.1, t.2, t.3) = (dtype, shape, bytes);
}

/// Runs `run` on `bytes` and expects exit 2 with every needle in the message.
fn expect_refused(dir: &TempDir, tag: &str, bytes: &[u8], needles: &[&str]) {
    let input = dir.path(&format!("{tag}.safetensors"));
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path(&format!("{tag}-out.safetensors"));
    let o = run_mode(&input, &output, "recurrent");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{tag}: exit status {:?}, stderr {err}", o.status);
    assert!(err.starts_with("error: "), "{tag}: {err}");
    for n in needles {
        assert!(err.contains(n), "{tag}: message lacks {n:?}: {err}");
    }
    assert!(!output.exists(), "{tag}: no output on error");
}

#[test]
fn the_valid_raw_problem_runs() {
    let dir = TempDir::new("valid");
    let input = dir.path("in.safetensors");
    std::fs::write(&input, to_bytes(&valid_raw())).unwrap();
    let o = run_mode(&input, &dir.path("out.safetensors"), "recurrent");
    assert!(o.status.success(), "{}", stderr(&o));

    // Every tensor in one 16-bit dtype, log_gate and h0 included, runs too
    // (the values are 0.5, 0.25, 1, −0.1 and 0, converted to that dtype).
    for dtype in [Dtype::F16, Dtype::BF16] {
        let mut raw = valid_raw();
        to_half(&mut raw, &["q", "k", "v", "log_gate", "h0"], dtype);
        std::fs::write(&input, to_bytes(&raw)).unwrap();
        let out = dir.path("out-half.safetensors");
        let o = run_mode(&input, &out, "recurrent");
        assert!(o.status.success(), "{dtype:?}: {}", stderr(&o));
        let t = io::read_tensors_f64(&out).unwrap();
        assert_eq!((t["y"].dtype, t["h_final"].dtype), (dtype, Dtype::F32));
        // By hand: h0 = 0, k·v = 0.25 per step, a = e^{g + ig} (both parts
        // of log_gate hold the dtype's −0.1), so h_3 = 0.25·(1 + a + a²) in
        // every element and y_3 = Re Σ_K q·h_3 = 4·0.5·Re h_3, rounded to
        // the dtype.
        let g = half_of(dtype, -0.1).1;
        let a = Complex::new(g, g).exp();
        let h3 = (Complex::new(1.0, 0.0) + a + a * a) * 0.25;
        let (h, y) = (&t["h_final"].data, &t["y"].data);
        assert!(h.chunks(2).all(|z| (Complex::new(z[0], z[1]) - h3).norm() <= 1e-6), "{dtype:?}: {h:?} vs {h3}");
        // y [1, 3, 2, 2]: the last step's four values.
        assert!(y[8..].iter().all(|&y| (y - 2.0 * h3.re).abs() <= 2f64.powi(-8) * 2.0 * h3.re), "{dtype:?}: {y:?}");
    }
}

#[test]
fn malformed_inputs_are_refused_with_a_named_reason() {
    let dir = TempDir::new("malformed");

    let mut raw = valid_raw();
    raw.retain(|t| t.0 != "v");
    expect_refused(&dir, "missing", &to_bytes(&raw), &["missing tensor `v`", "required: q, k, v, log_gate"]);

    let mut raw = valid_raw();
    set(&mut raw, "q", Dtype::F32, vec![3, 2, 4], f32_bytes(24, 0.5));
    expect_refused(&dir, "rank", &to_bytes(&raw), &["tensor `q` has shape [3, 2, 4]", "expected [B, L, H, K]"]);

    let mut raw = valid_raw();
    set(&mut raw, "log_gate", Dtype::F32, vec![1, 3, 2, 4, 3], f32_bytes(72, -0.1));
    expect_refused(
        &dir,
        "trailing",
        &to_bytes(&raw),
        &["tensor `log_gate` has shape [1, 3, 2, 4, 3]", "[B, L, H, K or 1, 2]"],
    );

    let mut raw = valid_raw();
    set(&mut raw, "k", Dtype::I32, vec![1, 3, 2, 4], vec![0; 96]);
    expect_refused(&dir, "dtype", &to_bytes(&raw), &["tensor `k` has dtype I32", "F32, F64, F16 or BF16"]);

    // q sets the element dtype: k, v must follow it; log_gate and h0 too,
    // or be F32 beside a 16-bit q (`half_inputs_run_in_their_dtype`).
    let mut raw = valid_raw();
    set(&mut raw, "q", Dtype::F16, vec![1, 3, 2, 4], vec![0; 48]);
    expect_refused(
        &dir,
        "f16-q-only",
        &to_bytes(&raw),
        &["tensor `k` is F32 but `q` is F16", "q, k, v and dy must have the same dtype"],
    );

    let mut raw = valid_raw();
    set(&mut raw, "v", Dtype::F64, vec![1, 3, 2, 2], vec![0; 96]);
    expect_refused(
        &dir,
        "mixed",
        &to_bytes(&raw),
        &["tensor `v` is F64 but `q` is F32", "q, k, v and dy must have the same dtype"],
    );

    let mut raw = valid_raw();
    set(&mut raw, "h0", Dtype::BF16, vec![1, 2, 4, 2, 2], vec![0; 64]);
    expect_refused(
        &dir,
        "f32-bf16-h0",
        &to_bytes(&raw),
        &["tensor `h0` is BF16 but `q` is F32", "must have q's dtype"],
    );

    let mut raw = valid_raw();
    to_half(&mut raw, &["q", "k", "v"], Dtype::BF16);
    set(&mut raw, "log_gate", Dtype::F64, vec![1, 3, 2, 4, 2], vec![0; 384]);
    expect_refused(
        &dir,
        "bf16-f64-gate",
        &to_bytes(&raw),
        &["tensor `log_gate` is F64 but `q` is BF16", "must be F32 or q's dtype"],
    );

    // A 16-bit infinity is refused like an f32 one (the values are checked
    // after widening).
    let mut raw = valid_raw();
    to_half(&mut raw, &["q", "k", "v"], Dtype::F16);
    raw.iter_mut().find(|t| t.0 == "k").unwrap().3[6..8].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    expect_refused(&dir, "f16-inf", &to_bytes(&raw), &["`k`", "element 3", "finite"]);

    let mut raw = valid_raw();
    set(&mut raw, "q", Dtype::F32, vec![1, 3, 2, 8], f32_bytes(48, 0.5));
    set(&mut raw, "k", Dtype::F32, vec![1, 3, 2, 8], f32_bytes(48, 0.5));
    set(&mut raw, "log_gate", Dtype::F32, vec![1, 3, 2, 7, 2], f32_bytes(84, -0.1));
    expect_refused(&dir, "inconsistent-k", &to_bytes(&raw), &["inconsistent K", "`q` says K=8", "`log_gate` says K=7"]);

    let mut raw = valid_raw();
    set(&mut raw, "v", Dtype::F32, vec![1, 4, 2, 2], f32_bytes(16, 1.0));
    expect_refused(&dir, "inconsistent-l", &to_bytes(&raw), &["inconsistent L", "`q` says L=3", "`v` says L=4"]);

    let mut raw = valid_raw();
    set(&mut raw, "q", Dtype::F32, vec![1, 0, 2, 4], vec![]);
    expect_refused(&dir, "zero", &to_bytes(&raw), &["tensor `q`", "dimension L is 0"]);

    let mut raw = valid_raw();
    raw.push(("h_0", Dtype::F32, vec![1], f32_bytes(1, 0.0)));
    expect_refused(&dir, "unknown", &to_bytes(&raw), &["unknown tensor(s) `h_0`"]);

    let bytes = to_bytes(&valid_raw());
    expect_refused(&dir, "truncated", &bytes[..bytes.len() - 10], &["not a valid safetensors file", "truncated"]);
    expect_refused(&dir, "truncated-header", &bytes[..40], &["not a valid safetensors file"]);
    expect_refused(&dir, "empty", &[], &["not a valid safetensors file"]);
    let garbage: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    expect_refused(&dir, "garbage", &garbage, &["not a valid safetensors file"]);

    let mut raw = valid_raw();
    let mut gate = f32_bytes(48, -0.1);
    gate[8..12].copy_from_slice(&0.5f32.to_le_bytes()); // element 1's real part
    set(&mut raw, "log_gate", Dtype::F32, vec![1, 3, 2, 4, 2], gate);
    expect_refused(&dir, "positive-gate", &to_bytes(&raw), &["`log_gate` element 1", "Re(log_gate) > 0"]);

    let mut raw = valid_raw();
    let mut v = f32_bytes(12, 1.0);
    v[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    set(&mut raw, "v", Dtype::F32, vec![1, 3, 2, 2], v);
    expect_refused(&dir, "nan-v", &to_bytes(&raw), &["`v` element 3 is NaN", "finite"]);

    let mut raw = valid_raw();
    let mut h0 = f32_bytes(32, 0.0);
    h0[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    set(&mut raw, "h0", Dtype::F32, vec![1, 2, 4, 2, 2], h0);
    expect_refused(&dir, "inf-h0", &to_bytes(&raw), &["`h0` element 0", "finite"]);
}

#[test]
fn usage_errors_exit_2() {
    let dir = TempDir::new("usage");
    let o = run_mode(&dir.path("missing.safetensors"), &dir.path("out.safetensors"), "recurrent");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read") && stderr(&o).contains("missing.safetensors"), "{}", stderr(&o));

    let o = gateloop(&["run", "--input", "x", "--output", "y", "--mode", "quadratic"]);
    assert_eq!(o.status.code(), Some(2));
    let o = gateloop(&["check", "a", "b", "--rtol", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--rtol"), "{}", stderr(&o));
    let o = gateloop(&["check", "a", "b", "--rtol", "nan"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--rtol"), "{}", stderr(&o));
    let o = gateloop(&["demo", "--len", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("len"), "{}", stderr(&o));
}

#[test]
fn cuda_device_errors_are_clear() {
    let dir = TempDir::new("cuda");
    let p = random_problem(dims(1, 16, 2, 4, 4, false), GateRegime::Random, true, 8);
    let (in64, in32) = (dir.path("in64.safetensors"), dir.path("in32.safetensors"));
    io::write_problem(&in64, &p.view()).unwrap();
    io::write_problem(&in32, &p.to_f32().view()).unwrap();
    let out = dir.path("out.safetensors");

    let o = gateloop(&["run", "-i", s(&in64), "-o", s(&out), "--mode", "recurrent", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("F32, F16 and BF16 inputs only"), "{}", stderr(&o));

    // Works where a GPU is available; otherwise a runtime error saying why.
    // Every mode has a CUDA kernel (chunked included).
    for mode in ["recurrent", "scan", "attention", "chunked"] {
        let o = gateloop(&["run", "-i", s(&in32), "-o", s(&out), "--mode", mode, "--device", "cuda"]);
        if o.status.success() {
            let oracle = reference::forward::<f64>(RefMode::Recurrent, &p.rounded_to_f32().view()).unwrap();
            let (y, h) = read_outputs(&out, &p.dims, Dtype::F32);
            assert!(compare(&y.data, &oracle.y).rel_l2 <= 1e-4);
            assert!(compare(&h.data, &interleave(&oracle.h_final)).rel_l2 <= 1e-4);
        } else {
            common::cli_cuda_skipped(&format!("run --mode {mode} --device cuda"), &o);
        }
    }
}

/// `--variant`: a CUDA kernel variant is refused on the CPU and where it
/// does not exist for the mode and dtype (exit 2, naming the ones that do,
/// before any GPU is opened); where a GPU is, each variant that exists
/// matches the f64 reference like the default (L = 70: two chunks, the
/// second cut short; resets and h0).
#[test]
fn kernel_variants_run_where_they_exist_and_are_refused_elsewhere() {
    let dir = TempDir::new("variant");
    let p = random_problem(dims(2, 70, 2, 8, 5, false), GateRegime::Resets(0.1), true, 31);
    let in32 = dir.path("in32.safetensors");
    io::write_problem(&in32, &p.to_f32().view()).unwrap();
    let out = dir.path("out.safetensors");
    let run = |mode: &str, device: &str, variant: &str| {
        gateloop(&["run", "-i", s(&in32), "-o", s(&out), "--mode", mode, "--device", device, "--variant", variant])
    };
    let o = run("chunked", "cpu", "sequential");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--variant sequential: a CUDA kernel variant"), "{}", stderr(&o));
    for (mode, variant, available) in [
        ("scan", "ahead", "available: default)"),
        ("recurrent", "sequential", "available: default, ahead, batched, rows4, packed)"),
        // The fragment output kernel takes 16-bit inputs only.
        ("chunked", "fragments", "available: default, sequential, packed)"),
    ] {
        let o = run(mode, "cuda", variant);
        assert_eq!(o.status.code(), Some(2), "{mode} {variant}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{variant} for the {mode} forward in f32 ({available}")),
            "{}",
            stderr(&o)
        );
    }
    let oracle = reference::forward::<f64>(RefMode::Recurrent, &p.rounded_to_f32().view()).unwrap();
    for (mode, variant) in [
        ("chunked", "sequential"),
        ("recurrent", "ahead"),
        ("recurrent", "batched"),
        ("recurrent", "rows4"),
        ("recurrent", "packed"),
        ("chunked", "packed"),
        ("chunked", "default"),
    ] {
        let o = run(mode, "cuda", variant);
        if o.status.success() {
            assert!(variant == "default" || stdout(&o).contains(&format!("{mode} ({variant})")), "{}", stdout(&o));
            let (y, h) = read_outputs(&out, &p.dims, Dtype::F32);
            assert!(compare(&y.data, &oracle.y).rel_l2 <= 1e-4, "{mode} {variant}");
            assert!(compare(&h.data, &interleave(&oracle.h_final)).rel_l2 <= 1e-4, "{mode} {variant}");
        } else {
            common::cli_cuda_skipped(&format!("run --mode {mode} --device cuda --variant {variant}"), &o);
        }
    }
}

/// F16 and BF16 input files (q, k, v in the 16-bit dtype, log_gate and h0
/// F32): every mode on the CPU (f32 on the exact widened values) and, where
/// a GPU is, on the device (the kernels in that dtype), y written in the
/// file's dtype and h_final in F32. Against the f64 reference on the values
/// the file holds: y within the dtype's rounding (unit roundoff u: 2⁻¹¹ for
/// f16, 2⁻⁸ for bf16) plus f32 accumulation, h_final within f32's. L = 70
/// is no multiple of a chunk; resets and h0 included; complex and real gates.
#[test]
fn half_inputs_run_in_their_dtype() {
    let dir = TempDir::new("half");
    let complex = random_problem(dims(2, 70, 2, 8, 5, false), GateRegime::Mixed, true, 21).to_f32();
    // Real gates and h0 (Im = 0): `--mode chunked` on cuda takes the
    // real-gate kernels (dispatch::real_gates).
    let mut real = complex.clone();
    for z in real.log_gate.iter_mut().chain(real.h0.iter_mut().flatten()) {
        z.im = 0.0;
    }
    let out = dir.path("out.safetensors");
    for (p, gates) in [(&complex, "complex"), (&real, "real")] {
        for half in [io::HalfDtype::F16, io::HalfDtype::Bf16] {
            // 2⁻¹¹ for f16, 2⁻⁸ for bf16.
            let unit_roundoff = half.element().unit_roundoff();
            let input = dir.path(&format!("in-{}-{gates}.safetensors", half.name()));
            io::write_problem_half(&input, &p.view(), half).unwrap();
            // What the file holds: q, k, v rounded to the dtype, the rest as is.
            let held = p.map_qkv(|x| half.round(x));
            let oracle = reference::forward::<f64>(RefMode::Recurrent, &held.map(f64::from).view()).unwrap();
            for device in ["cpu", "cuda"] {
                for mode in ["recurrent", "scan", "attention", "chunked"] {
                    let tag = format!("{} {gates} {device} {mode}", half.name());
                    let o = gateloop(&["run", "-i", s(&input), "-o", s(&out), "--mode", mode, "--device", device]);
                    if device == "cuda" && !o.status.success() {
                        common::cli_cuda_skipped(&tag, &o);
                        continue;
                    }
                    assert!(o.status.success(), "{tag}: {}", stderr(&o));
                    assert!(stdout(&o).contains(&format!("{} B=2 L=70", half.name())), "{tag}: {}", stdout(&o));
                    let mut t = io::read_tensors_f64(&out).unwrap();
                    let (y, h) = (t.remove("y").unwrap(), t.remove("h_final").unwrap());
                    assert_eq!((y.dtype, h.dtype), (half.dtype(), Dtype::F32), "{tag}");
                    assert_eq!(y.shape, p.dims.v_shape().to_vec(), "{tag}");
                    // Each y element is the f32 value rounded once (relative
                    // error ≤ u), the f32 values within the f32 bounds (1e-4
                    // relative L2, 1e-3·max|ref| max-abs) of the reference.
                    let ey = compare(&y.data, &oracle.y);
                    assert!(ey.within(unit_roundoff + 1e-4, unit_roundoff + 1e-3), "{tag}: y {ey:?}");
                    let eh = compare(&h.data, &interleave(&oracle.h_final));
                    assert!(eh.within(1e-4, 1e-3), "{tag}: h_final {eh:?}");
                }
            }
        }
    }
}

/// `gateloop fuzz --targets`: forward only by default, gradients with
/// `grad`, both with `forward,grad`; an unknown target is a usage error.
#[test]
fn fuzz_targets_select_forward_and_gradient_checks() {
    let dir = TempDir::new("fuzz-targets");
    let out = dir.path("failures");
    let fuzz = |targets: Option<&str>| {
        let mut args = vec!["fuzz", "--cases", "30", "--seed", "7", "--max-len", "64", "--modes", "chunked,recurrent"];
        args.extend(["--dtypes", "f32", "--out", s(&out)]);
        if let Some(t) = targets {
            args.extend(["--targets", t]);
        }
        gateloop(&args)
    };
    let o = fuzz(None);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("chunked-f32-cpu ") && !text.contains("-grad"), "{text}");

    let o = fuzz(Some("grad"));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("chunked-f32-cpu-grad") && text.contains("recurrent-f32-cpu-grad"), "{text}");
    assert!(!text.contains("chunked-f32-cpu "), "forward rows with --targets grad: {text}");
    assert!(text.contains("gradients: out, ref = dq, dk, dv, dlog_gate, dh0"), "{text}");
    // Each row ran every case.
    let row = text.lines().find(|l| l.starts_with("chunked-f32-cpu-grad")).unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("30"), "{row}");

    let o = fuzz(Some("forward,grad"));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("chunked-f32-cpu ") && text.contains("chunked-f32-cpu-grad"), "{text}");
    assert!(!out.exists(), "nothing is written without a disagreement");

    let o = fuzz(Some("backward"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("backward"), "{}", stderr(&o));
    // Gradients in f64 alone: the oracle itself, nothing to fuzz.
    let o = gateloop(&["fuzz", "--cases", "1", "--targets", "grad", "--dtypes", "f64"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("oracle"), "{}", stderr(&o));
}

/// `cu_seqlens` (I64 or I32, `[N + 1]`) in an input file packs N sequences
/// into its one batch row, each with its own state (fla's convention): `run`
/// computes each alone from its h0 (`[N, H, K, V, 2]`; the f64 recurrence:
/// exactly the sequences' own outputs, h_final `[N, H, K, V, 2]` every
/// one's), and `grad` likewise (dq each sequence's own, with its dh_final;
/// dh0 `[N, H, K, V, 2]`); states not N of them, bad offsets are refused
/// with exit 2, naming the tensor and the offset.
#[test]
fn cu_seqlens_packs_sequences_that_run_as_if_alone() {
    let dir = TempDir::new("packed");
    let lens = [5, 1, 9];
    let parts: Vec<OwnedProblem<f64>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| random_problem(dims(1, l, 2, 3, 2, false), GateRegime::UnitModulus, true, 8100 + i as u64))
        .collect();
    let cat = |f: &dyn Fn(&OwnedProblem<f64>) -> Vec<f64>| -> Vec<f64> { parts.iter().flat_map(f).collect() };
    let d = dims(1, 15, 2, 3, 2, false);
    let bytes = |x: &[f64]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let gates = cat(&|p| interleave(&p.log_gate));
    let h0 = cat(&|p| interleave(p.h0.as_ref().unwrap()));
    let mut raw: Raw = vec![
        ("q", Dtype::F64, d.qk_shape().to_vec(), bytes(&cat(&|p| p.q.clone()))),
        ("k", Dtype::F64, d.qk_shape().to_vec(), bytes(&cat(&|p| p.k.clone()))),
        ("v", Dtype::F64, d.v_shape().to_vec(), bytes(&cat(&|p| p.v.clone()))),
        ("log_gate", Dtype::F64, vec![1, 15, 2, 3, 2], bytes(&gates)),
        ("h0", Dtype::F64, vec![3, 2, 3, 2, 2], bytes(&h0)),
        ("cu_seqlens", Dtype::I64, vec![4], [0i64, 5, 6, 15].iter().flat_map(|x| x.to_le_bytes()).collect()),
    ];
    let input = dir.path("packed.safetensors");
    std::fs::write(&input, to_bytes(&raw)).unwrap();
    let output = dir.path("packed-out.safetensors");
    let o = run_mode(&input, &output, "recurrent");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("3 packed sequences"), "{}", stdout(&o));
    let mut out = io::read_tensors_f64(&output).unwrap();
    let (y, h) = (out.remove("y").unwrap(), out.remove("h_final").unwrap());
    let alone: Vec<_> = parts.iter().map(|p| reference::recurrent::forward(&p.view()).unwrap()).collect();
    assert_eq!(y.data, alone.iter().flat_map(|o| o.y.clone()).collect::<Vec<f64>>());
    assert_eq!(h.shape, [3, 2, 3, 2, 2]);
    assert_eq!(h.data, alone.iter().flat_map(|o| interleave(&o.h_final)).collect::<Vec<f64>>());
    // Without cu_seqlens (and its h0) the state crosses the boundaries (|a| = 1).
    let unpacked: Raw = raw.iter().filter(|t| t.0 != "cu_seqlens" && t.0 != "h0").cloned().collect();
    std::fs::write(&input, to_bytes(&unpacked)).unwrap();
    assert!(run_mode(&input, &output, "recurrent").status.success());
    assert_ne!(io::read_tensors_f64(&output).unwrap().remove("y").unwrap().data, y.data);

    // grad: dq of the packed file is the sequences' own, each with its own
    // dh_final, concatenated; dh0 every sequence's.
    let dy: Vec<f64> = (0..d.v_len()).map(|i| (i as f64 * 0.7).sin()).collect();
    let dh_final: Vec<f64> = (0..h0.len()).map(|i| (i as f64 * 0.3).cos()).collect();
    let mut grad_raw = raw.clone();
    grad_raw.push(("dy", Dtype::F64, d.v_shape().to_vec(), bytes(&dy)));
    grad_raw.push(("dh_final", Dtype::F64, vec![3, 2, 3, 2, 2], bytes(&dh_final)));
    std::fs::write(&input, to_bytes(&grad_raw)).unwrap();
    let o = gateloop(&["grad", "--input", s(&input), "--output", s(&output), "--mode", "recurrent"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut grads = io::read_tensors_f64(&output).unwrap();
    let (dq, dh0) = (grads.remove("dq").unwrap().data, grads.remove("dh0").unwrap());
    let (mut t0, mut want, mut want_dh0) = (0, Vec::new(), Vec::new());
    let state = 2 * 3 * 2;
    for (i, p) in parts.iter().enumerate() {
        let n = p.dims.v_len();
        let dh: Vec<Complex<f64>> =
            dh_final[2 * i * state..2 * (i + 1) * state].chunks(2).map(|c| Complex::new(c[0], c[1])).collect();
        let g = reference::grad::backward(&p.view(), &dy[t0..t0 + n], Some(&dh)).unwrap();
        want.extend(g.dq);
        want_dh0.extend(interleave(&g.dh0.unwrap()));
        t0 += n;
    }
    assert_eq!(dq, want);
    assert_eq!(dh0.shape, [3, 2, 3, 2, 2]);
    assert_eq!(dh0.data, want_dh0);

    // The same file in F32 through the CUDA kernels (recurrent in one
    // launch, chunked a launch per sequence, each from its own state), and the f32 CPU chunked
    // path: within the f32 bounds of the sequences' own f64 runs.
    let f32s = |x: &[u8]| -> Vec<u8> {
        x.chunks(8).flat_map(|c| (f64::from_le_bytes(c.try_into().unwrap()) as f32).to_le_bytes()).collect()
    };
    let raw32: Raw = raw
        .iter()
        .map(|(n, t, shape, b)| {
            if *t == Dtype::F64 { (*n, Dtype::F32, shape.clone(), f32s(b)) } else { (*n, *t, shape.clone(), b.clone()) }
        })
        .collect();
    std::fs::write(&input, to_bytes(&raw32)).unwrap();
    let want_y: Vec<f64> = alone.iter().flat_map(|o| o.y.clone()).collect();
    for (mode, device) in [("recurrent", "cuda"), ("chunked", "cuda"), ("chunked", "cpu")] {
        let o = gateloop(&["run", "-i", s(&input), "-o", s(&output), "--mode", mode, "--device", device]);
        if !o.status.success() && device == "cuda" {
            common::cli_cuda_skipped(&format!("run --mode {mode} --device cuda (packed)"), &o);
            continue;
        }
        assert!(o.status.success(), "{mode} {device}: {}", stderr(&o));
        let mut out = io::read_tensors_f64(&output).unwrap();
        let (y32, h32) = (out.remove("y").unwrap(), out.remove("h_final").unwrap());
        assert_eq!(h32.shape, [3, 2, 3, 2, 2], "{mode} {device}");
        assert!(compare(&y32.data, &want_y).rel_l2 <= 1e-4, "{mode} {device}: y");
        assert!(compare(&h32.data, &h.data).rel_l2 <= 1e-4, "{mode} {device}: h_final");
    }
    // And its gradients (the recurrent and chunked backwards packed in one
    // launch of each kernel): dq and dh0 within
    // the f32 bounds of the f64 ones above.
    let grad32: Raw = grad_raw
        .iter()
        .map(|(n, t, shape, b)| {
            if *t == Dtype::F64 { (*n, Dtype::F32, shape.clone(), f32s(b)) } else { (*n, *t, shape.clone(), b.clone()) }
        })
        .collect();
    std::fs::write(&input, to_bytes(&grad32)).unwrap();
    for mode in ["recurrent", "chunked"] {
        let o = gateloop(&["grad", "-i", s(&input), "-o", s(&output), "--mode", mode, "--device", "cuda"]);
        if !o.status.success() {
            common::cli_cuda_skipped(&format!("grad --mode {mode} --device cuda (packed)"), &o);
            continue;
        }
        let mut out = io::read_tensors_f64(&output).unwrap();
        let (dq32, dh0_32) = (out.remove("dq").unwrap(), out.remove("dh0").unwrap());
        assert_eq!(dh0_32.shape, [3, 2, 3, 2, 2], "grad {mode}");
        assert!(compare(&dq32.data, &want).rel_l2 <= 1e-4, "grad {mode}: dq");
        assert!(compare(&dh0_32.data, &want_dh0).rel_l2 <= 1e-4, "grad {mode}: dh0");
    }

    // Refused: states that are not one a sequence (h0 for one sequence, a
    // dh_final for one).
    let mut one_h0 = raw.clone();
    set(&mut one_h0, "h0", Dtype::F64, vec![1, 2, 3, 2, 2], bytes(&h0[..2 * state]));
    expect_refused(&dir, "one-h0", &to_bytes(&one_h0), &["h0", "[N, H, K, V, 2] = [3, 2, 3, 2, 2]", "[1, 2, 3, 2, 2]"]);
    let mut one_dh = grad_raw.clone();
    set(&mut one_dh, "dh_final", Dtype::F64, vec![1, 2, 3, 2, 2], bytes(&dh_final[..2 * state]));
    std::fs::write(&input, to_bytes(&one_dh)).unwrap();
    let o = gateloop(&["grad", "--input", s(&input), "--output", s(&output), "--mode", "recurrent"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("dh_final") && stderr(&o).contains("[N, H, K, V, 2]"), "{}", stderr(&o));

    // Refused: offsets that miss L, decrease, are negative, of another
    // dtype or rank; a file with two batch rows.
    let i64s = |x: &[i64]| -> Vec<u8> { x.iter().flat_map(|x| x.to_le_bytes()).collect() };
    type Refusal = (&'static str, Dtype, Vec<usize>, Vec<u8>, &'static [&'static str]);
    let cases: [Refusal; 6] = [
        ("short", Dtype::I64, vec![3], i64s(&[0, 5, 14]), &["cu_seqlens", "element 2", "the last offset must be L"]),
        ("order", Dtype::I64, vec![4], i64s(&[0, 6, 5, 15]), &["cu_seqlens", "element 2", "increase strictly"]),
        ("negative", Dtype::I64, vec![3], i64s(&[0, -5, 15]), &["cu_seqlens", "element 1", "≥ 0"]),
        ("float", Dtype::F32, vec![2], f32_bytes(2, 0.0), &["cu_seqlens", "F32", "I64 or I32"]),
        (
            "rank",
            Dtype::I32,
            vec![1, 2],
            [0i32, 15].iter().flat_map(|x| x.to_le_bytes()).collect(),
            &["cu_seqlens", "[1, 2]"],
        ),
        (
            "i32",
            Dtype::I32,
            vec![2],
            [0i32, 14].iter().flat_map(|x| x.to_le_bytes()).collect(),
            &["the last offset must be L"],
        ),
    ];
    for (tag, dtype, shape, b, needles) in cases {
        set(&mut raw, "cu_seqlens", dtype, shape, b);
        expect_refused(&dir, tag, &to_bytes(&raw), needles);
    }
    let mut batched = valid_raw();
    batched.push(("cu_seqlens", Dtype::I32, vec![2], [0i32, 3].iter().flat_map(|x| x.to_le_bytes()).collect()));
    for t in batched.iter_mut().filter(|t| t.0 != "cu_seqlens") {
        let n = t.3.len();
        t.3 = t.3.iter().cycle().take(2 * n).copied().collect();
        t.2[0] = 2; // B
    }
    expect_refused(&dir, "batched", &to_bytes(&batched), &["batch", "B = 1"]);
}
