//! A retry policy wrapper that never retries an [`Exit`].
//!
//! A "retry every error" policy turns one intended exit into several runs of
//! the same work. [`ExitAware`] wraps any [`tower::retry::Policy`]: an
//! `Err` whose chain holds an `Exit` is returned at once; every other result
//! is left to the wrapped policy. (An `Exit` raised as an unwind is never
//! retried by `tower::retry` anyway: it does not catch unwinds.)
//!
//! # Example
//!
//! ```
//! use std::future::{ready, Ready};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::retry::{Policy, RetryLayer};
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//! use tower_exit::{retry::ExitAware, Exit};
//!
//! /// Retries every error, up to 3 times.
//! #[derive(Clone)]
//! struct RetryAll(usize);
//! impl<Req: Clone, Res, E> Policy<Req, Res, E> for RetryAll {
//!     type Future = Ready<()>;
//!     fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Ready<()>> {
//!         (result.is_err() && self.0 > 0).then(|| { self.0 -= 1; ready(()) })
//!     }
//!     fn clone_request(&mut self, req: &Req) -> Option<Req> { Some(req.clone()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(ExitAware::new(RetryAll(3))))
//!     .service_fn(move |_: ()| {
//!         counter.fetch_add(1, Ordering::SeqCst);
//!         async { Err::<(), BoxError>(Exit::new(2).into()) }
//!     });
//! assert!(svc.oneshot(()).await.is_err());
//! assert_eq!(calls.load(Ordering::SeqCst), 1); // one attempt, no retry
//! # }
//! ```

use crate::exit::{AsError, ConcreteError};
use crate::Exit;
use std::fmt;
use std::marker::PhantomData;
use tower::retry::Policy;

/// Wraps a retry policy so that it never retries an [`Exit`]. See [the
/// module docs](self).
///
/// `M` is the [`AsError`] marker of the service's error, always inferred.
pub struct ExitAware<P, M = ConcreteError> {
    policy: P,
    _error: PhantomData<fn() -> M>,
}

impl<P, M> ExitAware<P, M> {
    /// Wraps `policy`.
    pub fn new(policy: P) -> Self {
        ExitAware {
            policy,
            _error: PhantomData,
        }
    }

    /// The wrapped policy.
    pub fn get_ref(&self) -> &P {
        &self.policy
    }

    /// Unwraps the wrapped policy.
    pub fn into_inner(self) -> P {
        self.policy
    }
}

impl<P: Clone, M> Clone for ExitAware<P, M> {
    fn clone(&self) -> Self {
        ExitAware::new(self.policy.clone())
    }
}

impl<P: Copy, M> Copy for ExitAware<P, M> {}

impl<P: fmt::Debug, M> fmt::Debug for ExitAware<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ExitAware").field(&self.policy).finish()
    }
}

impl<P, M, Req, Res, E> Policy<Req, Res, E> for ExitAware<P, M>
where
    P: Policy<Req, Res, E>,
    E: AsError<M>,
{
    type Future = P::Future;

    fn retry(&mut self, req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        if let Err(err) = result {
            if Exit::from_service_error(err).is_some() {
                return None;
            }
        }
        self.policy.retry(req, result)
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        self.policy.clone_request(req)
    }
}
