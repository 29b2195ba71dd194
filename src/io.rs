//! Reading and writing problems and results as
//! [safetensors](https://huggingface.co/docs/safetensors) files.
//!
//! ## Input files
//!
//! | tensor     | shape                                  | dtype      |
//! |------------|----------------------------------------|------------|
//! | `q`, `k`   | `[B, L, H, K]`                         | F32, F64, F16 or BF16 |
//! | `v`        | `[B, L, H, V]`                         | q's        |
//! | `log_gate` | `[B, L, H, K, 2]` or `[B, L, H, 1, 2]` (per-head gate) | q's, or F32 when q is F16/BF16 |
//! | `h0` (optional) | `[B, H, K, V, 2]`; with `cu_seqlens` `[N, H, K, V, 2]` | as log_gate |
//! | `cu_seqlens` (optional) | `[N + 1]`                  | I64 or I32 |
//!
//! Complex tensors carry a trailing dimension of 2, `(re, im)`. q's dtype,
//! the file's *element* dtype, picks the precision of a run. An F32 or F64
//! file has every tensor in that dtype. An F16 or BF16 file
//! ([`LoadedProblem::Half`]) holds q, k, v in it, and log_gate and h0 in F32
//! (what the kernels take: a 16-bit log gate would lose the phase of a long
//! sequence) or in the same 16-bit dtype; every value is widened exactly to
//! f32.
//!
//! **Unknown tensors are an error** ([`FileError::UnknownTensors`]): a
//! misspelt optional tensor (`h_0` for `h0`) would otherwise be silently
//! ignored and change the result.
//!
//! Values are checked with [`Problem::check_all_finite`]: Re(log_gate) ≤ 0
//! (−∞ allowed, a reset), finite phases, finite q, k, v and h0.
//!
//! `cu_seqlens` says that the file holds N variable-length sequences packed
//! into one batch row (B = 1), sequence i at steps `cu_seqlens[i] ..
//! cu_seqlens[i + 1]`, each with its own state, as fla's `cu_seqlens`,
//! `initial_state` and `final_state`: h0 (optional) is `[N, H, K, V, 2]`,
//! sequence i's initial state, and the outputs' h_final `[N, H, K, V, 2]`
//! each sequence's final state (a `grad` file's dh_final and the written
//! dh0 likewise). The reader returns the offsets and h0 as a [`Packing`]
//! beside the problem, and [`Packing::forward`] / [`Packing::backward`]
//! run every sequence alone from its own state, in any mode
//! ([`crate::packing::forward_varlen`]; on the GPU the CLI runs the
//! recurrent mode's sequences in one launch, `dispatch::cuda_varlen_as`). Offsets that are not 0 first, L
//! last and strictly increasing, or B > 1, are a [`FileError::Value`]
//! naming the offset; states not N of them a [`FileError::Shape`].
//!
//! ## Output files
//!
//! `y` `[B, L, H, V]` and `h_final` `[B, H, K, V, 2]` (`[N, H, K, V, 2]`
//! for packed sequences), in the input's dtype
//! ([`write_outputs`]); for an F16 or BF16 input, y in that dtype and
//! h_final in F32, the state's precision ([`write_outputs_half`]).
//!
//! ## Robustness
//!
//! No file content makes the reader panic or allocate more than the file's
//! length can back: the header is checked (every tensor's byte range must lie
//! inside the file) before the `safetensors` crate indexes into the data,
//! shapes are multiplied with overflow checks, and values are decoded with
//! `from_le_bytes` from byte chunks (never reinterpreted in place, so
//! unaligned data is fine). The state `[B, H, K, V]` of the outputs is the
//! one size a file does not back; it is bounded by [`MAX_STATE_ELEMENTS`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use num_complex::Complex;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use thiserror::Error;

use crate::cuda::{self, Element};
use crate::error::InputError;
use crate::problem::{Dims, GateLayout, Outputs, Problem, Real};
use crate::reference::grad::{GradInputs, Grads};
use crate::testing::OwnedProblem;

/// The tensors an input file must hold.
pub const REQUIRED: [&str; 4] = ["q", "k", "v", "log_gate"];
/// The tensors an input file may hold.
pub const OPTIONAL: [&str; 1] = ["h0"];
/// The optional tensor of sequence offsets (see the module docs): integers,
/// read apart from the problem's floating-point tensors.
pub const CU_SEQLENS: &str = "cu_seqlens";
/// The complex tensors of input files (trailing 2): beside a 16-bit q they
/// may be F32, the precision the kernels take them in.
const COMPLEX: [&str; 3] = ["log_gate", "h0", "dh_final"];
/// The dtypes an input file may use.
pub const ACCEPTED_DTYPES: &str =
    "F32, F64, F16 or BF16 (q, k, v, dy the same; log_gate, h0, dh_final q's dtype, or F32 when it is F16/BF16)";
/// The most complex elements the state `[B, H, K, V]` (the outputs'
/// `h_final`) may have: 2³² (64 GiB in f64). The file does not back this
/// size, so it is bounded to keep a crafted header from asking for an
/// absurd allocation.
pub const MAX_STATE_ELEMENTS: usize = 1 << 32;

/// Something is wrong with a file. Every message names the file, and where
/// it applies the tensor and what is wrong with it.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file cannot be read (missing, permissions, a directory, …).
    #[error("cannot read `{file}`: {source}")]
    Unreadable {
        /// The file.
        file: String,
        /// The operating system's reason.
        source: std::io::Error,
    },

    /// The file cannot be written.
    #[error("cannot write `{file}`: {source}")]
    Unwritable {
        /// The file.
        file: String,
        /// Why.
        source: SafeTensorError,
    },

    /// The bytes are not a valid safetensors file: truncated, a bad header,
    /// byte ranges that do not match the shapes.
    #[error("`{file}` is not a valid safetensors file: {why}")]
    Format {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },

    /// A required tensor is absent.
    #[error("`{file}`: missing tensor `{name}` (required: q, k, v, log_gate; optional: h0; found: {found})")]
    MissingTensor {
        /// The file.
        file: String,
        /// The missing tensor.
        name: &'static str,
        /// The tensors the file does hold, comma-separated.
        found: String,
    },

    /// The file holds tensors that are not inputs of the operator.
    #[error("`{file}`: unknown tensor(s) {names}; an input file holds only q, k, v, log_gate and optionally h0")]
    UnknownTensors {
        /// The file.
        file: String,
        /// The unknown tensors' names, quoted and comma-separated.
        names: String,
    },

    /// A tensor has a dtype that is not accepted.
    #[error("`{file}`: tensor `{name}` has dtype {found}; accepted: {accepted}")]
    Dtype {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// Its dtype.
        found: String,
        /// The accepted dtypes.
        accepted: &'static str,
    },

    /// Two tensors have dtypes that do not go together: an element tensor
    /// (k, v, dy) not in q's dtype, or a complex one (log_gate, h0,
    /// dh_final) neither in q's dtype nor F32 beside a 16-bit q.
    #[error("`{file}`: tensor `{name}` is {found:?} but `{first}` is {first_dtype:?}; {rule}")]
    MixedDtypes {
        /// The file.
        file: String,
        /// The tensor that differs.
        name: String,
        /// Its dtype.
        found: Dtype,
        /// The tensor that set the dtype.
        first: &'static str,
        /// That tensor's dtype.
        first_dtype: Dtype,
        /// What the dtypes of the tensor must be.
        rule: &'static str,
    },

    /// A tensor has the wrong rank, or a fixed dimension (the trailing 2 of a
    /// complex tensor) is wrong.
    #[error("`{file}`: tensor `{name}` has shape {actual}, expected {expected}")]
    Shape {
        /// The file.
        file: String,
        /// The tensor.
        name: &'static str,
        /// The expected shape, with its dimensions named.
        expected: String,
        /// The shape in the file.
        actual: String,
    },

    /// A dimension of a tensor is zero.
    #[error("`{file}`: tensor `{name}` has shape {actual}: dimension {dim} is 0, every dimension must be at least 1")]
    ZeroDim {
        /// The file.
        file: String,
        /// The tensor.
        name: &'static str,
        /// The dimension (B, L, H, K or V).
        dim: &'static str,
        /// The shape in the file.
        actual: String,
    },

    /// Two tensors disagree on a dimension.
    #[error("`{file}`: inconsistent {dim}: `{first}` says {dim}={first_value}, `{name}` says {dim}={value}{note}")]
    InconsistentDim {
        /// The file.
        file: String,
        /// The dimension (B, L, H, K or V).
        dim: &'static str,
        /// The tensor that set it first.
        first: &'static str,
        /// Its value there.
        first_value: usize,
        /// The tensor that disagrees.
        name: &'static str,
        /// Its value there.
        value: usize,
        /// An extra hint (empty or starting with "; ").
        note: &'static str,
    },

    /// The problem's state `[B, H, K, V]` is larger than [`MAX_STATE_ELEMENTS`].
    #[error("`{file}`: the state [B, H, K, V] = {shape} has {elements} complex elements, more than the limit {limit}")]
    TooLarge {
        /// The file.
        file: String,
        /// The state shape.
        shape: String,
        /// Its element count (saturated at `usize::MAX`).
        elements: usize,
        /// The limit.
        limit: usize,
    },

    /// A value is outside the operator's domain (Re(log_gate) > 0, NaN, ±∞).
    #[error("`{file}`: {source}")]
    Value {
        /// The file.
        file: String,
        /// The value error, naming the tensor and the element.
        source: InputError,
    },
}

