//! Reading a configuration text into [`Config`] with every error TOML and serde let us find,
//! not only the first: the TOML parser recovers from syntax errors and names each; a type
//! error is looked for in each section, array element and key on its own, so an error in
//! one place does not hide another. Type errors name an example of a good value.

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeArray, DeString, DeTable, DeValue};

use super::{Config, Problem, key_path_at};

/// How deep below the document errors are looked for one key at a time (a subscription's
/// retry table is 4 deep: `subscriptions`, `[0]`, `retry`, `initial`).
const MAX_DEPTH: usize = 8;

/// How many partial documents are read at most: a hostile or huge file costs bounded work,
/// and past this the errors found so far are reported.
const MAX_TRIES: usize = 2000;

/// One step of a key path into the document.
#[derive(Clone)]
enum Step<'i> {
    Key(Spanned<DeString<'i>>),
    Index(usize),
}

/// `text` as a [`Config`], or every syntax and type error found, each at its key path.
pub(super) fn read(text: &str) -> Result<Config, Vec<Problem>> {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // What follows a syntax error is guesswork to the parser: its type errors would be
        // noise. Every syntax error is named, each with its line.
        return Err(in_order(
            syntax.iter().map(|e| problem(text, e, &[], 0)).collect(),
        ));
    }
    let span = doc.span();
    let root = Spanned::new(span, DeValue::Table(doc.into_inner()));
    let mut found = Vec::new();
    match try_at(&[], &root) {
        Ok(config) => return Ok(config),
        Err(e) => {
            let mut tries = MAX_TRIES;
            errors_in(text, &mut Vec::new(), &root, e, &mut tries, &mut found);
        }
    }
    Err(in_order(found))
}

/// The [`Config`] of a document holding only `value` at `path` (defaults elsewhere).
fn try_at(path: &[Step<'_>], value: &Spanned<DeValue<'_>>) -> Result<Config, toml::de::Error> {
    let mut inner = value.clone();
    for step in path.iter().rev() {
        let span = inner.span();
        let wrapped = match step {
            Step::Key(k) => {
                let mut t = DeTable::new();
                t.insert(k.clone(), inner);
                DeValue::Table(t)
            }
            Step::Index(_) => {
                let mut a = DeArray::new();
                a.push(inner);
                DeValue::Array(a)
            }
        };
        inner = Spanned::new(span, wrapped);
    }
    let span = inner.span();
    let DeValue::Table(table) = inner.into_inner() else {
        return Err(serde::de::Error::custom("the document is not a table"));
    };
    Config::deserialize(toml::de::Deserializer::from(Spanned::new(span, table)))
}

/// Every error under `value` at `path`, whose document as a whole fails with `whole`: each
/// child read on its own, so one bad key does not hide its siblings. A child read alone
/// lacks its siblings, so "missing field" errors of children are not counted; when no child
/// has an error of its own, `whole` is the one to report.
fn errors_in<'i>(
    text: &str,
    path: &mut Vec<Step<'i>>,
    value: &Spanned<DeValue<'i>>,
    whole: toml::de::Error,
    tries: &mut usize,
    found: &mut Vec<(usize, Problem)>,
) {
    let mut own = Vec::new();
    if !is_missing_field(&whole) && path.len() < MAX_DEPTH {
        let children: Vec<(Step<'i>, &Spanned<DeValue<'i>>)> = match value.get_ref() {
            DeValue::Table(t) => t.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Step::Index(i), v))
                .collect(),
            _ => Vec::new(),
        };
        for (step, child) in children {
            if *tries == 0 {
                break;
            }
            *tries -= 1;
            path.push(step);
            if let Err(e) = try_at(path, child)
                && !is_missing_field(&e)
            {
                errors_in(text, path, child, e, tries, &mut own);
            }
            path.pop();
        }
    }
    if own.is_empty() {
        found.push(problem(text, &whole, path, value.span().start));
    } else {
        found.extend(own);
    }
}

fn is_missing_field(e: &toml::de::Error) -> bool {
    e.message().starts_with("missing field")
}

/// The problem of error `e` and where in the text it is: at the deeper of `path` (whose
/// value starts at `offset`) and the key its span points to (a `[table]` line, or a key in
/// an inline table, points only to its line's key), with its line; with an example of a
/// good value where the message names a type.
fn problem(text: &str, e: &toml::de::Error, path: &[Step<'_>], offset: usize) -> (usize, Problem) {
    let message = e.message().trim().replace('\n', "; ");
    let (offset, path, message) = match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let message = format!("{message} (line {line})");
            // A span at a `[table]` header is that table.
            let rest = &text[span.start.min(text.len())..];
            let at_span = if rest.starts_with('[') {
                key_path_at(text, span.start + rest.find('\n').unwrap_or(rest.len()))
            } else {
                key_path_at(text, span.start)
            };
            let at_path = dotted(path);
            let deeper = if at_path.len() > at_span.len() && !path.is_empty() {
                at_path
            } else {
                at_span
            };
            (span.start, deeper, message)
        }
        None => (offset, dotted(path), message),
    };
    let message = match example_for(&message) {
        Some(example) => format!("{message}; for example {example}"),
        None => message,
    };
    (offset, Problem { path, message })
}

