//! sac across hosts, on the emulated cluster of `tests/multinode/run.sh` (network namespaces with
//! their own hostnames and cores, joined by tc-shaped veth links, MPICH's Hydra or Open MPI's
//! launcher starting through a stand-in for ssh): the short profile of the issue "Across nodes for
//! real". Needs root. Under the MPI of the tests (common::mpi).
//!
//! - mpi-check across 2 hosts: exact averaging, the placement (hosts, local ranks, threads) right,
//!   and the traffic between hosts really on the shaped link (its bandwidth follows the shaping);
//! - training across 2 hosts gives the weights of the same job on one host, and rank 0 writes the
//!   checkpoint once; evaluation across hosts gives the one-host metrics and predictions;
//! - the script tears its cluster down when the command fails and when it times out.
mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The script's own limit on the command; the test's limit is a little longer, so that a hang
/// shows up as the script's timeout (exit 124, cluster removed) rather than as a killed script.
const CLUSTER_TIMEOUT: u64 = 240;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/multinode/run.sh")
}

/// `run.sh OPTIONS -- COMMAND` in `dir`.
fn on_cluster(dir: &std::path::Path, options: &[&str], command: &[&str]) -> Output {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the emulated cluster needs root (network namespaces, tc)");
    let limit = CLUSTER_TIMEOUT.to_string();
    let mut cmd = Command::new(script());
    cmd.args(["--timeout", &limit]).args(options).arg("--").args(command);
    let all: Vec<&str> = options.iter().chain(command).copied().collect();
    let out = wait_with_timeout(spawn(&mut cmd, dir), &all, Duration::from_secs(CLUSTER_TIMEOUT + 60));
    assert_cluster_removed(&out);
    out
}

