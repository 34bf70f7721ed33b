//! Mixture of experts: routing (softmax, top-k, renormalize) and the two expert projections,
//! which read only the panels of the experts each token selected.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};

use super::elementwise::apply_unary;
use super::kb::{Kb, F32, I64, V4};
use llmc_ir::DType;

use super::matmul::{tile, Ctx};
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

/// `[x, gate_up, route, h]`, units: panels of one expert's 2ff rows.
pub fn gate_up(k: &mut Kb<'_>, d: usize, ff: usize, top_k: usize, wt: DType) {
    let (x, w, route, h) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let panels = (2 * ff / PANEL) as i64;
    let c = Ctx { x, bias: None, kd: d, inv: None, wt, xq: None };
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    k.for_range(lo, hi, |k, p| {
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            for j in 0..top_k {
                let (e, _) = pick(k, route, t, top_k, j);
                let ep = k.muli(e, panels);
                let gp = k.add(ep, p);
                let wp = k.at(w, gp, panel_bytes(wt, d) as i64);
                let vals = tile(k, &c, p, wp, t, 1, 0, 4);
                let hrow = k.at(h, t, (top_k * ff * 4) as i64);
                let hj = k.addi(hrow, (j * ff * 4) as i64);
                let dst = k.at(hj, p, (PANEL / 2 * 4) as i64);
                for vi in 0..2 {
                    let s = apply_unary(k, Unary::Silu, V4, vals[vi].2);
                    let y = k.fmul(s, vals[vi + 2].2);
                    k.st(y, dst, (vi * 16) as i64);
                }
            }
        });
    });
}

/// `[h, down, route, out]`, units: panels of d.
pub fn down(k: &mut Kb<'_>, d: usize, ff: usize, top_k: usize, wt: DType) {
    let (h, w, route, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let panels = (d / PANEL) as i64;
    let c = Ctx { x: h, bias: None, kd: ff, inv: None, wt, xq: None };
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    k.for_range(lo, hi, |k, p| {
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            let mut acc: Vec<Value> = (0..4).map(|_| k.c(V4, 0.0)).collect();
            for j in 0..top_k {
                let (e, wj) = pick(k, route, t, top_k, j);
                let ep = k.muli(e, panels);
                let gp = k.add(ep, p);
                let wp = k.at(w, gp, panel_bytes(wt, ff) as i64);
                // h row (t, j) is row t·top_k + j of an [n·top_k, ff] matrix
                let tk = k.muli(t, top_k as i64);
                let row = k.addi(tk, j as i64);
                let vals = tile(k, &c, p, wp, row, 1, 0, 4);
                let w4 = k.splat(wj);
                for (vi, a) in acc.iter_mut().enumerate() {
                    *a = k.fma(vals[vi].2, w4, *a);
                }
            }
            let orow = k.at(out, t, (d * 4) as i64);
            let dst = k.at(orow, p, (PANEL * 4) as i64);
            for (vi, a) in acc.iter().enumerate() {
                k.st(*a, dst, (vi * 16) as i64);
            }
        });
    });
}
