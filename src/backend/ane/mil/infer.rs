//! Type and shape inference of the MIL ops handgrad uses, with coremltools' argument names. The
//! builder infers every type with it, and the simulator checks every declared type of a parsed
//! program against it. (The Python test checks the same programs against coremltools' own
//! inference, so this is not the only source of truth.)

use super::{Arg, DType, Literal, OpKind, Program, TensorType};

/// The ops inference knows, with their arguments: `(name, required)`.
pub const OPS: &[(&str, &[(&str, bool)])] = &[
    (
        "slice_by_size",
        &[("x", true), ("begin", true), ("size", true)],
    ),
    ("reshape", &[("x", true), ("shape", true)]),
    ("transpose", &[("x", true), ("perm", true)]),
    (
        "matmul",
        &[
            ("x", true),
            ("y", true),
            ("transpose_x", false),
            ("transpose_y", false),
        ],
    ),
    ("add", &[("x", true), ("y", true)]),
    ("sub", &[("x", true), ("y", true)]),
    ("mul", &[("x", true), ("y", true)]),
    ("pow", &[("x", true), ("y", true)]),
    ("softmax", &[("x", true), ("axis", false)]),
    (
        "reduce_sum",
        &[("x", true), ("axes", false), ("keep_dims", false)],
    ),
    ("sigmoid", &[("x", true)]),
    (
        "concat",
        &[("values", true), ("axis", true), ("interleave", false)],
    ),
    ("cast", &[("x", true), ("dtype", true)]),
    (
        "quantize",
        &[("input", true), ("scale", true), ("output_dtype", true)],
    ),
    ("dequantize", &[("input", true), ("scale", true)]),
    (
        "conv",
        &[
            ("x", true),
            ("weight", true),
            ("strides", false),
            ("pad_type", false),
            ("pad", false),
            ("dilations", false),
            ("groups", false),
        ],
    ),
];

/// What inference can look up: the types of earlier values and the literals of constants.
pub trait Scope {
    fn ty(&self, name: &str) -> Option<&TensorType>;
    fn literal(&self, name: &str) -> Option<&Literal>;
}

impl Scope for Program {
    fn ty(&self, name: &str) -> Option<&TensorType> {
        self.type_of(name)
    }
    fn literal(&self, name: &str) -> Option<&Literal> {
        match &self.op(name)?.kind {
            OpKind::Const(l) => Some(l),
            OpKind::Call { .. } => None,
        }
    }
}

type R<T> = Result<T, String>;

/// The arguments of one op, checked against the op's signature.
pub struct Args<'a> {
    op: &'a str,
    args: &'a [(String, Arg)],
    scope: &'a dyn Scope,
}

