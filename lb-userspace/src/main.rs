//! `lb-agent`: keeps the connect-time load balancer's BPF maps equal to the configured services.

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_userspace::lifecycle::detach;
use lb_userspace::observe::{report, table};
use lb_userspace::{agent, config};
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF connect-time L4 load balancer agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to a cgroup and keep the maps equal to the config (root).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// cgroup v2 folder whose processes get balanced [default: the cgroup2 mount root]
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// How often to check the config file for changes, in milliseconds; 0 turns it off
        /// (SIGHUP still reloads).
        #[arg(long, default_value_t = 1000)]
        watch_interval_ms: u64,
        /// Emit eBPF debug logs (one per balanced connect: costs CPU on busy hosts).
        #[arg(long)]
        bpf_log: bool,
        /// Serve GET /healthz and /readyz on this address (e.g. 127.0.0.1:9901).
        #[arg(long)]
        http_listen: Option<std::net::SocketAddr>,
        /// Serve GET /metrics (Prometheus) on this address, or `off`.
        #[arg(long, default_value = "127.0.0.1:9902", value_parser = address_or_off)]
        metrics_listen: Listen,
        /// Services the maps hold, when this agent creates them [default: twice the config's,
        /// at least 65,536]. Maps already pinned keep their size.
        #[arg(long)]
        max_services: Option<u32>,
        /// Backends the maps hold, when this agent creates them [default: 1.5× the config's,
        /// at least 65,536].
        #[arg(long)]
        max_backends: Option<u32>,
        /// Slots (table entries) the maps hold, when this agent creates them [default: twice
        /// what the config's tables take, at least 1,048,576].
        #[arg(long)]
        max_slots: Option<u32>,
        /// Remembered client choices (client affinity) the maps hold, when this agent creates
        /// them [default: 65,536]; when full, the least recently used is forgotten.
        #[arg(long)]
        max_affinity: Option<u32>,
        /// Crash tests only: after applying this many operations of a plan other than the
        /// first, SIGKILL itself (an agent killed in the middle of an apply).
        #[arg(long, hide = true)]
        crash_after_ops: Option<usize>,
    },
    /// Validate a config file without root and without touching the kernel.
    CheckConfig { file: PathBuf },
    /// Print services, backends and counters from the pinned maps.
    Stats {
        #[arg(long)]
        json: bool,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Sample twice this many seconds apart to show rates; 0 = one sample, no rates.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Live view of services and backends, refreshed every second (q quits).
    Top {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value_t = 1000)]
        refresh_ms: u64,
    },
    /// Detach the program and remove every pin (balancing stops).
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() {
    // eBPF log records (target `lb_ebpf`) are only produced with `run --bpf-log`; when asked
    // for, they are shown.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lb_ebpf=debug")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = dispatch(Cli::parse().command) {
        eprintln!("lb-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            cgroup,
            pin_dir,
            watch_interval_ms,
            bpf_log,
            http_listen,
            metrics_listen,
            max_services,
            max_backends,
            max_slots,
            max_affinity,
            crash_after_ops,
        } => {
            let args = agent::RunArgs {
                config,
                capacity: lb_userspace::datapath::capacity::Requested {
                    services: max_services,
                    backends: max_backends,
                    slots: max_slots,
                    affinity: max_affinity,
                },
                cgroup,
                pin_dir,
                watch_interval: (watch_interval_ms > 0)
                    .then(|| Duration::from_millis(watch_interval_ms)),
                bpf_log,
                http_listen,
                metrics_listen: metrics_listen.0,
                crash_after_ops,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(args))
        }
        Command::CheckConfig { file } => {
            let config = config::load(&file)?;
            println!("{}: ok, {} services", file.display(), config.services.len());
            Ok(())
        }
        Command::Stats {
            json,
            service,
            interval,
            pin_dir,
        } => {
            if !(0.0..=3600.0).contains(&interval) {
                anyhow::bail!("--interval must be between 0 and 3600 seconds, got {interval}");
            }
            let maps = report::open(&pin_dir)?;
            let mut report = report::sample(&maps, &pin_dir, interval)?;
            if let Some(name) = &service {
                report::only_service(&mut report, name);
                if report.services.is_empty() {
                    anyhow::bail!("no service named {name:?} is installed");
                }
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", table::render_table(&report));
            }
            Ok(())
        }
        Command::Top {
            pin_dir,
            refresh_ms,
        } => lb_userspace::observe::top::run(&pin_dir, Duration::from_millis(refresh_ms.max(100))),
        Command::Detach { pin_dir } => detach::detach(&pin_dir),
    }
}

/// An address, or `off` for none.
#[derive(Clone, Debug)]
struct Listen(Option<std::net::SocketAddr>);

fn address_or_off(text: &str) -> Result<Listen, String> {
    if text == "off" {
        return Ok(Listen(None));
    }
    text.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("expected address:port (e.g. 127.0.0.1:9902) or off, got {text:?}"))
}
