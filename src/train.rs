//! `sac train`: data-parallel training over the MPI ranks.
//!
//! Rank 0 reads the CSVs and scatters each rank its shard; rank 0's initial parameters are
//! broadcast; every step, each rank computes gradients on its local batch, all gradients go into
//! one flat buffer that is summed with one allreduce per large bucket, and every rank applies the
//! same optimizer step. Every rank runs the same number of steps; a rank whose shard is exhausted
//! contributes a zero-weight gradient, and the buffer carries each rank's batch size so the
//! average is over images, exactly as one process on the concatenated batch.
use std::collections::{BTreeMap, HashSet};
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
use crate::config::{Arch, Config, DeviceKind, OnBadImage, OptimizerKind, Settings};
use crate::data::{self, Class, Geometry, ImageStore, Row};
use crate::dist::Dist;

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
    max_train_shard: usize,
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

/// Where the time of an epoch went, summed over its steps.
#[derive(Default, Clone, Copy)]
struct Times {
    data: Duration,
    compute: Duration,
    comm: Duration,
    optim: Duration,
}

impl Times {
    fn shares(&self) -> String {
        let total = (self.data + self.compute + self.comm + self.optim).as_secs_f64().max(1e-9);
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / total;
        format!(
            "data {:.0} %, compute {:.0} %, allreduce {:.0} %, optimizer {:.0} %",
            pct(self.data),
            pct(self.compute),
            pct(self.comm),
            pct(self.optim)
        )
    }
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
/// buffer (one allreduce per `dist::BUCKET_FLOATS` bucket), followed by two more numbers: the
/// rank's image count and its stop request (a signal), so every rank learns both in the same call.
///
/// For parameters that are contiguous f32 CPU tensors (training on the CPU), each parameter's
/// gradient *is* a view into the send buffer (what DDP calls gradient_as_bucket_view): backward
/// accumulates straight into it, so nothing is copied before the allreduce, and the division by
/// the image count is left to the optimizer (`Synced::scale`), so nothing is copied after it.
/// Other parameters (a GPU) have their gradients copied into the buffer.
pub struct GradSync {
    params: Vec<Tensor>,
    numel: usize,
    /// The gradients, then this rank's image count and stop flag.
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
        let buf = || Tensor::zeros([numel as i64 + 2], (Kind::Float, Device::Cpu));
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

    /// Sums the gradients (of the summed loss over `images` images; ignored when `images` is 0)
    /// and the image counts and stop requests over the ranks.
    pub fn sync(&mut self, dist: &Dist, images: usize, stop: bool) -> Synced {
        let p = self.numel;
        // SAFETY: `send` and `recv` are contiguous f32 CPU tensors of p + 2 elements that only this
        // struct owns; autograd writes into `send` only during backward, not during this call.
        let send = unsafe { f32_slice_mut(&self.send, p + 2) };
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
        let (total, stop, sums) = if dist.size() == 1 {
            (send[p], send[p + 1] > 0.0, &self.send)
        } else {
            // SAFETY: as above.
            let recv = unsafe { f32_slice_mut(&self.recv, p + 2) };
            dist.allreduce_sum_into(send, recv);
            (recv[p], recv[p + 1] > 0.0, &self.recv)
        };
        let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
        Synced { grad: sums.narrow(0, 0, p as i64), scale, images: total, stop }
    }
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

/// Adam (as `torch.optim.Adam`, no weight decay) or SGD with momentum 0.9 (as `torch.optim.SGD`),
/// on the flat averaged gradient; its state is flat too, so it saves and broadcasts as one tensor.
struct Optimizer {
    kind: OptimizerKind,
    lr: f64,
    step: i64,
    /// Adam: exp_avg; SGD: momentum_buffer.
    m: Tensor,
    /// Adam: exp_avg_sq.
    v: Tensor,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const MOMENTUM: f64 = 0.9;

impl Optimizer {
    fn new(kind: OptimizerKind, lr: f64, numel: usize, device: Device) -> Self {
        let z = || Tensor::zeros([numel as i64], (Kind::Float, device));
        Optimizer { kind, lr, step: 0, m: z(), v: z() }
    }

