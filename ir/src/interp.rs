//! The reference interpreter: executes any graph on plain f32 arrays with obvious loops.
//!
//! It is the oracle every pass and every JIT kernel is checked against, so it favours clarity
//! over speed: reductions accumulate in f64, nothing is fused, nothing is clever.

use std::collections::HashMap;

use crate::error::IrError;
use crate::graph::{Graph, NodeId};
use crate::op::{Act, InputKind, Op};

/// Where weights come from at run time: a name → row-major f32 data with its shape.
pub trait WeightSource {
    fn weight(&self, name: &str) -> Option<(&[f32], &[usize])>;
    /// Raw bytes of a `u8` weight (BitNet's packed ternary matrices).
    fn bytes(&self, _name: &str) -> Option<&[u8]> {
        None
    }
}

/// f32 weights plus byte weights (for tests and compile-time evaluation).
pub struct Weights<'a> {
    pub f32: &'a HashMap<String, Tensor>,
    pub u8: &'a HashMap<String, Vec<u8>>,
}

impl WeightSource for Weights<'_> {
    fn weight(&self, name: &str) -> Option<(&[f32], &[usize])> {
        self.f32.weight(name)
    }
    fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.u8.get(name).map(Vec::as_slice)
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn weight(&self, name: &str) -> Option<(&[f32], &[usize])> {
        self.get(name).map(|t| (t.data.as_slice(), t.shape.as_slice()))
    }
}

/// A dense f32 tensor (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The keys and values of one attention layer: `[kv_heads, ctx, head_dim]` each.
#[derive(Clone, Debug)]
pub struct LayerKv {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Per-sequence state of every attention layer, sized for `ctx` positions.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub ctx: usize,
    pub layers: HashMap<usize, LayerKv>,
    /// Mamba2 layers: the conv window `[d_conv - 1, channels]` and the SSM state
    /// `[heads, head_dim, d_state]`.
    pub mamba: HashMap<usize, (Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// A zeroed cache for the attention layers of `g`, `ctx` positions each.
    pub fn new(g: &Graph, ctx: usize) -> KvCache {
        let layers = g
            .kv_layers()
            .into_iter()
            .map(|(l, kv_heads, head_dim)| {
                let len = kv_heads * ctx * head_dim;
                (l, LayerKv { kv_heads, head_dim, k: vec![0.0; len], v: vec![0.0; len] })
            })
            .collect();
        let mamba = g
            .mamba_layers()
            .into_iter()
            .map(|(l, channels, d_conv, state)| (l, (vec![0.0; (d_conv - 1) * channels], vec![0.0; state])))
            .collect();
        KvCache { ctx, layers, mamba }
    }
}

/// The inputs of one step: `n` tokens and their positions.
#[derive(Clone, Copy, Debug)]
pub struct StepInput<'a> {
    pub tokens: &'a [i32],
    pub positions: &'a [i32],
}

enum Val<'w> {
    Ids(Vec<i32>),
    Bytes(&'w [u8]),
    Owned(Tensor),
    Borrowed(&'w [f32], &'w [usize]),
}

impl Val<'_> {
    fn f32(&self) -> Result<(&[f32], &[usize]), IrError> {
        match self {
            Val::Owned(t) => Ok((&t.data, &t.shape)),
            Val::Borrowed(d, s) => Ok((d, s)),
            Val::Ids(_) | Val::Bytes(_) => Err(IrError::Interp("expected an f32 value".into())),
        }
    }
    fn ids(&self) -> Result<&[i32], IrError> {
        match self {
            Val::Ids(v) => Ok(v),
            _ => Err(IrError::Interp("expected i32 ids".into())),
        }
    }
}

fn bad(msg: impl Into<String>) -> IrError {
    IrError::Interp(msg.into())
}

/// Runs one step of `g` over one sequence, updating `cache`, and returns the graph's named
/// outputs.
pub fn run(
    g: &Graph,
    step: StepInput<'_>,
    weights: &dyn WeightSource,
    cache: &mut KvCache,
) -> Result<HashMap<String, Tensor>, IrError> {
    let seqs = vec![0; step.tokens.len()];
    run_batch(g, step, &seqs, weights, std::slice::from_mut(cache))
}

