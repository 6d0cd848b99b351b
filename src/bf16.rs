//! bfloat16 for the gradient exchange (`train.exchange = "bf16"`): the upper 16 bits of an f32
//! (sign, the same 8 exponent bits, 7 of the 23 mantissa bits), so the conversion keeps the range
//! of f32 and loses only precision (a relative error of at most 2⁻⁸: 8 significant bits).
//! Conversion rounds to the nearest value, ties to even, as torch's `to(torch.bfloat16)` does; a
//! NaN stays a NaN.
//!
//! [`mpi_sum`] is the MPI reduction: each pair of bfloat16 values is summed in f32 and rounded
//! once, so a sum over p ranks is rounded p − 1 times (as a bfloat16 allreduce in NCCL or gloo).

use std::os::raw::{c_int, c_void};

/// The nearest bfloat16 to `x` (ties to even), as its bits.
#[inline]
pub fn from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        // A NaN: keep its sign and make it quiet (its payload could round to an infinity).
        return ((b >> 16) as u16) | 0x0040;
    }
    // Adding 0x7fff (plus the lowest kept bit, for ties to even) carries into the kept half
    // exactly when the dropped half is above one half (or equal to it and the kept half odd).
    // The largest finite values round up to the infinity of their sign, as they should.
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 of bfloat16 bits `h` (exact).
#[inline]
pub fn to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `dst[i] = from_f32(src[i])`.
pub fn encode(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "bf16 encode: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = from_f32(s);
    }
}

/// `dst[i] = to_f32(src[i])`.
pub fn decode(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16 decode: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_f32(s);
    }
}

/// `inout[i] = bf16(f32(a[i]) + f32(inout[i]))`: commutative bit for bit (an f32 sum of two
/// values is), so every rank of an allreduce gets the same result whichever side MPI puts a
/// partial sum on.
pub fn sum_into(a: &[u16], inout: &mut [u16]) {
    for (y, &x) in inout.iter_mut().zip(a) {
        *y = from_f32(to_f32(x) + to_f32(*y));
    }
}

/// The MPI user function of the bfloat16 sum (`MPI_Op_create` with commute = 1), on buffers of
/// 16-bit elements.
///
/// # Safety
/// MPI calls it with `invec` and `inoutvec` pointing at `*len` elements of 2 bytes each.
pub unsafe extern "C" fn mpi_sum(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _dt: *mut mpi::ffi::MPI_Datatype,
) {
    // SAFETY: as MPI promises (above); the two buffers do not overlap.
    unsafe {
        let n = usize::try_from(*len).unwrap_or(0);
        let a = std::slice::from_raw_parts(invec as *const u16, n);
        let b = std::slice::from_raw_parts_mut(inoutvec as *mut u16, n);
        sum_into(a, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_to_nearest_ties_to_even_as_torch() {
        // Exact values pass unchanged.
        for x in [0.0f32, -0.0, 1.0, -2.5, 0.15625, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(to_f32(from_f32(x)).to_bits(), x.to_bits(), "{x}");
        }
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even one (1).
        assert_eq!(to_f32(from_f32(1.0 + 2f32.powi(-8))), 1.0);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2·2⁻⁷ (even).
        assert_eq!(to_f32(from_f32(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2.0 * 2f32.powi(-7));
        // Just above half rounds up, just below rounds down.
        assert_eq!(to_f32(from_f32(f32::from_bits(0x3f80_8001))), 1.0 + 2f32.powi(-7));
        assert_eq!(to_f32(from_f32(f32::from_bits(0x3f80_7fff))), 1.0);
        // Subnormals round like the rest; the largest f32 rounds to infinity (as torch's does).
        assert_eq!(from_f32(f32::from_bits(0x0000_8000)), 0x0000);
        assert_eq!(from_f32(f32::from_bits(0x0001_8000)), 0x0002);
        assert_eq!(to_f32(from_f32(f32::MAX)), f32::INFINITY);
        assert_eq!(to_f32(from_f32(-f32::MAX)), f32::NEG_INFINITY);
        // NaN stays NaN, whatever its payload.
        for bits in [0x7fc0_0000u32, 0x7f80_0001, 0xff80_ffff, 0x7fff_ffff] {
            assert!(to_f32(from_f32(f32::from_bits(bits))).is_nan(), "{bits:#x}");
        }
        // Relative error at most 2⁻⁸ (half a unit in the 8th significant bit) over a spread of magnitudes.
        let mut x = 1.234_567e-30f32;
        while x < 1e30 {
            let y = to_f32(from_f32(x));
            assert!(((y - x) / x).abs() <= 2f32.powi(-8), "{x} -> {y}");
            x *= 3.7;
        }
    }

    #[test]
    fn encode_and_decode_whole_slices() {
        let src: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let mut h = vec![0u16; src.len()];
        encode(&src, &mut h);
        let mut back = vec![0f32; src.len()];
        decode(&h, &mut back);
        for (a, b) in src.iter().zip(&back) {
            assert_eq!(to_f32(from_f32(*a)), *b);
        }
    }

    #[test]
    fn the_sum_rounds_once_per_pair_and_commutes_bit_for_bit() {
        let a: Vec<u16> = [1.0f32, 1.0, -3.5, 1e-3, f32::INFINITY, 0.1].iter().map(|&x| from_f32(x)).collect();
        let b: Vec<u16> = [2.0f32, 2f32.powi(-8), 3.5, 7e-4, 1.0, 0.2].iter().map(|&x| from_f32(x)).collect();
        let mut ab = b.clone();
        sum_into(&a, &mut ab);
        let mut ba = a.clone();
        sum_into(&b, &mut ba);
        assert_eq!(ab, ba);
        let got: Vec<f32> = ab.iter().map(|&h| to_f32(h)).collect();
        assert_eq!(&got[..5], &[3.0, 1.0, 0.0, to_f32(from_f32(to_f32(a[3]) + to_f32(b[3]))), f32::INFINITY]);
        assert!((got[5] - 0.3).abs() < 0.3 * 2f32.powi(-7));
        // Through the MPI entry point too.
        let mut c = b.clone();
        let mut len = c.len() as c_int;
        unsafe {
            mpi_sum(a.as_ptr() as *mut c_void, c.as_mut_ptr() as *mut c_void, &mut len, std::ptr::null_mut());
        }
        assert_eq!(c, ab);
    }
}
