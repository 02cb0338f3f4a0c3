//! Privileged end-to-end tests of who may touch the agent's pins: a pin folder that another
//! user owns or may write to is refused before anything is loaded, and an unprivileged user
//! (`nobody`, through `setpriv`) can neither unlink a pin nor stop balancing.

use lb_testkit::procs::Proto;
use lb_testkit::{require_privileged, wait_for, Agent, Scenario};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const CONFIG: &str = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                      backends = [\"127.0.0.11:8080\"]\n";
/// The unprivileged user the tests act as.
const NOBODY: &str = "65534";

/// Starts the agent on `s`'s pins, expects it to refuse and exit, and returns its log.
fn refused(s: &mut Scenario) -> String {
    let mut agent = Agent::start(&s.net, &s.cgroup, &s.pins, &s.config, 0, &[]);
    let exited = wait_for(Duration::from_secs(10), || !agent.is_running());
    let log = agent.log();
    assert!(
        exited,
        "the agent started on a pin folder it should refuse:\n{log}"
    );
    log
}

/// bpffs as the agent would mount it on its first start, for a test that creates a pin folder
/// before any agent ran.
fn ensure_bpffs() {
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output();
    if String::from_utf8_lossy(&fs.expect("stat").stdout).trim() != "bpf_fs" {
        let mount = Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"])
            .status();
        assert!(mount.expect("mount").success(), "cannot mount bpffs");
    }
}

fn unsafe_pin_folder_is_refused(prepare: impl Fn(&std::path::Path), why: &str) {
    ensure_bpffs();
    let mut s = Scenario::without_agent(&[B1], Proto::Tcp);
    s.write_config(CONFIG);
    std::fs::create_dir(&s.pins.path).expect("create the pin folder");
    prepare(&s.pins.path);
    let log = refused(&mut s);
    assert!(
        log.contains("pin folder") && log.contains(why),
        "the refusal does not say why ({why}):\n{log}"
    );
    let entries = std::fs::read_dir(&s.pins.path).expect("pin folder").count();
    assert_eq!(entries, 0, "something was pinned in a refused folder");
    assert_eq!(
        s.client(VIP, 3, Proto::Tcp).failed("ENETUNREACH"),
        3,
        "a program was attached although the folder was refused"
    );
}

#[test]
fn a_pin_folder_owned_by_another_user_is_refused() {
    if !require_privileged() {
        return;
    }
    unsafe_pin_folder_is_refused(
        |dir| {
            let status = Command::new("chown").arg(NOBODY).arg(dir).status();
            assert!(status.expect("chown").success());
        },
        &format!("owned by uid {NOBODY}"),
    );
}

#[test]
fn a_pin_folder_others_may_write_is_refused() {
    if !require_privileged() {
        return;
    }
    unsafe_pin_folder_is_refused(
        |dir| {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        },
        "mode 777",
    );
}

#[test]
fn nobody_can_unlink_a_pin_or_stop_balancing() {
    if !require_privileged() {
        return;
    }
    let s = Scenario::start(&[B1], Proto::Tcp, CONFIG);
    let link = s.pins.path.join("lb_connect4_link");
    assert!(link.exists(), "no link pin at {}", link.display());
    let unlink = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg("rm")
        .arg("-f")
        .arg(&link)
        .output()
        .expect("setpriv");
    assert!(
        !unlink.status.success(),
        "nobody removed a link pin: {unlink:?}"
    );
    assert!(link.exists(), "the link pin is gone");
    assert_eq!(s.client(VIP, 20, Proto::Tcp).ok, 20);
}

#[test]
fn a_link_planted_at_the_status_path_is_replaced_not_followed() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[B1], Proto::Tcp);
    s.write_config(CONFIG);
    let status = lb_userspace::status::path(&s.pins.path);
    let victim = s.config.with_extension("victim");
    std::fs::write(&victim, "untouched").expect("victim file");
    let _ = std::fs::remove_file(&status);
    std::os::unix::fs::symlink(&victim, &status).expect("plant a link");
    s.start_agent();
    let replaced = wait_for(Duration::from_secs(10), || {
        std::fs::symlink_metadata(&status).is_ok_and(|m| m.is_file())
    });
    let written = std::fs::read_to_string(&victim).expect("victim");
    let _ = std::fs::remove_file(&status);
    assert!(replaced, "the status file never replaced the planted link");
    assert_eq!(
        written, "untouched",
        "the agent wrote through the planted link"
    );
}
