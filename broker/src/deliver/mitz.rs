//! Consent from Mitz, the national consent service (`[consent.mitz]`).
//!
//! Mitz cannot be asked what a patient consented to; a data holder asks a closed question
//! ("gesloten autorisatievraag"): may this requesting party have this category of data of
//! this patient, from this holder, for this purpose? The question is an XACML 3.0
//! `XACMLAuthzDecisionQuery` (SAML 2.0 profile of XACML, in a SOAP 1.2 envelope, as the
//! Mitz connector of the Nuts Knooppunt sends it) posted to
//! `<base_url>/geslotenautorisatievraag/xacml3`; the answer's `Decision` is `Permit`,
//! `Deny`, `NotApplicable` or `Indeterminate`.
//!
//! - Permit delivers, Deny withholds (`filtered` / `no_consent`), NotApplicable leaves it
//!   to the subscription's `default`. Indeterminate, a timeout, a refused connection or an
//!   HTTP error is "cannot answer now" ([`Unavailable`]): the lanes deliver on a default
//!   of `allow` and park the record for a retry (`consent_unavailable`) on `deny`.
//! - The patient is named to Mitz by BSN (the event's nl-core Patient identifier). The BSN
//!   lives only in the request body: never in a log line, an error, a metric label or the
//!   cache key (the cache is keyed by pseudonym).
//! - Answers are cached for `cache_time`, at most `cache_entries` of them. Questions about
//!   the same patient, party and purpose at the same time are one question to Mitz.
//! - Changes: Mitz takes a subscription per patient (its criteria name the patient:
//!   `Consent?_query=otv&patientid=<BSN>&providerid=<holder>&providertype=<type>`), so a
//!   patient is subscribed to the first time ketenbus asks about them, and again after
//!   `subscription_renew`; who was subscribed to when is kept in
//!   `<data_dir>/mitz-subscriptions.db` by pseudonym, never BSN, so a restart does not
//!   subscribe again (a BSN cannot be had from the pseudonym, so the file cannot renew on
//!   its own: renewal waits for the next question about the patient). The rest-hook channel points at `notify_url` with an
//!   `Authorization: Bearer` header Mitz sends back (FHIR R4 `Subscription.channel.header`);
//!   a notification with that header drops the cached answers of the patient it names.
//! - Every question and its answer is an audit record (`consent_question:<answer>`, with
//!   pseudonym, party and purpose; never the BSN).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketenbus_schemas::event::{Identifier, systems};
use serde::Deserialize;

use crate::env::{Env, Problem};
use crate::observe::audit::{Audit, Entry};
use crate::observe::metrics;
use crate::route::keys::PatientKeyer;

/// Path of the closed question under `base_url`.
pub const QUESTION_PATH: &str = "/geslotenautorisatievraag/xacml3";
/// Path of the subscription endpoint under `base_url`.
pub const SUBSCRIPTION_PATH: &str = "/abonnementen/fhir/Subscription";
/// Where ketenbus takes Mitz's notifications (the path of `notify_url`).
pub const NOTIFY_PATH: &str = "/consent/mitz/notify";
/// Fewest bytes the notification secret may have.
pub const MIN_SECRET_BYTES: usize = 32;

/// HL7 root OID of the BSN.
const BSN_ROOT: &str = "2.16.840.1.113883.2.4.6.3";
/// HL7 root OID of the URA (care provider register).
const URA_ROOT: &str = "2.16.528.1.1007.3.3";
/// HL7 root OID of the AGB code.
const AGB_ROOT: &str = "2.16.840.1.113883.2.4.6.1";
/// Code system of the provider (healthcare facility) type.
const FACILITY_TYPE_SYSTEM: &str = "2.16.840.1.113883.2.4.15.1060";
/// Code system of Mitz's data categories (gegevenscategorie).
const CATEGORY_SYSTEM: &str = "2.16.840.1.113883.2.4.3.111.5.10.1";
/// Code system of the purpose of use (HL7 v3 PurposeOfUse).
const PURPOSE_SYSTEM: &str = "2.16.840.1.113883.1.11.20448";

