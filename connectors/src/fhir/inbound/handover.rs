//! Acute Zorg referrals (ServiceRequest SNOMED 11131000146102, or the focus of a message
//! with a Composition) with their Composition sections and DocumentReference attachments
//! -> an acute-handover event.

use std::collections::HashSet;

use base64::Engine as _;
use ketenbus_schemas::EventHeader;
use ketenbus_schemas::event::{AcuteHandoverEvent, Attachment, Referral, Section, systems};
use sha2::{Digest, Sha256};

use super::{
    Doc, Entry, REASON_INVALID, SCT_TRANSFER_FROM_AMBULANCE, Value, codings, patient_of,
    professional_of, provider_of, s,
};
use crate::NormaliseError;

/// The referrals of a document: ServiceRequests for a transfer from the ambulance, and
/// those a message with a Composition is about.
pub(super) fn referrals<'d, 'a>(doc: &'d Doc<'a>) -> Vec<&'d Entry<'a>> {
    let focus: HashSet<&str> = doc
        .message_header()
        .map(|mh| {
            mh.res
                .arr("focus")
                .iter()
                .filter_map(|f| doc.resolve(Some(f)))
                .map(|e| e.path.as_str())
                .collect()
        })
        .unwrap_or_default();
    let has_composition = doc.of_type("Composition").next().is_some();
    doc.of_type("ServiceRequest")
        .filter(|sr| {
            let transfer = codings(sr.res.obj("code"))
                .any(|c| c.system == systems::SNOMED && c.code == SCT_TRANSFER_FROM_AMBULANCE);
            transfer || (has_composition && focus.contains(sr.path.as_str()))
        })
        .collect()
}

