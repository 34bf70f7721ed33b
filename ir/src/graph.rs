//! The graph: a petgraph `StableGraph` of typed nodes. Edge weights are operand indices, so
//! the operands of a node are its incoming edges sorted by weight.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;

use crate::error::IrError;
use crate::op::{InputKind, Op, StateUse};
use crate::types::{DType, Shape, Type};

pub type NodeId = NodeIndex<u32>;

/// One node: an op and the type of the value it produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Type,
}

/// A forward step of a model over `n` tokens.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub(crate) g: StableDiGraph<Node, u32>,
    /// Named results of the step (e.g. `logits`).
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), g: StableDiGraph::default(), outputs: Vec::new() }
    }

    /// Adds a node with an explicit type (no checking; the verifier checks).
    pub fn add_typed(&mut self, op: Op, operands: &[NodeId], ty: Type) -> NodeId {
        let id = self.g.add_node(Node { op, ty });
        for (i, &src) in operands.iter().enumerate() {
            self.g.add_edge(src, id, i as u32);
        }
        id
    }

    /// Adds a node whose type is inferred from its operands.
    pub fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, IrError> {
        let tys: Vec<&Type> = operands.iter().map(|&o| &self.g[o].ty).collect();
        let ty = op.infer(&tys).map_err(|msg| IrError::Type { node: format!("new {}", op.name()), msg })?;
        Ok(self.add_typed(op, operands, ty))
    }

    pub fn input(&mut self, kind: InputKind) -> NodeId {
        self.add_typed(Op::Input(kind), &[], Type::new(DType::I32, Shape::vec_n()))
    }

    pub fn weight(&mut self, name: impl Into<String>, dims: &[usize]) -> NodeId {
        self.add_typed(Op::Weight { name: name.into() }, &[], Type::new(DType::F32, Shape::constant(dims)))
    }

    /// A weight of another element type (BitNet's `u8` packed matrices).
    pub fn weight_typed(&mut self, name: impl Into<String>, dtype: DType, dims: &[usize]) -> NodeId {
        self.add_typed(Op::Weight { name: name.into() }, &[], Type::new(dtype, Shape::constant(dims)))
    }

    pub fn output(&mut self, name: impl Into<String>, id: NodeId) {
        self.outputs.push((name.into(), id));
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Operands of a node in operand order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> =
            self.g.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        e.sort_unstable();
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes that use `id`.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    /// Replaces every use of `old` (operands and outputs) by `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let edges: Vec<_> =
            self.g.edges_directed(old, Direction::Outgoing).map(|e| (e.id(), e.target(), *e.weight())).collect();
        for (eid, target, w) in edges {
            self.g.remove_edge(eid);
            self.g.add_edge(new, target, w);
        }
        for (_, o) in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Makes operand `i` of `user` be `new` (whatever it was).
    pub fn set_operand(&mut self, user: NodeId, i: usize, new: NodeId) {
        let old: Vec<_> = self
            .g
            .edges_directed(user, Direction::Incoming)
            .filter(|e| *e.weight() == i as u32)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(new, user, i as u32);
    }

    pub fn remove(&mut self, id: NodeId) {
        self.g.remove_node(id);
    }

    /// A deterministic topological order: Kahn's algorithm, smallest node index first. For a
    /// graph built or parsed in dependency order this is exactly insertion order, which makes
    /// the text form stable under print → parse → print.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, IrError> {
        let mut indeg: std::collections::HashMap<NodeId, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in (&self.g).edge_references() {
            *indeg.entry(e.target()).or_default() += 1;
        }
        let mut ready: BinaryHeap<Reverse<NodeId>> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| Reverse(n)).collect();
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != self.g.node_count() {
            return Err(IrError::Cycle);
        }
        Ok(order)
    }

    /// All nodes, in index order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().collect()
    }

    /// Names and types of every weight the graph reads, in topological order (`weights()`
    /// includes byte weights; their type says so).
    pub fn weights(&self) -> Vec<(String, Type)> {
        let mut out = Vec::new();
        for id in self.topo_order().unwrap_or_default() {
            if let Op::Weight { name } = &self.g[id].op {
                out.push((name.clone(), self.g[id].ty.clone()));
            }
        }
        out
    }

    /// The attention layers (cache slots) of the graph: `(layer, kv_heads, head_dim)`, sorted.
    pub fn kv_layers(&self) -> Vec<(usize, usize, usize)> {
        let mut out: Vec<_> = self
            .g
            .node_weights()
            .filter_map(|n| match n.op.state() {
                Some(StateUse::Kv { layer, kv_heads, head_dim, writes: true, .. }) => Some((layer, kv_heads, head_dim)),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The Mamba2 layers of the graph: `(layer, conv channels, d_conv, state floats)`, sorted.
    pub fn mamba_layers(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out: Vec<_> = self
            .g
            .node_weights()
            .filter_map(|n| match n.op.state() {
                Some(StateUse::Mamba { layer, conv_channels, d_conv, ssm_floats }) => {
                    Some((layer, conv_channels, d_conv, ssm_floats))
                }
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a node's value is known at compile time (it depends on no step input).
    pub fn is_const(&self, id: NodeId) -> bool {
        let mut stack = vec![id];
        let mut seen = std::collections::HashSet::new();
        while let Some(n) = stack.pop() {
            if !seen.insert(n) {
                continue;
            }
            if matches!(self.g[n].op, Op::Input(_)) {
                return false;
            }
            stack.extend(self.operands(n));
        }
        true
    }

    /// Per-sequence state must be laid out one way per layer: every op touching the KV cache
    /// of a layer agrees on its kv heads, head dim and window, exactly one op writes it
    /// (`attention`, or `qkv_rope` before its `attend`s), and each Mamba2 layer has one op.
    /// The runtime sizes each layer's state from the first op it sees, so a disagreement would
    /// let a kernel run past it.
    fn verify_state(
        &self,
        order: &[NodeId],
        numbering: &std::collections::HashMap<NodeId, usize>,
    ) -> Result<(), IrError> {
        use std::collections::HashMap;
        // layer -> (kv_heads, head_dim, window, written)
        let mut kv: HashMap<usize, (usize, usize, Option<usize>, bool)> = HashMap::new();
        let mut mamba = std::collections::HashSet::new();
        for &id in order {
            let node = &self.g[id];
            let at = || format!("%{} ({})", numbering[&id], node.op.name());
            let bad = |msg: String| IrError::Type { node: at(), msg };
            let (layer, kv_heads, head_dim, window, writes) = match node.op.state() {
                Some(StateUse::Kv { layer, kv_heads, head_dim, window, writes }) => {
                    (layer, kv_heads, head_dim, window, writes)
                }
                Some(StateUse::Mamba { layer, .. }) => {
                    if !mamba.insert(layer) {
                        return Err(bad(format!("a second mamba2 op for layer {layer}")));
                    }
                    continue;
                }
                None => continue,
            };
            match kv.get_mut(&layer) {
                None if !writes => {
                    return Err(bad(format!("reads the KV cache of layer {layer}, which no earlier op writes")))
                }
                None => {
                    kv.insert(layer, (kv_heads, head_dim, window, true));
                }
                Some(_) if writes => return Err(bad(format!("a second op writes the KV cache of layer {layer}"))),
                Some(e) => {
                    if (e.0, e.1) != (kv_heads, head_dim) {
                        return Err(bad(format!(
                            "layer {layer} KV cache is {} kv heads × {}, this op reads {kv_heads} × {head_dim}",
                            e.0, e.1
                        )));
                    }
                    match (e.2, window) {
                        (Some(a), Some(b)) if a != b => {
                            return Err(bad(format!("layer {layer} has windows {a} and {b}")));
                        }
                        (None, Some(w)) => e.2 = Some(w),
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The same step with `logits` for every row instead of the last one only (what
    /// perplexity needs): each `take_last` node is replaced by its input, every node after it
    /// gets its type inferred again (`[s, d]` becomes `[n, d]`), and the result is verified.
    /// Weights, per-layer state and every other node are unchanged, so the derived graph reads
    /// exactly the tensors of the original. Refused when the graph has no `take_last` or when
    /// the result's `logits` are not one row per token.
    pub fn with_all_logits(&self) -> Result<Graph, IrError> {
        let bad = |msg: String| IrError::Type { node: "output logits".into(), msg };
        let mut g = self.clone();
        let takes: Vec<NodeId> = g.g.node_indices().filter(|&id| matches!(g.g[id].op, Op::TakeLast)).collect();
        if takes.is_empty() {
            return Err(bad("the graph has no take_last to remove (its logits already cover every row?)".into()));
        }
        for t in takes {
            let &[input, _seqs] = g.operands(t).as_slice() else {
                return Err(bad("take_last must have two operands (rows, seqs)".into()));
            };
            g.replace_uses(t, input);
            g.remove(t);
        }
        for id in g.topo_order()? {
            if matches!(g.g[id].op, Op::Weight { .. }) {
                continue;
            }
            let ops = g.operands(id);
            let tys: Vec<&Type> = ops.iter().map(|&o| &g.g[o].ty).collect();
            let ty = g.g[id].op.infer(&tys).map_err(|msg| IrError::Type { node: g.g[id].op.name().into(), msg })?;
            g.g[id].ty = ty;
        }
        g.verify()?;
        let logits = g.outputs.iter().find(|(name, _)| name == "logits").map(|(_, id)| *id);
        let ty = &g.g[logits.ok_or_else(|| bad("the graph has no `logits` output".into()))?].ty;
        if !matches!(ty.shape.0.as_slice(), [crate::types::Dim::N, crate::types::Dim::C(_)]) {
            return Err(bad(format!("logits are {ty} after removing take_last, not one row per token")));
        }
        Ok(g)
    }

    /// Checks every node: operand count and types against the op's typing rule, weights and
    /// inputs well-formed, outputs present, no cycles. Names the first offending node.
    pub fn verify(&self) -> Result<(), IrError> {
        let order = self.topo_order()?;
        let numbering: std::collections::HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        for &id in &order {
            let node = &self.g[id];
            let ops = self.operands(id);
            let at = || format!("%{} ({})", numbering[&id], node.op.name());
            node.op.check_attrs().map_err(|msg| IrError::Type { node: at(), msg })?;
            check_type_bounds(&node.ty).map_err(|msg| IrError::Type { node: at(), msg })?;
            for (i, &o) in ops.iter().enumerate() {
                let t = &self.g[o].ty;
                if crate::quant::is_storage(t.dtype) && !node.op.accepts_storage(i) {
                    return Err(IrError::Type {
                        node: at(),
                        msg: format!("operand {i} is stored as {}, which this op cannot read", t.dtype.name()),
                    });
                }
            }
            match &node.op {
                Op::Weight { name } => {
                    if crate::quant::is_blocked(node.ty.dtype)
                        && (node.ty.shape.0.len() < 2
                            || !node.ty.shape.last_const().is_some_and(|c| c % crate::quant::QK == 0))
                    {
                        return Err(IrError::Type {
                            node: at(),
                            msg: format!(
                                "{} weight {name:?} needs rows of a multiple of 32 values",
                                node.ty.dtype.name()
                            ),
                        });
                    }
                    if !ops.is_empty() {
                        return Err(IrError::Type { node: at(), msg: "weight takes no operands".into() });
                    }
                    if node.ty.shape.is_symbolic() {
                        return Err(IrError::Type { node: at(), msg: format!("weight {name:?} has a symbolic dim") });
                    }
                }
                op => {
                    let tys: Vec<&Type> = ops.iter().map(|&o| &self.g[o].ty).collect();
                    let want = op.infer(&tys).map_err(|msg| IrError::Type { node: at(), msg })?;
                    if want != node.ty {
                        return Err(IrError::Type {
                            node: at(),
                            msg: format!("declared type {} but operands give {}", node.ty, want),
                        });
                    }
                }
            }
        }
        self.verify_state(&order, &numbering)?;
        if self.outputs.is_empty() {
            return Err(IrError::NoOutputs);
        }
        for (name, id) in &self.outputs {
            if !self.g.contains_node(*id) {
                return Err(IrError::Type { node: format!("output {name}"), msg: "refers to a removed node".into() });
            }
        }
        Ok(())
    }
}

/// Every dim of a value in `1..=MAX_DIM` (constant dims), at most four dims, and at most
/// `MAX_NUMEL` elements per row of the step (the whole value for constants).
fn check_type_bounds(ty: &Type) -> Result<(), String> {
    use crate::op::{MAX_DIM, MAX_NUMEL};
    use crate::types::Dim;
    if ty.shape.0.len() > 4 {
        return Err(format!("type {ty} has more than 4 dims"));
    }
    let mut numel: u64 = 1;
    for d in &ty.shape.0 {
        if let Dim::C(c) = d {
            if *c == 0 || *c > MAX_DIM {
                return Err(format!("type {ty} has a dim outside 1..={MAX_DIM}"));
            }
            numel = numel.saturating_mul(*c as u64);
        }
    }
    if numel > MAX_NUMEL {
        return Err(format!("type {ty} has more than {MAX_NUMEL} elements"));
    }
    Ok(())
}
