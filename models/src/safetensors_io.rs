//! Safetensors loading: memory-mapped files, single or sharded (`model.safetensors.index.json`),
//! with f32/f16/bf16 tensors widened to f32 on read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorLoc {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub start: usize,
    pub end: usize,
    /// A tensor of a GGUF file (then `dtype` is nominally F32: `read_f32` dequantizes).
    pub gguf: Option<GgufTensor>,
}

/// The rows of a quantized GGUF matrix (`WeightFiles::gguf_rows`).
pub struct GgufRows<'a> {
    pub ty: crate::gguf::GgmlType,
    bytes: &'a [u8],
    row_bytes: usize,
    /// Hugging Face row `r` is the file's row `order[r]` (`None`: the same row).
    order: Option<Vec<usize>>,
    pub rows: usize,
    pub cols: usize,
}

impl GgufRows<'_> {
    /// Writes row `r`'s blocks (`ggml_quants::to_blocks`, `cols / 32` of them) into `out`.
    pub fn row_into(&self, r: usize, out: &mut [llmc_ir::quant::QBlock]) {
        let from = self.order.as_ref().map_or(r, |o| o[r]);
        crate::ggml_quants::to_blocks_into(
            self.ty,
            &self.bytes[from * self.row_bytes..(from + 1) * self.row_bytes],
            out,
        );
    }
}

/// Where a Hugging Face tensor name lives in a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Its name in the file.
    pub name: String,
    pub ty: crate::gguf::GgmlType,
    /// llama.cpp's converter reordered the rows of each of these heads for its interleaved
    /// RoPE (Q and K of `llama` models): row `2i + h` of a head is Hugging Face's row
    /// `h · head_dim/2 + i`. Reading undoes it.
    pub unpermute_heads: Option<usize>,
}

/// A set of memory-mapped safetensors files and the index of their tensors.
pub struct WeightFiles {
    pub paths: Vec<PathBuf>,
    /// The shard index (`model.safetensors.index.json`) the paths came from, if any.
    pub index: Option<PathBuf>,
    maps: Vec<Mmap>,
    pub tensors: HashMap<String, TensorLoc>,
}

impl WeightFiles {
    /// Opens `model.safetensors` or the shards listed by `model.safetensors.index.json` in `dir`.
    pub fn find_beside(config: &Path) -> Result<WeightFiles> {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if single.exists() {
            WeightFiles::open(&single)
        } else if index.exists() {
            WeightFiles::open(&index)
        } else {
            Err(ModelError::NoWeights { config: config.to_path_buf() })
        }
    }

    /// Opens a `.safetensors` file or a `.safetensors.index.json` shard index.
    pub fn open(path: &Path) -> Result<WeightFiles> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") {
            let v = crate::config::read_json(path)?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Field {
                path: path.into(),
                field: "weight_map".into(),
                msg: "missing or not an object".into(),
            })?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut shards: BTreeMap<String, ()> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Field {
                    path: path.into(),
                    field: format!("weight_map.{tensor}"),
                    msg: "must be a file name".into(),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(ModelError::Field {
                        path: path.into(),
                        field: format!("weight_map.{tensor}"),
                        msg: format!("shard `{file}` must be a plain file name beside the index"),
                    });
                }
                shards.insert(file.to_string(), ());
            }
            let files: Vec<PathBuf> = shards.keys().map(|f| dir.join(f)).collect();
            let mut w = WeightFiles::open_files(&files)?;
            w.index = Some(path.to_path_buf());
            Ok(w)
        } else {
            WeightFiles::open_files(&[path.to_path_buf()])
        }
    }

    fn open_files(paths: &[PathBuf]) -> Result<WeightFiles> {
        let mut maps = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let io = |source| ModelError::Io { path: path.clone(), source };
            // Only regular files: a device (/dev/zero) or FIFO is no checkpoint, and opening a
            // FIFO would block.
            if !std::fs::metadata(path).map_err(io)?.is_file() {
                return Err(ModelError::NotAFile { path: path.clone() });
            }
            let file = File::open(path).map_err(io)?;
            if !file.metadata().map_err(io)?.is_file() {
                return Err(ModelError::NotAFile { path: path.clone() });
            }
            // SAFETY: the map is read-only; llmc never writes the weight files, and every read
            // is bounds-checked against the header validated just below. A file truncated by
            // another process while mapped would fault; that is the documented mmap caveat.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::Safetensors { path: path.clone(), msg: describe(&e, map.len()) })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    TensorLoc {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                        gguf: None,
                    },
                );
            }
            maps.push(map);
        }
        Ok(WeightFiles { paths: paths.to_vec(), index: None, maps, tensors })
    }

    /// The tensors of a GGUF file under their Hugging Face names (`gguf_import`).
    pub fn from_gguf(path: PathBuf, map: Mmap, tensors: HashMap<String, TensorLoc>) -> WeightFiles {
        WeightFiles { paths: vec![path], index: None, maps: vec![map], tensors }
    }

    pub fn get(&self, name: &str) -> Option<&TensorLoc> {
        self.tensors.get(name)
    }

    pub fn path_of(&self, loc: &TensorLoc) -> &Path {
        &self.paths[loc.file]
    }

    /// A short list of the files, for error messages.
    pub fn describe_files(&self) -> String {
        self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Reads a `U8` tensor's bytes.
    pub fn read_u8(&self, name: &str) -> Result<Vec<u8>> {
        let loc = self
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into(), files: self.describe_files() })?;
        if loc.dtype != Dtype::U8 {
            let path = self.paths[loc.file].clone();
            return Err(ModelError::TensorDtype {
                path,
                name: name.into(),
                dtype: format!("{:?} (expected U8)", loc.dtype),
            });
        }
        Ok(self.maps[loc.file][loc.start..loc.end].to_vec())
    }

    /// The rows of a quantized GGUF matrix as the file stores them, in Hugging Face order
    /// (llama.cpp's Q/K permutation undone). `None` for other tensors.
    pub fn gguf_rows(&self, name: &str) -> Option<GgufRows<'_>> {
        let loc = self.get(name)?;
        let g = loc.gguf.as_ref()?;
        if !llmc_ir::quant::is_blocked(crate::ggml_quants::storage_type(g.ty)) || loc.shape.len() < 2 {
            return None;
        }
        let rows = loc.shape[0];
        let cols: usize = loc.shape[1..].iter().product();
        let (be, bb) = g.ty.block();
        if cols % be as usize != 0 {
            return None;
        }
        let row_bytes = cols / be as usize * bb as usize;
        let bytes = self.maps[loc.file].get(loc.start..loc.end)?;
        if bytes.len() != rows * row_bytes {
            return None;
        }
        let order = match g.unpermute_heads {
            Some(heads) => Some(unpermute_order(rows, heads)?),
            None => None,
        };
        Some(GgufRows { ty: g.ty, bytes, row_bytes, order, rows, cols })
    }

    /// Reads a tensor as f32, widening f16/bf16.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let loc = self
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into(), files: self.describe_files() })?;
        let bytes = &self.maps[loc.file][loc.start..loc.end];
        let path = self.paths[loc.file].clone();
        if let Some(g) = &loc.gguf {
            let v = crate::ggml_quants::dequantize(g.ty, bytes);
            return Ok(match g.unpermute_heads {
                Some(heads) => unpermute(&v, &loc.shape, heads),
                None => v,
            });
        }
        let out = match loc.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(ModelError::TensorDtype { path, name: name.into(), dtype: format!("{other:?}") });
            }
        };
        Ok(out)
    }
}

