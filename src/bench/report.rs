//! `handgrad bench report`: merges benchmark result files from many machines into one
//! Markdown report, after checking each file — a result that cannot be true (above the
//! measured peak, above the bandwidth roofline, an unverified probe) is left out with the
//! reason.

use std::fmt::Write as _;

use serde_json::Value;

use super::machine::{SCHEMA, SCHEMA_VERSION};
use crate::backend::ane::probe;

/// A file left out of the report, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

fn num(v: &Value, key: &str) -> Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("'{key}' is missing or not a finite number"))
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for p in path {
        match at.get(p) {
            Some(x) => at = x,
            None => return "?",
        }
    }
    at.as_str().unwrap_or("?")
}

/// Checks one result; `Ok` with its kind (`train`, ..., `probe`).
pub fn validate(v: &Value) -> Result<String, String> {
    if v.get("schema").and_then(Value::as_str) == Some(probe::SCHEMA) {
        let mut r: probe::ProbeReport =
            serde_json::from_value(v.clone()).map_err(|e| format!("not a probe result: {e}"))?;
        let rejected = probe::validate(&mut r).map_err(|e| e.to_string())?;
        if let Some(bad) = r.results.iter().find_map(|x| x.rejected.clone()) {
            return Err(format!("{rejected} probe results fail validation: {bad}"));
        }
        return Ok("probe".into());
    }
    if v.get("schema").and_then(Value::as_str) != Some(SCHEMA) {
        return Err(format!(
            "not a handgrad benchmark result (no \"schema\": \"{SCHEMA}\"; write results with --json)"
        ));
    }
    let version = v.get("schema_version").and_then(Value::as_u64).unwrap_or(0);
    if version != SCHEMA_VERSION as u64 {
        return Err(format!(
            "schema version {version}; this build reads {SCHEMA_VERSION}"
        ));
    }
    if v.get("machine").and_then(|m| m.get("cpu_model")).is_none() {
        return Err("no machine description".into());
    }
    let kind = v.get("bench").and_then(Value::as_str).unwrap_or("");
    match kind {
        "train" => {
            let (gflops, peak, mfu) = (num(v, "gflops")?, num(v, "peak_gflops")?, num(v, "mfu")?);
            let flops = num(v, "flops_per_step")?;
            let ms = num(v, "median_ms")?;
            if ms <= 0.0 || gflops <= 0.0 || peak <= 0.0 {
                return Err("times and rates must be positive".into());
            }
            // The figures must follow from each other, and stay below the measured peak.
            let implied = flops / (ms / 1e3) / 1e9;
            if (implied - gflops).abs() > 0.25 * gflops {
                return Err(format!(
                    "{gflops:.1} GFLOP/s reported, but {flops:.3e} FLOP per step at a median {ms:.2} ms is {implied:.1}"
                ));
            }
            if (mfu - gflops / peak).abs() > 1e-6 {
                return Err(format!(
                    "MFU {mfu} is not GFLOP/s / peak = {:.4}",
                    gflops / peak
                ));
            }
            if gflops > peak * 1.05 {
                return Err(format!(
                    "{gflops:.1} GFLOP/s is above the machine's measured peak of {peak:.1}: impossible"
                ));
            }
        }
        "generate" => {
            let frac = num(v, "roofline_fraction")?;
            let decode = num(v, "decode_tokens_per_s")?;
            if decode <= 0.0 {
                return Err("decode speed must be positive".into());
            }
            // Weights must be read once per token: beating the roofline by much means the
            // bandwidth or the bytes per token are wrong.
            if frac > 1.25 {
                return Err(format!(
                    "decoding at {:.0}% of the memory-bandwidth roofline: impossible",
                    100.0 * frac
                ));
            }
            // The prompt's pass against the peak measured with it (results that have both).
            if let (Some(gflops), Some(peak)) = (
                v.get("prefill_gflops").and_then(Value::as_f64),
                v.get("prefill_peak_gflops").and_then(Value::as_f64),
            ) && gflops > peak * 1.05
            {
                return Err(format!(
                    "prefill at {gflops:.1} GFLOP/s is above the machine's measured peak of {peak:.1}: impossible"
                ));
            }
        }
        "matmul" => {
            let int8 = v.get("int8").and_then(Value::as_bool).unwrap_or(false);
            let peak = if int8 {
                // int8 products against the theoretical int8 rate (nothing measures it), as
                // `bench matmul --int8` bounds them (null without an int8 instruction).
                let theo = &v["theoretical"];
                let gops = match theo.get("int8_gops") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(num(theo, "int8_gops")?),
                };
                crate::bench::peak::int8_ceiling(gops, num(theo, "fp32_gflops")?)
            } else {
                num(v, "fp32_peak_gflops")?.max(
                    v.get("bf16_peak_gflops")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0),
                )
            };
            for m in v
                .get("matmuls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let g = num(m, "gflops")?;
                if m.get("verified").and_then(Value::as_bool) == Some(false) {
                    return Err(format!(
                        "a product ({}) failed its check against the f64 product",
                        m.get("weight").and_then(Value::as_str).unwrap_or("?")
                    ));
                }
                if g > peak * 1.05 {
                    return Err(format!(
                        "a product at {g:.1} GFLOP/s is above the measured peak {peak:.1}: impossible"
                    ));
                }
            }
        }
        "latency" => {
            for b in v
                .get("backends")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for p in b
                    .get("points")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let (med, min) = (num(p, "median_ns")?, num(p, "min_ns")?);
                    if !(min > 0.0 && min <= med && med.is_finite()) {
                        return Err(format!(
                            "latency {min} / {med} ns: the fastest call must be positive and no slower than the median"
                        ));
                    }
                }
            }
        }
        "memory" => {
            for p in v
                .get("points")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if num(p, "latency_ns")? <= 0.0 || num(p, "read_gbs_1t")? <= 0.0 {
                    return Err("memory points must be positive".into());
                }
            }
        }
        other => return Err(format!("unknown benchmark '{other}'")),
    }
    Ok(kind.to_string())
}

