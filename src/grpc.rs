//! gRPC's form of the answers the exit-aware layers and the servers give on
//! their own, for a request whose `content-type` is `application/grpc*`: a
//! gRPC client reads a status from `grpc-status`, not from the HTTP status,
//! and takes an HTTP `503` for a broken server (grpcio: `UNAVAILABLE
//! 'Received http2 header with status: 503'`, tonic: `INTERNAL`, protocol
//! error).
//!
//! - An exit: a trailers-only response, HTTP `200`, `grpc-status: 14`
//!   (`UNAVAILABLE`: clients may retry it elsewhere, the call was not
//!   processed to its end) and `grpc-message` naming the exit.
//! - A real panic: `grpc-status: 13` (`INTERNAL`).
//! - A stream still open at the drain's last call (see [`LastCall`]): its
//!   trailers say `grpc-status: 14`, rather than a reset.
//!
//! The request is told apart when it is called (the layers keep nothing
//! else of it): a method compare for every request, and the `content-type`
//! lookup only for `POST`s, as every gRPC call is.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::futures::OwnedNotified;

use crate::{Exit, Supervisor};

/// A gRPC request, by the protocol its `content-type` names; its answers
/// say the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grpc {
    /// `application/grpc`, `application/grpc+proto`, `+json`...
    Native,
    /// `application/grpc-web`, `application/grpc-web+proto`...
    Web,
    /// `application/grpc-web-text` (base64 bodies; a trailers-only answer
    /// has no body to encode).
    WebText,
}

/// `grpc-status` codes (the gRPC spec's `statuscodes.md`).
pub(crate) const INTERNAL: u16 = 13;
pub(crate) const UNAVAILABLE: u16 = 14;

/// What `grpc-message` says of a stream ended by the drain.
pub(crate) const SHUTTING_DOWN: &str = "the server is shutting down";

/// The gRPC spec's percent-encoding of `grpc-message`: everything outside
/// printable ASCII (`0x20..=0x7E`), and `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

impl Grpc {
    /// The protocol of `req`, if it is a gRPC call.
    #[inline(always)]
    pub(crate) fn of<B>(req: &Request<B>) -> Option<Grpc> {
        if req.method() != Method::POST {
            return None;
        }
        Grpc::of_post(req.headers())
    }

    fn of_post(headers: &HeaderMap) -> Option<Grpc> {
        let rest = headers
            .get(header::CONTENT_TYPE)?
            .as_bytes()
            .strip_prefix(b"application/grpc")?;
        match rest {
            [] | [b'+' | b';', ..] => Some(Grpc::Native),
            _ if rest.starts_with(b"-web-text") => Some(Grpc::WebText),
            _ if rest.starts_with(b"-web") => Some(Grpc::Web),
            _ => None,
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Grpc::Native => "application/grpc",
            Grpc::Web => "application/grpc-web+proto",
            Grpc::WebText => "application/grpc-web-text+proto",
        })
    }

    /// A trailers-only answer: HTTP `200`, the status in the headers,
    /// `body` empty.
    pub(crate) fn status<T>(self, body: T, code: u16, message: &str) -> Response<T> {
        let mut res = Response::new(body);
        *res.status_mut() = StatusCode::OK;
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, self.content_type());
        put_status(headers, code, message);
        res
    }

    /// The answer to an exit: `UNAVAILABLE`, the exit named in
    /// `grpc-message` and carried in the extensions; `connection: close`
    /// on HTTP/1 (gRPC-Web), as for the HTTP answer.
    pub(crate) fn exit<T>(self, body: T, version: Version, exit: Exit) -> Response<T> {
        let mut res = self.status(body, UNAVAILABLE, &exit.to_string());
        if version <= Version::HTTP_11 {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res.extensions_mut().insert(exit);
        res
    }

    /// The answer to a real panic: `INTERNAL`, nothing of the panic said.
    pub(crate) fn panic(self) -> Response<Bytes> {
        self.status(Bytes::new(), INTERNAL, "Internal Server Error")
    }

    /// A gRPC panic answer of a [`ResponseForPanic`](crate::catch_panic::ResponseForPanic)
    /// (which knows only `application/grpc`) in this request's protocol.
    pub(crate) fn in_kind<T>(self, mut res: Response<T>) -> Response<T> {
        if self != Grpc::Native {
            let headers = res.headers_mut();
            let is_grpc = headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
            if is_grpc {
                headers.insert(header::CONTENT_TYPE, self.content_type());
            }
        }
        res
    }
}

fn put_status(headers: &mut HeaderMap, code: u16, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code));
    let message = utf8_percent_encode(message, GRPC_MESSAGE).to_string();
    if let Ok(message) = HeaderValue::try_from(message) {
        headers.insert("grpc-message", message);
    }
}

