//! The Mamba2 mixer between in_proj and out_proj, as three kernels:
//! - `conv`: the causal depthwise conv + SiLU over the conv window state, per channel (units:
//!   blocks of 16 channels, each walking the step's tokens in order with its window in
//!   registers);
//! - `scan`: the selective SSM per head (units: heads), each head walking the tokens in order
//!   through its own state rows: the recurrence (at AVX-512, `micro::scan`: 16 state dims per
//!   instruction). (The chunked SSD form the interpreter uses for
//!   multi-token steps does about twice the arithmetic; written as vectorized Rust over 64- and
//!   256-token chunks it prefilled a Bamba-shaped model at about half this kernel's rate.)
//! - `norm`: the gated RMSNorm per token (units: rows).

use cranelift_codegen::ir::{AbiParam, InstBuilder, Signature, StackSlotData, StackSlotKind, Value};

use super::elementwise::apply_unary;
use super::kb::{Kb, F32, I64, V4};
use crate::program::Unary;

/// Channels per unit of `conv`.
pub const CONV_BLOCK: usize = 16;

/// `[zxbcdt, conv_w, conv_b, conv_state, act]`: for each channel `c` of the unit's blocks
/// (`ch` channels: x, B, C), `act[t, c] = silu(b_c + Σ_j w[c, j] · window_j)` over the window
/// `[state rows 0..d_conv-1, x_t]`, then the window shifts; the state keeps the last
/// `d_conv − 1` inputs.
pub fn conv(k: &mut Kb<'_>, ch: usize, dconv: usize, inner: usize, width: usize) {
    let (zx, cw, cb, state, act) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3), k.ptr(4));
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    let c0 = k.muli(lo, CONV_BLOCK as i64);
    let c1 = k.muli(hi, CONV_BLOCK as i64);
    let chv = k.ic(ch as i64);
    let c1 = k.b.ins().umin(c1, chv);
    let xbc = k.addi(zx, (inner * 4) as i64);
    k.for_range(c0, c1, |k, c| {
        let cbp = k.at(cb, c, 4);
        let bias = k.ld(F32, cbp, 0);
        let wrow = k.at(cw, c, (dconv * 4) as i64);
        let ws: Vec<_> = (0..dconv).map(|j| k.ld(F32, wrow, (j * 4) as i64)).collect();
        let sp = k.at(state, c, 4);
        let win: Vec<_> = (0..dconv.saturating_sub(1))
            .map(|j| {
                let v = k.ld(F32, sp, (j * ch * 4) as i64);
                k.var(F32, v)
            })
            .collect();
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            let row = k.at(xbc, t, (width * 4) as i64);
            let xp = k.at(row, c, 4);
            let x = k.ld(F32, xp, 0);
            let mut acc = bias;
            for (j, w) in ws.iter().enumerate() {
                let v = if j + 1 == dconv { x } else { k.get(win[j]) };
                acc = k.fma(*w, v, acc);
            }
            let a = apply_unary(k, Unary::Silu, F32, acc);
            let arow = k.at(act, t, (ch * 4) as i64);
            let ap = k.at(arow, c, 4);
            k.st(a, ap, 0);
            for j in 0..dconv.saturating_sub(1) {
                let v = if j + 2 == dconv { x } else { k.get(win[j + 1]) };
                k.set(win[j], v);
            }
        });
        for (j, v) in win.iter().enumerate() {
            let v = k.get(*v);
            k.st(v, sp, (j * ch * 4) as i64);
        }
    });
}

