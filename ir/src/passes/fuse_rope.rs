//! Fuses RoPE and the KV-cache append into the Q/K/V projection's epilogue:
//!
//! ```text
//! P = proj(x, W);  attention(rope(P[q]), rope(P[k]), P[v])
//!   →  q = qkv_rope(x, rope_interleave(W), positions, seqs);  attend(q, positions, seqs)
//! ```
//! `rope_interleave` permutes the rows of W at compile time so that every rotated pair sits in
//! neighbouring rows; q·k is unchanged by the shared permutation, v is not permuted. Fires when
//! the slices cover the fused projection exactly, both ropes agree, and head_dim and
//! rotary_dim are multiples of 4 (the kernel rotates two pairs per vector).

use super::{as_proj, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::Op;

pub struct FuseRope;

impl Pass for FuseRope {
    fn name(&self) -> &'static str {
        "fuse_rope"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            let Op::Attention { layer, heads, kv_heads, head_dim, window, scale } = g.node(id).op else { continue };
            let ops = g.operands(id);
            let (rq, rk, sv, pos, seqs) = (ops[0], ops[1], ops[2], ops[3], ops[4]);
            let (Op::Rope { rotary_dim, theta, scaling, .. }, Op::Rope { rotary_dim: rd2, theta: t2, scaling: s2, .. }) =
                (g.node(rq).op.clone(), g.node(rk).op.clone())
            else {
                continue;
            };
            if rotary_dim != rd2 || theta != t2 || scaling != s2 || head_dim % 4 != 0 || rotary_dim % 4 != 0 {
                continue;
            }
            let (sq, sk) = (g.operands(rq)[0], g.operands(rk)[0]);
            let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
            let slice_of = |s| match g.node(s).op {
                Op::Slice { start, len } => Some((g.operands(s)[0], start, len)),
                _ => None,
            };
            let (Some((p, 0, l0)), Some((p1, s1, l1)), Some((p2, s2_, l2))) =
                (slice_of(sq), slice_of(sk), slice_of(sv))
            else {
                continue;
            };
            let Some(proj) = as_proj(g, p) else { continue };
            let exact = p1 == p && p2 == p && l0 == qw && s1 == qw && l1 == kw && s2_ == qw + kw && l2 == kw;
            let covered = g.node(p).ty.shape.last_const() == Some(qw + 2 * kw);
            let private = g.users(p).iter().all(|&u| u == sq || u == sk || u == sv)
                && g.users(sq) == vec![rq]
                && g.users(sk) == vec![rk]
                && g.users(rq) == vec![id]
                && g.users(rk) == vec![id];
            if !(exact && covered && private) {
                continue;
            }
            let perm = Op::RopeInterleave { heads, kv_heads, head_dim, rotary_dim };
            let w = g.add(perm.clone(), &[proj.w])?;
            let mut args = vec![proj.x, w];
            if let Some(b) = proj.bias {
                args.push(g.add(perm, &[b])?);
            }
            args.extend([pos, seqs]);
            let q = g.add(
                Op::QkvRope {
                    layer,
                    heads,
                    kv_heads,
                    head_dim,
                    rotary_dim,
                    theta,
                    scaling,
                    rms_eps: proj.rms_eps,
                    bias: proj.bias.is_some(),
                },
                &args,
            )?;
            let a = g.add(Op::Attend { layer, heads, kv_heads, head_dim, window, scale }, &[q, pos, seqs])?;
            g.replace_uses(id, a);
            g.remove(id);
            changed = true;
        }
        Ok(changed)
    }
}
