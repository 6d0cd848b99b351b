//! The value types of the keys (the enums, `Sample`, `Cache`, `EvalSplit`) and how they read and write.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::switch::Switch;

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

impl Format {
    /// The name in the config (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            Format::Coco => "coco",
            Format::Folder => "folder",
            Format::Idx => "idx",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImagePlacement {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Sgd,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    AdamW,
}

impl OptimizerKind {
    /// The name in the config and in the optimizer checkpoint's metadata (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::AdamW => "adamw",
        }
    }
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
            Cache::Bytes(b) => write!(f, "{}", crate::infra::logging::bytes(*b)),
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

/// Which split of the data dir `sac evaluate` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    /// test.csv: labeled; predictions, metrics, per-class scores and the confusion picture.
    Test,
    /// predict.csv (from dataset.predict_source): unlabeled; predictions.csv only.
    Predict,
}

impl EvalSplit {
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Test => "test",
            EvalSplit::Predict => "predict",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::overrides::parse_with_sets;
    use crate::config::{ChannelsLast, Config, Precision};

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
}
