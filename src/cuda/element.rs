//! The element types of the kernels' sequence tensors (q, k, v, y): f32,
//! `half::f16` and `half::bf16`.
//!
//! Whatever the element type, `log_gate` and the recurrent state (h0,
//! h_final) are complex f32 and the kernels compute and accumulate in f32
//! (see `cuda/gateloop_abi.h`). Launchers are generic over [`Element`]; the
//! runtime tag [`Dtype`] picks the entry point (`gateloop_<kernel>_<dtype>_*`)
//! and names the type on the command line and in benchmark results.

use std::fmt::{self, Debug, Display};
use std::str::FromStr;

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::abi;

/// The element type of q, k, v and y, as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// `f32`.
    F32,
    /// IEEE half precision, `half::f16`.
    F16,
    /// bfloat16, `half::bf16`.
    Bf16,
}

impl Dtype {
    /// Every element type, in the order of [`Dtype::index`].
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The lower-case name used in entry points, on the command line and in
    /// results: `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Position in [`Dtype::ALL`] (for per-dtype tables).
    pub fn index(self) -> usize {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }
    }

    /// The `GATELOOP_DTYPE_*` constant of the kernel ABI.
    pub fn abi(self) -> u32 {
        match self {
            Dtype::F32 => abi::GATELOOP_DTYPE_F32,
            Dtype::F16 => abi::GATELOOP_DTYPE_F16,
            Dtype::Bf16 => abi::GATELOOP_DTYPE_BF16,
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// Unit roundoff u = 2^−p of round-to-nearest (p: significand bits,
    /// implicit bit included): every normal value x is stored as x(1 + δ),
    /// |δ| ≤ u. f32 2^−24, f16 2^−11 ≈ 4.9e-4, bf16 2^−8 ≈ 3.9e-3.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Dtype::F32 => f64::powi(2.0, -24),
            Dtype::F16 => f64::powi(2.0, -11),
            Dtype::Bf16 => f64::powi(2.0, -8),
        }
    }
}

impl Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `"bf16"` etc. is not one of `f32`, `f16`, `bf16`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}` (expected one of f32, f16, bf16)")]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(s)).ok_or_else(|| UnknownDtype(s.to_string()))
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A type the kernels take for q, k, v and y. Sealed: exactly f32,
/// `half::f16` and `half::bf16`, the types the kernels are instantiated for.
pub trait Element:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Debug + Send + Sync + Unpin + 'static + sealed::Sealed
{
    /// The runtime tag.
    const DTYPE: Dtype;
    /// Rounds to nearest (even).
    fn from_f32(x: f32) -> Self;
    /// Exact.
    fn to_f32(self) -> f32;
    /// A quiet NaN (for poisoning outputs in tests).
    fn nan() -> Self;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn nan() -> Self {
        f32::NAN
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn nan() -> Self {
        f16::NAN
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}

/// Rounds `xs` to `T` (what a `T` kernel sees of f32 data).
pub fn round_slice<T: Element>(xs: &[f32]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x)).collect()
}

/// Widens `xs` to f32 (exact).
pub fn widen_slice<T: Element>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|&x| x.to_f32()).collect()
}

/// Calls `$body` with the type alias `$t` bound to the [`Element`] type of
/// the runtime [`Dtype`] `$dtype` (one monomorphized body per type).
#[macro_export]
macro_rules! with_element {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::cuda::Dtype::F32 => {
                type $t = f32;
                $body
            }
            $crate::cuda::Dtype::F16 => {
                type $t = $crate::cuda::half::f16;
                $body
            }
            $crate::cuda::Dtype::Bf16 => {
                type $t = $crate::cuda::half::bf16;
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
            assert_eq!(Dtype::ALL[d.index()], d);
        }
        assert_eq!("BF16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert!("f64".parse::<Dtype>().is_err());
    }

    #[test]
    fn tags_match_types() {
        fn tag<T: Element>() -> Dtype {
            T::DTYPE
        }
        assert_eq!(tag::<f32>(), Dtype::F32);
        assert_eq!(tag::<f16>(), Dtype::F16);
        assert_eq!(tag::<bf16>(), Dtype::Bf16);
        for d in Dtype::ALL {
            assert_eq!(with_element!(d, T => std::mem::size_of::<T>()), d.size_bytes());
            assert_eq!(with_element!(d, T => T::DTYPE), d);
        }
    }

    #[test]
    fn rounding_is_within_unit_roundoff() {
        for d in Dtype::ALL {
            let u = d.unit_roundoff();
            for i in 1..2000 {
                let x = (i as f32 * 0.7371).sin() * 3.0;
                let r = with_element!(d, T => T::from_f32(x).to_f32());
                // (+ 1e-7: the absolute error of f16 subnormals)
                assert!(((r - x).abs() as f64) <= u * x.abs() as f64 + 1e-7, "{d}: {x} -> {r}");
            }
            assert!(with_element!(d, T => T::nan().to_f32()).is_nan());
        }
    }
}
