//! The comparison's output: markdown tables. Every ratio is taken per repeat against that
//! repeat's own direct run and shown as the median over repeats with [lowest–highest]; direct's
//! own spread is flagged when it exceeds 10%, since smaller differences are then noise.

use super::contenders::{Changes, Contender};
use super::load::{LoadReport, Workload};
use super::{Case, Plan};
use std::fmt::Write;
use std::time::Duration;

/// Direct's spread (highest − lowest over the median) above which a column is flagged.
pub const NOISY: f64 = 0.10;

/// One `lb-bench load` run.
pub struct Run {
    pub contender: Contender,
    pub services: usize,
    pub case: Case,
    pub repeat: usize,
    pub report: LoadReport,
}

impl Run {
    /// ops/s, or bytes/s for bulk.
    pub fn rate(&self) -> f64 {
        if self.case.workload() == Workload::Bulk {
            self.report.bytes_per_sec
        } else {
            self.report.ops_per_sec
        }
    }
}

/// Median with the lowest and highest value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub low: f64,
    pub high: f64,
    pub count: usize,
}

impl Spread {
    /// The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Spread {
            median,
            low: v[0],
            high: v[v.len() - 1],
            count: v.len(),
        })
    }

    /// (highest − lowest) / median.
    pub fn relative(&self) -> f64 {
        if self.median > 0.0 {
            (self.high - self.low) / self.median
        } else {
            0.0
        }
    }
}

fn median(values: &[f64]) -> f64 {
    Spread::of(values).map_or(0.0, |s| s.median)
}

