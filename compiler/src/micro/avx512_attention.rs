//! AVX-512 attention over the KV cache for a tile of query rows: every query head of one kv
//! head's group for `nt` consecutive step rows (up to 64 rows per pass, one lane each), with an
//! online softmax over blocks of `BLOCK` positions (flash-attention style), so each K and V
//! row is read once per tile of rows instead of once per row.
//!
//! Lanes are query rows: the rows' queries are transposed once (`qt[d][row]`), so a score
//! vector for one key is `Σ_d qt[d] · k[d]` with `k[d]` broadcast: plain FMAs, no horizontal
//! sums, four keys at a time. The running maximum and sum are per lane; masked positions
//! (after a row's own position, or before its window) get weight exactly 0. The value pass
//! accumulates `out[row] += p[key][row] · v[key]` for 4 rows × 64 dims in registers.
//!
//! Semantics are `kernels::attention`'s (same clamped polynomial `exp`), so results differ from
//! the interpreter only by f32 rounding.

use std::arch::x86_64::*;

use super::x86::{block_rows, key_row_ahead, prefetch_row};
use super::{AttnCall, MAX_HEAD_DIM, ROWS};

const BLOCK: usize = 64;
/// A masked score: finite, so block maxima and rescaling never see infinities.
const MASKED: f32 = -1e30;

/// `e^x` for `x ≤ 0` as `Kb::exp` computes it: clamped to [-80, 88.3] (the upper bound never
/// binds here, so only the lower one is applied), `2^n · p(r)` with a degree-7 polynomial of
/// the reduced argument. Attention only exponentiates differences from a running maximum.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp512_nonpos(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-80.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// Lanes of key position `j` that rows attend to (`lo[v] ≤ j ≤ hi[v]`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn live(j: i32, lo: __m512i, hi: __m512i) -> __mmask16 {
    let jv = _mm512_set1_epi32(j);
    _mm512_cmple_epi32_mask(jv, hi) & _mm512_cmpge_epi32_mask(jv, lo)
}

/// # Safety
/// `a` points to an `AttnCall` whose pointers cover what it describes: `nt` rows of `q`,
/// `pos` and `out`, the caches of `kv_heads > kvh` heads × `cap` slots × `head_dim`, every
/// position in `pos` at least 0 with its attended slots written; `group·head_dim·(kvh+1) ≤
/// q_stride`, `1 ≤ head_dim ≤ MAX_HEAD_DIM`, `cap ≥ 1`; the host has AVX-512 F.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe extern "C" fn attend(a: *const AttnCall) {
    // SAFETY: the caller's contract.
    let a = unsafe { &*a };
    let rows = a.nt as usize * a.group as usize;
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(ROWS);
        // SAFETY: rows r0..r0+rc of this call, as the contract describes.
        unsafe {
            match rc.div_ceil(16) {
                // a decode pass: a group of heads of one row, or a few rows
                _ if rc <= 4 => attend_keys::<4>(a, r0, rc),
                _ if rc <= 8 => attend_keys::<8>(a, r0, rc),
                1 => attend_rows::<1, 8>(a, r0, rc),
                2 => attend_rows::<2, 4>(a, r0, rc),
                3 => attend_rows::<3, 4>(a, r0, rc),
                _ => attend_rows::<4, 4>(a, r0, rc),
            }
        }
        r0 += rc;
    }
}

