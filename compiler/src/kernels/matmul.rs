//! Projections over the Panel16 layout: `y[t, o] = Σ_k x[t, k] · W[o, k]`, with a fused
//! prologue (RMS scale of the input row) and epilogue (bias, activation, residual, or — for
//! `qkv_rope` — RoPE and the KV-cache write).
//!
//! Units are 16-row panels of W. For each panel the k loop broadcasts one activation and
//! multiplies it into the panel's 16 weights (four f32x4, one 64-byte line):
//! - decode (and tail tokens): 1 token × 16 rows = 4 accumulators, k unrolled by two into a
//!   second set so two independent FMA chains keep more loads in flight;
//! - prefill: 4 tokens × 8 rows (half a panel) = 8 accumulators (2 tokens × 16 rows for
//!   SwiGLU, whose outputs need both halves), so each weight vector feeds several FMAs.
//!
//! Live vectors stay at ≤ 13 so Cranelift does not spill. The k loop walks pointers.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, ConstantData, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;

use super::elementwise::apply_unary;
use super::kb::{Kb, F32, I64, V4};
use crate::pack::{panel_bytes, PANEL};
use crate::program::{Act, Unary};
use llmc_ir::DType;

/// Most rows one call may have (the runtime's prefill chunk is at most this).
pub const MAX_ROWS: usize = 256;

pub struct Ctx {
    pub x: Value,
    pub bias: Option<Value>,
    pub kd: usize,
    /// Per-row RMS scale, in a stack array filled by the prologue.
    pub inv: Option<Value>,
    /// The weight's storage type (panels laid out as `pack::panel_bytes` says).
    pub wt: DType,
    /// Int8 activations (`quant_q8`, `quant_q8x2`; the weight is `Dot16`): the quantized rows.
    pub xq: Option<super::dot::Xq>,
    /// A SwiGLU projection with nothing else in its epilogue: its output and width, for the
    /// wide tiles' SwiGLU micro-kernel (`kernels::wide`).
    pub swiglu_out: Option<(Value, usize)>,
    /// The input is bf16-exact (`round_bf16`) over bf16 weights: the wide tiles may use
    /// `vdpbf16ps` (`micro::float_xbf16`).
    pub xbf16: bool,
}

impl Ctx {
    /// The context of a projection over `kd` columns of `x`: with `xq`, the int8 prologue's
    /// buffer (which also computes the RMS scale); otherwise the f32 RMS prologue, if any.
    pub fn new(
        k: &mut Kb<'_>,
        x: Value,
        bias: Option<Value>,
        kd: usize,
        rms_eps: Option<f32>,
        wt: DType,
        xq: u8,
    ) -> Ctx {
        if xq > 0 {
            let q = super::dot::setup(k, kd, rms_eps, xq as usize);
            Ctx { x, bias, kd, inv: q.inv.map(|(v, _)| v), wt, xq: Some(q), swiglu_out: None, xbf16: false }
        } else {
            let inv = rms_eps.map(|eps| rms_prologue(k, x, kd, eps));
            Ctx { x, bias, kd, inv, wt, xq: None, swiglu_out: None, xbf16: false }
        }
    }
}

/// The tile's results after prologue scale and bias: `(token offset, vector index, value)`.
pub type TileVals = Vec<(usize, usize, Value)>;

/// Computes one register tile: `tokens` rows starting at token `t`, vectors `v0..v0+nv` of
/// panel `p` (whose weights start at `wp`).
#[allow(clippy::too_many_arguments)]
pub fn tile(k: &mut Kb<'_>, c: &Ctx, p: Value, wp: Value, t: Value, tokens: usize, v0: usize, nv: usize) -> TileVals {
    if let Some(xq) = &c.xq {
        let accs = super::dot::tile_accs(k, c, xq, wp, t, tokens, v0, nv, 1);
        return finish_tile(k, c, p, t, &[accs], v0);
    }
    if c.wt != DType::F32 {
        let accs = super::storage::tile_accs(k, c, wp, t, tokens, v0, nv);
        return finish_tile(k, c, p, t, &[accs], v0);
    }
    let sets = if tokens == 1 && c.kd >= 2 { 2 } else { 1 };
    tile_sets(k, c, p, wp, t, tokens, v0, nv, sets)
}

/// Byte shuffles taking f32 lanes `[a0, b0, a1, b1]` and `[a2, b2, a3, b3]` of two vectors.
const INTERLEAVE_LO: [u8; 16] = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
const INTERLEAVE_HI: [u8; 16] = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];

