//! The purchase console: a single page at `GET /` (HTML, CSS and JavaScript embedded in the
//! binary; no build step, no CDN), that sends purchases over this server's WebSocket and reads
//! totals from grpc_kafka over gRPC-Web (`CONSOLE_TOTALS_URL`). Served with a Content Security
//! Policy that allows only this server, its WebSocket and that one totals origin.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// What the page needs from the server's settings.
#[derive(Debug, Clone)]
pub struct Console {
    /// `{"totals_url": ...}` for the page.
    config: Bytes,
    /// The totals origin for `connect-src` (empty when not configured).
    totals_origin: String,
}

impl Console {
    pub fn new(totals_url: Option<&str>) -> Self {
        let totals_url = totals_url.map(|url| url.trim_end_matches('/'));
        let config = serde_json::json!({ "totals_url": totals_url }).to_string();
        Self {
            config: Bytes::from(config),
            totals_origin: totals_url.map(str::to_owned).unwrap_or_default(),
        }
    }

    /// The console's response to `path`, if it is one of its routes. `host` is the request's
    /// Host header: the page's WebSocket goes there.
    pub fn route(&self, path: &str, host: Option<&str>) -> Option<Response<Full<Bytes>>> {
        let (body, content_type) = match path {
            "/" => (
                Bytes::from_static(INDEX.as_bytes()),
                "text/html; charset=utf-8",
            ),
            "/console.js" => (
                Bytes::from_static(SCRIPT.as_bytes()),
                "text/javascript; charset=utf-8",
            ),
            "/console.css" => (
                Bytes::from_static(STYLE.as_bytes()),
                "text/css; charset=utf-8",
            ),
            "/console/config.json" => (self.config.clone(), "application/json"),
            "/favicon.ico" => {
                // No icon: answered, so browsers do not log a failed load.
                let mut empty = Response::new(Full::new(Bytes::new()));
                *empty.status_mut() = StatusCode::NO_CONTENT;
                return Some(empty);
            }
            _ => return None,
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(policy) = HeaderValue::from_str(&self.policy(host)) {
            headers.insert(CONTENT_SECURITY_POLICY, policy);
        }
        Some(response)
    }

    fn policy(&self, host: Option<&str>) -> String {
        // The WebSocket of the host the page came from, named explicitly (older browsers do not
        // count ws: as 'self'); a Host with other characters is left out, never echoed.
        let sockets = host
            .filter(|h| {
                h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
            })
            .map(|h| format!(" ws://{h} wss://{h}"))
            .unwrap_or_default();
        let totals = if self.totals_origin.is_empty() {
            String::new()
        } else {
            format!(" {}", self.totals_origin)
        };
        format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'{sockets}{totals}; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    }
}

/// Checks `CONSOLE_TOTALS_URL`: an http(s) origin, without path, query or credentials.
pub fn parse_totals_url(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| format!("{text:?} is not an http(s) URL such as http://127.0.0.1:50051"))?;
    if rest.is_empty()
        || !rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
    {
        return Err(format!(
            "{text:?} must be scheme://host[:port] (grpc_kafka's gRPC-Web address), nothing more"
        ));
    }
    Ok(text.to_owned())
}
