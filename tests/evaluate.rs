//! `sac evaluate`, end to end: the real binary, in one process and under `mpiexec` (the pipeline of
//! read, decode, normalize and predict ranks), on tiny generated data dirs. The checkpoints are a
//! resnet18 trained for one epoch by `sac train` (shared by the tests, trained once) and checkpoints
//! derived from it whose predictions are known in advance (every weight zero, so the logits are the
//! classifier's bias), which lets the metrics be checked against values worked out by hand.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// Every run of `sac` here is killed (and the test failed) after this.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A job that must be refused or must fail ends well within this, or some rank was left waiting.
const QUICK_FAILURE: Duration = Duration::from_secs(30);

/// The fixture's classes: (category id, name, base colour). Category ids differ from labels (and are
/// not contiguous), so a label written where a category id belongs shows.
const CLASSES: [(i64, &str, [u8; 3]); 6] = [
    (11, "alder", [200, 20, 20]),
    (23, "birch", [20, 200, 20]),
    (37, "cedar", [20, 20, 200]),
    (42, "dogwood", [200, 200, 20]),
    (58, "elm", [200, 20, 200]),
    (64, "fir", [20, 200, 200]),
];

/// Image ids of test rows start here (train rows start at 1).
const FIRST_TEST_ID: i64 = 5001;

const CONFIG: &str = r#"[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
output_dir = "output"
log_file = "sac.log"

[image]
width = 32
height = 32

[train]
epochs = 1
batch_size = 16
threads = 1
validate = false

[evaluate]
batch_size = 4
"#;

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

/// One row of the fixture's test.csv.
#[derive(Debug, Clone)]
struct TestRow {
    path: String,
    label: usize,
    category_id: i64,
    image_id: i64,
}

/// A temp dir with `config.toml` ([`CONFIG`]) and `data/` holding the first `classes` of
/// [`CLASSES`]: real PNGs (24x20, so evaluate resizes them) of a colour per class with a pattern per
/// image, train.csv, test.csv and classes.csv.
struct Fixture {
    tmp: tempfile::TempDir,
    test: Vec<TestRow>,
}

fn write_image(path: &Path, label: usize, seed: usize) {
    let base = CLASSES[label].2;
    let img = image::RgbImage::from_fn(24, 20, |x, y| {
        let v = ((x as usize * 7 + y as usize * 13 + seed * 29) % 48) as u8;
        image::Rgb(base.map(|c| c.saturating_add(v)))
    });
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).expect("encoding a PNG");
}

