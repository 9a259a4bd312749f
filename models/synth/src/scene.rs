//! Scenes: a counting tray, the light, the camera, and one or many pills.
//!
//! Every value below is drawn from the image's own [`Rng`] in one fixed order,
//! so an image is a pure function of `(product, face, seed, options)`.
//!
//! | nuisance | range (per image) |
//! |---|---|
//! | tray colour | blue, grey, white or green counting tray, brightness ×0.85–1.12, each channel ×0.95–1.05 |
//! | tray texture | fine noise (σ 0.4–2 %), illumination gradient (≤ 10 % across) and vignette (≤ 15 % in the corners), ridges in 40 % of images (period 5–16 px, 1–3.5 %) |
//! | light direction | azimuth 0–360°, elevation 35–75° |
//! | light colour | 3000–6500 K blackbody, of which the camera's white balance leaves 15–40 % (a per-channel gain, green = 1) |
//! | exposure, ambient | ×0.82–1.08; ambient share 25–45 % |
//! | specular highlights | by dosage form: capsules glossy, film-coated semi-gloss, plain matte |
//! | drop shadow | away from the light, length 0.35 × thickness × cot(elevation) (≤ 2 mm), blur 30–80 % of the thickness, opacity 25–55 % |
//! | pose | rotation 0–360°, scale ×0.92–1.08, centre shifted up to 10 % of the image while the pill stays in view |
//! | defocus | 25 % of images, Gaussian σ 0.6–1.8 px |
//! | motion blur | 15 % of images, 2–7 px in any direction |
//! | sensor noise | Gaussian, read noise σ 0.5–3 levels plus shot noise (variance 0–0.03 × level) |
//! | JPEG | quality 60–95 |
//! | second pill | 25 % of single-pill images: another product partly in view at an edge, never touching the main pill |
//!
//! Scale: the counter camera's native scale is [`NATIVE_PX_PER_MM`]. A
//! single-pill image is a square field of view of
//! `REFERENCE_SIDE / NATIVE_PX_PER_MM` ≈ 24.9 mm on its short side around the
//! pill, resampled to the requested size, so pills keep their relative size at
//! any `--size`. 9 px/mm (rather than a round 10) is the largest scale at which
//! the longest product, a 21.7 mm capsule, still fits a 224-px crop at +8 %
//! scale jitter. Tray scenes use the native scale: a larger image shows more
//! tray.

use rxvision_models::formulary::{Face, Product};

use crate::render::{self, linear_rgb, Canvas, Finish, Lighting, PillSpec, Pose, Shadow};
use crate::rng::Rng;

/// The counter camera's scale in pixels per millimetre.
pub const NATIVE_PX_PER_MM: f32 = 9.0;
/// The short side (pixels) of a single-pill image at the native scale.
pub const REFERENCE_SIDE: usize = 224;
/// Largest image side the renderer accepts.
pub const MAX_SIDE: usize = 4096;

/// Why a scene could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SceneError {
    /// The tray image cannot hold two pills without overlap.
    #[error("a {width}x{height} tray at {px_per_mm} px/mm has no room for two pills")]
    TrayTooSmall {
        /// Image width.
        width: usize,
        /// Image height.
        height: usize,
        /// Scale.
        px_per_mm: f32,
    },
    /// The JPEG or PNG encoder failed.
    #[error("cannot encode image: {0}")]
    Encode(#[from] image::ImageError),
    /// The rendered frame could not be read back to crop its pill.
    #[error("cannot crop the pill: {0}")]
    Crop(String),
}

/// Size and scale of the images, and whether camera nuisances are on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceneOptions {
    /// Width in pixels (1..=[`MAX_SIDE`]).
    pub width: usize,
    /// Height in pixels (1..=[`MAX_SIDE`]).
    pub height: usize,
    /// Pixels per millimetre before the per-pill scale jitter.
    pub px_per_mm: f32,
    /// No nuisances: a plain tray, a fixed light from the top left, no blur,
    /// no noise, no second pill, JPEG quality 95. Pose and finish still vary.
    /// For tests and for looking at the geometry.
    pub clean: bool,
}

