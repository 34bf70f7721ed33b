//! Weight packing: the layouts kernels walk, and the inverse for the interpreter.

use half::{bf16, f16};
use llmc_ir::quant::{self, KScales, QBlock, QK, QK_K};
use llmc_ir::DType;

use crate::program::Layout;

pub const PANEL: usize = 16;

/// A tensor as a matrix: every dim but the last are rows (stacked experts are stacked rows).
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    (shape[..shape.len().saturating_sub(1)].iter().product(), cols)
}

/// Number of f32 values a tensor of logical `shape` occupies in `layout`.
pub fn packed_len(layout: Layout, shape: &[usize]) -> usize {
    match layout {
        Layout::RowMajor => shape.iter().product(),
        Layout::Panel16 => {
            let (rows, cols) = matrix_dims(shape);
            rows.div_ceil(PANEL) * PANEL * cols
        }
        Layout::Padded16 => shape[0].div_ceil(PANEL) * PANEL,
        // never f32: `packed_bytes` refuses it
        Layout::Dot16 => 0,
    }
}

/// Packs a row-major tensor into `layout`.
pub fn pack(layout: Layout, shape: &[usize], data: &[f32]) -> Vec<f32> {
    match layout {
        Layout::RowMajor | Layout::Dot16 => data.to_vec(),
        Layout::Padded16 => {
            let mut out = data.to_vec();
            out.resize(packed_len(layout, shape), 0.0);
            out
        }
        Layout::Panel16 => {
            let (rows, cols) = matrix_dims(shape);
            let mut out = vec![0f32; packed_len(layout, shape)];
            for r in 0..rows {
                let (p, lane) = (r / PANEL, r % PANEL);
                for k in 0..cols {
                    out[p * PANEL * cols + k * PANEL + lane] = data[r * cols + k];
                }
            }
            out
        }
    }
}

/// Recovers the row-major tensor from its packed form.
pub fn unpack(layout: Layout, shape: &[usize], packed: &[f32]) -> Vec<f32> {
    match layout {
        Layout::RowMajor | Layout::Dot16 => packed.to_vec(),
        Layout::Padded16 => packed[..shape[0]].to_vec(),
        Layout::Panel16 => {
            let (rows, cols) = matrix_dims(shape);
            let mut out = vec![0f32; rows * cols];
            for r in 0..rows {
                let (p, lane) = (r / PANEL, r % PANEL);
                for k in 0..cols {
                    out[r * cols + k] = packed[p * PANEL * cols + k * PANEL + lane];
                }
            }
            out
        }
    }
}

/// Bytes one 16-row panel of a `Panel16` (or `Dot16`) matrix with `cols` columns takes in
/// storage type `dtype`:
/// - f32: `[k][16]` f32; bf16/f16: `[k][16]` u16 (the 16-bit values);
/// - blocked types: per block of 32 columns, a head (`block_head`), then the integers, each
///   stored as `u = q + dot_offset`: q8_0 one byte each (`[32 k][16]`; in `Panel16` the i8
///   `q`); the others the low 4 bits of `u` as nibble pairs (`[16 k pairs][16]` bytes, the
///   low nibble for column `2j`, the high one for `2j + 1`; `Dot16`: `dot_at`), then for the 5-
///   and 6-bit types (`high_bits`) the bits above them in a plane of 64 or 128 bytes
///   (`plane_at`). The head: 16 f32 scales (the rows' `d[0]`), then for q4_1/q5_1 16
///   f32 minimums; for the K types 16 i8 scales `sc[0]`, then 16 i8 `mi` (q4_k, q5_k) or
///   `sc[1]` (q6_k);
/// - K types: after the blocks, the super-block table (`super_table`): per super-block of 8
///   blocks, 16 f32 `sd`, then (q4_k, q5_k) 16 f32 `smin` (`super_bytes`).
pub fn panel_bytes(dtype: DType, cols: usize) -> usize {
    match dtype {
        DType::BF16 | DType::F16 => PANEL * 2 * cols,
        d if quant::is_blocked(d) => cols / QK * block_bytes(d) + cols / QK_K * super_bytes(d),
        _ => PANEL * 4 * cols,
    }
}

/// Bytes of one block of 32 columns of a panel (head and integers).
pub fn block_bytes(dtype: DType) -> usize {
    block_head(dtype) + if is_nibble(dtype) { QK / 2 * PANEL + plane_bytes(dtype) } else { QK * PANEL }
}

