//! HTTP routes and the router.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use sync_core::wire::{PushResponse, VersionResponse};
use tower::Layer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::blobs;
use crate::compression;
use crate::error::AppError;
use crate::keys;
use crate::metrics::track;
use crate::state::{features, push_response, AppState};
use crate::store::{NamespaceId, Storage};
use crate::validate::{self, flag, whole_number};
use crate::ws;

/// The whole HTTP and WebSocket API, under `base_path` (empty or `/` for the root).
pub fn router<S: Storage>(state: Arc<AppState<S>>, base_path: &str) -> Router {
    let body_limit = state.settings.limits.max_body_bytes;
    let cors = cors(&state.settings.cors_origins);
    let blob_routes = Router::new()
        .route(
            "/blobs/{sha256}",
            get(blobs::routes::download::<S>).put(blobs::routes::put::<S>),
        )
        .route("/blobs/{sha256}/status", get(blobs::routes::status::<S>))
        .layer(compression::blob_answers());
    let api = Router::new()
        .route(
            "/operations",
            get(fetch_operations::<S>).post(push_operations::<S>),
        )
        .route("/version", get(server_version::<S>))
        .route("/ws", get(ws::upgrade::<S>))
        .route("/", get(ws::root::<S>))
        .route("/health", get(health::<S>))
        .route("/metrics", get(metrics::<S>))
        .merge(blob_routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(compression::json_answers())
        .layer(compression::requests())
        .layer(middleware::map_response(compression::advertise))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            track,
        ))
        .with_state(state);
    // CORS wraps the whole router, so preflight requests (OPTIONS) are
    // answered before routing would refuse their method.
    let api = match cors {
        Some(cors) => Router::new().fallback_service(cors.layer(api)),
        None => api,
    };
    let base_path = base_path.trim_end_matches('/');
    if base_path.is_empty() {
        api
    } else {
        Router::new().nest(base_path, api).fallback(not_found)
    }
}

/// CORS for browser clients (the web editor): preflights are answered before
/// authentication; only the configured origins may read responses.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT])
            .allow_headers([AUTHORIZATION, CONTENT_TYPE, CONTENT_ENCODING, RANGE])
            .expose_headers([CONTENT_RANGE, ACCEPT_ENCODING])
            .max_age(Duration::from_secs(3600)),
    )
}

/// The namespace of the request's `Authorization: Bearer <key>`; 401 otherwise.
pub struct Namespace(pub NamespaceId);

impl<S: Storage> FromRequestParts<Arc<AppState<S>>> for Namespace {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<S>>,
    ) -> Result<Self, AppError> {
        let key = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(keys::bearer_token)
            .ok_or(AppError::Unauthorized)?;
        state
            .authenticate(key)
            .await?
            .map(Namespace)
            .ok_or(AppError::Unauthorized)
    }
}

#[derive(Deserialize)]
struct FetchParams {
    device: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    patches: Option<String>,
}

/// `GET /operations` answer, with operations as stored (no re-encoding).
#[derive(Serialize)]
struct FetchBody {
    operations: Vec<Box<RawValue>>,
    version: u64,
    has_more: bool,
    features: Vec<String>,
}

async fn fetch_operations<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
    params: Result<Query<FetchParams>, QueryRejection>,
) -> Result<Json<FetchBody>, AppError> {
    let Query(params) = params.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let since = params
        .since
        .as_deref()
        .map(|s| whole_number("since", s))
        .transpose()?
        .unwrap_or(0);
    let limit = params
        .limit
        .as_deref()
        .map(|l| whole_number("limit", l))
        .transpose()?
        .map(|l| match l {
            0 => Err(validate::InvalidInput::Query {
                name: "limit",
                reason: "must be at least 1",
            }),
            l => Ok(usize::try_from(l).unwrap_or(usize::MAX)),
        })
        .transpose()?;
    let patches = params
        .patches
        .as_deref()
        .map(|p| flag("patches", p))
        .transpose()?
        .unwrap_or(false);
    let page = state
        .fetch(ns, since, limit, params.device.as_deref(), patches)
        .await?;
    Ok(Json(FetchBody {
        operations: page.operations.into_iter().map(|op| op.json).collect(),
        version: page.version,
        has_more: page.has_more,
        features: features(),
    }))
}

async fn push_operations<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PushResponse>, AppError> {
    let limits = &state.settings.limits;
    let body = body.map_err(|e| AppError::from_body_rejection(e, limits.max_body_bytes))?;
    let push = validate::parse_push(&body, limits)?;
    let outcome = state.push(ns, push, None).await?;
    Ok(Json(push_response(outcome)))
}

async fn server_version<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
) -> Result<Json<VersionResponse>, AppError> {
    let version = state.store.version(ns).await?;
    Ok(Json(VersionResponse { version }))
}

async fn health<S: Storage>(State(state): State<Arc<AppState<S>>>) -> Response {
    match state.store.check_health().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "database unavailable" })),
            )
                .into_response()
        }
    }
}

async fn metrics<S: Storage>(State(state): State<Arc<AppState<S>>>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> AppError {
    AppError::NotFound
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}
