//! sac's checkpoints are torchvision's state dicts: every architecture's `model.safetensors`
//! loads into the matching torchvision model with strict checking and gives the same logits.
//! Needs the project's virtualenv (scripts/setup.sh installs torchvision into .venv).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use sac::checkpoint::{to_safetensors, with_batch_counters, write_atomic};
use sac::config::Arch;
use tch::nn;
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    std::env::var_os("SAC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

#[test]
fn every_architecture_loads_into_torchvision_with_the_same_logits() {
    tch::set_num_threads(1);
    tch::manual_seed(7);
    let dir = tempfile::tempdir().unwrap();
    let classes = 6;
    for arch in Arch::ALL {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = sac::models::build(&vs.root(), arch, classes);
        let (w, h) = sac::models::min_input_size(arch);
        let (w, h) = (w.max(64) as i64, h.max(64) as i64);
        // A few training-mode passes move the batch-norm statistics away from their initial values.
        tch::no_grad(|| {
            for _ in 0..2 {
                let _ = net.forward_t(&Tensor::randn([4, 3, h, w], (Kind::Float, Device::Cpu)), true);
            }
        });
        let input = Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu));
        let logits = tch::no_grad(|| net.forward_t(&input, false));
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let model_file = dir.path().join(format!("{arch}.safetensors"));
        let case_file = dir.path().join(format!("{arch}-case.safetensors"));
        write_atomic(&model_file, &to_safetensors(&with_batch_counters(&vars, 2), &BTreeMap::new()).unwrap()).unwrap();
        let case = vec![("input".to_string(), input), ("logits".to_string(), logits)];
        write_atomic(&case_file, &to_safetensors(&case, &BTreeMap::new()).unwrap()).unwrap();
        let out = Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/torchvision_logits.py"))
            .args([arch.name(), &classes.to_string()])
            .arg(&model_file)
            .arg(&case_file)
            .output()
            .expect("running the venv's python (run scripts/setup.sh)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{arch}: {text}");
        eprint!("{text}");
    }
}
