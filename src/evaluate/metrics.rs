//! Classification metrics from per-image predictions: top-1, top-5, mean loss, and per-class
//! precision / recall / F1 with their macro average as scikit-learn's
//! `f1_score(average="macro")` computes it (the Herbarium competitions' metric): the average runs
//! over the classes that occur in the labels or in the predictions, and a class never predicted
//! has precision 0 (not undefined).
use serde::Serialize;

/// One evaluated image: its true label (None if the split is unlabeled), its top-k predicted
/// labels (best first, k = min(5, classes)) and its cross-entropy loss (if labeled).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub row: usize,
    pub label: Option<usize>,
    pub top: Vec<usize>,
    pub loss: Option<f32>,
}

/// The scores of one class that occurs in the labels or in the predictions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassScore {
    pub label: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Images of this class.
    pub support: u64,
    /// Images predicted (top-1) as this class.
    pub predicted: u64,
}

/// The confusion counts among the most frequent true classes, without the K×K matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct TopConfusion {
    /// The classes shown, in label order.
    pub labels: Vec<usize>,
    /// `counts[i][j]`: images of `labels[i]` predicted as `labels[j]`.
    pub counts: Vec<Vec<u64>>,
    /// All images of `labels[i]`, wherever they were predicted (the row's normalizer).
    pub support: Vec<u64>,
    /// Classes with at least one image, of which `labels` are the most frequent.
    pub classes_present: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub macro_f1: f64,
    /// The classes that occur in the labels or the predictions, in label order.
    pub per_class: Vec<ClassScore>,
    pub confusion: TopConfusion,
}

/// The number of classes `confusion.png` shows.
pub const CONFUSION_CLASSES: usize = 50;

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Metrics over the labeled predictions; None if there are none. Memory is O(classes + images):
/// three counters per class, never a classes × classes matrix.
pub fn compute(preds: &[Prediction], classes: usize) -> Option<Metrics> {
    let labeled: Vec<&Prediction> = preds.iter().filter(|p| p.label.is_some()).collect();
    if labeled.is_empty() {
        return None;
    }
    let n = labeled.len() as f64;
    let (mut support, mut predicted, mut hits) = (vec![0u64; classes], vec![0u64; classes], vec![0u64; classes]);
    let (mut hit1, mut hit5, mut loss) = (0.0, 0.0, 0.0);
    for p in &labeled {
        let y = p.label.expect("labeled");
        let first = p.top[0];
        support[y] += 1;
        predicted[first] += 1;
        if first == y {
            hits[y] += 1;
            hit1 += 1.0;
        }
        hit5 += f64::from(u8::from(p.top.iter().take(5).any(|&c| c == y)));
        loss += f64::from(p.loss.unwrap_or(0.0));
    }
    let per_class: Vec<ClassScore> = (0..classes)
        .filter(|&c| support[c] > 0 || predicted[c] > 0)
        .map(|c| {
            let precision = ratio(hits[c] as f64, predicted[c] as f64);
            let recall = ratio(hits[c] as f64, support[c] as f64);
            let f1 = ratio(2.0 * precision * recall, precision + recall);
            ClassScore { label: c, precision, recall, f1, support: support[c], predicted: predicted[c] }
        })
        .collect();
    let macro_f1 = ratio(per_class.iter().map(|c| c.f1).sum(), per_class.len() as f64);
    Some(Metrics {
        images: labeled.len(),
        top1: hit1 / n,
        top5: hit5 / n,
        loss: loss / n,
        macro_f1,
        per_class,
        confusion: top_confusion(&labeled, &support, CONFUSION_CLASSES),
    })
}

