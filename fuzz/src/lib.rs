//! Fuzz targets for hostile inputs, shared by the libFuzzer binaries
//! (`cargo fuzz run --features libfuzzer load_problem`) and the stable
//! random-bytes harness (`cargo test --release` in this directory).

use gateloop::io::{self, LoadedProblem};
use gateloop::reference::recurrent;

/// The most work B·L·H·K·V a parsed problem may have to be run (a crafted
/// file that parses may be large; only tiny ones are computed).
pub const MAX_WORK: usize = 1 << 12;

/// Feeds arbitrary bytes to [`io::parse_problem`] (and to
/// [`io::parse_tensors_f64`]); when a problem parses and is tiny, runs the
/// f64 recurrent reference on it. Must never panic. Returns whether the
/// bytes parsed as a problem.
pub fn load_problem(data: &[u8]) -> bool {
    let _ = io::parse_tensors_f64(data, "fuzz");
    let Ok(problem) = io::parse_problem(data, "fuzz") else { return false };
    let d = problem.dims();
    let work = [d.batch, d.len, d.heads, d.key_dim, d.value_dim].iter().try_fold(1usize, |a, &x| a.checked_mul(x));
    if work.is_none_or(|w| w > MAX_WORK) {
        return true;
    }
    // parse_problem validated the lengths and the values, so the reference
    // must accept the problem.
    let result = match &problem {
        LoadedProblem::F64(p) => recurrent::forward(&p.view()).map(|o| o.y.len()),
        LoadedProblem::F32(p) | LoadedProblem::Half(_, p) => {
            recurrent::forward(&p.map(f64::from).view()).map(|o| o.y.len())
        }
    };
    match result {
        Ok(n) => assert_eq!(n, d.v_len()),
        Err(e) => panic!("a file that parsed was refused by the reference: {e}"),
    }
    true
}
