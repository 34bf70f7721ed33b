//! Fuses the Q, K and V projections of an attention into one projection over concatenated
//! weights, followed by column slices:
//!
//! ```text
//! attention([rope] x·Wqᵀ, [rope] x·Wkᵀ, x·Wvᵀ)  →  P = x·concat_rows(Wq, Wk, Wv)ᵀ;  q, k, v = slices of P
//! ```
//! Fires when all three read the same input with the same prologue, all or none have a bias,
//! and each feeds only this attention. Already-fused checkpoints (GPT-2 `c_attn`, Falcon
//! `query_key_value`) are left as they are.

use super::{as_proj, linear, single_user, Pass};
use crate::error::IrError;
use crate::graph::{Graph, NodeId};
use crate::op::{Act, Op};

pub struct FuseQkv;

/// The projection under an optional RoPE.
fn under_rope(g: &Graph, id: NodeId) -> NodeId {
    match g.node(id).op {
        Op::Rope { .. } => g.operands(id)[0],
        _ => id,
    }
}

impl Pass for FuseQkv {
    fn name(&self) -> &'static str {
        "fuse_qkv"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            if !matches!(g.node(id).op, Op::Attention { .. }) {
                continue;
            }
            let ops = g.operands(id);
            let ids = [under_rope(g, ops[0]), under_rope(g, ops[1]), ops[2]];
            let Some(projs) = ids.iter().map(|&p| as_proj(g, p)).collect::<Option<Vec<_>>>() else { continue };
            let same = projs.iter().all(|p| {
                p.x == projs[0].x && p.rms_eps == projs[0].rms_eps && p.bias.is_some() == projs[0].bias.is_some()
            });
            let private = ids.iter().all(|&p| single_user(g, p).is_some());
            if !same || !private {
                continue;
            }
            let w = g.add(Op::ConcatRows, &projs.iter().map(|p| p.w).collect::<Vec<_>>())?;
            let bias = match projs[0].bias {
                Some(_) => Some(g.add(Op::ConcatRows, &projs.iter().filter_map(|p| p.bias).collect::<Vec<_>>())?),
                None => None,
            };
            let fused = super::Proj { x: projs[0].x, w, bias, rms_eps: projs[0].rms_eps };
            let p = match fused.rms_eps {
                Some(_) => linear(g, &fused, w, Act::None, None)?,
                None => {
                    let mut args = vec![fused.x, w];
                    args.extend(bias);
                    g.add(Op::MatMul, &args)?
                }
            };
            let mut start = 0;
            for &old in &ids {
                let len = g.node(old).ty.shape.last_const().unwrap_or(0);
                let s = g.add(Op::Slice { start, len }, &[p])?;
                start += len;
                g.replace_uses(old, s);
                g.remove(old);
            }
            changed = true;
        }
        Ok(changed)
    }
}
