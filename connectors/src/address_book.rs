//! The address book: party id -> where that party takes deliveries, per channel (secure mail,
//! webhook, FHIR endpoint). It is what the fax number list used to be. A sink configured
//! without a fixed destination sends each record to its receiver's entry; the receiver is the
//! party id the record carries (`header.receiver` of an event, `receiver` of a raw envelope),
//! e.g. `mailbox:500005678`, `agb:01234567` or `ura:12345678`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::contract::sink::{Delivery, DeliveryError, Payload};

/// Reason code of a record whose receiver has no address for the sink's channel.
pub const REASON_NO_ADDRESS: &str = "no_address";

/// One party's addresses. At least one channel is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Who it is, for people reading the config (not sent anywhere).
    #[serde(default)]
    pub name: Option<String>,
    /// Secure-mail address (ZorgMail-style `<number>@lms.lifeline.nl`).
    #[serde(default)]
    pub mail: Option<String>,
    /// Webhook URL.
    #[serde(default)]
    pub webhook: Option<String>,
    /// FHIR base URL.
    #[serde(default)]
    pub fhir: Option<String>,
}

/// A delivery channel of the address book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `mail`.
    Mail,
    /// `webhook`.
    Webhook,
    /// `fhir`.
    Fhir,
}

impl Channel {
    /// The entry's key for this channel.
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Channel::Mail => "mail",
            Channel::Webhook => "webhook",
            Channel::Fhir => "fhir",
        }
    }

    fn of(self, entry: &Entry) -> Option<&str> {
        match self {
            Channel::Mail => entry.mail.as_deref(),
            Channel::Webhook => entry.webhook.as_deref(),
            Channel::Fhir => entry.fhir.as_deref(),
        }
    }
}

/// Where an address came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The `[address_book]` entry of the party (a local override: it wins).
    Override,
    /// A replicated directory (`[[mcsd]]`), with what in it led there.
    Directory {
        /// The directory's name.
        name: String,
        /// The resources that led there (`Organization/…`, `HealthcareService/…`,
        /// `Endpoint/…`).
        via: Vec<String>,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Override => f.write_str("address_book override"),
            Source::Directory { name, via } => write!(f, "mcsd {name}: {}", via.join(" -> ")),
        }
    }
}

/// An address and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The address (URL or mail address).
    pub address: String,
    /// Where it came from.
    pub source: Source,
}

/// A directory that knows parties' addresses beyond `[address_book]` (the mCSD replica).
pub trait Directory: Send + Sync {
    /// The address of `party` for `channel`, if the directory has one that fits.
    fn address(&self, party: &str, channel: Channel) -> Option<Resolved>;
}

/// The directories behind the address book (none unless `[[mcsd]]` sources are set).
#[derive(Clone, Default)]
pub struct Directories(pub Vec<Arc<dyn Directory>>);

impl std::fmt::Debug for Directories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Directories({})", self.0.len())
    }
}

impl PartialEq for Directories {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
    }
}

impl Eq for Directories {}

/// Party id -> addresses (`[address_book."<party id>"]`), and behind them the replicated
/// directories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct AddressBook(pub BTreeMap<String, Entry>, #[serde(skip)] pub Directories);

impl AddressBook {
    /// The book of `entries` alone.
    #[must_use]
    pub fn of(entries: BTreeMap<String, Entry>) -> AddressBook {
        AddressBook(entries, Directories::default())
    }

    /// This book with `directories` behind its entries.
    #[must_use]
    pub fn with_directories(mut self, directories: Vec<Arc<dyn Directory>>) -> AddressBook {
        self.1 = Directories(directories);
        self
    }

    /// Whether any entry has an address for `channel`, or a directory may have one.
    #[must_use]
    pub fn serves(&self, channel: Channel) -> bool {
        !self.1.0.is_empty() || self.0.values().any(|e| channel.of(e).is_some())
    }

    /// The address of `party` for `channel` in `[address_book]` alone.
    #[must_use]
    pub fn address(&self, party: &str, channel: Channel) -> Option<&str> {
        self.0.get(party).and_then(|e| channel.of(e))
    }