/// Rows `r0 .. r0 + rc` (row `r` = step row `r / group`, head `r % group` of the group), in `V`
/// vectors of 16 lanes (`rc ≤ 16·V`), scores for `KS` keys at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn attend_rows<const V: usize, const KS: usize>(a: &AttnCall, r0: usize, rc: usize) {
    use std::mem::MaybeUninit;
    let (group, hd, qs) = (a.group as usize, a.head_dim as usize, a.q_stride as usize);
    let (cap, kvh) = (a.cap as usize, a.kvh as usize);
    let nvh = hd.div_ceil(16);
    // Scratch, written before it is read: qt[d·ROWS + lane] for d < hd, lane < 16·V; s[jj·ROWS
    // + lane] for jj < bl rounded up to KS, lane < 16·V; o[row·MAX_HEAD_DIM + dim] for rows
    // below rc rounded up to 4 and dims below nvh rounded up to 4 vectors.
    let mut qt_m = MaybeUninit::<[f32; MAX_HEAD_DIM * ROWS]>::uninit();
    let mut s_m = MaybeUninit::<[f32; (BLOCK + 8) * ROWS]>::uninit();
    let mut o_m = MaybeUninit::<[f32; ROWS * MAX_HEAD_DIM]>::uninit();
    let (qt, s, o) = (qt_m.as_mut_ptr() as *mut f32, s_m.as_mut_ptr() as *mut f32, o_m.as_mut_ptr() as *mut f32);
    let mut lo_pos = [i32::MAX; ROWS];
    let mut hi_pos = [-1i32; ROWS];
    // row r's query and output, in the q / out rows of this call
    let qrow = |r: usize| (r / group) * qs + (kvh * group + r % group) * hd;
    // SAFETY (whole body): q/out offsets are `qrow(r) + d` for rows of this call and
    // `d < hd`; cache rows are `(kvh·cap + slot)·hd + d` with `slot < cap`; scratch indices
    // stay below the sizes above (`rc ≤ 16·V ≤ ROWS`, `hd ≤ MAX_HEAD_DIM`, `jj < BLOCK + 8`).
    unsafe {
        for r in 0..rc {
            let p = *a.pos.add((r0 + r) / group);
            hi_pos[r] = p;
            lo_pos[r] = if a.window > 0 { (p as i64 - a.window as i64 + 1).max(0) as i32 } else { 0 };
        }
        // the rows' queries transposed, 16 rows × 16 dims at a time in registers (lanes past
        // the rows hold zeros)
        for v in 0..V {
            for ch in 0..hd.div_ceil(16) {
                let n = (hd - 16 * ch).min(16);
                let mk = ((1u32 << n) - 1) as __mmask16;
                let rows: [__m512; 16] = std::array::from_fn(|i| {
                    let r = 16 * v + i;
                    if r < rc {
                        _mm512_maskz_loadu_ps(mk, a.q.add(qrow(r0 + r) + 16 * ch))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (dd, t) in transpose16(&rows).iter().enumerate().take(n) {
                    _mm512_storeu_ps(qt.add((16 * ch + dd) * ROWS + 16 * v), *t);
                }
            }
        }
        let rows4 = rc.div_ceil(4) * 4;
        let dims4 = nvh.div_ceil(4) * 4 * 16;
        for r in 0..rows4 {
            for d in 0..dims4 {
                *o.add(r * MAX_HEAD_DIM + d) = 0.0;
            }
        }
        // blocks start at multiples of BLOCK, so a row's blocks (and its rounding) are the same
        // whichever rows share its pass (another split over threads, a batch); a block wholly
        // before a row's window changes nothing of it (weights 0, rescale by 1)
        let jmin = lo_pos[..rc].iter().copied().min().unwrap_or(0).max(0) as usize / BLOCK * BLOCK;
        let jmax = hi_pos[..rc].iter().copied().max().unwrap_or(-1);
        // keys every row attends to (`all_lo ..= all_hi`): a block inside needs no masks
        let all_lo = lo_pos[..rc].iter().copied().max().unwrap_or(i32::MAX) as i64;
        let all_hi = hi_pos[..rc].iter().copied().min().unwrap_or(-1) as i64;
        let lo: [__m512i; V] = std::array::from_fn(|v| _mm512_loadu_si512(lo_pos.as_ptr().add(16 * v) as *const _));
        let hi: [__m512i; V] = std::array::from_fn(|v| _mm512_loadu_si512(hi_pos.as_ptr().add(16 * v) as *const _));
        let mut m = [_mm512_set1_ps(MASKED); V];
        let mut l = [_mm512_setzero_ps(); V];
        let scale = _mm512_set1_ps(a.scale);
        // the block's cache rows (slot of position j: j % cap, one division per block)
        let mut slots = [0usize; BLOCK];
        let mut j0 = jmin;
        while (j0 as i64) <= jmax as i64 {
            let bl = (jmax as usize + 1 - j0).min(BLOCK);
            block_rows(&mut slots[..bl], j0, kvh, cap, hd);
            // every row attends to every key of the block: its scores and weights go unmasked
            // (the lanes past the rows then hold finite scratch nobody reads)
            let inside = all_lo <= j0 as i64 && (j0 + bl - 1) as i64 <= all_hi;
            // 1. scores, KS keys at a time (past the block's end: its last key, masked)
            let mut mx = [_mm512_set1_ps(MASKED); V];
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
                // the K rows two groups ahead, and in a pass of at most 16 rows (decode) the V
                // rows of these keys (read after the block's scores): decode reads the cache
                // once, from memory, and stalls on it without them; a prefill tile's value pass
                // rereads each V row 16 times and its scratch fills L1 (with the V prefetches
                // too it measured no faster)
                for i in 0..KS.min(bl - jj) {
                    if V == 1 {
                        prefetch_row(a.vc.wrapping_add(slots[jj + i]), hd);
                    }
                    if let Some(row) = key_row_ahead(&slots[..bl], j0, jj + i, 2 * KS, jmax, kvh, cap, hd) {
                        prefetch_row(a.kc.wrapping_add(row), hd);
                    }
                }
                let mut acc = [[_mm512_setzero_ps(); V]; KS];
                for d in 0..hd {
                    let qv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(qt.add(d * ROWS + 16 * v)));
                    for (i, k) in ks.iter().enumerate() {
                        let kb = _mm512_set1_ps(*k.add(d));
                        for v in 0..V {
                            acc[i][v] = _mm512_fmadd_ps(qv[v], kb, acc[i][v]);
                        }
                    }
                }
                if inside && jj + KS <= bl {
                    for (i, acc) in acc.iter().enumerate() {
                        for v in 0..V {
                            let sc = _mm512_mul_ps(acc[v], scale);
                            _mm512_storeu_ps(s.add((jj + i) * ROWS + 16 * v), sc);
                            mx[v] = _mm512_max_ps(mx[v], sc);
                        }
                    }
                } else {
                    for (i, acc) in acc.iter().enumerate() {
                        let j = (j0 + jj + i) as i32;
                        for v in 0..V {
                            let mk = if jj + i < bl { live(j, lo[v], hi[v]) } else { 0 };
                            let sc = _mm512_mask_mov_ps(_mm512_set1_ps(MASKED), mk, _mm512_mul_ps(acc[v], scale));
                            _mm512_storeu_ps(s.add((jj + i) * ROWS + 16 * v), sc);
                            mx[v] = _mm512_max_ps(mx[v], sc);
                        }
                    }
                }
                jj += KS;
            }
            // 2. the running maximum moves: rescale l (and, in 4., the outputs so far)
            let mut cs = [0f32; ROWS];
            for v in 0..V {
                let mn = _mm512_max_ps(m[v], mx[v]);
                let c = exp512_nonpos(_mm512_sub_ps(m[v], mn));
                l[v] = _mm512_mul_ps(l[v], c);
                m[v] = mn;
                _mm512_storeu_ps(cs.as_mut_ptr().add(16 * v), c);
            }
            // 3. weights e^(s - m) (masked: 0) and their sums
            for jj in 0..bl {
                let j = (j0 + jj) as i32;
                for v in 0..V {
                    let p = s.add(jj * ROWS + 16 * v);
                    let e = exp512_nonpos(_mm512_sub_ps(_mm512_loadu_ps(p), m[v]));
                    let e = if inside { e } else { _mm512_maskz_mov_ps(live(j, lo[v], hi[v]), e) };
                    _mm512_storeu_ps(p, e);
                    l[v] = _mm512_add_ps(l[v], e);
                }
            }
            // 4. out[r] = out[r] · c[r] + Σ_j p[j][r] · v_j (the first block starts from 0)
            let c = (j0 != jmin).then_some(&cs[..]);
            value_pass(o, a.vc, &slots[..bl], s, (ROWS, 1), c, rc, hd);
            j0 += bl;
        }
        // normalize and store
        let mut ls = [0f32; ROWS];
        for (v, lv) in l.iter().enumerate() {
            _mm512_storeu_ps(ls.as_mut_ptr().add(16 * v), *lv);
        }
        store_rows(o, &ls[..rc], hd, |r| a.out.add(qrow(r0 + r)));
    }
}

