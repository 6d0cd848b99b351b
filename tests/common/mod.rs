//! Shared helpers of the integration tests: run the real `sac` binary with a timeout, write config
//! files, generate small source data sets (COCO tree with real JPEGs, image folder, IDX files) and
//! read the CSVs `sac` writes.
//!
//! Every test file uses a different subset of these, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A run of `sac` that takes longer than this is killed and fails the test.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Variables MPI launchers set; removed so a test never starts MPI by accident.
const LAUNCHER_VARS: [&str; 6] =
    ["PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMI_FD"];

// ------------------------------------------------------------------------------------------------
// Running the binary
// ------------------------------------------------------------------------------------------------

/// Runs `sac args…` in `dir` (its working directory), kills it and fails the test after [`TIMEOUT`].
pub fn run_sac(dir: &Path, args: &[&str]) -> Output {
    run_sac_with_timeout(dir, args, TIMEOUT)
}

pub fn run_sac_with_timeout(dir: &Path, args: &[&str], timeout: Duration) -> Output {
    wait_with_timeout(spawn_sac(dir, args), args, timeout)
}

/// The MPI the tests run under. `SAC_TEST_MPI=openmpi` runs the Open MPI build of sac
/// (`scripts/build.sh --mpi openmpi`: target/openmpi/release/sac, or `SAC_TEST_BIN`) under Open
/// MPI's launcher (scripts/test.sh's Open MPI stage); otherwise the tests run the binary cargo
/// built, against MPICH, under MPICH's launcher, whichever `mpiexec` Debian's alternatives name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mpi {
    Mpich,
    OpenMpi,
}

pub fn mpi() -> Mpi {
    match std::env::var("SAC_TEST_MPI").as_deref() {
        Ok("openmpi") => Mpi::OpenMpi,
        Ok("mpich") | Ok("") | Err(_) => Mpi::Mpich,
        Ok(other) => panic!("SAC_TEST_MPI={other}: mpich or openmpi"),
    }
}

/// The sac binary under test (see [`mpi`]).
pub fn sac_bin() -> PathBuf {
    match mpi() {
        Mpi::Mpich => PathBuf::from(env!("CARGO_BIN_EXE_sac")),
        Mpi::OpenMpi => {
            let bin = std::env::var_os("SAC_TEST_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openmpi/release/sac"));
            assert!(bin.is_file(), "{}: no Open MPI build of sac (scripts/build.sh --mpi openmpi)", bin.display());
            bin
        }
    }
}

/// The launcher of the MPI under test with its flags, up to `-n <ranks>`: MPICH's
/// `mpiexec.mpich` (Debian's name, which stays MPICH's whatever `mpiexec` points at) or `mpiexec`;
/// Open MPI's `mpiexec.openmpi` or `mpiexec`, with `--oversubscribe` (tests start more ranks than
/// this machine has cores) and, as root, `--allow-run-as-root`.
pub fn launcher(ranks: usize) -> Vec<String> {
    let mut cmd = launcher_flags();
    cmd.extend(["-n".to_string(), ranks.to_string()]);
    cmd
}

/// `name` if it is on PATH (Debian's own name of one MPI's launcher), else `mpiexec`.
fn launcher_named(name: &str) -> String {
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    if on_path { name } else { "mpiexec" }.to_string()
}

/// MPICH's launcher, whatever MPI is under test: `mpiexec.mpich` where Debian has it.
pub fn mpich_launcher() -> String {
    launcher_named("mpiexec.mpich")
}

/// [`launcher`] without `-n <ranks>`: what jobs/sac-job.sh takes in `SAC_MPIEXEC`.
pub fn launcher_flags() -> Vec<String> {
    match mpi() {
        Mpi::Mpich => vec![mpich_launcher()],
        Mpi::OpenMpi => {
            let mut v = vec![launcher_named("mpiexec.openmpi"), "--oversubscribe".to_string()];
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                v.push("--allow-run-as-root".to_string());
            }
            v
        }
    }
}

