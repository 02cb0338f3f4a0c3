//! This node's pods that ask not to be translated: the `lb-agent/bypass: "true"` annotation,
//! read from a watch of the pods whose `spec.nodeName` is this node (a pod's cgroup exists on
//! its own node only, so no other pod could be found here anyway). Only their metadata is
//! asked for: uid and annotations are all that decide, and a pod's spec is large.
//!
//! Everything the API answers is checked before it is used: the annotation's value must be
//! `"true"` or `"false"`, and a bypassed pod's uid must be a canonical UUID, since it becomes
//! part of a cgroup name to look for. A pod failing either is left translated and reported
//! once (again only if what is wrong changes).

use super::{meta_key, next_batch, wrap, Key, Keyed, KubeEvent, View, MAX_BATCH_WAIT, SETTLE};
use crate::config::is_node_name;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::BTreeMap;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The annotation that asks for a pod to be left untranslated.
pub const ANNOTATION: &str = "lb-agent/bypass";

/// Pods asking to be bypassed: their uid and `namespace/name`.
pub type BypassedPods = BTreeMap<PodUid, String>;

/// A pod's uid as kubelet puts it into the pod's cgroup name: a UUID in the canonical form the
/// API server generates (8-4-4-4-12 lowercase hex digits). Nothing else is accepted, so only
/// hex digits and dashes ever take part in matching cgroup names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let canonical = bytes.len() == 36
            && bytes.iter().enumerate().all(|(i, &b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            });
        canonical.then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a pod's annotations ask for the bypass: `"true"` does, `"false"` or no annotation
/// does not, and any other value is an error naming it.
pub fn asks_bypass(annotations: Option<&BTreeMap<String, String>>) -> Result<bool, String> {
    match annotations
        .and_then(|a| a.get(ANNOTATION))
        .map(String::as_str)
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!(
            "annotation {ANNOTATION} is {}, not \"true\" or \"false\"; ignored",
            shown(other)
        )),
    }
}

/// What the watch keeps of a pod: its verdict, `Ok(None)` when it asks for nothing.
struct PodState {
    key: Key,
    verdict: Result<Option<PodUid>, String>,
}

impl Keyed for PodState {
    fn key(&self) -> Key {
        self.key.clone()
    }
}

fn judge(pod: PartialObjectMeta<Pod>) -> PodState {
    let meta = &pod.metadata;
    let verdict = asks_bypass(meta.annotations.as_ref()).and_then(|asks| {
        if !asks {
            return Ok(None);
        }
        let uid = meta.uid.as_deref().unwrap_or_default();
        PodUid::parse(uid).map(Some).ok_or_else(|| {
            format!(
                "metadata.uid {} is not a pod uid (a lowercase UUID), so its cgroup cannot be \
                 found; not bypassed",
                shown(uid)
            )
        })
    });
    PodState {
        key: meta_key(meta),
        verdict,
    }
}

/// A value from the API as it goes into a message: quoted, and cut short.
fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}...", &value[..end]),
    }
}

/// Watches this node's pods and sends the set asking to be bypassed once listed and whenever
/// it changes. Without a usable node name it says why and does nothing: every pod of the
/// cluster is not worth watching for the few cgroups on this node.
pub async fn follow(client: Client, node: Option<String>, tx: mpsc::UnboundedSender<KubeEvent>) {
    let Some(node) = node else {
        return info!(
            "no node name (kubernetes.node_name or NODE_NAME): the {ANNOTATION} pod annotation \
             is not followed"
        );
    };
    if !is_node_name(&node) {
        return warn!(
            "NODE_NAME {} is not a node name (lowercase DNS labels): the {ANNOTATION} pod \
             annotation is not followed",
            shown(&node)
        );
    }
    let pods: Api<PartialObjectMeta<Pod>> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(pods, config)
        .default_backoff()
        .map(|r| r.map(|e| wrap(e, judge)))
        .boxed();
    let mut view = View::default();
    let mut reported = BTreeMap::new();
    let mut sent = None;
    while let Some(batch) = next_batch(&mut events, SETTLE, MAX_BATCH_WAIT).await {
        for result in batch {
            match result {
                Ok(event) => view.apply(event),
                Err(e) => {
                    let _ = tx.send(KubeEvent::Error(format!("pod watch: {e}")));
                }
            }
        }
        if !view.listed {
            continue;
        }
        report_once(&view, &mut reported);
        let pods = bypassed(&view);
        if sent.as_ref() != Some(&pods) {
            info!(node, pods = ?pods.values().collect::<Vec<_>>(), "pods annotated {ANNOTATION}");
            let _ = tx.send(KubeEvent::Pods(pods.clone()));
            sent = Some(pods);
        }
    }
}

