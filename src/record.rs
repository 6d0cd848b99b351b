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
