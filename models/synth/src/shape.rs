//! Pill outlines as signed distance functions in millimetres.
//!
//! Every outline lives in the pill's own frame: `u` along the length (the
//! formulary's `size_mm[0]`), `v` across it (`size_mm[1]`), origin at the centre
//! of the `length × width` box, `v` pointing down the image when the pill is not
//! rotated (image convention, so text drawn in this frame is not mirrored).
//! [`Outline::sdf`] is negative inside, zero on the edge and positive outside,
//! and is the Euclidean distance to the edge (the ellipse's by an iterative
//! closest point), which is what the renderer needs: the bevel is a band of
//! constant width inside the edge, and pixel coverage is
//! `0.5 − sdf·px_per_mm`.
//!
//! The shapes themselves, by name, are the formulary's
//! ([`rxvision_models::formulary::Shape`]); their geometry is here.
//!
//! Rounded polygons are built as an inset polygon of extent
//! `(length − 2r) × (width − 2r)` grown by `r`, so the outline's extent is
//! exactly `length × width` whatever the corner radius.

use rxvision_models::formulary::Shape;

/// How imprint text sits on a face: the text frame `(s, y)` is the pill frame
/// rotated so that `s` is the reading direction and `y` points down the
/// letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextAxis {
    /// `s = u`, `y = v`.
    AlongU,
    /// Letters' tops towards `+u`: `s = v`, `y = −u`.
    UpPlusU,
    /// Letters' tops towards `−u`: `s = −v`, `y = u`.
    UpMinusU,
}

impl TextAxis {
    /// Pill frame → text frame.
    pub fn to_text(self, u: f32, v: f32) -> (f32, f32) {
        match self {
            TextAxis::AlongU => (u, v),
            TextAxis::UpPlusU => (v, -u),
            TextAxis::UpMinusU => (-v, u),
        }
    }
}

/// Where imprint lines may go on a face, in the text frame (mm).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextRegion {
    /// Centre `(s, y)`.
    pub centre: (f32, f32),
    /// Half the usable extent along the reading direction.
    pub half_s: f32,
    /// Half the usable extent down the letters.
    pub half_y: f32,
}

