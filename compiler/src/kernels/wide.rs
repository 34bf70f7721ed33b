//! The projection walk over the wide micro-kernels (`crate::micro`): on hosts that have them,
//! `matmul::panels` hands its tiles to a micro-kernel call instead of Cranelift's 128-bit tile
//! code, and keeps everything around it: the int8 prologue (rows quantized into the stack
//! buffer, RMS scale), the walk over the unit's panels and the step's rows, and the fused
//! epilogue, which reads the tile's sums back from a stack buffer.
//!
//! A single row (decode) goes `DECODE_PANELS` panels per call (four weight streams in flight);
//! several rows go `PREFILL_PANELS` panels × `DOT_TOKENS` (int8) or `FLOAT_TOKENS` (float)
//! rows per call, so each weight vector the micro-kernel loads feeds every row's FMA.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{AbiParam, InstBuilder, Signature, StackSlotData, StackSlotKind, Value};

use super::kb::{Kb, F32, I64, V4};
use super::matmul::{Ctx, TileVals};
use crate::micro::{self, MicroFn, TILE_PANELS, TILE_TOKENS};
use crate::pack::{panel_bytes, PANEL};

/// The micro-kernel for this projection, if the kernel is built for wide code and one exists
/// for its weight type and activations, and whether it is the `vdpbf16ps` tile.
fn micro_for(k: &Kb<'_>, c: &Ctx) -> Option<(MicroFn, bool)> {
    let wide = k.wide?;
    match c.xq {
        Some(_) => micro::dot(c.wt, wide).map(|f| (f, false)),
        None => match micro::float_xbf16(c.wt, wide).filter(|_| c.xbf16 && k.bf16_dot) {
            Some(f) => Some((f, true)),
            None => micro::float(c.wt, wide).map(|f| (f, false)),
        },
    }
}

/// Walks the unit's panels and the step's rows through the micro-kernel, handing every
/// `(panel, row)` tile of 16 outputs to `epi` as `matmul::panels` does. Returns false (and
/// emits nothing) when there is no micro-kernel for this projection.
pub fn panels(k: &mut Kb<'_>, c: &Ctx, w: Value, epi: &mut dyn FnMut(&mut Kb<'_>, Value, Value, TileVals)) -> bool {
    let Some((f, bf16_dot)) = micro_for(k, c) else {
        return false;
    };
    let pb = panel_bytes(c.wt, c.kd) as i64;
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (TILE_TOKENS * TILE_PANELS * PANEL * 4) as u32,
        6,
    ));
    let out = k.b.ins().stack_addr(I64, slot, 0);
    if let Some(xq) = &c.xq {
        let (rb, terms) = (xq.row_bytes as i64, xq.terms);
        debug_assert!(terms * micro::DOT_TOKENS <= TILE_TOKENS);
        super::dot::chunks(k, c, xq, &mut |k, c0, end| {
            let buf = k.get(xq.cur);
            let row = |k: &mut Kb<'_>, t: Value| {
                let r = k.b.ins().isub(t, c0);
                k.at(buf, r, rb * terms as i64)
            };
            grid(k, c, w, pb, (f, false), out, (c0, end), &row, rb, (micro::DOT_TOKENS, terms), &mut *epi);
        });
    } else {
        // f32 rows in blocks that fit half the host's L2 (`micro::row_block`): each block's
        // rows stay in cache while the unit's panels stream past them once per block
        let (x, rb) = (c.x, (c.kd * 4) as i64);
        let row = |k: &mut Kb<'_>, t: Value| k.at(x, t, rb);
        let block = micro::row_block(c.kd * 4) as i64;
        let (zero, n) = (k.ic(0), k.n);
        let last = k.addi(n, block - 1);
        k.for_step(zero, last, block, |k, t0| {
            let end = k.addi(t0, block);
            let end = k.b.ins().smin(end, n);
            grid(k, c, w, pb, (f, bf16_dot), out, (t0, end), &row, rb, (micro::FLOAT_TOKENS, 1), &mut *epi);
        });
    }
    true
}

