//! The data dir's CSVs, and images: decode → resize → normalize → batch tensors, with an optional
//! in-memory cache of decoded, resized images within a byte budget.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use polars::prelude::{CsvReadOptions, DataFrame, DataType, SerReader};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// One row of `train.csv` / `test.csv`. `label` is -1 when the split has no labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub path: String,
    pub label: i64,
    pub category_id: i64,
    pub image_id: i64,
}

/// One row of `classes.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub label: i64,
    pub category_id: i64,
    pub name: String,
    pub count: i64,
}

fn read_csv(path: &Path) -> Result<DataFrame> {
    ensure!(path.is_file(), "{} not found: run `sac create-dataset` first (or check paths.data_dir)", path.display());
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .with_context(|| format!("reading {}", path.display()))
}

fn int_column(df: &DataFrame, name: &str, file: &Path) -> Result<Vec<i64>> {
    let col = df.column(name).with_context(|| format!("{}: no column `{name}`", file.display()))?;
    let col =
        col.cast(&DataType::Int64).with_context(|| format!("{}: column `{name}` is not integer", file.display()))?;
    let ca = col.i64().expect("cast to i64");
    ca.iter()
        .enumerate()
        .map(|(i, v)| v.with_context(|| format!("{}: row {} has no `{name}`", file.display(), i + 2)))
        .collect()
}

fn str_column(df: &DataFrame, name: &str, file: &Path) -> Result<Vec<String>> {
    let col = df.column(name).with_context(|| format!("{}: no column `{name}`", file.display()))?;
    let col = col.cast(&DataType::String)?;
    let ca = col.str().expect("cast to str");
    ca.iter()
        .enumerate()
        .map(|(i, v)| {
            v.map(str::to_string).with_context(|| format!("{}: row {} has no `{name}`", file.display(), i + 2))
        })
        .collect()
}

/// Reads a split CSV. A split without a `label` column (an unlabeled test set) gets label -1.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let df = read_csv(path)?;
    let paths = str_column(&df, "path", path)?;
    let image_ids = int_column(&df, "image_id", path)?;
    let n = paths.len();
    let labels = if df.column("label").is_ok() { int_column(&df, "label", path)? } else { vec![-1; n] };
    let cats = if df.column("category_id").is_ok() { int_column(&df, "category_id", path)? } else { vec![-1; n] };
    Ok((0..n)
        .map(|i| Row { path: paths[i].clone(), label: labels[i], category_id: cats[i], image_id: image_ids[i] })
        .collect())
}

/// Reads an unlabeled split (`predict.csv`): only `path` and `image_id` count; every label is -1.
pub fn read_unlabeled_rows(path: &Path) -> Result<Vec<Row>> {
    let df = read_csv(path)?;
    let paths = str_column(&df, "path", path)?;
    let image_ids = int_column(&df, "image_id", path)?;
    Ok(paths
        .into_iter()
        .zip(image_ids)
        .map(|(path, image_id)| Row { path, label: -1, category_id: -1, image_id })
        .collect())
}

/// Reads `classes.csv` and checks that labels are 0..K-1 in order.
pub fn read_classes(path: &Path) -> Result<Vec<Class>> {
    let df = read_csv(path)?;
    let labels = int_column(&df, "label", path)?;
    let cats = int_column(&df, "category_id", path)?;
    let names = str_column(&df, "name", path)?;
    let counts = int_column(&df, "count", path)?;
    let classes: Vec<Class> = (0..labels.len())
        .map(|i| Class { label: labels[i], category_id: cats[i], name: names[i].clone(), count: counts[i] })
        .collect();
    ensure!(!classes.is_empty(), "{}: no classes", path.display());
    for (i, c) in classes.iter().enumerate() {
        ensure!(
            c.label == i as i64,
            "{}: row {} has label {}, expected {i} (labels are 0..K-1 in order)",
            path.display(),
            i + 2,
            c.label
        );
    }
    Ok(classes)
}

/// Every labeled row's label must be a class.
pub fn check_labels(rows: &[Row], classes: usize, file: &Path) -> Result<()> {
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.label >= classes as i64 || r.label < -1) {
        bail!("{}: row {} has label {}, but classes.csv has {classes} classes", file.display(), i + 2, r.label);
    }
    Ok(())
}

/// Image geometry and normalization, from `[image]`.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Geometry {
    pub fn from_config(c: &crate::config::ImageCfg) -> Self {
        Geometry { width: c.width, height: c.height, mean: c.mean, std: c.std }
    }

    /// Bytes of one decoded, resized RGB image.
    pub fn image_bytes(&self) -> usize {
        (self.width * self.height * 3) as usize
    }
}

