//! What the launchers of every kernel share ([`super::recurrent`],
//! [`super::scan`], [`super::attention`], [`super::chunk`]): the device buffers of a call, the
//! host-side checks (lengths, contexts, alignment), the fields every
//! `Gateloop*Params` struct has in common (dims, strides, flags, dtype, the
//! tensor pointers), and the upload/download of the `forward_host`
//! conveniences.

use std::borrow::Cow;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, SyncOnDrop};
use num_complex::Complex;

use super::abi::{
    self, GateloopAttentionParams, GateloopChunkGradParams, GateloopChunkParams, GateloopDims,
    GateloopRecurrentGradParams, GateloopRecurrentParams, GateloopScanGradParams, GateloopScanParams,
    GateloopSeqStrides, GateloopStateStrides,
};
use super::element::{Element, round_slice, widen_slice};
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, GateLayout, Outputs, Problem};
use crate::reference::grad::Grads;

/// Device inputs of one call. q, k, v are `T` (f32, f16 or bf16; scan and
/// attention: f32); the complex tensors (`log_gate`, `h0`) are complex f32
/// for every `T`, as interleaved (re, im) f32 pairs: twice as many f32 as
/// complex elements, 8-byte aligned. All must belong to the [`Gpu`]'s context.
pub struct DeviceInputs<'a, T = f32> {
    /// `[B, L, H, K]`
    pub q: &'a dyn DevicePtr<T>,
    /// `[B, L, H, K]`
    pub k: &'a dyn DevicePtr<T>,
    /// `[B, L, H, V]`
    pub v: &'a dyn DevicePtr<T>,
    /// `[B, L, H, K]` or `[B, L, H, 1]` complex f32
    pub log_gate: &'a dyn DevicePtr<f32>,
    /// `[B, H, K, V]` complex f32, or none (zero initial state)
    pub h0: Option<&'a dyn DevicePtr<f32>>,
}

// Shared references only: a copy names the same buffers (the training
// pair's forward and backward take the same inputs). Not derived, which
// would ask T: Copy of the element type.
impl<T> Clone for DeviceInputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceInputs<'_, T> {}

/// Caller-owned device outputs (every element is overwritten).
pub struct DeviceOutputs<'a, T = f32> {
    /// `[B, L, H, V]`, `T`
    pub y: &'a mut dyn DevicePtrMut<T>,
    /// `[B, H, K, V]` complex f32
    pub h_final: &'a mut dyn DevicePtrMut<f32>,
}

/// Where a kernel's initial state comes from and its final state goes.
pub(crate) enum StateIo<'a> {
    /// Forward: an optional `h0` read, a distinct `h_final` written.
    Separate { h0: Option<&'a dyn DevicePtr<f32>>, h_final: &'a mut dyn DevicePtrMut<f32> },
    /// Decode: one buffer, read then overwritten (`GATELOOP_FLAG_STATE_IN_PLACE`).
    InPlace(&'a mut dyn DevicePtrMut<f32>),
}

/// Every device buffer of one call.
pub(crate) struct Buffers<'a, T> {
    pub q: &'a dyn DevicePtr<T>,
    pub k: &'a dyn DevicePtr<T>,
    pub v: &'a dyn DevicePtr<T>,
    pub log_gate: &'a dyn DevicePtr<f32>,
    pub y: &'a mut dyn DevicePtrMut<T>,
    pub state: StateIo<'a>,
    /// f32 scratch of the multi-kernel modes (see `src/cuda/mod.rs`).
    pub workspace: Option<&'a mut dyn DevicePtrMut<f32>>,
    /// log_gate, h0, h_final are real f32 (the chunked kernel's real-gate
    /// entry), not complex.
    pub real_gates: bool,
    /// Packed sequences (the recurrent kernel's `cu_seqlens`): q, k, v,
    /// log_gate and y are one batch row `[1, L, H, *]`, the states `[B, H,
    /// K, V]` with B = `d.batch` sequences.
    pub packed: bool,
}

/// The device addresses of one call, and the guards that order `stream`
/// after earlier writes of the buffers (now) and record this call's reads and
/// writes (when dropped, after the launches).
pub(crate) struct Bound<'a> {
    /// The workspace's address (None when none is needed).
    pub workspace: Option<u64>,
    _guards: Vec<SyncOnDrop<'a>>,
}

