//! The stall protocol: how a waiting rank asks its peers what they wait in, answers their
//! questions, reports a wait that lasts and ends the job after a stall or a stop signal.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::request::StaticScope;
use mpi::topology::Communicator;

use super::abort::{abort_job, EXIT_STOPPED, FATAL};
use super::world::{Dist, Mpi, StallLimits};

/// After a stop signal, how long a waiting rank still waits for its peers before it ends the job
/// with MPI_Abort. Below Slurm's default KillWait (30 s), so the job ends by itself, with a reason,
/// before the scheduler's SIGKILL. Peers that are working (rank 0 finishing a checkpoint) arrive
/// well within it; a rank that does not is stopped, hung or dead.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// How long a stalled rank collects answers to its query before it reports.
const ANSWER_WINDOW: Duration = Duration::from_millis(1000);

const TAG_STALL_QUERY: i32 = 0x57A1;
const TAG_STALL_ANSWER: i32 = 0x57A2;

/// What a rank is waiting in: named in stall reports, its own and its peers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
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

/// A stall query or its answer on the wire.
fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i * 8..i * 8 + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// What a wait has learnt about its peers, for its stall reports.
pub(super) struct StallWatch {
    /// When the next report is due (the first after `limits.warn`).
    pub(super) next_report: Duration,
    /// The query in flight: its id and when it went out.
    pub(super) query: Option<(u64, Duration)>,
    /// Answers to it: rank → what that rank is waiting in (a collective's number too, if one).
    pub(super) answers: BTreeMap<usize, (String, Option<u64>)>,
    /// When this wait first saw the stop flag.
    pub(super) stop_seen: Option<Instant>,
}

// The end of `Mpi` (before its last field finalizes MPI) clears what the stall protocol left.
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

impl Dist {
    /// The periodic work of a wait that lasts.
    pub(super) fn service(&self, op: Op, waited: Duration, watch: &mut StallWatch) {
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
        self.end_after_stop(m, op, waited, watch);
        self.report_silence(m, op, waited, watch, limits);
        self.report_stall(m, op, waited, watch, limits);
    }

    /// After a stop signal: asks the peers what they wait in, and ends the job once the wait
    /// outlasts `STOP_GRACE` from the signal.
    fn end_after_stop(&self, m: &Mpi, op: Op, waited: Duration, watch: &mut StallWatch) {
        if crate::infra::process::stop_requested() {
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
    }

    /// Rank 0 reports progress: a wait that keeps it silent for twice its interval says so
    /// (until the stall report of `report_stall` takes over). Only a wait that lasts asks the
    /// peers, so routine waits stay quiet whatever the interval.
    fn report_silence(&self, m: &Mpi, op: Op, waited: Duration, watch: &mut StallWatch, limits: StallLimits) {
        if self.rank == 0 && waited < limits.warn {
            if let Some((silent, every)) = crate::infra::logging::progress_silence() {
                let due = every * 2;
                let asked = watch.query.map(|(_, at)| waited.saturating_sub(at));
                let lasts = waited >= ANSWER_WINDOW / 2;
                if lasts && silent + ANSWER_WINDOW >= due && asked.is_none_or(|age| age > ANSWER_WINDOW * 3) {
                    self.send_query(m, watch, waited);
                } else if silent >= due && asked.is_some_and(|age| age >= ANSWER_WINDOW) {
                    tracing::warn!(
                        "no progress for {}: rank 0 has waited {} in {op}: {}",
                        crate::infra::logging::duration(silent.as_secs_f64()),
                        crate::infra::logging::duration(waited.as_secs_f64()),
                        self.missing(op, watch)
                    );
                    crate::infra::logging::progress_spoken();
                }
            }
        }
    }

    /// The stall report every `limits.warn`, and the end of the job after `limits.abort`.
    fn report_stall(&self, m: &Mpi, op: Op, waited: Duration, watch: &mut StallWatch, limits: StallLimits) {
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
}
