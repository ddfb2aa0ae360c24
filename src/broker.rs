//! `tandem broker`: librdkafka's mock cluster in a process of its own, on a fixed loopback
//! port, so that consumers can be killed and restarted while the broker lives on.
//!
//! The mock cluster binds a random port; this process listens on the port asked for and
//! relays each connection to it. Clients bootstrap through the fixed port; the cluster's
//! metadata then names its own port, which they reach directly (both are on loopback).

use anyhow::{Context, Result};
use clap::Args;
use rdkafka::mocking::MockCluster;
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Loopback port clients bootstrap through (`--brokers 127.0.0.1:PORT`).
    #[arg(long, default_value_t = 9092)]
    pub port: u16,
    /// Partitions of each topic created.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Topic to create (default: every schema's topic).
    #[arg(long)]
    pub topic: Vec<String>,
}

pub async fn run(config: &Config, args: BrokerArgs) -> Result<()> {
    if args.partitions < 1 {
        anyhow::bail!("--partitions must be at least 1");
    }
    let topics = if args.topic.is_empty() {
        let catalog = crate::roles::catalog(config)?;
        catalog.schemas.values().map(|s| s.topic.clone()).collect()
    } else {
        args.topic.clone()
    };
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", args.port))?;
    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    for t in &topics {
        cluster
            .create_topic(t, args.partitions, 1)
            .with_context(|| format!("creating topic {t}"))?;
    }
    let inner = cluster.bootstrap_servers();
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        cluster = %inner,
        ?topics,
        partitions = args.partitions,
        "development broker up: librdkafka's mock cluster, data in memory only (gone when this process ends; the oldest messages of a partition are dropped past about 5 MB); Ctrl-C stops it"
    );
    loop {
        tokio::select! {
            _ = crate::roles::shutdown_signal() => break,
            accepted = listener.accept() => {
                let (mut client, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(&inner).await {
                        Ok(mut upstream) => {
                            let _ = client.set_nodelay(true);
                            let _ = upstream.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot reach the mock cluster"),
                    }
                });
            }
        }
    }
    tracing::info!("broker stopped");
    drop(cluster);
    Ok(())
}
