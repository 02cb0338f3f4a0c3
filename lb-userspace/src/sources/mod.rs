//! Discovery sources: one task per discovered service asks its source (DNS, Consul), one task
//! per etcd cluster reads for all the services it serves (`etcd`), and they report answers and
//! errors per service; `Discovery` keeps the last good answer of each service and its
//! source's state. The catalog merges those answers into the config and sends the result
//! down the same reconcile path as a static config.
//!
//! A failing source never empties a service: an error only changes the state shown in `stats`
//! and is retried with backoff. Only a successful answer, including an empty one, replaces the
//! set.

pub mod answer;
pub mod backoff;
pub mod consul;
mod dns;
pub mod etcd;
pub mod kubernetes;

use crate::clock::now_ms;
use crate::config::{BackendConfig, Config, DiscoveryConfig, SourceConfig};
use crate::status::{SourceState, SourceStatus};
use answer::Answer;
use backoff::Backoff;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// What a source task tells the agent.
#[derive(Debug)]
pub enum Event {
    Answer(Answer),
    Error(String),
}

#[derive(Debug)]
pub struct Update {
    service: String,
    /// Tells a stopped task's late message from its replacement's.
    generation: u64,
    event: Event,
}

impl Update {
    /// The service whose source sent it.
    pub fn service(&self) -> &str {
        &self.service
    }
}

/// A source task's channel to the agent, labelled with the service it discovers.
#[derive(Clone)]
pub struct Reporter {
    service: String,
    generation: u64,
    tx: mpsc::UnboundedSender<Update>,
}

impl Reporter {
    fn send(&self, event: Event) {
        // The receiver only goes away when the agent exits.
        let _ = self.tx.send(Update {
            service: self.service.clone(),
            generation: self.generation,
            event,
        });
    }

    pub fn answer(&self, answer: Answer) {
        self.send(Event::Answer(answer));
    }

    pub fn error(&self, error: impl Into<String>) {
        self.send(Event::Error(error.into()));
    }
}

struct Running {
    config: DiscoveryConfig,
    reporter: Reporter,
    /// `None` for an etcd service: it is a member of its cluster's task (`Discovery::etcd`).
    task: Option<JoinHandle<()>>,
}

struct Known {
    status: SourceStatus,
    /// The last good answer; `None` until the source first answers.
    backends: Option<Vec<BackendConfig>>,
}

pub struct Discovery {
    tx: mpsc::UnboundedSender<Update>,
    running: HashMap<String, Running>,
    etcd: etcd::Clusters,
    known: BTreeMap<String, Known>,
    next_generation: u64,
}

