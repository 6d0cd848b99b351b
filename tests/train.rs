//! `sac train` and `sac mpi-check`, end to end: the real binary, under `mpiexec` where the
//! behaviour is about ranks, on tiny generated data dirs (32×32 PNGs, a handful of images, one
//! torch thread per rank). Every run has a timeout, so a rank left waiting in a collective fails the
//! test instead of hanging it.
//!
//! `run_mpi` returns only once mpiexec has exited and every rank has closed its end of the output
//! pipes, so a test that gets an `Output` back also knows that no rank is left running.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Any run of `sac` here is killed (and its test failed) after this.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A failing job must end this fast: an abort reaches every rank in well under a second, a hang
/// would last until the timeout.
const FAILS_WITHIN: Duration = Duration::from_secs(30);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// A project dir: `config.toml`, and `data/` written by [`write_data_dir`] (image `i` has label
/// `i % classes`). The config trains resnet18 on `side`×`side` images, 1 epoch, batch 2 per rank,
/// one torch thread, no validation; tests change what they need with flags and `--set`.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(classes: usize, n_train: usize, n_test: usize, side: u32) -> Project {
        let dir = tempdir();
        write_data_dir(&dir.path().join("data"), classes, n_train, n_test, side);
        write_config(
            dir.path(),
            &format!(
                "[paths]\ndata_dir = \"data\"\ncheckpoint_dir = \"checkpoints\"\nlog_file = \"sac.log\"\n\n\
                 [image]\nwidth = {side}\nheight = {side}\n\n[model]\nname = \"resnet18\"\n\n\
                 [train]\nepochs = 1\nbatch_size = 2\nthreads = 1\nvalidate = false\n"
            ),
        );
        Project { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// `--config <abs> train extra…`
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let config = self.path().join("config.toml");
        let mut args = vec!["--config".to_string(), config.to_str().expect("utf-8 temp path").to_string()];
        args.push("train".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `mpiexec -n ranks sac train extra…`; also fails unless every rank is gone once it returns.
    fn train_mpi(&self, ranks: usize, extra: &[&str]) -> Output {
        let args = self.args(extra);
        let out = run_mpi(self.path(), ranks, &strs(&args), RUN_TIMEOUT);
        self.assert_no_rank_left();
        out
    }

    /// No process of this project (its config path is on every rank's command line) is running.
    #[track_caller]
    fn assert_no_rank_left(&self) {
        assert_no_process_left(self.path().join("config.toml").to_str().unwrap(), Duration::from_secs(5));
    }

    /// `sac train extra…` as one plain process (no mpiexec).
    fn train(&self, extra: &[&str]) -> Output {
        let args = self.args(extra);
        run_sac_with_timeout(self.path(), &strs(&args), RUN_TIMEOUT)
    }

    /// `checkpoints/<arch>/` (or `<checkpoint_dir>/<arch>/` for another checkpoint dir).
    fn model_dir_in(&self, checkpoint_dir: &str, arch: &str) -> PathBuf {
        self.path().join(checkpoint_dir).join(arch)
    }

    fn model_dir(&self, arch: &str) -> PathBuf {
        self.model_dir_in("checkpoints", arch)
    }

    fn state(&self, arch: &str) -> Value {
        read_json(&self.model_dir(arch).join("state.json"))
    }

    /// Points row `row` of train.csv at a file of garbage bytes named `corrupt.png`; returns its path.
    fn corrupt_train_row(&self, row: usize) -> PathBuf {
        let bad = self.data().join("img/train/corrupt.png");
        // Not an image of any format: what a truncated copy or a disk error leaves behind.
        fs::write(&bad, (0..600u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>()).unwrap();
        let csv_path = self.data().join("train.csv");
        let csv = fs::read_to_string(&csv_path).unwrap();
        let mut lines: Vec<String> = csv.lines().map(str::to_string).collect();
        let fields: Vec<&str> = lines[row + 1].splitn(2, ',').collect();
        lines[row + 1] = format!("img/train/corrupt.png,{}", fields[1]);
        fs::write(&csv_path, lines.join("\n") + "\n").unwrap();
        bad
    }
}

/// What a failed job reported: its stderr, then its log file. An MPI job's failure is checked
/// against both because the last lines a rank writes to stderr just before `MPI_Abort` can be lost:
/// hydra's proxy is killed before it forwards them (a few % of runs under load; see
/// `error_of_an_aborting_rank_always_reaches_stderr`). The log file is written synchronously, so
/// it always has them.
#[track_caller]
fn assert_job_fails_with(out: &Output, p: &Project, needles: &[&str]) -> String {
    let err = stderr(out);
    match out.status.code() {
        Some(0) => panic!("the job succeeded but should have failed; stderr:\n{err}"),
        None => panic!("the job was killed by a signal ({:?}); stderr:\n{err}", out.status),
        Some(_) => {}
    }
    let log = fs::read_to_string(p.path().join("sac.log")).unwrap_or_default();
    let text = format!("{err}\n--- sac.log ---\n{log}");
    assert!(!text.contains("panicked at"), "sac panicked:\n{text}");
    for n in needles {
        assert!(text.contains(n), "neither stderr nor sac.log has {n:?}:\n{text}");
    }
    text
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

/// Runs `python -c code args…` with the venv's python; fails the test with its output unless it
/// exits 0. Returns stdout.
fn python(code: &str, args: &[&str]) -> String {
    let child = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the venv's python (scripts/setup.sh installs it; or set SAC_PYTHON)");
    let out = wait_with_timeout(child, &["python"], RUN_TIMEOUT);
    assert!(out.status.success(), "python failed ({:?}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
    stdout(&out)
}

/// How two safetensors files of the same model compare.
#[derive(Debug)]
struct Comparison {
    /// Same names, dtypes, shapes, metadata, and every tensor's bytes equal.
    bitwise: bool,
    /// Largest |a - b| over the float tensors.
    max_abs_diff: f64,
}

/// Compares two safetensors files tensor by tensor; panics if their names, dtypes, shapes or
/// metadata differ.
fn compare_safetensors(a: &Path, b: &Path) -> Comparison {
    use safetensors::{Dtype, SafeTensors};
    let (ba, bb) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    let (sa, sb) = (SafeTensors::deserialize(&ba).unwrap(), SafeTensors::deserialize(&bb).unwrap());
    let meta = |bytes: &[u8]| SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone();
    assert_eq!(meta(&ba), meta(&bb), "metadata of {} and {}", a.display(), b.display());
    let (mut na, mut nb) = (sa.names(), sb.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "tensor names of {} and {}", a.display(), b.display());
    let mut cmp = Comparison { bitwise: true, max_abs_diff: 0.0 };
    for name in na {
        let (ta, tb) = (sa.tensor(name).unwrap(), sb.tensor(name).unwrap());
        assert_eq!((ta.dtype(), ta.shape()), (tb.dtype(), tb.shape()), "tensor {name}");
        if ta.data() == tb.data() {
            continue;
        }
        cmp.bitwise = false;
        match ta.dtype() {
            Dtype::F32 => {
                let f =
                    |d: &[u8]| d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
                for (x, y) in f(ta.data()).into_iter().zip(f(tb.data())) {
                    cmp.max_abs_diff = cmp.max_abs_diff.max(f64::from((x - y).abs()));
                }
            }
            d => panic!("tensor {name} ({d:?}) differs between {} and {}", a.display(), b.display()),
        }
    }
    cmp
}

/// The metadata of a safetensors file (fails unless it parses completely).
fn safetensors_metadata(path: &Path) -> BTreeMap<String, String> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} is not safetensors: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default().into_iter().collect()
}

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
    }
}

