//! The fuzzer as CI: a fixed-seed campaign over every CPU mode and both
//! precisions must find no disagreement; and a deliberately wrong
//! implementation, injected through [`Target::custom`], must be caught,
//! shrunk and written to files that `gateloop run` + `gateloop check` replay.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use gateloop::fuzz::{self, Device, FuzzConfig, Precision, Target};
use gateloop::reference;
use gateloop::testing::OwnedProblem;
use gateloop::{Mode, Outputs};

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

/// A chunked f32 that forgets h0 whenever K > 2: caught, shrunk to the
/// smallest such case (K = 3 stays because halving K to 1 or 2 makes it pass),
/// written, and replayable.
#[test]
fn injected_fault_is_caught_shrunk_written_and_replayable() {
    let wrong = |p: &OwnedProblem<f64>| -> Result<Outputs<f64>, String> {
        let mut p = p.clone();
        if p.dims.key_dim > 2 {
            p.h0 = None;
        }
        reference::recurrent::forward(&p.to_f32().view())
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
    assert_eq!(o.status.code(), Some(1), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
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

#[test]
fn cli_usage_errors_exit_2() {
    let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--dtypes", "f16"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("f16"));
    // This build's GPU layer (a stub, or no driver here) cannot be used: exit 2 with a message.
    if gateloop::cuda::Gpu::new(0).is_err() {
        let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--device", "cuda"]).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("cannot use the GPU"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Chunked in f64 alone is nothing to fuzz.
    let o = Command::new(BIN).args(["fuzz", "--cases", "1", "--modes", "chunked", "--dtypes", "f64"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}
