//! An image folder: one sub-directory per class, as torchvision's `ImageFolder` reads it.
//! Classes and files are taken in sorted name order (never `read_dir` order), so ids are stable.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::warn;

use super::source::{Category, ImageData, Item, Source};

/// File endings read as images (lower case), as torchvision's `IMG_EXTENSIONS`.
pub const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// All image files below `dir`, recursively, in sorted order.
fn images_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            images_below(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

pub fn read(root: &Path) -> Result<Source> {
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let class_dirs: Vec<PathBuf> = sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    if class_dirs.is_empty() {
        bail!("{} has no class sub-directories (expected one directory per class)", root.display());
    }
    let mut source = Source { root: root.to_path_buf(), ..Default::default() };
    let mut empty = Vec::new();
    for dir in class_dirs {
        let name = dir.file_name().expect("entry has a name").to_string_lossy().into_owned();
        let mut files = Vec::new();
        images_below(&dir, &mut files)?;
        if files.is_empty() {
            empty.push(name);
            continue;
        }
        let id = source.categories.len() as i64;
        for f in files {
            let rel = f.strip_prefix(root).expect("below root").to_path_buf();
            let image_id = source.items.len() as i64;
            source.items.push(Item { data: ImageData::File, rel, category_id: id, image_id });
        }
        source.categories.push(Category { id, name });
    }
    if source.items.is_empty() {
        bail!(
            "{} holds no images in its class directories (looked for .{})",
            root.display(),
            IMAGE_EXTENSIONS.join(", .")
        );
    }
    if !empty.is_empty() {
        warn!("{} class directories hold no images and are left out: {}", empty.len(), empty.join(", "));
    }
    Ok(source)
}
