//! End-to-end benchmark: HTTP ingest -> log -> webhook, on the embedded engine or Kafka.
//!
//! ```text
//! cargo build --release -p ketenbus -p ketenbus-tests
//! target/release/ketenbus-bench --engine embedded --count 50000 --size 2048
//! target/release/ketenbus-bench --engine embedded --rate 1000 --count 20000
//! target/release/ketenbus-bench --engine kafka --kafka 127.0.0.1:19092 --count 50000
//! target/release/ketenbus-bench --engine embedded --count 30000 --batch 100   # batch webhook
//! target/release/ketenbus-bench --large 4x25MiB
//! target/release/ketenbus-bench --engine embedded --count 30000 --publish-only  # durable accept
//! ```
//! Prints sustained messages/s (first 202 to last delivery), ingest-to-delivered latency
//! percentiles (from sending the POST to the webhook receiving it), accept latency
//! percentiles (from sending the POST to its 202) and the broker's peak RSS (VmHWM).
//!
//! `--large NxSIZE` sends N mails of SIZE bytes each (a letter with a PDF attachment) at
//! once instead, waits until each is delivered to the raw subscriber, then 10 s more, and
//! prints the broker's peak RSS and its RSS before and after: what large messages cost and
//! whether the memory is given back.
//!
//! `--publish-only` starts the broker without a subscription and prints the durable accept
//! rate alone (first POST to last 202, every 202 after the fsync of its message): the
//! counterpart of a publish-only run against a queue nobody consumes. The router still
//! normalises what comes in, as it does in any broker.
//!
//! With `--batch N` the subscription is a batch webhook (`batch = { max_events = N, max_wait = --batch-wait }`, `concurrency` N x 4;
//! `--concurrency` sets it, and the lanes of the one-POST-per-event webhook, default 16)
//! and the receiver takes JSON arrays: every figure is still per event (each event counts
//! when the POST carrying it arrives).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ketenbus_tests::batch::BatchReceiver;
use ketenbus_tests::{Broker, Receiver, edifact_message};

#[derive(Parser)]
struct Args {
    /// embedded or kafka.
    #[arg(long, default_value = "embedded")]
    engine: String,
    /// Kafka bootstrap servers (engine kafka).
    #[arg(long, default_value = "127.0.0.1:19092")]
    kafka: String,
    /// Messages to send.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Messages per second to offer; 0 sends as fast as the broker acknowledges.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Concurrent HTTP senders.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// TOML appended to the broker's config, e.g. $'[audit]\nenabled = false'.
    #[arg(long, default_value = "")]
    extra: String,
    /// The broker's `KETENBUS_LOG`: `info` is what it runs with when none is set (the
    /// tests' `info,ketenbus=debug` writes a few lines per message).
    #[arg(long, default_value = "info")]
    log: String,
    /// Deliver through a batch webhook of at most this many events per POST; 0: one POST
    /// per event.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// The batch webhook's max_wait, in milliseconds.
    #[arg(long, default_value_t = 20)]
    batch_wait: u64,
    /// The subscription's `concurrency` (lanes, each one POST at a time); 0 leaves the
    /// default (16; with --batch N, 4N).
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    /// Large-message mode: `NxSIZE` (e.g. `4x25MiB`) sends N mails of SIZE bytes at once and
    /// reports peak RSS and RSS after; `--count`, `--size`, `--rate`, `--senders` are then unused.
    #[arg(long)]
    large: Option<String>,
    /// Publish only: no subscription, nothing delivered; prints the durable accept rate
    /// (first POST to last 202) and accept latency percentiles.
    #[arg(long)]
    publish_only: bool,
}

