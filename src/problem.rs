//! The operator's shapes, its inputs and its outputs, and their validation.
//!
//! Layout is `[B, L, H, D]` (batch, time, head, dim), row-major, everywhere.
//! Complex tensors are `num_complex::Complex<T>`, which is `#[repr(C)]` and
//! therefore the interleaved `(re, im)` pair layout of files and GPU buffers.

use std::fmt::{Debug, Display};

use num_complex::Complex;
use num_traits::{Float, FloatConst};

use crate::error::InputError;

/// A real scalar the CPU implementations are generic over (`f32`, `f64`).
pub trait Real: Float + FloatConst + Debug + Display + Default + Send + Sync + 'static {}
impl<T: Float + FloatConst + Debug + Display + Default + Send + Sync + 'static> Real for T {}

/// How `log_gate` is laid out along its last dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GateLayout {
    /// One gate per key channel: `log_gate` is `[B, L, H, K]` complex.
    #[default]
    PerChannel,
    /// One gate per head, broadcast over its K channels: `[B, L, H, 1]` complex.
    PerHead,
}

/// The sizes of one GateLoop problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    /// B
    pub batch: usize,
    /// L, the number of time steps.
    pub len: usize,
    /// H
    pub heads: usize,
    /// K, the dimension of q, k and of the state's rows.
    pub key_dim: usize,
    /// V, the dimension of v, y and of the state's columns.
    pub value_dim: usize,
    /// Per-channel or per-head gate.
    pub gate: GateLayout,
}

fn checked_product(name: &'static str, dims: &[usize]) -> Result<usize, InputError> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| InputError::TooLarge {
        name,
        shape: format!("{dims:?}"),
        limit: "usize::MAX".into(),
    })
}

impl Dims {
    /// Sizes with a per-channel gate.
    pub fn new(batch: usize, len: usize, heads: usize, key_dim: usize, value_dim: usize) -> Self {
        Dims { batch, len, heads, key_dim, value_dim, gate: GateLayout::PerChannel }
    }

    /// The same sizes with another gate layout.
    pub fn with_gate(self, gate: GateLayout) -> Self {
        Dims { gate, ..self }
    }

    /// The last dimension of `log_gate`: K, or 1 for a per-head gate.
    pub fn gate_dim(&self) -> usize {
        match self.gate {
            GateLayout::PerChannel => self.key_dim,
            GateLayout::PerHead => 1,
        }
    }

    /// Shape of `q` and `k`.
    pub fn qk_shape(&self) -> [usize; 4] {
        [self.batch, self.len, self.heads, self.key_dim]
    }
    /// Shape of `v` and `y`.
    pub fn v_shape(&self) -> [usize; 4] {
        [self.batch, self.len, self.heads, self.value_dim]
    }
    /// Shape of `log_gate` (complex; files add a trailing 2).
    pub fn gate_shape(&self) -> [usize; 4] {
        [self.batch, self.len, self.heads, self.gate_dim()]
    }
    /// Shape of `h0` and `h_final` (complex; files add a trailing 2).
    pub fn state_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.key_dim, self.value_dim]
    }

    /// Checks that no dimension is zero and that every tensor's element count
    /// (counting a complex number as two reals) fits in `usize`.
    pub fn validate(&self) -> Result<(), InputError> {
        for (name, d) in [
            ("batch", self.batch),
            ("len", self.len),
            ("heads", self.heads),
            ("key_dim", self.key_dim),
            ("value_dim", self.value_dim),
        ] {
            if d == 0 {
                return Err(InputError::ZeroDim { name });
            }
        }
        checked_product("q", &[self.batch, self.len, self.heads, self.key_dim, 2])?;
        checked_product("v", &[self.batch, self.len, self.heads, self.value_dim, 2])?;
        checked_product("h0", &[self.batch, self.heads, self.key_dim, self.value_dim, 2])?;
        Ok(())
    }

    /// Elements of `q` (and of `k`).
    pub fn qk_len(&self) -> usize {
        self.batch * self.len * self.heads * self.key_dim
    }
    /// Elements of `v` (and of `y`).
    pub fn v_len(&self) -> usize {
        self.batch * self.len * self.heads * self.value_dim
    }
    /// Complex elements of `log_gate`.
    pub fn gate_len(&self) -> usize {
        self.batch * self.len * self.heads * self.gate_dim()
    }
    /// Complex elements of `h0` (and of `h_final`).
    pub fn state_len(&self) -> usize {
        self.batch * self.heads * self.key_dim * self.value_dim
    }

    /// Checks one buffer's length against its shape.
    pub fn check_len(&self, name: &'static str, shape: [usize; 4], actual: usize) -> Result<(), InputError> {
        let expected = shape.iter().product();
        if actual != expected {
            return Err(InputError::Length { name, expected, actual, shape: format!("{shape:?}") });
        }
        Ok(())
    }
}

