//! One cluster's connection and watch, shared by its member services: list each member's
//! prefix, watch the prefix roots from the first list's revision on one watch stream, and hand
//! each change to the members whose prefix the key starts with. Each member reports its own
//! answer, as if it had a watch of its own.
//!
//! No change between list and watch is missed: the watch starts right after the first list's
//! revision, which no later list precedes, and a member ignores events up to the revision its
//! own prefix was listed at (already in what it listed). The same rule lets a service join a
//! running watch: its prefix is listed and the events after that list are its own.

use super::members::{covered, roots, ClusterKey, Demux, Member, Members};
use super::registrations::{to_answer, within_caps, MAX_KEYS};
use crate::clock::now_ms;
use crate::config::EtcdConfig;
use crate::private_files::{read_bounded_text, CERTIFICATE_LIMIT};
use crate::sources::backoff::Backoff;
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchResponse, WatchStream,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often an idle connection is checked, so that a vanished server is noticed even
/// without a closed connection.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// etcd's watch event types (mvccpb.Event.EventType).
const PUT: i32 = 0;
const DELETE: i32 = 1;

/// Why a session with etcd ended.
enum End {
    /// The watch can no longer continue (compaction, cancel, a prefix outside the watched
    /// roots): list again at once, on the same connection.
    Relist(String),
    /// etcd failed: every member is told, and the cluster reconnects after a backoff.
    Failed(String),
}

