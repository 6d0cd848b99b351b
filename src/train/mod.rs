//! `sac train`: data-parallel training over the MPI ranks.
//!
//! Rank 0 reads the CSVs and scatters each rank its shard; rank 0's initial parameters are
//! broadcast; every step, each rank computes gradients on its local batch, all gradients go into
//! one flat buffer that is summed with one allreduce per large bucket, and every rank applies the
//! same optimizer step. Every rank runs the same number of steps; a rank whose shard is exhausted
//! contributes a zero-weight gradient, and the buffer carries each rank's batch size so the
//! average is over images, exactly as one process on the concatenated batch.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::checkpoint;
use crate::config::{Arch, Config, DeviceKind, OnNonFinite, Settings};
use crate::data::{self, Class, Geometry, ImageStore, Row};
use crate::dist::Dist;
use loader::{with_batches, Loader};
use optim::Optimizer;
use progress::{Reporter, Times};

pub mod loader;
pub mod metrics;
pub mod optim;
pub mod progress;

/// All ranks stopped together at a step boundary after SIGTERM / SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("training stopped by a signal; the last complete checkpoint is intact")]
pub struct Interrupted;

/// What rank 0 sends each rank.
#[derive(Serialize, Deserialize)]
struct Shard {
    classes: Vec<Class>,
    train: Vec<Row>,
    test: Vec<Row>,
    total_train: usize,
    total_test: usize,
}

/// One epoch's figures, kept in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: u32,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub images_per_second: f64,
    pub seconds: f64,
    pub skipped_images: u64,
    /// Steps left out because their loss or gradient was not finite (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub nonfinite_steps: u64,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub epoch: u32,
    pub arch: Arch,
    pub num_classes: usize,
    pub steps: i64,
    pub world_size: usize,
    pub best_epoch: Option<u32>,
    pub best_top1: Option<f64>,
    pub classes: Vec<Class>,
    pub history: Vec<EpochRecord>,
    pub config: Config,
}

/// The model's variables in a fixed (name) order, split into trained parameters and the rest.
struct Model {
    net: Box<dyn ModuleT>,
    vars: BTreeMap<String, Tensor>,
    params: Vec<(String, Tensor)>,
    /// Batch-norm running statistics: averaged over ranks, not trained.
    buffers: Vec<(String, Tensor)>,
    numel: usize,
    _vs: nn::VarStore,
}

impl Model {
    fn new(arch: Arch, classes: i64, device: Device, feature_extract: bool) -> Model {
        let vs = nn::VarStore::new(device);
        let net = crate::models::build(&vs.root(), arch, classes);
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let head = crate::models::head_prefix(arch);
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (name, t) in &vars {
            if t.requires_grad() {
                if feature_extract && !name.starts_with(head) {
                    let _ = t.set_requires_grad(false);
                } else {
                    params.push((name.clone(), t.shallow_clone()));
                }
            } else {
                buffers.push((name.clone(), t.shallow_clone()));
            }
        }
        let numel = params.iter().map(|(_, t)| t.numel()).sum();
        Model { net, vars, params, buffers, numel, _vs: vs }
    }

    fn all(&self) -> Vec<Tensor> {
        self.vars.values().map(Tensor::shallow_clone).collect()
    }
}

/// Averages gradients over the ranks, weighted by each rank's image count, so the result is the
/// gradient of the mean loss over all ranks' images together. Callers back-propagate the *summed*
/// loss of their images (mean × count), which is that weighting. All gradients travel in one flat
/// buffer (one allreduce per `dist::BUCKET_FLOATS` bucket), followed by four more numbers: the
/// rank's image count, its stop request (a signal), whether its step went wrong (a non-finite
/// loss or batch-norm statistic) and its summed loss, so every rank learns them in the same call
/// (rank 0 reports the global loss without a collective of its own).
///
/// For parameters that are contiguous f32 CPU tensors (training on the CPU), each parameter's
/// gradient *is* a view into the send buffer (what DDP calls gradient_as_bucket_view): backward
/// accumulates straight into it, so nothing is copied before the allreduce, and the division by
/// the image count is left to the optimizer (`Synced::scale`), so nothing is copied after it.
/// Other parameters (a GPU) have their gradients copied into the buffer.
pub struct GradSync {
    params: Vec<Tensor>,
    numel: usize,
    /// The gradients, then this rank's image count, stop flag, non-finite flag and summed loss.
    send: Tensor,
    /// The sums over all ranks, same layout.
    recv: Tensor,
    /// The parameters' gradients are views into `send`.
    bound: bool,
}

/// The outcome of one `GradSync::sync`.
pub struct Synced {
    /// The summed gradient, flat, on the CPU (valid until the next `zero_grads`); times `scale` it
    /// is the gradient of the mean loss over all ranks' images.
    pub grad: Tensor,
    /// 1 / images (0 when no rank had an image).
    pub scale: f32,
    /// Images over all ranks in this step.
    pub images: f32,
    /// Some rank asked to stop.
    pub stop: bool,
    /// Some rank's loss or batch-norm statistics were not finite, or the summed gradient is not.
    pub non_finite: bool,
    /// The summed loss over all ranks' images (divide by `images` for the mean).
    pub loss: f64,
}

/// A contiguous f32 CPU tensor as a mutable slice.
///
/// SAFETY: the caller guarantees that `t` is a contiguous f32 CPU tensor of at least `n` elements
/// and that nothing else reads or writes it while the slice lives.
unsafe fn f32_slice_mut<'a>(t: &Tensor, n: usize) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n)
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

