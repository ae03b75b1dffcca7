//! The address book from an mCSD directory, through real sockets: the broker replicates a
//! directory (`tests/mcsd/mcsd_peer.py`, written apart from the product code from the FHIR
//! R4 search / history interactions that IHE mCSD ITI-91 uses) and delivers each record to
//! the webhook endpoint its receiver's Organization lists; it follows changes made in the
//! directory, continues after a restart without loading everything again, and keeps
//! delivering from its replica while the directory is down.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::path::PathBuf;
use std::time::Duration;

use ketenbus_tests::ca::Ca;
use ketenbus_tests::mcsd::{
    Peer, delivered_detail, metric, post_referral as post, resource as endpoint, synced,
};
use ketenbus_tests::{Broker, Receiver};
use serde_json::{Value, json};

/// The fixture with `ura:90000001`'s webhook endpoint at `hook`.
fn directory(hook: &str) -> Value {
    ketenbus_tests::mcsd::directory(&[("ep-linde-hook", hook)])
}

/// Whether `address resolve <party> --channel <channel>` names `want`.
fn resolves_to(broker: &Broker, party: &str, channel: &str, want: &str) -> bool {
    let (_, out, _) = broker.cli(&["address", "resolve", party, "--channel", channel]);
    out.contains(want)
}

