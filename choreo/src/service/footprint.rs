//! What a service's configuration will cost the server, projected at start
//! from what the server already holds, and a warning when that passes the
//! service's budget (`Service::server_budget`): a stream that keeps every
//! event, a stream whose limits hold more than the budget at its rate, an
//! inbox with more groups than the budget allows, groups so full that
//! every record rewrites kilobytes and the handler slows, or a deadline
//! handler whose schedules and decisions alone pass the budget.
//!
//! The per-unit costs are the ones `scripts/bench capacity` measured on
//! nats-server 2.15.1 (see `docs/capacity.md`).

use std::time::Duration;

use async_nats::jetstream;

/// Server memory per distinct subject a stream holds (an event on a keyed
/// subject, or a group key), after a restart: measured 602–617 bytes for a
/// keyed event, 322–363 for a key.
const SUBJECT_RAM: f64 = 600.0;
/// Server memory per inbox group key.
const GROUP_RAM: f64 = 350.0;
/// Bytes one record takes in its group.
const RECORD: f64 = 24.0;
/// Records per group above which a warning says so: the inbox-on rate fell
/// to 0.79 of a per-key inbox at 20 per group and 0.73 at 30
/// (`scripts/bench --only handler_inbox --inbox-prefill R`).
const PER_GROUP_WARN: f64 = 32.0;
/// Server memory per pending deadline (its schedule), per decision, and per
/// fired copy: the upper ends `scripts/bench deadlines` measured
/// (`docs/deadlines.md`).
const SCHEDULE_RAM: f64 = 1_700.0;
const DECISION_RAM: f64 = 1_000.0;
const FIRED_RAM: f64 = 2_200.0;
/// How far ahead a stream's growth is projected.
const HORIZON_DAYS: f64 = 30.0;
/// How many events a stream must hold before its rate is trusted.
const MIN_EVENTS: u64 = 1_000;

/// What one projection found worth a warning.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finding {
    /// A stream without limits grows past the budget within the horizon.
    Stream {
        stream: String,
        rate: f64,
        ram_per_day: f64,
        disk_per_day: f64,
        days_to_budget: f64,
    },
    /// A stream with limits holds more than the budget at them: at its
    /// rate, `ram` of server memory and `disk` of disk once full, for
    /// `limit` (what bounds it); `fits_days` of `max_age` would fit.
    Held {
        stream: String,
        rate: f64,
        ram: f64,
        disk: f64,
        limit: String,
        fits_days: f64,
    },
    /// The inbox's groups alone may hold more than the budget.
    Groups { handlers: usize, bound: f64 },
    /// At the stream's rate, each group holds this many records over the
    /// horizon, each record rewrites `write` bytes, and `groups` groups
    /// would hold ten each (at most the most a service may ask for).
    Writes {
        handler: String,
        per_group: f64,
        write: f64,
        groups: u64,
    },
    /// At its A stream's rate, a deadline handler's schedules (kept
    /// `within`) and decisions (kept `within` + 1 hour) hold `ram`; each
    /// fired copy adds `FIRED_RAM` for `retention`.
    Deadlines {
        handler: String,
        rate: f64,
        ram: f64,
        retention: Duration,
    },
}

/// A deadline handler for [`findings`]: its name, the rate of the stream
/// its A events are on (if known), its `within`, and how long its fired
/// copies are kept.
pub(crate) type DeadlineLoad<'a> = (&'a str, Option<f64>, Duration, Duration);

/// The rate a stream has grown at (events/s), if its history is long
/// enough to say.
pub(crate) fn stream_rate(info: &jetstream::stream::Info) -> Option<f64> {
    let s = &info.state;
    let span = (s.last_timestamp - s.first_timestamp).as_seconds_f64();
    (s.messages >= MIN_EVENTS && span >= 1.0).then(|| s.messages as f64 / span)
}

/// A stream's rate and its growth in server memory and disk a day, if it
/// keeps every event and its history says how fast it grows.
pub(crate) fn stream_growth(info: &jetstream::stream::Info) -> Option<(f64, f64, f64)> {
    let c = &info.config;
    let limited = c.max_age > Duration::ZERO || c.max_bytes > 0 || c.max_messages > 0;
    if limited {
        return None;
    }
    let rate = stream_rate(info)?;
    let s = &info.state;
    let subjects = s.subjects_count as f64 / s.messages as f64;
    let ram = rate * 86_400.0 * subjects.min(1.0) * SUBJECT_RAM;
    let disk = rate * 86_400.0 * (s.bytes as f64 / s.messages as f64);
    Some((rate, ram, disk))
}

