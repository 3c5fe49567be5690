//! A fork server (zygote): a management process started at the top of
//! `main`, outside every error-handling chain, that forks jobs from its
//! clean state on request.
//!
//! # Example
//!
//! ```no_run
//! use tower_exit::fork::server::ForkServer;
//!
//! fn resize(input: &[u8]) -> i32 {
//!     // ... heavy, crash-prone work in its own process ...
//!     if input.is_empty() { 1 } else { 0 }
//! }
//!
//! fn main() -> std::io::Result<()> {
//!     let forks = ForkServer::builder().job("resize", resize).start()?;
//!     let runtime = tokio::runtime::Runtime::new()?;
//!     runtime.block_on(async {
//!         let job = forks.spawn("resize", b"image bytes").await?;
//!         let status = job.wait().await?;
//!         assert_eq!(status.code(), Some(0));
//!         Ok(())
//!     })
//! }
//! ```
//!
//! Forking from a request handler
//! copies the whole server into the child (its runtime, its locks, its
//! catch-all layers); forking from the fork server copies a small,
//! single-threaded process that has nothing but the registered jobs.
//!
//! - Start it with [`ForkServer::builder`] first thing in `main`, before
//!   any runtime or thread exists. Jobs are plain functions registered by
//!   name, `fn(&[u8]) -> i32` (closures cannot cross processes): they get
//!   the input bytes and return the exit status.
//! - From async code, [`ForkServer::spawn`] asks it (over a unix socket
//!   pair) to fork a job and returns a [`Job`] to wait on.
//! - The fork server dies with its parent (`PR_SET_PDEATHSIG`, and it ends
//!   when its socket closes), its jobs die with it, and it reaps every job
//!   it forked. A job runs under [`fork::spawn`]: it can
//!   never return into anyone's code.

use crate::fork::{self, Child};
use crate::sys;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// A job: gets its input, returns its exit status.
pub type JobFn = fn(&[u8]) -> i32;

/// Largest input a job may be given (16 MiB): requests are length-prefixed
/// and the fork server refuses to buffer more.
pub const MAX_INPUT: usize = 16 * 1024 * 1024;

/// Registers jobs, then starts the fork server.
#[derive(Debug, Default)]
pub struct Builder {
    jobs: Vec<(String, JobFn)>,
}

impl Builder {
    /// Registers `job` under `name`.
    pub fn job(mut self, name: &str, job: JobFn) -> Self {
        self.jobs.push((name.to_owned(), job));
        self
    }

    /// Forks the fork server. Call it before any runtime or thread exists:
    /// the fork server is a copy of the process as it is now.
    pub fn start(self) -> io::Result<ForkServer> {
        let (ours, theirs) = StdUnixStream::pair()?;
        let jobs: HashMap<String, JobFn> = self.jobs.into_iter().collect();
        let parent = std::process::id();
        let mut ours = Some(ours);
        let child = fork::spawn(|| {
            // The fork server must not hold the parent's end, or it would
            // never see it close: its copy is dropped here, in the child's
            // memory; the parent's stays (the closure runs only here).
            drop(ours.take());
            sys::die_with_parent(libc::SIGKILL, parent);
            match theirs.try_clone() {
                Ok(socket) => serve(socket, &jobs),
                Err(_) => crate::exit(1),
            }
        })?;
        drop(theirs);
        let ours = ours.expect("the closure runs in the child only");
        Ok(ForkServer {
            process: Mutex::new(Some(child)),
            socket: Mutex::new(Some(ours)),
            link: tokio::sync::OnceCell::new(),
        })
    }
}

/// The parent's handle on a running fork server. See [the module docs](self).
#[derive(Debug)]
pub struct ForkServer {
    process: Mutex<Option<Child>>,
    /// The socket until the first `spawn` moves it into the runtime.
    socket: Mutex<Option<StdUnixStream>>,
    link: tokio::sync::OnceCell<Link>,
}

/// Why a job could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// No job of that name was registered.
    #[error("no job named {0:?} is registered with the fork server")]
    UnknownJob(String),
    /// The input is larger than [`MAX_INPUT`].
    #[error("job input of {0} bytes is larger than the limit of {MAX_INPUT}")]
    InputTooLarge(usize),
    /// The fork server could not fork.
    #[error("the fork server could not fork")]
    Fork(#[source] io::Error),
    /// The fork server is gone.
    #[error("the fork server is gone: {0}")]
    Gone(#[source] io::Error),
}

/// The fork server's answer to a spawn request, as read off the socket.
#[derive(Debug)]
enum Started {
    Pid(u32),
    UnknownJob,
    ForkFailed(io::Error),
}

impl From<SpawnError> for io::Error {
    fn from(err: SpawnError) -> Self {
        io::Error::other(err)
    }
}

/// A job forked by the fork server.
#[derive(Debug)]
pub struct Job {
    pid: u32,
    exited: oneshot::Receiver<ExitStatus>,
}

impl Job {
    /// The job's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the job to end: its status, as the fork server reaped it.
    pub async fn wait(self) -> io::Result<ExitStatus> {
        self.exited.await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the fork server ended before the job did",
            )
        })
    }
}

