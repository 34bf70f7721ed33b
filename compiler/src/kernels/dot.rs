//! Int8 dot-product projections (`quant_q8` → `linear`/`qkv_rope` over `q8_0`/`q4_0` weights
//! in the `Dot16` layout, `pack::dot_at`).
//!
//! The prologue quantizes each input row once per call (`quant::quantize_act_q8`: blocks of
//! 32, `d = max|x|/127`, `q = nearest(x · 1/d)`) into a stack buffer, and with an RMS
//! prologue computes `1/rms` from the dequantized values, as the IR says (`quant_q8` comes
//! first). A tile then multiplies 16 signed activation bytes by 16 unsigned weight bytes (4
//! rows × 4 columns) into four i32 sums per instruction: the `swiden`/`uwiden`/`imul`/
//! `iadd_pairwise` tree below is what Cranelift folds into one `vpdpbusd` on AVX-VNNI and
//! AVX512-VNNI hosts (and lowers to a longer exact sequence elsewhere). Weights are stored
//! unsigned (`q + 128`, or the `q + 8` nibble), so each block's integer sum is corrected by
//! `offset · Σq_x` (computed by the prologue) before it is scaled by `d_w · d_x` and added to
//! the f32 accumulators. Integer sums are exact; results differ from the interpreter on the
//! same rounded values only by the f32 summation order of the block partial sums.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;
use llmc_ir::quant::QK;
use llmc_ir::DType;

use super::kb::{Kb, F32, I64, V4};
use super::matmul::{Ctx, MAX_ROWS};
use crate::pack::PANEL;

const I32X4: types::Type = types::I32X4;
const I8X16: types::Type = types::I8X16;

/// Bytes of stack the quantized rows of one chunk may take.
const BUF_BYTES: usize = 256 * 1024;

/// The most columns an int8 projection takes: its buffer holds at least 4 rows (8 buffer rows
/// with `quant_q8x2`), under 1 MiB of stack; lowering refuses wider inputs.
pub const MAX_COLS: usize = 65536;

/// The quantized input rows of an int8 projection: a stack buffer of `rows · terms` rows of
/// `row_bytes` (`k` bytes of q, then per block of 32 the scale `d` (f32) and the correction
/// `−offset · Σq` (i32)), holding rows `c0 .. c0 + rows` of the step, `terms` buffer rows each
/// (`quant_q8x2`: the row's rounding, then its residual's).
///
/// Or, when the kernel's fifth argument (`Kb::cap`) is not 0, the step's rows quantized once
/// by the workers together ([`prequantize`], the executor's shared pre-pass): that argument is
/// then the address of a [`shared_bytes`] buffer holding the inverse RMS of each row (at 0,
/// [`SHARED_INV_BYTES`]) and then every row's `terms` buffer rows, and the prologue only
/// points `cur` into it.
pub struct Xq {
    /// The stack buffer the prologue quantizes a chunk into.
    pub buf: Value,
    pub row_bytes: usize,
    pub rows: usize,
    pub terms: usize,
    pub c0: Variable,
    /// Where the chunk's quantized rows are (the stack buffer, or the chunk's part of the
    /// shared buffer): what the tiles read.
    pub cur: Variable,
    /// The shared buffer's address (0: quantize in the prologue).
    pub shared: Value,
    /// The inverse RMS of each row of the step (with an RMS prologue): in the stack, or at the
    /// start of the shared buffer.
    pub inv: Option<(Value, f32)>,
}

/// Bytes at the start of a shared quantized buffer: the inverse RMS of each row of a step.
pub const SHARED_INV_BYTES: usize = MAX_ROWS * 4;

/// Bytes of one row of a projection over `kd` columns quantized with `terms` terms.
pub fn row_bytes(kd: usize, terms: usize) -> usize {
    terms * (kd + kd / QK * META)
}

/// Bytes of the shared quantized buffer of a projection over `kd` columns with `terms` terms,
/// for steps of up to `rows` (at most `MAX_ROWS`) rows.
pub fn shared_bytes(kd: usize, terms: usize, rows: usize) -> usize {
    SHARED_INV_BYTES + rows.min(MAX_ROWS) * row_bytes(kd, terms)
}

