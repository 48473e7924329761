//! `ane-sim`: a simulator of the MIL programs handgrad emits. It parses the MIL *text* (so the
//! emitter is tested too), checks the type and shape of every statement against
//! `mil::infer`, reads constants from the weight-blob bytes, and runs the program with the
//! numerics of the Neural Engine as far as they are known: every fp16 value is rounded to fp16
//! after each op, while matmul, conv and reduce_sum accumulate in fp32. Anything it does not
//! know fails with a message naming the line and the op.

use std::collections::HashMap;

use super::mil::infer::{self, Args};
use super::mil::parse::parse;
use super::mil::{Arg, DType, Literal, OpKind, Program, ProgramFiles, TensorType, blob};
use crate::backend::cpu::gemm_crate::gemm_crate;
use crate::backend::cpu::matrix::{MatMut, MatRef};

/// A runtime tensor: fp16 values are kept as f32 holding exactly representable values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of a type; fp16 data is rounded to fp16.
    pub fn new(ty: &TensorType, mut data: Vec<f32>) -> Self {
        if ty.dtype == DType::Fp16 {
            round_fp16(&mut data);
        }
        Tensor {
            dtype: ty.dtype,
            shape: ty.shape.clone(),
            data,
        }
    }

    fn ty(&self) -> TensorType {
        TensorType::new(self.dtype, &self.shape)
    }
}

