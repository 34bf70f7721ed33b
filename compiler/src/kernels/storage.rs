//! Weights in a storage type other than f32, widened in registers: the k loop of a projection
//! tile over bf16/f16/q8_0/q4_0 panels (layouts in `pack::panel_bytes`), and single-element
//! loads for the embedding gather.
//!
//! Every weight is converted to the exact f32 value it means (`llmc_ir::quant`) and meets the
//! activations in the same f32 FMAs as the f32 path, so the results differ from the f32
//! kernel on the dequantized weights only by summation order.
//! - bf16: 4 × u16 zero-extended to i32, shifted left 16 (the f32 bit pattern);
//! - f16: the same 4 × u16, magnitude shifted into f32 position and scaled by 2^112 (exact for
//!   normal and subnormal halves; weights are finite), sign or-ed back;
//! - q8_0: 8 × i8 sign-extended twice to i32, converted, times the row's block scale;
//! - q4_0: 16 bytes hold two columns of 16 rows (low nibble: even column); each nibble − 8 is
//!   widened the same way. Scales are loaded once per block of 32 columns.

use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::Variable;
use llmc_ir::quant::{QK, QK_K};
use llmc_ir::DType;

use super::kb::{Kb, F32, I64, V4};
use super::matmul::Ctx;
use crate::pack::PANEL;

const I32X4: types::Type = types::I32X4;
const I16X8: types::Type = types::I16X8;
const I8X16: types::Type = types::I8X16;

fn le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little)
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// `x` (i32 lanes holding f16 bit patterns in their low 16 bits) as f32.
fn f16_to_f32(k: &mut Kb<'_>, h: Value, consts: &Consts) -> Value {
    let sign = k.b.ins().band(h, consts.sign16);
    let sign = k.b.ins().ishl_imm_u(sign, 16);
    let mag = k.b.ins().band(h, consts.mag15);
    let mag = k.b.ins().ishl_imm_u(mag, 13);
    let f = k.b.ins().bitcast(V4, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), mag);
    let f = k.fmul(f, consts.two112);
    let fi =
        k.b.ins().bitcast(I32X4, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), f);
    let r = k.b.ins().bor(fi, sign);
    k.b.ins().bitcast(V4, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), r)
}

/// Vector constants a storage tile needs, made once before its loops.
pub struct Consts {
    /// `0xFFFF0000` in each i32 lane (bf16: the high half of a lane is an f32 as it is)
    pub high16: Value,
    sign16: Value,
    mag15: Value,
    two112: Value,
    nib: Value,
    /// nibble types: `pack::dot_offset` in each byte (what the stored integers carry)
    eight: Value,
}

fn consts(k: &mut Kb<'_>, wt: DType) -> Consts {
    let i32s = |k: &mut Kb<'_>, v: i64| {
        let c = k.b.ins().iconst(types::I32, v);
        k.b.ins().splat(I32X4, c)
    };
    let i8s = |k: &mut Kb<'_>, v: i64| {
        let c = k.b.ins().iconst(types::I8, v);
        k.b.ins().splat(I8X16, c)
    };
    let dummy = k.c(V4, 0.0);
    match wt {
        DType::F16 => Consts {
            sign16: i32s(k, 0x8000),
            mag15: i32s(k, 0x7fff),
            two112: k.c(V4, f32::from_bits((127 + 112) << 23)),
            nib: dummy,
            eight: dummy,
            high16: dummy,
        },
        wt if crate::pack::is_nibble(wt) => Consts {
            sign16: dummy,
            mag15: dummy,
            two112: dummy,
            nib: i8s(k, 0x0f),
            eight: i8s(k, crate::pack::dot_offset(wt) as i64),
            high16: dummy,
        },
        DType::BF16 => Consts {
            sign16: dummy,
            mag15: dummy,
            two112: dummy,
            nib: dummy,
            eight: dummy,
            high16: i32s(k, 0xFFFF_0000u32 as i32 as i64),
        },
        _ => Consts { sign16: dummy, mag15: dummy, two112: dummy, nib: dummy, eight: dummy, high16: dummy },
    }
}

