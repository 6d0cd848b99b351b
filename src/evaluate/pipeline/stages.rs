//! The batches that travel between the stages, the four stages (plain functions on a batch) and
//! what they share.
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::ModuleT;
use tch::{Device, Kind};

use crate::config::OnBadImage;
use crate::data::{self, Geometry, Row};
use crate::evaluate::metrics::Prediction;
use crate::precision::Numerics;

/// Batches a link may hold ahead of its consumer.
pub const IN_FLIGHT: usize = 2;

/// An image that could not be read or decoded: its row and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub row: usize,
    pub error: String,
}

/// What travels with every batch: its rows (indices into test.csv), their paths (for messages
/// from ranks that never read test.csv) and labels (-1: none).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Meta {
    pub seq: u64,
    pub rows: Vec<usize>,
    pub paths: Vec<String>,
    pub labels: Vec<i64>,
    pub failed: Vec<Failure>,
}

/// Keeps the entries of `v` whose flag in `ok` is set.
fn retain_flagged<T>(v: &mut Vec<T>, ok: &[bool]) {
    let mut it = ok.iter();
    v.retain(|_| *it.next().expect("one flag per entry"));
}

impl Meta {
    /// Drops entry `i` (it failed) and records why.
    fn fail(&mut self, i: usize, error: String) {
        self.failed.push(Failure { row: self.rows[i], error });
    }

    fn keep(&mut self, ok: &[bool]) {
        retain_flagged(&mut self.rows, ok);
        retain_flagged(&mut self.paths, ok);
        retain_flagged(&mut self.labels, ok);
    }
}

pub struct RawBatch {
    pub meta: Meta,
    pub files: Vec<Vec<u8>>,
}

pub struct DecodedBatch {
    pub meta: Meta,
    /// `rows.len()` RGB HWC images, concatenated.
    pub pixels: Vec<u8>,
}

pub struct TensorBatch {
    pub meta: Meta,
    pub values: Vec<f32>,
}

pub struct ResultBatch {
    pub meta: Meta,
    pub preds: Vec<Prediction>,
}

/// What every batch has: its `Meta`.
pub trait Batch {
    fn meta(&self) -> &Meta;
}

macro_rules! batch_with_meta {
    ($($t:ty),*) => {$(
        impl Batch for $t {
            fn meta(&self) -> &Meta {
                &self.meta
            }
        }
    )*};
}
batch_with_meta!(RawBatch, DecodedBatch, TensorBatch, ResultBatch);

/// Busy time and images of one stage.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StageStats {
    pub busy: f64,
    pub images: u64,
}

/// Per-rank report after the pipeline: its stage's stats and its CPU time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RankReport {
    pub stage: Option<Stage>,
    pub stats: StageStats,
    pub cpu_seconds: f64,
    /// The process's peak memory (MiB) and CPU time so far, for the closing log line.
    #[serde(default)]
    pub peak_rss_mib: f64,
    #[serde(default)]
    pub process_cpu_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Read,
    Decode,
    Normalize,
    Predict,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Read, Stage::Decode, Stage::Normalize, Stage::Predict];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Decode => "decode",
            Stage::Normalize => "normalize",
            Stage::Predict => "predict",
        }
    }

    pub fn of_rank(rank: usize) -> Stage {
        match rank {
            0 => Stage::Read,
            1 => Stage::Decode,
            2 => Stage::Normalize,
            _ => Stage::Predict,
        }
    }
}

/// What every stage needs to know.
pub struct Ctx<'a> {
    pub root: &'a Path,
    pub geometry: Geometry,
    pub on_bad: OnBadImage,
    /// The split's CSV file name, for messages.
    pub csv: &'a str,
    /// Threads of the decode stage.
    pub decode_threads: usize,
    /// The timeline records batches 0..trace_batches (0: no timeline).
    pub trace_batches: u64,
}

impl Ctx<'_> {
    /// A timeline span of batch `seq` (0-based; shown 1-based, as train's steps) from `start` to
    /// now (when the batch is in the window); returns now.
    pub(super) fn mark(&self, cat: &str, name: &str, start: Instant, seq: u64) -> Instant {
        if seq < self.trace_batches {
            crate::infra::timeline::since(cat, name, start, Some(seq + 1))
        } else {
            Instant::now()
        }
    }

    fn bad(&self, what: &str, row: usize, rel: &str, e: &anyhow::Error) -> Result<String> {
        let msg = format!("{}: {e:#}", self.root.join(rel).display());
        if self.on_bad == OnBadImage::Fail {
            bail!("cannot {what} {} row {} ({msg}) and train.on_bad_image = \"fail\"", self.csv, row + 2);
        }
        tracing::warn!("skipping {msg}");
        Ok(msg)
    }
}

/// Stage 1: the files' bytes.
pub fn read(ctx: &Ctx, rows: &[Row], seq: u64, idx: &[usize]) -> Result<RawBatch> {
    let mut meta = Meta {
        seq,
        rows: idx.to_vec(),
        paths: idx.iter().map(|&i| rows[i].path.clone()).collect(),
        labels: idx.iter().map(|&i| rows[i].label).collect(),
        failed: vec![],
    };
    let mut files = Vec::with_capacity(idx.len());
    let mut ok = vec![true; idx.len()];
    for (k, &i) in idx.iter().enumerate() {
        let path = ctx.root.join(&rows[i].path);
        match std::fs::read(&path) {
            Ok(b) => files.push(b),
            Err(e) => {
                let msg = ctx.bad("read", i, &rows[i].path, &anyhow::Error::new(e))?;
                meta.fail(k, msg);
                ok[k] = false;
            }
        }
    }
    meta.keep(&ok);
    Ok(RawBatch { meta, files })
}

