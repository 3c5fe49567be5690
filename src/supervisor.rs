//! The [`Supervisor`]: one per server, it records the first [`Exit`] and
//! tells the server to drain; [`Supervisor::stack`] gives the exit-aware
//! stack that reports to it, [`Supervisor::layer`] its boundary alone.

use crate::boundary::BoundaryLayer;
use crate::catch_panic::DefaultResponseForPanic;
use crate::exit::Exit;
use crate::stack::{ExitStackLayer, NoReporter};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// Records the first [`Exit`] of a server and tells the server to stop.
///
/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Supervisor {
    // `watch` keeps the value for late subscribers: a `shutdown_signal()`
    // taken after the exit was recorded resolves at once.
    exit: Arc<watch::Sender<Option<Exit>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("exit", &self.exit())
            .finish()
    }
}

impl Supervisor {
    /// The whole exit-aware stack as one layer (see [`ExitStackLayer`]):
    /// put it outermost, where [`layer`](Self::layer) would go.
    pub fn stack<M>(&self) -> ExitStackLayer<DefaultResponseForPanic, NoReporter, M> {
        ExitStackLayer::new(self)
    }

    /// A supervisor with no exit recorded.
    pub fn new() -> Self {
        Supervisor {
            exit: Arc::new(watch::Sender::new(None)),
        }
    }

    /// The boundary layer that reports exits to this supervisor; put it
    /// outermost.
    pub fn layer<M>(&self) -> BoundaryLayer<M> {
        BoundaryLayer::new(self)
    }

    /// Records `exit` unless one is already recorded, and wakes every
    /// [`shutdown_signal`](Self::shutdown_signal) and [`wait`](Self::wait).
    /// Returns whether this exit was the first.
    ///
    /// Servers call this on SIGTERM/SIGINT with [`Exit::success`].
    pub fn trigger(&self, exit: Exit) -> bool {
        self.exit.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(exit);
            true
        })
    }

    /// The first recorded exit, if any.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Resolves to the first exit (at once if one is recorded already).
    pub fn wait(&self) -> impl Future<Output = Exit> + Send + 'static {
        let supervisor = self.clone();
        async move {
            let mut rx = supervisor.exit.subscribe();
            // The sender lives in `supervisor`, held by this future, so the
            // channel cannot close while we wait.
            let exit = rx
                .wait_for(Option::is_some)
                .await
                .expect("sender is held by this future");
            exit.clone().expect("waited for Some")
        }
    }

    /// Resolves once an exit is recorded: the signal a server's graceful
    /// shutdown waits for (`axum::serve(..).with_graceful_shutdown(..)`,
    /// hyper-util's `GracefulShutdown`).
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let wait = self.wait();
        async move {
            let _first_exit = wait.await;
        }
    }
}
