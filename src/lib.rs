//! sac: train and evaluate CNN image classifiers with libtorch (tch), data-parallel over MPI.
//!
//! `run` is the whole program behind the thin `main`: it starts MPI (or a one-rank world), loads the
//! settings, installs logging and dispatches to the subcommand. An error on any rank is logged with
//! its rank and ends the whole job (MPI_Abort), so no rank is left waiting in a collective.
pub mod bf16;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dataset;
pub mod evaluate;
pub mod infra;
pub mod jpeg;
pub mod models;
pub mod mpicheck;
pub mod plot;
pub mod precision;
pub mod record;
pub mod switch;
pub mod train;

// The infrastructure's modules by their short names too (`sac::logging`, as tests and benches use them).
pub use infra::{dist, fault, files, logging, process, timeline};

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::config::{FlagOverrides, Settings};
use crate::infra::dist::Dist;

pub fn run(cli: Cli) -> ExitCode {
    dist::install_panic_hook();
    let dist = match Dist::init() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut logging = false;
    // A panic with more than one rank ends the job in the hook (MPI_Abort); with one, it is
    // reported here like any other error.
    let mut panicked = false;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(&dist, cli, &mut logging)))
        .unwrap_or_else(|_| {
            panicked = true;
            Err(anyhow::anyhow!(dist::take_panic_message().unwrap_or_else(|| "a panic without a message".into())))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Every rank agreed to stop at the same step: leave without MPI_Abort.
        Err(err) if err.is::<train::Interrupted>() => {
            eprintln!("{err}");
            crate::infra::dist::set_exit_code(crate::infra::dist::EXIT_STOPPED);
            ExitCode::from(crate::infra::dist::EXIT_STOPPED as u8)
        }
        Err(err) => {
            let mut msg = format!("{err}");
            for cause in err.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            if logging {
                tracing::error!("{msg}");
            } else if dist.size() > 1 {
                eprintln!("error [rank {}]: {msg}", dist.rank());
            } else {
                eprintln!("error: {msg}");
            }
            // A panic (libtorch out of memory, a bug) is never a configuration error: 101, as the
            // panic hook's abort with more than one rank.
            let code = if panicked { 101 } else { crate::infra::process::failure_code() };
            if dist.size() > 1 {
                // The other ranks may be inside a collective: end them all.
                dist.abort(code);
            }
            ExitCode::from(code as u8)
        }
    }
}

fn dispatch(dist: &Dist, cli: Cli, logging: &mut bool) -> Result<()> {
    if let Command::MpiCheck(a) = &cli.command {
        logging::init(dist.rank(), dist.size(), cli.global.verbose, cli.global.quiet, None)?;
        *logging = true;
        return mpicheck::run(dist, a.batch, a.model, a.classes, a.reps, a.device);
    }
    let flags = match &cli.command {
        Command::CreateDataset(a) => {
            FlagOverrides { sample: a.sample, seed: a.seed, source: a.source.clone(), ..Default::default() }
        }
        Command::Train(a) => {
            FlagOverrides { model: a.model, epochs: a.epochs, timeline: a.timeline.clone(), ..Default::default() }
        }
        Command::Evaluate(a) => FlagOverrides {
            model: a.model,
            checkpoint: a.checkpoint.clone(),
            timeline: a.timeline.clone(),
            ema: a.ema,
            ..Default::default()
        },
        Command::MpiCheck(_) => unreachable!("handled above"),
    };
    let settings = Settings::load(&cli.global.config, &cli.global.overrides, &flags)?;
    logging::init(
        dist.rank(),
        dist.size(),
        cli.global.verbose,
        cli.global.quiet,
        Some(&settings.config.paths.log_file),
    )?;
    *logging = true;
    if dist.threading.is_some_and(|t| t < mpi::environment::Threading::Funneled) {
        tracing::warn!(
            "the MPI library gives less than MPI_THREAD_FUNNELED (sac asks for MPI_THREAD_MULTIPLE, for the exchange's \
             progress thread)"
        );
    }
    let (warn, abort) = settings.config.train.stall_limits();
    dist.set_stall_limits(dist::StallLimits { warn, abort });
    match cli.command {
        Command::CreateDataset(_) => {
            if dist.size() > 1 {
                anyhow::bail!("create-dataset runs on one rank: start it without mpiexec");
            }
            crate::infra::process::work_under_way();
            dataset::create(&settings)
        }
        Command::Train(a) => train::run(dist, &settings, train::Mode { resume: a.resume, overwrite: a.overwrite }),
        Command::Evaluate(a) => evaluate::run(dist, &settings, a.split),
        Command::MpiCheck(_) => unreachable!("handled above"),
    }
}
