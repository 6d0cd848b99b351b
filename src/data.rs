//! The data dir's CSVs, and images: decode → resize → normalize → batch tensors, with an optional
//! in-memory cache of decoded, resized images within a byte budget.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use polars::prelude::{CsvReadOptions, DataFrame, DataType, SerReader};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::ResizeMode;

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

/// The data dir's class list: label, category id, name, image count.
pub const CLASSES_FILE: &str = "classes.csv";

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
    /// How a whole image becomes width x height.
    pub resize: ResizeMode,
    /// `CenterCrop`: the short side before the crop.
    pub val_resize: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry::from_config(&crate::config::ImageCfg::default())
    }
}

impl Geometry {
    pub fn from_config(c: &crate::config::ImageCfg) -> Self {
        Geometry {
            width: c.width,
            height: c.height,
            mean: c.mean,
            std: c.std,
            resize: c.resize,
            val_resize: c.val_resize(),
        }
    }

    /// Bytes of one decoded, resized RGB image.
    pub fn image_bytes(&self) -> usize {
        (self.width * self.height * 3) as usize
    }

    /// The mean colour as pixel values (what `Pad` and random erasing fill with: 0 after
    /// normalization).
    pub fn mean_pixel(&self) -> [u8; 3] {
        self.mean.map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
    }
}

/// Decoded RGB pixels (HWC, u8) of a `w` x `h` image.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub w: u32,
    pub h: u32,
    pub px: Vec<u8>,
}

/// Decodes image bytes to RGB. JPEGs are decoded at the smallest DCT scale whose image still
/// covers `min_w` x `min_h` (crate::jpeg); everything else, and JPEGs that decoder cannot read, by
/// the image crate, which names the error.
pub fn decode_rgb(bytes: &[u8], min_w: u32, min_h: u32) -> Result<Rgb> {
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    let (w, h, px) = match jpeg.then(|| crate::jpeg::decode_scaled(bytes, min_w, min_h)).flatten() {
        Some(decoded) => decoded,
        None => {
            let img = image::load_from_memory(bytes).context("cannot decode image")?.into_rgb8();
            (img.width(), img.height(), img.into_raw())
        }
    };
    Ok(Rgb { w, h, px })
}

/// Decodes image bytes and makes them the geometry's width x height by its `resize` mode.
pub fn decode_resize(bytes: &[u8], g: &Geometry) -> Result<Vec<u8>> {
    let cover = match g.resize {
        ResizeMode::CenterCrop => (g.val_resize, g.val_resize),
        ResizeMode::Stretch | ResizeMode::Pad => (g.width, g.height),
    };
    fit(&decode_rgb(bytes, cover.0, cover.1)?, g)
}

/// A whole image made width x height: stretched; or its short side resized to `val_resize` and
/// the centre cut out (torchvision's `Resize(val_resize)` then `CenterCrop`, in one resampling);
/// or fitted inside with its aspect ratio and padded with the mean colour.
pub fn fit(img: &Rgb, g: &Geometry) -> Result<Vec<u8>> {
    let (w, h) = (f64::from(img.w), f64::from(img.h));
    let (out_w, out_h) = (g.width, g.height);
    match g.resize {
        ResizeMode::Stretch => resize_region(img, None, out_w, out_h),
        ResizeMode::CenterCrop => {
            // The resized image's size, as torchvision's Resize(int): short side = val_resize,
            // long side int(val_resize × long / short); then the crop's offset, rounded as
            // CenterCrop does, mapped back to the source.
            let s = f64::from(g.val_resize);
            let (rw, rh) = if w <= h { (s, (s * h / w).floor()) } else { ((s * w / h).floor(), s) };
            let (rw, rh) = (rw.max(f64::from(out_w)), rh.max(f64::from(out_h)));
            let left = ((rw - f64::from(out_w)) / 2.0).round();
            let top = ((rh - f64::from(out_h)) / 2.0).round();
            let (sx, sy) = (w / rw, h / rh);
            let region = (left * sx, top * sy, f64::from(out_w) * sx, f64::from(out_h) * sy);
            resize_region(img, Some(region), out_w, out_h)
        }
        ResizeMode::Pad => {
            let scale = (f64::from(out_w) / w).min(f64::from(out_h) / h);
            let rw = ((w * scale).round() as u32).clamp(1, out_w);
            let rh = ((h * scale).round() as u32).clamp(1, out_h);
            let inner = resize_region(img, None, rw, rh)?;
            let fill = g.mean_pixel();
            let mut out: Vec<u8> = std::iter::repeat_n(fill, (out_w * out_h) as usize).flatten().collect();
            let (x0, y0) = ((out_w - rw) / 2, (out_h - rh) / 2);
            for y in 0..rh {
                let dst = (((y0 + y) * out_w + x0) * 3) as usize;
                let src = (y * rw * 3) as usize;
                out[dst..dst + (rw * 3) as usize].copy_from_slice(&inner[src..src + (rw * 3) as usize]);
            }
            Ok(out)
        }
    }
}

