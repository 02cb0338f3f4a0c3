//! `lb-bench`: what `cargo xtask bench` runs (root). Health-check measurements, and the
//! side-by-side comparison with its own load generator and backends, which it runs as copies of
//! itself inside the benchmark's namespaces (`serve`, `load`). Tables and charts only: nothing
//! here asserts on speed. Method and results: bench/README.md.

mod compare;
mod health;
mod kube_churn;
mod process;

use clap::Subcommand;
use lb_testkit::join;
use std::path::PathBuf;

type Cli = join::HelperCli<Cmd>;

#[derive(Subcommand)]
enum Cmd {
    /// Detection time over repeated backend deaths.
    Health {
        #[arg(long, default_value_t = 20)]
        trials: u32,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 3)]
        fall: u32,
    },
    /// The agent's CPU and memory while probing many backends.
    HealthScale {
        #[arg(long, default_value_t = 1000)]
        backends: u32,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// The agent following a Kubernetes mock's endpoint changes at a steady rate: latency from
    /// the watch to the maps, changes applied, /healthz, CPU and memory.
    KubeChurn {
        /// 1,000 services for 10 s instead of 10,000 for 60 s.
        #[arg(long)]
        quick: bool,
        /// Where the table is written (`kube-churn.md`, or `kube-churn-quick.md`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        services: Option<usize>,
        /// Changes per second.
        #[arg(long)]
        rate: Option<u32>,
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Side-by-side comparison with direct connects, nftables, iptables and HAProxy.
    Compare {
        #[arg(long)]
        quick: bool,
        /// Where the markdown tables and SVG charts are written.
        #[arg(long)]
        out: PathBuf,
        /// Numbers of services instead of the plan's (e.g. `100,100000`); the results then go
        /// to `partial.md`.
        #[arg(long, value_delimiter = ',')]
        scales: Vec<usize>,
        /// Only these contenders (by short name: direct, direct-twin, lb, lb-nobytes, nftables,
        /// iptables, haproxy; ratios need direct); the results then go to `partial.md`.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Benchmark backends: echo each request; stream data after a request starting with `B`.
    Serve {
        #[arg(long = "listen", required = true)]
        listen: Vec<std::net::SocketAddr>,
    },
    /// Benchmark clients: one workload for a while, `--clients` connections at once in closed
    /// loops on an event-driven runtime; prints a JSON report.
    Load {
        #[arg(long = "to", required = true)]
        to: Vec<std::net::SocketAddr>,
        #[arg(long, value_enum)]
        workload: compare::load::Workload,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
}

fn main() {
    join::exit_on_error(
        "lb-bench",
        run(Cli::parse_for(
            "lb-bench",
            "The benchmarks `cargo xtask bench` runs (root)",
        )),
    );
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let in_bench_net = matches!(cli.command, Cmd::Serve { .. } | Cmd::Load { .. });
    cli.place.enter(in_bench_net.then_some("serve or load"))?;
    match cli.command {
        Cmd::Health {
            trials,
            interval_ms,
            fall,
        } => health::detection(trials, interval_ms, fall),
        Cmd::HealthScale {
            backends,
            interval_ms,
            seconds,
        } => health::scale(backends, interval_ms, seconds),
        Cmd::KubeChurn {
            quick,
            out,
            services,
            rate,
            seconds,
        } => {
            let base = kube_churn::Plan::new(quick);
            let plan = kube_churn::Plan {
                services: services.unwrap_or(base.services),
                rate: rate.unwrap_or(base.rate),
                seconds: seconds.unwrap_or(base.seconds),
            };
            kube_churn::run(&plan, out.as_deref(), quick)
        }
        Cmd::Compare {
            quick,
            out,
            scales,
            only,
        } => compare::run(quick, &out, &scales, &only),
        Cmd::Serve { listen } => compare::load::serve(&listen),
        Cmd::Load {
            to,
            workload,
            seconds,
            clients,
        } => compare::load::load(&to, workload, seconds, clients),
    }
}
