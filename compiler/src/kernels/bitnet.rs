//! BitNet b1.58: int8 activation quantization per token and the ternary matmul on the packed
//! 2-bit weights. Weights are never expanded in memory: each 8 bytes of a weight row are
//! widened to two i32x4 in registers, and each of the four 2-bit fields (`(b >> 2i) & 3`, minus
//! one) multiplies the quantized activations — an exact integer dot product.

use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};

use super::kb::{Kb, F32, V4};

const I32X4: types::Type = types::I32X4;

/// `[x, q]`: `q[t, 0..k]` = i32 quantized values, `q[t, k]` = the scale `s` (f32).
pub fn act_quant(k: &mut Kb<'_>, kd: usize) {
    let (x, q) = (k.ptr(0), k.ptr(1));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (kd * 4) as i64);
        let qr = k.at(q, t, ((kd + 1) * 4) as i64);
        let z4 = k.c(V4, 0.0);
        let m4 = k.var(V4, z4);
        let z = k.f(0.0);
        let m1 = k.var(F32, z);
        k.chunks(kd, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let p = k.at(xr, i, 4);
            let v = k.ld(ty, p, 0);
            let a = k.b.ins().fabs(v);
            let var = if vec { m4 } else { m1 };
            let cur = k.get(var);
            let nx = k.fmax(cur, a);
            k.set(var, nx);
        });
        let mv = k.get(m4);
        let mh = k.hmax(mv);
        let ms = k.get(m1);
        let max = k.fmax(mh, ms);
        let floor = k.f(1e-5);
        let max = k.fmax(max, floor);
        let c127 = k.f(127.0);
        let s = k.fdiv(c127, max);
        k.st(s, qr, (kd * 4) as i64);
        let s4 = k.splat(s);
        k.chunks(kd, |k, i, vec| {
            let (ty, ity, sv) = if vec { (V4, I32X4, s4) } else { (F32, types::I32, s) };
            let p = k.at(xr, i, 4);
            let v = k.ld(ty, p, 0);
            let y = k.fmul(v, sv);
            let y = k.b.ins().nearest(y); // round half to even
            let lo = k.c(ty, -128.0);
            let hi = k.c(ty, 127.0);
            let y = k.b.ins().fmax(y, lo);
            let y = k.b.ins().fmin(y, hi);
            let yi = k.b.ins().fcvt_to_sint_sat(ity, y);
            let d = k.at(qr, i, 4);
            k.st(yi, d, 0);
        });
    });
}

fn splat_i32(k: &mut Kb<'_>, v: i64) -> Value {
    let s = k.b.ins().iconst(types::I32, v);
    k.b.ins().splat(I32X4, s)
}

/// `[q, w, scale, out]`, units: byte rows `r` of w; outputs `r + i·m/4`, i = 0..3.
pub fn bit_matmul(k: &mut Kb<'_>, kd: usize, m: usize) {
    let (q, w, scale, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let quarter = m / 4;
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    let ws = k.ld(F32, scale, 0);
    k.for_range(lo, hi, |k, r| {
        let wr = k.at(w, r, kd as i64);
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            let qr = k.at(q, t, ((kd + 1) * 4) as i64);
            let zi = splat_i32(k, 0);
            let accs: Vec<_> = (0..4).map(|_| k.var(I32X4, zi)).collect();
            let zs = k.b.ins().iconst(types::I32, 0);
            let tails: Vec<_> = (0..4).map(|_| k.var(types::I32, zs)).collect();
            let three = splat_i32(k, 3);
            let one = splat_i32(k, 1);
            let z0 = k.ic(0);
            let vend = k.ic((kd / 8 * 8) as i64);
            k.for_step(z0, vend, 8, |k, c| {
                let wp = k.add(wr, c);
                // 8 weight bytes → i16x8 → two i32x4 (columns c..c+4, c+4..c+8)
                let b16 = k.b.ins().uload8x8(MemFlagsData::new().with_notrap(), wp, 0);
                let halves = [k.b.ins().uwiden_low(b16), k.b.ins().uwiden_high(b16)];
                let qp = k.at(qr, c, 4);
                let xs = [k.ld(I32X4, qp, 0), k.ld(I32X4, qp, 16)];
                for (i, acc) in accs.iter().enumerate() {
                    let mut a = k.get(*acc);
                    for h in 0..2 {
                        let f = k.b.ins().ushr_imm_u(halves[h], (2 * i) as i64);
                        let f = k.b.ins().band(f, three);
                        let f = k.b.ins().isub(f, one); // {-1, 0, +1}
                        let p = k.b.ins().imul(f, xs[h]);
                        a = k.b.ins().iadd(a, p);
                    }
                    k.set(*acc, a);
                }
            });
            for c in kd / 8 * 8..kd {
                let byte = k.b.ins().uload8(types::I32, MemFlagsData::new().with_notrap(), wr, c as i32);
                let x = k.b.ins().load(types::I32, MemFlagsData::new().with_notrap(), qr, (c * 4) as i32);
                for (i, tail) in tails.iter().enumerate() {
                    let f = k.b.ins().ushr_imm_u(byte, (2 * i) as i64);
                    let f = k.b.ins().band_imm_u(f, 3);
                    let f = k.b.ins().iadd_imm_s(f, -1);
                    let p = k.b.ins().imul(f, x);
                    let cur = k.get(*tail);
                    let nx = k.b.ins().iadd(cur, p);
                    k.set(*tail, nx);
                }
            }
            let s = k.ld(F32, qr, (kd * 4) as i64);
            let denom = k.fmul(ws, s);
            let orow = k.at(out, t, (m * 4) as i64);
            for i in 0..4 {
                let a = k.get(accs[i]);
                let lanes: Vec<Value> = (0..4u8).map(|l| k.b.ins().extractlane(a, l)).collect();
                let s01 = k.b.ins().iadd(lanes[0], lanes[1]);
                let s23 = k.b.ins().iadd(lanes[2], lanes[3]);
                let sum = k.b.ins().iadd(s01, s23);
                let tl = k.get(tails[i]);
                let sum = k.b.ins().iadd(sum, tl);
                let f = k.b.ins().fcvt_from_sint(F32, sum);
                let y = k.fdiv(f, denom);
                let col = k.addi(r, (i * quarter) as i64);
                let dst = k.at(orow, col, 4);
                k.st(y, dst, 0);
            }
        });
    });
}
