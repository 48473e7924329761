//! The op forms proven on the Neural Engine, and the form of every statement of a program.
//!
//! A *form* is an op with the shapes of its use: operand ranks, the batch (leading) dimension,
//! which axes broadcast, transpose flags, the axes sliced or concatenated, the reduced axes. The
//! chip's compiler accepts (and computes correctly) the forms it was shown to handle; reports
//! from people who ran such programs say it rejects or silently mis-computes others, while
//! coremltools, which checks types only, accepts them all.
//!
//! The proven set below is written from the facts in `../shared/DESIGN.md` §3: the forms of the
//! original's ten dynamic-weight kernels (maderix/ANE `training/training_dynamic/mil_dynamic.h`,
//! compiled and run by its users on M1 to M5; 382 statements, 22 forms). It is not derived from
//! handgrad's own programs. Every tensor is rank 4 with N = 1:
//!
//! | op | proven forms |
//! |---|---|
//! | slice_by_size | sliced along axis 1 or along axis 3, never both |
//! | reshape | rank 4 -> rank 4 |
//! | transpose | perm `[0, 1, 3, 2]` |
//! | matmul | rank 4 x rank 4, equal leading dims; transpose_x/y F/F, F/T, T/F |
//! | mul | same shape; the second broadcast along axis 1; a scalar |
//! | add | same shape; the second broadcast along axis 1 |
//! | sub | the second broadcast along axis 3 |
//! | reduce_sum | axes `[3]`, keep_dims |
//! | softmax | axis 3 (-1) |
//! | sigmoid | any |
//! | concat | 1 to 5 values along axis 1, or 2 along axis 3, no interleave |

use std::fmt;

use super::mil::{Arg, Literal, Op, OpKind, Program, TensorType};

