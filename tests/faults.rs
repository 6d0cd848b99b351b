//! Fault injection: every way a cluster job breaks, against the real binary under `mpiexec`.
//!
//! Each test injects one fault and checks that the job ends by itself within a bound (30 s after
//! the fault; stall cases `stall_abort` + 10 s), with a non-zero exit code and a message naming
//! the rank and the cause, that no rank is left running, and that the last complete checkpoint
//! loads and resumes to the same weights as an uninterrupted run.
//!
//! Faults come from the `fault-injection` feature (`SAC_FAULT=point:action[@rank][#n]`, see
//! src/infra/fault.rs), from signals the test sends, from a full file system (a small tmpfs) and from
//! damaged files. Fixture: 2 classes, 16 training images of 32×32, batch 4 per rank: with 2 ranks,
//! 2 steps per epoch, so `#3` is the first step of epoch 2.
mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::*;

/// Flags every run here shares: batch 4 per rank.
const BATCH: [&str; 2] = ["--set", "train.batch_size=4"];

fn project() -> Project {
    Project::new(2, 16, 4, 32)
}

/// A finished job and how long it ran after its fault was first logged.
struct Run {
    out: Output,
    fault_to_end: Option<Duration>,
}

/// `mpiexec -n ranks sac train extra…` with `env`, watching `sac.log`: when a line containing
/// `mark` appears, notes the time and calls `at_mark` once (to signal the job).
fn train_watched(
    p: &Project,
    ranks: usize,
    extra: &[&str],
    env: &[(&str, &str)],
    mark: &str,
    at_mark: impl FnMut(&Child),
) -> Run {
    let mut all: Vec<&str> = BATCH.to_vec();
    all.extend_from_slice(extra);
    job_watched(p, ranks, p.args(&all), env, mark, at_mark)
}

/// `train_watched` for any `sac` command line.
fn job_watched(
    p: &Project,
    ranks: usize,
    args: Vec<String>,
    env: &[(&str, &str)],
    mark: &str,
    mut at_mark: impl FnMut(&Child),
) -> Run {
    let child = spawn_mpi_env(p.path(), ranks, &strs(&args), env);
    let log = p.path().join("sac.log");
    let mut seen: Option<Instant> = None;
    let mut last_look = Instant::now();
    let out = wait_with_timeout_and(child, &strs(&args), RUN_TIMEOUT, |child| {
        if seen.is_none() && last_look.elapsed() >= Duration::from_millis(50) {
            last_look = Instant::now();
            if fs::read_to_string(&log).is_ok_and(|t| t.contains(mark)) {
                seen = Some(Instant::now());
                at_mark(child);
            }
        }
    });
    p.assert_no_rank_left();
    Run { out, fault_to_end: seen.map(|t| t.elapsed()) }
}

/// A run with `SAC_FAULT=fault` that must fail: within `bound` of the fault, naming `needles`.
#[track_caller]
fn assert_fault_ends_job(p: &Project, run: &Run, bound: Duration, needles: &[&str]) -> String {
    let text = assert_job_fails_with(&run.out, p, needles);
    let took = run.fault_to_end.unwrap_or_else(|| panic!("the fault never showed in sac.log:\n{text}"));
    assert!(took <= bound, "the job ended {took:?} after the fault, more than {bound:?}:\n{text}");
    eprintln!("job ended {took:?} after the fault, exit code {:?}", run.out.status.code());
    text
}

fn train(p: &Project, ranks: usize, extra: &[&str]) -> Output {
    let mut all: Vec<&str> = BATCH.to_vec();
    all.extend_from_slice(extra);
    p.train_mpi(ranks, &all)
}

/// Trains `epochs` epochs uninterrupted into `checkpoint_dir` (the reference a resumed run must equal).
fn reference(p: &Project, epochs: &str, extra: &[&str]) -> std::path::PathBuf {
    let mut all = vec!["--epochs", epochs, "--set", "paths.checkpoint_dir=reference"];
    all.extend_from_slice(extra);
    assert_success(&train(p, 2, &all));
    p.model_dir_in("reference", "resnet18")
}

