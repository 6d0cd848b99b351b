//! `sac create-dataset`, end to end: the real binary on generated COCO, image-folder and IDX sources
//! (and on Fashion-MNIST when it is installed), the files it writes, and how it refuses bad input
//! without leaving a data dir or a temp dir behind.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

const SPLIT_HEADER: [&str; 4] = ["path", "label", "category_id", "image_id"];
const CLASSES_HEADER: [&str; 4] = ["label", "category_id", "name", "count"];

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// train.csv, test.csv and classes.csv of `data`, with their headers checked.
fn read_outputs(data: &Path) -> (Csv, Csv, Csv) {
    let train = read_csv(&data.join("train.csv"));
    let test = read_csv(&data.join("test.csv"));
    let classes = read_csv(&data.join("classes.csv"));
    assert_eq!(train.header, SPLIT_HEADER);
    assert_eq!(test.header, SPLIT_HEADER);
    assert_eq!(classes.header, CLASSES_HEADER);
    (train, test, classes)
}

/// Checks that hold for every data dir: labels are 0..K-1 in ascending category-id order and agree
/// between the three CSVs, counts add up, no image is in both splits, every path is under
/// `img/<split>/` and names an existing file, and dataset.json records the numbers.
fn check_consistent(data: &Path, train: &Csv, test: &Csv, classes: &Csv) {
    let labels = classes.column_i64("label");
    let cats = classes.column_i64("category_id");
    assert_eq!(labels, (0..labels.len() as i64).collect::<Vec<_>>(), "labels are 0..K-1");
    assert!(cats.windows(2).all(|w| w[0] < w[1]), "classes.csv in ascending category_id order: {cats:?}");
    let label_of: BTreeMap<i64, i64> = cats.iter().copied().zip(labels.iter().copied()).collect();

    let mut counted: BTreeMap<i64, i64> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (split, csv) in [("train", train), ("test", test)] {
        assert!(!csv.is_empty(), "{split}.csv has no rows");
        let paths = csv.column("path");
        let rows_labels = csv.column_i64("label");
        let rows_cats = csv.column_i64("category_id");
        let rows_ids = csv.column_i64("image_id");
        for i in 0..csv.len() {
            assert_eq!(
                Some(&rows_labels[i]),
                label_of.get(&rows_cats[i]),
                "{split}.csv row {i}: label does not match classes.csv"
            );
            *counted.entry(rows_cats[i]).or_default() += 1;
            assert!(ids.insert(rows_ids[i]), "image id {} is listed twice", rows_ids[i]);
            assert!(paths[i].starts_with(&format!("img/{split}/")), "{split}.csv path {:?}", paths[i]);
            assert!(data.join(paths[i]).exists(), "{} is listed but missing", paths[i]);
        }
    }
    let counts: BTreeMap<i64, i64> = cats.iter().copied().zip(classes.column_i64("count")).collect();
    assert_eq!(counts, counted, "classes.csv counts match the rows of train.csv + test.csv");

    let record: serde_json::Value = serde_json::from_slice(&fs::read(data.join("dataset.json")).expect("dataset.json"))
        .expect("dataset.json is JSON");
    assert_eq!(record["train"], train.len());
    assert_eq!(record["test"], test.len());
    assert_eq!(record["classes"], classes.len());
}

fn dataset_json(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(data.join("dataset.json")).unwrap()).unwrap()
}

/// A COCO fixture in `dir/src` and a config reading it.
fn coco_setup(dir: &Path, extra_dataset: &str) -> CocoFixture {
    let fx = coco_tree(&dir.join("src"));
    write_config(dir, &config_text("coco", "src", extra_dataset));
    fx
}

/// An IDX fixture in `dir/src` (`n_train` + `n_test` images, 3 cycling classes) and a config.
fn idx_setup(dir: &Path, gz: bool, n_train: usize, n_test: usize, extra_dataset: &str) -> Vec<u8> {
    let labels = write_idx(&dir.join("src"), gz, &cycling_labels(n_train, 3), &cycling_labels(n_test, 3));
    write_config(dir, &config_text("idx", "src", extra_dataset));
    labels
}

// ------------------------------------------------------------------------------------------------
// Happy paths
// ------------------------------------------------------------------------------------------------

