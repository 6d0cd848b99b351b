//! The command line. clap types stay here: the library works on `config::Settings`.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Arch, DeviceKind, EvalSplit, Sample};

/// Train and evaluate CNN image classifiers with libtorch, in parallel over MPI.
///
/// One TOML file (`--config`, default ./config.toml) holds every setting; the flags below override
/// the ones users change most, and `--set section.key=value` overrides any other.
///
/// Typical session:
///   sac create-dataset --sample 0.1      # sample + split the source into data/
///   mpiexec -n 4 sac train               # data-parallel training, checkpoints/<model>/
///   mpiexec -n 4 sac evaluate            # pipelined inference, output/
#[derive(Debug, Parser)]
#[command(name = "sac", version, about, long_about, propagate_version = true, verbatim_doc_comment)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The config file. Relative paths inside it are resolved against its directory.
    #[arg(long, short = 'c', global = true, default_value = "config.toml", value_name = "PATH")]
    pub config: PathBuf,

    /// Override any config key, e.g. `--set train.lr=1e-3` or `--set image.width=32`.
    /// May be given many times. The value is read as TOML (a bare word is taken as a string).
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,

    /// More log output (-v: debug, -vv: trace). `RUST_LOG` works too.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(long, short = 'q', global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a source data set, draw a seeded sample, split it into train/test and write the data dir.
    ///
    /// Sources ([dataset] format): "coco" reads an FGVC/COCO metadata.json (Herbarium, iNaturalist);
    /// "folder" reads one sub-directory per class; "idx" reads MNIST-style IDX files (gzip or plain).
    /// Writes <data_dir>/{train,test,classes}.csv and the images under <data_dir>/img/{train,test}/.
    /// The data dir is built beside the target and renamed into place only when complete.
    CreateDataset(CreateDatasetArgs),
    /// Train the configured CNN, data-parallel over the MPI ranks (`mpiexec -n N sac train`).
    ///
    /// Rank 0 reads train.csv and scatters the file list; gradients are averaged with fused
    /// allreduces; rank 0 writes checkpoints/<model>/ after every epoch.
    Train(TrainArgs),
    /// Evaluate a checkpoint on test.csv with the MPI pipeline (`mpiexec -n 4 sac evaluate`).
    ///
    /// Rank 0 reads files, rank 1 decodes and resizes (with evaluate.decode_threads threads),
    /// rank 2 normalizes, ranks 3.. predict. With fewer than 4 ranks the same stages run in one
    /// process. Writes output/ {predictions.csv, metrics.json, per_class.csv, confusion.png};
    /// with `--split predict`, output/predict/predictions.csv for the unlabeled predict.csv.
    Evaluate(EvaluateArgs),
    /// Check the MPI set-up: gradient averaging is exact, and how long a gradient exchange takes.
    ///
    /// Run it as the job would run: `mpiexec -n 4 sac mpi-check`. Needs no config file or data.
    /// Exits non-zero if the averaged gradient differs from the single-process one.
    MpiCheck(MpiCheckArgs),
}

#[derive(Debug, Args)]
pub struct MpiCheckArgs {
    /// Images in the test batch, shared unevenly when it does not divide by the rank count.
    #[arg(long, default_value_t = 7)]
    pub batch: usize,
    /// Architecture whose gradients are exchanged in the timing.
    #[arg(long, short = 'm', value_enum, default_value_t = Arch::Resnet18)]
    pub model: Arch,
    /// Classes of the model's head in the timing (64500: Herbarium 2021, whose resnet18 head has
    /// 33 M parameters, three times the body).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub classes: i64,
    /// Timed exchanges of each kind (0: skip the timing).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Where the models and their gradients live: cuda puts each rank on GPU local rank mod GPU
    /// count, as `train.device = "cuda"` does (the sums still pass through host memory).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

#[derive(Debug, Args)]
pub struct CreateDatasetArgs {
    /// How much of the source to take: a fraction in (0, 1] such as 0.1, or a count such as 5000.
    /// A number with a decimal point is a fraction, a whole number a count ([dataset] sample).
    #[arg(long, value_name = "FRACTION|COUNT", allow_negative_numbers = true)]
    pub sample: Option<Sample>,
    /// Seed of the sample and of the train/test split ([dataset] seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The source data set: a metadata.json, its directory, an image folder or an IDX directory.
    #[arg(long, value_name = "PATH")]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The architecture ([model] name).
    #[arg(long, short = 'm', value_enum)]
    pub model: Option<Arch>,
    /// Number of epochs to train in all, counting epochs already done when resuming.
    #[arg(long, short = 'e')]
    pub epochs: Option<u32>,
    /// Continue from the newest complete checkpoint in checkpoints/<model>/ (a damaged newest
    /// one falls back to the one before it).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start afresh even though checkpoints/<model>/ holds a checkpoint: its epochs are deleted
    /// once the first new epoch is saved. Without --resume or --overwrite, train refuses to start.
    #[arg(long)]
    pub overwrite: bool,
    /// Write a Chrome trace / Perfetto timeline of every rank to FILE ([timeline] file): spans
    /// for loading, forward+backward, each allreduce bucket, optimizer, validation and checkpoint
    /// over the last [timeline] steps of the first epoch. Open it at https://ui.perfetto.dev or
    /// render it with scripts/timeline_png.py.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The checkpoint to evaluate ([evaluate] checkpoint); default
    /// <checkpoint_dir>/<model>/model.safetensors.
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// The architecture of the checkpoint ([model] name).
    #[arg(long, short = 'm', value_enum)]
    pub model: Option<Arch>,
    /// The split to run on: `test` scores test.csv; `predict` predicts the unlabeled predict.csv
    /// (written by create-dataset from dataset.predict_source) into <output_dir>/predict/predictions.csv
    /// (`Id,Predicted`: image id, category id; the Kaggle submission format).
    #[arg(long, value_enum, default_value_t = EvalSplit::Test)]
    pub split: EvalSplit,
    /// Evaluate the exponential moving average of the weights ([evaluate] ema):
    /// <checkpoint_dir>/<model>/model_ema.safetensors, kept when training with train.ema_decay > 0.
    #[arg(long)]
    pub ema: bool,
    /// Write a Chrome trace / Perfetto timeline of every rank's pipeline stage to FILE
    /// ([timeline] file): read, decode, normalize, predict and the waits between them, for the
    /// first [timeline] steps batches.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
}
