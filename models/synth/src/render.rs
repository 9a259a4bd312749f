//! One pill → shaded pixels with coverage, plus its drop shadow.
//!
//! The pill is a height field over its outline, evaluated once per image
//! pixel (no intermediate texture, so rotation costs no resampling blur):
//!
//! * **tablets** — a rounded bevel of width `b` (0.3–0.7 mm) rising to a land,
//!   then a shallow dome (the tablet's crown) up to the deepest point of the
//!   outline;
//! * **capsules** — a cylinder with hemispherical ends (`√(r² − d²)` with `d`
//!   the distance to the axis), a seam groove where the cap meets the body,
//!   cap and body in their own colours;
//! * **score lines** — V grooves 0.25 mm deep across the face;
//! * **debossed imprint** — the glyph coverage, softened by one texel, pressed
//!   0.12 mm into the surface (the walls catch the light), slightly darker
//!   inside (occlusion); **printed imprint** — ink mixed into the albedo, no
//!   relief, less gloss.
//!
//! Normals come from central differences of the height field; shading is
//! Lambert diffuse plus ambient, and Blinn–Phong specular for a camera looking
//! straight down, in linear light. Coverage at the silhouette is analytic
//! (`0.5 − sdf·px_per_mm`), so edges are anti-aliased without supersampling.

use std::sync::OnceLock;

use rxvision_models::formulary::{Face, ImprintStyle, Product};

use crate::rng::Rng;
use crate::shape::{Outline, TextAxis};
use crate::text::{self, TextMap, CAPSULE_CAP_FRACTION};

/// sRGB 8-bit → linear light.
pub fn srgb_to_linear(c: u8) -> f32 {
    static LUT: OnceLock<[f32; 256]> = OnceLock::new();
    LUT.get_or_init(|| {
        std::array::from_fn(|i| {
            let x = i as f32 / 255.0;
            if x <= 0.04045 {
                x / 12.92
            } else {
                ((x + 0.055) / 1.055).powf(2.4)
            }
        })
    })[c as usize]
}

/// Linear light (clamped to 0–1) → sRGB on the 0–255 scale, unrounded, via a
/// 4096-entry table with linear interpolation.
#[inline]
pub fn linear_to_srgb255(x: f32) -> f32 {
    const N: usize = 4096;
    static LUT: OnceLock<Vec<f32>> = OnceLock::new();
    let lut = LUT.get_or_init(|| {
        (0..=N)
            .map(|i| {
                let x = i as f32 / N as f32;
                255.0 * if x <= 0.003_130_8 { 12.92 * x } else { 1.055 * x.powf(1.0 / 2.4) - 0.055 }
            })
            .collect()
    });
    let f = x.clamp(0.0, 1.0) * N as f32;
    let i = (f as usize).min(N - 1);
    lut[i] + (lut[i + 1] - lut[i]) * (f - i as f32)
}

/// Linear RGB colour of an sRGB triple.
pub fn linear_rgb(c: [u8; 3]) -> [f32; 3] {
    c.map(srgb_to_linear)
}

