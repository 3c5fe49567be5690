//! Serve a tower service until the first [`Exit`](crate::Exit), then drain.

pub mod http;

pub use self::http::{http, Serve};
