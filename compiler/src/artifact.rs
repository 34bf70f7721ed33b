//! The artifact format, shared by the writer (here) and the loader (runtime).
//!
//! ```text
//! offset 0   magic "LLMCART\0" (8 bytes)
//!        8   format version, u32 little-endian
//!       12   header length H, u64 little-endian
//!       20   header: JSON (`Header`), H bytes
//!            ... sections, each starting at a 64-byte aligned offset:
//!            the optimized IR in text form, `tokenizer.json` (if any), then every weight tensor (f32, in the layout its
//!            kernel reads: see `program::Layout`)
//! ```
//! Offsets in the header are absolute. `file_size` must equal the file's length.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::program::{Layout, Program};

pub const MAGIC: &[u8; 8] = b"LLMCART\0";
pub const FORMAT_VERSION: u32 = 2;
/// Bytes before the JSON header.
pub const PREAMBLE: usize = 20;
/// Alignment of every section.
pub const ALIGN: u64 = 64;

/// A byte range of the artifact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

/// One packed weight tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    /// The logical (IR) shape.
    pub shape: Vec<usize>,
    /// How the values are stored (the JIT kernels read this layout in place).
    pub layout: Layout,
    pub offset: u64,
    pub len: u64,
}

/// The CPU the artifact was compiled for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Target {
    pub arch: String,
    /// ISA features the compiled code may use (empty: portable).
    pub features: Vec<String>,
}

/// The text side: tokenizer (a section holding `tokenizer.json`), chat template, special
/// tokens and generation defaults. Everything is optional (ids-only models).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TextInfo {
    pub tokenizer: Option<Section>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// `generation_config.json` as the model ships it.
    pub generation: Value,
}

/// The JSON header of an artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    pub llmc_version: String,
    pub model_type: String,
    /// The model's `config.json`, verbatim.
    pub config: Value,
    /// Context length the model was trained for (the default `-c`).
    pub max_positions: usize,
    /// True when positions past `max_positions` cannot be represented (learned positions).
    pub hard_context_limit: bool,
    pub vocab_size: usize,
    pub target: Target,
    /// The passes that produced the stored IR, in order.
    pub passes: Vec<String>,
    pub ir: Section,
    pub text: TextInfo,
    /// The lowered program: kernel specs, schedule, memory plan.
    pub program: Program,
    pub tensors: Vec<TensorEntry>,
    pub file_size: u64,
}

pub fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}