/// Bits of a stored integer above its low nibble: 1 for the 5-bit types (q5_0, q5_1, q5_k), 2 for
/// q6_k, else 0.
pub fn high_bits(dtype: DType) -> usize {
    match dtype {
        DType::Q5_0 | DType::Q5_1 | DType::Q5K => 1,
        DType::Q6K => 2,
        _ => 0,
    }
}

/// Bytes of a block's plane of high bits (after its nibbles): 64 per high bit.
pub fn plane_bytes(dtype: DType) -> usize {
    high_bits(dtype) * QK * PANEL / 8
}

/// Where the high bits of value `k` (0..32) of a block's row `lane` sit in the block's plane
/// (which starts `QK / 2 · PANEL` bytes after the head): `(byte, shift)`, the bits being
/// `(plane[byte] >> shift) & (2^high_bits − 1)`.
/// - `Dot16` (a plane byte per nibble byte of one group: the same `lane · 4 + k % 4`): 5-bit:
///   one 64-byte plane, bit `2g + high` for group `g` of `dot_at`; 6-bit: groups 0, 1 in the
///   first 64 bytes and 2, 3 in the next, bits `4 (g % 2) + 2 high`.
/// - `Panel16` (pair `j = k / 2`, `odd = k % 2`): 5-bit: byte `(j / 4) · 16 + lane`, bit
///   `2 (j % 4) + odd`; 6-bit: byte `(j / 2) · 16 + lane`, bits `4 (j % 2) + 2 odd`.
pub fn plane_at(dtype: DType, dot: bool, lane: usize, k: usize) -> (usize, u32) {
    let six = high_bits(dtype) == 2;
    if dot {
        let (g, high) = ((k % 16) / 4, (k >= 16) as usize);
        let i = lane * 4 + k % 4;
        if six {
            ((g / 2) * PANEL * 4 + i, (4 * (g % 2) + 2 * high) as u32)
        } else {
            (i, (2 * g + high) as u32)
        }
    } else {
        let (j, odd) = (k / 2, k % 2);
        if six {
            ((j / 2) * PANEL + lane, (4 * (j % 2) + 2 * odd) as u32)
        } else {
            ((j / 4) * PANEL + lane, (2 * (j % 4) + odd) as u32)
        }
    }
}

/// Bytes of a block's per-row header (16 f32 scales; q4_1/q5_1: then 16 f32 minimums; K types:
/// 16 + 16 i8), after which its integers start.
pub fn block_head(dtype: DType) -> usize {
    if quant::is_k(dtype) {
        PANEL * 2
    } else if quant::has_min(dtype) {
        PANEL * 8
    } else {
        PANEL * 4
    }
}

/// Bytes of one super-block's entry in a K-type panel's table (16 f32 `sd`; with a minimum
/// then 16 f32 `smin`); 0 for the other types.
pub fn super_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q6K => PANEL * 4,
        DType::Q4K | DType::Q5K => PANEL * 8,
        _ => 0,
    }
}

/// Where a K-type panel's super-block table starts (after its `cols / 32` blocks).
pub fn super_table(dtype: DType, cols: usize) -> usize {
    cols / QK * block_bytes(dtype)
}

/// Whether `dtype` stores its integers as nibbles (with a plane of high bits for the 5- and
/// 6-bit types; only q8_0 has whole bytes).
pub fn is_nibble(dtype: DType) -> bool {
    quant::is_blocked(dtype) && dtype != DType::Q8_0
}

/// What a stored integer carries on top of `q` so that it is unsigned (`vpdpbusd` multiplies
/// unsigned weight bytes by signed activations): q8_0 128, q4_0 8, q5_0 16, q6_k 32, else 0.
pub fn dot_offset(dtype: DType) -> i32 {
    match dtype {
        DType::Q8_0 => 128,
        DType::Q4_0 => 8,
        DType::Q5_0 => 16,
        DType::Q6K => 32,
        _ => 0,
    }
}

