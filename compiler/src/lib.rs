//! llmc-compiler: turns a model into an artifact and its kernels into native code.
//!
//! - `lower`: optimized graph → `Program` (kernel specs, schedule, memory plan);
//! - `pack`: weight layouts the kernels walk;
//! - `kernels`: one Cranelift generator per kernel family; `jit`: the Cranelift module;
//! - `write`: the artifact writer (atomic), `artifact`: the format shared with the runtime.

pub mod artifact;
pub mod error;
pub mod jit;
pub mod kernels;
pub mod lower;
pub mod pack;
pub mod program;
pub mod write;

pub use error::CompileError;
pub use write::{compile, temp_path, CompileReport, Progress};
