//! EC2 lease provider against `moto_server` (RETRAIN_TEST_MOTO_URL).

use std::collections::BTreeMap;
use std::time::Duration;

use retrain_adapters::aws::AwsSettings;
use retrain_adapters::ec2::{Ec2Client, Ec2LeaseProvider, Ec2WaitSettings, InstanceState};
use retrain_adapters::http::HttpPolicy;
use retrain_core::domain::{Label, Lease, RunId};
use retrain_core::ports::{LeaseProvider, PortError};
use secrecy::SecretString;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::service_url;

pub fn moto_settings(url: &str) -> AwsSettings {
    AwsSettings::new(
        "testing",
        SecretString::from("moto-secret-key"),
        "us-east-1",
    )
    .with_endpoint(url::Url::parse(url).unwrap())
}

fn fast_wait() -> Ec2WaitSettings {
    Ec2WaitSettings {
        poll_interval: Duration::from_millis(50),
        running_timeout: Duration::from_secs(10),
    }
}

/// A stopped instance created through a signed RunInstances call.
async fn stopped_instance(client: &Ec2Client) -> String {
    let xml = client
        .call(
            "RunInstances",
            &[
                ("ImageId".into(), "ami-12c6146b".into()),
                ("MinCount".into(), "1".into()),
                ("MaxCount".into(), "1".into()),
                ("InstanceType".into(), "t3.micro".into()),
            ],
        )
        .await
        .unwrap()
        .unwrap();
    let start = xml.find("<instanceId>").unwrap() + "<instanceId>".len();
    let end = start + xml[start..].find("</instanceId>").unwrap();
    let id = xml[start..end].to_owned();
    client
        .stop_instances(std::slice::from_ref(&id))
        .await
        .unwrap();
    id
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
    let Some(url) = service_url("RETRAIN_TEST_MOTO_URL") else {
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
    let Some(url) = service_url("RETRAIN_TEST_MOTO_URL") else {
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
    let Some(url) = service_url("RETRAIN_TEST_MOTO_URL") else {
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
    assert!(!format!("{err:?}").contains("moto-secret-key"));
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
    assert!(!err.to_string().contains("moto-secret-key"));
    assert!(!format!("{settings:?} {client:?}").contains("moto-secret-key"));
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
    let Some(url) = service_url("RETRAIN_TEST_MOTO_URL") else {
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