/// The constants `widen4` needs for `wt` (made once, before the loop).
pub fn widen_consts(k: &mut Kb<'_>, wt: DType) -> Consts {
    consts(k, wt)
}

/// Four bf16/f16 values at `w + off` as f32x4.
pub fn widen4(k: &mut Kb<'_>, wt: DType, w: Value, off: i64, cs: &Consts) -> Value {
    let h = k.b.ins().uload16x4(flags(), w, off as i32);
    if wt == DType::BF16 {
        let b = k.b.ins().ishl_imm_u(h, 16);
        as_f32(k, b)
    } else {
        f16_to_f32(k, h, cs)
    }
}

/// The bit-cast of an i32x4 to f32x4.
fn as_f32(k: &mut Kb<'_>, v: Value) -> Value {
    k.b.ins().bitcast(V4, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), v)
}

/// Rows `4j .. 4j + 4` of 16 i8 lanes (`lo`: rows 0..8 as i16x8, `hi`: rows 8..16) as f32x4.
fn i8_rows(k: &mut Kb<'_>, lo: Value, hi: Value, j: usize) -> Value {
    let half = if j < 2 { lo } else { hi };
    let w = if j % 2 == 0 { k.b.ins().swiden_low(half) } else { k.b.ins().swiden_high(half) };
    k.b.ins().fcvt_from_sint(V4, w)
}

