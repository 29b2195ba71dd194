//! Fast f32 CPU implementations, each the mirror of a GPU kernel's algorithm
//! (chunk lengths, anchors, accumulation order and precision).

pub mod attention;
pub mod chunked;
pub mod chunked_grad;
pub mod scan;
pub mod scan_grad;

/// `a + b` as the f32 sum and its exact rounding error (Knuth's TwoSum: no
/// ordering of |a|, |b| assumed; exact without reassociation or
/// flush-to-zero, which neither Rust nor the kernels' nvcc flags use). The
/// chunked and attention paths keep their local Re Σ log_gate as such a
/// pair (running sum, running sum of the errors): after hard-decaying steps
/// the sum reaches thousands, where its ulp (~2.4e-4) would otherwise stay in
/// every short difference. The kernels' twin: `two_sum` in cuda/common.cuh.
#[inline(always)]
pub(crate) fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let s = a + b;
    let bp = s - a;
    (s, (a - (s - bp)) + (b - bp))
}

/// Re(G_late − G_early) from two compensated sums (hi, lo): the running sums'
/// difference is exact when they lie within a factor 2 of each other
/// (Sterbenz) — the case of a short, non-negligible difference — and the
/// compensations add back what their additions rounded off; otherwise the
/// difference is itself large and its relative rounding harmless.
#[inline(always)]
pub(crate) fn re_diff(late: f32, late_lo: f32, early: f32, early_lo: f32) -> f32 {
    (late - early) + (late_lo - early_lo)
}