fn le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Bytes per block of a quantized row's metadata: `d` (f32), the correction `−offset · Σq`
/// (i32) and a third word: for q4_1/q5_1, `d · Σq` (f32, for their minimum: `Σ x·(q·d_w + m)
/// = d_w·Σ x·q + m·Σ x`); for q6_k, whose blocks have a scale per half, the correction splits
/// in two: `−32 · Σq` over the first 16 values at 4, over the last 16 at 8 (i32).
const META: usize = 12;

/// Sets up the buffer (and the RMS slot) for a projection over `kd` columns with `terms` int8
/// terms per value.
pub fn setup(k: &mut Kb<'_>, kd: usize, rms_eps: Option<f32>, terms: usize) -> Xq {
    let row_bytes = kd + kd / QK * META;
    let rows = (BUF_BYTES / (row_bytes * terms) / 4 * 4).clamp(4, MAX_ROWS);
    let bytes = (rows * terms * row_bytes) as u32;
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4));
    let buf = k.b.ins().stack_addr(I64, slot, 0);
    let shared = k.cap;
    let inv = rms_eps.map(|eps| {
        let s = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (MAX_ROWS * 4) as u32, 4));
        let own = k.b.ins().stack_addr(I64, s, 0);
        // the shared buffer starts with the rows' inverse RMS
        (k.b.ins().select(shared, shared, own), eps)
    });
    let zero = k.ic(0);
    let c0 = k.var(I64, zero);
    let cur = k.var(I64, buf);
    Xq { buf, row_bytes, rows, terms, c0, cur, shared, inv }
}

/// The executor's shared pre-pass of an int8 projection (`[x, ...]`, units: rows): quantizes
/// rows `lo..hi` of `x` as the projection's prologue would, into the shared buffer at the
/// kernel's fifth argument (see [`Xq`]); the projection's calls then read every row from there.
pub fn prequantize(k: &mut Kb<'_>, kd: usize, rms_eps: Option<f32>, wt: DType, terms: usize) {
    let x = k.ptr(0);
    let shared = k.cap;
    let rb = row_bytes(kd, terms) as i64;
    let (lo, hi) = (k.lo, k.hi);
    let rows = k.addi(shared, SHARED_INV_BYTES as i64);
    let buf = k.at(rows, lo, rb);
    let zero = k.ic(0);
    let xq = Xq {
        buf,
        row_bytes: rb as usize / terms,
        rows: MAX_ROWS,
        terms,
        c0: k.var(I64, zero),
        cur: k.var(I64, buf),
        shared,
        inv: rms_eps.map(|eps| (shared, eps)),
    };
    let c = Ctx { x, bias: None, kd, inv: None, wt, xq: None, swiglu_out: None, xbf16: false };
    let len = k.b.ins().isub(hi, lo);
    match k.wide.and_then(crate::micro::quant) {
        Some(f) => quantize_rows_wide(k, &c, &xq, lo, len, f),
        None => quantize_rows(k, &c, &xq, lo, len),
    }
}

