//! Rotary position embedding (rotate-half / NeoX layout), one row per unit. The runtime supplies
//! a table with, for each position `p`, `rotary_dim/2` cosines then `rotary_dim/2` sines.

use super::kb::{Kb, F32, V4};

/// `[x, positions, table, out]`.
pub fn rope(k: &mut Kb<'_>, heads: usize, hd: usize, rd: usize) {
    let (x, pos, table, out) = (k.ptr(0), k.ptr(1), k.ptr(2), k.ptr(3));
    let half = rd / 2;
    let width = heads * hd;
    let (lo, hi) = (k.lo, k.hi);
    k.for_range(lo, hi, |k, t| {
        let pp = k.at(pos, t, 4);
        let p = k.ld_i32(pp, 0);
        let tab = k.at(table, p, (rd * 4) as i64);
        let xr = k.at(x, t, (width * 4) as i64);
        let or = k.at(out, t, (width * 4) as i64);
        let zero = k.ic(0);
        let nh = k.ic(heads as i64);
        k.for_range(zero, nh, |k, h| {
            let xh = k.at(xr, h, (hd * 4) as i64);
            let oh = k.at(or, h, (hd * 4) as i64);
            k.chunks(half, |k, i, vec| {
                let ty = if vec { V4 } else { F32 };
                let pa = k.at(xh, i, 4);
                let a = k.ld(ty, pa, 0);
                let b = k.ld(ty, pa, (half * 4) as i64);
                let pc = k.at(tab, i, 4);
                let c = k.ld(ty, pc, 0);
                let s = k.ld(ty, pc, (half * 4) as i64);
                // a' = a cos - b sin ; b' = b cos + a sin
                let bs = k.fmul(b, s);
                let ac = k.fmul(a, c);
                let a2 = k.fsub(ac, bs);
                let bc = k.fmul(b, c);
                let b2 = k.fma(a, s, bc);
                let po = k.at(oh, i, 4);
                k.st(a2, po, 0);
                k.st(b2, po, (half * 4) as i64);
            });
            // Dims past the rotary part pass through.
            if rd < hd {
                let src = k.addi(xh, (rd * 4) as i64);
                let dst = k.addi(oh, (rd * 4) as i64);
                k.chunks(hd - rd, |k, i, vec| {
                    let ty = if vec { V4 } else { F32 };
                    let s = k.at(src, i, 4);
                    let v = k.ld(ty, s, 0);
                    let d = k.at(dst, i, 4);
                    k.st(v, d, 0);
                });
            }
        });
    });
}
