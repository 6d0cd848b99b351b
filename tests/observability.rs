//! Seeing a job while it runs: progress lines in batch logs (stderr is a pipe here, as in every
//! cluster job), `metrics.jsonl` next to the checkpoint, the `--timeline` Chrome trace, and the
//! line that says rank 0 waits for a peer. The real binary under `mpiexec`, with timeouts.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::Instant;

use common::*;
use serde_json::Value;

/// Enough images for several seconds per epoch at 2 ranks: 640 training images of 32×32, batch 16
/// per rank, so 20 steps of about a quarter of a second each.
fn project() -> Project {
    Project::new(4, 640, 128, 32)
}

const RUN: [&str; 8] = [
    "--set",
    "train.batch_size=16",
    "--set",
    "train.log_every=1",
    "--set",
    "train.validate=true",
    "--set",
    "timeline.steps=8",
];

/// Progress lines of `sac train` on stderr: (epoch, step, steps, img/s, epoch img/s, loss).
fn progress_lines(err: &str) -> Vec<(u32, usize, usize, f64, f64, f64)> {
    err.lines()
        .filter_map(|l| {
            let rest = &l[l.find("] epoch ").map(|i| i + 8).or_else(|| l.find(" INFO epoch ").map(|i| i + 12))?..];
            let (epoch, rest) = rest.split_once('/')?;
            let rest = rest.split_once(", step ")?.1;
            let (step, rest) = rest.split_once('/')?;
            let (steps, rest) = rest.split_once(' ')?;
            let rest = rest.split_once("): ")?.1;
            let (rate, rest) = rest.split_once(" img/s (epoch ")?;
            let (epoch_rate, rest) = rest.split_once("), loss ")?;
            let (loss, _) = rest.split_once(", lr ")?;
            Some((
                epoch.parse().ok()?,
                step.parse().ok()?,
                steps.parse().ok()?,
                rate.parse().ok()?,
                epoch_rate.parse().ok()?,
                loss.parse().ok()?,
            ))
        })
        .collect()
}

fn metrics(dir: &Path) -> Vec<Value> {
    let text = fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl next to the checkpoint");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics.jsonl line {l:?} is not JSON: {e}")))
        .collect()
}

/// Every epoch's intervals tile its steps exactly once (no duplicate, no gap), and every epoch has
/// one record, equal to state.json's history. Returns the interval count.
#[track_caller]
fn assert_stream_matches_state(lines: &[Value], state: &Value) -> usize {
    let history = state["history"].as_array().unwrap();
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_global = 0;
    let mut epochs = Vec::new();
    let mut intervals = 0;
    for l in lines {
        match l["kind"].as_str() {
            Some("interval") => {
                intervals += 1;
                let (e, step, n) = (u64_of(l, "epoch"), u64_of(l, "step"), u64_of(l, "interval_steps"));
                let done = covered.entry(e).or_insert(0);
                assert_eq!(
                    *done + n,
                    step,
                    "interval of epoch {e} ending at step {step} does not follow the last: {l}"
                );
                *done = step;
                assert!(u64_of(l, "steps") >= step, "{l}");
                let g = u64_of(l, "global_step");
                assert!(g >= last_global, "global_step goes back: {l}");
                last_global = g;
                for key in ["images_per_second", "epoch_images_per_second", "seconds", "elapsed"] {
                    assert!(l[key].as_f64().is_some_and(|v| v > 0.0), "{key} of {l}");
                }
                for key in ["eta_epoch", "eta_run", "lr", "data", "compute", "exchange", "optimizer"] {
                    assert!(l[key].as_f64().is_some_and(|v| v >= 0.0), "{key} of {l}");
                }
                let loss = l["loss"].as_f64().unwrap_or(f64::NAN);
                assert!(loss.is_finite() && loss > 0.0, "loss of {l}");
                let wait = l["exchange_wait"].as_f64().unwrap_or_else(|| panic!("exchange_wait of {l}"));
                assert!(
                    (0.0..=l["exchange"].as_f64().unwrap()).contains(&wait),
                    "waiting is part of the exchange: {l}"
                );
                let shares: f64 =
                    ["data", "compute", "exchange", "optimizer"].iter().map(|k| l[k].as_f64().unwrap()).sum();
                assert!((shares - 1.0).abs() < 1e-6, "time shares sum to {shares}: {l}");
            }
            Some("epoch") => {
                let e = u64_of(l, "epoch");
                let steps = lines
                    .iter()
                    .find(|i| i["kind"] == "interval" && u64_of(i, "epoch") == e)
                    .map(|i| u64_of(i, "steps"))
                    .unwrap_or_else(|| panic!("epoch {e} has no interval"));
                assert_eq!(covered.get(&e), Some(&steps), "the intervals of epoch {e} do not cover its {steps} steps");
                let h = history.iter().find(|h| u64_of(h, "epoch") == e).expect("the epoch is in state.json");
                for (key, value) in h.as_object().unwrap() {
                    assert_eq!(&l[key], value, "epoch {e}: {key} differs from state.json");
                }
                epochs.push(e);
            }
            other => panic!("unknown kind {other:?}: {l}"),
        }
    }
    let want: Vec<u64> = history.iter().map(|h| u64_of(h, "epoch")).collect();
    assert_eq!(epochs, want, "one epoch record per epoch of state.json, in order");
    intervals
}