/// The accumulators of one tile (`tokens` rows of x from row `t`, vectors `v0 .. v0 + nv` of
/// the panel at `wp`), for a storage type other than f32.
pub fn tile_accs(
    k: &mut Kb<'_>,
    c: &Ctx,
    wp: Value,
    t: Value,
    tokens: usize,
    v0: usize,
    nv: usize,
) -> Vec<Vec<Variable>> {
    let zero = k.c(V4, 0.0);
    let accs: Vec<Vec<Variable>> = (0..tokens).map(|_| (0..nv).map(|_| k.var(V4, zero)).collect()).collect();
    let cs = consts(k, c.wt);
    let x0 = k.at(c.x, t, (c.kd * 4) as i64);
    let xv = k.var(I64, x0);
    let wv = k.var(I64, wp);
    // One k step: the weight vectors `ws` meet each token's activation at column offset `xo`.
    let fma_all = |k: &mut Kb<'_>, ws: &[Value], xo: i64| {
        let x = k.get(xv);
        for (tt, row) in accs.iter().enumerate() {
            let xs = k.ld(F32, x, (tt * c.kd * 4) as i64 + xo);
            let xb = k.splat(xs);
            for (j, a) in row.iter().enumerate() {
                let v = k.get(*a);
                let v = k.fma(ws[j], xb, v);
                k.set(*a, v);
            }
        }
    };
    match c.wt {
        DType::BF16 | DType::F16 => {
            // the 16 rows of column `col` (of the pair at `w`) as f32 vectors
            let widen = |k: &mut Kb<'_>, w: Value, col: usize| -> Vec<Value> {
                (0..nv)
                    .map(|j| {
                        let h = k.b.ins().uload16x4(flags(), w, (col * PANEL * 2 + (v0 + j) * 8) as i32);
                        if c.wt == DType::BF16 {
                            let b = k.b.ins().ishl_imm_u(h, 16);
                            as_f32(k, b)
                        } else {
                            f16_to_f32(k, h, &cs)
                        }
                    })
                    .collect()
            };
            // two columns per iteration, then an odd last one
            let pairs = c.kd / 2;
            let wend = k.addi(wp, (pairs * 2 * PANEL * 2) as i64);
            k.for_ptr(wv, wend, |k| {
                let w = k.get(wv);
                for col in 0..2 {
                    let ws = widen(k, w, col);
                    fma_all(k, &ws, (col * 4) as i64);
                }
                let w = k.addi(w, (2 * PANEL * 2) as i64);
                k.set(wv, w);
                let x = k.get(xv);
                let x = k.addi(x, 8);
                k.set(xv, x);
            });
            if c.kd % 2 == 1 {
                let w = k.get(wv);
                let ws = widen(k, w, 0);
                fma_all(k, &ws, 0);
            }
        }
        wt if llmc_ir::quant::is_blocked(wt) => {
            let q4 = crate::pack::is_nibble(wt);
            let has_min = llmc_ir::quant::has_min(wt);
            let head = crate::pack::block_head(wt);
            let block = crate::pack::block_bytes(wt);
            // q6_k scales each half of a block on its own
            let subs = if wt == DType::Q6K { 2 } else { 1 };
            let sub_bytes = if q4 { QK / 2 * PANEL } else { QK * PANEL } / subs;
            let hb = crate::pack::high_bits(wt);
            let wend = k.addi(wp, (c.kd / QK * block) as i64);
            // Small (decode) tiles sum q·x per block and scale once at its end; larger tiles
            // (and types with a minimum, which is added to each weight) scale each widened
            // weight vector (one extra accumulator set would spill).
            let factor = tokens * nv <= 4 && !has_min;
            // the block index (K types: which super-block table entry)
            let z = k.ic(0);
            let bi = k.var(I64, z);
            k.for_ptr(wv, wend, |k| {
                let bp = k.get(wv);
                let b = k.get(bi);
                let tab = super_entry(k, wt, wp, b, c.kd);
                let mins: Vec<Value> = if has_min {
                    (0..nv).map(|j| block_scales(k, wt, bp, tab, v0 + j, 0, true)).collect()
                } else {
                    Vec::new()
                };
                for sub in 0..subs {
                    let scales: Vec<Value> =
                        (0..nv).map(|j| block_scales(k, wt, bp, tab, v0 + j, sub, false)).collect();
                    let bacc: Vec<Vec<Variable>> = if factor {
                        (0..tokens).map(|_| (0..nv).map(|_| k.var(V4, zero)).collect()).collect()
                    } else {
                        Vec::new()
                    };
                    let qstart = k.addi(bp, (head + sub * sub_bytes) as i64);
                    let qend = k.addi(bp, (head + (sub + 1) * sub_bytes) as i64);
                    let qv = k.var(I64, qstart);
                    // two columns per iteration: one nibble byte pair, or two byte columns
                    k.for_ptr(qv, qend, |k| {
                        let q = k.get(qv);
                        // the 16 rows of each column as i16x8 halves
                        let cols: Vec<(Value, Value)> = if q4 {
                            let raw = k.b.ins().load(I8X16, flags(), q, 0);
                            let mut lo = k.b.ins().band(raw, cs.nib);
                            let hi = k.b.ins().ushr_imm_u(raw, 4);
                            let mut hi = k.b.ins().band(hi, cs.nib);
                            if hb > 0 {
                                // pair `j` of the block: its plane row and bits (`pack::plane_at`)
                                let q0 = k.addi(bp, head as i64);
                                let off = k.b.ins().isub(q, q0);
                                let j = k.b.ins().ushr_imm_u(off, 4);
                                let per = if hb == 1 { 4 } else { 2 };
                                let row = k.udivi(j, per);
                                let pa = k.at(bp, row, PANEL as i64);
                                let pl = k.b.ins().load(I8X16, flags(), pa, (head + QK / 2 * PANEL) as i32);
                                let pl = k.b.ins().bitcast(I16X8, le(), pl);
                                let slot = k.uremi(j, per);
                                let s = k.muli(slot, 2 * hb as i64);
                                let s = k.b.ins().ireduce(types::I32, s);
                                let mask = k.b.ins().iconst(types::I8, (1 << hb) - 1);
                                let mask = k.b.ins().splat(I8X16, mask);
                                for (v, extra) in [(&mut lo, 0), (&mut hi, hb as i64)] {
                                    let sh = k.b.ins().iadd_imm_s(s, extra);
                                    let b = k.b.ins().ushr(pl, sh);
                                    let b = k.b.ins().bitcast(I8X16, le(), b);
                                    let b = k.b.ins().band(b, mask);
                                    let b = k.b.ins().bitcast(I16X8, le(), b);
                                    let b = k.b.ins().ishl_imm_u(b, 4);
                                    let b = k.b.ins().bitcast(I8X16, le(), b);
                                    *v = k.b.ins().bor(*v, b);
                                }
                            }
                            [lo, hi]
                                .into_iter()
                                .map(|v| {
                                    let v =
                                        if crate::pack::dot_offset(wt) != 0 { k.b.ins().isub(v, cs.eight) } else { v };
                                    (k.b.ins().swiden_low(v), k.b.ins().swiden_high(v))
                                })
                                .collect()
                        } else {
                            (0..2)
                                .map(|col| {
                                    let at = (col * PANEL) as i32;
                                    let lo = (v0 < 2).then(|| k.b.ins().sload8x8(flags(), q, at));
                                    let hi = (v0 + nv > 2).then(|| k.b.ins().sload8x8(flags(), q, at + 8));
                                    match (lo, hi) {
                                        (Some(l), Some(h)) => (l, h),
                                        (Some(l), None) => (l, l),
                                        (None, Some(h)) => (h, h),
                                        (None, None) => unreachable!("a tile has at least one vector"),
                                    }
                                })
                                .collect()
                        };
                        for (ci, &(lo, hi)) in cols.iter().enumerate() {
                            let ws: Vec<Value> = (0..nv)
                                .map(|j| {
                                    let f = i8_rows(k, lo, hi, v0 + j);
                                    if factor {
                                        f
                                    } else if has_min {
                                        k.fma(f, scales[j], mins[j])
                                    } else {
                                        k.fmul(f, scales[j])
                                    }
                                })
                                .collect();
                            if factor {
                                let x = k.get(xv);
                                for (tt, row) in bacc.iter().enumerate() {
                                    let xs = k.ld(F32, x, (tt * c.kd * 4) as i64 + (ci * 4) as i64);
                                    let xb = k.splat(xs);
                                    for (j, a) in row.iter().enumerate() {
                                        let v = k.get(*a);
                                        let v = k.fma(ws[j], xb, v);
                                        k.set(*a, v);
                                    }
                                }
                            } else {
                                fma_all(k, &ws, (ci * 4) as i64);
                            }
                        }
                        let q = k.addi(q, (if q4 { PANEL } else { 2 * PANEL }) as i64);
                        k.set(qv, q);
                        let x = k.get(xv);
                        let x = k.addi(x, 8);
                        k.set(xv, x);
                    });
                    if factor {
                        for (tt, row) in bacc.iter().enumerate() {
                            for (j, b) in row.iter().enumerate() {
                                let bv = k.get(*b);
                                let a = k.get(accs[tt][j]);
                                let a = k.fma(bv, scales[j], a);
                                k.set(accs[tt][j], a);
                            }
                        }
                    }
                }
                let bp = k.addi(bp, block as i64);
                k.set(wv, bp);
                let b = k.addi(b, 1);
                k.set(bi, b);
            });
        }
        _ => unreachable!("f32 tiles are in matmul.rs"),
    }
    let _ = I16X8;
    accs
}

