//! The outputs of `sac evaluate`: predictions.csv (FGVC/Kaggle submission format), metrics.json,
//! per_class.csv, confusion.png, and a summary on stdout. Each file is written atomically.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::df;
use polars::prelude::{CsvWriter, DataFrame, SerWriter};
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use super::metrics;
use super::pipeline::{Outcome, RankReport, Stage, StageStats};
use crate::config::{EvalSplit, Settings};
use crate::data::{Class, Row};
use crate::infra::files::write_atomic;

/// How the evaluation ran.
pub struct Run {
    pub ranks: usize,
    pub pipelined: bool,
    pub wall_seconds: f64,
    pub total_seconds: f64,
    pub checkpoint: PathBuf,
    pub batch_size: usize,
    pub split: EvalSplit,
}

#[derive(Serialize)]
struct StageReport {
    ranks: usize,
    busy_seconds: f64,
    /// Busy time over the wall time of the ranks (or threads) running the stage.
    busy_share: f64,
    images: u64,
    /// Images per busy second: what the stage could sustain alone.
    images_per_busy_second: f64,
}

fn csv_bytes(df: &mut DataFrame) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    CsvWriter::new(&mut out).include_header(true).finish(df)?;
    Ok(out)
}

/// Removes a previous run's output file, if there is one.
fn remove_stale(path: &std::path::Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
    }
    Ok(())
}

/// Where a run on `split` writes: `<output_dir>/`, or `<output_dir>/predict/` for the predict split.
pub fn output_dir(s: &Settings, split: EvalSplit) -> std::path::PathBuf {
    match split {
        EvalSplit::Test => s.config.paths.output_dir.clone(),
        EvalSplit::Predict => s.config.paths.output_dir.join("predict"),
    }
}

/// Rank 0: every output of the run, predictions.csv first, and the summary on stdout.
pub fn write(
    s: &Settings,
    classes: &[Class],
    rows: &[Row],
    mut outcome: Outcome,
    reports: &[RankReport],
    run: &Run,
) -> Result<()> {
    let dir = &output_dir(s, run.split);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    outcome.preds.sort_by_key(|p| p.row);
    outcome.failed.sort_by_key(|f| f.row);
    write_predictions(dir, classes, rows, &outcome, run.split)?;
    let stages = stage_figures(&outcome, reports, run.pipelined);
    let cpu_seconds: f64 = reports.iter().map(|r| r.cpu_seconds).sum();
    let m = metrics::compute(&outcome.preds, classes.len());
    if run.split == EvalSplit::Test {
        let json = metrics_json(rows, &outcome, m.as_ref(), &stages, cpu_seconds, run);
        write_atomic(&dir.join(METRICS_FILE), &(serde_json::to_string_pretty(&json)? + "\n").into_bytes())?;
    }
    if let Some(m) = &m {
        write_per_class(dir, classes, m)?;
    } else if run.split == EvalSplit::Test {
        info!("test.csv has no labels: wrote predictions only (no accuracy, per-class figures or confusion matrix)");
    }
    print_summary(dir, &outcome, m.as_ref(), &stages, cpu_seconds, run);
    Ok(())
}

/// Output files of `sac evaluate`, in its output directory.
pub const PREDICTIONS_FILE: &str = "predictions.csv";
pub const METRICS_FILE: &str = "metrics.json";
pub const PER_CLASS_FILE: &str = "per_class.csv";
pub const CONFUSION_FILE: &str = "confusion.png";
pub const SKIPPED_FILE: &str = "skipped.csv";

/// predictions.csv first, so that nothing after it can cost the predictions: Id = image id,
/// Predicted = category id of the top-1 class. A test run removes a previous run's figures; a
/// predict run lists the images it could not read in skipped.csv.
fn write_predictions(dir: &Path, classes: &[Class], rows: &[Row], outcome: &Outcome, split: EvalSplit) -> Result<()> {
    let mut preds = df!(
        "Id" => outcome.preds.iter().map(|p| rows[p.row].image_id).collect::<Vec<_>>(),
        "Predicted" => outcome.preds.iter().map(|p| classes[p.top[0]].category_id).collect::<Vec<_>>(),
    )?;
    write_atomic(&dir.join(PREDICTIONS_FILE), &csv_bytes(&mut preds)?)?;
    match split {
        // A previous run's figures must not stand beside these predictions if this run fails
        // before writing its own, or has no labels to compute them from.
        EvalSplit::Test => {
            for stale in [METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE] {
                remove_stale(&dir.join(stale))?;
            }
        }
        // A submission must name every image: say which are missing and why.
        EvalSplit::Predict => {
            let skipped = dir.join(SKIPPED_FILE);
            if outcome.failed.is_empty() {
                remove_stale(&skipped)?;
            } else {
                let mut df = df!(
                    "Id" => outcome.failed.iter().map(|f| rows[f.row].image_id).collect::<Vec<_>>(),
                    "path" => outcome.failed.iter().map(|f| rows[f.row].path.clone()).collect::<Vec<_>>(),
                    "error" => outcome.failed.iter().map(|f| f.error.clone()).collect::<Vec<_>>(),
                )?;
                write_atomic(&skipped, &csv_bytes(&mut df)?)?;
                warn!(
                    "predictions.csv lacks {} unreadable image(s), listed in {}: a Kaggle submission needs \
                     every Id (fix or replace the files and run again, or predict them otherwise)",
                    outcome.failed.len(),
                    skipped.display()
                );
            }
        }
    }
    Ok(())
}

