//! Waiting: the back-off between tests of a request, and the poll loop (`Dist::poll`) that
//! completes every operation here while it serves the stall protocol.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mpi::point_to_point::Status;
use mpi::request::{Request, Scope};
use mpi::traits::CommunicatorCollectives;

use super::stall::{Op, StallWatch};
use super::world::{Dist, Mpi};

/// How often a wait looks at stall queries, the stop flag and its limits.
const SERVICE_EVERY: Duration = Duration::from_millis(20);

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
pub(super) enum Wait {
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

/// Polls `req` until it completes.
pub(super) fn test_request<'a, D: ?Sized, S: Scope<'a>>(slot: &mut Option<Request<'a, D, S>>) -> Option<Status> {
    match slot.take().expect("a pending request").test() {
        Ok(status) => Some(status),
        Err(r) => {
            *slot = Some(r);
            None
        }
    }
}

impl Dist {
    /// Calls `ready` until it gives a value, sleeping or yielding in between (`how`), while
    /// answering peers' stall queries, reporting and ending stalls, and honouring stop signals
    /// and panics of other threads. `op` is what this rank waits in, for the reports.
    pub(super) fn poll<T>(&self, op: Op, how: Wait, mut ready: impl FnMut() -> Option<T>) -> T {
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

    /// Enters the next collective: all ranks arrive (waiting ones sleep). Returns what it is.
    pub(super) fn arrive(&self, m: &Mpi, name: &'static str) -> Op {
        let seq = self.coll_seq.get() + 1;
        self.coll_seq.set(seq);
        let op = Op::Collective { name, seq };
        let mut req = Some(m.world.immediate_barrier());
        self.poll(op, Wait::Patient, || test_request(&mut req));
        op
    }

    /// Waits for a request of the operation `op`.
    pub(super) fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, op: Op, how: Wait, req: Request<'a, D, S>) -> Status {
        let mut slot = Some(req);
        self.poll(op, how, || test_request(&mut slot))
    }
}