impl<'a, T> Buffers<'a, T> {
    /// The buffers of a forward call.
    pub fn forward<'i: 'a, 'o: 'a, 'w: 'a>(
        inputs: DeviceInputs<'i, T>,
        out: DeviceOutputs<'o, T>,
        workspace: Option<&'w mut dyn DevicePtrMut<f32>>,
    ) -> Self {
        let DeviceInputs { q, k, v, log_gate, h0 } = inputs;
        let state = StateIo::Separate { h0, h_final: out.h_final };
        let workspace = workspace.map(|w| -> &'a mut dyn DevicePtrMut<f32> { w });
        Buffers { q, k, v, log_gate, y: out.y, state, workspace, real_gates: false, packed: false }
    }

    /// The same buffers with log_gate, h0 and h_final read as real f32.
    pub fn with_real_gates(self) -> Self {
        Buffers { real_gates: true, ..self }
    }

    /// Checks on the host, in this order: every buffer's length against `d`
    /// (packed: the sequence tensors' against one batch row of `d`; the error
    /// names the argument), the workspace's length (at least
    /// `ws_len` f32; `ws_shape` describes it in the error), that `stream` and
    /// every buffer belong to the Gpu's context.
    pub fn check(
        &self,
        gpu: &Gpu,
        stream: &CudaStream,
        d: &Dims,
        ws_len: usize,
        ws_shape: impl FnOnce() -> String,
    ) -> Result<(), InputError> {
        let complex = !self.real_gates;
        let h0 = match &self.state {
            StateIo::Separate { h0, .. } => *h0,
            StateIo::InPlace(_) => None,
        };
        let seq = if self.packed { Dims { batch: 1, ..*d } } else { *d };
        check_input_lens(&seq, d, self.q, self.k, self.v, self.log_gate, h0, complex)?;
        check_len("y", seq.v_shape(), false, self.y.len())?;
        match &self.state {
            StateIo::Separate { h_final, .. } => check_len("h_final", d.state_shape(), complex, h_final.len())?,
            StateIo::InPlace(s) => check_len("state", d.state_shape(), complex, s.len())?,
        }
        let have = self.workspace.as_ref().map_or(0, |w| w.len());
        if have < ws_len {
            return Err(InputError::Length { name: "workspace", expected: ws_len, actual: have, shape: ws_shape() });
        }
        check_stream(gpu, stream)?;
        check_input_contexts(gpu, self.q, self.k, self.v, self.log_gate, h0)?;
        check_context(gpu, "y", &*self.y)?;
        match &self.state {
            StateIo::Separate { h_final, .. } => check_context(gpu, "h_final", &**h_final)?,
            StateIo::InPlace(s) => check_context(gpu, "state", &**s)?,
        }
        if let Some(w) = self.workspace.as_ref() {
            check_context(gpu, "workspace", &**w)?;
        }
        Ok(())
    }

    /// Takes the device address of every buffer on `stream` (the workspace
    /// only when `use_workspace`), checks that complex buffers and the
    /// workspace are 8-byte aligned, and writes the tensor pointers and the
    /// `HAS_H0` / `STATE_IN_PLACE` flags into `params`.
    ///
    /// Each state buffer is borrowed exactly once: in place, the one `&mut`
    /// gives the one device pointer that the kernel both reads and writes
    /// (h0 stays NULL); no `&` and `&mut` of the same buffer coexist.
    pub fn bind<'s, P: SeqParams>(
        self,
        stream: &'s CudaStream,
        params: &mut P,
        use_workspace: bool,
    ) -> Result<Bound<'s>, InputError>
    where
        'a: 's,
    {
        let Buffers { q, k, v, log_gate, y, state, workspace, real_gates, packed: _ } = self;
        // Complex buffers are read as 8-byte pairs; real ones need f32 alignment only.
        let check_gate_align = |name, ptr| if real_gates { Ok(()) } else { check_align(name, ptr) };
        let mut guards = Vec::with_capacity(8);
        let mut ptr = |(p, guard): (u64, SyncOnDrop<'s>)| {
            guards.push(guard);
            p
        };
        let q = ptr(q.device_ptr(stream));
        let k = ptr(k.device_ptr(stream));
        let v = ptr(v.device_ptr(stream));
        let log_gate = ptr(log_gate.device_ptr(stream));
        let y = ptr(y.device_ptr_mut(stream));
        check_gate_align("log_gate", log_gate)?;
        let (h0, h_final, flags) = match state {
            StateIo::Separate { h0, h_final } => {
                let h0 = h0.map(|h0| ptr(h0.device_ptr(stream)));
                let h_final = ptr(h_final.device_ptr_mut(stream));
                check_gate_align("h_final", h_final)?;
                if let Some(h0) = h0 {
                    check_gate_align("h0", h0)?;
                }
                (h0, h_final, if h0.is_some() { abi::GATELOOP_FLAG_HAS_H0 } else { 0 })
            }
            StateIo::InPlace(s) => {
                let s = ptr(s.device_ptr_mut(stream));
                check_gate_align("state", s)?;
                (None, s, abi::GATELOOP_FLAG_STATE_IN_PLACE)
            }
        };
        let workspace = match workspace {
            Some(w) if use_workspace => {
                let w = ptr(w.device_ptr_mut(stream));
                check_align("workspace", w)?;
                Some(w)
            }
            _ => None,
        };
        *params.flags_mut() |= flags;
        params.set_pointers(Pointers { q, k, v, log_gate, h0, y, h_final });
        Ok(Bound { workspace, _guards: guards })
    }
}

/// The device addresses of the tensors of one call.
pub(crate) struct Pointers {
    q: u64,
    k: u64,
    v: u64,
    log_gate: u64,
    h0: Option<u64>,
    y: u64,
    h_final: u64,
}

/// The fields every kernel parameter struct of `cuda/gateloop_abi.h` has.
pub(crate) trait SeqParams: Default + DeviceRepr {
    /// Dims, contiguous strides, the gate layout flag and `dtype` for `d`.
    fn for_dims(d: &Dims, dtype: u32) -> Result<Self, InputError>;
    fn flags_mut(&mut self) -> &mut u32;
    fn set_pointers(&mut self, p: Pointers);
}