/// `launcher(ranks)` as a `Command`, followed by the sac binary under test.
pub fn mpi_command(ranks: usize) -> Command {
    let l = launcher(ranks);
    let mut cmd = Command::new(&l[0]);
    cmd.args(&l[1..]).arg(sac_bin());
    cmd
}

/// Starts `sac args…` in `dir` with stdin closed and stdout/stderr piped, outside any MPI launcher.
pub fn spawn_sac(dir: &Path, args: &[&str]) -> Child {
    let mut cmd = Command::new(sac_bin());
    spawn(cmd.args(args), dir)
}

/// Starts `mpiexec -n <ranks> sac args…` in `dir`, like `spawn_sac`.
pub fn spawn_mpi(dir: &Path, ranks: usize, args: &[&str]) -> Child {
    spawn(mpi_command(ranks).args(args), dir)
}

/// `spawn_mpi` with extra environment variables for every rank (both launchers pass their
/// environment on to the ranks of their own node).
pub fn spawn_mpi_env(dir: &Path, ranks: usize, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = mpi_command(ranks);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn(&mut cmd, dir)
}

/// `mpiexec -n <ranks> sac args…` in `dir`; the whole job is killed and the test fails after `timeout`.
pub fn run_mpi(dir: &Path, ranks: usize, args: &[&str], timeout: Duration) -> Output {
    wait_with_timeout(spawn_mpi(dir, ranks, args), args, timeout)
}

/// `run_mpi` with extra environment variables for every rank.
pub fn run_mpi_env(dir: &Path, ranks: usize, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    wait_with_timeout(spawn_mpi_env(dir, ranks, args, env), args, timeout)
}

/// Runs `cmd` in its own process group: a timeout kills mpiexec (and sac itself when run alone); hydra's
/// proxy and ranks live in sessions of their own and die with mpiexec.
pub fn spawn(cmd: &mut Command, dir: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    cmd.current_dir(dir)
        .process_group(0)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.spawn().expect("starting sac (or mpiexec)")
}

/// The signal that asks a job under the launcher of [`mpi`] to stop at a safe point: SIGTERM to
/// MPICH's mpiexec, which passes it on; SIGUSR1 to Open MPI's, which passes that on at once but
/// answers SIGTERM by killing the ranks (jobs/sac-job.sh does the same).
pub fn stop_signal() -> i32 {
    match mpi() {
        Mpi::Mpich => libc::SIGTERM,
        Mpi::OpenMpi => libc::SIGUSR1,
    }
}

/// Sends `signal` to the child's process group (mpiexec, which forwards SIGTERM/SIGINT to the ranks, or sac).
pub fn signal_group(child: &Child, signal: i32) {
    // SAFETY: kill(2) with a negative pid addresses the process group the child leads.
    unsafe {
        libc::kill(-(child.id() as i32), signal);
    }
}

/// Waits for `child` (started with `args`), collecting its output; kills it and fails the test
/// after `timeout`.
pub fn wait_with_timeout(child: Child, args: &[&str], timeout: Duration) -> Output {
    wait_with_timeout_and(child, args, timeout, |_| {})
}

/// `wait_with_timeout`, calling `tick(&child)` every few milliseconds while the child runs (to
/// watch its log, or signal it at the right moment).
pub fn wait_with_timeout_and(
    mut child: Child,
    args: &[&str],
    timeout: Duration,
    mut tick: impl FnMut(&Child),
) -> Output {
    // Drain both pipes on their own threads, so a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for sac") {
            break status;
        }
        if Instant::now() >= deadline {
            signal_group(&child, libc::SIGKILL);
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "sac {args:?} did not finish within {timeout:?} and was killed; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        tick(&child);
        std::thread::sleep(Duration::from_millis(5));
    };
    Output { status, stdout: out.join().expect("stdout reader"), stderr: err.join().expect("stderr reader") }
}

