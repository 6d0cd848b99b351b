//! The pipeline's stages as ranks (4 or more): rank 0 reads, rank 1 decodes, rank 2 normalizes,
//! ranks 3.. predict. Each link holds at most `IN_FLIGHT` batches: a consumer gives credits, a
//! producer sends only against one; results go to rank 0.
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::link::{run_decode, run_normalize, run_predict, run_read, Inlet, Outlet};
use super::stages::{Batch, Ctx, DecodedBatch, Meta, Outcome, RawBatch, ResultBatch, Stage, StageStats};
use super::stages::{TensorBatch, IN_FLIGHT};
use crate::data::Row;
use crate::evaluate::metrics::Prediction;
use crate::infra::dist::Dist;

const TAG_FORWARD: i32 = 10;
const TAG_CREDIT: i32 = 11;
const TAG_RESULT: i32 = 12;
const KIND_DATA: u8 = 1;
const KIND_END: u8 = 2;

/// `[kind][header length u32][header JSON][payload]`.
fn encode<H: Serialize>(header: &H, payload: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("serializable header");
    let mut out = Vec::with_capacity(5 + h.len() + payload.len());
    out.push(KIND_DATA);
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

/// A batch as one message between ranks, and back.
trait Wire: Batch + Sized {
    fn to_message(self) -> Vec<u8>;
    /// None for the end of the stream.
    fn from_message(bytes: &[u8]) -> Result<Option<Self>>;
}

#[derive(Serialize, Deserialize)]
struct RawHeader {
    meta: Meta,
    lens: Vec<usize>,
}

impl Wire for RawBatch {
    fn to_message(self) -> Vec<u8> {
        let lens = self.files.iter().map(Vec::len).collect();
        encode(&RawHeader { meta: self.meta, lens }, &self.files.concat())
    }

    fn from_message(bytes: &[u8]) -> Result<Option<Self>> {
        let Some((h, payload)) = decode_msg::<RawHeader>(bytes)? else { return Ok(None) };
        let mut files = Vec::with_capacity(h.lens.len());
        let mut off = 0;
        for len in h.lens {
            files.push(payload.get(off..off + len).context("short message")?.to_vec());
            off += len;
        }
        Ok(Some(RawBatch { meta: h.meta, files }))
    }
}

impl Wire for DecodedBatch {
    fn to_message(self) -> Vec<u8> {
        encode(&self.meta, &self.pixels)
    }

    fn from_message(bytes: &[u8]) -> Result<Option<Self>> {
        Ok(decode_msg::<Meta>(bytes)?.map(|(meta, payload)| DecodedBatch { meta, pixels: payload.to_vec() }))
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

impl Wire for TensorBatch {
    fn to_message(self) -> Vec<u8> {
        encode(&self.meta, &f32_bytes(&self.values))
    }

    fn from_message(bytes: &[u8]) -> Result<Option<Self>> {
        Ok(decode_msg::<Meta>(bytes)?.map(|(meta, payload)| TensorBatch { meta, values: bytes_f32(payload) }))
    }
}

/// A `Prediction` on the wire: (row, label, top-k labels, loss).
type WirePrediction = (usize, Option<usize>, Vec<usize>, Option<f32>);

#[derive(Serialize, Deserialize)]
struct ResultMsg {
    meta: Meta,
    preds: Vec<WirePrediction>,
}

impl Wire for ResultBatch {
    fn to_message(self) -> Vec<u8> {
        let preds = self.preds.into_iter().map(|p| (p.row, p.label, p.top, p.loss)).collect();
        encode(&ResultMsg { meta: self.meta, preds }, &[])
    }

    fn from_message(bytes: &[u8]) -> Result<Option<Self>> {
        Ok(decode_msg::<ResultMsg>(bytes)?.map(|(m, _)| ResultBatch {
            meta: m.meta,
            preds: m.preds.into_iter().map(|(row, label, top, loss)| Prediction { row, label, top, loss }).collect(),
        }))
    }
}

/// The sending end of a link to one rank or several (the predictors: the first to ask gets the
/// batch). With credits, a batch goes to a rank only against a credit it gave: `IN_FLIGHT` up
/// front and one per batch it has finished, so a link holds at most `IN_FLIGHT` batches.
struct ToRanks<'a> {
    dist: &'a Dist,
    ctx: &'a Ctx<'a>,
    peers: Vec<usize>,
    /// The timeline's names of this link's spans.
    spans: Spans,
    tag: i32,
    credits: bool,
    /// Credits taken and batches sent, per rank.
    taken: Vec<usize>,
    sent: Vec<usize>,
    /// The rank a `reserve` took a credit of.
    reserved: Option<usize>,
    /// Work to do in every wait (rank 0 collects results), so that no cycle of ranks can block
    /// each other on a batch or a result whatever the MPI library's eager limit. (Credits are
    /// empty messages, always below it.)
    meanwhile: Option<&'a mut dyn FnMut() -> Result<()>>,
}

/// The timeline's span names of a link: waiting for a credit, sending (`ToRanks`), receiving
/// (`FromRank`).
#[derive(Clone, Copy)]
struct Spans {
    wait: &'static str,
    send: &'static str,
}

impl<'a> ToRanks<'a> {
    fn new(dist: &'a Dist, ctx: &'a Ctx<'a>, peers: Vec<usize>, spans: Spans, tag: i32) -> Self {
        let n = dist.size();
        ToRanks {
            dist,
            ctx,
            peers,
            spans,
            tag,
            credits: true,
            taken: vec![0; n],
            sent: vec![0; n],
            reserved: None,
            meanwhile: None,
        }
    }

    /// Sends without credits (results to rank 0, which takes whatever comes), to one rank.
    fn without_credits(mut self) -> Self {
        assert_eq!(self.peers.len(), 1, "a link without credits goes to one rank");
        self.credits = false;
        self
    }

    fn meanwhile(mut self, work: &'a mut dyn FnMut() -> Result<()>) -> Self {
        self.meanwhile = Some(work);
        self
    }

    /// Waits for a credit from `from` (any peer if None): returns who gave it.
    fn take_credit(&mut self, from: Option<usize>) -> Result<usize> {
        let dist = self.dist;
        let giver = match self.meanwhile.as_mut() {
            None => dist.recv_bytes(from, TAG_CREDIT).0,
            Some(work) => dist.poll_recv(from, TAG_CREDIT, || match dist.try_recv_bytes(from, TAG_CREDIT) {
                Some((giver, _, _)) => Some(Ok(giver)),
                None => work().err().map(Err),
            })?,
        };
        self.taken[giver] += 1;
        Ok(giver)
    }

    /// A credit for batch `seq`, from the one peer or the first of several that gives one.
    fn credit_for(&mut self, seq: u64) -> Result<usize> {
        let t = Instant::now();
        let from = if self.peers.len() == 1 { Some(self.peers[0]) } else { None };
        let giver = self.take_credit(from)?;
        self.ctx.mark("wait", self.spans.wait, t, seq);
        Ok(giver)
    }

    fn send_message(&mut self, dest: usize, msg: &[u8]) -> Result<()> {
        let mut failed = None;
        match self.meanwhile.as_mut() {
            None => self.dist.send_bytes(dest, self.tag, msg),
            Some(work) => self.dist.send_bytes_while(dest, self.tag, msg, || {
                if failed.is_none() {
                    failed = work().err();
                }
            }),
        }
        failed.map_or(Ok(()), Err)
    }
}

impl<T: Wire> Outlet<T> for ToRanks<'_> {
    fn reserve(&mut self, seq: u64) -> Result<()> {
        if self.credits && self.reserved.is_none() {
            self.reserved = Some(self.credit_for(seq)?);
        }
        Ok(())
    }

    fn send(&mut self, item: T) -> Result<bool> {
        let seq = item.meta().seq;
        let dest = match self.reserved.take() {
            Some(rank) => rank,
            None if self.credits => self.credit_for(seq)?,
            None => self.peers[0],
        };
        let t = Instant::now();
        self.send_message(dest, &item.to_message())?;
        self.sent[dest] += 1;
        self.ctx.mark("send", self.spans.send, t, seq);
        Ok(true)
    }

    /// The end of the stream to every peer, then their last credits, so that no message is left
    /// unmatched.
    fn end(&mut self) -> Result<()> {
        for p in self.peers.clone() {
            self.send_message(p, &[KIND_END])?;
        }
        if self.credits {
            for p in self.peers.clone() {
                while self.taken[p] < IN_FLIGHT + self.sent[p] {
                    self.take_credit(Some(p))?;
                }
            }
        }
        Ok(())
    }
}

/// The receiving end of a link from one rank: gives it `IN_FLIGHT` credits up front and one for
/// each batch once this stage has finished it (when it asks for the next).
struct FromRank<'a> {
    dist: &'a Dist,
    ctx: &'a Ctx<'a>,
    peer: usize,
    /// The timeline's name of the wait for a batch: "receive from the reader".
    span: &'static str,
    owed: bool,
}

