//! Errors of the IR crate.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum IrError {
    #[error("type error at {node}: {msg}")]
    Type { node: String, msg: String },
    #[error("the graph has a cycle")]
    Cycle,
    #[error("the graph has no outputs")]
    NoOutputs,
    #[error("IR text line {line}: {msg}")]
    Parse { line: usize, msg: String },
    /// The reference interpreter could not run a step (bad input ids, a missing weight ...).
    #[error("interpreter: {0}")]
    Interp(String),
    /// A pass left a graph the verifier rejects (a bug in the pass).
    #[error("after pass {pass}: {source}")]
    Pass { pass: String, source: Box<IrError> },
    /// Lowering to kernels: the graph uses a shape no kernel implements.
    #[error("lowering: {0}")]
    Lower(String),
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {actual:?}, the graph expects {expected:?}")]
    WeightShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("position {pos} is outside the context of {ctx} tokens")]
    ContextOverflow { pos: usize, ctx: usize },
}