/// `[consent.mitz]`: ask Mitz for consent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MitzConfig {
    /// Base URL of Mitz (e.g. `https://api.mijn-mitz.nl`); the question goes to
    /// `/geslotenautorisatievraag/xacml3` under it, subscriptions to
    /// `/abonnementen/fhir/Subscription`. https; plain http only to loopback.
    pub base_url: String,
    /// Client certificate (PEM, leaf first, then its chain): the party certificate the Mitz
    /// operator allows (PKIoverheid / UZI server certificate).
    pub cert_file: PathBuf,
    /// Private key of `cert_file` (PEM, unencrypted).
    pub key_file: PathBuf,
    /// Trust anchors for Mitz's server certificate (PEM files, e.g. the PKIoverheid roots
    /// the operator provides). Only these are trusted, not the system's roots.
    pub ca_files: Vec<PathBuf>,
    /// The holder's own provider id as Mitz knows it (URA number; `ura:` prefix allowed).
    pub provider_id: String,
    /// The holder's provider type (healthcare facility type code as Mitz uses it, e.g.
    /// `Z3` for a general practice).
    pub provider_type: String,
    /// Data category asked about (Mitz gegevenscategorie code; default `GGC002`,
    /// Behandelgegevens).
    #[serde(default = "default_category")]
    pub data_category: String,
    /// Provider type of requesting (receiving) parties, by party id
    /// (`"ura:12345678" = "Z3"`); a party not listed is asked about without a type.
    #[serde(default)]
    pub party_types: BTreeMap<String, String>,
    /// How long an answer is used without asking again (default `5m`); a change
    /// notification drops it sooner.
    #[serde(default = "default_cache_time", with = "humantime_serde")]
    pub cache_time: Duration,
    /// Most answers kept (default 10000); the oldest go first.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Longest wait for Mitz per request (default `5s`); longer counts as unavailable.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// URL at which Mitz reaches ketenbus's notification endpoint
    /// (`https://ketenbus.example.nl/consent/mitz/notify`). Without it ketenbus does not
    /// subscribe and relies on `cache_time` alone.
    #[serde(default)]
    pub notify_url: Option<String>,
    /// Environment variable with the secret (at least 32 bytes) Mitz sends back on each
    /// notification as `Authorization: Bearer <secret>`; default
    /// `KETENBUS_MITZ_NOTIFY_SECRET`. Needed with `notify_url`.
    #[serde(default = "default_secret_env")]
    pub notify_secret_env: String,
    /// Subscribe a patient again after this long (default `24h`).
    #[serde(default = "default_renew", with = "humantime_serde")]
    pub subscription_renew: Duration,
}