/// `subscriptions[1].retry`, or `(file)` for the document itself.
fn dotted(path: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k.get_ref()),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k.get_ref());
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        "(file)".to_owned()
    } else {
        out
    }
}

/// An example of a good value for the type an error message names.
fn example_for(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    if m.contains("duration") || m.contains("time unit") {
        Some("\"30s\", \"5m\", \"500ms\" or \"1h 30m\"")
    } else if m.contains("parsable string") || m.contains("byte size") || m.contains("size unit") {
        Some("\"25 MiB\", \"512 KiB\" or \"1 GB\"")
    } else if m.contains("socket address") {
        Some("\"127.0.0.1:8080\" or \"[::1]:8080\"")
    } else if m.contains("ip address") {
        Some("\"127.0.0.1\" or \"::1\"")
    } else {
        None
    }
}

/// The problems in the order of the text, each once.
fn in_order(mut found: Vec<(usize, Problem)>) -> Vec<Problem> {
    found.sort_by_key(|(offset, _)| *offset);
    let mut seen = std::collections::HashSet::new();
    found
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| seen.insert((p.path.clone(), p.message.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        read(text)
            .unwrap_err()
            .iter()
            .map(Problem::to_string)
            .collect()
    }

    #[test]
    fn a_type_error_in_one_section_does_not_hide_those_in_others() {
        let text = "[http]\nlisten = \"localhost\"\nmax_body = \"lots\"\n\
                    [bus]\npartitions = \"x\"\n\
                    [[subscriptions]]\nname = 1\nkinds = ['raw']\nsink = { type = 'webhook', url = 'http://x/' }\n\
                    [[subscriptions]]\nname = 'b'\nkinds = ['raw']\nsink = { type = 'webhook', url = 'http://x/' }\n\
                    retry = { initial = 'soon', max = 3 }\n";
        assert_eq!(
            problems(text),
            [
                "http.listen: invalid socket address syntax (line 2); for example \"127.0.0.1:8080\" or \"[::1]:8080\"",
                "http.max_body: invalid value: string \"lots\", expected parsable string (line 3); for example \"25 MiB\", \"512 KiB\" or \"1 GB\"",
                "bus.partitions: invalid type: string \"x\", expected u32 (line 5)",
                "subscriptions[0].name: invalid type: integer `1`, expected a string (line 7)",
                "subscriptions[1].retry.initial: invalid value: string \"soon\", expected a duration (line 14); for example \"30s\", \"5m\", \"500ms\" or \"1h 30m\"",
                "subscriptions[1].retry.max: invalid type: integer `3`, expected a duration (line 14); for example \"30s\", \"5m\", \"500ms\" or \"1h 30m\"",
            ]
        );
    }

    #[test]
    fn every_syntax_error_is_named_with_its_line() {
        let found =
            problems("data_dir = 'a'\n[http\nlisten = '127.0.0.1:1'\n[bus]\npartitions = = 2\n");
        assert!(found.len() >= 2, "{found:?}");
        assert!(found.iter().any(|p| p.contains("(line 2)")), "{found:?}");
        assert!(found.iter().any(|p| p.contains("(line 5)")), "{found:?}");
    }

    #[test]
    fn a_huge_file_full_of_errors_costs_bounded_work() {
        let mut text = String::from("[[subscriptions]]\nname = 'a'\nkinds = [");
        text.push_str(&"1, ".repeat(100_000));
        text.push_str("]\nsink = { type = 'webhook', url = 'http://127.0.0.1:1/' }\n");
        text.push_str("[http]\nlisten = 'x'\n");
        let started = std::time::Instant::now();
        let found = problems(&text);
        assert!(found.len() <= MAX_TRIES, "{}", found.len());
        assert!(found.len() > 1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_missing_field_is_named_once_and_a_good_file_reads() {
        assert_eq!(
            problems("[[subscriptions]]\nname = 'a'\nkinds = ['raw']\n"),
            ["subscriptions[0]: missing field `sink` (line 1)"]
        );
        let ok = read("[[subscriptions]]\nname = 'a'\nkinds = ['raw']\nsink = { type = 'webhook', url = 'http://127.0.0.1:1/' }\n")
            .unwrap();
        assert_eq!(ok.subscriptions.len(), 1);
    }
}