/// `--resume` to `epochs`, then the model and optimizer equal the reference's.
#[track_caller]
fn resume_equals_reference(p: &Project, epochs: &str, reference: &Path, extra: &[&str]) -> String {
    let mut all = vec!["--resume", "--epochs", epochs];
    all.extend_from_slice(extra);
    let out = train(p, 2, &all);
    assert_success(&out);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let cmp = compare_safetensors(&reference.join(file), &p.model_dir("resnet18").join(file));
        assert!(cmp.bitwise || cmp.max_abs_diff <= 1e-6, "{file}: resumed run differs from the reference: {cmp:?}");
    }
    stderr(&out)
}

/// The names in `dir` that contain `part`, sorted.
fn names_containing(dir: &Path, part: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect();
    v.sort();
    v
}

fn epoch_of(p: &Project) -> u64 {
    u64_of(&p.state("resnet18"), "epoch")
}

// ------------------------------------------------------------------------------------------------
// A rank fails: panic, kill -9, SIGSTOP
// ------------------------------------------------------------------------------------------------

#[test]
fn panic_on_one_rank_ends_the_job_within_seconds_naming_the_rank_and_the_checkpoint_resumes() {
    let p = project();
    let r = reference(&p, "2", &[]);
    let run = train_watched(&p, 2, &["--epochs", "2"], &[("SAC_FAULT", "step:panic@1#3")], "fault injection", |_| {});
    assert_fault_ends_job(&p, &run, FAILS_WITHIN, &["rank 1 failed", "fault injection: panic at step"]);
    assert_eq!(epoch_of(&p), 1, "epoch 1's checkpoint stays");
    resume_equals_reference(&p, "2", &r, &[]);
}

#[test]
fn kill_9_of_one_rank_mid_step_ends_the_job_and_the_checkpoint_resumes() {
    let p = project();
    let r = reference(&p, "2", &[]);
    let run = train_watched(&p, 2, &["--epochs", "2"], &[("SAC_FAULT", "step:kill@1#3")], "fault injection", |_| {});
    let text = assert_fault_ends_job(&p, &run, FAILS_WITHIN, &[]);
    // The killed rank writes nothing more; the launcher names it.
    let all = format!("{text}\n{}", stdout(&run.out));
    assert!(all.contains("RANK 1") || all.contains("rank 1"), "nothing names rank 1:\n{all}");
    assert_eq!(epoch_of(&p), 1);
    resume_equals_reference(&p, "2", &r, &[]);
}

#[test]
fn sigstop_of_one_rank_is_reported_then_aborted_naming_it() {
    let p = project();
    let limits = ["--set", "train.stall_warn=2", "--set", "train.stall_abort=8"];
    let mut extra = vec!["--epochs", "2"];
    extra.extend_from_slice(&limits);
    // Three ranks: 0 and 2 wait for the stopped rank 1, and each learns from the other's answer
    // that it has arrived.
    let run = train_watched(&p, 3, &extra, &[("SAC_FAULT", "step:stop@1#3")], "fault injection", |_| {});
    let text = assert_fault_ends_job(
        &p,
        &run,
        Duration::from_secs(8 + 10),
        &[
            "stall: this rank has waited",
            "not arrived: rank 1 (no answer",
            "arrived: rank(s) 2",
            "arrived: rank(s) 0",
            "train.stall_abort",
        ],
    );
    assert!(text.contains("ending the job"), "the abort is not logged:\n{text}");
    assert_eq!(epoch_of(&p), 1);
}

#[test]
fn sigterm_while_a_peer_hangs_ends_the_job_after_the_grace_naming_the_peer() {
    let p = project();
    // No stall_abort: only the stop signal can end this job.
    let mut signalled: Option<Instant> = None;
    let run = train_watched(&p, 2, &["--epochs", "2"], &[("SAC_FAULT", "step:stop@1#3")], "fault injection", |c| {
        std::thread::sleep(Duration::from_secs(1));
        signal_group(c, stop_signal());
        signalled = Some(Instant::now());
    });
    let text = assert_fault_ends_job(&p, &run, Duration::from_secs(20 + 10), &["a stop signal arrived", "rank 1"]);
    assert!(signalled.is_some(), "{text}");
}

