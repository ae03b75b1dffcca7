//! EDIFACT partners who ask for it get a UN CONTRL back through a raw subscription filtered on
//! their party id, while the lab result itself goes to the lab subscriber.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::time::Duration;

use ketenbus_tests::{Broker, MEDLAB, Receiver, lineage, webhook_subscription};

#[tokio::test]
async fn a_partner_that_asked_gets_a_contrl_and_the_gp_the_result() {
    let gp = Receiver::answering(204).await;
    let partner = Receiver::answering(204).await;
    let config = format!(
        "\n[edifact]\ncontrl_partners = [\"mailbox:500001234\"]\n{}\n{}[subscriptions.filter]\nreceivers = [\"mailbox:500001234\"]\n",
        webhook_subscription("gp", "\"lab_result\"", &gp.url(), ""),
        webhook_subscription("lab-acks", "\"raw\"", &partner.url(), ""),
    );
    let broker = Broker::start(&config);
    let c = reqwest::Client::new();
    let id = broker
        .accept(&c, "application/EDIFACT", MEDLAB.as_bytes().to_vec())
        .await;

    let acks = partner.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(acks.len(), 1, "{}", broker.log_text());
    assert_eq!(acks[0].header("content-type"), Some("application/EDIFACT"));
    assert_eq!(
        acks[0].header("idempotency-key"),
        Some(format!("{id}.contrl").as_str())
    );
    let contrl = String::from_utf8_lossy(&acks[0].body);
    assert!(
        contrl.starts_with("UNB+UNOA:1+500005678+500001234+"),
        "from the receiver to the partner: {contrl}"
    );
    assert!(
        contrl.contains("UNH+") && contrl.contains("CONTRL"),
        "{contrl}"
    );
    assert!(
        contrl.contains("UCI+IC0042+500001234+500005678+7'"),
        "interchange accepted: {contrl}"
    );
    assert_eq!(gp.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        partner.received().len(),
        1,
        "the partner's subscription got only the CONTRL"
    );

    let l = lineage(&c, &broker.url, &id).await.unwrap();
    let step = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "acknowledge")
        .expect("acknowledge step");
    assert_eq!(step["record_id"], format!("{id}.contrl"));
    let ack = lineage(&c, &broker.url, &format!("{id}.contrl"))
        .await
        .unwrap();
    assert_eq!(ack["connector"], "contrl");
    assert_eq!(ack["receiver"], "mailbox:500001234");
}
