//! The artifact format, shared by the writer (here) and the loader (runtime).
//!
//! ```text
//! offset 0   magic "LLMCART\0" (8 bytes)
//!        8   format version, u32 little-endian
//!       12   header length H, u64 little-endian
//!       20   CRC-32 of the H header bytes, u32 little-endian
//!       24   header: JSON (`Header`), H bytes (padded with spaces)
//!            ... sections, each starting at a 64-byte aligned offset:
//!            the optimized IR in text form, `tokenizer.json` (if any), then every weight tensor (f32, in the layout its
//!            kernel reads: see `program::Layout`)
//! ```
//! Offsets in the header are absolute. `file_size` must equal the file's length. Every section
//! carries the CRC-32 of its bytes: the IR and tokenizer are checked at every load, the weights
//! by `llmc inspect --verify` (a checksum guards against corruption, not forgery: the loader
//! checks everything it runs against the verified IR either way).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::program::{Layout, Program};

pub const MAGIC: &[u8; 8] = b"LLMCART\0";
/// 6: the q5_1 and q6_k storage types (GGUF K-quants kept as they are), f32 block scales
/// of Q4_K in q4_1. 7: the K types q4_k, q5_k and q6_k keep ggml's super-blocks (i8 block
/// scales, f32 super-block scales in a table per panel). 8: a projection's int8 activations
/// are a count of terms (`quant_q8x2` before the logits). 9: MoE expert kernels know the
/// expert count (they walk the experts, grouping the rows that picked each). 10: the Mamba2
/// mixer is three kernels (conv per channel block, scan per head, gated norm per row). 11: the
/// fused QKV projection finds each row's KV caches in a per-row table (`Arg::KvRows`). 12: the
/// IR's step has a sequence dimension (the `seqs` input, the last operand of every stateful op
/// and of `take_last`, whose rows are `[s, d]`). A bump also retires GGUF artifacts cached by
/// older builds.
pub const FORMAT_VERSION: u32 = 12;
/// Bytes before the JSON header.
pub const PREAMBLE: usize = 24;
/// The largest JSON header a loader reads (the header lists tensors and kernel calls: a few
/// MB for the largest models).
pub const MAX_HEADER: u64 = 64 << 20;
/// Alignment of every section.
pub const ALIGN: u64 = 64;

/// A byte range of the artifact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
    /// CRC-32 of the section's bytes.
    pub crc32: u32,
}

/// One packed weight tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    /// The logical (IR) shape.
    pub shape: Vec<usize>,
    /// How the values are stored (the JIT kernels read this layout in place).
    pub layout: Layout,
    pub offset: u64,
    pub len: u64,
    /// CRC-32 of the stored bytes.
    pub crc32: u32,
}

/// The CPU the artifact was compiled for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub arch: String,
    /// ISA features the compiled code may use (empty: portable).
    pub features: Vec<String>,
}

/// The text side: tokenizer (a section holding `tokenizer.json`), chat template, special
/// tokens and generation defaults. Everything is optional (ids-only models).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

/// The 24 bytes before the header: magic, version, header length and the header's CRC-32.
pub fn preamble(header: &[u8]) -> [u8; PREAMBLE] {
    let mut p = [0u8; PREAMBLE];
    p[..8].copy_from_slice(MAGIC);
    p[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p[12..20].copy_from_slice(&(header.len() as u64).to_le_bytes());
    p[20..24].copy_from_slice(&crc32fast::hash(header).to_le_bytes());
    p
}

/// An artifact's bytes split at its header, for tools and tests that rewrite a header (the
/// checksums are recomputed: what they guard against is corruption, not a forger).
pub struct ArtifactBytes {
    bytes: Vec<u8>,
    header_len: usize,
    ir: Section,
    /// Where the section after the IR starts (the IR may grow up to here).
    ir_room: u64,
}

impl ArtifactBytes {
    pub fn parse(bytes: &[u8]) -> Option<ArtifactBytes> {
        let header_len = u64::from_le_bytes(bytes.get(12..20)?.try_into().ok()?) as usize;
        let h: Header = serde_json::from_slice(bytes.get(PREAMBLE..PREAMBLE.checked_add(header_len)?)?).ok()?;
        let ir_room = h.text.tokenizer.as_ref().map(|t| t.offset).or(h.tensors.first().map(|t| t.offset));
        Some(ArtifactBytes { bytes: bytes.to_vec(), header_len, ir_room: ir_room.unwrap_or(h.file_size), ir: h.ir })
    }

    pub fn header_json(&self) -> &[u8] {
        &self.bytes[PREAMBLE..PREAMBLE + self.header_len]
    }

    pub fn ir_text(&self) -> &[u8] {
        &self.bytes[self.ir.offset as usize..(self.ir.offset + self.ir.len) as usize]
    }

    /// The artifact with `json` as its header (padded with spaces to the reserved room), or
    /// `None` when it does not fit before the IR section.
    pub fn with_header(&self, json: &[u8]) -> Option<Vec<u8>> {
        let room = (self.ir.offset as usize).checked_sub(PREAMBLE)?;
        if json.len() > room {
            return None;
        }
        let mut header = json.to_vec();
        header.resize(room, b' ');
        let mut out = self.bytes.clone();
        out[..PREAMBLE].copy_from_slice(&preamble(&header));
        out[PREAMBLE..PREAMBLE + room].copy_from_slice(&header);
        Some(out)
    }

    /// The artifact with `text` as its IR section and `header_json` as its header, whose IR
    /// section length and checksum are set to match; `None` when either does not fit.
    pub fn with_ir(&self, text: &str, header_json: &[u8]) -> Option<Vec<u8>> {
        if self.ir.offset + text.len() as u64 > self.ir_room {
            return None;
        }
        let mut h: Value = serde_json::from_slice(header_json).ok()?;
        h["ir"]["len"] = text.len().into();
        h["ir"]["crc32"] = crc32fast::hash(text.as_bytes()).into();
        let mut out = self.with_header(&serde_json::to_vec(&h).ok()?)?;
        let start = self.ir.offset as usize;
        out[start..self.ir_room as usize].fill(0);
        out[start..start + text.len()].copy_from_slice(text.as_bytes());
        Some(out)
    }
}
