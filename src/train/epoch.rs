//! One epoch's training steps, every rank in lockstep: load a batch, forward and backward on
//! it, exchange the gradients (with the stop, non-finite and loss numbers every rank needs), and
//! the optimizer step.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Tensor};
use tracing::{info, warn};

use super::ema::Ema;
use super::exchange::{buffers_finite, copy_tensors, GradSync, StepInfo, Synced};
use super::loader::{with_batches, Batch, Loader};
use super::mix::Mix;
use super::model::Model;
use super::optim::Optimizer;
use super::progress::{Reporter, Times};
use super::schedule::Schedule;
use crate::config::{OnNonFinite, Overlap, TrainCfg};
use crate::data::Row;
use crate::infra::dist::Dist;
use crate::precision::Numerics;
use crate::record::State;

/// All ranks stopped together at a step boundary after SIGTERM / SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("training stopped by a signal; the last complete checkpoint is intact")]
pub struct Interrupted;

/// What one epoch's steps leave on this rank.
#[derive(Default)]
pub(crate) struct EpochSteps {
    /// This rank's summed training loss (mean × images) and all ranks' images.
    pub loss_sum: f64,
    pub seen: f64,
    /// This rank's images that could not be decoded.
    pub skipped: u64,
    /// Steps left out for a non-finite loss or gradient.
    pub nonfinite_steps: u64,
    /// Steps whose gradient norm was clipped (`train.clip_grad_norm`).
    pub clipped_steps: u64,
    /// Gradient buckets this rank started during backward, summed over the steps (`train.overlap`).
    pub early_buckets: u64,
    /// Steps whose buckets could start during backward (all with overlap, some with "auto").
    pub overlapped_steps: u64,
    /// Where this rank's time went.
    pub times: Times,
}

/// What every step uses: the model, its optimizer and gradient exchange, and the settings.
pub(crate) struct Stepper<'a> {
    pub dist: &'a Dist,
    pub model: &'a Model,
    pub opt: Optimizer,
    /// Sets `opt.lr` before every step.
    pub schedule: Schedule,
    /// The moving average of the weights, updated after every step (`train.ema_decay`).
    pub ema: Option<Ema>,
    /// Mixup / CutMix of every batch (`augment.mixup_alpha`, `cutmix_alpha`).
    pub mix: Option<Mix>,
    pub sync: GradSync,
    pub tc: &'a TrainCfg,
    pub device: Device,
    /// Autocast and memory format of forward (`train.precision`, `train.channels_last`).
    pub numerics: Numerics,
    pub stop: &'a AtomicBool,
    /// The checkpoint directory (named when a signal stops the run).
    pub dir: &'a Path,
    /// The batch-norm statistics, and their values before the step (put back when a step is
    /// left out).
    pub buffers: Vec<Tensor>,
    saved_buffers: Vec<Tensor>,
}

