//! A future polled only when something it waits on has woken it.
//!
//! A connection's task is woken for every read and write of every request;
//! `tokio::select!` then polls each of its branches, so the watchers that
//! share the task (the drain's signals, the idle and head watchdog) would
//! run on every wake-up although they fire a few times in a connection's
//! life. [`Gated`] gives its future a waker of its own and polls it only
//! after that waker was used.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// The waker handed to the gated future: notes the wake-up, then wakes
/// the task.
#[derive(Debug)]
struct Gate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// One gate per connection, shared by the futures it gates in turn.
#[derive(Debug)]
pub(crate) struct Gates {
    gate: Arc<Gate>,
    waker: Waker,
}

impl Gates {
    pub(crate) fn new() -> Self {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        let waker = Waker::from(gate.clone());
        Gates { gate, waker }
    }

    /// `future`, polled first at once and then only after it asked to be.
    pub(crate) fn gate<F: Future>(&self, future: F) -> Gated<'_, F> {
        // A new future has never been polled: it must be, once.
        self.gate.woken.store(true, Ordering::Release);
        Gated {
            gates: self,
            future,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Gates::gate`].
    pub(crate) struct Gated<'a, F> {
        gates: &'a Gates,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let gate = &this.gates.gate;
        {
            // The task's waker first, so a wake-up that comes between the
            // check below and the next poll is not lost.
            let mut task = gate.task.lock().unwrap_or_else(PoisonError::into_inner);
            match task.as_ref() {
                Some(known) if known.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        if !gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.future
            .poll(&mut Context::from_waker(&this.gates.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready when `ready` is set, waking through the
    /// waker it was last given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().expect("waker") = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn the_gated_future_is_polled_only_after_its_own_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let gates = Gates::new();
        let mut gated = Box::pin(gates.gate(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        }));
        let task_woken = Arc::new(AtomicUsize::new(0));
        struct Task(Arc<AtomicUsize>);
        impl Wake for Task {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let task = Waker::from(Arc::new(Task(task_woken.clone())));
        let mut cx = Context::from_waker(&task);

        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once at first");
        for _ in 0..5 {
            // The task is woken for other reasons: the probe is left alone.
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        ready.store(true, Ordering::SeqCst);
        let inner = waker.lock().expect("waker").take().expect("registered");
        inner.wake();
        assert_eq!(task_woken.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
