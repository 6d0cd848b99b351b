//! `sac train` and `sac mpi-check`, end to end: the real binary, under `mpiexec` where the
//! behaviour is about ranks, on tiny generated data dirs (32×32 PNGs, a handful of images, one
//! torch thread per rank). Every run has a timeout, so a rank left waiting in a collective fails the
//! test instead of hanging it.
//!
//! `run_mpi` returns only once mpiexec has exited and every rank has closed its end of the output
//! pipes, so a test that gets an `Output` back also knows that no rank is left running.
mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// MPI: exact averaging, uneven shards, resume
// ------------------------------------------------------------------------------------------------

#[test]
fn gradient_averaged_over_ranks_equals_the_single_process_gradient_of_the_whole_batch() {
    let dir = tempdir();
    // 8 over 2 ranks: shares of 4 and 4; 7 over 3 ranks: uneven shares of 3, 2 and 2.
    for (ranks, batch) in [(2, 8), (3, 7)] {
        let out = run_mpi(dir.path(), ranks, &["mpi-check", "--reps", "0", "--batch", &batch.to_string()], RUN_TIMEOUT);
        assert_success(&out);
        let text = stdout(&out);
        let line = text
            .lines()
            .find(|l| l.contains("relative error"))
            .unwrap_or_else(|| panic!("no relative error reported at -n {ranks}; stdout:\n{text}"));
        assert!(line.contains(&format!("over {ranks} rank(s), {batch} images")), "{line}");
        assert!(line.trim_end().ends_with("exact"), "{line}");
        let err: f64 = line
            .split("relative error ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number after `relative error` in {line:?}"));
        assert!(err <= 1e-5, "relative error {err} > 1e-5 at -n {ranks}, batch {batch}");
        // Sent as bfloat16: not exact, but within what 8 significant bits allow.
        let half = text
            .lines()
            .find(|l| l.contains("sent as bfloat16"))
            .unwrap_or_else(|| panic!("no bfloat16 line at -n {ranks}; stdout:\n{text}"));
        let err: f64 =
            half.split("relative error ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
        assert!(err > 1e-6 && err <= 2e-2, "bfloat16: {half}");
        assert!(half.ends_with("as expected of 8 significant bits"), "{half}");
    }
}

#[test]
fn uneven_shards_over_2_and_3_ranks_finish_without_hanging() {
    // Batch 3 per rank. 9 images over 2 ranks give shards of 5 and 4, 13 over 3 ranks 5, 4 and 4.
    // A shard of 5 is a batch of 3 and one of 2; a shard of 4 is one batch of 4 (its one-image
    // remainder joins the batch before it): in the second step the ranks with 4 images have no
    // image at all and send a zero-weight gradient.
    for (ranks, images) in [(2, 9), (3, 13)] {
        let p = Project::new(2, images, 0, 32);
        let ck = format!("ck{ranks}");
        let out = p.train_mpi(
            ranks,
            &["--epochs", "1", "--set", &format!("paths.checkpoint_dir={ck}"), "--set", "train.batch_size=3"],
        );
        assert_success(&out);
        let err = stderr(&out);
        assert!(err.contains(&format!("{images} training images over {ranks} ranks")), "{err}");
        let state = read_json(&p.model_dir_in(&ck, "resnet18").join("state.json"));
        assert_eq!(u64_of(&state, "epoch"), 1, "{state}");
        assert_eq!(u64_of(&state, "world_size"), ranks as u64);
        // Every rank runs as many steps as the largest shard needs.
        assert_eq!(u64_of(&state, "steps"), 2, "{state}");
        let loss = state["history"][0]["train_loss"].as_f64().expect("train_loss");
        assert!(loss.is_finite() && loss > 0.0, "train loss {loss}");
    }
}

