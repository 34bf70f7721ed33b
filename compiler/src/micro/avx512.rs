//! The AVX-512 micro-kernels (see `micro`): one 16-row panel is one zmm register.
//!
//! - int8 (`Dot16` weights, the int8 prologue's rows): per group of 4 columns, one 64-byte load
//!   holds the group for all 16 rows, and one `vpdpbusd` with the token's 4 activation bytes
//!   broadcast from memory adds it into 16 i32 sums. Nibble types split each load into its low
//!   and high nibbles (columns `4g..4g+4` and `16+4g..16+4g+4`). Per block the integer sums
//!   start at the prologue's correction `−offset·Σq` and end scaled by `d_w · d_x` into f32
//!   accumulators (plus `m_w · d_x·Σq` for types with a minimum; q6_k scales each half).
//! - float (`Panel16` weights): per column one 16-wide load (bf16: zero-extended and shifted,
//!   f16: `vcvtph2ps`) and one FMA per token with the token's value broadcast from memory.
//!
//! The arithmetic is the one `kernels::dot` and `kernels::storage` emit, so results differ
//! from the interpreter's only in f32 summation order.

use std::arch::x86_64::*;

use super::{MicroFn, TILE_PANELS, TILE_TOKENS};
use llmc_ir::DType;

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma")
}

/// `f32` at `p` (any alignment).
#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    // SAFETY: the caller passes an address inside a row it was given.
    unsafe { (p as *const f32).read_unaligned() }
}

#[inline(always)]
unsafe fn rd_i32(p: *const u8) -> i32 {
    // SAFETY: as `rd_f32`.
    unsafe { (p as *const i32).read_unaligned() }
}

/// One int8 tile: `T` tokens × `P` panels. `NIB`: nibble integers; `MIN`: a minimum per row
/// and block; `SUBS`: scales per block (2 for q6_k); `KH`: K-type heads (i8 scales times the
/// super-block's f32 scales from the panel's table); `HB`: bits above the nibble, from the
/// block's plane (`pack::plane_at`).
///
/// # Safety
/// The host has the features `available` checks; `w` holds `P` panels of `kd` columns
/// `pb` bytes apart in `Dot16` layout of this type; `x` holds `T` rows `rb` bytes apart of
/// the int8 prologue's buffer for `kd` columns; `out` has room for `TILE_TOKENS·TILE_PANELS·16`
/// f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
#[allow(clippy::too_many_arguments)]
// `iacc[sub][t][p]`: indices into three dims at once read plainer than nested iterators
#[allow(clippy::needless_range_loop)]
unsafe fn dot_tile<
    const T: usize,
    const P: usize,
    const NIB: bool,
    const MIN: bool,
    const SUBS: usize,
    const KH: bool,
    const HB: usize,