/// Where value `k` (0..32) of a block's row `lane` sits in the `Dot16` layout, after the
/// block's head: `(byte, high nibble)`. Columns go in groups of 4; a group holds the 16 rows × 4
/// columns (64 bytes, row-major), so each 16-byte vector is 4 rows × 4 columns.
/// - q8_0: 8 groups, each byte `q + dot_offset`;
/// - the others: 4 groups of columns `4g..4g+4` in the low nibbles and `16+4g..` in the high
///   ones, each nibble the low 4 bits of `q + dot_offset` (the rest in the plane: `plane_at`).
pub fn dot_at(dtype: DType, lane: usize, k: usize) -> (usize, bool) {
    let (g, high) = if is_nibble(dtype) { ((k % 16) / 4, k >= 16) } else { (k / 4, false) };
    (g * PANEL * 4 + lane * 4 + k % 4, high)
}

/// Bytes a tensor of logical `shape` and storage type `dtype` occupies in `layout` (storage
/// types other than f32 are `Panel16`, and blocked ones `Dot16` too).
pub fn packed_bytes(layout: Layout, dtype: DType, shape: &[usize]) -> Option<usize> {
    if dtype == DType::F32 {
        return Some(packed_len(layout, shape) * 4);
    }
    let fits = match layout {
        Layout::Panel16 => quant::is_storage(dtype),
        Layout::Dot16 => quant::is_blocked(dtype),
        _ => false,
    };
    let (rows, cols) = matrix_dims(shape);
    if !fits || quant::is_blocked(dtype) && cols % QK != 0 || quant::is_k(dtype) && cols % QK_K != 0 {
        return None;
    }
    Some(rows.div_ceil(PANEL) * panel_bytes(dtype, cols))
}