#[test]
fn resuming_after_one_epoch_gives_the_same_weights_as_two_epochs_in_one_run() {
    let p = Project::new(2, 12, 0, 32);
    // Same data, same seed, same N = 2, one torch thread: run A trains 2 epochs; run B trains 1,
    // stops, and resumes for the second.
    assert_success(&p.train_mpi(2, &["--epochs", "2", "--set", "paths.checkpoint_dir=a"]));
    assert_success(&p.train_mpi(2, &["--epochs", "1", "--set", "paths.checkpoint_dir=b"]));
    let out = p.train_mpi(2, &["--resume", "--epochs", "2", "--set", "paths.checkpoint_dir=b"]);
    assert_success(&out);
    let (a, b) = (p.model_dir_in("a", "resnet18"), p.model_dir_in("b", "resnet18"));
    let (sa, sb) = (read_json(&a.join("state.json")), read_json(&b.join("state.json")));
    assert_eq!(u64_of(&sb, "epoch"), 2, "{sb}");
    assert_eq!(u64_of(&sa, "steps"), u64_of(&sb, "steps"));
    assert_eq!(sb["history"].as_array().map(Vec::len), Some(2), "the resumed run keeps epoch 1's record");
    assert_eq!(sa["history"][1]["train_loss"], sb["history"][1]["train_loss"], "epoch 2's training loss");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let cmp = compare_safetensors(&a.join(file), &b.join(file));
        eprintln!("{file}: uninterrupted vs resumed: {cmp:?}");
        assert!(cmp.bitwise || cmp.max_abs_diff <= 1e-6, "{file} differs after resuming: {cmp:?}");
    }
}

#[test]
fn exchange_during_backward_gives_the_weights_of_exchange_after_it_bit_for_bit_and_auto_picks_one() {
    // 13 images over 3 ranks, batch 3: shards of 5, 4 and 4, so in the second step of each epoch
    // two ranks have no image (no backward: they start every bucket after the step's backward on
    // the third). 6 epochs: 12 steps, of which "auto" tries both ways in steps 3-10, and the
    // steps after it go the way rank 0 chose.
    let p = Project::new(2, 13, 0, 32);
    let mut logs = Vec::new();
    for overlap in ["true", "false", "\"auto\""] {
        let ck = format!("ck-{}", overlap.trim_matches('"'));
        let out = p.train_mpi(
            3,
            &[
                "--epochs",
                "6",
                "--set",
                &format!("paths.checkpoint_dir={ck}"),
                "--set",
                "train.batch_size=3",
                "--set",
                &format!("train.overlap={overlap}"),
            ],
        );
        assert_success(&out);
        logs.push(stderr(&out));
    }
    let (on, off, auto) = (&logs[0], &logs[1], &logs[2]);
    assert!(on.contains("buckets in backward order") && on.contains("(train.overlap)"), "{on}");
    assert!(off.contains("summed after backward (train.overlap = false)"), "{off}");
    assert!(auto.contains("train.overlap = \"auto\": steps 3-10 take turns"), "{auto}");
    let chose = auto.lines().find(|l| l.contains("the exchange runs")).unwrap_or_else(|| panic!("no choice:\n{auto}"));
    assert!(chose.contains("medians of 4 steps each"), "{chose}");
    assert!(!on.contains("the exchange runs") && !off.contains("the exchange runs"), "only \"auto\" chooses");
    // The first epoch's steps (1 and 2) overlapped: its bucket line counts both.
    assert!(auto.contains("gradient buckets per step during backward"), "{auto}");
    // Rank 0 has images in both steps: its hooks start buckets during backward.
    let line = on.lines().find(|l| l.contains("gradient buckets per step during backward")).expect("bucket line");
    let early: f64 = line.split("started ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(early >= 1.0, "{line}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        for other in ["ck-false", "ck-auto"] {
            let cmp = compare_safetensors(
                &p.model_dir_in("ck-true", "resnet18").join(file),
                &p.model_dir_in(other, "resnet18").join(file),
            );
            assert!(cmp.bitwise, "{file}: overlap on vs {other}: {cmp:?}");
        }
    }
}

