//! Exactly-once `Idempotency-Key` handling (work in progress).
//!
//! The storage seam is [`store::Store`]; every store passes
//! [`conformance`].

pub mod conformance;
pub mod store;

pub mod memory;

#[cfg(feature = "embedded")]
pub mod embedded;

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "postgres")]
pub mod postgres;
