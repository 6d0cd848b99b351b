//! The training recipe of torchvision's reference scripts, end to end: the keys of `[train]` that
//! choose the optimizer and the learning-rate schedule (and, as they land, label smoothing,
//! clipping, EMA, class-balanced sampling, augmentation and resizing), each shown working by a
//! real `sac train` on a tiny generated data dir, under `mpiexec` where the global batch matters.
mod common;

use common::*;

/// `(1 + cos(π x)) / 2`, the cosine schedule's factor at fraction `x` of its span.
fn half_cosine(x: f64) -> f64 {
    (1.0 + (std::f64::consts::PI * x).cos()) / 2.0
}

#[test]
fn sgd_nesterov_weight_decay_warmup_cosine_and_linear_scaling_run_as_configured() {
    // 24 images over 2 ranks with batch 2 per rank: 6 steps per epoch of a global batch of 4.
    let p = Project::new(2, 24, 0, 32);
    let keys = [
        "train.optimizer=sgd",
        "train.lr=1.6",
        "train.lr_scaling=linear",
        "train.momentum=0.9",
        "train.nesterov=true",
        "train.weight_decay=5e-4",
        "train.norm_weight_decay=0",
        "train.lr_schedule=cosine",
        "train.warmup_epochs=1",
        "train.warmup_decay=0.1",
    ];
    let mut args = vec!["--epochs", "3"];
    for k in &keys {
        args.extend(["--set", k]);
    }
    let out = p.train_mpi(2, &args);
    assert_success(&out);
    let err = stderr(&out);
    // lr 1.6 is for a global batch of 256: 1.6 × 4 / 256 = 0.025.
    assert!(
        err.contains("optimizer sgd (momentum 0.9, nesterov, weight decay 0.0005, 0 for batch norm and biases)")
            && err.contains("lr 2.5000e-2 cosine to 0.0000e0 at step 18, after 6 warmup steps from 2.5000e-3")
            && err.contains("6 steps per epoch of a global batch of 4"),
        "{err}"
    );
    let dir = p.model_dir_in("checkpoints", "resnet18");
    let state = read_json(&dir.join("state.json"));
    let lrs: Vec<f64> = (0..3).map(|e| state["history"][e]["lr"].as_f64().expect("lr per epoch")).collect();
    // The lr of each epoch's last step (t = 5, 11, 17): warmup to t = 6, then half a cosine over 12.
    let want = [0.025 * (0.1 + 0.9 * 5.0 / 6.0), 0.025 * half_cosine(5.0 / 12.0), 0.025 * half_cosine(11.0 / 12.0)];
    for (got, want) in lrs.iter().zip(want) {
        assert!((got - want).abs() < 1e-9, "lr per epoch {lrs:?}, expected {want}");
    }
    for e in 0..3 {
        let loss = state["history"][e]["train_loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{state}");
    }
    let meta = safetensors_metadata(&dir.join("optimizer.safetensors"));
    assert_eq!(meta["optimizer"], "sgd", "{meta:?}");
    assert_eq!(meta["step"], "18", "{meta:?}");
}

#[test]
fn label_smoothing_and_gradient_clipping_are_applied_and_reported() {
    // 8 images, batch 2, one process: 4 steps per epoch.
    let p = Project::new(2, 8, 0, 32);
    let set = ["--set", "train.label_smoothing=0.1", "--set", "train.clip_grad_norm=0.001"];
    let out = p.train(&set);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("label smoothing 0.1, gradient norm clipped at 0.001"), "{err}");
    // No gradient of a fresh resnet18 is as short as 0.001: every step is clipped.
    assert!(err.contains("epoch 1: the gradient norm was clipped to 0.001 in 4 of 4 steps"), "{err}");
    let out = p.train(&["--overwrite", "--set", "train.clip_grad_norm=1e9"]);
    assert_success(&out);
    assert!(stderr(&out).contains("clipped to 1000000000 in 0 of 4 steps"), "{}", stderr(&out));
}

#[test]
fn adamw_checkpoints_its_state_and_a_resume_with_another_optimizer_is_refused() {
    let p = Project::new(2, 8, 0, 32);
    let out = p.train(&["--set", "train.optimizer=adamw", "--set", "train.weight_decay=0.05"]);
    assert_success(&out);
    let dir = p.model_dir_in("checkpoints", "resnet18");
    let meta = safetensors_metadata(&dir.join("optimizer.safetensors"));
    assert_eq!(meta["optimizer"], "adamw", "{meta:?}");
    let out = p.train(&["--resume", "--epochs", "2", "--set", "train.optimizer=sgd"]);
    assert_fails_with(&out, &["optimizer.safetensors", "adamw", "sgd"]);
}

