//! `sac train`: data-parallel training over the MPI ranks.
//!
//! Rank 0 reads the CSVs and scatters each rank its shard; rank 0's initial parameters are
//! broadcast; every step, each rank computes gradients on its local batch, all gradients go into
//! one flat buffer that is summed with one allreduce per large bucket, and every rank applies the
//! same optimizer step. Every rank runs the same number of steps; a rank whose shard is exhausted
//! contributes a zero-weight gradient, and the buffer carries each rank's batch size so the
//! average is over images, exactly as one process on the concatenated batch.
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{info, warn};

use crate::config::{Settings, TrainCfg};
use crate::infra::dist::Dist;
use crate::record::{EpochRecord, State};
use ema::Ema;
pub use epoch::Interrupted;
use epoch::{EpochSteps, Stepper};
use exchange::average_tensors;
use loader::Loader;
use model::Model;
use optim::Optimizer;
use progress::Reporter;
use shard::{batch_bounds, epoch_order, steps_per_epoch, weighted_order};

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
pub mod persist;
pub mod progress;
pub mod schedule;
mod setup;
pub mod shard;
pub mod trivial;
pub mod validate;

pub use setup::{agreed_numerics, device_name, loader_threads, Mode};

/// The subcommand: the job's outline. Every step is a collective unless it says otherwise.
pub fn run(dist: &Dist, s: &Settings, mode: Mode) -> Result<()> {
    let mut env = setup::Env::prepare(dist, s, mode)?;
    let setup::Start { model, opt, state, ema } = setup::restore(dist, s, &env, mode.resume)?;
    env.keep_precision_of(&state, s, mode.resume);
    let epochs = s.config.train.epochs;
    if state.epoch >= epochs {
        info!(
            "{} already holds {} epoch(s) of training; nothing to do (raise --epochs to go on)",
            env.dir.display(),
            state.epoch
        );
        return Ok(());
    }
    let mut job = Trainer::new(dist, s, &env, &model, opt, ema, state, mode)?;
    // From here on a failure may be one a restart gets past (exit 1, not 2).
    crate::infra::process::work_under_way();
    let started_from = job.state.epoch;
    note_epochs_saved(dist, started_from, epochs, started_from, false);
    let mut epochs_run = || -> Result<()> {
        for epoch in job.first_epoch..=epochs {
            let trained = job.train_epoch(epoch)?;
            let validated = job.validate(epoch)?;
            let record = job.record(epoch, &trained, &validated);
            job.log_epoch(&record, &trained);
            job.save(record, &trained, &validated)?;
            note_epochs_saved(dist, epoch, epochs, started_from, false);
            if job.agree_to_stop(epoch)? && epoch < epochs {
                warn!(
                    "stopping after epoch {epoch} on a signal; its checkpoint in {} is complete; continue with \
                     `sac train --resume`",
                    env.dir.display()
                );
                return Err(Interrupted.into());
            }
        }
        Ok(())
    };
    if let Err(e) = epochs_run() {
        if e.is::<Interrupted>() {
            // For the job script: every rank stopped at a safe point, whatever exit status the
            // launcher makes of it (Open MPI's says 1 once it was signalled itself).
            note_epochs_saved(dist, job.state.epoch, epochs, started_from, true);
        }
        return Err(e);
    }
    crate::infra::logging::progress_clock(Duration::ZERO);
    log_done(dist, &format!("checkpoints in {}", env.dir.display()));
    Ok(())
}

/// The environment variable that names the file where rank 0 keeps `<epochs saved> <epochs>
/// <epoch this run started from>` (0 for a fresh run), and ` stopped` after them once every rank
/// stopped on a signal at a safe point: written when training begins, after every epoch's
/// checkpoint is complete and at such a stop. jobs/sac-job.sh reads it to tell whether a failed
/// attempt made progress, where a restart resumes, and whether a signalled job stopped cleanly.
pub const EPOCH_FILE_VAR: &str = "SAC_EPOCH_FILE";

/// Writes `saved epochs from` to the file `SAC_EPOCH_FILE` names, if any (rank 0; replaced whole,
/// so a reader never sees half of it). A failure to write it is logged, not fatal.
fn note_epochs_saved(dist: &Dist, saved: u32, epochs: u32, from: u32, stopped: bool) {
    let Some(path) = std::env::var_os(EPOCH_FILE_VAR).filter(|_| dist.is_root()) else { return };
    let path = PathBuf::from(path);
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, format!("{saved} {epochs} {from}{}\n", if stopped { " stopped" } else { "" }))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!("could not write {EPOCH_FILE_VAR} = {}: {e}", path.display());
    }
}

