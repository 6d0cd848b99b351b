//! Collectives: the barrier, sums (of buffers in buckets, or of one number), the minimum, agreement
//! (`all_ok`, `any`), broadcast, scatter and gather.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::Communicator;
use mpi::traits::{Buffer, BufferMut, CommunicatorCollectives, Equivalence, Root};

use super::wait::Wait;
use super::world::Dist;

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

impl Dist {
    /// All ranks arrive; waiting ones sleep.
    pub fn barrier(&self) {
        if let Some(m) = self.multi() {
            self.arrive(m, "barrier");
        }
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
        let t0 = Instant::now();
        let op = self.arrive(m, "allreduce");
        let mut t = crate::infra::timeline::since("exchange", "arrival (waits for every rank)", t0, None);
        mpi::request::scope(|scope| {
            let reqs: Vec<_> = send
                .chunks(bucket_floats())
                .zip(recv.chunks_mut(bucket_floats()))
                .map(|(s, r)| (s.len(), m.world.immediate_all_reduce_into(scope, s, r, SystemOperation::sum())))
                .collect();
            let n = reqs.len();
            for (i, (len, req)) in reqs.into_iter().enumerate() {
                self.wait(op, Wait::Eager, req);
                if crate::infra::timeline::recording() {
                    let mib = (len * std::mem::size_of::<T>()) as f64 / (1 << 20) as f64;
                    t = crate::infra::timeline::since(
                        "exchange",
                        format!("bucket {}/{n} ({mib:.1} MiB)", i + 1),
                        t,
                        None,
                    );
                }
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

    /// The smallest of one number over all ranks.
    pub fn min_f64(&self, x: f64) -> f64 {
        let Some(m) = self.multi() else { return x };
        let op = self.arrive(m, "allreduce");
        let send = [x];
        let mut recv = [x];
        mpi::request::scope(|scope| {
            let req = m.world.immediate_all_reduce_into(scope, &send[..], &mut recv[..], SystemOperation::min());
            self.wait(op, Wait::Eager, req);
        });
        recv[0]
    }

    /// True on every rank iff `ok` on every rank: lets all ranks leave together when one fails.
    pub fn all_ok(&self, ok: bool) -> bool {
        self.sum_f64(if ok { 0.0 } else { 1.0 }) == 0.0
    }

    /// True on every rank iff `flag` on any rank.
    pub fn any(&self, flag: bool) -> bool {
        !self.all_ok(!flag)
    }

    /// Broadcasts `buf` from `root`; the other ranks' vectors are resized to fit.
    pub fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        if self.multi().is_none() {
            return;
        }
        let mut len = [buf.len() as u64];
        self.broadcast_slice(root, &mut len);
        buf.resize(len[0] as usize, 0);
        for chunk in buf.chunks_mut(1 << 30) {
            self.broadcast_slice(root, chunk);
        }
    }

    /// Broadcasts a fixed-size slice from `root`.
    pub fn broadcast_slice<T: Equivalence>(&self, root: usize, buf: &mut [T])
    where
        [T]: BufferMut,
    {
        let Some(m) = self.multi() else { return };
        let op = self.arrive(m, "broadcast");
        mpi::request::scope(|scope| {
            let req = m.world.process_at_rank(root as i32).immediate_broadcast_into(scope, buf);
            self.wait(op, Wait::Eager, req);
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
            // From each rank by name, not from any: messages between two ranks keep their order,
            // so a fast rank's part of the next gather is never taken for this one.
            let mut mine = Some(data);
            let out = (0..self.size)
                .map(|src| match src == root {
                    true => mine.take().unwrap_or_default(),
                    false => self.recv_bytes(Some(src), TAG).2,
                })
                .collect();
            Some(out)
        } else {
            self.send_bytes(root, TAG, &data);
            None
        }
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
