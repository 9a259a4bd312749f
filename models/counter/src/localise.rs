//! Finding pills on the counting tray: one box per pill, and a count.
//!
//! Everything happens on a copy of the frame shrunk to at most
//! [`WORK_SIDE`] pixels per side. The tray fills the frame's border, so its
//! colour *field* is fitted there ([`Background`]): per channel a quadratic
//! surface in x and y, which follows the light's gradient across the tray
//! and the lens's vignetting, refitted once without the border pixels far
//! from the first fit (a second pill at the edge). A pixel is foreground
//! when its colour is far from the tray's colour *at that pixel* and it is
//! not merely a shadow (darker than the tray there with the same
//! chromaticity). How far is far follows the tray: the border's own spread
//! around the surface (texture, sensor noise, JPEG) times
//! [`NOISE_FACTOR`], at least [`MIN_DISTANCE_FLOOR`] and at most
//! [`LocaliseOptions::min_distance`], so a white pill on a white tray,
//! told apart by little more than its shaded rim, is found on a smooth tray.
//! The mask is opened (noise removed) and eroded (slightly touching pills
//! separated), holes inside a shape are filled (a pill found by its rim
//! only is the whole pill), then its 8-connected components large enough
//! to be a pill are the pills. A component touching the frame edge is a
//! pill partly out of view: it is reported but not verified.
//!
//! Limits: pills that overlap, or touch along more than a few pixels, count
//! as one; a pill the colour of the tray with no visible rim is not found
//! (use a tray that contrasts with the pills, as counting trays do).

use rxvision_models::preprocess::RgbImage;
use serde::Serialize;

/// The working resolution's longest side.
pub const WORK_SIDE: u32 = 320;

/// The colour distance threshold is at least this (0..441)…
pub const MIN_DISTANCE_FLOOR: f32 = 20.0;
/// …and otherwise this many times the 95th percentile of the border's
/// colour distance from the fitted tray.
pub const NOISE_FACTOR: f32 = 2.0;

/// Tuning of the localiser.
#[derive(Debug, Clone, Copy)]
pub struct LocaliseOptions {
    /// The largest colour distance (0..441) from the tray a pixel may need to
    /// count as a pill (on a noisy tray); a smooth tray needs less (see the
    /// module's doc).
    pub min_distance: f32,
    /// Smallest pill, as a fraction of the frame's area.
    pub min_area_fraction: f32,
    /// Margin added around each pill's box, as a fraction of its longer side.
    pub margin: f32,
}

impl Default for LocaliseOptions {
    fn default() -> Self {
        LocaliseOptions { min_distance: 48.0, min_area_fraction: 0.002, margin: 0.3 }
    }
}

/// A pill found in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PillBox {
    /// Left edge of the crop, frame pixels.
    pub x: u32,
    /// Top edge of the crop.
    pub y: u32,
    /// Crop width (square crops: equal to `h` unless clipped by the frame).
    pub w: u32,
    /// Crop height.
    pub h: u32,
    /// True when the pill touches the frame's edge (partly out of view).
    pub partial: bool,
    /// Length and width (frame pixels) of the smallest rectangle around the
    /// pill: how the formulary measures most shapes (an oblong's or a
    /// rectangle's sides, a round pill's diameter, a hexagon's corners and
    /// flats, a triangle's side and height).
    pub rectangle_px: [f32; 2],
    /// Its extents along its principal axes (frame pixels, longer first):
    /// how the formulary measures a diamond (its diagonals). Arbitrary for
    /// shapes without a long axis.
    pub axes_px: [f32; 2],
    /// Mean colour distance (0–441) of the pill's pixels from the tray: how
    /// far to trust the measured size (a pill like its tray loses its rim).
    pub contrast: f32,
    /// The pill's centre (centroid of its pixels), frame pixels.
    pub centre_px: [f32; 2],
    /// Direction of the pill's long axis in the frame, degrees clockwise
    /// from the x axis (y points down), in (-90, 90]; 0 for a pill without a
    /// long axis (its principal extents within [`ELONGATED`] of each other:
    /// round, square, regular shapes).
    pub angle_deg: f32,
}

/// A pill is elongated, and has a direction, when its principal extents
/// differ by at least this ratio.
pub const ELONGATED: f32 = 1.15;

/// Everything the localiser found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Localisation {
    /// Pills fully in view, left to right then top to bottom.
    pub pills: Vec<PillBox>,
    /// Pills cut by the frame's edge (not verified).
    pub partial: Vec<PillBox>,
    /// The estimated tray colour.
    pub tray_rgb: [u8; 3],
}

