//! Preprocessing against the independent reference (Pillow + numpy).
//!
//! Tolerances: PNG decodes identically everywhere and our resize reproduces
//! Pillow's fixed-point filter, so PNG inputs must match to float rounding
//! (1e-5). JPEG decoders differ in IDCT and chroma upsampling: zune-jpeg
//! (image crate) vs libjpeg-turbo (Pillow) may differ by a few 8-bit levels on
//! sharp edges, so JPEG inputs must agree within 4 levels at any element and
//! 0.25 levels on average (levels scaled by 1/std, i.e. in normalised units
//! `levels * scale / std`).

use std::path::Path;
use std::process::Command;

use image::{ImageEncoder, Rgb, RgbImage as ImageRgb};
use rxvision_models::bundle::InputSpec;
use rxvision_models::preprocess::{
    decode, decode_with_limits, DimensionProblem, ImageLimits, PreprocessError, Preprocessor,
};

use crate::support::{fixture, fixture_script, reference_python};

fn reference(python: &Path, image: &Path, spec: &InputSpec) -> Vec<f32> {
    let out = image.with_extension("ref.f32");
    let status = Command::new(python)
        .arg(fixture_script("reference_preprocess.py"))
        .arg(image)
        .args(["--width", &spec.width.to_string(), "--height", &spec.height.to_string()])
        .args(["--scale", &spec.scale.to_string(), "--mean"])
        .args(spec.mean.iter().map(|m| m.to_string()))
        .arg("--std")
        .args(spec.std.iter().map(|s| s.to_string()))
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run reference_preprocess.py");
    assert!(status.success(), "reference_preprocess.py failed on {}", image.display());
    std::fs::read(&out).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn ours(bytes: &[u8], spec: &InputSpec) -> Vec<f32> {
    // Sources below the counter's 32-pixel minimum side test the resize too.
    let image = decode_with_limits(bytes, &ImageLimits { min_side: 1, ..ImageLimits::default() }).unwrap();
    let mut p = Preprocessor::new(spec);
    let mut out = vec![0.0; p.tensor_len()];
    p.preprocess(image.view(), &mut out);
    out
}

/// (max, mean) absolute difference in 8-bit levels.
fn level_diff(a: &[f32], b: &[f32], spec: &InputSpec) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let plane = a.len() / 3;
    let mut max = 0f32;
    let mut sum = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let levels = (x - y).abs() * spec.std[i / plane] / spec.scale;
        max = max.max(levels);
        sum += f64::from(levels);
    }
    (max, (sum / a.len() as f64) as f32)
}

/// A deterministic image with edges, gradients and texture.
fn pattern(width: u32, height: u32) -> ImageRgb {
    ImageRgb::from_fn(width, height, |x, y| {
        let r2 = ((x as i64 - width as i64 / 2).pow(2) + (y as i64 - height as i64 / 2).pow(2)) as f32;
        let disc = r2 < (width.min(height) as f32 / 3.0).powi(2);
        let noise = ((x * 7919 + y * 104_729) % 23) as u8;
        if disc {
            Rgb([230 - noise, 200, (x * 255 / width.max(1)) as u8])
        } else {
            Rgb([(y * 255 / height.max(1)) as u8, 90 + noise, 60])
        }
    })
}

fn spec_of(width: u32, height: u32) -> InputSpec {
    InputSpec { width, height, ..fixture().manifest.input }
}

#[test]
fn png_inputs_match_pillow_exactly_at_every_size_and_mode() {
    let Some(python) = reference_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    // (source w, h) → (model w, h): down, up, same, extreme aspect, odd primes.
    let cases = [
        ((200, 160), (128, 128)),
        ((64, 50), (128, 96)),
        ((128, 128), (128, 128)),
        ((1000, 37), (97, 13)),
        ((31, 257), (64, 64)),
    ];
    for ((sw, sh), (w, h)) in cases {
        let spec = spec_of(w, h);
        let image = pattern(sw, sh);
        let variants: Vec<(&str, Vec<u8>)> = vec![
            ("rgb", encode_png(image.as_raw(), sw, sh, image::ExtendedColorType::Rgb8)),
            ("grey", {
                let grey: Vec<u8> = image.pixels().map(|p| p[1]).collect();
                encode_png(&grey, sw, sh, image::ExtendedColorType::L8)
            }),
            ("rgba", {
                let rgba: Vec<u8> = image.pixels().flat_map(|p| [p[0], p[1], p[2], (p[0] / 2) + 10]).collect();
                encode_png(&rgba, sw, sh, image::ExtendedColorType::Rgba8)
            }),
        ];
        for (mode, bytes) in variants {
            let path = dir.path().join(format!("{sw}x{sh}-{mode}.png"));
            std::fs::write(&path, &bytes).unwrap();
            let want = reference(&python, &path, &spec);
            let got = ours(&bytes, &spec);
            let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("png {sw}x{sh} {mode} -> {w}x{h}: max |diff| {max:e}");
            assert!(max <= 1e-5, "png {sw}x{sh} {mode} -> {w}x{h}: max |diff| {max}");
        }
    }
}

