//! RMSNorm and LayerNorm, one row per unit. Sums use one f32x4 accumulator plus a scalar tail.

use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::Value;

use super::kb::{Kb, F32, V4};

/// Sum over a row of `f(x)` where `f` maps a loaded value (scalar or vector) to what is summed.
fn row_sum(k: &mut Kb<'_>, row: Value, d: usize, mut f: impl FnMut(&mut Kb<'_>, Value, bool) -> Value) -> Value {
    let z4 = k.c(V4, 0.0);
    let acc = k.var(V4, z4);
    let z = k.f(0.0);
    let tail = k.var(F32, z);
    k.chunks(d, |k, i, vec| {
        let ty = if vec { V4 } else { F32 };
        let p = k.at(row, i, 4);
        let x = k.ld(ty, p, 0);
        let y = f(k, x, vec);
        let v = if vec { acc } else { tail };
        let a = k.get(v);
        let a = k.fadd(a, y);
        k.set(v, a);
    });
    let a = k.get(acc);
    let s = k.hsum(a);
    let t = k.get(tail);
    k.fadd(s, t)
}

/// `[x, w, out]`: `out = x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(k: &mut Kb<'_>, d: usize, eps: f32) {
    let (x, w, out) = (k.ptr(0), k.ptr(1), k.ptr(2));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (d * 4) as i64);
        let or = k.at(out, t, (d * 4) as i64);
        let ss = row_sum(k, xr, d, |k, v, _| k.fmul(v, v));
        let dinv = k.f(1.0 / d as f32);
        let e = k.f(eps);
        let ms = k.fma(ss, dinv, e);
        let r = k.b.ins().sqrt(ms);
        let one = k.f(1.0);
        let inv = k.fdiv(one, r);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let px = k.at(xr, i, 4);
            let pw = k.at(w, i, 4);
            let xv = k.ld(ty, px, 0);
            let wv = k.ld(ty, pw, 0);
            let s = if vec { k.splat(inv) } else { inv };
            let y = k.fmul(xv, s);
            let y = k.fmul(y, wv);
            let po = k.at(or, i, 4);
            k.st(y, po, 0);
        });
    });
}

/// `[x, w, b, out]`: `out = (x - mean) / sqrt(var + eps) * w + b` (two passes for the moments);
/// without `affine`, `[x, out]` and no scale or bias.
pub fn layer_norm(k: &mut Kb<'_>, d: usize, eps: f32, affine: bool) {
    let x = k.ptr(0);
    let (w, bias, out) = if affine { (Some(k.ptr(1)), Some(k.ptr(2)), k.ptr(3)) } else { (None, None, k.ptr(1)) };
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (d * 4) as i64);
        let or = k.at(out, t, (d * 4) as i64);
        let s = row_sum(k, xr, d, |_, v, _| v);
        let dinv = k.f(1.0 / d as f32);
        let mean = k.fmul(s, dinv);
        let mean4 = k.splat(mean);
        let var = row_sum(k, xr, d, |k, v, vec| {
            let m = if vec { mean4 } else { mean };
            let c = k.fsub(v, m);
            k.fmul(c, c)
        });
        let e = k.f(eps);
        let v = k.fma(var, dinv, e);
        let r = k.b.ins().sqrt(v);
        let one = k.f(1.0);
        let inv = k.fdiv(one, r);
        let inv4 = k.splat(inv);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let px = k.at(xr, i, 4);
            let xv = k.ld(ty, px, 0);
            let (m, s) = if vec { (mean4, inv4) } else { (mean, inv) };
            let c = k.fsub(xv, m);
            let mut y = k.fmul(c, s);
            if let (Some(w), Some(bias)) = (w, bias) {
                let pw = k.at(w, i, 4);
                let wv = k.ld(ty, pw, 0);
                let pb = k.at(bias, i, 4);
                let bv = k.ld(ty, pb, 0);
                y = k.fma(y, wv, bv);
            }
            let po = k.at(or, i, 4);
            k.st(y, po, 0);
        });
    });
}
