//! The pipeline's stages as threads of one process (fewer than 4 ranks), joined by bounded
//! channels.
use std::sync::mpsc::sync_channel;

use anyhow::Result;

use super::stages::{
    decode, normalize, read, timed, Ctx, DecodedBatch, Outcome, RawBatch, ResultBatch, Stage, StageStats,
};
use super::stages::{TensorBatch, IN_FLIGHT};
use crate::data::Row;

/// All four stages as threads of this process, joined by bounded channels.
pub fn local_pipeline(
    ctx: &Ctx,
    rows: &[Row],
    batch: usize,
    predictor: &mut dyn FnMut(TensorBatch) -> ResultBatch,
    progress: &mut crate::infra::logging::Progress,
) -> Result<Outcome> {
    let batches: Vec<Vec<usize>> = (0..rows.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    let (tx_raw, rx_raw) = sync_channel::<RawBatch>(IN_FLIGHT);
    let (tx_dec, rx_dec) = sync_channel::<DecodedBatch>(IN_FLIGHT);
    let (tx_norm, rx_norm) = sync_channel::<TensorBatch>(IN_FLIGHT);
    let mut out = Outcome::default();
    let mut predict_stats = StageStats::default();
    let (read_stats, decode_stats, normalize_stats) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || -> Result<StageStats> {
            crate::infra::timeline::name_thread(1, "read");
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
            crate::infra::timeline::name_thread(2, "decode");
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
            crate::infra::timeline::name_thread(3, "normalize");
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
        crate::infra::timeline::name_thread(0, "predict");
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
