//! llmc-writer: `llmc compile`. A model folder becomes one artifact file: the pass pipeline
//! runs, weight-only expressions are folded once with the interpreter, the graph is lowered,
//! weights are packed in the layouts the kernels read, and the file is written atomically
//! (temp file + rename, removed on errors and signals).
//!
//! Split from `llmc-compiler` so that the runtime links only what it runs: this crate needs
//! the model readers (`llmc-models`); code generation does not.

pub mod error;
pub mod write;

pub use error::CompileError;
pub use write::{compile, host_target, temp_path, Activations, CompileReport, Progress, Storage};
