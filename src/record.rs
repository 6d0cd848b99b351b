//! What a training run records: `state.json` ([`State`]) and its per-epoch figures
//! ([`EpochRecord`]), which `metrics.jsonl` and `training.png` show too. Its own module so that
//! train, its progress reports and the plots share the types without importing one another.
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::data::Class;
use crate::models::Arch;

/// One epoch's figures, kept in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: u32,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub images_per_second: f64,
    pub seconds: f64,
    pub skipped_images: u64,
    /// Steps left out because their loss or gradient was not finite (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub nonfinite_steps: u64,
    /// The learning rate of the epoch's last step (absent in checkpoints of sac before the
    /// schedules).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Validation top-1 of the moving average of the weights (`train.ema_decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_top1: Option<f64>,
    /// What the epoch computed in, as resolved from `train.precision`: "f32" or "bf16" (absent in
    /// checkpoints of sac before the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Rank 0's device: "cpu" or "cuda:N".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub epoch: u32,
    pub arch: Arch,
    pub num_classes: usize,
    pub steps: i64,
    pub world_size: usize,
    pub best_epoch: Option<u32>,
    pub best_top1: Option<f64>,
    pub classes: Vec<Class>,
    pub history: Vec<EpochRecord>,
    pub config: Config,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Format, OptimizerKind};
    use crate::models::Arch;

    /// The strings a checkpoint holds are the enums' serde names, and `name()` writes the same
    /// ones: renaming a variant in the code (Vgg → Vgg11Bn) leaves every file readable.
    #[test]
    fn every_name_written_to_disk_is_the_serde_name() {
        let serde_name = |v: serde_json::Value| v.as_str().unwrap().to_string();
        for a in Arch::ALL {
            assert_eq!(serde_name(serde_json::to_value(a).unwrap()), a.name());
        }
        assert_eq!(Arch::Vgg11Bn.name(), "vgg");
        for o in [OptimizerKind::Adam, OptimizerKind::Sgd, OptimizerKind::AdamW] {
            assert_eq!(serde_name(serde_json::to_value(o).unwrap()), o.name());
        }
        for f in [Format::Coco, Format::Folder, Format::Idx] {
            assert_eq!(serde_name(serde_json::to_value(f).unwrap()), f.name());
        }
    }

    /// A state.json written by sac before this module's names were pinned (commit 3742664: a
    /// 2-rank run of 2 epochs) still reads, and writes back the same names.
    #[test]
    fn a_state_written_before_the_change_reads_and_writes_back_alike() {
        let text = include_str!("../tests/fixtures/state-3742664.json");
        let state: State = serde_json::from_str(text).unwrap();
        assert_eq!((state.epoch, state.arch, state.num_classes, state.world_size), (2, Arch::Resnet18, 10, 2));
        assert_eq!(state.config.train.optimizer, OptimizerKind::Adam);
        assert_eq!(state.history.len(), 2);
        let old: serde_json::Value = serde_json::from_str(text).unwrap();
        let new = serde_json::to_value(&state).unwrap();
        for key in ["arch", "num_classes", "classes", "history", "best_epoch"] {
            assert_eq!(old[key], new[key], "{key}");
        }
        assert_eq!(old["config"]["train"]["optimizer"], new["config"]["train"]["optimizer"]);
        assert_eq!(old["config"]["dataset"]["format"], new["config"]["dataset"]["format"]);
    }
}