>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let (head, block, entry) = super::block_layout(NIB, MIN, KH, HB);
    // the plane's bits of one group moved up to bits 4.. of each byte
    let planes = _mm512_set1_epi8(if HB == 1 { 0x10 } else { 0x30 });
    let up = |v: __m512i, s: usize| {
        let v = if s <= 4 {
            _mm512_sll_epi16(v, _mm_cvtsi32_si128(4 - s as i32))
        } else {
            _mm512_srl_epi16(v, _mm_cvtsi32_si128(s as i32 - 4))
        };
        _mm512_and_si512(v, planes)
    };
    // K types: the table of super-block scales after the blocks, one entry per 8 blocks
    let table = kd / 32 * block;
    let groups = if NIB { 4 } else { 8 };
    let nib = _mm512_set1_epi8(0x0f);
    let mut facc = [[_mm512_setzero_ps(); P]; T];
    // SAFETY (whole body): every address is `w + p·pb + b·block + (< block)` for `p < P`,
    // `b < kd/32`, or (K types) `w + p·pb + table + b/8·entry + (< entry)`, or
    // `x + t·rb + (< kd + kd/32·12)` for `t < T`: inside what the caller gave.
    unsafe {
        for b in 0..kd / 32 {
            let bp = w.add(b * block);
            let tb = w.add(table + b / 8 * entry);
            // a block scale of 16 rows: the head's f32s, or (K types) its i8s times the
            // super-block's f32s at `tab`
            let scales = |at: *const u8, tab: *const u8| {
                if KH {
                    let i = _mm512_cvtepi8_epi32(_mm_loadu_si128(at as *const __m128i));
                    _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_loadu_ps(tab as *const f32))
                } else {
                    _mm512_loadu_ps(at as *const f32)
                }
            };
            let xb = x.add(b * 32);
            let mb = x.add(kd + b * 12);
            // one pass over the block's groups: with two scales per block (q6_k), a group's
            // low nibbles are columns 0..16 (`iacc[0]`) and its high nibbles 16..32 (`iacc[1]`)
            // (plain loops: `std::array::from_fn`'s closure was left out of line in the larger
            // tiles, a call per block that spilled every accumulator around it)
            let mut iacc = [[[_mm512_setzero_si512(); P]; T]; SUBS];
            for (sub, rows) in iacc.iter_mut().enumerate() {
                for (t, row) in rows.iter_mut().enumerate() {
                    *row = [_mm512_set1_epi32(rd_i32(mb.add(t * rb + 4 + 4 * sub))); P];
                }
            }
            for g in 0..groups {
                for p in 0..P {
                    let a = bp.add(p * pb + head + g * 64);
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF) as *const i8);
                    if T > 2 {
                        // several rows (a batched decode step, a prefill): also the same
                        // line of the next tile's panels, one tile ahead into L2, so the
                        // memory stream keeps going while this tile computes (8 rows from
                        // DRAM: 1.45–1.6× one row's time before, 1.2–1.35× after)
                        _mm_prefetch::<_MM_HINT_T1>(a.wrapping_add(P * pb) as *const i8);
                    }
                    let wv = _mm512_loadu_si512(a as *const __m512i);
                    if NIB {
                        let mut lo = _mm512_and_si512(wv, nib);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
                        if HB > 0 {
                            let at = bp.add(p * pb + head + 256 + if HB == 2 { g / 2 * 64 } else { 0 });
                            let pl = _mm512_loadu_si512(at as *const __m512i);
                            let (sl, sh) = if HB == 1 { (2 * g, 2 * g + 1) } else { (4 * (g % 2), 4 * (g % 2) + 2) };
                            lo = _mm512_or_si512(lo, up(pl, sl));
                            hi = _mm512_or_si512(hi, up(pl, sh));
                        }
                        for t in 0..T {
                            let xl = _mm512_set1_epi32(rd_i32(xb.add(t * rb + g * 4)));
                            let xh = _mm512_set1_epi32(rd_i32(xb.add(t * rb + g * 4 + 16)));
                            iacc[0][t][p] = _mm512_dpbusd_epi32(iacc[0][t][p], lo, xl);
                            let h = SUBS - 1;
                            iacc[h][t][p] = _mm512_dpbusd_epi32(iacc[h][t][p], hi, xh);
                        }
                    } else {
                        let sub = g * SUBS / groups;
                        for t in 0..T {
                            let xv = _mm512_set1_epi32(rd_i32(xb.add(t * rb + g * 4)));
                            iacc[sub][t][p] = _mm512_dpbusd_epi32(iacc[sub][t][p], wv, xv);
                        }
                    }
                }
            }
            for (sub, iacc) in iacc.iter().enumerate() {
                for t in 0..T {
                    let dx = _mm512_set1_ps(rd_f32(mb.add(t * rb)));
                    let ds = _mm512_set1_ps(if MIN { rd_f32(mb.add(t * rb + 8)) } else { 0.0 });
                    for p in 0..P {
                        let sw = if KH {
                            scales(bp.add(p * pb + sub * 16), tb.add(p * pb))
                        } else {
                            scales(bp.add(p * pb + sub * 64), tb)
                        };
                        let s = _mm512_mul_ps(sw, dx);
                        let f = _mm512_cvtepi32_ps(iacc[t][p]);
                        facc[t][p] = _mm512_fmadd_ps(f, s, facc[t][p]);
                        if MIN {
                            let mw = if KH {
                                scales(bp.add(p * pb + 16), tb.add(p * pb + 64))
                            } else {
                                scales(bp.add(p * pb + 64), tb)
                            };
                            facc[t][p] = _mm512_fmadd_ps(mw, ds, facc[t][p]);
                        }
                    }
                }
            }
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add((t * TILE_PANELS + p) * 16), *v);
            }
        }
    }
}

