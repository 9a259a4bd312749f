//! A live USB/UVC camera through V4L2 (nokhwa), with reconnection.
//!
//! One capture thread owns the device: it opens it, reads frames
//! continuously (so the newest frame is always at most one frame period old
//! and the driver's queue never hands out a stale picture), and re-opens it
//! when it disappears. The device path is resolved again on every open, so a
//! stable name such as `/dev/v4l/by-id/usb-…-video-index0` keeps working when
//! the camera comes back under another `/dev/videoN`.
//!
//! A scan ([`FrameSource::next_frame`]) waits for the first frame captured
//! after it asked — what lies under the camera now — for at most
//! [`FRAME_TIMEOUT`]. It never hangs: an unplugged camera answers at once
//! with why and for how long it has been down, a stalled one after the
//! timeout. [`CameraLink`] keeps the state; this module only does the I/O.
//!
//! MJPEG frames are kept as captured (the audit hashes the camera's own
//! bytes) and decoded for the counter path; YUYV frames are converted to RGB
//! and encoded as JPEG (quality [`YUYV_JPEG_QUALITY`]) for the page and the
//! audit hash.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rxvision_models::preprocess::{decode, RgbImage};

use super::link::{CameraHealth, CameraLink};
use super::{CameraError, Frame, FrameSource};

/// The longest a scan waits for a fresh frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(2);
/// JPEG quality of frames made from YUYV cameras.
pub const YUYV_JPEG_QUALITY: u8 = 92;

/// The pixel format asked of the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Motion JPEG: every UVC camera offers it at full resolution.
    Mjpeg,
    /// Uncompressed YUV 4:2:2, for cameras whose MJPEG is poor.
    Yuyv,
}

impl PixelFormat {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PixelFormat::Mjpeg => "mjpeg",
            PixelFormat::Yuyv => "yuyv",
        }
    }
}

