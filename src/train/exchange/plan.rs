//! The exchange's plan, pure and the same on every rank: which parameters' gradients form each
//! bucket, in the order backward completes them, and where they lie in the flat buffer.
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::infra::dist::Dist;
use crate::train::hooks::GradHooks;
use crate::train::model::Model;

/// A bucket of the exchange: parameters `params` (indices, in the order backward completes
/// them), whose gradients are the element ranges `runs` of the flat buffer (one allreduce each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub params: Vec<usize>,
    pub runs: Vec<Range<usize>>,
}

impl Bucket {
    pub fn floats(&self) -> usize {
        self.runs.iter().map(Range::len).sum()
    }
}

/// The largest first and last bucket, in floats (1 MiB, DDP's first bucket): the first starts as
/// soon as backward has done the last layers; the last holds the first layers, whose gradients
/// come at the very end of backward, so its sum is the part of the exchange nothing can hide.
pub const EDGE_BUCKET_FLOATS: usize = 1 << 18;

/// The buckets for parameters of `sizes` elements (in parameter order, which is the buffer's),
/// in the order they are summed: `order` is the order in which backward completes the parameters'
/// gradients (every index once). Each bucket takes the next parameters of `order` up to `cap`
/// floats (`edge` for the first one) unless one parameter alone is larger, and the last
/// parameters of `order` that fit in `edge` floats (at least one) form a bucket of their own at
/// the end. The first bucket also carries the `extras` floats after the gradients.
pub fn layout(sizes: &[usize], order: &[usize], cap: usize, edge: usize, extras: usize) -> Vec<Bucket> {
    let n = sizes.len();
    assert_eq!(order.len(), n, "the order names every parameter once");
    let offsets: Vec<usize> = std::iter::once(0)
        .chain(sizes.iter().scan(0, |acc, &k| {
            *acc += k;
            Some(*acc)
        }))
        .collect();
    let total = offsets[n];
    let bucket = |members: &[usize], first: bool| {
        let mut params = members.to_vec();
        let mut sorted = params.clone();
        sorted.sort_unstable();
        let mut runs: Vec<Range<usize>> = Vec::new();
        let extra = first.then_some(total..total + extras).filter(|r| !r.is_empty());
        for r in sorted.iter().map(|&i| offsets[i]..offsets[i + 1]).filter(|r| !r.is_empty()).chain(extra) {
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        }
        params.shrink_to_fit();
        Bucket { params, runs }
    };
    if n == 0 {
        return vec![bucket(&[], true)];
    }
    // The last parameters of `order` that fit in `edge` (at least one) form the last bucket.
    let mut tail = n - 1;
    let mut tail_floats = sizes[order[tail]];
    while tail > 0 && tail_floats + sizes[order[tail - 1]] <= edge {
        tail -= 1;
        tail_floats += sizes[order[tail]];
    }
    let mut buckets = Vec::new();
    let mut start = 0;
    while start < tail {
        let limit = if buckets.is_empty() { edge } else { cap };
        let mut end = start + 1;
        let mut floats = sizes[order[start]];
        while end < tail && floats + sizes[order[end]] <= limit {
            floats += sizes[order[end]];
            end += 1;
        }
        buckets.push(bucket(&order[start..end], buckets.is_empty()));
        start = end;
    }
    buckets.push(bucket(&order[tail..], buckets.is_empty()));
    buckets
}

/// The order in which backward completes the gradients of `params`: `backward` runs a backward
/// pass that reaches them (e.g. of a small batch through the model) while hooks record it.
/// Parameters it leaves without a gradient come last, in reverse parameter order. The gradients
/// it leaves behind are the caller's to zero. The order is a property of the model's graph, the
/// same on every rank for the same model.
pub fn backward_order(params: &[Tensor], backward: impl FnOnce()) -> Result<Vec<usize>> {
    let seen = Rc::new(RefCell::new(Vec::with_capacity(params.len())));
    let log = Rc::clone(&seen);
    let hooks = GradHooks::install(params, move |i| log.borrow_mut().push(i))?;
    backward();
    hooks.check();
    drop(hooks);
    let mut order = Vec::with_capacity(params.len());
    let mut placed = vec![false; params.len()];
    for &i in seen.borrow().iter() {
        if !std::mem::replace(&mut placed[i], true) {
            order.push(i);
        }
    }
    order.extend((0..params.len()).rev().filter(|&i| !placed[i]));
    Ok(order)
}

/// The backward order ([`backward_order`]) of the trained parameters of `model`, from one
/// backward pass of two blank `height` × `width` images in evaluation mode (batch-norm statistics
/// stay as they are; the gradients it leaves are zeroed before every step). Rank 0 finds it and
/// sends it to every rank, so all make the same buckets.
pub fn model_backward_order(dist: &Dist, model: &Model, height: u32, width: u32, device: Device) -> Result<Vec<usize>> {
    let params: Vec<Tensor> = model.params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let mut bytes = Vec::new();
    if dist.is_root() {
        let x = Tensor::zeros([2, 3, i64::from(height), i64::from(width)], (Kind::Float, device));
        let order = backward_order(&params, || model.net.forward_t(&x, false).sum(Kind::Float).backward())?;
        bytes = order.iter().flat_map(|&i| (i as u32).to_le_bytes()).collect();
    }
    dist.broadcast_bytes(0, &mut bytes);
    let order: Vec<usize> =
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize).collect();
    anyhow::ensure!(
        order.len() == params.len(),
        "rank 0's gradient order names {} parameters, not {}",
        order.len(),
        params.len()
    );
    Ok(order)
}

