//! One FastCGI connection: records in, requests out, multiplexed.
//!
//! The connection task owns all request state. Request tasks write their
//! stdout records to the shared writer and report back when done; only the
//! connection task writes `FCGI_END_REQUEST`, so an abort racing with the
//! end of a request can never produce two of them.

use super::record::{self, BeginRequest, Decoder, ProtocolError, ProtocolStatus, Record};
use super::request::{
    body_channel, cgi_head, content_length, request_from_params, BodyError, RequestBody,
};
use super::Limits;
use crate::serve::min_rate::{MinRate, RateWriter, ReadRate};
use crate::serve::{Peer, ServeService};
use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::Body;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tower::ServiceExt;
use tower_service::Service;

use crate::BoxError;

/// Records written to the web server, in whole records.
type Out = mpsc::Sender<Bytes>;

/// A request task's report: which request, which incarnation of that id.
struct Done {
    id: u16,
    seq: u64,
}

enum State {
    /// Collecting `FCGI_PARAMS`.
    Params { params: BytesMut },
    /// The handler runs; stdin flows into its body.
    Running {
        body: Option<mpsc::Sender<Result<Bytes, BodyError>>>,
        body_len: u64,
        task: AbortHandle,
    },
}

struct Active {
    state: State,
    seq: u64,
}

/// How a connection ended, for the log line.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The web server closed it, or it was done.
    Closed,
    /// The peer sent something that is not FastCGI.
    Protocol(ProtocolError),
    /// Reading or writing failed.
    Io(std::io::Error),
    /// The peer was silent too long while the server waited for what this
    /// says (a first request, request input, or a next request).
    TimedOut(&'static str),
}

