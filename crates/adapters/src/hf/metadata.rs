//! `dataset_metadata.json` in a Hub dataset repo, read through the resolve
//! URL with one conditional `GET` (§1.3 of the API notes): the Hub answers
//! `If-None-Match` on resolve URLs with `304 Not Modified`, no body.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use percent_encoding::{percent_decode_str, utf8_percent_encode};
use reqwest::header::{HeaderValue, ETAG, IF_NONE_MATCH};
use reqwest::{Method, Response, StatusCode};
use retrain_core::domain::{DatasetMetadata, DatasetVersion};
use retrain_core::ports::{MetadataRead, MetadataStore, PortError};
use tracing::debug;
use url::Url;

use super::{read_limited, HubClient, HubFailure, RepoId, QUOTE_ALL, QUOTE_PATH};
use crate::error::AdapterError;

/// Metadata files are a few hundred bytes; anything above this is a wrong URL.
const MAX_METADATA_BYTES: usize = 1 << 20;

/// Reads one metadata file on the Hub (or any HTTP URL serving it).
#[derive(Debug, Clone)]
pub struct HfMetadataStore {
    client: HubClient,
    url: Url,
    /// `owner/name` when the URL is a dataset resolve URL.
    repo: Option<RepoId>,
    /// Credential-free form for logs and errors.
    display: String,
    /// The last file downloaded, shared by the clones of this store (all
    /// read the same URL).
    last: Arc<Mutex<Option<LastDownload>>>,
    /// The request in flight, if any: reads that start while it runs share
    /// its answer instead of sending their own (labels reading one file).
    in_flight: Arc<Mutex<Option<FetchCell>>>,
}

/// What a conditional read needs to answer a `304`.
#[derive(Debug, Clone)]
struct LastDownload {
    /// The `ETag` header exactly as the Hub sent it (quotes and `W/`
    /// included), sent back as `If-None-Match`; `None` for a file
    /// downloaded through a redirect (the CDN's `ETag` is not the Hub's).
    etag: Option<HeaderValue>,
    version: DatasetVersion,
}

/// What one request found, before it is compared with a caller's marker.
#[derive(Debug, Clone)]
enum Fetched {
    Absent,
    Version(DatasetVersion),
    /// The file is there but not valid metadata; an error only for a caller
    /// that does not already hold the version with this marker.
    Invalid {
        marker: Option<String>,
        error: PortError,
    },
}

type FetchCell = Arc<tokio::sync::OnceCell<Result<Fetched, PortError>>>;