/// Plain text of an XHTML narrative: tags dropped, entities decoded, spaces collapsed.
#[must_use]
pub fn narrative_text(div: &str) -> String {
    let mut out = String::with_capacity(div.len());
    let mut rest = div;
    while let Some(i) = rest.find(['<', '&']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with('<') {
            let end = rest.find('>').map_or(rest.len(), |e| e + 1);
            // Block ends read as a space.
            out.push(' ');
            rest = &rest[end..];
        } else {
            // Entities are short: look no further than 10 bytes (a scan to the next `;` for
            // every `&` would cost the square of a text full of them).
            let end = rest.bytes().take(11).position(|b| b == b';');
            let Some(end) = end else {
                out.push('&');
                rest = &rest[1..];
                continue;
            };
            let ent = &rest[1..end];
            let ch = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ if ent.starts_with("#x") => u32::from_str_radix(&ent[2..], 16)
                    .ok()
                    .and_then(char::from_u32),
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            match ch {
                Some(c) => out.push(c),
                None => out.push_str(&rest[..=end]),
            }
            rest = &rest[end + 1..];
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One referral. `only_referral`: the document holds no other, so its Compositions and
/// attachments belong to this one even when the referral does not point at them.
pub(super) fn handover(
    doc: &Doc<'_>,
    sr: &Entry<'_>,
    only_referral: bool,
    header: &mut EventHeader,
) -> Result<AcuteHandoverEvent, NormaliseError> {
    let o = sr.res;
    let code = codings(o.obj("code")).next().ok_or_else(|| {
        NormaliseError::missing(
            format!("{}.code.coding", sr.path),
            "referral without a coded request",
        )
    })?;
    let referral = Referral {
        id: sr.id.map(str::to_owned),
        code,
        status: s(o, "status"),
        priority: s(o, "priority"),
        authored_on: s(o, "authoredOn"),
        reason: o
            .arr("reasonCode")
            .first()
            .and_then(Value::as_object)
            .and_then(|c| s(c, "text").or_else(|| codings(Some(c)).next().and_then(|x| x.display))),
    };
    let patient = patient_of(doc, o.get("subject"), &format!("{}.subject", sr.path))?;
    let requester_ref = o.get("requester");
    let (requester, mut requester_organization) = match doc.resolve(requester_ref).map(|e| e.ty) {
        Some("Organization") => (None, provider_of(doc, requester_ref)?),
        _ => (professional_of(doc, requester_ref, "requester")?, None),
    };
    if requester_organization.is_none()
        && let Some(e) = doc
            .resolve(requester_ref)
            .filter(|e| e.ty == "PractitionerRole")
    {
        requester_organization = provider_of(doc, e.res.get("organization"))?;
    }
    if requester_organization.is_none() {
        requester_organization = match doc.message_header() {
            Some(mh) => provider_of(doc, mh.res.get("sender"))?,
            None => None,
        };
    }
    let mut receiver_organization = provider_of(doc, o.arr("performer").first())?;
    if receiver_organization.is_none()
        && let Some(mh) = doc.message_header()
    {
        let dest = mh
            .res
            .arr("destination")
            .first()
            .and_then(|d| d.get("receiver"));
        receiver_organization = provider_of(doc, dest)?;
    }

    // Composition and attachments: those the referral points at, else all in the document.
    let supporting: Vec<&Entry<'_>> = o
        .arr("supportingInfo")
        .iter()
        .filter_map(|r| doc.resolve(Some(r)))
        .collect();
    let pick = |ty: &'static str| -> Vec<&Entry<'_>> {
        let linked: Vec<&Entry<'_>> = supporting.iter().copied().filter(|e| e.ty == ty).collect();
        if linked.is_empty() && only_referral {
            doc.of_type(ty).collect()
        } else {
            linked
        }
    };
    let mut sections = Vec::new();
    let compositions = pick("Composition");
    let (mut composition_type, mut composition_title, mut composition_date) = (None, None, None);
    let mut composition_author = None;
    if let Some(comp) = compositions.first() {
        let c = comp.res;
        composition_type = codings(c.obj("type")).next();
        composition_title = s(c, "title");
        composition_date = s(c, "date");
        let author = c.arr("author").first();
        if !matches!(
            doc.resolve(author).map(|e| e.ty),
            Some("Organization" | "Device" | "Patient" | "RelatedPerson")
        ) {
            composition_author = professional_of(doc, author, "author")?.map(Box::new);
        }
    }
    for comp in compositions {
        for sec in comp.res.arr("section").iter().filter_map(Value::as_object) {
            sections.push(Section {
                code: codings(sec.obj("code")).next(),
                title: s(sec, "title"),
                text: sec
                    .obj("text")
                    .and_then(|t| t.str("div"))
                    .map(narrative_text),
            });
        }
    }
    let mut attachments = Vec::new();
    for dr in pick("DocumentReference") {
        for (k, c) in dr.res.arr("content").iter().enumerate() {
            let Some(a) = c.get("attachment").and_then(Value::as_object) else {
                continue;
            };
            let Some(data) = a.str("data") else {
                // A pointer into ketenbus's content store names a document that did not come
                // with this message: whoever knows a hash would get another party's document.
                if a.str("url")
                    .is_some_and(|u| u.starts_with(crate::fhir::emit::CONTENT_URN))
                {
                    return Err(NormaliseError::Invalid {
                        reason: REASON_INVALID,
                        path: format!("{}.content[{k}].attachment.url", dr.path),
                        what: "a content reference to a document that did not come with this message; send the document as attachment.data".into(),
                    });
                }
                continue;
            };
            let path = format!("{}.content[{k}].attachment.data", dr.path);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.split_whitespace().collect::<String>())
                .map_err(|_| NormaliseError::Invalid {
                    reason: REASON_INVALID,
                    path: path.clone(),
                    what: "attachment data is not base64".into(),
                })?;
            attachments.push(Attachment {
                content_type: s(a, "contentType").ok_or_else(|| {
                    NormaliseError::missing(
                        format!("{}.content[{k}].attachment.contentType", dr.path),
                        "attachment without contentType",
                    )
                })?,
                title: s(a, "title"),
                document_type: codings(dr.res.obj("type")).next(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                size: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            });
        }
    }
    header.occurred_at = referral
        .authored_on
        .clone()
        .or_else(|| doc.timestamp.map(str::to_owned));
    Ok(AcuteHandoverEvent {
        header: header.clone(),
        patient,
        referral,
        requester,
        requester_organization,
        receiver_organization,
        sections,
        attachments,
        composition_type,
        composition_title,
        composition_date,
        composition_author,
    })
}
