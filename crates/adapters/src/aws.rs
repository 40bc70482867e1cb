//! AWS credentials, endpoints and SigV4 request signing shared by the S3
//! metadata store and the EC2 lease provider.
//!
//! We sign plain `reqwest` requests with `aws-sigv4` instead of pulling the
//! AWS SDK or `object_store`: two services, four operations, and the
//! `RetryingClient` policy stays the one every other adapter uses (see
//! `docs/ARCHITECTURE.md (S3 and EC2 section)`).
//!
//! Every attempt of the retry loop is signed at the moment it is sent
//! ([`SigV4Signer::send`]): a retry after a long `Retry-After` wait never
//! replays a signature computed earlier (AWS rejects requests whose
//! `x-amz-date` is more than 15 minutes off, and a byte-identical resend is
//! what a replay looks like).

use std::fmt;
use std::sync::Mutex;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use reqwest::{Method, Response};
use retrain_core::ports::PortError;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::error::AdapterError;
use crate::http::RetryingClient;

/// Region used when neither the config nor `AWS_REGION`/`AWS_DEFAULT_REGION` set one
/// (the SDKs' historical default; moto ignores it).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Credentials, region and endpoint overrides for AWS calls.
///
/// `Debug` masks the secret key and session token (and shortens the key id),
/// so settings can be logged and embedded in errors safely.
#[derive(Clone)]
pub struct AwsSettings {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
    pub region: String,
    /// `AWS_ENDPOINT_URL`: one endpoint for every service (moto, LocalStack).
    pub endpoint_url: Option<Url>,
    /// `AWS_ENDPOINT_URL_S3`: S3 only (MinIO); wins over `endpoint_url`.
    pub endpoint_url_s3: Option<Url>,
    /// `AWS_ENDPOINT_URL_EC2`: EC2 only; wins over `endpoint_url`.
    pub endpoint_url_ec2: Option<Url>,
}

impl fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key id is not a secret per AWS, but it identifies an account
        // user; four characters are enough to tell keys apart in logs.
        let key_hint: String = self.access_key_id.chars().take(4).collect();
        f.debug_struct("AwsSettings")
            .field("access_key_id", &format!("{key_hint}***"))
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url.as_ref().map(Url::as_str))
            .field(
                "endpoint_url_s3",
                &self.endpoint_url_s3.as_ref().map(Url::as_str),
            )
            .field(
                "endpoint_url_ec2",
                &self.endpoint_url_ec2.as_ref().map(Url::as_str),
            )
            .finish()
    }
}

impl AwsSettings {
    /// Static credentials with no endpoint override.
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: SecretString,
        region: impl Into<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key,
            session_token: None,
            region: region.into(),
            endpoint_url: None,
            endpoint_url_s3: None,
            endpoint_url_ec2: None,
        }
    }

    /// Read the standard AWS environment variables: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` then
    /// `AWS_DEFAULT_REGION` (default `us-east-1`), `AWS_ENDPOINT_URL`,
    /// `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_EC2`.
    pub fn from_env() -> Result<Self, AdapterError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`AwsSettings::from_env`] over any lookup (tests, figment-provided maps).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AdapterError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let access_key_id = get("AWS_ACCESS_KEY_ID").ok_or_else(|| {
            AdapterError::config(
                "AWS_ACCESS_KEY_ID",
                "is not set (static credentials are required for S3/EC2)",
            )
        })?;
        let secret = get("AWS_SECRET_ACCESS_KEY")
            .ok_or_else(|| AdapterError::config("AWS_SECRET_ACCESS_KEY", "is not set"))?;
        let endpoint = |name: &str| -> Result<Option<Url>, AdapterError> {
            get(name).map(|raw| parse_endpoint(name, &raw)).transpose()
        };
        Ok(Self {
            access_key_id: access_key_id.trim().to_owned(),
            secret_access_key: SecretString::from(secret.trim().to_owned()),
            session_token: get("AWS_SESSION_TOKEN")
                .map(|t| SecretString::from(t.trim().to_owned())),
            region: get("AWS_REGION")
                .or_else(|| get("AWS_DEFAULT_REGION"))
                .map(|r| r.trim().to_owned())
                .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
            endpoint_url: endpoint("AWS_ENDPOINT_URL")?,
            endpoint_url_s3: endpoint("AWS_ENDPOINT_URL_S3")?,
            endpoint_url_ec2: endpoint("AWS_ENDPOINT_URL_EC2")?,
        })
    }

    /// The same settings in another region (a lease's `region` overrides the env).
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// One endpoint for every service (e.g. a moto server).
    pub fn with_endpoint(mut self, endpoint: Url) -> Self {
        self.endpoint_url = Some(endpoint);
        self
    }

    /// The S3 endpoint override, if any (custom endpoints use path-style addressing).
    pub fn s3_custom_endpoint(&self) -> Option<&Url> {
        self.endpoint_url_s3.as_ref().or(self.endpoint_url.as_ref())
    }

    /// The EC2 endpoint: the override, else `https://ec2.<region>.amazonaws.com/`.
    pub fn ec2_endpoint(&self) -> Result<Url, AdapterError> {
        match self
            .endpoint_url_ec2
            .as_ref()
            .or(self.endpoint_url.as_ref())
        {
            Some(url) => Ok(url.clone()),
            None => parse_endpoint(
                "region",
                &format!("https://ec2.{}.amazonaws.com/", self.region),
            ),
        }
    }

    /// A signer for `service` (`"s3"`, `"ec2"`) in this settings' region.
    pub fn signer(&self, service: &'static str) -> SigV4Signer {
        SigV4Signer {
            identity: Credentials::new(
                self.access_key_id.clone(),
                self.secret_access_key.expose_secret().to_owned(),
                self.session_token
                    .as_ref()
                    .map(|t| t.expose_secret().to_owned()),
                None,
                "retrain-static",
            )
            .into(),
            region: self.region.clone(),
            service,
        }
    }
}

