//! Fuses a GELU into the epilogue of the projection it follows:
//!
//! ```text
//! gelu(proj(x, W))  →  linear(x, W) act=gelu      (and gelu_erf likewise)
//! ```

use super::{as_proj, linear, single_user, Pass};
use crate::error::IrError;
use crate::graph::Graph;
use crate::op::{Act, Op};

pub struct FuseGelu;

impl Pass for FuseGelu {
    fn name(&self) -> &'static str {
        "fuse_gelu"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            let act = match g.node(id).op {
                Op::Gelu => Act::Gelu,
                Op::GeluErf => Act::GeluErf,
                _ => continue,
            };
            let p = g.operands(id)[0];
            let Some(proj) = as_proj(g, p) else { continue };
            if single_user(g, p) != Some(id) {
                continue;
            }
            let new = linear(g, &proj, proj.w, act, None)?;
            g.replace_uses(id, new);
            g.remove(id);
            changed = true;
        }
        Ok(changed)
    }
}
