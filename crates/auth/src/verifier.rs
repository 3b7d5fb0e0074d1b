//! Token verification: the keys (an HS256 secret, a JWKS reloaded when its file changes), one
//! validation per accepted algorithm, and the refusals they lead to.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};

use crate::{
    Access, AuthError, AuthMode, AuthSettings, Claims, ConfigError, MIN_SECRET_BYTES, Principal,
};

/// Verifies tokens against the configured keys and claims.
pub struct Verifier {
    keys: Option<Keys>,
}

/// How many verified tokens are remembered, at most.
const CACHED_TOKENS: usize = 10_000;
/// How long a verified token is remembered, at most (never past its `exp`).
const CACHE_FOR_SECS: u64 = 60;

/// A verified token's access and the second (since the Unix epoch) it stops being used.
#[derive(Clone)]
struct Verified {
    access: Access,
    until: u64,
}

/// Tokens verified already, by their whole text (header, claims and signature: a signature
/// alone does not name the claims it was paired with), so a client sending the same token on
/// every call pays for one signature check per minute, not one per call. Only accepted tokens are
/// remembered; the cache is emptied whenever the JWKS file's keys are reloaded.
pub(crate) struct VerifiedTokens(quick_cache::sync::Cache<String, Verified>);

impl VerifiedTokens {
    pub(crate) fn new() -> Self {
        Self(quick_cache::sync::Cache::new(CACHED_TOKENS))
    }

    pub(crate) fn get(&self, token: &str, now: u64) -> Option<Access> {
        let verified = self.0.get(token)?;
        (now < verified.until).then_some(verified.access)
    }

    fn clear(&self) {
        self.0.clear();
    }

    pub(crate) fn insert(&self, token: &str, access: &Access, now: u64) {
        let Access::Token(principal) = access else {
            return;
        };
        let until = principal.expires_at.min(now + CACHE_FOR_SECS);
        if now < until {
            let access = access.clone();
            self.0.insert(token.to_owned(), Verified { access, until });
        }
    }
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
    verified: VerifiedTokens,
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
                verified: VerifiedTokens::new(),
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
        if let Some(reloaded) = keys.jwks_file.as_ref().and_then(JwksFile::changed_keys) {
            *keys.jwks.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(reloaded);
            keys.verified.clear();
        }
        let now = crate::now_secs();
        if let Some(access) = keys.verified.get(token, now) {
            return Ok(access);
        }
        let access = keys.verify(token)?;
        keys.verified.insert(token, &access, now);
        Ok(access)
    }
}

impl Keys {
    /// Verifies a token's signature and claims against these keys.
    fn verify(&self, token: &str) -> Result<Access, AuthError> {
        // `alg` is one of jsonwebtoken's algorithms, so "none" fails here already.
        let header = jsonwebtoken::decode_header(token).map_err(|e| refusal(e.kind()))?;
        let typ_accepted = |typ: &String| {
            header
                .typ
                .as_deref()
                .is_some_and(|given| given.eq_ignore_ascii_case(typ))
        };
        if !self.typ.as_ref().is_none_or(typ_accepted) {
            return Err(AuthError::Type);
        }
        let jwks = self
            .jwks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (algorithm, key) = self.key_for(&header, &jwks)?;
        let validation = self
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
