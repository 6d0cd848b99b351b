//! Checkpoints: `.safetensors` files named as torchvision's `state_dict()` (so PyTorch loads them
//! with strict checking), atomic writes, the shape checks that refuse another architecture or
//! class count with a clear message, and the on-disk layout of a training run (`Store`).
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

/// Checkpoint files are written atomically, as every output (`crate::infra::files`).
pub use crate::infra::files::write_atomic;

/// fsync of a directory, so the renames inside it survive a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

/// What a checkpoint records of the run that wrote it, each part where it records it: the
/// architecture's name, the class count and the class map (the category id of every label).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recorded {
    pub arch: Option<String>,
    pub classes: Option<usize>,
    pub class_map: Option<Vec<i64>>,
}

/// How a checkpoint differs from what a run needs; the first difference found, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    Arch {
        found: String,
        wanted: String,
    },
    Classes {
        found: usize,
        wanted: usize,
    },
    /// Label `label` is category `found` in the checkpoint and `wanted` in the run (None: no such label).
    ClassMap {
        label: usize,
        found: Option<i64>,
        wanted: Option<i64>,
    },
}

/// The one compatibility check of a checkpoint (`found`) against a run (`wanted`), for `train
/// --resume` and for `evaluate` alike; each says the difference in its own words. A part either
/// side does not record is not compared.
pub fn difference(found: &Recorded, wanted: &Recorded) -> Option<Difference> {
    if let (Some(f), Some(w)) = (&found.arch, &wanted.arch) {
        if f != w {
            return Some(Difference::Arch { found: f.clone(), wanted: w.clone() });
        }
    }
    if let (Some(f), Some(w)) = (found.classes, wanted.classes) {
        if f != w {
            return Some(Difference::Classes { found: f, wanted: w });
        }
    }
    let (Some(f), Some(w)) = (&found.class_map, &wanted.class_map) else { return None };
    (0..f.len().max(w.len())).find(|&i| f.get(i) != w.get(i)).map(|label| Difference::ClassMap {
        label,
        found: f.get(label).copied(),
        wanted: w.get(label).copied(),
    })
}

/// Safetensors metadata key of a model checkpoint: the source's category ids in label order (JSON),
/// which `evaluate` compares with `classes.csv`.
pub const CATEGORY_IDS: &str = "category_ids";

/// Writes `bytes` to a new file at `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// The files of one epoch's checkpoint, in the order they are written.
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const EPOCH_FILES: [&str; 3] = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE];
/// The best epoch's model (by validation top-1), a hard link to that epoch's model file.
pub const BEST_FILE: &str = "best.safetensors";
/// The training curves beside the checkpoints.
pub const CURVES_FILE: &str = "training.png";

/// The moving average of the weights (`train.ema_decay`), in an epoch when training keeps one;
/// published beside the others.
pub const EMA_FILE: &str = "model_ema.safetensors";
/// Written last into an epoch directory: every other file's name, size and CRC-32.
pub const MANIFEST: &str = "manifest.json";
/// The symlink that names the newest complete epoch; replaced by one rename (the publish step).
pub const LATEST: &str = "latest";

