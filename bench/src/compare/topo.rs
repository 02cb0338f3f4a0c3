//! The benchmark's network: a backend namespace, and one client namespace per contender, each
//! joined to the backend namespace by its own veth pair; no other interface and no route out.
//! Backends live on 10.200.1.x and fd00:201::x in the backend namespace. With a namespace
//! (and a client cgroup) each, contenders do not see each other's rules or programs, so all
//! can stay installed while their runs alternate. Nothing is attached to the host's network.

use anyhow::{bail, Context, Result};
use lb_testkit::paths::testkit_bin;
use lb_testkit::{TestCgroup, TestNet};
use std::process::Command;

pub const BACKEND_PORT: u16 = 8080;
/// Where untranslated VIP traffic goes while a DNAT contender needs a route: to the backend
/// namespace, which does not forward and so drops it.
pub const VIP_RANGE: &str = "10.96.0.0/15";
pub const VIP6_RANGE: &str = "fd00:96::/64";

/// One contender's side: its client namespace (10.200.(10+k).1 and fd00:200:k::1 on the veth,
/// the backend namespace's end .2 and ::2) and the cgroup its clients run in.
pub struct ClientSide {
    pub net: TestNet,
    pub cgroup: TestCgroup,
    gw4: String,
    gw6: String,
}

pub struct Topology {
    pub server: TestNet,
    /// One per contender, in `Contender::ALL`'s order.
    pub clients: Vec<ClientSide>,
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

/// The `k`-th client namespace, joined to `server` by a veth pair with both address
/// families, with its routes to the backends and its sysctls.
fn client_side(server: &TestNet, k: usize) -> Result<ClientSide> {
    let net = TestNet::new(&[]);
    // Short unique names (15 bytes max); the pair disappears with the namespaces.
    let id = std::process::id() % 100_000;
    let (c, s) = (format!("lbc{k}x{id}"), format!("lbs{k}x{id}"));
    ip(&["link", "add", &c, "type", "veth", "peer", "name", &s])?;
    let moved = ip(&["link", "set", &c, "netns", holder_pid(&net)?])
        .and_then(|_| ip(&["link", "set", &s, "netns", holder_pid(server)?]));
    if let Err(e) = moved {
        // Whatever end is still in the host namespace takes its peer with it.
        let _ = Command::new("ip").args(["link", "del", &c]).status();
        let _ = Command::new("ip").args(["link", "del", &s]).status();
        return Err(e);
    }
    let (v4, v6) = (format!("10.200.{}", 10 + k), format!("fd00:200:{k:x}:"));
    for (ns, dev, host) in [(&net, &c, 1), (server, &s, 2)] {
        let a4 = format!("{v4}.{host}/24");
        run_in(ns, &["ip", "addr", "add", &a4, "dev", dev])?;
        // nodad: usable at once, not after duplicate address detection.
        let a6 = format!("{v6}:{host}/64");
        run_in(ns, &["ip", "-6", "addr", "add", &a6, "dev", dev, "nodad"])?;
        run_in(ns, &["ip", "link", "set", dev, "up"])?;
    }
    let (gw4, gw6) = (format!("{v4}.2"), format!("{v6}:2"));
    run_in(&net, &["ip", "route", "add", "10.200.1.0/24", "via", &gw4])?;
    run_in(
        &net,
        &["ip", "-6", "route", "add", "fd00:201::/64", "via", &gw6],
    )?;
    // Short connections at full speed: reuse TIME_WAIT ports on the client side.
    run_in(&net, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range"])?;
    Ok(ClientSide {
        net,
        cgroup: TestCgroup::new(),
        gw4,
        gw6,
    })
}

impl ClientSide {
    /// Routes the VIP ranges (both families) to the backend namespace, or removes the routes.
    pub fn route_vips(&self, on: bool) -> Result<()> {
        let verb = if on { "add" } else { "del" };
        run_in(
            &self.net,
            &["ip", "route", verb, VIP_RANGE, "via", &self.gw4],
        )?;
        run_in(
            &self.net,
            &["ip", "-6", "route", verb, VIP6_RANGE, "via", &self.gw6],
        )
        .map(|_| ())
    }
}

impl Topology {
    pub fn build(backends: usize, clients: usize) -> Result<Self> {
        let server = TestNet::new(&[]);
        let mut sides = Vec::new();
        for k in 0..clients {
            sides.push(client_side(&server, k)?);
        }
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
            server,
            clients: sides,
            backends: v4,
            backends6: v6,
        })
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