/// The region `(left, top, width, height)` of `img` (all of it for None), resampled to
/// `out_w` x `out_h` with a bilinear (triangle) filter that widens with the scale factor when
/// shrinking, as PIL's `BILINEAR` and torchvision's `Resize(antialias=True)` do; SIMD
/// (fast_image_resize) where the CPU has it.
pub fn resize_region(img: &Rgb, region: Option<(f64, f64, f64, f64)>, out_w: u32, out_h: u32) -> Result<Vec<u8>> {
    use fast_image_resize::{
        images::Image, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
    };
    let whole = (0.0, 0.0, f64::from(img.w), f64::from(img.h));
    if region.is_none_or(|r| r == whole) && (img.w, img.h) == (out_w, out_h) {
        return Ok(img.px.clone());
    }
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    let src = ImageRef::new(img.w, img.h, &img.px, PixelType::U8x3).context("image buffer of the wrong size")?;
    let mut dst = Image::new(out_w, out_h, PixelType::U8x3);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some((left, top, width, height)) = region {
        options = options.crop(left, top, width, height);
    }
    RESIZER.with(|r| r.borrow_mut().resize(&src, &mut dst, &options)).context("cannot resize image")?;
    Ok(dst.into_vec())
}

/// `img` with its short side brought down to `short` (aspect kept; smaller images stay as they
/// are): what the training cache keeps to crop from.
pub fn shrink_to_short_side(img: Rgb, short: u32) -> Result<Rgb> {
    let s = img.w.min(img.h);
    if s <= short {
        return Ok(img);
    }
    let scale = f64::from(short) / f64::from(s);
    let (w, h) =
        (((f64::from(img.w) * scale).round() as u32).max(1), ((f64::from(img.h) * scale).round() as u32).max(1));
    Ok(Rgb { w, h, px: resize_region(&img, None, w, h)? })
}

/// Reads and decodes one file to width x height.
pub fn load_image(path: &Path, g: &Geometry) -> Result<Vec<u8>> {
    load_with(path, |bytes| decode_resize(bytes, g))
}

/// Reads one file and decodes its bytes with `decode`; errors name the file.
fn load_with<T>(path: &Path, decode: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode(&bytes).with_context(|| format!("{}", path.display()))
}

