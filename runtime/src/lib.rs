//! llmc-runtime: loads an artifact (mmap), runs forward steps over a per-sequence state,
//! samples tokens and drives generation.

pub mod artifact;
pub mod bench;
pub mod error;
pub mod jit_exec;
pub mod perplexity;
pub mod sampler;
pub mod session;
pub mod text;

pub use artifact::Artifact;
pub use error::RuntimeError;
pub use sampler::{Sampler, SamplerConfig};
pub use session::{generate, Backend, Batcher, Engine, Generation, Session};
