//! The fused Q/K/V projection: the Panel16 matmul of `matmul.rs` with an epilogue that rotates
//! q and k (RoPE on pair-interleaved rows, so each f32x4 holds two complete pairs), writes q
//! to its output and k, v straight into the KV cache slot of the token's position, in the
//! caches the row's `kv_rows` entry names (a batched step's rows belong to different
//! sequences).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};

use super::kb::{Kb, I64, V4};
use llmc_ir::DType;

use super::matmul::{panels, Ctx, TileVals};
use crate::pack::PANEL;

/// `[a0, b0, a1, b1]` → `[b0, a0, b1, a1]`.
fn swap_pairs(k: &mut Kb<'_>, v: Value) -> Value {
    let l: Vec<Value> = (0..4u8).map(|i| k.b.ins().extractlane(v, i)).collect();
    let s = k.b.ins().splat(V4, l[1]);
    let s = k.b.ins().insertlane(s, l[0], 1);
    let s = k.b.ins().insertlane(s, l[3], 2);
    k.b.ins().insertlane(s, l[2], 3)
}

/// `v` rotated by the angles of its position (`trow`: the position's table row) if column `c`
/// (within its head) is in the rotary part.
fn rope(k: &mut Kb<'_>, v: Value, trow: Value, c: Value, rd: usize) -> Value {
    let out = k.var(V4, v);
    let rdv = k.ic(rd as i64);
    let rotary = k.icmp(IntCC::UnsignedLessThan, c, rdv);
    k.when(rotary, |k| {
        let tp = k.at(trow, c, 4);
        let cs = k.ld(V4, tp, 0);
        let sn = k.ld(V4, tp, (rd * 4) as i64);
        let sw = swap_pairs(k, v);
        let a = k.fmul(v, cs);
        let r = k.fma(sw, sn, a);
        k.set(out, r);
    });
    k.get(out)
}

/// The address of dim `rr` (over all kv heads) of cache slot `slot`: the cache is
/// `[kv_heads, cap, head_dim]` (see `attention`).
fn cache_at(k: &mut Kb<'_>, cache: Value, rr: Value, slot: Value, cap: Value, hd: usize) -> Value {
    let head = k.udivi(rr, hd as i64);
    let col = k.uremi(rr, hd as i64);
    let hrow = k.mul(head, cap);
    let row = k.add(hrow, slot);
    let base = k.at(cache, row, (hd * 4) as i64);
    k.at(base, col, 4)
}

/// `[x, w, bias?, positions, table, kv_rows, q_out]`: row `t`'s k and v go to the caches
/// `kv_rows[t]` names (`Arg::KvRows`: K address, V address, slots).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope(
    k: &mut Kb<'_>,
    kd: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    rd: usize,
    rms_eps: Option<f32>,
    bias: bool,
    wt: DType,
    xq: u8,
    xbf16: bool,
) {
    let x = k.ptr(0);
    let w = k.ptr(1);
    let b = bias.then(|| k.ptr(2));
    let base = 2 + bias as usize;
    let (pos, table, kv_rows, out) = (k.ptr(base), k.ptr(base + 1), k.ptr(base + 2), k.ptr(base + 3));
    let mut c = Ctx::new(k, x, b, kd, rms_eps, wt, xq);
    c.xbf16 = xbf16;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let m = qw + 2 * kw;
    let mut epi = |k: &mut Kb<'_>, p: Value, t: Value, vals: TileVals| {
        // per row of the tile: its position, its table row, its caches and its slot, once for
        // all of its vectors (the slot's division only where a ring wraps)
        let mut tts: Vec<usize> = vals.iter().map(|v| v.0).collect();
        tts.sort_unstable();
        tts.dedup();
        for tt in tts {
            let tok = k.addi(t, tt as i64);
            let pp = k.at(pos, tok, 4);
            let ps = k.ld_i32(pp, 0);
            let trow = k.at(table, ps, (2 * rd * 4) as i64);
            let kvr = k.at(kv_rows, tok, 24);
            let (kc, vc, cap) = (k.ld(I64, kvr, 0), k.ld(I64, kvr, 8), k.ld(I64, kvr, 16));
            let slot = k.var(I64, ps);
            let wraps = k.icmp(IntCC::UnsignedGreaterThanOrEqual, ps, cap);
            k.when(wraps, |k| {
                let s = k.b.ins().urem(ps, cap);
                k.set(slot, s);
            });
            let slot = k.get(slot);
            for &(_, vi, v) in vals.iter().filter(|v| v.0 == tt) {
                let r0 = k.muli(p, PANEL as i64);
                let r = k.addi(r0, (vi * 4) as i64);
                let mv = k.ic(m as i64);
                let valid = k.icmp(IntCC::UnsignedLessThan, r, mv);
                k.when(valid, |k| {
                    let qwv = k.ic(qw as i64);
                    let in_q = k.icmp(IntCC::UnsignedLessThan, r, qwv);
                    k.if_else(
                        in_q,
                        |k| {
                            let col = k.uremi(r, hd as i64);
                            let y = rope(k, v, trow, col, rd);
                            let row = k.at(out, tok, (qw * 4) as i64);
                            let dst = k.at(row, r, 4);
                            k.st(y, dst, 0);
                        },
                        |k| {
                            let kend = k.ic((qw + kw) as i64);
                            let in_k = k.icmp(IntCC::UnsignedLessThan, r, kend);
                            k.if_else(
                                in_k,
                                |k| {
                                    let rr = k.addi(r, -(qw as i64));
                                    let col = k.uremi(rr, hd as i64);
                                    let y = rope(k, v, trow, col, rd);
                                    let dst = cache_at(k, kc, rr, slot, cap, hd);
                                    k.st(y, dst, 0);
                                },
                                |k| {
                                    let rr = k.addi(r, -((qw + kw) as i64));
                                    let dst = cache_at(k, vc, rr, slot, cap, hd);
                                    k.st(v, dst, 0);
                                },
                            );
                        },
                    );
                });
            }
        }
    };
    panels(k, &c, w, false, &mut epi);
}
