//! Embeds libtorch's library directory as an rpath, so `sac` runs without LD_LIBRARY_PATH, keeps
//! libtorch's CUDA libraries linked when it has them, and compiles `csrc/` (the gradient hooks,
//! CPU autocast and memory formats, which tch does not expose) against the same libtorch headers
//! and C++ ABI that torch-sys compiles its own C++ with.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    println!("cargo:rerun-if-changed=csrc/precision.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    // torch-sys declares `links = "tch"` and publishes where it found libtorch's shared libraries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB): build it first");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // A CUDA build of libtorch registers its CUDA backend from static initialisers in
    // libtorch_cuda.so (and libc10_cuda.so): nothing in sac or tch names a symbol of theirs, so a
    // linker that runs with --as-needed (Debian's and Ubuntu's gcc do by default) drops them, and
    // `tch::Cuda::is_available()` is false on any GPU. torch-sys does ask for `-ltorch_cuda`, but a
    // link argument comes after the libraries on the link line, so a bare `--no-as-needed` here
    // came too late to keep it. Naming the libraries again inside a --no-as-needed bracket of their
    // own keeps them NEEDED whatever the default (tests/linkage.rs checks the built binary).
    let lib_dir = PathBuf::from(&lib);
    let cuda_libs: Vec<&str> =
        ["torch_cuda", "c10_cuda"].into_iter().filter(|l| lib_dir.join(format!("lib{l}.so")).exists()).collect();
    if !cuda_libs.is_empty() {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        for l in &cuda_libs {
            println!("cargo:rustc-link-arg=-l{l}");
        }
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
    }
    // Tells the tests which libtorch the binary was linked against, and whether it is a CUDA build.
    println!("cargo:rustc-env=SAC_LIBTORCH_LIB={lib}");
    println!("cargo:rustc-env=SAC_LIBTORCH_CUDA={}", cuda_libs.join(","));

    // <libtorch>/lib → <libtorch>/include, in a libtorch download and in a PyTorch wheel alike.
    let root = PathBuf::from(&lib).parent().expect("libtorch lib dir has a parent").to_path_buf();
    let include = root.join("include");
    assert!(
        include.join("torch/csrc/autograd/variable.h").exists(),
        "libtorch's C++ headers are missing from {} (a libtorch without headers cannot build sac's gradient hooks)",
        include.display()
    );
    cc::Build::new()
        .cpp(true)
        .pic(true)
        // Newer libtorch headers use C++20 (2.13's bit-field member initializers; 2.11's build
        // alike); torch-sys still says c++17 and silences the warnings. The C++ library ABI is the
        // same under both.
        .std("c++20")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi().as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/grad_hooks.cpp")
        .file("csrc/precision.cpp")
        .compile("sac_torch_shim");
}

/// The C++ ABI libtorch was built with, decided as torch-sys decides it: `LIBTORCH_CXX11_ABI`,
/// else PyTorch's own answer when building against the Python package, else 1 (every libtorch of
/// the 2.x series that tch 0.24 supports).
fn cxx11_abi() -> String {
    if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
        return v;
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        // The interpreter torch-sys asks: `python` inside a virtualenv, else `python3`.
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let out = Command::new(python)
            .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output()
            .unwrap_or_else(|e| panic!("running {python} to ask torch for its C++ ABI: {e}"));
        let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && (v == "0" || v == "1") {
            return v;
        }
    }
    "1".to_owned()
}