    /// Applies one step with the flat gradient `g × scale` to `params`.
    fn apply(&mut self, g: &Tensor, scale: f32, params: &[(String, Tensor)]) {
        self.step += 1;
        if is_cpu_f32(g) && is_cpu_f32(&self.m) && params.iter().all(|(_, p)| is_cpu_f32(p)) {
            self.apply_fused(g, scale, params);
        } else {
            self.apply_tensor_ops(&(g * f64::from(scale)), params);
        }
    }

    /// One pass over gradient, state and parameters per element, in place: no temporary buffers,
    /// where the tensor-op formulation makes six or more passes, each allocating 4 bytes per parameter.
    fn apply_fused(&mut self, g: &Tensor, scale: f32, params: &[(String, Tensor)]) {
        let numel = g.numel();
        // SAFETY: all tensors are contiguous CPU f32 tensors of the given lengths, owned by the
        // optimizer, the model or the gradient exchange, and nothing else reads or writes them
        // during the step.
        let slice = |t: &Tensor, n: usize| unsafe { f32_slice_mut(t, n) };
        let g = slice(g, numel);
        let m = slice(&self.m, numel);
        let v = slice(&self.v, numel);
        let lr = self.lr as f32;
        let bc1 = 1.0 - BETA1.powi(self.step as i32);
        let bc2 = 1.0 - BETA2.powi(self.step as i32);
        let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPS as f32);
        let (step_size, inv_sqrt_bc2) = ((self.lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32);
        let mut off = 0;
        for (_, p) in params {
            let n = p.numel();
            let p = slice(p, n);
            let (g, m, v) = (&g[off..off + n], &mut m[off..off + n], &mut v[off..off + n]);
            match self.kind {
                OptimizerKind::Adam => {
                    for i in 0..n {
                        let gi = g[i] * scale;
                        let mi = b1 * m[i] + (1.0 - b1) * gi;
                        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                        m[i] = mi;
                        v[i] = vi;
                        p[i] -= step_size * mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
                    }
                }
                OptimizerKind::Sgd => {
                    // torch.optim.SGD: buf = grad at the first step, then momentum * buf + grad;
                    // with buf starting at zero the one formula covers both.
                    for i in 0..n {
                        let mi = MOMENTUM as f32 * m[i] + g[i] * scale;
                        m[i] = mi;
                        p[i] -= lr * mi;
                    }
                }
            }
            off += n;
        }
    }