/// A frame as the driver delivered it.
#[derive(Debug, Clone)]
pub enum RawFrame {
    /// One JPEG image.
    Mjpeg(Vec<u8>),
    /// YUYV 4:2:2: two pixels in four bytes.
    Yuyv {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height * 2` bytes.
        data: Vec<u8>,
    },
}

/// An open, streaming capture device (lives on the capture thread only).
pub trait CaptureDevice {
    /// Blocks until the next frame; an error means the device is gone or broken.
    fn next_frame(&mut self) -> Result<RawFrame, String>;
}

/// Opens the capture device, as often as needed.
pub trait DeviceOpener: Send + 'static {
    /// Opens and starts streaming; the error says why not (in the driver's words).
    fn open(&self) -> Result<Box<dyn CaptureDevice>, String>;
}

struct Latest {
    captured: Instant,
    number: u64,
    raw: RawFrame,
}

struct Shared {
    state: Mutex<(CameraLink, Option<Latest>)>,
    fresh: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, (CameraLink, Option<Latest>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live camera as a [`FrameSource`].
pub struct LiveCamera {
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for LiveCamera {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCamera").field("name", &self.name).finish_non_exhaustive()
    }
}

impl LiveCamera {
    /// Starts the capture thread for the V4L2 camera at `device`.
    pub fn v4l2(device: &Path, format: PixelFormat, resolution: [u32; 2]) -> LiveCamera {
        let name = format!("v4l2 {} ({} {}x{})", device.display(), format.as_str(), resolution[0], resolution[1]);
        let opener = NokhwaOpener { device: device.to_path_buf(), format, resolution };
        LiveCamera::start(name, opener, FRAME_TIMEOUT)
    }

    /// Starts a capture thread over any opener (`name` is for logs and status).
    pub fn start(name: String, opener: impl DeviceOpener, timeout: Duration) -> LiveCamera {
        let shared = Arc::new(Shared {
            state: Mutex::new((CameraLink::new(Instant::now()), None)),
            fresh: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name("camera".into())
            .spawn(move || capture_loop(&thread_name, &opener, &thread_shared))
            .expect("spawning the camera thread");
        LiveCamera { name, shared, thread: Some(thread), timeout }
    }
}

fn capture_loop(name: &str, opener: &dyn DeviceOpener, shared: &Shared) {
    let mut device: Option<Box<dyn CaptureDevice>> = None;
    let mut number = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        let Some(open) = device.as_mut() else {
            let wait = shared.lock().0.wait_before_open(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
            let result = opener.open();
            let mut state = shared.lock();
            match result {
                Ok(d) => {
                    device = Some(d);
                    let (after, attempts) = state.0.opened(Instant::now());
                    tracing::info!(camera = name, attempts, down_s = after.as_secs_f64(), "camera open");
                }
                Err(reason) => {
                    if state.0.open_failed(reason.clone(), Instant::now()) {
                        tracing::warn!(camera = name, %reason, "camera cannot be opened; retrying");
                    }
                }
            }
            shared.fresh.notify_all();
            continue;
        };
        let result = open.next_frame();
        let now = Instant::now();
        let mut state = shared.lock();
        match result {
            Ok(raw) => {
                number += 1;
                state.0.frame_arrived(now);
                state.1 = Some(Latest { captured: now, number, raw });
            }
            Err(reason) => {
                let frames = state.0.lost(reason.clone(), now);
                tracing::warn!(camera = name, %reason, frames, "camera lost; re-opening when it is back");
                state.1 = None;
                drop(state);
                device = None; // closes the device
                shared.fresh.notify_all();
                continue;
            }
        }
        drop(state);
        shared.fresh.notify_all();
    }
}

impl FrameSource for LiveCamera {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn health(&self) -> Option<CameraHealth> {
        Some(self.shared.lock().0.health(Instant::now()))
    }

    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        let asked = Instant::now();
        let deadline = asked + self.timeout;
        let mut state = self.shared.lock();
        let (number, raw) = loop {
            if let Some(latest) = &state.1 {
                if latest.captured >= asked {
                    break (latest.number, latest.raw.clone());
                }
            }
            let now = Instant::now();
            // Down: answer at once. Starting or stalled: wait for a frame.
            if let health @ CameraHealth::Down { .. } = state.0.health(now) {
                return Err(CameraError::Unavailable(format!("{}: {health}", self.name)));
            }
            if now >= deadline {
                return Err(CameraError::Unavailable(format!(
                    "{}: no frame within {:.1} s (the camera is {}); check its cable and power",
                    self.name,
                    self.timeout.as_secs_f64(),
                    state.0.health(now)
                )));
            }
            state = self.shared.fresh.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        };
        drop(state);
        into_frame(raw, format!("{} frame {number}", self.name))
    }
}

impl Drop for LiveCamera {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else { return };
        // A device stuck inside a read cannot be interrupted: wait a little,
        // then leave the thread to the process's exit.
        let until = Instant::now() + Duration::from_secs(1);
        while !thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// Decodes (MJPEG) or converts and encodes (YUYV) a captured frame.
pub fn into_frame(raw: RawFrame, origin: String) -> Result<Frame, CameraError> {
    match raw {
        RawFrame::Mjpeg(encoded) => match decode(&encoded) {
            Ok(image) => Ok(Frame { image, encoded, origin }),
            Err(error) => Err(CameraError::BadFrame { source_name: origin, error, encoded }),
        },
        RawFrame::Yuyv { width, height, data } => {
            let image = yuyv_to_rgb(width, height, &data).ok_or_else(|| {
                CameraError::Unavailable(format!(
                    "{origin}: a {width}x{height} YUYV frame needs {} bytes, the driver gave {}",
                    width as usize * height as usize * 2,
                    data.len()
                ))
            })?;
            let mut encoded = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, YUYV_JPEG_QUALITY)
                .encode(&image.data, width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| CameraError::Unavailable(format!("{origin}: cannot encode the frame: {e}")))?;
            Ok(Frame { image, encoded, origin })
        }
    }
}

/// YUYV 4:2:2 to RGB with the BT.601 limited-range matrix UVC cameras use.
pub fn yuyv_to_rgb(width: u32, height: u32, data: &[u8]) -> Option<RgbImage> {
    let (w, h) = (width as usize, height as usize);
    if w % 2 != 0 || data.len() != w * h * 2 {
        return None;
    }
    let mut rgb = Vec::with_capacity(w * h * 3);
    for quad in data.chunks_exact(4) {
        let (u, v) = (i32::from(quad[1]) - 128, i32::from(quad[3]) - 128);
        for y in [quad[0], quad[2]] {
            let c = 298 * (i32::from(y) - 16);
            let px = [(c + 409 * v + 128) >> 8, (c - 100 * u - 208 * v + 128) >> 8, (c + 516 * u + 128) >> 8];
            rgb.extend(px.map(|x| x.clamp(0, 255) as u8));
        }
    }
    RgbImage::from_raw(width, height, rgb)
}

/// The V4L2 index behind `device` (`/dev/video2` → 2), following symlinks
/// such as `/dev/v4l/by-id/…`.
pub fn v4l2_index(device: &Path) -> Result<u32, String> {
    let resolved = std::fs::canonicalize(device).map_err(|e| format!("{}: {e}", device.display()))?;
    resolved
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{} is not a V4L2 device node (/dev/videoN)", resolved.display()))
}

struct NokhwaOpener {
    device: PathBuf,
    format: PixelFormat,
    resolution: [u32; 2],
}

struct NokhwaDevice(nokhwa::Camera);

impl DeviceOpener for NokhwaOpener {
    fn open(&self) -> Result<Box<dyn CaptureDevice>, String> {
        use nokhwa::pixel_format::RgbFormat;
        use nokhwa::utils::{ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType};
        let index = v4l2_index(&self.device)?;
        let fourcc = match self.format {
            PixelFormat::Mjpeg => FrameFormat::MJPEG,
            PixelFormat::Yuyv => FrameFormat::YUYV,
        };
        let [w, h] = self.resolution;
        let wanted = CameraFormat::new_from(w, h, fourcc, 30);
        let requested = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(wanted));
        let mut camera = nokhwa::Camera::with_backend(CameraIndex::Index(index), requested, ApiBackend::Video4Linux)
            .map_err(|e| e.to_string())?;
        camera.open_stream().map_err(|e| e.to_string())?;
        let got = camera.camera_format();
        if got.resolution().width() != w || got.resolution().height() != h || got.format() != fourcc {
            tracing::warn!(device = %self.device.display(), wanted = %wanted, got = %got, "the camera chose another format");
        }
        Ok(Box::new(NokhwaDevice(camera)))
    }
}

impl CaptureDevice for NokhwaDevice {
    fn next_frame(&mut self) -> Result<RawFrame, String> {
        use nokhwa::utils::FrameFormat;
        let buffer = self.0.frame().map_err(|e| e.to_string())?;
        let resolution = buffer.resolution();
        match buffer.source_frame_format() {
            FrameFormat::MJPEG => Ok(RawFrame::Mjpeg(buffer.buffer().to_vec())),
            FrameFormat::YUYV => Ok(RawFrame::Yuyv {
                width: resolution.width(),
                height: resolution.height(),
                data: buffer.buffer().to_vec(),
            }),
            other => Err(format!("the camera delivers {other}, which the daemon does not read (use mjpeg or yuyv)")),
        }
    }
}

/// One V4L2 camera as the installer sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraListing {
    /// `/dev/videoN`.
    pub device: String,
    /// Stable names pointing at it (`/dev/v4l/by-id/…`, `/dev/v4l/by-path/…`).
    pub stable_names: Vec<String>,
    /// The driver's name for it.
    pub name: String,
    /// `WxH@fps format` entries it offers in MJPEG or YUYV, or why they could not be read.
    pub formats: Result<Vec<String>, String>,
}

/// The V4L2 cameras of this machine and the formats the daemon can use.
pub fn list_cameras() -> Result<Vec<CameraListing>, String> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{ApiBackend, FrameFormat, RequestedFormat, RequestedFormatType};
    let infos = nokhwa::query(ApiBackend::Video4Linux).map_err(|e| e.to_string())?;
    let links = stable_names();
    let mut out = Vec::new();
    for info in infos {
        let Ok(index) = info.index().as_index() else { continue };
        let device = format!("/dev/video{index}");
        let formats = nokhwa::Camera::with_backend(
            info.index().clone(),
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::None),
            ApiBackend::Video4Linux,
        )
        .and_then(|mut camera| camera.compatible_camera_formats())
        .map(|formats| {
            formats
                .into_iter()
                .filter(|f| matches!(f.format(), FrameFormat::MJPEG | FrameFormat::YUYV))
                .map(|f| format!("{}x{}@{} {}", f.width(), f.height(), f.frame_rate(), f.format()))
                .collect()
        })
        .map_err(|e| e.to_string());
        let stable = links.iter().filter(|(_, target)| *target == device).map(|(link, _)| link.clone()).collect();
        out.push(CameraListing { device, stable_names: stable, name: info.human_name(), formats });
    }
    Ok(out)
}

fn stable_names() -> Vec<(String, String)> {
    let mut names = Vec::new();
    for dir in ["/dev/v4l/by-id", "/dev/v4l/by-path"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::canonicalize(entry.path()) {
                names.push((entry.path().display().to_string(), target.display().to_string()));
            }
        }
    }
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_grey_and_colour_convert_like_bt601() {
        // Two pixels Y=16 (black) and Y=235 (white), neutral chroma.
        let rgb = yuyv_to_rgb(2, 1, &[16, 128, 235, 128]).unwrap();
        assert_eq!(rgb.data, [0, 0, 0, 255, 255, 255]);
        // Pure red in BT.601 limited range: Y=81 U=90 V=240.
        let red = yuyv_to_rgb(2, 1, &[81, 90, 81, 240]).unwrap();
        for px in red.data.chunks(3) {
            assert!(px[0] >= 250 && px[1] <= 5 && px[2] <= 5, "{px:?}");
        }
        assert!(yuyv_to_rgb(2, 2, &[0; 4]).is_none(), "short buffer refused");
        assert!(yuyv_to_rgb(3, 1, &[0; 6]).is_none(), "odd width refused");
    }

    #[test]
    fn device_paths_resolve_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("video7");
        std::fs::write(&node, b"").unwrap();
        let link = dir.path().join("usb-Logitech_C920-video-index0");
        std::os::unix::fs::symlink(&node, &link).unwrap();
        assert_eq!(v4l2_index(&link), Ok(7));
        let err = v4l2_index(&dir.path().join("missing")).unwrap_err();
        assert!(err.contains("missing") && err.contains("No such file"), "{err}");
        let other = dir.path().join("ttyUSB0");
        std::fs::write(&other, b"").unwrap();
        assert!(v4l2_index(&other).unwrap_err().contains("not a V4L2 device node"));
    }
}
