//! Work that may lag behind the message path runs on threads of lower priority.
//!
//! Taking a message in (HTTP, the log writer's fsync), routing it and delivering it are what
//! a sender and a subscriber wait for. The indexes built from the log (the lineage index
//! behind search and the console, the FHIR resource index) are read from the log at their
//! own pace and catch up where they stopped, so nothing is lost when they lag. They run on a
//! runtime of their own whose threads, its blocking threads too, are niced by [`NICE`]:
//! when both kinds of work want the CPU, the message path gets it first, and the indexes
//! use what is left. They are not starved: Linux's scheduler still gives a nice-10 thread
//! about a tenth of a core against a busy nice-0 thread.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;

use super::{Consumer, Record};

/// How much lower the priority of background threads is (added to the process's nice
/// value, at most 19).
pub const NICE: i32 = 10;

/// Worker threads of the background runtime.
const THREADS: usize = 2;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // From the thread that first asks, one of the message path's: a thread inherits its
        // creator's nice value, and the background runtime's own threads start new ones.
        let nice = (nice_of_this_thread() + NICE).min(19);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .max_blocking_threads(2 * THREADS)
            .thread_keep_alive(Duration::from_secs(10))
            .thread_name("ketenbus-bg")
            .on_thread_start(move || set_nice_of_this_thread(nice))
            .enable_all()
            .build()
            .expect("the background runtime starts")
    })
}

/// The calling thread's nice value (0 when it cannot be read).
fn nice_of_this_thread() -> i32 {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
}

/// Set the calling thread's nice value. On Linux a nice value set on a thread id holds for
/// that thread alone.
fn set_nice_of_this_thread(nice: i32) {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
        tracing::debug!(error = %e, "a background thread keeps its priority");
    }
}

/// How long a background reader waits for one more record before it applies what it has.
pub const GAP: Duration = Duration::from_millis(5);

/// `first` and the records that follow it on `reader` with less than [`GAP`] between them,
/// at most `max`: one index transaction for a burst. A read error ends the batch; the
/// reader sees it again on its next poll.
pub async fn gather<C: Consumer>(reader: &mut C, first: Record, max: usize) -> Vec<Record> {
    let mut batch = vec![first];
    while batch.len() < max {
        match reader.poll(GAP).await {
            Ok(Some(r)) => batch.push(r),
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// Run `work` on the background runtime. The returned future ends when `work` does; dropping
/// it (its task or its runtime ending) stops `work`, so background work never outlives the
/// task that started it.
pub fn run<F>(work: F) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let task = AbortOnDropHandle::new(runtime().spawn(work));
    async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "background task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn background_work_runs_at_lower_priority_its_blocking_work_too() {
        let mine = nice_of_this_thread();
        let (tx, rx) = tokio::sync::oneshot::channel();
        run(async move {
            let worker = nice_of_this_thread();
            // Blocking threads are started by the (niced) workers: each still gets the
            // runtime's nice value, not its creator's lowered once more.
            let mut blocking = Vec::new();
            for _ in 0..8 {
                let slow = || {
                    std::thread::sleep(Duration::from_millis(20));
                    nice_of_this_thread()
                };
                let (a, b) = tokio::join!(
                    tokio::task::spawn_blocking(slow),
                    tokio::task::spawn_blocking(slow)
                );
                blocking.extend([a.unwrap(), b.unwrap()]);
            }
            let _ = tx.send((worker, blocking));
        })
        .await;
        let (worker, blocking) = rx.await.unwrap();
        let want = (mine + NICE).min(19);
        assert_eq!(worker, want);
        assert!(
            blocking.iter().all(|n| *n == want),
            "{blocking:?}, want {want}"
        );
        assert_eq!(
            nice_of_this_thread(),
            mine,
            "the caller's thread is left alone"
        );
    }

    #[tokio::test]
    async fn dropping_the_future_stops_the_work() {
        let ran_on = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran_on);
        let started = tokio::sync::Notify::new();
        let started = Arc::new(started);
        let s = Arc::clone(&started);
        let fut = run(async move {
            s.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            flag.store(true, Ordering::SeqCst);
        });
        let handle = tokio::spawn(fut);
        started.notified().await;
        handle.abort();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !ran_on.load(Ordering::SeqCst),
            "the work went on after its future was dropped"
        );
    }
}
