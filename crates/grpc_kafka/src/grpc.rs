//! The gRPC API: `wallet.v1.WalletService/GetTotalSpent`, read from Redis.
//!
//! This is the one place where errors become gRPC statuses: a missing or invalid bearer token is
//! UNAUTHENTICATED, a token that may not read this user's total is PERMISSION_DENIED, invalid input
//! is INVALID_ARGUMENT, an unreachable or failing Redis is UNAVAILABLE, a malformed stored value is
//! INTERNAL. Redis error text is logged, never returned.
//!
//! Authentication is an interceptor in front of `WalletService` only ([`authenticate`]): the
//! health service stays open to probes. With `GRPC_RATE_LIMIT_PER_SUBJECT_PER_SEC` set, calls of
//! one token subject over that rate are RESOURCE_EXHAUSTED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use purchase::UserId;
use purchase::amount::cents_to_decimal;
use tonic::{Request, Response, Status};
use wallet_proto::wallet_service_server::{WalletService, WalletServiceServer};
use wallet_proto::{GetTotalSpentRequest, GetTotalSpentResponse};

use crate::totals::{Totals, TotalsError};

pub struct Wallet {
    pub totals: Totals,
    pub metrics: Arc<crate::metrics::Metrics>,
}

const GET_TOTAL_SPENT: &str = "GetTotalSpent";

fn status(error: &TotalsError) -> Status {
    match error {
        TotalsError::Unavailable(_)
        | TotalsError::Redis(_)
        | TotalsError::Info { .. }
        | TotalsError::Evicting { .. } => {
            Status::unavailable("the totals store is unavailable; retry later")
        }
        TotalsError::Corrupt { .. } => Status::internal("a stored total is invalid"),
    }
}

/// The interceptor that verifies the `authorization: Bearer <token>` metadata and hands what the
/// token allows ([`auth::Access`]) to the handler.
pub fn authenticate(
    verifier: Arc<auth::Verifier>,
    subject_rate: Option<Arc<service_kit::per_ip::SubjectRate>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let started = std::time::Instant::now();
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(auth::bearer);
        let access = verifier.verify(token).map_err(|error| {
            tracing::info!(reason = %error, "grpc call refused: UNAUTHENTICATED");
            // The only method behind this interceptor.
            metrics.call(
                GET_TOTAL_SPENT,
                tonic::Code::Unauthenticated,
                started.elapsed(),
            );
            Status::unauthenticated(error.to_string())
        })?;
        let over_rate = match (&subject_rate, access.subject()) {
            (Some(rate), Some(subject)) => !rate.check(subject),
            _ => false,
        };
        if over_rate {
            metrics.call(
                GET_TOTAL_SPENT,
                tonic::Code::ResourceExhausted,
                started.elapsed(),
            );
            return Err(Status::resource_exhausted(
                "too many calls per second for this token's subject; retry later",
            ));
        }
        request.extensions_mut().insert(access);
        Ok(request)
    }
}

#[tonic::async_trait]
impl WalletService for Wallet {
    async fn get_total_spent(
        &self,
        request: Request<GetTotalSpentRequest>,
    ) -> Result<Response<GetTotalSpentResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.total_spent(request).await;
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.call(GET_TOTAL_SPENT, code, started.elapsed());
        result
    }
}

