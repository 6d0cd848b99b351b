//! `sac mpi-check`: checks an MPI set-up before a long job.
//!
//! 1. Gradient averaging is exact: every rank takes its share of one small batch (uneven shares
//!    when the batch does not divide), the gradients are averaged with the same `GradSync` that
//!    training uses, and the result must equal the gradient of the whole batch in one process
//!    (relative error ≤ 1e-5). The model has no batch norm or dropout, which would make the two
//!    differ by design. The same with the gradients sent as bfloat16 (`train.exchange = "bf16"`):
//!    its error is that of 8 significant bits, within `BF16_TOLERANCE`.
//! 2. How long one step's gradient exchange takes for a real model with a chosen class count
//!    (`--classes 64500`: Herbarium's head): sac's fused buckets against one allreduce per
//!    parameter tensor (what the original script did), sac's buckets sent as bfloat16, and how
//!    long the fused Adam step over the same parameters takes on one thread and on the rank's
//!    share of the node's cores.
//!
//! With `--device cuda` the models live on each rank's GPU (local rank mod GPU count), as in
//! training there: the gradients leave the GPU in one copy, MPI sums them in host memory, and the
//! timing counts both copies; the optimizer step is the GPU's whole-buffer step.
//! 3. Where the ranks run and what links them: every rank's host, its rank on the node and its
//!    thread count; the MPI library; and, measured, the latency and bandwidth from rank 0 to a
//!    rank on its own node and to one on another node. On a cluster the second pair shows the
//!    network the job really uses (a few Gb/s where InfiniBand was expected means TCP).
use std::time::Instant;

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::config::Arch;
use crate::infra::dist::Dist;
use crate::train::exchange::{GradSync, StepInfo};

/// Relative error allowed between the averaged and the single-process gradient.
pub const TOLERANCE: f64 = 1e-5;

/// The same for the bfloat16 exchange: each rank's gradient and each partial sum is rounded to 8
/// significant bits (≤ 2⁻⁸ of itself), so the error is a few 2⁻⁸ of the ranks' gradients.
pub const BF16_TOLERANCE: f64 = 2e-2;

/// Max |a - b| / max |b| over two flat gradients.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Waits for `device`'s queued work (a no-op on the CPU): host clocks then time what ran.
fn settle(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The flat gradient of the mean loss over `x`, computed in this process alone.
fn mean_loss_grad(net: &impl Module, params: &[Tensor], sync: &mut GradSync, x: &Tensor, y: &Tensor) -> Tensor {
    sync.zero_grads();
    net.forward(x).cross_entropy_for_logits(y).backward();
    Tensor::cat(&params.iter().map(|p| p.grad().reshape([-1])).collect::<Vec<_>>(), 0)
}

/// Part 3: prints (rank 0) where the ranks run, and measures rank 0's links when `measure`.
pub fn placement_and_links(dist: &Dist, measure: bool) {
    let places = dist.places(dist.cores_per_rank());
    if dist.is_root() {
        println!("placement: {}", crate::infra::dist::describe_placement(&places));
        if let Some(w) = crate::infra::dist::grouping_mismatch(&places) {
            println!("warning: {w}");
        }
        println!(
            "MPI library: {}; thread level: {}",
            dist.library().unwrap_or_else(|| "none (one process)".into()),
            dist.thread_level()
        );
        if let Some(transport) = dist.transport() {
            println!("MPI transport: {transport}");
        }
        if let Some(aware) = dist.cuda_aware() {
            println!(
                "MPI and GPU memory: the library says it is {}CUDA-aware (sac sums gradients in host memory either way)",
                if aware { "" } else { "not " }
            );
        }
    }
    if !measure || dist.size() < 2 {
        return;
    }
    let host0 = &places[0].host;
    let near = (1..places.len()).find(|&r| places[r].host == *host0);
    let far = (1..places.len()).find(|&r| places[r].host != *host0);
    for peer in [near, far].into_iter().flatten() {
        let (latency, round_trip) = if dist.rank() == 0 || dist.rank() == peer {
            let other = if dist.rank() == 0 { peer } else { 0 };
            (dist.ping_pong(other, 8, 200) / 2.0, dist.ping_pong(other, LINK_BYTES, 4))
        } else {
            (0.0, 0.0)
        };
        dist.barrier();
        if dist.is_root() {
            let gbit = 2.0 * LINK_BYTES as f64 * 8.0 / round_trip.max(1e-12) / 1e9;
            let what = if places[peer].host == *host0 {
                format!("same node, {host0}")
            } else {
                format!("{host0} <-> {}", places[peer].host)
            };
            println!(
                "link rank 0 <-> rank {peer} ({what}): latency {:.1} us, bandwidth {gbit:.2} Gb/s (ping-pong of 8 B and {} MiB)",
                latency * 1e6,
                LINK_BYTES >> 20
            );
        }
    }
}

/// The message of the bandwidth measurement: large enough that latency does not count.
const LINK_BYTES: usize = 8 << 20;

/// Part 1; returns the relative error of averaging with the exchange `format`.
pub fn check_averaging(dist: &Dist, batch: usize, format: crate::config::Exchange, device: Device) -> Result<f64> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "fc1", 20, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "fc2", 32, 5, Default::default()));
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let params: Vec<Tensor> = params.into_iter().map(|(_, t)| t).collect();
    // The same data on every rank (same seed); rank r takes rows r, r+N, ...
    // Drawn on the CPU, so every device gets the same numbers.
    let x = Tensor::randn([batch as i64, 20], (Kind::Float, Device::Cpu)).to_device(device);
    let y = Tensor::randint(5, [batch as i64], (Kind::Int64, Device::Cpu)).to_device(device);
    let mine: Vec<i64> = (dist.rank()..batch).step_by(dist.size()).map(|i| i as i64).collect();
    // As in training: the gradients live in the exchange buffer, of the summed loss of this rank's rows.
    let mut sync = GradSync::new(dist, &params, None, false, format)?;
    sync.zero_grads();
    if !mine.is_empty() {
        let idx = Tensor::from_slice(&mine).to_device(device);
        let loss = net.forward(&x.index_select(0, &idx)).cross_entropy_for_logits(&y.index_select(0, &idx));
        (loss * mine.len() as f64).backward();
    }
    let synced = sync.sync(dist, StepInfo { images: mine.len(), ..StepInfo::default() });
    let averaged = synced.grad.to_device(device) * f64::from(synced.scale);
    if synced.images as usize != batch {
        bail!("the ranks' image counts add up to {}, not {batch}", synced.images);
    }
    let reference = mean_loss_grad(&net, &params, &mut sync, &x, &y);
    Ok(relative_error(&averaged, &reference))
}

