//! Mixture of experts: routing (softmax, top-k, renormalize) and the two expert projections,
//! which read only the panels of the experts each token selected, grouped by expert: the
//! rows that picked an expert go through its panels together (a prefill reads each selected
//! panel once per group of up to 8 rows, with the projections' register tiles).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};

use super::elementwise::apply_unary;
use super::kb::{Kb, F32, I64, V4};
use llmc_ir::DType;

use super::matmul::{Ctx, TileVals};
use crate::pack::panel_bytes;
use crate::pack::PANEL;
use crate::program::Unary;

/// `[logits, route]`: per row, `route = [k indices as f32, k weights]`.
pub fn route(k: &mut Kb<'_>, experts: usize, top_k: usize) {
    let (logits, route) = (k.ptr(0), k.ptr(1));
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (experts * 4) as u32, 4));
    let p = k.b.ins().stack_addr(I64, slot, 0);
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let lr = k.at(logits, t, (experts * 4) as i64);
        let rr = k.at(route, t, (2 * top_k * 4) as i64);
        // softmax numerators (the normalization cancels in the renormalized weights)
        let mut max = k.ld(F32, lr, 0);
        for e in 1..experts {
            let v = k.ld(F32, lr, (e * 4) as i64);
            max = k.fmax(max, v);
        }
        for e in 0..experts {
            let v = k.ld(F32, lr, (e * 4) as i64);
            let z = k.fsub(v, max);
            let ex = k.exp(F32, z);
            k.st(ex, p, (e * 4) as i64);
        }
        // top-k by repeated argmax; a picked expert is set to -1
        let mut picked = Vec::new();
        for _ in 0..top_k {
            let neg = k.f(-1.0);
            let best_v = k.var(F32, neg);
            let zero = k.ic(0);
            let best_i = k.var(I64, zero);
            for e in 0..experts {
                let v = k.ld(F32, p, (e * 4) as i64);
                let bv = k.get(best_v);
                let better = k.fcmp(FloatCC::GreaterThan, v, bv);
                let nv = k.select(better, v, bv);
                let ei = k.ic(e as i64);
                let bi = k.get(best_i);
                let ni = k.select(better, ei, bi);
                k.set(best_v, nv);
                k.set(best_i, ni);
            }
            let bi = k.get(best_i);
            let bv = k.get(best_v);
            let at = k.at(p, bi, 4);
            let neg = k.f(-1.0);
            k.st(neg, at, 0);
            picked.push((bi, bv));
        }
        let mut sum = picked[0].1;
        for &(_, v) in &picked[1..] {
            sum = k.fadd(sum, v);
        }
        for (j, &(i, v)) in picked.iter().enumerate() {
            let fi = k.b.ins().fcvt_from_sint(types::F32, i);
            k.st(fi, rr, (j * 4) as i64);
            let w = k.fdiv(v, sum);
            k.st(w, rr, ((top_k + j) * 4) as i64);
        }
    });
}

/// Expert index (from its f32 form) and weight of slot `j` of row `t`.
fn pick(k: &mut Kb<'_>, route: Value, t: Value, top_k: usize, j: usize) -> (Value, Value) {
    let rr = k.at(route, t, (2 * top_k * 4) as i64);
    let fi = k.ld(F32, rr, (j * 4) as i64);
    let e = k.b.ins().fcvt_to_sint_sat(I64, fi);
    let w = k.ld(F32, rr, ((top_k + j) * 4) as i64);
    (e, w)
}

/// Bytes of stack the gathered rows of one expert may take (`rows` below); lowering refuses
/// MoE layers whose rows (`d` or `ff` f32) would not fit one.
pub const GATHER_BYTES: usize = 256 * 1024;

/// Rows of `kd` f32 gathered per flush: up to a wide tile's `TILE_TOKENS`, within
/// `GATHER_BYTES`.
fn group_rows(kd: usize) -> usize {
    (GATHER_BYTES / (kd * 4)).clamp(1, crate::micro::TILE_TOKENS)
}

