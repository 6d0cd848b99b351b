//! The only module that touches MPI: the world, scatter/broadcast/gather of byte buffers, the fused
//! float allreduce, point-to-point messages for the evaluate pipeline, abort, and stall detection.
//!
//! Launched by `mpiexec` (or `srun`), `Dist::init` starts MPI; launched plainly it is a world of one
//! rank whose collectives are identities, so every command runs without MPI.
//!
//! Waiting ranks must not take CPU from working ones when ranks outnumber cores, and MPI
//! implementations busy-poll inside blocking calls. So every operation here is nonblocking
//! and completed by our own polling loop (`Dist::poll`):
//! - waits that may last long (for a slower rank to arrive) sleep with a growing back-off;
//! - collectives first pass an arrival barrier (sleeping), and only then move their data with a
//!   loop that tests and `sched_yield`s, which is short because every rank is there to progress it.
//!
//! The same loop keeps every wait bounded, as Horovod's stall inspector does: after
//! `stall_warn` seconds a waiting rank asks every other rank what it is doing (a small message
//! that ranks answer from inside their own waits) and logs which ranks have not arrived; after
//! `stall_abort` seconds it ends the job naming them. A stop signal (SIGTERM from a scheduler, or
//! Ctrl-C) that arrives while peers do not come ends the job after `STOP_GRACE`, and a panic on
//! any thread ends it at once (`install_panic_hook`): no rank is ever left waiting.
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mpi::collective::{SystemOperation, UnsafeUserOperation};
use mpi::environment::{Threading, Universe};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source, Status};
use mpi::request::{Request, Scope, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{Buffer, BufferMut, CommunicatorCollectives, Equivalence, Root};

/// Environment variables that MPI launchers set in every rank they start.
const LAUNCHER_VARS: [&str; 6] =
    ["PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMI_FD"];

/// Gradient buckets: floats per allreduce (16 MiB). Large enough to amortize latency (resnet18's
/// 11.2 M gradients take 3 buckets), small enough that the MPI library's temporary buffers come
/// from the heap rather than from fresh `mmap`s (glibc maps blocks of 32 MiB and more anew each
/// time, and touching fresh pages costs more than the copy itself).
pub const BUCKET_FLOATS: usize = 4 << 20;

/// The bucket size in use: `BUCKET_FLOATS`, or `SAC_BUCKET_FLOATS` from the environment (a tuning
/// knob for interconnects where another size is faster).
pub fn bucket_floats() -> usize {
    static BUCKET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUCKET.get_or_init(|| {
        std::env::var("SAC_BUCKET_FLOATS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(BUCKET_FLOATS)
    })
}

/// After a stop signal, how long a waiting rank still waits for its peers before it ends the job
/// with MPI_Abort. Below Slurm's default KillWait (30 s), so the job ends by itself, with a reason,
/// before the scheduler's SIGKILL. Peers that are working (rank 0 finishing a checkpoint) arrive
/// well within it; a rank that does not is stopped, hung or dead.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// How often a wait looks at stall queries, the stop flag and its limits.
const SERVICE_EVERY: Duration = Duration::from_millis(20);

/// How long a stalled rank collects answers to its query before it reports.
const ANSWER_WINDOW: Duration = Duration::from_millis(1000);

/// Exit code of an abort after a stop signal (128 + SIGINT, as the clean stop uses).
pub const EXIT_STOPPED: i32 = 130;

/// How long `MPI_Finalize` may take once every rank has arrived at the end (normally well under a
/// second). MPICH 4.0's UCX netmod closes its endpoints inside `MPI_Finalize` and then waits for
/// the other ranks in a barrier of the process manager, where it no longer makes progress; over
/// UCX's TCP transport a rank whose close needs such a peer's answer then waits forever (seen on
/// the emulated cluster of tests/multinode in about a third of the runs). By then every rank has
/// done and saved all its work, so a rank still in `MPI_Finalize` after this long leaves without
/// it, with the job's exit code; the process manager accepts that.
const FINALIZE_LIMIT: Duration = Duration::from_secs(10);

/// The exit code the job ends with once MPI is finalized (`set_exit_code`), for a rank that has to
/// leave `MPI_Finalize` early.
static EXIT_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Sets the exit code this rank will end with (0, or 130 after an agreed stop): the one
/// [`FINALIZE_LIMIT`] leaves with.
pub fn set_exit_code(code: i32) {
    EXIT_CODE.store(code, Ordering::SeqCst);
}

const TAG_STALL_QUERY: i32 = 0x57A1;
const TAG_STALL_ANSWER: i32 = 0x57A2;

/// When a wait is reported, and when it ends the job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallLimits {
    /// Log which ranks have not arrived after this long, and again after each further period.
    pub warn: Duration,
    /// End the job after this long; `None`: never.
    pub abort: Option<Duration>,
}

impl StallLimits {
    /// Waits that are never reported and never end the job.
    pub const UNWATCHED: StallLimits = StallLimits { warn: Duration::from_secs(1 << 40), abort: None };
}

impl Default for StallLimits {
    fn default() -> Self {
        StallLimits { warn: Duration::from_secs(60), abort: None }
    }
}

/// What a rank is waiting in: named in stall reports, its own and its peers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A collective (every rank takes part); `seq` counts this rank's collectives.
    Collective { name: &'static str, seq: u64 },
    /// A message from `from` (any rank if `None`) with `tag`.
    Recv { from: Option<usize>, tag: i32 },
    /// The delivery of a message to `to`.
    Send { to: usize, tag: i32 },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Op::Collective { name, seq } => write!(f, "{name} (collective #{seq})"),
            Op::Recv { from: Some(r), tag } => write!(f, "a receive from rank {r} (tag {tag})"),
            Op::Recv { from: None, tag } => write!(f, "a receive from any rank (tag {tag})"),
            Op::Send { to, tag } => write!(f, "a send to rank {to} (tag {tag})"),
        }
    }
}

pub struct Dist {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    mpi: Option<Mpi>,
    limits: Cell<StallLimits>,
    /// Collectives entered so far: every rank enters them in the same order, so equal numbers
    /// mean the same collective.
    coll_seq: Cell<u64>,
    /// The thread support MPI gave (we ask for `Funneled`: MPI is called from the main thread only).
    pub threading: Option<Threading>,
}