/// A contender's figures for one size and case over its repeats.
pub struct Cell {
    pub rate: Spread,
    /// Per-repeat ratios to direct; `None` for direct itself or without direct runs.
    pub ratio: Option<Spread>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// One contender loaded with `services` services: how long it took, and (lb) the agent's peak
/// RSS and its maps' kernel memory, in KiB.
pub struct Load {
    pub contender: Contender,
    pub services: usize,
    pub time: Duration,
    pub rss_kib: Option<u64>,
    /// The agent's own (anonymous) part of `rss_kib`, without the BPF arrays it maps.
    pub anon_peak_kib: Option<u64>,
    pub kernel_kib: Option<u64>,
}

/// BPF run-time statistics of one program during one workload.
pub struct ProgramCost {
    pub contender: Contender,
    pub case: Case,
    pub program: String,
    pub runs_per_s: f64,
    pub ns_per_run: f64,
}

#[derive(Default)]
pub struct Summary {
    pub runs: Vec<Run>,
    pub not_loaded: Vec<(Contender, usize, String)>,
    /// Workloads a contender cannot run, with the reason.
    pub not_measured: Vec<(Contender, Case, String)>,
    /// Every install: load time and, for lb, agent memory.
    pub loads: Vec<Load>,
    /// lb: time to apply one backend change, per size.
    pub changes: Vec<(usize, Changes)>,
    pub program_costs: Vec<ProgramCost>,
    /// Wall time of the whole comparison.
    pub duration: Duration,
    /// The 1-minute load average before and after: other work on the machine shows here.
    pub loadavg: (f64, f64),
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Summary {
    pub fn runs_of(&self, c: Contender, n: usize, case: Case) -> Vec<&Run> {
        self.runs
            .iter()
            .filter(|r| r.contender == c && r.services == n && r.case == case)
            .collect()
    }

    /// The direct run `run`'s ratio is taken against: same size, workload and repeat.
    fn reference(&self, run: &Run) -> Option<&Run> {
        self.runs.iter().find(|d| {
            d.contender == Contender::Direct
                && d.services == run.services
                && d.case == run.case
                && d.repeat == run.repeat
        })
    }

    pub fn cell(&self, c: Contender, n: usize, case: Case) -> Option<Cell> {
        let runs = self.runs_of(c, n, case);
        let rate = Spread::of(&runs.iter().map(|r| r.rate()).collect::<Vec<_>>())?;
        let ratios: Vec<f64> = if c == Contender::Direct {
            Vec::new()
        } else {
            runs.iter()
                .filter_map(|r| {
                    let d = self.reference(r)?.rate();
                    (d > 0.0).then(|| r.rate() / d)
                })
                .collect()
        };
        let lat = |f: fn(&LoadReport) -> u64| -> u64 {
            median(&runs.iter().map(|r| f(&r.report) as f64).collect::<Vec<_>>()) as u64
        };
        Some(Cell {
            rate,
            ratio: Spread::of(&ratios),
            p50_us: lat(|r| r.p50_us),
            p99_us: lat(|r| r.p99_us),
            errors: runs.iter().map(|r| r.report.errors).sum(),
            first_error: runs.iter().find_map(|r| r.report.first_error.clone()),
        })
    }

    /// Direct's spread for a size and case, when it is over `NOISY`.
    pub fn noisy(&self, n: usize, case: Case) -> Option<f64> {
        let d = self.cell(Contender::Direct, n, case)?;
        let rel = d.rate.relative();
        (rel > NOISY).then_some(rel)
    }

    /// Latency quantiles over repeats: the median of each quantile.
    pub fn cdf(&self, c: Contender, n: usize, case: Case) -> Vec<u32> {
        let runs = self.runs_of(c, n, case);
        let len = runs
            .iter()
            .map(|r| r.report.cdf_us.len())
            .min()
            .unwrap_or(0);
        (0..len)
            .map(|i| {
                median(
                    &runs
                        .iter()
                        .map(|r| f64::from(r.report.cdf_us[i]))
                        .collect::<Vec<_>>(),
                ) as u32
            })
            .collect()
    }

    /// Sizes with runs, ascending.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.runs.iter().map(|r| r.services).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    format!("Linux {}, {cpus} CPUs ({model})", kernel.trim())
}

/// `0.93× [0.91–0.95]`; one repeat shows no range.
pub fn ratio_text(r: &Spread) -> String {
    if r.count > 1 {
        format!("{:.2}× [{:.2}–{:.2}]", r.median, r.low, r.high)
    } else {
        format!("{:.2}×", r.median)
    }
}

/// A rate in the case's unit (bulk in MB/s).
fn value(case: Case, v: f64) -> String {
    if case == Case::Bulk {
        format!("{:.0}", v / 1e6)
    } else {
        format!("{v:.0}")
    }
}

/// `23232 [23069–23514]`.
pub fn rate_text(case: Case, r: &Spread) -> String {
    if r.count > 1 {
        format!(
            "{} [{}–{}]",
            value(case, r.median),
            value(case, r.low),
            value(case, r.high)
        )
    } else {
        value(case, r.median)
    }
}

/// Direct's own cell: its rate, its spread, and the flag when the spread is over 10%.
pub fn direct_text(case: Case, d: &Cell) -> String {
    let rel = d.rate.relative();
    let flag = if rel > NOISY { " ⚠" } else { "" };
    format!(
        "{} {} (spread {:.0}%{flag})",
        value(case, d.rate.median),
        case.unit(),
        rel * 100.0
    )
}

fn errors_text(cell: &Cell) -> String {
    if cell.errors > 0 {
        format!(", {} errors", cell.errors)
    } else {
        String::new()
    }
}

/// A contender's ratio cell (direct: its rate and spread).
fn ratio_cell(s: &Summary, c: Contender, n: usize, case: Case) -> String {
    if let Some((_, _, why)) = s.not_loaded.iter().find(|(x, m, _)| *x == c && *m == n) {
        return format!("not loaded: {why}");
    }
    if let Some((_, _, why)) = s
        .not_measured
        .iter()
        .find(|(x, k, _)| *x == c && *k == case)
    {
        return format!("not measured: {why}");
    }
    match s.cell(c, n, case) {
        None => "—".into(),
        Some(cell) if c == Contender::Direct => direct_text(case, &cell),
        Some(cell) => {
            let r = cell
                .ratio
                .as_ref()
                .map_or("no direct run".to_string(), ratio_text);
            format!("{r}{}", errors_text(&cell))
        }
    }
}

/// The ceiling the clients and backends reach with nothing in between, how steady it was, and
/// how to read a contender above it.
fn ceiling_note(s: &Summary) -> String {
    let mut parts = Vec::new();
    for case in Case::ONE_SERVICE {
        if let Some(d) = s.cell(Contender::Direct, 1, case) {
            parts.push(format!(
                "{} {} {} (spread {:.0}%)",
                case.label(),
                rate_text(case, &d.rate),
                case.unit(),
                d.rate.relative() * 100.0
            ));
        }
    }
    if parts.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "**Measured ceiling** (direct, one service, median [lowest–highest] over repeats): {}. \
         Nothing can be faster than direct on the same path: a contender above 1.00× measures \
         noise.",
        parts.join("; ")
    );
    if let Some(aa) = s
        .cell(Contender::DirectTwin, 1, Case::Short)
        .and_then(|c| c.ratio)
    {
        let _ = write!(
            t,
            " The same direct path measured again from another namespace (A/A check) gave {} of it for \
             short connections: differences of that size between contenders are noise.",
            ratio_text(&aa)
        );
    }
    t + "\n"
}

fn flagged_note(s: &Summary, sizes: &[usize], cases: &[Case]) -> String {
    let mut flagged = Vec::new();
    for &n in sizes {
        for &case in cases {
            if n == 1 && case == Case::ShortEnd {
                continue;
            }
            if let Some(rel) = s.noisy(n, case) {
                flagged.push(format!(
                    "{} with {n} service(s) ({:.0}%)",
                    case.label(),
                    rel * 100.0
                ));
            }
        }
    }
    if flagged.is_empty() {
        String::new()
    } else {
        format!(
            "\n⚠ Direct itself varied by more than 10% across repeats for: {}. There, ratio \
             differences smaller than that spread are noise.\n",
            flagged.join(", ")
        )
    }
}

pub fn markdown(s: &Summary, plan: &Plan, quick: bool, stem: &str) -> String {
    let mut t = String::new();
    let mode = if quick { "quick" } else { "full" };
    let _ = writeln!(t, "# Side-by-side benchmark ({mode} run)\n");
    let _ = writeln!(
        t,
        "Machine: {}; 1-minute load average {:.1} before and {:.1} after (the benchmark \
         itself loads both cores; anything else running adds noise). Whole comparison: {:.0} s.\n\n\
         Method: every contender has its own client namespace and cgroup (joined to the \
         backends' namespace by its own veth pair), so all are installed at once for a size \
         and none sees another's rules or programs. {} repeats of {} s per measurement; every \
         repeat runs each workload for every contender, one after another, in an order rotated \
         by one per repeat (and per workload). A ratio is taken per repeat against that \
         repeat's own direct run of the same workload; tables show the median ratio with \
         [lowest–highest] over repeats. {} connections at once in closed loops (1 for bulk) on \
         an event-driven client, 4 event-driven backends.\n",
        machine(),
        s.loadavg.0,
        s.loadavg.1,
        s.duration.as_secs_f64(),
        plan.repeats,
        plan.seconds,
        plan.clients
    );
    let _ = writeln!(t, "{}", ceiling_note(s));
    one_service(&mut t, s);
    many_services(&mut t, s);
    let _ = writeln!(
        t,
        "\n![conn/s ratio to direct by number of services]({stem}-ratio.svg)\n\n\
         ![latency CDF, short connections, one service]({stem}-cdf.svg)"
    );
    control_plane(&mut t, s);
    changes_table(&mut t, &s.changes);
    program_costs(&mut t, s);
    let errors: Vec<String> = Contender::ALL
        .iter()
        .flat_map(|&c| {
            s.sizes()
                .into_iter()
                .flat_map(move |n| Case::at(n).iter().map(move |&case| (c, n, case)))
        })
        .filter_map(|(c, n, case)| {
            let cell = s.cell(c, n, case)?;
            let e = cell.first_error?;
            Some(format!(
                "- {} / {n} services / {}: {} errors, first: {e}",
                c.name(),
                case.label(),
                cell.errors
            ))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(
            t,
            "\nMeasurements with errors (a failed request or connection is counted and the loop goes on):\n{}",
            errors.join("\n")
        );
    }
    t
}

fn one_service(t: &mut String, s: &Summary) {
    let cases = Case::ONE_SERVICE;
    let present: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|&c| cases.iter().any(|&k| s.cell(c, 1, k).is_some()))
        .collect();
    if present.is_empty() {
        return;
    }
    let _ = writeln!(t, "## One service: ratio to direct\n");
    let mut header = String::from("| contender |");
    let mut line = String::from("|---|");
    for case in cases {
        let _ = write!(header, " {} |", case.label());
        line += "---|";
    }
    let _ = writeln!(t, "{header}\n{line}");
    for &c in &present {
        let mut row = format!("| {} |", c.name());
        for case in cases {
            let _ = write!(row, " {} |", ratio_cell(s, c, 1, case));
        }
        let _ = writeln!(t, "{row}");
    }
    let _ = write!(t, "{}", flagged_note(s, &[1], &cases));
    let _ = writeln!(
        t,
        "\n## One service: rates and latency\n\nMedian [lowest–highest] over repeats; latency \
         is the median over repeats of each run's p50 / p99, in µs.\n"
    );
    let mut header = String::from("| contender |");
    let mut line = String::from("|---|");
    for case in cases {
        let _ = write!(header, " {} {} |", case.label(), case.unit());
        line += "---|";
        if case != Case::Bulk {
            let _ = write!(header, " p50 / p99 |");
            line += "---|";
        }
    }
    let _ = writeln!(t, "{header}\n{line}");
    for &c in &present {
        let mut row = format!("| {} |", c.name());
        for case in cases {
            let cell = s.cell(c, 1, case);
            let rate = cell
                .as_ref()
                .map_or("—".into(), |x| rate_text(case, &x.rate));
            let _ = write!(row, " {rate} |");
            if case != Case::Bulk {
                let lat = cell
                    .as_ref()
                    .map_or("—".into(), |x| format!("{} / {}", x.p50_us, x.p99_us));
                let _ = write!(row, " {lat} |");
            }
        }
        let _ = writeln!(t, "{row}");
    }
}

fn many_services(t: &mut String, s: &Summary) {
    let sizes = s.sizes();
    let scaling: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|&c| c == Contender::Direct || c.scales())
        .filter(|&c| {
            sizes.iter().any(|&n| s.cell(c, n, Case::Short).is_some())
                || s.not_loaded.iter().any(|(x, _, _)| *x == c)
        })
        .collect();
    if scaling.is_empty() {
        return;
    }
    let _ = writeln!(
        t,
        "\n## Short connections with many services installed: ratio to direct\n\n\
         The measured VIP is the middle one of those installed, or the last one (the end of \
         iptables' chain). With one service both are the same VIP. Direct's row is its own \
         rate (run again next to the last-VIP runs); the absolute rates are in the next table.\n"
    );
    let mut header = String::from("| contender |");
    let mut line = String::from("|---|");
    for n in &sizes {
        let _ = write!(header, " {n}: middle VIP | {n}: last VIP |");
        line += "---|---|";
    }
    let _ = writeln!(t, "{header}\n{line}");
    for &c in &scaling {
        let mut row = format!("| {} |", c.name());
        for &n in &sizes {
            let end = if n == 1 { Case::Short } else { Case::ShortEnd };
            let last = ratio_cell(s, c, n, end);
            let _ = write!(row, " {} | {last} |", ratio_cell(s, c, n, Case::Short));
        }
        let _ = writeln!(t, "{row}");
    }
    let _ = write!(
        t,
        "{}",
        flagged_note(s, &sizes, &[Case::Short, Case::ShortEnd])
    );
    let _ = writeln!(
        t,
        "\n| contender | services | middle VIP conn/s | p99 µs | last VIP conn/s | p99 µs |\n|---|---|---|---|---|---|"
    );
    for &c in &scaling {
        for &n in &sizes {
            let end = if n == 1 { Case::Short } else { Case::ShortEnd };
            let (Some(mid), last) = (s.cell(c, n, Case::Short), s.cell(c, n, end)) else {
                continue;
            };
            let (last_rate, last_p99) = match &last {
                None => ("—".to_string(), "—".to_string()),
                Some(l) => (rate_text(end, &l.rate), l.p99_us.to_string()),
            };
            let _ = writeln!(
                t,
                "| {} | {n} | {} | {} | {last_rate} | {last_p99} |",
                c.name(),
                rate_text(Case::Short, &mid.rate),
                mid.p99_us
            );
        }
    }
}