impl SceneOptions {
    /// Single-pill crops of `width × height`: the field of view is fixed, so
    /// the scale follows the short side (9 px/mm at 224).
    pub fn crop(width: usize, height: usize) -> SceneOptions {
        let px_per_mm = NATIVE_PX_PER_MM * width.min(height) as f32 / REFERENCE_SIDE as f32;
        SceneOptions { width, height, px_per_mm, clean: false }
    }

    /// Frames of the counter camera, `width × height` at the native scale: a
    /// bigger frame shows more tray, not a bigger pill, and the largest
    /// capsules (about 23 mm) fit a 640x480 frame in any orientation. The
    /// synthetic camera, count-mode trays and `--pill-crops` training sets
    /// use it.
    pub fn camera(width: usize, height: usize) -> SceneOptions {
        SceneOptions { width, height, px_per_mm: NATIVE_PX_PER_MM, clean: false }
    }

    /// Tray scenes of `width × height`: the counter camera's frames.
    pub fn tray(width: usize, height: usize) -> SceneOptions {
        SceneOptions::camera(width, height)
    }
}

/// A finished 8-bit sRGB picture and the JPEG quality its camera uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Packed RGB rows.
    pub rgb: Vec<u8>,
    /// Quality for [`Picture::to_jpeg`] (a nuisance drawn from the seed).
    pub jpeg_quality: u8,
}

impl Picture {
    /// JPEG bytes at the picture's quality (baseline, deterministic).
    pub fn to_jpeg(&self) -> Result<Vec<u8>, SceneError> {
        let mut out = Vec::with_capacity(self.rgb.len() / 8);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, self.jpeg_quality).encode(
            &self.rgb,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )?;
        Ok(out)
    }

    /// Lossless PNG bytes (for inspection and tests).
    pub fn to_png(&self) -> Result<Vec<u8>, SceneError> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out).write_image(
            &self.rgb,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )?;
        Ok(out)
    }
}

/// One pill of a tray scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrayPill {
    /// Product NDC.
    pub ndc: String,
    /// Face up.
    pub face: Face,
    /// Axis-aligned box `[x, y, w, h]` in pixels of every pixel whose centre
    /// is inside the pill.
    pub bbox: [u32; 4],
}

/// A multi-pill scene for count mode.
#[derive(Debug, Clone)]
pub struct TrayScene {
    /// The image.
    pub picture: Picture,
    /// The pills, in drawing order.
    pub pills: Vec<TrayPill>,
}

/// The tray's look.
#[derive(Debug, Clone, Copy)]
struct TrayLook {
    colour: [f32; 3],
    gradient: (f32, f32),
    vignette: f32,
    /// `(period px, angle rad, amplitude)`.
    ridges: Option<(f32, f32, f32)>,
    noise: f32,
}

/// Everything about the camera and light for one image.
#[derive(Debug, Clone, Copy)]
struct Camera {
    light: Lighting,
    elevation: f32,
    tray: TrayLook,
    shadow_softness: f32,
    shadow_opacity: f32,
    defocus: Option<f32>,
    motion: Option<(f32, f32)>,
    read_noise: f32,
    shot_noise: f32,
    jpeg_quality: u8,
}

const TRAYS: [[u8; 3]; 4] = [
    [40, 92, 172],   // blue
    [140, 142, 146], // grey
    [228, 228, 224], // white
    [46, 128, 82],   // green
];