impl GradSync {
    /// `params`: the trained parameters, in the order the optimizer uses.
    pub fn new(params: &[Tensor]) -> Self {
        let numel: usize = params.iter().map(Tensor::numel).sum();
        let buf = || Tensor::zeros([numel as i64 + EXTRAS as i64], (Kind::Float, Device::Cpu));
        let mut sync = GradSync {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            numel,
            send: buf(),
            recv: buf(),
            bound: !params.is_empty() && params.iter().all(is_cpu_f32),
        };
        if sync.bound {
            sync.bind();
        }
        sync
    }

    /// Makes every parameter's gradient a view into `send`. A gradient must exist to be re-pointed,
    /// so a backward pass of zero creates them first; from then on autograd accumulates into the
    /// existing gradient in place instead of replacing it.
    fn bind(&mut self) {
        for p in &self.params {
            if !p.grad().defined() {
                (p.sum(Kind::Float) * 0.0).backward();
            }
        }
        tch::no_grad(|| {
            let mut off = 0i64;
            for p in &self.params {
                let _ = p.grad().set_source_tensor_storage_offset_(&self.send, off, p.size(), p.stride());
                off += p.numel() as i64;
            }
            let _ = self.send.zero_();
        });
    }

    /// Zeroes the gradients before a backward pass (one pass over the buffer when bound).
    pub fn zero_grads(&mut self) {
        tch::no_grad(|| {
            if self.bound {
                let _ = self.send.zero_();
            } else {
                for p in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            }
        });
    }

    /// Sums the gradients (of the summed loss `loss` over `images` images; ignored when `images`
    /// is 0), the image counts, the stop requests, the non-finite flags and the losses over the ranks.
    pub fn sync(&mut self, dist: &Dist, images: usize, loss: f64, stop: bool, bad: bool) -> Synced {
        let p = self.numel;
        // SAFETY: `send` and `recv` are contiguous f32 CPU tensors of p + EXTRAS elements that only
        // this struct owns; autograd writes into `send` only during backward, not during this call.
        let send = unsafe { f32_slice_mut(&self.send, p + EXTRAS) };
        if images == 0 {
            send[..p].fill(0.0);
        } else if !self.bound {
            let mut off = 0;
            for t in &self.params {
                let n = t.numel();
                let g = t.grad();
                if g.defined() {
                    let g = g.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                    g.copy_data(&mut send[off..off + n], n);
                } else {
                    send[off..off + n].fill(0.0);
                }
                off += n;
            }
        }
        send[p] = images as f32;
        send[p + 1] = f32::from(u8::from(stop));
        send[p + 2] = f32::from(u8::from(bad));
        send[p + 3] = if images == 0 { 0.0 } else { loss as f32 };
        let (sums, tensor) = if dist.size() == 1 {
            (&send[..], &self.send)
        } else {
            // SAFETY: as above.
            let recv = unsafe { f32_slice_mut(&self.recv, p + EXTRAS) };
            dist.allreduce_sum_into(send, recv);
            (&recv[..], &self.recv)
        };
        let total = sums[p];
        // The sum is the same on every rank, so every rank decides alike. One read of the buffer.
        let grad_finite = all_finite(&sums[..p]);
        let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
        Synced {
            grad: tensor.narrow(0, 0, p as i64),
            scale,
            images: total,
            stop: sums[p + 1] > 0.0,
            non_finite: sums[p + 2] > 0.0 || !grad_finite,
            loss: f64::from(sums[p + 3]),
        }
    }
}

/// No NaN and no infinity in `v`: an exponent of all ones marks both. An OR of integer flags is
/// associative, so the compiler vectorizes it (a float sum would be a serial chain of adds, ~4×
/// slower on resnet18's 11 M gradients), and the read runs at memory speed.
fn all_finite(v: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    v.chunks(4096).all(|c| c.iter().fold(0u32, |acc, x| acc | u32::from(x.to_bits() & EXP == EXP)) == 0)
}

/// Numbers after the gradients in the exchange buffer: image count, stop flag, non-finite flag,
/// summed loss.
const EXTRAS: usize = 4;

/// The batches of one epoch's order of `len` images: consecutive runs of `batch`, except that a
/// last run of a single image joins the one before it (batch-norm cannot take a batch of one:
/// with one value per channel its variance is undefined and its running statistics become NaN).
/// A batch size of 1 is left as the user chose it.
pub fn batch_bounds(len: usize, batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = (0..len).step_by(batch).map(|lo| lo..(lo + batch).min(len)).collect();
    if batch > 1 && out.len() > 1 && out.last().is_some_and(|r| r.len() == 1) {
        let last = out.pop().expect("two or more");
        out.last_mut().expect("one or more").end = last.end;
    }
    out
}

/// Steps per epoch: the most batches any rank has (ranks with fewer sit out the last steps with a
/// zero-weight gradient). Shards are the rows dealt round-robin: `total / n` or one more.
fn steps_per_epoch(total: usize, ranks: usize, batch: usize) -> usize {
    (0..ranks).map(|r| batch_bounds(total / ranks + usize::from(r < total % ranks), batch).len()).max().unwrap_or(0)
}

/// Flattens tensors into one f32 vector on the CPU.
fn flatten(ts: &[Tensor]) -> Vec<f32> {
    if ts.is_empty() {
        return Vec::new();
    }
    let views: Vec<Tensor> = ts.iter().map(|t| t.detach().to_kind(Kind::Float).reshape([-1])).collect();
    let flat = Tensor::cat(&views, 0).to_device(Device::Cpu);
    Vec::<f32>::try_from(&flat).expect("float tensor")
}

/// Copies a flat vector back into the tensors, in order.
fn unflatten(values: &[f32], ts: &[Tensor]) {
    tch::no_grad(|| {
        let mut off = 0;
        for t in ts {
            let n = t.numel();
            let src = Tensor::from_slice(&values[off..off + n]).view(t.size().as_slice()).to_kind(t.kind());
            t.shallow_clone().copy_(&src);
            off += n;
        }
    });
}