/// One entry of `manifest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// A training run's checkpoints in `<checkpoint_dir>/<model>/`:
/// ```text
/// epoch-0007/ {model.safetensors, optimizer.safetensors, state.json, manifest.json}
/// epoch-0008/ …                     the newest two complete epochs are kept
/// latest -> epoch-0008              one rename publishes an epoch: it is complete or not there
/// model.safetensors -> latest/model.safetensors   (also optimizer.safetensors, state.json)
/// best.safetensors                  a hard link to the model file of the best epoch
/// training.png
/// ```
/// An epoch is written into `.epoch-0008.tmp-<pid>/` (each file fsynced, the manifest last),
/// renamed to `epoch-0008/`, and only then published through `latest`. A kill at any moment leaves
/// the previous epoch published and whole; `--resume` verifies the manifest and falls back to the
/// epoch before when the newest is damaged.
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store { dir: dir.to_path_buf() }
    }

    pub fn epoch_dir(&self, epoch: u32) -> PathBuf {
        self.dir.join(format!("epoch-{epoch:04}"))
    }

    /// Epoch directories present (complete or not), newest first.
    pub fn epochs(&self) -> Vec<(u32, PathBuf)> {
        let mut out: Vec<(u32, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix("epoch-")?.parse().ok()?;
                e.file_type().ok()?.is_dir().then(|| (n, e.path()))
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out
    }

    /// Does the directory hold any checkpoint (of this layout or of the older flat one)?
    pub fn holds_checkpoint(&self) -> bool {
        !self.epochs().is_empty() || self.dir.join(STATE_FILE).exists() || self.dir.join(MODEL_FILE).exists()
    }

    /// Writes one epoch's files into a fresh directory, fsynced, with the manifest last, and renames
    /// it to `epoch-NNNN` (replacing one of that number, left by a run that fell back before it).
    /// Nothing is published yet. On an error, the partial directory is removed.
    pub fn write_epoch(&self, epoch: u32, files: &[(&str, &[u8])]) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let tmp = self.dir.join(format!(".epoch-{epoch:04}.tmp-{}", std::process::id()));
        let result = (|| -> Result<PathBuf> {
            if tmp.exists() {
                fs::remove_dir_all(&tmp)?;
            }
            fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut manifest = Vec::new();
            for (name, bytes) in files {
                write_synced(&tmp.join(name), bytes)?;
                manifest.push(ManifestEntry { name: name.to_string(), bytes: bytes.len() as u64, crc32: crc32(bytes) });
                crate::infra::fault::point("save-between-files");
            }
            write_synced(&tmp.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
            sync_dir(&tmp)?;
            let dest = self.epoch_dir(epoch);
            if dest.exists() {
                fs::remove_dir_all(&dest).with_context(|| format!("removing the old {}", dest.display()))?;
            }
            fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
            sync_dir(&self.dir)?;
            Ok(dest)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.with_context(|| format!("saving the checkpoint of epoch {epoch} in {}", self.dir.display()))
    }

    /// Makes `epoch` the one that `model.safetensors`, `state.json` and `optimizer.safetensors`
    /// name: one atomic rename of the `latest` symlink (the fixed links through it are made once).
    pub fn publish(&self, epoch: u32) -> Result<()> {
        self.replace_symlink(LATEST, Path::new(&format!("epoch-{epoch:04}")))
            .with_context(|| format!("publishing epoch {epoch}"))?;
        for name in EPOCH_FILES {
            let target = PathBuf::from(LATEST).join(name);
            if fs::read_link(self.dir.join(name)).ok().as_ref() != Some(&target) {
                // Also replaces a regular file of the older flat layout, atomically.
                self.replace_symlink(name, &target)?;
            }
        }
        // The EMA link exists exactly when the published epoch has the file (no dangling link
        // after a run without EMA).
        let ema_link = self.dir.join(EMA_FILE);
        if self.epoch_dir(epoch).join(EMA_FILE).is_file() {
            let target = PathBuf::from(LATEST).join(EMA_FILE);
            if fs::read_link(&ema_link).ok().as_ref() != Some(&target) {
                self.replace_symlink(EMA_FILE, &target)?;
            }
        } else if fs::symlink_metadata(&ema_link).is_ok() {
            fs::remove_file(&ema_link).with_context(|| format!("removing {}", ema_link.display()))?;
        }
        sync_dir(&self.dir)
    }

    /// `<dir>/<name>` becomes a symlink to `target`: made beside it, then renamed over it.
    fn replace_symlink(&self, name: &str, target: &Path) -> Result<()> {
        let link = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fs::rename(&tmp, &link).with_context(|| format!("replacing {}", link.display()))
    }

    /// `best.safetensors` becomes (a hard link to) `epoch`'s model file, by a rename.
    pub fn set_best(&self, epoch: u32) -> Result<()> {
        let src = self.epoch_dir(epoch).join(MODEL_FILE);
        let tmp = self.dir.join(format!(".best.safetensors.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        fs::hard_link(&src, &tmp)
            .or_else(|_| fs::copy(&src, &tmp).map(|_| ()))
            .with_context(|| format!("linking {} as the best model", src.display()))?;
        fs::rename(&tmp, self.dir.join(BEST_FILE)).context("replacing best.safetensors")?;
        Ok(())
    }

    /// Removes what is neither among the newest `keep` epochs up to `published` nor in progress:
    /// older epochs, epochs above `published` (left by a run that fell back or was overwritten),
    /// and temporary directories of killed saves. With `only_published`, every other epoch goes
    /// (the first save of an `--overwrite` run), and so does a best model of the old run.
    pub fn prune(&self, published: u32, keep: usize, only_published: bool) -> Result<()> {
        let mut kept = 0;
        for (n, path) in self.epochs() {
            let stays = n <= published && kept < keep && (!only_published || n == published);
            if stays {
                kept += 1;
            } else {
                fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".epoch-") && name.contains(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Checks an epoch directory against its manifest: every file there, of its size and CRC-32.
    pub fn verify(epoch_dir: &Path) -> Result<()> {
        let mpath = epoch_dir.join(MANIFEST);
        let text =
            fs::read(&mpath).with_context(|| format!("{} is missing: the save did not finish", mpath.display()))?;
        let manifest: Vec<ManifestEntry> =
            serde_json::from_slice(&text).with_context(|| format!("{} is damaged", mpath.display()))?;
        for name in EPOCH_FILES {
            if !manifest.iter().any(|e| e.name == name) {
                bail!("{} does not list {name}", mpath.display());
            }
        }
        for entry in &manifest {
            let name = &entry.name;
            let path = epoch_dir.join(name);
            let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.len() as u64 != entry.bytes {
                bail!("{} has {} bytes, its manifest says {} (truncated?)", path.display(), bytes.len(), entry.bytes);
            }
            if crc32(&bytes) != entry.crc32 {
                bail!("{} does not match its checksum in {MANIFEST} (corrupt)", path.display());
            }
        }
        Ok(())
    }
}

/// CRC-32 (IEEE) of `bytes`: what `manifest.json` records (`zlib.crc32` in Python gives the same).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

/// The first tensor that holds a NaN or an infinity, by name.
pub fn first_non_finite<'a>(tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>) -> Option<String> {
    tensors.into_iter().find_map(|(name, t)| {
        let floating = matches!(t.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        (floating && !bool::try_from(t.isfinite().all()).unwrap_or(false)).then(|| name.clone())
    })
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
    fn the_compatibility_check_names_the_first_difference_and_skips_what_is_not_recorded() {
        let run = Recorded { arch: Some("resnet18".into()), classes: Some(3), class_map: Some(vec![5, 6, 7]) };
        let mut ck = run.clone();
        assert_eq!(difference(&ck, &run), None);
        ck.class_map = Some(vec![5, 9, 7]);
        assert_eq!(difference(&ck, &run), Some(Difference::ClassMap { label: 1, found: Some(9), wanted: Some(6) }));
        ck.classes = Some(4);
        assert_eq!(difference(&ck, &run), Some(Difference::Classes { found: 4, wanted: 3 }));
        ck.arch = Some("vgg".into());
        assert!(matches!(difference(&ck, &run), Some(Difference::Arch { .. })));
        let unknown = Recorded::default();
        assert_eq!(difference(&unknown, &run), None, "a checkpoint that records nothing is not refused here");
        let shorter = Recorded { class_map: Some(vec![5, 6]), ..Recorded::default() };
        assert_eq!(difference(&shorter, &run), Some(Difference::ClassMap { label: 2, found: None, wanted: Some(7) }));
    }

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

    /// `zlib.crc32(b"123456789")` is 0xCBF43926, the CRC-32 check value.
    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn save(store: &Store, epoch: u32) {
        let body = format!("epoch {epoch}");
        let files: Vec<(&str, &[u8])> = EPOCH_FILES.iter().map(|n| (*n, body.as_bytes())).collect();
        store.write_epoch(epoch, &files).unwrap();
        store.publish(epoch).unwrap();
    }

    #[test]
    fn epochs_are_published_by_one_link_and_the_newest_two_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(&tmp.path().join("resnet18"));
        for epoch in 1..=3 {
            save(&store, epoch);
            store.prune(epoch, 2, false).unwrap();
        }
        store.set_best(2).unwrap();
        assert_eq!(
            names(&store.dir),
            [
                "best.safetensors",
                "epoch-0002",
                "epoch-0003",
                "latest",
                "model.safetensors",
                "optimizer.safetensors",
                "state.json"
            ]
        );
        assert_eq!(fs::read_to_string(store.dir.join("state.json")).unwrap(), "epoch 3", "the links name the newest");
        assert_eq!(fs::read_to_string(store.dir.join("best.safetensors")).unwrap(), "epoch 2");
        Store::verify(&store.epoch_dir(3)).unwrap();
        // An --overwrite run's first save leaves only itself.
        save(&store, 1);
        store.prune(1, 2, true).unwrap();
        assert_eq!(store.epochs().iter().map(|e| e.0).collect::<Vec<_>>(), [1]);
        assert_eq!(fs::read_to_string(store.dir.join("model.safetensors")).unwrap(), "epoch 1");
    }

    #[test]
    fn verify_names_a_truncated_a_corrupt_and_an_unfinished_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        save(&store, 1);
        let dir = store.epoch_dir(1);
        fs::write(dir.join("state.json"), "epoch").unwrap();
        assert!(format!("{:#}", Store::verify(&dir).unwrap_err()).contains("truncated"));
        fs::write(dir.join("state.json"), "epoch 9").unwrap();
        assert!(format!("{:#}", Store::verify(&dir).unwrap_err()).contains("checksum"));
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(format!("{:#}", Store::verify(&dir).unwrap_err()).contains("did not finish"));
    }

    #[test]
    fn a_failed_save_leaves_no_directory_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        // A file name in a directory that does not exist: its create fails after the temporary
        // directory was made.
        let err = store.write_epoch(1, &[("x/model.safetensors", b"a")]).unwrap_err();
        assert!(format!("{err:#}").contains("saving the checkpoint of epoch 1"), "{err:#}");
        assert_eq!(names(tmp.path()), Vec::<String>::new(), "no temporary directory left");
    }

    #[test]
    fn non_finite_tensors_are_named() {
        let ok = Tensor::from_slice(&[1.0f32, 2.0]);
        let bad = Tensor::from_slice(&[1.0f32, f32::NAN]);
        let count = Tensor::from(3i64);
        let v = [("a".to_string(), ok), ("b".to_string(), bad), ("c".to_string(), count)];
        assert_eq!(first_non_finite(v.iter().map(|(n, t)| (n, t))), Some("b".to_string()));
        assert_eq!(first_non_finite(v[..1].iter().map(|(n, t)| (n, t))), None);
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