/// How far ahead (bytes) a tile prefetches each weight stream (useless but cheap where a
/// prefill reuses a panel from cache; batched decode streams it once like decode): the hardware
/// prefetcher alone leaves decode ~25 % under the bandwidth with 4 streams of half-line steps
/// (bf16) or one line per group (int8); 1–4 KiB measured alike.
const PF: usize = 2048;

/// Float weight kinds of `float_tile`.
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// One float tile: `T` tokens × `P` panels of weights of kind `WT`.
///
/// # Safety
/// As `dot_tile`, with `Panel16` panels of this kind and `x` holding `T` f32 rows of `kd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn float_tile<const T: usize, const P: usize, const WT: u8>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let es = if WT == F32 { 4 } else { 2 };
    let mut facc = [[_mm512_setzero_ps(); P]; T];
    // SAFETY (whole body): addresses are `w + p·pb + k·16·es (+ < 16·es)` for `p < P`,
    // `k < kd`, and `x + t·rb + 4k` for `t < T`, `k < kd`: inside what the caller gave.
    unsafe {
        for k in 0..kd {
            for p in 0..P {
                let a = w.add(p * pb + k * 16 * es);
                if (k * 16 * es) % 64 == 0 {
                    // f32: one line per column, one prefetch (a second, a line further, is
                    // the next column's again: with it SmolLM2 f32 decode ran 58.0 against
                    // 61.2 tok/s, Zen 5); 16-bit kinds keep two per line, measured alike
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF) as *const i8);
                    if WT != F32 {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF + 64) as *const i8);
                    }
                }
                let wv = match WT {
                    F32 => _mm512_loadu_ps(a as *const f32),
                    BF16 => {
                        let h = _mm256_loadu_si256(a as *const __m256i);
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                    }
                    _ => _mm512_cvtph_ps(_mm256_loadu_si256(a as *const __m256i)),
                };
                for (t, row) in facc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(rd_f32(x.add(t * rb + k * 4)));
                    row[p] = _mm512_fmadd_ps(wv, xv, row[p]);
                }
            }
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add((t * TILE_PANELS + p) * 16), *v);
            }
        }
    }
}

/// Whether the host has AVX512_BF16 (`vdpbf16ps`) for `float_xbf16`'s tile.
pub fn bf16_available() -> bool {
    available() && is_x86_feature_detected!("avx512bf16")
}

