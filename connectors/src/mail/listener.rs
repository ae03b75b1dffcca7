//! The thin tokio shell around [`Session`]: accepts connections (at most
//! `max_connections`, the rest hear `421`), reads and writes with an idle timeout, upgrades
//! to TLS on STARTTLS (tokio-rustls), and hands each message to [`Ingest`]; the client hears
//! `250` only once `accept` resolved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::contract::ingest::Ingest;
use crate::mail::config::SmtpConfig;
use crate::mail::smtp::{Mail, Session, SessionConfig, Step};
use crate::mail::{MailError, envelope_for};

/// Connector name in envelopes, logs and metrics.
pub const CONNECTOR: &str = "smtp";

/// A configured SMTP listener, ready to run.
pub struct SmtpListener {
    session: Arc<SessionConfig>,
    tls: Option<TlsAcceptor>,
    ingest: Arc<dyn Ingest>,
    max_connections: usize,
    idle_timeout: Duration,
    budget: Budget,
    /// Where refusals are told.
    status: Option<Arc<dyn crate::SourceStatus>>,
}

impl std::fmt::Debug for SmtpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpListener")
            .field("max_connections", &self.max_connections)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl SmtpListener {
    /// A listener for `[mail.smtp]`; passwords are read through `env`.
    ///
    /// # Errors
    /// [`MailError::Config`] when the certificate or key cannot be loaded.
    pub fn new(
        config: &SmtpConfig,
        ingest: Arc<dyn Ingest>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SmtpListener, MailError> {
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(crate::mail::tls::server_config(
                &t.cert_file,
                &t.key_file,
            )?)),
            None => None,
        };
        Ok(SmtpListener {
            session: Arc::new(SessionConfig::from_config(config, tls.is_some(), env)),
            tls,
            ingest,
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            budget: Budget::unlimited(),
            status: None,
        })
    }

    /// Tell `status` of every message or recipient refused (connector `smtp`, with its
    /// reason code), and of connections past `max_connections`.
    #[must_use]
    pub fn with_status(mut self, status: Arc<dyn crate::SourceStatus>) -> SmtpListener {
        self.status = Some(status);
        self
    }

    fn refused(&self, reason: &'static str) {
        if let Some(status) = &self.status {
            status.refused(CONNECTOR, reason);
        }
    }

    /// Hold message data against `budget` while it is received and stored; past it the
    /// client hears `451 4.3.1` at the end of DATA.
    #[must_use]
    pub fn with_budget(mut self, budget: Budget) -> SmtpListener {
        self.budget = budget;
        self
    }

    /// Accept connections on `listener` until `cancel`.
    pub async fn run(self, listener: TcpListener, cancel: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.max_connections));
        let local = listener
            .local_addr()
            .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
        tracing::info!(listen = %local, tls = this.tls.is_some(), "smtp listener running");
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(
                    limit = this.max_connections,
                    "smtp connection limit reached"
                );
                this.refused("too_many_connections");
                let host = this.session.hostname.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    let line = format!(
                        "421 4.7.0 {host} Error: too many connections, try again later\r\n"
                    );
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.write_all(line.as_bytes()),
                    )
                    .await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            let this = Arc::clone(&this);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                this.serve(stream, peer, &cancel).await;
                drop(permit);
            });
        }
        tracing::info!("smtp listener stopped");
    }

    async fn serve(&self, mut stream: TcpStream, peer: SocketAddr, cancel: &CancellationToken) {
        let mut session = Session::new(Arc::clone(&self.session));
        match self.drive(&mut session, &mut stream, peer, cancel).await {
            Ended::Closed => {}
            Ended::StartTls => {
                let Some(acceptor) = &self.tls else { return };
                match tokio::time::timeout(self.idle_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(mut tls)) => {
                        session.tls_started();
                        let _ = self.drive(&mut session, &mut tls, peer, cancel).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "smtp tls handshake failed"),
                    Err(_) => tracing::debug!("smtp tls handshake timed out"),
                }
            }
        }
    }

    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        session: &mut Session,
        io: &mut S,
        peer: SocketAddr,
        cancel: &CancellationToken,
    ) -> Ended {
        // Not zeroed: read_buf fills spare capacity, so a connection costs no 64 KiB memset.
        let mut buf = Vec::with_capacity(16 * 1024);
        // The message data this connection holds, from its first byte until it is stored.
        let mut held = self.budget.reserve(0).expect("nothing always fits");
        loop {
            loop {
                match session.step() {
                    Step::NeedInput => break,
                    Step::Deliver(mail) => {
                        if self.flush(session, io).await.is_err() {
                            return Ended::Closed;
                        }
                        let result = self.store(mail, peer).await;
                        session.delivered(result);
                        held.release_to(session.data_len());
                    }
                    Step::StartTls => {
                        return if self.flush(session, io).await.is_ok() {
                            Ended::StartTls
                        } else {
                            Ended::Closed
                        };
                    }
                    Step::Close => {
                        let _ = self.flush(session, io).await;
                        let _ = io.shutdown().await;
                        return Ended::Closed;
                    }
                }
            }
            held.release_to(session.data_len());
            if self.flush(session, io).await.is_err() {
                return Ended::Closed;
            }
            let read = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, io.read_buf(&mut buf)) => r,
                () = cancel.cancelled() => {
                    session.shutting_down();
                    continue;
                }
            };
            match read {
                Ok(Ok(0) | Err(_)) => return Ended::Closed,
                Ok(Ok(_)) => {
                    if held.grow_to(session.data_len() + buf.len()).is_err() {
                        session.over_budget();
                    }
                    held.release_to(session.data_len() + buf.len());
                    session.push(&buf);
                    buf.clear();
                }
                Err(_) => session.timed_out(),
            }
        }
    }

    async fn flush<S: AsyncWrite + Unpin>(
        &self,
        session: &mut Session,
        io: &mut S,
    ) -> Result<(), ()> {
        for reason in session.take_refusals() {
            self.refused(reason);
        }
        if !session.has_output() {
            return Ok(());
        }
        let out = session.take_output();
        match tokio::time::timeout(self.idle_timeout, async {
            io.write_all(&out).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn store(&self, mail: Mail, peer: SocketAddr) -> Result<String, crate::IngestError> {
        let (size, rcpts, tls) = (mail.data.len(), mail.rcpts.len(), mail.tls);
        let envelope = envelope_for(mail, CONNECTOR, Some(peer));
        let accepted = self.ingest.accept(envelope).await;
        match &accepted {
            Ok(a) => {
                tracing::debug!(id = %a.id, size, rcpts, tls, "smtp message stored")
            }
            Err(e) => {
                tracing::debug!(error = %e, size, "smtp message not stored, sender told to retry")
            }
        }
        accepted.map(|a| a.id)
    }
}

enum Ended {
    Closed,
    StartTls,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ketenbus_schemas::RawEnvelope;
    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::*;
    use crate::contract::ingest::{Accepted, IngestError};
    use crate::contract::sink::BoxFuture;

    #[derive(Default)]
    struct Memory {
        got: Mutex<Vec<RawEnvelope>>,
        fail: bool,
    }

    impl Ingest for Memory {
        fn accept(&self, envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
            Box::pin(async move {
                if self.fail {
                    return Err(IngestError::Unavailable("test".into()));
                }
                let id = envelope.id.clone();
                self.got.lock().unwrap().push(envelope);
                Ok(Accepted { id })
            })
        }
    }

    async fn start(config: SmtpConfig, ingest: Arc<Memory>) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let l = SmtpListener::new(&config, ingest, &|_| None).unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(l.run(listener, cancel.clone()));
        (addr, cancel)
    }

    async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }

    /// What a listener tells of its refusals.
    #[derive(Default)]
    struct Refusals(Mutex<Vec<(String, &'static str)>>);

    impl crate::SourceStatus for Refusals {
        fn up(&self, _: &str) {}
        fn down(&self, _: &str, _: &str) {}
        fn refused(&self, connector: &str, reason: &'static str) {
            self.0.lock().unwrap().push((connector.to_owned(), reason));
        }
    }

    /// Every refusal the client hears is told, with its reason code.
    #[tokio::test]
    async fn refusals_are_told_with_their_reason() {
        let ingest = Arc::new(Memory::default());
        let refusals = Arc::new(Refusals::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = SmtpConfig {
            max_message_size: bytesize::ByteSize(1000),
            ..SmtpConfig::default()
        };
        let l = SmtpListener::new(&config, ingest, &|_| None)
            .unwrap()
            .with_status(Arc::clone(&refusals) as Arc<dyn crate::SourceStatus>);
        let cancel = CancellationToken::new();
        tokio::spawn(l.run(listener, cancel.clone()));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        assert!(read_reply(&mut r).await.starts_with("220 "));
        w.write_all(b"EHLO t\r\nMAIL FROM:<a@b.test> SIZE=5000\r\n")
            .await
            .unwrap();
        read_reply(&mut r).await;
        let reply = read_reply(&mut r).await;
        assert!(reply.starts_with("552"), "{reply}");
        w.write_all(b"QUIT\r\n").await.unwrap();
        read_reply(&mut r).await;
        cancel.cancel();
        assert_eq!(
            refusals.0.lock().unwrap().clone(),
            vec![("smtp".to_owned(), "too_large")]
        );
    }

    #[tokio::test]
    async fn a_message_over_tcp_is_stored_before_250() {
        let ingest = Arc::new(Memory::default());
        let (addr, cancel) = start(SmtpConfig::default(), Arc::clone(&ingest)).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        assert!(read_reply(&mut r).await.starts_with("220 "));
        w.write_all(b"EHLO t\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<500005678@lms.test>\r\nDATA\r\n")
            .await
            .unwrap();
        for want in ["250", "250", "250", "354"] {
            let reply = read_reply(&mut r).await;
            assert!(reply.lines().last().unwrap().starts_with(want), "{reply}");
        }
        w.write_all(b"Subject: t\r\n\r\nhello\r\n.\r\n")
            .await
            .unwrap();
        let reply = read_reply(&mut r).await;
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
        let got = ingest.got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, b"Subject: t\r\n\r\nhello\r\n");
        assert_eq!(got[0].receiver.as_deref(), Some("mailbox:500005678"));
        assert!(reply.contains(&got[0].id));
        cancel.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_limit_hear_421() {
        let ingest = Arc::new(Memory::default());
        let (addr, cancel) = start(
            SmtpConfig {
                max_connections: 1,
                ..SmtpConfig::default()
            },
            ingest,
        )
        .await;
        let first = TcpStream::connect(addr).await.unwrap();
        let mut r1 = BufReader::new(first);
        assert!(read_reply(&mut r1).await.starts_with("220"));
        let second = TcpStream::connect(addr).await.unwrap();
        let mut r2 = BufReader::new(second);
        assert!(read_reply(&mut r2).await.starts_with("421 4.7.0"));
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_idle_client_is_closed_with_421() {
        let ingest = Arc::new(Memory::default());
        let (addr, cancel) = start(
            SmtpConfig {
                idle_timeout: Duration::from_millis(200),
                ..SmtpConfig::default()
            },
            ingest,
        )
        .await;
        let mut r = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert!(read_reply(&mut r).await.starts_with("220"));
        assert!(read_reply(&mut r).await.starts_with("421 4.4.2"));
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_unavailable_log_means_451() {
        let ingest = Arc::new(Memory {
            fail: true,
            ..Memory::default()
        });
        let (addr, cancel) = start(SmtpConfig::default(), ingest).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let _ = read_reply(&mut r).await;
        w.write_all(b"HELO t\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nx\r\n.\r\n")
            .await
            .unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            last = read_reply(&mut r).await;
        }
        assert!(last.starts_with("451 4.3.0"), "{last}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn past_the_memory_budget_the_sender_hears_451_4_3_1_and_nothing_is_held() {
        let ingest = Arc::new(Memory::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let budget = Budget::new(64 * 1024);
        let l = SmtpListener::new(&SmtpConfig::default(), Arc::clone(&ingest) as _, &|_| None)
            .unwrap()
            .with_budget(budget.clone());
        let cancel = CancellationToken::new();
        tokio::spawn(l.run(listener, cancel.clone()));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let _ = read_reply(&mut r).await;
        let line = format!("{}\r\n", "x".repeat(998));
        for (lines, want) in [(200, "451 4.3.1"), (20, "250 2.0.0")] {
            w.write_all(b"HELO t\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
                .await
                .unwrap();
            for _ in 0..4 {
                let _ = read_reply(&mut r).await;
            }
            for _ in 0..lines {
                w.write_all(line.as_bytes()).await.unwrap();
            }
            w.write_all(b".\r\n").await.unwrap();
            let reply = read_reply(&mut r).await;
            assert!(reply.starts_with(want), "{lines} lines: {reply}");
            assert_eq!(budget.in_use(), 0, "nothing held once answered");
        }
        assert_eq!(ingest.got.lock().unwrap().len(), 1);
        cancel.cancel();
    }
}
