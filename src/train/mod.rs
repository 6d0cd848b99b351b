//! `sac train`: data-parallel training over the MPI ranks.
//!
//! Rank 0 reads the CSVs and scatters each rank its shard; rank 0's initial parameters are
//! broadcast; every step, each rank computes gradients on its local batch, all gradients go into
//! one flat buffer that is summed with one allreduce per large bucket, and every rank applies the
//! same optimizer step. Every rank runs the same number of steps; a rank whose shard is exhausted
//! contributes a zero-weight gradient, and the buffer carries each rank's batch size so the
//! average is over images, exactly as one process on the concatenated batch.
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use tracing::{info, warn};

use crate::checkpoint;
use crate::config::{OptimizerKind, Settings, TrainCfg};
use crate::data::{self, Geometry, ImageStore, Row};
use crate::dist::Dist;
use crate::record::{EpochRecord, State};
use augment::Augment;
use ema::Ema;
pub use epoch::Interrupted;
use epoch::{EpochSteps, Stepper};
use exchange::{average_tensors, broadcast_tensors};
use loader::Loader;
use model::Model;
use optim::{Hyper, Optimizer};
use progress::Reporter;
use schedule::Schedule;
use shard::{batch_bounds, distribute, epoch_order, steps_per_epoch, weighted_order};

pub mod augment;
pub mod auto_overlap;
pub mod ema;
pub mod epoch;
pub mod exchange;
pub mod hooks;
pub mod loader;
pub mod metrics;
pub mod mix;
pub mod model;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod shard;
pub mod state;
pub mod trivial;
pub mod validate;

