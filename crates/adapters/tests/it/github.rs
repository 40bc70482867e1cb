//! GitHub and webhook notifiers against wiremock with GitHub's REST shapes
//! (issue comments with `user` and `performed_via_github_app`, pull requests
//! with `user`, `GET /user`, rate-limit headers and error bodies as GitHub
//! sends them).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use retrain_adapters::github::{GithubNotifier, GithubSettings, GithubTarget, NotifyOn};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::webhook::{WebhookFormat, WebhookNotifier};
use retrain_core::domain::{Label, PromotedVersion};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::{LabelReport, LabelStatus};
use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const TOKEN: &str = "ghp_super_secret_token_value";
/// The token's own account (`GET /user`).
const ME: &str = "retrain-bot";
const MARKER: &str = "<!-- retrain:label=seg -->";

fn report(label: &str, status: LabelStatus) -> LabelReport {
    let mut r = LabelReport::busy(Label::new(label).unwrap(), 100, "x".into());
    r.status = status;
    r.error = None;
    r.promoted = Some(PromotedVersion {
        version: "7".into(),
        previous: Some("6".into()),
    });
    r
}

fn settings(server: &MockServer, on: NotifyOn, target: GithubTarget) -> GithubSettings {
    GithubSettings {
        api_url: server.uri(),
        token: SecretString::from(TOKEN),
        repo: "acme/wms".into(),
        on,
        target,
        policy: HttpPolicy::fast_for_tests(),
    }
}

fn comment_target(server: &MockServer, issue: u64, policy: HttpPolicy) -> GithubNotifier {
    GithubNotifier::new(GithubSettings {
        policy,
        ..settings(server, NotifyOn::Always, GithubTarget::Comment { issue })
    })
    .unwrap()
}

/// A `simple-user` as GitHub returns it.
fn user(login: &str) -> Value {
    let kind = if login.ends_with("[bot]") {
        "Bot"
    } else {
        "User"
    };
    json!({
        "login": login, "id": login.len() as u64 * 1000 + 7, "node_id": "MDQ6VXNlcjE=",
        "avatar_url": "https://avatars.githubusercontent.com/u/1?v=4", "gravatar_id": "",
        "url": format!("https://api.github.com/users/{login}"),
        "html_url": format!("https://github.com/{login}"),
        "type": kind, "site_admin": false,
    })
}

/// `performed_via_github_app` of a comment made through an App (the Actions
/// app for `github-actions[bot]`), else `null`.
fn app_of(login: &str) -> Value {
    match login.strip_suffix("[bot]") {
        Some(slug) => {
            json!({"id": 15368, "slug": slug, "node_id": "MDM6QXBwMTUzNjg=", "name": slug})
        }
        None => Value::Null,
    }
}

/// An issue comment as `GET /repos/{o}/{r}/issues/{n}/comments` returns it.
fn comment(issue: u64, id: u64, body: &str, author: &str) -> Value {
    json!({
        "id": id, "node_id": format!("IC_kwDOA{id}"),
        "url": format!("https://api.github.com/repos/acme/wms/issues/comments/{id}"),
        "html_url": format!("https://github.com/acme/wms/issues/{issue}#issuecomment-{id}"),
        "issue_url": format!("https://api.github.com/repos/acme/wms/issues/{issue}"),
        "body": body, "user": user(author),
        "created_at": "2026-02-10T10:00:00Z", "updated_at": "2026-02-10T10:00:00Z",
        "author_association": "NONE",
        "performed_via_github_app": app_of(author),
    })
}

/// A pull request as `GET /repos/{o}/{r}/pulls` returns it (trimmed).
fn pull(number: u64, body: &str, author: &str) -> Value {
    json!({
        "number": number, "id": number + 9000, "node_id": format!("PR_kwDO{number}"),
        "state": "open", "title": "retrain: `seg` promoted", "body": body,
        "user": user(author),
        "html_url": format!("https://github.com/acme/wms/pull/{number}"),
        "head": {"label": "acme:data/1", "ref": "data/1", "sha": "a".repeat(40)},
        "base": {"label": "acme:main", "ref": "main", "sha": "b".repeat(40)},
        "draft": false, "merged": false,
    })
}

/// `GET /user` answers with `login` (a PAT or OAuth token).
async fn mount_user(server: &MockServer, login: &str) {
    Mock::given(method("GET"))
        .and(path("/user"))
        .respond_with(ResponseTemplate::new(200).set_body_json(user(login)))
        .mount(server)
        .await;
}

