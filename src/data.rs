//! The data dir's CSVs, and images: decode → resize → normalize → batch tensors, with an optional
//! in-memory cache of decoded, resized images.
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

/// A rank's images: decoded on first use, kept in memory when `cache` is on.
pub struct ImageStore {
    root: PathBuf,
    geometry: Geometry,
    cache: Option<Vec<Option<Box<[u8]>>>>,
}

impl ImageStore {
    pub fn new(root: &Path, geometry: Geometry, len: usize, cache: bool) -> Self {
        ImageStore { root: root.to_path_buf(), geometry, cache: cache.then(|| vec![None; len]) }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Image `index` (its position in the rank's shard) at `rel`.
    pub fn get(&mut self, index: usize, rel: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        let path = self.root.join(rel);
        match &mut self.cache {
            Some(cache) => {
                if cache[index].is_none() {
                    cache[index] = Some(load_image(&path, &self.geometry)?.into_boxed_slice());
                }
                Ok(std::borrow::Cow::Borrowed(cache[index].as_deref().expect("filled")))
            }
            None => Ok(std::borrow::Cow::Owned(load_image(&path, &self.geometry)?)),
        }
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
}
