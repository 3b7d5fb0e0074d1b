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

mod access;
mod settings;
mod token;
pub(crate) mod verifier;

pub use access::{Access, AuthError, Principal};
pub use settings::{AuthMode, AuthSettings, ConfigError};
pub use token::{Claims, TokenRequest, bearer, mint_hs256, now_secs};
pub use verifier::{Verifier, read_secret_file};

/// Lets a token submit purchases for any user, not only its subject.
pub const SCOPE_WRITE_ANY: &str = "purchases:write:any";
/// Lets a token read any user's total, not only its subject's.
pub const SCOPE_READ_ANY: &str = "totals:read:any";
/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;

#[cfg(test)]
mod tests;
