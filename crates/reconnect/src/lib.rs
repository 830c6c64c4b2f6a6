//! The client half of draining without a reconnect storm.
//!
//! When a keel gateway drains (a deploy, or one upstream endpoint being
//! replaced), it closes WebSocket tunnels in paced batches with close code
//! 1012 (Service Restart) and a reason such as
//! `keel drain; reconnect_after_ms=2345`: a suggested wait, spread across
//! clients by the server. A client that reconnects at once undoes the
//! pacing; one that waits a fixed time moves the spike a little later.
//! [`Reconnect`] decides how long to wait:
//!
//! - after a close carrying a hint, the hint (capped by
//!   [`Reconnect::max_hint`]) plus a little full jitter, so clients the
//!   server spread stay spread;
//! - after any other close or a failed attempt, exponential backoff with
//!   full jitter (`random(0, min(cap, base * 2^n))`, keel-retry's
//!   [`Backoff`]), reset once a connection succeeds.
//!
//! [`Reconnect::connect_with`] runs the wait-then-connect loop over any
//! connect function (so tests and tools can bind source addresses or fake
//! the network); [`Reconnect::connect`] does it for a `ws://` URL with
//! tokio-tungstenite.
//!
//! ```
//! use std::time::Duration;
//! use keel_reconnect::Reconnect;
//! use tokio_tungstenite::tungstenite::protocol::CloseFrame;
//! use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
//!
//! let mut reconnect = Reconnect::new().seed(7);
//! // The gateway drained us and suggested 1.5 s.
//! let frame = CloseFrame { code: CloseCode::Restart, reason: "keel drain; reconnect_after_ms=1500".into() };
//! let wait = reconnect.after_close(Some(&frame));
//! assert!(wait >= Duration::from_millis(1500) && wait < Duration::from_millis(1600));
//! // No hint: full-jitter backoff, never above the current ceiling.
//! assert!(reconnect.after_close(None) <= Duration::from_millis(500));
//! ```

#![forbid(unsafe_code)]

use std::future::Future;
use std::time::Duration;

use keel_retry::{Backoff, BackoffIter, Jitter};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket connection as [`Reconnect::connect`] returns it.
///
/// ```
/// fn takes(_ws: keel_reconnect::WebSocket) {}
/// ```
pub type WebSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why [`Reconnect::connect_with`] gave up: how many attempts were made,
/// and the last one's error, kept whole.
///
/// The struct puts no bound on `E`; it is `Display` and an
/// [`Error`](std::error::Error) when `E` is (the message includes the last
/// error, which is therefore not also its `source`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mut r = keel_reconnect::Reconnect::new().max_attempts(Some(2));
/// let err = r
///     .connect_with(std::time::Duration::ZERO, || async { Err::<(), _>("refused") })
///     .await
///     .expect_err("gives up");
/// assert_eq!((err.attempts, err.last), (2, "refused"));
/// assert_eq!(err.to_string(), "gave up after 2 attempts: refused");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gave up after {attempts} attempts: {last}")]
#[non_exhaustive]
pub struct GaveUp<E> {
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error.
    pub last: E,
}

impl<E> GaveUp<E> {
    /// The last attempt's error, for callers that only need the cause.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// #[derive(Debug, PartialEq)]
    /// struct Refused; // not Display: GaveUp does not ask for it
    ///
    /// let mut r = keel_reconnect::Reconnect::new().max_attempts(Some(1));
    /// let err = r
    ///     .connect_with(std::time::Duration::ZERO, || async { Err::<(), _>(Refused) })
    ///     .await
    ///     .expect_err("gives up");
    /// assert_eq!(err.into_last(), Refused);
    /// # }
    /// ```
    pub fn into_last(self) -> E {
        self.last
    }
}

