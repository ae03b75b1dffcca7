//! What MEDLAB and MEDRPT share: a lab report is read segment by segment into a [`LabReport`]
//! (the parties, the specimens, the determinations in order), which then becomes one
//! lab-result event.

use ketenbus_schemas::EventHeader;
use ketenbus_schemas::event::{
    Coding, HealthProfessional, HealthcareProvider, LabResultEvent, LabTestResult, Patient,
    Specimen,
};

use super::path;
use crate::NormalizeError;
use crate::edifact::parse::document::Message;

/// A lab report being read.
#[derive(Default)]
pub(crate) struct LabReport {
    pub patient: Option<Patient>,
    pub performer: Option<HealthcareProvider>,
    pub requester: Option<HealthProfessional>,
    pub professionals: Vec<HealthProfessional>,
    pub specimens: Vec<Specimen>,
    pub results: Vec<LabTestResult>,
    pub comments: Vec<String>,
}

impl LabReport {
    /// A new specimen, `specimen-<n>` in reading order; its index.
    pub fn add_specimen(&mut self, collected_at: Option<String>) -> usize {
        self.specimens.push(Specimen {
            id: format!("specimen-{}", self.specimens.len() + 1),
            collected_at,
            ..Specimen::default()
        });
        self.specimens.len() - 1
    }

    /// The next determination, `result-<n>` in reading order, of `test` with `status`,
    /// measured on specimen number `specimen` (its id and collection time), for the
    /// mapping to fill in and [`push`](Vec::push) onto `results`.
    pub fn next_result(
        &self,
        test: Coding,
        status: &str,
        specimen: Option<usize>,
    ) -> LabTestResult {
        let specimen = specimen.map(|i| &self.specimens[i]);
        LabTestResult {
            specimen_id: specimen.map(|s| s.id.clone()),
            effective_at: specimen.and_then(|s| s.collected_at.clone()),
            ..LabTestResult::new(format!("result-{}", self.results.len() + 1), test, status)
        }
    }

    /// The event, once every segment of `m` is read: it happened when the first specimen was
    /// collected, else at `document_date`.
    ///
    /// # Errors
    /// `missing_element` at the message header, saying `no_patient`, when no segment named
    /// the patient.
    pub fn finish(
        self,
        mut header: EventHeader,
        m: &Message<'_>,
        no_patient: &str,
        document_date: Option<String>,
    ) -> Result<LabResultEvent, NormalizeError> {
        let Some(patient) = self.patient else {
            return Err(NormalizeError::missing(
                path(m, &m.header(), None),
                no_patient,
            ));
        };
        header.occurred_at = self
            .specimens
            .iter()
            .find_map(|s| s.collected_at.clone())
            .or(document_date);
        Ok(LabResultEvent {
            header,
            patient: Some(patient),
            performer: self.performer,
            requester: self.requester,
            professionals: self.professionals,
            specimens: self.specimens,
            results: self.results,
            comments: self.comments,
        })
    }
}
