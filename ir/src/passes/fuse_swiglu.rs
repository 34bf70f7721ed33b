//! Fuses a SwiGLU MLP's gate and up projections and the activation into one projection:
//!
//! ```text
//! silu(x·Wgᵀ) * (x·Wuᵀ)  →  linear(x, interleave_rows8(Wg, Wu)) act=swiglu
//! ```
//! Interleaving 8 gate rows with the matching 8 up rows puts both halves of every output in
//! one 16-row panel of the kernel. Fires for bias-free projections of the same input whose
//! row count is a multiple of 8, used only here (not on GPT-2's GELU MLP).

use super::{as_proj, linear, single_user, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::{Act, Op};

pub struct FuseSwiglu;

impl Pass for FuseSwiglu {
    fn name(&self) -> &'static str {
        "fuse_swiglu"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            if !matches!(g.node(id).op, Op::Mul) {
                continue;
            }
            let ops = g.operands(id);
            for (a, up) in [(ops[0], ops[1]), (ops[1], ops[0])] {
                if !matches!(g.node(a).op, Op::Silu) || single_user(g, a) != Some(id) {
                    continue;
                }
                let gate = g.operands(a)[0];
                let (Some(pg), Some(pu)) = (as_proj(g, gate), as_proj(g, up)) else { continue };
                let rows = g.node(gate).ty.shape.last_const().unwrap_or(0);
                let ok = pg.x == pu.x
                    && pg.rms_eps == pu.rms_eps
                    && pg.bias.is_none()
                    && pu.bias.is_none()
                    && rows.is_multiple_of(8)
                    && single_user(g, gate) == Some(a)
                    && single_user(g, up) == Some(id);
                if !ok {
                    continue;
                }
                let w = g.add(Op::InterleaveRows8, &[pg.w, pu.w])?;
                let new = linear(g, &pg, w, Act::SwiGlu, None)?;
                g.replace_uses(id, new);
                g.remove(id);
                changed = true;
                break;
            }
        }
        Ok(changed)
    }
}
