//! The links between stages and the loop each stage runs over them.
//!
//! A stage takes batches from an `Inlet` and passes what it makes to an `Outlet`. Whether the
//! neighbour is a thread of this process (a bounded channel: `ChannelOutlet`, a `Receiver`) or
//! another rank (messages against credits: mpi.rs) is the link's business; the four loops below
//! are the same code in both pipelines.
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::Result;

use super::stages::{
    decode, normalize, read, timed, Batch, Ctx, DecodedBatch, Outcome, RawBatch, ResultBatch, Stage, StageStats,
    TensorBatch,
};
use crate::data::Row;
use crate::infra::logging::Progress;

/// Where a stage's batches go.
pub trait Outlet<T> {
    /// Where the link can wait apart from sending (MPI credits), waits until the next stage has
    /// room for batch `seq` before the batch is made, so that a reader reads no further ahead
    /// than its consumer allows. Optional: the default (and a channel) does nothing here, and
    /// `send` waits.
    fn reserve(&mut self, _seq: u64) -> Result<()> {
        Ok(())
    }

    /// Passes `item` on, waiting while the next stage has no room; false once the next stage has
    /// stopped (its own error is the one reported).
    fn send(&mut self, item: T) -> Result<bool>;

    /// Tells the next stage that nothing more comes.
    fn end(&mut self) -> Result<()>;
}

/// Where a stage's batches come from.
pub trait Inlet<T> {
    /// The next batch; None once the previous stage has ended.
    fn recv(&mut self) -> Result<Option<T>>;
}

/// The sending end of a bounded channel to a thread of this process.
pub struct ChannelOutlet<T>(Option<SyncSender<T>>);

impl<T> ChannelOutlet<T> {
    pub fn new(tx: SyncSender<T>) -> Self {
        ChannelOutlet(Some(tx))
    }
}

impl<T> Outlet<T> for ChannelOutlet<T> {
    fn send(&mut self, item: T) -> Result<bool> {
        Ok(self.0.as_ref().is_some_and(|tx| tx.send(item).is_ok()))
    }

    fn end(&mut self) -> Result<()> {
        self.0 = None; // the receiver sees the channel close
        Ok(())
    }
}

impl<T> Inlet<T> for Receiver<T> {
    fn recv(&mut self) -> Result<Option<T>> {
        Ok(Receiver::recv(self).ok())
    }
}

/// The end of the line in one process: results go straight into the outcome.
pub struct Collect<'a> {
    pub out: &'a mut Outcome,
    pub progress: &'a mut Progress,
}

impl Outlet<ResultBatch> for Collect<'_> {
    fn send(&mut self, r: ResultBatch) -> Result<bool> {
        self.out.absorb(r, self.progress);
        Ok(true)
    }

    fn end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Row indices of `rows` rows in batches of `batch`.
fn batches(rows: usize, batch: usize) -> Vec<Vec<usize>> {
    (0..rows).collect::<Vec<_>>().chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

/// Stage 1: reads `rows` in batches of `batch` and passes each on.
pub fn run_read(ctx: &Ctx, rows: &[Row], batch: usize, out: &mut dyn Outlet<RawBatch>) -> Result<StageStats> {
    let mut st = StageStats::default();
    for (seq, idx) in batches(rows.len(), batch).iter().enumerate() {
        let seq = seq as u64;
        out.reserve(seq)?;
        let b = timed(ctx, &mut st, Stage::Read, seq, idx.len(), || read(ctx, rows, seq, idx))?;
        if !out.send(b)? {
            break;
        }
    }
    out.end()?;
    Ok(st)
}

/// A stage between two links: `work` on every batch from `inp`, passed on to `out`.
fn run_between<I: Batch, O>(
    ctx: &Ctx,
    stage: Stage,
    inp: &mut dyn Inlet<I>,
    out: &mut dyn Outlet<O>,
    mut work: impl FnMut(I) -> Result<O>,
) -> Result<StageStats> {
    let mut st = StageStats::default();
    while let Some(b) = inp.recv()? {
        let (images, seq) = (b.meta().rows.len(), b.meta().seq);
        let made = timed(ctx, &mut st, stage, seq, images, || work(b))?;
        if !out.send(made)? {
            break;
        }
    }
    out.end()?;
    Ok(st)
}

/// Stage 2: decodes and resizes.
pub fn run_decode(ctx: &Ctx, inp: &mut dyn Inlet<RawBatch>, out: &mut dyn Outlet<DecodedBatch>) -> Result<StageStats> {
    run_between(ctx, Stage::Decode, inp, out, |b| decode(ctx, b))
}

/// Stage 3: normalizes.
pub fn run_normalize(
    ctx: &Ctx,
    inp: &mut dyn Inlet<DecodedBatch>,
    out: &mut dyn Outlet<TensorBatch>,
) -> Result<StageStats> {
    run_between(ctx, Stage::Normalize, inp, out, |b| Ok(normalize(ctx, b)))
}

/// Stage 4: predicts with `predictor`.
pub fn run_predict(
    ctx: &Ctx,
    inp: &mut dyn Inlet<TensorBatch>,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    out: &mut dyn Outlet<ResultBatch>,
) -> Result<StageStats> {
    run_between(ctx, Stage::Predict, inp, out, |b| {
        crate::infra::fault::point("predict");
        Ok(predictor(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_row_once_in_order() {
        assert_eq!(batches(5, 2), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(batches(0, 4).is_empty());
    }

    #[test]
    fn a_channel_outlet_reports_a_stopped_consumer_and_closes_on_end() {
        let (tx, mut rx) = std::sync::mpsc::sync_channel::<u32>(2);
        let mut out = ChannelOutlet::new(tx);
        assert!(out.send(7).unwrap());
        out.end().unwrap();
        assert_eq!(Inlet::recv(&mut rx).unwrap(), Some(7));
        assert_eq!(Inlet::recv(&mut rx).unwrap(), None, "closed after end");
        assert!(!out.send(8).unwrap(), "nothing goes out after end");
        let (tx, rx) = std::sync::mpsc::sync_channel::<u32>(2);
        drop(rx);
        assert!(!ChannelOutlet::new(tx).send(1).unwrap(), "a stopped consumer");
    }
}
