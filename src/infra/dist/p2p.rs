//! Point to point: messages between two ranks (the evaluate pipeline's, scatter's and gather's),
//! and the round trips `sac mpi-check` measures.
use std::time::Instant;

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::Communicator;

use super::stall::Op;
use super::wait::{test_request, Wait};
use super::world::Dist;

impl Dist {
    /// Sends `data` to `dest` with `tag`, returning once the buffer may be reused.
    pub fn send_bytes(&self, dest: usize, tag: i32, data: &[u8]) {
        self.send_bytes_while(dest, tag, data, || {});
    }

    /// Sends `data` to `dest` with `tag` and calls `meanwhile` while the send is not complete:
    /// a rank that must keep receiving while its own send is delivered, so that no cycle of ranks
    /// can block each other whatever the MPI library's eager limit. Returns once the buffer may be
    /// reused: the request lives in an MPI request scope inside this call, so the borrow of
    /// `data` outlives it by construction.
    pub fn send_bytes_while(&self, dest: usize, tag: i32, data: &[u8], mut meanwhile: impl FnMut()) {
        let m = self.mpi.as_ref().expect("send_bytes needs MPI");
        mpi::request::scope(|scope| {
            let mut slot = Some(m.world.process_at_rank(dest as i32).immediate_send_with_tag(scope, data, tag));
            self.poll(Op::Send { to: dest, tag }, Wait::Patient, || {
                if test_request(&mut slot).is_some() {
                    return Some(());
                }
                meanwhile();
                None
            });
        });
    }

    /// Receives the next message with `tag` from `src` (any rank if `None`): (source, tag, bytes).
    /// Sleeps while nothing has arrived.
    pub fn recv_bytes(&self, src: Option<usize>, tag: i32) -> (usize, i32, Vec<u8>) {
        self.poll(Op::Recv { from: src, tag }, Wait::Patient, || self.try_recv_bytes(src, tag))
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

    /// Calls `ready` until it gives a value, as a wait for a message from `from` (any rank if
    /// `None`) with `tag`: sleeping in between, with stall reports and limits like every wait.
    pub fn poll_recv<T>(&self, from: Option<usize>, tag: i32, ready: impl FnMut() -> Option<T>) -> T {
        self.poll(Op::Recv { from, tag }, Wait::Patient, ready)
    }

    /// The mean seconds of one round trip of a `bytes`-long message between this rank and `peer`
    /// (both call it with each other's rank; the lower rank sends first), over `reps` round trips
    /// after one that warms the path up. Plain blocking MPI calls, which busy-poll inside the
    /// library: only `sac mpi-check`'s short measurement uses it. 0 without MPI or with itself.
    pub fn ping_pong(&self, peer: usize, bytes: usize, reps: usize) -> f64 {
        const TAG: i32 = 0x919;
        let Some(m) = self.multi() else { return 0.0 };
        if peer == self.rank {
            return 0.0;
        }
        let other = m.world.process_at_rank(peer as i32);
        let mut buf = vec![0u8; bytes.max(1)];
        let first = self.rank < peer;
        let round = |buf: &mut Vec<u8>| {
            if first {
                other.send_with_tag(&buf[..], TAG);
                other.receive_into_with_tag(&mut buf[..], TAG);
            } else {
                other.receive_into_with_tag(&mut buf[..], TAG);
                other.send_with_tag(&buf[..], TAG);
            }
        };
        round(&mut buf);
        let start = Instant::now();
        for _ in 0..reps.max(1) {
            round(&mut buf);
        }
        start.elapsed().as_secs_f64() / reps.max(1) as f64
    }
}