/// Runs one step of `g` over the rows of several sequences: row `t` belongs to sequence
/// `seqs[t]`, whose state is `caches[seqs[t]]`; each sequence's rows are contiguous (see
/// [`seq_runs`]). Stateful ops read and write each row's own sequence's state; `take_last`
/// gives each sequence's last row, in row order.
pub fn run_batch(
    g: &Graph,
    step: StepInput<'_>,
    seqs: &[i32],
    weights: &dyn WeightSource,
    caches: &mut [KvCache],
) -> Result<HashMap<String, Tensor>, IrError> {
    let n = step.tokens.len();
    if step.positions.len() != n || seqs.len() != n {
        return Err(bad(format!("{n} tokens but {} positions and {} seqs", step.positions.len(), seqs.len())));
    }
    let s = seq_runs(seqs, caches.len())?.len();
    let order = g.topo_order()?;
    // Remaining uses of each value, so intermediates are freed as soon as possible.
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in g.operands(id) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for (_, o) in &g.outputs {
        *uses.entry(*o).or_default() += 1;
    }
    let mut vals: HashMap<NodeId, Val<'_>> = HashMap::new();
    for &id in &order {
        let node = g.node(id);
        let operands = g.operands(id);
        let val = {
            let args: Vec<&Val<'_>> = operands.iter().map(|o| &vals[o]).collect();
            let shape = node.ty.shape.resolve_step(n, s);
            eval(&node.op, node.ty.dtype, &args, (step, seqs), weights, caches, n, &shape)?
        };
        vals.insert(id, val);
        for o in operands {
            let u = uses.get_mut(&o).ok_or_else(|| bad("use count"))?;
            *u -= 1;
            if *u == 0 {
                vals.remove(&o);
            }
        }
    }
    let mut out = HashMap::new();
    for (name, id) in &g.outputs {
        let (d, s) = vals.get(id).ok_or_else(|| bad(format!("output {name} not computed")))?.f32()?;
        out.insert(name.clone(), Tensor { shape: s.to_vec(), data: d.to_vec() });
    }
    Ok(out)
}

fn owned(shape: Vec<usize>, data: Vec<f32>) -> Val<'static> {
    Val::Owned(Tensor { shape, data })
}

/// Dot product accumulated in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn silu(v: f32) -> f32 {
    (v as f64 / (1.0 + (-(v as f64)).exp())) as f32
}

fn gelu_tanh(v: f32) -> f32 {
    let v = v as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())) as f32
}

fn gelu_erf(v: f32) -> f32 {
    let v = v as f64;
    (0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))) as f32
}

/// `(x · wᵀ) · s + bias` per row, `s` = the RMS prologue's `1/sqrt(mean(x²) + eps)` or 1.
fn project(x: &[f32], k: usize, w: &[f32], r: usize, rms_eps: Option<f32>, bias: Option<&[f32]>) -> Vec<f32> {
    let rows = x.len() / k.max(1);
    let mut y = vec![0f32; rows * r];
    for t in 0..rows {
        let xr = &x[t * k..(t + 1) * k];
        let s = rms_eps.map_or(1.0, |eps| 1.0 / (dot(xr, xr) / k as f64 + eps as f64).sqrt());
        for o in 0..r {
            let mut acc = dot(xr, &w[o * k..(o + 1) * k]) * s;
            if let Some(b) = bias {
                acc += b[o] as f64;
            }
            y[t * r + o] = acc as f32;
        }
    }
    y
}

/// Top-k routing: softmax over all experts, the k largest (lowest index first on ties),
/// renormalized. Returns (experts, weights).
pub fn route(x: &[f32], router: &[f32], experts: usize, top_k: usize) -> (Vec<usize>, Vec<f32>) {
    let d = x.len();
    let logits: Vec<f64> = (0..experts).map(|e| dot(x, &router[e * d..(e + 1) * d])).collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.truncate(top_k);
    let sum: f64 = order.iter().map(|&e| p[e]).sum();
    let w = order.iter().map(|&e| (p[e] / sum) as f32).collect();
    (order, w)
}

/// The rows of each sequence of a step, in row order: `(sequence, rows)`. Every sequence must
/// name one of the `count` states and have its rows contiguous (a sequence appearing in two
/// runs is an error).
pub fn seq_runs(seqs: &[i32], count: usize) -> Result<Vec<(usize, std::ops::Range<usize>)>, IrError> {
    let mut runs: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for (t, &sq) in seqs.iter().enumerate() {
        if sq < 0 || sq as usize >= count {
            return Err(bad(format!("row {t} names sequence {sq}, but the step has {count} sequence states")));
        }
        let sq = sq as usize;
        match runs.last_mut() {
            Some((last, r)) if *last == sq => r.end = t + 1,
            _ => {
                if runs.iter().any(|(o, _)| *o == sq) {
                    return Err(bad(format!("the rows of sequence {sq} are not contiguous")));
                }
                runs.push((sq, t..t + 1));
            }
        }
    }
    Ok(runs)
}

