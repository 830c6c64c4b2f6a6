//! Embedded durable store on redb (to be written).
