//! The `kubernetes` source: watches Services and EndpointSlices (list, then watch from the
//! list's resourceVersion, relisting on 410 Gone, reconnecting with backoff: kube-rs's
//! `watcher`) and reports the translated services to the agent. Until every watch has finished
//! its first list, nothing is reported, so the agent keeps the pinned state; after that, a
//! broken watch leaves the last known objects in place. With a node name it also follows this
//! node's pods for the bypass annotation (`bypass_pods`), which never holds the services back.

pub mod translate;
pub mod bypass_pods;

use crate::config::KubernetesConfig;
use crate::sources::answer::MAX_REASONS;
use crate::sources::backoff::Backoff;
use crate::status::{SourceState, SourceStatus};
use bypass_pods::{BypassedPods, PodUid};
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;
use translate::{ClusterService, Options, Translation};

/// Changes arriving together (a rollout touches many slices) are translated once.
const SETTLE: Duration = Duration::from_millis(50);
/// However busy the watches are, a batch is applied this long after its first change.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(100);
/// The node label that names its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Reading this node's zone never holds the watches back for longer.
const NODE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What an event changed in the services the source yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    Nothing,
    /// These services (by name) were added, removed or changed; nothing else was.
    Services(BTreeSet<String>),
    /// The first full set: what the maps held stands in for it until now.
    All,
}

#[derive(Debug)]
pub enum KubeEvent {
    /// Every watch has listed: the complete set of services.
    Synced(Translation),
    /// The pods of this node that ask to be bypassed, once their watch has listed and after
    /// each change.
    Pods(BypassedPods),
    Error(String),
}

pub fn spawn(
    config: KubernetesConfig,
    tx: mpsc::UnboundedSender<KubeEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(config, tx))
}

async fn client(config: &KubernetesConfig) -> Result<Client, String> {
    let kube_config = match (&config.kubeconfig, &config.api_server) {
        (Some(path), _) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubernetes.kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("kubernetes.kubeconfig {}: {e}", path.display()))?
        }
        (None, Some(url)) => in_cluster_at(url)?,
        (None, None) => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration (in-cluster or ~/.kube/config): {e}")
        })?,
    };
    Client::try_from(kube_config).map_err(|e| format!("kubernetes client: {e}"))
}

/// The in-cluster service account (token, CA, namespace under
/// `/var/run/secrets/kubernetes.io/serviceaccount/`) with the API server at `url` instead of
/// `KUBERNETES_SERVICE_HOST`/`_PORT`: on a node without kube-proxy that address is the
/// `kubernetes` Service's ClusterIP, which nothing translates before this agent runs.
/// (`incluster_dns` only differs from `incluster_env` in the URL, which is replaced here; it
/// needs no environment.)
fn in_cluster_at(url: &str) -> Result<kube::Config, String> {
    let cluster_url = url
        .parse()
        .map_err(|e| format!("kubernetes.api_server {url}: {e}"))?;
    let mut config = kube::Config::incluster_dns()
        .map_err(|e| format!("kubernetes.api_server {url}: no in-cluster service account: {e}"))?;
    config.cluster_url = cluster_url;
    Ok(config)
}

/// Objects of either watched kind, so that all watches can share one loop.
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
}

/// (namespace, name)
type Key = (String, String);

/// What a watch keeps of its objects, by namespace and name.
trait Keyed {
    fn key(&self) -> Key;
}

impl Keyed for Object {
    fn key(&self) -> Key {
        let meta = match self {
            Object::Service(s) => s.meta(),
            Object::Slice(s) => s.meta(),
        };
        meta_key(meta)
    }
}

fn meta_key(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One watch's view: what is live, and what a relist in progress has collected so far.
struct View<T> {
    live: BTreeMap<Key, T>,
    relisting: Option<BTreeMap<Key, T>>,
    listed: bool,
}

impl<T> Default for View<T> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relisting: None,
            listed: false,
        }
    }
}

