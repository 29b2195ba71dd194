//! Shared helpers of the GPU tests.
//!
//! `gpu_or_skip()` opens device 0 or explains why not: without a GPU, driver
//! or kernels, a test prints `SKIPPED (no GPU): <reason>` to stderr and
//! passes; with `GATELOOP_REQUIRE_GPU=1` that is a failure instead.

#![allow(dead_code)]

use std::io::Write as _;
use std::sync::OnceLock;

use gateloop::cuda::{Gpu, GpuError};

/// Whether `GATELOOP_REQUIRE_GPU` asks for a GPU (any value but empty/0).
pub fn gpu_required() -> bool {
    std::env::var("GATELOOP_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Device 0, opened once per test binary (tests run on several threads and
/// share it), or `None` after printing the skip notice.
pub fn gpu_or_skip() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| Gpu::new(0).map_err(|e: GpuError| e.to_string()));
    match gpu {
        Ok(gpu) => Some(gpu),
        Err(reason) => {
            if gpu_required() {
                panic!("GATELOOP_REQUIRE_GPU is set but no GPU is usable: {reason}");
            }
            // Straight to the process's stderr: the test harness captures
            // eprintln!, which would hide the notice of a passing test.
            // One write per line so parallel tests do not interleave; libtest
            // names each test's thread after the test.
            let test = std::thread::current().name().unwrap_or("?").to_string();
            let line = format!("SKIPPED (no GPU): {reason} [{test}]\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
    }
}
