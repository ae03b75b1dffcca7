//! The topics a client may subscribe to: one per event kind, each with a canonical URL
//! that does not depend on where ketenbus runs, published for R4 as `Basic` resources
//! carrying the R5 `SubscriptionTopic` cross-version extensions.

use ketenbus_schemas::EventKind;
use serde_json::{Value, json};

/// Where every topic canonical starts.
pub const CANONICAL_PREFIX: &str = "urn:ketenbus:fhir:SubscriptionTopic:";

/// The cross-version extensions of R5 `SubscriptionTopic` elements.
const EXT: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic";

/// Filters the topics take: (name, what it matches). `patient` only on topics whose events
/// name a patient ([`Topic::patient`]).
pub const FILTERS: [(&str, &str); 3] = [
    (
        "receiver",
        "The receiving party id (`agb:…`, `ura:…`, `mailbox:…`) the event is addressed to. Required: a Subscription is for one receiver.",
    ),
    (
        "sender",
        "The sending party id the event came from; several sender filters match any of them.",
    ),
    (
        "patient",
        "The patient the event is about, by BSN (`patient=<BSN>` or `patient:identifier=http://fhir.nl/fhir/NamingSystem/bsn|<BSN>`). Only for receivers the server allows it (`fhir_subscriptions.patient_filter_receivers`); the server keeps only the patient's pseudonym and reads it back as `patient:identifier=urn:ketenbus:patient-key|<pseudonym>`.",
    ),
];

/// One topic.
#[derive(Debug, Clone, Copy)]
pub struct Topic {
    /// Its event kind.
    pub kind: EventKind,
    /// Its id (`Basic.id`) and the last part of its canonical.
    pub id: &'static str,
    /// Computer-friendly name.
    pub name: &'static str,
    /// Title.
    pub title: &'static str,
    /// What it notifies.
    pub description: &'static str,
    /// The resource type each notification focuses on.
    pub focus: &'static str,
    /// Whether its events name a patient (so it takes a `patient` filter).
    pub patient: bool,
}

/// Every topic.
pub const TOPICS: [Topic; 4] = [
    Topic {
        kind: EventKind::LabResult,
        id: "lab-result",
        name: "LabResult",
        title: "Lab results",
        description: "A laboratory result for the receiver arrived (EDIFACT MEDLAB or FHIR), as nl-core LaboratoryTestResult observations.",
        focus: "Observation",
        patient: true,
    },
    Topic {
        kind: EventKind::AcuteHandover,
        id: "acute-handover",
        name: "AcuteHandover",
        title: "Acute care handovers",
        description: "A handover in the acute care chain (ambulance to GP post or emergency department) for the receiver arrived, as a referral with its nl-core resources.",
        focus: "ServiceRequest",
        patient: true,
    },
    Topic {
        kind: EventKind::HandoverNotification,
        id: "handover-notification",
        name: "HandoverNotification",
        title: "Handover notifications",
        description: "A notification about a handover (a Task announcing data to fetch) for the receiver arrived.",
        focus: "Task",
        patient: false,
    },
    Topic {
        kind: EventKind::Letter,
        id: "letter",
        name: "Letter",
        title: "Letters",
        description: "A letter (discharge or referral letter that used to go by fax) for the receiver arrived. Letters have no FHIR form yet: notifications carry no focus and no resources.",
        focus: "DocumentReference",
        patient: true,
    },
];

impl Topic {
    /// Its canonical URL (`Subscription.criteria`).
    #[must_use]
    pub fn canonical(&self) -> String {
        format!("{CANONICAL_PREFIX}{}", self.id)
    }

    /// The topic whose canonical is `url`.
    #[must_use]
    pub fn by_canonical(url: &str) -> Option<&'static Topic> {
        let id = url.strip_prefix(CANONICAL_PREFIX)?;
        TOPICS.iter().find(|t| t.id == id)
    }

    /// The topic of an event kind.
    #[must_use]
    pub fn of(kind: EventKind) -> &'static Topic {
        TOPICS.iter().find(|t| t.kind == kind).unwrap_or(&TOPICS[0])
    }

    /// The topic as an R4 `Basic` resource (the Backport IG's way to publish a topic).
    #[must_use]
    pub fn basic(&self) -> Value {
        let trigger = ext(
            "eventTrigger",
            json!({ "extension": [
                part("description", "valueMarkdown", json!(self.description)),
                part("event", "valueCodeableConcept", json!({ "coding": [{
                    "system": ketenbus_connectors::fhir::emit::KETENBUS_EVENT,
                    "code": self.kind.as_str(),
                }] })),
                part("resource", "valueUri", json!(format!("http://hl7.org/fhir/StructureDefinition/{}", self.focus))),
            ] }),
        );
        let filters = FILTERS
            .iter()
            .filter(|(name, _)| *name != "patient" || self.patient)
            .copied()
            .collect::<Vec<_>>();
        basic(&Published {
            id: self.id,
            canonical: self.canonical(),
            name: self.name,
            title: self.title,
            description: self.description,
            focus: self.focus,
            trigger,
            filters: &filters,
        })
    }
}

/// The topic of the Backport form of a Notified Pull notification (the `notified-pull`
/// sink with `notification = "backport"`). As in the generic-functions IG's Notified Pull
/// (a topic on the workflow `Task` whose owner is the subscriber), each notification's
/// focus is the notification `Task`, whose `owner` is the receiver; the receiver pulls the
/// data it announces with a token for that one exchange. Operators set these up in the
/// configuration: it is published (`/fhir/Basic/notified-pull`) so a receiver can resolve
/// the canonical, but it is no topic a client subscribes to through `/fhir/Subscription`.
pub mod notified_pull {
    use serde_json::{Value, json};

