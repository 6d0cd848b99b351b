//! The MPI under test (common::mpi: MPICH by default, Open MPI in scripts/test.sh's Open MPI
//! stage): `sac mpi-check` sums exactly over it and names it, and sac logs what it found.
mod common;

use std::time::Duration;

use common::*;

#[test]
fn mpi_check_is_exact_over_4_ranks_and_names_the_library_under_test() {
    let dir = tempdir();
    let out = run_mpi(dir.path(), 4, &["mpi-check", "--reps", "1"], Duration::from_secs(180));
    assert_success(&out);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("4 rank(s)") && text.contains(": exact"), "{text}");
    let library = text.lines().find(|l| l.starts_with("MPI library: ")).unwrap_or_else(|| panic!("{text}"));
    let family = match mpi() {
        Mpi::Mpich => "MPICH",
        Mpi::OpenMpi => "Open MPI",
    };
    assert!(library.contains(family), "testing {family}, but sac found {library}");
    assert!(!text.contains('\0'), "a NUL in the output: {text:?}");
    assert!(text.contains("thread level: MPI_THREAD_MULTIPLE"), "the thread level MPI gave:\n{text}");
    // What carries the messages: MPICH's device from its version text; Open MPI's selected
    // point-to-point layer and its byte-transfer layers from the tool interface (MPI_T). On one
    // host with Debian's defaults Open MPI selects ob1 over self, shared memory (vader) and TCP.
    let transport = text.lines().find(|l| l.starts_with("MPI transport: ")).unwrap_or_else(|| panic!("{text}"));
    match mpi() {
        Mpi::Mpich => assert!(transport.contains("device ch4:"), "{transport}"),
        Mpi::OpenMpi => {
            let layers = transport.split(';').next().unwrap();
            assert!(
                layers.contains("pml ob1 over btl ") && layers.contains("self") && layers.contains("vader"),
                "{transport}"
            );
        }
    }
}

/// Trains 2 epochs on `ranks` ranks with `cmd` (a launcher and sac binary, or sac alone) into
/// `<dir>/<name>`; returns the per-epoch training losses and the checkpoint dir.
fn train_with(p: &Project, mut cmd: std::process::Command, name: &str) -> (Vec<f64>, std::path::PathBuf) {
    let set = format!("paths.checkpoint_dir={name}");
    let args = p.args(&["--epochs", "2", "--set", "train.batch_size=2", "--set", &set]);
    cmd.args(&args);
    let out = wait_with_timeout(spawn(&mut cmd, p.path()), &strs(&args), RUN_TIMEOUT);
    p.assert_no_rank_left();
    assert_success(&out);
    let dir = p.model_dir_in(name, "resnet18");
    let state = read_json(&dir.join("state.json"));
    let losses = state["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["train_loss"].as_f64().unwrap_or_else(|| panic!("no train_loss in {e}")))
        .collect();
    (losses, dir)
}

/// MPICH's own launcher and build (the reference of the test below, whatever MPI is under test).
fn mpich_command(ranks: usize) -> std::process::Command {
    let mut cmd = std::process::Command::new(mpich_launcher());
    cmd.args(["-n", &ranks.to_string(), env!("CARGO_BIN_EXE_sac")]);
    cmd
}

/// The MPI under test trains resnet18 at 1, 2 and 4 ranks to the loss curve and weights of the
/// MPICH build, up to the order in which a sum over ranks adds (the two libraries may pick other
/// reduction algorithms): against itself under MPICH, the build of scripts/test.sh's Open MPI stage
/// against the MPICH one there.
#[test]
fn the_mpi_under_test_trains_the_loss_curve_and_weights_of_mpich_at_1_2_and_4_ranks() {
    let p = Project::new(3, 24, 4, 32);
    for ranks in [1, 2, 4] {
        let tested = if ranks == 1 { std::process::Command::new(sac_bin()) } else { mpi_command(ranks) };
        let (got, got_dir) = train_with(&p, tested, &format!("tested-{ranks}"));
        let reference =
            if ranks == 1 { std::process::Command::new(env!("CARGO_BIN_EXE_sac")) } else { mpich_command(ranks) };
        let (want, want_dir) = train_with(&p, reference, &format!("mpich-{ranks}"));
        eprintln!("{ranks} rank(s): losses {got:?} (MPICH {want:?})");
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{ranks} rank(s): loss {g} against MPICH's {w}");
        }
        let cmp = compare_safetensors(&want_dir.join("model.safetensors"), &got_dir.join("model.safetensors"));
        assert!(cmp.bitwise || cmp.max_abs_diff <= 1e-4, "{ranks} rank(s): weights differ from MPICH's: {cmp:?}");
        eprintln!("{ranks} rank(s): weights bitwise equal: {}, max |diff| {:e}", cmp.bitwise, cmp.max_abs_diff);
    }
}
