//! The authentication settings (`AUTH_MODE`, the key files, the claims required) and why they
//! can be refused at start.

use std::path::PathBuf;

use crate::MIN_SECRET_BYTES;

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
