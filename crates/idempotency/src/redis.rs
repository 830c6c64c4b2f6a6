//! Redis store: one round trip per operation (to be written).