/// The confusion counts among the `n` most frequent true classes (ties: the lower label).
fn top_confusion(labeled: &[&Prediction], support: &[u64], n: usize) -> TopConfusion {
    let mut order: Vec<usize> = (0..support.len()).filter(|&c| support[c] > 0).collect();
    let classes_present = order.len();
    order.sort_by_key(|&c| (std::cmp::Reverse(support[c]), c));
    order.truncate(n);
    order.sort_unstable();
    let pos: std::collections::HashMap<usize, usize> = order.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let mut counts = vec![vec![0u64; order.len()]; order.len()];
    for p in labeled {
        if let (Some(&i), Some(&j)) = (pos.get(&p.label.expect("labeled")), pos.get(&p.top[0])) {
            counts[i][j] += 1;
        }
    }
    let support = order.iter().map(|&c| support[c]).collect();
    TopConfusion { labels: order, counts, support, classes_present }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(row: usize, label: usize, top: &[usize]) -> Prediction {
        Prediction { row, label: Some(label), top: top.to_vec(), loss: Some(0.5) }
    }

    /// Worked by hand, and checked against scikit-learn:
    /// ```python
    /// from sklearn.metrics import f1_score
    /// f1_score([0, 0, 1, 1, 2], [0, 1, 1, 1, 1], average="macro")  # 0.4444444444444444
    /// ```
    /// Class 0: P 1/1, R 1/2, F1 2/3. Class 1: P 2/4, R 2/2, F1 2/3. Class 2: never predicted:
    /// P 0, R 0, F1 0. Class 3 occurs nowhere and is not averaged. Macro-F1 = (4/3) / 3.
    #[test]
    fn macro_f1_counts_classes_never_predicted_as_zero() {
        let preds = [p(0, 0, &[0, 1]), p(1, 0, &[1, 0]), p(2, 1, &[1, 0]), p(3, 1, &[1, 2]), p(4, 2, &[1, 3])];
        let m = compute(&preds, 4).unwrap();
        assert!((m.macro_f1 - 4.0 / 9.0).abs() < 1e-12, "{}", m.macro_f1);
        assert!((m.top1 - 0.6).abs() < 1e-12);
        assert_eq!(
            m.per_class[2],
            ClassScore { label: 2, precision: 0.0, recall: 0.0, f1: 0.0, support: 1, predicted: 0 }
        );
        assert_eq!(m.per_class.len(), 3, "class 3 occurs nowhere and has no row");
        assert_eq!(m.confusion.labels, [0, 1, 2]);
        assert_eq!(m.confusion.counts[0], [1, 1, 0]);
    }

    /// With 3 classes, "top-5" is the top 3: every labeled image is a top-5 hit.
    #[test]
    fn top5_with_fewer_than_five_classes_is_all_classes() {
        let preds = [p(0, 2, &[0, 1, 2]), p(1, 0, &[1, 2, 0])];
        let m = compute(&preds, 3).unwrap();
        assert_eq!(m.top5, 1.0);
        assert_eq!(m.top1, 0.0);
    }

    #[test]
    fn unlabeled_predictions_give_no_metrics() {
        let preds = [Prediction { row: 0, label: None, top: vec![1], loss: None }];
        assert!(compute(&preds, 2).is_none());
    }

    /// The sparse computation against the textbook one with a full confusion matrix, on random
    /// predictions over many classes, some never predicted and some never true.
    #[test]
    fn sparse_metrics_equal_the_full_confusion_matrix_computation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let k = 300;
        let preds: Vec<Prediction> = (0..5_000)
            .map(|row| {
                let y = rng.random_range(0..k / 2) * 2; // odd classes never occur as labels
                let first = if rng.random_bool(0.4) { y } else { rng.random_range(0..k - 20) };
                Prediction { row, label: Some(y), top: vec![first, (first + 1) % k], loss: Some(0.1) }
            })
            .collect();
        let m = compute(&preds, k).unwrap();
        let mut full = vec![vec![0u64; k]; k];
        for p in &preds {
            full[p.label.unwrap()][p.top[0]] += 1;
        }
        let (mut f1_sum, mut present) = (0.0, 0);
        let mut rows = m.per_class.iter();
        for c in 0..k {
            let tp = full[c][c] as f64;
            let support: u64 = full[c].iter().sum();
            let predicted: u64 = full.iter().map(|r| r[c]).sum();
            if support == 0 && predicted == 0 {
                continue;
            }
            let (p, r) = (ratio(tp, predicted as f64), ratio(tp, support as f64));
            let f1 = ratio(2.0 * p * r, p + r);
            f1_sum += f1;
            present += 1;
            let got = rows.next().expect("a row per present class");
            assert_eq!((got.label, got.support, got.predicted), (c, support, predicted));
            assert!((got.f1 - f1).abs() < 1e-12 && (got.precision - p).abs() < 1e-12 && (got.recall - r).abs() < 1e-12);
        }
        assert!(rows.next().is_none());
        assert!((m.macro_f1 - f1_sum / present as f64).abs() < 1e-12);
        let top = &m.confusion;
        assert_eq!(top.labels.len(), CONFUSION_CLASSES);
        assert_eq!(top.classes_present, k / 2);
        let mut supports: Vec<u64> = (0..k).map(|c| full[c].iter().sum()).collect();
        supports.sort_unstable_by(|a, b| b.cmp(a));
        assert!(top.support.iter().all(|&s| s >= supports[CONFUSION_CLASSES - 1]), "the most frequent classes");
        for (i, &a) in top.labels.iter().enumerate() {
            assert_eq!(top.support[i], full[a].iter().sum::<u64>());
            for (j, &b) in top.labels.iter().enumerate() {
                assert_eq!(top.counts[i][j], full[a][b], "({a}, {b})");
            }
        }
    }
}
