//! Where a server listens: TCP or a unix socket, parsed from `HOST:PORT` or
//! `unix:PATH`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// A listening address: `HOST:PORT` for TCP, `unix:PATH` for a unix socket.
///
/// ```
/// use tower_exit::serve::ListenAddr;
/// let tcp: ListenAddr = "127.0.0.1:9000".parse().unwrap();
/// let unix: ListenAddr = "unix:/run/app.sock".parse().unwrap();
/// assert_eq!(unix.to_string(), "unix:/run/app.sock");
/// # let _ = tcp;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, resolved when binding.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

/// A `ListenAddr` that is neither `HOST:PORT` nor `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad listen address {0:?}: expected HOST:PORT or unix:PATH")]
pub struct BadListenAddr(String);

impl FromStr for ListenAddr {
    type Err = BadListenAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(BadListenAddr(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ListenAddr::Tcp(s.to_owned()))
            }
            _ => Err(BadListenAddr(s.to_owned())),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => f.write_str(addr),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener, TCP or unix.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Listener::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Listener::Unix(listener)
    }
}

impl From<std::net::TcpListener> for Listener {
    /// Panics outside a tokio runtime, like `TcpListener::from_std`.
    fn from(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
            .map(Listener::Tcp)
            .expect("registering a listener with the tokio runtime")
    }
}

impl Listener {
    /// Binds `addr`. For a unix socket, a stale socket file left by an
    /// earlier run (nothing accepts on it) is replaced; a socket a live
    /// server listens on is left alone and the bind fails
    /// ([`io::ErrorKind::AddrInUse`]); any other file at that path is an
    /// error. A socket bound here is removed when a server of this crate
    /// serving on it ends. Errors name the address.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            // tokio's bind resolves a host name off the runtime's threads.
            ListenAddr::Tcp(tcp) => TcpListener::bind(tcp.as_str())
                .await
                .map(Listener::Tcp)
                .map_err(|err| cannot_listen(addr, err)),
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path)?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(listener)?))
            }
        }
    }

    /// Removes the socket file of a unix listener that [`bind`](Self::bind)
    /// made in this process (not in a forked worker sharing it): called by
    /// the servers once they have drained.
    pub(crate) fn remove_socket_if_bound_here(&self) {
        if let Ok(ListenAddr::Unix(path)) = self.local_addr() {
            remove_if_bound_here(&path);
        }
    }

    /// Sets a unix socket's permission bits, as php-fpm's `listen.mode`:
    /// who may connect. A socket is bound with the mode the process's umask
    /// leaves (usually `0755`: only its owner may connect, since connecting
    /// needs write permission), so a front server running as another user
    /// (nginx as `www-data`) gets `EACCES`. `0o660` with
    /// [`socket_owner`](Self::socket_owner)'s group is php-fpm's default.
    /// An error for a TCP listener, or when the mode cannot be set.
    pub fn socket_mode(self, mode: u32) -> io::Result<Self> {
        set_socket_mode(&self.unix_path()?, mode)?;
        Ok(self)
    }

    /// Sets a unix socket's owner and group (by id; `None` keeps one), as
    /// php-fpm's `listen.owner` and `listen.group`. Changing the owner
    /// needs privileges; a process may give the socket one of its own
    /// groups. An error for a TCP listener, or when they cannot be set.
    pub fn socket_owner(self, uid: Option<u32>, gid: Option<u32>) -> io::Result<Self> {
        set_socket_owner(&self.unix_path()?, uid, gid)?;
        Ok(self)
    }

    fn unix_path(&self) -> io::Result<PathBuf> {
        match self.local_addr()? {
            ListenAddr::Unix(path) if !path.as_os_str().is_empty() => Ok(path),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{other} is not a unix socket with a path: it has no mode or owner"),
            )),
        }
    }

    /// The address actually bound (the port chosen for `:0`).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?.to_string())),
            Listener::Unix(l) => Ok(unix_addr(l.local_addr()?.as_pathname())),
        }
    }

    /// Whether a client waits in the listen backlog (the socket is
    /// readable), without accepting it: a server at its connection cap
    /// makes room only for a client that is there.
    pub(crate) fn has_waiting(&self) -> bool {
        use std::os::fd::AsFd;
        crate::sys::readable_now(match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        })
    }

    pub(crate) async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Small responses must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Ok((Box::new(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Box::new(stream), Peer::Unix))
            }
        }
    }
}

/// Unix sockets bound by `Listener::bind` in this process (path, pid): the
/// ones a server removes when it ends. The pid keeps a forked worker, which
/// shares the listener, from removing the master's socket.
static BOUND_HERE: std::sync::Mutex<Vec<(std::path::PathBuf, u32)>> =
    std::sync::Mutex::new(Vec::new());

fn bound_here(path: &Path) {
    BOUND_HERE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.to_path_buf(), std::process::id()));
}

/// The address of a unix listener bound at `path` (none for an unnamed
/// socket).
fn unix_addr(path: Option<&Path>) -> ListenAddr {
    ListenAddr::Unix(path.map(Path::to_path_buf).unwrap_or_default())
}

