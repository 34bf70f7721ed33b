//! Row-wise kernels: embedding gather, unary activations, binary ops, slice/concat copies,
//! take-last, softmax. Units are rows; every row is independent.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::InstBuilder;

use super::kb::{Kb, F32, I64, V4};
use crate::pack::PANEL;
use crate::program::{Binary, Unary};

/// Copies `len` floats from `src + src_off` to `dst + dst_off` (float offsets are Values).
pub fn copy(k: &mut Kb<'_>, src: cranelift_codegen::ir::Value, dst: cranelift_codegen::ir::Value, len: usize) {
    k.chunks(len, |k, i, vec| {
        let ty = if vec { V4 } else { F32 };
        let s = k.at(src, i, 4);
        let d = k.at(dst, i, 4);
        let x = k.ld(ty, s, 0);
        k.st(x, d, 0);
    });
}

/// `[table, ids, out]`: `out[t] = table[ids[t]]`. A packed table (`Panel16`, or `Dot16` when
/// the int8 output projection shares it) is read element by element through its layout.
pub fn embedding(k: &mut Kb<'_>, d: usize, layout: crate::program::Layout, wt: llmc_ir::DType) {
    let packed = layout != crate::program::Layout::RowMajor;
    let (table, ids, out) = (k.ptr(0), k.ptr(1), k.ptr(2));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let idp = k.at(ids, t, 4);
        let id = k.ld_i32(idp, 0);
        let dst = k.at(out, t, (d * 4) as i64);
        if packed {
            // row id lives in panel id/16, lane id%16: element j at panel + (j*16 + lane)*4
            let p = k.udivi(id, PANEL as i64);
            let lane = k.uremi(id, PANEL as i64);
            let panel = k.at(table, p, crate::pack::panel_bytes(wt, d) as i64);
            let zero = k.ic(0);
            let end = k.ic(d as i64);
            k.for_range(zero, end, |k, j| {
                let x = if layout == crate::program::Layout::Dot16 {
                    super::dot::load_elem(k, wt, d, panel, lane, j)
                } else {
                    super::storage::load_elem(k, wt, d, panel, lane, j)
                };
                let dd = k.at(dst, j, 4);
                k.st(x, dd, 0);
            });
        } else {
            let src = k.at(table, id, (d * 4) as i64);
            copy(k, src, dst, d);
        }
    });
}

/// Applies a unary function to one value (scalar or vector).
pub fn apply_unary(
    k: &mut Kb<'_>,
    op: Unary,
    ty: cranelift_codegen::ir::Type,
    x: cranelift_codegen::ir::Value,
) -> cranelift_codegen::ir::Value {
    match op {
        Unary::Silu => {
            // x / (1 + e^-x)
            let nx = k.fneg(x);
            let e = k.exp(ty, nx);
            let one = k.c(ty, 1.0);
            let d = k.fadd(e, one);
            k.fdiv(x, d)
        }
        Unary::Gelu => {
            // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            let c = k.c(ty, 0.797_884_6); // sqrt(2/pi)
            let a = k.c(ty, 0.044715);
            let x2 = k.fmul(x, x);
            let x3 = k.fmul(x2, x);
            let inner = k.fma(a, x3, x);
            let y = k.fmul(c, inner);
            let t = k.tanh(ty, y);
            let one = k.c(ty, 1.0);
            let half = k.c(ty, 0.5);
            let s = k.fadd(one, t);
            let hx = k.fmul(half, x);
            k.fmul(hx, s)
        }
        Unary::GeluErf => {
            // 0.5 x (1 + erf(x / sqrt 2))
            let r = k.c(ty, std::f32::consts::FRAC_1_SQRT_2);
            let y = k.fmul(x, r);
            let e = k.erf(ty, y);
            let one = k.c(ty, 1.0);
            let half = k.c(ty, 0.5);
            let s = k.fadd(one, e);
            let hx = k.fmul(half, x);
            k.fmul(hx, s)
        }
        Unary::Scale(f) => {
            let c = k.c(ty, f);
            k.fmul(x, c)
        }
        Unary::RoundBf16 => k.round_bf16(ty, x),
        Unary::Relu2 => {
            let z = k.c(ty, 0.0);
            let r = k.fmax(x, z);
            k.fmul(r, r)
        }
    }
}

/// `[x, out]`: `out = op(x)` elementwise.
pub fn unary(k: &mut Kb<'_>, op: Unary, d: usize) {
    let (x, out) = (k.ptr(0), k.ptr(1));
    let (lo, hi) = (k.lo, k.hi);
    // `round_bf16` at the wide levels: the unit's rows are contiguous, one micro-kernel call
    if let (Unary::RoundBf16, Some(f)) = (op, k.wide.and_then(crate::micro::round_bf16)) {
        use cranelift_codegen::ir::{AbiParam, Signature};
        let mut sig = Signature::new(k.call_conv());
        sig.params.extend([AbiParam::new(I64); 3]);
        let sig = k.b.import_signature(sig);
        let (src, dst) = (k.at(x, lo, (d * 4) as i64), k.at(out, lo, (d * 4) as i64));
        let rows = k.b.ins().isub(hi, lo);
        let n = k.muli(rows, d as i64);
        let fp = k.ic(f as usize as i64);
        k.b.ins().call_indirect(sig, fp, &[src, dst, n]);
        return;
    }
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (d * 4) as i64);
        let or = k.at(out, t, (d * 4) as i64);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let s = k.at(xr, i, 4);
            let v = k.ld(ty, s, 0);
            let y = apply_unary(k, op, ty, v);
            let dd = k.at(or, i, 4);
            k.st(y, dd, 0);
        });
    });
}

