//! eOverdracht notify-then-pull: a `Task` -> a handover notification without patient data.

use ketenbus_schemas::EventHeader;
use ketenbus_schemas::event::{HandoverNotificationEvent, TaskInput};

use super::{Doc, Entry, Value, codings, s};
use crate::fhir::value::Object;
use crate::{NormaliseError, party};

pub(super) fn notification(
    doc: &Doc<'_>,
    task: &Entry<'_>,
    mut header: EventHeader,
) -> Result<HandoverNotificationEvent, NormaliseError> {
    let o = task.res;
    let status = o.str("status").ok_or_else(|| {
        NormaliseError::missing(format!("{}.status", task.path), "Task without status")
    })?;
    let source = doc
        .message_header()
        .and_then(|mh| mh.res.obj("source"))
        .and_then(|s| s.str("endpoint"));
    let absolute = task
        .full_url
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"));
    let task_reference = match (absolute, source, task.id) {
        (Some(u), _, _) => u.to_owned(),
        (None, Some(base), Some(id)) => format!("{}/Task/{id}", base.trim_end_matches('/')),
        (None, None, Some(id)) => format!("Task/{id}"),
        _ => {
            return Err(NormaliseError::missing(
                format!("{}.id", task.path),
                "Task without id or absolute fullUrl",
            ));
        }
    };
    let sender_endpoint = source.map(str::to_owned).or_else(|| {
        task_reference
            .find("/Task/")
            .filter(|_| absolute.is_some())
            .map(|i| task_reference[..i].to_owned())
    });
    header.occurred_at = s(o, "lastModified")
        .or_else(|| s(o, "authoredOn"))
        .or_else(|| doc.timestamp.map(str::to_owned));
    Ok(HandoverNotificationEvent {
        header,
        task_reference,
        task_status: status.to_owned(),
        sender_endpoint,
        requester: o
            .get("requester")
            .and_then(|r| party::fhir_reference(doc, r)),
        owner: o.get("owner").and_then(|r| party::fhir_reference(doc, r)),
        inputs: inputs(o),
    })
}

/// `Task.input` elements that point at something. Other values (the `authorization-base`
/// string of Twiin's notified pull is a credential) stay out of the event.
fn inputs(o: &Object) -> Vec<TaskInput> {
    o.arr("input")
        .iter()
        .filter_map(Value::as_object)
        .filter_map(|i| {
            let reference = i
                .obj("valueReference")
                .and_then(|r| r.str("reference"))
                .or_else(|| i.str("valueUrl"))
                .or_else(|| i.str("valueUri"))?;
            Some(TaskInput {
                type_code: codings(i.obj("type")).next(),
                reference: reference.to_owned(),
            })
        })
        .collect()
}