/// The expert walk shared by both projections, grouped by expert: for each expert `e`, the
/// rows that selected it (`row_of(t, j)`: the input row of token `t`'s `j`-th pick) are
/// copied into a stack buffer `group_rows(kd)` at a time, and each full group (and the last)
/// goes through `matmul::panels` over expert `e`'s panels of the unit (`ppe` panels per
/// expert, `pb` bytes each): every weight panel is read once per group of rows, not once per
/// token, with the wide micro-kernels' register tiles. `epi(k, panel, ids, row, vals)` gets
/// the tile values of group row `row + tt`, whose output row `dst_of(t, j)` (i64) and pick
/// weight (f32) are at `ids + 16·(row + tt)` (`group_id`).
#[allow(clippy::too_many_arguments)]
fn by_expert(
    k: &mut Kb<'_>,
    x: Value,
    w: Value,
    route: Value,
    (kd, wt): (usize, DType),
    (experts, top_k, ppe): (usize, usize, usize),
    (row_of, dst_of): (&dyn Fn(&mut Kb<'_>, Value, usize) -> Value, &dyn Fn(&mut Kb<'_>, Value, usize) -> Value),
    epi: &mut dyn FnMut(&mut Kb<'_>, Value, Value, Value, TileVals),
) {
    let g = group_rows(kd);
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (g * kd * 4) as u32, 4));
    let buf = k.b.ins().stack_addr(I64, slot, 0);
    let islot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (g * 16) as u32, 3));
    let ids = k.b.ins().stack_addr(I64, islot, 0);
    let c = Ctx { x: buf, bias: None, kd, inv: None, wt, xq: None, swiglu_out: None, xbf16: false };
    let pb = panel_bytes(wt, kd) as i64;
    let n = k.n;
    let zero = k.ic(0);
    let ne = k.ic(experts as i64);
    k.for_range(zero, ne, |k, e| {
        let ep = k.muli(e, ppe as i64);
        let we = k.at(w, ep, pb);
        let zero = k.ic(0);
        let cnt = k.var(I64, zero);
        // tokens 0..n gather; the extra last round only flushes what is left
        let end = k.addi(n, 1);
        k.for_range(zero, end, |k, t| {
            let more = k.icmp(IntCC::SignedLessThan, t, n);
            k.when(more, |k| {
                for j in 0..top_k {
                    let (ej, wj) = pick(k, route, t, top_k, j);
                    let hit = k.icmp(IntCC::Equal, ej, e);
                    k.when(hit, |k| {
                        let i = k.get(cnt);
                        let src_row = row_of(k, t, j);
                        let src = k.at(x, src_row, (kd * 4) as i64);
                        let dst = k.at(buf, i, (kd * 4) as i64);
                        // `kd` is a multiple of 8 (lowering checks it)
                        let (z, end) = (k.ic(0), k.ic(kd as i64));
                        k.for_step(z, end, 8, |k, o| {
                            let (s, d) = (k.at(src, o, 4), k.at(dst, o, 4));
                            let (a, b) = (k.ld(V4, s, 0), k.ld(V4, s, 16));
                            k.st(a, d, 0);
                            k.st(b, d, 16);
                        });
                        let id = k.at(ids, i, 16);
                        let dst_row = dst_of(k, t, j);
                        k.st(dst_row, id, 0);
                        k.st(wj, id, 8);
                        let i = k.addi(i, 1);
                        k.set(cnt, i);
                    });
                }
            });
            let i = k.get(cnt);
            let full = k.b.ins().icmp_imm_s(IntCC::Equal, i, g as i64);
            let last = k.icmp(IntCC::Equal, t, n);
            let any = k.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, i, 0);
            let last = k.b.ins().band(last, any);
            let flush = k.b.ins().bor(full, last);
            k.when(flush, |k| {
                let saved = k.n;
                k.n = i;
                super::matmul::panels(k, &c, we, false, &mut |k, p, row, vals| epi(k, p, ids, row, vals));
                k.n = saved;
                let zero = k.ic(0);
                k.set(cnt, zero);
            });
        });
    });
}

/// Output row and pick weight of group row `i` (see `by_expert`).
fn group_id(k: &mut Kb<'_>, ids: Value, i: Value) -> (Value, Value) {
    let id = k.at(ids, i, 16);
    (k.ld(I64, id, 0), k.ld(F32, id, 8))
}

