//! Image → model input, exactly as a bundle's [`InputSpec`] says.
//!
//! The steps, which a third party can reproduce with Pillow and numpy:
//!
//! 1. decode JPEG or PNG and convert to 8-bit RGB (alpha dropped, grey
//!    replicated) — `Image.open(f).convert("RGB")`. The width and height are
//!    read from the header first and checked against [`ImageLimits`] (by
//!    default at most 40 megapixels and 16,384 pixels a side, at least 32
//!    pixels a side), so a decompression bomb is refused before its pixels
//!    are allocated;
//! 2. resize to `width`×`height` with Pillow's bilinear filter —
//!    `img.resize((width, height), Image.Resampling.BILINEAR)`. This is a
//!    separable triangle filter whose support widens with the downscale factor
//!    (an antialiasing resize, not a 4-tap lookup), in Pillow's 22-bit fixed
//!    point, horizontal pass first, rounding to 8 bits between passes. This code
//!    reproduces it bit for bit;
//! 3. normalise: `(pixel * scale - mean[c]) / std[c]` in `f32`, written NCHW.
//!
//! Decoders differ: PNG decodes identically everywhere, JPEG decoders may
//! differ by a level or two per pixel (IDCT and chroma upsampling), which the
//! tests bound.
//!
//! [`Preprocessor`] keeps its filter coefficients and scratch rows between
//! calls, so a stream of same-sized camera frames allocates nothing per frame
//! beyond decoding.

use std::io::Cursor;

use crate::bundle::InputSpec;

/// What the decoder accepts from a file, an upload or a camera, checked
/// against the width and height in the image's header *before* a single
/// pixel is decoded: a 200 KB PNG may claim 8192×8192 pixels (≈ 200 MB
/// decoded), and is refused without allocating them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width × height) an image may have.
    pub max_pixels: u64,
    /// Longest side, in pixels.
    pub max_side: u32,
    /// Shortest side, in pixels: smaller images cannot show a pill to
    /// measure or identify.
    pub min_side: u32,
}

impl Default for ImageLimits {
    /// 40 megapixels, at most 16,384 and at least 32 pixels a side.
    fn default() -> Self {
        ImageLimits { max_pixels: 40_000_000, max_side: 16_384, min_side: 32 }
    }
}

impl ImageLimits {
    /// Whether a `width`×`height` image is acceptable; the error says why not.
    pub fn check(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        let reason = if width.max(height) > self.max_side {
            DimensionProblem::SideTooLong { max: self.max_side }
        } else if u64::from(width) * u64::from(height) > self.max_pixels {
            DimensionProblem::TooManyPixels { max: self.max_pixels }
        } else if width.min(height) < self.min_side.max(1) {
            DimensionProblem::SideTooShort { min: self.min_side.max(1) }
        } else {
            return Ok(());
        };
        Err(PreprocessError::Dimensions { width, height, reason })
    }
}

/// Most memory the image crate may allocate while decoding one image.
const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// Which of the [`ImageLimits`] an image's header breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DimensionProblem {
    /// More pixels than [`ImageLimits::max_pixels`].
    #[error("more than {max} pixels")]
    TooManyPixels {
        /// The limit.
        max: u64,
    },
    /// A side longer than [`ImageLimits::max_side`].
    #[error("a side longer than {max} pixels")]
    SideTooLong {
        /// The limit.
        max: u32,
    },
    /// A side shorter than [`ImageLimits::min_side`].
    #[error("a side shorter than {min} pixels")]
    SideTooShort {
        /// The limit.
        min: u32,
    },
}

