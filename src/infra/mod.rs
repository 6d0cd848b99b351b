//! What every command stands on, apart from image classification itself: MPI and the job's
//! collectives (`dist`), logging and progress (`logging`), the per-rank timeline (`timeline`), the
//! process's signals, threads, devices and resources (`process`), fault points for tests
//! (`fault`) and files written atomically (`files`).
pub mod dist;
pub mod fault;
pub mod files;
pub mod logging;
pub mod process;
pub mod timeline;