impl FileError {
    /// Whether the error is about the file's content or availability (bad
    /// input, a usage error) rather than a failure to write a result.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, FileError::Unwritable { .. })
    }
}

/// A scalar type a file can hold and the operator can run in (`f32`, `f64`).
pub trait FileReal: Real {
    /// The safetensors dtype.
    const DTYPE: Dtype;
    /// Appends the little-endian bytes of `self`.
    fn put_le(self, out: &mut Vec<u8>);
}

impl FileReal for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl FileReal for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// A 16-bit float dtype of a file's q, k, v (and dy; of y, dq, dk, dv
/// written for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfDtype {
    /// IEEE half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    Bf16,
}

impl HalfDtype {
    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            HalfDtype::F16 => Dtype::F16,
            HalfDtype::Bf16 => Dtype::BF16,
        }
    }
    /// The kernels' element type of this dtype (its name, unit roundoff,
    /// and [`with_element!`](crate::with_element) to run a kernel in it).
    pub fn element(self) -> cuda::Dtype {
        match self {
            HalfDtype::F16 => cuda::Dtype::F16,
            HalfDtype::Bf16 => cuda::Dtype::Bf16,
        }
    }
    /// `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        self.element().name()
    }
    /// `x` rounded to nearest (even), widened back to f32 (exact): the value
    /// a tensor of this dtype holds for `x`.
    pub fn round(self, x: f32) -> f32 {
        crate::with_element!(self.element(), T => T::from_f32(x).to_f32())
    }
    fn of(d: Dtype) -> Option<HalfDtype> {
        match d {
            Dtype::F16 => Some(HalfDtype::F16),
            Dtype::BF16 => Some(HalfDtype::Bf16),
            _ => None,
        }
    }
    /// The little-endian bytes of `xs` rounded to this dtype.
    fn bytes(self, xs: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * xs.len());
        for &x in xs {
            out.extend_from_slice(&match self {
                HalfDtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                HalfDtype::Bf16 => half::bf16::from_f32(x).to_le_bytes(),
            });
        }
        out
    }
}

/// A problem read from a file, in the file's precision.
#[derive(Clone, Debug)]
pub enum LoadedProblem {
    /// The file is F32.
    F32(OwnedProblem<f32>),
    /// The file is F64.
    F64(OwnedProblem<f64>),
    /// q, k, v are F16 or BF16 (the `HalfDtype`), widened exactly to f32,
    /// as are log_gate and h0 (F32 in the file, or the same 16-bit dtype).
    /// It runs in f32 (the CUDA kernels on the 16-bit values), and y is
    /// written in the 16-bit dtype.
    Half(HalfDtype, OwnedProblem<f32>),
}

impl LoadedProblem {
    /// The problem's sizes.
    pub fn dims(&self) -> Dims {
        match self {
            LoadedProblem::F32(p) | LoadedProblem::Half(_, p) => p.dims,
            LoadedProblem::F64(p) => p.dims,
        }
    }
    /// Whether the file holds `h0`.
    pub fn has_h0(&self) -> bool {
        match self {
            LoadedProblem::F32(p) | LoadedProblem::Half(_, p) => p.h0.is_some(),
            LoadedProblem::F64(p) => p.h0.is_some(),
        }
    }
    /// `"f32"`, `"f64"`, `"f16"` or `"bf16"`: the file's element dtype.
    pub fn precision(&self) -> &'static str {
        match self {
            LoadedProblem::F32(_) => "f32",
            LoadedProblem::F64(_) => "f64",
            LoadedProblem::Half(h, _) => h.name(),
        }
    }
}

/// One tensor of any floating-point dtype, converted to f64 (see [`read_tensors_f64`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorF64 {
    /// The dtype in the file.
    pub dtype: Dtype,
    /// The shape in the file.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f64>,
}

// ---------------------------------------------------------------- reading --

fn read_bytes(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Unreadable { file: path.display().to_string(), source })
}

fn format_err(file: &str, why: impl Into<String>) -> FileError {
    FileError::Format { file: file.to_string(), why: why.into() }
}

/// Checks, before the `safetensors` crate sees them, that the header parses
/// and that every tensor's declared byte range lies inside the file. (With
/// ranges that sum past `usize::MAX` the crate's own length check overflows
/// and can panic; this rules that out and gives a clearer message.)
fn precheck(bytes: &[u8], file: &str) -> Result<(), FileError> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(format_err(file, format!("{} bytes is too short for the 8-byte header length", bytes.len())));
    };
    let n = u64::from_le_bytes(*len_bytes);
    let header = usize::try_from(n).ok().and_then(|n| rest.get(..n)).ok_or_else(|| {
        format_err(file, format!("header length {n} exceeds the {} bytes after it (truncated?)", rest.len()))
    })?;
    let data_len = rest.len() - header.len();
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format_err(file, format!("header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(format_err(file, "header is not a JSON object"));
    };
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let range = info.get("data_offsets").and_then(|o| o.as_array()).and_then(|a| match a.as_slice() {
            [s, e] => Some((s.as_u64()?, e.as_u64()?)),
            _ => None,
        });
        let Some((start, end)) = range else {
            return Err(format_err(file, format!("tensor `{name}` has no valid `data_offsets` in the header")));
        };
        if start > end || end > data_len as u64 {
            return Err(format_err(
                file,
                format!(
                    "tensor `{name}` declares bytes {start}..{end} but the file has {data_len} data bytes (truncated?)"
                ),
            ));
        }
    }
    Ok(())
}

