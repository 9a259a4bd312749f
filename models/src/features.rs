//! The drift features: the one definition of the image statistics the fleet
//! watches. The trainer computes its reference profile by calling
//! `rxvision-synth features`, never by re-implementing these.
//!
//! All features are computed on the decoded 8-bit RGB image as stored (no
//! resizing). `grey` is Pillow's `convert("L")`, bit for bit:
//! `grey = (19595·R + 38470·G + 7471·B + 32768) >> 16` (ITU-R 601 luma).
//!
//! | feature | definition |
//! |---|---|
//! | `mean_r`, `mean_g`, `mean_b` | mean of each channel over all pixels, 0–255 |
//! | `brightness` | mean of `grey`, 0–255 |
//! | `blur` | population variance of the 4-neighbour Laplacian of `grey` (`g[y−1,x] + g[y+1,x] + g[y,x−1] + g[y,x+1] − 4·g[y,x]`) over the interior pixels (the one-pixel frame is left out); **low means blurry**. numpy: `lap[1:-1,1:-1].var()` with `lap = cv2.Laplacian(g.astype(float), cv2.CV_64F, ksize=1)`. 0 for images under 3 px on a side |
//! | `contrast` | population standard deviation of `grey` (texture contrast) |
//! | `entropy` | Shannon entropy in bits of the 256-bin histogram of `grey`: `−Σ p·log₂ p` over non-empty bins (0 for a flat image, 8 at most) |
//! | `aspect_ratio` | elongation of the pill's foreground mask: `√(λ₁/λ₂)`, the ratio of the principal axes of the mask's second central moments (an ellipse of axes a ≥ b gives a/b; a square or disc gives 1). 0 when no foreground was found |
//!
//! The foreground mask, step by step:
//!
//! 1. **tray colour** `t`: the per-channel median of the border frame, the
//!    outermost `max(1, min(W, H) / 32)` pixels on each side;
//! 2. for each pixel `p` (RGB, 0–255): `k = p·t / t·t` (its brightness
//!    relative to the tray, along the tray's own colour) and the chroma
//!    residual `r = |p − k·t|`. Shadows only darken the tray (`k < 1`, `r`
//!    small) and so stay background;
//! 3. `r_hi = med(r) + max(12, 4·σ(r))` over the frame, where `med` is the
//!    median (here and in step 1: the element at index `round((n − 1)/2)` of
//!    the sorted values) and `σ = 1.4826 · med(|x − med|)` (the MAD scaled to a
//!    standard deviation: robust to a second pill covering part of the frame);
//! 4. the tray's illumination: a least-squares fit of
//!    `k ≈ c₀ + c₁·X + c₂·Y + c₃·(X² + Y²)`, with `X = (x + ½)/W − ½` and
//!    `Y = (y + ½)/H − ½` (a gradient plus vignetting), over the frame pixels
//!    with `r ≤ r_hi`; refitted once without the pixels whose residual
//!    exceeds `max(0.02, 3·σ)`. The excess is `e = k − k̂(X, Y)` and
//!    `e_hi = med(e) + max(0.06, 4·σ(e))` over the refit's pixels. A pixel is
//!    foreground when `e > e_hi` or `r > r_hi`;
//! 5. morphological closing with a 3×3 square (dilate, then erode) to join
//!    the pieces of an outline (a white pill on a white tray shows mostly its
//!    rim and imprint);
//! 6. 4-connected components; keep the largest component that does not touch
//!    the image border (a second pill cut by the edge touches it), or the
//!    largest of all when every component touches it; fewer than 16 pixels
//!    means no foreground;
//! 7. fill the component's holes (background not 4-connected to the image
//!    border) and take its moments.

use std::path::{Path, PathBuf};

use crate::preprocess::{decode, RgbImage};

/// CSV header of `rxvision-synth features`.
pub const CSV_HEADER: &str = "file,aspect_ratio,mean_r,mean_g,mean_b,brightness,blur,contrast,entropy";

/// Why features could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The list of images could not be made.
    #[error("{0}")]
    List(String),
    /// A file is not a decodable JPEG or PNG.
    #[error("cannot decode {path}: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        source: crate::preprocess::PreprocessError,
    },
}