struct Mpi {
    world: SimpleCommunicator,
    /// Sends of the stall protocol still in flight (their buffers are leaked, a few bytes each).
    pending: RefCell<Vec<Request<'static, [u8]>>>,
    /// Numbers this rank's stall queries, so late answers to an old one are told apart.
    query_id: Cell<u64>,
    /// The bfloat16 sum of the gradient exchange (`train.exchange = "bf16"`, `crate::bf16`).
    bf16_sum: UnsafeUserOperation,
    // Last field: dropped last, which finalizes MPI.
    _universe: Universe,
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // A stall query or answer that arrived after this rank's last wait was never taken: take
        // it now, so MPI_Finalize finds no unmatched message. (No barrier: ranks may reach their
        // end far apart, as evaluate's idle ranks do while rank 0 works alone.)
        for tag in [TAG_STALL_QUERY, TAG_STALL_ANSWER] {
            while let Some((msg, status)) = self.world.any_process().immediate_matched_probe_with_tag(tag) {
                let _ = (msg, status).matched_receive_vec::<u8>();
            }
        }
        // Answers to queries of peers that have already left may never be taken: let them go
        // (rsmpi panics on dropping an incomplete request).
        for r in self.pending.get_mut().drain(..) {
            std::mem::forget(r);
        }
    }
}

impl Drop for Dist {
    /// The end of a job with more than one rank: every rank waits here for the others (sleeping,
    /// with the stall reports of every wait), then MPI is finalized (dropping `mpi`) under
    /// [`FINALIZE_LIMIT`].
    fn drop(&mut self) {
        if self.multi().is_none() {
            return;
        }
        // Ranks may arrive far apart (evaluate's idle ranks wait here while rank 0 writes the
        // reports): a wait at the end is no stall, so it is not reported as one.
        self.limits.set(StallLimits::UNWATCHED);
        self.barrier();
        let rank = self.rank;
        std::thread::spawn(move || {
            std::thread::sleep(FINALIZE_LIMIT);
            let code = EXIT_CODE.load(Ordering::SeqCst);
            tracing::warn!(
                "MPI_Finalize has not returned after {} s although every rank had finished; rank {rank} \
                 leaves without it (exit code {code}): a known shutdown race of MPICH 4.0's UCX netmod over TCP",
                FINALIZE_LIMIT.as_secs()
            );
            // SAFETY: _exit ends the process at once; nothing of this rank's work is pending.
            unsafe { libc::_exit(code) }
        });
    }
}

/// A wait that sleeps longer the longer it lasts: microseconds at first, at most 1 ms.
struct Backoff {
    start: Instant,
    spin_for: Duration,
    sleep: Duration,
}

impl Backoff {
    fn new(spin_for: Duration) -> Self {
        Backoff { start: Instant::now(), spin_for, sleep: Duration::from_micros(20) }
    }

    fn snooze(&mut self) {
        if self.start.elapsed() < self.spin_for {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_millis(1));
        }
    }
}

/// How to wait for a request.
#[derive(Clone, Copy)]
enum Wait {
    /// The peer may be busy for long: sleep between tests.
    Patient,
    /// Every peer is known to be in the operation: test and yield.
    Eager,
    /// Most likely every peer is in the operation already (the end of a gradient exchange that
    /// started during backward): yield for `SUM_EAGER`, then sleep.
    Finishing,
}

/// How long `Dist::finish_sums` yields before it sleeps between tests: a few milliseconds cover
/// the tail of an exchange between ranks that left backward together; a longer wait is a slower
/// peer, which gets the core.
const SUM_EAGER: Duration = Duration::from_millis(20);

impl Wait {
    fn backoff(self) -> Backoff {
        Backoff::new(match self {
            Wait::Patient => Duration::from_micros(200),
            Wait::Eager => Duration::from_secs(3600),
            Wait::Finishing => SUM_EAGER,
        })
    }
}

// ---- the abort path: shared by errors, panics, stalls and signals ----------------------------

/// Set once MPI runs with more than one rank: then a panic ends the job through MPI_Abort.
static MULTI: AtomicBool = AtomicBool::new(false);
static RANK: AtomicUsize = AtomicUsize::new(0);
/// A panic on a thread other than the main one: the main thread's next wait ends the job.
static FATAL: OnceLock<String> = OnceLock::new();

/// Ends every rank of the job with `code` (MPI_Abort), or this process when there is one rank.
pub fn abort_job(code: i32) -> ! {
    // MPI_Abort also kills the launcher's output relays: give them a moment to forward what this
    // rank just wrote (its error message), or the user may never see it.
    use std::io::Write;
    let _ = std::io::stderr().flush();
    std::thread::sleep(Duration::from_millis(300));
    if MULTI.load(Ordering::SeqCst) {
        SimpleCommunicator::world().abort(code)
    }
    std::process::exit(code)
}

/// The message of the panic that ended the main thread, for `run` to report as an error.
pub fn take_panic_message() -> Option<String> {
    LAST_PANIC.lock().ok().and_then(|mut m| m.take())
}

static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A panic anywhere (tch turns every libtorch error, out of memory included, into one) is logged
/// with its rank and, with more than one rank, ends the whole job through MPI_Abort at once: the
/// other ranks would otherwise wait for this one in their next collective for ever. With one rank,
/// a panic of the main thread becomes an ordinary error (exit code 1).
pub fn install_panic_hook() {
    let main = std::thread::current().id();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let on_main = std::thread::current().id() == main;
        let rank = RANK.load(Ordering::SeqCst);
        if MULTI.load(Ordering::SeqCst) {
            let text = format!("rank {rank} failed: {msg} (a panic{place})");
            report_fatal(&text);
            if on_main {
                abort_job(101);
            }
            // Another thread: the main thread's next wait ends the job; should it be busy or
            // stuck, this does after a few seconds.
            let _ = FATAL.set(text);
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(5));
                abort_job(101);
            });
        } else if on_main {
            if let Ok(mut m) = LAST_PANIC.lock() {
                *m = Some(format!("{msg} (a panic{place})"));
            }
        } else {
            report_fatal(&format!("a worker thread failed: {msg} (a panic{place})"));
        }
    }));
}

/// An error line to the log (when logging is set up) or stderr.
fn report_fatal(text: &str) {
    if crate::logging::is_on() {
        tracing::error!("{text}");
    } else {
        eprintln!("error: {text}");
    }
}

