//! Error types, one enum per concern: bad inputs ([`InputError`]) and the GPU
//! ([`crate::cuda::GpuError`], in [`crate::cuda`]). File errors live in [`crate::io`].

use thiserror::Error;

/// Something is wrong with the arguments of a call: a shape, a length, a value
/// or a parameter. The message names the offending argument.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum InputError {
    /// A dimension is zero. Every dimension of the operator must be at least 1.
    #[error("dimension `{name}` is 0; every dimension must be at least 1")]
    ZeroDim {
        /// The dimension's name (`batch`, `len`, `heads`, `key_dim`, ...).
        name: &'static str,
    },

    /// The element count of a tensor does not fit in `usize` (or in the
    /// index type a kernel uses).
    #[error("`{name}` with shape {shape} has more elements than {limit}")]
    TooLarge {
        /// The tensor (or argument) whose size overflows.
        name: &'static str,
        /// Its shape, as written in the message.
        shape: String,
        /// The limit it passes (`usize::MAX`, `i64::MAX`, ...).
        limit: String,
    },

    /// A buffer has the wrong number of elements for the declared shape.
    #[error("`{name}` has {actual} elements, expected {expected} (shape {shape})")]
    Length {
        /// The argument's name (`q`, `log_gate`, `h0`, `y`, ...).
        name: &'static str,
        /// The element count its shape asks for.
        expected: usize,
        /// The element count it has.
        actual: usize,
        /// The shape it was checked against, as written in the message.
        shape: String,
    },

    /// A value is outside the operator's domain (for example Re(log_gate) > 0,
    /// or NaN where a finite number is required).
    #[error("`{name}` element {index} is {value}: {why}")]
    Value {
        /// The tensor holding the value.
        name: &'static str,
        /// The value's flat index in that tensor.
        index: usize,
        /// The value, formatted.
        value: String,
        /// Which rule it breaks.
        why: &'static str,
    },

    /// A tuning parameter is invalid.
    #[error("parameter `{name}` = {value}: {why}")]
    Param {
        /// The parameter's name.
        name: &'static str,
        /// Its value, formatted.
        value: String,
        /// Which rule it breaks.
        why: &'static str,
    },
}
