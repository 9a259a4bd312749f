//! Imprint text: the bundled font, line placement on a face, and rasterising
//! the lines into a coverage map in the pill's text frame.
//!
//! The font is DejaVu Sans Bold (`models/synth/fonts/`, Bitstream Vera licence
//! with the DejaVu changes in the public domain; see
//! `models/synth/fonts/LICENSE`), compiled into the binary so renders never
//! depend on the system's fonts. Glyphs are rasterised by `ab_glyph` (pure
//! Rust, anti-aliased coverage).

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};

use crate::shape::{Outline, TextAxis, TextRegion};

static FONT_DATA: &[u8] = include_bytes!("../fonts/DejaVuSans-Bold.ttf");

/// Largest cap height of an imprint line (mm); real imprints are 1.5–3 mm.
const MAX_CAP_MM: f32 = 2.6;
/// Line pitch as a multiple of the cap height.
const LINE_PITCH: f32 = 1.4;

struct Typeface {
    font: FontRef<'static>,
    /// Cap height (`H`) over the font's ascent − descent, i.e. cap pixels per
    /// unit of `PxScale`.
    cap_per_scale: f32,
}

fn typeface() -> &'static Typeface {
    static FACE: OnceLock<Typeface> = OnceLock::new();
    FACE.get_or_init(|| {
        let font = FontRef::try_from_slice(FONT_DATA).expect("the bundled font is a valid TTF");
        let h = font.outline(font.glyph_id('H')).expect("the bundled font draws H");
        // Outline bounds are in font units with y up; only the extent matters.
        let cap_units = (h.bounds.max.y - h.bounds.min.y).abs();
        Typeface { cap_per_scale: cap_units / font.height_unscaled(), font }
    })
}

/// Whether the bundled font has a glyph for `c`.
pub fn has_glyph(c: char) -> bool {
    typeface().font.glyph_id(c) != GlyphId(0)
}

/// One imprint line placed on a face (text frame, mm).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The characters.
    pub text: String,
    /// Centre of the line's ink horizontally, of its cap height vertically.
    pub centre: (f32, f32),
    /// Cap height in mm.
    pub cap_mm: f32,
}

/// Ink width of `text` for a cap height of 1 (so, mm per mm of cap height),
/// and the ink's left edge relative to the pen start, same unit.
fn measure(text: &str) -> (f32, f32) {
    let tf = typeface();
    let scale = 100.0 / tf.cap_per_scale; // cap height of 100 px
    let glyphs = shape_line(text, scale);
    let (mut x0, mut x1) = (f32::MAX, f32::MIN);
    for g in glyphs {
        if let Some(og) = tf.font.outline_glyph(g) {
            let b = og.px_bounds();
            (x0, x1) = (x0.min(b.min.x), x1.max(b.max.x));
        }
    }
    if x1 < x0 {
        (0.0, 0.0)
    } else {
        ((x1 - x0) / 100.0, x0 / 100.0)
    }
}

/// Glyphs of one line at `scale`, pen starting at x = 0 on baseline y = 0.
fn shape_line(text: &str, scale: f32) -> Vec<ab_glyph::Glyph> {
    let font = typeface().font.as_scaled(PxScale::from(scale));
    let mut x = 0.0;
    let mut prev: Option<GlyphId> = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = prev {
            x += font.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(scale, point(x, 0.0)));
        x += font.h_advance(id);
        prev = Some(id);
    }
    glyphs
}

/// The non-empty lines of an SPL imprint (`;` separates lines).
pub fn imprint_lines(imprint: &str) -> Vec<&str> {
    imprint.split(';').map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// Stacks `lines` in `region` with one cap height for all, as large as fits
/// (at most [`MAX_CAP_MM`]).
fn stack(lines: &[String], region: TextRegion) -> Vec<Line> {
    if lines.is_empty() {
        return Vec::new();
    }
    let n = lines.len() as f32;
    let mut cap = (2.0 * region.half_y / (1.0 + (n - 1.0) * LINE_PITCH)).min(MAX_CAP_MM);
    for l in lines {
        let (w, _) = measure(l);
        if w > 0.0 {
            cap = cap.min(2.0 * region.half_s / w);
        }
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, text)| Line {
            text: text.clone(),
            centre: (region.centre.0, region.centre.1 + (i as f32 - (n - 1.0) / 2.0) * LINE_PITCH * cap),
            cap_mm: cap,
        })
        .collect()
}

