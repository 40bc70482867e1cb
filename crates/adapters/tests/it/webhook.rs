//! Webhook / Slack notifier: the URL (whose path is the credential) never
//! shows in a log line or an error, and a message is never re-POSTed blindly.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retrain_adapters::github::NotifyOn;
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::webhook::{WebhookFormat, WebhookNotifier};
use retrain_core::domain::{Label, PromotedVersion};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::{LabelReport, LabelStatus};
use secrecy::SecretString;
use tracing_subscriber::fmt::MakeWriter;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET_PATH: &str = "/services/T0SECRET/B0SECRET/XXXXSECRETXXXX";

fn report() -> LabelReport {
    let mut r = LabelReport::busy(Label::new("seg").unwrap(), 100, "x".into());
    r.status = LabelStatus::Promoted;
    r.error = None;
    r.promoted = Some(PromotedVersion {
        version: "7".into(),
        previous: Some("6".into()),
    });
    r
}

/// Everything the `fmt` subscriber writes, as production would format it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every secret-looking fragment of `url` that must never be shown.
fn assert_clean(what: &str, text: &str) {
    for secret in [
        "T0SECRET",
        "B0SECRET",
        "XXXXSECRETXXXX",
        "services/",
        "tok3n",
    ] {
        assert!(
            !text.contains(secret),
            "{what} shows `{secret}` of the webhook URL:\n{text}"
        );
    }
}

fn notifier(url: String, policy: HttpPolicy) -> WebhookNotifier {
    WebhookNotifier::with_policy(
        SecretString::from(url),
        WebhookFormat::Slack,
        NotifyOn::Always,
        policy,
    )
    .unwrap()
}

#[tokio::test]
async fn the_webhook_url_never_appears_in_logs_or_errors() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let policy = HttpPolicy {
        timeout: Duration::from_millis(1000),
        max_retries: 2,
        max_server_wait: Duration::from_secs(2),
        ..HttpPolicy::fast_for_tests()
    };
    let server = MockServer::start().await;
    let url = format!("{}{SECRET_PATH}?token=tok3n", server.uri());
    let mut errors = Vec::new();

    // 1. Rate limited again and again: retried (warning lines), then given up.
    Mock::given(method("POST"))
        .and(path(SECRET_PATH))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
        .mount(&server)
        .await;
    errors.push(
        notifier(url.clone(), policy.clone())
            .notify(&report())
            .await
            .unwrap_err(),
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    // 2. 503: a message is not re-POSTed blindly.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    errors.push(
        notifier(url.clone(), policy.clone())
            .notify(&report())
            .await
            .unwrap_err(),
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);

    // 3. The endpoint hangs past the timeout: not re-POSTed either.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .mount(&server)
        .await;
    errors.push(
        notifier(url.clone(), policy.clone())
            .notify(&report())
            .await
            .unwrap_err(),
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);

    // 4. Nothing listens: connection refused, retried (nothing was sent).
    let dead = format!("http://127.0.0.1:9{SECRET_PATH}?token=tok3n");
    errors.push(notifier(dead, policy).notify(&report()).await.unwrap_err());

    let logs = captured.text();
    assert!(
        logs.contains("retrying HTTP request") && logs.contains("not resending"),
        "the scenarios above log retries and refusals to resend:\n{logs}"
    );
    assert!(logs.contains("127.0.0.1"), "the host is shown:\n{logs}");
    assert_clean("a log line", &logs);
    for err in &errors {
        assert!(matches!(err, PortError::Transient(_)), "{err:?}");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        assert_clean("an error", &format!("{err} {err:?}"));
    }
    assert!(
        errors[0].to_string().contains("rate limited"),
        "{}",
        errors[0]
    );
    assert!(errors[2].to_string().contains("timed out"), "{}", errors[2]);
    assert!(errors[3].to_string().contains("gave up"), "{}", errors[3]);
}
