//! The comparison's output: markdown tables (ratios to direct connects in the same run, plus
//! absolute numbers and spread over repeats) and a bar chart as SVG.

use super::contenders::{Changes, Contender};
use super::load::{LoadReport, Workload};
use super::Plan;
use std::fmt::Write;
use std::time::Duration;

pub struct Row {
    pub contender: Contender,
    pub services: usize,
    pub workload: Workload,
    /// Median over repeats of ops/s (bytes/s for bulk), with the lowest and highest run.
    pub rate: f64,
    pub low: f64,
    pub high: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Row {
    pub fn new(
        contender: Contender,
        services: usize,
        workload: Workload,
        runs: Vec<LoadReport>,
    ) -> Self {
        let rate = |r: &LoadReport| {
            if workload == Workload::Bulk {
                r.bytes_per_sec
            } else {
                r.ops_per_sec
            }
        };
        let rates: Vec<f64> = runs.iter().map(rate).collect();
        Row {
            contender,
            services,
            workload,
            rate: median(rates.clone()),
            low: rates.iter().copied().fold(f64::INFINITY, f64::min),
            high: rates.iter().copied().fold(0.0, f64::max),
            p50_us: median(runs.iter().map(|r| r.p50_us as f64).collect()) as u64,
            p99_us: median(runs.iter().map(|r| r.p99_us as f64).collect()) as u64,
            errors: runs.iter().map(|r| r.errors).sum(),
            first_error: runs.iter().find_map(|r| r.first_error.clone()),
        }
    }
}

/// One contender loaded with `services` services: how long it took, and (lb) the agent's peak
/// RSS and its maps' kernel memory, in KiB.
pub struct Load {
    pub contender: Contender,
    pub services: usize,
    pub time: Duration,
    pub rss_kib: Option<u64>,
    pub kernel_kib: Option<u64>,
}

#[derive(Default)]
pub struct Summary {
    pub rows: Vec<Row>,
    pub not_loaded: Vec<(Contender, usize, String)>,
    /// Load time and, for lb, agent memory, per contender and size.
    pub loads: Vec<Load>,
    /// lb: time to apply one backend change, per size.
    pub changes: Vec<(usize, Changes)>,
    /// lb at one service under persistent requests: (contender, program, runs/s, ns per run)
    /// from BPF run-time statistics.
    pub program_costs: Vec<(Contender, String, f64, f64)>,
}

impl Summary {
    fn row(&self, c: Contender, n: usize, w: Workload) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.contender == c && r.services == n && r.workload == w)
    }

    fn direct(&self, w: Workload) -> Option<f64> {
        self.row(Contender::Direct, 1, w).map(|r| r.rate)
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

fn rate_cell(r: &Row, direct: Option<f64>, bulk: bool) -> String {
    let (value, low, high) = if bulk {
        (r.rate / 1e6, r.low / 1e6, r.high / 1e6)
    } else {
        (r.rate, r.low, r.high)
    };
    let ratio = direct
        .filter(|d| *d > 0.0)
        .map_or(String::new(), |d| format!(" ({:.2}×)", r.rate / d));
    let spread = if (high - low).abs() > f64::EPSILON {
        format!(" [{low:.0}–{high:.0}]")
    } else {
        String::new()
    };
    let errors = if r.errors > 0 {
        format!(", {} errors", r.errors)
    } else {
        String::new()
    };
    format!("{value:.0}{ratio}{spread}{errors}")
}

/// The ceiling the client and backends reach with nothing in between, how steady it was, and
/// how to read a contender above it.
fn ceiling_note(s: &Summary) -> String {
    let Some(direct) = s.row(Contender::Direct, 1, Workload::Short) else {
        return String::new();
    };
    let spread = if direct.rate > 0.0 {
        (direct.high - direct.low) / direct.rate
    } else {
        0.0
    };
    let flag = if spread > 0.10 {
        format!(
            " **Direct connects themselves varied by {:.0}% across runs (over 10%): differences \
             between contenders smaller than that are noise.**",
            spread * 100.0
        )
    } else {
        String::new()
    };
    format!(
        "Measured ceiling: {:.0} short connections/s direct. Nothing can be faster than direct \
         on the same path, so a contender above 1.00× measures noise.{flag}\n",
        direct.rate
    )
}

fn latency_cell(r: &Row) -> String {
    format!("{} / {}", r.p50_us, r.p99_us)
}

pub fn markdown(s: &Summary, plan: &Plan, quick: bool) -> String {
    let mut t = String::new();
    let mode = if quick { "quick" } else { "full" };
    let _ = writeln!(t, "# Side-by-side benchmark ({mode} run)\n");
    let _ = writeln!(
        t,
        "Machine: {}. Each figure is the median of {} run(s) of {} s ([lowest–highest] when more than one); \
         ratios are to direct connects in the same run. {} connections at once in closed loops \
         (1 for bulk) on an event-driven client, 4 event-driven backends, client and backends in \
         two namespaces joined by a veth pair.\n",
        machine(),
        plan.repeats,
        plan.seconds,
        plan.clients
    );
    let _ = writeln!(t, "{}", ceiling_note(s));
    let _ = writeln!(t, "## One service\n");
    let _ = writeln!(
        t,
        "| contender | short connections/s | p50 / p99 µs | persistent requests/s | p50 / p99 µs | bulk MB/s |\n|---|---|---|---|---|---|"
    );
    for c in Contender::ALL {
        let cell = |w: Workload| -> (String, String) {
            s.row(c, 1, w).map_or(("—".into(), "—".into()), |r| {
                (
                    rate_cell(r, s.direct(w), w == Workload::Bulk),
                    latency_cell(r),
                )
            })
        };
        let (short, short_lat) = cell(Workload::Short);
        let (pers, pers_lat) = cell(Workload::Persistent);
        let (bulk, _) = cell(Workload::Bulk);
        let _ = writeln!(
            t,
            "| {} | {short} | {short_lat} | {pers} | {pers_lat} | {bulk} |",
            c.name()
        );
    }
    let _ = writeln!(t, "\n## Short connections with many services installed\n");
    let mut header = String::from("| contender |");
    let mut line = String::from("|---|");
    for n in &plan.scales {
        let _ = write!(header, " {n} services: conn/s (p99 µs) |");
        line += "---|";
    }
    let _ = writeln!(t, "{header}\n{line}");
    for c in Contender::ALL.into_iter().filter(|c| c.scales()) {
        let mut row = format!("| {} |", c.name());
        for &n in &plan.scales {
            let cell = match (
                s.row(c, n, Workload::Short),
                s.not_loaded.iter().find(|(x, m, _)| *x == c && *m == n),
            ) {
                (Some(r), _) => format!(
                    "{} ({})",
                    rate_cell(r, s.direct(Workload::Short), false),
                    r.p99_us
                ),
                (None, Some((_, _, why))) => format!("not loaded: {why}"),
                (None, None) => "—".into(),
            };
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(t, "{row}");
    }
    let _ = writeln!(t, "\n## Control plane\n");
    let _ = writeln!(
        t,
        "| contender | services | time to load from empty | agent RSS (peak) | kernel map memory |\n|---|---|---|---|---|"
    );
    let mib = |kib: &Option<u64>| {
        kib.map_or("—".to_string(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    for l in &s.loads {
        if l.contender == Contender::Direct {
            continue;
        }
        let _ = writeln!(
            t,
            "| {} | {} | {:.2} s | {} | {} |",
            l.contender.name(),
            l.services,
            l.time.as_secs_f64(),
            mib(&l.rss_kib),
            mib(&l.kernel_kib)
        );
    }
    for (c, n, why) in &s.not_loaded {
        let _ = writeln!(t, "| {} | {n} | not loaded: {why} | — | — |", c.name());
    }
    changes_table(&mut t, &s.changes);
    if !s.program_costs.is_empty() {
        let _ = writeln!(
            t,
            "\n## Cost per program run (one service, persistent requests)\n\n\
             Measured by the kernel (BPF run-time statistics, on only while `lb-agent stats \
             --interval` samples). `lb_skb_*` run once per packet: their cost is the price of \
             byte counting, which `[dataplane] count_bytes = false` removes.\n\n\
             | contender | program | runs/s | ns per run |\n|---|---|---|---|"
        );
        for (c, name, runs, ns) in &s.program_costs {
            let _ = writeln!(t, "| {} | {name} | {runs:.0} | {ns:.0} |", c.name());
        }
    }
    let errors: Vec<String> = s
        .rows
        .iter()
        .filter_map(|r| {
            r.first_error.as_ref().map(|e| {
                format!(
                    "- {} / {} services / {:?}: {e}",
                    r.contender.name(),
                    r.services,
                    r.workload
                )
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(
            t,
            "\nFirst error per measurement that had errors:\n{}",
            errors.join("\n")
        );
    }
    t
}

/// Grouped bars: short connections/s per contender, one group per number of services.
pub fn svg(s: &Summary) -> String {
    let scales: Vec<usize> = {
        let mut v: Vec<usize> = s
            .rows
            .iter()
            .filter(|r| r.workload == Workload::Short)
            .map(|r| r.services)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let max = s
        .rows
        .iter()
        .filter(|r| r.workload == Workload::Short)
        .map(|r| r.high)
        .fold(1.0, f64::max);
    let (w, h, left, bottom, top) = (900.0, 420.0, 70.0, 60.0, 40.0);
    let group = (w - left - 20.0) / scales.len().max(1) as f64;
    let bar = group / (Contender::ALL.len() as f64 + 1.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">Short connections per second (higher is better), by services installed</text>\n"
    );
    let plot_h = h - bottom - top;
    for (g, n) in scales.iter().enumerate() {
        let x0 = left + g as f64 * group;
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\">{n} services</text>",
            x0 + group / 3.0,
            h - bottom + 20.0
        );
        for (k, c) in Contender::ALL.iter().enumerate() {
            let Some(r) = s.row(*c, *n, Workload::Short) else {
                continue;
            };
            let bh = r.rate / max * plot_h;
            let x = x0 + k as f64 * bar;
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {:.0}/s</title></rect>",
                h - bottom - bh,
                bar * 0.9,
                c.color(),
                c.name(),
                r.rate
            );
        }
    }
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
        h - bottom,
        w - 20.0,
        h - bottom
    );
    let _ = writeln!(
        out,
        "<text x=\"5\" y=\"{:.1}\">{max:.0}/s</text>",
        top + 10.0
    );
    for (k, c) in Contender::ALL.iter().enumerate() {
        let x = left + k as f64 * 160.0;
        let _ = writeln!(out, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>", h - 22.0, c.color(), x + 14.0, h - 13.0, c.name());
    }
    out += "</svg>\n";
    out
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
