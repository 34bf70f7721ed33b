//! AVX2 attention over the KV cache for a tile of query rows: `avx512_attention`'s algorithm
//! (query rows as lanes, queries transposed once, online softmax over blocks of `BLOCK`
//! positions, masked positions weighing exactly 0) on 8-lane ymm vectors, up to `ROWS2` rows
//! per pass, with the mask as a lane blend and `2^n` built in the exponent bits as
//! `Kb::exp` does.

use std::arch::x86_64::*;

use super::x86::{block_rows, exp256, key_row_ahead, prefetch_row};
use super::{AttnCall, MAX_HEAD_DIM};

/// Most query rows per pass (4 vectors of 8 lanes).
const ROWS2: usize = 32;
const BLOCK: usize = 64;
const MASKED: f32 = -1e30;
/// Floats per row of the output scratch: 4 vectors past any chunk of dims below `hd` stay inside.
const OW: usize = MAX_HEAD_DIM + 32;

/// All-ones lanes where `lo ≤ j ≤ hi`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn live(j: i32, lo: __m256i, hi: __m256i) -> __m256 {
    let jv = _mm256_set1_epi32(j);
    let le = _mm256_cmpgt_epi32(_mm256_add_epi32(hi, _mm256_set1_epi32(1)), jv);
    let ge = _mm256_cmpgt_epi32(_mm256_add_epi32(jv, _mm256_set1_epi32(1)), lo);
    _mm256_castsi256_ps(_mm256_and_si256(le, ge))
}

/// Lanes `0..n` (n ≤ 8) as a mask for `vmaskmovps`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn first(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
}

/// # Safety
/// As `avx512_attention::attend`, on a host with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe extern "C" fn attend(a: *const AttnCall) {
    // SAFETY: the caller's contract.
    let a = unsafe { &*a };
    let rows = a.nt as usize * a.group as usize;
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(ROWS2);
        // SAFETY: rows r0..r0+rc of this call, as the contract describes.
        unsafe {
            match rc.div_ceil(8) {
                1 => attend_rows::<1, 1, 8>(a, r0, rc),
                2 => attend_rows::<2, 2, 6>(a, r0, rc),
                3 => attend_rows::<3, 3, 4>(a, r0, rc),
                _ => attend_rows::<4, 2, 6>(a, r0, rc),
            }
        }
        r0 += rc;
    }
}

