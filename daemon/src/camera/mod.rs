//! Frame sources behind one trait: where the counter path gets its pictures.
//!
//! * [`LiveCamera`] reads a USB/UVC camera through V4L2 (nokhwa) on its own
//!   thread and re-opens it when it is unplugged and plugged back in
//!   ([`link`] is its state machine).
//! * [`DirSource`] replays image files (JPEG/PNG) from a directory, in name
//!   order, once or in a loop — for replaying a day's scans.
//! * [`SyntheticSource`] renders counter photos of formulary products with the
//!   project's renderer — for demos and tests without a camera.
//!
//! A source that cannot deliver says why ([`CameraError`]) instead of
//! blocking: the scan gets a clear error and the source is asked again on the
//! next scan, so a camera (or folder) that comes back is used again without a
//! restart.

mod dir;
pub mod link;
mod synthetic;
pub mod v4l2;

pub use dir::DirSource;
pub use link::CameraHealth;
use rxvision_models::preprocess::{PreprocessError, RgbImage};
pub use synthetic::SyntheticSource;
pub use v4l2::{LiveCamera, PixelFormat};

/// Why a source gave no frame.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// The device or folder is not there (unplugged, unmounted, deleted).
    #[error("camera unavailable: {0}")]
    Unavailable(String),
    /// A one-shot replay has delivered every frame.
    #[error("no more frames: the replay of {0} is finished")]
    Exhausted(String),
    /// A frame arrived but could not be decoded.
    #[error("frame {source_name} is unreadable: {error}")]
    BadFrame {
        /// Which frame (file name or device).
        source_name: String,
        /// The decoder's complaint.
        error: PreprocessError,
        /// The bytes as captured (a scan of them answers BAD_IMAGE and is audited).
        encoded: Vec<u8>,
    },
}

/// A captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The picture.
    pub image: RgbImage,
    /// The encoded bytes as captured (hashed into the audit record).
    pub encoded: Vec<u8>,
    /// Where it came from (file name, device), for logs and the audit.
    pub origin: String,
}

/// Something that delivers frames on request.
pub trait FrameSource: Send {
    /// One line saying what this source is (`dir /srv/scans (loop)`).
    fn describe(&self) -> String;
    /// A live device's state now; `None` for sources that are not a device
    /// (files, renderer), whose health shows only when a frame is asked for.
    fn health(&self) -> Option<CameraHealth> {
        None
    }
    /// The next frame, or why there is none right now.
    fn next_frame(&mut self) -> Result<Frame, CameraError>;
}