macro_rules! impl_seq_params {
    ($($params:ty),+) => {$(
        // SAFETY: the struct is the bindgen mirror (#[repr(C)]) of the C
        // struct the kernels take by value; its layout is pinned on both
        // sides (the header's static_assert, bindgen's layout checks,
        // tests/abi.rs). It holds only integers and raw device addresses, so
        // its bytes are a valid kernel argument for any value; the pointers
        // are only dereferenced by the kernels, whose launchers guarantee
        // they are valid (`Buffers::check`, `Buffers::bind`).
        unsafe impl DeviceRepr for $params {}

        impl SeqParams for $params {
            fn for_dims(d: &Dims, dtype: u32) -> Result<Self, InputError> {
                Ok(Self {
                    dims: gateloop_dims(d)?,
                    q_strides: seq_strides(d, d.key_dim)?,
                    k_strides: seq_strides(d, d.key_dim)?,
                    v_strides: seq_strides(d, d.value_dim)?,
                    gate_strides: seq_strides(d, d.gate_dim())?,
                    y_strides: seq_strides(d, d.value_dim)?,
                    h0_strides: state_strides(d)?,
                    h_final_strides: state_strides(d)?,
                    flags: if d.gate == GateLayout::PerHead { abi::GATELOOP_FLAG_PER_HEAD_GATE } else { 0 },
                    dtype,
                    ..Default::default()
                })
            }
            fn flags_mut(&mut self) -> &mut u32 {
                &mut self.flags
            }
            fn set_pointers(&mut self, p: Pointers) {
                self.q = p.q as usize as *const c_void;
                self.k = p.k as usize as *const c_void;
                self.v = p.v as usize as *const c_void;
                self.log_gate = p.log_gate as usize as *const f32;
                self.h0 = p.h0.map_or(std::ptr::null(), |h0| h0 as usize as *const f32);
                self.y = p.y as usize as *mut c_void;
                self.h_final = p.h_final as usize as *mut f32;
            }
        }
    )+};
}

impl_seq_params!(GateloopRecurrentParams, GateloopScanParams, GateloopAttentionParams, GateloopChunkParams);

/// The gradient fields every backward parameter struct of
/// `cuda/gateloop_abi.h` has (beyond its embedded forward struct).
pub(crate) trait GradParams {
    /// Contiguous strides of dy, dq, dk, dv, dlog_gate, dh_final and dh0 for `d`.
    fn set_grad_strides(&mut self, d: &Dims) -> Result<(), InputError>;
    /// The gradient buffers' addresses ([`GradBuffers::bind`]); an absent
    /// dh_final or dh0 is NULL.
    fn set_grad_pointers(&mut self, p: &GradPointers);
}

macro_rules! impl_grad_params {
    ($($params:ty),+) => {$(
        impl GradParams for $params {
            fn set_grad_strides(&mut self, d: &Dims) -> Result<(), InputError> {
                self.dy_strides = seq_strides(d, d.value_dim)?;
                self.dq_strides = seq_strides(d, d.key_dim)?;
                self.dk_strides = seq_strides(d, d.key_dim)?;
                self.dv_strides = seq_strides(d, d.value_dim)?;
                self.dgate_strides = seq_strides(d, d.gate_dim())?;
                self.dh_final_strides = state_strides(d)?;
                self.dh0_strides = state_strides(d)?;
                Ok(())
            }
            fn set_grad_pointers(&mut self, p: &GradPointers) {
                self.dy = p.dy as usize as *const c_void;
                self.dh_final = p.dh_final.map_or(std::ptr::null(), |h| h as usize as *const f32);
                self.dq = p.dq as usize as *mut c_void;
                self.dk = p.dk as usize as *mut c_void;
                self.dv = p.dv as usize as *mut c_void;
                self.dlog_gate = p.dlog_gate as usize as *mut f32;
                self.dh0 = p.dh0.map_or(std::ptr::null_mut(), |h| h as usize as *mut f32);
            }
        }
    )+};
}

impl_grad_params!(GateloopChunkGradParams, GateloopScanGradParams, GateloopRecurrentGradParams);

/// Lengths of the forward's inputs (log_gate and h0 complex or real f32):
/// q, k, v, log_gate of `seq`'s shapes, h0 of `state`'s (the same dims
/// unless packed).
#[allow(clippy::too_many_arguments)]
fn check_input_lens<T>(
    seq: &Dims,
    state: &Dims,
    q: &dyn DevicePtr<T>,
    k: &dyn DevicePtr<T>,
    v: &dyn DevicePtr<T>,
    log_gate: &dyn DevicePtr<f32>,
    h0: Option<&dyn DevicePtr<f32>>,
    complex: bool,
) -> Result<(), InputError> {
    check_len("q", seq.qk_shape(), false, q.len())?;
    check_len("k", seq.qk_shape(), false, k.len())?;
    check_len("v", seq.v_shape(), false, v.len())?;
    check_len("log_gate", seq.gate_shape(), complex, log_gate.len())?;
    if let Some(h0) = h0 {
        check_len("h0", state.state_shape(), complex, h0.len())?;
    }
    Ok(())
}

