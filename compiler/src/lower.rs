//! Lowering: optimized graph → [`Program`]. Each compute node becomes one kernel call (attention
//! becomes a KV append and the attention proper); identical specs share one kernel; buffers are
//! placed by a liveness-based first-fit memory plan.

use std::collections::HashMap;

use llmc_ir::{Act, DType, Dim, Graph, InputKind, IrError, NodeId, Op};

use crate::pack::PANEL;
use crate::program::{Arg, Binary, Buffer, Call, KernelSpec, KvLayer, Layout, Program, RopeTable, Rows, Unary, Units};

fn err(msg: impl Into<String>) -> IrError {
    IrError::Lower(msg.into())
}

struct Lowerer<'g> {
    g: &'g Graph,
    prog: Program,
    vals: HashMap<NodeId, Arg>,
}

impl Lowerer<'_> {
    fn kernel(&mut self, spec: KernelSpec) -> usize {
        if let Some(i) = self.prog.kernels.iter().position(|k| *k == spec) {
            return i;
        }
        self.prog.kernels.push(spec);
        self.prog.kernels.len() - 1
    }

    fn buffer(&mut self, width: usize, rows: Rows) -> usize {
        self.prog.buffers.push(Buffer { width, rows, offset: 0 });
        self.prog.buffers.len() - 1
    }

    fn rope_table(&mut self, table: RopeTable) -> usize {
        match self.prog.rope_tables.iter().position(|r| *r == table) {
            Some(t) => t,
            None => {
                self.prog.rope_tables.push(table);
                self.prog.rope_tables.len() - 1
            }
        }
    }

    /// Records the KV cache of `layer`; the window comes from whichever op knows it.
    fn kv_layer(&mut self, layer: usize, kv_heads: usize, head_dim: usize, window: Option<usize>) {
        match self.prog.kv_layers.iter_mut().find(|l| l.layer == layer) {
            Some(l) => l.window = l.window.or(window),
            None => self.prog.kv_layers.push(KvLayer { layer, kv_heads, head_dim, window }),
        }
    }

    fn arg(&self, id: NodeId) -> Result<Arg, IrError> {
        self.vals.get(&id).cloned().ok_or_else(|| err("operand not lowered"))
    }

    fn set_layout(&mut self, arg: &Arg, layout: Layout) -> Result<(), IrError> {
        let Arg::Weight(name) = arg else {
            return Err(err("matmul weights and biases must be weights (computed matrices are not supported yet)"));
        };
        let matrix = |l: Layout| matches!(l, Layout::Panel16 | Layout::Dot16);
        match self.prog.layouts.iter_mut().find(|(n, _)| n == name) {
            Some((_, l)) if matrix(*l) && matrix(layout) && *l != layout => {
                return Err(err(format!("weight {name} is read both by int8 (quant_q8) and f32 projections")))
            }
            Some((_, l)) if *l == layout || matrix(*l) => {}
            Some((_, l)) => *l = layout,
            None => self.prog.layouts.push((name.clone(), layout)),
        }
        Ok(())
    }

    fn call(&mut self, spec: KernelSpec, args: Vec<Arg>, units: Units, rows: Rows, work: usize) {
        let kernel = self.kernel(spec);
        self.prog.calls.push(Call { kernel, args, units, rows, layer: None, work_per_unit: work });
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), IrError> {
        let node = self.g.node(id);
        let ops = self.g.operands(id);
        let a: Vec<Arg> = ops.iter().map(|&o| self.arg(o)).collect::<Result<_, _>>()?;
        let shape = &node.ty.shape.0;
        let rows = match shape.first() {
            Some(Dim::N) => Rows::N,
            Some(Dim::S) => Rows::Seqs,
            _ => Rows::One,
        };
        let width = node.ty.shape.last_const().unwrap_or(0);
        // `quant_q8` (`quant_q8x2`) lowers into the prologue of the projections it feeds (as
        // their input).
        let quantized = |i: usize| matches!(self.g.node(ops[i]).op, Op::QuantQ8 | Op::QuantQ8x2);
        let xq_ok = matches!(node.op, Op::MatMul | Op::Linear { .. } | Op::QkvRope { .. });
        if let Some(i) = (0..ops.len()).find(|&i| quantized(i) && (i != 0 || !xq_ok)) {
            return Err(err(format!(
                "quant_q8 feeds operand {i} of {}: only the input of a projection takes it",
                node.op.name()
            )));
        }
        let xq = match self.g.node(ops.first().copied().unwrap_or(id)).op {
            _ if !xq_ok => 0,
            Op::QuantQ8 => 1,
            Op::QuantQ8x2 => 2,
            _ => 0,
        };
        if xq > 0 && !llmc_ir::quant::is_blocked(self.g.node(ops[1]).ty.dtype) {
            return Err(err(format!(
                "quant_q8 feeds a {} whose weight is {:?}: int8 projections need a blocked type (q8_0, q4_0, q4_1, q5_1, q6_k)",
                node.op.name(),
                self.g.node(ops[1]).ty.dtype
            )));
        }
        if xq > 0 && self.g.node(ops[0]).ty.shape.last_const().unwrap_or(0) > crate::kernels::dot::MAX_COLS {
            return Err(err(format!(
                "{} over int8 activations takes at most {} columns",
                node.op.name(),
                crate::kernels::dot::MAX_COLS
            )));
        }
        let wlayout = if xq > 0 { Layout::Dot16 } else { Layout::Panel16 };
        // a projection over bf16 weights whose input `round_bf16` made: bf16-exact
        let xbf16 = xq_ok
            && ops.len() > 1
            && matches!(self.g.node(ops[0]).op, Op::RoundBf16)
            && self.g.node(ops[1]).ty.dtype == DType::BF16;
        let in_width = |i: usize| self.g.node(ops[i]).ty.shape.last_const().unwrap_or(0);
        let result = match &node.op {
            Op::Input(InputKind::Tokens) => Arg::Tokens,
            Op::Input(InputKind::Positions) => Arg::Positions,
            Op::Input(InputKind::Seqs) => Arg::Seqs,
            Op::Weight { name } => Arg::Weight(name.clone()),
            Op::QuantQ8 | Op::QuantQ8x2 => a[0].clone(),
            op => {
                let out = self.buffer(width, rows);
                let mut args = a.clone();
                args.push(Arg::Buf(out));
                match op {
                    Op::Embedding => {
                        // Gathers read a packed table when it is also a matmul weight (tied
                        // embeddings): decided after all matmuls are seen, see
                        // `fix_embeddings`. A table with a storage type is always packed.
                        let w = self.g.node(ops[0]).ty.dtype;
                        let spec = KernelSpec::Embedding { d: width, layout: Layout::RowMajor, w };
                        self.call(spec, args, Units::Rows, rows, width);
                    }
                    Op::MatMul | Op::Linear { .. } => {
                        let (rms_eps, act, bias, residual) = match op {
                            Op::Linear { rms_eps, act, bias, residual } => (*rms_eps, *act, *bias, *residual),
                            _ => (None, Act::None, a.len() == 3, false),
                        };
                        let k = in_width(0);
                        let m = self.g.node(ops[1]).ty.shape.resolve(0)[0];
                        self.set_layout(&a[1], wlayout)?;
                        if bias {
                            self.set_layout(&a[2], Layout::Padded16)?;
                        }
                        let w = self.g.node(ops[1]).ty.dtype;
                        let spec = KernelSpec::MatMul { k, m, bias, rms_eps, act, residual, w, xq, xbf16 };
                        self.call(spec, args, Units::Panels(m.div_ceil(PANEL)), rows, PANEL * k);
                    }
                    Op::QkvRope { layer, heads, kv_heads, head_dim, rotary_dim, theta, scaling, rms_eps, bias } => {
                        let k = in_width(0);
                        let m = (heads + 2 * kv_heads) * head_dim;
                        self.set_layout(&a[1], wlayout)?;
                        if *bias {
                            self.set_layout(&a[2], Layout::Padded16)?;
                        }
                        let t = self.rope_table(RopeTable {
                            theta: *theta,
                            scaling: *scaling,
                            rotary_dim: *rotary_dim,
                            interleaved: true,
                        });
                        self.kv_layer(*layer, *kv_heads, *head_dim, None);
                        let mut args = vec![a[0].clone(), a[1].clone()];
                        if *bias {
                            args.push(a[2].clone());
                        }
                        // (the sequences are the executor's: a batched step runs this once over
                        // all rows, each row writing where its `KvRows` entry says)
                        let pos = a[a.len() - 2].clone();
                        args.extend([pos, Arg::RopeTable(t), Arg::KvRows(*layer), Arg::Buf(out)]);
                        let spec = KernelSpec::QkvRope {
                            k,
                            heads: *heads,
                            kv_heads: *kv_heads,
                            head_dim: *head_dim,
                            rotary_dim: *rotary_dim,
                            rms_eps: *rms_eps,
                            bias: *bias,
                            w: self.g.node(ops[1]).ty.dtype,
                            xq,
                            xbf16,
                        };
                        self.call(spec, args, Units::Panels(m.div_ceil(PANEL)), rows, PANEL * k);
                        self.prog.calls.last_mut().ok_or_else(|| err("no call"))?.layer = Some(*layer);
                    }
                    Op::Attend { layer, heads, kv_heads, head_dim, window, scale } => {
                        self.kv_layer(*layer, *kv_heads, *head_dim, *window);
                        let (kc, vc) = (Arg::KCache(*layer), Arg::VCache(*layer));
                        let spec = KernelSpec::Attention {
                            heads: *heads,
                            kv_heads: *kv_heads,
                            head_dim: *head_dim,
                            window: *window,
                            scale: *scale,
                        };
                        let args = vec![a[0].clone(), a[1].clone(), kc, vc, Arg::Buf(out)];
                        self.call(spec, args, Units::KvHeadsByRows(*kv_heads), rows, 4096);
                        self.prog.calls.last_mut().ok_or_else(|| err("no call"))?.layer = Some(*layer);
                    }
                    Op::Moe { experts, top_k } => {
                        let (d, e, k) = (width, *experts, *top_k);
                        let ff = self.g.node(ops[3]).ty.shape.resolve(0)[2];
                        if d % PANEL != 0 {
                            return Err(err(format!("moe needs hidden size {d} to be a multiple of {PANEL}")));
                        }
                        if ff % (PANEL / 2) != 0 {
                            return Err(err(format!("moe needs expert size {ff} to be a multiple of {}", PANEL / 2)));
                        }
                        // the expert kernels gather whole rows into a stack buffer
                        let most = crate::kernels::moe::GATHER_BYTES / 4;
                        if d.max(ff) > most {
                            return Err(err(format!(
                                "moe rows of {} values exceed the {most} the expert kernels take",
                                d.max(ff)
                            )));
                        }
                        for w in &a[1..4] {
                            self.set_layout(w, Layout::Panel16)?;
                        }
                        let logits = self.buffer(e, rows);
                        let route = self.buffer(2 * k, rows);
                        let h = self.buffer(k * ff, rows);
                        let wt = |i: usize| self.g.node(ops[i]).ty.dtype;
                        let router = KernelSpec::MatMul {
                            k: d,
                            m: e,
                            bias: false,
                            rms_eps: None,
                            act: Act::None,
                            residual: false,
                            w: wt(1),
                            xq: 0,
                            xbf16: false,
                        };
                        let args = vec![a[0].clone(), a[1].clone(), Arg::Buf(logits)];
                        self.call(router, args, Units::Panels(e.div_ceil(PANEL)), rows, PANEL * d);
                        let spec = KernelSpec::MoeRoute { experts: e, top_k: k };
                        self.call(spec, vec![Arg::Buf(logits), Arg::Buf(route)], Units::Rows, rows, e);
                        let spec = KernelSpec::MoeGateUp { d, ff, experts: e, top_k: k, w: wt(2) };
                        let args = vec![a[0].clone(), a[2].clone(), Arg::Buf(route), Arg::Buf(h)];
                        self.call(spec, args, Units::Panels(2 * ff / PANEL), rows, PANEL * d * k);
                        let spec = KernelSpec::MoeDown { d, ff, experts: e, top_k: k, w: wt(3) };
                        let args = vec![Arg::Buf(h), a[3].clone(), Arg::Buf(route), Arg::Buf(out)];
                        self.call(spec, args, Units::Panels(d / PANEL), rows, PANEL * ff * k);
                    }
                    Op::Mamba2 { layer, heads, head_dim, d_state, groups, d_conv, eps, .. } => {
                        let inner = heads * head_dim;
                        let ch = inner + 2 * groups * d_state;
                        let width = inner + ch + heads;
                        let st = (*layer, (d_conv - 1) * ch, inner * d_state);
                        if !self.prog.mamba_layers.contains(&st) {
                            self.prog.mamba_layers.push(st);
                        }
                        // a = [zxbcdt, conv_w, conv_b, dt_bias, a_log, d, norm_w]
                        let act = self.buffer(ch, rows);
                        let y = self.buffer(inner, rows);
                        let spec = KernelSpec::Mamba2Conv { ch, d_conv: *d_conv, inner, width };
                        let args =
                            vec![a[0].clone(), a[1].clone(), a[2].clone(), Arg::MambaConv(*layer), Arg::Buf(act)];
                        let blocks = ch.div_ceil(crate::kernels::mamba::CONV_BLOCK);
                        self.call(spec, args, Units::Panels(blocks), rows, crate::kernels::mamba::CONV_BLOCK * d_conv);
                        let spec = KernelSpec::Mamba2Scan {
                            heads: *heads,
                            head_dim: *head_dim,
                            d_state: *d_state,
                            groups: *groups,
                            width,
                        };
                        let mut args = vec![a[0].clone(), Arg::Buf(act)];
                        args.extend(a[3..6].iter().cloned());
                        args.extend([Arg::MambaSsm(*layer), Arg::Buf(y)]);
                        self.call(spec, args, Units::Panels(*heads), rows, 4 * head_dim * d_state);
                        let spec = KernelSpec::Mamba2Norm { inner, width, eps: *eps };
                        let args = vec![a[0].clone(), Arg::Buf(y), a[6].clone(), Arg::Buf(out)];
                        self.call(spec, args, Units::Rows, rows, 4 * inner);
                    }
                    Op::BitLinear => {
                        let k = in_width(0);
                        let q = self.buffer(k + 1, rows);
                        self.call(KernelSpec::ActQuant { k }, vec![a[0].clone(), Arg::Buf(q)], Units::Rows, rows, k);
                        let spec = KernelSpec::BitMatMul { k, m: width };
                        let args = vec![Arg::Buf(q), a[1].clone(), a[2].clone(), Arg::Buf(out)];
                        self.call(spec, args, Units::Panels(width / 4), rows, 4 * k);
                    }
                    Op::Relu2 => {
                        self.call(KernelSpec::Unary { op: Unary::Relu2, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::RoundBf16 => {
                        self.call(KernelSpec::Unary { op: Unary::RoundBf16, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::Stack
                    | Op::InterleaveHalves8
                    | Op::ConcatRows
                    | Op::ConcatCols
                    | Op::InterleaveRows8
                    | Op::ScaleCols
                    | Op::WeightMatVec
                    | Op::RopeInterleave { .. } => {
                        return Err(err(format!("{} must be evaluated at compile time", op.name())));
                    }
                    Op::RmsNorm { eps } => {
                        self.call(KernelSpec::RmsNorm { d: width, eps: *eps }, args, Units::Rows, rows, width)
                    }
                    Op::LayerNorm { eps } => {
                        let affine = a.len() == 3;
                        self.call(KernelSpec::LayerNorm { d: width, eps: *eps, affine }, args, Units::Rows, rows, width)
                    }
                    Op::Rope { heads, head_dim, rotary_dim, theta, scaling } => {
                        let t = self.rope_table(RopeTable {
                            theta: *theta,
                            scaling: *scaling,
                            rotary_dim: *rotary_dim,
                            interleaved: false,
                        });
                        let args = vec![a[0].clone(), a[1].clone(), Arg::RopeTable(t), Arg::Buf(out)];
                        let spec = KernelSpec::Rope { heads: *heads, head_dim: *head_dim, rotary_dim: *rotary_dim };
                        self.call(spec, args, Units::Rows, rows, width);
                    }
                    Op::Attention { layer, heads, kv_heads, head_dim, window, scale } => {
                        self.kv_layer(*layer, *kv_heads, *head_dim, *window);
                        let (kc, vc) = (Arg::KCache(*layer), Arg::VCache(*layer));
                        let append = KernelSpec::KvAppend { kv_heads: *kv_heads, head_dim: *head_dim };
                        let kvw = kv_heads * head_dim;
                        self.call(
                            append,
                            vec![a[1].clone(), a[2].clone(), a[3].clone(), kc.clone(), vc.clone()],
                            Units::Rows,
                            rows,
                            kvw,
                        );
                        self.prog.calls.last_mut().ok_or_else(|| err("no call"))?.layer = Some(*layer);
                        let spec = KernelSpec::Attention {
                            heads: *heads,
                            kv_heads: *kv_heads,
                            head_dim: *head_dim,
                            window: *window,
                            scale: *scale,
                        };
                        // Work grows with the context; 4096 floats is a fair guess per unit.
                        self.call(
                            spec,
                            vec![a[0].clone(), a[3].clone(), kc, vc, Arg::Buf(out)],
                            Units::KvHeadsByRows(*kv_heads),
                            rows,
                            4096,
                        );
                        self.prog.calls.last_mut().ok_or_else(|| err("no call"))?.layer = Some(*layer);
                    }
                    Op::Softmax => self.call(KernelSpec::Softmax { d: width }, args, Units::Rows, rows, width),
                    Op::Silu => {
                        self.call(KernelSpec::Unary { op: Unary::Silu, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::Gelu => {
                        self.call(KernelSpec::Unary { op: Unary::Gelu, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::GeluErf => {
                        self.call(KernelSpec::Unary { op: Unary::GeluErf, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::Scale { factor } => self.call(
                        KernelSpec::Unary { op: Unary::Scale(*factor), d: width },
                        args,
                        Units::Rows,
                        rows,
                        width,
                    ),
                    Op::Add => {
                        self.call(KernelSpec::Binary { op: Binary::Add, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::Mul => {
                        self.call(KernelSpec::Binary { op: Binary::Mul, d: width }, args, Units::Rows, rows, width)
                    }
                    Op::Slice { start, len } => self.call(
                        KernelSpec::Slice { d: in_width(0), start: *start, len: *len },
                        args,
                        Units::Rows,
                        rows,
                        width,
                    ),
                    Op::Concat => {
                        let widths = (0..ops.len()).map(in_width).collect();
                        self.call(KernelSpec::Concat { widths }, args, Units::Rows, rows, width)
                    }
                    Op::TakeLast => self.call(KernelSpec::TakeLast { d: width }, args, Units::Single, Rows::N, width),
                    Op::Input(_) | Op::Weight { .. } | Op::QuantQ8 | Op::QuantQ8x2 => unreachable!("handled above"),
                }
                Arg::Buf(out)
            }
        };
        self.vals.insert(id, result);
        Ok(())
    }

    /// Embedding tables that are also matmul weights are read in the matmul's layout; a table
    /// with a storage type is packed (`Panel16`) in any case.
    fn fix_embeddings(&mut self) {
        for ci in 0..self.prog.calls.len() {
            let call = &self.prog.calls[ci];
            if let KernelSpec::Embedding { d, w, .. } = self.prog.kernels[call.kernel] {
                let Arg::Weight(name) = &call.args[0] else { continue };
                let name = name.clone();
                let have = self.prog.layouts.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
                let layout = match have {
                    Some(l @ (Layout::Panel16 | Layout::Dot16)) => l,
                    _ if w != DType::F32 => {
                        self.prog.layouts.retain(|(n, _)| *n != name);
                        self.prog.layouts.push((name, Layout::Panel16));
                        Layout::Panel16
                    }
                    _ => Layout::RowMajor,
                };
                let k = self.kernel(KernelSpec::Embedding { d, layout, w });
                self.prog.calls[ci].kernel = k;
            }
        }
        // Drop kernels no call uses any more, renumbering the calls.
        let used: Vec<bool> =
            (0..self.prog.kernels.len()).map(|k| self.prog.calls.iter().any(|c| c.kernel == k)).collect();
        let mut remap = vec![usize::MAX; used.len()];
        let mut kept = Vec::new();
        for (i, k) in self.prog.kernels.drain(..).enumerate() {
            if used[i] {
                remap[i] = kept.len();
                kept.push(k);
            }
        }
        self.prog.kernels = kept;
        for c in &mut self.prog.calls {
            c.kernel = remap[c.kernel];
        }
    }

    /// Liveness-based first-fit placement. A buffer lives from the call that writes it to the
    /// last call that reads it (outputs: to the end); a call's inputs and output never overlap.
    fn plan_memory(&mut self) {
        let nb = self.prog.buffers.len();
        let mut def = vec![usize::MAX; nb];
        let mut last = vec![0usize; nb];
        for (ci, c) in self.prog.calls.iter().enumerate() {
            for a in &c.args {
                if let Arg::Buf(b) = a {
                    def[*b] = def[*b].min(ci);
                    last[*b] = last[*b].max(ci);
                }
            }
        }
        for (_, b) in &self.prog.outputs {
            last[*b] = usize::MAX;
        }
        let mut order: Vec<usize> = (0..nb).filter(|&b| def[b] != usize::MAX).collect();
        order.sort_by_key(|&b| (def[b], b));
        // (offset, width, last use) of buffers currently placed.
        let mut live: Vec<(usize, usize, usize)> = Vec::new();
        let mut arena = 0;
        for b in order {
            live.retain(|&(_, _, end)| end >= def[b]);
            let width = self.prog.buffers[b].width.div_ceil(16) * 16;
            live.sort_unstable();
            let mut at = 0;
            for &(off, w, _) in &live {
                if at + width <= off {
                    break;
                }
                at = at.max(off + w);
            }
            live.push((at, width, last[b]));
            self.prog.buffers[b].offset = at;
            arena = arena.max(at + width);
        }
        self.prog.arena_width = arena;
    }
}

/// Lowers a verified graph to a program.
pub fn lower(g: &Graph) -> Result<Program, IrError> {
    g.verify()?;
    let mut l = Lowerer {
        g,
        prog: Program {
            kernels: Vec::new(),
            calls: Vec::new(),
            buffers: Vec::new(),
            arena_width: 0,
            outputs: Vec::new(),
            rope_tables: Vec::new(),
            kv_layers: Vec::new(),
            mamba_layers: Vec::new(),
            layouts: Vec::new(),
        },
        vals: HashMap::new(),
    };
    for id in g.topo_order()? {
        l.lower_node(id)?;
    }
    for (name, id) in &g.outputs {
        match l.arg(*id)? {
            Arg::Buf(b) => l.prog.outputs.push((name.clone(), b)),
            _ => return Err(err(format!("output {name} must be computed"))),
        }
    }
    l.fix_embeddings();
    l.plan_memory();
    Ok(l.prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tokens → embedding → quant_q8 → matmul(w)`, with `w` of type `wt`; `silu` on the
    /// quantized value instead when `misuse`.
    fn graph(wt: DType, misuse: bool) -> Graph {
        graph_k(wt, misuse, 64, Op::QuantQ8)
    }

    /// `graph` over rows of `k` values, quantized by `quant` (`quant_q8` or `quant_q8x2`).
    fn graph_k(wt: DType, misuse: bool, k: usize, quant: Op) -> Graph {
        let mut g = Graph::new("q");
        let tok = g.input(InputKind::Tokens);
        g.input(InputKind::Positions);
        let table = g.weight("table", &[8, k]);
        let x = g.add(Op::Embedding, &[table, tok]).unwrap();
        let q = g.add(quant, &[x]).unwrap();
        let w = g.weight_typed("w", wt, &[16, k]);
        let y = if misuse { g.add(Op::Silu, &[q]).unwrap() } else { g.add(Op::MatMul, &[q, w]).unwrap() };
        g.output("logits", y);
        g
    }

    #[test]
    fn quant_q8_lowers_into_int8_projections_only() {
        let p = lower(&graph(DType::Q8_0, false)).unwrap();
        assert!(p.kernels.iter().any(|k| matches!(k, KernelSpec::MatMul { xq: 1, .. })));
        assert_eq!(p.layout_of("w"), Layout::Dot16);
        let e = lower(&graph(DType::F32, false)).unwrap_err().to_string();
        assert!(e.contains("int8 projections need a blocked type (q8_0, q4_0, q4_1, q5_1, q6_k)"), "{e}");
        let e = lower(&graph(DType::Q8_0, true)).unwrap_err().to_string();
        assert!(e.contains("only the input of a projection"), "{e}");
    }

    /// `quant_q8x2` lowers into the same kernels with two terms; rows wider than the int8
    /// prologue's stack buffer takes are an error, not a kernel that overflows the stack.
    #[test]
    fn int8_terms_and_row_bound() {
        let p = lower(&graph_k(DType::Q8_0, false, 64, Op::QuantQ8x2)).unwrap();
        assert!(p.kernels.iter().any(|k| matches!(k, KernelSpec::MatMul { xq: 2, .. })), "{:?}", p.kernels);
        let k = crate::kernels::dot::MAX_COLS;
        assert!(lower(&graph_k(DType::Q8_0, false, k, Op::QuantQ8x2)).is_ok());
        let e = lower(&graph_k(DType::Q8_0, false, k + 32, Op::QuantQ8)).unwrap_err().to_string();
        assert!(e.contains("at most 65536 columns"), "{e}");
    }

    /// A MoE layer whose expert rows would not fit the expert kernels' gather buffer is an
    /// error (the kernels would otherwise take megabytes of stack).
    #[test]
    fn moe_row_bound() {
        let moe = |ff: usize| {
            let mut g = Graph::new("m");
            let tok = g.input(InputKind::Tokens);
            g.input(InputKind::Positions);
            let table = g.weight("table", &[8, 32]);
            let x = g.add(Op::Embedding, &[table, tok]).unwrap();
            let router = g.weight("router", &[4, 32]);
            let gu = g.weight("gu", &[4, 2 * ff, 32]);
            let down = g.weight("down", &[4, 32, ff]);
            let y = g.add(Op::Moe { experts: 4, top_k: 2 }, &[x, router, gu, down]).unwrap();
            g.output("logits", y);
            lower(&g)
        };
        assert!(moe(64).is_ok());
        let e = moe(crate::kernels::moe::GATHER_BYTES / 4 + 8).unwrap_err().to_string();
        assert!(e.contains("exceed"), "{e}");
    }
}