#[test]
fn coco_source_gives_csvs_with_labels_in_category_id_order_and_decodable_images() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &[]);
    assert_success(&out);
    assert!(stderr(&out).contains("no annotation"), "the unannotated image is warned about:\n{}", stderr(&out));

    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    // 12 annotated images, test_fraction 0.2: round(2.4) = 2 test images.
    assert_eq!((train.len(), test.len()), (10, 2));
    assert_eq!(classes.column_i64("category_id"), [10, 20, 30]);
    assert_eq!(classes.column("name"), ["Acer", "Betula", "Carex"]);
    assert_eq!(classes.column_i64("count"), [4, 4, 4]);

    let mut seen = BTreeSet::new();
    for (split, csv) in [("train", &train), ("test", &test)] {
        let cats = csv.column_i64("category_id");
        for (i, (path, id)) in csv.column("path").into_iter().zip(csv.column_i64("image_id")).enumerate() {
            let (cat, file_name) = fx.images.get(&id).unwrap_or_else(|| panic!("image id {id} is not annotated"));
            assert_eq!(cats[i], *cat, "image {id} has the category of its annotation");
            assert_eq!(path, format!("img/{split}/{file_name}"));
            let img = image::open(data.join(path)).unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
            assert_eq!((img.width(), img.height()), (COCO_W, COCO_H), "{path}");
            // The pixels are those of the category's image (JPEG is lossy: compare the mean).
            let mean = mean_colour(&img.to_rgb8());
            let want = fx.colour_of(*cat);
            for c in 0..3 {
                assert!(
                    (mean[c] - want[c] as f64).abs() < 25.0,
                    "{path}: mean colour {mean:?}, category colour {want:?}"
                );
            }
            seen.insert(id);
        }
    }
    assert_eq!(seen, fx.images.keys().copied().collect(), "every annotated image, and only those");
    assert!(!seen.contains(&COCO_UNANNOTATED_ID));
    assert!(files_below(&data).iter().all(|f| !f.contains("none/")), "the unannotated image was not placed");
    // Copies by default: regular files, not links to the source.
    let first = data.join(train.column("path")[0]);
    assert!(fs::symlink_metadata(&first).unwrap().file_type().is_file());
    assert_eq!(fs::metadata(&first).unwrap().nlink(), 1);

    let record = dataset_json(&data);
    assert_eq!(record["format"], "coco");
    assert_eq!(record["source_images"], 12);
    assert_eq!(temp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn coco_source_may_name_the_metadata_file_itself() {
    let dir = tempdir();
    coco_tree(&dir.path().join("src"));
    write_config(dir.path(), &config_text("coco", "src/metadata.json", ""));
    assert_success(&create_dataset(dir.path(), &[]));
    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    assert_eq!(train.len() + test.len(), 12);
}

#[test]
fn folder_source_numbers_classes_in_sorted_name_order() {
    let dir = tempdir();
    let files = image_folder(&dir.path().join("src"));
    write_config(dir.path(), &config_text("folder", "src", ""));
    assert_success(&create_dataset(dir.path(), &[]));

    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    assert_eq!((train.len(), test.len()), (10, 2));
    assert_eq!(classes.column("name"), FOLDER_CLASSES);
    assert_eq!(classes.column_i64("category_id"), [0, 1, 2]);
    assert_eq!(classes.column_i64("count"), [4, 4, 4]);

    let mut listed = Vec::new();
    for (split, csv) in [("train", &train), ("test", &test)] {
        for (path, cat) in csv.column("path").into_iter().zip(csv.column_i64("category_id")) {
            let rel = path.strip_prefix(&format!("img/{split}/")).expect("under img/<split>/");
            let class = rel.split('/').next().unwrap();
            assert_eq!(FOLDER_CLASSES[cat as usize], class, "{path} has the category of its directory");
            image::open(data.join(path)).unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
            listed.push(rel.to_string());
        }
    }
    listed.sort();
    let want: Vec<String> = files.values().flatten().cloned().collect();
    assert_eq!(listed, want, "every image file and nothing else (no notes.txt, no hidden dir)");
}

#[test]
fn idx_source_writes_every_pooled_image_as_a_png_of_its_pixels() {
    let dir = tempdir();
    let labels = idx_setup(dir.path(), false, 10, 5, "");
    assert_success(&create_dataset(dir.path(), &[]));

    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    // 15 pooled images, test_fraction 0.2: 3 test images.
    assert_eq!((train.len(), test.len()), (12, 3));
    assert_eq!(classes.column_i64("category_id"), [0, 1, 2]);
    // Labels cycle 0, 1, 2 within each file: train 4+3+3, t10k 2+2+1.
    assert_eq!(classes.column_i64("count"), [6, 5, 4]);
    let mut ids = Vec::new();
    for (split, csv) in [("train", &train), ("test", &test)] {
        let cats = csv.column_i64("category_id");
        for (i, (path, id)) in csv.column("path").into_iter().zip(csv.column_i64("image_id")).enumerate() {
            assert_eq!(cats[i], labels[id as usize] as i64, "image {id} has its IDX label");
            assert_eq!(path, format!("img/{split}/{}/{id}.png", cats[i]));
            let img = image::open(data.join(path)).unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
            let img = img.as_luma8().unwrap_or_else(|| panic!("{path} is not 8-bit grey"));
            assert_eq!(img.dimensions(), (IDX_SIDE, IDX_SIDE));
            assert_eq!(img.as_raw(), &idx_pixels(id as usize), "{path} holds the pixels of pooled image {id}");
            ids.push(id);
        }
    }
    ids.sort();
    assert_eq!(ids, (0..15).collect::<Vec<_>>(), "train and t10k are pooled, train first");
}

#[test]
fn idx_gzip_and_plain_sources_give_identical_data_dirs() {
    let plain = tempdir();
    let gz = tempdir();
    idx_setup(plain.path(), false, 10, 5, "");
    idx_setup(gz.path(), true, 10, 5, "");
    assert!(gz.path().join("src/train-images-idx3-ubyte.gz").is_file());
    assert_success(&create_dataset(plain.path(), &[]));
    assert_success(&create_dataset(gz.path(), &[]));
    let (a, b) = (plain.path().join("data"), gz.path().join("data"));
    let (train, test, classes) = read_outputs(&b);
    check_consistent(&b, &train, &test, &classes);
    for f in ["train.csv", "test.csv", "classes.csv"] {
        assert_eq!(fs::read(a.join(f)).unwrap(), fs::read(b.join(f)).unwrap(), "{f}");
    }
    let files = files_below(&a);
    assert_eq!(files, files_below(&b));
    for f in files.iter().filter(|f| f.ends_with(".png")) {
        assert_eq!(fs::read(a.join(f)).unwrap(), fs::read(b.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn stratified_split_holds_out_the_same_share_of_every_class() {
    let dir = tempdir();
    // Unbalanced: 20 images of class 0, 10 of class 1, 5 of class 2; 0.2 of each is 4, 2, 1.
    let labels: Vec<u8> = [vec![0; 20], vec![1; 10], vec![2; 5]].concat();
    write_idx(&dir.path().join("src"), false, &labels, &[]);
    write_config(dir.path(), &config_text("idx", "src", ""));
    let out = run_sac(dir.path(), &["--set", "dataset.stratify=true", "create-dataset", "--seed", "3"]);
    assert_success(&out);
    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    let mut per_class = BTreeMap::new();
    for c in test.column_i64("category_id") {
        *per_class.entry(c).or_insert(0) += 1;
    }
    assert_eq!(per_class, BTreeMap::from([(0, 4), (1, 2), (2, 1)]), "test images per class");
    assert_eq!(train.len(), 28);
    assert_eq!(dataset_json(&data)["stratify"], true);
}

#[test]
fn place_hardlink_links_the_source_files() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    assert_success(&create_dataset(dir.path(), &["--set", "dataset.place=hardlink"]));
    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    for csv in [&train, &test] {
        for (path, id) in csv.column("path").into_iter().zip(csv.column_i64("image_id")) {
            let placed = fs::symlink_metadata(data.join(path)).unwrap();
            let source = fs::metadata(fx.root.join(&fx.images[&id].1)).unwrap();
            assert!(placed.file_type().is_file(), "{path} is a regular file");
            assert_eq!((placed.dev(), placed.ino()), (source.dev(), source.ino()), "{path} is the source's inode");
            assert!(placed.nlink() >= 2);
        }
    }
    assert_eq!(dataset_json(&data)["place"], "hardlink");
}

#[test]
fn place_symlink_links_to_the_absolute_source_path() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "place = \"symlink\"\n");
    assert_success(&create_dataset(dir.path(), &[]));
    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    for csv in [&train, &test] {
        for (path, id) in csv.column("path").into_iter().zip(csv.column_i64("image_id")) {
            let placed = data.join(path);
            assert!(fs::symlink_metadata(&placed).unwrap().file_type().is_symlink(), "{path} is a symlink");
            let target = fs::read_link(&placed).unwrap();
            assert!(target.is_absolute(), "{path} -> {}: the link survives moving the data dir", target.display());
            assert_eq!(fs::canonicalize(&target).unwrap(), fs::canonicalize(fx.root.join(&fx.images[&id].1)).unwrap());
            image::open(&placed).unwrap_or_else(|e| panic!("{path} does not decode through the link: {e}"));
        }
    }
}

#[test]
fn relative_paths_resolve_against_the_config_directory_and_source_flag_against_the_cwd() {
    let dir = tempdir();
    let proj = dir.path().join("proj");
    let work = dir.path().join("work");
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&proj).unwrap();
    write_idx(&work.join("idx"), false, &cycling_labels(10, 2), &[]);
    // The config's own source does not exist: the flag must win.
    write_config(&proj, &config_text("idx", "nowhere", ""));
    let out = run_sac(&work, &["--config", "../proj/config.toml", "create-dataset", "--source", "idx"]);
    assert_success(&out);
    assert!(proj.join("data/train.csv").is_file(), "data_dir is relative to the config file");
    assert!(proj.join("sac.log").is_file(), "log_file is relative to the config file");
    assert!(!work.join("data").exists());
    let record = dataset_json(&proj.join("data"));
    assert_eq!(record["source"], work.join("idx").to_str().unwrap());
}

#[test]
fn sample_count_takes_that_many_images() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 40, 10, "");
    assert_success(&create_dataset(dir.path(), &["--sample", "20"]));
    let (train, test, _) = read_outputs(&dir.path().join("data"));
    assert_eq!((train.len(), test.len()), (16, 4));
    assert_eq!(dataset_json(&dir.path().join("data"))["sample"], "20");
}

