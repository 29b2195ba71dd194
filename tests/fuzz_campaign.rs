//! The fuzzer as CI: a fixed-seed campaign over every CPU mode and both
//! precisions must find no disagreement, forward and gradients; and a
//! deliberately wrong implementation, injected through [`Target::custom`]
//! (forward) or [`Target::custom_grad`] (gradients), must be caught, shrunk
//! and written to files that `gateloop run` (or `gateloop grad`) +
//! `gateloop check` replay.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use gateloop::fuzz::{self, Device, FuzzConfig, Kind, Precision, Target};
use gateloop::io::Upstream;
use gateloop::reference::{self, grad::Grads};
use gateloop::testing::OwnedProblem;
use gateloop::{Complex, Mode, Outputs};

const BIN: &str = env!("CARGO_BIN_EXE_gateloop");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateloop-fuzz-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// 300 cases up to L = 2048, every CPU mode, f32 and f64: zero disagreements
/// (about 25 s in release on 2 cores, mostly the O(L²) attention).
#[test]
fn fixed_seed_campaign_finds_no_disagreement() {
    let modes = Mode::ALL;
    let (mut targets, notes) = fuzz::targets(Device::Cpu, &modes, &[Precision::F32, Precision::F64]).unwrap();
    assert_eq!(targets.len(), 6, "{notes:?}");
    let dir = temp_dir("campaign");
    let cfg = FuzzConfig {
        cases: 300,
        seed: 20240601,
        max_len: 2048,
        out_dir: Some(dir.clone()),
        max_failures: 5,
        time_budget: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let report = fuzz::run_campaign(&cfg, &mut targets);
    println!("{}", report.render());
    assert!(report.passed(), "{}", report.render());
    assert_eq!(report.cases_run, 300);
    for t in &report.targets {
        assert!(t.cases > 200, "{} ran only {} cases", t.label, t.cases);
    }
    assert!(!dir.exists(), "nothing is written without a disagreement");
}

/// The injected fault of the tests below: `p` without its h0 when K > 2.
fn forget_h0_above_k2(p: &OwnedProblem<f64>) -> OwnedProblem<f64> {
    let mut p = p.clone();
    if p.dims.key_dim > 2 {
        p.h0 = None;
    }
    p
}

/// A chunked f32 that forgets h0 whenever K > 2: caught, shrunk to the
/// smallest such case (K = 3 stays because halving K to 1 or 2 makes it pass),
/// written, and replayable.
#[test]
fn injected_fault_is_caught_shrunk_written_and_replayable() {
    let wrong = |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        reference::recurrent::forward(&forget_h0_above_k2(p).to_f32().view())
            .map(|o| Outputs {
                y: o.y.iter().map(|&x| f64::from(x)).collect(),
                h_final: o.h_final.iter().map(|z| gateloop::Complex::new(f64::from(z.re), f64::from(z.im))).collect(),
            })
            .map_err(|e| e.to_string())
    };
    let mut targets = vec![Target::custom("wrong-chunked", Mode::Chunked, Precision::F32, Device::Cpu, wrong)];
    let dir = temp_dir("injected");
    let cfg = FuzzConfig { cases: 500, seed: 3, max_len: 300, out_dir: Some(dir.clone()), ..Default::default() };
    let report = fuzz::run_campaign(&cfg, &mut targets);
    println!("{}", report.render());
    assert_eq!(report.failures.len(), 1, "{}", report.render());
    let f = &report.failures[0];
    assert!(f.case.with_h0 && f.case.dims.key_dim > 2, "{}", f.case);
    // Shrunk: one batch, one head, K = 3 or 4 (halving would lose the bug), V = 1, L = 1.
    let d = f.shrunk_dims;
    assert_eq!((d.batch, d.heads, d.value_dim, d.len), (1, 1, 1, 1), "{}", fuzz::dims_str(&d));
    assert!((3..=4).contains(&d.key_dim), "{}", fuzz::dims_str(&d));

    // The case re-runs alone from (seed, index).
    let again = fuzz::run_campaign(
        &FuzzConfig { cases: 1, first_case: f.case.index, out_dir: None, ..cfg.clone() },
        &mut [Target::custom("wrong-chunked", Mode::Chunked, Precision::F32, Device::Cpu, wrong)],
    );
    assert_eq!(again.failures.len(), 1);

    let files = f.files.as_ref().expect("written").as_ref().expect("write ok");
    assert!(files.input.exists() && files.expected.exists());
    assert_eq!(files.commands.len(), 3, "{:?}", files.commands);
    let sh = |cmd: &str| {
        let cmd = cmd.split('#').next().unwrap_or(cmd).replacen("gateloop", BIN, 1);
        Command::new("sh").arg("-c").arg(&cmd).output().expect("sh")
    };
    // The recorded failing output fails `check` (exit 1) ...
    let o = sh(&files.commands[2]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // ... and the binary's real chunked path, replayed with `run`, passes it:
    // the input file and the expected outputs are right.
    let o = sh(&files.commands[0]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sh(&files.commands[1]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    // The CLI prints the same replay commands and exits 1 on a disagreement;
    // with none, 0. (The real implementations pass.)
    let o = Command::new(BIN)
        .args(["fuzz", "--cases", "20", "--seed", "5", "--max-len", "64", "--modes", "chunked,scan", "--dtypes", "f32"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("chunked-f32-cpu") && out.contains("scan-f32-cpu") && out.contains("worst score"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 16-bit target's failure files hold what it saw: q, k, v in that type
/// (BF16 or F16), log_gate and h0 in F32, its output y in that type;
/// `gateloop run` replays the input file in it (here on the CPU, which
/// computes it in f32) and that replay passes `check` against the expected
/// outputs, while the recorded failing output does not.
fn half_failure_files_are_half_and_replay(precision: Precision, dtype: safetensors::Dtype) {
    let wrong = |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        reference::recurrent::forward(&forget_h0_above_k2(p).view()).map_err(|e| e.to_string())
    };
    let label = format!("wrong-chunked-{}", precision.name());
    let target = || Target::custom(label.clone(), Mode::Chunked, precision, Device::Cpu, wrong);
    let dir = temp_dir(&format!("injected-{}", precision.name()));
    let cfg = FuzzConfig { cases: 500, seed: 3, max_len: 300, out_dir: Some(dir.clone()), ..Default::default() };
    let report = fuzz::run_campaign(&cfg, &mut [target()]);
    assert_eq!(report.failures.len(), 1, "{}", report.render());
    let files = report.failures[0].files.as_ref().expect("written").as_ref().expect("write ok");
    let input = gateloop::io::read_tensors_f64(&files.input).unwrap();
    let dtypes: Vec<_> = ["q", "k", "v", "log_gate", "h0"].iter().map(|n| input[*n].dtype).collect();
    use safetensors::Dtype::F32;
    assert_eq!(dtypes, [dtype, dtype, dtype, F32, F32]);
    let sh = |cmd: &str| {
        let cmd = cmd.split('#').next().unwrap_or(cmd).replacen("gateloop", BIN, 1);
        Command::new("sh").arg("-c").arg(&cmd).output().expect("sh")
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let o = sh(&files.commands[2]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = sh(&files.commands[0]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(gateloop::io::read_tensors_f64(&files.replay_output).unwrap()["y"].dtype, dtype);
    let o = sh(&files.commands[1]);
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bf16_failure_files_are_bf16_and_replay() {
    half_failure_files_are_half_and_replay(Precision::Bf16, safetensors::Dtype::BF16);
}

#[test]
fn f16_failure_files_are_f16_and_replay() {
    half_failure_files_are_half_and_replay(Precision::F16, safetensors::Dtype::F16);
}

/// A kernel variant's failure is filed under its name and replayed with it:
/// `gateloop run --device cuda --variant sequential` (which, where a GPU is,
/// passes `check` against the expected outputs, while the recorded failing
/// output does not).
#[test]
fn variant_failures_name_and_replay_their_variant() {
    let wrong = |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        reference::recurrent::forward(&forget_h0_above_k2(p).view()).map_err(|e| e.to_string())
    };
    let target = Target::custom("wrong-chunked-sequential", Mode::Chunked, Precision::F32, Device::Cuda, wrong)
        .with_variant(fuzz::Variant::Sequential);
    let dir = temp_dir("injected-variant");
    let cfg = FuzzConfig { cases: 500, seed: 3, max_len: 300, out_dir: Some(dir.clone()), ..Default::default() };
    let report = fuzz::run_campaign(&cfg, &mut [target]);
    assert_eq!(report.failures.len(), 1, "{}", report.render());
    let files = report.failures[0].files.as_ref().expect("written").as_ref().expect("write ok");
    let stem = files.input.file_name().unwrap().to_string_lossy().to_string();
    assert!(stem.contains("-chunked-sequential-f32-cuda."), "{stem}");
    assert!(files.commands[0].contains("--mode chunked --device cuda --variant sequential"), "{:?}", files.commands);
    let sh = |cmd: &str| {
        let cmd = cmd.split('#').next().unwrap_or(cmd).replacen("gateloop", BIN, 1);
        Command::new("sh").arg("-c").arg(&cmd).output().expect("sh")
    };
    let o = sh(&files.commands[0]);
    if o.status.success() {
        let o = sh(&files.commands[1]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(sh(&files.commands[2]).status.code(), Some(1));
    } else {
        common::cli_cuda_skipped("the replay of a chunked/sequential failure", &o);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_usage_errors_exit_2() {
    let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--dtypes", "f8"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`f8` is not f32, f64, bf16 or f16"));
    // f16 and bf16 are the CUDA kernels' types: on the CPU nothing to fuzz.
    let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--dtypes", "f16,bf16"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("computes 16-bit inputs in f32"));
    // This build's GPU layer (a stub, or no driver here) cannot be used: exit 2 with a message.
    if gateloop::cuda::Gpu::new(0).is_err() {
        let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--device", "cuda"]).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("cannot use the GPU"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Chunked in f64 alone is nothing to fuzz.
    let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--modes", "chunked", "--dtypes", "f64"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// The gradient campaign: every CPU backward (the chunked f32 backward and
/// the adjoint recurrence in f32; f64 is the oracle) on 6000 cases up to
/// L = 64 and 300 up to L = 1024, zero disagreements (about 10 s in release
/// on 2 cores; worst scores 3.9e-5 and 2.3e-5 of 1e-4, chunked dlog_gate).
#[test]
fn fixed_seed_gradient_campaign_finds_no_disagreement() {
    let (mut targets, notes) =
        fuzz::select(Device::Cpu, &[Kind::Grad], &Mode::ALL, &[Precision::F32, Precision::F64]).unwrap();
    let labels: Vec<&str> = targets.iter().map(|t| t.label.as_str()).collect();
    assert!(
        labels.contains(&"chunked-f32-cpu-grad") && labels.contains(&"recurrent-f32-cpu-grad"),
        "{labels:?} {notes:?}"
    );
    assert!(targets.iter().all(|t| t.kind() == Kind::Grad && t.precision == Precision::F32));
    let dir = temp_dir("grad-campaign");
    for (cases, max_len) in [(6000, 64), (300, 1024)] {
        let cfg = FuzzConfig {
            cases,
            seed: 20261129,
            max_len,
            out_dir: Some(dir.clone()),
            max_failures: 5,
            time_budget: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        let report = fuzz::run_campaign(&cfg, &mut targets);
        println!("{}", report.render());
        assert!(report.passed(), "{}", report.render());
        assert_eq!(report.cases_run, cases);
        assert!(report.targets.iter().all(|t| t.cases == cases && t.kind == Kind::Grad));
    }
    assert!(!dir.exists(), "nothing is written without a disagreement");
}

fn widen_grads_of(g: Grads<f32>) -> Grads<f64> {
    fuzz::widen_grads(&g)
}

/// A chunked f32 backward that ignores dh_final whenever V > 2: caught,
/// shrunk (one batch, one head, L = 1, K = 1, V = 3 or 4; dh_final kept),
/// written as a `grad` input with expected gradients, and replayable with
/// `gateloop grad` + `gateloop check`.
#[test]
fn injected_gradient_fault_is_caught_shrunk_written_and_replayable() {
    let wrong = |p: &OwnedProblem<f64>, up: &Upstream<f64>| -> Result<Grads<f64>, String> {
        let up = fuzz::upstream_to_f32(up);
        let dh_final = if p.dims.value_dim > 2 { None } else { up.dh_final.as_deref() };
        reference::grad::backward(&p.to_f32().view(), &up.dy, dh_final).map(widen_grads_of).map_err(|e| e.to_string())
    };
    let target = || Target::custom_grad("wrong-chunked-grad", Mode::Chunked, Precision::F32, Device::Cpu, wrong);
    let dir = temp_dir("injected-grad");
    let cfg = FuzzConfig { cases: 500, seed: 4, max_len: 200, out_dir: Some(dir.clone()), ..Default::default() };
    let report = fuzz::run_campaign(&cfg, &mut [target()]);
    println!("{}", report.render());
    assert_eq!(report.failures.len(), 1, "{}", report.render());
    let f = &report.failures[0];
    assert_eq!(f.kind, Kind::Grad);
    assert!(f.case.dh_final_scale.is_some() && f.case.dims.value_dim > 2, "{}", f.case);
    let d = f.shrunk_dims;
    assert_eq!((d.batch, d.heads, d.len), (1, 1, 1), "{}", fuzz::dims_str(&d));
    assert!((3..=4).contains(&d.value_dim), "{}", fuzz::dims_str(&d));
    let rendered = report.render();
    assert!(rendered.contains("--targets grad --modes chunked --dtypes f32"), "{rendered}");

    // The case re-runs alone from (seed, index).
    let again = fuzz::run_campaign(
        &FuzzConfig { cases: 1, first_case: f.case.index, out_dir: None, ..cfg.clone() },
        &mut [target()],
    );
    assert_eq!(again.failures.len(), 1);

    let files = f.files.as_ref().expect("written").as_ref().expect("write ok");
    assert!(files.input.display().to_string().ends_with("-grad.input.safetensors"), "{}", files.input.display());
    assert_eq!(files.commands.len(), 3, "{:?}", files.commands);
    assert!(files.commands[0].starts_with("gateloop grad --input"), "{:?}", files.commands);
    let sh = |cmd: &str| {
        let cmd = cmd.split('#').next().unwrap_or(cmd).replacen("gateloop", BIN, 1);
        Command::new("sh").arg("-c").arg(&cmd).output().expect("sh")
    };
    // The recorded failing gradients fail `check` (exit 1) ...
    let o = sh(&files.commands[2]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // ... and the binary's real chunked backward, replayed with `grad`,
    // passes it: the input file (with dy, dh_final) and the expected
    // gradients are right.
    let o = sh(&files.commands[0]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sh(&files.commands[1]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gradient bound at work on small, deliberate errors of a real
/// backward: a relative error of 1e-6 in dlog_gate passes (f32 rounding is
/// that large), 1e-3 fails; an error of 1e-3·R in a dlog_gate that cancels
/// to ≈ 0 fails although it is "small", NaN fails, a missing dh0 fails.
#[test]
fn gradient_bound_catches_small_deliberate_errors() {
    /// The chunked backward with dlog_gate scaled by 1 + rel.
    fn perturbed(rel: f64) -> impl Fn(&OwnedProblem<f64>, &Upstream<f64>) -> Result<Grads<f64>, String> {
        move |p: &OwnedProblem<f64>, up: &Upstream<f64>| {
            let up = fuzz::upstream_to_f32(up);
            let mut g = widen_grads_of(
                gateloop::dispatch::cpu_grad_f32(Mode::Chunked, &p.to_f32().view(), &up.dy, up.dh_final.as_deref())
                    .map_err(|e| e.to_string())?,
            );
            g.dlog_gate.iter_mut().for_each(|z| *z *= 1.0 + rel);
            Ok(g)
        }
    }
    let campaign = |run: fuzz::GradRunFn| {
        let mut t = [Target::custom_grad("perturbed", Mode::Chunked, Precision::F32, Device::Cpu, run)];
        let cfg =
            FuzzConfig { cases: 300, seed: 9, max_len: 64, out_dir: None, shrink_budget: 20, ..Default::default() };
        fuzz::run_campaign(&cfg, &mut t)
    };
    assert!(campaign(Box::new(perturbed(1e-6))).passed());
    let r = campaign(Box::new(perturbed(1e-3)));
    assert!(!r.passed() && r.failures[0].why.contains("dlog_gate"), "{}", r.render());
    let nan = |p: &OwnedProblem<f64>, up: &Upstream<f64>| -> Result<Grads<f64>, String> {
        let mut g = perturbed(0.0)(p, up)?;
        g.dq[0] = f64::NAN;
        Ok(g)
    };
    assert!(!campaign(Box::new(nan)).passed());
    let no_dh0 = |p: &OwnedProblem<f64>, up: &Upstream<f64>| -> Result<Grads<f64>, String> {
        let mut g = perturbed(0.0)(p, up)?;
        g.dh0 = None;
        Ok(g)
    };
    let r = campaign(Box::new(no_dh0));
    assert!(!r.passed() && r.failures[0].why.contains("dh0"), "{}", r.render());

    // Cancellation: one step, h0 = −k·v makes a_0·h0 + ... irrelevant; here
    // dlog_gate_1 = conj(a_1 h_0)·δ_1 with h_0 = k_0 v_0 + a_0 h0 = 0 exactly,
    // so the reference is 0 while its terms are not: an error of 1e-6 of the
    // terms passes, 1e-2 fails.
    let p = OwnedProblem {
        dims: gateloop::Dims::new(1, 2, 1, 1, 1),
        q: vec![0.5, 2.0],
        k: vec![3.0, 1.0],
        v: vec![5.0, 1.0],
        log_gate: vec![Complex::new(0.0, 0.0), Complex::new(-0.5, 0.25)],
        h0: Some(vec![Complex::new(-15.0, 0.0)]),
    };
    let up = Upstream { dy: vec![1.0, 1.0], dh_final: None };
    let o = fuzz::GradOracle::new(&p, &up, Precision::F32).unwrap();
    assert_eq!(o.grads.dlog_gate[1], Complex::new(0.0, 0.0));
    let terms = o.r_dlog_gate[2];
    assert!(terms > 1.0, "R of the cancelling dlog_gate: {terms}");
    let mut g = o.grads.clone();
    g.dlog_gate[1].re = 1e-6 * terms;
    assert!(o.judge(&g, 1e-4).pass(), "{:?}", o.judge(&g, 1e-4));
    g.dlog_gate[1].re = 1e-2 * terms;
    let v = o.judge(&g, 1e-4);
    assert!(!v.pass() && v.tensor("dlog_gate").unwrap().score() > 1e-4, "{v:?}");
}

/// A campaign setting's whole contract (`--real-gates`, `--wide-values`):
/// a target that answers wrong (y doubled) on every case the setting
/// excludes (`excluded`) passes every case of a campaign with it (`on`),
/// and is caught on its first such case without it (`off`); the report's
/// first line (`header`) and its replay lines (`flag`) say so, and the CLI
/// takes the flag (a chunked and recurrent CPU campaign whose report
/// names it by `says`).
fn check_campaign_setting(
    excluded: fn(&OwnedProblem<f64>) -> bool,
    on: FuzzConfig,
    off: FuzzConfig,
    header: &str,
    flag: &str,
    says: &str,
) {
    let wrong_where_excluded = move |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        let o = reference::recurrent::forward(&p.view()).map_err(|e| e.to_string())?;
        Ok(if excluded(p) { Outputs { y: o.y.iter().map(|y| 2.0 * y).collect(), ..o } } else { o })
    };
    let target = || Target::custom("setting", Mode::Recurrent, Precision::F64, Device::Cpu, wrong_where_excluded);
    let report = fuzz::run_campaign(&on, &mut [target()]);
    assert!(report.passed(), "{}", report.render());
    let text = report.render();
    assert!(text.starts_with(header), "{text}");
    assert!(text.contains(&format!("--max-len {} {flag} (with the same", on.max_len)), "{text}");
    let without = fuzz::run_campaign(&off, &mut [target()]);
    assert_eq!(without.failures.len(), 1, "{}", without.render());
    assert!(without.render().contains("re-run this case") && !without.render().contains(flag));

    let o = Command::new(BIN)
        .args(["fuzz", "--cases", "5", "--seed", "5", "--max-len", "48", "--modes", "chunked,recurrent"])
        .args(["--dtypes", "f32", flag])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(says) && out.contains("chunked-f32-cpu"), "{out}");
}

/// `--real-gates`: every case's log_gate and h0 reach the targets with
/// Im = 0.
#[test]
fn real_gate_campaigns_give_the_targets_real_gates() {
    let cfg = FuzzConfig { cases: 60, seed: 7, max_len: 100, out_dir: None, real_gates: true, ..Default::default() };
    check_campaign_setting(
        |p| p.log_gate.iter().chain(p.h0.iter().flatten()).any(|z| z.im != 0.0),
        cfg.clone(),
        FuzzConfig { real_gates: false, ..cfg },
        "fuzz: seed 7, real gates, cases 0..60",
        "--real-gates",
        "real gates",
    );
}

/// `--wide-values`: every case's V is past one value tile (from
/// fuzz::WIDE_VALUE_POOL).
#[test]
fn wide_value_campaigns_give_the_targets_wide_values() {
    let cfg = FuzzConfig { cases: 40, seed: 9, max_len: 64, out_dir: None, wide_values: true, ..Default::default() };
    check_campaign_setting(
        |p| p.dims.value_dim <= 64,
        cfg.clone(),
        FuzzConfig { wide_values: false, ..cfg },
        "fuzz: seed 9, V > 64, cases 0..40",
        "--wide-values",
        "V > 64",
    );
}