/// Same values on every rank: rank 0's.
fn broadcast_tensors(dist: &Dist, ts: &[Tensor]) {
    if dist.size() == 1 {
        return;
    }
    let mut flat = flatten(ts);
    dist.broadcast_slice(0, &mut flat);
    unflatten(&flat, ts);
}

/// Averages tensors (batch-norm statistics) over the ranks.
fn average_tensors(dist: &Dist, ts: &[Tensor]) {
    if dist.size() == 1 || ts.is_empty() {
        return;
    }
    let mut flat = flatten(ts);
    dist.allreduce_sum(&mut flat, &mut Vec::new());
    let n = dist.size() as f32;
    flat.iter_mut().for_each(|v| *v /= n);
    unflatten(&flat, ts);
}

pub fn pick_device(kind: DeviceKind, dist: &Dist) -> Result<Device> {
    let gpus = || if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    Ok(match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => match gpus() {
            0 => bail!("train.device = \"cuda\" but libtorch sees no CUDA device (use \"auto\" or \"cpu\")"),
            n => Device::Cuda(dist.local_rank() % n),
        },
        DeviceKind::Auto => match gpus() {
            0 => Device::Cpu,
            n => Device::Cuda(dist.local_rank() % n),
        },
    })
}

/// Torch threads per rank: the config's, or the node's cores shared among its ranks.
pub fn set_threads(configured: usize, dist: &Dist) -> usize {
    let n = if configured > 0 { configured } else { dist.cores_per_rank() };
    tch::set_num_threads(n as i32);
    tch::set_num_interop_threads(1);
    n
}

/// Rank 0 reads the CSVs and gives each rank every N-th row.
fn distribute(dist: &Dist, s: &Settings) -> Result<Shard> {
    let parts = if dist.is_root() {
        let dir = s.data_dir();
        let classes = data::read_classes(&dir.join("classes.csv"))?;
        let train_file = dir.join("train.csv");
        let test_file = dir.join("test.csv");
        let train = data::read_rows(&train_file)?;
        let test = if s.config.train.validate { data::read_rows(&test_file)? } else { Vec::new() };
        if train.is_empty() {
            bail!("{} has no rows", train_file.display());
        }
        data::check_labels(&train, classes.len(), &train_file)?;
        if train.iter().any(|r| r.label < 0) {
            bail!("{} has rows without a label: training needs labels", train_file.display());
        }
        data::check_labels(&test, classes.len(), &test_file)?;
        let n = dist.size();
        let deal = |rows: &[Row], r: usize| rows.iter().skip(r).step_by(n).cloned().collect::<Vec<_>>();
        let mut parts = Vec::with_capacity(n);
        for r in 0..n {
            let shard = Shard {
                classes: classes.clone(),
                train: deal(&train, r),
                test: deal(&test, r),
                total_train: train.len(),
                total_test: test.len(),
            };
            parts.push(serde_json::to_vec(&shard)?);
        }
        if train.len() % n != 0 {
            info!(
                "{} training images over {n} ranks: shards of {} and {}; a rank with fewer batches sends a \
                 zero-weight gradient in the steps it has none for (nothing is dropped or repeated)",
                train.len(),
                train.len() / n,
                train.len().div_ceil(n)
            );
        }
        Some(parts)
    } else {
        None
    };
    let bytes = dist.scatter_bytes(0, parts)?;
    serde_json::from_slice(&bytes).context("decoding this rank's shard")
}

fn epoch_order(len: usize, seed: u64, epoch: u32, rank: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(epoch) << 32) ^ ((rank as u64) << 48) ^ 0x5ac);
    order.shuffle(&mut rng);
    order
}

