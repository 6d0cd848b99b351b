//! MNIST-style IDX files (MNIST, Fashion-MNIST), gzip or plain: `train-images-idx3-ubyte[.gz]` with
//! `train-labels-idx1-ubyte[.gz]`, and the same for `t10k`. All sets found are pooled; image ids
//! number the pooled images (train first).
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;

use super::source::{Category, ImageData, ImageSet, Item, Source};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const FASHION_NAMES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

fn open(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut r: Box<dyn Read> =
        if gz { Box::new(GzDecoder::new(BufReader::new(f))) } else { Box::new(BufReader::new(f)) };
    r.read_to_end(&mut out).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(out)
}

fn header(bytes: &[u8], words: usize, path: &Path) -> Result<Vec<u32>> {
    ensure!(bytes.len() >= 4 * words, "{}: too short for an IDX header ({} bytes)", path.display(), bytes.len());
    Ok((0..words).map(|i| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))).collect())
}

pub fn parse_images(bytes: &[u8], path: &Path) -> Result<ImageSet> {
    let magic = header(bytes, 1, path)?[0];
    if magic != IMAGES_MAGIC {
        bail!(
            "{}: bad magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x} (unsigned-byte images, 3 dimensions)",
            path.display()
        );
    }
    let h = header(bytes, 4, path)?;
    let (n, rows, cols) = (h[1] as usize, h[2], h[3]);
    let want = (rows as usize).checked_mul(cols as usize).and_then(|px| px.checked_mul(n)).with_context(|| {
        format!("{}: header says {n} images of {rows}x{cols}, which cannot be a real file", path.display())
    })?;
    let data = &bytes[16..];
    ensure!(
        data.len() == want,
        "{}: header says {n} images of {rows}x{cols} ({want} bytes), the file holds {} bytes",
        path.display(),
        data.len()
    );
    Ok(ImageSet { rows, cols, pixels: data.to_vec() })
}

pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let magic = header(bytes, 1, path)?[0];
    if magic != LABELS_MAGIC {
        bail!(
            "{}: bad magic number {magic:#010x}, expected {LABELS_MAGIC:#010x} (unsigned-byte labels)",
            path.display()
        );
    }
    let n = header(bytes, 2, path)?[1] as usize;
    let data = &bytes[8..];
    ensure!(data.len() == n, "{}: header says {n} labels, the file holds {}", path.display(), data.len());
    Ok(data.to_vec())
}

/// `dir/<prefix>-<kind>-idx?-ubyte[.gz]`, if present.
fn find(dir: &Path, prefix: &str, kind: &str) -> Option<PathBuf> {
    let dims = if kind == "images" { 3 } else { 1 };
    let base = format!("{prefix}-{kind}-idx{dims}-ubyte");
    [format!("{base}.gz"), base.clone(), format!("{prefix}-{kind}.idx{dims}-ubyte")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

pub fn read(dir: &Path) -> Result<Source> {
    if !dir.is_dir() {
        bail!("{} is not a directory of IDX files", dir.display());
    }
    let mut source = Source::default();
    let mut counts = [0usize; 256];
    for prefix in ["train", "t10k"] {
        let (images, labels) = match (find(dir, prefix, "images"), find(dir, prefix, "labels")) {
            (None, None) => continue,
            (Some(i), Some(l)) => (i, l),
            (Some(i), None) => bail!("{} has no matching {prefix}-labels-idx1-ubyte[.gz]", i.display()),
            (None, Some(l)) => bail!("{} has no matching {prefix}-images-idx3-ubyte[.gz]", l.display()),
        };
        let set = parse_images(&open(&images)?, &images)?;
        let labs = parse_labels(&open(&labels)?, &labels)?;
        let n = set.pixels.len() / (set.rows as usize * set.cols as usize).max(1);
        ensure!(
            n == labs.len(),
            "mismatched counts: {} holds {n} images but {} holds {} labels",
            images.display(),
            labels.display(),
            labs.len()
        );
        let set_no = source.idx.len();
        for (index, &label) in labs.iter().enumerate() {
            counts[label as usize] += 1;
            let image_id = source.items.len() as i64;
            source.items.push(Item {
                data: ImageData::Idx { set: set_no, index },
                rel: PathBuf::from(format!("{label}/{image_id}.png")),
                category_id: label as i64,
                image_id,
            });
        }
        source.idx.push(set);
    }
    if source.idx.is_empty() {
        bail!(
            "{} holds no IDX files (expected train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz])",
            dir.display()
        );
    }
    let fashion = dir.to_string_lossy().to_ascii_lowercase().contains("fashion");
    source.categories = (0..256)
        .filter(|&c| counts[c] > 0)
        .map(|c| Category {
            id: c as i64,
            name: match FASHION_NAMES.get(c) {
                Some(n) if fashion => (*n).to_string(),
                _ => c.to_string(),
            },
        })
        .collect();
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tiny_image_file_and_refuses_bad_magic() {
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 1];
        b.extend([1, 2, 3, 4]);
        let s = parse_images(&b, Path::new("x")).unwrap();
        assert_eq!((s.rows, s.cols), (2, 1));
        assert_eq!(s.image(1), [3, 4]);
        b[3] = 1;
        assert!(format!("{:#}", parse_images(&b, Path::new("x")).unwrap_err()).contains("bad magic number"));
    }

    #[test]
    fn truncated_label_file_is_refused() {
        let b = [0, 0, 8, 1, 0, 0, 0, 3, 1, 2];
        assert!(format!("{:#}", parse_labels(&b, Path::new("l")).unwrap_err()).contains("header says 3 labels"));
    }
}