/// Finds the pills in `frame`. Any frame size is accepted: a frame too
/// small to hold a pill (down to 1×1, or a 4000×10 strip) has none, and an
/// empty or inconsistent image (`data` not `width`×`height` RGB triples)
/// has none either.
pub fn localise(frame: &RgbImage, options: LocaliseOptions) -> Localisation {
    let consistent = frame.width > 0
        && frame.height > 0
        && frame.data.len() as u64 == u64::from(frame.width) * u64::from(frame.height) * 3;
    if !consistent {
        return Localisation { pills: Vec::new(), partial: Vec::new(), tray_rgb: [0; 3] };
    }
    let (small, scale) = shrink(frame);
    let (w, h) = (small.width as usize, small.height as usize);
    let tray = tray_colour(&small);
    let background = Background::fit(&small, tray);
    let faint =
        (NOISE_FACTOR * background.spread).clamp(MIN_DISTANCE_FLOOR.min(options.min_distance), options.min_distance);
    // Both masks at once, one bit each: STRICT where a pixel is at least
    // `min_distance` from the tray there, FAINT at `faint` (never above
    // `min_distance`); a shadow is in neither.
    let mut masks = vec![0u8; w * h];
    for ((y, row), out) in small.data.chunks_exact(w * 3).enumerate().zip(masks.chunks_exact_mut(w)) {
        for ((x, px), bits) in row.chunks_exact(3).enumerate().zip(out) {
            let tray = background.at(x, y);
            let d = distance(px, tray);
            if d >= faint && !is_shadow(px, tray) {
                *bits = u8::from(d >= options.min_distance) * STRICT | FAINT;
            }
        }
    }
    // Closed (a score groove or a capsule's seam, darker than the pill, must
    // not cut it in two: dilate 2, erode 2), opened (specks of tray texture
    // removed: erode 1, dilate 1) and eroded (slightly touching pills
    // separated: erode 1); the two erosions in a row are one of radius 3.
    let masks = morph(&morph(&morph(&morph(&masks, w, h, 2, false), w, h, 3, true), w, h, 1, false), w, h, 1, true);
    let bit = |b: u8| masks.iter().map(|m| m & b != 0).collect::<Vec<bool>>();
    let mask = prefer_strict(&fill_holes(&bit(STRICT), w, h), &fill_holes(&bit(FAINT), w, h), w, h);
    let min_area = ((w * h) as f32 * options.min_area_fraction).max(4.0) as usize;
    let mut pills = Vec::new();
    let mut partial = Vec::new();
    for component in components(&mask, w, h) {
        if component.area < min_area {
            continue;
        }
        // Undo the final erosion (1 px) and scale back to the frame.
        let (x0, y0) = (component.x0.saturating_sub(1), component.y0.saturating_sub(1));
        let (x1, y1) = ((component.x1 + 1).min(w - 1), (component.y1 + 1).min(h - 1));
        let touches_edge = x0 == 0 || y0 == 0 || x1 == w - 1 || y1 == h - 1;
        let mut bx =
            square_crop(frame, [x0, y0, x1, y1].map(|v| v as f32 * scale), scale, options.margin, touches_edge);
        // The extents, with the final erosion (1 px each side) undone.
        let to_frame = |[l, w]: [f32; 2]| [(l + 2.0) * scale, (w + 2.0) * scale];
        bx.rectangle_px = to_frame(component.bounding_rectangle());
        let (axes, angle) = component.principal_axes();
        bx.axes_px = to_frame(axes);
        bx.angle_deg = if bx.axes_px[0] >= ELONGATED * bx.axes_px[1] { angle } else { 0.0 };
        bx.centre_px = component.centroid().map(|v| (v as f32 + 0.5) * scale);
        bx.contrast = component.contrast(&small, &background);
        if touches_edge {
            partial.push(bx);
        } else {
            pills.push(bx);
        }
    }
    pills.sort_by_key(|b| (b.y / 32, b.x));
    Localisation { pills, partial, tray_rgb: tray }
}

fn square_crop(frame: &RgbImage, [x0, y0, x1, y1]: [f32; 4], scale: f32, margin: f32, partial: bool) -> PillBox {
    let (cx, cy) = ((x0 + x1 + scale) / 2.0, (y0 + y1 + scale) / 2.0);
    let side = ((x1 - x0).max(y1 - y0) + scale) * (1.0 + 2.0 * margin);
    let half = side / 2.0;
    // Inside the frame whatever the margin (the frame is at least 1×1).
    let left = ((cx - half).max(0.0) as u32).min(frame.width.saturating_sub(1));
    let top = ((cy - half).max(0.0) as u32).min(frame.height.saturating_sub(1));
    let right = ((cx + half) as u32).min(frame.width);
    let bottom = ((cy + half) as u32).min(frame.height);
    PillBox {
        x: left,
        y: top,
        w: right.saturating_sub(left).max(1),
        h: bottom.saturating_sub(top).max(1),
        partial,
        rectangle_px: [0.0; 2],
        axes_px: [0.0; 2],
        contrast: 0.0,
        centre_px: [0.0; 2],
        angle_deg: 0.0,
    }
}