/// Checkpoint files in `dir`.
pub fn model_file(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

/// The subcommand.
pub fn run(dist: &Dist, s: &Settings, resume: bool, overwrite: bool) -> Result<()> {
    let cfg = &s.config;
    let tc = &cfg.train;
    let threads = set_threads(tc.threads, dist);
    let device = pick_device(tc.device, dist)?;
    let stop = crate::stop_on_signals()?;
    let dir = s.model_dir();
    let store = checkpoint::Store::new(&dir);
    if dist.is_root() && !resume && !overwrite && store.holds_checkpoint() {
        bail!(
            "{} already holds a checkpoint{}: pass --resume to continue it, or --overwrite to start afresh \
             (its epochs are then deleted once the new run saves its first epoch)",
            dir.display(),
            store.epochs().first().map(|(n, _)| format!(" (epoch {n})")).unwrap_or_default()
        );
    }

    if let (true, Some(path)) = (dist.is_root(), cfg.timeline.path()) {
        crate::timeline::prepare(path)?;
    }
    let shard = distribute(dist, s)?;
    let k = shard.classes.len();
    let arch = cfg.model.name;
    info!(
        "{arch}, {k} classes, {} training images over {} rank(s), batch {} per rank, {threads} torch thread(s) per rank, {device:?}",
        shard.total_train,
        dist.size(),
        tc.batch_size
    );

    tch::manual_seed(cfg.dataset.seed as i64);
    let model = Model::new(arch, k as i64, device, cfg.model.feature_extract);
    let mut opt = Optimizer::new(tc.optimizer, tc.lr, model.numel, device);
    let mut state = State {
        epoch: 0,
        arch,
        num_classes: k,
        steps: 0,
        world_size: dist.size(),
        best_epoch: None,
        best_top1: None,
        classes: shard.classes.clone(),
        history: Vec::new(),
        config: cfg.clone(),
    };

    // Rank 0 loads what training starts from; then every rank gets it.
    let mut header = Vec::new();
    if dist.is_root() {
        if resume {
            state = load_for_resume(&store, &model, &mut opt, &state)?;
            if state.world_size != dist.size() {
                info!(
                    "the checkpoint was written by {} rank(s), this run has {}: the global batch changes from {} to {} \
                     images per step (batch {} per rank) and the epochs' data order differs from the first run's; \
                     weights, optimizer state, step count and history carry over",
                    state.world_size,
                    dist.size(),
                    state.world_size * tc.batch_size,
                    dist.size() * tc.batch_size,
                    tc.batch_size
                );
            }
        } else if let Some(p) = s.pretrained() {
            load_pretrained(p, &model, arch)?;
        }
        header = serde_json::to_vec(&state)?;
    }
    dist.broadcast_bytes(0, &mut header);
    state = serde_json::from_slice(&header).context("decoding the training state")?;
    state.config = cfg.clone();
    state.world_size = dist.size();
    broadcast_tensors(dist, &model.all());
    let mut step_buf = [opt.step as f64];
    dist.broadcast_slice(0, &mut step_buf);
    opt.step = step_buf[0] as i64;
    broadcast_tensors(dist, &[opt.m.shallow_clone(), opt.v.shallow_clone()]);

    if state.epoch >= tc.epochs {
        info!(
            "{} already holds {} epoch(s) of training; nothing to do (raise --epochs to go on)",
            dir.display(),
            state.epoch
        );
        return Ok(());
    }

    // The decode cache's budget, shared by the train and test shards in proportion to their size.
    // Every rank reads the memory at its own moment: the node's ranks take the smallest reading
    // (the smallest of all ranks: nodes of one job are alike), so the budgets agree.
    let reading = data::available_memory().map_or(-1.0, |a| a as f64);
    let least = dist.min_f64(reading);
    let available = (least >= 0.0).then_some(least as u64);
    let budget = data::cache_budget(tc.cache, dist.local_size(), available);
    let share = |n: usize| {
        let total = (shard.train.len() + shard.test.len()).max(1) as f64;
        if budget == u64::MAX {
            u64::MAX
        } else {
            (budget as f64 * n as f64 / total) as u64
        }
    };
    let geometry = Geometry::from_config(&cfg.image);
    let loader = |rows: &[Row]| {
        Loader::new(
            ImageStore::new(s.data_dir(), geometry, rows.len(), share(rows.len())),
            geometry,
            tc.on_bad_image,
            dist.rank(),
            tc.prefetch,
        )
    };
    let (mut train_loader, mut test_loader) = (loader(&shard.train), loader(&shard.test));
    let steps = steps_per_epoch(shard.total_train, dist.size(), tc.batch_size);
    let mut sync = GradSync::new(&model.params.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>());
    // Batch-norm statistics before each step, to put back when the step is left out.
    let buffers: Vec<Tensor> = model.buffers.iter().map(|(_, t)| t.shallow_clone()).collect();
    let saved_buffers: Vec<Tensor> = buffers.iter().map(|t| t.detach().copy()).collect();
    let mut first_save = true;

    // Rank 0 reports progress and keeps metrics.jsonl; a resumed run continues the stream.
    let mut reporter = if dist.is_root() {
        // A run that replaces an old one keeps the old stream until its own first epoch is saved,
        // as the old checkpoint is kept.
        let replacing = overwrite && store.holds_checkpoint();
        let stream = metrics::Stream::open(&dir, resume.then_some(state.epoch), replacing)?;
        Some(Reporter::new(stream, tc.log_interval(), tc.epochs))
    } else {
        None
    };
    let lr = opt.lr;

    let first_epoch = state.epoch + 1;
    // The timeline's window: the last `timeline.steps` steps of the first epoch, its validation
    // and its checkpoint.
    let timeline = cfg.timeline.path().map(|p| (p.to_path_buf(), steps.saturating_sub(cfg.timeline.steps)));
    for epoch in first_epoch..=tc.epochs {
        let t_epoch = Instant::now();
        let traced = timeline.as_ref().filter(|_| epoch == first_epoch);
        tch::manual_seed((cfg.dataset.seed as i64) ^ (i64::from(epoch) << 20) ^ (dist.rank() as i64) << 40);
        let order = epoch_order(shard.train.len(), cfg.dataset.seed, epoch, dist.rank());
        let bounds = batch_bounds(order.len(), tc.batch_size);
        let pb = crate::logging::progress_bar(
            steps as u64,
            &format!("epoch {epoch}/{}", tc.epochs),
            dist.is_root() && !crate::logging::progress_as_lines(),
        );
        if let Some(r) = reporter.as_mut() {
            r.start_epoch(epoch, steps);
        }
        let mut times = Times::default();
        let (mut loss_sum, mut seen, mut skipped, mut nonfinite_steps) = (0f64, 0f64, 0u64, 0u64);
        let batches: Vec<&[usize]> =
            (0..steps).map(|step| bounds.get(step).map_or(&[][..], |r| &order[r.clone()])).collect();
        with_batches(&mut train_loader, &shard.train, &batches, device, |next_batch| {
            for step in 0..steps {
                crate::fault::point("step");
                if traced.is_some_and(|(_, from)| step == *from) {
                    crate::timeline::set_recording(true);
                }
                let at = Some(step as u64 + 1);
                let t0 = Instant::now();
                let (batch, sk) = next_batch()?;
                skipped += sk;
                let t1 = crate::timeline::since("data", "load batch", t0, at);
                let mut step_times = Times { data: t1 - t0, ..Times::default() };

                let mut n_local = 0usize;
                let mut local_loss = 0f64;
                let mut bad = false;
                if let Some((x, y)) = batch {
                    if tc.on_nonfinite == OnNonFinite::Skip {
                        copy_tensors(&saved_buffers, &buffers);
                    }
                    let logits = model.net.forward_t(&x, true);
                    let mut loss = logits.cross_entropy_for_logits(&y);
                    if crate::fault::poison("loss") {
                        loss *= f64::NAN;
                    }
                    n_local = y.size()[0] as usize;
                    sync.zero_grads();
                    // The summed loss: GradSync weights each rank by its image count.
                    (&loss * n_local as f64).backward();
                    local_loss = loss.double_value(&[]);
                    bad = !local_loss.is_finite() || !buffers_finite(&buffers);
                }
                let t2 = crate::timeline::since("compute", "forward + backward", t1, at);
                step_times.compute = t2 - t1;

                let synced = sync.sync(dist, n_local, local_loss * n_local as f64, stop.load(Ordering::Relaxed), bad);
                if synced.stop {
                    pb.abandon();
                    stopping(epoch, step, steps, &state, &dir);
                    return Err(Interrupted.into());
                }
                if synced.images == 0.0 {
                    bail!("step {step} of epoch {epoch}: no rank had a decodable image");
                }
                if synced.non_finite {
                    let what = if bad { "this rank's loss or batch-norm statistics" } else { "another rank's step" };
                    match tc.on_nonfinite {
                        OnNonFinite::Fail => bail!(
                            "epoch {epoch}, step {}/{steps}: the loss or gradient is not finite (NaN or infinite; \
                             {what}); training stops and nothing of this epoch is saved. Lower train.lr, look for \
                             bad images, or set train.on_nonfinite = \"skip\" to leave such steps out",
                            step + 1
                        ),
                        OnNonFinite::Skip => {
                            copy_tensors(&buffers, &saved_buffers);
                            nonfinite_steps += 1;
                            warn!(
                                "epoch {epoch}, step {}/{steps}: non-finite loss or gradient ({what}); step left out \
                                 (train.on_nonfinite = \"skip\")",
                                step + 1
                            );
                            step_times.comm = crate::timeline::since("exchange", "allreduce", t2, at) - t2;
                            times.add(&step_times);
                            if let Some(r) = reporter.as_mut() {
                                r.step(0.0, 0.0, &step_times, state.steps, lr);
                            }
                            pb.inc(1);
                            continue;
                        }
                    }
                }
                let total = synced.images;
                let g = synced.grad.to_device(device);
                let t3 = crate::timeline::since("exchange", "allreduce", t2, at);
                step_times.comm = t3 - t2;

                opt.apply(&g, synced.scale, &model.params);
                step_times.optim = crate::timeline::since("optimizer", "optimizer step", t3, at) - t3;
                times.add(&step_times);
                state.steps += 1;
                loss_sum += local_loss * n_local as f64;
                seen += f64::from(total);
                if let Some(r) = reporter.as_mut() {
                    r.step(f64::from(total), synced.loss, &step_times, state.steps, lr);
                }
                let rate = seen / t_epoch.elapsed().as_secs_f64();
                pb.set_message(format!("loss {local_loss:.3}, {rate:.0} img/s"));
                pb.inc(1);
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        if let Some(r) = reporter.as_mut() {
            r.end_steps(state.steps, lr);
        }
        let train_seconds = t_epoch.elapsed().as_secs_f64();
        let train_loss = dist.sum_f64(loss_sum) / seen.max(1.0);
        let skipped_all = dist.sum_f64(skipped as f64) as u64;
        let images_per_second = seen / train_seconds;

        average_tensors(dist, &buffers);
        let t_val = Instant::now();
        let (val_loss, top1, top5) = if tc.validate {
            let traced_batches = if traced.is_some() { cfg.timeline.steps } else { 0 };
            match validate(
                dist,
                &model,
                &shard.test,
                &mut test_loader,
                tc.batch_size,
                device,
                &stop,
                traced_batches,
                tc.log_interval(),
            )? {
                Some(v) => (Some(v.0), Some(v.1), Some(v.2)),
                None => {
                    warn!("validation of epoch {epoch} cut short by a stop signal; the epoch is saved without it");
                    (None, None, None)
                }
            }
        } else {
            (None, None, None)
        };
        let t_val_end = Instant::now();
        let validation_seconds = (t_val_end - t_val).as_secs_f64();
        let record = EpochRecord {
            epoch,
            train_loss,
            val_loss,
            top1,
            top5,
            images_per_second,
            seconds: t_epoch.elapsed().as_secs_f64(),
            skipped_images: skipped_all,
            nonfinite_steps,
        };
        let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2} %", 100.0 * v));
        info!(
            "epoch {epoch}/{}: train loss {train_loss:.4}, val loss {}, top-1 {}, top-5 {}, {images_per_second:.1} img/s, {:.1} s ({})",
            tc.epochs,
            val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            pct(top1),
            pct(top5),
            record.seconds,
            progress::shares_text(&times.shares())
        );
        if epoch == first_epoch {
            log_cache(dist, budget, &[&train_loader, &test_loader], shard.total_train + shard.total_test);
        }
        if skipped_all > 0 {
            warn!("{skipped_all} image(s) could not be decoded and were skipped this epoch");
        }
        if nonfinite_steps > 0 {
            warn!("{nonfinite_steps} step(s) of epoch {epoch} were left out: non-finite loss or gradient");
        }
        state.epoch = epoch;
        state.history.push(record.clone());
        let improved = top1.is_some_and(|t| state.best_top1.is_none_or(|b| t > b));
        if improved {
            state.best_top1 = top1;
            state.best_epoch = Some(epoch);
        }
        if let Some(r) = reporter.as_mut() {
            r.epoch_done(&record, validation_seconds, times.shares(), state.steps);
        }
        if traced.is_some() {
            // Validation stopped recording after its first `timeline.steps` batches.
            crate::timeline::set_recording(true);
            if tc.validate {
                crate::timeline::span("validation", "validation", t_val, t_val_end, None);
            }
        }
        if dist.is_root() {
            let t = Instant::now();
            let metrics_file = reporter.as_ref().and_then(Reporter::file).map(Path::to_path_buf);
            save(&store, &model, &opt, &state, improved, first_save && overwrite, metrics_file.as_deref())?;
            crate::timeline::since("checkpoint", "write checkpoint", t, None);
            if let (true, Some(r)) = (first_save, reporter.as_mut()) {
                r.publish();
            }
        }
        first_save = false;
        // Nobody starts the next epoch (or exits) before the checkpoint is complete; a stop signal
        // that came during validation or saving ends the run here, with this epoch saved.
        let t = Instant::now();
        let stop_now = dist.any(stop.load(Ordering::Relaxed));
        crate::timeline::since("exchange", "end of epoch (waits for the checkpoint)", t, None);
        if let Some((path, from)) = traced {
            let parts = dist.gather_bytes(0, crate::timeline::take(dist.rank()));
            if let Some(parts) = parts {
                let window = format!(
                    "epoch {epoch}: steps {}-{steps} of {steps}{}, checkpoint",
                    from + 1,
                    if tc.validate { ", validation" } else { "" }
                );
                crate::timeline::write(path, &parts, "train", &window)?;
            }
        }
        if stop_now && epoch < tc.epochs {
            warn!(
                "stopping after epoch {epoch} on a signal; its checkpoint in {} is complete; continue with \
                 `sac train --resume`",
                dir.display()
            );
            return Err(Interrupted.into());
        }
    }
    crate::logging::progress_clock(Duration::ZERO);
    log_done(dist, &format!("checkpoints in {}", dir.display()));
    Ok(())
}

/// The end of a command on every rank: rank 0 logs each rank's peak memory and CPU time (a
/// collective: call it where every rank arrives together).
pub fn log_done(dist: &Dist, what: &str) {
    let (rss, cpu) = crate::resource_usage();
    tracing::debug!("done: this rank's peak memory {rss:.0} MiB, CPU {cpu:.1} s");
    let mut all = vec![0f64; 2 * dist.size()];
    all[2 * dist.rank()] = rss;
    all[2 * dist.rank() + 1] = cpu;
    dist.allreduce_sum(&mut all, &mut Vec::new());
    if dist.is_root() {
        crate::logging::done(what, &all.chunks(2).map(|p| (p[0], p[1])).collect::<Vec<_>>());
    }
}

/// After the first epoch (every image seen once): how much of the shards the decode caches hold.
/// A collective: every rank calls it.
fn log_cache(dist: &Dist, budget: u64, loaders: &[&Loader], images: usize) {
    let (bytes, held) = loaders.iter().map(|l| l.store.held()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let mut sums = [bytes as f64, held as f64];
    dist.allreduce_sum(&mut sums, &mut Vec::new());
    let budget_text = match budget {
        0 => "off".to_string(),
        u64::MAX => "unbounded".to_string(),
        b => format!("{} per rank", crate::logging::bytes(b)),
    };
    if budget == 0 {
        info!("decode cache off (train.cache): every image is decoded every epoch");
    } else {
        info!(
            "decode cache ({budget_text}): this rank holds {} ({} images); all ranks {} of {images} images ({:.1} %) in {}",
            crate::logging::bytes(bytes),
            held,
            sums[1] as u64,
            100.0 * sums[1] / images.max(1) as f64,
            crate::logging::bytes(sums[0] as u64)
        );
    }
}

/// The message of a stop at a step boundary.
fn stopping(epoch: u32, step: usize, steps: usize, state: &State, dir: &Path) {
    if state.epoch == 0 {
        warn!("stopping at epoch {epoch}, step {step}/{steps} on a signal, before any checkpoint was written");
    } else {
        warn!(
            "stopping at epoch {epoch}, step {step}/{steps} on a signal; the checkpoint of epoch {} in {} \
             is intact; continue with `sac train --resume`",
            state.epoch,
            dir.display()
        );
    }
}

/// `dst[i] = src[i]` in place, outside autograd.
fn copy_tensors(dst: &[Tensor], src: &[Tensor]) {
    tch::no_grad(|| dst.iter().zip(src).for_each(|(d, s)| d.shallow_clone().copy_(s)));
}

/// Are all batch-norm statistics finite? (A few thousand numbers: cheap every step.)
fn buffers_finite(buffers: &[Tensor]) -> bool {
    buffers.iter().all(|t| !t.is_floating_point() || bool::try_from(t.isfinite().all()).unwrap_or(false))
}

/// Validation on every rank's share of test.csv, summed with one allreduce: (loss, top-1, top-5),
/// or None when a stop signal cut it short on some rank. The timeline (if recording) takes the
/// first `traced` batches.
#[allow(clippy::too_many_arguments)]
fn validate(
    dist: &Dist,
    model: &Model,
    rows: &[Row],
    loader: &mut Loader,
    batch: usize,
    device: Device,
    stop: &std::sync::atomic::AtomicBool,
    traced: usize,
    every: Duration,
) -> Result<Option<(f64, f64, f64)>> {
    let what = format!("validation (rank {}'s share)", dist.rank());
    let mut progress = crate::logging::Progress::new(&what, "images", rows.len() as u64, dist.is_root(), every);
    let mut sums = [0f64; 5]; // loss * n, top-1 hits, top-5 hits, n, stopped
    let idx: Vec<usize> = (0..rows.len()).collect();
    let batches: Vec<&[usize]> = idx.chunks(batch).collect();
    with_batches(loader, rows, &batches, device, |next_batch| {
        for (i, idx) in batches.iter().enumerate() {
            crate::fault::point("validate");
            if i == traced && crate::timeline::recording() {
                crate::timeline::set_recording(false);
            }
            if stop.load(Ordering::Relaxed) {
                sums[4] = 1.0;
                break;
            }
            let t = Instant::now();
            let at = Some(i as u64 + 1);
            let (batch, _) = next_batch()?;
            progress.inc(idx.len() as u64);
            let Some((x, y)) = batch else { continue };
            let t = crate::timeline::since("data", "load batch", t, at);
            let _forward = crate::timeline::Span::new("validation", "forward (validation)", t, at);
            tch::no_grad(|| {
                let logits = model.net.forward_t(&x, false);
                let n = y.size()[0] as f64;
                sums[0] += logits.cross_entropy_for_logits(&y).double_value(&[]) * n;
                let (h1, h5) = topk_hits(&logits, &y);
                sums[1] += h1;
                sums[2] += h5;
                sums[3] += n;
            });
        }
        Ok(())
    })?;
    progress.finish();
    let t = Instant::now();
    dist.allreduce_sum(&mut sums, &mut Vec::new());
    crate::timeline::since("exchange", "allreduce", t, None);
    if sums[4] > 0.0 {
        return Ok(None);
    }
    let n = sums[3].max(1.0);
    Ok(Some((sums[0] / n, sums[1] / n, sums[2] / n)))
}

/// Hits among the top 1 and the top 5 (or all classes, if fewer) predictions.
pub fn topk_hits(logits: &Tensor, labels: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let hits = top.eq_tensor(&labels.unsqueeze(1));
    let h1 = hits.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]);
    let h5 = hits.sum(Kind::Float).double_value(&[]);
    (h1, h5)
}

fn save(
    store: &checkpoint::Store,
    model: &Model,
    opt: &Optimizer,
    state: &State,
    best: bool,
    replace_old_run: bool,
    metrics_file: Option<&Path>,
) -> Result<()> {
    crate::fault::point("save");
    // Never save a NaN: name the first tensor that holds one.
    let opt_tensors = opt.tensors();
    if let Some(name) = checkpoint::first_non_finite(model.vars.iter().chain(opt_tensors.iter().map(|(n, t)| (n, t)))) {
        bail!(
            "epoch {}: {name} holds NaN or infinite values, so no checkpoint is written (the last one in {} stays). \
             A batch-norm statistic goes NaN when a batch has one value per channel (batch size 1, or one image \
             at an input so small that the last layers are 1x1): use a larger train.batch_size or image size",
            state.epoch,
            store.dir.display()
        );
    }
    let categories: Vec<i64> = state.classes.iter().map(|c| c.category_id).collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("arch".to_string(), state.arch.to_string()),
        ("num_classes".to_string(), state.num_classes.to_string()),
        ("epoch".to_string(), state.epoch.to_string()),
        (checkpoint::CATEGORY_IDS.to_string(), serde_json::to_string(&categories)?),
    ]);
    let model_bytes = checkpoint::to_safetensors(&checkpoint::with_batch_counters(&model.vars, state.steps), &meta)?;
    let mut opt_meta = meta.clone();
    opt_meta.insert("optimizer".into(), format!("{:?}", opt.kind).to_lowercase());
    opt_meta.insert("step".into(), opt.step.to_string());
    let opt_bytes = checkpoint::to_safetensors(&opt_tensors, &opt_meta)?;
    let state_bytes = (serde_json::to_string_pretty(state)? + "\n").into_bytes();
    store.write_epoch(
        state.epoch,
        &[
            ("model.safetensors", &model_bytes[..]),
            ("optimizer.safetensors", &opt_bytes[..]),
            ("state.json", &state_bytes[..]),
        ],
    )?;
    store.publish(state.epoch)?;
    if replace_old_run {
        let _ = std::fs::remove_file(store.dir.join("best.safetensors"));
    }
    if best {
        store.set_best(state.epoch)?;
    }
    store.prune(state.epoch, 2, replace_old_run)?;
    let intervals = metrics_file.map(|f| metrics::loss_points(&metrics::read(f))).unwrap_or_default();
    if let Err(e) = crate::plot::training_curves(&store.dir.join("training.png"), &state.history, &intervals) {
        warn!("training.png not drawn: {e:#}");
    }
    info!("checkpoint of epoch {} written to {}", state.epoch, store.epoch_dir(state.epoch).display());
    Ok(())
}

