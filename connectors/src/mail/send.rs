//! The secure-mail sink: what replaced the fax. Each delivery becomes one mail through an
//! SMTP submission server (lettre over rustls, implicit TLS or STARTTLS, AUTH from an
//! environment variable) to the receiver's address from config or the address book. The
//! mail carries a human-readable rendering of the event, the structured event as a JSON
//! attachment and the event's documents from the content store. The subject names only the
//! kind and the record id: never patient data (NTA 7516).
//!
//! Proof of delivery: the envelope asks for DSNs (`RET=HDRS ENVID=<record id>/<token>`,
//! `NOTIFY=SUCCESS,FAILURE,DELAY`), where the token is an HMAC over the subscription and
//! the record id keyed with the broker's report key ([`crate::mail::dsn::envelope_id`]), so
//! [`crate::mail::dsn`] finds the delivery a report is about and nobody else can make a
//! report about it. `Message-ID` is `<record id>@<sender domain>`: the same record id always
//! makes the same `Message-ID`, so receivers can drop a duplicate after a retry.

use std::sync::Arc;

use ketenbus_schemas::Event;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Quit, Rcpt};
use lettre::transport::smtp::extension::{ClientId, MailParameter, RcptParameter};
use lettre::{Address, Message};

use crate::address_book::{AddressBook, Channel, Destination, Origin};
use crate::contract::content::ContentStore;
use crate::contract::sink::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, Sink};
use crate::mail::config::TlsMode;

pub mod config;
mod render;

pub use config::MailSinkConfig;

use render::{kind_label, render_event, render_raw};

/// Delivers events as secure mail.
pub struct MailSink {
    cfg: MailSinkConfig,
    password: Option<String>,
    to: Destination<Address>,
    content: Option<Arc<dyn ContentStore>>,
    from: Mailbox,
    hello: ClientId,
    ca_pem: Vec<Vec<u8>>,
    report_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for MailSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailSink")
            .field("host", &self.cfg.host)
            .field("tls", &self.cfg.tls)
            .finish_non_exhaustive()
    }
}

fn rejected(reason: &str, detail: impl Into<String>) -> DeliveryError {
    DeliveryError::Rejected {
        reason: reason.into(),
        detail: detail.into(),
    }
}

fn retryable(reason: &str, detail: impl Into<String>) -> DeliveryError {
    DeliveryError::Retryable {
        reason: reason.into(),
        detail: detail.into(),
    }
}

/// Classify a lettre error: 4xx and network trouble are worth another try, 5xx is final.
fn classify(step: &str, e: &lettre::transport::smtp::Error) -> DeliveryError {
    let code = e.status().map(|c| c.to_string());
    let detail = format!("{step}: {e}");
    if e.is_permanent() {
        rejected(
            &format!("smtp_{}", code.as_deref().unwrap_or("5xx")),
            detail,
        )
    } else if e.is_transient() {
        retryable(
            &format!("smtp_{}", code.as_deref().unwrap_or("4xx")),
            detail,
        )
    } else if e.is_timeout() {
        retryable("timeout", detail)
    } else if e.is_tls() {
        retryable("tls", detail)
    } else {
        retryable("connect", detail)
    }
}

