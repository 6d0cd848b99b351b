//! Placement: where the ranks run (hosts, local ranks, threads), how that is described and checked
//! against MPI's grouping into nodes, and what the MPI library says of itself.
use super::world::Dist;

/// Where one rank runs: its host, its rank among the ranks MPI groups on its node, and its torch
/// thread count.
pub struct Place {
    pub host: String,
    pub local_rank: usize,
    pub local_size: usize,
    pub threads: usize,
}

/// The ranks of each host, in order of their first rank.
fn by_host(places: &[Place]) -> Vec<(&str, Vec<usize>)> {
    let mut hosts: Vec<(&str, Vec<usize>)> = Vec::new();
    for (r, p) in places.iter().enumerate() {
        match hosts.iter_mut().find(|(h, _)| *h == p.host) {
            Some((_, ranks)) => ranks.push(r),
            None => hosts.push((&p.host, vec![r])),
        }
    }
    hosts
}

/// "0-3", "0, 2": a list of ranks, runs of three or more consecutive ranks shortened.
fn rank_list(ranks: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        if j > i + 1 {
            parts.push(format!("{}-{}", ranks[i], ranks[j]));
        } else {
            parts.extend(ranks[i..=j].iter().map(usize::to_string));
        }
        i = j + 1;
    }
    parts.join(", ")
}

/// "4 rank(s) on 2 node(s): a: rank(s) 0, 1 (1 thread(s) each); b: rank(s) 2, 3 (…)".
pub fn describe_placement(places: &[Place]) -> String {
    let hosts = by_host(places);
    let list: Vec<String> = hosts
        .iter()
        .map(|(h, ranks)| {
            let threads: Vec<usize> = ranks.iter().map(|&r| places[r].threads).collect();
            let each = if threads.iter().all(|&t| t == threads[0]) {
                format!("{} thread(s) each", threads[0])
            } else {
                format!("threads {threads:?}")
            };
            format!("{h}: rank(s) {} ({each})", rank_list(ranks))
        })
        .collect();
    format!("{} rank(s) on {} node(s): {}", places.len(), hosts.len(), list.join("; "))
}

/// Whether MPI's grouping of ranks into nodes (shared memory, which sets local ranks, thread
/// counts and GPUs) differs from the hostnames'; the message says how.
pub fn grouping_mismatch(places: &[Place]) -> Option<String> {
    let bad: Vec<String> = by_host(places)
        .into_iter()
        .filter_map(|(h, ranks)| {
            let local: Vec<usize> = ranks.iter().map(|&r| places[r].local_rank).collect();
            let sizes: Vec<usize> = ranks.iter().map(|&r| places[r].local_size).collect();
            let agree = local == (0..ranks.len()).collect::<Vec<_>>() && sizes.iter().all(|&n| n == ranks.len());
            (!agree).then(|| {
                format!(
                    "{h} has rank(s) {} but MPI gives them local ranks {local:?} of node sizes {sizes:?}",
                    rank_list(&ranks)
                )
            })
        })
        .collect();
    (!bad.is_empty()).then(|| {
        format!("MPI's grouping of ranks into nodes differs from their hostnames: {}; per-node thread counts and GPUs follow MPI's", bad.join("; "))
    })
}

