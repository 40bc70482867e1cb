//! EC2 lease provider against `moto_server` (RETRAIN_TEST_MOTO_URL).

use std::collections::BTreeMap;
use std::time::Duration;

use retrain_adapters::ec2::{Ec2Client, Ec2LeaseProvider, Ec2WaitSettings, InstanceState};
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::testing::services::{
    moto_settings, stopped_instance, MOTO_SECRET_KEY, MOTO_VAR,
};
use retrain_core::domain::{Label, Lease, RunId};
use retrain_core::ports::{LeaseProvider, PortError};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::service_url;

fn fast_wait() -> Ec2WaitSettings {
    Ec2WaitSettings {
        poll_interval: Duration::from_millis(50),
        running_timeout: Duration::from_secs(10),
        transition_timeout: Duration::from_secs(5),
        max_poll_interval: Duration::from_millis(200),
        release_attempts: 3,
        release_backoff: Duration::from_millis(20),
    }
}

fn lease_for(ids: &[String]) -> Lease {
    let now = chrono::Utc::now();
    Lease {
        id: "run-1".into(),
        label: Label::new("segmentation").unwrap(),
        run_id: RunId::generate(),
        provider: "ec2".into(),
        resources: ids.to_vec(),
        region: Some("us-east-1".into()),
        acquired_at: now,
        max_until: now,
        attributes: BTreeMap::new(),
        released_at: None,
    }
}

#[tokio::test]
async fn moto_acquire_runs_and_release_stops() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let client = Ec2Client::new(&moto_settings(&url), HttpPolicy::fast_for_tests()).unwrap();
    let id = stopped_instance(&client).await;
    let described = client
        .describe_instances(std::slice::from_ref(&id))
        .await
        .unwrap();
    assert_eq!(described[0].state, InstanceState::Stopped);

    let provider = Ec2LeaseProvider::new(
        client.clone(),
        vec![id.clone()],
        Some("us-east-1".into()),
        None,
        Duration::from_secs(3600),
        fast_wait(),
    )
    .unwrap();
    let plan = provider.plan();
    assert_eq!(plan.resources, vec![id.clone()]);
    assert_eq!(plan.provider, "ec2");

    let lease = provider
        .acquire(lease_for(std::slice::from_ref(&id)))
        .await
        .unwrap();
    let described = client
        .describe_instances(std::slice::from_ref(&id))
        .await
        .unwrap();
    assert_eq!(described[0].state, InstanceState::Running);
    let public_ip = lease
        .attributes
        .get("public_ip")
        .expect("public_ip attribute");
    assert_eq!(Some(public_ip), described[0].public_ip.as_ref());
    assert!(lease.attributes.contains_key("private_ip"));

    provider.release(&lease).await.unwrap();
    let described = client
        .describe_instances(std::slice::from_ref(&id))
        .await
        .unwrap();
    assert_eq!(described[0].state, InstanceState::Stopped);
    // Releasing again is fine: stopping a stopped instance succeeds.
    provider.release(&lease).await.unwrap();

    // The infra commands' helpers.
    assert_eq!(
        provider.status().await.unwrap()[0].state,
        InstanceState::Stopped
    );
    provider.start().await.unwrap();
    assert_eq!(
        provider.status().await.unwrap()[0].state,
        InstanceState::Running
    );
    provider.stop().await.unwrap();
    assert_eq!(
        provider.status().await.unwrap()[0].state,
        InstanceState::Stopped
    );
}

#[tokio::test]
async fn moto_health_url_is_polled_with_the_public_ip() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let client = Ec2Client::new(&moto_settings(&url), HttpPolicy::fast_for_tests()).unwrap();
    let id = stopped_instance(&client).await;
    // moto's public IPs are not routable here: the health check must fail
    // within the deadline with a message naming the URL, and not hang.
    let provider = Ec2LeaseProvider::new(
        client.clone(),
        vec![id.clone()],
        None,
        Some("http://{public_ip}:9/health".into()),
        Duration::from_secs(3600),
        Ec2WaitSettings {
            poll_interval: Duration::from_millis(100),
            running_timeout: Duration::from_millis(1500),
            ..fast_wait()
        },
    )
    .unwrap();
    let err = provider
        .acquire(lease_for(std::slice::from_ref(&id)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(":9/health"), "{err}");
    assert!(err.to_string().contains(&id), "{err}");
    provider.release(&lease_for(&[id])).await.unwrap();
}