/// A field of `/proc/PID/status` in bytes (`VmHWM`: peak RSS, `VmRSS`: RSS now).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// A plain field of `/proc/PID/status` (`Threads`), 0 when unreadable.
fn proc_status_value(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// POST a message to the broker at `url`; its answer, which must be 202.
async fn post_202(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> anyhow::Result<reqwest::Response> {
    let resp = client
        .post(format!("{url}/api/v1/messages"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 202,
        "ingest answered {}",
        resp.status()
    );
    Ok(resp)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// `4x25MiB` -> (4, 26214400).
fn parse_large(spec: &str) -> anyhow::Result<(usize, usize)> {
    let (n, size) = spec
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("--large wants NxSIZE, e.g. 4x25MiB"))?;
    let (digits, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        other => anyhow::bail!("--large size unit {other}: B, KiB or MiB"),
    };
    Ok((n.parse()?, digits.parse::<usize>()? * unit))
}

/// A letter of exactly `size` bytes: a short text and a base64 PDF attachment (invented).
fn large_mail(n: usize, size: usize) -> Vec<u8> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let head = format!(
        "From: <specialist@ziekenhuis.example.test>\r\nTo: <huisarts@gp.example.test>\r\n\
         Subject: Ontslagbrief (synthetisch) {n}\r\nMessage-ID: <large-{n}@ziekenhuis.example.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n\
         --=_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGeachte collega, de brief."
    );
    let part = "\r\n--=_b\r\nContent-Type: application/pdf; name=\"brief.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"brief.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n";
    let tail = "--=_b--\r\n";
    let fixed = head.len() + part.len() + tail.len();
    // Lines of 76 base64 characters (57 bytes each) and CRLF; what is left over is text.
    let lines = size.saturating_sub(fixed) / 78;
    let mut s = head.into_bytes();
    s.resize(size - part.len() - tail.len() - lines * 78, b'.');
    s.extend_from_slice(part.as_bytes());
    for l in 0..lines {
        s.extend((0..76).map(|i| B64[(l * 7 + i * 13 + n) % 64]));
        s.extend_from_slice(b"\r\n");
    }
    s.extend_from_slice(tail.as_bytes());
    s
}

/// The webhook receiver: one POST per event, or batches.
enum Rx {
    Single(Receiver),
    Batch(BatchReceiver),
}

impl Rx {
    fn url(&self) -> String {
        match self {
            Rx::Single(r) => r.url(),
            Rx::Batch(r) => r.url(),
        }
    }

    /// Events received so far.
    fn count(&self) -> usize {
        match self {
            Rx::Single(r) => r.received().len(),
            Rx::Batch(r) => r.batches().iter().map(|b| b.elements.len()).sum(),
        }
    }

    /// Wait until `n` events arrived (or `timeout`); each event's id and arrival.
    async fn arrivals(&self, n: usize, timeout: Duration) -> Vec<(String, Instant)> {
        match self {
            Rx::Single(r) => r
                .wait_for(n, timeout)
                .await
                .iter()
                .map(|r| {
                    (
                        r.header("idempotency-key").unwrap_or_default().to_owned(),
                        r.at,
                    )
                })
                .collect(),
            Rx::Batch(r) => r
                .wait_until(timeout, |b| {
                    b.iter().map(|b| b.elements.len()).sum::<usize>() >= n
                })
                .await
                .iter()
                .flat_map(|b| b.ids().into_iter().map(|id| (id, b.at)))
                .collect(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let receiver = if args.batch > 0 {
        Rx::Batch(BatchReceiver::start(|_| ketenbus_tests::batch::Reply::status(204)).await)
    } else {
        Rx::Single(Receiver::answering(204).await)
    };
    let bus = match args.engine.as_str() {
        "embedded" => String::new(),
        "kafka" => format!(
            "[bus]\nengine = \"kafka\"\n[bus.kafka]\nbootstrap_servers = \"{}\"\nreplication_factor = 1\n\
             # tansu 0.6: one record per batch, short fetch waits (ops/kafka/tansu.sh)\n\
             properties = {{ \"batch.num.messages\" = \"1\", \"fetch.wait.max.ms\" = \"10\" }}\n",
            args.kafka
        ),
        other => anyhow::bail!("unknown engine {other}"),
    };
    let sub = if args.publish_only {
        anyhow::ensure!(
            args.batch == 0 && args.large.is_none(),
            "--publish-only delivers nothing: leave out --batch and --large"
        );
        String::new()
    } else if args.batch > 0 {
        format!(
            "[[subscriptions]]\nname = \"bench\"\nkinds = [\"raw\"]\nconcurrency = {}\n\
             sink = {{ type = \"webhook\", url = \"{}\", batch = {{ max_events = {}, max_wait = \"{}ms\" }} }}\n",
            if args.concurrency > 0 {
                args.concurrency
            } else {
                (args.batch * 4).min(1024)
            },
            receiver.url(),
            args.batch,
            args.batch_wait
        )
    } else {
        let lanes = if args.concurrency > 0 {
            format!("concurrency = {}\n", args.concurrency)
        } else {
            String::new()
        };
        format!(
            "[[subscriptions]]\nname = \"bench\"\nkinds = [\"raw\"]\n{lanes}\
             sink = {{ type = \"webhook\", url = \"{}\" }}\n",
            receiver.url()
        )
    };
    let retry = if args.publish_only {
        ""
    } else {
        "[subscriptions.retry]\ninitial = \"50ms\"\n"
    };
    let broker = Broker::start_with_env(
        &format!("{bus}\n{sub}\n{retry}{}\n", args.extra),
        &[("KETENBUS_LOG", &args.log)],
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.senders)
        .build()?;
    let pid = broker.pid().expect("the broker runs");
    if let Some(spec) = &args.large {
        let (n, size) = parse_large(spec)?;
        let Rx::Single(receiver) = &receiver else {
            anyhow::bail!("--large sends raw messages to a single webhook: leave out --batch");
        };
        return large(&broker, pid, &client, receiver, n, size).await;
    }
    let sent: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(args.count)));
    // Send to 202 of each message: the durable accept latency.
    let acks: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    eprintln!(
        "sending {} messages of {} bytes with {} senders (rate {})",
        args.count,
        args.size,
        args.senders,
        if args.rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", args.rate)
        }
    );
    for _ in 0..args.senders {
        let (client, sent, acks, next, url) = (
            client.clone(),
            Arc::clone(&sent),
            Arc::clone(&acks),
            Arc::clone(&next),
            broker.url.clone(),
        );
        let (count, size, rate) = (args.count, args.size, args.rate);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let body = edifact_message(i, size);
                let t0 = Instant::now();
                let resp = post_202(&client, &url, "application/EDIFACT", body).await?;
                let v: serde_json::Value = resp.json().await?;
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                acks.lock().expect("lock").push(t0.elapsed());
                sent.lock().expect("lock").insert(id, t0);
            }
        });
    }
    let mut last_report = Instant::now();
    while !tasks.is_empty() {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(1), tasks.join_next()).await {
            r??;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "progress: {} accepted, {} delivered",
                sent.lock().expect("lock").len(),
                receiver.count()
            );
            last_report = Instant::now();
        }
    }
    let accepted_at = start.elapsed();
    let pct_of = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let mut acks = acks.lock().expect("lock").clone();
    acks.sort();
    if args.publish_only {
        let rate = acks.len() as f64 / accepted_at.as_secs_f64();
        println!(
            "engine={} mode=publish messages={} size={}B accepted_in={:.2}s => {rate:.0} msg/s; accept_rate={rate:.0} accept_p50={:.1}ms accept_p99={:.1}ms",
            args.engine,
            acks.len(),
            args.size,
            accepted_at.as_secs_f64(),
            pct_of(&acks, 0.5).as_secs_f64() * 1e3,
            pct_of(&acks, 0.99).as_secs_f64() * 1e3,
        );
        return peak_and_check(&broker, pid, (acks.len(), args.count), "accepted").await;
    }
    let got = receiver
        .arrivals(args.count, Duration::from_secs(300))
        .await;
    let sent = sent.lock().expect("lock").clone();
    let mut latencies: Vec<Duration> = Vec::with_capacity(got.len());
    let mut seen = std::collections::HashSet::new();
    let mut last = start;
    for (id, at) in &got {
        if let Some(t0) = sent.get(id)
            && seen.insert(id.clone())
        {
            latencies.push(at.saturating_duration_since(*t0));
            last = last.max(*at);
        }
    }
    latencies.sort();
    let pct = |p: f64| pct_of(&latencies, p);
    let total = last.duration_since(start);
    println!(
        "engine={} delivery={} messages={} size={}B accepted_in={:.2}s delivered={} in {:.2}s => {:.0} msg/s; latency p50={:.1}ms p99={:.1}ms max={:.1}ms accept_p50={:.1}ms accept_p99={:.1}ms",
        args.engine,
        if args.batch > 0 {
            format!("batch{}", args.batch)
        } else {
            "single".to_owned()
        },
        args.count,
        args.size,
        accepted_at.as_secs_f64(),
        seen.len(),
        total.as_secs_f64(),
        seen.len() as f64 / total.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        pct_of(&acks, 0.5).as_secs_f64() * 1e3,
        pct_of(&acks, 0.99).as_secs_f64() * 1e3,
    );
    peak_and_check(&broker, pid, (seen.len(), args.count), "delivered").await
}

