//! The operating system calls the crate makes, fenced: each `unsafe` block
//! is one call, with a `// SAFETY:` comment, and its result is checked.
//!
//! With `fork::fork` (an `unsafe fn` by contract) and the lock-free list in
//! `hooks`, this is the only place where the crate uses `unsafe`
//! (`#![deny(unsafe_code)]` everywhere else). Everything here that a forked
//! child calls before it ends is async-signal-safe: no allocation, no lock.
#![allow(unsafe_code)]

/// The soft limit on open file descriptors (`ulimit -n`), if there is one.
#[cfg(feature = "http")]
pub(crate) fn fd_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and returns -1 on
    // error.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// Whether `fd` is readable now (a listening socket: a client waits in
/// its backlog), without blocking.
#[cfg(any(feature = "http", feature = "fastcgi"))]
pub(crate) fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut pending = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pending` is one valid `pollfd` for the whole call, on a
    // descriptor the borrow keeps open; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut pending, 1, 0) };
    ready > 0 && pending.revents & libc::POLLIN != 0
}

#[cfg(feature = "fork")]
pub(crate) use self::process::*;

#[cfg(feature = "fork")]
mod process {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    /// `fork(2)`: `Some(pid)` in the parent, `None` in the child.
    ///
    /// # Safety
    ///
    /// See `fork::fork`: until it ends or execs, the child of a
    /// multi-threaded process may only do async-signal-safe work.
    pub(crate) unsafe fn fork() -> io::Result<Option<libc::pid_t>> {
        // SAFETY: the call itself is always sound; the caller keeps the
        // contract on what the child does.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(None),
            pid => Ok(Some(pid)),
        }
    }

    /// Registers `handler` to run in the child after every `fork`.
    pub(crate) fn at_fork_in_child(handler: extern "C" fn()) -> io::Result<()> {
        // SAFETY: the handler is `extern "C"`, lives for the whole program,
        // and the caller makes it async-signal-safe.
        match unsafe { libc::pthread_atfork(None, None, Some(handler)) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    /// Ends this process now with `_exit(status)`: no destructors, no
    /// atexit handlers, no stdio flush (they belong to the parent's state).
    pub(crate) fn exit_now(status: i32) -> ! {
        // SAFETY: `_exit` is async-signal-safe, takes any int, never returns.
        unsafe { libc::_exit(status & 0xff) }
    }

    /// Ends this process with `SIGTERM`, after making sure nothing can keep
    /// it alive: the disposition is reset to the default (an application's
    /// handler must not catch it) and the signal unblocked. If a step fails
    /// or the signal does not end it, `_exit(128 + SIGTERM)`, the status a
    /// shell shows for it.
    pub(crate) fn terminate_now() -> ! {
        if reset_and_unblock(libc::SIGTERM).is_ok() {
            // POSIX: an unblocked signal sent to the calling process is
            // delivered before `kill` returns.
            let _ = kill(std::process::id() as libc::pid_t, libc::SIGTERM);
        }
        exit_now(128 + libc::SIGTERM)
    }

    fn reset_and_unblock(signal: libc::c_int) -> io::Result<()> {
        // SAFETY: `sigaction` is plain data: all zeros is a valid value
        // (no flags, an empty mask on Linux), completed below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = libc::SIG_DFL;
        // SAFETY: `action` is a valid struct; the old action is not wanted.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let set = SignalSet::of(&[signal])?;
        // SAFETY: `set` is initialised; the old mask is not wanted.
        match unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set.0, std::ptr::null_mut()) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    /// Sends `signal` to `pid`.
    pub(crate) fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: plain syscall on integers.
        if unsafe { libc::kill(pid, signal) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `waitpid(pid)` for our own child `pid` (never -1: other code's
    /// children are not ours), retried on `EINTR`: `Some(status)` once it
    /// ended and is reaped, `None` if `block` is false and it still runs.
    pub(crate) fn wait_for(pid: libc::pid_t, block: bool) -> io::Result<Option<ExitStatus>> {
        let flags = if block { 0 } else { libc::WNOHANG };
        let mut status = 0;
        loop {
            // SAFETY: writes the status into our integer; waits for `pid`
            // only.
            match unsafe { libc::waitpid(pid, &mut status, flags) } {
                0 => return Ok(None),
                -1 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
                _ => return Ok(Some(ExitStatus::from_raw(status))),
            }
        }
    }

    /// A pidfd for `pid` (Linux 5.3+), or `None` where the kernel has none.
    /// The answer `ENOSYS` is remembered, as tokio's pidfd reaper does: an
    /// old kernel is not asked again for every child.
    pub(crate) fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
        use std::sync::atomic::{AtomicBool, Ordering};
        static NO_PIDFD: AtomicBool = AtomicBool::new(false);
        if NO_PIDFD.load(Ordering::Relaxed) {
            return None;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                NO_PIDFD.store(true, Ordering::Relaxed);
            }
            return None;
        }
        // SAFETY: the kernel just gave us this fd; nobody else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// In a forked child: receive `signal` when the parent ends, even if it
    /// is killed outright; if `parent` already ended (the child was adopted
    /// before this call), `_exit(1)` at once.
    pub(crate) fn die_with_parent(signal: libc::c_int, parent: u32) {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) };
        // SAFETY: getppid cannot fail.
        let ppid = unsafe { libc::getppid() };
        if rc != 0 || ppid as u32 != parent {
            exit_now(1);
        }
    }

    /// Takes ownership of a descriptor the service manager passed to this
    /// process (socket activation: `LISTEN_FDS`, checked against
    /// `LISTEN_PID` by the caller).
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags; -1
        // means it is not open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor is open, was passed to this process by
        // its service manager for it to own, and nothing else here wraps it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Starts `command` with `listener` as its descriptor 3 (the first of
    /// socket activation's) and the signal mask of before `signals`
    /// blocked them: a prefork master re-executing itself (SIGUSR2).
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) fn spawn_with_listener(
        mut command: std::process::Command,
        listener: std::os::fd::BorrowedFd<'_>,
        signals: &BlockedSignals,
    ) -> io::Result<std::process::Child> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        let mask = signals.old;
        let in_child = move || -> io::Result<()> {
            if fd == 3 {
                // SAFETY: F_SETFD with 0 only clears close-on-exec.
                if unsafe { libc::fcntl(3, libc::F_SETFD, 0) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else {
                // SAFETY: dup2 makes descriptor 3 a copy of the listener
                // (closing what 3 was in this child); the copy does not
                // inherit close-on-exec.
                if unsafe { libc::dup2(fd, 3) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: `mask` was filled by pthread_sigmask in `block`.
            match unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) } {
                0 => Ok(()),
                rc => Err(io::Error::from_raw_os_error(rc)),
            }
        };
        // SAFETY: the closure runs in the forked child before `exec` and
        // makes only async-signal-safe calls (fcntl, dup2, pthread_sigmask):
        // no allocation, no lock.
        unsafe {
            command.pre_exec(in_child);
        }
        command.spawn()
    }

    /// The most resident memory this process has had (`getrusage`'s
    /// `ru_maxrss`, in bytes): one system call, no file read. A forked
    /// child's count starts at its resident memory at the fork, not its
    /// parent's peak.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) fn peak_resident_bytes() -> Option<u64> {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the place we own.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: getrusage filled it.
        let kib = unsafe { usage.assume_init_ref() }.ru_maxrss;
        u64::try_from(kib).ok().map(|kib| kib * 1024)
    }

    /// Counters in memory shared with every child forked afterwards (an
    /// anonymous shared mapping): a prefork master reads its workers'
    /// heartbeats there.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) struct SharedCounters {
        counters: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
        len: usize,
    }

    // SAFETY: the counters are atomics, shared by design; the mapping lives
    // until `drop`.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    unsafe impl Send for SharedCounters {}
    // SAFETY: as above: `&SharedCounters` only hands out `&AtomicU64`.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    unsafe impl Sync for SharedCounters {}

    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    impl SharedCounters {
        /// `len` counters, all 0.
        pub(crate) fn new(len: usize) -> io::Result<Self> {
            let bytes = len.max(1) * std::mem::size_of::<u64>();
            // SAFETY: a new anonymous mapping, no address asked for; the
            // result is checked against MAP_FAILED.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // A fresh anonymous mapping is zeroed and page-aligned: valid
            // `AtomicU64`s, all 0.
            let counters = std::ptr::NonNull::new(ptr.cast())
                .ok_or_else(|| io::Error::other("mmap gave a null address"))?;
            Ok(SharedCounters {
                counters,
                len: len.max(1),
            })
        }

        /// Counter `i` (panics past the end, as indexing does).
        pub(crate) fn get(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
            assert!(i < self.len, "counter {i} of {}", self.len);
            // SAFETY: `i` is in bounds of the mapping, which is valid,
            // aligned and zero-initialised memory for `len` atomics, alive
            // as long as `self`.
            unsafe { &*self.counters.as_ptr().add(i) }
        }
    }

    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    impl Drop for SharedCounters {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made; no reference
            // into it outlives `self`.
            unsafe {
                libc::munmap(
                    self.counters.as_ptr().cast(),
                    self.len * std::mem::size_of::<u64>(),
                )
            };
        }
    }

    /// A set of signals.
    pub(super) struct SignalSet(libc::sigset_t);

    impl SignalSet {
        pub(crate) fn of(signals: &[libc::c_int]) -> io::Result<Self> {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            // SAFETY: sigemptyset initialises the set it is given.
            if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: initialised by sigemptyset just above.
            let mut set = SignalSet(unsafe { set.assume_init() });
            for &signal in signals {
                // SAFETY: `set` is initialised; a bad signal number is an
                // error, not undefined behaviour.
                if unsafe { libc::sigaddset(&mut set.0, signal) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(set)
        }
    }

    /// Signals blocked for this thread (and the threads and children it
    /// creates), to be taken synchronously with [`wait`](Self::wait): no
    /// handler runs, so nothing async-signal-unsafe can happen.
    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    pub(crate) struct BlockedSignals {
        set: SignalSet,
        old: libc::sigset_t,
    }

    #[cfg(all(feature = "prefork", any(feature = "http", feature = "fastcgi")))]
    impl BlockedSignals {
        pub(crate) fn block(signals: &[libc::c_int]) -> io::Result<Self> {
            let set = SignalSet::of(signals)?;
            let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            // SAFETY: reads `set`, writes the previous mask into `old`.
            match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set.0, old.as_mut_ptr()) } {
                // SAFETY: pthread_sigmask filled `old` on success.
                0 => Ok(BlockedSignals {
                    set,
                    old: unsafe { old.assume_init() },
                }),
                rc => Err(io::Error::from_raw_os_error(rc)),
            }
        }

        /// The next of the blocked signals, or `None` after `timeout` (or
        /// on `EINTR`).
        pub(crate) fn wait(&self, timeout: std::time::Duration) -> Option<libc::c_int> {
            self.wait_from(timeout).map(|(signal, _)| signal)
        }

        /// [`wait`](Self::wait), with the pid of the process that sent the
        /// signal (0 when the kernel sent it, e.g. SIGCHLD's own child, or
        /// a terminal's SIGINT).
        pub(crate) fn wait_from(
            &self,
            timeout: std::time::Duration,
        ) -> Option<(libc::c_int, libc::pid_t)> {
            let timeout = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
            };
            let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
            // SAFETY: `set` is initialised; `info` is a valid place for the
            // kernel to write one siginfo_t.
            let signal = unsafe { libc::sigtimedwait(&self.set.0, info.as_mut_ptr(), &timeout) };
            if signal <= 0 {
                return None;
            }
            // SAFETY: sigtimedwait filled `info` for the signal it returned;
            // for a signal sent by kill(2) (SI_USER) `si_pid` is the sender,
            // for others the zeroed field or the kernel's value.
            let from = unsafe { info.assume_init_ref().si_pid() };
            Some((signal, from))
        }

        /// Restores the mask of before [`block`](Self::block) (in a forked
        /// worker, before it runs anything).
        pub(crate) fn restore(&self) -> io::Result<()> {
            // SAFETY: `old` was filled by pthread_sigmask in `block`.
            match unsafe {
                libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut())
            } {
                0 => Ok(()),
                rc => Err(io::Error::from_raw_os_error(rc)),
            }
        }
    }
}
