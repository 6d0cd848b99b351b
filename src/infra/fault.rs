//! Fault points for the fault-injection tests, compiled in only with the `fault-injection` feature
//! (the test command builds with it; `cargo build --release` does not, and then every function
//! here is an empty inline).
//!
//! `SAC_FAULT=point:action[@rank][#n]` (several separated by commas): the `n`-th time (default 1)
//! that `point` is reached on MPI rank `rank` (default every rank), do `action`:
//! - `panic`: panic, as tch does on a libtorch error (out of memory, a shape error);
//! - `kill`: SIGKILL this process (the scheduler's kill, a node's failure);
//! - `stop`: SIGSTOP this process (a hung rank: it neither works nor dies);
//! - `pause`: sleep 4 s (a slow validation or save, for a test to signal the job meanwhile);
//! - `nan`: `poison` returns true there (the caller makes its value NaN).
//!
//! With `SAC_FAULT_ONCE=<file>` a fault fires only where that file does not exist yet, and the
//! first to fire creates it: a restarted job (jobs/sac-job.sh) then runs without the fault.
//!
//! Points: `step` (start of each training step), `loss` (the training loss, for `nan`),
//! `save-between-files` (after each file of a checkpoint is written), `validate` (each validation
//! batch), `save` (start of a checkpoint save), `predict` (each batch an evaluate predictor
//! takes: a rank of the pipeline, or rank 0's predicting thread under 4 ranks).

#[cfg(feature = "fault-injection")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Mutex;

    struct Fault {
        point: String,
        action: String,
        rank: Option<usize>,
        nth: u64,
    }

    fn parse(spec: &str) -> Vec<Fault> {
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let (s, nth) = match s.split_once('#') {
                    Some((a, n)) => (a, n.parse().expect("SAC_FAULT: #n must be a number")),
                    None => (s, 1),
                };
                let (s, rank) = match s.split_once('@') {
                    Some((a, r)) => (a, Some(r.parse().expect("SAC_FAULT: @rank must be a number"))),
                    None => (s, None),
                };
                let (point, action) = s.split_once(':').expect("SAC_FAULT: point:action");
                Fault { point: point.trim().into(), action: action.into(), rank, nth }
            })
            .collect()
    }

    fn my_rank() -> usize {
        ["PMI_RANK", "OMPI_COMM_WORLD_RANK"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(0)
    }

    /// The action due at this arrival at `point`, if any.
    pub fn due(point: &str) -> Option<String> {
        static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
        let spec = std::env::var("SAC_FAULT").ok()?;
        let mut hits = HITS.lock().ok()?;
        let n = {
            let h = hits.get_or_insert_with(HashMap::new).entry(point.to_string()).or_insert(0);
            *h += 1;
            *h
        };
        let rank = my_rank();
        let action = parse(&spec)
            .into_iter()
            .find(|f| f.point == point && f.nth == n && f.rank.is_none_or(|r| r == rank))
            .map(|f| f.action)?;
        if let Some(once) = std::env::var_os("SAC_FAULT_ONCE") {
            // create_new: of two ranks that fire at once, one fires.
            std::fs::OpenOptions::new().write(true).create_new(true).open(once).ok()?;
        }
        if crate::infra::logging::is_on() {
            tracing::warn!("fault injection: {action} at {point}");
        } else {
            eprintln!("fault injection: {action} at {point}");
        }
        Some(action)
    }
}

/// Reaching `point`: panics, kills or stops this process when `SAC_FAULT` says so.
#[inline]
pub fn point(_point: &str) {
    #[cfg(feature = "fault-injection")]
    if let Some(action) = imp::due(_point) {
        match action.as_str() {
            "panic" => panic!("fault injection: panic at {_point}"),
            // SAFETY: signalling this very process.
            "kill" => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
            "stop" => unsafe {
                libc::kill(libc::getpid(), libc::SIGSTOP);
            },
            "pause" => std::thread::sleep(std::time::Duration::from_secs(4)),
            _ => {}
        }
    }
}

/// True where `SAC_FAULT` asks for a NaN at `point`.
#[inline]
pub fn poison(_point: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    {
        imp::due(_point).is_some_and(|a| a == "nan")
    }
    #[cfg(not(feature = "fault-injection"))]
    false
}