/// That the forward's inputs belong to the Gpu's context.
fn check_input_contexts<T>(
    gpu: &Gpu,
    q: &dyn DevicePtr<T>,
    k: &dyn DevicePtr<T>,
    v: &dyn DevicePtr<T>,
    log_gate: &dyn DevicePtr<f32>,
    h0: Option<&dyn DevicePtr<f32>>,
) -> Result<(), InputError> {
    check_context(gpu, "q", q)?;
    check_context(gpu, "k", k)?;
    check_context(gpu, "v", v)?;
    check_context(gpu, "log_gate", log_gate)?;
    if let Some(h0) = h0 {
        check_context(gpu, "h0", h0)?;
    }
    Ok(())
}

// ---- gradients (the backward kernels) --------------------------------------------

/// Device upstream gradients of one backward call: `dy` in the inputs' type
/// `T`, `dh_final` complex f32 (interleaved pairs, 8-byte aligned; real f32
/// for the real-gate backward, `chunk_grad::backward_real_into`).
pub struct DeviceGradInputs<'a, T = f32> {
    /// ∂L/∂y, `[B, L, H, V]`
    pub dy: &'a dyn DevicePtr<T>,
    /// ∂L/∂h_final, `[B, H, K, V]` complex f32 (real gates: f32), or none (zero)
    pub dh_final: Option<&'a dyn DevicePtr<f32>>,
}

/// Caller-owned device gradients of one backward call (every element is
/// overwritten): dq, dk, dv in the inputs' type `T`, dlog_gate and dh0
/// complex f32 (interleaved pairs, 8-byte aligned; real f32 for the
/// real-gate backward).
pub struct DeviceGrads<'a, T = f32> {
    /// `[B, L, H, K]`
    pub dq: &'a mut dyn DevicePtrMut<T>,
    /// `[B, L, H, K]`
    pub dk: &'a mut dyn DevicePtrMut<T>,
    /// `[B, L, H, V]`
    pub dv: &'a mut dyn DevicePtrMut<T>,
    /// The layout of log_gate, complex f32 (real gates: f32)
    pub dlog_gate: &'a mut dyn DevicePtrMut<f32>,
    /// `[B, H, K, V]` complex f32 (real gates: f32): required when the inputs have an h0 (the
    /// gradient of the implicit zero state when given without one)
    pub dh0: Option<&'a mut dyn DevicePtrMut<f32>>,
}

/// Every device buffer of one backward call (the chunked and the scan
/// backward share these checks and this binding).
pub(crate) struct GradBuffers<'a, T> {
    pub inputs: DeviceInputs<'a, T>,
    pub grad_in: DeviceGradInputs<'a, T>,
    pub grads: DeviceGrads<'a, T>,
    /// f32 scratch; `None` only where the plan needs none.
    pub workspace: Option<&'a mut dyn DevicePtrMut<f32>>,
    /// log_gate, h0, dh_final, dlog_gate and dh0 are real f32 (the chunked
    /// backward's real-gate entry), not complex.
    pub real_gates: bool,
    /// Packed sequences (the recurrent backward's `cu_seqlens`): q, k, v,
    /// log_gate, dy and their gradients are one batch row `[1, L, H, *]`,
    /// h0, dh_final and dh0 `[B, H, K, V]` with B = `d.batch` sequences.
    pub packed: bool,
}

/// The device addresses of a backward call's gradient buffers.
pub(crate) struct GradPointers {
    pub dy: u64,
    pub dh_final: Option<u64>,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dlog_gate: u64,
    pub dh0: Option<u64>,
    /// None when no workspace was given (the plan needed none).
    pub workspace: Option<u64>,
}

impl<'a, T> GradBuffers<'a, T> {
    /// Checks on the host, in this order: the inputs' lengths, the upstream
    /// gradients', the gradients' (each error names the argument), that a dh0
    /// buffer is given when h0 is, the workspace's length (at least `ws_len`
    /// f32), that `stream` and every buffer belong to the Gpu's context.
    pub fn check(
        &self,
        gpu: &Gpu,
        stream: &CudaStream,
        d: &Dims,
        ws_len: usize,
        ws_shape: impl FnOnce() -> String,
    ) -> Result<(), InputError> {
        let DeviceInputs { q, k, v, log_gate, h0 } = &self.inputs;
        let complex = !self.real_gates;
        let seq = if self.packed { Dims { batch: 1, ..*d } } else { *d };
        check_input_lens(&seq, d, *q, *k, *v, *log_gate, *h0, complex)?;
        check_len("dy", seq.v_shape(), false, self.grad_in.dy.len())?;
        if let Some(dh) = self.grad_in.dh_final {
            check_len("dh_final", d.state_shape(), complex, dh.len())?;
        }
        let g = &self.grads;
        check_len("dq", seq.qk_shape(), false, g.dq.len())?;
        check_len("dk", seq.qk_shape(), false, g.dk.len())?;
        check_len("dv", seq.v_shape(), false, g.dv.len())?;
        check_len("dlog_gate", seq.gate_shape(), complex, g.dlog_gate.len())?;
        match (&g.dh0, h0) {
            (Some(dh0), _) => check_len("dh0", d.state_shape(), complex, dh0.len())?,
            (None, Some(_)) => {
                return Err(InputError::Param {
                    name: "dh0",
                    value: "none".into(),
                    why: "h0 was given, so its gradient needs a dh0 buffer ([B, H, K, V] f32, complex pairs for complex gates)",
                });
            }
            (None, None) => {}
        }
        let have = self.workspace.as_ref().map_or(0, |w| w.len());
        if have < ws_len {
            return Err(InputError::Length { name: "workspace", expected: ws_len, actual: have, shape: ws_shape() });
        }
        check_stream(gpu, stream)?;
        check_input_contexts(gpu, *q, *k, *v, *log_gate, *h0)?;
        check_context(gpu, "dy", self.grad_in.dy)?;
        if let Some(dh) = self.grad_in.dh_final {
            check_context(gpu, "dh_final", dh)?;
        }
        check_context(gpu, "dq", &*g.dq)?;
        check_context(gpu, "dk", &*g.dk)?;
        check_context(gpu, "dv", &*g.dv)?;
        check_context(gpu, "dlog_gate", &*g.dlog_gate)?;
        if let Some(dh0) = &g.dh0 {
            check_context(gpu, "dh0", &**dh0)?;
        }
        if let Some(w) = &self.workspace {
            check_context(gpu, "workspace", &**w)?;
        }
        Ok(())
    }

