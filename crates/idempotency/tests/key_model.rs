//! A model test of the key state machine (free, held, renewed, completed,
//! abandoned, released, removed, expired) with fencing, against the memory
//! store on tokio's paused clock: random sequences of operations on two
//! keys, each result checked against a reference model written from the
//! contract in `store.rs`. The stores on wall clocks (embedded, Redis,
//! PostgreSQL) are held to the same transitions by the conformance suite.

use std::time::Duration;

use keel_idempotency::memory::MemoryStore;
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};
use proptest::prelude::*;

/// Whose token an operation presents.
#[derive(Clone, Copy, Debug)]
enum Who {
    /// The latest token issued for the key.
    Latest,
    /// The one before it (a holder that was taken over or removed).
    Previous,
    /// One never issued.
    Stranger,
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        key: usize,
        fp: u8,
        hold_ms: u64,
        lock: bool,
    },
    Renew {
        key: usize,
        who: Who,
        hold_ms: u64,
        lock: bool,
    },
    Complete {
        key: usize,
        who: Who,
        ttl_ms: u64,
    },
    Release {
        key: usize,
        who: Who,
    },
    Remove {
        key: usize,
    },
    Inspect {
        key: usize,
    },
    Advance {
        ms: u64,
    },
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![Just(Who::Latest), Just(Who::Previous), Just(Who::Stranger)]
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..2usize;
    let hold = prop_oneof![Just(100u64), Just(300), Just(1000)];
    prop_oneof![
        3 => (key.clone(), 0..2u8, hold.clone(), any::<bool>())
            .prop_map(|(key, fp, hold_ms, lock)| Op::Claim { key, fp, hold_ms, lock }),
        2 => (key.clone(), who(), hold.clone(), any::<bool>())
            .prop_map(|(key, who, hold_ms, lock)| Op::Renew { key, who, hold_ms, lock }),
        2 => (key.clone(), who(), prop_oneof![Just(200u64), Just(2000)])
            .prop_map(|(key, who, ttl_ms)| Op::Complete { key, who, ttl_ms }),
        1 => (key.clone(), who()).prop_map(|(key, who)| Op::Release { key, who }),
        1 => key.clone().prop_map(|key| Op::Remove { key }),
        1 => key.prop_map(|key| Op::Inspect { key }),
        3 => prop_oneof![Just(50u64), Just(150), Just(400), Just(1500)].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The model's view of one key; times in ms since the run began.
#[derive(Clone, Debug)]
enum Model {
    Free,
    Claimed {
        fp: u8,
        token: u64,
        lease_until: u64,
        gone_at: u64,
    },
    Completed {
        fp: u8,
        payload: Vec<u8>,
        gone_at: u64,
    },
}

impl Model {
    /// The key as of `now`: expired records are free.
    fn at(&self, now: u64) -> Model {
        match self {
            Model::Claimed { gone_at, .. } | Model::Completed { gone_at, .. }
                if *gone_at <= now =>
            {
                Model::Free
            }
            other => other.clone(),
        }
    }

    /// The live holder's token, if the lease has not lapsed.
    fn holder(&self, now: u64) -> Option<u64> {
        match self.at(now) {
            Model::Claimed {
                token, lease_until, ..
            } if lease_until > now => Some(token),
            _ => None,
        }
    }
}

fn lease(hold_ms: u64, lock: bool) -> (Lease, u64) {
    let hold = Duration::from_millis(hold_ms);
    if lock {
        (
            Lease::locking(hold, Duration::from_millis(700)),
            hold_ms + 700,
        )
    } else {
        (Lease::freeing(hold), hold_ms)
    }
}

struct Run {
    store: MemoryStore,
    keys: [StoreKey; 2],
    models: [Model; 2],
    /// Tokens issued per key, in order.
    issued: [Vec<u64>; 2],
    now: u64,
}

impl Run {
    fn token(&self, key: usize, who: Who) -> FencingToken {
        let issued = &self.issued[key];
        FencingToken::new(match who {
            Who::Latest => issued.last().copied().unwrap_or(u64::MAX - 1),
            Who::Previous => issued
                .len()
                .checked_sub(2)
                .map_or(u64::MAX - 2, |i| issued[i]),
            Who::Stranger => u64::MAX - 3,
        })
    }

    async fn step(&mut self, op: &Op) {
        let now = self.now;
        match *op {
            Op::Advance { ms } => {
                tokio::time::advance(Duration::from_millis(ms)).await;
                self.now += ms;
            }
            Op::Claim {
                key,
                fp,
                hold_ms,
                lock,
            } => {
                let (terms, life) = lease(hold_ms, lock);
                let got = self
                    .store
                    .claim(&self.keys[key], Fingerprint::from_bytes([fp; 32]), terms)
                    .await
                    .expect("the memory store answers");
                match (self.models[key].at(now), got) {
                    (Model::Free, Claim::Acquired { token }) => {
                        assert!(
                            self.issued[key].iter().all(|&t| t < token.get()),
                            "token {token:?} must exceed every earlier one {:?}",
                            self.issued[key]
                        );
                        self.issued[key].push(token.get());
                        self.models[key] = Model::Claimed {
                            fp,
                            token: token.get(),
                            lease_until: now + hold_ms,
                            gone_at: now + life,
                        };
                    }
                    (
                        Model::Claimed {
                            fp: theirs,
                            lease_until,
                            ..
                        },
                        Claim::InFlight {
                            fingerprint,
                            retry_after,
                        },
                    ) if lease_until > now => {
                        assert_eq!(fingerprint, Fingerprint::from_bytes([theirs; 32]));
                        assert_eq!(retry_after, Duration::from_millis(lease_until - now));
                    }
                    (Model::Claimed { fp: theirs, .. }, Claim::Abandoned { fingerprint }) => {
                        assert_eq!(fingerprint, Fingerprint::from_bytes([theirs; 32]));
                    }
                    (
                        Model::Completed {
                            fp: theirs,
                            payload: want,
                            ..
                        },
                        Claim::Completed {
                            fingerprint,
                            payload,
                        },
                    ) => {
                        assert_eq!(fingerprint, Fingerprint::from_bytes([theirs; 32]));
                        assert_eq!(payload, want);
                    }
                    (model, got) => panic!("claim at {now} ms: model {model:?}, store {got:?}"),
                }
            }
            Op::Renew {
                key,
                who,
                hold_ms,
                lock,
            } => {
                let token = self.token(key, who);
                let (terms, life) = lease(hold_ms, lock);
                let got = self.store.renew(&self.keys[key], token, terms).await;
                if self.models[key].holder(now) == Some(token.get()) {
                    got.expect("the live holder renews");
                    if let Model::Claimed {
                        lease_until,
                        gone_at,
                        ..
                    } = &mut self.models[key]
                    {
                        *lease_until = now + hold_ms;
                        *gone_at = now + life;
                    }
                } else {
                    assert!(
                        matches!(got, Err(StoreError::Fenced)),
                        "renew by {who:?} at {now} ms on {:?}: {got:?}",
                        self.models[key]
                    );
                }
            }
            Op::Complete { key, who, ttl_ms } => {
                let token = self.token(key, who);
                let payload = format!("result of {}", token.get()).into_bytes();
                let got = self
                    .store
                    .complete(
                        &self.keys[key],
                        token,
                        &payload,
                        Duration::from_millis(ttl_ms),
                    )
                    .await;
                if self.models[key].holder(now) == Some(token.get()) {
                    got.expect("the live holder completes");
                    let Model::Claimed { fp, .. } = self.models[key] else {
                        unreachable!("a holder means a claim");
                    };
                    self.models[key] = Model::Completed {
                        fp,
                        payload,
                        gone_at: now + ttl_ms,
                    };
                } else {
                    assert!(
                        matches!(got, Err(StoreError::Fenced)),
                        "complete by {who:?}: {got:?}"
                    );
                }
            }
            Op::Release { key, who } => {
                let token = self.token(key, who);
                let got = self.store.release(&self.keys[key], token).await;
                if self.models[key].holder(now) == Some(token.get()) {
                    got.expect("the live holder releases");
                    self.models[key] = Model::Free;
                } else {
                    assert!(
                        matches!(got, Err(StoreError::Fenced)),
                        "release by {who:?}: {got:?}"
                    );
                }
            }
            Op::Remove { key } => {
                let was = !matches!(self.models[key].at(now), Model::Free);
                let got = self
                    .store
                    .remove(&self.keys[key])
                    .await
                    .expect("the memory store answers");
                assert_eq!(got, was, "remove reports whether a live record was there");
                self.models[key] = Model::Free;
            }
            Op::Inspect { key } => {
                let got = self
                    .store
                    .inspect(&self.keys[key])
                    .await
                    .expect("the memory store answers");
                match (self.models[key].at(now), got) {
                    (Model::Free, None) => {}
                    (
                        Model::Claimed {
                            fp,
                            token,
                            lease_until,
                            gone_at,
                        },
                        Some(state),
                    ) => {
                        let want = if lease_until > now {
                            KeyState::Held {
                                fingerprint: Fingerprint::from_bytes([fp; 32]),
                                token: FencingToken::new(token),
                                lease_left: Duration::from_millis(lease_until - now),
                            }
                        } else {
                            KeyState::Abandoned {
                                fingerprint: Fingerprint::from_bytes([fp; 32]),
                                token: FencingToken::new(token),
                                expires_in: Duration::from_millis(gone_at - now),
                            }
                        };
                        assert_eq!(state, want);
                    }
                    (
                        Model::Completed {
                            fp,
                            payload,
                            gone_at,
                        },
                        Some(state),
                    ) => assert_eq!(
                        state,
                        KeyState::Completed {
                            fingerprint: Fingerprint::from_bytes([fp; 32]),
                            payload,
                            expires_in: Duration::from_millis(gone_at - now),
                        }
                    ),
                    (model, got) => panic!("inspect at {now} ms: model {model:?}, store {got:?}"),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_memory_store_follows_the_key_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut run = Run {
                store: MemoryStore::new(),
                keys: [
                    StoreKey::new("model:a").expect("valid"),
                    StoreKey::new("model:b").expect("valid"),
                ],
                models: [Model::Free, Model::Free],
                issued: [Vec::new(), Vec::new()],
                now: 0,
            };
            for op in &ops {
                run.step(op).await;
            }
        });
    }
}
