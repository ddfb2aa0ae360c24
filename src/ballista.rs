//! `tandem ballista scheduler|executor`: an Apache Ballista cluster from the same binary, so
//! that `batch run --engine ballista://HOST:PORT` has a cluster to run on without installing
//! anything else (one scheduler, any number of executors, on one machine or many).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BallistaCommand {
    /// A Ballista scheduler: it plans the stages of a query and hands tasks to executors.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Port of its gRPC service (what `--engine ballista://HOST:PORT` names).
        #[arg(long, default_value_t = 50050)]
        port: u16,
    },
    /// A Ballista executor: runs tasks for the scheduler, reading the master dataset's files
    /// from the store they are in.
    Executor {
        /// Address to listen on (and to advertise to the scheduler).
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Port of its Arrow Flight service (shuffle data).
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// Port of its gRPC service.
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// The scheduler, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: String,
        /// Tasks it runs at once (default: the machine's cores).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Where it keeps shuffle files (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

pub async fn run(cmd: BallistaCommand) -> Result<()> {
    match cmd {
        BallistaCommand::Scheduler { bind, port } => {
            use ballista_scheduler::cluster::BallistaCluster;
            use ballista_scheduler::config::SchedulerConfig;
            let config = SchedulerConfig {
                bind_host: bind.clone(),
                bind_port: port,
                external_host: bind.clone(),
                ..Default::default()
            };
            let addr = format!("{bind}:{port}")
                .parse()
                .with_context(|| format!("--bind {bind} --port {port}"))?;
            let cluster = BallistaCluster::new_from_config(&config).await?;
            tracing::info!(%addr, "Ballista scheduler listening");
            eprintln!("Ballista scheduler listening on {addr}");
            tokio::select! {
                r = ballista_scheduler::scheduler_process::start_server(cluster, addr, Arc::new(config)) => r?,
                _ = crate::roles::shutdown_signal() => {}
            }
            Ok(())
        }
        BallistaCommand::Executor {
            bind,
            port,
            grpc_port,
            scheduler,
            concurrency,
            work_dir,
        } => {
            use ballista_executor::executor_process::{
                start_executor_process, ExecutorProcessConfig,
            };
            let (host, sport) = scheduler
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .with_context(|| format!("--scheduler `{scheduler}`: expected HOST:PORT"))?;
            if let Some(dir) = &work_dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut config = ExecutorProcessConfig {
                bind_host: bind.clone(),
                external_host: Some(bind),
                port,
                grpc_port,
                scheduler_host: host,
                scheduler_port: sport,
                work_dir: work_dir.map(|d| d.display().to_string()),
                print_thread_info: false,
                ..Default::default()
            };
            if let Some(n) = concurrency {
                config.vcores = n.max(1);
            }
            eprintln!(
                "Ballista executor on port {port} (gRPC {grpc_port}) for the scheduler at {scheduler}"
            );
            start_executor_process(Arc::new(config)).await?;
            Ok(())
        }
    }
}
