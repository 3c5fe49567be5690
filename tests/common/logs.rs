//! Captures `tracing` events as structured records, to assert on what an
//! operator would see: level, message and each field once.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// One event: its level and its fields in order (`message` included).
#[derive(Clone, Debug)]
pub struct Event {
    pub level: Level,
    pub fields: Vec<(String, String)>,
}

impl Event {
    /// The value of field `name` (the first, if it was given twice).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn message(&self) -> &str {
        self.get("message").unwrap_or_default()
    }
}

/// The events seen by the subscriber `capture` installed.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<Event>>>);

impl Logs {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// The events whose message contains `text`.
    pub fn with_message(&self, text: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.message().contains(text))
            .collect()
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: Subscriber> Layer<S> for Logs {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Event {
            level: *event.metadata().level(),
            fields,
        });
    }
}

/// Captures the events of this thread until the guard drops: use a
/// current-thread runtime so that every task's events are seen.
pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::registry().with(logs.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}
