//! llmc-compiler: turns a model into an artifact: runs the pass pipeline, packs the weights
//! and writes the file (header, IR text, weights). Cranelift codegen lives here too.

pub mod artifact;
pub mod error;
pub mod write;

pub use error::CompileError;
pub use write::{compile, CompileReport};
