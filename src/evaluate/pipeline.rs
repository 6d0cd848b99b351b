//! The stages of evaluation and the messages between them.
//!
//! read (file bytes) → decode (+ resize) → normalize (float CHW) → predict (top-k, loss).
//! Each stage is a plain function on a batch, so the same code runs as MPI ranks (`mpi_pipeline`)
//! or as threads of one process (`local_pipeline`). Both keep a bounded number of batches in
//! flight (credits), so memory stays bounded whatever the size of the test set.
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tch::nn::ModuleT;
use tch::{Device, Kind};

use super::metrics::Prediction;
use crate::config::OnBadImage;
use crate::data::{self, Geometry, Row};
use crate::dist::Dist;
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
    fn mark(&self, cat: &str, name: &str, start: Instant, seq: u64) -> Instant {
        if seq < self.trace_batches {
            crate::timeline::since(cat, name, start, Some(seq + 1))
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

/// Runs a stage's work on batch `seq`: its busy time and images go into `stats`, and a span named
/// after the stage into the timeline.
fn timed<T>(ctx: &Ctx, stats: &mut StageStats, stage: Stage, seq: u64, images: usize, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    stats.busy += ctx.mark(stage.name(), stage.name(), t, seq).duration_since(t).as_secs_f64();
    stats.images += images as u64;
    out
}

/// All four stages as threads of this process, joined by bounded channels.
pub fn local_pipeline(
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    progress: &mut crate::logging::Progress,
) -> Result<Outcome> {
    let batches: Vec<Vec<usize>> = (0..rows.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    let (tx_raw, rx_raw) = sync_channel::<RawBatch>(IN_FLIGHT);
    let (tx_dec, rx_dec) = sync_channel::<DecodedBatch>(IN_FLIGHT);
    let (tx_norm, rx_norm) = sync_channel::<TensorBatch>(IN_FLIGHT);
    let mut out = Outcome::default();
    let mut predict_stats = StageStats::default();
    let (read_stats, decode_stats, normalize_stats) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || -> Result<StageStats> {
            crate::timeline::name_thread(1, "read");
            let mut st = StageStats::default();
            for (seq, idx) in batches.iter().enumerate() {
                let seq = seq as u64;
                let b = timed(ctx, &mut st, Stage::Read, seq, idx.len(), || read(ctx, rows, seq, idx))?;
                if tx_raw.send(b).is_err() {
                    break; // a later stage stopped: its error is reported
                }
            }
            Ok(st)
        });
        let decoder = s.spawn(move || -> Result<StageStats> {
            crate::timeline::name_thread(2, "decode");
            let mut st = StageStats::default();
            for b in rx_raw {
                let (n, seq) = (b.files.len(), b.meta.seq);
                let d = timed(ctx, &mut st, Stage::Decode, seq, n, || decode(ctx, b))?;
                if tx_dec.send(d).is_err() {
                    break;
                }
            }
            Ok(st)
        });
        let normalizer = s.spawn(move || -> Result<StageStats> {
            crate::timeline::name_thread(3, "normalize");
            let mut st = StageStats::default();
            for b in rx_dec {
                let (n, seq) = (b.meta.rows.len(), b.meta.seq);
                let t = timed(ctx, &mut st, Stage::Normalize, seq, n, || normalize(ctx, b));
                if tx_norm.send(t).is_err() {
                    break;
                }
            }
            Ok(st)
        });
        crate::timeline::name_thread(0, "predict");
        for b in rx_norm {
            let (n, seq) = (b.meta.rows.len(), b.meta.seq);
            let r = timed(ctx, &mut predict_stats, Stage::Predict, seq, n, || predictor(b));
            progress.inc((r.meta.failed.len() + r.preds.len()) as u64);
            out.failed.extend(r.meta.failed);
            out.preds.extend(r.preds);
        }
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<StageStats>>| -> Result<StageStats> {
            h.join().map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))?
        };
        Ok((join(reader)?, join(decoder)?, join(normalizer)?))
    })?;
    out.stats = vec![
        (Stage::Read, read_stats),
        (Stage::Decode, decode_stats),
        (Stage::Normalize, normalize_stats),
        (Stage::Predict, predict_stats),
    ];
    Ok(out)
}

// ---- the MPI pipeline ----------------------------------------------------------------------

const TAG_FORWARD: i32 = 10;
const TAG_CREDIT: i32 = 11;
const TAG_RESULT: i32 = 12;
const KIND_DATA: u8 = 1;
const KIND_END: u8 = 2;

/// `[kind][header length u32][header JSON][payload]`.
fn encode<H: Serialize>(kind: u8, header: &H, payload: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("serializable header");
    let mut out = Vec::with_capacity(5 + h.len() + payload.len());
    out.push(kind);
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    out
}

