//! What the built binary links: a `sac` built against a CUDA build of libtorch (the PyPI wheel in
//! `.venv` is one) must list `libtorch_cuda.so` and `libc10_cuda.so` among its NEEDED entries, or
//! libtorch never registers its CUDA backend and `train.device = "cuda"` finds no GPU on any
//! machine. No test can see that on a machine without a GPU except by reading the ELF header.
mod common;

use std::path::Path;
use std::process::Command;

/// The NEEDED entries of an ELF file, as `readelf -d` lists them.
fn needed(binary: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("running readelf -d {}: {e} (binutils)", binary.display()));
    assert!(out.status.success(), "readelf -d {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_owned()))
        .collect()
}

#[test]
fn a_binary_built_against_a_cuda_libtorch_needs_libtorch_cuda() {
    let lib = Path::new(env!("SAC_LIBTORCH_LIB"));
    let entries = needed(Path::new(env!("CARGO_BIN_EXE_sac")));
    // libtorch itself, whatever the build.
    for always in ["libtorch_cpu.so", "libc10.so"] {
        assert!(entries.iter().any(|e| e == always), "{always} missing from NEEDED: {entries:?}");
    }
    let cuda_build = lib.join("libtorch_cuda.so").exists();
    // build.rs told the crate what it found; it must agree with the directory.
    assert_eq!(!env!("SAC_LIBTORCH_CUDA").is_empty(), cuda_build, "build.rs and {} disagree", lib.display());
    if cuda_build {
        for cuda in ["libtorch_cuda.so", "libc10_cuda.so"] {
            assert!(
                entries.iter().any(|e| e == cuda),
                "{} is a CUDA build of libtorch but the binary does not need {cuda}: the linker dropped it \
                 (--as-needed), so CUDA would never load. NEEDED: {entries:?}",
                lib.display()
            );
        }
    } else {
        eprintln!("{} is a CPU-only libtorch: nothing of CUDA to link", lib.display());
    }
}

/// The binary finds libtorch by itself (build.rs embeds its directory), so `sac` runs without
/// LD_LIBRARY_PATH; the bundle for other machines relies on LD_LIBRARY_PATH winning over nothing
/// else than this RUNPATH.
#[test]
fn the_binary_carries_libtorchs_directory_as_its_runpath() {
    let out = Command::new("readelf").arg("-d").arg(env!("CARGO_BIN_EXE_sac")).output().expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    let lib = env!("SAC_LIBTORCH_LIB");
    assert!(
        text.lines().any(|l| (l.contains("(RUNPATH)") || l.contains("(RPATH)")) && l.contains(lib)),
        "no RUNPATH with {lib}:\n{text}"
    );
}

/// On a machine without a GPU (CI's), asking for cuda ends the command at once with a message that
/// names the setting and why no GPU is seen, and writes nothing.
#[test]
fn cuda_without_a_gpu_is_refused_naming_the_setting_and_the_reason() {
    if Path::new("/dev/nvidia0").exists() {
        eprintln!("this machine has a GPU: nothing to refuse");
        return;
    }
    let p = common::Project::new(2, 4, 0, 32);
    let out = p.train(&["--set", "train.device=\"cuda\""]);
    let err = common::assert_fails_with(&out, &["train.device is cuda but libtorch sees no CUDA device"]);
    let why = if env!("SAC_LIBTORCH_CUDA").is_empty() { "CPU-only libtorch" } else { "check nvidia-smi" };
    assert!(err.contains(why), "{err}");
    assert!(!p.model_dir("resnet18").exists(), "nothing written");
    let out = common::run_sac(p.path(), &["mpi-check", "--device", "cuda", "--reps", "0"]);
    common::assert_fails_with(&out, &["mpi-check --device is cuda", why]);
}
