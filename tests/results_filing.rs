//! `scripts/gpu-results.py`, the filing of a GPU bundle run, on synthetic
//! results: the targets' verdicts (per peer run, and over every run), the carry, staging, rows and output rules
//! and the packed path's cost it reads off known times, the files it copies, and the merge of two runs (the first packed
//! as the device tool returns it, results.tar.gz; the second a folder). (Python's standard library only; the
//! test command's machine has python3 for the nvcc wheels.)

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-results.py")
}

/// Whether python3 runs here; if not, says that `script` was skipped.
fn have_python(script: &str) -> bool {
    let ok = Command::new("python3").arg("--version").output().is_ok();
    if !ok {
        println!("SKIPPED (no python3): {script} not run");
    }
    ok
}

/// A fresh temporary folder of this process named `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn bench_row(kernel: &str, dtype: &str, s: [usize; 5], ms: f64) -> serde_json::Value {
    json!({"kernel": kernel, "dtype": dtype, "median_ms": ms,
           "shape": {"batch": s[0], "len": s[1], "heads": s[2], "key_dim": s[3], "value_dim": s[4], "gate": "channel"}})
}

fn ours_row(kernel: &str, dtype: &str, s: [usize; 5], ms: f64, of_hbm: f64) -> serde_json::Value {
    let column = if kernel.contains("fwd-bwd") { "fwdbwd" } else { "fwd" };
    let gate = if kernel.contains("real") { "real" } else { "complex" };
    json!({"kernel": kernel, "dtype": dtype, "shape": s, "shape_key": s.map(|x| x.to_string()).join(","),
           "gate": gate, "column": column, "median_ms": ms, "of_hbm_floor": of_hbm})
}

fn case(peer: &str, column: &str, s: [usize; 5], status: &str, ms: f64) -> serde_json::Value {
    json!({"id": format!("{peer}-{column}"), "peer": peer, "column": column, "shape": s, "status": status,
           "median_ms": ms})
}

/// gpu-results.py on `runs` (in order), filed under `into`: its stdout, the verdict.
fn file_runs(runs: &[&Path], into: &Path) -> String {
    let out = Command::new("python3").arg(script()).args(runs).arg("--into").arg(into).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{}", text, String::from_utf8_lossy(&out.stderr));
    text
}

/// The verdict's row of `target` (the line that starts with `| target`).
fn target_line<'a>(text: &'a str, target: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(&format!("| {target}"))).unwrap_or_else(|| panic!("no `{target}` in\n{text}"))
}

/// A peers.json at shape `s`: ours real bf16 1.0 ms, complex bf16 1.5,
/// fwd+bwd 5.0; fla chunk_gla forward 1.5, forward+backward 5.5.
fn peer_run(s: [usize; 5]) -> serde_json::Value {
    json!({
        "shapes": [s],
        "ours": {"status": "ok", "results": [
            ours_row("chunked-real", "bf16", s, 1.0, 0.40),
            ours_row("chunked", "bf16", s, 1.5, 0.55),
            ours_row("chunked-fwd-bwd", "bf16", s, 5.0, 0.2),
        ]},
        "cases": [
            case("fla_chunk_gla", "fwd", s, "ok", 1.5),
            case("fla_chunk_gla", "fwdbwd", s, "ok", 5.5),
        ],
    })
}