/// Polls `req` until it completes.
fn test_request<'a, D: ?Sized, S: Scope<'a>>(slot: &mut Option<Request<'a, D, S>>) -> Option<Status> {
    match slot.take().expect("a pending request").test() {
        Ok(status) => Some(status),
        Err(r) => {
            *slot = Some(r);
            None
        }
    }
}

/// A stall query or its answer on the wire.
fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i * 8..i * 8 + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// What a wait has learnt about its peers, for its stall reports.
struct StallWatch {
    /// When the next report is due (the first after `limits.warn`).
    next_report: Duration,
    /// The query in flight: its id and when it went out.
    query: Option<(u64, Duration)>,
    /// Answers to it: rank → what that rank is waiting in (a collective's number too, if one).
    answers: BTreeMap<usize, (String, Option<u64>)>,
    /// When this wait first saw the stop flag.
    stop_seen: Option<Instant>,
}

/// Where one rank runs: its host, its rank among the ranks MPI groups on its node, and its torch
/// thread count.
pub struct Place {
    pub host: String,
    pub local_rank: usize,
    pub local_size: usize,
    pub threads: usize,
}

/// The ranks of each host, in order of their first rank.
fn by_host(places: &[Place]) -> Vec<(&str, Vec<usize>)> {
    let mut hosts: Vec<(&str, Vec<usize>)> = Vec::new();
    for (r, p) in places.iter().enumerate() {
        match hosts.iter_mut().find(|(h, _)| *h == p.host) {
            Some((_, ranks)) => ranks.push(r),
            None => hosts.push((&p.host, vec![r])),
        }
    }
    hosts
}

/// "0-3", "0, 2": a list of ranks, runs of three or more consecutive ranks shortened.
fn rank_list(ranks: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        if j > i + 1 {
            parts.push(format!("{}-{}", ranks[i], ranks[j]));
        } else {
            parts.extend(ranks[i..=j].iter().map(usize::to_string));
        }
        i = j + 1;
    }
    parts.join(", ")
}

/// "4 rank(s) on 2 node(s): a: rank(s) 0, 1 (1 thread(s) each); b: rank(s) 2, 3 (…)".
pub fn describe_placement(places: &[Place]) -> String {
    let hosts = by_host(places);
    let list: Vec<String> = hosts
        .iter()
        .map(|(h, ranks)| {
            let threads: Vec<usize> = ranks.iter().map(|&r| places[r].threads).collect();
            let each = if threads.iter().all(|&t| t == threads[0]) {
                format!("{} thread(s) each", threads[0])
            } else {
                format!("threads {threads:?}")
            };
            format!("{h}: rank(s) {} ({each})", rank_list(ranks))
        })
        .collect();
    format!("{} rank(s) on {} node(s): {}", places.len(), hosts.len(), list.join("; "))
}

/// Whether MPI's grouping of ranks into nodes (shared memory, which sets local ranks, thread
/// counts and GPUs) differs from the hostnames'; the message says how.
pub fn grouping_mismatch(places: &[Place]) -> Option<String> {
    let bad: Vec<String> = by_host(places)
        .into_iter()
        .filter_map(|(h, ranks)| {
            let local: Vec<usize> = ranks.iter().map(|&r| places[r].local_rank).collect();
            let sizes: Vec<usize> = ranks.iter().map(|&r| places[r].local_size).collect();
            let agree = local == (0..ranks.len()).collect::<Vec<_>>() && sizes.iter().all(|&n| n == ranks.len());
            (!agree).then(|| {
                format!(
                    "{h} has rank(s) {} but MPI gives them local ranks {local:?} of node sizes {sizes:?}",
                    rank_list(&ranks)
                )
            })
        })
        .collect();
    (!bad.is_empty()).then(|| {
        format!("MPI's grouping of ranks into nodes differs from their hostnames: {}; per-node thread counts and GPUs follow MPI's", bad.join("; "))
    })
}