impl<'a> Args<'a> {
    /// Checks names and arity: every required argument once, nothing unknown.
    pub fn new(op: &'a str, args: &'a [(String, Arg)], scope: &'a dyn Scope) -> R<Self> {
        let sig = OPS
            .iter()
            .find(|(n, _)| *n == op)
            .map(|(_, s)| *s)
            .ok_or_else(|| format!("unknown op '{op}'"))?;
        for (i, (name, _)) in args.iter().enumerate() {
            if !sig.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = sig.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "{op}: unknown argument '{name}' (arguments: {})",
                    known.join(", ")
                ));
            }
            if args[..i].iter().any(|(n, _)| n == name) {
                return Err(format!("{op}: argument '{name}' given twice"));
            }
        }
        for (name, required) in sig {
            if *required && !args.iter().any(|(n, _)| n == name) {
                return Err(format!("{op}: missing argument '{name}'"));
            }
        }
        Ok(Args { op, args, scope })
    }

    fn get(&self, name: &str) -> Option<&'a Arg> {
        self.args.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn var(&self, name: &str) -> R<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Arg::Var(v)) => Ok(Some(v.as_str())),
            Some(Arg::Tuple(_)) => Err(format!("{}: '{name}' must be one value", self.op)),
        }
    }

    /// A tensor argument's type.
    pub fn tensor(&self, name: &str) -> R<&'a TensorType> {
        let v = self
            .var(name)?
            .ok_or_else(|| format!("{}: missing argument '{name}'", self.op))?;
        self.scope.ty(v).ok_or_else(|| {
            format!(
                "{}: '{name}' refers to '{v}', which is not defined",
                self.op
            )
        })
    }

    /// A float tensor argument.
    pub fn float(&self, name: &str) -> R<&'a TensorType> {
        let t = self.tensor(name)?;
        if !t.dtype.is_float() {
            return Err(format!(
                "{}: '{name}' must be fp16 or fp32, got {}",
                self.op, t
            ));
        }
        Ok(t)
    }

    fn literal(&self, name: &str) -> R<Option<(&'a TensorType, &'a Literal)>> {
        let Some(v) = self.var(name)? else {
            return Ok(None);
        };
        let ty = self.scope.ty(v).ok_or_else(|| {
            format!(
                "{}: '{name}' refers to '{v}', which is not defined",
                self.op
            )
        })?;
        let lit = self
            .scope
            .literal(v)
            .ok_or_else(|| format!("{}: '{name}' must be a constant", self.op))?;
        Ok(Some((ty, lit)))
    }

    /// Integer parameters (an int32 constant of any rank), if given.
    pub fn ints(&self, name: &str) -> R<Option<Vec<i64>>> {
        match self.literal(name)? {
            None => Ok(None),
            Some((ty, Literal::Ints(v))) if ty.dtype == DType::Int32 => Ok(Some(v.clone())),
            Some((ty, _)) => Err(format!(
                "{}: '{name}' must be an int32 constant, got {ty}",
                self.op
            )),
        }
    }

    /// One integer parameter (an int32 scalar), if given.
    pub fn int(&self, name: &str) -> R<Option<i64>> {
        match self.ints(name)? {
            None => Ok(None),
            Some(v) if v.len() == 1 && self.literal(name)?.is_some_and(|(t, _)| t.rank() == 0) => {
                Ok(Some(v[0]))
            }
            Some(_) => Err(format!("{}: '{name}' must be an int32 scalar", self.op)),
        }
    }

    /// A bool scalar parameter, if given.
    pub fn boolean(&self, name: &str) -> R<Option<bool>> {
        match self.literal(name)? {
            None => Ok(None),
            Some((ty, Literal::Bools(v))) if ty.rank() == 0 && v.len() == 1 => Ok(Some(v[0])),
            Some((ty, _)) => Err(format!(
                "{}: '{name}' must be a bool scalar, got {ty}",
                self.op
            )),
        }
    }

    /// A string parameter, if given.
    pub fn string(&self, name: &str) -> R<Option<&'a str>> {
        match self.literal(name)? {
            None => Ok(None),
            Some((_, Literal::Str(s))) => Ok(Some(s.as_str())),
            Some((ty, _)) => Err(format!("{}: '{name}' must be a string, got {ty}", self.op)),
        }
    }

    /// The values of a tuple argument.
    pub fn tuple(&self, name: &str) -> R<Vec<&'a TensorType>> {
        match self.get(name) {
            Some(Arg::Tuple(vs)) => vs
                .iter()
                .map(|v| {
                    self.scope.ty(v).ok_or_else(|| {
                        format!(
                            "{}: '{name}' refers to '{v}', which is not defined",
                            self.op
                        )
                    })
                })
                .collect(),
            Some(Arg::Var(_)) => Err(format!("{}: '{name}' must be a tuple (a, b, ...)", self.op)),
            None => Err(format!("{}: missing argument '{name}'", self.op)),
        }
    }
}

/// An axis in `[-rank, rank)` as an index.
pub fn axis(op: &str, a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return Err(format!("{op}: axis {a} is outside a rank-{rank} tensor"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(op: &str, a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(format!("{op}: shapes {a:?} and {b:?} do not broadcast"));
            }
        };
    }
    Ok(out)
}

