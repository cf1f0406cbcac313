//! Running a service: mutual TLS, the role layer, health and reflection, an optional plaintext
//! health port for probes, and graceful shutdown with a bounded drain.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::auth::AuthLayer;
use crate::config::ServerSettings;
use crate::NetError;

/// Binds a TCP listener; kept separate from [`serve`] so callers (and tests) can bind port 0
/// and learn the address before serving.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, NetError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| NetError::Config(format!("cannot listen on {addr}: {e}")))
}

/// Resolves when the process receives SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves `routes` on `listener` until `shutdown` resolves, then marks every service
/// NOT_SERVING, stops accepting, and lets in-flight calls finish within the grace period.
///
/// Every request passes [`AuthLayer`] first. Health (`grpc.health.v1.Health`, with
/// `service_names` SERVING) and reflection (v1 and v1alpha, listing the psm.v1 services) are
/// added here so every service has them.
pub async fn serve(
    settings: &ServerSettings,
    listener: TcpListener,
    routes: Routes,
    service_names: &[&'static str],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NetError> {
    let tls = settings.tls.server_config()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(psm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NetError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(psm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| NetError::Config(format!("reflection: {e}")))?;

    let probe_task = match settings.health_listen {
        Some(addr) => Some(spawn_probe_port(addr, reporter.clone()).await?),
        None => None,
    };

    let local = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = Server::builder()
        .tls_config(tls)?
        .layer(crate::metrics::RpcMetricsLayer::new(service_names))
        .layer(AuthLayer::new(
            &settings.trust_domain,
            settings.tls.revocations()?,
        ))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(address = %local, services = ?service_names, "serving gRPC over mutual TLS");

    tokio::select! {
        res = &mut server => {
            // The server stopped on its own: that is an error (for example the listener broke).
            if let Some(t) = probe_task { t.abort(); }
            return match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(NetError::Config(format!("server task failed: {e}"))),
            };
        }
        () = shutdown => {}
    }
    set_all(&reporter, service_names, ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    let result = match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
        Ok(Ok(Ok(()))) => {
            tracing::info!("all in-flight calls finished; stopped");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Err(e)) => Err(NetError::Config(format!("server task failed: {e}"))),
        Err(_) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "in-flight calls did not finish within the grace period; stopping anyway");
            server.abort();
            Ok(())
        }
    };
    if let Some(t) = probe_task {
        t.abort();
    }
    result
}

async fn set_all(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Plaintext port for probes and scrapers: the gRPC health service (sharing the main server's
/// health state) and `GET /metrics` in the Prometheus text format. Neither reveals more than
/// counts and timings; it carries no credentials, so bind it where only the cluster reaches.
async fn spawn_probe_port(
    addr: SocketAddr,
    reporter: HealthReporter,
) -> Result<tokio::task::JoinHandle<()>, NetError> {
    let listener = bind(addr).await?;
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter),
    );
    crate::metrics::handle();
    let app = Routes::new(health)
        .prepare()
        .into_axum_router()
        .route("/metrics", axum::routing::get(metrics_page));
    tracing::info!(address = %addr, "serving plaintext health checks and /metrics for probes");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health probe port failed");
        }
    }))
}

async fn metrics_page() -> impl axum::response::IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

/// Binds `settings.listen` and serves until SIGTERM or SIGINT: what a service `main` calls.
pub async fn run(
    settings: &ServerSettings,
    routes: Routes,
    service_names: &[&'static str],
) -> Result<(), NetError> {
    let listener = bind(settings.listen).await?;
    serve(settings, listener, routes, service_names, shutdown_signal()).await
}