impl Dist {
    /// Starts MPI when launched by an MPI launcher, else a one-rank world.
    pub fn init() -> Result<Dist> {
        if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            return Ok(Dist::single());
        }
        // MPI is called from the main thread, and during backward also from the gradient
        // exchange's progress thread (`SumEngine`): MPI_THREAD_MULTIPLE. An MPI that offers less
        // (FUNNELED at least) runs the exchange without that thread.
        let (universe, threading) =
            mpi::initialize_with_threading(Threading::Multiple).context("MPI_Init_thread failed")?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        RANK.store(rank, Ordering::SeqCst);
        MULTI.store(size > 1, Ordering::SeqCst);
        // SAFETY: `mpi_sum` reads and writes exactly the `len` 16-bit elements MPI passes.
        let bf16_sum = unsafe { UnsafeUserOperation::commutative(crate::bf16::mpi_sum) };
        let mpi =
            Mpi { world, pending: RefCell::new(Vec::new()), query_id: Cell::new(0), bf16_sum, _universe: universe };
        Ok(Dist {
            rank,
            size,
            local_rank,
            local_size,
            mpi: Some(mpi),
            limits: Cell::new(StallLimits::default()),
            coll_seq: Cell::new(0),
            threading: Some(threading),
        })
    }

    /// A world of one rank, without MPI.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            mpi: None,
            limits: Cell::new(StallLimits::default()),
            coll_seq: Cell::new(0),
            threading: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This rank's index among the ranks on its node (picks its GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Ranks on this node (for the default thread count).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// The node's cores divided among its ranks (at least 1): the default thread count of a rank.
    pub fn cores_per_rank(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.local_size()).max(1)
    }

    /// Sets when waits are reported and when they end the job (`[train] stall_warn, stall_abort`).
    pub fn set_stall_limits(&self, limits: StallLimits) {
        self.limits.set(limits);
    }

    /// Ends every rank of the job. In a one-rank world, exits the process.
    pub fn abort(&self, code: i32) -> ! {
        abort_job(code)
    }

    fn multi(&self) -> Option<&Mpi> {
        self.mpi.as_ref().filter(|_| self.size > 1)
    }

    // ---- waiting ---------------------------------------------------------------------------

    /// Calls `ready` until it gives a value, sleeping or yielding in between (`how`), while
    /// answering peers' stall queries, reporting and ending stalls, and honouring stop signals
    /// and panics of other threads. `op` is what this rank waits in, for the reports.
    fn poll<T>(&self, op: Op, how: Wait, mut ready: impl FnMut() -> Option<T>) -> T {
        if let Some(v) = ready() {
            return v;
        }
        let start = Instant::now();
        let mut backoff = how.backoff();
        let mut watch =
            StallWatch { next_report: self.limits.get().warn, query: None, answers: BTreeMap::new(), stop_seen: None };
        let mut serviced = start;
        loop {
            backoff.snooze();
            if let Some(v) = ready() {
                return v;
            }
            if serviced.elapsed() >= SERVICE_EVERY {
                serviced = Instant::now();
                self.service(op, start.elapsed(), &mut watch);
            }
        }
    }

    /// The periodic work of a wait that lasts.
    fn service(&self, op: Op, waited: Duration, watch: &mut StallWatch) {
        if let Some(text) = FATAL.get() {
            tracing::error!("ending the job: {text}");
            abort_job(101);
        }
        let Some(m) = self.multi() else { return };
        self.answer_queries(m, op);
        let sent = std::mem::take(&mut *m.pending.borrow_mut());
        let still: Vec<_> = sent.into_iter().filter_map(|r| r.test().err()).collect();
        *m.pending.borrow_mut() = still;
        self.collect_answers(m, watch);

        let limits = self.limits.get();
        if crate::process::stop_requested() {
            let seen = *watch.stop_seen.get_or_insert_with(Instant::now);
            if watch.query.is_none() {
                self.send_query(m, watch, waited);
            }
            if seen.elapsed() >= STOP_GRACE {
                tracing::error!(
                    "a stop signal arrived {:.0} s ago and this rank still waits in {op} after {:.0} s: {}; \
                     ending the job",
                    seen.elapsed().as_secs_f64(),
                    waited.as_secs_f64(),
                    self.missing(op, watch)
                );
                abort_job(EXIT_STOPPED);
            }
        }
        // Rank 0 reports progress: a wait that keeps it silent for twice its interval says so
        // (until the stall report below takes over). Only a wait that lasts asks the peers, so
        // routine waits stay quiet whatever the interval.
        if self.rank == 0 && waited < limits.warn {
            if let Some((silent, every)) = crate::logging::progress_silence() {
                let due = every * 2;
                let asked = watch.query.map(|(_, at)| waited.saturating_sub(at));
                let lasts = waited >= ANSWER_WINDOW / 2;
                if lasts && silent + ANSWER_WINDOW >= due && asked.is_none_or(|age| age > ANSWER_WINDOW * 3) {
                    self.send_query(m, watch, waited);
                } else if silent >= due && asked.is_some_and(|age| age >= ANSWER_WINDOW) {
                    tracing::warn!(
                        "no progress for {}: rank 0 has waited {} in {op}: {}",
                        crate::logging::duration(silent.as_secs_f64()),
                        crate::logging::duration(waited.as_secs_f64()),
                        self.missing(op, watch)
                    );
                    crate::logging::progress_spoken();
                }
            }
        }
        // The query goes out early enough that its answers are in when the report is due.
        let due = match limits.abort {
            Some(a) => watch.next_report.min(a),
            None => watch.next_report,
        };
        let query_fresh = watch.query.is_some_and(|(_, at)| at + ANSWER_WINDOW * 3 > due);
        if waited + ANSWER_WINDOW >= due && !query_fresh {
            self.send_query(m, watch, waited);
        }
        if let Some(a) = limits.abort {
            if waited >= a {
                tracing::error!(
                    "stall: this rank has waited {:.0} s in {op}: {}; ending the job (train.stall_abort = {})",
                    waited.as_secs_f64(),
                    self.missing(op, watch),
                    a.as_secs_f64()
                );
                abort_job(1);
            }
        }
        if waited >= watch.next_report {
            tracing::warn!(
                "stall: this rank has waited {:.0} s in {op}: {}{}",
                waited.as_secs_f64(),
                self.missing(op, watch),
                match limits.abort {
                    Some(a) => format!("; the job ends after {:.0} s (train.stall_abort)", a.as_secs_f64()),
                    None => "; set train.stall_abort to end such a job by itself".into(),
                }
            );
            watch.next_report += limits.warn;
        }
    }

    /// Which ranks this wait waits for and what the others answered: "rank 1 has not arrived (no
    /// answer: busy computing, stopped or dead); rank 2 waits in …".
    fn missing(&self, op: Op, watch: &StallWatch) -> String {
        let peers: Vec<usize> = match op {
            Op::Recv { from: Some(r), .. } | Op::Send { to: r, .. } => vec![r],
            _ => (0..self.size).filter(|&r| r != self.rank).collect(),
        };
        let mut late = Vec::new();
        let mut here = Vec::new();
        for r in peers {
            match watch.answers.get(&r) {
                None => late.push(format!("rank {r} (no answer: busy, stopped or dead)")),
                Some((_, Some(seq))) if matches!(op, Op::Collective { seq: mine, .. } if mine == *seq) => here.push(r),
                Some((what, _)) => late.push(format!("rank {r} (waits in {what})")),
            }
        }
        let mut text = if late.is_empty() {
            "every peer has arrived".to_string()
        } else {
            format!("not arrived: {}", late.join(", "))
        };
        if !here.is_empty() {
            let list: Vec<String> = here.iter().map(usize::to_string).collect();
            text.push_str(&format!("; arrived: rank(s) {}", list.join(", ")));
        }
        text
    }

    /// Asks every other rank what it waits in (fire and forget: peers answer from their waits).
    fn send_query(&self, m: &Mpi, watch: &mut StallWatch, waited: Duration) {
        let id = m.query_id.get() + 1;
        m.query_id.set(id);
        watch.query = Some((id, waited));
        watch.answers.clear();
        for r in (0..self.size).filter(|&r| r != self.rank) {
            self.send_and_forget(m, r, TAG_STALL_QUERY, id.to_le_bytes().to_vec());
        }
    }

    /// Answers every query that has arrived: its id, this rank's collective number (if it waits
    /// in a collective) and what it waits in.
    fn answer_queries(&self, m: &Mpi, op: Op) {
        while let Some((msg, status)) = m.world.any_process().immediate_matched_probe_with_tag(TAG_STALL_QUERY) {
            let src = status.source_rank() as usize;
            let (q, _) = (msg, status).matched_receive_vec::<u8>();
            let mut answer = Vec::with_capacity(24 + 64);
            answer.extend_from_slice(&u64_at(&q, 0).to_le_bytes());
            let (flag, seq) = match op {
                Op::Collective { seq, .. } => (1u64, seq),
                _ => (0, 0),
            };
            answer.extend_from_slice(&flag.to_le_bytes());
            answer.extend_from_slice(&seq.to_le_bytes());
            answer.extend_from_slice(op.to_string().as_bytes());
            self.send_and_forget(m, src, TAG_STALL_ANSWER, answer);
        }
    }

    /// Takes the answers that have arrived; keeps those to the current query.
    fn collect_answers(&self, m: &Mpi, watch: &mut StallWatch) {
        while let Some((msg, status)) = m.world.any_process().immediate_matched_probe_with_tag(TAG_STALL_ANSWER) {
            let src = status.source_rank() as usize;
            let (a, _) = (msg, status).matched_receive_vec::<u8>();
            if watch.query.is_some_and(|(id, _)| id == u64_at(&a, 0)) {
                let seq = (u64_at(&a, 1) == 1).then(|| u64_at(&a, 2));
                let what = String::from_utf8_lossy(a.get(24..).unwrap_or_default()).into_owned();
                watch.answers.insert(src, (what, seq));
            }
        }
    }

    /// A small message whose delivery nobody waits for.
    fn send_and_forget(&self, m: &Mpi, dest: usize, tag: i32, bytes: Vec<u8>) {
        let buf: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let req = m.world.process_at_rank(dest as i32).immediate_send_with_tag(StaticScope, buf, tag);
        m.pending.borrow_mut().push(req);
    }

    /// Enters the next collective: all ranks arrive (waiting ones sleep). Returns what it is.
    fn arrive(&self, m: &Mpi, name: &'static str) -> Op {
        let seq = self.coll_seq.get() + 1;
        self.coll_seq.set(seq);
        let op = Op::Collective { name, seq };
        let mut req = Some(m.world.immediate_barrier());
        self.poll(op, Wait::Patient, || test_request(&mut req));
        op
    }

    /// Waits for a request of the operation `op`.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, op: Op, how: Wait, req: Request<'a, D, S>) -> Status {
        let mut slot = Some(req);
        self.poll(op, how, || test_request(&mut slot))
    }

    // ---- collectives -----------------------------------------------------------------------

    /// All ranks arrive; waiting ones sleep.
    pub fn barrier(&self) {
        if let Some(m) = self.multi() {
            self.arrive(m, "barrier");
        }
    }

    /// Sums `buf` over all ranks in place. `scratch` is reused between calls to avoid allocation.
    pub fn allreduce_sum<T: Equivalence + Copy + Default>(&self, buf: &mut [T], scratch: &mut Vec<T>)
    where
        [T]: Buffer + BufferMut,
    {
        if self.multi().is_none() {
            return;
        }
        scratch.clear();
        scratch.extend_from_slice(buf);
        self.allreduce_sum_into(scratch, buf);
    }

    /// `recv` = the sum over all ranks of `send` (same length). One allreduce per bucket of
    /// `BUCKET_FLOATS` elements, all in flight together.
    pub fn allreduce_sum_into<T: Equivalence + Copy>(&self, send: &[T], recv: &mut [T])
    where
        [T]: Buffer + BufferMut,
    {
        assert_eq!(send.len(), recv.len(), "allreduce buffers differ in length");
        let Some(m) = self.multi() else {
            recv.copy_from_slice(send);
            return;
        };
        let t0 = Instant::now();
        let op = self.arrive(m, "allreduce");
        let mut t = crate::timeline::since("exchange", "arrival (waits for every rank)", t0, None);
        mpi::request::scope(|scope| {
            let reqs: Vec<_> = send
                .chunks(bucket_floats())
                .zip(recv.chunks_mut(bucket_floats()))
                .map(|(s, r)| (s.len(), m.world.immediate_all_reduce_into(scope, s, r, SystemOperation::sum())))
                .collect();
            let n = reqs.len();
            for (i, (len, req)) in reqs.into_iter().enumerate() {
                self.wait(op, Wait::Eager, req);
                if crate::timeline::recording() {
                    let mib = (len * std::mem::size_of::<T>()) as f64 / (1 << 20) as f64;
                    t = crate::timeline::since("exchange", format!("bucket {}/{n} ({mib:.1} MiB)", i + 1), t, None);
                }
            }
        });
    }

    /// An engine for sums that run while this rank computes (the gradient exchange during
    /// backward). With `thread`, and MPI at `MPI_THREAD_MULTIPLE`, a progress thread of its own
    /// keeps them moving (MPI moves a nonblocking collective only while it is called); else only
    /// the calls of `SumEngine::progress` do.
    pub fn sum_engine(&self, thread: bool) -> SumEngine {
        let multiple = self.threading.is_some_and(|t| t >= Threading::Multiple);
        SumEngine::new(self.multi().is_some(), thread && multiple)
    }

    /// Sums `buf` over all ranks with one plain blocking `MPI_Allreduce`, as the original
    /// mpi4py script did per tensor. Only the benchmark of `sac mpi-check` uses it: waiting inside
    /// it busy-polls in the MPI library.
    pub fn allreduce_sum_blocking(&self, buf: &mut [f32], scratch: &mut Vec<f32>) {
        let Some(m) = self.multi() else { return };
        scratch.clear();
        scratch.extend_from_slice(buf);
        m.world.all_reduce_into(&scratch[..], buf, SystemOperation::sum());
    }

    /// The mean seconds of one round trip of a `bytes`-long message between this rank and `peer`
    /// (both call it with each other's rank; the lower rank sends first), over `reps` round trips
    /// after one that warms the path up. Plain blocking MPI calls, which busy-poll inside the
    /// library: only `sac mpi-check`'s short measurement uses it. 0 without MPI or with itself.
    pub fn ping_pong(&self, peer: usize, bytes: usize, reps: usize) -> f64 {
        const TAG: i32 = 0x919;
        let Some(m) = self.multi() else { return 0.0 };
        if peer == self.rank {
            return 0.0;
        }
        let other = m.world.process_at_rank(peer as i32);
        let mut buf = vec![0u8; bytes.max(1)];
        let first = self.rank < peer;
        let round = |buf: &mut Vec<u8>| {
            if first {
                other.send_with_tag(&buf[..], TAG);
                other.receive_into_with_tag(&mut buf[..], TAG);
            } else {
                other.receive_into_with_tag(&mut buf[..], TAG);
                other.send_with_tag(&buf[..], TAG);
            }
        };
        round(&mut buf);
        let start = Instant::now();
        for _ in 0..reps.max(1) {
            round(&mut buf);
        }
        start.elapsed().as_secs_f64() / reps.max(1) as f64
    }

    /// Every rank's place (host, local rank, node size, `threads`), on every rank: a gather at
    /// rank 0 and a broadcast.
    pub fn places(&self, threads: usize) -> Vec<Place> {
        let mine = format!("{}\t{}\t{}\t{threads}", crate::process::hostname(), self.local_rank, self.local_size);
        let mut all = self.gather_bytes(0, mine.into_bytes()).map(|parts| parts.join(&b'\n')).unwrap_or_default();
        self.broadcast_bytes(0, &mut all);
        String::from_utf8_lossy(&all)
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                Place {
                    host: f.first().unwrap_or(&"?").to_string(),
                    local_rank: num(1),
                    local_size: num(2),
                    threads: num(3),
                }
            })
            .collect()
    }

    /// With more than one rank: rank 0 logs where the ranks run (hosts, ranks, `threads` each),
    /// and warns if MPI's grouping into nodes differs from the hostnames. Every rank calls it.
    pub fn log_placement(&self, threads: usize) {
        if self.multi().is_none() {
            return;
        }
        let places = self.places(threads);
        if self.is_root() {
            tracing::info!("placement: {}", describe_placement(&places));
            if let Some(w) = grouping_mismatch(&places) {
                tracing::warn!("{w}");
            }
        }
    }

    /// The MPI library's own description of itself (`MPI_Get_library_version`), first line.
    pub fn library(&self) -> Option<String> {
        self.mpi.as_ref()?;
        // MPICH: "MPICH Version:\t4.0.2", …, "MPICH Device:\tch4:ucx"; Open MPI: one line.
        let text = mpi::environment::library_version().ok()?;
        let lines: Vec<String> = text
            .lines()
            .enumerate()
            .filter(|(i, l)| *i == 0 || l.contains("Device:"))
            .map(|(_, l)| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        Some(lines.join(", "))
    }

    /// Whether the MPI library says it can take CUDA device memory: MPICH's
    /// `MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, …)` (4.0 and later) or Open MPI's
    /// `MPIX_Query_cuda_support()`, looked up at run time (neither is in the MPI standard).
    /// None: one process, or the library answers neither.
    pub fn cuda_aware(&self) -> Option<bool> {
        self.mpi.as_ref()?;
        type GpuQuery = unsafe extern "C" fn(i32, *mut i32) -> i32;
        type CudaQuery = unsafe extern "C" fn() -> i32;
        // MPIX_GPU_SUPPORT_CUDA in MPICH's mpi.h.
        const MPIX_GPU_SUPPORT_CUDA: i32 = 0;
        // SAFETY: dlsym only looks symbols up; a found symbol is the MPI library's function of
        // the documented C signature.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"MPIX_GPU_query_support".as_ptr());
            if !f.is_null() {
                let f: GpuQuery = std::mem::transmute::<*mut libc::c_void, GpuQuery>(f);
                let mut yes = 0i32;
                return (f(MPIX_GPU_SUPPORT_CUDA, &mut yes) == 0).then_some(yes != 0);
            }
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"MPIX_Query_cuda_support".as_ptr());
            if !f.is_null() {
                let f: CudaQuery = std::mem::transmute::<*mut libc::c_void, CudaQuery>(f);
                return Some(f() != 0);
            }
        }
        None
    }

    /// Sum of one number over all ranks.
    pub fn sum_f64(&self, x: f64) -> f64 {
        let mut v = [x];
        self.allreduce_sum(&mut v, &mut Vec::new());
        v[0]
    }

    /// The smallest of one number over all ranks.
    pub fn min_f64(&self, x: f64) -> f64 {
        let Some(m) = self.multi() else { return x };
        let op = self.arrive(m, "allreduce");
        let send = [x];
        let mut recv = [x];
        mpi::request::scope(|scope| {
            let req = m.world.immediate_all_reduce_into(scope, &send[..], &mut recv[..], SystemOperation::min());
            self.wait(op, Wait::Eager, req);
        });
        recv[0]
    }

    /// True on every rank iff `ok` on every rank: lets all ranks leave together when one fails.
    pub fn all_ok(&self, ok: bool) -> bool {
        self.sum_f64(if ok { 0.0 } else { 1.0 }) == 0.0
    }

    /// True on every rank iff `flag` on any rank.
    pub fn any(&self, flag: bool) -> bool {
        !self.all_ok(!flag)
    }

    /// Broadcasts `buf` from `root`; the other ranks' vectors are resized to fit.
    pub fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        if self.multi().is_none() {
            return;
        }
        let mut len = [buf.len() as u64];
        self.broadcast_slice(root, &mut len);
        buf.resize(len[0] as usize, 0);
        for chunk in buf.chunks_mut(1 << 30) {
            self.broadcast_slice(root, chunk);
        }
    }

    /// Broadcasts a fixed-size slice from `root`.
    pub fn broadcast_slice<T: Equivalence>(&self, root: usize, buf: &mut [T])
    where
        [T]: BufferMut,
    {
        let Some(m) = self.multi() else { return };
        let op = self.arrive(m, "broadcast");
        mpi::request::scope(|scope| {
            let req = m.world.process_at_rank(root as i32).immediate_broadcast_into(scope, buf);
            self.wait(op, Wait::Eager, req);
        });
    }

    /// Root gives one byte buffer per rank (`parts.len() == size`); every rank gets its own.
    pub fn scatter_bytes(&self, root: usize, parts: Option<Vec<Vec<u8>>>) -> Result<Vec<u8>> {
        const TAG: i32 = 0x5CA7;
        let Some(_) = self.multi() else {
            let mut parts = parts.context("scatter: the root must give the parts")?;
            return Ok(parts.pop().unwrap_or_default());
        };
        if self.rank == root {
            let mut parts = parts.context("scatter: the root must give the parts")?;
            if parts.len() != self.size {
                bail!("scatter: {} parts for {} ranks", parts.len(), self.size);
            }
            for (r, part) in parts.iter().enumerate() {
                if r != root {
                    self.send_bytes(r, TAG, part);
                }
            }
            Ok(std::mem::take(&mut parts[root]))
        } else {
            Ok(self.recv_bytes(Some(root), TAG).2)
        }
    }

    /// Every rank's bytes, at the root (in rank order); `None` elsewhere.
    pub fn gather_bytes(&self, root: usize, data: Vec<u8>) -> Option<Vec<Vec<u8>>> {
        const TAG: i32 = 0x6A7;
        if self.multi().is_none() {
            return Some(vec![data]);
        }
        if self.rank == root {
            // From each rank by name, not from any: messages between two ranks keep their order,
            // so a fast rank's part of the next gather is never taken for this one.
            let mut mine = Some(data);
            let out = (0..self.size)
                .map(|src| match src == root {
                    true => mine.take().unwrap_or_default(),
                    false => self.recv_bytes(Some(src), TAG).2,
                })
                .collect();
            Some(out)
        } else {
            self.send_bytes(root, TAG, &data);
            None
        }
    }

    // ---- point to point --------------------------------------------------------------------

    /// Sends `data` to `dest` with `tag`, returning once the buffer may be reused.
    pub fn send_bytes(&self, dest: usize, tag: i32, data: &[u8]) {
        self.send_bytes_while(dest, tag, data, || {});
    }

    /// Sends `data` to `dest` with `tag` and calls `meanwhile` while the send is not complete:
    /// a rank that must keep receiving while its own send is delivered, so that no cycle of ranks
    /// can block each other whatever the MPI library's eager limit. Returns once the buffer may be
    /// reused: the request lives in an MPI request scope inside this call, so the borrow of
    /// `data` outlives it by construction.
    pub fn send_bytes_while(&self, dest: usize, tag: i32, data: &[u8], mut meanwhile: impl FnMut()) {
        let m = self.mpi.as_ref().expect("send_bytes needs MPI");
        mpi::request::scope(|scope| {
            let mut slot = Some(m.world.process_at_rank(dest as i32).immediate_send_with_tag(scope, data, tag));
            self.poll(Op::Send { to: dest, tag }, Wait::Patient, || {
                if test_request(&mut slot).is_some() {
                    return Some(());
                }
                meanwhile();
                None
            });
        });
    }

    /// Receives the next message with `tag` from `src` (any rank if `None`): (source, tag, bytes).
    /// Sleeps while nothing has arrived.
    pub fn recv_bytes(&self, src: Option<usize>, tag: i32) -> (usize, i32, Vec<u8>) {
        self.poll(Op::Recv { from: src, tag }, Wait::Patient, || self.try_recv_bytes(src, tag))
    }

    /// Receives a message with `tag` from `src` (any rank if `None`) if one has arrived.
    pub fn try_recv_bytes(&self, src: Option<usize>, tag: i32) -> Option<(usize, i32, Vec<u8>)> {
        let m = self.mpi.as_ref().expect("try_recv_bytes needs MPI");
        let probe = match src {
            Some(r) => m.world.process_at_rank(r as i32).immediate_matched_probe_with_tag(tag),
            None => m.world.any_process().immediate_matched_probe_with_tag(tag),
        };
        probe.map(|(msg, status)| {
            let (source, tag) = (status.source_rank() as usize, status.tag());
            let (bytes, _) = (msg, status).matched_receive_vec::<u8>();
            (source, tag, bytes)
        })
    }

    /// Calls `ready` until it gives a value, as a wait for a message from `from` (any rank if
    /// `None`) with `tag`: sleeping in between, with stall reports and limits like every wait.
    pub fn poll_recv<T>(&self, from: Option<usize>, tag: i32, ready: impl FnMut() -> Option<T>) -> T {
        self.poll(Op::Recv { from, tag }, Wait::Patient, ready)
    }
}

