//! `lb-agent top` in a pseudo-terminal of 80×24, as over SSH: its output is fed to a terminal
//! emulator (vt100) and the resulting screen is checked for the expected rows; `q` quits.

use lb_testkit::config::{Config, Service};
use lb_testkit::paths::agent_bin;
use lb_testkit::procs::Proto;
use lb_testkit::{require_privileged, Scenario};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";

/// A pseudo-terminal pair with the given size: (controller, terminal).
fn pty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the ints we pass; the size is read only.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened for us and are owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

/// Feeds what the terminal shows into a 24×80 screen until `until` holds or time runs out.
fn screen_until(
    output: &Arc<Mutex<vt100::Parser>>,
    max: Duration,
    until: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + max;
    loop {
        let text = output.lock().expect("screen").screen().contents();
        if until(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_shows_services_and_backends_in_80_by_24_and_quits_on_q() {
    if !require_privileged() {
        return;
    }
    let config = Config::new().service(Service::tcp("web", VIP).backends(&[B1, B2]));
    let s = Scenario::start(&[B1, B2], Proto::Tcp, config);
    let load = s.steady_load(VIP, Duration::from_millis(20), Duration::from_secs(20));

    let (controller, terminal) = pty(24, 80);
    let mut cmd = Command::new(agent_bin());
    cmd.args(["top", "--pin-dir"])
        .arg(&s.pins.path)
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(terminal.try_clone().expect("dup")))
        .stdout(Stdio::from(terminal.try_clone().expect("dup")))
        .stderr(Stdio::from(terminal));
    // SAFETY: only async-signal-safe calls between fork and exec: a new session whose
    // controlling terminal is the pty, as a login shell would have.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut top = cmd.spawn().expect("spawn lb-agent top");
    let screen = Arc::new(Mutex::new(vt100::Parser::new(24, 80, 0)));
    let mut reader = std::fs::File::from(controller.try_clone().expect("dup"));
    let sink = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("screen").process(&buf[..n]);
        }
    });

    // The second refresh has rates; wait until traffic shows as a rate on a backend row.
    let text = screen_until(&screen, Duration::from_secs(10), |t| {
        t.contains("rates over") && t.lines().any(|l| l.contains(B1) && !l.contains(" 0.0 "))
    });
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() <= 24, "{text}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");
    let service = lines
        .iter()
        .find(|l| l.contains("web"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(service.contains("random"), "service row: {service}\n{text}");
    for b in [B1, B2] {
        assert!(
            lines.iter().any(|l| l.contains(b)),
            "no row for {b}:\n{text}"
        );
    }
    assert!(text.contains("q quit"), "{text}");

    // `/` and a filter that matches nothing empties the table; Esc brings it back.
    let mut keys = std::fs::File::from(controller);
    keys.write_all(b"/zzz").expect("type");
    let filtered = screen_until(&screen, Duration::from_secs(5), |t| !t.contains(B1));
    assert!(!filtered.contains(B1), "filter ignored:\n{filtered}");
    keys.write_all(b"\x1b").expect("esc");
    let back = screen_until(&screen, Duration::from_secs(5), |t| t.contains(B1));
    assert!(back.contains(B1), "Esc did not clear the filter:\n{back}");

    keys.write_all(b"q").expect("q");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = top.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = top.kill();
            let _ = top.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "top did not quit on q: {status:?}"
    );
    drop(load);
}
