//! Unit tests of token verification: algorithms, claims, scopes and key files.
use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

fn secret_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(bytes).expect("write secret");
    file
}

fn settings(secret: &tempfile::NamedTempFile) -> AuthSettings {
    AuthSettings {
        auth_mode: AuthMode::Jwt,
        jwt_hs256_secret_file: Some(secret.path().to_owned()),
        jwt_jwks_file: None,
        jwt_issuer: "purchase-totals".into(),
        jwt_audience: "purchase-totals".into(),
        jwt_typ: None,
        jwt_leeway_secs: 0,
    }
}

fn request<'a>(subject: &'a str, scopes: &'a [&'a str]) -> TokenRequest<'a> {
    TokenRequest {
        subject,
        scopes,
        lifetime: Duration::from_secs(60),
        issuer: "purchase-totals",
        audience: "purchase-totals",
    }
}

fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .expect("sign")
}

fn claims(overrides: serde_json::Value) -> serde_json::Value {
    let now = now_secs();
    let mut claims = serde_json::json!({
        "sub": "123", "exp": now + 60, "iss": "purchase-totals", "aud": "purchase-totals",
    });
    for (key, value) in overrides.as_object().expect("object") {
        if value.is_null() {
            claims.as_object_mut().expect("object").remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

#[test]
fn a_minted_token_grants_its_subject_only() {
    let file = secret_file(SECRET);
    let verifier = Verifier::from_settings(&settings(&file)).expect("verifier");
    let token = mint_hs256(SECRET, &request("123", &[])).expect("mint");
    let access = verifier.verify(Some(&token)).expect("valid token");
    assert!(access.may_write_for("123") && access.may_read("123"));
    assert!(!access.may_write_for("124") && !access.may_read("124"));
    assert!(access.remaining().expect("expires") <= Duration::from_secs(60));
}

#[test]
fn scopes_widen_to_any_user_one_right_at_a_time() {
    let file = secret_file(SECRET);
    let verifier = Verifier::from_settings(&settings(&file)).expect("verifier");
    let writer = mint_hs256(SECRET, &request("backend", &[SCOPE_WRITE_ANY])).expect("mint");
    let access = verifier.verify(Some(&writer)).expect("valid");
    assert!(access.may_write_for("123") && !access.may_read("123"));
    let reader = mint_hs256(SECRET, &request("backend", &[SCOPE_READ_ANY])).expect("mint");
    let access = verifier.verify(Some(&reader)).expect("valid");
    assert!(access.may_read("123") && !access.may_write_for("123"));
}

#[test]
fn every_forgery_is_refused_with_its_reason() {
    let file = secret_file(SECRET);
    let verifier = Verifier::from_settings(&settings(&file)).expect("verifier");
    let now = now_secs();
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(serde_json::json!({})),
        &EncodingKey::from_secret(b"another secret of thirty-two bytes!!"),
    )
    .expect("sign");
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(serde_json::json!({})).to_string())
    );
    let cases = [
        (None, AuthError::Missing),
        (Some("not a token".to_owned()), AuthError::Malformed),
        (Some(wrong_key), AuthError::Signature),
        (Some(unsigned), AuthError::Malformed),
        (
            Some(sign(&claims(serde_json::json!({"exp": now - 1})))),
            AuthError::Expired,
        ),
        (
            Some(sign(&claims(serde_json::json!({"nbf": now + 120})))),
            AuthError::NotYetValid,
        ),
        (
            Some(sign(&claims(serde_json::json!({"aud": "someone-else"})))),
            AuthError::Audience,
        ),
        (
            Some(sign(&claims(serde_json::json!({"iss": "someone-else"})))),
            AuthError::Issuer,
        ),
        (
            Some(sign(&claims(serde_json::json!({"sub": null})))),
            AuthError::MissingClaim("sub".into()),
        ),
        (
            Some(sign(&claims(serde_json::json!({"aud": null})))),
            AuthError::MissingClaim("aud".into()),
        ),
    ];
    for (token, expected) in cases {
        assert_eq!(
            verifier.verify(token.as_deref()),
            Err(expected.clone()),
            "{token:?}"
        );
    }
    // An audience list that contains ours is accepted.
    let listed = sign(&claims(
        serde_json::json!({"aud": ["other", "purchase-totals"]}),
    ));
    assert!(verifier.verify(Some(&listed)).is_ok());
}