/// `GET /user` with an App installation token (or Actions' `GITHUB_TOKEN`).
async fn mount_installation_token(server: &MockServer) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    Mock::given(method("GET"))
        .and(path("/user"))
        .respond_with(move |_: &Request| {
            counted.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "4999")
                .set_body_json(json!({
                    "message": "Resource not accessible by integration",
                    "documentation_url": "https://docs.github.com/rest/users/users#get-the-authenticated-user",
                    "status": "403"
                }))
        })
        .mount(server)
        .await;
    calls
}

/// A stateful issue: `GET` lists its comments, `POST` adds one authored by
/// `author` (the token's account), `PATCH` edits one. Counts every write.
#[derive(Clone)]
struct FakeIssue {
    issue: u64,
    author: String,
    comments: Arc<Mutex<Vec<Value>>>,
    posts: Arc<AtomicUsize>,
    patched: Arc<Mutex<Vec<u64>>>,
}

impl FakeIssue {
    fn new(issue: u64, author: &str) -> Self {
        Self {
            issue,
            author: author.to_owned(),
            comments: Arc::default(),
            posts: Arc::default(),
            patched: Arc::default(),
        }
    }

    fn with(self, id: u64, body: &str, author: &str) -> Self {
        self.comments
            .lock()
            .unwrap()
            .push(comment(self.issue, id, body, author));
        self
    }

    fn posts(&self) -> usize {
        self.posts.load(Ordering::SeqCst)
    }

    fn patched(&self) -> Vec<u64> {
        self.patched.lock().unwrap().clone()
    }

    fn bodies(&self) -> Vec<(u64, String, String)> {
        self.comments
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["id"].as_u64().unwrap(),
                    c["user"]["login"].as_str().unwrap().to_owned(),
                    c["body"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Mount the API; the first POST answers only after `first_post_delay`
    /// (longer than the client's timeout: the answer is lost, the comment
    /// exists).
    async fn mount(&self, server: &MockServer, first_post_delay: Option<Duration>) {
        let list = format!("/repos/acme/wms/issues/{}/comments", self.issue);
        {
            let comments = self.comments.clone();
            Mock::given(method("GET"))
                .and(path(list.as_str()))
                .and(header("accept", "application/vnd.github+json"))
                .and(header("x-github-api-version", "2022-11-28"))
                .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
                .respond_with(move |_: &Request| {
                    ResponseTemplate::new(200)
                        .set_body_json(Value::Array(comments.lock().unwrap().clone()))
                })
                .mount(server)
                .await;
        }
        {
            let me = self.clone();
            Mock::given(method("POST"))
                .and(path(list.as_str()))
                .respond_with(move |req: &Request| {
                    let body: Value = serde_json::from_slice(&req.body).unwrap();
                    let n = me.posts.fetch_add(1, Ordering::SeqCst);
                    let mut all = me.comments.lock().unwrap();
                    let id = 100 + all.len() as u64;
                    let created = comment(me.issue, id, body["body"].as_str().unwrap(), &me.author);
                    all.push(created.clone());
                    let answer = ResponseTemplate::new(201).set_body_json(created);
                    match first_post_delay {
                        Some(delay) if n == 0 => answer.set_delay(delay),
                        _ => answer,
                    }
                })
                .mount(server)
                .await;
        }
        {
            let me = self.clone();
            Mock::given(method("PATCH"))
                .and(path_regex(r"^/repos/acme/wms/issues/comments/\d+$"))
                .respond_with(move |req: &Request| {
                    let id: u64 = req.url.path().rsplit('/').next().unwrap().parse().unwrap();
                    let body: Value = serde_json::from_slice(&req.body).unwrap();
                    me.patched.lock().unwrap().push(id);
                    let mut all = me.comments.lock().unwrap();
                    match all.iter_mut().find(|c| c["id"] == id) {
                        Some(c) => {
                            c["body"] = body["body"].clone();
                            ResponseTemplate::new(200).set_body_json(c.clone())
                        }
                        None => ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest/issues/comments#update-an-issue-comment", "status": "404"})),
                    }
                })
                .mount(server)
                .await;
        }
    }
}

#[tokio::test]
async fn comment_is_created_then_updated_in_place() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    // Someone else's comment with another label's marker.
    let issue = FakeIssue::new(12, ME).with(1, "<!-- retrain:label=other -->\nhello", "alice");
    issue.mount(&server, None).await;
    let notifier = comment_target(&server, 12, HttpPolicy::fast_for_tests());
    notifier
        .notify(&report("segmentation", LabelStatus::Rejected))
        .await
        .unwrap();
    notifier
        .notify(&report("segmentation", LabelStatus::Promoted))
        .await
        .unwrap();
    let all = issue.bodies();
    assert_eq!(all.len(), 2, "one comment per label: {all:?}");
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![101]);
    assert!(all[1].2.starts_with("<!-- retrain:label=segmentation -->"));
    assert!(all[1].2.contains("promoted"), "updated body: {}", all[1].2);
    assert_eq!(
        all[0].2, "<!-- retrain:label=other -->\nhello",
        "others untouched"
    );
}