/// The newest checkpoint that is whole and loads: epoch directories newest first (checked against
/// their manifests), else the older flat layout. Says which it took and why it passed others over.
fn load_for_resume(store: &checkpoint::Store, model: &Model, opt: &mut Optimizer, fresh: &State) -> Result<State> {
    let dir = &store.dir;
    let epochs = store.epochs();
    if epochs.is_empty() {
        if dir.join("state.json").is_file() {
            let state = load_checkpoint_files(dir, model, opt, fresh)?;
            info!(
                "resuming after epoch {} from {} (a checkpoint of the older flat layout)",
                state.epoch,
                dir.display()
            );
            return Ok(state);
        }
        bail!("--resume: no checkpoint to resume in {} (train without --resume first)", dir.display());
    }
    let mut passed_over = Vec::new();
    for (n, path) in &epochs {
        let loaded = checkpoint::Store::verify(path).and_then(|()| load_checkpoint_files(path, model, opt, fresh));
        match loaded {
            Ok(state) => {
                for (m, why) in &passed_over {
                    warn!("--resume: epoch {m} is not usable ({why}); falling back to epoch {n}");
                }
                info!("resuming after epoch {} from {} (the newest complete checkpoint)", state.epoch, path.display());
                return Ok(state);
            }
            // A checkpoint of another model or data set is not damage: no fallback past it.
            Err(e) if e.is::<Mismatch>() => return Err(e),
            Err(e) => passed_over.push((*n, format!("{e:#}"))),
        }
    }
    let list: Vec<String> = passed_over.iter().map(|(n, why)| format!("epoch {n}: {why}")).collect();
    bail!("--resume: no complete checkpoint in {}: {}", dir.display(), list.join("; "))
}

