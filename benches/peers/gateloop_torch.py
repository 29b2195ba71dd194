"""GateLoop in PyTorch the way the lucidrains `gateloop-transformer` runs it,
written from the math (no code copied): heads first, every per-step state
contribution k_tᵀ v_t materialized as a complex K×V matrix, then a log-depth
associative scan along the sequence with the operator

    (a_i, b_i) • (a_j, b_j) = (a_j a_i, a_j b_i + b_j)      (i before j)

over states [B, H, L, K, V], and y_t = Re(q_t h_t) = q_t · Re(h_t).

Inputs use the operator's layout (the crate's contract): q, k [B, L, H, K],
v [B, L, H, V] real; log_gate [B, L, H, Kg, 2] (Kg = K per channel or 1 per
head; the trailing pair is (re, im)); optional h0 [B, H, K, V] complex. The
permutes to heads-first are part of the formulation and are timed with it.

Memory: the states alone are B·L·H·K·V complex numbers (8 bytes each in
complex64), and the scan holds about two more copies; that is why this peer
runs out of memory at the large benchmark shapes.
"""
import torch


def _combine_scan(a, b):
    """Inclusive scan of (a, b) along dim 2 with the operator above.

    The odd-even (Ladner–Fischer style) recursion: combine neighbouring
    pairs, scan the half-length sequence of pair results recursively, then
    fix up the even positions from the prefix just before them. log2(L)
    levels; O(L) total work. `a` broadcasts against `b` (it is [.., Kg, 1]).
    """
    n = b.shape[2]
    if n < 2:
        return a, b
    a_first, a_second = a[:, :, 0:n - 1:2], a[:, :, 1::2]
    b_first, b_second = b[:, :, 0:n - 1:2], b[:, :, 1::2]
    # prefixes ending at the odd positions 1, 3, 5, ...
    a_odd, b_odd = _combine_scan(a_second * a_first, a_second * b_first + b_second)
    # even positions 2, 4, ...: element 2i applied after the prefix ending at 2i−1
    n_even = (n - 1) // 2
    a_tail = a[:, :, 2::2]
    b_even = a_tail * b_odd[:, :, :n_even] + b[:, :, 2::2]
    a_even = a_tail * a_odd[:, :, :n_even]

    b_out = torch.empty(b.shape[:2] + (n,) + b_even.shape[3:], dtype=b_odd.dtype, device=b.device)
    a_out = torch.empty(a.shape[:2] + (n,) + a_even.shape[3:], dtype=a_odd.dtype, device=a.device)
    b_out[:, :, 0] = b[:, :, 0]
    a_out[:, :, 0] = a[:, :, 0]
    b_out[:, :, 1::2] = b_odd
    a_out[:, :, 1::2] = a_odd
    b_out[:, :, 2::2] = b_even
    a_out[:, :, 2::2] = a_even
    return a_out, b_out


def complex_dtype_of(real_dtype):
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def gateloop_torch(q, k, v, log_gate, h0=None):
    """y [B, L, H, V] (real, q's dtype) and h_final [B, H, K, V] (complex)."""
    cdt = complex_dtype_of(q.dtype)
    # heads first: [B, H, L, D]
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    g = torch.complex(log_gate[..., 0], log_gate[..., 1]).permute(0, 2, 1, 3)  # [B, H, L, Kg]
    a = torch.exp(g).unsqueeze(-1)                                              # [B, H, L, Kg, 1]
    kv = (kh.unsqueeze(-1) * vh.unsqueeze(-2)).to(cdt)                          # [B, H, L, K, V]
    if h0 is not None:
        # h0 enters through the first step: h_0 = a_0 h0 + k_0ᵀ v_0
        kv[:, :, 0] += a[:, :, 0] * h0.to(cdt)
    _, h = _combine_scan(a, kv)
    y = torch.einsum("bhlk,bhlkv->bhlv", qh, h.real)
    return y.permute(0, 2, 1, 3), h[:, :, -1]