fn control_plane(t: &mut String, s: &Summary) {
    let _ = writeln!(
        t,
        "\n## Control plane\n\nTime from start to loaded (lb: to its first full reconcile), \
         median [lowest–highest] over installs; lb's peak RSS, its own (anonymous) part of it \
         (the peak less the file-backed pages, mostly the BPF arrays it maps, which are kernel \
         map memory) and kernel map memory (highest over installs).\n\n\
         | contender | services | installs | time to load from empty | agent RSS (peak) | agent's own memory (anon, peak) | kernel map memory |\n|---|---|---|---|---|---|---|"
    );
    let mib = |kib: Option<u64>| {
        kib.map_or("—".to_string(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    let mut keys: Vec<(usize, usize)> = Vec::new();
    for l in &s.loads {
        let idx = Contender::ALL
            .iter()
            .position(|&c| c == l.contender)
            .unwrap_or(0);
        if !l.contender.is_direct() && !keys.contains(&(idx, l.services)) {
            keys.push((idx, l.services));
        }
    }
    keys.sort_unstable();
    for (idx, n) in keys {
        let c = Contender::ALL[idx];
        let mine: Vec<&Load> = s
            .loads
            .iter()
            .filter(|l| l.contender == c && l.services == n)
            .collect();
        let times: Vec<f64> = mine.iter().map(|l| l.time.as_secs_f64()).collect();
        let Some(time) = Spread::of(&times) else {
            continue;
        };
        let time = if time.count > 1 {
            format!("{:.2} s [{:.2}–{:.2}]", time.median, time.low, time.high)
        } else {
            format!("{:.2} s", time.median)
        };
        let _ = writeln!(
            t,
            "| {} | {n} | {} | {time} | {} | {} | {} |",
            c.name(),
            mine.len(),
            mib(mine.iter().filter_map(|l| l.rss_kib).max()),
            mib(mine.iter().filter_map(|l| l.anon_peak_kib).max()),
            mib(mine.iter().filter_map(|l| l.kernel_kib).max())
        );
    }
    for (c, n, why) in &s.not_loaded {
        let _ = writeln!(
            t,
            "| {} | {n} | — | not loaded: {why} | — | — | — |",
            c.name()
        );
    }
}

fn program_costs(t: &mut String, s: &Summary) {
    if s.program_costs.is_empty() {
        return;
    }
    let _ = writeln!(
        t,
        "\n## Cost per program run (one service, every workload)\n\n\
         Measured by the kernel (BPF run-time statistics, on only while `lb-agent stats \
         --interval` samples inside a separate run of each workload; these runs are not in the \
         tables above, since the statistics add to every program run). Each cell: ns per run \
         (runs/s). `lb_skb_*` run once per packet: their cost is the price of byte counting, \
         which `[dataplane] count_bytes = false` removes.\n"
    );
    let mut header = String::from("| contender | program |");
    let mut line = String::from("|---|---|");
    for case in Case::ONE_SERVICE {
        let _ = write!(header, " {} |", case.label());
        line += "---|";
    }
    let _ = writeln!(t, "{header}\n{line}");
    let mut rows: Vec<(Contender, &str)> = Vec::new();
    for p in &s.program_costs {
        if !rows.contains(&(p.contender, p.program.as_str())) {
            rows.push((p.contender, &p.program));
        }
    }
    for (c, program) in rows {
        let mut row = format!("| {} | {program} |", c.name());
        for case in Case::ONE_SERVICE {
            let cell = s
                .program_costs
                .iter()
                .find(|p| p.contender == c && p.program == program && p.case == case)
                .map_or("—".to_string(), |p| {
                    format!("{:.0} ({:.0}/s)", p.ns_per_run, p.runs_per_s)
                });
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(t, "{row}");
    }
}

/// Quantile `q` of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64) * q).round() as usize])
}

fn changes_table(t: &mut String, changes: &[(usize, Changes)]) {
    let _ = writeln!(
        t,
        "\n## lb: one backend change\n\n\
         A discovery answer (Consul) flips one backend of one service; the time is the agent's \
         own, from the answer reaching it to the maps holding the change (`reconciled ... \
         micros=`). The ratio compares each size's median with the smallest size's, measured \
         in the same run. A config edit re-reads and compares the whole file, so it grows with \
         the size.\n\n\
         | services | answers timed | p50 | p99 | p50 vs smallest | config edit (SIGHUP to reconciled) |\n\
         |---|---|---|---|---|---|"
    );
    let ms = |d: Option<Duration>| {
        d.map_or("—".to_string(), |d| {
            format!("{:.2} ms", d.as_secs_f64() * 1e3)
        })
    };
    let mut base = None;
    for (n, c) in changes {
        let mut sorted = c.answers.clone();
        sorted.sort();
        let p50 = quantile(&sorted, 0.5);
        base = base.or(p50);
        let ratio = match (p50, base) {
            (Some(p), Some(b)) if !b.is_zero() => {
                format!("{:.2}x", p.as_secs_f64() / b.as_secs_f64())
            }
            _ => "—".to_string(),
        };
        let missed = if c.missed > 0 {
            format!(" ({} not applied within 5 s)", c.missed)
        } else {
            String::new()
        };
        let reload = c
            .reload
            .map_or("not applied within the budget".to_string(), |d| {
                format!("{:.3} s", d.as_secs_f64())
            });
        let _ = writeln!(
            t,
            "| {n} | {}{missed} | {} | {} | {ratio} | {reload} |",
            sorted.len(),
            ms(p50),
            ms(quantile(&sorted, 0.99))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(c: Contender, n: usize, case: Case, repeat: usize, rate: f64) -> Run {
        Run {
            contender: c,
            services: n,
            case,
            repeat,
            report: LoadReport {
                ops_per_sec: rate,
                bytes_per_sec: rate * 1e6,
                p50_us: 100 + repeat as u64,
                p99_us: 1000,
                ..LoadReport::default()
            },
        }
    }

    #[test]
    fn spread_takes_the_median_and_the_extremes() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.low, s.high, s.count), (2.0, 1.0, 3.0, 3));
        let even = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert!((even.relative() - 3.0 / 2.5).abs() < 1e-12);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn ratios_are_per_repeat_against_that_repeats_direct_run() {
        let mut s = Summary::default();
        // Direct drifts from 100 to 200; the contender stays at 0.9 of it in each repeat.
        for (r, d) in [100.0, 150.0, 200.0].into_iter().enumerate() {
            s.runs.push(run(Contender::Direct, 1, Case::Short, r, d));
            s.runs.push(run(Contender::Lb, 1, Case::Short, r, d * 0.9));
            s.runs.push(run(Contender::Lb, 1, Case::Bulk, r, d * 0.5));
        }
        let cell = s.cell(Contender::Lb, 1, Case::Short).unwrap();
        let ratio = cell.ratio.unwrap();
        assert!((ratio.median - 0.9).abs() < 1e-9 && (ratio.high - ratio.low).abs() < 1e-9);
        // Against the median of direct (150) it would have looked like 0.6–1.2.
        assert_eq!(cell.rate.low, 90.0);
        assert_eq!(cell.p50_us, 101);
        // No direct bulk run: no ratio.
        assert!(s
            .cell(Contender::Lb, 1, Case::Bulk)
            .unwrap()
            .ratio
            .is_none());
        assert!(s
            .cell(Contender::Direct, 1, Case::Short)
            .unwrap()
            .ratio
            .is_none());
        // Direct varied by 100/150: flagged.
        let noisy = s.noisy(1, Case::Short).unwrap();
        assert!((noisy - 100.0 / 150.0).abs() < 1e-9);
    }

    #[test]
    fn the_last_vip_pairs_with_the_direct_run_next_to_it() {
        let mut s = Summary::default();
        s.runs
            .push(run(Contender::Direct, 10_000, Case::Short, 0, 100.0));
        s.runs
            .push(run(Contender::Direct, 10_000, Case::ShortEnd, 0, 50.0));
        s.runs
            .push(run(Contender::Iptables, 10_000, Case::Short, 0, 40.0));
        s.runs
            .push(run(Contender::Iptables, 10_000, Case::ShortEnd, 0, 40.0));
        let r = |case| {
            s.cell(Contender::Iptables, 10_000, case)
                .unwrap()
                .ratio
                .unwrap()
                .median
        };
        assert_eq!(r(Case::Short), 0.4);
        assert_eq!(r(Case::ShortEnd), 0.8);
    }

    #[test]
    fn cells_read_as_median_and_range() {
        let r = Spread::of(&[0.91, 0.934, 0.95]).unwrap();
        assert_eq!(ratio_text(&r), "0.93× [0.91–0.95]");
        assert_eq!(ratio_text(&Spread::of(&[1.0]).unwrap()), "1.00×");
        let bulk = Spread::of(&[5.6e9, 5.5e9]).unwrap();
        assert_eq!(rate_text(Case::Bulk, &bulk), "5550 [5500–5600]");
        let mut s = Summary::default();
        s.runs
            .push(run(Contender::Direct, 1, Case::Short, 0, 100.0));
        s.runs
            .push(run(Contender::Direct, 1, Case::Short, 1, 120.0));
        let d = s.cell(Contender::Direct, 1, Case::Short).unwrap();
        assert_eq!(direct_text(Case::Short, &d), "110 conn/s (spread 18% ⚠)");
        s.not_measured
            .push((Contender::Haproxy, Case::Udp, "no UDP".into()));
        assert_eq!(
            ratio_cell(&s, Contender::Haproxy, 1, Case::Udp),
            "not measured: no UDP"
        );
        s.not_loaded
            .push((Contender::Iptables, 250_000, "too slow".into()));
        assert_eq!(
            ratio_cell(&s, Contender::Iptables, 250_000, Case::Short),
            "not loaded: too slow"
        );
    }

    #[test]
    fn the_markdown_flags_a_noisy_direct_and_states_the_ceiling() {
        let mut s = Summary::default();
        for (r, d) in [100.0, 130.0].into_iter().enumerate() {
            s.runs.push(run(Contender::Direct, 1, Case::Short, r, d));
            s.runs.push(run(Contender::Lb, 1, Case::Short, r, d * 0.95));
        }
        let plan = Plan::new(true);
        let t = markdown(&s, &plan, true, "latest-quick");
        assert!(t.contains("**Measured ceiling**"), "{t}");
        assert!(t.contains("a contender above 1.00× measures noise"));
        assert!(
            t.contains("| lb (this project) | 0.95× [0.95–0.95] |"),
            "{t}"
        );
        assert!(t.contains("⚠ Direct itself varied by more than 10%"));
        assert!(t.contains("(latest-quick-ratio.svg)"));
    }

    #[test]
    fn latency_quantiles_are_the_median_over_repeats() {
        let mut s = Summary::default();
        for (r, base) in [10u32, 30, 20].into_iter().enumerate() {
            let mut x = run(Contender::Lb, 1, Case::Short, r, 1.0);
            x.report.cdf_us = vec![base, base * 2, base * 3];
            s.runs.push(x);
        }
        assert_eq!(s.cdf(Contender::Lb, 1, Case::Short), vec![20, 40, 60]);
    }
}
