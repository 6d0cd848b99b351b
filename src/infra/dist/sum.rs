//! The fused-sum engine: sums over all ranks that run while this rank computes (the gradient
//! exchange during backward), moved along by a progress thread of their own or by the caller.
use std::sync::OnceLock;
use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::environment::Threading;
use mpi::request::StaticScope;
use mpi::traits::{CommunicatorCollectives, Equivalence};

use super::stall::Op;
use super::wait::Wait;
use super::world::{Dist, Mpi};

impl Dist {
    /// An engine for sums that run while this rank computes (the gradient exchange during
    /// backward). With `thread`, and MPI at `MPI_THREAD_MULTIPLE`, a progress thread of its own
    /// keeps them moving (MPI moves a nonblocking collective only while it is called); else only
    /// the calls of `SumEngine::progress` do.
    pub fn sum_engine(&self, thread: bool) -> SumEngine {
        let multiple = self.threading.is_some_and(|t| t >= Threading::Multiple);
        SumEngine::new(self.multi().is_some(), thread && multiple)
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
    pending: Vec<Pending>,
    quit: bool,
}

/// A request of a sum in flight. MPICH's `MPI_Request` is an integer, Open MPI's a pointer, which
/// Rust does not let cross threads on its own.
struct Pending(mpi::ffi::MPI_Request);

// SAFETY: a request is a handle that MPI at MPI_THREAD_MULTIPLE lets any thread test; the engine
// tests it only under its mutex, so one thread at a time.
unsafe impl Send for Pending {}

impl SumRequests {
    /// Tests every pending request once (this is what moves them); drops the completed ones.
    fn test(&mut self) {
        self.pending.retain_mut(|Pending(req)| {
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
        r.pending.push(Pending(raw));
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
