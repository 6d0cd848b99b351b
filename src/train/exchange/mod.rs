//! The gradient exchange and the other collectives on tensors: [`GradSync`] sums every rank's
//! gradients (and a few numbers every step needs) in one fused buffer, bucket by bucket, during
//! backward where it can; rank 0's weights reach
//! every rank by broadcast; batch-norm statistics are averaged.
use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::train::auto_overlap::{self, AutoOverlap};
use crate::train::hooks::GradHooks;

mod plan;
mod tensors;

use crate::config::Exchange;
use crate::infra::dist::{Dist, SumEngine};
pub use plan::{backward_order, describe_buckets, layout, model_backward_order, Bucket, Way, EDGE_BUCKET_FLOATS};
pub(crate) use tensors::{
    all_finite, average_tensors, broadcast_tensors, buffers_finite, copy_tensors, is_cpu_f32, is_dense, memory_dims,
    memory_order, views_into,
};

/// Averages gradients over the ranks, weighted by each rank's image count, so the result is the
/// gradient of the mean loss over all ranks' images together. Callers back-propagate the *summed*
/// loss of their images (mean × count), which is that weighting. All gradients live in one flat
/// buffer, followed by four more numbers: the rank's image count, its stop request (a signal),
/// whether its step went wrong (a non-finite loss or batch-norm statistic) and its summed loss, so
/// every rank learns them in the same exchange (rank 0 reports the global loss without a
/// collective of its own).
///
/// The buffer is summed in buckets ([`layout`]): whole parameters each, in reverse parameter order
/// (backward produces the last layers' gradients first), one allreduce per bucket. With `overlap`
/// a gradient hook ([`GradHooks`]) marks each parameter's gradient complete during backward, and a
/// bucket's allreduce starts as soon as its gradients are all there (and every earlier bucket has
/// started: the order is the same on every rank), so the exchange runs while backward computes the
/// first layers; the hooks also move the started sums along (MPI moves a nonblocking collective only
/// while it is called). What is left after backward is finished by [`GradSync::finish`]. Without
/// `overlap` all buckets start after backward. The buckets and their order are the same either way,
/// so both give the same sums, bit for bit.
///
/// With `exchange = bf16` (more than one rank) each bucket's gradients are rounded to bfloat16 when
/// it starts and sent as such (half the bytes), summed pair by pair in f32 (`crate::bf16`), and
/// the sums turned back into f32 in `recv` when every bucket is done; the four numbers after the
/// gradients are summed as f32 beside them. Overlap or not, the rounding and the sums are the same.
///
/// For parameters that are contiguous f32 CPU tensors (training on the CPU), each parameter's
/// gradient *is* a view into the send buffer (what DDP calls gradient_as_bucket_view): backward
/// accumulates straight into it, so nothing is copied before the allreduce, and the division by
/// the image count is left to the optimizer (`Synced::scale`), so nothing is copied after it.
/// On a GPU the gradients are views into one flat buffer on the device instead: after backward
/// one copy brings it into the (page-locked) send buffer, MPI sums in host memory, and the
/// optimizer takes the sum back to the GPU in one copy; with one rank the flat gradient stays on
/// the GPU. No hooks there (autograd runs a GPU's hooks on its own device threads, and a bucket
/// could only leave the GPU by waiting for the kernels before it), so the exchange follows
/// backward.
pub struct GradSync {
    params: Vec<Tensor>,
    numel: usize,
    /// The gradients, then this rank's image count, stop flag, non-finite flag, summed loss and
    /// verdict of `train.overlap = "auto"`.
    send: Tensor,
    /// The sums over all ranks, same layout.
    recv: Tensor,
    /// Where backward leaves the gradients.
    grads: Grads,
    /// The buckets and the sums in flight, shared with the hooks.
    launch: Rc<RefCell<Launch>>,
    hooks: Option<GradHooks>,
    /// This rank's images in the current step (`begin`).
    images: usize,
    /// The gradients as bfloat16 on their way (`exchange = bf16`): sent and summed.
    half: Option<(Vec<u16>, Vec<u16>)>,
    /// `train.overlap = "auto"`: the trial that decides whether the hooks start buckets.
    auto: Option<AutoOverlap>,
    /// The hooks start this step's buckets (set by `begin`, the same on every rank).
    active: bool,
}

