//! Folds a norm's scale (and LayerNorm's bias) into the projections that read it:
//!
//! ```text
//! rms_norm(x, s) · Wᵀ              →  linear(x, scale_cols(W, s)) rms_eps=eps      (1/rms in the epilogue)
//! layer_norm(x, s, b) · Wᵀ + c     →  layer_norm(x) · scale_cols(W, s)ᵀ + (weight_matvec(W, b) + c)
//! ```
//! Fires only when every user of the norm is a projection whose weight has no other user (a
//! weight shared with an embedding, as in tied lm_heads, is left alone rather than copied).

use super::{single_user, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::{Act, Op};

pub struct FoldNorm;

impl Pass for FoldNorm {
    fn name(&self) -> &'static str {
        "fold_norm"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            let (is_rms, eps) = match g.node(id).op {
                Op::RmsNorm { eps } => (true, eps),
                Op::LayerNorm { eps } if g.operands(id).len() == 3 => (false, eps),
                _ => continue,
            };
            let users = g.users(id);
            let foldable = !users.is_empty()
                && !g.outputs.iter().any(|(_, o)| *o == id)
                && users.iter().all(|&u| {
                    let ops = g.operands(u);
                    matches!(g.node(u).op, Op::MatMul) && ops[0] == id && single_user(g, ops[1]) == Some(u)
                });
            if !foldable {
                continue;
            }
            let nops = g.operands(id);
            let x = nops[0];
            let unit = if is_rms { x } else { g.add(Op::LayerNorm { eps }, &[x])? };
            for u in users {
                let ops = g.operands(u);
                let w = g.add(Op::ScaleCols, &[ops[1], nops[1]])?;
                let new = if is_rms {
                    let mut args = vec![x, w];
                    args.extend(ops.get(2));
                    g.add(
                        Op::Linear { rms_eps: Some(eps), act: Act::None, bias: ops.len() == 3, residual: false },
                        &args,
                    )?
                } else {
                    // (x̂·s + b)·Wᵀ + c = x̂·(W∘s)ᵀ + (W·b + c)
                    let mut bias = g.add(Op::WeightMatVec, &[ops[1], nops[2]])?;
                    if let Some(&c) = ops.get(2) {
                        bias = g.add(Op::Add, &[bias, c])?;
                    }
                    g.add(Op::MatMul, &[unit, w, bias])?
                };
                g.replace_uses(u, new);
                g.remove(u);
            }
            changed = true;
        }
        Ok(changed)
    }
}