/// Sums over all ranks in flight ([`Dist::sum_engine`]): started in the same order on every
/// rank, moved along by the progress thread (if any) and `progress`, completed by `finish`.
pub struct SumEngine {
    shared: std::sync::Arc<SumShared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// More than one rank: sums need MPI.
    mpi: bool,
}

struct SumShared {
    requests: std::sync::Mutex<SumRequests>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct SumRequests {
    pending: Vec<mpi::ffi::MPI_Request>,
    quit: bool,
}

impl SumRequests {
    /// Tests every pending request once (this is what moves them); drops the completed ones.
    fn test(&mut self) {
        self.pending.retain_mut(|req| {
            let mut flag = 0;
            // SAFETY: a live request of a started sum; MPI sets it to MPI_REQUEST_NULL when done.
            unsafe { mpi::ffi::MPI_Test(req, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE) };
            flag == 0
        });
    }
}

/// How often the progress thread moves the sums in flight (`SAC_PROGRESS_US` microseconds in the
/// environment, for tuning). Between turns the thread sleeps, and the kernel's socket buffers
/// (megabytes) keep a link busy meanwhile. Measured with resnet18 between 2 emulated hosts of one
/// core each (BENCHMARKS.md): 0.25 ms took so much of the core that the step was no faster than
/// without overlap; 2.5 ms and 5 ms were fastest at 1 Gb/s, 2.5 ms at 10 Gb/s; 10 and 20 ms left
/// more of the exchange after backward.
pub const PROGRESS_US: u64 = 2500;

fn progress_interval() -> Duration {
    static US: OnceLock<u64> = OnceLock::new();
    Duration::from_micros(*US.get_or_init(|| {
        std::env::var("SAC_PROGRESS_US").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(PROGRESS_US)
    }))
}

impl SumEngine {
    fn new(mpi: bool, thread: bool) -> SumEngine {
        let shared = std::sync::Arc::new(SumShared {
            requests: std::sync::Mutex::new(SumRequests::default()),
            wake: std::sync::Condvar::new(),
        });
        let thread = (mpi && thread).then(|| {
            let shared = std::sync::Arc::clone(&shared);
            std::thread::Builder::new()
                .name("sac-progress".into())
                .spawn(move || loop {
                    let mut r = shared.requests.lock().expect("sum requests");
                    while !r.quit && r.pending.is_empty() {
                        r = shared.wake.wait(r).expect("sum requests");
                    }
                    if r.quit {
                        return;
                    }
                    r.test();
                    drop(r);
                    std::thread::sleep(progress_interval());
                })
                .expect("starting the MPI progress thread")
        });
        SumEngine { shared, thread, mpi }
    }

