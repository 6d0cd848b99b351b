//! The world: `Dist` and its MPI state, how it starts (`Dist::init`, `Dist::single`) and ends
//! (`Drop`: every rank waits for the others, then MPI is finalized), its accessors, and the
//! limits every wait keeps (`StallLimits`).
use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use mpi::collective::UnsafeUserOperation;
use mpi::environment::{Threading, Universe};
use mpi::request::Request;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::abort::{abort_job, MULTI, RANK};

/// Environment variables that MPI launchers set in every rank they start.
const LAUNCHER_VARS: [&str; 6] =
    ["PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMI_FD"];

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

pub struct Dist {
    pub(super) rank: usize,
    pub(super) size: usize,
    pub(super) local_rank: usize,
    pub(super) local_size: usize,
    pub(super) mpi: Option<Mpi>,
    pub(super) limits: Cell<StallLimits>,
    /// Collectives entered so far: every rank enters them in the same order, so equal numbers
    /// mean the same collective.
    pub(super) coll_seq: Cell<u64>,
    /// The thread support MPI gave (we ask for `Funneled`: MPI is called from the main thread only).
    pub threading: Option<Threading>,
}

pub(super) struct Mpi {
    pub(super) world: SimpleCommunicator,
    /// Sends of the stall protocol still in flight (their buffers are leaked, a few bytes each).
    pub(super) pending: RefCell<Vec<Request<'static, [u8]>>>,
    /// Numbers this rank's stall queries, so late answers to an old one are told apart.
    pub(super) query_id: Cell<u64>,
    /// The bfloat16 sum of the gradient exchange (`train.exchange = "bf16"`, `crate::bf16`).
    pub(super) bf16_sum: UnsafeUserOperation,
    // Last field: dropped last, which finalizes MPI.
    _universe: Universe,
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

    pub(super) fn multi(&self) -> Option<&Mpi> {
        self.mpi.as_ref().filter(|_| self.size > 1)
    }
}
