//! What MEDLAB and MEDRPT share: a lab report is read segment by segment into its
//! lab-result event (the parties, the specimens, the determinations in order), which is
//! complete once a segment named the patient.

use ketenbus_schemas::event::{Coding, LabResultEvent, LabTestResult, Specimen};

use super::path;
use crate::NormaliseError;
use crate::edifact::parse::document::Message;

/// A lab-result event being read from a lab report.
pub(crate) trait LabReport: Sized {
    /// A new specimen, `specimen-<n>` in reading order; its index.
    fn add_specimen(&mut self, collected_at: Option<String>) -> usize;

    /// The next determination, `result-<n>` in reading order, of `test` with `status`,
    /// measured on specimen number `specimen` (its id and collection time), for the mapping
    /// to fill in and push onto `results`.
    fn next_result(&self, test: Coding, status: &str, specimen: Option<usize>) -> LabTestResult;

    /// The event, once every segment of `m` is read: it happened when the first specimen was
    /// collected, else at `document_date`.
    ///
    /// # Errors
    /// `missing_element` at the message header, saying `no_patient`, when no segment named
    /// the patient.
    fn finish(
        self,
        m: &Message<'_>,
        no_patient: &str,
        document_date: Option<String>,
    ) -> Result<Self, NormaliseError>;
}

impl LabReport for LabResultEvent {
    fn add_specimen(&mut self, collected_at: Option<String>) -> usize {
        self.specimens.push(Specimen {
            id: format!("specimen-{}", self.specimens.len() + 1),
            collected_at,
            ..Specimen::default()
        });
        self.specimens.len() - 1
    }

    fn next_result(&self, test: Coding, status: &str, specimen: Option<usize>) -> LabTestResult {
        let specimen = specimen.map(|i| &self.specimens[i]);
        LabTestResult {
            specimen_id: specimen.map(|s| s.id.clone()),
            effective_at: specimen.and_then(|s| s.collected_at.clone()),
            ..LabTestResult::new(format!("result-{}", self.results.len() + 1), test, status)
        }
    }

    fn finish(
        mut self,
        m: &Message<'_>,
        no_patient: &str,
        document_date: Option<String>,
    ) -> Result<Self, NormaliseError> {
        if self.patient.is_none() {
            return Err(NormaliseError::missing(
                path(m, &m.header(), None),
                no_patient,
            ));
        }
        self.header.occurred_at = self
            .specimens
            .iter()
            .find_map(|s| s.collected_at.clone())
            .or(document_date);
        crate::zib::range_warnings(&mut self);
        Ok(self)
    }
}