    /// A progress thread moves the sums.
    pub fn threaded(&self) -> bool {
        self.thread.is_some()
    }

    /// Starts summing `send` over all ranks into `recv` (same length). Every rank must start its
    /// sums in the same order. With one rank `recv` is a copy of `send` at once.
    ///
    /// # Safety
    /// `send` and `recv` must stay allocated, and nothing may write `send` or touch `recv`, until
    /// `finish` has returned.
    pub unsafe fn start(&self, dist: &Dist, send: &[f32], recv: &mut [f32]) {
        // SAFETY: as the caller promised.
        unsafe { self.start_with(dist, send, recv, |_| SystemOperation::sum()) }
    }

    /// Starts summing the bfloat16 values `send` (bits, `crate::bf16`) over all ranks into `recv`,
    /// each pair added in f32 and rounded once. As `start` otherwise.
    ///
    /// # Safety
    /// As for `start`.
    pub unsafe fn start_bf16(&self, dist: &Dist, send: &[u16], recv: &mut [u16]) {
        // SAFETY: as the caller promised. The operation lives in `Mpi`, which outlives every sum
        // (MPI is finalized last).
        unsafe { self.start_with(dist, send, recv, |m| &*std::ptr::addr_of!(m.bf16_sum)) }
    }

    /// `start` and `start_bf16`: the reduction `op` of `m` over `send` into `recv`.
    ///
    /// # Safety
    /// As for `start`; `op`'s operation must outlive the sum.
    unsafe fn start_with<T: Equivalence + Copy + 'static, O: mpi::collective::Operation + 'static>(
        &self,
        dist: &Dist,
        send: &[T],
        recv: &mut [T],
        op: impl FnOnce(&Mpi) -> O,
    ) {
        assert_eq!(send.len(), recv.len(), "allreduce buffers differ in length");
        let Some(m) = dist.multi().filter(|_| self.mpi) else {
            recv.copy_from_slice(send);
            return;
        };
        // SAFETY: the caller keeps both buffers alive and unused until the request completes.
        let (send, recv) = unsafe {
            (std::mem::transmute::<&[T], &'static [T]>(send), std::mem::transmute::<&mut [T], &'static mut [T]>(recv))
        };
        let mut r = self.shared.requests.lock().expect("sum requests");
        let req = m.world.immediate_all_reduce_into(StaticScope, send, recv, op(m));
        // SAFETY: completed by `finish` (or `test`) while the buffers live, as the caller promised.
        let (raw, _, _) = unsafe { req.into_raw() };
        r.pending.push(raw);
        drop(r);
        self.shared.wake.notify_one();
    }