/// Writes this step's keys and values into the cache of `layer` at their positions.
fn kv_append(cache: &mut KvCache, layer: usize, k: &[f32], v: &[f32], kvw: usize, pos: &[i32]) -> Result<(), IrError> {
    let ctx = cache.ctx;
    let lkv = cache.layers.get_mut(&layer).ok_or_else(|| bad(format!("no KV cache for layer {layer}")))?;
    let hd = lkv.head_dim;
    for (r, &p) in pos.iter().enumerate() {
        if p < 0 || p as usize >= ctx {
            return Err(IrError::ContextOverflow { pos: p.max(0) as usize, ctx });
        }
        for h in 0..kvw / hd {
            let dst = (h * ctx + p as usize) * hd;
            lkv.k[dst..dst + hd].copy_from_slice(&k[r * kvw + h * hd..r * kvw + (h + 1) * hd]);
            lkv.v[dst..dst + hd].copy_from_slice(&v[r * kvw + h * hd..r * kvw + (h + 1) * hd]);
        }
    }
    Ok(())
}

/// Causal (optionally windowed) softmax attention of `q` over the cache of `layer`.
#[allow(clippy::too_many_arguments)]
fn attend(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    pos: &[i32],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<Vec<f32>, IrError> {
    let ctx = cache.ctx;
    let lkv = cache.layers.get(&layer).ok_or_else(|| bad(format!("no KV cache for layer {layer}")))?;
    let group = heads / kv_heads;
    let qw = heads * hd;
    let mut out = vec![0f32; pos.len() * qw];
    for (r, &p) in pos.iter().enumerate() {
        if p < 0 || p as usize >= ctx {
            return Err(IrError::ContextOverflow { pos: p.max(0) as usize, ctx });
        }
        let p = p as usize;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..heads {
            let kh = h / group;
            let qv = &q[r * qw + h * hd..r * qw + (h + 1) * hd];
            let scores: Vec<f64> = (lo..=p)
                .map(|j| dot(qv, &lkv.k[(kh * ctx + j) * hd..(kh * ctx + j + 1) * hd]) * scale as f64)
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for dd in 0..hd {
                let acc: f64 = (lo..=p).zip(&exps).map(|(j, e)| e * lkv.v[(kh * ctx + j) * hd + dd] as f64).sum();
                out[r * qw + h * hd + dd] = (acc / sum) as f32;
            }
        }
    }
    Ok(out)
}

fn map_rows(x: &[f32], shape: &[usize], f: impl Fn(f32) -> f32) -> Val<'static> {
    owned(shape.to_vec(), x.iter().map(|&v| f(v)).collect())
}

