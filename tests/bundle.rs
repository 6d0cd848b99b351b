//! scripts/device-bundle.sh: the archive that carries sac to a machine with PyTorch and nothing
//! else of sac's (the GPU machine). Proven here as it is used there: unpacked in an empty
//! directory, `./run` resolves MPICH and the other libraries from the bundle and libtorch from the
//! `python3` that has torch (here the project's venv), and `./run mpiexec -n 2 sac mpi-check` and a
//! short two-rank training run work.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The bundle's limit: the GPU machine takes at most 64 MiB with the working tree.
const LIMIT: u64 = 60 << 20;

fn venv_bin() -> PathBuf {
    venv_python().parent().expect("the venv's bin/").to_path_buf()
}

/// `./run args…` in the unpacked bundle, with the venv's python3 first on PATH (the launcher asks
/// it where torch is), killed after `timeout`.
fn in_bundle(bundle: &Path, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(bundle.join("run"));
    cmd.args(args)
        .env("PATH", format!("{}:{}", venv_bin().display(), std::env::var("PATH").unwrap_or_default()))
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("SAC_TORCH_LIB");
    wait_with_timeout(spawn(&mut cmd, bundle), args, timeout)
}

#[test]
fn the_device_bundle_runs_mpi_check_and_training_from_an_empty_directory() {
    let tmp = tempdir();
    let archive = tmp.path().join("sac-bundle.tar.gz");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/device-bundle.sh"))
        .args(["--sac", env!("CARGO_BIN_EXE_sac"), "--sample", "0.02", "--out"])
        .arg(&archive)
        .output()
        .expect("running scripts/device-bundle.sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "device-bundle.sh failed:\n{err}");
    // The script's last line is the archive's path.
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
    assert_eq!(Path::new(&last), archive, "{err}");
    let size = std::fs::metadata(&archive).expect("the archive").len();
    assert!(size <= LIMIT, "the bundle is {size} bytes, over {LIMIT}");
    eprintln!("bundle: {size} bytes\n{err}");

    let empty = tmp.path().join("unpacked");
    std::fs::create_dir(&empty).unwrap();
    let tar = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(&empty).status().expect("tar");
    assert!(tar.success());
    let b = empty.join("sac-bundle");

    // What `sac` resolves: MPICH, UCX, hwloc and TurboJPEG from the bundle, libtorch from the venv.
    let sac = b.join("bin/sac");
    let out = in_bundle(&b, &["ldd", sac.to_str().unwrap()], Duration::from_secs(30));
    assert_success(&out);
    let ldd = stdout(&out);
    eprintln!("./run ldd bin/sac:\n{ldd}");
    assert!(!ldd.contains("not found"), "{ldd}");
    let resolved = |lib: &str| -> String {
        ldd.lines()
            .find(|l| l.trim_start().starts_with(lib))
            .and_then(|l| l.split("=>").nth(1))
            .map(|r| r.split_whitespace().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("{lib} is not in ldd's list:\n{ldd}"))
    };
    for lib in ["libmpich.so.12", "libturbojpeg.so.0", "libucp.so.0", "libhwloc.so.15"] {
        let path = resolved(lib);
        assert!(path.starts_with(b.join("lib").to_str().unwrap()), "{lib} resolves to {path}, not the bundle's");
    }
    let venv_torch = std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/libtorch/lib")).unwrap();
    for lib in ["libtorch_cpu.so", "libc10.so", "libtorch_cuda.so"] {
        let path = std::fs::canonicalize(resolved(lib)).unwrap();
        assert!(path.starts_with(&venv_torch), "{lib} resolves to {}, not the venv's torch", path.display());
    }
    // The bundle's mpiexec is the one on PATH.
    let out = in_bundle(&b, &["sh", "-c", "command -v mpiexec; command -v sac"], Duration::from_secs(10));
    let which = stdout(&out);
    assert!(which.lines().all(|l| l.starts_with(b.join("bin").to_str().unwrap())), "{which}");

    // MPI works: averaging exact over 2 ranks.
    let out = in_bundle(&b, &["mpiexec", "-n", "2", "sac", "mpi-check", "--reps", "1"], Duration::from_secs(120));
    assert_success(&out);
    let text = stdout(&out);
    assert!(text.contains("over 2 rank(s)") && text.contains(": exact"), "{text}");
    assert!(text.contains("MPI library: MPICH"), "{text}");

    // A short training run on the bundled data dir, over 2 ranks.
    let out = in_bundle(
        &b,
        &[
            "mpiexec",
            "-n",
            "2",
            "sac",
            "--config",
            "config.toml",
            "train",
            "--epochs",
            "1",
            "--set",
            "image.width=32",
            "--set",
            "image.height=32",
            "--set",
            "train.threads=1",
            "--set",
            "train.validate=false",
        ],
        Duration::from_secs(300),
    );
    assert_success(&out);
    let state = read_json(&b.join("checkpoints/resnet18/state.json"));
    assert_eq!(state["epoch"], 1, "{state}");
    assert_eq!(state["world_size"], 2, "{state}");

    // The GPU check's script, run as on the GPU machine but on the CPU and shrunk (--quick): every
    // step runs, every result is recorded, and the summary table comes out.
    // A commit that reads as a number (12e9322 would be 1.2e9326 to a JSON parser) stays text.
    std::fs::write(b.join("COMMIT"), "12e9322\n").unwrap();
    let results = tmp.path().join("out");
    std::fs::create_dir(&results).unwrap();
    let mut cmd = Command::new(b.join("run"));
    cmd.args(["bash", "bench/gpu.sh", "--quick", "--device", "cpu"])
        .env("PATH", format!("{}:{}", venv_bin().display(), std::env::var("PATH").unwrap_or_default()))
        .env("OUT", &results)
        .env_remove("LD_LIBRARY_PATH");
    let out = wait_with_timeout(spawn(&mut cmd, &b), &["gpu.sh"], Duration::from_secs(600));
    let table = stdout(&out);
    let log = std::fs::read_dir(&results)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .unwrap_or_default();
    assert!(out.status.success(), "gpu.sh failed:\n{}\n{table}\n{log}", stderr(&out));
    eprintln!("{table}");
    let jsonl = std::fs::read_dir(&results)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("gpu-<time>.jsonl");
    let checks: Vec<serde_json::Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let machine = checks.iter().find(|c| c["check"] == "machine").expect("machine");
    assert_eq!((machine["bundle"].as_str(), machine["cores"].is_u64()), (Some("12e9322"), true), "{machine}");
    let count = |name: &str| checks.iter().filter(|c| c["check"] == name).count();
    assert_eq!(
        [
            count("machine"),
            count("mpi-check"),
            count("train-resnet18"),
            count("pytorch-limit"),
            count("train-resnet50")
        ],
        [1, 2, 3, 2, 1],
        "{jsonl}"
    );
    for c in checks.iter().filter(|c| c["check"] == "train-resnet18" || c["check"] == "train-resnet50") {
        let hist = c["history"].as_array().unwrap_or_else(|| panic!("no history: {c}"));
        assert!(!hist.is_empty() && hist.iter().all(|e| e["train_loss"].as_f64().is_some_and(f64::is_finite)), "{c}");
    }
    let agreement = checks.iter().find(|c| c["check"] == "evaluate-agreement").expect("agreement");
    assert_eq!(agreement["agreement"], 1.0, "the CPU against itself: {agreement}");
    // Every target this small run can meet holds (the loss falls over 2 epochs; the CPU's reference
    // is for the default sample, not this one, so it is not held against the run).
    for row in table.lines().filter(|l| l.starts_with("| resnet18") || l.starts_with("| mpi-check")) {
        assert!(row.ends_with("| yes |"), "{row}\n{table}");
    }
    for row in [
        "| mpi-check on cpu, 2 rank(s) |",
        "| resnet18 64 px, 2 rank(s), bf16 |",
        "| PyTorch resnet50 64 px bf16 channels-last |",
        "| sac resnet50 64 px bf16, epoch 2 (decode cache) |",
        "| evaluate, predictor on cpu |",
    ] {
        assert!(table.contains(row), "no row {row:?} in\n{table}");
    }

    // Without torch anywhere the launcher says what to do.
    let mut cmd = Command::new(b.join("run"));
    cmd.args(["true"]).env("PATH", "/usr/bin:/bin").env_remove("SAC_TORCH_LIB");
    let out = wait_with_timeout(spawn(&mut cmd, &b), &["true"], Duration::from_secs(30));
    assert_fails_with(&out, &["no libtorch found", "SAC_TORCH_LIB"]);
}
