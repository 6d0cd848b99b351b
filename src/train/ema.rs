//! An exponential moving average of the model's variables (`train.ema_decay`), as
//! `torch.optim.swa_utils.AveragedModel` with `use_buffers=True` updated after every optimizer
//! step: `ema = decay × ema + (1 − decay) × value` for every weight and batch-norm statistic.
//! During the learning-rate warmup the average follows the weights exactly (torchvision's
//! reference script resets it during warmup for the same reason: the first weights are noise).
use std::collections::BTreeMap;

use tch::Tensor;

use super::model::Model;

pub struct Ema {
    pub decay: f64,
    /// Copies of the model's floating-point variables, by name.
    pub vars: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An average that starts as the model's current values.
    pub fn new(model: &Model, decay: f64) -> Self {
        let vars = model
            .vars
            .iter()
            .filter(|(_, t)| t.is_floating_point())
            .map(|(n, t)| (n.clone(), t.detach().copy()))
            .collect();
        Ema { decay, vars }
    }

    /// One update after an optimizer step; `follow`: copy instead of averaging (warmup).
    pub fn update(&mut self, model: &Model, follow: bool) {
        let weight = if follow { 1.0 } else { 1.0 - self.decay };
        tch::no_grad(|| {
            for (name, avg) in &self.vars {
                let v = &model.vars[name];
                let _ = avg.shallow_clone().lerp_(&v.detach().to_kind(avg.kind()), weight);
            }
        });
    }

    /// Exchanges the model's values with the average's (twice: back as they were), to validate
    /// the average with the model's code.
    pub fn swap(&self, model: &Model) {
        tch::no_grad(|| {
            for (name, avg) in &self.vars {
                let v = &model.vars[name];
                let keep = v.detach().copy();
                v.shallow_clone().copy_(avg);
                avg.shallow_clone().copy_(&keep);
            }
        });
    }

    /// The batch-norm statistics (not trained, so each rank's differ a little): what is averaged
    /// over the ranks at the end of an epoch, as the model's are.
    pub fn buffers(&self, model: &Model) -> Vec<Tensor> {
        model.buffers.iter().filter_map(|(n, _)| self.vars.get(n).map(Tensor::shallow_clone)).collect()
    }

    pub fn all(&self) -> Vec<Tensor> {
        self.vars.values().map(Tensor::shallow_clone).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `torch.optim.swa_utils.get_ema_avg_fn(0.9)` on a weight that goes 1, 2, 3 after a start
    /// of 0: 0.1, 0.29, 0.561.
    #[test]
    fn the_average_follows_torchs_ema_and_copies_during_warmup() {
        let model = Model::new(crate::models::Arch::Squeezenet, 2, Device::Cpu, false);
        let name = "classifier.1.bias".to_string();
        let w = model.vars[&name].shallow_clone();
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(0.0);
        });
        let mut ema = Ema::new(&model, 0.9);
        for v in [1.0, 2.0, 3.0] {
            tch::no_grad(|| {
                let _ = w.shallow_clone().fill_(v);
            });
            ema.update(&model, false);
        }
        let got = ema.vars[&name].double_value(&[0]);
        assert!((got - 0.561).abs() < 1e-6, "{got}");
        ema.update(&model, true);
        assert_eq!(ema.vars[&name].double_value(&[0]), 3.0, "warmup copies");
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(5.0);
        });
        ema.swap(&model);
        assert_eq!((w.double_value(&[0]), ema.vars[&name].double_value(&[0])), (3.0, 5.0));
        ema.swap(&model);
        assert_eq!(w.double_value(&[0]), 5.0);
    }
}
