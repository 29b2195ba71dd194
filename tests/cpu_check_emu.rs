//! The device-side gate check's CUDA kernel (`cuda/check.cu`,
//! `gateloop_check_log_gate`) compiled unchanged for the CPU by
//! `tests/kernel_emu/build.sh check` (every thread of a block an OS thread,
//! warp shuffles and barriers emulated, device atomics as std::atomic_ref)
//! and launched as `cuda::check::log_gate` launches it: its result words
//! must be the host's answer (`problem::log_gate_violation` in index order):
//! the first offending index and that element's own bits, or n and nothing
//! when the buffer is clean; and every block must have taken its ticket.
//! The launcher's grid and smaller ones (grid-stride rounds); one partial
//! block to several blocks; each kind of bad value at the edges of blocks
//! and of the buffer; several bad values, the first reported. Plus the race
//! build (ThreadSanitizer, blocks last first). Blocks run one after another,
//! so the cross-block ticket protocol itself is left to the GPU test
//! (tests/gpu_check.rs); what runs here is the indexing, the grid-stride
//! loop and the block reduction. Skips (with a notice) without g++.

mod common;
mod emu_support;

use gateloop::Complex;
use gateloop::cuda::check;
use gateloop::problem::log_gate_violation;

/// (first index, bits of result[1] as (re, im), finished blocks) of one
/// emulated launch on `gate` with `grid` blocks.
fn run(emu: &std::path::Path, tag: &str, gate: &[Complex<f32>], grid: u32) -> (u64, (u32, u32), u64) {
    let dir = emu_support::case_dir(&format!("check_{tag}"));
    std::fs::write(dir.join("dims.txt"), format!("{} {grid}", gate.len())).unwrap();
    let flat: Vec<f32> = gate.iter().flat_map(|g| [g.re, g.im]).collect();
    emu_support::write_f32_file(&dir.join("log_gate.bin"), &flat);
    let status = std::process::Command::new(emu).arg(&dir).status().unwrap();
    assert!(status.success(), "{dir:?}: emulator failed: {status}");
    let text = std::fs::read_to_string(dir.join("result.txt")).unwrap();
    let w: Vec<u64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (w[0], (w[1] as u32, w[2] as u32), w[3])
}

/// The answer the kernel must give: the first offending index and its bits,
/// or (n, (0, 0)).
fn host_answer(gate: &[Complex<f32>]) -> (u64, (u32, u32)) {
    match gate.iter().position(|&g| log_gate_violation(g).is_some()) {
        Some(i) => (i as u64, (gate[i].re.to_bits(), gate[i].im.to_bits())),
        None => (gate.len() as u64, (0, 0)),
    }
}

/// A clean gate buffer of `n` elements: decays with large phases, and the
/// domain's edges (`common::in_domain_extreme`: resets with finite or
/// extreme phases, Re = ±0, subnormal Re).
fn clean(n: usize) -> Vec<Complex<f32>> {
    (0..n)
        .map(|i| {
            let ordinary = Complex::new(-0.25 - (i % 7) as f32, 3.0 * i as f32);
            if i % 6 == 0 { ordinary } else { common::in_domain_extreme(i % 6 - 1, ordinary) }
        })
        .collect()
}

/// Every case on `emu`: sizes from one partial block to several blocks, the
/// launcher's grid and grids of 1 and 2 blocks (grid-stride rounds); clean
/// buffers, each bad value at the buffer's and the blocks' edges, and
/// several bad values (later ones first).
fn all_cases(emu: &std::path::Path, sizes: &[usize]) {
    let mut runs = 0;
    for &n in sizes {
        let mut grids = vec![check::grid(n), 1, 2];
        grids.dedup();
        let base = clean(n);
        let mut check_one = |gate: &[Complex<f32>], what: &str| {
            for &grid in &grids {
                let got = run(emu, &format!("{n}_{grid}_{runs}"), gate, grid);
                runs += 1;
                let (first, bits) = host_answer(gate);
                assert_eq!((got.0, got.1), (first, bits), "n = {n}, grid = {grid}, {what}: kernel vs host");
                assert_eq!(got.2, u64::from(grid), "n = {n}, grid = {grid}, {what}: blocks that took a ticket");
            }
        };
        check_one(&base, "clean");
        for (k, (bad, _)) in common::bad_log_gates().into_iter().enumerate() {
            for at in [0, 255, 256, n - 1] {
                if at < n {
                    let mut g = base.clone();
                    g[at] = bad;
                    check_one(&g, &format!("bad value {k} at {at}"));
                }
            }
        }
        let mut g = base.clone();
        for (k, at) in [n - 1, n * 3 / 4, n / 2 + 1, n / 3, 3].into_iter().filter(|&at| at < n).enumerate() {
            g[at] = common::bad_log_gates()[k % 7].0;
        }
        check_one(&g, "several bad values");
    }
    println!("{runs} emulated launches");
}

#[test]
fn check_kernel_emulated_matches_the_host() {
    let Some(emu) = emu_support::kernel_emulator("check", "GATELOOP_CHECK_EMU") else { return };
    all_cases(&emu, &[1, 257, 1100]);
}

/// The same on the race build (ThreadSanitizer; blocks last first, so the
/// last ticket falls to block 0): a shared or global word touched by two
/// threads of a block with no barrier between them, one writing, fails the
/// run.
#[test]
fn check_kernel_is_race_free() {
    let Some(emu) = emu_support::race_checking_emulator("check") else { return };
    all_cases(&emu, &[300]);
}