/// Quantizes rows `c0 .. c0 + len` of `x` into the buffer (`terms` buffer rows each: the
/// row, then what the previous terms missed) and their inverse RMS (of the dequantized sum).
pub fn quantize_rows(k: &mut Kb<'_>, c: &Ctx, xq: &Xq, c0: Value, len: Value) {
    let kd = c.kd;
    let zero = k.ic(0);
    k.for_range(zero, len, |k, r| {
        let t = k.add(c0, r);
        let src = k.at(c.x, t, (kd * 4) as i64);
        let r0 = k.muli(r, xq.terms as i64);
        let dst = k.at(xq.buf, r0, xq.row_bytes as i64);
        let z4 = k.c(V4, 0.0);
        let ss = k.var(V4, z4);
        let b0 = k.ic(0);
        let nb = k.ic((kd / QK) as i64);
        k.for_range(b0, nb, |k, b| {
            let xb = k.at(src, b, (QK * 4) as i64);
            let v: Vec<Value> = (0..8).map(|i| k.ld(V4, xb, i * 16)).collect();
            let mut rest = v.clone();
            let mut total: Option<Vec<Value>> = None;
            for term in 0..xq.terms {
                let dt = k.addi(dst, (term * xq.row_bytes) as i64);
                let dq = quantize_block(k, c, &rest, dt, b);
                if term + 1 < xq.terms {
                    rest = rest.iter().zip(&dq).map(|(&a, &d)| k.b.ins().fsub(a, d)).collect();
                }
                total = Some(match total {
                    None => dq,
                    Some(t) => t.iter().zip(&dq).map(|(&a, &d)| k.fadd(a, d)).collect(),
                });
            }
            if xq.inv.is_some() {
                for dq in total.unwrap_or_default() {
                    let a = k.get(ss);
                    let a = k.fma(dq, dq, a);
                    k.set(ss, a);
                }
            }
        });
        if let Some((inv, eps)) = xq.inv {
            let a = k.get(ss);
            let h = k.hsum(a);
            let s = super::matmul::inv_rms(k, h, kd, eps);
            let p = k.at(inv, t, 4);
            k.st(s, p, 0);
        }
    });
}

/// `quantize_rows` by the host's quantization micro-kernel (the same bytes and inverse RMS).
fn quantize_rows_wide(k: &mut Kb<'_>, c: &Ctx, xq: &Xq, c0: Value, len: Value, f: crate::micro::QuantFn) {
    let mut sig = cranelift_codegen::ir::Signature::new(k.call_conv());
    sig.params.extend([cranelift_codegen::ir::AbiParam::new(I64); 8]);
    let sig = k.b.import_signature(sig);
    let x = k.at(c.x, c0, (c.kd * 4) as i64);
    let (inv, eps) = match xq.inv {
        Some((inv, eps)) => (k.at(inv, c0, 4), eps),
        None => (k.ic(0), 0.0),
    };
    let mut mode = crate::pack::dot_offset(c.wt) as i64;
    if llmc_ir::quant::has_min(c.wt) {
        mode |= crate::micro::QUANT_MIN as i64;
    }
    if c.wt == DType::Q6K {
        mode |= crate::micro::QUANT_HALVES as i64;
    }
    let args = [x, len, xq.buf, inv, k.ic(c.kd as i64), k.ic(xq.terms as i64), k.ic(mode), k.ic(eps.to_bits() as i64)];
    let fp = k.ic(f as usize as i64);
    k.b.ins().call_indirect(sig, fp, &args);
}