fn write_lines(path: &Path, header: &str, lines: &[String]) {
    let mut text = format!("{header}\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Fixture {
    /// `train_per_class` training images per class; one test image per entry of `test_labels`, in
    /// that order.
    fn new(classes: usize, train_per_class: usize, test_labels: &[usize]) -> Fixture {
        assert!(classes <= CLASSES.len());
        let tmp = tempfile::tempdir().expect("creating a temp dir");
        let data = tmp.path().join("data");
        let mut count = vec![0usize; classes];
        let mut train = Vec::new();
        let mut id = 1;
        for _ in 0..train_per_class {
            for (label, &(cat, _, _)) in CLASSES[..classes].iter().enumerate() {
                let path = format!("img/train/{cat}/{id}.png");
                write_image(&data.join(&path), label, 1000 + id as usize);
                train.push(format!("{path},{label},{cat},{id}"));
                count[label] += 1;
                id += 1;
            }
        }
        let mut test = Vec::new();
        for (j, &label) in test_labels.iter().enumerate() {
            let cat = CLASSES[label].0;
            let image_id = FIRST_TEST_ID + j as i64;
            let path = format!("img/test/{cat}/{image_id}.png");
            write_image(&data.join(&path), label, j);
            count[label] += 1;
            test.push(TestRow { path, label, category_id: cat, image_id });
        }
        write_lines(&data.join("train.csv"), "path,label,category_id,image_id", &train);
        let fx = Fixture { tmp, test };
        fx.write_test_csv(true);
        let class_lines: Vec<String> = CLASSES[..classes]
            .iter()
            .enumerate()
            .map(|(label, (cat, name, _))| format!("{label},{cat},{name},{}", count[label]))
            .collect();
        write_lines(&data.join("classes.csv"), "label,category_id,name,count", &class_lines);
        fs::write(fx.dir().join("config.toml"), CONFIG).unwrap();
        fx
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// Rewrites test.csv: with labels (`path,label,category_id,image_id`) or without them, as
    /// Herbarium's test metadata comes (`path,image_id`).
    fn write_test_csv(&self, labeled: bool) {
        let (header, lines): (&str, Vec<String>) = if labeled {
            (
                "path,label,category_id,image_id",
                self.test.iter().map(|r| format!("{},{},{},{}", r.path, r.label, r.category_id, r.image_id)).collect(),
            )
        } else {
            ("path,image_id", self.test.iter().map(|r| format!("{},{}", r.path, r.image_id)).collect())
        };
        write_lines(&self.data().join("test.csv"), header, &lines);
    }

    fn test_ids(&self) -> Vec<i64> {
        self.test.iter().map(|r| r.image_id).collect()
    }

    /// `sac --config config.toml evaluate extra…` in the fixture dir: plain (one process) when
    /// `ranks` is 1, else under `mpiexec -n ranks`. Returns the output and how long it took.
    fn evaluate(&self, ranks: usize, extra: &[&str]) -> (Output, Duration) {
        self.evaluate_env(ranks, extra, &[])
    }

    /// `evaluate` with extra environment variables for every rank.
    fn evaluate_env(&self, ranks: usize, extra: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
        let config = self.dir().join("config.toml");
        let mut args = vec!["--config", config.to_str().expect("utf-8 temp path"), "evaluate"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let out = if ranks == 1 {
            run_sac_with_timeout(self.dir(), &args, RUN_TIMEOUT)
        } else {
            run_mpi_env(self.dir(), ranks, &args, env, RUN_TIMEOUT)
        };
        (out, t.elapsed())
    }

    /// Evaluates `checkpoint` on `ranks` ranks into `<dir>/<out>/`, which must succeed.
    fn evaluate_ok(&self, ranks: usize, checkpoint: &Path, out: &str, extra: &[&str]) -> Outputs {
        self.evaluate_ok_env(ranks, checkpoint, out, extra, &[])
    }

    fn evaluate_ok_env(
        &self,
        ranks: usize,
        checkpoint: &Path,
        out: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Outputs {
        let set_out = format!("paths.output_dir={out}");
        let mut args = vec!["--checkpoint", checkpoint.to_str().unwrap(), "--set", &set_out];
        args.extend_from_slice(extra);
        let (output, _) = self.evaluate_env(ranks, &args, env);
        assert_success(&output);
        Outputs {
            dir: self.dir().join(out),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: stderr(&output),
        }
    }
}

/// Labels 0, 1, …, classes-1, 0, 1, … (`n` of them): every class in the stream, mixed.
fn cycling(n: usize, classes: usize) -> Vec<usize> {
    (0..n).map(|i| i % classes).collect()
}

/// What one successful evaluate run left behind.
struct Outputs {
    dir: PathBuf,
    stdout: String,
    stderr: String,
}

impl Outputs {
    fn predictions_bytes(&self) -> Vec<u8> {
        fs::read(self.dir.join("predictions.csv")).expect("predictions.csv")
    }

    fn predictions(&self) -> Csv {
        let csv = read_csv(&self.dir.join("predictions.csv"));
        assert_eq!(csv.header, ["Id", "Predicted"], "predictions.csv header");
        csv
    }

    /// predictions.csv as image id → predicted category id, checking every id appears once.
    fn predicted(&self) -> BTreeMap<i64, i64> {
        let csv = self.predictions();
        let map: BTreeMap<i64, i64> = csv.column_i64("Id").into_iter().zip(csv.column_i64("Predicted")).collect();
        assert_eq!(map.len(), csv.len(), "an image id appears twice in predictions.csv");
        map
    }

    fn metrics(&self) -> serde_json::Value {
        let bytes = fs::read(self.dir.join("metrics.json")).expect("metrics.json");
        serde_json::from_slice(&bytes).expect("metrics.json is JSON")
    }

    fn per_class(&self) -> Csv {
        let csv = read_csv(&self.dir.join("per_class.csv"));
        assert_eq!(csv.header, ["label", "category_id", "name", "precision", "recall", "f1", "support", "predicted"]);
        csv
    }
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("metrics.json: {key} is not a number: {}", v[key]))
}

#[track_caller]
fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-6, "{what}: got {got}, want {want}");
}

fn column_f64(csv: &Csv, name: &str) -> Vec<f64> {
    csv.column(name).iter().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: {v:?}"))).collect()
}

// ------------------------------------------------------------------------------------------------
// Checkpoints
// ------------------------------------------------------------------------------------------------

/// The temp dir of the shared trained checkpoint, removed when the test process exits.
static TRAINED_DIR: OnceLock<PathBuf> = OnceLock::new();
static TRAINED: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_trained_dir() {
    if let Some(dir) = TRAINED_DIR.get() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// A resnet18 for the 6 classes of [`CLASSES`] at 32x32, trained by `sac train` for one epoch on a
/// dozen images in one process. Trained once for all the tests of this file.
fn trained_checkpoint() -> &'static Path {
    TRAINED.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("sac-evaluate-trained-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("creating a temp dir")
            .keep();
        if TRAINED_DIR.set(dir.clone()).is_ok() {
            // SAFETY: registers a plain function to run at exit; it only removes a directory.
            unsafe { libc::atexit(remove_trained_dir) };
        }
        let fx = Fixture::new(6, 2, &cycling(6, 6));
        let config = fx.dir().join("config.toml");
        let out = run_sac(
            fx.dir(),
            &["--config", config.to_str().unwrap(), "train", "--epochs", "1", "--set", "train.validate=false"],
        );
        assert_success(&out);
        let ckpt = fx.dir().join("checkpoints/resnet18/model.safetensors");
        assert!(ckpt.is_file(), "sac train wrote no {}", ckpt.display());
        let kept = dir.join("model.safetensors");
        fs::copy(&ckpt, &kept).expect("keeping the trained checkpoint");
        kept
    })
}

