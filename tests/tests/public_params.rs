//! GetPublicParams: public key material streamed in chunks, by name or hash, hash-checked.

use psm_e2e::{Proc, TestPki};
use psm_net::Role;
use psm_proto::service_names::INGEST;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::GetPublicParamsRequest;
use tonic::Code;

async fn fetch(
    client: &mut IngestClient<tonic::transport::Channel>,
    req: GetPublicParamsRequest,
) -> Result<(Vec<u8>, Vec<u8>, usize), tonic::Status> {
    let mut stream = client.get_public_params(req).await?.into_inner();
    let mut data = Vec::new();
    let mut hash = Vec::new();
    let mut chunks = 0;
    while let Some(c) = stream.message().await? {
        assert_eq!(c.offset as usize, data.len());
        assert!(c.data.len() <= ingest_svc::CHUNK_BYTES);
        data.extend_from_slice(&c.data);
        assert!(c.total_size as usize >= data.len());
        hash = c.item_hash;
        chunks += 1;
    }
    Ok((data, hash, chunks))
}

#[tokio::test]
async fn public_material_by_name_and_hash() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let public = keys.public_dir.to_str().unwrap().to_owned();
    let ingest = Proc::start(
        &pki,
        "ingest-svc",
        Role::Ingest,
        "ingest",
        INGEST,
        &["--public-dir", &public],
    )
    .await;
    let mut client =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Meter, "meter-0001"));

    let item = keys.manifest.item("server_key").unwrap().clone();
    let (data, hash, chunks) = fetch(
        &mut client,
        GetPublicParamsRequest {
            name: "server_key".into(),
            hash: vec![],
        },
    )
    .await
    .unwrap();
    assert_eq!(data.len() as u64, item.size);
    assert_eq!(hex::encode(&hash), item.blake3);
    assert_eq!(blake3::hash(&data).to_hex().as_str(), item.blake3);
    assert!(chunks > 100, "a {} byte key in {chunks} chunks", data.len());

    let crs = keys.manifest.item("crs").unwrap().clone();
    let (data, _, _) = fetch(
        &mut client,
        GetPublicParamsRequest {
            name: String::new(),
            hash: hex::decode(&crs.blake3).unwrap(),
        },
    )
    .await
    .unwrap();
    assert_eq!(blake3::hash(&data).to_hex().as_str(), crs.blake3);

    let (manifest, _, _) = fetch(
        &mut client,
        GetPublicParamsRequest {
            name: "manifest".into(),
            hash: vec![],
        },
    )
    .await
    .unwrap();
    assert!(String::from_utf8(manifest)
        .unwrap()
        .contains(&keys.manifest.tfhe_key_id));

    let e = fetch(
        &mut client,
        GetPublicParamsRequest {
            name: "secret_key".into(),
            hash: vec![],
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("server_key"), "{}", e.message());
    let e = fetch(
        &mut client,
        GetPublicParamsRequest {
            name: "crs".into(),
            hash: vec![0; 32],
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = fetch(&mut client, GetPublicParamsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}
