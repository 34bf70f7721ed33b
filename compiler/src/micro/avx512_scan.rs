//! The AVX-512 Mamba2 scan: a range of heads, each walking the step's tokens in order through
//! its state rows, `h ← e^{dt·A}·h + dt·x ⊗ B`, `y = h·C + D·x` (`kernels::mamba::scan`'s
//! recurrence), 16 state dims per instruction, one pass over the state per token. A head's
//! state (`hd × ds` f32) stays in cache across the tokens of a prefill.
//!
//! `dt = softplus(dt_raw + dt_bias)` and the decay use the `exp`/`ln` of the standard library,
//! where the Cranelift kernel uses `Kb`'s polynomials: results differ from it and from the
//! interpreter by f32 rounding only.

use std::arch::x86_64::*;

use super::ScanCall;

/// # Safety
/// `call` points at a `ScanCall` as `kernels::mamba::scan` writes it: `n` rows of `zx`
/// (`width` f32) and of `act` (`ch` f32), `heads` f32 in `dt_bias`, `a_log` and `d`, the
/// layer's `heads·hd·ds` state floats, `n` rows of `y` (`heads·hd` f32); `ds` a multiple of
/// 16; heads `h0..h1` this call's own (their state rows and `y` columns are the only writes).
/// The host has AVX-512 F and FMA.
pub unsafe extern "C" fn scan(call: *const ScanCall) {
    // SAFETY: the caller's contract.
    unsafe { scan_heads(&*call) }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn scan_heads(c: &ScanCall) {
    let (n, heads, hd, ds) = (c.n as usize, c.heads as usize, c.hd as usize, c.ds as usize);
    let (groups, width, dt_off) = (c.groups as usize, c.width as usize, c.dt_off as usize);
    let (inner, gs) = (heads * hd, groups * ds);
    let ch = inner + 2 * gs;
    let per_group = heads / groups;
    // SAFETY (whole body): every read is `zx + t·width + dt_off + h`, `act + t·ch + (< ch)`,
    // a parameter at `h < heads`, or the state at `h·hd·ds + (< hd·ds)`; every write the state
    // of a head `h0 <= h < h1` or `y + t·inner + h·hd + (< hd)`, for `t < n`: inside what the
    // caller gave.
    unsafe {
        for h in c.h0 as usize..c.h1 as usize {
            let g = h / per_group;
            let a = -(*c.a_log.add(h)).exp();
            let (dtb, d) = (*c.dt_bias.add(h), *c.d.add(h));
            let st = c.ssm.add(h * hd * ds);
            for t in 0..n {
                let v = *c.zx.add(t * width + dt_off + h) + dtb;
                let dt = if v > 20.0 { v } else { v.exp().ln_1p() };
                let da = _mm512_set1_ps((dt * a).exp());
                let row = c.act.add(t * ch);
                let (x, b, cc) = (row.add(h * hd), row.add(inner + g * ds), row.add(inner + gs + g * ds));
                let y = c.y.add(t * inner + h * hd);
                for pd in 0..hd {
                    let xv = *x.add(pd);
                    let dx = _mm512_set1_ps(dt * xv);
                    let sp = st.add(pd * ds);
                    let mut acc = _mm512_setzero_ps();
                    for j in (0..ds).step_by(16) {
                        let s = _mm512_loadu_ps(sp.add(j));
                        let s = _mm512_fmadd_ps(s, da, _mm512_mul_ps(dx, _mm512_loadu_ps(b.add(j))));
                        _mm512_storeu_ps(sp.add(j), s);
                        acc = _mm512_fmadd_ps(s, _mm512_loadu_ps(cc.add(j)), acc);
                    }
                    *y.add(pd) = _mm512_reduce_add_ps(acc) + d * xv;
                }
            }
        }
    }
}
