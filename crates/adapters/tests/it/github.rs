//! GitHub and webhook notifiers against wiremock with GitHub's REST shapes.

use retrain_adapters::github::{GithubNotifier, GithubSettings, GithubTarget, NotifyOn};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::webhook::{WebhookFormat, WebhookNotifier};
use retrain_core::domain::{Label, PromotedVersion};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::{LabelReport, LabelStatus};
use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const TOKEN: &str = "ghp_super_secret_token_value";

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

/// A tiny in-memory "issue comments" API: GET lists, POST adds, PATCH edits.
#[derive(Clone, Default)]
struct Comments(std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>>);

impl Comments {
    fn list(&self) -> Value {
        let all = self.0.lock().unwrap();
        Value::Array(
            all.iter()
                .map(|(id, body)| json!({"id": id, "body": body, "user": {"login": "bot"}}))
                .collect(),
        )
    }
}

#[tokio::test]
async fn comment_is_created_then_updated_in_place() {
    let server = MockServer::start().await;
    let comments = Comments::default();
    // Someone else's comment with another label's marker on page 1.
    comments
        .0
        .lock()
        .unwrap()
        .push((1, "<!-- retrain:label=other -->\nhello".into()));
    {
        let comments = comments.clone();
        Mock::given(method("GET"))
            .and(path("/repos/acme/wms/issues/12/comments"))
            .and(header("accept", "application/vnd.github+json"))
            .and(header("x-github-api-version", "2022-11-28"))
            .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
            .respond_with(move |_: &Request| {
                ResponseTemplate::new(200).set_body_json(comments.list())
            })
            .mount(&server)
            .await;
    }
    {
        let comments = comments.clone();
        Mock::given(method("POST"))
            .and(path("/repos/acme/wms/issues/12/comments"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let mut all = comments.0.lock().unwrap();
                let id = 100 + all.len() as u64;
                all.push((id, body["body"].as_str().unwrap().to_owned()));
                ResponseTemplate::new(201).set_body_json(json!({"id": id, "body": body["body"]}))
            })
            .expect(1)
            .mount(&server)
            .await;
    }
    {
        let comments = comments.clone();
        Mock::given(method("PATCH"))
            .and(path("/repos/acme/wms/issues/comments/101"))
            .respond_with(move |req: &Request| {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let mut all = comments.0.lock().unwrap();
                if let Some(c) = all.iter_mut().find(|(id, _)| *id == 101) {
                    c.1 = body["body"].as_str().unwrap().to_owned();
                }
                ResponseTemplate::new(200).set_body_json(json!({"id": 101, "body": body["body"]}))
            })
            .expect(1)
            .mount(&server)
            .await;
    }
    let notifier = GithubNotifier::new(settings(
        &server,
        NotifyOn::Always,
        GithubTarget::Comment { issue: 12 },
    ))
    .unwrap();
    notifier
        .notify(&report("segmentation", LabelStatus::Rejected))
        .await
        .unwrap();
    notifier
        .notify(&report("segmentation", LabelStatus::Promoted))
        .await
        .unwrap();
    let all = comments.0.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "one comment per label: {all:?}");
    assert!(all[1].1.starts_with("<!-- retrain:label=segmentation -->"));
    assert!(all[1].1.contains("promoted"), "updated body: {}", all[1].1);
    assert_eq!(
        all[0].1, "<!-- retrain:label=other -->\nhello",
        "others untouched"
    );
}

#[tokio::test]
async fn comments_are_paginated_through_the_link_header() {
    let server = MockServer::start().await;
    let next = format!(
        "{}/repos/acme/wms/issues/5/comments?per_page=100&page=2",
        server.uri()
    );
    Mock::given(method("GET"))
        .and(path("/repos/acme/wms/issues/5/comments"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            {"id": 9, "body": "<!-- retrain:label=seg -->\nold"}
        ])))
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
                .set_body_json(json!([{"id": 1, "body": null}])),
        )
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/repos/acme/wms/issues/comments/9"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": 9})))
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
                let pr = json!({"number": 42, "node_id": "PR_kwDO42", "body": body["body"], "html_url": "https://github.com/acme/wms/pull/42", "state": "open"});
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
            ResponseTemplate::new(200)
                .set_body_json(json!({"number": 42, "node_id": "PR_kwDO42", "body": body["body"]}))
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
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"number": 3, "node_id": "PR_3"})),
        )
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
