//! One stop for a whole service: a cloneable handle that SIGTERM / SIGINT (or the service
//! itself) trips once, and that every serve loop of the process waits on.

use crate::error::Error;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;

/// The stop of a whole service: one signal handler, one log line, every serve loop stopped.
///
/// A service that runs a consumer and a relay (and perhaps an HTTP server) in one process takes
/// one `Shutdown` and hands each loop [`Shutdown::requested`]:
///
/// ```no_run
/// # use idem_amqp::{Consumer, Relay};
/// # use idem_core::{Backend, Handler};
/// # async fn run<DB: Backend, H: Handler<DB>>(consumer: Consumer<DB, H>, relay: Relay<DB>)
/// # -> Result<(), idem_amqp::Error> {
/// use idem_amqp::Shutdown; // idem::amqp::Shutdown
///
/// let shutdown = Shutdown::on_signals()?; // SIGTERM / SIGINT, logged once
/// let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// let (consumed, relayed) = tokio::join!(
///     consumer.serve(url, shutdown.requested()),
///     relay.serve(url, shutdown.requested()),
/// );
/// consumed?;
/// relayed?;
/// # Ok(()) }
/// ```
///
/// On the signal the consumer stops taking deliveries, finishes and acknowledges the ones in
/// flight, and closes its channels; the relay settles the batch it is publishing and hands its
/// lease over; both `serve` calls return `Ok(())`. When one loop ends on an error of its own,
/// [`Shutdown::request`] stops the others too, rather than leave, say, a consumer committing
/// messages that no relay publishes.
///
/// Clones share one stop. [`crate::shutdown_signal`] is the one-future shorthand: each call
/// installs a handler of its own and logs the signal itself.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stop: CancellationToken,
    /// Why the stop was requested: the first reason only.
    reason: OnceLock<String>,
}

impl Shutdown {
    /// A stop that only [`Shutdown::request`] trips (a test, a demo, a service with a signal
    /// handler of its own).
    pub fn new() -> Self {
        Self::default()
    }

    /// A stop tripped by SIGTERM or SIGINT (Ctrl-C; only Ctrl-C off Unix), or by
    /// [`Shutdown::request`]. The signal handlers are installed before this returns, once for
    /// every clone, and the signal is logged once (`SIGTERM received: stopping`).
    ///
    /// Fails when called outside a Tokio runtime (call it inside `#[tokio::main]`), or when the
    /// operating system refuses the signal handlers: without them a stop signal would kill the
    /// process mid-delivery (redelivered and deduplicated, but not a graceful stop). The
    /// runtime needs its IO driver, as `#[tokio::main]` has (Tokio panics on a runtime built
    /// without `enable_io`).
    pub fn on_signals() -> Result<Self, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "Shutdown::on_signals() needs a Tokio runtime: call it inside #[tokio::main] (or \
                 Runtime::block_on)"
                    .into(),
            ));
        }
        let shutdown = Self::new();
        let signal = signals::Listener::install()?;
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let received = signal.next().await;
                shutdown.request(format!("{received} received"));
            }
        });
        Ok(shutdown)
    }

    /// Stops every loop waiting on this handle or a clone. The first request is logged at INFO
    /// (`<reason>: stopping`) and kept as [`Shutdown::reason`]; later ones change nothing.
    pub fn request(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.inner.reason.set(reason).is_ok() {
            if let Some(reason) = self.inner.reason.get() {
                tracing::info!(reason = reason.as_str(), "{reason}: stopping");
            }
        }
        self.inner.stop.cancel();
    }

    /// Resolves once the stop is requested (at once if it was already): the `shutdown` argument
    /// of [`crate::Consumer::serve`], [`crate::Consumer::run`] and [`crate::Relay::serve`], or
    /// of anything else the service runs. It owns what it needs: hand it to a spawned task.
    pub fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.stop.clone().cancelled_owned()
    }

    /// Whether the stop was requested.
    pub fn is_requested(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// Why the stop was requested (the first reason: `SIGTERM received`, or what was passed to
    /// [`Shutdown::request`]); `None` while it was not.
    pub fn reason(&self) -> Option<&str> {
        self.inner.reason.get().map(String::as_str)
    }
}

/// Waiting for SIGTERM / SIGINT, shared with [`crate::shutdown_signal`].
pub(crate) mod signals {
    use crate::error::Error;

    /// The installed handlers.
    pub(crate) struct Listener {
        #[cfg(unix)]
        terminate: tokio::signal::unix::Signal,
        #[cfg(unix)]
        interrupt: tokio::signal::unix::Signal,
    }

    impl Listener {
        /// Installs the handlers now, so that a signal that comes before anyone waits is not
        /// missed. Needs a Tokio runtime.
        pub(crate) fn install() -> Result<Self, Error> {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let install = |kind: SignalKind, name: &str| {
                    signal(kind).map_err(|source| Error::Signals {
                        signal: name.to_owned(),
                        source,
                    })
                };
                Ok(Self {
                    terminate: install(SignalKind::terminate(), "SIGTERM")?,
                    interrupt: install(SignalKind::interrupt(), "SIGINT")?,
                })
            }
            #[cfg(not(unix))]
            {
                Ok(Self {})
            }
        }

        /// Resolves on the next signal, with its name.
        pub(crate) async fn next(mut self) -> &'static str {
            #[cfg(unix)]
            {
                tokio::select! {
                    _ = self.terminate.recv() => "SIGTERM",
                    _ = self.interrupt.recv() => "SIGINT",
                }
            }
            #[cfg(not(unix))]
            {
                let _ = &mut self;
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl-C"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Shutdown;
    use std::time::Duration;

    #[tokio::test]
    async fn one_request_stops_every_clone_and_the_first_reason_stays() {
        let shutdown = Shutdown::new();
        let (a, b) = (shutdown.requested(), shutdown.clone().requested());
        let waiting = tokio::spawn(async move {
            a.await;
            b.await;
        });
        assert!(!shutdown.is_requested());
        assert_eq!(shutdown.reason(), None);
        shutdown.clone().request("the relay failed");
        shutdown.request("the consumer stopped");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("every waiter is released")
            .expect("the waiter did not panic");
        assert!(shutdown.is_requested());
        assert_eq!(shutdown.reason(), Some("the relay failed"));
        // Asked for after the stop: resolves at once.
        tokio::time::timeout(Duration::from_secs(1), shutdown.requested())
            .await
            .expect("a late waiter is released at once");
    }

    #[test]
    fn on_signals_outside_a_runtime_says_where_to_call_it() {
        let error = Shutdown::on_signals().expect_err("no runtime here");
        assert!(error.to_string().contains("#[tokio::main]"), "{error}");
    }
}
