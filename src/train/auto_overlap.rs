//! `train.overlap = "auto"`: the run times its first steps with the exchange overlapped with
//! backward and with it after backward, alternating, and keeps the faster way.
//!
//! Overlap is not always faster. On a host whose cores are all busy computing, the exchange's own
//! CPU work (the network stack, the sums) taken into backward slows backward by about as much as
//! it hides (BENCHMARKS.md, "Across hosts": 0.92x at 10 Gb/s on hosts of one core); where the link
//! is slow and the host has time to spare, overlap wins (1.13x at 1 Gb/s). Both ways give the same
//! weights bit for bit, so the choice is only about speed.
//!
//! Every rank must take each step the same way (the exchange after backward starts with a barrier
//! that a rank with overlap would not enter). So the schedule depends only on the step count,
//! which all ranks share, and only rank 0 times and decides: its verdict rides in the step's
//! exchange as one more f32 number that the other ranks set to 0, so the sum is rank 0's value on
//! every rank, exactly, and all switch at the same step with no collective of its own.
use std::time::Instant;

/// Steps with overlap before the trial (the first steps warm up allocators and caches).
pub const WARMUP: usize = 2;
/// Steps of each way in the trial, alternating (so the machine's drift hits both alike).
pub const TRIAL: usize = 4;
/// The trial's steps (0-based step counts): after the warm-up, `TRIAL` of each way.
pub const TRIAL_STEPS: std::ops::Range<usize> = WARMUP..WARMUP + 2 * TRIAL;
/// The exchange after backward is kept only if it is at least this much faster (a tie keeps
/// overlap, which hides more where a node has cores to spare).
pub const MARGIN: f64 = 0.02;

/// Rank 0's verdict as the exchange carries it: no news yet.
pub const NONE: f32 = 0.0;
const OVERLAP: f32 = 1.0;
const AFTER: f32 = 2.0;

/// The trial's state on one rank.
#[derive(Debug)]
pub struct AutoOverlap {
    root: bool,
    /// Steps whose exchange has finished (the same count on every rank).
    steps: usize,
    /// The way chosen, once every rank knows it.
    chosen: Option<bool>,
    /// Rank 0: when the step's backward began, and the times of backward + exchange of each way.
    began: Option<Instant>,
    with: Vec<f64>,
    without: Vec<f64>,
}

impl AutoOverlap {
    pub fn new(root: bool) -> Self {
        AutoOverlap { root, steps: 0, chosen: None, began: None, with: Vec::new(), without: Vec::new() }
    }

    /// Whether the step about to begin starts its buckets during backward.
    pub fn overlap_now(&self) -> bool {
        self.chosen.unwrap_or_else(|| trial_way(self.steps))
    }

    /// The step's backward begins (forward, data and optimizer do not depend on the way, and an
    /// epoch's end, with its validation and checkpoint, falls outside).
    pub fn began(&mut self) {
        if self.root {
            self.began = Some(Instant::now());
        }
    }

    /// The number this rank adds to the step's exchange: rank 0's verdict once its trial is
    /// complete (until every rank has learnt it), else `NONE`.
    pub fn verdict(&self) -> f32 {
        if !self.root || self.chosen.is_some() || self.with.len() < TRIAL || self.without.len() < TRIAL {
            return NONE;
        }
        if prefer_overlap(&self.with, &self.without) {
            OVERLAP
        } else {
            AFTER
        }
    }

    /// After a step's exchange: `overlapped` is how the step went, `sum` the verdicts summed
    /// over the ranks. Returns the line to log when the choice is made now.
    pub fn finished(&mut self, overlapped: bool, sum: f32) -> Option<String> {
        if let Some(began) = self.began.take() {
            // Trial steps are timed, from backward to the end of the exchange; the warm-up is not.
            if self.chosen.is_none() && TRIAL_STEPS.contains(&self.steps) {
                let t = began.elapsed().as_secs_f64();
                if overlapped {
                    self.with.push(t);
                } else {
                    self.without.push(t);
                }
            }
        }
        self.steps += 1;
        if self.chosen.is_some() || sum == NONE {
            return None;
        }
        let overlap = sum == OVERLAP;
        self.chosen = Some(overlap);
        let (with, without) = (median(&self.with), median(&self.without));
        let way = if overlap { "with overlap" } else { "after backward" };
        Some(if self.root {
            format!(
                "train.overlap = \"auto\": the exchange runs {way} from now on (backward and exchange took {with:.3} s \
                 with overlap, {without:.3} s after backward: medians of {TRIAL} steps each; after backward must be \
                 {:.0} % faster to be chosen)",
                100.0 * MARGIN
            )
        } else {
            format!("train.overlap = \"auto\": the exchange runs {way} from now on (rank 0's trial)")
        })
    }
}