fn bypassed(view: &View<PodState>) -> BypassedPods {
    let asking = view.live.values().filter_map(|p| match &p.verdict {
        Ok(Some(uid)) => Some((uid.clone(), format!("{}/{}", p.key.0, p.key.1))),
        _ => None,
    });
    asking.collect()
}

/// Warns of each pod's problem once; `reported` keeps what was said of pods that still have
/// one.
fn report_once(view: &View<PodState>, reported: &mut BTreeMap<Key, String>) {
    reported.retain(|key, _| view.live.get(key).is_some_and(|p| p.verdict.is_err()));
    for pod in view.live.values() {
        let Err(problem) = &pod.verdict else {
            continue;
        };
        if reported.get(&pod.key) != Some(problem) {
            warn!(pod = %format!("{}/{}", pod.key.0, pod.key.1), "{problem}");
            reported.insert(pod.key.clone(), problem.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use kube::runtime::watcher::Event;

    const UID: &str = "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn annotated(value: Option<&str>) -> Option<BTreeMap<String, String>> {
        value.map(|v| BTreeMap::from([(ANNOTATION.to_owned(), v.to_owned())]))
    }

    fn pod(name: &str, uid: &str, value: Option<&str>) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                annotations: annotated(value),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    #[test]
    fn only_true_and_false_are_values_of_the_annotation() {
        assert_eq!(asks_bypass(None), Ok(false));
        assert_eq!(asks_bypass(Some(&BTreeMap::new())), Ok(false));
        assert_eq!(asks_bypass(annotated(Some("true")).as_ref()), Ok(true));
        assert_eq!(asks_bypass(annotated(Some("false")).as_ref()), Ok(false));
        for bad in ["True", "yes", "1", "", " true"] {
            let e = asks_bypass(annotated(Some(bad)).as_ref()).unwrap_err();
            assert!(
                e.contains(ANNOTATION) && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        let long = "x".repeat(10_000);
        let e = asks_bypass(annotated(Some(&long)).as_ref()).unwrap_err();
        assert!(e.len() < 200, "a long value is cut short: {e}");
    }

    #[test]
    fn pod_uids_are_canonical_uuids_only() {
        assert_eq!(PodUid::parse(UID).unwrap().as_str(), UID);
        for bad in [
            "",
            "6a1c2f3e0b4d4e5f8a9b0c1d2e3f4a5b",
            "6A1C2F3E-0B4D-4E5F-8A9B-0C1D2E3F4A5B",
            "6a1c2f3e_0b4d_4e5f_8a9b_0c1d2e3f4a5b",
            "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a5",
            "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b0",
            "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a*b",
            "../../../../../../etc/passwd-0000000",
        ] {
            assert_eq!(PodUid::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_view_gives_the_annotated_pods_with_a_valid_uid() {
        let mut view = View::default();
        view.apply(Event::Init);
        for p in [
            pod("proxy", UID, Some("true")),
            pod("off", "11111111-2222-4333-8444-555555555555", Some("false")),
            pod("plain", "21111111-2222-4333-8444-555555555555", None),
            pod("typo", "31111111-2222-4333-8444-555555555555", Some("ture")),
            pod("baduid", "not-a-uid", Some("true")),
        ] {
            view.apply(Event::InitApply(judge(p)));
        }
        view.apply(Event::InitDone);
        let uid = PodUid::parse(UID).unwrap();
        assert_eq!(
            bypassed(&view),
            BTreeMap::from([(uid, "shop/proxy".to_owned())])
        );
        let mut reported = BTreeMap::new();
        report_once(&view, &mut reported);
        let names: Vec<&str> = reported.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["baduid", "typo"]);
        assert!(reported.values().any(|p| p.contains("\"ture\"")));
        assert!(reported.values().any(|p| p.contains("\"not-a-uid\"")));

        // The annotation removed, the typo fixed: nothing asks, nothing is left to report.
        view.apply(Event::Apply(judge(pod("proxy", UID, None))));
        let fixed = pod(
            "typo",
            "31111111-2222-4333-8444-555555555555",
            Some("false"),
        );
        view.apply(Event::Apply(judge(fixed)));
        view.apply(Event::Delete(judge(pod("baduid", "not-a-uid", None))));
        assert!(bypassed(&view).is_empty());
        report_once(&view, &mut reported);
        assert!(reported.is_empty(), "{reported:?}");
    }
}
