//! Build script: checks the kernel ABI header against its committed Rust
//! mirror, finds nvcc, compiles every `cuda/*.cu` to a fatbin (SASS per arch +
//! PTX for the newest), rejects register spills, and embeds the fatbins.
//!
//! Environment:
//! - `NVCC`, `CUDA_PATH`, `CUDA_HOME`, `PATH`: where to look for nvcc (in that
//!   order, then `/usr/local/cuda`, then the toolchain provisioned by
//!   `scripts/provision-nvcc.sh` in `GATELOOP_TOOLCHAIN_DIR` or
//!   `$HOME/.cache/gateloop/cuda-13.0.88`).
//! - `NVCC_CCBIN`: host compiler passed to nvcc as `-ccbin`.
//! - `GATELOOP_CUDA_ARCHS`: comma-separated SASS targets (default `80,90`);
//!   PTX is added for the newest one.
//! - `GATELOOP_REQUIRE_NVCC=1`: a missing nvcc fails the build instead of
//!   producing a CPU-only build.
//! - `GATELOOP_BLESS=1`: a stale `src/cuda/abi.rs` is a warning, not an error
//!   (set by `scripts/regen-abi.sh`, which rewrites it).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const ABI_HEADER: &str = "cuda/gateloop_abi.h";
const ABI_RUST: &str = "src/cuda/abi.rs";
/// The line of `src/cuda/abi.rs` that records the header's hash.
const ABI_HASH_PREFIX: &str = "// gateloop_abi.h sha256: ";
const PROVISIONED_VERSION: &str = "cuda-13.0.88";
const DEFAULT_ARCHS: &str = "80,90";

/// Fails the build with `msg` (no backtrace noise: cargo shows stderr).
fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1);
}

fn env_var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed={ABI_RUST}");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));

    check_abi_hash();

    let sources = cuda_sources();
    let require = env_var("GATELOOP_REQUIRE_NVCC").is_some_and(|v| v != "0");
    let archs = parse_archs(&env_var("GATELOOP_CUDA_ARCHS").unwrap_or_else(|| DEFAULT_ARCHS.into()));

    let generated = match find_nvcc() {
        Some(nvcc) => {
            println!("cargo:rerun-if-changed={}", nvcc.display());
            let ccbin = env_var("NVCC_CCBIN");
            let kernels: Vec<(String, PathBuf)> = sources
                .iter()
                .map(|src| {
                    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let fatbin = out_dir.join(format!("{stem}.fatbin"));
                    (stem, fatbin)
                })
                .collect();
            let errors = run_parallel(sources.len(), |i| {
                let (stem, fatbin) = &kernels[i];
                compile(
                    &nvcc,
                    ccbin.as_deref(),
                    &sources[i],
                    fatbin,
                    &archs,
                    &out_dir.join(format!("{stem}.ptxas.log")),
                )
            });
            if !errors.is_empty() {
                fail(errors.join("\n\nerror: "));
            }
            generated_rust(Some(&nvcc), &archs, &kernels, "")
        }
        None => {
            let why = "nvcc not found (looked at $NVCC, $CUDA_PATH, $CUDA_HOME, PATH, /usr/local/cuda, \
                       and the toolchain of scripts/provision-nvcc.sh)";
            if require {
                fail(format!(
                    "GATELOOP_REQUIRE_NVCC is set but {why}. Run `bash scripts/provision-nvcc.sh` or set NVCC."
                ));
            }
            println!("cargo:warning=gateloop: {why}; building WITHOUT CUDA kernels (CPU only).");
            println!(
                "cargo:warning=gateloop: run `bash scripts/provision-nvcc.sh` then `GATELOOP_REQUIRE_NVCC=1 cargo build` \
                 to build the kernels."
            );
            generated_rust(None, &[], &[], why)
        }
    };
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

