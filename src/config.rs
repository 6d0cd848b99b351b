//! `config.toml`: the schema, its defaults, validation, and the flag / `--set` overrides.
//!
//! Order of precedence: built-in defaults < the file < `--set section.key=value` < dedicated flags.
//! Every error names the key and where it came from (the file, with line and column, or `--set`).
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::precision::{ChannelsLast, Precision};
pub use crate::switch::Switch;

pub use crate::models::Arch;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// FGVC/COCO `metadata.json` (Herbarium, iNaturalist).
    Coco,
    /// One sub-directory per class (torchvision's ImageFolder).
    Folder,
    /// MNIST-style IDX files.
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Copy,
    Hardlink,
    Symlink,
}

/// How much of the source to take: a fraction in (0, 1] or an absolute count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    Fraction(f64),
    Count(u64),
}

impl Sample {
    /// The number of items to draw from `total`.
    pub fn count_of(self, total: usize) -> usize {
        match self {
            Sample::Fraction(f) => ((total as f64) * f).round() as usize,
            Sample::Count(n) => (n as usize).min(total),
        }
    }

    fn check(self) -> std::result::Result<(), String> {
        match self {
            Sample::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                Err(format!("{f} is not a fraction in (0, 1] (use a whole number for a count)"))
            }
            Sample::Count(0) => Err("a count of 0 images selects nothing".into()),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sample::Fraction(x) => write!(f, "{x:?}"),
            Sample::Count(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Sample {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let sample = if s.contains(['.', 'e', 'E']) {
            Sample::Fraction(s.parse().map_err(|_| format!("`{s}` is not a number"))?)
        } else {
            Sample::Count(s.parse().map_err(|_| format!("`{s}` is not a fraction or a whole count"))?)
        };
        sample.check()?;
        Ok(sample)
    }
}

impl Serialize for Sample {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            Sample::Fraction(f) => s.serialize_f64(f),
            Sample::Count(n) => s.serialize_u64(n),
        }
    }
}

impl<'de> Deserialize<'de> for Sample {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
        }
        let sample = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a fraction like 0.1 or a count like 5000"))?
        {
            Raw::Int(n) if n < 0 => return Err(serde::de::Error::custom(format!("{n} is negative"))),
            Raw::Int(n) => Sample::Count(n as u64),
            Raw::Float(f) => Sample::Fraction(f),
        };
        sample.check().map_err(serde::de::Error::custom)?;
        Ok(sample)
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
    pub place: Place,
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
            place: Place::Copy,
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

/// `[image] resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Both sides to width x height, whatever the aspect ratio.
    Stretch,
    /// The short side to `val_resize_size`, then the centre width x height (torchvision's eval).
    CenterCrop,
    /// The whole image inside width x height, aspect kept, the rest the mean colour.
    Pad,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Sgd,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    AdamW,
}

/// How the learning rate moves over the run (after any warmup), updated every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    /// Times `lr_gamma` every `lr_step_size` epochs.
    Step,
    /// Half a cosine from `lr` down to `lr_min` at the last step.
    Cosine,
}

/// How each epoch picks its images (`train.sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Every image once, shuffled.
    Uniform,
    /// As many draws as images, with replacement, an image of a class of n images with weight 1/n:
    /// every class is drawn equally often.
    ClassBalanced,
    /// The same with weight 1/√n: between uniform and balanced.
    Sqrt,
}

impl Sampler {
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Uniform => "uniform",
            Sampler::ClassBalanced => "class_balanced",
            Sampler::Sqrt => "sqrt",
        }
    }
}

/// The number format of the gradient exchange (`train.exchange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exchange {
    /// Gradients summed as they are (f32): the result does not depend on the rank count's rounding.
    F32,
    /// Gradients sent as bfloat16 (half the bytes), each pair of values summed in f32 and rounded
    /// to bfloat16 once; the image counts, flags and loss that travel with them stay f32.
    Bf16,
}

