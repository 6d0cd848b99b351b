//! Seeded sampling and train/test splitting. ChaCha8 with a fixed algorithm (a partial
//! Fisher–Yates shuffle written here), so a seed gives the same split on every platform and
//! with every version of the `rand` crate.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::source::Source;
use crate::config::Sample;

/// Indices into `Source::items`, each list in source order.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
    /// Stratified splits: classes with too few images to give the test split one (fewer than
    /// [`MIN_TO_SPLIT`]), kept whole in train.
    pub train_only_classes: usize,
}

/// A class needs this many sampled images before a stratified split sends any to test: with fewer,
/// a test image would leave one image or none to learn the class from.
pub const MIN_TO_SPLIT: usize = 3;

/// The first `k` entries of `v` become a uniform random `k`-subset, in random order.
fn partial_shuffle(v: &mut [usize], k: usize, rng: &mut ChaCha8Rng) {
    for i in 0..k.min(v.len()) {
        let j = rng.random_range(i..v.len());
        v.swap(i, j);
    }
}

pub fn choose(source: &Source, sample: Sample, test_fraction: f64, stratify: bool, seed: u64) -> Result<Split> {
    let total = source.items.len();
    let k = sample.count_of(total);
    if k == 0 {
        bail!("the sample is empty: {sample} of {total} images selects none (dataset.sample / --sample)");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut all: Vec<usize> = (0..total).collect();
    partial_shuffle(&mut all, k, &mut rng);
    let mut chosen = all;
    chosen.truncate(k);

    let mut train_only_classes = 0;
    let (mut train, mut test) = if stratify {
        chosen.sort_unstable();
        let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for i in chosen {
            by_class.entry(source.items[i].category_id).or_default().push(i);
        }
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (_, mut members) in by_class {
            if members.len() < MIN_TO_SPLIT {
                train_only_classes += 1;
                train.extend_from_slice(&members);
                continue;
            }
            // The class's share rounded to the nearest count, leaving at least one image in train.
            let n_test = (((members.len() as f64) * test_fraction).round() as usize).min(members.len() - 1);
            partial_shuffle(&mut members, n_test, &mut rng);
            test.extend_from_slice(&members[..n_test]);
            train.extend_from_slice(&members[n_test..]);
        }
        (train, test)
    } else {
        let n_test = ((k as f64) * test_fraction).round() as usize;
        let test = chosen[..n_test].to_vec();
        (chosen[n_test..].to_vec(), test)
    };
    if test.is_empty() || train.is_empty() {
        let why = if stratify && test.is_empty() {
            format!(" (a stratified split keeps classes of fewer than {MIN_TO_SPLIT} images whole in train)")
        } else {
            String::new()
        };
        bail!(
            "a sample of {k} images with test_fraction {test_fraction} leaves the {} split empty{why}: sample more images",
            if test.is_empty() { "test" } else { "train" }
        );
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok(Split { train, test, train_only_classes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{ImageData, Item};

    fn source(n: usize, classes: i64) -> Source {
        Source {
            items: (0..n)
                .map(|i| Item {
                    data: ImageData::Idx { set: 0, index: i },
                    rel: format!("{i}.png").into(),
                    category_id: i as i64 % classes,
                    image_id: i as i64,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn fraction_sample_splits_eighty_twenty() {
        let s = choose(&source(70_000, 10), Sample::Fraction(0.1), 0.2, false, 0).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (5_600, 1_400));
        let mut all: Vec<_> = s.train.iter().chain(&s.test).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 7_000, "train and test are disjoint");
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let src = source(1_000, 3);
        let a = choose(&src, Sample::Count(100), 0.2, false, 7).unwrap();
        assert_eq!(a, choose(&src, Sample::Count(100), 0.2, false, 7).unwrap());
        assert_ne!(a, choose(&src, Sample::Count(100), 0.2, false, 8).unwrap());
    }

    #[test]
    fn stratified_split_keeps_each_class_share() {
        let src = source(1_000, 4);
        let s = choose(&src, Sample::Fraction(1.0), 0.2, true, 1).unwrap();
        for c in 0..4 {
            let n = s.test.iter().filter(|&&i| src.items[i].category_id == c).count();
            assert_eq!(n, 50, "class {c}");
        }
    }

    #[test]
    fn stratified_split_keeps_classes_of_one_or_two_images_in_train_and_splits_the_rest_both_ways() {
        // Class c has c + 1 images: classes 0 and 1 (1 and 2 images) stay whole in train.
        let mut items = Vec::new();
        for c in 0..6i64 {
            for _ in 0..=c {
                let i = items.len();
                items.push(Item {
                    data: ImageData::Idx { set: 0, index: i },
                    rel: format!("{i}.png").into(),
                    category_id: c * 10,
                    image_id: i as i64,
                });
            }
        }
        let src = Source { items, ..Default::default() };
        for fraction in [0.2, 0.5, 0.9] {
            let s = choose(&src, Sample::Fraction(1.0), fraction, true, 3).unwrap();
            assert_eq!(s.train_only_classes, 2, "test_fraction {fraction}");
            for c in 0..6i64 {
                let count = |v: &[usize]| v.iter().filter(|&&i| src.items[i].category_id == c * 10).count();
                let (train, test) = (count(&s.train), count(&s.test));
                assert_eq!(train + test, c as usize + 1);
                if c < 2 {
                    assert_eq!(test, 0, "class {c}, test_fraction {fraction}");
                } else {
                    assert!(train >= 1 && test >= 1, "class {c}, test_fraction {fraction}: {train} + {test}");
                }
            }
        }
    }

    #[test]
    fn too_small_sample_is_an_error() {
        let src = source(10, 2);
        let e = choose(&src, Sample::Count(2), 0.2, false, 0).unwrap_err();
        assert!(e.to_string().contains("leaves the test split empty"), "{e}");
        let e = choose(&src, Sample::Fraction(0.01), 0.2, false, 0).unwrap_err();
        assert!(e.to_string().contains("the sample is empty"), "{e}");
    }
}
