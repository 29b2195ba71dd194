//! Helpers of the tests that run CUDA kernels under the CPU kernel emulator
//! (tests/kernel_emu): building an emulator binary and its raw f32 file
//! format. Kept out of tests/common, which the GPU tests share: the GPU
//! bundle has no source tree, and these read files by path.

#![allow(dead_code)]

/// What a kernel emulator build instruments (`tests/kernel_emu/build.sh`,
/// `GATELOOP_EMU_SANITIZER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sanitizer {
    /// AddressSanitizer, compute-sanitizer memcheck's counterpart: the
    /// tests' default build (`GATELOOP_EMU_SANITIZER=none` in the
    /// environment turns it off).
    Address,
    /// ThreadSanitizer, racecheck's counterpart: a shared or global word
    /// touched by two threads of a block with no barrier between them, one
    /// of them writing, makes the emulator exit 66 with the report.
    Thread,
}

/// An emulator binary: the path in env var `env` when set, else built by
/// `tests/kernel_emu/build.sh <kind>` (AddressSanitizer unless the
/// environment says otherwise) into cargo's per-target scratch directory;
/// see [`build_emulator`].
pub fn kernel_emulator(kind: &str, env: &str) -> Option<std::path::PathBuf> {
    match std::env::var(env) {
        Ok(p) => Some(p.into()),
        Err(_) => build_emulator(kind, Sanitizer::Address),
    }
}

/// The ThreadSanitizer build of emulator `kind` (the race checks).
pub fn race_checking_emulator(kind: &str) -> Option<std::path::PathBuf> {
    build_emulator(kind, Sanitizer::Thread)
}

/// Emulator `kind` built by `tests/kernel_emu/build.sh` into cargo's
/// per-target scratch directory as `gateloop_<kind>_<sanitizer>_emu` + a hash
/// of everything the build reads (the build script, every source file under
/// tests/kernel_emu and cuda, the sanitizer, `kind`): test binaries and runs
/// share a build until a source changes, instead of rebuilding it (~3–10 s
/// each) and leaving a copy per process (a new build removes those of older
/// sources). Built under a private name and renamed into place, so
/// concurrent builders never see a partial file. `None`, with a printed
/// `SKIPPED` notice, when the build fails (no g++, or no ThreadSanitizer).
pub fn build_emulator(kind: &str, sanitizer: Sanitizer) -> Option<std::path::PathBuf> {
    // The address build honours the caller's GATELOOP_EMU_SANITIZER (none:
    // uninstrumented); the race build is ThreadSanitizer or nothing.
    let flavour = match sanitizer {
        Sanitizer::Address => std::env::var("GATELOOP_EMU_SANITIZER").unwrap_or_else(|_| "address".into()),
        Sanitizer::Thread => "thread".into(),
    };
    cached_build(kind, &flavour, &format!("gateloop_{kind}_{flavour}_emu"), |p| p.is_file())
}

/// The fake CUDA driver with the shared-memory bank model
/// (`tests/kernel_emu/build.sh banks`: a directory holding libcuda.so), built
/// once per source hash into cargo's per-target scratch directory like
/// [`build_emulator`]. `None`, with a printed `SKIPPED` notice, when the
/// build fails (no g++, or no ThreadSanitizer instrumentation in it).
pub fn build_banks_library() -> Option<std::path::PathBuf> {
    // build.sh ignores the sanitizer for the fake driver's builds.
    cached_build("banks", "none", "gateloop_banks_lib", |p| p.join("libcuda.so").is_file())
}