/// Each stage's ranks (or 1 thread) and figures: from the ranks in the pipeline, from the threads
/// otherwise.
fn stage_figures(outcome: &Outcome, reports: &[RankReport], pipelined: bool) -> Vec<(Stage, usize, StageStats)> {
    Stage::ALL
        .into_iter()
        .map(|stage| {
            let (n, st) = if pipelined {
                let mine: Vec<&RankReport> = reports.iter().filter(|r| r.stage == Some(stage)).collect();
                let busy = mine.iter().map(|r| r.stats.busy).sum();
                let imgs = mine.iter().map(|r| r.stats.images).sum();
                (mine.len(), StageStats { busy, images: imgs })
            } else {
                (1, outcome.stats.iter().find(|(s, _)| *s == stage).map(|(_, st)| *st).unwrap_or_default())
            };
            (stage, n, st)
        })
        .collect()
}

/// metrics.json: accuracy (when labeled), speed, CPU, how the run went and each stage's figures.
fn metrics_json(
    rows: &[Row],
    outcome: &Outcome,
    m: Option<&metrics::Metrics>,
    stages: &[(Stage, usize, StageStats)],
    cpu_seconds: f64,
    run: &Run,
) -> serde_json::Value {
    let stage_json: serde_json::Map<String, serde_json::Value> = stages
        .iter()
        .map(|(stage, n, st)| {
            let r = StageReport {
                ranks: *n,
                busy_seconds: st.busy,
                busy_share: st.busy / (run.wall_seconds * *n as f64).max(1e-9),
                images: st.images,
                images_per_busy_second: st.images as f64 / st.busy.max(1e-9),
            };
            (stage.name().to_owned(), serde_json::to_value(r).expect("serializable"))
        })
        .collect();
    let images = outcome.preds.len();
    json!({
        "images": images,
        "skipped_images": outcome.failed.len(),
        "labeled": m.is_some(),
        "top1": m.map(|m| m.top1),
        "top5": m.map(|m| m.top5),
        "macro_f1": m.map(|m| m.macro_f1),
        "loss": m.map(|m| m.loss),
        "wall_seconds": run.wall_seconds,
        "total_seconds": run.total_seconds,
        "images_per_second": images as f64 / run.wall_seconds.max(1e-9),
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_image": cpu_seconds / (images.max(1) as f64),
        "ranks": run.ranks,
        "mode": if run.pipelined { "pipeline" } else { "single-process" },
        "batch_size": run.batch_size,
        "checkpoint": run.checkpoint,
        "stages": stage_json,
        "skipped": outcome.failed.iter().map(|f| json!({"path": rows[f.row].path, "error": f.error})).collect::<Vec<_>>(),
    })
}

/// per_class.csv (one row per class present in the labels or the predictions) and confusion.png.
fn write_per_class(dir: &Path, classes: &[Class], m: &metrics::Metrics) -> Result<()> {
    let rows_of = || m.per_class.iter();
    let mut per_class = df!(
        "label" => rows_of().map(|c| c.label as i64).collect::<Vec<_>>(),
        "category_id" => rows_of().map(|c| classes[c.label].category_id).collect::<Vec<_>>(),
        "name" => rows_of().map(|c| classes[c.label].name.clone()).collect::<Vec<_>>(),
        "precision" => rows_of().map(|c| c.precision).collect::<Vec<_>>(),
        "recall" => rows_of().map(|c| c.recall).collect::<Vec<_>>(),
        "f1" => rows_of().map(|c| c.f1).collect::<Vec<_>>(),
        "support" => rows_of().map(|c| c.support as i64).collect::<Vec<_>>(),
        "predicted" => rows_of().map(|c| c.predicted as i64).collect::<Vec<_>>(),
    )?;
    write_atomic(&dir.join(PER_CLASS_FILE), &csv_bytes(&mut per_class)?)?;
    let names: Vec<String> = m.confusion.labels.iter().map(|&l| classes[l].name.clone()).collect();
    let c = &m.confusion;
    if let Err(e) = crate::plot::confusion(&dir.join(CONFUSION_FILE), &c.counts, &c.support, c.classes_present, &names)
    {
        warn!("confusion.png not drawn: {e:#}");
    }
    Ok(())
}

/// The summary, for the person at the terminal.
fn print_summary(
    dir: &Path,
    outcome: &Outcome,
    m: Option<&metrics::Metrics>,
    stages: &[(Stage, usize, StageStats)],
    cpu_seconds: f64,
    run: &Run,
) {
    let images = outcome.preds.len();
    let ips = images as f64 / run.wall_seconds.max(1e-9);
    println!(
        "evaluated {images} images with {} in {:.1} s: {ips:.1} images/s",
        run.checkpoint.display(),
        run.wall_seconds
    );
    if let Some(m) = m {
        println!(
            "  top-1 {:.2} %   top-5 {:.2} %   macro-F1 {:.4}   loss {:.4}",
            100.0 * m.top1,
            100.0 * m.top5,
            m.macro_f1,
            m.loss
        );
    }
    if !outcome.failed.is_empty() {
        let listed = if run.split == EvalSplit::Test { METRICS_FILE } else { SKIPPED_FILE };
        println!("  skipped {} unreadable image(s) (listed in {listed})", outcome.failed.len());
    }
    println!(
        "  {} on {} rank(s); CPU {:.3} s per image over all ranks",
        if run.pipelined { "pipeline" } else { "single process" },
        run.ranks,
        cpu_seconds / images.max(1) as f64
    );
    for (stage, n, st) in stages {
        println!(
            "  {:<10} {n} {}  busy {:>5.1} %  ({:.0} images per busy second)",
            stage.name(),
            if run.pipelined { "rank(s) " } else { "thread  " },
            100.0 * st.busy / (run.wall_seconds * *n as f64).max(1e-9),
            st.images as f64 / st.busy.max(1e-9)
        );
    }
    println!("  outputs in {}", dir.display());
}
