//! Secure mail through real peers on loopback: swaks as SMTP client (TLS, AUTH, pipelining,
//! oversize, bad recipient), Postfix relaying into the SMTP listener and delivering the mail
//! sink's messages to a maildir (and their DSNs back), Dovecot as the hub the IMAP pickup
//! reads from, with a crash between store and move. The peers are Debian's packages,
//! installed by `ops/mail/setup.sh` when missing; each test starts its own with a config in
//! a temporary directory.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ketenbus_connectors::mail::dsn;
use ketenbus_tests::{
    Broker, Receiver, Swaks, eventually_blocking, free_port, lineage, lineage_until, queued_id,
    within,
};
use mail_parser::{MessageParser, MimeHeaders};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("connectors/testdata/mail").join(name)
}

/// Install the mail peers once when they are missing.
fn ensure_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let have = |p: &str| Path::new(p).exists();
        let ssl = Command::new("perl")
            .args(["-MNet::SSLeay", "-e1"])
            .status()
            .is_ok_and(|s| s.success());
        if !(have("/usr/sbin/postfix")
            && have("/usr/bin/swaks")
            && have("/usr/sbin/dovecot")
            && have("/usr/sbin/smtp-sink")
            && ssl)
        {
            let out = Command::new("bash")
                .arg(root().join("ops/mail/setup.sh"))
                .output()
                .expect("run ops/mail/setup.sh");
            assert!(
                out.status.success(),
                "ops/mail/setup.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

/// A temporary directory other users (postfix, dovecot, nobody) can enter.
fn open_tempdir() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    chmod(t.path(), "755");
    t
}

fn chmod(p: &Path, mode: &str) {
    assert!(
        Command::new("chmod")
            .arg(mode)
            .arg(p)
            .status()
            .unwrap()
            .success()
    );
}

fn chown(p: &Path, owner: &str) {
    assert!(
        Command::new("chown")
            .args(["-R", owner])
            .arg(p)
            .status()
            .unwrap()
            .success()
    );
}

fn wait_port(port: u16) {
    eventually_blocking(
        Duration::from_secs(15),
        &format!("a listener on port {port}"),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
}

/// A test CA and a certificate for localhost / 127.0.0.1 signed by it, in a temporary
/// directory the peers can read (a test may put its other files there too).
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
}

/// The mail peers installed, and [`Certs`] made for a test.
fn certs() -> Certs {
    ensure_tools();
    let tmp = open_tempdir();
    let dir = tmp.path();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ketenbus test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    chmod(&dir.join("key.pem"), "644");
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        dir: tmp,
    }
}

/// A private Postfix instance: relays everything to `relay_port` (the broker's SMTP
/// listener), delivers `gp.example.test` to a maildir, offers STARTTLS.
struct Postfix {
    conf: PathBuf,
    port: u16,
    /// SMTPS (implicit TLS, RFC 8314) submission port.
    smtps_port: u16,
    maildir: PathBuf,
    dir: PathBuf,
    /// The test CA that signed its certificate.
    ca: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Postfix {
    fn start(relay_port: u16, certs: &Certs) -> Postfix {
        ensure_tools();
        let tmp = open_tempdir();
        let dir = tmp.path().to_path_buf();
        let smtps_port = free_port();
        let port = free_port();
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data", "vmail"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        chown(&dir.join("data"), "postfix");
        chown(&dir.join("vmail"), "65534:65534");
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("postfix master.cf");
        let mut lines = Vec::new();
        for l in master.lines() {
            if l.starts_with("smtp ") && l.contains(" inet ") {
                lines.push(format!("127.0.0.1:{port} inet n - n - - smtpd"));
                lines.push(format!(
                    "127.0.0.1:{smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes"
                ));
            } else if !l.is_empty() && !l.starts_with('#') && !l.starts_with(char::is_whitespace) {
                // No chroot: the instance lives in a temporary directory.
                let mut f: Vec<&str> = l.split_whitespace().collect();
                if f.len() >= 8 {
                    f[4] = "n";
                }
                lines.push(f.join(" "));
            } else {
                lines.push(l.to_owned());
            }
        }
        std::fs::write(conf.join("master.cf"), lines.join("\n") + "\n").unwrap();
        let d = dir.display();
        let main = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\nmail_owner = postfix\nsetgid_group = postdrop\n\
             myhostname = relay.ketenbus.test\nmydomain = ketenbus.test\nmyorigin = $myhostname\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             mydestination =\nmynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{relay_port}\nsmtp_dns_support_level = disabled\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\nalias_maps =\nalias_database =\nbiff = no\n\
             virtual_mailbox_domains = gp.example.test\nvirtual_mailbox_base = {d}/vmail\nvirtual_mailbox_maps = static:huisarts/\n\
             virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\n\
             transport_maps = inline:{{ {{closed.example.test=error:5.1.1 mailbox closed}} }}\nsmtpd_reject_unlisted_recipient = no\n\
             smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\nsmtp_tls_security_level = may\nsmtpd_tls_loglevel = 1\n\
             maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\n",
            certs.cert.display(),
            certs.key.display()
        );
        std::fs::write(conf.join("main.cf"), main).unwrap();
        let out = Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .output()
            .expect("postfix");
        assert!(
            out.status.success(),
            "postfix did not start: {}",
            std::fs::read_to_string(dir.join("maillog")).unwrap_or_default()
        );
        wait_port(port);
        wait_port(smtps_port);
        Postfix {
            conf,
            port,
            smtps_port,
            maildir: dir.join("vmail/huisarts"),
            dir,
            ca: certs.ca.clone(),
            _tmp: tmp,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// A [`mail_sink`] through this Postfix: STARTTLS on its port, or `implicit` TLS on its
    /// SMTPS port.
    fn sink(&self, name: &str, tls: &str, to: &str, extra: &str) -> String {
        let port = if tls == "implicit" {
            self.smtps_port
        } else {
            self.port
        };
        mail_sink(name, port, tls, &self.ca, to, extra)
    }

    /// Messages delivered to the maildir.
    fn delivered(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in rd.flatten() {
                    out.push(std::fs::read(e.path()).unwrap());
                }
            }
        }
        out
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .output();
    }
}