/// How long to wait before (re)connecting, and the loop that does it.
///
/// ```
/// use keel_reconnect::Reconnect;
/// use std::time::Duration;
/// let r = Reconnect::new()
///     .base(Duration::from_millis(100))
///     .cap(Duration::from_secs(10))
///     .max_attempts(Some(20));
/// assert_eq!(r.max_delay(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
pub struct Reconnect {
    base: Duration,
    cap: Duration,
    max_hint: Duration,
    honour_hint: bool,
    max_attempts: Option<u32>,
    seed: Option<u64>,
    backoff: BackoffIter,
    /// Jitter added to a server hint (the backoff has its own stream).
    rng: fastrand::Rng,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconnect {
    /// Full jitter from a 500 ms base, doubling, capped at 30 s; hints
    /// honoured up to 60 s; unlimited attempts.
    pub fn new() -> Self {
        let mut r = Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_hint: Duration::from_secs(60),
            honour_hint: true,
            max_attempts: None,
            seed: None,
            backoff: Backoff::exponential(Duration::from_millis(500)).iter(),
            rng: fastrand::Rng::new(),
        };
        r.rebuild();
        r
    }

    fn rebuild(&mut self) {
        let mut backoff = Backoff::exponential(self.base)
            .cap(self.cap)
            .jitter(Jitter::Full);
        if let Some(seed) = self.seed {
            backoff = backoff.seed(seed);
            // A stream apart from the backoff's, derived from the same seed.
            self.rng = fastrand::Rng::with_seed(seed).fork();
        }
        self.backoff = backoff.iter();
    }