/// Step 4. of a block of keys (cache rows `slots`) for the rows below `rc`:
/// `o[r] = o[r] · c[r] + Σ_jj w[jj·kstep + r·rstep] · v_jj` (keys in order; without `c`, `o`
/// starts from 0: the first block), 4 rows × 4 vectors of dims in registers.
///
/// # Safety
/// `o` has `rc` rounded up to 4 rows of `MAX_HEAD_DIM` floats; `w` and every slot's V row are
/// readable as `value_keys` says for those rows; `c` has that many factors; `hd ≤
/// MAX_HEAD_DIM`; the host has AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_pass(
    o: *mut f32,
    vc: *const f32,
    slots: &[usize],
    w: *const f32,
    (kstep, rstep): (usize, usize),
    c: Option<&[f32]>,
    rc: usize,
    hd: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut c0 = 0;
        while c0 < hd.div_ceil(16) {
            let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                let first = 16 * (c0 + v);
                if first >= hd {
                    0
                } else if hd - first >= 16 {
                    0xffff
                } else {
                    ((1u32 << (hd - first)) - 1) as __mmask16
                }
            });
            let mut r = 0;
            while r < rc {
                let at = |rr: usize, v: usize| o.add((r + rr) * MAX_HEAD_DIM + 16 * (c0 + v));
                let mut acc: [[__m512; 4]; 4] = std::array::from_fn(|rr| {
                    std::array::from_fn(|v| match c {
                        Some(c) => _mm512_mul_ps(_mm512_loadu_ps(at(rr, v)), _mm512_set1_ps(c[r + rr])),
                        None => _mm512_setzero_ps(),
                    })
                });
                let (vr, wr) = (vc.wrapping_add(16 * c0), w.add(r * rstep));
                if masks == [0xffff; 4] {
                    value_keys::<false>(&mut acc, vr, slots, wr, (kstep, rstep), masks);
                } else {
                    value_keys::<true>(&mut acc, vr, slots, wr, (kstep, rstep), masks);
                }
                for (rr, acc) in acc.iter().enumerate() {
                    for (v, x) in acc.iter().enumerate() {
                        _mm512_storeu_ps(at(rr, v), *x);
                    }
                }
                r += 4;
            }
            c0 += 4;
        }
    }
}

