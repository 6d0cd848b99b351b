//! Builds the data dir: `train.csv`, `test.csv`, `classes.csv`, `dataset.json`,
//! `img/{train,test}/…`, and with `[dataset] predict_source` also `predict.csv` and `img/predict/…`. Everything is written into a temporary directory beside the target and
//! renamed into place only when complete, so a failure never leaves a half-written data dir.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use polars::df;
use polars::prelude::{CsvWriter, DataFrame, SerWriter};
use serde::Serialize;
use tracing::{info, warn};

use super::sample::Split;
use super::source::{ImageData, Item, PredictSet, Source};
use crate::config::{ImagePlacement, Settings};

/// The file that marks a data dir as written by `sac create-dataset` (and records how).
pub const MARKER: &str = "dataset.json";

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub train: usize,
    pub test: usize,
    pub predict: usize,
    pub classes: usize,
}

#[derive(Serialize)]
struct Record<'a> {
    created_by: String,
    format: crate::config::Format,
    source: &'a Path,
    sample: String,
    seed: u64,
    test_fraction: f64,
    stratify: bool,
    place: ImagePlacement,
    source_images: usize,
    train: usize,
    test: usize,
    classes: usize,
    /// Classes kept whole in train by a stratified split (too few images to split).
    train_only_classes: usize,
    predict_source: Option<&'a Path>,
    predict: usize,
}

/// A directory that is removed on drop unless `keep` is called.
struct TempDir(Option<PathBuf>);