    /// The address of `party` for `channel` and where it came from: the `[address_book]`
    /// entry (an override) wins, then each directory in turn. The one lookup sinks use.
    #[must_use]
    pub fn lookup(&self, party: &str, channel: Channel) -> Option<Resolved> {
        if let Some(a) = self.address(party, channel) {
            return Some(Resolved {
                address: a.to_owned(),
                source: Source::Override,
            });
        }
        self.1.0.iter().find_map(|d| d.address(party, channel))
    }

    /// The address of the delivery's receiver for `channel`.
    ///
    /// # Errors
    /// `Rejected` with reason [`REASON_NO_ADDRESS`] when the record names no receiver or the
    /// receiver has no address for the channel: a dead letter that replays once the address
    /// book has the entry.
    pub fn receiver_address(
        &self,
        delivery: &Delivery,
        channel: Channel,
    ) -> Result<Resolved, DeliveryError> {
        let party = match &delivery.payload {
            Payload::Event(e) => e.header().receiver.as_deref(),
            Payload::Raw(env) => env.receiver.as_deref(),
        };
        let Some(party) = party else {
            return Err(DeliveryError::Rejected {
                reason: REASON_NO_ADDRESS.into(),
                detail: "the record names no receiver".into(),
            });
        };
        self.lookup(party, channel)
            .ok_or_else(|| DeliveryError::Rejected {
                reason: REASON_NO_ADDRESS.into(),
                detail: format!(
                    "receiver {party} has no {} address in the address book or a directory",
                    channel.key()
                ),
            })
    }

    /// Problems with the entries, as (key path, message). URLs are checked by the caller,
    /// which knows the transport rules.
    #[must_use]
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (party, entry) in &self.0 {
            let at = |k: &str| format!("address_book.{party:?}{k}");
            if !party.contains(':') {
                p.push((
                    at(""),
                    "party ids are scheme:value (agb:…, ura:…, mailbox:…)".into(),
                ));
            }
            if entry.mail.is_none() && entry.webhook.is_none() && entry.fhir.is_none() {
                p.push((at(""), "give at least one of mail, webhook, fhir".into()));
            }
            if let Some(m) = &entry.mail
                && m.parse::<lettre::Address>().is_err()
            {
                p.push((at(".mail"), "not a mail address".into()));
            }
        }
        p
    }
}

/// Where a sink sends: one fixed address, or each record's receiver's entry.
#[derive(Debug, Clone)]
pub enum Destination<T> {
    /// Always here.
    Fixed(T),
    /// The receiver's address for the sink's channel.
    Receiver(Arc<AddressBook>),
}

impl<T: Clone> Destination<T> {
    /// The address for `delivery` and where it came from; a receiver's entry is read with
    /// `parse`.
    ///
    /// # Errors
    /// `Rejected` ([`REASON_NO_ADDRESS`]) when the receiver has no usable address.
    pub fn resolve(
        &self,
        delivery: &Delivery,
        channel: Channel,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<(T, Origin), DeliveryError> {
        match self {
            Destination::Fixed(t) => Ok((t.clone(), Origin::Fixed)),
            Destination::Receiver(book) => {
                let found = book.receiver_address(delivery, channel)?;
                let address = parse(&found.address).ok_or_else(|| DeliveryError::Rejected {
                    reason: REASON_NO_ADDRESS.into(),
                    detail: format!(
                        "the receiver's {} address ({}) is not usable",
                        channel.key(),
                        found.source
                    ),
                })?;
                Ok((address, Origin::Book(found.source)))
            }
        }
    }
}

/// Where the address a sink used came from: what the lineage's delivery step records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The sink's own `url` / `base_url` / `to` in the config.
    Fixed,
    /// The address book: an `[address_book]` override or a directory.
    Book(Source),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Fixed => f.write_str("fixed in the sink's config"),
            Origin::Book(s) => s.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use ketenbus_schemas::event::LetterEvent;
    use ketenbus_schemas::{Event, EventHeader, EventKind};

    use super::*;

    fn book() -> AddressBook {
        toml::from_str(
            r#"
["mailbox:500005678"]
name = "Huisartsenpraktijk De Linde (synthetisch)"
mail = "500005678@lms.example.test"
webhook = "https://his.example.test/ketenbus"
["agb:01234567"]
fhir = "https://fhir.example.test/r4"
"#,
        )
        .unwrap()
    }