#[test]
fn uneven_shards_of_7_images_over_2_and_3_ranks_finish_without_hanging() {
    let p = Project::new(2, 7, 0, 32);
    // Batch 2 per rank. Over 2 ranks the shards hold 4 and 3 images: the second step has 2 and 1.
    // Over 3 ranks they hold 3, 2 and 2: in the second step two ranks have no image at all.
    for ranks in [2, 3] {
        let ck = format!("ck{ranks}");
        let out = p.train_mpi(ranks, &["--epochs", "1", "--set", &format!("paths.checkpoint_dir={ck}")]);
        assert_success(&out);
        let err = stderr(&out);
        assert!(err.contains(&format!("7 training images over {ranks} ranks")), "{err}");
        let state = read_json(&p.model_dir_in(&ck, "resnet18").join("state.json"));
        assert_eq!(u64_of(&state, "epoch"), 1, "{state}");
        assert_eq!(u64_of(&state, "world_size"), ranks as u64);
        // Every rank runs as many steps as the largest shard needs: ceil(ceil(7 / N) / 2) = 2.
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

// ------------------------------------------------------------------------------------------------
// Architectures
// ------------------------------------------------------------------------------------------------

/// One training step (2 images, batch 2, one process) of `arch` on `side`×`side` images, its
/// smallest input; one pixel less is refused with a message that names the minimum.
fn trains_one_step_at_its_minimum_input_size(arch: &str, side: u32) {
    let p = Project::new(2, 2, 0, 32);
    let (w, h) = (format!("image.width={side}"), format!("image.height={side}"));
    let out = p.train(&["--model", arch, "--epochs", "1", "--set", &w, "--set", &h]);
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
fn resume_refuses_a_checkpoint_of_another_architecture_naming_both() {
    let p = Project::new(2, 4, 0, 32);
    assert_success(&p.train(&["--epochs", "1"]));
    // A resnet18 checkpoint where squeezenet's would be.
    let (from, to) = (p.model_dir("resnet18"), p.model_dir("squeezenet"));
    fs::create_dir_all(&to).unwrap();
    for e in fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
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
    // state.json is renamed into place last: once it exists, epoch 1's checkpoint is complete.
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
    signal_group(&child, libc::SIGTERM);
    let t = Instant::now();
    let out = wait_with_timeout(child, &strs(&args), Duration::from_secs(60));
    let stopped_in = t.elapsed();
    p.assert_no_rank_left();
    let err = stderr(&out);
    assert!(stopped_in < FAILS_WITHIN, "the job took {stopped_in:?} to stop");
    // Every rank stopped at the same step boundary and took the interrupted exit (code 130).
    for rank in 0..2 {
        assert!(
            err.lines().any(|l| l.contains(&format!("WARN [rank {rank}] stopping at epoch")) && l.contains("--resume")),
            "rank {rank} did not report stopping with a hint to --resume:\n{err}"
        );
    }
    assert_eq!(err.matches("training stopped by a signal").count(), 2, "{err}");
    // Every rank exits with 130, and mpiexec usually passes that on. But MPICH 4.0's hydra
    // sometimes loses the exit statuses of ranks it forwarded a signal to and then exits 0 (about
    // 1 run in 4 with a minimal C program that exits 130 on SIGTERM): accept 0 only then, when
    // both ranks are known (above) to have taken the interrupted exit.
    match out.status.code() {
        Some(130) => {}
        Some(0) => eprintln!("mpiexec exited 0 although both ranks exited 130 (hydra lost their statuses)"),
        other => panic!("exit status {other:?} (want 130); stderr:\n{err}"),
    }

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
