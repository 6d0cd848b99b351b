//! tracing set-up: every line tagged with the MPI rank, to stderr and to the log file; progress
//! (rank 0 only) as bars on a terminal and as periodic log lines in batch logs.
//!
//! On stderr, rank 0 logs at info and the other ranks only warnings and errors (unless -v), so a
//! job log is not N copies of one story; the log file takes every rank's info lines.
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{info, Level};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROGRESS: OnceLock<MultiProgress> = OnceLock::new();
static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once `init` has installed the logger (error paths then log instead of printing).
pub fn is_on() -> bool {
    ON.load(std::sync::atomic::Ordering::SeqCst)
}

fn multi() -> &'static MultiProgress {
    PROGRESS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)))
}

/// A progress bar on rank 0's stderr (hidden on other ranks and when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = multi().add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}

/// Writes log lines above any live progress bar.
#[derive(Clone, Copy)]
struct StderrAboveBars;

impl Write for StderrAboveBars {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        multi().suspend(|| io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for StderrAboveBars {
    type Writer = StderrAboveBars;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// `2026-11-26T14:00:00.123Z  INFO [rank 0] message key=value`
struct RankFormat {
    rank: usize,
    size: usize,
}

impl<S, N> FormatEvent<S, N> for RankFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let now = humantime_utc();
        let level = *event.metadata().level();
        let tag = if self.size > 1 { format!(" [rank {}]", self.rank) } else { String::new() };
        write!(w, "{now} {level:>5}{tag} ")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// UTC time with milliseconds, without pulling in a date crate.
fn humantime_utc() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Installs the subscriber: stderr (level from -v/-q or RUST_LOG) plus, if given, the log file
/// (always at info or finer). Call once per process.
pub fn init(rank: usize, size: usize, verbose: u8, quiet: bool, log_file: Option<&Path>) -> Result<()> {
    let default = match (quiet, verbose) {
        (true, _) => Level::WARN,
        (_, 0) => Level::INFO,
        (_, 1) => Level::DEBUG,
        _ => Level::TRACE,
    };
    // Other ranks tell stderr only what goes wrong; rank 0 tells the story.
    let stderr_default = if rank > 0 && verbose == 0 && default == Level::INFO { Level::WARN } else { default };
    let filter = |level: Level| {
        EnvFilter::builder()
            .with_default_directive(level.into())
            .from_env_lossy()
            // Third-party crates stay at warn unless RUST_LOG asks for them.
            .add_directive("polars=warn".parse().expect("directive"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .event_format(RankFormat { rank, size })
        .with_writer(StderrAboveBars)
        .with_filter(filter(stderr_default));
    let file_layer = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {} (paths.log_file)", path.display()))?;
            let level = if default < Level::INFO { Level::INFO } else { default };
            Some(
                tracing_subscriber::fmt::layer()
                    .event_format(RankFormat { rank, size: size.max(2) })
                    .with_writer(std::sync::Mutex::new(file))
                    .with_ansi(false)
                    .with_filter(tracing_subscriber::filter::LevelFilter::from_level(level)),
            )
        }
        None => None,
    };
    tracing_subscriber::registry().with(stderr).with(file_layer).try_init().context("installing the logger")?;
    ON.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// True when progress goes out as log lines (stderr is a file or a pipe, as in every batch job)
/// rather than as bars (stderr is a terminal).
pub fn progress_as_lines() -> bool {
    !io::stderr().is_terminal()
}

/// A duration for people: `12s`, `4m05s`, `2h03m`, `3d04h`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// When rank 0 last reported progress, and how often it means to: `Dist`'s waits read it, so a wait
/// that keeps rank 0 silent for twice the interval says so in the log (and names the ranks it waits
/// for) instead of leaving a gap that looks like a hang.
static SPOKEN: std::sync::Mutex<Option<(Instant, Duration)>> = std::sync::Mutex::new(None);

/// Rank 0 starts reporting progress every `every` (zero: it does not).
pub fn progress_clock(every: Duration) {
    *SPOKEN.lock().unwrap_or_else(|e| e.into_inner()) = (!every.is_zero()).then(|| (Instant::now(), every));
}

/// Rank 0 has just reported progress.
pub fn progress_spoken() {
    if let Some((t, _)) = SPOKEN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        *t = Instant::now();
    }
}

/// How long rank 0 has been silent, and its interval (None: it does not report progress).
pub fn progress_silence() -> Option<(Duration, Duration)> {
    SPOKEN.lock().unwrap_or_else(|e| e.into_inner()).map(|(t, every)| (t.elapsed(), every))
}

/// Progress of a long loop over items on rank 0: a bar on a terminal; in a batch log, one info line
/// every `every` (done / total, rate recent and mean, elapsed, ETA), so a job's log shows it moving.
pub struct Progress {
    bar: ProgressBar,
    what: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    /// Lines: the interval, and where the last line left off.
    every: Option<Duration>,
    last: (Instant, u64),
    show: bool,
}

impl Progress {
    /// `show`: this process reports progress (rank 0). `every`: the line interval (zero: no lines).
    pub fn new(what: &str, unit: &'static str, total: u64, show: bool, every: Duration) -> Progress {
        let lines = show && progress_as_lines() && !every.is_zero();
        let now = Instant::now();
        Progress {
            bar: progress_bar(total, what, show && !lines),
            what: what.to_string(),
            unit,
            total,
            done: 0,
            start: now,
            every: lines.then_some(every),
            last: (now, 0),
            show,
        }
    }

    /// `n` more items done.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        self.bar.inc(n);
        match self.every {
            Some(every) if self.last.0.elapsed() >= every => self.line(),
            Some(_) => {}
            // The bar shows it: a wait after this is not a silence.
            None if self.show => progress_spoken(),
            None => {}
        }
    }

    fn line(&mut self) {
        let now = Instant::now();
        let elapsed = (now - self.start).as_secs_f64();
        let recent = (self.done - self.last.1) as f64 / (now - self.last.0).as_secs_f64().max(1e-9);
        let mean = self.done as f64 / elapsed.max(1e-9);
        let left = if self.done == 0 { f64::NAN } else { self.total.saturating_sub(self.done) as f64 / mean };
        info!(
            "{}: {}/{} {} ({:.1} %), {recent:.0} {}/s (mean {mean:.0}), elapsed {}, ETA {}",
            self.what,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            self.unit,
            duration(elapsed),
            duration(left)
        );
        self.last = (now, self.done);
        progress_spoken();
    }

    /// The loop ended: clears the bar; in lines mode, a last line if the last one is not current.
    pub fn finish(&mut self) {
        self.bar.finish_and_clear();
        if self.every.is_some() && self.last.1 != self.done {
            self.line();
        }
    }
}

/// Rank 0's closing line from every rank's (peak memory MiB, CPU seconds):
/// `done: {what}; peak memory per rank 830, 685 MiB, CPU per rank 55.0, 53.3 s`.
pub fn done(what: &str, ranks: &[(f64, f64)]) {
    match ranks {
        [(rss, cpu)] => info!("done: {what}; peak memory {rss:.0} MiB, CPU {cpu:.1} s"),
        _ => {
            let rss: Vec<String> = ranks.iter().map(|r| format!("{:.0}", r.0)).collect();
            let cpu: Vec<String> = ranks.iter().map(|r| format!("{:.1}", r.1)).collect();
            info!("done: {what}; peak memory per rank {} MiB, CPU per rank {} s", rss.join(", "), cpu.join(", "));
        }
    }
}

/// A byte count for people: `812 B`, `3.4 MiB`, `12.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_people_write_them() {
        use super::duration;
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.4), "59s");
        assert_eq!(duration(65.0), "1m05s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(duration(f64::NAN), "?");
    }

    #[test]
    fn utc_timestamp_has_the_iso_shape() {
        let t = super::humantime_utc();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