/// Row `r < l.len()` of `o` (`MAX_HEAD_DIM` floats apart) times `1 / l[r]`, its `hd` floats
/// stored at `dst(r)`.
///
/// # Safety
/// `o` has those rows; `dst(r)` takes `hd ≤ MAX_HEAD_DIM` floats; the host has AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(o: *const f32, l: &[f32], hd: usize, dst: impl Fn(usize) -> *mut f32) {
    // SAFETY: the caller's contract.
    unsafe {
        for (r, &lr) in l.iter().enumerate() {
            let inv = _mm512_set1_ps(1.0 / lr);
            for ch in 0..hd.div_ceil(16) {
                let n = (hd - 16 * ch).min(16);
                let mk = ((1u32 << n) - 1) as __mmask16;
                let x = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * MAX_HEAD_DIM + 16 * ch)), inv);
                _mm512_mask_storeu_ps(dst(r).add(16 * ch), mk, x);
            }
        }
    }
}

/// `acc[rr][c] += Σ_jj w[jj·kstep + rr·rstep] · v_jj[16c ..]` (keys in order) over the keys
/// whose cache rows (from `vc`) are `slots`: 4 rows × 4 vectors of dims; with `MASKED`, the
/// lanes of vector `c` past `masks[c]` are not read (head_dim not a multiple of 64), else
/// every vector is whole.
///
/// # Safety
/// For every slot, the 64 floats from `vc + slot` (the `masks`' lanes of them with `MASKED`)
/// are readable; so is `w[jj·kstep + rr·rstep]` for every key `jj` and `rr < 4`; the host has
/// AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn value_keys<const MASKED: bool>(
    acc: &mut [[__m512; 4]; 4],
    vc: *const f32,
    slots: &[usize],
    w: *const f32,
    (kstep, rstep): (usize, usize),
    masks: [__mmask16; 4],
) {
    // SAFETY: the caller's contract.
    unsafe {
        for (jj, &slot) in slots.iter().enumerate() {
            let vr = vc.wrapping_add(slot);
            let vv: [__m512; 4] = std::array::from_fn(|c| {
                if MASKED {
                    _mm512_maskz_loadu_ps(masks[c], vr.wrapping_add(16 * c))
                } else {
                    _mm512_loadu_ps(vr.add(16 * c))
                }
            });
            for (rr, acc) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_ps(*w.add(jj * kstep + rr * rstep));
                for c in 0..4 {
                    acc[c] = _mm512_fmadd_ps(vv[c], wb, acc[c]);
                }
            }
        }
    }
}

