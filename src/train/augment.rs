//! Training-time augmentation on decoded images (RGB, HWC, u8), on the loader thread, in the order
//! of torchvision's reference recipe: `RandomResizedCrop` to the network input, random flips,
//! `TrivialAugmentWide`, and `RandomErasing`. Every draw comes from a generator
//! seeded by (dataset seed, epoch, image path), so an image is augmented alike whatever rank,
//! thread or rank count handles it, and a `--resume`d run sees the images the uninterrupted run
//! would have.
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::AugmentCfg;
use crate::data::{self, Geometry, Rgb};

/// The augmentation of one run.
#[derive(Debug, Clone)]
pub struct Augment {
    pub cfg: AugmentCfg,
    pub seed: u64,
}

impl Augment {
    /// None when `cfg` changes nothing.
    pub fn new(cfg: &AugmentCfg, seed: u64) -> Option<Self> {
        (cfg.random_resized_crop || cfg.hflip || cfg.vflip || cfg.trivial_augment || cfg.random_erase > 0.0)
            .then(|| Augment { cfg: cfg.clone(), seed })
    }

    /// The generator of one image in one epoch; `draw` counts earlier draws of the image in the
    /// epoch (a weighted sampler draws some images more than once: each copy is cropped anew).
    pub fn rng(&self, epoch: u32, path: &str, draw: u32) -> ChaCha8Rng {
        // FNV-1a of the path, mixed with the seed and epoch by splitmix64's finalizer.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in path.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut z = h ^ self.seed.rotate_left(17) ^ (u64::from(epoch) << 40) ^ (u64::from(draw) << 20) ^ 0xa5a5_0000;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
    }

    /// `img` made the network input (width x height of `g`) with this augmentation.
    pub fn apply(&self, img: Rgb, g: &Geometry, rng: &mut impl Rng) -> Result<Vec<u8>> {
        let mut px = if self.cfg.random_resized_crop {
            let (left, top, w, h) = random_resized_crop_box(img.w, img.h, self.cfg.scale, self.cfg.ratio, rng);
            let region = (f64::from(left), f64::from(top), f64::from(w), f64::from(h));
            data::resize_region(&img, Some(region), g.width, g.height)?
        } else {
            data::into_input(img, g)?
        };
        if self.cfg.hflip && rng.random_bool(0.5) {
            hflip(&mut px, g.width as usize);
        }
        if self.cfg.vflip && rng.random_bool(0.5) {
            vflip(&mut px, g.width as usize, g.height as usize);
        }
        if self.cfg.trivial_augment {
            super::trivial::apply(super::trivial::draw(rng), &mut px, g.width as usize, g.height as usize);
        }
        if self.cfg.random_erase > 0.0 && rng.random_bool(self.cfg.random_erase) {
            // torchvision's RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0) on the
            // normalized image: 0 there is the mean colour here.
            if let Some((left, top, w, h)) = erase_box(g.width, g.height, rng) {
                let fill = g.mean_pixel();
                for y in top..top + h {
                    for x in left..left + w {
                        let at = ((y * g.width + x) * 3) as usize;
                        px[at..at + 3].copy_from_slice(&fill);
                    }
                }
            }
        }
        Ok(px)
    }