#[test]
fn a_2_rank_run_logs_progress_lines_metrics_and_a_timeline_with_every_span_kind() {
    let p = project();
    let trace = p.path().join("trace.json");
    let mut args = RUN.to_vec();
    args.extend(["--epochs", "2", "--timeline", trace.to_str().unwrap()]);
    // As a batch job runs: stderr to a file (`#PBS -j oe`, `slurm-<id>.out`).
    let job_log = p.path().join("job.log");
    let t = Instant::now();
    let full = p.args(&args);
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "exec \"$@\" 2>\"$SAC_JOB_LOG\"", "sh"]).args(launcher(2)).arg(sac_bin()).args(&full);
    cmd.env("SAC_JOB_LOG", &job_log);
    let out = wait_with_timeout(spawn(&mut cmd, p.path()), &strs(&full), RUN_TIMEOUT);
    p.assert_no_rank_left();
    let err = fs::read_to_string(&job_log).expect("the job's log file");
    assert!(out.status.success(), "sac failed ({:?}):\n{err}", out.status);
    eprintln!("2 epochs in {:.1} s", t.elapsed().as_secs_f64());

    // Progress lines: several per epoch, steps rising, sane numbers; only rank 0 tells them.
    let lines = progress_lines(&err);
    assert!(lines.len() >= 4, "too few progress lines ({}) with log_every = 1:\n{err}", lines.len());
    for w in lines.windows(2) {
        assert!((w[1].0, w[1].1) > (w[0].0, w[0].1), "progress goes back: {w:?}");
    }
    for &(epoch, step, steps, rate, epoch_rate, loss) in &lines {
        assert!((1..=2).contains(&epoch) && step >= 1 && step <= steps && steps == 20, "{err}");
        assert!(rate > 1.0 && rate < 1e5 && epoch_rate > 1.0, "img/s {rate} / {epoch_rate}");
        assert!(loss.is_finite() && loss > 0.0 && loss < 20.0, "loss {loss}");
    }
    assert!(lines.iter().any(|l| l.0 == 2 && l.1 == l.2), "an interval at the end of each epoch:\n{err}");
    assert!(err.contains("ETA epoch ") && err.contains(", run "), "{err}");
    assert!(!err.contains("INFO [rank 1]"), "other ranks log only warnings on stderr:\n{err}");
    assert!(!err.contains("no progress"), "no rank waited long:\n{err}");
    assert!(err.contains("peak memory per rank "), "rank 0 reports every rank's memory:\n{err}");

    // metrics.jsonl: intervals tile the epochs; epoch records equal state.json's.
    let dir = p.model_dir("resnet18");
    let stream = metrics(&dir);
    let intervals = assert_stream_matches_state(&stream, &p.state("resnet18"));
    assert!(intervals >= 4, "{intervals} intervals");
    assert!(dir.join("training.png").is_file());

    // The timeline: Chrome trace JSON, one process per rank, every kind of span, bounded.
    let doc = read_json(&trace);
    let events = doc["traceEvents"].as_array().expect("traceEvents");
    let ranks: BTreeSet<u64> =
        events.iter().filter(|e| e["name"] == "process_name").map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1]));
    let spans: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    for e in &spans {
        assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0) && e["dur"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
    }
    for rank in [0, 1] {
        let cats: BTreeSet<&str> =
            spans.iter().filter(|e| e["pid"] == rank).map(|e| e["cat"].as_str().unwrap()).collect();
        for kind in ["data", "compute", "exchange", "optimizer", "validation", "loader"] {
            assert!(cats.contains(kind), "rank {rank} has no {kind} span: {cats:?}");
        }
        assert!(
            spans.iter().any(|e| e["pid"] == rank && e["name"].as_str().unwrap().starts_with("bucket 1/")),
            "rank {rank}: no span per allreduce bucket"
        );
    }
    assert!(spans.iter().any(|e| e["pid"] == 0 && e["cat"] == "checkpoint"), "rank 0 writes the checkpoint");
    // The window: the last 8 of the first epoch's 20 steps (and no step of epoch 2).
    let steps: BTreeSet<u64> =
        spans.iter().filter(|e| e["cat"] == "compute").filter_map(|e| e["args"]["step"].as_u64()).collect();
    assert_eq!(steps, (13..=20).collect::<BTreeSet<u64>>());
    let bound = 2 * (8 * 12 + 8 * 4 + 20);
    assert!(spans.len() <= bound, "{} spans for a window of 8 steps and 8 validation batches", spans.len());
}