fn default_category() -> String {
    "GGC002".into()
}
fn default_cache_time() -> Duration {
    Duration::from_secs(300)
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_secret_env() -> String {
    "KETENBUS_MITZ_NOTIFY_SECRET".into()
}
fn default_renew() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Why the Mitz registry cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MitzError {
    /// A certificate, key or trust anchor file.
    #[error("consent.mitz.{key}: {message}")]
    File {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A URL or setting.
    #[error("consent.mitz.{key}: {message}")]
    Setting {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl MitzError {
    /// Without its registry the broker cannot check consent: it does not start.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Fatal
    }
}

/// Why a notification was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// No `notify_url` configured: ketenbus made no subscriptions.
    #[error("consent change notifications are not configured")]
    NotConfigured,
    /// Missing or wrong `Authorization` header.
    #[error("notification without the configured secret")]
    Unauthorized,
}

/// An https URL, or plain http to loopback only.
pub(crate) fn base_url(url: &str) -> Result<reqwest::Url, String> {
    crate::deliver::sink::endpoint_url(url.trim_end_matches('/'), false).map_err(|m| {
        if m.starts_with("plain http") {
            "plain http to a non-loopback host: use https (plain http only to loopback)".into()
        } else {
            m
        }
    })
}

impl MitzConfig {
    /// Every problem in `[consent.mitz]`: URLs, files that cannot be read, the secret.
    #[must_use]
    pub fn problems(&self, env: &Env) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Err(m) = base_url(&self.base_url) {
            out.push(("base_url".to_owned(), m));
        }
        if let Err(e) = self.client() {
            out.push((
                match &e {
                    MitzError::File { key, .. } | MitzError::Setting { key, .. } => {
                        (*key).to_owned()
                    }
                },
                match e {
                    MitzError::File { message, .. } | MitzError::Setting { message, .. } => message,
                },
            ));
        }
        if self.ca_files.is_empty() {
            out.push((
                "ca_files".to_owned(),
                "name at least one trust anchor file (PEM)".to_owned(),
            ));
        }
        for (key, value) in [
            ("provider_id", &self.provider_id),
            ("provider_type", &self.provider_type),
            ("data_category", &self.data_category),
        ] {
            if value.trim().is_empty() || value.contains(['&', '<', '>', '"']) {
                out.push((key.to_owned(), "must be a plain code or number".to_owned()));
            }
        }
        if self.cache_entries == 0 {
            out.push(("cache_entries".to_owned(), "must be at least 1".to_owned()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".to_owned(), "must be more than 0".to_owned()));
        }
        if let Some(url) = &self.notify_url {
            if let Err(m) = base_url(url) {
                out.push(("notify_url".to_owned(), m));
            }
            match env.var(&self.notify_secret_env) {
                None => out.push((
                    "notify_secret_env".to_owned(),
                    format!("environment variable {} is not set", self.notify_secret_env),
                )),
                Some(v) if v.len() < MIN_SECRET_BYTES => out.push((
                    "notify_secret_env".to_owned(),
                    format!(
                        "environment variable {} holds fewer than {MIN_SECRET_BYTES} bytes",
                        self.notify_secret_env
                    ),
                )),
                Some(_) => {}
            }
        }
        Problem::under("consent.mitz", out)
    }

    /// The mTLS client: the party certificate, only the configured trust anchors.
    fn client(&self) -> Result<reqwest::Client, MitzError> {
        mtls_client(
            Some((&self.cert_file, &self.key_file)),
            &self.ca_files,
            self.timeout,
        )
    }
}

/// An HTTP client for a party service (Mitz, an mCSD directory): the party certificate
/// and key from files when given, and when `ca_files` are given only those trust anchors
/// (not the system's roots). Errors name the config key (`cert_file`, `key_file`,
/// `ca_files`).
///
/// # Errors
/// A file cannot be read or is not PEM of the right kind, or the client cannot be built.
pub fn mtls_client(
    identity: Option<(&PathBuf, &PathBuf)>,
    ca_files: &[PathBuf],
    timeout: Duration,
) -> Result<reqwest::Client, MitzError> {
    let read = |key: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| MitzError::File {
            key,
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some((cert_file, key_file)) = identity {
        let mut pem = read("cert_file", cert_file)?;
        pem.push(b'\n');
        pem.extend(read("key_file", key_file)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| MitzError::File {
            key: "key_file",
            message: format!(
                "{} and {} are not a PEM certificate and its key: {e}",
                cert_file.display(),
                key_file.display()
            ),
        })?;
        b = b.identity(identity);
    }
    if !ca_files.is_empty() {
        b = b.tls_built_in_root_certs(false);
    }
    for path in ca_files {
        let certs = crate::tls::read_certs("ca_files", path).map_err(|e| MitzError::File {
            key: "ca_files",
            message: e.to_string().trim_start_matches("ca_files: ").to_owned(),
        })?;
        for der in certs {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| MitzError::File {
                key: "ca_files",
                message: format!("{}: {e}", path.display()),
            })?;
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| MitzError::Setting {
        key: "cert_file",
        message: format!("the TLS client cannot be built: {e}"),
    })
}

/// Escape text for an XML attribute value.
fn xml_attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A party id `scheme:value` as an HL7 instance identifier (root OID, extension).
fn party_ii(party: &str) -> (&'static str, &str) {
    match party.split_once(':') {
        Some(("agb", v)) => (AGB_ROOT, v),
        Some(("ura", v)) => (URA_ROOT, v),
        Some((_, v)) => (URA_ROOT, v),
        None => (URA_ROOT, party),
    }
}

/// The purpose of use code Mitz takes for a subscription's purpose.
fn purpose_code(purpose: &str) -> String {
    match purpose {
        "treatment" => "TREAT".into(),
        other => other.to_ascii_uppercase(),
    }
}

fn ii_attribute(id: &str, root: &str, extension: &str) -> String {
    format!(
        "<Attribute AttributeId=\"{id}\" IncludeInResult=\"true\"><AttributeValue DataType=\"urn:hl7-org:v3#II\"><InstanceIdentifier xmlns=\"urn:hl7-org:v3\" root=\"{root}\" extension=\"{}\"/></AttributeValue></Attribute>",
        xml_attr(extension)
    )
}

fn cv_attribute(id: &str, code: &str, system: &str) -> String {
    format!(
        "<Attribute AttributeId=\"{id}\" IncludeInResult=\"true\"><AttributeValue DataType=\"urn:hl7-org:v3#CV\"><CodedValue xmlns=\"urn:hl7-org:v3\" code=\"{}\" codeSystem=\"{system}\"/></AttributeValue></Attribute>",
        xml_attr(code)
    )
}

/// The closed question as a SOAP 1.2 envelope around an XACML 3.0 request: resource (the
/// patient's BSN, the holder and its type), action (the data category), subject (the
/// requesting party and its type), environment (the purpose of use).
fn question_xml(cfg: &MitzConfig, bsn: &str, party: &str, purpose: &str) -> String {
    let (party_root, party_ext) = party_ii(party);
    let holder = cfg.provider_id.trim_start_matches("ura:");
    let party_type = cfg
        .party_types
        .get(party)
        .map(|t| {
            cv_attribute(
                "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code",
                t,
                FACILITY_TYPE_SYSTEM,
            )
        })
        .unwrap_or_default();
    let message_id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
            "<soap:Envelope xmlns:soap=\"http://www.w3.org/2003/05/soap-envelope\" xmlns:wsa=\"http://www.w3.org/2005/08/addressing\" xmlns:xacml-samlp=\"urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14\">",
            "<soap:Header><wsa:Action>XACMLAuthorizationDecisionQueryRequest</wsa:Action><wsa:MessageID>urn:uuid:{id}</wsa:MessageID></soap:Header>",
            "<soap:Body><xacml-samlp:XACMLAuthzDecisionQuery>",
            "<Request xmlns=\"urn:oasis:names:tc:xacml:3.0:core:schema:wd-17\" CombinedDecision=\"false\" ReturnPolicyIdList=\"false\">",
            "<Attributes Category=\"urn:oasis:names:tc:xacml:3.0:attribute-category:resource\">{bsn}{holder_type}{holder}</Attributes>",
            "<Attributes Category=\"urn:oasis:names:tc:xacml:3.0:attribute-category:action\">{category}</Attributes>",
            "<Attributes Category=\"urn:oasis:names:tc:xacml:1.0:subject-category:access-subject\">{party}{party_type}</Attributes>",
            "<Attributes Category=\"urn:oasis:names:tc:xacml:3.0:attribute-category:environment\">{purpose}</Attributes>",
            "</Request></xacml-samlp:XACMLAuthzDecisionQuery></soap:Body></soap:Envelope>"
        ),
        id = message_id,
        bsn = ii_attribute(
            "urn:oasis:names:tc:xacml:2.0:resource:resource-id",
            BSN_ROOT,
            bsn
        ),
        holder_type = cv_attribute(
            "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code",
            &cfg.provider_type,
            FACILITY_TYPE_SYSTEM
        ),
        holder = ii_attribute(
            "urn:ihe:iti:appc:2016:author-institution:id",
            URA_ROOT,
            holder
        ),
        category = cv_attribute(
            "urn:ihe:iti:appc:2016:document-entry:event-code",
            &cfg.data_category,
            CATEGORY_SYSTEM
        ),
        party = ii_attribute(
            "urn:nl:otv:names:tc:1.0:subject:provider-institution",
            party_root,
            party_ext
        ),
        party_type = party_type,
        purpose = cv_attribute(
            "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
            &purpose_code(purpose),
            PURPOSE_SYSTEM
        ),
    )
}

/// Mitz's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The patient allows it.
    Permit,
    /// The patient objects.
    Deny,
    /// Nothing recorded that applies.
    NotApplicable,
    /// Mitz could not decide.
    Indeterminate,
}

impl Decision {
    /// The metric and audit name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Permit => "permit",
            Decision::Deny => "deny",
            Decision::NotApplicable => "not_applicable",
            Decision::Indeterminate => "indeterminate",
        }
    }
}

