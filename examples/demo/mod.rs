//! What `examples/http.rs`, `examples/fastcgi.rs` and `examples/prefork.rs` share: the routes, the
//! stack, and `--listen ADDR`.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::future::Future;
use std::time::Duration;
use tower::util::Either;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_exit::fork::{self, Forked};
use tower_exit::report::TracingReporter;
use tower_exit::serve::ListenAddr;
use tower_exit::{Exit, ForkGuardLayer, ResponseBody, Supervisor};

pub type Reply = Result<Response<Full<Bytes>>, BoxError>;

/// The command line: `--listen ADDR` (`HOST:PORT` or `unix:PATH`), and for
/// the prefork demo `--workers N`, `--max-requests M`, `--stop-all-code C`.
#[allow(dead_code)]
pub struct Args {
    pub listen: ListenAddr,
    pub workers: usize,
    pub max_requests: Option<u64>,
    pub stop_all_code: i32,
    /// `--restart-intensity N/SECS`: stop after N worker failures in SECS.
    pub restart_intensity: Option<(u32, Duration)>,
    /// `--header-timeout SECS` (HTTP demo).
    pub header_timeout: Option<Duration>,
    /// `--max-connections N` (HTTP demo).
    pub max_connections: Option<usize>,
    /// Whether `--listen` was given (prefork: without it, sockets passed by
    /// systemd are used when there are some).
    pub listen_given: bool,
    /// `--timeout SECS` (prefork): kill a worker silent for that long.
    pub timeout: Option<Duration>,
    /// `--max-rss MIB` (prefork): recycle a worker past that.
    pub max_rss_mib: Option<u64>,
    /// `--max-requests-jitter N` (prefork).
    pub max_requests_jitter: Option<u64>,
    /// `--socket-mode OCTAL`: a unix socket's mode (php-fpm's `listen.mode`).
    pub socket_mode: Option<u32>,
    /// `--socket-group NAME|GID`: a unix socket's group (`listen.group`).
    pub socket_group: Option<u32>,
    /// `--shutdown-delay SECS`: serve on that long after SIGTERM, not
    /// ready, before draining.
    pub shutdown_delay: Duration,
    /// `--min-response-rate BYTES/SECS` (HTTP): the slowest a client may
    /// read, after a grace.
    pub min_response_rate: Option<(u64, Duration)>,
    /// `--min-request-body-rate BYTES/SECS` (HTTP): the slowest a client
    /// may send a request body, after a grace.
    pub min_request_body_rate: Option<(u64, Duration)>,
    /// `--fastcgi` (prefork): workers serve FastCGI, not HTTP.
    pub fastcgi: bool,
    /// `--rollback-window SECS` (prefork): how long an old master stays
    /// after an upgrade's hand-over.
    pub rollback_window: Option<Duration>,
}

