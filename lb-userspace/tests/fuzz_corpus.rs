//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same code
//! the fuzz targets run (`fuzz/src/lib.rs`, included below), so the parsers' no-panic and
//! invariant checks hold on every `cargo test`, also where there is no nightly toolchain to
//! run libFuzzer (`cargo xtask fuzz`).

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Regular files of a folder, sorted so that failures are listed in a stable order.
fn files(dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable folder entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

#[test]
fn every_corpus_file_replays_without_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let inputs = files(&dir);
        assert!(!inputs.is_empty(), "no seed in {}", dir.display());
        for path in inputs {
            let data = std::fs::read(&path).expect("readable corpus file");
            if let Err(payload) = std::panic::catch_unwind(|| run(&data)) {
                failures.push(format!(
                    "{target}: {}: {}",
                    path.display(),
                    panic_message(payload.as_ref())
                ));
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} corpus files fail (reproduce with `cargo +nightly fuzz run <target> <file>`):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A target without a corpus (or a corpus without a target) would silently not be replayed.
#[test]
fn every_fuzz_target_has_a_corpus_and_a_replay() {
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    on_disk.sort();
    let mut replayed: Vec<String> = harness::TARGETS
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    replayed.sort();
    assert_eq!(on_disk, replayed, "fuzz_targets/*.rs vs harness::TARGETS");
    let mut corpora: Vec<String> = std::fs::read_dir(fuzz_dir().join("corpus"))
        .expect("fuzz/corpus")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    corpora.sort();
    assert_eq!(corpora, replayed, "fuzz/corpus/* vs harness::TARGETS");
}

#[test]
fn etcd_input_format_round_trips() {
    let pairs: [(&[u8], &[u8]); 2] = [
        (b"/services/web/10.0.0.1:80", b""),
        (b"/services/web/10.0.0.2:80", b"{\"weight\":2}"),
    ];
    let (prefix, keys) = harness::decode_etcd(&harness::encode_etcd("/services/web/", &pairs));
    assert_eq!(prefix, "/services/web/");
    let got: Vec<(&[u8], &[u8])> = keys
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    assert_eq!(got, pairs);
    // A truncated last pair is dropped; a prefix that is not UTF-8 falls back to the default.
    let (prefix, keys) = harness::decode_etcd(&[1, 0xff, 3, b'a', b'b', b'c', 9, b'x']);
    assert_eq!(prefix.as_bytes(), harness::ETCD_PREFIX);
    assert!(keys.is_empty());
}

/// The invariants are not vacuous: a realistic seed of each discovery format yields backends.
#[test]
fn realistic_seeds_produce_backends() {
    for name in [
        "static.toml",
        "health.toml",
        "discovery_dns.toml",
        "discovery_etcd.toml",
        "discovery_consul.toml",
        "kubernetes.toml",
    ] {
        let text = std::fs::read_to_string(fuzz_dir().join("corpus/config").join(name)).unwrap();
        let env = lb_userspace::config::Env::default();
        if let Err(e) = lb_userspace::config::parse_with_env(&text, name, env) {
            panic!("seed {name} is not a valid config: {e}");
        }
    }
    let consul = std::fs::read(fuzz_dir().join("corpus/consul/answer.json")).unwrap();
    let answer = lb_userspace::sources::consul::parse(&consul, false).unwrap();
    assert_eq!(answer.backends.len(), 3, "{answer:?}");
    let etcd = std::fs::read(fuzz_dir().join("corpus/etcd/registrations.bin")).unwrap();
    let (prefix, keys) = harness::decode_etcd(&etcd);
    let answer = lb_userspace::sources::etcd::to_answer(&prefix, &keys, false).unwrap();
    assert_eq!(answer.backends.len(), 4, "{answer:?}");
    let kube = std::fs::read(fuzz_dir().join("corpus/kubernetes/small.json")).unwrap();
    let objects: harness::Objects = serde_json::from_slice(&kube).unwrap();
    use lb_userspace::sources::kubernetes::translate;
    let options = translate::Options::default();
    let translation = translate::translate(&objects.services, &objects.slices, &options);
    assert_eq!(translation.services.len(), 3, "{translation:?}");
    assert!(translation.services.iter().all(|s| !s.backends.is_empty()));
}
