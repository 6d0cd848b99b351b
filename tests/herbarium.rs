//! A Herbarium-shaped data set at small scale, from the project's generator (bench/herbarium_gen.py):
//! thousands of classes with sparse category ids and unicode names, long-tailed sizes, and an
//! unlabeled test set. Through create-dataset (a half sample, stratified, with `predict_source`),
//! train (2 ranks, a decode-cache budget, the loader thread), evaluate (sparse metrics against a
//! brute-force computation from the written predictions) and `evaluate --split predict`.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::*;

const CLASSES: usize = 3_000;
const TRAIN_IMAGES: usize = 10_000;
const TEST_IMAGES: usize = 600;
/// 32×32 RGB: the bytes of one cached image.
const IMAGE_BYTES: u64 = 32 * 32 * 3;
const CACHE_BUDGET: u64 = 200 * 1024;

/// Runs the generator into `out`: `classes`, `train` and `test` images of 32×32.
fn generate(out: &Path, classes: usize, train: usize, test: usize) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/herbarium_gen.py");
    let child = std::process::Command::new(venv_python())
        .arg(&script)
        .arg(out)
        .args(["--classes", &classes.to_string(), "--images", &train.to_string()])
        .args(["--test-images", &test.to_string(), "--size", "32x32", "--workers", "2", "--seed", "4"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running bench/herbarium_gen.py with the venv's python");
    let out = wait_with_timeout(child, &["herbarium_gen.py"], Duration::from_secs(300));
    assert_success(&out);
}

/// macro-F1 (scikit-learn's: over the classes that occur as a label or a prediction) and top-1 of
/// `(true, predicted)` category ids, the textbook way.
fn brute_force(pairs: &[(i64, i64)]) -> (f64, f64, BTreeMap<i64, (u64, u64)>) {
    let classes: BTreeSet<i64> = pairs.iter().flat_map(|&(y, p)| [y, p]).collect();
    let mut f1_sum = 0.0;
    let mut counts = BTreeMap::new();
    for &c in &classes {
        let tp = pairs.iter().filter(|&&(y, p)| y == c && p == c).count() as f64;
        let support = pairs.iter().filter(|&&(y, _)| y == c).count();
        let predicted = pairs.iter().filter(|&&(_, p)| p == c).count();
        let precision = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
        let recall = if support > 0 { tp / support as f64 } else { 0.0 };
        if precision + recall > 0.0 {
            f1_sum += 2.0 * precision * recall / (precision + recall);
        }
        counts.insert(c, (support as u64, predicted as u64));
    }
    let top1 = pairs.iter().filter(|(y, p)| y == p).count() as f64 / pairs.len() as f64;
    (f1_sum / classes.len() as f64, top1, counts)
}

#[test]
fn a_herbarium_shaped_set_goes_through_create_dataset_train_evaluate_and_predict() {
    let dir = tempdir();
    let root = dir.path();
    let gen = root.join("herbarium");
    generate(&gen, CLASSES, TRAIN_IMAGES, TEST_IMAGES);
    let meta = read_json(&gen.join("train/metadata.json"));
    let test_meta = read_json(&gen.join("test/metadata.json"));
    assert!(test_meta.get("annotations").is_none(), "the generated test set is unlabeled");
    let names: HashMap<i64, &str> = meta["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_i64().unwrap(), c["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names.len(), CLASSES);

    write_config(
        root,
        &format!(
            "[paths]\ndata_dir = \"data\"\ncheckpoint_dir = \"checkpoints\"\noutput_dir = \"output\"\n\
             log_file = \"sac.log\"\n\n[dataset]\nformat = \"coco\"\nsource = {:?}\npredict_source = {:?}\n\
             sample = 0.5\nstratify = true\ntest_fraction = 0.2\nseed = 1\nplace = \"hardlink\"\n\n\
             [image]\nwidth = 32\nheight = 32\n\n[train]\nepochs = 1\nbatch_size = 32\nthreads = 1\n\
             cache = \"{} KiB\"\nprefetch = 2\n\n[evaluate]\nbatch_size = 16\ndecode_threads = 2\n",
            gen.join("train").to_str().unwrap(),
            gen.join("test/metadata.json").to_str().unwrap(),
            CACHE_BUDGET / 1024
        ),
    );

    // create-dataset: train/test split with small classes kept in train; predict.csv unlabeled.
    let out = create_dataset(root, &[]);
    assert_success(&out);
    let log = stderr(&out);
    assert!(log.contains("stay whole in train"), "the log counts the classes kept in train:\n{log}");
    let data = root.join("data");
    let record = read_json(&data.join("dataset.json"));
    assert!(record["train_only_classes"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(record["predict"], TEST_IMAGES);
    let (train, test, classes) =
        (read_csv(&data.join("train.csv")), read_csv(&data.join("test.csv")), read_csv(&data.join("classes.csv")));
    let mut per_class: HashMap<i64, (usize, usize)> = HashMap::new();
    for c in train.column_i64("category_id") {
        per_class.entry(c).or_default().0 += 1;
    }
    for c in test.column_i64("category_id") {
        per_class.entry(c).or_default().1 += 1;
    }
    for (c, (n_train, n_test)) in &per_class {
        if *n_test > 0 {
            assert!(*n_train >= 1 && n_train + n_test >= 3, "category {c}: {n_train} train, {n_test} test");
        }
    }
    // Labels: the sampled classes only, in ascending (sparse) category id, with the source's names.
    let cats = classes.column_i64("category_id");
    assert_eq!(cats.len(), per_class.len());
    assert!(cats.len() < CLASSES, "a half sample leaves some classes out");
    assert!(cats.windows(2).all(|w| w[0] < w[1]));
    for (cat, name) in cats.iter().zip(classes.column("name")) {
        assert_eq!(names[cat], name, "category {cat}");
    }
    let predict = read_csv(&data.join("predict.csv"));
    assert_eq!(predict.len(), TEST_IMAGES);
    assert!(predict.column("label").iter().chain(&predict.column("category_id")).all(|v| v.is_empty()));
    let want_ids: BTreeSet<i64> =
        test_meta["images"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert_eq!(predict.column_i64("image_id").into_iter().collect::<BTreeSet<_>>(), want_ids);
    for p in predict.column("path") {
        assert!(p.starts_with("img/predict/images/") && data.join(p).is_file(), "{p}");
    }

    // train: 2 ranks, the decode cache within its budget.
    let config = root.join("config.toml");
    let config = config.to_str().unwrap();
    let out = run_mpi(root, 2, &["--config", config, "train"], Duration::from_secs(600));
    assert_success(&out);
    let log = stderr(&out);
    let line = log.lines().find(|l| l.contains("decode cache (200.0 KiB per rank)")).unwrap_or_else(|| {
        panic!("no decode cache line in the log:\n{log}");
    });
    let held: u64 = line
        .split("this rank holds ")
        .nth(1)
        .and_then(|rest| rest.split(" (").nth(1))
        .and_then(|n| n.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the held image count from {line:?}"));
    assert!(held > 0 && held * IMAGE_BYTES <= CACHE_BUDGET, "{held} images cached of a {CACHE_BUDGET} B budget");
    assert!(held * IMAGE_BYTES > CACHE_BUDGET / 2, "the budget is used: {line}");

    // evaluate on test.csv: the metrics equal the brute-force ones from the written predictions.
    let out = run_mpi(root, 4, &["--config", config, "evaluate"], Duration::from_secs(300));
    assert_success(&out);
    let outdir = root.join("output");
    let predictions = read_csv(&outdir.join("predictions.csv"));
    let predicted: HashMap<i64, i64> =
        predictions.column_i64("Id").into_iter().zip(predictions.column_i64("Predicted")).collect();
    let pairs: Vec<(i64, i64)> = test
        .column_i64("image_id")
        .iter()
        .zip(test.column_i64("category_id"))
        .map(|(id, y)| (y, predicted[id]))
        .collect();
    let (macro_f1, top1, counts) = brute_force(&pairs);
    let m = read_json(&outdir.join("metrics.json"));
    assert!((m["macro_f1"].as_f64().unwrap() - macro_f1).abs() < 1e-9, "macro-F1 {} vs {macro_f1}", m["macro_f1"]);
    assert!((m["top1"].as_f64().unwrap() - top1).abs() < 1e-9);
    let pc = read_csv(&outdir.join("per_class.csv"));
    assert_eq!(pc.len(), counts.len(), "one per_class.csv row per class that occurs");
    for ((cat, support), predicted) in
        pc.column_i64("category_id").iter().zip(pc.column_i64("support")).zip(pc.column_i64("predicted"))
    {
        assert_eq!(counts[cat], (support as u64, predicted as u64), "category {cat}");
    }
    assert!(outdir.join("confusion.png").is_file());

    // evaluate --split predict: the unlabeled set's ids, classes.csv's category ids, nothing else.
    let out = run_mpi(root, 4, &["--config", config, "evaluate", "--split", "predict"], Duration::from_secs(300));
    assert_success(&out);
    let sub = read_csv(&outdir.join("predict/predictions.csv"));
    assert_eq!(sub.len(), TEST_IMAGES);
    assert_eq!(sub.column_i64("Id").into_iter().collect::<BTreeSet<_>>(), want_ids);
    let known: BTreeSet<i64> = cats.iter().copied().collect();
    assert!(sub.column_i64("Predicted").iter().all(|c| known.contains(c)));
    assert_eq!(files_below(&outdir.join("predict")), ["predictions.csv"]);

    // An unreadable image of the predict set (one process this time): the submission lacks it,
    // skipped.csv names it, and the log warns.
    let (bad_id, bad_path) = (predict.column_i64("image_id")[17], predict.column("path")[17].to_string());
    std::fs::remove_file(data.join(&bad_path)).unwrap();
    std::fs::write(data.join(&bad_path), b"\xff\xd8\xff truncated").unwrap();
    let out = run_sac(root, &["--config", config, "evaluate", "--split", "predict"]);
    assert_success(&out);
    assert!(stderr(&out).contains("predictions.csv lacks 1 unreadable image(s)"), "{}", stderr(&out));
    let sub = read_csv(&outdir.join("predict/predictions.csv"));
    assert_eq!(sub.len(), TEST_IMAGES - 1);
    assert!(!sub.column_i64("Id").contains(&bad_id));
    let skipped = read_csv(&outdir.join("predict/skipped.csv"));
    assert_eq!((skipped.column_i64("Id"), skipped.column("path")), (vec![bad_id], vec![bad_path.as_str()]));
}

#[test]
fn predict_split_without_predict_csv_says_how_to_make_one() {
    let p = Project::new(3, 6, 3, 32);
    let config = p.path().join("config.toml");
    let out = run_sac(p.path(), &["--config", config.to_str().unwrap(), "evaluate", "--split", "predict"]);
    assert_fails_with(&out, &["predict.csv not found", "dataset.predict_source"]);
}

/// configs/herbarium2021.toml, copied as it is into a project whose directory holds the Kaggle
/// download's layout (`herbarium-2021-fgvc8/{train,test}/`), reads both sets without an edit.
#[test]
fn the_herbarium_config_reads_the_kaggle_layout_unchanged() {
    let dir = tempdir();
    let root = dir.path();
    generate(&root.join("herbarium-2021-fgvc8"), 100, 400, 30);
    std::fs::create_dir(root.join("configs")).unwrap();
    let config = root.join("configs/herbarium2021.toml");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/herbarium2021.toml"), &config).unwrap();
    let out = run_sac(root, &["--config", config.to_str().unwrap(), "create-dataset", "--sample", "1.0"]);
    assert_success(&out);
    let data = root.join("herbarium-data");
    assert_eq!(read_csv(&data.join("classes.csv")).len(), 100);
    assert_eq!(read_csv(&data.join("train.csv")).len() + read_csv(&data.join("test.csv")).len(), 400);
    assert_eq!(read_csv(&data.join("predict.csv")).len(), 30);
}