/// Fails when `src/cuda/abi.rs` was generated from another version of the header.
fn check_abi_hash() {
    let header = fs::read(ABI_HEADER).unwrap_or_else(|e| fail(format!("cannot read {ABI_HEADER}: {e}")));
    let actual = hex(&Sha256::digest(&header));
    let rust = fs::read_to_string(ABI_RUST).unwrap_or_else(|e| fail(format!("cannot read {ABI_RUST}: {e}")));
    let recorded = rust.lines().take(10).find_map(|l| l.strip_prefix(ABI_HASH_PREFIX)).map(str::trim);
    if recorded != Some(actual.as_str()) {
        if env_var("GATELOOP_BLESS").is_some_and(|v| v != "0") {
            println!("cargo:warning=gateloop: {ABI_RUST} is stale (GATELOOP_BLESS set: regenerating)");
            return;
        }
        fail(format!(
            "\n{ABI_RUST} is out of date with {ABI_HEADER}:\n  header sha256   {actual}\n  recorded sha256 {}\n\
             Regenerate the Rust mirror of the kernel ABI with\n    bash scripts/regen-abi.sh\n\
             (needs libclang: `apt-get install -y libclang-dev`), review and commit {ABI_RUST}.\n",
            recorded.unwrap_or("<none>")
        ));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn cuda_sources() -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> =
        fs::read_dir("cuda").expect("read cuda/").map(|e| e.expect("read cuda/").path()).collect();
    sources.sort();
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources
}

/// `"80, 90,90a"` → `["80", "90", "90a"]` (validated: digits plus an optional suffix letter).
fn parse_archs(spec: &str) -> Vec<String> {
    let archs: Vec<String> =
        spec.split(',').map(|s| s.trim().trim_start_matches("sm_").to_string()).filter(|s| !s.is_empty()).collect();
    for a in &archs {
        let digits = a.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || a.len() - digits.len() > 1 {
            fail(format!("GATELOOP_CUDA_ARCHS: `{a}` is not an arch like 80, 90 or 90a (full value: `{spec}`)"));
        }
    }
    if archs.is_empty() {
        fail(format!("GATELOOP_CUDA_ARCHS is empty (`{spec}`); give e.g. `80,90`"));
    }
    archs
}

fn arch_number(a: &str) -> u32 {
    a.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse().expect("validated arch")
}

/// The newest plain arch: the PTX target.
fn ptx_arch(archs: &[String]) -> u32 {
    archs.iter().map(|a| arch_number(a)).max().expect("non-empty")
}

fn is_exe(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(n) = env_var("NVCC") {
        let p = PathBuf::from(&n);
        if !is_exe(&p) {
            fail(format!("NVCC={n} does not exist or is not a file"));
        }
        return Some(p);
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env_var(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if is_exe(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env_var("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_exe(&p) {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    if is_exe(&p) {
        return Some(p);
    }
    let dir = env_var("GATELOOP_TOOLCHAIN_DIR")
        .map(PathBuf::from)
        .or_else(|| env_var("HOME").map(|h| Path::new(&h).join(".cache/gateloop").join(PROVISIONED_VERSION)))?;
    let p = dir.join("nvidia/cu13/bin/nvcc");
    is_exe(&p).then_some(p)
}

/// Runs `job(0..n)` on as many threads as cargo gives this build (`NUM_JOBS`),
/// each taking the next index when it is free; returns the jobs' errors in
/// index order. An nvcc run is mostly one busy core (cicc, then ptxas per
/// arch), and the kernels take about 9 minutes one after another on a
/// 2-core machine: one nvcc per free job slot overlaps them.
fn run_parallel(n: usize, job: impl Fn(usize) -> Result<(), String> + Sync) -> Vec<String> {
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|p| p.get()))
        .unwrap_or(1)
        .clamp(1, n.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if let Err(e) = job(i) {
                        errors.lock().unwrap().push((i, e));
                    }
                }
            });
        }
    });
    let mut errors = errors.into_inner().unwrap();
    errors.sort();
    errors.into_iter().map(|(_, e)| e).collect()
}