// ------------------------------------------------------------------------------------------------
// Fashion-MNIST
// ------------------------------------------------------------------------------------------------

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn fashion_mnist_tenth_gives_5600_train_and_1400_test_decodable_images() {
    if !Path::new(FASHION_MNIST).is_dir() {
        eprintln!("note: {FASHION_MNIST} is missing (Debian package dataset-fashion-mnist): test skipped");
        return;
    }
    let dir = tempdir();
    write_config(dir.path(), &config_text("idx", FASHION_MNIST, ""));
    let out = create_dataset(dir.path(), &["--sample", "0.1", "--seed", "0"]);
    assert_success(&out);
    let data = dir.path().join("data");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    assert_eq!((train.len(), test.len()), (5_600, 1_400));
    assert_eq!(classes.len(), 10);
    assert_eq!(classes.column_i64("category_id"), (0..10).collect::<Vec<_>>());
    assert_eq!(classes.column("name")[0], "T-shirt/top");
    assert_eq!(classes.column("name")[9], "Ankle boot");
    assert_eq!(classes.column_i64("count").iter().sum::<i64>(), 7_000);
    assert_eq!(dataset_json(&data)["source_images"], 70_000);
    for csv in [&train, &test] {
        for path in csv.column("path") {
            let img = image::open(data.join(path)).unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
            assert_eq!((img.width(), img.height()), (28, 28), "{path}");
        }
    }
    let pngs = files_below(&data.join("img")).len();
    assert_eq!(pngs, 7_000, "exactly the listed images are under img/");
}

