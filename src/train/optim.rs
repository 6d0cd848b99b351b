//! The optimizers: Adam (as `torch.optim.Adam`) and SGD with momentum (as `torch.optim.SGD`), on
//! the flat averaged gradient of the exchange buffer, with a fused one-pass kernel on the CPU.
use tch::{Device, Kind, Tensor};

use super::exchange::is_cpu_f32;
use crate::config::OptimizerKind;

/// Below this many parameters the fused step runs on one thread (a thread costs ~20 µs to start,
/// a million parameters take ~1 ms).
const PARALLEL_MIN: usize = 1 << 20;

/// Adam (as `torch.optim.Adam`, no weight decay) or SGD with momentum 0.9 (as `torch.optim.SGD`),
/// on the flat averaged gradient; its state is flat too, so it saves and broadcasts as one tensor.
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub step: i64,
    /// Adam: exp_avg; SGD: momentum_buffer.
    pub m: Tensor,
    /// Adam: exp_avg_sq.
    pub v: Tensor,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const MOMENTUM: f64 = 0.9;

impl Optimizer {
    pub fn new(kind: OptimizerKind, lr: f64, numel: usize, device: Device) -> Self {
        let z = || Tensor::zeros([numel as i64], (Kind::Float, device));
        Optimizer { kind, lr, step: 0, m: z(), v: z() }
    }

    /// Applies one step with the flat gradient `g × scale` to `params`.
    pub fn apply(&mut self, g: &Tensor, scale: f32, params: &[(String, Tensor)]) {
        self.step += 1;
        if is_cpu_f32(g) && is_cpu_f32(&self.m) && params.iter().all(|(_, p)| is_cpu_f32(p)) {
            self.apply_fused(g, scale, params);
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
            segments.push((off, p.numel(), addr(p)));
            off += p.numel();
        }
        let k = Kernel {
            kind: self.kind,
            g: addr(g),
            m: addr(&self.m),
            v: addr(&self.v),
            scale,
            lr: self.lr as f32,
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

    /// The same with tensor operations, for parameters on a GPU.
    fn apply_tensor_ops(&mut self, g: &Tensor, params: &[(String, Tensor)]) {
        tch::no_grad(|| {
            let g = g.to_device(self.m.device());
            let update = match self.kind {
                OptimizerKind::Adam => {
                    let _ = self.m.lerp_(&g, 1.0 - BETA1);
                    let _ = self.v.lerp_(&(&g * &g), 1.0 - BETA2);
                    let bc1 = 1.0 - BETA1.powi(self.step as i32);
                    let bc2 = 1.0 - BETA2.powi(self.step as i32);
                    let denom = self.v.sqrt() / bc2.sqrt() + EPS;
                    (&self.m / denom) * (-self.lr / bc1)
                }
                OptimizerKind::Sgd => {
                    let _ = self.m.g_mul_scalar_(MOMENTUM).g_add_(&g);
                    &self.m * (-self.lr)
                }
            };
            let mut off = 0i64;
            for (_, p) in params {
                let n = p.numel() as i64;
                let _ = p.shallow_clone().g_add_(&update.narrow(0, off, n).view(p.size().as_slice()));
                off += n;
            }
        });
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        match self.kind {
            OptimizerKind::Adam => {
                vec![("exp_avg".into(), self.m.shallow_clone()), ("exp_avg_sq".into(), self.v.shallow_clone())]
            }
            OptimizerKind::Sgd => vec![("momentum_buffer".into(), self.m.shallow_clone())],
        }
    }
}

/// The fused update of one step: the addresses of the flat gradient and state, and the scalars.
struct Kernel {
    kind: OptimizerKind,
    g: usize,
    m: usize,
    v: usize,
    scale: f32,
    lr: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
}

impl Kernel {
    /// Updates the flat elements `range`; `segments` are the parameters as (flat offset, length,
    /// address of their data).
    fn run(&self, segments: &[(usize, usize, usize)], range: std::ops::Range<usize>) {
        let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPS as f32);
        for &(off, n, p_addr) in segments {
            let (lo, hi) = (range.start.max(off), range.end.min(off + n));
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
            let (g, m, v, p) = (at(self.g, lo), at(self.m, lo), at(self.v, lo), at(p_addr, lo - off));
            match self.kind {
                OptimizerKind::Adam => {
                    for i in 0..len {
                        let gi = g[i] * self.scale;
                        let mi = b1 * m[i] + (1.0 - b1) * gi;
                        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                        m[i] = mi;
                        v[i] = vi;
                        p[i] -= self.step_size * mi / (vi.sqrt() * self.inv_sqrt_bc2 + eps);
                    }
                }
                OptimizerKind::Sgd => {
                    // torch.optim.SGD: buf = grad at the first step, then momentum * buf + grad;
                    // with buf starting at zero the one formula covers both.
                    for i in 0..len {
                        let mi = MOMENTUM as f32 * m[i] + g[i] * self.scale;
                        m[i] = mi;
                        p[i] -= self.lr * mi;
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
            let mut opt = Optimizer::new(kind, 0.1, 2, Device::Cpu);
            for g in [[0.5f32, -1.0], [0.25, 2.0]] {
                opt.apply(&Tensor::from_slice(&g), 1.0, &params);
            }
            let v = Vec::<f32>::try_from(&p.detach()).unwrap();
            assert!((v[0] - want[0]).abs() < 1e-4 && (v[1] - want[1]).abs() < 1e-4, "{kind:?}: {v:?}");
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
            for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
                let mut opt = Optimizer::new(kind, 0.01, n, Device::Cpu);
                opt.apply(&g, 0.5, &params);
                opt.apply(&g, 0.25, &params);
            }
            results.push(Tensor::cat(&params.iter().map(|(_, p)| p.shallow_clone()).collect::<Vec<_>>(), 0));
        }
        tch::set_num_threads(before);
        assert!(results[0].equal(&results[1]));
    }
}