/// Where backward leaves the gradients.
enum Grads {
    /// Views into `send` (contiguous f32 CPU parameters): nothing to copy.
    Host,
    /// Views into one flat f32 buffer on the parameters' GPU: one copy into `send` per step.
    Device(Tensor),
    /// Anywhere else: each gradient copied into `send` after backward.
    Loose,
}

/// The bucket state a step shares with the hooks.
struct Launch {
    buckets: Vec<Bucket>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Per bucket: parameters whose gradient backward has not completed yet.
    waiting: Vec<usize>,
    /// The next bucket to start.
    next: usize,
    /// Buckets that started during backward (the rest after it).
    early: usize,
    /// The sums in flight.
    engine: SumEngine,
    /// Set between `begin` and `finish` of a step whose buckets the hooks start.
    armed: Option<Armed>,
}

/// Where the hooks start sums: valid from `GradSync::begin` to `GradSync::finish`, which only
/// `GradSync::step` calls, with `dist` and the GradSync (owner of the buffers) borrowed for the
/// whole call. `finish` clears it before it returns.
struct Armed {
    dist: *const Dist,
    send: *mut f32,
    recv: *mut f32,
    /// bfloat16 buffers of the first `numel` floats (the gradients), or null: all sums in f32.
    send16: *mut u16,
    recv16: *mut u16,
    numel: usize,
}

impl Launch {
    fn new(buckets: Vec<Bucket>, params: usize, engine: SumEngine) -> Self {
        let mut bucket_of = vec![0; params];
        for (b, bucket) in buckets.iter().enumerate() {
            for &i in &bucket.params {
                bucket_of[i] = b;
            }
        }
        let waiting = buckets.iter().map(|b| b.params.len()).collect();
        Launch { buckets, bucket_of, waiting, next: 0, early: 0, engine, armed: None }
    }

    fn reset(&mut self) {
        for (w, b) in self.waiting.iter_mut().zip(&self.buckets) {
            *w = b.params.len();
        }
        self.next = 0;
        self.early = 0;
    }

    /// Starts bucket `self.next`: one sum per run (in bfloat16, two for a run that holds both
    /// gradients and the f32 numbers after them).
    fn start_next(&mut self, armed: &Armed) {
        for run in &self.buckets[self.next].runs {
            // The part of the run summed as bfloat16: gradients, when there are bfloat16 buffers.
            let cut = if armed.send16.is_null() { run.start } else { run.end.min(armed.numel).max(run.start) };
            // SAFETY: `armed` points at the live send/recv buffers of the GradSync (p + EXTRAS
            // floats, which every run lies in, and, if not null, p bfloat16 values each), and
            // nothing touches this range until `finish` has completed the sum; `dist` is the one
            // `GradSync::step` borrows for the whole step, which `finish` ends.
            unsafe {
                let dist = &*armed.dist;
                if cut > run.start {
                    let n = cut - run.start;
                    let grads = std::slice::from_raw_parts(armed.send.add(run.start), n);
                    let send = std::slice::from_raw_parts_mut(armed.send16.add(run.start), n);
                    crate::bf16::encode(grads, send);
                    let recv = std::slice::from_raw_parts_mut(armed.recv16.add(run.start), n);
                    self.engine.start_bf16(dist, send, recv);
                }
                if run.end > cut {
                    let send = std::slice::from_raw_parts(armed.send.add(cut), run.end - cut);
                    let recv = std::slice::from_raw_parts_mut(armed.recv.add(cut), run.end - cut);
                    self.engine.start(dist, send, recv);
                }
            }
        }
        self.next += 1;
    }

    /// A hook: parameter `i`'s gradient is complete. Starts the buckets now complete, in order,
    /// and, without a progress thread, lets MPI move the sums in flight.
    fn ready(&mut self, i: usize) {
        let Some(armed) = self.armed.take() else { return };
        let b = self.bucket_of[i];
        self.waiting[b] = self.waiting[b].saturating_sub(1);
        while self.next < self.buckets.len() && self.waiting[self.next] == 0 {
            self.start_next(&armed);
            self.early += 1;
        }
        if !self.engine.threaded() {
            self.engine.progress();
        }
        self.armed = Some(armed);
    }
}

