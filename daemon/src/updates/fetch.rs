//! Getting signed metadata and targets from the fleet's TUF repository.
//!
//! - [`HttpTransport`]: tough's transport over plain HTTP/1.1 (hyper, one
//!   connection per file). Every byte it returns is checked by tough
//!   against signed metadata, so the channel needs no trust of its own;
//!   each response is capped ([`MAX_METADATA_BYTES`]) so an endless reply
//!   cannot exhaust memory.
//! - [`refresh`]: loads the repository with the pinned root, tough's
//!   datastore under the state directory (the newest metadata it trusted,
//!   so replayed older metadata is refused across restarts), and safe
//!   expiration enforcement.
//! - [`download`]: a target into a partial file that later calls resume
//!   (`Range: bytes=N-`), never beyond the length signed metadata declares,
//!   and verified against its signed SHA-256 once complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tough::{Repository, RepositoryLoader, Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Most bytes one metadata response may hold.
pub const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// How long one request may take to answer its head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an update could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The repository could not be reached or answered strangely (retried later).
    #[error("{0}")]
    Network(String),
    /// Signed metadata or a target failed verification (an attack, or a broken repository).
    #[error("{0}")]
    Refused(String),
}

/// An HTTP response: status and, for 200/206, a bounded body stream.
struct Response {
    status: u16,
    body: hyper::body::Incoming,
}

async fn get(url: &Url, range_from: Option<u64>) -> Result<Response, String> {
    if url.scheme() != "http" {
        return Err(format!("{url}: only http:// repositories are supported (TUF signs every byte)"));
    }
    let host = url.host_str().ok_or_else(|| format!("{url}: no host"))?.to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, connect)
        .await
        .map_err(|_| format!("{url}: connecting timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut request = hyper::Request::builder().method("GET").uri(path).header("host", format!("{host}:{port}"));
    if let Some(from) = range_from {
        request = request.header("range", format!("bytes={from}-"));
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| format!("{url}: {e}"))?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| format!("{url}: no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(Response { status: response.status().as_u16(), body: response.into_body() })
}

/// Why the repository could not be asked (a connection, a timeout, an HTTP
/// status): carried as the cause of the transport's errors, so that a check
/// tells it apart from what tough refuses in the bytes that did arrive
/// (tough reports a hash mismatch or an oversized file as a transport error too).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Whether `error` (tough's) comes from the repository being unreachable.
fn unreachable(error: &tough::error::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<Unreachable>().is_some() {
            return true;
        }
        if let Some(t) = e.downcast_ref::<TransportError>() {
            if t.kind() == TransportErrorKind::FileNotFound {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// tough's transport over plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpTransport;

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let other = |e: String| TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), Unreachable(e));
        let mut response = get(&url, None).await.map_err(other)?;
        match response.status {
            200 => {}
            404 => return Err(TransportError::new(TransportErrorKind::FileNotFound, url.clone())),
            status => return Err(other(format!("HTTP {status}"))),
        }
        let mut body = Vec::new();
        while let Some(frame) = response.body.frame().await {
            let frame = frame.map_err(|e| other(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                if body.len() + data.len() > MAX_METADATA_BYTES {
                    // Endless data: refused, not merely unreachable.
                    let why = format!("more than {MAX_METADATA_BYTES} bytes");
                    return Err(TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), why));
                }
                body.extend_from_slice(data);
            }
        }
        let stream = futures_util::stream::once(std::future::ready(Ok(Bytes::from(body))));
        Ok(Box::pin(stream))
    }
}

/// Where the repository is and what the device trusts.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// `<base>/tuf/metadata/` and `<base>/tuf/targets/`.
    pub base: Url,
    /// The pinned `root.json`.
    pub root_file: PathBuf,
    /// tough's datastore (the newest trusted metadata).
    pub datastore: PathBuf,
}

impl RepositoryConfig {
    /// The metadata URL.
    pub fn metadata_url(&self) -> Url {
        self.base.join("tuf/metadata/").expect("a base URL takes a relative path")
    }