    use super::{CANONICAL_PREFIX, Published, basic, ext, part};

    /// Its id (`Basic.id`) and the last part of its canonical.
    pub const ID: &str = "notified-pull";

    /// The resource type each notification focuses on.
    pub const FOCUS: &str = "Task";

    /// Its canonical URL (the notifications' `topic`).
    #[must_use]
    pub fn canonical() -> String {
        format!("{CANONICAL_PREFIX}{ID}")
    }

    /// The topic as an R4 `Basic` resource.
    #[must_use]
    pub fn basic_resource() -> Value {
        const DESCRIPTION: &str = "This node made data available for the receiver to pull (Notified Pull, Backport form): each notification's focus is a Task with code pull-notification whose owner is the receiver, carrying the authorization-base and the URLs to query and read. No clinical content is in the notification: the receiver pulls it with a token bound to that one exchange.";
        let trigger = ext(
            "resourceTrigger",
            json!({ "extension": [
                part("description", "valueMarkdown", json!("A notification Task (code pull-notification) is made for the receiver.")),
                part("resource", "valueUri", json!(format!("http://hl7.org/fhir/StructureDefinition/{FOCUS}"))),
                part("supportedInteraction", "valueCode", json!("create")),
            ] }),
        );
        basic(&Published {
            id: ID,
            canonical: canonical(),
            name: "NotifiedPull",
            title: "Notified Pull notifications",
            description: DESCRIPTION,
            focus: FOCUS,
            trigger,
            filters: &[(
                "owner",
                "The receiving party id (`ura:…`, `agb:…`) the notification Task is for (`Task.owner`).",
            )],
        })
    }
}

/// What a published topic says.
struct Published<'a> {
    id: &'a str,
    canonical: String,
    name: &'a str,
    title: &'a str,
    description: &'a str,
    focus: &'a str,
    /// Its `eventTrigger` or `resourceTrigger` extension.
    trigger: Value,
    /// (filter parameter, what it matches).
    filters: &'a [(&'a str, &'a str)],
}

/// One cross-version extension of an R5 `SubscriptionTopic` element.
fn ext(name: &str, value: Value) -> Value {
    let mut e = json!({ "url": format!("{EXT}.{name}") });
    if let (Some(obj), Value::Object(v)) = (e.as_object_mut(), value) {
        obj.extend(v);
    }
    e
}

/// One part of a complex extension.
fn part(url: &str, key: &str, v: Value) -> Value {
    json!({ "url": url, key: v })
}

/// A topic as an R4 `Basic` resource carrying the R5 `SubscriptionTopic` extensions.
fn basic(t: &Published<'_>) -> Value {
    let mut extension = vec![
        ext("url", json!({ "valueUri": t.canonical })),
        ext("version", json!({ "valueString": "1" })),
        ext("name", json!({ "valueString": t.name })),
        ext("title", json!({ "valueString": t.title })),
        ext("status", json!({ "valueCode": "active" })),
        ext("date", json!({ "valueDateTime": "2026-12-01" })),
        ext("description", json!({ "valueMarkdown": t.description })),
        t.trigger.clone(),
    ];
    for (name, description) in t.filters {
        extension.push(ext(
            "canFilterBy",
            json!({ "extension": [
                part("description", "valueMarkdown", json!(description)),
                part("resource", "valueUri", json!(t.focus)),
                part("filterParameter", "valueString", json!(name)),
            ] }),
        ));
    }
    extension.push(ext(
        "notificationShape",
        json!({ "extension": [part("resource", "valueUri", json!(t.focus))] }),
    ));
    json!({
        "resourceType": "Basic",
        "id": t.id,
        "extension": extension,
        "code": { "coding": [{
            "system": "http://hl7.org/fhir/fhir-types",
            "code": "SubscriptionTopic",
        }] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_topic_per_event_kind_with_a_canonical_that_finds_it() {
        for kind in EventKind::ALL {
            let t = Topic::of(kind);
            assert_eq!(t.kind, kind);
            assert_eq!(
                Topic::by_canonical(&t.canonical()).map(|t| t.kind),
                Some(kind)
            );
        }
        assert!(Topic::by_canonical("urn:ketenbus:fhir:SubscriptionTopic:nope").is_none());
        assert!(Topic::by_canonical("http://example.org/lab-result").is_none());
    }

    /// The Notified Pull topic is a Task topic (trigger, filter and shape on `Task`, filtered
    /// by the Task's owner) that no client subscribes to through the API.
    #[test]
    fn the_notified_pull_topic_is_on_the_task_and_not_subscribable() {
        let b = notified_pull::basic_resource();
        let text = b.to_string();
        assert!(text.contains(&notified_pull::canonical()));
        let exts = b["extension"].as_array().unwrap();
        let of = |name: &str| {
            exts.iter()
                .filter(|e| e["url"] == format!("{EXT}.{name}"))
                .collect::<Vec<_>>()
        };
        for e in of("resourceTrigger")
            .into_iter()
            .chain(of("canFilterBy"))
            .chain(of("notificationShape"))
        {
            let resource = e["extension"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["url"] == "resource")
                .unwrap();
            assert!(
                resource["valueUri"].as_str().unwrap().ends_with("Task"),
                "{e}"
            );
        }
        assert_eq!(of("canFilterBy").len(), 1);
        assert!(of("canFilterBy")[0].to_string().contains("\"owner\""));
        assert!(of("eventTrigger").is_empty());
        assert!(Topic::by_canonical(&notified_pull::canonical()).is_none());
    }
}