impl<T: Keyed> View<T> {
    fn apply(&mut self, event: Event<T>) {
        match event {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                if let Some(buffer) = &mut self.relisting {
                    buffer.insert(obj.key(), obj);
                }
            }
            // A relist replaces the whole view at once: objects deleted while the watch was
            // down disappear here.
            Event::InitDone => {
                if let Some(buffer) = self.relisting.take() {
                    self.live = buffer;
                }
                self.listed = true;
            }
            Event::Apply(obj) => {
                self.live.insert(obj.key(), obj);
            }
            Event::Delete(obj) => {
                self.live.remove(&obj.key());
            }
        }
    }
}

fn wrap<K, T>(event: Event<K>, into: impl Fn(K) -> T) -> Event<T> {
    match event {
        Event::Apply(k) => Event::Apply(into(k)),
        Event::Delete(k) => Event::Delete(into(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(into(k)),
        Event::InitDone => Event::InitDone,
    }
}

type Item = (usize, Result<Event<Object>, watcher::Error>);

fn watches(client: &Client, config: &KubernetesConfig) -> Vec<BoxStream<'static, Item>> {
    let namespaces: Vec<Option<&str>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    let mut streams = Vec::new();
    for ns in namespaces {
        let services: Api<Service> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let slices: Api<EndpointSlice> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        // With a label selector, EndpointSlices are watched with the same selector: the
        // EndpointSlice controller keeps a slice's labels equal to its Service's (all but
        // `kubernetes.io/service-name`, `endpointslice.kubernetes.io/managed-by` and
        // `service.kubernetes.io/headless`), so the API server sends the slices of the selected
        // Services only, instead of every slice of the cluster to every node. The alternatives
        // cost more: filtering here still transfers and decodes every slice; a watch per Service
        // (`kubernetes.io/service-name=<name>`) multiplies watches by Services; a set-based
        // `service-name in (...)` selector must be rewatched (relisted) whenever the set
        // changes. The catch: a Service without a Pod selector has hand-made slices (or ones
        // mirrored from Endpoints) that carry only the labels their author gave them; `stats`
        // notes a selected Service of that kind without slices. Slices of Services that are
        // not selected are ignored by `translate` in any case (the labels of a Service and its
        // slices differ for a moment after a label change).
        let mut service_config = watcher::Config::default();
        let mut slice_config = watcher::Config::default();
        if let Some(selector) = &config.label_selector {
            service_config = service_config.labels(selector);
            slice_config = slice_config.labels(selector);
        }
        let index = streams.len();
        streams.push(
            watcher(services, service_config)
                .default_backoff()
                .map(move |r| (index, r.map(|e| wrap(e, |s| Object::Service(Box::new(s))))))
                .boxed(),
        );
        streams.push(
            watcher(slices, slice_config)
                .default_backoff()
                .map(move |r| {
                    (
                        index + 1,
                        r.map(|e| wrap(e, |s| Object::Slice(Box::new(s)))),
                    )
                })
                .boxed(),
        );
    }
    streams
}

async fn run(config: KubernetesConfig, tx: mpsc::UnboundedSender<KubeEvent>) {
    let mut options = Options::new(&config, std::env::var("NODE_NAME").ok());
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(30),
        crate::clock::now_ms(),
    );
    let client = loop {
        match client(&config).await {
            Ok(client) => break client,
            Err(e) => {
                let _ = tx.send(KubeEvent::Error(e));
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    if let (None, Some(node)) = (&options.zone, &options.node_name) {
        options.zone = node_zone(&client, node).await;
    }
    let pods = bypass_pods::follow(client.clone(), options.node_name.clone(), tx.clone());
    tokio::join!(follow_services(&client, &config, &options, &tx), pods);
}

/// Lists and watches Services and EndpointSlices, and sends the translated set once every
/// watch has listed and after each batch of changes.
async fn follow_services(
    client: &Client,
    config: &KubernetesConfig,
    options: &Options,
    tx: &mpsc::UnboundedSender<KubeEvent>,
) {
    let streams = watches(client, config);
    let mut views: Vec<View<Object>> = streams.iter().map(|_| View::default()).collect();
    let mut merged = stream::select_all(streams);
    while let Some(batch) = next_batch(&mut merged, SETTLE, MAX_BATCH_WAIT).await {
        let mut changed = false;
        for (index, result) in batch {
            match result {
                Ok(event) => {
                    views[index].apply(event);
                    changed = true;
                }
                Err(e) => {
                    let _ = tx.send(KubeEvent::Error(format!("watch: {e}")));
                }
            }
        }
        if changed && views.iter().all(|v| v.listed) {
            let services = views
                .iter()
                .flat_map(|v| v.live.values())
                .filter_map(|o| match o {
                    Object::Service(s) => Some(s.as_ref()),
                    Object::Slice(_) => None,
                });
            let slices = views
                .iter()
                .flat_map(|v| v.live.values())
                .filter_map(|o| match o {
                    Object::Slice(s) => Some(s.as_ref()),
                    Object::Service(_) => None,
                });
            let _ = tx.send(KubeEvent::Synced(translate::translate(
                services, slices, options,
            )));
        }
    }
}

/// This node's `topology.kubernetes.io/zone` label, read once per watch start (`get` on
/// nodes). Without it zone hints are not used, which is always safe: every endpoint serves.
async fn node_zone(client: &Client, node: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    match tokio::time::timeout(NODE_READ_TIMEOUT, nodes.get(node)).await {
        Ok(Ok(n)) => {
            let zone = n
                .labels()
                .get(ZONE_LABEL)
                .filter(|z| !z.is_empty())
                .cloned();
            tracing::info!(node, zone = ?zone, "this node's zone (for topology hints)");
            zone
        }
        Ok(Err(e)) => {
            tracing::warn!(
                node,
                "cannot read this node's zone label, zone hints unused: {e}"
            );
            None
        }
        Err(_) => {
            tracing::warn!(
                node,
                "reading this node's zone label timed out, zone hints unused"
            );
            None
        }
    }
}

/// The next batch of items: the first one, then everything that follows within `settle` of
/// the one before, but never past `max_wait` after the first, so that steady churn (events
/// less than `settle` apart) still gets applied. `None` when the stream has ended.
async fn next_batch<S, T>(stream: &mut S, settle: Duration, max_wait: Duration) -> Option<Vec<T>>
where
    S: futures::Stream<Item = T> + Unpin,
{
    let first = stream.next().await?;
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut batch = vec![first];
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(settle.min(left), stream.next()).await {
            Ok(Some(item)) => batch.push(item),
            Ok(None) | Err(_) => return Some(batch),
        }
    }
}

/// The agent's side of the source: the task, the last full set of services and its state.
pub struct Kubernetes {
    tx: mpsc::UnboundedSender<KubeEvent>,
    running: Option<(KubernetesConfig, tokio::task::JoinHandle<()>)>,
    /// `None` until the running watch has synced once.
    services: Option<Vec<ClusterService>>,
    /// Where each of `services` is, by name.
    by_name: HashMap<String, usize>,
    notes: Vec<String>,
    pub status: SourceStatus,
    /// The last pods of this node the watch reported as asking to be bypassed; kept while a
    /// restarted watch lists again, so a bypassed pod is not translated in between.
    bypassed_pods: BypassedPods,
    /// `bypassed_pods` changed since `take_pods_changed` was last asked.
    pods_changed: bool,
}

impl Kubernetes {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<KubeEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let k = Self {
            tx,
            running: None,
            services: None,
            by_name: HashMap::new(),
            notes: Vec::new(),
            status: SourceStatus::default(),
            bypassed_pods: BypassedPods::new(),
            pods_changed: false,
        };
        (k, rx)
    }

    /// Starts, restarts (settings changed) or stops the watch to match the config. A restarted
    /// watch reports nothing until it has listed again, and meanwhile the pinned state stays.
    pub fn sync(&mut self, config: Option<&KubernetesConfig>) {
        if self.running.as_ref().map(|(c, _)| c) == config {
            return;
        }
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
        self.services = None;
        self.status = SourceStatus::default();
        if config.is_none() && !self.bypassed_pods.is_empty() {
            self.bypassed_pods.clear();
            self.pods_changed = true;
        }
        if let Some(config) = config {
            tracing::info!(namespaces = ?config.namespaces, selector = ?config.label_selector, "kubernetes watch started");
            self.status.kind = "kubernetes".into();
            self.status.target = if config.namespaces.is_empty() {
                "all namespaces".into()
            } else {
                config.namespaces.join(",")
            };
            self.status.state = SourceState::Syncing;
            self.running = Some((config.clone(), spawn(config.clone(), self.tx.clone())));
        }
    }

    /// `None`: not configured; `Some(None)`: not synced yet.
    pub fn services(&self) -> Option<Option<&[ClusterService]>> {
        self.running.as_ref().map(|_| self.services.as_deref())
    }

    /// The service of that name, once synced.
    pub fn service(&self, name: &str) -> Option<&ClusterService> {
        let services = self.services.as_ref()?;
        self.by_name.get(name).map(|&i| &services[i])
    }

    pub fn is_synced(&self) -> bool {
        self.running.is_none() || self.services.is_some()
    }

    /// This node's pods annotated to be bypassed: their uid and `namespace/name`.
    pub fn bypassed_pods(&self) -> &BTreeMap<PodUid, String> {
        &self.bypassed_pods
    }

    /// Whether `bypassed_pods` changed since the last call.
    pub fn take_pods_changed(&mut self) -> bool {
        std::mem::take(&mut self.pods_changed)
    }

    /// Records an event; says which of the services it changed.
    pub fn apply(&mut self, event: KubeEvent) -> Changed {
        let status = &mut self.status;
        match event {
            KubeEvent::Error(error) => {
                tracing::warn!(
                    source = "kubernetes",
                    "watch failed, keeping the last known services: {error}"
                );
                status.record_error(error, self.services.is_some());
                Changed::Nothing
            }
            KubeEvent::Pods(pods) => {
                if pods != self.bypassed_pods {
                    self.bypassed_pods = pods;
                    self.pods_changed = true;
                }
                Changed::Nothing
            }
            KubeEvent::Synced(t) => {
                if status.state != SourceState::Ok {
                    tracing::info!(
                        source = "kubernetes",
                        services = t.services.len(),
                        "kubernetes in sync"
                    );
                }
                let reasons = t.notes.iter().take(MAX_REASONS).cloned().collect();
                status.record_answer(t.services.len(), t.notes.len(), reasons);
                if t.limits != status.limits {
                    for hit in t.limits.iter().filter(|h| h.left_out > 0) {
                        tracing::warn!(
                            source = "kubernetes",
                            "{} = {} leaves out {}: {}",
                            hit.setting,
                            hit.limit,
                            hit.left_out,
                            hit.examples.join(", ")
                        );
                    }
                    status.limits = t.limits;
                }
                if t.notes != self.notes {
                    for note in &t.notes {
                        tracing::info!(source = "kubernetes", "{note}");
                    }
                    self.notes = t.notes;
                }
                let by_name: HashMap<String, usize> = (t.services.iter().enumerate())
                    .map(|(i, s)| (s.name.clone(), i))
                    .collect();
                // Names are unique but for a hash collision of two very long ones; the
                // comparison by name needs them unique on both sides.
                let unique = |n: &HashMap<String, usize>, s: &[ClusterService]| n.len() == s.len();
                let changed = match &self.services {
                    Some(before)
                        if unique(&self.by_name, before) && unique(&by_name, &t.services) =>
                    {
                        changed_names(before, &self.by_name, &t.services, &by_name)
                    }
                    _ => Changed::All,
                };
                self.by_name = by_name;
                self.services = Some(t.services);
                changed
            }
        }
    }
}

/// The services added, removed or changed from `before` to `after` (each indexed by name:
/// `at`, `after_at`). Every batch carries the whole set, so this compares them all, but only
/// the differences go on to be planned.
fn changed_names(
    before: &[ClusterService],
    at: &HashMap<String, usize>,
    after: &[ClusterService],
    after_at: &HashMap<String, usize>,
) -> Changed {
    let mut names = BTreeSet::new();
    let mut kept = 0;
    for service in after {
        let was = at.get(&service.name).map(|&i| &before[i]);
        kept += usize::from(was.is_some());
        if was != Some(service) {
            names.insert(service.name.clone());
        }
    }
    // Names are unique on both sides, so fewer kept than there were means some went.
    if kept < before.len() {
        names.extend(
            (before.iter())
                .filter(|s| !after_at.contains_key(&s.name))
                .map(|s| s.name.clone()),
        );
    }
    if names.is_empty() {
        Changed::Nothing
    } else {
        Changed::Services(names)
    }
}

impl Drop for Kubernetes {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.running {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, Balancing, Protocol};

    fn cluster(name: &str, backends: &[&str]) -> ClusterService {
        ClusterService {
            name: name.to_owned(),
            vip: "10.96.0.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: (backends.iter())
                .map(|b| BackendConfig {
                    address: b.parse().unwrap(),
                    weight: 1,
                })
                .collect(),
            balancing: Balancing::default(),
        }
    }

    fn synced(k: &mut Kubernetes, services: Vec<ClusterService>) -> Changed {
        k.apply(KubeEvent::Synced(Translation {
            services,
            ..Default::default()
        }))
    }

    #[test]
    fn a_batch_names_only_the_services_it_changed() {
        let (mut k, _rx) = Kubernetes::new();
        let a = || cluster("ns.a.80", &["10.0.0.1:80"]);
        let b = || cluster("ns.b.80", &["10.0.0.2:80"]);
        let names = |n: &[&str]| Changed::Services(n.iter().map(|s| s.to_string()).collect());
        assert_eq!(synced(&mut k, vec![a(), b()]), Changed::All);
        assert_eq!(synced(&mut k, vec![b(), a()]), Changed::Nothing);
        let b2 = cluster("ns.b.80", &["10.0.0.2:80", "10.0.0.3:80"]);
        assert_eq!(synced(&mut k, vec![a(), b2.clone()]), names(&["ns.b.80"]));
        assert_eq!(k.service("ns.b.80"), Some(&b2));
        let c = cluster("ns.c.80", &[]);
        assert_eq!(
            synced(&mut k, vec![c.clone(), b2]),
            names(&["ns.a.80", "ns.c.80"])
        );
        assert_eq!(k.service("ns.a.80"), None);
        assert_eq!(k.service("ns.c.80"), Some(&c));
        // Two services of one name (a collision of hashed long names): compared as a whole.
        assert_eq!(synced(&mut k, vec![c.clone(), c]), Changed::All);
    }

    #[tokio::test]
    async fn steady_churn_is_batched_but_never_held_back() {
        // An event every 10 ms for 2 s: always within SETTLE of the previous one.
        let ticks = stream_of(200, Duration::from_millis(10));
        tokio::pin!(ticks);
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut ticks, SETTLE, MAX_BATCH_WAIT)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(batch.len() > 1, "events close together were not batched");
        assert!(
            batch.len() < 100 && took < Duration::from_secs(1),
            "{} events held back for {took:?}",
            batch.len()
        );
        let rest = next_batch(&mut ticks, SETTLE, MAX_BATCH_WAIT)
            .await
            .unwrap();
        assert_eq!(rest[0], batch.len(), "an event was lost between batches");
    }

    #[tokio::test]
    async fn api_server_goes_with_the_in_cluster_service_account_only() {
        if std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount").exists() {
            return; // in a pod: the account exists, so this cannot fail as below
        }
        let text = "[kubernetes]\napi_server = \"https://10.0.0.1:6443\"\n";
        let config = crate::config::parse(text, "t").unwrap().kubernetes.unwrap();
        // Not kube's inference ($KUBECONFIG, ~/.kube/config): the service account or nothing.
        let e = client(&config)
            .await
            .err()
            .expect("no service account here");
        assert!(
            e.starts_with(
                "kubernetes.api_server https://10.0.0.1:6443: no in-cluster service account"
            ),
            "{e}"
        );
    }

    fn stream_of(n: usize, every: Duration) -> impl futures::Stream<Item = usize> {
        futures::stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((i, i + 1))
        })
    }
}