fn describe_safetensors_error(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensors' byte ranges do not cover the data exactly (truncated, or trailing bytes)".into()
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        other => other.to_string(),
    }
}

fn parse<'a>(bytes: &'a [u8], file: &str) -> Result<SafeTensors<'a>, FileError> {
    precheck(bytes, file)?;
    SafeTensors::deserialize(bytes).map_err(|e| format_err(file, describe_safetensors_error(&e)))
}

fn decode_f32(data: &[u8]) -> impl Iterator<Item = f32> + '_ {
    data.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c))
}
fn decode_f64(data: &[u8]) -> impl Iterator<Item = f64> + '_ {
    data.as_chunks::<8>().0.iter().map(|c| f64::from_le_bytes(*c))
}
fn decode_f16(data: &[u8]) -> impl Iterator<Item = f32> + '_ {
    data.as_chunks::<2>().0.iter().map(|c| half::f16::from_le_bytes(*c).to_f32())
}
fn decode_bf16(data: &[u8]) -> impl Iterator<Item = f32> + '_ {
    data.as_chunks::<2>().0.iter().map(|c| half::bf16::from_le_bytes(*c).to_f32())
}

fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// The named dimensions of the operator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Axis {
    B,
    L,
    H,
    K,
    V,
    /// The gate's channel axis: K, or 1 for a per-head gate.
    Gate,
    /// The trailing (re, im) axis of a complex tensor.
    Two,
    /// The packed sequences of a file with `cu_seqlens`: a state's first
    /// axis there (fla's `[N, H, K, V]` initial and final states).
    N,
}

impl Axis {
    fn label(self) -> &'static str {
        match self {
            Axis::B => "B",
            Axis::L => "L",
            Axis::H => "H",
            Axis::K => "K",
            Axis::V => "V",
            Axis::Gate => "K or 1",
            Axis::Two => "2",
            Axis::N => "N",
        }
    }
    fn slot(self) -> Option<usize> {
        match self {
            Axis::B => Some(0),
            Axis::L => Some(1),
            Axis::H => Some(2),
            Axis::K | Axis::Gate => Some(3),
            Axis::V => Some(4),
            Axis::Two | Axis::N => None,
        }
    }
}

/// The expected layout of each input tensor; `packed`: the file holds
/// `cu_seqlens`, so the states are one a sequence.
fn layout(name: &str, packed: bool) -> &'static [Axis] {
    use Axis::*;
    match name {
        "q" | "k" => &[B, L, H, K],
        "v" => &[B, L, H, V],
        "log_gate" => &[B, L, H, Gate, Two],
        "dy" => &[B, L, H, V],
        _ if packed => &[N, H, K, V, Two], // h0, dh_final (parse_with's `is_state`), one a sequence
        _ => &[B, H, K, V, Two],           // h0, dh_final
    }
}

