//! Attention over the KV cache.
//!
//! Cache layout per layer: `[kv_heads, cap, head_dim]` for K and for V (each head's positions
//! contiguous, so attention streams them); position `p` lives in slot `p % cap` (`cap` is the context size, or a ring of `window + chunk` slots for
//! sliding-window layers). `kv_append` writes the step's keys and values; `attention` then
//! computes, for each (kv head, token) unit, the outputs of the query heads of that group with
//! an online softmax over blocks of positions (see `attention`).

use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value};

use cranelift_codegen::ir::condcodes::IntCC;

use super::kb::{Kb, F32, I64, V4};

/// `[k, v, positions, kcache, vcache]`, units: rows (each `kv_heads × head_dim` floats).
pub fn kv_append(k: &mut Kb<'_>, kv_heads: usize, hd: usize) {
    let (kp, vp, pos, kc, vc) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let (lo, hi, cap) = (k.lo, k.hi, k.cap);
    let w = kv_heads * hd;
    k.for_range(lo, hi, |k, t| {
        let pp = k.at(pos, t, 4);
        let p = k.ld_i32(pp, 0);
        let slot = k.b.ins().urem(p, cap);
        for (src, dst) in [(kp, kc), (vp, vc)] {
            let s = k.at(src, t, (w * 4) as i64);
            for h in 0..kv_heads {
                let hrow = k.muli(cap, h as i64);
                let row = k.add(hrow, slot);
                let d = k.at(dst, row, (hd * 4) as i64);
                let sh = k.addi(s, (h * hd * 4) as i64);
                super::elementwise::copy(k, sh, d, hd);
            }
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

/// Multiplies the head output at float `at` of `out` (chunks as `head_chunks`) by the scalar `c`.
fn scale_head(k: &mut Kb<'_>, out: Value, at: usize, chunks: &[(usize, bool)], c: Value) {
    let c4 = k.splat(c);
    for &(off, vec) in chunks {
        let ty = if vec { V4 } else { F32 };
        let o_off = ((at + off) * 4) as i64;
        let o = k.ld(ty, out, o_off);
        let y = k.fmul(o, if vec { c4 } else { c });
        k.st(y, out, o_off);
    }
}

/// Positions per key block: the block's scores sit in a stack array, `STRIDE` floats per head
/// (room for the padding up to a multiple of 4).
const BLOCK: usize = 128;
const STRIDE: usize = BLOCK + 4;

/// `[q, positions, kcache, vcache, out]`, units: `kv_heads × n`.
///
/// Keys are taken in blocks of `BLOCK` positions (flash-attention style, per query row): the
/// block's scores for the group's heads go to a stack array, then its maximum moves each
/// head's running maximum (rescaling the running sum and output once per block), the scores
/// become weights with a vectorized exp, and the values are accumulated dims-chunk by
/// dims-chunk with the group's accumulators in registers. Each K and V vector loaded is shared
/// by the whole group.
pub fn attention(k: &mut Kb<'_>, heads: usize, kv_heads: usize, hd: usize, window: Option<usize>, scale: f32) {
    if let Some(f) = k.wide.and_then(crate::micro::attention).filter(|_| hd <= crate::micro::MAX_HEAD_DIM) {
        return wide(k, f, heads, kv_heads, hd, window, scale);
    }
    let (q, pos, kc, vc, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let group = heads / kv_heads;
    let qw = heads * hd;
    let chunks = head_chunks(hd);
    let nvec = hd / 4;
    // dims chunk of the value pass: group × cv accumulators stay in registers
    let cv = (8 / group).clamp(1, 4);
    let slot =
        k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (group * STRIDE * 4) as u32, 4));
    let sbuf = k.b.ins().stack_addr(I64, slot, 0);
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
        let last = k.addi(end, BLOCK as i64 - 1);
        k.for_step(jlo, last, BLOCK as i64, |k, b0| {
            let bend = k.addi(b0, BLOCK as i64);
            let full = k.icmp(IntCC::SignedLessThanOrEqual, bend, end);
            let bend = k.select(full, bend, end);
            let len = k.b.ins().isub(bend, b0);
            // K and V rows of position b0 + jj: a wrapping slot counter from b0 % cap
            let rows = |k: &mut Kb<'_>, body: &mut dyn FnMut(&mut Kb<'_>, Value, Value)| {
                let slot0 = k.b.ins().urem(b0, cap);
                let slot_var = k.var(I64, slot0);
                let z = k.ic(0);
                k.for_range(z, len, |k, jj| {
                    let slot = k.get(slot_var);
                    let next = k.addi(slot, 1);
                    let wrap = k.icmp(IntCC::Equal, next, cap);
                    let first_slot = k.ic(0);
                    let next = k.select(wrap, first_slot, next);
                    k.set(slot_var, next);
                    let hrow = k.mul(kvh, cap);
                    let row = k.add(hrow, slot);
                    body(k, jj, row);
                });
            };
            // 1. scores s[g][jj] = scale · q_g · k_j, and their block maximum per head
            let mx: Vec<_> = (0..group).map(|_| k.var(F32, minf)).collect();
            rows(k, &mut |k, jj, row| {
                let kj = k.at(kc, row, (hd * 4) as i64);
                let mut acc: Vec<[Value; 2]> = (0..group).map(|_| [zero4, zero4]).collect();
                let mut tail: Vec<Value> = (0..group).map(|_| zero).collect();
                for (ci, &(off, vec)) in chunks.iter().enumerate() {
                    let ty = if vec { V4 } else { F32 };
                    let kv = k.ld(ty, kj, (off * 4) as i64);
                    for g in 0..group {
                        let qv = k.ld(ty, qg, ((g * hd + off) * 4) as i64);
                        if vec {
                            acc[g][ci % 2] = k.fma(qv, kv, acc[g][ci % 2]);
                        } else {
                            tail[g] = k.fma(qv, kv, tail[g]);
                        }
                    }
                }
                let sc = k.f(scale);
                for g in 0..group {
                    let a = k.fadd(acc[g][0], acc[g][1]);
                    let h = k.hsum(a);
                    let s = k.fadd(h, tail[g]);
                    let s = k.fmul(s, sc);
                    let at = k.at(sbuf, jj, 4);
                    k.st(s, at, (g * STRIDE * 4) as i64);
                    let mo = k.get(mx[g]);
                    let mn = k.fmax(mo, s);
                    k.set(mx[g], mn);
                }
            });
            // 2. the running maximum moves: rescale l and the output by e^(m_old - m_new); the
            // padding after the block's last score weighs (almost) nothing
            let pad_end = k.addi(len, 3);
            let neg = k.f(-1e30);
            k.for_range(len, pad_end, |k, jj| {
                let at = k.at(sbuf, jj, 4);
                for g in 0..group {
                    k.st(neg, at, (g * STRIDE * 4) as i64);
                }
            });
            for g in 0..group {
                let mo = k.get(m[g]);
                let mb = k.get(mx[g]);
                let mn = k.fmax(mo, mb);
                k.set(m[g], mn);
                let d = k.fsub(mo, mn);
                let c = k.exp(F32, d);
                let lg = k.get(l[g]);
                let lc = k.fmul(lg, c);
                scale_head(k, og, g * hd, &chunks, c);
                // 3. weights e^(s - m), four at a time, and their sum
                let mn4 = k.splat(mn);
                let sum = k.var(V4, zero4);
                let z = k.ic(0);
                k.for_step(z, pad_end, 4, |k, jj| {
                    let at = k.at(sbuf, jj, 4);
                    let sv = k.ld(V4, at, (g * STRIDE * 4) as i64);
                    let d = k.fsub(sv, mn4);
                    let e = k.exp(V4, d);
                    k.st(e, at, (g * STRIDE * 4) as i64);
                    let a = k.get(sum);
                    let a = k.fadd(a, e);
                    k.set(sum, a);
                });
                let a = k.get(sum);
                let h = k.hsum(a);
                let ln = k.fadd(lc, h);
                k.set(l[g], ln);
            }
            // 4. out_g += Σ_j w_gj · v_j, `cv` vectors of dims at a time
            let mut c0 = 0;
            while c0 < nvec {
                let w = cv.min(nvec - c0);
                let accs: Vec<Vec<_>> = (0..group).map(|_| (0..w).map(|_| k.var(V4, zero4)).collect()).collect();
                rows(k, &mut |k, jj, row| {
                    let vj = k.at(vc, row, (hd * 4) as i64);
                    let vv: Vec<Value> = (0..w).map(|c| k.ld(V4, vj, ((c0 + c) * 16) as i64)).collect();
                    let at = k.at(sbuf, jj, 4);
                    for (g, ag) in accs.iter().enumerate() {
                        let e = k.ld(F32, at, (g * STRIDE * 4) as i64);
                        let e4 = k.splat(e);
                        for (c, a) in ag.iter().enumerate() {
                            let x = k.get(*a);
                            let x = k.fma(vv[c], e4, x);
                            k.set(*a, x);
                        }
                    }
                });
                for (g, ag) in accs.iter().enumerate() {
                    for (c, a) in ag.iter().enumerate() {
                        let o_off = ((g * hd + (c0 + c) * 4) * 4) as i64;
                        let o = k.ld(V4, og, o_off);
                        let x = k.get(*a);
                        let o = k.fadd(o, x);
                        k.st(o, og, o_off);
                    }
                }
                c0 += w;
            }
            // the dims past the last whole vector (head_dim not a multiple of 4)
            if hd % 4 != 0 {
                rows(k, &mut |k, jj, row| {
                    let vj = k.at(vc, row, (hd * 4) as i64);
                    let at = k.at(sbuf, jj, 4);
                    for g in 0..group {
                        let e = k.ld(F32, at, (g * STRIDE * 4) as i64);
                        for d in nvec * 4..hd {
                            let v = k.ld(F32, vj, (d * 4) as i64);
                            let o_off = ((g * hd + d) * 4) as i64;
                            let o = k.ld(F32, og, o_off);
                            let o = k.fma(v, e, o);
                            k.st(o, og, o_off);
                        }
                    }
                });
            }
        });
        // normalize
        let one = k.f(1.0);
        for g in 0..group {
            let lg = k.get(l[g]);
            let inv = k.fdiv(one, lg);
            scale_head(k, og, g * hd, &chunks, inv);
        }
    });
}