/// A training run from its first epoch on: what the epochs share and change.
struct Trainer<'a> {
    dist: &'a Dist,
    s: &'a Settings,
    tc: &'a TrainCfg,
    env: &'a setup::Env,
    model: &'a Model,
    stepper: Stepper<'a>,
    loaders: setup::Loaders,
    state: State,
    /// Rank 0's progress lines and metrics.jsonl.
    reporter: Option<Reporter>,
    /// Per-image weights of `train.sampler`, or None for a permutation per epoch.
    weights: Option<Vec<f64>>,
    /// Steps per epoch, the same on every rank.
    steps: usize,
    first_epoch: u32,
    /// The timeline's file and the step it starts recording at (in the first epoch).
    timeline: Option<(PathBuf, usize)>,
    /// `--overwrite`: the first save deletes the old run's epochs.
    overwrite: bool,
}

/// One epoch's steps, summed over the ranks where every rank needs the sum.
struct Trained {
    steps: EpochSteps,
    started: Instant,
    /// All ranks' mean training loss, and their images that could not be decoded.
    train_loss: f64,
    skipped: u64,
    images_per_second: f64,
}

/// Validation of the weights (None: off, or cut short by a stop signal) and of their moving average.
struct Validated {
    val_loss: Option<f64>,
    top1: Option<f64>,
    top5: Option<f64>,
    ema_top1: Option<f64>,
    started: Instant,
    ended: Instant,
}

