//! The benchmark's network: a client namespace and a backend namespace joined by a veth pair,
//! and a twin of the client namespace (the reference, where direct connects run) joined to the
//! same backend namespace by a second pair; no other interface and no route out. Backends live
//! on 10.200.1.x and fd00:201::x in the backend namespace; clients reach them over the veths.
//! Nothing is attached to the host's network.

use anyhow::{bail, Context, Result};
use lb_testkit::paths::testkit_bin;
use lb_testkit::TestNet;
use std::process::Command;

pub const BACKEND_PORT: u16 = 8080;
/// Where untranslated VIP traffic goes while a DNAT contender needs a route: to the backend
/// namespace, which does not forward and so drops it.
pub const VIP_RANGE: &str = "10.96.0.0/15";
pub const VIP6_RANGE: &str = "fd00:96::/64";

/// One client namespace's link to the backend namespace.
struct Link {
    /// Interface name prefixes (client side, backend side) and the subnets' distinct parts.
    names: (&'static str, &'static str),
    v4: &'static str,
    v6: &'static str,
}

/// The contenders' client namespace: 10.200.0.1 ↔ .2 and fd00:200::1 ↔ ::2.
const CLIENT_LINK: Link = Link {
    names: ("lbbc", "lbbs"),
    v4: "10.200.0",
    v6: "fd00:200:",
};
/// The reference namespace: 10.200.2.1 ↔ .2 and fd00:202::1 ↔ ::2.
const REFERENCE_LINK: Link = Link {
    names: ("lbbr", "lbbt"),
    v4: "10.200.2",
    v6: "fd00:202:",
};

pub struct Topology {
    /// Where the contenders are installed and their clients run.
    pub client: TestNet,
    /// The same setup with nothing installed: direct connects run here, so they can run
    /// between a contender's runs while that contender stays installed.
    pub reference: TestNet,
    pub server: TestNet,
    /// Backend addresses, IPv4 (`10.200.1.k:8080`) and IPv6 (`[fd00:201::k]:8080`).
    pub backends: Vec<String>,
    pub backends6: Vec<String>,
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

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status().context("run ip")?;
    if !status.success() {
        bail!("ip {args:?} failed");
    }
    Ok(())
}

/// A veth pair from `client` to `server` with both address families, and the client's routes
/// to the backends over it.
fn link(client: &TestNet, server: &TestNet, l: &Link) -> Result<()> {
    // Short unique names (15 bytes max); the pair disappears with the namespaces.
    let id = std::process::id() % 100_000;
    let (c, s) = (format!("{}{id}", l.names.0), format!("{}{id}", l.names.1));
    ip(&["link", "add", &c, "type", "veth", "peer", "name", &s])?;
    let moved = ip(&["link", "set", &c, "netns", holder_pid(client)?])
        .and_then(|_| ip(&["link", "set", &s, "netns", holder_pid(server)?]));
    if let Err(e) = moved {
        // Whatever end is still in the host namespace takes its peer with it.
        let _ = Command::new("ip").args(["link", "del", &c]).status();
        let _ = Command::new("ip").args(["link", "del", &s]).status();
        return Err(e);
    }
    for (net, dev, host) in [(client, &c, 1), (server, &s, 2)] {
        let v4 = format!("{}.{host}/24", l.v4);
        run_in(net, &["ip", "addr", "add", &v4, "dev", dev])?;
        // nodad: usable at once, not after duplicate address detection.
        let v6 = format!("{}:{host}/64", l.v6);
        run_in(net, &["ip", "-6", "addr", "add", &v6, "dev", dev, "nodad"])?;
        run_in(net, &["ip", "link", "set", dev, "up"])?;
    }
    let gw4 = format!("{}.2", l.v4);
    let gw6 = format!("{}:2", l.v6);
    run_in(
        client,
        &["ip", "route", "add", "10.200.1.0/24", "via", &gw4],
    )?;
    run_in(
        client,
        &["ip", "-6", "route", "add", "fd00:201::/64", "via", &gw6],
    )?;
    // Short connections at full speed: reuse TIME_WAIT ports on the client side.
    run_in(client, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range"])?;
    Ok(())
}

impl Topology {
    pub fn build(backends: usize) -> Result<Self> {
        let client = TestNet::new(&[]);
        let reference = TestNet::new(&[]);
        let server = TestNet::new(&[]);
        link(&client, &server, &CLIENT_LINK)?;
        link(&reference, &server, &REFERENCE_LINK)?;
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for i in 1..=backends {
            let a4 = format!("10.200.1.{i}");
            run_in(
                &server,
                &["ip", "addr", "add", &format!("{a4}/32"), "dev", "lo"],
            )?;
            v4.push(format!("{a4}:{BACKEND_PORT}"));
            let a6 = format!("fd00:201::{i:x}");
            run_in(
                &server,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{a6}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ],
            )?;
            v6.push(format!("[{a6}]:{BACKEND_PORT}"));
        }
        Ok(Self {
            client,
            reference,
            server,
            backends: v4,
            backends6: v6,
        })
    }

    /// Routes the VIP ranges (both families) to the backend namespace, or removes the routes.
    pub fn route_vips(&self, on: bool) -> Result<()> {
        let verb = if on { "add" } else { "del" };
        let (gw4, gw6) = (
            format!("{}.2", CLIENT_LINK.v4),
            format!("{}:2", CLIENT_LINK.v6),
        );
        run_in(&self.client, &["ip", "route", verb, VIP_RANGE, "via", &gw4])?;
        run_in(
            &self.client,
            &["ip", "-6", "route", verb, VIP6_RANGE, "via", &gw6],
        )
        .map(|_| ())
    }
}

/// The i-th benchmark VIP: 10.96.0.0 upwards (10.97.x.x past 65,536), port 80.
pub fn vip(i: usize) -> String {
    let n = 0x0a60_0000u32 + i as u32 + 1;
    format!("{}:80", std::net::Ipv4Addr::from(n))
}

/// The i-th IPv6 VIP: fd00:96::1 upwards, port 80.
pub fn vip6(i: usize) -> String {
    let base = u128::from("fd00:96::".parse::<std::net::Ipv6Addr>().unwrap());
    format!("[{}]:80", std::net::Ipv6Addr::from(base + i as u128 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_count_up_from_one() {
        assert_eq!(vip(0), "10.96.0.1:80");
        assert_eq!(vip(65_535), "10.97.0.0:80");
        assert_eq!(vip6(0), "[fd00:96::1]:80");
        assert_eq!(vip6(255), "[fd00:96::100]:80");
    }
}