/// A copy of the trained resnet18 with every tensor zero except the classifier's bias, `fc.bias =
/// bias` (and `fc.weight` resized to `bias.len()` classes): every convolution, batch norm (zero
/// scale and shift) and the final linear layer's product give 0, so the logits of any image are
/// exactly `bias`. `metadata: false` writes no metadata (no arch, no class count), as a file
/// exported from PyTorch would be.
fn constant_checkpoint(path: &Path, bias: &[f32], metadata: bool) {
    let template = fs::read(trained_checkpoint()).expect("reading the trained checkpoint");
    let st = safetensors::SafeTensors::deserialize(&template).expect("a safetensors file");
    let (_, header) = safetensors::SafeTensors::read_metadata(&template).expect("a safetensors header");
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut bytes = vec![0u8; view.data().len()];
        if name == "fc.weight" {
            shape[0] = bias.len();
            bytes = vec![0u8; shape.iter().product::<usize>() * 4];
        } else if name == "fc.bias" {
            shape = vec![bias.len()];
            bytes = bias.iter().flat_map(|b| b.to_le_bytes()).collect();
        }
        tensors.push((name, view.dtype(), shape, bytes));
    }
    assert!(tensors.iter().any(|t| t.0 == "fc.bias"), "the template has no fc.bias");
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: Option<HashMap<String, String>> = metadata.then(|| {
        let mut m = header.metadata().clone().unwrap_or_default();
        assert_eq!(m.get("arch").map(String::as_str), Some("resnet18"), "template metadata {m:?}");
        m.insert("num_classes".into(), bias.len().to_string());
        // The class map of a checkpoint trained on the fixture's first `bias.len()` classes.
        let ids: Vec<i64> = CLASSES[..bias.len()].iter().map(|c| c.0).collect();
        m.insert("category_ids".into(), serde_json::to_string(&ids).unwrap());
        m
    });
    fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

// ------------------------------------------------------------------------------------------------
// 1. The pipeline changes no prediction
// ------------------------------------------------------------------------------------------------

#[test]
fn pipeline_on_4_and_6_ranks_gives_the_predictions_of_one_process() {
    let ckpt = trained_checkpoint();
    let fx = Fixture::new(6, 0, &cycling(30, 6));
    let one = fx.evaluate_ok(1, ckpt, "out-1", &[]);
    assert!(one.stderr.contains("all stages run as threads of one process"), "stderr:\n{}", one.stderr);
    let ids: Vec<i64> = one.predictions().column_i64("Id");
    assert_eq!(ids, fx.test_ids(), "one prediction per test row, in test.csv order");
    let base = one.metrics();
    assert_eq!(base["mode"], "single-process");

    for ranks in [4, 6] {
        let run = fx.evaluate_ok(ranks, ckpt, &format!("out-{ranks}"), &[]);
        assert!(run.stderr.contains(&format!("pipeline over {ranks} ranks")), "stderr:\n{}", run.stderr);
        let share = (std::thread::available_parallelism().unwrap().get() / ranks).max(1);
        let want = format!("decode with {share} thread(s)");
        assert!(run.stderr.contains(&want), "the node's cores over {ranks} ranks; stderr:\n{}", run.stderr);
        assert_eq!(
            String::from_utf8_lossy(&run.predictions_bytes()),
            String::from_utf8_lossy(&one.predictions_bytes()),
            "predictions.csv at -n {ranks} differs from the single-process one"
        );
        let m = run.metrics();
        assert_eq!(m["mode"], "pipeline");
        assert_eq!(m["ranks"], ranks);
        assert_eq!(m["stages"]["predict"]["ranks"], ranks - 3, "predictor ranks at -n {ranks}");
        for key in ["images", "skipped_images", "top1", "top5", "macro_f1"] {
            assert_eq!(m[key], base[key], "{key} at -n {ranks} differs from the single-process run");
        }
        assert!((num(&m, "loss") - num(&base, "loss")).abs() < 1e-5, "loss at -n {ranks}: {m} vs {base}");
        for stage in ["read", "decode", "normalize", "predict"] {
            assert_eq!(m["stages"][stage]["images"], 30, "images through {stage} at -n {ranks}");
        }
    }
    // The decode stage's images shared among 3 threads: the same predictions, in the same order.
    let threads = fx.evaluate_ok(4, ckpt, "out-4-threads", &["--set", "evaluate.decode_threads=3"]);
    assert!(threads.stderr.contains("decode with 3 thread(s)"), "stderr:\n{}", threads.stderr);
    assert_eq!(threads.predictions_bytes(), one.predictions_bytes(), "3 decode threads change the predictions");
}

