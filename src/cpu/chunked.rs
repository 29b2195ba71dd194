//! STUB — replaced by the chunked f32 CPU path. Interface is fixed.

use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem};

/// Tuning of the chunked algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    /// Steps per chunk (state passed between chunks). Default 64.
    pub chunk_len: usize,
    /// Steps per anchored sub-chunk inside a chunk. Default 16.
    pub sub_chunk_len: usize,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams { chunk_len: 64, sub_chunk_len: 16 }
    }
}

/// Chunked forward in f32, allocating the outputs.
pub fn forward(p: &Problem<'_, f32>, params: &ChunkParams) -> Result<Outputs<f32>, InputError> {
    p.validate()?;
    let mut out = Outputs::zeros(&p.dims);
    forward_into(p, params, out.as_mut())?;
    Ok(out)
}

/// Chunked forward in f32 into caller buffers.
pub fn forward_into(p: &Problem<'_, f32>, _params: &ChunkParams, out: OutputsMut<'_, f32>) -> Result<(), InputError> {
    crate::reference::recurrent::forward_into(p, out)
}
