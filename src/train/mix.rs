//! Mixup and CutMix of a batch with itself rolled by one image, as torchvision's reference
//! script (`RandomMixUp`, `RandomCutMix`, and a random choice of the two when both are on): the
//! targets become the matching mixture of one-hot labels. λ comes from torch's generator
//! (`_sample_dirichlet([α, α])`), which the training loop seeds per epoch and rank.
use tch::{Kind, Tensor};

use crate::config::AugmentCfg;

pub struct Mix {
    mixup: f64,
    cutmix: f64,
    classes: i64,
}

impl Mix {
    /// None when both alphas are 0.
    pub fn new(cfg: &AugmentCfg, classes: usize) -> Option<Self> {
        (cfg.mixup_alpha > 0.0 || cfg.cutmix_alpha > 0.0).then_some(Mix {
            mixup: cfg.mixup_alpha,
            cutmix: cfg.cutmix_alpha,
            classes: classes as i64,
        })
    }

    fn lambda(alpha: f64) -> f64 {
        Tensor::from_slice(&[alpha, alpha]).internal_sample_dirichlet().double_value(&[0])
    }

    /// The mixed batch `x` (N x 3 x H x W) and its soft targets (N x classes) for labels `y`.
    pub fn apply(&self, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
        let onehot = y.one_hot(self.classes).to_kind(Kind::Float);
        let (x_rolled, t_rolled) = (x.roll([1], [0]), onehot.roll([1], [0]));
        let use_cutmix = match (self.mixup > 0.0, self.cutmix > 0.0) {
            (true, true) => Tensor::randint(2, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]) == 1,
            (false, true) => true,
            _ => false,
        };
        let (mixed, lambda) = if use_cutmix {
            let lambda = Self::lambda(self.cutmix);
            let (h, w) = (x.size()[2], x.size()[3]);
            let rx = Tensor::randint(w, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]);
            let ry = Tensor::randint(h, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]);
            let r = 0.5 * (1.0 - lambda).sqrt();
            let (rw, rh) = ((r * w as f64) as i64, (r * h as f64) as i64);
            let (x1, y1) = ((rx - rw).max(0), (ry - rh).max(0));
            let (x2, y2) = ((rx + rw).min(w), (ry + rh).min(h));
            let out = x.copy();
            if x2 > x1 && y2 > y1 {
                let patch = x_rolled.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1);
                out.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1).copy_(&patch);
            }
            (out, 1.0 - ((x2 - x1) * (y2 - y1)) as f64 / (w * h) as f64)
        } else {
            let lambda = Self::lambda(self.mixup);
            (x * lambda + &x_rolled * (1.0 - lambda), lambda)
        };
        (mixed, onehot * lambda + t_rolled * (1.0 - lambda))
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.mixup > 0.0 {
            parts.push(format!("mixup (alpha {})", self.mixup));
        }
        if self.cutmix > 0.0 {
            parts.push(format!("cutmix (alpha {})", self.cutmix));
        }
        format!("batch mixing: {}{}", parts.join(" or "), if parts.len() > 1 { ", one per batch" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_and_cutmix_mix_images_and_targets_alike() {
        tch::manual_seed(0);
        // Two 1x4x4 "images": all zeros and all ones, labels 0 and 1.
        let x = Tensor::cat(
            &[
                Tensor::zeros([1, 3, 4, 4], (Kind::Float, tch::Device::Cpu)),
                Tensor::ones([1, 3, 4, 4], (Kind::Float, tch::Device::Cpu)),
            ],
            0,
        );
        let y = Tensor::from_slice(&[0i64, 1]);
        for (mixup, cutmix) in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
            let cfg = AugmentCfg { mixup_alpha: mixup, cutmix_alpha: cutmix, ..AugmentCfg::default() };
            let m = Mix::new(&cfg, 3).unwrap();
            for _ in 0..20 {
                let (mx, t) = m.apply(&x, &y);
                // Image 0 (zeros) is mixed with image 1 (ones): its mean is the share of image 1,
                // which is its target's weight on class 1.
                let share_of_ones = mx.get(0).mean(Kind::Float).double_value(&[]);
                let (t0, t1, t2) = (t.double_value(&[0, 0]), t.double_value(&[0, 1]), t.double_value(&[0, 2]));
                assert!((share_of_ones - t1).abs() < 1e-5, "{mixup} {cutmix}: image {share_of_ones} vs target {t1}");
                assert!((t0 + t1 - 1.0).abs() < 1e-6 && t2 == 0.0);
            }
        }
        assert!(Mix::new(&AugmentCfg::default(), 3).is_none());
    }
}
