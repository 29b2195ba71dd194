//! The kernel ABI: `src/cuda/abi.rs` mirrors `cuda/gateloop_abi.h`.
//!
//! - Always: the layout the kernels rely on (sizes, alignments, offsets), so a
//!   hand edit of either side that changes the layout fails here (bindgen's
//!   own compile-time layout checks in abi.rs fail the build first).
//! - With `--features bindgen` (needs libclang): the bindings regenerated
//!   from the header equal the committed file; `GATELOOP_BLESS=1` rewrites
//!   the file instead (that is what `scripts/regen-abi.sh` runs).
//!
//! build.rs separately refuses to build when the header's sha256 differs from
//! the one recorded in abi.rs, which needs no libclang.

use std::mem::{align_of, offset_of, size_of};

use gateloop::cuda::abi::*;

#[test]
fn shared_structs_layout() {
    assert_eq!(size_of::<GateloopDims>(), 48);
    assert_eq!(align_of::<GateloopDims>(), 8);
    assert_eq!(offset_of!(GateloopDims, batch), 0);
    assert_eq!(offset_of!(GateloopDims, gate_dim), 40);
    assert_eq!(size_of::<GateloopSeqStrides>(), 24);
    assert_eq!(offset_of!(GateloopSeqStrides, head), 16);
    assert_eq!(size_of::<GateloopStateStrides>(), 24);
    assert_eq!(offset_of!(GateloopStateStrides, key), 16);
}

#[test]
fn recurrent_params_layout() {
    type P = GateloopRecurrentParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT), for nvcc and the C compiler.
    assert_eq!(size_of::<P>(), 304);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, q), 0);
    assert_eq!(offset_of!(P, k), 8);
    assert_eq!(offset_of!(P, v), 16);
    assert_eq!(offset_of!(P, log_gate), 24);
    assert_eq!(offset_of!(P, h0), 32);
    assert_eq!(offset_of!(P, y), 40);
    assert_eq!(offset_of!(P, h_final), 48);
    assert_eq!(offset_of!(P, cu_seqlens), 56);
    assert_eq!(offset_of!(P, dims), 64);
    assert_eq!(offset_of!(P, q_strides), 112);
    assert_eq!(offset_of!(P, k_strides), 136);
    assert_eq!(offset_of!(P, v_strides), 160);
    assert_eq!(offset_of!(P, gate_strides), 184);
    assert_eq!(offset_of!(P, y_strides), 208);
    assert_eq!(offset_of!(P, h0_strides), 232);
    assert_eq!(offset_of!(P, h_final_strides), 256);
    assert_eq!(offset_of!(P, flags), 280);
    assert_eq!(offset_of!(P, dtype), 284);
    assert_eq!(offset_of!(P, key_groups), 288);
    assert_eq!(offset_of!(P, padded_key_dim), 292);
    assert_eq!(offset_of!(P, chunk_len), 296);
    assert_eq!(offset_of!(P, value_tiles), 300);
}

#[test]
fn scan_params_layout() {
    type P = GateloopScanParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT).
    assert_eq!(size_of::<P>(), 328);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, q), 0);
    assert_eq!(offset_of!(P, h_final), 48);
    assert_eq!(offset_of!(P, chunk_gate), 56);
    assert_eq!(offset_of!(P, chunk_state), 64);
    assert_eq!(offset_of!(P, dims), 72);
    assert_eq!(offset_of!(P, q_strides), 120);
    assert_eq!(offset_of!(P, gate_strides), 192);
    assert_eq!(offset_of!(P, y_strides), 216);
    assert_eq!(offset_of!(P, h0_strides), 240);
    assert_eq!(offset_of!(P, h_final_strides), 264);
    assert_eq!(offset_of!(P, flags), 288);
    assert_eq!(offset_of!(P, dtype), 292);
    assert_eq!(offset_of!(P, warps), 296);
    assert_eq!(offset_of!(P, value_tile), 300);
    assert_eq!(offset_of!(P, chunk_len), 304);
    assert_eq!(offset_of!(P, num_chunks), 312);
    assert_eq!(offset_of!(P, value_tiles), 320);
    assert_eq!(GATELOOP_SCAN_STEPS_PER_THREAD, 8);
    assert_eq!(GATELOOP_SCAN_MAX_WARPS, 8);
    assert_eq!(GATELOOP_SCAN_MAX_VALUE_TILE, 4);
    assert_eq!(GATELOOP_SCAN_CARRY_BLOCK, 256);
}

