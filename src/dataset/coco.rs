//! FGVC/COCO `metadata.json` (Herbarium 2021/2022, iNaturalist):
//! `images[{id, file_name, …}]`, `annotations[{image_id, category_id, …}]`, `categories[{id, name, …}]`.
//!
//! Parsed as a stream into compact records (unknown keys are skipped without being kept), so memory
//! grows with the number of images, not with the size of the file.
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tracing::warn;

use super::source::{Category, ImageData, Item, Source};

#[derive(Deserialize)]
struct Metadata {
    images: Vec<Image>,
    #[serde(default)]
    annotations: Vec<Annotation>,
    #[serde(default)]
    categories: Vec<Cat>,
}

#[derive(Deserialize)]
struct Image {
    id: i64,
    file_name: String,
}

#[derive(Deserialize)]
struct Annotation {
    image_id: i64,
    category_id: i64,
}

#[derive(Deserialize)]
struct Cat {
    id: i64,
    #[serde(default)]
    name: Option<String>,
}

/// `path` is the metadata file or the directory that holds `metadata.json`.
pub fn read(path: &Path) -> Result<Source> {
    let (file, root, meta) = parse(path)?;
    build(meta, &root, &file)
}

/// The metadata file at `path` (or `path/metadata.json`), the directory its file names are
/// relative to, and its parsed contents.
fn parse(path: &Path) -> Result<(PathBuf, PathBuf, Metadata)> {
    let file = if path.is_dir() { path.join("metadata.json") } else { path.to_path_buf() };
    let root = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let meta: Metadata = serde_json::from_reader(BufReader::with_capacity(1 << 20, f))
        .with_context(|| format!("{} is not valid FGVC/COCO metadata", file.display()))?;
    Ok((file, root, meta))
}

fn build(meta: Metadata, root: &Path, file: &Path) -> Result<Source> {
    let mut categories = Vec::with_capacity(meta.categories.len());
    let mut known_cats = HashMap::with_capacity(meta.categories.len());
    for c in meta.categories {
        if known_cats.insert(c.id, ()).is_some() {
            bail!("{}: category id {} is listed twice", file.display(), c.id);
        }
        categories.push(Category { id: c.id, name: c.name.unwrap_or_else(|| c.id.to_string()) });
    }

    let mut index_of = HashMap::with_capacity(meta.images.len());
    let mut by_name: HashMap<&str, i64> = HashMap::with_capacity(meta.images.len());
    for (i, img) in meta.images.iter().enumerate() {
        check_relative(&img.file_name)
            .with_context(|| format!("{}: image {} has file_name {:?}", file.display(), img.id, img.file_name))?;
        if index_of.insert(img.id, i).is_some() {
            bail!("{}: image id {} is listed twice", file.display(), img.id);
        }
        if let Some(first) = by_name.insert(img.file_name.as_str(), img.id) {
            bail!("{}: images {first} and {} have the same file_name {:?}", file.display(), img.id, img.file_name);
        }
    }
    drop(by_name);

    let mut category_of: Vec<Option<i64>> = vec![None; meta.images.len()];
    let mut extra = 0usize;
    for (n, ann) in meta.annotations.iter().enumerate() {
        let Some(&i) = index_of.get(&ann.image_id) else {
            bail!("{}: annotation #{n} refers to image id {}, which is not in `images`", file.display(), ann.image_id);
        };
        if !known_cats.contains_key(&ann.category_id) {
            bail!(
                "{}: annotation #{n} (image {}) has category id {}, which is not in `categories`",
                file.display(),
                ann.image_id,
                ann.category_id
            );
        }
        if category_of[i].is_some() {
            extra += 1;
        } else {
            category_of[i] = Some(ann.category_id);
        }
    }
    if extra > 0 {
        warn!("{extra} image(s) have more than one annotation: the first one is used");
    }
    // Free the lookup structures before the items are built: this is the read's memory peak.
    drop(index_of);
    drop(meta.annotations);

    let mut unlabeled = 0usize;
    let mut items = Vec::with_capacity(meta.images.len());
    for (img, cat) in meta.images.into_iter().zip(category_of) {
        let Some(category_id) = cat else {
            unlabeled += 1;
            continue;
        };
        items.push(Item { data: ImageData::File, rel: PathBuf::from(img.file_name), category_id, image_id: img.id });
    }
    if unlabeled > 0 {
        warn!("{unlabeled} image(s) have no annotation and are left out");
    }
    Ok(Source { root: root.to_path_buf(), items, categories, idx: Vec::new() })
}

