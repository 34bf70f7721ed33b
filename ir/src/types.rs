//! Element types and shapes. Two dimensions are symbolic: `n`, the number of rows (tokens) in a
//! step, and `s`, the number of sequences they belong to (`1 <= s <= n`).

use std::fmt;

/// Element type of a value. Activations are f32; token ids and positions are i32. Weights
/// that kernels read in place may have a storage type (bf16, f16, q8_0, q4_0, q5_0, q4_1, q5_1, q6_k, q4_k, q5_k: see
/// `quant`);
/// they mean the f32 values they dequantize to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    #[default]
    F32,
    F16,
    BF16,
    I32,
    /// Raw bytes (BitNet's packed ternary weights).
    U8,
    /// Weight storage: ggml's 8-bit blocks (see `quant`).
    Q8_0,
    /// Weight storage: ggml's 4-bit blocks (see `quant`).
    Q4_0,
    /// Weight storage: ggml's 5-bit blocks with a scale (see `quant`).
    Q5_0,
    /// Weight storage: 4-bit blocks with a scale and a minimum (ggml's Q4_1; see `quant`).
    Q4_1,
    /// Weight storage: 5-bit blocks with a scale and a minimum (ggml's Q5_1; see `quant`).
    Q5_1,
    /// Weight storage: 6-bit values with a scale per 16 (ggml's Q6_K; see `quant`).
    #[serde(rename = "q6_k")]
    Q6K,
    /// Weight storage: ggml's Q4_K, 4-bit blocks whose scale and minimum are 6-bit integers
    /// times scales shared by 256 values (see `quant`).
    #[serde(rename = "q4_k")]
    Q4K,
    /// Weight storage: ggml's Q5_K, the same with 5-bit values (see `quant`).
    #[serde(rename = "q5_k")]
    Q5K,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q5_0 => "q5_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_1 => "q5_1",
            DType::Q6K => "q6_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            "u8" => DType::U8,
            "q8_0" => DType::Q8_0,
            "q4_0" => DType::Q4_0,
            "q5_0" => DType::Q5_0,
            "q4_1" => DType::Q4_1,
            "q5_1" => DType::Q5_1,
            "q6_k" => DType::Q6K,
            "q4_k" => DType::Q4K,
            "q5_k" => DType::Q5K,
            _ => return None,
        })
    }
}

/// One dimension: the symbolic row count `n`, the symbolic sequence count `s`, or a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    N,
    /// One per sequence of the step (`take_last`'s rows).
    S,
    C(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::N => write!(f, "n"),
            Dim::S => write!(f, "s"),
            Dim::C(c) => write!(f, "{c}"),
        }
    }
}

/// A shape: a list of dims, outermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn rows_n(cols: usize) -> Shape {
        Shape(vec![Dim::N, Dim::C(cols)])
    }
    pub fn vec_n() -> Shape {
        Shape(vec![Dim::N])
    }
    pub fn constant(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::C(d)).collect())
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// The last dim if it is a constant.
    pub fn last_const(&self) -> Option<usize> {
        match self.0.last() {
            Some(Dim::C(c)) => Some(*c),
            _ => None,
        }
    }
    /// Concrete dims for a step of `n` rows of one sequence (`s = 1`).
    pub fn resolve(&self, n: usize) -> Vec<usize> {
        self.resolve_step(n, 1)
    }
    /// Concrete dims for a step of `n` rows of `s` sequences.
    pub fn resolve_step(&self, n: usize, s: usize) -> Vec<usize> {
        self.0
            .iter()
            .map(|d| match d {
                Dim::N => n,
                Dim::S => s,
                Dim::C(c) => *c,
            })
            .collect()
    }
    /// Whether a dim is symbolic (`n` or `s`).
    pub fn is_symbolic(&self) -> bool {
        self.0.iter().any(|d| matches!(d, Dim::N | Dim::S))
    }
    /// Number of elements for a given `n`.
    pub fn numel(&self, n: usize) -> usize {
        self.resolve(n).iter().product()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// The type of a value: dtype and shape, printed as `f32[n, 64]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Shape,
}

impl Type {
    pub fn new(dtype: DType, shape: Shape) -> Type {
        Type { dtype, shape }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype.name(), self.shape)
    }
}
