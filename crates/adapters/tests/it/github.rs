//! GitHub and webhook notifiers against wiremock with GitHub's REST shapes
//! (issue comments with `user` and `performed_via_github_app`, pull requests
//! with `user`, `GET /user`, rate-limit headers and error bodies as GitHub
//! sends them).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use retrain_adapters::github::{GithubNotifier, GithubSettings, GithubTarget, NotifyOn};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::testing::routes::{json_route, status_route};
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

/// Notifies a promotion of label `seg`, which must succeed.
async fn notify_promoted(notifier: &impl Notifier) {
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap();
}

/// Notifies a promotion of label `seg`, which must fail: the error.
async fn promotion_error(notifier: &impl Notifier) -> PortError {
    notifier
        .notify(&report("seg", LabelStatus::Promoted))
        .await
        .unwrap_err()
}

/// Answers the POSTs of comments on issue 7 with `answer` (the first
/// `times` of them, or all); how many were answered.
async fn mount_counted_comment_posts(
    server: &MockServer,
    times: Option<u64>,
    answer: impl Fn() -> ResponseTemplate + Send + Sync + 'static,
) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let mock = Mock::given(method("POST"))
        .and(path("/repos/acme/wms/issues/7/comments"))
        .respond_with(move |_: &Request| {
            counted.fetch_add(1, Ordering::SeqCst);
            answer()
        });
    match times {
        Some(n) => mock.up_to_n_times(n),
        None => mock,
    }
    .mount(server)
    .await;
    count
}

fn settings(server: &MockServer, on: NotifyOn, target: GithubTarget) -> GithubSettings {
    GithubSettings {
        api_url: server.uri(),
        token: SecretString::from(TOKEN),
        repo: "acme/wms".into(),
        on,
        target,
        policy: HttpPolicy::fast_for_tests(),
        registry: None,
        report_url: None,
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
    json_route("GET", "/user", 200, user(login))
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
    json_route(
        "PATCH",
        "/repos/acme/wms/issues/comments/9",
        200,
        comment(5, 9, "x", ME),
    )
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
    notify_promoted(&notifier).await;
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
            file: None,
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
    // PR mode commits and opens a PR only for an improved model, whatever `on` says.
    let always = auto_merging_pr(&server, NotifyOn::Always, "retrain/seg");
    for status in [
        LabelStatus::Rejected,
        LabelStatus::Failed,
        LabelStatus::Passed,
    ] {
        always.notify(&report("seg", status)).await.unwrap();
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
    FakeRepo::new().mount(&server).await;
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
    let notifier = auto_merging_pr(&server, NotifyOn::Improved, "data/20260210");
    notify_promoted(&notifier).await;
    notify_promoted(&notifier).await;
}

#[tokio::test]
async fn auto_merge_on_a_clean_pr_merges_it() {
    let server = MockServer::start().await;
    FakeRepo::new().mount(&server).await;
    json_route("GET", "/repos/acme/wms/pulls", 200, json!([]))
        .mount(&server)
        .await;
    json_route("POST", "/repos/acme/wms/pulls", 201, pull(3, "x", ME))
        .mount(&server)
        .await;
    let clean = json!({"data": null, "errors": [{"message": "Pull request Pull request is in clean status"}]});
    json_route("POST", "/graphql", 200, clean)
        .mount(&server)
        .await;
    json_route(
        "PUT",
        "/repos/acme/wms/pulls/3/merge",
        200,
        json!({"merged": true}),
    )
    .expect(1)
    .mount(&server)
    .await;
    let notifier = auto_merging_pr(&server, NotifyOn::Always, "d");
    notify_promoted(&notifier).await;
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
    status_route("POST", "/services/T000/B000/XXXXSECRET", 200)
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
    notify_promoted(&json_hook).await;
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
    notify_promoted(&notifier).await;
    assert_eq!(issue.posts(), 1, "never re-POSTed");
    assert_eq!(issue.bodies().len(), 1, "exactly one comment");
    assert!(issue.patched().is_empty(), "its body is already right");
    // The next report updates that one comment.
    notify_promoted(&notifier).await;
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![100]);
    assert_eq!(issue.bodies().len(), 1);
}

#[tokio::test]
async fn a_timed_out_post_that_created_nothing_is_posted_again_once() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    // The first POST never reaches GitHub's database and times out.
    let lost = mount_counted_comment_posts(&server, Some(1), || {
        ResponseTemplate::new(504).set_delay(Duration::from_secs(2))
    })
    .await;
    let issue = FakeIssue::new(7, ME);
    issue.mount(&server, None).await;
    notify_promoted(&comment_target(&server, 7, short_timeout())).await;
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
    notify_promoted(&comment_target(&server, 7, HttpPolicy::fast_for_tests())).await;
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
    notify_promoted(&comment_target(&server, 7, HttpPolicy::fast_for_tests())).await;
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
    notify_promoted(&comment_target(&server, 7, HttpPolicy::fast_for_tests())).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.bodies().len(), 1);
}

#[tokio::test]
async fn a_403_without_rate_limit_headers_is_a_permission_error_at_once() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let posts = mount_counted_comment_posts(&server, None, || {
        ResponseTemplate::new(403)
            .insert_header("x-ratelimit-remaining", "4990")
            .insert_header("x-accepted-github-permissions", "issues=write")
            .set_body_json(json!({
                "message": "Resource not accessible by integration",
                "documentation_url": "https://docs.github.com/rest/issues/comments#create-an-issue-comment",
                "status": "403"
            }))
    })
    .await;
    FakeIssue::new(7, ME).mount(&server, None).await;
    let err = promotion_error(&comment_target(&server, 7, HttpPolicy::fast_for_tests())).await;
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
    let err = promotion_error(&comment_target(&server, 7, HttpPolicy::fast_for_tests())).await;
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
        notify_promoted(&notifier).await;
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
        notify_promoted(&notifier).await;
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
        notify_promoted(&notifier).await;
    }
    assert_eq!(issue.posts(), 1);
    assert_eq!(issue.patched(), vec![101]);
    assert!(issue.bodies()[0].2.ends_with("another App's copy"));
}

