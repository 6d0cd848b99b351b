//! What `sac train` does before its first step: the rank's device and arithmetic, the checkpoint
//! directory, the shard, the weights training starts from (a resumed run's, pretrained ones or
//! seeded ones, the same on every rank), the loaders and the exchange, and what the log says of
//! each.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::Device;
use tracing::info;

use super::augment::Augment;
use super::auto_overlap;
use super::ema::Ema;
use super::epoch::Stepper;
use super::exchange::{self, broadcast_tensors};
use super::loader::Loader;
use super::mix;
use super::model::Model;
use super::optim::{Hyper, Optimizer};
use super::persist;
use super::schedule::Schedule;
use super::shard::{self, distribute, Shard};
use crate::checkpoint;
use crate::config::{OptimizerKind, Settings, TrainCfg};
use crate::data::{self, Geometry, ImageStore, Row};
use crate::infra::dist::Dist;
use crate::precision::{Numerics, Workload};
use crate::record::State;

/// How a run treats a checkpoint already in its directory: `--resume` continues it, `--overwrite`
/// replaces it (its epochs are deleted once the new run saves its first); neither refuses to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    pub resume: bool,
    pub overwrite: bool,
}

/// What the whole run uses and never changes.
pub(crate) struct Env {
    pub device: Device,
    /// Autocast and memory format (`train.precision`, `train.channels_last`), agreed by the ranks.
    pub numerics: Numerics,
    /// Set by SIGTERM / SIGINT; the ranks agree to stop at a step boundary.
    pub stop: Arc<AtomicBool>,
    /// `<checkpoint_dir>/<model>`.
    pub dir: PathBuf,
    pub store: checkpoint::Store,
    /// This rank's training and test rows, and the class list.
    pub shard: Shard,
}

impl Env {
    /// Threads, device and numerics of this rank; refuses to replace a checkpoint the user did not
    /// name (rank 0); prepares the timeline's file; scatters the shards. Collectives.
    pub fn prepare(dist: &Dist, s: &Settings, mode: Mode) -> Result<Env> {
        let (cfg, tc) = (&s.config, &s.config.train);
        let threads = crate::infra::process::set_threads(tc.threads, dist.cores_per_rank());
        dist.log_placement(threads);
        let device = crate::infra::process::pick_device("train.device", tc.device, dist.local_rank())?;
        let on = Workload { device, arch: cfg.model.name, side: cfg.image.width.min(cfg.image.height) as i64 };
        let numerics = agreed_numerics(dist, "train.precision", tc.precision, tc.channels_last, on)?;
        let stop = crate::infra::process::stop_on_signals()?;
        let dir = s.model_dir();
        let store = checkpoint::Store::new(&dir);
        if dist.is_root() && !mode.resume && !mode.overwrite && store.holds_checkpoint() {
            bail!(
                "{} already holds a checkpoint{}: pass --resume to continue it, or --overwrite to start afresh \
                 (its epochs are then deleted once the new run saves its first epoch)",
                dir.display(),
                store.epochs().first().map(|(n, _)| format!(" (epoch {n})")).unwrap_or_default()
            );
        }
        if let (true, Some(path)) = (dist.is_root(), cfg.timeline.path()) {
            crate::infra::timeline::prepare(path)?;
        }
        let shard = distribute(dist, s)?;
        info!(
            "{}, {} classes, {} training images over {} rank(s), batch {} per rank, {threads} torch thread(s) per rank, \
             {}; {}",
            cfg.model.name,
            shard.classes.len(),
            shard.total_train,
            dist.size(),
            tc.batch_size,
            device_name(device),
            numerics.reason
        );
        Ok(Env { device, numerics, stop, dir, store, shard })
    }

