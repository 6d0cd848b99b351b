//! The optimizers, step for step as `torch.optim.SGD` (momentum, Nesterov), `torch.optim.Adam`
//! and `torch.optim.AdamW`, with weight decay per parameter (batch-norm weights and biases may
//! take `norm_weight_decay`), on the flat averaged gradient of the exchange buffer, with a fused
//! one-pass kernel on the CPU.
use tch::{Device, Kind, Tensor};

use super::exchange::{is_cpu_f32, is_dense, memory_dims, memory_order, views_into};
use crate::config::{OptimizerKind, TrainCfg};

/// Below this many parameters the fused step runs on one thread (a thread costs ~20 µs to start,
/// a million parameters take ~1 ms).
const PARALLEL_MIN: usize = 1 << 20;

/// The optimizer's settings besides the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// SGD's momentum (0: none).
    pub momentum: f64,
    pub nesterov: bool,
    /// Weight decay of the weights (2-D and 4-D parameters) and of batch-norm weights and biases
    /// (1-D parameters). SGD and Adam add `decay × p` to the gradient (L2); AdamW shrinks `p` by
    /// `lr × decay` before its step (decoupled).
    pub weight_decay: f64,
    pub norm_weight_decay: f64,
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper { momentum: 0.9, nesterov: false, weight_decay: 0.0, norm_weight_decay: 0.0 }
    }
}

impl Hyper {
    pub fn from_config(tc: &TrainCfg) -> Self {
        Hyper {
            momentum: tc.momentum,
            nesterov: tc.nesterov,
            weight_decay: tc.weight_decay,
            norm_weight_decay: tc.norm_decay(),
        }
    }

    /// The decay of a parameter: biases and batch-norm weights are the 1-D ones.
    fn decay_of(&self, p: &Tensor) -> f64 {
        if p.dim() <= 1 {
            self.norm_weight_decay
        } else {
            self.weight_decay
        }
    }
}

/// Adam, AdamW or SGD on the flat averaged gradient; the state is flat too, so it saves and
/// broadcasts as one tensor. `lr` is the learning rate of the next step (the schedule sets it).
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub step: i64,
    /// The parameters as one flat tensor (they are views into it) and each element's weight decay,
    /// after [`Optimizer::bind_flat`]: a step is a handful of operations over all of them at once,
    /// where parameter by parameter it would be ten kernel launches per parameter on a GPU.
    flat: Option<Flat>,
    pub hyper: Hyper,
    /// Adam: exp_avg; SGD: momentum_buffer.
    pub m: Tensor,
    /// Adam: exp_avg_sq.
    pub v: Tensor,
    /// The parameters whose elements lie in memory in another order than their logical one
    /// (channels-last convolution weights), after [`Optimizer::adopt_layout`]: their slots of `m`
    /// and `v` are in memory order, as those of the gradient are.
    relaid: Vec<Relaid>,
}

/// A parameter's slot of the flat state, its shape, and the order of its dimensions in memory.
struct Relaid {
    off: i64,
    size: Vec<i64>,
    /// Dimensions from the outermost in memory to the innermost (`[0, 2, 3, 1]`: channels-last).
    dims: Vec<i64>,
}

