//! `sac evaluate`: a checkpoint on test.csv through the pipeline, then metrics and reports.
//!
//! With N ≥ 4 ranks: rank 0 reads files, rank 1 decodes and resizes, rank 2 normalizes, ranks
//! 3..N-1 predict (a free predictor gets the next batch). With fewer ranks, the same stages run
//! as threads of rank 0. Either way rank 0 collects the predictions and writes the outputs.
pub mod metrics;
pub mod pipeline;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::nn::{self, ModuleT};
use tch::Device;
use tracing::info;

use crate::checkpoint;
use crate::config::{Arch, EvalSplit, Settings};
use crate::data::{self, Geometry};
use crate::infra::dist::Dist;
use crate::precision::Numerics;
use pipeline::{Ctx, Outcome, RankReport, Stage};

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
    let class_map: Option<Vec<i64>> = match meta.get(checkpoint::CATEGORY_IDS) {
        Some(json) => Some(
            serde_json::from_str(json)
                .with_context(|| format!("{}: its {} metadata is damaged", path.display(), checkpoint::CATEGORY_IDS))?,
        ),
        None => class_map_beside(path),
    };
    let found = checkpoint::Recorded {
        arch: meta.get("arch").cloned(),
        classes: meta.get("num_classes").and_then(|k| k.parse().ok()),
        class_map,
    };
    let wanted = checkpoint::Recorded {
        arch: Some(arch.name().to_string()),
        classes: Some(classes.len()),
        class_map: Some(classes.iter().map(|c| c.category_id).collect()),
    };
    let show = |v: Option<i64>| v.map_or("none".to_string(), |c| c.to_string());
    match checkpoint::difference(&found, &wanted) {
        None => {
            if found.class_map.is_none() {
                tracing::warn!(
                    "{} records no class map (not written by this sac): its labels are taken to be classes.csv's",
                    path.display()
                );
            }
            Ok(())
        }
        Some(checkpoint::Difference::Arch { found, .. }) => {
            bail!("checkpoint {} is a {found} model, the config asks for {arch} (model.name / --model)", path.display())
        }
        Some(checkpoint::Difference::Classes { found, wanted }) => bail!(
            "checkpoint {} has {found} classes, classes.csv has {wanted}: it was trained on another data set",
            path.display()
        ),
        Some(checkpoint::Difference::ClassMap { label, found, wanted }) => bail!(
            "checkpoint {} was trained with another class map than classes.csv: label {label} is category {} there \
             and {} in classes.csv, so its predictions would name the wrong categories. Evaluate with the data \
             dir it was trained on (paths.data_dir), or train on this one",
            path.display(),
            show(found),
            show(wanted)
        ),
    }
}

/// The class map of the `state.json` beside a checkpoint written before checkpoints carried one.
fn class_map_beside(path: &Path) -> Option<Vec<i64>> {
    let text = std::fs::read_to_string(path.parent()?.join(checkpoint::STATE_FILE)).ok()?;
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
        if numerics.channels_last {
            crate::precision::weights_channels_last(vars.values())?;
        }
        Ok(Predictor { net, _vs: vs, device, classes, numerics })
    }

    pub fn predict(&self, g: &Geometry, b: pipeline::TensorBatch) -> pipeline::ResultBatch {
        pipeline::predict(self.net.as_ref(), self.classes, self.device, &self.numerics, g, b)
    }
}

/// The subcommand, on `split`: the job's outline.
pub fn run(dist: &Dist, s: &Settings, split: EvalSplit) -> Result<()> {
    let t_start = Instant::now();
    let job = Job::prepare(dist, s, split)?;
    let model = job.predictor(dist)?;
    // From here on a failure is not one of the configuration, data or checkpoint (exit 1, not 2).
    crate::infra::process::work_under_way();
    job.log_plan(dist);
    let (outcome, mine) = job.execute(dist, model.as_ref())?;
    let reports = job.gather(dist, &mine)?;
    // No collective after this: ranks without work leave while rank 0 writes the report.
    let mut ranks = None;
    if let (Some((outcome, wall)), Some(reports)) = (outcome, reports) {
        job.write_report(outcome, &reports, wall, t_start)?;
        ranks = Some(reports.iter().map(|r| (r.peak_rss_mib, r.process_cpu_seconds)).collect::<Vec<_>>());
    }
    let (rss, cpu) = crate::infra::process::resource_usage();
    tracing::debug!("done: this rank's peak memory {rss:.0} MiB, CPU {cpu:.1} s");
    if let Some(mut ranks) = ranks {
        ranks[0] = (rss, cpu);
        crate::infra::logging::done(&format!("outputs in {}", report::output_dir(s, split).display()), &ranks);
    }
    Ok(())
}

