//! The HTTP side of a WebSocket handshake, without I/O: the 101 answer, the bearer token a
//! request presents (three places), the 401 challenge, and the client a trusted proxy forwards.
//! Tokens are never logged here or anywhere else.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{
    AUTHORIZATION, HeaderMap, HeaderValue, SEC_WEBSOCKET_PROTOCOL, WWW_AUTHENTICATE,
};
use hyper::{Response, StatusCode};

/// Every answer the HTTP side gives.
pub type HttpResponse = Response<Full<Bytes>>;

/// The subprotocol the server selects when a client offers it (browsers offer it together with
/// `bearer.<token>`, so that the selected protocol is never the token itself).
pub const SUBPROTOCOL: &str = "purchases.v1";
const PROTOCOL_TOKEN_PREFIX: &str = "bearer.";

/// A plain-text answer.
pub fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    owned_text(status, body.to_owned())
}

/// A plain-text answer made at run time.
pub fn owned_text(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The 101 answer to a valid upgrade request (RFC 6455 §4.2.2), or `None` without a key or with
/// another version. The connection itself is taken over with `hyper::upgrade::on`, so that
/// [`crate::connection::serve`] can put its [`crate::close_gate::CloseGate`] under tungstenite.
pub fn switching_protocols(headers: &HeaderMap) -> Option<HttpResponse> {
    let key = headers.get("sec-websocket-key")?;
    if headers
        .get("sec-websocket-version")
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return None;
    }
    let accept = hyper_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()))
        .ok()
}

/// The token a handshake carries, and whether the client offered [`SUBPROTOCOL`].
pub struct Presented {
    pub token: Option<String>,
    pub offered_subprotocol: bool,
}

/// The token from `Authorization: Bearer`, else a `bearer.<token>` subprotocol offer, else the
/// `access_token` query parameter.
pub fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Presented {
    let offers: Vec<&str> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let from_header = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(auth::bearer);
    let from_protocol = offers
        .iter()
        .find_map(|offer| offer.strip_prefix(PROTOCOL_TOKEN_PREFIX));
    let from_query = query.and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
    });
    Presented {
        token: from_header
            .or(from_protocol)
            .or(from_query)
            .map(str::to_owned),
        offered_subprotocol: offers.contains(&SUBPROTOCOL),
    }
}

/// 401 with the RFC 6750 challenge; the reason names the failed check, never the token.
pub fn unauthorized(error: &auth::AuthError) -> HttpResponse {
    let challenge = match error {
        auth::AuthError::Missing => r#"Bearer realm="purchases""#.to_owned(),
        other => format!(
            r#"Bearer realm="purchases", error="invalid_token", error_description="{other}""#
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(format!("unauthorized: {error}\n"))));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}

/// The client a trusted proxy forwards: from `Forwarded: for=` (RFC 7239) or else
/// `X-Forwarded-For`, the rightmost address that is not itself a trusted proxy. `None` when the
/// headers name none, or that entry is not an address (`unknown`, an obfuscated name).
pub fn forwarded_client(headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> Option<std::net::IpAddr> {
    let values = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let forwarded: Vec<&str> = values("forwarded")
        .into_iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then_some(value.trim())
            })
        })
        .collect();
    let nodes = if forwarded.is_empty() {
        values("x-forwarded-for")
    } else {
        forwarded
    };
    for node in nodes.iter().rev() {
        let address = node_address(node)?;
        if !trusted.iter().any(|net| net.contains(&address)) {
            return Some(address);
        }
    }
    None
}

/// The address of one forwarded node: `192.0.2.1`, `192.0.2.1:8080`, `"[2001:db8::1]:8080"`.
fn node_address(node: &str) -> Option<std::net::IpAddr> {
    let node = node.trim_matches('"');
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.parse()
        .ok()
        .or_else(|| node.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    #[test]
    fn the_authorization_header_wins_over_the_subprotocol_and_the_query() {
        let offered = headers(&[
            ("authorization", "Bearer from-header"),
            (
                "sec-websocket-protocol",
                "purchases.v1, bearer.from-protocol",
            ),
        ]);
        let presented = presented_token(&offered, Some("access_token=from-query"));
        assert_eq!(presented.token.as_deref(), Some("from-header"));
        assert!(presented.offered_subprotocol);
        let presented = presented_token(
            &headers(&[("sec-websocket-protocol", "bearer.from-protocol")]),
            Some("a=1&access_token=from-query"),
        );
        assert_eq!(presented.token.as_deref(), Some("from-protocol"));
        assert!(!presented.offered_subprotocol);
        let presented = presented_token(&HeaderMap::new(), Some("a=1&access_token=from-query"));
        assert_eq!(presented.token.as_deref(), Some("from-query"));
        assert_eq!(presented_token(&HeaderMap::new(), None).token, None);
    }

    #[test]
    fn an_upgrade_needs_a_key_and_version_13() {
        let key = ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        let answer = switching_protocols(&headers(&[key, ("sec-websocket-version", "13")]))
            .expect("a valid upgrade");
        assert_eq!(answer.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455's own example.
        assert_eq!(
            answer.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(switching_protocols(&headers(&[key, ("sec-websocket-version", "8")])).is_none());
        assert!(switching_protocols(&headers(&[("sec-websocket-version", "13")])).is_none());
    }

    #[test]
    fn the_forwarded_client_is_the_rightmost_untrusted_address() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let client = |pairs: &[(&'static str, &str)]| forwarded_client(&headers(pairs), &trusted);
        assert_eq!(
            client(&[("x-forwarded-for", "198.51.100.1, 203.0.113.9, 10.0.0.2")]),
            Some("203.0.113.9".parse().expect("ip"))
        );
        // `Forwarded` wins over `X-Forwarded-For`; ports and brackets are dropped.
        assert_eq!(
            client(&[
                (
                    "forwarded",
                    r#"for="[2001:db8::1]:4711";proto=https, for=10.1.1.1"#
                ),
                ("x-forwarded-for", "198.51.100.1"),
            ]),
            Some("2001:db8::1".parse().expect("ip"))
        );
        assert_eq!(
            client(&[("x-forwarded-for", "192.0.2.7:8080")]),
            Some("192.0.2.7".parse().expect("ip"))
        );
        assert_eq!(client(&[("forwarded", "for=unknown")]), None);
        assert_eq!(client(&[]), None);
    }

    #[test]
    fn a_refused_token_gets_the_bearer_challenge_naming_the_check() {
        let missing = unauthorized(&auth::AuthError::Missing);
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            missing.headers()[WWW_AUTHENTICATE],
            r#"Bearer realm="purchases""#
        );
        let expired = unauthorized(&auth::AuthError::Expired);
        let challenge = expired.headers()[WWW_AUTHENTICATE].to_str().expect("ascii");
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "{challenge}"
        );
    }
}