/// `[train] overlap`: when each gradient bucket's allreduce starts. `true`: during backward, as
/// soon as the bucket's gradients are complete; `false`: after backward; `"auto"`: time both over
/// the first steps and keep the faster (`train::auto_overlap`).
pub type Overlap = Switch;

/// Whether `lr` is for a global batch of 256 and scales with the global batch (the rank count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    None,
    /// lr × global batch / 256 (Goyal et al.'s linear scaling rule).
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    Skip,
    Fail,
}

/// What a non-finite loss or gradient does to training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with an error naming the epoch and step (nothing non-finite is ever saved).
    Fail,
    /// Leave the step out (no update) and count it.
    Skip,
}

/// `[train] cache`: how much of a rank's shard is kept decoded in memory across epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// `false`: decode every image every epoch.
    Off,
    /// `true`: keep the whole shard, however large.
    All,
    /// `"auto"`: a share of the node's available memory, divided among the node's ranks.
    Auto,
    /// A byte budget per rank, written like `"4 GiB"`, `"500 MB"` or a plain number of bytes.
    Bytes(u64),
}

impl Cache {
    /// Parses `"auto"` or a size: a number with an optional unit (B, KB, MB, GB, TB: powers of
    /// 1000; KiB, MiB, GiB, TiB: powers of 1024).
    fn parse(s: &str) -> std::result::Result<Cache, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(Cache::Auto);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("`{s}` is not true, false, \"auto\" or a size like \"4 GiB\""))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" | "k" => 1e3,
            "mb" | "m" => 1e6,
            "gb" | "g" => 1e9,
            "tb" | "t" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024f64.powi(2),
            "gib" => 1024f64.powi(3),
            "tib" => 1024f64.powi(4),
            other => return Err(format!("`{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB, ...)")),
        };
        let bytes = n * scale;
        if !(0.0..=1e18).contains(&bytes) {
            return Err(format!("`{s}` is not a plausible size"));
        }
        Ok(Cache::Bytes(bytes as u64))
    }
}

impl fmt::Display for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cache::Off => f.write_str("false"),
            Cache::All => f.write_str("true"),
            Cache::Auto => f.write_str("auto"),
            Cache::Bytes(b) => write!(f, "{}", crate::logging::bytes(*b)),
        }
    }
}

impl Serialize for Cache {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Cache::Off => s.serialize_bool(false),
            Cache::All => s.serialize_bool(true),
            Cache::Auto => s.serialize_str("auto"),
            Cache::Bytes(b) => s.serialize_str(&format!("{b} B")),
        }
    }
}

impl<'de> Deserialize<'de> for Cache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Int(i64),
            Str(String),
        }
        let msg = "expected true, false, \"auto\" or a size like \"4 GiB\"";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(msg))? {
            Raw::Bool(false) => Ok(Cache::Off),
            Raw::Bool(true) => Ok(Cache::All),
            Raw::Int(n) if n >= 0 => Ok(Cache::Bytes(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!("{n} is negative"))),
            Raw::Str(s) => Cache::parse(&s).map_err(serde::de::Error::custom),
        }
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
    /// Batches in channels-last memory format: true, false, or "auto" (on GPUs).
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
    /// Batches in channels-last memory format: true, false, or "auto" (on GPUs).
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

/// Which split of the data dir `sac evaluate` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// test.csv: labeled; predictions, metrics, per-class scores and the confusion picture.
    Test,
    /// predict.csv (from dataset.predict_source): unlabeled; predictions.csv only.
    Predict,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Predict => "predict",
        }
    }
}

/// Overrides from dedicated flags; `None` leaves the config's value.
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    pub sample: Option<Sample>,
    pub seed: Option<u64>,
    pub source: Option<PathBuf>,
    pub model: Option<Arch>,
    pub epochs: Option<u32>,
    pub checkpoint: Option<PathBuf>,
    pub timeline: Option<PathBuf>,
    /// `evaluate --ema`.
    pub ema: bool,
}

