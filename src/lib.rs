//! Tell a control-flow [`Exit`] apart from real failures in tower stacks.
//!
//! A program sometimes ends a piece of work on purpose: [`exit(code)`](fn@exit).
//! Catch-all layers (error reporters, "catch every panic and answer 500",
//! retry-everything policies) treat that signal as a failure: they report a
//! non-error, retry it, or answer `500`. After `fork()` it is worse: the
//! child's exit is swallowed and the child runs on into the parent's code.
//!
//! This crate gives tower stacks:
//!
//! - [`Exit`], which travels as an unwind or as `Err` and is told apart from
//!   real failures in one place ([`Exit::from_panic`], [`Exit::from_error`]);
//! - [`Supervisor::stack`], the exit-aware stack as one layer (the example
//!   below), whose parts also exist alone: the [`BoundaryLayer`] where an
//!   exit ends the server and becomes the exit code of `main`, and layers
//!   that pass an exit on untouched and still handle real failures:
//!   [`CatchPanicLayer`], [`ReportLayer`], [`retry::ExitAware`];
//! - [`TunnelLayer`], which carries an exit around a layer you do not
//!   control (tower-http's catch-panic, a reporter, a retry-everything
//!   policy, a timeout);
//! - servers that drain on an exit and resolve to it: [`serve`];
#![cfg_attr(
    all(unix, feature = "fork"),
    doc = "- [`ForkGuardLayer`] and [`fork`], so that a forked child never runs on into the parent's code."
)]
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use std::process::ExitCode;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_exit::{Supervisor, TracingReporter};
//!
//! async fn handler(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     // The work is done; end the program on purpose, status 0.
//!     tower_exit::exit(0)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> ExitCode {
//! let supervisor = Supervisor::new();
//! let svc = ServiceBuilder::new()
//!     // The exit-aware stack as one layer: exit → 503 and the server
//!     // drains; panic → 500; real failures reported once, never an exit.
//!     .layer(supervisor.stack().report(TracingReporter))
//!     .service_fn(handler);
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! // A server drains on `supervisor.shutdown_signal()`, then:
//! supervisor.exit().map_or(ExitCode::FAILURE, ExitCode::from)
//! # }
//! ```
#![deny(missing_docs, rust_2018_idioms, unreachable_pub, unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Items that exist only where processes fork (unix, feature `fork`): one
/// spelling of the condition.
macro_rules! cfg_fork {
    ($($item:item)*) => {
        $( #[cfg(all(unix, feature = "fork"))] $item )*
    };
}

/// The boxed error the crate's services and servers return.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `get_ref`, `get_mut` and `into_inner` (tower-http's accessors) for a
/// service that wraps another in its `$field`, written once.
macro_rules! inner_accessors {
    ($service:ident<$inner:ident $(, $param:ident)*>, $field:ident) => {
        impl<$inner $(, $param)*> $service<$inner $(, $param)*> {
            /// The inner service.
            pub fn get_ref(&self) -> &$inner {
                &self.$field
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut $inner {
                &mut self.$field
            }

            /// The inner service, unwrapped.
            pub fn into_inner(self) -> $inner {
                self.$field
            }
        }
    };
}

#[cfg(feature = "axum")]
pub mod axum;
mod body;
mod builder;
mod catch;
mod grpc;
mod hooks;

pub mod boundary;
pub mod catch_panic;
pub mod exit;
cfg_fork! {
    pub mod fork;
    pub mod fork_guard;
}
pub mod report;
pub mod retry;
#[cfg(all(unix, any(feature = "http", feature = "fastcgi")))]
pub mod serve;
pub mod stack;
mod supervisor;
#[cfg(all(unix, any(feature = "fork", feature = "http", feature = "fastcgi")))]
mod sys;
#[cfg(feature = "tonic")]
pub mod tonic;
#[cfg(feature = "tower-http")]
pub mod trace;
pub mod tunnel;

pub use crate::body::ResponseBody;
pub use crate::boundary::BoundaryLayer;
pub use crate::builder::ServiceBuilderExt;
pub use crate::catch_panic::CatchPanicLayer;
pub use crate::exit::{exit, AsError, Exit};
cfg_fork! {
    pub use crate::fork_guard::ForkGuardLayer;
}
pub use crate::report::{ReportLayer, TracingReporter};
pub use crate::stack::ExitStackLayer;
pub use crate::supervisor::{Hold, Liveness, Readiness, Supervisor};
pub use crate::tunnel::TunnelLayer;
