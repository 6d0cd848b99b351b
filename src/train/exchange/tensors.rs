//! Tensors as flat f32 buffers, and the collectives on them outside the step's exchange:
//! rank 0's weights to every rank, batch-norm statistics averaged, finiteness checks.
use tch::{Device, Kind, Tensor};

use crate::infra::dist::Dist;

/// A dense f32 tensor on the CPU (whose elements MPI can read and write in place).
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && is_dense(t)
}

/// The dimensions of `t` from the largest stride to the smallest (ties in dimension order): the
/// order its elements lie in memory when it is dense. `[0, 2, 3, 1]` for a channels-last NCHW tensor.
pub(crate) fn memory_dims(t: &Tensor) -> Vec<i64> {
    let stride = t.stride();
    let mut dims: Vec<usize> = (0..stride.len()).collect();
    dims.sort_by_key(|&d| std::cmp::Reverse(stride[d]));
    dims.into_iter().map(|d| d as i64).collect()
}

/// `t`'s elements fill a block of memory with no gap and no overlap, in some order of its
/// dimensions: contiguous, or channels-last (a parameter in that layout; `is_contiguous` says no).
pub(crate) fn is_dense(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    let mut expect = 1i64;
    for d in memory_dims(t).into_iter().rev().map(|d| d as usize) {
        if size[d] != 1 && stride[d] != expect {
            return false;
        }
        expect *= size[d];
    }
    true
}

/// `t`'s elements as a flat tensor in the order they lie in memory (for a contiguous `t` its
/// `reshape([-1])`): how a dense tensor's values go into the slot it becomes a view of.
pub(crate) fn memory_order(t: &Tensor) -> Tensor {
    t.permute(memory_dims(t)).reshape([-1])
}

/// Re-points each of `tensors` (keeping its shape and strides) at the next elements of `flat`'s
/// storage, one after the other: the gradients of the exchange, the parameters of a GPU's
/// optimizer. Call in no_grad.
pub(crate) fn views_into(flat: &Tensor, tensors: &[Tensor]) {
    let mut off = 0i64;
    for t in tensors {
        let _ = t.shallow_clone().set_source_tensor_storage_offset_(flat, off, t.size(), t.stride());
        off += t.numel() as i64;
    }
}

/// No NaN and no infinity in `v`: an exponent of all ones marks both. An OR of integer flags is
/// associative, so the compiler vectorizes it (a float sum would be a serial chain of adds, ~4×
/// slower on resnet18's 11 M gradients), and the read runs at memory speed.
pub(crate) fn all_finite(v: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    v.chunks(4096).all(|c| c.iter().fold(0u32, |acc, x| acc | u32::from(x.to_bits() & EXP == EXP)) == 0)
}

/// Flattens tensors into one f32 vector on the CPU.
pub(crate) fn flatten(ts: &[Tensor]) -> Vec<f32> {
    if ts.is_empty() {
        return Vec::new();
    }
    let views: Vec<Tensor> = ts.iter().map(|t| t.detach().to_kind(Kind::Float).reshape([-1])).collect();
    let flat = Tensor::cat(&views, 0).to_device(Device::Cpu);
    Vec::<f32>::try_from(&flat).expect("float tensor")
}

/// Copies a flat vector back into the tensors, in order.
pub(crate) fn unflatten(values: &[f32], ts: &[Tensor]) {
    tch::no_grad(|| {
        let mut off = 0;
        for t in ts {
            let n = t.numel();
            let src = Tensor::from_slice(&values[off..off + n]).view(t.size().as_slice()).to_kind(t.kind());
            t.shallow_clone().copy_(&src);
            off += n;
        }
    });
}

/// Same values on every rank: rank 0's.
pub(crate) fn broadcast_tensors(dist: &Dist, ts: &[Tensor]) {
    if dist.size() == 1 {
        return;
    }
    let mut flat = flatten(ts);
    dist.broadcast_slice(0, &mut flat);
    unflatten(&flat, ts);
}

/// Averages tensors (batch-norm statistics) over the ranks.
pub(crate) fn average_tensors(dist: &Dist, ts: &[Tensor]) {
    if dist.size() == 1 || ts.is_empty() {
        return;
    }
    let mut flat = flatten(ts);
    dist.allreduce_sum(&mut flat, &mut Vec::new());
    let n = dist.size() as f32;
    flat.iter_mut().for_each(|v| *v /= n);
    unflatten(&flat, ts);
}

/// `dst[i] = src[i]` in place, outside autograd.
pub(crate) fn copy_tensors(dst: &[Tensor], src: &[Tensor]) {
    tch::no_grad(|| dst.iter().zip(src).for_each(|(d, s)| d.shallow_clone().copy_(s)));
}

/// Are all batch-norm statistics finite? (A few thousand numbers: cheap every step.) The
/// per-tensor answers are gathered where the tensors live and read back once (on a GPU, one
/// wait instead of one per tensor).
pub(crate) fn buffers_finite(buffers: &[Tensor]) -> bool {
    let flags: Vec<Tensor> = buffers.iter().filter(|t| t.is_floating_point()).map(|t| t.isfinite().all()).collect();
    flags.is_empty() || bool::try_from(Tensor::stack(&flags, 0).all()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_layouts_and_their_memory_order() {
        let t = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([2, 3, 2, 2]);
        let nhwc = crate::precision::to_channels_last(&t).unwrap();
        assert!(is_dense(&t) && is_dense(&nhwc) && !nhwc.is_contiguous());
        assert_eq!(memory_dims(&nhwc), [0, 2, 3, 1]);
        // Channels-last memory: for each image and pixel, its 3 channels.
        let first: Vec<f32> = Vec::try_from(memory_order(&nhwc).narrow(0, 0, 6)).unwrap();
        assert_eq!(first, [0.0, 4.0, 8.0, 1.0, 5.0, 9.0]);
        assert!(memory_order(&t).equal(&t.reshape([-1])));
        // Every other element: not dense.
        assert!(!is_dense(&t.view([2, 3, 4]).slice(2, 0, 4, 2)));
    }

    #[test]
    fn all_finite_finds_nan_and_both_infinities_anywhere() {
        let mut v = vec![1.5f32; 10_000];
        assert!(all_finite(&v));
        v[0] = f32::MAX;
        v[1] = -0.0;
        v[2] = f32::MIN_POSITIVE / 2.0; // subnormal
        assert!(all_finite(&v));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = v.clone();
            w[9_999] = bad;
            assert!(!all_finite(&w), "{bad}");
        }
    }
}
