//! Embeds libtorch's library directory as an rpath, so `sac` runs without LD_LIBRARY_PATH.
fn main() {
    // torch-sys declares `links = "tch"` and publishes where it found libtorch's shared libraries.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Keep libtorch_cpu/libc10 linked even when no symbol is referenced directly.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
