//! Attention over the KV cache.
//!
//! Cache layout per layer: `[cap, kv_heads, head_dim]` for K and for V; position `p` lives in
//! slot `p % cap` (`cap` is the context size, or a ring of `window + chunk` slots for
//! sliding-window layers). `kv_append` writes the step's keys and values; `attention` then
//! computes, for each (kv head, token) unit, the outputs of the query heads of that group with
//! an online softmax in one pass over positions: each K and V vector loaded is shared by the
//! whole group.

use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::Value;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};

use super::kb::{Kb, F32, I64, V4};

/// `[k, v, positions, kcache, vcache]`, units: rows. `w` = kv_heads × head_dim floats per row.
pub fn kv_append(k: &mut Kb<'_>, w: usize) {
    let (kp, vp, pos, kc, vc) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let (lo, hi, cap) = (k.lo, k.hi, k.cap);
    k.for_range(lo, hi, |k, t| {
        let pp = k.at(pos, t, 4);
        let p = k.ld_i32(pp, 0);
        let slot = k.b.ins().urem(p, cap);
        for (src, dst) in [(kp, kc), (vp, vc)] {
            let s = k.at(src, t, (w * 4) as i64);
            let d = k.at(dst, slot, (w * 4) as i64);
            super::elementwise::copy(k, s, d, w);
        }
    });
}

/// Vector/scalar chunks of a head: `(float offset, is_vector)`, fully unrolled (head_dim is a
/// small constant).
fn head_chunks(hd: usize) -> Vec<(usize, bool)> {
    let mut v: Vec<(usize, bool)> = (0..hd / 4).map(|i| (4 * i, true)).collect();
    v.extend((hd / 4 * 4..hd).map(|i| (i, false)));
    v
}

/// `[q, positions, kcache, vcache, out]`, units: `kv_heads × n`.
pub fn attention(k: &mut Kb<'_>, heads: usize, kv_heads: usize, hd: usize, window: Option<usize>, scale: f32) {
    let (q, pos, kc, vc, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let group = heads / kv_heads;
    let qw = heads * hd;
    let chunks = head_chunks(hd);
    let (lo, hi, n, cap) = (k.lo, k.hi, k.n, k.cap);
    k.for_range(lo, hi, |k, u| {
        let kvh = k.b.ins().udiv(u, n);
        let t = k.b.ins().urem(u, n);
        let pp = k.at(pos, t, 4);
        let p = k.ld_i32(pp, 0);
        // First position attended: max(0, p - window + 1).
        let jlo = match window {
            Some(w) => {
                let a = k.addi(p, 1 - w as i64);
                let zero = k.ic(0);
                k.b.ins().smax(a, zero)
            }
            None => k.ic(0),
        };
        // The group's query rows and output rows are contiguous: heads kvh*group ...
        let qrow = k.at(q, t, (qw * 4) as i64);
        let qg = k.at(qrow, kvh, (group * hd * 4) as i64);
        let orow = k.at(out, t, (qw * 4) as i64);
        let og = k.at(orow, kvh, (group * hd * 4) as i64);
        let zero4 = k.c(V4, 0.0);
        let zero = k.f(0.0);
        for g in 0..group {
            for &(off, vec) in &chunks {
                let z = if vec { zero4 } else { zero };
                k.st(z, og, ((g * hd + off) * 4) as i64);
            }
        }
        let minf = k.f(f32::MIN);
        let m: Vec<_> = (0..group).map(|_| k.var(F32, minf)).collect();
        let l: Vec<_> = (0..group).map(|_| k.var(F32, zero)).collect();
        let end = k.addi(p, 1);
        // The cache slot of position j is j % cap: one division here, then a wrapping counter.
        let slot0 = k.b.ins().urem(jlo, cap);
        let slot_var = k.var(I64, slot0);
        k.for_range(jlo, end, |k, _j| {
            let slot = k.get(slot_var);
            let next = k.addi(slot, 1);
            let wrap = k.icmp(IntCC::Equal, next, cap);
            let first_slot = k.ic(0);
            let next = k.select(wrap, first_slot, next);
            k.set(slot_var, next);
            let row = k.muli(slot, kv_heads as i64);
            let row = k.add(row, kvh);
            let kj = k.at(kc, row, (hd * 4) as i64);
            let vj = k.at(vc, row, (hd * 4) as i64);
            // scores of the group's heads against k_j (k loaded once per chunk)
            let mut acc: Vec<Value> = (0..group).map(|_| zero4).collect();
            let mut tail: Vec<Value> = (0..group).map(|_| zero).collect();
            for &(off, vec) in &chunks {
                let ty = if vec { V4 } else { F32 };
                let kv = k.ld(ty, kj, (off * 4) as i64);
                for g in 0..group {
                    let qv = k.ld(ty, qg, ((g * hd + off) * 4) as i64);
                    if vec {
                        acc[g] = k.fma(qv, kv, acc[g]);
                    } else {
                        tail[g] = k.fma(qv, kv, tail[g]);
                    }
                }
            }
            let sc = k.f(scale);
            let mut pw = Vec::new();
            for g in 0..group {
                let s = k.hsum(acc[g]);
                let s = k.fadd(s, tail[g]);
                let s = k.fmul(s, sc);
                // online softmax; the running max only rarely moves, so the rescale of l and
                // of the head's output (by e^{m-s}) runs only when it does
                let mo = k.get(m[g]);
                let grows = k.fcmp(FloatCC::GreaterThan, s, mo);
                let (mg, lg) = (m[g], l[g]);
                let chunks = &chunks;
                k.when(grows, |k| {
                    let d1 = k.fsub(mo, s);
                    let c = k.exp(F32, d1);
                    let lo_ = k.get(lg);
                    let ln = k.fmul(lo_, c);
                    k.set(lg, ln);
                    k.set(mg, s);
                    let c4 = k.splat(c);
                    for &(off, vec) in chunks {
                        let ty = if vec { V4 } else { F32 };
                        let o_off = ((g * hd + off) * 4) as i64;
                        let o = k.ld(ty, og, o_off);
                        let oc = k.fmul(o, if vec { c4 } else { c });
                        k.st(oc, og, o_off);
                    }
                });
                let mn = k.get(m[g]);
                let d2 = k.fsub(s, mn);
                let e = k.exp(F32, d2);
                let lo_ = k.get(l[g]);
                let ln = k.fadd(lo_, e);
                k.set(l[g], ln);
                pw.push(e);
            }
            // out_g += e_g · v_j (v loaded once per chunk)
            let pw4: Vec<Value> = pw.iter().map(|&e| k.splat(e)).collect();
            for &(off, vec) in &chunks {
                let ty = if vec { V4 } else { F32 };
                let vv = k.ld(ty, vj, (off * 4) as i64);
                for g in 0..group {
                    let o_off = ((g * hd + off) * 4) as i64;
                    let o = k.ld(ty, og, o_off);
                    let e = if vec { pw4[g] } else { pw[g] };
                    let o2 = k.fma(vv, e, o);
                    k.st(o2, og, o_off);
                }
            }
        });
        // normalize
        let one = k.f(1.0);
        for g in 0..group {
            let lg = k.get(l[g]);
            let inv = k.fdiv(one, lg);
            let inv4 = k.splat(inv);
            for &(off, vec) in &chunks {
                let ty = if vec { V4 } else { F32 };
                let o_off = ((g * hd + off) * 4) as i64;
                let o = k.ld(ty, og, o_off);
                let y = k.fmul(o, if vec { inv4 } else { inv });
                k.st(y, og, o_off);
            }
        }
    });
}