    /// Lets MPI move the sums in flight (one test of each; none waits).
    pub fn progress(&self) {
        self.shared.requests.lock().expect("sum requests").test();
    }

    /// Waits until every sum started is complete, as one collective named `name` in stall
    /// reports. Yields the core for the first `SUM_EAGER` (the rest of the sums is usually on its
    /// way), then sleeps between tests, so a rank that waits for a slow peer does not take CPU
    /// from it.
    pub fn finish(&self, dist: &Dist, name: &'static str) {
        let done = || {
            let mut r = self.shared.requests.lock().expect("sum requests");
            r.test();
            r.pending.is_empty().then_some(())
        };
        if done().is_some() {
            return;
        }
        let seq = dist.coll_seq.get() + 1;
        dist.coll_seq.set(seq);
        dist.poll(Op::Collective { name, seq }, Wait::Finishing, done);
    }
}

impl Drop for SumEngine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.requests.lock().expect("sum requests").quit = true;
            self.shared.wake.notify_one();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(host: &str, local_rank: usize, local_size: usize) -> Place {
        Place { host: host.into(), local_rank, local_size, threads: 2 }
    }

    #[test]
    fn rank_lists_shorten_runs_of_three_or_more() {
        assert_eq!(rank_list(&[0]), "0");
        assert_eq!(rank_list(&[0, 1]), "0, 1");
        assert_eq!(rank_list(&[0, 1, 2, 3]), "0-3");
        assert_eq!(rank_list(&[0, 2, 3, 4, 7, 8]), "0, 2-4, 7, 8");
        assert_eq!(rank_list(&[]), "");
    }