    /// `--resume` goes on in the number format the resumed run's last epoch computed in, unless
    /// this command line sets `train.precision`: a run started with `--set train.precision="bf16"`
    /// and resumed with `--resume` alone stays bf16, and a run resumes exactly within a precision.
    /// `state` is the same on every rank (broadcast), so is the outcome.
    pub fn keep_precision_of(&mut self, state: &State, s: &Settings, resume: bool) {
        const KEY: &str = "train.precision";
        let recorded = state.history.last().and_then(|e| e.precision.as_deref());
        let Some(was_bf16) = recorded.map(|p| p == "bf16") else { return };
        if !resume || s.sets(KEY) || was_bf16 == self.numerics.bf16 {
            return;
        }
        self.numerics = crate::precision::kept(KEY, was_bf16, state.epoch, &self.numerics);
        info!("resuming in {}", self.numerics.reason);
    }
}

/// Where training starts, the same on every rank: weights, optimizer state, the run's state and
/// the moving average of the weights.
pub(crate) struct Start {
    pub model: Model,
    pub opt: Optimizer,
    pub state: State,
    pub ema: Option<Ema>,
}

/// Seeded weights on every rank; rank 0 loads what the run starts from (`--resume`'s checkpoint
/// or `model.pretrained`) and broadcasts it. Collectives.
pub(crate) fn restore(dist: &Dist, s: &Settings, env: &Env, resume: bool) -> Result<Start> {
    let (cfg, tc) = (&s.config, &s.config.train);
    let k = env.shard.classes.len();
    tch::manual_seed(cfg.dataset.seed as i64);
    let model = Model::new(cfg.model.name, k as i64, env.device, cfg.model.feature_extract);
    let mut opt =
        Optimizer::new(tc.optimizer, tc.base_lr(dist.size()), Hyper::from_config(tc), model.numel, env.device);
    let mut state = State {
        epoch: 0,
        arch: cfg.model.name,
        num_classes: k,
        steps: 0,
        world_size: dist.size(),
        best_epoch: None,
        best_top1: None,
        classes: env.shard.classes.clone(),
        history: Vec::new(),
        config: cfg.clone(),
    };
    let mut resumed_from = None;
    let mut header = Vec::new();
    if dist.is_root() {
        if resume {
            let (loaded, from) = persist::load_for_resume(&env.store, &model, &mut opt, &state)?;
            log_world_change(&loaded, dist.size(), tc.batch_size);
            state = loaded;
            resumed_from = Some(from);
        } else if let Some(p) = s.pretrained() {
            persist::load_pretrained(p, &model, cfg.model.name)?;
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
    if env.numerics.channels_last {
        // Weights in the batches' layout (checkpoints stay contiguous); the optimizer's state follows.
        crate::precision::weights_channels_last(model.params.iter().map(|(_, t)| t))?;
        opt.adopt_layout(&model.params);
    }
    // The moving average starts as the weights, or as the resumed run's average.
    let ema = (tc.ema_decay > 0.0).then(|| Ema::new(&model, tc.ema_decay));
    if let Some(e) = &ema {
        if let Some(from) = &resumed_from {
            persist::load_ema(from, e)?;
        }
        broadcast_tensors(dist, &e.all());
    }
    Ok(Start { model, opt, state, ema })
}

/// A resumed run on another number of ranks: what changes and what carries over.
fn log_world_change(loaded: &State, ranks: usize, batch: usize) {
    if loaded.world_size != ranks {
        info!(
            "the checkpoint was written by {} rank(s), this run has {ranks}: the global batch changes from {} to {} \
             images per step (batch {batch} per rank) and the epochs' data order differs from the first run's; \
             weights, optimizer state, step count and history carry over",
            loaded.world_size,
            loaded.world_size * batch,
            ranks * batch,
        );
    }
}

/// The training and test loaders of this rank and the decode cache's budget they share.
pub(crate) struct Loaders {
    pub train: Loader,
    pub test: Loader,
    /// Bytes per rank for decoded images (`train.cache`): 0 off, `u64::MAX` unbounded.
    pub budget: u64,
    /// Threads that decode each batch.
    pub decoders: usize,
}

/// The loaders; the decode cache's budget is shared by the train and test shards in proportion to
/// their size. Every rank reads the memory at its own moment: the node's ranks take the smallest
/// reading (the smallest of all ranks: nodes of one job are alike), so the budgets agree. A
/// collective.
pub(crate) fn loaders(dist: &Dist, s: &Settings, env: &Env) -> Loaders {
    let (cfg, tc, shard) = (&s.config, &s.config.train, &env.shard);
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
    let augment = Augment::new(&cfg.augment, cfg.dataset.seed);
    // Random crops are cut from whole images (short side `cache_size`), or from the input-size ones.
    let crop_source = (cfg.augment.random_resized_crop && cfg.image.cache_size > 0).then_some(cfg.image.cache_size);
    let loader = |rows: &[Row], crop_source| {
        Loader::new(
            ImageStore::new(s.data_dir(), geometry, crop_source, rows.len(), share(rows.len())),
            geometry,
            tc.on_bad_image,
            dist.rank(),
            tc.prefetch,
        )
    };
    let (mut train, mut test) = (loader(&shard.train, crop_source), loader(&shard.test, None));
    let decoders = loader_threads(tc.loader_threads, env.device, dist.cores_per_rank());
    (train.threads, test.threads) = (decoders, decoders);
    if decoders > 1 || env.device.is_cuda() {
        info!(
            "{decoders} thread(s) per rank decode each batch (train.loader_threads){}",
            if env.device.is_cuda() { "; batches reach the GPU from page-locked memory without a wait" } else { "" }
        );
    }
    if let Some(a) = &augment {
        info!("{}", a.describe(crop_source.unwrap_or(0)));
    }
    train.augment = augment;
    Loaders { train, test, budget, decoders }
}

/// The step's machinery: optimizer, learning-rate schedule, gradient exchange (its buckets in the
/// order backward completes the gradients), moving average and mixup. Collectives.
pub(crate) fn stepper<'a>(
    dist: &'a Dist,
    s: &'a Settings,
    env: &'a Env,
    model: &'a Model,
    opt: Optimizer,
    ema: Option<Ema>,
    steps: usize,
) -> Result<Stepper<'a>> {
    let (cfg, tc, device) = (&s.config, &s.config.train, env.device);
    let schedule = Schedule::new(tc, dist.size(), steps);
    info!(
        "{}; {}; {steps} steps per epoch of a global batch of {}",
        stepper_text(tc),
        schedule.describe(),
        tc.batch_size * dist.size()
    );
    // On the CPU the buckets start during backward; a GPU's exchange follows backward, and its
    // autograd would run the hooks that find the order on its device threads.
    let order = if dist.size() > 1 && !device.is_cuda() {
        Some(exchange::model_backward_order(dist, model, cfg.image.height, cfg.image.width, device)?)
    } else {
        None
    };
    let mut stepper =
        Stepper::new(dist, model, opt, schedule, tc, device, env.numerics.clone(), &env.stop, &env.dir, order)?;
    if dist.size() > 1 {
        log_exchange(dist, device, &stepper);
    }
    stepper.ema = ema;
    stepper.mix = mix::Mix::new(&cfg.augment, env.shard.classes.len());
    if let Some(m) = &stepper.mix {
        info!("{}", m.describe());
    }
    Ok(stepper)
}