/// The drift features of one image (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftFeatures {
    /// Principal-axis ratio of the foreground mask (≥ 1), 0 without one.
    pub aspect_ratio: f64,
    /// Mean red, 0–255.
    pub mean_r: f64,
    /// Mean green, 0–255.
    pub mean_g: f64,
    /// Mean blue, 0–255.
    pub mean_b: f64,
    /// Mean grey, 0–255.
    pub brightness: f64,
    /// Variance of the Laplacian of grey (sharpness; low = blurry).
    pub blur: f64,
    /// Standard deviation of grey.
    pub contrast: f64,
    /// Entropy of the grey histogram, bits.
    pub entropy: f64,
}

impl DriftFeatures {
    /// One CSV row after `file` (which the caller quotes if needed).
    pub fn csv_fields(&self) -> String {
        format!(
            "{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}",
            self.aspect_ratio,
            self.mean_r,
            self.mean_g,
            self.mean_b,
            self.brightness,
            self.blur,
            self.contrast,
            self.entropy
        )
    }
}

/// Reads, decodes and measures one image file.
pub fn compute_file(path: &Path) -> Result<DriftFeatures, FeatureError> {
    let bytes = std::fs::read(path).map_err(|source| FeatureError::Read { path: path.to_owned(), source })?;
    let image = decode(&bytes).map_err(|source| FeatureError::Decode { path: path.to_owned(), source })?;
    Ok(compute(&image))
}

/// The images `rxvision-synth features DIR` measures, as paths relative to
/// `dir`: the `file` column of `DIR/labels.csv` when there is one, else every
/// `.jpg`, `.jpeg` and `.png` directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<String>, FeatureError> {
    let labels = dir.join("labels.csv");
    if labels.is_file() {
        return crate::labels::read_files(&labels).map_err(FeatureError::List);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| FeatureError::Read { path: dir.to_owned(), source })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| FeatureError::Read { path: dir.to_owned(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) && entry.path().is_file() {
            files.push(name);
        }
    }
    files.sort();
    Ok(files)
}

/// Features of every image [`list_images`] finds, in its order, on
/// `threads` threads; the first unreadable image is the error.
pub fn compute_dir(dir: &Path, threads: usize) -> Result<Vec<(String, DriftFeatures)>, FeatureError> {
    let files = list_images(dir)?;
    crate::par::par_map(&files, threads, |f| compute_file(&dir.join(f)).map(|x| (f.clone(), x))).into_iter().collect()
}

/// Pillow's `convert("L")`.
pub fn grey(image: &RgbImage) -> Vec<u8> {
    image
        .data
        .chunks_exact(3)
        .map(|p| ((19595 * u32::from(p[0]) + 38470 * u32::from(p[1]) + 7471 * u32::from(p[2]) + 0x8000) >> 16) as u8)
        .collect()
}

/// The drift features of a decoded image.
pub fn compute(image: &RgbImage) -> DriftFeatures {
    let (w, h) = (image.width as usize, image.height as usize);
    let n = (w * h) as f64;
    let mut sums = [0u64; 3];
    for p in image.data.chunks_exact(3) {
        for c in 0..3 {
            sums[c] += u64::from(p[c]);
        }
    }
    let g = grey(image);
    let mut hist = [0u64; 256];
    for &v in &g {
        hist[v as usize] += 1;
    }
    let mean = g.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = g.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    let entropy = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum::<f64>();
    DriftFeatures {
        aspect_ratio: aspect_ratio(image),
        mean_r: sums[0] as f64 / n,
        mean_g: sums[1] as f64 / n,
        mean_b: sums[2] as f64 / n,
        brightness: mean,
        blur: laplacian_variance(&g, w, h),
        contrast: var.sqrt(),
        // A flat image sums to −0.0, which would print as "-0.000000".
        entropy: if entropy > 0.0 { entropy } else { 0.0 },
    }
}