#[test]
fn attention_params_layout() {
    type P = GateloopAttentionParams;
    assert_eq!(size_of::<P>(), 344);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, q), 0);
    assert_eq!(offset_of!(P, h_final), 48);
    assert_eq!(offset_of!(P, ws_prefix), 56);
    assert_eq!(offset_of!(P, ws_prefix_lo), 64);
    assert_eq!(offset_of!(P, ws_suffix), 72);
    assert_eq!(offset_of!(P, ws_reset), 80);
    assert_eq!(offset_of!(P, dims), 88);
    assert_eq!(offset_of!(P, q_strides), 136);
    assert_eq!(offset_of!(P, gate_strides), 208);
    assert_eq!(offset_of!(P, h_final_strides), 280);
    assert_eq!(offset_of!(P, flags), 304);
    assert_eq!(offset_of!(P, dtype), 308);
    assert_eq!(offset_of!(P, num_tiles), 312);
    assert_eq!(offset_of!(P, value_tiles), 320);
    assert_eq!(offset_of!(P, state_key_tiles), 328);
    assert_eq!(offset_of!(P, state_value_tiles), 336);
    assert_eq!(GATELOOP_ATTENTION_TILE, 64);
    assert_eq!(GATELOOP_ATTENTION_MAX_KEY_DIM, 256);
}

#[test]
fn chunk_params_layout() {
    type P = GateloopChunkParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT).
    assert_eq!(size_of::<P>(), 344);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, q), 0);
    assert_eq!(offset_of!(P, h_final), 48);
    assert_eq!(offset_of!(P, ws_decay), 56);
    assert_eq!(offset_of!(P, ws_state), 64);
    assert_eq!(offset_of!(P, cu_seqlens), 72);
    assert_eq!(offset_of!(P, dims), 80);
    assert_eq!(offset_of!(P, q_strides), 128);
    assert_eq!(offset_of!(P, gate_strides), 200);
    assert_eq!(offset_of!(P, h_final_strides), 272);
    assert_eq!(offset_of!(P, flags), 296);
    assert_eq!(offset_of!(P, dtype), 300);
    assert_eq!(offset_of!(P, num_chunks), 304);
    assert_eq!(offset_of!(P, value_tiles), 312);
    assert_eq!(offset_of!(P, shared_bytes), 320);
    assert_eq!(offset_of!(P, state_shared_bytes), 324);
    assert_eq!(offset_of!(P, carry_segments), 328);
    assert_eq!(offset_of!(P, ws_carry_segments), 336);
    assert_eq!(GATELOOP_CHUNK_LEN, 64);
    assert_eq!(GATELOOP_CHUNK_SUB_LEN, 16);
    assert_eq!(GATELOOP_CHUNK_MAX_KEY_DIM, 256);
}

#[test]
fn chunk_grad_params_layout() {
    type P = GateloopChunkGradParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT): the forward struct,
    // eight pointers, seven stride structs, four 4-byte fields, the scores' pointer.
    assert_eq!(size_of::<P>(), 600);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, fwd), 0);
    assert_eq!(offset_of!(P, dy), 344);
    assert_eq!(offset_of!(P, dh0), 392);
    assert_eq!(offset_of!(P, ws_adj), 400);
    assert_eq!(offset_of!(P, dy_strides), 408);
    assert_eq!(offset_of!(P, dgate_strides), 504);
    assert_eq!(offset_of!(P, dh0_strides), 552);
    assert_eq!(offset_of!(P, grad_flags), 576);
    assert_eq!(offset_of!(P, dv_shared_bytes), 588);
    assert_eq!(offset_of!(P, ws_scores), 592);
    assert_eq!((GATELOOP_GRAD_FLAG_HAS_DH_FINAL, GATELOOP_GRAD_FLAG_HAS_DH0), (1, 2));
}

#[test]
fn check_params_layout() {
    type P = GateloopCheckParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT).
    assert_eq!(size_of::<P>(), 24);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, log_gate), 0);
    assert_eq!(offset_of!(P, result), 8);
    assert_eq!(offset_of!(P, n), 16);
    assert_eq!(GATELOOP_CHECK_THREADS, 256);
    assert_eq!(GATELOOP_CHECK_MAX_BLOCKS, 1024);
    assert_eq!(GATELOOP_CHECK_RESULT_WORDS, 3);
}

#[test]
fn selftest_params_layout() {
    type P = GateloopSelftestMmaParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT).
    assert_eq!(size_of::<P>(), 32);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!((offset_of!(P, a), offset_of!(P, b), offset_of!(P, c), offset_of!(P, d)), (0, 8, 16, 24));
    assert_eq!(GATELOOP_SELFTEST_MMA_THREADS, 32);
    assert_eq!(GATELOOP_SELFTEST_MMA_PRODUCTS, 5);
}

