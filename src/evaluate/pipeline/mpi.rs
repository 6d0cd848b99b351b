//! The pipeline's stages as ranks (4 or more): rank 0 reads, rank 1 decodes, rank 2 normalizes,
//! ranks 3.. predict. Each link holds at most `IN_FLIGHT` batches: a consumer gives credits, a
//! producer sends only against one; results go to rank 0.
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::stages::{decode, normalize, read, timed, Ctx, DecodedBatch, Meta, Outcome, RawBatch, ResultBatch, Stage};
use super::stages::{StageStats, TensorBatch, IN_FLIGHT};
use crate::data::Row;
use crate::evaluate::metrics::Prediction;
use crate::infra::dist::Dist;

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
    progress: &mut crate::infra::logging::Progress,
) -> Result<(Option<Outcome>, StageStats)> {
    let mut st = StageStats::default();
    let outcome = match Stage::of_rank(dist.rank()) {
        Stage::Read => Some(reader(dist, ctx, rows, batch, progress, &mut st)?),
        Stage::Decode => decoder(dist, ctx, &mut st).map(|()| None)?,
        Stage::Normalize => normalizer(dist, ctx, &mut st).map(|()| None)?,
        Stage::Predict => predictor_rank(dist, ctx, predictor, &mut st).map(|()| None)?,
    };
    Ok((outcome, st))
}

/// Rank 0's results from the predictors: what has arrived, how many predictors have ended, and
/// the first error met while collecting inside a wait (returned once the wait is over).
struct Results<'p> {
    out: Outcome,
    ended: usize,
    progress: &'p mut crate::infra::logging::Progress,
    failed: Option<anyhow::Error>,
}

impl Results<'_> {
    /// Drains whatever results have arrived; true if something was received.
    fn collect(&mut self, dist: &Dist) -> Result<bool> {
        let mut got = false;
        while let Some((_, _, bytes)) = dist.try_recv_bytes(None, TAG_RESULT) {
            got = true;
            let Some((msg, _)) = decode_msg::<ResultMsg>(&bytes)? else {
                self.ended += 1;
                continue;
            };
            self.progress.inc((msg.meta.failed.len() + msg.preds.len()) as u64);
            self.out.failed.extend(msg.meta.failed);
            self.out.preds.extend(msg.preds.into_iter().map(|(row, label, top, loss)| Prediction {
                row,
                label,
                top,
                loss,
            }));
        }
        Ok(got)
    }

    /// `collect` inside a wait: keeps the first error; true once there is one.
    fn collect_in_wait(&mut self, dist: &Dist) -> bool {
        if self.failed.is_none() {
            if let Err(e) = self.collect(dist) {
                self.failed = Some(e);
            }
        }
        self.failed.is_some()
    }

    /// The error a wait met, if any.
    fn check(&mut self) -> Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

/// Rank 0: reads the batches' files and sends them to the decoder against its credits, and
/// collects the predictors' results the while, until every predictor has ended.
fn reader(
    dist: &Dist,
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    progress: &mut crate::infra::logging::Progress,
    st: &mut StageStats,
) -> Result<Outcome> {
    let batches: Vec<Vec<usize>> = (0..rows.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    let mut results = Results { out: Outcome::default(), ended: 0, progress, failed: None };
    let mut credits_left = IN_FLIGHT + batches.len(); // the decoder sends this many in all
    for (seq, idx) in batches.iter().enumerate() {
        let seq = seq as u64;
        // Wait for room at the decoder, collecting results meanwhile.
        let t = Instant::now();
        dist.poll_recv(Some(1), TAG_CREDIT, || {
            if dist.try_recv_bytes(Some(1), TAG_CREDIT).is_some() {
                return Some(());
            }
            results.collect_in_wait(dist).then_some(())
        });
        results.check()?;
        credits_left -= 1;
        ctx.mark("wait", "wait for the decoder", t, seq);
        let b = timed(ctx, st, Stage::Read, seq, idx.len(), || read(ctx, rows, seq, idx))?;
        let lens = b.files.iter().map(Vec::len).collect();
        let payload: Vec<u8> = b.files.concat();
        let msg = encode(KIND_DATA, &RawHeader { meta: b.meta, lens }, &payload);
        // Keep taking results while the batch goes out. Above the MPI library's eager limit a send
        // completes only once the decoder receives it; were rank 0 to wait without receiving, a
        // predictor blocked in sending its result to rank 0 would give no credit back, and
        // decoder, normalizer, predictors and rank 0 could wait on each other in a circle.
        let t = Instant::now();
        dist.send_bytes_while(1, TAG_FORWARD, &msg, || {
            results.collect_in_wait(dist);
        });
        ctx.mark("send", "send to the decoder (until it takes the batch)", t, seq);
        results.check()?;
    }
    dist.send_bytes(1, TAG_FORWARD, &end_msg());
    let predictors = dist.size() - 3;
    dist.poll_recv(None, TAG_RESULT, || (results.collect_in_wait(dist) || results.ended >= predictors).then_some(()));
    results.check()?;
    // The decoder's last credits: take them so no message is left unmatched.
    for _ in 0..credits_left {
        take_credit(dist, Some(1));
    }
    Ok(results.out)
}

/// Rank 1: decodes and resizes each batch from the reader and passes it to the normalizer.
fn decoder(dist: &Dist, ctx: &Ctx, st: &mut StageStats) -> Result<()> {
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
        let d = timed(ctx, st, Stage::Decode, seq, images, || decode(ctx, RawBatch { meta: h.meta, files }))?;
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
    Ok(())
}

/// Rank 2: normalizes each decoded batch and gives it to the first predictor that asks.
fn normalizer(dist: &Dist, ctx: &Ctx, st: &mut StageStats) -> Result<()> {
    let n = dist.size();
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
        let b = timed(ctx, st, Stage::Normalize, seq, images, || {
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
    Ok(())
}

/// Ranks 3..: predict each batch the normalizer hands them and send the results to rank 0.
fn predictor_rank(
    dist: &Dist,
    ctx: &Ctx,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    st: &mut StageStats,
) -> Result<()> {
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
        crate::infra::fault::point("predict");
        let r =
            timed(ctx, st, Stage::Predict, seq, images, || predictor(TensorBatch { meta, values: bytes_f32(payload) }));
        let t = Instant::now();
        let msg =
            ResultMsg { preds: r.preds.into_iter().map(|p| (p.row, p.label, p.top, p.loss)).collect(), meta: r.meta };
        dist.send_bytes(0, TAG_RESULT, &encode(KIND_DATA, &msg, &[]));
        give_credit(dist, 2);
        ctx.mark("send", "send the result to rank 0", t, seq);
    }
    Ok(())
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
}
