//! A builder of MIL programs that infers (and so checks) the type of every value as it is
//! added, names every constant after the op and argument it serves (`q_transpose_x`), and
//! stores each fp16 tensor constant in a weight file of its own (one blob per file works on
//! every chip; several per file fail on M1).

use super::blob::BlobWriter;
use super::emit::emit;
use super::infer::infer;
use super::{
    Arg, DType, Literal, Op, OpKind, Program, ProgramFiles, Target, TensorType, WEIGHTS_PREFIX,
};
use crate::error::{Error, Result};

/// A value of the program being built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V(pub String);

impl V {
    fn arg(&self) -> Arg {
        Arg::Var(self.0.clone())
    }
}

/// A constant stored in a weight file.
enum BlobData {
    Fp16(Vec<f32>),
    Int8(Vec<i8>),
}

/// Builds one program.
pub struct Builder {
    prog: Program,
    /// Constants stored in weight files: `(path, values)`.
    blobs: Vec<(String, BlobData)>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::backend("ane", format!("MIL builder: {}", msg.into()))
}

impl Builder {
    /// An empty program for a target.
    pub fn new(target: Target) -> Self {
        Builder {
            prog: Program {
                target,
                inputs: Vec::new(),
                ops: Vec::new(),
                outputs: Vec::new(),
            },
            blobs: Vec::new(),
        }
    }

    /// The type of a value.
    pub fn ty(&self, v: &V) -> Result<&TensorType> {
        self.prog
            .type_of(&v.0)
            .ok_or_else(|| err(format!("'{}' is not defined", v.0)))
    }

