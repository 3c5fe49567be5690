//! Serve a tower service as a FastCGI 1.0 Responder (behind nginx's
//! `fastcgi_pass`, Apache's `mod_proxy_fcgi`, `cgi-fcgi`), until the first
//! [`Exit`].
//!
//! # Example
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tower::ServiceBuilder;
//! use tower_exit::serve::{fastcgi::RequestBody, ListenAddr, Listener};
//! use tower_exit::{Supervisor, TracingReporter};
//!
//! # async fn handler(_: http::Request<RequestBody>) -> Result<http::Response<String>, std::convert::Infallible> { todo!() }
//! #[tokio::main]
//! async fn main() -> std::io::Result<ExitCode> {
//!     let supervisor = Supervisor::new();
//!     let svc = ServiceBuilder::new()
//!         .layer(supervisor.stack().report(TracingReporter))
//!         .service_fn(handler);
//!     let listener = Listener::bind(&"unix:/run/app.sock".parse::<ListenAddr>().unwrap()).await?;
//!     let exit = tower_exit::serve::fastcgi(listener, svc, &supervisor)
//!         .with_signals()
//!         .await?;
//!     Ok(exit.into())
//! }
//! ```
//!
//! - Records are decoded without trusting the peer: a connection buffers at
//!   most one record, params and body have configurable [`Limits`].
//! - Keep-alive connections (`FCGI_KEEP_CONN`) and multiplexed request ids;
//!   `FCGI_GET_VALUES` is answered (`FCGI_MAX_CONNS`, `FCGI_MAX_REQS`,
//!   `FCGI_MPXS_CONNS`); `FCGI_ABORT_REQUEST` drops that request's future;
//!   unknown management records get `FCGI_UNKNOWN_TYPE`. When the server
//!   closes a kept connection (it drains, or a prefork worker's budget has
//!   no request left for it), the last `FCGI_END_REQUEST` is followed, in
//!   the same write, by an empty `FCGI_GET_VALUES_RESULT`: nginx drops a
//!   pooled connection with bytes after its END_REQUEST, so it never sends
//!   a next request on one that is closing (a POST there would fail 502).
//! - Params become an `http::Request`: method, `REQUEST_URI` (or
//!   `SCRIPT_NAME` + `PATH_INFO` + `QUERY_STRING`), `HTTP_*` headers,
//!   `CONTENT_TYPE`, `CONTENT_LENGTH`; the client's address is the
//!   [`RemoteAddr`] extension and every param is in the [`Params`]
//!   extension. Stdin streams in as the body ([`RequestBody`]).
//! - The response goes out CGI-style (`Status:` line, headers, body) in
//!   records of at most 65,535 bytes, then `FCGI_END_REQUEST`.
//! - Bad input (malformed or truncated records, another version) closes
//!   that connection with a log line; a bad request (unsupported role,
//!   oversized params, unusable params) is rejected with a log line; every
//!   other connection goes on. A peer outside the allow-list
//!   (`FCGI_WEB_SERVER_ADDRS`, as flup and php-fpm read it, or
//!   [`ServeFastCgi::allow`]) is refused.

mod conn;
pub(crate) mod record;
mod request;

pub use self::record::ProtocolError;
pub use self::request::{BodyError, Params, RemoteAddr, RequestBody};

