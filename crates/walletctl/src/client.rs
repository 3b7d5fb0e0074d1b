//! Where walletctl connects and with which token: every WebSocket and gRPC connection it opens
//! goes through [`Target`], so each carries the bearer token when there is one.
//!
//! `wss://` and `https://` URLs speak TLS, trusting the certificate authorities of `--ca-file`
//! (WALLET_CA_FILE, PEM) when given, else the system's trust store.

use anyhow::{Context, bail};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use wallet_proto::wallet_service_client::WalletServiceClient;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
pub type Wallet = WalletServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[derive(Clone)]
pub struct Target {
    pub ws_url: String,
    pub grpc_url: String,
    pub token: Option<String>,
    /// PEM text of the certificate authorities to trust; `None`: the system's.
    pub ca_pem: Option<String>,
}

impl Target {
    /// A WebSocket to the websocket service, the token in the `Authorization` header.
    pub async fn ws(&self) -> anyhow::Result<Socket> {
        let mut request = self
            .ws_url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad WebSocket URL {}", self.ws_url))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token is not a valid header value")?;
            request.headers_mut().insert("authorization", value);
        }
        let connector = if self.ws_url.starts_with("wss://") {
            Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                self.tls_client_config()?,
            )))
        } else {
            None
        };
        let (socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector)
                .await
                .with_context(|| format!("cannot connect to {}", self.ws_url))?;
        Ok(socket)
    }

    /// TLS for wss://: the CA file's authorities, or the system's.
    fn tls_client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots
                        .add(cert.context("the CA file holds an unreadable certificate")?)
                        .context("the CA file holds an unusable certificate")?;
                }
                if roots.is_empty() {
                    bail!("the CA file holds no certificate");
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    bail!(
                        "no trusted certificate authority: the system has none readable; pass --ca-file"
                    );
                }
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// A gRPC client of the grpc_kafka service (a connection of its own), the token in metadata.
    pub async fn grpc(&self) -> anyhow::Result<Wallet> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.grpc_url.clone())
            .with_context(|| format!("bad gRPC URL {}", self.grpc_url))?;
        if self.grpc_url.starts_with("https://") {
            let tls = tonic::transport::ClientTlsConfig::new();
            let tls = match &self.ca_pem {
                Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            endpoint = endpoint.tls_config(tls).context("TLS for gRPC")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.grpc_url))?;
        let bearer = match &self.token {
            None => Bearer(None),
            Some(token) => Bearer(Some(
                format!("Bearer {token}")
                    .parse()
                    .context("the token is not a valid metadata value")?,
            )),
        };
        Ok(WalletServiceClient::with_interceptor(channel, bearer))
    }
}

/// `GetTotalSpent` of `user_id`; a refused call is an error naming its status code.
pub async fn total_of(
    client: &mut Wallet,
    user_id: &str,
) -> anyhow::Result<wallet_proto::GetTotalSpentResponse> {
    let request = wallet_proto::GetTotalSpentRequest {
        user_id: user_id.to_owned(),
    };
    Ok(client
        .get_total_spent(request)
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
        .into_inner())
}
