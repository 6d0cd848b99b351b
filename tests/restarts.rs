//! Restarts: jobs/sac-job.sh starts a failed training again with `--resume` (`SAC_RESTARTS`), and
//! leaves alone what a restart cannot mend: a configuration error (exit 2), a budget spent, an
//! attempt that saved no new epoch.
//!
//! The job script runs as a batch job runs it (`SLURM_NTASKS=2` gives the rank count, `CONFIG`
//! and `SAC_ARGS` the run), under the MPI of the tests (`SAC_MPIEXEC`, common::launcher_flags).
//! Faults come from the `fault-injection` feature; `SAC_FAULT_ONCE` lets the first attempt alone
//! meet one. Fixture: 2 classes, 16 training images of 32×32, batch 4 per rank: with 2 ranks, 2
//! steps per epoch, so `step:kill@1#3` kills rank 1 at the first step of epoch 2.
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn project() -> Project {
    Project::new(2, 16, 4, 32)
}

/// `bash jobs/sac-job.sh train` on 2 ranks with `SAC_ARGS` = batch 4 + `args`, and `env`.
fn job(p: &Project, args: &str, env: &[(&str, &str)]) -> Output {
    job_and(p, args, env, |_| {})
}

/// `job`, calling `tick(&child)` every few milliseconds while the job script runs.
fn job_and(p: &Project, args: &str, env: &[(&str, &str)], tick: impl FnMut(&std::process::Child)) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/sac-job.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg("train");
    cmd.env("CONFIG", p.path().join("config.toml"))
        .env("SAC_BIN", sac_bin())
        .env("SAC_MPIEXEC", launcher_flags().join(" "))
        .env("SLURM_NTASKS", "2")
        .env("SAC_ARGS", format!("--set train.batch_size=4 {args}"))
        .env_remove("SLURM_JOB_ID")
        .env_remove("PBS_JOBID")
        .env_remove("SAC_RESTARTS")
        .env_remove("SAC_FAULT")
        .env_remove("SAC_FAULT_ONCE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out =
        wait_with_timeout_and(spawn(&mut cmd, p.path()), &["sac-job.sh", "train"], Duration::from_secs(300), tick);
    p.assert_no_rank_left();
    out
}

/// The lines of the job script's own messages.
fn job_lines(out: &Output) -> Vec<String> {
    stderr(out).lines().filter(|l| l.starts_with("sac-job: ")).map(str::to_string).collect()
}

fn attempts(out: &Output) -> usize {
    // "sac-job: sac train exited with status N after S s", once per attempt (not the line that
    // reads a clean stop behind the launcher's status: "mpiexec exited with status 0, but ...").
    job_lines(out).iter().filter(|l| l.starts_with("sac-job: sac train exited with status")).count()
}

fn epoch_of(p: &Project) -> u64 {
    u64_of(&p.state("resnet18"), "epoch")
}

#[test]
fn a_rank_killed_in_epoch_2_restarts_once_and_ends_with_the_weights_of_an_uninterrupted_run() {
    let p = project();
    assert_success(
        &p.train_mpi(2, &["--set", "train.batch_size=4", "--epochs", "3", "--set", "paths.checkpoint_dir=reference"]),
    );
    let once = p.path().join("fault-fired");
    let out = job(&p, "--epochs 3", &[("SAC_FAULT", "step:kill@1#3"), ("SAC_FAULT_ONCE", once.to_str().unwrap())]);
    let err = stderr(&out);
    eprintln!("{}", job_lines(&out).join("\n"));
    assert!(out.status.success(), "the job failed ({:?}):\n{err}", out.status);
    assert!(once.exists(), "the fault never fired:\n{err}");
    assert_eq!(attempts(&out), 2, "one failed attempt and one restart:\n{err}");
    let restart: Vec<String> = job_lines(&out).into_iter().filter(|l| l.contains("restart 1 of 2 after")).collect();
    assert_eq!(restart.len(), 1, "{err}");
    assert!(restart[0].contains("resuming after epoch 1 (of 3)"), "{}", restart[0]);
    assert!(stderr(&out).contains("with 1 restart(s)"), "{err}");
    assert_eq!(epoch_of(&p), 3);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let cmp = compare_safetensors(
            &p.model_dir_in("reference", "resnet18").join(file),
            &p.model_dir("resnet18").join(file),
        );
        assert!(
            cmp.bitwise || cmp.max_abs_diff <= 1e-6,
            "{file}: the restarted run differs from the reference: {cmp:?}"
        );
    }
    // The progress file goes once the job has succeeded.
    let left: Vec<_> = std::fs::read_dir(p.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(".sac-job."))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_configuration_error_exits_2_and_is_not_retried() {
    let p = project();
    let out = job(&p, "--epochs 2 --set train.batch_size=four", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(attempts(&out), 1, "{err}");
    assert!(err.contains("train.batch_size"), "the error names the key:\n{err}");
    assert!(err.contains("not restarting: the configuration"), "{err}");
}

#[test]
fn restarts_stop_when_the_budget_is_spent() {
    let p = project();
    // Each attempt's rank 1 dies at its own third step: every attempt saves one epoch more, so only
    // the budget stops the job.
    let out = job(&p, "--epochs 4", &[("SAC_FAULT", "step:kill@1#3"), ("SAC_RESTARTS", "1")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the job should have failed:\n{err}");
    assert_eq!(attempts(&out), 2, "{err}");
    assert!(err.contains("restart 1 of 1 after"), "{err}");
    assert!(err.contains("not restarting: the restarts are used up (SAC_RESTARTS=1)"), "{err}");
    assert_eq!(epoch_of(&p), 2, "epoch 1 from the first attempt, epoch 2 from the restart");
}

#[test]
fn an_attempt_that_saves_no_epoch_is_not_restarted() {
    let p = project();
    let out = job(&p, "--epochs 2", &[("SAC_FAULT", "step:kill@1#1")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the job should have failed:\n{err}");
    assert_eq!(attempts(&out), 1, "{err}");
    assert!(err.contains("not restarting: this attempt saved no new epoch"), "{err}");
}

/// `sbatch --signal=B:USR1@<s>` signals the job script ahead of the time limit: it passes the stop
/// on to the launcher in the form its ranks get at once, every rank stops at a safe point, and the
/// job ends with 130 (not restarted) and its last checkpoint intact.
#[test]
fn usr1_to_the_job_script_stops_every_rank_at_a_safe_point_with_130_and_no_restart() {
    let p = project();
    let state = p.model_dir("resnet18").join("state.json");
    let mut sent = false;
    let out = job_and(&p, "--epochs 1000", &[], |child| {
        if !sent && state.exists() {
            // SAFETY: kill(2) on the job script's own pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
            sent = true;
        }
    });
    let err = stderr(&out);
    assert!(sent, "no epoch was saved:\n{err}");
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(attempts(&out), 1, "{err}");
    assert!(err.contains("received SIGUSR1"), "{err}");
    assert!(err.contains("continue it by resubmitting with --resume"), "{err}");
    let log = std::fs::read_to_string(p.path().join("sac.log")).unwrap();
    assert_eq!(log.matches("on a signal").count(), 2, "both ranks stop at a safe point:\n{log}");
    assert!(epoch_of(&p) >= 1);
}