fn parse_endpoint(name: &str, raw: &str) -> Result<Url, AdapterError> {
    let url = Url::parse(raw.trim())
        .map_err(|e| AdapterError::config(name, format!("is not a URL ({e}): {raw}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(AdapterError::config(
            name,
            format!("must be an http(s) URL with a host, got {raw}"),
        ));
    }
    Ok(url)
}

/// Signs requests for one AWS service with SigV4 (headers, not query string).
#[derive(Clone)]
pub struct SigV4Signer {
    identity: Identity,
    region: String,
    service: &'static str,
}

impl fmt::Debug for SigV4Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigV4Signer")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl SigV4Signer {
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Headers to add to a request so AWS (or moto) accepts it: `x-amz-date`,
    /// `authorization`, `x-amz-security-token` with a session token and, for
    /// S3, `x-amz-content-sha256`. `headers` are the request's own headers that
    /// must be signed (`host` is derived from `url` and always signed).
    ///
    /// The `url` must already be percent-encoded exactly as it will be sent:
    /// S3 signs the path as-is (single encoding, no normalisation).
    pub fn sign(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Vec<(String, String)>, PortError> {
        let host = host_header(url).ok_or_else(|| {
            PortError::Config(format!("{} endpoint {url} has no host", self.service))
        })?;
        let mut settings = SigningSettings::default();
        if self.service == "s3" {
            // S3 wants the payload hash as a header and the key path as sent.
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        }
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| PortError::Config(format!("cannot sign {} request: {e}", self.service)))?
            .into();
        let all_headers = std::iter::once(("host", host.as_str())).chain(headers.iter().copied());
        let signable =
            SignableRequest::new(method, url.as_str(), all_headers, SignableBody::Bytes(body))
                .map_err(|e| {
                    PortError::Config(format!(
                        "cannot sign {} request to {url}: {e}",
                        self.service
                    ))
                })?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| {
                PortError::Config(format!(
                    "cannot sign {} request to {url}: {e}",
                    self.service
                ))
            })?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect())
    }

    /// Send `method url` with `headers` and `body` through `http`'s retry
    /// policy, signing **each attempt** when it is built (the retry loop
    /// calls its builder once per attempt, right before sending).
    ///
    /// `what` names the resource in errors and retry logs. A signing failure
    /// is returned as itself (`Config`), and nothing unsigned is ever sent.
    pub async fn send(
        &self,
        http: &RetryingClient,
        what: &str,
        method: Method,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, PortError> {
        // `RetryingClient::send` takes an infallible builder; a signing error
        // is parked here and the attempt is made to fail inside reqwest
        // before any byte goes out (see `poisoned`).
        let signing_failure: Mutex<Option<PortError>> = Mutex::new(None);
        let result = http
            .send(what, |client| {
                let mut request = client.request(method.clone(), url.clone());
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                match self.sign(method.as_str(), url, headers, body) {
                    Ok(signed) => {
                        for (name, value) in signed {
                            request = request.header(name, value);
                        }
                        request.body(body.to_vec())
                    }
                    Err(e) => {
                        *signing_failure
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
                        poisoned(request)
                    }
                }
            })
            .await;
        let parked = signing_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match parked {
            Some(e) => Err(e),
            None => result,
        }
    }
}