#[test]
fn metrics_jsonl_continues_on_resume_without_duplicate_or_missing_intervals() {
    let p = project();
    let mut first = RUN.to_vec();
    // Rank 0 pauses at step 28 (epoch 2, step 8); the test stops the job meanwhile. Intervals of
    // 0.1 s, so that epoch 2's first 7 steps hold one however fast the machine (a core of an AMD
    // EPYC ran them in under the 1 s of RUN).
    first.extend(["--epochs", "3", "--set", "train.log_every=0.1"]);
    let args = p.args(&first);
    let child = spawn_mpi_env(p.path(), 2, &strs(&args), &[("SAC_FAULT", "step:pause@0#28")]);
    let log = p.path().join("sac.log");
    let mut signalled = false;
    let out = wait_with_timeout_and(child, &strs(&args), RUN_TIMEOUT, |c| {
        if !signalled && fs::read_to_string(&log).is_ok_and(|t| t.contains("pause at step")) {
            signalled = true;
            signal_group(c, stop_signal());
        }
    });
    p.assert_no_rank_left();
    assert_interrupted(&out, 2);
    let dir = p.model_dir("resnet18");
    let cut = metrics(&dir);
    assert!(
        cut.iter().any(|l| l["kind"] == "interval" && u64_of(l, "epoch") == 2),
        "the cut epoch 2 had logged intervals before the stop"
    );
    assert_eq!(u64_of(&p.state("resnet18"), "epoch"), 1);

    let mut again = RUN.to_vec();
    again.extend(["--epochs", "3", "--resume", "--set", "train.log_every=0.1"]);
    let out = p.train_mpi(2, &again);
    assert_success(&out);
    let stream = metrics(&dir);
    assert_stream_matches_state(&stream, &p.state("resnet18"));
    let epochs: Vec<u64> = stream.iter().filter(|l| l["kind"] == "epoch").map(|l| u64_of(l, "epoch")).collect();
    assert_eq!(epochs, [1, 2, 3]);
}

#[test]
fn rank_0_waiting_for_a_slow_peer_says_so_naming_the_rank() {
    let p = project();
    let mut args = RUN.to_vec();
    // Rank 1 sleeps 4 s at its 5th step: rank 0 waits in the gradient allreduce meanwhile.
    args.extend(["--epochs", "1", "--set", "train.validate=false"]);
    let out = run_mpi_env(p.path(), 2, &strs(&p.args(&args)), &[("SAC_FAULT", "step:pause@1#5")], RUN_TIMEOUT);
    p.assert_no_rank_left();
    assert_success(&out);
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.contains("no progress for "))
        .unwrap_or_else(|| panic!("no line about the wait:\n{err}"));
    assert!(line.contains("rank 0 has waited") && line.contains("allreduce"), "{line}");
    assert!(line.contains("not arrived: rank 1"), "{line}");
}

#[test]
fn the_exchange_after_backward_tells_the_wait_for_a_slow_rank_from_the_transfer() {
    let p = project();
    let mut args = RUN.to_vec();
    // Rank 1 sleeps 4 s at its 5th step; rank 0 waits for it to arrive at the exchange.
    args.extend(["--epochs", "1", "--set", "train.validate=false", "--set", "train.overlap=false"]);
    let out = run_mpi_env(p.path(), 2, &strs(&p.args(&args)), &[("SAC_FAULT", "step:pause@1#5")], RUN_TIMEOUT);
    p.assert_no_rank_left();
    assert_success(&out);
    let err = stderr(&out);
    let line =
        err.lines().find(|l| l.contains("epoch 1/1: train loss")).unwrap_or_else(|| panic!("no epoch line:\n{err}"));
    assert!(line.contains("(of it waiting for ranks "), "{line}");
    let stream = metrics(&p.model_dir("resnet18"));
    let epoch = stream.iter().find(|l| l["kind"] == "epoch").expect("an epoch record");
    let (seconds, exchange, wait) = (
        epoch["seconds"].as_f64().unwrap(),
        epoch["exchange"].as_f64().unwrap(),
        epoch["exchange_wait"].as_f64().unwrap(),
    );
    // The 4 s of the pause are rank 0's wait (time shares are of the epoch's steps, about its
    // seconds), and waiting is a part of the exchange.
    assert!(wait * seconds > 3.0, "rank 0 waited {:.2} s of {seconds:.1} s: {epoch}", wait * seconds);
    assert!(wait <= exchange, "{epoch}");
}

