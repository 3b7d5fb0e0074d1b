//! Who may do what, for both services: bearer JWTs verified with `jsonwebtoken`, and the scopes
//! that widen what a token's subject may do.
//!
//! The rules (ARCHITECTURE.md, "Trust model"):
//! - a token's subject (`sub`) may submit purchases for, and read the total of, the user id equal
//!   to it, and nothing else;
//! - scope [`SCOPE_WRITE_ANY`] lets a trusted backend submit for any user, and [`SCOPE_READ_ANY`]
//!   lets it read any user's total (the `scope` claim is a space-separated list, as in RFC 8693);
//! - `exp`, `iss`, `aud` and `sub` are required; `nbf` is checked when present; the header's `alg`
//!   must be the one its key was configured for, so `alg: none` and algorithm confusion (an HS256
//!   token "signed" with an RSA public key) are refused;
//! - with `AUTH_MODE=none` every request may do everything; that is never the result of a missing
//!   setting, and it is logged as a warning at start.
//!
//! Keys come from files: an HS256 secret (`JWT_HS256_SECRET_FILE`, at least 32 bytes) and/or a JWKS
//! of RS256/ES256 public keys (`JWT_JWKS_FILE`), each key with its `alg` (and a `kid` when there
//! are several). The JWKS file is looked at again at most once a second: a changed file is
//! reloaded (key rotation without a restart); one that cannot be used is logged and the keys in
//! use stay. With `JWT_TYP` set, a token's header `typ` must be it (e.g. `at+jwt`, RFC 9068).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Lets a token submit purchases for any user, not only its subject.
pub const SCOPE_WRITE_ANY: &str = "purchases:write:any";
/// Lets a token read any user's total, not only its subject's.
pub const SCOPE_READ_ANY: &str = "totals:read:any";
/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;

/// Whether requests must carry a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every request carries a valid JWT.
    Jwt,
    /// No authentication: anyone who reaches the port may do everything (development only).
    None,
}

/// The authentication settings, the same in both services.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// `jwt` (every request needs a valid token) or `none` (no authentication; logged as a
    /// warning). There is no silent fallback: `jwt` without a key file refuses to start.
    #[arg(long, env = "AUTH_MODE", value_enum, default_value_t = AuthMode::Jwt)]
    pub auth_mode: AuthMode,

    /// File holding the HS256 secret (at least 32 bytes; a trailing newline is ignored).
    #[arg(long, env = "JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,

    /// File holding a JWKS (JSON Web Key Set) of RS256 or ES256 public keys.
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// Required `iss` claim.
    #[arg(long, env = "JWT_ISSUER", default_value = "purchase-totals")]
    pub jwt_issuer: String,

    /// Required `aud` claim (the token's audience must contain it).
    #[arg(long, env = "JWT_AUDIENCE", default_value = "purchase-totals")]
    pub jwt_audience: String,

    /// When set, a token's header `typ` must equal it (case-insensitive), e.g. `at+jwt` for
    /// RFC 9068 access tokens; unset: `typ` is not checked.
    #[arg(long, env = "JWT_TYP")]
    pub jwt_typ: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub jwt_leeway_secs: u64,
}

/// A key file or setting that cannot be used; the service refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "AUTH_MODE=jwt needs a key: set JWT_HS256_SECRET_FILE or JWT_JWKS_FILE (or AUTH_MODE=none to turn authentication off)"
    )]
    NoKey,
    #[error("cannot read {setting} {}: {source}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JWT_HS256_SECRET_FILE holds {0} bytes; at least {MIN_SECRET_BYTES} are needed")]
    ShortSecret(usize),
    #[error("JWT_JWKS_FILE is not a JWKS: {0}")]
    Jwks(String),
    #[error(
        "JWT_JWKS_FILE key {index}: {why} (each key needs \"alg\": \"RS256\" or \"ES256\", and a \"kid\" when there are several)"
    )]
    Jwk { index: usize, why: String },
}

/// Why a request's token was refused. The text is safe to return to the client: it names the
/// check that failed, never the token or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token's key id is unknown")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token lacks the {0} claim")]
    MissingClaim(String),
    #[error("the token's typ is not accepted")]
    Type,
}

/// What a verified request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `AUTH_MODE=none`: everything.
    Open,
    Token(Principal),
}

