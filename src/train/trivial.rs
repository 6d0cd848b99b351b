//! torchvision's `TrivialAugmentWide` on an RGB image (HWC, u8): one operation chosen uniformly
//! from fourteen, at a magnitude chosen uniformly from 31 bins of its range and a random sign
//! where it has one; geometric operations sample the nearest pixel and fill with black, as
//! torchvision does with `InterpolationMode.NEAREST` and no fill. The ranges are torchvision's
//! "wide" ones (`_augmentation_space` of `TrivialAugmentWide`).
use rand::Rng;

const BINS: usize = 31;

/// The operations, in torchvision's order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Identity,
    ShearX(f64),
    ShearY(f64),
    TranslateX(f64),
    TranslateY(f64),
    Rotate(f64),
    Brightness(f64),
    Color(f64),
    Contrast(f64),
    Sharpness(f64),
    Posterize(u32),
    Solarize(f64),
    AutoContrast,
    Equalize,
}

/// The magnitude of bin `i` of `BINS` from `lo` to `hi` (torch.linspace).
fn bin(lo: f64, hi: f64, i: usize) -> f64 {
    lo + (hi - lo) * i as f64 / (BINS - 1) as f64
}

/// One draw: the operation, then the bin, then the sign (for signed operations).
pub fn draw(rng: &mut impl Rng) -> Op {
    let op = rng.random_range(0..14);
    let i = rng.random_range(0..BINS);
    let mut signed = |m: f64| if rng.random_bool(0.5) { -m } else { m };
    match op {
        0 => Op::Identity,
        1 => Op::ShearX(signed(bin(0.0, 0.99, i))),
        2 => Op::ShearY(signed(bin(0.0, 0.99, i))),
        3 => Op::TranslateX(signed(bin(0.0, 32.0, i))),
        4 => Op::TranslateY(signed(bin(0.0, 32.0, i))),
        5 => Op::Rotate(signed(bin(0.0, 135.0, i))),
        6 => Op::Brightness(signed(bin(0.0, 0.99, i))),
        7 => Op::Color(signed(bin(0.0, 0.99, i))),
        8 => Op::Contrast(signed(bin(0.0, 0.99, i))),
        9 => Op::Sharpness(signed(bin(0.0, 0.99, i))),
        // 8 - round(i / ((31 - 1) / 6)): 8 bits down to 2.
        10 => Op::Posterize(8 - (i as f64 / 5.0).round() as u32),
        11 => Op::Solarize(bin(255.0, 0.0, i)),
        12 => Op::AutoContrast,
        _ => Op::Equalize,
    }
}

/// Applies `op` to the `w` x `h` image `px` in place.
pub fn apply(op: Op, px: &mut [u8], w: usize, h: usize) {
    match op {
        Op::Identity => {}
        // An output pixel (x, y) takes the input pixel the inverse transform maps it to.
        Op::ShearX(m) => warp(px, w, h, |x, y| (x + m * y, y)),
        Op::ShearY(m) => warp(px, w, h, |x, y| (x, y + m * x)),
        Op::TranslateX(t) => {
            let t = t.trunc();
            warp(px, w, h, |x, y| (x - t, y))
        }
        Op::TranslateY(t) => {
            let t = t.trunc();
            warp(px, w, h, |x, y| (x, y - t))
        }
        Op::Rotate(deg) => {
            let (s, c) = deg.to_radians().sin_cos();
            let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
            // Counter-clockwise on the screen by `deg`: the inverse rotation of each output point.
            warp(px, w, h, |x, y| {
                let (dx, dy) = (x - cx, y - cy);
                (cx + c * dx - s * dy, cy + s * dx + c * dy)
            })
        }
        Op::Brightness(m) => blend_with(px, 1.0 + m, |_| [0.0; 3]),
        Op::Color(m) => {
            let grays: Vec<f64> = px.chunks_exact(3).map(gray).collect();
            let mut i = 0;
            blend_with(px, 1.0 + m, |_| {
                let g = grays[i];
                i += 1;
                [g; 3]
            })
        }
        Op::Contrast(m) => {
            // Blended with the mean of the grayscale image.
            let mean = px.chunks_exact(3).map(gray).sum::<f64>() / (w * h).max(1) as f64;
            blend_with(px, 1.0 + m, |_| [mean; 3])
        }
        Op::Sharpness(m) => {
            let blurred = smooth(px, w, h);
            let mut i = 0;
            blend_with(px, 1.0 + m, |_| {
                let p = [f64::from(blurred[i]), f64::from(blurred[i + 1]), f64::from(blurred[i + 2])];
                i += 3;
                p
            })
        }
        Op::Posterize(bits) => {
            let mask = 0xFFu8 << (8 - bits.min(8));
            px.iter_mut().for_each(|v| *v &= mask);
        }
        Op::Solarize(t) => px.iter_mut().for_each(|v| {
            if f64::from(*v) >= t {
                *v = 255 - *v
            }
        }),
        Op::AutoContrast => (0..3).for_each(|c| autocontrast_channel(px, c)),
        Op::Equalize => (0..3).for_each(|c| equalize_channel(px, c)),
    }
}

/// Stretches channel `c` of interleaved RGB `px` to the full 0..=255 range.
fn autocontrast_channel(px: &mut [u8], c: usize) {
    let channel = px.iter().skip(c).step_by(3);
    let (lo, hi) = channel.fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if hi > lo {
        let scale = 255.0 / f64::from(hi - lo);
        px.iter_mut().skip(c).step_by(3).for_each(|v| {
            *v = ((f64::from(*v - lo)) * scale).round().clamp(0.0, 255.0) as u8;
        });
    }
}

