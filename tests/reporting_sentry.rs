//! `SentryReporter` with sentry's test transport (no network), below
//! sentry-tower's `SentryHttpLayer`: the right number and kind of events for
//! ok, error, panic, exit 0 and exit 3.

mod common;

use common::handler;
use http::Request;
use sentry::protocol::{Event, Level};
use tower::{ServiceBuilder, ServiceExt};
use tower_exit::report::{ExitPolicy, SentryReporter};
use tower_exit::{ReportLayer, ServiceBuilderExt, Supervisor};

fn events_for(path: &str, policy: ExitPolicy) -> Vec<Event<'static>> {
    sentry::test::with_captured_events(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let supervisor = Supervisor::new();
            let svc = ServiceBuilder::new()
                .boundary(&supervisor)
                .catch_panic()
                .layer(sentry_tower::NewSentryLayer::new_from_top())
                .layer(sentry_tower::SentryHttpLayer::new())
                .layer(ReportLayer::new(SentryReporter).report_exits(policy))
                .service_fn(handler);
            let req = Request::get(format!("http://example.test{path}"))
                .body(String::new())
                .unwrap();
            let _ = svc.oneshot(req).await;
        });
    })
}

#[test]
fn ok_sends_nothing() {
    assert!(events_for("/ok", ExitPolicy::All).is_empty());
}

#[test]
fn an_error_is_one_error_event_with_its_chain_and_the_request() {
    let events = events_for("/io/0", ExitPolicy::Never);
    // `/io/0` is an exit inside an io::Error: not an error. `/fail` is one.
    assert!(events.is_empty());
    let events = events_for("/fail", ExitPolicy::Never);
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.level, Level::Error);
    assert_eq!(
        event.exception.values.last().unwrap().value.as_deref(),
        Some("database is down")
    );
    let request = event
        .request
        .as_ref()
        .expect("request attached by sentry-tower");
    assert_eq!(request.method.as_deref(), Some("GET"));
    assert_eq!(request.url.as_ref().map(|u| u.path()), Some("/fail"));
}

#[test]
fn a_panic_is_one_fatal_event_with_its_message() {
    let events = events_for("/panic", ExitPolicy::Never);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].level, Level::Fatal);
    let exception = &events[0].exception.values[0];
    assert_eq!(
        (exception.ty.as_str(), exception.value.as_deref()),
        ("panic", Some("bug in handler"))
    );
}

#[test]
fn exits_are_messages_tagged_with_their_code_and_only_as_the_policy_says() {
    for path in ["/exit/0", "/err/0"] {
        assert!(events_for(path, ExitPolicy::Never).is_empty(), "{path}");
        assert!(events_for(path, ExitPolicy::NonZero).is_empty(), "{path}");
        let events = events_for(path, ExitPolicy::All);
        assert_eq!(events.len(), 1, "{path}");
        assert_eq!(events[0].level, Level::Info);
        assert!(
            events[0].exception.values.is_empty(),
            "an exit is never an exception"
        );
    }
    for path in ["/exit/3", "/err/3"] {
        assert!(events_for(path, ExitPolicy::Never).is_empty(), "{path}");
        let events = events_for(path, ExitPolicy::NonZero);
        assert_eq!(events.len(), 1, "{path}");
        let event = &events[0];
        assert_eq!(event.message.as_deref(), Some("exit 3"));
        assert_eq!(event.level, Level::Warning);
        assert_eq!(event.tags.get("exit.code").map(String::as_str), Some("3"));
        assert!(event.exception.values.is_empty());
    }
}