    /// The same with tensor operations, for parameters on a GPU.
    fn apply_tensor_ops(&mut self, g: &Tensor, params: &[(String, Tensor)]) {
        tch::no_grad(|| {
            let g = g.to_device(self.m.device());
            let update = match self.kind {
                OptimizerKind::Adam => {
                    let _ = self.m.lerp_(&g, 1.0 - BETA1);
                    let _ = self.v.lerp_(&(&g * &g), 1.0 - BETA2);
                    let bc1 = 1.0 - BETA1.powi(self.step as i32);
                    let bc2 = 1.0 - BETA2.powi(self.step as i32);
                    let denom = self.v.sqrt() / bc2.sqrt() + EPS;
                    (&self.m / denom) * (-self.lr / bc1)
                }
                OptimizerKind::Sgd => {
                    let _ = self.m.g_mul_scalar_(MOMENTUM).g_add_(&g);
                    &self.m * (-self.lr)
                }
            };
            let mut off = 0i64;
            for (_, p) in params {
                let n = p.numel() as i64;
                let _ = p.shallow_clone().g_add_(&update.narrow(0, off, n).view(p.size().as_slice()));
                off += n;
            }
        });
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        match self.kind {
            OptimizerKind::Adam => {
                vec![("exp_avg".into(), self.m.shallow_clone()), ("exp_avg_sq".into(), self.v.shallow_clone())]
            }
            OptimizerKind::Sgd => vec![("momentum_buffer".into(), self.m.shallow_clone())],
        }
    }
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
    let n = if configured > 0 {
        configured
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / dist.local_size()).max(1)
    };
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
        let max_train_shard = train.len().div_ceil(n);
        let mut parts = Vec::with_capacity(n);
        for r in 0..n {
            let shard = Shard {
                classes: classes.clone(),
                train: deal(&train, r),
                test: deal(&test, r),
                total_train: train.len(),
                max_train_shard,
            };
            parts.push(serde_json::to_vec(&shard)?);
        }
        if train.len() % n != 0 {
            info!(
                "{} training images over {n} ranks: shards of {} and {}; ranks with fewer images sit out \
                 the last step with a zero-weight gradient (nothing is dropped or repeated)",
                train.len(),
                train.len() / n,
                max_train_shard
            );
        }
        Some(parts)
    } else {
        None
    };
    let bytes = dist.scatter_bytes(0, parts)?;
    serde_json::from_slice(&bytes).context("decoding this rank's shard")
}

/// Loads a batch: the images of `rows[idx]` that decode, with their labels.
struct Loader {
    store: ImageStore,
    geometry: Geometry,
    on_bad: OnBadImage,
    bad: HashSet<usize>,
    values: Vec<f32>,
    rank: usize,
}

impl Loader {
    /// The decodable images of `rows[idx]` as a batch (None if there is none), and how many were skipped.
    fn batch(&mut self, rows: &[Row], idx: &[usize], device: Device) -> Result<(Option<(Tensor, Tensor)>, u64)> {
        let mut skipped = 0;
        let mut images = Vec::with_capacity(idx.len());
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            if self.bad.contains(&i) {
                skipped += 1;
                continue;
            }
            match self.store.get(i, &rows[i].path) {
                Ok(img) => {
                    images.push(img.into_owned());
                    labels.push(rows[i].label);
                }
                Err(e) if self.on_bad == OnBadImage::Fail => {
                    return Err(e).context(format!("bad image on rank {} (train.on_bad_image = \"fail\")", self.rank))
                }
                Err(e) => {
                    warn!("skipping {}: {:#}", self.store.path(&rows[i].path).display(), e);
                    self.bad.insert(i);
                    skipped += 1;
                }
            }
        }
        if images.is_empty() {
            return Ok((None, skipped));
        }
        let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        data::normalize_into(&refs, &self.geometry, &mut self.values);
        let x = data::batch_tensor(&self.values, refs.len(), &self.geometry).to_device(device);
        let y = Tensor::from_slice(&labels).to_device(device);
        Ok((Some((x, y)), skipped))
    }
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
pub fn run(dist: &Dist, s: &Settings, resume: bool) -> Result<()> {
    let cfg = &s.config;
    let tc = &cfg.train;
    let threads = set_threads(tc.threads, dist);
    let device = pick_device(tc.device, dist)?;
    let stop = crate::stop_on_signals()?;

    let shard = distribute(dist, s)?;
    let k = shard.classes.len();
    let arch = cfg.model.name;
    let dir = s.model_dir();
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
            state = load_for_resume(&dir, &model, &mut opt, &state)?;
            info!("resuming after epoch {} from {}", state.epoch, dir.display());
        } else if let Some(p) = s.pretrained() {
            load_pretrained(p, &model, arch)?;
        }
        header = serde_json::to_vec(&state)?;
    }
    dist.broadcast_bytes(0, &mut header);
    state = serde_json::from_slice(&header).context("decoding the training state")?;
    state.config = cfg.clone();
    broadcast_tensors(dist, &model.all());
    let mut step_buf = [opt.step as f32];
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

    let loader = |rows: &[Row]| Loader {
        store: ImageStore::new(s.data_dir(), Geometry::from_config(&cfg.image), rows.len(), tc.cache),
        geometry: Geometry::from_config(&cfg.image),
        on_bad: tc.on_bad_image,
        bad: HashSet::new(),
        values: Vec::new(),
        rank: dist.rank(),
    };
    let (mut train_loader, mut test_loader) = (loader(&shard.train), loader(&shard.test));
    let steps = shard.max_train_shard.div_ceil(tc.batch_size);
    let mut sync = GradSync::new(&model.params.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>());

    for epoch in state.epoch + 1..=tc.epochs {
        let t_epoch = Instant::now();
        tch::manual_seed((cfg.dataset.seed as i64) ^ (i64::from(epoch) << 20) ^ (dist.rank() as i64) << 40);
        let order = epoch_order(shard.train.len(), cfg.dataset.seed, epoch, dist.rank());
        let pb = crate::logging::progress_bar(steps as u64, &format!("epoch {epoch}/{}", tc.epochs), dist.is_root());
        let mut times = Times::default();
        let (mut loss_sum, mut seen, mut skipped) = (0f64, 0f64, 0u64);
        for step in 0..steps {
            let t0 = Instant::now();
            let lo = (step * tc.batch_size).min(order.len());
            let hi = ((step + 1) * tc.batch_size).min(order.len());
            let (batch, sk) = train_loader.batch(&shard.train, &order[lo..hi], device)?;
            skipped += sk;
            let t1 = Instant::now();
            times.data += t1 - t0;

            let mut n_local = 0usize;
            let mut local_loss = 0f64;
            if let Some((x, y)) = batch {
                let logits = model.net.forward_t(&x, true);
                let loss = logits.cross_entropy_for_logits(&y);
                n_local = y.size()[0] as usize;
                sync.zero_grads();
                // The summed loss: GradSync weights each rank by its image count.
                (&loss * n_local as f64).backward();
                local_loss = loss.double_value(&[]);
            }
            let t2 = Instant::now();
            times.compute += t2 - t1;

            let synced = sync.sync(dist, n_local, stop.load(Ordering::Relaxed));
            if synced.stop {
                pb.abandon();
                if state.epoch == 0 {
                    warn!(
                        "stopping at epoch {epoch}, step {step}/{steps} on a signal, before any checkpoint was written"
                    );
                } else {
                    warn!(
                        "stopping at epoch {epoch}, step {step}/{steps} on a signal; the checkpoint of epoch {} in {} \
                         is intact; continue with `sac train --resume`",
                        state.epoch,
                        dir.display()
                    );
                }
                return Err(Interrupted.into());
            }
            if synced.images == 0.0 {
                bail!("step {step} of epoch {epoch}: no rank had a decodable image");
            }
            let total = synced.images;
            let g = synced.grad.to_device(device);
            let t3 = Instant::now();
            times.comm += t3 - t2;

            opt.apply(&g, synced.scale, &model.params);
            times.optim += t3.elapsed();
            state.steps += 1;
            loss_sum += local_loss * n_local as f64;
            seen += f64::from(total);
            let rate = seen / t_epoch.elapsed().as_secs_f64();
            pb.set_message(format!("loss {local_loss:.3}, {rate:.0} img/s"));
            pb.inc(1);
        }
        pb.finish_and_clear();
        let train_seconds = t_epoch.elapsed().as_secs_f64();
        let train_loss = dist.sum_f64(loss_sum) / seen.max(1.0);
        let skipped_all = dist.sum_f64(skipped as f64) as u64;
        let images_per_second = seen / train_seconds;

        average_tensors(dist, &model.buffers.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>());
        let (val_loss, top1, top5) = if tc.validate {
            let v = validate(dist, &model, &shard.test, &mut test_loader, tc.batch_size, device)?;
            (Some(v.0), Some(v.1), Some(v.2))
        } else {
            (None, None, None)
        };
        let record = EpochRecord {
            epoch,
            train_loss,
            val_loss,
            top1,
            top5,
            images_per_second,
            seconds: t_epoch.elapsed().as_secs_f64(),
            skipped_images: skipped_all,
        };
        let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2} %", 100.0 * v));
        info!(
            "epoch {epoch}/{}: train loss {train_loss:.4}, val loss {}, top-1 {}, top-5 {}, {images_per_second:.1} img/s, {:.1} s ({})",
            tc.epochs,
            val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            pct(top1),
            pct(top5),
            record.seconds,
            times.shares()
        );
        if skipped_all > 0 {
            warn!("{skipped_all} image(s) could not be decoded and were skipped this epoch");
        }
        state.epoch = epoch;
        state.history.push(record);
        let improved = top1.is_some_and(|t| state.best_top1.is_none_or(|b| t > b));
        if improved {
            state.best_top1 = top1;
            state.best_epoch = Some(epoch);
        }
        if dist.is_root() {
            save(&dir, &model, &opt, &state, improved)?;
        }
        // Nobody starts the next epoch (or exits) before the checkpoint is complete.
        dist.barrier();
    }
    let (rss, cpu) = crate::resource_usage();
    info!("done: checkpoints in {}; this rank's peak memory {rss:.0} MiB, CPU {cpu:.1} s", dir.display());
    Ok(())
}