/// The outcome of one `GradSync::sync`.
pub struct Synced {
    /// The summed gradient, flat, on the CPU (with one rank on a GPU: on the GPU), valid until the
    /// next `zero_grads`; times `scale` it is the gradient of the mean loss over all ranks' images.
    pub grad: Tensor,
    /// 1 / images (0 when no rank had an image).
    pub scale: f32,
    /// Images over all ranks in this step.
    pub images: f32,
    /// Some rank asked to stop.
    pub stop: bool,
    /// Some rank's loss or batch-norm statistics were not finite, or the summed gradient is not.
    pub non_finite: bool,
    /// The summed loss over all ranks' images (divide by `images` for the mean).
    pub loss: f64,
    /// Of the exchange's time, how long this rank waited for the others to arrive (the exchange
    /// after backward only: with overlap no rank waits apart from the sums themselves).
    pub wait: std::time::Duration,
    /// This step's buckets could start during backward (the hooks were armed).
    pub overlapped: bool,
    /// `train.overlap = "auto"` chose its way at this step: the line that says so.
    pub chose: Option<String>,
    /// Buckets whose sum started during backward, of `buckets`.
    pub early: usize,
    pub buckets: usize,
}

/// A contiguous f32 CPU tensor as a mutable slice.
///
/// SAFETY: the caller guarantees that `t` is a contiguous f32 CPU tensor of at least `n` elements
/// and that nothing else reads or writes it while the slice lives.
unsafe fn f32_slice_mut<'a>(t: &Tensor, n: usize) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n)
}

impl GradSync {
    /// `params`: the trained parameters, in the order the optimizer uses (that of the flat
    /// gradient). `order`: the order in which backward completes their gradients
    /// ([`backward_order`]); `None` takes the reverse parameter order. It must be the same on
    /// every rank. `overlap`: start buckets during backward (only for CPU f32 parameters; ignored
    /// otherwise). Buckets hold at most `dist::bucket_floats()` floats. `exchange`: the gradients'
    /// format on the wire (one rank sends nothing, so it keeps f32).
    pub fn new(
        dist: &Dist,
        params: &[Tensor],
        order: Option<Vec<usize>>,
        overlap: bool,
        exchange: Exchange,
    ) -> Result<Self> {
        let numel: usize = params.iter().map(Tensor::numel).sum();
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        let on_gpu =
            device.is_cuda() && params.iter().all(|t| t.device() == device && t.kind() == Kind::Float && is_dense(t));
        // Page-locked host buffers where a GPU copies to and from them: copies at full speed.
        let buf = || {
            let t = Tensor::zeros([numel as i64 + EXTRAS as i64], (Kind::Float, Device::Cpu));
            if on_gpu {
                t.pin_memory(device)
            } else {
                t
            }
        };
        let sizes: Vec<usize> = params.iter().map(Tensor::numel).collect();
        let order = order.unwrap_or_else(|| (0..params.len()).rev().collect());
        let buckets = layout(&sizes, &order, crate::infra::dist::bucket_floats(), EDGE_BUCKET_FLOATS, EXTRAS);
        let mut sync = GradSync {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            numel,
            send: buf(),
            recv: buf(),
            grads: if params.is_empty() {
                Grads::Loose
            } else if params.iter().all(is_cpu_f32) {
                Grads::Host
            } else if on_gpu {
                Grads::Device(Tensor::zeros([numel as i64], (Kind::Float, device)))
            } else {
                Grads::Loose
            },
            launch: Rc::new(RefCell::new(Launch::new(buckets, params.len(), dist.sum_engine(overlap)))),
            hooks: None,
            images: 0,
            half: (exchange == Exchange::Bf16 && dist.size() > 1).then(|| (vec![0u16; numel], vec![0u16; numel])),
            auto: None,
            active: false,
        };
        if let Grads::Device(flat) = &sync.grads {
            bind_grads(&sync.params, flat);
        }
        if matches!(sync.grads, Grads::Host) {
            bind_grads(&sync.params, &sync.send);
            if overlap {
                let launch = Rc::clone(&sync.launch);
                sync.hooks = Some(GradHooks::install(params, move |i| launch.borrow_mut().ready(i))?);
            }
        }
        Ok(sync)
    }