impl Wallet {
    async fn total_spent(
        &self,
        request: Request<GetTotalSpentRequest>,
    ) -> Result<Response<GetTotalSpentResponse>, Status> {
        // Absent only if the service was mounted without the interceptor: refuse, never allow.
        let allowed = request
            .extensions()
            .get::<auth::Access>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        let user_id = request.into_inner().user_id;
        let user = UserId::parse(&user_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !allowed.may_read(user.as_str()) {
            return Err(Status::permission_denied(format!(
                "this token may not read the total of user_id {user}"
            )));
        }
        let total = self.totals.total(&user).await.map_err(|error| {
            tracing::warn!(user_id = %user, %error, "cannot read total");
            status(&error)
        })?;
        Ok(Response::new(GetTotalSpentResponse {
            user_id: user.to_string(),
            total_cents: total.cents,
            total: cents_to_decimal(total.cents),
            purchase_count: total.count,
        }))
    }
}

/// CORS for gRPC-Web calls from the listed origins only: the headers a gRPC-Web client sends
/// (the bearer token among them) and the status trailers it must read.
pub fn cors(origins: &[hyper::header::HeaderValue]) -> tower_http::cors::CorsLayer {
    use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([hyper::Method::POST])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Reflection v1 and, for tools that predate it and still ask for it (ghz, older grpcurl),
/// v1alpha, from the same descriptors.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wallet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((descriptors().build_v1()?, descriptors().build_v1alpha()?))
}

/// The gRPC server, running until `stop` is cancelled.
pub type ServerTask = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// What the gRPC port serves, besides the settings.
pub struct Served {
    pub totals: Totals,
    pub verifier: auth::Verifier,
    pub health: tonic_health::server::HealthReporter,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The gRPC server on `listener`: health, optional reflection, and the wallet service behind
/// authentication; gRPC-Web for browsers with CORS limited to the configured origins; every
/// limit of the settings. `server` carries TLS when configured.
pub fn server(
    server: tonic::transport::Server,
    listener: tokio::net::TcpListener,
    settings: &crate::Settings,
    served: Served,
    stop: tokio_util::sync::CancellationToken,
) -> Result<ServerTask, tonic_reflection::server::Error> {
    let (reflection, reflection_v1alpha) = reflection()?;
    let limits = crate::listener::Limits {
        max_connections: settings.grpc_max_connections as usize,
        per_ip: (settings.grpc_max_connections_per_ip > 0)
            .then(|| service_kit::per_ip::PerIp::new(settings.grpc_max_connections_per_ip)),
        idle_timeout: settings.grpc_idle_timeout,
    };
    let wallet = tonic::service::interceptor::InterceptedService::new(
        WalletServiceServer::new(Wallet {
            totals: served.totals,
            metrics: served.metrics.clone(),
        })
        .max_decoding_message_size(settings.grpc_max_request_bytes as usize),
        authenticate(
            Arc::new(served.verifier),
            service_kit::per_ip::SubjectRate::new(settings.grpc_rate_limit_per_subject_per_sec),
            served.metrics.clone(),
        ),
    );
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(served.health),
    );
    let serving = server
        .concurrency_limit_per_connection(settings.grpc_concurrency_per_connection as usize)
        .timeout(settings.grpc_request_timeout)
        .http2_keepalive_interval(Some(settings.grpc_keepalive_interval))
        .http2_keepalive_timeout(Some(settings.grpc_keepalive_interval))
        // gRPC-Web for browser pages (HTTP/1.1), CORS limited to the configured origins.
        .accept_http1(true)
        .layer(cors(&settings.grpc_web_allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(health)
        .add_optional_service(settings.grpc_reflection.then_some(reflection))
        .add_optional_service(settings.grpc_reflection.then_some(reflection_v1alpha))
        .add_service(wallet)
        .serve_with_incoming_shutdown(
            crate::listener::incoming(listener, limits, served.metrics),
            stop.cancelled_owned(),
        );
    Ok(Box::pin(serving))
}

/// The server builder, with TLS when `TLS_CERT_FILE` and `TLS_KEY_FILE` are set (a bad pair is
/// refused here, at start).
pub fn builder(settings: &crate::Settings) -> Result<tonic::transport::Server, String> {
    let Some(pem) = settings.tls.read()? else {
        return Ok(tonic::transport::Server::builder());
    };
    let identity = tonic::transport::Identity::from_pem(pem.cert, pem.key);
    tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .timeout(settings.grpc_idle_timeout),
        )
        .map_err(|e| e.to_string())
}
