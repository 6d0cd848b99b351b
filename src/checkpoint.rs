//! Checkpoints: `.safetensors` files named as torchvision's `state_dict()` (so PyTorch loads them
//! with strict checking), atomic writes, and the shape checks that refuse another architecture or
//! class count with a clear message.
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader sees the old complete file or the new complete file, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().expect("file").to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        k => bail!("cannot store a tensor of kind {k:?}"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        d => bail!("unsupported tensor dtype {d:?}"),
    })
}

/// Serializes named tensors (any device) with string metadata into safetensors bytes.
pub fn to_safetensors(tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).with_context(|| format!("reading tensor {name}"))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        raw.push((name.clone(), dtype_of(t.kind())?, shape, bytes));
    }
    let views = raw
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Reads a safetensors file: its tensors (on the CPU) by name, and its metadata.
pub fn read_safetensors(path: &Path) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor {name}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    let meta = header.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok((out, meta))
}

/// Copies `tensors` into the variables `vars` (name → variable), checking names and shapes.
/// `skip` names variables to leave as they are (a re-initialized head).
pub fn load_into(
    vars: &BTreeMap<String, Tensor>,
    tensors: &BTreeMap<String, Tensor>,
    skip: &dyn Fn(&str) -> bool,
    what: &str,
) -> Result<()> {
    let missing: Vec<&str> =
        vars.keys().filter(|k| !skip(k) && !tensors.contains_key(*k)).map(String::as_str).collect();
    if !missing.is_empty() {
        bail!(
            "{what} lacks {} of the model's tensors (first: {}): it was saved for another architecture",
            missing.len(),
            missing[0]
        );
    }
    let unexpected: Vec<&str> = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) && !k.ends_with("num_batches_tracked"))
        .map(String::as_str)
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "{what} holds {} tensors this architecture does not have (first: {}): it was saved for another architecture",
            unexpected.len(),
            unexpected[0]
        );
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            if skip(name) {
                continue;
            }
            let src = &tensors[name];
            ensure!(
                src.size() == var.size(),
                "{what}: tensor {name} has shape {:?}, the model needs {:?}",
                src.size(),
                var.size()
            );
            let mut var = var.shallow_clone();
            var.f_copy_(&src.to_kind(var.kind()).to_device(var.device()))?;
        }
        Ok(())
    })
}

/// torchvision's `state_dict()` has a `num_batches_tracked` counter beside each batch-norm
/// layer's running statistics; tch keeps none, so it is added here.
pub fn with_batch_counters(vars: &BTreeMap<String, Tensor>, steps: i64) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vars.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    for k in vars.keys() {
        if let Some(prefix) = k.strip_suffix(".running_mean") {
            out.push((format!("{prefix}.num_batches_tracked"), Tensor::from(steps)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let b = Tensor::from(7i64);
        let meta = BTreeMap::from([("epoch".to_string(), "2".to_string())]);
        write_atomic(&p, &to_safetensors(&[("a".into(), a.shallow_clone()), ("b".into(), b)], &meta).unwrap()).unwrap();
        let (t, m) = read_safetensors(&p).unwrap();
        assert_eq!(m["epoch"], "2");
        assert_eq!(t["a"].size(), [3, 1]);
        assert!(t["a"].equal(&a));
        assert_eq!(t["b"].int64_value(&[]), 7);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn loading_refuses_other_shapes_and_names() {
        let vars = BTreeMap::from([("fc.weight".to_string(), Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)))]);
        let wrong = BTreeMap::from([("fc.weight".to_string(), Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)))]);
        let e = load_into(&vars, &wrong, &|_| false, "ckpt").unwrap_err();
        assert!(format!("{e:#}").contains("shape [4, 2], the model needs [3, 2]"), "{e:#}");
        let other =
            BTreeMap::from([("classifier.weight".to_string(), Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)))]);
        let e = load_into(&vars, &other, &|_| false, "ckpt").unwrap_err();
        assert!(format!("{e:#}").contains("another architecture"), "{e:#}");
        load_into(&vars, &wrong, &|n| n.starts_with("fc."), "ckpt").expect("a skipped head may differ");
    }
}