/// Above the MPI library's eager limit a send completes only once its receiver takes the message
/// (rendezvous), as between nodes with 8–16 KB eager limits. Debian's MPICH moves even the
/// messages between ranks of one host through UCX, whose rendezvous threshold `UCX_RNDV_THRESH`
/// sets; at 1 KiB every batch message of the pipeline needs its receiver (Open MPI: the same
/// variable for its UCX transport, and the eager limit of its shared-memory one, vader, where it
/// takes that instead). Many large batches
/// through 4 and 5 ranks: no cycle of ranks waiting on each other may close (rank 0 once stopped
/// taking results while it sent, and a predictor blocked on its result held back the credit the
/// chain needed), and the predictions are the single-process ones.
#[test]
fn pipeline_under_forced_rendezvous_with_many_large_batches_finishes_with_the_same_predictions() {
    let ckpt = trained_checkpoint();
    let fx = Fixture::new(6, 0, &cycling(360, 6));
    let batch = ["--set", "evaluate.batch_size=24"];
    let one = fx.evaluate_ok(1, ckpt, "out-1", &batch);
    for ranks in [4, 5] {
        let t = Instant::now();
        let run = fx.evaluate_ok_env(
            ranks,
            ckpt,
            &format!("out-{ranks}"),
            &batch,
            &[("UCX_RNDV_THRESH", "1024"), ("OMPI_MCA_btl_vader_eager_limit", "1024")],
        );
        eprintln!("-n {ranks} under rendezvous from 1 KiB: {:?}", t.elapsed());
        assert_eq!(
            String::from_utf8_lossy(&run.predictions_bytes()),
            String::from_utf8_lossy(&one.predictions_bytes()),
            "predictions.csv at -n {ranks} under forced rendezvous differs from the single-process one"
        );
        assert_eq!(run.metrics()["images"], 360);
    }
}

// ------------------------------------------------------------------------------------------------
// 2. Metrics
// ------------------------------------------------------------------------------------------------