/// What every rank knows of the evaluation before it starts; `classes` and `rows` on rank 0 only.
struct Job<'a> {
    s: &'a Settings,
    split: EvalSplit,
    threads: usize,
    device: Device,
    numerics: Numerics,
    ckpt: PathBuf,
    /// The split's CSV file name.
    csv: String,
    classes: Vec<data::Class>,
    rows: Vec<data::Row>,
    /// Classes of the checkpoint (every rank).
    k: usize,
    /// Stages as ranks (4 or more) or as threads of rank 0.
    pipelined: bool,
    decode_threads: usize,
}

impl<'a> Job<'a> {
    /// Threads, device and numerics of this rank; rank 0 reads the CSVs and checks the checkpoint
    /// before any rank starts working, and tells the others the class count. Collectives.
    fn prepare(dist: &Dist, s: &'a Settings, split: EvalSplit) -> Result<Job<'a>> {
        let cfg = &s.config;
        let threads = crate::infra::process::set_threads(cfg.train.threads, dist.cores_per_rank());
        dist.log_placement(threads);
        let device = crate::infra::process::pick_device("train.device", cfg.train.device, dist.local_rank())?;
        let ec = &cfg.evaluate;
        let numerics = crate::train::agreed_numerics(
            dist,
            "evaluate.precision",
            ec.precision,
            ec.channels_last,
            crate::precision::Workload {
                device,
                arch: cfg.model.name,
                side: cfg.image.width.min(cfg.image.height) as i64,
            },
        )?;
        let ckpt = s.eval_checkpoint();
        let csv = format!("{}.csv", split.name());
        let (mut classes, mut rows, mut header) = (Vec::new(), Vec::new(), Vec::new());
        if dist.is_root() {
            (classes, rows) = read_inputs(s, split, &csv, &ckpt)?;
            header = classes.len().to_string().into_bytes();
        }
        dist.broadcast_bytes(0, &mut header);
        let k: usize = String::from_utf8_lossy(&header).parse().context("class count from rank 0")?;
        let pipelined = dist.size() >= 4;
        // Default: the node's cores shared among its ranks for the decode rank of the pipeline;
        // one thread when all stages share one process (its torch threads already take its cores).
        let decode_threads = match ec.decode_threads {
            0 if pipelined => dist.cores_per_rank(),
            0 => 1,
            n => n,
        };
        Ok(Job { s, split, threads, device, numerics, ckpt, csv, classes, rows, k, pipelined, decode_threads })
    }

    /// The model, on the ranks that predict (ranks 3.. of the pipeline, or rank 0 alone).
    fn predictor(&self, dist: &Dist) -> Result<Option<Predictor>> {
        let needs_model = if self.pipelined { dist.rank() >= 3 } else { dist.is_root() };
        if !needs_model {
            return Ok(None);
        }
        let arch = self.s.config.model.name;
        Predictor::load(&self.ckpt, arch, self.k, self.device, self.numerics.clone()).map(Some)
    }

    /// Rank 0's lines on how the evaluation runs. Not a collective.
    fn log_plan(&self, dist: &Dist) {
        if !dist.is_root() {
            return;
        }
        let (ckpt, images, csv, batch) =
            (self.ckpt.display(), self.rows.len(), &self.csv, self.s.config.evaluate.batch_size);
        let (decoders, threads) = (self.decode_threads, self.threads);
        if self.pipelined {
            info!(
                "evaluating {ckpt} on {images} images of {csv}: pipeline over {} ranks (read, decode with {decoders} \
                 thread(s), normalize, {} predictor(s)), batch {batch}",
                dist.size(),
                dist.size() - 3,
            );
        } else {
            info!(
                "evaluating {ckpt} on {images} images of {csv}: {} rank(s) < 4, so all stages run as threads of one \
                 process, batch {batch}, {threads} torch thread(s), {decoders} decode thread(s)",
                dist.size(),
            );
        }
        info!(
            "predictors compute in {} on {}",
            self.numerics.reason,
            if self.device.is_cuda() { "their node's GPUs (local rank mod GPU count)" } else { "the CPU" }
        );
    }

    /// This rank's stage(s) of the pipeline, from a barrier on: rank 0's outcome and wall time, and
    /// this rank's report.
    fn execute(&self, dist: &Dist, model: Option<&Predictor>) -> Result<(Option<(Outcome, f64)>, RankReport)> {
        let cfg = &self.s.config;
        let geometry = Geometry::from_config(&cfg.image);
        let timeline = cfg.timeline.path();
        let ctx = Ctx {
            root: self.s.data_dir(),
            geometry,
            on_bad: cfg.train.on_bad_image,
            csv: &self.csv,
            decode_threads: self.decode_threads,
            trace_batches: if timeline.is_some() { cfg.timeline.steps as u64 } else { 0 },
        };
        let mut predict = |b: pipeline::TensorBatch| match model {
            Some(m) => m.predict(&geometry, b),
            None => unreachable!("only predicting ranks get batches"),
        };
        dist.barrier();
        let t0 = Instant::now();
        let cpu0 = crate::infra::process::resource_usage().1;
        let every = cfg.train.log_interval();
        crate::infra::logging::progress_clock(if dist.is_root() { every } else { Duration::ZERO });
        let mut progress =
            crate::infra::logging::Progress::new("evaluate", "images", self.rows.len() as u64, dist.is_root(), every);
        crate::infra::timeline::set_recording(timeline.is_some());
        let (rows, batch) = (&self.rows, cfg.evaluate.batch_size);
        let (outcome, stats) = if self.pipelined {
            pipeline::mpi_pipeline(dist, &ctx, rows, batch, &mut predict, &mut progress)?
        } else if dist.is_root() {
            (Some(pipeline::local_pipeline(&ctx, rows, batch, &mut predict, &mut progress)?), Default::default())
        } else {
            (None, Default::default())
        };
        progress.finish();
        crate::infra::logging::progress_clock(Duration::ZERO);
        let wall = t0.elapsed().as_secs_f64();
        let (rss, cpu) = crate::infra::process::resource_usage();
        let mine = RankReport {
            stage: self.pipelined.then(|| Stage::of_rank(dist.rank())),
            stats,
            cpu_seconds: cpu - cpu0,
            peak_rss_mib: rss,
            process_cpu_seconds: cpu,
        };
        Ok((outcome.map(|o| (o, wall)), mine))
    }

    /// Every rank's report and timeline on rank 0 (None elsewhere), which writes the timeline.
    fn gather(&self, dist: &Dist, mine: &RankReport) -> Result<Option<Vec<RankReport>>> {
        let reports = dist.gather_bytes(0, serde_json::to_vec(mine)?);
        let cfg = &self.s.config;
        if let Some(path) = cfg.timeline.path() {
            if let Some(parts) = dist.gather_bytes(0, crate::infra::timeline::take(dist.rank())) {
                let window =
                    format!("the first {} batch(es) of {} images", cfg.timeline.steps, cfg.evaluate.batch_size);
                crate::infra::timeline::write(path, &parts, "evaluate", &window)?;
            }
        }
        let Some(reports) = reports else { return Ok(None) };
        Ok(Some(reports.iter().map(|b| serde_json::from_slice(b)).collect::<std::result::Result<_, _>>()?))
    }

    /// Rank 0: metrics, predictions and pictures.
    fn write_report(&self, outcome: Outcome, reports: &[RankReport], wall: f64, t_start: Instant) -> Result<()> {
        let run = report::Run {
            ranks: reports.len(),
            pipelined: self.pipelined,
            wall_seconds: wall,
            total_seconds: t_start.elapsed().as_secs_f64(),
            checkpoint: self.ckpt.clone(),
            batch_size: self.s.config.evaluate.batch_size,
            split: self.split,
        };
        report::write(self.s, &self.classes, &self.rows, outcome, reports, &run)
    }
}

/// Rank 0: the class list and the split's rows, checked against each other and the checkpoint;
/// prepares the timeline's file.
fn read_inputs(s: &Settings, split: EvalSplit, csv: &str, ckpt: &Path) -> Result<(Vec<data::Class>, Vec<data::Row>)> {
    let test_file = s.data_dir().join(csv);
    let classes = data::read_classes(&s.data_dir().join(data::CLASSES_FILE))?;
    if split == EvalSplit::Predict && !test_file.is_file() {
        bail!(
            "{} not found: --split predict needs an unlabeled set; set dataset.predict_source (e.g. Herbarium's \
             test/metadata.json) and run `sac create-dataset`",
            test_file.display()
        );
    }
    let rows = match split {
        EvalSplit::Test => data::read_rows(&test_file)?,
        EvalSplit::Predict => data::read_unlabeled_rows(&test_file)?,
    };
    if rows.is_empty() {
        bail!("{} has no rows", test_file.display());
    }
    data::check_labels(&rows, classes.len(), &test_file)?;
    check_checkpoint(ckpt, s.config.model.name, &classes)?;
    if let Some(path) = s.config.timeline.path() {
        crate::infra::timeline::prepare(path)?;
    }
    Ok((classes, rows))
}