/// Rows `r0 .. r0 + rc` in `V` vectors of 8 lanes (`rc ≤ 8·V`); scores for `VS` of the
/// vectors (`VS` divides `V`) and `KS` keys at a time, `VS·KS` accumulators.
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_rows<const V: usize, const VS: usize, const KS: usize>(a: &AttnCall, r0: usize, rc: usize) {
    use std::mem::MaybeUninit;
    let (group, hd, qs) = (a.group as usize, a.head_dim as usize, a.q_stride as usize);
    let (cap, kvh) = (a.cap as usize, a.kvh as usize);
    let nvh = hd.div_ceil(8);
    let lanes = 8 * V;
    // Scratch, written before it is read (as in `avx512_attention`, with 8-float vectors):
    // qt for d < hd, lanes < 8·V; s for jj < bl rounded up to KS; o for rows below rc rounded
    // up to 2 and dims below nvh rounded up to 4 vectors.
    let mut qt_m = MaybeUninit::<[f32; MAX_HEAD_DIM * ROWS2]>::uninit();
    let mut s_m = MaybeUninit::<[f32; (BLOCK + 8) * ROWS2]>::uninit();
    let mut o_m = MaybeUninit::<[f32; (ROWS2 + 2) * (MAX_HEAD_DIM + 32)]>::uninit();
    let (qt, s, o) = (qt_m.as_mut_ptr() as *mut f32, s_m.as_mut_ptr() as *mut f32, o_m.as_mut_ptr() as *mut f32);
    let mut lo_pos = [i32::MAX; ROWS2];
    let mut hi_pos = [-1i32; ROWS2];
    let qrow = |r: usize| (r / group) * qs + (kvh * group + r % group) * hd;
    // SAFETY (whole body): as in `avx512_attention::attend_rows`; `o` rows are `OW` floats, so
    // 4 vectors of 8 past any chunk below nvh stay inside the row.
    unsafe {
        for r in 0..lanes {
            let q = (r < rc).then(|| a.q.add(qrow(r0 + r)));
            if q.is_some() {
                let p = *a.pos.add((r0 + r) / group);
                hi_pos[r] = p;
                lo_pos[r] = if a.window > 0 { (p as i64 - a.window as i64 + 1).max(0) as i32 } else { 0 };
            }
            for d in 0..hd {
                *qt.add(d * ROWS2 + r) = q.map_or(0.0, |q| *q.add(d));
            }
        }
        let rows2 = rc.div_ceil(2) * 2;
        let dims4 = nvh.div_ceil(4) * 4 * 8;
        for r in 0..rows2 {
            for d in 0..dims4 {
                *o.add(r * OW + d) = 0.0;
            }
        }
        // blocks start at multiples of BLOCK, so a row's blocks (and its rounding) are the same
        // whichever rows share its pass (another split over threads, a batch); a block wholly
        // before a row's window changes nothing of it (weights 0, rescale by 1)
        let jmin = lo_pos[..rc].iter().copied().min().unwrap_or(0).max(0) as usize / BLOCK * BLOCK;
        let jmax = hi_pos[..rc].iter().copied().max().unwrap_or(-1);
        // every row of the pass attends to positions `lo_all ..= hi_all` (a block inside
        // them needs no mask; lanes past `rc` are never stored)
        let lo_all = lo_pos[..rc].iter().copied().max().unwrap_or(i32::MAX) as i64;
        let hi_all = hi_pos[..rc].iter().copied().min().unwrap_or(-1) as i64;
        let lo: [__m256i; V] = std::array::from_fn(|v| _mm256_loadu_si256(lo_pos.as_ptr().add(8 * v) as *const _));
        let hi: [__m256i; V] = std::array::from_fn(|v| _mm256_loadu_si256(hi_pos.as_ptr().add(8 * v) as *const _));
        let mut m = [_mm256_set1_ps(MASKED); V];
        let mut l = [_mm256_setzero_ps(); V];
        let scale = _mm256_set1_ps(a.scale);
        let mut slots = [0usize; BLOCK];
        let mut j0 = jmin;
        while (j0 as i64) <= jmax as i64 {
            let bl = (jmax as usize + 1 - j0).min(BLOCK);
            let full = lo_all <= j0 as i64 && (j0 + bl - 1) as i64 <= hi_all;
            block_rows(&mut slots[..bl], j0, kvh, cap, hd);
            // 1. scores, KS keys at a time (past the block's end: its last key, masked)
            let mut mx = [_mm256_set1_ps(MASKED); V];
            // the first two groups' K rows (the groups below prefetch two groups on, across
            // blocks)
            if j0 == jmin {
                for &row in slots.iter().take(bl.min(2 * KS)) {
                    prefetch_row(a.kc.wrapping_add(row), hd);
                }
            }
            let mut jj = 0;
            while jj < bl {
                let ks: [*const f32; KS] = std::array::from_fn(|i| a.kc.add(slots[(jj + i).min(bl - 1)]));
                // the V rows of these keys (read after the block's scores) and the K rows two
                // groups ahead
                for i in 0..KS.min(bl - jj) {
                    // (V rows only in decode-sized passes, as in `avx512_attention`)
                    if V == 1 {
                        prefetch_row(a.vc.wrapping_add(slots[jj + i]), hd);
                    }
                    if let Some(row) = key_row_ahead(&slots[..bl], j0, jj + i, 2 * KS, jmax, kvh, cap, hd) {
                        prefetch_row(a.kc.wrapping_add(row), hd);
                    }
                }
                for v0 in (0..V).step_by(VS) {
                    let mut acc = [[_mm256_setzero_ps(); VS]; KS];
                    for d in 0..hd {
                        let qv: [__m256; VS] =
                            std::array::from_fn(|v| _mm256_loadu_ps(qt.add(d * ROWS2 + 8 * (v0 + v))));
                        for (i, k) in ks.iter().enumerate() {
                            let kb = _mm256_set1_ps(*k.add(d));
                            for v in 0..VS {
                                acc[i][v] = _mm256_fmadd_ps(qv[v], kb, acc[i][v]);
                            }
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        let j = (j0 + jj + i) as i32;
                        for (vv, acc) in acc.iter().enumerate() {
                            let v = v0 + vv;
                            let sc = if jj + i >= bl {
                                _mm256_set1_ps(MASKED)
                            } else if full {
                                _mm256_mul_ps(*acc, scale)
                            } else {
                                _mm256_blendv_ps(
                                    _mm256_set1_ps(MASKED),
                                    _mm256_mul_ps(*acc, scale),
                                    live(j, lo[v], hi[v]),
                                )
                            };
                            _mm256_storeu_ps(s.add((jj + i) * ROWS2 + 8 * v), sc);
                            mx[v] = _mm256_max_ps(mx[v], sc);
                        }
                    }
                }
                jj += KS;
            }
            // 2. the running maximum moves: rescale l and the outputs so far
            let mut cs = [0f32; ROWS2];
            for v in 0..V {
                let mn = _mm256_max_ps(m[v], mx[v]);
                let c = exp256(_mm256_sub_ps(m[v], mn));
                l[v] = _mm256_mul_ps(l[v], c);
                m[v] = mn;
                _mm256_storeu_ps(cs.as_mut_ptr().add(8 * v), c);
            }
            // (the outputs so far are rescaled as the value pass loads them; the first block's
            // start from 0)
            let rescale = |r: usize| (j0 != jmin).then(|| cs.as_ptr().add(r));
            // 3. weights e^(s - m) (masked: 0) and their sums
            for jj in 0..bl {
                let j = (j0 + jj) as i32;
                for v in 0..V {
                    let p = s.add(jj * ROWS2 + 8 * v);
                    let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p), m[v]));
                    let e = if full { e } else { _mm256_and_ps(live(j, lo[v], hi[v]), e) };
                    _mm256_storeu_ps(p, e);
                    l[v] = _mm256_add_ps(l[v], e);
                }
            }
            // 4. out[r] += Σ_j p[j][r] · v_j: head dims in whole pairs of vectors, 6 rows × 2
            // vectors in registers; else 2 rows × 4 vectors with the dims past `hd` masked
            if hd % 16 == 0 {
                let mut r = 0;
                while r < rc {
                    let n = (rc - r).min(6);
                    match n {
                        6 => pv_rows::<6>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                        5 => pv_rows::<5>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                        4 => pv_rows::<4>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                        3 => pv_rows::<3>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                        2 => pv_rows::<2>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                        _ => pv_rows::<1>(a.vc, &slots[..bl], s.add(r), o.add(r * OW), hd, rescale(r)),
                    }
                    r += n;
                }
                j0 += bl;
                continue;
            }
            let mut c0 = 0;
            while c0 < nvh {
                let masks: [__m256i; 4] = std::array::from_fn(|c| {
                    let first_dim = 8 * (c0 + c);
                    first(hd.saturating_sub(first_dim).min(8))
                });
                let mut r = 0;
                while r < rc {
                    let mut acc: [[__m256; 4]; 2] = std::array::from_fn(|rr| {
                        std::array::from_fn(|c| match rescale(r + rr) {
                            Some(cr) => {
                                _mm256_mul_ps(_mm256_loadu_ps(o.add((r + rr) * OW + 8 * (c0 + c))), _mm256_set1_ps(*cr))
                            }
                            None => _mm256_setzero_ps(),
                        })
                    });
                    for jj in 0..bl {
                        let vr = a.vc.add(slots[jj]);
                        // lanes past head_dim are masked off (not read)
                        let vv: [__m256; 4] =
                            std::array::from_fn(|c| _mm256_maskload_ps(vr.wrapping_add(8 * (c0 + c)), masks[c]));
                        for (rr, acc) in acc.iter_mut().enumerate() {
                            let w = _mm256_set1_ps(*s.add(jj * ROWS2 + r + rr));
                            for c in 0..4 {
                                acc[c] = _mm256_fmadd_ps(vv[c], w, acc[c]);
                            }
                        }
                    }
                    for (rr, acc) in acc.iter().enumerate() {
                        for (c, x) in acc.iter().enumerate() {
                            _mm256_storeu_ps(o.add((r + rr) * OW + 8 * (c0 + c)), *x);
                        }
                    }
                    r += 2;
                }
                c0 += 4;
            }
            j0 += bl;
        }
        // normalize and store
        let mut ls = [0f32; ROWS2];
        for (v, lv) in l.iter().enumerate() {
            _mm256_storeu_ps(ls.as_mut_ptr().add(8 * v), *lv);
        }
        for (r, &lr) in ls.iter().enumerate().take(rc) {
            let inv = _mm256_set1_ps(1.0 / lr);
            let dst = a.out.add(qrow(r0 + r));
            for ch in 0..nvh {
                let x = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * OW + 8 * ch)), inv);
                _mm256_maskstore_ps(dst.add(8 * ch), first((hd - 8 * ch).min(8)), x);
            }
        }
    }
}