fn le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little)
}

/// Decode over two neighbouring panels at once: two independent weight streams per k step
/// (more memory-level parallelism than one), 8 accumulators. f32, or bf16/f16 widened in
/// registers (`storage::widen4`).
fn tile_two_panels(k: &mut Kb<'_>, c: &Ctx, p: Value, wp: Value, t: Value) -> (TileVals, TileVals) {
    let zero = k.c(V4, 0.0);
    let accs: Vec<Vec<Variable>> = (0..2).map(|_| (0..4).map(|_| k.var(V4, zero)).collect()).collect();
    let x0 = k.at(c.x, t, (c.kd * 4) as i64);
    let wv = k.var(I64, wp);
    let xv = k.var(I64, x0);
    let es = if c.wt == DType::F32 { 4 } else { 2 };
    let wend = k.addi(wp, (c.kd * PANEL * es) as i64);
    let second = panel_bytes(c.wt, c.kd) as i64;
    let cs = super::storage::widen_consts(k, c.wt);
    k.for_ptr(wv, wend, |k| {
        let w = k.get(wv);
        let x = k.get(xv);
        let xs = k.ld(F32, x, 0);
        let xb = k.splat(xs);
        for (panel, acc) in accs.iter().enumerate() {
            let ws: Vec<Value> = if c.wt == DType::BF16 {
                // 8 rows per load, two bf16 per i32 lane: the even rows are the low halves
                // shifted up, the odd rows the high halves masked; accumulators hold
                // [even 0..8, odd 0..8, even 8..16, odd 8..16] until the tile's end.
                (0..2)
                    .flat_map(|h| {
                        let off = panel as i64 * second + h * 16;
                        let l = k.b.ins().load(types::I32X4, MemFlagsData::new().with_notrap(), w, off as i32);
                        let even = k.b.ins().ishl_imm_u(l, 16);
                        let odd = k.b.ins().band(l, cs.high16);
                        [even, odd].map(|v| k.b.ins().bitcast(V4, le(), v))
                    })
                    .collect()
            } else {
                (0..4)
                    .map(|j| {
                        let off = panel as i64 * second + (j * 4 * es) as i64;
                        if c.wt == DType::F32 {
                            k.ld(V4, w, off)
                        } else {
                            super::storage::widen4(k, c.wt, w, off, &cs)
                        }
                    })
                    .collect()
            };
            for (wj, a) in ws.into_iter().zip(acc) {
                let v = k.get(*a);
                let v = k.fma(wj, xb, v);
                k.set(*a, v);
            }
        }
        let w = k.addi(w, (PANEL * es) as i64);
        k.set(wv, w);
        let x = k.addi(x, 4);
        k.set(xv, x);
    });
    if c.wt == DType::BF16 {
        // back to rows in order: rows 4i..4i+4 interleave an even and an odd accumulator
        let lo = k.b.func.dfg.immediates.push(ConstantData::from(&INTERLEAVE_LO[..]));
        let hi = k.b.func.dfg.immediates.push(ConstantData::from(&INTERLEAVE_HI[..]));
        for acc in &accs {
            let v: Vec<Value> = acc.iter().map(|a| k.get(*a)).collect();
            let v: Vec<Value> = v.iter().map(|x| k.b.ins().bitcast(types::I8X16, le(), *x)).collect();
            let rows = [(v[0], v[1], lo), (v[0], v[1], hi), (v[2], v[3], lo), (v[2], v[3], hi)];
            for (j, (a, b, m)) in rows.into_iter().enumerate() {
                let r = k.b.ins().shuffle(a, b, m);
                let r = k.b.ins().bitcast(V4, le(), r);
                k.set(acc[j], r);
            }
        }
    }
    let p2 = k.addi(p, 1);
    let mut out = Vec::new();
    for (panel, pp) in [(0, p), (1, p2)] {
        let scale = c.inv.map(|inv| {
            let a = k.at(inv, t, 4);
            let s = k.ld(F32, a, 0);
            k.splat(s)
        });
        let mut vals = Vec::new();
        for j in 0..4 {
            let mut v = k.get(accs[panel][j]);
            if let Some(s) = scale {
                v = k.fmul(v, s);
            }
            if let Some(b) = c.bias {
                let pb = k.at(b, pp, (PANEL * 4) as i64);
                let bv = k.ld(V4, pb, (j * 16) as i64);
                v = k.fadd(v, bv);
            }
            vals.push((0, j, v));
        }
        out.push(vals);
    }
    let b = out.pop().unwrap_or_default();
    let a = out.pop().unwrap_or_default();
    (a, b)
}

