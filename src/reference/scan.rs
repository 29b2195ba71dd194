//! The parallel mode of the paper: an associative scan over the elements
//! e_t = (a_t, k_tᵀ v_t) with the operator
//!
//! (a_i, b_i) • (a_j, b_j) = (a_j a_i, a_j b_i + b_j)      (i before j)
//!
//! whose inclusive prefix gives h_t as its second component. Because a_t is
//! diagonal (it multiplies each row of the K×V state by one complex number),
//! the scan over K×V matrices is K·V independent scans over complex scalars;
//! this runs those as a real O(log L)-level tree (Blelloch up-sweep and
//! down-sweep), so the paper's parallel mode is demonstrably the same function
//! as the recurrence.

use num_complex::Complex;

use super::{HeadOutputs, head_h0, per_head_into};
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem, Real};

/// One scan element: the gate accumulated so far and the state contribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elem<T> {
    /// The product of the gates a_t over the element's steps.
    pub a: Complex<T>,
    /// The state those steps build from a zero state.
    pub b: Complex<T>,
}

/// The paper's operator, `earlier • later`.
#[inline]
pub fn combine<T: Real>(earlier: Elem<T>, later: Elem<T>) -> Elem<T> {
    Elem { a: later.a * earlier.a, b: later.a * earlier.b + later.b }
}

/// In-place inclusive scan with [`combine`] as a Blelloch tree: log₂ levels
/// of up-sweep, log₂ levels of down-sweep (each level's pairs independent, so
/// each level is one parallel step), padded to a power of two with the
/// identity (1, 0).
pub fn inclusive_scan<T: Real>(xs: &mut [Elem<T>]) {
    let n = xs.len();
    if n <= 1 {
        return;
    }
    let one = Complex::new(T::one(), T::zero());
    let identity = Elem { a: one, b: Complex::new(T::zero(), T::zero()) };
    let size = n.next_power_of_two();
    let mut tree: Vec<Elem<T>> = xs.iter().copied().chain(std::iter::repeat_n(identity, size - n)).collect();
    // Up-sweep: tree[r] becomes the reduction of the subtree ending at r.
    let mut stride = 1;
    while stride < size {
        for r in (2 * stride - 1..size).step_by(2 * stride) {
            tree[r] = combine(tree[r - stride], tree[r]);
        }
        stride *= 2;
    }
    // Down-sweep: turn reductions into exclusive prefixes.
    tree[size - 1] = identity;
    while stride > 1 {
        stride /= 2;
        for r in (2 * stride - 1..size).step_by(2 * stride) {
            let left = tree[r - stride];
            tree[r - stride] = tree[r]; // prefix before the left subtree
            tree[r] = combine(tree[r], left); // prefix before the right subtree
        }
    }
    // Exclusive → inclusive.
    for (x, prefix) in xs.iter_mut().zip(&tree) {
        *x = combine(*prefix, *x);
    }
}

/// Associative-scan mode, allocating the outputs.
pub fn forward<T: Real>(p: &Problem<'_, T>) -> Result<Outputs<T>, InputError> {
    Outputs::computed(p, forward_into)
}

/// Associative-scan mode into caller buffers.
pub fn forward_into<T: Real>(p: &Problem<'_, T>, out: OutputsMut<'_, T>) -> Result<(), InputError> {
    per_head_into(p, out, |b, h| head(p, b, h))
}

fn head<T: Real>(p: &Problem<'_, T>, b: usize, h: usize) -> HeadOutputs<T> {
    let d = p.dims;
    let (kd, vd) = (d.key_dim, d.value_dim);
    let h0 = head_h0(p, b, h);
    let mut y = vec![T::zero(); d.len * vd];
    let mut h_final = vec![Complex::new(T::zero(), T::zero()); kd * vd];
    let mut elems = Vec::with_capacity(d.len);
    for kk in 0..kd {
        for vv in 0..vd {
            elems.clear();
            elems.extend((0..d.len).map(|t| Elem {
                a: p.gate(b, t, h, kk).exp(),
                b: Complex::new(p.k[p.row(b, t, h, kd) + kk] * p.v[p.row(b, t, h, vd) + vv], T::zero()),
            }));
            // h0 enters as a leading element (anything, h0); folding it into
            // the first element keeps the scan length L.
            let first = elems[0];
            elems[0] = combine(Elem { a: Complex::new(T::one(), T::zero()), b: h0[kk * vd + vv] }, first);
            inclusive_scan(&mut elems);
            for (t, e) in elems.iter().enumerate() {
                y[t * vd + vv] = y[t * vd + vv] + p.q[p.row(b, t, h, kd) + kk] * e.b.re;
            }
            h_final[kk * vd + vv] = elems[d.len - 1].b;
        }
    }
    HeadOutputs { y, h_final }
}
