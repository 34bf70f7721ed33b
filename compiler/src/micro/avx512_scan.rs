//! The AVX-512 Mamba2 scan: a range of heads, each walking the step's tokens in order through
//! its state, `h ← e^{dt·A}·h + dt·x ⊗ B`, `y = h·C + D·x` (`kernels::mamba::scan`'s
//! recurrence). A head's state (`hd × ds` f32) stays in cache across the tokens of a prefill.
//! Short steps (decode) make one pass over the state rows per token, 16 state dims per
//! instruction (`scan_tokens`); steps of 8 tokens or more keep each state vector in a register
//! through 8 tokens, 16 head dims per instruction (`scan_blocked`).
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

/// Tokens per pass over the state in the blocked scan.
const T: usize = 8;

/// Steps of at least this many tokens take the blocked scan (`scan_blocked`).
const BLOCKED_MIN: usize = T;

/// The most state floats of one head the blocked scan transposes (`hd·ds`, 64 KiB).
const BLOCKED_STATE: usize = 16 * 1024;

#[target_feature(enable = "avx512f,fma")]
unsafe fn scan_heads(c: &ScanCall) {
    let (n, hd, ds) = (c.n as usize, c.hd as usize, c.ds as usize);
    if n >= BLOCKED_MIN && hd % 16 == 0 && hd * ds <= BLOCKED_STATE {
        // SAFETY: the caller's contract, and hd a multiple of 16 with hd·ds bounded.
        return unsafe { scan_blocked(c) };
    }
    // SAFETY: the caller's contract.
    unsafe { scan_tokens(c) }
}

/// `softplus(raw + bias)` (linear above 20, as torch's) and `e^{dt·a}`.
fn dt_decay(raw: f32, bias: f32, a: f32) -> (f32, f32) {
    let v = raw + bias;
    let dt = if v > 20.0 { v } else { v.exp().ln_1p() };
    (dt, (dt * a).exp())
}

/// One token at a time, one pass over the state per token (decode, short steps).
#[target_feature(enable = "avx512f,fma")]
unsafe fn scan_tokens(c: &ScanCall) {
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
                let (dt, da) = dt_decay(*c.zx.add(t * width + dt_off + h), dtb, a);
                let da = _mm512_set1_ps(da);
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

/// `T` tokens per pass over the state: each head's state is transposed to `[ds][hd]` (16 head
/// dims per vector), so a state vector stays in a register through `T` tokens,
/// `s ← e^{dt_t·A}·s + B_t[j]·(dt_t·x_t)` and `y_t += C_t[j]·s` (broadcast `B_t[j]`,
/// `C_t[j]`), with no horizontal sums; the state goes back to `[hd][ds]` after the step. The
/// same recurrence as `scan_tokens`, summed over the state dims in another order.
#[target_feature(enable = "avx512f,fma")]
unsafe fn scan_blocked(c: &ScanCall) {
    let (n, heads, hd, ds) = (c.n as usize, c.heads as usize, c.hd as usize, c.ds as usize);
    let (groups, width, dt_off) = (c.groups as usize, c.width as usize, c.dt_off as usize);
    let (inner, gs) = (heads * hd, groups * ds);
    let ch = inner + 2 * gs;
    let per_group = heads / groups;
    let mut tr = vec![0f32; hd * ds];
    // SAFETY (whole body): as `scan_tokens`: reads inside the `n` rows of `zx` and `act`, the
    // parameters at `h < heads` and head `h`'s state; writes head `h`'s state (`h0 <= h <
    // h1`) and its `y` columns; `tr` holds `hd·ds` floats, indexed `j·hd + p` with `j < ds`,
    // `p < hd`, `p` a multiple of 16 for vector accesses (`hd % 16 == 0`).
    unsafe {
        for h in c.h0 as usize..c.h1 as usize {
            let g = h / per_group;
            let a = -(*c.a_log.add(h)).exp();
            let (dtb, d) = (*c.dt_bias.add(h), *c.d.add(h));
            let st = c.ssm.add(h * hd * ds);
            for p in 0..hd {
                for j in 0..ds {
                    *tr.get_unchecked_mut(j * hd + p) = *st.add(p * ds + j);
                }
            }
            let (b0, c0) = (inner + g * ds, inner + gs + g * ds);
            let mut t0 = 0;
            while t0 < n {
                let m = (n - t0).min(T);
                let mut dt = [0f32; T];
                let mut da = [_mm512_setzero_ps(); T];
                for i in 0..m {
                    let (s, e) = dt_decay(*c.zx.add((t0 + i) * width + dt_off + h), dtb, a);
                    dt[i] = s;
                    da[i] = _mm512_set1_ps(e);
                }
                let rows: [*const f32; T] = std::array::from_fn(|i| c.act.add((t0 + i.min(m - 1)) * ch));
                for p in (0..hd).step_by(16) {
                    let mut dx = [_mm512_setzero_ps(); T];
                    let mut y = [_mm512_setzero_ps(); T];
                    for i in 0..m {
                        dx[i] = _mm512_mul_ps(_mm512_set1_ps(dt[i]), _mm512_loadu_ps(rows[i].add(h * hd + p)));
                    }
                    let sp = tr.as_mut_ptr().add(p);
                    // the state dims for `n` tokens; called with `n = T` (whole blocks,
                    // unrolled) or the rest
                    let mut pass = |n: usize| {
                        for j in 0..ds {
                            let mut s = _mm512_loadu_ps(sp.add(j * hd));
                            for i in 0..n {
                                let b = _mm512_set1_ps(*rows[i].add(b0 + j));
                                s = _mm512_fmadd_ps(s, da[i], _mm512_mul_ps(dx[i], b));
                                y[i] = _mm512_fmadd_ps(s, _mm512_set1_ps(*rows[i].add(c0 + j)), y[i]);
                            }
                            _mm512_storeu_ps(sp.add(j * hd), s);
                        }
                    };
                    if m == T {
                        pass(T);
                    } else {
                        pass(m);
                    }
                    for i in 0..m {
                        let x = _mm512_loadu_ps(rows[i].add(h * hd + p));
                        let out = _mm512_fmadd_ps(_mm512_set1_ps(d), x, y[i]);
                        _mm512_storeu_ps(c.y.add((t0 + i) * inner + h * hd + p), out);
                    }
                }
                t0 += m;
            }
            for p in 0..hd {
                for j in 0..ds {
                    *st.add(p * ds + j) = *tr.get_unchecked(j * hd + p);
                }
            }
        }
    }
}
