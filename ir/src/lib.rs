//! llmc-ir: the graph IR of llmc.
//!
//! A [`Graph`] describes one forward step of a model over `n` tokens. This crate holds the
//! types, the op set and its typing rules, the text form (printer + parser), the verifier, the
//! reference interpreter (the oracle) and the passes.
//!
//! **Architecture invariant:** this crate knows nothing of files, weights or Cranelift.

pub mod error;
pub mod graph;
pub mod interp;
pub mod op;
pub mod passes;
pub mod quant;
pub mod text;
pub mod types;

pub use error::IrError;
pub use graph::{Graph, Node, NodeId};
pub use op::{Act, InputKind, Op, RopeScaling};
pub use types::{DType, Dim, Shape, Type};