    /// The first backoff ceiling (doubling from there).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut r = keel_reconnect::Reconnect::new().base(Duration::from_millis(10)).seed(1);
    /// assert!(r.after_failure() <= Duration::from_millis(10));
    /// ```
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self.rebuild();
        self
    }

    /// The largest backoff ceiling.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut r = keel_reconnect::Reconnect::new().cap(Duration::from_millis(300)).seed(1);
    /// assert!((0..20).all(|_| r.after_failure() <= Duration::from_millis(300)));
    /// ```
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self.rebuild();
        self
    }

    /// The longest server hint obeyed (longer ones are cut to this).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    /// let mut r = keel_reconnect::Reconnect::new().max_hint(Duration::from_secs(1));
    /// let f = CloseFrame { code: CloseCode::Restart, reason: "reconnect_after_ms=99999".into() };
    /// assert!(r.after_close(Some(&f)) < Duration::from_millis(1200));
    /// ```
    pub fn max_hint(mut self, max: Duration) -> Self {
        self.max_hint = max;
        self
    }

    /// Whether to honour the server's hint (on by default; off makes the
    /// client back off as if there were none).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    /// let mut r = keel_reconnect::Reconnect::new().honour_hint(false);
    /// let f = CloseFrame { code: CloseCode::Restart, reason: "reconnect_after_ms=9000".into() };
    /// assert!(r.after_close(Some(&f)) <= Duration::from_millis(500));
    /// ```
    pub fn honour_hint(mut self, honour: bool) -> Self {
        self.honour_hint = honour;
        self
    }

    /// Give up after this many failed attempts in a row (`None`: never).
    ///
    /// ```
    /// let r = keel_reconnect::Reconnect::new().max_attempts(Some(5));
    /// # let _ = r;
    /// ```
    pub fn max_attempts(mut self, max: Option<u32>) -> Self {
        self.max_attempts = max;
        self
    }

    /// Seeds the jitter, for reproducible runs.
    ///
    /// ```
    /// let mut a = keel_reconnect::Reconnect::new().seed(42);
    /// let mut b = keel_reconnect::Reconnect::new().seed(42);
    /// assert_eq!(a.after_failure(), b.after_failure());
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self.rebuild();
        self
    }

    /// The largest backoff delay.
    ///
    /// ```
    /// assert_eq!(keel_reconnect::Reconnect::new().max_delay(), std::time::Duration::from_secs(30));
    /// ```
    pub fn max_delay(&self) -> Duration {
        self.cap
    }

    /// The wait after the server closed the connection with `frame` (or
    /// the connection dropped without one).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut r = keel_reconnect::Reconnect::new();
    /// // Dropped without a close frame: backoff.
    /// assert!(r.after_close(None) <= Duration::from_millis(500));
    /// ```
    pub fn after_close(&mut self, frame: Option<&CloseFrame>) -> Duration {
        match frame.and_then(hint) {
            Some(hint) if self.honour_hint => {
                // The server already spread the hints; a little jitter on
                // top breaks ties between clients given the same value.
                let spread = u64::try_from(self.base.as_nanos() / 5).unwrap_or(0);
                let extra = self.rng.u64(..spread.max(1));
                hint.min(self.max_hint) + Duration::from_nanos(extra)
            }
            _ => self.after_failure(),
        }
    }

    /// The wait after a failed attempt: the next full-jitter backoff.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut r = keel_reconnect::Reconnect::new().seed(3);
    /// assert!(r.after_failure() <= Duration::from_millis(500));
    /// assert!(r.after_failure() <= Duration::from_secs(1));
    /// ```
    pub fn after_failure(&mut self) -> Duration {
        self.backoff.next().unwrap_or(self.cap)
    }

    /// A connection succeeded: the backoff starts over.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut r = keel_reconnect::Reconnect::new();
    /// for _ in 0..10 { r.after_failure(); }
    /// r.connected();
    /// assert!(r.after_failure() <= Duration::from_millis(500));
    /// ```
    pub fn connected(&mut self) {
        self.backoff.reset();
    }

    /// Waits `first`, then calls `connect` until it succeeds, waiting the
    /// next backoff after each failure; gives up after `max_attempts`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mut r = keel_reconnect::Reconnect::new();
    /// let mut tries = 0;
    /// let conn = r
    ///     .connect_with(std::time::Duration::from_secs(2), || {
    ///         tries += 1;
    ///         let ok = tries > 1;
    ///         async move { if ok { Ok("connected") } else { Err("refused") } }
    ///     })
    ///     .await;
    /// assert_eq!(conn.expect("second try"), "connected");
    /// # }
    /// ```
    pub async fn connect_with<T, E, F, Fut>(
        &mut self,
        first: Duration,
        mut connect: F,
    ) -> Result<T, GaveUp<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut wait = first;
        let mut attempts = 0;
        loop {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            attempts += 1;
            match connect().await {
                Ok(conn) => {
                    self.connected();
                    return Ok(conn);
                }
                Err(last) => {
                    if self.max_attempts.is_some_and(|max| attempts >= max) {
                        return Err(GaveUp { attempts, last });
                    }
                    wait = self.after_failure();
                }
            }
        }
    }

    /// [`connect_with`](Self::connect_with) for a `ws://` URL.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures_util::StreamExt;
    /// use keel_reconnect::Reconnect;
    /// use std::time::Duration;
    /// use tokio_tungstenite::tungstenite::Message;
    ///
    /// let mut reconnect = Reconnect::new();
    /// let mut wait = Duration::ZERO;
    /// loop {
    ///     let mut ws = reconnect.connect("ws://127.0.0.1:8080/feed", wait).await?;
    ///     let mut close = None;
    ///     while let Some(Ok(message)) = ws.next().await {
    ///         if let Message::Close(frame) = message { close = frame; }
    ///     }
    ///     wait = reconnect.after_close(close.as_ref());
    /// }
    /// # }
    /// ```
    pub async fn connect(
        &mut self,
        url: &str,
        first: Duration,
    ) -> Result<WebSocket, GaveUp<tokio_tungstenite::tungstenite::Error>> {
        self.connect_with(first, || async {
            tokio_tungstenite::connect_async(url)
                .await
                .map(|(ws, _)| ws)
        })
        .await
    }
}

