//! The model being trained: its variables in a fixed (name) order, split into the trained
//! parameters and the batch-norm statistics, initialised as torchvision's constructor does.
use std::collections::BTreeMap;

use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

use crate::models::Arch;

/// The model's variables in a fixed (name) order, split into trained parameters and the rest.
pub struct Model {
    pub net: Box<dyn ModuleT>,
    pub vars: BTreeMap<String, Tensor>,
    pub params: Vec<(String, Tensor)>,
    /// Batch-norm running statistics: averaged over ranks, not trained.
    pub buffers: Vec<(String, Tensor)>,
    pub numel: usize,
    _vs: nn::VarStore,
}

impl Model {
    /// The model on `device`, its weights drawn on the CPU from torch's generator: the same seed
    /// gives the same initial weights on any device.
    pub fn new(arch: Arch, classes: i64, device: Device, feature_extract: bool) -> Model {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = crate::models::build(&vs.root(), arch, classes);
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        crate::models::init_as_torchvision(arch, &vars);
        if device != Device::Cpu {
            // In place: `net` and `vars` hold the same tensors.
            vs.set_device(device);
        }
        let head = crate::models::head_prefix(arch);
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (name, t) in &vars {
            if t.requires_grad() {
                if feature_extract && !name.starts_with(head) {
                    let _ = t.set_requires_grad(false);
                } else {
                    params.push((name.clone(), t.shallow_clone()));
                }
            } else {
                buffers.push((name.clone(), t.shallow_clone()));
            }
        }
        let numel = params.iter().map(|(_, t)| t.numel()).sum();
        Model { net, vars, params, buffers, numel, _vs: vs }
    }

    pub fn all(&self) -> Vec<Tensor> {
        self.vars.values().map(Tensor::shallow_clone).collect()
    }
}
