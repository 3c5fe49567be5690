//! `Supervisor::stack()` behaves exactly like the four layers it stands for
//! (boundary, catch_panic, report, fork_guard, in that order): every
//! outcome, under every exit policy, with and without a reporter and a
//! guard, gives the same status, body, error, reports and recorded exit;
//! and a child forked under either ends the same way.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_exit::fork::{fork, Forked};
use tower_exit::report::{ExitPolicy, Failure};
use tower_exit::{Exit, ForkGuardLayer, ReportLayer, ServiceBuilderExt, Supervisor};

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    Error,
    Panic,
    PanicInCall,
    ExitRaised,
    ExitRaisedInCall,
    ExitRaisedZero,
    ExitErr,
    ExitNested,
    ExitBoxed,
    /// A plain response that carries an extension of its own.
    OkWithExtension,
    /// An exit returned as a response (`IntoResponse for Exit`).
    #[cfg(feature = "axum")]
    ExitAsResponse,
}

/// An extension of the handler's own, passed on untouched.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Marker(u32);

const OUTCOMES: &[Outcome] = &[
    Outcome::Ok,
    Outcome::Error,
    Outcome::Panic,
    Outcome::PanicInCall,
    Outcome::ExitRaised,
    Outcome::ExitRaisedInCall,
    Outcome::ExitRaisedZero,
    Outcome::ExitErr,
    Outcome::ExitNested,
    Outcome::ExitBoxed,
    Outcome::OkWithExtension,
    #[cfg(feature = "axum")]
    Outcome::ExitAsResponse,
];

type Reply = Result<Response<Full<Bytes>>, BoxError>;

/// A service ending with `outcome`, in `call` or in its future.
#[derive(Clone, Copy)]
struct Handler(Outcome);

impl Service<Request<()>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let outcome = self.0;
        match outcome {
            Outcome::PanicInCall => panic!("bug in call"),
            Outcome::ExitRaisedInCall => tower_exit::exit(6),
            _ => {}
        }
        Box::pin(async move {
            tokio::task::yield_now().await;
            match outcome {
                Outcome::Ok => Ok(Response::new(Full::new(Bytes::from_static(b"ok")))),
                Outcome::Error => Err("database is down".into()),
                Outcome::Panic => panic!("bug"),
                Outcome::ExitRaised => tower_exit::exit(3),
                Outcome::ExitRaisedZero => tower_exit::exit(0),
                Outcome::ExitErr => Err(Exit::new(4).into()),
                Outcome::ExitNested => Err(std::io::Error::other(Exit::new(5)).into()),
                Outcome::ExitBoxed => Err(Box::new(Exit::failure("boxed")) as BoxError),
                Outcome::OkWithExtension => {
                    let mut res = Response::new(Full::new(Bytes::from_static(b"marked")));
                    res.extensions_mut().insert(Marker(11));
                    Ok(res)
                }
                #[cfg(feature = "axum")]
                Outcome::ExitAsResponse => {
                    use axum_core::response::IntoResponse;
                    let (parts, _) = Exit::new(9).into_response().into_parts();
                    Ok(Response::from_parts(parts, Full::default()))
                }
                Outcome::PanicInCall | Outcome::ExitRaisedInCall => unreachable!(),
            }
        })
    }
}

/// What one request gave: status and body, or the error; the reports; the
/// recorded exit.
#[derive(Debug, PartialEq)]
struct Seen {
    answer: Result<(u16, String, Option<i32>, Option<Marker>), String>,
    reports: Vec<String>,
    recorded: Option<Exit>,
}

async fn drive<S, B>(svc: S, supervisor: &Supervisor, reports: &Arc<Mutex<Vec<String>>>) -> Seen
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Display,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let answer = match svc.oneshot(Request::new(())).await {
        Ok(res) => {
            let status = res.status().as_u16();
            let exit_code = res.extensions().get::<Exit>().map(Exit::code);
            let marker = res.extensions().get::<Marker>().copied();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Ok((
                status,
                String::from_utf8_lossy(&body).into_owned(),
                exit_code,
                marker,
            ))
        }
        Err(err) => Err(err.to_string()),
    };
    Seen {
        answer,
        reports: std::mem::take(&mut *reports.lock().unwrap()),
        recorded: supervisor.exit(),
    }
}