    /// Buckets start during backward (in some steps with `auto_overlap`).
    pub fn overlaps(&self) -> bool {
        self.hooks.is_some()
    }

    /// `train.overlap = "auto"`: from now on, a trial over the first steps (the same on every
    /// rank) chooses between starting buckets during backward and after it. Nothing to choose
    /// where no hooks are installed (one rank, not CPU f32).
    pub fn auto_overlap(&mut self, dist: &Dist) {
        if self.hooks.is_some() {
            self.auto = Some(AutoOverlap::new(dist.rank() == 0));
        }
    }

    /// `train.overlap = "auto"` is choosing or has chosen the way of the steps.
    pub fn auto(&self) -> bool {
        self.auto.is_some()
    }

    /// A progress thread moves the sums in flight.
    pub fn threaded(&self) -> bool {
        self.launch.borrow().engine.threaded()
    }

    /// The buckets, in the order they are summed.
    pub fn buckets(&self) -> Vec<Bucket> {
        self.launch.borrow().buckets.clone()
    }

    /// Zeroes the gradients before a backward pass (one pass over the flat buffer when bound).
    pub fn zero_grads(&mut self) {
        tch::no_grad(|| match &self.grads {
            Grads::Host => {
                let _ = self.send.narrow(0, 0, self.numel as i64).zero_();
            }
            Grads::Device(flat) => {
                let _ = flat.shallow_clone().zero_();
            }
            Grads::Loose => {
                for p in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            }
        });
    }

    /// The gradients cross the network as bfloat16.
    pub fn bf16(&self) -> bool {
        self.half.is_some()
    }

