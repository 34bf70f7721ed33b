//! `llmc inspect`: what an artifact holds.

use std::path::Path;

use anyhow::Result;
use llmc_runtime::text::Text;
use llmc_runtime::Artifact;
use serde_json::json;

use crate::out::outln;

pub fn inspect(path: &Path, as_json: bool, verify: bool) -> Result<()> {
    let art = Artifact::open(path)?;
    if verify {
        let bad = art.verify_weights();
        if !bad.is_empty() {
            anyhow::bail!(
                "{}: {} weight section(s) do not match their checksums (corrupt): {}",
                path.display(),
                bad.len(),
                bad.join(", ")
            );
        }
    }
    let h = &art.header;
    let params: usize = h.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    let weight_bytes = art.weight_bytes();
    let file_bytes = h.file_size;
    let tok = Text::from_artifact(&art).ok();
    let vocab = tok.as_ref().map(|t| t.vocab_size());
    let layouts: std::collections::BTreeMap<String, usize> = h.tensors.iter().fold(Default::default(), |mut m, t| {
        *m.entry(format!("{}/{:?}", t.dtype, t.layout)).or_default() += 1;
        m
    });
    // the level kernels are compiled for on this host at load (all of them 128-bit Cranelift
    // code; the level picks VNNI/FMA/VEX-EVEX instructions)
    let isa = llmc_compiler::jit::selected_level().map(|l| l.name()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = json!({
        "path": path.display().to_string(),
        "architecture": h.model_type,
        "architectures": h.config.get("architectures"),
        "parameters": params,
        "tensors": h.tensors.len(),
        "weight_bytes": weight_bytes,
        "file_bytes": file_bytes,
        "dtypes": layouts,
        "context": h.max_positions,
        "vocab_size": h.vocab_size,
        "target": {"arch": h.target.arch, "features": h.target.features},
        "isa": isa,
        "tokenizer": vocab.map(|v| json!({"vocab_size": v})),
        "chat_template": h.text.chat_template.is_some(),
        "bos_token_id": h.text.bos_token_id,
        "eos_token_ids": h.text.eos_token_ids,
        "passes": h.passes,
        "kernels": h.program.kernels.len(),
        "kernel_calls_per_token": h.program.calls.len(),
        "format_version": h.format_version,
        "llmc_version": h.llmc_version,
        "verified": verify,
    });
    if as_json {
        outln!("{v}")?;
        return Ok(());
    }
    outln!("{}", path.display())?;
    outln!(
        "  architecture   {} ({})",
        h.model_type,
        h.config.get("architectures").map_or(String::new(), |a| a.to_string())
    )?;
    outln!(
        "  parameters     {:.1} M in {} tensors ({:.1} MB; file {:.1} MB)",
        params as f64 / 1e6,
        h.tensors.len(),
        weight_bytes as f64 / 1e6,
        file_bytes as f64 / 1e6
    )?;
    outln!("  storage        {}", layouts.iter().map(|(k, n)| format!("{n} × {k}")).collect::<Vec<_>>().join(", "))?;
    outln!("  context        {} tokens", h.max_positions)?;
    outln!("  target         {} [{}]", h.target.arch, h.target.features.join(" "))?;
    outln!(
        "  isa            {isa} (the level this host compiles the kernels for; LLMC_ISA=avxvnni|avx2|sse lowers it)"
    )?;
    match vocab {
        Some(v) => {
            outln!("  tokenizer      {v} tokens; bos {:?}, eos {:?}", h.text.bos_token_id, h.text.eos_token_ids)?
        }
        None => outln!("  tokenizer      none (token ids only)")?,
    }
    outln!("  chat template  {}", if h.text.chat_template.is_some() { "yes" } else { "no" })?;
    outln!("  passes         {}", if h.passes.is_empty() { "none".to_string() } else { h.passes.join(", ") })?;
    outln!("  program        {} kernels, {} calls per step", h.program.kernels.len(), h.program.calls.len())?;
    if verify {
        outln!("  checksums      every section verified")?;
    }
    Ok(())
}