/// Box-averages the frame down to at most [`WORK_SIDE`] per side; returns the
/// copy and the frame pixels per working pixel. A side shorter than the
/// shrink factor (a thin strip) keeps one working pixel, the average of the
/// frame pixels there are.
fn shrink(frame: &RgbImage) -> (RgbImage, f32) {
    let factor = frame.width.max(frame.height).div_ceil(WORK_SIDE).max(1);
    if factor == 1 {
        return (frame.clone(), 1.0);
    }
    let (w, h) = ((frame.width / factor).max(1), (frame.height / factor).max(1));
    let mut data = vec![0u8; w as usize * h as usize * 3];
    for y in 0..h {
        let rows = y * factor..((y + 1) * factor).min(frame.height);
        for x in 0..w {
            let (x0, x1) = (x * factor, ((x + 1) * factor).min(frame.width));
            let n = rows.len() as u32 * (x1 - x0);
            let mut sum = [0u32; 3];
            for row in rows.clone() {
                let start = (row as usize * frame.width as usize + x0 as usize) * 3;
                for px in frame.data[start..start + (x1 - x0) as usize * 3].chunks_exact(3) {
                    sum[0] += u32::from(px[0]);
                    sum[1] += u32::from(px[1]);
                    sum[2] += u32::from(px[2]);
                }
            }
            let out = (y as usize * w as usize + x as usize) * 3;
            for c in 0..3 {
                data[out + c] = (sum[c] / n.max(1)) as u8;
            }
        }
    }
    (RgbImage { width: w, height: h, data }, factor as f32)
}

/// Per-channel median of the outer ring (4% of the shorter side, at least 2
/// px, at most half of it, and at least 1 px: a frame one pixel wide is all
/// border). An empty image has a black tray.
fn tray_colour(image: &RgbImage) -> [u8; 3] {
    let (w, h) = (image.width as usize, image.height as usize);
    let ring = (w.min(h) / 25).max(2).min(w.min(h) / 2).max(1);
    let mut channels: [Vec<u8>; 3] = Default::default();
    for y in 0..h {
        for x in 0..w {
            if x < ring || y < ring || x + ring >= w || y + ring >= h {
                let px = &image.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for c in 0..3 {
                    channels[c].push(px[c]);
                }
            }
        }
    }
    channels.map(|mut v| {
        if v.is_empty() {
            return 0;
        }
        let mid = v.len() / 2;
        *v.select_nth_unstable(mid).1
    })
}

/// The tray's colour at every working pixel (see the module's doc).
struct Background {
    /// Per channel: c0 + c1·u + c2·v + c3·u² + c4·u·v + c5·v², with u and v
    /// the pixel's position scaled to −1..1.
    coef: [[f32; 6]; 3],
    /// u of every column and v of every row (computed once: the terms are
    /// needed at every pixel).
    u: Vec<f32>,
    v: Vec<f32>,
    /// The 95th percentile of the border's colour distance from the surface.
    spread: f32,
}

impl Background {
    fn fit(image: &RgbImage, median: [u8; 3]) -> Background {
        let (w, h) = (image.width as usize, image.height as usize);
        let scaled = |n: usize| {
            let half = (n as f32 / 2.0).max(0.5);
            (0..n).map(|i| (i as f32 + 0.5) / half - 1.0).collect()
        };
        let flat = |colour: [u8; 3]| colour.map(|c| [f32::from(c), 0.0, 0.0, 0.0, 0.0, 0.0]);
        let mut background = Background { coef: flat(median), u: scaled(w), v: scaled(h), spread: 0.0 };
        let ring = (w.min(h) / 25).max(2).min(w.min(h) / 2).max(1);
        let border: Vec<(usize, usize)> = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| x < ring || y < ring || x + ring >= w || y + ring >= h)
            .collect();
        // Too few pixels for six coefficients per channel: the median tray.
        if border.len() >= 64 && w >= 16 && h >= 16 {
            if let Some(coef) = background.least_squares(image, &border) {
                background.coef = coef;
                let distances = background.distances(image, &border);
                let limit = 2.5 * percentile(&distances, 0.5) + 4.0;
                let kept: Vec<(usize, usize)> =
                    border.iter().zip(&distances).filter(|(_, &d)| d <= limit).map(|(&p, _)| p).collect();
                if let Some(coef) = background.least_squares(image, &kept) {
                    background.coef = coef;
                }
            }
        }
        background.spread = percentile(&background.distances(image, &border), 0.95);
        background
    }

    fn terms(&self, x: usize, y: usize) -> [f32; 6] {
        let (u, v) = (self.u[x], self.v[y]);
        [1.0, u, v, u * u, u * v, v * v]
    }

    /// The tray's colour at working pixel (x, y).
    fn at(&self, x: usize, y: usize) -> [f32; 3] {
        let t = self.terms(x, y);
        self.coef.map(|c| c[0] * t[0] + c[1] * t[1] + c[2] * t[2] + c[3] * t[3] + c[4] * t[4] + c[5] * t[5])
    }

    fn distances(&self, image: &RgbImage, pixels: &[(usize, usize)]) -> Vec<f32> {
        let w = image.width as usize;
        pixels
            .iter()
            .map(|&(x, y)| distance(&image.data[(y * w + x) * 3..(y * w + x) * 3 + 3], self.at(x, y)))
            .collect()
    }

    /// The surface through `pixels` (normal equations, f64), or `None` when
    /// they do not determine it.
    fn least_squares(&self, image: &RgbImage, pixels: &[(usize, usize)]) -> Option<[[f32; 6]; 3]> {
        let w = image.width as usize;
        let mut ata = [[0f64; 6]; 6];
        let mut atb = [[0f64; 6]; 3];
        for &(x, y) in pixels {
            let t = self.terms(x, y).map(f64::from);
            let i = y * w + x;
            for r in 0..6 {
                // Symmetric: the upper triangle, mirrored below.
                for c in r..6 {
                    ata[r][c] += t[r] * t[c];
                }
                for (ch, rhs) in atb.iter_mut().enumerate() {
                    rhs[r] += t[r] * f64::from(image.data[i * 3 + ch]);
                }
            }
        }
        for r in 1..6 {
            for c in 0..r {
                ata[r][c] = ata[c][r];
            }
        }
        let mut coef = [[0f32; 6]; 3];
        for ch in 0..3 {
            coef[ch] = solve6(ata, atb[ch])?.map(|v| v as f32);
        }
        Some(coef)
    }
}