/// A loaded, overridden, validated config with every path made absolute.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The file it came from.
    pub file: PathBuf,
}

impl Settings {
    /// Reads `file`, applies `--set` overrides and flag overrides, validates, resolves paths.
    pub fn load(file: &Path, sets: &[String], flags: &FlagOverrides) -> Result<Settings> {
        let text = std::fs::read_to_string(file).with_context(|| {
            format!("cannot read config file {} (pass --config PATH to use another)", file.display())
        })?;
        let mut config = parse_with_sets(&text, sets).with_context(|| {
            if sets.is_empty() {
                format!("in config file {}", file.display())
            } else {
                format!("in config file {} with the --set overrides", file.display())
            }
        })?;
        flags.apply(&mut config);
        config.validate().with_context(|| format!("in config file {}", file.display()))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let base = std::path::absolute(&base).with_context(|| format!("resolving {}", base.display()))?;
        config.resolve_paths(&base);
        Ok(Settings { config, file: file.to_path_buf() })
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.paths.data_dir
    }

    /// `<checkpoint_dir>/<model>/`.
    pub fn model_dir(&self) -> PathBuf {
        self.config.paths.checkpoint_dir.join(self.config.model.name.name())
    }

    /// The checkpoint `evaluate` reads.
    pub fn eval_checkpoint(&self) -> PathBuf {
        if self.config.evaluate.checkpoint.as_os_str().is_empty() {
            self.model_dir().join(if self.config.evaluate.ema { "model_ema.safetensors" } else { "model.safetensors" })
        } else {
            self.config.evaluate.checkpoint.clone()
        }
    }

    pub fn pretrained(&self) -> Option<&Path> {
        let p = &self.config.model.pretrained;
        (!p.as_os_str().is_empty()).then_some(p.as_path())
    }
}

impl FlagOverrides {
    fn apply(&self, c: &mut Config) {
        if let Some(s) = self.sample {
            c.dataset.sample = s;
        }
        if let Some(s) = self.seed {
            c.dataset.seed = s;
        }
        if let Some(s) = &self.source {
            // A flag path is relative to the working directory, not to the config file.
            c.dataset.source = std::path::absolute(s).unwrap_or_else(|_| s.clone());
        }
        if let Some(m) = self.model {
            c.model.name = m;
        }
        if let Some(e) = self.epochs {
            c.train.epochs = e;
        }
        if let Some(p) = &self.checkpoint {
            c.evaluate.checkpoint = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        }
        if let Some(p) = &self.timeline {
            c.timeline.file = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        }
        if self.ema {
            c.evaluate.ema = true;
        }
    }
}

/// Keys whose default is "unset" (an `Option`), so the encoded defaults do not list them.
const UNSET_BY_DEFAULT: [(&str, &str); 1] = [("train", "norm_weight_decay")];

/// Parses the file text, then merges each `section.key=value` of `sets` into it.
fn parse_with_sets(text: &str, sets: &[String]) -> Result<Config> {
    // First the file alone, so its errors carry line and column.
    let config: Config = toml::from_str(text)?;
    if sets.is_empty() {
        return Ok(config);
    }
    let mut table = toml::Table::try_from(&config).context("re-encoding the config")?;
    let known = toml::Table::try_from(Config::default()).context("encoding the defaults")?;
    for set in sets {
        let (key, value) = parse_set(set)?;
        let (section, field) = key
            .split_once('.')
            .filter(|(s, f)| !s.is_empty() && !f.is_empty())
            .with_context(|| format!("--set {set}: the key must be section.key, e.g. train.lr"))?;
        let Some(toml::Value::Table(known_section)) = known.get(section) else {
            let sections: Vec<_> = known.keys().map(String::as_str).collect();
            bail!("--set {set}: unknown section `{section}`; sections are {}", sections.join(", "));
        };
        if !known_section.contains_key(field) && !UNSET_BY_DEFAULT.contains(&(section, field)) {
            let mut keys: Vec<_> = known_section.keys().map(String::as_str).collect();
            keys.extend(UNSET_BY_DEFAULT.iter().filter(|(s, _)| *s == section).map(|(_, f)| *f));
            keys.sort_unstable();
            bail!("--set {set}: unknown key `{field}` in [{section}]; keys are {}", keys.join(", "));
        }
        let Some(toml::Value::Table(sec)) = table.get_mut(section) else { unreachable!("all sections encode") };
        sec.insert(field.to_string(), value);
        Config::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| anyhow::anyhow!("--set {set}: invalid value for {key}: {}", e.message().trim()))?;
    }
    Ok(Config::deserialize(toml::Value::Table(table))?)
}