fn sink() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&Failure<'_>) + Clone + Send + Sync + 'static,
) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    (reports, move |f: &Failure<'_>| {
        sink.lock().unwrap().push(f.to_string())
    })
}

/// The four layers, by hand, in the recommended order.
async fn four_layers(outcome: Outcome, policy: ExitPolicy, report: bool, guard: bool) -> Seen {
    let supervisor = Supervisor::new();
    let (reports, reporter) = sink();
    let base = ServiceBuilder::new().boundary(&supervisor).catch_panic();
    match (report, guard) {
        (true, true) => {
            let svc = base
                .layer(ReportLayer::new(reporter).report_exits(policy))
                .layer(ForkGuardLayer::new())
                .service(Handler(outcome));
            drive(svc, &supervisor, &reports).await
        }
        (true, false) => {
            let svc = base
                .layer(ReportLayer::new(reporter).report_exits(policy))
                .service(Handler(outcome));
            drive(svc, &supervisor, &reports).await
        }
        (false, true) => {
            let svc = base.layer(ForkGuardLayer::new()).service(Handler(outcome));
            drive(svc, &supervisor, &reports).await
        }
        (false, false) => drive(base.service(Handler(outcome)), &supervisor, &reports).await,
    }
}

/// The one layer.
async fn one_layer(outcome: Outcome, policy: ExitPolicy, report: bool, guard: bool) -> Seen {
    let supervisor = Supervisor::new();
    let (reports, reporter) = sink();
    let mut stack = supervisor.stack().report_exits(policy);
    if guard {
        stack = stack.fork_guard(ForkGuardLayer::new());
    }
    if report {
        let svc = ServiceBuilder::new()
            .layer(stack.report(reporter))
            .service(Handler(outcome));
        drive(svc, &supervisor, &reports).await
    } else {
        let svc = ServiceBuilder::new().layer(stack).service(Handler(outcome));
        drive(svc, &supervisor, &reports).await
    }
}

#[tokio::test]
async fn one_layer_and_four_layers_agree_on_every_outcome() {
    let mut compared = 0;
    for &outcome in OUTCOMES {
        for policy in [ExitPolicy::Never, ExitPolicy::NonZero, ExitPolicy::All] {
            for report in [false, true] {
                for guard in [false, true] {
                    let four = four_layers(outcome, policy, report, guard).await;
                    let one = one_layer(outcome, policy, report, guard).await;
                    assert_eq!(
                        one, four,
                        "{outcome:?} {policy:?} report={report} guard={guard}"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, OUTCOMES.len() * 12);
    // The comparison can fail: the outcomes differ from one another.
    let ok = one_layer(Outcome::Ok, ExitPolicy::All, true, true).await;
    let panicked = one_layer(Outcome::Panic, ExitPolicy::All, true, true).await;
    assert_ne!(ok, panicked);
    assert_eq!(panicked.answer.as_ref().unwrap().0, 500);
    assert_eq!(panicked.reports, ["panicked: bug"]);
    let exited = one_layer(Outcome::ExitRaised, ExitPolicy::Never, true, true).await;
    assert_eq!(
        exited.answer,
        Ok((503, "Service Unavailable\n".into(), Some(3), None))
    );
    assert!(exited.reports.is_empty());
    assert_eq!(exited.recorded.map(|e| e.code()), Some(3));
    let marked = one_layer(Outcome::OkWithExtension, ExitPolicy::All, true, true).await;
    assert_eq!(
        marked.answer,
        Ok((200, "marked".into(), None, Some(Marker(11))))
    );
    #[cfg(feature = "axum")]
    {
        let returned = one_layer(Outcome::ExitAsResponse, ExitPolicy::Never, true, true).await;
        assert_eq!(
            returned.answer,
            Ok((503, "Service Unavailable\n".into(), Some(9), None))
        );
        assert_eq!(returned.recorded.map(|e| e.code()), Some(9));
    }
}

/// The parent's answer: how its child ended (exit code, signal).
async fn how_it_ended(
    mut child: tower_exit::fork::Child,
) -> std::io::Result<Response<Full<Bytes>>> {
    let status = child.wait().await?;
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{:?} {:?}",
        status.code(),
        status.signal()
    )))))
}

