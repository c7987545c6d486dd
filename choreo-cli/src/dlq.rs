//! `choreo dlq`: the dead-letter workbench, over `choreo::dlq`.

use std::process::ExitCode;

use choreo::async_nats::jetstream;
use choreo::dlq::{self, DeadLetter, Filter, Reason};
use clap::{Args, Subcommand};

use crate::BoxError;

/// What to do with dead letters.
#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// The letters, oldest first.
    List {
        #[command(flatten)]
        pick: Pick,
    },
    /// How many letters each handler has, by reason.
    Summary {
        #[command(flatten)]
        pick: Pick,
    },
    /// One letter: why, its headers, and its payload as JSON.
    Show {
        /// Its sequence in the dead-letter stream (`choreo dlq list`).
        sequence: u64,
    },
    /// Publishes letters again on their subjects with their ids (handlers
    /// that already handled one skip it), then deletes them.
    Replay {
        #[command(flatten)]
        which: Which,
        /// Say exactly what would be replayed, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// A corrected payload, as JSON, for one letter (sent as CBOR; the
        /// handler decides whether it is valid).
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
    },
    /// Deletes letters for good.
    Purge {
        #[command(flatten)]
        which: Which,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// The letters a replay or purge acts on.
#[derive(Args, Debug)]
pub(crate) struct Which {
    /// Letters by sequence; or choose with the filters, or `--all`.
    sequences: Vec<u64>,
    #[command(flatten)]
    pick: Pick,
    /// Every letter.
    #[arg(long)]
    all: bool,
}

/// Which letters.
#[derive(Args, Debug, Default)]
pub(crate) struct Pick {
    /// Only this service's.
    #[arg(long)]
    service: Option<String>,
    /// Only this handler's (with --service).
    #[arg(long, requires = "service")]
    handler: Option<String>,
    /// Only this reason (permanent-error, max-deliver-exceeded, ...).
    #[arg(long, value_parser = |s: &str| s.parse::<Reason>())]
    reason: Option<Reason>,
    /// Only this event type (ce-type).
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only letters written at or after this time (RFC 3339).
    #[arg(long, value_parser = rfc3339)]
    since: Option<time::OffsetDateTime>,
    /// Only letters written before this time (RFC 3339).
    #[arg(long, value_parser = rfc3339)]
    until: Option<time::OffsetDateTime>,
}

fn rfc3339(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{s:?} is not an RFC 3339 time, like 2026-12-01T09:30:00Z"))
}

impl Pick {
    fn any(&self) -> bool {
        self.service.is_some()
            || self.reason.is_some()
            || self.event_type.is_some()
            || self.since.is_some()
            || self.until.is_some()
    }

    fn filter(&self) -> Filter {
        let mut f = Filter::all();
        f.service.clone_from(&self.service);
        f.handler.clone_from(&self.handler);
        f.reason = self.reason;
        f.event_type.clone_from(&self.event_type);
        f.since = self.since;
        f.until = self.until;
        f
    }
}

/// A letter as JSON for scripts.
fn json(l: &DeadLetter) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = l
        .headers
        .iter()
        .map(|(k, v)| {
            let k: &str = k.as_ref();
            (
                k.to_owned(),
                v.iter()
                    .map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into(),
            )
        })
        .collect();
    serde_json::json!({
        "sequence": l.sequence,
        "service": l.service,
        "handler": l.handler,
        "reason": l.reason,
        "detail": l.detail,
        "deliveries": l.deliveries,
        "event_type": l.event_type(),
        "event_id": l.event_id(),
        "subject": l.original_subject,
        "stream": l.original_stream,
        "stream_sequence": l.original_sequence,
        "dead_lettered_at": l.dead_lettered_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "omitted": l.omitted,
        "headers": headers,
        "payload": dlq::payload_to_json(&l.payload).unwrap_or(serde_json::Value::Null),
    })
}

/// What the schema check of a corrected payload found.
enum Checked {
    /// It matches the schema of this event (name and version).
    Matches(String),
    /// No manifest in the registry carries a schema for this event.
    NoSchema(String),
}

