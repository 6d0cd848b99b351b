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
        assert_torchvision_agrees(dir.path(), arch, classes, &with_batch_counters(&vars, 2), input, logits);
    }
}

/// Writes `vars` (sac's checkpoint of `arch` with `classes` classes) and the case (`input`, the
/// `logits` sac computed) into `dir`; tests/python/torchvision_logits.py strict-loads them into
/// torchvision and must give the same logits.
fn assert_torchvision_agrees(
    dir: &std::path::Path,
    arch: Arch,
    classes: i64,
    vars: &[(String, Tensor)],
    input: Tensor,
    logits: Tensor,
) {
    let model_file = dir.join(format!("{arch}.safetensors"));
    let case_file = dir.join(format!("{arch}-case.safetensors"));
    write_atomic(&model_file, &to_safetensors(vars, &BTreeMap::new()).unwrap()).unwrap();
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

/// Weights trained channels-last (batches and weights, in bf16 autocast: what `channels_last =
/// "auto"` does for densenet121 on a CPU) are saved in torchvision's contiguous layout: they
/// strict-load into torchvision and give sac's f32 logits.
#[test]
fn weights_trained_on_channels_last_batches_in_bf16_load_into_torchvision() {
    tch::set_num_threads(1);
    tch::manual_seed(11);
    let dir = tempfile::tempdir().unwrap();
    let (arch, classes) = (Arch::Densenet, 4);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = sac::models::build(&vs.root(), arch, classes);
    let numerics = sac::precision::Numerics { bf16: true, channels_last: true, reason: String::new() };
    let trainable = vs.trainable_variables();
    sac::precision::weights_channels_last(&trainable).unwrap();
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    for _ in 0..3 {
        let x = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
        let loss = numerics.forward(&*net, &x, true).unwrap().cross_entropy_for_logits(&labels);
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
        loss.backward();
        tch::no_grad(|| {
            for mut v in vs.trainable_variables() {
                let next = &v - v.grad() * 0.05;
                v.copy_(&next);
            }
        });
    }
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    // In memory the convolution weights are channels-last (the file is written contiguous).
    let nhwc = vars.values().filter(|t| sac::precision::is_channels_last(t)).count();
    assert_eq!(nhwc, 59, "channels-last weights: densenet121 has 59 convolutions with kernels over 1x1");
    let input = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let logits = tch::no_grad(|| net.forward_t(&input, false));
    assert_torchvision_agrees(dir.path(), arch, classes, &with_batch_counters(&vars, 3), input, logits);
}

/// One tensor's figures, as tests/python/init_stats.py writes them (population std).
#[derive(Debug, Clone, serde::Deserialize)]
struct Stats {
    shape: Vec<i64>,
    numel: usize,
    mean: f64,
    std: f64,
    min: f64,
    max: f64,
}

fn stats(t: &Tensor) -> Stats {
    let d = t.detach().to_kind(Kind::Double);
    let v = |x: Tensor| x.double_value(&[]);
    Stats {
        shape: t.size(),
        numel: t.numel(),
        mean: v(d.mean(Kind::Double)),
        std: v(d.std(false)),
        min: v(d.min()),
        max: v(d.max()),
    }
}

/// Is `ours` drawn as torchvision's `theirs` (the same tensor of a model built by torchvision)?
/// Constants must be equal; random tensors must agree in mean and std within six standard errors
/// of the pair, and in shape of distribution: a normal sample of 500 or more reaches past 2.2
/// standard deviations, a uniform one never passes √3. Small tensors (biases of a few values)
/// only have to stay within torchvision's range and within a factor 3 of its spread.
fn same_distribution(ours: &Stats, theirs: &Stats) -> Result<(), String> {
    if ours.shape != theirs.shape {
        return Err(format!("shape {:?}, torchvision {:?}", ours.shape, theirs.shape));
    }
    let n = ours.numel as f64;
    if theirs.std == 0.0 {
        return if ours.min == theirs.min && ours.max == theirs.max {
            Ok(())
        } else {
            Err(format!("torchvision: constant {}; sac: {}..{}", theirs.min, ours.min, ours.max))
        };
    }
    let sigma = theirs.std;
    let reach = |s: &Stats| s.min.abs().max(s.max.abs()) / s.std;
    let what = format!(
        "sac mean {:.3e} std {:.4e} reach {:.2}σ; torchvision mean {:.3e} std {:.4e} reach {:.2}σ (n = {n})",
        ours.mean,
        ours.std,
        if ours.std > 0.0 { reach(ours) } else { 0.0 },
        theirs.mean,
        theirs.std,
        reach(theirs)
    );
    if ours.std == 0.0 {
        return Err(format!("constant where torchvision draws: {what}"));
    }
    if n >= 100.0 {
        let mean_ok = (ours.mean - theirs.mean).abs() <= 6.0 * sigma * (2.0 / n).sqrt();
        let std_ok = (ours.std - theirs.std).abs() <= 6.0 * sigma / n.sqrt();
        let shape_ok = n < 500.0 || (reach(ours) > 2.2) == (reach(theirs) > 2.2);
        if !(mean_ok && std_ok && shape_ok) {
            return Err(what);
        }
    } else {
        let bound = theirs.min.abs().max(theirs.max.abs()).max(3f64.sqrt() * sigma);
        let within = ours.min.abs().max(ours.max.abs()) <= 1.5 * bound;
        if !within || ours.std > 3.0 * sigma || ours.std < sigma / 3.0 {
            return Err(what);
        }
    }
    Ok(())
}

/// Every tensor of `arch` (10 classes) against torchvision's freshly built model: the mismatches.
fn init_mismatches(arch: Arch, init: bool, reference: &BTreeMap<String, Stats>) -> Vec<String> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = sac::models::build(&vs.root(), arch, 10);
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    if init {
        sac::models::init_as_torchvision(arch, &vars);
    }
    let mut out = Vec::new();
    for (name, theirs) in reference {
        match vars.get(name) {
            None => out.push(format!("{name}: missing in sac")),
            Some(t) => {
                if let Err(e) = same_distribution(&stats(t), theirs) {
                    out.push(format!("{name}: {e}"));
                }
            }
        }
    }
    out
}

fn torchvision_init_stats(arch: Arch, dir: &std::path::Path) -> BTreeMap<String, Stats> {
    let file = dir.join(format!("{arch}-init.json"));
    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/init_stats.py"))
        .args([arch.name(), "10"])
        .arg(&file)
        .output()
        .expect("running the venv's python (run scripts/setup.sh)");
    assert!(out.status.success(), "{arch}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap()
}

/// At initialisation every tensor of every architecture is drawn as torchvision's constructor
/// draws it: per tensor, mean and std within sampling error, the same shape of distribution, and
/// constants equal. tch's own initialisation fails this (batch-norm weights U(0, 1) instead of 1,
/// convolutions uniform where torchvision's resnets draw kaiming-normal fan-out).
#[test]
fn initial_weights_are_drawn_as_torchvision_draws_them() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for arch in Arch::ALL {
        let reference = torchvision_init_stats(arch, dir.path());
        let bad = init_mismatches(arch, true, &reference);
        eprintln!("{arch}: {} tensors, {} differ from torchvision's initialisation", reference.len(), bad.len());
        failures.extend(bad.into_iter().map(|b| format!("{arch} {b}")));
        if arch == Arch::Resnet18 {
            let untouched = init_mismatches(arch, false, &reference);
            assert!(
                untouched.iter().any(|m| m.starts_with("bn1.weight"))
                    && untouched.iter().any(|m| m.starts_with("conv1.weight")),
                "the comparison must tell tch's default initialisation apart: {untouched:#?}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
