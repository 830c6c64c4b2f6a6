//! In-memory store: sharded, bounded, TTL expiry (to be written).
