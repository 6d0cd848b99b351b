//! What each rank trains on: rank 0 reads the CSVs and deals every rank its shard; each epoch,
//! a rank's seeded order of its shard, cut into batches; the steps every rank runs.
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::config::{Sampler, Settings};
use crate::data::{self, Class, Row};
use crate::infra::dist::Dist;

/// What rank 0 sends each rank.
#[derive(Serialize, Deserialize)]
pub(crate) struct Shard {
    pub classes: Vec<Class>,
    pub train: Vec<Row>,
    pub test: Vec<Row>,
    pub total_train: usize,
    pub total_test: usize,
    /// Training images per label, over all ranks (for `train.sampler`).
    pub class_counts: Vec<u64>,
}

/// The batches of one epoch's order of `len` images: consecutive runs of `batch`, except that a
/// last run of a single image joins the one before it (batch-norm cannot take a batch of one:
/// with one value per channel its variance is undefined and its running statistics become NaN).
/// A batch size of 1 is left as the user chose it.
pub fn batch_bounds(len: usize, batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = (0..len).step_by(batch).map(|lo| lo..(lo + batch).min(len)).collect();
    if batch > 1 && out.len() > 1 && out.last().is_some_and(|r| r.len() == 1) {
        let last = out.pop().expect("two or more");
        out.last_mut().expect("one or more").end = last.end;
    }
    out
}

/// Steps per epoch: the most batches any rank has (ranks with fewer sit out the last steps with a
/// zero-weight gradient). Shards are the rows dealt round-robin: `total / n` or one more.
pub(crate) fn steps_per_epoch(total: usize, ranks: usize, batch: usize) -> usize {
    (0..ranks).map(|r| batch_bounds(total / ranks + usize::from(r < total % ranks), batch).len()).max().unwrap_or(0)
}

/// Rank 0 reads the CSVs and gives each rank every N-th row.
pub(crate) fn distribute(dist: &Dist, s: &Settings) -> Result<Shard> {
    let parts = if dist.is_root() {
        let dir = s.data_dir();
        let classes = data::read_classes(&dir.join(data::CLASSES_FILE))?;
        let train_file = dir.join("train.csv");
        let test_file = dir.join("test.csv");
        let train = data::read_rows(&train_file)?;
        let test = if s.config.train.validate { data::read_rows(&test_file)? } else { Vec::new() };
        if train.is_empty() {
            bail!("{} has no rows", train_file.display());
        }
        data::check_labels(&train, classes.len(), &train_file)?;
        if train.iter().any(|r| r.label < 0) {
            bail!("{} has rows without a label: training needs labels", train_file.display());
        }
        data::check_labels(&test, classes.len(), &test_file)?;
        let mut class_counts = vec![0u64; classes.len()];
        for r in &train {
            class_counts[r.label as usize] += 1;
        }
        let n = dist.size();
        let deal = |rows: &[Row], r: usize| rows.iter().skip(r).step_by(n).cloned().collect::<Vec<_>>();
        let mut parts = Vec::with_capacity(n);
        for r in 0..n {
            let shard = Shard {
                classes: classes.clone(),
                train: deal(&train, r),
                test: deal(&test, r),
                total_train: train.len(),
                total_test: test.len(),
                class_counts: class_counts.clone(),
            };
            parts.push(serde_json::to_vec(&shard)?);
        }
        if train.len() % n != 0 {
            info!(
                "{} training images over {n} ranks: shards of {} and {}; a rank with fewer batches sends a \
                 zero-weight gradient in the steps it has none for (nothing is dropped or repeated)",
                train.len(),
                train.len() / n,
                train.len().div_ceil(n)
            );
        }
        Some(parts)
    } else {
        None
    };
    let bytes = dist.scatter_bytes(0, parts)?;
    serde_json::from_slice(&bytes).context("decoding this rank's shard")
}

pub(crate) fn epoch_order(len: usize, seed: u64, epoch: u32, rank: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = epoch_rng(seed, epoch, rank, 0x5ac);
    order.shuffle(&mut rng);
    order
}

/// The sampling weight of one image of a class of `n` training images under `sampler`.
fn image_weight(sampler: Sampler, n: u64) -> f64 {
    match sampler {
        Sampler::Uniform => 1.0,
        Sampler::ClassBalanced => 1.0 / n as f64,
        Sampler::Sqrt => 1.0 / (n as f64).sqrt(),
    }
}

/// The sampling weight of each of a rank's training rows under `sampler` (None: uniform, every
/// image once). `counts` are the training images per label over all ranks.
pub(crate) fn sampling_weights(sampler: Sampler, rows: &[Row], counts: &[u64]) -> Option<Vec<f64>> {
    (sampler != Sampler::Uniform)
        .then(|| rows.iter().map(|r| image_weight(sampler, counts[r.label as usize].max(1))).collect())
}