impl Camera {
    fn sample(rng: &mut Rng, clean: bool) -> Camera {
        let kind = rng.below(TRAYS.len());
        let gain = rng.range(0.85, 1.12);
        let mut colour = linear_rgb(TRAYS[kind]);
        for c in &mut colour {
            *c *= gain * rng.range(0.95, 1.05);
        }
        let tray = TrayLook {
            colour,
            gradient: (rng.range(-0.1, 0.1), rng.range(-0.1, 0.1)),
            vignette: rng.range(0.0, 0.15),
            ridges: rng
                .chance(0.4)
                .then(|| (rng.range(5.0, 16.0), rng.range(0.0, std::f32::consts::PI), rng.range(0.01, 0.035))),
            noise: rng.range(0.004, 0.02),
        };
        let azimuth = rng.range(0.0, std::f32::consts::TAU);
        let elevation = rng.range(35.0f32, 75.0).to_radians();
        let ambient = rng.range(0.25, 0.45);
        let exposure = rng.range(0.82, 1.08);
        let kelvin = rng.range(3000.0, 6500.0);
        let residual = rng.range(0.15, 0.4);
        let shadow_softness = rng.range(0.3, 0.8);
        let shadow_opacity = rng.range(0.25, 0.55);
        let defocus = rng.chance(0.25).then(|| rng.range(0.6, 1.8));
        let motion = rng.chance(0.15).then(|| (rng.range(2.0, 7.0), rng.range(0.0, std::f32::consts::PI)));
        let read_noise = rng.range(0.5, 3.0);
        let shot_noise = rng.range(0.0, 0.03);
        let jpeg_quality = 60 + rng.below(36) as u8;
        if clean {
            let elevation = 60f32.to_radians();
            return Camera {
                light: lighting(225f32.to_radians(), elevation, 0.35, 0.95, [1.0; 3]),
                elevation,
                tray: TrayLook { colour, gradient: (0.0, 0.0), vignette: 0.0, ridges: None, noise: 0.0 },
                shadow_softness: 0.5,
                shadow_opacity: 0.4,
                defocus: None,
                motion: None,
                read_noise: 0.0,
                shot_noise: 0.0,
                jpeg_quality: 95,
            };
        }
        Camera {
            light: lighting(azimuth, elevation, ambient, exposure, white_balance_gain(kelvin, residual)),
            elevation,
            tray,
            shadow_softness,
            shadow_opacity,
            defocus,
            motion,
            read_noise,
            shot_noise,
            jpeg_quality,
        }
    }

    fn shadow(&self, product: &Product, px_per_mm: f32) -> Shadow {
        let [lx, ly, _] = self.light.dir;
        let planar = (lx * lx + ly * ly).sqrt().max(1e-6);
        let length = (0.35 * product.thickness_mm / self.elevation.tan()).min(2.0) * px_per_mm;
        let blur = (self.shadow_softness * product.thickness_mm * px_per_mm / 4.0).round().clamp(1.0, 14.0) as usize;
        Shadow { offset: (-lx / planar * length, -ly / planar * length), blur, opacity: self.shadow_opacity }
    }
}

fn lighting(azimuth: f32, elevation: f32, ambient: f32, exposure: f32, gain: [f32; 3]) -> Lighting {
    let (se, ce) = elevation.sin_cos();
    let (sa, ca) = azimuth.sin_cos();
    Lighting {
        dir: [ce * ca, ce * sa, se],
        colour: gain.map(|g| g * exposure),
        ambient,
        // A flat surface reads its albedo × exposure.
        diffuse: (1.0 - ambient) / se,
    }
}

/// sRGB of a blackbody at `kelvin` (Tanner Helland's fit, 0–255 scale).
fn blackbody(kelvin: f32) -> [f32; 3] {
    let t = kelvin / 100.0;
    let r = if t <= 66.0 { 255.0 } else { 329.699 * (t - 60.0).powf(-0.133_205) };
    let g = if t <= 66.0 { 99.4708 * t.ln() - 161.1196 } else { 288.122 * (t - 60.0).powf(-0.075_515) };
    let b = if t >= 66.0 {
        255.0
    } else if t <= 19.0 {
        0.0
    } else {
        138.5177 * (t - 10.0).ln() - 305.0448
    };
    [r, g, b].map(|c| c.clamp(1.0, 255.0))
}

/// Per-channel gain of light at `kelvin` relative to 5500 K daylight, of which
/// `residual` survives the camera's white balance; green is 1.
fn white_balance_gain(kelvin: f32, residual: f32) -> [f32; 3] {
    let lin = |c: [f32; 3]| c.map(|x| render::srgb_to_linear(x.round() as u8).max(1e-4));
    let (t, r) = (lin(blackbody(kelvin)), lin(blackbody(5500.0)));
    let ratio = [0, 1, 2].map(|c| (t[c] / r[c]).powf(residual));
    ratio.map(|x| x / ratio[1])
}

