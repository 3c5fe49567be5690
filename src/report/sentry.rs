//! [`SentryReporter`]: failures and reported exits to Sentry.

use super::{Dropped, Failure, Reporter};
use sentry_core::protocol::{Event, Exception, Level, Mechanism};

/// Sends reports to Sentry through the current hub (`sentry_core`):
///
/// - an error as an error event, its whole `source()` chain as exception
///   values;
/// - a panic as a fatal event with a `panic` exception carrying the message;
/// - an exit (only those the layer's [`ExitPolicy`](super::ExitPolicy)
///   reports) as a message event, never an exception: `exit 3: message`,
///   level `warning` (`info` for status 0), tagged `exit.code`;
/// - a [`RateLimited`](super::RateLimited) summary as a warning message.
///
/// Request method and URL are attached by sentry-tower's
/// `SentryHttpLayer` when it is above this reporter's layer (it adds them
/// to every event captured while the request runs).
///
/// Initialise Sentry as usual (`sentry::init`); without a client the
/// reports go nowhere, as with every Sentry integration.
#[derive(Clone, Copy, Debug, Default)]
pub struct SentryReporter;

impl Reporter for SentryReporter {
    fn report(&self, failure: &Failure<'_>) {
        let event = match failure {
            Failure::Error(err) => sentry_core::event_from_error(*err),
            Failure::Panic(_) => Event {
                exception: vec![Exception {
                    ty: "panic".into(),
                    value: failure.panic_message().map(str::to_owned),
                    mechanism: Some(Mechanism {
                        ty: "tower-exit".into(),
                        handled: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]
                .into(),
                level: Level::Fatal,
                ..Default::default()
            },
            Failure::Exit(exit) => {
                let mut event = Event {
                    message: Some(exit.to_string()),
                    level: if exit.is_success() {
                        Level::Info
                    } else {
                        Level::Warning
                    },
                    ..Default::default()
                };
                event
                    .tags
                    .insert("exit.code".into(), exit.code().to_string());
                event
            }
        };
        sentry_core::capture_event(event);
    }

    fn report_dropped(&self, dropped: &Dropped) {
        sentry_core::capture_message(&dropped.to_string(), Level::Warning);
    }
}
