//! Fast f32 CPU implementations, each the mirror of a GPU kernel's algorithm
//! (chunk lengths, anchors, accumulation order and precision).

pub mod attention;
pub mod chunked;
pub mod chunked_grad;
pub mod scan;
pub mod scan_grad;