fn paint_tray(canvas: &mut Canvas, cam: &Camera, rng: &mut Rng) {
    let t = &cam.tray;
    let (w, h) = (canvas.width as f32, canvas.height as f32);
    let lit = cam.light.flat();
    let base = [0, 1, 2].map(|c| t.colour[c] * cam.light.colour[c] * lit);
    let (ridge_cos, ridge_sin, ridge_k, ridge_amp) = match t.ridges {
        Some((period, angle, amp)) => (angle.cos(), angle.sin(), std::f32::consts::TAU / period, amp),
        None => (0.0, 0.0, 0.0, 0.0),
    };
    for y in 0..canvas.height {
        let fy = (y as f32 + 0.5) / h - 0.5;
        for x in 0..canvas.width {
            let fx = (x as f32 + 0.5) / w - 0.5;
            let r2 = 2.0 * (fx * fx + fy * fy);
            let mut k = 1.0 + t.gradient.0 * fx + t.gradient.1 * fy - t.vignette * r2;
            if ridge_amp > 0.0 {
                k *= 1.0 + ridge_amp * ((x as f32 * ridge_cos + y as f32 * ridge_sin) * ridge_k).sin();
            }
            if t.noise > 0.0 {
                k *= 1.0 + t.noise * rng.normal();
            }
            let i = (y * canvas.width + x) * 3;
            for (out, b) in canvas.rgb[i..i + 3].iter_mut().zip(base) {
                *out = b * k;
            }
        }
    }
}

/// Draws a pill: its shadow, then the pill.
fn draw_pill(canvas: &mut Canvas, spec: &PillSpec<'_>, cam: &Camera, rng: &mut Rng) {
    if let Some(sprite) = spec.render(canvas.width, canvas.height, &cam.light, rng) {
        render::cast_shadow(canvas, &sprite, &cam.shadow(spec.product, spec.pose.px_per_mm));
        render::composite(canvas, &sprite);
    }
}