/// The trial's schedule: overlap while warming up and after the trial (until the verdict
/// arrives); in between, with and without by turns.
fn trial_way(step: usize) -> bool {
    !TRIAL_STEPS.contains(&step) || (step - TRIAL_STEPS.start) % 2 == 0
}

/// Overlap unless the exchange after backward was faster by more than `MARGIN` (medians).
fn prefer_overlap(with: &[f64], without: &[f64]) -> bool {
    median(without) >= (1.0 - MARGIN) * median(with)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_with_overlap_then_alternates_then_waits_with_overlap() {
        let ways: Vec<bool> = (0..TRIAL_STEPS.end + 2).map(trial_way).collect();
        assert_eq!(ways, [true, true, true, false, true, false, true, false, true, false, true, true]);
        assert_eq!(ways[TRIAL_STEPS].iter().filter(|&&w| w).count(), TRIAL);
    }

    #[test]
    fn after_backward_is_chosen_only_when_clearly_faster() {
        assert!(prefer_overlap(&[1.0, 1.0, 1.0, 1.0], &[1.2, 1.1, 1.3, 1.2]));
        assert!(prefer_overlap(&[1.0, 1.0, 1.0, 1.0], &[0.99, 0.99, 0.99, 0.99]), "a tie keeps overlap");
        assert!(!prefer_overlap(&[1.49, 1.5, 1.48, 2.0], &[1.37, 1.36, 5.0, 1.38]), "medians, not means");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// Two ranks in step: the same way every step, the verdict only from rank 0, and both switch
    /// at the step after the one whose exchange carried it.
    #[test]
    fn every_rank_takes_every_step_the_same_way_and_switches_together() {
        let (mut root, mut other) = (AutoOverlap::new(true), AutoOverlap::new(false));
        let mut ways = Vec::new();
        let mut logs = Vec::new();
        for step in 0..20 {
            let way = root.overlap_now();
            assert_eq!(way, other.overlap_now(), "step {step}");
            root.began();
            other.began();
            ways.push(way);
            // Steps without overlap are made slower, so rank 0 has a clear case... for overlap.
            if !way && TRIAL_STEPS.contains(&step) {
                std::thread::sleep(std::time::Duration::from_millis(4));
            }
            assert_eq!(other.verdict(), NONE);
            let sum = root.verdict() + other.verdict();
            if let Some(l) = root.finished(way, sum) {
                logs.push((step, l));
            }
            other.finished(way, sum);
        }
        let decided = TRIAL_STEPS.end;
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].0, decided, "the verdict rides in the first step after the trial");
        assert!(logs[0].1.contains("with overlap from now on"), "{}", logs[0].1);
        assert_eq!(root.chosen, Some(true));
        assert_eq!(other.chosen, Some(true));
        assert!(ways[decided..].iter().all(|&w| w));
    }

    #[test]
    fn a_faster_exchange_after_backward_is_kept() {
        let mut a = AutoOverlap::new(true);
        a.with = vec![1.5; TRIAL];
        a.without = vec![1.3; TRIAL];
        a.steps = TRIAL_STEPS.end;
        let v = a.verdict();
        assert_eq!(v, AFTER);
        let line = a.finished(true, v).expect("a verdict");
        assert!(line.contains("after backward from now on") && line.contains("1.500 s with overlap"), "{line}");
        assert!(!a.overlap_now());
        assert_eq!(a.verdict(), NONE, "told once");
    }
}
