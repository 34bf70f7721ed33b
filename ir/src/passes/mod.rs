//! Graph → graph rewrites, one file per pass, and the pass manager.

use crate::error::IrError;
use crate::graph::Graph;

mod dce;

pub use dce::Dce;

/// A rewrite of the graph that preserves its meaning (checked against the interpreter).
pub trait Pass {
    /// The name used by `llmc ir --after NAME` and in snapshot names.
    fn name(&self) -> &'static str;
    /// Rewrites the graph in place; returns whether anything changed.
    fn run(&self, g: &mut Graph) -> Result<bool, IrError>;
}

/// The standard pipeline, in order.
pub fn standard_pipeline() -> Vec<Box<dyn Pass>> {
    vec![Box::new(Dce)]
}

/// Runs `passes` in order, verifying the graph after each one.
pub fn run_pipeline(g: &mut Graph, passes: &[Box<dyn Pass>]) -> Result<(), IrError> {
    for p in passes {
        p.run(g)?;
        g.verify()
            .map_err(|e| IrError::Interp(format!("after pass {}: {e}", p.name())))?;
    }
    Ok(())
}
