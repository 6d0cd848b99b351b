//! The learning rate of every step: an optional linear warmup, then constant, step or cosine, as
//! torchvision's reference script composes `LinearLR` with `StepLR` or `CosineAnnealingLR`
//! (`SequentialLR`), but stepped every optimizer step instead of every epoch.
use crate::config::{LrSchedule, TrainCfg};

/// The schedule of one run. Steps are counted as `(epoch - 1) × steps_per_epoch + step`, so a
/// resumed run continues where the checkpoint left off, and a step left out (a non-finite
/// gradient) does not shift the later ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: LrSchedule,
    /// The learning rate after warmup (`train.lr`, scaled by `lr_scaling`).
    pub base: f64,
    warmup_steps: u64,
    warmup_decay: f64,
    /// `step`: steps between multiplications by `gamma`.
    step_every: u64,
    gamma: f64,
    lr_min: f64,
    total_steps: u64,
}

impl Schedule {
    /// The schedule for `tc` with `ranks` ranks and `steps_per_epoch` steps.
    pub fn new(tc: &TrainCfg, ranks: usize, steps_per_epoch: usize) -> Self {
        let s = steps_per_epoch as u64;
        Schedule {
            kind: tc.lr_schedule,
            base: tc.base_lr(ranks),
            warmup_steps: (tc.warmup_epochs * steps_per_epoch as f64).round() as u64,
            warmup_decay: tc.warmup_decay,
            step_every: (u64::from(tc.lr_step_size) * s).max(1),
            gamma: tc.lr_gamma,
            lr_min: tc.lr_min,
            total_steps: u64::from(tc.epochs) * s,
        }
    }

    /// The learning rate of step `t` (0-based over the run).
    pub fn lr(&self, t: u64) -> f64 {
        if t < self.warmup_steps {
            // LinearLR(start_factor = warmup_decay, total_iters = warmup steps).
            let f = t as f64 / self.warmup_steps as f64;
            return self.base * (self.warmup_decay + (1.0 - self.warmup_decay) * f);
        }
        let u = t - self.warmup_steps;
        match self.kind {
            LrSchedule::Constant => self.base,
            LrSchedule::Step => self.base * self.gamma.powi((u / self.step_every) as i32),
            LrSchedule::Cosine => {
                // CosineAnnealingLR(T_max = the steps after warmup, eta_min = lr_min), closed form.
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let u = (u as f64).min(span);
                self.lr_min + (self.base - self.lr_min) * (1.0 + (std::f64::consts::PI * u / span).cos()) / 2.0
            }
        }
    }

    /// Is step `t` in the warmup?
    pub fn in_warmup(&self, t: u64) -> bool {
        t < self.warmup_steps
    }

    /// One line for the log: what the run's learning rate does.
    pub fn describe(&self) -> String {
        let main = match self.kind {
            LrSchedule::Constant => format!("lr {:.4e}", self.base),
            LrSchedule::Step => format!("lr {:.4e}, x{} every {} steps", self.base, self.gamma, self.step_every),
            LrSchedule::Cosine => {
                format!("lr {:.4e} cosine to {:.4e} at step {}", self.base, self.lr_min, self.total_steps)
            }
        };
        if self.warmup_steps > 0 {
            format!("{main}, after {} warmup steps from {:.4e}", self.warmup_steps, self.base * self.warmup_decay)
        } else {
            main
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LrScaling;

    fn schedule(kind: LrSchedule, epochs: u32, steps: usize, warmup_epochs: f64) -> Schedule {
        let tc = TrainCfg {
            lr: 0.1,
            epochs,
            lr_schedule: kind,
            warmup_epochs,
            warmup_decay: 0.01,
            lr_step_size: 2,
            lr_gamma: 0.5,
            lr_min: 0.001,
            ..TrainCfg::default()
        };
        Schedule::new(&tc, 1, steps)
    }

    /// Against torch.optim.lr_scheduler stepped once per optimizer step. PyTorch 2.13:
    /// ```python
    /// o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); W, T = 4, 20
    /// s = SequentialLR(o, [LinearLR(o, start_factor=0.01, total_iters=W),
    ///                      CosineAnnealingLR(o, T_max=T - W, eta_min=0.001)], milestones=[W])
    /// # or StepLR(o, step_size=8, gamma=0.5) after the warmup
    /// for t in range(20): print(o.param_groups[0]["lr"]); o.step(); s.step()
    /// ```
    #[test]
    fn warmup_cosine_and_step_match_torch_schedulers() {
        let cosine = [
            0.001,
            0.02575,
            0.0505,
            0.07525,
            0.1,
            0.099048871,
            0.096232037,
            0.091657746,
            0.085501786,
            0.078000727,
            0.06944283,
            0.060156971,
            0.0505,
            0.040843029,
            0.03155717,
            0.022999273,
            0.015498214,
            0.009342254,
            0.004767963,
            0.001951129,
        ];
        let step = [0.001, 0.02575, 0.0505, 0.07525, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05];
        // 5 epochs of 4 steps, 1 epoch of warmup; the step schedule halves every 2 epochs (8 steps).
        let c = schedule(LrSchedule::Cosine, 5, 4, 1.0);
        let s = schedule(LrSchedule::Step, 5, 4, 1.0);
        for (t, want) in cosine.iter().enumerate() {
            assert!((c.lr(t as u64) - want).abs() < 1e-8, "cosine step {t}: {} vs {want}", c.lr(t as u64));
        }
        for (t, want) in step.iter().enumerate() {
            assert!((s.lr(t as u64) - want).abs() < 1e-8, "step schedule, step {t}: {} vs {want}", s.lr(t as u64));
        }
    }

    #[test]
    fn constant_without_warmup_is_the_plain_lr_and_linear_scaling_uses_the_global_batch() {
        let c = schedule(LrSchedule::Constant, 3, 10, 0.0);
        assert!((0..30).all(|t| c.lr(t) == 0.1));
        let tc = TrainCfg { lr: 0.1, batch_size: 64, lr_scaling: LrScaling::Linear, ..TrainCfg::default() };
        assert_eq!(Schedule::new(&tc, 4, 10).base, 0.1);
        assert_eq!(Schedule::new(&tc, 2, 10).base, 0.05);
        // A fractional warmup rounds to whole steps; past the last step the cosine stays at lr_min.
        let f = schedule(LrSchedule::Cosine, 2, 10, 0.25);
        assert!(f.lr(2) < 0.1 && f.lr(3) == 0.1);
        assert!((f.lr(1000) - 0.001).abs() < 1e-12);
    }
}