/// Solves the 6×6 system `a·x = b`; `None` when it is (nearly) singular.
fn solve6(a: [[f64; 6]; 6], b: [f64; 6]) -> Option<[f64; 6]> {
    let scale = a.iter().flatten().fold(0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    rxvision_models::features::solve_linear(a, b, 1e-9 * scale)
}

/// The `q` quantile (0..=1) of `values` (0 for none).
fn percentile(values: &[f32], q: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    let k = ((v.len() - 1) as f32 * q).round() as usize;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

fn distance(px: &[u8], tray: [f32; 3]) -> f32 {
    let d: [f32; 3] = [0, 1, 2].map(|c| f32::from(px[c]) - tray[c]);
    (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
}

/// A shadow: darker than the tray in every channel by nearly the same ratio.
fn is_shadow(px: &[u8], tray: [f32; 3]) -> bool {
    let ratios: [f32; 3] = [0, 1, 2].map(|c| (f32::from(px[c]) + 1.0) / (tray[c].max(0.0) + 1.0));
    let darker = ratios.iter().all(|&r| r < 1.0);
    let spread = ratios.iter().cloned().fold(f32::MIN, f32::max) - ratios.iter().cloned().fold(f32::MAX, f32::min);
    darker && spread < 0.08 && ratios[0] > 0.45
}

/// A shape of the `loose` mask is kept as the `strict` mask has it when the
/// strict pixels make up at least this share of it: a pill that stands out
/// from the tray is measured without the faint fringe of its shadow; a
/// faint pill, or one whose half the strict mask misses, as the loose mask
/// found it.
pub const STRICT_SHARE: f32 = 0.6;

/// Combines the masks at the two thresholds (see [`STRICT_SHARE`]).
fn prefer_strict(strict: &[bool], loose: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for component in components(loose, w, h) {
        let index = |&(x, y): &(u32, u32)| y as usize * w + x as usize;
        let firm = component.pixels.iter().filter(|p| strict[index(p)]).count();
        let keep_strict = firm as f32 >= STRICT_SHARE * component.area as f32;
        for p in &component.pixels {
            out[index(p)] = !keep_strict || strict[index(p)];
        }
    }
    out
}

/// `mask` with every hole filled: background pixels that no path of
/// 4-connected background pixels joins to the frame's edge.
/// A flood fill by runs: each seed grows into the whole run of open pixels
/// of its row, and seeds the runs above and below it.
fn fill_holes(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut outside = vec![false; w * h];
    let open = |outside: &[bool], i: usize| !mask[i] && !outside[i];
    let mut seeds: Vec<(usize, usize)> = (0..w).flat_map(|x| [(x, 0), (x, h - 1)]).collect();
    seeds.extend((0..h).flat_map(|y| [(0, y), (w - 1, y)]));
    while let Some((x, y)) = seeds.pop() {
        let row = y * w;
        if !open(&outside, row + x) {
            continue;
        }
        let (mut left, mut right) = (x, x);
        while left > 0 && open(&outside, row + left - 1) {
            left -= 1;
        }
        while right + 1 < w && open(&outside, row + right + 1) {
            right += 1;
        }
        outside[row + left..=row + right].fill(true);
        for next in [y.checked_sub(1), Some(y + 1).filter(|&n| n < h)].into_iter().flatten() {
            let mut x = left;
            while x <= right {
                if open(&outside, next * w + x) {
                    seeds.push((x, next));
                    while x <= right && open(&outside, next * w + x) {
                        x += 1;
                    }
                } else {
                    x += 1;
                }
            }
        }
    }
    outside.iter().map(|&o| !o).collect()
}

/// The bits of the two masks [`localise`] builds.
const STRICT: u8 = 1;
const FAINT: u8 = 2;

/// Erosion (`erode`: each bit set where it is set in the whole window) or
/// dilation (where it is set anywhere in it) of a mask of bits by a square
/// of radius `r`, clipped to the frame (pixels outside the frame are
/// ignored, so a pill cut by the edge stays at the edge). Separable: the
/// rows' windows, then whole rows combined, every bit at once.
fn morph(mask: &[u8], w: usize, h: usize, r: usize, erode: bool) -> Vec<u8> {
    if erode {
        morph_by(mask, w, h, r, |a, b| a & b)
    } else {
        morph_by(mask, w, h, r, |a, b| a | b)
    }
}

/// [`morph`] with `combine` (AND or OR): each row combined with itself
/// shifted by 1..=r either way, then whole rows likewise.
fn morph_by(mask: &[u8], w: usize, h: usize, r: usize, combine: impl Fn(u8, u8) -> u8) -> Vec<u8> {
    let mut rows = mask.to_vec();
    for (row, out) in mask.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        for d in 1..=r.min(w - 1) {
            for (o, &s) in out[..w - d].iter_mut().zip(&row[d..]) {
                *o = combine(*o, s);
            }
            for (o, &s) in out[d..].iter_mut().zip(&row[..w - d]) {
                *o = combine(*o, s);
            }
        }
    }
    let mut out = vec![0u8; w * h];
    for (y, dst) in out.chunks_exact_mut(w).enumerate() {
        let (lo, hi) = (y.saturating_sub(r), (y + r).min(h - 1));
        dst.copy_from_slice(&rows[lo * w..(lo + 1) * w]);
        for src in rows[(lo + 1) * w..(hi + 1) * w].chunks_exact(w) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = combine(*d, s);
            }
        }
    }
    out
}