#[allow(clippy::too_many_arguments)]
fn tile_sets(
    k: &mut Kb<'_>,
    c: &Ctx,
    p: Value,
    wp: Value,
    t: Value,
    tokens: usize,
    v0: usize,
    nv: usize,
    sets: usize,
) -> TileVals {
    let zero = k.c(V4, 0.0);
    let accs: Vec<Vec<Vec<Variable>>> =
        (0..sets).map(|_| (0..tokens).map(|_| (0..nv).map(|_| k.var(V4, zero)).collect()).collect()).collect();
    let x0 = k.at(c.x, t, (c.kd * 4) as i64);
    let wv = k.var(I64, wp);
    let xv = k.var(I64, x0);
    let main = c.kd / sets * sets;
    let wend = k.addi(wp, (main * PANEL * 4) as i64);
    let body = |k: &mut Kb<'_>, set: usize, kk: usize| {
        let w = k.get(wv);
        let x = k.get(xv);
        let ws: Vec<Value> = (0..nv).map(|j| k.ld(V4, w, ((kk * PANEL + (v0 + j) * 4) * 4) as i64)).collect();
        for tt in 0..tokens {
            let xs = k.ld(F32, x, ((tt * c.kd + kk) * 4) as i64);
            let xb = k.splat(xs);
            for (j, wj) in ws.iter().enumerate() {
                let a = k.get(accs[set][tt][j]);
                let a = k.fma(*wj, xb, a);
                k.set(accs[set][tt][j], a);
            }
        }
    };
    k.for_ptr(wv, wend, |k| {
        for s in 0..sets {
            body(k, s, s);
        }
        let w = k.get(wv);
        let w = k.addi(w, (sets * PANEL * 4) as i64);
        k.set(wv, w);
        let x = k.get(xv);
        let x = k.addi(x, (sets * 4) as i64);
        k.set(xv, x);
    });
    if main < c.kd {
        body(k, 0, 0);
    }
    finish_tile(k, c, p, t, &accs, v0)
}

/// Sums the accumulator sets of a tile and applies the RMS scale and the bias.
fn finish_tile(k: &mut Kb<'_>, c: &Ctx, p: Value, t: Value, accs: &[Vec<Vec<Variable>>], v0: usize) -> TileVals {
    let (tokens, nv) = (accs[0].len(), accs[0][0].len());
    let mut vals = Vec::new();
    for tt in 0..tokens {
        let scale = c.inv.map(|inv| {
            let r = k.addi(t, tt as i64);
            let a = k.at(inv, r, 4);
            let s = k.ld(F32, a, 0);
            k.splat(s)
        });
        for j in 0..nv {
            let mut v = k.get(accs[0][tt][j]);
            for set in &accs[1..] {
                let b = k.get(set[tt][j]);
                v = k.fadd(v, b);
            }
            if let Some(s) = scale {
                v = k.fmul(v, s);
            }
            if let Some(b) = c.bias {
                let pb = k.at(b, p, (PANEL * 4) as i64);
                let bv = k.ld(V4, pb, ((v0 + j) * 16) as i64);
                v = k.fadd(v, bv);
            }
            vals.push((tt, v0 + j, v));
        }
    }
    vals
}

/// `1/sqrt(ss/kd + eps)` for a row's sum of squares `ss` (a scalar).
pub fn inv_rms(k: &mut Kb<'_>, ss: Value, kd: usize, eps: f32) -> Value {
    let dinv = k.f(1.0 / kd as f32);
    let e = k.f(eps);
    let ms = k.fma(ss, dinv, e);
    let r = k.b.ins().sqrt(ms);
    let one = k.f(1.0);
    k.fdiv(one, r)
}

/// The RMS prologue: `inv[t] = 1/sqrt(mean(x[t]²) + eps)` for every row, into a stack array.
pub fn rms_prologue(k: &mut Kb<'_>, x: Value, kd: usize, eps: f32) -> Value {
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (MAX_ROWS * 4) as u32, 4));
    let inv = k.b.ins().stack_addr(I64, slot, 0);
    let zero = k.ic(0);
    let n = k.n;
    k.for_range(zero, n, |k, t| {
        let row = k.at(x, t, (kd * 4) as i64);
        let z4 = k.c(V4, 0.0);
        let acc = k.var(V4, z4);
        let z = k.f(0.0);
        let tail = k.var(F32, z);
        k.chunks(kd, |k, i, vec| {
            let a = k.at(row, i, 4);
            let v = k.ld(if vec { V4 } else { F32 }, a, 0);
            let var = if vec { acc } else { tail };
            let s = k.get(var);
            let s = k.fma(v, v, s);
            k.set(var, s);
        });
        let a = k.get(acc);
        let h = k.hsum(a);
        let tl = k.get(tail);
        let ss = k.fadd(h, tl);
        let s = inv_rms(k, ss, kd, eps);
        let dst = k.at(inv, t, 4);
        k.st(s, dst, 0);
    });
    inv
}