/// Why an image could not become a model input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The bytes are neither JPEG nor PNG.
    #[error("unsupported image format (expected JPEG or PNG)")]
    UnsupportedFormat,
    /// The bytes claim a supported format but do not decode.
    #[error("corrupt {format} image: {reason}")]
    Corrupt {
        /// `JPEG` or `PNG`.
        format: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The image's size, read from its header, is outside the
    /// [`ImageLimits`]; nothing was decoded.
    #[error("image is {width}x{height} pixels, {reason}: refused before decoding")]
    Dimensions {
        /// Width in the header.
        width: u32,
        /// Height in the header.
        height: u32,
        /// Which limit it breaks.
        reason: DimensionProblem,
    },
    /// A crop rectangle does not lie inside the image.
    #[error("region {x},{y} {width}x{height} is not inside the {image_width}x{image_height} image")]
    BadRegion {
        /// Left edge.
        x: u32,
        /// Top edge.
        y: u32,
        /// Region width.
        width: u32,
        /// Region height.
        height: u32,
        /// Image width.
        image_width: u32,
        /// Image height.
        image_height: u32,
    },
}

/// An owned 8-bit RGB image, rows packed (`stride = 3 * width`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height` rows of `width` RGB triples.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps packed RGB bytes; `None` if the length does not match.
    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Option<RgbImage> {
        (data.len() == width as usize * height as usize * 3).then_some(RgbImage { width, height, data })
    }

    /// The whole image as a view.
    pub fn view(&self) -> RgbView<'_> {
        RgbView { data: &self.data, width: self.width, height: self.height, stride: self.width as usize * 3 }
    }

    /// A rectangular part of the image, without copying.
    pub fn region(&self, x: u32, y: u32, width: u32, height: u32) -> Result<RgbView<'_>, PreprocessError> {
        let inside = width > 0
            && height > 0
            && x.checked_add(width).is_some_and(|r| r <= self.width)
            && y.checked_add(height).is_some_and(|b| b <= self.height);
        if !inside {
            return Err(PreprocessError::BadRegion {
                x,
                y,
                width,
                height,
                image_width: self.width,
                image_height: self.height,
            });
        }
        let stride = self.width as usize * 3;
        let start = y as usize * stride + x as usize * 3;
        Ok(RgbView { data: &self.data[start..], width, height, stride })
    }
}

/// A borrowed RGB image or part of one: row `r` starts at `r * stride`.
#[derive(Debug, Clone, Copy)]
pub struct RgbView<'a> {
    data: &'a [u8],
    width: u32,
    height: u32,
    stride: usize,
}

impl<'a> RgbView<'a> {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row `r`'s packed RGB bytes.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let start = r * self.stride;
        &self.data[start..start + self.width as usize * 3]
    }
}

/// Decodes JPEG or PNG bytes to 8-bit RGB, refusing anything else, within
/// the default [`ImageLimits`] but for the shortest side: any picture of at
/// least one pixel decodes (crops, camera frames). The counter path holds
/// whole frames to the configured minimum with [`decode_with_limits`].
pub fn decode(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    decode_with_limits(bytes, &ImageLimits { min_side: 1, ..ImageLimits::default() })
}