/// A checkpoint whose logits are always `[0.5, 3.0, 2.5, 2.0, 1.5, 1.0]`: it predicts label 1
/// (birch, category 23) for every image, and its top 5 is labels 1..=5, never label 0. The test
/// labels are 0 ×3, 1 ×4, 2 ×2, 3 ×2, 4 ×1 and none of label 5, so:
/// - top-1 = 4/12; top-5 = (12 - 3)/12 (only the label-0 images miss);
/// - label 1: precision 4/12, recall 1, F1 = 2·(1/3)/(4/3) = 1/2; labels 0, 2, 3, 4 are never
///   predicted: precision = recall = F1 = 0; label 5 is neither a label nor a prediction, so it is
///   left out of the average: macro-F1 = (1/2) / 5 = 0.1;
/// - loss = mean of logsumexp(bias) - bias[y] = logsumexp(bias) - (3·0.5 + 4·3 + 2·2.5 + 2·2 + 1.5)/12.
///
/// ```python
/// from sklearn.metrics import f1_score
/// f1_score([0,0,0,1,1,1,1,2,2,3,3,4], [1]*12, average="macro")  # 0.1
/// ```
#[test]
fn metrics_match_values_worked_out_by_hand_for_a_checkpoint_that_always_predicts_one_class() {
    let labels = [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 1];
    let fx = Fixture::new(6, 0, &labels);
    let bias = [0.5f32, 3.0, 2.5, 2.0, 1.5, 1.0];
    let ckpt = fx.dir().join("constant.safetensors");
    constant_checkpoint(&ckpt, &bias, true);
    let run = fx.evaluate_ok(4, &ckpt, "output", &[]);

    let predicted = run.predicted();
    assert_eq!(predicted.keys().copied().collect::<Vec<_>>(), fx.test_ids());
    assert!(predicted.values().all(|&p| p == 23), "every prediction is birch (23): {predicted:?}");

    let m = run.metrics();
    assert_eq!(m["images"], 12);
    assert_eq!(m["skipped_images"], 0);
    assert_eq!(m["labeled"], true);
    assert_close(num(&m, "top1"), 4.0 / 12.0, "top1");
    assert_close(num(&m, "top5"), 9.0 / 12.0, "top5");
    assert_close(num(&m, "macro_f1"), 0.1, "macro_f1");
    let lse = bias.iter().map(|&b| f64::from(b).exp()).sum::<f64>().ln();
    let want_loss = lse - (3.0 * 0.5 + 4.0 * 3.0 + 2.0 * 2.5 + 2.0 * 2.0 + 1.5) / 12.0;
    assert!((num(&m, "loss") - want_loss).abs() < 1e-4, "loss {} vs {want_loss}", m["loss"]);

    // One row per class that occurs as a label or a prediction: fir (label 5) does neither.
    let pc = run.per_class();
    assert_eq!(pc.column_i64("label"), [0, 1, 2, 3, 4]);
    assert_eq!(pc.column_i64("category_id"), [11, 23, 37, 42, 58]);
    assert_eq!(pc.column("name"), ["alder", "birch", "cedar", "dogwood", "elm"]);
    assert_eq!(pc.column_i64("support"), [3, 4, 2, 2, 1]);
    assert_eq!(pc.column_i64("predicted"), [0, 12, 0, 0, 0]);
    let want = [(0.0, 0.0, 0.0), (1.0 / 3.0, 1.0, 0.5), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)];
    let (p, r, f) = (column_f64(&pc, "precision"), column_f64(&pc, "recall"), column_f64(&pc, "f1"));
    for (c, &(wp, wr, wf)) in want.iter().enumerate() {
        assert_close(p[c], wp, &format!("precision of label {c}"));
        assert_close(r[c], wr, &format!("recall of label {c}"));
        assert_close(f[c], wf, &format!("f1 of label {c}"));
    }
}

/// With 3 classes the "top 5" holds all of them, so every labeled image is a top-5 hit however
/// wrong the top-1 is. The checkpoint's logits are always `[0, 1, 2]`: it predicts label 2 (cedar,
/// 37). Labels 0, 1, 2, 0, 1, 0: top-1 = 1/6; label 2 has precision 1/6, recall 1, F1 = 2/7, the
/// others 0: macro-F1 = (2/7)/3 = 2/21.
#[test]
fn top5_with_fewer_than_five_classes_counts_every_image_as_a_hit() {
    let fx = Fixture::new(3, 0, &[0, 1, 2, 0, 1, 0]);
    let ckpt = fx.dir().join("constant3.safetensors");
    constant_checkpoint(&ckpt, &[0.0, 1.0, 2.0], true);
    let run = fx.evaluate_ok(1, &ckpt, "output", &[]);
    assert!(run.predicted().values().all(|&p| p == 37), "{:?}", run.predicted());
    let m = run.metrics();
    assert_eq!(m["top5"], 1.0, "{m}");
    assert_close(num(&m, "top1"), 1.0 / 6.0, "top1");
    assert_close(num(&m, "macro_f1"), 2.0 / 21.0, "macro_f1");
}

/// Per-class precision, recall and F1 from (true, predicted) category ids, written out by hand:
/// category id → (precision, recall, f1, support), for every category in `classes`.
fn per_class_by_hand(pairs: &[(i64, i64)], classes: &[i64]) -> BTreeMap<i64, (f64, f64, f64, usize)> {
    classes
        .iter()
        .map(|&c| {
            let tp = pairs.iter().filter(|&&(y, p)| y == c && p == c).count() as f64;
            let support = pairs.iter().filter(|&&(y, _)| y == c).count();
            let predicted = pairs.iter().filter(|&&(_, p)| p == c).count() as f64;
            let precision = if predicted > 0.0 { tp / predicted } else { 0.0 };
            let recall = if support > 0 { tp / support as f64 } else { 0.0 };
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            (c, (precision, recall, f1, support))
        })
        .collect()
}

