//! Fuzzing the counter's image analysis with proptest: frames of any size,
//! from 1×1 to 4000 px a side, with pill-like blobs on a tray; the quality
//! gate, the localiser and the crop answer without a panic, boxes inside the
//! frame, crops of at least one pixel.
//!
//! Each property runs 256 cases by default, or `PROPTEST_CASES`. A failing
//! input is kept in `tests/proptest-regressions/fuzz.txt` (replayed first on
//! every run) and, once fixed, as a plain named test at the end of this file.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rxvision_counter::crop::crop_pill;
use rxvision_counter::localise::{localise, LocaliseOptions};
use rxvision_counter::quality::{check_frame, check_sharpness, QualityLimits};
use rxvision_models::bundle::PillCrop;
use rxvision_models::preprocess::RgbImage;

/// `default_cases` cases unless `PROPTEST_CASES` says otherwise; failures
/// persisted in the committed regressions file.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/fuzz.txt"))),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

/// A frame of any size with pill-like blobs on a tray, from a seed.
fn frame(width: u32, height: u32, seed: u64, blobs: u8) -> RgbImage {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let tray = [next() as u8, next() as u8, next() as u8];
    let mut data = tray.repeat(width as usize * height as usize);
    for _ in 0..blobs {
        let (cx, cy) = ((next() % u64::from(width)) as i64, (next() % u64::from(height)) as i64);
        let r = (next() % 40 + 1) as i64;
        let colour = [next() as u8, next() as u8, next() as u8];
        for y in (cy - r).max(0)..(cy + r).min(i64::from(height)) {
            for x in (cx - r).max(0)..(cx + r).min(i64::from(width)) {
                if (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                    let i = (y as usize * width as usize + x as usize) * 3;
                    data[i..i + 3].copy_from_slice(&colour);
                }
            }
        }
    }
    RgbImage::from_raw(width, height, data).unwrap()
}

fn side() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..8, 8u32..120, 300u32..700, 1500u32..4001]
}

/// The counter's analysis of one frame: no panic, boxes inside the frame,
/// crops of at least one pixel.
fn analyse_any_frame(width: u32, height: u32, seed: u64, blobs: u8) {
    let frame = frame(width, height, seed, blobs);
    let _ = check_frame(&frame, QualityLimits::default());
    let found = localise(&frame, LocaliseOptions::default());
    for pill in found.pills.iter().chain(&found.partial) {
        assert!(pill.w >= 1 && pill.h >= 1 && pill.x + pill.w <= width && pill.y + pill.h <= height, "{pill:?}");
        let _ = check_sharpness(&frame, *pill, QualityLimits::default());
    }
    for pill in &found.pills {
        for mode in [PillCrop::Square, PillCrop::Upright] {
            let crop = crop_pill(&frame, pill, mode, 0.3);
            assert!(crop.width >= 1 && crop.height >= 1);
            assert_eq!(crop.data.len(), crop.width as usize * crop.height as usize * 3);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_counter_analysis_takes_frames_of_any_size(
        (width, height) in (side(), side())
            .prop_filter("at most 4 MP", |(w, h)| u64::from(*w) * u64::from(*h) <= 4_000_000),
        seed in any::<u64>(),
        blobs in 0u8..6,
    ) {
        analyse_any_frame(width, height, seed, blobs);
    }
}

/// Found by `the_counter_analysis_takes_frames_of_any_size`: the tray colour
/// was the median of no pixels (the frame shrunk to 1500 / 5 x 0).
#[test]
fn found_by_fuzzing_a_1500x1_frame_is_analysed() {
    analyse_any_frame(1500, 1, 0, 0);
}
