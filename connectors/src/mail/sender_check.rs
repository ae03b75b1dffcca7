//! Holds authenticated SMTP users to the parties they may send as: the check in front of the
//! ingest that the SMTP listener hands its messages to.

use std::collections::HashMap;
use std::sync::Arc;

use ketenbus_schemas::RawEnvelope;

use crate::mail::AUTH_USER_ATTRIBUTE;
use crate::mail::config::SmtpAuthConfig;
use crate::party;
use crate::{Accepted, BoxFuture, Ingest, IngestError};

/// Reason code of a message declaring a sender its login may not send as.
pub const REASON_SENDER_NOT_ALLOWED: &str = "sender_not_allowed";

/// Told of every message the check refuses: the envelope's connector and the reason code
/// (the broker counts them).
pub type OnRefused = Box<dyn Fn(&str, &'static str) + Send + Sync>;

/// Holds authenticated SMTP users to the parties they may send as (`party_ids` of
/// `[mail.smtp.auth] users`): a message whose EDIFACT or FHIR parts declare another sender
/// is refused (`550 5.7.1`) before it is stored; otherwise its envelope names the declared
/// party, or the user's first. Other envelopes pass unchanged.
pub struct SmtpSenderCheck {
    inner: Arc<dyn Ingest>,
    parties: HashMap<String, Vec<String>>,
    on_refused: Option<OnRefused>,
}

impl std::fmt::Debug for SmtpSenderCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSenderCheck")
            .field("users", &self.parties.len())
            .finish_non_exhaustive()
    }
}

impl SmtpSenderCheck {
    /// Check the users of `auth` (when configured) in front of `inner`.
    #[must_use]
    pub fn new(inner: Arc<dyn Ingest>, auth: Option<&SmtpAuthConfig>) -> SmtpSenderCheck {
        let parties = auth
            .map(|a| {
                a.users
                    .iter()
                    .filter(|u| !u.party_ids.is_empty())
                    .map(|u| (u.username.clone(), u.party_ids.clone()))
                    .collect()
            })
            .unwrap_or_default();
        SmtpSenderCheck {
            inner,
            parties,
            on_refused: None,
        }
    }

    /// Call `f` with the connector and reason code of every message the check refuses.
    #[must_use]
    pub fn on_refused(
        mut self,
        f: impl Fn(&str, &'static str) + Send + Sync + 'static,
    ) -> SmtpSenderCheck {
        self.on_refused = Some(Box::new(f));
        self
    }
}

impl Ingest for SmtpSenderCheck {
    fn accept(&self, mut envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
        Box::pin(async move {
            let login = envelope
                .attributes
                .get(AUTH_USER_ATTRIBUTE)
                .and_then(|user| Some((user.clone(), self.parties.get(user)?)));
            if let Some((user, allowed)) = login {
                // Off the async workers: a mail may be large.
                let (declared, back) = tokio::task::spawn_blocking(move || {
                    (party::declared(envelope.format, &envelope.body), envelope)
                })
                .await
                .map_err(|e| IngestError::Fatal(format!("reading the message's parties: {e}")))?;
                envelope = back;
                match party::check_sender(&declared, &user, allowed) {
                    Ok(sender) => envelope.sender = sender,
                    Err(e) => {
                        if let Some(f) = &self.on_refused {
                            f(&envelope.connector, REASON_SENDER_NOT_ALLOWED);
                        }
                        return Err(IngestError::Refused {
                            reason: REASON_SENDER_NOT_ALLOWED,
                            detail: e.to_string(),
                        });
                    }
                }
            }
            self.inner.accept(envelope).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ketenbus_schemas::Format;

    use super::*;
    use crate::mail::config::SmtpUser;

    #[derive(Default)]
    struct Memory(Mutex<Vec<RawEnvelope>>);

    impl Ingest for Memory {
        fn accept(&self, envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
            Box::pin(async move {
                let id = envelope.id.clone();
                self.0.lock().unwrap().push(envelope);
                Ok(Accepted { id })
            })
        }
    }

    fn mail_from(user: Option<&str>, unb_sender: &str) -> RawEnvelope {
        let body = format!(
            "From: a@example.test\r\nTo: b@example.test\r\nContent-Type: application/EDIFACT\r\n\r\n\
             UNB+UNOA:1+{unb_sender}+500005678+261101:0815+IC1'UNZ+0+IC1'\r\n"
        );
        RawEnvelope {
            id: "e1".into(),
            received_at_ms: 0,
            connector: "smtp".into(),
            format: Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: Some("mail:a@example.test".into()),
            receiver: None,
            body: body.into_bytes(),
            attributes: user
                .map(|u| (AUTH_USER_ATTRIBUTE.to_owned(), u.to_owned()))
                .into_iter()
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_login_sends_only_as_its_own_parties() {
        let memory = Arc::new(Memory::default());
        let auth = SmtpAuthConfig {
            required: true,
            users: vec![SmtpUser {
                username: "lab".into(),
                password_env: "X".into(),
                party_ids: vec!["mailbox:500001234".into()],
            }],
        };
        let refused = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&refused);
        let check = SmtpSenderCheck::new(Arc::clone(&memory) as Arc<dyn Ingest>, Some(&auth))
            .on_refused(move |c, r| seen.lock().unwrap().push((c.to_owned(), r)));

        let own = check.accept(mail_from(Some("lab"), "500001234")).await;
        assert_eq!(own.unwrap().id, "e1");
        let e = check
            .accept(mail_from(Some("lab"), "500009999"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, IngestError::Refused { reason, .. } if reason == REASON_SENDER_NOT_ALLOWED)
        );
        // Without a login the check does not apply.
        let anonymous = check.accept(mail_from(None, "500009999")).await;
        assert_eq!(anonymous.unwrap().id, "e1");

        let got = memory.0.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].sender.as_deref(), Some("mailbox:500001234"));
        assert_eq!(got[1].sender.as_deref(), Some("mail:a@example.test"));
        assert_eq!(
            *refused.lock().unwrap(),
            vec![("smtp".to_owned(), REASON_SENDER_NOT_ALLOWED)]
        );
    }
}
