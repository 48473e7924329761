//! The dashboard: its panels rendered from recorded event logs at 80x24 and 200x60, bad input
//! (truncated and garbage lines, an empty folder, a folder that is not a run), and a real
//! terminal through tmux.

mod common;

use handgrad::dashboard::render::{UiState, draw};
use handgrad::dashboard::state::{RunView, Status};
use handgrad::telemetry::reader::read_file;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

fn view(name: &str) -> RunView {
    let log = read_file(&common::repo(&format!("tests/data/events/{name}.jsonl"))).unwrap();
    assert_eq!(log.skipped, 0);
    let mut v = RunView::from_records(&log.records);
    v.unreadable_lines = log.skipped;
    v
}

/// The screen as text, one string per row.
fn render(v: &RunView, w: u16, h: u16) -> Vec<String> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    let ui = UiState {
        now: v.last_time.unwrap_or(0.0),
        ..Default::default()
    };
    t.draw(|f| draw(f, v, &ui)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect())
        .collect()
}

fn screen_has(rows: &[String], needle: &str) -> bool {
    rows.iter().any(|r| r.contains(needle))
}

#[track_caller]
fn assert_has(rows: &[String], needles: &[&str]) {
    for n in needles {
        assert!(
            screen_has(rows, n),
            "'{n}' not on screen:\n{}",
            rows.join("\n")
        );
    }
}

#[test]
fn a_short_run_shows_every_panel_at_80x24_and_200x60() {
    let v = view("short");
    assert_eq!(
        v.status,
        Status::Ended(handgrad::telemetry::EndReason::Completed)
    );
    for (w, h) in [(80, 24), (200, 60)] {
        let s = render(&v, w, h);
        assert_has(
            &s,
            &[
                "runs/short",
                "[completed]",
                "LlamaForCausalLM",
                "backend cpu fp32",
                "(log) ━avg",
                "update 12/12 (100%)",
                "tokens/s",
                "time per block",
                "sdpa_fwd",
                "system",
                "power: not available",
                "sample",
                "log",
            ],
        );
    }
    // At 200x60 there is room for every block and the whole header.
    let s = render(&v, 200, 60);
    assert_has(&s, &["kv_bwd", "weight_grads", "data built-in stories"]);
}

#[test]
fn a_run_with_evaluations_checkpoints_and_a_sample() {
    let v = view("eval");
    assert_eq!(v.val.len(), 3);
    let s = render(&v, 80, 24);
    assert_has(
        &s,
        &[
            "update 30/30",
            " best ",
            "sample (update 30)",
            "Once upon a time",
        ],
    );
    let s = render(&v, 200, 60);
    assert_has(
        &s,
        &["val loss", "saved latest checkpoint", "new best checkpoint"],
    );
}

#[test]
fn a_known_peak_shows_the_model_flop_utilisation() {
    let mut v = view("short");
    let g = v.gflops().unwrap();
    assert!(!screen_has(&render(&v, 80, 24), "MFU"));
    v.peak_gflops = Some(g * 4.0);
    assert_has(&render(&v, 80, 24), &["GFLOP/s MFU 25%"]);
}

#[test]
fn a_diverged_run_says_so() {
    let v = view("diverged");
    assert!(matches!(v.status, Status::Failed(_)));
    let s = render(&v, 80, 24);
    assert_has(&s, &["[failed]"]);
    let s = render(&v, 200, 60);
    assert_has(&s, &["training diverged at update 17", "update 16/60"]);
}

#[test]
fn a_resumed_run_continues_its_curve() {
    let v = view("resumed");
    assert_eq!(v.train.len(), 20);
    assert!(v.train.windows(2).all(|w| w[1].0 == w[0].0 + 1.0));
    let s = render(&v, 200, 60);
    assert_has(&s, &["update 20/20", "resumed at update 10"]);
}

#[test]
fn small_terminals_degrade_cleanly() {
    let v = view("eval");
    let s = render(&v, 60, 16);
    assert_has(&s, &["(log) ━avg", "stats"]);
    let s = render(&v, 30, 8);
    assert_has(&s, &["terminal too small", "update 30/30"]);
}

