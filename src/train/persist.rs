//! The checkpoint of a run: writing an epoch's model, optimizer state and `state.json` (with
//! `training.png`), and reading them back for `--resume` or from `model.pretrained`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;
use tracing::{info, warn};

use super::ema::Ema;
use super::metrics;
use super::model::Model;
use super::optim::Optimizer;
use crate::checkpoint;
use crate::models::Arch;
use crate::record::State;

/// Checkpoint files in `dir`.
pub fn model_file(dir: &Path) -> PathBuf {
    dir.join(checkpoint::MODEL_FILE)
}

/// What a save does besides writing the epoch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SaveAs {
    /// The epoch is the best so far: `best.safetensors` becomes its model.
    pub best: bool,
    /// The first save of an `--overwrite` run: the old run's epochs are deleted.
    pub replace_old_run: bool,
}

pub(crate) fn save(
    store: &checkpoint::Store,
    model: &Model,
    opt: &Optimizer,
    state: &State,
    how: SaveAs,
    metrics_file: Option<&Path>,
    ema: Option<&Ema>,
) -> Result<()> {
    let SaveAs { best, replace_old_run } = how;
    crate::infra::fault::point("save");
    // Never save a NaN: name the first tensor that holds one.
    let opt_tensors = opt.tensors();
    if let Some(name) = checkpoint::first_non_finite(model.vars.iter().chain(opt_tensors.iter().map(|(n, t)| (n, t)))) {
        bail!(
            "epoch {}: {name} holds NaN or infinite values, so no checkpoint is written (the last one in {} stays). \
             A batch-norm statistic goes NaN when a batch has one value per channel (batch size 1, or one image \
             at an input so small that the last layers are 1x1): use a larger train.batch_size or image size",
            state.epoch,
            store.dir.display()
        );
    }
    let categories: Vec<i64> = state.classes.iter().map(|c| c.category_id).collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("arch".to_string(), state.arch.to_string()),
        ("num_classes".to_string(), state.num_classes.to_string()),
        ("epoch".to_string(), state.epoch.to_string()),
        (checkpoint::CATEGORY_IDS.to_string(), serde_json::to_string(&categories)?),
    ]);
    let model_bytes = checkpoint::to_safetensors(&checkpoint::with_batch_counters(&model.vars, state.steps), &meta)?;
    let mut opt_meta = meta.clone();
    opt_meta.insert("optimizer".into(), opt.kind.name().to_string());
    opt_meta.insert("step".into(), opt.step.to_string());
    let opt_bytes = checkpoint::to_safetensors(&opt_tensors, &opt_meta)?;
    let state_bytes = (serde_json::to_string_pretty(state)? + "\n").into_bytes();
    let mut files: Vec<(&str, &[u8])> = vec![
        (checkpoint::MODEL_FILE, &model_bytes[..]),
        (checkpoint::OPTIMIZER_FILE, &opt_bytes[..]),
        (checkpoint::STATE_FILE, &state_bytes[..]),
    ];
    let ema_bytes = ema
        .map(|e| {
            if let Some(name) = checkpoint::first_non_finite(e.vars.iter()) {
                bail!(
                    "epoch {}: the moving average's {name} holds NaN or infinite values; no checkpoint is written",
                    state.epoch
                );
            }
            let mut ema_meta = meta.clone();
            ema_meta.insert("ema_decay".into(), e.decay.to_string());
            checkpoint::to_safetensors(&checkpoint::with_batch_counters(&e.vars, state.steps), &ema_meta)
        })
        .transpose()?;
    if let Some(bytes) = &ema_bytes {
        files.push((checkpoint::EMA_FILE, &bytes[..]));
    }
    store.write_epoch(state.epoch, &files)?;
    store.publish(state.epoch)?;
    if replace_old_run {
        let _ = std::fs::remove_file(store.dir.join(checkpoint::BEST_FILE));
    }
    if best {
        store.set_best(state.epoch)?;
    }
    store.prune(state.epoch, 2, replace_old_run)?;
    let intervals = metrics_file.map(|f| metrics::loss_points(&metrics::read(f))).unwrap_or_default();
    if let Err(e) = crate::plot::training_curves(&store.dir.join(checkpoint::CURVES_FILE), &state.history, &intervals) {
        warn!("training.png not drawn: {e:#}");
    }
    info!("checkpoint of epoch {} written to {}", state.epoch, store.epoch_dir(state.epoch).display());
    Ok(())
}

/// The newest checkpoint that is whole and loads: epoch directories newest first (checked against
/// their manifests), else the older flat layout. Says which it took and why it passed others over.
/// Returns the state and the directory it came from (where its other files are).
pub(crate) fn load_for_resume(
    store: &checkpoint::Store,
    model: &Model,
    opt: &mut Optimizer,
    fresh: &State,
) -> Result<(State, PathBuf)> {
    let dir = &store.dir;
    let epochs = store.epochs();
    if epochs.is_empty() {
        if dir.join(checkpoint::STATE_FILE).is_file() {
            let state = load_checkpoint_files(dir, model, opt, fresh)?;
            info!(
                "resuming after epoch {} from {} (a checkpoint of the older flat layout)",
                state.epoch,
                dir.display()
            );
            return Ok((state, dir.clone()));
        }
        bail!("--resume: no checkpoint to resume in {} (train without --resume first)", dir.display());
    }
    let mut passed_over = Vec::new();
    for (n, path) in &epochs {
        let loaded = checkpoint::Store::verify(path).and_then(|()| load_checkpoint_files(path, model, opt, fresh));
        match loaded {
            Ok(state) => {
                for (m, why) in &passed_over {
                    warn!("--resume: epoch {m} is not usable ({why}); falling back to epoch {n}");
                }
                info!("resuming after epoch {} from {} (the newest complete checkpoint)", state.epoch, path.display());
                return Ok((state, path.clone()));
            }
            // A checkpoint of another model or data set is not damage: no fallback past it.
            Err(e) if e.is::<Mismatch>() => return Err(e),
            Err(e) => passed_over.push((*n, format!("{e:#}"))),
        }
    }
    let list: Vec<String> = passed_over.iter().map(|(n, why)| format!("epoch {n}: {why}")).collect();
    bail!("--resume: no complete checkpoint in {}: {}", dir.display(), list.join("; "))
}