/// Walks the panels of `lo..hi` and the tokens of each, handing every tile's values to `epi`
/// with `(panel, first token, values)`. `swiglu` keeps whole panels in one tile.
pub fn panels(
    k: &mut Kb<'_>,
    c: &Ctx,
    w: Value,
    swiglu: bool,
    epi: &mut dyn FnMut(&mut Kb<'_>, Value, Value, TileVals),
) {
    if super::wide::panels(k, c, w, epi) {
        return;
    }
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    let kd = c.kd;
    let pb = panel_bytes(c.wt, kd) as i64;
    if let Some(xq) = &c.xq {
        // Int8: rows in chunks that fit the quantized buffer; 4 tokens × 4 rows per tile
        // (each weight vector feeds four dot products), 1 token × 16 rows for the rest.
        super::dot::chunks(k, c, xq, &mut |k, c0, end| {
            // One row (decode): two panels per step while pairs remain.
            let one = k.addi(c0, 1);
            let single = k.icmp(IntCC::Equal, end, one);
            let lo_var = k.var(I64, lo);
            k.when(single, |k| {
                let next = k.for_step(lo, hi, 2, |k, p| {
                    let wp = k.at(w, p, pb);
                    let accs = super::dot::tile_accs(k, c, xq, wp, c0, 1, 0, 4, 2);
                    let (a, b) = accs[0].split_at(4);
                    let v = finish_tile(k, c, p, c0, &[vec![a.to_vec()]], 0);
                    epi(k, p, c0, v);
                    let p2 = k.addi(p, 1);
                    let v = finish_tile(k, c, p2, c0, &[vec![b.to_vec()]], 0);
                    epi(k, p2, c0, v);
                });
                k.set(lo_var, next);
            });
            let lo = k.get(lo_var);
            k.for_range(lo, hi, |k, p| {
                let wp = k.at(w, p, pb);
                let rest = k.for_step(c0, end, 4, |k, t| {
                    for v0 in 0..4 {
                        let v = tile(k, c, p, wp, t, 4, v0, 1);
                        epi(k, p, t, v);
                    }
                });
                k.for_range(rest, end, |k, t| {
                    let v = tile(k, c, p, wp, t, 1, 0, 4);
                    epi(k, p, t, v);
                });
            });
        });
        return;
    }
    // Decode (n = 1): two panels per step while pairs remain (f32, bf16 and f16 weights).
    let one = k.ic(1);
    let is_decode = k.icmp(IntCC::Equal, n, one);
    let lo_var = k.var(I64, lo);
    if matches!(c.wt, DType::F32 | DType::BF16 | DType::F16) {
        k.when(is_decode, |k| {
            let zero = k.ic(0);
            let next = k.for_step(lo, hi, 2, |k, p| {
                let wp = k.at(w, p, pb);
                let (a, b) = tile_two_panels(k, c, p, wp, zero);
                epi(k, p, zero, a);
                let p2 = k.addi(p, 1);
                epi(k, p2, zero, b);
            });
            k.set(lo_var, next);
        });
    }
    let lo = k.get(lo_var);
    k.for_range(lo, hi, |k, p| {
        let wp = k.at(w, p, pb);
        let zero = k.ic(0);
        // SwiGLU: the gate half's epilogue parks silu(gate) in the output, the up half's
        // multiplies it in (see `matmul`).
        let _ = swiglu;
        let rest = k.for_step(zero, n, 4, |k, t| {
            let v = tile(k, c, p, wp, t, 4, 0, 2);
            epi(k, p, t, v);
            let v = tile(k, c, p, wp, t, 4, 2, 2);
            epi(k, p, t, v);
        });
        k.for_range(rest, n, |k, t| {
            let v = tile(k, c, p, wp, t, 1, 0, 4);
            epi(k, p, t, v);
        });
    });
}

/// `[x, w, bias?, residual?, out]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    k: &mut Kb<'_>,
    kd: usize,
    m: usize,
    bias: bool,
    rms_eps: Option<f32>,
    act: Act,
    residual: bool,
    wt: DType,
    xq: u8,
    xbf16: bool,
) {
    let x = k.ptr(0);
    let w = k.ptr(1);
    let mut i = 2;
    let b = bias.then(|| {
        i += 1;
        k.ptr(i - 1)
    });
    let res = residual.then(|| {
        i += 1;
        k.ptr(i - 1)
    });
    let out = k.ptr(i);
    let mut c = Ctx::new(k, x, b, kd, rms_eps, wt, xq);
    c.xbf16 = xbf16;
    let swiglu = act == Act::SwiGlu;
    let m_out = if swiglu { m / 2 } else { m };
    if swiglu && b.is_none() && res.is_none() && m_out % (PANEL / 2) == 0 {
        c.swiglu_out = Some((out, m_out));
    }
    let mut epi = |k: &mut Kb<'_>, p: Value, t: Value, vals: TileVals| {
        // (token offset, output vector index within the panel's outputs, value)
        let mut outs: Vec<(usize, usize, Value)> = Vec::new();
        if swiglu {
            // vectors 0,1: gate rows; 2,3: the matching up rows. A tile holding both (decode)
            // combines them in registers; a prefill half-tile of gates parks silu(gate) in the
            // output row, and the up half-tile that follows multiplies it in.
            let has_up = vals.iter().any(|v| v.1 >= 2);
            let has_gate = vals.iter().any(|v| v.1 < 2);
            for &(tt, vi, g) in vals.iter().filter(|v| v.1 < 2) {
                let s = apply_unary(k, Unary::Silu, V4, g);
                match vals.iter().find(|v| v.0 == tt && v.1 == vi + 2).map(|v| v.2) {
                    Some(u) => {
                        let y = k.fmul(s, u);
                        outs.push((tt, vi, y));
                    }
                    None => {
                        let r = k.addi(t, tt as i64);
                        let row = k.at(out, r, (m_out * 4) as i64);
                        let dst = k.at(row, p, (PANEL / 2 * 4) as i64);
                        k.st(s, dst, (vi * 16) as i64);
                    }
                }
            }
            if has_up && !has_gate {
                for &(tt, vi, u) in &vals {
                    let r = k.addi(t, tt as i64);
                    let row = k.at(out, r, (m_out * 4) as i64);
                    let dst = k.at(row, p, (PANEL / 2 * 4) as i64);
                    let s = k.ld(V4, dst, ((vi - 2) * 16) as i64);
                    let y = k.fmul(s, u);
                    outs.push((tt, vi - 2, y));
                }
            }
        } else {
            for &(tt, vi, v) in &vals {
                let y = match act {
                    Act::Gelu => apply_unary(k, Unary::Gelu, V4, v),
                    Act::GeluErf => apply_unary(k, Unary::GeluErf, V4, v),
                    _ => v,
                };
                outs.push((tt, vi, y));
            }
        }
        let per_panel = if swiglu { PANEL / 2 } else { PANEL };
        let store_all = |k: &mut Kb<'_>, partial: bool| {
            for &(tt, vi, v) in &outs {
                let r = k.addi(t, tt as i64);
                let row = k.at(out, r, (m_out * 4) as i64);
                let dst = k.at(row, p, (per_panel * 4) as i64);
                let off = (vi * 16) as i64;
                let valid = if partial { (m_out % per_panel).saturating_sub(vi * 4).min(4) } else { 4 };
                let resv = res.map(|rp| {
                    let rrow = k.at(rp, r, (m_out * 4) as i64);
                    k.at(rrow, p, (per_panel * 4) as i64)
                });
                if valid == 4 {
                    let mut y = v;
                    if let Some(ra) = resv {
                        let rv = k.ld(V4, ra, off);
                        y = k.fadd(y, rv);
                    }
                    k.st(y, dst, off);
                } else {
                    for lane in 0..valid {
                        let mut s = k.b.ins().extractlane(v, lane as u8);
                        if let Some(ra) = resv {
                            let rv = k.ld(F32, ra, off + 4 * lane as i64);
                            s = k.fadd(s, rv);
                        }
                        k.st(s, dst, off + 4 * lane as i64);
                    }
                }
            }
        };
        if m_out % per_panel == 0 {
            store_all(k, false);
        } else {
            let full = k.ic((m_out / per_panel) as i64);
            let is_full = k.icmp(IntCC::SignedLessThan, p, full);
            k.if_else(is_full, |k| store_all(k, false), |k| store_all(k, true));
        }
    };
    panels(k, &c, w, swiglu, &mut epi);
}
