//! Mutual TLS, roles, health, reflection, size limits and shutdown, against the real service
//! binaries on 127.0.0.1.

use std::time::Duration;

use psm_e2e::{Proc, TestPki};
use psm_net::pki::{DevPki, Validity};
use psm_net::tls::TlsPaths;
use psm_net::Role;
use psm_proto::service_names::{COMPUTE, INGEST, KEYSHARE};
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{ReadingBatch, StatusRequest, SubmitReadingsRequest, Track};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

const TD: &str = "psm.test";

async fn keyshare(pki: &TestPki) -> Proc {
    Proc::start_keyshare(pki, "keyshare-1", &psm_e2e::keys::key_set(3, 2), &[]).await
}

/// Calls Keyshare.Status over `channel` and returns the outcome.
async fn status(channel: Channel) -> Result<String, tonic::Status> {
    KeyshareClient::new(channel)
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner().party)
}

fn raw_channel(port: u16, tls: ClientTlsConfig) -> Channel {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

fn ca_only(pki: &TestPki, server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(pki.pki.ca_cert_path()).unwrap(),
        ))
        .domain_name(server_name)
}

fn with_identity(pki: &TestPki, server_name: &str, cert: &TlsPaths) -> ClientTlsConfig {
    ca_only(pki, server_name).identity(tonic::transport::Identity::from_pem(
        std::fs::read(&cert.cert).unwrap(),
        std::fs::read(&cert.key).unwrap(),
    ))
}

/// A refused handshake surfaces on the first RPC (TLS 1.3) as a transport error, never as an
/// answer from the service (a status from the server would carry another code).
fn assert_refused_connection(res: Result<String, tonic::Status>, what: &str) {
    let err = res.expect_err(&format!("{what}: the call went through"));
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{what}: expected a refused connection, got {err:?}"
    );
}

#[tokio::test]
async fn right_role_gets_through() {
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    for (role, name) in [
        (Role::Operator, "billing"),
        (Role::Auditor, "regulator"),
        (Role::Compute, "compute"),
    ] {
        let party = status(pki.channel(ks.port, "keyshare-1", role, name))
            .await
            .unwrap_or_else(|e| panic!("{role} refused: {e:?}"));
        assert_eq!(party, "keyshare-1");
    }
}