/// Quantizes block `b` (the 8 vectors `v`) of a row into the buffer row at `dst`: its 32
/// bytes of q and its metadata. Returns the dequantized values `d · q`.
fn quantize_block(k: &mut Kb<'_>, c: &Ctx, v: &[Value], dst: Value, b: Value) -> Vec<Value> {
    let kd = c.kd;
    let off = crate::pack::dot_offset(c.wt) as i64;
    let halves = c.wt == DType::Q6K;
    let mut m = k.b.ins().fabs(v[0]);
    for vi in &v[1..] {
        let a = k.b.ins().fabs(*vi);
        m = k.fmax(m, a);
    }
    let amax = k.hmax(m);
    let c127 = k.f(127.0);
    let d = k.fdiv(amax, c127);
    let one = k.f(1.0);
    let fz = k.f(0.0);
    let id = k.fdiv(one, d);
    let nz = k.fcmp(FloatCC::NotEqual, d, fz);
    let id = k.select(nz, id, fz);
    let ids = k.splat(id);
    let ds = k.splat(d);
    let mut qi = Vec::new();
    let mut dqs = Vec::new();
    for vi in v {
        let s = k.fmul(*vi, ids);
        let qf = k.b.ins().nearest(s);
        dqs.push(k.fmul(qf, ds));
        qi.push(k.b.ins().fcvt_to_sint_sat(I32X4, qf));
    }
    // Σq over lanes of `qs` (i32x4 vectors)
    let hsum = |k: &mut Kb<'_>, qs: &[Value]| {
        let mut sum = qs[0];
        for q in &qs[1..] {
            sum = k.b.ins().iadd(sum, *q);
        }
        let lanes: Vec<Value> = (0..4u8).map(|i| k.b.ins().extractlane(sum, i)).collect();
        let s01 = k.b.ins().iadd(lanes[0], lanes[1]);
        let s23 = k.b.ins().iadd(lanes[2], lanes[3]);
        k.b.ins().iadd(s01, s23)
    };
    let (s, corr, corr_hi) = if halves {
        let lo = hsum(k, &qi[..4]);
        let hi = hsum(k, &qi[4..]);
        let s = k.b.ins().iadd(lo, hi);
        (s, k.b.ins().imul_imm_s(lo, -off), Some(k.b.ins().imul_imm_s(hi, -off)))
    } else {
        let s = hsum(k, &qi);
        (s, k.b.ins().imul_imm_s(s, -off), None)
    };
    let h: Vec<Value> = (0..4).map(|i| k.b.ins().snarrow(qi[2 * i], qi[2 * i + 1])).collect();
    let lo = k.b.ins().snarrow(h[0], h[1]);
    let hi = k.b.ins().snarrow(h[2], h[3]);
    let qd = k.at(dst, b, QK as i64);
    k.st(lo, qd, 0);
    k.st(hi, qd, 16);
    let md = k.at(dst, b, META as i64);
    k.st(d, md, kd as i64);
    k.st(corr, md, kd as i64 + 4);
    if llmc_ir::quant::has_min(c.wt) {
        let sf = k.b.ins().fcvt_from_sint(F32, s);
        let dsum = k.fmul(d, sf);
        k.st(dsum, md, kd as i64 + 8);
    }
    if let Some(ch) = corr_hi {
        k.st(ch, md, kd as i64 + 8);
    }
    dqs
}

/// `acc + Σ` over each group of 4 bytes of `x (i8) · w (u8)`: one `vpdpbusd` on VNNI hosts.
fn dot(k: &mut Kb<'_>, x: Value, w: Value, acc: Value) -> Value {
    let ins = |k: &mut Kb<'_>, high: bool| {
        let (xs, wu) = if high {
            (k.b.ins().swiden_high(x), k.b.ins().uwiden_high(w))
        } else {
            (k.b.ins().swiden_low(x), k.b.ins().uwiden_low(w))
        };
        k.b.ins().imul(xs, wu)
    };
    let lo = ins(k, false);
    let hi = ins(k, true);
    let lo_l = k.b.ins().swiden_low(lo);
    let lo_h = k.b.ins().swiden_high(lo);
    let l = k.b.ins().iadd_pairwise(lo_l, lo_h);
    let hi_l = k.b.ins().swiden_low(hi);
    let hi_h = k.b.ins().swiden_high(hi);
    let h = k.b.ins().iadd_pairwise(hi_l, hi_h);
    let s = k.b.ins().iadd_pairwise(l, h);
    k.b.ins().iadd(s, acc)
}

