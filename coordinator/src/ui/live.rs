//! The live view of a rollout. On a terminal: one line per host (state, bytes sent, elapsed, last
//! step), redrawn in place several times a second, with rollout-wide lines ("batch 2 of 3",
//! "halting: …") printed above it as they happen. Anywhere else (a pipe, a CI log, a file): plain
//! lines as they happen, which is what a log reader wants.
use std::io::Write;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::fleet::Transfer;
use crate::rollout::{Event, Observer};
use crate::state::HostState;

/// How often the terminal view is redrawn (bytes and clocks move between events).
const TICK: Duration = Duration::from_millis(250);

/// One host's line.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub host: String,
    pub state: Option<HostState>,
    pub step: String,
    pub bytes: u64,
    /// Time spent working on the host (staging, activating, rolling back); a host waiting for its
    /// batch is not working.
    pub elapsed: Duration,
}

struct HostClock {
    row: Row,
    /// Work finished so far, and the start of the work in progress.
    spent: Duration,
    running: Option<Instant>,
    transfer: Option<Arc<Transfer>>,
}

struct Screen {
    hosts: Vec<HostClock>,
    /// Lines of the host block currently on screen (to move the cursor back over).
    drawn: usize,
    /// The final frame is drawn: the ticker must not draw again below what follows.
    done: bool,
}

pub struct Live {
    tty: bool,
    screen: Mutex<Screen>,
}

impl Live {
    /// A live view on stdout: redrawn in place when stdout is a terminal (and `TERM` is not
    /// "dumb"), plain lines otherwise.
    pub fn stdout() -> Arc<Live> {
        let tty =
            std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let live = Arc::new(Live { tty, screen: Mutex::new(Screen { hosts: Vec::new(), drawn: 0, done: false }) });
        if tty {
            let weak: Weak<Live> = Arc::downgrade(&live);
            // Ends by itself once the view is dropped.
            std::thread::spawn(move || {
                while let Some(live) = weak.upgrade() {
                    live.redraw(None);
                    drop(live);
                    std::thread::sleep(TICK);
                }
            });
        }
        live
    }

    /// Draws the final state of every host and leaves it on screen (the report follows below).
    pub fn finish(&self) {
        if self.tty {
            self.redraw(None);
            if let Ok(mut s) = self.screen.lock() {
                s.drawn = 0;
                s.done = true;
            }
        }
    }

    fn with_host(&self, host: &str, f: impl FnOnce(&mut HostClock)) {
        let Ok(mut s) = self.screen.lock() else { return };
        let i = match s.hosts.iter().position(|h| h.row.host == host) {
            Some(i) => i,
            None => {
                s.hosts.push(HostClock {
                    row: Row { host: host.to_string(), ..Row::default() },
                    spent: Duration::ZERO,
                    running: None,
                    transfer: None,
                });
                s.hosts.len() - 1
            }
        };
        f(&mut s.hosts[i]);
    }

    /// Erases the host block, prints `above` (if any) where it was, draws the block again.
    fn redraw(&self, above: Option<&str>) {
        let Ok(mut s) = self.screen.lock() else { return };
        if s.done {
            return;
        }
        let now = Instant::now();
        let rows: Vec<Row> = s
            .hosts
            .iter()
            .map(|h| {
                let mut row = h.row.clone();
                row.elapsed = h.spent + h.running.map_or(Duration::ZERO, |r| now.duration_since(r));
                row.bytes = h.transfer.as_ref().map_or(0, |t| t.bytes.load(std::sync::atomic::Ordering::Relaxed));
                row
            })
            .collect();
        let width = terminal_size::terminal_size().map_or(100, |(w, _)| usize::from(w.0));
        let mut frame = String::new();
        if s.drawn > 0 {
            // Up to the block's first line, then clear to the end of the screen.
            frame.push_str(&format!("\x1b[{}F\x1b[J", s.drawn));
        }
        if let Some(line) = above {
            frame.push_str(line);
            frame.push('\n');
        }
        let lines = render(&rows, width);
        for l in &lines {
            frame.push_str(l);
            frame.push('\n');
        }
        s.drawn = lines.len();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(frame.as_bytes());
        let _ = out.flush();
    }
}