fn encode_png(data: &[u8], w: u32, h: u32, color: image::ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(data, w, h, color).unwrap();
    out
}

#[test]
fn jpeg_inputs_match_pillow_within_decoder_tolerance() {
    let Some(python) = reference_python() else { return };
    let bundle = fixture();
    let spec = &bundle.manifest.input;
    let dir = tempfile::tempdir().unwrap();
    let mut jpegs: Vec<(String, Vec<u8>)> = bundle
        .selftest
        .cases
        .iter()
        .filter(|c| c.image.ends_with(".jpg"))
        .map(|c| (c.image.clone(), bundle.selftest_image(c).unwrap().to_vec()))
        .collect();
    for (w, h, quality) in [(640, 480, 90), (300, 200, 60)] {
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(&pattern(w, h)).unwrap();
        jpegs.push((format!("pattern-{w}x{h}-q{quality}.jpg"), bytes));
    }
    assert!(jpegs.len() >= 5);
    for (name, bytes) in jpegs {
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let want = reference(&python, &path, spec);
        let got = ours(&bytes, spec);
        let (max, mean) = level_diff(&got, &want, spec);
        println!("jpeg {name}: max {max:.2} levels, mean {mean:.3} levels");
        assert!(max <= 4.0 && mean <= 0.25, "jpeg {name}: max {max} levels, mean {mean} levels");
    }
}

#[test]
fn the_golden_pngs_decode_to_what_pillow_sees() {
    let bundle = fixture();
    for case in bundle.selftest.cases.iter().filter(|c| c.image.ends_with(".png")) {
        let image = decode(bundle.selftest_image(case).unwrap()).unwrap();
        assert_eq!(image.data.len(), (image.width * image.height * 3) as usize);
        assert!(image.width != bundle.manifest.input.width || image.height != bundle.manifest.input.height);
    }
}

#[test]
fn truncated_and_garbage_images_are_errors_not_panics() {
    let bundle = fixture();
    let spec = &bundle.manifest.input;
    let mut p = Preprocessor::new(spec);
    let mut out = vec![0.0; p.tensor_len()];
    for case in &bundle.selftest.cases {
        let bytes = bundle.selftest_image(case).unwrap();
        for cut in [1, 8, 64, bytes.len() / 3] {
            let result = p.preprocess_bytes(&bytes[..cut], &mut out);
            assert!(result.is_err(), "{} cut at {cut} decoded", case.image);
        }
    }
    let message = p.preprocess_bytes(b"BM\x00\x00 a bitmap", &mut out).unwrap_err().to_string();
    assert!(message.contains("unsupported image format"), "{message}");
}

/// Counts the bytes each thread allocates, so a test can show that refusing
/// an image allocated nothing like its pixel buffer. The only unsafe code of
/// the tests: a pass-through to the system allocator.
#[allow(unsafe_code)]
mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATED: Cell<u64> = const { Cell::new(0) };
    }

    fn count(bytes: usize) {
        // `try_with`: never fails the allocation, even while a thread ends.
        let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes as u64)));
    }

    struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size());
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size.saturating_sub(layout.size()));
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// `f`'s result and the bytes this thread allocated while it ran (an
    /// upper bound of its peak).
    pub fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = ALLOCATED.with(Cell::get);
        let result = f();
        (result, ALLOCATED.with(Cell::get) - before)
    }
}

fn black_png(width: u32, height: u32) -> Vec<u8> {
    encode_png(&vec![0u8; width as usize * height as usize], width, height, image::ExtendedColorType::L8)
}