/// Runs a cluster until its task is aborted (its last member left). `members` follows the
/// config: services joining and leaving the cluster.
pub async fn run(cluster: ClusterKey, mut members: watch::Receiver<Members>) {
    let seed = now_ms() ^ cluster.etcd.endpoints.len() as u64;
    let mut backoff = Backoff::new(cluster.retry_initial, cluster.retry_max, seed);
    let mut client = None;
    loop {
        match session(&cluster, &mut client, &mut members, &mut backoff).await {
            End::Relist(why) => {
                tracing::info!(endpoints = %cluster.etcd.endpoints.join(","), "etcd watch restarts with a new list: {why}")
            }
            End::Failed(error) => {
                client = None;
                for member in members.borrow().values() {
                    member.reporter.error(error.clone());
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn session(
    cluster: &ClusterKey,
    client: &mut Option<Client>,
    members: &mut watch::Receiver<Members>,
    backoff: &mut Backoff,
) -> End {
    let client = match client {
        Some(client) => client,
        None => match within(cluster.etcd.timeout, "connect", connect(&cluster.etcd)).await {
            Ok(Ok(connected)) => client.insert(connected),
            Ok(Err(end)) | Err(end) => return end,
        },
    };
    match watch(cluster, client.clone(), members, backoff).await {
        Ok(end) | Err(end) => end,
    }
}

async fn watch(
    cluster: &ClusterKey,
    client: Client,
    members: &mut watch::Receiver<Members>,
    backoff: &mut Backoff,
) -> Result<End, End> {
    let wanted = members.borrow_and_update().clone();
    let mut shared = Shared::new(cluster, client);
    let mut first = None;
    for (service, member) in &wanted {
        let revision = shared.join(service, member).await?;
        first.get_or_insert(revision);
    }
    let Some(first) = first else {
        // The task is aborted once its last member leaves; until then there is nothing to read.
        return members
            .changed()
            .await
            .map(|_| End::Relist("the first members joined".into()))
            .map_err(|_| End::Failed("the cluster's members are gone".into()));
    };
    backoff.reset();
    let watched = roots(wanted.values().map(|m| m.prefix.as_str()));
    let mut stream = shared.watch(&watched, first + 1).await?;
    tracing::info!(endpoints = %cluster.etcd.endpoints.join(","), services = wanted.len(),
                   roots = %watched.join(","), "etcd services share one connection and watch");
    loop {
        let retry_at = shared.next_retry();
        tokio::select! {
            message = stream.message() => {
                let response = message
                    .map_err(failed("watch"))?
                    .ok_or_else(|| End::Failed("watch stream closed by the server".into()))?;
                shared.changes(&response)?;
            }
            changed = members.changed() => {
                if changed.is_err() {
                    return Err(End::Failed("the cluster's members are gone".into()));
                }
                let wanted = members.borrow_and_update().clone();
                if let Some(outside) = wanted.values().find(|m| !covered(&watched, &m.prefix)) {
                    return Ok(End::Relist(format!(
                        "prefix {} is outside the watched roots {}",
                        outside.prefix,
                        watched.join(",")
                    )));
                }
                shared.follow(&wanted).await?;
            }
            _ = sleep_until(retry_at) => shared.retry_due().await?,
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A member service as the session keeps it.
struct Tracked {
    member: Member,
    /// The revision its prefix was listed at: events up to it are already in `keys`.
    listed_at: i64,
    keys: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A member whose keys could not be used (over the caps, too many instances): its keys are
/// dropped and its prefix listed again after its own backoff, while the others go on.
struct Waiting {
    member: Member,
    at: Instant,
    backoff: Backoff,
}

struct Shared<'a> {
    cluster: &'a ClusterKey,
    client: Client,
    tracked: BTreeMap<String, Tracked>,
    waiting: BTreeMap<String, Waiting>,
    /// Backoffs of members that failed, kept across their relist until one succeeds.
    backoffs: HashMap<String, Backoff>,
    demux: Demux,
}

impl<'a> Shared<'a> {
    fn new(cluster: &'a ClusterKey, client: Client) -> Self {
        Self {
            cluster,
            client,
            tracked: BTreeMap::new(),
            waiting: BTreeMap::new(),
            backoffs: HashMap::new(),
            demux: Demux::default(),
        }
    }

    /// Lists a member's prefix, reports its answer and follows it from then on; the list's
    /// revision.
    async fn join(&mut self, service: &str, member: &Member) -> Result<i64, End> {
        let timeout = self.cluster.etcd.timeout;
        let options = GetOptions::new()
            .with_prefix()
            .with_limit(MAX_KEYS as i64 + 1);
        let list = within(
            timeout,
            "list",
            self.client.get(member.prefix.as_str(), Some(options)),
        )
        .await?
        .map_err(failed("list"))?;
        let revision = list
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| End::Failed("list answer has no header".into()))?;
        let keys = list
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        let tracked = Tracked {
            member: member.clone(),
            listed_at: revision,
            keys,
        };
        self.demux.insert(service, &member.prefix);
        self.tracked.insert(service.to_owned(), tracked);
        self.report(service);
        Ok(revision)
    }

    /// One watch stream with a watch per root, all from `start`.
    async fn watch(&mut self, roots: &[String], start: i64) -> Result<WatchStream, End> {
        let options = || Some(WatchOptions::new().with_prefix().with_start_revision(start));
        let timeout = self.cluster.etcd.timeout;
        let (first, rest) = roots
            .split_first()
            .ok_or_else(|| End::Failed("no prefix to watch".into()))?;
        let mut stream = within(
            timeout,
            "watch",
            self.client.watch(first.as_str(), options()),
        )
        .await?
        .map_err(failed("watch"))?;
        for root in rest {
            within(timeout, "watch", stream.watch(root.as_str(), options()))
                .await?
                .map_err(failed("watch"))?;
        }
        Ok(stream)
    }

    /// Applies a watch response to the members whose keys it changes, and reports them.
    fn changes(&mut self, response: &WatchResponse) -> Result<(), End> {
        if response.canceled() || response.compact_revision() > 0 {
            return Err(End::Relist(format!(
                "watch canceled ({:?}, compacted at revision {})",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        let mut touched: Vec<String> = Vec::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let kind = event.0.r#type;
            if kind != PUT && kind != DELETE {
                return Err(End::Failed(format!("watch event of unknown type {kind}")));
            }
            for service in self.demux.owners(kv.key()) {
                let Some(tracked) = self.tracked.get_mut(service) else {
                    continue;
                };
                if kv.mod_revision() <= tracked.listed_at {
                    continue;
                }
                if kind == PUT {
                    tracked.keys.insert(kv.key().to_vec(), kv.value().to_vec());
                } else {
                    tracked.keys.remove(kv.key());
                }
                touched.push(service.clone());
            }
        }
        touched.sort();
        touched.dedup();
        for service in touched {
            self.report(&service);
        }
        Ok(())
    }

    /// Reports a member's answer; one whose keys cannot be used waits for a relist instead.
    fn report(&mut self, service: &str) {
        let Some(tracked) = self.tracked.get(service) else {
            return;
        };
        let member = &tracked.member;
        let answer = within_caps(&tracked.keys)
            .and_then(|()| to_answer(&member.prefix, &tracked.keys, member.allow_loopback));
        match answer {
            Ok(answer) => {
                member.reporter.answer(answer);
                self.backoffs.remove(service);
            }
            Err(error) => {
                member.reporter.error(error);
                let Some(tracked) = self.tracked.remove(service) else {
                    return;
                };
                self.demux.remove(service, &tracked.member.prefix);
                let cluster = self.cluster;
                let mut backoff = self.backoffs.remove(service).unwrap_or_else(|| {
                    let seed = now_ms() ^ tracked.member.reporter.generation;
                    Backoff::new(cluster.retry_initial, cluster.retry_max, seed)
                });
                let at = Instant::now() + backoff.next_delay();
                let waiting = Waiting {
                    member: tracked.member,
                    at,
                    backoff,
                };
                self.waiting.insert(service.to_owned(), waiting);
            }
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.waiting.values().map(|w| w.at).min()
    }

    /// Lists again the members whose wait is over.
    async fn retry_due(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for service in due {
            if let Some(waiting) = self.waiting.remove(&service) {
                self.backoffs.insert(service.clone(), waiting.backoff);
                self.join(&service, &waiting.member).await?;
            }
        }
        Ok(())
    }

    /// Follows a change of membership within the watched roots: members that left (or were
    /// restarted) are dropped, new ones listed and joined; the others are not read again.
    async fn follow(&mut self, wanted: &Members) -> Result<(), End> {
        let stays = |service: &String, member: &Member| wanted.get(service) == Some(member);
        let demux = &mut self.demux;
        self.tracked.retain(|s, t| {
            let keep = stays(s, &t.member);
            if !keep {
                demux.remove(s, &t.member.prefix);
            }
            keep
        });
        self.waiting.retain(|s, w| stays(s, &w.member));
        self.backoffs.retain(|s, _| wanted.contains_key(s.as_str()));
        for (service, member) in wanted {
            if !self.tracked.contains_key(service) && !self.waiting.contains_key(service) {
                self.join(service, member).await?;
            }
        }
        Ok(())
    }
}

fn failed(what: &'static str) -> impl Fn(etcd_client::Error) -> End {
    move |e| End::Failed(format!("{what}: {e}"))
}

async fn within<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, End> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| End::Failed(format!("{what}: no answer within {limit:?}")))
}

async fn connect(config: &EtcdConfig) -> Result<Client, End> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.timeout)
        .with_timeout(config.timeout)
        .with_keep_alive(KEEP_ALIVE, config.timeout);
    if let Some(user) = &config.username {
        // Read at each connect so that a rotated password is picked up.
        let password = match &config.password_file {
            Some(path) => read(path, "password_file")?.trim().to_owned(),
            None => std::env::var("ETCD_PASSWORD").unwrap_or_default(),
        };
        options = options.with_user(user, password);
    }
    if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "ca_file")?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "cert_file")?,
                read(key, "key_file")?,
            ));
        }
        options = options.with_tls(tls);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| End::Failed(format!("connect {}: {e}", config.endpoints.join(","))))
}

fn read(path: &std::path::Path, field: &str) -> Result<String, End> {
    read_bounded_text(path, CERTIFICATE_LIMIT, &format!("discovery.{field}")).map_err(End::Failed)
}