/// The nibble of `byte` (an i32) that `high` (an i64, 0 or 1) picks.
pub fn nibble(k: &mut Kb<'_>, byte: Value, high: Value) -> Value {
    let sh = k.b.ins().ishl_imm_u(high, 2);
    let sh = k.b.ins().ireduce(types::I32, sh);
    let nib = k.b.ins().ushr(byte, sh);
    k.b.ins().band_imm_u(nib, 0x0f)
}

/// The value a stored integer `q` (its signed value) means at column `kk` (an i64 in 0..32) of
/// row `lane` of block `b` at `bp` of the panel at `panel` (rows of `cols`) of `wt`: the row's
/// scale at `bp + 4·lane`, its minimum 64 bytes further; K types: the row's i8 scale at
/// `bp + lane` (q6_k: the second half's 16 further) times its super-block scale in the
/// panel's table, the i8 minimum 16 further times the table's `smin`.
pub fn block_value(
    k: &mut Kb<'_>,
    wt: DType,
    cols: usize,
    q: Value,
    (panel, b, bp): (Value, Value, Value),
    lane: Value,
    kk: Value,
) -> Value {
    let f = k.b.ins().fcvt_from_sint(F32, q);
    if llmc_ir::quant::is_k(wt) {
        let sb = k.udivi(b, (QK_K / QK) as i64);
        let tab = k.at(panel, sb, crate::pack::super_bytes(wt) as i64);
        let tab = k.at(tab, lane, 4);
        let tab = k.addi(tab, crate::pack::super_table(wt, cols) as i64);
        let sa = k.add(bp, lane);
        let sa = if wt == DType::Q6K {
            let half = k.udivi(kk, 16);
            k.at(sa, half, PANEL as i64)
        } else {
            sa
        };
        let sc = k.b.ins().sload8(types::I32, flags(), sa, 0);
        let sc = k.b.ins().fcvt_from_sint(F32, sc);
        let sd = k.ld(F32, tab, 0);
        let d = k.fmul(sd, sc);
        let fd = k.fmul(f, d);
        if !llmc_ir::quant::has_min(wt) {
            return fd;
        }
        let mi = k.b.ins().sload8(types::I32, flags(), sa, PANEL as i32);
        let mi = k.b.ins().fcvt_from_sint(F32, mi);
        let smin = k.ld(F32, tab, (PANEL * 4) as i64);
        let m = k.fmul(smin, mi);
        return k.fadd(fd, m);
    }
    let sa = k.at(bp, lane, 4);
    let sa = if wt == DType::Q6K {
        let half = k.udivi(kk, 16);
        k.at(sa, half, (PANEL * 4) as i64)
    } else {
        sa
    };
    let d = k.ld(F32, sa, 0);
    let fd = k.fmul(f, d);
    if llmc_ir::quant::has_min(wt) {
        let m = k.ld(F32, sa, (PANEL * 4) as i64);
        k.fadd(fd, m)
    } else {
        fd
    }
}