#[tokio::test]
async fn comments_are_paginated_through_the_link_header() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let next = format!(
        "{}/repos/acme/wms/issues/5/comments?per_page=100&page=2",
        server.uri()
    );
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/issues/5/comments"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([comment(
            5,
            9,
            "<!-- retrain:label=seg -->\nold",
            ME
        )])))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/issues/5/comments"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header(
                    "link",
                    format!("<{next}>; rel=\"next\", <{next}>; rel=\"last\"").as_str(),
                )
                .set_body_json(json!([{"id": 1, "body": null, "user": null}])),
        )
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/repos/acme/wms/issues/comments/9"))
        .respond_with(ResponseTemplate::new(200).set_body_json(comment(5, 9, "x", ME)))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .expect(0)
        .mount(&server)
        .await;
    let notifier = GithubNotifier::new(settings(
        &server,
        NotifyOn::Improved,
        GithubTarget::Comment { issue: 5 },
    ))
    .unwrap();
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
}

#[tokio::test]
async fn not_improved_means_no_call_at_all() {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    for target in [
        GithubTarget::Comment { issue: 1 },
        GithubTarget::PullRequest {
            head: "data/1".into(),
            base: "main".into(),
            auto_merge: true,
        },
    ] {
        let notifier = GithubNotifier::new(settings(&server, NotifyOn::Improved, target)).unwrap();
        for status in [
            LabelStatus::Rejected,
            LabelStatus::Failed,
            LabelStatus::Skipped,
        ] {
            notifier.notify(&report("seg", status)).await.unwrap();
        }
    }
    let webhook = WebhookNotifier::with_policy(
        SecretString::from(format!("{}/hook", server.uri())),
        WebhookFormat::Json,
        NotifyOn::Improved,
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    webhook
        .notify(&report("seg", LabelStatus::Rejected))
        .await
        .unwrap();
}

#[tokio::test]
async fn pull_request_is_created_then_updated_and_auto_merged() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let prs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    {
        let prs = prs.clone();
        Mock::given(method("GET"))
            .and(path("/repos/acme/wms/pulls"))
            .and(query_param("state", "open"))
            .and(query_param("head", "acme:data/20260210"))
            .and(query_param("base", "main"))
            .respond_with(move |_: &Request| {
                ResponseTemplate::new(200).set_body_json(Value::Array(prs.lock().unwrap().clone()))
            })
            .mount(&server)
            .await;
    }
    {
        let prs = prs.clone();
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/pulls"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                assert_eq!(body["head"], "data/20260210");
                assert_eq!(body["base"], "main");
                let pr = pull(42, body["body"].as_str().unwrap(), ME);
                prs.lock().unwrap().push(pr.clone());
                ResponseTemplate::new(201).set_body_json(pr)
            })
            .expect(1)
            .mount(&server)
            .await;
    }
    Mock::given(method("PATCH"))
        .and(path("/repos/acme/wms/pulls/42"))
        .respond_with(|req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            ResponseTemplate::new(200).set_body_json(pull(42, body["body"].as_str().unwrap(), ME))
        })
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .respond_with(|req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            assert!(body["query"]
                .as_str()
                .unwrap()
                .contains("enablePullRequestAutoMerge"));
            assert_eq!(body["variables"]["id"], "PR_kwDO42");
            ResponseTemplate::new(200).set_body_json(
                json!({"data": {"enablePullRequestAutoMerge": {"pullRequest": {"number": 42}}}}),
            )
        })
        .expect(2)
        .mount(&server)
        .await;
    let notifier = GithubNotifier::new(settings(
        &server,
        NotifyOn::Improved,
        GithubTarget::PullRequest {
            head: "data/20260210".into(),
            base: "main".into(),
            auto_merge: true,
        },
    ))
    .unwrap();
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
}

