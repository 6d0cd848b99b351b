//! `sac create-dataset`: read a source, draw a seeded sample, split it, write the data dir.
//!
//! Readers (`coco`, `folder`, `idx`) turn a source into a [`Source`]: a list of images with their
//! category and a list of categories. `sample` chooses and splits; `write` builds the data dir.
pub mod coco;
pub mod folder;
pub mod idx;
pub mod sample;
pub mod write;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tracing::info;

use crate::config::{Format, Settings};

/// Where one image's bytes come from.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// The file `Source::root` / `Item::rel` (coco, folder): one path per image, not two.
    File,
    /// Image `index` of an IDX image set, written out as PNG.
    Idx { set: usize, index: usize },
}

/// One image of the source.
#[derive(Debug, Clone)]
pub struct Item {
    pub data: ImageData,
    /// Where it goes, relative to `img/<split>/`; for files, also where it is, relative to the root.
    pub rel: PathBuf,
    pub category_id: i64,
    pub image_id: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub id: i64,
    pub name: String,
}

/// A whole source data set, as the readers give it.
#[derive(Debug, Default)]
pub struct Source {
    /// The directory that file images are relative to.
    pub root: PathBuf,
    pub items: Vec<Item>,
    /// Known categories, any order.
    pub categories: Vec<Category>,
    /// Pixel data of IDX sources.
    pub idx: Vec<idx::ImageSet>,
}

/// The unlabeled images of `[dataset] predict_source`: the directory their file names are
/// relative to, and `(image id, file name)` per image.
#[derive(Debug, Default)]
pub struct PredictSet {
    pub root: PathBuf,
    pub images: Vec<(i64, PathBuf)>,
}

pub fn read_source(format: Format, path: &std::path::Path) -> Result<Source> {
    match format {
        Format::Coco => coco::read(path),
        Format::Folder => folder::read(path),
        Format::Idx => idx::read(path),
    }
}

/// The subcommand.
pub fn create(settings: &Settings) -> Result<()> {
    let cfg = &settings.config.dataset;
    let t0 = Instant::now();
    let format = format!("{:?}", cfg.format).to_lowercase();
    info!("reading {format} source {}", cfg.source.display());
    let source = read_source(cfg.format, &cfg.source)
        .with_context(|| format!("reading the {format} source {} (dataset.source)", cfg.source.display()))?;
    info!(
        "{} images in {} categories ({:.1} s)",
        source.items.len(),
        source.categories.len(),
        t0.elapsed().as_secs_f64()
    );
    let predict = if cfg.predict_source.as_os_str().is_empty() {
        None
    } else {
        let (root, images) = coco::read_unlabeled(&cfg.predict_source).with_context(|| {
            format!("reading the unlabeled set {} (dataset.predict_source)", cfg.predict_source.display())
        })?;
        info!("{} unlabeled images to predict in {}", images.len(), cfg.predict_source.display());
        Some(PredictSet { root, images })
    };
    let split = sample::choose(&source, cfg.sample, cfg.test_fraction, cfg.stratify, cfg.seed)?;
    info!("sample {} (seed {}): {} train + {} test images", cfg.sample, cfg.seed, split.train.len(), split.test.len());
    if split.train_only_classes > 0 {
        info!(
            "{} class(es) have fewer than {} images in the sample and stay whole in train (none in test)",
            split.train_only_classes,
            sample::MIN_TO_SPLIT
        );
    }
    let stop = crate::stop_on_signals()?;
    let summary = write::write_data_dir(settings, &source, &split, predict.as_ref(), &stop)?;
    info!(
        "wrote {} ({} train, {} test, {} predict, {} classes) in {:.1} s; peak memory {:.0} MiB",
        settings.data_dir().display(),
        summary.train,
        summary.test,
        summary.predict,
        summary.classes,
        t0.elapsed().as_secs_f64(),
        crate::resource_usage().0
    );
    Ok(())
}
