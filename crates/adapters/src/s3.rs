//! `dataset_metadata.json` on S3 (or MinIO/moto): `MetadataStore` for
//! `s3://bucket/key` URLs.
//!
//! A signed `HEAD` compares the object's ETag with the last seen one
//! (`Unchanged` costs no download); otherwise a signed `GET` reads and
//! validates the JSON. Path-style addressing is used with a custom endpoint
//! (moto, MinIO, LocalStack) and for bucket names with dots (virtual-host
//! TLS certificates do not cover them); virtual-host style otherwise.
//!
//! Every attempt is signed when it is sent ([`SigV4Signer::send`]), and the
//! body is read up to [`MAX_METADATA_BYTES`] (like the Hub metadata store):
//! a URL pointing at a dataset archive fails fast instead of buffering it.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use retrain_core::domain::{DatasetMetadata, DatasetVersion};
use retrain_core::ports::{MetadataRead, MetadataStore, PortError};
use serde::Deserialize;
use url::Url;

use crate::aws::{encode_s3_key, AwsSettings, SigV4Signer};
use crate::error::AdapterError;
use crate::http::{is_retryable_status, HttpPolicy, RetryingClient};

/// Largest metadata object read (1 MiB): `dataset_metadata.json` is a few
/// hundred bytes; anything bigger is the wrong object.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// `MetadataStore` reading one S3 object.
#[derive(Debug, Clone)]
pub struct S3MetadataStore {
    http: RetryingClient,
    signer: SigV4Signer,
    bucket: String,
    key: String,
    object_url: Url,
}

#[derive(Debug, Deserialize)]
struct S3ErrorXml {
    #[serde(rename = "Code", default)]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

impl S3MetadataStore {
    /// `url` is `s3://bucket/path/to/dataset_metadata.json`.
    pub fn new(settings: AwsSettings, url: &str) -> Result<Self, AdapterError> {
        Self::with_policy(settings, url, HttpPolicy::default())
    }

    pub fn with_policy(
        settings: AwsSettings,
        url: &str,
        policy: HttpPolicy,
    ) -> Result<Self, AdapterError> {
        let (bucket, key) = parse_s3_url(url)?;
        let object_url = object_url(&settings, &bucket, &key)?;
        Ok(Self {
            http: RetryingClient::new("s3", policy)?,
            signer: settings.signer("s3"),
            bucket,
            key,
            object_url,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    fn address(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    async fn send(&self, method: Method) -> Result<reqwest::Response, PortError> {
        let what = self.address();
        self.signer
            .send(&self.http, &what, method, &self.object_url, &[], b"")
            .await
    }

    /// The request URL for messages: no query string, no userinfo.
    fn display_url(&self) -> String {
        let mut url = self.object_url.clone();
        url.set_query(None);
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.to_string()
    }

    fn too_large(&self, size: Option<u64>) -> PortError {
        PortError::InvalidResponse(format!(
            "{}: the object at {} is larger than the {} byte (1 MiB) limit for dataset metadata{} (check that the URL names the metadata file)",
            self.address(),
            self.display_url(),
            MAX_METADATA_BYTES,
            size.map(|s| format!(" ({s} bytes)")).unwrap_or_default(),
        ))
    }

    /// The body, at most [`MAX_METADATA_BYTES`]: refused up front when
    /// `Content-Length` says so, else as soon as the stream exceeds it.
    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Vec<u8>, PortError> {
        if let Some(length) = response.content_length() {
            if length > MAX_METADATA_BYTES as u64 {
                return Err(self.too_large(Some(length)));
            }
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_METADATA_BYTES {
                        return Err(self.too_large(None));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(PortError::Transient(format!(
                        "{}: reading the object failed: {}",
                        self.address(),
                        if e.is_timeout() {
                            "timed out"
                        } else {
                            "connection error"
                        }
                    )))
                }
            }
        }
    }

    /// Map a non-2xx answer; `None` for "no such key" (→ `Absent`).
    async fn failure(&self, response: reqwest::Response) -> Option<PortError> {
        let status = response.status();
        let region_hint = response
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // HEAD answers have no body: the status alone decides.
        let body = response.text().await.unwrap_or_default();
        let parsed = quick_xml::de::from_str::<S3ErrorXml>(&body).ok();
        let code = parsed.as_ref().map(|e| e.code.as_str()).unwrap_or("");
        let message = parsed.as_ref().map(|e| e.message.as_str()).unwrap_or("");
        let address = self.address();
        match (status, code) {
            (_, "NoSuchBucket") => Some(PortError::NotFound(format!(
                "{address}: bucket `{}` does not exist",
                self.bucket
            ))),
            (StatusCode::NOT_FOUND, _) => None,
            (StatusCode::FORBIDDEN, _) | (StatusCode::UNAUTHORIZED, _) => {
                Some(PortError::Denied(format!(
                    "{address}: access denied to bucket `{}`{}{} (the credentials need s3:GetObject on it; a missing key also looks like this without s3:ListBucket)",
                    self.bucket,
                    if code.is_empty() { String::new() } else { format!(" [{code}]") },
                    if message.is_empty() { String::new() } else { format!(": {message}") },
                )))
            }
            (StatusCode::MOVED_PERMANENTLY, _) | (_, "PermanentRedirect") | (_, "AuthorizationHeaderMalformed") => {
                Some(PortError::Config(format!(
                    "{address}: bucket `{}` is in another region{} than the configured `{}` (set AWS_REGION)",
                    self.bucket,
                    region_hint.map(|r| format!(" (`{r}`)")).unwrap_or_default(),
                    self.signer.region()
                )))
            }
            (s, _) if is_retryable_status(s) => Some(PortError::Transient(format!(
                "{address}: HTTP {s} after retries{}",
                if code.is_empty() { String::new() } else { format!(" [{code}]") }
            ))),
            (s, _) => Some(PortError::Failed(format!(
                "{address}: HTTP {s}{}{}",
                if code.is_empty() { String::new() } else { format!(" [{code}]") },
                if message.is_empty() { String::new() } else { format!(": {message}") },
            ))),
        }
    }
}

fn etag_of(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_owned()
        })
        .filter(|v| !v.is_empty())
}

/// Split `s3://bucket/key`, validating both parts.
pub fn parse_s3_url(url: &str) -> Result<(String, String), AdapterError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        AdapterError::config("metadata", format!("`{url}` is not an s3://bucket/key URL"))
    })?;
    let (bucket, key) = rest.split_once('/').ok_or_else(|| {
        AdapterError::config(
            "metadata",
            format!("`{url}` has no object key after the bucket"),
        )
    })?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !bucket_ok {
        return Err(AdapterError::config(
            "metadata",
            format!("`{bucket}` in `{url}` is not a valid S3 bucket name"),
        ));
    }
    if key.is_empty() || key.ends_with('/') {
        return Err(AdapterError::config(
            "metadata",
            format!("`{url}` must name an object, not a prefix"),
        ));
    }
    Ok((bucket.to_owned(), key.to_owned()))
}