/// Packs a row-major f32 tensor into `layout` with storage type `dtype`, quantizing (see
/// `llmc_ir::quant::quantize_block`) or rounding as the type requires.
pub fn pack_bytes(layout: Layout, dtype: DType, shape: &[usize], data: &[f32]) -> Vec<u8> {
    if quant::is_blocked(dtype) && matches!(layout, Layout::Panel16 | Layout::Dot16) {
        return pack_blocks(layout, dtype, shape, &quant::quantize_blocks(dtype, data));
    }
    if dtype == DType::F32 || !matches!(layout, Layout::Panel16) {
        return pack(layout, shape, data).iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    let (rows, cols) = matrix_dims(shape);
    let pb = panel_bytes(dtype, cols);
    let mut out = vec![0u8; rows.div_ceil(PANEL) * pb];
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let panel = &mut out[p * pb..(p + 1) * pb];
        for (k, &v) in data[r * cols..(r + 1) * cols].iter().enumerate() {
            let bits = if dtype == DType::BF16 { bf16::from_f32(v).to_bits() } else { f16::from_f32(v).to_bits() };
            panel[(k * PANEL + lane) * 2..][..2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    out
}

/// Where things are in a packed blocked matrix.
struct BlockGeometry {
    dot: bool,
    rows: usize,
    /// blocks per row, bytes per panel, bytes per block, bytes of a block's head
    nb: usize,
    pb: usize,
    bb: usize,
    head: usize,
    /// `dot_offset`
    off: i32,
    /// K types: where the super-block table starts, bytes per entry
    table: usize,
    sb: usize,
    k: bool,
}

impl BlockGeometry {
    fn of(layout: Layout, dtype: DType, shape: &[usize]) -> BlockGeometry {
        let (rows, cols) = matrix_dims(shape);
        BlockGeometry {
            dot: layout == Layout::Dot16,
            rows,
            nb: cols / QK,
            pb: panel_bytes(dtype, cols),
            bb: block_bytes(dtype),
            head: block_head(dtype),
            off: dot_offset(dtype),
            table: super_table(dtype, cols),
            sb: super_bytes(dtype),
            k: quant::is_k(dtype),
        }
    }
}

/// Packs the blocks of a blocked matrix (`rows · cols / 32` blocks, row-major, each in
/// `dtype`'s canonical form) into `layout` (`Panel16` or `Dot16`).
pub fn pack_blocks(layout: Layout, dtype: DType, shape: &[usize], blocks: &[QBlock]) -> Vec<u8> {
    let nb = matrix_dims(shape).1 / QK;
    pack_block_rows(layout, dtype, shape, &|r, out| out.copy_from_slice(&blocks[r * nb..(r + 1) * nb]))
}

/// `pack_blocks` with the blocks of row `r` written by `row(r, out)` (`cols / 32` of them),
/// panels packed in parallel: a large matrix never exists as blocks all at once.
pub fn pack_block_rows(
    layout: Layout,
    dtype: DType,
    shape: &[usize],
    row: &(dyn Fn(usize, &mut [QBlock]) + Sync),
) -> Vec<u8> {
    use rayon::prelude::*;
    let BlockGeometry { dot, rows, nb, pb, bb, head, off, table, sb, k: kt } = BlockGeometry::of(layout, dtype, shape);
    let mut out = vec![0u8; rows.div_ceil(PANEL) * pb];
    out.par_chunks_mut(pb.max(1)).enumerate().for_each(|(p, panel)| {
        let mut blocks = vec![QBlock::default(); nb];
        for lane in 0..PANEL.min(rows - p * PANEL) {
            row(p * PANEL + lane, &mut blocks);
            if kt {
                // the shared scales, once per super-block (every block of it has them)
                for (s, sup) in blocks.chunks(QK_K / QK).enumerate() {
                    let e = &mut panel[table + s * sb..table + (s + 1) * sb];
                    e[lane * 4..lane * 4 + 4].copy_from_slice(&sup[0].k.sd.to_le_bytes());
                    if quant::has_min(dtype) {
                        e[PANEL * 4 + lane * 4..][..4].copy_from_slice(&sup[0].k.smin.to_le_bytes());
                    }
                }
            }
            for (b, blk) in blocks.iter().enumerate() {
                let block = &mut panel[b * bb..(b + 1) * bb];
                if kt {
                    // debug builds check that the block's scales are its K scales' products
                    debug_assert_eq!((blk.d, blk.m), blk.k.block());
                    block[lane] = blk.k.sc[0] as u8;
                    block[PANEL + lane] = if dtype == DType::Q6K { blk.k.sc[1] } else { blk.k.mi } as u8;
                } else {
                    block[lane * 4..lane * 4 + 4].copy_from_slice(&blk.d[0].to_le_bytes());
                    if quant::has_min(dtype) {
                        block[PANEL * 4 + lane * 4..][..4].copy_from_slice(&blk.m.to_le_bytes());
                    }
                }
                let (qs, plane) =
                    block[head..].split_at_mut(if is_nibble(dtype) { QK / 2 * PANEL } else { QK * PANEL });
                for (k, &q) in blk.q.iter().enumerate() {
                    let u = (q as i32 + off) as u8;
                    let lo = u & 0x0F;
                    if dot {
                        let (at, high) = dot_at(dtype, lane, k);
                        qs[at] |= if !is_nibble(dtype) {
                            u
                        } else if high {
                            lo << 4
                        } else {
                            lo
                        };
                    } else if is_nibble(dtype) {
                        qs[(k / 2) * PANEL + lane] |= if k % 2 == 0 { lo } else { lo << 4 };
                    } else {
                        qs[k * PANEL + lane] = q as u8;
                    }
                    if high_bits(dtype) > 0 {
                        let (at, shift) = plane_at(dtype, dot, lane, k);
                        plane[at] |= (u >> 4) << shift;
                    }
                }
            }
        }
    });
    out
}

/// The blocks a packed blocked matrix holds (the inverse of `pack_blocks`).
pub fn unpack_blocks(layout: Layout, dtype: DType, shape: &[usize], bytes: &[u8]) -> Vec<QBlock> {
    let BlockGeometry { dot, rows, nb, pb, bb, head, off, table, sb, k } = BlockGeometry::of(layout, dtype, shape);
    let f = |b: &[u8], at: usize| f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut out = Vec::with_capacity(rows * nb);
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let panel = &bytes[p * pb..(p + 1) * pb];
        for b in 0..nb {
            let block = &panel[b * bb..(b + 1) * bb];
            let mut blk = if k {
                let e = &panel[table + b / (QK_K / QK) * sb..];
                let (a, second) = (block[lane] as i8, block[PANEL + lane] as i8);
                let q6 = dtype == DType::Q6K;
                let ks = KScales {
                    sd: f(e, lane * 4),
                    smin: if q6 { 0.0 } else { f(e, PANEL * 4 + lane * 4) },
                    sc: [a, if q6 { second } else { a }],
                    mi: if q6 { 0 } else { second },
                };
                let (d, m) = ks.block();
                QBlock { d, m, q: [0; QK], k: ks }
            } else {
                let d0 = f(block, lane * 4);
                let second = f(block, PANEL * 4 + lane * 4);
                QBlock {
                    d: [d0, if dtype == DType::Q6K { second } else { d0 }],
                    m: if quant::has_min(dtype) { second } else { 0.0 },
                    ..Default::default()
                }
            };
            let qs = &block[head..];
            let plane = &qs[QK / 2 * PANEL..];
            let mask = (1u8 << high_bits(dtype)) - 1;
            for (k, q) in blk.q.iter_mut().enumerate() {
                // the bits above the nibble, for the 5- and 6-bit types
                let hi = if high_bits(dtype) > 0 {
                    let (at, shift) = plane_at(dtype, dot, lane, k);
                    (((plane[at] >> shift) & mask) << 4) as i32
                } else {
                    0
                };
                *q = if !dot && !is_nibble(dtype) {
                    // q8_0 in `Panel16`: the i8 itself
                    qs[k * PANEL + lane] as i8
                } else {
                    // the stored unsigned integer: its low bits (a byte or a nibble), then the
                    // plane's bits above them, less what it carries
                    let low = if dot {
                        let (at, high) = dot_at(dtype, lane, k);
                        if !is_nibble(dtype) {
                            qs[at]
                        } else if high {
                            qs[at] >> 4
                        } else {
                            qs[at] & 0x0F
                        }
                    } else {
                        let byte = qs[(k / 2) * PANEL + lane];
                        if k % 2 == 0 {
                            byte & 0x0F
                        } else {
                            byte >> 4
                        }
                    };
                    ((low as i32 | hi) - off) as i8
                };
            }
            out.push(blk);
        }
    }
    out
}

/// The row-major f32 values a packed tensor means (its dequantization).
pub fn unpack_bytes(layout: Layout, dtype: DType, shape: &[usize], bytes: &[u8]) -> Vec<f32> {
    if quant::is_blocked(dtype) && matches!(layout, Layout::Panel16 | Layout::Dot16) {
        let blocks = unpack_blocks(layout, dtype, shape, bytes);
        let mut out = vec![0f32; blocks.len() * QK];
        for (b, o) in blocks.iter().zip(out.chunks_mut(QK)) {
            quant::dequantize_block(b, o);
        }
        return out;
    }
    if dtype == DType::F32 || !matches!(layout, Layout::Panel16) {
        let f: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        return unpack(layout, shape, &f);
    }
    let (rows, cols) = matrix_dims(shape);
    let pb = panel_bytes(dtype, cols);
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let panel = &bytes[p * pb..(p + 1) * pb];
        for (k, v) in out[r * cols..(r + 1) * cols].iter_mut().enumerate() {
            let at = (k * PANEL + lane) * 2;
            let bits = u16::from_le_bytes([panel[at], panel[at + 1]]);
            *v = if dtype == DType::BF16 { bf16::from_bits(bits).to_f32() } else { f16::from_bits(bits).to_f32() };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_round_trip_with_padding() {
        let (rows, cols) = (19, 3);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = pack(Layout::Panel16, &[rows, cols], &data);
        assert_eq!(p.len(), 32 * 3);
        assert_eq!(p[1], data[cols]); // panel 0, k 0, row 1
        assert_eq!(p[16], data[1]); // panel 0, k 1, row 0
        assert_eq!(unpack(Layout::Panel16, &[rows, cols], &p), data);
        let b = pack(Layout::Padded16, &[5], &data[..5]);
        assert_eq!(b.len(), 16);
        assert_eq!(unpack(Layout::Padded16, &[5], &b), data[..5].to_vec());
    }

    #[test]
    fn storage_types_round_trip_to_their_meaning() {
        let (rows, cols) = (19, 512);
        let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let blocked =
            [DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::Q4_1, DType::Q5_1, DType::Q6K, DType::Q4K, DType::Q5K];
        let cases = [DType::BF16, DType::F16]
            .into_iter()
            .chain(blocked)
            .map(|d| (Layout::Panel16, d))
            .chain(blocked.map(|d| (Layout::Dot16, d)));
        for (layout, dtype) in cases {
            let b = pack_bytes(layout, dtype, &[rows, cols], &data);
            assert_eq!(Some(b.len()), packed_bytes(layout, dtype, &[rows, cols]));
            let back = unpack_bytes(layout, dtype, &[rows, cols], &b);
            assert_eq!(back, quant::round_trip(dtype, &data, cols), "{layout:?} {dtype:?}");
        }
        assert_eq!(packed_bytes(Layout::Dot16, DType::BF16, &[rows, cols]), None);
    }
}
