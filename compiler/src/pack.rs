//! Weight packing: the layouts kernels walk, and the inverse for the interpreter.

use half::{bf16, f16};
use llmc_ir::quant::{self, QK};
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

/// Bytes one 16-row panel of a `Panel16` matrix with `cols` columns takes in storage type
/// `dtype`:
/// - f32: `[k][16]` f32; bf16/f16: `[k][16]` u16 (the 16-bit values);
/// - q8_0: per block of 32 columns, the 16 rows' scales (f32) then `[32 k][16]` i8;
/// - q4_0: per block, 16 scales then `[16 k pairs][16]` bytes, the low nibble for column
///   `2j` and the high nibble for `2j + 1`, each `q + 8`;
/// - q4_1: per block, 16 scales, 16 minimums (f32), then the nibbles `q` as for q4_0.
pub fn panel_bytes(dtype: DType, cols: usize) -> usize {
    match dtype {
        DType::BF16 | DType::F16 => PANEL * 2 * cols,
        DType::Q8_0 => cols / QK * (PANEL * 4 + QK * PANEL),
        DType::Q4_0 | DType::Q4_1 => cols / QK * (block_head(dtype) + QK / 2 * PANEL),
        _ => PANEL * 4 * cols,
    }
}

/// Bytes of a block's per-row header (16 f32 scales; q4_1: then 16 f32 minimums), after
/// which its quantized values start.
pub fn block_head(dtype: DType) -> usize {
    if dtype == DType::Q4_1 {
        PANEL * 8
    } else {
        PANEL * 4
    }
}

/// Where value `k` (0..32) of a block's row `lane` sits in the `Dot16` layout, after the 16
/// scales: `(byte, high nibble)`. Columns go in groups of 4; a group holds the 16 rows × 4
/// columns (64 bytes, row-major), so each 16-byte vector is 4 rows × 4 columns.
/// - q8_0: 8 groups, each byte `q + 128` (unsigned: `vpdpbusd` multiplies u8 by i8);
/// - q4_0, q4_1: 4 groups of columns `4g..4g+4` in the low nibbles and `16+4g..` in the high
///   ones, each nibble `q + 8` (q4_0) or `q` (q4_1).
pub fn dot_at(dtype: DType, lane: usize, k: usize) -> (usize, bool) {
    let (g, high) = if dtype == DType::Q8_0 { (k / 4, false) } else { ((k % 16) / 4, k >= 16) };
    (g * PANEL * 4 + lane * 4 + k % 4, high)
}

