//! The live camera: unplug, replug and stall without hanging a scan.
//!
//! No camera is attached to the build machines (and no v4l2loopback module
//! can be loaded in their containers), so the unplug/replug/stall faults are
//! played by a test double behind the same `DeviceOpener` trait the V4L2
//! opener implements. The real nokhwa path is exercised for what a machine
//! without a camera can show: a missing device is a clear error, fast, and
//! the service still starts and answers uploads.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rxvision_daemon::camera::link::{CameraHealth, RETRY_MAX};
use rxvision_daemon::camera::v4l2::{CaptureDevice, DeviceOpener, RawFrame};
use rxvision_daemon::camera::{CameraError, FrameSource, LiveCamera, PixelFormat};

/// A camera on a USB cable the test can pull.
#[derive(Clone, Default)]
struct Cable {
    unplugged: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    opens: Arc<AtomicU32>,
}

struct FakeOpener(Cable);
struct FakeCamera {
    cable: Cable,
    shade: u8,
}

fn jpeg(shade: u8) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(32, 24, image::Rgb([shade, shade, shade]));
    let mut out = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
    out
}

impl DeviceOpener for FakeOpener {
    fn open(&self) -> Result<Box<dyn CaptureDevice>, String> {
        if self.0.unplugged.load(Ordering::SeqCst) {
            return Err("/dev/video0: No such file or directory (os error 2)".into());
        }
        let n = self.0.opens.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeCamera { cable: self.0.clone(), shade: 40 + 40 * n as u8 }))
    }
}

impl CaptureDevice for FakeCamera {
    fn next_frame(&mut self) -> Result<RawFrame, String> {
        std::thread::sleep(Duration::from_millis(20)); // ~50 fps
        while self.cable.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5)); // a wedged driver: no frame, no error
        }
        if self.cable.unplugged.load(Ordering::SeqCst) {
            return Err("No such device (os error 19)".into());
        }
        Ok(RawFrame::Mjpeg(jpeg(self.shade)))
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_unplugged_camera_answers_at_once_and_is_used_again_when_plugged_back() {
    let cable = Cable::default();
    let mut camera = LiveCamera::start("fake0".into(), FakeOpener(cable.clone()), Duration::from_secs(2));
    let frame = camera.next_frame().expect("a frame from a plugged-in camera");
    assert_eq!((frame.image.width, frame.image.height), (32, 24));
    assert!(frame.origin.starts_with("fake0 frame "), "{}", frame.origin);
    assert_eq!(frame.encoded, jpeg(40), "MJPEG frames are kept as the camera sent them");
    assert_eq!(camera.health(), Some(CameraHealth::Up));

    cable.unplugged.store(true, Ordering::SeqCst);
    wait_for("the camera going down", Duration::from_secs(2), || !camera.health().unwrap().is_up());
    let started = Instant::now();
    let err = camera.next_frame().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a scan waited {:?} on a missing camera",
        started.elapsed()
    );
    assert!(matches!(err, CameraError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("fake0") && err.to_string().contains("No such"), "{err}");
    // It keeps trying while unplugged (opens fail, nothing piles up).
    std::thread::sleep(Duration::from_millis(800));
    match camera.health().unwrap() {
        CameraHealth::Down { attempts, .. } => assert!(attempts >= 2, "{attempts} re-open attempts"),
        other => panic!("{other:?}"),
    }

    cable.unplugged.store(false, Ordering::SeqCst);
    wait_for("the camera coming back", RETRY_MAX + Duration::from_secs(1), || camera.health().unwrap().is_up());
    let frame = camera.next_frame().expect("a frame after the camera came back");
    assert_eq!(frame.encoded, jpeg(80), "the frame comes from the re-opened device");
    assert_eq!(cable.opens.load(Ordering::SeqCst), 2);
}

#[test]
fn a_wedged_camera_fails_the_scan_after_the_timeout_instead_of_hanging() {
    let cable = Cable::default();
    let mut camera = LiveCamera::start("fake1".into(), FakeOpener(cable.clone()), Duration::from_millis(300));
    camera.next_frame().expect("first frame");
    cable.frozen.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50)); // let the last frame in flight land
    let started = Instant::now();
    let err = camera.next_frame().unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(1), "waited {waited:?}");
    assert!(err.to_string().contains("no frame within 0.3 s"), "{err}");
    cable.frozen.store(false, Ordering::SeqCst);
    camera.next_frame().expect("frames again once the driver recovers");
}

#[test]
fn a_frame_is_never_older_than_the_request() {
    let cable = Cable::default();
    let mut camera = LiveCamera::start("fake2".into(), FakeOpener(cable), Duration::from_secs(2));
    let mut numbers = Vec::new();
    for _ in 0..3 {
        let frame = camera.next_frame().unwrap();
        numbers.push(frame.origin.rsplit(' ').next().unwrap().parse::<u64>().unwrap());
        std::thread::sleep(Duration::from_millis(60));
    }
    assert!(numbers.windows(2).all(|w| w[1] > w[0] + 1), "each scan got a frame captured after it asked: {numbers:?}");
}

#[test]
fn a_missing_v4l2_device_is_a_clear_error_through_nokhwa() {
    // A node name nokhwa will try to open (video<N>) but that is not there.
    let dir = tempfile::tempdir().unwrap();
    let stand_in = dir.path().join("video63");
    std::fs::write(&stand_in, b"").unwrap();
    if std::path::Path::new("/dev/video63").exists() {
        println!("skipped: this machine has a /dev/video63, the test needs it absent");
        return;
    }
    for (device, expected) in [
        (stand_in.as_path(), "63"),
        (std::path::Path::new("/dev/v4l/by-id/usb-absent-video-index0"), "usb-absent-video-index0"),
        (std::path::Path::new("/dev/null"), "not a V4L2 device node"),
    ] {
        let mut camera = LiveCamera::v4l2(device, PixelFormat::Mjpeg, [640, 480]);
        let started = Instant::now();
        let err = match camera.next_frame() {
            Err(CameraError::Unavailable(e)) => e,
            other => panic!("{device:?}: {other:?}"),
        };
        assert!(started.elapsed() < Duration::from_secs(3), "{device:?} took {:?}", started.elapsed());
        assert!(err.contains(expected), "{device:?}: {err}");
        assert!(err.contains(&device.display().to_string()), "the error names the configured device: {err}");
    }
}
