//! Port implementations.