fn object_url(settings: &AwsSettings, bucket: &str, key: &str) -> Result<Url, AdapterError> {
    let key = encode_s3_key(key);
    let raw = match settings.s3_custom_endpoint() {
        Some(endpoint) => format!("{}/{bucket}/{key}", endpoint.as_str().trim_end_matches('/')),
        None if bucket.contains('.') => {
            format!(
                "https://s3.{}.amazonaws.com/{bucket}/{key}",
                settings.region
            )
        }
        None => format!(
            "https://{bucket}.s3.{}.amazonaws.com/{key}",
            settings.region
        ),
    };
    Url::parse(&raw)
        .map_err(|e| AdapterError::config("metadata", format!("cannot build the S3 URL: {e}")))
}

#[async_trait]
impl MetadataStore for S3MetadataStore {
    async fn read(&self, known_revision: Option<String>) -> Result<MetadataRead, PortError> {
        if let Some(known) = known_revision.as_deref() {
            let head = self.send(Method::HEAD).await?;
            if head.status().is_success() {
                if etag_of(&head).as_deref() == Some(known) {
                    return Ok(MetadataRead::Unchanged);
                }
            } else if let Some(err) = self.failure(head).await {
                return Err(err);
            } else {
                return Ok(MetadataRead::Absent);
            }
        }
        let response = self.send(Method::GET).await?;
        if !response.status().is_success() {
            return match self.failure(response).await {
                Some(err) => Err(err),
                None => Ok(MetadataRead::Absent),
            };
        }
        // The GET's own ETag is the revision: the object may have changed
        // between the HEAD and the GET.
        let revision = etag_of(&response);
        let bytes = self.read_capped(response).await?;
        let metadata = DatasetMetadata::parse(&bytes)
            .map_err(|e| PortError::InvalidResponse(format!("{}: {e}", self.address())))?;
        Ok(MetadataRead::Published(DatasetVersion {
            metadata,
            revision,
        }))
    }

    fn describe(&self) -> String {
        self.address()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn settings() -> AwsSettings {
        AwsSettings::new("a", SecretString::from("b"), "eu-west-1")
    }

    #[test]
    fn urls_are_validated() {
        assert_eq!(
            parse_s3_url("s3://my-bucket/wms/dataset_metadata.json").unwrap(),
            ("my-bucket".into(), "wms/dataset_metadata.json".into())
        );
        assert!(parse_s3_url("https://x/y").is_err());
        assert!(parse_s3_url("s3://bucket").is_err());
        assert!(parse_s3_url("s3://bucket/prefix/").is_err());
        assert!(parse_s3_url("s3://Bad_Bucket/k").is_err());
    }

    #[test]
    fn addressing_style_follows_the_endpoint() {
        assert_eq!(
            object_url(&settings(), "b-1", "a b/m.json")
                .unwrap()
                .as_str(),
            "https://b-1.s3.eu-west-1.amazonaws.com/a%20b/m.json"
        );
        assert_eq!(
            object_url(&settings(), "b.dotted", "m.json")
                .unwrap()
                .as_str(),
            "https://s3.eu-west-1.amazonaws.com/b.dotted/m.json"
        );
        let custom = settings().with_endpoint(Url::parse("http://127.0.0.1:9000/").unwrap());
        assert_eq!(
            object_url(&custom, "b-1", "m.json").unwrap().as_str(),
            "http://127.0.0.1:9000/b-1/m.json"
        );
    }
}