/// The form of one statement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Form(pub String);

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The form of a statement and whether it is in the proven set (`None` for constants).
pub fn form_of(p: &Program, op: &Op) -> Option<(Form, bool)> {
    let OpKind::Call { op: name, args } = &op.kind else {
        return None;
    };
    let ty = |a: &str| -> Option<&TensorType> {
        match args.iter().find(|(n, _)| n == a).map(|(_, v)| v) {
            Some(Arg::Var(v)) => p.type_of(v),
            _ => None,
        }
    };
    let ints = |a: &str| -> Option<Vec<i64>> {
        match args.iter().find(|(n, _)| n == a).map(|(_, v)| v) {
            Some(Arg::Var(v)) => match p.op(v).map(|o| &o.kind) {
                Some(OpKind::Const(Literal::Ints(i))) => Some(i.clone()),
                _ => None,
            },
            _ => None,
        }
    };
    let flag = |a: &str| -> Option<bool> {
        match args.iter().find(|(n, _)| n == a).map(|(_, v)| v) {
            Some(Arg::Var(v)) => match p.op(v).map(|o| &o.kind) {
                Some(OpKind::Const(Literal::Bools(b))) => b.first().copied(),
                _ => None,
            },
            _ => None,
        }
    };
    let r4 = |t: &TensorType| t.rank() == 4 && t.shape[0] == 1;
    let rank = |t: Option<&TensorType>| t.map_or("?".to_string(), |t| format!("rank {}", t.rank()));
    let out = &op.ty;
    let (form, proven) = match name.as_str() {
        "slice_by_size" => {
            let x = ty("x");
            let axes: Vec<usize> = x.map_or(Vec::new(), |x| {
                (0..x.rank().min(out.rank()))
                    .filter(|&i| x.shape[i] != out.shape[i])
                    .collect()
            });
            let proven =
                x.is_some_and(r4) && (axes.iter().all(|&a| a == 1) || axes.iter().all(|&a| a == 3));
            (
                format!("slice_by_size({}, along axes {axes:?})", rank(x)),
                proven,
            )
        }
        "reshape" => {
            let x = ty("x");
            (
                format!("reshape({} -> rank {})", rank(x), out.rank()),
                x.is_some_and(r4) && r4(out),
            )
        }
        "transpose" => {
            let perm = ints("perm").unwrap_or_default();
            (
                format!("transpose({}, perm {perm:?})", rank(ty("x"))),
                ty("x").is_some_and(r4) && perm == [0, 1, 3, 2],
            )
        }
        "matmul" => {
            let (x, y) = (ty("x"), ty("y"));
            let (tx, tyf) = (
                flag("transpose_x").unwrap_or(false),
                flag("transpose_y").unwrap_or(false),
            );
            let lead = |t: Option<&TensorType>| {
                t.map_or(Vec::new(), |t| {
                    t.shape[..t.rank().saturating_sub(2)].to_vec()
                })
            };
            let same_lead = lead(x) == lead(y);
            let tf = |b: bool| if b { 'T' } else { 'F' };
            (
                format!(
                    "matmul({} x {}, {} leading dims, transpose {}/{})",
                    rank(x),
                    rank(y),
                    if same_lead { "equal" } else { "broadcast" },
                    tf(tx),
                    tf(tyf)
                ),
                x.is_some_and(r4) && y.is_some_and(r4) && same_lead && !(tx && tyf),
            )
        }
        "mul" | "add" | "sub" | "pow" | "real_div" | "maximum" | "minimum" => {
            let (x, y) = (ty("x"), ty("y"));
            let shape = binary_shape(x, y);
            let proven = x.is_some_and(r4)
                && match (name.as_str(), &shape) {
                    ("mul", Binary::Same | Binary::Scalar) => true,
                    ("mul" | "add", Binary::Broadcast(axes)) => axes == &[1],
                    ("add", Binary::Same) => true,
                    ("sub", Binary::Broadcast(axes)) => axes == &[3],
                    _ => false,
                };
            (format!("{name}({}, {shape})", rank(x)), proven)
        }
        "reduce_sum" => {
            let axes = ints("axes").unwrap_or_default();
            let keep = flag("keep_dims").unwrap_or(false);
            (
                format!(
                    "reduce_sum({}, axes {axes:?}, keep_dims {keep})",
                    rank(ty("x"))
                ),
                ty("x").is_some_and(r4) && (axes == [3] || axes == [-1]) && keep,
            )
        }
        "softmax" => {
            let axis = ints("axis").and_then(|a| a.first().copied());
            (
                format!("softmax({}, axis {})", rank(ty("x")), axis.unwrap_or(0)),
                ty("x").is_some_and(r4) && matches!(axis, Some(3) | Some(-1)),
            )
        }
        "sigmoid" => (
            format!("sigmoid({})", rank(ty("x"))),
            ty("x").is_some_and(r4),
        ),
        "concat" => {
            let values: Vec<&TensorType> = match args.iter().find(|(n, _)| n == "values") {
                Some((_, Arg::Tuple(vs))) => vs.iter().filter_map(|v| p.type_of(v)).collect(),
                _ => Vec::new(),
            };
            let axis = ints("axis").and_then(|a| a.first().copied()).unwrap_or(0);
            let interleave = flag("interleave").unwrap_or(false);
            let n = values.len();
            let all4 = !values.is_empty() && values.iter().all(|t| r4(t));
            let proven = all4
                && !interleave
                && ((axis == 1 && (1..=5).contains(&n)) || ((axis == 3 || axis == -1) && n == 2));
            (
                format!(
                    "concat({n} values of rank {}, axis {axis}{})",
                    values.first().map_or(0, |t| t.rank()),
                    if interleave { ", interleaved" } else { "" }
                ),
                proven,
            )
        }
        other => (
            format!(
                "{other}({})",
                args.iter()
                    .filter_map(|(n, a)| match a {
                        Arg::Var(v) => p
                            .type_of(v)
                            .filter(|t| t.rank() > 0)
                            .map(|t| format!("{n}: rank {}", t.rank())),
                        Arg::Tuple(vs) => Some(format!("{n}: {} values", vs.len())),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            false,
        ),
    };
    Some((Form(form), proven))
}

/// How the operands of an element-wise op meet.
#[derive(Debug, Clone, PartialEq)]
enum Binary {
    Same,
    /// The second operand is a scalar.
    Scalar,
    /// The second operand has size 1 along these axes where the first does not.
    Broadcast(Vec<usize>),
    /// Anything else (the first operand broadcast, ranks differ).
    Other,
}

impl fmt::Display for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Binary::Same => f.write_str("same shape"),
            Binary::Scalar => f.write_str("by a scalar"),
            Binary::Broadcast(a) => write!(f, "second broadcast along axes {a:?}"),
            Binary::Other => f.write_str("other broadcast"),
        }
    }
}

