//! How rdkafka errors map to the kinds of [`BusError`]: each is classified once, here.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::bus::BusError;

/// Classifies an rdkafka error once: broker trouble is `Unavailable` (try again), a missing
/// topic is `UnknownTopic`, misconfiguration and refused access are `Fatal`.
pub(super) fn classify(err: &KafkaError, topic: Option<&str>) -> BusError {
    use RDKafkaErrorCode as C;
    let code = match err {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    let Some(code) = code else {
        return match err {
            KafkaError::Canceled => BusError::Unavailable("kafka client shut down".to_owned()),
            other => BusError::Fatal(other.to_string()),
        };
    };
    match code {
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition | C::UnknownTopicId => {
            BusError::UnknownTopic(topic.unwrap_or("?").to_owned())
        }
        // This record, not the log: the others go on (a topic made elsewhere with a smaller
        // max.message.bytes than ketenbus's records).
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => BusError::TooLarge(err.to_string()),
        C::Fatal
        | C::InvalidArgument
        | C::Authentication
        | C::SSL
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::TransactionalIdAuthorizationFailed
        | C::InvalidReplicationFactor
        | C::InvalidPartitions
        | C::InvalidConfig
        | C::InvalidTopic
        | C::InvalidRequiredAcks
        | C::PolicyViolation
        | C::InvalidRecord
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::InvalidGroupId
        | C::ProducerFenced
        | C::Fenced
        | C::OutOfOrderSequenceNumber => BusError::Fatal(err.to_string()),
        _ => BusError::Unavailable(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::{rec, test_bus};
    use crate::bus::kafka::{KafkaBus, KafkaConfig};
    use crate::bus::{Bus, BusError, TopicSpec};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishing_to_a_missing_topic_fails_fast_as_unknown_topic() {
        let Some((bus, prefix)) = test_bus("missing") else {
            return;
        };
        let topic = format!("{prefix}.nope");
        let started = Instant::now();
        let err = bus
            .publish(vec![rec(&topic, "k".into(), b"v".to_vec())])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BusError::UnknownTopic(t) if *t == topic),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(
            bus.subscribe("g", std::slice::from_ref(&topic)).await,
            Err(BusError::UnknownTopic(_))
        ));
        assert!(matches!(
            bus.read_all(&topic).await,
            Err(BusError::UnknownTopic(_))
        ));
    }

    /// Without a broker, publishing and creating topics fail as "try again", not silently.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_cluster_is_unavailable() {
        let mut config = KafkaConfig::new("127.0.0.1:9");
        config.request_timeout = Duration::from_millis(500);
        config.delivery_timeout = Duration::from_secs(1);
        let bus = KafkaBus::new(&config).expect("clients build without connecting");
        let err = bus
            .publish(vec![rec("t", "k".into(), b"v".to_vec())])
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
        assert_eq!(err.kind(), ketenbus_connectors::ErrorKind::Retryable);
        let err = bus
            .ensure_topics(&[TopicSpec {
                name: "t".into(),
                partitions: 1,
            }])
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    }
}