/// `tests/kernel_emu/build.sh kind` (GATELOOP_EMU_SANITIZER=flavour) into
/// cargo's scratch directory as `name` + `_` + the sources' hash, unless
/// `built` says a build of these sources is there: under a private name
/// first, then renamed into place (or a concurrent builder's copy taken);
/// older builds of `name` removed. A file or a directory, as `kind` builds.
fn cached_build(
    kind: &str,
    flavour: &str,
    name: &str,
    built: impl Fn(&std::path::Path) -> bool,
) -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = dir.join(format!("{name}_{:016x}", sources_hash(root, kind)));
    if built(&out) {
        return Some(out);
    }
    let remove = |p: &std::path::Path| {
        let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    };
    // Private per build, not only per process: two threads of one test
    // binary may build the same emulator at once.
    let partial = dir.join(format!("{name}_building_{}", unique_suffix()));
    let status = std::process::Command::new("bash")
        .arg(root.join("tests/kernel_emu/build.sh"))
        .arg(kind)
        .arg(&partial)
        .env("GATELOOP_EMU_SANITIZER", flavour)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        // A directory is not renamed over a concurrent builder's copy: take that.
        Ok(s) if s.success() && (std::fs::rename(&partial, &out).is_ok() || built(&out)) => {
            remove(&partial);
            // Builds of older sources are dead weight now: remove them.
            let stale = |p: &std::path::Path| {
                p != out
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{name}_")) && !n.contains("_building_"))
            };
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if stale(&e.path()) {
                    remove(&e.path());
                }
            }
            Some(out)
        }
        other => {
            remove(&partial);
            eprintln!(
                "SKIPPED (no {name} build): GATELOOP_EMU_SANITIZER={flavour} tests/kernel_emu/build.sh {kind} failed: {other:?}"
            );
            None
        }
    }
}

/// A hash of the emulator build's inputs but the sanitizer (which names the
/// file): `kind` and the contents (by path) of every file but the docs
/// (*.md) under tests/kernel_emu and cuda.
fn sources_hash(root: &std::path::Path, kind: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out)
            } else if p.extension().is_none_or(|x| x != "md") {
                out.push(p)
            }
        }
    }
    let mut all = Vec::new();
    files(&root.join("tests/kernel_emu"), &mut all);
    files(&root.join("cuda"), &mut all);
    all.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    kind.hash(&mut h);
    for p in all {
        p.strip_prefix(root).unwrap_or(&p).hash(&mut h);
        std::fs::read(&p).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// A fresh case directory for an emulator driver (tests/kernel_emu/*.cpp):
/// dims.txt = "B L H K V gate_dim has_h0" followed by `extra_dims`, and the
/// inputs q.bin, k.bin, v.bin, log_gate.bin, h0.bin (when given) of `p`,
/// complex tensors interleaved (re, im) or, with `real_parts`, their real
/// parts; then `files` as named, in a directory of its own ([`case_dir`]).
pub fn write_case(
    tag: &str,
    p: &gateloop::testing::OwnedProblem<f32>,
    extra_dims: &[String],
    real_parts: bool,
    files: &[(&str, &[f32])],
) -> std::path::PathBuf {
    let d = p.dims;
    let dir = case_dir(tag);
    let mut line = format!(
        "{} {} {} {} {} {} {}",
        d.batch,
        d.len,
        d.heads,
        d.key_dim,
        d.value_dim,
        d.gate_dim(),
        p.h0.is_some() as u8
    );
    for x in extra_dims {
        line.push(' ');
        line.push_str(x);
    }
    std::fs::write(dir.join("dims.txt"), line).unwrap();
    let planes = |z: &[gateloop::Complex<f32>]| -> Vec<f32> {
        if real_parts { z.iter().map(|z| z.re).collect() } else { z.iter().flat_map(|z| [z.re, z.im]).collect() }
    };
    write_f32_file(&dir.join("q.bin"), &p.q);
    write_f32_file(&dir.join("k.bin"), &p.k);
    write_f32_file(&dir.join("v.bin"), &p.v);
    write_f32_file(&dir.join("log_gate.bin"), &planes(&p.log_gate));
    if let Some(h0) = &p.h0 {
        write_f32_file(&dir.join("h0.bin"), &planes(h0));
    }
    for (name, x) in files {
        write_f32_file(&dir.join(name), x);
    }
    dir
}

/// A new, empty directory for one emulator run, named by `tag`, the process
/// and a per-process sequence number: the tests of one binary run on
/// several threads at once, and two of them may use the same tag (the same
/// seed and dtype, say) — each run must own its files, or one test's
/// cleanup removes the other's outputs before it reads them.
pub fn case_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gateloop_emu_{}_{tag}", unique_suffix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// "<process id>_<sequence number>": a name part no other call, in this
/// process or another one running now, returns.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}_{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Writes raw little-endian f32 (the emulator drivers' input format).
pub fn write_f32_file(path: &std::path::Path, x: &[f32]) {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Reads raw little-endian f32 (the emulator drivers' output format).
pub fn read_f32_file(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