/// The checkpoint is of another architecture, class count or optimizer than the config asks for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

/// Loads `state.json`, the model and the optimizer state from `dir` (one epoch's files).
fn load_checkpoint_files(dir: &Path, model: &Model, opt: &mut Optimizer, fresh: &State) -> Result<State> {
    let state_file = dir.join("state.json");
    let text = std::fs::read_to_string(&state_file).with_context(|| format!("cannot read {}", state_file.display()))?;
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("{} is not a sac training state", state_file.display()))?;
    if state.arch != fresh.arch {
        return Err(Mismatch(format!(
            "--resume: {} holds a {} checkpoint, the config asks for {}",
            dir.display(),
            state.arch,
            fresh.arch
        ))
        .into());
    }
    if state.num_classes != fresh.num_classes {
        return Err(Mismatch(format!(
            "--resume: the checkpoint in {} has {} classes, the data dir has {} (a different data set?)",
            dir.display(),
            state.num_classes,
            fresh.num_classes
        ))
        .into());
    }
    let what = model_file(dir);
    let (tensors, meta) = checkpoint::read_safetensors(&what)?;
    check_epoch(&meta, state.epoch, &what)?;
    checkpoint::load_into(&model.vars, &tensors, &|_| false, &what.display().to_string())?;
    let opt_file = dir.join("optimizer.safetensors");
    let (ot, ometa) = checkpoint::read_safetensors(&opt_file)?;
    check_epoch(&ometa, state.epoch, &opt_file)?;
    let kind = format!("{:?}", opt.kind).to_lowercase();
    if ometa.get("optimizer") != Some(&kind) {
        return Err(Mismatch(format!(
            "{} holds {:?} state, the config asks for {kind}",
            opt_file.display(),
            ometa.get("optimizer")
        ))
        .into());
    }
    let state_tensors: BTreeMap<String, Tensor> = opt.tensors().into_iter().collect();
    checkpoint::load_into(&state_tensors, &ot, &|_| false, &opt_file.display().to_string())?;
    opt.step = ometa.get("step").and_then(|s| s.parse().ok()).context("optimizer state without a step count")?;
    Ok(state)
}

