//! Helpers of the tests that run CUDA kernels under the CPU kernel emulator
//! (tests/kernel_emu): building an emulator binary and its raw f32 file
//! format. Kept out of tests/common, which the GPU tests share: the GPU
//! bundle has no source tree, and these read files by path.

#![allow(dead_code)]

/// An emulator binary: the path in env var `env` when set, else built by
/// `tests/kernel_emu/<script>` into cargo's per-target scratch directory
/// (`name` + pid: concurrent runs do not share it); `None`, with
/// a printed `SKIPPED` notice, when the build fails (no g++).
pub fn kernel_emulator(script: &str, env: &str, name: &str) -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(p.into());
    }
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}_{}", std::process::id()));
    let root = env!("CARGO_MANIFEST_DIR");
    let status = std::process::Command::new("bash")
        .arg(format!("{root}/tests/kernel_emu/{script}"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Some(out),
        other => {
            eprintln!("SKIPPED (no kernel emulator): tests/kernel_emu/{script} failed: {other:?}");
            None
        }
    }
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
