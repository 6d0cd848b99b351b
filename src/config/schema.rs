//! The schema: `Config`, its sections and their defaults (`Default` is what an empty file gives).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::values::{
    Cache, DeviceKind, Exchange, Format, ImagePlacement, LrScaling, LrSchedule, OnBadImage, OnNonFinite, OptimizerKind,
    Overlap, ResizeMode, Sample, Sampler,
};
use crate::models::Arch;
use crate::precision::{ChannelsLast, Precision};

/// The whole config file. Every section and key is optional; missing ones take the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub paths: Paths,
    pub dataset: DatasetCfg,
    pub image: ImageCfg,
    pub augment: AugmentCfg,
    pub model: ModelCfg,
    pub train: TrainCfg,
    pub evaluate: EvaluateCfg,
    pub timeline: TimelineCfg,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub output_dir: PathBuf,
    pub log_file: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
            checkpoint_dir: "checkpoints".into(),
            output_dir: "output".into(),
            log_file: "sac.log".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetCfg {
    pub format: Format,
    pub source: PathBuf,
    pub sample: Sample,
    pub test_fraction: f64,
    pub stratify: bool,
    pub seed: u64,
    pub place: ImagePlacement,
    /// An unlabeled FGVC/COCO metadata file (Herbarium's `test/metadata.json`) whose images become
    /// `predict.csv` and `img/predict/`; empty for none. Taken whole: no sampling, no split.
    pub predict_source: PathBuf,
}

