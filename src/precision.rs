//! Number format and memory layout of the model's arithmetic: `train.precision` and
//! `evaluate.precision` (`"f32" | "bf16" | "auto"`), `train.channels_last` and
//! `evaluate.channels_last`.
//!
//! bf16 is autocast, as `torch.autocast(device, dtype=torch.bfloat16)`: convolutions and matrix
//! products run in bfloat16, while the weights, the optimizer and its step, the batch-norm
//! statistics, the loss and the gradient exchange stay f32. `auto` takes bf16 where the device does
//! bfloat16 natively (CUDA GPUs of compute capability 8.0 and later; CPUs with `avx512_bf16` or
//! `amx_bf16`) and f32 elsewhere, where emulated bfloat16 is slower than f32. The choice depends on
//! the hardware alone, never on a timing race, and the log says why.
//!
//! Channels-last (NHWC) batches make libtorch run convolutions in that layout (the layout spreads
//! from the input through the network); cuDNN's bf16 tensor-core kernels want it. The weights stay
//! in torchvision's contiguous layout, as saved.
use std::ffi::{c_char, c_void, CStr};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use crate::models::Arch;

/// `precision`: the number format of the model's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Autocast to bfloat16 (convolutions, matrix products).
    Bf16,
    /// bf16 where the device has native bfloat16, else f32.
    Auto,
}

/// `channels_last`: batches and convolution weights in channels-last memory format (`true`,
/// `false`, or `"auto"`: on for CUDA devices; on a CPU where `cpu_channels_last_pays` measured it
/// faster).
pub type ChannelsLast = crate::switch::Switch;

/// What a run computes in, resolved for its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numerics {
    /// Autocast to bfloat16.
    pub bf16: bool,
    /// Batches and convolution weights in channels-last format.
    pub channels_last: bool,
    /// Why, for the log: `bf16 autocast (train.precision = "auto": the CPU has avx512_bf16)`.
    pub reason: String,
}

impl Numerics {
    /// The resolved name recorded in `state.json`: "f32" or "bf16".
    pub fn name(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    /// The network's logits on the batch `x` (on the network's device), as f32, computed in this
    /// run's layout and number format. `train`: batch norm in training mode.
    pub fn forward(&self, net: &dyn ModuleT, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if self.channels_last && x.dim() == 4 { to_channels_last(x)? } else { x.shallow_clone() };
        let logits = {
            let _autocast = Autocast::new(self.bf16, x.device())?;
            net.forward_t(&x, train)
        };
        Ok(if logits.kind() == Kind::Float { logits } else { logits.to_kind(Kind::Float) })
    }
}

/// What the hardware offers for bfloat16: whether the device does it natively, and the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bf16Support {
    pub native: bool,
    pub evidence: String,
}

/// The CPU's native bfloat16 from its flags (`/proc/cpuinfo`'s `flags` line, or any text holding
/// them): `avx512_bf16` (AMD Zen 4 and later, Intel Cooper Lake) or `amx_bf16` (Intel Sapphire
/// Rapids and later).
pub fn cpu_bf16(flags: &str) -> Bf16Support {
    let mut have: Vec<&str> = flags.split_whitespace().filter(|f| matches!(*f, "avx512_bf16" | "amx_bf16")).collect();
    have.sort_unstable();
    have.dedup();
    if have.is_empty() {
        Bf16Support { native: false, evidence: "the CPU has neither avx512_bf16 nor amx_bf16".into() }
    } else {
        Bf16Support { native: true, evidence: format!("the CPU has {}", have.join(" and ")) }
    }
}

/// The flags of this machine's first CPU (`SAC_CPU_FLAGS` replaces them, for tests).
pub fn cpu_flags() -> String {
    if let Ok(f) = std::env::var("SAC_CPU_FLAGS") {
        return f;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("flags")).map(|l| l.split(':').nth(1).unwrap_or("").to_owned()))
        .unwrap_or_default()
}

/// A CUDA GPU's native bfloat16 from its compute capability: 8.0 (Ampere) and later.
pub fn gpu_bf16(capability: Option<(i32, i32)>, index: usize) -> Bf16Support {
    match capability {
        Some((major, minor)) if major >= 8 => Bf16Support {
            native: true,
            evidence: format!("GPU {index} has compute capability {major}.{minor} (≥ 8.0)"),
        },
        Some((major, minor)) => Bf16Support {
            native: false,
            evidence: format!("GPU {index} has compute capability {major}.{minor}, below 8.0"),
        },
        None => Bf16Support { native: false, evidence: format!("the compute capability of GPU {index} is unknown") },
    }
}

