//! `create-dataset` at Herbarium 2021 scale, without any image files.
//!
//! The real Herbarium 2021 train `metadata.json` lists 2.26 M images in 64,500 categories. This
//! benchmark writes a synthetic file of that shape (2.3 M images, every one annotated) into a temporary
//! directory, then times the three steps of `create-dataset` that do not touch image files, each on
//! its own: reading the metadata (`coco::read`), drawing a 1 % sample and splitting it
//! (`sample::choose`) and writing the CSVs (`write::write_csvs`). For each step it prints the wall
//! time, the CPU time and the peak resident memory (`VmHWM`).
//!
//! ```text
//! cargo bench --bench metadata
//! SAC_BENCH_IMAGES=20000 SAC_BENCH_CATEGORIES=500 cargo bench --bench metadata   # smoke run
//! ```
//!
//! `SAC_BENCH_IMAGES` and `SAC_BENCH_CATEGORIES` set the size. Without them the full size is used
//! under `cargo bench`, and a small one when cargo runs the target as a test (`cargo test --benches`
//! or `--all-targets`, which do not pass `--bench`). The file goes to the system temporary directory
//! (`TMPDIR`), about 185 bytes per image. It has just been written, so it is read from the page cache:
//! the parse time is CPU time, and a cold read from a cluster file system comes on top of it. The
//! parse is single-threaded, so a wall time well above the CPU time means the machine was busy.
//!
//! Memory is read from `/proc/self/status` (Linux). The high-water mark is reset before each step by
//! writing "5" to `/proc/self/clear_refs`, so each step's peak is its own; the output says so if the
//! reset fails.
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sac::config::Sample;
use sac::dataset::{coco, sample, write};

/// Herbarium 2021 scale, rounded up: 2.26 M images in 64,500 categories.
const FULL: Size = Size { images: 2_300_000, categories: 64_500 };
/// What a test run of the target uses: enough for a 1 % sample with a non-empty test split.
const SMOKE: Size = Size { images: 20_000, categories: 500 };

/// The sample `create-dataset` is measured with, and its split.
const SAMPLE: Sample = Sample::Fraction(0.01);
const TEST_FRACTION: f64 = 0.2;
const SEED: u64 = 0;

#[derive(Debug, Clone, Copy)]
struct Size {
    images: u64,
    categories: u64,
}

fn main() -> Result<()> {
    let size = size()?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let metadata = dir.path().join("metadata.json");
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    println!("sac create-dataset metadata benchmark");
    println!("machine   {}", machine());
    let baseline = Memory::now();
    let mut peak = PeakRss::default();

    peak.reset();
    let clock = Clock::start();
    let bytes = generate(&metadata, size).with_context(|| format!("writing {}", metadata.display()))?;
    let generated = clock.stop("generate");
    println!(
        "metadata  {} images, {} categories, {} ({})",
        thousands(size.images),
        thousands(size.categories),
        mib(bytes),
        metadata.display()
    );

    peak.reset();
    let clock = Clock::start();
    let source = coco::read(&metadata).context("reading the synthetic metadata")?;
    let read = clock.stop("read (parse)");
    // Everything written must have been read back, or the timing is of a different job.
    if source.items.len() as u64 != size.images || source.categories.len() as u64 != size.categories {
        bail!(
            "read {} images in {} categories, {} in {} were written",
            source.items.len(),
            source.categories.len(),
            size.images,
            size.categories
        );
    }

    peak.reset();
    let clock = Clock::start();
    let split = sample::choose(&source, SAMPLE, TEST_FRACTION, false, SEED).context("sampling")?;
    let sampled = clock.stop(&format!("sample {SAMPLE} + split"));

    peak.reset();
    let clock = Clock::start();
    let summary = write::write_csvs(&out_dir, &source, &split).context("writing the CSVs")?;
    let written = clock.stop("write CSVs");
    println!(
        "sample    {} train + {} test images in {} classes",
        thousands(summary.train as u64),
        thousands(summary.test as u64),
        thousands(summary.classes as u64)
    );

    println!();
    println!("{:<22} {:>9} {:>9} {:>15} {:>16}", "step", "wall [s]", "cpu [s]", "peak RSS [MiB]", "RSS after [MiB]");
    println!("{:<22} {:>9} {:>9} {:>15} {:>16}", "(start)", "", "", "", kib_as_mib(baseline.rss_kib));
    let steps = [&generated, &read, &sampled, &written];
    for step in steps {
        println!("{step}");
    }
    let measured = &steps[1..];
    let wall: Duration = measured.iter().map(|s| s.wall).sum();
    let cpu: Option<Duration> = measured.iter().map(|s| s.cpu).sum();
    println!("{:<22} {:>9.3} {:>9}", "read + sample + write", wall.as_secs_f64(), seconds(cpu));
    if let Some(err) = &peak.reset_error {
        println!();
        println!("note: could not reset VmHWM ({err}): each peak is the process's peak so far");
    }
    Ok(())
}

/// The benchmark size: the environment's, else the full size under `cargo bench` (which passes
/// `--bench`) and the smoke size when cargo runs the target as a test.
fn size() -> Result<Size> {
    let default = if std::env::args().any(|a| a == "--bench") { FULL } else { SMOKE };
    let size = Size {
        images: env_count("SAC_BENCH_IMAGES")?.unwrap_or(default.images),
        categories: env_count("SAC_BENCH_CATEGORIES")?.unwrap_or(default.categories),
    };
    if size.images == 0 || size.categories == 0 {
        bail!("SAC_BENCH_IMAGES and SAC_BENCH_CATEGORIES must be at least 1");
    }
    Ok(size)
}

