//! Schedules and durations as users write them in a Cluster: five-field cron (`*/5 * * * *`,
//! evaluated in UTC as a CronJob without `timeZone` is), the `@hourly`-style shorthands,
//! `@every <duration>` (robfig/cron's form, for short periods), and Go durations (`1h30m`).
//!
//! Pure functions of time: the controller keeps the last tick in status and asks
//! [`Schedule::next_after`] when the next one is due.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp, tz::TimeZone};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `@every <duration>`: a tick every period after the previous one.
    Every(Duration),
    /// A cron expression: the minutes, hours, days, months and weekdays it fires on.
    Cron(Cron),
}

/// The five cron fields as bit sets (bit n set: value n matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Day-of-month and day-of-week both restricted: either may match (cron's rule).
    either_day: bool,
}

/// The shortest `@every` period accepted (a tick is one reconcile pass).
pub const MIN_EVERY: Duration = Duration::from_secs(1);

const MONTHS: [&str; 12] =
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Schedule {
    /// Parses a schedule.
    ///
    /// # Errors
    /// A message naming the field that is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let cron = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => {
                if let Some(d) = text.strip_prefix("@every ") {
                    let d = parse_duration(d.trim())?;
                    if d < MIN_EVERY {
                        return Err(format!("schedule {text:?}: @every needs at least 1s"));
                    }
                    return Ok(Schedule::Every(d));
                }
                text
            }
        };
        let fields: Vec<&str> = cron.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields.as_slice() else {
            return Err(format!(
                "schedule {text:?}: expected five fields (minute hour day month weekday), @every <duration> or @hourly/@daily/@weekly/@monthly/@yearly"
            ));
        };
        let field = |name: &str, f: &str, lo: u32, hi: u32, names: &[&str]| {
            parse_field(f, lo, hi, names).map_err(|e| format!("schedule {text:?}: {name}: {e}"))
        };
        let weekdays = field("weekday", dow, 0, 7, &WEEKDAYS)?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        Ok(Schedule::Cron(Cron {
            minutes: field("minute", minute, 0, 59, &[])?,
            hours: u32::try_from(field("hour", hour, 0, 23, &[])?).unwrap_or(0),
            days: u32::try_from(field("day of month", dom, 1, 31, &[])?).unwrap_or(0),
            months: u16::try_from(field("month", month, 1, 12, &MONTHS)?).unwrap_or(0),
            weekdays: u8::try_from(weekdays).unwrap_or(0),
            either_day: !dom.starts_with('*') && !dow.starts_with('*'),
        }))
    }

    /// The first tick strictly after `t`, or `None` if there is none within eight years
    /// (for example `0 0 30 2 *`).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(d) => t.checked_add(SignedDuration::try_from(*d).ok()?).ok(),
            Schedule::Cron(c) => c.next_after(t),
        }
    }

    /// The nominal period between ticks (for "older than two periods" checks): the
    /// `@every` period, or the gap between the next two cron ticks after `t`.
    pub fn period(&self, t: Timestamp) -> Option<Duration> {
        let a = self.next_after(t)?;
        let b = self.next_after(a)?;
        Duration::try_from(b.duration_since(a)).ok()
    }
}

impl Cron {
    fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let mut s = t.as_second() - t.as_second().rem_euclid(60) + 60;
        // Enough steps for any schedule that fires at least once in eight years: each step
        // moves to the next minute, hour or day that could match.
        for _ in 0..20_000 {
            let ts = Timestamp::from_second(s).ok()?;
            let dt = TimeZone::UTC.to_datetime(ts);
            let month = u32::try_from(dt.month()).unwrap_or(0);
            let day = u32::try_from(dt.day()).unwrap_or(0);
            let hour = u32::try_from(dt.hour()).unwrap_or(0);
            let minute = u32::try_from(dt.minute()).unwrap_or(0);
            let weekday = u32::try_from(dt.weekday().to_sunday_zero_offset()).unwrap_or(0);
            let dom_ok = self.days & (1 << day) != 0;
            let dow_ok = self.weekdays & (1 << weekday) != 0;
            let day_ok = if self.either_day { dom_ok || dow_ok } else { dom_ok && dow_ok };
            if self.months & (1 << month) == 0 || !day_ok {
                s = s - s.rem_euclid(86_400) + 86_400;
            } else if self.hours & (1 << hour) == 0 {
                s = s - s.rem_euclid(3_600) + 3_600;
            } else if self.minutes & (1 << minute) == 0 {
                s += 60;
            } else {
                return Some(ts);
            }
        }
        None
    }
}

