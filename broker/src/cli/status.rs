//! `ketenbus status`: a terminal summary of a running broker — components, inflow per
//! connector, deliveries and failures per subscription, lag and oldest undelivered — read
//! from its `/readyz` and `/metrics` endpoints.

use std::collections::BTreeMap;
use std::fmt::Write;

use ketenbus_schemas::Outcome;

use crate::observe::metrics;

/// One sample of the text exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the Prometheus text format (the subset `/metrics` writes).
#[must_use]
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        labels.insert(
                            k.trim_start_matches(',').to_owned(),
                            v.trim_end_matches('"').to_owned(),
                        );
                    }
                }
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn sum_by(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (n, l, v) in samples {
        if n == name {
            *m.entry(l.get(label).cloned().unwrap_or_default())
                .or_insert(0.0) += v;
        }
    }
    m
}

/// Render the summary from `/readyz` JSON and `/metrics` text.
#[must_use]
pub fn render(url: &str, ready: &serde_json::Value, metrics: &str) -> String {
    let samples = parse_metrics(metrics);
    let mut s = String::new();
    let state = if ready["ready"].as_bool() == Some(true) {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(s, "ketenbus at {url}: {state}");
    if let Some(components) = ready["components"].as_object() {
        for (name, c) in components {
            let st = c["state"].as_str().unwrap_or("?");
            let reason = c["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let _ = writeln!(s, "  {name:<32} {st}{reason}");
        }
    }
    let _ = writeln!(s, "\ninflow (messages since start)");
    for (connector, n) in sum_by(&samples, metrics::INGEST_RECEIVED_MESSAGES, "connector") {
        let _ = writeln!(s, "  {connector:<32} {n:>10.0}");
    }
    let outcomes = {
        let mut m: BTreeMap<(String, String), f64> = BTreeMap::new();
        for (n, l, v) in &samples {
            if n == metrics::DISPATCH_DELIVERY_OUTCOMES {
                let key = (
                    l.get("subscription").cloned().unwrap_or_default(),
                    l.get("outcome").cloned().unwrap_or_default(),
                );
                *m.entry(key).or_insert(0.0) += v;
            }
        }
        m
    };
    let lag = sum_by(&samples, metrics::DISPATCH_CONSUMER_LAG, "subscription");
    let age = {
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for (n, l, v) in &samples {
            if n == metrics::DISPATCH_OLDEST_UNDELIVERED_AGE {
                let e = m
                    .entry(l.get("subscription").cloned().unwrap_or_default())
                    .or_insert(0.0);
                *e = e.max(*v);
            }
        }
        m
    };
    let mut subs: Vec<&String> = lag
        .keys()
        .chain(age.keys())
        .chain(outcomes.keys().map(|(s, _)| s))
        .collect();
    subs.sort();
    subs.dedup();
    let _ = writeln!(
        s,
        "\nsubscriptions{:>30}{:>11}{:>11}{:>8}{:>16}",
        "delivered", "dead", "filtered", "lag", "oldest waiting"
    );
    let mut failing = Vec::new();
    for sub in subs {
        // The outcome label of `ketenbus_dispatch_delivery_outcomes_total`.
        let get = |o: Outcome| {
            outcomes
                .get(&(sub.clone(), o.as_str().to_owned()))
                .copied()
                .unwrap_or(0.0)
        };
        let oldest = age.get(sub).copied().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "  {sub:<32}{:>11.0}{:>11.0}{:>11.0}{:>8.0}{:>15.0}s",
            get(Outcome::Delivered),
            get(Outcome::DeadLettered),
            get(Outcome::Filtered),
            lag.get(sub).copied().unwrap_or(0.0),
            oldest
        );
        if get(Outcome::DeadLettered) > 0.0 || oldest > 60.0 {
            failing.push(sub.clone());
        }
    }
    if failing.is_empty() {
        let _ = writeln!(s, "\nno subscription is failing");
    } else {
        let _ = writeln!(
            s,
            "\nneeds attention: {} (see `ketenbus dlq list --subscription NAME`)",
            failing.join(", ")
        );
    }
    s
}

/// Fetch `/readyz` and `/metrics` from the broker at `url` and print the summary; fails
/// when the broker is not ready.
///
/// # Errors
/// The broker cannot be reached or answers with something that is not its JSON.
pub async fn run(url: &str) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let base = url.trim_end_matches('/');
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .with_context(|| format!("cannot reach ketenbus at {base}"))?;
    let ready: serde_json::Value = serde_json::from_slice(&ready.bytes().await?)?;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    print!("{}", render(base, &ready, &metrics));
    Ok(if ready["ready"].as_bool() == Some(true) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_failing_subscriptions() {
        let metrics = format!(
            "# HELP x\n{r}{{connector=\"http\",format=\"edifact\"}} 12\n{o}{{subscription=\"gp\",outcome=\"delivered\",kind=\"raw\"}} 10\n\
             {o}{{subscription=\"seh\",outcome=\"dead_lettered\",kind=\"raw\"}} 2\n{l}{{subscription=\"seh\"}} 3\n",
            r = metrics::INGEST_RECEIVED_MESSAGES,
            o = metrics::DISPATCH_DELIVERY_OUTCOMES,
            l = metrics::DISPATCH_CONSUMER_LAG,
        );
        let ready =
            serde_json::json!({"ready": true, "components": {"router": {"state": "ready"}}});
        let out = render("http://127.0.0.1:8080", &ready, &metrics);
        assert!(
            out.contains("ketenbus at http://127.0.0.1:8080: ready"),
            "{out}"
        );
        assert!(out.contains("http") && out.contains("12"), "{out}");
        assert!(out.contains("needs attention: seh"), "{out}");
        assert!(!out.contains("needs attention: gp"), "{out}");
    }
}
