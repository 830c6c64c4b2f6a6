//! Named breakers. Lookups go through one of 16 read-mostly shards, so no
//! single lock is shared by every request; the hot path is meant to hold a
//! [`Breaker`] handle (cloned once, at route build time) and never touch
//! the registry at all.

use crate::{Breaker, Config, ConfigError, Event, Snapshot};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

const SHARDS: usize = 16;

type Shard = RwLock<HashMap<Arc<str>, Breaker>>;

/// A set of named breakers (for example `"app"` per upstream and
/// `"app/http://10.0.0.1:80"` per endpoint) sharing one event stream.
///
/// ```
/// use keel_breaker::{Config, Registry};
/// let reg = Registry::new(Config::default());
/// let upstream = reg.get_or_insert("app").unwrap();
/// let again = reg.get("app").unwrap();
/// upstream.record_failure();
/// assert_eq!(again.snapshot().counters.failures, 1);
/// assert_eq!(reg.snapshot().len(), 1);
/// ```
pub struct Registry {
    shards: Box<[Shard]>,
    defaults: Config,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("breakers", &self.names())
            .finish()
    }
}

impl Registry {
    /// A registry whose breakers use `defaults` unless given their own.
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// assert!(reg.names().is_empty());
    /// ```
    pub fn new(defaults: Config) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            defaults,
            events,
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        name.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The breaker called `name`, if any.
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// assert!(reg.get("nope").is_none());
    /// ```
    pub fn get(&self, name: &str) -> Option<Breaker> {
        // A poisoned shard still holds valid breakers: a panic elsewhere
        // must not take breaking down with it.
        let map = self.shard(name).read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned()
    }

    /// The breaker called `name`, created with the default config if new.
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// let b = reg.get_or_insert("db").unwrap();
    /// assert_eq!(b.name(), "db");
    /// ```
    pub fn get_or_insert(&self, name: &str) -> Result<Breaker, ConfigError> {
        self.get_or_insert_with(name, || self.defaults.clone())
    }

    /// The breaker called `name`, created with `config()` if new.
    ///
    /// ```
    /// use keel_breaker::{Config, Registry};
    /// let reg = Registry::new(Config::default());
    /// let b = reg.get_or_insert_with("db", || Config::default().half_open_probes(1)).unwrap();
    /// assert_eq!(b.config().half_open_probes, 1);
    /// ```
    pub fn get_or_insert_with(
        &self,
        name: &str,
        config: impl FnOnce() -> Config,
    ) -> Result<Breaker, ConfigError> {
        if let Some(b) = self.get(name) {
            return Ok(b);
        }
        let mut map = self.shard(name).write().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(name) {
            return Ok(b.clone());
        }
        let name: Arc<str> = name.into();
        let b = Breaker::with_events(name.clone(), config(), self.events.clone())?;
        map.insert(name, b.clone());
        Ok(b)
    }

    /// Removes a breaker (handles already given out keep working) and
    /// emits [`EventKind::Removed`](crate::EventKind::Removed).
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// reg.get_or_insert("db").unwrap();
    /// assert!(reg.remove("db").is_some());
    /// assert!(reg.get("db").is_none());
    /// ```
    pub fn remove(&self, name: &str) -> Option<Breaker> {
        let removed = self
            .shard(name)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(b) = &removed {
            b.emit_removed();
        }
        removed
    }

    /// Every name, sorted.
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// reg.get_or_insert("b").unwrap();
    /// reg.get_or_insert("a").unwrap();
    /// assert_eq!(reg.names(), vec!["a", "b"]);
    /// ```
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names
    }

    /// Snapshots of every breaker, sorted by name (for `/status`).
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// reg.get_or_insert("db").unwrap();
    /// let json = serde_json::to_string(&reg.snapshot()).unwrap();
    /// assert!(json.contains("\"state\":\"closed\""));
    /// ```
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let mut all: Vec<Snapshot> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .map(Breaker::snapshot)
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Events of every breaker in the registry.
    ///
    /// ```
    /// let reg = keel_breaker::Registry::new(Default::default());
    /// let mut rx = reg.subscribe();
    /// reg.get_or_insert("db").unwrap().disable();
    /// assert_eq!(&*rx.try_recv().unwrap().breaker, "db");
    /// ```
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}
