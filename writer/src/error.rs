//! Errors of the compiler crate.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CompileError {
    #[error(transparent)]
    Model(#[from] llmc_models::ModelError),
    #[error(transparent)]
    Ir(#[from] llmc_ir::IrError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    #[error("JIT: {0}")]
    Jit(String),
    #[error("unknown pass `{0}`")]
    UnknownPass(String),
    /// Evaluating the weight-only parts of the graph at compile time.
    #[error("folding weights: {0}")]
    Materialize(String),
    /// Laying out or serializing the artifact header.
    #[error("artifact header: {0}")]
    Header(String),
    #[error("weight `{tensor}` has a non-finite value ({value}) at element {index}: the checkpoint is corrupt")]
    NonFinite { tensor: String, index: usize, value: f32 },
}