/// Ends `main`: the exit's code, or a startup error in plain words and
/// status 1 (not the `Debug` form `main` would print for an `Err`).
pub fn finish(result: std::io::Result<Exit>) -> std::process::ExitCode {
    match result {
        Ok(exit) => {
            tracing::info!(%exit, "exiting");
            exit.into()
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn parse_args(default_listen: &str, prefork: bool) -> Args {
    let mut args = std::env::args().skip(1);
    let mut listen = default_listen.to_owned();
    let mut parsed = Args {
        listen: ListenAddr::Tcp(String::new()),
        workers: 2,
        max_requests: None,
        stop_all_code: 3,
        restart_intensity: None,
        header_timeout: None,
        max_connections: None,
        listen_given: false,
        timeout: None,
        max_rss_mib: None,
        max_requests_jitter: None,
        socket_mode: None,
        socket_group: None,
        shutdown_delay: Duration::ZERO,
        min_response_rate: None,
        min_request_body_rate: None,
        fastcgi: false,
        rollback_window: None,
    };
    let number = |flag: &str, value: Option<String>| -> u64 {
        value
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&format!("{flag} needs a number"), prefork))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                parsed.listen_given = true;
                listen = args
                    .next()
                    .unwrap_or_else(|| usage("--listen needs a value", prefork))
            }
            "--fastcgi" if prefork => parsed.fastcgi = true,
            "--timeout" if prefork => {
                parsed.timeout = Some(Duration::from_secs(number("--timeout", args.next())))
            }
            "--max-rss" if prefork => parsed.max_rss_mib = Some(number("--max-rss", args.next())),
            "--max-requests-jitter" if prefork => {
                parsed.max_requests_jitter = Some(number("--max-requests-jitter", args.next()))
            }
            "--header-timeout" if !prefork => {
                parsed.header_timeout =
                    Some(Duration::from_secs(number("--header-timeout", args.next())))
            }
            "--max-connections" if !prefork => {
                parsed.max_connections = Some(
                    number("--max-connections", args.next())
                        .try_into()
                        .unwrap_or(usize::MAX),
                )
            }
            "--workers" if prefork => {
                // Out-of-range values are the library's to refuse.
                parsed.workers =
                    usize::try_from(number("--workers", args.next())).unwrap_or(usize::MAX)
            }
            "--restart-intensity" if prefork => {
                parsed.restart_intensity = per_seconds(args.next())
                    .or_else(|| usage("--restart-intensity takes CRASHES/SECONDS", prefork));
            }
            "--max-requests" if prefork => {
                parsed.max_requests = Some(number("--max-requests", args.next()))
            }
            "--stop-all-code" if prefork => {
                let code = number("--stop-all-code", args.next());
                parsed.stop_all_code = match i32::try_from(code) {
                    Ok(code @ 1..=255) => code,
                    _ => usage("--stop-all-code takes a status from 1 to 255", prefork),
                }
            }
            "--min-response-rate" => {
                parsed.min_response_rate = per_seconds(args.next())
                    .or_else(|| usage("--min-response-rate takes BYTES/SECONDS", prefork));
            }
            "--min-request-body-rate" => {
                parsed.min_request_body_rate = per_seconds(args.next())
                    .or_else(|| usage("--min-request-body-rate takes BYTES/SECONDS", prefork));
            }
            "--shutdown-delay" => {
                parsed.shutdown_delay = seconds(args.next())
                    .unwrap_or_else(|| usage("--shutdown-delay takes seconds", prefork));
            }
            "--rollback-window" if prefork => {
                parsed.rollback_window = Some(
                    seconds(args.next())
                        .unwrap_or_else(|| usage("--rollback-window takes seconds", prefork)),
                );
            }
            "--socket-mode" => {
                let mode = args.next().and_then(|v| u32::from_str_radix(&v, 8).ok());
                parsed.socket_mode = Some(
                    mode.unwrap_or_else(|| usage("--socket-mode takes octal bits (660)", prefork)),
                );
            }
            "--socket-group" => {
                let group = args.next().and_then(|v| group_id(&v));
                parsed.socket_group =
                    Some(group.unwrap_or_else(|| {
                        usage("--socket-group takes a group name or id", prefork)
                    }));
            }
            other => usage(&format!("unknown argument {other:?}"), prefork),
        }
    }
    parsed.listen = listen
        .parse()
        .unwrap_or_else(|err| usage(&format!("{err}"), prefork));
    parsed
}

