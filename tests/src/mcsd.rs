//! The mCSD directory peer (`tests/mcsd/mcsd_peer.py`, written apart from the product code
//! from the FHIR R4 search / history interactions that IHE mCSD ITI-91 uses) and the
//! synthetic directory fixture, for the whole-system tests that resolve addresses through it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Broker;

/// The synthetic directory (`tests/fixtures/mcsd/directory.json`): a JSON list of
/// Organization, Endpoint, HealthcareService and Location resources.
pub const DIRECTORY: &str = include_str!("../fixtures/mcsd/directory.json");

/// A running directory peer; stopped when dropped.
#[derive(Debug)]
pub struct Peer {
    child: Option<Child>,
    /// Its loopback port.
    pub port: u16,
}

impl Peer {
    /// A peer over plain http on loopback, loaded with `resources` (a JSON list); its
    /// files go to `dir`.
    ///
    /// # Panics
    /// When python3 cannot run the peer or it does not listen.
    #[must_use]
    pub fn start(dir: &Path, resources: &Value) -> Peer {
        Peer::start_with(dir, resources, &[], &[])
    }

    /// With `tls` = [cert, key, client CA] files: mTLS only. `args`: more peer arguments.
    ///
    /// # Panics
    /// When python3 cannot run the peer or it does not listen.
    #[must_use]
    pub fn start_with(dir: &Path, resources: &Value, tls: &[&Path], args: &[&str]) -> Peer {
        let load = dir.join("directory.json");
        std::fs::write(&load, resources.to_string()).expect("write the directory");
        let port = crate::free_port();
        let python = std::env::var("KETENBUS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/mcsd/mcsd_peer.py"))
            .args(["--port", &port.to_string()])
            .arg("--load")
            .arg(&load)
            .args(
                tls.iter()
                    .zip(["--cert", "--key", "--client-ca"])
                    .flat_map(|(f, a)| [std::ffi::OsStr::new(a), f.as_os_str()]),
            )
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("peer.stderr")).expect("peer.stderr"))
            .spawn()
            .expect("python3 runs the mCSD peer");
        let addr = format!("127.0.0.1:{port}");
        crate::eventually_blocking(Duration::from_secs(60), "the mCSD peer to listen", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Peer {
            child: Some(child),
            port,
        }
    }

    /// Its base URL (http).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Store a new version of `resource`.
    ///
    /// # Panics
    /// When the peer does not take it.
    pub async fn put(&self, resource: &Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/_admin/put", self.url()))
            .body(resource.to_string())
            .send()
            .await
            .expect("the peer answers");
        assert!(r.status().is_success());
    }

    /// Answer 503 to every FHIR request (`true`), or not.
    ///
    /// # Panics
    /// When the peer does not answer.
    pub async fn down(&self, down: bool) {
        reqwest::Client::new()
            .post(format!("{}/_admin/down", self.url()))
            .body(if down { "1" } else { "0" })
            .send()
            .await
            .expect("the peer answers");
    }

    /// The FHIR requests it served (path and query).
    ///
    /// # Panics
    /// When the peer does not answer.
    pub async fn requests(&self) -> Vec<String> {
        reqwest::get(format!("{}/_admin/requests", self.url()))
            .await
            .expect("the peer answers")
            .json()
            .await
            .expect("a JSON list")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// The fixture with `ura:90000001`'s endpoints set: each `(endpoint id, address)` pair
/// replaces that endpoint's address.
///
/// # Panics
/// When the fixture is not a JSON list.
#[must_use]
pub fn directory(addresses: &[(&str, &str)]) -> Value {
    let mut all: Value = serde_json::from_str(DIRECTORY).expect("the fixture is JSON");
    for r in all.as_array_mut().expect("a list") {
        if let Some((_, a)) = addresses.iter().find(|(id, _)| r["id"] == *id) {
            r["address"] = json!(a);
        }
    }
    all
}

/// The resource with `id` in `all`.
///
/// # Panics
/// When there is none.
#[must_use]
pub fn resource(all: &Value, id: &str) -> Value {
    all.as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{id} is in the directory"))
}

/// An `[[mcsd]]` source named `test` reading `peer` every 300 ms, two resources a page.
#[must_use]
pub fn source(peer: &Peer) -> String {
    format!(
        "[[mcsd]]\nname = \"test\"\nbase_url = \"{}\"\npoll_interval = \"300ms\"\npage_size = 2\n",
        peer.url()
    )
}

/// Nictiz Acute Zorg example (CC0, synthetic patient): an ambulance referral. Its
/// MessageHeader gets a receiver from the synthetic directory fixture (ura:90000001).
const AZ_REFERRAL: &str = include_str!(
    "../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
);

/// The referral with its MessageHeader's receiver set to `ura`.
///
/// # Panics
/// Never: the example is JSON.
#[must_use]
pub fn referral_to(ura: &str) -> Vec<u8> {
    let mut b: Value = serde_json::from_str(AZ_REFERRAL).expect("the example is JSON");
    b["entry"][0]["resource"]["destination"][0]["receiver"] = json!({
        "identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": ura}
    });
    b.to_string().into_bytes()
}

/// Post the referral to `ura`; its message id.
///
/// # Panics
/// When the broker does not take it.
pub async fn post_referral(broker: &Broker, ura: &str) -> String {
    let (status, body) = crate::post_message(
        &reqwest::Client::new(),
        &broker.url,
        "application/fhir+json",
        referral_to(ura),
    )
    .await
    .expect("the broker answers");
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("an id").to_owned()
}

/// The detail of message `id`'s delivered step for `subscription`, once there is one.
///
/// # Panics
/// When there is none within 30 s.
pub async fn delivered_detail(broker: &Broker, id: &str, subscription: &str) -> String {
    let step = |l: &Value| {
        l["steps"]
            .as_array()?
            .iter()
            .find(|s| {
                s["stage"] == "delivery"
                    && s["subscription"] == subscription
                    && s["outcome"] == "delivered"
            })
            .map(|s| s["detail"].as_str().unwrap_or("").to_owned())
    };
    let l = crate::lineage_until(&broker.url, id, |l| step(l).is_some()).await;
    step(&l).unwrap_or_default()
}

/// The value of `metric{directory="test"<more>}` (-1 when absent).
pub async fn metric(broker: &Broker, name: &str, more: &str) -> f64 {
    let text = broker.metrics().await;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{directory=\"test\"{more}}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// Wait until the broker reports a successful sync.
pub async fn synced(broker: &Broker, what: &str) {
    broker
        .eventually(Duration::from_secs(20), what, async || {
            metric(
                broker,
                "ketenbus_dispatch_mcsd_last_sync_timestamp_seconds",
                "",
            )
            .await
                > 0.0
        })
        .await;
}