#[test]
fn bad_event_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    // Garbage and a truncated last line: skipped, counted, shown.
    let good = std::fs::read_to_string(common::repo("tests/data/events/short.jsonl")).unwrap();
    let mut text = String::from("garbage line\n{\"broken\": \n");
    text.push_str(&good);
    text.push_str(&good.lines().next().unwrap()[..30]);
    let p = dir.path().join("events.jsonl");
    std::fs::write(&p, text).unwrap();
    let log = read_file(&p).unwrap();
    assert_eq!(log.skipped, 3);
    let mut v = RunView::from_records(&log.records);
    v.unreadable_lines = log.skipped;
    assert_has(&render(&v, 80, 24), &["3 unreadable event lines"]);
    // No events yet: a waiting screen.
    assert_has(
        &render(&RunView::default(), 80, 24),
        &["waiting for the run's first events"],
    );
    // A folder that is not a run, and one that does not exist: errors.
    let other = dir.path().join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("cat.jpg"), b"x").unwrap();
    let o = common::handgrad(&["dashboard", other.to_str().unwrap()], dir.path());
    assert!(
        o.code != 0 && o.stderr.contains("is not a run folder"),
        "{}",
        o.stderr
    );
    let o = common::handgrad(&["dashboard", "missing"], dir.path());
    assert!(
        o.code != 0 && o.stderr.contains("does not exist"),
        "{}",
        o.stderr
    );
}

fn tmux(args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_dashboard_runs_in_a_real_terminal_and_restores_it() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        common::skip("tmux is not installed (apt-get install tmux)");
        return;
    }
    // q quits (exit 0); Ctrl-C quits too, with the exit status of an interrupt (130), as
    // without the dashboard.
    for (key, status) in [("q", 0), ("C-c", 130)] {
        dashboard_in_tmux(key, status);
    }
}

fn dashboard_in_tmux(key: &str, status: i32) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::copy(
        common::repo("tests/data/events/eval.jsonl"),
        run.join("events.jsonl"),
    )
    .unwrap();
    let session = format!("hg{}{}", std::process::id(), status);
    let cmd = format!(
        "{} dashboard {} --sample-every 0; echo DASHBOARD-EXITED-$?; sleep 30",
        env!("CARGO_BIN_EXE_handgrad"),
        run.display()
    );
    let o = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).to_string()
    };
    let mut screen = String::new();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        screen = capture();
        if screen.contains("update 30/30") {
            break;
        }
    }
    let shown = screen.contains("update 30/30")
        && screen.contains("(log) ━avg")
        && screen.contains("tokens/s");
    if shown {
        tmux(&["send-keys", "-t", &session, key]);
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if capture().contains("DASHBOARD-EXITED") {
                break;
            }
        }
    }
    let after = capture();
    tmux(&["kill-session", "-t", &session]);
    assert!(shown, "the dashboard did not show the run:\n{screen}");
    assert!(
        after.contains(&format!("DASHBOARD-EXITED-{status}")),
        "{key} did not exit with {status}:\n{after}"
    );
    // The alternate screen is gone: the UI is no longer on screen.
    assert!(
        !after.contains("(log) ━avg"),
        "the terminal was not restored:\n{after}"
    );
}

/// The loss axis is logarithmic: with a loss falling from 10 to 1, the middle label of three is
/// the geometric mean (3.16), not the arithmetic one (5.5), so the slow fall after the first
/// updates keeps its height on screen.
#[test]
fn the_loss_axis_is_logarithmic() {
    let mut v = view("short");
    v.train = (0..100)
        .map(|i| (i as f64, 0.0, 10f64.powf(1.0 - i as f64 / 99.0)))
        .collect();
    v.val.clear();
    // Labels from about 10 at the top to about 1 at the bottom.
    let s = render(&v, 200, 40);
    let labels: Vec<f64> = s
        .iter()
        .filter_map(|r| {
            let cell = r.trim_start_matches('│').split('│').next()?.trim();
            cell.parse::<f64>().ok()
        })
        .collect();
    assert!(labels.len() >= 3, "{labels:?}\n{}", s.join("\n"));
    let (top, bottom) = (labels[0], labels[labels.len() - 1]);
    assert!(top > 9.0 && bottom < 1.1, "{labels:?}");
    // Evenly spaced labels are evenly spaced in log: each is the same ratio from the next.
    let ratios: Vec<f64> = labels.windows(2).map(|w| w[0] / w[1]).collect();
    for r in &ratios {
        assert!((r / ratios[0] - 1.0).abs() < 0.05, "{labels:?}");
    }
}
