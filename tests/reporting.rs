//! The exit policy of `ReportLayer` for every outcome, through a real
//! stack; `SentryReporter` with sentry's test transport; `RateLimited`
//! under a storm of 10,000 panics.

mod common;

use common::handler;
use http::{Request, StatusCode};
use std::sync::{Arc, Mutex};
use tower::{ServiceBuilder, ServiceExt};
use tower_exit::report::{Dropped, ExitPolicy, Failure, RateLimited, Reporter};
use tower_exit::{ReportLayer, ServiceBuilderExt, Supervisor};

/// Records every report as a line, and every drop summary.
#[derive(Clone, Default)]
struct Recorder {
    lines: Arc<Mutex<Vec<String>>>,
    dropped: Arc<Mutex<Vec<Dropped>>>,
}

impl Reporter for Recorder {
    fn report(&self, failure: &Failure<'_>) {
        let kind = match failure {
            Failure::Error(_) => "error",
            Failure::Panic(_) => "panic",
            Failure::Exit(_) => "exit",
            _ => "other",
        };
        self.lines
            .lock()
            .unwrap()
            .push(format!("{kind}: {failure}"));
    }
    fn report_dropped(&self, dropped: &Dropped) {
        self.dropped.lock().unwrap().push(*dropped);
    }
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.lines.lock().unwrap())
    }
}

/// The recommended stack; returns the status answered and the code the
/// boundary recorded.
async fn through_stack(
    recorder: &Recorder,
    policy: ExitPolicy,
    path: &str,
) -> (StatusCode, Option<i32>) {
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .catch_panic()
        .layer(ReportLayer::new(recorder.clone()).report_exits(policy))
        .service_fn(handler);
    let status = match svc.oneshot(Request::get(path).body(()).unwrap()).await {
        Ok(res) => res.status(),
        Err(_) => StatusCode::BAD_GATEWAY,
    };
    (status, supervisor.exit().map(|e| e.code()))
}

#[tokio::test]
async fn every_policy_for_every_outcome() {
    use ExitPolicy::*;
    /// Path, status answered, exit recorded, and the reports per policy.
    type Case<'a> = (
        &'a str,
        StatusCode,
        Option<i32>,
        &'a [(ExitPolicy, &'a [&'a str])],
    );
    let cases: &[Case<'_>] = &[
        (
            "/ok",
            StatusCode::OK,
            None,
            &[(Never, &[]), (NonZero, &[]), (All, &[])],
        ),
        (
            "/fail",
            StatusCode::BAD_GATEWAY,
            None,
            &[
                (Never, &["error: database is down"]),
                (NonZero, &["error: database is down"]),
                (All, &["error: database is down"]),
            ],
        ),
        (
            "/panic",
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &[
                (Never, &["panic: panicked: bug in handler"]),
                (NonZero, &["panic: panicked: bug in handler"]),
                (All, &["panic: panicked: bug in handler"]),
            ],
        ),
    ];
    let recorder = Recorder::default();
    for (path, status, code, by_policy) in cases {
        for (policy, expected) in *by_policy {
            assert_eq!(
                through_stack(&recorder, *policy, path).await,
                (*status, *code),
                "{path} {policy:?}"
            );
            assert_eq!(recorder.take(), *expected, "{path} {policy:?}");
        }
    }
    // Exits, as unwind and as `Err`: reported as exits per the policy, and
    // answered and recorded the same whatever the policy.
    for (form, code) in [
        ("exit", 0),
        ("exit", 3),
        ("err", 0),
        ("err", 3),
        ("nested", 3),
        ("spawn", 0),
    ] {
        let path = format!("/{form}/{code}");
        for policy in [Never, NonZero, All] {
            let outcome = through_stack(&recorder, policy, &path).await;
            assert_eq!(
                outcome,
                (StatusCode::SERVICE_UNAVAILABLE, Some(code)),
                "{path} {policy:?}"
            );
            let reported = match (policy, code) {
                (Never, _) | (NonZero, 0) => vec![],
                _ => vec![format!("exit: exit {code}")],
            };
            assert_eq!(recorder.take(), reported, "{path} {policy:?}");
        }
    }
}

#[tokio::test]
async fn a_storm_of_panics_sends_a_bounded_number_of_reports_and_exact_summaries() {
    std::panic::set_hook(Box::new(|_| {}));
    let recorder = Recorder::default();
    let limited = Arc::new(RateLimited::new(recorder.clone(), 10, 20));
    let reporter = limited.clone();
    let svc = ServiceBuilder::new()
        .catch_panic()
        .layer(ReportLayer::new(move |f: &Failure<'_>| reporter.report(f)))
        .service_fn(handler);
    let started = std::time::Instant::now();
    for _ in 0..10_000 {
        let res = svc
            .clone()
            .oneshot(Request::get("/panic").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "every request answered"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = std::panic::take_hook();

    let sent = recorder.take().len() as u64;
    let bound = 20 + (elapsed * 10.0).ceil() as u64;
    assert!(
        sent <= bound,
        "{sent} reports in {elapsed:.2}s, bound {bound}"
    );
    assert!(sent >= 20, "the burst goes through");

    limited.flush();
    // Summaries go out only just before a report let through, and once at
    // the flush: bounded too. Together with what was sent, they account
    // for every one of the 10,000 panics, exactly.
    let summaries = recorder.dropped.lock().unwrap().clone();
    assert!(
        summaries.len() as u64 <= sent - 20 + 1,
        "{} summaries",
        summaries.len()
    );
    let dropped: u64 = summaries.iter().map(|d| d.panics).sum();
    assert!(summaries.iter().all(|d| d.errors == 0 && d.exits == 0));
    assert_eq!(sent + dropped, 10_000, "the summaries are exact");
}

#[tokio::test]
async fn the_summary_goes_out_before_the_next_report_let_through() {
    let recorder = Recorder::default();
    let limited = RateLimited::new(recorder.clone(), 1000, 1);
    let err = std::io::Error::other("boom");
    limited.report(&Failure::Error(&err));
    limited.report(&Failure::Error(&err));
    limited.report(&Failure::Error(&err));
    assert_eq!(recorder.take().len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    limited.report(&Failure::Error(&err));
    assert_eq!(recorder.take().len(), 1);
    assert_eq!(
        *recorder.dropped.lock().unwrap(),
        [Dropped {
            errors: 2,
            panics: 0,
            exits: 0
        }]
    );
}
