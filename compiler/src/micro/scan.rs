//! The Mamba2 scan micro-kernels (AVX-512 and AVX2): a range of heads, each walking the
//! step's tokens in order through its state, `h ← e^{dt·A}·h + dt·x ⊗ B`, `y = h·C + D·x`
//! (`kernels::mamba::scan`'s recurrence). A head's state (`hd × ds` f32) stays in cache across
//! the tokens of a prefill. Short steps (decode) make one pass over the state rows per token,
//! a vector of state dims per instruction (`scan_tokens`); longer steps keep each state vector
//! in a register through `T` tokens, a vector of head dims per instruction (`scan_blocked`):
//! 8 tokens with AVX-512's 32 registers, 4 with AVX2's 16 (4 tokens' decays, inputs and
//! outputs).
//!
//! One generic body serves both widths through `Lanes`, whose methods are inlined into each
//! width's `#[target_feature]` entry point.
//!
//! `dt = softplus(dt_raw + dt_bias)` and the decay use the `exp`/`ln` of the standard library,
//! where the Cranelift kernel uses `Kb`'s polynomials: results differ from it and from the
//! interpreter by f32 rounding only.

use std::arch::x86_64::*;

use super::ScanCall;

/// The vector operations the scans use, on `W` f32 lanes.
///
/// # Safety
/// Every method needs the CPU features of its implementation's width; callers are
/// `#[target_feature]` functions with them, into which the methods inline.
trait Lanes: Copy {
    const W: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn mul(self, b: Self) -> Self;
    /// `self · b + c`
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    unsafe fn sum(self) -> f32;
}

/// `Lanes` for a vector type from its intrinsics; `|v| sum` adds the lanes of `v`.
macro_rules! lanes {
    ($v:ty, $w:expr, $set1:ident, $zero:ident, $load:ident, $store:ident, $mul:ident, $fma:ident, |$x:ident| $sum:expr) => {
        // SAFETY (every method): the intrinsics need the width's features, which the entry
        // points enable; every pointer access is the caller's.
        impl Lanes for $v {
            const W: usize = $w;
            #[inline(always)]
            unsafe fn splat(x: f32) -> Self {
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn zero() -> Self {
                unsafe { $zero() }
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                unsafe { $load(p) }
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                unsafe { $store(p, self) }
            }
            #[inline(always)]
            unsafe fn mul(self, b: Self) -> Self {
                unsafe { $mul(self, b) }
            }
            #[inline(always)]
            unsafe fn fma(self, b: Self, c: Self) -> Self {
                unsafe { $fma(self, b, c) }
            }
            #[inline(always)]
            unsafe fn sum(self) -> f32 {
                let $x = self;
                unsafe { $sum }
            }
        }
    };
}

lanes!(
    __m512,
    16,
    _mm512_set1_ps,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps,
    |v| _mm512_reduce_add_ps(v)
);
lanes!(
    __m256,
    8,
    _mm256_set1_ps,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_mul_ps,
    _mm256_fmadd_ps,
    |v| {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
);

/// # Safety
/// `call` points at a `ScanCall` as `kernels::mamba::scan` writes it: `n` rows of `zx`
/// (`width` f32) and of `act` (`ch` f32), `heads` f32 in `dt_bias`, `a_log` and `d`, the
/// layer's `heads·hd·ds` state floats, `n` rows of `y` (`heads·hd` f32); `ds` a multiple of
/// 16; heads `h0..h1` this call's own (their state rows and `y` columns are the only writes).
/// The host has AVX-512 F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub unsafe extern "C" fn scan_avx512(call: *const ScanCall) {
    // SAFETY: the caller's contract.
    unsafe { scan_heads::<__m512, 8>(&*call) }
}

/// # Safety
/// As `scan_avx512`, with `ds` a multiple of 8, on a host with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe extern "C" fn scan_avx2(call: *const ScanCall) {
    // SAFETY: the caller's contract.
    unsafe { scan_heads::<__m256, 4>(&*call) }
}

/// The most state floats of one head the blocked scan transposes (`hd·ds`, 64 KiB).
const BLOCKED_STATE: usize = 16 * 1024;

/// Steps of at least `T` tokens, with whole vectors of head dims, take the blocked scan.
#[inline(always)]
unsafe fn scan_heads<V: Lanes, const T: usize>(c: &ScanCall) {
    let (n, hd, ds) = (c.n as usize, c.hd as usize, c.ds as usize);
    if n >= T && hd % V::W == 0 && hd * ds <= BLOCKED_STATE {
        // SAFETY: the caller's contract, and hd a multiple of the width with hd·ds bounded.
        return unsafe { scan_blocked::<V, T>(c) };
    }
    // SAFETY: the caller's contract.
    unsafe { scan_tokens::<V>(c) }
}

/// `softplus(raw + bias)` (linear above 20, as torch's) and `e^{dt·a}`.
fn dt_decay(raw: f32, bias: f32, a: f32) -> (f32, f32) {
    let v = raw + bias;
    let dt = if v > 20.0 { v } else { v.exp().ln_1p() };
    (dt, (dt * a).exp())
}

/// A call's sizes, as `usize`, and the ones derived from them.
struct Dims {
    n: usize,
    hd: usize,
    ds: usize,
    width: usize,
    dt_off: usize,
    /// `heads·hd`: x's (and y's) width.
    inner: usize,
    /// `groups·ds`: B's (and C's) width.
    gs: usize,
    /// A conv output row: x, B, C.
    ch: usize,
    per_group: usize,
}