/// One tile of bf16 weights over bf16-exact activations (`round_bf16` made them; `x` holds f32
/// rows whose low 16 bits are zero): `T` tokens × `P` panels, two columns per `vdpbf16ps`.
/// Per column pair one 64-byte load holds both columns' 16 rows (`Panel16`: column `k`, then
/// `k + 1`), and one `vpermw` interleaves them into (column `k`, column `k + 1`) pairs; each
/// row's two values, broadcast as one 64-bit load, become its bf16 pair (their high halves:
/// exact) with one `vpshufb`. An odd last column pairs with zeros. The products are exact,
/// the sums f32 (denormal inputs count as zero). (Turning each row into bf16 in a stack
/// buffer first, once per call, and broadcasting pairs from it ran 15–25 % slower on Zen 5.)
///
/// # Safety
/// As `float_tile` with bf16 panels, on a host where `bf16_available`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn dpbf16_tile<const T: usize, const P: usize>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let mut facc = [[_mm512_setzero_ps(); P]; T];
    // weights: result word 2i = word i (column k, row i), word 2i + 1 = word 16 + i (k + 1)
    let idx: [i16; 32] = std::array::from_fn(|j| (j / 2 + 16 * (j % 2)) as i16);
    // activations: bytes 2, 3 (x[k]'s high half) and 6, 7 (x[k + 1]'s) of each 64-bit lane
    let hi: [i8; 64] = std::array::from_fn(|j| [2, 3, 6, 7][j % 4]);
    // SAFETY (whole body): `w + p·pb + 32k (+ < 64 when k + 1 < kd, else < 32)` for `p < P`,
    // `k < kd`, and `x + t·rb + 4k (+ < 8 when k + 1 < kd, else < 4)`: inside what the caller
    // gave.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
        let hi = _mm512_loadu_si512(hi.as_ptr() as *const _);
        let mut k = 0;
        while k < kd {
            let pair = k + 1 < kd;
            let xv: [__m512bh; T] = std::array::from_fn(|t| {
                let at = x.add(t * rb + 4 * k);
                let v = if pair {
                    _mm512_shuffle_epi8(_mm512_set1_epi64((at as *const i64).read_unaligned()), hi)
                } else {
                    _mm512_srli_epi32::<16>(_mm512_set1_epi32((at as *const i32).read_unaligned()))
                };
                std::mem::transmute::<__m512i, __m512bh>(v)
            });
            for p in 0..P {
                let a = w.add(p * pb + k * 32);
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF) as *const i8);
                let wv = if pair {
                    _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(a as *const _))
                } else {
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(a as *const __m256i))
                };
                let wv = std::mem::transmute::<__m512i, __m512bh>(wv);
                for (t, row) in facc.iter_mut().enumerate() {
                    row[p] = _mm512_dpbf16_ps(row[p], wv, xv[t]);
                }
            }
            k += 2;
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add((t * TILE_PANELS + p) * 16), *v);
            }
        }
    }
}

/// `MicroFn` of bf16 weights over bf16-exact activations: tiles of up to 4 rows × 4 panels
/// (one or two rows: up to 4 panels). Per column pair a tile shuffles once per row (its pair)
/// and once per panel (the weights), so 4 × 4 makes 8 shuffles per 16 `vdpbf16ps` where the
/// float tiles' 8 × 2 would make 10: the tile is bound by those shuffles.
///
/// # Safety
/// `MicroFn`'s contract with bf16 `Panel16` panels, on a host where `bf16_available`.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn xbf16_bf16(
    w: *const u8,
    pb: usize,
    np: usize,
    x: *const u8,
    rb: usize,
    nt: usize,
    kd: usize,
    out: *mut f32,
) {
    let nt = nt.min(TILE_TOKENS);
    let np = np.min(TILE_PANELS);
    let mut t0 = 0;
    while t0 < nt {
        let tn = (nt - t0).min(4);
        let mut p0 = 0;
        while p0 < np {
            let pn = (np - p0).min(4);
            // SAFETY: sub-tiles of the caller's tile: rows `t0..t0+tn` of `x`, panels
            // `p0..p0+pn` of `w`, and their places in `out`; the host has AVX512_BF16
            // (`float_xbf16` hands this out only then).
            unsafe {
                let (w, x, o) = (w.add(p0 * pb), x.add(t0 * rb), out.add((t0 * TILE_PANELS + p0) * 16));
                match (tn, pn) {
                    (1, 1) => dpbf16_tile::<1, 1>(w, pb, x, rb, kd, o),
                    (1, 2) => dpbf16_tile::<1, 2>(w, pb, x, rb, kd, o),
                    (1, 3) => dpbf16_tile::<1, 3>(w, pb, x, rb, kd, o),
                    (1, _) => dpbf16_tile::<1, 4>(w, pb, x, rb, kd, o),
                    (2, 1) => dpbf16_tile::<2, 1>(w, pb, x, rb, kd, o),
                    (2, 2) => dpbf16_tile::<2, 2>(w, pb, x, rb, kd, o),
                    (2, 3) => dpbf16_tile::<2, 3>(w, pb, x, rb, kd, o),
                    (2, _) => dpbf16_tile::<2, 4>(w, pb, x, rb, kd, o),
                    (3, 1) => dpbf16_tile::<3, 1>(w, pb, x, rb, kd, o),
                    (3, 2) => dpbf16_tile::<3, 2>(w, pb, x, rb, kd, o),
                    (3, 3) => dpbf16_tile::<3, 3>(w, pb, x, rb, kd, o),
                    (3, _) => dpbf16_tile::<3, 4>(w, pb, x, rb, kd, o),
                    (_, 1) => dpbf16_tile::<4, 1>(w, pb, x, rb, kd, o),
                    (_, 2) => dpbf16_tile::<4, 2>(w, pb, x, rb, kd, o),
                    (_, 3) => dpbf16_tile::<4, 3>(w, pb, x, rb, kd, o),
                    (_, _) => dpbf16_tile::<4, 4>(w, pb, x, rb, kd, o),
                }
            }
            p0 += pn;
        }
        t0 += tn;
    }
}