use super::listen::{Listener, Peer};
use super::ServeService;
use crate::{Exit, Supervisor};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Limits on what a web server may make this server hold.
///
/// More limits may come: start from [`Limits::default`] and set what you
/// need, with the fields or the setters of the same names:
///
/// ```
/// use std::time::Duration;
/// use tower_exit::serve::fastcgi::Limits;
/// let limits = Limits::default()
///     .max_conns(256)
///     .read_timeout(Duration::from_secs(10));
/// assert_eq!(limits.max_conns, 256);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog
    /// (answered as `FCGI_MAX_CONNS`). Default 1024.
    pub max_conns: usize,
    /// Requests active at once on one connection (multiplexing); more are
    /// refused with `FCGI_OVERLOADED`. Default 64.
    pub max_requests_per_conn: usize,
    /// Bytes of `FCGI_PARAMS` per request; more is answered `431`. Default
    /// 64 KiB.
    pub max_params_bytes: usize,
    /// Bytes of request body; more ends the body with
    /// [`BodyError::TooLarge`]. Default 16 MiB.
    pub max_body_bytes: u64,
    /// How long a new connection may take to send its first complete
    /// `FCGI_BEGIN_REQUEST`; a connection that sends nothing is closed
    /// then, freeing its slot. Default 5 s (php-fpm's).
    pub begin_timeout: Duration,
    /// How long the web server may leave a request's `FCGI_PARAMS` or
    /// `FCGI_STDIN` stream without a byte; then the connection is closed
    /// and its requests ended (the handler's body reads fail). Default
    /// 30 s.
    pub read_timeout: Duration,
    /// How long a keep-alive connection may stay without an active request
    /// (nothing running, nothing received); then it is closed. Default
    /// 60 s.
    pub idle_timeout: Duration,
    /// The slowest the web server may send a request's input (`PARAMS`
    /// and `STDIN`), in bytes a second, after a grace: while a request's
    /// input is incomplete, the connection spends an allowance that
    /// starts at the grace and that each byte earns back at the rate (up
    /// to the grace plus what 64 KiB are worth); spent, the connection is
    /// closed and its requests ended (the handler's body read fails).
    /// Time the handler spends not reading its body does not count (the
    /// connection reads no further meanwhile). nginx buffers request
    /// bodies by default and sends them at once; with
    /// `fastcgi_request_buffering off` it relays a client's trickle, which
    /// this cuts. Default 240 bytes a second after 5 s (Kestrel's); a rate
    /// of 0 turns it off. Set with [`min_request_body_rate`](Self::min_request_body_rate).
    pub min_request_body_rate: (u64, Duration),
    /// The slowest the web server may take a response, in bytes a second,
    /// after a grace: a write that waits on it may wait the grace plus
    /// what the bytes it took since its previous wait are worth at the
    /// rate (at most 64 KiB of them); longer, and the connection is
    /// closed, logged at INFO. Default 240 bytes a second after 5 s; 0
    /// turns it off. Set with [`min_response_rate`](Self::min_response_rate).
    pub min_response_rate: (u64, Duration),
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 1024,
            max_requests_per_conn: 64,
            max_params_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            begin_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            min_request_body_rate: (240, Duration::from_secs(5)),
            min_response_rate: (240, Duration::from_secs(5)),
        }
    }
}

impl Limits {
    /// Sets [`min_request_body_rate`](Self::min_request_body_rate):
    /// `bytes_per_sec` (0: off) after `grace`.
    #[must_use]
    pub fn min_request_body_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_request_body_rate = (bytes_per_sec, grace);
        self
    }

    /// Sets [`min_response_rate`](Self::min_response_rate):
    /// `bytes_per_sec` (0: off) after `grace`.
    #[must_use]
    pub fn min_response_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_response_rate = (bytes_per_sec, grace);
        self
    }
}

