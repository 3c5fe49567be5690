//! Shared by the integration tests: a real HTTP client and a handler that
//! ends in every way a handler can.

#![allow(dead_code)]

pub mod demo;
pub mod fcgi;
pub mod logs;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tower::BoxError;
use tower_exit::Exit;

/// One HTTP/1.1 exchange over a fresh TCP connection.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    exchange(stream, &addr.to_string(), path).await
}

/// One HTTP/2 exchange (prior knowledge) over a fresh TCP connection.
pub async fn get_h2(addr: SocketAddr, path: &str) -> Result<Reply, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}")).body(Empty::<Bytes>::new())?;
    Reply::of(sender.send_request(req).await?).await
}

/// One HTTP/1.1 exchange over a fresh unix-socket connection.
pub async fn get_unix(socket: &std::path::Path, path: &str) -> Result<Reply, BoxError> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    exchange(stream, "localhost", path).await
}

async fn exchange<IO>(io: IO, host: &str, path: &str) -> Result<Reply, BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())?;
    Reply::of(sender.send_request(req).await?).await
}

impl Reply {
    /// The response, its body read whole.
    async fn of(res: Response<hyper::body::Incoming>) -> Result<Reply, BoxError> {
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

async fn nested_exit(code: i32) -> Response<Full<Bytes>> {
    tokio::task::yield_now().await;
    tower_exit::exit(code)
}

/// `/ok`, `/fail`, `/panic`, `/exit/N` (raised), `/nested/N` (raised in a
/// nested async fn), `/spawn/N` (raised in `tokio::spawn`), `/blocking/N`
/// (raised in `spawn_blocking`), `/err/N` (returned as `Err`), `/io/N`
/// (returned inside an `io::Error`), `/slow` (answers after 300 ms).
pub async fn handler<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, BoxError> {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let route = parts.next().unwrap_or_default();
    let code = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    match route {
        "ok" => Ok(Response::new(Full::from("ok"))),
        "fail" => Err("database is down".into()),
        "panic" => panic!("bug in handler"),
        "exit" => tower_exit::exit(code),
        "nested" => Ok(nested_exit(code).await),
        "spawn" => {
            let handle = tokio::spawn(async move { nested_exit(code).await });
            Ok(tower_exit::exit::join(handle)
                .await
                .map_err(|failure| format!("{failure:?}"))?)
        }
        "blocking" => {
            let handle = tokio::task::spawn_blocking(move || -> Response<Full<Bytes>> {
                tower_exit::exit(code)
            });
            Ok(tower_exit::exit::join(handle)
                .await
                .map_err(|failure| format!("{failure:?}"))?)
        }
        "err" => Err(Exit::new(code).into()),
        "io" => Err(std::io::Error::other(Exit::new(code)).into()),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Response::new(Full::from("slow")))
        }
        _ => {
            let mut res = Response::new(Full::from("not found"));
            *res.status_mut() = StatusCode::NOT_FOUND;
            Ok(res)
        }
    }
}

/// Every way a handler can exit, with code 3.
pub const EXIT_ROUTES: [&str; 6] = [
    "/exit/3",
    "/nested/3",
    "/spawn/3",
    "/blocking/3",
    "/err/3",
    "/io/3",
];

/// Appends one line to `path` (from the parent or a forked child: `O_APPEND`
/// keeps lines whole).
pub fn log_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("write log");
}

/// Appends `line pid=N` with this process's pid.
pub fn log_with_pid(path: &std::path::Path, line: &str) {
    log_line(path, &format!("{line} pid={}", std::process::id()));
}

pub fn read_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The children of `pid`, with their state letter (`Z` for a zombie),
/// from `/proc`.
pub fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((child, state, parent)) = parse_stat(&stat) {
            if parent == pid {
                children.push((child, state));
            }
        }
    }
    children
}

/// A process's pid, state letter and parent pid, from its `/proc/PID/stat`.
fn parse_stat(stat: &str) -> Option<(u32, String, u32)> {
    // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let parent = fields.next()?.parse().ok()?;
    Some((pid, state, parent))
}

/// The state letter and parent pid of a process, from `/proc`.
pub fn state_of(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, state, parent) = parse_stat(&stat)?;
    Some((state, parent))
}

/// The zombie children of this process, from `/proc`.
pub fn zombies() -> Vec<u32> {
    children_of(std::process::id())
        .into_iter()
        .filter(|(_, state)| state == "Z")
        .map(|(pid, _)| pid)
        .collect()
}

/// The resident memory of `pid`, KiB (`VmRSS`).
pub fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The parent pid of a process, from `/proc`.
pub fn parent_of(pid: u32) -> Option<u32> {
    state_of(pid).map(|(_, parent)| parent)
}

/// Makes this process the reaper of orphaned descendants, so that a
/// grandchild left behind shows up as our zombie instead of vanishing.
pub fn become_subreaper() {
    // SAFETY: plain prctl with an integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// Whether a process with this pid exists (zombies count).
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A temporary log file, removed on drop; on drop it also SIGKILLs every
/// pid that a `pid=N` line names (other than ours), so that a failing test
/// leaves no orphan behind.
pub struct PidLog {
    pub path: std::path::PathBuf,
}

impl PidLog {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tower-exit-{name}-{}-{:?}.log",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        PidLog { path }
    }

    pub fn lines(&self) -> Vec<String> {
        read_lines(&self.path)
    }

    pub fn log(&self, line: &str) {
        log_with_pid(&self.path, line);
    }
}

impl Drop for PidLog {
    fn drop(&mut self) {
        let me = std::process::id();
        for line in self.lines() {
            if let Some(pid) = line
                .rsplit_once("pid=")
                .and_then(|(_, p)| p.parse::<i32>().ok())
            {
                // Only our own children: a reaped pid may belong to anyone now.
                if pid as u32 != me && parent_of(pid as u32) == Some(me) {
                    // SAFETY: plain syscall on a child of this process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
