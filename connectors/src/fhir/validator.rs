//! Test helper: the independent validator (npm `fhir` 4.x, `tests/node/validate.js`),
//! installed by `tests/node/setup.sh` on first use.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::json;
use super::value::Value;

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/node")
}

/// Run `setup.sh` once per test process when `node_modules` is missing.
fn ensure_installed() {
    static INSTALL: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *done {
        return;
    }
    let dir = node_dir();
    if !dir.join("node_modules/fhir/package.json").exists() {
        let status = Command::new("bash")
            .arg(dir.join("setup.sh"))
            .status()
            .expect("bash runs tests/node/setup.sh");
        assert!(
            status.success(),
            "tests/node/setup.sh failed: the FHIR validator could not be installed"
        );
    }
    *done = true;
}

/// Validate resources (JSON form). `Ok(report)` when all are valid, else `Err(report)`.
pub(crate) fn validate(resources: &[Value]) -> Result<String, String> {
    ensure_installed();
    let input = json::to_vec(&Value::Array(resources.to_vec()));
    let mut child = Command::new("node")
        .arg(node_dir().join("validate.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is installed (the FHIR validator runs on it)");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(&input)
        .expect("validator reads stdin");
    let out = child.wait_with_output().expect("validator finishes");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// A Bundle and every resource in it, validated one by one.
pub(crate) fn assert_valid_bundle(bundle: &Value) {
    let mut all = vec![bundle.clone()];
    for e in bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or_default()
    {
        if let Some(r) = e.get("resource") {
            all.push(r.clone());
        }
    }
    if let Err(report) = validate(&all) {
        panic!("npm fhir validator refused what ketenbus emits:\n{report}");
    }
}

#[test]
fn the_validator_refuses_an_invalid_resource() {
    let bad = json::parse(br#"{"resourceType":"Observation","status":"nonsense"}"#).unwrap();
    let report = validate(&[bad]).unwrap_err();
    assert!(report.contains("Observation.code"), "{report}");
}
