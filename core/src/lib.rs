//! tandem-core: the contracts every layer shares, and nothing that talks to the outside.
//!
//! It owns event schemas ([`schema`]) and view definitions ([`view`]) as data, the columnar
//! decoder from Kafka messages to Arrow ([`decode`]), a view's filter ([`filter`]), the metric
//! states that merge across partitions, layers and time ([`metric`]), the query contract and
//! the merged answer ([`query`]), the storage layout and Delta tables ([`paths`], [`storage`]), the synthetic reference
//! workload ([`gen`]), and the traits at the seams between layers ([`traits`]). It has no
//! sockets, no Kafka and no query planning: the speed, batch and serving crates build on it.

pub mod catalog;
pub mod decode;
pub mod error;
pub mod filter;
pub mod gen;
pub mod master;
pub mod metric;
pub mod paths;
pub mod query;
pub mod schema;
pub mod storage;
pub mod time;
pub mod traits;
pub mod view;

pub use catalog::Catalog;
pub use error::{CoreError, Result};