/// Serves one connection until the web server closes it, a request without
/// `FCGI_KEEP_CONN` is done, the server's request budget has no unit left
/// for the connection's next request (`requests`), or draining starts and
/// no request is active.
pub(crate) async fn serve<IO, S>(
    io: IO,
    peer: Peer,
    service: S,
    requests: &crate::serve::in_flight::Conn,
    limits: Limits,
    drain: impl Future<Output = ()>,
) -> Ended
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: ServeService<RequestBody>,
{
    let (mut reader, writer) = tokio::io::split(io);
    let (out, out_rx) = mpsc::channel::<Bytes>(64);
    let (bytes_per_sec, grace) = limits.min_response_rate;
    let rate = MinRate {
        bytes_per_sec,
        grace,
    };
    let writer = RateWriter::new(writer, Some(rate), peer);
    let writing = tokio::spawn(write_all(writer, out_rx));
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(limits.max_requests_per_conn.max(1));
    tokio::pin!(drain);

    let mut conn = Conn {
        peer,
        limits,
        service,
        out,
        done_tx,
        active: HashMap::new(),
        aborting: 0,
        next_seq: 0,
        close_when_idle: false,
        kept: true,
    };
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut decoder = Decoder;
    // When the server started draining: a kept connection still takes the
    // next request for a moment (see NEXT_REQUEST_WAIT).
    let mut draining: Option<tokio::time::Instant> = None;
    let mut begun = false;
    let connected = tokio::time::Instant::now();
    // The last time the peer sent something or a request ended: the idle
    // and read timeouts count from here.
    let mut last_activity = connected;
    // The minimum rate of a request's input (see
    // `Limits::min_request_body_rate`).
    let (bytes_per_sec, grace) = conn.limits.min_request_body_rate;
    let mut input = ReadRate::new(Some(MinRate {
        bytes_per_sec,
        grace,
    }));
    // When an idle connection last looked whether its budget unit is
    // needed (see `reclaim_at`).
    let mut reclaim_checked = connected;

    let ended = loop {
        // Handle every whole record read so far; `buf` then holds less
        // than one record: a bounded buffer whatever the peer sends.
        let handled = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(record)) => {
                    if let Err(err) = conn.handle(record).await {
                        break Err(err);
                    }
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        if let Err(err) = handled {
            break Ended::Protocol(err);
        }
        // A connection accepted just before the drain gets the same wait:
        // its first request is likely on its way.
        let drain_waited = draining.is_some_and(|at| at.elapsed() >= NEXT_REQUEST_WAIT);
        if conn.active.is_empty() && (conn.close_when_idle || drain_waited) {
            break Ended::Closed;
        }
        begun |= conn.next_seq > 0;
        // Every wait on the peer is bounded: for its first request, for
        // the input of a request being received, for its next request.
        // While every active request has all its input, the wait is on the
        // handlers (bounded by the grace period when draining).
        let waiting = if !begun {
            Some(("a first FCGI_BEGIN_REQUEST", conn.limits.begin_timeout))
        } else if conn.awaits_input() {
            Some((
                "request input (FCGI_PARAMS or FCGI_STDIN)",
                conn.limits.read_timeout,
            ))
        } else if conn.active.is_empty() {
            Some(("a next request", conn.limits.idle_timeout))
        } else {
            None
        };
        let deadline = waiting.map(|(_, limit)| {
            // The first request counts from the connection's start: a peer
            // trickling a byte at a time does not get longer.
            if begun {
                last_activity + limit
            } else {
                connected + limit
            }
        });
        // The minimum input rate: a wait for input spends the allowance.
        let input_deadline = if conn.awaits_input() {
            input.wait_deadline()
        } else {
            input.reset();
            None
        };
        let (deadline, waiting) = match input_deadline {
            Some(at) if deadline.is_none_or(|deadline| at < deadline) => {
                let what = "request input at the minimum rate";
                (Some(at), Some((what, Duration::ZERO)))
            }
            _ => (deadline, waiting),
        };
        // Draining, with nothing active: the web server may already have
        // sent its next request on this kept connection; closing now would
        // fail it (nginx retries a GET on a new connection, not a POST).
        // It gets NEXT_REQUEST_WAIT to come; one that does is answered,
        // and the connection closed right after its END_REQUEST.
        let drain_deadline = draining
            .filter(|_| conn.active.is_empty())
            .map(|at| at + NEXT_REQUEST_WAIT);
        // Idle, holding a unit of the worker's budget for its next request
        // (`max_requests`): looked at after RECLAIM_MIN_IDLE (SILENT_MIN
        // before a first request), then every RECLAIM_RECHECK; closed if
        // the worker cannot accept for want of units (see below).
        let reclaim_at = (conn.active.is_empty() && buf.is_empty() && requests.holds_credit())
            .then(|| {
                let min = if begun {
                    crate::serve::in_flight::RECLAIM_MIN_IDLE
                } else {
                    crate::serve::in_flight::SILENT_MIN
                };
                (last_activity + min).max(reclaim_checked + RECLAIM_RECHECK)
            });
        let wake = [deadline, drain_deadline, reclaim_at]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => match decoder.decode_eof(&buf) {
                    Ok(()) => break Ended::Closed,
                    Err(err) => break Ended::Protocol(err),
                },
                Ok(n) => {
                    last_activity = tokio::time::Instant::now();
                    // Only input a request waited for earns (the wait was
                    // on: `input_deadline`).
                    if input_deadline.is_some() {
                        input.received(n);
                    }
                }
                Err(err) => break Ended::Io(err),
            },
            () = sleep_until(wake) => {
                let now = tokio::time::Instant::now();
                if drain_deadline.is_some_and(|at| now >= at) {
                    continue;
                }
                if deadline.is_none_or(|at| now < at) && reclaim_at.is_some_and(|at| now >= at) {
                    // The worker's open connections hold every unit of its
                    // budget: this idle one gives its unit back, so that
                    // the worker accepts again (a web server's pooled
                    // connection idle at the budget's end would otherwise
                    // hold it until its idle timeout). The one idle at
                    // least a second: nginx reuses its most recent first.
                    if requests.holds_a_needed_unit() {
                        tracing::debug!(peer = %conn.peer, "budget held by open connections: closing an idle FastCGI connection");
                        break Ended::Closed;
                    }
                    reclaim_checked = now;
                    continue;
                }
                break Ended::TimedOut(waiting.map_or("", |(what, _)| what));
            }
            Some(done) = done_rx.recv() => {
                // Draining: closed after this END_REQUEST (see above).
                conn.close_when_idle |= draining.is_some();
                // The worker's budget has no unit left for this
                // connection's next request: close it after this one's
                // END_REQUEST, so that nginx (which keeps a FastCGI
                // connection whatever the headers say) sends the next
                // request on a new connection, to another worker, instead
                // of getting a 503 here.
                conn.close_when_idle |= requests.closing();
                // Decided before the END_REQUEST is written: a kept
                // connection's last one carries the close notice.
                conn.finish(done).await;
                last_activity = tokio::time::Instant::now();
            }
            () = &mut drain, if draining.is_none() => draining = Some(tokio::time::Instant::now()),
        }
    };

    // Whatever is still running has lost its web server (or its
    // connection is being closed on a protocol error): drop it.
    for (_, active) in conn.active.drain() {
        if let State::Running { task, body, .. } = active.state {
            if let Some(body) = body {
                let _ = body.try_send(Err(BodyError::Aborted));
            }
            task.abort();
        }
    }
    drop(conn);
    match writing.await {
        Ok(Err(err)) if matches!(ended, Ended::Closed) => Ended::Io(err),
        _ => ended,
    }
}