#[tokio::test]
async fn auto_merge_on_a_clean_pr_merges_it() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(201).set_body_json(pull(3, "x", ME)))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": null, "errors": [{"message": "Pull request Pull request is in clean status"}]})))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/repos/acme/wms/pulls/3/merge"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"merged": true})))
        .expect(1)
        .mount(&server)
        .await;
    let notifier = GithubNotifier::new(settings(
        &server,
        NotifyOn::Always,
        GithubTarget::PullRequest {
            head: "d".into(),
            base: "main".into(),
            auto_merge: true,
        },
    ))
    .unwrap();
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
}

#[tokio::test]
async fn token_never_appears_in_errors_or_debug() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"})))
        .mount(&server)
        .await;
    let s = settings(
        &server,
        NotifyOn::Always,
        GithubTarget::Comment { issue: 1 },
    );
    assert!(!format!("{s:?}").contains(TOKEN));
    let notifier = GithubNotifier::new(s).unwrap();
    assert!(!format!("{notifier:?}").contains(TOKEN));
    let err = notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("acme/wms#1"), "{err}");
    assert!(!err.to_string().contains(TOKEN) && !format!("{err:?}").contains(TOKEN));
}

#[tokio::test]
async fn webhook_posts_json_and_slack_text_without_leaking_the_url() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/services/T000/B000/XXXXSECRET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let url = format!("{}/services/T000/B000/XXXXSECRET", server.uri());
    let slack = WebhookNotifier::with_policy(
        SecretString::from(url.clone()),
        WebhookFormat::Slack,
        NotifyOn::Always,
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    assert!(!format!("{slack:?} {}", slack.describe()).contains("XXXXSECRET"));
    slack
        .notify(&report("seg", LabelStatus::Rejected))
        .await
        .unwrap();
    let json_hook = WebhookNotifier::with_policy(
        SecretString::from(url),
        WebhookFormat::Json,
        NotifyOn::Improved,
        HttpPolicy::fast_for_tests(),
    )
    .unwrap();
    json_hook
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let slack_body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert!(slack_body["text"]
        .as_str()
        .unwrap()
        .contains("### `seg`: rejected"));
    let report_body: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(report_body["label"], "seg");
    assert_eq!(report_body["status"], "promoted");

    // A dead endpoint: the error names the host, never the secret path.
    let dead = WebhookNotifier::with_policy(
        SecretString::from("http://127.0.0.1:9/services/T000/B000/XXXXSECRET".to_owned()),
        WebhookFormat::Slack,
        NotifyOn::Always,
        HttpPolicy {
            max_retries: 0,
            ..HttpPolicy::fast_for_tests()
        },
    )
    .unwrap();
    let err = dead
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    assert!(!err.to_string().contains("XXXXSECRET"), "{err}");
}

// ---------------------------------------------------------------------------
// Exactly one comment, whatever happens to the POST's answer.

/// The client gives up on an answer after 400 ms.
fn short_timeout() -> HttpPolicy {
    HttpPolicy {
        timeout: Duration::from_millis(400),
        ..HttpPolicy::fast_for_tests()
    }
}

#[tokio::test]
async fn a_comment_created_despite_a_timeout_is_adopted_not_posted_again() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let issue = FakeIssue::new(7, ME);
    // GitHub creates the comment, but its answer comes after the timeout.
    issue.mount(&server, Some(Duration::from_secs(2))).await;
    let notifier = comment_target(&server, 7, short_timeout());
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert_eq!(issue.posts(), 1, "never re-POSTed");
    assert_eq!(issue.bodies().len(), 1, "exactly one comment");
    assert!(issue.patched().is_empty(), "its body is already right");
    // The next report updates that one comment.
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![100]);
    assert_eq!(issue.bodies().len(), 1);
}

#[tokio::test]
async fn a_timed_out_post_that_created_nothing_is_posted_again_once() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let lost = Arc::new(AtomicUsize::new(0));
    {
        let lost = lost.clone();
        // The first POST never reaches GitHub's database and times out.
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/issues/7/comments"))
            .respond_with(move |_: &Request| {
                lost.fetch_add(1, Ordering::SeqCst);
                ResponseTemplate::new(504).set_delay(Duration::from_secs(2))
            })
            .up_to_n_times(1)
            .mount(&server)
            .await;
    }
    let issue = FakeIssue::new(7, ME);
    issue.mount(&server, None).await;
    comment_target(&server, 7, short_timeout())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    assert_eq!(
        issue.posts(),
        1,
        "posted again once the check found nothing"
    );
    assert_eq!(issue.bodies().len(), 1);
}