fn config(peer: &Peer) -> String {
    format!(
        "{}[[subscriptions]]\nname = \"by-directory\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\" }}\n\
         [subscriptions.retry]\ninitial = \"200ms\"\nmax = \"500ms\"\n",
        ketenbus_tests::mcsd::source(peer)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_follow_the_directory_across_changes_restarts_and_outages() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second, third) = (
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
    );
    let all = directory(&first.url());
    let peer = Peer::start(tmp.path(), &all);
    let mut broker = Broker::prepare(tmp.path(), &config(&peer));
    broker.spawn();

    // Initial load: paged searches, then the first delivery to the listed endpoint.
    synced(&broker, "the first sync").await;
    let searched = peer.requests().await;
    for t in ["Organization", "Endpoint", "HealthcareService", "Location"] {
        assert!(
            searched
                .iter()
                .any(|r| r.starts_with(&format!("/{t}?_count=2"))),
            "{searched:?}"
        );
    }
    assert!(
        searched.iter().any(|r| r.contains("_offset=")),
        "the next links were followed: {searched:?}"
    );
    let id = post(&broker, "90000001").await;
    let got = first.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "first: {}", broker.log_text());
    // The lineage says where the address came from, and nothing of the patient.
    let detail = delivered_detail(&broker, &id, "by-directory").await;
    assert_eq!(
        detail,
        "address from mcsd test: Organization/org-linde -> Endpoint/ep-linde-hook"
    );

    // An incremental change: the endpoint's address moves; the next delivery goes there.
    let mut moved = endpoint(&all, "ep-linde-hook");
    moved["address"] = json!(second.url());
    peer.put(&moved).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the change in the replica",
            async || {
                resolves_to(
                    &broker,
                    "ura:90000001",
                    "webhook",
                    &format!("webhook: {}", second.url()),
                )
            },
        )
        .await;
    assert!(
        peer.requests()
            .await
            .iter()
            .any(|r| r.starts_with("/Endpoint/_history?_since=")),
        "updates are read from the history"
    );
    post(&broker, "90000001").await;
    let got = second.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "second: {}", broker.log_text());

    // The endpoint's period ends and a successor starts: deliveries go to the successor.
    let mut ended = moved.clone();
    ended["period"] = json!({"start": "2020-01-01", "end": "2026-01-01"});
    let mut successor = moved.clone();
    successor["id"] = json!("ep-linde-hook-2");
    successor["address"] = json!(third.url());
    successor["period"] = json!({"start": "2026-01-01"});
    peer.put(&successor).await;
    peer.put(&ended).await;
    let mut org = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "org-linde")
        .unwrap()
        .clone();
    org["endpoint"]
        .as_array_mut()
        .unwrap()
        .push(json!({"reference": "Endpoint/ep-linde-hook-2"}));
    peer.put(&org).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the successor in the replica",
            async || {
                resolves_to(
                    &broker,
                    "ura:90000001",
                    "webhook",
                    &format!("webhook: {}", third.url()),
                )
            },
        )
        .await;
    post(&broker, "90000001").await;
    let got = third.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "third: {}", broker.log_text());
    assert_eq!(
        second.received().len(),
        1,
        "the ended endpoint got nothing more"
    );

    // `address resolve` says where a record goes and why the others were passed over.
    let (ok, out, err) =
        broker.cli(&["address", "resolve", "ura:90000001", "--channel", "webhook"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("webhook: {}", third.url()))
            && out.contains("from: mcsd test: Organization/org-linde -> Endpoint/ep-linde-hook-2")
            && out
                .contains("skipped in mcsd test: Endpoint/ep-linde-hook: period ended 2026-01-01"),
        "{out}"
    );
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:90000001", "--channel", "fhir"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("fhir: https://fhir.linde.example.test/r4")
            && out.contains("Endpoint/ep-linde-fhir-stu3: payloadMimeType"),
        "{out}"
    );
    // A switch of FHIR version: the R4 endpoint now states STU3 only; nothing fits.
    let mut stu3 = endpoint(&all, "ep-linde-fhir");
    stu3["payloadMimeType"] = json!(["application/fhir+json; fhirVersion=3.0"]);
    peer.put(&stu3).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the version switch in the replica",
            async || resolves_to(&broker, "ura:90000001", "fhir", "fhir: nothing fits"),
        )
        .await;
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:90000001", "--channel", "fhir"]);
    assert!(!ok, "nothing fits: {out}");
    assert!(
        out.contains("fhir: nothing fits")
            && out.contains("Endpoint/ep-linde-fhir: payloadMimeType"),
        "{out}"
    );
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:12345678"]);
    assert!(
        !ok && out.contains("no active Organization or HealthcareService"),
        "{out}"
    );

    // A restart continues with _since: no search without it.
    broker.kill();
    let before = peer.requests().await.len();
    broker.spawn();
    synced(&broker, "a sync after the restart").await;
    let after: Vec<String> = peer.requests().await[before..].to_vec();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|r| r.contains("/_history?_since=")),
        "a restart reads only the history: {after:?}"
    );

    // The directory is down: the failure is counted, deliveries use the replica.
    peer.down(true).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "a counted sync failure",
            async || {
                metric(
                    &broker,
                    "ketenbus_dispatch_mcsd_sync_outcomes_total",
                    ",outcome=\"failed\"",
                )
                .await
                    >= 1.0
            },
        )
        .await;
    // (A record delivered just before the kill may come again after the restart.)
    let seen = third.received().len();
    post(&broker, "90000001").await;
    let got = third.wait_for(seen + 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), seen + 1, "third: {}", broker.log_text());
    assert!(broker.log_text().contains("mcsd sync failed"));
    peer.down(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_read_over_mtls_and_a_client_without_its_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server_ca = Ca::new(tmp.path(), "directory-server");
    let client_ca = Ca::new(tmp.path(), "directory-clients");
    let rogue_ca = Ca::new(tmp.path(), "rogue");
    let (cert, key) = server_ca.issue("directory", true);
    let client = client_ca.issue("ketenbus-party", false);
    let rogue = rogue_ca.issue("ketenbus-rogue", false);
    let hook = Receiver::ok().await;
    let peer = Peer::start_with(
        tmp.path(),
        &directory(&hook.url()),
        &[&cert, &key, &client_ca.file()],
        &[],
    );
    let https = peer.url().replace("http://", "https://");
    let source = |name: &str, (c, k): &(PathBuf, PathBuf)| {
        format!(
            "[[mcsd]]\nname = \"{name}\"\nbase_url = \"{https}\"\ncert_file = {c:?}\nkey_file = {k:?}\n\
             ca_files = [{:?}]\npoll_interval = \"300ms\"\n",
            server_ca.file()
        )
    };
    let party = tmp.path().join("party");
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&party).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let mut good = Broker::prepare(
        &party,
        &format!(
            "{}[[subscriptions]]\nname = \"by-directory\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\" }}\n",
            source("test", &client)
        ),
    );
    good.spawn();
    synced(&good, "a sync over mTLS").await;
    post(&good, "90000001").await;
    let got = hook.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", good.log_text());

    let mut refused = Broker::prepare(&other, &source("test", &rogue));
    refused.spawn();
    refused
        .eventually(Duration::from_secs(20), "a refused sync", async || {
            metric(
                &refused,
                "ketenbus_dispatch_mcsd_sync_outcomes_total",
                ",outcome=\"failed\"",
            )
            .await
                >= 1.0
        })
        .await;
    assert!(
        metric(
            &refused,
            "ketenbus_dispatch_mcsd_last_sync_timestamp_seconds",
            ""
        )
        .await
            == 0.0
    );
    let (ok, out, _) = refused.cli(&["address", "resolve", "ura:90000001"]);
    assert!(!ok && out.contains("the replica is empty"), "{out}");
}

