//! The types a source reader gives: a [`Source`] (images with their categories), and the
//! unlabeled [`PredictSet`]. Shared by the readers, the sampler and the writer.
use std::path::PathBuf;

/// Where one image's bytes come from.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// The file `Source::root` / `Item::rel` (coco, folder): one path per image, not two.
    File,
    /// Image `index` of an IDX image set, written out as PNG.
    Idx { set: usize, index: usize },
}

/// One image of the source.
#[derive(Debug, Clone)]
pub struct Item {
    pub data: ImageData,
    /// Where it goes, relative to `img/<split>/`; for files, also where it is, relative to the root.
    pub rel: PathBuf,
    pub category_id: i64,
    pub image_id: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub id: i64,
    pub name: String,
}

/// A whole source data set, as the readers give it.
#[derive(Debug, Default)]
pub struct Source {
    /// The directory that file images are relative to.
    pub root: PathBuf,
    pub items: Vec<Item>,
    /// Known categories, any order.
    pub categories: Vec<Category>,
    /// Pixel data of IDX sources.
    pub idx: Vec<ImageSet>,
}

/// The unlabeled images of `[dataset] predict_source`: the directory their file names are
/// relative to, and `(image id, file name)` per image.
#[derive(Debug, Default)]
pub struct PredictSet {
    pub root: PathBuf,
    pub images: Vec<(i64, PathBuf)>,
}

/// The pixels of one IDX image file.
#[derive(Debug)]
pub struct ImageSet {
    pub rows: u32,
    pub cols: u32,
    pub pixels: Vec<u8>,
}

impl ImageSet {
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.rows as usize * self.cols as usize;
        &self.pixels[index * n..(index + 1) * n]
    }
}
