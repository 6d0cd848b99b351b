//! `--timeline FILE`: what every rank did and when, as a Chrome trace (Trace Event Format, JSON),
//! which Perfetto (https://ui.perfetto.dev) and chrome://tracing open, and
//! `scripts/timeline_png.py` renders. One process per rank ("rank 3 (host)"), one track per
//! thread (main, loader), complete ("X") events whose category names the kind of work.
//!
//! Recording is off unless a window is open (`set_recording`): a span then costs a clock read and a
//! push under a mutex; outside the window one atomic load. Each rank keeps its own events in
//! memory (at most `MAX_EVENTS`); at the end of the window every rank hands them to rank 0
//! (`Dist::gather_bytes`), which writes the file atomically.
//!
//! Times are the ranks' wall clocks (microseconds since the Unix epoch, shifted so the trace
//! starts at 0): exact between ranks on one host, as good as NTP/PTP across hosts.
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Events one rank keeps at most (about 100 bytes each); later ones are counted, not kept.
pub const MAX_EVENTS: usize = 200_000;

static ON: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());
static THREADS: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// One span of one thread of this rank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub name: String,
    pub cat: String,
    pub tid: u32,
    /// Start, microseconds since the Unix epoch.
    pub ts: f64,
    /// Length in microseconds.
    pub dur: f64,
    /// The step (train) or batch (evaluate) it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// What a rank sends rank 0 at the end of the window.
#[derive(Debug, Serialize, Deserialize)]
pub struct RankTrace {
    pub rank: usize,
    pub host: String,
    pub threads: Vec<(u32, String)>,
    pub events: Vec<Event>,
    pub dropped: u64,
}

/// `Instant` → microseconds since the Unix epoch, through one reading of both clocks.
fn micros(t: Instant) -> f64 {
    static ORIGIN: OnceLock<(Instant, f64)> = OnceLock::new();
    let (i0, u0) = *ORIGIN.get_or_init(|| {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        (Instant::now(), wall.as_secs_f64() * 1e6)
    });
    if t >= i0 {
        u0 + (t - i0).as_secs_f64() * 1e6
    } else {
        u0 - (i0 - t).as_secs_f64() * 1e6
    }
}

/// Is a window open?
pub fn recording() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Opens or closes the window.
pub fn set_recording(on: bool) {
    micros(Instant::now()); // fix the clock origin before the first span
    ON.store(on, Ordering::Relaxed);
}

/// Names the calling thread's track (`tid` 0 is the main thread, named "main" by default).
pub fn name_thread(tid: u32, name: &str) {
    TID.with(|t| t.set(tid));
    let mut threads = THREADS.lock().unwrap_or_else(|e| e.into_inner());
    if !threads.iter().any(|(t, _)| *t == tid) {
        threads.push((tid, name.to_string()));
    }
}