// ------------------------------------------------------------------------------------------------
// Stop signals during validation and saving
// ------------------------------------------------------------------------------------------------

#[test]
fn sigterm_during_validation_saves_the_epoch_and_stops_and_resume_matches() {
    let p = project();
    let val = ["--set", "train.validate=true"];
    let r = reference(&p, "2", &val);
    let mut extra = vec!["--epochs", "3"];
    extra.extend_from_slice(&val);
    let run = train_watched(&p, 2, &extra, &[("SAC_FAULT", "validate:pause")], "pause at validate", |c| {
        signal_group(c, stop_signal());
    });
    let took = run.fault_to_end.expect("validation was reached");
    eprintln!("job ended {took:?} after the signal, exit code {:?}", run.out.status.code());
    assert_interrupted(&run.out, 2);
    assert!(took <= FAILS_WITHIN, "stopped {took:?} after the signal");
    let state = p.state("resnet18");
    assert_eq!(u64_of(&state, "epoch"), 1, "the epoch whose validation was cut is saved");
    assert!(state["history"][0]["top1"].is_null(), "no validation figures from a cut validation: {state}");
    resume_equals_reference(&p, "2", &r, &val);
}

#[test]
fn sigterm_during_saving_finishes_the_save_then_stops() {
    let p = project();
    let run = train_watched(&p, 2, &["--epochs", "3"], &[("SAC_FAULT", "save:pause")], "pause at save", |c| {
        signal_group(c, stop_signal());
    });
    let took = run.fault_to_end.expect("the save was reached");
    eprintln!("job ended {took:?} after the signal, exit code {:?}", run.out.status.code());
    assert_interrupted(&run.out, 2);
    assert!(took <= FAILS_WITHIN);
    let dir = p.model_dir("resnet18");
    sac::checkpoint::Store::verify(&dir.join("epoch-0001")).expect("epoch 1 saved whole");
    assert_eq!(epoch_of(&p), 1);
}

#[test]
fn sigkill_between_the_files_of_a_save_keeps_the_previous_epoch_and_resume_matches() {
    let p = project();
    let r = reference(&p, "2", &[]);
    // Hits 1-3 are epoch 1's files; #4 comes after epoch 2's model file.
    let run = train_watched(
        &p,
        2,
        &["--epochs", "2"],
        &[("SAC_FAULT", "save-between-files:kill#4")],
        "fault injection",
        |_| {},
    );
    assert_fault_ends_job(&p, &run, FAILS_WITHIN, &[]);
    let dir = p.model_dir("resnet18");
    assert_eq!(fs::read_link(dir.join("latest")).unwrap(), Path::new("epoch-0001"), "epoch 1 stays published");
    assert!(!dir.join("epoch-0002").exists(), "an unfinished epoch is never renamed into place");
    assert_eq!(epoch_of(&p), 1);
    let err = resume_equals_reference(&p, "2", &r, &[]);
    assert!(err.contains("resuming after epoch 1"), "{err}");
    let left = names_containing(&dir, ".tmp-");
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

// ------------------------------------------------------------------------------------------------
// The file system and damaged checkpoints
// ------------------------------------------------------------------------------------------------

/// A tmpfs of `size` mounted at `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting a tmpfs at {} failed (the test command runs as root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_checkpoint_file_system_fails_naming_the_cause_and_keeps_the_previous_epoch() {
    let p = project();
    // SGD keeps one state tensor: an epoch is ~90 MB (model + momentum); room for one, not two.
    let _fs = Tmpfs::mount(&p.path().join("checkpoints"), "150m");
    let out = train(&p, 2, &["--epochs", "2", "--set", "train.optimizer=sgd"]);
    assert_job_fails_with(&out, &p, &["saving the checkpoint of epoch 2", "No space left on device"]);
    let dir = p.model_dir("resnet18");
    sac::checkpoint::Store::verify(&dir.join("epoch-0001")).expect("epoch 1 stays whole");
    assert_eq!(epoch_of(&p), 1);
    let left = names_containing(&dir, ".tmp-");
    assert!(left.is_empty(), "a failed save leaves nothing behind: {left:?}");
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_on_resume_and_matches() {
    let p = project();
    let r = reference(&p, "2", &[]);
    assert_success(&train(&p, 2, &["--epochs", "2"]));
    let newest = p.model_dir("resnet18").join("epoch-0002/model.safetensors");
    let len = fs::metadata(&newest).unwrap().len();
    fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len / 2).unwrap();
    let err = resume_equals_reference(&p, "2", &r, &[]);
    assert!(err.contains("epoch 2 is not usable") && err.contains("truncated"), "{err}");
    assert!(err.contains("falling back to epoch 1"), "{err}");
}