/// The cluster named in the script's stderr ("multinode: 2 host(s) (sacmn<pid>-h0 ..") is gone:
/// no namespace and no /etc/netns entry of it is left.
#[track_caller]
fn assert_cluster_removed(out: &Output) {
    let err = stderr(out);
    let Some(tag) = err.split(" host(s) (").nth(1).and_then(|rest| rest.split("-h0").next()) else {
        panic!("the script did not name its cluster; stderr:\n{err}");
    };
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{tag}-")))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "namespaces of {tag} left behind: {left:?}");
    let etc: Vec<_> = fs::read_dir("/etc/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_else(|_| Vec::new());
    assert!(
        !etc.iter().any(|n: &String| n.starts_with(&format!("{tag}-"))),
        "/etc/netns entries of {tag} left: {etc:?}"
    );
}

fn sac() -> String {
    sac_bin().to_str().expect("utf-8 path").to_string()
}

/// The command line up to sac's arguments that starts `ranks` ranks of the MPI under test
/// (common::mpi) on the emulated hosts: Hydra's `mpiexec -f HOSTFILE`, or Open MPI's
/// `mpiexec.openmpi --hostfile HOSTFILE` (run.sh adds what makes either launch through its
/// stand-in for ssh, and gives Open MPI a host file of its own format).
fn launch(ranks: usize) -> Vec<String> {
    let head: [&str; 3] = match mpi() {
        Mpi::Mpich => ["mpiexec", "-f", "HOSTFILE"],
        Mpi::OpenMpi => ["mpiexec.openmpi", "--hostfile", "HOSTFILE"],
    };
    let mut v: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    v.extend(["-n".to_string(), ranks.to_string(), sac()]);
    v
}

/// The number after `key` in `line` ("bandwidth 0.94 Gb/s" → 0.94).
fn number_after(line: &str, key: &str) -> f64 {
    line.split(key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

/// mpi-check on 2 hosts × 2 ranks with links of `rate` (a tc rate): its stdout.
fn mpi_check(rate: &str) -> String {
    let dir = tempdir();
    let out = on_cluster(
        dir.path(),
        &["--hosts", "2", "--ranks-per-host", "2", "--cores-per-host", "2", "--profile", rate],
        &strs(&[launch(4), vec!["mpi-check".into(), "--reps".into(), "1".into()]].concat()),
    );
    assert_success(&out);
    stdout(&out)
}

#[test]
fn mpi_check_across_two_hosts_is_exact_places_the_ranks_and_uses_the_shaped_link() {
    let mut between = Vec::new();
    for (rate, mbit) in [("250mbit", 250.0), ("1gbit", 1000.0)] {
        let text = mpi_check(rate);
        let line = |key: &str| {
            text.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no line with {key:?}; stdout:\n{text}"))
        };
        assert!(line("relative error").trim_end().ends_with("exact"), "{text}");
        // Hydra placed ranks 0, 1 on the first host and 2, 3 on the second; MPI's node grouping
        // agrees (no warning), so each rank has the host's 2 cores over its 2 ranks: 1 thread.
        let placement = line("placement:");
        assert!(placement.contains("4 rank(s) on 2 node(s)"), "{placement}");
        assert!(placement.contains("-h0: rank(s) 0, 1 (1 thread(s) each)"), "{placement}");
        assert!(placement.contains("-h1: rank(s) 2, 3 (1 thread(s) each)"), "{placement}");
        assert!(!text.contains("warning"), "{text}");
        assert!(line("MPI transport:").contains("UCX_TLS=tcp"), "{text}");
        // Rank 0 to rank 2 crosses the link: at most its shaped rate (10 % for the measurement),
        // which a path around it (shared memory, loopback: several Gb/s here) would exceed.
        let far = line("link rank 0 <-> rank 2");
        assert!(far.contains("-h0 <-> ") && far.contains("-h1)"), "{far}");
        let gbit = number_after(far, "bandwidth ");
        assert!(gbit * 1000.0 <= 1.1 * mbit, "{rate} link, measured {gbit} Gb/s: {far}");
        assert!(line("link rank 0 <-> rank 1").contains("same node"), "{text}");
        between.push(gbit);
    }
    // And it follows the shaping: four times the rate, well over twice the bandwidth.
    assert!(between[1] > 2.0 * between[0], "250 Mb/s vs 1 Gb/s links measured {between:?} Gb/s");
}

#[test]
fn training_and_evaluation_across_two_hosts_equal_the_one_host_run() {
    let p = Project::new(3, 24, 12, 32);
    let config = p.path().join("config.toml");
    let config = config.to_str().unwrap();
    // On one host: 4 ranks, 1 thread each (2 cores / 4 ranks, the default train.threads = 0).
    let one = ["--set", "train.threads=0", "--set", "paths.checkpoint_dir=one", "--set", "paths.log_file=one.log"];
    let out = p.train_mpi(4, &one);
    assert_success(&out);
    // On two hosts of 1 core each: 2 ranks per host, so again 1 thread each.
    let mut multi = launch(4);
    multi.extend(
        ["--config", config, "train", "--set", "train.threads=0", "--set", "paths.checkpoint_dir=multi"]
            .map(String::from),
    );
    multi.extend(["--set", "paths.log_file=multi.log"].map(String::from));
    let out = on_cluster(
        p.path(),
        &["--hosts", "2", "--ranks-per-host", "2", "--cores-per-host", "1", "--profile", "1g"],
        &strs(&multi),
    );
    assert_success(&out);
    let log = fs::read_to_string(p.path().join("multi.log")).unwrap();
    assert!(log.contains("placement: 4 rank(s) on 2 node(s)"), "{log}");
    assert!(
        log.contains("-h0: rank(s) 0, 1 (1 thread(s) each)") && log.contains("-h1: rank(s) 2, 3 (1 thread(s) each)"),
        "{log}"
    );
    assert!(log.contains("1 torch thread(s) per rank"), "{log}");
    // Rank 0 alone writes the checkpoint, once.
    let written: Vec<&str> = log.lines().filter(|l| l.contains("checkpoint of epoch 1 written")).collect();
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].contains("[rank 0]"), "{written:?}");
    let (a, b) = (p.model_dir_in("one", "resnet18"), p.model_dir_in("multi", "resnet18"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let cmp = compare_safetensors(&a.join(file), &b.join(file));
        eprintln!("{file}: one host vs two: {cmp:?}");
        assert!(cmp.bitwise || cmp.max_abs_diff <= 1e-6, "{file} differs between one host and two: {cmp:?}");
    }

    // Evaluation: the pipeline's stages (reader, decoder, normaliser, predictor) on two hosts.
    let ckpt = b.join("model.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    let eval = |out_dir: &str| -> Vec<String> {
        vec![
            "--config".into(),
            config.into(),
            "--set".into(),
            format!("paths.output_dir={out_dir}"),
            "--set".into(),
            format!("paths.log_file={out_dir}.log"),
            "evaluate".into(),
            "--checkpoint".into(),
            ckpt.into(),
        ]
    };
    let args = eval("eval_one");
    assert_success(&run_mpi(p.path(), 4, &strs(&args), RUN_TIMEOUT));
    let mut multi = launch(4);
    multi.extend(eval("eval_multi"));
    let out = on_cluster(p.path(), &["--hosts", "2", "--ranks-per-host", "2", "--cores-per-host", "1"], &strs(&multi));
    assert_success(&out);
    let log = fs::read_to_string(p.path().join("eval_multi.log")).unwrap();
    assert!(log.contains("placement: 4 rank(s) on 2 node(s)"), "{log}");
    let (one, two) = (p.path().join("eval_one"), p.path().join("eval_multi"));
    assert_eq!(
        fs::read_to_string(one.join("predictions.csv")).unwrap(),
        fs::read_to_string(two.join("predictions.csv")).unwrap(),
        "predictions of one host and two"
    );
    let metrics = |d: &std::path::Path| {
        // The figures, not the timings.
        let m = read_json(&d.join("metrics.json"));
        ["images", "skipped_images", "labeled", "top1", "top5", "macro_f1", "loss", "ranks", "mode"]
            .map(|k| (k, m[k].clone()))
            .to_vec()
    };
    assert_eq!(metrics(&one), metrics(&two), "metrics of one host and two");
}

#[test]
fn the_cluster_is_removed_when_the_command_fails_or_times_out() {
    let dir = tempdir();
    // A failing job: a config file that does not exist, on every rank.
    let out = on_cluster(
        dir.path(),
        &["--hosts", "2"],
        &strs(&[launch(2), ["--config", "no-such.toml", "train"].map(String::from).to_vec()].concat()),
    );
    assert_fails_with(&out, &["no-such.toml"]);
    // A command that outlives the time limit: killed, exit 124, and still torn down.
    let mut cmd = Command::new(script());
    cmd.args(["--hosts", "2", "--timeout", "3", "--", "mpiexec", "-f", "HOSTFILE", "-n", "2", "sleep", "600"]);
    let started = std::time::Instant::now();
    let out = wait_with_timeout(spawn(&mut cmd, dir.path()), &["sleep"], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(stderr(&out).contains("did not end within 3 s"), "{}", stderr(&out));
    assert_cluster_removed(&out);
    // A bad option names itself, and builds nothing.
    let mut cmd = Command::new(script());
    cmd.args(["--profile", "fast", "--", "true"]);
    let out = wait_with_timeout(spawn(&mut cmd, dir.path()), &["--profile"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--profile fast"), "{}", stderr(&out));
}