/// The reconnect hint of a close frame: only a 1012 (Service Restart)
/// close whose reason carries `reconnect_after_ms=N`.
///
/// ```
/// use std::time::Duration;
/// use tokio_tungstenite::tungstenite::protocol::CloseFrame;
/// use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
///
/// let drained = CloseFrame { code: CloseCode::Restart, reason: "keel drain; reconnect_after_ms=20".into() };
/// assert_eq!(keel_reconnect::hint(&drained), Some(Duration::from_millis(20)));
/// let other = CloseFrame { code: CloseCode::Away, reason: "reconnect_after_ms=20".into() };
/// assert_eq!(keel_reconnect::hint(&other), None);
/// ```
pub fn hint(frame: &CloseFrame) -> Option<Duration> {
    (u16::from(frame.code) == keel_drain::CloseRequest::WEBSOCKET_CODE)
        .then(|| keel_drain::parse_reconnect_hint(&frame.reason))
        .flatten()
}

/// Close code as a number, for logs.
///
/// ```
/// use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
/// assert_eq!(keel_reconnect::code(CloseCode::Restart), 1012);
/// ```
pub fn code(code: CloseCode) -> u16 {
    u16::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(code: CloseCode, reason: &str) -> CloseFrame {
        CloseFrame {
            code,
            reason: reason.into(),
        }
    }

    #[test]
    fn hints_are_honoured_capped_or_ignored() {
        let mut r = Reconnect::new().seed(1).max_hint(Duration::from_secs(2));
        let d = r.after_close(Some(&frame(CloseCode::Restart, "reconnect_after_ms=900")));
        assert!(
            d >= Duration::from_millis(900) && d < Duration::from_millis(1000),
            "{d:?}"
        );
        let d = r.after_close(Some(&frame(CloseCode::Restart, "reconnect_after_ms=90000")));
        assert!(
            d >= Duration::from_secs(2) && d < Duration::from_millis(2100),
            "{d:?}"
        );
        let mut off = Reconnect::new().seed(1).honour_hint(false);
        let d = off.after_close(Some(&frame(CloseCode::Restart, "reconnect_after_ms=9000")));
        assert!(d <= Duration::from_millis(500), "{d:?}");
    }

    #[test]
    fn backoff_is_full_jitter_and_resets() {
        let mut r = Reconnect::new()
            .seed(3)
            .base(Duration::from_millis(100))
            .cap(Duration::from_millis(800));
        let delays: Vec<Duration> = (0..200).map(|_| r.after_failure()).collect();
        // Attempt n stays under min(cap, base * 2^n); later ones spread over
        // the whole [0, cap) range.
        for (n, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << n.min(3)));
            assert!(*d <= ceiling, "attempt {n}: {d:?} > {ceiling:?}");
        }
        let late = &delays[10..];
        assert!(late.iter().any(|d| *d < Duration::from_millis(200)));
        assert!(late.iter().any(|d| *d > Duration::from_millis(600)));
        r.connected();
        assert!(r.after_failure() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn connect_with_waits_the_hint_then_backs_off_on_failures() {
        let mut r = Reconnect::new().seed(9).max_attempts(Some(4));
        let wait = r.after_close(Some(&frame(CloseCode::Restart, "reconnect_after_ms=3000")));
        let start = tokio::time::Instant::now();
        let mut attempts = Vec::new();
        let result = r
            .connect_with(wait, || {
                attempts.push(start.elapsed());
                let n = attempts.len();
                async move { if n < 3 { Err("refused") } else { Ok(n) } }
            })
            .await;
        assert_eq!(result.expect("third attempt succeeds"), 3);
        assert!(attempts[0] >= Duration::from_secs(3) && attempts[0] < Duration::from_millis(3100));
        assert!(attempts[1] - attempts[0] <= Duration::from_millis(500));
        assert!(attempts[2] - attempts[1] <= Duration::from_secs(1));
        let gave_up = r
            .connect_with(Duration::ZERO, || async { Err::<(), _>("down") })
            .await
            .expect_err("gives up");
        assert_eq!(gave_up.attempts, 4);
    }
}