impl Relaid {
    /// The slot of `flat` seen as the parameter: its shape, with its strides.
    fn view(&self, flat: &Tensor) -> Tensor {
        let in_memory: Vec<i64> = self.dims.iter().map(|&d| self.size[d as usize]).collect();
        let mut back = vec![0i64; self.dims.len()];
        for (i, &d) in self.dims.iter().enumerate() {
            back[d as usize] = i as i64;
        }
        flat.narrow(0, self.off, in_memory.iter().product()).view(in_memory.as_slice()).permute(back)
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Optimizer {
    pub fn new(kind: OptimizerKind, lr: f64, hyper: Hyper, numel: usize, device: Device) -> Self {
        let z = || Tensor::zeros([numel as i64], (Kind::Float, device));
        Optimizer { kind, lr, step: 0, hyper, m: z(), v: z(), flat: None, relaid: Vec::new() }
    }

    /// Follows the parameters' memory layout: the fused step walks parameter, gradient and state
    /// in memory order, so where a parameter is not contiguous (a convolution weight in
    /// channels-last) its slots of `m` and `v` are reordered from logical order (a fresh or loaded
    /// state's, and the checkpoint's, which [`Optimizer::tensors`] keeps writing) into that.
    /// Call once, after the state is loaded and before the first step.
    pub fn adopt_layout(&mut self, params: &[(String, Tensor)]) {
        assert!(self.relaid.is_empty(), "the layout is adopted once");
        let mut off = 0i64;
        for (_, p) in params {
            if !p.is_contiguous() {
                assert!(is_dense(p), "a parameter in a layout with gaps");
                let r = Relaid { off, size: p.size(), dims: memory_dims(p) };
                debug_assert_eq!(
                    r.view(&Tensor::zeros([off + p.numel() as i64], (Kind::Float, Device::Cpu))).stride(),
                    p.stride()
                );
                self.relaid.push(r);
            }
            off += p.numel() as i64;
        }
        tch::no_grad(|| {
            for state in [&self.m, &self.v] {
                for r in &self.relaid {
                    let logical = state.narrow(0, r.off, r.size.iter().product()).view(r.size.as_slice()).copy();
                    r.view(state).copy_(&logical);
                }
            }
        });
    }

    /// `state` (`m` or `v`) in the parameters' logical order: what a checkpoint holds.
    fn logical(&self, state: &Tensor) -> Tensor {
        if self.relaid.is_empty() {
            return state.shallow_clone();
        }
        let out = state.copy();
        tch::no_grad(|| {
            for r in &self.relaid {
                let n = r.size.iter().product();
                out.narrow(0, r.off, n).copy_(&r.view(state).contiguous().reshape([-1]));
            }
        });
        out
    }

    /// Makes `params` views into one flat tensor on their device, with their current values (in
    /// the optimizer's order, that of the flat gradient), so that each step updates them in a
    /// few whole-buffer operations. For the GPU, where the CPU's fused kernel cannot run. Every
    /// parameter must be a contiguous f32 tensor on the same device.
    pub fn bind_flat(&mut self, params: &[(String, Tensor)]) {
        let Some((_, first)) = params.first() else { return };
        let device = first.device();
        let numel: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let decays: Vec<f64> = params.iter().map(|(_, p)| self.hyper.decay_of(p)).collect();
        let uniform = decays.iter().all(|&d| d == decays[0]);
        let decay = if uniform {
            Decay::Scalar(decays[0])
        } else {
            let v = Tensor::zeros([numel], (Kind::Float, device));
            let mut off = 0i64;
            for ((_, p), d) in params.iter().zip(&decays) {
                let _ = v.narrow(0, off, p.numel() as i64).fill_(*d);
                off += p.numel() as i64;
            }
            Decay::PerElement(v)
        };
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        assert!(
            tensors.iter().all(|p| p.device() == device && p.kind() == Kind::Float && is_dense(p)),
            "flat parameters must be dense f32 tensors on one device"
        );
        // The parameters' current values, one after the other, each in its memory order; then they
        // become views into them with their own strides.
        let data = tch::no_grad(|| Tensor::cat(&tensors.iter().map(memory_order).collect::<Vec<_>>(), 0));
        tch::no_grad(|| views_into(&data, &tensors));
        self.flat = Some(Flat { data, decay });
    }

    /// Applies one step with the flat gradient `g × scale` to `params`.
    pub fn apply(&mut self, g: &Tensor, scale: f32, params: &[(String, Tensor)]) {
        self.step += 1;
        if is_cpu_f32(g) && is_cpu_f32(&self.m) && params.iter().all(|(_, p)| is_cpu_f32(p)) {
            self.apply_fused(g, scale, params);
        } else if self.flat.is_some() {
            self.apply_flat(&(g.to_device(self.m.device()) * f64::from(scale)));
        } else {
            self.apply_tensor_ops(&(g * f64::from(scale)), params);
        }
    }

    /// One pass over gradient, state and parameters per element, in place: no temporary buffers,
    /// where the tensor-op formulation makes six or more passes, each allocating 4 bytes per parameter.
    /// With more than one torch thread (and enough parameters: a 64,500-class head has 33 M), the
    /// flat range is cut into one contiguous part per thread.
    fn apply_fused(&mut self, g: &Tensor, scale: f32, params: &[(String, Tensor)]) {
        let numel = g.numel();
        let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
        let parts = if numel >= PARALLEL_MIN { threads.min(numel.div_ceil(PARALLEL_MIN)) } else { 1 };
        // Addresses, not tensors, cross into the threads (tch's Tensor is Send, not Sync).
        let addr = |t: &Tensor| t.data_ptr() as usize;
        let mut segments = Vec::with_capacity(params.len());
        let mut off = 0;
        for (_, p) in params {
            segments.push(Segment { off, len: p.numel(), addr: addr(p), decay: self.hyper.decay_of(p) as f32 });
            off += p.numel();
        }
        let k = Kernel {
            kind: self.kind,
            g: addr(g),
            m: addr(&self.m),
            v: addr(&self.v),
            scale,
            lr: self.lr as f32,
            momentum: self.hyper.momentum as f32,
            nesterov: self.hyper.nesterov,
            step_size: (self.lr / (1.0 - BETA1.powi(self.step as i32))) as f32,
            inv_sqrt_bc2: (1.0 / (1.0 - BETA2.powi(self.step as i32)).sqrt()) as f32,
        };
        let per = numel.div_ceil(parts);
        if parts <= 1 {
            k.run(&segments, 0..numel);
        } else {
            std::thread::scope(|s| {
                for t in 0..parts {
                    let (k, segments) = (&k, &segments);
                    s.spawn(move || k.run(segments, t * per..((t + 1) * per).min(numel)));
                }
            });
        }
    }

    /// The same with tensor operations on all parameters at once (bound by `bind_flat`).
    fn apply_flat(&mut self, g: &Tensor) {
        let flat = self.flat.as_ref().expect("bind_flat before apply_flat");
        tch::no_grad(|| self.update(&flat.data, g, &self.m, &self.v, &flat.decay));
    }

    /// The same with tensor operations, parameter by parameter (parameters not bound flat).
    fn apply_tensor_ops(&mut self, g: &Tensor, params: &[(String, Tensor)]) {
        tch::no_grad(|| {
            let g = g.to_device(self.m.device());
            let mut off = 0i64;
            for (_, p) in params {
                let n = p.numel() as i64;
                let shape = p.size();
                let view = |t: &Tensor| t.narrow(0, off, n).view(shape.as_slice());
                let decay = Decay::Scalar(self.hyper.decay_of(p));
                self.update(p, &view(&g), &view(&self.m), &view(&self.v), &decay);
                off += n;
            }
        });
    }

    /// One step of the optimizer on parameters `p` (in place) with the averaged gradient `g` and
    /// the state `m`, `v` (in place), all of one shape, as tensor operations (call in no_grad).
    fn update(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, decay: &Decay) {
        let bc1 = 1.0 - BETA1.powi(self.step as i32);
        let bc2 = 1.0 - BETA2.powi(self.step as i32);
        let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
        // decay × p, or None where the decay is 0.
        let decayed = |p: &Tensor| match decay {
            Decay::Scalar(d) if *d == 0.0 => None,
            Decay::Scalar(d) => Some(p * *d),
            Decay::PerElement(d) => Some(p * d),
        };
        let g = match (self.kind, decayed(&p)) {
            (OptimizerKind::AdamW, _) | (_, None) => g.shallow_clone(),
            (_, Some(l2)) => g + l2,
        };
        match self.kind {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                if self.kind == OptimizerKind::AdamW {
                    // p ← p × (1 − lr × decay), before the step (as torch.optim.AdamW).
                    match decay {
                        Decay::Scalar(d) if *d == 0.0 => {}
                        Decay::Scalar(d) => {
                            let _ = p.g_mul_scalar_(1.0 - self.lr * d);
                        }
                        Decay::PerElement(d) => {
                            let _ = p.g_mul_(&(d * (-self.lr) + 1.0));
                        }
                    }
                }
                let _ = m.lerp_(&g, 1.0 - BETA1);
                let _ = v.lerp_(&(&g * &g), 1.0 - BETA2);
                let denom = v.sqrt() / bc2.sqrt() + EPS;
                let _ = p.g_add_(&((&m / denom) * (-self.lr / bc1)));
            }
            OptimizerKind::Sgd => {
                let h = self.hyper;
                let d = if h.momentum == 0.0 {
                    g
                } else {
                    let _ = m.g_mul_scalar_(h.momentum).g_add_(&g);
                    if h.nesterov {
                        &g + &m * h.momentum
                    } else {
                        m.shallow_clone()
                    }
                };
                let _ = p.g_add_(&(d * (-self.lr)));
            }
        }
    }

    /// The state as a checkpoint holds it: each parameter's elements in logical order, whatever
    /// the layout adopted. Before [`Optimizer::adopt_layout`] these are `m` and `v` themselves
    /// (shallow), so a checkpoint loads into them.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        match self.kind {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                vec![("exp_avg".into(), self.logical(&self.m)), ("exp_avg_sq".into(), self.logical(&self.v))]
            }
            OptimizerKind::Sgd => vec![("momentum_buffer".into(), self.logical(&self.m))],
        }
    }
}