#[tokio::test]
async fn a_5xx_on_the_post_is_checked_before_any_new_post() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let issue = FakeIssue::new(7, ME);
    let fake = issue.clone();
    // GitHub creates the comment, then answers 502 (a proxy lost the answer).
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/issues/7/comments"))
        .respond_with(move |req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            fake.posts.fetch_add(1, Ordering::SeqCst);
            fake.comments
                .lock()
                .unwrap()
                .push(comment(7, 100, body["body"].as_str().unwrap(), ME));
            ResponseTemplate::new(502).set_body_string("Bad Gateway")
        })
        .mount(&server)
        .await;
    issue.mount(&server, None).await;
    comment_target(&server, 7, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.bodies().len(), 1);
}

// ---------------------------------------------------------------------------
// Rate limits: waited out, never a permission error.

fn epoch_in(seconds: u64) -> String {
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + seconds)
        .to_string()
}

/// GitHub's primary rate-limit answer.
fn primary_limit(status: u16, reset: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-ratelimit-limit", "5000")
        .insert_header("x-ratelimit-remaining", "0")
        .insert_header("x-ratelimit-used", "5000")
        .insert_header("x-ratelimit-reset", reset)
        .insert_header("x-ratelimit-resource", "core")
        .set_body_json(json!({
            "message": "API rate limit exceeded for user ID 1007. If you reach out to GitHub Support for help, please include the request ID.",
            "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
            "status": status.to_string()
        }))
}

#[tokio::test]
async fn a_403_with_remaining_0_waits_for_the_reset_then_succeeds() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/issues/7/comments"))
        .respond_with(primary_limit(403, &epoch_in(1)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    let issue = FakeIssue::new(7, ME);
    issue.mount(&server, None).await;
    let started = Instant::now();
    comment_target(&server, 7, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for x-ratelimit-reset: {:?}",
        started.elapsed()
    );
    assert_eq!(issue.posts(), 1);
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_even_for_the_post() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    // A secondary rate limit on content creation: the comment was not made.
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/issues/7/comments"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .insert_header("x-ratelimit-remaining", "4990")
                .set_body_json(json!({
                    "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                    "documentation_url": "https://docs.github.com/free-pro-team@latest/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
                    "status": "429"
                })),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    let issue = FakeIssue::new(7, ME);
    issue.mount(&server, None).await;
    let started = Instant::now();
    comment_target(&server, 7, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.bodies().len(), 1);
}

#[tokio::test]
async fn a_403_without_rate_limit_headers_is_a_permission_error_at_once() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let posts = Arc::new(AtomicUsize::new(0));
    {
        let posts = posts.clone();
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/issues/7/comments"))
            .respond_with(move |_: &Request| {
                posts.fetch_add(1, Ordering::SeqCst);
                ResponseTemplate::new(403)
                    .insert_header("x-ratelimit-remaining", "4990")
                    .insert_header("x-accepted-github-permissions", "issues=write")
                    .set_body_json(json!({
                        "message": "Resource not accessible by integration",
                        "documentation_url": "https://docs.github.com/rest/issues/comments#create-an-issue-comment",
                        "status": "403"
                    }))
            })
            .mount(&server)
            .await;
    }
    FakeIssue::new(7, ME).mount(&server, None).await;
    let err = comment_target(&server, 7, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("issues: write"), "{err}");
    assert_eq!(posts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_rate_limit_longer_than_the_cap_fails_as_transient_not_denied() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(primary_limit(403, &epoch_in(3600)))
        .mount(&server)
        .await;
    let err = comment_target(&server, 7, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    assert!(err.to_string().contains("rate limited"), "{err}");
    assert!(err.to_string().contains("resets at"), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// Only our own marker is adopted.

#[tokio::test]
async fn a_marker_pasted_by_someone_else_is_never_edited() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let pasted = format!("{MARKER}\nI copied the bot's comment, marker and all");
    let issue = FakeIssue::new(7, ME).with(5, &pasted, "mallory");
    issue.mount(&server, None).await;
    let notifier = comment_target(&server, 7, HttpPolicy::fast_for_tests());
    for _ in 0..2 {
        notifier
            .notify(&report("seg", LabelStatus::Promoted))
            .await
            .unwrap();
    }
    let all = issue.bodies();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0], (5, "mallory".into(), pasted), "theirs untouched");
    assert_eq!(all[1].1, ME);
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![101], "only ours is updated");
}