/// The `Decision` of an XACML response (with or without a namespace prefix), if it holds
/// exactly one known value.
#[must_use]
pub fn parse_decision(body: &str) -> Option<Decision> {
    let mut rest = body;
    while let Some(i) = rest.find("Decision") {
        let before = &rest[..i];
        let after = &rest[i + "Decision".len()..];
        rest = after;
        // An opening tag: `<Decision>` or `<prefix:Decision>` (not `</…Decision>`).
        let tag_start = before.rfind('<');
        let opening = tag_start.is_some_and(|s| {
            let name = &before[s + 1..];
            !name.starts_with('/')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '-' || c == '_')
                && (name.is_empty() || name.ends_with(':'))
        });
        let Some(after) = after.strip_prefix('>').filter(|_| opening) else {
            continue;
        };
        let text = after.split('<').next().unwrap_or("").trim();
        return match text {
            "Permit" => Some(Decision::Permit),
            "Deny" => Some(Decision::Deny),
            "NotApplicable" => Some(Decision::NotApplicable),
            "Indeterminate" => Some(Decision::Indeterminate),
            _ => None,
        };
    }
    None
}

/// The R4 Subscription for one patient's consent changes.
fn subscription_json(cfg: &MitzConfig, bsn: &str, notify_url: &str, secret: &str) -> String {
    let criteria = format!(
        "Consent?_query=otv&patientid={bsn}&providerid={}&providertype={}",
        cfg.provider_id.trim_start_matches("ura:"),
        cfg.provider_type
    );
    serde_json::json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "OTV",
        "criteria": criteria,
        "channel": {
            "type": "rest-hook",
            "endpoint": notify_url,
            "payload": "application/fhir+json",
            "header": [format!("Authorization: Bearer {secret}")],
        },
    })
    .to_string()
}

type CacheKey = (String, String, String);

/// Answers and subscriptions, both keyed by pseudonym, both bounded.
#[derive(Default)]
struct Cache {
    answers: HashMap<CacheKey, (Decision, Instant)>,
    subscribed: HashMap<String, Instant>,
}