/// The trained checkpoint through the pipeline: metrics.json and per_class.csv agree with what
/// predictions.csv and test.csv say, recomputed here (top-1 as the share of rows predicted right,
/// macro-F1 as the mean F1 over the classes that occur as a label or a prediction).
#[test]
fn pipeline_metrics_agree_with_its_predictions_and_the_test_labels() {
    let fx = Fixture::new(6, 0, &cycling(24, 6));
    let run = fx.evaluate_ok(4, trained_checkpoint(), "output", &[]);
    let predicted = run.predicted();
    let pairs: Vec<(i64, i64)> = fx.test.iter().map(|r| (r.category_id, predicted[&r.image_id])).collect();
    let m = run.metrics();
    assert_eq!(m["images"], 24);

    let right = pairs.iter().filter(|(y, p)| y == p).count();
    assert_close(num(&m, "top1"), right as f64 / 24.0, "top1 vs predictions.csv");

    let cats: Vec<i64> = CLASSES.iter().map(|c| c.0).collect();
    let by_hand = per_class_by_hand(&pairs, &cats);
    let pc = run.per_class();
    assert_eq!(pc.column_i64("category_id"), cats);
    let support = pc.column_i64("support");
    assert_eq!(support.iter().sum::<i64>(), 24, "support sums to the image count");
    let (p, r, f) = (column_f64(&pc, "precision"), column_f64(&pc, "recall"), column_f64(&pc, "f1"));
    for (i, c) in cats.iter().enumerate() {
        let (wp, wr, wf, ws) = by_hand[c];
        assert_eq!(support[i] as usize, ws, "support of {c}");
        assert_close(p[i], wp, &format!("precision of {c}"));
        assert_close(r[i], wr, &format!("recall of {c}"));
        assert_close(f[i], wf, &format!("f1 of {c}"));
    }
    let occurring: BTreeSet<i64> = pairs.iter().flat_map(|&(y, p)| [y, p]).collect();
    let macro_f1 = occurring.iter().map(|c| by_hand[c].2).sum::<f64>() / occurring.len() as f64;
    assert_close(num(&m, "macro_f1"), macro_f1, "macro_f1 vs predictions.csv");
    let top5 = num(&m, "top5");
    assert!(top5 >= num(&m, "top1") && top5 <= 1.0, "top5 {top5}");
}

// ------------------------------------------------------------------------------------------------
// 3. Unlabeled test split
// ------------------------------------------------------------------------------------------------

#[test]
fn unlabeled_test_split_gives_predictions_only() {
    let fx = Fixture::new(6, 0, &cycling(10, 6));
    fx.write_test_csv(false);
    let mut predictions = Vec::new();
    for ranks in [1, 4] {
        let run = fx.evaluate_ok(ranks, trained_checkpoint(), &format!("out-{ranks}"), &[]);
        let ids: Vec<i64> = run.predictions().column_i64("Id");
        assert_eq!(ids, fx.test_ids(), "-n {ranks}: one prediction per test row");
        let cats: BTreeSet<i64> = CLASSES.iter().map(|c| c.0).collect();
        assert!(run.predictions().column_i64("Predicted").iter().all(|p| cats.contains(p)));
        let m = run.metrics();
        assert_eq!(m["images"], 10, "-n {ranks}");
        assert_eq!(m["labeled"], false, "-n {ranks}");
        for key in ["top1", "top5", "macro_f1", "loss"] {
            assert!(m[key].is_null(), "-n {ranks}: {key} is {} for an unlabeled split", m[key]);
        }
        assert!(!run.dir.join("per_class.csv").exists(), "-n {ranks}: per_class.csv written");
        assert!(!run.dir.join("confusion.png").exists(), "-n {ranks}: confusion.png written");
        assert!(!run.stdout.contains("top-1"), "-n {ranks}: stdout:\n{}", run.stdout);
        predictions.push(run.predictions_bytes());
    }
    assert_eq!(predictions[0], predictions[1], "unlabeled predictions differ between -n 1 and -n 4");
}

// ------------------------------------------------------------------------------------------------
// 4. Bad images
// ------------------------------------------------------------------------------------------------

