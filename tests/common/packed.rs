//! Variable-length sequences packed into one batch row (`gateloop::packing`):
//! a seeded set of sequences, each alone and all packed with reset gates at
//! their starts, and the f64 reference of the sequences run alone, which
//! every mode on the packed problem must reproduce (tests/packing.rs,
//! tests/gpu_packing.rs).

use gateloop::reference::grad::Grads;
use gateloop::testing::{GateRegime, OwnedProblem, dims};
use gateloop::{Complex, Outputs, reference};

use super::grad::{GradCase, GradInputsF32};

/// The sequences alone and packed.
pub struct Packed {
    /// fla's `cu_seqlens`: sequence i is steps `cu_seqlens[i]..cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// Each sequence alone (B = 1): h0 on the first only, dh_final on the last only.
    pub parts: Vec<GradInputsF32>,
    /// The sequences concatenated along time, resets written at every start
    /// but the first by `gateloop::packing::reset_sequence_starts`.
    pub packed: GradInputsF32,
}

impl Packed {
    /// Sequences of lengths `lens`, H heads, K and V, a per-head gate or not,
    /// gates from `regime`, from `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lens: &[usize],
        (heads, key_dim, value_dim): (usize, usize, usize),
        per_head_gate: bool,
        regime: GateRegime,
        with_h0: bool,
        with_dh_final: bool,
        seed: u64,
    ) -> Packed {
        let last = lens.len() - 1;
        let parts: Vec<GradInputsF32> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let d = dims(1, len, heads, key_dim, value_dim, per_head_gate);
                GradCase::new(d, regime, with_h0 && i == 0, with_dh_final && i == last, seed + i as u64).inputs()
            })
            .collect();
        let cu_seqlens = offsets(lens);
        let cat = |f: &dyn Fn(&GradInputsF32) -> &[f32]| parts.iter().flat_map(|p| f(p).to_vec()).collect::<Vec<f32>>();
        let d = dims(1, *cu_seqlens.last().unwrap(), heads, key_dim, value_dim, per_head_gate);
        let mut log_gate: Vec<Complex<f32>> = parts.iter().flat_map(|p| p.p.log_gate.clone()).collect();
        gateloop::packing::reset_sequence_starts(&d, &cu_seqlens, &mut log_gate).unwrap();
        let p = OwnedProblem {
            dims: d,
            q: cat(&|p| &p.p.q),
            k: cat(&|p| &p.p.k),
            v: cat(&|p| &p.p.v),
            log_gate,
            h0: parts[0].p.h0.clone(),
        };
        let packed = GradInputsF32 { p, dy: cat(&|p| &p.dy), dh_final: parts[last].dh_final.clone() };
        Packed { cu_seqlens, parts, packed }
    }

    /// A label for assertion messages.
    pub fn label(&self) -> String {
        format!("cu_seqlens {:?} {:?}", self.cu_seqlens, self.packed.p.dims)
    }

    /// `f` applied to every sequence alone and to the packed one (rounding,
    /// real gates; `f` must keep resets resets).
    pub fn map(self, f: impl Fn(GradInputsF32) -> GradInputsF32) -> Packed {
        Packed { cu_seqlens: self.cu_seqlens, parts: self.parts.into_iter().map(&f).collect(), packed: f(self.packed) }
    }

    /// The f64 recurrence of every sequence alone: y concatenated, the last
    /// one's h_final.
    pub fn separate_forward(&self) -> Outputs<f64> {
        let outs: Vec<Outputs<f64>> =
            self.parts.iter().map(|p| reference::recurrent::forward(&p.p.map(f64::from).view()).unwrap()).collect();
        Outputs { y: outs.iter().flat_map(|o| o.y.clone()).collect(), h_final: outs.last().unwrap().h_final.clone() }
    }

    /// The f64 reference backward of every sequence alone: dq, dk, dv,
    /// dlog_gate concatenated, the first one's dh0.
    pub fn separate_grads(&self) -> Grads<f64> {
        let gs: Vec<Grads<f64>> = self.parts.iter().map(GradInputsF32::reference).collect();
        let cat = |f: &dyn Fn(&Grads<f64>) -> &[f64]| gs.iter().flat_map(|g| f(g).to_vec()).collect::<Vec<f64>>();
        Grads {
            dq: cat(&|g| &g.dq),
            dk: cat(&|g| &g.dk),
            dv: cat(&|g| &g.dv),
            dlog_gate: gs.iter().flat_map(|g| g.dlog_gate.clone()).collect(),
            dh0: gs[0].dh0.clone(),
        }
    }
}

/// fla's `cu_seqlens` of sequences of lengths `lens`: 0, then the running sums.
pub fn offsets(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |end, len| {
            *end += len;
            Some(*end)
        }))
        .collect()
}

/// `field` of every problem of `parts`, concatenated (B = 1 problems: along
/// time).
pub fn concat<T>(parts: &[OwnedProblem<f32>], field: impl Fn(&OwnedProblem<f32>) -> Vec<T>) -> Vec<T> {
    parts.iter().flat_map(field).collect()
}

/// The packings the tests run: sequence lengths around the kernels' tile
/// and chunk lengths (16, 64) and L = 1 sequences, a lone sequence, and
/// lengths of one step only; gate regimes that cross the boundaries
/// hardest (|a| = 1 keeps everything, large phases, strong decay, resets
/// of their own, the mix).
pub const LENGTHS: [&[usize]; 4] = [&[1, 63, 64, 65, 130, 17], &[300], &[1, 1, 1, 1], &[16, 200, 15, 33]];

/// The regimes of the packing tests.
pub const REGIMES: [GateRegime; 6] = [
    GateRegime::UnitModulus,
    GateRegime::Random,
    GateRegime::LargePhase(50.0),
    GateRegime::StrongDecay(40.0),
    GateRegime::Resets(0.05),
    GateRegime::Mixed,
];
