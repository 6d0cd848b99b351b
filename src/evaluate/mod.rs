//! `sac evaluate`: a checkpoint on test.csv through the pipeline, then metrics and reports.
//!
//! With N ≥ 4 ranks: rank 0 reads files, rank 1 decodes and resizes, rank 2 normalizes, ranks
//! 3..N-1 predict (a free predictor gets the next batch). With fewer ranks, the same stages run
//! as threads of rank 0. Either way rank 0 collects the predictions and writes the outputs.
pub mod metrics;
pub mod pipeline;
pub mod report;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::nn::{self, ModuleT};
use tch::Device;
use tracing::info;

use crate::checkpoint;
use crate::config::{Arch, Settings, Split};
use crate::data::{self, Geometry};
use crate::dist::Dist;
use crate::precision::Numerics;
use pipeline::{Ctx, RankReport, Stage};

/// Checks a checkpoint's architecture, class count and class map (the category id of every label)
/// against the config and `classes.csv`, from its metadata, without building a model. A checkpoint
/// without a class map in its metadata is compared through the `state.json` beside it, if any.
pub fn check_checkpoint(path: &Path, arch: Arch, classes: &[data::Class]) -> Result<()> {
    if !path.is_file() {
        if path.file_name().is_some_and(|n| n == crate::checkpoint::EMA_FILE) {
            bail!(
                "checkpoint {} not found: --ema (evaluate.ema) needs a run trained with train.ema_decay > 0",
                path.display()
            );
        }
        bail!("checkpoint {} not found: train first (`sac train`) or pass --checkpoint PATH", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors checkpoint", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if let Some(a) = meta.get("arch") {
        if a != arch.name() {
            bail!("checkpoint {} is a {a} model, the config asks for {arch} (model.name / --model)", path.display());
        }
    }
    if let Some(k) = meta.get("num_classes") {
        if k != &classes.len().to_string() {
            bail!(
                "checkpoint {} has {k} classes, classes.csv has {}: it was trained on another data set",
                path.display(),
                classes.len()
            );
        }
    }
    let theirs: Option<Vec<i64>> = match meta.get(checkpoint::CATEGORY_IDS) {
        Some(json) => Some(
            serde_json::from_str(json)
                .with_context(|| format!("{}: its {} metadata is damaged", path.display(), checkpoint::CATEGORY_IDS))?,
        ),
        None => class_map_beside(path),
    };
    let Some(theirs) = theirs else {
        tracing::warn!(
            "{} records no class map (not written by this sac): its labels are taken to be classes.csv's",
            path.display()
        );
        return Ok(());
    };
    let ours: Vec<i64> = classes.iter().map(|c| c.category_id).collect();
    if let Some(i) = (0..ours.len().max(theirs.len())).find(|&i| ours.get(i) != theirs.get(i)) {
        let show = |v: Option<&i64>| v.map_or("none".to_string(), i64::to_string);
        bail!(
            "checkpoint {} was trained with another class map than classes.csv: label {i} is category {} there \
             and {} in classes.csv, so its predictions would name the wrong categories. Evaluate with the data \
             dir it was trained on (paths.data_dir), or train on this one",
            path.display(),
            show(theirs.get(i)),
            show(ours.get(i))
        );
    }
    Ok(())
}

/// The class map of the `state.json` beside a checkpoint written before checkpoints carried one.
fn class_map_beside(path: &Path) -> Option<Vec<i64>> {
    let text = std::fs::read_to_string(path.parent()?.join("state.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    state["classes"].as_array()?.iter().map(|c| c["category_id"].as_i64()).collect()
}

/// The model with the checkpoint's weights, for inference.
pub struct Predictor {
    net: Box<dyn ModuleT>,
    _vs: nn::VarStore,
    pub device: Device,
    pub classes: usize,
    /// Autocast and memory format (`evaluate.precision`, `evaluate.channels_last`).
    pub numerics: Numerics,
}

impl Predictor {
    pub fn load(path: &Path, arch: Arch, classes: usize, device: Device, numerics: Numerics) -> Result<Predictor> {
        let vs = nn::VarStore::new(device);
        let net = crate::models::build(&vs.root(), arch, classes as i64);
        let vars: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
        let (tensors, _) = checkpoint::read_safetensors(path)?;
        checkpoint::load_into(&vars, &tensors, &|_| false, &path.display().to_string())?;
        Ok(Predictor { net, _vs: vs, device, classes, numerics })
    }

    pub fn predict(&self, g: &Geometry, b: pipeline::TensorBatch) -> pipeline::ResultBatch {
        pipeline::predict(self.net.as_ref(), self.classes, self.device, &self.numerics, g, b)
    }
}

/// The subcommand, on `split`.
pub fn run(dist: &Dist, s: &Settings, split: Split) -> Result<()> {
    let cfg = &s.config;
    let t_start = Instant::now();
    let threads = crate::process::set_threads(cfg.train.threads, dist.cores_per_rank());
    dist.log_placement(threads);
    let device = crate::process::pick_device("train.device", cfg.train.device, dist.local_rank())?;
    let ec = &cfg.evaluate;
    let numerics = crate::train::agreed_numerics(dist, "evaluate.precision", ec.precision, ec.channels_last, device)?;
    let arch = cfg.model.name;
    let ckpt = s.eval_checkpoint();
    let csv = format!("{}.csv", split.name());
    let test_file = s.data_dir().join(&csv);

    // Rank 0 reads the CSVs and checks the checkpoint before any rank starts working.
    let (mut classes, mut rows, mut header) = (Vec::new(), Vec::new(), Vec::new());
    if dist.is_root() {
        classes = data::read_classes(&s.data_dir().join("classes.csv"))?;
        if split == Split::Predict && !test_file.is_file() {
            bail!(
                "{} not found: --split predict needs an unlabeled set; set dataset.predict_source (e.g. \
                 Herbarium's test/metadata.json) and run `sac create-dataset`",
                test_file.display()
            );
        }
        rows = match split {
            Split::Test => data::read_rows(&test_file)?,
            Split::Predict => data::read_unlabeled_rows(&test_file)?,
        };
        if rows.is_empty() {
            bail!("{} has no rows", test_file.display());
        }
        data::check_labels(&rows, classes.len(), &test_file)?;
        check_checkpoint(&ckpt, arch, &classes)?;
        if let Some(path) = cfg.timeline.path() {
            crate::timeline::prepare(path)?;
        }
        header = classes.len().to_string().into_bytes();
    }
    dist.broadcast_bytes(0, &mut header);
    let k: usize = String::from_utf8_lossy(&header).parse().context("class count from rank 0")?;

    let pipelined = dist.size() >= 4;
    let needs_model = if pipelined { dist.rank() >= 3 } else { dist.is_root() };
    let model = if needs_model { Some(Predictor::load(&ckpt, arch, k, device, numerics.clone())?) } else { None };
    let geometry = Geometry::from_config(&cfg.image);
    // Default: the node's cores shared among its ranks for the decode rank of the pipeline; one
    // thread when all stages share one process (its torch threads already take its cores).
    let decode_threads = match cfg.evaluate.decode_threads {
        0 if dist.size() >= 4 => dist.cores_per_rank(),
        0 => 1,
        n => n,
    };
    let timeline = cfg.timeline.path();
    let trace_batches = if timeline.is_some() { cfg.timeline.steps as u64 } else { 0 };
    let ctx =
        Ctx { root: s.data_dir(), geometry, on_bad: cfg.train.on_bad_image, csv: &csv, decode_threads, trace_batches };
    let mut predict = |b: pipeline::TensorBatch| match &model {
        Some(m) => m.predict(&geometry, b),
        None => unreachable!("only predicting ranks get batches"),
    };
    if dist.is_root() {
        if pipelined {
            info!(
                "evaluating {} on {} images of {csv}: pipeline over {} ranks (read, decode with {decode_threads} thread(s), normalize, {} predictor(s)), batch {}",
                ckpt.display(),
                rows.len(),
                dist.size(),
                dist.size() - 3,
                cfg.evaluate.batch_size
            );
        } else {
            info!(
                "evaluating {} on {} images of {csv}: {} rank(s) < 4, so all stages run as threads of one process, batch {}, {threads} torch thread(s), {decode_threads} decode thread(s)",
                ckpt.display(),
                rows.len(),
                dist.size(),
                cfg.evaluate.batch_size
            );
        }
    }

    if dist.is_root() {
        info!(
            "predictors compute in {} on {}",
            numerics.reason,
            if device.is_cuda() { "their node's GPUs (local rank mod GPU count)" } else { "the CPU" }
        );
    }
    dist.barrier();
    let t0 = Instant::now();
    let cpu0 = crate::process::resource_usage().1;
    crate::logging::progress_clock(if dist.is_root() { cfg.train.log_interval() } else { Duration::ZERO });
    let mut progress = crate::logging::Progress::new(
        "evaluate",
        "images",
        rows.len() as u64,
        dist.is_root(),
        cfg.train.log_interval(),
    );
    crate::timeline::set_recording(timeline.is_some());
    let batch = cfg.evaluate.batch_size;
    let (outcome, stats) = if pipelined {
        pipeline::mpi_pipeline(dist, &ctx, &rows, batch, &mut predict, &mut progress)?
    } else if dist.is_root() {
        (Some(pipeline::local_pipeline(&ctx, &rows, batch, &mut predict, &mut progress)?), Default::default())
    } else {
        (None, Default::default())
    };
    progress.finish();
    crate::logging::progress_clock(Duration::ZERO);
    let wall = t0.elapsed().as_secs_f64();
    let (rss, cpu) = crate::process::resource_usage();
    let mine = RankReport {
        stage: pipelined.then(|| Stage::of_rank(dist.rank())),
        stats,
        cpu_seconds: cpu - cpu0,
        peak_rss_mib: rss,
        process_cpu_seconds: cpu,
    };
    let reports = dist.gather_bytes(0, serde_json::to_vec(&mine)?);
    if let Some(path) = timeline {
        if let Some(parts) = dist.gather_bytes(0, crate::timeline::take(dist.rank())) {
            let window = format!("the first {} batch(es) of {batch} images", cfg.timeline.steps);
            crate::timeline::write(path, &parts, "evaluate", &window)?;
        }
    }
    let mut done_ranks = None;
    if let (Some(outcome), Some(reports)) = (outcome, reports) {
        let reports: Vec<RankReport> =
            reports.iter().map(|b| serde_json::from_slice(b)).collect::<std::result::Result<_, _>>()?;
        done_ranks = Some(reports.iter().map(|r| (r.peak_rss_mib, r.process_cpu_seconds)).collect::<Vec<_>>());
        let run = report::Run {
            ranks: dist.size(),
            pipelined,
            wall_seconds: wall,
            total_seconds: t_start.elapsed().as_secs_f64(),
            checkpoint: ckpt.clone(),
            batch_size: cfg.evaluate.batch_size,
            split,
        };
        report::write(s, &classes, &rows, outcome, &reports, &run)?;
    }
    // No collective here: ranks without work leave while rank 0 writes the report.
    let (rss, cpu) = crate::process::resource_usage();
    tracing::debug!("done: this rank's peak memory {rss:.0} MiB, CPU {cpu:.1} s");
    if let Some(mut ranks) = done_ranks {
        ranks[0] = (rss, cpu);
        crate::logging::done(&format!("outputs in {}", report::output_dir(s, split).display()), &ranks);
    }
    Ok(())
}