/// The subcommand.
pub fn run(dist: &Dist, s: &Settings, resume: bool, overwrite: bool) -> Result<()> {
    let cfg = &s.config;
    let tc = &cfg.train;
    let threads = crate::process::set_threads(tc.threads, dist.cores_per_rank());
    dist.log_placement(threads);
    let device = crate::process::pick_device("train.device", tc.device, dist.local_rank())?;
    let numerics = agreed_numerics(dist, "train.precision", tc.precision, tc.channels_last, device)?;
    let stop = crate::process::stop_on_signals()?;
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
        "{arch}, {k} classes, {} training images over {} rank(s), batch {} per rank, {threads} torch thread(s) per rank, {}; {}",
        shard.total_train,
        dist.size(),
        tc.batch_size,
        device_name(device),
        numerics.reason
    );

    tch::manual_seed(cfg.dataset.seed as i64);
    let model = Model::new(arch, k as i64, device, cfg.model.feature_extract);
    let mut opt = Optimizer::new(tc.optimizer, tc.base_lr(dist.size()), Hyper::from_config(tc), model.numel, device);
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
    let mut resumed_from = None;
    if dist.is_root() {
        if resume {
            let (loaded, from) = state::load_for_resume(&store, &model, &mut opt, &state)?;
            state = loaded;
            resumed_from = Some(from);
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
            state::load_pretrained(p, &model, arch)?;
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
    // The moving average starts as the weights, or as the resumed run's average.
    let ema = (tc.ema_decay > 0.0).then(|| Ema::new(&model, tc.ema_decay));
    if let Some(e) = &ema {
        if let Some(from) = &resumed_from {
            state::load_ema(from, e)?;
        }
        broadcast_tensors(dist, &e.all());
    }

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
    let (mut train_loader, mut test_loader) = (loader(&shard.train, crop_source), loader(&shard.test, None));
    let decoders = loader_threads(tc.loader_threads, device, dist.cores_per_rank());
    (train_loader.threads, test_loader.threads) = (decoders, decoders);
    if decoders > 1 || device.is_cuda() {
        info!(
            "{decoders} thread(s) per rank decode each batch (train.loader_threads){}",
            if device.is_cuda() { "; batches reach the GPU from page-locked memory without a wait" } else { "" }
        );
    }
    if let Some(a) = &augment {
        info!("{}", a.describe(crop_source.unwrap_or(0)));
    }
    train_loader.augment = augment;
    let steps = steps_per_epoch(shard.total_train, dist.size(), tc.batch_size);
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
    let schedule = Schedule::new(tc, dist.size(), steps);
    info!(
        "{}; {}; {steps} steps per epoch of a global batch of {}",
        stepper_text(tc),
        schedule.describe(),
        tc.batch_size * dist.size()
    );
    // The exchange's buckets follow the order in which backward completes the gradients (on the
    // CPU, where they start during backward; a GPU's exchange follows backward, and its autograd
    // would run the hooks that find the order on its device threads).
    let order = if dist.size() > 1 && !device.is_cuda() {
        Some(exchange::model_backward_order(dist, &model, cfg.image.height, cfg.image.width, device)?)
    } else {
        None
    };
    let mut stepper = Stepper::new(dist, &model, opt, schedule, tc, device, numerics.clone(), &stop, &dir, order)?;
    if dist.size() > 1 {
        info!(
            "{}{}",
            exchange::describe_buckets(
                &stepper.sync.buckets(),
                stepper.sync.overlaps(),
                stepper.sync.threaded(),
                device.is_cuda()
            ),
            if stepper.sync.bf16() {
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
        if stepper.sync.auto() {
            info!(
                "train.overlap = \"auto\": steps {}-{} take turns with and without overlap; rank 0 keeps the faster \
                 way for the rest of the run",
                auto_overlap::TRIAL_STEPS.start + 1,
                auto_overlap::TRIAL_STEPS.end
            );
        }
    }
    stepper.ema = ema;
    stepper.mix = mix::Mix::new(&cfg.augment, k);
    if let Some(m) = &stepper.mix {
        info!("{}", m.describe());
    }
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
    let first_epoch = state.epoch + 1;
    // The timeline's window: the last `timeline.steps` steps of the first epoch, its validation
    // and its checkpoint.
    let timeline = cfg.timeline.path().map(|p| (p.to_path_buf(), steps.saturating_sub(cfg.timeline.steps)));
    for epoch in first_epoch..=tc.epochs {
        let t_epoch = Instant::now();
        let traced = timeline.as_ref().filter(|_| epoch == first_epoch);
        tch::manual_seed((cfg.dataset.seed as i64) ^ (i64::from(epoch) << 20) ^ (dist.rank() as i64) << 40);
        let order = match &weights {
            Some(w) => weighted_order(w, cfg.dataset.seed, epoch, dist.rank()),
            None => epoch_order(shard.train.len(), cfg.dataset.seed, epoch, dist.rank()),
        };
        let bounds = batch_bounds(order.len(), tc.batch_size);
        let batches: Vec<&[usize]> =
            (0..steps).map(|step| bounds.get(step).map_or(&[][..], |r| &order[r.clone()])).collect();
        let traced_from = traced.map(|(_, from)| *from);
        train_loader.set_epoch(epoch);
        let done = stepper.run_epoch(
            epoch,
            &mut train_loader,
            &shard.train,
            &batches,
            &mut state,
            reporter.as_mut(),
            traced_from,
        )?;
        let EpochSteps {
            loss_sum,
            seen,
            skipped,
            nonfinite_steps,
            clipped_steps,
            early_buckets,
            overlapped_steps,
            times,
        } = done;
        let train_seconds = t_epoch.elapsed().as_secs_f64();
        let train_loss = dist.sum_f64(loss_sum) / seen.max(1.0);
        let skipped_all = dist.sum_f64(skipped as f64) as u64;
        let images_per_second = seen / train_seconds;

        average_tensors(dist, &stepper.buffers);
        if let Some(e) = &stepper.ema {
            average_tensors(dist, &e.buffers(&model));
        }
        let t_val = Instant::now();
        // Validation of the weights, then of their moving average with the model's code on its
        // values; the timeline records the first `timeline.steps` batches of the first.
        let mut validate = |traced_batches| {
            validate::validate(
                dist,
                &model,
                &shard.test,
                &mut test_loader,
                tc.batch_size,
                device,
                &numerics,
                &stop,
                traced_batches,
                tc.log_interval(),
            )
        };
        let (val_loss, top1, top5) = if tc.validate {
            match validate(if traced.is_some() { cfg.timeline.steps } else { 0 })? {
                Some(v) => (Some(v.0), Some(v.1), Some(v.2)),
                None => {
                    warn!("validation of epoch {epoch} cut short by a stop signal; the epoch is saved without it");
                    (None, None, None)
                }
            }
        } else {
            (None, None, None)
        };
        let ema_top1 = match (&stepper.ema, top1) {
            (Some(e), Some(_)) => {
                e.swap(&model);
                let v = validate(0);
                e.swap(&model);
                v?.map(|v| v.1)
            }
            _ => None,
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
            lr: Some(stepper.opt.lr),
            ema_top1,
            precision: Some(numerics.name().to_owned()),
            device: Some(device_name(device)),
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
        if let Some(t) = ema_top1 {
            info!("epoch {epoch}/{}: the moving average of the weights: top-1 {}", tc.epochs, pct(Some(t)));
        }
        let data_share = times.shares().data;
        if device.is_cuda() && data_share >= GPU_DATA_WARN {
            warn!(
                "epoch {epoch}: the GPU waited for data {:.0} % of the steps' time: {decoders} decode thread(s) per rank \
                 do not keep up; raise train.loader_threads, keep decoded images (train.cache) or use fewer ranks per GPU",
                100.0 * data_share
            );
        }
        if epoch == first_epoch {
            log_cache(dist, budget, &[&train_loader, &test_loader], shard.total_train + shard.total_test);
            if stepper.sync.overlaps() && overlapped_steps > 0 {
                let some = if (overlapped_steps as usize) < steps {
                    format!(
                        "; counted over the {overlapped_steps} of {steps} steps that overlapped under train.overlap = \"auto\""
                    )
                } else {
                    String::new()
                };
                info!(
                    "epoch {epoch}: rank 0 started {:.1} of its {} gradient buckets per step during backward (the \
                     rest after it: the exposed exchange is the allreduce share above{some})",
                    early_buckets as f64 / overlapped_steps as f64,
                    stepper.sync.buckets().len()
                );
            }
        }
        if skipped_all > 0 {
            warn!("{skipped_all} image(s) could not be decoded and were skipped this epoch");
        }
        if tc.clip_grad_norm > 0.0 {
            info!(
                "epoch {epoch}: the gradient norm was clipped to {} in {clipped_steps} of {steps} steps",
                tc.clip_grad_norm
            );
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
            state::save(
                &store,
                &model,
                &stepper.opt,
                &state,
                improved,
                first_save && overwrite,
                metrics_file.as_deref(),
                stepper.ema.as_ref(),
            )?;
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

/// The share of a GPU's step time spent waiting for batches above which the log says so.
const GPU_DATA_WARN: f64 = 0.1;

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
    device: tch::Device,
) -> Result<crate::precision::Numerics> {
    let n = crate::precision::resolve(key, precision, channels_last, device, || crate::precision::device_bf16(device));
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
    let name = format!("{:?}", tc.optimizer).to_lowercase();
    if parts.is_empty() {
        format!("optimizer {name}")
    } else {
        format!("optimizer {name} ({})", parts.join(", "))
    }
}

/// The end of a command on every rank: rank 0 logs each rank's peak memory and CPU time (a
/// collective: call it where every rank arrives together).
pub fn log_done(dist: &Dist, what: &str) {
    let (rss, cpu) = crate::process::resource_usage();
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
