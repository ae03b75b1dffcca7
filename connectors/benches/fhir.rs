// Placeholder so the manifest parses until the FHIR bench lands (helper-3 replaces this file).
fn main() {}