/// The compute capability of CUDA device `index`, asked of the CUDA runtime that libtorch_cuda
/// loaded (None without one).
pub fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    type Attr = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
    // cudaDevAttrComputeCapabilityMajor / Minor.
    const MAJOR: i32 = 75;
    const MINOR: i32 = 76;
    // SAFETY: dlsym with RTLD_DEFAULT looks the symbol up in what is loaded; a null result is
    // handled. The function, if found, is the CUDA runtime's with this C signature.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cudaDeviceGetAttribute".as_ptr()) };
    if f.is_null() {
        return None;
    }
    let f: Attr = unsafe { std::mem::transmute::<*mut c_void, Attr>(f) };
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: both pointers are to live i32s.
    let ok = unsafe { f(&mut major, MAJOR, index as i32) == 0 && f(&mut minor, MINOR, index as i32) == 0 };
    ok.then_some((major, minor))
}

/// What a run computes on: the device, the architecture and the input's smaller side (pixels).
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub device: Device,
    pub arch: Arch,
    pub side: i64,
}

/// Whether channels-last (batches and weights) makes training faster on a CPU, in f32 and in bf16
/// alike, as measured with bench/channels_last.py (forward + backward, one thread; BENCHMARKS.md
/// "Channels-last on the CPU"). With the weights channels-last as well as the batches, every
/// architecture but alexnet gained at 64 px in both precisions (medians of 2 rounds: resnet18
/// 1.09-1.10x, resnet34 1.04-1.05x, resnet50 1.05-1.12x, vgg11_bn 1.08-1.10x, squeezenet1_0,
/// densenet121 and inception_v3 1.22-1.59x); alexnet's 1.02-1.03x is within its rounds' noise
/// (its time is in its fully connected layers). At 128 px all gained, with the batches alone
/// already (1.05-1.13x).
pub fn cpu_channels_last_pays(arch: Arch, side: i64) -> bool {
    side >= 128 || arch != Arch::Alexnet
}

/// Resolves the settings of `arch` on `device`: `key` names the config key in the log
/// (`train.precision`), `support` is the device's bfloat16 (asked only for `"auto"`).
pub fn resolve(
    key: &str,
    precision: Precision,
    channels_last: ChannelsLast,
    on: Workload,
    support: impl FnOnce() -> Bf16Support,
) -> Numerics {
    let (bf16, reason) = match precision {
        Precision::F32 => (false, "f32".to_owned()),
        Precision::Bf16 => (true, format!("bf16 autocast ({key} = \"bf16\")")),
        Precision::Auto => {
            let s = support();
            if s.native {
                (true, format!("bf16 autocast ({key} = \"auto\": {})", s.evidence))
            } else {
                (false, format!("f32 ({key} = \"auto\": {}; emulated bfloat16 would be slower)", s.evidence))
            }
        }
    };
    let (channels_last, why) = match channels_last {
        ChannelsLast::On => (true, ""),
        ChannelsLast::Off => (false, ""),
        ChannelsLast::Auto if on.device.is_cuda() => (true, " (\"auto\": a GPU)"),
        ChannelsLast::Auto => (
            cpu_channels_last_pays(on.arch, on.side),
            " (\"auto\": measured faster for this architecture and input size on the CPU)",
        ),
    };
    let reason = if channels_last { format!("{reason}, channels-last batches and weights{why}") } else { reason };
    Numerics { bf16, channels_last, reason }
}

/// The settings of a resumed run: its recorded number format (`was_bf16`, epoch `epoch`) in place of
/// what `key` resolved to, with the same layout as `now`.
pub fn kept(key: &str, was_bf16: bool, epoch: u32, now: &Numerics) -> Numerics {
    let name = if was_bf16 { "bf16 autocast" } else { "f32" };
    let mut reason = format!("{name} (kept from epoch {epoch}, the run being resumed; --set {key}=... changes it)");
    if now.channels_last {
        reason.push_str(", channels-last batches and weights");
    }
    Numerics { bf16: was_bf16, channels_last: now.channels_last, reason }
}

/// The device's bfloat16 support: the CPU's flags, or the GPU's compute capability.
pub fn device_bf16(device: Device) -> Bf16Support {
    match device {
        Device::Cuda(i) => gpu_bf16(cuda_capability(i), i),
        _ => cpu_bf16(&cpu_flags()),
    }
}

extern "C" {
    fn sac_autocast_enter(device: i32, error: *mut c_char, error_len: usize) -> i32;
    fn sac_autocast_exit(device: i32, was: i32, error: *mut c_char, error_len: usize) -> i32;
    fn sac_autocast_enabled(device: i32) -> i32;
    fn sac_channels_last(tensor: *mut c_void, error: *mut c_char, error_len: usize) -> *mut c_void;
    fn sac_is_channels_last(tensor: *mut c_void) -> i32;
}

