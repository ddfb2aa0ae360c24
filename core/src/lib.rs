//! tandem-core: the contracts every layer shares, and nothing that talks to the outside.
//!
//! It owns event schemas ([`schema`]), view definitions ([`view`]) and SQL jobs ([`job`]) as
//! data, the columnar
//! decoder from Kafka messages to Arrow ([`decode`]), a view's filter ([`filter`]), every
//! metric kind in one place ([`metric`]: its state, update, merge, batch columns and answer
//! column), the query model and the merged answer ([`query`]), the storage layout and Delta
//! tables ([`paths`], [`storage`]), the one writer of the master dataset ([`master`]), time and
//! an injectable clock ([`time`]), and the traits at the seams between layers ([`traits`]).
//! It has no sockets, no Kafka, no HTTP parsing or rendering, no query planning and no
//! generator: the speed, batch and serving crates build on it.

pub mod catalog;
pub mod codec;
pub mod decode;
pub mod error;
pub mod filter;
pub mod job;
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
pub use error::{CoreError, ErrorClass, Result};
