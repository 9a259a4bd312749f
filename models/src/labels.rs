//! `labels.csv`, the dataset layout the renderer writes and the trainer,
//! `rxvisiond eval` and `rxvision-synth features` read.
//!
//! RFC 4180 CSV, UTF-8, `\n` line ends, header first:
//!
//! ```text
//! file,ndc,face,name,strength,lookalike_group,seed,imitates,imprint
//! images/00093-0832-01_00000_front.jpg,00093-0832-01,front,Clonazepam,0.5 mg,LA05,1234567890,,TEVA;832
//! images/99999-0832-01_00000_front.jpg,99999-0832-01,front,Clonazepam (altered imprint),0.5 mg,LA05,987654321,00093-0832-01,TEVA;852
//! ```
//!
//! * `file` — the image, relative to the dataset directory;
//! * `ndc`, `name`, `strength`, `lookalike_group` — from the formulary
//!   (`lookalike_group` empty when the product is in none);
//! * `face` — `front` or `back`, the face up;
//! * `seed` — the image's own seed (derived from the run's seed, the NDC and
//!   the image's index), which with the same formulary, options and
//!   `--exclude` list re-renders exactly this image;
//! * `imitates` — for a product that does not exist (an *impostor*, see
//!   `rxvision_synth::impostor`), the NDC of the formulary product whose
//!   imprint was altered; empty for a formulary product. Datasets written
//!   before this column have none, which reads as empty.
//! * `imprint` — the imprint of the face up as the picture shows it (SPL
//!   form, `;` between lines; an impostor's altered one; empty for a blank
//!   face): what a model that reads imprints is taught to read. Datasets
//!   written before this column have none.
//!
//! Fields holding a comma, quote or line break are quoted, quotes doubled.
//! Other producers (the C3PI conversion) may add columns; readers find columns
//! by name.

use std::path::Path;

/// The header `rxvision-synth dataset` writes.
pub const HEADER: &str = "file,ndc,face,name,strength,lookalike_group,seed,imitates,imprint";

/// One row of `labels.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRow {
    /// Image path relative to the dataset directory.
    pub file: String,
    /// Product NDC.
    pub ndc: String,
    /// `front` or `back`.
    pub face: String,
    /// Product name.
    pub name: String,
    /// Strength.
    pub strength: String,
    /// Look-alike group or empty.
    pub lookalike_group: String,
    /// The image's seed.
    pub seed: u64,
    /// The product an impostor imitates, or empty.
    pub imitates: String,
    /// The imprint of the face up, as drawn (empty for a blank face).
    pub imprint: String,
}

impl LabelRow {
    /// The row as one CSV line (with its `\n`).
    pub fn to_csv(&self) -> String {
        let fields = [
            &self.file,
            &self.ndc,
            &self.face,
            &self.name,
            &self.strength,
            &self.lookalike_group,
            &self.seed.to_string(),
            &self.imitates,
            &self.imprint,
        ]
        .map(|f| quote(f));
        format!("{}\n", fields.join(","))
    }
}

/// Quotes a CSV field if it needs it.
pub fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// Parses RFC 4180 CSV text into records of fields.
pub fn parse(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut line = 1;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            '"' => return Err(format!("line {line}: stray quote inside an unquoted field")),
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                line += 1;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(format!("line {line}: unterminated quoted field"));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// One image of a labelled dataset, as evaluations read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetImage {
    /// Image path relative to the dataset directory.
    pub file: String,
    /// Product NDC.
    pub ndc: String,
    /// Look-alike group (empty when in none, or when the dataset has no such column).
    pub lookalike_group: String,
    /// `front` or `back`; `None` when the dataset does not say.
    pub face: Option<String>,
    /// The formulary product an impostor imitates (empty for a real product,
    /// or when the dataset has no such column).
    pub imitates: String,
}

/// The images of a `labels.csv` (columns `file` and `ndc`, and
/// `lookalike_group`, `face` and `imitates` when present), in order; blank lines skipped.
pub fn read_dataset(path: &Path) -> Result<Vec<DatasetImage>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let records = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (header, rows) = records.split_first().ok_or_else(|| format!("{}: empty", path.display()))?;
    let column = |name: &str| header.iter().position(|h| h == name);
    let (Some(file), Some(ndc)) = (column("file"), column("ndc")) else {
        return Err(format!("{}: the header needs `file` and `ndc` columns", path.display()));
    };
    let (group, face, imitates) = (column("lookalike_group"), column("face"), column("imitates"));
    rows.iter()
        .enumerate()
        .filter(|(_, r)| !(r.len() == 1 && r[0].is_empty()))
        .map(|(i, r)| {
            let field = |c: Option<usize>| c.and_then(|c| r.get(c)).cloned();
            match (field(Some(file)).filter(|f| !f.is_empty()), field(Some(ndc))) {
                (Some(file), Some(ndc)) => Ok(DatasetImage {
                    file,
                    ndc,
                    lookalike_group: field(group).unwrap_or_default(),
                    face: field(face),
                    imitates: field(imitates).unwrap_or_default(),
                }),
                _ => Err(format!("{}: row {} is short", path.display(), i + 2)),
            }
        })
        .collect()
}

/// The `file` column of a `labels.csv`, in order.
pub fn read_files(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let records = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (header, rows) = records.split_first().ok_or_else(|| format!("{}: empty file", path.display()))?;
    let col = header
        .iter()
        .position(|h| h == "file")
        .ok_or_else(|| format!("{}: no `file` column in the header", path.display()))?;
    rows.iter()
        .enumerate()
        .filter(|(_, r)| !(r.len() == 1 && r[0].is_empty()))
        .map(|(i, r)| {
            r.get(col)
                .filter(|f| !f.is_empty())
                .cloned()
                .ok_or_else(|| format!("{}: row {} has no file", path.display(), i + 2))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_parser() {
        let row = LabelRow {
            file: "images/a.jpg".into(),
            ndc: "12345-6789-01".into(),
            face: "front".into(),
            name: "Odd, \"quoted\" name".into(),
            strength: "5 mg/325 mg".into(),
            lookalike_group: String::new(),
            seed: u64::MAX,
            imitates: "12345-6789-02".into(),
            imprint: "M;366".into(),
        };
        let text = format!("{HEADER}\n{}", row.to_csv());
        let records = parse(&text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1][3], "Odd, \"quoted\" name");
        assert_eq!(records[1][6], u64::MAX.to_string());
        assert_eq!(records[1][5], "");
        assert_eq!(records[1][7], "12345-6789-02");
        assert_eq!(records[1][8], "M;366");
    }

    #[test]
    fn datasets_without_the_imitates_column_read_as_formulary_products() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(&path, "file,ndc,face\nimages/a.jpg,12345-6789-01,front\n").unwrap();
        let images = read_dataset(&path).unwrap();
        assert_eq!((images[0].imitates.as_str(), images[0].face.as_deref()), ("", Some("front")));
        std::fs::write(&path, format!("{HEADER}\nimages/b.jpg,99999-6789-01,back,X,1 mg,LA01,7,12345-6789-01\n"))
            .unwrap();
        assert_eq!(read_dataset(&path).unwrap()[0].imitates, "12345-6789-01");
    }

    #[test]
    fn broken_csv_is_an_error() {
        assert!(parse("a,\"b\n").is_err());
        assert!(parse("a,b\"c\n").is_err());
    }
}