/// The output type of `op` with these arguments.
pub fn infer(op: &str, args: &[(String, Arg)], scope: &dyn Scope) -> R<TensorType> {
    let a = Args::new(op, args, scope)?;
    match op {
        "slice_by_size" => slice_by_size(&a),
        "reshape" => reshape(&a),
        "transpose" => transpose(&a),
        "matmul" => matmul(&a),
        "add" | "sub" | "mul" | "pow" => {
            let (x, y) = (a.float("x")?, a.float("y")?);
            if x.dtype != y.dtype {
                return Err(format!("{op}: x is {x} but y is {y}"));
            }
            Ok(TensorType::new(
                x.dtype,
                &broadcast(op, &x.shape, &y.shape)?,
            ))
        }
        "softmax" => {
            let x = a.float("x")?;
            axis(op, a.int("axis")?.unwrap_or(-1), x.rank())?;
            Ok(x.clone())
        }
        "reduce_sum" => reduce_sum(&a),
        "sigmoid" => Ok(a.float("x")?.clone()),
        "concat" => concat(&a),
        "cast" => {
            let x = a.float("x")?;
            let to = a.string("dtype")?.unwrap_or("");
            let dtype = match to {
                "fp16" => DType::Fp16,
                "fp32" => DType::Fp32,
                other => return Err(format!("cast: dtype '{other}' (fp16 or fp32)")),
            };
            Ok(TensorType::new(dtype, &x.shape))
        }
        "conv" => conv(&a),
        // Per-tensor symmetric quantization (zero point 0), as coremltools' iOS17 ops.
        "quantize" => {
            let x = a.float("input")?;
            let scale = a.float("scale")?;
            if scale.rank() != 0 {
                return Err(format!(
                    "quantize: scale {scale} must be a scalar (per tensor)"
                ));
            }
            match a.string("output_dtype")?.unwrap_or("") {
                "int8" => Ok(TensorType::new(DType::Int8, &x.shape)),
                other => Err(format!("quantize: output_dtype '{other}' (int8)")),
            }
        }
        "dequantize" => {
            let x = a.tensor("input")?;
            let scale = a.float("scale")?;
            if x.dtype != DType::Int8 || scale.rank() != 0 {
                return Err(format!(
                    "dequantize: input {x} must be int8 and scale {scale} a scalar"
                ));
            }
            Ok(TensorType::new(scale.dtype, &x.shape))
        }
        _ => Err(format!("unknown op '{op}'")),
    }
}

fn slice_by_size(a: &Args) -> R<TensorType> {
    let x = a.float("x")?;
    let begin = a.ints("begin")?.unwrap_or_default();
    let size = a.ints("size")?.unwrap_or_default();
    if begin.len() != x.rank() || size.len() != x.rank() {
        return Err(format!(
            "slice_by_size: begin and size need {} entries for {x}",
            x.rank()
        ));
    }
    let mut shape = Vec::with_capacity(x.rank());
    for (i, (&b, &s)) in begin.iter().zip(&size).enumerate() {
        let d = x.shape[i] as i64;
        let s = if s == -1 { d - b } else { s };
        if b < 0 || s < 1 || b + s > d {
            return Err(format!(
                "slice_by_size: axis {i}: begin {b} size {s} is outside {d}"
            ));
        }
        shape.push(s as usize);
    }
    Ok(TensorType::new(x.dtype, &shape))
}

fn reshape(a: &Args) -> R<TensorType> {
    let x = a.float("x")?;
    let shape = a.ints("shape")?.unwrap_or_default();
    let known: i64 = shape.iter().filter(|&&d| d != -1).product();
    let unknown = shape.iter().filter(|&&d| d == -1).count();
    if shape.iter().any(|&d| d == 0 || d < -1) || unknown > 1 {
        return Err(format!("reshape: shape {shape:?} is not valid"));
    }
    let n = x.elements() as i64;
    let dims: Vec<usize> = if unknown == 1 {
        if known == 0 || n % known != 0 {
            return Err(format!("reshape: {x} cannot become {shape:?}"));
        }
        shape
            .iter()
            .map(|&d| {
                if d == -1 {
                    (n / known) as usize
                } else {
                    d as usize
                }
            })
            .collect()
    } else {
        shape.iter().map(|&d| d as usize).collect()
    };
    if dims.iter().product::<usize>() as i64 != n {
        return Err(format!(
            "reshape: {x} has {n} elements, shape {shape:?} has {}",
            dims.iter().product::<usize>()
        ));
    }
    Ok(TensorType::new(x.dtype, &dims))
}

fn transpose(a: &Args) -> R<TensorType> {
    let x = a.float("x")?;
    let perm = a.ints("perm")?.unwrap_or_default();
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() {
        return Err(format!("transpose: perm {perm:?} for {x}"));
    }
    let mut shape = Vec::with_capacity(perm.len());
    for &p in &perm {
        let i = axis("transpose", p, x.rank())?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(format!("transpose: perm {perm:?} is not a permutation"));
        }
        shape.push(x.shape[i]);
    }
    Ok(TensorType::new(x.dtype, &shape))
}

/// The `[rows, cols]` of the last two dimensions of a matmul operand after its transpose.
fn mat_dims(t: &TensorType, transposed: bool) -> (usize, usize) {
    let (r, c) = (t.shape[t.rank() - 2], t.shape[t.rank() - 1]);
    if transposed { (c, r) } else { (r, c) }
}