    /// One line for the log.
    pub fn describe(&self, cache_size: u32) -> String {
        let c = &self.cfg;
        let mut parts = Vec::new();
        if c.random_resized_crop {
            let from = if cache_size > 0 {
                format!("images cached at short side {cache_size}")
            } else {
                "the input-size images".to_string()
            };
            parts.push(format!(
                "random resized crop (scale {}-{}, ratio {:.2}-{:.2}) from {from}",
                c.scale[0], c.scale[1], c.ratio[0], c.ratio[1]
            ));
        }
        if c.hflip {
            parts.push("horizontal flip".into());
        }
        if c.vflip {
            parts.push("vertical flip".into());
        }
        if c.trivial_augment {
            parts.push("TrivialAugmentWide".into());
        }
        if c.random_erase > 0.0 {
            parts.push(format!("random erasing (p {})", c.random_erase));
        }
        format!("augmentation: {}", parts.join(", "))
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to ten tries at a crop whose area is a share
/// in `scale` of the image's and whose aspect ratio is log-uniform in `ratio`, placed uniformly;
/// else the centre crop of the image clamped to `ratio`. Returns (left, top, width, height).
pub fn random_resized_crop_box(
    w: u32,
    h: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> (u32, u32, u32, u32) {
    let area = f64::from(w) * f64::from(h);
    let (lo, hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(lo..=hi).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (left, top, cw, ch);
        }
    }
    let in_ratio = f64::from(w) / f64::from(h);
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((f64::from(w) / ratio[0]).round() as u32).clamp(1, h))
    } else if in_ratio > ratio[1] {
        (((f64::from(h) * ratio[1]).round() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// torchvision's `RandomErasing.get_params` for a `w` x `h` image: up to ten tries at a box of
/// 2-33 % of the area with an aspect ratio log-uniform in 0.3-3.3 that fits strictly inside;
/// None when none fits (the image stays as it is). Returns (left, top, width, height).
pub fn erase_box(w: u32, h: u32, rng: &mut impl Rng) -> Option<(u32, u32, u32, u32)> {
    let area = f64::from(w) * f64::from(h);
    let (lo, hi) = (0.3f64.ln(), 3.3f64.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.02..=0.33);
        let aspect = rng.random_range(lo..=hi).exp();
        let eh = (target * aspect).sqrt().round() as u32;
        let ew = (target / aspect).sqrt().round() as u32;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let top = rng.random_range(0..=h - eh);
        let left = rng.random_range(0..=w - ew);
        return Some((left, top, ew, eh));
    }
    None
}

/// Mirrors an RGB image of width `w` left-right, in place.
pub fn hflip(px: &mut [u8], w: usize) {
    for row in px.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// Mirrors an RGB image of `w` x `h` top-bottom, in place.
pub fn vflip(px: &mut [u8], w: usize, h: usize) {
    let stride = w * 3;
    for y in 0..h / 2 {
        let (top, bottom) = px.split_at_mut((h - 1 - y) * stride);
        top[y * stride..(y + 1) * stride].swap_with_slice(&mut bottom[..stride]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_resized_crops_stay_inside_with_area_and_ratio_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut small, mut large) = (0, 0);
        for _ in 0..2000 {
            let (l, t, w, h) = random_resized_crop_box(100, 80, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(w >= 1 && h >= 1 && l + w <= 100 && t + h <= 80, "{l} {t} {w} {h}");
            let share = f64::from(w * h) / 8000.0;
            let ratio = f64::from(w) / f64::from(h);
            // Rounding to whole pixels moves area and ratio a little.
            assert!((0.07..=1.0).contains(&share) && (0.70..=1.42).contains(&ratio), "{share} {ratio}");
            small += usize::from(share < 0.3);
            large += usize::from(share > 0.7);
        }
        assert!(small > 400 && large > 100, "areas spread over the range: {small} small, {large} large");
        // A strip too narrow for any try: the centre, clamped to the ratio range.
        assert_eq!(random_resized_crop_box(100, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng), (43, 0, 13, 10));
    }

    #[test]
    fn erased_boxes_cover_two_to_thirty_three_percent_inside_the_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut found = 0;
        for _ in 0..500 {
            if let Some((l, t, w, h)) = erase_box(64, 48, &mut rng) {
                found += 1;
                let share = f64::from(w * h) / f64::from(64 * 48);
                assert!(l + w <= 64 && t + h <= 48 && (0.015..=0.35).contains(&share), "{l} {t} {w} {h}");
            }
        }
        assert!(found > 450, "a box almost always fits: {found}");
    }

    #[test]
    fn flips_mirror_and_undo_themselves() {
        // 3x2: pixels numbered 0..6 in every channel.
        let px: Vec<u8> = (0..6u8).flat_map(|v| [v, v, v]).collect();
        let mut h = px.clone();
        hflip(&mut h, 3);
        assert_eq!(h.iter().step_by(3).copied().collect::<Vec<_>>(), [2, 1, 0, 5, 4, 3]);
        hflip(&mut h, 3);
        assert_eq!(h, px);
        let mut v = px.clone();
        vflip(&mut v, 3, 2);
        assert_eq!(v.iter().step_by(3).copied().collect::<Vec<_>>(), [3, 4, 5, 0, 1, 2]);
    }

    #[test]
    fn an_image_is_augmented_alike_for_the_same_seed_epoch_and_path_only() {
        let cfg = AugmentCfg {
            random_resized_crop: true,
            hflip: true,
            vflip: true,
            trivial_augment: true,
            random_erase: 0.5,
            ..AugmentCfg::default()
        };
        let a = Augment::new(&cfg, 7).unwrap();
        let img = Rgb { w: 40, h: 30, px: (0..40 * 30 * 3).map(|i| (i * 7 % 251) as u8).collect() };
        let g = Geometry { width: 16, height: 16, ..Geometry::default() };
        let run = |epoch, path: &str| a.apply(img.clone(), &g, &mut a.rng(epoch, path, 0)).unwrap();
        assert_eq!(run(1, "img/a.png"), run(1, "img/a.png"));
        assert_ne!(run(1, "img/a.png"), run(2, "img/a.png"));
        assert_ne!(run(1, "img/a.png"), run(1, "img/b.png"));
        let second = a.apply(img.clone(), &g, &mut a.rng(1, "img/a.png", 1)).unwrap();
        assert_ne!(run(1, "img/a.png"), second, "a second draw in the epoch is augmented anew");
        assert_eq!(run(1, "img/a.png").len(), 16 * 16 * 3);
        assert!(Augment::new(&AugmentCfg::default(), 7).is_none(), "the default changes nothing");
    }
}
