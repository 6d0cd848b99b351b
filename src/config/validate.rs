//! `Config::validate`: the range checks the types cannot express, one function per section.
use std::fmt;

use anyhow::{bail, Result};

use super::schema::{AugmentCfg, Config, DatasetCfg, EvaluateCfg, ImageCfg, TimelineCfg, TrainCfg};
use super::values::OptimizerKind;
use crate::models::Arch;

impl Config {
    /// Range checks the types cannot express. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        // In the order the checks have always run (evaluate.ema between two groups of train keys,
        // timeline.steps between two others), so any config's first error is the one it was.
        validate_dataset(&self.dataset)?;
        validate_image(&self.image)?;
        validate_augment(&self.augment)?;
        validate_input_size(&self.image, self.model.name)?;
        validate_train_optimizer(&self.train)?;
        validate_evaluate_ema(&self.evaluate)?;
        validate_train_schedule(&self.train)?;
        validate_train_waits(&self.train)?;
        validate_timeline(&self.timeline)?;
        validate_train_loader(&self.train)?;
        validate_evaluate(&self.evaluate)
    }
}

/// `Err("{key}: {what}")` unless `ok`.
fn check(ok: bool, key: &str, what: impl fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("{key}: {what}")
    }
}

/// `[dataset]`.
fn validate_dataset(d: &DatasetCfg) -> Result<()> {
    check(
        d.test_fraction > 0.0 && d.test_fraction < 1.0,
        "dataset.test_fraction",
        format!("{} must be in (0, 1)", d.test_fraction),
    )?;
    Ok(())
}

/// `[image]`.
fn validate_image(i: &ImageCfg) -> Result<()> {
    check(i.width >= 8 && i.width <= 4096, "image.width", format!("{} must be in 8..=4096", i.width))?;
    check(i.height >= 8 && i.height <= 4096, "image.height", format!("{} must be in 8..=4096", i.height))?;
    check(i.std.iter().all(|s| *s > 0.0), "image.std", "every entry must be > 0")?;
    check(i.mean.iter().chain(&i.std).all(|v| v.is_finite()), "image.mean/std", "must be finite")?;
    check(
        i.val_resize_size == 0 || i.val_resize_size >= i.width.max(i.height),
        "image.val_resize_size",
        format!("{} must be 0 (auto) or at least max(width, height) to crop from", i.val_resize_size),
    )?;
    check(i.cache_size <= 8192, "image.cache_size", format!("{} is larger than any image sac caches", i.cache_size))?;
    Ok(())
}

/// `[augment]`.
fn validate_augment(a: &AugmentCfg) -> Result<()> {
    check(
        a.scale[0] > 0.0 && a.scale[0] <= a.scale[1] && a.scale[1] <= 1.0,
        "augment.scale",
        format!("{:?} must be [lo, hi] with 0 < lo <= hi <= 1", a.scale),
    )?;
    check(
        a.ratio[0] > 0.0 && a.ratio[0] <= a.ratio[1] && a.ratio[1].is_finite(),
        "augment.ratio",
        format!("{:?} must be [lo, hi] with 0 < lo <= hi", a.ratio),
    )?;
    check(
        (0.0..=1.0).contains(&a.random_erase),
        "augment.random_erase",
        format!("{} must be a probability in [0, 1]", a.random_erase),
    )?;
    for (key, alpha) in [("augment.mixup_alpha", a.mixup_alpha), ("augment.cutmix_alpha", a.cutmix_alpha)] {
        check(
            (0.0..=100.0).contains(&alpha),
            key,
            format!("{alpha} must be in [0, 100] (0.2 and 1.0 are usual; 0 = off)"),
        )?;
    }
    Ok(())
}

/// `[image]` against `[model]`: the input is at least the architecture's smallest.
fn validate_input_size(i: &ImageCfg, arch: Arch) -> Result<()> {
    let (min_w, min_h) = crate::models::min_input_size(arch);
    check(
        i.width >= min_w && i.height >= min_h,
        "image.width/height",
        format!("{}x{} is below {}'s minimum input of {min_w}x{min_h}", i.width, i.height, arch),
    )?;
    Ok(())
}

/// `[train]`: the optimizer, warmup, the loss's smoothing and the EMA.
fn validate_train_optimizer(t: &TrainCfg) -> Result<()> {
    check(t.epochs >= 1, "train.epochs", "must be at least 1")?;
    check(t.batch_size >= 1, "train.batch_size", "must be at least 1")?;
    check(t.lr > 0.0 && t.lr.is_finite(), "train.lr", format!("{} must be > 0", t.lr))?;
    check((0.0..1.0).contains(&t.momentum), "train.momentum", format!("{} must be in [0, 1)", t.momentum))?;
    check(
        !t.nesterov || (t.optimizer == OptimizerKind::Sgd && t.momentum > 0.0),
        "train.nesterov",
        "needs optimizer = \"sgd\" and momentum > 0",
    )?;
    for (key, wd) in [("train.weight_decay", Some(t.weight_decay)), ("train.norm_weight_decay", t.norm_weight_decay)] {
        if let Some(wd) = wd {
            check((0.0..1.0).contains(&wd), key, format!("{wd} must be in [0, 1) (1e-4 and 5e-2 are usual values)"))?;
        }
    }
    check(
        t.warmup_epochs >= 0.0 && t.warmup_epochs.is_finite(),
        "train.warmup_epochs",
        format!("{} must be >= 0", t.warmup_epochs),
    )?;
    check(
        t.warmup_decay > 0.0 && t.warmup_decay <= 1.0,
        "train.warmup_decay",
        format!("{} must be in (0, 1]: warmup starts at warmup_decay x lr", t.warmup_decay),
    )?;
    check(
        (0.0..1.0).contains(&t.label_smoothing),
        "train.label_smoothing",
        format!("{} must be in [0, 1) (0.1 is usual)", t.label_smoothing),
    )?;
    check(
        t.ema_decay == 0.0 || (0.5..1.0).contains(&t.ema_decay),
        "train.ema_decay",
        format!("{} must be 0 (off) or in [0.5, 1) (0.9998 per step is usual)", t.ema_decay),
    )?;
    Ok(())
}