impl<'a> Trainer<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dist: &'a Dist,
        s: &'a Settings,
        env: &'a setup::Env,
        model: &'a Model,
        opt: Optimizer,
        ema: Option<Ema>,
        state: State,
        mode: Mode,
    ) -> Result<Self> {
        let (cfg, tc) = (&s.config, &s.config.train);
        let loaders = setup::loaders(dist, s, env);
        let steps = steps_per_epoch(env.shard.total_train, dist.size(), tc.batch_size);
        // Rank 0 reports progress and keeps metrics.jsonl; a resumed run continues the stream, and
        // one that replaces an old run keeps the old stream until its own first epoch is saved, as
        // the old checkpoint is kept.
        let reporter = if dist.is_root() {
            let replacing = mode.overwrite && env.store.holds_checkpoint();
            let stream = metrics::Stream::open(&env.dir, mode.resume.then_some(state.epoch), replacing)?;
            Some(Reporter::new(stream, tc.log_interval(), tc.epochs))
        } else {
            None
        };
        let stepper = setup::stepper(dist, s, env, model, opt, ema, steps)?;
        let weights = setup::sampling_weights(s, &env.shard);
        // The timeline's window: the last `timeline.steps` steps of the first epoch, its
        // validation and its checkpoint.
        let timeline = cfg.timeline.path().map(|p| (p.to_path_buf(), steps.saturating_sub(cfg.timeline.steps)));
        let first_epoch = state.epoch + 1;
        Ok(Trainer {
            dist,
            s,
            tc,
            env,
            model,
            stepper,
            loaders,
            state,
            reporter,
            weights,
            steps,
            first_epoch,
            timeline,
            overwrite: mode.overwrite,
        })
    }

    /// The timeline's file and first step, in the epoch it records.
    fn traced(&self, epoch: u32) -> Option<&(PathBuf, usize)> {
        self.timeline.as_ref().filter(|_| epoch == self.first_epoch)
    }

    /// The epoch's steps over this rank's order of its shard; then the ranks' sums and their
    /// batch-norm statistics averaged.
    fn train_epoch(&mut self, epoch: u32) -> Result<Trained> {
        let (dist, seed) = (self.dist, self.s.config.dataset.seed);
        let started = Instant::now();
        tch::manual_seed((seed as i64) ^ (i64::from(epoch) << 20) ^ (dist.rank() as i64) << 40);
        let rows = &self.env.shard.train;
        let order = match &self.weights {
            Some(w) => weighted_order(w, seed, epoch, dist.rank()),
            None => epoch_order(rows.len(), seed, epoch, dist.rank()),
        };
        let bounds = batch_bounds(order.len(), self.tc.batch_size);
        let batches: Vec<&[usize]> =
            (0..self.steps).map(|step| bounds.get(step).map_or(&[][..], |r| &order[r.clone()])).collect();
        let traced_from = self.traced(epoch).map(|(_, from)| *from);
        self.loaders.train.set_epoch(epoch);
        let steps = self.stepper.run_epoch(
            epoch,
            &mut self.loaders.train,
            rows,
            &batches,
            &mut self.state,
            self.reporter.as_mut(),
            traced_from,
        )?;
        let seconds = started.elapsed().as_secs_f64();
        let train_loss = dist.sum_f64(steps.loss_sum) / steps.seen.max(1.0);
        let skipped = dist.sum_f64(steps.skipped as f64) as u64;
        let images_per_second = steps.seen / seconds;
        average_tensors(dist, &self.stepper.buffers);
        if let Some(e) = &self.stepper.ema {
            average_tensors(dist, &e.buffers(self.model));
        }
        Ok(Trained { steps, started, train_loss, skipped, images_per_second })
    }

    /// Validation of the weights, then of their moving average with the model's code on its
    /// values; the timeline records the first `timeline.steps` batches of the first.
    fn validate(&mut self, epoch: u32) -> Result<Validated> {
        let started = Instant::now();
        let traced = if self.traced(epoch).is_some() { self.s.config.timeline.steps } else { 0 };
        let (dist, env, model, tc) = (self.dist, self.env, self.model, self.tc);
        let loader = &mut self.loaders.test;
        // One pass over this rank's test shard: (loss, top-1, top-5), None when a signal cut it short.
        let mut once = |traced| {
            let (rows, every) = (&env.shard.test, tc.log_interval());
            let (device, numerics, stop) = (env.device, &env.numerics, &env.stop);
            validate::validate(dist, model, rows, loader, tc.batch_size, device, numerics, stop, traced, every)
        };
        let (mut val_loss, mut top1, mut top5) = (None, None, None);
        if tc.validate {
            match once(traced)? {
                Some(v) => (val_loss, top1, top5) = (Some(v.0), Some(v.1), Some(v.2)),
                None => warn!("validation of epoch {epoch} cut short by a stop signal; the epoch is saved without it"),
            }
        }
        let ema_top1 = match (&self.stepper.ema, top1) {
            (Some(e), Some(_)) => {
                e.swap(model);
                let v = once(0);
                e.swap(model);
                v?.map(|v| v.1)
            }
            _ => None,
        };
        Ok(Validated { val_loss, top1, top5, ema_top1, started, ended: Instant::now() })
    }

    /// The epoch's line in state.json. Not a collective.
    fn record(&self, epoch: u32, t: &Trained, v: &Validated) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: t.train_loss,
            val_loss: v.val_loss,
            top1: v.top1,
            top5: v.top5,
            images_per_second: t.images_per_second,
            seconds: t.started.elapsed().as_secs_f64(),
            skipped_images: t.skipped,
            nonfinite_steps: t.steps.nonfinite_steps,
            lr: Some(self.stepper.opt.lr),
            ema_top1: v.ema_top1,
            precision: Some(self.env.numerics.name().to_owned()),
            device: Some(device_name(self.env.device)),
        }
    }

    /// The epoch's log lines; after the first, what the decode caches hold (a collective) and how
    /// many buckets started during backward.
    fn log_epoch(&self, record: &EpochRecord, t: &Trained) {
        let (tc, epoch, steps) = (self.tc, record.epoch, self.steps);
        let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2} %", 100.0 * v));
        let shares = t.steps.times.shares();
        info!(
            "epoch {epoch}/{}: train loss {:.4}, val loss {}, top-1 {}, top-5 {}, {:.1} img/s, {:.1} s ({})",
            tc.epochs,
            record.train_loss,
            record.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            pct(record.top1),
            pct(record.top5),
            record.images_per_second,
            record.seconds,
            progress::shares_text(&shares)
        );
        if let Some(x) = record.ema_top1 {
            info!("epoch {epoch}/{}: the moving average of the weights: top-1 {}", tc.epochs, pct(Some(x)));
        }
        if self.env.device.is_cuda() && shares.data >= GPU_DATA_WARN {
            warn!(
                "epoch {epoch}: the GPU waited for data {:.0} % of the steps' time: {} decode thread(s) per rank \
                 do not keep up; raise train.loader_threads, keep decoded images (train.cache) or use fewer ranks per GPU",
                100.0 * shares.data,
                self.loaders.decoders
            );
        }
        if epoch == self.first_epoch {
            self.log_first_epoch(&t.steps);
        }
        if t.skipped > 0 {
            warn!("{} image(s) could not be decoded and were skipped this epoch", t.skipped);
        }
        if tc.clip_grad_norm > 0.0 {
            info!(
                "epoch {epoch}: the gradient norm was clipped to {} in {} of {steps} steps",
                tc.clip_grad_norm, t.steps.clipped_steps
            );
        }
        if t.steps.nonfinite_steps > 0 {
            warn!("{} step(s) of epoch {epoch} were left out: non-finite loss or gradient", t.steps.nonfinite_steps);
        }
    }

    /// After the first epoch (every image seen once): the decode caches (a collective) and the
    /// buckets that started during backward.
    fn log_first_epoch(&self, done: &EpochSteps) {
        let (l, shard, steps) = (&self.loaders, &self.env.shard, self.steps);
        log_cache(self.dist, l.budget, &[&l.train, &l.test], shard.total_train + shard.total_test);
        let sync = &self.stepper.sync;
        let overlapped = done.overlapped_steps;
        if sync.overlaps() && overlapped > 0 {
            let some = if (overlapped as usize) < steps {
                format!(
                    "; counted over the {overlapped} of {steps} steps that overlapped under train.overlap = \"auto\""
                )
            } else {
                String::new()
            };
            info!(
                "epoch {}: rank 0 started {:.1} of its {} gradient buckets per step during backward (the rest \
                 after it: the exposed exchange is the allreduce share above{some})",
                self.first_epoch,
                done.early_buckets as f64 / overlapped as f64,
                sync.buckets().len()
            );
        }
    }

    /// The epoch joins the run's state (and is the best so far if its top-1 is); rank 0 writes the
    /// checkpoint and metrics.jsonl's epoch line. Not a collective.
    fn save(&mut self, record: EpochRecord, t: &Trained, v: &Validated) -> Result<()> {
        let (epoch, state) = (record.epoch, &mut self.state);
        // Every epoch of the run is saved, so its first save is its first epoch's.
        let first_save = epoch == self.first_epoch;
        state.epoch = epoch;
        state.history.push(record.clone());
        let improved = v.top1.is_some_and(|t| state.best_top1.is_none_or(|b| t > b));
        if improved {
            state.best_top1 = v.top1;
            state.best_epoch = Some(epoch);
        }
        if let Some(r) = self.reporter.as_mut() {
            r.epoch_done(&record, (v.ended - v.started).as_secs_f64(), t.steps.times.shares(), state.steps);
        }
        if self.traced(epoch).is_some() {
            // Validation stopped recording after its first `timeline.steps` batches.
            crate::infra::timeline::set_recording(true);
            if self.tc.validate {
                crate::infra::timeline::span("validation", "validation", v.started, v.ended, None);
            }
        }
        if self.dist.is_root() {
            let t = Instant::now();
            let metrics_file = self.reporter.as_ref().and_then(Reporter::file).map(Path::to_path_buf);
            persist::save(
                &self.env.store,
                self.model,
                &self.stepper.opt,
                &self.state,
                persist::SaveAs { best: improved, replace_old_run: first_save && self.overwrite },
                metrics_file.as_deref(),
                self.stepper.ema.as_ref(),
            )?;
            crate::infra::timeline::since("checkpoint", "write checkpoint", t, None);
            if let (true, Some(r)) = (first_save, self.reporter.as_mut()) {
                r.publish();
            }
        }
        Ok(())
    }

    /// Nobody starts the next epoch (or exits) before the checkpoint is complete: true when a stop
    /// signal came on some rank (during validation or saving too). The first epoch's timeline is
    /// gathered and written here.
    fn agree_to_stop(&mut self, epoch: u32) -> Result<bool> {
        let t = Instant::now();
        let stop_now = self.dist.any(self.env.stop.load(Ordering::Relaxed));
        crate::infra::timeline::since("exchange", "end of epoch (waits for the checkpoint)", t, None);
        if let Some((path, from)) = self.traced(epoch) {
            let parts = self.dist.gather_bytes(0, crate::infra::timeline::take(self.dist.rank()));
            if let Some(parts) = parts {
                let window = format!(
                    "epoch {epoch}: steps {}-{steps} of {steps}{}, checkpoint",
                    from + 1,
                    if self.tc.validate { ", validation" } else { "" },
                    steps = self.steps
                );
                crate::infra::timeline::write(path, &parts, "train", &window)?;
            }
        }
        Ok(stop_now)
    }
}

