//! Embeds the eBPF object, so the agent is one file to deploy. By default that is the committed
//! `lb-ebpf/prebuilt/lb-ebpf.o` (rebuilt by `cargo xtask build-ebpf`); `LB_EBPF_OBJECT` names
//! another one, e.g. while trying out a kernel-side change before committing its object.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let obj = std::env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf/prebuilt/lb-ebpf.o")
        });
    if !obj.is_file() {
        eprintln!(
            "error: the eBPF object {} does not exist. The committed one is \
             lb-ebpf/prebuilt/lb-ebpf.o (`cargo xtask build-ebpf` rebuilds it); LB_EBPF_OBJECT \
             may point at another.",
            obj.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rustc-env=LB_EBPF_OBJECT_PATH={}", obj.display());
}