/// Compiles `src` to the fatbin `out`, writing ptxas's report to `log`; an
/// error (nvcc failed, or a kernel spills) says why, with the command.
fn compile(
    nvcc: &Path,
    ccbin: Option<&str>,
    src: &Path,
    out: &Path,
    archs: &[String],
    log: &Path,
) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin").args(["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v", "-Icuda"]);
    // Compressed fatbins (the driver inflates them at module load): the
    // chunked kernels' 24 instantiations are ~4 MB of SASS + PTX per arch
    // uncompressed, embedded in every binary; compressed ~3.5x smaller, which
    // keeps the GPU bundle (9 binaries) under its 60 MB. `-compress-all` is
    // the fatbinary's long-standing format, not nvcc 12.8's
    // `--compress-mode=size`, which needs a newer driver to load.
    cmd.arg("-Xfatbin=-compress-all");
    if let Some(cc) = ccbin {
        cmd.args(["-ccbin", cc]);
    }
    for a in archs {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    let p = ptx_arch(archs);
    cmd.arg("-gencode").arg(format!("arch=compute_{p},code=compute_{p}"));
    cmd.arg("-o").arg(out).arg(src);

    let shown = format!("{cmd:?}");
    let output = cmd.output().map_err(|e| format!("cannot run nvcc: {e}\ncommand: {shown}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed ({})\ncommand: {shown}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        ));
    }
    // ptxas -v reports on stderr (some versions on stdout): keep both.
    let report = format!("{stdout}{stderr}");
    fs::write(log, &report).map_err(|e| format!("cannot write {}: {e}", log.display()))?;
    let spills = find_spills(&report);
    if !spills.is_empty() {
        return Err(format!(
            "register spills in {} (the kernels must not spill):\n  {}\ncommand: {shown}\n--- ptxas report ---\n{report}",
            src.display(),
            spills.join("\n  ")
        ));
    }
    if !report.contains("spill stores") {
        return Err(format!(
            "no ptxas -v report in nvcc's output for {}; cannot check spills\ncommand: {shown}",
            src.display()
        ));
    }
    Ok(())
}

/// Every function of a `ptxas -v` report that spills, as "function (arch): N/M bytes".
fn find_spills(report: &str) -> Vec<String> {
    let mut arch = String::from("?");
    let mut func = String::from("?");
    let mut bad = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            func = parts.next().unwrap_or("?").to_string();
            arch = parts.nth(1).unwrap_or("?").to_string();
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            func = rest.trim().to_string();
        } else if line.contains("spill stores") {
            let number_before = |what: &str| -> u64 {
                line.split(',')
                    .find(|part| part.contains(what))
                    .and_then(|part| part.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| fail(format!("cannot parse ptxas line: {line}")))
            };
            let (stores, loads) = (number_before("spill stores"), number_before("spill loads"));
            if stores > 0 || loads > 0 {
                bad.push(format!("{func} ({arch}): {stores} bytes spill stores, {loads} bytes spill loads"));
            }
        }
    }
    bad
}

fn generated_rust(nvcc: Option<&Path>, archs: &[String], kernels: &[(String, PathBuf)], why: &str) -> String {
    let mut s = String::from("// @generated by build.rs: the embedded CUDA kernels.\n");
    let _ = writeln!(s, "/// Whether the kernels were compiled into this build.");
    let _ = writeln!(s, "pub const BUILT: bool = {};", nvcc.is_some());
    let _ = writeln!(s, "/// Why not, when not.");
    let _ = writeln!(s, "pub const NOT_BUILT_REASON: &str = {why:?};");
    let _ = writeln!(s, "/// The nvcc that compiled them.");
    let _ = writeln!(s, "pub const NVCC: &str = {:?};", nvcc.map(|p| p.display().to_string()).unwrap_or_default());
    let _ = writeln!(s, "/// SASS targets, as in GATELOOP_CUDA_ARCHS (\"80\", \"90\", \"90a\").");
    let _ = writeln!(s, "pub const SASS_ARCHS: &[&str] = &{archs:?};");
    let _ = writeln!(s, "/// The PTX target (JIT-compiled by the driver on newer GPUs); 0 when not built.");
    let _ = writeln!(s, "pub const PTX_ARCH: u32 = {};", if archs.is_empty() { 0 } else { ptx_arch(archs) });
    let _ = writeln!(s, "/// (kernel file stem, fatbin).");
    let _ = writeln!(s, "pub static FATBINS: &[(&str, &[u8])] = &[");
    for (stem, path) in kernels {
        let _ = writeln!(s, "    ({stem:?}, include_bytes!({:?})),", path.display().to_string());
    }
    s.push_str("];\n");
    s
}
