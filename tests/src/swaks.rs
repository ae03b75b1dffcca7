//! swaks, the SMTP client the mail tests send with (TLS, AUTH, pipelining), as a small
//! builder: one place that knows its command line.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// One swaks run, built up option by option; [`run`](Swaks::run) sends.
#[derive(Debug, Clone)]
pub struct Swaks {
    args: Vec<OsString>,
    body: Option<Vec<u8>>,
}

impl Swaks {
    /// To the SMTP server at `server` (`host:port`).
    #[must_use]
    pub fn server(server: &str) -> Swaks {
        Swaks {
            args: vec!["--server".into(), server.into()],
            body: None,
        }
    }

    /// To the SMTP server on loopback `port`.
    #[must_use]
    pub fn port(port: u16) -> Swaks {
        Swaks::server(&format!("127.0.0.1:{port}"))
    }

    fn arg(mut self, name: &str, value: impl Into<OsString>) -> Swaks {
        self.args.push(name.into());
        self.args.push(value.into());
        self
    }

    /// The envelope sender.
    #[must_use]
    pub fn from(self, address: &str) -> Swaks {
        self.arg("--from", address)
    }

    /// The envelope recipients, comma separated.
    #[must_use]
    pub fn to(self, addresses: &str) -> Swaks {
        self.arg("--to", addresses)
    }

    /// STARTTLS, required.
    #[must_use]
    pub fn tls(mut self) -> Swaks {
        self.args.push("--tls".into());
        self
    }

    /// Pipeline the envelope.
    #[must_use]
    pub fn pipeline(mut self) -> Swaks {
        self.args.push("--pipeline".into());
        self
    }

    /// AUTH with `mechanism` (`PLAIN`, `LOGIN`) as `user`.
    #[must_use]
    pub fn auth(self, mechanism: &str, user: &str, password: &str) -> Swaks {
        self.arg("--auth", mechanism)
            .arg("--auth-user", user)
            .arg("--auth-password", password)
    }

    /// The message: the file at `path`.
    #[must_use]
    pub fn data(self, path: &Path) -> Swaks {
        self.arg("--data", path)
    }

    /// The message: these bytes (written to a file for the run).
    #[must_use]
    pub fn data_bytes(mut self, body: &[u8]) -> Swaks {
        self.body = Some(body.to_vec());
        self
    }

    /// Send; the server must take the mail: the id in its `250 ... queued as <id>`.
    ///
    /// # Panics
    /// When swaks fails (with everything it printed), or the answer names no id.
    #[must_use]
    pub fn queued(&self) -> String {
        let (ok, out) = self.run();
        assert!(ok, "{out}");
        queued_id(&out)
    }

    /// Send, with a 30 s timeout per step; (success, everything swaks printed).
    ///
    /// # Panics
    /// When swaks cannot run (`ops/mail/setup.sh` installs it).
    #[must_use]
    pub fn run(&self) -> (bool, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("swaks");
        cmd.args(&self.args);
        if let Some(body) = &self.body {
            let data = dir.path().join("message.eml");
            std::fs::write(&data, body).expect("write the message");
            cmd.arg("--data").arg(&data);
        }
        let out = cmd
            .args(["--timeout", "30"])
            .output()
            .expect("swaks (installed by ops/mail/setup.sh)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// The id in a swaks transcript's `250 2.0.0 Ok: queued as <id>`.
///
/// # Panics
/// When there is none.
#[must_use]
pub fn queued_id(transcript: &str) -> String {
    let at = transcript
        .rfind("queued as ")
        .unwrap_or_else(|| panic!("no queued-as in:\n{transcript}"));
    transcript[at + 10..]
        .split_whitespace()
        .next()
        .expect("an id after queued as")
        .to_owned()
}
