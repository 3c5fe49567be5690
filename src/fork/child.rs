//! [`Child`]: a forked child owned by its parent, waited for on a pidfd
//! without a thread per child, and reaped even when dropped.

#![allow(unsafe_code)] // one registration of a borrowed pidfd, see `wait`

use super::end::generation;
use crate::sys;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

/// A forked child process, owned by its parent.
///
/// Dropping a `Child` does not kill it, but it is still reaped (by a shared
/// background thread) once it ends: no zombies.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    /// A pidfd for the child, when the kernel has them.
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// The fork generation of the process that forked this child: a `Child`
    /// value copied into a grandchild by a later fork is not its to reap.
    owner_generation: u64,
}

impl Child {
    pub(super) fn new(pid: libc::pid_t, owner_generation: u64) -> Self {
        Child {
            pid,
            pidfd: sys::pidfd_open(pid),
            status: None,
            owner_generation,
        }
    }

    /// Closes this handle's pidfd, if it has one: `wait` then polls. For a
    /// parent that reaps otherwise (on SIGCHLD) and forks again, so that
    /// its later children do not inherit the descriptor.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) fn without_pidfd(mut self) -> Self {
        self.pidfd = None;
        self
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Sends `signal` (such as `libc::SIGTERM`) to the child.
    ///
    /// Safe against pid reuse: until this handle reaps the child, its pid
    /// cannot be given to another process. A copy of the handle inherited
    /// by a later forked child is not the owner and refuses: there, the pid
    /// may already belong to another process.
    pub fn kill(&mut self, signal: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "child has already been reaped",
            ));
        }
        if generation() != self.owner_generation {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this handle was inherited through a fork: only the process that forked the child may signal it",
            ));
        }
        // Safe against pid reuse: the child is ours and not reaped.
        sys::kill(self.pid, signal)
    }

    /// The exit status if the child has ended (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = try_reap(self.pid)?;
        if status.is_some() {
            self.status = status;
            self.pidfd = None;
        }
        Ok(status)
    }

    /// Blocks the thread until the child ends, and reaps it: for code with
    /// no runtime, such as a forked child waiting for its own child.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = sys::wait_for(self.pid, true)?
            .ok_or_else(|| io::Error::other("waitpid returned without a status"))?;
        self.status = Some(status);
        self.pidfd = None;
        Ok(status)
    }

    /// Waits for the child to end and reaps it.
    ///
    /// With a pidfd (Linux 5.3+) this waits on the runtime's I/O driver, no
    /// thread per child; otherwise it polls with a short, growing sleep.
    /// Needs a tokio runtime with I/O and time enabled.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Some(fd) = self.pidfd.as_ref().map(AsRawFd::as_raw_fd) {
            // SAFETY: `fd` is owned by `self.pidfd`, which is neither closed
            // nor replaced while the registration lives: the loop below
            // reaps with `try_reap`, which leaves `self.pidfd` alone, and
            // the registration is dropped before `self.pidfd` is cleared.
            // (Closing a registered fd first would let its number be reused
            // by a socket that the deregistration then removes from the
            // runtime's epoll: that socket would never be woken again.)
            let registered =
                unsafe { AsyncFd::register_with_interest(PidFd(fd), Interest::READABLE) };
            if let Ok(readable) = registered {
                let status = loop {
                    // A pidfd becomes readable when the process ends.
                    let mut ready = readable.readable().await?;
                    if let Some(status) = try_reap(self.pid)? {
                        break status;
                    }
                    ready.clear_ready();
                };
                drop(readable);
                self.status = Some(status);
                self.pidfd = None;
                return Ok(status);
            }
        }
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() || generation() != self.owner_generation {
            return;
        }
        match try_reap(self.pid) {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => reap_later(self.pid),
        }
    }
}

/// A borrowed pidfd registered with tokio for the length of one `wait`.
struct PidFd(RawFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// `waitpid(pid, WNOHANG)`: `Some(status)` if it ended (and is now reaped).
fn try_reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    sys::wait_for(pid, false)
}

/// Hands a still-running child to the shared reaper thread.
///
/// The thread sleeps on its channel while it has nothing to reap, and polls
/// its pids with a growing pause (1 ms to 100 ms) while it has some.
fn reap_later(pid: libc::pid_t) {
    static REAPER: OnceLock<Mutex<mpsc::Sender<libc::pid_t>>> = OnceLock::new();
    let sender = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tower-exit-reaper".into())
            .spawn(move || reaper(rx));
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the reaper thread: dropped children may linger");
        }
        Mutex::new(tx)
    });
    let sent = sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(pid);
    if sent.is_err() {
        tracing::error!(pid, "reaper thread is gone: child may linger as a zombie");
    }
}

fn reaper(rx: mpsc::Receiver<libc::pid_t>) {
    let mut pending: Vec<libc::pid_t> = Vec::new();
    let mut pause = Duration::from_millis(1);
    loop {
        let received = if pending.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(pause)
        };
        match received {
            Ok(pid) => {
                pending.push(pid);
                pause = Duration::from_millis(1);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) if pending.is_empty() => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(pause),
        }
        // Keep only the children that are still running.
        pending.retain(|&pid| matches!(try_reap(pid), Ok(None)));
    }
}