#[derive(Debug)]
struct Link {
    /// Whole request frames, for the writer task.
    requests: tokio::sync::mpsc::Sender<Vec<u8>>,
    state: Arc<Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Set by the reader when the fork server is gone. Checked under the
    /// same lock as registration, so a request never waits for a reply
    /// after the reader has given up (it did: the first `spawn` after the
    /// fork server died registered its waiters after the reader had
    /// cleared them, and waited forever).
    closed: bool,
    next_id: u64,
    started: HashMap<u64, oneshot::Sender<Started>>,
    exits: HashMap<u64, oneshot::Sender<ExitStatus>>,
}

// Messages: requests `[u64 id][u32 name len][name][u32 input len][input]`;
// replies `[u8 kind][u64 id][i32 value]` with kind 1 started (value the
// pid), 2 exited (value the raw wait status), 3 unknown job, 4 fork failed
// (value the errno).
const STARTED: u8 = 1;
const EXITED: u8 = 2;
const UNKNOWN: u8 = 3;
const FORK_FAILED: u8 = 4;
const REPLY_LEN: usize = 13;

impl ForkServer {
    /// A builder to register jobs on.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The fork server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::pid)
    }

    /// Asks the fork server to fork `job` with `input`. Needs a tokio
    /// runtime with I/O enabled.
    pub async fn spawn(&self, job: &str, input: &[u8]) -> Result<Job, SpawnError> {
        if input.len() > MAX_INPUT {
            return Err(SpawnError::InputTooLarge(input.len()));
        }
        let link = self
            .link
            .get_or_try_init(|| async { self.connect() })
            .await?;
        let (started_tx, started_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        // Both waiters are registered before the request goes out, so no
        // reply can arrive before its waiter.
        let id = {
            let mut pending = link.state.lock().unwrap_or_else(|e| e.into_inner());
            if pending.closed {
                return Err(SpawnError::Gone(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the fork server is gone",
                )));
            }
            let id = pending.next_id + 1;
            pending.next_id = id;
            pending.started.insert(id, started_tx);
            pending.exits.insert(id, exit_tx);
            id
        };
        let mut request = Vec::with_capacity(16 + job.len() + input.len());
        request.extend_from_slice(&id.to_be_bytes());
        request.extend_from_slice(&(job.len() as u32).to_be_bytes());
        request.extend_from_slice(job.as_bytes());
        request.extend_from_slice(&(input.len() as u32).to_be_bytes());
        request.extend_from_slice(input);
        // Cancel safety: the frame goes whole to the writer task or not at
        // all (a bounded channel's `send` either queues it or, dropped,
        // does nothing). Writing here instead could stop mid-frame when the
        // caller is cancelled, and every later request would be misread.
        // Until it is queued, dropping this future withdraws the waiters.
        let unsent = Unsent {
            state: &link.state,
            id,
        };
        if link.requests.send(request).await.is_err() {
            return Err(SpawnError::Gone(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the fork server link is closed",
            )));
        }
        std::mem::forget(unsent);
        let started = started_rx
            .await
            .map_err(|_| SpawnError::Gone(io::Error::new(io::ErrorKind::BrokenPipe, "no reply")))?;
        let pid = match started {
            Started::Pid(pid) => pid,
            Started::UnknownJob => return Err(SpawnError::UnknownJob(job.to_owned())),
            Started::ForkFailed(err) => return Err(SpawnError::Fork(err)),
        };
        Ok(Job {
            pid,
            exited: exit_rx,
        })
    }

    fn connect(&self) -> Result<Link, SpawnError> {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| SpawnError::Gone(io::Error::other("socket already taken")))?;
        socket.set_nonblocking(true).map_err(SpawnError::Gone)?;
        let socket = tokio::net::UnixStream::from_std(socket).map_err(SpawnError::Gone)?;
        let (reader, writer) = socket.into_split();
        let state = Arc::new(Mutex::new(Pending::default()));
        let (requests, frames) = tokio::sync::mpsc::channel(QUEUED_REQUESTS);
        tokio::spawn(write_requests(writer, frames));
        tokio::spawn(read_replies(reader, state.clone()));
        Ok(Link { requests, state })
    }
}

/// How many whole requests may wait for the writer task; `spawn` waits for
/// room beyond that.
const QUEUED_REQUESTS: usize = 4;

/// Withdraws a request's waiters if its `spawn` is dropped before the
/// request was queued (so no reply will ever come for that id).
struct Unsent<'a> {
    state: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        let mut pending = self.state.lock().unwrap_or_else(|e| e.into_inner());
        pending.started.remove(&self.id);
        pending.exits.remove(&self.id);
    }
}