#[tokio::test]
async fn an_installation_token_adopts_only_an_app_bots_marker_comment() {
    let server = MockServer::start().await;
    let user_calls = mount_installation_token(&server).await;
    let issue = FakeIssue::new(7, "github-actions[bot]")
        .with(1, &format!("{MARKER}\nmine, says a human"), "mallory")
        .with(2, &format!("{MARKER}\nold report"), "github-actions[bot]");
    issue.mount(&server, None).await;
    let notifier = comment_target(&server, 7, HttpPolicy::fast_for_tests());
    for _ in 0..2 {
        notifier
            .notify(&report("seg", LabelStatus::Promoted))
            .await
            .unwrap();
    }
    assert_eq!(issue.posts(), 0);
    assert_eq!(issue.patched(), vec![2, 2]);
    assert!(issue.bodies()[0].2.ends_with("mine, says a human"));
    assert_eq!(
        user_calls.load(Ordering::SeqCst),
        1,
        "GET /user once, cached"
    );
}

#[tokio::test]
async fn an_installation_token_with_an_app_login_adopts_only_that_bot() {
    let server = MockServer::start().await;
    mount_installation_token(&server).await;
    let issue = FakeIssue::new(7, "retrain-app[bot]").with(
        2,
        &format!("{MARKER}\nanother App's copy"),
        "other-app[bot]",
    );
    issue.mount(&server, None).await;
    let notifier =
        comment_target(&server, 7, HttpPolicy::fast_for_tests()).with_app_login("retrain-app[bot]");
    for _ in 0..2 {
        notifier
            .notify(&report("seg", LabelStatus::Promoted))
            .await
            .unwrap();
    }
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![101]);
    assert!(issue.bodies()[0].2.ends_with("another App's copy"));
}

// ---------------------------------------------------------------------------
// Pull requests.

fn pr_target(server: &MockServer, policy: HttpPolicy) -> GithubNotifier {
    GithubNotifier::new(GithubSettings {
        policy,
        ..settings(
            server,
            NotifyOn::Always,
            GithubTarget::PullRequest {
                head: "data/1".into(),
                base: "main".into(),
                auto_merge: false,
            },
        )
    })
    .unwrap()
}

#[tokio::test]
async fn an_existing_pull_request_422_is_adopted_and_updated() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    // Not listed at first (opened meanwhile, or the list lagged)…
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/pulls"))
        .and(query_param("head", "acme:data/1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/pulls"))
        .and(query_param("head", "acme:data/1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([pull(
            7,
            "opened by the data job",
            ME
        )])))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for acme:data/1."}],
            "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request",
            "status": "422"
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/repos/acme/wms/pulls/7"))
        .respond_with(|req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            assert!(body["body"].as_str().unwrap().starts_with(MARKER));
            ResponseTemplate::new(200).set_body_json(pull(7, body["body"].as_str().unwrap(), ME))
        })
        .expect(1)
        .mount(&server)
        .await;
    pr_target(&server, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
}

#[tokio::test]
async fn someone_elses_open_pull_request_is_not_overwritten() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([pull(
            9,
            &format!("{MARKER}\ncopied"),
            "mallory"
        )])))
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .expect(0)
        .mount(&server)
        .await;
    let err = pr_target(&server, HttpPolicy::fast_for_tests())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(
        err.to_string().contains("#9") && err.to_string().contains("@mallory"),
        "{err}"
    );
}

#[tokio::test]
async fn a_pull_request_created_despite_a_timeout_is_adopted_not_opened_twice() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let prs = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let prs = prs.clone();
        Mock::given(method("GET"))
            .and(path("/repos/acme/wms/pulls"))
            .respond_with(move |_: &Request| {
                ResponseTemplate::new(200).set_body_json(Value::Array(prs.lock().unwrap().clone()))
            })
            .mount(&server)
            .await;
    }
    {
        let prs = prs.clone();
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/pulls"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let pr = pull(11, body["body"].as_str().unwrap(), ME);
                prs.lock().unwrap().push(pr.clone());
                ResponseTemplate::new(201)
                    .set_body_json(pr)
                    .set_delay(Duration::from_secs(2))
            })
            .expect(1)
            .mount(&server)
            .await;
    }
    Mock::given(method("PATCH"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    pr_target(&server, short_timeout())
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
    assert_eq!(prs.lock().unwrap().len(), 1);
}
