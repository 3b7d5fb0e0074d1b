//! Where walletctl connects and with which token: every WebSocket and gRPC connection it opens
//! goes through [`Target`], so each carries the bearer token when there is one.

use anyhow::Context;
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
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("cannot connect to {}", self.ws_url))?;
        Ok(socket)
    }

    /// A gRPC client of the grpc_kafka service (a connection of its own), the token in metadata.
    pub async fn grpc(&self) -> anyhow::Result<Wallet> {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc_url.clone())
            .with_context(|| format!("bad gRPC URL {}", self.grpc_url))?
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
