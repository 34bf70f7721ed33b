//! The weights a graph reads, and how each is found in the checkpoint.

use crate::error::{ModelError, Result};
use crate::safetensors_io::WeightFiles;

/// How a checkpoint tensor becomes the IR weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Stored as the IR wants it.
    None,
    /// Stored `[in, out]` (GPT-2 Conv1D); the IR wants `[out, in]`.
    Transpose,
    /// Rows reordered: IR row `i` is checkpoint row `perm[i]` (Falcon's grouped QKV).
    PermuteRows(Vec<usize>),
    /// IR rows are checkpoint rows `start ..` of a tensor with `stored_rows` rows (one half of
    /// Granite's fused `[gate | up]` projection).
    RowRange { start: usize, stored_rows: usize },
}

/// One weight of the graph: its IR name and shape, the checkpoint names it may have (first
/// found wins), and the transform from checkpoint layout.
#[derive(Clone, Debug)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// `F32` (read from f32/f16/bf16) or `U8` (raw bytes, BitNet's packed ternary weights).
    pub dtype: llmc_ir::DType,
    pub candidates: Vec<String>,
    pub transform: Transform,
}

impl WeightSpec {
    /// The shape the checkpoint must store.
    pub fn stored_shape(&self) -> Vec<usize> {
        match self.transform {
            Transform::Transpose => self.shape.iter().rev().copied().collect(),
            Transform::RowRange { stored_rows, .. } => {
                let mut s = self.shape.clone();
                if let Some(r) = s.first_mut() {
                    *r = stored_rows;
                }
                s
            }
            _ => self.shape.clone(),
        }
    }

    /// Reads a `u8` tensor's bytes from the checkpoint (shape checked, no transform).
    pub fn load_bytes(&self, files: &WeightFiles) -> Result<Vec<u8>> {
        let (src, loc) = self
            .candidates
            .iter()
            .find_map(|c| files.get(c).map(|l| (c, l)))
            .ok_or_else(|| ModelError::MissingTensor { name: self.name.clone(), files: files.describe_files() })?;
        if loc.shape != self.shape {
            return Err(ModelError::TensorShape {
                path: files.path_of(loc).to_path_buf(),
                name: src.clone(),
                expected: self.shape.clone(),
                actual: loc.shape.clone(),
            });
        }
        files.read_u8(src)
    }

    /// The tensor's rows as its GGUF file stores them (`WeightFiles::gguf_rows`), for a
    /// quantized GGUF matrix read without a transform and of the expected shape.
    pub fn gguf_rows<'a>(&self, files: &'a WeightFiles) -> Option<crate::safetensors_io::GgufRows<'a>> {
        let src = self.candidates.iter().find(|c| files.get(c).is_some())?;
        if self.transform != Transform::None || files.get(src)?.shape != self.shape {
            return None;
        }
        files.gguf_rows(src)
    }

    /// Reads the tensor from the checkpoint, checks its shape and applies the transform.
    pub fn load(&self, files: &WeightFiles) -> Result<Vec<f32>> {
        let (src, loc) = self
            .candidates
            .iter()
            .find_map(|c| files.get(c).map(|l| (c, l)))
            .ok_or_else(|| ModelError::MissingTensor { name: self.name.clone(), files: files.describe_files() })?;
        let want = self.stored_shape();
        if loc.shape != want {
            return Err(ModelError::TensorShape {
                path: files.path_of(loc).to_path_buf(),
                name: src.clone(),
                expected: want,
                actual: loc.shape.clone(),
            });
        }
        let data = files.read_f32(src)?;
        Ok(match &self.transform {
            Transform::None => data,
            Transform::Transpose => {
                let (rows, cols) = (want[0], want[1]);
                let mut out = vec![0f32; data.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        out[c * rows + r] = data[r * cols + c];
                    }
                }
                out
            }
            Transform::RowRange { start, stored_rows } => {
                let cols = data.len() / (*stored_rows).max(1);
                let rows = self.shape.first().copied().unwrap_or(0);
                data.get(start * cols..(start + rows) * cols)
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: self.name.clone(),
                        files: files.describe_files(),
                    })?
                    .to_vec()
            }
            Transform::PermuteRows(perm) => {
                let cols = data.len() / want[0].max(1);
                let mut out = Vec::with_capacity(data.len());
                for &p in perm {
                    out.extend_from_slice(&data[p * cols..(p + 1) * cols]);
                }
                out
            }
        })
    }
}