/// Seconds, with a fraction (`--shutdown-delay 0.5`).
fn seconds(value: Option<String>) -> Option<Duration> {
    let secs = value?.parse::<f64>().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// `N/SECS` (`--restart-intensity`, `--min-response-rate`,
/// `--min-request-body-rate`): a number and a whole number of seconds.
fn per_seconds<N: std::str::FromStr>(value: Option<String>) -> Option<(N, Duration)> {
    let value = value?;
    let (n, secs) = value.split_once('/')?;
    Some((n.parse().ok()?, Duration::from_secs(secs.parse().ok()?)))
}

/// A group id, given as a number or as a name in `/etc/group`.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Binds `--listen`; a unix socket gets `--socket-group` and
/// `--socket-mode`.
#[allow(dead_code)] // the prefork demo binds in its master
pub async fn bind(args: &Args) -> std::io::Result<tower_exit::serve::Listener> {
    let mut listener = tower_exit::serve::Listener::bind(&args.listen).await?;
    if args.socket_group.is_some() {
        listener = listener.socket_owner(None, args.socket_group)?;
    }
    if let Some(mode) = args.socket_mode {
        listener = listener.socket_mode(mode)?;
    }
    Ok(listener)
}

fn usage(problem: &str, prefork: bool) -> ! {
    let extra = if prefork {
        " [--fastcgi] [--workers N] [--max-requests M] [--max-requests-jitter J] \
         [--stop-all-code C] [--restart-intensity N/SECS] [--timeout SECS] [--max-rss MIB] \
         [--rollback-window SECS]"
    } else {
        " [--header-timeout SECS] [--max-connections N]"
    };
    eprintln!(
        "{problem}\nusage: {} [--listen HOST:PORT|unix:PATH] [--socket-mode OCTAL] \
         [--socket-group NAME|GID] [--shutdown-delay SECS] \
         [--min-response-rate BYTES/SECS] [--min-request-body-rate BYTES/SECS]{extra}",
        std::env::args().next().unwrap_or_default()
    );
    std::process::exit(2)
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

/// The bodies the demo reads: `serve::http`'s and `serve::fastcgi`'s.
pub trait ReqBody:
    http_body::Body<Data = Bytes, Error: std::fmt::Display> + Send + 'static
{
}

impl<B> ReqBody for B where
    B: http_body::Body<Data = Bytes, Error: std::fmt::Display> + Send + 'static
{
}

/// The routes.
pub async fn handler<B: ReqBody>(req: Request<B>) -> Reply {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/" => Ok(text(StatusCode::OK, "hello\n")),
        // Reads the whole body: `N bytes`, or `400` with why the read
        // failed (a client slower than the minimum request body rate).
        "/upload" => Ok(
            match http_body_util::BodyExt::collect(req.into_body()).await {
                Ok(body) => text(StatusCode::OK, format!("{} bytes\n", body.to_bytes().len())),
                Err(err) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
            },
        ),
        "/pid" => Ok(text(StatusCode::OK, std::process::id().to_string())),
        "/fail" => Err("the handler failed".into()),
        "/panic" => panic!("the handler panicked"),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(StatusCode::OK, "slow\n"))
        }
        // Blocks this thread for good and never answers: a hung worker, for
        // the prefork demo's `--timeout` (in the other demos it takes one
        // runtime thread away).
        "/hang" => loop {
            std::thread::park();
        },
        // SAFETY: the child makes one write(2) from a stack buffer and
        // raises an exit, which the guard turns into the end of the child
        // without allocating or unwinding.
        "/fork" => match unsafe { fork::fork() }? {
            Forked::Child => {
                child_line(format_args!(
                    "child {} of /fork: my work is done\n",
                    std::process::id()
                ));
                tower_exit::exit(0)
            }
            Forked::Parent(mut child) => {
                let status = child.wait().await?;
                // Parent-only code: a child that ran on into it would answer
                // with its own pid here.
                Ok(text(
                    StatusCode::OK,
                    format!(
                        "parent {}: forked child {} ended with {status}\n",
                        std::process::id(),
                        child.pid()
                    ),
                ))
            }
        },
        _ => {
            if let Some(Ok(mib)) = path.strip_prefix("/grow/").map(str::parse::<usize>) {
                return Ok(text(StatusCode::OK, grow(mib)));
            }
            if let Some(Ok(mib)) = path.strip_prefix("/big/").map(str::parse::<usize>) {
                return Ok(text(StatusCode::OK, big(mib)));
            }
            // An exit raised in a plain background task, 100 ms after the
            // answer: the server (a prefork worker) drains with it.
            if let Some(Ok(code)) = path
                .strip_prefix("/background-exit/")
                .map(str::parse::<i32>)
            {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tower_exit::exit(code)
                });
                return Ok(text(StatusCode::OK, "scheduled\n"));
            }
            match path.strip_prefix("/exit/").map(str::parse::<i32>) {
                Some(Ok(code)) => Exit::new(code)
                    .with_message(format!("{path} asked for it"))
                    .raise(),
                _ => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
            }
        }
    }
}