impl Dist {
    /// Every rank's place (host, local rank, node size, `threads`), on every rank: a gather at
    /// rank 0 and a broadcast.
    pub fn places(&self, threads: usize) -> Vec<Place> {
        let mine =
            format!("{}\t{}\t{}\t{threads}", crate::infra::process::hostname(), self.local_rank, self.local_size);
        let mut all = self.gather_bytes(0, mine.into_bytes()).map(|parts| parts.join(&b'\n')).unwrap_or_default();
        self.broadcast_bytes(0, &mut all);
        String::from_utf8_lossy(&all)
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                Place {
                    host: f.first().unwrap_or(&"?").to_string(),
                    local_rank: num(1),
                    local_size: num(2),
                    threads: num(3),
                }
            })
            .collect()
    }

    /// With more than one rank: rank 0 logs where the ranks run (hosts, ranks, `threads` each),
    /// and warns if MPI's grouping into nodes differs from the hostnames. Every rank calls it.
    pub fn log_placement(&self, threads: usize) {
        if self.multi().is_none() {
            return;
        }
        let places = self.places(threads);
        if self.is_root() {
            if let Some(library) = self.library() {
                let transport = self.transport().unwrap_or_default();
                tracing::info!("MPI: {library}; thread level {}; transport: {transport}", self.thread_level());
            }
            tracing::info!("placement: {}", describe_placement(&places));
            if let Some(w) = grouping_mismatch(&places) {
                tracing::warn!("{w}");
            }
        }
    }

    /// The thread support MPI gave, by its MPI name (sac asks for MPI_THREAD_MULTIPLE: the
    /// exchange's progress thread needs it, and runs without that thread below it).
    pub fn thread_level(&self) -> &'static str {
        use mpi::environment::Threading;
        match self.threading {
            None => "none (one process)",
            Some(Threading::Single) => "MPI_THREAD_SINGLE",
            Some(Threading::Funneled) => "MPI_THREAD_FUNNELED",
            Some(Threading::Serialized) => "MPI_THREAD_SERIALIZED",
            Some(Threading::Multiple) => "MPI_THREAD_MULTIPLE",
        }
    }

    /// The MPI library's own description of itself (`MPI_Get_library_version`), first line.
    pub fn library(&self) -> Option<String> {
        self.mpi.as_ref()?;
        // MPICH: "MPICH Version:\t4.0.2", …, "MPICH Device:\tch4:ucx"; Open MPI: one line.
        // Open MPI's text ends in the C string's NUL, which would end up in logs and terminals.
        let text = mpi::environment::library_version().ok()?.replace('\0', "");
        let lines: Vec<String> = text
            .lines()
            .enumerate()
            .filter(|(i, l)| *i == 0 || l.contains("Device:"))
            .map(|(_, l)| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        Some(lines.join(", "))
    }

    /// Whether the MPI library says it can take CUDA device memory: MPICH's
    /// `MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, …)` (4.0 and later) or Open MPI's
    /// `MPIX_Query_cuda_support()`, looked up at run time (neither is in the MPI standard).
    /// None: one process, or the library answers neither.
    pub fn cuda_aware(&self) -> Option<bool> {
        self.mpi.as_ref()?;
        type GpuQuery = unsafe extern "C" fn(i32, *mut i32) -> i32;
        type CudaQuery = unsafe extern "C" fn() -> i32;
        // MPIX_GPU_SUPPORT_CUDA in MPICH's mpi.h.
        const MPIX_GPU_SUPPORT_CUDA: i32 = 0;
        // SAFETY: dlsym only looks symbols up; a found symbol is the MPI library's function of
        // the documented C signature.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"MPIX_GPU_query_support".as_ptr());
            if !f.is_null() {
                let f: GpuQuery = std::mem::transmute::<*mut libc::c_void, GpuQuery>(f);
                let mut yes = 0i32;
                return (f(MPIX_GPU_SUPPORT_CUDA, &mut yes) == 0).then_some(yes != 0);
            }
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"MPIX_Query_cuda_support".as_ptr());
            if !f.is_null() {
                let f: CudaQuery = std::mem::transmute::<*mut libc::c_void, CudaQuery>(f);
                return Some(f() != 0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(host: &str, local_rank: usize, local_size: usize) -> Place {
        Place { host: host.into(), local_rank, local_size, threads: 2 }
    }

    #[test]
    fn rank_lists_shorten_runs_of_three_or_more() {
        assert_eq!(rank_list(&[0]), "0");
        assert_eq!(rank_list(&[0, 1]), "0, 1");
        assert_eq!(rank_list(&[0, 1, 2, 3]), "0-3");
        assert_eq!(rank_list(&[0, 2, 3, 4, 7, 8]), "0, 2-4, 7, 8");
        assert_eq!(rank_list(&[]), "");
    }

    #[test]
    fn placement_groups_ranks_by_host_in_rank_order() {
        let places = [place("b", 0, 2), place("a", 0, 2), place("b", 1, 2), place("a", 1, 2)];
        assert_eq!(
            describe_placement(&places),
            "4 rank(s) on 2 node(s): b: rank(s) 0, 2 (2 thread(s) each); a: rank(s) 1, 3 (2 thread(s) each)"
        );
        assert!(grouping_mismatch(&places).is_none());
        let mut uneven = vec![place("a", 0, 1)];
        uneven[0].threads = 1;
        uneven.push(place("a", 1, 2));
        assert!(describe_placement(&uneven).contains("threads [1, 2]"), "{}", describe_placement(&uneven));
    }

    #[test]
    fn a_grouping_unlike_the_hostnames_is_named() {
        // MPI put two ranks with different hostnames on one node (shared memory between "hosts").
        let places = [place("h0", 0, 2), place("h1", 1, 2)];
        let w = grouping_mismatch(&places).expect("a mismatch");
        assert!(w.contains("h1 has rank(s) 1 but MPI gives them local ranks [1] of node sizes [2]"), "{w}");
        assert!(w.contains("h0 has rank(s) 0 but MPI gives them local ranks [0] of node sizes [2]"), "{w}");
        // One host's grouping right, the other's not: only the wrong one is named.
        let places = [place("h0", 0, 1), place("h1", 0, 2), place("h1", 0, 2)];
        let w = grouping_mismatch(&places).expect("a mismatch");
        assert!(w.contains("h1 has rank(s) 1, 2 but MPI gives them local ranks [0, 0]"), "{w}");
        assert!(!w.contains("h0 has"), "{w}");
    }
}