impl MailSink {
    /// A sink for `cfg`; `password` is the resolved `password_env`, `book` the address book
    /// (used when `cfg` names no fixed `to`), `content` where attachment bytes are read from.
    ///
    /// # Errors
    /// [`crate::mail::MailError::Config`] when `from`, `to` or `ca_file` cannot be used.
    pub fn new(
        cfg: MailSinkConfig,
        password: Option<String>,
        book: Arc<AddressBook>,
        content: Option<Arc<dyn ContentStore>>,
    ) -> Result<MailSink, crate::mail::MailError> {
        use crate::mail::MailError;
        let to = match &cfg.to {
            Some(to) => Destination::Fixed(
                to.parse()
                    .map_err(|e| MailError::Config(format!("to: {e}")))?,
            ),
            None => Destination::Receiver(book),
        };
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| MailError::Config(format!("from: {e}")))?;
        let hello = ClientId::Domain(from.email.domain().to_owned());
        let ca_pem = match &cfg.ca_file {
            Some(f) => vec![
                std::fs::read(f).map_err(|e| MailError::Config(format!("{}: {e}", f.display())))?,
            ],
            None => Vec::new(),
        };
        Ok(MailSink {
            cfg,
            password,
            to,
            content,
            from,
            hello,
            ca_pem,
            report_key: None,
        })
    }

    /// Key the token in each delivery's envelope id with `key` (a broker secret). Without
    /// one the sink asks for no DSNs: a report it could not tie to its delivery is no proof.
    #[must_use]
    pub fn with_report_key(mut self, key: Vec<u8>) -> MailSink {
        self.report_key = Some(key);
        self
    }

    fn tls_parameters(&self) -> Result<TlsParameters, DeliveryError> {
        let mut b = TlsParameters::builder(self.cfg.host.clone());
        for pem in &self.ca_pem {
            let cert = Certificate::from_pem(pem)
                .map_err(|e| rejected("tls_config", format!("ca_file: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        b.build_rustls()
            .map_err(|e| rejected("tls_config", e.to_string()))
    }

    fn port(&self) -> u16 {
        self.cfg.port.unwrap_or(match self.cfg.tls {
            TlsMode::Implicit => 465,
            TlsMode::Starttls => 587,
            TlsMode::None => 25,
        })
    }

    /// The recipient: the configured `to`, else the receiver's address-book entry.
    fn recipient(&self, delivery: &Delivery) -> Result<(Address, Origin), DeliveryError> {
        self.to.resolve(delivery, Channel::Mail, |s| s.parse().ok())
    }

    /// The mail for a delivery, as bytes.
    ///
    /// # Errors
    /// `Rejected` when the mail cannot be built; `Retryable` when a document cannot be read.
    pub fn render(&self, delivery: &Delivery, to: &Address) -> Result<Vec<u8>, DeliveryError> {
        let (label, text, json, documents) = match &delivery.payload {
            Payload::Event(event) => {
                let json = serde_json::to_vec_pretty(event.as_ref())
                    .map_err(|e| rejected("encode", e.to_string()))?;
                let docs = match event.as_ref() {
                    Event::Letter(l) => l.attachments.clone(),
                    Event::AcuteHandover(h) => h.attachments.clone(),
                    _ => Vec::new(),
                };
                (
                    kind_label(event),
                    render_event(event, &delivery.record_id),
                    Some(json),
                    docs,
                )
            }
            Payload::Raw(env) => (
                "Bericht",
                render_raw(env, &delivery.record_id),
                None,
                Vec::new(),
            ),
        };
        let mut body = MultiPart::mixed().singlepart(SinglePart::plain(text));
        if let Some(json) = json {
            let ct = ContentType::parse("application/json")
                .map_err(|e| rejected("encode", e.to_string()))?;
            body = body.singlepart(Attachment::new("ketenbus-event.json".into()).body(json, ct));
        }
        if let Payload::Raw(env) = &delivery.payload {
            let ct = ContentType::parse(&env.content_type)
                .or_else(|_| ContentType::parse("application/octet-stream"))
                .map_err(|e| rejected("encode", e.to_string()))?;
            let name = match env.format.as_str() {
                "edifact" => "bericht.edi",
                "fhir_json" => "bericht.json",
                "fhir_xml" => "bericht.xml",
                _ => "bericht.eml",
            };
            body = body.singlepart(Attachment::new(name.into()).body(env.body.clone(), ct));
        }
        for (i, doc) in documents.iter().enumerate() {
            let Some(store) = &self.content else {
                return Err(rejected(
                    "content_missing",
                    "no content store for the documents",
                ));
            };
            let bytes = store
                .get(&doc.sha256)
                .map_err(|e| retryable("content_store", e.to_string()))?
                .ok_or_else(|| {
                    rejected(
                        "content_missing",
                        format!("document {i} is not in the content store"),
                    )
                })?;
            let ct = ContentType::parse(&doc.content_type)
                .or_else(|_| ContentType::parse("application/octet-stream"))
                .map_err(|e| rejected("encode", e.to_string()))?;
            let name = doc
                .title
                .clone()
                .unwrap_or_else(|| format!("document-{}", i + 1));
            body = body.singlepart(Attachment::new(name).body(bytes, ct));
        }
        let message_id = format!("<{}@{}>", delivery.record_id, self.from.email.domain());
        let message = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.clone()))
            .subject(format!("{label} via ketenbus [{}]", delivery.record_id))
            .message_id(Some(message_id))
            .multipart(body)
            .map_err(|e| rejected("encode", e.to_string()))?;
        Ok(message.formatted())
    }

    async fn send(&self, delivery: &Delivery) -> Result<Receipt, DeliveryError> {
        let (to, origin) = self.recipient(delivery)?;
        let bytes = self.render(delivery, &to)?;
        let timeout = Some(self.cfg.timeout);
        let implicit = if self.cfg.tls == TlsMode::Implicit {
            Some(self.tls_parameters()?)
        } else {
            None
        };
        let addr = (self.cfg.host.as_str(), self.port());
        let mut conn =
            AsyncSmtpConnection::connect_tokio1(addr, timeout, &self.hello, implicit, None)
                .await
                .map_err(|e| classify("connect", &e))?;
        let result = self
            .transaction(&mut conn, delivery, &to, &bytes)
            .await
            .map(|r| Receipt {
                origin: Some(origin.to_string()),
                ..r
            });
        match &result {
            Ok(_) => {
                let _ = conn.command(Quit).await;
            }
            Err(_) => conn.abort().await,
        }
        result
    }

    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        delivery: &Delivery,
        to: &Address,
        bytes: &[u8],
    ) -> Result<Receipt, DeliveryError> {
        if self.cfg.tls == TlsMode::Starttls {
            if !conn.can_starttls() {
                return Err(retryable(
                    "tls_unavailable",
                    "the server does not offer STARTTLS",
                ));
            }
            conn.starttls(self.tls_parameters()?, &self.hello)
                .await
                .map_err(|e| classify("starttls", &e))?;
        }
        if let (Some(user), Some(pass)) = (&self.cfg.username, &self.password) {
            let creds = Credentials::new(user.clone(), pass.clone());
            conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds)
                .await
                .map_err(|e| classify("auth", &e))?;
        }
        let mut mail_params = Vec::new();
        let mut rcpt_params = Vec::new();
        // RFC 3461: DSN parameters only to a server that announces DSN. lettre keeps no
        // list of unknown extensions, so ask again (one round trip).
        let report_key = self.report_key.as_deref().filter(|_| self.cfg.dsn);
        let dsn = report_key.is_some() && {
            let ehlo = conn
                .command(Ehlo::new(self.hello.clone()))
                .await
                .map_err(|e| classify("ehlo", &e))?;
            ehlo.message().any(|l| l.trim().eq_ignore_ascii_case("DSN"))
        };
        if let Some(key) = report_key.filter(|_| dsn) {
            mail_params.push(MailParameter::Other {
                keyword: "RET".into(),
                value: Some("HDRS".into()),
            });
            // `Display` of the parameter xtext-encodes the value.
            mail_params.push(MailParameter::Other {
                keyword: "ENVID".into(),
                value: Some(crate::mail::dsn::envelope_id(
                    key,
                    &delivery.subscription,
                    &delivery.record_id,
                )),
            });
            rcpt_params.push(RcptParameter::Other {
                keyword: "NOTIFY".into(),
                value: Some("SUCCESS,FAILURE,DELAY".into()),
            });
        }
        conn.command(Mail::new(Some(self.from.email.clone()), mail_params))
            .await
            .map_err(|e| classify("mail", &e))?;
        conn.command(Rcpt::new(to.clone(), rcpt_params))
            .await
            .map_err(|e| classify("rcpt", &e))?;
        conn.command(Data).await.map_err(|e| classify("data", &e))?;
        let response = conn
            .message(bytes)
            .await
            .map_err(|e| classify("message", &e))?;
        let line = format!(
            "{} {}",
            response.code(),
            response.first_line().unwrap_or("")
        );
        Ok(Receipt {
            detail: line.trim_end().to_owned(),
            origin: None,
        })
    }
}