/// The header and payload of a data message; None for the end of the stream.
fn decode_msg<H: DeserializeOwned>(bytes: &[u8]) -> Result<Option<(H, &[u8])>> {
    let kind = *bytes.first().context("empty message")?;
    if kind == KIND_END {
        return Ok(None);
    }
    let len = u32::from_le_bytes(bytes.get(1..5).context("short message")?.try_into().expect("4 bytes")) as usize;
    let header =
        serde_json::from_slice(bytes.get(5..5 + len).context("short message")?).context("bad message header")?;
    Ok(Some((header, &bytes[5 + len..])))
}

fn end_msg() -> Vec<u8> {
    vec![KIND_END]
}

#[derive(Serialize, Deserialize)]
struct RawHeader {
    meta: Meta,
    lens: Vec<usize>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// A `Prediction` on the wire: (row, label, top-k labels, loss).
type WirePrediction = (usize, Option<usize>, Vec<usize>, Option<f32>);

#[derive(Serialize, Deserialize)]
struct ResultMsg {
    meta: Meta,
    preds: Vec<WirePrediction>,
}

/// Receives one credit (or predictor request) from `src`: returns the sender.
fn take_credit(dist: &Dist, src: Option<usize>) -> usize {
    dist.recv_bytes(src, TAG_CREDIT).0
}

fn give_credit(dist: &Dist, dest: usize) {
    dist.send_bytes(dest, TAG_CREDIT, &[]);
}

/// This rank's part of the MPI pipeline (N ≥ 4). Rank 0 returns the outcome, others None.
pub fn mpi_pipeline(
    dist: &Dist,
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    progress: &mut crate::logging::Progress,
) -> Result<(Option<Outcome>, StageStats)> {
    let n = dist.size();
    let mut st = StageStats::default();
    match Stage::of_rank(dist.rank()) {
        Stage::Read => {
            let batches: Vec<Vec<usize>> =
                (0..rows.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
            let mut out = Outcome::default();
            let predictors = n - 3;
            let mut ended = 0;
            let mut credits_left = IN_FLIGHT + batches.len(); // the decoder sends this many in all
            let mut collect = |out: &mut Outcome, ended: &mut usize| -> Result<bool> {
                // Drain whatever results have arrived; true if something was received.
                let mut got = false;
                while let Some((_, _, bytes)) = dist.try_recv_bytes(None, TAG_RESULT) {
                    got = true;
                    let Some((msg, _)) = decode_msg::<ResultMsg>(&bytes)? else {
                        *ended += 1;
                        continue;
                    };
                    progress.inc((msg.meta.failed.len() + msg.preds.len()) as u64);
                    out.failed.extend(msg.meta.failed);
                    out.preds.extend(msg.preds.into_iter().map(|(row, label, top, loss)| Prediction {
                        row,
                        label,
                        top,
                        loss,
                    }));
                }
                Ok(got)
            };
            for (seq, idx) in batches.iter().enumerate() {
                let seq = seq as u64;
                // Wait for room at the decoder, collecting results meanwhile.
                let t = Instant::now();
                let mut failed = None;
                dist.poll_recv(Some(1), TAG_CREDIT, || {
                    if dist.try_recv_bytes(Some(1), TAG_CREDIT).is_some() {
                        return Some(());
                    }
                    if let Err(e) = collect(&mut out, &mut ended) {
                        failed = Some(e);
                        return Some(());
                    }
                    None
                });
                if let Some(e) = failed {
                    return Err(e);
                }
                credits_left -= 1;
                ctx.mark("wait", "wait for the decoder", t, seq);
                let b = timed(ctx, &mut st, Stage::Read, seq, idx.len(), || read(ctx, rows, seq, idx))?;
                let lens = b.files.iter().map(Vec::len).collect();
                let payload: Vec<u8> = b.files.concat();
                let msg = encode(KIND_DATA, &RawHeader { meta: b.meta, lens }, &payload);
                // Keep taking results while the batch goes out. Above the MPI library's eager limit
                // a send completes only once the decoder receives it; were rank 0 to wait without
                // receiving, a predictor blocked in sending its result to rank 0 would give no
                // credit back, and decoder, normalizer, predictors and rank 0 could wait on each
                // other in a circle.
                let t = Instant::now();
                let mut failed = None;
                dist.send_bytes_while(1, TAG_FORWARD, &msg, || {
                    if failed.is_none() {
                        if let Err(e) = collect(&mut out, &mut ended) {
                            failed = Some(e);
                        }
                    }
                });
                ctx.mark("send", "send to the decoder (until it takes the batch)", t, seq);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            dist.send_bytes(1, TAG_FORWARD, &end_msg());
            let mut failed = None;
            dist.poll_recv(None, TAG_RESULT, || {
                if let Err(e) = collect(&mut out, &mut ended) {
                    failed = Some(e);
                }
                (failed.is_some() || ended >= predictors).then_some(())
            });
            if let Some(e) = failed {
                return Err(e);
            }
            // The decoder's last credits: take them so no message is left unmatched.
            for _ in 0..credits_left {
                take_credit(dist, Some(1));
            }
            Ok((Some(out), st))
        }
        Stage::Decode => {
            for _ in 0..IN_FLIGHT {
                give_credit(dist, 0);
            }
            loop {
                let t = Instant::now();
                let (_, _, bytes) = dist.recv_bytes(Some(0), TAG_FORWARD);
                let Some((h, payload)) = decode_msg::<RawHeader>(&bytes)? else {
                    dist.send_bytes(2, TAG_FORWARD, &end_msg());
                    break;
                };
                let mut files = Vec::with_capacity(h.lens.len());
                let mut off = 0;
                for len in h.lens {
                    files.push(payload[off..off + len].to_vec());
                    off += len;
                }
                let (images, seq) = (files.len(), h.meta.seq);
                ctx.mark("wait", "receive from the reader", t, seq);
                let d =
                    timed(ctx, &mut st, Stage::Decode, seq, images, || decode(ctx, RawBatch { meta: h.meta, files }))?;
                let t = Instant::now();
                take_credit(dist, Some(2));
                let t = ctx.mark("wait", "wait for the normalizer", t, seq);
                dist.send_bytes(2, TAG_FORWARD, &encode(KIND_DATA, &d.meta, &d.pixels));
                ctx.mark("send", "send to the normalizer (until it takes the batch)", t, seq);
                give_credit(dist, 0);
            }
            // The normalizer gives IN_FLIGHT credits up front and one per batch; `batches` were used.
            for _ in 0..IN_FLIGHT {
                take_credit(dist, Some(2));
            }
            Ok((None, st))
        }
        Stage::Normalize => {
            for _ in 0..IN_FLIGHT {
                give_credit(dist, 1);
            }
            let predictors: Vec<usize> = (3..n).collect();
            let mut sent = vec![0usize; n];
            let mut requests = vec![0usize; n];
            loop {
                let t = Instant::now();
                let (_, _, bytes) = dist.recv_bytes(Some(1), TAG_FORWARD);
                let Some((meta, payload)) = decode_msg::<Meta>(&bytes)? else {
                    for &p in &predictors {
                        dist.send_bytes(p, TAG_FORWARD, &end_msg());
                    }
                    break;
                };
                let (images, seq) = (meta.rows.len(), meta.seq);
                ctx.mark("wait", "receive from the decoder", t, seq);
                let b = timed(ctx, &mut st, Stage::Normalize, seq, images, || {
                    normalize(ctx, DecodedBatch { meta, pixels: payload.to_vec() })
                });
                // Work on demand: the first predictor that asks gets the batch.
                let t = Instant::now();
                let p = take_credit(dist, None);
                requests[p] += 1;
                sent[p] += 1;
                let t = ctx.mark("wait", "wait for a predictor", t, seq);
                dist.send_bytes(p, TAG_FORWARD, &encode(KIND_DATA, &b.meta, &f32_bytes(&b.values)));
                ctx.mark("send", "send to a predictor (until it takes the batch)", t, seq);
                give_credit(dist, 1);
            }
            // Each predictor asks IN_FLIGHT times up front and once per batch it finishes.
            for &p in &predictors {
                while requests[p] < IN_FLIGHT + sent[p] {
                    take_credit(dist, Some(p));
                    requests[p] += 1;
                }
            }
            Ok((None, st))
        }
        Stage::Predict => {
            for _ in 0..IN_FLIGHT {
                give_credit(dist, 2);
            }
            loop {
                let t = Instant::now();
                let (_, _, bytes) = dist.recv_bytes(Some(2), TAG_FORWARD);
                let Some((meta, payload)) = decode_msg::<Meta>(&bytes)? else {
                    dist.send_bytes(0, TAG_RESULT, &end_msg());
                    break;
                };
                let (images, seq) = (meta.rows.len(), meta.seq);
                ctx.mark("wait", "receive from the normalizer", t, seq);
                crate::fault::point("predict");
                let r = timed(ctx, &mut st, Stage::Predict, seq, images, || {
                    predictor(TensorBatch { meta, values: bytes_f32(payload) })
                });
                let t = Instant::now();
                let msg = ResultMsg {
                    preds: r.preds.into_iter().map(|p| (p.row, p.label, p.top, p.loss)).collect(),
                    meta: r.meta,
                };
                dist.send_bytes(0, TAG_RESULT, &encode(KIND_DATA, &msg, &[]));
                give_credit(dist, 2);
                ctx.mark("send", "send the result to rank 0", t, seq);
            }
            Ok((None, st))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let meta = Meta { seq: 3, rows: vec![4, 5], labels: vec![1, -1], ..Default::default() };
        let bytes = encode(KIND_DATA, &meta, &f32_bytes(&[1.5, -2.0]));
        let (m, payload) = decode_msg::<Meta>(&bytes).unwrap().unwrap();
        assert_eq!((m.rows, bytes_f32(payload)), (vec![4, 5], vec![1.5, -2.0]));
        assert!(decode_msg::<Meta>(&end_msg()).unwrap().is_none());
    }

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
