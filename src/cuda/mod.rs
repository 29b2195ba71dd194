//! STUB — replaced by the CUDA layer. Interface is fixed.

use thiserror::Error;

use crate::error::InputError;
use crate::problem::{Outputs, Problem};

/// Errors of the GPU path.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("no CUDA driver (libcuda) found on this machine")]
    NoDriver,
    #[error("this build of gateloop has no CUDA kernels: {0}")]
    NotBuilt(String),
}

/// A CUDA device with the gateloop kernels loaded.
pub struct Gpu {}

impl Gpu {
    /// Opens device `ordinal`.
    pub fn new(_ordinal: usize) -> Result<Gpu, GpuError> {
        Err(GpuError::NotBuilt("stub".into()))
    }
    /// The device's name.
    pub fn name(&self) -> String {
        String::new()
    }
}

pub mod recurrent {
    use super::*;
    /// Uploads, runs the recurrent kernel, downloads; synchronizes.
    pub fn forward_host(_gpu: &Gpu, _p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
        Err(GpuError::NotBuilt("stub".into()))
    }
}