/// The picture being built: linear-light RGB, row-major, 3 floats a pixel.
#[derive(Debug, Clone)]
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width × height × 3` linear values.
    pub rgb: Vec<f32>,
}

impl Canvas {
    /// A black canvas.
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, rgb: vec![0.0; width * height * 3] }
    }
}

/// The scene's light, shared by the tray and every pill.
#[derive(Debug, Clone, Copy)]
pub struct Lighting {
    /// Unit vector towards the light, image axes (x right, y down, z towards
    /// the camera).
    pub dir: [f32; 3],
    /// Linear RGB multiplier: exposure × light colour after white balance.
    pub colour: [f32; 3],
    /// Light reaching every surface regardless of its normal.
    pub ambient: f32,
    /// Gain of the Lambert term (chosen so a flat surface reads about its
    /// albedo).
    pub diffuse: f32,
}

impl Lighting {
    /// What a flat, upward-facing surface of albedo 1 reflects (the tray).
    pub fn flat(&self) -> f32 {
        self.ambient + self.diffuse * self.dir[2]
    }
}

/// Where a pill lies in the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    /// Centre x in pixels (0 = left edge of the image).
    pub cx: f32,
    /// Centre y in pixels.
    pub cy: f32,
    /// Rotation of the pill's length axis from the image x axis, radians,
    /// clockwise on screen.
    pub angle: f32,
    /// Pixels per millimetre for this pill (nominal scale × jitter).
    pub px_per_mm: f32,
}

impl Pose {
    /// Half extents (px) of the axis-aligned box around the pill's rotated
    /// `length × width` rectangle (an upper bound of its pixels).
    pub fn half_extent(&self, length: f32, width: f32) -> (f32, f32) {
        let (s, c) = self.angle.sin_cos();
        let (hl, hw) = (length / 2.0 * self.px_per_mm, width / 2.0 * self.px_per_mm);
        (c.abs() * hl + s.abs() * hw, s.abs() * hl + c.abs() * hw)
    }

    /// Image pixel centre → pill frame (mm).
    #[inline]
    fn pill_coords(&self, cos: f32, sin: f32, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - self.cx, y - self.cy);
        ((cos * dx + sin * dy) / self.px_per_mm, (-sin * dx + cos * dy) / self.px_per_mm)
    }
}

/// Surface finish: how glossy, how powdery, how domed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    /// Specular strength (Blinn–Phong).
    pub specular: f32,
    /// Specular exponent.
    pub shininess: f32,
    /// Amplitude of per-pixel albedo noise (uncoated tablets are powdery).
    pub speckle: f32,
    /// Dome height as a fraction of the thickness (tablets).
    pub crown: f32,
    /// Albedo multiplier per channel (batch and coating variation).
    pub tint: [f32; 3],
}

impl Finish {
    /// A finish for `product` drawn from realistic ranges by its dosage form:
    /// gelatin capsules are glossy, film-coated tablets semi-gloss, plain
    /// tablets matte and powdery.
    pub fn sample(product: &Product, rng: &mut Rng) -> Finish {
        let coated =
            ["film coated", "delayed release", "extended release"].iter().any(|k| product.dosage_form.contains(k));
        let (specular, shininess, speckle) = if product.is_capsule() {
            (rng.range(0.35, 0.7), rng.range(60.0, 140.0), 0.004)
        } else if coated {
            (rng.range(0.10, 0.25), rng.range(25.0, 50.0), rng.range(0.005, 0.015))
        } else {
            (rng.range(0.02, 0.07), rng.range(6.0, 14.0), rng.range(0.02, 0.045))
        };
        let gain = rng.range(0.96, 1.03);
        let tint = [0; 3].map(|_| gain * rng.range(0.985, 1.015));
        Finish { specular, shininess, speckle, crown: rng.range(0.07, 0.14), tint }
    }
}

/// A rendered pill: linear RGB and coverage over a rectangle of the image.
#[derive(Debug, Clone)]
pub struct Sprite {
    /// Left column of the rectangle in the image.
    pub x0: usize,
    /// Top row.
    pub y0: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Shaded colour (not premultiplied), 3 per pixel.
    pub rgb: Vec<f32>,
    /// Coverage 0–1.
    pub alpha: Vec<f32>,
}

/// Everything that fixes one pill's appearance in one image.
#[derive(Debug, Clone)]
pub struct PillSpec<'a> {
    /// The product.
    pub product: &'a Product,
    /// The face up.
    pub face: Face,
    /// Its outline (built once per product and size).
    pub outline: Outline,
    /// Where and how large.
    pub pose: Pose,
    /// Surface finish.
    pub finish: Finish,
}

impl<'a> PillSpec<'a> {
    /// A pill of `product` with its outline built from the formulary size.
    pub fn new(product: &'a Product, face: Face, pose: Pose, finish: Finish) -> PillSpec<'a> {
        let outline = Outline::new(product.shape, product.length_mm, product.width_mm);
        PillSpec { product, face, outline, pose, finish }
    }

    /// The pill's pixel rectangle clipped to the image: `(x0, y0, x1, y1)`,
    /// half-open; `None` when it is wholly outside.
    pub fn pixel_bounds(&self, width: usize, height: usize) -> Option<(usize, usize, usize, usize)> {
        let (hx, hy) = self.pose.half_extent(self.product.length_mm, self.product.width_mm);
        let x0 = (self.pose.cx - hx - 1.0).floor().max(0.0);
        let y0 = (self.pose.cy - hy - 1.0).floor().max(0.0);
        let x1 = (self.pose.cx + hx + 1.0).ceil().min(width as f32);
        let y1 = (self.pose.cy + hy + 1.0).ceil().min(height as f32);
        (x1 > x0 && y1 > y0).then_some((x0 as usize, y0 as usize, x1 as usize, y1 as usize))
    }

    /// Calls `f(x, y)` for every image pixel whose centre is inside the
    /// outline (coverage above one half).
    pub fn for_each_inside(&self, width: usize, height: usize, mut f: impl FnMut(usize, usize)) {
        let Some((x0, y0, x1, y1)) = self.pixel_bounds(width, height) else { return };
        let (sin, cos) = self.pose.angle.sin_cos();
        for y in y0..y1 {
            for x in x0..x1 {
                let (u, v) = self.pose.pill_coords(cos, sin, x as f32 + 0.5, y as f32 + 0.5);
                if self.outline.sdf(u, v) < 0.0 {
                    f(x, y);
                }
            }
        }
    }

    /// Shades the pill under `light`. `rng` supplies the surface speckle.
    pub fn render(&self, width: usize, height: usize, light: &Lighting, rng: &mut Rng) -> Option<Sprite> {
        let (x0, y0, x1, y1) = self.pixel_bounds(width, height)?;
        let p = self.product;
        let o = &self.outline;
        let pose = self.pose;
        let ppm = pose.px_per_mm;
        let capsule = p.is_capsule();
        let (sin, cos) = pose.angle.sin_cos();

        // Grid with a one-pixel border for the normals.
        let (gw, gh) = (x1 - x0 + 2, y1 - y0 + 2);
        let n = gw * gh;
        let mut hgt = vec![0.0f32; n];
        let mut alpha = vec![0.0f32; n];
        let mut albedo = vec![0.0f32; n * 3];
        let mut gloss = vec![0.0f32; n];
        // The tablet's crown, kept apart to be smoothed: a dome made from the
        // distance to the edge has creases along the outline's medial axis
        // (a pyramid on a triangle), which real tablets do not have.
        let mut dome = vec![0.0f32; if capsule { 0 } else { n }];

        let imprint = p.imprint(self.face);
        let scored = p.score > 1 && p.scored_on(self.face);
        let lines = if capsule { text::plan_capsule(o, imprint) } else { text::plan_tablet(o, imprint, scored) };
        let debossed = p.imprint_style == ImprintStyle::Debossed;
        let text_map = TextMap::rasterise(&lines, (2.0 * ppm).max(8.0), debossed);
        let axis = if capsule { TextAxis::AlongU } else { o.text_axis() };
        let ink = match p.imprint_style {
            ImprintStyle::Printed(c) => Some(linear_rgb(c)),
            ImprintStyle::Debossed => None,
        };
        let colours: Vec<[f32; 3]> = p
            .color_rgb
            .iter()
            .map(|&c| {
                let l = linear_rgb(c);
                [l[0] * self.finish.tint[0], l[1] * self.finish.tint[1], l[2] * self.finish.tint[2]]
            })
            .collect();
        let (cap_colour, body_colour) = (colours[0], *colours.last().expect("validated: one colour or two"));

        let bevel = (0.09 * o.width).clamp(0.3, 0.7);
        let land = 0.55 * bevel;
        let crown = self.finish.crown * p.thickness_mm;
        let dome_span = (o.inner_depth - bevel).max(1e-3);
        let radius = o.width / 2.0;
        let seam = -o.length / 2.0 + CAPSULE_CAP_FRACTION * o.length;
        const DEBOSS: f32 = 0.12;
        const SCORE_DEPTH: f32 = 0.25;
        const SCORE_HALF: f32 = 0.22;

        for gy in 0..gh {
            let y = y0 as f32 + gy as f32 - 1.0 + 0.5;
            for gx in 0..gw {
                let x = x0 as f32 + gx as f32 - 1.0 + 0.5;
                let (u, v) = pose.pill_coords(cos, sin, x, y);
                let d = o.sdf(u, v);
                let a = (0.5 - d * ppm).clamp(0.0, 1.0);
                if a <= 0.0 {
                    continue;
                }
                let i = gy * gw + gx;
                let s = (-d).max(0.0);
                let mut h;
                let mut base;
                let mut spec = 1.0f32;
                let mut shade = 1.0f32;
                let v_surface;
                if capsule {
                    let t = (s / radius).min(1.0);
                    h = radius * (1.0 - (1.0 - t) * (1.0 - t)).sqrt();
                    // Cap over body: the cap is a touch wider, the seam a groove.
                    let ds = u - seam;
                    if ds < 0.0 {
                        h += 0.04;
                    }
                    let g = (1.0 - ds.abs() / 0.12).max(0.0);
                    h -= 0.06 * g;
                    shade -= 0.25 * g;
                    let mix = (ds * ppm + 0.5).clamp(0.0, 1.0);
                    base = [0, 1, 2].map(|c| cap_colour[c] + (body_colour[c] - cap_colour[c]) * mix);
                    v_surface = radius * (v / radius).clamp(-1.0, 1.0).asin();
                } else {
                    let t = (s / bevel).min(1.0);
                    h = land * (1.0 - (1.0 - t) * (1.0 - t)).sqrt();
                    if s > bevel {
                        let t = ((s - bevel) / dome_span).min(1.0);
                        dome[i] = crown * (1.0 - (1.0 - t) * (1.0 - t));
                    }
                    if scored {
                        let g = (1.0 - o.score_distance(p.score, u, v) / SCORE_HALF).max(0.0);
                        // The groove fades out across the bevel.
                        let g = g * (s / bevel).min(1.0);
                        h -= SCORE_DEPTH * g;
                        shade -= 0.12 * g;
                    }
                    base = cap_colour;
                    v_surface = v;
                }
                if let Some(map) = &text_map {
                    let (ts, ty) = axis.to_text(u, v_surface);
                    let cov = map.sample(ts, ty);
                    if cov > 0.0 {
                        match ink {
                            Some(ink) => {
                                let k = 0.95 * cov;
                                base = [0, 1, 2].map(|c| base[c] + (ink[c] - base[c]) * k);
                                spec *= 1.0 - 0.6 * cov;
                            }
                            None => {
                                h -= DEBOSS * cov;
                                shade -= 0.10 * cov;
                            }
                        }
                    }
                }
                if self.finish.speckle > 0.0 {
                    shade *= 1.0 + self.finish.speckle * rng.normal();
                }
                hgt[i] = h;
                alpha[i] = a;
                gloss[i] = spec;
                albedo[3 * i] = base[0] * shade;
                albedo[3 * i + 1] = base[1] * shade;
                albedo[3 * i + 2] = base[2] * shade;
            }
        }

        if !capsule {
            let r = (0.3 * o.inner_depth * ppm).round().max(1.0) as usize;
            box_blur(&mut dome, gw, gh, r);
            box_blur(&mut dome, gw, gh, r);
            for ((h, d), a) in hgt.iter_mut().zip(&dome).zip(&alpha) {
                if *a > 0.0 {
                    *h += d;
                }
            }
        }

        // Shade the inner rectangle.
        let (w, h) = (x1 - x0, y1 - y0);
        let mut rgb = vec![0.0f32; w * h * 3];
        let mut out_alpha = vec![0.0f32; w * h];
        let l = light.dir;
        let (hx, hy, hz) = {
            let (x, y, z) = (l[0], l[1], l[2] + 1.0);
            let m = (x * x + y * y + z * z).sqrt();
            (x / m, y / m, z / m)
        };
        let slope = 0.5 * ppm;
        for y in 0..h {
            for x in 0..w {
                let i = (y + 1) * gw + x + 1;
                let a = alpha[i];
                if a <= 0.0 {
                    continue;
                }
                let nx = -(hgt[i + 1] - hgt[i - 1]) * slope;
                let ny = -(hgt[i + gw] - hgt[i - gw]) * slope;
                let inv = 1.0 / (nx * nx + ny * ny + 1.0).sqrt();
                let (nx, ny, nz) = (nx * inv, ny * inv, inv);
                let ndl = (nx * l[0] + ny * l[1] + nz * l[2]).max(0.0);
                let ndh = (nx * hx + ny * hy + nz * hz).max(0.0);
                let spec = self.finish.specular * gloss[i] * ndh.powf(self.finish.shininess);
                let lambert = light.ambient + light.diffuse * ndl;
                let o = y * w + x;
                out_alpha[o] = a;
                for c in 0..3 {
                    rgb[3 * o + c] = light.colour[c] * (albedo[3 * i + c] * lambert + spec);
                }
            }
        }
        Some(Sprite { x0, y0, width: w, height: h, rgb, alpha: out_alpha })
    }
}

/// A soft drop shadow: the pill's coverage shifted away from the light and
/// blurred.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shadow {
    /// Shift in pixels `(x, y)`.
    pub offset: (f32, f32),
    /// Box-blur radius in pixels (applied twice: close to a Gaussian).
    pub blur: usize,
    /// How much light the shadow's core removes (0–1).
    pub opacity: f32,
}

/// Darkens `canvas` under `sprite`'s shadow.
pub fn cast_shadow(canvas: &mut Canvas, sprite: &Sprite, shadow: &Shadow) {
    if shadow.opacity <= 0.0 {
        return;
    }
    let (ox, oy) = (shadow.offset.0.round() as i64, shadow.offset.1.round() as i64);
    let pad = 2 * shadow.blur + 1;
    let (bw, bh) = (sprite.width + 2 * pad, sprite.height + 2 * pad);
    let mut buf = vec![0.0f32; bw * bh];
    for y in 0..sprite.height {
        buf[(y + pad) * bw + pad..(y + pad) * bw + pad + sprite.width]
            .copy_from_slice(&sprite.alpha[y * sprite.width..(y + 1) * sprite.width]);
    }
    for _ in 0..2 {
        box_blur(&mut buf, bw, bh, shadow.blur);
    }
    let left = sprite.x0 as i64 - pad as i64 + ox;
    let top = sprite.y0 as i64 - pad as i64 + oy;
    for by in 0..bh {
        let y = top + by as i64;
        if y < 0 || y >= canvas.height as i64 {
            continue;
        }
        for bx in 0..bw {
            let x = left + bx as i64;
            let s = buf[by * bw + bx];
            if x < 0 || x >= canvas.width as i64 || s <= 0.0 {
                continue;
            }
            let k = 1.0 - shadow.opacity * s.min(1.0);
            let i = (y as usize * canvas.width + x as usize) * 3;
            for c in &mut canvas.rgb[i..i + 3] {
                *c *= k;
            }
        }
    }
}

/// Puts `sprite` over `canvas` by its coverage.
pub fn composite(canvas: &mut Canvas, sprite: &Sprite) {
    for y in 0..sprite.height {
        for x in 0..sprite.width {
            let a = sprite.alpha[y * sprite.width + x];
            if a <= 0.0 {
                continue;
            }
            let i = ((sprite.y0 + y) * canvas.width + sprite.x0 + x) * 3;
            let j = (y * sprite.width + x) * 3;
            for c in 0..3 {
                canvas.rgb[i + c] += (sprite.rgb[j + c] - canvas.rgb[i + c]) * a;
            }
        }
    }
}

/// Box blur of radius `r` in place, separable, zero outside the buffer.
pub fn box_blur(data: &mut [f32], w: usize, h: usize, r: usize) {
    if r == 0 {
        return;
    }
    let norm = 1.0 / (2 * r + 1) as f32;
    let mut line = vec![0.0f32; w.max(h)];
    for y in 0..h {
        let row = &mut data[y * w..(y + 1) * w];
        line[..w].copy_from_slice(row);
        running_mean(&line[..w], row, r, norm);
    }
    let mut col = vec![0.0f32; h];
    for x in 0..w {
        for y in 0..h {
            line[y] = data[y * w + x];
        }
        running_mean(&line[..h], &mut col, r, norm);
        for y in 0..h {
            data[y * w + x] = col[y];
        }
    }
}

fn running_mean(src: &[f32], dst: &mut [f32], r: usize, norm: f32) {
    let n = src.len();
    let mut sum: f32 = src[..(r + 1).min(n)].iter().sum();
    for i in 0..n {
        dst[i] = sum * norm;
        if i + r + 1 < n {
            sum += src[i + r + 1];
        }
        if i >= r {
            sum -= src[i - r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srgb_round_trips() {
        for v in [0u8, 1, 10, 50, 128, 200, 254, 255] {
            let back = linear_to_srgb255(srgb_to_linear(v));
            assert!((back - f32::from(v)).abs() < 0.3, "{v} → {back}");
        }
    }

    #[test]
    fn box_blur_keeps_mass_inside_and_spreads() {
        let (w, h) = (21, 21);
        let mut d = vec![0.0f32; w * h];
        d[10 * w + 10] = 1.0;
        box_blur(&mut d, w, h, 2);
        let sum: f32 = d.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
        assert!((d[10 * w + 10] - 1.0 / 25.0).abs() < 1e-6);
        assert_eq!(d[10 * w + 13], 0.0);
    }
}