/// Stage 2: decode and resize, the batch's images shared among `ctx.decode_threads` threads.
pub fn decode(ctx: &Ctx, mut b: RawBatch) -> Result<DecodedBatch> {
    let mut pixels = Vec::with_capacity(b.files.len() * ctx.geometry.image_bytes());
    let mut ok = vec![true; b.files.len()];
    let decode_all = |files: &[Vec<u8>]| -> Vec<Result<Vec<u8>>> {
        files.iter().map(|bytes| data::decode_resize(bytes, &ctx.geometry)).collect()
    };
    let threads = ctx.decode_threads.clamp(1, b.files.len().max(1));
    let decoded: Vec<Result<Vec<u8>>> = if threads == 1 {
        decode_all(&b.files)
    } else {
        let per = b.files.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = b.files.chunks(per).map(|part| s.spawn(move || decode_all(part))).collect();
            parts.into_iter().flat_map(|h| h.join().expect("a decode thread panicked")).collect()
        })
    };
    for (k, result) in decoded.into_iter().enumerate() {
        match result {
            Ok(img) => pixels.extend_from_slice(&img),
            Err(e) => {
                let msg = ctx.bad("decode", b.meta.rows[k], &b.meta.paths[k], &e)?;
                b.meta.fail(k, msg);
                ok[k] = false;
            }
        }
    }
    b.meta.keep(&ok);
    Ok(DecodedBatch { meta: b.meta, pixels })
}

/// Stage 3: normalized float CHW values.
pub fn normalize(ctx: &Ctx, b: DecodedBatch) -> TensorBatch {
    let images: Vec<&[u8]> = b.pixels.chunks_exact(ctx.geometry.image_bytes()).collect();
    let mut values = Vec::new();
    data::normalize_into(&images, &ctx.geometry, &mut values);
    TensorBatch { meta: b.meta, values }
}

/// Stage 4: forward pass; top-k labels and the loss of labeled images.
/// Libtorch's errors here (out of memory on a GPU, say) are panics, as everywhere in tch: the
/// panic hook names the rank and ends the job.
pub fn predict(
    net: &dyn ModuleT,
    classes: usize,
    device: Device,
    numerics: &Numerics,
    g: &Geometry,
    b: TensorBatch,
) -> ResultBatch {
    let n = b.meta.rows.len();
    if n == 0 {
        return ResultBatch { meta: b.meta, preds: vec![] };
    }
    let preds = tch::no_grad(|| {
        let x = data::batch_tensor(&b.values, n, g).to_device(device);
        let logits = numerics.forward(net, &x, false).unwrap_or_else(|e| panic!("{e:#}"));
        let logp = logits.log_softmax(1, Kind::Float).to_device(Device::Cpu);
        let k = classes.min(5) as i64;
        let (_, top) = logp.topk(k, 1, true, true);
        let top = Vec::<i64>::try_from(top.reshape([-1])).expect("int64 indices");
        let logp_flat = Vec::<f32>::try_from(logp.reshape([-1])).expect("float");
        (0..n)
            .map(|i| {
                let label = usize::try_from(b.meta.labels[i]).ok();
                Prediction {
                    row: b.meta.rows[i],
                    label,
                    top: top[i * k as usize..(i + 1) * k as usize].iter().map(|&c| c as usize).collect(),
                    loss: label.map(|y| -logp_flat[i * classes + y]),
                }
            })
            .collect()
    });
    ResultBatch { meta: b.meta, preds }
}

/// Everything the pipeline produced, on the coordinating rank.
#[derive(Default)]
pub struct Outcome {
    pub preds: Vec<Prediction>,
    pub failed: Vec<Failure>,
    pub stats: Vec<(Stage, StageStats)>,
}

impl Outcome {
    /// Takes in one batch's results (and its failed images), counting them on `progress`.
    pub fn absorb(&mut self, r: ResultBatch, progress: &mut crate::infra::logging::Progress) {
        progress.inc((r.meta.failed.len() + r.preds.len()) as u64);
        self.failed.extend(r.meta.failed);
        self.preds.extend(r.preds);
    }
}

/// Runs a stage's work on batch `seq`: its busy time and images go into `stats`, and a span named
/// after the stage into the timeline.
pub(super) fn timed<T>(
    ctx: &Ctx,
    stats: &mut StageStats,
    stage: Stage,
    seq: u64,
    images: usize,
    f: impl FnOnce() -> T,
) -> T {
    let t = Instant::now();
    let out = f();
    stats.busy += ctx.mark(stage.name(), stage.name(), t, seq).duration_since(t).as_secs_f64();
    stats.images += images as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_rows_leave_the_batch_and_are_recorded() {
        let mut m = Meta {
            seq: 0,
            rows: vec![7, 8, 9],
            paths: vec!["a".into(), "b".into(), "c".into()],
            labels: vec![0, 1, 2],
            failed: vec![],
        };
        m.fail(1, "corrupt".into());
        m.keep(&[true, false, true]);
        assert_eq!(m.rows, [7, 9]);
        assert_eq!(m.labels, [0, 2]);
        assert_eq!(m.paths, ["a", "c"]);
        assert_eq!(m.failed, [Failure { row: 8, error: "corrupt".into() }]);
    }
}
