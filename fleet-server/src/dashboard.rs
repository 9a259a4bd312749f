//! The dashboard: a static single-page app (`fleet-server/dashboard/`,
//! embedded in the binary) that reads the API with the admin's token.
//! No build step: plain JavaScript, and uPlot for the charts (vendored,
//! see `dashboard/assets/VENDORED.md`).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::api::AppState;

/// No inline scripts, nothing from elsewhere, never framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse + Clone {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `/` and `/assets/…`.
pub fn routes() -> Router<AppState> {
    let html = asset("text/html; charset=utf-8", include_str!("../dashboard/index.html"));
    let js = asset("text/javascript; charset=utf-8", include_str!("../dashboard/app.js"));
    let css = asset("text/css; charset=utf-8", include_str!("../dashboard/app.css"));
    let uplot_js = asset("text/javascript; charset=utf-8", include_str!("../dashboard/assets/uplot.iife.min.js"));
    let uplot_css = asset("text/css; charset=utf-8", include_str!("../dashboard/assets/uplot.min.css"));
    Router::new()
        .route("/", get(move || async move { html }))
        .route("/assets/app.js", get(move || async move { js }))
        .route("/assets/app.css", get(move || async move { css }))
        .route("/assets/uplot.iife.min.js", get(move || async move { uplot_js }))
        .route("/assets/uplot.min.css", get(move || async move { uplot_css }))
}