impl Sink for MailSink {
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(async move {
            let timeout = self.cfg.timeout.saturating_mul(4);
            match tokio::time::timeout(timeout, self.send(delivery)).await {
                Ok(r) => r,
                Err(_) => Err(retryable(
                    "timeout",
                    "the mail server did not finish in time",
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ketenbus_schemas::event::{Attachment as Doc, LetterEvent};
    use ketenbus_schemas::{EventHeader, EventKind, Format, RawEnvelope};

    use super::*;
    use crate::contract::content::MemoryContentStore;

    fn sink(content: Option<Arc<dyn ContentStore>>) -> MailSink {
        let cfg = MailSinkConfig {
            host: "127.0.0.1".into(),
            port: Some(1),
            tls: TlsMode::None,
            ca_file: None,
            username: None,
            password_env: None,
            from: "ketenbus@ketenbus.example.test".into(),
            to: None,
            dsn: true,
            timeout: std::time::Duration::from_secs(1),
        };
        let book = AddressBook::of(BTreeMap::from([(
            "mailbox:500005678".to_owned(),
            crate::address_book::Entry {
                mail: Some("huisarts@gp.example.test".to_owned()),
                ..crate::address_book::Entry::default()
            },
        )]));
        MailSink::new(cfg, None, Arc::new(book), content).unwrap()
    }

    fn letter(pdf: &[u8]) -> Delivery {
        let mut header = EventHeader::new(EventKind::Letter, "env9", 0, "rfc822");
        header.receiver = Some("mailbox:500005678".into());
        let event = Event::Letter(LetterEvent {
            header,
            patient: None,
            author: None,
            author_organization: None,
            recipient: None,
            date: Some("2026-11-02".into()),
            title: Some("Ontslagbrief J. Jansen".into()),
            text: Some("Geachte collega,".into()),
            attachments: vec![Doc {
                content_type: "application/pdf".into(),
                title: Some("brief.pdf".into()),
                sha256: crate::contract::content::sha256_hex(pdf),
                size: pdf.len() as i64,
                document_type: None,
            }],
        });
        Delivery {
            subscription: "s".into(),
            record_id: "env9.0".into(),
            payload: Payload::Event(Arc::new(event)),
            attempt: 1,
            position: None,
        }
    }

    #[test]
    fn a_letter_renders_readable_with_the_pdf_and_no_patient_data_in_the_subject() {
        let store = Arc::new(MemoryContentStore::default());
        let pdf = b"%PDF-1.4 synthetic".to_vec();
        store.put(&pdf).unwrap();
        let s = sink(Some(store));
        let d = letter(&pdf);
        let (to, _) = s.recipient(&d).unwrap();
        assert_eq!(
            to.to_string(),
            "huisarts@gp.example.test",
            "from the address book"
        );
        let mail = String::from_utf8(s.render(&d, &to).unwrap()).unwrap();
        let subject = mail.lines().find(|l| l.starts_with("Subject:")).unwrap();
        assert_eq!(subject, "Subject: Brief via ketenbus [env9.0]");
        assert!(
            mail.contains("Message-ID: <env9.0@ketenbus.example.test>"),
            "{mail}"
        );
        assert!(mail.contains("filename=\"brief.pdf\""));
        assert!(mail.contains("ketenbus-event.json"));
        let parsed = mail_parser::MessageParser::default()
            .parse(mail.as_bytes())
            .unwrap();
        assert!(
            parsed
                .body_text(0)
                .unwrap()
                .contains("Onderwerp:      Ontslagbrief J. Jansen")
        );
        let pdf_part = parsed
            .attachments()
            .find(|a| mail_parser::MimeHeaders::attachment_name(*a) == Some("brief.pdf"))
            .unwrap();
        assert_eq!(pdf_part.contents(), pdf.as_slice());
    }

    #[test]
    fn a_missing_document_or_address_is_a_rejection() {
        let s = sink(Some(Arc::new(MemoryContentStore::default())));
        let d = letter(b"not stored");
        let (to, _) = s.recipient(&d).unwrap();
        assert_eq!(s.render(&d, &to).unwrap_err().reason(), "content_missing");
        let mut d = letter(b"x");
        if let Payload::Event(e) = &mut d.payload {
            let mut e = (**e).clone();
            e.header_mut().receiver = Some("agb:000".into());
            d.payload = Payload::Event(Arc::new(e));
        }
        assert_eq!(s.recipient(&d).unwrap_err().reason(), "no_address");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retryable() {
        let s = sink(None);
        let env = RawEnvelope {
            id: "e".into(),
            received_at_ms: 0,
            connector: "http".into(),
            format: Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: None,
            receiver: Some("mailbox:500005678".into()),
            body: b"UNB'".to_vec(),
            attributes: BTreeMap::new(),
        };
        let d = Delivery {
            subscription: "s".into(),
            record_id: "e".into(),
            payload: Payload::Raw(Arc::new(env)),
            attempt: 1,
            position: None,
        };
        let err = s.deliver(&d).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Retryable, "{err}");
    }
}
