//! The stages of evaluation and the messages between them.
//!
//! read (file bytes) → decode (+ resize) → normalize (float CHW) → predict (top-k, loss).
//! Each stage is a plain function on a batch, and a loop over two links (an inlet and an outlet),
//! so the same code runs as MPI ranks (`mpi_pipeline`) or as threads of one process
//! (`local_pipeline`). Both keep a bounded number of batches in flight (bounded channels,
//! credits), so memory stays bounded whatever the size of the test set.
//!
//! - `stages.rs`: the batches, the four stages and what they share;
//! - `link.rs`: the links (`Inlet`, `Outlet`) and each stage's loop over them;
//! - `local.rs`: the stages as threads joined by bounded channels (fewer than 4 ranks);
//! - `mpi.rs`: the links between ranks, their messages and credits (4 ranks or more).
mod link;
mod local;
mod mpi;
mod stages;

pub use local::local_pipeline;
pub use mpi::mpi_pipeline;
pub use stages::*;