/// Part 2: how long exchanging the gradients of `arch` takes, each way.
pub fn time_exchange(dist: &Dist, arch: Arch, classes: i64, reps: usize, device: Device) -> Exchange {
    let vs = nn::VarStore::new(device);
    let _net = crate::models::build(&vs.root(), arch, classes);
    let mut named = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect::<Vec<_>>();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    let numel: usize = params.iter().map(Tensor::numel).sum();
    // `GradSync::sync` as training calls it, with the gradients in `format`: (ms per step, buckets).
    let time_sync = |format: crate::config::Exchange| {
        // Gradients as training leaves them: in the exchange buffer, here random.
        let mut sync = GradSync::new(dist, &params, None, false, format).expect("no hooks to install");
        tch::no_grad(|| {
            for p in &params {
                let _ = p.grad().normal_(0.0, 1.0);
            }
        });
        settle(device);
        dist.barrier();
        let t = Instant::now();
        for _ in 0..reps {
            // As training: the sums go back to the parameters' device.
            let _ = sync.sync(dist, StepInfo { images: 64, ..StepInfo::default() }).grad.to_device(device);
            settle(device);
        }
        (t.elapsed().as_secs_f64() * 1e3 / reps as f64, sync.buckets().len())
    };
    let (fused, buckets) = time_sync(crate::config::Exchange::F32);
    let (fused_bf16, _) = time_sync(crate::config::Exchange::Bf16);
    let mut scratch = Vec::new();
    let mut bufs: Vec<Vec<f32>> = params
        .iter()
        .map(|p| Vec::<f32>::try_from(&p.grad().reshape([-1]).to_device(Device::Cpu)).expect("float"))
        .collect();
    dist.barrier();
    let t = Instant::now();
    for _ in 0..reps {
        for b in bufs.iter_mut() {
            dist.allreduce_sum_blocking(b, &mut scratch);
        }
    }
    let per_tensor = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let send = vec![1.0f32; numel];
    let mut recv = vec![0.0f32; numel];
    dist.barrier();
    let t = Instant::now();
    for _ in 0..reps {
        dist.allreduce_sum_into(&send, &mut recv);
    }
    let raw = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    Exchange { fused, fused_bf16, per_tensor, raw, tensors: params.len(), numel, buckets }
}

/// Milliseconds per step of each way of exchanging one step's gradients.
pub struct Exchange {
    /// `GradSync::sync` as training calls it: the bucketed allreduce of the gradients, which
    /// live in its send buffer, with the image count and stop flag.
    pub fused: f64,
    /// The same with the gradients sent as bfloat16 (rounding and conversion back included).
    pub fused_bf16: f64,
    /// One blocking allreduce per parameter tensor (the original script's design).
    pub per_tensor: f64,
    /// The bucketed allreduce alone, on the same number of floats.
    pub raw: f64,
    pub tensors: usize,
    pub numel: usize,
    /// Buckets of `GradSync`.
    pub buckets: usize,
}