/// Places a tablet face's imprint. On a scored face the text is split on
/// either side of the score (a single line by its characters, several lines
/// by lines), as on real scored tablets (`1 | 0`).
pub fn plan_tablet(outline: &Outline, imprint: &str, scored: bool) -> Vec<Line> {
    let lines: Vec<String> = imprint_lines(imprint).into_iter().map(str::to_owned).collect();
    let region = outline.text_region();
    if !scored || lines.is_empty() {
        return stack(&lines, region);
    }
    let (first, second): (Vec<String>, Vec<String>) = if lines.len() == 1 {
        let chars: Vec<char> = lines[0].chars().collect();
        let mid = chars.len().div_ceil(2);
        (vec![chars[..mid].iter().collect()], vec![chars[mid..].iter().collect()])
    } else {
        let mid = lines.len().div_ceil(2);
        (lines[..mid].to_vec(), lines[mid..].to_vec())
    };
    // The score runs along v (u = 0): across the reading direction for text
    // along u, along it for text turned a quarter.
    let gap = 0.12 * outline.width.min(outline.length);
    let halves = if outline.text_axis() == TextAxis::AlongU {
        let half_s = (region.half_s - gap) / 2.0;
        [-1.0f32, 1.0].map(|side| TextRegion {
            centre: (region.centre.0 + side * (gap + half_s), region.centre.1),
            half_s,
            half_y: region.half_y,
        })
    } else {
        let half_y = (region.half_y - gap) / 2.0;
        [-1.0f32, 1.0].map(|side| TextRegion {
            centre: (region.centre.0, region.centre.1 + side * (gap + half_y)),
            half_s: region.half_s,
            half_y,
        })
    };
    let mut a = stack(&first, halves[0]);
    let mut b = stack(&second, halves[1]);
    // One cap height on the whole face.
    let cap = a.iter().chain(&b).map(|l| l.cap_mm).fold(f32::MAX, f32::min);
    for l in a.iter_mut().chain(b.iter_mut()) {
        l.cap_mm = cap;
    }
    a.append(&mut b);
    a
}

/// Where a capsule's seam is, as a fraction of its length from the cap end
/// (`−u`): the cap covers a little under half.
pub const CAPSULE_CAP_FRACTION: f32 = 0.46;

/// Places a capsule's imprint: the first line centred on the cap (`−u` side),
/// the second on the body, running along the axis; any further lines join the
/// body's line. A single line goes on the body.
pub fn plan_capsule(outline: &Outline, imprint: &str) -> Vec<Line> {
    let lines = imprint_lines(imprint);
    if lines.is_empty() {
        return Vec::new();
    }
    let l = outline.length;
    let seam = -l / 2.0 + CAPSULE_CAP_FRACTION * l;
    let cap_centre = (-l / 2.0 + seam) / 2.0;
    let body_centre = (seam + l / 2.0) / 2.0;
    let parts: Vec<(String, f32, f32)> = match lines.as_slice() {
        [one] => vec![((*one).to_owned(), body_centre, l / 2.0 - seam)],
        [first, rest @ ..] => {
            vec![((*first).to_owned(), cap_centre, seam + l / 2.0), (rest.join(" "), body_centre, l / 2.0 - seam)]
        }
        [] => unreachable!("checked above"),
    };
    let mut cap = (0.44 * outline.width).min(MAX_CAP_MM + 0.4);
    for (text, _, part_len) in &parts {
        let (w, _) = measure(text);
        if w > 0.0 {
            cap = cap.min(0.78 * part_len / w);
        }
    }
    parts.into_iter().map(|(text, u, _)| Line { text, centre: (u, 0.0), cap_mm: cap }).collect()
}

/// Text coverage (0–1) on a grid in the text frame, sampled bilinearly.
#[derive(Debug, Clone)]
pub struct TextMap {
    s0: f32,
    y0: f32,
    per_mm: f32,
    w: usize,
    h: usize,
    data: Vec<f32>,
}