/// A decoded image as the network input: as it is when it already has the input size (the
/// cache keeps inputs), else made so by `fit`.
pub fn into_input(img: Rgb, g: &Geometry) -> Result<Vec<u8>> {
    if (img.w, img.h) == (g.width, g.height) {
        Ok(img.px)
    } else {
        fit(&img, g)
    }
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
///
/// An image is kept as the network input (width x height, by `[image] resize`), or, for random
/// crops, whole with its short side at most `crop_source` pixels (`[image] cache_size`).
pub struct ImageStore {
    root: PathBuf,
    geometry: Geometry,
    crop_source: Option<u32>,
    cache: Vec<Option<Rgb>>,
    budget: u64,
    used: u64,
    held: usize,
}

impl ImageStore {
    /// A store for a shard of `len` images with a cache of at most `budget` bytes (0: none),
    /// keeping whole images of short side `crop_source` if set.
    pub fn new(root: &Path, geometry: Geometry, crop_source: Option<u32>, len: usize, budget: u64) -> Self {
        let cache = if budget >= geometry.image_bytes() as u64 { vec![None; len] } else { Vec::new() };
        ImageStore { root: root.to_path_buf(), geometry, crop_source, cache, budget, used: 0, held: 0 }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Bytes the cache holds, and how many images.
    pub fn held(&self) -> (u64, usize) {
        (self.used, self.held)
    }

    /// Does the cache hold image `index`?
    pub fn holds(&self, index: usize) -> bool {
        self.cache.get(index).is_some_and(Option::is_some)
    }

    fn load(&self, rel: &str) -> Result<Rgb> {
        let g = &self.geometry;
        load_with(&self.root.join(rel), |bytes| match self.crop_source {
            Some(short) => decode_rgb(bytes, short, short).and_then(|img| shrink_to_short_side(img, short)),
            None => decode_resize(bytes, g).map(|px| Rgb { w: g.width, h: g.height, px }),
        })
    }

    /// Image `index` (its position in the rank's shard) at `rel`.
    pub fn get(&mut self, index: usize, rel: &str) -> Result<Rgb> {
        let (img, decoded) = self.fetch(index, rel)?;
        if decoded {
            self.keep(index, img.clone());
        }
        Ok(img)
    }

    /// Image `index` from the cache, or decoded from `rel` without keeping it (several threads may
    /// fetch at once; `keep` then caches, in one thread): the image, and whether it was decoded.
    pub fn fetch(&self, index: usize, rel: &str) -> Result<(Rgb, bool)> {
        if let Some(Some(img)) = self.cache.get(index) {
            return Ok((img.clone(), false));
        }
        Ok((self.load(rel)?, true))
    }

    /// Whether the cache may still take a decoded image (its budget is not spent).
    pub fn has_room(&self) -> bool {
        !self.cache.is_empty() && self.used < self.budget
    }

    /// Keeps the decoded image `index` if the cache does not hold it yet and its budget allows.
    pub fn keep(&mut self, index: usize, img: Rgb) {
        let size = img.px.len() as u64;
        if index < self.cache.len() && self.cache[index].is_none() && self.used + size <= self.budget {
            self.used += size;
            self.held += 1;
            self.cache[index] = Some(img);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_matches_torchvision_to_tensor_then_normalize() {
        // torchvision: Normalize(mean, std)(ToTensor()(img)) = (v/255 - mean) / std, CHW.
        let g = Geometry { width: 2, height: 1, mean: [0.5, 0.25, 0.0], std: [0.5, 0.25, 1.0], ..Geometry::default() };
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
        let g = Geometry { width: 128, height: 128, mean: [0.0; 3], std: [1.0; 3], ..Geometry::default() };
        assert_eq!(decode_resize(&jpg, &g).unwrap().len(), 128 * 128 * 3);
        assert!(decode_resize(&jpg[..100], &g).is_err(), "a truncated header is an error");
    }

    #[test]
    fn grayscale_png_decodes_to_rgb_at_the_configured_size() {
        let mut png = Vec::new();
        image::GrayImage::from_pixel(28, 28, image::Luma([200]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let g = Geometry { width: 64, height: 32, mean: [0.0; 3], std: [1.0; 3], ..Geometry::default() };
        let rgb = decode_resize(&png, &g).unwrap();
        assert_eq!(rgb.len(), 64 * 32 * 3);
        assert!(rgb.iter().all(|&v| v == 200));
        assert!(decode_resize(b"not an image", &g).is_err());
    }

    /// A 40x20 image whose left half is red and right half blue, made 8x8 each way.
    #[test]
    fn stretch_center_crop_and_pad_make_the_input_size_as_torchvision_would() {
        let px: Vec<u8> =
            (0..20).flat_map(|_| (0..40).flat_map(|x| if x < 20 { [255, 0, 0] } else { [0, 0, 255] })).collect();
        let img = Rgb { w: 40, h: 20, px };
        let g = |resize, val_resize| Geometry { width: 8, height: 8, resize, val_resize, ..Geometry::default() };
        let at =
            |out: &[u8], x: usize, y: usize| [out[(y * 8 + x) * 3], out[(y * 8 + x) * 3 + 1], out[(y * 8 + x) * 3 + 2]];
        // Stretch: both halves, 4 columns each.
        let s = fit(&img, &g(ResizeMode::Stretch, 9)).unwrap();
        assert_eq!((at(&s, 0, 0), at(&s, 7, 7)), ([255, 0, 0], [0, 0, 255]));
        // Centre crop: short side 9 → 18x9, the centre 8x8 spans columns 5..13 of 18: the middle.
        let c = fit(&img, &g(ResizeMode::CenterCrop, 9)).unwrap();
        assert_eq!((at(&c, 0, 4), at(&c, 7, 4)), ([255, 0, 0], [0, 0, 255]));
        assert_eq!(c.len(), 8 * 8 * 3);
        // Pad: 8x4 in the middle rows, the mean colour above and below.
        let p = fit(&img, &g(ResizeMode::Pad, 9)).unwrap();
        let mean = Geometry::default().mean_pixel();
        assert_eq!((at(&p, 3, 0), at(&p, 3, 7)), (mean, mean));
        assert_eq!((at(&p, 0, 3), at(&p, 7, 4)), ([255, 0, 0], [0, 0, 255]));
    }

    #[test]
    fn cache_holds_images_up_to_its_budget_and_decodes_the_rest_each_time() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u8 {
            image::RgbImage::from_pixel(20, 10, image::Rgb([i * 40, 0, 0]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let g = Geometry { width: 8, height: 8, mean: [0.0; 3], std: [1.0; 3], ..Geometry::default() };
        let one = g.image_bytes() as u64;
        // Room for 2 images and a half: 2 are kept, in the order they were first used.
        let mut store = ImageStore::new(dir.path(), g, None, 5, 2 * one + one / 2);
        for round in 0..2 {
            for i in [3usize, 1, 4, 0, 2] {
                let img = store.get(i, &format!("{i}.png")).unwrap();
                assert_eq!((img.w, img.h, img.px[0]), (8, 8, i as u8 * 40), "round {round}, image {i}");
                assert_eq!(store.holds(i), i == 3 || i == 1, "image {i}");
            }
        }
        assert_eq!(store.held(), (2 * one, 2));
        // Image 3 comes from memory: removing its file does not matter.
        std::fs::remove_file(dir.path().join("3.png")).unwrap();
        assert!(store.get(3, "3.png").is_ok());
        assert!(store.get(0, "0.png").is_ok() && store.get(4, "gone.png").is_err());

        let mut none = ImageStore::new(dir.path(), g, None, 5, 0);
        assert!(none.get(1, "1.png").is_ok() && !none.holds(1));
        assert_eq!(none.held(), (0, 0));
        // For random crops the whole 20x10 image is kept, its short side at most 6: 12x6.
        let mut whole = ImageStore::new(dir.path(), g, Some(6), 5, u64::MAX);
        let img = whole.get(2, "2.png").unwrap();
        assert_eq!((img.w, img.h, img.px.len()), (12, 6, 12 * 6 * 3));
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
