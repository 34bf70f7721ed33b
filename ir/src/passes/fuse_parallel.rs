//! Parallel (Falcon) blocks: `x + (mlp_out + attn_out)` becomes `(x + mlp_out) + attn_out`, so
//! that `fuse_residual` lets the MLP-down and attention-out projections accumulate into the
//! residual stream one after the other, with no separate adds:
//!
//! ```text
//! add(x, add(P1, P2))  →  add(add(x, P1), P2)        P1, P2 projections used only here
//! ```
//! Fires only where a residual receives the sum of two projections, i.e. in parallel blocks.
//! (The re-association changes f32 rounding by an ulp, well inside the parity tolerance.)

use super::{as_proj, single_user, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::Op;

pub struct FuseParallel;

impl Pass for FuseParallel {
    fn name(&self) -> &'static str {
        "fuse_parallel"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            if !matches!(g.node(id).op, Op::Add) {
                continue;
            }
            let ops = g.operands(id);
            for (x, inner) in [(ops[0], ops[1]), (ops[1], ops[0])] {
                if !matches!(g.node(inner).op, Op::Add) || single_user(g, inner) != Some(id) {
                    continue;
                }
                let io = g.operands(inner);
                let both = io.iter().all(|&p| as_proj(g, p).is_some() && single_user(g, p) == Some(inner));
                if !both || as_proj(g, x).is_some() {
                    continue;
                }
                let first = g.add(Op::Add, &[x, io[0]])?;
                let second = g.add(Op::Add, &[first, io[1]])?;
                g.replace_uses(id, second);
                g.remove(id);
                g.remove(inner);
                changed = true;
                break;
            }
        }
        Ok(changed)
    }
}