impl TextMap {
    /// Rasterises `lines` at `per_mm` texels per millimetre; `soften` blurs the
    /// coverage by one texel (the sloped walls of a debossed imprint).
    pub fn rasterise(lines: &[Line], per_mm: f32, soften: bool) -> Option<TextMap> {
        let tf = typeface();
        let mut placed = Vec::new();
        let (mut s0, mut s1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for line in lines {
            let (w, left) = measure(&line.text);
            if w <= 0.0 {
                continue;
            }
            let width_mm = w * line.cap_mm;
            let pen_s = line.centre.0 - width_mm / 2.0 - left * line.cap_mm;
            let baseline_y = line.centre.1 + line.cap_mm / 2.0;
            s0 = s0.min(line.centre.0 - width_mm / 2.0);
            s1 = s1.max(line.centre.0 + width_mm / 2.0);
            // Descenders and accents reach below and above the cap band.
            y0 = y0.min(line.centre.1 - 0.8 * line.cap_mm);
            y1 = y1.max(line.centre.1 + 0.9 * line.cap_mm);
            placed.push((line, pen_s, baseline_y));
        }
        if placed.is_empty() {
            return None;
        }
        let margin = 3.0 / per_mm;
        let (s0, y0) = (s0 - margin, y0 - margin);
        let w = (((s1 + margin) - s0) * per_mm).ceil() as usize + 1;
        let h = (((y1 + margin) - y0) * per_mm).ceil() as usize + 1;
        let mut data = vec![0.0f32; w * h];
        for (line, pen_s, baseline_y) in placed {
            let scale = line.cap_mm * per_mm / tf.cap_per_scale;
            let origin_x = (pen_s - s0) * per_mm;
            let origin_y = (baseline_y - y0) * per_mm;
            for mut g in shape_line(&line.text, scale) {
                g.position = point(g.position.x + origin_x, origin_y);
                let Some(og) = tf.font.outline_glyph(g) else { continue };
                let b = og.px_bounds();
                let (bx, by) = (b.min.x as i64, b.min.y as i64);
                og.draw(|x, y, c| {
                    let (px, py) = (bx + i64::from(x), by + i64::from(y));
                    if px >= 0 && py >= 0 && (px as usize) < w && (py as usize) < h {
                        let cell = &mut data[py as usize * w + px as usize];
                        *cell = (*cell + c).min(1.0);
                    }
                });
            }
        }
        if soften {
            box_blur_1(&mut data, w, h);
        }
        Some(TextMap { s0, y0, per_mm, w, h, data })
    }

    /// Coverage at `(s, y)` (mm, text frame), 0 outside the map.
    #[inline]
    pub fn sample(&self, s: f32, y: f32) -> f32 {
        let fx = (s - self.s0) * self.per_mm - 0.5;
        let fy = (y - self.y0) * self.per_mm - 0.5;
        if fx < 0.0 || fy < 0.0 {
            return 0.0;
        }
        let (ix, iy) = (fx as usize, fy as usize);
        if ix + 1 >= self.w || iy + 1 >= self.h {
            return 0.0;
        }
        let (tx, ty) = (fx - ix as f32, fy - iy as f32);
        let i = iy * self.w + ix;
        let top = self.data[i] + (self.data[i + 1] - self.data[i]) * tx;
        let bottom = self.data[i + self.w] + (self.data[i + self.w + 1] - self.data[i + self.w]) * tx;
        top + (bottom - top) * ty
    }

    /// Sum of coverage over the map, in texels (for tests).
    pub fn ink(&self) -> f32 {
        self.data.iter().sum()
    }
}

/// 3×3 box blur in place (edges use the available neighbours).
fn box_blur_1(data: &mut [f32], w: usize, h: usize) {
    let mut tmp = vec![0.0f32; data.len()];
    for y in 0..h {
        let row = &data[y * w..(y + 1) * w];
        for x in 0..w {
            let (a, b) = (x.saturating_sub(1), (x + 1).min(w - 1));
            tmp[y * w + x] = row[a..=b].iter().sum::<f32>() / (b - a + 1) as f32;
        }
    }
    for y in 0..h {
        let (a, b) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let sum: f32 = (a..=b).map(|yy| tmp[yy * w + x]).sum();
            data[y * w + x] = sum / (b - a + 1) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxvision_models::formulary::Shape;

    #[test]
    fn the_font_covers_imprint_characters() {
        for c in "ABCXYZabcxyz0123456789 -./".chars() {
            assert!(c == ' ' || has_glyph(c), "{c:?}");
        }
        assert!(!has_glyph('\u{E000}'));
    }

    #[test]
    fn lines_fit_their_region_and_share_a_cap_height() {
        let o = Outline::new(Shape::Round, 7.1, 7.1);
        let lines = plan_tablet(&o, "TEVA;834", false);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].cap_mm, lines[1].cap_mm);
        assert!(lines[0].centre.1 < lines[1].centre.1, "first line on top");
        let r = o.text_region();
        for l in &lines {
            let (w, _) = measure(&l.text);
            assert!(w * l.cap_mm <= 2.0 * r.half_s + 1e-4);
        }
    }

    #[test]
    fn a_scored_face_splits_its_text_across_the_score() {
        let o = Outline::new(Shape::Round, 7.1, 7.1);
        let lines = plan_tablet(&o, "10", true);
        assert_eq!(lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["1", "0"]);
        assert!(lines[0].centre.0 < 0.0 && lines[1].centre.0 > 0.0);
    }

    #[test]
    fn capsule_lines_go_on_cap_and_body() {
        let o = Outline::new(Shape::Capsule, 18.0, 6.4);
        let lines = plan_capsule(&o, "TEVA;3145");
        assert_eq!(lines.len(), 2);
        assert!(lines[0].centre.0 < 0.0 && lines[1].centre.0 > 0.0);
    }

    #[test]
    fn rasterised_text_has_ink_where_the_line_is() {
        let o = Outline::new(Shape::Round, 10.0, 10.0);
        let lines = plan_tablet(&o, "M", false);
        let map = TextMap::rasterise(&lines, 20.0, false).unwrap();
        assert!(map.ink() > 100.0);
        // The centre of an M's left stem is inked, far outside is not.
        let l = &lines[0];
        let (w, _) = measure("M");
        assert!(map.sample(l.centre.0 - 0.4 * w * l.cap_mm, l.centre.1) > 0.5);
        assert_eq!(map.sample(l.centre.0 + 5.0, l.centre.1), 0.0);
        assert!(TextMap::rasterise(&[], 20.0, false).is_none());
    }
}
