//! TLS for the websocket listener (wss://): the rustls acceptor of `TLS_CERT_FILE` and
//! `TLS_KEY_FILE`, with ring as the crypto provider. A bad pair is refused at start.

use std::sync::Arc;

/// The TLS acceptor of `TLS_CERT_FILE` and `TLS_KEY_FILE`, when both are set.
pub fn acceptor(
    settings: &service_kit::TlsSettings,
) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(pem) = settings.read()? else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS_CERT_FILE holds no PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("TLS_CERT_FILE holds no PEM certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key)
        .map_err(|e| format!("TLS_KEY_FILE holds no PEM private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS_CERT_FILE and TLS_KEY_FILE do not make a usable pair: {e}"))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}
