//! Errors of the runtime crate.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an llmc artifact: {msg}")]
    BadArtifact { path: PathBuf, msg: String },
    #[error("{path}: artifact format version {found}, this llmc reads version {expected}; recompile the model")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error(transparent)]
    Ir(#[from] llmc_ir::IrError),
    #[error("the prompt and generation need {need} positions but the context holds {ctx} (use -c to enlarge it, up to {max})")]
    Context { need: usize, ctx: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenId { id: i64, vocab: usize },
    #[error("{0}")]
    Usage(String),
}