/// Keep at most `cap` entries of `map`: the expired first, then the oldest.
fn bound<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    at: impl Fn(&V) -> Instant,
    fresh: impl Fn(&V) -> bool,
) {
    if map.len() < cap {
        return;
    }
    map.retain(|_, v| fresh(v));
    while map.len() >= cap {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| at(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

/// A consent registry that asks Mitz.
pub struct MitzRegistry {
    cfg: MitzConfig,
    client: reqwest::Client,
    question_url: reqwest::Url,
    subscription_url: reqwest::Url,
    keyer: PatientKeyer,
    audit: Option<Audit>,
    notify: Option<(String, String)>,
    cache: Arc<Mutex<Cache>>,
    asking: Mutex<HashMap<CacheKey, Arc<Asking>>>,
    kept: Option<Arc<Kept>>,
}

impl std::fmt::Debug for MitzRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MitzRegistry")
            .field("base_url", &self.cfg.base_url)
            .finish_non_exhaustive()
    }
}

/// Mitz cannot answer now; the text names what went wrong, never the request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("mitz: {0}")]
pub struct Unavailable(pub String);

fn unavailable(what: impl std::fmt::Display) -> Unavailable {
    Unavailable(what.to_string())
}

fn request_error(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused or tls handshake failed"
    } else {
        "request failed"
    }
}

impl MitzRegistry {
    /// Build the mTLS client and the registry; `keyer` maps a notification's BSN to the
    /// pseudonym the cache is keyed by; `audit` records every question.
    ///
    /// # Errors
    /// A URL, file or the secret is not usable (`ketenbus check-config` names it first).
    pub fn new(
        cfg: &MitzConfig,
        keyer: PatientKeyer,
        audit: Option<Audit>,
        env: &Env,
    ) -> Result<MitzRegistry, MitzError> {
        let setting = |key, message| MitzError::Setting { key, message };
        let base = base_url(&cfg.base_url).map_err(|m| setting("base_url", m))?;
        let join = |path: &str| {
            reqwest::Url::parse(&format!("{}{path}", base.as_str().trim_end_matches('/')))
                .map_err(|e| setting("base_url", e.to_string()))
        };
        let notify = match &cfg.notify_url {
            Some(url) => {
                base_url(url).map_err(|m| setting("notify_url", m))?;
                let secret = env
                    .var(&cfg.notify_secret_env)
                    .filter(|s| s.len() >= MIN_SECRET_BYTES)
                    .ok_or_else(|| {
                        setting(
                            "notify_secret_env",
                            format!(
                                "environment variable {} is not set or holds fewer than {MIN_SECRET_BYTES} bytes",
                                cfg.notify_secret_env
                            ),
                        )
                    })?;
                Some((url.clone(), secret))
            }
            None => None,
        };
        Ok(MitzRegistry {
            client: cfg.client()?,
            question_url: join(QUESTION_PATH)?,
            subscription_url: join(SUBSCRIPTION_PATH)?,
            cfg: cfg.clone(),
            keyer,
            audit,
            notify,
            cache: Arc::new(Mutex::new(Cache::default())),
            asking: Mutex::new(HashMap::new()),
            kept: None,
        })
    }

    /// Keep the patients subscribed to in `data_dir` (see [`Kept`]), and take in those a
    /// previous run subscribed to within `subscription_renew`.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub fn keep_subscriptions(mut self, data_dir: &std::path::Path) -> Result<Self, MitzError> {
        let err = |e: rusqlite::Error| MitzError::File {
            key: "data_dir",
            message: format!("{}: {e}", data_dir.join("mitz-subscriptions.db").display()),
        };
        let kept = Kept::open(data_dir).map_err(err)?;
        let recent = kept
            .recent(self.cfg.subscription_renew, self.cfg.cache_entries)
            .map_err(err)?;
        {
            let mut cache = self.cache();
            let now = Instant::now();
            for (patient, age) in recent {
                cache
                    .subscribed
                    .insert(patient, now.checked_sub(age).unwrap_or(now));
            }
        }
        self.kept = Some(Arc::new(kept));
        Ok(self)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ask Mitz the closed question.
    async fn ask(&self, bsn: &str, party: &str, purpose: &str) -> Result<Decision, Unavailable> {
        let body = question_xml(&self.cfg, bsn, party, purpose);
        let resp = self
            .client
            .post(self.question_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/soap+xml; charset=utf-8",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| unavailable(request_error(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(unavailable(format_args!("http_{}", status.as_u16())));
        }
        let text = resp
            .text()
            .await
            .map_err(|e| unavailable(request_error(&e)))?;
        parse_decision(&text).ok_or_else(|| unavailable("an answer without a known Decision"))
    }

