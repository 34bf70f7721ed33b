//! The text side of a model folder: `tokenizer.json`, the chat template (from
//! `tokenizer_config.json` or `chat_template.jinja`), special tokens and the generation
//! defaults of `generation_config.json`. All optional: a folder without a tokenizer still
//! compiles for use with token ids.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{read_json, read_limited, CONFIG_LIMIT, TOKENIZER_LIMIT};
use crate::error::{ModelError, Result};

#[derive(Clone, Debug, Default)]
pub struct TextAssets {
    /// `tokenizer.json`, verbatim.
    pub tokenizer_json: Option<Vec<u8>>,
    pub chat_template: Option<String>,
    /// Special token strings the chat template may use (`bos_token`, `eos_token`).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token_id: Option<i64>,
    /// Every id that ends generation (HF allows a list).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// `generation_config.json`, verbatim (`{}` when absent).
    pub generation: Value,
    /// The files that were read.
    pub files: Vec<PathBuf>,
}

fn ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// A token given as a string or as `{"content": "..."}` (older tokenizer_config.json files).
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextAssets {
    /// Reads whatever text files exist in `dir`; `config` is the model's config.json (its
    /// special token ids are the fallback).
    pub fn load(dir: &Path, config: &Value) -> Result<TextAssets> {
        let mut t = TextAssets { generation: Value::Object(Default::default()), ..Default::default() };
        let tok = dir.join("tokenizer.json");
        if tok.exists() {
            let bytes = read_limited(&tok, TOKENIZER_LIMIT)?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| ModelError::Json { path: tok.clone(), msg: e.to_string() })?;
            t.tokenizer_json = Some(bytes);
            t.files.push(tok);
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.exists() { Some(read_json(&tc_path)?) } else { None };
        if tc.is_some() {
            t.files.push(tc_path);
        }
        if let Some(tc) = &tc {
            t.chat_template = tc.get("chat_template").and_then(Value::as_str).map(str::to_string);
            t.bos_token = token_str(tc.get("bos_token"));
            t.eos_token = token_str(tc.get("eos_token"));
        }
        let jinja = dir.join("chat_template.jinja");
        if t.chat_template.is_none() && jinja.exists() {
            let bytes = read_limited(&jinja, CONFIG_LIMIT)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| ModelError::Config { path: jinja.clone(), msg: "not valid UTF-8".into() })?;
            t.chat_template = Some(text);
            t.files.push(jinja);
        }
        let gc_path = dir.join("generation_config.json");
        if gc_path.exists() {
            t.generation = read_json(&gc_path)?;
            t.files.push(gc_path);
        }
        // Special ids: generation_config.json first (what generate() uses), then config.json.
        let pick = |key: &str| {
            let g = ids(t.generation.get(key));
            if g.is_empty() {
                ids(config.get(key))
            } else {
                g
            }
        };
        t.bos_token_id = pick("bos_token_id").first().copied();
        t.eos_token_ids = pick("eos_token_id");
        t.pad_token_id = pick("pad_token_id").first().copied();
        Ok(t)
    }
}
