//! Helper run inside a test's network namespace (and, for clients, the balanced cgroup):
//! holds the namespace, serves as backends, acts as a client, or execs a program there.
//! It joins the namespace and cgroup before creating any socket.

mod consul;
mod demo;
mod http;
mod kube;
mod net;

use clap::Subcommand;
use lb_testkit::join;
use std::path::PathBuf;

type Cli = join::HelperCli<Cmd>;

#[derive(Subcommand)]
enum Cmd {
    /// Create a new network namespace with `lo` up and hold it until stdin closes.
    Hold {
        #[arg(long = "addr")]
        addrs: Vec<String>,
        /// Also route 10.255.255.0/24 to a link where nothing answers: connects there stay in
        /// SYN_SENT.
        #[arg(long)]
        blackhole: bool,
    },
    /// Answer every connection/datagram with the listen address; print counts at stdin EOF.
    Serve {
        #[arg(long = "listen", required = true)]
        listen: Vec<std::net::SocketAddr>,
        #[arg(long, default_value = "tcp")]
        proto: net::Proto,
        /// Answer HTTP requests with this status instead of the plain reply.
        #[arg(long, conflicts_with = "hang")]
        http: Option<u16>,
        /// Accept connections and never answer.
        #[arg(long)]
        hang: bool,
        /// Serve HTTP/1.1 keep-alive: answer every request with 200 and the listen address.
        #[arg(long, conflicts_with_all = ["hang", "http"])]
        keep_alive: bool,
        /// Append one line per accepted connection (or datagram) to this file:
        /// `<unix µs> <CLOCK_MONOTONIC µs> <listen address>`.
        #[arg(long)]
        accept_log: Option<PathBuf>,
    },
    /// Sequential connects; prints a JSON report.
    Connect {
        #[arg(long)]
        to: std::net::SocketAddr,
        /// 0 = until stdin closes or --max-seconds pass.
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value = "tcp")]
        proto: net::Proto,
        /// UDP: one unconnected socket sends every datagram with sendto().
        #[arg(long)]
        unconnected: bool,
        /// UDP: one connected socket for every exchange, replaced after a failed one (what a
        /// resolver does), instead of a new socket per exchange.
        #[arg(long, conflicts_with = "unconnected")]
        persistent: bool,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
    },
    /// Open connections and keep them open until stdin closes (long-lived connections).
    HoldConnections {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: u64,
        /// Start each connect without waiting for it (non-blocking): connections to a
        /// backend that does not answer stay in SYN_SENT until stdin closes.
        #[arg(long)]
        pending: bool,
    },
    /// Create, use and close `count` unconnected UDP sockets, each sending one datagram to
    /// `to`; prints a JSON report.
    UdpChurn {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// Replace this process with a program (same pid, so the caller can signal it).
    Exec {
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Mock Consul health API answering from a JSON state file; runs until stdin closes.
    ConsulMock {
        #[arg(long, default_value = "127.0.0.1:8500")]
        listen: std::net::SocketAddr,
        /// JSON state (see lb_testkit::servers::ConsulMock); requests go to `<state>.requests`.
        #[arg(long)]
        state: PathBuf,
    },
    /// Mock Kubernetes API server (list/watch of Services and EndpointSlices) answering from a
    /// JSON state file; runs until stdin closes.
    KubeMock {
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// JSON state (see lb_testkit::KubeMock); requests go to `<state>.requests`.
        #[arg(long)]
        state: PathBuf,
    },
    /// Self-contained demo (root): namespace, cgroup, backends, agent, client, live stats.
    Demo {
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
}

fn main() {
    join::exit_on_error(
        "lb-testkit",
        run(Cli::parse_for(
            "lb-testkit",
            "Test helper: holds namespaces, serves, connects and runs mocks inside them; the demo",
        )),
    );
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let in_test_net = matches!(
        cli.command,
        Cmd::Serve { .. }
            | Cmd::Connect { .. }
            | Cmd::HoldConnections { .. }
            | Cmd::UdpChurn { .. }
            | Cmd::Exec { .. }
            | Cmd::ConsulMock { .. }
            | Cmd::KubeMock { .. }
    );
    cli.place
        .enter(in_test_net.then_some("serve, connect, exec or a mock"))?;
    match cli.command {
        Cmd::Hold { addrs, blackhole } => join::hold(&addrs, blackhole),
        Cmd::Serve {
            listen,
            proto,
            http,
            hang,
            keep_alive,
            accept_log,
        } => {
            let mode = match (http, hang, keep_alive) {
                (Some(status), _, _) => net::Mode::Http(status),
                (None, true, _) => net::Mode::Hang,
                (None, false, true) => net::Mode::KeepAlive,
                (None, false, false) => net::Mode::Answer,
            };
            net::serve(&listen, proto, mode, accept_log.as_deref())
        }
        Cmd::Connect {
            to,
            count,
            proto,
            unconnected,
            persistent,
            interval_ms,
            max_seconds,
        } => {
            let mode = match (unconnected, persistent) {
                (true, _) => net::UdpMode::Unconnected,
                (_, true) => net::UdpMode::Persistent,
                _ => net::UdpMode::PerExchange,
            };
            net::connect(to, count, proto, mode, interval_ms, max_seconds)
        }
        Cmd::HoldConnections { to, count, pending } => net::hold_connections(to, count, pending),
        Cmd::UdpChurn { to, count } => net::udp_churn(to, count),
        Cmd::Exec { argv } => join::exec(&argv),
        Cmd::ConsulMock { listen, state } => consul::run(listen, state),
        Cmd::KubeMock { listen, state } => kube::run(listen, state),
        Cmd::Demo { seconds } => demo::run(seconds),
    }
}