// ------------------------------------------------------------------------------------------------
// Determinism
// ------------------------------------------------------------------------------------------------

#[test]
fn same_seed_gives_byte_identical_csvs_and_another_seed_another_split() {
    let (a, b, c) = (tempdir(), tempdir(), tempdir());
    for d in [&a, &b, &c] {
        idx_setup(d.path(), false, 80, 20, "");
    }
    assert_success(&create_dataset(a.path(), &["--sample", "0.5", "--seed", "7"]));
    assert_success(&create_dataset(b.path(), &["--sample", "0.5", "--seed", "7"]));
    assert_success(&create_dataset(c.path(), &["--sample", "0.5", "--seed", "8"]));
    let read = |d: &tempfile::TempDir, f: &str| fs::read(d.path().join("data").join(f)).unwrap();
    for f in ["train.csv", "test.csv", "classes.csv"] {
        assert_eq!(read(&a, f), read(&b, f), "{f} differs between two runs with seed 7");
    }
    assert_eq!(files_below(&a.path().join("data/img")), files_below(&b.path().join("data/img")));
    assert_ne!(read(&a, "train.csv"), read(&c, "train.csv"), "seeds 7 and 8 drew the same train.csv");
    assert_eq!(dataset_json(&c.path().join("data"))["seed"], 8);
}

