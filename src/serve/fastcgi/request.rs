//! FastCGI params → `http::Request`, stdin → its streaming body, and the
//! response → CGI-style stdout.

use crate::serve::Peer;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Every FastCGI param of the request, as the web server sent them
/// (`SCRIPT_FILENAME`, `DOCUMENT_ROOT`, `HTTPS`, ...): a request extension.
#[derive(Clone, Default)]
pub struct Params {
    pairs: Vec<(Bytes, Bytes)>,
}

impl Params {
    /// The value of the param `name`, if sent.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
    }

    /// The value of the param `name` as UTF-8, if sent and valid.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All params, in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.pairs
                    .iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// The HTTP client's address (`REMOTE_ADDR`, `REMOTE_PORT`), when the web
/// server sent it: a request extension, with axum's
/// `ConnectInfo<SocketAddr>` beside it (feature `axum`). It is the web
/// server's view: behind a proxy, the proxy's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// Why a request body ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is larger than [`Limits::max_body_bytes`](super::Limits::max_body_bytes).
    #[error("request body larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The web server aborted the request or closed the connection.
    #[error("request aborted by the web server")]
    Aborted,
}

/// The request body: the `FCGI_STDIN` stream, as it arrives.
pub struct RequestBody {
    rx: mpsc::Receiver<Result<Bytes, BodyError>>,
    done: bool,
    content_length: Option<u64>,
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Err(err))) => {
                self.done = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.content_length {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}

/// Chunks of stdin in flight to the handler, per request. With records of
/// at most 64 KiB this bounds a request's buffered body to 1 MiB; the
/// connection reads no further until the handler takes some.
const BODY_CHANNEL: usize = 16;

pub(crate) fn body_channel(
    content_length: Option<u64>,
) -> (mpsc::Sender<Result<Bytes, BodyError>>, RequestBody) {
    let (tx, rx) = mpsc::channel(BODY_CHANNEL);
    (
        tx,
        RequestBody {
            rx,
            done: false,
            content_length,
        },
    )
}

/// Params that cannot become an HTTP request: the request is answered
/// `400`, the connection serves on.
#[derive(Debug, thiserror::Error)]
#[error("bad FCGI_PARAMS: {0}")]
pub(crate) struct BadParams(String);

/// Builds the HTTP request the params describe (its body comes later).
pub(crate) fn request_from_params(params: Bytes, peer: Peer) -> Result<Request<()>, BadParams> {
    let pairs = super::record::parse_pairs(&params, "FCGI_PARAMS")
        .map_err(|err| BadParams(err.to_string()))?;
    let params = Params { pairs };
    let bad = |what: &str| BadParams(what.to_owned());

    let method = match params.get("REQUEST_METHOD") {
        Some(m) => Method::from_bytes(m).map_err(|_| bad("invalid REQUEST_METHOD"))?,
        None => return Err(bad("missing REQUEST_METHOD")),
    };
    let uri = match params.get("REQUEST_URI").filter(|u| !u.is_empty()) {
        Some(uri) => Uri::try_from(uri).map_err(|_| bad("invalid REQUEST_URI"))?,
        None => {
            let mut uri = BytesMut::new();
            uri.put_slice(params.get("SCRIPT_NAME").unwrap_or_default());
            uri.put_slice(params.get("PATH_INFO").unwrap_or_default());
            if uri.is_empty() {
                uri.put_u8(b'/');
            }
            if let Some(query) = params.get("QUERY_STRING").filter(|q| !q.is_empty()) {
                uri.put_u8(b'?');
                uri.put_slice(query);
            }
            Uri::try_from(&uri[..])
                .map_err(|_| bad("invalid SCRIPT_NAME, PATH_INFO or QUERY_STRING"))?
        }
    };
    let version = match params.get("SERVER_PROTOCOL") {
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/2.0" | b"HTTP/2") => Version::HTTP_2,
        Some(b"HTTP/3.0" | b"HTTP/3") => Version::HTTP_3,
        _ => Version::HTTP_11,
    };

    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let headers = req.headers_mut();
    for (name, value) in params.iter() {
        let header = match name {
            b"CONTENT_TYPE" => CONTENT_TYPE,
            b"CONTENT_LENGTH" => CONTENT_LENGTH,
            _ => match name.strip_prefix(b"HTTP_") {
                Some(rest) => {
                    let name: Vec<u8> = rest
                        .iter()
                        .map(|b| {
                            if *b == b'_' {
                                b'-'
                            } else {
                                b.to_ascii_lowercase()
                            }
                        })
                        .collect();
                    HeaderName::from_bytes(&name).map_err(|_| bad("invalid HTTP_* param name"))?
                }
                None => continue,
            },
        };
        if value.is_empty() && (header == CONTENT_TYPE || header == CONTENT_LENGTH) {
            continue;
        }
        let value = HeaderValue::from_bytes(value).map_err(|_| bad("invalid header value"))?;
        headers.append(header, value);
    }

    let remote = params
        .get_str("REMOTE_ADDR")
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| {
            let port = params
                .get_str("REMOTE_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            RemoteAddr(SocketAddr::new(ip, port))
        });
    let extensions = req.extensions_mut();
    if let Some(remote) = remote {
        #[cfg(feature = "axum")]
        extensions.insert(axum::extract::ConnectInfo(remote.0));
        extensions.insert(remote);
    }
    extensions.insert(peer);
    extensions.insert(params);
    Ok(req)
}

/// The declared body length, for the body's size hint.
pub(crate) fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The CGI response head: `Status:` line, headers, blank line.
pub(crate) fn cgi_head<B>(res: &Response<B>) -> BytesMut {
    let mut head = BytesMut::with_capacity(128);
    let status = res.status();
    head.put_slice(b"Status: ");
    head.put_slice(status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    for (name, value) in res.headers() {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"\r\n");
    head
}