/// Why a log gate is outside the gate's domain, or `None` when it is inside:
/// the domain is Re ≤ 0 (−∞ allowed: a reset), Re not NaN, Im finite. The
/// one classifier of gate values: [`Problem::check_gate`] on the host and
/// the device check `cuda::check::log_gate` (whose kernel flags exactly the
/// values for which this is `Some`) both report its reason.
pub fn log_gate_violation<T: Real>(g: Complex<T>) -> Option<&'static str> {
    if g.re.is_nan() || g.im.is_nan() {
        Some("NaN in log_gate")
    } else if g.re > T::zero() {
        Some("Re(log_gate) > 0 means |a| > 1; the gate must satisfy Re(log_gate) <= 0")
    } else if !g.im.is_finite() {
        Some("Im(log_gate) (the phase) must be finite")
    } else {
        None
    }
}

/// The error for log gate `g` at (complex, flat) `index` of `log_gate`, when
/// [`log_gate_violation`] rejects it.
pub fn log_gate_error<T: Real>(index: usize, g: Complex<T>) -> Option<InputError> {
    log_gate_violation(g).map(|why| InputError::Value { name: "log_gate", index, value: format!("{g}"), why })
}

/// Borrowed inputs of one forward call.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a, T> {
    /// The shape, and the gate layout (per channel or per head).
    pub dims: Dims,
    /// `[B, L, H, K]`
    pub q: &'a [T],
    /// `[B, L, H, K]`
    pub k: &'a [T],
    /// `[B, L, H, V]`
    pub v: &'a [T],
    /// `[B, L, H, K]` or `[B, L, H, 1]` complex: a = exp(log_gate).
    pub log_gate: &'a [Complex<T>],
    /// `[B, H, K, V]` complex initial state; zero when absent.
    pub h0: Option<&'a [Complex<T>]>,
}

impl<'a, T: Real> Problem<'a, T> {
    /// Bundles the inputs, checking every length against `dims`.
    pub fn new(
        dims: Dims,
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
        log_gate: &'a [Complex<T>],
        h0: Option<&'a [Complex<T>]>,
    ) -> Result<Self, InputError> {
        let p = Problem { dims, q, k, v, log_gate, h0 };
        p.validate()?;
        Ok(p)
    }

    /// Checks the dims and every buffer length (a `Problem` built by hand
    /// skips [`Problem::new`], so every entry point calls this).
    pub fn validate(&self) -> Result<(), InputError> {
        let d = &self.dims;
        d.validate()?;
        d.check_len("q", d.qk_shape(), self.q.len())?;
        d.check_len("k", d.qk_shape(), self.k.len())?;
        d.check_len("v", d.v_shape(), self.v.len())?;
        d.check_len("log_gate", d.gate_shape(), self.log_gate.len())?;
        if let Some(h0) = self.h0 {
            d.check_len("h0", d.state_shape(), h0.len())?;
        }
        Ok(())
    }

    /// The gate's domain: Re(log_gate) ≤ 0 (−∞ allowed: a reset), Re not NaN,
    /// Im finite. Every CPU entry point calls this; it is O(B·L·H·K).
    ///
    /// The error is the first offending element's [`log_gate_error`]; the
    /// GPU's opt-in device check (`cuda::check::log_gate`) reports the same.
    pub fn check_gate(&self) -> Result<(), InputError> {
        match self.log_gate.iter().enumerate().find_map(|(index, &g)| log_gate_error(index, g)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Strict check used for files: gate domain plus finite q, k, v, h0.
    ///
    /// The API itself does not require finite q, k, v, h0: a NaN or ±∞
    /// propagates only to the outputs it touches. In the recurrent reference,
    /// a non-finite v_t\[j\] or k_t\[i\] of head (b, h) enters h_t of that head
    /// (row i, or column j) and so y of that head at steps ≥ t (and its
    /// h_final, unless a reset clears it); a non-finite q_t reaches only
    /// y_t of that head. Other heads, other batch elements and earlier steps
    /// are bit-for-bit unaffected (tests/api_misuse.rs checks this). The
    /// other modes mix steps differently (the scan tree, attention's pair
    /// sums), so within the affected head they may spread a NaN further, but
    /// never across heads or batch elements.
    pub fn check_all_finite(&self) -> Result<(), InputError> {
        self.check_gate()?;
        let finite = |name: &'static str, xs: &[T]| {
            xs.iter().position(|x| !x.is_finite()).map_or(Ok(()), |index| {
                Err(InputError::Value { name, index, value: format!("{}", xs[index]), why: "must be finite" })
            })
        };
        finite("q", self.q)?;
        finite("k", self.k)?;
        finite("v", self.v)?;
        if let Some(h0) = self.h0
            && let Some(index) = h0.iter().position(|z| !z.re.is_finite() || !z.im.is_finite())
        {
            return Err(InputError::Value {
                name: "h0",
                index,
                value: format!("{}", h0[index]),
                why: "must be finite",
            });
        }
        Ok(())
    }

    /// The gate of (b, t, h) for key channel `kk` (broadcast when per head).
    #[inline]
    pub fn gate(&self, b: usize, t: usize, h: usize, kk: usize) -> Complex<T> {
        let d = &self.dims;
        let g = d.gate_dim();
        let kk = if g == 1 { 0 } else { kk };
        self.log_gate[((b * d.len + t) * d.heads + h) * g + kk]
    }

    /// Offset of (b, t, h, 0) in a `[B, L, H, D]` tensor with last dim `dim`.
    #[inline]
    pub fn row(&self, b: usize, t: usize, h: usize, dim: usize) -> usize {
        ((b * self.dims.len + t) * self.dims.heads + h) * dim
    }
}

/// Owned outputs: `y` `[B, L, H, V]` and `h_final` `[B, H, K, V]` complex.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<T> {
    /// `[B, L, H, V]`: y_t = Re(q_t h_t).
    pub y: Vec<T>,
    /// `[B, H, K, V]` complex: the state after the last step, h_{L−1}.
    pub h_final: Vec<Complex<T>>,
}