    /// Where this step's sums start: `dist` and the buffers.
    fn armed(&mut self, dist: &Dist) -> Armed {
        let (send16, recv16) = match &mut self.half {
            Some((s, r)) => (s.as_mut_ptr(), r.as_mut_ptr()),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        Armed {
            dist: dist as *const Dist,
            send: self.send.data_ptr() as *mut f32,
            recv: self.recv.data_ptr() as *mut f32,
            send16,
            recv16,
            numel: self.numel,
        }
    }

    /// One step's exchange around its backward pass: opens the step with what this rank brings
    /// (`mine`), runs `backward` (nothing, for a rank without a batch, or for gradients computed
    /// before), then starts what the hooks have not started and waits for every sum. With
    /// overlap the hooks start buckets during `backward`; the sums in flight then use `dist` and
    /// this struct's buffers, and both are borrowed for this whole call, so nothing they use can
    /// go before the sums are complete.
    pub fn step(&mut self, dist: &Dist, mine: StepInfo, backward: impl FnOnce()) -> Synced {
        self.begin(dist, mine);
        backward();
        self.finish(dist)
    }

    /// `step` for gradients computed before: the exchange alone.
    pub fn sync(&mut self, dist: &Dist, mine: StepInfo) -> Synced {
        self.step(dist, mine, || {})
    }

    /// Opens a step, before its backward pass (if this rank has one: `images` > 0). With overlap
    /// the hooks start buckets from here on, until `finish`; only `step` calls the two.
    fn begin(&mut self, dist: &Dist, mine: StepInfo) {
        let StepInfo { images, loss, stop, bad } = mine;
        let p = self.numel;
        // SAFETY: `send` is a contiguous f32 CPU tensor of p + EXTRAS elements that only this
        // struct owns, and no sum is in flight (the last `finish` completed them all).
        let mut launch = self.launch.borrow_mut();
        launch.reset();
        let send = unsafe { f32_slice_mut(&self.send, p + EXTRAS) };
        if images == 0 {
            send[..p].fill(0.0);
        }
        send[p + extra::IMAGES] = images as f32;
        send[p + extra::STOP] = f32::from(u8::from(stop));
        send[p + extra::BAD] = f32::from(u8::from(bad));
        send[p + extra::LOSS] = if images == 0 { 0.0 } else { loss as f32 };
        send[p + extra::VERDICT] = match self.auto.as_mut() {
            Some(a) => {
                a.began();
                a.verdict()
            }
            None => auto_overlap::NONE,
        };
        self.images = images;
        drop(launch);
        // The same on every rank: the hooks are installed on all or none (the same parameters
        // and device), and the trial's schedule depends only on the step count.
        self.active = self.hooks.is_some() && self.auto.as_ref().is_none_or(AutoOverlap::overlap_now);
        if self.active && images > 0 && dist.size() > 1 {
            let armed = self.armed(dist);
            self.launch.borrow_mut().armed = Some(armed);
        }
    }

    /// Closes the step after its backward pass: starts the buckets not started yet and waits until
    /// every sum is complete. Returns the sums of the gradients, image counts, stop requests,
    /// non-finite flags and losses over the ranks.
    fn finish(&mut self, dist: &Dist) -> Synced {
        if let Some(h) = &self.hooks {
            h.check();
        }
        let p = self.numel;
        let armed = self.armed(dist);
        let shared = Rc::clone(&self.launch);
        let mut launch = shared.borrow_mut();
        launch.armed = None;
        // One rank on a GPU: the flat gradient stays where it is.
        let stays = dist.size() == 1 && matches!(self.grads, Grads::Device(_));
        self.gradients_into_send(stays);
        let (tensor, wait) = if dist.size() == 1 {
            (&self.send, std::time::Duration::ZERO)
        } else {
            (&self.recv, self.sum_the_rest(dist, &armed, &mut launch))
        };
        // SAFETY: every sum is complete; `tensor` is one of the two buffers of p + EXTRAS floats.
        let sums = unsafe { f32_slice_mut(tensor, p + EXTRAS) };
        let total = sums[p + extra::IMAGES];
        // The sum is the same on every rank, so every rank decides alike. One read of the buffer.
        let (grad, grad_finite) = match &self.grads {
            Grads::Device(flat) if stays => {
                (flat.shallow_clone(), self.images == 0 || bool::try_from(flat.isfinite().all()).unwrap_or(false))
            }
            _ => (tensor.narrow(0, 0, p as i64), all_finite(&sums[..p])),
        };
        let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
        let verdict = sums[p + extra::VERDICT];
        let chose = self.auto.as_mut().and_then(|a| a.finished(self.active, verdict));
        Synced {
            grad,
            scale,
            images: total,
            stop: sums[p + extra::STOP] > 0.0,
            non_finite: sums[p + extra::BAD] > 0.0 || !grad_finite,
            loss: f64::from(sums[p + extra::LOSS]),
            wait,
            overlapped: self.active,
            chose,
            early: launch.early,
            buckets: launch.buckets.len(),
        }
    }

    /// After backward: the gradients into the send buffer where they are not views of it (one
    /// copy from a GPU's flat buffer; one per parameter when they are loose).
    fn gradients_into_send(&self, stays: bool) {
        let p = self.numel;
        match &self.grads {
            Grads::Device(flat) if self.images > 0 && !stays => {
                // One copy to page-locked memory; it waits for backward's kernels.
                tch::no_grad(|| self.send.narrow(0, 0, p as i64).copy_(flat));
            }
            Grads::Device(_) if !stays => {
                // No backward this step (`begin` zeroed the gradients' part of `send`), but the
                // last step's sums may still be on their way to the GPU out of `recv`.
                if let Device::Cuda(i) = self.params[0].device() {
                    tch::Cuda::synchronize(i as i64);
                }
            }
            _ => {}
        }
        if self.images > 0 && matches!(self.grads, Grads::Loose) {
            // SAFETY: as in `begin`.
            let send = unsafe { f32_slice_mut(&self.send, p + EXTRAS) };
            let mut off = 0;
            for t in &self.params {
                let n = t.numel();
                let g = t.grad();
                if g.defined() {
                    let g = g.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                    g.copy_data(&mut send[off..off + n], n);
                } else {
                    send[off..off + n].fill(0.0);
                }
                off += n;
            }
        }
    }

    /// Starts the buckets not started yet and waits until every sum is complete (bfloat16 sums
    /// decoded into `recv`); returns how long this rank waited for the others to arrive.
    fn sum_the_rest(&self, dist: &Dist, armed: &Armed, launch: &mut Launch) -> std::time::Duration {
        let mut wait = std::time::Duration::ZERO;
        if !self.active {
            // No bucket started during backward: every rank arrives first (waiting ones sleep).
            // (With hooks armed, a rank without images starts all buckets here while the others
            // have started some already, so there is no barrier: the collectives must match.)
            let t = std::time::Instant::now();
            dist.barrier();
            wait = t.elapsed();
        }
        while launch.next < launch.buckets.len() {
            launch.start_next(armed);
        }
        launch.engine.finish(dist, "gradient allreduce");
        if let Some((_, recv16)) = &self.half {
            // SAFETY: every sum is complete; `recv` holds p + EXTRAS floats.
            crate::bf16::decode(recv16, &mut unsafe { f32_slice_mut(&self.recv, self.numel + EXTRAS) }[..self.numel]);
        }
        wait
    }
}

/// What a rank brings to a step's exchange besides its gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepInfo {
    /// Its images in this step (0: no batch; its gradients count as zero).
    pub images: usize,
    /// Its summed loss (mean × images; ignored without images).
    pub loss: f64,
    /// It asks every rank to stop at this step (a signal).
    pub stop: bool,
    /// Its loss or batch-norm statistics are not finite.
    pub bad: bool,
}