/// The share of a GPU's step time spent waiting for batches above which the log says so.
const GPU_DATA_WARN: f64 = 0.1;

/// The end of a command on every rank: rank 0 logs each rank's peak memory and CPU time (a
/// collective: call it where every rank arrives together).
pub fn log_done(dist: &Dist, what: &str) {
    let (rss, cpu) = crate::infra::process::resource_usage();
    tracing::debug!("done: this rank's peak memory {rss:.0} MiB, CPU {cpu:.1} s");
    let mut all = vec![0f64; 2 * dist.size()];
    all[2 * dist.rank()] = rss;
    all[2 * dist.rank() + 1] = cpu;
    dist.allreduce_sum(&mut all, &mut Vec::new());
    if dist.is_root() {
        crate::infra::logging::done(what, &all.chunks(2).map(|p| (p[0], p[1])).collect::<Vec<_>>());
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
        b => format!("{} per rank", crate::infra::logging::bytes(b)),
    };
    if budget == 0 {
        info!("decode cache off (train.cache): every image is decoded every epoch");
    } else {
        info!(
            "decode cache ({budget_text}): this rank holds {} ({} images); all ranks {} of {images} images ({:.1} %) in {}",
            crate::infra::logging::bytes(bytes),
            held,
            sums[1] as u64,
            100.0 * sums[1] / images.max(1) as f64,
            crate::infra::logging::bytes(sums[0] as u64)
        );
    }
}