#[test]
fn recipe_keys_are_validated_naming_the_key() {
    let p = Project::new(2, 4, 0, 32);
    for (set, needle) in [
        ("train.nesterov=true", "train.nesterov"),
        ("train.momentum=1.0", "train.momentum"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.norm_weight_decay=2", "train.norm_weight_decay"),
        ("train.warmup_decay=0", "train.warmup_decay"),
        ("train.lr_gamma=1.5", "train.lr_gamma"),
        ("train.label_smoothing=1", "train.label_smoothing"),
        ("train.clip_grad_norm=-1", "train.clip_grad_norm"),
        ("train.ema_decay=1", "train.ema_decay"),
        ("train.sampler=balanced", "sampler"),
        ("augment.scale=[0.5, 0.2]", "augment.scale"),
        ("augment.ratio=[0, 1]", "augment.ratio"),
        ("augment.random_erase=1.5", "augment.random_erase"),
        ("augment.mixup_alpha=-1", "augment.mixup_alpha"),
        ("image.resize=crop", "resize"),
        ("train.lr_min=1", "train.lr_min"),
        ("train.lr_schedule=linear", "lr_schedule"),
        ("train.lr_scaling=sqrt", "lr_scaling"),
        ("train.optimizer=lamb", "optimizer"),
    ] {
        let out = p.train(&["--set", set]);
        assert_fails_with(&out, &[needle]);
        assert!(!p.model_dir_in("checkpoints", "resnet18").exists(), "{set}: nothing is written");
    }
}

/// Replaces every image of the project's data dir by a 48x32 one of the same colour that darkens
/// to the right and down: crops, flips and padding change such an image (not a solid square).
fn texture_images(p: &Project) {
    for rel in files_below(&p.data()) {
        let path = p.data().join(&rel);
        if path.extension().is_none_or(|e| e != "png") {
            continue;
        }
        let colour = image::open(&path).unwrap().to_rgb8().get_pixel(0, 0).0;
        let img = image::RgbImage::from_fn(48, 32, |x, y| {
            let f = 1.0 - (x + y) as f32 / 100.0;
            image::Rgb(colour.map(|c| (f32::from(c) * f) as u8))
        });
        img.save(&path).unwrap();
    }
}

#[test]
fn augmented_training_resumes_to_the_weights_of_an_uninterrupted_run() {
    // 48x32 images cached at short side 24 and cropped to 32x32, mirrored both ways, erased in
    // part, and every batch mixed up or cut and mixed.
    let p = Project::new(2, 12, 0, 32);
    texture_images(&p);
    let aug = [
        "--set",
        "augment.random_resized_crop=true",
        "--set",
        "augment.hflip=true",
        "--set",
        "augment.vflip=true",
        "--set",
        "image.cache_size=24",
        "--set",
        "augment.trivial_augment=true",
        "--set",
        "augment.random_erase=0.5",
        "--set",
        "augment.mixup_alpha=0.2",
        "--set",
        "augment.cutmix_alpha=1.0",
    ];
    fn with<'a>(extra: &[&'a str], aug: &[&'a str]) -> Vec<&'a str> {
        [extra, aug].concat()
    }
    let out = p.train_mpi(2, &with(&["--epochs", "2", "--set", "paths.checkpoint_dir=a"], &aug));
    assert_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains(
            "augmentation: random resized crop (scale 0.08-1, ratio 0.75-1.33) from images cached at short side 24, \
             horizontal flip, vertical flip, TrivialAugmentWide, random erasing (p 0.5)"
        ) && err.contains("batch mixing: mixup (alpha 0.2) or cutmix (alpha 1), one per batch"),
        "{err}"
    );
    assert_success(&p.train_mpi(2, &with(&["--epochs", "1", "--set", "paths.checkpoint_dir=b"], &aug)));
    assert_success(&p.train_mpi(2, &with(&["--resume", "--epochs", "2", "--set", "paths.checkpoint_dir=b"], &aug)));
    assert_success(&p.train_mpi(2, &["--epochs", "1", "--set", "paths.checkpoint_dir=plain"]));
    let (a, b) = (p.model_dir_in("a", "resnet18"), p.model_dir_in("b", "resnet18"));
    let cmp = compare_safetensors(&a.join("model.safetensors"), &b.join("model.safetensors"));
    assert!(cmp.bitwise || cmp.max_abs_diff <= 1e-6, "augmented run and its resume differ: {cmp:?}");
    let loss =
        |dir: &str| read_json(&p.model_dir_in(dir, "resnet18").join("state.json"))["history"][0]["train_loss"].clone();
    assert_eq!(loss("a"), loss("b"));
    assert_ne!(loss("a"), loss("plain"), "augmentation changes what the network sees");
}

#[test]
fn evaluation_resizes_by_stretching_centre_cropping_or_padding() {
    // 48x32 images into 32x32: each way gives other pixels, so another loss.
    let p = Project::new(2, 8, 6, 32);
    texture_images(&p);
    assert_success(&p.train(&["--set", "train.validate=true"]));
    let config = p.path().join("config.toml");
    let loss = |mode: &str| {
        let out_dir = format!("out-{mode}");
        let args = [
            "--config",
            config.to_str().unwrap(),
            "evaluate",
            "--set",
            &format!("image.resize={mode}"),
            "--set",
            &format!("paths.output_dir={out_dir}"),
        ];
        let out = run_sac_with_timeout(p.path(), &args, RUN_TIMEOUT);
        assert_success(&out);
        read_json(&p.path().join(&out_dir).join("metrics.json"))["loss"].as_f64().expect("loss")
    };
    let (stretch, crop, pad) = (loss("stretch"), loss("center_crop"), loss("pad"));
    assert!(
        (stretch - crop).abs() > 1e-6 && (stretch - pad).abs() > 1e-6 && (crop - pad).abs() > 1e-6,
        "losses: stretch {stretch}, centre crop {crop}, pad {pad}"
    );
    let out = p.train(&["--overwrite", "--set", "image.val_resize_size=16"]);
    assert_fails_with(&out, &["image.val_resize_size", "16"]);
}