/// Rounds to the nearest fp16 (ties to even; overflow to infinity, as the hardware does).
pub fn round_fp16(xs: &mut [f32]) {
    for x in xs {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Where an op reads a value.
#[derive(Debug, Clone, Copy)]
enum Src {
    Input,
    Value(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Pow,
}

/// One statement, resolved for execution.
#[derive(Debug, Clone)]
enum Step {
    /// A non-float constant (an op parameter): no runtime value.
    Param,
    Const(Tensor),
    Slice {
        x: Src,
        begin: Vec<usize>,
    },
    Reshape {
        x: Src,
    },
    Transpose {
        x: Src,
        perm: Vec<usize>,
    },
    MatMul {
        x: Src,
        y: Src,
        tx: bool,
        ty: bool,
    },
    Binary {
        op: BinOp,
        x: Src,
        y: Src,
    },
    Softmax {
        x: Src,
        axis: usize,
    },
    ReduceSum {
        x: Src,
        axes: Vec<usize>,
    },
    Sigmoid {
        x: Src,
    },
    Concat {
        values: Vec<Src>,
        axis: usize,
    },
    Cast {
        x: Src,
    },
    Conv1x1 {
        x: Src,
        w: Src,
    },
    Quantize {
        x: Src,
        scale: Src,
    },
    Dequantize {
        x: Src,
        scale: Src,
    },
}

/// A checked, runnable program.
#[derive(Debug, Clone)]
pub struct Simulator {
    pub program: Program,
    steps: Vec<Step>,
    output: Src,
}

fn at(p: &Program, i: usize) -> String {
    let op = &p.ops[i];
    if op.line > 0 {
        format!("line {} ('{}' = {})", op.line, op.name, op.op_name())
    } else {
        format!("'{}' = {}", op.name, op.op_name())
    }
}

/// Checks a parsed program: unique names, every value defined before use, every declared type
/// equal to the inferred one, BLOBFILE constants present and matching. Returns the blob
/// constants' values by statement index.
pub fn check(p: &Program, files: &ProgramFiles) -> Result<HashMap<usize, Vec<f32>>, String> {
    let mut defined: HashMap<&str, usize> = HashMap::new();
    for (i, (n, _)) in p.inputs.iter().enumerate() {
        if defined.insert(n.as_str(), i).is_some() {
            return Err(format!("input '{n}' is declared twice"));
        }
    }
    let mut blobs = HashMap::new();
    for (i, op) in p.ops.iter().enumerate() {
        let here = at(p, i);
        if defined.contains_key(op.name.as_str()) {
            return Err(format!("{here}: '{}' is defined twice", op.name));
        }
        match &op.kind {
            OpKind::Const(Literal::Blob { path, offset }) => {
                let bytes = files
                    .blob(path)
                    .ok_or_else(|| format!("{here}: weight file {path} is missing"))?;
                let vals = blob::read_floats(bytes, *offset, op.ty.elements())
                    .map_err(|e| format!("{here}: {path}: {e}"))?;
                blobs.insert(i, vals);
            }
            OpKind::Const(_) => {}
            OpKind::Call { op: kind, args } => {
                for (_, a) in args {
                    let names: Vec<&String> = match a {
                        Arg::Var(v) => vec![v],
                        Arg::Tuple(vs) => vs.iter().collect(),
                    };
                    for v in names {
                        if !defined.contains_key(v.as_str()) {
                            return Err(format!("{here}: '{v}' is used before it is defined"));
                        }
                    }
                }
                let inferred = infer::infer(kind, args, p).map_err(|e| format!("{here}: {e}"))?;
                if inferred != op.ty {
                    return Err(format!(
                        "{here}: declared {} but {kind} gives {inferred}",
                        op.ty
                    ));
                }
            }
        }
        defined.insert(op.name.as_str(), i);
    }
    for o in &p.outputs {
        if !defined.contains_key(o.as_str()) {
            return Err(format!("output '{o}' is not defined"));
        }
    }
    Ok(blobs)
}

impl Simulator {
    /// Parses, checks and prepares a program from its MIL text and weight files.
    pub fn new(files: &ProgramFiles) -> Result<Self, String> {
        let program = parse(&files.text)?;
        Self::from_program(program, files)
    }

    /// Checks and prepares a parsed program.
    pub fn from_program(program: Program, files: &ProgramFiles) -> Result<Self, String> {
        let mut blobs = check(&program, files)?;
        if program.inputs.len() != 1 || program.outputs.len() != 1 {
            return Err(format!(
                "the simulator runs programs of one input and one output ({} and {} here)",
                program.inputs.len(),
                program.outputs.len()
            ));
        }
        let index: HashMap<&str, Src> = program
            .inputs
            .iter()
            .map(|(n, _)| (n.as_str(), Src::Input))
            .chain(
                program
                    .ops
                    .iter()
                    .enumerate()
                    .map(|(i, o)| (o.name.as_str(), Src::Value(i))),
            )
            .collect();
        let src = |name: &str| -> Result<Src, String> {
            index
                .get(name)
                .copied()
                .ok_or_else(|| format!("'{name}' is not defined"))
        };
        let mut steps = Vec::with_capacity(program.ops.len());
        for (i, op) in program.ops.iter().enumerate() {
            let step = match &op.kind {
                OpKind::Const(Literal::Blob { .. }) => {
                    Step::Const(Tensor::new(&op.ty, blobs.remove(&i).unwrap_or_default()))
                }
                OpKind::Const(Literal::Floats(v)) => Step::Const(Tensor::new(&op.ty, v.clone())),
                OpKind::Const(_) => Step::Param,
                OpKind::Call { op: kind, args } => resolve(&program, kind, args, &src)
                    .map_err(|e| format!("{}: {e}", at(&program, i)))?,
            };
            steps.push(step);
        }
        let output = src(&program.outputs[0])?;
        Ok(Simulator {
            program,
            steps,
            output,
        })
    }

    /// The input's type.
    pub fn input_type(&self) -> &TensorType {
        &self.program.inputs[0].1
    }

    /// The output's type.
    pub fn output_type(&self) -> Option<&TensorType> {
        self.program.type_of(&self.program.outputs[0])
    }

    /// Runs the program on one input.
    pub fn run(&self, input: &Tensor) -> Result<Tensor, String> {
        let want = self.input_type();
        if input.dtype != want.dtype || input.shape != want.shape {
            return Err(format!("input is {}, the program takes {want}", input.ty()));
        }
        let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
        for (i, step) in self.steps.iter().enumerate() {
            let get = |s: Src| -> Result<&Tensor, String> {
                match s {
                    Src::Input => Ok(input),
                    Src::Value(j) => values[j].as_ref().ok_or_else(|| {
                        format!("{}: reads a parameter as a tensor", at(&self.program, i))
                    }),
                }
            };
            let ty = &self.program.ops[i].ty;
            let out = match step {
                Step::Param => None,
                Step::Const(t) => Some(t.clone()),
                _ => Some(
                    execute(step, ty, &get)
                        .map_err(|e| format!("{}: {e}", at(&self.program, i)))?,
                ),
            };
            values[i] = out;
        }
        match self.output {
            Src::Input => Ok(input.clone()),
            Src::Value(j) => values[j]
                .take()
                .ok_or_else(|| "the output is a parameter, not a tensor".to_string()),
        }
    }
}

/// Resolves an op's arguments into a step.
fn resolve(
    p: &Program,
    kind: &str,
    args: &[(String, Arg)],
    src: &dyn Fn(&str) -> Result<Src, String>,
) -> Result<Step, String> {
    let a = Args::new(kind, args, p)?;
    let var = |name: &str| -> Result<Src, String> {
        match args.iter().find(|(n, _)| n == name).map(|(_, a)| a) {
            Some(Arg::Var(v)) => src(v),
            _ => Err(format!("{kind}: '{name}' must be one value")),
        }
    };
    let axis_of = |ax: i64, rank: usize| infer::axis(kind, ax, rank);
    Ok(match kind {
        "slice_by_size" => Step::Slice {
            x: var("x")?,
            begin: a
                .ints("begin")?
                .unwrap_or_default()
                .iter()
                .map(|&b| b as usize)
                .collect(),
        },
        "reshape" => Step::Reshape { x: var("x")? },
        "transpose" => {
            let rank = a.tensor("x")?.rank();
            let perm = a.ints("perm")?.unwrap_or_default();
            Step::Transpose {
                x: var("x")?,
                perm: perm
                    .iter()
                    .map(|&p| axis_of(p, rank))
                    .collect::<Result<_, _>>()?,
            }
        }
        "matmul" => Step::MatMul {
            x: var("x")?,
            y: var("y")?,
            tx: a.boolean("transpose_x")?.unwrap_or(false),
            ty: a.boolean("transpose_y")?.unwrap_or(false),
        },
        "add" | "sub" | "mul" | "pow" => Step::Binary {
            op: match kind {
                "add" => BinOp::Add,
                "sub" => BinOp::Sub,
                "mul" => BinOp::Mul,
                _ => BinOp::Pow,
            },
            x: var("x")?,
            y: var("y")?,
        },
        "softmax" => {
            let rank = a.tensor("x")?.rank();
            Step::Softmax {
                x: var("x")?,
                axis: axis_of(a.int("axis")?.unwrap_or(-1), rank)?,
            }
        }
        "reduce_sum" => {
            let rank = a.tensor("x")?.rank();
            let axes = match a.ints("axes")? {
                Some(v) => v
                    .iter()
                    .map(|&x| axis_of(x, rank))
                    .collect::<Result<_, _>>()?,
                None => (0..rank).collect(),
            };
            Step::ReduceSum { x: var("x")?, axes }
        }
        "sigmoid" => Step::Sigmoid { x: var("x")? },
        "quantize" => Step::Quantize {
            x: var("input")?,
            scale: var("scale")?,
        },
        "dequantize" => Step::Dequantize {
            x: var("input")?,
            scale: var("scale")?,
        },
        "concat" => {
            let rank = a.tuple("values")?.first().map_or(0, |t| t.rank());
            let values = match args.iter().find(|(n, _)| n == "values").map(|(_, a)| a) {
                Some(Arg::Tuple(vs)) => vs.iter().map(|v| src(v)).collect::<Result<_, _>>()?,
                _ => return Err("concat: 'values' must be a tuple".into()),
            };
            Step::Concat {
                values,
                axis: axis_of(a.int("axis")?.unwrap_or(0), rank)?,
            }
        }
        "cast" => Step::Cast { x: var("x")? },
        "conv" => {
            let w = a.tensor("weight")?;
            let one = |name: &str, want: &[i64]| -> Result<bool, String> {
                Ok(a.ints(name)?.is_none_or(|v| v == want))
            };
            let simple = w.shape[2] == 1
                && w.shape[3] == 1
                && a.int("groups")?.unwrap_or(1) == 1
                && one("strides", &[1, 1])?
                && one("dilations", &[1, 1])?
                && one("pad", &[0, 0, 0, 0])?;
            if !simple {
                return Err("conv: the simulator runs 1x1 convolutions with stride 1, no padding and one group only".into());
            }
            Step::Conv1x1 {
                x: var("x")?,
                w: var("weight")?,
            }
        }
        other => return Err(format!("the simulator does not know op '{other}'")),
    })
}

/// Runs one step; `ty` is its (checked) output type.
fn execute<'a>(
    step: &Step,
    ty: &TensorType,
    get: &dyn Fn(Src) -> Result<&'a Tensor, String>,
) -> Result<Tensor, String> {
    let data = match step {
        Step::Param | Step::Const(_) => return Err("not an op".into()),
        Step::Slice { x, begin } => {
            let x = get(*x)?;
            gather(
                &x.shape,
                &ty.shape,
                |idx| idx.iter().zip(begin).map(|(i, b)| i + b).collect(),
                &x.data,
            )
        }
        Step::Reshape { x } => get(*x)?.data.clone(),
        Step::Transpose { x, perm } => {
            let x = get(*x)?;
            gather(
                &x.shape,
                &ty.shape,
                |idx| {
                    let mut src = vec![0; idx.len()];
                    for (o, &p) in perm.iter().enumerate() {
                        src[p] = idx[o];
                    }
                    src
                },
                &x.data,
            )
        }
        Step::MatMul { x, y, tx, ty: tyy } => matmul(get(*x)?, get(*y)?, *tx, *tyy, ty),
        Step::Binary { op, x, y } => binary(*op, get(*x)?, get(*y)?, ty),
        Step::Softmax { x, axis } => softmax(get(*x)?, *axis),
        Step::ReduceSum { x, axes } => reduce_sum(get(*x)?, axes, ty),
        Step::Sigmoid { x } => get(*x)?
            .data
            .iter()
            .map(|&v| 1.0 / (1.0 + (-v).exp()))
            .collect(),
        // Round half to even, saturate to int8.
        Step::Quantize { x, scale } => {
            let s = get(*scale)?.data.first().copied().unwrap_or(1.0);
            get(*x)?
                .data
                .iter()
                .map(|&v| (v / s).round_ties_even().clamp(-128.0, 127.0))
                .collect()
        }
        Step::Dequantize { x, scale } => {
            let s = get(*scale)?.data.first().copied().unwrap_or(1.0);
            get(*x)?.data.iter().map(|&v| v * s).collect()
        }
        Step::Concat { values, axis } => {
            let ts: Vec<&Tensor> = values.iter().map(|&v| get(v)).collect::<Result<_, _>>()?;
            concat(&ts, *axis, ty)
        }
        Step::Cast { x } => get(*x)?.data.clone(),
        Step::Conv1x1 { x, w } => conv1x1(get(*x)?, get(*w)?, ty),
    };
    if data.len() != ty.elements() {
        return Err(format!("computed {} values for {ty}", data.len()));
    }
    Ok(Tensor::new(ty, data))
}

/// Output element at multi-index `idx` = input element at `map(idx)`.
fn gather(
    in_shape: &[usize],
    out_shape: &[usize],
    map: impl Fn(&[usize]) -> Vec<usize>,
    data: &[f32],
) -> Vec<f32> {
    let ins = strides(in_shape);
    let n: usize = out_shape.iter().product();
    let mut idx = vec![0usize; out_shape.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let src = map(&idx);
        let off: usize = src.iter().zip(&ins).map(|(a, b)| a * b).sum();
        out.push(data[off]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Strides of `shape` broadcast (aligned right) to `out`: 0 along broadcast dimensions.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < pad || shape[i - pad] == 1 {
                0
            } else {
                s[i - pad]
            }
        })
        .collect()
}

fn binary(op: BinOp, x: &Tensor, y: &Tensor, ty: &TensorType) -> Vec<f32> {
    let (sx, sy) = (
        broadcast_strides(&x.shape, &ty.shape),
        broadcast_strides(&y.shape, &ty.shape),
    );
    let n = ty.elements();
    let f = |a: f32, b: f32| match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Pow => a.powf(b),
    };
    if x.shape == ty.shape && y.shape == ty.shape {
        return x.data.iter().zip(&y.data).map(|(&a, &b)| f(a, b)).collect();
    }
    let mut idx = vec![0usize; ty.rank()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ox: usize = idx.iter().zip(&sx).map(|(a, b)| a * b).sum();
        let oy: usize = idx.iter().zip(&sy).map(|(a, b)| a * b).sum();
        out.push(f(x.data[ox], y.data[oy]));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < ty.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Batched matrix products with broadcast batch dimensions, f32 accumulation.
fn matmul(x: &Tensor, y: &Tensor, tx: bool, ty_: bool, out_ty: &TensorType) -> Vec<f32> {
    let r = out_ty.rank();
    let (m, n) = (out_ty.shape[r - 2], out_ty.shape[r - 1]);
    let (xr, xc) = (x.shape[x.rank_() - 2], x.shape[x.rank_() - 1]);
    let (yr, yc) = (y.shape[y.rank_() - 2], y.shape[y.rank_() - 1]);
    let k = if tx { xr } else { xc };
    let batch = &out_ty.shape[..r - 2];
    let bx = broadcast_strides(&x.shape[..x.rank_() - 2], batch);
    let by = broadcast_strides(&y.shape[..y.rank_() - 2], batch);
    let nb: usize = batch.iter().product();
    let mut out = vec![0f32; nb * m * n];
    let mut idx = vec![0usize; batch.len()];
    for b in 0..nb {
        let ox: usize = idx.iter().zip(&bx).map(|(a, s)| a * s).sum::<usize>() * xr * xc;
        let oy: usize = idx.iter().zip(&by).map(|(a, s)| a * s).sum::<usize>() * yr * yc;
        let xa = &x.data[ox..ox + xr * xc];
        let ya = &y.data[oy..oy + yr * yc];
        let a = if tx {
            MatRef::new(xa, m, k, 1, xc)
        } else {
            MatRef::new(xa, m, k, xc, 1)
        };
        let bm = if ty_ {
            MatRef::new(ya, k, n, 1, yc)
        } else {
            MatRef::new(ya, k, n, yc, 1)
        };
        gemm_crate(
            a,
            bm,
            MatMut::row_major(&mut out[b * m * n..(b + 1) * m * n], m, n),
            false,
            true,
        );
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < batch[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

impl Tensor {
    fn rank_(&self) -> usize {
        self.shape.len()
    }
}

/// `(outer, along, inner)` extents of an axis.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

fn softmax(x: &Tensor, axis: usize) -> Vec<f32> {
    let (outer, len, inner) = around(&x.shape, axis);
    let mut out = x.data.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len)
                .map(|j| x.data[at(j)])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for j in 0..len {
                let e = (x.data[at(j)] - max).exp();
                out[at(j)] = e;
                sum += e;
            }
            for j in 0..len {
                out[at(j)] /= sum;
            }
        }
    }
    out
}

fn reduce_sum(x: &Tensor, axes: &[usize], ty: &TensorType) -> Vec<f32> {
    // Output index of each input element: the reduced axes collapse to 0.
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let ks = strides(&kept);
    let mut out = vec![0f32; ty.elements()];
    let mut idx = vec![0usize; x.rank_()];
    for &v in &x.data {
        let o: usize = idx
            .iter()
            .enumerate()
            .map(|(d, &i)| if axes.contains(&d) { 0 } else { i * ks[d] })
            .sum();
        out[o] += v;
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < x.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

fn concat(ts: &[&Tensor], axis: usize, ty: &TensorType) -> Vec<f32> {
    let (outer, _, inner) = around(&ty.shape, axis);
    let mut out = Vec::with_capacity(ty.elements());
    for o in 0..outer {
        for t in ts {
            let chunk = t.shape[axis] * inner;
            out.extend_from_slice(&t.data[o * chunk..(o + 1) * chunk]);
        }
    }
    out
}

fn conv1x1(x: &Tensor, w: &Tensor, ty: &TensorType) -> Vec<f32> {
    let (nb, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let oc = w.shape[0];
    let hw = h * wd;
    let mut out = vec![0f32; ty.elements()];
    for b in 0..nb {
        gemm_crate(
            MatRef::row_major(&w.data, oc, c),
            MatRef::row_major(&x.data[b * c * hw..(b + 1) * c * hw], c, hw),
            MatMut::row_major(&mut out[b * oc * hw..(b + 1) * oc * hw], oc, hw),
            false,
            true,
        );
    }
    out
}
