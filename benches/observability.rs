//! What rank 0's reporting adds to a training step: the bookkeeping of every step, a progress
//! line with its `metrics.jsonl` interval, and timeline spans (window closed and open).
//!
//! ```text
//! cargo bench --bench observability 2>/dev/null     # stderr: the progress lines it writes
//! ```
//! Prints one JSON line of nanoseconds per call; bench/logging_cost.sh divides them by the step
//! time of a real run measured in the same session.
use std::time::{Duration, Instant};

use sac::train::metrics::Stream;
use sac::train::progress::{Reporter, Times};

/// Median over 5 timed repetitions of `n` calls, in ns per call.
fn per_call(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let mut v: Vec<f64> = (0..6)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .skip(1)
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("sac.log");
    sac::logging::init(0, 1, 0, false, Some(&log))?;
    let times = Times { data: Duration::from_micros(50), compute: Duration::from_millis(900), ..Times::default() };
    let steps = 1_000_000;

    // Every step's bookkeeping, no interval due (log_every = 1 h).
    let mut r = Reporter::new(Stream::open(dir.path(), None, false)?, Duration::from_secs(3600), 3);
    r.start_epoch(1, steps);
    let step = per_call(100_000, |i| r.step(128.0, 230.0, &times, i64::from(i), 4e-4));

    // An interval every step: a progress line (to stderr and sac.log) and a metrics.jsonl line.
    let mut r = Reporter::new(Stream::open(dir.path(), None, false)?, Duration::from_nanos(1), 3);
    r.start_epoch(1, steps);
    let line = per_call(2_000, |i| r.step(128.0, 230.0, &times, i64::from(i), 4e-4));

    // A timeline span with the window closed (every step makes a few) and open.
    let t = Instant::now();
    let closed =
        per_call(1_000_000, |i| sac::timeline::span("compute", "forward + backward", t, t, Some(u64::from(i))));
    sac::timeline::set_recording(true);
    let open = per_call(20_000, |i| sac::timeline::span("compute", "forward + backward", t, t, Some(u64::from(i))));
    sac::timeline::set_recording(false);

    println!(
        "{{\"step_ns\": {step:.1}, \"interval_line_ns\": {line:.1}, \"span_closed_ns\": {closed:.1}, \"span_open_ns\": {open:.1}}}"
    );
    Ok(())
}