#[test]
fn jwt_mode_without_a_key_refuses_to_start_and_none_is_explicit() {
    let file = secret_file(SECRET);
    let mut no_key = settings(&file);
    no_key.jwt_hs256_secret_file = None;
    assert!(matches!(
        Verifier::from_settings(&no_key),
        Err(ConfigError::NoKey)
    ));
    let short = secret_file(b"short\n");
    assert!(matches!(
        Verifier::from_settings(&settings(&short)),
        Err(ConfigError::ShortSecret(5))
    ));
    no_key.auth_mode = AuthMode::None;
    let open = Verifier::from_settings(&no_key).expect("none");
    assert!(!open.is_enabled());
    assert_eq!(open.verify(None), Ok(Access::Open));
}

#[test]
fn bearer_header_values() {
    assert_eq!(bearer("Bearer abc"), Some("abc"));
    assert_eq!(bearer("bearer  abc "), Some("abc"));
    assert_eq!(bearer("Basic abc"), None);
    assert_eq!(bearer("Bearer "), None);
}

#[test]
fn a_validly_signed_token_expiring_beyond_the_clock_lasts_for_ever_without_panicking() {
    let secret = secret_file(SECRET);
    let verifier = Verifier::from_settings(&settings(&secret)).expect("verifier");
    for exp in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64] {
        let token = sign(&claims(serde_json::json!({ "exp": exp })));
        let access = verifier.verify(Some(&token)).expect("a valid token");
        let remaining = access.remaining().expect("a token's access ends");
        assert!(
            remaining > Duration::from_secs(100 * 365 * 24 * 3600),
            "exp {exp}: {remaining:?}"
        );
    }
}

#[test]
fn with_jwt_typ_set_only_tokens_of_that_type_are_accepted() {
    let secret = secret_file(SECRET);
    let mut settings = settings(&secret);
    settings.jwt_typ = Some("at+jwt".into());
    let verifier = Verifier::from_settings(&settings).expect("verifier");
    let typed = |typ: Option<&str>| {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("sign")
    };
    assert!(verifier.verify(Some(&typed(Some("at+JWT")))).is_ok());
    assert_eq!(
        verifier.verify(Some(&typed(Some("JWT")))),
        Err(AuthError::Type)
    );
    assert_eq!(verifier.verify(Some(&typed(None))), Err(AuthError::Type));
    // Unset, typ is not looked at.
    let verifier = Verifier::from_settings(&self::settings(&secret)).expect("verifier");
    assert!(verifier.verify(Some(&typed(Some("JWT")))).is_ok());
}

#[test]
fn a_remembered_token_lasts_until_its_exp_or_a_minute_whichever_is_first() {
    let cache = verifier::VerifiedTokens::new();
    let now = now_secs();
    let principal = |expires_at| {
        Access::Token(Principal {
            subject: "123".into(),
            scopes: Vec::new(),
            expires_at,
        })
    };
    cache.insert("short", &principal(now + 5), now);
    cache.insert("long", &principal(now + 3600), now);
    cache.insert("expired", &principal(now), now);
    assert!(cache.get("short", now + 4).is_some());
    assert!(cache.get("short", now + 5).is_none(), "past exp");
    assert!(cache.get("long", now + 59).is_some());
    assert!(cache.get("long", now + 60).is_none(), "past a minute");
    assert!(cache.get("expired", now).is_none(), "never remembered");
    // Open access (AUTH_MODE=none) is never verified, so never remembered.
    cache.insert("open", &Access::Open, now);
    assert!(cache.get("open", now).is_none());
}

#[test]
fn a_remembered_signature_paired_with_other_claims_is_refused() {
    let file = secret_file(SECRET);
    let verifier = Verifier::from_settings(&settings(&file)).expect("verifier");
    let token = sign(&claims(serde_json::json!({})));
    for _ in 0..2 {
        let access = verifier.verify(Some(&token)).expect("valid token");
        assert!(access.may_read("123"));
    }
    let (header_and_claims, signature) = token.rsplit_once('.').expect("three parts");
    let (header, _) = header_and_claims.split_once('.').expect("three parts");
    let other = URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims(serde_json::json!({"sub": "124"}))).expect("json"));
    let forged = format!("{header}.{other}.{signature}");
    assert!(matches!(
        verifier.verify(Some(&forged)),
        Err(AuthError::Signature)
    ));
}