    async fn audit(&self, q: &Question<'_>, answer: &str) -> Result<(), Unavailable> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        audit
            .append(vec![Entry {
                action: format!("consent_question:{answer}"),
                actor: "consent:mitz".into(),
                party: Some(q.party.to_owned()),
                patient: Some(q.patient.to_owned()),
                event_id: None,
                envelope_id: None,
                purpose: Some(q.purpose.to_owned()),
            }])
            .await
            .map_err(|e| Unavailable(format!("the audit trail cannot record the question: {e}")))
    }

    /// Subscribe the patient to consent changes unless done within `subscription_renew`;
    /// in the background, so the delivery does not wait for it.
    fn subscribe(&self, pseudonym: &str, bsn: &str) {
        let Some((url, secret)) = &self.notify else {
            return;
        };
        {
            let mut cache = self.cache();
            let renew = self.cfg.subscription_renew;
            if cache
                .subscribed
                .get(pseudonym)
                .is_some_and(|at| at.elapsed() < renew)
            {
                return;
            }
            bound(
                &mut cache.subscribed,
                self.cfg.cache_entries,
                |at| *at,
                |at| at.elapsed() < renew,
            );
            cache
                .subscribed
                .insert(pseudonym.to_owned(), Instant::now());
        }
        let body = subscription_json(&self.cfg, bsn, url, secret);
        let request = self
            .client
            .post(self.subscription_url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .body(body);
        let (cache, pseudonym) = (Arc::clone(&self.cache), pseudonym.to_owned());
        let kept = self.kept.clone();
        tokio::spawn(async move {
            match request.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!("subscribed to a patient's consent changes at mitz");
                    if let Some(k) = kept {
                        k.keep(&pseudonym);
                    }
                    return;
                }
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    "mitz refused a consent subscription; tried again at the next question"
                ),
                Err(e) => tracing::warn!(
                    error = request_error(&e),
                    "a consent subscription did not reach mitz; tried again at the next question"
                ),
            }
            // Not subscribed: the next question about the patient subscribes again, and
            // until then answers live for cache_time only.
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .subscribed
                .remove(&pseudonym);
        });
    }

    /// Take a change notification: check its `Authorization` header, then drop the cached
    /// answers of every patient its bundle names (by BSN), or of every patient when it names
    /// none. Answers how many were dropped.
    ///
    /// # Errors
    /// Without `notify_url`, or without the configured secret.
    pub fn notified(&self, authorization: Option<&str>, body: &[u8]) -> Result<usize, NotifyError> {
        use subtle::ConstantTimeEq;
        let Some((_, secret)) = &self.notify else {
            return Err(NotifyError::NotConfigured);
        };
        let given = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
            return Err(NotifyError::Unauthorized);
        }
        let patients: Vec<String> = notified_bsns(body)
            .into_iter()
            .map(|bsn| {
                self.keyer.key_of(&Identifier {
                    system: systems::BSN.into(),
                    value: bsn,
                })
            })
            .collect();
        let mut cache = self.cache();
        let before = cache.answers.len();
        if patients.is_empty() {
            cache.answers.clear();
        } else {
            cache.answers.retain(|(p, _, _), _| !patients.contains(p));
        }
        let dropped = before - cache.answers.len();
        tracing::info!(
            patients = patients.len(),
            dropped,
            "mitz consent change notification: cached answers dropped"
        );
        Ok(dropped)
    }
}

/// The BSNs of the Patient resources in a notification bundle (FHIR JSON).
fn notified_bsns(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in v["entry"].as_array().into_iter().flatten() {
        let r = &entry["resource"];
        if r["resourceType"] != "Patient" {
            continue;
        }
        for id in r["identifier"].as_array().into_iter().flatten() {
            if id["system"] == systems::BSN
                && let Some(value) = id["value"].as_str()
            {
                out.push(value.to_owned());
            }
        }
    }
    out
}

/// One closed question: the patient by pseudonym (the cache key) and by BSN (for Mitz only).
#[derive(Clone, Copy)]
pub struct Question<'a> {
    /// Patient pseudonym (the patient key).
    pub patient: &'a str,
    /// The patient's BSN; never printed.
    pub bsn: &'a str,
    /// Requesting (receiving) party id.
    pub party: &'a str,
    /// Purpose of the exchange.
    pub purpose: &'a str,
}

impl std::fmt::Debug for Question<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Question")
            .field("patient", &self.patient)
            .field("party", &self.party)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