/// One line for the log: the buckets and how they are exchanged.
/// How a step's buckets are summed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// During backward, moved along by a progress thread.
    DuringBackwardByThread,
    /// During backward, moved along by the gradient hooks.
    DuringBackwardByHooks,
    /// After backward, in page-locked host memory (a GPU's gradients).
    AfterBackwardFromGpu,
    /// After backward (`train.overlap = false`).
    AfterBackward,
}

pub fn describe_buckets(buckets: &[Bucket], way: Way) -> String {
    let mib: Vec<String> =
        buckets.iter().map(|b| format!("{:.1}", (b.floats() * 4) as f64 / (1 << 20) as f64)).collect();
    format!(
        "gradient exchange: {} buckets in backward order ({} MiB), {}",
        buckets.len(),
        mib.join(", "),
        match way {
            Way::DuringBackwardByThread =>
                "each summed as soon as backward has completed its gradients (train.overlap), moved by a progress thread",
            Way::DuringBackwardByHooks =>
                "each summed as soon as backward has completed its gradients (train.overlap), moved by the gradient \
                 hooks (MPI does not offer MPI_THREAD_MULTIPLE for a progress thread)",
            Way::AfterBackwardFromGpu =>
                "summed after backward in page-locked host memory, one copy from and one to the GPU (on a GPU the \
                 exchange follows backward; train.overlap applies to the CPU)",
            Way::AfterBackward => "summed after backward (train.overlap = false)",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// resnet18 for 10 classes, its trained parameters in name order as training keeps them.
    fn resnet18() -> crate::train::model::Model {
        crate::train::model::Model::new(crate::models::Arch::Resnet18, 10, Device::Cpu, false)
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn buckets_follow_the_backward_order_with_small_edges() {
        // Sizes in parameter order; backward completes them last to first; cap 100, edge 10.
        let sizes = [4, 4, 50, 60, 3, 70, 2, 5];
        let order: Vec<usize> = (0..8).rev().collect();
        let b = layout(&sizes, &order, 100, 10, 4);
        let params: Vec<_> = b.iter().map(|b| b.params.clone()).collect();
        // First bucket: the last parameters up to 10 floats (5 + 2; adding 70 would pass it);
        // then 70 + 3 (adding 60 would pass 100); 60; 50; then the first parameters that fit in
        // 10 floats (4 + 4) on their own at the end.
        assert_eq!(params, vec![vec![7, 6], vec![5, 4], vec![3], vec![2], vec![1, 0]]);
        // The first bucket carries the 4 extras after the 198 gradients, in one run.
        assert_eq!(b[0].runs, vec![191..202]);
        assert_eq!(b[1].runs, vec![118..191]);
        assert_eq!(b.last().unwrap().runs, vec![0..8]);
        let floats: usize = b.iter().map(Bucket::floats).sum();
        assert_eq!(floats, 198 + 4);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn buckets_out_of_parameter_order_sum_in_runs() {
        // Backward completes parameter 1 (the head) first, then 4, 3, 2, 0.
        let sizes = [8, 6, 50, 50, 50];
        let b = layout(&sizes, &[1, 4, 3, 2, 0], 100, 60, 4);
        let params: Vec<_> = b.iter().map(|b| b.params.clone()).collect();
        // The last bucket: 0 and 2 (58 floats; with 3 it would pass the edge of 60).
        assert_eq!(params, vec![vec![1, 4], vec![3], vec![2, 0]]);
        // Parameters 1 and 4 are apart in the buffer: two runs, the extras joined to the second.
        assert_eq!(b[0].runs, vec![8..14, 114..168]);
        assert_eq!(b[1].runs, vec![64..114]);
        assert_eq!(b[2].runs, vec![0..8, 14..64]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn a_parameter_larger_than_a_bucket_gets_one_of_its_own() {
        let b = layout(&[500, 20, 300], &[2, 1, 0], 100, 10, 0);
        let params: Vec<_> = b.iter().map(|b| b.params.clone()).collect();
        // The first parameter alone passes the edge: it is the last bucket anyway.
        assert_eq!(params, vec![vec![2], vec![1], vec![0]]);
        // A model within the edge is one bucket; no parameters still make one (for the extras).
        assert_eq!(layout(&[3, 4], &[1, 0], 100, 10, 4), vec![Bucket { params: vec![1, 0], runs: vec![0..11] }]);
        assert_eq!(layout(&[], &[], 100, 10, 4), vec![Bucket { params: vec![], runs: vec![0..4] }]);
    }

    #[test]
    fn the_backward_order_of_a_resnet_ends_with_its_stem_and_starts_at_its_head() {
        let model = resnet18();
        let params: Vec<Tensor> = model.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let x = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let order = backward_order(&params, || {
            model.net.forward_t(&x, false).sum(Kind::Float).backward();
        })
        .unwrap();
        let name = |k: usize| model.params[order[k]].0.as_str();
        assert!(name(0).starts_with("fc."), "{}", name(0));
        assert!(name(order.len() - 1).starts_with("conv1") || name(order.len() - 1).starts_with("bn1"));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..params.len()).collect::<Vec<_>>());
    }
}
