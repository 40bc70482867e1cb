//! S3 metadata store against `moto_server` (RETRAIN_TEST_MOTO_URL), and
//! wiremock for the error mapping.

use retrain_adapters::aws::encode_s3_key;
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::s3::S3MetadataStore;
use retrain_adapters::testing::services::{
    dataset_metadata, moto_settings, s3_put, unique_name, MOTO_SECRET_KEY, MOTO_VAR,
};
use retrain_core::ports::{MetadataRead, MetadataStore, PortError};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::service_url;

fn metadata(version: &str, samples: u64) -> Vec<u8> {
    serde_json::to_vec(&dataset_metadata("wms", version, samples)).unwrap()
}

#[tokio::test]
async fn moto_published_unchanged_new_revision_and_malformed() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let settings = moto_settings(&url);
    let bucket = unique_name("retrain-it");
    let key = "wms/dataset metadata.json"; // a space: the key path must be encoded
    s3_put(&settings, &url, &bucket, b"").await;

    let store = S3MetadataStore::with_policy(
        settings.clone(),
        &format!("s3://{bucket}/{key}"),
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    assert_eq!(store.describe(), format!("s3://{bucket}/{key}"));
    // Nothing published yet.
    assert_eq!(store.read(None).await.unwrap(), MetadataRead::Absent);
    assert_eq!(
        store.read(Some("stale".into())).await.unwrap(),
        MetadataRead::Absent
    );

    let object = format!("{bucket}/{}", encode_s3_key(key));
    s3_put(&settings, &url, &object, &metadata("v1", 120)).await;
    let MetadataRead::Published(first) = store.read(None).await.unwrap() else {
        panic!("expected a published version");
    };
    assert_eq!(first.metadata.version_tag.as_str(), "v1");
    assert_eq!(first.metadata.num_samples, 120);
    let etag = first.revision.clone().expect("ETag as revision");
    assert!(!etag.contains('"'), "{etag}");

    assert_eq!(
        store.read(Some(etag.clone())).await.unwrap(),
        MetadataRead::Unchanged
    );

    s3_put(&settings, &url, &object, &metadata("v2", 150)).await;
    let MetadataRead::Published(second) = store.read(Some(etag.clone())).await.unwrap() else {
        panic!("expected a new version");
    };
    assert_eq!(second.metadata.version_tag.as_str(), "v2");
    assert_ne!(second.revision.as_deref(), Some(etag.as_str()));

    s3_put(
        &settings,
        &url,
        &object,
        br#"{"dataset_name": "wms", "version_tag": "v3", "created_at": "2026-02-10T12:34:56Z"}"#,
    )
    .await;
    let err = store.read(second.revision.clone()).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!("s3://{bucket}/{key}")),
        "{err}"
    );
    assert!(err.to_string().contains("num_samples"), "{err}");

    s3_put(&settings, &url, &object, b"{not json").await;
    let err = store.read(None).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("s3://{bucket}/{key}")),
        "{err}"
    );
}

#[tokio::test]
async fn moto_missing_bucket_is_an_error_naming_it() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let bucket = unique_name("retrain-it");
    let store = S3MetadataStore::with_policy(
        moto_settings(&url),
        &format!("s3://{bucket}/m.json"),
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    let err = store.read(None).await.unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains(&bucket), "{err}");
}

#[tokio::test]
async fn forbidden_is_denied_naming_the_bucket_and_no_secret() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(403).set_body_string(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>x</RequestId></Error>",
        ))
        .mount(&server)
        .await;
    Mock::given(method("HEAD"))
        .respond_with(ResponseTemplate::new(403))
        .mount(&server)
        .await;
    let settings = moto_settings(&server.uri());
    let store = S3MetadataStore::with_policy(
        settings,
        "s3://private-bucket/meta.json",
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    for known in [None, Some("etag".to_owned())] {
        let err = store.read(known).await.unwrap_err();
        assert!(matches!(err, PortError::Denied(_)), "{err:?}");
        assert!(err.to_string().contains("private-bucket"), "{err}");
        assert!(!format!("{err:?} {store:?}").contains(MOTO_SECRET_KEY));
    }
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests[0].url.path(),
        "/private-bucket/meta.json",
        "path-style with a custom endpoint"
    );
    assert!(requests[0].headers.contains_key("x-amz-content-sha256"));
    let auth = requests[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(auth.contains("/s3/aws4_request"), "{auth}");
}

fn valid_metadata_body() -> Vec<u8> {
    metadata("v7", 42)
}

#[tokio::test]
async fn every_attempt_is_signed_afresh() {
    // 503 + Retry-After: 1, then 200: the retry must carry its own
    // signature, not the one computed for the first attempt.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(503)
                .insert_header("retry-after", "1")
                .set_body_string("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", "\"5d41402abc4b2a76b9719d911017c592\"")
                .set_body_bytes(valid_metadata_body()),
        )
        .mount(&server)
        .await;
    let store = S3MetadataStore::with_policy(
        moto_settings(&server.uri()),
        "s3://bucket-a/meta.json",
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    let MetadataRead::Published(read) = store.read(None).await.unwrap() else {
        panic!("expected a published version");
    };
    assert_eq!(read.metadata.version_tag.as_str(), "v7");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let header = |i: usize, name: &str| {
        requests[i]
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("request {i} has no {name}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_ne!(header(0, "x-amz-date"), header(1, "x-amz-date"));
    assert_ne!(header(0, "authorization"), header(1, "authorization"));
    // The retry's signature covers its own date.
    let date = header(1, "x-amz-date");
    assert!(
        header(1, "authorization").contains(&format!("Credential=testing/{}/", &date[..8])),
        "{}",
        header(1, "authorization")
    );
}

#[tokio::test]
async fn an_oversized_object_is_refused_naming_the_url_and_the_limit() {
    let server = MockServer::start().await;
    let mut big = b"{\"dataset_name\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 10));
    big.extend(b"\"}");
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(big))
        .mount(&server)
        .await;
    let store = S3MetadataStore::with_policy(
        moto_settings(&server.uri()),
        "s3://bucket-a/wms/archive.tar",
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    let err = store.read(None).await.unwrap_err();
    assert!(matches!(err, PortError::InvalidResponse(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("s3://bucket-a/wms/archive.tar"), "{text}");
    assert!(
        text.contains(&format!("{}/bucket-a/wms/archive.tar", server.uri())),
        "{text}"
    );
    assert!(text.contains("1048576"), "{text}");
    assert!(!text.contains('?'), "no query string: {text}");

    // Exactly at the limit is still read (and then parsed).
    let server = MockServer::start().await;
    let mut at_limit = valid_metadata_body();
    at_limit.resize(1 << 20, b' ');
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(at_limit))
        .mount(&server)
        .await;
    let store = S3MetadataStore::with_policy(
        moto_settings(&server.uri()),
        "s3://bucket-a/meta.json",
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    assert!(matches!(
        store.read(None).await.unwrap(),
        MetadataRead::Published(_)
    ));
}
