//! Scaled JPEG decoding: a JPEG is decoded at the smallest DCT scale (1/1, 1/2, 1/4 or 1/8) whose
//! image still covers the target size, as libjpeg's scaled decoding (PIL's `Image.draft`) does. A
//! 1000x680 herbarium sheet bound for 128x128 is decoded at 250x170, a sixteenth of the pixels.
//!
//! With the `turbojpeg` feature (on by default) the decoder is libjpeg-turbo through its TurboJPEG
//! API (Debian: `libturbojpeg0-dev`; the library PIL wheels bundle too): SIMD Huffman decoding,
//! IDCT and colour conversion. Without it, the pure-Rust `jpeg-decoder` crate, about half as fast.
//! Either way `None` means "this decoder cannot": the caller then tries the general decoder, which
//! reports the error.

/// The smallest of the scales 1/1, 1/2, 1/4, 1/8 at which a `width`x`height` image still covers
/// `min_w`x`min_h`, as the scaled size (rounded up, as libjpeg does).
pub fn scaled_size(width: u32, height: u32, min_w: u32, min_h: u32) -> (u32, u32) {
    let mut best = (width, height);
    for denom in [2, 4, 8] {
        let (w, h) = (width.div_ceil(denom), height.div_ceil(denom));
        if w >= min_w && h >= min_h {
            best = (w, h);
        }
    }
    best
}

#[cfg(feature = "turbojpeg")]
mod imp {
    use std::cell::RefCell;
    use std::os::raw::{c_int, c_uchar, c_ulong, c_void};

    type TjHandle = *mut c_void;
    const TJPF_RGB: c_int = 0;

    #[link(name = "turbojpeg")]
    extern "C" {
        fn tjInitDecompress() -> TjHandle;
        fn tjDecompressHeader3(
            handle: TjHandle,
            jpeg: *const c_uchar,
            size: c_ulong,
            width: *mut c_int,
            height: *mut c_int,
            subsamp: *mut c_int,
            colorspace: *mut c_int,
        ) -> c_int;
        fn tjDecompress2(
            handle: TjHandle,
            jpeg: *const c_uchar,
            size: c_ulong,
            dst: *mut c_uchar,
            width: c_int,
            pitch: c_int,
            height: c_int,
            pixel_format: c_int,
            flags: c_int,
        ) -> c_int;
        fn tjDestroy(handle: TjHandle) -> c_int;
    }

    /// One decompressor per thread, made on first use and freed when the thread ends.
    struct Handle(TjHandle);

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: a handle from tjInitDecompress, destroyed once.
            unsafe { tjDestroy(self.0) };
        }
    }

    thread_local! {
        static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
    }

    /// RGB pixels and size of `bytes` decoded at the scale that covers `min_w`x`min_h`. Any error
    /// or warning (a truncated or corrupt stream) gives `None`.
    pub fn decode_scaled(bytes: &[u8], min_w: u32, min_h: u32) -> Option<(u32, u32, Vec<u8>)> {
        HANDLE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                // SAFETY: no arguments; a null result is checked.
                let h = unsafe { tjInitDecompress() };
                if h.is_null() {
                    return None;
                }
                *slot = Some(Handle(h));
            }
            let handle = slot.as_ref()?.0;
            let size = c_ulong::try_from(bytes.len()).ok()?;
            let (mut w, mut h, mut subsamp, mut colorspace) = (0, 0, 0, 0);
            // SAFETY: `bytes` is valid for `size` bytes; the out-pointers are to live locals.
            let rc = unsafe {
                tjDecompressHeader3(handle, bytes.as_ptr(), size, &mut w, &mut h, &mut subsamp, &mut colorspace)
            };
            if rc != 0 || w <= 0 || h <= 0 {
                return None;
            }
            let (sw, sh) = super::scaled_size(w as u32, h as u32, min_w, min_h);
            let mut out = vec![0u8; sw as usize * sh as usize * 3];
            // SAFETY: `out` holds sw*sh RGB pixels with pitch sw*3, the size asked for: the decoder
            // picks the scale whose output is exactly sw x sh (the scaled sizes are computed alike).
            let rc = unsafe {
                tjDecompress2(
                    handle,
                    bytes.as_ptr(),
                    size,
                    out.as_mut_ptr(),
                    sw as c_int,
                    (sw * 3) as c_int,
                    sh as c_int,
                    TJPF_RGB,
                    0,
                )
            };
            (rc == 0).then_some((sw, sh, out))
        })
    }
}