impl HfMetadataStore {
    /// Accepts `hf://datasets/owner/name[@revision]/path/to/file.json`
    /// (revision `main` by default; `refs/pr/N` and `refs/convert/X` may be
    /// written unescaped) and full URLs such as the seed's
    /// `https://huggingface.co/datasets/owner/name/resolve/main/dataset_metadata.json`.
    pub fn from_url(client: HubClient, url: &str) -> Result<Self, AdapterError> {
        let raw = url.trim();
        let (url, repo) = if let Some(rest) = raw.strip_prefix("hf://") {
            parse_hf_url(&client, rest)?
        } else if raw.starts_with("https://") || raw.starts_with("http://") {
            let url = Url::parse(raw).map_err(|e| {
                AdapterError::config("metadata", format!("invalid metadata URL: {e}"))
            })?;
            if !url.username().is_empty() || url.password().is_some() {
                // Not echoed: the URL carries a credential.
                return Err(AdapterError::config(
                    "metadata",
                    "the metadata URL must not contain credentials; set HF_TOKEN instead",
                ));
            }
            let repo = resolve_url_repo(&url);
            (url, repo)
        } else {
            return Err(AdapterError::config(
                "metadata",
                format!(
                    "{raw:?} is not a Hub metadata address; expected \
                     hf://datasets/owner/name[@revision]/path/to/file.json or \
                     https://huggingface.co/datasets/owner/name/resolve/main/dataset_metadata.json"
                ),
            ));
        };
        let display = url.to_string();
        Ok(Self {
            client,
            url,
            repo,
            display,
            last: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// The URL that is probed and fetched.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The dataset repo, when the URL is a Hub resolve URL.
    pub fn repo(&self) -> Option<&RepoId> {
        self.repo.as_ref()
    }

    fn what(&self) -> String {
        match &self.repo {
            Some(repo) => format!("dataset {repo} metadata {}", self.display),
            None => format!("metadata {}", self.display),
        }
    }

    fn read_permission(&self) -> String {
        match &self.repo {
            Some(repo) => format!("the token needs read access to dataset {repo}"),
            None => "the token needs read access to this URL".to_owned(),
        }
    }

    /// `Ok(None)` means the file is not there (yet): a 404 that is not about
    /// the repo or the revision. Anything else unsuccessful is an error.
    async fn check(&self, response: Response) -> Result<Option<Response>, PortError> {
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(Some(response));
        }
        if status == StatusCode::NOT_FOUND {
            let failure = HubFailure::from_headers(&response);
            // EntryNotFound (or a bare 404, as a plain file server answers):
            // the prepare job has not published yet. RepoNotFound and
            // RevisionNotFound are configuration errors, not "absent".
            if !matches!(
                failure.code.as_deref(),
                Some("RepoNotFound" | "RevisionNotFound")
            ) {
                return Ok(None);
            }
        }
        Err(self
            .client
            .error(&self.what(), &self.read_permission(), response)
            .await)
    }
}

#[async_trait]
impl MetadataStore for HfMetadataStore {
    /// One conditional `GET` per read: `If-None-Match` with the `ETag` of the
    /// last download, so an unchanged file costs a `304` without a body. A
    /// server that ignores the header answers `200`, and the change marker
    /// still tells `Unchanged` from `Published`. Reads that start while
    /// another read of this file is in flight share its request.
    async fn read(&self, known_revision: Option<String>) -> Result<MetadataRead, PortError> {
        Ok(match self.fetch_shared().await? {
            Fetched::Absent => MetadataRead::Absent,
            Fetched::Version(version) => answer(version, known_revision.as_deref()),
            // Nothing new to decide on: what the caller holds stays valid.
            Fetched::Invalid { marker, .. } if marker.is_some() && marker == known_revision => {
                MetadataRead::Unchanged
            }
            Fetched::Invalid { error, .. } => return Err(error),
        })
    }

    fn describe(&self) -> String {
        self.display.clone()
    }
}

/// `Unchanged` when the version carries a marker and it is the known one.
fn answer(version: DatasetVersion, known_revision: Option<&str>) -> MetadataRead {
    match (&version.revision, known_revision) {
        (Some(marker), Some(known)) if marker == known => MetadataRead::Unchanged,
        _ => MetadataRead::Published(version),
    }
}

impl HfMetadataStore {
    fn last_download(&self) -> Option<LastDownload> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn remember(&self, download: Option<LastDownload>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = download;
    }

    /// Join the request in flight, or send a new one. Only a request still
    /// running is joined: a read never gets an answer older than its start
    /// by more than one round trip.
    async fn fetch_shared(&self) -> Result<Fetched, PortError> {
        let cell = {
            let mut slot = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(cell) if !cell.initialized() => cell.clone(),
                _ => {
                    let cell = FetchCell::default();
                    *slot = Some(cell.clone());
                    cell
                }
            }
        };
        cell.get_or_init(|| self.fetch()).await.clone()
    }

    async fn fetch(&self) -> Result<Fetched, PortError> {
        let what = self.what();
        let last = self.last_download();
        let etag = last.as_ref().and_then(|l| l.etag.as_ref());
        // The probe client: the Hub's own headers, never a CDN's (§1.3).
        let response = self
            .client
            .send_with_header(
                &what,
                Method::GET,
                &self.url,
                None,
                true,
                etag.map(|etag| (IF_NONE_MATCH, etag)),
            )
            .await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return match last.filter(|l| l.etag.is_some()) {
                Some(last) => {
                    debug!(url = %self.display, "metadata not modified (304); not downloading it");
                    Ok(Fetched::Version(last.version))
                }
                None => Err(PortError::InvalidResponse(format!(
                    "{what}: HTTP 304 Not Modified to a request without If-None-Match"
                ))),
            };
        }
        let Some(response) = self.check(response).await? else {
            self.remember(None);
            return Ok(Fetched::Absent);
        };
        let marker = change_marker(&response);
        if response.status().is_redirection() {
            // An absolute redirect (an LFS/Xet file on the CDN): the Hub's
            // headers carry the marker, the body is elsewhere.
            if let Some(last) = last.filter(|l| marker.is_some() && l.version.revision == marker) {
                return Ok(Fetched::Version(last.version));
            }
            let fetched = self.download_redirected(&what, marker).await?;
            if let Fetched::Version(version) = &fetched {
                self.remember(Some(LastDownload {
                    etag: None,
                    version: version.clone(),
                }));
            }
            return Ok(fetched);
        }
        let etag = response.headers().get(ETAG).cloned();
        let body = read_limited(&what, response, MAX_METADATA_BYTES).await?;
        match DatasetMetadata::parse(&body) {
            Ok(metadata) => {
                let version = DatasetVersion {
                    metadata,
                    revision: marker,
                };
                self.remember(Some(LastDownload {
                    etag,
                    version: version.clone(),
                }));
                Ok(Fetched::Version(version))
            }
            Err(e) => {
                self.remember(None);
                Ok(Fetched::Invalid {
                    marker,
                    error: PortError::InvalidResponse(self.client.scrub(format!("{what}: {e}"))),
                })
            }
        }
    }