/// `attention` through the wide micro-kernel (`micro::attention`): the unit range is cut into
/// runs of consecutive rows of one kv head, up to `micro::ROWS / group` rows per call, so the
/// micro-kernel reads each K and V row once per run.
fn wide(
    k: &mut Kb<'_>,
    f: crate::micro::AttnFn,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
    scale: f32,
) {
    use crate::micro::{ATTN_BYTES, ROWS};
    use cranelift_codegen::ir::{AbiParam, Signature};
    let (q, pos, kc, vc, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let group = heads / kv_heads;
    let qw = (heads * hd * 4) as i64;
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, ATTN_BYTES as u32, 3));
    let call = k.b.ins().stack_addr(I64, slot, 0);
    // the words every call shares: kc, vc, cap, group, head_dim, q_stride, window, scale
    let cap = k.cap;
    k.st(kc, call, 24);
    k.st(vc, call, 32);
    k.st(cap, call, 56);
    for (off, v) in [(64, group), (72, hd), (80, heads * hd), (88, window.unwrap_or(0))] {
        let c = k.ic(v as i64);
        k.st(c, call, off);
    }
    let sc = k.f(scale);
    k.st(sc, call, 96);
    let mut sig = Signature::new(k.call_conv());
    sig.params.push(AbiParam::new(I64));
    let sig = k.b.import_signature(sig);
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    let most = k.ic((ROWS / group).max(1) as i64);
    let uv = k.var(I64, lo);
    k.for_ptr(uv, hi, |k| {
        let u = k.get(uv);
        let kvh = k.b.ins().udiv(u, n);
        let t = k.b.ins().urem(u, n);
        let rows_left = k.b.ins().isub(n, t);
        let units_left = k.b.ins().isub(hi, u);
        let nt = k.b.ins().umin(rows_left, units_left);
        let nt = k.b.ins().umin(nt, most);
        let qa = k.at(q, t, qw);
        let pa = k.at(pos, t, 4);
        let oa = k.at(out, t, qw);
        k.st(qa, call, 0);
        k.st(pa, call, 8);
        k.st(oa, call, 16);
        k.st(nt, call, 40);
        k.st(kvh, call, 48);
        let fp = k.ic(f as usize as i64);
        k.b.ins().call_indirect(sig, fp, &[call]);
        let u = k.add(u, nt);
        k.set(uv, u);
    });
}
