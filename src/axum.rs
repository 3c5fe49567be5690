//! For axum (feature `axum`): `IntoResponse for Exit` (a handler returning
//! `Result<T, Exit>`, or `?` on an `Exit`, ends the server like a raised
//! exit, and in abort builds too: nothing unwinds), and the probes
//! [`ready`] and [`live`] as handlers.

use crate::catch::ExitResponse;
use crate::Exit;
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;

/// The exit becomes a `503` that carries it: the
/// [`BoundaryLayer`](crate::BoundaryLayer) above (or
/// [`serve::http`](crate::serve::http())/[`serve::fastcgi`](crate::serve::fastcgi())
/// when there is no boundary) records it as if it had been raised: the
/// server drains and ends with its code.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_exit::Exit;
///
/// async fn shutdown() -> Result<&'static str, Exit> {
///     Err(Exit::new(3).with_message("asked to stop"))
/// }
///
/// let app: Router = Router::new().route("/shutdown", get(shutdown));
/// ```
///
/// Where nothing exit-aware will see the response (no boundary, a server
/// other than this crate's), the client gets the `503` and the exit is
/// logged at ERROR, not lost silently.
impl IntoResponse for Exit {
    #[track_caller]
    fn into_response(self) -> Response {
        // Rule 1 holds here too: in a forked child this is where it ends.
        crate::exit::end_child_if_ruled(&self);
        if !crate::exit::context().caught() {
            crate::exit::say_unheeded(
                &self,
                Some(std::panic::Location::caller()),
                "exit returned as a response where no boundary or server of tower-exit sees it: \
                 the client gets a 503, nothing drains",
            );
        }
        let mut res = (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n").into_response();
        res.extensions_mut().insert(ExitResponse(self));
        res
    }
}

/// Readiness as an axum handler, for a router whose state holds the
/// [`Supervisor`](crate::Supervisor) (or gives it through `FromRef`):
/// `200 ready`, then `503 draining` from the first moment of a shutdown
/// delay or drain. The same as [`Supervisor::readiness`](crate::Supervisor::readiness),
/// which `Router::route_service` takes too.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_exit::Supervisor;
///
/// let supervisor = Supervisor::new();
/// let app: Router = Router::new()
///     .route("/ready", get(tower_exit::axum::ready))
///     .route("/live", get(tower_exit::axum::live))
///     .with_state(supervisor);
/// ```
pub async fn ready(
    axum::extract::State(supervisor): axum::extract::State<crate::Supervisor>,
) -> Response {
    supervisor.readiness().response().into_response()
}

/// Liveness as an axum handler: `200 live` while the process answers,
/// through the shutdown delay and the drain.
pub async fn live() -> Response {
    crate::Liveness.response().into_response()
}