/// A handler that forks; the child raises `exit(7)`. The parent answers
/// with how the child ended.
async fn fork_then_exit(_: Request<()>) -> Reply {
    // SAFETY (test): the child only raises an exit, which the guard turns
    // into the end of the child without allocating.
    match unsafe { fork() }? {
        Forked::Child => tower_exit::exit(7),
        Forked::Parent(child) => Ok(how_it_ended(child).await?),
    }
}

#[tokio::test]
async fn a_forked_child_ends_the_same_under_one_layer_and_four() {
    for guard in [ForkGuardLayer::new(), ForkGuardLayer::new().exit_code()] {
        let supervisor = Supervisor::new();
        let four = ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .layer(guard)
            .service_fn(fork_then_exit);
        let (reports, _) = sink();
        let four = drive(four, &supervisor, &reports).await;
        let supervisor = Supervisor::new();
        let one = ServiceBuilder::new()
            .layer(supervisor.stack().fork_guard(guard))
            .service_fn(fork_then_exit);
        let one = drive(one, &supervisor, &reports).await;
        assert_eq!(one, four);
        assert!(
            one.recorded.is_none(),
            "the child's exit is not the parent's"
        );
        let body = one.answer.unwrap().1;
        assert!(body == "None Some(15)" || body == "Some(7) None", "{body}");
    }
}

/// The error types users write: an enum that carries an exit through
/// thiserror's `#[from]` or `#[source]`.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("stopping")]
    Stop(#[from] Exit),
    #[error("wrapped")]
    Wrapped {
        #[source]
        exit: Exit,
    },
    #[error("fork failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A handler that forks; the child returns the exit inside an `AppError`
/// (`wrapped` says which variant). The parent answers with how it ended.
async fn fork_then_return(wrapped: bool) -> Result<Response<Full<Bytes>>, AppError> {
    // SAFETY (test): the child only returns an error, which the guard
    // turns into the end of the child without allocating.
    match unsafe { fork() }? {
        Forked::Child if wrapped => Err(AppError::Wrapped { exit: Exit::new(7) }),
        Forked::Child => Err(Exit::new(7).into()),
        Forked::Parent(child) => Ok(how_it_ended(child).await?),
    }
}

#[tokio::test]
async fn a_child_returning_an_app_error_ends_with_its_exit_under_one_layer_and_four() {
    for wrapped in [false, true] {
        for (guard, expected) in [
            (ForkGuardLayer::new(), "None Some(15)"),
            (ForkGuardLayer::new().exit_code(), "Some(7) None"),
        ] {
            let supervisor = Supervisor::new();
            let four = ServiceBuilder::new()
                .boundary(&supervisor)
                .catch_panic()
                .layer(guard)
                .service_fn(move |_: Request<()>| fork_then_return(wrapped));
            let (reports, _) = sink();
            let four = drive(four, &supervisor, &reports).await;
            let supervisor = Supervisor::new();
            let one = ServiceBuilder::new()
                .layer(supervisor.stack().fork_guard(guard))
                .service_fn(move |_: Request<()>| fork_then_return(wrapped));
            let one = drive(one, &supervisor, &reports).await;
            assert_eq!(one, four, "wrapped={wrapped} {guard:?}");
            assert_eq!(
                four.answer.as_ref().map(|a| a.1.as_str()),
                Ok(expected),
                "wrapped={wrapped} {guard:?}"
            );
            assert!(
                one.recorded.is_none(),
                "the child's exit is not the parent's"
            );
        }
    }
}