/// What a stream with limits holds once full, at its rate so far: (rate,
/// server memory, disk, what bounds it, server memory a day of events
/// takes), if its history says how fast it grows.
pub(crate) fn stream_held(info: &jetstream::stream::Info) -> Option<(f64, f64, f64, String, f64)> {
    let c = &info.config;
    let rate = stream_rate(info)?;
    let s = &info.state;
    let per_event = s.bytes as f64 / s.messages as f64;
    let subjects = (s.subjects_count as f64 / s.messages as f64).min(1.0);
    let mut held = f64::INFINITY;
    let mut limit = String::new();
    if c.max_age > Duration::ZERO {
        held = rate * c.max_age.as_secs_f64();
        limit = format!("max_age {:.1} days", c.max_age.as_secs_f64() / 86_400.0);
    }
    if c.max_messages > 0 && (c.max_messages as f64) < held {
        held = c.max_messages as f64;
        limit = format!("max_msgs {}", c.max_messages);
    }
    if c.max_bytes > 0 && c.max_bytes as f64 / per_event < held {
        held = c.max_bytes as f64 / per_event;
        limit = format!("max_bytes {}", human(c.max_bytes as f64));
    }
    held.is_finite().then(|| {
        let ram_per_event = subjects * SUBJECT_RAM;
        (
            rate,
            held * ram_per_event,
            held * per_event,
            limit,
            rate * 86_400.0 * ram_per_event,
        )
    })
}

