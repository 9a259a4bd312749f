//! The synthetic pill renderer and what rests on its images: determinism,
//! coverage of the formulary, look-alikes, trays, the drift features
//! (`rxvision_models::features`) and pill crops (`rxvision_counter`) of
//! rendered images, twin faces, and the binary end to end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rxvision_models::features::{self, compute, foreground_mask, CSV_HEADER};
use rxvision_models::formulary::{Face, Formulary, Product, Shape};
use rxvision_models::labels;
use rxvision_models::preprocess::{decode, RgbImage};
use rxvision_synth::scene::{render_sample, render_tray, SceneOptions};

fn formulary_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../formulary/formulary.json")
}

fn formulary() -> Formulary {
    Formulary::load(&formulary_path()).expect("the committed formulary loads")
}

fn synth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rxvision-synth")).args(args).output().expect("rxvision-synth runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn clean(width: usize, height: usize) -> SceneOptions {
    SceneOptions { clean: true, ..SceneOptions::crop(width, height) }
}

/// Pixels whose largest channel difference exceeds `threshold`.
fn differing_pixels(a: &[u8], b: &[u8], threshold: u8) -> usize {
    a.chunks_exact(3).zip(b.chunks_exact(3)).filter(|(p, q)| (0..3).any(|c| p[c].abs_diff(q[c]) > threshold)).count()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let f = formulary();
    let others: Vec<&Product> = f.products.iter().collect();
    let opts = SceneOptions::crop(224, 224);
    for p in [&f.products[0], &f.products[40], f.products.last().unwrap()] {
        let a = render_sample(p, Face::Front, &others, 7, &opts).to_jpeg().unwrap();
        let b = render_sample(p, Face::Front, &others, 7, &opts).to_jpeg().unwrap();
        let c = render_sample(p, Face::Front, &others, 8, &opts).to_jpeg().unwrap();
        assert_eq!(a, b, "{}: same seed, different bytes", p.ndc);
        assert_ne!(a, c, "{}: different seeds, same bytes", p.ndc);
        assert_eq!(&a[..2], &[0xFF, 0xD8], "JPEG magic");
    }
}

#[test]
fn every_product_renders_both_faces_at_two_sizes() {
    let f = formulary();
    for (w, h) in [(224, 224), (96, 64)] {
        let opts = clean(w, h);
        for p in &f.products {
            for face in [Face::Front, Face::Back] {
                let pic = render_sample(p, face, &[], 3, &opts);
                assert_eq!((pic.width, pic.height, pic.rgb.len()), (w, h, w * h * 3));
                // The pill is there: the centre pixel differs from the tray
                // (the corner), and the image decodes back.
                let img = RgbImage::from_raw(w as u32, h as u32, pic.rgb.clone()).unwrap();
                let mask = foreground_mask(&img);
                let fg = mask.iter().filter(|&&m| m).count();
                assert!(fg > (w * h) / 100, "{} {face} at {w}x{h}: only {fg} foreground pixels", p.ndc);
                decode(&pic.to_jpeg().unwrap()).unwrap();
            }
        }
    }
}

#[test]
fn pills_keep_their_relative_size() {
    // Same seed, same pose draws: the 10 mg amlodipine (9.5 mm) covers more
    // pixels than the 5 mg (7.9 mm), by about the ratio of their areas.
    let f = formulary();
    let area = |ndc: &str| {
        let p = f.products.iter().find(|p| p.name.starts_with("Amlodipine") && p.strength == ndc).unwrap();
        let pic = render_sample(p, Face::Back, &[], 11, &SceneOptions { clean: true, ..SceneOptions::crop(224, 224) });
        let img = RgbImage::from_raw(224, 224, pic.rgb).unwrap();
        features::pill_mask(&img).unwrap().iter().filter(|&&m| m).count() as f64
    };
    let ratio = area("10 mg") / area("5 mg");
    let expected = (9.5f64 / 7.9).powi(2);
    assert!((ratio / expected - 1.0).abs() < 0.12, "area ratio {ratio:.3}, expected {expected:.3}");
}