fn laplacian_variance(g: &[u8], w: usize, h: usize) -> f64 {
    if w < 3 || h < 3 {
        return 0.0;
    }
    let (mut sum, mut sum2) = (0.0f64, 0.0f64);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let i = y * w + x;
            let l = i32::from(g[i - w]) + i32::from(g[i + w]) + i32::from(g[i - 1]) + i32::from(g[i + 1])
                - 4 * i32::from(g[i]);
            let l = f64::from(l);
            sum += l;
            sum2 += l * l;
        }
    }
    let n = ((w - 2) * (h - 2)) as f64;
    let mean = sum / n;
    (sum2 / n - mean * mean).max(0.0)
}

fn percentile(values: &mut [f32], q: f32) -> f32 {
    values.sort_by(f32::total_cmp);
    values[((values.len() - 1) as f32 * q).round() as usize]
}

/// The foreground mask of steps 1–4 of the module documentation.
pub fn foreground_mask(image: &RgbImage) -> Vec<bool> {
    let (w, h) = (image.width as usize, image.height as usize);
    let frame = (w.min(h) / 32).max(1);
    let on_frame = |x: usize, y: usize| x < frame || y < frame || x >= w - frame || y >= h - frame;
    let px = |i: usize| [0, 1, 2].map(|c| f32::from(image.data[3 * i + c]));
    let mut channels: [Vec<f32>; 3] = Default::default();
    for y in 0..h {
        for x in 0..w {
            if on_frame(x, y) {
                let p = px(y * w + x);
                for c in 0..3 {
                    channels[c].push(p[c]);
                }
            }
        }
    }
    let tray = [0, 1, 2].map(|c| percentile(&mut channels[c], 0.5));
    let tt = (tray[0] * tray[0] + tray[1] * tray[1] + tray[2] * tray[2]).max(1.0);
    let measure = |p: [f32; 3]| {
        let k = (p[0] * tray[0] + p[1] * tray[1] + p[2] * tray[2]) / tt;
        let r = ((p[0] - k * tray[0]).powi(2) + (p[1] - k * tray[1]).powi(2) + (p[2] - k * tray[2]).powi(2)).sqrt();
        (k, r)
    };
    let frame_px: Vec<(usize, usize, f32, f32)> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| on_frame(x, y))
        .map(|(x, y)| {
            let (k, r) = measure(px(y * w + x));
            (x, y, k, r)
        })
        .collect();
    let (r_med, r_sigma) = robust(frame_px.iter().map(|p| p.3).collect());
    let r_hi = r_med + (4.0 * r_sigma).max(12.0);
    let basis = |x: usize, y: usize| {
        let (fx, fy) = ((x as f64 + 0.5) / w as f64 - 0.5, (y as f64 + 0.5) / h as f64 - 0.5);
        [1.0, fx, fy, fx * fx + fy * fy]
    };
    let fit_of = |c: &[f64; 4], x: usize, y: usize| {
        let b = basis(x, y);
        (c[0] * b[0] + c[1] * b[1] + c[2] * b[2] + c[3] * b[3]) as f32
    };
    let least_squares = |pts: &[&(usize, usize, f32, f32)]| {
        let mut ata = [[0.0f64; 4]; 4];
        let mut atb = [0.0f64; 4];
        for &&(x, y, k, _) in pts {
            let b = basis(x, y);
            for i in 0..4 {
                atb[i] += b[i] * f64::from(k);
                for j in 0..4 {
                    ata[i][j] += b[i] * b[j];
                }
            }
        }
        solve4(ata, atb)
    };
    let mut inliers: Vec<&(usize, usize, f32, f32)> = frame_px.iter().filter(|p| p.3 <= r_hi).collect();
    if inliers.is_empty() {
        inliers = frame_px.iter().collect();
    }
    let c = least_squares(&inliers);
    let (_, sigma) = robust(inliers.iter().map(|&&(x, y, k, _)| k - fit_of(&c, x, y)).collect());
    let cut = (3.0 * sigma).max(0.02);
    let refit: Vec<_> = inliers.iter().copied().filter(|&&(x, y, k, _)| (k - fit_of(&c, x, y)).abs() <= cut).collect();
    let c = if refit.len() >= 8 { least_squares(&refit) } else { c };
    let used = if refit.len() >= 8 { &refit } else { &inliers };
    let (e_med, e_sigma) = robust(used.iter().map(|&&(x, y, k, _)| k - fit_of(&c, x, y)).collect());
    let e_hi = e_med + (4.0 * e_sigma).max(0.06);
    (0..w * h)
        .map(|i| {
            let (k, r) = measure(px(i));
            k - fit_of(&c, i % w, i / w) > e_hi || r > r_hi
        })
        .collect()
}

