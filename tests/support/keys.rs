//! Keys and tokens of the authentication tests, all generated per run: an HS256 secret, an RS256
//! and an ES256 key pair published as a JWKS file, and a self-signed TLS certificate. Nothing
//! here is a fixed credential.

use std::path::PathBuf;
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub const ISSUER: &str = "purchase-totals";
pub const AUDIENCE: &str = "purchase-totals";

pub struct Keys {
    pub dir: tempfile::TempDir,
    pub secret: Vec<u8>,
    pub secret_file: PathBuf,
    pub jwks_file: PathBuf,
    rsa: EncodingKey,
    ec: EncodingKey,
    /// The RSA public key as PEM text: what an HS/RS confusion forgery uses as its HMAC secret.
    pub rsa_public_pem: String,
}

impl Keys {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
        let secret = URL_SAFE_NO_PAD.encode(secret).into_bytes();
        let secret_file = dir.path().join("jwt-hs256.key");
        std::fs::write(&secret_file, &secret).expect("write secret");

        let private =
            aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa key");
        let pkcs8 = private.as_der().expect("rsa pkcs8");
        let rsa = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
            .expect("rsa encoding key");
        let public = private.public_key().as_der().expect("rsa public key");
        let rsa_public_pem = pem("PUBLIC KEY", public.as_ref());
        let ec_pair = rcgen::KeyPair::generate().expect("ec key");
        let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).expect("ec key");

        let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).expect("rsa jwk");
        rsa_jwk.common.key_id = Some("rsa-1".into());
        let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).expect("ec jwk");
        ec_jwk.common.key_id = Some("ec-1".into());
        let jwks_file = dir.path().join("jwks.json");
        let set = JwkSet {
            keys: vec![rsa_jwk, ec_jwk],
        };
        std::fs::write(&jwks_file, serde_json::to_vec(&set).expect("jwks")).expect("write jwks");
        Self {
            dir,
            secret,
            secret_file,
            jwks_file,
            rsa,
            ec,
            rsa_public_pem,
        }
    }

    /// Turns authentication on in `settings` with the HS256 secret (and the JWKS when `jwks`).
    pub fn require_tokens(&self, settings: &mut auth::AuthSettings, jwks: bool) {
        settings.auth_mode = auth::AuthMode::Jwt;
        settings.jwt_hs256_secret_file = Some(self.secret_file.clone());
        settings.jwt_jwks_file = jwks.then(|| self.jwks_file.clone());
        settings.jwt_leeway_secs = 0;
    }

    /// Claims valid for a minute for `sub` with `scopes`, then `overrides` (null removes a claim).
    pub fn claims(sub: &str, scopes: &[&str], overrides: serde_json::Value) -> serde_json::Value {
        let now = auth::now_secs();
        let mut claims = serde_json::json!({
            "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 60,
        });
        if !scopes.is_empty() {
            claims["scope"] = scopes.join(" ").into();
        }
        let object = claims.as_object_mut().expect("object");
        for (key, value) in overrides.as_object().expect("overrides object") {
            if value.is_null() {
                object.remove(key);
            } else {
                object.insert(key.clone(), value.clone());
            }
        }
        claims
    }

    /// A valid HS256 token for `sub` with `scopes`.
    pub fn hs256(&self, sub: &str, scopes: &[&str]) -> String {
        self.sign_hs256(
            &self.secret,
            &Self::claims(sub, scopes, serde_json::json!({})),
        )
    }

    /// HS256 over `claims` with any secret (forgeries sign with the wrong one).
    pub fn sign_hs256(&self, secret: &[u8], claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    }

    /// RS256 (kid rsa-1) or ES256 (kid ec-1) over `claims`.
    pub fn sign(&self, algorithm: Algorithm, claims: &serde_json::Value) -> String {
        let (key, kid) = match algorithm {
            Algorithm::RS256 => (&self.rsa, "rsa-1"),
            Algorithm::ES256 => (&self.ec, "ec-1"),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, key).expect("sign")
    }

    /// A token whose header says `alg: none`, with no signature.
    pub fn unsigned(claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    /// A token valid for `lifetime` only.
    pub fn hs256_expiring(&self, sub: &str, lifetime: Duration) -> String {
        let exp = auth::now_secs() + lifetime.as_secs();
        self.sign_hs256(
            &self.secret,
            &Self::claims(sub, &[], serde_json::json!({ "exp": exp })),
        )
    }
}

/// `der` as PEM text with the `label`.
fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A self-signed certificate for localhost and 127.0.0.1: (cert file, key file, cert PEM).
pub fn tls_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("certificate");
    let cert_pem = certified.cert.pem();
    let cert_file = dir.join("tls.crt");
    let key_file = dir.join("tls.key");
    std::fs::write(&cert_file, &cert_pem).expect("write cert");
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write key");
    (cert_file, key_file, cert_pem)
}