#[test]
fn corrupt_bytes_in_every_checkpoint_are_refused_naming_each_epoch() {
    let p = project();
    assert_success(&train(&p, 2, &["--epochs", "2"]));
    let dir = p.model_dir("resnet18");
    for e in ["epoch-0001", "epoch-0002"] {
        let f = dir.join(e).join("optimizer.safetensors");
        let mut bytes = fs::read(&f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&f, bytes).unwrap();
    }
    let out = train(&p, 2, &["--resume", "--epochs", "3"]);
    assert_job_fails_with(&out, &p, &["no complete checkpoint", "epoch 2:", "epoch 1:", "checksum"]);
}

// ------------------------------------------------------------------------------------------------
// Non-finite numbers
// ------------------------------------------------------------------------------------------------

/// Every float tensor of a checkpoint file is finite.
#[track_caller]
fn assert_finite(path: &Path) {
    let (tensors, _) = sac::checkpoint::read_safetensors(path).unwrap();
    let bad = sac::checkpoint::first_non_finite(tensors.iter());
    assert!(bad.is_none(), "{} holds non-finite values in {bad:?}", path.display());
}

#[test]
fn one_image_remainders_of_the_issue_reproduction_train_to_finite_numbers() {
    // The reproduction: 12 Fashion-MNIST images, 2 ranks, 32×32, batch 2: a rank's last batch
    // held one image and layer4's batch-norm statistics became NaN.
    let dir = tempdir();
    write_config(
        dir.path(),
        "[paths]\nlog_file = \"sac.log\"\n[dataset]\nformat = \"idx\"\n\
         source = \"/usr/share/datasets/fashion-mnist\"\n[train]\nthreads = 1\n",
    );
    assert_success(&create_dataset(dir.path(), &["--sample", "12"]));
    let config = dir.path().join("config.toml");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "train",
        "--epochs",
        "1",
        "--set",
        "image.width=32",
        "--set",
        "image.height=32",
        "--set",
        "train.batch_size=2",
    ];
    let out = run_mpi(dir.path(), 2, &args, RUN_TIMEOUT);
    assert_success(&out);
    let ck = dir.path().join("checkpoints/resnet18");
    assert_finite(&ck.join("model.safetensors"));
    let state = read_json(&ck.join("state.json"));
    let val = state["history"][0]["val_loss"].as_f64().expect("a validation loss");
    assert!(val.is_finite(), "val loss {val}");
}

#[test]
fn non_finite_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_checkpoint() {
    let p = project();
    let run = train_watched(&p, 2, &["--epochs", "2"], &[("SAC_FAULT", "loss:nan@1#3")], "fault injection", |_| {});
    assert_fault_ends_job(&p, &run, FAILS_WITHIN, &["epoch 2, step 1/2", "not finite", "train.on_nonfinite"]);
    assert_eq!(epoch_of(&p), 1);
    assert_finite(&p.model_dir("resnet18").join("model.safetensors"));
}

