//! FHIR in and out through the running broker: the Nictiz ambulance -> GP post referral
//! (Acute Zorg message 24) posted to `/fhir/$process-message` reaches an acute-handover
//! webhook subscriber and a FHIR-endpoint subscriber within one second.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::time::{Duration, Instant};

use ketenbus_tests::{Broker, Receiver, webhook_subscription};

const REFERRAL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
));

#[tokio::test]
async fn an_ambulance_referral_reaches_webhook_and_fhir_subscribers_within_a_second() {
    let hook = Receiver::answering(204).await;
    let hap = Receiver::ok().await;
    let subs = format!(
        "{}\n[[subscriptions]]\nname = \"hap\"\nkinds = [\"acute_handover\"]\n\
         sink = {{ type = \"fhir\", base_url = \"http://{}/fhir\", style = \"message\" }}\n",
        webhook_subscription("seh-board", "\"acute_handover\"", &hook.url(), ""),
        hap.addr
    );
    let broker = Broker::start(&subs);
    let c = reqwest::Client::new();
    let sent = Instant::now();
    let resp = c
        .post(format!("{}/fhir/$process-message", broker.url))
        .header("content-type", "application/fhir+json")
        .body(REFERRAL)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(status == 200 || status == 202, "{status} {body:#}");

    let got = hook.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let hook_latency = got[0].at.duration_since(sent);
    let e: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(e["header"]["kind"], "acute_handover");
    assert_eq!(e["referral"]["code"]["code"], "11131000146102");
    assert!(
        !e["sections"].as_array().unwrap().is_empty(),
        "composition sections kept"
    );

    let got = hap.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let fhir_latency = got[0].at.duration_since(sent);
    assert_eq!(
        got[0]
            .header("content-type")
            .map(|c| c.starts_with("application/fhir+json")),
        Some(true)
    );
    let bundle: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "message");
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries[0]["resource"]["resourceType"], "MessageHeader");
    let sr = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "ServiceRequest")
        .expect("the referral goes out as a ServiceRequest");
    assert_eq!(
        sr["resource"]["code"]["coding"][0]["code"],
        "11131000146102"
    );
    // The ECG posted inline was kept in the content store and goes out inline again.
    let ecg = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "DocumentReference")
        .expect("the ECG goes out as a DocumentReference");
    assert_eq!(
        ecg["resource"]["content"][0]["attachment"]["data"], "JVBERi0xLjQK",
        "{ecg:#}"
    );

    eprintln!("delivered: webhook after {hook_latency:?}, FHIR endpoint after {fhir_latency:?}");
    assert!(
        hook_latency < Duration::from_secs(1),
        "webhook after {hook_latency:?}"
    );
    assert!(
        fhir_latency < Duration::from_secs(1),
        "FHIR endpoint after {fhir_latency:?}"
    );
}
