//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so the agent is one file to deploy.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let obj = std::env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/lb-ebpf")
        });
    if !obj.exists() {
        eprintln!(
            "error: the eBPF object {} does not exist. Build it first with \
             `cargo xtask build-ebpf` (or use `cargo xtask build`), or point LB_EBPF_OBJECT at it.",
            obj.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rustc-env=LB_EBPF_OBJECT_PATH={}", obj.display());
}