#[test]
fn a_bfloat16_exchange_rounds_alike_with_and_without_overlap_and_differs_from_f32() {
    // As above: 3 ranks, batch 3, one step in which two ranks have no image.
    let p = Project::new(2, 13, 0, 32);
    let mut logs = Vec::new();
    for (exchange, overlap) in [("bf16", true), ("bf16", false), ("f32", false)] {
        let out = p.train_mpi(
            3,
            &[
                "--epochs",
                "2",
                "--set",
                &format!("paths.checkpoint_dir=ck-{exchange}-{overlap}"),
                "--set",
                "train.batch_size=3",
                "--set",
                &format!("train.overlap={overlap}"),
                "--set",
                &format!("train.exchange=\"{exchange}\""),
            ],
        );
        assert_success(&out);
        logs.push(stderr(&out));
    }
    assert!(logs[0].contains("gradients sent as bfloat16"), "{}", logs[0]);
    assert!(!logs[2].contains("bfloat16"), "{}", logs[2]);
    let model = |ck: &str| p.model_dir_in(ck, "resnet18").join("model.safetensors");
    // The rounding happens per bucket as it starts, whenever that is: the same bits either way.
    let cmp = compare_safetensors(&model("ck-bf16-true"), &model("ck-bf16-false"));
    assert!(cmp.bitwise, "bf16, overlap on vs off: {cmp:?}");
    // Rounded gradients move the weights differently from exact ones. (How much is mpi-check's
    // bfloat16 line, tested above; here, with one image per rank and batch norm over one image,
    // a step is too ill-conditioned for a bound on the weights.)
    let cmp = compare_safetensors(&model("ck-bf16-false"), &model("ck-f32-false"));
    assert!(!cmp.bitwise, "the bf16 exchange changed nothing: {cmp:?}");
}

#[test]
fn an_unknown_exchange_format_or_overlap_is_refused_naming_the_key() {
    let p = Project::new(2, 4, 0, 32);
    for (set, key, value) in
        [("train.exchange=\"fp8\"", "exchange", "fp8"), ("train.overlap=\"sometimes\"", "overlap", "sometimes")]
    {
        let out = p.train(&["--set", set]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(key) && err.contains(value), "{err}");
    }
}

// ------------------------------------------------------------------------------------------------
// Architectures
// ------------------------------------------------------------------------------------------------

/// One training step (2 images, batch 2, one process) of `arch` on `side`×`side` images, its
/// smallest input; one pixel less is refused with a message that names the minimum.
fn trains_one_step_at_its_minimum_input_size(arch: &str, side: u32) {
    trains_one_batch_at_its_minimum_input_size(arch, side, 2);
}

/// The same with one batch of `batch` images.
fn trains_one_batch_at_its_minimum_input_size(arch: &str, side: u32, batch: usize) {
    let p = Project::new(2, batch, 0, 32);
    let (w, h) = (format!("image.width={side}"), format!("image.height={side}"));
    let b = format!("train.batch_size={batch}");
    let out = p.train(&["--model", arch, "--epochs", "1", "--set", &w, "--set", &h, "--set", &b]);
    assert_success(&out);
    let state = p.state(arch);
    assert_eq!(state["arch"], arch);
    assert_eq!((u64_of(&state, "epoch"), u64_of(&state, "steps"), u64_of(&state, "num_classes")), (1, 1, 2));
    let loss = state["history"][0]["train_loss"].as_f64().expect("train_loss");
    assert!(loss.is_finite(), "{arch}: train loss {loss}");
    let meta = safetensors_metadata(&p.model_dir(arch).join("model.safetensors"));
    assert_eq!(meta.get("arch").map(String::as_str), Some(arch));

    let below = side - 1;
    let (w, h) = (format!("image.width={below}"), format!("image.height={below}"));
    let out = p.train(&["--model", arch, "--epochs", "1", "--set", &w, "--set", &h]);
    if side > 8 {
        assert_fails_with(&out, &["image.width/height", &format!("{arch}'s minimum input of {side}x{side}")]);
    } else {
        // The ResNets' minimum is the config's floor for any image.
        assert_fails_with(&out, &["image.width", "7 must be in 8..=4096"]);
    }
}

