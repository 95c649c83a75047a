//! Deploy windows and freezes of an environment (fleet.toml `windows`, `freezes`): when a
//! deployment may start. A rollback is never held back by them, and a deployment already running
//! (or paused, or resumed) goes on.
//!
//! - A window is `"DAYS HH:MM-HH:MM ZONE"`: DAYS a day (`Mon`), a range (`Mon-Fri`) or a list
//!   (`Mon,Wed,Fri`); ZONE an IANA time zone (`Europe/Paris`, `UTC`). The end is excluded; an end
//!   before the start runs past midnight into the next day (`Fri 22:00-02:00 UTC`).
//! - A freeze is `{ from = "2026-12-20", to = "2027-01-04", reason = "...", tz = "..." }`: every
//!   day from `from` to `to` (both included) in `tz` (default UTC).
//!
//! With windows, a deployment starts only inside one; inside a freeze, never. Either way the
//! refusal names the next opening.
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use serde::Deserialize;

/// A dated freeze, as fleet.toml writes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    pub from: String,
    pub to: String,
    pub reason: String,
    #[serde(default)]
    pub tz: Option<String>,
}

/// One weekly window.
#[derive(Debug, Clone)]
struct Window {
    text: String,
    days: Vec<Weekday>,
    start: Time,
    end: Time,
    tz: TimeZone,
}

/// One freeze: from the start of its first day to the start of the day after its last.
#[derive(Debug, Clone)]
struct Freeze {
    start: Timestamp,
    end: Timestamp,
    reason: String,
    text: String,
}

/// The windows and freezes of an environment, parsed.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    windows: Vec<Window>,
    freezes: Vec<Freeze>,
}

/// Why a deployment may not start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// "outside its deploy windows (...)" or "in the freeze ...".
    pub why: String,
    /// The next moment a deployment may start (None: never, with these windows and freezes).
    pub next_opening: Option<String>,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.next_opening {
            Some(at) => write!(f, "{}; the next opening is {at}", self.why),
            None => write!(f, "{}; no window opens again", self.why),
        }
    }
}

const DAYS: [(&str, Weekday); 7] = [
    ("monday", Weekday::Monday),
    ("tuesday", Weekday::Tuesday),
    ("wednesday", Weekday::Wednesday),
    ("thursday", Weekday::Thursday),
    ("friday", Weekday::Friday),
    ("saturday", Weekday::Saturday),
    ("sunday", Weekday::Sunday),
];

/// A day by its name or a prefix of it of at least 3 letters (`Mon`, `Thurs`, `sunday`).
fn day(name: &str) -> Result<Weekday, String> {
    let lower = name.to_ascii_lowercase();
    DAYS.iter()
        .find(|(full, _)| lower.len() >= 3 && full.starts_with(lower.as_str()))
        .map(|(_, d)| *d)
        .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

fn days(spec: &str) -> Result<Vec<Weekday>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (mut d, last) = (day(a)?, day(b)?);
                loop {
                    out.push(d);
                    if d == last {
                        break;
                    }
                    d = d.next();
                }
            }
            None => out.push(day(part)?),
        }
    }
    Ok(out)
}

fn time(s: &str) -> Result<Time, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?} is not a time HH:MM"))?;
    let (h, m): (i8, i8) =
        (h.parse().map_err(|_| format!("{s:?}: bad hour"))?, m.parse().map_err(|_| format!("{s:?}: bad minute"))?);
    if !(0..=24).contains(&h) || !(0..60).contains(&m) || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day (00:00 to 24:00)"));
    }
    // 24:00 is the end of the day: the last representable instant of it.
    if h == 24 {
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|e| format!("{s:?}: {e}"))
}

fn zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| format!("{name:?} is not a time zone (an IANA name such as Europe/Paris, or UTC)"))
}

fn window(text: &str) -> Result<Window, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [spec, hours, tz] = parts.as_slice() else {
        return Err(format!("{text:?}: expected \"DAYS HH:MM-HH:MM ZONE\", e.g. \"Mon-Fri 09:00-17:00 Europe/Paris\""));
    };
    let (from, to) = hours.split_once('-').ok_or_else(|| format!("{text:?}: the hours must be HH:MM-HH:MM"))?;
    let (start, end) = (time(from)?, time(to)?);
    if start == end {
        return Err(format!("{text:?}: the window is empty (it starts where it ends)"));
    }
    Ok(Window { text: text.to_string(), days: days(spec)?, start, end, tz: zone(tz)? })
}

