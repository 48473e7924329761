//! `handgrad bench report` on recorded result files: the golden Markdown, impossible or
//! unverified results rejected with the reason, and the result envelope's round trip.
//! `HANDGRAD_UPDATE_GOLDEN=1` rewrites `tests/golden/bench/report.md`.

mod common;

use handgrad::bench::machine::{Envelope, MachineInfo};
use handgrad::bench::report::{report, validate};

fn load(name: &str) -> (String, serde_json::Value) {
    let p = common::repo(&format!("tests/data/bench/{name}"));
    let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    (name.to_string(), v)
}

#[test]
fn the_report_of_recorded_results_matches_the_golden_markdown() {
    let files: Vec<_> = [
        "train.json",
        "generate.json",
        "memory.json",
        "latency.json",
        "probe_fake.json",
        "train_above_peak.json",
        "generate_above_roofline.json",
        "bare_numbers.json",
        "probe_94_tflops.json",
    ]
    .iter()
    .map(|n| load(n))
    .collect();
    let (md, rejected) = report(&files);
    let why: Vec<(&str, &str)> = rejected
        .iter()
        .map(|r| (r.file.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 4, "{why:?}");
    assert!(
        why[0].1.contains("above the machine's measured peak"),
        "{why:?}"
    );
    assert!(
        why[1].1.contains("300% of the memory-bandwidth roofline"),
        "{why:?}"
    );
    assert!(
        why[2].1.contains("not a handgrad benchmark result"),
        "{why:?}"
    );
    assert!(
        why[3].1.contains("above the chip's rated 38 TOPS"),
        "{why:?}"
    );
    let golden = common::repo("tests/golden/bench/report.md");
    if std::env::var("HANDGRAD_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &md).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(
        md, want,
        "the report changed (HANDGRAD_UPDATE_GOLDEN=1 to accept)"
    );
}

#[test]
fn a_figure_that_does_not_follow_from_the_time_is_rejected() {
    let (_, mut v) = load("train.json");
    v["gflops"] = (v["gflops"].as_f64().unwrap() * 3.0).into();
    v["mfu"] = (v["gflops"].as_f64().unwrap() / v["peak_gflops"].as_f64().unwrap()).into();
    let e = validate(&v).unwrap_err();
    assert!(e.contains("GFLOP/s reported, but"), "{e}");
    let (_, mut v) = load("train.json");
    v["schema_version"] = 7.into();
    assert!(validate(&v).unwrap_err().contains("schema version 7"));
}

#[test]
fn a_prefill_above_its_measured_peak_is_rejected() {
    let (_, mut v) = load("generate.json");
    v["prefill_gflops"] = 250.0.into();
    v["prefill_peak_gflops"] = 460.0.into();
    validate(&v).unwrap();
    v["prefill_gflops"] = 600.0.into();
    let e = validate(&v).unwrap_err();
    assert!(e.contains("prefill at 600.0 GFLOP/s is above"), "{e}");
}

#[test]
fn results_round_trip_through_the_envelope() {
    let (_, v) = load("generate.json");
    let e: Envelope<serde_json::Value> = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(e.bench, "generate");
    let m: MachineInfo = e.machine.clone();
    assert!(m.cores >= 1);
    let back = serde_json::to_value(&e).unwrap();
    assert_eq!(back, v);
}

#[test]
fn the_cli_writes_the_report_and_names_what_it_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::repo("tests/data/bench");
    let o = common::handgrad(
        &[
            "bench",
            "report",
            data.join("train.json").to_str().unwrap(),
            data.join("train_above_peak.json").to_str().unwrap(),
            "-o",
            "r.md",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("train_above_peak.json left out"),
        "{}",
        o.stderr
    );
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(md.contains("## Training step") && md.contains("## Rejected"));
    // Charts beside the report, linked from it (where a font is installed).
    if handgrad::plot::find_font().is_some() {
        assert!(
            md.contains("![Training step throughput](r-train.png)"),
            "{md}"
        );
        let png = std::fs::read(dir.path().join("r-train.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
    } else {
        common::skip("no TrueType font: report charts not checked");
    }
    let o = common::handgrad(
        &[
            "bench",
            "report",
            data.join("bare_numbers.json").to_str().unwrap(),
            "-o",
            "x.md",
        ],
        dir.path(),
    );
    assert_ne!(o.code, 0);
}

/// Kernels whose forward product forgets the last input column.
struct WrongProduct;

impl handgrad::backend::Kernels for WrongProduct {
    fn linear_forward(
        &self,
        y: &mut [f32],
        x: &[f32],
        w: handgrad::backend::Matrix,
        rows: usize,
    ) -> handgrad::Result<()> {
        let (n, k) = (w.rows, w.cols);
        for r in 0..rows {
            for o in 0..n {
                y[r * n + o] = (0..k - 1).map(|i| x[r * k + i] * w.f32[o * k + i]).sum();
            }
        }
        Ok(())
    }
}

#[test]
fn every_product_is_checked_before_it_is_reported() {
    let shapes = vec![("w".to_string(), 48, 40)];
    let cpu = handgrad::backend::Backend::default().kernels().unwrap();
    let good = handgrad::bench::matmul::run_shapes(cpu.as_ref(), &shapes, 17, 1, false).unwrap();
    assert!(good.iter().all(|r| r.verified), "{good:?}");
    let bad = handgrad::bench::matmul::run_shapes(&WrongProduct, &shapes, 17, 1, false).unwrap();
    assert!(
        !bad[0].verified && bad[0].max_rel_err > 1e-3,
        "{:?}",
        bad[0]
    );
    assert!(bad[1].verified && bad[2].verified);
}

#[test]
fn the_matmul_sweep_on_a_tiny_model_verifies_every_result() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::handgrad(
        &[
            "bench",
            "matmul",
            "--model",
            "tiny",
            "--rows",
            "8",
            "--sweep",
            "--threads",
            "2",
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let sweep = v["sweep"].as_array().unwrap();
    assert!(sweep.len() >= 2 * 15, "{}", sweep.len());
    assert!(
        sweep
            .iter()
            .all(|r| r["result"]["verified"] == true && r["rejected"].is_null())
    );
    let theo = &v["theoretical"];
    assert!(theo["fp32_gflops"].as_f64().unwrap() > 0.0);
    if !theo["int8_gops"].is_null() {
        assert!(
            sweep.iter().any(|r| r["precision"] == "int8"),
            "no int8 rows"
        );
    }
    assert!(theo["assumptions"].as_str().unwrap().contains("FMA units"));
}

#[test]
fn a_latency_faster_than_its_fastest_call_is_rejected() {
    let (_, mut v) = load("latency.json");
    assert_eq!(validate(&v).unwrap(), "latency");
    v["backends"][0]["points"][0]["min_ns"] = 1e9.into();
    let e = validate(&v).unwrap_err();
    assert!(e.contains("no slower than the median"), "{e}");
}

#[test]
fn int8_products_and_latencies_are_measured_checked_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::handgrad(
        &[
            "bench",
            "matmul",
            "--int8",
            "--shapes",
            "64:96,128:32",
            "--rows",
            "5",
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let m = v["matmuls"].as_array().unwrap();
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|r| r["verified"] == true), "{m:?}");
    assert_eq!(
        (m[0]["k"].as_u64(), m[0]["n"].as_u64()),
        (Some(64), Some(96))
    );
    assert_eq!(validate(&v).unwrap(), "matmul");
    // Without an int8 instruction (the portable loop: every aarch64 CPU) there is no
    // theoretical int8 rate: the ceiling is twice the fp32 one, as `bench matmul` prints it.
    let mut portable = v.clone();
    portable["theoretical"]["int8_gops"] = serde_json::Value::Null;
    assert_eq!(validate(&portable).unwrap(), "matmul");
    let fp32 = portable["theoretical"]["fp32_gflops"].as_f64().unwrap();
    portable["matmuls"][0]["gflops"] = (2.2 * fp32).into();
    let e = validate(&portable).unwrap_err();
    assert!(e.contains("above the measured peak"), "{e}");
    std::fs::write(dir.path().join("int8.json"), &o.stdout).unwrap();

    let o = common::handgrad(
        &[
            "bench",
            "latency",
            "--backends",
            "cpu,ane",
            "--seconds",
            "0.01",
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let b = v["backends"].as_array().unwrap();
    assert_eq!(b[0]["points"].as_array().unwrap().len(), 5);
    if cfg!(not(target_os = "macos")) {
        assert!(
            b[1]["unavailable"]
                .as_str()
                .unwrap()
                .contains("not available"),
            "{b:?}"
        );
    }
    std::fs::write(dir.path().join("latency.json"), &o.stdout).unwrap();
    let o = common::handgrad(
        &[
            "bench",
            "report",
            "int8.json",
            "latency.json",
            "-o",
            "r.md",
            "--no-charts",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(
        md.contains("| int8 |") && md.contains("## Per-call latency"),
        "{md}"
    );
    assert!(!md.contains("## Charts"));
    let o = common::handgrad(&["bench", "matmul", "--shapes", "64x96"], dir.path());
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("is not IN:OUT"), "{}", o.stderr);
}
