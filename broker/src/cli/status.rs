//! `ketenbus status`: a terminal summary of a running broker — components, inflow and
//! refusals per connector, deliveries, retrying records (with the reason of their last
//! failure) and dead letters per subscription, router dead letters, inbox failures, lag and
//! oldest undelivered — read from its `/readyz` and `/metrics` endpoints and, with
//! `--config`, from its log, its inboxes and its data directory (dead letters, files set
//! aside, paused subscriptions: so a restart resets nothing that matters).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use ketenbus_schemas::Outcome;

use crate::config::Settings;
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

/// What `status --config` reads from the broker's durable state, so it is whole also right
/// after a restart: dead letters kept in the log and files the inboxes set aside.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    /// Unresolved dead letters per stage (a subscription, or `router`): how many, and the
    /// newest one's reason code.
    pub dead_letters: BTreeMap<String, (usize, String)>,
    /// Per inbox directory: files in its `failed/` and the newest one's reason.
    pub inbox_failed: Vec<(String, usize, Option<String>)>,
    /// Subscriptions an operator paused (`paused.json` in the data directory).
    pub paused: Vec<String>,
    /// The configuration file, for the commands the summary suggests.
    pub config: String,
}

/// Render the summary from `/readyz` JSON, `/metrics` text and, with `--config`, what the
/// log and the inboxes hold.
#[must_use]
#[allow(clippy::too_many_lines)] // one summary, top to bottom
pub fn render(
    url: &str,
    ready: &serde_json::Value,
    metrics: &str,
    durable: Option<&Durable>,
) -> String {
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
    let refused: BTreeMap<String, f64> =
        sum_by(&samples, metrics::INGEST_REJECTED_MESSAGES, "connector")
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .collect();
    if !refused.is_empty() {
        let _ = writeln!(s, "\nrefused (messages since start)");
        for (connector, n) in &refused {
            let _ = writeln!(s, "  {connector:<32} {n:>10.0}");
        }
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
    // Records held for another attempt, per subscription and reason of their last failure.
    let mut retrying: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (n, l, v) in &samples {
        if n == metrics::DISPATCH_RETRYING_RECORDS && *v > 0.0 {
            *retrying
                .entry(l.get("subscription").cloned().unwrap_or_default())
                .or_default()
                .entry(l.get("reason").cloned().unwrap_or_default())
                .or_insert(0.0) += v;
        }
    }
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
    let paused: &[String] = durable.map_or(&[], |d| d.paused.as_slice());
    let mut subs: Vec<&String> = lag
        .keys()
        .chain(age.keys())
        .chain(outcomes.keys().map(|(s, _)| s))
        .chain(paused)
        .collect();
    subs.sort();
    subs.dedup();
    let dead_of = |sub: &str, counted: f64| -> f64 {
        match durable {
            #[allow(clippy::cast_precision_loss)] // counts of dead letters
            Some(d) => d.dead_letters.get(sub).map_or(0.0, |(n, _)| *n as f64),
            None => counted,
        }
    };
    let dead_heading = if durable.is_some() {
        "dead (kept)"
    } else {
        "dead"
    };
    let _ = writeln!(
        s,
        "\nsubscriptions{:>32}{:>12}{:>11}{:>11}{:>8}{:>16}",
        "delivered", dead_heading, "retrying", "filtered", "lag", "oldest waiting"
    );
    let mut attention: Vec<String> = Vec::new();
    let config_arg = durable.map_or_else(String::new, |d| format!(" --config {}", d.config));
    for sub in subs {
        // The outcome label of `ketenbus_dispatch_delivery_outcomes_total`.
        let get = |o: Outcome| {
            outcomes
                .get(&(sub.clone(), o.as_str().to_owned()))
                .copied()
                .unwrap_or(0.0)
        };
        let oldest = age.get(sub).copied().unwrap_or(0.0);
        let dead = dead_of(sub, get(Outcome::DeadLettered));
        let held: f64 = retrying.get(sub).map_or(0.0, |r| r.values().sum());
        let is_paused = paused.contains(sub);
        let name = if is_paused {
            format!("{sub} (paused)")
        } else {
            sub.clone()
        };
        let _ = writeln!(
            s,
            "  {name:<32}{:>11.0}{:>12.0}{:>11.0}{:>11.0}{:>8.0}{:>15.0}s",
            get(Outcome::Delivered),
            dead,
            held,
            get(Outcome::Filtered),
            lag.get(sub).copied().unwrap_or(0.0),
            oldest
        );
        if is_paused {
            attention.push(format!(
                "{sub} is paused: it delivers nothing until an operator resumes it in the console (Subscriptions)"
            ));
        }
        if let Some(reasons) = retrying.get(sub) {
            let list: Vec<String> = reasons
                .iter()
                .map(|(r, n)| format!("{r} ({n:.0})"))
                .collect();
            attention.push(format!(
                "{sub} is retrying {held:.0} record(s); last failure: {}",
                list.join(", ")
            ));
        } else if oldest > 60.0 && !is_paused {
            attention.push(format!(
                "{sub} has a record waiting for {oldest:.0}s (lag {:.0})",
                lag.get(sub).copied().unwrap_or(0.0)
            ));
        }
        if dead > 0.0 {
            let newest = durable
                .and_then(|d| d.dead_letters.get(sub.as_str()))
                .map(|(_, r)| format!(", newest: {r}"))
                .unwrap_or_default();
            attention.push(format!(
                "{sub} has {dead:.0} dead letter(s){newest}: ketenbus dlq list --subscription {sub}{config_arg}"
            ));
        }
    }
    // Messages the router could not normalise.
    let router_counted: f64 = sum_by(&samples, metrics::ROUTER_DEAD_LETTERS, "reason")
        .values()
        .sum();
    let router = match durable {
        Some(d) => d.dead_letters.get("router").map_or((0.0, None), |(n, r)| {
            #[allow(clippy::cast_precision_loss)] // counts of dead letters
            let n = *n as f64;
            (n, Some(r.clone()))
        }),
        None => (router_counted, None),
    };
    let _ = writeln!(
        s,
        "\nrouter dead letters ({}){:>19.0}",
        if durable.is_some() {
            "kept in the log"
        } else {
            "since start"
        },
        router.0
    );
    if router.0 > 0.0 {
        let newest = router
            .1
            .map(|r| format!(", newest: {r}"))
            .unwrap_or_default();
        attention.push(format!(
            "the router could not normalise {:.0} message(s){newest}: ketenbus dlq list --subscription router{config_arg}",
            router.0
        ));
    }
    // Files the inboxes set aside.
    match durable {
        Some(d) if !d.inbox_failed.is_empty() => {
            let _ = writeln!(s, "\ninboxes (files in failed/)");
            for (path, n, reason) in &d.inbox_failed {
                let _ = writeln!(s, "  {path:<40} {n:>6}");
                if *n > 0 {
                    let newest = reason
                        .as_ref()
                        .map(|r| format!(", newest: {r}"))
                        .unwrap_or_default();
                    attention.push(format!(
                        "inbox {path} set aside {n} file(s) in failed/{newest}"
                    ));
                }
            }
        }
        Some(_) => {}
        None => {
            if let Some(n) = refused.get("inbox") {
                let _ = writeln!(s, "\ninbox files moved to failed/ since start{n:>10.0}");
                attention.push(format!(
                    "the inboxes set aside {n:.0} file(s) in failed/ since start"
                ));
            }
        }
    }
    if attention.is_empty() {
        let _ = writeln!(s, "\nnothing is failing");
    } else {
        let _ = writeln!(s, "\nneeds attention:");
        for a in attention {
            let _ = writeln!(s, "  - {a}");
        }
    }
    if durable.is_none() {
        let _ = writeln!(
            s,
            "\n(counts since the broker started; with --config FILE, dead letters and inbox failures come from the log and the inboxes)"
        );
    }
    s
}

/// The broker's address as its configuration names it: `http.listen` (an unspecified
/// address as loopback), `https` with `[http.tls]`.
#[must_use]
pub fn url_of(config: &crate::config::Config) -> String {
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if config.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}

/// Read what the log and the inboxes of `settings` hold.
async fn durable(settings: &Settings, config: &Path) -> anyhow::Result<Durable> {
    let cfg = &settings.config;
    let mut stages: Vec<String> = settings
        .subscriptions
        .iter()
        .map(|s| s.name.clone())
        .collect();
    // Subscriptions made through /fhir/Subscription (`fhir-<id>`): their dead letters too.
    stages.extend(crate::deliver::backport::store::names(&cfg.data_dir)?);
    stages.push("router".to_owned());
    let dead_letters = crate::bus::open(
        &cfg.bus,
        &cfg.data_dir,
        cfg.http.max_body.as_u64(),
        &settings.env,
        Counts(stages),
    )
    .await??;
    let inbox_failed = cfg
        .inbox
        .iter()
        .map(|i| {
            let (n, reason) = set_aside(&i.path.join("failed"));
            (i.path.display().to_string(), n, reason)
        })
        .collect();
    let paused = crate::deliver::pause::Pauses::open(&cfg.data_dir)?.paused();
    Ok(Durable {
        dead_letters,
        inbox_failed,
        paused,
        config: config.display().to_string(),
    })
}

/// Files in an inbox's `failed/` (not counting their `.reason` notes) and the newest one's
/// reason.
fn set_aside(failed: &Path) -> (usize, Option<String>) {
    let Ok(entries) = std::fs::read_dir(failed) else {
        return (0, None);
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "reason"))
        .map(|p| {
            let t = p
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, p)
        })
        .collect();
    files.sort();
    let reason = files.last().and_then(|(_, p)| {
        let mut note = p.clone().into_os_string();
        note.push(".reason");
        std::fs::read_to_string(note)
            .ok()
            .and_then(|r| r.lines().next().map(str::to_owned))
    });
    (files.len(), reason)
}