impl<'a> FromRank<'a> {
    fn new(dist: &'a Dist, ctx: &'a Ctx<'a>, peer: usize, span: &'static str) -> Self {
        for _ in 0..IN_FLIGHT {
            dist.send_bytes(peer, TAG_CREDIT, &[]);
        }
        FromRank { dist, ctx, peer, span, owed: false }
    }
}

impl<T: Wire> Inlet<T> for FromRank<'_> {
    fn recv(&mut self) -> Result<Option<T>> {
        if std::mem::take(&mut self.owed) {
            self.dist.send_bytes(self.peer, TAG_CREDIT, &[]);
        }
        let t = Instant::now();
        let (_, _, bytes) = self.dist.recv_bytes(Some(self.peer), TAG_FORWARD);
        let Some(item) = T::from_message(&bytes)? else { return Ok(None) };
        self.ctx.mark("wait", self.span, t, item.meta().seq);
        self.owed = true;
        Ok(Some(item))
    }
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
    let last = dist.size() - 1;
    Ok(match Stage::of_rank(dist.rank()) {
        Stage::Read => {
            let (outcome, st) = reader_rank(dist, ctx, rows, batch, progress)?;
            (Some(outcome), st)
        }
        Stage::Decode => {
            let mut from = FromRank::new(dist, ctx, 0, "receive from the reader");
            let spans =
                Spans { wait: "wait for the normalizer", send: "send to the normalizer (until it takes the batch)" };
            (None, run_decode(ctx, &mut from, &mut ToRanks::new(dist, ctx, vec![2], spans, TAG_FORWARD))?)
        }
        Stage::Normalize => {
            let mut from = FromRank::new(dist, ctx, 1, "receive from the decoder");
            let spans = Spans { wait: "wait for a predictor", send: "send to a predictor (until it takes the batch)" };
            let mut to = ToRanks::new(dist, ctx, (3..=last).collect(), spans, TAG_FORWARD);
            (None, run_normalize(ctx, &mut from, &mut to)?)
        }
        Stage::Predict => {
            let mut from = FromRank::new(dist, ctx, 2, "receive from the normalizer");
            let spans = Spans { wait: "", send: "send the result to rank 0" };
            let mut to = ToRanks::new(dist, ctx, vec![0], spans, TAG_RESULT).without_credits();
            (None, run_predict(ctx, &mut from, predictor, &mut to)?)
        }
    })
}