/// The block scales of rows `4·v .. 4·v + 4` of the block at `bp` (sub-block `sub`, or with
/// `min` its minimums) as a vector: the head's f32s, or (K types) its i8s times the super-block
/// table entry's f32s at `tab`.
pub fn block_scales(k: &mut Kb<'_>, wt: DType, bp: Value, tab: Value, v: usize, sub: usize, min: bool) -> Value {
    if llmc_ir::quant::is_k(wt) {
        let at = (if min { PANEL } else { sub * PANEL } + v * 4) as i32;
        let i = k.b.ins().sload8x8(flags(), bp, at);
        let i = k.b.ins().swiden_low(i);
        let f = k.b.ins().fcvt_from_sint(V4, i);
        let s = k.ld(V4, tab, (if min { PANEL * 4 } else { 0 } + v * 16) as i64);
        k.fmul(f, s)
    } else {
        let at = if min { PANEL * 4 } else { sub * PANEL * 4 } + v * 16;
        k.ld(V4, bp, at as i64)
    }
}

/// The super-block table entry of block `bi` (an i64) of the panel whose blocks start at `wp`
/// (K types; any pointer otherwise, never read).
pub fn super_entry(k: &mut Kb<'_>, wt: DType, wp: Value, bi: Value, cols: usize) -> Value {
    if !llmc_ir::quant::is_k(wt) {
        return wp;
    }
    let sb = k.b.ins().ushr_imm_u(bi, 3);
    let e = k.at(wp, sb, crate::pack::super_bytes(wt) as i64);
    k.addi(e, crate::pack::super_table(wt, cols) as i64)
}