#[tokio::test]
async fn moto_unknown_instance_id_is_named() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let client = Ec2Client::new(&moto_settings(&url), HttpPolicy::fast_for_tests()).unwrap();
    let missing = "i-0123456789abcdef0".to_owned();
    let provider = Ec2LeaseProvider::new(
        client,
        vec![missing.clone()],
        None,
        None,
        Duration::from_secs(60),
        fast_wait(),
    )
    .unwrap();
    let err = provider
        .acquire(lease_for(std::slice::from_ref(&missing)))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(
        err.to_string().contains("InvalidInstanceID.NotFound"),
        "{err}"
    );
    let err = provider
        .release(&lease_for(std::slice::from_ref(&missing)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(!format!("{err:?}").contains(MOTO_SECRET_KEY));
}

#[tokio::test]
async fn auth_failure_is_denied_without_the_secret() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_string(
            "<Response><Errors><Error><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message></Error></Errors><RequestID>x</RequestID></Response>",
        ))
        .mount(&server)
        .await;
    let settings = moto_settings(&server.uri());
    let client = Ec2Client::new(&settings, HttpPolicy::fast_for_tests()).unwrap();
    let err = client
        .describe_instances(&["i-1".into()])
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("AuthFailure"));
    assert!(!err.to_string().contains(MOTO_SECRET_KEY));
    assert!(!format!("{settings:?} {client:?}").contains(MOTO_SECRET_KEY));
    // The request was signed for ec2 in the configured region.
    let requests = server.received_requests().await.unwrap();
    let auth = requests[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(auth.contains("/us-east-1/ec2/aws4_request"), "{auth}");
    let body = String::from_utf8_lossy(&requests[0].body);
    assert!(
        body.contains("Action=DescribeInstances")
            && body.contains("Version=2016-11-15")
            && body.contains("InstanceId.1=i-1"),
        "{body}"
    );
}

#[tokio::test]
async fn moto_health_url_is_awaited_until_2xx() {
    let Some(url) = service_url(MOTO_VAR) else {
        return;
    };
    let health = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&health)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&health)
        .await;
    let client = Ec2Client::new(&moto_settings(&url), HttpPolicy::fast_for_tests()).unwrap();
    let id = stopped_instance(&client).await;
    let provider = Ec2LeaseProvider::new(
        client,
        vec![id.clone()],
        None,
        Some(format!("{}/health", health.uri())),
        Duration::from_secs(3600),
        fast_wait(),
    )
    .unwrap();
    let lease = provider.acquire(lease_for(&[id])).await.unwrap();
    assert_eq!(health.received_requests().await.unwrap().len(), 3);
    provider.release(&lease).await.unwrap();
}

#[tokio::test]
async fn acquire_fails_fast_when_an_instance_is_stopping() {
    use wiremock::matchers::body_string_contains;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("Action=StartInstances"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"<StartInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><instancesSet><item><instanceId>i-0abc</instanceId><currentState><code>0</code><name>pending</name></currentState><previousState><code>80</code><name>stopped</name></previousState></item></instancesSet></StartInstancesResponse>"#,
        ))
        .mount(&server)
        .await;
    // State code 320 = 64 | 256: the high byte must be masked off.
    Mock::given(method("POST"))
        .and(body_string_contains("Action=DescribeInstances"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><reservationSet><item><instancesSet><item><instanceId>i-0abc</instanceId><instanceState><code>320</code><name>stopping</name></instanceState></item></instancesSet></item></reservationSet></DescribeInstancesResponse>"#,
        ))
        .mount(&server)
        .await;
    let client =
        Ec2Client::new(&moto_settings(&server.uri()), HttpPolicy::fast_for_tests()).unwrap();
    let ids = vec!["i-0abc".to_owned()];
    let provider = Ec2LeaseProvider::new(
        client,
        ids.clone(),
        None,
        None,
        Duration::from_secs(60),
        fast_wait(),
    )
    .unwrap();
    let err = provider.acquire(lease_for(&ids)).await.unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("i-0abc is stopping"), "{err}");
}

