//! Fuzz target for the sans-IO SMTP server session (`ketenbus_connectors::mail::smtp`).
//!
//! The first byte picks the settings (TLS offered/required, AUTH offered/required, small
//! limits, whether the shell's delivery or handshake succeeds), the second seeds the chunk
//! sizes; the rest is the client's byte stream, pushed in chunks of 1 to 64 bytes as a
//! socket would deliver it. Checks: no panic, no endless loop, every reply is a CRLF line
//! starting with a three-digit code, a delivered message keeps the limits, and after
//! `Close` nothing more happens. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use std::sync::Arc;

use ketenbus_connectors::IngestError;
use ketenbus_connectors::mail::smtp::{Session, SessionConfig, Step};
use libfuzzer_sys::fuzz_target;

fn check_output(out: &[u8]) {
    for line in out.split_inclusive(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r\n")
            .expect("every reply line ends with CRLF");
        assert!(!line.contains(&b'\r'), "no bare CR in a reply");
        assert!(
            line.len() >= 4
                && line[..3].iter().all(u8::is_ascii_digit)
                && (line[3] == b' ' || line[3] == b'-'),
            "reply line without a code: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (&flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&seed, input) = rest.split_first().unwrap_or((&0, &[]));
    let mut cfg = SessionConfig::open("mx.fuzz.example");
    cfg.tls_available = flags & 1 != 0;
    cfg.require_tls = flags & 2 != 0;
    if flags & 4 != 0 {
        cfg.users = vec![("zorg".into(), b"geheim".to_vec())];
        cfg.auth_required = flags & 8 != 0;
    }
    if flags & 16 != 0 {
        cfg.max_message_size = 200;
        cfg.max_recipients = 2;
        cfg.max_line_length = 40;
        cfg.accept_domains = vec!["lab.example".into()];
        cfg.accept_addresses = vec!["500005678@lms.example".into()];
    }
    let deliver_ok = flags & 32 == 0;
    let tls_ok = flags & 64 == 0;
    let (max_size, max_rcpts) = (cfg.max_message_size, cfg.max_recipients);
    let mut session = Session::new(Arc::new(cfg));
    check_output(&session.take_output());

    let mut rng = u32::from(seed) | 1;
    let mut input = input;
    let mut closed = false;
    let mut steps = 0usize;
    'feed: loop {
        loop {
            steps += 1;
            assert!(steps < 1_000_000, "the session does not settle");
            match session.step() {
                Step::NeedInput => break,
                Step::Deliver(mail) => {
                    assert!(mail.data.len() <= max_size, "message over the size limit");
                    assert!(
                        !mail.rcpts.is_empty() && mail.rcpts.len() <= max_rcpts,
                        "recipient count outside the limits"
                    );
                    check_output(&session.take_output());
                    session.delivered(if deliver_ok {
                        Ok("fuzz-1".into())
                    } else {
                        Err(IngestError::Unavailable("fuzz".into()))
                    });
                }
                Step::StartTls => {
                    check_output(&session.take_output());
                    if !tls_ok {
                        // The shell drops the connection; nothing more to check.
                        return;
                    }
                    session.tls_started();
                    assert!(session.is_tls());
                }
                Step::Close => {
                    closed = true;
                    break 'feed;
                }
            }
        }
        check_output(&session.take_output());
        if input.is_empty() {
            break;
        }
        rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((rng >> 16) as usize % 64 + 1).min(input.len());
        session.push(&input[..n]);
        input = &input[n..];
    }
    check_output(&session.take_output());
    if closed {
        assert!(matches!(session.step(), Step::Close), "closed stays closed");
    } else {
        session.timed_out();
        check_output(&session.take_output());
        assert!(matches!(session.step(), Step::Close), "a timeout closes");
    }
});