/// The exchange's buckets, the gradients' way off a GPU, and `train.overlap = "auto"`'s trial.
fn log_exchange(dist: &Dist, device: Device, stepper: &Stepper) {
    let sync = &stepper.sync;
    let way = match (sync.overlaps(), sync.threaded(), device.is_cuda()) {
        (true, true, _) => exchange::Way::DuringBackwardByThread,
        (true, false, _) => exchange::Way::DuringBackwardByHooks,
        (false, _, true) => exchange::Way::AfterBackwardFromGpu,
        (false, _, false) => exchange::Way::AfterBackward,
    };
    info!(
        "{}{}",
        exchange::describe_buckets(&sync.buckets(), way),
        if sync.bf16() {
            "; gradients sent as bfloat16, summed in f32 pair by pair (train.exchange = \"bf16\")"
        } else {
            ""
        }
    );
    if device.is_cuda() {
        info!(
            "gradients leave the GPU for the sums ({}): sac hands MPI host memory only",
            match dist.cuda_aware() {
                Some(true) => "the MPI library says it is CUDA-aware",
                Some(false) => "the MPI library says it is not CUDA-aware",
                None => "the MPI library does not say whether it is CUDA-aware",
            }
        );
    }
    if sync.auto() {
        info!(
            "train.overlap = \"auto\": steps {}-{} take turns with and without overlap; rank 0 keeps the faster way \
             for the rest of the run",
            auto_overlap::TRIAL_STEPS.start + 1,
            auto_overlap::TRIAL_STEPS.end
        );
    }
}