/// `sac --config <dir>/config.toml create-dataset extra…`, run in `dir`.
pub fn create_dataset(dir: &Path, extra: &[&str]) -> Output {
    let config = dir.join("config.toml");
    let config = config.to_str().expect("utf-8 temp path");
    let mut args = vec!["--config", config, "create-dataset"];
    args.extend_from_slice(extra);
    run_sac(dir, &args)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails with the whole output unless the run succeeded.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "sac failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// The run failed cleanly (a non-zero exit code, not a signal and not a panic) and stderr holds
/// every one of `needles`. Returns stderr.
#[track_caller]
pub fn assert_fails_with(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    match out.status.code() {
        Some(0) => panic!("sac succeeded but should have failed; stderr:\n{err}"),
        None => panic!("sac was killed by a signal ({:?}); stderr:\n{err}", out.status),
        Some(101) => {
            panic!("sac panicked (exit code 101) instead of reporting an error; stderr:\n{err}")
        }
        Some(_) => {}
    }
    assert!(!err.contains("panicked at"), "sac panicked; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}; stderr:\n{err}");
    }
    err
}

/// Names in `dir` that start with `.data.tmp-` (the temp dirs `create-dataset` builds in).
pub fn temp_leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("listing the test dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".data.tmp-"))
        .collect()
}

/// After a failed run: `dir/data` does not exist and no temp dir is left beside it.
#[track_caller]
pub fn assert_no_data_dir(dir: &Path) {
    let data = dir.join("data");
    assert!(!data.exists(), "{} exists after a failed run", data.display());
    assert_eq!(temp_leftovers(dir), Vec::<String>::new(), "temp dirs left in {}", dir.display());
}

// ------------------------------------------------------------------------------------------------
// Config files
// ------------------------------------------------------------------------------------------------

/// A config file whose data dir is `data` and log `sac.log`, beside it, reading `source` in
/// `format` with all of it sampled (`sample = 1.0`). `extra_dataset` is appended to `[dataset]`.
pub fn config_text(format: &str, source: &str, extra_dataset: &str) -> String {
    format!(
        "[paths]\ndata_dir = \"data\"\nlog_file = \"sac.log\"\n\n[dataset]\nformat = \"{format}\"\n\
         source = {source:?}\nsample = 1.0\n{extra_dataset}"
    )
}

/// Writes `text` to `dir/config.toml` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    fs::write(&path, text).expect("writing config.toml");
    path
}

// ------------------------------------------------------------------------------------------------
// COCO / FGVC fixture
// ------------------------------------------------------------------------------------------------

/// Width and height of every fixture JPEG.
pub const COCO_W: u32 = 40;
pub const COCO_H: u32 = 30;

/// The COCO fixture's categories: (id, name, colour). Listed out of id order on purpose, so a
/// label order taken from the file (or from names) would show.
pub const COCO_CATEGORIES: [(i64, &str, [u8; 3]); 3] =
    [(30, "Carex", [30, 30, 210]), (10, "Acer", [210, 30, 30]), (20, "Betula", [30, 210, 30])];

/// The image id of the one image without an annotation.
pub const COCO_UNANNOTATED_ID: i64 = 999;

pub struct CocoFixture {
    /// The directory that holds `metadata.json`.
    pub root: PathBuf,
    pub metadata: serde_json::Value,
    /// Annotated image id → (category id, file_name).
    pub images: BTreeMap<i64, (i64, String)>,
}

impl CocoFixture {
    pub fn metadata_path(&self) -> PathBuf {
        self.root.join("metadata.json")
    }

    /// Rewrites `metadata.json` from `self.metadata` (after a test changed it).
    pub fn save(&self) {
        fs::write(self.metadata_path(), serde_json::to_vec_pretty(&self.metadata).unwrap()).unwrap();
    }

    pub fn colour_of(&self, category_id: i64) -> [u8; 3] {
        COCO_CATEGORIES.iter().find(|c| c.0 == category_id).expect("fixture category").2
    }
}