/// `/grow/MIB`: allocates `mib` MiB, touches every page (so it is
/// resident) and keeps it for the life of the process: memory growth, for
/// the prefork demo's `--max-rss` (capped at 4 GiB a request).
/// `mib` MiB (at most 8) in one buffer, shared by every response: for
/// clients that read a large body slowly.
fn big(mib: usize) -> Bytes {
    static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| Bytes::from(vec![b'x'; 8 << 20]));
    big.slice(..mib.min(8) << 20)
}

fn grow(mib: usize) -> String {
    static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let mib = mib.min(4096);
    let block = vec![1u8; mib << 20];
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.push(block);
    let total: usize = kept.iter().map(Vec::len).sum();
    format!("grew {mib} MiB ({} MiB kept)\n", total >> 20)
}

/// Writes one line to stdout from a child forked by a multi-threaded
/// process, the way such a child must: no allocation, no lock (`println!`
/// takes stdout's lock, which another thread may have held at the fork, and
/// the child would wait for it forever), one `write(2)`. Lines longer than
/// 256 bytes are cut.
fn child_line(line: std::fmt::Arguments<'_>) {
    let mut buf = [0u8; 256];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // Formatting into a slice neither allocates nor locks; a line too long
    // for the buffer is cut short (the write reports an error, ignored).
    let _ = std::io::Write::write_fmt(&mut cursor, line);
    let len = cursor.position() as usize;
    // SAFETY: write(2) is async-signal-safe; `buf` is valid for `len` bytes.
    let _ = unsafe { libc::write(1, buf.as_ptr().cast(), len) };
}

/// A real failure that passes the stack (reported there, once) becomes a
/// `500`; an exit never gets here: the stack answered it.
fn errors_to_500(result: Result<Response<Body>, BoxError>) -> Result<Response<Body>, BoxError> {
    result.or_else(|_| {
        let res = text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        Ok(res.map(ResponseBody::new))
    })
}

/// The body of the demo's responses.
pub type Body = ResponseBody<Full<Bytes>>;

/// The routes behind the exit-aware stack (boundary, catch-panic, reporter,
/// fork guard as one layer), real errors turned into `500` above it.
pub fn service<B: ReqBody>(
    supervisor: &Supervisor,
) -> impl Service<
    Request<B>,
    Response = Response<Body>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Body>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .map_result(errors_to_500)
        .layer(
            supervisor
                .stack()
                .report(TracingReporter)
                .fork_guard(ForkGuardLayer::new().exit_code()),
        )
        .service_fn(probes_or_routes(supervisor))
}

/// `/ready` and `/live` (the supervisor's readiness and liveness services),
/// then the routes.
fn probes_or_routes<B: ReqBody>(
    supervisor: &Supervisor,
) -> impl Fn(Request<B>) -> std::pin::Pin<Box<dyn Future<Output = Reply> + Send>> + Clone {
    let readiness = supervisor.readiness();
    move |req: Request<B>| {
        let probe = match req.uri().path() {
            "/ready" => Some(Either::Left(readiness.clone())),
            "/live" => Some(Either::Right(tower_exit::Liveness)),
            _ => None,
        };
        match probe {
            Some(probe) => Box::pin(async move {
                let Ok(res) = probe.oneshot(req).await;
                Ok(res.map(|body| Full::new(Bytes::from(body))))
            }),
            None => Box::pin(handler(req)),
        }
    }
}