/// One float tile over blocked weights (`Panel16` layout, `pack::panel_bytes`): `T` tokens ×
/// `P` panels, f32 activations. Each column's 16 integers are widened to f32 and scaled to the
/// values they mean (`q·d + m`, one rounding, as the interpreter's definition) before the FMAs,
/// so a weight vector is made once per column and feeds every token. `NIB`: nibble pairs (with
/// `HB` high bits from the block's plane), else q8_0's bytes; `OFF`: what a stored nibble
/// carries (`pack::dot_offset`); `MIN`, `SUBS`, `KH` as `dot_tile`.
///
/// # Safety
/// As `dot_tile`, with `Panel16` blocked panels of this type and `x` holding `T` f32 rows of
/// `kd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn bfloat_tile<
    const T: usize,
    const P: usize,
    const NIB: bool,
    const MIN: bool,
    const SUBS: usize,
    const KH: bool,
    const HB: usize,
    const OFF: i8,
>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let (head, block, entry) = super::block_layout(NIB, MIN, KH, HB);
    let table = kd / 32 * block;
    let mut facc = [[_mm512_setzero_ps(); P]; T];
    // SAFETY (whole body): every address is `w + p·pb + b·block + (< block)` for `p < P`,
    // `b < kd/32`, or `w + p·pb + table + b/8·entry + (< entry)`, or `x + t·rb + 4k` for
    // `t < T`, `k < kd`: inside what the caller gave.
    unsafe {
        for b in 0..kd / 32 {
            let bp = w.add(b * block);
            let tb = w.add(table + b / 8 * entry);
            let xb = x.add(b * 128);
            for p in 0..P {
                let hp = bp.add(p * pb);
                let tp = tb.add(p * pb);
                _mm_prefetch::<_MM_HINT_T0>(hp.wrapping_add(PF) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(hp.wrapping_add(PF + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(hp.wrapping_add(PF + 128) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(hp.wrapping_add(PF + 192) as *const i8);
                let scale = |at: usize, tab: usize| {
                    if KH {
                        let i = _mm512_cvtepi8_epi32(_mm_loadu_si128(hp.add(at) as *const __m128i));
                        _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_loadu_ps(tp.add(tab) as *const f32))
                    } else {
                        _mm512_loadu_ps(hp.add(at * 4) as *const f32)
                    }
                };
                // the block's scales (q6_k: of each half) and minimum
                let d = [scale(0, 0), if SUBS == 2 { scale(16, 0) } else { _mm512_setzero_ps() }];
                let m = if MIN { scale(16, 64) } else { _mm512_setzero_ps() };
                let qs = hp.add(head);
                // one column's 16 integers (i8 lanes) as the f32 values they mean
                let value = |q: __m128i, half: usize| {
                    let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                    let d = d[if SUBS == 2 { half } else { 0 }];
                    if MIN {
                        _mm512_fmadd_ps(f, d, m)
                    } else {
                        _mm512_mul_ps(f, d)
                    }
                };
                if NIB {
                    // pair `j`: columns `2j` (low nibbles) and `2j + 1` (high nibbles)
                    for j in 0..16 {
                        let (lo, hi) = super::x86::nibble_pair::<HB, OFF>(qs, j);
                        let (wl, wh) = (value(lo, j / 8), value(hi, j / 8));
                        for (t, row) in facc.iter_mut().enumerate() {
                            let xl = _mm512_set1_ps(rd_f32(xb.add(t * rb + 8 * j)));
                            let xh = _mm512_set1_ps(rd_f32(xb.add(t * rb + 8 * j + 4)));
                            row[p] = _mm512_fmadd_ps(wl, xl, row[p]);
                            row[p] = _mm512_fmadd_ps(wh, xh, row[p]);
                        }
                    }
                } else {
                    for k in 0..32 {
                        let q = _mm_loadu_si128(qs.add(k * 16) as *const __m128i);
                        let wv = value(q, k / 16);
                        for (t, row) in facc.iter_mut().enumerate() {
                            let xv = _mm512_set1_ps(rd_f32(xb.add(t * rb + 4 * k)));
                            row[p] = _mm512_fmadd_ps(wv, xv, row[p]);
                        }
                    }
                }
            }
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add((t * TILE_PANELS + p) * 16), *v);
            }
        }
    }
}