impl Observer for Live {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::HostState { host, state } => self.state(host, *state),
            Event::Transfer { host, transfer } => self.transfer(host, transfer),
            other => {
                if let Some((host, line)) = super::event_line(other) {
                    self.line(host, &line);
                }
            }
        }
    }
}

impl Live {
    /// A line about `host` (`"ferry"`: about the rollout itself).
    pub fn line(&self, host: &str, msg: &str) {
        if !self.tty {
            super::out(&format!("  {host}: {msg}"));
        } else if host == "ferry" {
            self.redraw(Some(&format!("  {msg}")));
        } else {
            self.with_host(host, |h| h.row.step = msg.to_string());
            // Failures stay readable after the view moves on: print them above as well.
            if msg.starts_with("FAILED") || msg.starts_with("ROLLED BACK") {
                self.redraw(Some(&format!("  {host}: {msg}")));
            }
        }
    }

    /// `host` moved to `state`.
    pub fn state(&self, host: &str, state: HostState) {
        let now = Instant::now();
        self.with_host(host, |h| {
            h.row.state = Some(state);
            if matches!(state, HostState::Staging | HostState::Activating | HostState::RollingBack) {
                h.running.get_or_insert(now);
            } else if let Some(r) = h.running.take() {
                h.spent += now.duration_since(r);
            }
        });
    }

    fn transfer(&self, host: &str, transfer: &Arc<Transfer>) {
        let transfer = transfer.clone();
        self.with_host(host, move |h| h.transfer = Some(transfer));
    }
}

/// The host block: one line per host, cut to `width` columns (a wrapped line would break the
/// cursor arithmetic of the redraw).
pub fn render(rows: &[Row], width: usize) -> Vec<String> {
    let name_width = rows.iter().map(|r| r.host.chars().count()).max().unwrap_or(0);
    rows.iter()
        .map(|r| {
            let state = r.state.map_or("waiting", HostState::as_str);
            let secs = r.elapsed.as_secs_f64();
            let line = format!(
                "  {:<name_width$}  {:<12} {:>10}  {:>6.1}s  {}",
                r.host,
                state,
                super::bytes(r.bytes),
                secs,
                r.step
            );
            line.chars().take(width.max(20)).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_aligned_line_per_host_cut_to_the_terminal() {
        let rows = vec![
            Row {
                host: "web-1".into(),
                state: Some(HostState::Staging),
                step: "sending 12 chunks".into(),
                bytes: 3 * 1024 * 1024,
                elapsed: Duration::from_millis(1500),
            },
            Row { host: "db-primary".into(), ..Row::default() },
        ];
        let lines = render(&rows, 200);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "  web-1       staging         3.0 MiB     1.5s  sending 12 chunks");
        assert_eq!(lines[1], "  db-primary  waiting             0 B     0.0s  ");
        // The state column starts at the same place on every line.
        assert_eq!(lines[0].find("staging"), lines[1].find("waiting"));
        let narrow = render(&rows, 30);
        assert!(narrow.iter().all(|l| l.chars().count() <= 30), "{narrow:?}");
    }

    #[test]
    fn clocks_run_while_a_host_is_worked_on_only() {
        let live = Live { tty: false, screen: Mutex::new(Screen { hosts: Vec::new(), drawn: 0, done: false }) };
        let spent = |live: &Live| {
            let s = live.screen.lock().expect("lock");
            (s.hosts[0].spent, s.hosts[0].running.is_some())
        };
        live.state("web-1", HostState::Staging);
        std::thread::sleep(Duration::from_millis(20));
        live.state("web-1", HostState::Staged);
        let (staged, running) = spent(&live);
        assert!(staged >= Duration::from_millis(20) && !running);
        // Waiting for its batch: the clock stands still.
        std::thread::sleep(Duration::from_millis(200));
        live.state("web-1", HostState::Activating);
        assert!(spent(&live).1);
        live.state("web-1", HostState::Healthy);
        let (total, running) = spent(&live);
        assert!(!running && total >= staged && total < staged + Duration::from_millis(200), "{total:?}");
    }
}
