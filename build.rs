//! Embeds libtorch's library directory as an rpath, so `sac` runs without LD_LIBRARY_PATH, and
//! compiles `csrc/grad_hooks.cpp` (the gradient hooks tch does not expose) against the same libtorch
//! headers and C++ ABI that torch-sys compiles its own C++ with.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    // torch-sys declares `links = "tch"` and publishes where it found libtorch's shared libraries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB): build it first");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Keep libtorch_cpu/libc10 linked even when no symbol is referenced directly.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");

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
        // libtorch 2.13's headers use C++20 (bit-field member initializers); torch-sys still says
        // c++17 and silences the warnings. The C++ library ABI is the same under both.
        .std("c++20")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi().as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/grad_hooks.cpp")
        .compile("sac_grad_hooks");
}

/// The C++ ABI libtorch was built with, decided as torch-sys decides it: `LIBTORCH_CXX11_ABI`,
/// else PyTorch's own answer when building against the Python package, else 1 (every libtorch of
/// the 2.x series that tch 0.26 supports).
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