/// Writes a small FGVC/COCO source under `root`: 3 categories × 4 real 40×30 JPEGs of one colour per
/// category (`images/<category id>/<image id>.jpg`), plus one JPEG listed in `images` without an
/// annotation. Image ids start at 101; keys the readers must skip (`info`, `license`, …) are present.
pub fn coco_tree(root: &Path) -> CocoFixture {
    let mut images_json = Vec::new();
    let mut annotations = Vec::new();
    let mut images = BTreeMap::new();
    let mut id = 101;
    for (k, &(cat, _, colour)) in COCO_CATEGORIES.iter().enumerate() {
        for j in 0..4 {
            let file_name = format!("images/{cat}/{id}.jpg");
            // The same colour per category, a little brighter per image so files differ.
            let c = colour.map(|v| v.saturating_add(5 * j as u8));
            write_jpeg(&root.join(&file_name), COCO_W, COCO_H, c);
            images_json
                .push(json!({"id": id, "file_name": file_name, "width": COCO_W, "height": COCO_H, "license": 0}));
            annotations.push(json!({"id": 5000 + id, "image_id": id, "category_id": cat, "institution_id": k}));
            images.insert(id, (cat, file_name));
            id += 1;
        }
    }
    let orphan = format!("images/none/{COCO_UNANNOTATED_ID}.jpg");
    write_jpeg(&root.join(&orphan), COCO_W, COCO_H, [128, 128, 128]);
    images_json.push(json!({"id": COCO_UNANNOTATED_ID, "file_name": orphan}));
    let categories: Vec<_> = COCO_CATEGORIES
        .iter()
        .map(|&(id, name, _)| json!({"id": id, "name": name, "family": "Fixtureaceae"}))
        .collect();
    let metadata = json!({
        "info": {"year": 2021, "description": "sac test fixture"},
        "licenses": [{"id": 0, "name": "CC0"}],
        "images": images_json,
        "annotations": annotations,
        "categories": categories,
    });
    let fixture = CocoFixture { root: root.to_path_buf(), metadata, images };
    fixture.save();
    fixture
}

pub fn write_jpeg(path: &Path, w: u32, h: u32, colour: [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb(colour)).save(path).expect("encoding a JPEG");
}

pub fn write_png(path: &Path, w: u32, h: u32, colour: [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb(colour)).save(path).expect("encoding a PNG");
}

/// The mean colour of an RGB image.
pub fn mean_colour(img: &image::RgbImage) -> [f64; 3] {
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for (acc, &v) in sum.iter_mut().zip(&p.0) {
            *acc += f64::from(v);
        }
    }
    let n = (img.width() * img.height()) as f64;
    sum.map(|s| s / n)
}

// ------------------------------------------------------------------------------------------------
// Image folder fixture
// ------------------------------------------------------------------------------------------------

/// The folder fixture's classes in sorted order (so their category ids are 0, 1, 2).
pub const FOLDER_CLASSES: [&str; 3] = ["ant", "bee", "cat"];

/// Writes an image folder under `root`: `bee/` (created first) holds 4 PNGs, `ant/` 4 JPEGs,
/// `cat/` a mix (`.png`, upper-case `.JPG`, a `.jpeg` and a PNG in a sub-directory). Also a
/// `notes.txt` in `ant/` and a hidden `.cache/` class dir with a PNG, both of which are not images
/// of the data set. 12 images in all; returns the relative paths of the images per class.
pub fn image_folder(root: &Path) -> BTreeMap<&'static str, Vec<String>> {
    let mut files: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut add = |class: &'static str, rel: &str, png: bool, colour: [u8; 3]| {
        let p = root.join(class).join(rel);
        if png {
            write_png(&p, 16, 12, colour);
        } else {
            write_jpeg(&p, 16, 12, colour);
        }
        files.entry(class).or_default().push(format!("{class}/{rel}"));
    };
    for i in 0..4 {
        add("bee", &format!("b{i}.png"), true, [200, 200, 0]);
    }
    for i in 0..4 {
        add("ant", &format!("a{i}.jpg"), false, [120, 60, 0]);
    }
    add("cat", "c0.png", true, [0, 0, 0]);
    add("cat", "c1.JPG", false, [10, 10, 10]);
    add("cat", "c2.jpeg", false, [20, 20, 20]);
    add("cat", "sub/c3.png", true, [30, 30, 30]);
    fs::write(root.join("ant/notes.txt"), "not an image\n").unwrap();
    write_png(&root.join(".cache/x.png"), 4, 4, [1, 2, 3]);
    for v in files.values_mut() {
        v.sort();
    }
    files
}