    #[test]
    fn placement_groups_ranks_by_host_in_rank_order() {
        let places = [place("b", 0, 2), place("a", 0, 2), place("b", 1, 2), place("a", 1, 2)];
        assert_eq!(
            describe_placement(&places),
            "4 rank(s) on 2 node(s): b: rank(s) 0, 2 (2 thread(s) each); a: rank(s) 1, 3 (2 thread(s) each)"
        );
        assert!(grouping_mismatch(&places).is_none());
        let mut uneven = vec![place("a", 0, 1)];
        uneven[0].threads = 1;
        uneven.push(place("a", 1, 2));
        assert!(describe_placement(&uneven).contains("threads [1, 2]"), "{}", describe_placement(&uneven));
    }

    #[test]
    fn a_grouping_unlike_the_hostnames_is_named() {
        // MPI put two ranks with different hostnames on one node (shared memory between "hosts").
        let places = [place("h0", 0, 2), place("h1", 1, 2)];
        let w = grouping_mismatch(&places).expect("a mismatch");
        assert!(w.contains("h1 has rank(s) 1 but MPI gives them local ranks [1] of node sizes [2]"), "{w}");
        assert!(w.contains("h0 has rank(s) 0 but MPI gives them local ranks [0] of node sizes [2]"), "{w}");
        // One host's grouping right, the other's not: only the wrong one is named.
        let places = [place("h0", 0, 1), place("h1", 0, 2), place("h1", 0, 2)];
        let w = grouping_mismatch(&places).expect("a mismatch");
        assert!(w.contains("h1 has rank(s) 1, 2 but MPI gives them local ranks [0, 0]"), "{w}");
        assert!(!w.contains("h0 has"), "{w}");
    }

    #[test]
    fn single_rank_collectives_are_identities() {
        let d = Dist::single();
        let mut v = vec![1.0f32, 2.0];
        d.allreduce_sum(&mut v, &mut Vec::new());
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(d.sum_f64(3.5), 3.5);
        assert!(d.all_ok(true) && !d.all_ok(false));
        let mut b = vec![7u8; 3];
        d.broadcast_bytes(0, &mut b);
        assert_eq!(b, [7, 7, 7]);
        assert_eq!(d.scatter_bytes(0, Some(vec![vec![1, 2]])).unwrap(), [1, 2]);
        assert_eq!(d.gather_bytes(0, vec![9]).unwrap(), vec![vec![9]]);
    }
}