impl TempDir {
    fn keep(mut self) -> PathBuf {
        self.0.take().expect("not kept twice")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// `stop`: raised by a signal; the write is abandoned and the temporary directory removed.
/// `predict`: the unlabeled images of `[dataset] predict_source`, written whole to `predict.csv`.
pub fn write_data_dir(
    settings: &Settings,
    source: &Source,
    split: &Split,
    predict: Option<&PredictSet>,
    stop: &AtomicBool,
) -> Result<Summary> {
    let target = settings.data_dir().to_path_buf();
    check_replaceable(&target)?;
    let name = target.file_name().context("paths.data_dir has no final component")?.to_string_lossy();
    let parent = target.parent().context("paths.data_dir has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp_path = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp_path.exists() {
        fs::remove_dir_all(&tmp_path).with_context(|| format!("removing stale {}", tmp_path.display()))?;
    }
    fs::create_dir(&tmp_path).with_context(|| format!("creating {}", tmp_path.display()))?;
    let tmp = TempDir(Some(tmp_path.clone()));

    let cfg = &settings.config.dataset;
    check_files_exist(source, split, predict)?;
    let n_predict = predict.map_or(0, |p| p.images.len());
    let total = (split.train.len() + split.test.len() + n_predict) as u64;
    let every = settings.config.train.log_interval();
    let mut pb = crate::infra::logging::Progress::new("create-dataset: writing", "images", total, true, every);
    let interrupted = || bail!("interrupted by a signal: nothing was written, {} is as it was", target.display());
    for (split_name, indices) in [("train", &split.train), ("test", &split.test)] {
        for &i in indices.iter() {
            if stop.load(Ordering::Relaxed) {
                return interrupted();
            }
            let item = &source.items[i];
            place(source, item, &tmp_path.join(image_path(split_name, &item.rel)), cfg.place)?;
            pb.inc(1);
        }
    }
    for (_, rel) in predict.map_or(&[][..], |p| &p.images) {
        if stop.load(Ordering::Relaxed) {
            return interrupted();
        }
        let root = &predict.expect("images come from it").root;
        place_file(&root.join(rel), &tmp_path.join(image_path("predict", rel)), cfg.place)?;
        pb.inc(1);
    }
    pb.finish();
    let mut summary = write_csvs(&tmp_path, source, split)?;
    if let Some(p) = predict {
        summary.predict = write_predict_csv(&tmp_path, p)?;
    }
    let record = Record {
        created_by: format!("sac {}", env!("CARGO_PKG_VERSION")),
        format: cfg.format,
        source: &cfg.source,
        sample: cfg.sample.to_string(),
        seed: cfg.seed,
        test_fraction: cfg.test_fraction,
        stratify: cfg.stratify,
        place: cfg.place,
        source_images: source.items.len(),
        train: summary.train,
        test: summary.test,
        classes: summary.classes,
        train_only_classes: split.train_only_classes,
        predict_source: predict.map(|_| cfg.predict_source.as_path()),
        predict: summary.predict,
    };
    fs::write(tmp_path.join(MARKER), serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {MARKER}"))?;

    swap_into_place(tmp.keep(), &target)?;
    Ok(summary)
}

/// Where an image goes inside the data dir.
fn image_path(split: &str, rel: &Path) -> PathBuf {
    Path::new("img").join(split).join(rel)
}

/// Writes `train.csv`, `test.csv` and `classes.csv` into `dir`. Labels are 0..K-1 in ascending
/// category-id order, over the classes present in the sample.
pub fn write_csvs(dir: &Path, source: &Source, split: &Split) -> Result<Summary> {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for &i in split.train.iter().chain(&split.test) {
        *counts.entry(source.items[i].category_id).or_default() += 1;
    }
    let label_of: BTreeMap<i64, i64> = counts.keys().enumerate().map(|(l, &c)| (c, l as i64)).collect();
    let names: BTreeMap<i64, &str> = source.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
    for (split_name, indices) in [("train", &split.train), ("test", &split.test)] {
        let items = || indices.iter().map(|&i| &source.items[i]);
        let mut df = df!(
            "path" => items().map(|it| image_path(split_name, &it.rel).to_string_lossy().into_owned()).collect::<Vec<_>>(),
            "label" => items().map(|it| label_of[&it.category_id]).collect::<Vec<_>>(),
            "category_id" => items().map(|it| it.category_id).collect::<Vec<_>>(),
            "image_id" => items().map(|it| it.image_id).collect::<Vec<_>>(),
        )?;
        write_csv(&mut df, &dir.join(format!("{split_name}.csv")))?;
    }
    let mut classes = df!(
        "label" => label_of.values().copied().collect::<Vec<_>>(),
        "category_id" => counts.keys().copied().collect::<Vec<_>>(),
        "name" => counts.keys().map(|c| names.get(c).map_or_else(|| c.to_string(), |n| n.to_string())).collect::<Vec<_>>(),
        "count" => counts.values().map(|&n| n as i64).collect::<Vec<_>>(),
    )?;
    write_csv(&mut classes, &dir.join(crate::data::CLASSES_FILE))?;
    Ok(Summary { train: split.train.len(), test: split.test.len(), predict: 0, classes: counts.len() })
}

/// Writes `predict.csv`: the same columns as `test.csv`, with `label` and `category_id` empty.
fn write_predict_csv(dir: &Path, predict: &PredictSet) -> Result<usize> {
    let n = predict.images.len();
    let mut df = df!(
        "path" => predict.images.iter().map(|(_, rel)| image_path("predict", rel).to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "label" => vec![None::<i64>; n],
        "category_id" => vec![None::<i64>; n],
        "image_id" => predict.images.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
    )?;
    write_csv(&mut df, &dir.join("predict.csv"))?;
    Ok(n)
}

fn write_csv(df: &mut DataFrame, path: &Path) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    CsvWriter::new(&mut f).include_header(true).finish(df).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A data dir may be replaced only if it is empty or was written by sac (it holds the marker).
fn check_replaceable(target: &Path) -> Result<()> {
    if !target.exists() {
        return Ok(());
    }
    if !target.is_dir() {
        bail!("paths.data_dir {} exists and is not a directory", target.display());
    }
    let empty = fs::read_dir(target).with_context(|| format!("listing {}", target.display()))?.next().is_none();
    if !empty && !target.join(MARKER).is_file() {
        bail!(
            "paths.data_dir {} exists and was not written by `sac create-dataset` (no {MARKER}): \
             remove it or choose another paths.data_dir",
            target.display()
        );
    }
    Ok(())
}

/// Every selected file must exist before anything is written.
fn check_files_exist(source: &Source, split: &Split, predict: Option<&PredictSet>) -> Result<()> {
    let missing: Vec<PathBuf> = split
        .train
        .iter()
        .chain(&split.test)
        .filter(|&&i| matches!(source.items[i].data, ImageData::File))
        .map(|&i| source.root.join(&source.items[i].rel))
        .filter(|p| !p.is_file())
        .collect();
    if let Some(first) = missing.first() {
        bail!("{} listed image(s) missing on disk, the first: {}", missing.len(), first.display());
    }
    if let Some(p) = predict {
        let missing: Vec<PathBuf> =
            p.images.iter().map(|(_, rel)| p.root.join(rel)).filter(|path| !path.is_file()).collect();
        if let Some(first) = missing.first() {
            bail!(
                "{} image(s) of dataset.predict_source missing on disk, the first: {}",
                missing.len(),
                first.display()
            );
        }
    }
    Ok(())
}

fn place(source: &Source, item: &Item, dest: &Path, how: ImagePlacement) -> Result<()> {
    match &item.data {
        ImageData::Idx { set, index } => {
            create_parent(dest)?;
            let s = &source.idx[*set];
            image::save_buffer(dest, s.image(*index), s.cols, s.rows, image::ColorType::L8)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        ImageData::File => place_file(&source.root.join(&item.rel), dest, how)?,
    }
    Ok(())
}

fn create_parent(dest: &Path) -> Result<()> {
    match dest.parent() {
        Some(dir) => fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())),
        None => Ok(()),
    }
}

/// Copies or links the file `src` to `dest`, creating `dest`'s directory.
fn place_file(src: &Path, dest: &Path, how: ImagePlacement) -> Result<()> {
    create_parent(dest)?;
    let res = match how {
        ImagePlacement::Copy => fs::copy(src, dest).map(|_| ()),
        ImagePlacement::Hardlink => fs::hard_link(src, dest),
        ImagePlacement::Symlink => std::os::unix::fs::symlink(std::path::absolute(src)?, dest),
    };
    res.with_context(|| format!("placing {} at {} ({how:?})", src.display(), dest.display()))
}

/// Puts the complete `tmp` at `target`, replacing a previous data dir only after `tmp` is done.
fn swap_into_place(tmp: PathBuf, target: &Path) -> Result<()> {
    let guard = TempDir(Some(tmp.clone()));
    if target.exists() {
        let old = tmp.with_file_name(format!("{}.old", tmp.file_name().expect("named").to_string_lossy()));
        fs::rename(target, &old).with_context(|| format!("moving the previous {} aside", target.display()))?;
        if let Err(e) = fs::rename(&tmp, target) {
            let _ = fs::rename(&old, target);
            return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()));
        }
        guard.keep();
        if let Err(e) = fs::remove_dir_all(&old) {
            warn!("could not remove the previous data dir at {}: {e}", old.display());
        }
        info!("replaced the previous data dir");
    } else {
        fs::rename(&tmp, target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
        guard.keep();
    }
    Ok(())
}