/// Validation on every rank's share of test.csv, summed with one allreduce: (loss, top-1, top-5).
fn validate(
    dist: &Dist,
    model: &Model,
    rows: &[Row],
    loader: &mut Loader,
    batch: usize,
    device: Device,
) -> Result<(f64, f64, f64)> {
    let mut sums = [0f64; 4]; // loss * n, top-1 hits, top-5 hits, n
    let idx: Vec<usize> = (0..rows.len()).collect();
    for chunk in idx.chunks(batch) {
        let (Some((x, y)), _) = loader.batch(rows, chunk, device)? else { continue };
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
    dist.allreduce_sum(&mut sums, &mut Vec::new());
    let n = sums[3].max(1.0);
    Ok((sums[0] / n, sums[1] / n, sums[2] / n))
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

fn save(dir: &Path, model: &Model, opt: &Optimizer, state: &State, best: bool) -> Result<()> {
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("arch".to_string(), state.arch.to_string()),
        ("num_classes".to_string(), state.num_classes.to_string()),
        ("epoch".to_string(), state.epoch.to_string()),
    ]);
    let model_bytes = checkpoint::to_safetensors(&checkpoint::with_batch_counters(&model.vars, state.steps), &meta)?;
    let mut opt_meta = meta.clone();
    opt_meta.insert("optimizer".into(), format!("{:?}", opt.kind).to_lowercase());
    opt_meta.insert("step".into(), opt.step.to_string());
    let opt_bytes = checkpoint::to_safetensors(&opt.tensors(), &opt_meta)?;
    // The state file is written last: it names the epoch the other two files hold.
    checkpoint::write_atomic(&model_file(dir), &model_bytes)?;
    checkpoint::write_atomic(&dir.join("optimizer.safetensors"), &opt_bytes)?;
    checkpoint::write_atomic(&dir.join("state.json"), &(serde_json::to_string_pretty(state)? + "\n").into_bytes())?;
    if best {
        checkpoint::write_atomic(&dir.join("best.safetensors"), &model_bytes)?;
    }
    if let Err(e) = crate::plot::training_curves(&dir.join("training.png"), &state.history) {
        warn!("training.png not drawn: {e:#}");
    }
    info!("checkpoint of epoch {} written to {}", state.epoch, dir.display());
    Ok(())
}

