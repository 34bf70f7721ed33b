//! Fuses a residual add into the epilogue of the projection that produces the other operand:
//!
//! ```text
//! add(r, proj(x, W))  →  linear(x, W, r) residual=true
//! ```
//! Biases are already in the projection's epilogue; the projection must have no other user.

use super::{single_user, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::{Act, Op};

pub struct FuseResidual;

impl Pass for FuseResidual {
    fn name(&self) -> &'static str {
        "fuse_residual"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            if !matches!(g.node(id).op, Op::Add) || g.node(id).ty.shape.rank() != 2 {
                continue;
            }
            let ops = g.operands(id);
            for (r, p) in [(ops[0], ops[1]), (ops[1], ops[0])] {
                let po = g.operands(p);
                let (rms_eps, act, bias) = match g.node(p).op {
                    Op::MatMul => (None, Act::None, po.len() == 3),
                    Op::Linear { rms_eps, act, bias, residual: false } => (rms_eps, act, bias),
                    _ => continue,
                };
                if single_user(g, p) != Some(id) || g.node(r).ty != g.node(id).ty {
                    continue;
                }
                let mut args = po.clone();
                args.push(r);
                let new = g.add(Op::Linear { rms_eps, act, bias, residual: true }, &args)?;
                g.replace_uses(id, new);
                g.remove(id);
                g.remove(p);
                changed = true;
                break;
            }
        }
        Ok(changed)
    }
}