    /// The targets URL.
    pub fn targets_url(&self) -> Url {
        self.base.join("tuf/targets/").expect("a base URL takes a relative path")
    }
}

/// Loads and verifies the repository's newest metadata. A failure to reach
/// it is [`FetchError::Network`]; anything tough refuses (a bad signature,
/// expired or replayed metadata, a root rotation below threshold, mixed
/// versions …) is [`FetchError::Refused`].
pub async fn refresh(config: &RepositoryConfig) -> Result<Repository, FetchError> {
    let root = std::fs::read(&config.root_file)
        .map_err(|e| FetchError::Refused(format!("the pinned root {}: {e}", config.root_file.display())))?;
    std::fs::create_dir_all(&config.datastore)
        .map_err(|e| FetchError::Refused(format!("{}: {e}", config.datastore.display())))?;
    let loaded = RepositoryLoader::new(&root, config.metadata_url(), config.targets_url())
        .transport(HttpTransport)
        .datastore(&config.datastore)
        .load()
        .await;
    loaded.map_err(|e| {
        if unreachable(&e) {
            // Not reached, or not answering: try again later.
            FetchError::Network(e.to_string())
        } else {
            FetchError::Refused(e.to_string())
        }
    })
}

/// Downloads the target `name` (signed `length` and `sha256`) into
/// `<downloads>/<sha256>.partial`, resuming what an earlier call left; the
/// complete, verified file is `<downloads>/<sha256>`. A response beyond the
/// declared length, or bytes with another hash, are refused and removed.
pub async fn download(
    config: &RepositoryConfig,
    name: &str,
    length: u64,
    sha256: &str,
    downloads: &Path,
) -> Result<PathBuf, FetchError> {
    let done = downloads.join(sha256);
    if done.is_file() {
        return Ok(done);
    }
    std::fs::create_dir_all(downloads).map_err(|e| FetchError::Network(format!("{}: {e}", downloads.display())))?;
    let partial = downloads.join(format!("{sha256}.partial"));
    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let refuse = |why: String| {
        let _ = std::fs::remove_file(&partial);
        FetchError::Refused(why)
    };
    if have > length {
        return Err(refuse(format!("{name}: a partial download longer than the signed {length} bytes")));
    }
    if have < length {
        let url =
            config.targets_url().join(&format!("{sha256}.{name}")).map_err(|e| FetchError::Refused(e.to_string()))?;
        let mut response = get(&url, (have > 0).then_some(have)).await.map_err(FetchError::Network)?;
        let append = match response.status {
            206 => true,
            200 => false,
            status => return Err(FetchError::Network(format!("{url}: HTTP {status}"))),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&partial)
            .map_err(|e| FetchError::Network(format!("{}: {e}", partial.display())))?;
        let mut written = if append { have } else { 0 };
        while let Some(frame) = response.body.frame().await {
            let frame = frame.map_err(|e| FetchError::Network(format!("{url}: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if written + data.len() as u64 > length {
                    return Err(refuse(format!("{name}: the repository sent more than the signed {length} bytes")));
                }
                file.write_all(data).map_err(|e| FetchError::Network(format!("{}: {e}", partial.display())))?;
                written += data.len() as u64;
            }
        }
        file.sync_all().map_err(|e| FetchError::Network(format!("{}: {e}", partial.display())))?;
        if written < length {
            return Err(FetchError::Network(format!("{name}: {written} of {length} bytes so far")));
        }
    }
    let bytes = std::fs::read(&partial).map_err(|e| FetchError::Network(format!("{}: {e}", partial.display())))?;
    let actual = rxvision_models::bundle::sha256_hex(&bytes);
    if actual != sha256 {
        return Err(refuse(format!("{name}: SHA-256 {actual} is not the signed {sha256}")));
    }
    std::fs::rename(&partial, &done).map_err(|e| FetchError::Network(format!("{}: {e}", done.display())))?;
    Ok(done)
}
