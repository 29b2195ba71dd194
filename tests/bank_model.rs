//! The shared-memory bank model (tests/kernel_emu/bank_model.cpp, run by
//! scripts/smem-profile.sh) end to end: the fake CUDA driver built with it
//! runs `gateloop bench` on a chunked forward and reports, per kernel and
//! access site, the warp accesses, wavefronts and ideal wavefronts. The
//! model's own known answers (conflict-free, two-way, broadcast, vector
//! accesses by quarter- and half-warps, the vectorizer's runs) are checked
//! by the library at its first launch, which aborts on a wrong one; this
//! test checks that a real run gets that far and reports what it must.

mod emu_support;

struct Site {
    count: u64,
    wavefronts: u64,
    ideal: u64,
    lanes: u64,
}

#[test]
fn bank_model_reports_every_chunked_launch() {
    let Some(lib) = emu_support::build_banks_library() else {
        return;
    };
    let report =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bank_model_report_{}.txt", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateloop"))
        .args(["bench", "--kernel", "chunked-real-fast", "--dtype", "bf16", "--shape", "1,128,1,64,64"])
        .args(["--runs", "1", "--warmup", "0"])
        .env("LD_LIBRARY_PATH", &lib)
        .env("GATELOOP_BANKS_OUT", &report)
        .env("GATELOOP_BANKS_BLOCKS", "1")
        .output()
        .expect("gateloop runs");
    assert!(
        out.status.success(),
        "gateloop bench on the bank model: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).expect("the bank model's report");
    let _ = std::fs::remove_file(&report);
    let mut kernels = std::collections::BTreeMap::<String, (u64, u64, Vec<Site>)>::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"kernel") => {
                kernels.insert(f[1].into(), (f[3].parse().unwrap(), f[5].parse().unwrap(), Vec::new()));
            }
            Some(&"site") => {
                let n = |i: usize| f[i].parse::<u64>().unwrap();
                let site = Site { count: n(4), wavefronts: n(5), ideal: n(6), lanes: n(7) };
                kernels.get_mut(f[1]).expect("a site after its kernel").2.push(site);
            }
            _ => {}
        }
    }
    // L = 128 with the separate carry (B·H too small for the walk): the
    // state launch (2 blocks), the carry, the output launch (2 blocks).
    for name in ["gateloop_chunk_state_bf16_r_fast", "gateloop_chunk_output_bf16_r_fast"] {
        let (sampled, launched, sites) =
            kernels.get(name).unwrap_or_else(|| panic!("{name} not in the report:\n{text}"));
        assert!(*sampled >= 1 && sampled <= launched, "{name}: {sampled} of {launched} blocks sampled");
        assert!(!sites.is_empty(), "{name}: no shared-memory access seen");
        let (mut wavefronts, mut ideal) = (0, 0);
        for s in sites {
            // Every warp access takes at least its ideal wavefronts, has
            // 1 to 32 lanes, and an ideal of 1 to 4 phases.
            assert!(s.wavefronts >= s.ideal && s.ideal >= s.count && s.ideal <= 4 * s.count, "{name}: a site's counts");
            assert!(s.lanes >= s.count && s.lanes <= 32 * s.count, "{name}: a site's lanes");
            wavefronts += s.wavefronts;
            ideal += s.ideal;
        }
        // A 64-step chunk of 64 channels moves tens of kilobytes through
        // shared memory a block: thousands of wavefronts, not a handful.
        assert!(ideal / sampled >= 1000, "{name}: {ideal} ideal wavefronts in {sampled} blocks");
        assert!(wavefronts < 2 * ideal, "{name}: {wavefronts} wavefronts against {ideal} ideal");
    }
}