/// `[evaluate] ema`.
fn validate_evaluate_ema(e: &EvaluateCfg) -> Result<()> {
    check(
        !e.ema || e.checkpoint.as_os_str().is_empty(),
        "evaluate.ema",
        "picks <checkpoint_dir>/<model>/model_ema.safetensors; with evaluate.checkpoint (--checkpoint) name the \
         EMA file itself instead",
    )?;
    Ok(())
}

/// `[train]`: clipping and the learning-rate schedule.
fn validate_train_schedule(t: &TrainCfg) -> Result<()> {
    check(
        t.clip_grad_norm >= 0.0 && t.clip_grad_norm.is_finite(),
        "train.clip_grad_norm",
        format!("{} must be >= 0 (0 = no clipping)", t.clip_grad_norm),
    )?;
    check(t.lr_step_size >= 1, "train.lr_step_size", "must be at least 1 (epochs)")?;
    check(t.lr_gamma > 0.0 && t.lr_gamma <= 1.0, "train.lr_gamma", format!("{} must be in (0, 1]", t.lr_gamma))?;
    check(
        t.lr_min >= 0.0 && t.lr_min < t.lr,
        "train.lr_min",
        format!("{} must be >= 0 and below train.lr ({})", t.lr_min, t.lr),
    )?;
    Ok(())
}

/// `[train]`: the stall limits and the progress interval.
fn validate_train_waits(t: &TrainCfg) -> Result<()> {
    check(
        t.stall_warn >= 1.0 && t.stall_warn.is_finite(),
        "train.stall_warn",
        format!("{} must be at least 1 (seconds)", t.stall_warn),
    )?;
    check(
        t.stall_abort == 0.0 || (t.stall_abort >= 1.0 && t.stall_abort.is_finite()),
        "train.stall_abort",
        format!("{} must be 0 (never) or at least 1 (seconds)", t.stall_abort),
    )?;
    check(
        t.log_every == 0.0 || (t.log_every >= 0.1 && t.log_every.is_finite()),
        "train.log_every",
        format!("{} must be 0 (no progress lines) or at least 0.1 (seconds)", t.log_every),
    )?;
    Ok(())
}

/// `[timeline]`.
fn validate_timeline(tl: &TimelineCfg) -> Result<()> {
    check(
        (1..=100_000).contains(&tl.steps),
        "timeline.steps",
        format!("{} must be from 1 to 100000 (steps or batches in the window)", tl.steps),
    )?;
    Ok(())
}

/// `[train]`: the loader and the thread count.
fn validate_train_loader(t: &TrainCfg) -> Result<()> {
    check(t.prefetch <= 16, "train.prefetch", format!("{} batches ahead is too many (at most 16)", t.prefetch))?;
    check(t.threads <= 1024, "train.threads", format!("{} is not a plausible thread count", t.threads))?;
    Ok(())
}

/// `[evaluate]`.
fn validate_evaluate(e: &EvaluateCfg) -> Result<()> {
    check(e.batch_size >= 1, "evaluate.batch_size", "must be at least 1")?;
    check(
        e.decode_threads <= 1024,
        "evaluate.decode_threads",
        format!("{} is not a plausible thread count", e.decode_threads),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::overrides::parse_with_sets;
    use crate::config::Config;

    #[test]
    fn out_of_range_values_name_the_key() {
        let c = parse_with_sets("[dataset]\ntest_fraction = 1.5\n", &[]).unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("dataset.test_fraction"));
        let c = parse_with_sets("[model]\nname = \"inception\"\n[image]\nwidth = 64\nheight = 64\n", &[]).unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("inception's minimum input of 75x75"));
    }

    #[test]
    fn stall_limits_are_checked_and_an_abort_of_zero_means_never() {
        let c = parse_with_sets("[train]\nstall_warn = 0.5\n", &[]).unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("train.stall_warn"));
        let c = parse_with_sets("", &["train.stall_abort=0.5".into()]).unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("train.stall_abort"));
        let c = parse_with_sets("", &["train.stall_abort=30".into()]).unwrap();
        assert_eq!(c.train.stall_limits().1, Some(std::time::Duration::from_secs(30)));
        let d = Config::default().train.stall_limits();
        assert_eq!(d, (std::time::Duration::from_secs(60), None));
    }
}