/// Print the broker's peak RSS; fail (with the broker's log) when fewer than all messages
/// were `what` (how many were, of how many), or when the router did not map each of them into
/// its event.
async fn peak_and_check(
    broker: &Broker,
    pid: u32,
    (n, of): (usize, usize),
    what: &str,
) -> anyhow::Result<()> {
    println!(
        "broker peak RSS (VmHWM) {:.0} MB; at the end RSS {:.0} MB (anon {:.0} MB, file {:.0} MB), {} threads",
        mb(proc_status_bytes(pid, "VmHWM")),
        mb(proc_status_bytes(pid, "VmRSS")),
        mb(proc_status_bytes(pid, "RssAnon")),
        mb(proc_status_bytes(pid, "RssFile")),
        proc_status_value(pid, "Threads")
    );
    anyhow::ensure!(n == of, "only {n} of {of} {what}:\n{}", broker.log_text());
    // The figures are for the whole path only if the router mapped every message into its
    // lab-result event (none dead-lettered as malformed): check it rather than assume it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = broker.metrics().await;
        let mapped = metric_sum(&text, "ketenbus_router_normalised_events_total");
        let dead = metric_sum(&text, "ketenbus_router_dead_letters_total");
        anyhow::ensure!(
            dead == 0.0,
            "the router dead-lettered {dead} of the messages"
        );
        if mapped >= of as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the router mapped {mapped} of {of} messages into events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    indexes_catch_up(broker).await
}