#[test]
fn lookalike_pairs_differ_in_pixels() {
    let f = formulary();
    let mut groups: BTreeMap<&str, Vec<&Product>> = BTreeMap::new();
    for p in &f.products {
        if let Some(g) = &p.lookalike_group {
            groups.entry(g).or_default().push(p);
        }
    }
    assert!(groups.len() >= 10);
    let opts = clean(224, 224);
    for (group, members) in &groups {
        for face in [Face::Front, Face::Back] {
            let pics: Vec<_> = members.iter().map(|p| render_sample(p, face, &[], 5, &opts).rgb).collect();
            for i in 0..members.len() {
                for j in i + 1..members.len() {
                    let (a, b) = (members[i], members[j]);
                    if a.imprint(face) == b.imprint(face)
                        && a.length_mm == b.length_mm
                        && a.scored_on(face) == b.scored_on(face)
                        && a.color_rgb == b.color_rgb
                    {
                        // Indistinguishable from this side (e.g. two blank backs of one size).
                        continue;
                    }
                    let n = differing_pixels(&pics[i], &pics[j], 16);
                    assert!(n >= 20, "{group} {face}: {} vs {} differ in only {n} pixels", a.ndc, b.ndc);
                }
            }
        }
    }
}

#[test]
fn hydrocodone_strengths_differ_only_by_their_imprint_yet_differ() {
    let f = formulary();
    let pics: Vec<Vec<u8>> = ["M365", "M366", "M367"]
        .iter()
        .map(|imprint| {
            let p = f.products.iter().find(|p| p.imprint_front == *imprint).unwrap();
            render_sample(p, Face::Front, &[], 21, &clean(224, 224)).rgb
        })
        .collect();
    assert!(differing_pixels(&pics[0], &pics[1], 16) >= 20);
    assert!(differing_pixels(&pics[1], &pics[2], 16) >= 20);
    // …and only there: everything but the last digit is the same picture.
    assert!(differing_pixels(&pics[0], &pics[1], 16) < 224 * 224 / 50);
}

fn boxes_hold_the_foreground(scene_seed: u64, clean: bool) {
    let f = formulary();
    let products: Vec<&Product> = f.products.iter().collect();
    let opts = SceneOptions { clean, ..SceneOptions::tray(480, 360) };
    let scene = render_tray(&products, scene_seed, &opts).unwrap();
    let n = scene.pills.len();
    assert!((2..=12).contains(&n), "{n} pills");
    let img = decode(&scene.picture.to_jpeg().unwrap()).unwrap();
    let mask = foreground_mask(&img);
    let (w, h) = (img.width as usize, img.height as usize);
    let inside = |x: usize, y: usize, b: &[u32; 4], pad: usize| {
        let [bx, by, bw, bh] = b.map(|v| v as usize);
        x + pad >= bx && x < bx + bw + pad && y + pad >= by && y < by + bh + pad
    };
    let mut outside = 0usize;
    let mut total = 0usize;
    let mut per_box = vec![0usize; n];
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            total += 1;
            if !scene.pills.iter().any(|p| inside(x, y, &p.bbox, 3)) {
                outside += 1;
            }
            for (k, p) in scene.pills.iter().enumerate() {
                if inside(x, y, &p.bbox, 0) {
                    per_box[k] += 1;
                }
            }
        }
    }
    let limit = if clean { 0.005 } else { 0.03 };
    assert!(
        (outside as f64) <= limit * total as f64,
        "seed {scene_seed}: {outside} of {total} foreground pixels lie outside every box"
    );
    for (k, p) in scene.pills.iter().enumerate() {
        let [_, _, bw, bh] = p.bbox;
        assert!(bw >= 20 && bh >= 20, "seed {scene_seed}: box {:?} too small for a pill", p.bbox);
        let area = (bw * bh) as usize;
        assert!(
            per_box[k] * 50 >= area,
            "seed {scene_seed}: box {:?} ({}) holds {} foreground pixels",
            p.bbox,
            p.ndc,
            per_box[k]
        );
        assert!(p.bbox[0] + bw <= w as u32 && p.bbox[1] + bh <= h as u32);
    }
}

#[test]
fn tray_boxes_contain_the_pills() {
    for seed in 0..4 {
        boxes_hold_the_foreground(seed, true);
    }
    for seed in 10..14 {
        boxes_hold_the_foreground(seed, false);
    }
}

#[test]
fn a_tray_too_small_for_two_pills_is_an_error() {
    let f = formulary();
    let products: Vec<&Product> = f.products.iter().collect();
    assert!(render_tray(&products, 1, &SceneOptions::tray(40, 40)).is_err());
}