impl<T: Real> Outputs<T> {
    /// Zero-filled outputs for `dims`.
    pub fn zeros(dims: &Dims) -> Self {
        Outputs {
            y: vec![T::zero(); dims.v_len()],
            h_final: vec![Complex::new(T::zero(), T::zero()); dims.state_len()],
        }
    }
    /// Allocates the outputs of `p` (after checking its lengths, so a bad
    /// shape is an error, not a huge allocation) and fills them with `into`.
    pub fn computed(
        p: &Problem<'_, T>,
        into: impl FnOnce(&Problem<'_, T>, OutputsMut<'_, T>) -> Result<(), InputError>,
    ) -> Result<Self, InputError> {
        p.validate()?;
        let mut out = Outputs::zeros(&p.dims);
        into(p, out.as_mut())?;
        Ok(out)
    }

    /// Borrows as caller buffers for an `_into` call.
    pub fn as_mut(&mut self) -> OutputsMut<'_, T> {
        OutputsMut { y: &mut self.y, h_final: &mut self.h_final }
    }
}

/// Caller-owned output buffers for the `_into` entry points.
#[derive(Debug)]
pub struct OutputsMut<'a, T> {
    /// `[B, L, H, V]`
    pub y: &'a mut [T],
    /// `[B, H, K, V]` complex
    pub h_final: &'a mut [Complex<T>],
}

impl<T> OutputsMut<'_, T> {
    /// Checks both lengths against `dims`.
    pub fn validate(&self, dims: &Dims) -> Result<(), InputError> {
        dims.check_len("y", dims.v_shape(), self.y.len())?;
        dims.check_len("h_final", dims.state_shape(), self.h_final.len())
    }
}

/// Relative L2 error ‖out − ref‖ / ‖ref‖ (in f64), with max |out − ref|.
/// When ‖ref‖ = 0 the relative error is the absolute norm. NaN anywhere gives NaN.
pub fn compare<A: Copy + Into<f64>, B: Copy + Into<f64>>(out: &[A], reference: &[B]) -> ErrorStats {
    assert_eq!(out.len(), reference.len(), "compare: lengths differ");
    let (mut num, mut den, mut max_abs, mut max_ref) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut nan = false;
    for (&o, &r) in out.iter().zip(reference) {
        let (o, r): (f64, f64) = (o.into(), r.into());
        let e = o - r;
        nan |= e.is_nan();
        num += e * e;
        den += r * r;
        max_abs = max_abs.max(e.abs());
        max_ref = max_ref.max(r.abs());
    }
    let rel = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    if nan {
        return ErrorStats { rel_l2: f64::NAN, max_abs: f64::NAN, max_ref };
    }
    ErrorStats { rel_l2: rel, max_abs, max_ref }
}

/// Same as [`compare`] for complex tensors, as their interleaved reals.
pub fn compare_complex<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    out: &[Complex<A>],
    reference: &[Complex<B>],
) -> ErrorStats {
    let o: Vec<f64> = out.iter().flat_map(|z| [z.re.into(), z.im.into()]).collect();
    let r: Vec<f64> = reference.iter().flat_map(|z| [z.re.into(), z.im.into()]).collect();
    compare(&o, &r)
}

/// Result of [`compare`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorStats {
    /// ‖out − ref‖₂ / ‖ref‖₂
    pub rel_l2: f64,
    /// max |out − ref|
    pub max_abs: f64,
    /// max |ref|, the scale for a max-abs bound
    pub max_ref: f64,
}

impl ErrorStats {
    /// Both bounds: relative L2 ≤ `rel` and max-abs ≤ `abs_frac`·max|ref| (NaN fails).
    pub fn within(&self, rel: f64, abs_frac: f64) -> bool {
        self.rel_l2 <= rel && self.max_abs <= abs_frac * self.max_ref.max(f64::MIN_POSITIVE)
    }
}
