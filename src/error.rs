//! Error types, one enum per concern: bad inputs ([`InputError`]) and the GPU
//! ([`crate::cuda::GpuError`], in [`crate::cuda`]). File errors live in [`crate::io`].

use thiserror::Error;

/// Something is wrong with the arguments of a call: a shape, a length, a value
/// or a parameter. The message names the offending argument.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum InputError {
    /// A dimension is zero. Every dimension of the operator must be at least 1.
    #[error("dimension `{name}` is 0; every dimension must be at least 1")]
    ZeroDim { name: &'static str },

    /// The element count of a tensor does not fit in `usize` (or in the
    /// index type a kernel uses).
    #[error("`{name}` with shape {shape} has more elements than {limit}")]
    TooLarge { name: &'static str, shape: String, limit: String },

    /// A buffer has the wrong number of elements for the declared shape.
    #[error("`{name}` has {actual} elements, expected {expected} (shape {shape})")]
    Length { name: &'static str, expected: usize, actual: usize, shape: String },

    /// A value is outside the operator's domain (for example Re(log_gate) > 0,
    /// or NaN where a finite number is required).
    #[error("`{name}` element {index} is {value}: {why}")]
    Value { name: &'static str, index: usize, value: String, why: &'static str },

    /// A tuning parameter is invalid.
    #[error("parameter `{name}` = {value}: {why}")]
    Param { name: &'static str, value: String, why: &'static str },
}