// ------------------------------------------------------------------------------------------------
// IDX fixture
// ------------------------------------------------------------------------------------------------

pub const IDX_SIDE: u32 = 8;

/// The pixels of pooled image `i` of the IDX fixtures: distinct for every image.
pub fn idx_pixels(i: usize) -> Vec<u8> {
    (0..(IDX_SIDE * IDX_SIDE) as usize).map(|p| ((i * 37 + p * 3) % 256) as u8).collect()
}

/// An IDX3 unsigned-byte image file holding `images` (each `rows*cols` bytes).
pub fn idx_images_bytes(rows: u32, cols: u32, images: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0x0000_0803u32.to_be_bytes());
    b.extend((images.len() as u32).to_be_bytes());
    b.extend(rows.to_be_bytes());
    b.extend(cols.to_be_bytes());
    for img in images {
        assert_eq!(img.len(), (rows * cols) as usize);
        b.extend(img);
    }
    b
}

/// An IDX1 unsigned-byte label file.
pub fn idx_labels_bytes(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0x0000_0801u32.to_be_bytes());
    b.extend((labels.len() as u32).to_be_bytes());
    b.extend(labels);
    b
}

/// Writes `bytes` to `path`, gzip-compressed when `path` ends in `.gz`.
pub fn write_maybe_gz(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    if path.extension().is_some_and(|e| e == "gz") {
        let f = fs::File::create(path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap();
    } else {
        fs::write(path, bytes).unwrap();
    }
}

/// Writes MNIST-style `train-*` and (if `test_labels` is not empty) `t10k-*` files into `dir`, of
/// 8×8 images whose pixels are [`idx_pixels`] of their pooled index (train first). Returns the labels
/// in pooled order.
pub fn write_idx(dir: &Path, gz: bool, train_labels: &[u8], test_labels: &[u8]) -> Vec<u8> {
    let ext = if gz { ".gz" } else { "" };
    let mut offset = 0;
    for (prefix, labels) in [("train", train_labels), ("t10k", test_labels)] {
        if labels.is_empty() {
            continue;
        }
        let images: Vec<Vec<u8>> = (0..labels.len()).map(|i| idx_pixels(offset + i)).collect();
        write_maybe_gz(
            &dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
            &idx_images_bytes(IDX_SIDE, IDX_SIDE, &images),
        );
        write_maybe_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), &idx_labels_bytes(labels));
        offset += labels.len();
    }
    train_labels.iter().chain(test_labels).copied().collect()
}

/// Labels 0, 1, 2, 0, 1, 2, … (`n` of them).
pub fn cycling_labels(n: usize, classes: u8) -> Vec<u8> {
    (0..n).map(|i| (i % classes as usize) as u8).collect()
}

// ------------------------------------------------------------------------------------------------
// CSV
// ------------------------------------------------------------------------------------------------

/// A CSV file read as strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Csv {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Csv {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn index(&self, name: &str) -> usize {
        self.header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name:?} in {:?}", self.header))
    }

    pub fn column(&self, name: &str) -> Vec<&str> {
        let i = self.index(name);
        self.rows.iter().map(|r| r[i].as_str()).collect()
    }

    pub fn column_i64(&self, name: &str) -> Vec<i64> {
        self.column(name)
            .into_iter()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("column {name}: {v:?} is not an integer")))
            .collect()
    }
}

/// Reads a CSV with a header line (RFC 4180 quoting, `\n` or `\r\n` line ends). Every row must have
/// as many fields as the header.
pub fn read_csv(path: &Path) -> Csv {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut records = parse_csv(&text);
    assert!(!records.is_empty(), "{} is empty (not even a header)", path.display());
    let header = records.remove(0);
    for (n, r) in records.iter().enumerate() {
        assert_eq!(
            r.len(),
            header.len(),
            "{} row {}: {r:?} does not match the header {header:?}",
            path.display(),
            n + 1
        );
    }
    Csv { header, rows: records }
}

fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            _ => field.push(c),
        }
    }
    if any {
        record.push(field);
        records.push(record);
    }
    records
}

// ------------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------------

/// Every regular file below `dir`, as sorted paths relative to it (symlinks listed, not followed).
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(base, &e.path(), out);
            } else {
                out.push(e.path().strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The Rust sources below `dir` (e.g. `src/`), sorted.
pub fn rust_files_below(dir: &Path) -> Vec<PathBuf> {
    files_below(dir).into_iter().filter(|f| f.ends_with(".rs")).map(|f| dir.join(f)).collect()
}

// ------------------------------------------------------------------------------------------------
// Training fixtures: a data dir written directly, the venv's python, JSON files
// ------------------------------------------------------------------------------------------------

/// The Python with torch, torchvision and safetensors: `SAC_PYTHON`, else the project's `.venv`.
pub fn venv_python() -> PathBuf {
    std::env::var_os("SAC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// The colour of image `i` of class `label` in [`write_data_dir`]: one hue per class, a little
/// brighter per image so every file differs.
pub fn class_colour(label: usize, i: usize) -> [u8; 3] {
    const BASE: [[u8; 3]; 6] =
        [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200], [200, 40, 200]];
    BASE[label % BASE.len()].map(|v| v.saturating_add((i % 50) as u8))
}

/// Writes a labelled data dir as `sac create-dataset` would: `img/train/<i>.png` and
/// `img/test/<i>.png` (`side`×`side` PNGs of [`class_colour`]), `train.csv` and `test.csv`
/// (`path,label,category_id,image_id`; image `i` has label `i % classes`, category id `10 * label`),
/// and `classes.csv`. Returns the train rows' relative paths, in file order.
pub fn write_data_dir(data: &Path, classes: usize, n_train: usize, n_test: usize, side: u32) -> Vec<String> {
    assert!(classes >= 1);
    let mut counts = vec![0usize; classes];
    let mut train_paths = Vec::new();
    let mut image_id = 0;
    for (split, n) in [("train", n_train), ("test", n_test)] {
        let mut csv = String::from("path,label,category_id,image_id\n");
        for i in 0..n {
            let label = i % classes;
            let rel = format!("img/{split}/{i}.png");
            write_png(&data.join(&rel), side, side, class_colour(label, i));
            csv.push_str(&format!("{rel},{label},{},{image_id}\n", 10 * label));
            counts[label] += 1;
            image_id += 1;
            if split == "train" {
                train_paths.push(rel);
            }
        }
        fs::write(data.join(format!("{split}.csv")), csv).expect("writing a split CSV");
    }
    let mut csv = String::from("label,category_id,name,count\n");
    for (label, count) in counts.iter().enumerate() {
        csv.push_str(&format!("{label},{},class{label},{count}\n", 10 * label));
    }
    fs::write(data.join("classes.csv"), csv).expect("writing classes.csv");
    train_paths
}

/// Reads a JSON file (e.g. `state.json`, `metrics.json`).
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Processes (pid, command line) whose command line contains `needle`, e.g. a test's unique
/// config path: finds ranks left running after their `mpiexec` has exited. Hydra starts the ranks
/// in sessions of their own, so they are not in the test's process group.
pub fn processes_with_arg(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("listing /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        // A process may exit while we look: skip what cannot be read.
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// Fails if a process whose command line contains `needle` is still running `grace` after the
/// job ended (ranks exit a moment after mpiexec reports).
#[track_caller]
pub fn assert_no_process_left(needle: &str, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        let left = processes_with_arg(needle);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("processes left running after the job ended: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------------------------------
// Training projects (train.rs, faults.rs)
// ------------------------------------------------------------------------------------------------

/// Any run of `sac` here is killed (and its test failed) after this.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A failing job must end this fast: an abort reaches every rank in well under a second, a hang
/// would last until the timeout.
pub const FAILS_WITHIN: Duration = Duration::from_secs(30);

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// A project dir: `config.toml`, and `data/` written by [`write_data_dir`] (image `i` has label
/// `i % classes`). The config trains resnet18 on `side`×`side` images, 1 epoch, batch 2 per rank,
/// one torch thread, no validation; tests change what they need with flags and `--set`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(classes: usize, n_train: usize, n_test: usize, side: u32) -> Project {
        let dir = tempdir();
        write_data_dir(&dir.path().join("data"), classes, n_train, n_test, side);
        write_config(
            dir.path(),
            &format!(
                "[paths]\ndata_dir = \"data\"\ncheckpoint_dir = \"checkpoints\"\nlog_file = \"sac.log\"\n\n\
                 [image]\nwidth = {side}\nheight = {side}\n\n[model]\nname = \"resnet18\"\n\n\
                 [train]\nepochs = 1\nbatch_size = 2\nthreads = 1\nvalidate = false\n"
            ),
        );
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// `--config <abs> train extra…`
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let config = self.path().join("config.toml");
        let mut args = vec!["--config".to_string(), config.to_str().expect("utf-8 temp path").to_string()];
        args.push("train".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `mpiexec -n ranks sac train extra…`; also fails unless every rank is gone once it returns.
    pub fn train_mpi(&self, ranks: usize, extra: &[&str]) -> Output {
        let args = self.args(extra);
        let out = run_mpi(self.path(), ranks, &strs(&args), RUN_TIMEOUT);
        self.assert_no_rank_left();
        out
    }

    /// No process of this project (its config path is on every rank's command line) is running.
    #[track_caller]
    pub fn assert_no_rank_left(&self) {
        assert_no_process_left(self.path().join("config.toml").to_str().unwrap(), Duration::from_secs(5));
    }

    /// `sac train extra…` as one plain process (no mpiexec).
    pub fn train(&self, extra: &[&str]) -> Output {
        let args = self.args(extra);
        run_sac_with_timeout(self.path(), &strs(&args), RUN_TIMEOUT)
    }

    /// `checkpoints/<arch>/` (or `<checkpoint_dir>/<arch>/` for another checkpoint dir).
    pub fn model_dir_in(&self, checkpoint_dir: &str, arch: &str) -> PathBuf {
        self.path().join(checkpoint_dir).join(arch)
    }

    pub fn model_dir(&self, arch: &str) -> PathBuf {
        self.model_dir_in("checkpoints", arch)
    }

    pub fn state(&self, arch: &str) -> Value {
        read_json(&self.model_dir(arch).join("state.json"))
    }

    /// Points row `row` of train.csv at a file of garbage bytes named `corrupt.png`; returns its path.
    pub fn corrupt_train_row(&self, row: usize) -> PathBuf {
        let bad = self.data().join("img/train/corrupt.png");
        // Not an image of any format: what a truncated copy or a disk error leaves behind.
        fs::write(&bad, (0..600u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>()).unwrap();
        let csv_path = self.data().join("train.csv");
        let csv = fs::read_to_string(&csv_path).unwrap();
        let mut lines: Vec<String> = csv.lines().map(str::to_string).collect();
        let fields: Vec<&str> = lines[row + 1].splitn(2, ',').collect();
        lines[row + 1] = format!("img/train/corrupt.png,{}", fields[1]);
        fs::write(&csv_path, lines.join("\n") + "\n").unwrap();
        bad
    }
}

/// What a failed job reported: its stderr, then its log file. An MPI job's failure is checked
/// against both because the last lines a rank writes to stderr just before `MPI_Abort` can be lost:
/// hydra's proxy is killed before it forwards them (a few % of runs under load; see
/// `error_of_an_aborting_rank_always_reaches_stderr`). The log file is written synchronously, so
/// it always has them.
#[track_caller]
pub fn assert_job_fails_with(out: &Output, p: &Project, needles: &[&str]) -> String {
    let err = stderr(out);
    match out.status.code() {
        Some(0) => panic!("the job succeeded but should have failed; stderr:\n{err}"),
        None => panic!("the job was killed by a signal ({:?}); stderr:\n{err}", out.status),
        Some(_) => {}
    }
    let log = fs::read_to_string(p.path().join("sac.log")).unwrap_or_default();
    let text = format!("{err}\n--- sac.log ---\n{log}");
    assert!(!text.contains("panicked at"), "sac panicked:\n{text}");
    for n in needles {
        assert!(text.contains(n), "neither stderr nor sac.log has {n:?}:\n{text}");
    }
    text
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

/// Runs `python -c code args…` with the venv's python; fails the test with its output unless it
/// exits 0. Returns stdout.
pub fn python(code: &str, args: &[&str]) -> String {
    let child = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the venv's python (scripts/setup.sh installs it; or set SAC_PYTHON)");
    let out = wait_with_timeout(child, &["python"], RUN_TIMEOUT);
    assert!(out.status.success(), "python failed ({:?}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
    stdout(&out)
}

/// How two safetensors files of the same model compare.
#[derive(Debug)]
pub struct Comparison {
    /// Same names, dtypes, shapes, metadata, and every tensor's bytes equal.
    pub bitwise: bool,
    /// Largest |a - b| over the float tensors.
    pub max_abs_diff: f64,
}

/// Compares two safetensors files tensor by tensor; panics if their names, dtypes, shapes or
/// metadata differ.
pub fn compare_safetensors(a: &Path, b: &Path) -> Comparison {
    use safetensors::{Dtype, SafeTensors};
    let (ba, bb) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    let (sa, sb) = (SafeTensors::deserialize(&ba).unwrap(), SafeTensors::deserialize(&bb).unwrap());
    let meta = |bytes: &[u8]| SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone();
    assert_eq!(meta(&ba), meta(&bb), "metadata of {} and {}", a.display(), b.display());
    let (mut na, mut nb) = (sa.names(), sb.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "tensor names of {} and {}", a.display(), b.display());
    let mut cmp = Comparison { bitwise: true, max_abs_diff: 0.0 };
    for name in na {
        let (ta, tb) = (sa.tensor(name).unwrap(), sb.tensor(name).unwrap());
        assert_eq!((ta.dtype(), ta.shape()), (tb.dtype(), tb.shape()), "tensor {name}");
        if ta.data() == tb.data() {
            continue;
        }
        cmp.bitwise = false;
        match ta.dtype() {
            Dtype::F32 => {
                let f =
                    |d: &[u8]| d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
                for (x, y) in f(ta.data()).into_iter().zip(f(tb.data())) {
                    cmp.max_abs_diff = cmp.max_abs_diff.max(f64::from((x - y).abs()));
                }
            }
            d => panic!("tensor {name} ({d:?}) differs between {} and {}", a.display(), b.display()),
        }
    }
    cmp
}

/// The metadata of a safetensors file (fails unless it parses completely).
pub fn safetensors_metadata(path: &Path) -> BTreeMap<String, String> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} is not safetensors: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default().into_iter().collect()
}

/// Every one of `ranks` ranks took the interrupted exit (a stop signal; code 130), and so did the job.
#[track_caller]
pub fn assert_interrupted(out: &Output, ranks: usize) {
    let err = stderr(out);
    assert_eq!(err.matches("training stopped by a signal").count(), ranks, "{err}");
    // Every rank exits with 130, and mpiexec usually passes that on. But MPICH 4.0's hydra
    // sometimes loses the exit statuses of ranks it forwarded a signal to and then exits 0 (about
    // 1 run in 4 with a minimal C program that exits 130 on SIGTERM): accept 0 only then, when
    // every rank is known (above) to have taken the interrupted exit.
    match out.status.code() {
        Some(130) => {}
        Some(0) => eprintln!("mpiexec exited 0 although every rank exited 130 (hydra lost their statuses)"),
        other => panic!("exit status {other:?} (want 130); stderr:\n{err}"),
    }
}
