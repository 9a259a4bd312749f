//! What the quality gate and the localiser make of every frame of a
//! dataset, without a model: the refusals they cause and how well the
//! found pill's measured size agrees with the formulary's.
//!
//! ```text
//! cargo run --example localise_report -- DATASET FORMULARY PX_PER_MM [--list OUTCOME]
//! ```
//!
//! Prints one line per outcome (`frame:<code>`, `no_pill`, `pill_at_edge`,
//! `several`, `blurred`, `one`) with its count, and for `one` the share of
//! pills measured within 15 % of their formulary length and width and the
//! share with a contrast below the size cue's limit. `--list OUTCOME` also
//! prints the frames of that outcome (file, product, measured and formulary
//! mm, contrast), for looking at them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rxvision_counter::localise::{localise, LocaliseOptions};
use rxvision_counter::quality::{check_frame, check_sharpness, QualityLimits};
use rxvision_counter::size::MIN_CONTRAST;
use rxvision_models::formulary::Formulary;
use rxvision_models::labels::read_dataset;
use rxvision_models::preprocess::decode;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dataset, formulary, px_per_mm, rest @ ..] = args.as_slice() else {
        return Err("usage: localise_report DATASET FORMULARY PX_PER_MM [--list OUTCOME]".into());
    };
    let list = match rest {
        [flag, outcome] if flag == "--list" => Some(outcome.as_str()),
        [] => None,
        _ => return Err("usage: localise_report DATASET FORMULARY PX_PER_MM [--list OUTCOME]".into()),
    };
    let dataset = PathBuf::from(dataset);
    let formulary = Formulary::load(formulary.as_ref()).map_err(|e| e.to_string())?;
    let px_per_mm: f32 = px_per_mm.parse().map_err(|e| format!("PX_PER_MM: {e}"))?;
    let images = read_dataset(&dataset.join("labels.csv"))?;
    let limits = QualityLimits::default();
    let options = LocaliseOptions::default();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let (mut measured, mut near, mut faint) = (0, 0, 0);
    for image in &images {
        let bytes = std::fs::read(dataset.join(&image.file)).map_err(|e| format!("{}: {e}", image.file))?;
        let frame = decode(&bytes).map_err(|e| format!("{}: {e}", image.file))?;
        let product = formulary.get(&image.ndc).or_else(|| formulary.get(&image.imitates));
        let formulary_mm = product.map_or([0.0; 2], |p| [p.length_mm, p.width_mm]);
        let (outcome, detail) = if let Err(rejection) = check_frame(&frame, limits) {
            (format!("frame:{}", rejection.code), String::new())
        } else {
            let found = localise(&frame, options);
            match found.pills.as_slice() {
                [] if found.partial.is_empty() => ("no_pill".to_string(), String::new()),
                [] => ("pill_at_edge".to_string(), String::new()),
                [pill] => {
                    let mm = pill.rectangle_px.map(|v| v / px_per_mm);
                    let detail = format!(
                        "{:.1}x{:.1} mm (formulary {:.1}x{:.1}), contrast {:.0}",
                        mm[0], mm[1], formulary_mm[0], formulary_mm[1], pill.contrast
                    );
                    if check_sharpness(&frame, *pill, limits).is_err() {
                        ("blurred".to_string(), detail)
                    } else {
                        measured += 1;
                        let close = |a: f32, b: f32| b > 0.0 && (a - b).abs() <= 0.15 * b;
                        near += usize::from(close(mm[0], formulary_mm[0]) && close(mm[1], formulary_mm[1]));
                        faint += usize::from(pill.contrast < MIN_CONTRAST);
                        ("one".to_string(), detail)
                    }
                }
                _ => ("several".to_string(), format!("{} pills", found.pills.len())),
            }
        };
        if list == Some(outcome.as_str()) {
            println!("{}\t{}\t{}\t{detail}", image.file, image.ndc, product.map_or("?", |p| p.name.as_str()));
        }
        *outcomes.entry(outcome).or_default() += 1;
    }
    println!("{} frames", images.len());
    for (outcome, n) in &outcomes {
        println!("  {outcome:<24} {n:>6}");
    }
    let share = |a: usize| if measured == 0 { 0.0 } else { a as f64 / measured as f64 };
    println!(
        "one pill: {measured} measured, {:.3} within 15 % of the formulary size, {:.3} below contrast {MIN_CONTRAST}",
        share(near),
        share(faint)
    );
    Ok(())
}