#[tokio::test]
async fn stop_of_an_instance_in_incorrect_state_is_fine_when_already_down() {
    use wiremock::matchers::body_string_contains;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("Action=StopInstances"))
        .respond_with(ResponseTemplate::new(400).set_body_string(
            "<Response><Errors><Error><Code>IncorrectInstanceState</Code><Message>The instance 'i-0abc' is not in a state from which it can be stopped.</Message></Error></Errors><RequestID>x</RequestID></Response>",
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("Action=DescribeInstances"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"<DescribeInstancesResponse><reservationSet><item><instancesSet><item><instanceId>i-0abc</instanceId><instanceState><code>48</code><name>terminated</name></instanceState></item></instancesSet></item></reservationSet></DescribeInstancesResponse>"#,
        ))
        .mount(&server)
        .await;
    let client =
        Ec2Client::new(&moto_settings(&server.uri()), HttpPolicy::fast_for_tests()).unwrap();
    let ids = vec!["i-0abc".to_owned()];
    let provider = Ec2LeaseProvider::new(
        client,
        ids.clone(),
        None,
        None,
        Duration::from_secs(60),
        fast_wait(),
    )
    .unwrap();
    provider.release(&lease_for(&ids)).await.unwrap();
}

#[tokio::test]
async fn the_lease_region_wins_over_the_client_region() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            "<DescribeInstancesResponse><reservationSet/></DescribeInstancesResponse>",
        ))
        .mount(&server)
        .await;
    let client =
        Ec2Client::new(&moto_settings(&server.uri()), HttpPolicy::fast_for_tests()).unwrap();
    let provider = Ec2LeaseProvider::new(
        client,
        vec!["i-0abc".into()],
        Some("eu-west-1".into()),
        None,
        Duration::from_secs(60),
        fast_wait(),
    )
    .unwrap();
    assert_eq!(provider.plan().region.as_deref(), Some("eu-west-1"));
    provider.status().await.unwrap();
    let requests = server.received_requests().await.unwrap();
    let auth = requests[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(auth.contains("/eu-west-1/ec2/aws4_request"), "{auth}");
}

// ---- awkward states (wiremock speaking the EC2 Query API shapes) ----

const NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn state_xml(code: u16, name: &str) -> String {
    format!("<code>{code}</code><name>{name}</name>")
}

fn describe_xml(id: &str, code: u16, name: &str) -> String {
    format!(
        r#"<DescribeInstancesResponse xmlns="{NS}"><requestId>r-1</requestId><reservationSet><item><reservationId>r-0f1</reservationId><ownerId>123456789012</ownerId><groupSet/><instancesSet><item><instanceId>{id}</instanceId><imageId>ami-12c6146b</imageId><instanceState>{}</instanceState><privateIpAddress>10.0.0.5</privateIpAddress><ipAddress>54.0.0.5</ipAddress><tagSet/></item></instancesSet></item></reservationSet></DescribeInstancesResponse>"#,
        state_xml(code, name)
    )
}

fn state_change_xml(action: &str, id: &str, current: (u16, &str), previous: (u16, &str)) -> String {
    format!(
        r#"<{action}Response xmlns="{NS}"><requestId>r-2</requestId><instancesSet><item><instanceId>{id}</instanceId><currentState>{}</currentState><previousState>{}</previousState></item></instancesSet></{action}Response>"#,
        state_xml(current.0, current.1),
        state_xml(previous.0, previous.1)
    )
}

fn ec2_error_xml(code: &str, message: &str) -> String {
    format!(
        "<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>3f5a1c2e-0000-4000-8000-000000000000</RequestID></Response>"
    )
}

fn xml(status: u16, body: String) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body, "text/xml;charset=UTF-8")
}

