//! `train.precision` and `evaluate.precision` end to end on the CPU: bf16 autocast trains to
//! finite losses close to f32's over the same steps, `"auto"` decides from the CPU's flags
//! (injected here through `SAC_CPU_FLAGS`, so the test holds on any CPU) and says why, the choice
//! is recorded per epoch in `state.json`, and evaluation in bf16 agrees with f32.
mod common;

use common::*;
use serde_json::Value;

fn losses(state: &Value) -> Vec<f64> {
    state["history"].as_array().expect("history").iter().map(|e| e["train_loss"].as_f64().expect("loss")).collect()
}

#[test]
fn bf16_autocast_trains_to_finite_losses_close_to_f32s() {
    // 3 classes of coloured squares, 2 ranks, 3 epochs of 6 steps from the same seed.
    let p = Project::new(3, 36, 12, 32);
    let mut runs = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = p.train_mpi(
            2,
            &[
                "--epochs",
                "3",
                "--set",
                &format!("paths.checkpoint_dir=ck-{precision}"),
                "--set",
                "train.batch_size=3",
                "--set",
                &format!("train.precision=\"{precision}\""),
                "--set",
                "train.validate=true",
            ],
        );
        assert_success(&out);
        let err = stderr(&out);
        let state = read_json(&p.model_dir_in(&format!("ck-{precision}"), "resnet18").join("state.json"));
        for e in state["history"].as_array().unwrap() {
            assert_eq!(e["precision"], precision, "{e}");
            assert_eq!(e["device"], "cpu", "{e}");
        }
        if precision == "bf16" {
            assert!(err.contains("bf16 autocast (train.precision = \"bf16\")"), "{err}");
        }
        runs.push(losses(&state));
    }
    let (f32s, bf16s) = (&runs[0], &runs[1]);
    eprintln!("train loss per epoch: f32 {f32s:?}, bf16 {bf16s:?}");
    for (a, b) in f32s.iter().zip(bf16s) {
        assert!(a.is_finite() && b.is_finite() && *b > 0.0, "f32 {f32s:?}, bf16 {bf16s:?}");
        // The same steps on the same images: bfloat16's 8 significant bits move the loss a little.
        assert!((a - b).abs() <= 0.05 + 0.25 * a, "f32 {f32s:?}, bf16 {bf16s:?}");
    }
    assert!(bf16s[2] < bf16s[0], "bf16 training loss falls: {bf16s:?}");

    // Evaluation of the bf16-trained weights in f32 and in bf16 predicts alike.
    let mut predictions = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = run_sac(
            p.path(),
            &[
                "--config",
                p.path().join("config.toml").to_str().unwrap(),
                "evaluate",
                "--checkpoint",
                p.model_dir_in("ck-bf16", "resnet18").join("model.safetensors").to_str().unwrap(),
                "--set",
                &format!("paths.output_dir=out-{precision}"),
                "--set",
                &format!("evaluate.precision=\"{precision}\""),
            ],
        );
        assert_success(&out);
        if precision == "bf16" {
            assert!(stderr(&out).contains("predictors compute in bf16 autocast (evaluate.precision = \"bf16\")"));
        }
        let csv = read_csv(&p.path().join(format!("out-{precision}/predictions.csv")));
        predictions.push(csv.column("Predicted").iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }
    let agree = predictions[0].iter().zip(&predictions[1]).filter(|(a, b)| a == b).count();
    assert!(agree * 10 >= predictions[0].len() * 9, "bf16 agrees with f32 on {agree} of {}", predictions[0].len());
}

#[test]
fn auto_takes_bf16_where_the_cpu_has_it_and_f32_elsewhere_and_says_why() {
    let p = Project::new(2, 6, 0, 32);
    let config = p.path().join("config.toml");
    for (flags, want, why) in [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", "bf16", "bf16 autocast (train.precision = \"auto\": the CPU has avx512_bf16)"),
        ("fpu sse2 avx2 amx_bf16 amx_tile", "bf16", "the CPU has amx_bf16"),
        (
            "fpu sse2 avx2 fma",
            "f32",
            "f32 (train.precision = \"auto\": the CPU has neither avx512_bf16 nor amx_bf16; emulated bfloat16 would be slower)",
        ),
    ] {
        let ck = format!("ck-{}", flags.len());
        let args = [
            "--config",
            config.to_str().unwrap(),
            "train",
            "--set",
            &format!("paths.checkpoint_dir={ck}"),
            "--set",
            "train.precision=\"auto\"",
        ];
        let out = run_mpi_env(p.path(), 1, &args, &[("SAC_CPU_FLAGS", flags)], RUN_TIMEOUT);
        assert_success(&out);
        let err = stderr(&out);
        assert!(err.contains(why), "flags {flags:?}: {err}");
        let state = read_json(&p.model_dir_in(&ck, "resnet18").join("state.json"));
        assert_eq!(state["history"][0]["precision"], want, "{state}");
        // The key as written stays in the recorded config; the history says what it meant.
        assert_eq!(state["config"]["train"]["precision"], "auto", "{state}");
    }
}

#[test]
fn an_unknown_precision_is_refused_naming_the_key() {
    let p = Project::new(2, 4, 0, 32);
    let out = p.train(&["--set", "train.precision=\"fp16\""]);
    assert_fails_with(&out, &["train.precision", "fp16"]);
    assert!(!p.model_dir("resnet18").exists(), "nothing written");
}

#[test]
fn resume_keeps_the_runs_bf16_unless_told_otherwise_and_is_exact() {
    // Run a trains 2 epochs in bf16; run b trains 1 in bf16 and resumes for the second with
    // `--resume` alone (the config file says f32): it goes on in bf16 and ends with a's weights.
    let p = Project::new(2, 12, 0, 32);
    let bf16 = "train.precision=\"bf16\"";
    assert_success(&p.train_mpi(2, &["--epochs", "2", "--set", "paths.checkpoint_dir=a", "--set", bf16]));
    assert_success(&p.train_mpi(2, &["--epochs", "1", "--set", "paths.checkpoint_dir=b", "--set", bf16]));
    let out = p.train_mpi(2, &["--resume", "--epochs", "2", "--set", "paths.checkpoint_dir=b"]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("resuming in bf16 autocast (kept from epoch 1, the run being resumed"), "{err}");
    let (a, b) = (p.model_dir_in("a", "resnet18"), p.model_dir_in("b", "resnet18"));
    let (sa, sb) = (read_json(&a.join("state.json")), read_json(&b.join("state.json")));
    assert_eq!(sb["history"][1]["precision"], "bf16", "{sb}");
    assert_eq!(sa["history"][1]["train_loss"], sb["history"][1]["train_loss"], "epoch 2's training loss");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let cmp = compare_safetensors(&a.join(file), &b.join(file));
        eprintln!("{file}: uninterrupted vs resumed, bf16: {cmp:?}");
        assert!(cmp.bitwise, "{file} differs after resuming in bf16: {cmp:?}");
    }
    // Told otherwise: this command line sets the key, and epoch 3 computes in f32.
    let out = p.train_mpi(
        2,
        &["--resume", "--epochs", "3", "--set", "paths.checkpoint_dir=b", "--set", "train.precision=\"f32\""],
    );
    assert_success(&out);
    assert!(!stderr(&out).contains("kept from epoch"), "{}", stderr(&out));
    let sb = read_json(&b.join("state.json"));
    assert_eq!((&sb["history"][1]["precision"], &sb["history"][2]["precision"]), (&"bf16".into(), &"f32".into()));
}
