//! One contract test body, run against every engine (embedded here, Kafka in `kafka.rs`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::{Bus, Consumer, OutRecord, Record, TopicSpec};

fn rec(topic: &str, key: &str, value: &str) -> OutRecord {
    OutRecord {
        topic: topic.to_owned(),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

async fn drain<C: Consumer>(c: &mut C, want: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < want && tokio::time::Instant::now() < deadline {
        if let Some(r) = c.poll(Duration::from_millis(500)).await.expect("poll") {
            out.push(r);
        }
    }
    out
}

/// The contract every engine keeps. `prefix` makes topic and group names unique per run.
pub(crate) async fn run_contract<B: Bus>(bus: &B, prefix: &str) {
    let topic = format!("{prefix}.contract");
    let other = format!("{prefix}.other");
    let specs = [
        TopicSpec {
            name: topic.clone(),
            partitions: 3,
        },
        TopicSpec {
            name: other.clone(),
            partitions: 1,
        },
    ];
    bus.ensure_topics(&specs).await.expect("create topics");
    bus.ensure_topics(&specs)
        .await
        .expect("creating existing topics is fine");

    // Publish: positions come back in order; one key stays in one partition, offsets rise.
    let mut batch = Vec::new();
    for i in 0..30 {
        batch.push(rec(&topic, &format!("k{}", i % 4), &format!("v{i}")));
    }
    let positions = bus.publish(batch).await.expect("publish");
    assert_eq!(positions.len(), 30);
    let mut key_part = BTreeMap::new();
    let mut last_offset = BTreeMap::new();
    for (i, p) in positions.iter().enumerate() {
        let key = i % 4;
        let part = *key_part.entry(key).or_insert(p.partition);
        assert_eq!(part, p.partition, "key k{key} moved partition");
        if let Some(prev) = last_offset.insert(p.partition, p.offset) {
            assert!(p.offset > prev, "offsets rise within a partition");
        }
    }
    bus.publish(vec![rec(&other, "x", "only-other")])
        .await
        .expect("publish other");

    // A group reads everything, per key in publish order.
    let group = format!("{prefix}.g1");
    let mut c = bus
        .subscribe(&group, std::slice::from_ref(&topic))
        .await
        .expect("subscribe");
    let got = drain(&mut c, 30).await;
    assert_eq!(got.len(), 30, "group reads every record");
    let mut per_key: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for r in &got {
        assert_eq!(r.topic, topic);
        per_key
            .entry(r.key.clone())
            .or_default()
            .push(String::from_utf8(r.value.clone()).unwrap());
    }
    for (key, values) in &per_key {
        let k: usize = String::from_utf8_lossy(&key[1..]).parse().unwrap();
        let want: Vec<String> = (0..30)
            .filter(|i| i % 4 == k)
            .map(|i| format!("v{i}"))
            .collect();
        assert_eq!(values, &want, "per-key order");
    }

    // Ack all but one record; after a restart of the group only the unfinished suffix of
    // that partition comes back.
    let held = got
        .iter()
        .find(|r| r.key == b"k1")
        .cloned()
        .expect("a k1 record");
    for r in &got {
        if r.offset != held.offset || r.partition != held.partition {
            c.ack(r.ack_token()).await.expect("ack");
        }
    }
    c.commit().await.expect("commit");
    drop(c);
    let mut c = bus
        .subscribe(&group, std::slice::from_ref(&topic))
        .await
        .expect("resubscribe");
    let again = drain(&mut c, 1).await;
    let again_offsets: HashSet<(u32, i64)> =
        again.iter().map(|r| (r.partition, r.offset)).collect();
    assert!(
        again_offsets.contains(&(held.partition, held.offset)),
        "the unacked record comes back"
    );
    for r in &again {
        assert_eq!(
            r.partition, held.partition,
            "other partitions were committed whole"
        );
        assert!(r.offset >= held.offset);
    }
    // Finish them; nothing more comes after a commit and another restart.
    let more = drain(&mut c, 30).await; // whatever else of the suffix is pending
    for r in again.iter().chain(more.iter()) {
        c.ack(r.ack_token()).await.expect("ack");
    }
    c.commit().await.expect("commit");
    let lag = bus.lag(&group, &topic).await.expect("lag");
    assert_eq!(lag.len(), 3);
    for (_, committed, end) in &lag {
        assert_eq!(committed, end, "no lag after everything was acked");
    }
    drop(c);
    let mut c = bus
        .subscribe(&group, std::slice::from_ref(&topic))
        .await
        .expect("resubscribe");
    assert!(
        c.poll(Duration::from_millis(1500))
            .await
            .expect("poll")
            .is_none(),
        "nothing left"
    );

    // New records reach a live consumer.
    bus.publish(vec![rec(&topic, "k9", "late")])
        .await
        .expect("publish late");
    let late = drain(&mut c, 1).await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].value, b"late");

    // A second group is independent of the first.
    let mut c2 = bus
        .subscribe(&format!("{prefix}.g2"), std::slice::from_ref(&topic))
        .await
        .expect("subscribe g2");
    assert_eq!(drain(&mut c2, 31).await.len(), 31);

    // read_alone: every reader sees every partition, whatever group members read the topic
    // too (c and c2 are still live); each starts where it is told and tails new records.
    let mut a = bus
        .read_alone(&format!("{prefix}.alone-a"), &topic, &[])
        .await
        .expect("read_alone a");
    let mut b = bus
        .read_alone(&format!("{prefix}.alone-b"), &topic, &[])
        .await
        .expect("read_alone b");
    let seen_a = drain(&mut a, 31).await;
    assert_eq!(seen_a.len(), 31, "a reader alone sees every record");
    assert_eq!(drain(&mut b, 31).await.len(), 31, "so does another");
    let mut ends: BTreeMap<u32, i64> = BTreeMap::new();
    for r in &seen_a {
        let e = ends.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let (&busiest, &end) = ends.iter().max_by_key(|(_, e)| **e).expect("a partition");
    let from: Vec<(u32, i64)> = ends
        .iter()
        .map(|(p, e)| (*p, if *p == busiest { e - 2 } else { *e }))
        .collect();
    let alone = format!("{prefix}.alone-c");
    let mut tail = bus
        .read_alone(&alone, &topic, &from)
        .await
        .expect("read_alone from");
    let mut suffix = drain(&mut tail, 2).await;
    while let Some(r) = tail.poll(Duration::from_millis(1000)).await.expect("poll") {
        suffix.push(r);
    }
    assert_eq!(
        suffix
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect::<Vec<_>>(),
        vec![(busiest, end - 2), (busiest, end - 1)],
        "a reader starts where it is told"
    );
    for r in &suffix {
        tail.ack(r.ack_token()).await.expect("ack");
    }
    tail.commit().await.expect("commit alone");
    let lag = bus.lag(&alone, &topic).await.expect("lag alone");
    assert!(
        lag.iter()
            .any(|(p, committed, e)| *p == busiest && committed == e),
        "a reader's acknowledgements are committed under its group: {lag:?}"
    );
    bus.publish(vec![rec(&topic, "k10", "tail")])
        .await
        .expect("publish tail");
    for reader in [&mut a, &mut b, &mut tail] {
        let got = drain(reader, 1).await;
        assert_eq!(got.len(), 1, "every reader tails new records");
        assert_eq!(got[0].value, b"tail");
    }

    // read_all sees a whole topic without a group.
    let all = bus.read_all(&other).await.expect("read_all");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].value, b"only-other");

    // read_at finds one record by its position, and nothing past the end.
    let p = positions[7];
    let one = bus
        .read_at(&topic, p.partition, p.offset)
        .await
        .expect("read_at")
        .expect("the record is there");
    assert_eq!((one.partition, one.offset), (p.partition, p.offset));
    assert_eq!(one.value, b"v7");
    assert_eq!(one.key, b"k3");
    assert!(
        bus.read_at(&topic, p.partition, 1_000_000)
            .await
            .expect("read_at past the end")
            .is_none()
    );

    // Publishing to an unknown topic fails clearly.
    assert!(
        bus.publish(vec![rec(&format!("{prefix}.missing"), "k", "v")])
            .await
            .is_err()
    );
}
