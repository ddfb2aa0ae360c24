//! Ingestion's runtime: the consumers, the archiver's commits, the speed layer's checkpoints,
//! scheduled recomputes and table upkeep run on worker threads of their own, at a lower CPU
//! priority (a higher Linux nice value) than the threads that answer queries.
//!
//! On a busy core the scheduler then gives an answer's work the core first, and ingestion the
//! rest: a Delta commit or a checkpoint of a large state (tens of milliseconds of CPU) no
//! longer holds up the requests queued behind it on the same worker thread. Ingestion still
//! gets every idle cycle, and about a tenth of a saturated core at nice 10 (the kernel's
//! weight of nice 10 is 110 against 1,024 for nice 0), so it falls behind only while queries
//! saturate every core, and then its lag shows in `meta.speed_lag_ms` and `/readyz`.
//!
//! Threads inherit the nice value of the thread that starts them, so the librdkafka threads a
//! consumer starts on this runtime run at its priority too; the runtime that serves is never
//! touched (lowering a nice value again needs a privilege).

use std::sync::Mutex;

use anyhow::{Context, Result};
use tokio::runtime::Handle;

/// How many nice steps below serving's threads ingestion's run by default.
pub const DEFAULT_NICE: i32 = 10;

/// The ingestion runtime, once started (it lives as long as the process).
static RUNTIME: Mutex<Option<Handle>> = Mutex::new(None);

/// The runtime of answer computations, once started.
static COMPUTE: Mutex<Option<Handle>> = Mutex::new(None);

/// Nice steps between the threads that send answers and the ones that compute them.
pub const COMPUTE_NICE: i32 = 5;

/// The runtime on whose blocking threads a server computes answers, [`COMPUTE_NICE`] steps
/// below the caller (`None` if it cannot start: the serving runtime's own then).
pub fn compute_runtime() -> Option<Handle> {
    // Only its blocking threads work: one worker is enough.
    match lowered(&COMPUTE, "tandem-compute", COMPUTE_NICE, Some(1)) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "answers are computed at serving's priority");
            None
        }
    }
}

/// The runtime ingestion runs on, `nice` (0-19) steps below the caller's priority: `None` for
/// 0, which means the caller's own runtime; else a multi-threaded runtime with as many workers
/// as cores, started on the first call (later calls get the same one, whatever their `nice`).
pub fn runtime(nice: i32) -> Result<Option<Handle>> {
    if nice == 0 {
        return Ok(None);
    }
    lowered(&RUNTIME, "tandem-ingest", nice, None).map(Some)
}

/// The runtime of `slot`, started on the first call with threads named `name`, `nice` steps
/// below the caller, and `workers` worker threads (`None`: one a core).
fn lowered(
    slot: &Mutex<Option<Handle>>,
    name: &str,
    nice: i32,
    workers: Option<usize>,
) -> Result<Handle> {
    let mut started = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = started.as_ref() {
        return Ok(handle.clone());
    }
    let target = below_caller(nice);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    let runtime = builder
        .enable_all()
        .thread_name(name)
        .on_thread_start(move || lower_priority(target))
        .build()
        .with_context(|| format!("starting the runtime {name}"))?;
    // Never dropped: its tasks run until the process ends, and a runtime cannot be dropped
    // from within another one's task.
    let handle = Box::leak(Box::new(runtime)).handle().clone();
    *started = Some(handle.clone());
    Ok(handle)
}

/// Starts `f` on a new thread at ingestion's priority, `nice` steps below the caller's: for
/// clients created outside the runtime whose own threads should inherit that priority.
pub fn thread<T: Send + 'static>(
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let target = below_caller(nice);
    std::thread::Builder::new()
        .name("tandem-ingest".into())
        .spawn(move || {
            if nice != 0 {
                lower_priority(target);
            }
            f()
        })
        .context("starting a thread")
}

/// Runs `f` on a new thread at ingestion's priority (see [`thread`]) and returns its result.
pub fn on_thread<T: Send + 'static>(
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    thread(nice, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("a thread starting an ingestion client panicked"))
}

/// The nice value `nice` steps below the calling thread's (at most 19, the lowest priority).
fn below_caller(nice: i32) -> i32 {
    (own_nice() + nice).min(19)
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn own_nice() -> i32 {
    // SAFETY: getpriority reads no memory of ours; `who = 0` with PRIO_PROCESS is the calling
    // thread on Linux. (It may return -1 as a value; an error, impossible here, reads as -1.)
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(not(target_os = "linux"))]
fn own_nice() -> i32 {
    0
}

/// Sets the calling thread's nice value (on Linux a thread's own; raising it needs no
/// privilege). A failure is logged: ingestion then runs at serving's priority.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority(nice: i32) {
    // SAFETY: setpriority reads no memory of ours; `who = 0` with PRIO_PROCESS is the calling
    // thread on Linux, whose nice values are per thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "ingestion's thread keeps serving's CPU priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn ingestion_and_computations_run_below_serving_and_serving_keeps_its_priority() {
        let before = own_nice();
        let ingest = runtime(DEFAULT_NICE)
            .unwrap()
            .expect("a runtime of its own");
        let (on_worker, on_blocking) = ingest
            .spawn(async {
                let blocking = tokio::task::spawn_blocking(own_nice).await.unwrap();
                (own_nice(), blocking)
            })
            .await
            .unwrap();
        assert_eq!(on_worker, (before + DEFAULT_NICE).min(19));
        assert_eq!(on_blocking, (before + DEFAULT_NICE).min(19));
        // A thread a client starts from there inherits it.
        let inherited = ingest
            .spawn(async { std::thread::spawn(own_nice).join().unwrap() })
            .await
            .unwrap();
        assert_eq!(inherited, on_worker);
        assert_eq!(on_thread(DEFAULT_NICE, own_nice).unwrap(), on_worker);
        // The caller's thread and runtime are untouched.
        assert_eq!(own_nice(), before);
        assert_eq!(tokio::task::spawn_blocking(own_nice).await.unwrap(), before);
        // Nice 0 means the caller's runtime.
        assert!(runtime(0).unwrap().is_none());
        // Answers are computed between the two.
        let compute = compute_runtime().expect("a runtime for computations");
        let computing = compute.spawn_blocking(own_nice).await.unwrap();
        assert_eq!(computing, (before + COMPUTE_NICE).min(19));
        assert!(computing < on_worker || on_worker == 19);
    }
}