/// A whole number from the environment; `_` may group digits (`2_300_000`).
fn env_count(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => v.replace('_', "").parse().map(Some).with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {name}")),
    }
}

/// Streams a Herbarium 2021 style `metadata.json` to `path` and returns its size in bytes.
///
/// The layout follows the real file: top-level keys in its order, Python `json.dump` separators,
/// `file_name` = `images/<category / 100>/<category % 100>/<image id>.jpg`, one annotation per image.
/// Images come in blocks of consecutive categories (`size.images / size.categories` each, give or
/// take one). Every string is plain ASCII without quotes or backslashes, so nothing needs escaping.
fn generate(path: &Path, size: Size) -> io::Result<u64> {
    let Size { images, categories } = size;
    let category_of = |image: u64| image * categories / images;
    let sep = |i: u64| if i == 0 { "" } else { ", " };
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);

    w.write_all(b"{\"annotations\": [")?;
    for id in 0..images {
        write!(
            w,
            "{}{{\"category_id\": {}, \"id\": {id}, \"image_id\": {id}, \"institution_id\": {}}}",
            sep(id),
            category_of(id),
            id % 5
        )?;
    }
    w.write_all(b"], \"categories\": [")?;
    for id in 0..categories {
        write!(
            w,
            "{}{{\"family\": \"Family{:03}\", \"order\": \"Order{:02}\", \
             \"name\": \"Genus{:05} species{id:05}\", \"id\": {id}}}",
            sep(id),
            id / 100,
            id / 1000,
            id / 5
        )?;
    }
    w.write_all(b"], \"images\": [")?;
    for id in 0..images {
        let category = category_of(id);
        write!(
            w,
            "{}{{\"file_name\": \"images/{:03}/{:02}/{id}.jpg\", \
             \"height\": 1000, \"id\": {id}, \"license\": 0, \"width\": {}}}",
            sep(id),
            category / 100,
            category % 100,
            600 + id % 200
        )?;
    }
    w.write_all(
        b"], \"info\": {\"year\": 2021, \"version\": \"1\", \
          \"description\": \"synthetic Herbarium 2021 train metadata (sac benchmark)\", \
          \"contributor\": \"sac\", \"url\": \"\", \"date_created\": \"2021-02-01\"}, \
          \"licenses\": [{\"id\": 0, \"name\": \"Public Domain Dedication\", \"url\": \"\"}], \
          \"institutions\": [",
    )?;
    for id in 0..5 {
        write!(w, "{}{{\"id\": {id}, \"name\": \"Institution {id}\"}}", sep(id))?;
    }
    w.write_all(b"]}\n")?;

    let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Wall and CPU time from the start of a step.
struct Clock {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Clock {
    fn start() -> Clock {
        Clock { wall: Instant::now(), cpu: cpu_time() }
    }

    /// Ends the step; its peak RSS is `VmHWM`, reset at its start.
    fn stop(self, name: &str) -> Step {
        let wall = self.wall.elapsed();
        let cpu = cpu_time().zip(self.cpu).map(|(end, start)| end.saturating_sub(start));
        Step { name: name.to_string(), wall, cpu, after: Memory::now() }
    }
}

/// One measured step.
struct Step {
    name: String,
    wall: Duration,
    cpu: Option<Duration>,
    after: Memory,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<22} {:>9.3} {:>9} {:>15} {:>16}",
            self.name,
            self.wall.as_secs_f64(),
            seconds(self.cpu),
            kib_as_mib(self.after.hwm_kib),
            kib_as_mib(self.after.rss_kib)
        )
    }
}

/// User plus system CPU time of the process so far, all threads.
fn cpu_time() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: `usage` is valid for writes, and getrusage fills it completely when it returns 0.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let duration = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Some(duration(usage.ru_utime) + duration(usage.ru_stime))
}

/// Resets the kernel's resident-set high-water mark (`VmHWM`), so that the next reading is the peak of
/// one step. Remembers the first failure, after which `VmHWM` is the process's peak so far.
#[derive(Default)]
struct PeakRss {
    reset_error: Option<io::Error>,
}

impl PeakRss {
    fn reset(&mut self) {
        if self.reset_error.is_none() {
            // "5" resets VmHWM to the current RSS (Linux 4.0 and later, see proc(5)).
            if let Err(e) = fs::write("/proc/self/clear_refs", "5") {
                self.reset_error = Some(e);
            }
        }
    }
}

/// The process's resident memory now (`VmRSS`) and its high-water mark (`VmHWM`), where /proc has them.
struct Memory {
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
}

impl Memory {
    fn now() -> Memory {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Memory { rss_kib: kib_field(&status, "VmRSS:"), hwm_kib: kib_field(&status, "VmHWM:") }
    }
}

/// The value of a `Key:   1234 kB` line of a /proc file.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

fn kib_as_mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_string(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".to_string(), |d| format!("{:.3}", d.as_secs_f64()))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `2300000` → `2,300,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Cores available to this process, CPU model, memory and load: enough to compare two runs.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or_else(|_| "? cores".to_string(), |n| format!("{n} cores"));
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU");
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = kib_field(&meminfo, "MemTotal:")
        .map_or_else(String::new, |kib| format!(", {:.1} GiB RAM", kib as f64 / (1024.0 * 1024.0)));
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = loadavg.split_whitespace().next().map_or_else(String::new, |l| format!(", load {l}"));
    format!("{cores}, {model}{memory}{load}")
}
