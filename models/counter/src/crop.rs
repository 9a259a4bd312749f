//! The picture of one pill that the model is shown.
//!
//! [`PillCrop::Square`] takes the frame's pixels in the localiser's square box
//! unchanged. [`PillCrop::Upright`] turns an elongated pill so that its long
//! axis lies horizontal: a square of side `(1 + 2·margin)` × the pill's length
//! around its centre, sampled bilinearly along the pill's axes. An oval's or a
//! capsule's imprint then appears in one of two orientations (0° or 180°)
//! instead of any, which a small network learns from far fewer examples.
//! Pills without a long axis (round, square, regular shapes; `angle_deg` 0)
//! are cut as `Square`.
//!
//! Both the counter and `rxvision-synth dataset --pill-crops` call
//! [`crop_pill`], so training images are cut exactly as the counter cuts.

use crate::localise::PillBox;
use rxvision_models::bundle::PillCrop;
use rxvision_models::preprocess::RgbImage;

/// Cuts `pill` out of `frame` as `mode` says. `margin` is the localiser's
/// margin (a fraction of the pill's length on each side).
///
/// Any frame of at least 1×1 gives a crop of at least 1×1: a box reaching
/// outside the frame is clipped to it, and an upright crop is never larger
/// than twice the frame's width plus height (a pill is never longer than the
/// frame's diagonal). An empty frame gives an empty crop.
pub fn crop_pill(frame: &RgbImage, pill: &PillBox, mode: PillCrop, margin: f32) -> RgbImage {
    let empty = RgbImage { width: 0, height: 0, data: Vec::new() };
    if frame.width == 0
        || frame.height == 0
        || frame.data.len() as u64 != u64::from(frame.width) * u64::from(frame.height) * 3
    {
        return empty;
    }
    if mode == PillCrop::Square || pill.angle_deg == 0.0 {
        return square(frame, pill);
    }
    let length = pill.rectangle_px[0].max(pill.axes_px[0]);
    let largest = 2.0 * (frame.width as f32 + frame.height as f32);
    // NaN (from a hand-made box) falls to 1 through max().
    let side = (length * (1.0 + 2.0 * margin)).round().max(1.0).min(largest);
    let n = side as u32;
    let (sin, cos) = pill.angle_deg.to_radians().sin_cos();
    let [cx, cy] = pill.centre_px;
    let half = side / 2.0;
    let mut data = Vec::with_capacity(n as usize * n as usize * 3);
    for j in 0..n {
        let v = j as f32 + 0.5 - half;
        for i in 0..n {
            let u = i as f32 + 0.5 - half;
            // Output (u, v) along (long axis, short axis) → frame (x, y).
            let x = cx + u * cos - v * sin;
            let y = cy + u * sin + v * cos;
            data.extend_from_slice(&bilinear(frame, x, y));
        }
    }
    RgbImage { width: n, height: n, data }
}

/// The frame's pixels in the pill's box, clipped to the frame (at least one
/// pixel of a non-empty frame).
fn square(frame: &RgbImage, pill: &PillBox) -> RgbImage {
    let x = pill.x.min(frame.width - 1);
    let y = pill.y.min(frame.height - 1);
    let w = pill.w.clamp(1, frame.width - x);
    let h = pill.h.clamp(1, frame.height - y);
    let Ok(view) = frame.region(x, y, w, h) else {
        return RgbImage { width: 0, height: 0, data: Vec::new() };
    };
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    for row in 0..h as usize {
        data.extend_from_slice(view.row(row));
    }
    RgbImage { width: w, height: h, data }
}