#[test]
fn constants() {
    assert_eq!(GATELOOP_ABI_VERSION, 2);
    assert_eq!(GATELOOP_DTYPE_F32, 0);
    assert_eq!(GATELOOP_FLAG_HAS_H0, 1);
    assert_eq!(GATELOOP_FLAG_PER_HEAD_GATE, 2);
    assert_eq!(GATELOOP_FLAG_STATE_IN_PLACE, 4);
    assert_eq!(GATELOOP_DTYPE_F16, 1);
    assert_eq!(GATELOOP_DTYPE_BF16, 2);
    assert_eq!(GATELOOP_RECURRENT_VALUE_TILE, 32);
    assert_eq!(GATELOOP_RECURRENT_MAX_KEY_GROUPS, 16);
    assert_eq!(GATELOOP_RECURRENT_MAX_ROWS, 16);
}

/// The generator of `src/cuda/abi.rs` (the only one: scripts/regen-abi.sh runs it).
#[cfg(feature = "bindgen")]
fn generate_bindings(manifest_dir: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};

    let header = manifest_dir.join("cuda/gateloop_abi.h");
    let bytes = std::fs::read(&header).expect("read cuda/gateloop_abi.h");
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let bindings = bindgen::Builder::default()
        .header(header.to_str().expect("utf-8 path"))
        .allowlist_type("Gateloop.*")
        .allowlist_var("GATELOOP_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate_comments(true)
        .clang_arg("-fparse-all-comments")
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
        .expect("bindgen failed on cuda/gateloop_abi.h (is libclang installed?)")
        .to_string();
    // bindgen's Default for structs holding raw pointers zero-fills them in an
    // `unsafe` block; state the contract it relies on, as every unsafe block
    // of this crate does.
    let zero_fill = "        unsafe {\n            ::std::ptr::write_bytes(s.as_mut_ptr(), 0, 1);";
    let bindings = bindings.replace(
        zero_fill,
        &format!(
            "        // SAFETY: the ABI header's rules allow only integers, raw pointers and\n        \
             // structs of those in these structs, and all-zero bytes are a valid value of\n        \
             // each (0, null); write_bytes fills exactly one Self.\n{zero_fill}"
        ),
    );
    format!(
        "// gateloop_abi.h sha256: {sha}\n\
         // @generated from cuda/gateloop_abi.h by scripts/regen-abi.sh (bindgen). Do not edit:\n\
         // edit the header and regenerate. build.rs checks the sha256 above.\n\
         {bindings}"
    )
}

#[cfg(feature = "bindgen")]
#[test]
fn bindgen_output_is_committed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = generate_bindings(dir);
    let path = dir.join("src/cuda/abi.rs");
    if std::env::var("GATELOOP_BLESS").is_ok_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &generated).expect("write src/cuda/abi.rs");
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("read src/cuda/abi.rs");
    assert!(
        committed == generated,
        "src/cuda/abi.rs differs from bindgen's output for cuda/gateloop_abi.h; run scripts/regen-abi.sh"
    );
}

#[test]
fn scan_grad_params_layout() {
    type P = GateloopScanGradParams;
    // Pinned in the header too (GATELOOP_ABI_ASSERT).
    assert_eq!(size_of::<P>(), 600);
    assert_eq!(align_of::<P>(), 8);
    assert_eq!(offset_of!(P, fwd), 0);
    assert_eq!(offset_of!(P, dy), 328);
    assert_eq!(offset_of!(P, dh_final), 336);
    assert_eq!(offset_of!(P, dq), 344);
    assert_eq!(offset_of!(P, dlog_gate), 368);
    assert_eq!(offset_of!(P, dh0), 376);
    assert_eq!(offset_of!(P, rev_gate), 384);
    assert_eq!(offset_of!(P, rev_state), 392);
    assert_eq!(offset_of!(P, dy_strides), 400);
    assert_eq!(offset_of!(P, dgate_strides), 496);
    assert_eq!(offset_of!(P, dh_final_strides), 520);
    assert_eq!(offset_of!(P, dh0_strides), 544);
    assert_eq!(offset_of!(P, value_tile), 568);
    assert_eq!(offset_of!(P, value_tiles), 576);
    assert_eq!(offset_of!(P, dq_acc), 584);
    assert_eq!(offset_of!(P, dk_acc), 592);
    assert_eq!(GATELOOP_SCAN_GRAD_MAX_VALUE_TILE, 2);
}