impl MitzRegistry {
    /// Mitz's decision for `q`: from the cache while fresh, else asked (and audited, and
    /// the patient subscribed to). Permit, Deny or NotApplicable.
    ///
    /// # Errors
    /// Mitz cannot answer now: unreachable, slow, an HTTP error, an answer without a known
    /// decision, Indeterminate; or the audit trail cannot record the question.
    pub async fn decide(&self, q: Question<'_>) -> Result<Decision, Unavailable> {
        let key: CacheKey = (
            q.patient.to_owned(),
            q.party.to_owned(),
            q.purpose.to_owned(),
        );
        let ttl = self.cfg.cache_time;
        if let Some((decision, at)) = self.cache().answers.get(&key)
            && at.elapsed() < ttl
        {
            return Ok(*decision);
        }
        // Questions about the same patient, party and purpose at the same time (two
        // subscriptions to one receiver) are one question to Mitz: the first asks, the
        // others wait for its answer.
        let cell = Arc::clone(self.asking().entry(key.clone()).or_default());
        let answer = cell
            .get_or_init(|| self.ask_and_keep(q, &key))
            .await
            .clone();
        let mut asking = self.asking();
        if asking.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            asking.remove(&key);
        }
        answer
    }

    fn asking(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<Asking>>> {
        self.asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ask, count, audit, cache and subscribe: one question to Mitz.
    async fn ask_and_keep(&self, q: Question<'_>, key: &CacheKey) -> Result<Decision, Unavailable> {
        let ttl = self.cfg.cache_time;
        let decision = self.ask(q.bsn, q.party, q.purpose).await;
        let name = decision.as_ref().map_or("unavailable", |d| d.as_str());
        metrics::consent_question(name);
        self.audit(&q, name).await?;
        let decision = decision?;
        if decision == Decision::Indeterminate {
            return Err(unavailable("indeterminate"));
        }
        {
            let mut cache = self.cache();
            bound(
                &mut cache.answers,
                self.cfg.cache_entries,
                |(_, at)| *at,
                |(_, at)| at.elapsed() < ttl,
            );
            cache
                .answers
                .insert(key.clone(), (decision, Instant::now()));
        }
        self.subscribe(q.patient, q.bsn);
        Ok(decision)
    }
}

/// One question under way: its answer, once there is one, for everyone waiting on it.
type Asking = tokio::sync::OnceCell<Result<Decision, Unavailable>>;

/// The patients subscribed to, kept across restarts in `<data_dir>/mitz-subscriptions.db`:
/// by pseudonym (the patient key, a keyed hash) and the time of the subscription, never by
/// BSN. A restart does not subscribe again a patient subscribed to within
/// `subscription_renew`.
struct Kept {
    db: Mutex<rusqlite::Connection>,
    path: std::path::PathBuf,
}

impl Kept {
    fn open(data_dir: &std::path::Path) -> rusqlite::Result<Kept> {
        let path = data_dir.join("mitz-subscriptions.db");
        let db = rusqlite::Connection::open(&path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS subscribed (
                 patient TEXT PRIMARY KEY,  -- the patient key (pseudonym), never a BSN
                 at INTEGER NOT NULL        -- seconds since the epoch
             )",
        )?;
        Ok(Kept {
            db: Mutex::new(db),
            path,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The patients subscribed to within `renew`, newest first, at most `cap`, with their
    /// age; older ones are forgotten.
    fn recent(&self, renew: Duration, cap: usize) -> rusqlite::Result<Vec<(String, Duration)>> {
        let now = unix_now();
        let oldest = now.saturating_sub(i64::try_from(renew.as_secs()).unwrap_or(i64::MAX));
        let db = self.lock();
        db.execute("DELETE FROM subscribed WHERE at < ?1", [oldest])?;
        let mut stmt =
            db.prepare("SELECT patient, at FROM subscribed ORDER BY at DESC LIMIT ?1")?;
        let rows: Vec<(String, Duration)> = stmt
            .query_map([i64::try_from(cap).unwrap_or(i64::MAX)], |r| {
                let at: i64 = r.get(1)?;
                let age = u64::try_from(now.saturating_sub(at)).unwrap_or(0);
                Ok((r.get::<_, String>(0)?, Duration::from_secs(age)))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn keep(&self, patient: &str) {
        let done = self.lock().execute(
            "INSERT INTO subscribed (patient, at) VALUES (?1, ?2)
             ON CONFLICT (patient) DO UPDATE SET at = excluded.at",
            rusqlite::params![patient, unix_now()],
        );
        if let Err(e) = done {
            tracing::warn!(file = %self.path.display(), error = %e,
                "a mitz subscription is not kept; a restart subscribes again");
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MitzConfig {
        toml::from_str(
            "base_url = \"http://127.0.0.1:1\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nca_files = [\"ca.pem\"]\nprovider_id = \"ura:00000659\"\nprovider_type = \"Z3\"\n",
        )
        .unwrap()
    }

    #[test]
    fn the_question_names_patient_parties_category_and_purpose() {
        let mut c = cfg();
        c.party_types.insert("ura:12345678".into(), "A1".into());
        let xml = question_xml(&c, "999990007", "ura:12345678", "treatment");
        for needle in [
            "root=\"2.16.840.1.113883.2.4.6.3\" extension=\"999990007\"",
            "urn:ihe:iti:appc:2016:author-institution:id",
            "extension=\"00000659\"",
            "code=\"Z3\"",
            "code=\"GGC002\"",
            "urn:nl:otv:names:tc:1.0:subject:provider-institution",
            "extension=\"12345678\"",
            "code=\"A1\"",
            "code=\"TREAT\"",
            "XACMLAuthzDecisionQuery",
        ] {
            assert!(xml.contains(needle), "{needle} missing from {xml}");
        }
        // Hostile values stay inside their attribute.
        let xml = question_xml(&c, "1\"/><x", "ura:a&b", "treatment");
        assert!(xml.contains("extension=\"1&quot;/&gt;&lt;x\""), "{xml}");
        assert!(xml.contains("a&amp;b"), "{xml}");
    }

    #[test]
    fn decisions_are_read_with_or_without_a_prefix() {
        let r = |d: &str| {
            format!(
                "<s:Envelope><s:Body><Response xmlns=\"urn:oasis:names:tc:xacml:3.0:core:schema:wd-17\"><Result><Decision>{d}</Decision></Result></Response></s:Body></s:Envelope>"
            )
        };
        assert_eq!(parse_decision(&r("Permit")), Some(Decision::Permit));
        assert_eq!(parse_decision(&r("Deny")), Some(Decision::Deny));
        assert_eq!(
            parse_decision(&r("NotApplicable")),
            Some(Decision::NotApplicable)
        );
        assert_eq!(
            parse_decision("<x:Result><x:Decision> Indeterminate </x:Decision></x:Result>"),
            Some(Decision::Indeterminate)
        );
        assert_eq!(parse_decision(&r("Maybe")), None);
        assert_eq!(parse_decision("<Decisions>Permit</Decisions>"), None);
        assert_eq!(parse_decision("no xml at all"), None);
    }

    #[test]
    fn the_subscription_names_patient_and_holder_and_carries_the_secret_header() {
        let s = subscription_json(
            &cfg(),
            "999990007",
            "https://kb.example/consent/mitz/notify",
            "s3cret",
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["resourceType"], "Subscription");
        assert_eq!(v["reason"], "OTV");
        assert_eq!(
            v["criteria"],
            "Consent?_query=otv&patientid=999990007&providerid=00000659&providertype=Z3"
        );
        assert_eq!(v["channel"]["type"], "rest-hook");
        assert_eq!(v["channel"]["header"][0], "Authorization: Bearer s3cret");
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let mut m: HashMap<u32, Instant> = HashMap::new();
        for i in 0..100 {
            bound(&mut m, 10, |at| *at, |_| true);
            m.insert(i, Instant::now());
        }
        assert_eq!(m.len(), 10);
        assert!(m.contains_key(&99));
    }

    #[test]
    fn problems_name_missing_files_and_plain_http_off_loopback() {
        let mut c = cfg();
        c.base_url = "http://mitz.example.nl".into();
        c.notify_url = Some("https://kb.example/consent/mitz/notify".into());
        let found: Vec<String> = c
            .problems(&Env::empty())
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let text = found.join("\n");
        assert!(text.contains("consent.mitz.base_url"), "{text}");
        assert!(text.contains("consent.mitz.cert_file"), "{text}");
        assert!(text.contains("consent.mitz.notify_secret_env"), "{text}");
    }

    #[test]
    fn every_key_is_in_the_example_config() {
        let example = include_str!("../../../ops/ketenbus.example.toml");
        let section = example
            .split("[consent.mitz]")
            .nth(1)
            .expect("the example has a [consent.mitz] section");
        for key in [
            "base_url",
            "cert_file",
            "key_file",
            "ca_files",
            "provider_id",
            "provider_type",
            "data_category",
            "party_types",
            "cache_time",
            "cache_entries",
            "timeout",
            "notify_url",
            "notify_secret_env",
            "subscription_renew",
        ] {
            assert!(
                section.contains(&format!("{key} =")),
                "{key} is not in the example"
            );
        }
    }

    #[test]
    fn a_notification_names_its_patients_by_bsn() {
        let body = serde_json::json!({
            "resourceType": "Bundle",
            "entry": [
                {"resource": {"resourceType": "Consent"}},
                {"resource": {"resourceType": "Patient", "identifier": [
                    {"system": systems::BSN, "value": "999990007"}
                ]}}
            ]
        });
        assert_eq!(notified_bsns(body.to_string().as_bytes()), ["999990007"]);
        assert!(notified_bsns(b"<Bundle/>").is_empty());
    }
}