#[cfg(not(feature = "turbojpeg"))]
mod imp {
    /// RGB pixels and size of `bytes` decoded at the scale that covers `min_w`x`min_h`.
    pub fn decode_scaled(bytes: &[u8], min_w: u32, min_h: u32) -> Option<(u32, u32, Vec<u8>)> {
        use jpeg_decoder::{Decoder, PixelFormat};
        // The decoder panics on some malformed headers: treat that as "cannot".
        std::panic::catch_unwind(|| {
            let mut d = Decoder::new(bytes);
            d.scale(min_w.min(u16::MAX as u32) as u16, min_h.min(u16::MAX as u32) as u16).ok()?;
            let pixels = d.decode().ok()?;
            let info = d.info()?;
            let (w, h) = (u32::from(info.width), u32::from(info.height));
            match info.pixel_format {
                PixelFormat::RGB24 => Some((w, h, pixels)),
                PixelFormat::L8 => Some((w, h, pixels.iter().flat_map(|&v| [v, v, v]).collect())),
                _ => None,
            }
        })
        .ok()
        .flatten()
    }
}

pub use imp::decode_scaled;

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32, gray: bool) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let img = if gray { image::DynamicImage::ImageLuma8(image::imageops::grayscale(&img)) } else { img.into() };
        img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
        out.into_inner()
    }

    #[test]
    fn scale_is_the_smallest_that_covers_the_target() {
        assert_eq!(scaled_size(1000, 680, 128, 128), (250, 170));
        assert_eq!(scaled_size(1000, 680, 64, 64), (125, 85));
        assert_eq!(scaled_size(1000, 680, 128, 200), (500, 340));
        assert_eq!(scaled_size(100, 100, 128, 128), (100, 100), "never above full size");
        assert_eq!(scaled_size(1001, 681, 10, 10), (126, 86), "rounded up");
    }

    #[test]
    fn colour_and_grayscale_decode_to_rgb_at_the_scaled_size_and_near_the_full_decode() {
        for gray in [false, true] {
            let bytes = jpeg(1000, 680, gray);
            let (w, h, px) = decode_scaled(&bytes, 128, 128).expect("decodes");
            assert_eq!((w, h, px.len()), (250, 170, 250 * 170 * 3));
            // Against the full-size decode, box-averaged 4x4: the same picture.
            let full = image::load_from_memory(&bytes).expect("full decode").into_rgb8();
            let mut worst = 0f64;
            for (x, y) in [(10u32, 10u32), (120, 80), (240, 160)] {
                for c in 0..3 {
                    let mut sum = 0f64;
                    for dy in 0..4 {
                        for dx in 0..4 {
                            sum += f64::from(full.get_pixel(x * 4 + dx, y * 4 + dy)[c]);
                        }
                    }
                    let scaled = f64::from(px[((y * w + x) * 3) as usize + c]);
                    worst = worst.max((scaled - sum / 16.0).abs());
                }
            }
            assert!(worst < 12.0, "gray={gray}: scaled decode differs from the full one by {worst}");
        }
    }

    #[test]
    fn truncated_or_foreign_bytes_are_left_to_the_general_decoder() {
        let bytes = jpeg(300, 200, false);
        assert!(decode_scaled(&bytes[..bytes.len() / 2], 64, 64).is_none(), "truncated");
        assert!(decode_scaled(&bytes[..100], 64, 64).is_none(), "header only");
        assert!(decode_scaled(b"\x89PNG\r\n\x1a\n not a jpeg", 64, 64).is_none(), "not a JPEG");
    }
}
