//! Short connections from one thread's own event loop (mio, the readiness layer under tokio):
//! each of `connections` slots connects, sends one request, reads the echo, closes with RST and
//! starts over. Measured here, the async runtime's task and timer machinery per connection cost
//! more than the kernel's own work for a connect on the path the benchmark measures, so this
//! workload drives the sockets directly.

use super::{micros, Worker, CONNECT_TIMEOUT, REQUEST};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a slot rests after a failure before connecting again: a refused or unreachable
/// target must not turn the loop into a spin.
const RETRY_AFTER: Duration = Duration::from_millis(1);

enum Stage {
    /// Waiting to be writable: the connect's outcome.
    Connecting,
    /// Request sent; `got` bytes of the echo read so far.
    Answering { got: usize },
    /// After a failure, until this instant.
    Resting(Instant),
}

struct Slot {
    stream: Option<TcpStream>,
    stage: Stage,
    started: Instant,
}

/// Runs `connections` slots over `targets` (each slot starts at its own index and takes the
/// next target each time) until `deadline`.
pub fn run(
    targets: &[SocketAddr],
    first_index: usize,
    connections: usize,
    deadline: Instant,
) -> Worker {
    let mut w = Worker::default();
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            w.note_failure(e);
            return w;
        }
    };
    let mut turns: Vec<usize> = (first_index..first_index + connections).collect();
    let mut slots: Vec<Slot> = Vec::with_capacity(connections);
    for (i, turn) in turns.iter_mut().enumerate() {
        let mut slot = Slot {
            stream: None,
            stage: Stage::Resting(Instant::now()),
            started: Instant::now(),
        };
        start(&poll, &mut slot, i, next(targets, turn), &mut w);
        slots.push(slot);
    }
    let mut events = Events::with_capacity(connections.max(16));
    let mut buf = [0u8; 16];
    while Instant::now() < deadline {
        if let Err(e) = poll.poll(&mut events, Some(RETRY_AFTER)) {
            if e.kind() != ErrorKind::Interrupted {
                w.note_failure(e);
                break;
            }
        }
        for event in events.iter() {
            let i = event.token().0;
            let slot = &mut slots[i];
            let outcome = advance(slot, &mut buf);
            match outcome {
                Step::Wait => {}
                Step::Done => {
                    w.latencies.push(micros(slot.started.elapsed()));
                    close(&poll, slot);
                    start(&poll, slot, i, next(targets, &mut turns[i]), &mut w);
                }
                Step::Failed(e) => {
                    w.note_failure(e);
                    close(&poll, slot);
                    slot.stage = Stage::Resting(Instant::now() + RETRY_AFTER);
                }
            }
        }
        // Timeouts and rests: a scan of the slots, a few dozen, once per wakeup.
        let now = Instant::now();
        for (i, slot) in slots.iter_mut().enumerate() {
            match slot.stage {
                Stage::Resting(until) if until <= now => {
                    start(&poll, slot, i, next(targets, &mut turns[i]), &mut w)
                }
                Stage::Connecting | Stage::Answering { .. }
                    if now - slot.started > CONNECT_TIMEOUT =>
                {
                    w.note_failure(std::io::Error::from(ErrorKind::TimedOut));
                    close(&poll, slot);
                    slot.stage = Stage::Resting(now + RETRY_AFTER);
                }
                _ => {}
            }
        }
    }
    for slot in &mut slots {
        close(&poll, slot);
    }
    w
}

fn next(targets: &[SocketAddr], turn: &mut usize) -> SocketAddr {
    *turn += 1;
    targets[*turn % targets.len()]
}

enum Step {
    Wait,
    Done,
    Failed(std::io::Error),
}

fn advance(slot: &mut Slot, buf: &mut [u8; 16]) -> Step {
    let Some(stream) = slot.stream.as_mut() else {
        return Step::Wait;
    };
    match slot.stage {
        Stage::Connecting => {
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return Step::Failed(e),
            }
            match stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return Step::Wait,
                Err(e) => return Step::Failed(e),
            }
            // Four bytes into an empty send buffer: written whole or not at all.
            match stream.write(REQUEST) {
                Ok(n) if n == REQUEST.len() => {}
                Ok(_) => return Step::Failed(std::io::Error::other("short write")),
                Err(e) => return Step::Failed(e),
            }
            slot.stage = Stage::Answering { got: 0 };
            Step::Wait
        }
        Stage::Answering { got } => {
            let mut got = got;
            loop {
                match stream.read(&mut buf[got..REQUEST.len()]) {
                    Ok(0) => return Step::Failed(ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        got += n;
                        if got == REQUEST.len() {
                            return Step::Done;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        slot.stage = Stage::Answering { got };
                        return Step::Wait;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Step::Failed(e),
                }
            }
        }
        Stage::Resting(_) => Step::Wait,
    }
}

/// A new connection for slot `i`; a failure to even start rests the slot.
fn start(poll: &Poll, slot: &mut Slot, i: usize, to: SocketAddr, w: &mut Worker) {
    slot.started = Instant::now();
    let started = TcpStream::connect(to).and_then(|mut s| {
        s.set_nodelay(true)?;
        // Readable and writable at once: the connect completes as writable, the echo arrives
        // as readable, and the socket never needs re-registering in between.
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        Ok(s)
    });
    match started {
        Ok(s) => {
            slot.stream = Some(s);
            slot.stage = Stage::Connecting;
        }
        Err(e) => {
            w.note_failure(e);
            slot.stage = Stage::Resting(Instant::now() + RETRY_AFTER);
        }
    }
}

/// Closing with RST (linger 0) leaves no TIME_WAIT behind, so seconds of short connections
/// cannot run out of local ports.
fn close(poll: &Poll, slot: &mut Slot) {
    if let Some(mut s) = slot.stream.take() {
        let _ = poll.registry().deregister(&mut s);
        super::reset_on_close(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback that answers `REQUEST` and keeps accepting until dropped.
    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4];
                if conn.read_exact(&mut buf).is_ok() {
                    let _ = conn.write_all(&buf);
                }
            }
        });
        addr
    }

    #[test]
    fn completes_connections_and_counts_each() {
        let addr = echo_server();
        let deadline = Instant::now() + Duration::from_millis(300);
        let w = run(&[addr], 0, 4, deadline);
        assert_eq!(w.errors, 0, "{:?}", w.first_error);
        assert!(w.latencies.len() > 10, "{} connections", w.latencies.len());
    }

    #[test]
    fn a_refused_target_is_an_error_and_not_a_spin() {
        // A port nobody listens on: bind, learn the port, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        let w = run(&[addr], 0, 2, deadline);
        assert!(w.latencies.is_empty());
        assert!(w.errors > 0 && w.first_error.is_some());
        // Each slot rests RETRY_AFTER between attempts: at most about 200 per slot here.
        assert!(w.errors < 1000, "{} errors in 200 ms", w.errors);
    }
}