// ---------------------------------------------------------------------------
// Pull requests.

/// A notifier opening an auto-merged pull request from `head` into `main`.
fn auto_merging_pr(server: &MockServer, on: NotifyOn, head: &str) -> GithubNotifier {
    let target = GithubTarget::PullRequest {
        head: head.into(),
        base: "main".into(),
        auto_merge: true,
        file: None,
    };
    GithubNotifier::new(settings(server, on, target)).unwrap()
}

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
                file: None,
            },
        )
    })
    .unwrap()
}

#[tokio::test]
async fn an_existing_pull_request_422_is_adopted_and_updated() {
    let server = MockServer::start().await;
    FakeRepo::new().mount(&server).await;
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
    let answer = json!({
        "message": "Validation Failed",
        "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for acme:data/1."}],
        "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request",
        "status": "422"
    });
    json_route("POST", "/repos/acme/wms/pulls", 422, answer)
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
    notify_promoted(&pr_target(&server, HttpPolicy::fast_for_tests())).await;
}

#[tokio::test]
async fn someone_elses_open_pull_request_is_not_overwritten() {
    let server = MockServer::start().await;
    FakeRepo::new().mount(&server).await;
    mount_user(&server, ME).await;
    json_route(
        "GET",
        "/repos/acme/wms/pulls",
        200,
        json!([pull(9, &format!("{MARKER}\ncopied"), "mallory")]),
    )
    .mount(&server)
    .await;
    Mock::given(method("PATCH"))
        .and(path_regex(r"^/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/repos/acme/wms/pulls"))
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
    FakeRepo::new().mount(&server).await;
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
        .and(path_regex(r"^/repos/acme/wms/pulls"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    notify_promoted(&pr_target(&server, short_timeout())).await;
    assert_eq!(prs.lock().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// A repository behind the Git Data and Contents APIs, with GitHub's shapes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use retrain_adapters::github::triggering_pull_request;
use retrain_core::domain::{Candidate, VersionTag};
use retrain_core::gate::{Comparison, Direction, Verdict};

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                B64[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn b64_decode(text: &str) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        acc = (acc << 6) | B64.iter().position(|&a| a == c).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A 40-hex "sha" of `parts` (content-addressed like Git's).
fn fake_sha(parts: &[&str]) -> String {
    let mut out = String::new();
    for salt in 0..3u8 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        parts.hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(40);
    out
}

fn not_found(doc: &str) -> ResponseTemplate {
    ResponseTemplate::new(404).set_body_json(json!({
        "message": "Not Found",
        "documentation_url": format!("https://docs.github.com/rest/{doc}"),
        "status": "404"
    }))
}

#[derive(Debug, Clone)]
struct FakeCommit {
    tree: String,
    parents: Vec<String>,
    message: String,
}

#[derive(Debug, Default)]
struct RepoState {
    branches: BTreeMap<String, String>,
    commits: HashMap<String, FakeCommit>,
    trees: HashMap<String, BTreeMap<String, String>>,
    /// Every value a branch was set to through the API: (branch, sha).
    ref_writes: Vec<(String, String)>,
    /// `POST git/refs`, `PATCH git/refs`, `PUT contents` request bodies.
    created_refs: Vec<Value>,
    patched_refs: Vec<Value>,
    puts: Vec<Value>,
    counter: u64,
}

impl RepoState {
    fn tree(&mut self, files: BTreeMap<String, String>) -> String {
        let flat: Vec<String> = files.iter().map(|(p, c)| format!("{p}\0{c}")).collect();
        let refs: Vec<&str> = flat.iter().map(String::as_str).collect();
        let sha = fake_sha(&refs);
        self.trees.insert(sha.clone(), files);
        sha
    }

    fn commit(&mut self, tree: &str, parents: Vec<String>, message: &str) -> String {
        self.counter += 1;
        let n = self.counter.to_string();
        let mut parts = vec!["commit", tree, message, &n];
        parts.extend(parents.iter().map(String::as_str));
        let sha = fake_sha(&parts);
        self.commits.insert(
            sha.clone(),
            FakeCommit {
                tree: tree.to_owned(),
                parents,
                message: message.to_owned(),
            },
        );
        sha
    }

    fn files_at(&self, commit: &str) -> BTreeMap<String, String> {
        let tree = &self.commits[commit].tree;
        self.trees[tree].clone()
    }

    /// A push of one commit changing `path` on `branch`.
    fn push(&mut self, branch: &str, path: &str, content: &str, message: &str) -> String {
        let parent = self.branches[branch].clone();
        let mut files = self.files_at(&parent);
        files.insert(path.to_owned(), content.to_owned());
        let tree = self.tree(files);
        let sha = self.commit(&tree, vec![parent], message);
        self.branches.insert(branch.to_owned(), sha.clone());
        sha
    }

    fn ancestors(&self, sha: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![sha.to_owned()];
        while let Some(s) = todo.pop() {
            if seen.insert(s.clone()) {
                todo.extend(self.commits[&s].parents.iter().cloned());
            }
        }
        seen
    }

    fn commit_json(&self, sha: &str) -> Value {
        let c = &self.commits[sha];
        json!({
            "sha": sha, "node_id": format!("C_{}", &sha[..8]),
            "url": format!("https://api.github.com/repos/acme/wms/git/commits/{sha}"),
            "html_url": format!("https://github.com/acme/wms/commit/{sha}"),
            "author": {"name": "retrain-bot", "email": "bot@example.com", "date": "2026-02-10T10:00:00Z"},
            "committer": {"name": "GitHub", "email": "noreply@github.com", "date": "2026-02-10T10:00:00Z"},
            "tree": {"sha": c.tree, "url": format!("https://api.github.com/repos/acme/wms/git/trees/{}", c.tree)},
            "message": c.message,
            "parents": c.parents.iter().map(|p| json!({"sha": p, "url": format!("https://api.github.com/repos/acme/wms/git/commits/{p}"), "html_url": format!("https://github.com/acme/wms/commit/{p}")})).collect::<Vec<_>>(),
            "verification": {"verified": false, "reason": "unsigned", "signature": null, "payload": null, "verified_at": null},
        })
    }

    fn ref_json(&self, branch: &str) -> Value {
        let sha = &self.branches[branch];
        json!({
            "ref": format!("refs/heads/{branch}"), "node_id": "REF_kwDOA",
            "url": format!("https://api.github.com/repos/acme/wms/git/refs/heads/{branch}"),
            "object": {"sha": sha, "type": "commit", "url": format!("https://api.github.com/repos/acme/wms/git/commits/{sha}")},
        })
    }

    fn content_json(&self, path: &str, content: &str, with_content: bool) -> Value {
        let sha = fake_sha(&["blob", content]);
        let name = path.rsplit('/').next().unwrap();
        let mut v = json!({
            "type": "file", "size": content.len(), "name": name, "path": path, "sha": sha,
            "url": format!("https://api.github.com/repos/acme/wms/contents/{path}"),
            "html_url": format!("https://github.com/acme/wms/blob/main/{path}"),
            "git_url": format!("https://api.github.com/repos/acme/wms/git/blobs/{sha}"),
            "download_url": format!("https://raw.githubusercontent.com/acme/wms/main/{path}"),
            "_links": {"self": "x", "git": "y", "html": "z"},
        });
        if with_content {
            // GitHub wraps its base64 at 60 columns.
            let encoded = b64_encode(content.as_bytes());
            let wrapped: String = encoded
                .as_bytes()
                .chunks(60)
                .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
                .collect();
            v["encoding"] = json!("base64");
            v["content"] = json!(wrapped);
        }
        v
    }

    fn handle(&mut self, req: &Request) -> ResponseTemplate {
        let path = req.url.path().to_owned();
        let rest = path.strip_prefix("/repos/acme/wms/").unwrap();
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let method = req.method.as_str();
        if let Some(branch) = rest.strip_prefix("git/ref/heads/") {
            return match (method, self.branches.contains_key(branch)) {
                ("GET", true) => ResponseTemplate::new(200).set_body_json(self.ref_json(branch)),
                _ => not_found("git/refs#get-a-reference"),
            };
        }
        if let Some(sha) = rest.strip_prefix("git/commits/") {
            return match self.commits.contains_key(sha) {
                true => ResponseTemplate::new(200).set_body_json(self.commit_json(sha)),
                false => not_found("git/commits#get-a-commit-object"),
            };
        }
        match (method, rest) {
            ("POST", "git/trees") => {
                let base = body["base_tree"].as_str().unwrap();
                let base_files = self.trees.get(base).cloned().expect("base_tree must exist");
                let mut files = base_files;
                for entry in body["tree"].as_array().unwrap() {
                    assert_eq!(entry["mode"], "100644");
                    assert_eq!(entry["type"], "blob");
                    files.insert(
                        entry["path"].as_str().unwrap().to_owned(),
                        entry["content"].as_str().unwrap().to_owned(),
                    );
                }
                let sha = self.tree(files);
                return ResponseTemplate::new(201).set_body_json(json!({
                    "sha": sha, "url": format!("https://api.github.com/repos/acme/wms/git/trees/{sha}"),
                    "tree": [], "truncated": false,
                }));
            }
            ("POST", "git/commits") => {
                let tree = body["tree"].as_str().unwrap();
                assert!(self.trees.contains_key(tree));
                let parents: Vec<String> = body["parents"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect();
                let sha = self.commit(tree, parents, body["message"].as_str().unwrap());
                return ResponseTemplate::new(201).set_body_json(self.commit_json(&sha));
            }
            ("POST", "git/refs") => {
                self.created_refs.push(body.clone());
                let name = body["ref"].as_str().unwrap();
                let branch = name.strip_prefix("refs/heads/").expect("refs/heads/…");
                if self.branches.contains_key(branch) {
                    return ResponseTemplate::new(422).set_body_json(json!({
                        "message": "Reference already exists",
                        "documentation_url": "https://docs.github.com/rest/git/refs#create-a-reference",
                        "status": "422"
                    }));
                }
                let sha = body["sha"].as_str().unwrap().to_owned();
                self.branches.insert(branch.to_owned(), sha.clone());
                self.ref_writes.push((branch.to_owned(), sha));
                return ResponseTemplate::new(201).set_body_json(self.ref_json(branch));
            }
            _ => {}
        }
        if let Some(branch) = rest.strip_prefix("git/refs/heads/") {
            assert_eq!(method, "PATCH");
            self.patched_refs.push(body.clone());
            let Some(current) = self.branches.get(branch).cloned() else {
                return ResponseTemplate::new(422).set_body_json(
                    json!({"message": "Reference does not exist", "status": "422"}),
                );
            };
            let sha = body["sha"].as_str().unwrap().to_owned();
            if body["force"] != json!(true) && !self.ancestors(&sha).contains(&current) {
                return ResponseTemplate::new(422).set_body_json(
                    json!({"message": "Update is not a fast forward", "status": "422"}),
                );
            }
            self.branches.insert(branch.to_owned(), sha.clone());
            self.ref_writes.push((branch.to_owned(), sha));
            return ResponseTemplate::new(200).set_body_json(self.ref_json(branch));
        }
        if let Some(range) = rest.strip_prefix("compare/") {
            let (base, head) = range.split_once("...").unwrap();
            let (base_anc, head_anc) = (self.ancestors(base), self.ancestors(head));
            // Linear histories: walk first parents from head.
            let mut ahead = Vec::new();
            let mut at = Some(head.to_owned());
            while let Some(sha) = at.filter(|s| !base_anc.contains(s)) {
                ahead.push(sha.clone());
                at = self.commits[&sha].parents.first().cloned();
            }
            ahead.reverse();
            let behind = base_anc.difference(&head_anc).count();
            let status = match (ahead.len(), behind) {
                (0, 0) => "identical",
                (_, 0) => "ahead",
                (0, _) => "behind",
                _ => "diverged",
            };
            return ResponseTemplate::new(200).set_body_json(json!({
                "url": "x", "html_url": "x", "permalink_url": "x", "diff_url": "x", "patch_url": "x",
                "base_commit": self.commit_json(base), "merge_base_commit": self.commit_json(base),
                "status": status, "ahead_by": ahead.len(), "behind_by": behind,
                "total_commits": ahead.len(),
                "commits": ahead.iter().map(|sha| json!({
                    "sha": sha, "node_id": "C_x", "url": "x", "html_url": "x", "comments_url": "x",
                    "commit": {"message": self.commits[sha].message, "author": {"name": "a", "email": "a@example.com", "date": "2026-02-10T10:00:00Z"}, "committer": {"name": "a", "email": "a@example.com", "date": "2026-02-10T10:00:00Z"}, "tree": {"sha": self.commits[sha].tree, "url": "x"}, "comment_count": 0, "url": "x"},
                    "author": null, "committer": null, "parents": [],
                })).collect::<Vec<_>>(),
                "files": [],
            }));
        }
        if let Some(file) = rest.strip_prefix("contents/") {
            return match method {
                "GET" => {
                    let branch = req
                        .url
                        .query_pairs()
                        .find(|(k, _)| k == "ref")
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_else(|| "main".into());
                    let Some(head) = self.branches.get(&branch).cloned() else {
                        return not_found("repos/contents#get-repository-content");
                    };
                    match self.files_at(&head).get(file) {
                        Some(content) => ResponseTemplate::new(200)
                            .set_body_json(self.content_json(file, content, true)),
                        None => not_found("repos/contents#get-repository-content"),
                    }
                }
                "PUT" => {
                    self.puts.push(body.clone());
                    let branch = body["branch"].as_str().unwrap().to_owned();
                    let head = self.branches[&branch].clone();
                    let existing = self.files_at(&head).get(file).cloned();
                    match (&existing, body.get("sha").and_then(Value::as_str)) {
                        (Some(_), None) => {
                            return ResponseTemplate::new(422).set_body_json(json!({
                                "message": "Invalid request.\n\n\"sha\" wasn't supplied.",
                                "documentation_url": "https://docs.github.com/rest/repos/contents#create-or-update-file-contents",
                                "status": "422"
                            }))
                        }
                        (Some(old), Some(sha)) if fake_sha(&["blob", old]) != sha => {
                            return ResponseTemplate::new(409).set_body_json(json!({
                                "message": format!("{file} does not match {sha}"),
                                "documentation_url": "https://docs.github.com/rest/repos/contents#create-or-update-file-contents",
                                "status": "409"
                            }))
                        }
                        _ => {}
                    }
                    let content =
                        String::from_utf8(b64_decode(body["content"].as_str().unwrap())).unwrap();
                    let sha = self.push(&branch, file, &content, body["message"].as_str().unwrap());
                    self.ref_writes.push((branch, sha.clone()));
                    let status = if existing.is_some() { 200 } else { 201 };
                    ResponseTemplate::new(status).set_body_json(json!({
                        "content": self.content_json(file, &content, false),
                        "commit": self.commit_json(&sha),
                    }))
                }
                _ => ResponseTemplate::new(405),
            };
        }
        panic!("unexpected {method} {path}");
    }
}

/// The repository `acme/wms`: `main` holds a README.
#[derive(Clone)]
struct FakeRepo(Arc<Mutex<RepoState>>);

impl FakeRepo {
    fn new() -> Self {
        let mut state = RepoState::default();
        let tree = state.tree(BTreeMap::from([(
            "README.md".to_owned(),
            "# wms\n".to_owned(),
        )]));
        let root = state.commit(&tree, vec![], "initial commit");
        state.branches.insert("main".into(), root);
        Self(Arc::new(Mutex::new(state)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RepoState> {
        self.0.lock().unwrap()
    }

    async fn mount(&self, server: &MockServer) {
        let me = self.clone();
        Mock::given(path_regex(r"^/repos/acme/wms/(git|compare|contents)/"))
            .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
            .and(header("x-github-api-version", "2022-11-28"))
            .respond_with(move |req: &Request| me.0.lock().unwrap().handle(req))
            .mount(server)
            .await;
    }

    fn head(&self, branch: &str) -> Option<String> {
        self.state().branches.get(branch).cloned()
    }

    fn file(&self, branch: &str, path: &str) -> Option<String> {
        let state = self.state();
        let head = state.branches.get(branch)?.clone();
        state.files_at(&head).get(path).cloned()
    }

    fn commit(&self, sha: &str) -> FakeCommit {
        self.state().commits[sha].clone()
    }
}

/// The pulls API for PR mode: list, create (#42), update, and GraphQL
/// auto-merge, with counts.
#[derive(Clone, Default)]
struct FakePulls {
    prs: Arc<Mutex<Vec<Value>>>,
    created: Arc<AtomicUsize>,
    updated: Arc<AtomicUsize>,
    auto_merges: Arc<AtomicUsize>,
}

impl FakePulls {
    async fn mount(&self, server: &MockServer) {
        let me = self.clone();
        Mock::given(method("GET"))
            .and(path("/repos/acme/wms/pulls"))
            .respond_with(move |req: &Request| {
                let head = req
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "head")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let open: Vec<Value> = me
                    .prs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|p| p["head"]["label"] == head.as_str())
                    .cloned()
                    .collect();
                ResponseTemplate::new(200).set_body_json(Value::Array(open))
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/pulls"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                me.created.fetch_add(1, Ordering::SeqCst);
                let head = body["head"].as_str().unwrap();
                let mut pr = pull(42, body["body"].as_str().unwrap(), ME);
                pr["title"] = body["title"].clone();
                pr["head"] = json!({"label": format!("acme:{head}"), "ref": head, "sha": "c".repeat(40), "repo": {"full_name": "acme/wms"}});
                pr["base"]["ref"] = body["base"].clone();
                me.prs.lock().unwrap().push(pr.clone());
                ResponseTemplate::new(201).set_body_json(pr)
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("PATCH"))
            .and(path_regex(r"^/repos/acme/wms/pulls/\d+$"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                me.updated.fetch_add(1, Ordering::SeqCst);
                let mut prs = me.prs.lock().unwrap();
                let pr = prs.iter_mut().find(|p| p["number"] == 42).unwrap();
                pr["body"] = body["body"].clone();
                ResponseTemplate::new(200).set_body_json(pr.clone())
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("POST"))
            .and(path("/graphql"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let query = body["query"].as_str().unwrap();
                assert!(query.contains("enablePullRequestAutoMerge"), "{query}");
                assert!(query.contains("mergeMethod: SQUASH"), "{query}");
                me.auto_merges.fetch_add(1, Ordering::SeqCst);
                let mut prs = me.prs.lock().unwrap();
                if let Some(pr) = prs.iter_mut().find(|p| p["node_id"] == body["variables"]["id"]) {
                    pr["auto_merge"] = json!({"enabled_by": user(ME), "merge_method": "squash", "commit_title": null, "commit_message": null});
                }
                ResponseTemplate::new(200).set_body_json(json!({"data": {"enablePullRequestAutoMerge": {"pullRequest": {"number": 42}}}}))
            })
            .mount(server)
            .await;
    }

    fn body(&self) -> String {
        self.prs.lock().unwrap()[0]["body"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// A promoted (or rejected) report with a candidate, a dataset and a verdict.
fn full_report(status: LabelStatus, version: &str, dice: f64) -> LabelReport {
    let mut r = report("seg", status);
    r.dataset_version = Some(VersionTag::new(format!("data-{version}")));
    r.dataset_samples = Some(120);
    r.candidate = Some(Candidate {
        id: format!("run-{version}"),
        metrics: [("dice".to_owned(), dice), ("iou".to_owned(), dice - 0.1)]
            .into_iter()
            .collect(),
    });
    let passed = status == LabelStatus::Promoted;
    r.verdict = Some(Verdict {
        passed,
        first_model: false,
        forced: false,
        comparisons: vec![Comparison {
            metric: "dice".into(),
            direction: Direction::Higher,
            candidate: Some(dice),
            baseline: Some(0.80),
            delta: Some(dice - 0.80),
            passed,
            reason: String::new(),
        }],
        reason: if passed {
            "all metrics improved".into()
        } else {
            format!("dice {dice:.2} is not above production 0.80")
        },
    });
    if !passed {
        r.promoted = None;
    } else {
        r.promoted = Some(PromotedVersion {
            version: version.into(),
            previous: Some("6".into()),
        });
    }
    r
}

fn pr_mode(server: &MockServer, file: Option<&str>) -> GithubNotifier {
    GithubNotifier::new(GithubSettings {
        registry: Some(retrain_adapters::github::RegistryRef {
            kind: "mlflow".into(),
            uri: Some("https://mlflow.example.com".into()),
            model: "wms-unet".into(),
            alias: Some("production".into()),
            stage: None,
        }),
        report_url: Some("https://github.com/acme/wms/actions/runs/99".into()),
        ..settings(
            server,
            NotifyOn::Improved,
            GithubTarget::PullRequest {
                head: "retrain/seg".into(),
                base: "main".into(),
                auto_merge: true,
                file: file.map(str::to_owned),
            },
        )
    })
    .unwrap()
}

#[tokio::test]
async fn a_promotion_opens_a_pull_request_carrying_the_model_file() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let repo = FakeRepo::new();
    repo.mount(&server).await;
    let pulls = FakePulls::default();
    pulls.mount(&server).await;
    let main = repo.head("main").unwrap();

    pr_mode(&server, None)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap();

    // The branch: one commit on main, made by retrain, holding the file.
    let head = repo.head("retrain/seg").expect("branch created");
    let commit = repo.commit(&head);
    assert_eq!(commit.parents, vec![main.clone()]);
    assert!(
        commit
            .message
            .starts_with("retrain: seg model version 7 (dataset data-7)"),
        "{}",
        commit.message
    );
    assert!(
        commit.message.contains("\nRetrain-Label: seg"),
        "{}",
        commit.message
    );
    let file: Value =
        serde_json::from_str(&repo.file("retrain/seg", "models/seg.json").unwrap()).unwrap();
    assert_eq!(file["label"], "seg");
    assert_eq!(file["model"], "wms-unet");
    assert_eq!(file["registry"]["kind"], "mlflow");
    assert_eq!(file["registry"]["uri"], "https://mlflow.example.com");
    assert_eq!(file["version"], "7");
    assert_eq!(file["candidate"], "run-7");
    assert_eq!(file["dataset_version"], "data-7");
    assert_eq!(file["metrics"]["dice"], 0.85);
    assert_eq!(file["verdict"]["passed"], true);
    assert_eq!(file["verdict"]["comparisons"][0]["production"], 0.80);
    assert_eq!(
        file["report_url"],
        "https://github.com/acme/wms/actions/runs/99"
    );
    assert_eq!(repo.file("main", "models/seg.json"), None, "main untouched");
    {
        let state = repo.state();
        assert_eq!(state.created_refs.len(), 1);
        assert_eq!(state.created_refs[0]["ref"], "refs/heads/retrain/seg");
        assert_eq!(state.created_refs[0]["sha"], head.as_str());
        assert!(state.patched_refs.is_empty());
    }
    // The PR, and auto-merge on it.
    assert_eq!(pulls.created.load(Ordering::SeqCst), 1);
    let prs = pulls.prs.lock().unwrap().clone();
    assert_eq!(prs[0]["head"]["ref"], "retrain/seg");
    assert_eq!(prs[0]["base"]["ref"], "main");
    assert!(prs[0]["body"].as_str().unwrap().starts_with(MARKER));
    assert_eq!(pulls.auto_merges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_newer_promotion_amends_the_same_branch_and_pull_request() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let repo = FakeRepo::new();
    repo.mount(&server).await;
    let pulls = FakePulls::default();
    pulls.mount(&server).await;
    // Seed 002 keeps the file at the root; main already has one.
    repo.state().push(
        "main",
        "model-metadata.json",
        "{\"version\": \"6\"}\n",
        "add metadata",
    );
    let notifier = pr_mode(&server, Some("model-metadata.json"));
    notifier
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap();
    let first = repo.head("retrain/seg").unwrap();
    // Meanwhile main moves on.
    let main = repo
        .state()
        .push("main", "README.md", "# wms, v2\n", "docs");

    notifier
        .notify(&full_report(LabelStatus::Promoted, "8", 0.88))
        .await
        .unwrap();

    // Same branch, force-updated to a new single commit on the new main.
    let second = repo.head("retrain/seg").unwrap();
    assert_ne!(first, second);
    let commit = repo.commit(&second);
    assert_eq!(
        commit.parents,
        vec![main.clone()],
        "rebuilt on the current base"
    );
    let file: Value =
        serde_json::from_str(&repo.file("retrain/seg", "model-metadata.json").unwrap()).unwrap();
    assert_eq!(file["version"], "8");
    assert_eq!(
        repo.file("retrain/seg", "README.md").unwrap(),
        "# wms, v2\n"
    );
    {
        let state = repo.state();
        assert_eq!(state.created_refs.len(), 1, "the branch is created once");
        assert_eq!(state.patched_refs.len(), 1);
        assert_eq!(state.patched_refs[0]["sha"], second.as_str());
        assert_eq!(state.patched_refs[0]["force"], true);
        // The branch never pointed at main itself (GitHub would close the PR).
        let mains: BTreeSet<String> = state.ancestors(&main);
        assert!(
            state.ref_writes.iter().all(|(_, sha)| !mains.contains(sha)),
            "{:?}",
            state.ref_writes
        );
    }
    // One PR, updated in place; auto-merge not enabled twice.
    assert_eq!(pulls.created.load(Ordering::SeqCst), 1);
    assert_eq!(pulls.updated.load(Ordering::SeqCst), 1);
    assert!(
        pulls.body().contains("promoted version: `8`"),
        "{}",
        pulls.body()
    );
    assert_eq!(pulls.auto_merges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_promotion_notified_again_commits_nothing_new() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let repo = FakeRepo::new();
    repo.mount(&server).await;
    let pulls = FakePulls::default();
    pulls.mount(&server).await;
    let notifier = pr_mode(&server, None);
    let report = full_report(LabelStatus::Promoted, "7", 0.85);
    notifier.notify(&report).await.unwrap();
    let head = repo.head("retrain/seg").unwrap();
    // A resumed run delivers the same report again.
    notifier.notify(&report).await.unwrap();
    assert_eq!(repo.head("retrain/seg").unwrap(), head, "no new commit");
    let state = repo.state();
    assert_eq!(state.created_refs.len(), 1);
    assert!(state.patched_refs.is_empty());
    assert_eq!(pulls.created.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_branch_with_commits_retrain_did_not_make_is_not_force_updated() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let repo = FakeRepo::new();
    repo.mount(&server).await;
    let pulls = FakePulls::default();
    pulls.mount(&server).await;
    {
        let mut state = repo.state();
        let main = state.branches["main"].clone();
        state.branches.insert("retrain/seg".into(), main);
        state.push(
            "retrain/seg",
            "notes.md",
            "mine\n",
            "alice's work in progress",
        );
    }
    let before = repo.head("retrain/seg").unwrap();
    let err = pr_mode(&server, None)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("retrain/seg") && text.contains("did not make"),
        "{text}"
    );
    assert!(text.contains("alice's work in progress"), "{text}");
    assert_eq!(repo.head("retrain/seg").unwrap(), before, "left alone");
    assert!(repo.state().patched_refs.is_empty());
    assert_eq!(pulls.created.load(Ordering::SeqCst), 0);
}

/// A token that lacks a permission: GitHub's 403 for an installation token.
fn denied(permission: &str) -> ResponseTemplate {
    ResponseTemplate::new(403)
        .insert_header("x-ratelimit-remaining", "4990")
        .insert_header("x-accepted-github-permissions", permission)
        .set_body_json(json!({
            "message": "Resource not accessible by integration",
            "documentation_url": "https://docs.github.com/rest",
            "status": "403"
        }))
}

#[tokio::test]
async fn a_token_without_contents_write_is_told_so_and_opens_nothing() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/git/trees"))
        .respond_with(denied("contents=write"))
        .mount(&server)
        .await;
    let repo = FakeRepo::new();
    repo.mount(&server).await;
    let pulls = FakePulls::default();
    pulls.mount(&server).await;
    let err = pr_mode(&server, None)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("contents: write"), "{err}");
    assert!(err.to_string().contains("contents=write"), "{err}");
    assert!(!err.to_string().contains(TOKEN));
    assert_eq!(repo.head("retrain/seg"), None);
    assert_eq!(pulls.created.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_token_without_pull_requests_write_is_told_so() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/wms/pulls"))
        .respond_with(denied("pull_requests=write"))
        .mount(&server)
        .await;
    json_route("GET", "/repos/acme/wms/pulls", 200, json!([]))
        .mount(&server)
        .await;
    FakeRepo::new().mount(&server).await;
    let err = pr_mode(&server, None)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("pull-requests: write"), "{err}");
}

// ---------------------------------------------------------------------------
// The triggering pull request (seed 002).

const DATA_BRANCH: &str = "data/20260210-123456";

/// `GITHUB_EVENT_PATH` of a `pull_request` event, as Actions writes it.
fn pull_request_event(dir: &tempfile::TempDir, number: u64) -> std::path::PathBuf {
    let event = json!({
        "action": "synchronize",
        "number": number,
        "before": "a".repeat(40),
        "after": "b".repeat(40),
        "pull_request": {
            "number": number, "state": "open", "merged": false, "draft": false,
            "html_url": format!("https://github.com/acme/wms/pull/{number}"),
            "head": {"label": format!("acme:{DATA_BRANCH}"), "ref": DATA_BRANCH, "sha": "b".repeat(40), "repo": {"full_name": "acme/wms"}},
            "base": {"label": "acme:main", "ref": "main", "sha": "c".repeat(40)},
        },
        "repository": {"full_name": "acme/wms"},
        "sender": user("alice"),
    });
    let path = dir.path().join("event.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&event).unwrap()).unwrap();
    path
}

/// The triggering PR: `GET /pulls/{n}`, its reviews, and GraphQL auto-merge
/// on it, stateful.
#[derive(Clone)]
struct FakeTriggeringPr {
    number: u64,
    pr: Arc<Mutex<Value>>,
    reviews: Arc<Mutex<Vec<Value>>>,
    review_posts: Arc<AtomicUsize>,
    enabled: Arc<AtomicUsize>,
    disabled: Arc<AtomicUsize>,
}

impl FakeTriggeringPr {
    fn new(number: u64, head_repo: &str) -> Self {
        let mut pr = pull(number, "New training data: 2 images", "alice");
        pr["head"] = json!({"label": format!("acme:{DATA_BRANCH}"), "ref": DATA_BRANCH, "sha": "b".repeat(40), "repo": {"full_name": head_repo}});
        pr["auto_merge"] = Value::Null;
        Self {
            number,
            pr: Arc::new(Mutex::new(pr)),
            reviews: Arc::default(),
            review_posts: Arc::default(),
            enabled: Arc::default(),
            disabled: Arc::default(),
        }
    }

    async fn mount(&self, server: &MockServer) {
        let n = self.number;
        let me = self.clone();
        Mock::given(method("GET"))
            .and(path(format!("/repos/acme/wms/pulls/{n}")))
            .respond_with(move |_: &Request| {
                ResponseTemplate::new(200).set_body_json(me.pr.lock().unwrap().clone())
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("GET"))
            .and(path(format!("/repos/acme/wms/pulls/{n}/reviews")))
            .respond_with(move |_: &Request| {
                ResponseTemplate::new(200)
                    .set_body_json(Value::Array(me.reviews.lock().unwrap().clone()))
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("POST"))
            .and(path(format!("/repos/acme/wms/pulls/{n}/reviews")))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                assert_eq!(body["event"], "APPROVE");
                me.review_posts.fetch_add(1, Ordering::SeqCst);
                let mut reviews = me.reviews.lock().unwrap();
                let review = json!({
                    "id": 80 + reviews.len() as u64, "node_id": "PRR_kwDO", "user": user(ME),
                    "body": body["body"], "state": "APPROVED",
                    "html_url": format!("https://github.com/acme/wms/pull/{n}#pullrequestreview-80"),
                    "pull_request_url": format!("https://api.github.com/repos/acme/wms/pulls/{n}"),
                    "submitted_at": "2026-02-10T10:05:00Z", "commit_id": "d".repeat(40),
                    "author_association": "CONTRIBUTOR",
                });
                reviews.push(review.clone());
                ResponseTemplate::new(200).set_body_json(review)
            })
            .mount(server)
            .await;
        let me = self.clone();
        Mock::given(method("POST"))
            .and(path("/graphql"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let query = body["query"].as_str().unwrap();
                assert_eq!(body["variables"]["id"], format!("PR_kwDO{n}"));
                let mut pr = me.pr.lock().unwrap();
                if query.contains("enablePullRequestAutoMerge") {
                    assert!(query.contains("mergeMethod: SQUASH"));
                    me.enabled.fetch_add(1, Ordering::SeqCst);
                    pr["auto_merge"] = json!({"enabled_by": user(ME), "merge_method": "squash", "commit_title": null, "commit_message": null});
                } else {
                    assert!(query.contains("disablePullRequestAutoMerge"), "{query}");
                    me.disabled.fetch_add(1, Ordering::SeqCst);
                    pr["auto_merge"] = Value::Null;
                }
                ResponseTemplate::new(200).set_body_json(json!({"data": {}}))
            })
            .mount(server)
            .await;
    }
}

fn triggering(server: &MockServer, event: &std::path::Path) -> GithubNotifier {
    let number = triggering_pull_request(Some(event), Some("refs/heads/unrelated")).unwrap();
    GithubNotifier::new(settings(
        server,
        NotifyOn::Always,
        GithubTarget::TriggeringPullRequest {
            number,
            approve: true,
            auto_merge: true,
            file: Some("model-metadata.json".into()),
        },
    ))
    .unwrap()
}

/// The repository with the data PR's branch, whose metadata file is stale.
fn repo_with_data_branch() -> FakeRepo {
    let repo = FakeRepo::new();
    {
        let mut state = repo.state();
        state.push(
            "main",
            "model-metadata.json",
            "{\"version\": \"6\"}\n",
            "metadata v6",
        );
        let main = state.branches["main"].clone();
        state.branches.insert(DATA_BRANCH.into(), main);
        state.push(
            DATA_BRANCH,
            "data/images/id_49.jpg",
            "jpeg",
            "data: 2 images",
        );
    }
    repo
}

#[tokio::test]
async fn the_triggering_pr_gets_the_table_the_file_an_approval_and_auto_merge() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "acme/wms");
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, ME);
    issue.mount(&server, None).await;
    let notifier = triggering(&server, &event);
    assert_eq!(
        notifier.describe(),
        "github acme/wms#17 (triggering pull request)"
    );
    let report = full_report(LabelStatus::Promoted, "7", 0.85);

    notifier.notify(&report).await.unwrap();

    // The file, committed on top of the PR's own branch (with the old blob's sha).
    let file: Value =
        serde_json::from_str(&repo.file(DATA_BRANCH, "model-metadata.json").unwrap()).unwrap();
    assert_eq!(file["version"], "7");
    assert_eq!(
        repo.file(DATA_BRANCH, "data/images/id_49.jpg").unwrap(),
        "jpeg"
    );
    {
        let state = repo.state();
        assert_eq!(state.puts.len(), 1);
        let put = &state.puts[0];
        assert_eq!(put["branch"], DATA_BRANCH);
        assert_eq!(
            put["sha"],
            fake_sha(&["blob", "{\"version\": \"6\"}\n"]).as_str()
        );
        assert!(put["message"]
            .as_str()
            .unwrap()
            .contains("Retrain-Label: seg"));
        assert!(state.patched_refs.is_empty() && state.created_refs.is_empty());
    }
    // Approved once, auto-merge on, the results table posted on the PR.
    assert_eq!(pr.review_posts.load(Ordering::SeqCst), 1);
    assert_eq!(pr.enabled.load(Ordering::SeqCst), 1);
    assert_eq!(issue.posts(), 1);
    let comment = &issue.bodies()[0].2;
    assert!(comment.starts_with(MARKER), "{comment}");
    assert!(comment.contains("| dice | 0.8500 | 0.8000 |"), "{comment}");
    assert!(
        comment.contains("Committed `model-metadata.json`"),
        "{comment}"
    );
    assert!(comment.contains("Approved."), "{comment}");
    assert!(comment.contains("auto-merge enabled"), "{comment}");

    // The same report again (a resumed run): nothing twice.
    notifier.notify(&report).await.unwrap();
    assert_eq!(repo.state().puts.len(), 1, "the file already says so");
    assert_eq!(
        pr.review_posts.load(Ordering::SeqCst),
        1,
        "not approved twice"
    );
    assert_eq!(pr.enabled.load(Ordering::SeqCst), 1);
    assert_eq!(issue.posts(), 1);
    assert_eq!(
        issue.patched(),
        vec![100],
        "the comment is updated in place"
    );
    let comment = &issue.bodies()[0].2;
    assert!(
        comment.contains("Already approved by retrain."),
        "{comment}"
    );
}

#[tokio::test]
async fn a_rejected_model_is_explained_on_the_triggering_pr_and_nothing_is_approved() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "acme/wms");
    // An earlier run of this PR enabled auto-merge.
    pr.pr.lock().unwrap()["auto_merge"] = json!({"enabled_by": user(ME), "merge_method": "squash"});
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, ME);
    issue.mount(&server, None).await;

    triggering(&server, &event)
        .notify(&full_report(LabelStatus::Rejected, "7", 0.78))
        .await
        .unwrap();

    assert!(repo.state().puts.is_empty(), "no commit");
    assert_eq!(pr.review_posts.load(Ordering::SeqCst), 0, "no approval");
    assert_eq!(
        pr.disabled.load(Ordering::SeqCst),
        1,
        "auto-merge turned off"
    );
    let comment = &issue.bodies()[0].2;
    assert!(comment.contains("The model did not improve"), "{comment}");
    assert!(
        comment.contains("dice 0.78 is not above production 0.80"),
        "{comment}"
    );
    assert!(comment.contains("| dice | 0.7800 | 0.8000 |"), "{comment}");
    assert!(comment.contains("Auto-merge was turned off."), "{comment}");
}

#[tokio::test]
async fn a_fork_pull_request_is_told_retrain_cannot_push_to_it() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "mallory/wms");
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, ME);
    issue.mount(&server, None).await;

    let err = triggering(&server, &event)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();

    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("mallory/wms"), "{err}");
    assert!(repo.state().puts.is_empty());
    assert_eq!(pr.review_posts.load(Ordering::SeqCst), 0);
    assert_eq!(pr.enabled.load(Ordering::SeqCst), 0);
    let comment = &issue.bodies()[0].2;
    assert!(comment.contains("cannot push the model file"), "{comment}");
    assert!(
        comment.contains("| dice | 0.8500"),
        "the table is still posted: {comment}"
    );
}

#[tokio::test]
async fn a_403_on_the_file_commit_names_contents_write() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    Mock::given(method("PUT"))
        .and(path("/repos/acme/wms/contents/model-metadata.json"))
        .respond_with(denied("contents=write"))
        .mount(&server)
        .await;
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "acme/wms");
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, ME);
    issue.mount(&server, None).await;

    let err = triggering(&server, &event)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();

    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("contents: write"), "{err}");
    assert!(!err.to_string().contains(TOKEN));
    assert_eq!(
        pr.review_posts.load(Ordering::SeqCst),
        0,
        "not approved without the file"
    );
    let comment = &issue.bodies()[0].2;
    assert!(comment.contains("contents: write"), "{comment}");
}