/// The f32 accumulators of one tile: `tokens` rows from step row `t`, vectors `v0 .. v0 + nv`
/// (4 rows each) of the panel at `wp`, and with `panels = 2` of the next panel too (two
/// weight streams in flight: decode); accumulators are `[token][panel · nv + vector]`.
#[allow(clippy::too_many_arguments)]
pub fn tile_accs(
    k: &mut Kb<'_>,
    c: &Ctx,
    xq: &Xq,
    wp: Value,
    t: Value,
    tokens: usize,
    v0: usize,
    nv: usize,
    panels: usize,
) -> Vec<Vec<Variable>> {
    let pb = crate::pack::panel_bytes(c.wt, c.kd);
    let nv_all = nv * panels;
    // byte offset of vector `j` (over all panels) inside a group / the scales of a block
    let voff = |j: usize| (j / nv) * pb + (v0 + j % nv) * 16;
    let q4 = crate::pack::is_nibble(c.wt);
    let groups = if q4 { QK / 8 } else { QK / 4 };
    let head = crate::pack::block_head(c.wt);
    let block = crate::pack::block_bytes(c.wt);
    // q6_k scales each half of a block (4 groups) on its own
    let subs = if c.wt == DType::Q6K { 2 } else { 1 };
    let rb = xq.row_bytes as i64;
    // the buffer rows of the tile's tokens (`terms` per token), summed at the end
    let logical = tokens;
    let tokens = tokens * xq.terms;
    let zero = k.c(V4, 0.0);
    let accs: Vec<Vec<Variable>> = (0..tokens).map(|_| (0..nv_all).map(|_| k.var(V4, zero)).collect()).collect();
    let c0 = k.get(xq.c0);
    let r = k.b.ins().isub(t, c0);
    let r = k.muli(r, xq.terms as i64);
    let buf = k.get(xq.cur);
    let x0 = k.at(buf, r, rb);
    let meta0 = k.addi(x0, c.kd as i64);
    let xv = k.var(I64, x0);
    let mv = k.var(I64, meta0);
    let wv = k.var(I64, wp);
    let wend = k.addi(wp, (c.kd / QK * block) as i64);
    // the block index (K types: which super-block table entry)
    let z = k.ic(0);
    let bi = k.var(I64, z);
    k.for_ptr(wv, wend, |k| {
        let bp = k.get(wv);
        let x = k.get(xv);
        let m = k.get(mv);
        let b = k.get(bi);
        let tab = super::storage::super_entry(k, c.wt, wp, b, c.kd);
        // the nibble mask, made once per block (opt_level none does not hoist constants)
        let nib = q4.then(|| {
            let c15 = k.b.ins().iconst(types::I8, 0x0f);
            k.b.ins().splat(I8X16, c15)
        });
        for sub in 0..subs {
            // The sums start at `-offset · Σq_x`: the unsigned weights' offset taken out.
            let mut iacc: Vec<Vec<Value>> = (0..tokens)
                .map(|tt| {
                    let corr = k.ld(F32, m, tt as i64 * rb + 4 + 4 * sub as i64);
                    let corr = k.splat(corr);
                    vec![k.b.ins().bitcast(I32X4, le(), corr); nv_all]
                })
                .collect();
            // q6_k's halves are columns 0..16 and 16..32: with nibbles, the low and the high
            // nibbles of all 4 groups
            let (g0, g1) = if q4 && subs == 2 { (0, groups) } else { (sub * groups / subs, (sub + 1) * groups / subs) };
            for g in g0..g1 {
                // each token's 4 (nibbles: 4 + 4) activation bytes of this group, in every
                // lane (loaded as an f32 so the load folds into one `vbroadcastss`)
                let bcast = |k: &mut Kb<'_>, at: i64| {
                    let v = k.ld(F32, x, at);
                    let v = k.splat(v);
                    k.b.ins().bitcast(I8X16, le(), v)
                };
                // (with q6_k's halves, only the nibbles of this half)
                let (use_lo, use_hi) = (subs == 1 || sub == 0, subs == 1 || sub == 1);
                let xs: Vec<(Value, Option<Value>)> = (0..tokens)
                    .map(|tt| {
                        let at = tt as i64 * rb + g as i64 * 4;
                        if q4 && !use_lo {
                            (bcast(k, at + 16), None)
                        } else {
                            (bcast(k, at), (q4 && use_hi).then(|| bcast(k, at + 16)))
                        }
                    })
                    .collect();
                for j in 0..nv_all {
                    let w = k.b.ins().load(I8X16, flags(), bp, (head + g * PANEL * 4 + voff(j)) as i32);
                    let (wl, wh) = if let Some(nib) = nib {
                        let mut lo = k.b.ins().band(w, nib);
                        // shift 16-bit lanes (one `psrlw`; x86 has no byte shift) and mask
                        let w16 = k.b.ins().bitcast(types::I16X8, le(), w);
                        let hi = k.b.ins().ushr_imm_u(w16, 4);
                        let hi = k.b.ins().bitcast(I8X16, le(), hi);
                        let mut hi = k.b.ins().band(hi, nib);
                        let hb = crate::pack::high_bits(c.wt);
                        if hb > 0 {
                            // the plane's bits of this group, moved up to bits 4.. of each byte
                            let at = head + QK / 2 * PANEL + if hb == 2 { g / 2 * PANEL * 4 } else { 0 } + voff(j);
                            let pl = k.b.ins().load(I8X16, flags(), bp, at as i32);
                            let pl = k.b.ins().bitcast(types::I16X8, le(), pl);
                            let (sl, sh) = if hb == 1 { (2 * g, 2 * g + 1) } else { (4 * (g % 2), 4 * (g % 2) + 2) };
                            let mask = k.b.ins().iconst(types::I8, if hb == 1 { 0x10 } else { 0x30 });
                            let mask = k.b.ins().splat(I8X16, mask);
                            let up = |k: &mut Kb<'_>, s: usize| {
                                let v = if s <= 4 {
                                    k.b.ins().ishl_imm_u(pl, (4 - s) as i64)
                                } else {
                                    k.b.ins().ushr_imm_u(pl, (s - 4) as i64)
                                };
                                let v = k.b.ins().bitcast(I8X16, le(), v);
                                k.b.ins().band(v, mask)
                            };
                            let ul = up(k, sl);
                            let uh = up(k, sh);
                            lo = k.b.ins().bor(lo, ul);
                            hi = k.b.ins().bor(hi, uh);
                        }
                        if !use_lo {
                            (hi, None)
                        } else {
                            (lo, use_hi.then_some(hi))
                        }
                    } else {
                        (w, None)
                    };
                    for (tt, row) in iacc.iter_mut().enumerate() {
                        let (xl, xh) = xs[tt];
                        row[j] = dot(k, xl, wl, row[j]);
                        if let (Some(xh), Some(wh)) = (xh, wh) {
                            row[j] = dot(k, xh, wh, row[j]);
                        }
                    }
                }
            }
            for (tt, row) in iacc.iter().enumerate() {
                let dx = k.ld(F32, m, tt as i64 * rb);
                let dx = k.splat(dx);
                let dsum = llmc_ir::quant::has_min(c.wt).then(|| {
                    let v = k.ld(F32, m, tt as i64 * rb + 8);
                    k.splat(v)
                });
                for (j, &ia) in row.iter().enumerate() {
                    // vector `j`: panel `j / nv` (`pb` further), rows `4·(v0 + j % nv)`
                    let pbp = k.addi(bp, ((j / nv) * pb) as i64);
                    let ptab = k.addi(tab, ((j / nv) * pb) as i64);
                    let sw = super::storage::block_scales(k, c.wt, pbp, ptab, v0 + j % nv, sub, false);
                    let s = k.fmul(sw, dx);
                    let f = k.b.ins().fcvt_from_sint(V4, ia);
                    let a = k.get(accs[tt][j]);
                    let mut a = k.fma(f, s, a);
                    if let Some(ds) = dsum {
                        let mw = super::storage::block_scales(k, c.wt, pbp, ptab, v0 + j % nv, 0, true);
                        a = k.fma(mw, ds, a);
                    }
                    k.set(accs[tt][j], a);
                }
            }
        }
        let bp = k.addi(bp, block as i64);
        k.set(wv, bp);
        let x = k.addi(x, QK as i64);
        k.set(xv, x);
        let m = k.addi(m, META as i64);
        k.set(mv, m);
        let b = k.addi(b, 1);
        k.set(bi, b);
    });
    (0..logical)
        .map(|tt| {
            let first = &accs[tt * xq.terms];
            for more in &accs[tt * xq.terms + 1..(tt + 1) * xq.terms] {
                for (&a, &b) in first.iter().zip(more) {
                    let (x, y) = (k.get(a), k.get(b));
                    let s = k.fadd(x, y);
                    k.set(a, s);
                }
            }
            first.clone()
        })
        .collect()
}