/// Panels at a time of a tile of more than 4 rows (a batched decode step) over rows of `kd`
/// columns. One panel of the int8 tile holds 8 rows' sums in registers; two hold 16, and
/// spill, but stream two panels at once, which pays on long rows of the simplest blocks (Zen 5,
/// 8 sequences, SmolLM2's k = 1536 down projection: q8_0 2.15 -> 1.83 ms/step, q4_0 1.48 ->
/// 1.35; on k = 576 and on the K types' longer blocks two panels were slower: q6_k 2.4x).
fn one(_kd: usize) -> usize {
    1
}
fn two(_kd: usize) -> usize {
    2
}
fn two_if_long(kd: usize) -> usize {
    if kd >= 1024 {
        2
    } else {
        1
    }
}

/// Splits a call of any `tokens × panels` (each clamped to the tile bounds) into the tiles
/// `$tile` is instantiated for.
macro_rules! dispatch {
    ($name:ident, $tile:ident, $tmax:expr, $wide_p:expr, [$($g:tt)*]) => {
        /// # Safety
        /// As the tile function it calls (`MicroFn`'s contract), on a host with the features
        /// `available` checks.
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn $name(
            w: *const u8,
            pb: usize,
            np: usize,
            x: *const u8,
            rb: usize,
            nt: usize,
            kd: usize,
            out: *mut f32,
        ) {
            let nt = nt.min(TILE_TOKENS);
            let np = np.min(TILE_PANELS);
            let tstep = if nt == 1 { 1 } else { $tmax };
            // two rows (a `quant_q8x2` row's two terms, or two sequences' decode rows) still
            // stream `DECODE_PANELS` panels at once
            let pstep0 = if nt <= 2 { super::DECODE_PANELS } else { super::PREFILL_PANELS };
            let mut t0 = 0;
            while t0 < nt {
                let tn = (nt - t0).min(tstep);
                let pstep = if tn > 4 { $wide_p(kd) } else { pstep0 };
                let mut p0 = 0;
                while p0 < np {
                    let pn = (np - p0).min(pstep);
                    // SAFETY: sub-tiles of the caller's tile: rows `t0..t0+tn` of `x`, panels
                    // `p0..p0+pn` of `w`, and their places in `out`.
                    unsafe {
                        let (w, x, o) = (w.add(p0 * pb), x.add(t0 * rb), out.add((t0 * TILE_PANELS + p0) * 16));
                        match (tn, pn) {
                            (1, 1) => $tile::<1, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (1, 2) => $tile::<1, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (1, 3) => $tile::<1, 3, $($g)*>(w, pb, x, rb, kd, o),
                            (1, _) => $tile::<1, 4, $($g)*>(w, pb, x, rb, kd, o),
                            (2, 1) => $tile::<2, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (2, 2) => $tile::<2, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (2, 3) => $tile::<2, 3, $($g)*>(w, pb, x, rb, kd, o),
                            (2, _) => $tile::<2, 4, $($g)*>(w, pb, x, rb, kd, o),
                            (3, 1) => $tile::<3, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (3, _) => $tile::<3, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (4, 1) => $tile::<4, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (4, _) => $tile::<4, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (5, 1) => $tile::<5, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (5, _) => $tile::<5, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (6, 1) => $tile::<6, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (6, _) => $tile::<6, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (7, 1) => $tile::<7, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (7, _) => $tile::<7, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (_, 1) => $tile::<8, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (_, _) => $tile::<8, 2, $($g)*>(w, pb, x, rb, kd, o),
                        }
                    }
                    p0 += pn;
                }
                t0 += tn;
            }
        }
    };
}