/// The minimum input sizes: the smallest square input each torchvision model accepts (ResNets:
/// the config's floor of 8).
mod each_architecture_trains_one_step_at_its_minimum_input_size {
    use super::trains_one_step_at_its_minimum_input_size as check;

    #[test]
    fn resnet18_at_8() {
        check("resnet18", 8);
    }

    #[test]
    fn resnet34_at_8() {
        check("resnet34", 8);
    }

    /// A batch of 4: at 8×8 the last three of resnet50's four stages (13 bottleneck blocks) work
    /// on 1×1 maps, and batch norm over 2 values per channel there can blow the gradient past
    /// f32's range (sac then refuses to save the epoch, naming the cause).
    #[test]
    fn resnet50_at_8() {
        super::trains_one_batch_at_its_minimum_input_size("resnet50", 8, 4);
    }

    #[test]
    fn alexnet_at_63() {
        check("alexnet", 63);
    }

    #[test]
    fn vgg_at_32() {
        check("vgg", 32);
    }

    #[test]
    fn squeezenet_at_21() {
        check("squeezenet", 21);
    }

    #[test]
    fn densenet_at_29() {
        check("densenet", 29);
    }

    #[test]
    fn inception_at_75() {
        check("inception", 75);
    }
}

#[test]
fn inception_at_64x64_is_refused_naming_its_minimum_of_75x75() {
    let p = Project::new(2, 2, 0, 32);
    let out = p.train(&["--model", "inception", "--set", "image.width=64", "--set", "image.height=64"]);
    assert_fails_with(&out, &["64x64", "inception", "75x75"]);
    assert!(!p.model_dir("inception").exists(), "nothing is written for a refused config");
}

// ------------------------------------------------------------------------------------------------
// Checkpoints
// ------------------------------------------------------------------------------------------------

/// Loads the checkpoint into torchvision's resnet18 with strict checking and reports what it holds.
const TORCHVISION_STRICT_LOAD: &str = r#"
import json, sys
import torch, torchvision
from safetensors.torch import load_file

sd = load_file(sys.argv[1])
k = int(sys.argv[2])
torch.set_num_threads(1)
model = torchvision.models.resnet18(num_classes=k)
want = model.state_dict()
model.load_state_dict(sd, strict=True)  # raises on a missing or unexpected key, or another shape
model.eval()
with torch.no_grad():
    logits = model(torch.randn(2, 3, 32, 32))
print(json.dumps({
    "fc.weight": list(sd["fc.weight"].shape),
    "fc.bias": list(sd["fc.bias"].shape),
    "dtype_mismatches": sorted(n for n, t in want.items() if sd[n].dtype != t.dtype),
    "num_batches_tracked": {n: int(t) for n, t in sd.items() if n.endswith("num_batches_tracked")},
    "torchvision_num_batches_tracked": sum(n.endswith("num_batches_tracked") for n in want),
    "logits": list(logits.shape),
    "finite": bool(torch.isfinite(logits).all()),
}))
"#;

#[test]
fn checkpoint_written_by_train_loads_into_torchvision_resnet18_with_strict_checking() {
    let classes = 3;
    let p = Project::new(classes, 8, 0, 32);
    assert_success(&p.train_mpi(2, &["--epochs", "1"]));
    let steps = u64_of(&p.state("resnet18"), "steps");
    let model = p.model_dir("resnet18").join("model.safetensors");
    let text = python(TORCHVISION_STRICT_LOAD, &[model.to_str().unwrap(), &classes.to_string()]);
    let got: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("python printed no JSON ({e}):\n{text}"));
    assert_eq!(got["fc.weight"], serde_json::json!([classes, 512]), "{got}");
    assert_eq!(got["fc.bias"], serde_json::json!([classes]), "{got}");
    assert_eq!(got["dtype_mismatches"], serde_json::json!([]), "{got}");
    let counters = got["num_batches_tracked"].as_object().expect("counters");
    assert_eq!(Some(counters.len() as u64), got["torchvision_num_batches_tracked"].as_u64(), "{got}");
    assert!(!counters.is_empty());
    // torchvision counts one per training-mode forward pass: one per step on every rank.
    for (name, n) in counters {
        assert_eq!(n.as_u64(), Some(steps), "{name}");
    }
    assert_eq!(got["logits"], serde_json::json!([2, classes]));
    assert_eq!(got["finite"], true);
}