async fn mount(server: &MockServer, action: &str, response: ResponseTemplate, times: Option<u64>) {
    use wiremock::matchers::body_string_contains;
    let mock = Mock::given(method("POST"))
        .and(body_string_contains(format!("Action={action}&")))
        .respond_with(response);
    match times {
        Some(n) => mock.up_to_n_times(n).mount(server).await,
        None => mock.mount(server).await,
    }
}

/// The `Action` of every request the server received, in order.
async fn actions(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            url::form_urlencoded::parse(&r.body)
                .find(|(k, _)| k == "Action")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect()
}

fn wiremock_provider(
    server: &MockServer,
    wait: Ec2WaitSettings,
) -> (Ec2LeaseProvider, Vec<String>) {
    let client =
        Ec2Client::new(&moto_settings(&server.uri()), HttpPolicy::fast_for_tests()).unwrap();
    let ids = vec!["i-0abc".to_owned()];
    let provider = Ec2LeaseProvider::new(
        client,
        ids.clone(),
        None,
        None,
        Duration::from_secs(60),
        wait,
    )
    .unwrap();
    (provider, ids)
}

#[tokio::test]
async fn stop_of_a_pending_instance_waits_until_running_then_stops() {
    let server = MockServer::start().await;
    mount(
        &server,
        "StopInstances",
        xml(
            400,
            ec2_error_xml(
                "IncorrectInstanceState",
                "The instance 'i-0abc' is not in a state from which it can be stopped.",
            ),
        ),
        Some(1),
    )
    .await;
    mount(
        &server,
        "StopInstances",
        xml(
            200,
            state_change_xml("StopInstances", "i-0abc", (64, "stopping"), (16, "running")),
        ),
        None,
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 0, "pending")),
        Some(2),
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 16, "running")),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(&server, fast_wait());

    provider.release(&lease_for(&ids)).await.unwrap();
    assert_eq!(
        actions(&server).await,
        [
            "StopInstances",
            "DescribeInstances", // pending: wait
            "DescribeInstances", // still pending
            "DescribeInstances", // running: stop now
            "StopInstances",
        ]
    );
}

#[tokio::test]
async fn start_of_a_stopping_instance_waits_until_stopped_then_starts() {
    let server = MockServer::start().await;
    mount(
        &server,
        "StartInstances",
        xml(
            400,
            ec2_error_xml(
                "IncorrectInstanceState",
                "The instance 'i-0abc' is not in a state from which it can be started.",
            ),
        ),
        Some(1),
    )
    .await;
    mount(
        &server,
        "StartInstances",
        xml(
            200,
            state_change_xml("StartInstances", "i-0abc", (0, "pending"), (80, "stopped")),
        ),
        None,
    )
    .await;
    // 320 = 64 | 256: the high byte is masked off.
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 320, "stopping")),
        Some(2),
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 80, "stopped")),
        Some(1),
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 16, "running")),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(&server, fast_wait());

    let lease = provider.acquire(lease_for(&ids)).await.unwrap();
    assert_eq!(
        lease.attributes.get("public_ip").map(String::as_str),
        Some("54.0.0.5")
    );
    assert_eq!(
        actions(&server).await,
        [
            "StartInstances",
            "DescribeInstances", // stopping: wait
            "DescribeInstances", // still stopping
            "DescribeInstances", // stopped: start now
            "StartInstances",
            "DescribeInstances", // running
        ]
    );
}

#[tokio::test]
async fn start_of_a_terminated_instance_fails_naming_it() {
    let server = MockServer::start().await;
    mount(
        &server,
        "StartInstances",
        xml(
            400,
            ec2_error_xml(
                "IncorrectInstanceState",
                "The instance 'i-0abc' is not in a state from which it can be started.",
            ),
        ),
        None,
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 48, "terminated")),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(&server, fast_wait());
    let err = provider.acquire(lease_for(&ids)).await.unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("i-0abc is terminated"), "{err}");
    assert!(err.to_string().contains("IncorrectInstanceState"), "{err}");
}

