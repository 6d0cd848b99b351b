//! What rank 0 tells while training runs: every `train.log_every` seconds and at the end of each
//! epoch's steps, an interval (a progress line in batch logs, a line of `metrics.jsonl`); after
//! each epoch, its record. On a terminal the progress bar stays, and the stream is written alike.
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::metrics::{self, Line, Shares, Stream};
use crate::infra::logging::duration;
use crate::record::EpochRecord;

/// Where the time of steps went, summed over them (each rank its own).
#[derive(Default, Clone, Copy)]
pub struct Times {
    pub data: Duration,
    pub compute: Duration,
    pub comm: Duration,
    /// The part of `comm` spent waiting for the other ranks to arrive.
    pub wait: Duration,
    pub optim: Duration,
}

impl Times {
    pub fn shares(&self) -> Shares {
        let total = (self.data + self.compute + self.comm + self.optim).as_secs_f64().max(1e-9);
        let f = |d: Duration| d.as_secs_f64() / total;
        Shares {
            data: f(self.data),
            compute: f(self.compute),
            exchange: f(self.comm),
            exchange_wait: f(self.wait),
            optimizer: f(self.optim),
        }
    }

    pub fn add(&mut self, o: &Times) {
        self.data += o.data;
        self.compute += o.compute;
        self.comm += o.comm;
        self.wait += o.wait;
        self.optim += o.optim;
    }
}

/// `data 1 %, compute 80 %, allreduce 14 %, optimizer 5 %`, and when ranks waited for each other
/// before the exchange (0.5 % or more): `allreduce 14 % (of it waiting for ranks 6 %)`.
pub fn shares_text(s: &Shares) -> String {
    let wait = if s.exchange_wait >= 0.005 {
        format!(" (of it waiting for ranks {:.0} %)", 100.0 * s.exchange_wait)
    } else {
        String::new()
    };
    format!(
        "data {:.0} %, compute {:.0} %, allreduce {:.0} %{wait}, optimizer {:.0} %",
        100.0 * s.data,
        100.0 * s.compute,
        100.0 * s.exchange,
        100.0 * s.optimizer
    )
}

/// Rank 0's account of the run.
pub struct Reporter {
    every: Duration,
    lines: bool,
    /// None once a write failed (a full disk must not end the run: the log says so once).
    stream: Option<Stream>,
    run_start: Instant,
    epochs: u32,
    // The epoch under way.
    epoch: u32,
    steps: usize,
    epoch_start: Instant,
    epoch_images: f64,
    done: usize,
    // The interval under way.
    since: Instant,
    since_step: usize,
    images: f64,
    loss: f64,
    times: Times,
    /// When the last epoch's steps ended, and how long it then spent on validation and its
    /// checkpoint (for the run's ETA).
    steps_end: Option<Instant>,
    epoch_tail: Option<f64>,
}

impl Reporter {
    /// `every`: the interval (zero: only the end of each epoch's steps is recorded, and no lines).
    pub fn new(stream: Stream, every: Duration, epochs: u32) -> Reporter {
        let now = Instant::now();
        let lines = crate::infra::logging::progress_as_lines() && !every.is_zero();
        crate::infra::logging::progress_clock(every);
        Reporter {
            every,
            lines,
            stream: Some(stream),
            run_start: now,
            epochs,
            epoch: 0,
            steps: 0,
            epoch_start: now,
            epoch_images: 0.0,
            done: 0,
            since: now,
            since_step: 0,
            images: 0.0,
            loss: 0.0,
            times: Times::default(),
            steps_end: None,
            epoch_tail: None,
        }
    }

    pub fn start_epoch(&mut self, epoch: u32, steps: usize) {
        let now = Instant::now();
        if let Some(end) = self.steps_end.take() {
            self.epoch_tail = Some((now - end).as_secs_f64());
        }
        (self.epoch, self.steps, self.epoch_start, self.epoch_images, self.done) = (epoch, steps, now, 0.0, 0);
        (self.since, self.since_step, self.images, self.loss, self.times) = (now, 0, 0.0, 0.0, Times::default());
        crate::infra::logging::progress_spoken();
    }