// ------------------------------------------------------------------------------------------------
// Failures
// ------------------------------------------------------------------------------------------------

#[test]
fn corrupt_image_in_one_ranks_shard_under_fail_ends_the_job_within_seconds_naming_file_and_rank() {
    let p = Project::new(2, 9, 0, 32);
    // Row 4 of 9 belongs to rank 1 of 3 (rows are dealt r, r+3, r+6; in blocks of 3 it would be too).
    let bad = p.corrupt_train_row(4);
    let t = Instant::now();
    let out = p.train_mpi(3, &["--epochs", "1", "--set", "train.on_bad_image=fail"]);
    let elapsed = t.elapsed();
    let err = assert_job_fails_with(&out, &p, &[bad.to_str().unwrap(), "rank 1"]);
    assert!(elapsed < FAILS_WITHIN, "the job took {elapsed:?} to end");
    assert!(err.lines().any(|l| l.contains("ERROR") && l.contains("rank 1")), "no error line of rank 1:\n{err}");
    assert!(!p.model_dir("resnet18").join("state.json").exists(), "no epoch was completed");
}

#[test]
fn corrupt_image_under_skip_is_named_counted_and_training_goes_on() {
    let p = Project::new(2, 9, 0, 32);
    let bad = p.corrupt_train_row(4);
    let out = p.train_mpi(3, &["--epochs", "2", "--set", "train.on_bad_image=skip"]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains(bad.to_str().unwrap()), "stderr does not name {}:\n{err}", bad.display());
    let state = p.state("resnet18");
    assert_eq!(u64_of(&state, "epoch"), 2);
    // The one bad image is skipped (and counted) in every epoch.
    for record in state["history"].as_array().expect("history") {
        assert_eq!(u64_of(record, "skipped_images"), 1, "{record}");
    }
}

#[test]
fn resume_without_a_checkpoint_fails_with_a_clear_message() {
    let p = Project::new(2, 4, 0, 32);
    let t = Instant::now();
    let out = p.train_mpi(2, &["--resume", "--epochs", "1"]);
    assert!(t.elapsed() < FAILS_WITHIN, "the job took {:?} to end", t.elapsed());
    let dir = p.model_dir("resnet18");
    assert_job_fails_with(&out, &p, &["--resume", "no checkpoint", dir.to_str().unwrap()]);
}

#[test]
fn resume_refuses_a_checkpoint_of_another_class_count_naming_both_counts() {
    let p = Project::new(2, 4, 0, 32);
    assert_success(&p.train(&["--epochs", "1"]));
    let model = p.model_dir("resnet18").join("model.safetensors");
    let before = fs::read(&model).unwrap();
    // The data dir now has 3 classes; the log holds only what the refused run says.
    write_data_dir(&p.data(), 3, 6, 0, 32);
    fs::remove_file(p.path().join("sac.log")).unwrap();
    let t = Instant::now();
    let out = p.train_mpi(2, &["--resume", "--epochs", "2"]);
    assert!(t.elapsed() < FAILS_WITHIN, "the job took {:?} to end", t.elapsed());
    assert_job_fails_with(&out, &p, &["has 2 classes", "has 3"]);
    assert_eq!(fs::read(&model).unwrap(), before, "the refused checkpoint is left as it was");
    assert_eq!(u64_of(&p.state("resnet18"), "epoch"), 1);
}