/// One cron field (`*`, `*/n`, `a`, `a-b`, `a-b/n`, lists of these, names) as a bit set.
fn parse_field(f: &str, lo: u32, hi: u32, names: &[&str]) -> Result<u64, String> {
    let value = |v: &str| -> Result<u32, String> {
        let lower = v.to_ascii_lowercase();
        let n = match names.iter().position(|n| *n == lower) {
            Some(i) => u32::try_from(i).unwrap_or(0) + lo,
            None => v.parse().map_err(|_| format!("{v:?} is not a number"))?,
        };
        if n < lo || n > hi {
            return Err(format!("{n} is outside {lo}-{hi}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s.parse().map_err(|_| format!("step {s:?} is not a number"))?;
                if s == 0 {
                    return Err("a step of 0".to_owned());
                }
                (r, s)
            }
            None => (part, 1),
        };
        let (from, to) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `a/n` means a, a+n, ... up to the maximum.
                None if step > 1 => (value(r)?, hi),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        if from > to {
            return Err(format!("range {range:?} runs backwards"));
        }
        let mut v = from;
        while v <= to {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

/// Parses a Go duration (`1h30m`, `90s`, `1.5h`, `500ms`).
///
/// # Errors
/// A message when the text is not a duration or overflows.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 90s, 1h30m or 500ms");
    if text.is_empty() {
        return Err(bad());
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "5", "5d", "h", "1h-2m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_ticks_one_period_after_the_last() {
        let s = Schedule::parse("@every 5s").unwrap();
        assert_eq!(s.next_after(at("2026-12-03T10:00:00Z")), Some(at("2026-12-03T10:00:05Z")));
        assert_eq!(s.period(at("2026-12-03T10:00:00Z")), Some(Duration::from_secs(5)));
        assert!(Schedule::parse("@every 10ms").is_err());
    }

    #[test]
    fn cron_finds_the_next_matching_minute() {
        let t = at("2026-12-03T10:07:30Z");
        let next = |s: &str| Schedule::parse(s).unwrap().next_after(t).unwrap().to_string();
        assert_eq!(next("*/5 * * * *"), "2026-12-03T10:10:00Z");
        assert_eq!(next("* * * * *"), "2026-12-03T10:08:00Z");
        assert_eq!(next("@hourly"), "2026-12-03T11:00:00Z");
        assert_eq!(next("0 3 * * *"), "2026-12-04T03:00:00Z");
        assert_eq!(next("30 2 1 * *"), "2027-01-01T02:30:00Z");
        // 2026-12-03 is a Thursday; the next Monday is the 7th.
        assert_eq!(next("0 0 * * mon"), "2026-12-07T00:00:00Z");
        assert_eq!(next("0 0 * * 7"), "2026-12-06T00:00:00Z");
        // Day of month and weekday both set: either matches.
        assert_eq!(next("0 0 25 * 1"), "2026-12-07T00:00:00Z");
        assert_eq!(next("15-45/15 10 * dec *"), "2026-12-03T10:15:00Z");
        assert_eq!(Schedule::parse("0 0 30 2 *").unwrap().next_after(t), None);
    }

    #[test]
    fn bad_cron_fields_are_named() {
        for (s, want) in [
            ("* * *", "five fields"),
            ("61 * * * *", "minute: 61 is outside 0-59"),
            ("* * * 13 *", "month"),
            ("*/0 * * * *", "step of 0"),
            ("5-1 * * * *", "backwards"),
            ("@every soon", "not a duration"),
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
