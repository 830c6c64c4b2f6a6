//! PostgreSQL store: one statement per operation (to be written).