/// Milliseconds per Adam step over `numel` parameters: on the CPU the fused step with `threads`
/// threads, on a GPU the whole-buffer step training takes there.
pub fn time_optimizer(numel: usize, threads: usize, reps: usize, device: Device) -> f64 {
    tch::set_num_threads(threads as i32);
    let params = vec![("p".to_string(), Tensor::zeros([numel as i64], (Kind::Float, device)))];
    let g = Tensor::ones([numel as i64], (Kind::Float, device));
    let mut opt = crate::train::optim::Optimizer::new(
        crate::config::OptimizerKind::Adam,
        1e-3,
        crate::train::optim::Hyper::default(),
        numel,
        device,
    );
    if device.is_cuda() {
        opt.bind_flat(&params);
    }
    opt.apply(&g, 1.0, &params); // pages touched once before timing
    settle(device);
    let t = Instant::now();
    for _ in 0..reps {
        opt.apply(&g, 1.0, &params);
    }
    settle(device);
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// The subcommand.
pub fn run(
    dist: &Dist,
    batch: usize,
    arch: Arch,
    classes: i64,
    reps: usize,
    device: crate::config::DeviceKind,
) -> Result<()> {
    tch::set_num_threads(1);
    let device = crate::infra::process::pick_device("mpi-check --device", device, dist.local_rank())?;
    let on = match device {
        Device::Cuda(_) => " on the ranks' GPUs (local rank mod GPU count; sums through host memory)".to_string(),
        _ => String::new(),
    };
    check_both_exchanges(dist, batch, device, &on)?;
    placement_and_links(dist, reps > 0);
    if reps > 0 {
        let x = time_exchange(dist, arch, classes, reps, device);
        if dist.is_root() {
            println!(
                "{arch} with {classes} classes: gradients ({} tensors, {:.1} M floats, {} buckets of at most {:.1} M) \
                 over {} rank(s){on}, ms per step: fused {:.1} (allreduce alone {:.1}), one allreduce per tensor {:.1}, \
                 fused as bfloat16 {:.1}",
                x.tensors,
                x.numel as f64 / 1e6,
                x.buckets,
                crate::infra::dist::bucket_floats() as f64 / 1e6,
                dist.size(),
                x.fused,
                x.raw,
                x.per_tensor,
                x.fused_bf16
            );
        }
        report_optimizer(dist, x.numel, reps, device);
        info!("mpi-check timing done");
    }
    Ok(())
}

/// Exact averaging in f32 (and, on several ranks, within bfloat16's error when sent as such):
/// rank 0 prints each result; a wrong one ends the command naming the rank.
fn check_both_exchanges(dist: &Dist, batch: usize, device: Device, on: &str) -> Result<()> {
    let err = check_averaging(dist, batch, crate::config::Exchange::F32, device)?;
    let ok = dist.all_ok(err <= TOLERANCE);
    if dist.is_root() {
        println!(
            "gradient averaging over {} rank(s), {batch} images{on}: relative error {err:.2e} (limit {TOLERANCE:.0e}): {}",
            dist.size(),
            if ok { "exact" } else { "WRONG" }
        );
    }
    if !ok {
        bail!("gradient averaging is not exact on rank {} (relative error {err:.2e})", dist.rank());
    }
    if dist.size() > 1 {
        let err = check_averaging(dist, batch, crate::config::Exchange::Bf16, device)?;
        let ok = dist.all_ok(err <= BF16_TOLERANCE);
        if dist.is_root() {
            println!(
                "the same sent as bfloat16 (train.exchange = \"bf16\"): relative error {err:.2e} (limit {BF16_TOLERANCE:.0e}): {}",
                if ok { "as expected of 8 significant bits" } else { "WRONG" }
            );
        }
        if !ok {
            bail!("the bfloat16 gradient exchange is wrong on rank {} (relative error {err:.2e})", dist.rank());
        }
    }
    Ok(())
}

/// The optimizer step over `numel` parameters, every rank at once as in training: on one thread
/// and on the rank's share of the node's cores (the CPU), or on the GPU.
fn report_optimizer(dist: &Dist, numel: usize, reps: usize, device: Device) {
    let share = crate::infra::process::set_threads(0, dist.cores_per_rank());
    dist.barrier();
    let one = time_optimizer(numel, 1, reps, device);
    dist.barrier();
    let many = if share > 1 && !device.is_cuda() { Some(time_optimizer(numel, share, reps, device)) } else { None };
    if dist.is_root() && device.is_cuda() {
        println!(
            "Adam step on the GPU over the same {:.1} M parameters (all of them as one buffer), ms per step \
             (all ranks at once): {one:.2}",
            numel as f64 / 1e6
        );
    } else if dist.is_root() {
        println!(
            "fused Adam step over the same {:.1} M parameters, ms per step (all ranks at once): 1 thread {one:.1}{}",
            numel as f64 / 1e6,
            many.map_or_else(
                || " (the rank's share of the node's cores is 1 thread)".to_string(),
                |t| format!(", {share} threads {t:.1}")
            )
        );
    }
}