/// Checks `json` against the JSON Schema of the letter's event at its
/// version, as the registry's manifests describe it (the letter's handler
/// first, then any producer or consumer of that version).
///
/// # Errors
/// The payload does not match: each problem with where it is.
async fn check_payload(
    js: &jetstream::Context,
    letter: &DeadLetter,
    json: &str,
) -> Result<Checked, BoxError> {
    let event = letter.event_type().to_owned();
    let version: u32 = letter
        .headers
        .get(choreo::headers::CE_EVENTVERSION)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(1);
    let what = format!("{event} v{version}");
    let (manifests, publishers) = choreo::admin::manifests(js).await.unwrap_or_default();
    let of_handler = manifests
        .iter()
        .filter(|m| m.service == letter.service)
        .flat_map(|m| &m.handlers)
        .filter(|h| {
            h.name == letter.handler && h.consumes.event == event && h.consumes.version == version
        })
        .filter_map(|h| h.consumes.schema.clone());
    let anywhere = manifests
        .iter()
        .flat_map(|m| &m.handlers)
        .flat_map(|h| h.emits.iter().flatten())
        .chain(publishers.iter().map(|p| &p.event))
        .filter(|e| e.event == event && e.version == version)
        .filter_map(|e| e.schema.clone());
    let Some(schema) = of_handler.chain(anywhere).next() else {
        return Ok(Checked::NoSchema(what));
    };
    let instance: serde_json::Value = serde_json::from_str(json)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("the registry's schema of {what} cannot be read: {e}"))?;
    let problems: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(Checked::Matches(what))
    } else {
        Err(format!(
            "the corrected payload does not match the schema of {what}, so nothing was replayed: {}",
            problems.join("; ")
        )
        .into())
    }
}

/// `n` and its noun, singular or plural.
fn counted(n: impl TryInto<u64>, noun: &str) -> String {
    choreo::__private::counted(n.try_into().unwrap_or(u64::MAX), noun)
}

/// A letter's time (RFC 3339, to the second), or its sequence when the
/// time is unknown.
fn when(at_ms: u64, sequence: u64) -> String {
    let at = i128::from(at_ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(at) {
        Ok(t) if at_ms > 0 => t
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| format!("#{sequence}")),
        _ => format!("#{sequence}"),
    }
}

fn line(l: &DeadLetter) -> Vec<String> {
    vec![
        l.sequence.to_string(),
        l.service.clone(),
        l.handler.clone(),
        l.reason.clone(),
        l.event_type().to_owned(),
        l.original_subject.clone(),
        l.event_id().to_owned(),
        l.deliveries.to_string(),
        l.detail.clone(),
    ]
}

const HEADER: [&str; 9] = [
    "SEQ",
    "SERVICE",
    "HANDLER",
    "REASON",
    "TYPE",
    "SUBJECT",
    "EVENT",
    "DELIVERIES",
    "DETAIL",
];

/// The letters a replay or purge acts on: by sequence, by filter, or all;
/// never an empty choice by accident.
async fn chosen(js: &jetstream::Context, which: &Which) -> Result<Vec<DeadLetter>, BoxError> {
    let Which {
        sequences,
        pick,
        all,
    } = which;
    match (sequences.is_empty(), pick.any() || *all) {
        (true, false) => Err("say which letters: their sequences, a filter (--service, --reason, --type, --since, --until), or --all".into()),
        (false, true) => Err("give either sequences or a filter / --all, not both".into()),
        (false, false) => {
            let mut out = Vec::new();
            for s in sequences {
                out.push(dlq::letter(js, *s).await?);
            }
            Ok(out)
        }
        (true, true) => Ok(dlq::letters(js, &pick.filter()).await?),
    }
}