/// `[zxbcdt, act, dt_bias, a_log, d, ssm_state, y]`: the SSM of the unit's heads, each
/// walking the step's tokens in order through its state rows (`hd × ds`, which stay in cache
/// from token to token): `h ← e^{dt·A}·h + dt·x ⊗ B`, `y = h·C + D·x`, one pass over the
/// state per token.
#[allow(clippy::too_many_arguments)]
pub fn scan(k: &mut Kb<'_>, heads: usize, hd: usize, ds: usize, groups: usize, width: usize, dt_off: usize) {
    let p: Vec<_> = (0..7).map(|i| k.ptr(i)).collect();
    if let Some(f) = k.wide.and_then(|w| crate::micro::scan(w, ds)) {
        return wide_scan(k, f, &p, [heads, hd, ds, groups, width, dt_off]);
    }
    let (zx, act, dtb, alog, dd, ssm, y) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let inner = heads * hd;
    let gs = groups * ds;
    let ch = inner + 2 * gs;
    let per_group = heads / groups;
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    k.for_range(lo, hi, |k, h| {
        let g = k.udivi(h, per_group as i64);
        let dbp = k.at(dtb, h, 4);
        let dbv = k.ld(F32, dbp, 0);
        let ap = k.at(alog, h, 4);
        let al = k.ld(F32, ap, 0);
        let ea = k.exp(F32, al);
        let dp = k.at(dd, h, 4);
        let dh = k.ld(F32, dp, 0);
        let hdp = k.muli(h, hd as i64);
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            let row = k.at(zx, t, (width * 4) as i64);
            let arow = k.at(act, t, (ch * 4) as i64);
            let bvec = k.addi(arow, (inner * 4) as i64);
            let cvec = k.addi(arow, ((inner + gs) * 4) as i64);
            let bg = k.at(bvec, g, (ds * 4) as i64);
            let cg = k.at(cvec, g, (ds * 4) as i64);
            let dtp = k.at(row, h, 4);
            let dtr = k.ld(F32, dtp, (dt_off * 4) as i64);
            let v = k.fadd(dtr, dbv);
            let dtv = k.softplus(v);
            let prod = k.fmul(dtv, ea);
            let neg = k.fneg(prod);
            let da = k.exp(F32, neg); // exp(dt · A), A = -exp(a_log)
            let da4 = k.splat(da);
            let yrow = k.at(y, t, (inner * 4) as i64);
            let p0 = k.ic(0);
            let pv = k.ic(hd as i64);
            k.for_range(p0, pv, |k, pd| {
                let idx = k.add(hdp, pd);
                let xp = k.at(arow, idx, 4);
                let xv = k.ld(F32, xp, 0);
                let dx = k.fmul(dtv, xv);
                let dx4 = k.splat(dx);
                let st = k.at(ssm, idx, (ds * 4) as i64);
                // state dims `sx..`: h = h·da + dx·B, stored; returns acc + h·C
                let upd = |k: &mut Kb<'_>, ty, sx: usize, (dx, da): (Value, Value), acc: Value| {
                    let s = k.ld(ty, st, (sx * 4) as i64);
                    let b = k.ld(ty, bg, (sx * 4) as i64);
                    let c = k.ld(ty, cg, (sx * 4) as i64);
                    let sb = k.fmul(dx, b);
                    let nv = k.fma(s, da, sb);
                    k.st(nv, st, (sx * 4) as i64);
                    k.fma(nv, c, acc)
                };
                let mut acc4 = k.c(V4, 0.0);
                let mut acc1 = k.f(0.0);
                for sx in (0..ds / 4 * 4).step_by(4) {
                    acc4 = upd(k, V4, sx, (dx4, da4), acc4);
                }
                for sx in ds / 4 * 4..ds {
                    acc1 = upd(k, F32, sx, (dx, da), acc1);
                }
                let sum = k.hsum(acc4);
                let sum = k.fadd(sum, acc1);
                let yv = k.fma(dh, xv, sum);
                let yp = k.at(yrow, idx, 4);
                k.st(yv, yp, 0);
            });
        });
    });
}

/// `scan` through the wide micro-kernel (`micro::scan`): one `ScanCall` for the unit's heads.
fn wide_scan(k: &mut Kb<'_>, f: crate::micro::ScanFn, ptrs: &[Value], consts: [usize; 6]) {
    use crate::micro::SCAN_WORDS;
    let slot = k.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (SCAN_WORDS * 8) as u32, 3));
    let call = k.b.ins().stack_addr(I64, slot, 0);
    // zx, act, dt_bias, a_log, d, ssm, y; n, h0, h1; heads, hd, ds, groups, width, dt_off
    for (i, v) in ptrs.iter().enumerate() {
        k.st(*v, call, (i * 8) as i64);
    }
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    for (i, v) in [n, lo, hi].into_iter().enumerate() {
        k.st(v, call, ((7 + i) * 8) as i64);
    }
    for (i, v) in consts.into_iter().enumerate() {
        let c = k.ic(v as i64);
        k.st(c, call, ((10 + i) * 8) as i64);
    }
    let mut sig = Signature::new(k.call_conv());
    sig.params.push(AbiParam::new(I64));
    let sig = k.b.import_signature(sig);
    let fp = k.ic(f as usize as i64);
    k.b.ins().call_indirect(sig, fp, &[call]);
}

/// `[zxbcdt, y, norm_w, out]`, units: rows. `g = y · silu(z)`; `out = norm_w · g / rms(g)`,
/// the RMS over all `inner` channels whatever the group count (the op's semantics, as
/// transformers').
pub fn norm(k: &mut Kb<'_>, inner: usize, width: usize, eps: f32) {
    let (zx, y, nw, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let row = k.at(zx, t, (width * 4) as i64);
        let yrow = k.at(y, t, (inner * 4) as i64);
        let orow = k.at(out, t, (inner * 4) as i64);
        let zero_f = k.f(0.0);
        let ss = k.var(F32, zero_f);
        let c0 = k.ic(0);
        let iv = k.ic(inner as i64);
        // the gated values go to `out` first, then are scaled in place
        k.for_range(c0, iv, |k, c| {
            let yp = k.at(yrow, c, 4);
            let yv = k.ld(F32, yp, 0);
            let zp = k.at(row, c, 4);
            let zv = k.ld(F32, zp, 0);
            let sz = apply_unary(k, Unary::Silu, F32, zv);
            let gv = k.fmul(yv, sz);
            let op = k.at(orow, c, 4);
            k.st(gv, op, 0);
            let cur = k.get(ss);
            let nx = k.fma(gv, gv, cur);
            k.set(ss, nx);
        });
        let s = k.get(ss);
        let inv = super::matmul::inv_rms(k, s, inner, eps);
        let c1 = k.ic(0);
        k.for_range(c1, iv, |k, c| {
            let op = k.at(orow, c, 4);
            let gv = k.ld(F32, op, 0);
            let wp = k.at(nw, c, 4);
            let wv = k.ld(F32, wp, 0);
            let nv = k.fmul(gv, inv);
            let o = k.fmul(wv, nv);
            k.st(o, op, 0);
        });
    });
}