#[tokio::test]
async fn the_wait_for_a_transitional_state_is_bounded() {
    let server = MockServer::start().await;
    mount(
        &server,
        "StopInstances",
        xml(
            400,
            ec2_error_xml(
                "IncorrectInstanceState",
                "The instance 'i-0abc' is not in a state from which it can be stopped.",
            ),
        ),
        None,
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 0, "pending")),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(
        &server,
        Ec2WaitSettings {
            transition_timeout: Duration::from_millis(400),
            release_attempts: 1,
            ..fast_wait()
        },
    );
    let started = std::time::Instant::now();
    let err = provider.release(&lease_for(&ids)).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("could not stop EC2 instances i-0abc (pending)"),
        "{text}"
    );
    assert!(text.contains("still `pending`"), "{text}");
    // Backoff: far fewer polls than 400 ms / 50 ms would give without it.
    let polls = actions(&server)
        .await
        .iter()
        .filter(|a| *a == "DescribeInstances")
        .count();
    assert!(polls <= 7, "{polls} polls");
}

#[tokio::test]
async fn release_retries_transient_failures_and_logs_each() {
    let server = MockServer::start().await;
    let throttled = xml(
        503,
        ec2_error_xml("RequestLimitExceeded", "Request limit exceeded."),
    );
    // HttpPolicy::fast_for_tests: 1 + 3 HTTP attempts per release attempt.
    mount(&server, "StopInstances", throttled, Some(4)).await;
    mount(
        &server,
        "StopInstances",
        xml(
            200,
            state_change_xml("StopInstances", "i-0abc", (64, "stopping"), (16, "running")),
        ),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(&server, fast_wait());
    let logs = log_capture::Captured::default();
    let _guard = tracing::subscriber::set_default(logs.clone());

    provider.release(&lease_for(&ids)).await.unwrap();
    assert_eq!(actions(&server).await.len(), 5);
    let lines = logs.lines();
    let retried: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("stopping EC2 instances failed; retrying"))
        .collect();
    assert_eq!(retried.len(), 1, "{lines:#?}");
    assert!(retried[0].starts_with("WARN"), "{}", retried[0]);
    assert!(
        retried[0].contains("i-0abc") && retried[0].contains("RequestLimitExceeded"),
        "{}",
        retried[0]
    );
    assert!(!lines.iter().any(|l| l.contains(MOTO_SECRET_KEY)));
}

#[tokio::test]
async fn release_gives_up_after_bounded_retries_naming_the_instances() {
    let server = MockServer::start().await;
    mount(
        &server,
        "StopInstances",
        xml(
            503,
            ec2_error_xml("RequestLimitExceeded", "Request limit exceeded."),
        ),
        None,
    )
    .await;
    mount(
        &server,
        "DescribeInstances",
        xml(200, describe_xml("i-0abc", 16, "running")),
        None,
    )
    .await;
    let (provider, ids) = wiremock_provider(&server, fast_wait());
    let logs = log_capture::Captured::default();
    let _guard = tracing::subscriber::set_default(logs.clone());

    let err = provider.release(&lease_for(&ids)).await.unwrap_err();
    assert!(matches!(err, PortError::Transient(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(
            "could not stop EC2 instances i-0abc (running) in us-east-1 after 3 attempts"
        ),
        "{text}"
    );
    assert!(text.contains("RequestLimitExceeded"), "{text}");
    assert!(!format!("{err:?}").contains(MOTO_SECRET_KEY));
    let stops = actions(&server)
        .await
        .iter()
        .filter(|a| *a == "StopInstances")
        .count();
    assert_eq!(stops, 3 * 4, "3 release attempts of 4 HTTP attempts each");
    let lines = logs.lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("WARN") && l.contains("failed; retrying"))
            .count(),
        2,
        "{lines:#?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("ERROR") && l.contains("giving up") && l.contains("i-0abc"))
            .count(),
        1,
        "{lines:#?}"
    );
}

/// A minimal `tracing` subscriber recording events as `LEVEL field=value…`
/// lines (set per test with `set_default`; tokio tests run on one thread).
mod log_capture {
    use std::fmt::{self, Write as _};
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<String>>>);

    impl Captured {
        pub fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    impl Subscriber for Captured {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut line = Line(event.metadata().level().to_string());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}