#[derive(Debug, Clone)]
enum Kind {
    Circle {
        r: f32,
    },
    Ellipse {
        a: f32,
        b: f32,
    },
    RoundedBox {
        hx: f32,
        hy: f32,
        r: f32,
    },
    Stadium {
        half_straight: f32,
        r: f32,
    },
    Polygon {
        edges: Vec<Edge>,
        r: f32,
    },
    /// Two circles joined by tangents: `r1` centred at `u = c1`, `r2` at
    /// `u = c1 − h`.
    Uneven {
        c1: f32,
        r1: f32,
        r2: f32,
        h: f32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Edge {
    /// Start vertex.
    a: (f32, f32),
    /// `b − a`.
    e: (f32, f32),
    /// `1 / |e|²`.
    inv_len2: f32,
}

/// One product's outline at its size.
#[derive(Debug, Clone)]
pub struct Outline {
    /// The shape.
    pub shape: Shape,
    /// Length in mm.
    pub length: f32,
    /// Width in mm.
    pub width: f32,
    /// Largest distance from the edge to a point inside (the radius of the
    /// largest inscribed circle), which sets the dome profile.
    pub inner_depth: f32,
    kind: Kind,
}

impl Outline {
    /// The outline of `shape` with this `length ≥ width` (mm).
    pub fn new(shape: Shape, length: f32, width: f32) -> Outline {
        let (l, w) = (length, width);
        let kind = match shape {
            Shape::Round => Kind::Circle { r: l / 2.0 },
            Shape::Oval => Kind::Ellipse { a: l / 2.0, b: w / 2.0 },
            Shape::Oblong => Kind::RoundedBox { hx: l / 2.0, hy: w / 2.0, r: 0.42 * w },
            Shape::Capsule => Kind::Stadium { half_straight: (l - w).max(0.0) / 2.0, r: w / 2.0 },
            Shape::Rectangle => Kind::RoundedBox { hx: l / 2.0, hy: w / 2.0, r: 0.14 * w },
            Shape::Square => Kind::RoundedBox { hx: l / 2.0, hy: w / 2.0, r: 0.16 * w },
            Shape::Diamond => polygon(&[(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)], l, w, 0.10 * w),
            Shape::Triangle => polygon(&[(-1.0, 1.0), (1.0, 1.0), (0.0, -1.0)], l, w, 0.16 * w),
            Shape::Shield => polygon(
                &[
                    (1.0, -1.0),
                    (1.0, 1.0),
                    (0.3, 1.0),
                    (-0.35, 0.75),
                    (-0.8, 0.35),
                    (-1.0, 0.0),
                    (-0.8, -0.35),
                    (-0.35, -0.75),
                    (0.3, -1.0),
                ],
                l,
                w,
                0.12 * w,
            ),
            Shape::Pentagon => polygon(&regular(5, -std::f32::consts::FRAC_PI_2), l, w, 0.10 * w),
            Shape::Hexagon => polygon(&regular(6, 0.0), l, w, 0.08 * w),
            Shape::Teardrop => {
                let r1 = w / 2.0;
                let r2 = (0.2 * w).min(r1);
                // Keep the two circles distinct even for a stubby teardrop.
                let h = (l - r1 - r2).max(r1 - r2 + 0.01);
                Kind::Uneven { c1: l / 2.0 - r1, r1, r2, h }
            }
        };
        let mut outline = Outline { shape, length: l, width: w, inner_depth: w / 2.0, kind };
        outline.inner_depth = outline.deepest();
        outline
    }

    /// Signed distance (mm) from `(u, v)` to the edge; negative inside.
    #[inline]
    pub fn sdf(&self, u: f32, v: f32) -> f32 {
        match &self.kind {
            Kind::Circle { r } => (u * u + v * v).sqrt() - r,
            Kind::Ellipse { a, b } => ellipse_sdf(*a, *b, u, v),
            Kind::RoundedBox { hx, hy, r } => {
                let qx = u.abs() - hx + r;
                let qy = v.abs() - hy + r;
                let outside = (qx.max(0.0).powi(2) + qy.max(0.0).powi(2)).sqrt();
                outside + qx.max(qy).min(0.0) - r
            }
            Kind::Stadium { half_straight, r } => {
                let a = (u.abs() - half_straight).max(0.0);
                (a * a + v * v).sqrt() - r
            }
            Kind::Polygon { edges, r } => polygon_sdf(edges, u, v) - r,
            Kind::Uneven { c1, r1, r2, h } => {
                // Quilez's uneven capsule, axis from the big centre towards −u.
                let px = v.abs();
                let py = c1 - u;
                let b = (r1 - r2) / h;
                let a = (1.0 - b * b).sqrt();
                let k = -b * px + a * py;
                if k < 0.0 {
                    (px * px + py * py).sqrt() - r1
                } else if k > a * h {
                    (px * px + (py - h) * (py - h)).sqrt() - r2
                } else {
                    a * px + b * py - r1
                }
            }
        }
    }

    /// Elongated enough that a bisect runs across the width and a quadrisect
    /// is three parallel lines (README: score).
    pub fn elongated(&self) -> bool {
        self.length > 1.2 * self.width
    }

    /// Distance (mm) from `(u, v)` to the nearest score line for a score
    /// count of 2, 3 or 4; `f32::INFINITY` for 1.
    #[inline]
    pub fn score_distance(&self, score: u8, u: f32, v: f32) -> f32 {
        let l = self.length;
        match score {
            2 => u.abs(),
            3 => (u.abs() - l / 6.0).abs(),
            4 if self.elongated() => u.abs().min((u.abs() - l / 4.0).abs()),
            4 => u.abs().min(v.abs()),
            _ => f32::INFINITY,
        }
    }

    /// How imprint text is oriented on this outline.
    pub fn text_axis(&self) -> TextAxis {
        match self.shape {
            Shape::Shield => TextAxis::UpPlusU,
            Shape::Teardrop => TextAxis::UpMinusU,
            _ => TextAxis::AlongU,
        }
    }

    /// The area imprint lines may use on a tablet face, in the text frame.
    /// Capsules print on each half instead (see the renderer).
    pub fn text_region(&self) -> TextRegion {
        let (l, w) = (self.length, self.width);
        let (cu, cv, hu, hv) = match self.shape {
            Shape::Round => (0.0, 0.0, 0.34 * l, 0.30 * w),
            Shape::Oval => (0.0, 0.0, 0.34 * l, 0.28 * w),
            Shape::Oblong | Shape::Capsule => (0.0, 0.0, 0.40 * l, 0.30 * w),
            Shape::Rectangle => (0.0, 0.0, 0.40 * l, 0.32 * w),
            Shape::Square => (0.0, 0.0, 0.35 * l, 0.32 * w),
            Shape::Diamond => (0.0, 0.0, 0.27 * l, 0.20 * w),
            Shape::Triangle => (0.0, w / 6.0, 0.24 * l, 0.16 * w),
            Shape::Pentagon => (0.0, 0.04 * w, 0.30 * l, 0.26 * w),
            Shape::Hexagon => (0.0, 0.0, 0.32 * l, 0.28 * w),
            Shape::Shield => (0.12 * l, 0.0, 0.26 * l, 0.36 * w),
            Shape::Teardrop => {
                let r1 = w / 2.0;
                (l / 2.0 - 1.1 * r1, 0.0, 0.50 * r1, 0.62 * r1)
            }
        };
        let axis = self.text_axis();
        let centre = axis.to_text(cu, cv);
        // Half extents in the text frame: a quarter turn swaps them.
        let (half_s, half_y) = if axis == TextAxis::AlongU { (hu, hv) } else { (hv, hu) };
        TextRegion { centre, half_s, half_y }
    }

    fn deepest(&self) -> f32 {
        let n = 40;
        let mut best = 0.0f32;
        for i in 0..=n {
            for j in 0..=n {
                let u = (i as f32 / n as f32 - 0.5) * self.length;
                let v = (j as f32 / n as f32 - 0.5) * self.width;
                best = best.max(-self.sdf(u, v));
            }
        }
        best.max(1e-3)
    }
}

/// Signed distance to the ellipse of semi-axes `a`, `b`: the closest point
/// by three iterations of Chatfield's trig-free method (the parameter moves
/// along the ellipse's evolute), accurate to ~1e-4 of the axes everywhere,
/// inside included.
fn ellipse_sdf(a: f32, b: f32, u: f32, v: f32) -> f32 {
    let (px, py) = (u.abs(), v.abs());
    let (mut tx, mut ty) = (std::f32::consts::FRAC_1_SQRT_2, std::f32::consts::FRAC_1_SQRT_2);
    for _ in 0..3 {
        let (x, y) = (a * tx, b * ty);
        let ex = (a * a - b * b) * tx * tx * tx / a;
        let ey = (b * b - a * a) * ty * ty * ty / b;
        let (rx, ry) = (x - ex, y - ey);
        let (qx, qy) = (px - ex, py - ey);
        let r = rx.hypot(ry);
        let q = qx.hypot(qy).max(1e-9);
        tx = ((qx * r / q + ex) / a).clamp(0.0, 1.0);
        ty = ((qy * r / q + ey) / b).clamp(0.0, 1.0);
        let t = tx.hypot(ty).max(1e-9);
        tx /= t;
        ty /= t;
    }
    let d = (px - a * tx).hypot(py - b * ty);
    if (px / a).powi(2) + (py / b).powi(2) < 1.0 {
        -d
    } else {
        d
    }
}

/// A regular `n`-gon starting at angle `start`, normalised to the box
/// `[−1, 1]²` (so it is stretched to the product's length and width).
fn regular(n: usize, start: f32) -> Vec<(f32, f32)> {
    let pts: Vec<(f32, f32)> = (0..n)
        .map(|k| {
            let a = start + k as f32 * std::f32::consts::TAU / n as f32;
            (a.cos(), a.sin())
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
    for &(x, y) in &pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    pts.iter().map(|&(x, y)| (2.0 * (x - x0) / (x1 - x0) - 1.0, 2.0 * (y - y0) / (y1 - y0) - 1.0)).collect()
}

/// A polygon given in the unit box, inset so that rounding by `r` gives an
/// outline of extent exactly `l × w`.
fn polygon(unit: &[(f32, f32)], l: f32, w: f32, r: f32) -> Kind {
    let (hx, hy) = ((l / 2.0 - r).max(1e-3), (w / 2.0 - r).max(1e-3));
    let verts: Vec<(f32, f32)> = unit.iter().map(|&(x, y)| (x * hx, y * hy)).collect();
    let edges = (0..verts.len())
        .map(|i| {
            let a = verts[i];
            let b = verts[(i + 1) % verts.len()];
            let e = (b.0 - a.0, b.1 - a.1);
            Edge { a, e, inv_len2: 1.0 / (e.0 * e.0 + e.1 * e.1) }
        })
        .collect();
    Kind::Polygon { edges, r }
}

/// Exact signed distance to a simple polygon (Quilez's winding test).
fn polygon_sdf(edges: &[Edge], u: f32, v: f32) -> f32 {
    let mut d2 = f32::MAX;
    let mut sign = 1.0f32;
    for edge in edges {
        let (wx, wy) = (u - edge.a.0, v - edge.a.1);
        let t = ((wx * edge.e.0 + wy * edge.e.1) * edge.inv_len2).clamp(0.0, 1.0);
        let (bx, by) = (wx - edge.e.0 * t, wy - edge.e.1 * t);
        d2 = d2.min(bx * bx + by * by);
        let b_y = edge.a.1 + edge.e.1;
        let c1 = v >= edge.a.1;
        let c2 = v < b_y;
        let c3 = edge.e.0 * wy > edge.e.1 * wx;
        if (c1 && c2 && c3) || (!c1 && !c2 && !c3) {
            sign = -sign;
        }
    }
    sign * d2.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extent of the inside of an outline, measured on a fine grid.
    fn extent(o: &Outline) -> (f32, f32) {
        let step = 0.01;
        let (mut u0, mut u1, mut v0, mut v1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        let n = (o.length / step) as i32 + 40;
        for i in -n / 2..n / 2 {
            for j in -n / 2..n / 2 {
                let (u, v) = (i as f32 * step, j as f32 * step);
                if o.sdf(u, v) < 0.0 {
                    (u0, u1, v0, v1) = (u0.min(u), u1.max(u), v0.min(v), v1.max(v));
                }
            }
        }
        (u1 - u0, v1 - v0)
    }

    #[test]
    fn every_outline_has_the_formulary_extent() {
        for &shape in &Shape::ALL {
            let (l, w) = match shape {
                Shape::Round | Shape::Square => (8.0, 8.0),
                Shape::Capsule => (18.0, 6.4),
                Shape::Triangle => (8.6, 7.5),
                Shape::Pentagon => (8.6, 8.2),
                Shape::Hexagon => (10.4, 9.0),
                _ => (11.0, 7.0),
            };
            let o = Outline::new(shape, l, w);
            let (el, ew) = extent(&o);
            assert!((el - l).abs() < 0.06, "{shape:?}: length {el} vs {l}");
            assert!((ew - w).abs() < 0.06, "{shape:?}: width {ew} vs {w}");
            assert!(o.inner_depth > 0.2 * w && o.inner_depth <= 0.5 * w + 1e-3, "{shape:?}: {}", o.inner_depth);
        }
    }

    #[test]
    fn sdf_is_a_distance_near_the_edge() {
        // One millimetre inside the edge along an axis reads about −1.
        for &shape in &[Shape::Round, Shape::Oval, Shape::Capsule, Shape::Rectangle, Shape::Hexagon] {
            let o = if shape == Shape::Round { Outline::new(shape, 8.0, 8.0) } else { Outline::new(shape, 12.0, 8.0) };
            let d = o.sdf(0.0, 3.0);
            assert!((d + 1.0).abs() < 0.05, "{shape:?}: {d}");
        }
    }

    #[test]
    fn text_regions_lie_inside_the_outline() {
        for &shape in &Shape::ALL {
            let o = Outline::new(shape, 10.0, 8.0);
            let t = o.text_region();
            for (ds, dy) in [(-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0)] {
                let (s, y) = (t.centre.0 + ds * t.half_s, t.centre.1 + dy * t.half_y);
                // Back from the text frame to the pill frame.
                let (u, v) = match o.text_axis() {
                    TextAxis::AlongU => (s, y),
                    TextAxis::UpPlusU => (-y, s),
                    TextAxis::UpMinusU => (y, -s),
                };
                assert_eq!(o.text_axis().to_text(u, v), (s, y));
                assert!(o.sdf(u, v) < 0.0, "{shape:?}: corner ({u}, {v}) of the text region is outside");
            }
        }
    }

    #[test]
    fn ellipse_distance_matches_brute_force() {
        let (a, b) = (6.0f32, 2.5f32);
        let o = Outline::new(Shape::Oval, 2.0 * a, 2.0 * b);
        let edge: Vec<(f32, f32)> = (0..20_000)
            .map(|i| (i as f32 / 20_000.0 * std::f32::consts::TAU).sin_cos())
            .map(|(s, c)| (a * c, b * s))
            .collect();
        for &(u, v) in &[(0.0, 0.0), (1.0, 0.3), (5.0, 1.0), (-3.0, -2.0), (7.0, 3.0), (0.0, 4.0), (5.9, 0.0)] {
            let brute = edge.iter().map(|&(x, y)| (u - x).hypot(v - y)).fold(f32::MAX, f32::min);
            let d = o.sdf(u, v);
            assert!((d.abs() - brute).abs() < 2e-3, "({u}, {v}): {d} vs {brute}");
        }
        assert!(o.sdf(0.0, 0.0) < 0.0 && o.sdf(7.0, 3.0) > 0.0);
    }
}