/// Equalizes the histogram of channel `c` of interleaved RGB `px`.
fn equalize_channel(px: &mut [u8], c: usize) {
    let mut hist = [0usize; 256];
    px.iter().skip(c).step_by(3).for_each(|&v| hist[v as usize] += 1);
    // torchvision's _scale_channel (PIL's equalize): the last used value's count does not count
    // towards the step.
    let last = hist.iter().rposition(|&n| n > 0).map_or(0, |i| hist[i]);
    let step = (hist.iter().sum::<usize>() - last) / 255;
    if step == 0 {
        return;
    }
    let mut lut = [0u8; 256];
    let mut cum = step / 2;
    for (v, &n) in hist.iter().enumerate() {
        lut[v] = (cum / step).min(255) as u8;
        cum += n;
    }
    px.iter_mut().skip(c).step_by(3).for_each(|v| *v = lut[*v as usize]);
}

/// Luma as torchvision's `rgb_to_grayscale`.
fn gray(p: &[u8]) -> f64 {
    0.2989 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2])
}

/// `factor × pixel + (1 − factor) × degenerate(pixel)`, clamped, per pixel in order.
fn blend_with(px: &mut [u8], factor: f64, mut degenerate: impl FnMut(usize) -> [f64; 3]) {
    for (i, p) in px.chunks_exact_mut(3).enumerate() {
        let d = degenerate(i);
        for c in 0..3 {
            p[c] = (factor * f64::from(p[c]) + (1.0 - factor) * d[c]).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// torchvision's sharpness kernel ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) inside, the border
/// pixels as they are.
fn smooth(px: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = px.to_vec();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for c in 0..3 {
                let mut sum = 0u32;
                for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
                    let v = u32::from(px[((y + dy - 1) * w + (x + dx - 1)) * 3 + c]);
                    sum += if (dy, dx) == (1, 1) { 5 * v } else { v };
                }
                out[(y * w + x) * 3 + c] = ((sum as f64) / 13.0).round() as u8;
            }
        }
    }
    out
}

/// Every output pixel (x, y), by its centre, takes the input pixel nearest to `from(x, y)`; black
/// outside the image.
fn warp(px: &mut [u8], w: usize, h: usize, from: impl Fn(f64, f64) -> (f64, f64)) {
    let src = px.to_vec();
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = from(x as f64 + 0.5, y as f64 + 0.5);
            let (ix, iy) = (sx.floor(), sy.floor());
            let at = (y * w + x) * 3;
            if ix >= 0.0 && iy >= 0.0 && (ix as usize) < w && (iy as usize) < h {
                let s = (iy as usize * w + ix as usize) * 3;
                px[at..at + 3].copy_from_slice(&src[s..s + 3]);
            } else {
                px[at..at + 3].fill(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn image(w: usize, h: usize) -> Vec<u8> {
        (0..w * h).flat_map(|i| [(i * 10 % 256) as u8, 100, (255 - i % 256) as u8]).collect()
    }

    #[test]
    fn draws_cover_every_operation_and_bin() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            kinds.insert(format!("{:?}", draw(&mut rng)).split('(').next().unwrap().to_string());
        }
        assert_eq!(kinds.len(), 14, "{kinds:?}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let bits: std::collections::BTreeSet<u32> =
            (0..5000).filter_map(|_| if let Op::Posterize(b) = draw(&mut rng) { Some(b) } else { None }).collect();
        assert_eq!(bits.into_iter().collect::<Vec<_>>(), [2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn pixel_operations_do_what_torchvision_does() {
        let (w, h) = (4, 3);
        let mut p = image(w, h);
        apply(Op::Posterize(2), &mut p, w, h);
        assert!(p.iter().all(|v| v & 0x3F == 0));
        let mut p = vec![10, 200, 128, 0, 255, 127];
        apply(Op::Solarize(128.0), &mut p, 2, 1);
        assert_eq!(p, [10, 55, 127, 0, 0, 127]);
        let mut p = vec![50, 0, 0, 150, 0, 0];
        apply(Op::AutoContrast, &mut p, 2, 1);
        assert_eq!(p, [0, 0, 0, 255, 0, 0]);
        let mut p = vec![100; 6];
        apply(Op::Brightness(0.5), &mut p, 2, 1);
        assert_eq!(p, [150; 6]);
        let mut p = vec![200, 100, 0];
        apply(Op::Color(-1.0), &mut p, 1, 1);
        assert_eq!(p, [118; 3], "saturation 0 is the grayscale value");
        let original = image(w, h);
        let mut p = original.clone();
        apply(Op::Identity, &mut p, w, h);
        assert_eq!(p, original);
    }

    #[test]
    fn geometric_operations_move_pixels_and_fill_black() {
        let (w, h) = (4, 4);
        let original = image(w, h);
        let px = |img: &[u8], x: usize, y: usize| img[(y * w + x) * 3..(y * w + x) * 3 + 3].to_vec();
        let mut p = original.clone();
        apply(Op::TranslateX(1.7), &mut p, w, h);
        assert_eq!((px(&p, 1, 2), px(&p, 0, 2)), (px(&original, 0, 2), vec![0, 0, 0]), "one pixel right");
        let mut p = original.clone();
        apply(Op::Rotate(180.0), &mut p, w, h);
        assert_eq!(px(&p, 0, 0), px(&original, 3, 3));
        let mut p = original.clone();
        apply(Op::ShearX(0.5), &mut p, w, h);
        assert_eq!(px(&p, 0, 0), px(&original, 0, 0), "the top row barely moves");
        assert_eq!(px(&p, 3, 3), vec![0, 0, 0], "the bottom right comes from outside");
    }
}
