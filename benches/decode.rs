//! sac's image loader on large JPEGs: decode + resize to 128x128, images per second on one thread.
//!
//! ```text
//! SAC_BENCH_JPEGS=dir cargo bench --bench decode     # the JPEG files of `dir` (bench/run.sh makes them)
//! cargo bench --bench decode                         # 20 synthetic 1000x680 JPEGs
//! ```
//! Prints one JSON line: `images_per_second` for `sac::data::load_image` (which decodes JPEGs at a
//! reduced DCT scale), and `images_per_second_full` for a full-size decode then the same resize.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use sac::data::{load_image, Geometry};

const SIZE: u32 = 128;

fn jpeg_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no .jpg files in {}", dir.display());
    Ok(files)
}

/// A few herbarium-sheet-sized JPEGs when no directory is given.
fn synthetic(dir: &Path, count: u32) -> Result<()> {
    for i in 0..count {
        let img = image::RgbImage::from_fn(1000, 680, |x, y| {
            image::Rgb([((x * (i + 1)) % 256) as u8, ((y * 2 + i) % 256) as u8, (((x + y) / 3) % 256) as u8])
        });
        img.save(dir.join(format!("{i:04}.jpg")))?;
    }
    Ok(())
}

/// One untimed pass (page cache, first-use set-up), then the median rate of three timed passes, as
/// bench/baselines.py does for PIL.
fn rate(files: &[PathBuf], mut f: impl FnMut(&Path) -> Result<Vec<u8>>) -> Result<f64> {
    let mut rates = Vec::new();
    for rep in 0..4 {
        let t = Instant::now();
        for p in files {
            let px = f(p)?;
            assert_eq!(px.len(), (SIZE * SIZE * 3) as usize);
        }
        if rep > 0 {
            rates.push(files.len() as f64 / t.elapsed().as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

fn main() -> Result<()> {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir()?;
    let dir = match std::env::var_os("SAC_BENCH_JPEGS") {
        Some(d) => PathBuf::from(d),
        None => {
            synthetic(tmp.path(), 20)?;
            tmp.path().to_path_buf()
        }
    };
    let files = jpeg_files(&dir)?;
    let g = Geometry { width: SIZE, height: SIZE, mean: [0.0; 3], std: [1.0; 3], ..Geometry::default() };
    let sac = rate(&files, |p| load_image(p, &g))?;
    let full = rate(&files, |p| {
        let img = image::open(p)?;
        Ok(img.resize_exact(SIZE, SIZE, FilterType::Triangle).into_rgb8().into_raw())
    })?;
    println!(
        "{}",
        serde_json::json!({"what": "decode", "impl": "sac", "n": 1, "images": files.len(),
                           "images_per_second": sac, "images_per_second_full": full})
    );
    Ok(())
}
