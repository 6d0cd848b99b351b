//! The pipeline's stages as threads of one process (fewer than 4 ranks), joined by bounded
//! channels.
use std::sync::mpsc::sync_channel;
use std::thread::ScopedJoinHandle;

use anyhow::Result;

use super::link::{run_decode, run_normalize, run_predict, run_read, ChannelOutlet, Collect};
use super::stages::{Ctx, DecodedBatch, Outcome, RawBatch, ResultBatch, Stage, StageStats, TensorBatch, IN_FLIGHT};
use crate::data::Row;
use crate::infra::timeline::name_thread;

/// All four stages as threads of this process, joined by bounded channels: read, decode and
/// normalize on threads of their own, predict on the calling thread.
pub fn local_pipeline(
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    progress: &mut crate::infra::logging::Progress,
) -> Result<Outcome> {
    let (tx_raw, mut rx_raw) = sync_channel::<RawBatch>(IN_FLIGHT);
    let (tx_dec, mut rx_dec) = sync_channel::<DecodedBatch>(IN_FLIGHT);
    let (tx_norm, rx_norm) = sync_channel::<TensorBatch>(IN_FLIGHT);
    let mut out = Outcome::default();
    let (read, decode, normalize, predict) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || {
            name_thread(1, "read");
            run_read(ctx, rows, batch, &mut ChannelOutlet::new(tx_raw))
        });
        let decoder = s.spawn(move || {
            name_thread(2, "decode");
            run_decode(ctx, &mut rx_raw, &mut ChannelOutlet::new(tx_dec))
        });
        let normalizer = s.spawn(move || {
            name_thread(3, "normalize");
            run_normalize(ctx, &mut rx_dec, &mut ChannelOutlet::new(tx_norm))
        });
        name_thread(0, "predict");
        let predict = {
            let mut rx_norm = rx_norm; // dropped on the way out, error or not: no thread stays blocked
            run_predict(ctx, &mut rx_norm, predictor, &mut Collect { out: &mut out, progress })?
        };
        let join = |h: ScopedJoinHandle<'_, Result<StageStats>>| -> Result<StageStats> {
            h.join().map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))?
        };
        Ok((join(reader)?, join(decoder)?, join(normalizer)?, predict))
    })?;
    out.stats =
        vec![(Stage::Read, read), (Stage::Decode, decode), (Stage::Normalize, normalize), (Stage::Predict, predict)];
    Ok(out)
}