/// The verified content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub scopes: Vec<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Access {
    fn allows(&self, user_id: &str, scope: &str) -> bool {
        match self {
            Self::Open => true,
            Self::Token(principal) => {
                principal.subject == user_id || principal.scopes.iter().any(|s| s == scope)
            }
        }
    }

    /// The token's subject (`None` with authentication off).
    pub fn subject(&self) -> Option<&str> {
        match self {
            Self::Open => None,
            Self::Token(principal) => Some(&principal.subject),
        }
    }

    /// Whether purchases for `user_id` may be submitted.
    pub fn may_write_for(&self, user_id: &str) -> bool {
        self.allows(user_id, SCOPE_WRITE_ANY)
    }

    /// Whether `user_id`'s total may be read.
    pub fn may_read(&self, user_id: &str) -> bool {
        self.allows(user_id, SCOPE_READ_ANY)
    }

    /// How long the access lasts from now (None: for ever). Zero once expired; `Duration::MAX`
    /// for an `exp` beyond what the clock can represent (a validly signed token may carry any
    /// u64: it must not panic the connection that holds it).
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            Self::Open => None,
            Self::Token(principal) => Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(principal.expires_at))
                    .map_or(Duration::MAX, |expiry| {
                        expiry
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    }),
            ),
        }
    }
}

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

/// Verifies tokens against the configured keys and claims.
pub struct Verifier {
    keys: Option<Keys>,
}

/// (kid, alg, key) of each JWKS key.
type JwksKeys = Vec<(Option<String>, Algorithm, DecodingKey)>;

/// How often the JWKS file is looked at for a change, at most.
const JWKS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

struct Keys {
    hs256: Option<DecodingKey>,
    jwks: RwLock<Arc<JwksKeys>>,
    /// Where the JWKS came from and what the file looked like when last read.
    jwks_file: Option<JwksFile>,
    /// One validation per accepted algorithm, built once.
    validations: Vec<(Algorithm, Validation)>,
    typ: Option<String>,
}

struct JwksFile {
    path: PathBuf,
    seen: Mutex<Seen>,
}

struct Seen {
    checked: Instant,
    /// Modification time and length of the file as last read.
    stamp: Option<(SystemTime, u64)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

impl JwksFile {
    /// The keys of the file if it changed since it was last read (checked at most once per
    /// interval); `None` if it did not, or cannot be used (logged; the keys in use stay).
    fn changed_keys(&self) -> Option<JwksKeys> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.checked.elapsed() < JWKS_CHECK_INTERVAL {
            return None;
        }
        seen.checked = Instant::now();
        let now = stamp(&self.path);
        if now == seen.stamp {
            return None;
        }
        seen.stamp = now;
        match read_jwks(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "JWT_JWKS_FILE changed; keys reloaded");
                Some(keys)
            }
            Err(error) => {
                tracing::error!(%error, "JWT_JWKS_FILE changed but cannot be used; the keys in use stay");
                None
            }
        }
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("enabled", &self.keys.is_some())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads the key files. `AUTH_MODE=none` logs a warning; `jwt` without a key is an error.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, ConfigError> {
        if settings.auth_mode == AuthMode::None {
            tracing::warn!(
                "AUTH_MODE=none: authentication is off; anyone who reaches this service may submit and read for any user"
            );
            return Ok(Self { keys: None });
        }
        let hs256 = settings
            .jwt_hs256_secret_file
            .as_deref()
            .map(|path| read_secret_file(path).map(|secret| DecodingKey::from_secret(&secret)))
            .transpose()?;
        let jwks_file = settings.jwt_jwks_file.as_deref().map(|path| JwksFile {
            path: path.to_owned(),
            seen: Mutex::new(Seen {
                checked: Instant::now(),
                stamp: stamp(path),
            }),
        });
        let jwks = match &settings.jwt_jwks_file {
            Some(path) => read_jwks(path)?,
            None => Vec::new(),
        };
        if hs256.is_none() && jwks.is_empty() {
            return Err(ConfigError::NoKey);
        }
        let validations = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
                validation.validate_nbf = true;
                validation.leeway = settings.jwt_leeway_secs;
                validation.set_issuer(&[&settings.jwt_issuer]);
                validation.set_audience(&[&settings.jwt_audience]);
                (algorithm, validation)
            })
            .collect();
        Ok(Self {
            keys: Some(Keys {
                hs256,
                jwks: RwLock::new(Arc::new(jwks)),
                jwks_file,
                validations,
                typ: settings.jwt_typ.clone(),
            }),
        })
    }

    /// Whether requests need a token.
    pub fn is_enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Verifies a request's bearer token (None: the request carried none).
    pub fn verify(&self, token: Option<&str>) -> Result<Access, AuthError> {
        let Some(keys) = &self.keys else {
            return Ok(Access::Open);
        };
        let token = token.ok_or(AuthError::Missing)?;
        // `alg` is one of jsonwebtoken's algorithms, so "none" fails here already.
        let header = jsonwebtoken::decode_header(token).map_err(|e| refusal(e.kind()))?;
        let typ_accepted = |typ: &String| {
            header
                .typ
                .as_deref()
                .is_some_and(|given| given.eq_ignore_ascii_case(typ))
        };
        if !keys.typ.as_ref().is_none_or(typ_accepted) {
            return Err(AuthError::Type);
        }
        if let Some(reloaded) = keys.jwks_file.as_ref().and_then(JwksFile::changed_keys) {
            *keys.jwks.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(reloaded);
        }
        let jwks = keys
            .jwks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (algorithm, key) = keys.key_for(&header, &jwks)?;
        let validation = keys
            .validations
            .iter()
            .find_map(|(alg, validation)| (*alg == algorithm).then_some(validation))
            .ok_or(AuthError::Algorithm)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        Ok(Access::Token(Principal {
            subject: claims.sub,
            scopes: claims
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            expires_at: claims.exp,
        }))
    }
}

