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

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassScore>,
    /// `confusion[true][predicted]`, counts.
    pub confusion: Vec<Vec<u64>>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Metrics over the labeled predictions; None if there are none.
pub fn compute(preds: &[Prediction], classes: usize) -> Option<Metrics> {
    let labeled: Vec<&Prediction> = preds.iter().filter(|p| p.label.is_some()).collect();
    if labeled.is_empty() {
        return None;
    }
    let n = labeled.len() as f64;
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut hit1, mut hit5, mut loss) = (0.0, 0.0, 0.0);
    for p in &labeled {
        let y = p.label.expect("labeled");
        let first = p.top[0];
        confusion[y][first] += 1;
        hit1 += f64::from(u8::from(first == y));
        hit5 += f64::from(u8::from(p.top.iter().take(5).any(|&c| c == y)));
        loss += f64::from(p.loss.unwrap_or(0.0));
    }
    let mut per_class = Vec::with_capacity(classes);
    let (mut f1_sum, mut present) = (0.0, 0usize);
    for c in 0..classes {
        let tp = confusion[c][c] as f64;
        let support: u64 = confusion[c].iter().sum();
        let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
        let precision = ratio(tp, predicted as f64);
        let recall = ratio(tp, support as f64);
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        if support > 0 || predicted > 0 {
            f1_sum += f1;
            present += 1;
        }
        per_class.push(ClassScore { precision, recall, f1, support: support as usize });
    }
    Some(Metrics {
        images: labeled.len(),
        top1: hit1 / n,
        top5: hit5 / n,
        loss: loss / n,
        macro_f1: ratio(f1_sum, present as f64),
        per_class,
        confusion,
    })
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
        assert_eq!(m.per_class[2], ClassScore { precision: 0.0, recall: 0.0, f1: 0.0, support: 1 });
        assert_eq!(m.per_class[3].support, 0);
        assert_eq!(m.confusion[0], [1, 1, 0, 0]);
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
}