    /// Follow the Hub's redirect to the CDN (the client that follows any
    /// redirect, without the token on other origins) and parse the file.
    async fn download_redirected(
        &self,
        what: &str,
        marker: Option<String>,
    ) -> Result<Fetched, PortError> {
        let response = self
            .client
            .send(what, Method::GET, &self.url, None, false)
            .await?;
        let Some(response) = self.check(response).await? else {
            // Deleted between the two requests.
            return Ok(Fetched::Absent);
        };
        if response.status().is_redirection() {
            return Err(PortError::InvalidResponse(format!(
                "{what}: HTTP {} redirect was not followed",
                response.status()
            )));
        }
        let body = read_limited(what, response, MAX_METADATA_BYTES).await?;
        let metadata = DatasetMetadata::parse(&body)
            .map_err(|e| PortError::InvalidResponse(self.client.scrub(format!("{what}: {e}"))))?;
        // The Hub's marker, not the CDN's headers: if the file changed in
        // between, the next read sees a new marker and downloads again (one
        // extra download, never a miss).
        Ok(Fetched::Version(DatasetVersion {
            metadata,
            revision: marker,
        }))
    }
}

/// `X-Repo-Commit` + (`X-Linked-Etag` or `ETag`), ETag normalised as
/// `huggingface_hub` does (strip `W/` and quotes). Either part alone is kept;
/// neither → `None` (no cheap change detection: every poll downloads).
fn change_marker(response: &Response) -> Option<String> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let commit = header("x-repo-commit");
    let etag = header("x-linked-etag")
        .or_else(|| header("etag"))
        .map(normalize_etag)
        .filter(|e| !e.is_empty());
    match (commit, etag) {
        (Some(c), Some(e)) => Some(format!("{c}:{e}")),
        (Some(c), None) => Some(c.to_owned()),
        (None, Some(e)) => Some(e),
        (None, None) => None,
    }
}

