//! The idempotent producer (`acks=all`): `publish` resolves once the cluster acknowledged
//! every record, in order.

use std::time::{Duration, Instant};

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;
use rdkafka::producer::future_producer::OwnedDeliveryResult;

use super::classify::classify;
use super::config::KafkaConfig;
use super::{KafkaBus, LogContext, millis};
use crate::bus::{BusError, OutRecord, Position};

/// The producer of a bus with `config`. Nothing connects yet: the first request does.
pub(super) fn producer(config: &KafkaConfig) -> Result<FutureProducer<LogContext>, BusError> {
    let mut producer_config = config.client_config();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", millis(config.delivery_timeout))
        .set("message.max.bytes", config.max_record_bytes.to_string())
        .set("allow.auto.create.topics", "false")
        // Java's partitioner: a key lands in the same partition as with Java clients.
        .set("partitioner", "murmur2_random");
    FutureProducer::from_config_and_context(&producer_config, LogContext)
        .map_err(|e| BusError::Fatal(format!("kafka producer: {e}")))
}

impl KafkaBus {
    /// Publish `records` in order; resolves once the cluster acknowledged every one.
    pub(super) async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Position>, BusError> {
        self.check_topics(records.iter().map(|r| r.topic.as_str()))
            .await?;
        let mut pending = Vec::with_capacity(records.len());
        let mut positions = Vec::with_capacity(records.len());
        // Enqueue strictly in order (the idempotent producer keeps that order per partition).
        // When the local queue is full, wait for our own earlier records to be acknowledged
        // and retry the same record, so no later record overtakes it.
        for r in &records {
            let give_up = Instant::now() + self.config.delivery_timeout;
            loop {
                match self
                    .producer
                    .send_result(FutureRecord::to(&r.topic).key(&r.key).payload(&r.value))
                {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                        if Instant::now() >= give_up {
                            return Err(BusError::Unavailable(
                                "kafka producer queue full".to_owned(),
                            ));
                        }
                        if positions.len() < pending.len() {
                            let delivery = &mut pending[positions.len()];
                            positions
                                .push(delivered(delivery.await, &records[positions.len()].topic)?);
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    Err((e, _)) => return Err(classify(&e, Some(&r.topic))),
                }
            }
        }
        for i in positions.len()..pending.len() {
            let p = delivered((&mut pending[i]).await, &records[i].topic)?;
            positions.push(p);
        }
        Ok(positions)
    }
}

fn delivered<E>(
    outcome: Result<OwnedDeliveryResult, E>,
    topic: &str,
) -> Result<Position, BusError> {
    match outcome {
        Ok(Ok(d)) => Ok(Position {
            partition: u32::try_from(d.partition).unwrap_or_default(),
            offset: d.offset,
        }),
        Ok(Err((e, _))) => Err(classify(&e, Some(topic))),
        Err(_) => Err(BusError::Unavailable(
            "kafka producer shut down before delivery".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::tests::{rec, test_bus};
    use crate::bus::{Bus, TopicSpec};

    /// Measures publish throughput with `acks=all` (printed; run with `--nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_throughput_with_acks_all() {
        let Some((bus, prefix)) = test_bus("throughput") else {
            return;
        };
        let topic = format!("{prefix}.t");
        bus.ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: 6,
        }])
        .await
        .unwrap();
        let (batches, per_batch, size) = (20, 500, 2048);
        let started = Instant::now();
        for b in 0..batches {
            let batch = (0..per_batch)
                .map(|i| {
                    rec(
                        &topic,
                        format!("patient-{}", (b * per_batch + i) % 997),
                        vec![b'x'; size],
                    )
                })
                .collect();
            assert_eq!(bus.publish(batch).await.unwrap().len(), per_batch);
        }
        let secs = started.elapsed().as_secs_f64();
        let n = batches * per_batch;
        #[allow(clippy::cast_precision_loss)]
        let rate = n as f64 / secs;
        eprintln!(
            "kafka publish, acks=all, idempotent: {n} records of {size} bytes in batches of {per_batch}: {secs:.2} s, {rate:.0} records/s"
        );
        let lag = bus.lag(&format!("{prefix}.g"), &topic).await.unwrap();
        assert_eq!(
            lag.iter().map(|(_, c, e)| e - c).sum::<i64>(),
            i64::try_from(n).unwrap()
        );
    }
}