/// The 16×16 block `r` transposed: lane `i` of `t[c]` is lane `c` of `r[i]` (unpacks of pairs
/// of rows, of pairs of pairs, then two rounds of 128-bit lane shuffles).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4k + j]: in each 128-bit lane L, column 4L + j of rows 4k .. 4k + 4
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (k, j) = (i / 4, i % 4);
        let x = _mm512_castps_pd(t[4 * k + j / 2]);
        let y = _mm512_castps_pd(t[4 * k + 2 + j / 2]);
        _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(x, y) } else { _mm512_unpackhi_pd(x, y) })
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[j + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
        out[j + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[j + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
    }
    out
}

/// `attend_rows` for a decode pass of `rc ≤ R` rows (`R` is 4 or 8): lanes over keys instead
/// of rows. The K rows of 16 keys are transposed in registers, 16 dims at a time, so a row's
/// scores for 16 keys take one FMA per dim with its query element broadcast (with rows as
/// lanes, a pass of 3 heads used 3 of 16 lanes and broadcast every K element). Every score,
/// weight, sum and output is computed with the same operations in the same order as
/// `attend_rows` (a score: FMAs over dims in order; the running sum: the block's weights in
/// key order), so the results are bit-identical; only the lanes differ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn attend_keys<const R: usize>(a: &AttnCall, r0: usize, rc: usize) {
    use std::mem::MaybeUninit;
    static ZEROS: [f32; MAX_HEAD_DIM] = [0.0; MAX_HEAD_DIM];
    let (group, hd, qs) = (a.group as usize, a.head_dim as usize, a.q_stride as usize);
    let (cap, kvh) = (a.cap as usize, a.kvh as usize);
    let nvh = hd.div_ceil(16);
    let qrow = |r: usize| (r / group) * qs + (kvh * group + r % group) * hd;
    // rows past rc score zero queries (finite scratch, never stored)
    let mut qp = [ZEROS.as_ptr(); 8];
    let mut lo_pos = [i32::MAX; 8];
    let mut hi_pos = [-1i32; 8];
    // Scratch: w[r·BLOCK + jj] the block's scores, then weights, for rows below R (written
    // before read: every block writes its keys rounded up to 16); o[r·MAX_HEAD_DIM + d] as in
    // `attend_rows` for rows below rc rounded up to 4 (≤ R) and dims below nvh rounded up to 4
    // vectors.
    let mut w = [0f32; 8 * BLOCK];
    let mut o_m = MaybeUninit::<[f32; 8 * MAX_HEAD_DIM]>::uninit();
    let o = o_m.as_mut_ptr() as *mut f32;
    // SAFETY (whole body): as in `attend_rows`; K rows are those of keys below the block's
    // length (the last one for lanes past it), query reads `qp[r] + d` with `d < hd` (a query
    // row, or ZEROS of MAX_HEAD_DIM ≥ hd floats); `w` indices below R·BLOCK; `o` rows below R.
    unsafe {
        for r in 0..rc {
            qp[r] = a.q.add(qrow(r0 + r));
            let p = *a.pos.add((r0 + r) / group);
            hi_pos[r] = p;
            lo_pos[r] = if a.window > 0 { (p as i64 - a.window as i64 + 1).max(0) as i32 } else { 0 };
        }
        let rows4 = rc.div_ceil(4) * 4;
        let dims4 = nvh.div_ceil(4) * 4 * 16;
        for r in 0..rows4 {
            for d in 0..dims4 {
                *o.add(r * MAX_HEAD_DIM + d) = 0.0;
            }
        }
        let jmin = lo_pos[..rc].iter().copied().min().unwrap_or(0).max(0) as usize / BLOCK * BLOCK;
        let jmax = hi_pos[..rc].iter().copied().max().unwrap_or(-1);
        let all_lo = lo_pos[..rc].iter().copied().max().unwrap_or(i32::MAX) as i64;
        let all_hi = hi_pos[..rc].iter().copied().min().unwrap_or(-1) as i64;
        let mut m = [MASKED; 8];
        let mut l = [0f32; 8];
        let scale = _mm512_set1_ps(a.scale);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut slots = [0usize; BLOCK];
        let mut j0 = jmin;
        while (j0 as i64) <= jmax as i64 {
            let bl = (jmax as usize + 1 - j0).min(BLOCK);
            block_rows(&mut slots[..bl], j0, kvh, cap, hd);
            let inside = all_lo <= j0 as i64 && (j0 + bl - 1) as i64 <= all_hi;
            if j0 == jmin {
                for &row in slots.iter().take(bl.min(16)) {
                    prefetch_row(a.kc.wrapping_add(row), hd);
                }
            }
            // 1. scores, 16 keys a turn (past the block's end: its last key, masked)
            let mut mx = [_mm512_set1_ps(MASKED); 8];
            for g in 0..bl.div_ceil(16) {
                let jj0 = 16 * g;
                let live_n = (bl - jj0).min(16);
                // this group's V rows (read in 4.) and the next group's K rows
                for i in 0..live_n {
                    prefetch_row(a.vc.wrapping_add(slots[jj0 + i]), hd);
                    if let Some(row) = key_row_ahead(&slots[..bl], j0, jj0 + i, 16, jmax, kvh, cap, hd) {
                        prefetch_row(a.kc.wrapping_add(row), hd);
                    }
                }
                let krow: [*const f32; 16] = std::array::from_fn(|i| a.kc.add(slots[(jj0 + i).min(bl - 1)]));
                let mut acc = [_mm512_setzero_ps(); R];
                for ch in 0..nvh {
                    let n = (hd - 16 * ch).min(16);
                    let mk = ((1u32 << n) - 1) as __mmask16;
                    let kr: [__m512; 16] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(mk, krow[i].add(16 * ch)));
                    let kt = transpose16(&kr);
                    for (dd, kt) in kt.iter().enumerate().take(n) {
                        for (r, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm512_fmadd_ps(*kt, _mm512_set1_ps(*qp[r].add(16 * ch + dd)), *acc);
                        }
                    }
                }
                let unmasked = inside && live_n == 16;
                let jv = _mm512_add_epi32(_mm512_set1_epi32((j0 + jj0) as i32), iota);
                let in_block = ((1u32 << live_n) - 1) as __mmask16;
                for (r, acc) in acc.iter().enumerate() {
                    let sc = _mm512_mul_ps(*acc, scale);
                    let sc = if unmasked {
                        sc
                    } else {
                        let mk = _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(hi_pos[r]))
                            & _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(lo_pos[r]))
                            & in_block;
                        _mm512_mask_mov_ps(_mm512_set1_ps(MASKED), mk, sc)
                    };
                    _mm512_storeu_ps(w.as_mut_ptr().add(r * BLOCK + jj0), sc);
                    mx[r] = _mm512_max_ps(mx[r], sc);
                }
            }
            // 2. the running maximum moves; 3. weights e^(s - m) (masked: 0) and their sums,
            // key by key
            let mut cs = [0f32; 8];
            for r in 0..R {
                let mb = _mm512_reduce_max_ps(mx[r]);
                // (`_mm512_max_ps(m, mx)` of `attend_rows`, lane by lane)
                let mn = if m[r] > mb { m[r] } else { mb };
                let c = _mm512_cvtss_f32(exp512_nonpos(_mm512_set1_ps(m[r] - mn)));
                l[r] *= c;
                m[r] = mn;
                cs[r] = c;
                let mv = _mm512_set1_ps(mn);
                for g in 0..bl.div_ceil(16) {
                    let jj0 = 16 * g;
                    let live_n = (bl - jj0).min(16);
                    let p = w.as_mut_ptr().add(r * BLOCK + jj0);
                    let e = exp512_nonpos(_mm512_sub_ps(_mm512_loadu_ps(p), mv));
                    let e = if inside {
                        e
                    } else {
                        let jv = _mm512_add_epi32(_mm512_set1_epi32((j0 + jj0) as i32), iota);
                        let mk = _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(hi_pos[r]))
                            & _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(lo_pos[r]));
                        _mm512_maskz_mov_ps(mk, e)
                    };
                    _mm512_storeu_ps(p, e);
                    for i in 0..live_n {
                        l[r] += *p.add(i);
                    }
                }
            }
            // 4. out[r] = out[r] · c[r] + Σ_j p[r][j] · v_j, as in `attend_rows`
            let c = (j0 != jmin).then_some(&cs[..]);
            value_pass(o, a.vc, &slots[..bl], w.as_ptr(), (1, BLOCK), c, rc, hd);
            j0 += bl;
        }
        // normalize and store
        store_rows(o, &l[..rc], hd, |r| a.out.add(qrow(r0 + r)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512 F is present; the loads read the 256 floats of `m`.
        let got = unsafe {
            let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            transpose16(&r)
        };
        for (c, t) in got.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *t) };
            for (i, &x) in lanes.iter().enumerate() {
                assert_eq!(x, m[16 * i + c], "lane {i} of column {c}");
            }
        }
    }
}
