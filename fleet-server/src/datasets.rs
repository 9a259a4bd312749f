//! Held-out datasets for the validation gates (`rxfleet datasets add DIR`).
//!
//! A dataset is the layout the renderer writes (`labels.csv` with `file` and
//! `ndc`, and `lookalike_group` and `face` when known, plus the images). On
//! registration every row is checked (a safe relative path to a regular file
//! of sane size), the whole is content-hashed (SHA-256 over `labels.csv` and
//! every image's name and SHA-256, in name order), and a copy goes to
//! `<datasets_dir>/<hash>/`, so a gate report's dataset hash names exactly
//! the images it was measured on, whatever later happens to DIR. A refused
//! dataset leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use rxvision_models::bundle::sha256_hex;
use rxvision_models::labels;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{Db, DbError};

/// Largest image accepted.
const MAX_IMAGE_BYTES: u64 = 32 * 1024 * 1024;
/// Most images a dataset may hold.
const MAX_IMAGES: usize = 200_000;

/// Why a dataset was refused.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The directory's contents are not a usable dataset (every problem).
    #[error("{dir}: not a usable dataset:\n  {}", .problems.join("\n  "))]
    Invalid {
        /// The directory.
        dir: String,
        /// What is wrong, at most 20 of them.
        problems: Vec<String>,
    },
    /// The name is taken by another dataset.
    #[error("{0}")]
    Conflict(String),
    /// Copying failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for DatasetError {
    fn from(e: sqlx::Error) -> DatasetError {
        DatasetError::Db(DbError::Sql(e))
    }
}

/// A registered dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Dataset {
    /// Its content hash (and directory name).
    pub hash: String,
    /// Its name.
    pub name: String,
    /// Images.
    pub images: i64,
    /// Distinct products (NDCs).
    pub products: i64,
    /// The camera scale the images were taken at (turns the size cue on, as
    /// `[camera] px_per_mm` does on an appliance); `None`: unknown.
    pub px_per_mm: Option<f32>,
    /// When and by whom it was added.
    pub added_ms: i64,
    /// See `added_ms`.
    pub added_by: String,
}

impl Dataset {
    /// Where its copy lives.
    pub fn dir(&self, datasets_dir: &Path) -> PathBuf {
        datasets_dir.join(&self.hash)
    }
}

fn from_row(row: &AnyRow) -> Dataset {
    let milli: Option<i64> = row.get(4);
    Dataset {
        hash: row.get(0),
        name: row.get(1),
        images: row.get(2),
        products: row.get(3),
        px_per_mm: milli.map(|m| m as f32 / 1000.0),
        added_ms: row.get(5),
        added_by: row.get(6),
    }
}

const COLUMNS: &str = "hash, name, images, products, px_per_mm_milli, added_ms, added_by";