/// `[x, gate_up, route, h]`, units: panels of one expert's 2ff rows (8 gate rows, then their
/// 8 up rows). `h[t, j·ff + 8p ..]` = silu(gate)·up of panel `p` of token `t`'s `j`-th expert.
pub fn gate_up(k: &mut Kb<'_>, d: usize, ff: usize, experts: usize, top_k: usize, wt: DType) {
    let (x, w, route, h) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let ppe = 2 * ff / PANEL;
    let row_of = |_: &mut Kb<'_>, t: Value, _: usize| t;
    let mut epi = |k: &mut Kb<'_>, p: Value, ids: Value, row: Value, vals: TileVals| {
        let rows: Vec<usize> = {
            let mut r: Vec<usize> = vals.iter().map(|v| v.0).collect();
            r.dedup();
            r
        };
        for tt in rows {
            let i = k.addi(row, tt as i64);
            let (r, _) = group_id(k, ids, i);
            let hrow = k.at(h, r, (ff * 4) as i64);
            let dst = k.at(hrow, p, (PANEL / 2 * 4) as i64);
            let of = |vi: usize| vals.iter().find(|v| v.0 == tt && v.1 == vi).map(|v| v.2);
            for vi in 0..2 {
                match (of(vi), of(vi + 2)) {
                    (Some(g), Some(u)) => {
                        let s = apply_unary(k, Unary::Silu, V4, g);
                        let y = k.fmul(s, u);
                        k.st(y, dst, (vi * 16) as i64);
                    }
                    // a half tile of gates parks silu(gate); the up half that follows
                    // multiplies it in
                    (Some(g), None) => {
                        let s = apply_unary(k, Unary::Silu, V4, g);
                        k.st(s, dst, (vi * 16) as i64);
                    }
                    (None, Some(u)) => {
                        let s = k.ld(V4, dst, (vi * 16) as i64);
                        let y = k.fmul(s, u);
                        k.st(y, dst, (vi * 16) as i64);
                    }
                    (None, None) => {}
                }
            }
        }
    };
    by_expert(k, x, w, route, (d, wt), (experts, top_k, ppe), (&row_of, &h_row(top_k)), &mut epi);
}

/// Row `t·top_k + j` of `h` seen as an `[n·top_k, ff]` matrix: token `t`'s `j`-th expert.
fn h_row(top_k: usize) -> impl Fn(&mut Kb<'_>, Value, usize) -> Value {
    move |k: &mut Kb<'_>, t: Value, j: usize| {
        let tk = k.muli(t, top_k as i64);
        k.addi(tk, j as i64)
    }
}

/// `[h, down, route, out]`, units: panels of d. `out[t] = Σ_j w_j · down_{e_j} · h[t, j·ff ..]`
/// (summed in expert order).
pub fn down(k: &mut Kb<'_>, d: usize, ff: usize, experts: usize, top_k: usize, wt: DType) {
    let (h, w, route, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let ppe = d / PANEL;
    // the unit's columns of every token's output start at zero; each expert adds its share
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    let zero = k.ic(0);
    k.for_range(zero, n, |k, t| {
        let orow = k.at(out, t, (d * 4) as i64);
        k.for_range(lo, hi, |k, p| {
            let dst = k.at(orow, p, (PANEL * 4) as i64);
            let z = k.c(V4, 0.0);
            for vi in 0..PANEL / 4 {
                k.st(z, dst, (vi * 16) as i64);
            }
        });
    });
    let token = |_: &mut Kb<'_>, t: Value, _: usize| t;
    let mut epi = |k: &mut Kb<'_>, p: Value, ids: Value, row: Value, vals: TileVals| {
        for &(tt, vi, v) in &vals {
            let i = k.addi(row, tt as i64);
            let (t, wj) = group_id(k, ids, i);
            let orow = k.at(out, t, (d * 4) as i64);
            let dst = k.at(orow, p, (PANEL * 4) as i64);
            let w4 = k.splat(wj);
            let a = k.ld(V4, dst, (vi * 16) as i64);
            let a = k.fma(v, w4, a);
            k.st(a, dst, (vi * 16) as i64);
        }
    };
    by_expert(k, h, w, route, (ff, wt), (experts, top_k, ppe), (&h_row(top_k), &token), &mut epi);
}
