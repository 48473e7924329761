//! A lint of the rules the Neural Engine is known to impose on MIL programs, most of which
//! fail *silently* on the hardware (wrong results, not errors). Each rule names where it was
//! reported; `DESIGN.md` §3 has the list. It runs on every program handgrad emits and on any
//! file with `handgrad ane check FILE.mil`.

use std::fmt;

use super::mil::{Literal, OpKind, Program, ProgramFiles, Target, blob};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// May fail or be slow on some chips or compiler versions.
    Warning,
    /// Known to fail or give wrong results.
    Error,
}

/// One rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub id: &'static str,
    pub title: &'static str,
    /// Who reported it.
    pub source: &'static str,
}

pub const MATMUL_INNER_32: Rule = Rule {
    id: "ANE001",
    title: "matmul inner dimension not a multiple of 32 (results are silently zero)",
    source: "maderix/ANE issues; mechramc/Orion docs/ane_constraints.md",
};
pub const SDPA_MASK: Rule = Rule {
    id: "ANE002",
    title: "scaled_dot_product_attention ignores its mask: decompose it (matmul, add mask, softmax, matmul)",
    source: "mechramc/Orion docs/ane_constraints.md",
};
pub const CONCAT: Rule = Rule {
    id: "ANE003",
    title: "concat is rejected by some compiler versions (Orion on M4 Max) while others accept it (the original on M4)",
    source: "mechramc/Orion docs/ane_constraints.md; maderix/ANE",
};
pub const MANY_IO: Rule = Rule {
    id: "ANE004",
    title: "several inputs or outputs are bound in alphabetical order of their names and need equal surface sizes",
    source: "mechramc/Orion docs/ane_constraints.md",
};
pub const SMALL_SURFACE: Rule = Rule {
    id: "ANE005",
    title: "surfaces under about 48 KB fail at evaluate (pad the sequence, e.g. to 16 or more)",
    source: "mechramc/Orion docs/ane_constraints.md",
};
pub const UNSUPPORTED_OP: Rule = Rule {
    id: "ANE006",
    title: "op not available on the Neural Engine compiler (build gelu from sigmoid/tanh, mul, add, pow)",
    source: "maderix/ANE issues; mechramc/Orion docs/ane_constraints.md",
};
pub const BLOB_OFFSET: Rule = Rule {
    id: "ANE007",
    title: "BLOBFILE offset does not point at a blob's metadata (the offset names the 64-byte metadata, not the data)",
    source: "Core ML MIL storage format (coremltools _BlobStorageWriter)",
};
pub const CAST_IOS16: Rule = Rule {
    id: "ANE008",
    title: "cast is rejected by the M1/M2 compiler (target ios16)",
    source: "maderix/ANE community compatibility reports",
};
pub const SURFACE_SHAPE: Rule = Rule {
    id: "ANE009",
    title: "inputs and outputs must be fp16 surfaces of shape [1, C, 1, S]",
    source: "maderix/ANE (IOSurface layout); DESIGN.md section 3",
};
pub const MANY_BLOBS: Rule = Rule {
    id: "ANE010",
    title: "several blobs in one weight file fail on M1 (one file per constant works everywhere)",
    source: "maderix/ANE community compatibility matrix",
};

pub const UNPROVEN_FORM: Rule = Rule {
    id: "ANE011",
    title: "op form not yet run on the Neural Engine (no program known to run on the chip uses it; the compiler may reject it or compute something else)",
    source: "DESIGN.md section 3: the forms of maderix/ANE training_dynamic/mil_dynamic.h",
};
pub const TILE: Rule = Rule {
    id: "ANE012",
    title: "tile is reported to wedge the device until the process exits (repeat with slice_by_size and concat)",
    source: "DESIGN.md section 3 (reports of people who ran such programs)",
};
pub const CONV_DYNAMIC_WEIGHT: Rule = Rule {
    id: "ANE013",
    title: "conv with a weight that is not a constant: the weight is ignored",
    source: "DESIGN.md section 3 (reports of people who ran such programs)",
};
pub const QUANT_FORM: Rule = Rule {
    id: "ANE014",
    title: "quantize/dequantize exist only in the ios18 form (iOS 17 opset and later)",
    source: "coremltools op definitions (iOS17 quantization ops)",
};
pub const NARROW_INPUT: Rule = Rule {
    id: "ANE015",
    title: "input width under 32 columns reads as garbage (M3 Max); widths should be multiples of 32",
    source: "DESIGN.md section 3 (reports of people who ran such programs)",
};