impl Default for DatasetCfg {
    fn default() -> Self {
        Self {
            format: Format::Idx,
            source: "/usr/share/datasets/fashion-mnist".into(),
            sample: Sample::Fraction(0.1),
            test_fraction: 0.2,
            stratify: false,
            seed: 0,
            place: ImagePlacement::Copy,
            predict_source: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageCfg {
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// How an image becomes width x height for evaluation, validation and un-cropped training.
    pub resize: ResizeMode,
    /// `center_crop`: the short side before the crop; 0: max(width, height) / 0.875, as
    /// torchvision's 256 for 224.
    pub val_resize_size: u32,
    /// With `[augment] random_resized_crop`: the short side images are decoded and cached at, to
    /// crop from; 0: the network input as `resize` makes it.
    pub cache_size: u32,
}

impl Default for ImageCfg {
    fn default() -> Self {
        Self {
            width: 64,
            height: 64,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            resize: ResizeMode::Stretch,
            val_resize_size: 0,
            cache_size: 0,
        }
    }
}

impl ImageCfg {
    /// `val_resize_size`, or its default for the input size.
    pub fn val_resize(&self) -> u32 {
        if self.val_resize_size > 0 {
            self.val_resize_size
        } else {
            (f64::from(self.width.max(self.height)) / 0.875) as u32
        }
    }
}

/// `[augment]`: training-time augmentation, drawn per (seed, epoch, image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentCfg {
    /// torchvision's RandomResizedCrop to width x height.
    pub random_resized_crop: bool,
    /// Its range of the crop's share of the image's area, and of the crop's aspect ratio.
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    /// Mirror left-right / top-bottom with probability 1/2.
    pub hflip: bool,
    pub vflip: bool,
    /// torchvision's TrivialAugmentWide (one random operation of fourteen per image).
    pub trivial_augment: bool,
    /// torchvision's RandomErasing with this probability (a box filled with the mean colour).
    pub random_erase: f64,
    /// Mixup / CutMix of each batch with itself rolled by one, lambda ~ Beta(alpha, alpha); 0: off
    /// (both on: one of the two per batch).
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
}

impl Default for AugmentCfg {
    fn default() -> Self {
        Self {
            random_resized_crop: false,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: false,
            vflip: false,
            trivial_augment: false,
            random_erase: 0.0,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelCfg {
    pub name: Arch,
    /// Optional torchvision-named `.safetensors` to start from; empty for none.
    pub pretrained: PathBuf,
    pub feature_extract: bool,
}

impl Default for ModelCfg {
    fn default() -> Self {
        Self { name: Arch::Resnet18, pretrained: PathBuf::new(), feature_extract: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainCfg {
    pub epochs: u32,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// SGD's momentum (0: plain SGD); Adam's β1 stays 0.9.
    pub momentum: f64,
    /// Nesterov momentum (SGD with momentum > 0).
    pub nesterov: bool,
    /// L2 penalty (SGD, Adam) or decoupled decay (AdamW) of the weights.
    pub weight_decay: f64,
    /// The same for batch-norm weights and all biases; unset: `weight_decay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_weight_decay: Option<f64>,
    pub lr_schedule: LrSchedule,
    /// Epochs (may be fractional) of linear warmup from `warmup_decay` × lr.
    pub warmup_epochs: f64,
    pub warmup_decay: f64,
    /// `step` schedule: epochs between multiplications by `lr_gamma`.
    pub lr_step_size: u32,
    pub lr_gamma: f64,
    /// `cosine` schedule: the learning rate at the last step.
    pub lr_min: f64,
    pub lr_scaling: LrScaling,
    /// Cross-entropy against targets smoothed by this much (torch's `label_smoothing`).
    pub label_smoothing: f64,
    /// Per-step decay of an exponential moving average of the weights (and batch-norm
    /// statistics), saved as `model_ema.safetensors`; 0: none.
    pub ema_decay: f64,
    /// How each epoch picks its images.
    pub sampler: Sampler,
    /// Largest L2 norm of the averaged global gradient; 0: no clipping.
    pub clip_grad_norm: f64,
    /// Start each gradient bucket's allreduce during backward, as soon as its gradients are
    /// complete (CPU training with more than one rank); false: after backward; "auto": the faster
    /// of the two, timed over the first steps.
    pub overlap: Overlap,
    /// The number format gradients cross the network in (more than one rank).
    pub exchange: Exchange,
    pub validate: bool,
    /// Where training runs (and `evaluate`'s predictors): "cpu", "cuda" (GPU local rank mod GPU
    /// count) or "auto" (cuda when libtorch sees a GPU).
    pub device: DeviceKind,
    /// The model's arithmetic: "f32", "bf16" (autocast) or "auto" (bf16 where the device has it).
    pub precision: Precision,
    /// Batches and convolution weights in channels-last memory format: true, false, or "auto"
    /// (on GPUs; on a CPU where measured faster).
    pub channels_last: ChannelsLast,
    pub threads: usize,
    pub cache: Cache,
    /// Batches a loader thread prepares ahead of the step that uses them; 0: no loader thread.
    pub prefetch: usize,
    /// Threads that decode a batch's images; 0: the rank's share of its node's cores on a GPU,
    /// 1 on the CPU (where torch's threads take those cores).
    pub loader_threads: usize,
    pub on_bad_image: OnBadImage,
    pub on_nonfinite: OnNonFinite,
    /// Seconds a rank waits for its peers before it logs which have not arrived (train and evaluate).
    pub stall_warn: f64,
    /// Seconds after which such a wait ends the job naming the ranks; 0: never.
    pub stall_abort: f64,
    /// Seconds between progress lines (batch logs) and `metrics.jsonl` intervals, for train,
    /// evaluate and create-dataset; 0: none (train still records every epoch).
    pub log_every: f64,
}

impl Default for TrainCfg {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 64,
            optimizer: OptimizerKind::Adam,
            lr: 4e-4,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            norm_weight_decay: None,
            lr_schedule: LrSchedule::Constant,
            warmup_epochs: 0.0,
            warmup_decay: 0.01,
            lr_step_size: 30,
            lr_gamma: 0.1,
            lr_min: 0.0,
            lr_scaling: LrScaling::None,
            label_smoothing: 0.0,
            ema_decay: 0.0,
            sampler: Sampler::Uniform,
            clip_grad_norm: 0.0,
            overlap: Overlap::On,
            exchange: Exchange::F32,
            validate: true,
            device: DeviceKind::Cpu,
            precision: Precision::F32,
            channels_last: ChannelsLast::Auto,
            threads: 0,
            cache: Cache::Auto,
            prefetch: 2,
            loader_threads: 0,
            on_bad_image: OnBadImage::Skip,
            on_nonfinite: OnNonFinite::Fail,
            stall_warn: 60.0,
            stall_abort: 0.0,
            log_every: 30.0,
        }
    }
}

impl TrainCfg {
    /// Weight decay of batch-norm weights and biases.
    pub fn norm_decay(&self) -> f64 {
        self.norm_weight_decay.unwrap_or(self.weight_decay)
    }

    /// The base learning rate of a run with `ranks` ranks: `lr`, times global batch / 256 with
    /// `lr_scaling = "linear"`.
    pub fn base_lr(&self, ranks: usize) -> f64 {
        match self.lr_scaling {
            LrScaling::None => self.lr,
            LrScaling::Linear => self.lr * (self.batch_size * ranks) as f64 / 256.0,
        }
    }

    /// `log_every` as a duration (zero: off).
    pub fn log_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.log_every)
    }

    /// `stall_warn` and `stall_abort` as durations (for `dist::StallLimits`); an abort of 0 is never.
    pub fn stall_limits(&self) -> (std::time::Duration, Option<std::time::Duration>) {
        (
            std::time::Duration::from_secs_f64(self.stall_warn),
            (self.stall_abort > 0.0).then(|| std::time::Duration::from_secs_f64(self.stall_abort)),
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateCfg {
    pub batch_size: usize,
    /// Threads that decode and resize images (the decode rank's, or the decode stage's with fewer
    /// than 4 ranks); 0: the rank's share of its node's cores.
    pub decode_threads: usize,
    /// Empty: `<checkpoint_dir>/<model.name>/model.safetensors` (`model_ema.safetensors` with `ema`).
    pub checkpoint: PathBuf,
    /// Evaluate the exponential moving average of the weights that training kept
    /// (`train.ema_decay`) instead of the weights themselves.
    pub ema: bool,
    /// The predictors' arithmetic: "f32", "bf16" (autocast) or "auto" (bf16 where the device has it).
    pub precision: Precision,
    /// Batches and convolution weights in channels-last memory format: true, false, or "auto"
    /// (on GPUs; on a CPU where measured faster).
    pub channels_last: ChannelsLast,
}

impl Default for EvaluateCfg {
    fn default() -> Self {
        Self {
            batch_size: 32,
            decode_threads: 0,
            checkpoint: PathBuf::new(),
            ema: false,
            precision: Precision::F32,
            channels_last: ChannelsLast::Auto,
        }
    }
}

/// `[timeline]`: a Chrome trace / Perfetto JSON of what every rank does (`--timeline FILE`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimelineCfg {
    /// The trace file; empty: no timeline.
    pub file: PathBuf,
    /// The window: train records the last `steps` steps of the first epoch it trains, then that
    /// epoch's validation (at most `steps` batches) and checkpoint; evaluate its first `steps` batches.
    pub steps: usize,
}

impl Default for TimelineCfg {
    fn default() -> Self {
        Self { file: PathBuf::new(), steps: 50 }
    }
}

impl TimelineCfg {
    /// The trace file, if a timeline is asked for.
    pub fn path(&self) -> Option<&Path> {
        (!self.file.as_os_str().is_empty()).then_some(self.file.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::overrides::parse_with_sets;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = parse_with_sets("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.dataset.sample, Sample::Fraction(0.1));
        assert_eq!(c.train.lr, 4e-4);
    }
}