#[allow(clippy::too_many_arguments)]
fn eval<'w>(
    op: &Op,
    dtype: crate::types::DType,
    args: &[&Val<'w>],
    (step, seqs): (StepInput<'_>, &[i32]),
    weights: &'w dyn WeightSource,
    caches: &mut [KvCache],
    n: usize,
    out_shape: &[usize],
) -> Result<Val<'w>, IrError> {
    Ok(match op {
        Op::Input(InputKind::Tokens) => Val::Ids(step.tokens.to_vec()),
        Op::Input(InputKind::Positions) => Val::Ids(step.positions.to_vec()),
        Op::Input(InputKind::Seqs) => Val::Ids(seqs.to_vec()),
        Op::Weight { name } if dtype == crate::types::DType::U8 => {
            let b = weights.bytes(name).ok_or_else(|| IrError::MissingWeight(name.clone()))?;
            if b.len() != out_shape.iter().product::<usize>() {
                return Err(IrError::WeightShape {
                    name: name.clone(),
                    expected: out_shape.to_vec(),
                    actual: vec![b.len()],
                });
            }
            Val::Bytes(b)
        }
        Op::Weight { name } => {
            let (d, s) = weights.weight(name).ok_or_else(|| IrError::MissingWeight(name.clone()))?;
            if s != out_shape || d.len() != out_shape.iter().product::<usize>() {
                return Err(IrError::WeightShape {
                    name: name.clone(),
                    expected: out_shape.to_vec(),
                    actual: s.to_vec(),
                });
            }
            Val::Borrowed(d, s)
        }
        Op::Embedding => {
            let (table, ts) = args[0].f32()?;
            let ids = args[1].ids()?;
            let (vocab, d) = (ts[0], ts[1]);
            let mut out = Vec::with_capacity(n * d);
            for &t in ids {
                if t < 0 || t as usize >= vocab {
                    return Err(bad(format!("index {t} is outside the embedding table of {vocab} rows")));
                }
                out.extend_from_slice(&table[t as usize * d..(t as usize + 1) * d]);
            }
            owned(vec![ids.len(), d], out)
        }
        Op::MatMul => {
            let (x, xs) = args[0].f32()?;
            let (w, ws) = args[1].f32()?;
            let bias = match args.get(2) {
                Some(b) => Some(b.f32()?.0),
                None => None,
            };
            let (rows, k, m) = (xs[0], xs[1], ws[0]);
            let mut out = vec![0f32; rows * m];
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for o in 0..m {
                    let mut acc = dot(xr, &w[o * k..(o + 1) * k]);
                    if let Some(b) = bias {
                        acc += b[o] as f64;
                    }
                    out[r * m + o] = acc as f32;
                }
            }
            owned(vec![rows, m], out)
        }
        Op::RmsNorm { eps } => {
            let (x, xs) = args[0].f32()?;
            let (w, _) = args[1].f32()?;
            let d = xs[1];
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(d) {
                let ms = dot(row, row) / d as f64;
                let inv = 1.0 / (ms + *eps as f64).sqrt();
                out.extend(row.iter().zip(w).map(|(&v, &s)| ((v as f64 * inv) as f32) * s));
            }
            owned(xs.to_vec(), out)
        }
        Op::LayerNorm { eps } => {
            let (x, xs) = args[0].f32()?;
            let ones = vec![1f32; xs[1]];
            let zeros = vec![0f32; xs[1]];
            let (w, b) = if args.len() == 3 { (args[1].f32()?.0, args[2].f32()?.0) } else { (&ones[..], &zeros[..]) };
            let d = xs[1];
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(d) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + *eps as f64).sqrt();
                out.extend(row.iter().zip(w).zip(b).map(|((&v, &s), &o)| ((v as f64 - mean) * inv) as f32 * s + o));
            }
            owned(xs.to_vec(), out)
        }
        Op::Rope { heads, head_dim, rotary_dim, theta, scaling } => {
            let (x, xs) = args[0].f32()?;
            let pos = args[1].ids()?;
            let inv_freq = scaling.inv_freq(*theta, *rotary_dim);
            let half = rotary_dim / 2;
            let mut out = x.to_vec();
            let width = heads * head_dim;
            for (r, &p) in pos.iter().enumerate() {
                let p = p as f32 / scaling.position_divisor();
                for h in 0..*heads {
                    let base = r * width + h * head_dim;
                    for i in 0..half {
                        // transformers: freqs = pos * inv_freq in f32, cos/sin of that in f32.
                        let angle = (p * inv_freq[i]) as f64;
                        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                        let a = x[base + i];
                        let b = x[base + i + half];
                        out[base + i] = a * cos - b * sin;
                        out[base + i + half] = b * cos + a * sin;
                    }
                }
            }
            owned(xs.to_vec(), out)
        }
        Op::Attention { layer, heads, kv_heads, head_dim, window, scale } => {
            let (q, _) = args[0].f32()?;
            let (k, _) = args[1].f32()?;
            let (v, _) = args[2].f32()?;
            let pos = args[3].ids()?;
            let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
            let mut out = Vec::with_capacity(pos.len() * qw);
            for (sq, r) in seq_runs(args[4].ids()?, caches.len())? {
                let (kr, vr) = (&k[r.start * kw..r.end * kw], &v[r.start * kw..r.end * kw]);
                kv_append(&mut caches[sq], *layer, kr, vr, kw, &pos[r.clone()])?;
                let qr = &q[r.start * qw..r.end * qw];
                out.extend(attend(&caches[sq], *layer, qr, &pos[r], *heads, *kv_heads, *head_dim, *window, *scale)?);
            }
            owned(vec![pos.len(), qw], out)
        }
        Op::Attend { layer, heads, kv_heads, head_dim, window, scale } => {
            let (q, _) = args[0].f32()?;
            let pos = args[1].ids()?;
            let qw = heads * head_dim;
            let mut out = Vec::with_capacity(pos.len() * qw);
            for (sq, r) in seq_runs(args[2].ids()?, caches.len())? {
                let qr = &q[r.start * qw..r.end * qw];
                out.extend(attend(&caches[sq], *layer, qr, &pos[r], *heads, *kv_heads, *head_dim, *window, *scale)?);
            }
            owned(vec![pos.len(), qw], out)
        }
        Op::Linear { rms_eps, act, bias, residual } => {
            let (x, xs) = args[0].f32()?;
            let (w, ws) = args[1].f32()?;
            let b = if *bias { Some(args[2].f32()?.0) } else { None };
            let y = project(x, xs[1], w, ws[0], *rms_eps, b);
            let rows = xs[0];
            let (r, m) = (ws[0], out_shape[1]);
            let mut out = vec![0f32; rows * m];
            for t in 0..rows {
                let yr = &y[t * r..(t + 1) * r];
                for j in 0..m {
                    out[t * m + j] = match act {
                        Act::None => yr[j],
                        Act::Gelu => gelu_tanh(yr[j]),
                        Act::GeluErf => gelu_erf(yr[j]),
                        Act::SwiGlu => {
                            let g = 16 * (j / 8) + j % 8;
                            silu(yr[g]) * yr[g + 8]
                        }
                    };
                }
            }
            if *residual {
                let (res, _) = args[args.len() - 1].f32()?;
                for (o, r) in out.iter_mut().zip(res) {
                    *o += r;
                }
            }
            owned(vec![rows, m], out)
        }
        Op::QkvRope { layer, heads, kv_heads, head_dim, rotary_dim, theta, scaling, rms_eps, bias } => {
            let (x, xs) = args[0].f32()?;
            let (w, ws) = args[1].f32()?;
            let b = if *bias { Some(args[2].f32()?.0) } else { None };
            let pos = args[args.len() - 2].ids()?;
            let runs = seq_runs(args[args.len() - 1].ids()?, caches.len())?;
            let r = ws[0];
            let mut y = project(x, xs[1], w, r, *rms_eps, b);
            let hd = *head_dim;
            let inv_freq = scaling.inv_freq(*theta, *rotary_dim);
            // RoPE on pairs (2i, 2i+1) of every q and k head.
            for (t, &p) in pos.iter().enumerate() {
                let pf = p as f32 / scaling.position_divisor();
                for h in 0..heads + kv_heads {
                    let base = t * r + h * hd;
                    for (i, f) in inv_freq.iter().enumerate() {
                        let angle = (pf * f) as f64;
                        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                        let (a, bb) = (y[base + 2 * i], y[base + 2 * i + 1]);
                        y[base + 2 * i] = a * cos - bb * sin;
                        y[base + 2 * i + 1] = bb * cos + a * sin;
                    }
                }
            }
            let (qw, kw) = (heads * hd, kv_heads * hd);
            let mut q = Vec::with_capacity(pos.len() * qw);
            let mut k = Vec::with_capacity(pos.len() * kw);
            let mut v = Vec::with_capacity(pos.len() * kw);
            for t in 0..pos.len() {
                let row = &y[t * r..(t + 1) * r];
                q.extend_from_slice(&row[..qw]);
                k.extend_from_slice(&row[qw..qw + kw]);
                v.extend_from_slice(&row[qw + kw..]);
            }
            for (sq, rr) in runs {
                let (kr, vr) = (&k[rr.start * kw..rr.end * kw], &v[rr.start * kw..rr.end * kw]);
                kv_append(&mut caches[sq], *layer, kr, vr, kw, &pos[rr])?;
            }
            owned(vec![pos.len(), qw], q)
        }
        Op::ConcatRows => {
            let mut data = Vec::new();
            for a in args {
                data.extend_from_slice(a.f32()?.0);
            }
            owned(out_shape.to_vec(), data)
        }
        Op::ConcatCols => {
            let parts: Vec<(&[f32], &[usize])> = args.iter().map(|a| a.f32()).collect::<Result<_, _>>()?;
            let mut data = Vec::with_capacity(out_shape.iter().product());
            for r in 0..out_shape[0] {
                for (d, s) in &parts {
                    data.extend_from_slice(&d[r * s[1]..(r + 1) * s[1]]);
                }
            }
            owned(out_shape.to_vec(), data)
        }
        Op::InterleaveRows8 => {
            let (a, s) = args[0].f32()?;
            let (b, _) = args[1].f32()?;
            let width = s[1..].iter().product::<usize>();
            let block = 8 * width;
            let mut data = Vec::with_capacity(2 * a.len());
            for (ca, cb) in a.chunks(block).zip(b.chunks(block)) {
                data.extend_from_slice(ca);
                data.extend_from_slice(cb);
            }
            owned(out_shape.to_vec(), data)
        }
        Op::Mamba2 { layer, heads, head_dim, d_state, groups, d_conv, chunk, eps } => {
            let (zx, zs) = args[0].f32()?;
            let p: Vec<&[f32]> = args[1..7].iter().map(|a| a.f32().map(|v| v.0)).collect::<Result<_, _>>()?;
            let width = zs[1];
            let mut out = Vec::with_capacity(zs[0] * heads * head_dim);
            for (sq, r) in seq_runs(args[7].ids()?, caches.len())? {
                let (conv, ssm) =
                    caches[sq].mamba.get_mut(layer).ok_or_else(|| bad(format!("no Mamba2 state for layer {layer}")))?;
                let attrs = (heads, head_dim, d_state, groups, d_conv, chunk, eps);
                out.extend(mamba2_rows(attrs, &zx[r.start * width..r.end * width], width, &p, conv, ssm));
            }
            owned(vec![zs[0], heads * head_dim], out)
        }
        Op::RoundBf16 => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, |v| half::bf16::from_f32(v).to_f32())
        }
        Op::Relu2 => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, |v| {
                let r = v.max(0.0);
                r * r
            })
        }
        Op::BitLinear => {
            let (x, xs) = args[0].f32()?;
            let Val::Bytes(w) = args[1] else { return Err(bad("bit_linear weight must be bytes")) };
            let (scale, _) = args[2].f32()?;
            let (rows, k, m) = (xs[0], xs[1], out_shape[1]);
            let quarter = m / 4;
            let mut out = vec![0f32; rows * m];
            for t in 0..rows {
                let xr = &x[t * k..(t + 1) * k];
                let max = xr.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-5);
                let s = 127.0f32 / max;
                let q: Vec<i64> = xr.iter().map(|&v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i64).collect();
                for r in 0..quarter {
                    for i in 0..4 {
                        let acc: i64 = (0..k).map(|c| (((w[r * k + c] >> (2 * i)) & 3) as i64 - 1) * q[c]).sum();
                        out[t * m + r + i * quarter] = acc as f32 / (scale[0] * s);
                    }
                }
            }
            owned(vec![rows, m], out)
        }
        Op::InterleaveHalves8 => {
            let (w, ws) = args[0].f32()?;
            let (r, c) = (ws[ws.len() - 2], ws[ws.len() - 1]);
            let half = r / 2;
            let mut data = Vec::with_capacity(w.len());
            for m in w.chunks(r * c) {
                for blk in 0..half / 8 {
                    data.extend_from_slice(&m[blk * 8 * c..(blk + 1) * 8 * c]);
                    data.extend_from_slice(&m[(half + blk * 8) * c..(half + (blk + 1) * 8) * c]);
                }
            }
            owned(ws.to_vec(), data)
        }
        Op::Stack => {
            let mut data = Vec::new();
            for a in args {
                data.extend_from_slice(a.f32()?.0);
            }
            owned(out_shape.to_vec(), data)
        }
        Op::Moe { experts, top_k } => {
            let (x, xs) = args[0].f32()?;
            let (router, _) = args[1].f32()?;
            let (gu, gs) = args[2].f32()?;
            let (down, _) = args[3].f32()?;
            let (rows, d, ff) = (xs[0], xs[1], gs[1] / 2);
            let mut out = vec![0f32; rows * d];
            for t in 0..rows {
                let xr = &x[t * d..(t + 1) * d];
                let (idx, w) = route(xr, router, *experts, *top_k);
                for (&e, &we) in idx.iter().zip(&w) {
                    let gue = &gu[e * 2 * ff * d..(e + 1) * 2 * ff * d];
                    let h: Vec<f32> = (0..ff)
                        .map(|j| {
                            let g = 16 * (j / 8) + j % 8;
                            let gate = dot(xr, &gue[g * d..(g + 1) * d]) as f32;
                            let up = dot(xr, &gue[(g + 8) * d..(g + 9) * d]) as f32;
                            silu(gate) * up
                        })
                        .collect();
                    let de = &down[e * d * ff..(e + 1) * d * ff];
                    for o in 0..d {
                        out[t * d + o] += (we as f64 * dot(&h, &de[o * ff..(o + 1) * ff])) as f32;
                    }
                }
            }
            owned(vec![rows, d], out)
        }
        Op::ScaleCols => {
            let (w, ws) = args[0].f32()?;
            let (sc, _) = args[1].f32()?;
            let k = ws[1];
            owned(ws.to_vec(), w.iter().enumerate().map(|(i, &x)| x * sc[i % k]).collect())
        }
        Op::WeightMatVec => {
            let (w, ws) = args[0].f32()?;
            let (v, _) = args[1].f32()?;
            let k = ws[1];
            owned(vec![ws[0]], (0..ws[0]).map(|o| dot(&w[o * k..(o + 1) * k], v) as f32).collect())
        }
        Op::RopeInterleave { heads, kv_heads, head_dim, rotary_dim } => {
            let (w, ws) = args[0].f32()?;
            let width = ws[1..].iter().product::<usize>();
            let mut data = w.to_vec();
            let half = rotary_dim / 2;
            for h in 0..heads + kv_heads {
                let base = h * head_dim;
                for i in 0..half {
                    for (dst, src) in [(2 * i, i), (2 * i + 1, i + half)] {
                        let (d, s) = ((base + dst) * width, (base + src) * width);
                        data[d..d + width].copy_from_slice(&w[s..s + width]);
                    }
                }
            }
            owned(ws.to_vec(), data)
        }
        Op::Softmax => {
            let (x, xs) = args[0].f32()?;
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(xs[1]) {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                out.extend(row.iter().map(|&v| ((v as f64 - max).exp() / sum) as f32));
            }
            owned(xs.to_vec(), out)
        }
        Op::Silu => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, silu)
        }
        Op::Gelu => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, gelu_tanh)
        }
        Op::GeluErf => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, gelu_erf)
        }
        Op::Add | Op::Mul => {
            let (a, s) = args[0].f32()?;
            let (b, _) = args[1].f32()?;
            let f = if matches!(op, Op::Add) { |x: f32, y: f32| x + y } else { |x: f32, y: f32| x * y };
            owned(s.to_vec(), a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect())
        }
        Op::Scale { factor } => {
            let (x, xs) = args[0].f32()?;
            map_rows(x, xs, |v| v * factor)
        }
        Op::Slice { start, len } => {
            let (x, xs) = args[0].f32()?;
            let mut out = Vec::with_capacity(xs[0] * len);
            for row in x.chunks(xs[1]) {
                out.extend_from_slice(&row[*start..start + len]);
            }
            owned(vec![xs[0], *len], out)
        }
        Op::Concat => {
            let parts: Vec<(&[f32], &[usize])> = args.iter().map(|a| a.f32()).collect::<Result<_, _>>()?;
            let rows = parts[0].1[0];
            let width: usize = parts.iter().map(|p| p.1[1]).sum();
            let mut out = Vec::with_capacity(rows * width);
            for r in 0..rows {
                for (d, s) in &parts {
                    out.extend_from_slice(&d[r * s[1]..(r + 1) * s[1]]);
                }
            }
            owned(vec![rows, width], out)
        }
        Op::QuantQ8 => {
            let (x, xs) = args[0].f32()?;
            owned(xs.to_vec(), crate::quant::round_trip_act_q8(x))
        }
        Op::QuantQ8x2 => {
            let (x, xs) = args[0].f32()?;
            owned(xs.to_vec(), crate::quant::round_trip_act_q8x2(x))
        }
        Op::TakeLast => {
            let (x, xs) = args[0].f32()?;
            let d = xs[1];
            let runs = seq_runs(args[1].ids()?, caches.len())?;
            if runs.is_empty() {
                return Err(bad("take_last of an empty step"));
            }
            let mut out = Vec::with_capacity(runs.len() * d);
            for (_, r) in &runs {
                out.extend_from_slice(&x[(r.end - 1) * d..r.end * d]);
            }
            owned(vec![runs.len(), d], out)
        }
    })
}