/// The default gRPC answer to a panic, `application/grpc`.
pub(crate) fn panic_response() -> Response<Bytes> {
    Grpc::Native.panic()
}

/// For the body of a gRPC response: at the drain's last call (a moment
/// before its grace period ends, see `serve::last_call_at`), a stream
/// still open ends with trailers `grpc-status: 14`, between two messages,
/// where a dropped connection would reset it. The client learns that the
/// server went away, not that the call broke.
///
/// In every response body (off for all but gRPC calls): 16 bytes, and no
/// allocation until a gRPC body first waits (a unary call's body rarely
/// does), then one, the wait for the last call.
pub(crate) struct LastCall {
    wait: Option<Pin<Box<OwnedNotified>>>,
    stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Not a gRPC call.
    Off,
    /// A gRPC call, streaming.
    On,
    /// The trailers were given: the stream is over.
    Said,
}

impl std::fmt::Debug for LastCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastCall")
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl LastCall {
    /// For a gRPC call's body (`grpc`), or off.
    #[inline(always)]
    pub(crate) fn new(grpc: bool) -> Self {
        LastCall {
            wait: None,
            stage: if grpc { Stage::On } else { Stage::Off },
        }
    }

    /// Polls a response body's next frame (`poll`) under the last call:
    /// the trailers once it came (then the end), else the body's frame,
    /// waiting for the call too while the body waits.
    #[inline]
    pub(crate) fn poll_frame<D, E>(
        &mut self,
        supervisor: &Supervisor,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<Option<Result<Frame<D>, E>>>,
    ) -> Poll<Option<Result<Frame<D>, E>>> {
        if let Some(end) = self.before(supervisor) {
            return Poll::Ready(end);
        }
        let polled = poll(cx);
        if polled.is_pending() {
            self.pending(supervisor, cx);
        }
        polled
    }

    /// Before the inner body is polled: `Some` when the stream ends now
    /// (the trailers, then the end), `None` to poll the inner body.
    #[inline]
    fn before<D, E>(&mut self, supervisor: &Supervisor) -> Option<Option<Result<Frame<D>, E>>> {
        match self.stage {
            Stage::Off => None,
            Stage::Said => Some(None),
            Stage::On if !supervisor.last_called() => None,
            Stage::On => {
                self.stage = Stage::Said;
                self.wait = None;
                let mut trailers = HeaderMap::new();
                put_status(&mut trailers, UNAVAILABLE, SHUTTING_DOWN);
                Some(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    /// The inner body waits: a gRPC call's is woken at the last call too.
    #[inline]
    fn pending(&mut self, supervisor: &Supervisor, cx: &mut Context<'_>) {
        if self.stage != Stage::On {
            return;
        }
        let wait = self
            .wait
            .get_or_insert_with(|| Box::pin(supervisor.last_call()));
        if wait.as_mut().poll(cx).is_ready() {
            // Called since `before` looked: poll again at once.
            cx.waker().wake_by_ref();
        }
    }

    /// The stream ended here.
    pub(crate) fn said(&self) -> bool {
        self.stage == Stage::Said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: Method, content_type: Option<&str>) -> Option<Grpc> {
        let mut req = Request::builder().method(method);
        if let Some(content_type) = content_type {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        Grpc::of(&req.body(()).unwrap())
    }

    #[test]
    fn grpc_calls_are_told_by_method_and_content_type() {
        for (content_type, expected) in [
            ("application/grpc", Some(Grpc::Native)),
            ("application/grpc+proto", Some(Grpc::Native)),
            ("application/grpc;charset=utf-8", Some(Grpc::Native)),
            ("application/grpc-web", Some(Grpc::Web)),
            ("application/grpc-web+proto", Some(Grpc::Web)),
            ("application/grpc-web-text", Some(Grpc::WebText)),
            ("application/grpcx", None),
            ("application/json", None),
            ("text/plain", None),
        ] {
            assert_eq!(
                kind(Method::POST, Some(content_type)),
                expected,
                "{content_type}"
            );
        }
        assert_eq!(kind(Method::POST, None), None);
        assert_eq!(kind(Method::GET, Some("application/grpc")), None);
    }

    #[test]
    fn an_exit_is_a_trailers_only_unavailable_with_its_message_percent_encoded() {
        let exit = Exit::new(4).with_message("100% new (é)\n");
        let res = Grpc::Web.exit((), Version::HTTP_11, exit.clone());
        assert_eq!(res.status(), StatusCode::OK);
        let headers = res.headers();
        assert_eq!(headers["content-type"], "application/grpc-web+proto");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["grpc-message"], "exit 4: 100%25 new (%C3%A9)%0A");
        assert_eq!(headers["connection"], "close");
        assert_eq!(res.extensions().get::<Exit>(), Some(&exit));
        let res = Grpc::Native.exit((), Version::HTTP_2, exit);
        assert!(res.headers().get("connection").is_none());
    }
}
