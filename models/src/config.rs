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

/// Checks that a dimension is positive and not absurd.
pub fn check_dim(path: &Path, field: &str, value: usize) -> Result<()> {
    let limit = match field {
        "num_hidden_layers" | "n_layer" | "num_local_experts" => COUNT_LIMIT,
        _ => 1 << 24,
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
        let num = |obj: Option<&Value>, key: &str| obj.and_then(|o| o.get(key)).and_then(Value::as_f64);
        let theta = num(params, "rope_theta").or_else(|| num(Some(v), "rope_theta")).unwrap_or(default_theta as f64);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(field_err(path, "rope_theta", format!("{theta} must be positive")));
        }
        let partial =
            num(params, "partial_rotary_factor").or_else(|| num(Some(v), "partial_rotary_factor")).unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(field_err(path, "partial_rotary_factor", format!("{partial} must be in (0, 1]")));
        }
        let kind = scaling_obj
            .and_then(|o| o.get("rope_type").or_else(|| o.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let field = if params.is_some() { "rope_parameters" } else { "rope_scaling" };
        let need = |key: &str| {
            num(scaling_obj, key)
                .ok_or_else(|| field_err(path, &format!("{field}.{key}"), "missing for this rope_type"))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: need("factor")? as f32 },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")? as f32,
                low_freq_factor: need("low_freq_factor")? as f32,
                high_freq_factor: need("high_freq_factor")? as f32,
                original_max_position: need("original_max_position_embeddings")? as usize,
            },
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