/// llama.cpp's Q/K row permutation of a matrix of `rows` rows: Hugging Face's row `to` is the
/// file's row `order[to]` (the file's row `h·hd + 2i + s` is Hugging Face's `h·hd + s·hd/2 +
/// i`). `None` when `rows` does not split into heads of an even size.
fn unpermute_order(rows: usize, heads: usize) -> Option<Vec<usize>> {
    let hd = rows / heads.max(1);
    if heads == 0 || rows % heads != 0 || hd % 2 != 0 {
        return None;
    }
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for s in 0..2 {
                order[h * hd + s * hd / 2 + i] = h * hd + 2 * i + s;
            }
        }
    }
    Some(order)
}

/// Undoes llama.cpp's Q/K row permutation of a `[heads · head_dim, cols]` matrix (or a
/// `[heads · head_dim]` bias), see `unpermute_order`.
fn unpermute(v: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    let rows = shape.first().copied().unwrap_or(0);
    let cols = if shape.len() > 1 { v.len() / rows.max(1) } else { 1 };
    let Some(order) = unpermute_order(rows, heads) else { return v.to_vec() };
    order.iter().flat_map(|&from| &v[from * cols..(from + 1) * cols]).copied().collect()
}

fn describe(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => {
            format!("file of {len} bytes is too small for a safetensors header (truncated?)")
        }
        E::InvalidHeaderLength => {
            format!("header length points past the end of the {len}-byte file (truncated?)")
        }
        E::MetadataIncompleteBuffer => {
            format!("tensor data offsets do not match the {len}-byte file (truncated, or offsets past the end)")
        }
        E::InvalidOffset(t) => format!("tensor `{t}` has invalid data offsets"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's converter: `w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2)`, i.e. its row
    /// `h·hd + 2i + s` is Hugging Face's row `h·hd + s·hd/2 + i`; `unpermute` undoes it for
    /// matrices and biases.
    #[test]
    fn unpermute_undoes_llama_cpp_qk_permutation() {
        let (heads, hd, cols) = (3, 8, 2);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    let (g, f) = (h * hd + 2 * i + s, h * hd + s * hd / 2 + i);
                    gguf[g * cols..(g + 1) * cols].copy_from_slice(&hf[f * cols..(f + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute(&gguf, &[heads * hd, cols], heads), hf);
        let bias: Vec<f32> = (0..heads * hd).map(|r| gguf[r * cols] / cols as f32).collect();
        let want: Vec<f32> = (0..heads * hd).map(|r| r as f32).collect();
        assert_eq!(unpermute(&bias, &[heads * hd], heads), want);
    }
}
