//! `metrics.jsonl` next to the checkpoint: one JSON object per line, an `interval` every
//! `train.log_every` seconds and at the end of each epoch's steps, an `epoch` after each epoch
//! (the same figures as `state.json`'s history, plus time shares). Readable while the run goes
//! on: `pandas.read_json("checkpoints/resnet18/metrics.jsonl", lines=True)`.
//!
//! Each line goes out in one `write` to a file opened for appending, so a reader sees whole
//! lines. `--resume` keeps the lines of the epochs the checkpoint holds and drops those of the
//! epoch that was cut short (it is trained again), so intervals are neither missing nor doubled.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::record::EpochRecord;

pub const FILE: &str = "metrics.jsonl";

/// Where rank 0's time of an interval or epoch went, as fractions of their sum.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Shares {
    pub data: f64,
    pub compute: f64,
    pub exchange: f64,
    /// The part of `exchange` rank 0 spent waiting for the other ranks to arrive (slower ranks,
    /// uneven shards); the rest moved the sums. Measured with the exchange after backward only
    /// (`train.overlap = false`): 0 with overlap. Absent in files of older versions.
    #[serde(default)]
    pub exchange_wait: f64,
    pub optimizer: f64,
}

/// Some steps of an epoch: `interval_steps` steps ending at `step` (1-based) of `steps`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Interval {
    pub unix_time: f64,
    pub epoch: u32,
    pub step: usize,
    pub steps: usize,
    pub interval_steps: usize,
    /// Optimizer steps since the run began (all epochs, the resumed ones included).
    pub global_step: i64,
    /// Images of all ranks in the interval, and their mean loss (null if every step of the
    /// interval was left out as non-finite).
    pub images: u64,
    pub loss: Option<f64>,
    pub seconds: f64,
    pub images_per_second: f64,
    pub epoch_images_per_second: f64,
    pub lr: f64,
    /// Seconds since this run (process) started, and estimated seconds left.
    pub elapsed: f64,
    pub eta_epoch: f64,
    pub eta_run: f64,
    #[serde(flatten)]
    pub shares: Shares,
}

/// One finished epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Epoch {
    pub unix_time: f64,
    pub global_step: i64,
    #[serde(flatten)]
    pub record: EpochRecord,
    pub validation_seconds: f64,
    #[serde(flatten)]
    pub shares: Shares,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Line {
    Interval(Interval),
    Epoch(Epoch),
}

impl Line {
    fn epoch(&self) -> u32 {
        match self {
            Line::Interval(i) => i.epoch,
            Line::Epoch(e) => e.record.epoch,
        }
    }
}

pub fn unix_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Reads `metrics.jsonl`; lines that do not parse (a line cut by a crash) are left out.
pub fn read(path: &Path) -> Vec<Line> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The open stream (rank 0 only).
pub struct Stream {
    path: PathBuf,
    file: File,
    /// Written beside `metrics.jsonl` until `publish` (a run that replaces an old one keeps the
    /// old run's stream until it has saved an epoch of its own).
    unpublished: Option<PathBuf>,
}

impl Stream {
    /// Starts `dir/metrics.jsonl` afresh, or (`resumed_after: Some(n)`) keeps its lines of
    /// epochs 1..=n and drops the rest (rewritten through a temporary file and a rename).
    /// `defer`: a fresh stream goes to a file beside it until `publish`.
    pub fn open(dir: &Path, resumed_after: Option<u32>, defer: bool) -> Result<Stream> {
        let target = dir.join(FILE);
        let defer = defer && resumed_after.is_none();
        let path = if defer { dir.join(format!(".{FILE}.new")) } else { target.clone() };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let kept: Vec<Line> = match resumed_after {
            Some(n) => read(&target).into_iter().filter(|l| l.epoch() <= n).collect(),
            None => Vec::new(),
        };
        let mut text = String::new();
        for l in &kept {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        crate::infra::files::replace_with(&path, |tmp| Ok(std::fs::write(tmp, &text)?))?;
        let file =
            OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(match defer {
            true => Stream { path: target, file, unpublished: Some(path) },
            false => Stream { path, file, unpublished: None },
        })
    }

    /// Puts a deferred stream in place of the old one (a rename: the open file goes on).
    pub fn publish(&mut self) -> Result<()> {
        if let Some(new) = self.unpublished.take() {
            std::fs::rename(&new, &self.path)
                .with_context(|| format!("renaming {} to {}", new.display(), self.path.display()))?;
        }
        Ok(())
    }

    /// Appends one line (one write call).
    pub fn append(&mut self, line: &Line) -> Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        self.file.write_all(&bytes).with_context(|| format!("appending to {}", self.path.display()))
    }