/// Makes every parameter's gradient a view into `flat` (the parameters' elements one after the
/// other, on their device). A gradient must exist to be re-pointed, so a backward pass of zero
/// creates them first; from then on autograd accumulates into the existing gradient in place
/// instead of replacing it. Leaves `flat` zeroed.
fn bind_grads(params: &[Tensor], flat: &Tensor) {
    for p in params {
        if !p.grad().defined() {
            (p.sum(Kind::Float) * 0.0).backward();
        }
    }
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
    tch::no_grad(|| {
        views_into(flat, &grads);
        let _ = flat.shallow_clone().zero_();
    });
}

/// Numbers after the gradients in the exchange buffer, summed with them: their offsets after the
/// last gradient.
mod extra {
    /// The rank's image count.
    pub const IMAGES: usize = 0;
    /// 1 if the rank asks to stop.
    pub const STOP: usize = 1;
    /// 1 if the rank's loss or batch-norm statistics are not finite.
    pub const BAD: usize = 2;
    /// The rank's summed loss.
    pub const LOSS: usize = 3;
    /// Rank 0's verdict of `train.overlap = "auto"` (0 from the other ranks).
    pub const VERDICT: usize = 4;
}

/// How many numbers follow the gradients (`extra`).
const EXTRAS: usize = extra::VERDICT + 1;

#[cfg(test)]
mod tests {
    use super::*;

    /// resnet18 for 10 classes, its trained parameters in name order as training keeps them.
    fn resnet18() -> crate::train::model::Model {
        crate::train::model::Model::new(crate::models::Arch::Resnet18, 10, Device::Cpu, false)
    }

    /// One rank, with the hooks installed and without: the same sums, and nothing starts early
    /// (one rank has no exchange to start). That buckets do start during backward on several
    /// ranks is tests/train.rs's `exchange_during_backward_…` (rank 0's count of early buckets).
    #[test]
    fn one_rank_sums_alike_with_and_without_hooks_and_starts_nothing_early() {
        let model = resnet18();
        let params: Vec<Tensor> = model.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let dist = Dist::single();
        let mut results = Vec::new();
        for overlap in [false, true] {
            let mut sync = GradSync::new(&dist, &params, None, overlap, Exchange::Bf16).unwrap();
            assert!(sync.buckets().len() > 2, "{:?}", sync.buckets());
            sync.zero_grads();
            let loss = model.net.forward_t(&x, true).sum(Kind::Float);
            let s = sync.step(&dist, StepInfo { images: 2, loss: 1.5, ..StepInfo::default() }, || loss.backward());
            assert_eq!((s.images, s.loss, s.buckets), (2.0, 1.5, sync.buckets().len()));
            // One rank has no exchange to start: nothing starts early.
            assert_eq!(s.early, 0);
            results.push(s.grad.copy());
        }
        assert!(results[0].equal(&results[1]));
    }
}
