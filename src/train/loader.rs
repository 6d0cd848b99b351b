//! Batches for training and validation: decode (through the rank's [`ImageStore`]), normalize,
//! and make tensors, optionally on a loader thread that works ahead of the step that uses them.
use std::collections::HashSet;

use anyhow::{anyhow, Context, Result};
use tch::{Device, Kind, Tensor};
use tracing::warn;

use super::augment::Augment;
use crate::config::OnBadImage;
use crate::data::{self, Geometry, ImageStore, Row};

/// A batch: the decodable images as `(images, labels)` (None if none decoded), and how many were
/// skipped as undecodable.
pub type Batch = (Option<(Tensor, Tensor)>, u64);

/// Loads batches of a rank's rows.
pub struct Loader {
    pub store: ImageStore,
    pub geometry: Geometry,
    pub on_bad: OnBadImage,
    /// Rows found undecodable, not tried again.
    pub bad: HashSet<usize>,
    pub values: Vec<f32>,
    pub rank: usize,
    /// Batches a loader thread prepares ahead of the one in use; 0: no thread (`train.prefetch`).
    pub ahead: usize,
    /// Training-time augmentation (None: images as `[image] resize` makes them), and the epoch
    /// whose draws it makes.
    pub augment: Option<Augment>,
    pub epoch: u32,
    /// Draws of each row so far in this epoch (a weighted sampler repeats rows); `set_epoch`
    /// clears it.
    draws: std::collections::HashMap<usize, u32>,
    /// Threads that decode a batch's images (`train.loader_threads`).
    pub threads: usize,
}

impl Loader {
    pub fn new(store: ImageStore, geometry: Geometry, on_bad: OnBadImage, rank: usize, ahead: usize) -> Self {
        Loader {
            store,
            geometry,
            on_bad,
            bad: HashSet::new(),
            values: Vec::new(),
            rank,
            ahead,
            augment: None,
            epoch: 0,
            draws: Default::default(),
            threads: 1,
        }
    }

    /// Starts an epoch: augmentation draws for `epoch`, every row's draw count back at 0.
    pub fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.draws.clear();
    }

    /// The decodable images of `rows[idx]` as a batch on `device`, and how many were skipped.
    /// `threads` decode at once (the same batch whatever their number); for a GPU the batch is
    /// put in page-locked memory and copied without waiting (the step's kernels wait for it).
    pub fn batch(&mut self, rows: &[Row], idx: &[usize], device: Device) -> Result<Batch> {
        // Which draw of its row each entry is (augmentation draws differ per draw); rows known to
        // be undecodable are not tried again.
        let mut work = Vec::with_capacity(idx.len());
        for &i in idx {
            if self.bad.contains(&i) {
                continue;
            }
            let draw = self.draws.entry(i).or_insert(0);
            work.push((i, *draw));
            *draw += 1;
        }
        let mut skipped = (idx.len() - work.len()) as u64;
        let decoded = self.decode(rows, &work);
        let mut images = Vec::with_capacity(work.len());
        let mut labels = Vec::with_capacity(work.len());
        for (&(i, _), outcome) in work.iter().zip(decoded) {
            match outcome {
                Ok((px, fresh)) => {
                    if let Some(img) = fresh {
                        self.store.keep(i, img);
                    }
                    images.push(px);
                    labels.push(rows[i].label);
                }
                // A row drawn twice in one batch: its first failure was reported.
                Err(_) if self.bad.contains(&i) => skipped += 1,
                Err(e) if self.on_bad == OnBadImage::Fail => {
                    return Err(e).context(format!("bad image on rank {} (train.on_bad_image = \"fail\")", self.rank))
                }
                Err(e) => {
                    warn!("skipping {}: {:#}", self.store.path(&rows[i].path).display(), e);
                    self.bad.insert(i);
                    skipped += 1;
                }
            }
        }
        if images.is_empty() {
            return Ok((None, skipped));
        }
        let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        data::normalize_into(&refs, &self.geometry, &mut self.values);
        let g = &self.geometry;
        let shape = [refs.len() as i64, 3, i64::from(g.height), i64::from(g.width)];
        let y = Tensor::from_slice(&labels);
        let (x, y) = if device.is_cuda() {
            let x = pinned(&self.values, device).view(shape);
            let y = y.pin_memory(device).to_device_(device, Kind::Int64, true, false);
            (x.to_device_(device, Kind::Float, true, false), y)
        } else {
            (data::batch_tensor(&self.values, refs.len(), g).to_device(device), y.to_device(device))
        };
        Ok((Some((x, y)), skipped))
    }

    /// The network inputs of `work` (row, draw) in order, each with the decoded image when it was
    /// decoded now and the cache may keep it; on `self.threads` threads, each taking a run of
    /// consecutive entries.
    fn decode(&self, rows: &[Row], work: &[(usize, u32)]) -> Vec<Result<(Vec<u8>, Option<data::Rgb>)>> {
        let one = |&(i, nth): &(usize, u32)| -> Result<(Vec<u8>, Option<data::Rgb>)> {
            let (img, decoded) = self.store.fetch(i, &rows[i].path)?;
            let fresh = (decoded && self.store.has_room()).then(|| img.clone());
            let g = &self.geometry;
            let px = match &self.augment {
                Some(a) => a.apply(img, g, &mut a.rng(self.epoch, &rows[i].path, nth))?,
                None => data::into_input(img, g)?,
            };
            Ok((px, fresh))
        };
        let threads = self.threads.clamp(1, work.len().max(1));
        if threads == 1 {
            return work.iter().map(one).collect();
        }
        let per = work.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let parts: Vec<_> =
                work.chunks(per).map(|part| scope.spawn(move || part.iter().map(one).collect::<Vec<_>>())).collect();
            parts.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        })
    }
}