/// Row `bad` (in the middle of the stream) is broken by `spoil`; under the default
/// `on_bad_image = "skip"` it is skipped and counted at -n 1 and -n 4, and every other row is
/// predicted, the same way in both.
fn bad_image_is_skipped_and_counted(spoil: impl Fn(&Path)) {
    let fx = Fixture::new(6, 0, &cycling(14, 6));
    let bad = 7;
    spoil(&fx.data().join(&fx.test[bad].path));
    let mut predictions = Vec::new();
    // The pipeline's decode stage with one thread and with three (the bad image in the second's part).
    for (ranks, threads) in [(1, "1"), (4, "1"), (4, "3")] {
        let set = format!("evaluate.decode_threads={threads}");
        let run = fx.evaluate_ok(ranks, trained_checkpoint(), &format!("out-{ranks}-{threads}"), &["--set", &set]);
        let m = run.metrics();
        assert_eq!(m["skipped_images"], 1, "-n {ranks}: {m}");
        assert_eq!(m["images"], 13, "-n {ranks}");
        let skipped = m["skipped"].as_array().expect("metrics.json: skipped is a list");
        assert_eq!(skipped.len(), 1, "-n {ranks}: {skipped:?}");
        assert_eq!(skipped[0]["path"], fx.test[bad].path.as_str(), "-n {ranks}");
        let mut want = fx.test_ids();
        want.remove(bad);
        assert_eq!(run.predictions().column_i64("Id"), want, "-n {ranks}: every other row predicted");
        assert_eq!(run.per_class().column_i64("support").iter().sum::<i64>(), 13, "-n {ranks}");
        assert!(run.stdout.contains("skipped 1"), "-n {ranks}: stdout:\n{}", run.stdout);
        assert!(run.stderr.contains("skipping"), "-n {ranks}: no warning; stderr:\n{}", run.stderr);
        predictions.push(run.predictions_bytes());
    }
    assert_eq!(predictions[0], predictions[1], "predictions differ between -n 1 and -n 4");
    assert_eq!(predictions[1], predictions[2], "predictions differ between 1 and 3 decode threads");
}

fn corrupt(path: &Path) {
    fs::write(path, b"\x89PNG garbage, not an image at all \x00\x01\x02\x03").unwrap();
}

fn remove(path: &Path) {
    fs::remove_file(path).unwrap();
}

#[test]
fn corrupt_image_in_the_middle_of_the_stream_is_skipped_and_counted() {
    bad_image_is_skipped_and_counted(corrupt);
}

#[test]
fn missing_image_file_is_skipped_and_counted() {
    bad_image_is_skipped_and_counted(remove);
}

/// Under `on_bad_image = "fail"`, the bad row ends the job at -n `ranks`: exit ≠ 0 within seconds
/// (no rank left waiting), with a message naming the file.
fn bad_image_fails_the_job(spoil: impl Fn(&Path), ranks: usize) {
    let fx = Fixture::new(6, 0, &cycling(14, 6));
    let bad = &fx.test[7];
    spoil(&fx.data().join(&bad.path));
    let ckpt = trained_checkpoint();
    let (out, took) =
        fx.evaluate(ranks, &["--checkpoint", ckpt.to_str().unwrap(), "--set", "train.on_bad_image=\"fail\""]);
    let err = assert_fails_with(&out, &["on_bad_image"]);
    assert!(err.contains(&bad.path), "-n {ranks}: the message does not name {}; stderr:\n{err}", bad.path);
    assert!(took < QUICK_FAILURE, "-n {ranks}: the failed job took {took:?}");
    assert!(!fx.dir().join("output/predictions.csv").exists(), "-n {ranks}: predictions.csv written");
}

#[test]
fn missing_image_under_on_bad_image_fail_ends_the_job_naming_the_file() {
    bad_image_fails_the_job(remove, 4);
    bad_image_fails_the_job(remove, 1);
}

#[test]
fn corrupt_image_under_on_bad_image_fail_ends_the_single_process_job_naming_the_file() {
    bad_image_fails_the_job(corrupt, 1);
}

/// The pipeline's decoder (rank 1) has no test.csv rows, so its message names "data/row 9" instead
/// of the file (src/evaluate/pipeline.rs: `decode(ctx, None, …)` in `mpi_pipeline`, and the
/// fallback `format!("row {}", row + 2)` in `decode`).
#[test]
fn corrupt_image_under_on_bad_image_fail_ends_the_pipeline_job_naming_the_file() {
    bad_image_fails_the_job(corrupt, 4);
}

// ------------------------------------------------------------------------------------------------
// 5. Checkpoints that do not fit
// ------------------------------------------------------------------------------------------------

/// `evaluate` at -n 4 with `extra` must fail within seconds, before the pipeline starts (no
/// "evaluating …" line, no output), with stderr holding every one of `needles`.
fn refused_before_the_pipeline(fx: &Fixture, extra: &[&str], needles: &[&str]) -> String {
    let (out, took) = fx.evaluate(4, extra);
    let err = assert_fails_with(&out, needles);
    assert!(took < QUICK_FAILURE, "the refused job took {took:?}; stderr:\n{err}");
    assert!(!err.contains("evaluating"), "the pipeline started; stderr:\n{err}");
    assert!(!fx.dir().join("output").exists(), "output/ written by a refused job");
    err
}