fn code(device: Device) -> i32 {
    i32::from(device.is_cuda())
}

fn message(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Autocast to bfloat16 on this thread while it lives (for `device`'s kind); a no-op guard when
/// `on` is false.
pub struct Autocast {
    device: Device,
    was: Option<i32>,
}

impl Autocast {
    pub fn new(on: bool, device: Device) -> Result<Autocast> {
        if !on {
            return Ok(Autocast { device, was: None });
        }
        let mut error = [0u8; 512];
        // SAFETY: `error` is writable for its length.
        let was = unsafe { sac_autocast_enter(code(device), error.as_mut_ptr().cast(), error.len()) };
        if was < 0 {
            bail!("switching autocast on: {}", message(&error));
        }
        Ok(Autocast { device, was: Some(was) })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        if let Some(was) = self.was {
            let mut error = [0u8; 512];
            // SAFETY: as in `new`.
            if unsafe { sac_autocast_exit(code(self.device), was, error.as_mut_ptr().cast(), error.len()) } != 0 {
                tracing::error!("switching autocast off: {}", message(&error));
            }
        }
    }
}

/// Autocast is on for `device`'s kind on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: no pointers.
    unsafe { sac_autocast_enabled(code(device)) == 1 }
}

/// `t` (4-D) in channels-last format.
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    let mut error = [0u8; 512];
    // SAFETY: `t` is a live tensor handle; the result is a new handle that tch then owns.
    let p = unsafe { sac_channels_last(t.as_ptr() as *mut c_void, error.as_mut_ptr().cast(), error.len()) };
    if p.is_null() {
        bail!("converting a batch to channels-last: {}", message(&error));
    }
    // SAFETY: a handle allocated as tch allocates its own (`new at::Tensor`).
    Ok(unsafe { Tensor::from_ptr(p.cast()) })
}

/// Lays every 4-dimensional tensor of `tensors` (convolution weights) out channels-last, in place:
/// their values, shapes and autograd identity stay, every handle to them sees the new layout. A
/// convolution given channels-last batches and contiguous weights converts the weights at every
/// call, forward and backward (BENCHMARKS.md: resnet18 at 64 px trained 4-5 % faster with the
/// weights channels-last too than with the batches alone). Checkpoints stay contiguous
/// (`checkpoint::to_safetensors` writes logical order).
pub fn weights_channels_last<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
    for t in tensors {
        if t.dim() == 4 && !is_channels_last(t) {
            let nhwc = tch::no_grad(|| to_channels_last(&t.detach()))?;
            t.shallow_clone().set_data(&nhwc);
        }
    }
    Ok(())
}

