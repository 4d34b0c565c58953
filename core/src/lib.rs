//! The parts of pg_tenancy that need no PostgreSQL, tested with plain `cargo test`:
//! - [`tenant_id`]: the shape of a tenant id and its canonical form;
//! - [`model`]: scopes, tenant statuses, key kinds and states;
//! - [`token`]: HS256 tokens (verification, and signing for tests and the demo);
//! - [`envelope`]: the ciphertext format and AES-256-GCM (AWS-LC);
//! - [`master_key`]: the master key's formats, identity, the wrapping of tenant keys, and the
//!   bounded command that reads it;
//! - [`policy`]: the statements that protect and unprotect a table, rendered from `sql/`;
//! - [`archive`]: the tenant backup archive (manifest, checksums, chunks);
//! - [`logmask`]: what server log lines lose (tokens, literals, parameter and row values);
//! - [`metrics`]: per-tenant usage (latency buckets and quantiles, the rate limit's token
//!   bucket, error classes, the Prometheus text format).
pub mod archive;
pub mod envelope;
pub mod logmask;
pub mod metrics;
pub mod master_key;
pub mod model;
pub mod policy;
pub mod tenant_id;
pub mod token;