    /// One more step done: `images` of all ranks with summed loss `loss_sum` (0 images: a step left
    /// out), and this rank's time spent in it.
    pub fn step(&mut self, images: f64, loss_sum: f64, times: &Times, global_step: i64, lr: f64) {
        self.done += 1;
        self.epoch_images += images;
        if images > 0.0 && loss_sum.is_finite() {
            self.images += images;
            self.loss += loss_sum;
        }
        self.times.add(times);
        if !self.every.is_zero() && self.since.elapsed() >= self.every && self.done < self.steps {
            self.interval(global_step, lr);
        }
    }

    /// The epoch's steps are done: the last interval.
    pub fn end_steps(&mut self, global_step: i64, lr: f64) {
        if self.done > self.since_step {
            self.interval(global_step, lr);
        }
        self.steps_end = Some(Instant::now());
    }

    /// Appends a line to metrics.jsonl; after a failed write, warns once and writes no more.
    fn append(&mut self, line: &Line) {
        if let Some(stream) = self.stream.as_mut() {
            if let Err(e) = stream.append(line) {
                warn!("{e:#}; training goes on without metrics.jsonl for the rest of this run");
                self.stream = None;
            }
        }
    }

    /// The metrics.jsonl being written (None after a failed write).
    pub fn file(&self) -> Option<&std::path::Path> {
        self.stream.as_ref().map(Stream::current)
    }

    /// The run has saved its first epoch: its stream replaces an old run's (see `Stream::open`).
    pub fn publish(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            if let Err(e) = stream.publish() {
                warn!("{e:#}; training goes on without metrics.jsonl for the rest of this run");
                self.stream = None;
            }
        }
    }

    fn interval(&mut self, global_step: i64, lr: f64) {
        let now = Instant::now();
        let seconds = (now - self.since).as_secs_f64().max(1e-9);
        let in_epoch = (now - self.epoch_start).as_secs_f64().max(1e-9);
        let per_step = in_epoch / self.done.max(1) as f64;
        let eta_epoch = (self.steps - self.done) as f64 * per_step;
        let tail = self.epoch_tail.unwrap_or(0.0);
        let eta_run = eta_epoch + tail + f64::from(self.epochs - self.epoch) * (self.steps as f64 * per_step + tail);
        let iv = metrics::Interval {
            unix_time: metrics::unix_time(),
            epoch: self.epoch,
            step: self.done,
            steps: self.steps,
            interval_steps: self.done - self.since_step,
            global_step,
            images: self.images as u64,
            loss: (self.images > 0.0).then(|| self.loss / self.images),
            seconds,
            images_per_second: self.images / seconds,
            epoch_images_per_second: self.epoch_images / in_epoch,
            lr,
            elapsed: (now - self.run_start).as_secs_f64(),
            eta_epoch,
            eta_run,
            shares: self.times.shares(),
        };
        if self.lines {
            info!(
                "epoch {}/{}, step {}/{} ({:.0} %): {:.0} img/s (epoch {:.0}), loss {:.4}, lr {:.3e}, elapsed {}, \
                 ETA epoch {}, run {}; rank 0: {}",
                iv.epoch,
                self.epochs,
                iv.step,
                iv.steps,
                100.0 * iv.step as f64 / iv.steps.max(1) as f64,
                iv.images_per_second,
                iv.epoch_images_per_second,
                iv.loss.unwrap_or(f64::NAN),
                iv.lr,
                duration(iv.elapsed),
                duration(iv.eta_epoch),
                duration(iv.eta_run),
                shares_text(&iv.shares)
            );
        }
        // Reported (a line, or on a terminal the bar and metrics.jsonl): not a silence.
        crate::infra::logging::progress_spoken();
        self.append(&Line::Interval(iv));
        (self.since, self.since_step, self.images, self.loss, self.times) =
            (now, self.done, 0.0, 0.0, Times::default());
    }

    /// The epoch is done: its record (as in state.json), how long validation took, the epoch's
    /// time shares (rank 0's).
    pub fn epoch_done(&mut self, record: &EpochRecord, validation_seconds: f64, shares: Shares, global_step: i64) {
        self.append(&Line::Epoch(metrics::Epoch {
            unix_time: metrics::unix_time(),
            global_step,
            record: record.clone(),
            validation_seconds,
            shares,
        }));
        crate::infra::logging::progress_spoken();
    }
}
