//! `sac`: parse the command line, run, print the whole error chain, exit non-zero on failure.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sac::cli::Cli::parse();
    sac::run(cli)
}