/// `t` is laid out channels-last (and not also contiguous).
pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: a live tensor handle.
    unsafe { sac_is_channels_last(t.as_ptr() as *mut c_void) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(device: Device, arch: Arch) -> Workload {
        Workload { device, arch, side: 64 }
    }

    #[test]
    fn auto_takes_bf16_only_where_the_cpu_has_it_and_says_why() {
        let amd = "fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni";
        let intel = "fpu avx512f amx_bf16 amx_tile amx_int8";
        let old = "fpu sse2 avx2 fma";
        let n = resolve("train.precision", Precision::Auto, ChannelsLast::Auto, w(Device::Cpu, Arch::Resnet18), || {
            cpu_bf16(amd)
        });
        assert!(n.bf16 && n.channels_last);
        assert!(n.reason.contains("avx512_bf16") && n.reason.contains("\"auto\""), "{}", n.reason);
        assert!(
            resolve("p", Precision::Auto, ChannelsLast::Auto, w(Device::Cpu, Arch::Resnet18), || cpu_bf16(intel)).bf16
        );
        let n = resolve("train.precision", Precision::Auto, ChannelsLast::Auto, w(Device::Cpu, Arch::Resnet18), || {
            cpu_bf16(old)
        });
        assert!(!n.bf16);
        assert!(n.reason.starts_with("f32") && n.reason.contains("neither avx512_bf16 nor amx_bf16"), "{}", n.reason);
        // f32 and bf16 do not ask the hardware.
        assert!(
            !resolve("p", Precision::F32, ChannelsLast::Off, w(Device::Cpu, Arch::Resnet18), || unreachable!()).bf16
        );
        assert!(
            resolve("p", Precision::Bf16, ChannelsLast::Off, w(Device::Cpu, Arch::Resnet18), || unreachable!()).bf16
        );
    }

    #[test]
    fn auto_on_a_gpu_follows_its_compute_capability() {
        let gpu = |cc| move || gpu_bf16(cc, 0);
        assert!(
            resolve("p", Precision::Auto, ChannelsLast::Auto, w(Device::Cuda(0), Arch::Resnet18), gpu(Some((9, 0))))
                .bf16
        );
        assert!(
            resolve("p", Precision::Auto, ChannelsLast::Auto, w(Device::Cuda(0), Arch::Resnet18), gpu(Some((8, 0))))
                .bf16
        );
        let v100 =
            resolve("p", Precision::Auto, ChannelsLast::Auto, w(Device::Cuda(0), Arch::Resnet18), gpu(Some((7, 0))));
        assert!(!v100.bf16 && v100.reason.contains("7.0, below 8.0"), "{}", v100.reason);
        assert!(!resolve("p", Precision::Auto, ChannelsLast::Auto, w(Device::Cuda(0), Arch::Resnet18), gpu(None)).bf16);
        // Channels-last: "auto" is on for a GPU, off on the CPU; true and false are what they say.
        assert!(
            resolve("p", Precision::F32, ChannelsLast::Auto, w(Device::Cuda(0), Arch::Resnet18), gpu(None))
                .channels_last
        );
        assert!(
            !resolve("p", Precision::F32, ChannelsLast::Off, w(Device::Cuda(0), Arch::Resnet18), gpu(None))
                .channels_last
        );
        assert!(
            resolve("p", Precision::F32, ChannelsLast::On, w(Device::Cpu, Arch::Resnet18), gpu(None)).channels_last
        );
    }

    #[test]
    fn auto_channels_last_on_the_cpu_is_on_where_measured_faster() {
        let cl = |arch| resolve("p", Precision::F32, ChannelsLast::Auto, w(Device::Cpu, arch), || unreachable!());
        for arch in [
            Arch::Resnet18,
            Arch::Resnet34,
            Arch::Resnet50,
            Arch::Vgg11Bn,
            Arch::Squeezenet,
            Arch::Densenet,
            Arch::Inception,
        ] {
            let n = cl(arch);
            assert!(n.channels_last && n.reason.contains("measured faster"), "{arch}: {}", n.reason);
        }
        assert!(!cl(Arch::Alexnet).channels_last, "alexnet at 64 px");
        let off = resolve("p", Precision::F32, ChannelsLast::Off, w(Device::Cpu, Arch::Densenet), || unreachable!());
        assert!(!off.channels_last, "false is false");
        let big = Workload { device: Device::Cpu, arch: Arch::Alexnet, side: 128 };
        assert!(resolve("p", Precision::F32, ChannelsLast::Auto, big, || unreachable!()).channels_last, "128 px");
    }

    #[test]
    fn autocast_makes_cpu_convolutions_bf16_and_ends_with_its_guard() {
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = |x: &Tensor| x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert!(!autocast_enabled(Device::Cpu));
        let y = {
            let _guard = Autocast::new(true, Device::Cpu).unwrap();
            assert!(autocast_enabled(Device::Cpu));
            conv(&x)
        };
        assert_eq!(y.kind(), Kind::BFloat16);
        assert!(!autocast_enabled(Device::Cpu));
        assert_eq!(conv(&x).kind(), Kind::Float);
        // Close to f32: bfloat16 keeps 8 bits of mantissa.
        let diff = (y.to_kind(Kind::Float) - conv(&x)).abs().max().double_value(&[]);
        assert!(diff < 0.1, "{diff}");
        // Off: nothing changes.
        let _off = Autocast::new(false, Device::Cpu).unwrap();
        assert_eq!(conv(&x).kind(), Kind::Float);
    }

    #[test]
    fn channels_last_keeps_the_values_and_changes_the_strides() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = to_channels_last(&x).unwrap();
        assert!(is_channels_last(&y) && !is_channels_last(&x));
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
    }

    #[test]
    fn precision_and_channels_last_read_from_toml() {
        #[derive(Deserialize)]
        struct T {
            p: Precision,
            c: ChannelsLast,
        }
        let t: T = toml::from_str("p = \"bf16\"\nc = \"auto\"").unwrap();
        assert_eq!((t.p, t.c), (Precision::Bf16, ChannelsLast::Auto));
        let t: T = toml::from_str("p = \"auto\"\nc = true").unwrap();
        assert_eq!((t.p, t.c), (Precision::Auto, ChannelsLast::On));
        assert!(toml::from_str::<T>("p = \"fp16\"\nc = true").is_err());
        assert!(toml::from_str::<T>("p = \"f32\"\nc = \"yes\"").is_err());
    }
}
