//! Project tasks: `cargo xtask <task>`. One entry point so README, CI and developers run the
//! same steps in the same order.

mod cmd;
mod ebpf;
mod fresh;
mod fuzz;
#[cfg(test)]
mod module_order;
mod setup;
mod tasks;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and run the load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests and the demo need (idempotent; needs root for apt).
    Setup,
    /// Rebuild the eBPF object into lb-ebpf/prebuilt/ (installs an eBPF toolchain if needed).
    BuildEbpf,
    /// Build the workspace (the agent embeds lb-ebpf/prebuilt/lb-ebpf.o).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, lint and run every test (privileged tests need root).
    Test,
    /// Build and run the agent: `cargo xtask run -- run --config lb.toml`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and print their tables (needs root).
    Bench {
        /// Fewer trials and a shorter probe interval (under a minute).
        #[arg(long)]
        quick: bool,
    },
    /// Setup, build and run a self-contained demo in its own netns and cgroup (needs root).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// README's commands in a throwaway Debian root holding only what a new machine has
    /// (needs root; 10-20 minutes).
    FreshCheck {
        /// The commit or branch to check (default: HEAD).
        #[arg(long, default_value = "HEAD")]
        rev: String,
        /// Keep the root afterwards (target/fresh-check, or LB_FRESH_DIR).
        #[arg(long)]
        keep: bool,
    },
    /// Run each cargo-fuzz target of fuzz/ (needs a nightly toolchain; skipped without one).
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => ebpf::build().map(|_| ()),
        Task::Build { release } => tasks::build(release),
        Task::Test => tasks::test(),
        Task::Run { release, args } => tasks::run(release, &args),
        Task::Demo { args } => tasks::demo(&args),
        Task::Bench { quick } => tasks::bench(quick),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::FreshCheck { rev, keep } => fresh::run(&fresh::Options { rev, keep }),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