fn freeze(f: &FreezeConfig) -> Result<Freeze, String> {
    let tz = zone(f.tz.as_deref().unwrap_or("UTC"))?;
    let date = |s: &str| -> Result<Date, String> { s.parse().map_err(|_| format!("{s:?} is not a date YYYY-MM-DD")) };
    let (from, to) = (date(&f.from)?, date(&f.to)?);
    if to < from {
        return Err(format!("freeze {:?}: `to` ({}) is before `from` ({})", f.reason, f.to, f.from));
    }
    if f.reason.trim().is_empty() {
        return Err("a freeze needs a reason (it is shown to whoever is refused)".into());
    }
    let at = |d: Date| d.to_zoned(tz.clone()).map(|z| z.timestamp()).map_err(|e| e.to_string());
    let after = to.tomorrow().map_err(|e| e.to_string())?;
    Ok(Freeze {
        start: at(from)?,
        end: at(after)?,
        reason: f.reason.clone(),
        text: format!("{} to {}{}", f.from, f.to, f.tz.as_ref().map(|t| format!(" {t}")).unwrap_or_default()),
    })
}

impl Schedule {
    /// Parses an environment's `windows` and `freezes`; every problem, by key (relative to the
    /// environment).
    pub fn parse(windows: &[String], freezes: &[FreezeConfig]) -> Result<Schedule, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut s = Schedule::default();
        for (i, w) in windows.iter().enumerate() {
            match window(w) {
                Ok(w) => s.windows.push(w),
                Err(e) => problems.push((format!("windows[{i}]"), e)),
            }
        }
        for (i, f) in freezes.iter().enumerate() {
            match freeze(f) {
                Ok(f) => s.freezes.push(f),
                Err(e) => problems.push((format!("freezes[{i}]"), e)),
            }
        }
        if problems.is_empty() { Ok(s) } else { Err(problems) }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.freezes.is_empty()
    }

    /// Whether a deployment may start at `now`; if not, why and when it may.
    pub fn check(&self, now: Timestamp) -> Result<(), Closed> {
        if let Some(f) = self.freeze_at(now) {
            return Err(Closed {
                why: format!("in the freeze \"{}\" ({})", f.reason, f.text),
                next_opening: self.next_opening(now).map(show),
            });
        }
        if self.windows.is_empty() || self.windows.iter().any(|w| w.contains(now)) {
            return Ok(());
        }
        let list: Vec<&str> = self.windows.iter().map(|w| w.text.as_str()).collect();
        Err(Closed {
            why: format!("outside its deploy windows ({})", list.join("; ")),
            next_opening: self.next_opening(now).map(show),
        })
    }

    fn freeze_at(&self, t: Timestamp) -> Option<&Freeze> {
        self.freezes.iter().find(|f| f.start <= t && t < f.end)
    }

    /// The first moment after `now` that is in a window (or anywhere, without windows) and in
    /// no freeze.
    fn next_opening(&self, now: Timestamp) -> Option<Zoned> {
        let mut t = now;
        // Each step passes a freeze or reaches the next window start: bounded either way.
        for _ in 0..64 {
            if let Some(f) = self.freeze_at(t) {
                t = f.end;
                continue;
            }
            if self.windows.is_empty() {
                return Some(t.to_zoned(TimeZone::UTC));
            }
            if let Some(w) = self.windows.iter().find(|w| w.contains(t)) {
                return Some(t.to_zoned(w.tz.clone()));
            }
            let next = self.windows.iter().filter_map(|w| w.next_start(t)).min_by_key(|z| z.timestamp())?;
            t = next.timestamp();
            if self.freeze_at(t).is_none() {
                return Some(next);
            }
        }
        None
    }
}

fn show(z: Zoned) -> String {
    z.strftime("%a %Y-%m-%d %H:%M %Z").to_string()
}

impl Window {
    /// The window's spans that may hold `t`: those starting on its local day or the day before
    /// (a window past midnight).
    fn contains(&self, t: Timestamp) -> bool {
        let local = t.to_zoned(self.tz.clone());
        [local.date().yesterday().ok(), Some(local.date())].into_iter().flatten().any(|d| {
            let Some((start, end)) = self.span_on(d) else { return false };
            start.timestamp() <= t && t < end.timestamp()
        })
    }

    /// The span the window has on local day `d`, if it has one.
    fn span_on(&self, d: Date) -> Option<(Zoned, Zoned)> {
        if !self.days.contains(&d.weekday()) {
            return None;
        }
        let start = d.to_datetime(self.start).to_zoned(self.tz.clone()).ok()?;
        let end_day = if self.end <= self.start { d.tomorrow().ok()? } else { d };
        let end = end_day.to_datetime(self.end).to_zoned(self.tz.clone()).ok()?;
        Some((start, end))
    }