    fn check_name(&self, name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(err(format!("'{name}' is not a valid MIL name")));
        }
        if self.prog.type_of(name).is_some() {
            return Err(err(format!("'{name}' is defined twice")));
        }
        Ok(())
    }

    /// A function input.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Result<V> {
        self.check_name(name)?;
        self.prog.inputs.push((name.to_string(), ty));
        Ok(V(name.to_string()))
    }

    fn constant(&mut self, name: &str, ty: TensorType, lit: Literal) -> Result<V> {
        self.check_name(name)?;
        self.prog.ops.push(Op {
            name: name.to_string(),
            ty,
            kind: OpKind::Const(lit),
            line: 0,
        });
        Ok(V(name.to_string()))
    }

    /// An int32 vector constant.
    pub fn ints(&mut self, name: &str, vals: &[i64]) -> Result<V> {
        let ty = TensorType::new(DType::Int32, &[vals.len()]);
        self.constant(name, ty, Literal::Ints(vals.to_vec()))
    }

    /// An int32 scalar constant.
    pub fn int(&mut self, name: &str, v: i64) -> Result<V> {
        self.constant(
            name,
            TensorType::scalar(DType::Int32),
            Literal::Ints(vec![v]),
        )
    }

    /// A bool scalar constant.
    pub fn boolean(&mut self, name: &str, v: bool) -> Result<V> {
        self.constant(
            name,
            TensorType::scalar(DType::Bool),
            Literal::Bools(vec![v]),
        )
    }

    /// A string constant.
    pub fn string(&mut self, name: &str, s: &str) -> Result<V> {
        self.constant(name, TensorType::scalar(DType::Str), Literal::Str(s.into()))
    }

    /// An fp16 scalar constant (rounded to fp16).
    pub fn fp16(&mut self, name: &str, v: f32) -> Result<V> {
        let r = half::f16::from_f32(v).to_f32();
        self.constant(
            name,
            TensorType::scalar(DType::Fp16),
            Literal::Floats(vec![r]),
        )
    }

    /// An fp16 tensor constant, stored in `@model_path/weights/NAME.bin` (values rounded to
    /// fp16 when written).
    pub fn fp16_tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<V> {
        let ty = TensorType::fp16(shape);
        if ty.elements() != data.len() {
            return Err(err(format!(
                "constant '{name}': {} values for {ty}",
                data.len()
            )));
        }
        let path = format!("{WEIGHTS_PREFIX}{name}.bin");
        self.blobs
            .push((path.clone(), BlobData::Fp16(data.to_vec())));
        self.constant(name, ty, Literal::Blob { path, offset: 64 })
    }

    /// An int8 tensor constant, stored in `@model_path/weights/NAME.bin`.
    pub fn int8_tensor(&mut self, name: &str, shape: &[usize], data: &[i8]) -> Result<V> {
        let ty = TensorType::new(DType::Int8, shape);
        if ty.elements() != data.len() {
            return Err(err(format!(
                "constant '{name}': {} values for {ty}",
                data.len()
            )));
        }
        let path = format!("{WEIGHTS_PREFIX}{name}.bin");
        self.blobs
            .push((path.clone(), BlobData::Int8(data.to_vec())));
        self.constant(name, ty, Literal::Blob { path, offset: 64 })
    }

    /// An op; its type is inferred from its arguments.
    pub fn call(&mut self, name: &str, op: &str, args: Vec<(&str, Arg)>) -> Result<V> {
        self.check_name(name)?;
        let args: Vec<(String, Arg)> = args.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
        let ty = infer(op, &args, &self.prog).map_err(|e| err(format!("'{name}': {e}")))?;
        self.prog.ops.push(Op {
            name: name.to_string(),
            ty,
            kind: OpKind::Call {
                op: op.to_string(),
                args,
            },
            line: 0,
        });
        Ok(V(name.to_string()))
    }

    /// `slice_by_size(x, begin, size)`.
    pub fn slice(&mut self, name: &str, x: &V, begin: &[usize], size: &[usize]) -> Result<V> {
        let to = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<_>>();
        let b = self.ints(&format!("{name}_begin"), &to(begin))?;
        let s = self.ints(&format!("{name}_size"), &to(size))?;
        self.call(
            name,
            "slice_by_size",
            vec![("x", x.arg()), ("begin", b.arg()), ("size", s.arg())],
        )
    }

    /// `reshape(x, shape)`.
    pub fn reshape(&mut self, name: &str, x: &V, shape: &[usize]) -> Result<V> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.ints(&format!("{name}_shape"), &dims)?;
        self.call(name, "reshape", vec![("x", x.arg()), ("shape", s.arg())])
    }

    /// `transpose(x, perm)`.
    pub fn transpose(&mut self, name: &str, x: &V, perm: &[usize]) -> Result<V> {
        let p: Vec<i64> = perm.iter().map(|&d| d as i64).collect();
        let p = self.ints(&format!("{name}_perm"), &p)?;
        self.call(name, "transpose", vec![("x", x.arg()), ("perm", p.arg())])
    }

    /// `matmul(x, y, transpose_x, transpose_y)`.
    pub fn matmul(&mut self, name: &str, x: &V, y: &V, tx: bool, ty: bool) -> Result<V> {
        let a = self.boolean(&format!("{name}_transpose_x"), tx)?;
        let b = self.boolean(&format!("{name}_transpose_y"), ty)?;
        self.call(
            name,
            "matmul",
            vec![
                ("x", x.arg()),
                ("y", y.arg()),
                ("transpose_x", a.arg()),
                ("transpose_y", b.arg()),
            ],
        )
    }

    /// An element-wise binary op (`add`, `sub`, `mul`, `pow`) with broadcasting.
    pub fn binary(&mut self, name: &str, op: &str, x: &V, y: &V) -> Result<V> {
        self.call(name, op, vec![("x", x.arg()), ("y", y.arg())])
    }

    /// `x op c` for an fp16 scalar constant `c` (named `NAME_y`).
    pub fn binary_scalar(&mut self, name: &str, op: &str, x: &V, c: f32) -> Result<V> {
        let y = self.fp16(&format!("{name}_y"), c)?;
        self.binary(name, op, x, &y)
    }

    /// `softmax(x, axis)`.
    pub fn softmax(&mut self, name: &str, x: &V, axis: i64) -> Result<V> {
        let a = self.int(&format!("{name}_axis"), axis)?;
        self.call(name, "softmax", vec![("x", x.arg()), ("axis", a.arg())])
    }

    /// `reduce_sum(x, axes, keep_dims)`.
    pub fn reduce_sum(&mut self, name: &str, x: &V, axes: &[i64], keep: bool) -> Result<V> {
        let a = self.ints(&format!("{name}_axes"), axes)?;
        let k = self.boolean(&format!("{name}_keep_dims"), keep)?;
        self.call(
            name,
            "reduce_sum",
            vec![("x", x.arg()), ("axes", a.arg()), ("keep_dims", k.arg())],
        )
    }

    /// `sigmoid(x)`.
    pub fn sigmoid(&mut self, name: &str, x: &V) -> Result<V> {
        self.call(name, "sigmoid", vec![("x", x.arg())])
    }

    /// `concat(values, axis, interleave = false)`.
    pub fn concat(&mut self, name: &str, values: &[V], axis: i64) -> Result<V> {
        let a = self.int(&format!("{name}_axis"), axis)?;
        let i = self.boolean(&format!("{name}_interleave"), false)?;
        let vals = Arg::Tuple(values.iter().map(|v| v.0.clone()).collect());
        self.call(
            name,
            "concat",
            vec![("values", vals), ("axis", a.arg()), ("interleave", i.arg())],
        )
    }

    /// `cast(x, dtype)` (not available on the ios16 target).
    pub fn cast(&mut self, name: &str, x: &V, dtype: DType) -> Result<V> {
        if self.prog.target == Target::Ios16 {
            return Err(err("cast is rejected by the M1/M2 compiler (target ios16)"));
        }
        let d = self.string(&format!("{name}_dtype"), dtype.name())?;
        self.call(name, "cast", vec![("x", x.arg()), ("dtype", d.arg())])
    }

    /// Marks a function output.
    pub fn output(&mut self, v: &V) -> Result<()> {
        self.ty(v)?;
        self.prog.outputs.push(v.0.clone());
        Ok(())
    }

    /// The program, its MIL text and weight files.
    pub fn finish(self) -> Result<(Program, ProgramFiles)> {
        if self.prog.inputs.is_empty() || self.prog.outputs.is_empty() {
            return Err(err("a program needs an input and an output"));
        }
        let text = emit(&self.prog);
        let blobs = self
            .blobs
            .iter()
            .map(|(path, data)| {
                let mut w = BlobWriter::new();
                match data {
                    BlobData::Fp16(v) => w.add_fp16(v),
                    BlobData::Int8(v) => w.add_int8(v),
                };
                (path.clone(), w.into_bytes())
            })
            .collect();
        Ok((self.prog, ProgramFiles { text, blobs }))
    }
}
