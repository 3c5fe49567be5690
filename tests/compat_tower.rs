//! tower's own middleware, without and with the tunnel: `retry` with a
//! policy that retries every error, `buffer`, `timeout`, `load_shed` and
//! `BoxCloneService`. Requests here are a plain struct, so this also shows
//! `TunnelRequest` on a request type of your own.

mod common;

use bytes::Bytes;
use common::{handler, EXIT_ROUTES};
use http::{Request, Response};
use http_body_util::Full;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::retry::{Policy, RetryLayer};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_exit::tunnel::{TunnelRequest, TunnelSlot};
use tower_exit::{Exit, ServiceBuilderExt};

/// A request type of your own: it carries the tunnel's slot itself.
#[derive(Clone, Debug)]
struct Job {
    path: String,
    tunnel: Option<TunnelSlot>,
}

impl TunnelRequest for Job {
    fn insert_tunnel(&mut self, slot: TunnelSlot) {
        self.tunnel = Some(slot);
    }
    fn take_tunnel(&mut self) -> Option<TunnelSlot> {
        self.tunnel.take()
    }
}

fn job(path: &str) -> Job {
    Job {
        path: path.to_owned(),
        tunnel: None,
    }
}

type Reply = Result<Response<Full<Bytes>>, BoxError>;

/// The shared handler, counting its calls.
fn counted(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Job,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Reply> + Send,
> + Clone
       + Send {
    tower::service_fn(move |job: Job| {
        calls.fetch_add(1, Ordering::SeqCst);
        handler(Request::get(job.path.as_str()).body(()).unwrap())
    })
}

/// Where the exit came out: its code, as an unwind or as an `Err`.
async fn exit_code_of<S>(svc: S, path: &str) -> Option<i32>
where
    S: Service<Job, Response = Response<Full<Bytes>>, Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    match tokio::spawn(svc.oneshot(job(path))).await {
        Ok(Ok(_)) => None,
        Ok(Err(err)) => Exit::from_error(&*err).map(Exit::code),
        Err(join) => Exit::from_panic(&*join.into_panic()).map(Exit::code),
    }
}

/// Retries every error, up to 3 times: the naive policy.
#[derive(Clone)]
struct RetryAll(usize);

impl<Res, E> Policy<Job, Res, E> for RetryAll {
    type Future = Ready<()>;
    fn retry(&mut self, _: &mut Job, result: &mut Result<Res, E>) -> Option<Ready<()>> {
        (result.is_err() && self.0 > 0).then(|| {
            self.0 -= 1;
            ready(())
        })
    }
    fn clone_request(&mut self, req: &Job) -> Option<Job> {
        Some(req.clone())
    }
}

#[tokio::test]
async fn retry_all_retries_failures_and_an_untunneled_exit_but_never_a_tunneled_one() {
    let calls = Arc::new(AtomicUsize::new(0));
    let naive = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryAll(3)))
        .service(counted(calls.clone()));
    assert_eq!(exit_code_of(naive, "/err/3").await, Some(3));
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        4,
        "the bug: the exit ran 4 times"
    );

    let tunneled = || {
        ServiceBuilder::new()
            .tunnel(RetryLayer::new(RetryAll(3)))
            .service(counted(calls.clone()))
    };
    let err = tunneled().oneshot(job("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down");
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        4,
        "failures are retried as before"
    );
    for path in EXIT_ROUTES {
        assert_eq!(exit_code_of(tunneled(), path).await, Some(3), "{path}");
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "{path}: one attempt");
    }
}

#[tokio::test]
async fn buffer_passes_failures_and_tunnels_exits_raised_in_its_worker() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .tunnel(tower::buffer::BufferLayer::new(8))
        .service(counted(calls.clone()));
    let err = svc.clone().oneshot(job("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down");
    for path in EXIT_ROUTES {
        assert_eq!(exit_code_of(svc.clone(), path).await, Some(3), "{path}");
    }
    // The buffer's worker survived every exit.
    assert!(svc.oneshot(job("/ok")).await.is_ok());
}

#[tokio::test]
async fn timeout_fires_for_slow_work_and_never_while_an_exit_is_tunneled() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .tunnel(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            100,
        )))
        .service(counted(calls));
    let err = svc.clone().oneshot(job("/slow")).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    for path in EXIT_ROUTES {
        assert_eq!(exit_code_of(svc.clone(), path).await, Some(3), "{path}");
    }
}

#[tokio::test]
async fn load_shed_still_sheds_and_passes_exits_through_the_tunnel() {
    let calls = Arc::new(AtomicUsize::new(0));
    let shed = || {
        ServiceBuilder::new()
            .tunnel(tower::load_shed::LoadShedLayer::new())
            .concurrency_limit(1)
            .service(counted(calls.clone()))
    };
    // Shedding still works: the second request finds the limit taken.
    let mut svc = shed();
    let held = svc.ready().await.unwrap().call(job("/slow"));
    let shed_err = svc
        .ready()
        .await
        .unwrap()
        .call(job("/ok"))
        .await
        .unwrap_err();
    assert!(shed_err.is::<tower::load_shed::error::Overloaded>());
    assert!(held.await.is_ok());

    let err = shed().oneshot(job("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down");
    for path in EXIT_ROUTES {
        assert_eq!(exit_code_of(shed(), path).await, Some(3), "{path}");
    }
}

#[tokio::test]
async fn box_clone_service_is_tunneled_like_any_layer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .tunnel(BoxCloneService::<Job, Response<Full<Bytes>>, BoxError>::layer())
        .service(counted(calls));
    let err = svc.clone().oneshot(job("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down");
    for path in EXIT_ROUTES {
        assert_eq!(exit_code_of(svc.clone(), path).await, Some(3), "{path}");
    }
    let _: Reply = svc.oneshot(job("/ok")).await;
}
