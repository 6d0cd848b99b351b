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
use super::exchange::{buffers_finite, copy_tensors, GradSync, StepInfo};
use super::loader::{with_batches, Loader};
use super::mix::Mix;
use super::model::Model;
use super::optim::Optimizer;
use super::progress::{Reporter, Times};
use super::schedule::Schedule;
use crate::config::{OnNonFinite, Overlap, TrainCfg};
use crate::data::Row;
use crate::dist::Dist;
use crate::precision::Numerics;
use crate::record::State;

/// All ranks stopped together at a step boundary after SIGTERM / SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("training stopped by a signal; the last complete checkpoint is intact")]
pub struct Interrupted;

/// What one epoch's steps leave on this rank.
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
        let (tc, device, steps) = (self.tc, self.device, batches.len());
        let t_epoch = Instant::now();
        let pb = crate::logging::progress_bar(
            steps as u64,
            &format!("epoch {epoch}/{}", tc.epochs),
            self.dist.is_root() && !crate::logging::progress_as_lines(),
        );
        if let Some(r) = reporter.as_deref_mut() {
            r.start_epoch(epoch, steps);
        }
        let mut times = Times::default();
        let (mut loss_sum, mut seen, mut skipped, mut nonfinite_steps) = (0f64, 0f64, 0u64, 0u64);
        let mut clipped_steps = 0u64;
        let mut early_buckets = 0u64;
        let mut overlapped_steps = 0u64;
        with_batches(loader, rows, batches, device, |next_batch| {
            for step in 0..steps {
                crate::fault::point("step");
                let t = u64::from(epoch - 1) * steps as u64 + step as u64;
                self.opt.lr = self.schedule.lr(t);
                let lr = self.opt.lr;
                if traced_from == Some(step) {
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
                let stop = self.stop.load(Ordering::Relaxed);
                // The end of forward + backward.
                let mut t2 = t1;
                let synced = if let Some((x, y)) = batch {
                    if tc.on_nonfinite == OnNonFinite::Skip {
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
                    let mut loss = training_loss(&logits, soft.as_ref().unwrap_or(&y), tc.label_smoothing);
                    if crate::fault::poison("loss") {
                        loss *= f64::NAN;
                    }
                    n_local = y.size()[0] as usize;
                    local_loss = loss.double_value(&[]);
                    // Forward has updated the batch-norm statistics: what every rank must learn
                    // of this step is known before backward, whose hooks may start the exchange.
                    bad = !local_loss.is_finite() || !buffers_finite(&self.buffers);
                    self.sync.zero_grads();
                    let mine = StepInfo { images: n_local, loss: local_loss * n_local as f64, stop, bad };
                    self.sync.step(self.dist, mine, || {
                        // The summed loss: GradSync weights each rank by its image count.
                        (&loss * n_local as f64).backward();
                        if let Device::Cuda(i) = device {
                            // Backward's kernels end here, not in the exchange that waits for them.
                            tch::Cuda::synchronize(i as i64);
                        }
                        t2 = crate::timeline::since("compute", "forward + backward", t1, at);
                    })
                } else {
                    t2 = crate::timeline::since("compute", "forward + backward", t1, at);
                    self.sync.step(self.dist, StepInfo { stop, ..StepInfo::default() }, || {})
                };
                step_times.compute = t2 - t1;
                step_times.wait = synced.wait;
                overlapped_steps += u64::from(synced.overlapped);
                if let Some(line) = &synced.chose {
                    info!("{line}");
                }
                early_buckets += synced.early as u64;
                if synced.stop {
                    pb.abandon();
                    stopping(epoch, step, steps, state, self.dir);
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
                            copy_tensors(&self.buffers, &self.saved_buffers);
                            nonfinite_steps += 1;
                            warn!(
                                "epoch {epoch}, step {}/{steps}: non-finite loss or gradient ({what}); step left out \
                                 (train.on_nonfinite = \"skip\")",
                                step + 1
                            );
                            step_times.comm = crate::timeline::since("exchange", "allreduce", t2, at) - t2;
                            times.add(&step_times);
                            if let Some(r) = reporter.as_deref_mut() {
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

                let mut scale = synced.scale;
                if tc.clip_grad_norm > 0.0 {
                    let (clipped, factor) = clip_factor(&synced.grad, scale, tc.clip_grad_norm);
                    clipped_steps += u64::from(clipped);
                    scale *= factor;
                }
                self.opt.apply(&g, scale, &self.model.params);
                if let Some(ema) = self.ema.as_mut() {
                    ema.update(self.model, self.schedule.in_warmup(t));
                }
                step_times.optim = crate::timeline::since("optimizer", "optimizer step", t3, at) - t3;
                times.add(&step_times);
                state.steps += 1;
                loss_sum += local_loss * n_local as f64;
                seen += f64::from(total);
                if let Some(r) = reporter.as_deref_mut() {
                    r.step(f64::from(total), synced.loss, &step_times, state.steps, lr);
                }
                let rate = seen / t_epoch.elapsed().as_secs_f64();
                pb.set_message(format!("loss {local_loss:.3}, {rate:.0} img/s"));
                pb.inc(1);
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        if let Some(r) = reporter {
            r.end_steps(state.steps, self.opt.lr);
        }
        Ok(EpochSteps {
            loss_sum,
            seen,
            skipped,
            nonfinite_steps,
            clipped_steps,
            early_buckets,
            overlapped_steps,
            times,
        })
    }
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
