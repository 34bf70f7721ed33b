//! `llmc run model.gguf`: a GGUF file is compiled on first use into the cache
//! (`$XDG_CACHE_HOME/llmc`, else `~/.cache/llmc`), keyed by the file's path, size and
//! modification time (and llmc's artifact format and version), and the artifact there is run. The writer renames a complete artifact
//! into place, so an interrupted compile never leaves a half-written cache entry.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// FNV-1a, 64-bit: a cache key that stays the same across llmc builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => Some(PathBuf::from(d).join("llmc")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llmc")),
    }
}

/// The artifact to run for `path`: `path` itself, or for a GGUF file its cached compilation
/// (compiled now if missing; says so on stderr).
pub fn artifact_for(path: &Path) -> Result<PathBuf> {
    if !llmc_models::is_gguf_path(path) {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let abs = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    // the llmc version too: a newer llmc may compile the same file differently within one
    // artifact format
    let key = fnv1a(
        format!(
            "{}\0{}\0{}\0{}\0{}",
            abs.display(),
            meta.len(),
            mtime,
            llmc_compiler::artifact::FORMAT_VERSION,
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );
    let dir = cache_dir().context("no cache folder: set XDG_CACHE_HOME or HOME")?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let art = dir.join(format!("{stem}-{key:016x}.llmc"));
    if art.is_file() {
        return Ok(art);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("llmc: compiling {} into {} (first use)", path.display(), art.display());
    let m = llmc_models::load(path, None)?;
    let pipeline = crate::default_pipeline(m.is_quantized());
    crate::signals::clean_up_on_signal(llmc_writer::temp_path(&art));
    llmc_writer::compile(
        &m,
        &art,
        &pipeline,
        llmc_writer::Storage::Checkpoint,
        llmc_writer::Activations::Q8,
        &mut |_| {},
    )?;
    Ok(art)
}
