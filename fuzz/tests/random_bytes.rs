//! The `load_problem` target without libFuzzer: a mutation fuzzer on stable.
//! Seeds are valid files (f32 and f64, per-head and per-channel gates, with
//! and without h0); each iteration applies 1–8 random mutations (bit flips,
//! random bytes, header digit edits, truncation, insertion, appending,
//! splicing two seeds). Runs for `GATELOOP_FUZZ_SECS` seconds (default 10).

use std::time::{Duration, Instant};

use gateloop::io::problem_to_bytes;
use gateloop::testing::{dims, random_problem, GateRegime};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (per_head, h0)) in [(false, true), (true, false), (false, false), (true, true)].into_iter().enumerate() {
        let p = random_problem(dims(1 + i % 2, 3 + i, 2, 1 + i, 2, per_head), GateRegime::Resets(0.3), h0, i as u64);
        out.push(problem_to_bytes(&p.view()).expect("seed"));
        out.push(problem_to_bytes(&p.to_f32().view()).expect("seed"));
    }
    out
}

fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..rng.random_range(1..=8) {
        if bytes.is_empty() {
            bytes.push(rng.random());
        }
        let header_end = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |b: [u8; 8]| (u64::from_le_bytes(b) as usize).saturating_add(8))
            .min(bytes.len())
            .max(1);
        let n = bytes.len();
        match rng.random_range(0..9) {
            0 => bytes[rng.random_range(0..header_end)] ^= 1 << rng.random_range(0..8),
            1 => bytes[rng.random_range(0..n)] = rng.random(),
            2 | 3 => {
                let digits: Vec<usize> = (0..header_end).filter(|&i| bytes[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = digits[rng.random_range(0..digits.len())];
                    // A digit, or a run of digits (large numbers), or a sign.
                    match rng.random_range(0..4) {
                        0 => bytes[i] = b'0' + rng.random_range(0..10u8),
                        1 => {
                            let run: Vec<u8> = (0..rng.random_range(1..21)).map(|_| b'0' + rng.random_range(0..10u8)).collect();
                            bytes.splice(i..i + 1, run);
                        }
                        2 => bytes.insert(i, b'-'),
                        _ => bytes[i] = b'0',
                    }
                }
            }
            4 => bytes.truncate(rng.random_range(0..n)),
            5 => bytes.insert(rng.random_range(0..n), rng.random()),
            6 => bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            7 => {
                // Overwrite a data value with a special float.
                let specials: [&[u8]; 6] = [
                    &f32::NAN.to_le_bytes(),
                    &f32::INFINITY.to_le_bytes(),
                    &f64::NEG_INFINITY.to_le_bytes(),
                    &f64::MAX.to_le_bytes(),
                    &1e-310f64.to_le_bytes(),
                    &0.5f32.to_le_bytes(),
                ];
                let s = specials[rng.random_range(0..specials.len())];
                if n > header_end + s.len() {
                    let at = rng.random_range(header_end..n - s.len());
                    bytes[at..at + s.len()].copy_from_slice(s);
                }
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=other.len());
                let at = rng.random_range(0..=n);
                bytes.truncate(at);
                bytes.extend_from_slice(&other[cut..]);
            }
        }
    }
}

#[test]
fn load_problem_never_panics_on_mutated_files() {
    let secs: u64 = std::env::var("GATELOOP_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("GATELOOP_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let seeds = seeds();
    for s in &seeds {
        assert!(gateloop_fuzz::load_problem(s), "a seed must parse");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut execs, mut parsed) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..64 {
            let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
            mutate(&mut rng, &mut bytes, &seeds);
            let result = std::panic::catch_unwind(|| gateloop_fuzz::load_problem(&bytes));
            match result {
                Ok(p) => parsed += u64::from(p),
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("gateloop-fuzz-crash-{seed}-{execs}.safetensors"));
                    let _ = std::fs::write(&path, &bytes);
                    panic!("load_problem panicked; input saved to {}", path.display());
                }
            }
            execs += 1;
        }
    }
    println!("load_problem: {execs} executions in {secs} s (seed {seed}), {parsed} parsed as problems, no panic");
}

/// Pure random bytes and tiny inputs.
#[test]
fn load_problem_never_panics_on_random_bytes() {
    let mut rng = StdRng::seed_from_u64(1);
    for len in 0..64 {
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            gateloop_fuzz::load_problem(&bytes);
        }
    }
}