/// `values` in a new page-locked host tensor (for copies to `device` that do not wait).
fn pinned(values: &[f32], device: Device) -> Tensor {
    let t = Tensor::empty([values.len() as i64], (Kind::Float, Device::Cpu)).pin_memory(device);
    // SAFETY: `t` is a new contiguous f32 CPU tensor of `values.len()` elements that nothing else uses.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), t.data_ptr() as *mut f32, values.len()) };
    t
}

/// Runs `body` with a source of the batches `batches` (each a list of row indices), in order.
///
/// With `loader.ahead` ≥ 1 a loader thread builds them while `body` computes, at most that many
/// batches before the one `body` takes; with 0 each batch is built when `body` asks for it. Either way the
/// batches and their order are the same. When `body` returns (also early, on an error or a stop),
/// the thread ends after the batch it is building.
pub fn with_batches<R>(
    loader: &mut Loader,
    rows: &[Row],
    batches: &[&[usize]],
    device: Device,
    body: impl FnOnce(&mut dyn FnMut() -> Result<Batch>) -> Result<R>,
) -> Result<R> {
    let ahead = loader.ahead;
    let mut list = batches.iter();
    if ahead == 0 {
        let mut next = || match list.next() {
            Some(idx) => loader.batch(rows, idx, device),
            None => Err(anyhow!("asked for more batches than the epoch has")),
        };
        return body(&mut next);
    }
    std::thread::scope(|scope| {
        // One batch is being built while `ahead - 1` wait in the channel.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(ahead - 1);
        scope.spawn(move || {
            crate::infra::timeline::name_thread(1, "loader");
            for idx in list {
                let t = std::time::Instant::now();
                let batch = loader.batch(rows, idx, device);
                crate::infra::timeline::since("loader", "decode + batch", t, None);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        let mut next = || {
            rx.recv().unwrap_or_else(|_| {
                Err(anyhow!("asked for more batches than the epoch has, or the loader thread failed"))
            })
        };
        body(&mut next)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(n: usize) -> (tempfile::TempDir, Vec<Row>) {
        let dir = tempfile::tempdir().unwrap();
        let rows = (0..n)
            .map(|i| {
                let path = format!("{i}.png");
                if i != 5 {
                    image::RgbImage::from_pixel(9, 7, image::Rgb([i as u8 * 10, 1, 2]))
                        .save(dir.path().join(&path))
                        .unwrap();
                }
                Row { path, label: i as i64 % 3, category_id: 0, image_id: i as i64 }
            })
            .collect();
        (dir, rows)
    }

    fn loader(dir: &std::path::Path, on_bad: OnBadImage) -> Loader {
        let g = Geometry { width: 8, height: 8, mean: [0.5; 3], std: [0.25; 3], ..Geometry::default() };
        Loader::new(ImageStore::new(dir, g, None, 12, 0), g, on_bad, 0, 0)
    }

    /// Per batch: the image values, the labels, the skipped count.
    type Taken = Vec<(Vec<f32>, Vec<i64>, u64)>;

    /// All the batches of an epoch, taken through `with_batches` with `ahead`.
    fn epoch(ahead: usize, on_bad: OnBadImage) -> Result<Taken> {
        let (dir, rows) = fixture(12);
        let order = [7usize, 2, 11, 5, 0, 9, 3, 1, 10, 4, 8, 6];
        let batches: Vec<&[usize]> = order.chunks(4).collect();
        let mut l = loader(dir.path(), on_bad);
        l.ahead = ahead;
        with_batches(&mut l, &rows, &batches, Device::Cpu, |next| {
            let mut out = Vec::new();
            for _ in 0..batches.len() {
                let (b, skipped) = next()?;
                let (x, y) = b.unwrap();
                out.push((Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(), Vec::<i64>::try_from(y).unwrap(), skipped));
            }
            Ok(out)
        })
    }

    #[test]
    fn a_loader_thread_gives_the_same_batches_in_the_same_order() {
        let inline = epoch(0, OnBadImage::Skip).unwrap();
        assert_eq!(inline.len(), 3);
        assert_eq!(inline[0].1, vec![1, 2, 2], "labels of rows 7, 2, 11");
        assert_eq!(inline[0].2 + inline[1].2 + inline[2].2, 1, "row 5 has no file and is skipped once");
        for ahead in [1, 2, 3] {
            assert_eq!(epoch(ahead, OnBadImage::Skip).unwrap(), inline, "ahead {ahead}");
        }
    }

    #[test]
    fn a_bad_image_error_comes_through_the_loader_thread() {
        for ahead in [0, 2] {
            let e = epoch(ahead, OnBadImage::Fail).unwrap_err();
            assert!(format!("{e:#}").contains("bad image on rank 0"), "{e:#}");
        }
    }

    #[test]
    fn a_body_that_stops_early_ends_the_loader_thread() {
        let (dir, rows) = fixture(12);
        let all: Vec<usize> = (0..12).filter(|&i| i != 5).collect();
        let batches: Vec<&[usize]> = all.chunks(1).collect();
        let mut l = loader(dir.path(), OnBadImage::Skip);
        l.ahead = 2;
        let got = with_batches(&mut l, &rows, &batches, Device::Cpu, |next| {
            next()?;
            Ok(7)
        });
        assert_eq!(got.unwrap(), 7, "returns instead of waiting for the thread to send every batch");
    }
}
