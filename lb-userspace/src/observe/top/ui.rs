//! Terminal UI for `lb-agent top`: a live, `top`-style view of the load
//! balancer's per-service and per-backend counters.
//!
//! Operators open this while something is going wrong (a backend ejected,
//! connects failing, a VIP with no backends), usually over SSH in a plain
//! 80×24 terminal. So the layout is budgeted for 80 columns: numbers always
//! keep their width and names/addresses are truncated with "…" instead; there
//! is no mouse capture; and the terminal is restored on every exit path so a
//! failure cannot leave the operator's shell in raw mode. Reading and
//! rate-converting the counters is the caller's job (the `fetch` closure of
//! [`run`]), which keeps this module testable against `TestBackend`.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::Constraint::{Length, Min};
use ratatui::layout::{Layout, Rect};
use ratatui::style::Stylize;
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Paragraph, Row, Table};
use ratatui::Frame;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopState {
    /// One line of context, e.g. "pins /sys/fs/bpf/lb  agent pid 1234  refreshed 1.0s".
    pub header: String,
    pub services: Vec<TopService>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopService {
    pub name: String,
    pub vip: String,       // "10.96.0.10:80" or "[fd00::10]:80"
    pub protocol: String,  // "tcp" | "udp"
    pub algorithm: String, // "random" | "maglev"
    pub connects_per_s: f64,
    pub active: u64,
    pub failed_per_s: f64,
    pub no_backend_per_s: f64,
    pub backends: Vec<TopBackend>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopBackend {
    pub address: String,
    pub weight: u32,
    pub state: String, // "up", "DOWN", "ejected", "-" (no health info)
    pub connects_per_s: f64,
    pub active: u64,
    pub failed_total: u64,
    pub failed_per_s: f64,
    pub bytes_in_per_s: f64,  // from backend
    pub bytes_out_per_s: f64, // to backend
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sort {
    /// The default because rows then stay put between refreshes, so the eye
    /// can follow one backend; the numeric keys are one `s` away.
    #[default]
    Name,
    Connects,
    Active,
    Failures,
}

impl Sort {
    const CYCLE: [Sort; 4] = [Sort::Name, Sort::Connects, Sort::Active, Sort::Failures];

    pub fn next(self) -> Self {
        Self::CYCLE[(self as usize + 1) % Self::CYCLE.len()]
    }

    pub fn label(self) -> &'static str {
        ["name", "conn/s", "active", "failures"][self as usize]
    }

    /// Numbers descending (busiest on top), then name ascending so equal rows
    /// do not swap places on every refresh. Keys are (conn/s, active, failures)
    /// in `Sort` order, hence the index.
    fn order(self, a: (&str, [f64; 3]), b: (&str, [f64; 3])) -> Ordering {
        let by_name = a.0.cmp(b.0);
        match self as usize {
            0 => by_name,
            i => b.1[i - 1].total_cmp(&a.1[i - 1]).then(by_name),
        }
    }
}

fn service_keys(s: &TopService) -> (&str, [f64; 3]) {
    // A VIP whose connects all hit "no backend" is failing as hard as one
    // whose backends refuse, so both count as failures.
    let failures = s.failed_per_s + s.no_backend_per_s;
    (&s.name, [s.connects_per_s, s.active as f64, failures])
}

fn backend_keys(b: &TopBackend) -> (&str, [f64; 3]) {
    let keys = [b.connects_per_s, b.active as f64, b.failed_per_s];
    (&b.address, keys)
}

/// UI state. Fields are public so a caller can preset e.g. the sort from a CLI flag.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct App {
    pub state: TopState,
    pub sort: Sort,
    /// Applied live while typing (as in htop), so the operator sees matches narrow.
    pub filter: String,
    pub filter_open: bool,
    /// Error from the last refresh; replaces the help line until a refresh succeeds.
    pub status: Option<String>,
}

/// Widths of CONN/s, ACTIVE, FAIL/s, NOBK/s|FAILS, IN B/s, OUT B/s. `human`
/// output is at most 5 chars, so these never cut a number.
const NUM_W: [u16; 6] = [6, 6, 6, 6, 6, 7];
/// Beyond this the name/address cell stops growing, keeping numbers near names.
const MAX_LEFT_W: u16 = 56;

impl App {
    pub fn set_state(&mut self, s: TopState) {
        self.state = s;
        self.status = None;
    }

    /// Keeps the previous state on screen: stale numbers next to a visible
    /// error beat an empty screen while the agent restarts.
    pub fn set_error(&mut self, msg: String) {
        self.status = Some(msg);
    }

    /// Returns false when the app should quit.
    pub fn handle_key(&mut self, key: KeyEvent) -> bool {
        // Kitty-protocol terminals and Windows also report releases; acting on
        // them would apply every keypress twice.
        if key.kind == KeyEventKind::Release {
            return true;
        }
        // Raw mode turns Ctrl-C into a key event rather than SIGINT.
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && key.code == KeyCode::Char('c') {
            return false;
        }
        if self.filter_open {
            match key.code {
                KeyCode::Enter => self.filter_open = false,
                KeyCode::Esc => (self.filter_open, self.filter) = (false, String::new()),
                KeyCode::Backspace => _ = self.filter.pop(),
                KeyCode::Char(c) if !ctrl && !key.modifiers.contains(KeyModifiers::ALT) => {
                    self.filter.push(c)
                }
                _ => {}
            }
            return true;
        }
        match key.code {
            KeyCode::Char('q') => return false,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('/') => self.filter_open = true,
            KeyCode::Char('c') => self.filter.clear(),
            _ => {}
        }
        true
    }

    /// Services passing the filter, sorted, each with its sorted backends.
    fn visible(&self) -> Vec<(&TopService, Vec<&TopBackend>)> {
        let needle = self.filter.to_lowercase();
        let mut svcs: Vec<&TopService> = (self.state.services.iter())
            .filter(|s| s.name.to_lowercase().contains(&needle))
            .collect();
        svcs.sort_by(|a, b| self.sort.order(service_keys(a), service_keys(b)));
        svcs.into_iter()
            .map(|s| {
                let mut bks: Vec<&TopBackend> = s.backends.iter().collect();
                bks.sort_by(|a, b| self.sort.order(backend_keys(a), backend_keys(b)));
                (s, bks)
            })
            .collect()
    }

    pub fn draw(&self, frame: &mut Frame) {
        let layout = Layout::vertical([Length(1), Min(0), Length(1)]);
        let [top, body, bottom] = layout.areas(frame.area());

        let mut suffix = format!("  sort:{}", self.sort.label());
        if !self.filter.is_empty() {
            suffix += &format!("  filter:{}", self.filter);
        }
        // Sort and filter win over the free-form header when space is short.
        let head_w = (top.width as usize).saturating_sub(suffix.chars().count());
        let header = truncate(&self.state.header, head_w);
        let header = Line::from(vec![Span::raw(header).bold(), Span::raw(suffix)]);
        frame.render_widget(Paragraph::new(header), top);

        self.draw_table(frame, body);

        let footer = if self.filter_open {
            // The real cursor after the text makes it obvious where typing goes.
            let x = bottom.x + 1 + self.filter.chars().count() as u16;
            frame.set_cursor_position((x.min(bottom.right().saturating_sub(1)), bottom.y));
            let hint = Span::raw("   Enter apply  Esc cancel").dim();
            Line::from(vec![Span::raw(format!("/{}", self.filter)), hint])
        } else if let Some(err) = &self.status {
            Line::raw(format!("error: {err}")).red().bold()
        } else {
            let sort = self.sort.label();
            Line::raw(format!("q quit  s sort:{sort}  / filter  c clear"))
        };
        frame.render_widget(Paragraph::new(footer), bottom);
    }

    fn draw_table(&self, frame: &mut Frame, area: Rect) {
        // Service and backend rows carry different fields. They share the
        // numeric columns (so CONN/s, ACTIVE, FAIL/s line up) and each lays out
        // its own left cell; separate VIP and WEIGHT columns would not fit 80.
        let nums: u16 = NUM_W.iter().sum::<u16>() + NUM_W.len() as u16;
        let left_w = area.width.saturating_sub(nums).min(MAX_LEFT_W) as usize;
        let rest = left_w.saturating_sub(8); // two gaps + algorithm(6)
        let (name_w, vip_w) = (rest * 2 / 5, rest - rest * 2 / 5);
        let addr_w = left_w.saturating_sub(16); // indent, gaps, weight(5), state(7)
        let svc_left = |name: &str, vip: &str, alg: &str| {
            let (name, vip) = (truncate(name, name_w), truncate_mid(vip, vip_w));
            format!("{name:<name_w$} {vip:<vip_w$} {:<6}", truncate(alg, 6))
        };
        let be_left = |addr: &str, weight: &str, state: &str| {
            let (addr, weight) = (truncate_mid(addr, addr_w), truncate(weight, 5));
            format!("  {addr:<addr_w$} {weight:>5} {:<7}", truncate(state, 7))
        };

        // Two header lines mirror the two row shapes: line 1 labels service
        // rows, line 2 adds the backend-only fields.
        let line1 = ["CONN/s", "ACTIVE", "FAIL/s", "NOBK/s", "", ""];
        let line2 = ["", "", "", "FAILS", "IN B/s", "OUT B/s"];
        let left = Text::from_iter([
            svc_left("SERVICE", "VIP/PROTO", "ALG"),
            be_left("BACKEND", "WGT", "STATE"),
        ]);
        let labels = line1.into_iter().zip(line2);
        let labels = labels.map(|(a, b)| Text::from_iter([a, b]).right_aligned());
        let header = Row::new(std::iter::once(left).chain(labels));
        let header = header.height(2).reversed();

        let row = |left: String, nums: &[f64]| {
            let nums = nums.iter().map(|v| Text::from(human(*v)).right_aligned());
            Row::new(std::iter::once(Text::from(left)).chain(nums))
        };
        let mut rows = Vec::new();
        let visible = self.visible();
        for (s, backends) in &visible {
            let left = svc_left(&s.name, &format!("{}/{}", s.vip, s.protocol), &s.algorithm);
            let (conns, active) = (s.connects_per_s, s.active as f64);
            rows.push(row(left, &[conns, active, s.failed_per_s, s.no_backend_per_s]).bold());
            for b in backends {
                let left = be_left(&b.address, &b.weight.to_string(), &b.state);
                let (conns, active, failed) = (b.connects_per_s, b.active as f64, b.failed_per_s);
                let (total, rx, tx) = (b.failed_total as f64, b.bytes_in_per_s, b.bytes_out_per_s);
                let be_row = row(left, &[conns, active, failed, total, rx, tx]);
                // Unhealthy backends are what the operator is hunting for.
                let bad = matches!(b.state.as_str(), "DOWN" | "ejected");
                rows.push(if bad { be_row.red() } else { be_row });
            }
        }
        if visible.is_empty() {
            let msg = match self.filter.is_empty() {
                true => "no services",
                false => "no service name contains the filter (c clears it)",
            };
            rows.push(Row::new([msg]).dim());
        }

        // No scrolling: the last row that fits says how much is hidden, so a
        // short terminal never silently drops backends.
        let fit = area.height.saturating_sub(2) as usize;
        if rows.len() > fit && fit > 0 {
            let hidden = rows.len() - (fit - 1);
            rows.truncate(fit - 1);
            let msg = format!("+{hidden} more rows (/ to filter)");
            rows.push(Row::new([msg]).italic());
        }

        let widths = std::iter::once(left_w as u16).chain(NUM_W);
        let table = Table::new(rows, widths.map(Length));
        let table = table.header(header).column_spacing(1);
        frame.render_widget(table, area);
    }
}

/// Compact decimal units ("1.2k", "3.4M"): at most 5 chars below 10^18, so
/// the numeric columns stay 6 wide. Negative/NaN (a counter reset mid-sample)
/// shows "-".
pub fn human(v: f64) -> String {
    if !v.is_finite() || v < 0.0 {
        return "-".to_string();
    }
    let (mut s, mut unit) = (v, "");
    for next in ["k", "M", "G", "T", "P"] {
        // Compared against the rounding point, so 999_960 is "1.0M", not "1000k".
        if s < 999.5 {
            break;
        }
        (s, unit) = (s / 1000.0, next);
    }
    // Small values keep a decimal: 0.3 conn/s is not idle, and 1.4k is not 1k.
    if s < 99.95 && (s.fract() != 0.0 || !unit.is_empty()) {
        format!("{s:.1}{unit}")
    } else {
        format!("{s:.0}{unit}")
    }
}

/// Cuts `s` to `w` chars, marking the cut with "…" so a truncated name is
/// never mistaken for a complete one.
fn truncate(s: &str, w: usize) -> String {
    match w {
        _ if s.chars().count() <= w => s.to_string(),
        0 => String::new(),
        _ => s.chars().take(w - 1).chain(['…']).collect(),
    }
}

/// Like [`truncate`] but cuts the middle: addresses sharing a prefix differ
/// in their last bytes and port, so those must survive.
fn truncate_mid(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w || w < 4 {
        return truncate(s, w);
    }
    let head = (w - 1) / 3;
    let tail = s.chars().skip(n - (w - 1 - head));
    s.chars().take(head).chain(['…']).chain(tail).collect()
}

/// Restores the terminal when dropped, so early returns via `?` restore too.
/// Panics are covered by the hook `ratatui::try_init` installs (which also
/// runs under `panic = "abort"`); restoring twice is harmless.
struct RestoreGuard;

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the UI until `q`/Ctrl-C. `fetch` is called once per `refresh`; an
/// error is shown in the footer and the last good state stays on screen.
/// Blocks the calling thread, so call it outside an async runtime (or in
/// `spawn_blocking`).
pub fn run(
    mut fetch: impl FnMut() -> anyhow::Result<TopState>,
    refresh: Duration,
) -> anyhow::Result<()> {
    // A zero interval would spin a CPU re-reading maps.
    let refresh = refresh.max(Duration::from_millis(100));
    // Armed before init so a half-done init (raw mode on, no alt screen) is undone.
    let _guard = RestoreGuard;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut app = App::default();
    let mut next_fetch = Instant::now();
    loop {
        if Instant::now() >= next_fetch {
            match fetch() {
                Ok(state) => app.set_state(state),
                Err(e) => app.set_error(format!("{e:#}")),
            }
            next_fetch = Instant::now() + refresh;
        }
        terminal.draw(|f| app.draw(f)).context("drawing")?;
        let timeout = next_fetch.saturating_duration_since(Instant::now());
        // Resizes and other events just fall through to a redraw.
        if event::poll(timeout).context("polling input")? {
            if let Event::Key(key) = event::read().context("reading input")? {
                if !app.handle_key(key) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{backend::TestBackend, Terminal};

    fn service(name: &str, connects_per_s: f64, active: u64, n: usize) -> TopService {
        let backend = |i: usize| TopBackend {
            address: format!("10.0.{i}.1:8080"),
            weight: 100,
            state: "up".into(),
            connects_per_s: 10.0 * (i + 1) as f64,
            active: i as u64,
            failed_total: 7,
            failed_per_s: 0.5,
            bytes_in_per_s: 3_400_000.0,
            bytes_out_per_s: 1_200.0,
        };
        TopService {
            name: name.into(),
            vip: "10.96.0.10:80".into(),
            protocol: "tcp".into(),
            algorithm: "maglev".into(),
            connects_per_s,
            active,
            no_backend_per_s: 2.0,
            backends: (0..n).map(backend).collect(),
            ..Default::default()
        }
    }

    fn app_with(services: Vec<TopService>) -> App {
        let mut app = App::default();
        let header = "pins /sys/fs/bpf/lb".into();
        app.set_state(TopState { header, services });
        app
    }

    fn sample() -> App {
        app_with(vec![
            service("web", 1500.0, 42, 3),
            service("api", 12.5, 900, 3),
        ])
    }

    /// The 80x24 screen, one string per row, trailing blanks trimmed.
    fn render(app: &App) -> Vec<String> {
        let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
        term.draw(|f| app.draw(f)).unwrap();
        let buf = term.backend().buffer();
        let line = |y| (0..80).map(|x| buf[(x, y)].symbol()).collect::<String>();
        (0..24).map(|y| line(y).trim_end().to_string()).collect()
    }

    /// Types `keys`: '\n' is Enter, '\x1b' Esc, '\x08' Backspace. Returns the last result.
    fn keys(app: &mut App, keys: &str) -> bool {
        let code = |c| match c {
            '\n' => KeyCode::Enter,
            '\x1b' => KeyCode::Esc,
            '\x08' => KeyCode::Backspace,
            c => KeyCode::Char(c),
        };
        let mut last = true;
        for c in keys.chars() {
            last = app.handle_key(KeyEvent::new(code(c), KeyModifiers::NONE));
        }
        last
    }

    const API: &str = "api         10.96.0.10:80/tcp  maglev   12.5    900      0      2";
    const BE0: &str =
        "  10.0.0.1:8080           100 up          10      0    0.5      7   3.4M    1.2k";
    const HELP: &str = "q quit  s sort:name  / filter  c clear";

    #[test]
    fn renders_services_and_backends_at_80x24() {
        let l = render(&sample());
        assert_eq!(l[0], "pins /sys/fs/bpf/lb  sort:name");
        assert!(l[1].starts_with("SERVICE ") && l[1].ends_with("NOBK/s"));
        assert!(l[2].starts_with("  BACKEND ") && l[2].ends_with("OUT B/s"));
        // Name sort: api and its backends, then web. Every number is visible,
        // the last column flush with column 80.
        assert_eq!([&l[3], &l[4]], [API, BE0]);
        assert!(l[5].starts_with("  10.0.1.1:8080           100 up          20"));
        assert!(l[6].starts_with("  10.0.2.1:8080           100 up          30"));
        assert!(l[7].starts_with("web         10.96.0.10:80/tcp  maglev   1.5k     42"));
        assert!(l[8].starts_with("  10.0.0.1:8080 ") && l[11].is_empty());
        assert_eq!(l[23], HELP);
    }

    #[test]
    fn sort_orders_services_and_cycles() {
        let mut app = sample();
        assert!(keys(&mut app, "s"));
        assert_eq!(app.sort, Sort::Connects);
        // Busier service first, and within it the busiest backend (30/s).
        let l = render(&app);
        assert!(l[0].ends_with("sort:conn/s") && l[3].starts_with("web "));
        assert!(l[4].starts_with("  10.0.2.1:8080"));
        keys(&mut app, "s");
        assert_eq!(app.sort, Sort::Active);
        assert_eq!(render(&app)[3], API); // 900 active beats 42
        keys(&mut app, "s");
        assert_eq!(app.sort, Sort::Failures);
        keys(&mut app, "s");
        assert_eq!(app.sort, Sort::Name);
    }

    #[test]
    fn filter_prompt_applies_and_cancels() {
        let mut app = sample();
        keys(&mut app, "/aX\x08p");
        assert_eq!(render(&app)[23], "/ap   Enter apply  Esc cancel");
        keys(&mut app, "\n");
        let l = render(&app);
        assert_eq!(
            [&l[0], &l[3], &l[4], &l[7]],
            ["pins /sys/fs/bpf/lb  sort:name  filter:ap", API, BE0, ""]
        );
        assert!(!l.iter().any(|r| r.contains("web")) && l[23] == HELP);
        keys(&mut app, "c");
        assert_eq!(app.visible().len(), 2);
        keys(&mut app, "/w");
        assert!(render(&app)[3].starts_with("web ")); // live while typing
        keys(&mut app, "\x1b");
        assert!(!app.filter_open && app.filter.is_empty());
        assert_eq!(render(&app)[3], API);
    }

    #[test]
    fn q_and_ctrl_c_quit_but_not_while_typing() {
        let mut app = sample();
        assert!(!keys(&mut app, "q"));
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert!(!app.handle_key(ctrl_c));
        assert!(keys(&mut app, "/q") && app.filter == "q");
        assert!(!app.handle_key(ctrl_c));
    }

    #[test]
    fn overflow_shows_more_indicator() {
        let mut app = app_with(vec![service("big", 1.0, 1, 40)]);
        let l = render(&app);
        // 41 rows, 20 fit under the 2-line header: 19 shown, then the indicator.
        assert!(l[21].starts_with("  10.0.24.1:8080"), "{l:#?}"); // lexical order
        assert_eq!([&l[22], &l[23]], ["+22 more rows (/ to filter)", HELP]);
        app.state.services[0].name = "x".repeat(300);
        for (w, h) in [(20, 5), (80, 3), (1, 1), (0, 0)] {
            let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
            term.draw(|f| app.draw(f)).unwrap(); // must not panic
        }
    }

    #[test]
    fn human_units() {
        let small = [0.0, 0.5, 42.0, 99.96, 999.0, 1_234.0, 123_456.0];
        assert_eq!(small.map(human).join(" "), "0 0.5 42 100 999 1.2k 123k");
        let big = [5_000.0, 999_960.0, 3_400_000.0, 2.5e12, -1.0, f64::NAN];
        assert_eq!(big.map(human).join(" "), "5.0k 1.0M 3.4M 2.5T - -");
        assert_eq!(truncate("10.244.100.200:8080", 8), "10.244.…");
        assert_eq!(truncate("api", 3), "api");
        let v6 = truncate_mid("[fd00:10:244:1::abcd]:8080", 21);
        assert_eq!(v6, "[fd00:…:1::abcd]:8080");
    }

    #[test]
    fn error_line_replaces_help_until_next_state() {
        let mut app = sample();
        app.set_error("reading map svc_stats: permission denied".into());
        let l = render(&app);
        assert_eq!(l[23], "error: reading map svc_stats: permission denied");
        assert!(l[3].starts_with("api "), "last good state stays visible");
        app.set_state(app.state.clone());
        assert_eq!(render(&app)[23], HELP);
    }
}
