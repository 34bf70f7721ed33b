//! Common-subexpression elimination: two nodes with the same op, attributes and operands are
//! one. Ops that touch per-sequence state (KV caches, Mamba2 state) are never merged.

use std::collections::HashMap;

use super::Pass;
use crate::error::IrError;
use crate::graph::Graph;

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut seen: HashMap<String, crate::graph::NodeId> = HashMap::new();
        let mut changed = false;
        for id in g.topo_order()? {
            if !g.contains(id) {
                continue; // removed by an earlier rewrite of this pass
            }
            let node = g.node(id);
            if node.op.is_stateful() {
                continue;
            }
            let key = format!("{:?} {:?} {}", node.op, g.operands(id), node.ty);
            match seen.get(&key) {
                Some(&first) => {
                    g.replace_uses(id, first);
                    g.remove(id);
                    changed = true;
                }
                None => {
                    seen.insert(key, id);
                }
            }
        }
        Ok(changed)
    }
}