    /// Takes every device address on `stream` (complex buffers and the
    /// workspace checked 8-byte aligned; real gate-side buffers need f32
    /// alignment only), writes the inputs' pointers and the
    /// `HAS_H0` flag into the embedded forward struct `fwd` (y and h_final
    /// NULL: the caller points them where its kernels need), and returns the
    /// gradients'.
    pub fn bind<'s, P: SeqParams>(
        self,
        stream: &'s CudaStream,
        fwd: &mut P,
    ) -> Result<(GradPointers, Bound<'s>), InputError>
    where
        'a: 's,
    {
        let GradBuffers { inputs, grad_in, grads, workspace, real_gates, packed: _ } = self;
        let mut guards = Vec::with_capacity(14);
        let mut ptr = |(p, guard): (u64, SyncOnDrop<'s>)| {
            guards.push(guard);
            p
        };
        let q = ptr(inputs.q.device_ptr(stream));
        let k = ptr(inputs.k.device_ptr(stream));
        let v = ptr(inputs.v.device_ptr(stream));
        let log_gate = ptr(inputs.log_gate.device_ptr(stream));
        let h0 = inputs.h0.map(|h| ptr(h.device_ptr(stream)));
        let dy = ptr(grad_in.dy.device_ptr(stream));
        let dh_final = grad_in.dh_final.map(|h| ptr(h.device_ptr(stream)));
        let dq = ptr(grads.dq.device_ptr_mut(stream));
        let dk = ptr(grads.dk.device_ptr_mut(stream));
        let dv = ptr(grads.dv.device_ptr_mut(stream));
        let dlog_gate = ptr(grads.dlog_gate.device_ptr_mut(stream));
        let dh0 = grads.dh0.map(|h| ptr(h.device_ptr_mut(stream)));
        let workspace = workspace.map(|w| ptr(w.device_ptr_mut(stream)));
        let check_gate_align = |name, ptr| if real_gates { Ok(()) } else { check_align(name, ptr) };
        check_gate_align("log_gate", log_gate)?;
        if let Some(h0) = h0 {
            check_gate_align("h0", h0)?;
        }
        if let Some(dh) = dh_final {
            check_gate_align("dh_final", dh)?;
        }
        check_gate_align("dlog_gate", dlog_gate)?;
        if let Some(dh0) = dh0 {
            check_gate_align("dh0", dh0)?;
        }
        if let Some(w) = workspace {
            check_align("workspace", w)?;
        }
        if h0.is_some() {
            *fwd.flags_mut() |= abi::GATELOOP_FLAG_HAS_H0;
        }
        fwd.set_pointers(Pointers { q, k, v, log_gate, h0, y: 0, h_final: 0 });
        let pointers = GradPointers { dy, dh_final, dq, dk, dv, dlog_gate, dh0, workspace };
        Ok((pointers, Bound { workspace, _guards: guards }))
    }
}

pub(crate) fn check_len(name: &'static str, shape: [usize; 4], complex: bool, actual: usize) -> Result<(), InputError> {
    let expected = shape.iter().product::<usize>() * if complex { 2 } else { 1 };
    if actual != expected {
        let shape = if complex { format!("{shape:?} complex, as f32 pairs") } else { format!("{shape:?}") };
        return Err(InputError::Length { name, expected, actual, shape });
    }
    Ok(())
}

pub(crate) fn check_stream(gpu: &Gpu, stream: &CudaStream) -> Result<(), InputError> {
    if stream.context() != gpu.context() {
        return Err(InputError::Param {
            name: "stream",
            value: format!("a stream on device {}", stream.context().ordinal()),
            why: "the stream must belong to the Gpu's CUDA context",
        });
    }
    Ok(())
}

pub(crate) fn check_context<T>(gpu: &Gpu, name: &'static str, buf: &dyn DeviceSlice<T>) -> Result<(), InputError> {
    if buf.stream().context() != gpu.context() {
        return Err(InputError::Param {
            name,
            value: format!("a buffer on device {}", buf.stream().context().ordinal()),
            why: "every buffer must belong to the Gpu's CUDA context",
        });
    }
    Ok(())
}