/// `key=value` with `value` read as TOML, or as a string when it is a bare word.
fn parse_set(set: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = set.split_once('=').with_context(|| format!("--set {set}: expected section.key=value"))?;
    let key = key.trim().to_string();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    Ok((key, value))
}

impl Config {
    /// Range checks the types cannot express. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        fn check(ok: bool, key: &str, what: impl fmt::Display) -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("{key}: {what}")
            }
        }
        let d = &self.dataset;
        check(
            d.test_fraction > 0.0 && d.test_fraction < 1.0,
            "dataset.test_fraction",
            format!("{} must be in (0, 1)", d.test_fraction),
        )?;
        let i = &self.image;
        check(i.width >= 8 && i.width <= 4096, "image.width", format!("{} must be in 8..=4096", i.width))?;
        check(i.height >= 8 && i.height <= 4096, "image.height", format!("{} must be in 8..=4096", i.height))?;
        check(i.std.iter().all(|s| *s > 0.0), "image.std", "every entry must be > 0")?;
        check(i.mean.iter().chain(&i.std).all(|v| v.is_finite()), "image.mean/std", "must be finite")?;
        check(
            i.val_resize_size == 0 || i.val_resize_size >= i.width.max(i.height),
            "image.val_resize_size",
            format!("{} must be 0 (auto) or at least max(width, height) to crop from", i.val_resize_size),
        )?;
        check(
            i.cache_size <= 8192,
            "image.cache_size",
            format!("{} is larger than any image sac caches", i.cache_size),
        )?;
        let a = &self.augment;
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
        let (min_w, min_h) = crate::models::min_input_size(self.model.name);
        check(
            i.width >= min_w && i.height >= min_h,
            "image.width/height",
            format!("{}x{} is below {}'s minimum input of {min_w}x{min_h}", i.width, i.height, self.model.name),
        )?;
        let t = &self.train;
        check(t.epochs >= 1, "train.epochs", "must be at least 1")?;
        check(t.batch_size >= 1, "train.batch_size", "must be at least 1")?;
        check(t.lr > 0.0 && t.lr.is_finite(), "train.lr", format!("{} must be > 0", t.lr))?;
        check((0.0..1.0).contains(&t.momentum), "train.momentum", format!("{} must be in [0, 1)", t.momentum))?;
        check(
            !t.nesterov || (t.optimizer == OptimizerKind::Sgd && t.momentum > 0.0),
            "train.nesterov",
            "needs optimizer = \"sgd\" and momentum > 0",
        )?;
        for (key, wd) in
            [("train.weight_decay", Some(t.weight_decay)), ("train.norm_weight_decay", t.norm_weight_decay)]
        {
            if let Some(wd) = wd {
                check(
                    (0.0..1.0).contains(&wd),
                    key,
                    format!("{wd} must be in [0, 1) (1e-4 and 5e-2 are usual values)"),
                )?;
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
        check(
            !self.evaluate.ema || self.evaluate.checkpoint.as_os_str().is_empty(),
            "evaluate.ema",
            "picks <checkpoint_dir>/<model>/model_ema.safetensors; with evaluate.checkpoint (--checkpoint) name the \
             EMA file itself instead",
        )?;
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
        check(
            (1..=100_000).contains(&self.timeline.steps),
            "timeline.steps",
            format!("{} must be from 1 to 100000 (steps or batches in the window)", self.timeline.steps),
        )?;
        check(t.prefetch <= 16, "train.prefetch", format!("{} batches ahead is too many (at most 16)", t.prefetch))?;
        check(t.threads <= 1024, "train.threads", format!("{} is not a plausible thread count", t.threads))?;
        check(self.evaluate.batch_size >= 1, "evaluate.batch_size", "must be at least 1")?;
        check(
            self.evaluate.decode_threads <= 1024,
            "evaluate.decode_threads",
            format!("{} is not a plausible thread count", self.evaluate.decode_threads),
        )?;
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.paths.data_dir);
        abs(&mut self.paths.checkpoint_dir);
        abs(&mut self.paths.output_dir);
        abs(&mut self.paths.log_file);
        abs(&mut self.dataset.source);
        abs(&mut self.dataset.predict_source);
        abs(&mut self.model.pretrained);
        abs(&mut self.evaluate.checkpoint);
        abs(&mut self.timeline.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = parse_with_sets("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.dataset.sample, Sample::Fraction(0.1));
        assert_eq!(c.train.lr, 4e-4);
    }

    #[test]
    fn committed_config_parses_and_validates() {
        let text = include_str!("../config.toml");
        let c = parse_with_sets(text, &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.model.name, Arch::Resnet18);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse_with_sets("[train]\nepochs = 2\nlearning_rate = 0.1\n", &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("learning_rate"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn precision_is_f32_bf16_or_auto_for_train_and_evaluate_and_a_bad_one_is_named() {
        let c = parse_with_sets("", &[]).unwrap();
        assert_eq!((c.train.precision, c.evaluate.precision), (Precision::F32, Precision::F32));
        assert_eq!(c.train.channels_last, ChannelsLast::Auto);
        let c = parse_with_sets(
            "[train]\nprecision = \"bf16\"\nchannels_last = false\n[evaluate]\nprecision = \"auto\"\n",
            &["evaluate.channels_last=true".into()],
        )
        .unwrap();
        assert_eq!((c.train.precision, c.train.channels_last), (Precision::Bf16, ChannelsLast::Off));
        assert_eq!((c.evaluate.precision, c.evaluate.channels_last), (Precision::Auto, ChannelsLast::On));
        let c = parse_with_sets("", &["train.precision=\"auto\"".into()]).unwrap();
        assert_eq!(c.train.precision, Precision::Auto);
        let msg = format!("{:#}", parse_with_sets("[train]\nprecision = \"fp16\"\n", &[]).unwrap_err());
        assert!(msg.contains("precision") && msg.contains("fp16") && msg.contains("bf16"), "{msg}");
    }

    #[test]
    fn overlap_is_true_false_or_auto_in_the_file_and_in_sets() {
        for (text, want) in
            [("true", Overlap::On), ("false", Overlap::Off), ("\"auto\"", Overlap::Auto), ("\"AUTO\"", Overlap::Auto)]
        {
            let c = parse_with_sets(&format!("[train]\noverlap = {text}\n"), &[]).unwrap();
            assert_eq!(c.train.overlap, want, "{text}");
            let c = parse_with_sets("", &[format!("train.overlap={text}")]).unwrap();
            assert_eq!(c.train.overlap, want, "--set {text}");
        }
        let msg = format!("{:#}", parse_with_sets("[train]\noverlap = \"yes\"\n", &[]).unwrap_err());
        assert!(msg.contains("overlap") && msg.contains("\"auto\"") && msg.contains("yes"), "{msg}");
        assert!(Overlap::Auto.hooks() && Overlap::On.hooks() && !Overlap::Off.hooks());
    }

    #[test]
    fn wrong_type_is_named() {
        let msg = format!("{:#}", parse_with_sets("[train]\nepochs = \"many\"\n", &[]).unwrap_err());
        assert!(msg.contains("epochs") || msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn set_overrides_any_key_and_reads_toml_values() {
        let sets = vec!["train.lr=0.01".into(), "model.name=vgg".into(), "image.mean=[0.5,0.5,0.5]".into()];
        let c = parse_with_sets("", &sets).unwrap();
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.model.name, Arch::Vgg);
        assert_eq!(c.image.mean, [0.5; 3]);
    }

    #[test]
    fn set_with_unknown_key_lists_the_valid_ones() {
        let msg = format!("{:#}", parse_with_sets("", &["train.epoch=3".into()]).unwrap_err());
        assert!(msg.contains("unknown key `epoch`") && msg.contains("epochs"), "{msg}");
        let msg = format!("{:#}", parse_with_sets("", &["trian.epochs=3".into()]).unwrap_err());
        assert!(msg.contains("unknown section `trian`"), "{msg}");
    }

    #[test]
    fn set_with_bad_value_names_the_key() {
        let msg = format!("{:#}", parse_with_sets("", &["model.name=resnet99".into()]).unwrap_err());
        assert!(msg.contains("model.name") && msg.contains("resnet18"), "{msg}");
    }

    #[test]
    fn sample_is_a_fraction_or_a_count() {
        assert_eq!("0.1".parse::<Sample>().unwrap(), Sample::Fraction(0.1));
        assert_eq!("1.0".parse::<Sample>().unwrap(), Sample::Fraction(1.0));
        assert_eq!("500".parse::<Sample>().unwrap(), Sample::Count(500));
        assert!("1.5".parse::<Sample>().unwrap_err().contains("(0, 1]"));
        assert!("0.0".parse::<Sample>().is_err());
        assert!("-0.2".parse::<Sample>().is_err());
        assert!("0".parse::<Sample>().is_err());
        assert_eq!(Sample::Fraction(0.1).count_of(70_000), 7_000);
        assert_eq!(Sample::Count(10).count_of(3), 3);
        let msg = format!("{:#}", parse_with_sets("[dataset]\nsample = 1.5\n", &[]).unwrap_err());
        assert!(msg.contains("sample") && msg.contains("(0, 1]"), "{msg}");
    }

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

    #[test]
    fn cache_is_a_switch_auto_or_a_byte_budget() {
        let cache = |v: &str| parse_with_sets(&format!("[train]\ncache = {v}\n"), &[]).map(|c| c.train.cache);
        assert_eq!(cache("false").unwrap(), Cache::Off);
        assert_eq!(cache("true").unwrap(), Cache::All);
        assert_eq!(cache("\"auto\"").unwrap(), Cache::Auto);
        assert_eq!(cache("\"4 GiB\"").unwrap(), Cache::Bytes(4 << 30));
        assert_eq!(cache("\"1.5GB\"").unwrap(), Cache::Bytes(1_500_000_000));
        assert_eq!(cache("1000").unwrap(), Cache::Bytes(1000));
        let msg = format!("{:#}", cache("\"4 GiBs\"").unwrap_err());
        assert!(msg.contains("unknown unit `gibs`"), "{msg}");
        let msg = format!("{:#}", cache("\"lots\"").unwrap_err());
        assert!(msg.contains("\"auto\" or a size"), "{msg}");
        assert_eq!(Config::default().train.cache, Cache::Auto);
        // Round trip through --set (the config is re-encoded before overrides merge).
        let c = parse_with_sets("[train]\ncache = \"2 MiB\"\n", &["train.lr=0.1".into()]).unwrap();
        assert_eq!(c.train.cache, Cache::Bytes(2 << 20));
        let c = parse_with_sets("", &["train.cache=false".into()]).unwrap();
        assert_eq!(c.train.cache, Cache::Off);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let mut c = Config::default();
        c.resolve_paths(Path::new("/proj"));
        assert_eq!(c.paths.data_dir, Path::new("/proj/data"));
        assert_eq!(c.dataset.source, Path::new("/usr/share/datasets/fashion-mnist"));
        assert!(c.model.pretrained.as_os_str().is_empty());
    }
}