fn write_png(path: &Path, img: &RgbImage) {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
        .unwrap();
    std::fs::write(path, out).unwrap();
}

/// A `w × h` image of `bg` with a filled ellipse of semi-axes `a`, `b`
/// rotated by `angle`.
fn ellipse(w: u32, h: u32, a: f64, b: f64, angle: f64, bg: [u8; 3], fg: [u8; 3]) -> RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    let (s, c) = angle.sin_cos();
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f64 + 0.5 - w as f64 / 2.0, y as f64 + 0.5 - h as f64 / 2.0);
            let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
            data.extend_from_slice(if (u / a).powi(2) + (v / b).powi(2) <= 1.0 { &fg } else { &bg });
        }
    }
    RgbImage::from_raw(w, h, data).unwrap()
}

#[test]
fn features_of_known_images() {
    let flat = RgbImage::from_raw(64, 64, [128u8, 128, 128].repeat(64 * 64)).unwrap();
    let f = compute(&flat);
    assert_eq!((f.entropy, f.blur, f.contrast, f.brightness), (0.0, 0.0, 0.0, 128.0));
    assert_eq!(f.aspect_ratio, 0.0, "no pill on a flat image");

    for (a, b, angle) in [(60.0, 30.0, 0.0), (50.0, 20.0, 0.7), (40.0, 40.0, 0.0)] {
        let img = ellipse(224, 224, a, b, angle, [60, 90, 170], [240, 238, 230]);
        let f = compute(&img);
        let expected = a / b;
        assert!((f.aspect_ratio / expected - 1.0).abs() < 0.05, "{a}x{b}: {} vs {expected}", f.aspect_ratio);
        assert!(f.blur > 0.0 && f.contrast > 0.0);
        // Two grey levels: entropy is the binary entropy of the ellipse's share.
        let p = std::f64::consts::PI * a * b / (224.0 * 224.0);
        let h2 = -(p * p.log2() + (1.0 - p) * (1.0 - p).log2());
        assert!((f.entropy - h2).abs() < 0.01, "entropy {} vs {h2}", f.entropy);
    }

    // A blurred image has a lower Laplacian variance than a sharp one.
    let sharp = ellipse(128, 128, 40.0, 25.0, 0.3, [60, 90, 170], [240, 238, 230]);
    let mut soft = sharp.clone();
    for y in 1..127usize {
        for x in 1..127usize {
            for ch in 0..3 {
                let at = |xx: usize, yy: usize| u32::from(sharp.data[(yy * 128 + xx) * 3 + ch]);
                let s: u32 =
                    (0..3).flat_map(|j| (0..3).map(move |i| (i, j))).map(|(i, j)| at(x + i - 1, y + j - 1)).sum();
                soft.data[(y * 128 + x) * 3 + ch] = (s / 9) as u8;
            }
        }
    }
    assert!(compute(&soft).blur < 0.5 * compute(&sharp).blur);
}

fn parse_features(csv: &str) -> Vec<(String, HashMap<String, f64>)> {
    let records = labels::parse(csv).unwrap();
    let header = &records[0];
    assert_eq!(header.join(","), CSV_HEADER);
    records[1..]
        .iter()
        .map(|r| {
            let values = header[1..].iter().cloned().zip(r[1..].iter().map(|v| v.parse::<f64>().unwrap())).collect();
            (r[0].clone(), values)
        })
        .collect()
}