/// Records a span of the calling thread from `start` to `end` (if a window is open).
pub fn span(cat: &str, name: impl Into<String>, start: Instant, end: Instant, step: Option<u64>) {
    if !recording() {
        return;
    }
    let ev = Event {
        name: name.into(),
        cat: cat.to_string(),
        tid: TID.with(Cell::get),
        ts: micros(start),
        dur: micros(end) - micros(start),
        step,
    };
    let mut events = EVENTS.lock().unwrap_or_else(|e| e.into_inner());
    if events.len() < MAX_EVENTS {
        events.push(ev);
    } else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Records a span from `start` to now; returns now (the start of what follows).
pub fn since(cat: &str, name: impl Into<String>, start: Instant, step: Option<u64>) -> Instant {
    let now = Instant::now();
    span(cat, name, start, now, step);
    now
}

/// A span from its creation to its drop.
pub struct Span {
    cat: &'static str,
    name: &'static str,
    start: Instant,
    step: Option<u64>,
}

impl Span {
    pub fn new(cat: &'static str, name: &'static str, start: Instant, step: Option<u64>) -> Span {
        Span { cat, name, start, step }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        span(self.cat, self.name, self.start, Instant::now(), self.step);
    }
}

/// Closes the window and takes this rank's events, as the bytes to gather.
pub fn take(rank: usize) -> Vec<u8> {
    set_recording(false);
    let events = std::mem::take(&mut *EVENTS.lock().unwrap_or_else(|e| e.into_inner()));
    let threads = THREADS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let trace = RankTrace {
        rank,
        host: crate::infra::process::hostname(),
        threads,
        events,
        dropped: DROPPED.swap(0, Ordering::Relaxed),
    };
    serde_json::to_vec(&trace).expect("a trace serializes")
}

/// Rank 0: the gathered parts as one Chrome trace JSON document.
pub fn chrome_trace(parts: &[Vec<u8>], command: &str, window: &str) -> Result<serde_json::Value> {
    let ranks: Vec<RankTrace> =
        parts.iter().map(|b| serde_json::from_slice(b).context("a rank's timeline part")).collect::<Result<_>>()?;
    let t0 = ranks.iter().flat_map(|r| r.events.iter().map(|e| e.ts)).fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    let mut out = Vec::new();
    let mut dropped = 0;
    for r in &ranks {
        let pid = r.rank;
        dropped += r.dropped;
        out.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                        "args": {"name": format!("rank {pid} ({})", r.host)}}));
        out.push(json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                        "args": {"sort_index": pid}}));
        let mut threads = r.threads.clone();
        if !threads.iter().any(|(t, _)| *t == 0) {
            threads.push((0, "main".into()));
        }
        for (tid, name) in threads {
            out.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}));
        }
        for e in &r.events {
            let mut ev = json!({"ph": "X", "name": e.name, "cat": e.cat, "pid": pid, "tid": e.tid,
                                "ts": round3(e.ts - t0), "dur": round3(e.dur.max(0.0))});
            if let Some(s) = e.step {
                ev["args"] = json!({ "step": s });
            }
            out.push(ev);
        }
    }
    Ok(json!({
        "displayTimeUnit": "ms",
        "otherData": {
            "command": command,
            "ranks": ranks.len(),
            "window": window,
            "dropped_events": dropped,
            "clock": "each rank's wall clock; 0 = the first event",
            "sac": env!("CARGO_PKG_VERSION"),
        },
        "traceEvents": out,
    }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Rank 0, before any work: can the trace be written at `path`? (Found out at the start rather
/// than after the window's epoch.)
pub fn prepare(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {} (timeline.file)", dir.display()))?;
    }
    let tmp = crate::infra::files::temp_beside(path);
    std::fs::write(&tmp, b"")
        .with_context(|| format!("cannot write the timeline {} (timeline.file)", path.display()))?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// Rank 0: writes the gathered parts to `path` (through a temporary file and a rename).
pub fn write(path: &Path, parts: &[Vec<u8>], command: &str, window: &str) -> Result<()> {
    let doc = chrome_trace(parts, command, window)?;
    let events = doc["traceEvents"].as_array().map_or(0, Vec::len);
    let dropped = doc["otherData"]["dropped_events"].as_u64().unwrap_or(0);
    let bytes = serde_json::to_vec(&doc)?;
    crate::infra::files::replace_with(path, |tmp| Ok(std::fs::write(tmp, &bytes)?))
        .context("the timeline (timeline.file)")?;
    if dropped > 0 {
        tracing::warn!(
            "timeline: {dropped} span(s) past {MAX_EVENTS} per rank were left out; use a smaller timeline.steps"
        );
    }
    tracing::info!(
        "timeline of {window} ({events} events) written to {}: open it at https://ui.perfetto.dev or render it with \
         scripts/timeline_png.py",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_names_every_rank_and_thread_and_starts_at_zero() {
        let ev = |ts: f64, cat: &str| Event { name: cat.into(), cat: cat.into(), tid: 0, ts, dur: 5.0, step: Some(1) };
        let part = |rank: usize, ts: f64| {
            serde_json::to_vec(&RankTrace {
                rank,
                host: "h".into(),
                threads: vec![(1, "loader".into())],
                events: vec![ev(ts, "compute"), ev(ts + 10.0, "exchange")],
                dropped: 0,
            })
            .unwrap()
        };
        let doc = chrome_trace(&[part(0, 1000.0), part(1, 1002.0)], "train", "steps 1-2").unwrap();
        let evs = doc["traceEvents"].as_array().unwrap();
        let x: Vec<_> = evs.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(x.len(), 4);
        assert_eq!(x[0]["ts"], 0.0);
        assert_eq!(x[2]["ts"], 2.0);
        assert_eq!(x[2]["pid"], 1);
        let names: Vec<_> = evs.iter().filter(|e| e["name"] == "thread_name").map(|e| &e["args"]["name"]).collect();
        assert_eq!(names, ["loader", "main", "loader", "main"]);
        assert_eq!(evs.iter().filter(|e| e["name"] == "process_name").count(), 2);
    }

    #[test]
    fn spans_are_kept_only_while_the_window_is_open() {
        let t = Instant::now();
        span("compute", "outside", t, t, None);
        set_recording(true);
        span("compute", "inside", t, Instant::now(), Some(3));
        let part: RankTrace = serde_json::from_slice(&take(0)).unwrap();
        assert!(!recording());
        assert_eq!(part.events.len(), 1);
        assert_eq!(part.events[0].name, "inside");
        assert!(part.events[0].dur >= 0.0);
    }
}