fn safe_relative(file: &str) -> bool {
    let path = Path::new(file);
    !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Checks a dataset directory and computes its content hash; returns the
/// hash, the images' distinct files and the number of products.
fn check(dir: &Path) -> Result<(String, Vec<String>, usize, usize), Vec<String>> {
    let images = labels::read_dataset(&dir.join("labels.csv")).map_err(|e| vec![e])?;
    if images.is_empty() {
        return Err(vec!["labels.csv lists no image".into()]);
    }
    if images.len() > MAX_IMAGES {
        return Err(vec![format!("{} images, more than {MAX_IMAGES}", images.len())]);
    }
    let mut problems = Vec::new();
    let mut files = BTreeMap::new();
    for (row, image) in images.iter().enumerate() {
        let line = row + 2;
        if !safe_relative(&image.file) {
            problems.push(format!("labels.csv line {line}: {:?} is not a path inside the dataset", image.file));
            continue;
        }
        if image.ndc.trim().is_empty() {
            problems.push(format!("labels.csv line {line}: no ndc"));
        }
        if files.contains_key(&image.file) {
            continue;
        }
        let path = dir.join(&image.file);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.is_file() => problems.push(format!("{}: not a regular file", image.file)),
            Ok(meta) if meta.len() > MAX_IMAGE_BYTES => {
                problems.push(format!("{}: {} bytes, more than {MAX_IMAGE_BYTES}", image.file, meta.len()))
            }
            Ok(_) => match std::fs::read(&path) {
                Ok(bytes) => {
                    files.insert(image.file.clone(), sha256_hex(&bytes));
                }
                Err(e) => problems.push(format!("{}: {e}", image.file)),
            },
            Err(e) => problems.push(format!("{}: {e}", image.file)),
        }
        if problems.len() >= 20 {
            break;
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let labels_bytes = std::fs::read(dir.join("labels.csv")).map_err(|e| vec![format!("labels.csv: {e}")])?;
    let mut manifest = format!("labels.csv\0{}\n", sha256_hex(&labels_bytes));
    for (file, sha) in &files {
        manifest.push_str(&format!("{file}\0{sha}\n"));
    }
    let products: BTreeSet<&str> = images.iter().map(|i| i.ndc.as_str()).collect();
    Ok((sha256_hex(manifest.as_bytes()), files.into_keys().collect(), images.len(), products.len()))
}

/// Copies the dataset into `<datasets_dir>/<hash>/` (staged, then renamed).
fn copy(dir: &Path, files: &[String], datasets_dir: &Path, hash: &str) -> Result<(), DatasetError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| DatasetError::Io { path, source }
    };
    let target = datasets_dir.join(hash);
    if target.is_dir() {
        return Ok(());
    }
    let staged = datasets_dir.join(format!(".staging-{hash}"));
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(io(&staged))?;
    let result = (|| {
        std::fs::copy(dir.join("labels.csv"), staged.join("labels.csv")).map_err(io(&dir.join("labels.csv")))?;
        for file in files {
            let to = staged.join(file);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::copy(dir.join(file), &to).map_err(io(&dir.join(file)))?;
        }
        std::fs::rename(&staged, &target).map_err(io(&target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

impl Db {
    /// Registers the dataset in `dir` under `name` (default: the
    /// directory's name). The same contents again return the registered
    /// dataset; a taken name with other contents is refused.
    pub async fn add_dataset(
        &self,
        dir: &Path,
        name: Option<&str>,
        px_per_mm: Option<f32>,
        datasets_dir: &Path,
        actor: &str,
        now_ms: i64,
    ) -> Result<Dataset, DatasetError> {
        if let Some(scale) = px_per_mm.filter(|s| !(1.0..=100.0).contains(s)) {
            return Err(DatasetError::Invalid {
                dir: dir.display().to_string(),
                problems: vec![format!("--px-per-mm {scale} is outside 1..=100")],
            });
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into()),
        };
        let owned = dir.to_path_buf();
        let checked = tokio::task::spawn_blocking(move || check(&owned)).await.expect("the check does not panic");
        let (hash, files, images, products) =
            checked.map_err(|problems| DatasetError::Invalid { dir: dir.display().to_string(), problems })?;
        if let Some(existing) = self.dataset(Some(&hash)).await? {
            return Ok(existing);
        }
        if let Some(taken) = self.dataset(Some(&name)).await? {
            return Err(DatasetError::Conflict(format!(
                "the name {name:?} is taken by dataset {} with other contents: choose another with --name",
                taken.hash
            )));
        }
        let (source, datasets) = (dir.to_path_buf(), datasets_dir.to_path_buf());
        let hash_copy = hash.clone();
        tokio::task::spawn_blocking(move || copy(&source, &files, &datasets, &hash_copy))
            .await
            .expect("the copy does not panic")?;
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!("INSERT INTO datasets ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"))
            .bind(&hash)
            .bind(&name)
            .bind(images as i64)
            .bind(products as i64)
            .bind(px_per_mm.map(|s| (f64::from(s) * 1000.0).round() as i64))
            .bind(now_ms)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        let details = serde_json::json!({"hash": hash, "name": name, "images": images, "products": products});
        crate::devices::record_change(&mut tx, now_ms, actor, "dataset_added", None, details).await?;
        tx.commit().await?;
        self.dataset(Some(&hash)).await?.ok_or_else(|| DatasetError::Conflict("the dataset vanished".into()))
    }

    /// A dataset by name or hash; `None` names the newest.
    pub async fn dataset(&self, name_or_hash: Option<&str>) -> Result<Option<Dataset>, DbError> {
        let row = match name_or_hash {
            Some(key) => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM datasets WHERE hash = $1 OR name = $1"))
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM datasets ORDER BY added_ms DESC, hash LIMIT 1"))
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        Ok(row.as_ref().map(from_row))
    }

    /// Every dataset, newest first.
    pub async fn datasets(&self) -> Result<Vec<Dataset>, DbError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM datasets ORDER BY added_ms DESC, hash"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(from_row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_inside_the_dataset_are_accepted() {
        assert!(safe_relative("images/a.jpg"));
        for bad in ["", "/etc/passwd", "../x.jpg", "images/../../x", "./a.jpg"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}