/// Walks rows in chunks that fit the buffer: quantizes each chunk, then runs `walk(c0, end)`
/// over its rows.
pub fn chunks(k: &mut Kb<'_>, c: &Ctx, xq: &Xq, walk: &mut dyn FnMut(&mut Kb<'_>, Value, Value)) {
    let n = k.n;
    let zero = k.ic(0);
    let last = k.addi(n, xq.rows as i64 - 1);
    k.for_step(zero, last, xq.rows as i64, |k, c0| {
        let end = k.addi(c0, xq.rows as i64);
        let full = k.icmp(IntCC::SignedLessThanOrEqual, end, n);
        let end = k.select(full, end, n);
        let len = k.b.ins().isub(end, c0);
        k.set(xq.c0, c0);
        let zero = k.ic(0);
        let shared = k.icmp(IntCC::NotEqual, xq.shared, zero);
        k.if_else(
            shared,
            |k| {
                // the pre-pass quantized every row of the step
                let rows = k.addi(xq.shared, SHARED_INV_BYTES as i64);
                let at = k.at(rows, c0, (xq.terms * xq.row_bytes) as i64);
                k.set(xq.cur, at);
            },
            |k| {
                match k.wide.and_then(crate::micro::quant) {
                    Some(f) => quantize_rows_wide(k, c, xq, c0, len, f),
                    None => quantize_rows(k, c, xq, c0, len),
                }
                k.set(xq.cur, xq.buf);
            },
        );
        walk(k, c0, end);
    });
}