/// The generator of a rank's epoch order; `salt` tells the uses apart.
fn epoch_rng(seed: u64, epoch: u32, rank: usize, salt: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (u64::from(epoch) << 32) ^ ((rank as u64) << 48) ^ salt)
}

/// An epoch's order of a rank's rows under sampling weights: as many draws as rows, with
/// replacement (as torch's `WeightedRandomSampler`), seeded per (seed, epoch, rank). Every rank
/// draws from its own shard only, so the ranks' images stay disjoint and their step counts equal.
pub(crate) fn weighted_order(weights: &[f64], seed: u64, epoch: u32, rank: usize) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut total = 0.0;
    for w in weights {
        total += w;
        cumulative.push(total);
    }
    let mut rng = epoch_rng(seed, epoch, rank, 0x5a3b);
    (0..weights.len())
        .map(|_| {
            let u = rng.random_range(0.0..total);
            cumulative.partition_point(|&c| c <= u).min(weights.len() - 1)
        })
        .collect()
}

/// For the log: (images, expected draws per epoch) of the rarest and of the commonest class. A
/// class of n images holds n × (its images' weight) of the total weight.
pub(crate) fn expected_draws(sampler: Sampler, counts: &[u64]) -> ((u64, f64), (u64, f64)) {
    let present: Vec<u64> = counts.iter().copied().filter(|&n| n > 0).collect();
    let mass = |n: u64| n as f64 * image_weight(sampler, n);
    let total: f64 = present.iter().map(|&n| mass(n)).sum();
    let images: u64 = present.iter().sum();
    let draws = |n: u64| images as f64 * mass(n) / total.max(f64::MIN_POSITIVE);
    let (lo, hi) = (present.iter().copied().min().unwrap_or(0), present.iter().copied().max().unwrap_or(0));
    ((lo, draws(lo)), (hi, draws(hi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 0, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 0, 1, 0));
        assert_ne!(a, epoch_order(100, 0, 2, 0));
        assert_ne!(a, epoch_order(100, 0, 1, 1));
    }

    #[test]
    fn a_last_batch_of_one_image_joins_the_batch_before_it() {
        let b = |len, batch| batch_bounds(len, batch).into_iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        assert_eq!(b(5, 2), [(0, 2), (2, 5)]);
        assert_eq!(b(4, 2), [(0, 2), (2, 4)]);
        assert_eq!(b(9, 4), [(0, 4), (4, 9)]);
        assert_eq!(b(1, 4), [(0, 1)], "a shard of one image stays one batch");
        assert_eq!(b(0, 4), []);
        assert_eq!(b(3, 1), [(0, 1), (1, 2), (2, 3)], "batch size 1 is the user's choice");
    }

    #[test]
    fn steps_per_epoch_is_the_most_batches_of_any_rank() {
        // 16 images over 3 ranks: shards of 6, 5, 5; batch 4 gives 2, 1 (4 + 1 folded), 1 batches.
        assert_eq!(steps_per_epoch(16, 3, 4), 2);
        assert_eq!(steps_per_epoch(16, 2, 4), 2);
        assert_eq!(steps_per_epoch(10, 2, 2), 2, "shards of 5: batches of 2 and 3");
        assert_eq!(steps_per_epoch(7, 1, 64), 1);
    }

    #[test]
    fn class_balanced_and_sqrt_sampling_draw_classes_as_their_weights_say() {
        // 900 images of class 0, 100 of class 1.
        let rows: Vec<Row> = (0..1000)
            .map(|i| Row { path: format!("{i}.png"), label: i64::from(i >= 900), category_id: 0, image_id: i })
            .collect();
        let counts = [900, 100];
        assert!(sampling_weights(Sampler::Uniform, &rows, &counts).is_none());
        for (sampler, want) in [(Sampler::ClassBalanced, 0.5), (Sampler::Sqrt, 10.0 / 40.0)] {
            let w = sampling_weights(sampler, &rows, &counts).unwrap();
            let order = weighted_order(&w, 3, 1, 0);
            assert_eq!(order.len(), 1000);
            assert_eq!(order, weighted_order(&w, 3, 1, 0), "seeded");
            let rare = order.iter().filter(|&&i| i >= 900).count() as f64 / 1000.0;
            assert!((rare - want).abs() < 0.05, "{sampler:?}: class 1 drawn {rare}, expected {want}");
            let ((lo, lo_draws), (hi, hi_draws)) = expected_draws(sampler, &counts);
            assert_eq!((lo, hi), (100, 900));
            assert!((lo_draws / 1000.0 - want).abs() < 1e-9 && (hi_draws / 1000.0 - (1.0 - want)).abs() < 1e-9);
        }
    }
}