/// Bytes a tensor of logical `shape` and storage type `dtype` occupies in `layout` (storage
/// types other than f32 are `Panel16` only).
pub fn packed_bytes(layout: Layout, dtype: DType, shape: &[usize]) -> Option<usize> {
    match (layout, dtype) {
        (_, DType::F32) => Some(packed_len(layout, shape) * 4),
        (Layout::Panel16, DType::BF16 | DType::F16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
        | (Layout::Dot16, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) => {
            let (rows, cols) = matrix_dims(shape);
            if quant::is_blocked(dtype) && cols % QK != 0 {
                return None;
            }
            Some(rows.div_ceil(PANEL) * panel_bytes(dtype, cols))
        }
        _ => None,
    }
}

/// Packs a row-major f32 tensor into `layout` with storage type `dtype`, quantizing (ggml's
/// reference math, see `llmc_ir::quant`) or rounding as the type requires.
pub fn pack_bytes(layout: Layout, dtype: DType, shape: &[usize], data: &[f32]) -> Vec<u8> {
    if dtype == DType::F32 || !matches!(layout, Layout::Panel16 | Layout::Dot16) {
        return pack(layout, shape, data).iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    let dot = layout == Layout::Dot16;
    let (rows, cols) = matrix_dims(shape);
    let pb = panel_bytes(dtype, cols);
    let mut out = vec![0u8; rows.div_ceil(PANEL) * pb];
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let panel = &mut out[p * pb..(p + 1) * pb];
        let row = &data[r * cols..(r + 1) * cols];
        match dtype {
            DType::BF16 | DType::F16 => {
                for (k, &v) in row.iter().enumerate() {
                    let bits =
                        if dtype == DType::BF16 { bf16::from_f32(v).to_bits() } else { f16::from_f32(v).to_bits() };
                    panel[(k * PANEL + lane) * 2..][..2].copy_from_slice(&bits.to_le_bytes());
                }
            }
            _ => {
                let bb = pb / (cols / QK);
                for (b, x) in row.chunks(QK).enumerate() {
                    // (scale, minimum, the stored bytes: q8_0's i8, else the nibbles)
                    let (d, m, us): (f32, Option<f32>, [u8; QK]) = match dtype {
                        DType::Q8_0 => {
                            let blk = quant::quantize_q8_0(x);
                            (blk.d, None, blk.q.map(|q| q as u8))
                        }
                        DType::Q4_1 => {
                            let blk = quant::quantize_q4_1(x);
                            (blk.d, Some(blk.m), blk.q)
                        }
                        _ => {
                            let blk = quant::quantize_q4_0(x);
                            (blk.d, None, blk.q.map(|q| (q + 8) as u8))
                        }
                    };
                    let block = &mut panel[b * bb..(b + 1) * bb];
                    block[lane * 4..lane * 4 + 4].copy_from_slice(&d.to_le_bytes());
                    if let Some(m) = m {
                        block[PANEL * 4 + lane * 4..][..4].copy_from_slice(&m.to_le_bytes());
                    }
                    let qs = &mut block[block_head(dtype)..];
                    for (k, &u) in us.iter().enumerate() {
                        if dot {
                            let (at, high) = dot_at(dtype, lane, k);
                            let u = if dtype == DType::Q8_0 { u ^ 0x80 } else { u };
                            qs[at] |= if high { u << 4 } else { u };
                        } else if dtype == DType::Q8_0 {
                            qs[k * PANEL + lane] = u;
                        } else {
                            qs[(k / 2) * PANEL + lane] |= if k % 2 == 0 { u } else { u << 4 };
                        }
                    }
                }
            }
        }
    }
    out
}

/// The row-major f32 values a packed tensor means (its dequantization).
pub fn unpack_bytes(layout: Layout, dtype: DType, shape: &[usize], bytes: &[u8]) -> Vec<f32> {
    let dot = layout == Layout::Dot16;
    if dtype == DType::F32 || !matches!(layout, Layout::Panel16 | Layout::Dot16) {
        let f: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        return unpack(layout, shape, &f);
    }
    let (rows, cols) = matrix_dims(shape);
    let pb = panel_bytes(dtype, cols);
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let panel = &bytes[p * pb..(p + 1) * pb];
        let row = &mut out[r * cols..(r + 1) * cols];
        match dtype {
            DType::BF16 | DType::F16 => {
                for (k, v) in row.iter_mut().enumerate() {
                    let at = (k * PANEL + lane) * 2;
                    let bits = u16::from_le_bytes([panel[at], panel[at + 1]]);
                    *v = if dtype == DType::BF16 {
                        bf16::from_bits(bits).to_f32()
                    } else {
                        f16::from_bits(bits).to_f32()
                    };
                }
            }
            _ => {
                let bb = pb / (cols / QK);
                for (b, x) in row.chunks_mut(QK).enumerate() {
                    let block = &panel[b * bb..(b + 1) * bb];
                    let d = f32::from_le_bytes([
                        block[lane * 4],
                        block[lane * 4 + 1],
                        block[lane * 4 + 2],
                        block[lane * 4 + 3],
                    ]);
                    let qs = &block[block_head(dtype)..];
                    let m = f32::from_le_bytes(block[PANEL * 4 + lane * 4..][..4].try_into().unwrap_or([0; 4]));
                    for (k, v) in x.iter_mut().enumerate() {
                        // the stored byte (q8_0: as i8) or nibble
                        let u = if dot {
                            let (at, high) = dot_at(dtype, lane, k);
                            if dtype == DType::Q8_0 {
                                (qs[at] ^ 0x80) as i8 as i32
                            } else if high {
                                (qs[at] >> 4) as i32
                            } else {
                                (qs[at] & 0x0F) as i32
                            }
                        } else if dtype == DType::Q8_0 {
                            qs[k * PANEL + lane] as i8 as i32
                        } else {
                            let byte = qs[(k / 2) * PANEL + lane];
                            (if k % 2 == 0 { byte & 0x0F } else { byte >> 4 }) as i32
                        };
                        *v = match dtype {
                            DType::Q4_1 => u as f32 * d + m,
                            DType::Q4_0 => d * (u - 8) as f32,
                            _ => d * u as f32,
                        };
                    }
                }
            }
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
        let (rows, cols) = (19, 64);
        let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let cases = [DType::BF16, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1]
            .map(|d| (Layout::Panel16, d))
            .into_iter()
            .chain([(Layout::Dot16, DType::Q8_0), (Layout::Dot16, DType::Q4_0), (Layout::Dot16, DType::Q4_1)]);
        for (layout, dtype) in cases {
            let b = pack_bytes(layout, dtype, &[rows, cols], &data);
            assert_eq!(Some(b.len()), packed_bytes(layout, dtype, &[rows, cols]));
            let back = unpack_bytes(layout, dtype, &[rows, cols], &b);
            assert_eq!(back, quant::round_trip(dtype, &data, cols), "{layout:?} {dtype:?}");
        }
        assert_eq!(packed_bytes(Layout::Dot16, DType::BF16, &[rows, cols]), None);
    }
}