impl Dims {
    fn of(c: &ScanCall) -> Dims {
        let (heads, hd, ds, groups) = (c.heads as usize, c.hd as usize, c.ds as usize, c.groups as usize);
        let (inner, gs) = (heads * hd, groups * ds);
        Dims {
            n: c.n as usize,
            hd,
            ds,
            width: c.width as usize,
            dt_off: c.dt_off as usize,
            inner,
            gs,
            ch: inner + 2 * gs,
            per_group: heads / groups,
        }
    }
}

/// Head `h`'s `A = -e^{a_log}`, dt bias, `D` and state (`state` floats per head).
///
/// # Safety
/// `h < heads` of the call, whose parameters and state hold `heads` entries.
#[inline(always)]
unsafe fn head_params(c: &ScanCall, h: usize, state: usize) -> (f32, f32, f32, *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { (-(*c.a_log.add(h)).exp(), *c.dt_bias.add(h), *c.d.add(h), c.ssm.add(h * state)) }
}

/// One token at a time, one pass over the state per token (decode, short steps).
#[inline(always)]
unsafe fn scan_tokens<V: Lanes>(c: &ScanCall) {
    let Dims { n, hd, ds, width, dt_off, inner, gs, ch, per_group } = Dims::of(c);
    // SAFETY (whole body): every read is `zx + t·width + dt_off + h`, `act + t·ch + (< ch)`,
    // a parameter at `h < heads`, or the state at `h·hd·ds + (< hd·ds)`; every write the state
    // of a head `h0 <= h < h1` or `y + t·inner + h·hd + (< hd)`, for `t < n`: inside what the
    // caller gave.
    unsafe {
        for h in c.h0 as usize..c.h1 as usize {
            let g = h / per_group;
            let (a, dtb, d, st) = head_params(c, h, hd * ds);
            for t in 0..n {
                let (dt, da) = dt_decay(*c.zx.add(t * width + dt_off + h), dtb, a);
                let da = V::splat(da);
                let row = c.act.add(t * ch);
                let (x, b, cc) = (row.add(h * hd), row.add(inner + g * ds), row.add(inner + gs + g * ds));
                let y = c.y.add(t * inner + h * hd);
                for pd in 0..hd {
                    let xv = *x.add(pd);
                    let dx = V::splat(dt * xv);
                    let sp = st.add(pd * ds);
                    let mut acc = V::zero();
                    for j in (0..ds).step_by(V::W) {
                        let s = V::load(sp.add(j)).fma(da, dx.mul(V::load(b.add(j))));
                        s.store(sp.add(j));
                        acc = s.fma(V::load(cc.add(j)), acc);
                    }
                    *y.add(pd) = acc.sum() + d * xv;
                }
            }
        }
    }
}

/// `T` tokens per pass over the state: each head's state is transposed to `[ds][hd]` (`W` head
/// dims per vector), so a state vector stays in a register through `T` tokens,
/// `s ← e^{dt_t·A}·s + B_t[j]·(dt_t·x_t)` and `y_t += C_t[j]·s` (broadcast `B_t[j]`,
/// `C_t[j]`), with no horizontal sums; the state goes back to `[hd][ds]` after the step. The
/// same recurrence as `scan_tokens`, summed over the state dims in another order.
#[inline(always)]
unsafe fn scan_blocked<V: Lanes, const T: usize>(c: &ScanCall) {
    let Dims { n, hd, ds, width, dt_off, inner, gs, ch, per_group } = Dims::of(c);
    let mut tr = vec![0f32; hd * ds];
    // SAFETY (whole body): as `scan_tokens`: reads inside the `n` rows of `zx` and `act`, the
    // parameters at `h < heads` and head `h`'s state; writes head `h`'s state (`h0 <= h <
    // h1`) and its `y` columns; `tr` holds `hd·ds` floats, indexed `j·hd + p` with `j < ds`,
    // `p < hd`, `p` a multiple of `W` for vector accesses (`hd % W == 0`).
    unsafe {
        for h in c.h0 as usize..c.h1 as usize {
            let g = h / per_group;
            let (a, dtb, d, st) = head_params(c, h, hd * ds);
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
                let mut da = [V::zero(); T];
                for i in 0..m {
                    let (s, e) = dt_decay(*c.zx.add((t0 + i) * width + dt_off + h), dtb, a);
                    dt[i] = s;
                    da[i] = V::splat(e);
                }
                let rows: [*const f32; T] = std::array::from_fn(|i| c.act.add((t0 + i.min(m - 1)) * ch));
                for p in (0..hd).step_by(V::W) {
                    let mut dx = [V::zero(); T];
                    let mut y = [V::zero(); T];
                    for i in 0..m {
                        dx[i] = V::splat(dt[i]).mul(V::load(rows[i].add(h * hd + p)));
                    }
                    let sp = tr.as_mut_ptr().add(p);
                    // the state dims for `n` tokens; called with `n = T` (whole blocks,
                    // unrolled) or the rest
                    let mut pass = |n: usize| {
                        for j in 0..ds {
                            let mut s = V::load(sp.add(j * hd));
                            for i in 0..n {
                                let b = V::splat(*rows[i].add(b0 + j));
                                s = s.fma(da[i], dx[i].mul(b));
                                y[i] = s.fma(V::splat(*rows[i].add(c0 + j)), y[i]);
                            }
                            s.store(sp.add(j * hd));
                        }
                    };
                    if m == T {
                        pass(T);
                    } else {
                        pass(m);
                    }
                    for i in 0..m {
                        let x = V::load(rows[i].add(h * hd + p));
                        V::splat(d).fma(x, y[i]).store(c.y.add((t0 + i) * inner + h * hd + p));
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