pub(crate) fn normalize_etag(raw: &str) -> String {
    let raw = raw.trim();
    raw.strip_prefix("W/")
        .unwrap_or(raw)
        .trim_matches('"')
        .to_owned()
}

fn bad_hf_url(rest: &str, why: &str) -> AdapterError {
    AdapterError::config(
        "metadata",
        format!(
            "\"hf://{rest}\": {why}; expected hf://datasets/owner/name[@revision]/path/to/file.json"
        ),
    )
}

/// `datasets/owner/name[@rev]/path` → the resolve URL on the endpoint.
fn parse_hf_url(client: &HubClient, rest: &str) -> Result<(Url, Option<RepoId>), AdapterError> {
    let Some(after) = rest.strip_prefix("datasets/") else {
        return Err(bad_hf_url(rest, "only dataset repos are supported"));
    };
    let segments: Vec<&str> = after.split('/').collect();
    if segments.len() < 3 {
        return Err(bad_hf_url(rest, "missing the file path"));
    }
    let owner = segments[0];
    let (name, rev_start) = match segments[1].split_once('@') {
        Some((name, rev)) => (name, Some(rev)),
        None => (segments[1], None),
    };
    let repo = RepoId::parse(&format!("{owner}/{name}"))
        .ok_or_else(|| bad_hf_url(rest, "invalid repo id"))?;
    let mut path_from = 2;
    let revision = match rev_start {
        None => "main".to_owned(),
        Some("") => return Err(bad_hf_url(rest, "empty revision after @")),
        // Special refs contain slashes, as HfFileSystem accepts them.
        Some("refs") if matches!(segments.get(2), Some(&"pr" | &"convert")) => {
            let Some(id) = segments.get(3).filter(|s| !s.is_empty()) else {
                return Err(bad_hf_url(rest, "incomplete refs/ revision"));
            };
            path_from = 4;
            format!("refs/{}/{id}", segments[2])
        }
        Some(rev) => percent_decode_str(rev)
            .decode_utf8()
            .map_err(|_| bad_hf_url(rest, "revision is not valid UTF-8"))?
            .into_owned(),
    };
    if revision == "." || revision == ".." {
        // Would be normalised away by URL parsing and escape the repo.
        return Err(bad_hf_url(rest, "invalid revision"));
    }
    let path_segments = segments.get(path_from..).unwrap_or_default();
    if path_segments.is_empty()
        || path_segments
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(bad_hf_url(rest, "missing or invalid file path"));
    }
    let path = path_segments.join("/");
    let endpoint = client.endpoint().as_str().trim_end_matches('/');
    let raw = format!(
        "{endpoint}/datasets/{repo}/resolve/{}/{}",
        utf8_percent_encode(&revision, QUOTE_ALL),
        utf8_percent_encode(&path, QUOTE_PATH)
    );
    let url = Url::parse(&raw).map_err(|e| bad_hf_url(rest, &e.to_string()))?;
    Ok((url, Some(repo)))
}