/// An unlabeled image set (`[dataset] predict_source`, e.g. Herbarium's `test/metadata.json`):
/// the directory its file names are relative to, and every image as `(image id, file name)`.
/// Annotations, if the file has any, are ignored (with a warning): the set is predicted, not scored.
pub fn read_unlabeled(path: &Path) -> Result<(PathBuf, Vec<(i64, PathBuf)>)> {
    let (file, root, meta) = parse(path)?;
    Ok((root, images_only(meta, &file)?))
}

fn images_only(meta: Metadata, file: &Path) -> Result<Vec<(i64, PathBuf)>> {
    if !meta.annotations.is_empty() {
        warn!(
            "{} has {} annotation(s): dataset.predict_source is predicted as unlabeled, they are ignored",
            file.display(),
            meta.annotations.len()
        );
    }
    let mut ids = std::collections::HashSet::with_capacity(meta.images.len());
    let mut names = std::collections::HashSet::with_capacity(meta.images.len());
    let mut out = Vec::with_capacity(meta.images.len());
    for img in meta.images {
        check_relative(&img.file_name)
            .with_context(|| format!("{}: image {} has file_name {:?}", file.display(), img.id, img.file_name))?;
        if !ids.insert(img.id) {
            bail!("{}: image id {} is listed twice", file.display(), img.id);
        }
        if !names.insert(img.file_name.clone()) {
            bail!("{}: file_name {:?} is listed twice", file.display(), img.file_name);
        }
        out.push((img.id, PathBuf::from(img.file_name)));
    }
    if out.is_empty() {
        bail!("{} lists no images (dataset.predict_source)", file.display());
    }
    Ok(out)
}

/// A `file_name` must stay inside the source directory.
fn check_relative(name: &str) -> Result<()> {
    let p = Path::new(name);
    if name.is_empty() {
        bail!("the file name is empty");
    }
    if p.is_absolute() || p.has_root() {
        bail!("absolute paths are not allowed: file names are relative to the metadata's directory");
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("`..` would leave the source directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Source> {
        let meta: Metadata = serde_json::from_str(json)?;
        build(meta, Path::new("/src"), Path::new("/src/metadata.json"))
    }

    #[test]
    fn unannotated_images_are_left_out_and_unknown_keys_ignored() {
        let s = parse(
            r#"{"info": {"year": 2021}, "images": [{"id": 1, "file_name": "a/1.jpg", "width": 3},
                {"id": 2, "file_name": "a/2.jpg"}],
               "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "institution_id": 0}],
               "categories": [{"id": 5, "name": "Acer", "family": "Sapindaceae"}]}"#,
        )
        .unwrap();
        assert_eq!(s.items.len(), 1);
        assert_eq!(s.items[0].image_id, 1);
        assert_eq!(s.items[0].rel, Path::new("a/1.jpg"));
        assert_eq!(s.categories, vec![Category { id: 5, name: "Acer".into() }]);
    }

    #[test]
    fn annotation_of_unknown_image_is_an_error() {
        let e =
            parse(r#"{"images": [], "annotations": [{"image_id": 3, "category_id": 1}], "categories": [{"id": 1}]}"#)
                .unwrap_err();
        assert!(format!("{e:#}").contains("image id 3, which is not in `images`"));
    }

    #[test]
    fn an_unlabeled_set_keeps_every_image_and_refuses_duplicates() {
        let meta: Metadata = serde_json::from_str(
            r#"{"images": [{"id": 7, "file_name": "images/000/7.jpg"}, {"id": 3, "file_name": "images/000/3.jpg"}],
               "info": {"year": 2021}}"#,
        )
        .unwrap();
        let got = images_only(meta, Path::new("/t/metadata.json")).unwrap();
        assert_eq!(got, vec![(7, PathBuf::from("images/000/7.jpg")), (3, PathBuf::from("images/000/3.jpg"))]);
        let meta: Metadata =
            serde_json::from_str(r#"{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}"#)
                .unwrap();
        let e = images_only(meta, Path::new("/t/metadata.json")).unwrap_err();
        assert!(e.to_string().contains("image id 1 is listed twice"), "{e}");
        let meta: Metadata = serde_json::from_str(r#"{"images": []}"#).unwrap();
        assert!(images_only(meta, Path::new("/t/m.json")).unwrap_err().to_string().contains("lists no images"));
    }

    #[test]
    fn escaping_file_names_are_refused() {
        for bad in ["/etc/passwd", "../x.jpg", "a/../../x.jpg"] {
            let json = format!(r#"{{"images": [{{"id": 1, "file_name": "{bad}"}}]}}"#);
            assert!(parse(&json).is_err(), "{bad}");
        }
        assert!(check_relative("a/./b.jpg").is_ok());
    }
}