/// The parameters bound into one flat tensor ([`Optimizer::bind_flat`]).
struct Flat {
    data: Tensor,
    decay: Decay,
}

/// The weight decay of every element: one value for all, or one per element.
enum Decay {
    Scalar(f64),
    PerElement(Tensor),
}

/// One parameter in the flat buffers: offset, length, address of its data, weight decay.
struct Segment {
    off: usize,
    len: usize,
    addr: usize,
    decay: f32,
}

/// The fused update of one step: the addresses of the flat gradient and state, and the scalars.
struct Kernel {
    kind: OptimizerKind,
    g: usize,
    m: usize,
    v: usize,
    scale: f32,
    lr: f32,
    momentum: f32,
    nesterov: bool,
    step_size: f32,
    inv_sqrt_bc2: f32,
}

impl Kernel {
    /// Updates the flat elements `range` of the parameters `segments`.
    fn run(&self, segments: &[Segment], range: std::ops::Range<usize>) {
        let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPS as f32);
        for seg in segments {
            let (lo, hi) = (range.start.max(seg.off), range.end.min(seg.off + seg.len));
            if lo >= hi {
                continue;
            }
            let len = hi - lo;
            // SAFETY: every address is that of a contiguous CPU f32 tensor (checked by `apply`)
            // long enough for these offsets; the ranges of the threads are disjoint, and nothing
            // else reads or writes the tensors during the step.
            let at = |base: usize, first: usize| unsafe {
                std::slice::from_raw_parts_mut((base as *mut f32).add(first), len)
            };
            let (g, m, v, p) = (at(self.g, lo), at(self.m, lo), at(self.v, lo), at(seg.addr, lo - seg.off));
            let wd = seg.decay;
            match self.kind {
                OptimizerKind::Adam | OptimizerKind::AdamW => {
                    // Adam adds the decay to the gradient; AdamW shrinks the weight first.
                    let (l2, shrink) =
                        if self.kind == OptimizerKind::Adam { (wd, 1.0) } else { (0.0, 1.0 - self.lr * wd) };
                    for i in 0..len {
                        let gi = g[i] * self.scale + l2 * p[i];
                        let mi = b1 * m[i] + (1.0 - b1) * gi;
                        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                        m[i] = mi;
                        v[i] = vi;
                        p[i] = p[i] * shrink - self.step_size * mi / (vi.sqrt() * self.inv_sqrt_bc2 + eps);
                    }
                }
                OptimizerKind::Sgd => {
                    // torch.optim.SGD: buf = d at the first step, then momentum * buf + d; with buf
                    // starting at zero the one formula covers both. Nesterov steps along
                    // d + momentum * buf.
                    let mu = self.momentum;
                    for i in 0..len {
                        let d = g[i] * self.scale + wd * p[i];
                        let step = if mu == 0.0 {
                            d
                        } else {
                            let mi = mu * m[i] + d;
                            m[i] = mi;
                            if self.nesterov {
                                d + mu * mi
                            } else {
                                mi
                            }
                        };
                        p[i] -= self.lr * step;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our Adam on a flat buffer against torch.optim.Adam. Numbers from PyTorch 2.13:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], requires_grad=True); opt = torch.optim.Adam([p], lr=0.1)
    /// for g in ([0.5, -1.0], [0.25, 2.0]):
    ///     p.grad = torch.tensor(g); opt.step()
    /// print(p)  # tensor([ 0.8068, -1.9366])
    /// # and with torch.optim.SGD([p], lr=0.1, momentum=0.9): tensor([ 0.8800, -2.0100])
    /// ```
    #[test]
    fn adam_and_sgd_match_torch_optim() {
        for (kind, want) in [(OptimizerKind::Adam, [0.8068f32, -1.9366]), (OptimizerKind::Sgd, [0.88, -2.01])] {
            let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let mut opt = Optimizer::new(kind, 0.1, Hyper::default(), 2, Device::Cpu);
            for g in [[0.5f32, -1.0], [0.25, 2.0]] {
                opt.apply(&Tensor::from_slice(&g), 1.0, &params);
            }
            let v = Vec::<f32>::try_from(&p.detach()).unwrap();
            assert!((v[0] - want[0]).abs() < 1e-4 && (v[1] - want[1]).abs() < 1e-4, "{kind:?}: {v:?}");
        }
    }

    /// Momentum, Nesterov, weight decay per parameter (a weight with 0.1, a bias with 0, as
    /// `norm_weight_decay = 0` gives) and AdamW, each on the fused kernel, on the tensor-op path
    /// parameter by parameter and on the flat-bound parameters (the GPU's path), against
    /// torch.optim. Numbers from PyTorch 2.13:
    /// ```python
    /// w = torch.tensor([[1.0], [-2.0]], requires_grad=True); b = torch.tensor([0.5], requires_grad=True)
    /// opt = torch.optim.SGD([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
    ///                       lr=0.1, momentum=0.9, nesterov=True)   # or momentum=0.0, or Adam / AdamW(lr=0.1)
    /// for gw, gb in (([[0.5], [-1.0]], [0.3]), ([[0.25], [2.0]], [-0.7])):
    ///     w.grad = torch.tensor(gw); b.grad = torch.tensor(gb); opt.step()
    /// print(w.flatten(), b)
    /// ```
    #[test]
    fn momentum_nesterov_weight_decay_and_adamw_match_torch_optim() {
        let sgd = |momentum, nesterov| Hyper { momentum, nesterov, weight_decay: 0.1, norm_weight_decay: 0.0 };
        let cases = [
            (OptimizerKind::Sgd, sgd(0.9, true), [0.773_066f32, -2.021_132, 0.5517]),
            (OptimizerKind::Sgd, sgd(0.0, false), [0.9056, -2.0612, 0.54]),
            (OptimizerKind::Sgd, sgd(0.9, false), [0.8516, -1.9532, 0.513]),
            (OptimizerKind::Adam, sgd(0.9, false), [0.805_009_8, -1.925_017_8, 0.442_018_5]),
            (OptimizerKind::AdamW, sgd(0.9, false), [0.787_882_1, -1.897_810_3, 0.442_018_5]),
        ];
        for (kind, hyper, want) in cases {
            for mode in ["fused", "per tensor", "flat"] {
                let w = Tensor::from_slice(&[1.0f32, -2.0]).view([2, 1]);
                let b = Tensor::from_slice(&[0.5f32]);
                let params = vec![("w".to_string(), w.shallow_clone()), ("b".to_string(), b.shallow_clone())];
                let mut opt = Optimizer::new(kind, 0.1, hyper, 3, Device::Cpu);
                if mode == "flat" {
                    opt.bind_flat(&params);
                }
                for g in [[0.5f32, -1.0, 0.3], [0.25, 2.0, -0.7]] {
                    let g = Tensor::from_slice(&g);
                    match mode {
                        "fused" => opt.apply(&g, 1.0, &params),
                        "per tensor" => {
                            opt.step += 1;
                            opt.apply_tensor_ops(&g, &params);
                        }
                        _ => {
                            opt.step += 1;
                            opt.apply_flat(&g);
                        }
                    }
                }
                let got: Vec<f32> = [w.view([-1]), b].iter().flat_map(|t| Vec::<f32>::try_from(t).unwrap()).collect();
                let close = got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 2e-5);
                assert!(close, "{kind:?} {hyper:?} {mode}: {got:?}, torch {want:?}");
            }
        }
    }

    /// The step cut into parts for several threads equals the one-thread step, bit for bit.
    #[test]
    fn threaded_fused_step_equals_the_single_thread_step() {
        let n = 3 * PARALLEL_MIN + 12_345;
        tch::manual_seed(3);
        let sizes = [7i64, (n - 7 - 1000) as i64, 1000];
        let start: Vec<Tensor> = sizes.iter().map(|&k| Tensor::randn([k], (Kind::Float, Device::Cpu))).collect();
        let make = || start.iter().map(|t| ("p".to_string(), t.copy())).collect::<Vec<_>>();
        let g = Tensor::randn([n as i64], (Kind::Float, Device::Cpu));
        let before = tch::get_num_threads();
        let mut results = Vec::new();
        for threads in [1, 3] {
            tch::set_num_threads(threads);
            let params = make();
            for kind in [OptimizerKind::Adam, OptimizerKind::AdamW, OptimizerKind::Sgd] {
                let hyper = Hyper { weight_decay: 1e-2, norm_weight_decay: 1e-2, ..Hyper::default() };
                let mut opt = Optimizer::new(kind, 0.01, hyper, n, Device::Cpu);
                opt.apply(&g, 0.5, &params);
                opt.apply(&g, 0.25, &params);
            }
            results.push(Tensor::cat(&params.iter().map(|(_, p)| p.shallow_clone()).collect::<Vec<_>>(), 0));
        }
        tch::set_num_threads(before);
        assert!(results[0].equal(&results[1]));
    }

    /// A convolution weight laid out channels-last steps as its contiguous twin does, from a
    /// state loaded in logical order (a checkpoint's), and its state is written back in that order.
    #[test]
    fn channels_last_parameters_step_like_contiguous_ones_and_save_logical_state() {
        tch::manual_seed(5);
        let cpu = (Kind::Float, Device::Cpu);
        let (w0, b0) = (Tensor::randn([4, 3, 2, 2], cpu), Tensor::randn([4], cpu));
        let grads: Vec<(Tensor, Tensor)> =
            (0..2).map(|_| (Tensor::randn([4, 3, 2, 2], cpu), Tensor::randn([4], cpu))).collect();
        let nhwc = |t: &Tensor| crate::precision::to_channels_last(t).unwrap();
        let flat = |w: &Tensor, b: &Tensor| Tensor::cat(&[memory_order(w), b.shallow_clone()], 0);
        let hyper = Hyper { weight_decay: 1e-2, ..Hyper::default() };
        let n = 52;

        // Contiguous: two steps.
        let plain = vec![("w".to_string(), w0.copy()), ("b".to_string(), b0.copy())];
        let mut a = Optimizer::new(OptimizerKind::Adam, 0.1, hyper, n, Device::Cpu);
        a.apply(&flat(&grads[0].0, &grads[0].1), 1.0, &plain);
        let saved: Vec<Tensor> = a.tensors().iter().map(|(_, t)| t.copy()).collect();
        let after_one: Vec<Tensor> = plain.iter().map(|(_, t)| t.copy()).collect();
        a.apply(&flat(&grads[1].0, &grads[1].1), 1.0, &plain);

        // Channels-last: the weights and state after step one (the state as a checkpoint holds
        // it: logical order) loaded, the layout adopted, then step two.
        let cl = vec![("w".to_string(), nhwc(&after_one[0])), ("b".to_string(), after_one[1].copy())];
        assert!(!cl[0].1.is_contiguous() && is_dense(&cl[0].1));
        let mut b = Optimizer::new(OptimizerKind::Adam, 0.1, hyper, n, Device::Cpu);
        for ((_, dst), src) in b.tensors().iter().zip(&saved) {
            dst.shallow_clone().copy_(src);
        }
        b.step = 1;
        b.adopt_layout(&cl);
        b.apply(&flat(&nhwc(&grads[1].0), &grads[1].1), 1.0, &cl);

        assert!(crate::precision::is_channels_last(&cl[0].1), "the weight keeps its layout");
        assert!(cl[0].1.equal(&plain[0].1) && cl[1].1.equal(&plain[1].1), "the same values after the step");
        for ((name, logical), (_, want)) in b.tensors().iter().zip(a.tensors().iter()) {
            assert!(logical.equal(want), "{name}: the state in logical order, as the contiguous run's");
        }

        // Bound into one flat buffer (the GPU's way), a channels-last weight keeps values and layout.
        let w = nhwc(&w0);
        let bound = vec![("w".to_string(), w.shallow_clone()), ("b".to_string(), b0.copy())];
        let mut f = Optimizer::new(OptimizerKind::Sgd, 0.1, Hyper::default(), n, Device::Cpu);
        f.bind_flat(&bound);
        assert!(bound[0].1.equal(&w0) && crate::precision::is_channels_last(&bound[0].1));
    }
}