#[test]
fn resume_refuses_a_checkpoint_of_another_class_map_naming_the_label() {
    let p = Project::new(2, 4, 0, 32);
    assert_success(&p.train(&["--epochs", "1"]));
    let model = p.model_dir("resnet18").join("model.safetensors");
    let before = fs::read(&model).unwrap();
    // As many classes, but label 1 is now another category (11, not 10): the same check as
    // evaluate's (checkpoint::difference) refuses it.
    let classes = p.data().join("classes.csv");
    let text = fs::read_to_string(&classes).unwrap();
    assert!(text.contains("\n1,10,"), "{text}");
    fs::write(&classes, text.replace("\n1,10,", "\n1,11,")).unwrap();
    let out = p.train(&["--resume", "--epochs", "2"]);
    assert_fails_with(&out, &["another class map", "label 1 is category 10 there and 11 here"]);
    assert_eq!(fs::read(&model).unwrap(), before, "the refused checkpoint is left as it was");
    assert_eq!(u64_of(&p.state("resnet18"), "epoch"), 1);
}

#[test]
fn resume_refuses_a_checkpoint_of_another_architecture_naming_both() {
    let p = Project::new(2, 4, 0, 32);
    assert_success(&p.train(&["--epochs", "1"]));
    // A resnet18 checkpoint where squeezenet's would be.
    let (from, to) = (p.model_dir("resnet18"), p.model_dir("squeezenet"));
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    // Epoch directories and the links that publish them, as they are.
    let st = std::process::Command::new("cp").arg("-a").arg(&from).arg(&to).status().unwrap();
    assert!(st.success(), "copying {} to {}", from.display(), to.display());
    let out = p.train(&["--resume", "--model", "squeezenet", "--epochs", "2"]);
    assert_fails_with(&out, &["resnet18", "squeezenet", to.to_str().unwrap()]);
}

