//! Dead-code elimination: removes every node no output depends on.

use std::collections::HashSet;

use super::Pass;
use crate::error::IrError;
use crate::graph::Graph;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, IrError> {
        let mut live = HashSet::new();
        let mut stack: Vec<_> = g.outputs.iter().map(|(_, id)| *id).collect();
        while let Some(id) = stack.pop() {
            if live.insert(id) {
                stack.extend(g.operands(id));
            }
        }
        let dead: Vec<_> = g.node_ids().into_iter().filter(|id| !live.contains(id)).collect();
        for &id in &dead {
            g.remove(id);
        }
        Ok(!dead.is_empty())
    }
}
