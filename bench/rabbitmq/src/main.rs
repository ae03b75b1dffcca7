//! Load generator for RabbitMQ's quorum queue with publisher confirms: the peer that
//! `ops/bench/peers.sh` runs beside `ketenbus-bench`, with the same workload.
//!
//! ```text
//! rabbitmq-bench --amqp amqp://127.0.0.1:5679/%2f --mode publish --count 30000 --size 2048
//! rabbitmq-bench --amqp amqp://127.0.0.1:5679/%2f --mode e2e --count 30000 --size 2048
//! rabbitmq-bench --amqp amqp://127.0.0.1:5679/%2f --mode e2e --rate 1000 --count 10000
//! ```
//!
//! One AMQP connection; each publisher has its own channel in confirm mode and waits for the
//! broker's confirm of a message before it sends the next (as a `ketenbus-bench` sender waits
//! for the 202). Messages are persistent, the queue is a durable quorum queue, declared fresh
//! for each run and deleted after. In mode `e2e` a consumer on another channel (prefetch
//! `--prefetch`) acknowledges each message as it arrives. Prints one line of `key=value`
//! pairs: the durable accept rate (first publish to last confirm), publish-to-confirm
//! percentiles, and in mode `e2e` the end-to-end rate (first publish to last consumed) and
//! publish-to-consumed percentiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Publish only: the durable accept rate.
    Publish,
    /// Publish and consume at once: accepted to consumed.
    E2e,
}

#[derive(Parser)]
#[command(about = "Load generator for RabbitMQ's quorum queue with publisher confirms")]
struct Args {
    /// AMQP URI of the broker.
    #[arg(long, default_value = "amqp://127.0.0.1:5672/%2f")]
    amqp: String,
    /// publish (accept rate only) or e2e (with a consumer).
    #[arg(long, value_enum, default_value = "e2e")]
    mode: Mode,
    /// Messages to send.
    #[arg(long, default_value_t = 30_000)]
    count: usize,
    /// Body size in bytes (at least 8: the message's index is in the first 8).
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Concurrent publishers, one channel each on the one connection.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// The consumer's prefetch (basic.qos).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Messages per second to offer; 0 publishes as fast as the broker confirms.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.size >= 8, "--size must be at least 8");
    anyhow::ensure!(args.senders > 0, "--senders must be at least 1");
    let conn = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", args.amqp))?;
    let admin = conn.create_channel().await?;
    let queue = format!("ketenbus-bench-{}", std::process::id());
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            queue_args,
        )
        .await
        .context("declaring the quorum queue")?;

    let start = Instant::now();
    // Nanoseconds after `start` at which message i was published (0: not yet).
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.count).map(|_| AtomicU64::new(0)).collect());

    let consumer = if args.mode == Mode::E2e {
        let ch = conn.create_channel().await?;
        ch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let mut stream = ch
            .basic_consume(
                queue.as_str().into(),
                "ketenbus-bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (published, count) = (Arc::clone(&published), args.count);
        Some(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            let mut last = start;
            while latencies.len() < count {
                let Some(delivery) = stream.next().await else {
                    anyhow::bail!("the consumer was cancelled");
                };
                let delivery = delivery?;
                let now = Instant::now();
                let i = delivery
                    .data
                    .first_chunk::<8>()
                    .map(|b| u64::from_le_bytes(*b) as usize)
                    .context("message shorter than 8 bytes")?;
                let sent = published
                    .get(i)
                    .context("message index out of range")?
                    .load(Ordering::Acquire);
                latencies.push(now.duration_since(start) - Duration::from_nanos(sent));
                last = now;
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Ok((latencies, last))
        }))
    } else {
        None
    };

    let offered = match args.rate {
        0 => "max".to_owned(),
        r => format!("{r}/s"),
    };
    eprintln!(
        "rabbitmq-bench: {} messages of {} bytes, {} publishers on one connection, rate {offered}",
        args.count, args.size, args.senders
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..args.senders {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (next, published, queue) = (Arc::clone(&next), Arc::clone(&published), queue.clone());
        let (count, size, rate) = (args.count, args.size, args.rate);
        publishers.spawn(async move {
            let mut confirms = Vec::new();
            let mut body = vec![b'x'; size];
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    return Ok::<_, anyhow::Error>(confirms);
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                body[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let t0 = Instant::now();
                let at = u64::try_from(t0.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
                published[i].store(at.max(1), Ordering::Release);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(confirm.is_ack(), "the broker refused message {i}");
                confirms.push(t0.elapsed());
            }
        });
    }
    let mut confirms = Vec::with_capacity(args.count);
    while let Some(r) = publishers.join_next().await {
        confirms.extend(r??);
    }
    let accepted_in = start.elapsed();
    confirms.sort();
    let mut line = format!(
        "broker=rabbitmq mode={} messages={} size={}B senders={} rate={} accepted_in={:.2}s accept_rate={:.0} confirm_p50={:.1}ms confirm_p99={:.1}ms",
        if args.mode == Mode::E2e {
            "e2e"
        } else {
            "publish"
        },
        confirms.len(),
        args.size,
        args.senders,
        args.rate,
        accepted_in.as_secs_f64(),
        confirms.len() as f64 / accepted_in.as_secs_f64(),
        ms(pct(&confirms, 0.5)),
        ms(pct(&confirms, 0.99)),
    );
    if let Some(consumer) = consumer {
        let (mut latencies, last) = tokio::time::timeout(Duration::from_secs(300), consumer)
            .await
            .context("the consumer did not get every message within 300 s")???;
        latencies.sort();
        let total = last.duration_since(start);
        line.push_str(&format!(
            " consumed={} consumed_in={:.2}s e2e_rate={:.0} e2e_p50={:.1}ms e2e_p99={:.1}ms e2e_max={:.1}ms",
            latencies.len(),
            total.as_secs_f64(),
            latencies.len() as f64 / total.as_secs_f64(),
            ms(pct(&latencies, 0.5)),
            ms(pct(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        ));
    }
    println!("{line}");
    // Cleanup only: the figures are out, and peers.sh stops this node and removes its data
    // next. A node that has already closed the connection does not fail the run.
    if let Err(e) = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        eprintln!("rabbitmq-bench: the queue was not deleted ({e}); its node goes next");
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// The `p` quantile of sorted durations (nearest rank).
fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