fn machine(v: &Value) -> String {
    let m = &v["machine"];
    format!(
        "{} ({} cores)",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cores"].as_u64().unwrap_or(0)
    )
}

/// The fastest product of a matmul result (GFLOP/s, int8: GOP/s).
pub fn best_product(v: &Value) -> f64 {
    v["matmuls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["gflops"].as_f64())
        .fold(0.0, f64::max)
}

/// What a matmul result's products compute with: `int8`, or the backend's precision.
pub fn products(v: &Value) -> &str {
    if v["int8"].as_bool() == Some(true) {
        "int8"
    } else {
        text(v, &["backend", "precision"])
    }
}

/// The Markdown report of `files` (`(name, parsed JSON)`), and the files left out.
pub fn report(files: &[(String, Value)]) -> (String, Vec<Rejected>) {
    let mut ok: Vec<(&str, String, &Value)> = Vec::new();
    let mut rejected = Vec::new();
    for (name, v) in files {
        match validate(v) {
            Ok(kind) => ok.push((name, kind, v)),
            Err(reason) => rejected.push(Rejected {
                file: name.clone(),
                reason,
            }),
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "# handgrad benchmark report\n");
    let _ = writeln!(
        md,
        "{} result files, {} accepted, {} rejected. Every accepted figure was checked against the machine's own measured peak or roofline (and probe outputs against the CPU).\n",
        files.len(),
        ok.len(),
        rejected.len()
    );
    let section =
        |md: &mut String, kind: &str, title: &str, head: &str, row: &dyn Fn(&Value) -> String| {
            let rows: Vec<String> = ok
                .iter()
                .filter(|(_, k, _)| k == kind)
                .map(|(_, _, v)| row(v))
                .collect();
            if rows.is_empty() {
                return;
            }
            let _ = writeln!(md, "## {title}\n\n{head}");
            for r in rows {
                let _ = writeln!(md, "{r}");
            }
            md.push('\n');
        };
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    section(
        &mut md,
        "train",
        "Training step",
        "| machine | model | backend | batch x seq | ms / step | tokens/s | GFLOP/s | of the measured peak |\n|---|---|---|---|---|---|---|---|",
        &|v| {
            format!(
                "| {} | {} | {} {} | {} x {} | {:.1} | {:.0} | {:.1} | {:.1}% |",
                machine(v),
                text(v, &["model"]),
                text(v, &["backend", "backend"]),
                text(v, &["backend", "precision"]),
                v["batch"].as_u64().unwrap_or(0),
                v["seq"].as_u64().unwrap_or(0),
                f(v, "median_ms"),
                f(v, "tokens_per_s"),
                f(v, "gflops"),
                100.0 * f(v, "mfu")
            )
        },
    );
    section(
        &mut md,
        "generate",
        "Generation",
        "| machine | model | weights | prefill tokens/s | decode tokens/s | of the bandwidth roofline |\n|---|---|---|---|---|---|",
        &|v| {
            format!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.0}% |",
                machine(v),
                text(v, &["model"]),
                text(v, &["weights"]),
                f(v, "prefill_tokens_per_s"),
                f(v, "decode_tokens_per_s"),
                100.0 * f(v, "roofline_fraction")
            )
        },
    );
    section(
        &mut md,
        "matmul",
        "Matrix products",
        "| machine | products | fp32 peak GFLOP/s | bf16 peak GFLOP/s | best product GFLOP/s (int8: GOP/s) |\n|---|---|---|---|---|",
        &|v| {
            let (best, products) = (best_product(v), products(v));
            format!(
                "| {} | {products} | {:.1} | {} | {:.1} |",
                machine(v),
                f(v, "fp32_peak_gflops"),
                v["bf16_peak_gflops"]
                    .as_f64()
                    .map_or("-".to_string(), |b| format!("{b:.1}")),
                best
            )
        },
    );
    section(
        &mut md,
        "memory",
        "Memory",
        "| machine | latency steps (working set) | largest set: read GB/s, 1 thread / all | latency ns |\n|---|---|---|---|",
        &|v| {
            let steps: Vec<String> = v["cliffs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| format!("{} KB", c["above_bytes"].as_u64().unwrap_or(0) / 1024))
                .collect();
            let last = v["points"]
                .as_array()
                .and_then(|p| p.last())
                .cloned()
                .unwrap_or_default();
            format!(
                "| {} | {} | {:.1} / {:.1} | {:.1} |",
                machine(v),
                steps.join(", "),
                f(&last, "read_gbs_1t"),
                f(&last, "read_gbs_all"),
                f(&last, "latency_ns")
            )
        },
    );
    section(
        &mut md,
        "latency",
        "Per-call latency",
        "| machine | backend | op | size | median us | fastest us |\n|---|---|---|---|---|---|",
        &|v| {
            let mut rows = Vec::new();
            for b in v["backends"].as_array().into_iter().flatten() {
                if let Some(why) = b["unavailable"].as_str() {
                    rows.push(format!(
                        "| {} | {} | not available | {} | | |",
                        machine(v),
                        text(b, &["backend"]),
                        why.replace('|', "\\|")
                    ));
                    continue;
                }
                for p in b["points"].as_array().into_iter().flatten() {
                    rows.push(format!(
                        "| {} | {} | {} | {} | {:.2} | {:.2} |",
                        machine(v),
                        text(b, &["backend"]),
                        text(p, &["op"]),
                        text(p, &["shape"]),
                        f(p, "median_ns") / 1e3,
                        f(p, "min_ns") / 1e3
                    ));
                }
            }
            rows.join("\n")
        },
    );
    section(
        &mut md,
        "probe",
        "Neural Engine probes",
        "| chip | device | probe | best TFLOPS | rated TOPS |\n|---|---|---|---|---|",
        &|v| {
            let best = v["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["tflops"].as_f64())
                .fold(0.0, f64::max);
            format!(
                "| {} | {} | {} | {:.3} | {} |",
                text(v, &["chip"]),
                text(v, &["device"]),
                text(v, &["probe"]),
                best,
                v["rated_tops"]
                    .as_f64()
                    .map_or("unknown".to_string(), |t| t.to_string())
            )
        },
    );
    if !rejected.is_empty() {
        let _ = writeln!(md, "## Rejected\n\n| file | reason |\n|---|---|");
        for r in &rejected {
            let _ = writeln!(md, "| {} | {} |", r.file, r.reason.replace('|', "\\|"));
        }
        md.push('\n');
    }
    (md, rejected)
}