fn load_for_resume(dir: &Path, model: &Model, opt: &mut Optimizer, fresh: &State) -> Result<State> {
    let state_file = dir.join("state.json");
    let text = std::fs::read_to_string(&state_file).with_context(|| {
        format!("--resume: no checkpoint to resume in {} (train without --resume first)", dir.display())
    })?;
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("{} is not a sac training state", state_file.display()))?;
    if state.arch != fresh.arch {
        bail!("--resume: {} holds a {} checkpoint, the config asks for {}", dir.display(), state.arch, fresh.arch);
    }
    if state.num_classes != fresh.num_classes {
        bail!(
            "--resume: the checkpoint in {} has {} classes, the data dir has {} (a different data set?)",
            dir.display(),
            state.num_classes,
            fresh.num_classes
        );
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
        bail!("{} holds {:?} state, the config asks for {kind}", opt_file.display(), ometa.get("optimizer"));
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
    fn topk_counts_hits_with_fewer_than_five_classes() {
        let logits = Tensor::from_slice(&[0.1f32, 0.9, 0.0, 0.8, 0.1, 0.1, 0.2, 0.3, 0.5]).view([3, 3]);
        let labels = Tensor::from_slice(&[1i64, 2, 0]);
        assert_eq!(topk_hits(&logits, &labels), (1.0, 3.0));
    }

    /// Our Adam on a flat buffer against torch.optim.Adam. Numbers from PyTorch 2.13:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], requires_grad=True); opt = torch.optim.Adam([p], lr=0.1)
    /// for g in ([0.5, -1.0], [0.25, 2.0]):
    ///     p.grad = torch.tensor(g); opt.step()
    /// print(p)  # tensor([ 0.8068, -1.9366])
    /// # and with torch.optim.SGD([p], lr=0.1, momentum=0.9): tensor([ 0.8800, -2.0100])
    /// ```
    #[test]
    fn adam_and_sgd_match_torch_optim() {
        for (kind, want) in [(OptimizerKind::Adam, [0.8068f32, -1.9366]), (OptimizerKind::Sgd, [0.88, -2.01])] {
            let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let mut opt = Optimizer::new(kind, 0.1, 2, Device::Cpu);
            for g in [[0.5f32, -1.0], [0.25, 2.0]] {
                opt.apply(&Tensor::from_slice(&g), 1.0, &params);
            }
            let v = Vec::<f32>::try_from(&p.detach()).unwrap();
            assert!((v[0] - want[0]).abs() < 1e-4 && (v[1] - want[1]).abs() < 1e-4, "{kind:?}: {v:?}");
        }
    }
}