#[test]
fn evaluate_logs_progress_and_writes_a_pipeline_timeline_of_4_ranks() {
    let p = project();
    assert_success(&p.train_mpi(2, &["--epochs", "1", "--set", "train.batch_size=16"]));
    let trace = p.path().join("eval-trace.json");
    let config = p.path().join("config.toml");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--set",
        "train.log_every=0.2",
        "--set",
        "evaluate.batch_size=4",
        "--set",
        "timeline.steps=10",
        "evaluate",
        "--timeline",
        trace.to_str().unwrap(),
    ];
    let out = run_mpi(p.path(), 4, &args, RUN_TIMEOUT);
    p.assert_no_rank_left();
    assert_success(&out);
    let err = stderr(&out);
    let last = err
        .lines()
        .rev()
        .find(|l| l.contains("evaluate: ") && l.contains(" images ("))
        .unwrap_or_else(|| panic!("no progress line:\n{err}"));
    assert!(last.contains("evaluate: 128/128 images (100.0 %)"), "the last line is the whole set: {last}");

    let doc = read_json(&trace);
    let spans: Vec<&Value> = doc["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
    for (rank, stage) in [(0, "read"), (1, "decode"), (2, "normalize"), (3, "predict")] {
        assert!(spans.iter().any(|e| e["pid"] == rank && e["cat"] == stage), "rank {rank} has no {stage} span");
    }
    let batches: BTreeSet<u64> = spans.iter().filter_map(|e| e["args"]["step"].as_u64()).collect();
    assert_eq!(batches, (1..=10).collect::<BTreeSet<u64>>(), "only the first 10 batches are recorded");
}

#[test]
fn idle_evaluate_ranks_leave_without_stall_reports_while_rank_0_works() {
    // With 2 ranks every stage runs on rank 0; rank 1 has nothing to do and must not wait for it.
    // At 160x160 (resnet18 takes any size) rank 0 works for several stall_warn periods.
    let p = project();
    assert_success(&p.train_mpi(2, &["--epochs", "1", "--set", "train.batch_size=16"]));
    let config = p.path().join("config.toml");
    let mut args = vec!["--config", config.to_str().unwrap(), "--set", "train.stall_warn=1"];
    args.extend(["--set", "train.threads=1", "--set", "image.width=160", "--set", "image.height=160", "evaluate"]);
    let t = Instant::now();
    let out = run_mpi(p.path(), 2, &args, RUN_TIMEOUT);
    assert!(t.elapsed().as_secs_f64() > 3.0, "evaluation too short to test anything");
    p.assert_no_rank_left();
    assert_success(&out);
    let err = stderr(&out);
    assert!(!err.contains("stall:") && !err.contains("no progress"), "{err}");
    assert!(err.contains("peak memory per rank "), "{err}");
}

#[test]
fn create_dataset_logs_progress_lines_in_a_batch_log() {
    let dir = tempdir();
    let src = dir.path().join("src");
    image_folder(&src);
    write_config(dir.path(), &config_text("folder", src.to_str().unwrap(), ""));
    let out = create_dataset(dir.path(), &["--set", "train.log_every=0.1"]);
    assert_success(&out);
    let err = stderr(&out);
    // Tiny folders finish within one interval: the closing line still gives the total.
    assert!(err.lines().any(|l| l.contains("create-dataset: writing: ") && l.contains("(100.0 %)")), "{err}");
}

#[test]
fn an_unwritable_timeline_path_fails_before_training_naming_it() {
    let p = project();
    let blocker = p.path().join("not-a-dir");
    fs::write(&blocker, "a file").unwrap();
    let trace = blocker.join("trace.json");
    let out = p.train_mpi(2, &["--timeline", trace.to_str().unwrap()]);
    let err = assert_fails_with(&out, &["timeline.file", "not-a-dir"]);
    assert!(!err.contains("epoch 1/1"), "refused before any step:\n{err}");
    assert!(!p.model_dir("resnet18").join("state.json").exists());
}

#[test]
fn log_every_and_timeline_steps_are_checked() {
    let p = project();
    for (set, key) in [("train.log_every=-1", "train.log_every"), ("timeline.steps=0", "timeline.steps")] {
        let out = p.train(&["--set", set]);
        assert_fails_with(&out, &[key]);
    }
}