    /// The first start of this window after `t`.
    fn next_start(&self, t: Timestamp) -> Option<Zoned> {
        let today = t.to_zoned(self.tz.clone()).date();
        (0..=8).filter_map(|k| today.checked_add(k.days()).ok()).find_map(|d| {
            let (start, _) = self.span_on(d)?;
            (start.timestamp() > t).then_some(start)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn schedule(windows: &[&str], freezes: &[(&str, &str, &str)]) -> Schedule {
        let w: Vec<String> = windows.iter().map(|s| s.to_string()).collect();
        let f: Vec<FreezeConfig> = freezes
            .iter()
            .map(|(from, to, reason)| FreezeConfig {
                from: from.to_string(),
                to: to.to_string(),
                reason: reason.to_string(),
                tz: Some("Europe/Paris".into()),
            })
            .collect();
        Schedule::parse(&w, &f).expect("parses")
    }

    #[test]
    fn weekday_office_hours_in_a_time_zone() {
        let s = schedule(&["Mon-Fri 09:00-17:00 Europe/Paris"], &[]);
        // 2026-12-02 is a Wednesday; Paris is UTC+1 in winter.
        assert_eq!(s.check(at("2026-12-02T08:30:00Z")), Ok(()));
        assert_eq!(s.check(at("2026-12-02T15:59:59Z")), Ok(()));
        let e = s.check(at("2026-12-02T16:00:00Z")).expect_err("17:00 in Paris is closed");
        assert_eq!(e.why, "outside its deploy windows (Mon-Fri 09:00-17:00 Europe/Paris)");
        assert_eq!(e.next_opening.as_deref(), Some("Thu 2026-12-03 09:00 CET"));
        // Friday evening: next is Monday.
        let e = s.check(at("2026-12-04T18:00:00Z")).expect_err("closed");
        assert_eq!(e.next_opening.as_deref(), Some("Mon 2026-12-07 09:00 CET"));
        // Summer time moves the window in UTC.
        assert_eq!(s.check(at("2026-07-01T07:30:00Z")), Ok(()));
        assert!(s.check(at("2026-07-01T06:30:00Z")).is_err());
    }

    #[test]
    fn a_window_past_midnight_and_several_windows() {
        let s = schedule(&["Fri 22:00-02:00 UTC", "Sun 12:00-13:00 UTC"], &[]);
        assert_eq!(s.check(at("2026-12-04T23:00:00Z")), Ok(()), "Friday night");
        assert_eq!(s.check(at("2026-12-05T01:59:00Z")), Ok(()), "early Saturday, still Friday's window");
        let e = s.check(at("2026-12-05T02:00:00Z")).expect_err("closed");
        assert_eq!(e.next_opening.as_deref(), Some("Sun 2026-12-06 12:00 UTC"));
    }

    #[test]
    fn a_freeze_wins_over_windows_and_the_next_opening_is_after_it() {
        let s = schedule(&["Mon-Fri 09:00-17:00 Europe/Paris"], &[("2026-12-21", "2027-01-03", "year-end freeze")]);
        let e = s.check(at("2026-12-22T10:00:00Z")).expect_err("frozen");
        assert_eq!(e.why, "in the freeze \"year-end freeze\" (2026-12-21 to 2027-01-03 Europe/Paris)");
        assert_eq!(e.next_opening.as_deref(), Some("Mon 2027-01-04 09:00 CET"));
        assert_eq!(
            e.to_string(),
            "in the freeze \"year-end freeze\" (2026-12-21 to 2027-01-03 Europe/Paris); the next opening is Mon 2027-01-04 09:00 CET"
        );
        // A freeze alone: open as soon as it ends (midnight in its zone).
        let s = schedule(&[], &[("2026-12-21", "2026-12-21", "release party")]);
        let e = s.check(at("2026-12-21T12:00:00Z")).expect_err("frozen");
        assert_eq!(e.next_opening.as_deref(), Some("Mon 2026-12-21 23:00 UTC"));
        assert_eq!(s.check(at("2026-12-21T23:00:00Z")), Ok(()));
        assert!(Schedule::default().check(at("2026-12-21T12:00:00Z")).is_ok(), "no windows, no freezes: always open");
    }

    #[test]
    fn bad_windows_and_freezes_are_named() {
        let bad = |w: &str| Schedule::parse(&[w.to_string()], &[]).expect_err(w)[0].1.clone();
        assert!(bad("Mon-Fri 09:00-17:00").contains("expected \"DAYS HH:MM-HH:MM ZONE\""));
        assert!(bad("Mon-Fry 09:00-17:00 UTC").contains("\"Fry\" is not a day"));
        assert!(bad("Mon 9-17 UTC").contains("not a time HH:MM"));
        assert!(bad("Mon 09:00-25:00 UTC").contains("not a time of day"));
        assert!(bad("Mon 09:00-09:00 UTC").contains("empty"));
        assert!(bad("Mon 09:00-17:00 Mars/Olympus").contains("not a time zone"));
        let f = |from: &str, to: &str, reason: &str| FreezeConfig {
            from: from.into(),
            to: to.into(),
            reason: reason.into(),
            tz: None,
        };
        let e = Schedule::parse(
            &[],
            &[f("2026-12-24", "2026-12-20", "x"), f("24/12", "2026-12-25", "x"), f("2026-12-24", "2026-12-25", " ")],
        )
        .expect_err("bad freezes");
        assert_eq!(e.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["freezes[0]", "freezes[1]", "freezes[2]"]);
        assert!(
            e[0].1.contains("is before") && e[1].1.contains("not a date") && e[2].1.contains("needs a reason"),
            "{e:?}"
        );
    }
}