impl Keys {
    /// The one key a token may be verified with: chosen by the header's `alg` (and `kid`), so a
    /// token can never pick a key of another algorithm family.
    fn key_for<'a>(
        &'a self,
        header: &Header,
        jwks: &'a JwksKeys,
    ) -> Result<(Algorithm, &'a DecodingKey), AuthError> {
        if header.alg == Algorithm::HS256 {
            return self
                .hs256
                .as_ref()
                .map(|key| (Algorithm::HS256, key))
                .ok_or(AuthError::Algorithm);
        }
        let candidates: Vec<_> = jwks
            .iter()
            .filter(|(_, alg, _)| *alg == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Algorithm);
        }
        let found = match &header.kid {
            Some(kid) => candidates
                .iter()
                .find(|(id, _, _)| id.as_deref() == Some(kid.as_str())),
            None if candidates.len() == 1 => candidates.first(),
            None => None,
        };
        found
            .map(|(_, alg, key)| (*alg, key))
            .ok_or(AuthError::UnknownKey)
    }
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
        _ => AuthError::Malformed,
    }
}

/// Reads an HS256 secret file: its bytes without trailing whitespace, at least 32 of them.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let mut secret = std::fs::read(path).map_err(|source| ConfigError::Read {
        setting: "JWT_HS256_SECRET_FILE",
        path: path.to_owned(),
        source,
    })?;
    while secret.last().is_some_and(u8::is_ascii_whitespace) {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::ShortSecret(secret.len()));
    }
    Ok(secret)
}

fn read_jwks(path: &Path) -> Result<JwksKeys, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        setting: "JWT_JWKS_FILE",
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| ConfigError::Jwks(e.to_string()))?;
    if set.keys.is_empty() {
        return Err(ConfigError::Jwks("it holds no key".to_owned()));
    }
    let several = set.keys.len() > 1;
    set.keys
        .iter()
        .enumerate()
        .map(|(index, jwk)| {
            let bad = |why: &str| ConfigError::Jwk {
                index,
                why: why.to_owned(),
            };
            let algorithm = match jwk.common.key_algorithm {
                Some(KeyAlgorithm::RS256) => Algorithm::RS256,
                Some(KeyAlgorithm::ES256) => Algorithm::ES256,
                Some(_) => return Err(bad("unsupported alg")),
                None => return Err(bad("no alg")),
            };
            if several && jwk.common.key_id.is_none() {
                return Err(bad("no kid"));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(&e.to_string()))?;
            Ok((jwk.common.key_id.clone(), algorithm, key))
        })
        .collect()
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

#[cfg(test)]
mod tests;