/// Counting the unresolved dead letters of each stage, waiting for the engine.
struct Counts(Vec<String>);

impl crate::bus::WithBus for Counts {
    type Output = anyhow::Result<BTreeMap<String, (usize, String)>>;

    async fn with<B: crate::bus::Bus>(self, bus: B) -> Self::Output {
        let mut out = BTreeMap::new();
        for stage in self.0 {
            let letters =
                crate::deliver::dlq::list(&bus, &stage, &crate::deliver::dlq::Selection::default())
                    .await?;
            if let Some(newest) = letters.iter().max_by_key(|d| d.at_ms) {
                out.insert(stage, (letters.len(), newest.reason.clone()));
            }
        }
        Ok(out)
    }
}

/// Fetch `/readyz` and `/metrics` from the broker at `url` (or the one `config` names) and
/// print the summary, with `config` also the dead letters in its log and the files its
/// inboxes set aside; fails when the broker is not ready. Sends the operator token in
/// KETENBUS_OPERATOR_TOKEN, when set.
///
/// # Errors
/// The broker cannot be reached or answers with something that is not its JSON; with
/// `config`, the configuration or its log cannot be read.
pub async fn run(
    url: Option<&str>,
    config: Option<&Path>,
) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context;
    let settings = config.map(|c| super::load_for_log(Some(c))).transpose()?;
    let base = match (url, &settings) {
        (Some(u), _) => u.trim_end_matches('/').to_owned(),
        (None, Some(s)) => url_of(&s.config),
        (None, None) => "http://127.0.0.1:8080".to_owned(),
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let token = std::env::var("KETENBUS_OPERATOR_TOKEN").ok();
    let get = |path: &str| {
        let req = client.get(format!("{base}{path}"));
        match &token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    };
    let ready = get("/readyz")
        .send()
        .await
        .with_context(|| format!("cannot reach ketenbus at {base}"))?;
    let ready: serde_json::Value = serde_json::from_slice(&ready.bytes().await?)?;
    let metrics = get("/metrics").send().await?.text().await?;
    let durable = match (&settings, config) {
        (Some(s), Some(c)) => Some(durable(s, c).await?),
        _ => None,
    };
    print!("{}", render(&base, &ready, &metrics, durable.as_ref()));
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
        let out = render("http://127.0.0.1:8080", &ready, &metrics, None);
        assert!(
            out.contains("ketenbus at http://127.0.0.1:8080: ready"),
            "{out}"
        );
        assert!(out.contains("http") && out.contains("12"), "{out}");
        assert!(
            out.contains("seh has 2 dead letter(s): ketenbus dlq list --subscription seh"),
            "{out}"
        );
        assert!(!out.contains("gp has"), "{out}");
        assert!(!out.contains("NAME"), "{out}");
    }

    /// A subscription that retries is news, with the reason of its last failures; router
    /// dead letters and inbox failures from the log and the inboxes name their command.
    #[test]
    fn retrying_router_and_inbox_failures_need_attention() {
        let metrics = format!(
            "{o}{{subscription=\"gp\",outcome=\"delivered\"}} 10\n\
             {r}{{subscription=\"gp\",reason=\"http_503\"}} 2\n{r}{{subscription=\"gp\",reason=\"connect\"}} 0\n",
            o = metrics::DISPATCH_DELIVERY_OUTCOMES,
            r = metrics::DISPATCH_RETRYING_RECORDS,
        );
        let ready = serde_json::json!({"ready": true, "components": {}});
        let out = render("http://127.0.0.1:8080", &ready, &metrics, None);
        assert!(
            out.contains("gp is retrying 2 record(s); last failure: http_503 (2)"),
            "{out}"
        );
        assert!(!out.contains("nothing is failing"), "{out}");
        let durable = Durable {
            dead_letters: BTreeMap::from([("router".to_owned(), (3, "edifact_syntax".to_owned()))]),
            inbox_failed: vec![("/srv/inbox".into(), 1, Some("the file is empty".into()))],
            paused: Vec::new(),
            config: "/etc/ketenbus.toml".into(),
        };
        let out = render("http://127.0.0.1:8080", &ready, &metrics, Some(&durable));
        assert!(out.contains("the router could not normalise 3 message(s), newest: edifact_syntax: ketenbus dlq list --subscription router --config /etc/ketenbus.toml"), "{out}");
        assert!(
            out.contains(
                "inbox /srv/inbox set aside 1 file(s) in failed/, newest: the file is empty"
            ),
            "{out}"
        );
        println!("{out}");
    }

    /// A paused subscription is marked in the table and named under "needs attention", also
    /// when it has had no traffic since the start; its waiting record is no separate news.
    #[test]
    fn paused_subscriptions_are_shown() {
        let metrics = format!(
            "{o}{{subscription=\"gp\",outcome=\"delivered\"}} 10\n\
             {a}{{subscription=\"gp\",kind=\"raw\"}} 120\n",
            o = metrics::DISPATCH_DELIVERY_OUTCOMES,
            a = metrics::DISPATCH_OLDEST_UNDELIVERED_AGE,
        );
        let ready = serde_json::json!({"ready": true, "components": {}});
        let durable = Durable {
            paused: vec!["gp".into(), "archive".into()],
            config: "/etc/ketenbus.toml".into(),
            ..Durable::default()
        };
        let out = render("http://127.0.0.1:8080", &ready, &metrics, Some(&durable));
        assert!(out.contains("  gp (paused)"), "{out}");
        assert!(out.contains("  archive (paused)"), "{out}");
        assert!(
            out.contains("  - gp is paused: it delivers nothing until an operator resumes it"),
            "{out}"
        );
        assert!(out.contains("  - archive is paused"), "{out}");
        assert!(!out.contains("gp has a record waiting"), "{out}");
        assert!(!out.contains("nothing is failing"), "{out}");
        let running = Durable {
            config: "/etc/ketenbus.toml".into(),
            ..Durable::default()
        };
        let out = render("http://127.0.0.1:8080", &ready, &metrics, Some(&running));
        assert!(!out.contains("paused"), "{out}");
        assert!(out.contains("gp has a record waiting for 120s"), "{out}");
    }
}