#[test]
fn files_a_run_and_reads_the_targets_and_the_carry_rule() {
    if !have_python("scripts/gpu-results.py") {
        return;
    }
    let dir = scratch("gateloop-results-filing");
    // Run 1, the default steps; run 2, `carry profile`, whose empty tests.log
    // must not replace run 1's.
    let res = dir.join("results");
    let res2 = dir.join("results2");
    write(&res.join("env.txt"), "date: 2027-01-02T03:04:05Z\nhost: x\n");
    write(&res.join("tests.log"), "test result: ok. 9 passed\n");
    write(&res2.join("env.txt"), "date: 2027-01-09T03:04:05Z\nhost: y\n");
    write(&res2.join("tests.log"), "");
    let summary2 = json!({"schema": "gateloop-bundle/1", "verdict": "OK", "require_gpu": 1, "total_s": 100,
        "steps": [{"step": "carry", "status": "PASS", "seconds": 50, "note": "5 shapes"}]});
    write(&res2.join("summary.json"), &summary2.to_string());
    let summary = json!({"schema": "gateloop-bundle/1", "verdict": "OK", "require_gpu": 1, "total_s": 400,
        "steps": [{"step": "test gpu_scan", "status": "PASS", "seconds": 12, "note": "9 passed, 0 failed"}]});
    write(&res.join("summary.json"), &summary.to_string());
    let device = json!({"name": "NVIDIA H200"});
    // The staging: ahead 20% faster at B8 L4096 H16 (bf16), 1% (noise) at
    // B1 L65536 H4: mixed.
    let bench_rows = [
        bench_row("recurrent", "bf16", [8, 4096, 16, 64, 64], 2.0),
        bench_row("recurrent-batched", "bf16", [8, 4096, 16, 64, 64], 2.0),
        bench_row("recurrent-ahead", "bf16", [8, 4096, 16, 64, 64], 1.6),
        bench_row("recurrent", "bf16", [1, 65536, 4, 64, 64], 30.0),
        bench_row("recurrent-batched", "bf16", [1, 65536, 4, 64, 64], 30.0),
        bench_row("recurrent-ahead", "bf16", [1, 65536, 4, 64, 64], 29.7),
        // The rows: four rows a thread 30% faster at B8 L4096 H16 and 10% at
        // B1 L65536 H4: a win in both.
        bench_row("recurrent-rows4", "bf16", [8, 4096, 16, 64, 64], 1.4),
        bench_row("recurrent-rows4", "bf16", [1, 65536, 4, 64, 64], 27.0),
        // The packed path: 1% slower (noise) at B8 L4096 H16, 10% at B1
        // L65536 H4: it costs up to 1.100x, one case beyond noise.
        bench_row("recurrent-varlen", "bf16", [8, 4096, 16, 64, 64], 2.02),
        bench_row("recurrent-varlen", "bf16", [1, 65536, 4, 64, 64], 33.0),
        // The launches: state_seq and output of the chunked row (bench.json
        // "phases"), the output's with its residency (rows from 2026-12-02,
        // later) and the state's without (earlier rows).
        {
            let mut r = bench_row("chunked", "bf16", [1, 65536, 4, 64, 64], 4.0);
            r["phases"] = json!([{"kernel": "gateloop_chunk_state_seq", "median_ms": 1.0},
                                 {"kernel": "gateloop_chunk_output", "median_ms": 3.0, "blocks": 4096,
                                  "block_threads": 256, "shared_bytes": 83456, "resident_per_sm": 2,
                                  "waves": 15.515}]);
            r
        },
        // The output rule: the fragment launch 25% faster in its one case.
        bench_row("chunked-frag", "bf16", [1, 65536, 4, 64, 64], 3.0),
    ];
    write(&res.join("bench.json"), &json!({"gpu": true, "device": device, "results": bench_rows}).to_string());
    // The carry sweep: sequential loses below 132 blocks in bf16 and below 264
    // in f32, wins from there on: the rule is the larger, 264.
    let sweep = [[1, 65536, 8, 64, 64], [1, 32768, 16, 64, 64], [1, 15872, 33, 64, 64], [2, 7936, 33, 64, 64]];
    let mut rows = Vec::new();
    for (i, s) in sweep.iter().enumerate() {
        rows.push(bench_row("chunked-separate", "bf16", *s, 1.0));
        rows.push(bench_row("chunked-sequential", "bf16", *s, if i >= 2 { 0.9 } else { 1.1 }));
        rows.push(bench_row("chunked-separate", "f32", *s, 2.0));
        rows.push(bench_row("chunked-sequential", "f32", *s, if i >= 3 { 1.8 } else { 2.2 }));
    }
    write(&res2.join("carry.json"), &json!({"gpu": true, "device": device, "results": rows}).to_string());
    let s = [8, 4096, 16, 64, 64];
    let mut peers = peer_run(s);
    peers["ours"]["results"].as_array_mut().unwrap().push(ours_row("chunked", "f32", s, 3.0, 0.30));
    peers["cases"].as_array_mut().unwrap().push(case("jax_assoc_scan", "fwd", s, "OOM", 0.0));
    write(&res.join("peers/peers.json"), &peers.to_string());
    write(&res2.join("profile/chunked-bf16.txt"), "  gateloop_chunk_state_bf16_c_exact\n");
    // Its per-instruction page: one kernel, two instructions, one of them a
    // shared load at 4x its ideal wavefronts.
    write(
        &res2.join("profile/chunked-bf16.sass.csv"),
        "\"Kernel Name\",\"gateloop_chunk_output_bf16_c_exact\",\n\
         \"Address\",\"Source\",\"Warp Stall Sampling (All Samples)\",\"Instructions Executed\",\
         \"L1 Wavefronts Shared\",\"L1 Wavefronts Shared Ideal\",\"L1 Wavefronts Shared Excessive\",\"stall_short_sb\"\n\
         \"0x10\",\"LDS.128 R4, [R46]\",\"900\",\"100\",\"400\",\"100\",\"300\",\"600\"\n\
         \"0x20\",\"FADD R4, R4, R5\",\"100\",\"100\",\"0\",\"0\",\"0\",\"50\"\n",
    );

    // Run 1 as the device tool returns it: results.tar.gz in the files folder.
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let tar = Command::new("tar").arg("-czf").arg(files.join("results.tar.gz")).arg("-C").arg(&res).arg(".").status();
    if !tar.is_ok_and(|s| s.success()) {
        println!("SKIPPED (no tar): scripts/gpu-results.py not run");
        return;
    }

    let into = dir.join("into");
    let text = file_runs(&[&files, &res2], &into);
    let line = |target: &str| target_line(&text, target);
    // fla 1.5 / ours real 1.0 = 1.50× ≥ 1.2.
    assert!(line("real bf16").contains("1.50×") && line("real bf16").ends_with("| met |"), "{text}");
    // chunked complex 1.5 / chunked real 1.0 = 1.50× ≤ 2.
    assert!(line("chunked complex").contains("1.50×") && line("chunked complex").ends_with("| met |"), "{text}");
    // JAX out of memory: met where it fits.
    assert!(line("≥ 100×").contains("out of memory") && line("≥ 100×").ends_with("| met |"), "{text}");
    // fwd+bwd: fla 5.5 / ours 5.0 = 1.10× < 1.2.
    assert!(line("fwd+bwd").contains("1.10×") && line("fwd+bwd").ends_with("| **missed** |"), "{text}");
    // The best chunked forward at B8 L4096 H16: 55% of the HBM floor.
    assert!(line("within 2×").contains("55%") && line("within 2×").ends_with("| met |"), "{text}");
    assert!(text.contains("4 met, 1 missed, 0 not measured"), "{text}");
    assert!(text.contains("Suggested `SEQUENTIAL_MIN_BLOCKS = 264`"), "{text}");
    assert!(text.contains("bf16: sequential wins from 132 blocks on"), "{text}");
    let row = "| bf16 | B8 L4096 H16 K=V=64 | channel | 256 | recurrent-batched | 2.000 ms | recurrent-ahead | 1.600 ms | 0.800 |";
    assert!(text.contains(row), "{text}");
    let row = "| bf16 | B1 L65536 H4 K=V=64 | channel | 8 | recurrent-batched | 30.0 ms | recurrent-ahead | 29.7 ms | 0.990 |";
    assert!(text.contains(row), "{text}");
    assert!(text.contains("Mixed: the variant faster by ≥ 3% in 1 of 2 cases"), "{text}");
    let row =
        "| bf16 | B8 L4096 H16 K=V=64 | channel | 256 | recurrent | 2.000 ms | recurrent-rows4 | 1.400 ms | 0.700 |";
    assert!(text.contains(row), "{text}");
    assert!(text.contains("## Rows rule (recurrent-rows4 against recurrent)"), "{text}");
    assert!(text.contains("Suggested: `RecurrentRows::Four` as the default (faster by ≥ 3% in all 2 cases)"), "{text}");
    assert!(text.contains("## Packed sequences (recurrent-varlen against recurrent)"), "{text}");
    let row =
        "| bf16 | B8 L4096 H16 K=V=64 | channel | 256 | recurrent | 2.000 ms | recurrent-varlen | 2.020 ms | 1.010 |";
    assert!(text.contains(row), "{text}");
    assert!(
        text.contains("The packed path costs up to 1.100× recurrent (1 of 2 cases beyond the 3% of noise)"),
        "{text}"
    );
    let row = "| bf16 | B1 L65536 H4 K=V=64 | channel | chunked | 4.000 ms | chunked-frag | 3.000 ms | 0.750 |";
    assert!(text.contains(row), "{text}");
    assert!(text.contains("Suggested: `ChunkOutput::Fragments` for f16 and bf16 inputs as the default"), "{text}");
    let row = "| chunked | bf16 | B1 L65536 H4 K=V=64 | channel | 4.000 ms | chunk_state_seq 1.000 ms (25%), \
               chunk_output 3.000 ms (75%; 2/SM, 15.52 waves) |";
    assert!(text.contains(row), "{text}");

    let filed = into.join("gpu-2027-01-02-nvidia-h200");
    for f in ["verdict.md", "summary.json", "carry.json", "bench.json", "env.txt", "peers/peers.json"] {
        assert!(filed.join(f).is_file(), "{f} not filed");
    }
    assert!(filed.join("profile/chunked-bf16.txt").is_file());
    // The page itself is not kept; its digest is, with the excess named.
    assert!(!filed.join("profile/chunked-bf16.sass.csv").exists());
    let digest = std::fs::read_to_string(filed.join("profile/chunked-bf16.sass-digest.txt")).unwrap();
    assert!(digest.contains("== gateloop_chunk_output_bf16_c_exact: 2 instructions, 200 executed"), "{digest}");
    assert!(digest.contains("shared wavefronts 400, ideal 100, excess 300 (75% excess)"), "{digest}");
    assert!(digest.contains("warp-stall samples 1000: short_sb 65%"), "{digest}");
    assert!(digest.contains("        300         400  LDS.128 R4, [R46]"), "{digest}");
    // The merge: run 1's log kept, both runs' steps listed.
    let log = std::fs::read_to_string(filed.join("tests.log")).unwrap();
    assert!(log.contains("test result: ok. 9 passed\n") && log.matches("######## run").count() == 1, "{log}");
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(filed.join("summary.json")).unwrap()).unwrap();
    let steps: Vec<&str> = merged["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["test gpu_scan", "carry"]);
    assert!(text.contains("| carry | PASS |"), "{text}");
    assert_eq!(std::fs::read_to_string(filed.join("verdict.md")).unwrap(), text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer run with fla quick-tuned (`peers.py --fla-tune quick`): fla's time
/// is an upper bound on its fully tuned time, so a target against fla that
/// the run meets stays "not measured", one it misses is missed; and the
/// choice of the one configuration per kernel (`fla_tune.py --self-test`).
#[test]
fn quick_tuned_fla_settles_only_the_misses() {
    if !have_python("scripts/gpu-results.py") {
        return;
    }
    let tune = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/fla_tune.py");
    let out = Command::new("python3").arg(&tune).arg("--self-test").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("fla_tune self-test: ok"), "{text}");

    let dir = scratch("gateloop-results-quick");
    let res = dir.join("results");
    write(&res.join("env.txt"), "date: 2027-01-02T03:04:05Z\nhost: x\n");
    let device = json!({"name": "NVIDIA H200"});
    write(&res.join("bench.json"), &json!({"gpu": true, "device": device, "results": []}).to_string());
    let s = [8, 4096, 16, 64, 64];
    let mut peers = peer_run(s);
    peers["fla_tune"] = json!("quick");
    write(&res.join("peers/peers.json"), &peers.to_string());
    let into = dir.join("into");
    let text = file_runs(&[&res], &into);
    let line = |target: &str| target_line(&text, target);
    // fla 1.5 / ours 1.0 = 1.50× ≥ 1.2, but against one configuration only.
    let real = line("real bf16");
    assert!(real.contains("1.50×") && real.contains("quick-tuned") && real.ends_with("| not measured |"), "{text}");
    // fla 5.5 / ours 5.0 = 1.10× < 1.2: missed, whatever fla's full autotune finds.
    let fb = line("fwd+bwd");
    assert!(fb.contains("1.10×") && fb.contains("quick-tuned") && fb.ends_with("| **missed** |"), "{text}");
    assert!(text.contains("fla ran quick-tuned"), "{text}");
    // With a real-gate fwd+bwd (fla's own operator), that is the one compared:
    // fla 5.5 / ours real 4.0 = 1.38×, met against quick-tuned fla only.
    peers["ours"]["results"].as_array_mut().unwrap().push(ours_row("chunked-real-fwd-bwd", "bf16", s, 4.0, 0.25));
    write(&res.join("peers/peers.json"), &peers.to_string());
    let text = file_runs(&[&res], &dir.join("into-real"));
    let fb = target_line(&text, "fwd+bwd");
    assert!(fb.contains("1.38×") && fb.contains("chunked-real-fwd-bwd") && fb.contains("(real gates)"), "{text}");
    assert!(fb.ends_with("| not measured |"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Peer runs that split issue 4's shapes between them (the GPU plan's two
/// calls), and a third that times fla fully tuned where the first had it
/// quick-tuned: the section over every run takes each (target, shape) from
/// the last run that settled it, lists the shapes no run measured as not
/// measured, and never mixes two runs in one ratio.
#[test]
fn targets_over_every_run_take_the_last_run_that_settled_each() {
    if !have_python("scripts/gpu-results.py") {
        return;
    }
    let dir = scratch("gateloop-results-overall");
    let (s1, s2) = ([8, 4096, 16, 64, 64], [8, 1024, 8, 64, 64]);
    let device = json!({"name": "NVIDIA H200"});
    let run = |name: &str, peers: serde_json::Value| {
        let res = dir.join(name);
        write(&res.join("env.txt"), "date: 2027-01-02T03:04:05Z\nhost: x\n");
        write(&res.join("bench.json"), &json!({"gpu": true, "device": device, "results": []}).to_string());
        write(&res.join("peers/peers.json"), &peers.to_string());
        res
    };
    // Run 1 at s1, fla quick-tuned: real bf16 1.50x (met against its one
    // configuration: not measured), fwd+bwd 1.10x (missed).
    let mut quick = peer_run(s1);
    quick["fla_tune"] = json!("quick");
    let r1 = run("r1", quick);
    // Run 2 at s2, fla fully tuned: real bf16 1.50x, met.
    let r2 = run("r2", peer_run(s2));
    // Run 3 at s1, fla fully tuned and faster: 0.9 / 1.0 = 0.90x, missed.
    let mut full = peer_run(s1);
    full["cases"][0]["median_ms"] = json!(0.9);
    let r3 = run("r3", full);
    let text = file_runs(&[&r1, &r2, &r3], &dir.join("into"));
    let overall =
        text.split("## Targets over every peer run").nth(1).unwrap_or_else(|| panic!("no section in\n{text}"));
    let line = |target: &str, shape: &str| {
        overall
            .lines()
            .find(|l| l.starts_with(&format!("| {target}")) && l.contains(&format!("| {shape} |")))
            .unwrap_or_else(|| panic!("no `{target}` at {shape} in\n{overall}"))
    };
    let real1 = line("real bf16", "B8 L4096 H16 K=V=64");
    assert!(real1.contains("0.90×") && real1.ends_with("| **missed** | peers-3.json |"), "{overall}");
    let real2 = line("real bf16", "B8 L1024 H8 K=V=64");
    assert!(real2.contains("1.50×") && real2.ends_with("| met | peers-2.json |"), "{overall}");
    // fwd+bwd at s1: missed in runs 1 and 3, the last one named.
    assert!(line("fwd+bwd", "B8 L4096 H16 K=V=64").ends_with("| **missed** | peers-3.json |"), "{overall}");
    // A shape of issue 4 that no run measured.
    let none = line("real bf16", "B1 L8192 H96 K=V=128");
    assert!(none.contains("not run at this shape") && none.ends_with("| not measured | — |"), "{overall}");
    // The HBM-floor target at its one shape only.
    assert_eq!(overall.lines().filter(|l| l.starts_with("| within 2×")).count(), 1, "{overall}");
    // 4 targets × 6 shapes + 1: met = complex ≤ 2× at s1 and s2, real at s2,
    // HBM floor (0.55 of the floor ≥ 0.5); missed = real at s1, fwd+bwd at s1
    // and s2 (1.10×), JAX not run -> not measured.
    assert!(overall.contains("Over every run: 4 met, 3 missed, 18 not measured."), "{overall}");
    // One run alone: no such section.
    let alone = file_runs(&[&r2], &dir.join("into-alone"));
    assert!(!alone.contains("## Targets over every peer run"), "{alone}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// scripts/smem-bank-model.py reproduces the numbers the speed log quotes
/// for the diagonal pairs' mappings (wavefronts per slab: the kernel's loop
/// 2308 with 64-byte rows and 840 with 80-byte ones, the remapping not kept
/// 1312 and 688 with the latter).
#[test]
fn bank_model_reproduces_the_speed_log() {
    if !have_python("scripts/smem-bank-model.py") {
        return;
    }
    let out = Command::new("python3").arg("scripts/smem-bank-model.py").output().expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| 16 | 2308 | 3856 | 1648 |"), "{text}");
    assert!(text.contains("| 20 | 840 | 1312 | 688 |"), "{text}");
}

/// Two runs that each wrote a bench.json (2026-12-04: a first call's bench
/// at K = 64, a third's at K = 128): the later one is filed beside the first
/// as bench-2.json, not over it, and each bench section is read off each run
/// that has its rows, titled with the run's file; a section neither run has
/// rows for is written once.
#[test]
fn a_later_bench_run_is_filed_beside_the_first() {
    if !have_python("scripts/gpu-results.py") {
        return;
    }
    let dir = scratch("gateloop-results-two-benches");
    let device = json!({"name": "NVIDIA H200"});
    let (s1, s2) = ([8, 4096, 16, 64, 64], [4, 2048, 16, 128, 128]);
    let run = |name: &str, rows: Vec<serde_json::Value>| {
        let res = dir.join(name);
        write(&res.join("env.txt"), "date: 2027-01-02T03:04:05Z\nhost: x\n");
        write(&res.join("bench.json"), &json!({"gpu": true, "device": device, "results": rows}).to_string());
        res
    };
    let with_phases = |kernel: &str, s: [usize; 5], ms: f64| {
        let mut r = bench_row(kernel, "bf16", s, ms);
        r["phases"] = json!([{"kernel": "gateloop_chunk_state_seq", "median_ms": ms / 4.0},
                             {"kernel": "gateloop_chunk_output", "median_ms": ms * 3.0 / 4.0}]);
        r
    };
    // Run 1: the staging pair and the real-gate carry pair at s1 and a
    // chunked row; run 2: a chunked-real row at s2, no staging pair.
    let r1 = run(
        "r1",
        vec![
            bench_row("recurrent", "bf16", s1, 2.0),
            bench_row("recurrent-batched", "bf16", s1, 2.0),
            bench_row("recurrent-ahead", "bf16", s1, 1.6),
            bench_row("chunked-real", "bf16", s1, 1.9),
            bench_row("chunked-real-separate", "bf16", s1, 1.5),
            with_phases("chunked", s1, 4.0),
            // V = 64: the output blocks' pair runs one kernel, left out.
            bench_row("chunked-real-fast", "f32", s1, 1.0),
            bench_row("chunked-real-fast-narrow", "f32", s1, 1.0),
        ],
    );
    let r2 = run(
        "r2",
        vec![with_phases("chunked-real-fast", s2, 2.0), bench_row("chunked-real-fast-narrow", "bf16", s2, 3.0)],
    );
    let into = dir.join("into");
    let text = file_runs(&[&r1, &r2], &into);
    let filed = into.join("gpu-2027-01-02-nvidia-h200");
    for (f, kernel) in [("bench.json", "recurrent-ahead"), ("bench-2.json", "chunked-real-fast")] {
        let doc = std::fs::read_to_string(filed.join(f)).unwrap_or_else(|_| panic!("{f} not filed"));
        assert!(doc.contains(kernel), "{f}: {doc}");
    }
    // The staging rule from run 1 alone; no staging section for run 2.
    assert!(text.contains("## Staging rule (recurrent-ahead against recurrent-batched) (bench.json)"), "{text}");
    assert!(!text.contains("(recurrent-ahead against recurrent-batched) (bench-2.json)"), "{text}");
    // The real-gate carry rule: the separate carry 0.79× of the walk's time.
    let carry = text
        .split("## Real-gate carry rule (chunked-real-separate against chunked-real) (bench.json)")
        .nth(1)
        .unwrap_or_else(|| panic!("no real-gate carry section in\n{text}"));
    assert!(carry.contains("| chunked-real | 1.9") && carry.contains("| 0.789 |"), "{carry}");
    assert!(carry.contains("Suggested: `ChunkCarry::Separate` for real gates too"), "{carry}");
    // The launches of each run, each under its own title.
    let launches = |name: &str| {
        text.split(&format!("## Launches (where each row's time goes) ({name})"))
            .nth(1)
            .unwrap_or_else(|| panic!("no launches of {name} in\n{text}"))
            .split("\n## ")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(launches("bench.json").contains("| chunked | bf16 | B8 L4096 H16 K=V=64 |"), "{text}");
    assert!(launches("bench-2.json").contains("| chunked-real-fast | bf16 | B4 L2048 H16 K=V=128 |"), "{text}");
    // The output blocks: run 2's V = 128 pair (narrow 1.5× the wide), run
    // 1's V = 64 pair not a case.
    let blocks = text
        .split("## Output blocks (64 value columns against 128, V > 64) (bench-2.json)")
        .nth(1)
        .unwrap_or_else(|| panic!("no output blocks section in\n{text}"));
    assert!(blocks.contains("| chunked-real-fast-narrow | 3.000 ms | 1.500 |"), "{blocks}");
    assert!(blocks.contains("Suggested: keep `ChunkOutput::Staged` (blocks of 128 columns where V > 64)"), "{blocks}");
    assert!(!text.contains("## Output blocks (64 value columns against 128, V > 64) (bench.json)"), "{text}");
    // Neither run has the rows pair: one section saying so.
    assert_eq!(text.matches("## Rows rule").count(), 1, "{text}");
    assert!(text.contains("(no bench.json with both recurrent and recurrent-rows4: not measured)"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/ncu-opcodes.py` on the committed H200 profile: the executed
/// instruction mix it reads out of the report without Nsight Compute (the
/// numbers docs/speed-log.md quotes in item 2: 5.3e8 and 1.0e9 warp instructions, 54%
/// and 46% integer/address).
#[test]
fn ncu_opcodes_reads_the_committed_profile() {
    if !have_python("scripts/ncu-opcodes.py") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let report = root.join("benches/results/gpu-2026-11-30-nvidia-h200/profile/chunked-bf16.ncu-rep");
    let out =
        Command::new("python3").arg(root.join("scripts/ncu-opcodes.py")).arg(&report).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let launches: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let launches = launches.as_array().unwrap();
    // Two launches of each kernel (the profile's two forward calls).
    let names: Vec<&str> = launches.iter().map(|l| l["kernel"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "gateloop_chunk_state_seq_bf16_c_exact",
            "gateloop_chunk_output_bf16_c_exact",
            "gateloop_chunk_state_seq_bf16_c_exact",
            "gateloop_chunk_output_bf16_c_exact"
        ]
    );
    for (launch, total, integer) in [(&launches[0], 5.322e8, 0.536), (&launches[1], 1.045e9, 0.463)] {
        let t = launch["total"].as_f64().unwrap();
        assert!((t / total - 1.0).abs() < 1e-3, "{launch}");
        let share = launch["classes"]["integer/address"].as_f64().unwrap();
        assert!((share - integer).abs() < 1e-3, "{share}");
        let sum: f64 = launch["classes"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "the classes partition the opcodes: {sum}");
        assert!(launch["opcodes"]["HMMA"].as_f64().unwrap() > 0.0, "{launch}");
    }
}

/// `peers.py --compile-only` (the bundle's `warm` step) on the CPU of this
/// machine: ours is not run, the report says it is a compile-only run and
/// records the compile caches it started with; and a driver stopped by
/// SIGTERM (a step's timeout, or the bundle stopping the warm-up) kills its
/// worker instead of leaving it on the GPU under the next step's timings.
/// The worker runs against a stand-in `torch` module written here (the test
/// command's machine has no torch), and hangs in its first case
/// (GATELOOP_PEERS_INJECT).
#[test]
fn compile_only_run_reports_caches_and_sigterm_stops_the_workers() {
    if !have_python("benches/peers/peers.py") {
        return;
    }
    let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/peers.py");
    let dir = scratch("gateloop-peers-warm");
    let cache = dir.join("triton-cache");
    for k in 0..3 {
        std::fs::create_dir_all(cache.join(format!("kernel{k}"))).unwrap();
    }
    let stub = dir.join("stub");
    write(
        &stub.join("torch/__init__.py"),
        "__version__ = 'stand-in'\n\nclass cuda:\n    @staticmethod\n    def is_available():\n        return False\n\n    \
         @staticmethod\n    def empty_cache():\n        pass\n\n    @staticmethod\n    def synchronize():\n        pass\n",
    );
    let run = |out: &Path, seed: &str| {
        let mut c = Command::new("python3");
        c.arg(&peers)
            .args(["--cpu", "--compile-only", "--peers", "torch_assoc_scan", "--budget-s", "60", "--seed", seed])
            .arg("--out")
            .arg(out)
            .env("TRITON_CACHE_DIR", &cache)
            .env_remove("JAX_COMPILATION_CACHE_DIR")
            .env("PYTHONPATH", &stub)
            .env("GATELOOP_PEERS_INJECT", "torch_assoc_scan=hang");
        c
    };

    // SIGTERM while the worker hangs in its first case.
    let out = dir.join("stopped");
    let seed = format!("{}", 900_000 + std::process::id() % 99_999);
    let mut child = run(&out, &seed).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let worker_running = || {
        let ps = Command::new("pgrep").args(["-f", &format!("peers.py worker .*--seed {seed}")]).output().unwrap();
        !ps.stdout.is_empty()
    };
    // Ready: the driver has written the worker's READY into peers.json.
    let t0 = std::time::Instant::now();
    let ready = || std::fs::read_to_string(out.join("peers.json")).is_ok_and(|d| d.contains("\"torch_assoc_scan\": {"));
    while !ready() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ready() && worker_running(), "the worker never became ready");
    std::thread::sleep(std::time::Duration::from_millis(500)); // into its (hanging) first case
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "the driver exits 128 + SIGTERM");
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(stdout.contains("stopped by signal 15; 1 worker(s) killed"), "{stdout}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!worker_running(), "the worker outlived its driver");

    // The report of the run so far: compile-only, the cache it started with.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("peers.json")).unwrap()).unwrap();
    assert_eq!(doc["compile_only"], json!(true));
    assert_eq!(doc["caches"]["triton"]["entries"], json!(3));
    assert_eq!(doc["ours"]["status"], json!("not run"));
    let md = std::fs::read_to_string(out.join("peers.md")).unwrap();
    assert!(md.contains("**Compile-only run**") && md.contains("triton 3 entries"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}