/// Separable Gaussian blur of the canvas (edges clamped).
fn gaussian_blur(canvas: &mut Canvas, sigma: f32) {
    let r = (3.0 * sigma).ceil() as usize;
    let kernel: Vec<f32> =
        (0..=2 * r).map(|i| (-((i as f32 - r as f32).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / norm).collect();
    let (w, h) = (canvas.width, canvas.height);
    let mut tmp = vec![0.0f32; canvas.rgb.len()];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (k, &wt) in kernel.iter().enumerate() {
                let xx = (x + k).saturating_sub(r).min(w - 1);
                let j = (y * w + xx) * 3;
                for (a, v) in acc.iter_mut().zip(&canvas.rgb[j..j + 3]) {
                    *a += wt * v;
                }
            }
            tmp[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (k, &wt) in kernel.iter().enumerate() {
                let yy = (y + k).saturating_sub(r).min(h - 1);
                let j = (yy * w + x) * 3;
                for (a, v) in acc.iter_mut().zip(&tmp[j..j + 3]) {
                    *a += wt * v;
                }
            }
            canvas.rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
}

/// Linear motion blur of `length` px along `angle` (bilinear taps, edges
/// clamped).
fn motion_blur(canvas: &mut Canvas, length: f32, angle: f32) {
    let taps = length.ceil() as usize + 1;
    let (dx, dy) = (angle.cos(), angle.sin());
    let (w, h) = (canvas.width, canvas.height);
    let src = canvas.rgb.clone();
    let sample = |x: f32, y: f32, out: &mut [f32; 3]| {
        let x = x.clamp(0.0, (w - 1) as f32);
        let y = y.clamp(0.0, (h - 1) as f32);
        let (ix, iy) = (x as usize, y as usize);
        let (ix1, iy1) = ((ix + 1).min(w - 1), (iy + 1).min(h - 1));
        let (tx, ty) = (x - ix as f32, y - iy as f32);
        for c in 0..3 {
            let p = |xx: usize, yy: usize| src[(yy * w + xx) * 3 + c];
            let top = p(ix, iy) + (p(ix1, iy) - p(ix, iy)) * tx;
            let bottom = p(ix, iy1) + (p(ix1, iy1) - p(ix, iy1)) * tx;
            out[c] += top + (bottom - top) * ty;
        }
    };
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for t in 0..taps {
                let off = (t as f32 / (taps - 1) as f32 - 0.5) * length;
                sample(x as f32 + off * dx, y as f32 + off * dy, &mut acc);
            }
            let i = (y * w + x) * 3;
            for (out, a) in canvas.rgb[i..i + 3].iter_mut().zip(acc) {
                *out = a / taps as f32;
            }
        }
    }
}

/// Optics, sensor and quantisation: blur, sRGB encoding, noise, 8 bits.
fn develop(mut canvas: Canvas, cam: &Camera, rng: &mut Rng) -> Picture {
    if let Some(sigma) = cam.defocus {
        gaussian_blur(&mut canvas, sigma);
    }
    if let Some((length, angle)) = cam.motion {
        motion_blur(&mut canvas, length, angle);
    }
    let noisy = cam.read_noise > 0.0 || cam.shot_noise > 0.0;
    let read2 = cam.read_noise * cam.read_noise;
    let rgb = canvas
        .rgb
        .iter()
        .map(|&x| {
            let mut v = render::linear_to_srgb255(x);
            if noisy {
                v += (read2 + cam.shot_noise * v).sqrt() * rng.normal();
            }
            v.round().clamp(0.0, 255.0) as u8
        })
        .collect();
    Picture { width: canvas.width, height: canvas.height, rgb, jpeg_quality: cam.jpeg_quality }
}

/// A random pose of `product` centred on `(cx, cy)` before the shift.
fn random_pose(rng: &mut Rng, px_per_mm: f32) -> (f32, f32) {
    let angle = rng.range(0.0, std::f32::consts::TAU);
    let scale = px_per_mm * rng.range(0.92, 1.08);
    (angle, scale)
}

/// Renders one single-pill image: `product` with `face` up, seed `seed`.
/// `others` are the products a second, partly visible pill may be drawn from
/// (pass the products the dataset includes; empty for none).
pub fn render_sample(product: &Product, face: Face, others: &[&Product], seed: u64, opts: &SceneOptions) -> Picture {
    let mut rng = Rng::new(seed);
    let cam = Camera::sample(&mut rng, opts.clean);
    let (w, h) = (opts.width as f32, opts.height as f32);

    let (angle, ppm) = random_pose(&mut rng, opts.px_per_mm);
    let mut pose = Pose { cx: w / 2.0, cy: h / 2.0, angle, px_per_mm: ppm };
    let (hx, hy) = pose.half_extent(product.length_mm, product.width_mm);
    let margin = 3.0;
    let room_x = (w / 2.0 - hx - margin).clamp(0.0, 0.10 * w);
    let room_y = (h / 2.0 - hy - margin).clamp(0.0, 0.10 * h);
    pose.cx += rng.range(-room_x, room_x.max(f32::MIN_POSITIVE));
    pose.cy += rng.range(-room_y, room_y.max(f32::MIN_POSITIVE));
    let finish = Finish::sample(product, &mut rng);
    let main = PillSpec::new(product, face, pose, finish);

    // A second pill partly in view at an edge, never overlapping the main one.
    let mut second = None;
    if !opts.clean && !others.is_empty() && rng.chance(0.25) {
        let other = others[rng.below(others.len())];
        let other_face = if rng.chance(0.5) { Face::Front } else { Face::Back };
        let (angle, ppm) = random_pose(&mut rng, opts.px_per_mm);
        let finish = Finish::sample(other, &mut rng);
        let mut p = Pose { cx: 0.0, cy: 0.0, angle, px_per_mm: ppm };
        let (ohx, ohy) = p.half_extent(other.length_mm, other.width_mm);
        for _ in 0..6 {
            let side = rng.below(4);
            let visible = rng.range(0.2, 0.5);
            let along = rng.f32();
            (p.cx, p.cy) = match side {
                0 => (-ohx + visible * 2.0 * ohx, along * h),
                1 => (w + ohx - visible * 2.0 * ohx, along * h),
                2 => (along * w, -ohy + visible * 2.0 * ohy),
                _ => (along * w, h + ohy - visible * 2.0 * ohy),
            };
            let apart = (p.cx - pose.cx).abs() > ohx + hx + 2.0 || (p.cy - pose.cy).abs() > ohy + hy + 2.0;
            if apart {
                second = Some(PillSpec::new(other, other_face, p, finish));
                break;
            }
        }
    }

    let mut tray_rng = rng.fork(1);
    let mut pill_rng = rng.fork(2);
    let mut noise_rng = rng.fork(3);
    let mut canvas = Canvas::new(opts.width, opts.height);
    paint_tray(&mut canvas, &cam, &mut tray_rng);
    if let Some(second) = &second {
        draw_pill(&mut canvas, second, &cam, &mut pill_rng);
    }
    draw_pill(&mut canvas, &main, &cam, &mut pill_rng);
    develop(canvas, &cam, &mut noise_rng)
}

/// Renders a count-mode tray: 2–12 pills of `products` (chosen at random,
/// repeats allowed), none overlapping (touching allowed), all wholly in view.
pub fn render_tray(products: &[&Product], seed: u64, opts: &SceneOptions) -> Result<TrayScene, SceneError> {
    let mut rng = Rng::new(seed);
    let cam = Camera::sample(&mut rng, opts.clean);
    let (w, h) = (opts.width, opts.height);
    let target = 2 + rng.below(11);
    let mut occupied = vec![false; w * h];
    let mut placed: Vec<PillSpec<'_>> = Vec::with_capacity(target);
    let margin = 3.0;
    for _ in 0..target {
        for _attempt in 0..60 {
            let product = products[rng.below(products.len())];
            let face = if rng.chance(0.5) { Face::Front } else { Face::Back };
            let (angle, ppm) = random_pose(&mut rng, opts.px_per_mm);
            let finish = Finish::sample(product, &mut rng);
            let mut pose = Pose { cx: 0.0, cy: 0.0, angle, px_per_mm: ppm };
            let (hx, hy) = pose.half_extent(product.length_mm, product.width_mm);
            let (span_x, span_y) = (w as f32 - 2.0 * (hx + margin), h as f32 - 2.0 * (hy + margin));
            let (ux, uy) = (rng.f32(), rng.f32());
            if span_x <= 0.0 || span_y <= 0.0 {
                continue;
            }
            pose.cx = hx + margin + ux * span_x;
            pose.cy = hy + margin + uy * span_y;
            let spec = PillSpec::new(product, face, pose, finish);
            let mut clash = false;
            spec.for_each_inside(w, h, |x, y| clash |= occupied[y * w + x]);
            if clash {
                continue;
            }
            spec.for_each_inside(w, h, |x, y| occupied[y * w + x] = true);
            placed.push(spec);
            break;
        }
    }
    if placed.len() < 2 {
        return Err(SceneError::TrayTooSmall { width: w, height: h, px_per_mm: opts.px_per_mm });
    }
    let mut tray_rng = rng.fork(1);
    let mut pill_rng = rng.fork(2);
    let mut noise_rng = rng.fork(3);
    let mut canvas = Canvas::new(w, h);
    paint_tray(&mut canvas, &cam, &mut tray_rng);
    let mut pills = Vec::with_capacity(placed.len());
    for spec in &placed {
        draw_pill(&mut canvas, spec, &cam, &mut pill_rng);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        spec.for_each_inside(w, h, |x, y| {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        });
        pills.push(TrayPill {
            ndc: spec.product.ndc.clone(),
            face: spec.face,
            bbox: [x0 as u32, y0 as u32, (x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32],
        });
    }
    Ok(TrayScene { picture: develop(canvas, &cam, &mut noise_rng), pills })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_light_is_red_and_cool_light_is_blue() {
        let warm = white_balance_gain(3000.0, 0.5);
        let cool = white_balance_gain(6500.0, 0.5);
        assert!(warm[0] > 1.1 && warm[2] < 0.9, "{warm:?}");
        assert!(cool[0] < 1.0 && cool[2] > 1.0, "{cool:?}");
        let neutral = white_balance_gain(5500.0, 0.5);
        assert!(neutral.iter().all(|g| (g - 1.0).abs() < 0.02), "{neutral:?}");
    }

    #[test]
    fn flat_surfaces_read_their_albedo_times_exposure() {
        let l = lighting(1.0, 50f32.to_radians(), 0.3, 0.9, [1.0; 3]);
        assert!((l.flat() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn crop_scale_follows_the_short_side() {
        assert_eq!(SceneOptions::crop(224, 224).px_per_mm, 9.0);
        assert_eq!(SceneOptions::crop(448, 112).px_per_mm, 4.5);
    }
}