pub(crate) fn check_align(name: &'static str, ptr: u64) -> Result<(), InputError> {
    if !ptr.is_multiple_of(8) {
        return Err(InputError::Param {
            name,
            value: format!("device address {ptr:#x}"),
            why: "complex buffers must be 8-byte aligned (start at an even f32 index)",
        });
    }
    Ok(())
}

/// A packed launch's common part: checks `cu_seqlens` against the packed
/// problem `dims` ([`crate::packing::sequence_starts`]) and `stream`'s
/// context, uploads the offsets on `stream` as the kernels read them
/// (`int64_t`), and runs `launch` with the launch's dims (`dims.batch` = N
/// sequences, its states `[N, H, K, V]`) and the offsets' device address,
/// which stays valid until `launch` returns (the upload's drop frees it in
/// stream order after the launches). The recurrent forward and backward's
/// and the chunked forward's `_varlen_` entries.
pub(crate) fn with_offsets<R>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    launch: impl FnOnce(&Dims, u64) -> Result<R, GpuError>,
) -> Result<R, GpuError> {
    crate::packing::sequence_starts(dims, cu_seqlens)?;
    let d = Dims { batch: cu_seqlens.len() - 1, ..*dims };
    check_stream(gpu, stream)?;
    let offsets: Vec<i64> = cu_seqlens.iter().map(|&x| i64_of("cu_seqlens", x)).collect::<Result<_, _>>()?;
    let offsets: CudaSlice<i64> = stream.clone_htod(&offsets).doing("uploading cu_seqlens")?;
    let (ptr, _guard) = offsets.device_ptr(stream);
    launch(&d, ptr)
}

pub(crate) fn i64_of(name: &'static str, x: usize) -> Result<i64, InputError> {
    i64::try_from(x).map_err(|_| InputError::TooLarge { name, shape: x.to_string(), limit: "i64::MAX".into() })
}

fn gateloop_dims(d: &Dims) -> Result<GateloopDims, InputError> {
    Ok(GateloopDims {
        batch: i64_of("batch", d.batch)?,
        len: i64_of("len", d.len)?,
        heads: i64_of("heads", d.heads)?,
        key_dim: i64_of("key_dim", d.key_dim)?,
        value_dim: i64_of("value_dim", d.value_dim)?,
        gate_dim: i64_of("gate_dim", d.gate_dim())?,
    })
}

/// Contiguous strides of a `[B, L, H, dim]` tensor.
pub(crate) fn seq_strides(d: &Dims, dim: usize) -> Result<GateloopSeqStrides, InputError> {
    let head = i64_of("stride", dim)?;
    let time = i64_of("stride", d.heads * dim)?;
    let batch = i64_of("stride", d.len * d.heads * dim)?;
    Ok(GateloopSeqStrides { batch, time, head })
}

/// Contiguous strides of a `[B, H, K, V]` state.
pub(crate) fn state_strides(d: &Dims) -> Result<GateloopStateStrides, InputError> {
    Ok(GateloopStateStrides {
        batch: i64_of("stride", d.heads * d.key_dim * d.value_dim)?,
        head: i64_of("stride", d.key_dim * d.value_dim)?,
        key: i64_of("stride", d.value_dim)?,
    })
}

pub(crate) fn complex_as_f32(z: &[Complex<f32>]) -> &[f32] {
    // SAFETY: Complex<f32> is #[repr(C)] { re: f32, im: f32 }: size 8, align 4,
    // no padding, so n of them are exactly 2n contiguous initialized f32.
    unsafe { std::slice::from_raw_parts(z.as_ptr().cast::<f32>(), z.len() * 2) }
}

/// The real parts of `z`, which must be real (Im = 0 everywhere, else
/// [`InputError::Value`] naming `name` and the first offending index): what
/// the real-gate kernels' host entries upload.
pub(crate) fn real_parts(name: &'static str, z: &[Complex<f32>]) -> Result<Vec<f32>, InputError> {
    match z.iter().position(|z| z.im != 0.0) {
        Some(index) => Err(InputError::Value {
            name,
            index,
            value: z[index].to_string(),
            why: "the real-gate kernel takes real values (Im = 0)",
        }),
        None => Ok(z.iter().map(|z| z.re).collect()),
    }
}

/// A gate-side tensor (log_gate, a state, their gradients) as the kernels
/// read it: interleaved (re, im) f32 pairs, or, for the real-gate kernels
/// (`real`), the real parts, checked real.
fn gate_side<'z>(name: &'static str, z: &'z [Complex<f32>], real: bool) -> Result<Cow<'z, [f32]>, InputError> {
    Ok(if real { Cow::Owned(real_parts(name, z)?) } else { Cow::Borrowed(complex_as_f32(z)) })
}

/// The inverse of [`gate_side`]: f32 pairs, or real parts (Im = 0).
fn from_gate_side(x: &[f32], real: bool) -> Vec<Complex<f32>> {
    if real {
        x.iter().map(|&re| Complex::new(re, 0.0)).collect()
    } else {
        x.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect()
    }
}

