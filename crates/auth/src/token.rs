//! Tokens as this system writes and reads them: the claims, minting an HS256 token (walletctl,
//! the tests), and the bearer value of an `Authorization` header.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The claims this system reads and mints. `aud` may be a string or a list in tokens from other
/// issuers; `jsonwebtoken` checks it from the raw claims, so it is only written here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    // Defaults only so that a missing claim is reported by the validation, by name.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Space-separated scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a development token says: mint one with [`mint_hs256`] (`walletctl token`).
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub subject: &'a str,
    pub scopes: &'a [&'a str],
    pub lifetime: Duration,
    pub issuer: &'a str,
    pub audience: &'a str,
}

/// Signs a token with an HS256 secret (the development key file of `JWT_HS256_SECRET_FILE`).
pub fn mint_hs256(secret: &[u8], request: &TokenRequest<'_>) -> Result<String, String> {
    let now = now_secs();
    let claims = Claims {
        sub: request.subject.to_owned(),
        exp: now + request.lifetime.as_secs().max(1),
        nbf: Some(now),
        iat: Some(now),
        iss: Some(request.issuer.to_owned()),
        aud: Some(request.audience.to_owned()),
        scope: (!request.scopes.is_empty()).then(|| request.scopes.join(" ")),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| e.to_string())
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
