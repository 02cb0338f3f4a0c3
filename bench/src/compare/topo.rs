//! The benchmark's network: a client namespace and a backend namespace joined by a veth pair,
//! with no other interface and no route out. Backends live on 10.200.1.x in the backend
//! namespace; clients reach them over the veth. Nothing is attached to the host's network.

use anyhow::{bail, Context, Result};
use lb_testkit::paths::testkit_bin;
use lb_testkit::TestNet;
use std::process::Command;

pub const CLIENT_IP: &str = "10.200.0.1";
pub const SERVER_IP: &str = "10.200.0.2";
pub const BACKEND_PORT: u16 = 8080;
/// Where untranslated VIP traffic goes while a DNAT contender needs a route: to the backend
/// namespace, which does not forward and so drops it.
pub const VIP_RANGE: &str = "10.96.0.0/15";

pub struct Topology {
    pub client: TestNet,
    pub server: TestNet,
    pub backends: Vec<String>,
}

/// Runs a program inside a namespace (through `lb-testkit exec`, which enters it first).
pub fn run_in(net: &TestNet, argv: &[&str]) -> Result<String> {
    let out = Command::new(testkit_bin())
        .args(["--netns", &net.ns_path, "exec", "--"])
        .args(argv)
        .output()
        .with_context(|| format!("run {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn holder_pid(net: &TestNet) -> Result<&str> {
    net.ns_path
        .strip_prefix("/proc/")
        .and_then(|rest| rest.split('/').next())
        .context("namespace path is not /proc/PID/ns/net")
}

impl Topology {
    pub fn build(backends: usize) -> Result<Self> {
        let client = TestNet::new(&[]);
        let server = TestNet::new(&[]);
        // Short unique names (15 bytes max); the pair disappears with the namespaces.
        let id = std::process::id() % 100_000;
        let (c, s) = (format!("lbbc{id}"), format!("lbbs{id}"));
        let ip = |args: &[&str]| -> Result<()> {
            let status = Command::new("ip").args(args).status().context("run ip")?;
            if !status.success() {
                bail!("ip {args:?} failed");
            }
            Ok(())
        };
        ip(&["link", "add", &c, "type", "veth", "peer", "name", &s])?;
        let moved = ip(&["link", "set", &c, "netns", holder_pid(&client)?])
            .and_then(|_| ip(&["link", "set", &s, "netns", holder_pid(&server)?]));
        if let Err(e) = moved {
            // Whatever end is still in the host namespace takes its peer with it.
            let _ = Command::new("ip").args(["link", "del", &c]).status();
            let _ = Command::new("ip").args(["link", "del", &s]).status();
            return Err(e);
        }
        run_in(
            &client,
            &["ip", "addr", "add", &format!("{CLIENT_IP}/24"), "dev", &c],
        )?;
        run_in(&client, &["ip", "link", "set", &c, "up"])?;
        run_in(
            &client,
            &["ip", "route", "add", "10.200.1.0/24", "via", SERVER_IP],
        )?;
        run_in(
            &server,
            &["ip", "addr", "add", &format!("{SERVER_IP}/24"), "dev", &s],
        )?;
        run_in(&server, &["ip", "link", "set", &s, "up"])?;
        let mut addrs = Vec::new();
        for i in 1..=backends {
            let ip = format!("10.200.1.{i}");
            run_in(
                &server,
                &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"],
            )?;
            addrs.push(format!("{ip}:{BACKEND_PORT}"));
        }
        // Short connections at full speed: reuse TIME_WAIT ports on the client side.
        run_in(&client, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range"])?;
        Ok(Self {
            client,
            server,
            backends: addrs,
        })
    }

    pub fn route_vips(&self, on: bool) -> Result<()> {
        let verb = if on { "add" } else { "del" };
        run_in(
            &self.client,
            &["ip", "route", verb, VIP_RANGE, "via", SERVER_IP],
        )
        .map(|_| ())
    }
}

/// The i-th benchmark VIP: 10.96.0.0 upwards (10.97.x.x past 65,536), port 80.
pub fn vip(i: usize) -> String {
    let n = 0x0a60_0000u32 + i as u32 + 1;
    format!("{}:80", std::net::Ipv4Addr::from(n))
}