/// The body of every `forward_host`: validates `p` and its gate domain,
/// uploads it to the Gpu's default stream (q, k, v rounded to `T`; log_gate
/// and h0 complex f32, or their real parts when `real_gates`, which must be
/// real), allocates y, h_final and a zeroed workspace of
/// `workspace_len(dims)` f32 (none when 0), runs `launch`, downloads the
/// outputs (y widened to f32, exactly; a real h_final with Im = 0) and
/// synchronizes.
pub(crate) fn forward_host<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    real_gates: bool,
    workspace_len: impl FnOnce(&Dims) -> Result<usize, GpuError>,
    sync_doing: &'static str,
    launch: impl FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'_, T>,
        DeviceOutputs<'_, T>,
        Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<Outputs<f32>, GpuError> {
    forward_host_states(gpu, p, HostStates::Batch, real_gates, workspace_len, sync_doing, launch)
}

/// The states a [`forward_host_states`] run starts from and returns.
#[derive(Clone, Copy)]
pub(crate) enum HostStates<'a> {
    /// The problem's own: `p.h0` and h_final `[B, H, K, V]`.
    Batch,
    /// Packed sequences' (`p` has one batch row and no h0 of its own, checked
    /// by the caller: [`crate::packing::check_varlen`]): h0 and h_final
    /// `[sequences, H, K, V]`.
    Packed { sequences: usize, h0: Option<&'a [Complex<f32>]> },
}

impl<'a> HostStates<'a> {
    /// The initial states of a run of `p` and the dims of its states
    /// (`p.dims`, or N sequences' of them).
    fn of(self, p: &Problem<'a, f32>) -> (Option<&'a [Complex<f32>]>, Dims) {
        match self {
            HostStates::Batch => (p.h0, p.dims),
            HostStates::Packed { sequences, h0 } => (h0, Dims { batch: sequences, ..p.dims }),
        }
    }
}

/// [`forward_host`] with the states of `states`: the body of both.
pub(crate) fn forward_host_states<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    states: HostStates<'_>,
    real_gates: bool,
    workspace_len: impl FnOnce(&Dims) -> Result<usize, GpuError>,
    sync_doing: &'static str,
    launch: impl FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'_, T>,
        DeviceOutputs<'_, T>,
        Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<Outputs<f32>, GpuError> {
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    let (h0, state_dims) = states.of(p);
    let (gate, h0) = (gate_side("log_gate", p.log_gate, real_gates)?, h0.map(|h| gate_side("h0", h, real_gates)));
    let parts = if real_gates { 1 } else { 2 };
    let ws_len = workspace_len(&d)?;
    let s = gpu.stream();
    let q = s.clone_htod(&round_slice::<T>(p.q)).doing("uploading q")?;
    let k = s.clone_htod(&round_slice::<T>(p.k)).doing("uploading k")?;
    let v = s.clone_htod(&round_slice::<T>(p.v)).doing("uploading v")?;
    let log_gate = s.clone_htod(&*gate).doing("uploading log_gate")?;
    let h0 = h0.transpose()?.map(|h| s.clone_htod(&*h)).transpose().doing("uploading h0")?;
    let mut y = s.alloc_zeros::<T>(d.v_len()).doing("allocating y")?;
    let mut h_final = s.alloc_zeros::<f32>(parts * state_dims.state_len()).doing("allocating h_final")?;
    let mut ws = (ws_len > 0).then(|| s.alloc_zeros::<f32>(ws_len)).transpose().doing("allocating the workspace")?;
    launch(
        s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
        ws.as_mut().map(|w| w as _),
    )?;
    let y = s.clone_dtoh(&y).doing("downloading y")?;
    let h_final = s.clone_dtoh(&h_final).doing("downloading h_final")?;
    s.synchronize().doing(sync_doing)?;
    Ok(Outputs { y: widen_slice(&y), h_final: from_gate_side(&h_final, real_gates) })
}

/// The body of every `backward_host`: validates `p`, its gate domain and the
/// upstream gradients, uploads them to the Gpu's default stream (q, k, v, dy
/// rounded to `T`; log_gate, h0, dh_final complex f32, or their real parts
/// when `real_gates`, which must be real), allocates the gradients (dh0
/// exactly when `p.h0` is given) and a zeroed workspace of
/// `workspace_len(dims)` f32 (none when 0), runs `launch`, downloads the
/// gradients (dq, dk, dv widened to f32, exactly; real dlog_gate and dh0
/// with Im = 0) and synchronizes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_host<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    real_gates: bool,
    workspace_len: impl FnOnce(&Dims) -> Result<usize, GpuError>,
    sync_doing: &'static str,
    launch: impl for<'b> FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'b, T>,
        DeviceGradInputs<'b, T>,
        DeviceGrads<'b, T>,
        Option<&'b mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<Grads<f32>, GpuError> {
    let states = HostStates::Batch;
    backward_host_states(gpu, p, states, dy, dh_final, real_gates, workspace_len, sync_doing, launch)
}