fn binary_shape(x: Option<&TensorType>, y: Option<&TensorType>) -> Binary {
    let (Some(x), Some(y)) = (x, y) else {
        return Binary::Other;
    };
    if y.elements() == 1 && y.rank() <= 1 {
        return Binary::Scalar;
    }
    if x.shape == y.shape {
        return Binary::Same;
    }
    if x.rank() != y.rank() {
        return Binary::Other;
    }
    let mut axes = Vec::new();
    for i in 0..x.rank() {
        if x.shape[i] == y.shape[i] {
            continue;
        }
        if y.shape[i] == 1 {
            axes.push(i);
        } else {
            return Binary::Other;
        }
    }
    Binary::Broadcast(axes)
}

/// Every distinct form of a program with whether it is proven, in order of first use, and
/// the statements of each.
pub fn forms(p: &Program) -> Vec<(Form, bool, Vec<String>)> {
    let mut out: Vec<(Form, bool, Vec<String>)> = Vec::new();
    for op in &p.ops {
        if let Some((f, proven)) = form_of(p, op) {
            match out.iter_mut().find(|(g, _, _)| *g == f) {
                Some((_, _, names)) => names.push(op.name.clone()),
                None => out.push((f, proven, vec![op.name.clone()])),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ane::mil::{Builder, Target, TensorType};

    fn forms_of(
        build: impl FnOnce(&mut Builder, &super::super::mil::build::V),
    ) -> Vec<(String, bool)> {
        let mut b = Builder::new(Target::Ios18);
        let x = b.input("x", TensorType::fp16(&[1, 64, 1, 64])).unwrap();
        build(&mut b, &x);
        let (p, _) = b.finish().unwrap();
        forms(&p).into_iter().map(|(f, ok, _)| (f.0, ok)).collect()
    }

    #[test]
    fn the_proven_forms_pass_and_their_neighbours_do_not() {
        let f = forms_of(|b, x| {
            let s1 = b.slice("s1", x, &[0, 0, 0, 0], &[1, 32, 1, 64]).unwrap();
            let s3 = b.slice("s3", x, &[0, 0, 0, 0], &[1, 64, 1, 32]).unwrap();
            let both = b.slice("both", x, &[0, 0, 0, 0], &[1, 32, 1, 32]).unwrap();
            let r = b.reshape("r", x, &[1, 4, 16, 64]).unwrap();
            let r2 = b.reshape("r2", x, &[64, 64]).unwrap();
            let t = b.transpose("t", &r, &[0, 1, 3, 2]).unwrap();
            let t2 = b.transpose("t2", &r, &[0, 2, 1, 3]).unwrap();
            let m = b.matmul("m", &t, &r, false, false).unwrap();
            let r1 = b.reshape("r1", x, &[1, 1, 64, 64]).unwrap();
            let mb = b.matmul("mb", &r, &r1, false, false).unwrap();
            let p = b.binary_scalar("p", "pow", &r, 2.0).unwrap();
            let red = b.reduce_sum("red", &r, &[3], true).unwrap();
            let mul3 = b.binary("mul3", "mul", &r, &red).unwrap();
            let sub3 = b.binary("sub3", "sub", &r, &red).unwrap();
            let c = b.concat("c", &[s1.clone(), s1], 1).unwrap();
            let c3 = b.concat("c3", &[s3.clone(), s3.clone(), s3], 3).unwrap();
            let _ = (both, r2, t2, m, mb, p, mul3, sub3, c, c3);
            b.output(x).unwrap();
        });
        let proven = |needle: &str| {
            f.iter()
                .find(|(s, _)| s.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} not in {f:?}"))
                .1
        };
        assert!(proven("slice_by_size(rank 4, along axes [1])"));
        assert!(proven("slice_by_size(rank 4, along axes [3])"));
        assert!(!proven("slice_by_size(rank 4, along axes [1, 3])"));
        assert!(proven("reshape(rank 4 -> rank 4)"));
        assert!(!proven("reshape(rank 4 -> rank 2)"));
        assert!(proven("transpose(rank 4, perm [0, 1, 3, 2])"));
        assert!(!proven("transpose(rank 4, perm [0, 2, 1, 3])"));
        assert!(proven("matmul(rank 4 x rank 4, equal"));
        assert!(!proven("matmul(rank 4 x rank 4, broadcast"));
        assert!(!proven("pow("));
        assert!(proven("reduce_sum(rank 4, axes [3], keep_dims true)"));
        assert!(!proven("mul(rank 4, second broadcast along axes [3])"));
        assert!(proven("sub(rank 4, second broadcast along axes [3])"));
        assert!(proven("concat(2 values of rank 4, axis 1)"));
        assert!(!proven("concat(3 values of rank 4, axis 3)"));
    }
}