/// A setter for each field of [`Limits`], written once.
macro_rules! limit_setters {
    ($($field:ident: $ty:ty),* $(,)?) => {
        impl Limits {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $field(mut self, value: $ty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

limit_setters! {
    max_conns: usize,
    max_requests_per_conn: usize,
    max_params_bytes: usize,
    max_body_bytes: u64,
    begin_timeout: Duration,
    read_timeout: Duration,
    idle_timeout: Duration,
}

/// Serves `service` as a FastCGI Responder on `listener` until `supervisor`
/// records an exit; see [`ServeFastCgi`].
pub fn fastcgi<S>(
    listener: impl Into<Listener>,
    service: S,
    supervisor: &Supervisor,
) -> ServeFastCgi<S> {
    ServeFastCgi {
        listener: listener.into(),
        service,
        supervisor: supervisor.clone(),
        drain: super::DrainOptions::default(),
        limits: Limits::default(),
        allow: None,
        budget: None,
    }
}

/// A FastCGI server that ends with the first [`Exit`]. Await it.
///
/// On the first exit the server stops accepting, lets the active requests
/// finish within the [grace period](Self::grace), closes each connection
/// once it is idle, and resolves to that exit.
#[derive(Debug)]
#[must_use = "a server does nothing until awaited"]
pub struct ServeFastCgi<S> {
    listener: Listener,
    service: S,
    supervisor: Supervisor,
    drain: super::DrainOptions,
    limits: Limits,
    allow: Option<Vec<IpAddr>>,
    budget: Option<std::sync::Arc<super::budget::Budget>>,
}

drain_options!(ServeFastCgi<S>, RequestBody);

impl<S> ServeFastCgi<S> {
    /// The limits (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serve at most `max` requests, then drain and resolve to
    /// [`Exit::success`] (a prefork worker recycling; see `serve::budget`).
    /// Exact for one request per connection (nginx's default); on a kept
    /// connection, a request beyond it is answered `503`.
    #[cfg(feature = "prefork")] // prefork is its one user
    pub(crate) fn max_requests(mut self, max: u64) -> Self {
        self.budget = Some(std::sync::Arc::new(super::budget::Budget::new(max.max(1))));
        self
    }

    /// Accept TCP connections only from these addresses (an IPv4 peer on a
    /// dual-stack listener, `::ffff:a.b.c.d`, matches `a.b.c.d`). Without it, the
    /// comma-separated `FCGI_WEB_SERVER_ADDRS` environment variable is used
    /// when set; when neither is, any peer is accepted. Unix-socket peers
    /// are governed by the socket's file permissions instead.
    pub fn allow(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.allow = Some(addrs.into_iter().collect());
        self
    }
}

/// Reads `FCGI_WEB_SERVER_ADDRS`: `None` when unset or empty.
fn allow_list_from_env() -> io::Result<Option<Vec<IpAddr>>> {
    let Ok(value) = std::env::var("FCGI_WEB_SERVER_ADDRS") else {
        return Ok(None);
    };
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .split(',')
        .map(|addr| {
            addr.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("FCGI_WEB_SERVER_ADDRS: {addr:?} is not an IP address"),
                )
            })
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

impl<S> ServeFastCgi<S> {
    async fn run(self) -> io::Result<Exit>
    where
        S: ServeService<RequestBody>,
    {
        let allow = match self.allow {
            Some(allow) => Some(allow),
            None => allow_list_from_env()?,
        }
        .map(|allow| allow.iter().map(IpAddr::to_canonical).collect::<Vec<_>>());
        self.drain.start(&self.supervisor)?;
        let max = super::slot_count(self.limits.max_conns);
        let slots = Arc::new(Semaphore::new(max as usize));
        let mut connections = JoinSet::new();
        let shutdown = self.drain.drain_signal(&self.supervisor);
        tokio::pin!(shutdown);

        loop {
            let Some((stream, peer, slot)) = super::next_connection(
                &self.listener,
                &slots,
                self.budget.as_deref(),
                &self.supervisor,
                // Idle FastCGI connections close at their own timeout.
                None,
                &mut None,
                shutdown.as_mut(),
            )
            .await
            else {
                break;
            };
            if let (Some(allow), Peer::Tcp(addr)) = (&allow, peer) {
                // On a dual-stack `[::]` listener an IPv4 peer shows as
                // `::ffff:a.b.c.d`: it matches the IPv4 entry (the list is
                // canonical too, see `run`).
                if !allow.contains(&addr.ip().to_canonical()) {
                    tracing::warn!(peer = %addr, "FastCGI peer not in the allow-list (FCGI_WEB_SERVER_ADDRS): connection refused");
                    if let Some(budget) = &self.budget {
                        budget.give_back();
                    }
                    continue;
                }
            }
            // Reap finished connection tasks as we go.
            while connections.try_join_next().is_some() {}
            // Rule 3: an exit escaping the service ends the server.
            let service = super::escape::Escapes::new(
                self.service.clone(),
                &self.supervisor,
                None,
                self.budget.as_ref(),
            );
            let limits = self.limits.clone();
            let drain = self.drain.drain_signal(&self.supervisor);
            connections.spawn(async move {
                let requests = service.conn().clone();
                let ended = conn::serve(stream, peer, service, &requests, limits, drain).await;
                match ended {
                    conn::Ended::Closed => tracing::debug!(%peer, "FastCGI connection closed"),
                    conn::Ended::Protocol(err) => {
                        tracing::warn!(%peer, %err, "malformed FastCGI input: connection closed")
                    }
                    conn::Ended::TimedOut(waiting) => {
                        tracing::info!(%peer, waiting, "FastCGI connection timed out: closed")
                    }
                    conn::Ended::Io(err) => {
                        tracing::debug!(%peer, %err, "FastCGI connection failed")
                    }
                }
                drop(slot);
            });
        }
        self.listener.remove_socket_if_bound_here();
        drop(self.listener);

        Ok(super::drain(connections, &slots, max, self.drain.grace, &self.supervisor).await)
    }
}