#[tokio::test]
async fn wrong_role_is_permission_denied_naming_the_role() {
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    let err = status(pki.channel(ks.port, "keyshare-1", Role::Meter, "meter-0001"))
        .await
        .expect_err("a meter read keyshare status");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("requires role operator or auditor or compute"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("spiffe://psm.test/meter/meter-0001"));

    // And PartialDecrypt is for compute only.
    let err = KeyshareClient::new(pki.channel(ks.port, "keyshare-1", Role::Operator, "billing"))
        .partial_decrypt(psm_proto::v1::PartialDecryptRequest::default())
        .await
        .expect_err("an operator asked for a partial decryption");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("requires role compute"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    let res = status(raw_channel(ks.port, ca_only(&pki, "keyshare-1"))).await;
    assert_refused_connection(res, "no client certificate");
}

#[tokio::test]
async fn foreign_ca_is_refused() {
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    // Same trust domain and role, but signed by another CA.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = DevPki::init(other_dir.path(), TD, false).unwrap();
    let (cert, key) = other.paths(Role::Operator, "billing");
    let foreign = TlsPaths {
        cert,
        key,
        ca: other.ca_cert_path(),
        crl: None,
    };
    let res = status(raw_channel(
        ks.port,
        with_identity(&pki, "keyshare-1", &foreign),
    ))
    .await;
    assert_refused_connection(res, "certificate from a foreign CA");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    let now = time::OffsetDateTime::now_utc();
    let issued = pki
        .pki
        .issue(
            Role::Operator,
            "expired-op",
            Validity {
                not_before: now - time::Duration::days(30),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap();
    let tls = TlsPaths {
        cert: issued.cert,
        key: issued.key,
        ca: pki.pki.ca_cert_path(),
        crl: None,
    };
    let res = status(raw_channel(
        ks.port,
        with_identity(&pki, "keyshare-1", &tls),
    ))
    .await;
    assert_refused_connection(res, "expired certificate");
    // The same role with a valid certificate is fine, so it was the expiry that was refused.
    assert!(
        status(pki.channel(ks.port, "keyshare-1", Role::Operator, "billing"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn other_trust_domain_is_denied() {
    // Same CA, but a certificate naming another trust domain.
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    let other_dir = tempfile::tempdir().unwrap();
    // Re-sign with our CA: copy the CA into a PKI directory that records another trust domain.
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(pki.dir.path().join(f), other_dir.path().join(f)).unwrap();
    }
    std::fs::write(
        other_dir.path().join("pki.toml"),
        "trust_domain = \"evil.test\"\n",
    )
    .unwrap();
    let other = DevPki::open(other_dir.path()).unwrap();
    let issued = other
        .issue(Role::Operator, "billing", Validity::days(1))
        .unwrap();
    let tls = TlsPaths {
        cert: issued.cert,
        key: issued.key,
        ca: pki.pki.ca_cert_path(),
        crl: None,
    };
    let err = status(raw_channel(
        ks.port,
        with_identity(&pki, "keyshare-1", &tls),
    ))
    .await
    .expect_err("foreign trust domain got through");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("trust domain"), "{}", err.message());
}

#[tokio::test]
async fn health_reports_serving_for_every_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let pki = TestPki::new(TD);
    let probe_port = psm_e2e::free_port();
    let probe_flag = format!("127.0.0.1:{probe_port}");
    let procs = [
        (
            Proc::start(
                &pki,
                "ingest-svc",
                Role::Ingest,
                "ingest",
                INGEST,
                &["--health-listen", &probe_flag],
            )
            .await,
            INGEST,
        ),
        (
            Proc::start(&pki, "compute-svc", Role::Compute, "compute", COMPUTE, &[]).await,
            COMPUTE,
        ),
        (keyshare(&pki).await, KEYSHARE),
    ];
    for (p, svc) in &procs {
        let mut client =
            HealthClient::new(pki.channel(p.port, &p.name, Role::Auditor, "regulator"));
        for name in [*svc, ""] {
            let resp = client
                .check(HealthCheckRequest {
                    service: name.to_owned(),
                })
                .await
                .unwrap_or_else(|e| panic!("{}: {e:?}", p.name));
            assert_eq!(
                resp.into_inner().status(),
                ServingStatus::Serving,
                "{} {name:?}",
                p.name
            );
        }
    }
    // The plaintext probe port answers health without a client certificate, and only health.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{probe_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = HealthClient::new(plain.clone())
        .check(HealthCheckRequest {
            service: INGEST.to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status(), ServingStatus::Serving);
    let err = IngestClient::new(plain)
        .submit_readings(SubmitReadingsRequest::default())
        .await
        .expect_err("the probe port served the API");
    assert_eq!(err.code(), Code::Unimplemented);

    // /metrics on the probe port counts what the API port answered: the health checks, and a
    // refusal by the role layer under its code.
    let ingest = &procs[0].0;
    let err = IngestClient::new(pki.channel(ingest.port, "ingest", Role::Auditor, "regulator"))
        .submit_readings(SubmitReadingsRequest::default())
        .await
        .expect_err("an auditor submitted readings");
    assert_eq!(err.code(), Code::PermissionDenied);
    let text = psm_e2e::scrape(probe_port).await;
    let count = |labels: &[(&str, &str)]| psm_e2e::metric(&text, "psm_rpc_requests_total", labels);
    // (At least the two above; start-up's readiness checks add more.)
    let checks = count(&[
        ("service", "grpc.health.v1.Health"),
        ("method", "Check"),
        ("code", "OK"),
    ]);
    assert!(checks >= 2.0, "{text}");
    assert_eq!(
        count(&[("method", "SubmitReadings"), ("code", "PERMISSION_DENIED")]),
        1.0
    );
    // Made-up methods, from a caller the server accepts and from one it refuses, all land in
    // one series: no caller can add series.
    let series = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("psm_rpc_requests_total"))
            .count()
    };
    let before = series(&text);
    for (i, method) in [
        "/psm.v1.Ingest/Bogus1",
        "/psm.v1.Ingest/Bogus2",
        "/made.Up/X",
    ]
    .iter()
    .enumerate()
    {
        let ch = pki.channel(
            ingest.port,
            "ingest",
            Role::Headend,
            &format!("headend-{i}"),
        );
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<StatusRequest, StatusRequest>::default();
        let err = grpc
            .unary(
                tonic::Request::new(StatusRequest {}),
                http::uri::PathAndQuery::from_static(method),
                codec,
            )
            .await
            .expect_err("a made-up method answered");
        assert!(
            matches!(err.code(), Code::Unimplemented | Code::PermissionDenied),
            "{err:?}"
        );
    }
    let text = psm_e2e::scrape(probe_port).await;
    assert!(
        !text.contains("Bogus") && !text.contains("made.Up"),
        "{text}"
    );
    assert!(
        series(&text) <= before + 2,
        "made-up methods added series:\n{text}"
    );
    let other = psm_e2e::metric(
        &text,
        "psm_rpc_requests_total",
        &[("service", "other"), ("method", "other")],
    );
    assert_eq!(other, 3.0, "{text}");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let pki = TestPki::new(TD);
    let ks = keyshare(&pki).await;
    let mut client =
        ServerReflectionClient::new(pki.channel(ks.port, "keyshare-1", Role::Auditor, "regulator"));
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [INGEST, COMPUTE, KEYSHARE, "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn oversized_message_is_resource_exhausted_and_server_survives() {
    let pki = TestPki::new(TD);
    let ingest = Proc::start(
        &pki,
        "ingest-svc",
        Role::Ingest,
        "ingest",
        INGEST,
        &["--max-request-bytes", "1048576"],
    )
    .await;
    let mut client =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Meter, "meter-0001"));
    let big = SubmitReadingsRequest {
        idempotency_key: "big".into(),
        batches: vec![ReadingBatch {
            meter_id: "meter-0001".into(),
            day: "2026-11-26".into(),
            track: Track::Linear as i32,
            ciphertext: vec![7u8; 2 * 1024 * 1024],
            ..Default::default()
        }],
    };
    let err = client
        .submit_readings(big)
        .await
        .expect_err("2 MiB accepted under a 1 MiB limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("1048576"), "{}", err.message());
    // The server is still up and answers a small request.
    let err = client
        .submit_readings(SubmitReadingsRequest::default())
        .await
        .expect_err("an empty request is invalid");
    assert_ne!(err.code(), Code::ResourceExhausted);
    assert_ne!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn sigterm_stops_gracefully() {
    let pki = TestPki::new(TD);
    let mut ks = keyshare(&pki).await;
    let status = ks
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .expect("keyshare-svc did not stop within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", ks.log_text());
    assert!(
        ks.log_text().contains("SIGTERM received"),
        "{}",
        ks.log_text()
    );
}

/// A head-end certificate (from the same CA) cannot stand in for a server: the dev PKI gives
/// serverAuth to the service roles only, so a head-end serving "ingest" on its own certificate
/// fails every client's handshake. Before, every certificate could serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_certificate_cannot_serve() {
    let pki = TestPki::new(TD);
    let tls = pki.tls(Role::Headend, "headend-1");
    let port = psm_e2e::free_port();
    let mut child = std::process::Command::new(psm_e2e::bin("ingest-svc"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--trust-domain")
        .arg(TD)
        .arg("--tls-cert")
        .arg(&tls.cert)
        .arg("--tls-key")
        .arg(&tls.key)
        .arg("--tls-ca")
        .arg(&tls.ca)
        .arg("--data-dir")
        .arg(pki.dir.path().join("impostor-data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The process listens (a TCP connection succeeds) ...
    let mut listening = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listening, "the impostor never listened");
    // ... but no client accepts its certificate as a server's.
    let ch = pki.channel(port, "headend-1", Role::Operator, "billing");
    let res = psm_net::client::wait_serving(ch, INGEST, Duration::from_secs(3)).await;
    assert!(res.is_err(), "a head-end certificate served TLS");
    assert!(
        child.try_wait().unwrap().is_none(),
        "it was the handshake that failed"
    );
    child.kill().unwrap();
    let _ = child.wait();
}

/// Clients check the server's SPIFFE id, not only the CA and DNS name: a service certificate
/// of another role that carries the expected name (spiffe://…/ingest/keyshare-1) is refused by
/// a client that meant to reach keyshare-1 the keyshare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_server_of_the_wrong_spiffe_role() {
    let pki = TestPki::new(TD);
    let impostor = Proc::start(&pki, "ingest-svc", Role::Ingest, "keyshare-1", INGEST, &[]).await;
    let url = format!("https://127.0.0.1:{}", impostor.port);
    let opts = psm_net::client::ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    };
    let client = pki.tls(Role::Compute, "compute");
    let as_keyshare =
        psm_net::client::channel(&url, "keyshare-1", Some(Role::Keyshare), &client, &opts).unwrap();
    let res = psm_net::client::wait_serving(as_keyshare, INGEST, Duration::from_secs(3)).await;
    let e = res.expect_err("a keyshare client accepted an ingest certificate");
    assert!(e.to_string().contains("not SERVING"), "{e}");
    // The same server is accepted by a client that expects any service of that name.
    let any = psm_net::client::channel(&url, "keyshare-1", None, &client, &opts).unwrap();
    psm_net::client::wait_serving(any, INGEST, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Certificate revocation (a CRL signed by the CA, `--tls-crl`): revoking a client's
/// certificate makes the service refuse it within seconds, without a restart, while other
/// clients go on; revoking the service's own certificate makes clients refuse to talk to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_by_services_and_clients() {
    let pki = TestPki::new(TD);
    pki.tls(Role::Operator, "retired");
    let crl = pki.pki.revoke(Role::Operator, "retired").unwrap();
    let crl_arg = crl.to_str().unwrap().to_owned();
    let ks = Proc::start_keyshare(
        &pki,
        "keyshare-1",
        &psm_e2e::keys::key_set(3, 2),
        &["--tls-crl", &crl_arg],
    )
    .await;
    let as_op = |name: &str| pki.channel(ks.port, "keyshare-1", Role::Operator, name);
    let e = status(as_op("retired")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{}", e.message());
    assert_eq!(status(as_op("billing")).await.unwrap(), "keyshare-1");

    // Revoke a certificate in use: refused once the service has re-read the list.
    pki.pki.revoke(Role::Operator, "billing").unwrap();
    let mut refused = None;
    for _ in 0..50 {
        match status(as_op("billing")).await {
            Err(e) if e.code() == Code::Unauthenticated => {
                refused = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let e = refused.expect("the revoked certificate was still accepted after 10 s");
    assert!(e.message().contains("revoked"), "{}", e.message());
    assert_eq!(status(as_op("billing-2")).await.unwrap(), "keyshare-1");

    // Revoke the keyshare's own certificate: clients that have the list refuse the server.
    pki.pki.revoke(Role::Keyshare, "keyshare-1").unwrap();
    assert_refused_connection(
        status(as_op("billing-2")).await,
        "a client reached a server whose certificate is revoked",
    );
}