/// The checkpoint is of another architecture, class count or optimizer than the config asks for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

/// Loads `state.json`, the model and the optimizer state from `dir` (one epoch's files).
fn load_checkpoint_files(dir: &Path, model: &Model, opt: &mut Optimizer, fresh: &State) -> Result<State> {
    let state_file = dir.join(checkpoint::STATE_FILE);
    let text = std::fs::read_to_string(&state_file).with_context(|| format!("cannot read {}", state_file.display()))?;
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("{} is not a sac training state", state_file.display()))?;
    let recorded = |s: &State| checkpoint::Recorded {
        arch: Some(s.arch.name().to_string()),
        classes: Some(s.num_classes),
        class_map: Some(s.classes.iter().map(|c| c.category_id).collect()),
    };
    let show = |v: Option<i64>| v.map_or("none".to_string(), |c| c.to_string());
    let mismatch = match checkpoint::difference(&recorded(&state), &recorded(fresh)) {
        None => None,
        Some(checkpoint::Difference::Arch { found, wanted }) => {
            Some(format!("--resume: {} holds a {found} checkpoint, the config asks for {wanted}", dir.display()))
        }
        Some(checkpoint::Difference::Classes { found, wanted }) => Some(format!(
            "--resume: the checkpoint in {} has {found} classes, the data dir has {wanted} (a different data set?)",
            dir.display()
        )),
        Some(checkpoint::Difference::ClassMap { label, found, wanted }) => Some(format!(
            "--resume: the checkpoint in {} was trained with another class map than the data dir's classes.csv: \
             label {label} is category {} there and {} here (a different data set?)",
            dir.display(),
            show(found),
            show(wanted)
        )),
    };
    if let Some(m) = mismatch {
        return Err(Mismatch(m).into());
    }
    let what = model_file(dir);
    let (tensors, meta) = checkpoint::read_safetensors(&what)?;
    check_epoch(&meta, state.epoch, &what)?;
    checkpoint::load_into(&model.vars, &tensors, &|_| false, &what.display().to_string())?;
    let opt_file = dir.join(checkpoint::OPTIMIZER_FILE);
    let (ot, ometa) = checkpoint::read_safetensors(&opt_file)?;
    check_epoch(&ometa, state.epoch, &opt_file)?;
    let kind = opt.kind.name().to_string();
    if ometa.get("optimizer") != Some(&kind) {
        return Err(Mismatch(format!(
            "{} holds {:?} state, the config asks for {kind}",
            opt_file.display(),
            ometa.get("optimizer")
        ))
        .into());
    }
    let state_tensors: BTreeMap<String, Tensor> = opt.tensors().into_iter().collect();
    checkpoint::load_into(&state_tensors, &ot, &|_| false, &opt_file.display().to_string())?;
    opt.step = ometa.get("step").and_then(|s| s.parse().ok()).context("optimizer state without a step count")?;
    Ok(state)
}

fn check_epoch(meta: &BTreeMap<String, String>, epoch: u32, file: &Path) -> Result<()> {
    let found = meta.get("epoch").cloned().unwrap_or_default();
    if found != epoch.to_string() {
        bail!("{} is of epoch {found:?} but state.json says {epoch}: the checkpoint is inconsistent", file.display());
    }
    Ok(())
}

/// Torchvision-named weights to start from; a head of another class count is re-initialized.
pub(crate) fn load_pretrained(path: &Path, model: &Model, arch: Arch) -> Result<()> {
    let (tensors, _) = checkpoint::read_safetensors(path).context("model.pretrained")?;
    let head = crate::models::head_prefix(arch);
    let head_differs = model
        .vars
        .iter()
        .filter(|(n, _)| n.starts_with(head))
        .any(|(n, v)| tensors.get(n).is_some_and(|t| t.size() != v.size()));
    if head_differs {
        info!("{}: the classifier head has another class count; it is re-initialized", path.display());
    }
    checkpoint::load_into(
        &model.vars,
        &tensors,
        &|n| head_differs && n.starts_with(head),
        &path.display().to_string(),
    )?;
    info!("started from {}", path.display());
    Ok(())
}

/// Loads the moving average kept beside a resumed checkpoint into `ema`; without one (the run
/// before kept none), the average starts from the resumed weights, as it says.
pub(crate) fn load_ema(dir: &Path, ema: &Ema) -> Result<()> {
    let file = dir.join(checkpoint::EMA_FILE);
    if !file.is_file() {
        warn!("--resume: {} is missing: the moving average starts from the resumed weights", file.display());
        return Ok(());
    }
    let (tensors, _) = checkpoint::read_safetensors(&file)?;
    checkpoint::load_into(&ema.vars, &tensors, &|_| false, &file.display().to_string())
}