/// Rank 0's results from the predictors: what has arrived and how many predictors have ended.
struct Results<'p> {
    out: Outcome,
    ended: usize,
    predictors: usize,
    progress: &'p mut crate::infra::logging::Progress,
}

impl Results<'_> {
    /// Takes in whatever results have arrived.
    fn collect(&mut self, dist: &Dist) -> Result<()> {
        while let Some((_, _, bytes)) = dist.try_recv_bytes(None, TAG_RESULT) {
            match ResultBatch::from_message(&bytes)? {
                Some(r) => self.out.absorb(r, self.progress),
                None => self.ended += 1,
            }
        }
        Ok(())
    }

    /// Waits for the rest, until every predictor has ended.
    fn finish(&mut self, dist: &Dist) -> Result<()> {
        dist.poll_recv(None, TAG_RESULT, || match self.collect(dist) {
            Err(e) => Some(Err(e)),
            Ok(()) => (self.ended >= self.predictors).then_some(Ok(())),
        })
    }
}

/// Rank 0: reads the batches' files and sends them to the decoder against its credits,
/// collecting the predictors' results in every wait, then the rest of them.
fn reader_rank(
    dist: &Dist,
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    progress: &mut crate::infra::logging::Progress,
) -> Result<(Outcome, StageStats)> {
    let mut results = Results { out: Outcome::default(), ended: 0, predictors: dist.size() - 3, progress };
    let st = {
        let mut collect = || results.collect(dist);
        let spans = Spans { wait: "wait for the decoder", send: "send to the decoder (until it takes the batch)" };
        let mut to = ToRanks::new(dist, ctx, vec![1], spans, TAG_FORWARD).meanwhile(&mut collect);
        run_read(ctx, rows, batch, &mut to)?
    };
    results.finish(dist)?;
    Ok((results.out, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_as_messages() {
        let meta = Meta { seq: 3, rows: vec![4, 5], labels: vec![1, -1], ..Default::default() };
        let b = TensorBatch { meta: meta.clone(), values: vec![1.5, -2.0] }.to_message();
        let back = TensorBatch::from_message(&b).unwrap().unwrap();
        assert_eq!((back.meta.rows, back.values), (vec![4, 5], vec![1.5, -2.0]));
        let raw = RawBatch { meta: meta.clone(), files: vec![vec![1, 2, 3], vec![], vec![9]] }.to_message();
        assert_eq!(RawBatch::from_message(&raw).unwrap().unwrap().files, vec![vec![1, 2, 3], vec![], vec![9]]);
        let p = Prediction { row: 4, label: Some(1), top: vec![1, 0], loss: Some(0.25) };
        let r = ResultBatch { meta, preds: vec![p.clone()] }.to_message();
        assert_eq!(ResultBatch::from_message(&r).unwrap().unwrap().preds, vec![p]);
        assert!(TensorBatch::from_message(&[KIND_END]).unwrap().is_none());
        assert!(RawBatch::from_message(&raw[..raw.len() - 1]).is_err(), "a short message is an error, not a panic");
    }
}