/// Dimensions bound so far, each with the tensor that bound it.
#[derive(Default)]
struct DimTable {
    slots: [Option<(usize, &'static str)>; 5],
    per_head_gate: bool,
    /// N, for a file with `cu_seqlens` (its length − 1).
    sequences: Option<usize>,
}

impl DimTable {
    fn expected(&self, axes: &[Axis]) -> String {
        let names: Vec<&str> = axes.iter().map(|a| a.label()).collect();
        let known: Option<Vec<String>> = axes
            .iter()
            .map(|a| match a {
                Axis::Two => Some("2".to_string()),
                Axis::Gate => self.slots[3].map(|(k, _)| format!("{k} or 1")),
                Axis::N => self.sequences.map(|n| n.to_string()),
                a => a.slot().and_then(|s| self.slots[s]).map(|(v, _)| v.to_string()),
            })
            .collect();
        let complex = if axes.last() == Some(&Axis::Two) { " (complex, as (re, im) pairs)" } else { "" };
        match known {
            Some(values) => format!("[{}] = [{}]{complex}", names.join(", "), values.join(", ")),
            None => format!("[{}]{complex}", names.join(", ")),
        }
    }

    /// Checks `shape` of tensor `name` against its layout and binds its dims.
    fn bind(&mut self, file: &str, name: &'static str, shape: &[usize]) -> Result<(), FileError> {
        let axes = layout(name, self.sequences.is_some());
        let shape_err = |table: &DimTable| FileError::Shape {
            file: file.to_string(),
            name,
            expected: table.expected(axes),
            actual: shape_str(shape),
        };
        if shape.len() != axes.len() {
            return Err(shape_err(self));
        }
        for (&axis, &value) in axes.iter().zip(shape) {
            if axis == Axis::Two || axis == Axis::N {
                let want = if axis == Axis::Two { Some(2) } else { self.sequences };
                if Some(value) != want {
                    return Err(shape_err(self));
                }
                continue;
            }
            let Some(slot) = axis.slot() else { continue };
            if value == 0 {
                return Err(FileError::ZeroDim {
                    file: file.to_string(),
                    name,
                    dim: axis.label(),
                    actual: shape_str(shape),
                });
            }
            if axis == Axis::Gate {
                // 1 is a per-head gate unless K is 1 too (then both layouts agree).
                let k = self.slots[3].map(|(k, _)| k);
                if value == 1 && k != Some(1) {
                    self.per_head_gate = true;
                    continue;
                }
            }
            let dim = if axis == Axis::Gate { "K" } else { axis.label() };
            match self.slots[slot] {
                None => self.slots[slot] = Some((value, name)),
                Some((first_value, first)) if first_value != value => {
                    let note =
                        if axis == Axis::Gate { "; log_gate's 4th axis is K, or 1 for a per-head gate" } else { "" };
                    return Err(FileError::InconsistentDim {
                        file: file.to_string(),
                        dim,
                        first,
                        first_value,
                        name,
                        value,
                        note,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn dims(&self) -> Option<Dims> {
        let get = |i: usize| self.slots[i].map(|(v, _)| v);
        let d = Dims::new(get(0)?, get(1)?, get(2)?, get(3)?, get(4)?);
        Some(d.with_gate(if self.per_head_gate { GateLayout::PerHead } else { GateLayout::PerChannel }))
    }
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// A file's packed sequences (`cu_seqlens`, see the [module docs](self)):
/// the offsets, checked against the problem, and the sequences' initial
/// states, in f64 as read ([`Packing::in_precision`] gives them in the
/// problem's precision, once, before a timed run). The problem beside it
/// has no h0 of its own; run it with [`Packing::forward`] (or
/// [`Packing::forward_with`], and [`Packing::backward`]), which give every
/// sequence its own run from its own state.
#[derive(Clone, Debug, PartialEq)]
pub struct Packing<T = f64> {
    /// N + 1 offsets: sequence i is steps `cu_seqlens[i] .. cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// `[N, H, K, V]` complex (read from the file: widened exactly to f64);
    /// zero states when absent.
    pub h0: Option<Vec<Complex<T>>>,
}

impl Packing<f64> {
    /// The same packing with h0 in `T` (exact for values read from a file of
    /// that precision).
    pub fn in_precision<T: Real>(&self) -> Packing<T> {
        let h0 = self.h0.as_ref().map(|h| h.iter().map(|z| Complex::new(narrowed(z.re), narrowed(z.im))).collect());
        Packing { cu_seqlens: self.cu_seqlens.clone(), h0 }
    }
}

impl<T: Real> Packing<T> {
    /// N, the number of sequences.
    pub fn sequences(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// `forward` on `p` as the file asks: on the whole problem without
    /// packing, else on each sequence alone from its own h0
    /// ([`crate::packing::forward_varlen`]: y `[1, L, H, V]`, h_final
    /// `[N, H, K, V]`).
    pub fn forward<E: From<InputError>>(
        packing: Option<&Packing<T>>,
        p: &OwnedProblem<T>,
        mut forward: impl FnMut(&Problem<'_, T>) -> Result<Outputs<T>, E>,
    ) -> Result<Outputs<T>, E> {
        match packing {
            None => forward(&p.view()),
            Some(pk) => crate::packing::forward_varlen(&p.view(), &pk.cu_seqlens, pk.h0.as_deref(), forward),
        }
    }

    /// [`Packing::forward`] with a packed run of its own: `whole` on the
    /// problem without packing, else `packed(p, cu_seqlens, h0)` with
    /// [`crate::packing::forward_varlen`]'s contract (a launcher that runs
    /// every sequence at once: `dispatch::cuda_varlen_in`).
    pub fn forward_with<E>(
        packing: Option<&Packing<T>>,
        p: &OwnedProblem<T>,
        whole: impl FnOnce(&Problem<'_, T>) -> Result<Outputs<T>, E>,
        packed: impl FnOnce(&Problem<'_, T>, &[usize], Option<&[Complex<T>]>) -> Result<Outputs<T>, E>,
    ) -> Result<Outputs<T>, E> {
        match packing {
            None => whole(&p.view()),
            Some(pk) => packed(&p.view(), &pk.cu_seqlens, pk.h0.as_deref()),
        }
    }

    /// [`Packing::backward`] with a packed run of its own: `whole(p, dy,
    /// dh_final)` without packing, else `packed(p, cu_seqlens, h0, dy,
    /// dh_final)` with [`crate::packing::backward_varlen`]'s contract (a
    /// launcher that runs every sequence at once:
    /// `dispatch::cuda_grad_varlen_in`).
    pub fn backward_with<E>(
        packing: Option<&Packing<T>>,
        p: &OwnedProblem<T>,
        upstream: &Upstream<T>,
        whole: impl FnOnce(&Problem<'_, T>, &[T], Option<&[Complex<T>]>) -> Result<Grads<T>, E>,
        packed: impl FnOnce(
            &Problem<'_, T>,
            &[usize],
            Option<&[Complex<T>]>,
            &[T],
            Option<&[Complex<T>]>,
        ) -> Result<Grads<T>, E>,
    ) -> Result<Grads<T>, E> {
        let dh_final = upstream.dh_final.as_deref();
        match packing {
            None => whole(&p.view(), &upstream.dy, dh_final),
            Some(pk) => packed(&p.view(), &pk.cu_seqlens, pk.h0.as_deref(), &upstream.dy, dh_final),
        }
    }

    /// The gradients as the file asks ([`Packing::forward`]'s, through
    /// [`crate::packing::backward_varlen`] when packed: `dh_final` and the
    /// returned dh0 `[N, H, K, V]`).
    pub fn backward<E: From<InputError>>(
        packing: Option<&Packing<T>>,
        p: &OwnedProblem<T>,
        upstream: &Upstream<T>,
        mut backward: impl FnMut(&Problem<'_, T>, &[T], Option<&[Complex<T>]>) -> Result<Grads<T>, E>,
    ) -> Result<Grads<T>, E> {
        let dh_final = upstream.dh_final.as_deref();
        match packing {
            None => backward(&p.view(), &upstream.dy, dh_final),
            Some(pk) => crate::packing::backward_varlen(
                &p.view(),
                &pk.cu_seqlens,
                pk.h0.as_deref(),
                &upstream.dy,
                dh_final,
                backward,
            ),
        }
    }
}

/// Reads an input file (see the [module docs](self) for its layout): the
/// problem and, for a file with `cu_seqlens`, its [`Packing`].
pub fn read_problem(path: impl AsRef<Path>) -> Result<(LoadedProblem, Option<Packing>), FileError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_problem(&bytes, &path.display().to_string())
}

/// Parses the bytes of an input file; `file` names it in error messages.
pub fn parse_problem(bytes: &[u8], file: &str) -> Result<(LoadedProblem, Option<Packing>), FileError> {
    parse_with(bytes, file, &[], &[]).map(|(p, _, packing)| (p, packing))
}

/// Extra tensors of a file beyond the problem's, decoded as f64 by name
/// (from any accepted dtype, exactly).
type Extras = BTreeMap<&'static str, Vec<f64>>;

/// Parses a problem plus the tensors `extra_required` and `extra_optional`
/// (each with its layout in [`layout`]), with every check of
/// [`parse_problem`] applied to all of them.
fn parse_with(
    bytes: &[u8],
    file: &str,
    extra_required: &[&'static str],
    extra_optional: &[&'static str],
) -> Result<(LoadedProblem, Extras, Option<Packing>), FileError> {
    let st = parse(bytes, file)?;
    let names = st.names();
    let required: Vec<&'static str> = REQUIRED.iter().chain(extra_required).copied().collect();
    let optional: Vec<&'static str> = OPTIONAL.iter().chain(extra_optional).copied().collect();

    let mut unknown: Vec<&str> =
        names.iter().copied().filter(|n| !required.contains(n) && !optional.contains(n) && *n != CU_SEQLENS).collect();
    unknown.sort_unstable();
    let mut found: Vec<&str> = names.clone();
    found.sort_unstable();

    // Presence, then dtypes, then shapes, then unknown names: the most
    // basic problem is reported first.
    let mut views: Vec<(&'static str, TensorView<'_>)> = Vec::with_capacity(required.len() + optional.len());
    for &name in required.iter().chain(&optional) {
        match st.tensor(name) {
            Ok(view) => views.push((name, view)),
            Err(_) if optional.contains(&name) => {}
            Err(_) => {
                let found = if found.is_empty() { "none".to_string() } else { found.join(", ") };
                return Err(FileError::MissingTensor { file: file.to_string(), name, found });
            }
        }
    }

    // q (required, so present) sets the element dtype; k, v, dy must match
    // it, and log_gate, h0, dh_final too, or be F32 beside a 16-bit q.
    let element = views.iter().find(|(n, _)| *n == "q").map_or(Dtype::F32, |(_, v)| v.dtype());
    for (name, view) in &views {
        let dtype = view.dtype();
        if !matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16) {
            return Err(FileError::Dtype {
                file: file.to_string(),
                name: name.to_string(),
                found: dtype_name(dtype),
                accepted: ACCEPTED_DTYPES,
            });
        }
        let complex = COMPLEX.contains(name);
        let fits = dtype == element || (complex && dtype == Dtype::F32 && HalfDtype::of(element).is_some());
        if !fits {
            return Err(FileError::MixedDtypes {
                file: file.to_string(),
                name: name.to_string(),
                found: dtype,
                first: "q",
                first_dtype: element,
                rule: if !complex {
                    "q, k, v and dy must have the same dtype"
                } else if HalfDtype::of(element).is_some() {
                    "log_gate, h0 and dh_final must be F32 or q's dtype"
                } else {
                    "log_gate, h0 and dh_final must have q's dtype"
                },
            });
        }
    }

    // cu_seqlens first: with it the states are one a sequence ([N, ...]).
    let cu_seqlens = st.tensor(CU_SEQLENS).ok().map(|view| read_offsets(&view, file)).transpose()?;
    let mut table =
        DimTable { sequences: cu_seqlens.as_ref().map(|cu| cu.len().saturating_sub(1)), ..DimTable::default() };
    // The states last: a packed file's offsets are checked against the
    // problem first (a wrong offset is the cause when N states mismatch).
    let is_state = |name: &str| matches!(name, "h0" | "dh_final");
    for (name, view) in views.iter().filter(|(n, _)| !is_state(n)) {
        table.bind(file, name, view.shape())?;
    }
    if let (Some(cu), Some(dims)) = (&cu_seqlens, table.dims()) {
        crate::packing::sequence_starts(&dims, cu)
            .map_err(|source| FileError::Value { file: file.to_string(), source })?;
    }
    for (name, view) in views.iter().filter(|(n, _)| is_state(n)) {
        table.bind(file, name, view.shape())?;
    }

    if !unknown.is_empty() {
        let names: Vec<String> = unknown.iter().map(|n| format!("`{n}`")).collect();
        return Err(FileError::UnknownTensors { file: file.to_string(), names: names.join(", ") });
    }

    // Every axis of B, L, H, K, V is bound by q and v, which are required.
    let dims = table.dims().ok_or_else(|| format_err(file, "cannot determine the dimensions"))?;
    // The outputs' states: B of them, or N packed sequences (at most L,
    // which the file's bytes do not bound by a state's size).
    let states = dims.batch.max(table.sequences.unwrap_or(0));
    let state = [states, dims.heads, dims.key_dim, dims.value_dim];
    let elements = state.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
    if elements > MAX_STATE_ELEMENTS {
        return Err(FileError::TooLarge {
            file: file.to_string(),
            shape: shape_str(&state),
            elements,
            limit: MAX_STATE_ELEMENTS,
        });
    }
    // Sizes are backed by the file's bytes, so they fit; this is a cheap
    // belt-and-braces check of the products the kernels form.
    dims.validate().map_err(|source| FileError::Value { file: file.to_string(), source })?;

    let data = |name: &str| views.iter().find(|(n, _)| *n == name).map(|(_, v)| v.data());
    let req = |name: &'static str| data(name).ok_or_else(|| format_err(file, format!("tensor `{name}` vanished")));
    // Each tensor decoded by its own dtype: every accepted one widens
    // exactly into the run's precision (f64 for an F64 file, else f32,
    // which holds every F32, F16 and BF16 value; decoded straight to it, so
    // a large file costs no f64 copy).
    let dtype_of = |name: &str| views.iter().find(|(n, _)| *n == name).map(|(_, v)| v.dtype());
    let widen_f32 = |name: &str, bytes: &[u8]| -> Vec<f32> {
        match dtype_of(name) {
            Some(Dtype::F16) => decode_f16(bytes).collect(),
            Some(Dtype::BF16) => decode_bf16(bytes).collect(),
            _ => decode_f32(bytes).collect(),
        }
    };
    let widen = |name: &str, bytes: &[u8]| -> Vec<f64> {
        match dtype_of(name) {
            Some(Dtype::F64) => decode_f64(bytes).collect(),
            _ => widen_f32(name, bytes).into_iter().map(f64::from).collect(),
        }
    };
    // Packed: the offsets checked against the problem, and h0 (one state a
    // sequence) kept beside it rather than in it.
    let packing = match cu_seqlens {
        Some(cu_seqlens) => {
            // (The offsets were checked against `dims` above.)
            let h0 = data("h0").map(|b| widen("h0", b));
            if let Some(h0) = &h0 {
                // Indexed by complex element, as the problem's own h0 check.
                check_finite(file, "h0", h0, 2)?;
            }
            Some(Packing { cu_seqlens, h0: h0.map(|h| complex_pairs(&h)) })
        }
        None => None,
    };
    let h0 = if packing.is_some() { None } else { data("h0") };
    let loaded = if element == Dtype::F64 {
        LoadedProblem::F64(check_values(assemble(dims, &req, h0, |name, b| widen(name, b))?, file)?)
    } else {
        let p = check_values(assemble(dims, &req, h0, widen_f32)?, file)?;
        match HalfDtype::of(element) {
            Some(h) => LoadedProblem::Half(h, p),
            None => LoadedProblem::F32(p),
        }
    };
    let mut extras = Extras::new();
    for &name in extra_required.iter().chain(extra_optional) {
        if let Some(bytes) = data(name) {
            let values = widen(name, bytes);
            check_finite(file, name, &values, 1)?;
            extras.insert(name, values);
        }
    }
    Ok((loaded, extras, packing))
}

/// A [`FileError::Value`] naming the first value of tensor `name` that is
/// not finite, by its index in elements of `per_element` values.
fn check_finite(file: &str, name: &'static str, values: &[f64], per_element: usize) -> Result<(), FileError> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(i) => {
            let value = format!("{}", values[i]);
            let source = InputError::Value { name, index: i / per_element, value, why: "must be finite" };
            Err(FileError::Value { file: file.to_string(), source })
        }
        None => Ok(()),
    }
}

/// Interleaved (re, im) pairs as complex numbers.
fn complex_pairs<T: Copy>(xs: &[T]) -> Vec<Complex<T>> {
    xs.as_chunks::<2>().0.iter().map(|&[re, im]| Complex::new(re, im)).collect()
}

/// `x` in `T` (exact for values read from a file of `T`'s precision).
fn narrowed<T: Real>(x: f64) -> T {
    T::from(x).unwrap_or_else(T::nan)
}

/// The upstream gradients of a `grad` input file.
#[derive(Clone, Debug)]
pub struct Upstream<T> {
    /// `dy` `[B, L, H, V]`.
    pub dy: Vec<T>,
    /// `dh_final` `[B, H, K, V]` (packed sequences: `[N, H, K, V]`)
    /// complex, when the file holds it.
    pub dh_final: Option<Vec<Complex<T>>>,
}

/// A `grad` input file: the forward problem and the upstream gradients, in
/// the file's precision.
#[derive(Clone, Debug)]
pub enum LoadedGradProblem {
    /// The file is F32.
    F32(OwnedProblem<f32>, Upstream<f32>),
    /// The file is F64.
    F64(OwnedProblem<f64>, Upstream<f64>),
    /// q, k, v and dy are F16 or BF16, widened exactly to f32 (as in
    /// [`LoadedProblem::Half`]; dh_final F32 or the same 16-bit dtype).
    Half(HalfDtype, OwnedProblem<f32>, Upstream<f32>),
}

/// Reads a `grad` input file: an input file plus `dy` `[B, L, H, V]` (q's
/// dtype) and optional `dh_final` `[B, H, K, V, 2]` (as log_gate), same
/// checks.
pub fn read_grad_problem(path: impl AsRef<Path>) -> Result<(LoadedGradProblem, Option<Packing>), FileError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_grad_problem(&bytes, &path.display().to_string())
}

/// Parses the bytes of a `grad` input file (see [`read_grad_problem`]).
pub fn parse_grad_problem(bytes: &[u8], file: &str) -> Result<(LoadedGradProblem, Option<Packing>), FileError> {
    let (problem, mut extras, packing) = parse_with(bytes, file, &["dy"], &["dh_final"])?;
    let dy = extras.remove("dy").ok_or_else(|| format_err(file, "tensor `dy` vanished"))?;
    let dh_final = extras.remove("dh_final");
    fn upstream<T: Real>(dy: Vec<f64>, dh_final: Option<Vec<f64>>) -> Upstream<T> {
        Upstream {
            dy: dy.into_iter().map(narrowed).collect(),
            dh_final: dh_final.map(|v| v.into_iter().map(narrowed).collect::<Vec<T>>()).map(|v| complex_pairs(&v)),
        }
    }
    let loaded = match problem {
        LoadedProblem::F32(p) => LoadedGradProblem::F32(p, upstream(dy, dh_final)),
        LoadedProblem::F64(p) => LoadedGradProblem::F64(p, upstream(dy, dh_final)),
        LoadedProblem::Half(h, p) => LoadedGradProblem::Half(h, p, upstream(dy, dh_final)),
    };
    Ok((loaded, packing))
}

/// `decode(name, bytes)`: the tensor's values in `T`.
fn assemble<'b, T: Real>(
    dims: Dims,
    req: &dyn Fn(&'static str) -> Result<&'b [u8], FileError>,
    h0: Option<&[u8]>,
    decode: impl Fn(&str, &[u8]) -> Vec<T>,
) -> Result<OwnedProblem<T>, FileError> {
    let complex = |xs: Vec<T>| complex_pairs(&xs);
    Ok(OwnedProblem {
        dims,
        q: decode("q", req("q")?),
        k: decode("k", req("k")?),
        v: decode("v", req("v")?),
        log_gate: complex(decode("log_gate", req("log_gate")?)),
        h0: h0.map(|b| complex(decode("h0", b))),
    })
}

fn check_values<T: Real>(p: OwnedProblem<T>, file: &str) -> Result<OwnedProblem<T>, FileError> {
    let view = p.view();
    view.validate().map_err(|source| FileError::Value { file: file.to_string(), source })?;
    view.check_all_finite().map_err(|source| FileError::Value { file: file.to_string(), source })?;
    Ok(p)
}

/// The offsets of a `cu_seqlens` tensor: rank 1, I64 or I32, none negative
/// (their order and range are checked against the problem by
/// [`crate::packing::sequence_starts`]).
fn read_offsets(view: &TensorView<'_>, file: &str) -> Result<Vec<usize>, FileError> {
    let values: Vec<i64> = match view.dtype() {
        Dtype::I64 => view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::I32 => view.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()).into()).collect(),
        other => {
            return Err(FileError::Dtype {
                file: file.to_string(),
                name: CU_SEQLENS.to_string(),
                found: dtype_name(other),
                accepted: "I64 or I32 (sequence offsets)",
            });
        }
    };
    if view.shape().len() != 1 {
        return Err(FileError::Shape {
            file: file.to_string(),
            name: CU_SEQLENS,
            expected: "[N + 1] (the offsets of N sequences, 0 first, L last)".into(),
            actual: shape_str(view.shape()),
        });
    }
    values
        .iter()
        .enumerate()
        .map(|(index, &x)| {
            usize::try_from(x).map_err(|_| FileError::Value {
                file: file.to_string(),
                source: InputError::Value { name: CU_SEQLENS, index, value: x.to_string(), why: "offsets are ≥ 0" },
            })
        })
        .collect()
}

/// Reads every tensor of a safetensors file as f64, by name. Accepts F32,
/// F64, F16 and BF16 tensors; any other dtype is a [`FileError::Dtype`].
pub fn read_tensors_f64(path: impl AsRef<Path>) -> Result<BTreeMap<String, TensorF64>, FileError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_tensors_f64(&bytes, &path.display().to_string())
}

/// [`read_tensors_f64`] on the bytes of a file; `file` names it in errors.
pub fn parse_tensors_f64(bytes: &[u8], file: &str) -> Result<BTreeMap<String, TensorF64>, FileError> {
    let st = parse(bytes, file)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let bytes = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F64 => decode_f64(bytes).collect(),
            Dtype::F32 => decode_f32(bytes).map(f64::from).collect(),
            Dtype::F16 => decode_f16(bytes).map(f64::from).collect(),
            Dtype::BF16 => decode_bf16(bytes).map(f64::from).collect(),
            other => {
                return Err(FileError::Dtype {
                    file: file.to_string(),
                    name: name.to_string(),
                    found: dtype_name(other),
                    accepted: "F32, F64, F16 or BF16",
                });
            }
        };
        out.insert(name.to_string(), TensorF64 { dtype: view.dtype(), shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

// ---------------------------------------------------------------- writing --

fn reals<T: FileReal>(xs: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(xs));
    for &x in xs {
        x.put_le(&mut out);
    }
    out
}

fn complexes<T: FileReal>(xs: &[Complex<T>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(xs));
    for z in xs {
        z.re.put_le(&mut out);
        z.im.put_le(&mut out);
    }
    out
}

/// Named tensors ready to serialize: name, dtype, shape, little-endian bytes.
type Tensors = Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>;

fn serialize(tensors: &Tensors, file: &str) -> Result<Vec<u8>, FileError> {
    let views = views(tensors, file)?;
    safetensors::serialize(views, None).map_err(|source| FileError::Unwritable { file: file.to_string(), source })
}

fn views<'a>(tensors: &'a Tensors, file: &str) -> Result<Vec<(&'static str, TensorView<'a>)>, FileError> {
    tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (*name, v))
                .map_err(|source| FileError::Unwritable { file: file.to_string(), source })
        })
        .collect()
}

fn write(path: &Path, tensors: &Tensors) -> Result<(), FileError> {
    let file = path.display().to_string();
    let views = views(tensors, &file)?;
    safetensors::serialize_to_file(views, None, path).map_err(|source| FileError::Unwritable { file, source })
}

fn with2(shape: [usize; 4]) -> Vec<usize> {
    let mut s = shape.to_vec();
    s.push(2);
    s
}

fn problem_tensors<T: FileReal>(p: &Problem<'_, T>) -> Tensors {
    let d = &p.dims;
    let mut t: Tensors = vec![
        ("q", T::DTYPE, d.qk_shape().to_vec(), reals(p.q)),
        ("k", T::DTYPE, d.qk_shape().to_vec(), reals(p.k)),
        ("v", T::DTYPE, d.v_shape().to_vec(), reals(p.v)),
        ("log_gate", T::DTYPE, with2(d.gate_shape()), complexes(p.log_gate)),
    ];
    if let Some(h0) = p.h0 {
        t.push(("h0", T::DTYPE, with2(d.state_shape()), complexes(h0)));
    }
    t
}

fn output_tensors<T: FileReal>(dims: &Dims, out: &Outputs<T>) -> Tensors {
    vec![
        ("y", T::DTYPE, dims.v_shape().to_vec(), reals(&out.y)),
        ("h_final", T::DTYPE, with2(states_shape(dims, out.h_final.len())), complexes(&out.h_final)),
    ]
}

/// The shape of `len` states of `dims`' heads: `[B, H, K, V]`, or
/// `[N, H, K, V]` for N packed sequences ([`Packing`]): N = len / (H·K·V).
fn states_shape(dims: &Dims, len: usize) -> [usize; 4] {
    let one = dims.heads * dims.key_dim * dims.value_dim;
    [len / one.max(1), dims.heads, dims.key_dim, dims.value_dim]
}

/// Serializes a problem as an input file (the layout [`read_problem`] reads).
/// The buffer lengths must match `p.dims` ([`Problem::validate`]).
pub fn problem_to_bytes<T: FileReal>(p: &Problem<'_, T>) -> Result<Vec<u8>, FileError> {
    serialize(&problem_tensors(p), "<memory>")
}

/// Writes a problem as an input file (the layout [`read_problem`] reads).
pub fn write_problem<T: FileReal>(path: impl AsRef<Path>, p: &Problem<'_, T>) -> Result<(), FileError> {
    write(path.as_ref(), &problem_tensors(p))
}

/// Writes a `grad` input file: the problem plus `dy` `[B, L, H, V]` and
/// optional `dh_final` `[B, H, K, V, 2]` (the layout [`read_grad_problem`] reads).
pub fn write_grad_problem<T: FileReal>(
    path: impl AsRef<Path>,
    p: &Problem<'_, T>,
    upstream: &GradInputs<'_, T>,
) -> Result<(), FileError> {
    let d = &p.dims;
    let mut t = problem_tensors(p);
    t.push(("dy", T::DTYPE, d.v_shape().to_vec(), reals(upstream.dy)));
    if let Some(dh) = upstream.dh_final {
        t.push(("dh_final", T::DTYPE, with2(d.state_shape()), complexes(dh)));
    }
    write(path.as_ref(), &t)
}

/// Writes gradients: `dq`, `dk` `[B, L, H, K]`, `dv` `[B, L, H, V]`,
/// `dlog_gate` (log_gate's shape, trailing 2) and, when present, `dh0`
/// `[B, H, K, V, 2]`.
pub fn write_grads<T: FileReal>(path: impl AsRef<Path>, dims: &Dims, g: &Grads<T>) -> Result<(), FileError> {
    let mut t: Tensors = vec![
        ("dq", T::DTYPE, dims.qk_shape().to_vec(), reals(&g.dq)),
        ("dk", T::DTYPE, dims.qk_shape().to_vec(), reals(&g.dk)),
        ("dv", T::DTYPE, dims.v_shape().to_vec(), reals(&g.dv)),
        ("dlog_gate", T::DTYPE, with2(dims.gate_shape()), complexes(&g.dlog_gate)),
    ];
    if let Some(dh0) = &g.dh0 {
        t.push(("dh0", T::DTYPE, with2(states_shape(dims, dh0.len())), complexes(dh0)));
    }
    write(path.as_ref(), &t)
}

/// A problem of f32 values as an F16 or BF16 input file: q, k, v rounded
/// to `half`, log_gate and h0 in F32 (the layout [`read_problem`] reads as
/// [`LoadedProblem::Half`]).
fn problem_tensors_half(p: &Problem<'_, f32>, half: HalfDtype) -> Tensors {
    let mut t = problem_tensors(p);
    for (name, dtype, _, bytes) in &mut t {
        let values = match *name {
            "q" => p.q,
            "k" => p.k,
            "v" => p.v,
            _ => continue,
        };
        *dtype = half.dtype();
        *bytes = half.bytes(values);
    }
    t
}

/// Writes an F16 or BF16 input file (read back as [`LoadedProblem::Half`]): q, k, v
/// rounded to `half` (to nearest even), log_gate and h0 in F32.
pub fn write_problem_half(path: impl AsRef<Path>, p: &Problem<'_, f32>, half: HalfDtype) -> Result<(), FileError> {
    write(path.as_ref(), &problem_tensors_half(p, half))
}

/// Writes an F16 or BF16 `grad` input file: [`write_problem_half`]'s
/// tensors, `dy` rounded to `half`, `dh_final` in F32.
pub fn write_grad_problem_half(
    path: impl AsRef<Path>,
    p: &Problem<'_, f32>,
    upstream: &GradInputs<'_, f32>,
    half: HalfDtype,
) -> Result<(), FileError> {
    let d = &p.dims;
    let mut t = problem_tensors_half(p, half);
    t.push(("dy", half.dtype(), d.v_shape().to_vec(), half.bytes(upstream.dy)));
    if let Some(dh) = upstream.dh_final {
        t.push(("dh_final", Dtype::F32, with2(d.state_shape()), complexes(dh)));
    }
    write(path.as_ref(), &t)
}

/// Writes the gradients of an F16 or BF16 input: `dq`, `dk`, `dv` rounded to
/// `half` (to nearest even; the CUDA kernels' already are), `dlog_gate` and
/// `dh0` in F32 (the precision of log_gate and h0 in the kernels).
pub fn write_grads_half(path: impl AsRef<Path>, dims: &Dims, g: &Grads<f32>, half: HalfDtype) -> Result<(), FileError> {
    let mut t: Tensors = vec![
        ("dq", half.dtype(), dims.qk_shape().to_vec(), half.bytes(&g.dq)),
        ("dk", half.dtype(), dims.qk_shape().to_vec(), half.bytes(&g.dk)),
        ("dv", half.dtype(), dims.v_shape().to_vec(), half.bytes(&g.dv)),
        ("dlog_gate", Dtype::F32, with2(dims.gate_shape()), complexes(&g.dlog_gate)),
    ];
    if let Some(dh0) = &g.dh0 {
        t.push(("dh0", Dtype::F32, with2(states_shape(dims, dh0.len())), complexes(dh0)));
    }
    write(path.as_ref(), &t)
}

/// Writes the outputs of an F16 or BF16 input: `y` rounded to `half` (to
/// nearest even; the CUDA kernels' already is), `h_final` in F32, the
/// state's precision (a continuation from it loses nothing).
pub fn write_outputs_half(
    path: impl AsRef<Path>,
    dims: &Dims,
    out: &Outputs<f32>,
    half: HalfDtype,
) -> Result<(), FileError> {
    let t: Tensors = vec![
        ("y", half.dtype(), dims.v_shape().to_vec(), half.bytes(&out.y)),
        ("h_final", Dtype::F32, with2(states_shape(dims, out.h_final.len())), complexes(&out.h_final)),
    ];
    write(path.as_ref(), &t)
}

/// Writes the outputs `y` `[B, L, H, V]` and `h_final` `[B, H, K, V, 2]`.
pub fn write_outputs<T: FileReal>(path: impl AsRef<Path>, dims: &Dims, out: &Outputs<T>) -> Result<(), FileError> {
    write(path.as_ref(), &output_tensors(dims, out))
}

/// Serializes the outputs as [`write_outputs`] writes them.
pub fn outputs_to_bytes<T: FileReal>(dims: &Dims, out: &Outputs<T>) -> Result<Vec<u8>, FileError> {
    serialize(&output_tensors(dims, out), "<memory>")
}

impl fmt::Display for LoadedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.dims();
        let gate = match d.gate {
            GateLayout::PerChannel => "per-channel",
            GateLayout::PerHead => "per-head",
        };
        write!(
            f,
            "{} B={} L={} H={} K={} V={} ({gate} gate, h0 {})",
            self.precision(),
            d.batch,
            d.len,
            d.heads,
            d.key_dim,
            d.value_dim,
            if self.has_h0() { "given" } else { "zero" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{GateRegime, dims, random_problem};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn problems_round_trip_in_both_precisions() {
        for (i, per_head) in [false, true].into_iter().enumerate() {
            for with_h0 in [false, true] {
                let p = random_problem(dims(2, 9, 3, 4, 5, per_head), GateRegime::Resets(0.2), with_h0, i as u64);
                let bytes = problem_to_bytes(&p.view()).unwrap();
                let LoadedProblem::F64(back) = parse_problem(&bytes, "mem").unwrap().0 else { panic!("not F64") };
                assert_eq!(back.dims, p.dims);
                assert_eq!((&back.q, &back.k, &back.v), (&p.q, &p.k, &p.v));
                assert_eq!((&back.log_gate, &back.h0), (&p.log_gate, &p.h0));

                let p32 = p.to_f32();
                let bytes = problem_to_bytes(&p32.view()).unwrap();
                let LoadedProblem::F32(back) = parse_problem(&bytes, "mem").unwrap().0 else { panic!("not F32") };
                assert_eq!((back.dims, &back.q, &back.log_gate, &back.h0), (p32.dims, &p32.q, &p32.log_gate, &p32.h0));
            }
        }
    }

    #[test]
    fn half_problems_read_back_as_the_rounded_values() {
        let p = random_problem(dims(2, 9, 3, 4, 5, false), GateRegime::Resets(0.2), true, 7).to_f32();
        for half in [HalfDtype::F16, HalfDtype::Bf16] {
            let bytes = serialize(&problem_tensors_half(&p.view(), half), "mem").unwrap();
            let LoadedProblem::Half(h, back) = parse_problem(&bytes, "mem").unwrap().0 else { panic!("not 16-bit") };
            assert_eq!(h, half);
            let rounded = |xs: &[f32]| xs.iter().map(|&x| half.round(x)).collect::<Vec<_>>();
            assert_eq!((&back.q, &back.k, &back.v), (&rounded(&p.q), &rounded(&p.k), &rounded(&p.v)));
            // The gate and h0 travel in F32: bit for bit.
            assert_eq!((&back.log_gate, &back.h0), (&p.log_gate, &p.h0));
            assert!(back.q.iter().zip(&p.q).any(|(a, b)| a != b), "{half:?} rounded nothing");
        }
    }

    #[test]
    fn outputs_read_back_as_f64() {
        let d = dims(1, 2, 1, 2, 3, false);
        let out = Outputs { y: vec![1.5f32, -2.0, 0.25, 3.0, 4.0, 5.0], h_final: vec![Complex::new(1.0f32, -1.0); 6] };
        let t = parse_tensors_f64(&outputs_to_bytes(&d, &out).unwrap(), "mem").unwrap();
        assert_eq!(t["y"].shape, vec![1, 2, 1, 3]);
        assert_eq!(t["y"].data, vec![1.5, -2.0, 0.25, 3.0, 4.0, 5.0]);
        assert_eq!(t["h_final"].shape, vec![1, 1, 2, 3, 2]);
        assert_eq!(&t["h_final"].data[..2], &[1.0, -1.0]);
        assert_eq!(t["y"].dtype, Dtype::F32);
    }

    #[test]
    fn k_of_one_with_a_gate_of_one_is_per_channel() {
        let p = random_problem(dims(1, 4, 2, 1, 3, false), GateRegime::Random, false, 0);
        let bytes = problem_to_bytes(&p.view()).unwrap();
        assert_eq!(parse_problem(&bytes, "mem").unwrap().0.dims().gate, GateLayout::PerChannel);
    }

    fn header_file(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    /// Byte ranges summing to nearly 2⁶⁴ overflow the `safetensors` crate's
    /// own length check (a panic); the pre-check refuses them first.
    #[test]
    fn byte_ranges_past_the_file_are_refused_without_panic() {
        let size: u64 = (1 << 61) - 1;
        let entries: Vec<String> = (0..8u64)
            .map(|i| {
                format!(r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#, i * size, (i + 1) * size)
            })
            .collect();
        let bytes = header_file(&format!("{{{}}}", entries.join(",")), 16);
        for err in [parse_problem(&bytes, "crafted").unwrap_err(), parse_tensors_f64(&bytes, "crafted").unwrap_err()] {
            assert!(matches!(err, FileError::Format { .. }), "{err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[test]
    fn huge_declared_state_is_refused() {
        // K = V = 2^20 backed by q, k, v of 4 MiB each; the state would be 2^40.
        let n = 1usize << 20;
        let (b4, g8) = (n * 4, 8);
        let header = format!(
            concat!(
                r#"{{"q":{{"dtype":"F32","shape":[1,1,1,{n}],"data_offsets":[0,{a}]}},"#,
                r#""k":{{"dtype":"F32","shape":[1,1,1,{n}],"data_offsets":[{a},{b}]}},"#,
                r#""v":{{"dtype":"F32","shape":[1,1,1,{n}],"data_offsets":[{b},{c}]}},"#,
                r#""log_gate":{{"dtype":"F32","shape":[1,1,1,1,2],"data_offsets":[{c},{d}]}}}}"#
            ),
            n = n,
            a = b4,
            b = 2 * b4,
            c = 3 * b4,
            d = 3 * b4 + g8
        );
        let err = parse_problem(&header_file(&header, 3 * b4 + g8), "big").unwrap_err();
        assert!(matches!(err, FileError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn messages_name_tensor_and_problem() {
        let p = random_problem(dims(1, 3, 2, 4, 2, false), GateRegime::Random, true, 1);
        let mut bad = p.clone();
        bad.log_gate[5].re = 0.25;
        let err = parse_problem(&problem_to_bytes(&bad.view()).unwrap(), "f.safetensors").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FileError::Value { .. }));
        assert!(
            msg.contains("f.safetensors") && msg.contains("`log_gate` element 5") && msg.contains("Re(log_gate) > 0"),
            "{msg}"
        );

        let err = parse_problem(&header_file("{}", 0), "e").unwrap_err();
        assert!(err.to_string().contains("missing tensor `q`") && err.to_string().contains("found: none"), "{err}");
        let err = parse_problem(b"\x05\0\0\0\0\0\0\0[1,2]", "j").unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
    }

    /// 200 random mutations of a valid file: every one loads or is refused,
    /// none panics.
    #[test]
    fn mutated_files_never_panic() {
        let p = random_problem(dims(1, 5, 2, 3, 2, false), GateRegime::Resets(0.2), true, 9);
        let valid = problem_to_bytes(&p.view()).unwrap();
        let header_end = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
        let mut rng = StdRng::seed_from_u64(42);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..200 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                if bytes.is_empty() {
                    bytes.push(rng.random());
                }
                let header_end = header_end.min(bytes.len());
                match rng.random_range(0..6) {
                    // flip a byte in the header (or anywhere)
                    0 => {
                        let i = rng.random_range(0..header_end);
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                    // replace a header digit by another digit (plausible shapes/offsets)
                    2 => {
                        let digits: Vec<usize> = (8..header_end).filter(|&i| bytes[i].is_ascii_digit()).collect();
                        if !digits.is_empty() {
                            let i = digits[rng.random_range(0..digits.len())];
                            bytes[i] = b'0' + rng.random_range(0..10u8);
                        }
                    }
                    3 => bytes.truncate(rng.random_range(0..bytes.len())),
                    4 => {
                        let n = rng.random_range(1..64);
                        bytes.extend((0..n).map(|_| rng.random::<u8>()));
                    }
                    _ => {
                        let i = rng.random_range(0..bytes.len());
                        bytes.insert(i, rng.random());
                    }
                }
            }
            match parse_problem(&bytes, "fuzz") {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                }
            }
            let _ = parse_tensors_f64(&bytes, "fuzz");
        }
        assert!(refused > 100, "mutations should mostly be refused: ok {ok}, refused {refused}");
    }
}
