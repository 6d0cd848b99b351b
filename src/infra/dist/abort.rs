//! The abort path: shared by errors, panics, stalls and signals.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use mpi::topology::{Communicator, SimpleCommunicator};

/// Exit code of an abort after a stop signal (128 + SIGINT, as the clean stop uses).
pub const EXIT_STOPPED: i32 = 130;

/// Set once MPI runs with more than one rank: then a panic ends the job through MPI_Abort.
pub(super) static MULTI: AtomicBool = AtomicBool::new(false);
pub(super) static RANK: AtomicUsize = AtomicUsize::new(0);
/// A panic on a thread other than the main one: the main thread's next wait ends the job.
pub(super) static FATAL: OnceLock<String> = OnceLock::new();

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
    if crate::infra::logging::is_on() {
        tracing::error!("{text}");
    } else {
        eprintln!("error: {text}");
    }
}