struct Component {
    area: usize,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    pixels: Vec<(u32, u32)>,
}

impl Component {
    /// The first and last pixel of each row: the pixels that can be
    /// extreme along any direction (along a row, a projection only grows or
    /// only shrinks), so the extents of these are the extents of all.
    fn row_ends(&self) -> Vec<(u32, u32)> {
        let rows = self.y1 - self.y0 + 1;
        let (mut first, mut last) = (vec![u32::MAX; rows], vec![0u32; rows]);
        for &(x, y) in &self.pixels {
            let r = y as usize - self.y0;
            first[r] = first[r].min(x);
            last[r] = last[r].max(x);
        }
        let y0 = self.y0 as u32;
        (0..rows as u32)
            .filter(|&r| first[r as usize] != u32::MAX)
            .flat_map(|r| [(first[r as usize], y0 + r), (last[r as usize], y0 + r)])
            .collect()
    }

    /// The extents of `ends` (see [`Component::row_ends`]) along direction
    /// `angle` and across it, each pixel counted with its footprint (1 at
    /// 0°, √2 at 45°).
    fn extents_at(ends: &[(u32, u32)], angle: f64) -> [f64; 2] {
        let (c, s) = (angle.cos(), angle.sin());
        let (mut u0, mut u1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in ends {
            let (x, y) = (f64::from(x), f64::from(y));
            let (u, v) = (x * c + y * s, -x * s + y * c);
            (u0, u1, v0, v1) = (u0.min(u), u1.max(u), v0.min(v), v1.max(v));
        }
        let footprint = c.abs() + s.abs();
        [u1 - u0 + footprint, v1 - v0 + footprint]
    }

    /// Length and width of the smallest-area rectangle around the pixels
    /// (directions every degree), longer first, in working pixels.
    fn bounding_rectangle(&self) -> [f32; 2] {
        let ends = self.row_ends();
        let best = (0..90)
            .map(|i| Self::extents_at(&ends, (i as f64).to_radians()))
            .min_by(|a, b| (a[0] * a[1]).total_cmp(&(b[0] * b[1])))
            .expect("90 directions");
        [best[0].max(best[1]) as f32, best[0].min(best[1]) as f32]
    }

    /// Mean colour distance of the pixels from the tray in `image`.
    fn contrast(&self, image: &RgbImage, tray: &Background) -> f32 {
        let total: f32 = self
            .pixels
            .iter()
            .map(|&(x, y)| {
                let i = ((y * image.width + x) * 3) as usize;
                distance(&image.data[i..i + 3], tray.at(x as usize, y as usize))
            })
            .sum();
        total / self.pixels.len().max(1) as f32
    }

    /// Mean position of the pixels, working pixels.
    fn centroid(&self) -> [f64; 2] {
        let n = self.pixels.len().max(1) as f64;
        let (sx, sy) = self.pixels.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + f64::from(x), b + f64::from(y)));
        [sx / n, sy / n]
    }

    /// Extents along the principal axes of the pixels (the eigenvectors of
    /// their covariance), longer first, in working pixels, and the direction
    /// of the longer one (degrees clockwise from x, in (-90, 90]). Meaningful
    /// for elongated shapes only: a round or regular shape has no principal axis.
    fn principal_axes(&self) -> ([f32; 2], f32) {
        let [mx, my] = self.centroid();
        let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
        for &(x, y) in &self.pixels {
            let (dx, dy) = (f64::from(x) - mx, f64::from(y) - my);
            sxx += dx * dx;
            syy += dy * dy;
            sxy += dx * dy;
        }
        let mut angle = 0.5 * (2.0 * sxy).atan2(sxx - syy);
        let e = Self::extents_at(&self.row_ends(), angle);
        if e[0] < e[1] {
            angle += std::f64::consts::FRAC_PI_2;
        }
        let mut degrees = angle.to_degrees();
        while degrees > 90.0 {
            degrees -= 180.0;
        }
        while degrees <= -90.0 {
            degrees += 180.0;
        }
        ([e[0].max(e[1]) as f32, e[0].min(e[1]) as f32], degrees as f32)
    }
}

