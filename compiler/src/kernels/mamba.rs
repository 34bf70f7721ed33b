//! The Mamba2 mixer between in_proj and out_proj, as three kernels:
//! - `conv`: the causal depthwise conv + SiLU over the conv window state, per channel (units:
//!   blocks of 16 channels, 4 channels per f32x4, each walking the step's tokens in order with
//!   its window in registers);
//! - `scan`: the selective SSM per head (units: heads), each head walking the tokens in order
//!   through its own state: the recurrence (at AVX-512 and AVX2, `micro::scan`: for prefills,
//!   8 or 4 tokens per pass over the state, each state vector in a register through them). (The chunked SSD
//!   form the interpreter uses for multi-token steps does more arithmetic; written as
//!   vectorized Rust over 64- and 256-token chunks it prefilled a Bamba-shaped model at about
//!   half the rate of the per-token recurrence, which the blocked one now beats by 1.3–1.7×.)
//! - `norm`: the gated RMSNorm per token (units: rows), in f32x4 chunks.

use cranelift_codegen::ir::{AbiParam, InstBuilder, Signature, StackSlotData, StackSlotKind, Type, Value};

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
    // whole groups of 4 channels as f32x4 (the channels are contiguous in every row and in
    // the window rows), then the rest one channel at a time
    let span = k.b.ins().isub(c1, c0);
    let whole = k.b.ins().band_imm_s(span, !3);
    let cv = k.add(c0, whole);
    let channels = |k: &mut Kb<'_>, c: Value, ty: Type| {
        let cbp = k.at(cb, c, 4);
        let bias = k.ld(ty, cbp, 0);
        let wrow = k.at(cw, c, (dconv * 4) as i64);
        // tap j of the group's channels (weights are `[C, 1, K]`: a channel's taps are a row)
        let ws: Vec<_> = (0..dconv)
            .map(|j| {
                let w0 = k.ld(F32, wrow, (j * 4) as i64);
                if ty == F32 {
                    return w0;
                }
                let mut v = k.splat(w0);
                for l in 1..4u8 {
                    let wl = k.ld(F32, wrow, ((l as usize * dconv + j) * 4) as i64);
                    v = k.b.ins().insertlane(v, wl, l);
                }
                v
            })
            .collect();
        let sp = k.at(state, c, 4);
        let win: Vec<_> = (0..dconv.saturating_sub(1))
            .map(|j| {
                let v = k.ld(ty, sp, (j * ch * 4) as i64);
                k.var(ty, v)
            })
            .collect();
        let zero = k.ic(0);
        k.for_range(zero, n, |k, t| {
            let row = k.at(xbc, t, (width * 4) as i64);
            let xp = k.at(row, c, 4);
            let x = k.ld(ty, xp, 0);
            let mut acc = bias;
            for (j, w) in ws.iter().enumerate() {
                let v = if j + 1 == dconv { x } else { k.get(win[j]) };
                acc = k.fma(*w, v, acc);
            }
            let a = apply_unary(k, Unary::Silu, ty, acc);
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
    };
    k.for_step(c0, cv, 4, |k, c| channels(k, c, V4));
    k.for_range(cv, c1, |k, c| channels(k, c, F32));
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
        let zero4 = k.c(V4, 0.0);
        let ss4 = k.var(V4, zero4);
        let zero1 = k.f(0.0);
        let ss1 = k.var(F32, zero1);
        // the gated values go to `out` first (f32x4 chunks, then the tail), then are scaled
        // in place
        k.chunks(inner, |k, c, vector| {
            let (ty, ss) = if vector { (V4, ss4) } else { (F32, ss1) };
            let yp = k.at(yrow, c, 4);
            let yv = k.ld(ty, yp, 0);
            let zp = k.at(row, c, 4);
            let zv = k.ld(ty, zp, 0);
            let sz = apply_unary(k, Unary::Silu, ty, zv);
            let gv = k.fmul(yv, sz);
            let op = k.at(orow, c, 4);
            k.st(gv, op, 0);
            let cur = k.get(ss);
            let nx = k.fma(gv, gv, cur);
            k.set(ss, nx);
        });
        let s4 = k.get(ss4);
        let s4 = k.hsum(s4);
        let s1 = k.get(ss1);
        let s = k.fadd(s4, s1);
        let inv = super::matmul::inv_rms(k, s, inner, eps);
        let inv4 = k.splat(inv);
        k.chunks(inner, |k, c, vector| {
            let (ty, inv) = if vector { (V4, inv4) } else { (F32, inv) };
            let op = k.at(orow, c, 4);
            let gv = k.ld(ty, op, 0);
            let wp = k.at(nw, c, 4);
            let wv = k.ld(ty, wp, 0);
            let nv = k.fmul(gv, inv);
            let o = k.fmul(wv, nv);
            k.st(o, op, 0);
        });
    });
}