impl<'a> Stepper<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dist: &'a Dist,
        model: &'a Model,
        opt: Optimizer,
        schedule: Schedule,
        tc: &'a TrainCfg,
        device: Device,
        numerics: Numerics,
        stop: &'a AtomicBool,
        dir: &'a Path,
        order: Option<Vec<usize>>,
    ) -> Result<Self> {
        let params: Vec<Tensor> = model.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut opt = opt;
        if device.is_cuda() {
            // A GPU steps all parameters in a few whole-buffer operations (the CPU has its fused kernel).
            opt.bind_flat(&model.params);
        }
        let mut sync = GradSync::new(dist, &params, order, tc.overlap.hooks() && dist.size() > 1, tc.exchange)?;
        if tc.overlap == Overlap::Auto {
            sync.auto_overlap(dist);
        }
        let buffers: Vec<Tensor> = model.buffers.iter().map(|(_, t)| t.shallow_clone()).collect();
        let saved_buffers = buffers.iter().map(|t| t.detach().copy()).collect();
        Ok(Stepper {
            dist,
            model,
            opt,
            schedule,
            ema: None,
            mix: None,
            sync,
            tc,
            device,
            numerics,
            stop,
            dir,
            buffers,
            saved_buffers,
        })
    }

    /// Runs the steps of `epoch`: one per entry of `batches` (indices into `rows`; empty when this
    /// rank has no batch for that step). `state.steps` counts the steps taken; the timeline records
    /// from step `traced_from` on. Returns `Interrupted` when a rank asked to stop.
    #[allow(clippy::too_many_arguments)]
    pub fn run_epoch(
        &mut self,
        epoch: u32,
        loader: &mut Loader,
        rows: &[Row],
        batches: &[&[usize]],
        state: &mut State,
        mut reporter: Option<&mut Reporter>,
        traced_from: Option<usize>,
    ) -> Result<EpochSteps> {
        let steps = batches.len();
        let t_epoch = Instant::now();
        let pb = crate::infra::logging::progress_bar(
            steps as u64,
            &format!("epoch {epoch}/{}", self.tc.epochs),
            self.dist.is_root() && !crate::infra::logging::progress_as_lines(),
        );
        if let Some(r) = reporter.as_deref_mut() {
            r.start_epoch(epoch, steps);
        }
        let mut done = EpochSteps::default();
        with_batches(loader, rows, batches, self.device, |next_batch| {
            for step in 0..steps {
                crate::infra::fault::point("step");
                let at = At { epoch, step, steps };
                let t = u64::from(epoch - 1) * steps as u64 + step as u64;
                self.opt.lr = self.schedule.lr(t);
                let lr = self.opt.lr;
                if traced_from == Some(step) {
                    crate::infra::timeline::set_recording(true);
                }
                let (outcome, times) = self.step(&at, t, next_batch, &mut done)?;
                done.times.add(&times);
                match outcome {
                    Outcome::Stop => {
                        pb.abandon();
                        stopping(epoch, step, steps, state, self.dir);
                        return Err(Interrupted.into());
                    }
                    Outcome::LeftOut => {
                        if let Some(r) = reporter.as_deref_mut() {
                            r.step(0.0, 0.0, &times, state.steps, lr);
                        }
                    }
                    Outcome::Taken { images, loss_sum, mine } => {
                        state.steps += 1;
                        done.loss_sum += mine.loss * mine.images as f64;
                        done.seen += images;
                        if let Some(r) = reporter.as_deref_mut() {
                            r.step(images, loss_sum, &times, state.steps, lr);
                        }
                        let rate = done.seen / t_epoch.elapsed().as_secs_f64();
                        pb.set_message(format!("loss {:.3}, {rate:.0} img/s", mine.loss));
                    }
                }
                pb.inc(1);
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        if let Some(r) = reporter {
            r.end_steps(state.steps, self.opt.lr);
        }
        Ok(done)
    }

    /// One step (`t` counts the run's steps): load the batch, forward and backward inside the
    /// exchange, then the optimizer step unless the ranks stop or leave the step out.
    fn step(
        &mut self,
        at: &At,
        t: u64,
        next_batch: &mut dyn FnMut() -> Result<Batch>,
        done: &mut EpochSteps,
    ) -> Result<(Outcome, Times)> {
        let mark = Some(at.step as u64 + 1);
        let t0 = Instant::now();
        let (batch, skipped) = next_batch()?;
        done.skipped += skipped;
        let t1 = crate::infra::timeline::since("data", "load batch", t0, mark);
        let mut times = Times { data: t1 - t0, ..Times::default() };
        let (synced, mine, t2) = self.forward_backward(batch, t1, mark)?;
        times.compute = t2 - t1;
        times.wait = synced.wait;
        done.overlapped_steps += u64::from(synced.overlapped);
        if let Some(line) = &synced.chose {
            info!("{line}");
        }
        done.early_buckets += synced.early as u64;
        if synced.stop {
            return Ok((Outcome::Stop, times));
        }
        if synced.images == 0.0 {
            bail!("step {} of epoch {}: no rank had a decodable image", at.step, at.epoch);
        }
        if synced.non_finite {
            self.leave_out(at, mine.bad)?;
            done.nonfinite_steps += 1;
            times.comm = crate::infra::timeline::since("exchange", "allreduce", t2, mark) - t2;
            return Ok((Outcome::LeftOut, times));
        }
        let g = synced.grad.to_device(self.device);
        let t3 = crate::infra::timeline::since("exchange", "allreduce", t2, mark);
        times.comm = t3 - t2;
        let mut scale = synced.scale;
        if self.tc.clip_grad_norm > 0.0 {
            let (clipped, factor) = clip_factor(&synced.grad, scale, self.tc.clip_grad_norm);
            done.clipped_steps += u64::from(clipped);
            scale *= factor;
        }
        self.opt.apply(&g, scale, &self.model.params);
        if let Some(ema) = self.ema.as_mut() {
            ema.update(self.model, self.schedule.in_warmup(t));
        }
        times.optim = crate::infra::timeline::since("optimizer", "optimizer step", t3, mark) - t3;
        Ok((Outcome::Taken { images: f64::from(synced.images), loss_sum: synced.loss, mine }, times))
    }

    /// Forward and backward on this rank's batch (None: it adds nothing but its stop flag) inside
    /// the step's exchange: the ranks' sums, what this rank put in, and when backward ended.
    fn forward_backward(
        &mut self,
        batch: Option<(Tensor, Tensor)>,
        t1: Instant,
        mark: Option<u64>,
    ) -> Result<(Synced, Local, Instant)> {
        let stop = self.stop.load(Ordering::Relaxed);
        let Some((x, y)) = batch else {
            let t2 = crate::infra::timeline::since("compute", "forward + backward", t1, mark);
            let synced = self.sync.step(self.dist, StepInfo { stop, ..StepInfo::default() }, || {});
            return Ok((synced, Local::default(), t2));
        };
        if self.tc.on_nonfinite == OnNonFinite::Skip {
            copy_tensors(&self.saved_buffers, &self.buffers);
        }
        let (x, soft) = match &self.mix {
            Some(m) => {
                let (x, t) = m.apply(&x, &y);
                (x, Some(t))
            }
            None => (x, None),
        };
        let logits = self.numerics.forward(self.model.net.as_ref(), &x, true)?;
        let mut loss = training_loss(&logits, soft.as_ref().unwrap_or(&y), self.tc.label_smoothing);
        if crate::infra::fault::poison("loss") {
            loss *= f64::NAN;
        }
        let images = y.size()[0] as usize;
        let mean = loss.double_value(&[]);
        // Forward has updated the batch-norm statistics: what every rank must learn of this step
        // is known before backward, whose hooks may start the exchange.
        let bad = !mean.is_finite() || !buffers_finite(&self.buffers);
        self.sync.zero_grads();
        let (device, mut t2) = (self.device, t1);
        let info = StepInfo { images, loss: mean * images as f64, stop, bad };
        let synced = self.sync.step(self.dist, info, || {
            // The summed loss: GradSync weights each rank by its image count.
            (&loss * images as f64).backward();
            if let Device::Cuda(i) = device {
                // Backward's kernels end here, not in the exchange that waits for them.
                tch::Cuda::synchronize(i as i64);
            }
            t2 = crate::infra::timeline::since("compute", "forward + backward", t1, mark);
        });
        Ok((synced, Local { images, loss: mean, bad }, t2))
    }

    /// A step whose loss or gradient is not finite on some rank: the run fails
    /// (`train.on_nonfinite = "fail"`), or the step is left out and the batch-norm statistics are
    /// put back.
    fn leave_out(&mut self, at: &At, bad: bool) -> Result<()> {
        let (epoch, step, steps) = (at.epoch, at.step, at.steps);
        let what = if bad { "this rank's loss or batch-norm statistics" } else { "another rank's step" };
        match self.tc.on_nonfinite {
            OnNonFinite::Fail => bail!(
                "epoch {epoch}, step {}/{steps}: the loss or gradient is not finite (NaN or infinite; {what}); \
                 training stops and nothing of this epoch is saved. Lower train.lr, look for bad images, or set \
                 train.on_nonfinite = \"skip\" to leave such steps out",
                step + 1
            ),
            OnNonFinite::Skip => {
                copy_tensors(&self.buffers, &self.saved_buffers);
                warn!(
                    "epoch {epoch}, step {}/{steps}: non-finite loss or gradient ({what}); step left out \
                     (train.on_nonfinite = \"skip\")",
                    step + 1
                );
                Ok(())
            }
        }
    }
}

/// Where a step is: its epoch, its index and the epoch's steps.
struct At {
    epoch: u32,
    step: usize,
    steps: usize,
}

/// What this rank put into a step: its images and their mean loss, and whether its loss or
/// batch-norm statistics were not finite.
#[derive(Default)]
struct Local {
    images: usize,
    loss: f64,
    bad: bool,
}

/// What a step came to.
enum Outcome {
    /// The optimizer stepped: all ranks' images and summed loss, and this rank's part.
    Taken { images: f64, loss_sum: f64, mine: Local },
    /// Left out for a non-finite loss or gradient (`train.on_nonfinite = "skip"`).
    LeftOut,
    /// Some rank asked to stop.
    Stop,
}

/// The mean cross-entropy of a batch against `target`: class labels, or class probabilities
/// (mixup / CutMix), smoothed by `smoothing` as torch's `cross_entropy(label_smoothing=…)` does
/// (the true class gets 1 − smoothing + smoothing / K, every class smoothing / K).
pub(crate) fn training_loss(logits: &Tensor, target: &Tensor, smoothing: f64) -> Tensor {
    if smoothing == 0.0 && target.kind() == tch::Kind::Int64 {
        logits.cross_entropy_for_logits(target)
    } else {
        logits.cross_entropy_loss::<Tensor>(target, None, tch::Reduction::Mean, -100, smoothing)
    }
}

/// Whether the averaged gradient (`sum` × `scale`) is longer than `max_norm`, and the factor that
/// brings it to `max_norm` (1 if not), as `torch.nn.utils.clip_grad_norm_`: max_norm / (norm +
/// 1e-6), at most 1. The norm is of the global gradient, the same on every rank.
pub(crate) fn clip_factor(sum: &Tensor, scale: f32, max_norm: f64) -> (bool, f32) {
    let norm = sum.norm().double_value(&[]) * f64::from(scale);
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        (true, factor as f32)
    } else {
        (false, 1.0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Against PyTorch 2.13:
    /// ```python
    /// l = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]); y = torch.tensor([0, 2])
    /// F.cross_entropy(l, y, label_smoothing=0.1)  # 1.71420156955719 (1.7558681964874268 without)
    /// ```
    #[test]
    fn label_smoothing_matches_torch_cross_entropy() {
        let l = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.5, -1.0, 0.0]).view([2, 3]);
        let y = Tensor::from_slice(&[0i64, 2]);
        assert!((training_loss(&l, &y, 0.1).double_value(&[]) - 1.714_201_569_557_19).abs() < 1e-6);
        assert!((training_loss(&l, &y, 0.0).double_value(&[]) - 1.755_868_196_487_426_8).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_the_averaged_gradient_to_the_largest_norm() {
        // A summed gradient (3, 4) over 2 images: the average (1.5, 2) has norm 2.5.
        let sum = Tensor::from_slice(&[3.0f32, 4.0]).to_kind(Kind::Float);
        let (clipped, f) = clip_factor(&sum, 0.5, 1.0);
        assert!(clipped && (f64::from(f) - 1.0 / (2.5 + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_factor(&sum, 0.5, 2.5 + 1e-3), (false, 1.0));
    }
}