/// The Mamba2 mixer (`Op::Mamba2`'s semantics) over the rows of one sequence, through that
/// sequence's conv window and SSM state. `p`: conv weight, conv bias, dt_bias, A_log, D, norm
/// weight.
#[allow(clippy::too_many_arguments)]
fn mamba2_rows(
    (heads, head_dim, d_state, groups, d_conv, chunk, eps): (&usize, &usize, &usize, &usize, &usize, &usize, &f32),
    zx: &[f32],
    width: usize,
    p: &[&[f32]],
    conv: &mut [f32],
    ssm: &mut [f32],
) -> Vec<f32> {
    let (conv_w, conv_b, dt_bias, a_log, dd, norm_w) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let (h, hd, s_, k) = (*heads, *head_dim, *d_state, *d_conv);
    let (n, i_, gs) = (zx.len() / width, h * hd, groups * s_);
    let ch = i_ + 2 * gs;
    // 1. per token: causal depthwise conv over [window..., x_t] + SiLU; dt = softplus
    let mut act = vec![0f64; n * ch];
    let mut dts = vec![0f64; n * h];
    for t in 0..n {
        let row = &zx[t * width..(t + 1) * width];
        let (xbc, dt) = (&row[i_..i_ + ch], &row[i_ + ch..]);
        for c in 0..ch {
            let mut acc = conv_b[c] as f64;
            for j in 0..k {
                let v = if j + 1 == k { xbc[c] } else { conv[j * ch + c] };
                acc += conv_w[c * k + j] as f64 * v as f64;
            }
            act[t * ch + c] = silu(acc as f32) as f64;
        }
        for j in 0..k.saturating_sub(2) {
            for c in 0..ch {
                conv[j * ch + c] = conv[(j + 1) * ch + c];
            }
        }
        if k > 1 {
            conv[(k - 2) * ch..(k - 1) * ch].copy_from_slice(xbc);
        }
        for head in 0..h {
            let v = dt[head] as f64 + dt_bias[head] as f64;
            dts[t * h + head] = if v > 20.0 { v } else { v.exp().ln_1p() };
        }
    }
    // 2. the SSM: the recurrence for one token, the chunked (SSD) form for more
    let mut y = vec![0f64; n * i_];
    let xi = |t: usize, head: usize, pd: usize| act[t * ch + head * hd + pd];
    let bi = |t: usize, g: usize, sx: usize| act[t * ch + i_ + g * s_ + sx];
    let ci = |t: usize, g: usize, sx: usize| act[t * ch + i_ + gs + g * s_ + sx];
    for head in 0..h {
        let g = head / (h / groups);
        let a = -(a_log[head] as f64).exp();
        let mut t0 = 0;
        while t0 < n {
            let len = if n == 1 { 1 } else { (*chunk).min(n - t0) };
            // running log-decay s_τ within the chunk
            let mut s = vec![0f64; len];
            let mut acc = 0f64;
            for (u, su) in s.iter_mut().enumerate() {
                acc += dts[(t0 + u) * h + head] * a;
                *su = acc;
            }
            for pd in 0..hd {
                let st = &mut ssm[(head * hd + pd) * s_..(head * hd + pd + 1) * s_];
                for t in 0..len {
                    // intra-chunk: Σ_{τ≤t} (C_t·B_τ) e^{s_t - s_τ} dt_τ x_τ
                    let mut yt = 0f64;
                    for tau in 0..=t {
                        let cb: f64 = (0..s_).map(|sx| ci(t0 + t, g, sx) * bi(t0 + tau, g, sx)).sum();
                        yt += cb * (s[t] - s[tau]).exp() * dts[(t0 + tau) * h + head] * xi(t0 + tau, head, pd);
                    }
                    // inter-chunk: e^{s_t} C_t · h_prev
                    let ch_prev: f64 = (0..s_).map(|sx| ci(t0 + t, g, sx) * st[sx] as f64).sum();
                    yt += s[t].exp() * ch_prev + dd[head] as f64 * xi(t0 + t, head, pd);
                    y[(t0 + t) * i_ + head * hd + pd] = yt;
                }
                // carry the state to the end of the chunk
                let last = s[len - 1];
                for (sx, stv) in st.iter_mut().enumerate() {
                    let mut nv = last.exp() * *stv as f64;
                    for tau in 0..len {
                        nv += (last - s[tau]).exp()
                            * dts[(t0 + tau) * h + head]
                            * xi(t0 + tau, head, pd)
                            * bi(t0 + tau, g, sx);
                    }
                    *stv = nv as f32;
                }
            }
            t0 += len;
        }
    }
    // 3. gated RMSNorm over the whole inner dim, not per group (transformers' semantics,
    // see the op's doc): norm_w · rms(y · silu(z))
    let mut out = vec![0f32; n * i_];
    for t in 0..n {
        let z = &zx[t * width..t * width + i_];
        let gated: Vec<f64> = (0..i_).map(|c| y[t * i_ + c] * silu(z[c]) as f64).collect();
        let ms = gated.iter().map(|v| v * v).sum::<f64>() / i_ as f64;
        let inv = 1.0 / (ms + *eps as f64).sqrt();
        for c in 0..i_ {
            out[t * i_ + c] = norm_w[c] * (gated[c] * inv) as f32;
        }
    }
    out
}