/// A request reqwest refuses to send: an invalid header value is recorded
/// as a builder error and returned by `send()` without touching the network
/// (builder errors are not retried by `RetryingClient`).
fn poisoned(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.header("x-retrain-signing-failed", "\n")
}

/// The `Host` header reqwest will send: the port only when it is not the
/// scheme's default (the url crate already omits default ports).
fn host_header(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// Percent-encode an S3 object key for the request path: everything except
/// unreserved characters and `/` (AWS's `UriEncode(key, false)`).
pub fn encode_s3_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn reads_standard_env_names_and_masks_secrets() {
        let settings = AwsSettings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-key"),
            ("AWS_SESSION_TOKEN", "very-secret-token"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:5001"),
        ]))
        .unwrap();
        assert_eq!(settings.region, "eu-west-1");
        assert_eq!(
            settings.ec2_endpoint().unwrap().as_str(),
            "http://127.0.0.1:5001/"
        );
        assert_eq!(
            settings.s3_custom_endpoint().unwrap().as_str(),
            "http://127.0.0.1:5000/"
        );
        let debug = format!("{settings:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(!debug.contains("AKIAEXAMPLEKEY"), "{debug}");
        let signer = settings.signer("ec2");
        assert!(!format!("{signer:?}").contains("very-secret"));
    }

    #[test]
    fn aws_region_wins_and_default_is_us_east_1() {
        let s = AwsSettings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "b"),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]))
        .unwrap();
        assert_eq!(s.region, "ap-south-1");
        assert_eq!(
            s.ec2_endpoint().unwrap().as_str(),
            "https://ec2.ap-south-1.amazonaws.com/"
        );
        let s = AwsSettings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "b"),
        ]))
        .unwrap();
        assert_eq!(s.region, DEFAULT_REGION);
        assert!(s.s3_custom_endpoint().is_none());
    }

    #[test]
    fn missing_credentials_and_bad_endpoints_name_the_variable() {
        let err = AwsSettings::from_lookup(lookup(&[])).unwrap_err();
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"));
        let err = AwsSettings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "secret-value"),
            ("AWS_ENDPOINT_URL_S3", "not a url"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("AWS_ENDPOINT_URL_S3"));
        assert!(!err.to_string().contains("secret-value"));
    }

    #[test]
    fn signs_with_the_service_scope_and_s3_payload_hash() {
        let settings = AwsSettings::new("testing", SecretString::from("testing"), "us-east-1");
        let url = Url::parse("http://127.0.0.1:5000/").unwrap();
        let headers = settings
            .signer("ec2")
            .sign(
                "POST",
                &url,
                &[(
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                )],
                b"Action=DescribeInstances",
            )
            .unwrap();
        let auth = headers.iter().find(|(k, _)| k == "authorization").unwrap();
        assert!(auth.1.contains("/us-east-1/ec2/aws4_request"), "{}", auth.1);
        assert!(auth
            .1
            .contains("SignedHeaders=content-type;host;x-amz-date"));
        let s3 = settings
            .signer("s3")
            .sign(
                "GET",
                &Url::parse("http://127.0.0.1:5000/b/k%20x").unwrap(),
                &[],
                b"",
            )
            .unwrap();
        assert!(s3.iter().any(|(k, _)| k == "x-amz-content-sha256"));
    }

    #[tokio::test]
    async fn a_signing_failure_is_returned_and_nothing_is_sent() {
        use crate::http::{HttpPolicy, RetryingClient};
        let settings = AwsSettings::new("testing", SecretString::from("s3cr3t"), "us-east-1");
        let http = RetryingClient::new("test", HttpPolicy::fast_for_tests()).unwrap();
        // No host: SigV4 cannot sign it.
        let url = Url::parse("data:text/plain,x").unwrap();
        let err = settings
            .signer("s3")
            .send(&http, "s3://b/k", Method::GET, &url, &[], b"")
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("has no host"), "{err}");
        assert!(!format!("{err:?}").contains("s3cr3t"));
    }

    #[test]
    fn s3_keys_are_encoded_like_aws() {
        assert_eq!(
            encode_s3_key("wms/dataset_metadata.json"),
            "wms/dataset_metadata.json"
        );
        assert_eq!(encode_s3_key("a b/c+d:é"), "a%20b/c%2Bd%3A%C3%A9");
    }
}