/// A private Dovecot with one user `hub` (password `hubpass`) and IMAPS on a loopback port.
struct Dovecot {
    imaps_port: u16,
    maildir: PathBuf,
    dir: PathBuf,
    /// The test CA that signed its certificate.
    ca: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Dovecot {
    fn start(certs: &Certs) -> Dovecot {
        ensure_tools();
        let tmp = open_tempdir();
        let dir = tmp.path().to_path_buf();
        let (imap_port, imaps_port) = (free_port(), free_port());
        for d in [
            "run",
            "state",
            "mail/hub/Maildir/new",
            "mail/hub/Maildir/cur",
            "mail/hub/Maildir/tmp",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        chown(&dir.join("mail"), "65534:65534");
        std::fs::write(dir.join("users"), "hub:{PLAIN}hubpass\n").unwrap();
        let d = dir.display();
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\nprotocols = imap\nlisten = 127.0.0.1\n\
             ssl = yes\nssl_cert = <{}\nssl_key = <{}\ndisable_plaintext_auth = no\nauth_mechanisms = plain login\n\
             default_internal_user = dovecot\ndefault_login_user = dovenull\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/users\n}}\n\
             userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home={d}/mail/%u\n}}\n\
             mail_location = maildir:{d}/mail/%u/Maildir\n\
             service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {imap_port}\n  }}\n  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {imaps_port}\n    ssl = yes\n  }}\n}}\n",
            certs.cert.display(),
            certs.key.display()
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        // Not `output()`: the daemon keeps inherited pipes open.
        let err = std::fs::File::create(dir.join("start.err")).unwrap();
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .expect("dovecot");
        assert!(
            status.success(),
            "dovecot did not start: {}",
            std::fs::read_to_string(dir.join("start.err")).unwrap_or_default()
        );
        wait_port(imaps_port);
        Dovecot {
            imaps_port,
            maildir: dir.join("mail/hub/Maildir"),
            dir,
            ca: certs.ca.clone(),
            _tmp: tmp,
        }
    }

    /// A broker whose IMAP pickup `hub` reads this inbox as user hub over TLS trusting the
    /// test CA, with `extra` keys of the pickup, and `subscriptions`.
    fn broker(&self, extra: &str, subscriptions: &str) -> Broker {
        let config = format!(
            "[[mail.imap]]\nname = \"hub\"\nhost = \"127.0.0.1\"\nport = {}\nca_file = {:?}\nusername = \"hub\"\npassword_env = \"TEST_IMAP_PASSWORD\"\n\
             {extra}\n{subscriptions}",
            self.imaps_port, self.ca,
        );
        Broker::start_with_env(&config, &[("TEST_IMAP_PASSWORD", "hubpass")])
    }

    /// Put a message into the inbox, as the hub's delivery would.
    fn deliver(&self, name: &str, bytes: &[u8]) {
        let p = self.maildir.join("new").join(name);
        std::fs::write(&p, bytes).unwrap();
        chown(&p, "65534:65534");
    }

    fn create_folder(&self, name: &str) {
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(self.maildir.join(format!(".{name}")).join(sub)).unwrap();
        }
        chown(&self.maildir, "65534:65534");
    }

    fn count(&self, folder: &str) -> usize {
        let base = if folder == "INBOX" {
            self.maildir.clone()
        } else {
            self.maildir.join(format!(".{folder}"))
        };
        ["new", "cur"]
            .iter()
            .map(|s| {
                std::fs::read_dir(base.join(s))
                    .map(Iterator::count)
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/master.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// A subscription `name` that sends letters by mail to `to` through the SMTP server on
/// loopback `port` (`tls`: `starttls` or `implicit`, trusting the test CA); `extra`: more
/// lines after the sink's.
fn mail_sink(name: &str, port: u16, tls: &str, ca: &Path, to: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nkinds = [\"letter\"]\n[subscriptions.sink]\ntype = \"mail\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"{tls}\"\nca_file = {ca:?}\n\
         from = \"ketenbus@ketenbus.example.test\"\nto = \"{to}\"\n{extra}"
    )
}

/// A mail from `from` to the GP's mailbox (500005678) through the SMTP server on loopback
/// `port`, with the fixture `file` as message.
fn to_the_gp(port: u16, from: &str, file: &str) -> Swaks {
    Swaks::port(port)
        .from(from)
        .to("500005678@lms.example.test")
        .data(&fixture(file))
}

fn smtp_config(port: u16, certs: &Certs, extra: &str) -> String {
    format!(
        "[mail.smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"ketenbus.test\"\nmax_message_size = \"64 KiB\"\n\
         accept_domains = [\"lms.example.test\", \"ketenbus.example.test\"]\n{extra}\n\
         [mail.smtp.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        certs.cert, certs.key
    )
}

fn subscription(name: &str, kinds: &str, url: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nkinds = [{kinds}]\nsink = {{ type = \"webhook\", url = \"{url}\" }}\n[subscriptions.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_covers_tls_auth_pipelining_and_every_refusal() {
    let certs = certs();
    let rx = Receiver::answering(204).await;
    let port = free_port();
    let config = format!(
        "{}[mail.smtp.auth]\nrequired = false\nusers = [{{ username = \"lab\", password_env = \"TEST_SMTP_LAB_PASSWORD\", party_ids = [\"mailbox:500001234\"] }}]\n{}",
        smtp_config(port, &certs, ""),
        subscription("letters", "\"letter\"", &rx.url())
    );
    let broker = Broker::start_with_env(
        &config,
        &[("TEST_SMTP_LAB_PASSWORD", "lab-password-for-tests")],
    );
    let ready: serde_json::Value = broker.get_json("/readyz").await;
    assert_eq!(ready["components"]["smtp"]["state"], "ready", "{ready}");
    let letter = fixture("letter-pdf.eml");
    let base = Swaks::port(port).from("specialist@ziekenhuis.example.test");

    // To the GP's mailbox over STARTTLS, logged in as "lab".
    let lab = base.clone().to("500005678@lms.example.test").tls().auth(
        "PLAIN",
        "lab",
        "lab-password-for-tests",
    );

    // STARTTLS, AUTH PLAIN, pipelined envelope: accepted only once durable.
    let (ok, out) = lab.clone().pipeline().data(&letter).run();
    assert!(ok, "{out}");
    assert!(
        out.contains("250-STARTTLS")
            && out.contains("250-PIPELINING")
            && out.contains("250-8BITMIME")
            && out.contains("250-SIZE 65536"),
        "{out}"
    );
    assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
    let id = queued_id(&out);
    let l = lineage_until(&broker.url, &id, |l| {
        l["events"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert_eq!(l["connector"], "smtp");
    assert_eq!(l["format"], "rfc822");
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let event: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(event["header"]["kind"], "letter");
    assert_eq!(event["header"]["receiver"], "mailbox:500005678");
    let pdf = std::fs::read(fixture("ontslagbrief.pdf")).unwrap();
    let sha = ketenbus_connectors::contract::content::sha256_hex(&pdf);
    assert_eq!(event["attachments"][0]["sha256"], sha.as_str());
    let stored = std::fs::read(broker.dir.join("data/content").join(&sha))
        .expect("the PDF is in the content store");
    assert_eq!(stored, pdf);
    assert_eq!(
        l["sender"], "mailbox:500001234",
        "a letter declares no sender: the login's party"
    );

    // The login may send as mailbox 500001234 only: a lab result whose UNB names another
    // sender is refused for good, before anything is stored; its own goes through.
    let own = std::fs::read_to_string(fixture("lab-result-edifact-body.eml")).unwrap();
    let forged = certs.dir.path().join("forged.eml");
    std::fs::write(&forged, own.replace("+500001234+", "+500009999+")).unwrap();
    let (ok, out) = lab.clone().data(&forged).run();
    assert!(!ok, "{out}");
    assert!(
        out.contains("550 5.7.1") && out.contains("mailbox:500009999"),
        "{out}"
    );
    let id = lab
        .clone()
        .data(&fixture("lab-result-edifact-body.eml"))
        .queued();
    let l = lineage_until(&broker.url, &id, |l| l["connector"] == "smtp").await;
    assert_eq!(l["sender"], "mailbox:500001234");

    // AUTH is not offered before STARTTLS: the client cannot authenticate in clear text.
    let (ok, out) = base
        .clone()
        .to("500005678@lms.example.test")
        .auth("PLAIN", "lab", "lab-password-for-tests")
        .run();
    assert!(!ok, "{out}");
    assert!(!out.contains("250-AUTH"), "{out}");
    // A wrong password is refused.
    let (ok, out) = base
        .clone()
        .to("500005678@lms.example.test")
        .tls()
        .auth("LOGIN", "lab", "wrong")
        .run();
    assert!(!ok && out.contains("535 5.7.8"), "{out}");
    // A recipient outside the accepted domains.
    let (ok, out) = base.clone().to("someone@elsewhere.example.test").run();
    assert!(
        !ok && out
            .contains("550 5.1.1 <someone@elsewhere.example.test>: recipient address rejected"),
        "{out}"
    );
    // Too big: announced limit 64 KiB, 100 KiB sent.
    let big = certs.dir.path().join("big.eml");
    let mut body = String::from("From: a@b.test\r\nSubject: big\r\n\r\n");
    while body.len() < 100 * 1024 {
        body.push_str("0123456789012345678901234567890123456789012345678901234567890123456789\r\n");
    }
    std::fs::write(&big, body).unwrap();
    let (ok, out) = base.to("500005678@lms.example.test").data(&big).run();
    assert!(!ok && out.contains("552 5.3.4"), "{out}");
    // Nothing refused reached a subscriber.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_relays_an_edifact_lab_result_that_reaches_a_webhook() {
    let certs = certs();
    let rx = Receiver::answering(204).await;
    let port = free_port();
    let broker = Broker::start(&format!(
        "{}{}",
        smtp_config(port, &certs, ""),
        subscription("gp-lab", "\"lab_result\"", &rx.url())
    ));
    let postfix = Postfix::start(port, &certs);
    let (ok, out) = Swaks::port(postfix.port)
        .from("500001234@lms.example.test")
        .to("500005678@lms.example.test")
        .data(&fixture("lab-result-edifact-attachment.eml"))
        .run();
    assert!(ok, "{out}");
    let got = rx.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        1,
        "postfix log:\n{}\nbroker log:\n{}",
        postfix.log(),
        broker.log_text()
    );
    assert_eq!(got[0].header("ketenbus-kind"), Some("lab_result"));
    let event: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(event["header"]["source_format"], "edifact");
    assert!(!event["results"].as_array().unwrap().is_empty());
    let envelope = got[0].header("ketenbus-envelope-id").unwrap().to_owned();
    let l = lineage_until(&broker.url, &envelope, |l| l["connector"] == "smtp").await;
    assert_eq!(l["format"], "rfc822");
    // Postfix handed it over with STARTTLS and heard 250 only after the broker stored it.
    let log = postfix.log();
    assert!(log.contains(&format!("queued as {envelope}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_to_two_recipients_through_postfix_reaches_each_recipients_subscriptions() {
    let certs = certs();
    let (a_letters, b_letters, b_raw) = (
        Receiver::answering(204).await,
        Receiver::answering(204).await,
        Receiver::answering(204).await,
    );
    let port = free_port();
    let filtered = |name: &str, kinds: &str, receiver: &str, url: &str| {
        format!(
            "[[subscriptions]]\nname = \"{name}\"\nkinds = [{kinds}]\nfilter = {{ receivers = [\"{receiver}\"] }}\n\
             sink = {{ type = \"webhook\", url = \"{url}\" }}\n"
        )
    };
    let broker = Broker::start(&format!(
        "{}{}{}{}",
        smtp_config(port, &certs, ""),
        filtered(
            "a-letters",
            "\"letter\"",
            "mailbox:500005678",
            &a_letters.url()
        ),
        filtered(
            "b-letters",
            "\"letter\"",
            "mailbox:500009876",
            &b_letters.url()
        ),
        filtered("b-raw", "\"raw\"", "mailbox:500009876", &b_raw.url()),
    ));
    let postfix = Postfix::start(port, &certs);
    let (ok, out) = Swaks::port(postfix.port)
        .from("specialist@ziekenhuis.example.test")
        .to("500005678@lms.example.test,500009876@lms.example.test")
        .data(&fixture("letter-pdf.eml"))
        .run();
    assert!(ok, "{out}");
    for (rx, what) in [
        (&a_letters, "a-letters"),
        (&b_letters, "b-letters"),
        (&b_raw, "b-raw"),
    ] {
        let got = rx.wait_for(1, Duration::from_secs(30)).await;
        assert_eq!(
            got.len(),
            1,
            "{what}\npostfix log:\n{}\nbroker log:\n{}",
            postfix.log(),
            broker.log_text()
        );
    }
    let event = |rx: &Receiver| -> serde_json::Value {
        serde_json::from_slice(&rx.received()[0].body).unwrap()
    };
    assert_eq!(event(&a_letters)["header"]["receiver"], "mailbox:500005678");
    assert_eq!(event(&b_letters)["header"]["receiver"], "mailbox:500009876");
    // One message, one copy of the letter per recipient.
    assert_eq!(
        b_raw.received()[0].header("ketenbus-envelope-id"),
        a_letters.received()[0].header("ketenbus-envelope-id")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a_letters.received().len() + b_letters.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_letter_reaches_a_secure_mail_subscriber_and_its_dsn_comes_back() {
    let certs = certs();
    let raw = Receiver::answering(204).await;
    let port = free_port();
    // Postfix needs the broker's port, the broker Postfix's: take both first.
    let postfix = Postfix::start(port, &certs);
    let sink = postfix.sink(
        "gp-by-mail",
        "starttls",
        "huisarts@gp.example.test",
        "[subscriptions.retry]\ninitial = \"200ms\"\nmax = \"2s\"\n",
    );
    let config = format!(
        "{}{}{}",
        smtp_config(port, &certs, ""),
        subscription("everything-raw", "\"raw\"", &raw.url()),
        sink
    );
    let broker = Broker::start(&config);
    let envelope = to_the_gp(port, "specialist@ziekenhuis.example.test", "letter-pdf.eml").queued();

    // The mail arrives in the GP's maildir, readable, with the PDF.
    let delivered = within(Duration::from_secs(30), async || {
        Some(postfix.delivered()).filter(|d| !d.is_empty())
    })
    .await
    .unwrap_or_default();
    assert_eq!(
        delivered.len(),
        1,
        "postfix log:\n{}\nbroker log:\n{}",
        postfix.log(),
        broker.log_text()
    );
    let mail = MessageParser::default().parse(&delivered[0]).unwrap();
    let record = format!("{envelope}.0");
    let subject = mail.subject().unwrap();
    assert_eq!(subject, format!("Brief via ketenbus [{record}]"));
    assert!(
        !subject.contains("Ontslagbrief"),
        "no patient data in the subject"
    );
    assert_eq!(
        mail.message_id(),
        Some(format!("{record}@ketenbus.example.test").as_str())
    );
    let text = mail.body_text(0).unwrap();
    assert!(
        text.contains("Geachte collega,") && text.contains("Ontslagbrief (synthetisch)"),
        "{text}"
    );
    let pdf = std::fs::read(fixture("ontslagbrief.pdf")).unwrap();
    let got_pdf = mail
        .attachments()
        .find(|a| a.attachment_name() == Some("ontslagbrief.pdf"))
        .expect("the PDF is attached");
    assert_eq!(got_pdf.contents(), pdf.as_slice());
    let json = mail
        .attachments()
        .find(|a| a.attachment_name() == Some("ketenbus-event.json"))
        .expect("the event as JSON");
    let event: serde_json::Value = serde_json::from_slice(json.contents()).unwrap();
    assert_eq!(event["header"]["id"], record.as_str());
    assert!(
        postfix.log().contains("starttls=1"),
        "the sink used STARTTLS:\n{}",
        postfix.log()
    );
    let l = lineage_until(&broker.url, &envelope, |l| {
        l["deliveries"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["subscription"] == "gp-by-mail" && d["outcome"] == "delivered")
        })
    })
    .await;
    assert_eq!(l["connector"], "smtp");

    // Postfix's success DSN comes back through the SMTP listener and names the delivery.
    let report = within(Duration::from_secs(30), async || {
        raw.received().iter().find_map(|r| dsn::parse(&r.body))
    })
    .await
    .unwrap_or_else(|_| panic!("no DSN came back; postfix log:\n{}", postfix.log()));
    assert_eq!(report.record_id().as_deref(), Some(record.as_str()));
    // The envelope id carries the sink's token: `<record id>/<32 hex>`.
    let envid = report.original_envelope_id.clone().unwrap_or_default();
    let token = envid
        .strip_prefix(&format!("{record}/"))
        .unwrap_or_else(|| panic!("envelope id {envid}"));
    assert!(
        token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{envid}"
    );
    assert_eq!(report.action(), Some(dsn::Action::Delivered));
    // ...and the router puts it in the delivery's lineage.
    let l = lineage_until(&broker.url, &envelope, |l| {
        l["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["stage"] == "delivery_report"))
    })
    .await;
    let step = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "delivery_report")
        .unwrap()
        .clone();
    assert_eq!(step["outcome"], "delivered");
    assert_eq!(step["subscription"], "gp-by-mail");
    assert_eq!(step["record_id"], record.as_str());
    assert_eq!(step["reason"], "dsn_2.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounced_letter_becomes_a_dead_letter_that_replays() {
    let certs = certs();
    let port = free_port();
    let postfix = Postfix::start(port, &certs);
    // Postfix takes the mail, then bounces it: the mailbox at closed.example.test is closed.
    let sink = postfix.sink("gp-by-mail", "starttls", "huisarts@closed.example.test", "");
    let broker = Broker::start(&format!("{}{sink}", smtp_config(port, &certs, "")));
    let envelope = to_the_gp(port, "specialist@ziekenhuis.example.test", "letter-pdf.eml").queued();
    let record = format!("{envelope}.0");

    // The server accepted it (delivered as far as SMTP goes), its DSN says failed, and the
    // delivery ends as a dead letter.
    let l = lineage_until(&broker.url, &envelope, |l| {
        l["deliveries"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["subscription"] == "gp-by-mail" && d["outcome"] == "dead_lettered")
        })
    })
    .await;
    let steps = l["steps"].as_array().unwrap();
    let report = steps
        .iter()
        .find(|s| s["stage"] == "delivery_report" && s["outcome"] == "failed")
        .unwrap_or_else(|| panic!("no failure report: {l:#}\npostfix:\n{}", postfix.log()));
    assert_eq!(report["reason"], "dsn_5.1.1");
    assert_eq!(report["record_id"], record.as_str());
    let (ok, listed, err) = broker.cli(&["dlq", "list", "--subscription", "gp-by-mail"]);
    assert!(ok, "{err}");
    assert!(
        listed.contains(&record) && listed.contains("bounced"),
        "{listed}"
    );

    // Replayed, the very letter goes out again (and bounces again: the address is closed).
    let (ok, _, err) = broker.cli(&[
        "dlq",
        "replay",
        "--subscription",
        "gp-by-mail",
        "--id",
        &record,
    ]);
    assert!(ok, "{err}");
    let log = broker
        .eventually(
            Duration::from_secs(30),
            "the replay to reach the server",
            async || {
                let log = postfix.log();
                let sent = log.matches("to=<huisarts@closed.example.test>").count();
                if sent >= 2 { Ok(log) } else { Err(log) }
            },
        )
        .await;
    assert!(log.contains("mailbox closed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_pickup_survives_a_crash_between_store_and_move() {
    let certs = certs();
    let dovecot = Dovecot::start(&certs);
    dovecot.deliver(
        "1764000000.M1.hub",
        &std::fs::read(fixture("lab-result-edifact-attachment.eml")).unwrap(),
    );
    let rx = Receiver::answering(204).await;
    let mut broker = dovecot.broker(
        "tls = \"implicit\"\nprocessed_folder = \"Processed\"\npoll_interval = \"200ms\"\nreceiver = \"mailbox:500005678\"",
        &subscription("gp-lab", "\"lab_result\"", &rx.url()),
    );
    // Stored and delivered; the move fails (the folder does not exist yet), so the message
    // stays in the inbox, remembered in the state file.
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let state = broker.dir.join("data/imap/hub.state");
    broker
        .eventually(
            Duration::from_secs(10),
            "the state to be written",
            async || {
                std::fs::read_to_string(&state)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    == 1
            },
        )
        .await;
    // Several more looks: recognised each time, never ingested again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(dovecot.count("INBOX"), 1);
    assert_eq!(rx.received().len(), 1, "{}", broker.log_text());

    // Crash between store and move, fix the folder, start again.
    broker.kill();
    dovecot.create_folder("Processed");
    broker.spawn();
    // MOVE copies, then expunges: wait for both.
    broker
        .eventually(Duration::from_secs(20), "the move", async || {
            dovecot.count("Processed") == 1 && dovecot.count("INBOX") == 0
        })
        .await;
    assert_eq!(dovecot.count("INBOX"), 0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rx.received().len(), 1, "exactly one event after the crash");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap_or_default(),
        "",
        "forgotten once moved"
    );
    let envelope = got[0].header("ketenbus-envelope-id").unwrap().to_owned();
    let l = lineage(&reqwest::Client::new(), &broker.url, &envelope)
        .await
        .unwrap();
    assert_eq!(l["connector"], "imap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_pickup_in_delete_mode_takes_every_message_once() {
    let certs = certs();
    let dovecot = Dovecot::start(&certs);
    dovecot.deliver(
        "1764000001.M1.hub",
        &std::fs::read(fixture("lab-result-edifact-body.eml")).unwrap(),
    );
    dovecot.deliver(
        "1764000002.M2.hub",
        &std::fs::read(fixture("letter-pdf.eml")).unwrap(),
    );
    let rx = Receiver::answering(204).await;
    let broker = dovecot.broker(
        "after = \"delete\"\npoll_interval = \"200ms\"",
        &subscription("gp", "\"lab_result\", \"letter\"", &rx.url()),
    );
    let got = rx.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2, "{}", broker.log_text());
    let mut kinds: Vec<&str> = got
        .iter()
        .map(|r| r.header("ketenbus-kind").unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["lab_result", "letter"]);
    broker
        .eventually(Duration::from_secs(10), "the deletion", async || {
            dovecot.count("INBOX") == 0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.received().len(), 2, "nothing taken twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mail_sink_authenticates_after_starttls_and_asks_dsn_only_where_offered() {
    let certs = certs();
    // B: a submission server that requires TLS and AUTH and offers no DSN (ketenbus itself).
    let raw = Receiver::answering(204).await;
    let b_port = free_port();
    let b_config = format!(
        "{}[mail.smtp.auth]\nusers = [{{ username = \"ketenbus-a\", password_env = \"TEST_B_PASSWORD\" }}]\n{}",
        smtp_config(
            b_port,
            &certs,
            "require_tls = true\naccept_addresses = [\"huisarts@gp.example.test\"]"
        ),
        subscription("inbox", "\"raw\"", &raw.url())
    );
    let b = Broker::start_with_env(&b_config, &[("TEST_B_PASSWORD", "b-password-for-tests")]);
    // A: takes the letter in and sends it on by secure mail to B.
    let a_port = free_port();
    let sink = mail_sink(
        "to-b",
        b_port,
        "starttls",
        &certs.ca,
        "huisarts@gp.example.test",
        "username = \"ketenbus-a\"\npassword_env = \"TEST_A_SMTP_PASSWORD\"\n",
    );
    let a = Broker::start_with_env(
        &format!("{}{}", smtp_config(a_port, &certs, ""), sink),
        &[("TEST_A_SMTP_PASSWORD", "b-password-for-tests")],
    );
    let envelope = to_the_gp(
        a_port,
        "specialist@ziekenhuis.example.test",
        "letter-pdf.eml",
    )
    .queued();
    let got = raw.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());
    let mail = MessageParser::default().parse(&got[0].body).unwrap();
    assert_eq!(
        mail.subject(),
        Some(format!("Brief via ketenbus [{envelope}.0]").as_str())
    );
    let b_id = got[0].header("ketenbus-envelope-id").unwrap().to_owned();
    // The subscriber can hear of a record a moment before its lineage entry is written.
    lineage_until(&b.url, &b_id, |l| l["connector"] == "smtp").await;
    let l = lineage_until(&a.url, &envelope, |l| {
        l["deliveries"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["outcome"] == "delivered"))
    })
    .await;
    assert_eq!(l["deliveries"][0]["subscription"], "to-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_idle_takes_new_mail_without_waiting_for_the_poll() {
    let certs = certs();
    let dovecot = Dovecot::start(&certs);
    dovecot.create_folder("Processed");
    let rx = Receiver::answering(204).await;
    let broker = dovecot.broker(
        "poll_interval = \"10min\"",
        &subscription("gp", "\"letter\"", &rx.url()),
    );
    // Let the pickup log in, find the empty inbox and settle in IDLE.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dovecot.deliver(
        "1764000003.M3.hub",
        &std::fs::read(fixture("letter-html.eml")).unwrap(),
    );
    let got = rx.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(
        got.len(),
        1,
        "IDLE did not announce the new mail:\n{}",
        broker.log_text()
    );
    broker
        .eventually(Duration::from_secs(10), "the move", async || {
            dovecot.count("Processed") == 1
        })
        .await;

    // The operator sees the pickup working, then the hub gone: degraded, yet still ready.
    let c = reqwest::Client::new();
    let ready = |body: &serde_json::Value| body["components"]["imap:hub"]["state"].clone();
    let resp = c
        .get(format!("{}/readyz", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(ready(&resp.json().await.unwrap()), "ready");
    let metrics = broker.metrics().await;
    assert!(
        metrics.contains("ketenbus_ingest_source_up{source=\"imap:hub\"} 1"),
        "{metrics}"
    );
    drop(dovecot);
    let (status, body) = broker
        .eventually(
            Duration::from_secs(20),
            "the hub's going away to be noticed",
            async || {
                let resp = c
                    .get(format!("{}/readyz", broker.url))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap();
                if ready(&body) == "degraded" {
                    Ok((status, body))
                } else {
                    Err(body)
                }
            },
        )
        .await;
    assert_eq!(
        status, 200,
        "a degraded source keeps the broker ready: {body}"
    );
    assert!(
        body["components"]["imap:hub"]["reason"].is_string(),
        "{body}"
    );
    let metrics = broker.metrics().await;
    assert!(
        metrics.contains("ketenbus_ingest_source_up{source=\"imap:hub\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_take_the_message_makes_the_sender_hear_451_and_retry() {
    let certs = certs();
    let rx = Receiver::answering(204).await;
    let port = free_port();
    // The first lines land in [http]: a short wait for the log.
    let broker = Broker::start(&format!(
        "ingest_timeout = \"1s\"\n{}{}",
        smtp_config(port, &certs, ""),
        subscription("archive", "\"raw\"", &rx.url())
    ));
    // Another process holds the log's write lock, as a stuck disk or a backup would.
    let mut holder = broker.lock_log(4);
    let letter = to_the_gp(port, "poli@ziekenhuis.example.test", "letter-html.eml");
    let (ok, out) = letter.run();
    assert!(!ok && out.contains("451 4.3.0"), "{out}");
    let _ = holder.wait();
    // The sender's retry is taken once the log can write again.
    let id = letter.queued();
    let got = rx.wait_for(1, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.received().len(),
        1,
        "only the acknowledged message exists"
    );
    assert_eq!(got[0].header("idempotency-key"), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mail_sink_also_speaks_implicit_tls() {
    let certs = certs();
    let port = free_port();
    let postfix = Postfix::start(port, &certs);
    let sink = postfix.sink(
        "gp-smtps",
        "implicit",
        "huisarts@gp.example.test",
        "dsn = false\n",
    );
    let broker = Broker::start(&format!("{}{}", smtp_config(port, &certs, ""), sink));
    let envelope = to_the_gp(port, "poli@ziekenhuis.example.test", "letter-html.eml").queued();
    broker
        .eventually(Duration::from_secs(30), "postfix to deliver", async || {
            if postfix.delivered().is_empty() {
                Err(format!("postfix log:\n{}", postfix.log()))
            } else {
                Ok(())
            }
        })
        .await;
    let delivered = postfix.delivered();
    let mail = MessageParser::default().parse(&delivered[0]).unwrap();
    assert_eq!(
        mail.subject(),
        Some(format!("Brief via ketenbus [{envelope}.0]").as_str())
    );
    assert!(
        mail.body_text(0)
            .unwrap()
            .contains("De afspraak is op 4 november")
    );
    assert!(
        postfix
            .log()
            .contains("TLS connection established from localhost"),
        "{}",
        postfix.log()
    );
}

/// A plain mail of about `size` bytes with `marker` in its body (invented content).
fn plain_mail(n: usize, size: usize, marker: &str) -> Vec<u8> {
    let mut s = format!(
        "From: lab@example.test\r\nTo: 500005678@lms.example.test\r\nSubject: brief {n}\r\nMessage-ID: <m{n}@example.test>\r\n\r\n{marker}\r\n"
    );
    while s.len() < size {
        s.push_str("Een regel tekst van de brief.\r\n");
    }
    s.into_bytes()
}

/// The keywords Dovecot keeps for a maildir folder.
fn keywords(dovecot: &Dovecot, folder: &str) -> String {
    std::fs::read_to_string(dovecot.maildir.join(format!(".{folder}/dovecot-keywords")))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_sets_aside_a_message_past_max_message_size_and_takes_the_others() {
    let certs = certs();
    let dovecot = Dovecot::start(&certs);
    dovecot.create_folder("Processed");
    dovecot.deliver("1764000001.M1.hub", &plain_mail(1, 64 * 1024, "groot"));
    dovecot.deliver("1764000002.M2.hub", &plain_mail(2, 1024, "klein"));
    let rx = Receiver::answering(204).await;
    let broker = dovecot.broker(
        "poll_interval = \"200ms\"\nmax_message_size = \"16 KiB\"\nfailed_folder = \"Failed\"",
        &subscription("gp", "\"letter\"", &rx.url()),
    );
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    // A move links the message into its new folder before it unlinks it from INBOX, so the
    // three counts settle together, not in a fixed order.
    broker
        .eventually(
            Duration::from_secs(10),
            "the messages to be sorted",
            async || {
                dovecot.count("Failed") == 1
                    && dovecot.count("Processed") == 1
                    && dovecot.count("INBOX") == 0
            },
        )
        .await;
    assert!(
        keywords(&dovecot, "Failed").contains("$KetenbusTooLarge"),
        "flagged with its reason"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rx.received().len(), 1, "the large one was never taken");
    // Counted with every other refusal.
    let metrics = broker.metrics().await;
    assert!(
        metrics.contains(
            "ketenbus_ingest_rejected_messages_total{connector=\"imap\",reason=\"too_large\"} 1"
        ),
        "{metrics}"
    );
}

/// Takes every message but the one marked `POISON`, which it refuses as a log with a record
/// size limit would: "try again".
#[derive(Default)]
struct RefusesPoison {
    taken: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl ketenbus_connectors::Ingest for RefusesPoison {
    fn accept(
        &self,
        envelope: ketenbus_schemas::RawEnvelope,
    ) -> ketenbus_connectors::BoxFuture<
        '_,
        Result<ketenbus_connectors::Accepted, ketenbus_connectors::IngestError>,
    > {
        Box::pin(async move {
            if envelope.body.windows(6).any(|w| w == b"POISON") {
                return Err(ketenbus_connectors::IngestError::Unavailable(
                    "record larger than the log takes".into(),
                ));
            }
            self.taken.lock().unwrap().push(envelope.body);
            Ok(ketenbus_connectors::Accepted { id: envelope.id })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imap_message_the_log_keeps_refusing_is_set_aside_and_the_others_flow() {
    use ketenbus_connectors::mail::config::{AfterPickup, ImapConfig, TlsMode};
    use ketenbus_connectors::mail::imap::{ImapPickup, PickupState};
    let certs = certs();
    let dovecot = Dovecot::start(&certs);
    dovecot.create_folder("Processed");
    // The poison message has the lowest UID: it is met first.
    dovecot.deliver("1764000000.M0.hub", &plain_mail(0, 1024, "POISON"));
    let cfg = ImapConfig {
        name: "hub".into(),
        host: "127.0.0.1".into(),
        port: Some(dovecot.imaps_port),
        tls: TlsMode::Implicit,
        ca_file: Some(certs.ca.clone()),
        username: "hub".into(),
        password_env: "PW".into(),
        mailbox: "INBOX".into(),
        after: AfterPickup::Move,
        processed_folder: "Processed".into(),
        poll_interval: Duration::from_millis(100),
        idle: false,
        receiver: None,
        max_message_size: bytesize::ByteSize::mib(1),
        max_attempts: 3,
        failed_folder: "Failed".into(),
    };
    let ingest = std::sync::Arc::new(RefusesPoison::default());
    let pickup = ImapPickup::new(cfg, certs.dir.path(), ingest.clone(), &|_| {
        Some("hubpass".into())
    })
    .unwrap();
    let mut state = PickupState::load(&certs.dir.path().join("hub.state")).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut good = 0;
    for round in 1..=6 {
        for i in 0..2 {
            good += 1;
            dovecot.deliver(
                &format!("17640000{round:02}.M{i}.hub"),
                &plain_mail(round * 10 + i, 1024, "goed"),
            );
        }
        let _ = pickup.cycle(&mut state, &cancel).await;
    }
    assert_eq!(
        ingest.taken.lock().unwrap().len(),
        good,
        "every good one taken"
    );
    assert_eq!(dovecot.count("Processed"), good);
    assert_eq!(dovecot.count("Failed"), 1, "the poison message set aside");
    assert_eq!(dovecot.count("INBOX"), 0);
    assert!(keywords(&dovecot, "Failed").contains("$KetenbusFailed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mail_sink_sends_to_the_address_the_mcsd_directory_lists() {
    use ketenbus_tests::mcsd::{Peer, delivered_detail, post_referral, resource, source, synced};
    let certs = certs();
    let postfix = Postfix::start(free_port(), &certs);
    let tmp = tempfile::tempdir().unwrap();
    // De Linde's secure-mail endpoint (connectionType secure-email) is a mailbox of the
    // domain Postfix delivers to its maildir; a second party is listed with another and
    // overridden in [address_book].
    let mut all =
        ketenbus_tests::mcsd::directory(&[("ep-linde-mail", "mailto:900000001@gp.example.test")]);
    let mut other_mail = resource(&all, "ep-linde-mail");
    other_mail["id"] = serde_json::json!("ep-other-mail");
    other_mail["connectionType"]["code"] = serde_json::json!("direct-project");
    other_mail["address"] = serde_json::json!("listed-900000004@gp.example.test");
    let other = serde_json::json!({"resourceType": "Organization", "id": "org-other",
        "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "90000004"}],
        "active": true, "endpoint": [{"reference": "Endpoint/ep-other-mail"}]});
    all.as_array_mut().unwrap().extend([other, other_mail]);
    let peer = Peer::start(tmp.path(), &all);
    let config = format!(
        "{}[address_book.\"ura:90000004\"]\nmail = \"override-900000004@gp.example.test\"\n\
         [[subscriptions]]\nname = \"mail-by-directory\"\nkinds = [\"raw\"]\n[subscriptions.sink]\ntype = \"mail\"\n\
         host = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = {:?}\nfrom = \"ketenbus@ketenbus.example.test\"\n",
        source(&peer),
        postfix.port,
        certs.ca
    );
    let mut broker = Broker::prepare(tmp.path(), &config);
    broker.spawn();
    synced(&broker, "the first sync").await;

    let linde = post_referral(&broker, "90000001").await;
    let other = post_referral(&broker, "90000004").await;
    let recipients = || {
        let mut to: Vec<String> = postfix
            .delivered()
            .iter()
            .filter_map(|m| {
                MessageParser::default()
                    .parse(m)
                    .and_then(|p| p.to()?.first()?.address().map(str::to_owned))
            })
            .collect();
        to.sort();
        to
    };
    ketenbus_tests::eventually(
        Duration::from_secs(30),
        "two mails in the maildir",
        async || recipients().len() == 2,
    )
    .await;
    assert_eq!(
        recipients(),
        [
            "900000001@gp.example.test",
            "override-900000004@gp.example.test"
        ],
        "{}",
        postfix.log()
    );
    assert_eq!(
        delivered_detail(&broker, &linde, "mail-by-directory").await,
        "address from mcsd test: Organization/org-linde -> Endpoint/ep-linde-mail"
    );
    assert_eq!(
        delivered_detail(&broker, &other, "mail-by-directory").await,
        "address from address_book override"
    );
}