/// The repo of `…/datasets/owner/name/resolve/<rev>/<path>`, if it is one.
fn resolve_url_repo(url: &Url) -> Option<RepoId> {
    let segments: Vec<&str> = url.path_segments()?.collect();
    let i = segments.iter().position(|s| *s == "datasets")?;
    if segments.get(i + 3) != Some(&"resolve") || segments.len() < i + 6 {
        return None;
    }
    RepoId::parse(&format!("{}/{}", segments[i + 1], segments[i + 2]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::HubSettings;
    use proptest::{prop_assert_eq, prop_assume};

    fn client() -> HubClient {
        HubClient::new(HubSettings::default()).unwrap()
    }

    fn url_of(raw: &str) -> (String, Option<String>) {
        let store = HfMetadataStore::from_url(client(), raw).unwrap();
        (
            store.url().to_string(),
            store.repo().map(ToString::to_string),
        )
    }

    #[test]
    fn hf_urls_become_resolve_urls() {
        assert_eq!(
            url_of("hf://datasets/owner/ds/dataset_metadata.json"),
            (
                "https://huggingface.co/datasets/owner/ds/resolve/main/dataset_metadata.json"
                    .into(),
                Some("owner/ds".into())
            )
        );
        assert_eq!(
            url_of("hf://datasets/owner/ds@v1.0/meta/a b.json").0,
            "https://huggingface.co/datasets/owner/ds/resolve/v1.0/meta/a%20b.json"
        );
        assert_eq!(
            url_of("hf://datasets/owner/ds@refs/pr/3/dataset_metadata.json").0,
            "https://huggingface.co/datasets/owner/ds/resolve/refs%2Fpr%2F3/dataset_metadata.json"
        );
        assert_eq!(
            url_of("hf://datasets/owner/ds@refs%2Fpr%2F3/x.json").0,
            "https://huggingface.co/datasets/owner/ds/resolve/refs%2Fpr%2F3/x.json"
        );
        assert_eq!(
            url_of("hf://datasets/owner/ds@feature%2Fx/x.json").0,
            "https://huggingface.co/datasets/owner/ds/resolve/feature%2Fx/x.json"
        );
    }

    #[test]
    fn seed_urls_are_kept_and_name_the_repo() {
        let seed = "https://huggingface.co/datasets/owner/project_department/resolve/main/dataset_metadata.json";
        assert_eq!(
            url_of(seed),
            (seed.into(), Some("owner/project_department".into()))
        );
        let pr = "https://huggingface.co/datasets/o/d/resolve/refs%2Fpr%2F1/m.json";
        assert_eq!(url_of(pr), (pr.into(), Some("o/d".into())));
        // Any other URL is fetched as is, without a repo name.
        assert_eq!(url_of("http://127.0.0.1:9/meta.json").1, None);
    }

    #[test]
    fn bad_addresses_are_config_errors() {
        for raw in [
            "hf://models/o/m/x.json",
            "hf://datasets/o/d",
            "hf://datasets/o/d/",
            "hf://datasets/o@/x.json",
            "hf://datasets/o/d@/x.json",
            "hf://datasets/o/d@refs/pr",
            "hf://datasets/o/d/../x.json",
            "hf://datasets/o/d@../x.json",
            "hf://datasets/o/d@./x.json",
            "hf://datasets/o/d@%2E%2E/x.json",
            "s3://bucket/x.json",
            "owner/ds",
        ] {
            assert!(
                HfMetadataStore::from_url(client(), raw).is_err(),
                "{raw} should be rejected"
            );
        }
        let err = HfMetadataStore::from_url(client(), "https://user:hf_pw@huggingface.co/x.json")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hf_pw"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_address_parses_or_errors_without_panicking(raw in "\\PC{0,80}") {
            let _ = HfMetadataStore::from_url(client(), &raw);
            let _ = HfMetadataStore::from_url(client(), &format!("hf://datasets/{raw}"));
            let _ = crate::hf::parse_space(&raw);
        }

        #[test]
        fn revisions_round_trip_through_the_resolve_url(
            rev in "[A-Za-z0-9._/ -]{1,20}",
            file in "[a-z0-9_]{1,12}\\.json",
        ) {
            prop_assume!(!rev.starts_with("refs/") && rev != "." && rev != "..");
            let encoded = utf8_percent_encode(&rev, QUOTE_ALL).to_string();
            let store = HfMetadataStore::from_url(
                client(),
                &format!("hf://datasets/o/d@{encoded}/{file}"),
            ).unwrap();
            let segments: Vec<&str> = store.url().path_segments().unwrap().collect();
            prop_assert_eq!(segments.len(), 6);
            prop_assert_eq!(percent_decode_str(segments[4]).decode_utf8().unwrap(), rev.as_str());
            prop_assert_eq!(segments[5], file.as_str());
        }
    }

    #[test]
    fn etags_are_normalised() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("abc"), "abc");
    }
}