/// Rows `t0..t1` × the unit's panels, in tiles of `DECODE_PANELS` (one row) or
/// `PREFILL_PANELS` × `tokens` (`TILE_PANELS` for the `vdpbf16ps` tile: `f.1`). Each row is
/// `terms` rows of `x` (`rb` bytes apart) whose sums are added.
#[allow(clippy::too_many_arguments)]
fn grid(
    k: &mut Kb<'_>,
    c: &Ctx,
    w: Value,
    pb: i64,
    (f, bf16_dot): (MicroFn, bool),
    out: Value,
    (t0, t1): (Value, Value),
    row: &dyn Fn(&mut Kb<'_>, Value) -> Value,
    rb: i64,
    (tokens, terms): (usize, usize),
    epi: &mut dyn FnMut(&mut Kb<'_>, Value, Value, TileVals),
) {
    let (lo, hi) = (k.lo, k.hi);
    let one = k.addi(t0, 1);
    let single = k.icmp(IntCC::Equal, t1, one);
    // (the `vdpbf16ps` tiles take 4 panels at a time)
    let prefill_panels = if bf16_dot { TILE_PANELS } else { micro::PREFILL_PANELS };
    let (pd, pp) = (k.ic(micro::DECODE_PANELS as i64), k.ic(prefill_panels as i64));
    let pstep = k.select(single, pd, pp);
    let (td, tp) = (k.ic(1), k.ic(tokens as i64));
    let tstep = k.select(single, td, tp);
    // a few rows (a batched decode step) go to the micro-kernel all at once: a tile of every
    // row over one panel reads each weight line once from memory for all of them
    let tstep = if tokens * terms < TILE_TOKENS {
        let rows = k.b.ins().isub(t1, t0);
        let all = k.ic((TILE_TOKENS / terms) as i64);
        let few = k.icmp(IntCC::UnsignedLessThanOrEqual, rows, all);
        k.select(few, all, tstep)
    } else {
        tstep
    };
    let mut sig = Signature::new(k.call_conv());
    sig.params.extend([AbiParam::new(I64); 8]);
    let sig = k.b.import_signature(sig);
    // a SwiGLU projection's epilogue by the micro-kernel, where the host has one
    let swiglu = c.swiglu_out.zip(k.wide.and_then(micro::swiglu)).map(|(dst, f)| {
        let mut sig = Signature::new(k.call_conv());
        sig.params.extend([AbiParam::new(I64); 7]);
        (dst, f, k.b.import_signature(sig))
    });
    let pv = k.var(I64, lo);
    k.for_ptr(pv, hi, |k| {
        let p = k.get(pv);
        let rest = k.b.ins().isub(hi, p);
        let np = k.b.ins().umin(rest, pstep);
        let wp = k.at(w, p, pb);
        let tv = k.var(I64, t0);
        k.for_ptr(tv, t1, |k| {
            let t = k.get(tv);
            let rest = k.b.ins().isub(t1, t);
            let nt = k.b.ins().umin(rest, tstep);
            let xp = row(k, t);
            let pbv = k.ic(pb);
            let rbv = k.ic(rb);
            let kd = k.ic(c.kd as i64);
            let fp = k.ic(f as usize as i64);
            let ntx = k.muli(nt, terms as i64);
            k.b.ins().call_indirect(sig, fp, &[wp, pbv, np, xp, rbv, ntx, kd, out]);
            if let Some(((dst, m_out), sf, swiglu_sig)) = swiglu {
                // the SwiGLU epilogue of the whole tile in one call (what `epi` computes)
                let row = k.at(dst, t, (m_out * 4) as i64);
                let d = k.at(row, p, (PANEL / 2 * 4) as i64);
                let inv = match c.inv {
                    Some(inv) => k.at(inv, t, 4),
                    None => k.ic(0),
                };
                let (terms_v, stride, fv) = (k.ic(terms as i64), k.ic(m_out as i64), k.ic(sf as usize as i64));
                k.b.ins().call_indirect(swiglu_sig, fv, &[out, nt, np, terms_v, inv, d, stride]);
            } else {
                let zero = k.ic(0);
                k.for_range(zero, np, |k, q| {
                    let panel = k.add(p, q);
                    let zero = k.ic(0);
                    k.for_range(zero, nt, |k, tt| {
                        let tok = k.add(t, tt);
                        let i = k.muli(tt, (terms * TILE_PANELS) as i64);
                        let i = k.add(i, q);
                        let src = k.at(out, i, (PANEL * 4) as i64);
                        let vals = finish(k, c, panel, tok, src, terms);
                        epi(k, panel, tok, vals);
                    });
                });
            }
            let t = k.add(t, nt);
            k.set(tv, t);
        });
        let p = k.add(p, np);
        k.set(pv, p);
    });
}

/// The 16 sums at `src` for `(panel, row)` (the sum of `terms` tile rows from there), with the
/// row's RMS scale and the panel's bias.
fn finish(k: &mut Kb<'_>, c: &Ctx, panel: Value, tok: Value, src: Value, terms: usize) -> TileVals {
    let scale = c.inv.map(|inv| {
        let a = k.at(inv, tok, 4);
        let s = k.ld(F32, a, 0);
        k.splat(s)
    });
    let mut vals = Vec::new();
    for j in 0..PANEL / 4 {
        let mut v = k.ld(V4, src, (j * 16) as i64);
        for u in 1..terms {
            let more = k.ld(V4, src, ((u * TILE_PANELS * PANEL + j * 4) * 4) as i64);
            v = k.fadd(v, more);
        }
        if let Some(s) = scale {
            v = k.fmul(v, s);
        }
        if let Some(b) = c.bias {
            let pb = k.at(b, panel, (PANEL * 4) as i64);
            let bv = k.ld(V4, pb, (j * 16) as i64);
            v = k.fadd(v, bv);
        }
        vals.push((0, j, v));
    }
    vals
}