/// `[a, b, out]`: `out = a op b` elementwise.
pub fn binary(k: &mut Kb<'_>, op: Binary, d: usize) {
    let (a, bp, out) = (k.ptr(0), k.ptr(1), k.ptr(2));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let ar = k.at(a, t, (d * 4) as i64);
        let br = k.at(bp, t, (d * 4) as i64);
        let or = k.at(out, t, (d * 4) as i64);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let pa = k.at(ar, i, 4);
            let pb = k.at(br, i, 4);
            let va = k.ld(ty, pa, 0);
            let vb = k.ld(ty, pb, 0);
            let y = match op {
                Binary::Add => k.fadd(va, vb),
                Binary::Mul => k.fmul(va, vb),
            };
            let dd = k.at(or, i, 4);
            k.st(y, dd, 0);
        });
    });
}

/// `[x, out]`: columns `start..start+len` of each `d`-wide row.
pub fn slice(k: &mut Kb<'_>, d: usize, start: usize, len: usize) {
    let (x, out) = (k.ptr(0), k.ptr(1));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (d * 4) as i64);
        let xr = k.addi(xr, (start * 4) as i64);
        let or = k.at(out, t, (len * 4) as i64);
        copy(k, xr, or, len);
    });
}

/// `[x0, x1, ..., out]`: rows concatenated.
pub fn concat(k: &mut Kb<'_>, widths: &[usize]) {
    let ins: Vec<_> = (0..widths.len()).map(|i| k.ptr(i)).collect();
    let out = k.ptr(widths.len());
    let total: usize = widths.iter().sum();
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let mut at = 0;
        for (i, &w) in widths.iter().enumerate() {
            let src = k.at(ins[i], t, (w * 4) as i64);
            let or = k.at(out, t, (total * 4) as i64);
            let dst = k.addi(or, (at * 4) as i64);
            copy(k, src, dst, w);
            at += w;
        }
    });
}

/// `[x, seqs, out]`: the last row of each sequence (of each run of equal `seqs`), in row
/// order: `out[j]` is the last row of the step's `j`-th sequence.
pub fn take_last(k: &mut Kb<'_>, d: usize) {
    let (x, seqs, out) = (k.ptr(0), k.ptr(1), k.ptr(2));
    let n = k.n;
    let last = k.addi(n, -1);
    let zero = k.ic(0);
    let j = k.var(I64, zero);
    k.for_range(zero, n, |k, t| {
        // row t ends its sequence: the step's last row, or the next row's sequence differs
        let next = k.addi(t, 1);
        let next = k.b.ins().umin(next, last);
        let sp = k.at(seqs, t, 4);
        let s0 = k.ld_i32(sp, 0);
        let np = k.at(seqs, next, 4);
        let s1 = k.ld_i32(np, 0);
        let is_last = k.icmp(IntCC::Equal, t, last);
        let differs = k.icmp(IntCC::NotEqual, s0, s1);
        let ends = k.b.ins().bor(is_last, differs);
        k.when(ends, |k| {
            let jv = k.get(j);
            let src = k.at(x, t, (d * 4) as i64);
            let dst = k.at(out, jv, (d * 4) as i64);
            copy(k, src, dst, d);
            let j1 = k.addi(jv, 1);
            k.set(j, j1);
        });
    });
}

/// `[x, out]`: row-wise softmax.
pub fn softmax(k: &mut Kb<'_>, d: usize) {
    let (x, out) = (k.ptr(0), k.ptr(1));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let xr = k.at(x, t, (d * 4) as i64);
        let or = k.at(out, t, (d * 4) as i64);
        let ninf = k.f(f32::MIN);
        let mx = k.var(F32, ninf);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let p = k.at(xr, i, 4);
            let v = k.ld(ty, p, 0);
            let v = if vec { k.hmax(v) } else { v };
            let m = k.get(mx);
            let m = k.fmax(m, v);
            k.set(mx, m);
        });
        let zero = k.f(0.0);
        let sum = k.var(F32, zero);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let p = k.at(xr, i, 4);
            let v = k.ld(ty, p, 0);
            let m = k.get(mx);
            let m = if vec { k.splat(m) } else { m };
            let z = k.fsub(v, m);
            let e = k.exp(ty, z);
            let dd = k.at(or, i, 4);
            k.st(e, dd, 0);
            let e = if vec { k.hsum(e) } else { e };
            let s = k.get(sum);
            let s = k.fadd(s, e);
            k.set(sum, s);
        });
        let one = k.f(1.0);
        let s = k.get(sum);
        let inv = k.fdiv(one, s);
        k.chunks(d, |k, i, vec| {
            let ty = if vec { V4 } else { F32 };
            let dd = k.at(or, i, 4);
            let v = k.ld(ty, dd, 0);
            let m = if vec { k.splat(inv) } else { inv };
            let y = k.fmul(v, m);
            k.st(y, dd, 0);
        });
    });
}