dispatch!(dot_q8, dot_tile, TILE_TOKENS, two_if_long, [false, false, 1, false, 0]);
dispatch!(dot_q4_0, dot_tile, TILE_TOKENS, two_if_long, [true, false, 1, false, 0]);
dispatch!(dot_q5_0, dot_tile, TILE_TOKENS, one, [true, false, 1, false, 1]);
dispatch!(dot_q4_1, dot_tile, TILE_TOKENS, one, [true, true, 1, false, 0]);
dispatch!(dot_q5_1, dot_tile, TILE_TOKENS, one, [true, true, 1, false, 1]);
dispatch!(dot_q6_k, dot_tile, super::DOT_TOKENS, one, [true, false, 2, true, 2]);
dispatch!(dot_q4_k, dot_tile, super::DOT_TOKENS, one, [true, true, 1, true, 0]);
dispatch!(dot_q5_k, dot_tile, super::DOT_TOKENS, one, [true, true, 1, true, 1]);
dispatch!(bfloat_q8_0, bfloat_tile, super::FLOAT_TOKENS, two, [false, false, 1, false, 0, 0]);
dispatch!(bfloat_q4_0, bfloat_tile, super::FLOAT_TOKENS, two, [true, false, 1, false, 0, 8]);
dispatch!(bfloat_q5_0, bfloat_tile, super::FLOAT_TOKENS, two, [true, false, 1, false, 1, 16]);
dispatch!(bfloat_q4_1, bfloat_tile, super::FLOAT_TOKENS, two, [true, true, 1, false, 0, 0]);
dispatch!(bfloat_q5_1, bfloat_tile, super::FLOAT_TOKENS, two, [true, true, 1, false, 1, 0]);
dispatch!(bfloat_q6_k, bfloat_tile, super::FLOAT_TOKENS, two, [true, false, 2, true, 2, 32]);
dispatch!(bfloat_q4_k, bfloat_tile, super::FLOAT_TOKENS, two, [true, true, 1, true, 0, 0]);
dispatch!(bfloat_q5_k, bfloat_tile, super::FLOAT_TOKENS, two, [true, true, 1, true, 1, 0]);
dispatch!(float_f32, float_tile, super::FLOAT_TOKENS, two, [F32]);
dispatch!(float_bf16, float_tile, super::FLOAT_TOKENS, two, [BF16]);
dispatch!(float_f16, float_tile, super::FLOAT_TOKENS, two, [F16]);

pub fn dot(wt: DType) -> Option<MicroFn> {
    Some(match wt {
        DType::Q8_0 => dot_q8,
        DType::Q4_0 => dot_q4_0,
        DType::Q5_0 => dot_q5_0,
        DType::Q4_1 => dot_q4_1,
        DType::Q5_1 => dot_q5_1,
        DType::Q6K => dot_q6_k,
        DType::Q4K => dot_q4_k,
        DType::Q5K => dot_q5_k,
        _ => return None,
    })
}

/// The `vdpbf16ps` tile for bf16 weights over bf16-exact activations, where the host has it.
pub fn float_xbf16(wt: DType) -> Option<MicroFn> {
    (wt == DType::BF16 && bf16_available()).then_some(xbf16_bf16 as MicroFn)
}

pub fn float(wt: DType) -> Option<MicroFn> {
    Some(match wt {
        DType::F32 => float_f32,
        DType::BF16 => float_bf16,
        DType::F16 => float_f16,
        DType::Q8_0 => bfloat_q8_0,
        DType::Q4_0 => bfloat_q4_0,
        DType::Q5_0 => bfloat_q5_0,
        DType::Q4_1 => bfloat_q4_1,
        DType::Q5_1 => bfloat_q5_1,
        DType::Q6K => bfloat_q6_k,
        DType::Q4K => bfloat_q4_k,
        DType::Q5K => bfloat_q5_k,
        _ => return None,
    })
}
