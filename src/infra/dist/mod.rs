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
//!
//! One file per concern:
//! - `world.rs`: `Dist`, its MPI state, start (`init`, `single`), end (`Drop`), accessors, limits;
//! - `abort.rs`: the abort path (`abort_job`) and the panic hook (`install_panic_hook`);
//! - `wait.rs`: the back-off between tests and the poll loop (`Dist::poll`) of every wait;
//! - `stall.rs`: the stall protocol: asking peers, answering them, stall reports and limits;
//! - `collective.rs`: barrier, allreduce, broadcast, scatter/gather, one-value sums and agreements;
//! - `p2p.rs`: point-to-point messages (send, receive, poll for a receive) and timed round trips;
//! - `sum.rs`: the fused-sum engine (`SumEngine`) that sums gradients while backward runs;
//! - `place.rs`: placement (`Place`, `describe_placement`, `grouping_mismatch`), the MPI library;
//! - `transport.rs`: what carries the messages (the library's selected layers through MPI_T, and
//!   the environment variables that choose a transport).
// `Dist` is defined in `world.rs`, not here: the submodules name it, and tests/modules.rs allows
// no module that names a module naming it (this one names them in its re-exports).
mod abort;
mod collective;
mod p2p;
mod place;
mod stall;
mod sum;
mod transport;
mod wait;
mod world;

pub use abort::{abort_job, install_panic_hook, take_panic_message, EXIT_STOPPED};
pub use collective::{bucket_floats, BUCKET_FLOATS};
pub use place::{describe_placement, grouping_mismatch, Place};
pub use stall::STOP_GRACE;
pub use sum::{SumEngine, PROGRESS_US};
pub use world::{set_exit_code, Dist, StallLimits};