#[test]
fn ema_weights_are_validated_saved_resumed_and_evaluated_with_ema() {
    let p = Project::new(2, 8, 6, 32);
    texture_images(&p);
    let ema = ["--set", "train.ema_decay=0.9", "--set", "train.validate=true"];
    let out = p.train(&[&["--epochs", "2"][..], &ema].concat());
    assert_success(&out);
    assert!(stderr(&out).contains("epoch 2/2: the moving average of the weights: top-1"), "{}", stderr(&out));
    let dir = p.model_dir_in("checkpoints", "resnet18");
    let state = read_json(&dir.join("state.json"));
    assert!(state["history"][1]["ema_top1"].as_f64().is_some(), "{state}");
    // In the epoch (and its manifest), published beside model.safetensors, with the decay.
    let manifest = std::fs::read_to_string(dir.join("epoch-0002/manifest.json")).unwrap();
    assert!(manifest.contains("model_ema.safetensors"), "{manifest}");
    let meta = safetensors_metadata(&dir.join("model_ema.safetensors"));
    assert_eq!((meta["ema_decay"].as_str(), meta["epoch"].as_str()), ("0.9", "2"));
    let fc = |file: &str| sac::checkpoint::read_safetensors(&dir.join(file)).unwrap().0["fc.weight"].shallow_clone();
    let diff = (fc("model.safetensors") - fc("model_ema.safetensors")).abs().max().double_value(&[]);
    assert!(diff > 1e-6, "the average is not the weights: max |difference| {diff}");

    // A resume continues the saved average (no "missing" warning).
    let out = p.train(&[&["--resume", "--epochs", "3"][..], &ema].concat());
    assert_success(&out);
    assert!(!stderr(&out).contains("moving average starts from the resumed weights"), "{}", stderr(&out));

    // evaluate --ema reads model_ema.safetensors; its loss is not the weights' loss.
    let config = p.path().join("config.toml");
    let eval = |extra: &[&str]| {
        let args = [&["--config", config.to_str().unwrap(), "evaluate"][..], extra].concat();
        run_sac_with_timeout(p.path(), &args, RUN_TIMEOUT)
    };
    let loss = |out_dir: &str| read_json(&p.path().join(out_dir).join("metrics.json"))["loss"].as_f64().unwrap();
    assert_success(&eval(&["--set", "paths.output_dir=plain"]));
    assert_success(&eval(&["--ema", "--set", "paths.output_dir=ema"]));
    assert!((loss("plain") - loss("ema")).abs() > 1e-6, "plain {} vs ema {}", loss("plain"), loss("ema"));
    let out = eval(&["--ema", "--checkpoint", "x.safetensors"]);
    assert_fails_with(&out, &["evaluate.ema", "--checkpoint"]);

    // A run without EMA publishes no EMA link, and evaluate --ema then says what to do.
    assert_success(&p.train(&["--overwrite", "--set", "train.validate=true"]));
    assert!(std::fs::symlink_metadata(dir.join("model_ema.safetensors")).is_err(), "no dangling EMA link");
    assert_fails_with(&eval(&["--ema"]), &["model_ema.safetensors", "train.ema_decay"]);
}

#[test]
fn class_balanced_sampling_draws_rare_classes_as_often_as_common_ones() {
    // 20 training images of 2 classes; train.csv keeps every image of class 0 and 2 of class 1.
    let p = Project::new(2, 20, 0, 32);
    let csv = p.data().join("train.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut ones = 0;
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, l)| {
            let label = l.split(',').nth(1).unwrap_or("");
            ones += usize::from(*i > 0 && label == "1");
            *i == 0 || label != "1" || ones <= 2
        })
        .map(|(_, l)| l)
        .collect();
    std::fs::write(&csv, kept.join("\n") + "\n").unwrap();
    let images = kept.len() - 1;
    let out = p.train_mpi(2, &["--set", "train.sampler=class_balanced"]);
    assert_success(&out);
    let half = images as f64 / 2.0;
    let want = format!(
        "sampler class_balanced: each epoch draws {images} images with replacement; expected draws of the rarest \
         class (2 images) {half:.1}, of the commonest ({} images) {half:.1}",
        images - 2
    );
    assert!(stderr(&out).contains(&want), "{want}\n{}", stderr(&out));
    let state = read_json(&p.model_dir_in("checkpoints", "resnet18").join("state.json"));
    assert_eq!(u64_of(&state, "epoch"), 1, "{state}");
}