/// The referral's raw FHIR Bundle as the FHIR sink sent it: the receiver got the message.
fn got_the_referral(r: &Receiver, n: usize) -> bool {
    let got = r.received();
    got.len() == n
        && got.iter().all(|g| {
            serde_json::from_slice::<Value>(&g.body)
                .is_ok_and(|b| b["resourceType"] == "Bundle" && b["type"] == "message")
        })
}

/// `http://<receiver>/r4`: a receiver as a FHIR base URL.
fn fhir_base(r: &Receiver) -> String {
    format!("http://{}/r4", r.addr)
}

/// Once ura:90000001 resolves to `to`, a referral reaches it through `endpoint`.
async fn moves_to(broker: &Broker, to: &Receiver, endpoint: &str) {
    broker
        .eventually(
            Duration::from_secs(20),
            "the change in the replica",
            async || resolves_to(broker, "ura:90000001", "fhir", &fhir_base(to)),
        )
        .await;
    let detail = reaches(broker, "90000001", to).await;
    assert!(
        detail.ends_with(&format!("-> Endpoint/{endpoint}")),
        "{detail}"
    );
}

/// Post a referral to `ura`, see `to` get it; the detail of its delivered step.
async fn reaches(broker: &Broker, ura: &str, to: &Receiver) -> String {
    let id = post(broker, ura).await;
    to.wait_for(1, Duration::from_secs(20)).await;
    assert!(got_the_referral(to, 1), "{}", broker.log_text());
    delivered_detail(broker, &id, "by-directory-fhir").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fhir_sink_follows_the_directory_across_version_switches_and_period_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let (r4, stu3, upgraded, successor, listed, over) = (
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
    );
    let mut all = ketenbus_tests::mcsd::directory(&[
        ("ep-linde-fhir", &fhir_base(&r4)),
        ("ep-linde-fhir-stu3", &fhir_base(&stu3)),
    ]);
    // A second party, listed with an R4 endpoint and overridden in [address_book].
    let other_org = json!({"resourceType": "Organization", "id": "org-other",
        "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "90000004"}],
        "active": true, "name": "Wijkverpleging Oost (synthetisch)",
        "endpoint": [{"reference": "Endpoint/ep-other-fhir"}]});
    let mut other_ep = endpoint(&all, "ep-linde-fhir");
    other_ep["id"] = json!("ep-other-fhir");
    other_ep["address"] = json!(fhir_base(&listed));
    all.as_array_mut().unwrap().extend([other_org, other_ep]);
    let peer = Peer::start(tmp.path(), &all);
    let config = format!(
        "{}[address_book.\"ura:90000004\"]\nfhir = \"{}\"\n\
         [[subscriptions]]\nname = \"by-directory-fhir\"\nkinds = [\"raw\"]\nsink = {{ type = \"fhir\" }}\n\
         [subscriptions.retry]\ninitial = \"200ms\"\nmax = \"500ms\"\n",
        ketenbus_tests::mcsd::source(&peer),
        fhir_base(&over)
    );
    let mut broker = Broker::prepare(tmp.path(), &config);
    broker.spawn();
    synced(&broker, "the first sync").await;

    // The R4 endpoint (payloadMimeType fhirVersion=4.0), not the STU3 one, gets the record.
    assert_eq!(
        reaches(&broker, "90000001", &r4).await,
        "address from mcsd test: Organization/org-linde -> Endpoint/ep-linde-fhir"
    );

    // A switch of FHIR version: the old system now states STU3 only, the other one R4.
    let mut to_stu3 = endpoint(&all, "ep-linde-fhir");
    to_stu3["payloadMimeType"] = json!(["application/fhir+json; fhirVersion=3.0"]);
    let mut to_r4 = endpoint(&all, "ep-linde-fhir-stu3");
    to_r4["address"] = json!(fhir_base(&upgraded));
    to_r4["payloadMimeType"] = json!(["application/fhir+json; fhirVersion=4.0"]);
    peer.put(&to_stu3).await;
    peer.put(&to_r4).await;
    moves_to(&broker, &upgraded, "ep-linde-fhir-stu3").await;

    // Its period ends and a successor's starts: the successor gets the next record.
    let mut ended = to_r4.clone();
    ended["period"] = json!({"start": "2020-01-01", "end": "2026-01-01T00:00:00Z"});
    let mut next = to_r4.clone();
    next["id"] = json!("ep-linde-fhir-next");
    next["address"] = json!(fhir_base(&successor));
    next["period"] = json!({"start": "2026-01-01T00:00:00Z"});
    let mut org = endpoint(&all, "org-linde");
    org["endpoint"]
        .as_array_mut()
        .unwrap()
        .push(json!({"reference": "Endpoint/ep-linde-fhir-next"}));
    peer.put(&next).await;
    peer.put(&ended).await;
    peer.put(&org).await;
    moves_to(&broker, &successor, "ep-linde-fhir-next").await;

    // The [address_book] entry wins over the directory's endpoint.
    assert_eq!(
        reaches(&broker, "90000004", &over).await,
        "address from address_book override"
    );

    // Nobody else got anything.
    assert_eq!(
        (
            r4.received().len(),
            stu3.received().len(),
            upgraded.received().len(),
            listed.received().len()
        ),
        (1, 0, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_the_initial_load_keeps_a_replica_that_finishes_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // 3,000 synthetic organisations with an endpoint each, read ten at a time: the
    // broker writes page after page when it is killed.
    let peer = Peer::start_with(tmp.path(), &json!([]), &[], &["--synthetic", "3000"]);
    let config = format!(
        "[[mcsd]]\nname = \"test\"\nbase_url = \"{}\"\npoll_interval = \"300ms\"\npage_size = 10\n",
        peer.url()
    );
    let mut broker = Broker::prepare(tmp.path(), &config);
    broker.spawn();
    broker
        .eventually(Duration::from_secs(60), "the load under way", async || {
            peer.requests().await.len() >= 40
        })
        .await;
    broker.kill(); // SIGKILL
    let at_kill = peer.requests().await.len();
    assert!(
        at_kill < 300,
        "the Organizations were not all read: {at_kill} requests"
    );
    // Each page read was written as it came: the first organisations are in the replica
    // the kill left (their endpoints, read after them, not yet).
    let (_, out, err) = broker.cli(&["address", "resolve", "ura:70000000", "--channel", "fhir"]);
    assert!(
        out.contains("skipped in mcsd test: Endpoint/ep-syn-0: not in the replica"),
        "{out}{err}"
    );
    // The replica opens (not torn), and after a restart the load finishes.
    broker.spawn();
    synced(&broker, "the load finished after the restart").await;
    for (party, address) in [
        ("ura:70000000", "https://fhir-0.example.test/r4"),
        ("ura:70002999", "https://fhir-2999.example.test/r4"),
    ] {
        let (ok, out, err) = broker.cli(&["address", "resolve", party, "--channel", "fhir"]);
        assert!(
            ok && out.contains(&format!("fhir: {address}")),
            "{out}{err}"
        );
    }
}
