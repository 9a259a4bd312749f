//! Replaying image files from a directory.

use std::path::{Path, PathBuf};

use rxvision_models::preprocess::decode;

use super::{CameraError, Frame, FrameSource};

/// Image files of a directory, in file-name order, once or in a loop.
///
/// The directory is listed again whenever the replay wraps around (or after
/// it was unavailable), so files added meanwhile are picked up.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    looping: bool,
    files: Vec<PathBuf>,
    next: usize,
}

impl DirSource {
    /// A source over `dir`; `looping` starts again after the last file.
    pub fn new(dir: &Path, looping: bool) -> DirSource {
        DirSource { dir: dir.to_path_buf(), looping, files: Vec::new(), next: 0 }
    }

    fn list(&self) -> Result<Vec<PathBuf>, CameraError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| CameraError::Unavailable(format!("cannot read folder {}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(CameraError::Unavailable(format!("folder {} holds no JPEG or PNG files", self.dir.display())));
        }
        Ok(files)
    }
}

impl FrameSource for DirSource {
    fn describe(&self) -> String {
        format!("dir {} ({})", self.dir.display(), if self.looping { "loop" } else { "once" })
    }

    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        if self.next >= self.files.len() {
            if !self.files.is_empty() && !self.looping {
                return Err(CameraError::Exhausted(self.dir.display().to_string()));
            }
            self.files = self.list()?;
            self.next = 0;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        let origin = path.display().to_string();
        let encoded = std::fs::read(&path).map_err(|e| {
            // The file vanished since the listing: list again next time.
            self.files.clear();
            CameraError::Unavailable(format!("cannot read {origin}: {e}"))
        })?;
        let image = match decode(&encoded) {
            Ok(image) => image,
            Err(error) => return Err(CameraError::BadFrame { source_name: origin, error, encoded }),
        };
        Ok(Frame { image, encoded, origin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(dir: &Path, name: &str, shade: u8) {
        let img = image::RgbImage::from_pixel(8, 6, image::Rgb([shade, shade, shade]));
        img.save(dir.join(name)).unwrap();
    }

    #[test]
    fn replays_in_name_order_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "b.png", 20);
        png(dir.path(), "a.png", 10);
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let mut source = DirSource::new(dir.path(), true);
        let shades: Vec<u8> = (0..5).map(|_| source.next_frame().unwrap().image.data[0]).collect();
        assert_eq!(shades, [10, 20, 10, 20, 10]);
    }

    #[test]
    fn a_one_shot_replay_ends_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "a.png", 10);
        let mut source = DirSource::new(dir.path(), false);
        assert!(source.next_frame().is_ok());
        assert!(matches!(source.next_frame(), Err(CameraError::Exhausted(_))));
    }

    #[test]
    fn a_folder_that_disappears_is_an_error_and_is_used_again_when_it_returns() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("scans");
        let mut source = DirSource::new(&dir, true);
        let err = source.next_frame().unwrap_err();
        assert!(matches!(err, CameraError::Unavailable(_)), "{err}");
        std::fs::create_dir(&dir).unwrap();
        assert!(source.next_frame().unwrap_err().to_string().contains("no JPEG or PNG"));
        png(&dir, "a.png", 30);
        assert_eq!(source.next_frame().unwrap().image.data[0], 30);
    }

    #[test]
    fn a_corrupt_file_is_reported_by_name_and_the_next_one_still_plays() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();
        png(dir.path(), "b.png", 40);
        let mut source = DirSource::new(dir.path(), false);
        let err = source.next_frame().unwrap_err();
        assert!(err.to_string().contains("a.jpg"), "{err}");
        assert_eq!(source.next_frame().unwrap().image.data[0], 40);
    }
}
