//! Weight packing: the layouts kernels walk, and the inverse for the interpreter.

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
    }
}

/// Packs a row-major tensor into `layout`.
pub fn pack(layout: Layout, shape: &[usize], data: &[f32]) -> Vec<f32> {
    match layout {
        Layout::RowMajor => data.to_vec(),
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
        Layout::RowMajor => packed.to_vec(),
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
}