#[test]
fn features_command_on_a_folder_of_images() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a_flat.png"), &RgbImage::from_raw(32, 32, [128u8, 128, 128].repeat(32 * 32)).unwrap());
    write_png(&dir.path().join("b_ellipse.png"), &ellipse(200, 160, 70.0, 35.0, 0.4, [200, 200, 200], [40, 120, 60]));
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let out = synth(&["features", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = parse_features(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["a_flat.png", "b_ellipse.png"]);
    assert_eq!(rows[0].1["entropy"], 0.0);
    assert_eq!(rows[0].1["blur"], 0.0);
    assert!((rows[1].1["aspect_ratio"] - 2.0).abs() < 0.1);

    // An unreadable image fails the command and prints no CSV.
    std::fs::write(dir.path().join("c_broken.jpg"), b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    let out = synth(&["features", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("c_broken.jpg"), "{}", stderr(&out));
}

fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for sub in ["", "images"] {
        let Ok(entries) = std::fs::read_dir(root.join(sub)) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() {
                files.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

#[test]
fn dataset_end_to_end_with_exclusions_and_features() {
    let f = formulary();
    // Three products (a yellow round, a white oval, a two-tone capsule) by excluding the rest.
    let keep = ["00093-0832-01", "59762-3719-01", "00093-3145-01"];
    assert!(keep.iter().all(|n| f.get(n).is_some()));
    let exclude: Vec<&str> = f.products.iter().map(|p| p.ndc.as_str()).filter(|n| !keep.contains(n)).collect();
    let exclude = exclude.join(",");
    let formulary = formulary_path();
    let run = |out: &Path, threads: &str| {
        synth(&[
            "dataset",
            "--out",
            out.to_str().unwrap(),
            "--per-class",
            "3",
            "--seed",
            "99",
            "--size",
            "160x128",
            "--exclude",
            &exclude,
            "--formulary",
            formulary.to_str().unwrap(),
            "--threads",
            threads,
            "--impostors",
            "2",
        ])
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let out = run(a.path(), "1");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(b.path(), "3");
    assert!(out.status.success(), "{}", stderr(&out));
    let (ta, tb) = (read_tree(a.path()), read_tree(b.path()));
    assert_eq!(ta, tb, "outputs depend on the thread count");

    let csv = String::from_utf8(ta["labels.csv"].clone()).unwrap();
    let records = labels::parse(&csv).unwrap();
    assert_eq!(records[0].join(","), labels::HEADER);
    let rows = &records[1..];
    assert_eq!(rows.len(), keep.len() * (3 + 2), "3 images of each product and 2 of its impostors");
    for r in rows {
        let imitates = r[7].as_str();
        let shown = if r[2] == "front" { Face::Front } else { Face::Back };
        if imitates.is_empty() {
            assert!(keep.contains(&r[1].as_str()), "excluded product {} rendered", r[1]);
            assert_eq!(r[8], f.get(&r[1]).unwrap().imprint(shown), "the imprint column is the face's imprint");
        } else {
            assert!(keep.contains(&imitates), "impostor of an excluded product {imitates}");
            assert_eq!(r[1], rxvision_synth::impostor::impostor_ndc(f.get(imitates).unwrap()));
            assert_eq!(r[5], f.get(imitates).unwrap().lookalike_group.clone().unwrap_or_default());
            assert!(r[3].ends_with("(altered imprint)"), "{}", r[3]);
            // Only a face with an imprint is shown: the capsule and the round print on one face only.
            let original = f.get(imitates).unwrap().imprint(shown);
            assert!(!original.is_empty(), "{r:?}");
            // The imprint column is the altered imprint: one character differs, and the length is kept.
            let differ = original.chars().zip(r[8].chars()).filter(|(a, b)| a != b).count();
            assert_eq!((differ, r[8].chars().count()), (1, original.chars().count()), "{original} -> {}", r[8]);
        }
        assert!(ta.contains_key(&r[0]), "{} listed but not written", r[0]);
        assert!(["front", "back"].contains(&r[2].as_str()));
        let img = decode(&ta[&r[0]]).unwrap();
        assert_eq!((img.width, img.height), (160, 128));
    }
    assert_eq!(ta.keys().filter(|k| k.starts_with("images/")).count(), rows.len());

    // Features of the dataset: one row per label, in order.
    let out = synth(&["features", a.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let feats = parse_features(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        feats.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>()
    );
    for (file, v) in &feats {
        assert!(v["aspect_ratio"] >= 1.0 && v["aspect_ratio"] < 5.0, "{file}: {v:?}");
        assert!(v["entropy"] > 2.0 && v["entropy"] <= 8.0, "{file}: {v:?}");
        assert!(v["blur"] > 0.0 && v["contrast"] > 0.0, "{file}: {v:?}");
    }
}

#[test]
fn pill_crops_are_what_the_counter_shows_the_model() {
    use rxvision_counter::localise::{localise, LocaliseOptions};
    use rxvision_models::bundle::PillCrop;
    use rxvision_synth::dataset::pill_crop;
    let f = formulary();
    let product = f.get("59762-3719-01").unwrap();
    // A clean frame: the crop is the localiser's square box around the pill.
    let frame =
        render_sample(product, Face::Front, &[], 7, &SceneOptions { clean: true, ..SceneOptions::camera(640, 480) });
    let jpeg = frame.to_jpeg().unwrap();
    let decoded = decode(&jpeg).unwrap();
    let found = localise(&decoded, LocaliseOptions::default());
    assert_eq!(found.pills.len(), 1);
    let crop = decode(&pill_crop(&jpeg, PillCrop::Square, None).unwrap().expect("a clean pill is cropped")).unwrap();
    assert_eq!((crop.width, crop.height), (found.pills[0].w, found.pills[0].h));
    // Upright: the oval's long axis is turned horizontal, whatever its angle in the frame.
    let upright = decode(&pill_crop(&jpeg, PillCrop::Upright, None).unwrap().unwrap()).unwrap();
    assert_ne!(found.pills[0].angle_deg, 0.0, "an oval has a long axis");
    let up = localise(&upright, LocaliseOptions { min_area_fraction: 0.02, ..LocaliseOptions::default() });
    assert_eq!(up.pills.len(), 1, "{up:?}");
    assert!(up.pills[0].angle_deg.abs() < 4.0, "upright crop at {}°", up.pills[0].angle_deg);
    // A tighter margin (the bundle's input.crop_margin) cuts closer: side (1 + 2·margin) × the pill's length.
    let tight = decode(&pill_crop(&jpeg, PillCrop::Upright, Some(0.1)).unwrap().unwrap()).unwrap();
    let ratio = tight.width as f32 / upright.width as f32;
    assert!(
        (ratio - 1.2 / 1.6).abs() < 0.02,
        "{}x{} against {}x{}",
        tight.width,
        tight.height,
        upright.width,
        upright.height
    );
    let ends = localise(&tight, LocaliseOptions { min_area_fraction: 0.02, ..LocaliseOptions::default() });
    assert_eq!(ends.pills.len(), 1, "{ends:?}");
    let fill = ends.pills[0].rectangle_px[0] / tight.width as f32;
    assert!((fill - 1.0 / 1.2).abs() < 0.08, "the pill spans {fill} of the tight crop's width, not 1/1.2");
    assert!(crop.width < 300 && crop.width == crop.height, "{}x{}", crop.width, crop.height);
    // The crop's centre is the pill, its corners the tray.
    let px = |img: &RgbImage, x: u32, y: u32| img.data[((y * img.width + x) * 3) as usize];
    let tray = px(&crop, 2, 2);
    assert!(px(&crop, crop.width / 2, crop.height / 2).abs_diff(tray) > 40, "the pill is in the middle");

    // What the counter would not classify is left out: an empty tray, a blurred pill.
    let empty = image::RgbImage::from_pixel(640, 480, image::Rgb([40, 90, 160]));
    let mut empty_jpeg = Vec::new();
    empty.write_to(&mut std::io::Cursor::new(&mut empty_jpeg), image::ImageFormat::Jpeg).unwrap();
    assert_eq!(pill_crop(&empty_jpeg, PillCrop::Square, None).unwrap(), None);
    let sharp = image::load_from_memory(&jpeg).unwrap();
    let mut blurred_jpeg = Vec::new();
    sharp.blur(8.0).write_to(&mut std::io::Cursor::new(&mut blurred_jpeg), image::ImageFormat::Jpeg).unwrap();
    assert_eq!(
        pill_crop(&blurred_jpeg, PillCrop::Upright, None).unwrap(),
        None,
        "a blurred pill fails the sharpness gate"
    );
    assert!(pill_crop(b"not a jpeg", PillCrop::Square, None).unwrap_err().to_string().contains("cannot crop the pill"));
}

#[test]
fn the_localiser_measures_every_product_at_its_formulary_size() {
    use rxvision_counter::localise::{localise, LocaliseOptions};
    use rxvision_synth::scene::NATIVE_PX_PER_MM;
    // Clean camera frames still vary the pose: scale x0.92-1.08 (lens height, pill tolerance).
    let options = SceneOptions { clean: true, ..SceneOptions::camera(640, 480) };
    let mut worst: f32 = 1.0;
    let mut missed = Vec::new();
    let mut off = Vec::new();
    let mut min_good_contrast = f32::MAX;
    let products = formulary().products;
    for (i, product) in products.iter().enumerate() {
        let frame =
            decode(&render_sample(product, Face::Front, &[], 40 + i as u64, &options).to_jpeg().unwrap()).unwrap();
        let found = localise(&frame, LocaliseOptions::default());
        let Some(pill) = found.pills.first() else {
            missed.push(product.ndc.clone());
            continue;
        };
        // The formulary measures diamonds along their diagonals, every other shape by its bounding rectangle.
        let px = if product.shape == Shape::Diamond { pill.axes_px } else { pill.rectangle_px };
        let measured = px.map(|v| v / NATIVE_PX_PER_MM);
        let nominal = [product.length_mm, product.width_mm];
        let ratios = [measured[0] / nominal[0], measured[1] / nominal[1]];
        if ratios.iter().any(|r| !(0.86..=1.14).contains(r)) {
            off.push(format!(
                "{} {:?} measured {measured:.1?} mm, formulary {nominal:?}, contrast {:.0}",
                product.ndc, product.shape, pill.contrast
            ));
        }
        min_good_contrast = if ratios.iter().all(|r| (0.86..=1.14).contains(r)) {
            min_good_contrast.min(pill.contrast)
        } else {
            min_good_contrast
        };
        for r in ratios {
            worst = if (r - 1.0).abs() > (worst - 1.0).abs() { r } else { worst };
        }
    }
    println!("not found (pill too like the tray): {missed:?}");
    println!("outside x0.86-1.14 of the formulary size ({} of {}): {off:#?}", off.len(), products.len());
    println!(
        "largest measured/formulary size ratio: {worst:.3}; lowest contrast measured right: {min_good_contrast:.0}"
    );
    assert!(missed.len() * 10 <= products.len(), "the localiser missed {missed:?}");
    // Low-contrast pills (white on a light tray) lose their shaded rim to the
    // tray: a known bias, bounded here so it cannot grow unnoticed.
    assert!(off.len() * 10 <= products.len(), "{} products measured off: {off:#?}", off.len());
}

#[test]
fn the_dataset_command_writes_pill_crops_and_counts_what_it_left_out() {
    let f = formulary();
    let keep = ["00093-0832-01", "00093-3145-01"];
    let exclude: Vec<&str> = f.products.iter().map(|p| p.ndc.as_str()).filter(|n| !keep.contains(n)).collect();
    let out_dir = tempfile::tempdir().unwrap();
    let out = synth(&[
        "dataset",
        "--out",
        out_dir.path().to_str().unwrap(),
        "--per-class",
        "6",
        "--seed",
        "3",
        "--size",
        "640x480",
        "--px-per-mm",
        "9",
        "--exclude",
        &exclude.join(","),
        "--formulary",
        formulary_path().to_str().unwrap(),
        "--pill-crops",
        "--crop",
        "upright",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(out_dir.path().join("labels.csv")).unwrap();
    let rows = &labels::parse(&csv).unwrap()[1..];
    let left_out = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("rxvision-synth: ")?.split(" frames left out").next()?.parse::<usize>().ok())
        .unwrap_or(0);
    assert_eq!(rows.len() + left_out, 12, "{}", stderr(&out));
    assert!(rows.len() >= 6, "most frames pass the counter's gate: {}", stderr(&out));
    for r in rows {
        let img = decode(&std::fs::read(out_dir.path().join(&r[0])).unwrap()).unwrap();
        assert_eq!(img.width, img.height, "{}: crops are square", r[0]);
        assert!(img.width > 60 && img.width < 400, "{}: {}", r[0], img.width);
    }
}

/// A crop margin the bundle loader would refuse is refused before anything
/// is rendered: exit 64 (usage), the loader's reason, and no files.
#[test]
fn the_dataset_command_refuses_a_crop_margin_the_bundle_would_refuse() {
    for (crop, margin, words) in [
        ("square", "0.1", "applies only to an upright crop"),
        ("upright", "1.5", "must lie in 0..=1"),
        ("upright", "-0.05", "must lie in 0..=1"),
    ] {
        let out_dir = tempfile::tempdir().unwrap();
        let margin_arg = format!("--crop-margin={margin}");
        let out = synth(&[
            "dataset",
            "--out",
            out_dir.path().to_str().unwrap(),
            "--per-class",
            "1",
            "--seed",
            "1",
            "--formulary",
            formulary_path().to_str().unwrap(),
            "--pill-crops",
            "--crop",
            crop,
            &margin_arg,
        ]);
        assert_eq!(out.status.code(), Some(64), "{crop} {margin}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--crop-margin") && stderr(&out).contains(words),
            "{crop} {margin}: {}",
            stderr(&out)
        );
        assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0, "{crop} {margin}: nothing written");
    }
}

/// The training crops pillnet learns from are pinned: a model's checkpoint
/// is resumed across sessions only on byte-identical data (the trainer checks
/// labels.csv and every image), so the renderer, the quality gate, the
/// localiser and the crop may be made faster but must not change a byte of
/// what they produce. A change on purpose changes a digest and needs a new
/// model version (scripts/pillnet-recipe). The crops and their labels are
/// pinned apart, so that a new labels column (as `imprint` was) shows that
/// the pictures stayed what they were.
#[test]
fn the_training_crops_are_byte_for_byte_what_the_recipe_rendered() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = synth(&[
        "dataset",
        "--formulary",
        formulary_path().to_str().unwrap(),
        "--out",
        out_dir.path().to_str().unwrap(),
        "--per-class",
        "2",
        "--seed",
        "101",
        "--size",
        "640x480",
        "--px-per-mm",
        "9",
        "--pill-crops",
        "--crop",
        "upright",
        "--impostors",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let labels_csv = std::fs::read(out_dir.path().join("labels.csv")).unwrap();
    let rows = labels::parse(std::str::from_utf8(&labels_csv).unwrap()).unwrap();
    let mut crops = Vec::new();
    for row in &rows[1..] {
        crops.extend(std::fs::read(out_dir.path().join(&row[0])).unwrap());
    }
    assert!(rows.len() > 200, "{} crops", rows.len() - 1);
    let sha = rxvision_models::bundle::sha256_hex;
    assert_eq!(sha(&crops), PINNED_CROPS, "{} crops differ from what the recipe rendered", rows.len() - 1);
    assert_eq!(sha(&labels_csv), PINNED_LABELS, "labels.csv differs from what the recipe wrote");
}

/// SHA-256 of every crop in labels.csv's order, as rendered for pillnet 0.5.0 and 0.6.0.
const PINNED_CROPS: &str = "e7353bb1895dc4740f3583fe249d7335df03e40537a570eff0c64080880e974d";
/// SHA-256 of that labels.csv (with the `imprint` column).
const PINNED_LABELS: &str = "35e9a6fd31313e972eddddacf31466adbf428cda6fae0954df34d118aaea33e3";

#[test]
fn tray_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let formulary = formulary_path();
    let out = synth(&[
        "tray",
        "--out",
        dir.path().to_str().unwrap(),
        "--n",
        "3",
        "--seed",
        "5",
        "--size",
        "400x300",
        "--formulary",
        formulary.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("trays.json")).unwrap()).unwrap();
    let images = index["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    let f = formulary_from(&formulary);
    for entry in images {
        let pills = entry["pills"].as_array().unwrap();
        assert_eq!(entry["count"].as_u64().unwrap() as usize, pills.len());
        assert!((2..=12).contains(&pills.len()));
        let img = decode(&std::fs::read(dir.path().join(entry["file"].as_str().unwrap())).unwrap()).unwrap();
        assert_eq!((img.width, img.height), (400, 300));
        for p in pills {
            assert!(f.get(p["ndc"].as_str().unwrap()).is_some());
            assert!(["front", "back"].contains(&p["face"].as_str().unwrap()));
            let b: Vec<u64> = p["box"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert!(b[0] + b[2] <= 400 && b[1] + b[3] <= 300 && b[2] > 0 && b[3] > 0);
        }
    }
}

fn formulary_from(path: &Path) -> Formulary {
    Formulary::load(path).unwrap()
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_no_index() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let formulary = formulary_path();
    let base = ["dataset", "--out", out_dir.to_str().unwrap(), "--per-class", "1", "--seed", "1"];

    let out = synth(&[&base[..], &["--formulary", "/nonexistent/formulary.json"]].concat());
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read formulary"), "{}", stderr(&out));
    assert!(!out_dir.join("labels.csv").exists());

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"{"schema_version": 1, "source_note": "x", "products": [{"ndc": "1"}]}"#).unwrap();
    let out = synth(&[&base[..], &["--formulary", broken.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));

    let out = synth(&[&base[..], &["--size", "0x0", "--formulary", formulary.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--size"), "{}", stderr(&out));

    let out = synth(&[&base[..], &["--exclude", "not-an-ndc", "--formulary", formulary.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    let out = synth(&[&base[..], &["--exclude", "99999-9999-99", "--formulary", formulary.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("99999-9999-99"), "{}", stderr(&out));
    assert!(!out_dir.join("labels.csv").exists());

    // Impostors are labelled 99999-…: a formulary that uses that labeler cannot have them.
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&formulary).unwrap()).unwrap();
    value["products"][3]["ndc"] = "99999-0001-01".into();
    let taken = dir.path().join("taken.json");
    std::fs::write(&taken, serde_json::to_vec(&value).unwrap()).unwrap();
    let out = synth(&[&base[..], &["--impostors", "1", "--formulary", taken.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("99999-0001-01"), "{}", stderr(&out));
    assert!(!out_dir.join("labels.csv").exists());

    let out = synth(&["features", dir.path().join("missing").to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

/// The formulary's own rules do not know the renderer's font; every program
/// that renders from a formulary refuses one with an imprint it cannot draw.
#[test]
fn a_formulary_the_font_cannot_draw_is_refused_for_rendering() {
    let json = std::fs::read_to_string(formulary_path()).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["products"][1]["imprint"]["back"] = "A\u{E000}".into();
    let json = serde_json::to_string(&value).unwrap();
    let formulary = Formulary::parse(&json, Path::new("t.json")).expect("the formulary's rules hold");
    let problems = rxvision_synth::check_drawable(&formulary).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("product 1 (") && problems[0].contains("no glyph for '\\u{e000}'"), "{problems:?}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("undrawable.json");
    std::fs::write(&path, json).unwrap();
    let err = rxvision_synth::load_formulary(&path).unwrap_err().to_string();
    assert!(err.contains("1 problem(s)") && err.contains("no glyph"), "{err}");
    let out_dir = dir.path().join("out");
    let out = synth(&[
        "dataset",
        "--out",
        out_dir.to_str().unwrap(),
        "--per-class",
        "1",
        "--seed",
        "1",
        "--formulary",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("no glyph"), "{}", stderr(&out));
}

#[test]
fn twin_faces_are_the_faces_no_picture_can_tell_apart() {
    let f = formulary();
    let p = |ndc: &str| f.get(ndc).unwrap();
    let (prednisone, trazodone_50, clonazepam_2) = (p("00054-4760-25"), p("50111-0433-01"), p("00093-0834-01"));
    // Blank bisected backs of two white 9.5 mm rounds: twins, with or without the size cue.
    for by_size in [false, true] {
        assert!(prednisone.face_twin(Face::Back, trazodone_50, by_size));
        assert!(trazodone_50.face_twin(Face::Back, prednisone, by_size));
    }
    // Their fronts carry different imprints.
    assert!(!prednisone.face_twin(Face::Front, trazodone_50, true));
    // Clonazepam 2 mg's back is blank and bisected too, but 7.1 mm: apart only when the size is measured.
    assert!(prednisone.face_twin(Face::Back, clonazepam_2, false));
    assert!(!prednisone.face_twin(Face::Back, clonazepam_2, true));
    // Trazodone 100 mg (10.3 mm) is within the measurement's spread of 9.5 mm: still a twin.
    assert!(prednisone.face_twin(Face::Back, p("50111-0434-01"), true));
    // The sildenafil fronts ("Pfizer") differ only in size; their backs (VGR25/50/100) differ.
    let (s25, s100) = (p("00069-4200-30"), p("00069-4220-30"));
    assert!(s25.face_twin(Face::Front, s100, false) && !s25.face_twin(Face::Front, s100, true));
    assert!(!s25.face_twin(Face::Back, s100, false));
    // Gabapentin 100 mg shows "D;02" on both sides; never its own twin, and never an unscored face's.
    let gabapentin = p("65862-0198-01");
    assert!(!gabapentin.face_twin(Face::Front, gabapentin, false));
    assert!(!p("64380-0904-06").face_twin(Face::Back, p("00093-0834-01"), false), "unscored vs bisected back");
    // Every look-alike group has at least one product with a face of its own.
    let twins_of = |q: &Product, face: Face| f.products.iter().filter(|o| q.face_twin(face, o, true)).count();
    let mut groups: BTreeMap<&str, bool> = BTreeMap::new();
    for q in &f.products {
        if let Some(g) = &q.lookalike_group {
            *groups.entry(g).or_default() |= twins_of(q, Face::Front) == 0 || twins_of(q, Face::Back) == 0;
        }
    }
    assert!(groups.values().all(|&own| own), "{groups:?}");
}