impl Discovery {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Update>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let discovery = Self {
            tx,
            running: HashMap::new(),
            etcd: etcd::Clusters::default(),
            known: BTreeMap::new(),
            next_generation: 0,
        };
        (discovery, rx)
    }

    /// Starts tasks for new discovered services, restarts those whose source settings changed
    /// and stops the rest. A restarted source keeps serving its last set until it answers.
    pub fn sync(&mut self, config: &Config) {
        let wanted: HashMap<&str, &DiscoveryConfig> = config
            .services
            .iter()
            .filter_map(|s| s.discovery.as_deref().map(|d| (&*s.name, d)))
            .collect();
        self.running.retain(|name, running| {
            let keep = wanted.get(name.as_str()) == Some(&&running.config);
            if let (false, Some(task)) = (keep, &running.task) {
                task.abort();
            }
            keep
        });
        self.known
            .retain(|name, _| wanted.contains_key(name.as_str()));
        for (name, config) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            self.next_generation += 1;
            let reporter = Reporter {
                service: name.to_owned(),
                generation: self.next_generation,
                tx: self.tx.clone(),
            };
            let known = self.known.entry(name.to_owned()).or_insert_with(|| Known {
                status: SourceStatus::default(),
                backends: None,
            });
            known.status.kind = config.source.kind().to_owned();
            known.status.target = config.source.target();
            known.status.state = SourceState::Syncing;
            known.status.consecutive_errors = 0;
            info!(service = name, source = config.source.kind(), target = %config.source.target(), "discovery started");
            let task = start(config, &reporter);
            let running = Running {
                config: config.clone(),
                reporter,
                task,
            };
            self.running.insert(name.to_owned(), running);
        }
        self.etcd
            .sync(self.running.iter().filter_map(|(name, running)| {
                let (cluster, member) = etcd::membership(&running.config, &running.reporter)?;
                Some((name.clone(), cluster, member))
            }));
    }

    /// Records a task's message; true when the service's backend set changed.
    pub fn apply(&mut self, update: Update) -> bool {
        let current = self
            .running
            .get(&update.service)
            .map(|r| r.reporter.generation);
        if current != Some(update.generation) {
            return false;
        }
        let Some(known) = self.known.get_mut(&update.service) else {
            return false;
        };
        let status = &mut known.status;
        let (service, kind, target) = (&update.service, status.kind.clone(), status.target.clone());
        match update.event {
            Event::Error(error) => {
                let kept = known.backends.as_ref().map_or(0, Vec::len);
                warn!(service = %service, source = %kind, target = %target, kept_backends = kept,
                      "discovery failed, keeping the last known set: {error}");
                status.record_error(error, known.backends.is_some());
                false
            }
            Event::Answer(answer) => {
                if status.consecutive_errors > 0 {
                    info!(service = %service, source = %kind, target = %target, "discovery recovered");
                }
                if answer.skipped > 0 && answer.reasons != status.skipped_reasons {
                    warn!(service = %service, source = %kind, target = %target, skipped = answer.skipped,
                          "discovery answer has unusable entries: {}", answer.reasons.join("; "));
                }
                status.record_answer(answer.backends.len(), answer.skipped, answer.reasons);
                let changed = known.backends.as_ref() != Some(&answer.backends);
                if changed {
                    info!(service = %service, source = %kind, backends = answer.backends.len(), "discovered set changed");
                    if answer.backends.is_empty() {
                        warn!(service = %service, source = %kind, "source reports no instances: the service now refuses connects");
                    }
                }
                known.backends = Some(answer.backends);
                changed
            }
        }
    }

    /// The last good answer of a discovered service; `None` before its first answer.
    pub fn backends(&self, service: &str) -> Option<&[BackendConfig]> {
        self.known.get(service)?.backends.as_deref()
    }

    /// True when every discovered service's source has answered at least once.
    pub fn all_answered(&self) -> bool {
        self.known.values().all(|k| k.backends.is_some())
    }

    pub fn status(&self) -> BTreeMap<String, SourceStatus> {
        self.known
            .iter()
            .map(|(name, k)| (name.clone(), k.status.clone()))
            .collect()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in self.running.values().filter_map(|r| r.task.as_ref()) {
            task.abort();
        }
    }
}

/// A task of its own for a polled source; `None` for etcd, whose services join their cluster's.
fn start(config: &DiscoveryConfig, reporter: &Reporter) -> Option<JoinHandle<()>> {
    let seed = now_ms() ^ reporter.generation.rotate_left(32);
    let backoff = Backoff::new(config.retry_initial, config.retry_max, seed);
    let allow_loopback = config.allow_loopback_backends;
    let reporter = reporter.clone();
    let task = match &config.source {
        SourceConfig::Dns(d) => {
            let resolver = dns::Resolver::new(d.clone(), allow_loopback);
            tokio::spawn(poll_loop(backoff, reporter, resolver))
        }
        SourceConfig::Consul(c) => {
            let watch = consul::Watch::new(c.clone(), allow_loopback);
            tokio::spawn(poll_loop(backoff, reporter, watch))
        }
        SourceConfig::Etcd(_) => return None,
    };
    Some(task)
}

/// A source that is asked again and again (DNS on the TTL, Consul with blocking queries).
trait Poll {
    /// One query: the answer and how long to wait before the next query.
    fn poll(&mut self) -> impl Future<Output = Result<(Answer, Duration), String>> + Send;
}

async fn poll_loop(mut backoff: Backoff, reporter: Reporter, mut source: impl Poll) {
    loop {
        let pause = match source.poll().await {
            Ok((answer, next)) => {
                backoff.reset();
                reporter.answer(answer);
                next
            }
            Err(e) => {
                reporter.error(e);
                backoff.next_delay()
            }
        };
        tokio::time::sleep(pause).await;
    }
}