fn assert_dimensions(
    result: Result<rxvision_models::preprocess::RgbImage, PreprocessError>,
    want: (u32, u32, DimensionProblem),
) {
    match result {
        Err(PreprocessError::Dimensions { width, height, reason }) => {
            assert_eq!((width, height, reason), want);
        }
        Err(other) => panic!("expected a dimension error {want:?}, got {other}"),
        Ok(image) => panic!("expected a dimension error {want:?}, decoded {}x{}", image.width, image.height),
    }
}

/// An 8192x8192 black PNG is a few hundred KB that would decode to 200 MB
/// (RGB): it is refused from its header, and the refusal allocates a few
/// KB, nothing like the pixels.
#[test]
fn a_decompression_bomb_is_refused_from_its_header_before_decoding() {
    // The counter counts: a buffer the size of a small image's pixels shows.
    let (_, counted) = allocations::allocated_by(|| std::hint::black_box(vec![1u8; 8 << 20]));
    assert!(counted >= 8 << 20, "the allocation counter saw {counted} bytes");
    let bomb = black_png(8192, 8192);
    assert!(bomb.len() < 1024 * 1024, "the bomb is {} bytes", bomb.len());
    let (result, allocated) = allocations::allocated_by(|| decode(&bomb));
    let message = result.as_ref().map(|_| ()).unwrap_err().to_string();
    assert_dimensions(result, (8192, 8192, DimensionProblem::TooManyPixels { max: 40_000_000 }));
    assert!(allocated < 4 * 1024 * 1024, "refusing the bomb allocated {allocated} bytes");
    assert!(message.contains("8192x8192") && message.contains("40000000 pixels"), "{message}");
    // Only the header is read: the same bomb cut in the middle of its pixel
    // data gets the same answer, not a decoder error.
    assert_dimensions(
        decode(&bomb[..bomb.len() / 2]),
        (8192, 8192, DimensionProblem::TooManyPixels { max: 40_000_000 }),
    );
    // A side beyond 16,384 pixels, whatever the pixel count.
    assert_dimensions(decode(&black_png(20_000, 40)), (20_000, 40, DimensionProblem::SideTooLong { max: 16_384 }));
}

#[test]
fn images_too_small_to_show_a_pill_are_refused_and_32_pixels_pass() {
    // The counter's limits (the defaults); plain `decode` takes any size.
    let counter = ImageLimits::default();
    let too_small = DimensionProblem::SideTooShort { min: 32 };
    for (w, h) in [(1, 1), (4000, 10), (10, 4000), (31, 32), (32, 31)] {
        assert_dimensions(decode_with_limits(&black_png(w, h), &counter), (w, h, too_small));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&pattern(w, h)).unwrap();
        assert_dimensions(decode_with_limits(&jpeg, &counter), (w, h, too_small));
        assert_eq!(decode(&jpeg).map(|i| (i.width, i.height)).unwrap(), (w, h));
    }
    let image = decode_with_limits(&black_png(32, 32), &counter).unwrap();
    assert_eq!((image.width, image.height, image.data.len()), (32, 32, 32 * 32 * 3));
    let message = decode_with_limits(&black_png(1, 1), &counter).unwrap_err().to_string();
    assert!(message.contains("1x1") && message.contains("shorter than 32 pixels"), "{message}");
}

#[test]
fn the_limits_are_the_callers_and_the_decoder_keeps_to_them() {
    let limits = ImageLimits { max_pixels: 10_000, max_side: 200, min_side: 1 };
    let tiny = decode_with_limits(&black_png(1, 1), &limits).unwrap();
    assert_eq!((tiny.width, tiny.height), (1, 1));
    assert_dimensions(
        decode_with_limits(&black_png(201, 2), &limits),
        (201, 2, DimensionProblem::SideTooLong { max: 200 }),
    );
    assert_dimensions(
        decode_with_limits(&black_png(101, 100), &limits),
        (101, 100, DimensionProblem::TooManyPixels { max: 10_000 }),
    );
    assert!(decode_with_limits(&black_png(100, 100), &limits).is_ok());
    assert!(limits.check(200, 50).is_ok() && limits.check(0, 50).is_err());
    assert_eq!(ImageLimits::default(), ImageLimits { max_pixels: 40_000_000, max_side: 16_384, min_side: 32 });
}
