//! The quality gate: frames a model must not be asked about.
//!
//! Checked on the whole frame: too dark (mean brightness) and over-exposed
//! (share of clipped pixels). Checked on each pill's crop, after
//! localisation: blurred (variance of the Laplacian of the grey crop, the
//! usual focus measure). Every rejection carries a message a technician can
//! act on. Brightness is Rec. 601 luma, 0–255.

use rxvision_models::preprocess::RgbImage;
use serde::Serialize;

use crate::localise::PillBox;

/// Limits of the gate.
#[derive(Debug, Clone, Copy)]
pub struct QualityLimits {
    /// Below this mean brightness the frame is too dark.
    pub min_brightness: f32,
    /// Above this share of pixels at 250 or more the frame is over-exposed.
    pub max_clipped_fraction: f32,
    /// Below this Laplacian variance a pill's crop is blurred.
    pub min_sharpness: f32,
}

impl Default for QualityLimits {
    fn default() -> Self {
        // min_sharpness: calibrated against what the model reads, not set by eye
        // (ARCHITECTURE.md, "The blur gate refuses frames the model reads").
        QualityLimits { min_brightness: 35.0, max_clipped_fraction: 0.3, min_sharpness: 3.0 }
    }
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    /// Stable code: `too_dark`, `over_exposed`, `blurred`.
    pub code: &'static str,
    /// What to do about it.
    pub message: String,
}

/// Measurements of a frame or crop.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Measures {
    /// Mean luma, 0–255.
    pub brightness: f32,
    /// Share of pixels with luma ≥ 250.
    pub clipped_fraction: f32,
}

fn luma(px: &[u8]) -> f32 {
    0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2])
}

/// Brightness and clipping of the whole frame.
pub fn measure(frame: &RgbImage) -> Measures {
    let n = (frame.data.len() / 3).max(1) as f32;
    let (mut sum, mut clipped) = (0f32, 0usize);
    for px in frame.data.chunks_exact(3) {
        let l = luma(px);
        sum += l;
        clipped += usize::from(l >= 250.0);
    }
    Measures { brightness: sum / n, clipped_fraction: clipped as f32 / n }
}

/// Rejects frames too dark or over-exposed to be worth localising.
pub fn check_frame(frame: &RgbImage, limits: QualityLimits) -> Result<Measures, Rejection> {
    let m = measure(frame);
    if m.brightness < limits.min_brightness {
        return Err(Rejection {
            code: "too_dark",
            message: format!(
                "too dark (brightness {:.0} of 255, needs {:.0}): switch on the counter light or check the camera's exposure",
                m.brightness, limits.min_brightness
            ),
        });
    }
    if m.clipped_fraction > limits.max_clipped_fraction {
        return Err(Rejection {
            code: "over_exposed",
            message: format!(
                "over-exposed ({:.0}% of the picture is pure white): dim the light, move the lamp off-axis or lower the exposure",
                m.clipped_fraction * 100.0
            ),
        });
    }
    Ok(m)
}

/// Variance of the 4-neighbour Laplacian of the grey image inside `region`
/// (clipped to the frame). A region without an inner pixel (under 3×3, or
/// outside the frame) has no measurable sharpness: 0.
pub fn sharpness(frame: &RgbImage, region: PillBox) -> f32 {
    let (w, h) = (frame.width as usize, frame.height as usize);
    if frame.data.len() != w * h * 3 {
        return 0.0;
    }
    let (x0, y0) = ((region.x as usize).min(w), (region.y as usize).min(h));
    let x1 = (region.x.saturating_add(region.w) as usize).min(w);
    let y1 = (region.y.saturating_add(region.h) as usize).min(h);
    let at = |x: usize, y: usize| luma(&frame.data[(y * w + x) * 3..(y * w + x) * 3 + 3]);
    let (mut sum, mut sum2, mut n) = (0f64, 0f64, 0f64);
    for y in (y0 + 1)..y1.saturating_sub(1) {
        for x in (x0 + 1)..x1.saturating_sub(1) {
            let lap = f64::from(at(x - 1, y) + at(x + 1, y) + at(x, y - 1) + at(x, y + 1) - 4.0 * at(x, y));
            sum += lap;
            sum2 += lap * lap;
            n += 1.0;
        }
    }
    if n == 0.0 {
        return 0.0;
    }
    let mean = sum / n;
    (sum2 / n - mean * mean) as f32
}

/// Rejects a pill crop that is out of focus.
pub fn check_sharpness(frame: &RgbImage, region: PillBox, limits: QualityLimits) -> Result<f32, Rejection> {
    let s = sharpness(frame, region);
    if s < limits.min_sharpness {
        return Err(Rejection {
            code: "blurred",
            message: format!(
                "blurred (sharpness {s:.1}, needs {:.0}): hold the tray still, clean the lens or refocus the camera",
                limits.min_sharpness
            ),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage { width: w, height: h, data: rgb.repeat((w * h) as usize) }
    }

    #[test]
    fn dark_and_bright_frames_are_rejected_with_advice() {
        let dark = check_frame(&flat(64, 48, [10, 12, 15]), QualityLimits::default()).unwrap_err();
        assert_eq!(dark.code, "too_dark");
        assert!(dark.message.contains("light"));
        let white = check_frame(&flat(64, 48, [255, 255, 255]), QualityLimits::default()).unwrap_err();
        assert_eq!(white.code, "over_exposed");
        assert!(check_frame(&flat(64, 48, [40, 90, 160]), QualityLimits::default()).is_ok());
    }

    #[test]
    fn sharp_edges_pass_and_a_smooth_crop_is_blurred() {
        let mut frame = flat(64, 64, [128, 128, 128]);
        for y in 0..64 {
            for x in 0..64 {
                if (x / 4 + y / 4) % 2 == 0 {
                    let i = (y * 64 + x) * 3;
                    frame.data[i..i + 3].copy_from_slice(&[230, 230, 230]);
                }
            }
        }
        let all = PillBox {
            x: 0,
            y: 0,
            w: 64,
            h: 64,
            partial: false,
            rectangle_px: [0.0; 2],
            axes_px: [0.0; 2],
            contrast: 0.0,
            centre_px: [32.0; 2],
            angle_deg: 0.0,
        };
        assert!(check_sharpness(&frame, all, QualityLimits::default()).is_ok());
        let smooth = flat(64, 64, [128, 128, 128]);
        let err = check_sharpness(&smooth, all, QualityLimits::default()).unwrap_err();
        assert_eq!(err.code, "blurred");
    }
}