/// Decodes image bytes and resizes them to the geometry: RGB, HWC, u8.
pub fn decode_resize(bytes: &[u8], g: &Geometry) -> Result<Vec<u8>> {
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    // JPEGs at a reduced DCT scale (crate::jpeg); everything else, and JPEGs that decoder
    // cannot read, by the image crate, which names the error.
    let (w, h, px) = match jpeg.then(|| crate::jpeg::decode_scaled(bytes, g.width, g.height)).flatten() {
        Some(decoded) => decoded,
        None => {
            let img = image::load_from_memory(bytes).context("cannot decode image")?.into_rgb8();
            (img.width(), img.height(), img.into_raw())
        }
    };
    resize_rgb(w, h, px, g)
}

/// Resizes RGB pixels to the geometry with a bilinear (triangle) filter that widens with the
/// scale factor when shrinking, as PIL's `BILINEAR` and torchvision's `Resize` do; SIMD
/// (fast_image_resize) where the CPU has it.
fn resize_rgb(w: u32, h: u32, px: Vec<u8>, g: &Geometry) -> Result<Vec<u8>> {
    use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    if (w, h) == (g.width, g.height) {
        return Ok(px);
    }
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    let src = Image::from_vec_u8(w, h, px, PixelType::U8x3).context("image buffer of the wrong size")?;
    let mut dst = Image::new(g.width, g.height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER.with(|r| r.borrow_mut().resize(&src, &mut dst, &options)).context("cannot resize image")?;
    Ok(dst.into_vec())
}

/// Reads and decodes one file.
pub fn load_image(path: &Path, g: &Geometry) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_resize(&bytes, g).with_context(|| format!("{}", path.display()))
}

/// Normalized float CHW values of decoded images, concatenated (`n * 3 * h * w`).
pub fn normalize_into(images: &[&[u8]], g: &Geometry, out: &mut Vec<f32>) {
    let hw = (g.width * g.height) as usize;
    out.clear();
    out.reserve(images.len() * 3 * hw);
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * g.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| g.mean[c] / g.std[c]);
    for img in images {
        for c in 0..3 {
            out.extend(img[c..].iter().step_by(3).take(hw).map(|&v| v as f32 * scale[c] - shift[c]));
        }
    }
}

/// A batch tensor `[n, 3, h, w]` from normalized values.
pub fn batch_tensor(values: &[f32], n: usize, g: &Geometry) -> Tensor {
    Tensor::from_slice(values).view([n as i64, 3, g.height as i64, g.width as i64]).to_kind(Kind::Float)
}

/// The memory this process may still use: the node's `MemAvailable` (/proc/meminfo), or less
/// when the job's cgroup (Slurm's and PBS's memory limits) leaves less; None if unreadable.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let node = kib * 1024;
    Some(cgroup_headroom().map_or(node, |room| room.min(node)))
}

/// The cgroup's memory limit minus its current use (cgroup v2, else v1); None without a limit.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse::<u64>().ok());
    // The process's own cgroup (v2: one line "0::/path").
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        if let (Some(max), Some(cur)) = (read(&format!("{dir}/memory.max")), read(&format!("{dir}/memory.current"))) {
            return Some(max.saturating_sub(cur));
        }
    }
    let v1 = own.lines().find_map(|l| l.split(':').nth(2).filter(|_| l.split(':').nth(1) == Some("memory")))?;
    let dir = format!("/sys/fs/cgroup/memory{}", v1.trim_end_matches('/'));
    let (max, cur) = (read(&format!("{dir}/memory.limit_in_bytes"))?, read(&format!("{dir}/memory.usage_in_bytes"))?);
    // v1 reports "no limit" as a huge number.
    (max < 1 << 60).then(|| max.saturating_sub(cur))
}

/// The share of the node's available memory that `train.cache = "auto"` gives all of its ranks'
/// caches together: the rest stays for the models, libtorch's buffers, MPI and the page cache.
pub const AUTO_CACHE_SHARE: f64 = 0.5;

/// The byte budget of one rank's cache under `setting`, for a node with `local_ranks` ranks.
pub fn cache_budget(setting: crate::config::Cache, local_ranks: usize, available: Option<u64>) -> u64 {
    use crate::config::Cache;
    match setting {
        Cache::Off => 0,
        Cache::All => u64::MAX,
        Cache::Bytes(b) => b,
        // Without /proc/meminfo (not Linux), nothing is assumed: no cache.
        Cache::Auto => available.map_or(0, |a| (a as f64 * AUTO_CACHE_SHARE) as u64 / local_ranks.max(1) as u64),
    }
}

/// A rank's images: decoded on first use; kept in memory while the cache's byte budget allows.
/// Images are kept in the order they are first used and never evicted, so a full cache serves a
/// fixed part of the shard from memory and decodes the rest every epoch.
pub struct ImageStore {
    root: PathBuf,
    geometry: Geometry,
    cache: Vec<Option<Box<[u8]>>>,
    budget: u64,
    used: u64,
    held: usize,
}

