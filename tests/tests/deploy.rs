//! The example configurations under deploy/config are what the services accept: each file is
//! read by the same loader and section types the binaries use (unknown keys are errors), and the
//! keyshare policies validate.

use std::path::{Path, PathBuf};

use psm_net::config::load_file;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config")
        .join(file)
}

#[test]
fn example_configs_parse_with_the_services_own_types() {
    let ingest = load_file::<ingest_svc::IngestSection>(Some(&deploy("ingest.toml")), "ingest")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ingest.service.registry.is_some());
    let registry = psm_core::registry::Registry::load(Some(&deploy("registry.toml")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(registry.entry("meter-0001").is_some());
    assert!(ingest.service.public_dir.is_some());
    assert!(ingest.server.health_listen.is_some());

    let compute =
        load_file::<compute_svc::ComputeSection>(Some(&deploy("compute.toml")), "compute")
            .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = compute
        .service
        .keyshares
        .iter()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["keyshare-1", "keyshare-2", "keyshare-3"]);

    // The PostgreSQL choice (deploy/k8s/postgres, docker-compose.yml).
    let ingest =
        load_file::<ingest_svc::IngestSection>(Some(&deploy("ingest-postgres.toml")), "ingest")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ingest.service.store.backend,
        ingest_svc::store::BackendKind::Postgres
    );
    assert!(ingest.service.store.url.is_some());
    let compute =
        load_file::<compute_svc::ComputeSection>(Some(&deploy("compute-postgres.toml")), "compute")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        compute.service.jobs.backend,
        compute_svc::job_queue::JobsBackend::Postgres
    );

    for i in 1..=3 {
        let file = format!("keyshare-{i}.toml");
        let ks = load_file::<keyshare_svc::KeyshareSection>(Some(&deploy(&file)), "keyshare")
            .unwrap_or_else(|e| panic!("{e}"));
        let share = ks.service.share_file.as_ref().expect("share_file");
        assert!(share.ends_with(format!("keyshare-{i}.share")), "{file}");
        assert!(ks.service.ingest_url.is_some(), "{file} re-executes");
        let peers: Vec<&str> = ks.service.peers.keys().map(String::as_str).collect();
        assert_eq!(peers.len(), 2, "{file} names both co-holders");
        assert!(!peers.contains(&format!("keyshare-{i}").as_str()), "{file}");
        ks.service
            .policy
            .validate()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