/// 8-connected components of `mask`.
fn components(mask: &[bool], w: usize, h: usize) -> Vec<Component> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut c = Component { area: 0, x0: usize::MAX, y0: usize::MAX, x1: 0, y1: 0, pixels: Vec::new() };
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            c.area += 1;
            c.pixels.push((x as u32, y as u32));
            c.x0 = c.x0.min(x);
            c.y0 = c.y0.min(y);
            c.x1 = c.x1.max(x);
            c.y1 = c.y1.max(y);
            for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = yy * w + xx;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured blue tray with filled ellipses (cx, cy, rx, ry, colour) and soft shadows.
    pub(crate) fn tray(w: u32, h: u32, pills: &[(f32, f32, f32, f32, [u8; 3])]) -> RgbImage {
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let noise = ((x * 7919 + y * 104_729) % 13) as i32 - 6;
                let mut px = [40 + noise, 90 + noise, 160 + noise];
                for &(cx, cy, rx, ry, _) in pills {
                    let shadow = ((x as f32 - cx - 4.0) / rx).powi(2) + ((y as f32 - cy - 5.0) / ry).powi(2);
                    if shadow < 1.1 {
                        px = px.map(|v| v * 7 / 10);
                    }
                }
                for &(cx, cy, rx, ry, colour) in pills {
                    if ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2) < 1.0 {
                        px = colour.map(|c| i32::from(c) + noise);
                    }
                }
                data.extend(px.map(|v| v.clamp(0, 255) as u8));
            }
        }
        RgbImage { width: w, height: h, data }
    }

    #[test]
    fn one_pill_is_found_with_a_box_around_it() {
        let frame = tray(640, 480, &[(300.0, 220.0, 60.0, 35.0, [240, 240, 235])]);
        let found = localise(&frame, LocaliseOptions::default());
        assert_eq!(found.pills.len(), 1, "{found:?}");
        let b = found.pills[0];
        assert!(b.x < 240 && b.x + b.w > 360 && b.y < 185 && b.y + b.h > 255, "{b:?}");
        assert!(!b.partial);
        assert!((i32::from(found.tray_rgb[2]) - 160).abs() < 10);
    }

    #[test]
    fn an_empty_tray_has_no_pills_and_shadows_are_not_pills() {
        assert!(localise(&tray(640, 480, &[]), LocaliseOptions::default()).pills.is_empty());
    }

    #[test]
    fn several_pills_are_counted_and_a_cut_one_is_reported_as_partial() {
        let pills = [
            (100.0, 100.0, 30.0, 30.0, [250, 250, 250]),
            (300.0, 120.0, 45.0, 20.0, [230, 200, 40]),
            (500.0, 300.0, 25.0, 25.0, [220, 120, 140]),
            (200.0, 330.0, 40.0, 22.0, [245, 245, 245]),
            (630.0, 50.0, 30.0, 30.0, [250, 250, 250]),
        ];
        let found = localise(&tray(640, 480, &pills), LocaliseOptions::default());
        assert_eq!(found.pills.len(), 4, "{found:?}");
        assert_eq!(found.partial.len(), 1, "{found:?}");
        for &(cx, cy, ..) in &pills[..4] {
            assert!(
                found.pills.iter().any(|b| (b.x as f32) < cx
                    && cx < (b.x + b.w) as f32
                    && (b.y as f32) < cy
                    && cy < (b.y + b.h) as f32),
                "no box around ({cx}, {cy}): {found:?}"
            );
        }
    }

    #[test]
    fn large_frames_are_shrunk_and_boxes_come_back_in_frame_pixels() {
        let frame = tray(1920, 1080, &[(960.0, 540.0, 150.0, 80.0, [250, 250, 250])]);
        let found = localise(&frame, LocaliseOptions::default());
        assert_eq!(found.pills.len(), 1);
        let b = found.pills[0];
        assert!(b.x < 810 && b.x + b.w > 1110 && b.y < 460 && b.y + b.h > 620, "{b:?}");
        assert!(b.x + b.w <= 1920 && b.y + b.h <= 1080);
        // The extents come back in frame pixels too (300 x 160).
        assert!((b.rectangle_px[0] - 300.0).abs() < 8.0 && (b.rectangle_px[1] - 160.0).abs() < 8.0, "{b:?}");
    }

    /// Every part of the counter's analysis takes frames of any size down to
    /// 1x1 (a tiny or thin upload once crashed the scan): no panic, boxes
    /// inside the frame, crops of at least one pixel, a rejection or no pill.
    #[test]
    fn frames_of_any_size_are_analysed_without_panicking() {
        use crate::crop::crop_pill;
        use crate::quality::{check_frame, check_sharpness, QualityLimits};
        use rxvision_models::bundle::PillCrop;

        let sizes = [(1, 1), (2, 2), (3, 3), (4000, 10), (10, 4000), (32, 32), (641, 1), (1, 641), (960, 2), (5, 321)];
        for (w, h) in sizes {
            let flat = RgbImage { width: w, height: h, data: [40u8, 90, 160].repeat((w * h) as usize) };
            let noisy = RgbImage {
                width: w,
                height: h,
                data: (0..w * h * 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
            };
            let pill = tray(w, h, &[(w as f32 / 2.0, h as f32 / 2.0, w as f32 / 4.0, h as f32 / 4.0, [250, 250, 245])]);
            for (kind, frame) in [("flat", &flat), ("noisy", &noisy), ("pill", &pill)] {
                let found = localise(frame, LocaliseOptions::default());
                let _ = check_frame(frame, QualityLimits::default());
                if kind == "flat" {
                    assert!(found.pills.is_empty() && found.partial.is_empty(), "{w}x{h} {kind}: {found:?}");
                    assert_eq!(found.tray_rgb, [40, 90, 160], "{w}x{h}");
                    assert!(check_frame(frame, QualityLimits::default()).is_ok(), "{w}x{h}");
                }
                for b in found.pills.iter().chain(&found.partial) {
                    assert!(b.w >= 1 && b.h >= 1 && b.x + b.w <= w && b.y + b.h <= h, "{w}x{h} {kind}: {b:?}");
                    let _ = check_sharpness(frame, *b, QualityLimits::default());
                }
                // As the counter does: pills in full view are cut out.
                for b in &found.pills {
                    for mode in [PillCrop::Square, PillCrop::Upright] {
                        let crop = crop_pill(frame, b, mode, 0.3);
                        assert!(crop.width >= 1 && crop.height >= 1, "{w}x{h} {kind} {mode:?}");
                        assert_eq!(crop.data.len(), (crop.width * crop.height * 3) as usize);
                    }
                }
            }
            // The whole frame as a pill's box: too small to measure sharpness is blurred, not a panic.
            let whole = PillBox {
                x: 0,
                y: 0,
                w,
                h,
                partial: false,
                rectangle_px: [w.min(h) as f32; 2],
                axes_px: [w.min(h) as f32; 2],
                contrast: 0.0,
                centre_px: [w as f32 / 2.0, h as f32 / 2.0],
                angle_deg: 30.0,
            };
            let sharp = check_sharpness(&flat, whole, QualityLimits::default());
            assert_eq!(sharp.unwrap_err().code, "blurred", "{w}x{h}");
            for mode in [PillCrop::Square, PillCrop::Upright] {
                let crop = crop_pill(&flat, &whole, mode, 0.3);
                assert!(crop.width >= 1 && crop.height >= 1, "{w}x{h} {mode:?}");
            }
        }
        // A 1x1 frame has nothing to find.
        let one = RgbImage { width: 1, height: 1, data: vec![250, 250, 250] };
        let found = localise(&one, LocaliseOptions::default());
        assert!(found.pills.is_empty() && found.partial.is_empty());
    }

    /// Boxes made by hand (outside the frame, overflowing, absurd sizes)
    /// are clipped, never a panic or an enormous crop.
    #[test]
    fn boxes_outside_the_frame_are_clipped() {
        use crate::crop::crop_pill;
        use crate::quality::sharpness;
        use rxvision_models::bundle::PillCrop;

        let frame = tray(40, 30, &[]);
        let outside = PillBox {
            x: u32::MAX - 3,
            y: 100,
            w: 50,
            h: u32::MAX,
            partial: false,
            rectangle_px: [f32::INFINITY, 3.0],
            axes_px: [f32::NAN, 1.0],
            contrast: 0.0,
            centre_px: [-1e9, 1e9],
            angle_deg: 45.0,
        };
        assert_eq!(sharpness(&frame, outside), 0.0);
        let square = crop_pill(&frame, &outside, PillCrop::Square, 0.3);
        assert_eq!((square.width, square.height), (1, 1));
        let upright = crop_pill(&frame, &outside, PillCrop::Upright, 0.3);
        assert!(upright.width <= 2 * (40 + 30) && upright.width >= 1, "{}", upright.width);
        let empty = RgbImage { width: 0, height: 0, data: Vec::new() };
        assert!(localise(&empty, LocaliseOptions::default()).pills.is_empty());
        assert_eq!(crop_pill(&empty, &outside, PillCrop::Upright, 0.3).width, 0);
    }

    #[test]
    fn a_pill_is_measured_along_its_axes_at_any_angle() {
        // An oblong 120 x 40 px (rounded ends), rotated; a round pill of 70 px.
        for degrees in [0.0f32, 30.0, 45.0, 90.0, 135.0] {
            let (c, s) = (degrees.to_radians().cos(), degrees.to_radians().sin());
            let mut frame = tray(640, 480, &[(470.0, 240.0, 35.0, 35.0, [235, 235, 230])]);
            for y in 0..480u32 {
                for x in 0..640u32 {
                    let (dx, dy) = (x as f32 + 0.5 - 220.0, y as f32 + 0.5 - 240.0);
                    let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
                    let along = (u.abs() - 40.0).max(0.0);
                    if along * along + v * v <= 20.0 * 20.0 {
                        let i = ((y * 640 + x) * 3) as usize;
                        frame.data[i..i + 3].copy_from_slice(&[240, 200, 60]);
                    }
                }
            }
            let found = localise(&frame, LocaliseOptions::default());
            assert_eq!(found.pills.len(), 2, "{degrees}°");
            let oblong = found.pills.iter().find(|p| p.x < 320).unwrap();
            let round = found.pills.iter().find(|p| p.x >= 320).unwrap();
            for extents in [oblong.rectangle_px, oblong.axes_px] {
                assert!((extents[0] - 120.0).abs() <= 5.0, "{degrees}°: {oblong:?}");
                assert!((extents[1] - 40.0).abs() <= 5.0, "{degrees}°: {oblong:?}");
            }
            let [l, w] = round.rectangle_px;
            assert!((l - 70.0).abs() <= 5.0 && (w - 70.0).abs() <= 5.0, "{round:?}");
        }
    }

    /// A light tray lit unevenly (10 % brighter on the right, vignetting to
    /// 15 % darker in the corners) with mild noise; `pill` paints pixels.
    fn lit_tray(pill: impl Fn(f32, f32) -> Option<[f32; 3]>) -> RgbImage {
        let (w, h) = (640u32, 480u32);
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let (u, v) = (x as f32 / w as f32 * 2.0 - 1.0, y as f32 / h as f32 * 2.0 - 1.0);
                let light = (1.0 + 0.05 * u) * (1.0 - 0.075 * (u * u + v * v));
                let noise = ((x * 7919 + y * 104_729) % 7) as f32 - 3.0;
                let colour = pill(x as f32 + 0.5, y as f32 + 0.5).unwrap_or([205.0, 200.0, 195.0]);
                data.extend(colour.map(|c| (c * light + noise).clamp(0.0, 255.0) as u8));
            }
        }
        RgbImage { width: w, height: h, data }
    }

    #[test]
    fn an_unevenly_lit_tray_alone_has_no_pills() {
        let found = localise(&lit_tray(|_, _| None), LocaliseOptions::default());
        assert!(found.pills.is_empty() && found.partial.is_empty(), "{found:?}");
    }

    /// A white pill on a near-white tray (colour distance ~35, below the
    /// fixed limit of 48) with a lit bevel and a dark score groove across
    /// it: found whole, as one pill, measured at its size.
    #[test]
    fn a_white_pill_on_a_light_tray_is_found_whole_across_its_score() {
        let frame = lit_tray(|x, y| {
            let (dx, dy) = ((x - 300.0) / 80.0, (y - 250.0) / 45.0);
            let r = dx * dx + dy * dy;
            if r >= 1.0 {
                return None;
            }
            if (x - 300.0).abs() < 3.0 {
                return Some([150.0, 148.0, 145.0]); // the groove
            }
            let shade = if r > 0.8 { 1.08 } else { 1.0 }; // the bevel
            Some([230.0 * shade, 228.0 * shade, 225.0 * shade])
        });
        let found = localise(&frame, LocaliseOptions::default());
        assert_eq!(found.pills.len(), 1, "{found:?}");
        let [l, w] = found.pills[0].rectangle_px;
        assert!((l - 160.0).abs() <= 10.0 && (w - 90.0).abs() <= 10.0, "{:?}", found.pills[0]);
    }

    /// A two-tone capsule whose one half is the tray's colour, seen only by
    /// its lit rim: the rim and the coloured half enclose the rest, which is
    /// filled, so the capsule is found whole, not as the coloured half.
    #[test]
    fn a_capsule_half_the_trays_colour_is_found_whole() {
        let frame = lit_tray(|x, y| {
            let (dx, dy) = (x - 320.0, y - 240.0);
            let along = (dx.abs() - 60.0).max(0.0);
            let r = (along * along + dy * dy).sqrt() / 30.0;
            if r >= 1.0 {
                return None;
            }
            let shade = if r > 0.75 { 1.2 } else { 1.0 };
            let colour = if dx < 0.0 { [40.0, 140.0, 80.0] } else { [205.0, 200.0, 195.0] };
            Some(colour.map(|c| c * shade))
        });
        let found = localise(&frame, LocaliseOptions::default());
        assert_eq!(found.pills.len(), 1, "{found:?}");
        let [l, w] = found.pills[0].rectangle_px;
        assert!((l - 180.0).abs() <= 12.0 && (w - 60.0).abs() <= 8.0, "{:?}", found.pills[0]);
    }
}