impl ImageStore {
    /// A store for a shard of `len` images with a cache of at most `budget` bytes (0: none).
    pub fn new(root: &Path, geometry: Geometry, len: usize, budget: u64) -> Self {
        let cache = if budget >= geometry.image_bytes() as u64 { vec![None; len] } else { Vec::new() };
        ImageStore { root: root.to_path_buf(), geometry, cache, budget, used: 0, held: 0 }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Bytes the cache holds, and how many images.
    pub fn held(&self) -> (u64, usize) {
        (self.used, self.held)
    }

    /// Image `index` (its position in the rank's shard) at `rel`.
    pub fn get(&mut self, index: usize, rel: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        if self.cache.get(index).is_some_and(Option::is_some) {
            return Ok(std::borrow::Cow::Borrowed(self.cache[index].as_deref().expect("checked")));
        }
        let img = load_image(&self.root.join(rel), &self.geometry)?;
        let size = img.len() as u64;
        if index < self.cache.len() && self.used + size <= self.budget {
            self.used += size;
            self.held += 1;
            let slot = &mut self.cache[index];
            return Ok(std::borrow::Cow::Borrowed(slot.insert(img.into_boxed_slice())));
        }
        Ok(std::borrow::Cow::Owned(img))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_matches_torchvision_to_tensor_then_normalize() {
        // torchvision: Normalize(mean, std)(ToTensor()(img)) = (v/255 - mean) / std, CHW.
        let g = Geometry { width: 2, height: 1, mean: [0.5, 0.25, 0.0], std: [0.5, 0.25, 1.0] };
        let img: Vec<u8> = vec![255, 0, 51, 0, 255, 102]; // HWC: pixel0 = (255,0,51), pixel1 = (0,255,102)
        let mut out = Vec::new();
        normalize_into(&[&img], &g, &mut out);
        let want = [1.0, -1.0, -1.0, 3.0, 0.2, 0.4];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn large_jpeg_decodes_to_the_configured_size_and_a_truncated_one_is_an_error() {
        let img = image::RgbImage::from_fn(1000, 680, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut jpg = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
        let g = Geometry { width: 128, height: 128, mean: [0.0; 3], std: [1.0; 3] };
        assert_eq!(decode_resize(&jpg, &g).unwrap().len(), 128 * 128 * 3);
        assert!(decode_resize(&jpg[..100], &g).is_err(), "a truncated header is an error");
    }

    #[test]
    fn grayscale_png_decodes_to_rgb_at_the_configured_size() {
        let mut png = Vec::new();
        image::GrayImage::from_pixel(28, 28, image::Luma([200]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let g = Geometry { width: 64, height: 32, mean: [0.0; 3], std: [1.0; 3] };
        let rgb = decode_resize(&png, &g).unwrap();
        assert_eq!(rgb.len(), 64 * 32 * 3);
        assert!(rgb.iter().all(|&v| v == 200));
        assert!(decode_resize(b"not an image", &g).is_err());
    }

    #[test]
    fn cache_holds_images_up_to_its_budget_and_decodes_the_rest_each_time() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u8 {
            image::RgbImage::from_pixel(20, 10, image::Rgb([i * 40, 0, 0]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let g = Geometry { width: 8, height: 8, mean: [0.0; 3], std: [1.0; 3] };
        let one = g.image_bytes() as u64;
        // Room for 2 images and a half: 2 are kept, in the order they were first used.
        let mut store = ImageStore::new(dir.path(), g, 5, 2 * one + one / 2);
        for round in 0..2 {
            for i in [3usize, 1, 4, 0, 2] {
                let img = store.get(i, &format!("{i}.png")).unwrap();
                assert_eq!(img[0], i as u8 * 40, "round {round}, image {i}");
                assert_eq!(matches!(img, std::borrow::Cow::Borrowed(_)), i == 3 || i == 1, "image {i}");
            }
        }
        assert_eq!(store.held(), (2 * one, 2));
        // Image 3 comes from memory: removing its file does not matter.
        std::fs::remove_file(dir.path().join("3.png")).unwrap();
        assert!(store.get(3, "3.png").is_ok());
        assert!(store.get(0, "0.png").is_ok() && store.get(4, "gone.png").is_err());

        let mut none = ImageStore::new(dir.path(), g, 5, 0);
        assert!(matches!(none.get(1, "1.png").unwrap(), std::borrow::Cow::Owned(_)));
        assert_eq!(none.held(), (0, 0));
    }

    #[test]
    fn cache_budget_of_auto_shares_half_the_available_memory_among_the_node_ranks() {
        use crate::config::Cache;
        let gib = 1u64 << 30;
        assert_eq!(cache_budget(Cache::Auto, 4, Some(16 * gib)), 2 * gib);
        assert_eq!(cache_budget(Cache::Auto, 4, None), 0);
        assert_eq!(cache_budget(Cache::Off, 1, Some(gib)), 0);
        assert_eq!(cache_budget(Cache::All, 1, None), u64::MAX);
        assert_eq!(cache_budget(Cache::Bytes(123), 8, Some(gib)), 123);
        assert!(available_memory().is_some_and(|m| m > 0), "Linux has MemAvailable");
    }
}
