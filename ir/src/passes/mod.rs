//! Graph → graph rewrites, one file per pass, and the pass manager.
//!
//! Every pass preserves meaning: the interpreter gives the same logits before and after (tests
//! check it on random weights for every family). Fused ops (`linear`, `qkv_rope`, `attend`)
//! and compile-time weight ops (`concat_rows`, `scale_cols`, ...) are ordinary IR ops, so a
//! reader sees each rewrite in the text form.

use crate::error::IrError;
use crate::graph::{Graph, NodeId};
use crate::op::{Act, Op};

mod cse;
mod dce;
mod fold_norm;
mod fuse_gelu;
mod fuse_parallel;
mod fuse_qkv;
mod fuse_residual;
mod fuse_rope;
mod fuse_swiglu;

pub use cse::Cse;
pub use dce::Dce;
pub use fold_norm::FoldNorm;
pub use fuse_gelu::FuseGelu;
pub use fuse_parallel::FuseParallel;
pub use fuse_qkv::FuseQkv;
pub use fuse_residual::FuseResidual;
pub use fuse_rope::FuseRope;
pub use fuse_swiglu::FuseSwiglu;

/// A rewrite of the graph that preserves its meaning.
pub trait Pass {
    /// The name used by `llmc ir --after NAME`, `--passes` and in snapshot names.
    fn name(&self) -> &'static str;
    /// Rewrites the graph in place; returns whether anything changed.
    fn run(&self, g: &mut Graph) -> Result<bool, IrError>;
}

/// Every pass, in the order of the standard pipeline.
pub fn standard_pipeline() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(FoldNorm),
        Box::new(FuseQkv),
        Box::new(FuseRope),
        Box::new(FuseSwiglu),
        Box::new(FuseGelu),
        Box::new(FuseParallel),
        Box::new(FuseResidual),
        Box::new(Cse),
        Box::new(Dce),
    ]
}

/// The pass called `name`.
pub fn by_name(name: &str) -> Option<Box<dyn Pass>> {
    standard_pipeline().into_iter().find(|p| p.name() == name)
}

/// A pipeline from a comma-separated list of pass names (`""` is the empty pipeline).
pub fn parse_pipeline(list: &str) -> Result<Vec<Box<dyn Pass>>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|n| by_name(n).ok_or_else(|| format!("unknown pass `{n}` (see --list-passes)")))
        .collect()
}

/// Runs `passes` in order, verifying the graph after each one. Dead nodes a rewrite leaves
/// behind are swept after every pass, so each snapshot shows only live code.
pub fn run_pipeline(g: &mut Graph, passes: &[Box<dyn Pass>]) -> Result<(), IrError> {
    for p in passes {
        p.run(g)?;
        Dce.run(g)?;
        g.verify().map_err(|e| IrError::Pass { pass: p.name().to_string(), source: Box::new(e) })?;
    }
    Ok(())
}

/// A projection as the fusion passes see it: plain `matmul` or a `linear` with no activation
/// and no residual yet.
pub(crate) struct Proj {
    pub x: NodeId,
    pub w: NodeId,
    pub bias: Option<NodeId>,
    pub rms_eps: Option<f32>,
}

pub(crate) fn as_proj(g: &Graph, id: NodeId) -> Option<Proj> {
    let ops = g.operands(id);
    match g.node(id).op {
        Op::MatMul => Some(Proj { x: ops[0], w: ops[1], bias: ops.get(2).copied(), rms_eps: None }),
        Op::Linear { rms_eps, act: Act::None, bias, residual: false } => {
            Some(Proj { x: ops[0], w: ops[1], bias: if bias { Some(ops[2]) } else { None }, rms_eps })
        }
        _ => None,
    }
}

/// Builds `linear` over a projection's operands.
pub(crate) fn linear(
    g: &mut Graph,
    p: &Proj,
    w: NodeId,
    act: Act,
    residual: Option<NodeId>,
) -> Result<NodeId, IrError> {
    let mut args = vec![p.x, w];
    args.extend(p.bias);
    args.extend(residual);
    g.add(Op::Linear { rms_eps: p.rms_eps, act, bias: p.bias.is_some(), residual: residual.is_some() }, &args)
}

/// The only user of `id`, if it has exactly one use (outputs count as uses).
pub(crate) fn single_user(g: &Graph, id: NodeId) -> Option<NodeId> {
    if g.outputs.iter().any(|(_, o)| *o == id) {
        return None;
    }
    match g.users(id).as_slice() {
        [u] if g.operands(*u).iter().filter(|&&o| o == id).count() == 1 => Some(*u),
        _ => None,
    }
}
