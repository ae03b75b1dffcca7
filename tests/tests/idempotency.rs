//! `Idempotency-Key` on the write routes: a sender that sends a message again with the same
//! key (sequentially, concurrently, after a restart of the broker) gets the first answer's id,
//! and the subscriber gets the message once.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::time::Duration;

use ketenbus_tests::{Broker, MEDLAB, Receiver, webhook_subscription};

const AZ: &str = include_str!(
    "../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
);

async fn post(
    c: &reqwest::Client,
    url: &str,
    media: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut req = c
        .post(url)
        .header("content-type", media)
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_again_with_its_idempotency_key_is_one_message() {
    let rx = Receiver::ok().await;
    let mut broker = Broker::start(&webhook_subscription("gp", "\"raw\"", &rx.url(), ""));
    let c = reqwest::Client::new();
    let api = format!("{}/api/v1/messages", broker.url);
    let lab_0042 = || {
        post(
            &c,
            &api,
            "application/EDIFACT",
            Some("lab-2611-0042"),
            MEDLAB,
        )
    };

    // Sequentially, then eight at once: one id, one delivery.
    let (status, first) = lab_0042().await;
    assert_eq!(status, 202);
    let (status, again) = lab_0042().await;
    assert_eq!((status, again.as_str()), (202, first.as_str()));
    let at_once: Vec<_> = (0..8)
        .map(|_| {
            let (c, api) = (c.clone(), api.clone());
            tokio::spawn(async move {
                post(
                    &c,
                    &api,
                    "application/EDIFACT",
                    Some("lab-2611-0043"),
                    MEDLAB,
                )
                .await
            })
        })
        .collect();
    let mut locations = Vec::new();
    for t in at_once {
        let (status, l) = t.await.unwrap();
        assert_eq!(status, 202);
        locations.push(l);
    }
    locations.dedup();
    assert_eq!(locations.len(), 1, "{locations:?}");
    assert_ne!(locations[0], first);

    // The same key with another message is refused; a malformed key too.
    let other = MEDLAB.replace("IC0042", "IC0099");
    let (status, _) = post(
        &c,
        &api,
        "application/EDIFACT",
        Some("lab-2611-0042"),
        &other,
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = post(&c, &api, "application/EDIFACT", Some("two words"), MEDLAB).await;
    assert_eq!(status, 400);
    // Without a key every post is a message of its own.
    let (_, a) = post(&c, &api, "application/EDIFACT", None, MEDLAB).await;
    let (_, b) = post(&c, &api, "application/EDIFACT", None, MEDLAB).await;
    assert_ne!(a, b);

    // The FHIR endpoints keep the same promise.
    let fhir = format!("{}/fhir/$process-message", broker.url);
    let (status, f1) = post(&c, &fhir, "application/fhir+json", Some("amb-7"), AZ).await;
    assert_eq!(status, 202);
    let (status, f2) = post(&c, &fhir, "application/fhir+json", Some("amb-7"), AZ).await;
    assert_eq!((status, f2.as_str()), (202, f1.as_str()));

    // Five messages in all, each delivered once.
    let got = rx.wait_for(5, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.received().len(), 5, "{}", broker.log_text());
    assert_eq!(got.len(), 5);

    // A restart keeps the keys.
    broker.kill();
    broker.spawn();
    let (status, after) = lab_0042().await;
    assert_eq!((status, after.as_str()), (202, first.as_str()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.received().len(), 5, "{}", broker.log_text());
}
