//! `kind = "etcd"`: the registration pattern where each instance puts `<prefix><ip>:<port>`,
//! usually attached to a lease, and deletes it (or lets the lease expire) when it goes away.
//!
//! Services are not read one by one: every service whose source names the same cluster
//! (`members::ClusterKey`) is a member of one task with one connection and one watch stream,
//! with a watch per prefix root (`members::roots`). 1,000 services under `/services/` cost one
//! connection and one watch instead of 1,000 of each. Each member still lists its own prefix
//! and reports its own answer (`session.rs`), so what a service sees does not depend on who
//! else shares its cluster.

mod registrations;
mod members;
mod session;

pub use members::{membership, ClusterKey, Member, Members};
pub use registrations::to_answer;

use std::collections::HashMap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct Running {
    members: watch::Sender<Members>,
    task: JoinHandle<()>,
}

/// The clusters being read, each by a task of its own.
#[derive(Default)]
pub struct Clusters {
    running: HashMap<ClusterKey, Running>,
}

impl Clusters {
    /// Makes the running clusters those of `wanted` (every etcd service and its membership):
    /// a new cluster gets a task, a cluster without members loses its task, and a cluster whose
    /// members changed is told, so it lists only the services that joined and keeps its
    /// connection and watch when it can.
    pub fn sync(&mut self, wanted: impl IntoIterator<Item = (String, ClusterKey, Member)>) {
        let mut by_cluster: HashMap<ClusterKey, Members> = HashMap::new();
        for (service, cluster, member) in wanted {
            by_cluster
                .entry(cluster)
                .or_default()
                .insert(service, member);
        }
        self.running.retain(|cluster, running| {
            let Some(members) = by_cluster.remove(cluster) else {
                running.task.abort();
                return false;
            };
            running.members.send_if_modified(|current| {
                let changed = *current != members;
                *current = members;
                changed
            });
            true
        });
        for (cluster, members) in by_cluster {
            let (tx, rx) = watch::channel(members);
            let task = tokio::spawn(session::run(cluster.clone(), rx));
            let running = Running { members: tx, task };
            self.running.insert(cluster, running);
        }
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::members::tests::{etcd, reporter};
    use super::*;

    fn service(name: &str, endpoint: &str, prefix: &str) -> (String, ClusterKey, Member) {
        // Nothing listens on port 1: the tasks only retry until the test ends.
        let config = etcd(&[endpoint], prefix);
        let (cluster, member) = membership(&config, &reporter(name, 1)).expect("etcd");
        (name.to_owned(), cluster, member)
    }
    fn members(clusters: &Clusters) -> Vec<Vec<String>> {
        let mut found: Vec<Vec<String>> = clusters
            .running
            .values()
            .map(|r| r.members.borrow().keys().cloned().collect())
            .collect();
        found.sort();
        found
    }

    #[tokio::test]
    async fn services_of_one_cluster_share_a_task_that_follows_the_config() {
        let (a, b) = ("http://127.0.0.1:1", "http://127.0.0.2:1");
        let mut clusters = Clusters::default();
        clusters.sync([
            service("web", a, "/s/web/"),
            service("api", a, "/s/api/"),
            service("db", a, "/other/db/"),
            service("cache", b, "/s/cache/"),
        ]);
        assert_eq!(
            members(&clusters),
            [vec!["api", "db", "web"], vec!["cache"]]
        );
        let first = clusters
            .running
            .values()
            .map(|r| r.task.id())
            .collect::<Vec<_>>();

        clusters.sync([service("web", a, "/s/web/"), service("new", a, "/s/new/")]);
        assert_eq!(members(&clusters), [vec!["new", "web"]]);
        let kept = clusters.running.values().map(|r| r.task.id()).next();
        assert!(
            first.iter().any(|id| Some(*id) == kept),
            "the cluster's task is kept"
        );

        clusters.sync([]);
        assert!(clusters.running.is_empty());
    }
}
