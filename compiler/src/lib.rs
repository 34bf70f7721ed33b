//! llmc-compiler: code generation, shared by the artifact writer (`llmc-writer`) and the
//! runtime: everything here works on a verified graph, never on model files.
//!
//! - `lower`: optimized graph → `Program` (kernel specs, schedule, memory plan);
//! - `pack`: weight layouts the kernels walk;
//! - `kernels`: one Cranelift generator per kernel family; `jit`: the Cranelift module;
//! - `micro`: the wide (AVX-512) micro-kernels projections call for their inner products;
//! - `artifact`: the file format shared by the writer and the runtime.

pub mod artifact;
pub mod jit;
pub mod kernels;
pub mod lower;
pub mod micro;
pub mod pack;
pub mod program;