#[tokio::test]
async fn github_actions_refusing_to_approve_is_explained() {
    let server = MockServer::start().await;
    mount_installation_token(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    let answer = json!({
        "message": "Unprocessable Entity",
        "errors": ["GitHub Actions is not permitted to approve pull requests."],
        "documentation_url": "https://docs.github.com/rest/pulls/reviews#create-a-review-for-a-pull-request",
        "status": "422"
    });
    json_route("POST", "/repos/acme/wms/pulls/17/reviews", 422, answer)
        .expect(1)
        .mount(&server)
        .await;
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "acme/wms");
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, "github-actions[bot]");
    issue.mount(&server, None).await;

    let err = triggering(&server, &event)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();

    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("Allow GitHub Actions to create and approve pull requests"),
        "{err}"
    );
    assert_eq!(repo.state().puts.len(), 1, "the file was committed before");
    assert_eq!(
        pr.enabled.load(Ordering::SeqCst),
        0,
        "no auto-merge without approval"
    );
}

#[tokio::test]
async fn a_transient_error_on_the_triggering_pr_is_final_not_deferred_to_another_pr() {
    let server = MockServer::start().await;
    mount_user(&server, ME).await;
    let dir = tempfile::tempdir().unwrap();
    let event = pull_request_event(&dir, 17);
    // The data branch moved between the read and the write.
    let answer = json!({
        "message": "model-metadata.json does not match 0123abc",
        "documentation_url": "https://docs.github.com/rest/repos/contents#create-or-update-file-contents",
        "status": "409"
    });
    json_route(
        "PUT",
        "/repos/acme/wms/contents/model-metadata.json",
        409,
        answer,
    )
    .expect(1)
    .mount(&server)
    .await;
    let repo = repo_with_data_branch();
    repo.mount(&server).await;
    let pr = FakeTriggeringPr::new(17, "acme/wms");
    pr.mount(&server).await;
    let issue = FakeIssue::new(17, ME);
    issue.mount(&server, None).await;

    let err = triggering(&server, &event)
        .notify(&full_report(LabelStatus::Promoted, "7", 0.85))
        .await
        .unwrap_err();

    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(
        err.to_string().contains("not retried at the next cycle"),
        "{err}"
    );
    assert_eq!(pr.review_posts.load(Ordering::SeqCst), 0);
    assert!(issue.bodies()[0].2.contains("changed meanwhile"));
}