/// Median and MAD-based standard deviation (`1.4826 · median |x − median|`).
fn robust(mut values: Vec<f32>) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let med = percentile(&mut values, 0.5);
    let mut dev: Vec<f32> = values.iter().map(|v| (v - med).abs()).collect();
    (med, 1.4826 * percentile(&mut dev, 0.5))
}

/// Solves the 4×4 system `a·x = b`; a singular system (a one-pixel frame)
/// falls back to the mean.
fn solve4(a: [[f64; 4]; 4], b: [f64; 4]) -> [f64; 4] {
    let n0 = a[0][0].max(1.0);
    solve_linear(a, b, 1e-9 * n0).unwrap_or([b[0] / n0, 0.0, 0.0, 0.0])
}

/// Solves the N×N system `a·x = b` by Gaussian elimination with partial
/// pivoting; `None` when a pivot falls below `tolerance` (singular).
/// The drift features' and the localiser's tray fits share it.
#[allow(clippy::needless_range_loop)] // textbook index form
pub fn solve_linear<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N], tolerance: f64) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < tolerance {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..N {
            let f = a[row][col] / a[col][col];
            for k in col..N {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0f64; N];
    for row in (0..N).rev() {
        let s: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

/// Dilate (`grow = true`) or erode with a 3×3 square; outside counts as
/// background for dilation and as foreground for erosion (so closing does not
/// eat into objects at the border).
fn morph(mask: &[bool], w: usize, h: usize, grow: bool) -> Vec<bool> {
    let mut out = vec![false; mask.len()];
    for y in 0..h {
        for x in 0..w {
            let mut any = false;
            let mut all = true;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                    let v = if xx < 0 || yy < 0 || xx >= w as i64 || yy >= h as i64 {
                        !grow
                    } else {
                        mask[yy as usize * w + xx as usize]
                    };
                    any |= v;
                    all &= v;
                }
            }
            out[y * w + x] = if grow { any } else { all };
        }
    }
    out
}

/// Labels 4-connected components of `mask`; returns per-pixel labels (0 =
/// background) and, per label, `(size, touches_border)`.
fn components(mask: &[bool], w: usize, h: usize) -> (Vec<u32>, Vec<(usize, bool)>) {
    let mut labels = vec![0u32; mask.len()];
    let mut info = vec![(0usize, false)];
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        let label = info.len() as u32;
        let (mut size, mut border) = (0usize, false);
        labels[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
            let mut visit = |j: usize| {
                if mask[j] && labels[j] == 0 {
                    labels[j] = label;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        info.push((size, border));
    }
    (labels, info)
}

/// The pill's mask after steps 5–7 (closing, component choice, hole filling);
/// `None` without foreground.
pub fn pill_mask(image: &RgbImage) -> Option<Vec<bool>> {
    let (w, h) = (image.width as usize, image.height as usize);
    if w < 3 || h < 3 {
        return None;
    }
    let mask = foreground_mask(image);
    let closed = morph(&morph(&mask, w, h, true), w, h, false);
    let (labels, info) = components(&closed, w, h);
    let pick = |inner_only: bool| {
        (1..info.len())
            .filter(|&l| !inner_only || !info[l].1)
            .max_by_key(|&l| (info[l].0, std::cmp::Reverse(l)))
            .filter(|&l| info[l].0 >= 16)
    };
    let label = pick(true).or_else(|| pick(false))? as u32;
    let object: Vec<bool> = labels.iter().map(|&l| l == label).collect();
    // Holes: background pixels not connected to the border through background.
    let background: Vec<bool> = object.iter().map(|&o| !o).collect();
    let (bl, binfo) = components(&background, w, h);
    Some(object.iter().zip(&bl).map(|(&o, &b)| o || (b != 0 && !binfo[b as usize].1)).collect())
}

/// `√(λ₁/λ₂)` of the pill mask's second central moments; 0 without a mask.
pub fn aspect_ratio(image: &RgbImage) -> f64 {
    let Some(mask) = pill_mask(image) else { return 0.0 };
    let w = image.width as usize;
    let (mut n, mut sx, mut sy) = (0.0f64, 0.0f64, 0.0f64);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        n += 1.0;
        sx += (i % w) as f64;
        sy += (i / w) as f64;
    }
    let (mx, my) = (sx / n, sy / n);
    let (mut cxx, mut cyy, mut cxy) = (0.0f64, 0.0f64, 0.0f64);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (dx, dy) = ((i % w) as f64 - mx, (i / w) as f64 - my);
        cxx += dx * dx;
        cyy += dy * dy;
        cxy += dx * dy;
    }
    let (cxx, cyy, cxy) = (cxx / n, cyy / n, cxy / n);
    let tr = cxx + cyy;
    let disc = ((cxx - cyy).powi(2) / 4.0 + cxy * cxy).sqrt();
    let (l1, l2) = (tr / 2.0 + disc, tr / 2.0 - disc);
    if l2 <= 1e-9 {
        return 0.0;
    }
    (l1 / l2).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
        RgbImage::from_raw(w, h, c.repeat((w * h) as usize)).unwrap()
    }

    #[test]
    fn grey_is_pillows_l() {
        // Pillow: Image.new("RGB", (1, 1), (10, 200, 30)).convert("L").getpixel((0, 0)) == 124
        let img = RgbImage::from_raw(1, 1, vec![10, 200, 30]).unwrap();
        assert_eq!(grey(&img), vec![124]);
    }

    #[test]
    fn a_flat_image_has_no_texture_and_no_pill() {
        let f = compute(&flat(64, 48, [120, 130, 140]));
        assert_eq!((f.entropy, f.blur, f.contrast, f.aspect_ratio), (0.0, 0.0, 0.0, 0.0));
        assert_eq!((f.mean_r, f.mean_g, f.mean_b), (120.0, 130.0, 140.0));
    }

    #[test]
    fn two_level_image_has_one_bit_of_entropy() {
        let mut img = flat(10, 10, [0, 0, 0]);
        img.data[..150].fill(255);
        let f = compute(&img);
        assert!((f.entropy - 1.0).abs() < 1e-12);
        assert!((f.contrast - 127.5).abs() < 1e-9);
    }

    #[test]
    fn vignetting_is_not_foreground() {
        // A tray 20 % darker in the corners than in the centre, nothing on it.
        let (w, h) = (96usize, 80usize);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = ((x as f32 + 0.5) / w as f32 - 0.5, (y as f32 + 0.5) / h as f32 - 0.5);
                let k = 1.0 - 0.4 * (fx * fx + fy * fy);
                data.extend([220.0 * k, 215.0 * k, 200.0 * k].map(|v| v.round() as u8));
            }
        }
        let img = RgbImage::from_raw(w as u32, h as u32, data).unwrap();
        assert_eq!(foreground_mask(&img).iter().filter(|&&m| m).count(), 0);
        assert_eq!(aspect_ratio(&img), 0.0);
    }

    #[test]
    fn solve4_solves() {
        let a = [[4.0, 1.0, 0.0, 0.0], [1.0, 3.0, 1.0, 0.0], [0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 1.0, 5.0]];
        let x = [1.0, -2.0, 0.5, 3.0];
        let b = [0, 1, 2, 3].map(|i| (0..4).map(|j| a[i][j] * x[j]).sum::<f64>());
        let got = solve4(a, b);
        assert!(got.iter().zip(&x).all(|(g, e)| (g - e).abs() < 1e-9), "{got:?}");
    }

    #[test]
    fn a_dark_shadow_is_not_foreground() {
        let mut img = flat(64, 64, [200, 200, 200]);
        for y in 20..40 {
            for x in 10..50 {
                let i = (y * 64 + x) * 3;
                img.data[i..i + 3].copy_from_slice(&[120, 120, 120]);
            }
        }
        assert!(foreground_mask(&img).iter().all(|&m| !m));
    }
}