    fn delivery(receiver: Option<&str>) -> Delivery {
        let mut header = EventHeader::new(EventKind::Letter, "env-1", 0, "rfc822");
        header.receiver = receiver.map(str::to_owned);
        Delivery {
            subscription: Arc::from("gp"),
            record_id: "env-1.0".into(),
            payload: Payload::Event(Arc::new(Event::Letter(LetterEvent::new(header)))),
            attempt: 1,
            position: None,
        }
    }

    #[test]
    fn each_channel_finds_the_receivers_own_address() {
        let b = book();
        let d = delivery(Some("mailbox:500005678"));
        assert_eq!(
            b.receiver_address(&d, Channel::Mail).unwrap().address,
            "500005678@lms.example.test"
        );
        assert_eq!(
            b.receiver_address(&d, Channel::Webhook).unwrap().address,
            "https://his.example.test/ketenbus"
        );
        let e = b.receiver_address(&d, Channel::Fhir).unwrap_err();
        assert_eq!(e.reason(), REASON_NO_ADDRESS);
        assert!(e.to_string().contains("no fhir address"), "{e}");
        assert_eq!(
            b.receiver_address(&delivery(Some("agb:01234567")), Channel::Fhir)
                .unwrap()
                .address,
            "https://fhir.example.test/r4"
        );
        assert!(b.serves(Channel::Fhir) && b.serves(Channel::Mail));
        assert!(!AddressBook::default().serves(Channel::Webhook));
    }

    struct OneParty;
    impl Directory for OneParty {
        fn address(&self, party: &str, channel: Channel) -> Option<Resolved> {
            (party == "ura:00000001" && channel == Channel::Webhook).then(|| Resolved {
                address: "https://dir.example.test/hook".into(),
                source: Source::Directory {
                    name: "lrza".into(),
                    via: vec!["Organization/o1".into(), "Endpoint/e1".into()],
                },
            })
        }
    }

    #[test]
    fn the_override_wins_and_a_directory_answers_behind_it() {
        let mut entries = book().0;
        entries.insert(
            "ura:00000002".into(),
            Entry {
                webhook: Some("https://local.example.test/hook".into()),
                ..Entry::default()
            },
        );
        let b = AddressBook::of(entries).with_directories(vec![Arc::new(OneParty)]);
        let found = b
            .receiver_address(&delivery(Some("ura:00000001")), Channel::Webhook)
            .unwrap();
        assert_eq!(found.address, "https://dir.example.test/hook");
        assert_eq!(
            found.source.to_string(),
            "mcsd lrza: Organization/o1 -> Endpoint/e1"
        );
        let local = b.lookup("ura:00000002", Channel::Webhook).unwrap();
        assert_eq!(local.source, Source::Override);
        assert!(b.lookup("ura:00000001", Channel::Mail).is_none());
        assert!(b.serves(Channel::Fhir), "a directory may serve any channel");
    }

    #[test]
    fn a_record_without_a_known_receiver_is_rejected_not_retried() {
        let b = book();
        for d in [delivery(None), delivery(Some("agb:99999999"))] {
            let e = b.receiver_address(&d, Channel::Mail).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Rejected);
            assert_eq!(e.reason(), REASON_NO_ADDRESS);
        }
    }

    #[test]
    fn problems_name_the_entry_and_the_key() {
        let b: AddressBook = toml::from_str(
            r#"
["500005678"]
mail = "500005678@lms.example.test"
["agb:1"]
mail = "not-an-address"
["agb:2"]
name = "nothing to send to"
"#,
        )
        .unwrap();
        let p = b.problems();
        assert!(p.contains(&(
            "address_book.\"500005678\"".into(),
            "party ids are scheme:value (agb:…, ura:…, mailbox:…)".into()
        )));
        assert!(p.contains(&(
            "address_book.\"agb:1\".mail".into(),
            "not a mail address".into()
        )));
        assert!(p.contains(&(
            "address_book.\"agb:2\"".into(),
            "give at least one of mail, webhook, fhir".into()
        )));
        assert!(book().problems().is_empty());
        assert!(toml::from_str::<AddressBook>("[\"agb:1\"]\nfax = \"0501234567\"\n").is_err());
    }
}
