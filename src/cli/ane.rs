//! `handgrad ane {emit, check}`: write the ten Neural Engine kernels of a model as MIL programs
//! and weight files (what a Mac compiles), and check a MIL file against the simulator's types
//! and the hardware's known rules.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::backend::ane::kernels::{Kernel, KernelShape, build_all};
use crate::backend::ane::lint::{self, Severity};
use crate::backend::ane::mil::parse::parse;
use crate::backend::ane::mil::{Literal, OpKind, ProgramFiles, Target, WEIGHTS_PREFIX};
use crate::backend::ane::sim;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::util::fsutil::{create_dir_all, write_atomic};

/// The Apple Neural Engine programs.
#[derive(Args, Debug)]
pub struct AneArgs {
    #[command(subcommand)]
    command: AneCommand,
}

#[derive(Subcommand, Debug)]
enum AneCommand {
    /// Write the ten kernels of a model as MIL programs with their weight files, and a README
    /// listing their surfaces.
    Emit {
        /// Model preset or config.json.
        #[arg(long)]
        model: String,
        /// Output folder (one sub-folder per kernel: model.mil and weights/).
        #[arg(long)]
        out: PathBuf,
        /// Sequence length the kernels are compiled for [default: 256, or the model's limit].
        #[arg(long)]
        seq: Option<usize>,
        /// Program form: ios18 (program 1.3; M3, M4 and later) or ios16 (program 1.0; M1, M2).
        #[arg(long, value_enum, default_value_t = Target::Ios18)]
        target: Target,
    },
    /// Check a MIL file: syntax, the type and shape of every statement, weight files, and the
    /// hardware's known rules. Exits non-zero on errors.
    Check {
        /// A MIL text file (its weights are read from `weights/` beside it).
        file: PathBuf,
        /// The folder `@model_path` stands for [default: the file's folder].
        #[arg(long)]
        model_path: Option<PathBuf>,
    },
}

pub fn run(a: AneArgs) -> Result<()> {
    match a.command {
        AneCommand::Emit {
            model,
            out,
            seq,
            target,
        } => emit(&model, &out, seq, target),
        AneCommand::Check { file, model_path } => check(&file, model_path.as_deref()),
    }
}

fn surface(c: usize, w: usize) -> String {
    format!("[1, {c}, 1, {w}] ({:.1} KB)", (c * w * 2) as f64 / 1024.0)
}

fn describe(k: &Kernel) -> String {
    let parts = |v: &[crate::backend::ane::kernels::Slab]| {
        v.iter()
            .map(|s| format!("{} {}", s.name, s.len))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "| {} | {} | {} | {} | {} |",
        k.kind.name(),
        surface(k.input.0, k.input.1),
        parts(&k.input_slabs),
        surface(k.output.0, k.output.1),
        parts(&k.output_slabs)
    )
}

fn emit(model: &str, out: &Path, seq: Option<usize>, target: Target) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(model)?;
    let seq = seq.unwrap_or_else(|| cfg.max_seq_len.min(256));
    if seq == 0 || seq > cfg.max_seq_len {
        return Err(Error::invalid(format!(
            "--seq {seq} must be between 1 and the model's {} positions",
            cfg.max_seq_len
        )));
    }
    let shape = KernelShape {
        dims: cfg.dims(),
        seq,
        target,
    };
    let kernels = build_all(&shape)?;
    create_dir_all(out)?;
    let mut readme = String::new();
    let _ = writeln!(
        readme,
        "# The ten ANE kernels of `{model}` at sequence length {seq}, target {target} (program({}))\n",
        target.program_version()
    );
    let _ = writeln!(
        readme,
        "Written by `handgrad ane emit`. Each folder holds `model.mil` and its `weights/` (one blob per file); `@model_path` is the folder. Inputs carry the activations in their first columns and the weights after them (dynamic weights: no recompile on update); surfaces are fp16 `[1, C, 1, W]`, channel-first, unpadded.\n"
    );
    let _ = writeln!(
        readme,
        "| kernel | input | input columns | output | output channels |\n|---|---|---|---|---|"
    );
    let mut findings = Vec::new();
    for k in &kernels {
        let dir = out.join(k.kind.name());
        create_dir_all(&dir.join("weights"))?;
        write_atomic(&dir.join("model.mil"), |f| {
            std::io::Write::write_all(f, k.files.text.as_bytes())
        })?;
        for (path, bytes) in &k.files.blobs {
            let rel = path.strip_prefix("@model_path/").unwrap_or(path);
            write_atomic(&dir.join(rel), |f| std::io::Write::write_all(f, bytes))?;
        }
        let _ = writeln!(readme, "{}", describe(k));
        for f in lint::lint(&k.program, &k.files) {
            findings.push(format!("- {}: {f}", k.kind.name()));
        }
    }
    let _ = writeln!(readme, "\n## Lint (`handgrad ane check`)\n");
    if findings.is_empty() {
        let _ = writeln!(readme, "No rule fires.");
    } else {
        for f in &findings {
            let _ = writeln!(readme, "{f}");
        }
    }
    write_atomic(&out.join("README.md"), |f| {
        std::io::Write::write_all(f, readme.as_bytes())
    })?;
    println!(
        "wrote {} kernels for {model} (seq {seq}, {target}) to {}; {} lint finding(s), listed in README.md",
        kernels.len(),
        out.display(),
        findings.len()
    );
    Ok(())
}

/// The weight files a program names, read from the folder `@model_path` stands for.
fn read_weights(
    p: &crate::backend::ane::mil::Program,
    model_path: &Path,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for op in &p.ops {
        if let OpKind::Const(Literal::Blob { path, .. }) = &op.kind
            && !out.iter().any(|(q, _)| q == path)
        {
            let rel = path
                .strip_prefix("@model_path/")
                .unwrap_or(path.trim_start_matches(WEIGHTS_PREFIX));
            if let Ok(bytes) = std::fs::read(model_path.join(rel)) {
                out.push((path.clone(), bytes));
            }
        }
    }
    out
}

fn check(file: &Path, model_path: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io("reading", file, e))?;
    let program = parse(&text).map_err(|e| Error::format(file, e))?;
    let dir = model_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| file.parent().map(Path::to_path_buf).unwrap_or_default());
    let files = ProgramFiles {
        text,
        blobs: read_weights(&program, &dir),
    };
    let findings = lint::lint(&program, &files);
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let types = sim::check(&program, &files);
    match &types {
        Ok(_) => println!(
            "types: every statement checks ({} statements, target {})",
            program.ops.len(),
            program.target
        ),
        Err(e) => println!("types: {e}"),
    }
    println!(
        "{}: {errors} error(s), {} warning(s)",
        file.display(),
        findings.len() - errors
    );
    if let Err(e) = types {
        return Err(Error::format(file, e));
    }
    if errors > 0 {
        return Err(Error::format(
            file,
            format!("{errors} hardware rule(s) broken (listed above)"),
        ));
    }
    Ok(())
}