// ------------------------------------------------------------------------------------------------
// An existing data dir
// ------------------------------------------------------------------------------------------------

#[test]
fn rerun_replaces_a_data_dir_written_by_sac() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 40, 10, "");
    assert_success(&create_dataset(dir.path(), &["--seed", "1"]));
    let data = dir.path().join("data");
    fs::write(data.join("stale.txt"), "from an earlier run").unwrap();
    let first = fs::read(data.join("train.csv")).unwrap();

    let out = create_dataset(dir.path(), &["--seed", "2", "--sample", "30"]);
    assert_success(&out);
    assert!(!data.join("stale.txt").exists(), "the old data dir was replaced, not merged into");
    let (train, test, classes) = read_outputs(&data);
    check_consistent(&data, &train, &test, &classes);
    assert_eq!(train.len() + test.len(), 30);
    assert_ne!(fs::read(data.join("train.csv")).unwrap(), first);
    let on_disk = files_below(&data.join("img")).len();
    assert_eq!(on_disk, 30, "no image of the first run is left under img/");
    assert_eq!(dataset_json(&data)["seed"], 2);
    assert_eq!(temp_leftovers(dir.path()), Vec::<String>::new(), "no temp or .old dir is left");
}

#[test]
fn empty_existing_data_dir_is_filled() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 10, 0, "");
    fs::create_dir(dir.path().join("data")).unwrap();
    assert_success(&create_dataset(dir.path(), &[]));
    assert!(dir.path().join("data/dataset.json").is_file());
    assert_eq!(temp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn existing_data_dir_not_written_by_sac_is_refused_and_left_untouched() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 10, 5, "");
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("thesis.tex"), "irreplaceable").unwrap();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[data.to_str().unwrap(), "not written by", "dataset.json"]);
    assert_eq!(files_below(&data), ["thesis.tex"]);
    assert_eq!(fs::read_to_string(data.join("thesis.tex")).unwrap(), "irreplaceable");
    assert_eq!(temp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn failed_rerun_leaves_the_previous_data_dir_unchanged() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    assert_success(&create_dataset(dir.path(), &[]));
    let data = dir.path().join("data");
    let before: Vec<(String, Vec<u8>)> =
        files_below(&data).into_iter().map(|f| (f.clone(), fs::read(data.join(&f)).unwrap())).collect();
    // Remove one annotated source image: the second run must fail before touching data/.
    let (_, victim) = fx.images.values().next().unwrap();
    fs::remove_file(fx.root.join(victim)).unwrap();
    let out = create_dataset(dir.path(), &["--seed", "5"]);
    assert_fails_with(&out, &["missing on disk", victim.as_str()]);
    let after: Vec<(String, Vec<u8>)> =
        files_below(&data).into_iter().map(|f| (f.clone(), fs::read(data.join(&f)).unwrap())).collect();
    assert_eq!(before, after, "the previous data dir is unchanged");
    assert_eq!(temp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn sigterm_while_placing_images_leaves_no_data_dir_and_no_temp_dir() {
    // SIGTERM is what Slurm and PBS send at the walltime and on scancel/qdel.
    let dir = tempdir();
    // 30,000 images take several seconds to write as PNGs: long enough to be interrupted.
    write_idx(&dir.path().join("src"), false, &cycling_labels(30_000, 3), &[]);
    write_config(dir.path(), &config_text("idx", "src", ""));
    let args = ["-q", "--config", "config.toml", "create-dataset"];
    let child = spawn_sac(dir.path(), &args);
    // Wait until images are being placed in the temp dir.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let placing = temp_leftovers(dir.path()).iter().any(|t| dir.path().join(t).join("img").is_dir());
        if placing {
            break;
        }
        assert!(!dir.path().join("data").exists(), "sac finished before it could be interrupted: use a bigger source");
        assert!(std::time::Instant::now() < deadline, "sac never started placing images");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let out = wait_with_timeout(child, &args, TIMEOUT);
    assert!(!out.status.success(), "sac succeeded although it was interrupted");
    assert_no_data_dir(dir.path());
}

// ------------------------------------------------------------------------------------------------
// Bad input: each names the file or key and the problem, and leaves no data dir and no temp dir
// ------------------------------------------------------------------------------------------------

#[test]
fn missing_metadata_json_is_named() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("src/images")).unwrap();
    write_config(dir.path(), &config_text("coco", "src", ""));
    let out = create_dataset(dir.path(), &[]);
    let meta = dir.path().join("src/metadata.json");
    assert_fails_with(&out, &[meta.to_str().unwrap(), "cannot open", "No such file"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn malformed_metadata_json_is_reported_with_line_and_column() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    fs::write(fx.metadata_path(), "{\n  \"images\": [\n    {\"id\": 1, \"file_name\": \"a.jpg\"},,\n  ]\n}\n").unwrap();
    let out = create_dataset(dir.path(), &[]);
    let err = assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "line", "column"]);
    assert!(err.contains("line 3"), "the error points at line 3:\n{err}");
    assert_no_data_dir(dir.path());
}

