//! `kind = "dns"`: A/AAAA records (every address on the configured port) or SRV records
//! (target, port and weight each), asked again when the answer's TTL runs out, within the
//! configured refresh bounds.

use super::answer::{self, Answer, Reported};
use super::Poll;
use crate::config::{DnsConfig, DnsRecord, MAX_WEIGHT};
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub struct Resolver {
    config: DnsConfig,
    allow_loopback: bool,
    /// Built on first use, so that an unreadable resolv.conf is a source error, retried.
    resolver: Option<TokioResolver>,
}

impl Resolver {
    pub fn new(config: DnsConfig, allow_loopback: bool) -> Self {
        Self {
            config,
            allow_loopback,
            resolver: None,
        }
    }

    fn resolver(&mut self) -> Result<&TokioResolver, String> {
        if self.resolver.is_none() {
            self.resolver = Some(build(&self.config)?);
        }
        Ok(self.resolver.as_ref().expect("just built"))
    }

    async fn resolve(&mut self) -> Result<(Answer, Instant), String> {
        let config = self.config.clone();
        let allow_loopback = self.allow_loopback;
        let resolver = self.resolver()?;
        match config.record {
            DnsRecord::Address { port } => {
                let (ips, valid_until) = addresses(resolver, &config.name).await?;
                let reported = ips.into_iter().map(|ip| Reported {
                    ip,
                    port,
                    weight: 1,
                });
                let answer = answer::build(reported, Answer::default(), allow_loopback)?;
                Ok((answer, valid_until))
            }
            DnsRecord::Srv => srv(resolver, &config.name, allow_loopback).await,
        }
    }
}

impl Poll for Resolver {
    async fn poll(&mut self) -> Result<(Answer, Duration), String> {
        let (min, max) = (self.config.min_refresh, self.config.max_refresh);
        match self.resolve().await {
            Ok((answer, valid_until)) => {
                let ttl = valid_until.saturating_duration_since(Instant::now());
                Ok((answer, ttl.clamp(min, max)))
            }
            Err(e) => {
                // A resolver that failed may hold a broken connection: start clean next time.
                self.resolver = None;
                Err(e)
            }
        }
    }
}

fn build(config: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?
    } else {
        let servers: Vec<NameServerConfig> = config
            .nameservers
            .iter()
            .flat_map(|&addr| {
                // TCP as well, for answers too large for one datagram.
                [Protocol::Udp, Protocol::Tcp].map(|p| NameServerConfig::new(addr, p))
            })
            .collect();
        let group = NameServerConfigGroup::from(servers);
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            TokioConnectionProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.timeout = config.timeout;
    opts.attempts = 2;
    // Every query must reach the server: refresh timing is ours (TTL clamped to the bounds),
    // and a cached answer would hide changes when max_refresh is below the TTL.
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(builder.build())
}

/// "No such name" and "no records of that type" are answers (no instances); anything else
/// (timeout, refused, server failure) is an error.
fn is_empty_answer(e: &ResolveError) -> bool {
    e.is_no_records_found()
}

async fn addresses(
    resolver: &TokioResolver,
    name: &str,
) -> Result<(Vec<std::net::IpAddr>, Instant), String> {
    match resolver.lookup_ip(name).await {
        Ok(lookup) => Ok((lookup.iter().collect(), lookup.valid_until())),
        Err(e) if is_empty_answer(&e) => Ok((Vec::new(), Instant::now())),
        Err(e) => Err(format!("resolving {name}: {e}")),
    }
}

/// Uses the SRV records of the lowest priority value only (RFC 2782: higher values are
/// fallbacks), resolving each target to its addresses.
async fn srv(
    resolver: &TokioResolver,
    name: &str,
    allow_loopback: bool,
) -> Result<(Answer, Instant), String> {
    let lookup = match resolver.srv_lookup(name).await {
        Ok(lookup) => lookup,
        Err(e) if is_empty_answer(&e) => return Ok((Answer::default(), Instant::now())),
        Err(e) => return Err(format!("resolving SRV {name}: {e}")),
    };
    let mut valid_until = lookup.as_lookup().valid_until();
    let best = lookup.iter().map(|r| r.priority()).min();
    // Target -> (port, weight) list; a target may serve on several ports.
    let mut targets: BTreeMap<String, Vec<(u16, u32)>> = BTreeMap::new();
    for record in lookup.iter().filter(|r| Some(r.priority()) == best) {
        // SRV weight 0 means "rarely"; ours must be at least 1.
        let weight = u32::from(record.weight()).clamp(1, MAX_WEIGHT);
        targets
            .entry(record.target().to_ascii())
            .or_default()
            .push((record.port(), weight));
    }
    let mut answer = Answer::default();
    let mut reported = Vec::new();
    for (target, ports) in targets {
        let (ips, until) = addresses(resolver, &target).await?;
        valid_until = valid_until.min(until);
        if ips.is_empty() {
            answer.skip(format!("SRV target {target} has no addresses"));
        }
        for ip in ips {
            for &(port, weight) in &ports {
                reported.push(Reported { ip, port, weight });
            }
        }
    }
    Ok((
        answer::build(reported, answer, allow_loopback)?,
        valid_until,
    ))
}