fn check_epoch(meta: &BTreeMap<String, String>, epoch: u32, file: &Path) -> Result<()> {
    let found = meta.get("epoch").cloned().unwrap_or_default();
    if found != epoch.to_string() {
        bail!("{} is of epoch {found:?} but state.json says {epoch}: the checkpoint is inconsistent", file.display());
    }
    Ok(())
}

/// Torchvision-named weights to start from; a head of another class count is re-initialized.
fn load_pretrained(path: &Path, model: &Model, arch: Arch) -> Result<()> {
    let (tensors, _) = checkpoint::read_safetensors(path).context("model.pretrained")?;
    let head = crate::models::head_prefix(arch);
    let head_differs = model
        .vars
        .iter()
        .filter(|(n, _)| n.starts_with(head))
        .any(|(n, v)| tensors.get(n).is_some_and(|t| t.size() != v.size()));
    if head_differs {
        info!("{}: the classifier head has another class count; it is re-initialized", path.display());
    }
    checkpoint::load_into(
        &model.vars,
        &tensors,
        &|n| head_differs && n.starts_with(head),
        &path.display().to_string(),
    )?;
    info!("started from {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 0, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 0, 1, 0));
        assert_ne!(a, epoch_order(100, 0, 2, 0));
        assert_ne!(a, epoch_order(100, 0, 1, 1));
    }

    #[test]
    fn a_last_batch_of_one_image_joins_the_batch_before_it() {
        let b = |len, batch| batch_bounds(len, batch).into_iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        assert_eq!(b(5, 2), [(0, 2), (2, 5)]);
        assert_eq!(b(4, 2), [(0, 2), (2, 4)]);
        assert_eq!(b(9, 4), [(0, 4), (4, 9)]);
        assert_eq!(b(1, 4), [(0, 1)], "a shard of one image stays one batch");
        assert_eq!(b(0, 4), []);
        assert_eq!(b(3, 1), [(0, 1), (1, 2), (2, 3)], "batch size 1 is the user's choice");
    }

    #[test]
    fn all_finite_finds_nan_and_both_infinities_anywhere() {
        let mut v = vec![1.5f32; 10_000];
        assert!(all_finite(&v));
        v[0] = f32::MAX;
        v[1] = -0.0;
        v[2] = f32::MIN_POSITIVE / 2.0; // subnormal
        assert!(all_finite(&v));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = v.clone();
            w[9_999] = bad;
            assert!(!all_finite(&w), "{bad}");
        }
    }

    #[test]
    fn steps_per_epoch_is_the_most_batches_of_any_rank() {
        // 16 images over 3 ranks: shards of 6, 5, 5; batch 4 gives 2, 1 (4 + 1 folded), 1 batches.
        assert_eq!(steps_per_epoch(16, 3, 4), 2);
        assert_eq!(steps_per_epoch(16, 2, 4), 2);
        assert_eq!(steps_per_epoch(10, 2, 2), 2, "shards of 5: batches of 2 and 3");
        assert_eq!(steps_per_epoch(7, 1, 64), 1);
    }

    #[test]
    fn topk_counts_hits_with_fewer_than_five_classes() {
        let logits = Tensor::from_slice(&[0.1f32, 0.9, 0.0, 0.8, 0.1, 0.1, 0.2, 0.3, 0.5]).view([3, 3]);
        let labels = Tensor::from_slice(&[1i64, 2, 0]);
        assert_eq!(topk_hits(&logits, &labels), (1.0, 3.0));
    }
}