#[test]
fn metadata_of_the_wrong_shape_is_named() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    fs::write(fx.metadata_path(), r#"{"images": [{"id": "one", "file_name": "a.jpg"}]}"#).unwrap();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "not valid FGVC/COCO metadata", "line 1"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn annotation_of_an_unknown_image_id_is_refused() {
    let dir = tempdir();
    let mut fx = coco_setup(dir.path(), "");
    fx.metadata["annotations"].as_array_mut().unwrap().push(serde_json::json!({"image_id": 777, "category_id": 10}));
    fx.save();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "image id 777", "not in `images`"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn annotation_of_an_unknown_category_is_refused() {
    let dir = tempdir();
    let mut fx = coco_setup(dir.path(), "");
    fx.metadata["annotations"][0]["category_id"] = 55.into();
    fx.save();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "category id 55", "not in `categories`"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn image_listed_but_missing_on_disk_is_refused() {
    let dir = tempdir();
    let fx = coco_setup(dir.path(), "");
    let (_, name) = &fx.images[&105];
    fs::remove_file(fx.root.join(name)).unwrap();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &["missing on disk", name.as_str()]);
    assert_no_data_dir(dir.path());
}

#[test]
fn absolute_file_name_is_refused() {
    let dir = tempdir();
    let mut fx = coco_setup(dir.path(), "");
    let abs = fx.root.join("images/10/101.jpg");
    fx.metadata["images"][0]["file_name"] = abs.to_str().unwrap().into();
    fx.save();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "image 101", "absolute paths are not allowed"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn file_name_escaping_with_dotdot_is_refused() {
    let dir = tempdir();
    let mut fx = coco_setup(dir.path(), "");
    // The file exists, so only the check can stop it.
    write_jpeg(&dir.path().join("outside.jpg"), 4, 4, [9, 9, 9]);
    fx.metadata["images"][2]["file_name"] = "images/../../outside.jpg".into();
    fx.save();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[fx.metadata_path().to_str().unwrap(), "images/../../outside.jpg", "`..`"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn sample_that_selects_no_image_is_refused() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--sample", "0.0001"]);
    assert_fails_with(&out, &["the sample is empty", "0.0001", "12 images", "--sample"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn sample_too_small_to_split_is_refused() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--sample", "2"]);
    assert_fails_with(&out, &["sample of 2 images", "test_fraction 0.2", "test split empty"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn sample_fraction_above_one_is_refused() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--sample", "1.5"]);
    assert_fails_with(&out, &["--sample", "1.5", "(0, 1]"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn sample_fraction_of_zero_is_refused() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--sample", "0.0"]);
    assert_fails_with(&out, &["--sample", "(0, 1]"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn negative_sample_fraction_is_refused() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--sample=-0.5"]);
    assert_fails_with(&out, &["--sample", "-0.5", "(0, 1]"]);
    assert_no_data_dir(dir.path());
    // Without `=` too: the value is read as a (bad) number, not as a flag.
    let out = create_dataset(dir.path(), &["--sample", "-0.5"]);
    assert_fails_with(&out, &["--sample", "-0.5", "(0, 1]"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn sample_out_of_range_in_the_config_file_names_the_key_and_file() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let config = dir.path().join("config.toml");
    let text = fs::read_to_string(&config).unwrap().replace("sample = 1.0", "sample = 1.5");
    fs::write(&config, text).unwrap();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[config.to_str().unwrap(), "sample", "(0, 1]"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn idx_with_a_bad_magic_number_is_refused() {
    let dir = tempdir();
    idx_setup(dir.path(), true, 10, 5, "");
    let path = dir.path().join("src/t10k-images-idx3-ubyte.gz");
    let mut bytes = idx_images_bytes(IDX_SIDE, IDX_SIDE, &(0..5).map(idx_pixels).collect::<Vec<_>>());
    bytes[2] = 0x09; // 0x00000903
    write_maybe_gz(&path, &bytes);
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[path.to_str().unwrap(), "bad magic number", "0x00000903"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn idx_with_mismatched_image_and_label_counts_is_refused() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 10, 5, "");
    let labels = dir.path().join("src/train-labels-idx1-ubyte");
    write_maybe_gz(&labels, &idx_labels_bytes(&cycling_labels(9, 3)));
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &["mismatched counts", "10 images", "9 labels", labels.to_str().unwrap()]);
    assert_no_data_dir(dir.path());
}

#[test]
fn idx_truncated_image_file_is_refused() {
    let dir = tempdir();
    idx_setup(dir.path(), false, 10, 5, "");
    let images = dir.path().join("src/train-images-idx3-ubyte");
    let mut bytes = fs::read(&images).unwrap();
    bytes.truncate(bytes.len() - 1);
    fs::write(&images, bytes).unwrap();
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[images.to_str().unwrap(), "header says 10 images"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn idx_directory_without_idx_files_is_refused() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("src")).unwrap();
    write_config(dir.path(), &config_text("idx", "src", ""));
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[dir.path().join("src").to_str().unwrap(), "holds no IDX files"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn empty_image_folder_is_refused() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("src")).unwrap();
    write_config(dir.path(), &config_text("folder", "src", ""));
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[dir.path().join("src").to_str().unwrap(), "no class sub-directories"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn image_folder_whose_class_dirs_hold_no_images_is_refused() {
    let dir = tempdir();
    for class in ["a", "b"] {
        fs::create_dir_all(dir.path().join("src").join(class)).unwrap();
        fs::write(dir.path().join("src").join(class).join("readme.txt"), "text").unwrap();
    }
    write_config(dir.path(), &config_text("folder", "src", ""));
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[dir.path().join("src").to_str().unwrap(), "holds no images"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn missing_source_directory_is_named() {
    let dir = tempdir();
    write_config(dir.path(), &config_text("folder", "no-such-dir", ""));
    let out = create_dataset(dir.path(), &[]);
    assert_fails_with(&out, &[dir.path().join("no-such-dir").to_str().unwrap(), "dataset.source"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn unknown_config_key_is_named_with_the_file() {
    let dir = tempdir();
    coco_setup(dir.path(), "sampel = 0.5\n");
    let out = create_dataset(dir.path(), &[]);
    let config = dir.path().join("config.toml");
    assert_fails_with(&out, &["sampel", config.to_str().unwrap(), "line 9"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn set_with_an_unknown_key_is_named() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--set", "dataset.sampel=0.5"]);
    assert_fails_with(&out, &["--set dataset.sampel=0.5", "unknown key `sampel`", "sample"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn set_with_a_bad_value_names_the_key() {
    let dir = tempdir();
    coco_setup(dir.path(), "");
    let out = create_dataset(dir.path(), &["--set", "dataset.place=teleport"]);
    assert_fails_with(&out, &["dataset.place", "teleport"]);
    assert_no_data_dir(dir.path());
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempdir();
    let out = run_sac(dir.path(), &["create-dataset"]);
    assert_fails_with(&out, &["config.toml", "--config"]);
    assert_no_data_dir(dir.path());
}