async fn write_all<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut records: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    while let Some(bytes) = records.recv().await {
        writer.write_all(&bytes).await?;
        // Write out what is queued now, then flush once.
        while let Ok(bytes) = records.try_recv() {
            writer.write_all(&bytes).await?;
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Conn<S> {
    peer: Peer,
    limits: Limits,
    service: S,
    out: Out,
    done_tx: mpsc::Sender<Done>,
    active: HashMap<u16, Active>,
    /// Request tasks aborted whose `Done` has not arrived yet. They count
    /// against `max_requests_per_conn` until it does: the done channel has
    /// room for exactly that many, so no `Done` is ever dropped (a dropped
    /// `Done` of a live request would leave it without END_REQUEST, for
    /// good, and its slot taken).
    aborting: usize,
    next_seq: u64,
    close_when_idle: bool,
    /// Every request so far asked to keep the connection
    /// (`FCGI_KEEP_CONN`): the web server may reuse it, so a close must be
    /// announced (see [`record::put_close_notice`]).
    kept: bool,
}

impl<S> Conn<S>
where
    S: ServeService<RequestBody>,
{
    /// Whether a request is still being received: its params, or a body
    /// its handler may be waiting for.
    fn awaits_input(&self) -> bool {
        self.active.values().any(|active| match &active.state {
            State::Params { .. } => true,
            State::Running { body, .. } => body.is_some(),
        })
    }

    async fn send(&mut self, records: BytesMut) {
        // A failed send means the writer is gone (the peer closed); the
        // read side notices too and ends the connection.
        let _ = self.out.send(records.freeze()).await;
    }

    async fn end_request(&mut self, id: u16, status: ProtocolStatus) {
        let mut records = BytesMut::new();
        record::put_end_request(&mut records, id, 0, status);
        self.send(records).await;
    }

    async fn handle(&mut self, record: Record) -> Result<(), ProtocolError> {
        let id = record.request_id;
        if id == 0 {
            return self.management(record).await;
        }
        match record.kind {
            record::BEGIN_REQUEST => self.begin(id, &record.content).await,
            record::ABORT_REQUEST => {
                if let Some(active) = self.active.remove(&id) {
                    tracing::debug!(peer = %self.peer, id, "FastCGI request aborted by the web server");
                    if let State::Running { task, .. } = active.state {
                        task.abort();
                        // Its `Done` still comes (the task's guard sends it
                        // when the task ends, aborted or not).
                        self.aborting += 1;
                    }
                    self.end_request(id, ProtocolStatus::RequestComplete).await;
                }
                Ok(())
            }
            record::PARAMS => self.params(id, record.content).await,
            record::STDIN => self.stdin(id, record.content).await,
            // The Filter role's second stream: a Responder ignores it.
            record::DATA => Ok(()),
            kind => Err(ProtocolError::Unexpected {
                kind,
                request_id: id,
            }),
        }
    }

    async fn management(&mut self, record: Record) -> Result<(), ProtocolError> {
        if record.kind != record::GET_VALUES {
            let mut records = BytesMut::new();
            record::put_unknown_type(&mut records, record.kind);
            self.send(records).await;
            return Ok(());
        }
        let asked = record::parse_pairs(&record.content, "FCGI_GET_VALUES")?;
        let max_conns = self.limits.max_conns.to_string();
        let max_reqs = (self.limits.max_conns * self.limits.max_requests_per_conn).to_string();
        let mpxs = if self.limits.max_requests_per_conn > 1 {
            "1"
        } else {
            "0"
        };
        let answers = asked.iter().filter_map(|(name, _)| {
            let value = match name.as_ref() {
                b"FCGI_MAX_CONNS" => max_conns.as_bytes(),
                b"FCGI_MAX_REQS" => max_reqs.as_bytes(),
                b"FCGI_MPXS_CONNS" => mpxs.as_bytes(),
                _ => return None,
            };
            Some((name.as_ref(), value))
        });
        let content = record::encode_pairs(answers);
        let mut records = BytesMut::new();
        // Three short answers always fit one record.
        record::put_record(
            &mut records,
            record::GET_VALUES_RESULT,
            0,
            &content[..content.len().min(record::MAX_CONTENT)],
        );
        self.send(records).await;
        Ok(())
    }

    async fn begin(&mut self, id: u16, content: &[u8]) -> Result<(), ProtocolError> {
        let begin = BeginRequest::parse(content)?;
        if self.active.contains_key(&id) {
            return Err(ProtocolError::DuplicateRequest(id));
        }
        if !begin.keep_conn() {
            self.close_when_idle = true;
            self.kept = false;
        }
        if begin.role != record::ROLE_RESPONDER {
            tracing::warn!(peer = %self.peer, id, role = begin.role, "FastCGI role not supported (only Responder): request rejected");
            self.end_request(id, ProtocolStatus::UnknownRole).await;
            return Ok(());
        }
        if self.active.len() + self.aborting >= self.limits.max_requests_per_conn {
            tracing::warn!(peer = %self.peer, id, limit = self.limits.max_requests_per_conn, "too many requests on one FastCGI connection: request rejected");
            let status = if self.limits.max_requests_per_conn <= 1 {
                ProtocolStatus::CantMpxConn
            } else {
                ProtocolStatus::Overloaded
            };
            self.end_request(id, status).await;
            return Ok(());
        }
        self.next_seq += 1;
        self.active.insert(
            id,
            Active {
                state: State::Params {
                    params: BytesMut::new(),
                },
                seq: self.next_seq,
            },
        );
        Ok(())
    }

    async fn params(&mut self, id: u16, content: Bytes) -> Result<(), ProtocolError> {
        let Some(active) = self.active.get_mut(&id) else {
            // A request we already ended (rejected, aborted): its remaining
            // records are in flight. Not an error.
            return Ok(());
        };
        let State::Params { params } = &mut active.state else {
            return Err(ProtocolError::Unexpected {
                kind: record::PARAMS,
                request_id: id,
            });
        };
        if !content.is_empty() {
            if params.len() + content.len() > self.limits.max_params_bytes {
                tracing::warn!(peer = %self.peer, id, limit = self.limits.max_params_bytes, "FastCGI params larger than the limit: request rejected with 431");
                self.active.remove(&id);
                self.reject(id, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                    .await;
                return Ok(());
            }
            params.extend_from_slice(&content);
            return Ok(());
        }
        let params = std::mem::take(params).freeze();
        let req = match request_from_params(params, self.peer) {
            Ok(req) => req,
            Err(err) => {
                tracing::warn!(peer = %self.peer, id, %err, "FastCGI request rejected with 400");
                self.active.remove(&id);
                self.reject(id, StatusCode::BAD_REQUEST).await;
                return Ok(());
            }
        };
        let (body_tx, body) = body_channel(content_length(&req));
        let req = req.map(|()| body);
        let seq = active.seq;
        let task = tokio::spawn(respond(
            self.service.clone(),
            req,
            id,
            self.out.clone(),
            DoneGuard {
                done: Some(Done { id, seq }),
                tx: self.done_tx.clone(),
            },
        ));
        active.state = State::Running {
            body: Some(body_tx),
            body_len: 0,
            task: task.abort_handle(),
        };
        Ok(())
    }

    async fn stdin(&mut self, id: u16, content: Bytes) -> Result<(), ProtocolError> {
        let Some(active) = self.active.get_mut(&id) else {
            return Ok(());
        };
        let State::Running { body, body_len, .. } = &mut active.state else {
            return Err(ProtocolError::Unexpected {
                kind: record::STDIN,
                request_id: id,
            });
        };
        let Some(sender) = body else {
            // The body already ended (or went over the limit).
            return Ok(());
        };
        if content.is_empty() {
            *body = None;
            return Ok(());
        }
        *body_len += content.len() as u64;
        if *body_len > self.limits.max_body_bytes {
            let limit = self.limits.max_body_bytes;
            tracing::warn!(peer = %self.peer, id, limit, "FastCGI request body larger than the limit: the handler gets an error");
            let _ = sender.try_send(Err(BodyError::TooLarge { limit }));
            *body = None;
            return Ok(());
        }
        let sender = sender.clone();
        // Back-pressure: wait while the handler has a full channel. If it
        // never reads and finishes instead, the send fails and we go on.
        let _ = sender.send(Ok(content)).await;
        Ok(())
    }

    /// A request ended by its task: write its end, unless the id was since
    /// aborted (and maybe reused).
    async fn finish(&mut self, done: Done) {
        let current = self.active.get(&done.id).map(|a| a.seq);
        if current == Some(done.seq) {
            self.active.remove(&done.id);
            let mut records = BytesMut::new();
            record::put_end_request(&mut records, done.id, 0, ProtocolStatus::RequestComplete);
            if self.close_when_idle && self.kept && self.active.is_empty() {
                // The connection closes after this END_REQUEST. nginx would
                // put it back in its pool and may send the next request on
                // it before our FIN arrives: a POST it sent there fails
                // (502), as it does not retry one. Bytes after END_REQUEST,
                // in the same write, make nginx drop the connection instead
                // of keeping it.
                record::put_close_notice(&mut records);
            }
            self.send(records).await;
        } else {
            // An aborted task, ending late: its END_REQUEST was sent at the
            // abort, and the id may now belong to a newer request.
            self.aborting = self.aborting.saturating_sub(1);
        }
    }

    /// Answers a request the server refuses, with an HTTP status.
    async fn reject(&mut self, id: u16, status: StatusCode) {
        let mut res = Response::new(());
        *res.status_mut() = status;
        let mut records = BytesMut::new();
        record::put_stream(&mut records, record::STDOUT, id, &cgi_head(&res));
        record::put_record(&mut records, record::STDOUT, id, b"");
        record::put_end_request(&mut records, id, 0, ProtocolStatus::RequestComplete);
        self.send(records).await;
    }
}

/// How often an idle connection holding a unit of its worker's budget looks
/// again whether the worker needs it (see `serve`).
const RECLAIM_RECHECK: Duration = Duration::from_millis(250);

/// How long a kept connection stays open once the server drains, for a
/// request its web server may already have sent (as `serve::http` waits
/// for an HTTP/1 one).
const NEXT_REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tells the connection a request task ended, however it ended: finished,
/// panicked or aborted (dropped). `try_send` cannot fail for lack of room:
/// the channel has a place for every request the connection allows, and
/// an aborted task keeps its place until its `Done` is received
/// (`Conn::aborting`).
struct DoneGuard {
    done: Option<Done>,
    tx: mpsc::Sender<Done>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.tx.try_send(done);
        }
    }
}

/// Runs one request and writes its response as stdout records.
async fn respond<S, B>(service: S, req: Request<RequestBody>, id: u16, out: Out, done: DoneGuard)
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let _done = done;
    let res = match service.oneshot(req).await.map_err(Into::into) {
        Ok(res) => res,
        Err(err) => {
            let err: BoxError = err;
            tracing::error!(id, error = %err, "service error: answering 500");
            let mut res = Response::new(());
            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            let mut records = BytesMut::new();
            record::put_stream(&mut records, record::STDOUT, id, &cgi_head(&res));
            record::put_record(&mut records, record::STDOUT, id, b"");
            let _ = out.send(records.freeze()).await;
            return;
        }
    };
    let mut records = BytesMut::new();
    record::put_stream(&mut records, record::STDOUT, id, &cgi_head(&res));
    if out.send(records.freeze()).await.is_err() {
        return;
    }
    let body = res.into_body();
    tokio::pin!(body);
    loop {
        let frame: Result<_, BoxError> =
            match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                Some(frame) => frame.map_err(Into::into),
                None => break,
            };
        match frame {
            Ok(frame) => {
                if let Ok(mut data) = frame.into_data() {
                    use bytes::Buf;
                    let data = data.copy_to_bytes(data.remaining());
                    let mut records = BytesMut::new();
                    record::put_stream(&mut records, record::STDOUT, id, &data);
                    if !records.is_empty() && out.send(records.freeze()).await.is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                let err: BoxError = err;
                tracing::warn!(id, error = %err, "response body failed: response cut short");
                break;
            }
        }
    }
    let mut records = BytesMut::new();
    record::put_record(&mut records, record::STDOUT, id, b"");
    let _ = out.send(records.freeze()).await;
}