/// Element `j` (a column Value) of row `lane` of the `Dot16` panel at `panel` as f32 (the
/// embedding gather of a table the output projection also reads).
pub fn load_elem(k: &mut Kb<'_>, wt: DType, cols: usize, panel: Value, lane: Value, j: Value) -> Value {
    let q4 = crate::pack::is_nibble(wt);
    let head = crate::pack::block_head(wt);
    let b = k.udivi(j, QK as i64);
    let kk = k.uremi(j, QK as i64);
    let bp = k.at(panel, b, crate::pack::block_bytes(wt) as i64);
    // (g · 64 + lane · 4 + kk % 4), g = kk / 4 (bytes) or (kk % 16) / 4 (nibbles)
    let c = k.uremi(kk, 4);
    let within = if q4 { k.uremi(kk, 16) } else { kk };
    let g = k.udivi(within, 4);
    let go = k.muli(g, (PANEL * 4) as i64);
    let lo = k.muli(lane, 4);
    let o = k.add(go, lo);
    let o = k.add(o, c);
    let qa = k.add(bp, o);
    let byte = k.b.ins().uload8(types::I32, flags(), qa, head as i32);
    let u = if q4 {
        let high = k.udivi(kk, 16);
        let u = super::storage::nibble(k, byte, high);
        let hb = crate::pack::high_bits(wt);
        if hb > 0 {
            // the plane byte of position `lane · 4 + kk % 4` (6-bit: groups 2, 3 64 bytes on),
            // bits `2g + high` (5-bit) or `4 (g % 2) + 2 high` (6-bit): see `pack::plane_at`
            let i = k.add(lo, c);
            let pa = k.add(bp, i);
            let (pa, shift) = if hb == 2 {
                let g2 = k.udivi(g, 2);
                let pa = k.at(pa, g2, (PANEL * 4) as i64);
                let gm = k.uremi(g, 2);
                let s = k.muli(gm, 4);
                let h2 = k.muli(high, 2);
                (pa, k.add(s, h2))
            } else {
                let s = k.muli(g, 2);
                (pa, k.add(s, high))
            };
            let pb = k.b.ins().uload8(types::I32, flags(), pa, (head + QK / 2 * PANEL) as i32);
            let shift = k.b.ins().ireduce(types::I32, shift);
            let bits = k.b.ins().ushr(pb, shift);
            let bits = k.b.ins().band_imm_u(bits, (1 << hb) - 1);
            let bits = k.b.ins().ishl_imm_u(bits, 4);
            k.b.ins().bor(u, bits)
        } else {
            u
        }
    } else {
        byte
    };
    let q = k.b.ins().iadd_imm_s(u, -(crate::pack::dot_offset(wt) as i64));
    super::storage::block_value(k, wt, cols, q, (panel, b, bp), lane, kk)
}
