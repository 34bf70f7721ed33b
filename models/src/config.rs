//! Reading `config.json` and the pieces shared by every family (RoPE settings, validation).

use std::io::Read;
use std::path::{Path, PathBuf};

use llmc_ir::RopeScaling;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The most bytes read from a config-like JSON or text side file (config.json,
/// tokenizer_config.json, generation_config.json, a shard index, chat_template.jinja).
pub const CONFIG_LIMIT: u64 = 16 << 20;
/// The most bytes read from a tokenizer.json.
pub const TOKENIZER_LIMIT: u64 = 64 << 20;

/// Reads a whole file of at most `limit` bytes. Anything but a regular file (a device such as
/// /dev/zero, a FIFO, a folder) is refused before it is opened, and the read stops one byte
/// past the limit, so a hostile path never makes llmc read without bound.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let io = |source| ModelError::Io { path: path.into(), source };
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(ModelError::NotAFile { path: path.into() });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // Checked again on the open file: the path may have been swapped since.
    if !file.metadata().map_err(io)?.is_file() {
        return Err(ModelError::NotAFile { path: path.into() });
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(ModelError::TooLarge { path: path.into(), limit_mib: limit >> 20 });
    }
    Ok(bytes)
}

/// Reads and parses a config-like JSON file (at most [`CONFIG_LIMIT`] bytes).
pub fn read_json(path: &Path) -> Result<Value> {
    let text = read_limited(path, CONFIG_LIMIT)?;
    serde_json::from_slice(&text).map_err(|e| ModelError::Json { path: path.into(), msg: e.to_string() })
}

/// Deserializes a family's typed config from the raw JSON; serde's message names the field.
pub fn typed<T: DeserializeOwned>(path: &Path, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| ModelError::Config { path: path.into(), msg: e.to_string() })
}

/// The most layers or experts a config may ask for. The graph is built before any weight is
/// read, with nodes per layer and per expert, so a tiny config must not be able to ask for
/// millions of them. (Real models have at most a few hundred of each.)
pub const COUNT_LIMIT: usize = 1024;

/// Checks that a dimension is positive and not absurd: sizes up to 2^24 (the IR's bound),
/// layer and expert counts up to `COUNT_LIMIT`.
pub fn check_dim(path: &Path, field: &str, value: usize) -> Result<()> {
    let limit = match field {
        "num_hidden_layers" | "n_layer" | "num_layers" | "num_local_experts" => COUNT_LIMIT,
        _ => llmc_ir::op::MAX_DIM,
    };
    if value == 0 || value > limit {
        return Err(ModelError::Field {
            path: path.into(),
            field: field.into(),
            msg: format!("{value} is not a valid size (must be 1..={limit})"),
        });
    }
    Ok(())
}

/// `check_dim` for each `(field, value)`: the first bad one is the error.
pub fn check_dims(path: &Path, dims: &[(&str, usize)]) -> Result<()> {
    dims.iter().try_for_each(|&(field, value)| check_dim(path, field, value))
}

/// serde defaults shared by the family configs (`#[serde(default = "...")]` needs a path).
pub mod defaults {
    pub fn eps_1e5() -> f64 {
        1e-5
    }
    pub fn eps_1e6() -> f64 {
        1e-6
    }
    pub fn max_pos_2048() -> usize {
        2048
    }
}

/// Attention heads must split `hidden` evenly and be a whole number of kv groups.
pub fn check_heads(path: &Path, hidden: usize, heads: usize, kv_heads: usize) -> Result<()> {
    if !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
        return Err(field_err(
            path,
            "num_key_value_heads",
            "heads must divide hidden_size and be a multiple of kv heads",
        ));
    }
    Ok(())
}

pub fn field_err(path: &Path, field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Field { path: path.into(), field: field.into(), msg: msg.into() }
}

/// RoPE settings, from either dialect: transformers 5 `rope_parameters` or the older top-level
/// `rope_theta` + `rope_scaling`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    pub scaling: RopeScaling,
    pub partial_rotary_factor: f32,
}

impl RopeParams {
    pub fn from_config(path: &Path, v: &Value, default_theta: f32) -> Result<RopeParams> {
        let params = v.get("rope_parameters").filter(|p| p.is_object());
        let scaling_obj = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
        // A key that is present must be a number (`"rope_theta": "abc"` is an error, not the
        // default).
        let num = |obj: Option<&Value>, key: &str, field: &str| -> Result<Option<f64>> {
            match obj.and_then(|o| o.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| field_err(path, field, format!("{x} is not a number"))),
            }
        };
        let theta = match num(params, "rope_theta", "rope_parameters.rope_theta")? {
            Some(t) => t,
            None => num(Some(v), "rope_theta", "rope_theta")?.unwrap_or(default_theta as f64),
        };
        if !(theta.is_finite() && theta > 0.0 && theta < f32::MAX as f64) {
            return Err(field_err(path, "rope_theta", format!("{theta} must be positive")));
        }
        let partial = match num(params, "partial_rotary_factor", "rope_parameters.partial_rotary_factor")? {
            Some(p) => p,
            None => num(Some(v), "partial_rotary_factor", "partial_rotary_factor")?.unwrap_or(1.0),
        };
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(field_err(path, "partial_rotary_factor", format!("{partial} must be in (0, 1]")));
        }
        let kind = scaling_obj
            .and_then(|o| o.get("rope_type").or_else(|| o.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let field = if params.is_some() { "rope_parameters" } else { "rope_scaling" };
        // Scaling factors: finite and positive (a factor of 0 gives NaN angles).
        let need = |key: &str| -> Result<f32> {
            let name = format!("{field}.{key}");
            let x =
                num(scaling_obj, key, &name)?.ok_or_else(|| field_err(path, &name, "missing for this rope_type"))?;
            if !(x.is_finite() && x > 0.0 && x < f32::MAX as f64) {
                return Err(field_err(path, &name, format!("{x} must be finite and positive")));
            }
            Ok(x as f32)
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: need("factor")? },
            "llama3" => {
                let orig = need("original_max_position_embeddings")?;
                if orig.fract() != 0.0 || orig as f64 > llmc_ir::op::MAX_DIM as f64 {
                    return Err(field_err(
                        path,
                        &format!("{field}.original_max_position_embeddings"),
                        format!("{orig} must be a whole number of positions"),
                    ));
                }
                let s = RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position: orig as usize,
                };
                s.check().map_err(|msg| field_err(path, field, msg))?;
                s
            }
            other => {
                return Err(field_err(path, &format!("{field}.rope_type"), format!("`{other}` is not supported yet")));
            }
        };
        Ok(RopeParams { theta: theta as f32, scaling, partial_rotary_factor: partial as f32 })
    }
}

/// Resolves a user-given path (a config file or a model folder) to the config file.
pub fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    }
}