fn matmul(a: &Args) -> R<TensorType> {
    let (x, y) = (a.float("x")?, a.float("y")?);
    if x.dtype != y.dtype {
        return Err(format!("matmul: x is {x} but y is {y}"));
    }
    if x.rank() < 2 || y.rank() < 2 {
        return Err(format!(
            "matmul: operands must have rank >= 2, got {x} and {y}"
        ));
    }
    let tx = a.boolean("transpose_x")?.unwrap_or(false);
    let ty = a.boolean("transpose_y")?.unwrap_or(false);
    let (m, kx) = mat_dims(x, tx);
    let (ky, n) = mat_dims(y, ty);
    if kx != ky {
        return Err(format!(
            "matmul: inner dimensions differ: {x} (transpose_x {tx}) and {y} (transpose_y {ty})"
        ));
    }
    let mut shape = broadcast("matmul", &x.shape[..x.rank() - 2], &y.shape[..y.rank() - 2])?;
    shape.extend([m, n]);
    Ok(TensorType::new(x.dtype, &shape))
}

fn reduce_sum(a: &Args) -> R<TensorType> {
    let x = a.float("x")?;
    let keep = a.boolean("keep_dims")?.unwrap_or(false);
    let axes: Vec<usize> = match a.ints("axes")? {
        Some(v) => v
            .iter()
            .map(|&ax| axis("reduce_sum", ax, x.rank()))
            .collect::<R<_>>()?,
        None => (0..x.rank()).collect(),
    };
    let mut shape = Vec::new();
    for (i, &d) in x.shape.iter().enumerate() {
        if axes.contains(&i) {
            if keep {
                shape.push(1);
            }
        } else {
            shape.push(d);
        }
    }
    Ok(TensorType::new(x.dtype, &shape))
}

fn concat(a: &Args) -> R<TensorType> {
    let values = a.tuple("values")?;
    let first = values
        .first()
        .ok_or_else(|| "concat: 'values' is empty".to_string())?;
    let ax = axis("concat", a.int("axis")?.unwrap_or(0), first.rank())?;
    if a.boolean("interleave")?.unwrap_or(false) {
        return Err("concat: interleave = true is not supported".into());
    }
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for v in &values {
        if v.dtype != first.dtype || v.rank() != first.rank() {
            return Err(format!("concat: {v} does not match {first}"));
        }
        for (i, (&d, &f)) in v.shape.iter().zip(&first.shape).enumerate() {
            if i != ax && d != f {
                return Err(format!(
                    "concat: {v} does not match {first} outside axis {ax}"
                ));
            }
        }
        shape[ax] += v.shape[ax];
    }
    Ok(TensorType::new(first.dtype, &shape))
}

fn conv(a: &Args) -> R<TensorType> {
    let (x, w) = (a.float("x")?, a.float("weight")?);
    if x.rank() != 4 || w.rank() != 4 || x.dtype != w.dtype {
        return Err(format!(
            "conv: x {x} and weight {w} must be rank-4 of one type"
        ));
    }
    let groups = a.int("groups")?.unwrap_or(1).max(1) as usize;
    if x.shape[1] != w.shape[1] * groups || !w.shape[0].is_multiple_of(groups) {
        return Err(format!(
            "conv: {x} has {} channels, weight {w} with {groups} group(s) needs {}",
            x.shape[1],
            w.shape[1] * groups
        ));
    }
    let strides = a.ints("strides")?.unwrap_or_else(|| vec![1, 1]);
    let dil = a.ints("dilations")?.unwrap_or_else(|| vec![1, 1]);
    let pad = a.ints("pad")?.unwrap_or_else(|| vec![0, 0, 0, 0]);
    let pad_type = a.string("pad_type")?.unwrap_or("valid");
    if strides.len() != 2 || dil.len() != 2 || pad.len() != 4 {
        return Err("conv: strides and dilations need 2 entries, pad 4".into());
    }
    let mut out = vec![x.shape[0], w.shape[0], 0, 0];
    for i in 0..2 {
        let (n, k, s, d) = (
            x.shape[2 + i] as i64,
            w.shape[2 + i] as i64,
            strides[i],
            dil[i],
        );
        if s < 1 || d < 1 {
            return Err("conv: strides and dilations must be positive".into());
        }
        let span = d * (k - 1) + 1;
        let size = match pad_type {
            "valid" => (n - span) / s + 1,
            "custom" => (n + pad[2 * i] + pad[2 * i + 1] - span) / s + 1,
            "same" => (n + s - 1) / s,
            other => return Err(format!("conv: pad_type '{other}' (valid, same or custom)")),
        };
        if size < 1 {
            return Err(format!("conv: the kernel {w} does not fit {x}"));
        }
        out[2 + i] = size as usize;
    }
    Ok(TensorType::new(x.dtype, &out))
}
