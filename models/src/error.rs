//! Errors of the models crate: each names the file, field or tensor at fault.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: larger than the {limit_mib} MiB limit for this file")]
    TooLarge { path: PathBuf, limit_mib: u64 },
    #[error("{path}: not valid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: unknown model_type `{model_type}` (supported: {supported})")]
    UnknownModelType { path: PathBuf, model_type: String, supported: &'static str },
    #[error("{path}: field `{field}`: {msg}")]
    Field { path: PathBuf, field: String, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: invalid GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("no weights found beside {config}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { config: PathBuf },
    #[error("tensor `{name}` is missing from the weights ({files})")]
    MissingTensor { name: String, files: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {dtype}, which llmc cannot read (F32, F16 and BF16 are supported)")]
    TensorDtype { path: PathBuf, name: String, dtype: String },
    #[error("the model's graph would have more than {limit} nodes (too many layers or experts in config.json)")]
    GraphTooLarge { limit: usize },
    #[error("building the graph: {0}")]
    Ir(#[from] llmc_ir::IrError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