#[test]
fn missing_checkpoint_is_refused_before_the_pipeline_starts() {
    let fx = Fixture::new(6, 0, &cycling(6, 6));
    let missing = fx.dir().join("nowhere/model.safetensors");
    refused_before_the_pipeline(
        &fx,
        &["--checkpoint", missing.to_str().unwrap()],
        &[missing.to_str().unwrap(), "not found"],
    );
    // The default path, <checkpoint_dir>/<model>/model.safetensors, when nothing was trained.
    let default = fx.dir().join("checkpoints/resnet18/model.safetensors");
    refused_before_the_pipeline(&fx, &[], &[default.to_str().unwrap(), "not found"]);
}

#[test]
fn checkpoint_of_another_architecture_is_refused_before_the_pipeline_starts() {
    let fx = Fixture::new(6, 0, &cycling(6, 6));
    let ckpt = trained_checkpoint().to_str().unwrap();
    refused_before_the_pipeline(&fx, &["--model", "vgg", "--checkpoint", ckpt], &[ckpt, "resnet18", "vgg"]);
}

#[test]
fn checkpoint_of_another_class_count_is_refused_before_the_pipeline_starts() {
    let fx = Fixture::new(5, 0, &cycling(5, 5));
    let ckpt = trained_checkpoint().to_str().unwrap();
    refused_before_the_pipeline(&fx, &["--checkpoint", ckpt], &[ckpt, "6 classes", "classes.csv has 5"]);
}

/// A checkpoint without metadata (as exported from PyTorch) passes the check on rank 0; the
/// predictor ranks then find the classifier's shape wrong when loading it. The error on a non-root rank must
/// still end the whole job promptly, naming the file and the tensor.
#[test]
fn checkpoint_without_metadata_of_another_class_count_ends_the_job_without_a_hang() {
    let fx = Fixture::new(6, 0, &cycling(6, 6));
    let ckpt = fx.dir().join("three-classes.safetensors");
    constant_checkpoint(&ckpt, &[0.0, 1.0, 2.0], false);
    let (out, took) = fx.evaluate(4, &["--checkpoint", ckpt.to_str().unwrap()]);
    let err = assert_fails_with(&out, &[ckpt.to_str().unwrap(), "tensor fc.", "the model needs [6"]);
    assert!(took < QUICK_FAILURE, "the failed job took {took:?}; stderr:\n{err}");
    assert!(!fx.dir().join("output/predictions.csv").exists());
}

// ------------------------------------------------------------------------------------------------
// 6. The outputs
// ------------------------------------------------------------------------------------------------

/// `mpiexec -n 5 sac evaluate` (two predictors) writes the four files, valid, and prints the summary.
#[test]
fn pipeline_run_writes_the_four_outputs_and_prints_a_summary() {
    let fx = Fixture::new(6, 0, &cycling(12, 6));
    let run = fx.evaluate_ok(5, trained_checkpoint(), "output", &[]);

    let png = image::open(run.dir.join("confusion.png")).expect("confusion.png decodes as an image");
    assert_eq!(image::ImageFormat::from_path(run.dir.join("confusion.png")).unwrap(), image::ImageFormat::Png);
    assert!(png.width() >= 100 && png.height() >= 100, "confusion.png is {}x{}", png.width(), png.height());
    let magic = fs::read(run.dir.join("confusion.png")).unwrap();
    assert!(magic.starts_with(b"\x89PNG\r\n\x1a\n"), "confusion.png lacks the PNG signature");

    let m = run.metrics();
    for key in ["images", "top1", "top5", "macro_f1", "loss", "images_per_second", "cpu_seconds_per_image"] {
        assert!(m[key].is_number(), "metrics.json: {key} = {}", m[key]);
    }
    assert!(num(&m, "images_per_second") > 0.0);
    assert_eq!(m["ranks"], 5);
    for stage in ["read", "decode", "normalize", "predict"] {
        let s = &m["stages"][stage];
        for key in ["busy_seconds", "busy_share", "images"] {
            assert!(s[key].is_number(), "metrics.json: stages.{stage}.{key} = {}", s[key]);
        }
        assert_eq!(s["images"], 12, "stages.{stage}.images");
        let share = num(s, "busy_share");
        assert!((0.0..=1.0 + 1e-6).contains(&share), "stages.{stage}.busy_share = {share}");
    }
    assert_eq!(m["stages"]["predict"]["ranks"], 2);
    assert_eq!(run.per_class().len(), 6);
    assert_eq!(run.predictions().len(), 12);

    for needle in ["top-1", "top-5", "macro-F1", "images/s", "read", "decode", "normalize", "predict", "busy"] {
        assert!(run.stdout.contains(needle), "stdout lacks {needle:?}:\n{}", run.stdout);
    }
}
