//! Test doubles: children whose life the test controls, and event waiting.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_supervisor::{ChildError, ChildSpec, Event, EventKind};
use tokio::sync::{broadcast, mpsc};

/// What a puppet does when told.
#[derive(Debug)]
pub enum Action {
    Crash,
    Exit,
    ExitShutdown,
    Panic,
}

/// A shared log of lifecycle lines, in the order they happened.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, line: impl Into<String>) {
        self.0.lock().expect("log lock").push(line.into());
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("log lock").clone()
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("log lock"))
    }
}

/// A child the test drives: it logs its starts and stops, and crashes,
/// exits or panics on command.
#[derive(Clone)]
pub struct Puppet {
    pub name: String,
    pub log: Log,
    starts: Arc<AtomicUsize>,
    ctl: Arc<Mutex<Option<mpsc::UnboundedSender<Action>>>>,
    /// Ignore cancellation (to test shutdown timeouts).
    pub stubborn: bool,
}

impl Puppet {
    pub fn new(name: &str, log: &Log) -> Self {
        Self {
            name: name.to_string(),
            log: log.clone(),
            starts: Arc::new(AtomicUsize::new(0)),
            ctl: Arc::new(Mutex::new(None)),
            stubborn: false,
        }
    }

    pub fn stubborn(mut self) -> Self {
        self.stubborn = true;
        self
    }

    pub fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    pub fn spec(&self) -> ChildSpec {
        let p = self.clone();
        ChildSpec::new(self.name.clone(), move |ctx| {
            let p = p.clone();
            async move {
                let (tx, mut rx) = mpsc::unbounded_channel();
                *p.ctl.lock().expect("ctl lock") = Some(tx);
                p.starts.fetch_add(1, Ordering::SeqCst);
                p.log.push(format!("start {}", p.name));
                ctx.ready();
                let stop = async {
                    if p.stubborn {
                        std::future::pending::<()>().await;
                    }
                    ctx.cancelled().await;
                };
                tokio::select! {
                    () = stop => {
                        p.log.push(format!("stop {}", p.name));
                        Ok(())
                    }
                    action = rx.recv() => match action {
                        Some(Action::Crash) | None => Err(ChildError::msg(format!("{} crashed", p.name))),
                        Some(Action::Exit) => Ok(()),
                        Some(Action::ExitShutdown) => Err(ChildError::shutdown()),
                        Some(Action::Panic) => panic!("{} panicked", p.name),
                    }
                }
            }
        })
    }

    pub fn send(&self, action: Action) {
        let ctl = self.ctl.lock().expect("ctl lock");
        ctl.as_ref()
            .expect("puppet is running")
            .send(action)
            .expect("puppet is listening");
    }

    pub fn crash(&self) {
        self.send(Action::Crash);
    }
}

/// Waits (on tokio's clock, so instantly under paused time) for the first
/// event matching `pred`, panicking if none comes within an hour of virtual
/// time.
pub async fn wait_for(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("lagged {n} events"),
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("events closed waiting for {what}")
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .unwrap_or_else(|_| panic!("no event: {what}"))
}

/// Waits for `path` to become ready again (after a restart).
pub async fn ready(events: &mut broadcast::Receiver<Event>, path: &str) {
    wait_for(events, &format!("{path} ready"), |e| {
        &*e.path == path && e.kind == EventKind::Ready
    })
    .await;
}

/// Waits for an event of kind `kind` at `path`.
pub async fn event(
    events: &mut broadcast::Receiver<Event>,
    path: &str,
    kind: fn(&EventKind) -> bool,
) -> Event {
    wait_for(events, path, |e| &*e.path == path && kind(&e.kind)).await
}