/// Every rule.
pub const RULES: [Rule; 15] = [
    MATMUL_INNER_32,
    SDPA_MASK,
    CONCAT,
    MANY_IO,
    SMALL_SURFACE,
    UNSUPPORTED_OP,
    BLOB_OFFSET,
    CAST_IOS16,
    SURFACE_SHAPE,
    MANY_BLOBS,
    UNPROVEN_FORM,
    TILE,
    CONV_DYNAMIC_WEIGHT,
    QUANT_FORM,
    NARROW_INPUT,
];

/// Ops known to compile for the Neural Engine (those handgrad uses and their close relatives).
const KNOWN_OPS: &[&str] = &[
    "const",
    "conv",
    "matmul",
    "softmax",
    "reduce_sum",
    "reduce_mean",
    "pow",
    "mul",
    "add",
    "sub",
    "real_div",
    "sigmoid",
    "tanh",
    "relu",
    "slice_by_size",
    "slice_by_index",
    "reshape",
    "transpose",
    "concat",
    "cast",
    "sqrt",
    "rsqrt",
    "exp",
    "scaled_dot_product_attention",
    "quantize",
    "dequantize",
    "tile",
];

/// The smallest surface known to evaluate (bytes).
pub const MIN_SURFACE_BYTES: usize = 48 * 1024;

/// One finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub rule: Rule,
    pub severity: Severity,
    /// The statement (or input/output) concerned.
    pub at: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{sev} {} at {}: {} ({})",
            self.rule.id, self.at, self.message, self.rule.title
        )
    }
}

fn place(p: &Program, name: &str) -> String {
    match p.op(name) {
        Some(op) if op.line > 0 => format!("line {} '{name}'", op.line),
        _ => format!("'{name}'"),
    }
}