#[test]
fn missing_train_csv_is_named_and_no_rank_is_left_waiting() {
    let p = Project::new(2, 4, 0, 32);
    let train_csv = p.data().join("train.csv");
    fs::remove_file(&train_csv).unwrap();
    let t = Instant::now();
    let out = p.train_mpi(2, &["--epochs", "1"]);
    assert!(t.elapsed() < FAILS_WITHIN, "the job took {:?} to end", t.elapsed());
    assert_job_fails_with(&out, &p, &[train_csv.to_str().unwrap(), "not found"]);
    // Found by rank 0 alone before the first step: the launcher passes on its exit code 2 (a job
    // script does not retry it).
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// An error that ends an MPI job must reach the user's terminal, not only the log file: the rank
/// writes it to stderr before `MPI_Abort`, and the launcher has to forward it.
#[test]
#[ignore = "stress check (20 failing jobs, ~30 s): hydra may kill its output relay before it forwards a \
            rank's last lines; sac pauses before MPI_Abort for that (Dist::abort). Run with --ignored"]
fn error_of_an_aborting_rank_always_reaches_stderr() {
    let p = Project::new(2, 4, 0, 32);
    for run in 1..=20 {
        let out = p.train_mpi(2, &["--resume", "--epochs", "1"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("no checkpoint"), "run {run}: the error did not reach stderr:\n{err}");
    }
}

// ------------------------------------------------------------------------------------------------
// Signals
// ------------------------------------------------------------------------------------------------

#[test]
fn sigterm_to_mpiexec_stops_every_rank_and_leaves_the_last_complete_checkpoint_resumable() {
    // 120 images over 2 ranks, batch 4: 15 steps, a few seconds per epoch.
    let p = Project::new(2, 120, 0, 32);
    let dir = p.model_dir("resnet18");
    let args = p.args(&["--epochs", "50", "--set", "train.batch_size=4"]);
    let mut child = spawn_mpi(p.path(), 2, &strs(&args));
    // state.json names the published epoch: once it exists, epoch 1's checkpoint is complete.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !dir.join("state.json").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = wait_with_timeout(child, &strs(&args), RUN_TIMEOUT);
            panic!("the job ended ({status}) before its first checkpoint; stderr:\n{}", stderr(&out));
        }
        if Instant::now() >= deadline {
            signal_group(&child, libc::SIGKILL);
            panic!("no checkpoint after 90 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // mpiexec leads the process group; hydra's proxy and the ranks run in sessions of their own,
    // so the ranks get the signal only because mpiexec forwards it to them (hydra does).
    signal_group(&child, stop_signal());
    let t = Instant::now();
    let out = wait_with_timeout(child, &strs(&args), Duration::from_secs(60));
    let stopped_in = t.elapsed();
    p.assert_no_rank_left();
    let err = stderr(&out);
    assert!(stopped_in < FAILS_WITHIN, "the job took {stopped_in:?} to stop");
    // Every rank stopped at the same step boundary and took the interrupted exit (code 130).
    for rank in 0..2 {
        assert!(
            // At a step boundary ("stopping at epoch"), or after the epoch's save when the signal came
            // during validation or saving ("stopping after epoch").
            err.lines().any(|l| {
                (l.contains(&format!("WARN [rank {rank}] stopping at epoch"))
                    || l.contains(&format!("WARN [rank {rank}] stopping after epoch")))
                    && l.contains("--resume")
            }),
            "rank {rank} did not report stopping with a hint to --resume:\n{err}"
        );
    }
    assert_interrupted(&out, 2);

    let state = p.state("resnet18");
    let epoch = u64_of(&state, "epoch");
    assert!((1..50).contains(&epoch), "{state}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let meta = safetensors_metadata(&dir.join(file));
        assert_eq!(meta.get("epoch"), Some(&epoch.to_string()), "{file} is not of the epoch state.json names");
    }
    let leftovers: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left in {}: {leftovers:?}", dir.display());

    let next = (epoch + 1).to_string();
    let out = p.train_mpi(2, &["--resume", "--epochs", &next, "--set", "train.batch_size=4"]);
    assert_success(&out);
    let state = p.state("resnet18");
    assert_eq!(u64_of(&state, "epoch"), epoch + 1);
    assert_eq!(state["history"].as_array().map(Vec::len), Some(epoch as usize + 1));
}

// ------------------------------------------------------------------------------------------------
// Reporting
// ------------------------------------------------------------------------------------------------

/// The four time shares of a summary line, in %: (data, compute, allreduce, optimizer).
fn time_shares(line: &str) -> [f64; 4] {
    ["data", "compute", "allreduce", "optimizer"].map(|what| {
        let rest = line.split(&format!("{what} ")).nth(1).unwrap_or_else(|| panic!("no `{what}` share in {line:?}"));
        let v = rest.split_whitespace().next().unwrap();
        v.parse().unwrap_or_else(|_| panic!("`{what} {v}` is not a percentage in {line:?}"))
    })
}

#[test]
fn epoch_summary_line_reports_loss_accuracy_and_time_shares_and_state_keeps_them() {
    let p = Project::new(3, 8, 6, 32);
    let out = p.train_mpi(2, &["--epochs", "1", "--set", "train.validate=true"]);
    assert_success(&out);
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.contains("[rank 0]") && l.contains("epoch 1/1:"))
        .unwrap_or_else(|| panic!("no summary line of rank 0:\n{err}"));
    for needle in ["train loss", "val loss", "top-1", "top-5", "img/s", "data", "compute", "allreduce", "optimizer"] {
        assert!(line.contains(needle), "the summary lacks {needle:?}: {line}");
    }
    assert!(!line.contains("top-1 -"), "validation ran, so top-1 is a number: {line}");
    let shares = time_shares(line);
    let sum: f64 = shares.iter().sum();
    assert!(shares.iter().all(|s| (0.0..=100.0).contains(s)) && (97.0..=103.0).contains(&sum), "{line}");

    let log = fs::read_to_string(p.path().join("sac.log")).expect("sac.log");
    assert!(log.contains("epoch 1/1: train loss"), "the log file has the summary too");

    let state = p.state("resnet18");
    let record = &state["history"][0];
    let top1 = record["top1"].as_f64().expect("top1 recorded");
    assert!((0.0..=1.0).contains(&top1), "{record}");
    assert!(record["val_loss"].as_f64().is_some_and(f64::is_finite), "{record}");
    assert_eq!(u64_of(&state, "best_epoch"), 1);
    let dir = p.model_dir("resnet18");
    assert!(dir.join("best.safetensors").is_file(), "the best epoch's weights are kept");
    let png = fs::read(dir.join("training.png")).expect("training.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "training.png is a PNG");
}