pub(crate) async fn run(
    js: &jetstream::Context,
    cmd: &DlqCommand,
    as_json: bool,
) -> Result<ExitCode, BoxError> {
    match cmd {
        DlqCommand::List { pick } => {
            let letters = dlq::letters(js, &pick.filter()).await?;
            if as_json {
                out!(
                    "{}\n",
                    serde_json::to_string_pretty(&letters.iter().map(json).collect::<Vec<_>>())?
                );
            } else {
                let mut rows = vec![HEADER.map(str::to_owned).to_vec()];
                rows.extend(letters.iter().map(line));
                out!("{}", crate::table::render(&rows));
                out!("{}\n", counted(letters.len(), "letter"));
            }
        }
        DlqCommand::Summary { pick } => {
            let letters = dlq::letters(js, &pick.filter()).await?;
            let lines = dlq::summary(&letters);
            if as_json {
                out!("{}\n", serde_json::to_string_pretty(&lines)?);
            } else {
                let mut rows = vec![
                    ["SERVICE", "HANDLER", "REASON", "LETTERS", "FIRST", "LAST"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                for l in &lines {
                    rows.push(vec![
                        l.service.clone(),
                        l.handler.clone(),
                        l.reason.clone(),
                        l.count.to_string(),
                        when(l.first_at_ms, l.first_sequence),
                        when(l.last_at_ms, l.last_sequence),
                    ]);
                }
                out!("{}", crate::table::render(&rows));
                out!("{}\n", counted(letters.len(), "letter"));
            }
        }
        DlqCommand::Show { sequence } => {
            let l = dlq::letter(js, *sequence).await?;
            if as_json {
                out!("{}\n", serde_json::to_string_pretty(&json(&l))?);
            } else {
                let v = json(&l);
                for key in [
                    "sequence",
                    "service",
                    "handler",
                    "reason",
                    "detail",
                    "deliveries",
                    "event_type",
                    "event_id",
                    "subject",
                    "stream",
                    "stream_sequence",
                    "dead_lettered_at",
                ] {
                    let value = match &v[key] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out!("{key}: {value}\n");
                }
                out!("headers:\n");
                for (k, h) in v["headers"].as_object().into_iter().flatten() {
                    out!("  {k}: {}\n", h.as_str().unwrap_or_default());
                }
                match dlq::payload_to_json(&l.payload) {
                    Ok(p) => out!("payload:\n{}\n", serde_json::to_string_pretty(&p)?),
                    Err(e) => out!("payload: {} bytes; {e}\n", l.payload.len()),
                }
            }
        }
        DlqCommand::Replay {
            which,
            dry_run,
            payload,
        } => {
            if payload.is_some() && which.sequences.len() != 1 {
                return Err("--payload corrects one letter: give exactly one sequence".into());
            }
            // Checked before anything is read or changed.
            let corrected = payload.as_deref().map(dlq::payload_from_json).transpose()?;
            let letters = chosen(js, which).await?;
            // A corrected payload is checked against its event's schema,
            // where one is known, before anything is replayed.
            if let (Some(json), Some(letter)) = (payload.as_deref(), letters.first()) {
                match check_payload(js, letter, json).await? {
                    Checked::Matches(what) => {
                        out!("the corrected payload matches the schema of {what}\n");
                    }
                    Checked::NoSchema(what) => eprintln!(
                        "choreo: no schema is known for {what} (declare it with #[event(schema)]): \
                         the corrected payload is checked as JSON only, and its handler decides"
                    ),
                }
            }
            if *dry_run {
                out!("would replay {}:\n", counted(letters.len(), "letter"));
                for l in &letters {
                    out!(
                        "  {} {} {} to {}\n",
                        l.sequence,
                        l.event_type(),
                        l.event_id(),
                        l.original_subject
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            for l in &letters {
                match &corrected {
                    Some(p) => dlq::replay_corrected(js, l, p.clone()).await?,
                    None => dlq::replay(js, l).await?,
                }
                out!(
                    "replayed {} {} {} to {}\n",
                    l.sequence,
                    l.event_type(),
                    l.event_id(),
                    l.original_subject
                );
            }
            out!("replayed {}\n", counted(letters.len(), "letter"));
        }
        DlqCommand::Purge { which, yes } => {
            let letters = chosen(js, which).await?;
            if !yes {
                return Err(format!(
                    "purge deletes {} for good; run it again with --yes (see them with `choreo dlq list`)",
                    counted(letters.len(), "letter")
                )
                .into());
            }
            let n = dlq::purge(js, &letters).await?;
            out!("purged {}\n", counted(n, "letter"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