/// `o[r][d] = o[r][d] · c[r] + Σ_jj s[jj][r] · v(slots[jj])[d]` for `R` rows (`o` rows `OW`
/// floats apart, `s` rows `ROWS2` apart) over `hd` dims, a multiple of 16: `R` rows × 2
/// vectors of accumulators; without `c`, `o` starts from 0 (the first block).
///
/// # Safety
/// `vc + slots[jj]` holds `hd` floats for every `jj`; `s` holds `slots.len()` rows of at least
/// `R` floats; `o` holds `R` rows of at least `hd` floats; `c`, if any, `R` floats; AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_rows<const R: usize>(
    vc: *const f32,
    slots: &[usize],
    s: *const f32,
    o: *mut f32,
    hd: usize,
    c: Option<*const f32>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        for d0 in (0..hd).step_by(16) {
            let mut acc: [[__m256; 2]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|v| match c {
                    Some(c) => _mm256_mul_ps(_mm256_loadu_ps(o.add(r * OW + d0 + 8 * v)), _mm256_set1_ps(*c.add(r))),
                    None => _mm256_setzero_ps(),
                })
            });
            for (jj, &slot) in slots.iter().enumerate() {
                let vr = vc.add(slot + d0);
                let vv = [_mm256_loadu_ps(vr), _mm256_loadu_ps(vr.add(8))];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*s.add(jj * ROWS2 + r));
                    acc[0] = _mm256_fmadd_ps(vv[0], w, acc[0]);
                    acc[1] = _mm256_fmadd_ps(vv[1], w, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, x) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.add(r * OW + d0 + 8 * c), *x);
                }
            }
        }
    }
}
