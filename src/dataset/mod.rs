//! `sac create-dataset`: read a source, draw a seeded sample, split it, write the data dir.
//!
//! Readers (`coco`, `folder`, `idx`) turn a source into a [`Source`]: a list of images with their
//! category and a list of categories. `sample` chooses and splits; `write` builds the data dir.
pub mod coco;
pub mod folder;
pub mod idx;
pub mod sample;
pub mod source;
pub mod write;

use std::time::Instant;

use anyhow::{Context, Result};
use tracing::info;

use crate::config::{Format, Settings};
pub use source::{Category, ImageData, Item, PredictSet, Source};

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
    let format = cfg.format.name();
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
    let stop = crate::infra::process::stop_on_signals()?;
    let summary = write::write_data_dir(settings, &source, &split, predict.as_ref(), &stop)?;
    info!(
        "wrote {} ({} train, {} test, {} predict, {} classes) in {:.1} s; peak memory {:.0} MiB",
        settings.data_dir().display(),
        summary.train,
        summary.test,
        summary.predict,
        summary.classes,
        t0.elapsed().as_secs_f64(),
        crate::infra::process::resource_usage().0
    );
    Ok(())
}
