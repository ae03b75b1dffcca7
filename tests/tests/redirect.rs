//! Sinks never follow redirects: a receiver answering 307 or 308 must not make ketenbus
//! send the signed body (patient data) to the address it points at. The delivery fails
//! with reason `redirect` and is dead-lettered; the address pointed at gets nothing.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ketenbus_tests::{Broker, MEDLAB, Receiver, lineage_until};

/// A receiver that answers every POST with `status` and `Location: to`, counting them.
struct Redirector {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl Redirector {
    async fn start(status: u16, to: &str) -> Redirector {
        let hits = Arc::new(AtomicUsize::new(0));
        let (counter, to) = (Arc::clone(&hits), to.to_owned());
        let answer = move || {
            let (counter, to) = (Arc::clone(&counter), to.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut resp: Response = StatusCode::from_u16(status).unwrap().into_response();
                resp.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_str(&to).unwrap());
                resp
            }
        };
        let app = Router::new()
            .route("/", post(answer.clone()))
            .route("/{*path}", post(answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Redirector {
            url: format!("http://{addr}/hook"),
            hits,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_receiver_gets_a_dead_letter_and_the_target_gets_nothing() {
    // The address a redirect points at: it would answer 200 to anything.
    let target = Receiver::ok().await;
    let r307 = Redirector::start(307, &target.url()).await;
    let r308 = Redirector::start(308, &target.url()).await;
    let fhir307 = Redirector::start(307, &target.url()).await;
    let sub = |name: &str, sink: &str| {
        format!(
            "[[subscriptions]]\nname = \"{name}\"\nkinds = [\"lab_result\"]\nsink = {sink}\n[subscriptions.retry]\ninitial = \"50ms\"\nmax = \"200ms\"\n"
        )
    };
    let config = [
        sub(
            "hook-307",
            &format!(
                "{{ type = \"webhook\", url = \"{}\", secret_env = \"REDIRECT_TEST_SECRET\" }}",
                r307.url
            ),
        ),
        sub(
            "hook-308",
            &format!("{{ type = \"webhook\", url = \"{}\" }}", r308.url),
        ),
        sub(
            "fhirsink-307",
            &format!(
                "{{ type = \"fhir\", base_url = \"{}\", style = \"message\" }}",
                fhir307.url.trim_end_matches("/hook")
            ),
        ),
    ]
    .concat();
    let broker = Broker::start_with_env(&config, &[("REDIRECT_TEST_SECRET", "s3cret")]);
    let c = reqwest::Client::new();
    let id = broker
        .accept(&c, "application/EDIFACT", MEDLAB.as_bytes().to_vec())
        .await;

    let subs = ["hook-307", "hook-308", "fhirsink-307"];
    let l = lineage_until(&broker.url, &id, |l| {
        l["deliveries"].as_array().is_some_and(|d| {
            subs.iter().all(|s| {
                d.iter()
                    .any(|d| d["subscription"] == *s && d["outcome"] == "dead_lettered")
            })
        })
    })
    .await;
    let deliveries = l["deliveries"]
        .as_array()
        .unwrap_or_else(|| panic!("{l:#}"));
    for s in subs {
        let d = deliveries
            .iter()
            .find(|d| d["subscription"] == s)
            .unwrap_or_else(|| {
                panic!(
                    "no outcome for {s}: {l:#}\nbroker log:\n{}",
                    broker.log_text()
                )
            });
        assert_eq!(d["outcome"], "dead_lettered", "{s}: {l:#}");
        assert_eq!(d["reason"], "redirect", "{s}: {l:#}");
        assert!(
            l["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|st| st["subscription"] != s || st["outcome"] != "retrying"),
            "a redirect is not retried: {l:#}"
        );
    }
    for (name, r) in [("307", &r307), ("308", &r308), ("fhir 307", &fhir307)] {
        assert_eq!(
            r.hits.load(Ordering::SeqCst),
            1,
            "the {name} receiver was asked once"
        );
    }
    // Give a follower every chance: nothing reaches the address pointed at.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        target.received().is_empty(),
        "the redirect target received {} request(s)",
        target.received().len()
    );
    // The dead letters are there to replay once the receiver is fixed.
    let (ok, listed, err) = broker.cli(&["dlq", "list", "--subscription", "hook-307"]);
    assert!(ok, "{err}");
    assert!(listed.contains("redirect"), "{listed}");
    // ...and the metric says why, from its closed set.
    let metrics = broker.metrics().await;
    assert!(
        metrics.contains(
            r#"ketenbus_dispatch_dead_letters_total{reason="redirect",subscription="hook-308"} 1"#
        ),
        "{metrics}"
    );
}
