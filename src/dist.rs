//! The only module that touches MPI: the world, scatter/broadcast/gather of byte buffers, the fused
//! float allreduce, point-to-point messages for the evaluate pipeline, and abort.
//!
//! Launched by `mpiexec` (or `srun`), `Dist::init` starts MPI; launched plainly it is a world of one
//! rank whose collectives are identities, so every command runs without MPI.
//!
//! Waiting ranks must not take CPU from working ones when ranks outnumber cores, and MPI
//! implementations busy-poll inside blocking calls. So every operation here is nonblocking
//! and completed by our own polling loop:
//! - waits that may last long (for a slower rank to arrive) sleep with a growing back-off;
//! - collectives first pass an arrival barrier (sleeping), and only then move their data with a
//!   loop that tests and `sched_yield`s, which is short because every rank is there to progress it.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source, Status};
use mpi::request::{Request, Scope};
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

pub struct Dist {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    mpi: Option<Mpi>,
}

struct Mpi {
    world: SimpleCommunicator,
    // Last field: dropped last, which finalizes MPI.
    _universe: Universe,
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
}

fn wait_for<'a, D: ?Sized, S: Scope<'a>>(mut req: Request<'a, D, S>, how: Wait) -> Status {
    let mut backoff = Backoff::new(match how {
        Wait::Patient => Duration::from_micros(200),
        Wait::Eager => Duration::from_secs(3600),
    });
    loop {
        match req.test() {
            Ok(status) => return status,
            Err(r) => {
                req = r;
                backoff.snooze();
            }
        }
    }
}

impl Dist {
    /// Starts MPI when launched by an MPI launcher, else a one-rank world.
    pub fn init() -> Result<Dist> {
        if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            return Ok(Dist::single());
        }
        let universe = mpi::initialize().context("MPI_Init failed")?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        Ok(Dist { rank, size, local_rank, local_size, mpi: Some(Mpi { world, _universe: universe }) })
    }

    /// A world of one rank, without MPI.
    pub fn single() -> Dist {
        Dist { rank: 0, size: 1, local_rank: 0, local_size: 1, mpi: None }
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

    /// Ends every rank of the job. In a one-rank world, exits the process.
    pub fn abort(&self, code: i32) -> ! {
        // MPI_Abort also kills the launcher's output relays: give them a moment to forward what this
        // rank just wrote (its error message), or the user may never see it.
        use std::io::Write;
        let _ = std::io::stderr().flush();
        std::thread::sleep(Duration::from_millis(300));
        match &self.mpi {
            Some(m) if self.size > 1 => m.world.abort(code),
            _ => std::process::exit(code),
        }
    }

    /// All ranks arrive; waiting ones sleep.
    pub fn barrier(&self) {
        if let Some(m) = self.multi() {
            wait_for(m.world.immediate_barrier(), Wait::Patient);
        }
    }

    fn multi(&self) -> Option<&Mpi> {
        self.mpi.as_ref().filter(|_| self.size > 1)
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
        self.barrier();
        mpi::request::scope(|scope| {
            let reqs: Vec<_> = send
                .chunks(bucket_floats())
                .zip(recv.chunks_mut(bucket_floats()))
                .map(|(s, r)| m.world.immediate_all_reduce_into(scope, s, r, SystemOperation::sum()))
                .collect();
            for req in reqs {
                wait_for(req, Wait::Eager);
            }
        });
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

    /// Sum of one number over all ranks.
    pub fn sum_f64(&self, x: f64) -> f64 {
        let mut v = [x];
        self.allreduce_sum(&mut v, &mut Vec::new());
        v[0]
    }

    /// True on every rank iff `ok` on every rank: lets all ranks leave together when one fails.
    pub fn all_ok(&self, ok: bool) -> bool {
        self.sum_f64(if ok { 0.0 } else { 1.0 }) == 0.0
    }

    /// Broadcasts `buf` from `root`; the other ranks' vectors are resized to fit.
    pub fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        let Some(m) = self.multi() else { return };
        let mut len = [buf.len() as u64];
        self.broadcast_slice(root, &mut len);
        buf.resize(len[0] as usize, 0);
        for chunk in buf.chunks_mut(1 << 30) {
            self.broadcast_slice(root, chunk);
        }
        let _ = m;
    }

    /// Broadcasts a fixed-size slice from `root`.
    pub fn broadcast_slice<T: Equivalence>(&self, root: usize, buf: &mut [T])
    where
        [T]: BufferMut,
    {
        let Some(m) = self.multi() else { return };
        self.barrier();
        mpi::request::scope(|scope| {
            let req = m.world.process_at_rank(root as i32).immediate_broadcast_into(scope, buf);
            wait_for(req, Wait::Eager);
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
            let mut out = vec![Vec::new(); self.size];
            out[root] = data;
            for _ in 1..self.size {
                let (src, _, bytes) = self.recv_bytes(None, TAG);
                out[src] = bytes;
            }
            Some(out)
        } else {
            self.send_bytes(root, TAG, &data);
            None
        }
    }

    /// Sends `data` to `dest` with `tag`, returning once the buffer may be reused.
    pub fn send_bytes(&self, dest: usize, tag: i32, data: &[u8]) {
        let m = self.mpi.as_ref().expect("send_bytes needs MPI");
        mpi::request::scope(|scope| {
            let req = m.world.process_at_rank(dest as i32).immediate_send_with_tag(scope, data, tag);
            wait_for(req, Wait::Patient);
        });
    }

    /// Receives the next message with `tag` from `src` (any rank if `None`): (source, tag, bytes).
    /// Sleeps while nothing has arrived.
    pub fn recv_bytes(&self, src: Option<usize>, tag: i32) -> (usize, i32, Vec<u8>) {
        let mut backoff = Backoff::new(Duration::from_micros(200));
        loop {
            if let Some(got) = self.try_recv_bytes(src, tag) {
                return got;
            }
            backoff.snooze();
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