/// Per-image weights of `train.sampler` (None: each epoch a permutation), with the log line of
/// what they draw.
pub(crate) fn sampling_weights(s: &Settings, shard: &Shard) -> Option<Vec<f64>> {
    let tc = &s.config.train;
    let weights = shard::sampling_weights(tc.sampler, &shard.train, &shard.class_counts);
    if weights.is_some() {
        let ((lo, lo_draws), (hi, hi_draws)) = shard::expected_draws(tc.sampler, &shard.class_counts);
        info!(
            "sampler {}: each epoch draws {} images with replacement; expected draws of the rarest class \
             ({lo} images) {lo_draws:.1}, of the commonest ({hi} images) {hi_draws:.1}",
            tc.sampler.name(),
            shard.total_train
        );
    }
    weights
}

/// Threads that decode each batch: `configured`, or by default the rank's share of the node's
/// cores on a GPU (the GPU computes, the cores decode) and one on the CPU (torch's threads take
/// the cores there, and the loader thread decodes the next batch while they compute).
pub fn loader_threads(configured: usize, device: tch::Device, cores_per_rank: usize) -> usize {
    match configured {
        0 if device.is_cuda() => cores_per_rank.max(1),
        0 => 1,
        n => n,
    }
}

/// "cpu", "cuda:0": a device as PyTorch writes it.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
        tch::Device::Cpu => "cpu".into(),
    }
}

/// The precision and layout of this rank's arithmetic (`key` names the config key), the same on
/// every rank: ranks whose hardware differs (a node without native bfloat16 under "auto") end the
/// job with a message rather than train in two formats. A collective.
pub fn agreed_numerics(
    dist: &Dist,
    key: &str,
    precision: crate::precision::Precision,
    channels_last: crate::precision::ChannelsLast,
    on: Workload,
) -> Result<crate::precision::Numerics> {
    let support = || crate::precision::device_bf16(on.device);
    let n = crate::precision::resolve(key, precision, channels_last, on, support);
    let mine = f64::from(u8::from(n.bf16));
    let (least, most) = (dist.min_f64(mine), -dist.min_f64(-mine));
    if least != most {
        bail!(
            "{key} = \"auto\" resolved differently on the ranks (rank {}: {}); set {key} to \"f32\" or \"bf16\" \
             for a job whose nodes differ",
            dist.rank(),
            n.reason
        );
    }
    Ok(n)
}

/// The optimizer and its settings, for the log: `sgd (momentum 0.9, nesterov, weight decay 1e-4,
/// 0 for batch norm and biases)`.
fn stepper_text(tc: &TrainCfg) -> String {
    let mut parts = Vec::new();
    if tc.optimizer == OptimizerKind::Sgd {
        parts.push(if tc.momentum > 0.0 { format!("momentum {}", tc.momentum) } else { "no momentum".into() });
        if tc.nesterov {
            parts.push("nesterov".into());
        }
    }
    if tc.weight_decay > 0.0 || tc.norm_decay() > 0.0 {
        parts.push(format!("weight decay {}", tc.weight_decay));
        if tc.norm_decay() != tc.weight_decay {
            parts.push(format!("{} for batch norm and biases", tc.norm_decay()));
        }
    }
    if tc.label_smoothing > 0.0 {
        parts.push(format!("label smoothing {}", tc.label_smoothing));
    }
    if tc.clip_grad_norm > 0.0 {
        parts.push(format!("gradient norm clipped at {}", tc.clip_grad_norm));
    }
    let name = tc.optimizer.name();
    if parts.is_empty() {
        format!("optimizer {name}")
    } else {
        format!("optimizer {name} ({})", parts.join(", "))
    }
}