/// Decodes JPEG or PNG bytes to 8-bit RGB, refusing anything else and any
/// image whose header's width and height break `limits`: the header is read
/// first, and an image out of limits is refused before its pixels are
/// decoded or their buffer allocated.
pub fn decode_with_limits(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, PreprocessError> {
    let format = match image::guess_format(bytes) {
        Ok(image::ImageFormat::Jpeg) => image::ImageFormat::Jpeg,
        Ok(image::ImageFormat::Png) => image::ImageFormat::Png,
        _ => return Err(PreprocessError::UnsupportedFormat),
    };
    let format_name = if format == image::ImageFormat::Jpeg { "JPEG" } else { "PNG" };
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => PreprocessError::Corrupt {
            format: format_name,
            reason: format!("exceeds the decoder's {}-pixel side or memory limit", limits.max_side),
        },
        other => PreprocessError::Corrupt { format: format_name, reason: other.to_string() },
    };
    // The image crate's own limits agree with ours: no side beyond max_side,
    // and a bounded allocation whatever the header says.
    let decoder_limits = || {
        let mut decoder_limits = image::Limits::default();
        decoder_limits.max_image_width = Some(limits.max_side);
        decoder_limits.max_image_height = Some(limits.max_side);
        decoder_limits.max_alloc = Some(MAX_DECODE_ALLOC);
        decoder_limits
    };
    let reader = |limits: image::Limits| {
        let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
        reader.limits(limits);
        reader
    };
    // The header alone: width and height, no pixels. The decoder's side
    // limit is left out here so that an oversized image gets the clear
    // dimension error below rather than the decoder's.
    let mut header_limits = decoder_limits();
    header_limits.max_image_width = None;
    header_limits.max_image_height = None;
    let (width, height) = reader(header_limits).into_dimensions().map_err(corrupt)?;
    limits.check(width, height)?;
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder pads a truncated scan with grey; a half-received
        // photo must not be classified.
        return Err(PreprocessError::Corrupt {
            format: format_name,
            reason: "truncated: no end-of-image marker after the last scan".into(),
        });
    }
    let decoded = reader(decoder_limits()).decode().map_err(corrupt)?;
    if (decoded.width(), decoded.height()) != (width, height) {
        return Err(PreprocessError::Corrupt {
            format: format_name,
            reason: format!(
                "the header says {width}x{height} but {}x{} pixels decoded",
                decoded.width(),
                decoded.height()
            ),
        });
    }
    let rgb = decoded.into_rgb8();
    Ok(RgbImage { width, height, data: rgb.into_raw() })
}