/// Removes the socket file at `path` if this process bound it.
fn remove_if_bound_here(path: &Path) {
    let mut bound = BOUND_HERE.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    if let Some(i) = bound.iter().position(|(p, pid)| p == path && *pid == me) {
        bound.swap_remove(i);
        if let Err(err) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), %err, "cannot remove the socket file");
        }
    }
}

/// A unix socket's permission bits (see [`Listener::socket_mode`]).
pub(crate) fn set_socket_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot set mode {mode:o} on {}: {err}", path.display()),
        )
    })
}

/// A unix socket's owner and group (see [`Listener::socket_owner`]).
pub(crate) fn set_socket_owner(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::chown(path, uid, gid).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!(
                "cannot set owner {uid:?} group {gid:?} on {}: {err}",
                path.display()
            ),
        )
    })
}

/// The one way a unix socket is bound here: a stale socket file is
/// replaced, a live one or another file refused, errors name the address,
/// and the socket is remembered as bound by this process.
fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    remove_stale_socket(path)?;
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|err| cannot_listen(&ListenAddr::Unix(path.to_path_buf()), err))?;
    bound_here(path);
    Ok(listener)
}

/// A listener bound with no runtime (a prefork master binds before any
/// worker exists; every worker serves on it).
#[cfg(feature = "prefork")]
#[derive(Debug)]
pub(crate) enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

#[cfg(feature = "prefork")]
impl std::os::fd::AsFd for StdListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            StdListener::Tcp(l) => l.as_fd(),
            StdListener::Unix(l) => l.as_fd(),
        }
    }
}

#[cfg(feature = "prefork")]
impl StdListener {
    /// Binds `addr` as [`Listener::bind`] does, blocking.
    pub(crate) fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(tcp) => std::net::TcpListener::bind(tcp.as_str())
                .map(StdListener::Tcp)
                .map_err(|err| cannot_listen(addr, err)),
            ListenAddr::Unix(path) => bind_unix(path).map(StdListener::Unix),
        }
    }

    /// A listening socket passed to this process (socket activation), TCP
    /// or unix, told apart by its address family.
    pub(crate) fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        let tcp = std::net::TcpListener::from(fd);
        if tcp.local_addr().is_ok() {
            return Ok(StdListener::Tcp(tcp));
        }
        let unix = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(tcp));
        unix.local_addr().map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("the inherited socket is neither TCP nor unix: {err}"),
            )
        })?;
        Ok(StdListener::Unix(unix))
    }

    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            StdListener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?.to_string())),
            StdListener::Unix(l) => Ok(unix_addr(l.local_addr()?.as_pathname())),
        }
    }

    /// The same socket for a worker's runtime.
    pub(crate) fn to_tokio(&self) -> io::Result<Listener> {
        match self {
            StdListener::Tcp(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(l)?))
            }
            StdListener::Unix(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(l)?))
            }
        }
    }

    /// Removes the socket file if this process bound it (see
    /// [`Listener::bind`]).
    pub(crate) fn remove_socket_if_bound_here(&self) {
        if let Ok(ListenAddr::Unix(path)) = self.local_addr() {
            remove_if_bound_here(&path);
        }
    }
}

/// A bind error that names the address (in Display form, for `main`).
fn cannot_listen(addr: &ListenAddr, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}"))
}

/// Removes a socket file left by an earlier run at `path`, that is, one
/// nothing accepts on; a socket a live server listens on is an error
/// ([`io::ErrorKind::AddrInUse`]), as is any other file there: neither is
/// ever deleted.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "cannot listen on unix:{}: a server is listening there",
                        path.display()
                    ),
                )),
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                }
                Err(err) => Err(io::Error::new(
                    err.kind(),
                    format!("cannot listen on unix:{}: {err}", path.display()),
                )),
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "cannot listen on unix:{}: the file exists and is not a socket",
                path.display()
            ),
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// An accepted connection.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

/// Who connected: in every request's extensions under `serve::http`
/// (and prefork's HTTP workers), where `Extension<Peer>` extracts it, with
/// axum's `ConnectInfo<SocketAddr>` beside it for a TCP peer (feature
/// `axum`). Under `serve::fastcgi` it is the web server's connection; the
/// HTTP client's address, as the web server saw it, is
/// [`RemoteAddr`](crate::serve::fastcgi::RemoteAddr) (and `ConnectInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A peer on a unix socket.
    Unix,
}

impl Peer {
    /// Puts this peer in a request's extensions, and axum's `ConnectInfo`
    /// beside it for a TCP peer (feature `axum`).
    #[cfg(feature = "http")]
    pub(crate) fn insert_into(self, extensions: &mut http::Extensions) {
        #[cfg(feature = "axum")]
        if let Peer::Tcp(addr) = self {
            extensions.insert(axum::extract::ConnectInfo(addr));
        }
        extensions.insert(self);
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix => f.write_str("unix socket peer"),
        }
    }
}