    /// The file written now (beside `path` until published).
    pub fn current(&self) -> &Path {
        self.unpublished.as_deref().unwrap_or(&self.path)
    }

    /// Where the stream is (or will be, once published).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The intervals' losses as (epochs done, loss) points for `training.png`: the end of step s of
/// epoch e is at e - 1 + s / steps.
pub fn loss_points(lines: &[Line]) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| match l {
            Line::Interval(i) => i
                .loss
                .filter(|l| l.is_finite())
                .map(|loss| (f64::from(i.epoch) - 1.0 + i.step as f64 / i.steps.max(1) as f64, loss)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(epoch: u32, step: usize) -> Line {
        Line::Interval(Interval {
            unix_time: 1.0,
            epoch,
            step,
            steps: 4,
            interval_steps: 2,
            global_step: 7,
            images: 128,
            loss: Some(2.5),
            seconds: 1.0,
            images_per_second: 128.0,
            epoch_images_per_second: 120.0,
            lr: 4e-4,
            elapsed: 3.0,
            eta_epoch: 1.0,
            eta_run: 9.0,
            shares: Shares { data: 0.1, compute: 0.7, exchange: 0.15, exchange_wait: 0.05, optimizer: 0.05 },
        })
    }

    fn epoch(n: u32) -> Line {
        Line::Epoch(Epoch {
            unix_time: 2.0,
            global_step: 4 * i64::from(n),
            record: EpochRecord {
                epoch: n,
                train_loss: 1.0,
                val_loss: None,
                top1: Some(0.5),
                top5: None,
                images_per_second: 100.0,
                seconds: 2.0,
                skipped_images: 0,
                nonfinite_steps: 0,
                lr: Some(4e-4),
                ema_top1: None,
                precision: None,
                device: None,
            },
            validation_seconds: 0.5,
            shares: Shares::default(),
        })
    }

    #[test]
    fn lines_are_flat_json_objects_tagged_by_kind() {
        let v: serde_json::Value = serde_json::to_value(interval(1, 2)).unwrap();
        assert_eq!(v["kind"], "interval");
        assert_eq!(v["compute"], 0.7, "shares are top-level columns for pandas");
        let v: serde_json::Value = serde_json::to_value(epoch(1)).unwrap();
        assert_eq!(v["kind"], "epoch");
        assert_eq!(v["train_loss"], 1.0, "the epoch record's fields are top-level columns");
        assert_eq!(serde_json::from_value::<Line>(v).unwrap(), epoch(1));
    }

    #[test]
    fn resuming_keeps_the_saved_epochs_and_drops_the_cut_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Stream::open(dir.path(), None, false).unwrap();
        for l in [interval(1, 2), interval(1, 4), epoch(1), interval(2, 2)] {
            s.append(&l).unwrap();
        }
        // A crash cut the last line in half.
        s.file.write_all(b"{\"kind\":\"interval\",\"ep").unwrap();
        drop(s);
        let mut s = Stream::open(dir.path(), Some(1), false).unwrap();
        assert_eq!(read(s.path()), [interval(1, 2), interval(1, 4), epoch(1)]);
        s.append(&interval(2, 2)).unwrap();
        assert_eq!(read(s.path()).len(), 4);
        let mut replacing = Stream::open(dir.path(), None, true).unwrap();
        replacing.append(&interval(1, 2)).unwrap();
        assert_eq!(read(replacing.path()).len(), 4, "the old run's stream stays until the new one is published");
        replacing.publish().unwrap();
        assert_eq!(read(replacing.path()), [interval(1, 2)]);
        replacing.append(&interval(1, 4)).unwrap();
        assert_eq!(read(replacing.path()).len(), 2, "appending goes on after the rename");
        let fresh = Stream::open(dir.path(), None, false).unwrap();
        assert!(read(fresh.path()).is_empty(), "a new run starts a new stream");
    }

    #[test]
    fn loss_points_sit_at_fractions_of_epochs() {
        assert_eq!(loss_points(&[interval(2, 2), epoch(2)]), [(1.5, 2.5)]);
    }
}
