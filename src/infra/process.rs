//! The process and its resources: stop signals, peak memory and CPU time, the compute device and
//! torch's thread count. It uses nothing of sac but the config's device setting, so `dist` (which
//! reads the stop flag in its waits) and every subcommand can use it.
use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceKind;

/// This process's peak resident memory in MiB and its CPU time (user + system, all threads) in
/// seconds, from getrusage(2).
pub fn resource_usage() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (ru.ru_maxrss as f64 / 1024.0, tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// The exit code of a job that failed before its work began: the configuration or command line is
/// wrong, or training could not start (its data, checkpoint or model were found wanting before the
/// first step). A restart would fail the same way: jobs/sac-job.sh does not retry it. (2 is also
/// what the command-line parser exits with.)
pub const EXIT_INPUT: i32 = 2;

static UNDER_WAY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The job's work has begun (training's first epoch, evaluation's pipeline once its checkpoint is
/// loaded, create-dataset once its config is): from now on a failure
/// exits with 1, which a restart may get past, instead of [`EXIT_INPUT`].
pub fn work_under_way() {
    UNDER_WAY.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The exit code of an error now: [`EXIT_INPUT`] before [`work_under_way`], else 1.
pub fn failure_code() -> i32 {
    if UNDER_WAY.load(std::sync::atomic::Ordering::SeqCst) {
        1
    } else {
        EXIT_INPUT
    }
}

static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// A flag that SIGTERM (what schedulers send at walltime and on cancel), SIGINT (Ctrl-C) and
/// SIGUSR1 raise, for long commands to stop at a safe point instead of dying mid-write. SIGUSR1:
/// Open MPI's mpirun passes it on to every rank at once, while it answers SIGTERM by killing the
/// ranks (SIGTERM, then SIGKILL after `odls_base_sigkill_timeout`, 1 s by default), so
/// jobs/sac-job.sh stops an Open MPI job with it; Slurm's `--signal=USR1@<seconds>` sends it ahead
/// of the time limit. The same flag for every caller; the handlers are installed on the first call.
pub fn stop_on_signals() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    if let Some(stop) = STOP.get() {
        return Ok(std::sync::Arc::clone(stop));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))
            .map_err(|e| anyhow::anyhow!("installing the signal handler: {e}"))?;
    }
    Ok(std::sync::Arc::clone(STOP.get_or_init(|| stop)))
}

/// True once a stop signal arrived (after `stop_on_signals`). Waits in `dist` read it, so a rank
/// that waits for peers that never come still ends the job on SIGTERM.
pub fn stop_requested() -> bool {
    STOP.get().is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
}

/// The device of the setting `key` (`train.device`, `mpi-check --device`) for the rank with this
/// node-local rank (GPUs are dealt round-robin to a node's ranks).
pub fn pick_device(key: &str, kind: DeviceKind, local_rank: usize) -> Result<Device> {
    let gpus = || if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    let device = match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => match gpus() {
            0 => bail!("{key} is cuda but libtorch sees no CUDA device ({}); use auto or cpu", cuda_absence()),
            n => Device::Cuda(local_rank % n),
        },
        DeviceKind::Auto => match gpus() {
            0 => Device::Cpu,
            n => Device::Cuda(local_rank % n),
        },
    };
    if device.is_cuda() {
        // Fixed input sizes: let cuDNN time its algorithms once and keep the fastest (PyTorch's
        // `torch.backends.cudnn.benchmark = True`).
        tch::Cuda::cudnn_set_benchmark(true);
    }
    Ok(device)
}

/// Why libtorch may see no GPU: this binary was linked without libtorch's CUDA libraries (a
/// CPU-only libtorch at build time), or they are there and the machine shows no device.
fn cuda_absence() -> &'static str {
    if env!("SAC_LIBTORCH_CUDA").is_empty() {
        "this sac was built against a CPU-only libtorch: rebuild it against a CUDA build, see README \"GPUs\""
    } else {
        "the binary links libtorch_cuda, so the machine shows no GPU to it: check nvidia-smi and CUDA_VISIBLE_DEVICES"
    }
}

/// Sets torch's threads for this rank: the config's count, or the node's cores shared among its
/// ranks (`cores_per_rank`). Returns the count.
pub fn set_threads(configured: usize, cores_per_rank: usize) -> usize {
    let n = if configured > 0 { configured } else { cores_per_rank };
    tch::set_num_threads(n as i32);
    tch::set_num_interop_threads(1);
    n
}

/// This host's name (`gethostname`), "?" if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "?".into()
    }
}