/// The indexes built from the log (lineage, FHIR resources) run behind the message path and
/// may lag under load: print how far behind they were at the end and how long they took to
/// catch up; fail when they have not within two minutes. The broker samples the lag every
/// 5 s, so a time is known to that step: a lag of 0 counts only from a sample taken after
/// the end.
async fn indexes_catch_up(broker: &Broker) -> anyhow::Result<()> {
    const SAMPLED_EVERY: Duration = Duration::from_secs(5);
    let end = Instant::now();
    let lag = |text: &str| metric_sum(text, "ketenbus_log_index_lag_records");
    let at_end = lag(&broker.metrics().await);
    loop {
        let now = lag(&broker.metrics().await);
        if now == 0.0 && end.elapsed() > SAMPLED_EVERY {
            println!(
                "indexes behind at the end: {at_end:.0} records (as last sampled); caught up at most {:.0} s after the end (the lag is sampled every 5 s)",
                end.elapsed().as_secs_f64().ceil()
            );
            return Ok(());
        }
        anyhow::ensure!(
            end.elapsed() < Duration::from_secs(120),
            "the indexes are still {now:.0} records behind two minutes after the end"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sum of every series of metric `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Send `n` letters of `size` bytes at once; print peak RSS and RSS before and after.
async fn large(
    broker: &Broker,
    pid: u32,
    client: &reqwest::Client,
    receiver: &Receiver,
    n: usize,
    size: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(size >= 4096, "--large size must be at least 4 KiB");
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| large_mail(i, size)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = proc_status_bytes(pid, "VmRSS");
    eprintln!("sending {n} mails of {size} bytes at once");
    let start = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for body in bodies {
        let (client, url) = (client.clone(), broker.url.clone());
        posts.spawn(async move {
            post_202(&client, &url, "message/rfc822", body).await?;
            Ok::<_, anyhow::Error>(start.elapsed())
        });
    }
    let mut accepted = Duration::ZERO;
    while let Some(r) = posts.join_next().await {
        accepted = accepted.max(r??);
    }
    let got = receiver.wait_for(n, Duration::from_secs(300)).await;
    let delivered = start.elapsed();
    anyhow::ensure!(
        got.len() >= n && got.iter().all(|r| r.body.len() == size),
        "{} of {n} delivered whole:\n{}",
        got.iter().filter(|r| r.body.len() == size).count(),
        broker.log_text()
    );
    let peak = proc_status_bytes(pid, "VmHWM");
    let rss_done = proc_status_bytes(pid, "VmRSS");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_after = proc_status_bytes(pid, "VmRSS");
    println!(
        "large={n}x{size}B accepted_in={:.2}s delivered_in={:.2}s peak_rss={:.0}MB rss_idle_before={:.0}MB rss_at_delivery={:.0}MB rss_10s_after={:.0}MB (anon {:.0}MB, file {:.0}MB)",
        accepted.as_secs_f64(),
        delivered.as_secs_f64(),
        mb(peak),
        mb(rss_idle),
        mb(rss_done),
        mb(rss_after),
        mb(proc_status_bytes(pid, "RssAnon")),
        mb(proc_status_bytes(pid, "RssFile")),
    );
    Ok(())
}