/// True when an end-of-image marker (`FF D9`) follows the last start-of-scan
/// marker (`FF DA`). Entropy-coded data stuffs every `FF` with `00`, so the
/// marker cannot appear inside a scan by accident.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == marker);
    match (last(0xDA), last(0xD9)) {
        (Some(scan), Some(end)) => end > scan,
        _ => false,
    }
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Filter taps for one axis: for output index `i`, source pixels
/// `start[i] .. start[i] + len[i]` weighted by `weights[i * ksize ..]`.
#[derive(Debug, Default)]
struct AxisCoefficients {
    in_size: usize,
    out_size: usize,
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

impl AxisCoefficients {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear
    /// (triangle, support 1) filter over the whole input.
    fn bilinear(in_size: usize, out_size: usize) -> AxisCoefficients {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // triangle support 1.0 × filterscale
        let ksize = support.ceil() as usize * 2 + 1;
        let mut coefficients = AxisCoefficients {
            in_size,
            out_size,
            ksize,
            start: Vec::with_capacity(out_size),
            len: Vec::with_capacity(out_size),
            weights: vec![0; out_size * ksize],
        };
        let mut taps = vec![0f64; ksize];
        for out in 0..out_size {
            let center = (out as f64 + 0.5) * scale;
            let inv = 1.0 / filterscale;
            // C's (int) truncates toward zero; both bounds are then clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(len) {
                let t = ((x + xmin) as f64 - center + 0.5) * inv;
                let w = (1.0 - t.abs()).max(0.0);
                *tap = w;
                total += w;
            }
            let row = &mut coefficients.weights[out * ksize..(out + 1) * ksize];
            for (dst, &tap) in row.iter_mut().zip(&taps[..len]) {
                let w = if total != 0.0 { tap / total } else { tap };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                *dst = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
            }
            coefficients.start.push(xmin);
            coefficients.len.push(len);
        }
        coefficients
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Turns images into model inputs for one [`InputSpec`], reusing its
/// coefficients and scratch buffers across calls.
#[derive(Debug)]
pub struct Preprocessor {
    width: usize,
    height: usize,
    /// `lut[c][v]` = normalised value of channel `c` at 8-bit level `v`: the
    /// same f32 arithmetic as `(v * scale - mean) / std`, done once.
    lut: [[f32; 256]; 3],
    horizontal: AxisCoefficients,
    vertical: AxisCoefficients,
    /// Rows after the horizontal pass (`out width` × source rows in use).
    scratch: Vec<u8>,
}

impl Preprocessor {
    /// A preprocessor producing `1×3×height×width` tensors as `spec` says.
    pub fn new(spec: &InputSpec) -> Preprocessor {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 * spec.scale - spec.mean[c]) / spec.std[c];
            }
        }
        Preprocessor {
            width: spec.width as usize,
            height: spec.height as usize,
            lut,
            horizontal: AxisCoefficients::default(),
            vertical: AxisCoefficients::default(),
            scratch: Vec::new(),
        }
    }

    /// Number of `f32` in one input tensor (`3 × height × width`).
    pub fn tensor_len(&self) -> usize {
        3 * self.width * self.height
    }

    /// Decodes `bytes` and writes the model input into `out`.
    pub fn preprocess_bytes(&mut self, bytes: &[u8], out: &mut [f32]) -> Result<(), PreprocessError> {
        let image = decode(bytes)?;
        self.preprocess(image.view(), out);
        Ok(())
    }

    /// Resizes and normalises `image` into `out` (length [`Self::tensor_len`]), NCHW.
    ///
    /// # Panics
    ///
    /// If `out` has the wrong length: that is a programming error, not input.
    pub fn preprocess(&mut self, image: RgbView<'_>, out: &mut [f32]) {
        assert_eq!(out.len(), self.tensor_len(), "output tensor length");
        let (in_w, in_h) = (image.width as usize, image.height as usize);
        let (out_w, out_h) = (self.width, self.height);
        let plane = out_w * out_h;
        if in_w == out_w && in_h == out_h {
            for y in 0..out_h {
                self.write_row(image.row(y), y, out, plane);
            }
            return;
        }
        if self.horizontal.in_size != in_w || self.horizontal.out_size != out_w {
            self.horizontal = AxisCoefficients::bilinear(in_w, out_w);
        }
        if self.vertical.in_size != in_h || self.vertical.out_size != out_h {
            self.vertical = AxisCoefficients::bilinear(in_h, out_h);
        }
        let need_horizontal = in_w != out_w;
        let need_vertical = in_h != out_h;
        // Like Pillow, the horizontal pass covers only the source rows the
        // vertical pass will read.
        let (first_row, last_row) = if need_vertical {
            let v = &self.vertical;
            (v.start[0], v.start[out_h - 1] + v.len[out_h - 1])
        } else {
            (0, in_h)
        };
        let rows = last_row - first_row;
        let row_bytes = out_w * 3;
        let mut scratch = std::mem::take(&mut self.scratch);
        if need_horizontal {
            scratch.resize(rows * row_bytes, 0);
            let h = &self.horizontal;
            for r in 0..rows {
                let src = image.row(first_row + r);
                let dst = &mut scratch[r * row_bytes..(r + 1) * row_bytes];
                for x in 0..out_w {
                    let (start, len) = (h.start[x], h.len[x]);
                    let k = &h.weights[x * h.ksize..x * h.ksize + len];
                    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                    for (i, &w) in k.iter().enumerate() {
                        let p = &src[(start + i) * 3..(start + i) * 3 + 3];
                        acc[0] += i32::from(p[0]) * w;
                        acc[1] += i32::from(p[1]) * w;
                        acc[2] += i32::from(p[2]) * w;
                    }
                    dst[x * 3] = clip8(acc[0]);
                    dst[x * 3 + 1] = clip8(acc[1]);
                    dst[x * 3 + 2] = clip8(acc[2]);
                }
            }
        }
        let source_row = |r: usize| -> &[u8] {
            if need_horizontal {
                &scratch[r * row_bytes..(r + 1) * row_bytes]
            } else {
                image.row(first_row + r)
            }
        };
        if !need_vertical {
            for y in 0..out_h {
                self.write_row(source_row(y), y, out, plane);
            }
        } else {
            let v = &self.vertical;
            let mut acc = vec![0i32; row_bytes];
            let mut row = vec![0u8; row_bytes];
            for y in 0..out_h {
                let (start, len) = (v.start[y] - first_row, v.len[y]);
                let k = &v.weights[y * v.ksize..y * v.ksize + len];
                acc.fill(1i32 << (PRECISION_BITS - 1));
                for (i, &w) in k.iter().enumerate() {
                    for (a, &p) in acc.iter_mut().zip(source_row(start + i)) {
                        *a += i32::from(p) * w;
                    }
                }
                for (dst, &a) in row.iter_mut().zip(&acc) {
                    *dst = clip8(a);
                }
                self.write_row(&row, y, out, plane);
            }
        }
        self.scratch = scratch;
    }

    /// Normalises one packed RGB row into the three planes of `out`.
    #[inline]
    fn write_row(&self, rgb: &[u8], y: usize, out: &mut [f32], plane: usize) {
        let w = self.width;
        let (r_plane, rest) = out.split_at_mut(plane);
        let (g_plane, b_plane) = rest.split_at_mut(plane);
        let range = y * w..(y + 1) * w;
        for (((px, r), g), b) in rgb
            .chunks_exact(3)
            .zip(&mut r_plane[range.clone()])
            .zip(&mut g_plane[range.clone()])
            .zip(&mut b_plane[range])
        {
            *r = self.lut[0][px[0] as usize];
            *g = self.lut[1][px[1] as usize];
            *b = self.lut[2][px[2] as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(w: u32, h: u32) -> InputSpec {
        InputSpec {
            name: "image".into(),
            width: w,
            height: h,
            layout: "NCHW".into(),
            color: "RGB".into(),
            resize: "bilinear".into(),
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            crop: Default::default(),
            crop_margin: None,
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(200, 128), (128, 200), (640, 96), (97, 13), (5, 5)] {
            let c = AxisCoefficients::bilinear(i, o);
            for x in 0..o {
                let sum: i64 = c.weights[x * c.ksize..x * c.ksize + c.len[x]].iter().map(|&w| i64::from(w)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= c.len[x] as i64, "{i}->{o} at {x}: {sum}");
                assert!(c.start[x] + c.len[x] <= i);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let img = RgbImage::from_raw(37, 23, [10u8, 128, 250].repeat(37 * 23)).unwrap();
        let mut p = Preprocessor::new(&spec(16, 16));
        let mut out = vec![0.0; p.tensor_len()];
        p.preprocess(img.view(), &mut out);
        let plane = 16 * 16;
        for (c, want) in [10u8, 128, 250].into_iter().enumerate() {
            let expected = want as f32 * (1.0 / 255.0);
            assert!(out[c * plane..(c + 1) * plane].iter().all(|&v| v == expected), "channel {c}");
        }
    }

    #[test]
    fn regions_are_checked_and_cropped_without_copying() {
        let mut data = vec![0u8; 4 * 4 * 3];
        data[(4 + 2) * 3] = 255; // red pixel at x=2, y=1
        let img = RgbImage::from_raw(4, 4, data).unwrap();
        assert!(img.region(3, 3, 2, 1).is_err());
        assert!(img.region(0, 0, 0, 1).is_err());
        let view = img.region(2, 1, 2, 2).unwrap();
        let mut p = Preprocessor::new(&spec(2, 2));
        let mut out = vec![0.0; p.tensor_len()];
        p.preprocess(view, &mut out);
        assert_eq!(&out[..4], &[1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn corrupt_and_foreign_bytes_are_refused() {
        assert!(matches!(decode(b"GIF89a......"), Err(PreprocessError::UnsupportedFormat)));
        assert!(matches!(decode(b""), Err(PreprocessError::UnsupportedFormat)));
        let png_header_only = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(matches!(decode(png_header_only), Err(PreprocessError::Corrupt { format: "PNG", .. })));
        let jpeg_start_only = b"\xff\xd8\xff\xe0\0\x10JFIF\0";
        assert!(matches!(decode(jpeg_start_only), Err(PreprocessError::Corrupt { format: "JPEG", .. })));
    }
}
