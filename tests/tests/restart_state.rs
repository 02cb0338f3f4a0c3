//! Privileged end-to-end test of what a restarted agent remembers: a backend that was down
//! when the agent stopped stays out of the maps after the restart until it passes its `rise`
//! probes, instead of starting healthy and taking traffic it refuses.

use lb_testkit::procs::Proto;
use lb_testkit::{require_privileged, wait_backends, wait_for, Scenario, ServeMode};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
const WAIT: Duration = Duration::from_secs(10);
/// `initial` is healthy (the default), so only the remembered state keeps B2 out at first.
const CONFIG: &str = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                      backends = [\"127.0.0.11:8080\", \"127.0.0.12:8080\"]\n\
                      [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\n\
                      timeout = \"100ms\"\nrise = 2\nfall = 2\njitter = \"20ms\"\n";

#[test]
fn a_backend_down_at_the_stop_stays_out_after_the_restart_until_healthy() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, CONFIG);
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    s.stop_backend(B2);
    wait_backends(&s.pins, "web", &[B1], WAIT);
    let published = wait_for(WAIT, || {
        let status = lb_userspace::status::read(&s.pins.path);
        let b2 = status
            .as_ref()
            .and_then(|f| f.services.get("web")?.backends.get(B2).cloned());
        b2.is_some_and(|h| !h.healthy)
    });
    assert!(published, "the agent never published B2 as down");
    assert!(
        s.agent().sigterm_and_wait(),
        "the agent did not stop cleanly"
    );
    s.agent = None;

    let load = s.steady_load(VIP, Duration::from_millis(2), Duration::from_secs(30));
    s.start_agent_adopting();
    assert!(
        s.agent()
            .log()
            .contains("resuming the previous agent's health"),
        "{}",
        s.agent().log()
    );
    // Several probe intervals: time enough for a backend that started healthy to take
    // connects before its `fall` probes fail.
    std::thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    report.assert_lost_nothing(200, "after the restart with B2 down");
    assert_eq!(report.from(B2), 0, "{report:?}");

    s.start_backend(B2, Proto::Tcp, ServeMode::Answer);
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
}