#[test]
fn non_finite_steps_are_left_out_and_counted_under_skip() {
    let p = project();
    let out = train(&p, 2, &["--epochs", "2", "--set", "train.on_nonfinite=skip"]);
    // Without the fault, for the step count of a clean run.
    assert_success(&out);
    let clean_steps = u64_of(&p.state("resnet18"), "steps");
    let q = project();
    let run = train_watched(
        &q,
        2,
        &["--epochs", "2", "--set", "train.on_nonfinite=skip"],
        &[("SAC_FAULT", "loss:nan@1#3")],
        "fault injection",
        |_| {},
    );
    assert_success(&run.out);
    let state = q.state("resnet18");
    assert_eq!(state["history"][1]["nonfinite_steps"].as_u64(), Some(1), "{state}");
    assert_eq!(u64_of(&state, "steps"), clean_steps - 1, "the bad step made no update");
    assert_finite(&q.model_dir("resnet18").join("model.safetensors"));
}

// ------------------------------------------------------------------------------------------------
// Starting over, resuming elsewhere, evaluating the wrong data
// ------------------------------------------------------------------------------------------------

#[test]
fn training_over_an_existing_checkpoint_is_refused_unless_resume_or_overwrite() {
    let p = project();
    assert_success(&train(&p, 2, &["--epochs", "2"]));
    let model = p.model_dir("resnet18").join("model.safetensors");
    let before = fs::read(&model).unwrap();
    let out = train(&p, 2, &["--epochs", "1"]);
    assert_job_fails_with(&out, &p, &["already holds a checkpoint (epoch 2)", "--resume", "--overwrite"]);
    assert_eq!(fs::read(&model).unwrap(), before, "the checkpoint is untouched");
    assert_success(&train(&p, 2, &["--epochs", "1", "--overwrite"]));
    assert_eq!(epoch_of(&p), 1);
    let epochs = names_containing(&p.model_dir("resnet18"), "epoch-");
    assert_eq!(epochs, ["epoch-0001"], "the old run's epochs are gone");
}

#[test]
fn resume_with_another_rank_count_continues_and_says_what_changes() {
    let p = project();
    assert_success(&train(&p, 2, &["--epochs", "1"]));
    let out = train(&p, 3, &["--resume", "--epochs", "2"]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("written by 2 rank(s), this run has 3") && err.contains("from 8 to 12"), "{err}");
    let state = p.state("resnet18");
    assert_eq!((u64_of(&state, "epoch"), u64_of(&state, "world_size")), (2, 3));
}

#[test]
fn evaluate_refuses_a_checkpoint_trained_with_another_class_map() {
    let p = project();
    assert_success(&train(&p, 2, &["--epochs", "1"]));
    // The same class count, other category ids: a re-created data dir.
    let classes = p.data().join("classes.csv");
    let text = fs::read_to_string(&classes).unwrap().replace("1,10,class1", "1,11,class1");
    fs::write(&classes, text).unwrap();
    let config = p.path().join("config.toml");
    let out = run_mpi(p.path(), 2, &["--config", config.to_str().unwrap(), "evaluate"], RUN_TIMEOUT);
    assert_job_fails_with(&out, &p, &["another class map", "label 1 is category 10 there and 11 in classes.csv"]);
    assert!(!p.path().join("output/predictions.csv").exists(), "nothing written");
}

#[test]
fn sigstop_of_a_predictor_in_the_evaluate_pipeline_is_reported_and_aborted_naming_it() {
    let p = project();
    assert_success(&train(&p, 2, &["--epochs", "1"]));
    let config = p.path().join("config.toml");
    let args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--set",
        "train.stall_warn=2",
        "--set",
        "train.stall_abort=6",
        "evaluate",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = job_watched(&p, 4, args, &[("SAC_FAULT", "predict:stop@3")], "fault injection", |_| {});
    assert_fault_ends_job(&p, &run, Duration::from_secs(6 + 10), &["stall: this rank has waited", "rank 3 (no answer"]);
}
