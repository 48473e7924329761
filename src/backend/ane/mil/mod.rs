//! MIL, the program language of Core ML and the Apple Neural Engine compiler: a data model of
//! the programs handgrad generates ([`Program`]), a [`Builder`] that infers every type as it
//! goes, a text emitter in the two forms the compiler accepts ([`Target`]), a parser of that
//! text (so the simulator runs what would be sent to the compiler, not the builder's memory),
//! and the weight-blob format of BLOBFILE constants.
//!
//! A program has one function `main` of one or more tensor inputs; each statement defines one
//! value, either a constant (`const()`, with an inline literal or a BLOBFILE reference) or an
//! op whose arguments name earlier values. Op and argument names are those of coremltools' op
//! definitions (`coremltools/converters/mil/mil/ops/defs/iOS15..iOS18`).

pub mod blob;
pub mod build;
pub mod emit;
pub mod infer;
pub mod parse;

use std::fmt;

pub use build::Builder;

/// Which program form to emit: the compiler of M3/M4 and later takes `program(1.3)` with
/// `func main<ios18>`; M1/M2 need `program(1.0)` with `<ios16>`, every scalar spelled as a
/// rank-0 tensor, and no `cast` (reported by the original system's contributors).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// `program(1.3)`, `func main<ios18>` (Apple M3, M4 and later).
    #[default]
    Ios18,
    /// `program(1.0)`, `func main<ios16>` (Apple M1, M2).
    Ios16,
}

impl Target {
    /// The `program(...)` version.
    pub fn program_version(self) -> &'static str {
        match self {
            Target::Ios18 => "1.3",
            Target::Ios16 => "1.0",
        }
    }

    /// The function's opset (`main<...>`).
    pub fn opset(self) -> &'static str {
        match self {
            Target::Ios18 => "ios18",
            Target::Ios16 => "ios16",
        }
    }

    /// The target of a parsed opset name.
    pub fn from_opset(opset: &str) -> Option<Self> {
        match opset {
            "ios18" => Some(Target::Ios18),
            "ios16" => Some(Target::Ios16),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.opset())
    }
}

/// Element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Fp16,
    Fp32,
    Int32,
    /// Quantized values (`quantize` outputs, int8 weight constants).
    Int8,
    Bool,
    Str,
    Uint64,
}

impl DType {
    /// The name in MIL text.
    pub fn name(self) -> &'static str {
        match self {
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
            DType::Int32 => "int32",
            DType::Int8 => "int8",
            DType::Bool => "bool",
            DType::Str => "string",
            DType::Uint64 => "uint64",
        }
    }

    /// The type of a MIL name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "fp16" => DType::Fp16,
            "fp32" => DType::Fp32,
            "int32" => DType::Int32,
            "int8" => DType::Int8,
            "bool" => DType::Bool,
            "string" => DType::Str,
            "uint64" => DType::Uint64,
            _ => return None,
        })
    }

    /// Whether values are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::Fp16 | DType::Fp32)
    }

    /// Bytes per element in a surface or blob (floats).
    pub fn bytes(self) -> usize {
        match self {
            DType::Fp16 => 2,
            DType::Fp32 | DType::Int32 => 4,
            DType::Bool | DType::Int8 => 1,
            DType::Str | DType::Uint64 => 8,
        }
    }
}

/// A tensor type: element type and static shape (rank 0 is a scalar).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: &[usize]) -> Self {
        TensorType {
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// An fp16 tensor.
    pub fn fp16(shape: &[usize]) -> Self {
        Self::new(DType::Fp16, shape)
    }

    /// A scalar.
    pub fn scalar(dtype: DType) -> Self {
        Self::new(dtype, &[])
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "tensor<{}, [{}]>", self.dtype.name(), dims.join(", "))
    }
}

/// A constant's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// Integers (int32, uint64), row-major; one element for a scalar.
    Ints(Vec<i64>),
    /// Floats (fp16 values are exactly representable in fp16), row-major.
    Floats(Vec<f32>),
    Bools(Vec<bool>),
    Str(String),
    /// Data in a weight blob file: `@model_path/weights/NAME.bin` and the offset of the
    /// blob's metadata in it.
    Blob {
        path: String,
        offset: u64,
    },
}

/// An op argument: a value, or a tuple of values (`concat(values = (a, b))`).
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Var(String),
    Tuple(Vec<String>),
}

/// What defines a value.
#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    Const(Literal),
    /// An op with named arguments, in the order written.
    Call {
        op: String,
        args: Vec<(String, Arg)>,
    },
}

/// One statement: `TYPE name = ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub name: String,
    pub ty: TensorType,
    pub kind: OpKind,
    /// 1-based source line (parsed programs; 0 for built ones).
    pub line: usize,
}

impl Op {
    /// The op name (`const` for constants).
    pub fn op_name(&self) -> &str {
        match &self.kind {
            OpKind::Const(_) => "const",
            OpKind::Call { op, .. } => op,
        }
    }

    /// A named argument.
    pub fn arg(&self, name: &str) -> Option<&Arg> {
        match &self.kind {
            OpKind::Call { args, .. } => args.iter().find(|(n, _)| n == name).map(|(_, a)| a),
            OpKind::Const(_) => None,
        }
    }
}

/// A program: one function `main`.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub target: Target,
    pub inputs: Vec<(String, TensorType)>,
    pub ops: Vec<Op>,
    pub outputs: Vec<String>,
}

impl Program {
    /// The statement defining a value.
    pub fn op(&self, name: &str) -> Option<&Op> {
        self.ops.iter().find(|o| o.name == name)
    }

    /// The type of a value (an input or a statement).
    pub fn type_of(&self, name: &str) -> Option<&TensorType> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .or_else(|| self.op(name).map(|o| &o.ty))
    }
}

/// A program with its weight files, as a compiler receives it: MIL text and, for each
/// BLOBFILE path, the file's bytes.
#[derive(Debug, Clone)]
pub struct ProgramFiles {
    pub text: String,
    /// `(path as written in the MIL, e.g. "@model_path/weights/cos.bin", bytes)`.
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl ProgramFiles {
    /// The bytes of a weight file.
    pub fn blob(&self, path: &str) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, b)| b.as_slice())
    }
}

/// The path prefix of weight files.
pub const WEIGHTS_PREFIX: &str = "@model_path/weights/";