/// Writes whole request frames to the fork server, in order. Ends (and so
/// closes the channel, failing later `spawn`s) when the fork server is gone.
async fn write_requests(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    while let Some(frame) = frames.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // Closing our end tells the fork server to stop its jobs and end;
        // then reap it.
        drop(self.socket.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(mut process) = self
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            if self.link.initialized() {
                // The link's socket half lives in a runtime task; make sure
                // the fork server goes even if that task outlives us.
                let _ = process.kill(libc::SIGTERM);
            }
            let _ = process.wait_blocking();
        }
    }
}

async fn read_replies(mut reader: tokio::net::unix::OwnedReadHalf, state: Arc<Mutex<Pending>>) {
    let mut reply = [0u8; REPLY_LEN];
    loop {
        if reader.read_exact(&mut reply).await.is_err() {
            // The fork server is gone: every waiter learns it (their
            // senders drop here).
            let mut pending = state.lock().unwrap_or_else(|e| e.into_inner());
            pending.closed = true;
            pending.started.clear();
            pending.exits.clear();
            return;
        }
        let kind = reply[0];
        let id = u64::from_be_bytes(reply[1..9].try_into().expect("8 bytes"));
        let value = i32::from_be_bytes(reply[9..13].try_into().expect("4 bytes"));
        let mut pending = state.lock().unwrap_or_else(|e| e.into_inner());
        let started = match kind {
            EXITED => {
                if let Some(waiter) = pending.exits.remove(&id) {
                    let _ = waiter.send(ExitStatus::from_raw(value));
                }
                continue;
            }
            STARTED => Started::Pid(value as u32),
            UNKNOWN => Started::UnknownJob,
            FORK_FAILED => Started::ForkFailed(io::Error::from_raw_os_error(value)),
            _ => continue,
        };
        if !matches!(started, Started::Pid(_)) {
            pending.exits.remove(&id);
        }
        if let Some(waiter) = pending.started.remove(&id) {
            let _ = waiter.send(started);
        }
    }
}

// ---------------------------------------------------------------------------
// The fork server process
// ---------------------------------------------------------------------------

/// The fork server's loop: read requests, fork jobs, reap them, report.
/// Synchronous and single-threaded on purpose: it must stay a clean state
/// to fork from.
fn serve(mut socket: StdUnixStream, jobs: &HashMap<String, JobFn>) {
    let me = std::process::id();
    let mut running: Vec<(u64, Child)> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match socket.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
        while let Some((id, name, input, used)) = parse_request(&buf) {
            let reply = match jobs.get(name) {
                None => reply(UNKNOWN, id, 0),
                Some(&job) => {
                    let input = input.to_vec();
                    match fork::spawn(move || {
                        sys::die_with_parent(libc::SIGKILL, me);
                        crate::exit(job(&input))
                    }) {
                        Ok(child) => {
                            let pid = child.pid();
                            running.push((id, child));
                            reply(STARTED, id, pid as i32)
                        }
                        Err(err) => reply(FORK_FAILED, id, err.raw_os_error().unwrap_or(0)),
                    }
                }
            };
            buf.drain(..used);
            if socket.write_all(&reply).is_err() {
                break;
            }
        }
        if buf.len() > MAX_INPUT + 1024 {
            break; // not our client: refuse to buffer more
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (id, _) = running.swap_remove(i);
                    let _ = socket.write_all(&reply(EXITED, id, status.into_raw()));
                }
                Ok(None) => i += 1,
                Err(_) => {
                    running.swap_remove(i);
                }
            }
        }
    }
    // The parent closed its end (or went away): stop the jobs, reap them.
    for (_, child) in &mut running {
        let _ = child.kill(libc::SIGTERM);
    }
    for (_, mut child) in running {
        let _ = child.wait_blocking();
    }
}

fn reply(kind: u8, key: u64, value: i32) -> [u8; REPLY_LEN] {
    let mut out = [0u8; REPLY_LEN];
    out[0] = kind;
    out[1..9].copy_from_slice(&key.to_be_bytes());
    out[9..13].copy_from_slice(&value.to_be_bytes());
    out
}

/// One whole request at the start of `buf`: (id, job name, input, bytes used).
fn parse_request(buf: &[u8]) -> Option<(u64, &str, &[u8], usize)> {
    let id = u64::from_be_bytes(buf.get(..8)?.try_into().ok()?);
    let name_len = u32::from_be_bytes(buf.get(8..12)?.try_into().ok()?) as usize;
    let name_end = 12usize.checked_add(name_len)?;
    let name = std::str::from_utf8(buf.get(12..name_end)?).unwrap_or("");
    let input_len = u32::from_be_bytes(buf.get(name_end..name_end + 4)?.try_into().ok()?) as usize;
    let input_start = name_end + 4;
    let input_end = input_start.checked_add(input_len)?;
    let input = buf.get(input_start..input_end)?;
    Some((id, name, input, input_end))
}