/// Checks a program against every rule. `files` gives the weight files (BLOBFILE checks).
pub fn lint(p: &Program, files: &ProgramFiles) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |rule: Rule, severity, at: String, message: String| {
        out.push(Finding {
            rule,
            severity,
            at,
            message,
        })
    };
    // Inputs and outputs: surfaces.
    let mut io_sizes = Vec::new();
    let io: Vec<(&str, Option<&super::mil::TensorType>, &str)> = p
        .inputs
        .iter()
        .map(|(n, t)| (n.as_str(), Some(t), "input"))
        .chain(
            p.outputs
                .iter()
                .map(|n| (n.as_str(), p.type_of(n), "output")),
        )
        .collect();
    for (name, ty, kind) in &io {
        let Some(t) = ty else { continue };
        let ok_shape = t.rank() == 4 && t.shape[0] == 1 && t.shape[2] == 1;
        if !ok_shape || t.dtype != super::mil::DType::Fp16 {
            push(
                SURFACE_SHAPE,
                Severity::Error,
                format!("{kind} '{name}'"),
                format!("{kind} is {t}"),
            );
        }
        let bytes = t.elements() * t.dtype.bytes();
        io_sizes.push((*kind, *name, bytes));
        if *kind == "input" && t.rank() == 4 {
            let w = t.shape[3];
            if w < 32 {
                push(
                    NARROW_INPUT,
                    Severity::Error,
                    format!("input '{name}'"),
                    format!("{w} columns"),
                );
            } else if !w.is_multiple_of(32) {
                push(
                    NARROW_INPUT,
                    Severity::Warning,
                    format!("input '{name}'"),
                    format!("{w} columns is not a multiple of 32"),
                );
            }
        }
        if bytes < MIN_SURFACE_BYTES {
            push(
                SMALL_SURFACE,
                Severity::Error,
                format!("{kind} '{name}'"),
                format!("{bytes} bytes ({t}) is under {MIN_SURFACE_BYTES}"),
            );
        }
    }
    for kind in ["input", "output"] {
        let group: Vec<&(&str, &str, usize)> =
            io_sizes.iter().filter(|(k, _, _)| *k == kind).collect();
        if group.len() > 1 {
            let equal = group.iter().all(|(_, _, b)| *b == group[0].2);
            let mut names: Vec<&str> = group.iter().map(|(_, n, _)| *n).collect();
            names.sort();
            push(
                MANY_IO,
                if equal {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                format!("{kind}s"),
                format!(
                    "{} {kind}s, bound in the order {}{}",
                    group.len(),
                    names.join(", "),
                    if equal { "" } else { "; their sizes differ" }
                ),
            );
        }
    }
    // Statements.
    let mut blob_paths: Vec<&str> = Vec::new();
    for op in &p.ops {
        let at = place(p, &op.name);
        let name = op.op_name();
        if !KNOWN_OPS.contains(&name) {
            push(
                UNSUPPORTED_OP,
                Severity::Error,
                at.clone(),
                format!("op '{name}' is not known to compile for the Neural Engine"),
            );
        }
        match &op.kind {
            OpKind::Const(Literal::Blob { path, offset }) => {
                if blob_paths.contains(&path.as_str()) {
                    push(
                        MANY_BLOBS,
                        Severity::Warning,
                        at.clone(),
                        format!("{path} is used by more than one constant"),
                    );
                }
                blob_paths.push(path);
                match files.blob(path) {
                    None => push(
                        BLOB_OFFSET,
                        Severity::Error,
                        at.clone(),
                        format!("weight file {path} is missing"),
                    ),
                    Some(bytes) => {
                        if let Ok(count) = blob::check_header(bytes)
                            && count > 1
                        {
                            push(
                                MANY_BLOBS,
                                Severity::Warning,
                                at.clone(),
                                format!("{path} holds {count} blobs"),
                            );
                        }
                        if let Err(e) = blob::metadata_at(bytes, *offset) {
                            push(
                                BLOB_OFFSET,
                                Severity::Error,
                                at.clone(),
                                format!("{path}: {e}"),
                            );
                        }
                    }
                }
            }
            OpKind::Const(_) => {}
            OpKind::Call { .. } => match name {
                "matmul" => {
                    let tx = bool_param(p, op.arg("transpose_x"));
                    let x = var_type(p, op.arg("x"));
                    if let Some(x) = x.filter(|t| t.rank() >= 2) {
                        let k = if tx {
                            x.shape[x.rank() - 2]
                        } else {
                            x.shape[x.rank() - 1]
                        };
                        if !k.is_multiple_of(32) {
                            push(
                                MATMUL_INNER_32,
                                Severity::Error,
                                at.clone(),
                                format!("inner dimension {k}"),
                            );
                        }
                    }
                }
                "scaled_dot_product_attention" if op.arg("attn_mask").is_some() => push(
                    SDPA_MASK,
                    Severity::Error,
                    at.clone(),
                    "a mask is given and will be ignored".into(),
                ),
                "concat" => push(
                    CONCAT,
                    Severity::Warning,
                    at.clone(),
                    format!("concat on target {}", p.target),
                ),
                "cast" if p.target == Target::Ios16 => push(
                    CAST_IOS16,
                    Severity::Error,
                    at.clone(),
                    "cast on target ios16".into(),
                ),
                "tile" => push(
                    TILE,
                    Severity::Error,
                    at.clone(),
                    "tile in a program".into(),
                ),
                "conv" => {
                    let constant = match op.arg("weight") {
                        Some(super::mil::Arg::Var(v)) => {
                            matches!(p.op(v).map(|o| &o.kind), Some(OpKind::Const(_)))
                        }
                        _ => false,
                    };
                    if !constant {
                        push(
                            CONV_DYNAMIC_WEIGHT,
                            Severity::Error,
                            at.clone(),
                            "the weight is computed, not a constant".into(),
                        );
                    }
                }
                "quantize" | "dequantize" if p.target != Target::Ios18 => push(
                    QUANT_FORM,
                    Severity::Error,
                    at.clone(),
                    format!("{name} on target {}", p.target),
                ),
                _ => {}
            },
        }
        // The op's form against the forms proven on the chip.
        if let Some((form, false)) = super::forms::form_of(p, op) {
            push(
                UNPROVEN_FORM,
                Severity::Warning,
                at.clone(),
                format!("{form} is not yet run on the Neural Engine"),
            );
        }
    }
    out
}

fn var_type<'a>(
    p: &'a Program,
    arg: Option<&super::mil::Arg>,
) -> Option<&'a super::mil::TensorType> {
    match arg {
        Some(super::mil::Arg::Var(v)) => p.type_of(v),
        _ => None,
    }
}

fn bool_param(p: &Program, arg: Option<&super::mil::Arg>) -> bool {
    match arg {
        Some(super::mil::Arg::Var(v)) => matches!(
            p.op(v).map(|o| &o.kind),
            Some(OpKind::Const(Literal::Bools(b))) if b.first() == Some(&true)
        ),
        _ => false,
    }
}