/// The frame's colour at continuous position (x, y) (pixel centres at
/// integer + 0.5); positions outside the frame take the nearest edge pixel.
fn bilinear(frame: &RgbImage, x: f32, y: f32) -> [u8; 3] {
    let (w, h) = (frame.width as i64, frame.height as i64);
    let (fx, fy) = (x - 0.5, y - 0.5);
    let (x0, y0) = (fx.floor(), fy.floor());
    let (ax, ay) = (fx - x0, fy - y0);
    let at = |xi: i64, yi: i64| {
        let (xi, yi) = (xi.clamp(0, w - 1), yi.clamp(0, h - 1));
        let i = ((yi * w + xi) * 3) as usize;
        [0, 1, 2].map(|c| f32::from(frame.data[i + c]))
    };
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (p00, p10, p01, p11) = (at(x0, y0), at(x0 + 1, y0), at(x0, y0 + 1), at(x0 + 1, y0 + 1));
    [0, 1, 2].map(|c| {
        let top = p00[c] + (p10[c] - p00[c]) * ax;
        let bottom = p01[c] + (p11[c] - p01[c]) * ax;
        (top + (bottom - top) * ay).round().clamp(0.0, 255.0) as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::localise::{localise, LocaliseOptions};

    /// A dark tray with one light oblong (length 2·rx, width 2·ry) turned by
    /// `degrees`, with a red dot at its "+x" end.
    fn turned_oblong(degrees: f32, rx: f32, ry: f32) -> RgbImage {
        let (w, h) = (320u32, 240u32);
        let (cx, cy) = (160.0f32, 120.0f32);
        let (sin, cos) = degrees.to_radians().sin_cos();
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                let px = if (u / rx).powi(2) + (v / ry).powi(2) >= 1.0 {
                    [30, 40, 60]
                } else if (u - 0.6 * rx).powi(2) + v.powi(2) < 16.0 {
                    [220, 30, 30]
                } else {
                    [235, 230, 220]
                };
                data.extend(px);
            }
        }
        RgbImage { width: w, height: h, data }
    }

    fn red_centre_x(crop: &RgbImage) -> Option<(f32, f32)> {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (i, px) in crop.data.chunks_exact(3).enumerate() {
            if px[0] > 150 && px[1] < 90 {
                sx += (i as u32 % crop.width) as f32;
                sy += (i as u32 / crop.width) as f32;
                n += 1.0;
            }
        }
        (n > 0.0).then(|| (sx / n / crop.width as f32, sy / n / crop.height as f32))
    }

    #[test]
    fn an_elongated_pill_is_turned_to_lie_horizontal_at_any_angle() {
        for degrees in [-80.0f32, -45.0, -10.0, 0.0, 30.0, 60.0, 89.0] {
            let frame = turned_oblong(degrees, 60.0, 25.0);
            let found = localise(&frame, LocaliseOptions::default());
            assert_eq!(found.pills.len(), 1, "{degrees}°");
            let pill = found.pills[0];
            let error = (pill.angle_deg - degrees).rem_euclid(180.0);
            assert!(error.min(180.0 - error) < 3.0, "{degrees}°: measured {}", pill.angle_deg);
            let crop = crop_pill(&frame, &pill, PillCrop::Upright, 0.3);
            assert_eq!(crop.width, crop.height);
            assert!((crop.width as f32 - 120.0 * 1.6).abs() < 8.0, "{degrees}°: side {}", crop.width);
            // The mark at one end lies on the horizontal midline, near the left or right edge.
            let (x, y) = red_centre_x(&crop).expect("the mark is in the crop");
            assert!((y - 0.5).abs() < 0.04, "{degrees}°: mark at y {y}");
            assert!((x - 0.5).abs() > 0.15, "{degrees}°: mark at x {x}");
            // The pill spans the crop's width but not its height.
            let row = |r: u32| crop.data[(r * crop.width * 3) as usize..((r + 1) * crop.width * 3) as usize].to_vec();
            let light = |px: &[u8]| px[0] > 150;
            let middle = row(crop.height / 2);
            let lit = middle.chunks_exact(3).filter(|p| light(p)).count() as f32 / crop.width as f32;
            assert!((lit - 1.0 / 1.6).abs() < 0.06, "{degrees}°: {lit} of the midline is pill");
            let column_lit =
                (0..crop.height).filter(|&r| light(&row(r)[(crop.width / 2 * 3) as usize..])).count() as f32;
            assert!((column_lit / crop.height as f32 - 50.0 / 192.0).abs() < 0.06, "{degrees}°: {column_lit}");
        }
    }

    #[test]
    fn a_round_pill_and_the_square_mode_keep_the_frames_pixels() {
        let frame = turned_oblong(0.0, 40.0, 40.0);
        let pill = localise(&frame, LocaliseOptions::default()).pills[0];
        assert_eq!(pill.angle_deg, 0.0, "a round pill has no direction");
        let upright = crop_pill(&frame, &pill, PillCrop::Upright, 0.3);
        assert_eq!(upright, crop_pill(&frame, &pill, PillCrop::Square, 0.3));
        assert_eq!((upright.width, upright.height), (pill.w, pill.h));
        let oblong = turned_oblong(30.0, 60.0, 25.0);
        let pill = localise(&oblong, LocaliseOptions::default()).pills[0];
        let square = crop_pill(&oblong, &pill, PillCrop::Square, 0.3);
        let view = oblong.region(pill.x, pill.y, pill.w, pill.h).unwrap();
        assert_eq!(&square.data[..pill.w as usize * 3], view.row(0));
    }
}