/// What to warn about, for streams `streams` (their info), `handlers`
/// idempotent handlers (name and the rate of the stream it reads) sharing
/// an inbox of `groups` groups kept `horizon`, and `deadlines`, against
/// `budget` bytes.
pub(crate) fn findings(
    streams: &[jetstream::stream::Info],
    handlers: &[(&str, Option<f64>)],
    deadlines: &[DeadlineLoad<'_>],
    groups: u32,
    horizon: Duration,
    budget: u64,
) -> Vec<Finding> {
    let budget = budget as f64;
    let mut out = Vec::new();
    for info in streams {
        if let Some((rate, ram, disk)) = stream_growth(info)
            && ram * HORIZON_DAYS > budget
        {
            out.push(Finding::Stream {
                stream: info.config.name.clone(),
                rate,
                ram_per_day: ram,
                disk_per_day: disk,
                days_to_budget: budget / ram,
            });
        }
        if let Some((rate, ram, disk, limit, ram_per_day)) = stream_held(info)
            && ram > budget
        {
            out.push(Finding::Held {
                stream: info.config.name.clone(),
                rate,
                ram,
                disk,
                limit,
                fits_days: budget / ram_per_day,
            });
        }
    }
    let bound = handlers.len() as f64 * f64::from(groups) * GROUP_RAM;
    if !handlers.is_empty() && bound > budget {
        out.push(Finding::Groups {
            handlers: handlers.len(),
            bound,
        });
    }
    for (handler, rate) in handlers {
        let Some(rate) = rate else { continue };
        let records = rate * horizon.as_secs_f64();
        let per_group = records / f64::from(groups.max(1));
        if per_group > PER_GROUP_WARN {
            out.push(Finding::Writes {
                handler: (*handler).to_owned(),
                per_group,
                write: RECORD * per_group + 100.0,
                groups: ((records / 10.0).ceil() as u64)
                    .min(u64::from(crate::topology::MAX_INBOX_GROUPS)),
            });
        }
    }
    for (handler, rate, within, retention) in deadlines {
        let Some(rate) = rate else { continue };
        let decided = within.as_secs_f64() + crate::deadline::DECISION_KEEP.as_secs_f64();
        let ram = rate * (within.as_secs_f64() * SCHEDULE_RAM + decided * DECISION_RAM);
        if ram > budget {
            out.push(Finding::Deadlines {
                handler: (*handler).to_owned(),
                rate: *rate,
                ram,
                retention: *retention,
            });
        }
    }
    out
}

/// Logs each finding as a warning that says what to change.
pub(crate) fn warn(service: &str, findings: &[Finding], budget: u64) {
    let budget_h = human(budget as f64);
    for f in findings {
        match f {
            Finding::Stream {
                stream,
                rate,
                ram_per_day,
                disk_per_day,
                days_to_budget,
            } => tracing::warn!(
                service,
                stream = %stream,
                rate = format!("{rate:.1}"),
                "stream {stream} keeps every event (no max_age, max_bytes or max_msgs): at its \
                 rate so far ({rate:.1} events/s) it grows about {} of server memory and {} of \
                 disk a day, past this service's budget of {budget_h} in {days_to_budget:.1} \
                 days; set StreamSettings::max_age to how far back a new handler or a replay \
                 must reach (docs/capacity.md)",
                human(*ram_per_day),
                human(*disk_per_day),
            ),
            Finding::Held {
                stream,
                rate,
                ram,
                disk,
                limit,
                fits_days,
            } => tracing::warn!(
                service,
                stream = %stream,
                rate = format!("{rate:.1}"),
                "stream {stream} keeps events up to its {limit}: at its rate so far ({rate:.1} \
                 events/s) it will hold about {} of server memory and {} of disk, past this \
                 service's budget of {budget_h}; a max_age of {fits_days:.2} days fits the budget \
                 (StreamSettings::max_age), or raise Service::server_budget (docs/capacity.md)",
                human(*ram),
                human(*disk),
            ),
            Finding::Groups { handlers, bound } => tracing::warn!(
                service,
                handlers,
                "the inbox may hold up to {} of server memory ({handlers} handlers × their \
                 groups × ~350 B), past this service's budget of {budget_h}; lower \
                 Service::inbox_groups (docs/capacity.md)",
                human(*bound),
            ),
            Finding::Writes {
                handler,
                per_group,
                write,
                groups,
            } => tracing::warn!(
                service,
                handler = %handler,
                "at its stream's rate so far, handler {handler}'s inbox groups will hold \
                 ~{per_group:.0} records each over the horizon, so every record rewrites ~{} \
                 and the handler runs slower (0.73 of a per-key inbox at 30 per group, 0.62 at \
                 90); raise Service::inbox_groups (to {groups} for ten per group, ~{} of server \
                 memory) or shorten Service::inbox_retention (docs/capacity.md)",
                human(*write),
                human(*groups as f64 * GROUP_RAM),
            ),
            Finding::Deadlines {
                handler,
                rate,
                ram,
                retention,
            } => tracing::warn!(
                service,
                handler = %handler,
                rate = format!("{rate:.1}"),
                "deadline handler {handler}: at its A events' rate so far ({rate:.1}/s), its \
                 pending schedules (kept its within) and decisions (kept within + 1 hour) will \
                 hold about {} of server memory, past this service's budget of {budget_h}; \
                 each deadline that fires keeps ~{} more for Service::deadline_retention \
                 ({:.1} days); shorten within, or raise Service::server_budget (docs/deadlines.md)",
                human(*ram),
                human(FIRED_RAM),
                retention.as_secs_f64() / 86_400.0,
            ),
        }
    }
}

/// Bytes in decimal units, one decimal: `2.7 GB`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Finding, findings, human};

    #[test]
    fn the_projection_uses_the_measured_costs() {
        let week = Duration::from_secs(7 * 86_400);
        // 3 events/s for a week: 1,814,400 records, 28 per group.
        let f = findings(&[], &[("h", Some(3.0))], &[], 65_536, week, 1 << 30);
        assert!(f.is_empty(), "{f:?}");
        // 50 events/s: 30,240,000 records, 461 per group, 11 KB a write;
        // 3,024,000 groups would hold ten each.
        let f = findings(&[], &[("h", Some(50.0))], &[], 65_536, week, 1 << 30);
        assert!(
            matches!(&f[..], [Finding::Writes { write, groups: 3_024_000, .. }]
                if (*write - 11_174.0).abs() < 10.0),
            "{f:?}"
        );
        let f = findings(
            &[],
            &[("a", None), ("b", None)],
            &[],
            1 << 24,
            Duration::from_secs(60),
            1 << 30,
        );
        assert!(
            matches!(&f[..], [Finding::Groups { handlers: 2, .. }]),
            "{f:?}"
        );
        // 100 orders/s, a 15-minute deadline: 90,000 schedules (153 MB) and
        // 450,000 decisions (450 MB), as docs/deadlines.md prices them.
        let quarter = Duration::from_secs(900);
        let day = Duration::from_secs(86_400);
        let expire = |budget| {
            findings(
                &[],
                &[],
                &[("expire", Some(100.0), quarter, day)],
                1,
                week,
                budget,
            )
        };
        let f = expire(1 << 29);
        assert!(
            matches!(&f[..], [Finding::Deadlines { ram, .. }] if (*ram - 603e6).abs() < 1e6),
            "{f:?}"
        );
        let f = expire(1 << 30);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(human(2_700_000_000.0), "2.7 GB");
    }
}
