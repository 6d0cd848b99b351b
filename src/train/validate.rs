//! Validation after an epoch: every rank scores its share of test.csv, and one allreduce sums
//! loss and hits.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::loader::{with_batches, Loader};
use super::model::Model;
use crate::data::Row;
use crate::infra::dist::Dist;

/// Validation on every rank's share of test.csv, summed with one allreduce: (loss, top-1, top-5),
/// or None when a stop signal cut it short on some rank. The timeline (if recording) takes the
/// first `traced` batches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate(
    dist: &Dist,
    model: &Model,
    rows: &[Row],
    loader: &mut Loader,
    batch: usize,
    device: Device,
    numerics: &crate::precision::Numerics,
    stop: &AtomicBool,
    traced: usize,
    every: Duration,
) -> Result<Option<(f64, f64, f64)>> {
    let what = format!("validation (rank {}'s share)", dist.rank());
    let mut progress = crate::infra::logging::Progress::new(&what, "images", rows.len() as u64, dist.is_root(), every);
    let mut sums = [0f64; 5]; // loss * n, top-1 hits, top-5 hits, n, stopped
    let idx: Vec<usize> = (0..rows.len()).collect();
    let batches: Vec<&[usize]> = idx.chunks(batch).collect();
    with_batches(loader, rows, &batches, device, |next_batch| {
        for (i, idx) in batches.iter().enumerate() {
            crate::infra::fault::point("validate");
            if i == traced && crate::infra::timeline::recording() {
                crate::infra::timeline::set_recording(false);
            }
            if stop.load(Ordering::Relaxed) {
                sums[4] = 1.0;
                break;
            }
            let t = Instant::now();
            let at = Some(i as u64 + 1);
            let (batch, _) = next_batch()?;
            progress.inc(idx.len() as u64);
            let Some((x, y)) = batch else { continue };
            let t = crate::infra::timeline::since("data", "load batch", t, at);
            let _forward = crate::infra::timeline::Span::new("validation", "forward (validation)", t, at);
            tch::no_grad(|| -> Result<()> {
                let logits = numerics.forward(model.net.as_ref(), &x, false)?;
                let n = y.size()[0] as f64;
                sums[0] += logits.cross_entropy_for_logits(&y).double_value(&[]) * n;
                let (h1, h5) = topk_hits(&logits, &y);
                sums[1] += h1;
                sums[2] += h5;
                sums[3] += n;
                Ok(())
            })?;
        }
        Ok(())
    })?;
    progress.finish();
    let t = Instant::now();
    dist.allreduce_sum(&mut sums, &mut Vec::new());
    crate::infra::timeline::since("exchange", "allreduce", t, None);
    if sums[4] > 0.0 {
        return Ok(None);
    }
    let n = sums[3].max(1.0);
    Ok(Some((sums[0] / n, sums[1] / n, sums[2] / n)))
}

/// Hits among the top 1 and the top 5 (or all classes, if fewer) predictions.
pub fn topk_hits(logits: &Tensor, labels: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let hits = top.eq_tensor(&labels.unsqueeze(1));
    let h1 = hits.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]);
    let h5 = hits.sum(Kind::Float).double_value(&[]);
    (h1, h5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_counts_hits_with_fewer_than_five_classes() {
        let logits = Tensor::from_slice(&[0.1f32, 0.9, 0.0, 0.8, 0.1, 0.1, 0.2, 0.3, 0.5]).view([3, 3]);
        let labels = Tensor::from_slice(&[1i64, 2, 0]);
        assert_eq!(topk_hits(&logits, &labels), (1.0, 3.0));
    }
}