/// [`backward_host`] with the states of `states` (packed: h0, dh_final and
/// the returned dh0 `[sequences, H, K, V]`): the body of both.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_host_states<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    states: HostStates<'_>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    real_gates: bool,
    workspace_len: impl FnOnce(&Dims) -> Result<usize, GpuError>,
    sync_doing: &'static str,
    launch: impl for<'b> FnOnce(
        &CudaStream,
        &Dims,
        DeviceInputs<'b, T>,
        DeviceGradInputs<'b, T>,
        DeviceGrads<'b, T>,
        Option<&'b mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<Grads<f32>, GpuError> {
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    let (h0, state_dims) = states.of(p);
    d.check_len("dy", d.v_shape(), dy.len())?;
    if let Some(dh) = dh_final {
        state_dims.check_len("dh_final", state_dims.state_shape(), dh.len())?;
    }
    let gate = gate_side("log_gate", p.log_gate, real_gates)?;
    let h0 = h0.map(|h| gate_side("h0", h, real_gates)).transpose()?;
    let dh_final = dh_final.map(|h| gate_side("dh_final", h, real_gates)).transpose()?;
    let parts = if real_gates { 1 } else { 2 };
    let ws_len = workspace_len(&d)?;
    let s = gpu.stream();
    let q = s.clone_htod(&round_slice::<T>(p.q)).doing("uploading q")?;
    let k = s.clone_htod(&round_slice::<T>(p.k)).doing("uploading k")?;
    let v = s.clone_htod(&round_slice::<T>(p.v)).doing("uploading v")?;
    let log_gate = s.clone_htod(&*gate).doing("uploading log_gate")?;
    let h0 = h0.map(|h| s.clone_htod(&*h)).transpose().doing("uploading h0")?;
    let dy = s.clone_htod(&round_slice::<T>(dy)).doing("uploading dy")?;
    let dhf = dh_final.map(|h| s.clone_htod(&*h)).transpose().doing("uploading dh_final")?;
    let mut dq = s.alloc_zeros::<T>(d.qk_len()).doing("allocating dq")?;
    let mut dk = s.alloc_zeros::<T>(d.qk_len()).doing("allocating dk")?;
    let mut dv = s.alloc_zeros::<T>(d.v_len()).doing("allocating dv")?;
    let mut dg = s.alloc_zeros::<f32>(parts * d.gate_len()).doing("allocating dlog_gate")?;
    let dh0_len = parts * state_dims.state_len();
    let mut dh0 = h0.as_ref().map(|_| s.alloc_zeros::<f32>(dh0_len)).transpose().doing("allocating dh0")?;
    let mut ws = (ws_len > 0).then(|| s.alloc_zeros::<f32>(ws_len)).transpose().doing("allocating the workspace")?;
    launch(
        s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceGradInputs { dy: &dy, dh_final: dhf.as_ref().map(|h| h as _) },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: dh0.as_mut().map(|h| h as _) },
        ws.as_mut().map(|w| w as _),
    )?;
    let dq = s.clone_dtoh(&dq).doing("downloading dq")?;
    let dk = s.clone_dtoh(&dk).doing("downloading dk")?;
    let dv = s.clone_dtoh(&dv).doing("downloading dv")?;
    let dg = s.clone_dtoh(&dg).doing("downloading dlog_gate")?;
    let dh0 = dh0.map(|h| s.clone_dtoh(&h)).transpose().doing("downloading dh0")?;
    s.synchronize().doing(sync_doing)?;
    Ok(Grads {
        dq: widen_slice(&dq),
        dk: widen_slice(&dk),
        dv: widen_slice(&dv),
        dlog_gate: from_gate_side(&dg, real_gates),
        dh0: dh0.map(|h| from_gate_side(&h, real_gates)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn length_errors_name_the_argument() {
        let d = dims(2, 3, 1, 4, 5, true);
        assert!(check_len("log_gate", d.gate_shape(), true, 12).is_ok());
        match check_len("log_gate", d.gate_shape(), true, 6) {
            Err(InputError::Length { name: "log_gate", expected: 12, actual: 6, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn params_share_the_common_fields() {
        let d = dims(2, 3, 4, 5, 6, true);
        let r = GateloopRecurrentParams::for_dims(&d, abi::GATELOOP_DTYPE_F16).unwrap();
        let s = GateloopScanParams::for_dims(&d, abi::GATELOOP_DTYPE_F32).unwrap();
        assert_eq!(
            (r.dims.batch, r.dims.len, r.dims.heads, r.dims.key_dim, r.dims.value_dim, r.dims.gate_dim),
            (2, 3, 4, 5, 6, 1)
        );
        assert_eq!((r.q_strides.batch, r.q_strides.time, r.q_strides.head), (3 * 4 * 5, 4 * 5, 5));
        assert_eq!((r.v_strides.batch, r.v_strides.time, r.v_strides.head), (3 * 4 * 6, 4 * 6, 6));
        assert_eq!((r.gate_strides.batch, r.gate_strides.time, r.gate_strides.head), (3 * 4, 4, 1));
        assert_eq!((r.h0_strides.batch, r.h0_strides.head, r.h0_strides.key), (4 * 5 * 6, 5 * 6, 6));
        assert_eq!(
            (r.flags, r.dtype, s.flags, s.dtype),
            (abi::GATELOOP_FLAG_PER_HEAD_GATE, 1, abi::GATELOOP_FLAG_PER_HEAD_GATE, 0)
        );
        assert_eq!(s.h_final_strides.batch, r.h_final_strides.batch);
    }
}
