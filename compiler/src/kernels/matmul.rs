//! `out[t, o] = Σ_k x[t, k] · W[o, k] (+ bias[o])` over the Panel16 layout.
//!
//! Units are 16-row panels of W. For each panel the k loop broadcasts one activation and
//! multiplies it into the panel's 16 weights (four f32x4, one 64-byte line):
//! - decode (and tail tokens): 1 token × 16 outputs = 4 accumulators;
//! - prefill: 4 tokens × 8 outputs (half a panel) = 8 accumulators, so each weight vector
//!   loaded feeds 4 FMAs. Live vectors stay at ≤ 12 so Cranelift does not spill.
//! Rows past `m` in the last panel are zero padding; their results are not stored.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::Value;
use cranelift_frontend::Variable;

use super::kb::{Kb, F32, I64, V4};
use crate::pack::PANEL;

struct Ctx {
    x: Value,
    bias: Option<Value>,
    out: Value,
    kd: usize,
    m: usize,
}

/// One register tile: `tokens` rows starting at token `t`, vectors `v0..v0+nv` of panel `p`.
/// The k loop walks pointers (no index arithmetic in the loop). With one token it unrolls k by
/// two into a second set of accumulators, so two independent FMA chains keep more loads in
/// flight.
#[allow(clippy::too_many_arguments)]
fn tile(
    k: &mut Kb<'_>,
    c: &Ctx,
    p: Value,
    wp: Value,
    t: Value,
    tokens: usize,
    v0: usize,
    nv: usize,
) {
    let zero = k.c(V4, 0.0);
    let sets = if tokens == 1 && c.kd >= 2 { 2 } else { 1 };
    let accs: Vec<Vec<Vec<Variable>>> = (0..sets)
        .map(|_| {
            (0..tokens)
                .map(|_| (0..nv).map(|_| k.var(V4, zero)).collect())
                .collect()
        })
        .collect();
    let x0 = k.at(c.x, t, (c.kd * 4) as i64);
    let wv = k.var(I64, wp);
    let xv = k.var(I64, x0);
    let step = sets;
    let main = c.kd / step * step;
    let wend = k.addi(wp, (main * PANEL * 4) as i64);
    let body = |k: &mut Kb<'_>, set: usize, kk: usize| {
        let w = k.get(wv);
        let x = k.get(xv);
        let ws: Vec<Value> = (0..nv)
            .map(|j| k.ld(V4, w, ((kk * PANEL + (v0 + j) * 4) * 4) as i64))
            .collect();
        for tt in 0..tokens {
            let xs = k.ld(F32, x, ((tt * c.kd + kk) * 4) as i64);
            let xb = k.splat(xs);
            for (j, wj) in ws.iter().enumerate() {
                let a = k.get(accs[set][tt][j]);
                let a = k.fma(*wj, xb, a);
                k.set(accs[set][tt][j], a);
            }
        }
    };
    k.for_ptr(wv, wend, |k| {
        for s in 0..step {
            body(k, s, s);
        }
        let w = k.get(wv);
        let w = k.addi(w, (step * PANEL * 4) as i64);
        k.set(wv, w);
        let x = k.get(xv);
        let x = k.addi(x, (step * 4) as i64);
        k.set(xv, x);
    });
    if main < c.kd {
        body(k, 0, 0);
    }
    if sets == 2 {
        for j in 0..nv {
            let a = k.get(accs[0][0][j]);
            let b = k.get(accs[1][0][j]);
            let s = k.fadd(a, b);
            k.set(accs[0][0][j], s);
        }
    }
    let accs = &accs[0];
    // Epilogue: bias, then store (lane by lane in the padded last panel).
    let mut vals = Vec::new();
    for (tt, row) in accs.iter().enumerate() {
        for (j, acc) in row.iter().enumerate() {
            let mut v = k.get(*acc);
            if let Some(b) = c.bias {
                let pb = k.at(b, p, (PANEL * 4) as i64);
                let bv = k.ld(V4, pb, ((v0 + j) * 16) as i64);
                v = k.fadd(v, bv);
            }
            vals.push((tt, v0 + j, v));
        }
    }
    let store_all = |k: &mut Kb<'_>, partial: bool| {
        for &(tt, vi, v) in &vals {
            let r = k.addi(t, tt as i64);
            let row = k.at(c.out, r, (c.m * 4) as i64);
            let dst = k.at(row, p, (PANEL * 4) as i64);
            let off = (vi * 16) as i64;
            if !partial {
                k.st(v, dst, off);
            } else {
                let valid = (c.m % PANEL).saturating_sub(vi * 4).min(4);
                for lane in 0..valid {
                    let s = k.b.ins().extractlane(v, lane as u8);
                    k.st(s, dst, off + 4 * lane as i64);
                }
            }
        }
    };
    if c.m % PANEL == 0 {
        store_all(k, false);
    } else {
        let full = k.ic((c.m / PANEL) as i64);
        let is_full = k.icmp(IntCC::SignedLessThan, p, full);
        k.if_else(is_full, |k| store_all(k, false), |k| store_all(k, true));
    }
}

/// `[x, w, bias?, out]`.
pub fn matmul(k: &mut Kb<'_>, kd: usize, m: usize, bias: bool) {
    let x = k.ptr(0);
    let w = k.ptr(1);
    let b = if bias { Some(k.ptr(2)) } else { None };
    let out = k.ptr(if bias { 3 } else { 2 });
    let c = Ctx {
        x,
        bias: b,
        out,
        kd,
        m,
    };
    let (lo, hi, n) = (k.lo, k.hi, k.n);
    k.for_range(lo, hi, |k, p| {
        let wp = k.at(w, p, (PANEL * kd * 4) as i64);
        let zero = k.ic(0);
        let rest = k.for_step(zero, n, 4, |k, t| {
            tile(k, &c, p, wp, t, 4, 0, 2);
            tile(k, &c, p, wp, t, 4, 2, 2);
        });
        k.for_range(rest, n, |k, t| tile(k, &c, p, wp, t, 1, 0, 4));
    });
}