/// Element `j` (a column index, a Value) of row `lane` of the `Panel16` panel at `panel`, whose
/// rows have `cols` columns, as f32.
pub fn load_elem(k: &mut Kb<'_>, wt: DType, cols: usize, panel: Value, lane: Value, j: Value) -> Value {
    let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
    match wt {
        DType::BF16 | DType::F16 => {
            let jl = k.muli(j, PANEL as i64);
            let idx = k.add(jl, lane);
            let a = k.at(panel, idx, 2);
            let h = k.b.ins().uload16(types::I32, flags(), a, 0);
            if wt == DType::BF16 {
                let b = k.b.ins().ishl_imm_u(h, 16);
                k.b.ins().bitcast(F32, le, b)
            } else {
                let sign = k.b.ins().band_imm_u(h, 0x8000);
                let sign = k.b.ins().ishl_imm_u(sign, 16);
                let mag = k.b.ins().band_imm_u(h, 0x7fff);
                let mag = k.b.ins().ishl_imm_u(mag, 13);
                let f = k.b.ins().bitcast(F32, le, mag);
                let s = k.f(f32::from_bits((127 + 112) << 23));
                let f = k.fmul(f, s);
                let fi = k.b.ins().bitcast(types::I32, le, f);
                let r = k.b.ins().bor(fi, sign);
                k.b.ins().bitcast(F32, le, r)
            }
        }
        wt if llmc_ir::quant::is_blocked(wt) => {
            let q4 = crate::pack::is_nibble(wt);
            let head = crate::pack::block_head(wt);
            let b = k.udivi(j, QK as i64);
            let kk = k.uremi(j, QK as i64);
            let bp = k.at(panel, b, crate::pack::block_bytes(wt) as i64);
            let qbase = k.add(bp, lane);
            let q = if q4 {
                let pair = k.b.ins().ushr_imm_u(kk, 1);
                let qa = k.at(qbase, pair, PANEL as i64);
                let byte = k.b.ins().uload8(types::I32, flags(), qa, head as i32);
                let odd = k.b.ins().band_imm_u(kk, 1);
                let mut n = nibble(k, byte, odd);
                let hb = crate::pack::high_bits(wt);
                if hb > 0 {
                    // the plane byte of pair `pair`, lane `lane` (`pack::plane_at`)
                    let per = if hb == 1 { 4 } else { 2 };
                    let row = k.udivi(pair, per);
                    let pa = k.at(qbase, row, PANEL as i64);
                    let pb = k.b.ins().uload8(types::I32, flags(), pa, (head + QK / 2 * PANEL) as i32);
                    let slot = k.uremi(pair, per);
                    let s = k.muli(slot, 2 * hb as i64);
                    let o = k.muli(odd, hb as i64);
                    let s = k.add(s, o);
                    let s = k.b.ins().ireduce(types::I32, s);
                    let bits = k.b.ins().ushr(pb, s);
                    let bits = k.b.ins().band_imm_u(bits, (1 << hb) - 1);
                    let bits = k.b.ins().ishl_imm_u(bits, 4);
                    n = k.b.ins().bor(n, bits);
                }
                k.b.ins().iadd_imm_s(n, -(crate::pack::dot_offset(wt) as i64))
            } else {
                let qa = k.at(qbase, kk, PANEL as i64);
                k.b.ins().sload8(types::I32, flags(), qa, head as i32)
            };
            block_value(k, wt, cols, q, (panel, b, bp), lane, kk)
        }
        _ => {
            let jl = k.muli(j, PANEL as i64);
            let idx = k.add(jl, lane);
            let a = k.at(panel, idx, 4);
            k.ld(F32, a, 0)
        }
    }
}
