//! sentry-tower and sentry's panic integration, with sentry's test
//! transport (no network): a naive "report every error" layer plus sentry's
//! panic hook send an event for an exit returned as `Err` unless tunneled;
//! a real failure is sent exactly once either way, and an exit raised as an
//! unwind never runs the panic hook at all.

mod common;

use common::{handler, EXIT_ROUTES};
use http::{Request, StatusCode};
use sentry::protocol::Envelope;
use tower::util::MapErrLayer;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_exit::{ServiceBuilderExt, Supervisor};

/// The error events (not transactions) captured while running `paths`
/// through a fresh stack on a current-thread runtime bound to a test hub.
fn error_events(tunneled: bool, paths: &[&str]) -> (Vec<StatusCode>, usize) {
    let mut statuses = Vec::new();
    let envelopes: Vec<Envelope> = sentry::test::with_captured_envelopes_options(
        || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for path in paths {
                    let supervisor = Supervisor::new();
                    // The foreign part: sentry-tower's request layer and a
                    // reporter that sends every error to Sentry.
                    let foreign = ServiceBuilder::new()
                        .layer(sentry_tower::SentryHttpLayer::new().enable_transaction())
                        .layer(MapErrLayer::new(|err: BoxError| {
                            sentry::capture_error(&*err);
                            err
                        }))
                        .into_inner();
                    let base = ServiceBuilder::new().boundary(&supervisor).catch_panic();
                    let req = Request::get(*path).body(String::new()).unwrap();
                    let res = if tunneled {
                        base.tunnel(foreign).service_fn(handler).oneshot(req).await
                    } else {
                        base.layer(foreign).service_fn(handler).oneshot(req).await
                    };
                    statuses.push(res.map_or(StatusCode::BAD_GATEWAY, |r| r.status()));
                }
            });
        },
        // `apply_defaults` adds the default integrations, the panic hook among them.
        sentry::apply_defaults(sentry::ClientOptions {
            traces_sample_rate: 1.0,
            ..Default::default()
        }),
    );
    let events = envelopes.iter().filter(|e| e.event().is_some()).count();
    (statuses, events)
}

#[test]
fn without_the_tunnel_an_exit_returned_as_err_becomes_a_sentry_event() {
    let (statuses, events) = error_events(false, &["/err/3"]);
    assert_eq!(statuses, [StatusCode::SERVICE_UNAVAILABLE]);
    assert_eq!(events, 1, "the bug: an exit reported as an error");
}

#[test]
fn tunneled_exits_send_no_event_and_real_failures_send_one_each() {
    let (statuses, events) = error_events(true, &EXIT_ROUTES);
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert_eq!(events, 0);

    let (statuses, events) = error_events(true, &["/fail"]);
    assert_eq!(statuses, [StatusCode::BAD_GATEWAY], "the error passed on");
    assert_eq!(events, 1);

    let (statuses, events) = error_events(true, &["/panic"]);
    assert_eq!(statuses, [StatusCode::INTERNAL_SERVER_ERROR]);
    assert_eq!(events, 1, "sentry's panic hook sent the panic");

    let (_, events) = error_events(true, &["/ok"]);
    assert_eq!(events, 0);
}
